"""A dataset repository: the card's ``configs:`` and recorded example counts checked against the files, and the
shards, their metadata parquets, the card and the data stages' statistics assembled in the staging folder."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import yaml

from dataset_builders.accounting import ACCOUNTING_FILE, PACKING_STATS_FILE
from dataset_builders.cards import config_split_patterns

from .card_edits import with_repo_loads
from .errors import ReleaseError
from .staging import check_no_local_paths, copy_files, included_files, prepare_staging

# Statistics beside a released data folder, by the names the data stages write them: each stage's read = kept +
# dropped (dataset_builders/pipelines.py: <output>/.datatrove/<stage>/accounting.json) and the pack stage's
# <config>/packing_stats.json. Datatrove's own stats.json files there are timings and logs, not released.
DATASET_STATS_FILES = (f".datatrove/*/{ACCOUNTING_FILE}", PACKING_STATS_FILE)


def _card_meta(card_path: Path) -> dict:
    text = card_path.read_text(encoding="utf-8")
    match = re.match(r"^---\n(.*?)\n---", text, re.S)
    if not match:
        raise ReleaseError(f"{card_path} has no YAML front matter; a dataset card needs a `configs:` block")
    meta = yaml.safe_load(match.group(1)) or {}
    if not meta.get("configs"):
        raise ReleaseError(f"{card_path} front matter has no `configs:`; load_dataset(repo, name) needs it")
    return meta


def card_configs(card_path: Path) -> list[dict]:
    return _card_meta(card_path)["configs"]


def _recorded_counts(meta: dict) -> dict[tuple[str, str], int]:
    """(config, split) -> num_examples recorded in the card's ``dataset_info``."""
    infos = meta.get("dataset_info") or []
    counts = {}
    for info in [infos] if isinstance(infos, dict) else infos:
        for split in info.get("splits") or []:
            if split.get("num_examples") is not None:
                counts[(info.get("config_name", "default"), split["name"])] = int(split["num_examples"])
    return counts


def _cheap_count(folder: Path, patterns: list[str]) -> int | None:
    """Examples in the files of ``patterns`` without reading them: parquet footers, and for webdataset shards the
    metadata parquets as the card writer counts them (dataset_builders.cards._count); None when unknown."""
    import pyarrow.parquet as pq
    from datatrove.io import get_datafolder

    from dataset_builders.cards import _count
    from dataset_builders.shards import SHARD_GLOB

    total = 0
    for pattern in patterns:
        parent, _, name = pattern.rpartition("/")
        if name == SHARD_GLOB and parent:
            samples = _count(get_datafolder(str(folder)), parent)[1]
        elif pattern.endswith(".parquet"):
            samples = sum(pq.ParquetFile(p).metadata.num_rows for p in sorted(folder.glob(pattern)) if p.is_file())
        else:
            samples = None
        if samples is None:
            return None
        total += samples
    return total


def check_dataset_counts(folder: Path, staging: Path) -> None:
    """Refuse when the card's ``dataset_info`` records a number of examples the files do not hold: datasets would
    raise NonMatchingSplitsSizesError on every load of the released repository."""
    meta = _card_meta(staging / "README.md")
    recorded = _recorded_counts(meta)
    for config in meta["configs"]:
        name = config.get("config_name", "default")
        by_split: dict[str, list[str]] = {}
        for split, pattern in config_split_patterns(config):
            by_split.setdefault(split, []).append(pattern)
        for split, patterns in by_split.items():
            if (name, split) not in recorded:
                continue
            expected, found = recorded[(name, split)], _cheap_count(folder, patterns)
            if found is None:  # not countable from metadata: let datasets build the split and verify it
                from datasets import load_dataset

                with tempfile.TemporaryDirectory() as cache:
                    try:
                        found = len(load_dataset(str(staging), name, split=split, cache_dir=cache))
                    except Exception as err:  # noqa: BLE001 - any failure means the release would not load
                        last = (str(err).strip().splitlines() or [""])[-1]
                        raise ReleaseError(f"config {name!r} split {split!r} does not load: "
                                           f"{type(err).__name__}: {last}") from err
            if found != expected:
                raise ReleaseError(f"config {name!r} split {split!r}: the card records {expected} examples but the "
                                   f"files hold {found}; regenerate the card or restore the missing files")


def _shard_metadata(files: set[Path]) -> set[Path]:
    """The img2dataset metadata parquet beside each shard (``00000.tar`` -> ``00000.parquet``): the card promises
    it, and it holds each shard's sample count and per-sample metadata."""
    return {path.with_suffix(".parquet") for path in files
            if path.suffix == ".tar" and path.with_suffix(".parquet").is_file()}


def _statistics(files: set[Path]) -> set[Path]:
    """The data stages' statistics (``DATASET_STATS_FILES``) of the folders that hold released data files."""
    return {path for parent in {p.parent for p in files} for pattern in DATASET_STATS_FILES
            for path in parent.glob(pattern) if path.is_file()}


def _config_files(folder: Path, config: dict) -> set[Path]:
    """The files a card config's ``data_files`` name; refuses a config that names none (a ``data_dir``-only config
    would be released without its data), a pattern leading out of the folder and one that matches no file."""
    name, patterns = config.get("config_name"), [pattern for _, pattern in config_split_patterns(config)]
    if not patterns:
        raise ReleaseError(f"config {name!r} has no data_files: the release stages the files the card's configs "
                           "name, so this config would be published without data; list its files in data_files")
    files: set[Path] = set()
    for pattern in patterns:
        if Path(pattern).is_absolute() or ".." in Path(pattern).parts:
            raise ReleaseError(f"config {name!r}: pattern {pattern!r} is not a path inside {folder}; the released "
                               "repository holds only the folder's files")
        matched = [p for p in folder.glob(pattern) if p.is_file()]
        if not matched:
            raise ReleaseError(f"config {name!r}: pattern {pattern!r} matches no file in {folder}")
        files.update(matched)
    return files


def build_dataset_repo(folder: Path, staging: Path, include: list[str] | None = None,
                       revision: str | None = None, repo_id: str | None = None) -> Path:
    """Assemble a dataset repository (shards with their metadata parquets, card, statistics, and the files
    ``include`` names as upload_folder's allow_patterns) in ``staging``; every config must match files, the card's
    example counts must match them and no staged file may hold a local path. The staged card's ``load_dataset``
    snippets load ``repo_id`` where they named this folder, at ``revision`` (``card_edits.with_repo_loads``); the
    folder's own card is left as it is."""
    card = folder / "README.md"
    if not card.is_file():
        raise ReleaseError(f"{folder} has no README.md dataset card")
    files: set[Path] = set()
    for config in card_configs(card):
        files |= _config_files(folder, config)
    files |= _shard_metadata(files) | _statistics(files)
    files |= {folder / name for name in included_files(folder, include or [])}
    prepare_staging(folder, staging)
    copy_files(folder, staging, [path.relative_to(folder).as_posix() for path in sorted(files | {card})])
    staged_card = staging / "README.md"
    staged_card.write_text(with_repo_loads(staged_card.read_text(encoding="utf-8"), revision, repo_id, folder),
                           encoding="utf-8")
    check_no_local_paths(staging, folder)
    check_dataset_counts(folder, staging)
    return staging
