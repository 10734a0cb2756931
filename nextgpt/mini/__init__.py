"""nextgpt-mini: a miniature world and the tools to build, train and judge a NExT-GPT on it.

`world` makes the media and captions, `dialogues` the instruction data in NExT-GPT's JSON formats,
`judges` the small classifiers that score media (real or generated) by their attributes.
"""

from nextgpt.mini.world import MODALITIES, Sample, World, WorldConfig

__all__ = ["MODALITIES", "Sample", "World", "WorldConfig"]
