"""Records to batches: encoding, truncation, the step sampler, tar shards, caption embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nextgpt.data.dataset import (
    SampleEncoder,
    StepBatchSampler,
    collate_encoded,
    truncate,
)
from nextgpt.data.embeddings import CaptionEmbeddingStore, caption_key, precompute
from nextgpt.data.formats import DataError, read_samples
from nextgpt.data.shards import ShardStream, expand_shards, pack_shards
from nextgpt.data.toy import write_toy_dataset


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    return write_toy_dataset(tmp_path_factory.mktemp("toy"), copies=2)


def test_encoded_batch_feeds_the_model(tiny_model, toy):
    encoder = SampleEncoder.for_model(tiny_model)
    samples = read_samples(toy["stage2"]).samples
    items = [encoder(s) for s in (samples[0], samples[-1])]  # an image and a video request
    batch = collate_encoded(items, tiny_model.llm.tokenizer.pad_token_id)
    assert set(batch.targets) == {"image", "video"}
    assert batch.targets["image"].captions == ["a red square"]
    out = tiny_model(batch, losses=("text", "align"))
    assert set(out.terms) == {"text", "align/image", "align/video"}


def test_truncation_never_splits_a_signal_group(tiny_model, toy):
    encoder = SampleEncoder.for_model(tiny_model)
    sample = read_samples(toy["stage2"]).samples[-1]  # ends with a 24-token video group
    full = encoder(sample)
    video_ids = tiny_model.llm.signal.ids["video"]
    start = full.input_ids.index(video_ids[0])
    cut = truncate(full, start + 10, tiny_model.llm.signal, encoder.media_tokens)
    assert len(cut.input_ids) == start and cut.outputs == []
    kept = truncate(full, start + len(video_ids), tiny_model.llm.signal, encoder.media_tokens)
    assert len(kept.outputs) == 1 and kept.input_ids[-1] == video_ids[-1]
    with pytest.raises(DataError, match="nothing to learn within max_length 10"):
        SampleEncoder.for_model(tiny_model, max_length=10)(sample)


def test_step_sampler_splits_global_batches_across_processes_and_accumulation():
    def chunks(processes: int, accumulation: int) -> list[list[int]]:
        per_rank = [
            list(StepBatchSampler(16, 2, accumulation, processes, r, total_steps=3, seed=1))
            for r in range(processes)
        ]
        return [b for step in zip(*per_rank) for b in step]  # interleave ranks per micro-batch

    one = list(StepBatchSampler(16, 2, 2, 1, 0, total_steps=3, seed=1))
    assert chunks(2, 1) == one  # 2 processes see the micro-batches 1 process accumulates
    assert sorted(i for b in one[:4] for i in b) == sorted(set(i for b in one[:4] for i in b))
    resumed = list(StepBatchSampler(16, 2, 2, 1, 0, total_steps=3, seed=1, start_step=1))
    assert resumed == one[2:]
    with pytest.raises(DataError, match="fewer than one global batch"):
        StepBatchSampler(3, 2, 1, 2, 0, total_steps=1, seed=0)


def test_tar_shards_stream_the_same_samples(tiny_model, toy, tmp_path):
    shards = pack_shards(toy["stage1"], tmp_path / "shards", per_shard=5)
    assert len(shards) == 3  # 13 records
    pattern = str(tmp_path / "shards" / "shard-{000000..000002}.tar")
    assert expand_shards(pattern) == [str(s) for s in shards]
    encoder = SampleEncoder.for_model(tiny_model)
    stream = ShardStream([str(s) for s in shards], encoder, batch_size=1, seed=0)
    items = iter(stream)
    streamed = [next(items) for _ in range(13)]
    direct = [encoder(s) for s in read_samples(toy["stage1"]).samples]
    key = [(tuple(x.input_ids), x.media[0][0]) for x in direct]
    assert sorted(key) == sorted((tuple(x.input_ids), x.media[0][0]) for x in streamed)
    for s in streamed:  # media were loaded from the tar members
        match = next(
            d for d in direct if d.input_ids == s.input_ids and d.media[0][0] == s.media[0][0]
        )
        if torch.equal(match.media[0][1], s.media[0][1]):
            break
    else:
        pytest.fail("no streamed sample matched its JSON twin's media")
    # a resumed stream skips what was consumed
    skipped = ShardStream([str(s) for s in shards], encoder, batch_size=1, seed=0, skip_batches=3)
    assert next(iter(skipped)).input_ids == streamed[3].input_ids


def test_bad_record_in_a_shard(tiny_model, tmp_path):
    data = tmp_path / "d.json"
    good = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    data.write_text(json.dumps([good, {"conversations": []}, good]))
    (shard,) = pack_shards(data, tmp_path / "s")
    encoder = SampleEncoder.for_model(tiny_model)
    with pytest.raises(DataError, match=r"shard-000000\.tar: sample 000000001: 'conversations'"):
        list(zip(range(3), ShardStream([str(shard)], encoder, batch_size=1)))
    stream = ShardStream([str(shard)], encoder, batch_size=1, skip_bad=True)
    assert len(list(zip(range(4), stream))) == 4 and stream.skipped >= 1


def test_broken_jsonl_line_is_packed_as_a_bad_record(tiny_model, tmp_path):
    """pack_shards used to crash with 'Object of type _BadJSON is not JSON serializable'."""
    data = tmp_path / "d.jsonl"
    good = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    data.write_text(f"{json.dumps(good)}\n{{broken\n{json.dumps(good)}\n")
    (shard,) = pack_shards(data, tmp_path / "s")
    encoder = SampleEncoder.for_model(tiny_model)
    with pytest.raises(DataError, match=r"sample 000000001: not valid JSON"):
        list(zip(range(3), ShardStream([str(shard)], encoder, batch_size=1)))
    stream = ShardStream([str(shard)], encoder, batch_size=1, skip_bad=True)
    assert len(list(zip(range(4), stream))) == 4 and stream.skipped >= 1


def test_resume_with_skip_bad_does_not_count_a_record_that_failed(tiny_model, tmp_path):
    """A record that parses but whose media cannot be read is skipped (skip_bad) without being
    yielded: a resume must not count it as a consumed sample, or it starts one sample late."""
    (tmp_path / "broken.png").write_bytes(b"not a png")

    def record(text: str, image: str | None = None) -> dict:
        human = "<image> hi" if image else "hi"
        turns = [{"from": "human", "value": human}, {"from": "gpt", "value": text}]
        return {"conversations": turns, **({"image": image} if image else {})}

    data = tmp_path / "d.json"
    records = [record("zero"), record("bad", "broken.png"), *map(record, ["two", "three"])]
    data.write_text(json.dumps(records))
    (shard,) = pack_shards(data, tmp_path / "s")
    encoder = SampleEncoder.for_model(tiny_model)
    unbroken = ShardStream([str(shard)], encoder, batch_size=1, skip_bad=True)
    streamed = [x.input_ids for _, x in zip(range(3), unbroken)]  # zero, two, three
    resumed = ShardStream([str(shard)], encoder, batch_size=1, skip_batches=2, skip_bad=True)
    assert next(iter(resumed)).input_ids == streamed[2]


def test_collect_captions_from_shards_names_or_skips_a_bad_sample(tmp_path):
    """`embed-captions` on shards: broken JSON was a JSONDecodeError traceback, and a bad record
    stopped it even with skip_bad_records."""
    from nextgpt.training.command import collect_captions
    from nextgpt.training.config import DataConfig, DataSource

    good = {
        "image_captions": ["a red square"],
        "conversations": [{"from": "human", "value": "draw"}, {"from": "gpt", "value": "<image>"}],
    }
    data = tmp_path / "d.jsonl"
    data.write_text(f"{json.dumps(good)}\n{{broken\n{json.dumps({'conversations': []})}\n")
    (shard,) = pack_shards(data, tmp_path / "s")
    sources = (DataSource(str(shard)),)
    with pytest.raises(DataError, match=r"sample 000000001: not valid JSON"):
        collect_captions(sources, DataConfig())
    captions = collect_captions(sources, DataConfig(skip_bad_records=True))
    assert captions == {"image": ["a red square"]}


def test_unreadable_caption_embedding_file_is_a_named_bad_record(tiny_model, tmp_path):
    """A pickled or corrupt .npy / .safetensors was a bare ValueError / SafetensorError that named
    neither the record nor the file, and skip_bad could not skip it."""
    (tmp_path / "e.npy").write_bytes(b"not an npy file")
    (tmp_path / "e.safetensors").write_bytes(b"not safetensors")
    encoder = SampleEncoder.for_model(tiny_model)
    turns = [{"from": "human", "value": "draw"}, {"from": "gpt", "value": "<image>"}]
    for name in ("e.npy", "e.safetensors"):
        record = {"image_caption_embeddings": name, "conversations": turns}
        data = tmp_path / "d.json"
        data.write_text(json.dumps([record]))
        (sample,) = read_samples(data).samples
        with pytest.raises(DataError, match=rf"d\.json: record 0: .*{name}: cannot read caption"):
            encoder(sample)


def test_a_shard_record_cannot_read_files_outside_its_sample(tiny_model, tmp_path):
    """Media paths in a shard name the sample's members; an absolute or ../ path used to read
    any file of the training machine."""
    import io
    import tarfile

    outside = tmp_path / "outside.png"
    outside.write_bytes(b"secret")
    shard = tmp_path / "evil.tar"
    with tarfile.open(shard, "w") as tar:
        for i, path in enumerate([str(outside), "../../outside.png"]):
            turns = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]
            payload = json.dumps({"image": path, "conversations": turns}).encode()
            info = tarfile.TarInfo(f"{i:06d}.json")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    encoder = SampleEncoder.for_model(tiny_model)
    with pytest.raises(DataError, match=r"sample 000000: .*outside\.png is not a member"):
        next(iter(ShardStream([str(shard)], encoder, batch_size=1)))
    stream = ShardStream([str(shard)], encoder, batch_size=1, skip_bad=True)
    assert list(stream._parsed(str(shard))) == [] and stream.skipped == 2  # both are bad


def test_caption_embeddings_are_the_decoders_own_and_computed_once(tiny_model, tmp_path):
    store = CaptionEmbeddingStore(tmp_path / "embed")
    captions = {"image": ["a red square", "a blue square", "a red square"], "audio": ["a hum"]}
    done = precompute(store, tiny_model.decoders, captions, batch_size=1, shard_size=1)
    assert done == {"image": 2, "audio": 1}
    assert len(list((tmp_path / "embed").glob("image-*.safetensors"))) == 2
    own = tiny_model.decoders["image"].encode_text(["a blue square"])[0]
    torch.testing.assert_close(
        CaptionEmbeddingStore(store.directory).get("image", "a blue square"), own
    )
    assert store.get("image", "never seen") is None
    assert precompute(store, tiny_model.decoders, captions) == {"image": 0, "audio": 0}
    with pytest.raises(DataError, match="recompute them"):
        store.check("image", (77, 768))
    assert len(caption_key("x")) == 32


def test_encoder_uses_stored_embeddings(tiny_model, toy, tmp_path):
    store = CaptionEmbeddingStore(tmp_path / "embed")
    precompute(store, tiny_model.decoders, {"image": ["a red square"]})
    sample = read_samples(toy["stage2"]).samples[0]
    enc = SampleEncoder.for_model(tiny_model, captions=store)(sample)
    ((_, target),) = enc.outputs
    expected = tiny_model.decoders["image"].encode_text(["a red square"])[0]
    torch.testing.assert_close(target.embedding, expected)


def test_captions_are_collected_from_json_and_shards(toy, tmp_path):
    from nextgpt.training.command import collect_captions
    from nextgpt.training.config import DataConfig, DataSource

    shards = pack_shards(toy["stage3"], tmp_path / "shards", per_shard=100)
    sources = (DataSource(str(toy["stage2"])), DataSource(str(shards[0])))
    captions = collect_captions(sources, DataConfig())
    assert captions["image"][:2] == ["a red square", "a green square"]  # first-seen order
    assert len(captions["image"]) == len(set(captions["image"])) == 3
    assert set(captions["audio"]) == {"a low tone", "a high tone"}
    assert captions["video"] == ["a red flash", "a green flash", "a blue flash"]


def test_json_record_whose_media_fail_to_load_is_replaced_with_skip_bad(tiny_model, tmp_path):
    """A JSON record parses (so reading it cannot skip it) but its image is broken: in the
    DataLoader this stopped training even with skip_bad_records. Now the next record that loads
    takes its place, and the error still names the file and record without skip_bad."""
    from nextgpt.data.dataset import ConversationDataset

    (tmp_path / "broken.png").write_bytes(b"not a png")
    turns = [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}]
    plain = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "two"}]
    data = tmp_path / "d.json"
    data.write_text(
        json.dumps([{"conversations": turns, "image": "broken.png"}, {"conversations": plain}])
    )
    samples = read_samples(data).samples
    encoder = SampleEncoder.for_model(tiny_model)
    with pytest.raises(DataError, match=r"d\.json: record 0: .*broken\.png"):
        ConversationDataset(samples, encoder)[0]
    replaced = ConversationDataset(samples, encoder, skip_bad=True)[0]
    assert replaced.input_ids == encoder(samples[1]).input_ids
    only_bad = ConversationDataset(samples[:1], encoder, skip_bad=True)
    with pytest.raises(DataError, match=r"1 records in a row from index 0.*broken\.png"):
        only_bad[0]
