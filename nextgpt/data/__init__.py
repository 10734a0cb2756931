"""Training data: record formats, datasets, tar-shard streaming and the caption-embedding store."""

from nextgpt.data.formats import DataError, ReadResult, Sample, parse_record, read_samples

__all__ = ["DataError", "ReadResult", "Sample", "parse_record", "read_samples"]
