"""A ``datasets`` builder for the Open-Qwen2VL pretraining corpora: the programmatic replacement of the loading
scripts that datasets >= 4 no longer runs.

```python
from dataset_builders.open_qwen2vl_data import OpenQwen2VLData

builder = OpenQwen2VLData(config_name="ccs", data_dir="path/to/corpus")  # or hf://datasets/<org>/Open-Qwen2VL-Data
builder.download_and_prepare()
ds = builder.as_dataset(split="train")                  # image (PIL), text, uid, url, key, subset
stream = builder.as_streaming_dataset(split="train")    # same rows, read on the fly
```

Configs are the subsets of ``cards.KNOWN_SUBSETS`` plus the ``pretraining`` mixture. Unlike the bare webdataset
builder, rows have named columns, a uid for every sample, and damaged samples (corrupt tar, unreadable image,
missing caption...) are skipped and counted instead of failing the whole load.
"""

from __future__ import annotations

from collections import Counter

import datasets
from datasets.builder import Key
from datatrove.io import get_datafolder

from .cards import KNOWN_SUBSETS, MIXTURES, RELEASE_REPO
from .images import BadImage, inspect_image, normalize_for_corpus
from .shards import Dropped, ShardProblem, iter_samples, list_shards

DEFAULT_DATA_DIR = f"hf://datasets/{RELEASE_REPO}"
logger = datasets.utils.logging.get_logger(__name__)


class OpenQwen2VLDataConfig(datasets.BuilderConfig):
    """``subsets``: the subset names this config concatenates (their folders come from ``cards.KNOWN_SUBSETS``)."""

    def __init__(self, subsets: tuple[str, ...] = (), **kwargs):
        super().__init__(**kwargs)
        self.subsets = tuple(subsets) or (self.name,)


class OpenQwen2VLData(datasets.GeneratorBasedBuilder):
    BUILDER_CONFIG_CLASS = OpenQwen2VLDataConfig
    BUILDER_CONFIGS = [
        OpenQwen2VLDataConfig(name=name, subsets=(name,), description=subset.description)
        for name, subset in KNOWN_SUBSETS.items()
    ] + [
        OpenQwen2VLDataConfig(name=name, subsets=parts, description="concatenation of " + ", ".join(parts))
        for name, parts in MIXTURES.items()
    ]
    DEFAULT_CONFIG_NAME = "pretraining"
    DEFAULT_WRITER_BATCH_SIZE = 200

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description="Open-Qwen2VL pretraining image-caption pairs (WebDataset shards, img2dataset layout).",
            features=datasets.Features({
                "image": datasets.Image(),
                "text": datasets.Value("string"),
                "uid": datasets.Value("string"),
                "url": datasets.Value("string"),
                "key": datasets.Value("string"),
                "subset": datasets.Value("string"),
            }),
            homepage=f"https://huggingface.co/datasets/{RELEASE_REPO}",
        )

    def _split_generators(self, dl_manager):
        root = (self.config.data_dir or DEFAULT_DATA_DIR).rstrip("/")
        shards = []
        for subset in self.config.subsets:
            folder = f"{root}/{KNOWN_SUBSETS[subset].folder}"
            names = list_shards(folder)
            if not names:
                raise FileNotFoundError(f"subset {subset!r}: no *.tar shards in {folder}")
            shards += [(subset, folder, name) for name in names]
        return [datasets.SplitGenerator(name=datasets.Split.TRAIN, gen_kwargs={"shards": shards})]

    def _generate_shards(self, shards):
        for _, folder, name in shards:
            yield get_datafolder(folder).resolve_paths(name)

    def _generate_examples(self, shards):
        for shard_index, (subset, folder, name) in enumerate(shards):
            skipped: Counter = Counter()
            index = 0
            for item in iter_samples(folder, name):
                if isinstance(item, ShardProblem):
                    logger.error(f"{folder}/{name} is truncated or corrupt: {item.detail}")
                    continue
                if isinstance(item, Dropped):
                    skipped[item.reason] += 1
                    continue
                try:
                    # A full decode: a JPEG with corrupt scan data passes the header check and would fail on read.
                    info = inspect_image(item.image, full_decode=True)
                    image, _ = normalize_for_corpus(item.image, info)
                except BadImage as error:
                    skipped[error.reason] += 1
                    continue
                yield Key(shard_index, index), {
                    "image": {"bytes": image, "path": None},
                    "text": item.caption,
                    "uid": item.uid,
                    "url": item.url,
                    "key": item.key,
                    "subset": subset,
                }
                index += 1
            if skipped:
                logger.warning(f"{folder}/{name}: skipped {sum(skipped.values())} damaged sample(s) {dict(skipped)}")
