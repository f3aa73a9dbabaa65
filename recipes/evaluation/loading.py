"""Load a benchmark split with `datasets`: from the Hub, or from a local copy under ``--data-dir``.

A local copy of benchmark ``<name>`` lives in ``<data-dir>/<name>`` (``textvqa_ocr`` reads ``textvqa``) and is any of:

- a snapshot of the Hub dataset repository (``hf download <hub id> --repo-type dataset --local-dir <data-dir>/<name>``);
- a folder of parquet / json(l) / arrow files that ``load_dataset(folder)`` reads;
- a ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` folder (what ``recipes/eval.py --download-to`` writes).
"""

from __future__ import annotations

from pathlib import Path

import datasets


def _pick_split(loaded, split: str, where: str):
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split in loaded:
        return loaded[split]
    if len(loaded) == 1:  # e.g. a folder of files whose names do not carry the split name
        return next(iter(loaded.values()))
    raise ValueError(f"{where} has splits {sorted(loaded)} but not {split!r}")


def load_split(benchmark, data_dir: str | Path | None = None) -> datasets.Dataset:
    """The benchmark's evaluation split. With ``data_dir`` only the local copy is read (nothing is downloaded)."""
    if data_dir is not None:
        local = Path(data_dir) / (benchmark.data_name or benchmark.name)
        if not local.exists():
            how = ""
            if benchmark.hub_id:
                how = f"`hf download {benchmark.hub_id} --repo-type dataset --local-dir {local}` or "
            raise FileNotFoundError(
                f"no local copy of {benchmark.name} at {local}; create it with {how}Dataset.save_to_disk"
            )
        if (local / "state.json").exists() or (local / "dataset_dict.json").exists():
            return _pick_split(datasets.load_from_disk(str(local)), benchmark.split, str(local))
        return _pick_split(datasets.load_dataset(str(local), benchmark.hub_config), benchmark.split, str(local))
    if benchmark.hub_id is None:
        raise ValueError(f"{benchmark.name} has no Hub dataset; pass --data-dir")
    return datasets.load_dataset(benchmark.hub_id, benchmark.hub_config, split=benchmark.split)


def save_local_copy(benchmark, data_dir: str | Path) -> Path | None:
    """Fetch the benchmark's evaluation split from the Hub and save it as ``<data_dir>/<name>`` (``save_to_disk``),
    so later runs can use ``--data-dir`` offline. Benchmarks without a Hub dataset are skipped (returns None)."""
    if benchmark.hub_id is None:
        return None
    target = Path(data_dir) / (benchmark.data_name or benchmark.name)
    if target.exists():
        return target
    split = datasets.load_dataset(benchmark.hub_id, benchmark.hub_config, split=benchmark.split)
    split.save_to_disk(str(target))
    return target


def select_rows(dataset: datasets.Dataset, benchmark, limit: int | None) -> datasets.Dataset:
    """Apply the benchmark's row filter (read without decoding images), then keep the first ``limit`` rows."""
    if benchmark.row_filter is not None:
        column, keep = benchmark.row_filter
        if column in dataset.column_names:
            dataset = dataset.filter(keep, input_columns=[column], desc=f"{benchmark.name}: selecting rows")
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    return dataset
