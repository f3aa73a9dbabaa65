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

A mixture needs all of its subsets unless the ``subsets`` config kwarg picks some of them (any order; rows come in
the mixture's order, and the ``subset`` column says where each row is from):

```python
builder = OpenQwen2VLData(config_name="pretraining", subsets=["ccs", "laion"], data_dir="path/to/corpus")
```

The selection gets a cache of its own (its config id hashes the chosen subsets); choosing every part is the full
config. A name that is not a part of the config, or an empty list, is a ValueError. Subsets without shards under
``data_dir`` are a FileNotFoundError naming all of them, the folders looked in, the subsets present and the
``subsets=[...]`` to pass.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

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


def choose_subsets(config_name: str, parts: tuple[str, ...], requested: str | Iterable[str]) -> tuple[str, ...]:
    """The ``subsets`` a user asked for, checked against the config's ``parts`` and put in their order (so one
    selection, in any order or with repeats, is one cache)."""
    names = [requested] if isinstance(requested, str) else list(requested)
    if not names:
        raise ValueError(f"subsets=[] selects nothing: pass some of {list(parts)} for config {config_name!r}, or "
                         f"leave subsets out to load all of them")
    unknown = sorted({str(n) for n in names} - set(parts))
    if unknown:
        own = [n for n in unknown if n in KNOWN_SUBSETS]
        hint = f" ({', '.join(own)}: a config of its own, config_name={own[0]!r})" if own else ""
        raise ValueError(f"unknown subset(s) {unknown} for config {config_name!r}{hint}; its subsets are "
                         f"{list(parts)}")
    return tuple(p for p in parts if p in names)


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

    def _create_builder_config(self, config_name: str | None = None, custom_features=None, config_id: str | None = None,
                               **config_kwargs) -> tuple[datasets.BuilderConfig, str]:
        # datasets derives the cache id from the raw kwargs: normalise ``subsets`` first, so that equal selections
        # share a cache, all parts reuse the full config's, and a bad name fails here rather than mid-build.
        requested = config_kwargs.pop("subsets", None)
        base = self.builder_configs.get(config_name or self.DEFAULT_CONFIG_NAME)
        if requested is not None and base is not None:  # an unknown config_name: datasets' own error follows
            chosen = choose_subsets(base.name, base.subsets, requested)
            if chosen != base.subsets:
                config_kwargs["subsets"] = chosen
                config_kwargs["description"] = "concatenation of " + ", ".join(chosen)
        return super()._create_builder_config(config_name, custom_features, config_id, **config_kwargs)

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
        shards, missing = [], {}
        for subset in self.config.subsets:  # look at every subset, so the error names all the missing ones
            folder = f"{root}/{KNOWN_SUBSETS[subset].folder}"
            names = list_shards(folder)
            if not names:
                missing[subset] = folder
            shards += [(subset, folder, name) for name in names]
        if missing:
            raise FileNotFoundError(missing_subsets_message(self.config.name, root, self.config.subsets, missing))
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


def missing_subsets_message(config_name: str, root: str, subsets: tuple[str, ...], missing: dict[str, str]) -> str:
    """What is missing (subset and the folder looked in), what is there, and the kwarg that loads only that."""
    lines = [f"config {config_name!r}: no *.tar shards under data_dir {root} for {len(missing)} of its "
             f"{len(subsets)} subset(s):"]
    lines += [f"  - {subset!r}: looked in {folder}" for subset, folder in missing.items()]
    present = [s for s in subsets if s not in missing]
    if present:
        lines.append(f"Present: {present}. To load only those, pass subsets={present}, e.g. "
                     f"OpenQwen2VLData(config_name={config_name!r}, subsets={present}, data_dir=...).")
    else:
        lines.append("None of them is present: check data_dir (the release layout: one *_webdataset/ folder of "
                     "*.tar shards per subset).")
    return "\n".join(lines)
