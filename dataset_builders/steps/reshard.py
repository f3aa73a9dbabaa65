"""The ``reshard`` stage: copy the selected samples into new shards of N samples, in a deterministic order.

The plan is global and computed once from the selection files (no image is read for it): selected samples are
numbered in input-shard order, and output shard ``j`` holds numbers ``[j*N, (j+1)*N)``. Tasks own output shards
(``rank::world_size``), so the result does not depend on the number of tasks or workers, every output shard but the
last has exactly N samples (minus any that fail the image checks, counted), and a rerun rewrites a shard byte for
byte.
"""

from __future__ import annotations

import io

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datatrove.data import DocumentsPipeline
from datatrove.io import DataFolderLike
from datatrove.utils.logging import logger
from tqdm import tqdm

from ..images import DEFAULT_MAX_PIXELS, BadImage, inspect_image, normalize_for_corpus
from ..selection import read_selection, require_finalized
from ..shards import Dropped, ShardProblem, ShardWriter, iter_samples, list_shards, parquet_on_this_thread
from .base import CountingStep

PLAN_SCHEMA = pa.schema([("out_shard", pa.int64()), ("src_shard", pa.string()), ("key", pa.string()),
                         ("uid", pa.string())])


def plan_reshard(input_folder: DataFolderLike, selection_folder: DataFolderLike, shard_size: int = 10_000) -> pa.Table:
    """One row per selected sample: the output shard it goes to, its input shard, key and uid."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    shards = list_shards(input_folder)
    require_finalized(selection_folder, len(shards))  # else duplicate uids would reach the corpus
    parts = []
    for shard in shards:
        table = read_selection(selection_folder, shard)
        table = table.filter(pc.equal(table.column("keep"), True))
        # Typed: a shard with nothing kept would give a null-typed column that concat_tables refuses.
        parts.append(pa.table({"src_shard": pa.array([shard] * table.num_rows, pa.string()),
                               "key": table.column("key").cast(pa.string()),
                               "uid": table.column("uid").cast(pa.string())}))
    plan = pa.concat_tables(parts) if parts else pa.table({"src_shard": [], "key": [], "uid": []})
    out_shard = pa.array(np.arange(plan.num_rows, dtype=np.int64) // shard_size)
    return pa.table({"out_shard": out_shard, "src_shard": plan.column("src_shard").cast(pa.string()),
                     "key": plan.column("key").cast(pa.string()), "uid": plan.column("uid").cast(pa.string())},
                    schema=PLAN_SCHEMA)


def write_plan(plan: pa.Table, shard_size: int) -> bytes:
    """The plan as parquet bytes with one row group per output shard."""
    buffer = io.BytesIO()
    pq.write_table(plan, buffer, row_group_size=shard_size)
    return buffer.getvalue()


def output_stem(index: int, num_shards: int) -> str:
    return f"{index:0{max(5, len(str(max(num_shards - 1, 0))))}d}"


class ReshardWriter(CountingStep):
    """Writes the output shards of a reshard plan (``plan_path``, a parquet from ``plan_reshard``).

    Each sample is re-checked on the way: the tar must still hold it (``missing_from_shard``), its image must pass
    ``inspect_image`` (``image_*`` reasons; ``verify_images="full"``, the default, decodes every image, which is what
    guarantees the corpus loads; "quick" checks headers and truncation only and lets corrupt scan data through) and
    is normalised for a ``.jpg`` field (RGB/L JPEGs copied byte for byte, anything else converted to RGB JPEG:
    ``event/reencoded``).
    Output keys are ``<shard><index>`` as img2dataset writes them; the json keeps the source shard and key.
    """

    name = "reshard"
    type = "💽 - WRITER"

    def __init__(self, input_folder: DataFolderLike, output_folder: DataFolderLike, plan_path: str,
                 verify_images: str = "full", max_pixels: int = DEFAULT_MAX_PIXELS, missing_uid: str = "derive"):
        super().__init__()
        if verify_images not in ("quick", "full"):
            raise ValueError(f"verify_images must be 'quick' or 'full', got {verify_images!r}")
        self.input_folder = input_folder
        self.output_folder = output_folder
        self.plan_path = plan_path
        self.verify_images = verify_images
        self.max_pixels = max_pixels
        self.missing_uid = missing_uid

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        # one row group per output shard: a task reads the footer and its own row groups, on this thread
        with fsspec.open(self.plan_path, "rb") as handle, parquet_on_this_thread(handle) as plan:
            num_shards = plan.metadata.num_row_groups if plan.metadata.num_rows else 0
            mine = range(rank, num_shards, world_size)
            for index in tqdm(mine, desc=f"reshard (task {rank})", unit="shard", disable=len(mine) < 2):
                rows = plan.read_row_group(index, use_threads=False)
                if set(rows.column("out_shard").to_pylist()) != {index}:
                    raise ValueError(f"{self.plan_path}: row group {index} is not output shard {index}")
                with self.track_time("shard"):
                    self._write_shard(index, num_shards, rows)

    def _write_shard(self, index: int, num_shards: int, rows: pa.Table) -> None:
        stem = output_stem(index, num_shards)
        self.count_read(rows.num_rows)
        groups: dict[str, dict[str, str]] = {}
        for src, key, uid in zip(*(rows.column(c).to_pylist() for c in ("src_shard", "key", "uid"))):
            needed = groups.setdefault(src, {})
            if key in needed:  # a tar gives one sample per key: a repeat in the plan is counted, never collapsed
                self.drop("duplicate_key", f"{src}:{key}", f"planned twice (uid {uid}); the shard holds one sample "
                                                           "per key")
                continue
            needed[key] = uid
        width = len(str(max(rows.num_rows - 1, 0)))
        writer = ShardWriter(self.output_folder, stem)
        try:
            for src, needed in groups.items():
                self._copy(src, needed, writer, stem, width)
        except BaseException:
            writer.abort()
            raise
        if len(writer) == 0:
            writer.abort()
            self.count_event("empty_output_shards")
            logger.warning(f"output shard {stem}: every planned sample was dropped, shard not written")
            return
        writer.commit()
        self.count_kept(len(writer))

    def _copy(self, src: str, needed: dict[str, str], writer: ShardWriter, stem: str, width: int) -> None:
        for item in iter_samples(self.input_folder, src, missing_uid=self.missing_uid):
            if not needed:
                break
            if isinstance(item, ShardProblem):
                self.count_event("corrupt_shards")
                logger.error(f"shard {src} is truncated or corrupt: {item.detail}")
                continue
            if item.key not in needed:
                continue
            needed.pop(item.key)
            if isinstance(item, Dropped):
                self.drop(item.reason, f"{src}:{item.key}", item.detail)
                continue
            try:
                info = inspect_image(item.image, max_pixels=self.max_pixels,
                                     full_decode=self.verify_images == "full")
                image, reencoded = normalize_for_corpus(item.image, info, max_pixels=self.max_pixels)
            except BadImage as error:
                self.drop(error.reason, f"{src}:{item.key}", error.detail)
                continue
            if reencoded:
                self.count_event("reencoded")
            meta = {"uid": item.uid, "url": item.url, "width": info.width, "height": info.height,
                    "source_shard": src, "source_key": item.key}
            writer.write(f"{stem}{len(writer):0{width}d}", image, item.caption, meta)
        for key in needed:
            self.drop("missing_from_shard", f"{src}:{key}", "selected but not found in the tar")
