"""Datatrove steps of the ``select`` stage: per-shard decisions, then a single-task finalizer (uid de-dup, manifest)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
from datatrove.data import DocumentsPipeline
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.utils.logging import logger
from tqdm import tqdm

from ..accounting import Accounting
from ..selection import (
    EVENTS_METADATA,
    MANIFEST,
    SELECTION_SCHEMA,
    SelectionRules,
    evaluate_shard,
    later_duplicates,
    load_shard_metadata,
    mark_duplicates,
)
from ..shards import atomic_write, list_shards, read_parquet, shard_stem, write_parquet_atomic
from ..uids import UidList, uids_to_array
from .base import CountingStep


class ShardSelector(CountingStep):
    """For each of its input shards, writes ``<stem>.parquet`` with every read sample: key, uid, keep, reason.

    Counts ``read``, ``kept`` (selected before uid de-duplication) and ``dropped/<reason>`` (structural drops from
    the tar or parquet, text/image rules, ``rule``, ``missing_score``).
    """

    name = "select"
    type = "🔻 - SELECT"

    def __init__(self, input_folder: DataFolderLike, output_folder: DataFolderLike, rules: SelectionRules,
                 metadata_source: str = "auto", missing_uid: str = "derive"):
        super().__init__()
        self.input_folder = input_folder
        self.output_folder = output_folder
        self.rules = rules
        self.metadata_source = metadata_source
        self.missing_uid = missing_uid

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        uid_lists = {name: UidList(path) for name, path in self.rules.uid_lists.items()}
        shards = list_shards(self.input_folder)[rank::world_size]
        if shards:  # decisions are about to change: the selection is not final until the finalizer reruns
            try:
                get_datafolder(self.output_folder).rm(MANIFEST)
            except FileNotFoundError:
                pass
        for shard in tqdm(shards, desc=f"select (task {rank})", unit="shard", disable=len(shards) < 2):
            with self.track_time("shard"):
                self._select_shard(shard, uid_lists)

    def _select_shard(self, shard: str, uid_lists: dict[str, UidList]) -> None:
        meta = load_shard_metadata(self.input_folder, shard, source=self.metadata_source,
                                   missing_uid=self.missing_uid, need_size=self.rules.image.active)
        events: Counter = Counter()
        for problem in meta.problems:
            events["corrupt_shards"] += 1
            logger.error(f"shard {shard} is truncated or corrupt, samples after the damage are lost: {problem}")
        if meta.parquet_error:
            events["metadata_parquet_unreadable"] += 1
            logger.warning(f"{meta.parquet_error}; read the metadata of {shard} from the tar instead")
        for name, value in events.items():
            self.count_event(name, value)
        self.count_read(len(meta) + len(meta.drops))
        rows = {"key": [], "uid": [], "keep": [], "reason": []}
        for key, reason, detail in meta.drops:
            self.drop(reason, f"{shard}:{key}", detail)
            for column, value in zip(rows, (key, "", False, reason)):
                rows[column].append(value)
        keep, reasons = evaluate_shard(meta, self.rules, shard, self.input_folder, uid_lists)
        for key, uid, kept, reason in zip(meta.key, meta.uid, keep.tolist(), reasons):
            if reason:
                self.drop(reason, f"{shard}:{key}")
            for column, value in zip(rows, (key, uid, kept, reason)):
                rows[column].append(value)
        self.count_kept(int(keep.sum()))
        # the shard's events go into its decision file too, so the selection's own accounting reports them
        schema = SELECTION_SCHEMA.with_metadata({EVENTS_METADATA: json.dumps(events)}) if events else SELECTION_SCHEMA
        write_parquet_atomic(self.output_folder, shard_stem(shard) + ".parquet",
                             pa.Table.from_pydict(rows, schema=schema))


def selection_accounting(selection_folder: DataFolderLike, shards: list[str]) -> Accounting:
    """Read/kept/dropped-by-reason and shard events of a finished selection, from its decision files (the
    authoritative count)."""
    folder = get_datafolder(selection_folder)
    reasons: Counter = Counter()
    events: Counter = Counter()
    read = kept = 0
    for shard in shards:
        with folder.open(shard_stem(shard) + ".parquet", "rb") as handle:
            table = read_parquet(handle, ["keep", "reason"])
        keep = np.asarray(table.column("keep").to_pylist(), dtype=bool)
        read += len(keep)
        kept += int(keep.sum())
        reasons.update(r for r, k in zip(table.column("reason").to_pylist(), keep) if not k)
        events.update(json.loads((table.schema.metadata or {}).get(EVENTS_METADATA.encode(), b"{}")))
    return Accounting(read=read, kept=kept, dropped=dict(reasons), events=dict(events), tasks=len(shards))


class SelectionFinalizer(CountingStep):
    """One task over the whole selection: global uid de-duplication (first kept occurrence wins, in shard order;
    later ones become ``duplicate_uid``; idempotent) and ``_manifest.json`` with the rule and the accounting."""

    name = "finalize selection"
    type = "🔻 - SELECT"

    def __init__(self, input_folder: DataFolderLike, output_folder: DataFolderLike, dedup_uid: bool = True,
                 info: dict | None = None):
        super().__init__()
        self.input_folder = input_folder
        self.output_folder = output_folder
        self.dedup_uid = dedup_uid
        self.info = info or {}

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        if world_size != 1:
            raise ValueError("SelectionFinalizer must run as a single task (it de-duplicates across all shards)")
        folder = get_datafolder(self.output_folder)
        shards = list_shards(self.input_folder)
        missing = [s for s in shards if not folder.exists(shard_stem(s) + ".parquet")]
        if missing:
            raise FileNotFoundError(f"selection {folder.path} is incomplete: no decisions for {missing[:5]} "
                                    f"({len(missing)} shard(s)); rerun the select stage")
        if self.dedup_uid:
            uids, keeps = [], []
            for shard in tqdm(shards, desc="uid de-duplication", unit="shard", disable=len(shards) < 2):
                with folder.open(shard_stem(shard) + ".parquet", "rb") as handle:
                    table = read_parquet(handle, ["uid", "keep"])
                uids.append(uids_to_array(table.column("uid").to_pylist())[0])  # 16 bytes a row, not a str
                keeps.append(np.asarray(table.column("keep").to_pylist(), dtype=bool))
            for shard, duplicate in zip(shards, later_duplicates(uids, keeps)):
                if duplicate.any():
                    name = shard_stem(shard) + ".parquet"
                    with folder.open(name, "rb") as handle:
                        table = read_parquet(handle)
                    write_parquet_atomic(folder, name, mark_duplicates(table, duplicate))
        accounting = selection_accounting(folder, shards)
        # The select tasks counted these samples as kept; `stats` folds this task's stats into theirs. All of them,
        # not just the ones marked now: a rerun finds the earlier ones already marked.
        self.reclassify("duplicate_uid", accounting.dropped.get("duplicate_uid", 0))
        with atomic_write(folder, MANIFEST, "wt") as handle:
            json.dump({**self.info, "dedup_uid": self.dedup_uid, "shards": len(shards),
                       "accounting": accounting.to_dict()}, handle, indent=2)
        logger.info(f"selection {folder.path}: {accounting.summary()}")
