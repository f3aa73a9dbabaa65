"""Writes scores as one parquet per input shard, keyed by uid (``00000.tar`` -> ``00000.parquet``)."""

from __future__ import annotations

import json

import pyarrow as pa
from datatrove.data import DocumentsPipeline
from datatrove.io import DataFolderLike, get_datafolder

from ..shards import list_shards, shard_stem, write_parquet_atomic
from .base import CountingStep
from .scoring import SCORES_KEY


class ScoreWriter(CountingStep):
    """Collects ``doc.metadata["scores"]`` per input shard and writes ``<stem>.parquet`` atomically.

    Columns: ``uid``, ``key`` and the scorer's ``columns`` (name -> arrow type alias, e.g. "float32"). Every shard of
    the task gets a file, empty if none of its samples survived, so a later selection can tell "scored, nothing
    usable" from "not scored yet". ``info`` is stored in the parquet schema metadata (model, prompt version...).
    """

    name = "score parquet"
    type = "💽 - WRITER"

    def __init__(self, input_folder: DataFolderLike, output_folder: DataFolderLike, columns: dict[str, str],
                 info: dict | None = None):
        super().__init__()
        self.input_folder = input_folder
        self.output_folder = get_datafolder(output_folder)
        self.columns = dict(columns)
        self.info = info or {}

    def _schema(self) -> pa.Schema:
        fields = [("uid", pa.string()), ("key", pa.string())]
        fields += [(name, pa.type_for_alias(alias)) for name, alias in self.columns.items()]
        return pa.schema(fields, metadata={"open_qwen2vl_scores": json.dumps(self.info)})

    def _write(self, shard: str, rows: list[dict]) -> None:
        table = pa.Table.from_pylist(rows, schema=self._schema())
        write_parquet_atomic(self.output_folder, shard_stem(shard) + ".parquet", table)
        self.count_kept(len(rows))

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        task_shards = list_shards(self.input_folder)[rank::world_size]
        written: set[str] = set()
        current, rows = None, []
        for doc in data or []:
            shard = doc.metadata["shard"]
            if shard != current:
                if current is not None:
                    self._write(current, rows)
                    written.add(current)
                current, rows = shard, []
            scores = doc.metadata.get(SCORES_KEY, {})
            rows.append({"uid": doc.id, "key": doc.metadata["key"], **{c: scores.get(c) for c in self.columns}})
            yield doc
        if current is not None:
            self._write(current, rows)
            written.add(current)
        for shard in task_shards:
            if shard not in written:
                self._write(shard, [])
