"""Load SFT data with `datasets` and encode it lazily-imaged: token ids now, pixels at collation time.

``load_raw_sft_dataset`` reads JSON arrays, JSONL, parquet, a dataset folder with a card, or a hub id (map-style or
``streaming=True``). ``encode_sft_dataset`` turns raw rows into compact token ids + labels with ``Dataset.map``
(cached, ``num_proc`` workers) or lazily on the stream; images are only checked for existence and decoded by the
collator, batch by batch.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import datasets
import pyarrow.compute as pc
from datasets import Dataset, Features, IterableDataset, LargeList, List, Value

from .encoding import SFTEncoder
from .errors import BadSampleError, DroppedContent, SkipLog
from .formats import FORMATS, detect_format, to_sft_sample

logger = logging.getLogger(__name__)

IMAGE_REF = {"bytes": Value("binary"), "path": Value("string")}
ENCODED_FEATURES = Features(
    {
        "sample_id": Value("string"),
        "input_ids": List(Value("int32")),
        "labels": List(Value("int32")),
        "images": List(IMAGE_REF),
        "length": Value("int64"),
        "skip_reason": Value("string"),
        "dropped_content": List(Value("string")),  # DroppedContent reasons of a kept sample (counted, then removed)
    }
)
SOURCE_ROW = "__source_row__"  # see number_rows
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


def load_raw_sft_dataset(
    source: str,
    split: str = "train",
    streaming: bool = False,
    config_name: str | None = None,
) -> Dataset | IterableDataset:
    """Raw rows from a file (``.json`` array or JSONL, ``.jsonl``, ``.parquet``), a glob of such files, a folder
    loadable by ``datasets`` (a card with ``configs:``, data files, or written by ``save_to_disk``: read with
    ``load_from_disk``, a ``DatasetDict`` giving ``split``) or a hub dataset id.

    Image columns typed ``datasets.Image`` are left undecoded (``decode=False``): images are opened by the
    collator, so preparing a 10M-sample corpus never decodes 10M images.
    """
    suffix = "".join(Path(source.replace("*", "x")).suffixes[-1:]).lower()
    if suffix in _BUILDERS and not os.path.isdir(source):
        dataset = datasets.load_dataset(_BUILDERS[suffix], data_files={split: source}, split=split,
                                        streaming=streaming)
    elif _saved_to_disk(source):  # `load_dataset` refuses a `save_to_disk` folder
        dataset = datasets.load_from_disk(source)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"{source} (saved with save_to_disk) has splits {sorted(dataset)}, not {split!r}")
            dataset = dataset[split]
        if streaming:
            dataset = dataset.to_iterable_dataset()
    else:
        dataset = datasets.load_dataset(source, name=config_name, split=split, streaming=streaming)
    return undecoded_images(dataset)


def _saved_to_disk(source: str) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    folder = Path(source)
    return folder.is_dir() and ((folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file())


def undecoded_images(dataset: Dataset | IterableDataset) -> Dataset | IterableDataset:
    """Cast every ``datasets.Image`` column to ``Image(decode=False)``, nested ones too (an image inside a message's
    content parts): decoding them at load would decode each image, and keep a lossless PNG copy of it, during
    preparation."""
    features = dataset.features
    if not features:
        return dataset
    for name, feature in features.items():
        undecoded = _without_decoding(feature)
        if undecoded != feature:
            dataset = dataset.cast_column(name, undecoded)
    return dataset


def _without_decoding(feature):
    """``feature`` with each ``datasets.Image`` in it, at any depth, set to ``decode=False``."""
    if isinstance(feature, datasets.Image):
        return datasets.Image(mode=feature.mode, decode=False) if feature.decode else feature
    if isinstance(feature, dict):  # Features, and struct features written as dicts
        return type(feature)({key: _without_decoding(value) for key, value in feature.items()})
    if isinstance(feature, LargeList):
        return LargeList(_without_decoding(feature.feature))
    if isinstance(feature, List):  # `datasets.Sequence` builds a List too
        return List(_without_decoding(feature.feature), length=feature.length)
    return feature


def _first_row(dataset: Dataset | IterableDataset) -> dict:
    for row in dataset.take(1) if isinstance(dataset, IterableDataset) else dataset.select(range(min(1, len(dataset)))):
        return row
    raise ValueError("the SFT dataset is empty")


def resolve_format(dataset: Dataset | IterableDataset, data_format: str = "auto") -> str:
    """``data_format`` itself, or the layout detected from the first row when it is ``auto``."""
    if data_format != "auto":
        if data_format not in FORMATS:
            raise ValueError(f"unknown dataset_format {data_format!r}; expected 'auto' or one of {FORMATS}")
        return data_format
    return detect_format(_first_row(dataset))


def number_rows(dataset: Dataset | IterableDataset) -> Dataset | IterableDataset:
    """Each row's number in the source, kept in a column, for error messages: a shuffled stream's own indices are
    positions in the shuffled order (call before shuffling)."""
    return dataset.map(lambda _, index: {SOURCE_ROW: index}, with_indices=True)


def _encode_batch(batch: dict, indices: list[int], encoder: SFTEncoder, data_format: str, image_root: str | None,
                  sample_dir: str | None, skip_bad_samples: bool) -> dict:
    out = {name: [] for name in ENCODED_FEATURES}
    columns = [name for name in batch if name != SOURCE_ROW]
    if SOURCE_ROW in batch:
        indices = batch[SOURCE_ROW]
    for row_number, index in enumerate(indices):
        row = {name: batch[name][row_number] for name in columns}
        try:
            sample = to_sft_sample(row, data_format, image_root=image_root, index=index, sample_dir=sample_dir)
            encoded = encoder.encode(sample)
        except BadSampleError as error:
            if not skip_bad_samples:
                raise
            out["sample_id"].append(error.sample_id)
            out["input_ids"].append([])
            out["labels"].append([])
            out["images"].append([])
            out["length"].append(0)
            out["skip_reason"].append(error.as_reason())
            out["dropped_content"].append([])
            continue
        out["sample_id"].append(encoded.sample_id)
        out["input_ids"].append(encoded.input_ids)
        out["labels"].append(encoded.labels)
        out["images"].append(encoded.images)
        out["length"].append(encoder.expanded_length(len(encoded.input_ids), encoded.num_images))
        out["skip_reason"].append(None)
        out["dropped_content"].append([note.as_reason() for note in encoded.dropped])
    return out


class _KeepAndCount:
    """Streaming filter: drops rows with a ``skip_reason`` and records them in a :class:`SkipLog`, as well as the
    content kept rows lost (the first of each kind logged with its reason, the rest counted)."""

    def __init__(self, skip_log: SkipLog):
        self.skip_log = skip_log

    def __call__(self, reason: str | None, dropped: list[str] | None) -> bool:
        if reason is None:
            for note in dropped or []:
                self.skip_log.add_dropped(DroppedContent.from_reason(note), stage="encode")
            return True
        self.skip_log.add(BadSampleError.from_reason(reason), stage="encode")
        return False


def encode_sft_dataset(
    dataset: Dataset | IterableDataset,
    encoder: SFTEncoder,
    data_format: str = "auto",
    image_root: str | None = None,
    sample_dir: str | None = None,
    skip_bad_samples: bool = False,
    skip_log: SkipLog | None = None,
    num_proc: int | None = None,
) -> Dataset | IterableDataset:
    """Encode raw rows into ``sample_id, input_ids, labels, images, length`` (compact ids, see ``encoding``).

    Without ``skip_bad_samples`` the first bad sample raises :class:`BadSampleError` naming it; with it, bad samples
    are dropped and counted in ``skip_log`` (map-style: all counted here; streaming: counted as the stream is read).
    Kept samples that lost content their chat format cannot show (system turns in ``compat``) are counted in
    ``skip_log.dropped`` the same way and logged once with the reason (map-style: one line per dataset; streaming:
    the first one met, the total in ``skip_log.summary()``).
    """
    data_format = resolve_format(dataset, data_format)
    if data_format == "mammoth_split" and sample_dir is None:
        raise ValueError("dataset_format 'mammoth_split' needs --sample_dir (the folder of per-sample JSON files)")
    skip_log = skip_log if skip_log is not None else SkipLog()
    fn_kwargs = dict(encoder=encoder, data_format=data_format, image_root=image_root, sample_dir=sample_dir,
                     skip_bad_samples=skip_bad_samples)
    columns = dataset.column_names or list(_first_row(dataset))
    if isinstance(dataset, IterableDataset):
        encoded = dataset.map(_encode_batch, with_indices=True, batched=True, remove_columns=columns,
                              features=ENCODED_FEATURES, fn_kwargs=fn_kwargs)
        encoded = encoded.filter(_KeepAndCount(skip_log), input_columns=["skip_reason", "dropped_content"])
        return encoded.remove_columns(["skip_reason", "dropped_content"])
    encoded = dataset.map(_encode_batch, with_indices=True, batched=True, remove_columns=columns,
                          features=ENCODED_FEATURES, fn_kwargs=fn_kwargs, num_proc=num_proc,
                          desc=f"Encoding SFT samples ({data_format}, {encoder.chat_format})")
    errors = [BadSampleError.from_reason(reason) for reason in encoded["skip_reason"] if reason is not None]
    for error in errors:
        skip_log.add(error, stage="encode")
    if errors:
        encoded = encoded.filter(lambda reason: reason is None, input_columns="skip_reason", num_proc=num_proc,
                                 desc="Dropping bad samples")
        # this dataset's skips only: the run's log also holds the other split's (train and eval share it)
        logger.warning("%s of %d", SkipLog.describe(Counter(error.kind for error in errors)), len(dataset))
    _count_dropped(encoded, skip_log, len(dataset))
    return encoded.remove_columns(["skip_reason", "dropped_content"])


def _count_dropped(encoded: Dataset, skip_log: SkipLog, of: int) -> None:
    """Count the content kept rows lost into ``skip_log`` and log one line for this dataset (read from the column,
    so a cached encoding or ``num_proc`` workers are counted too)."""
    column = encoded.with_format("arrow")["dropped_content"]  # in Arrow: no Python object per row of a 10M corpus
    reasons = pc.list_flatten(column)
    if len(reasons) == 0:
        return
    kinds = pc.list_element(pc.split_pattern(reasons, pattern="|", max_splits=1), 0)
    counts = Counter({entry["values"]: entry["counts"] for entry in pc.value_counts(kinds).to_pylist()})
    firsts = sorted({pc.index(kinds, kind).as_py() for kind in counts} | set(range(min(len(reasons), 20))))
    examples = [DroppedContent.from_reason(reasons[i].as_py()) for i in firsts]
    skip_log.add_dropped_counts(counts, examples, stage="encode")
    logger.warning("%s", SkipLog.describe_dropped(counts, {note.kind: note.detail for note in examples}, of=of))
