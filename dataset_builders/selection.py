"""The ``select`` stage's logic: per-shard decisions (keep + first failing reason) from metadata, scores and rules.

A selection folder holds one parquet per input shard (``00000.parquet``: ``key``, ``uid``, ``keep``, ``reason``), so
re-thresholding never re-reads images and ``reshard`` knows exactly which samples to copy. ``_manifest.json``
records the rule and the accounting.

Metadata comes from the img2dataset parquet beside each shard when there is one (DataComp's approach: selecting
128M samples touches no image bytes), else from a scan of the tar (json, caption and the image header).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datatrove.io import DataFolderLike, get_datafolder

from .images import BadImage, open_image
from .rules import Expression, ImageRules, RuleError, TextRules, resolve_top_threshold, top_key
from .shards import (
    Dropped,
    ShardProblem,
    UnreadableParquet,
    iter_samples,
    list_shards,
    open_parquet,
    read_parquet,
    read_sidecar_parquet,
    shard_stem,
)
from .uids import UidList, derive_uid, is_uid, uids_to_array

SELECTION_SCHEMA = pa.schema(
    [("key", pa.string()), ("uid", pa.string()), ("keep", pa.bool_()), ("reason", pa.string())]
)
MANIFEST = "_manifest.json"
# Schema metadata of a decision file: json of the shard's events (a corrupt tar, an unreadable metadata parquet).
EVENTS_METADATA = "open_qwen2vl_events"


@dataclass
class ShardMetadata:
    """Rows of one shard that can be judged, plus the rows lost before judging (``drops``: key, reason, detail)."""

    key: list[str] = field(default_factory=list)
    uid: list[str] = field(default_factory=list)
    caption: list[str] = field(default_factory=list)
    width: list[float] = field(default_factory=list)
    height: list[float] = field(default_factory=list)
    drops: list[tuple[str, str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    source: str = "tar"
    parquet_error: str = ""  # why an existing metadata parquet was not read ("auto" scanned the tar instead)

    def __len__(self) -> int:
        return len(self.key)


def _metadata_from_tar(folder: DataFolderLike, shard: str, missing_uid: str) -> ShardMetadata:
    meta = ShardMetadata(source="tar")
    for item in iter_samples(folder, shard, missing_uid=missing_uid):
        if isinstance(item, ShardProblem):
            meta.problems.append(item.detail)
        elif isinstance(item, Dropped):
            meta.drops.append((item.key or "", item.reason, item.detail))
        else:
            try:
                image = open_image(item.image)
            except BadImage as error:
                meta.drops.append((item.key, error.reason, error.detail))
                continue
            meta.key.append(item.key)
            meta.uid.append(item.uid)
            meta.caption.append(item.caption)
            meta.width.append(float(image.width))
            meta.height.append(float(image.height))
    return meta


def _column(table: pa.Table, *names: str):
    for name in names:
        if name in table.column_names:
            return table.column(name).to_pylist()
    return None


def _downloaded(table: pa.Table) -> pa.Table:
    """The rows with a tar member: img2dataset also lists failed downloads."""
    if "status" in table.column_names:
        table = table.filter(pc.equal(table.column("status"), "success"))
    return table


def _metadata_from_parquet(table: pa.Table, missing_uid: str) -> ShardMetadata:
    table = _downloaded(table)
    meta = ShardMetadata(source="parquet")
    keys = _column(table, "key")
    captions = _column(table, "caption") or [None] * table.num_rows
    uids = _column(table, "uid") or [None] * table.num_rows
    urls = _column(table, "url") or [None] * table.num_rows
    widths = _column(table, "width", "original_width") or [None] * table.num_rows
    heights = _column(table, "height", "original_height") or [None] * table.num_rows
    seen: set[str] = set()
    for key, caption, uid, url, width, height in zip(keys, captions, uids, urls, widths, heights):
        # as the tar reader: a key's first row is the sample, later ones are drops (one tar member per key is read)
        if key in seen:
            meta.drops.append((key, "duplicate_key", "key seen earlier in the shard's parquet"))
            continue
        seen.add(key)
        if not isinstance(caption, str):
            meta.drops.append((key, "missing_caption", ""))
            continue
        if not is_uid(uid):
            if missing_uid == "drop" or not url:
                meta.drops.append((key, "missing_uid", f"uid={uid!r}"))
                continue
            uid = derive_uid(url, caption)
        meta.key.append(key)
        meta.uid.append(uid.lower())
        meta.caption.append(caption)
        meta.width.append(float(width) if width is not None else np.nan)
        meta.height.append(float(height) if height is not None else np.nan)
    return meta


def _rows_without_uid_or_url(table: pa.Table) -> bool:
    table = _downloaded(table)
    uids = _column(table, "uid") or [None] * table.num_rows
    urls = _column(table, "url") or [None] * table.num_rows
    return any(not is_uid(uid) and not url for uid, url in zip(uids, urls))


def load_shard_metadata(folder: DataFolderLike, shard: str, *, source: str = "auto", missing_uid: str = "derive",
                        need_size: bool = False) -> ShardMetadata:
    """Metadata of one shard from its img2dataset parquet (``source="parquet"``), a tar scan ("tar") or either
    ("auto": the parquet when present and readable, carrying image sizes if image rules need them, and giving every
    row a uid or a url to derive one from; an unreadable one is reported in ``parquet_error``). With
    ``source="parquet"`` a row with neither is a ``missing_uid`` drop, and an unreadable parquet raises
    ``UnreadableParquet``."""
    if source not in ("auto", "parquet", "tar"):
        raise ValueError(f"metadata source must be auto, parquet or tar, got {source!r}")
    parquet_error = ""
    if source != "tar":
        try:
            table = read_sidecar_parquet(folder, shard)
        except UnreadableParquet as error:
            if source == "parquet":
                raise UnreadableParquet(f"{error}; select with --metadata auto or tar to read the tar instead") \
                    from error
            table, parquet_error = None, str(error)
        if table is None and source == "parquet":
            raise FileNotFoundError(f"no metadata parquet {shard_stem(shard)}.parquet beside {shard}")
        has_keys = table is not None and "key" in table.column_names
        has_size = table is not None and any(c in table.column_names for c in ("width", "original_width"))
        # The tar scan derives the uid of a sample with neither uid nor url from its image bytes, which the parquet
        # does not hold: "auto" reads such a shard from the tar, so both sources decide alike.
        image_uids = table is not None and source == "auto" and missing_uid == "derive" and _rows_without_uid_or_url(
            table)
        if has_keys and (has_size or not need_size) and not image_uids:
            return _metadata_from_parquet(table, missing_uid)
        if source == "parquet":
            raise ValueError(f"{shard_stem(shard)}.parquet lacks 'key'" + (" or image sizes" if need_size else ""))
    meta = _metadata_from_tar(folder, shard, missing_uid)
    meta.parquet_error = parquet_error
    return meta


def _is_score_column(column: pa.Field) -> bool:
    return column.name not in ("uid", "key") and (pa.types.is_integer(column.type) or pa.types.is_floating(column.type))


def score_column_names(score_folder: DataFolderLike, shard: str) -> set[str]:
    """The names a score folder gives ``where``: the numeric columns of its parquet for ``shard`` (schema only)."""
    folder = get_datafolder(score_folder)
    name = shard_stem(shard) + ".parquet"
    if not folder.exists(name):
        raise FileNotFoundError(f"no scores for shard {shard} in {folder.path} (expected {name}); run the score stage")
    with folder.open(name, "rb") as handle:
        return {column.name for column in open_parquet(handle).schema_arrow if _is_score_column(column)}


def read_score_columns(score_folder: DataFolderLike, shard: str, uids: list[str],
                       keys: list[str] | None = None) -> dict[str, np.ndarray]:
    """Numeric score columns of one shard aligned to the samples ``uids`` (and ``keys``), NaN where a sample has no
    score or a null score. Rows are matched on (uid, key) when the score file has a ``key`` column and ``keys`` are
    given (two samples of a shard can carry the same uid), else on the uid alone (its first row)."""
    folder = get_datafolder(score_folder)
    name = shard_stem(shard) + ".parquet"
    if not folder.exists(name):
        raise FileNotFoundError(f"no scores for shard {shard} in {folder.path} (expected {name}); run the score stage")
    with folder.open(name, "rb") as handle:
        table = read_parquet(handle)
    stored: list = table.column("uid").to_pylist()
    wanted: list = list(uids)
    if keys is not None and "key" in table.column_names:
        stored, wanted = list(zip(stored, table.column("key").to_pylist())), list(zip(uids, keys))
    position: dict = {}
    for i, ident in enumerate(stored):
        position.setdefault(ident, i)
    index = np.array([position.get(ident, -1) for ident in wanted], dtype=np.int64)
    columns = {}
    for column in table.column_names:
        if not _is_score_column(table.schema.field(column)):
            continue
        values = np.array([np.nan if v is None else float(v) for v in table.column(column).to_pylist()] + [np.nan])
        columns[column] = values[index]  # index -1 picks the trailing NaN
    return columns


class SelectionNotFinalized(ValueError):
    """A selection whose finalizer (uid de-duplication, ``_manifest.json``) has not run for the current input."""


def require_finalized(selection_folder: DataFolderLike, num_shards: int) -> dict:
    """The selection's manifest, or ``SelectionNotFinalized``. Decision files exist as soon as select's per-shard
    tasks ran; only the manifest (written after the uid de-duplication) says they are final, and its shard count
    that they cover this input."""
    folder = get_datafolder(selection_folder)
    if not folder.exists(MANIFEST):
        raise SelectionNotFinalized(f"selection {folder.path} not finalized (no {MANIFEST}: select stopped before "
                                    "its uid de-duplication); rerun select")
    with folder.open(MANIFEST, "rt") as handle:
        manifest = json.load(handle)
    if manifest.get("shards") != num_shards:
        raise SelectionNotFinalized(f"selection {folder.path} not finalized for this input: its {MANIFEST} covers "
                                    f"{manifest.get('shards')} shard(s), the input has {num_shards}; rerun select")
    return manifest


def read_selection(selection_folder: DataFolderLike, shard: str) -> pa.Table:
    folder = get_datafolder(selection_folder)
    name = shard_stem(shard) + ".parquet"
    if not folder.exists(name):
        raise FileNotFoundError(f"selection {folder.path} has no decisions for shard {shard} (expected {name})")
    with folder.open(name, "rb") as handle:
        return read_parquet(handle)


@dataclass
class SelectionRules:
    """Everything ``select`` applies to a shard. Names usable in ``where``: score columns (from ``scores``
    folders), uid lists (``uid_lists``: name -> .npy, True when the uid is listed), earlier selections
    (``selections``: name -> folder, True when kept there), and ``width``, ``height``."""

    where: str | None = None
    scores: dict[str, str] = field(default_factory=dict)
    uid_lists: dict[str, str] = field(default_factory=dict)
    selections: dict[str, str] = field(default_factory=dict)
    text: TextRules = field(default_factory=TextRules)
    image: ImageRules = field(default_factory=ImageRules)
    thresholds: dict[str, float] = field(default_factory=dict)  # top_key(column, fraction) -> threshold

    def expression(self) -> Expression | None:
        return Expression(self.where) if self.where else None

    def check_where_names(self, input_folder: DataFolderLike) -> None:
        """Fail before anything is written when ``where`` reads a name no source gives (e.g. a typo): the score
        columns are read from the schema of the first shard's score file."""
        expression = self.expression()
        if expression is None:
            return
        available = {"width", "height", *self.uid_lists, *self.selections}
        shards = list_shards(input_folder)
        if expression.names - available and shards:
            for folder in self.scores.values():
                available |= score_column_names(folder, shards[0])
        unknown = sorted(expression.names - available)
        if unknown:
            raise RuleError(f"unknown name {unknown[0]!r} in selection rule {self.where!r}; "
                            f"available: {sorted(available)}")

    def check_names(self) -> None:
        """Fail early on a duplicated name across uid lists, selections and builtins."""
        seen: dict[str, str] = {"width": "builtin", "height": "builtin"}
        sources = (("uid list", self.uid_lists), ("selection", self.selections), ("score folder", self.scores))
        for kind, names in sources:
            for name in names:
                if name in seen:
                    raise RuleError(f"name {name!r} is used twice ({seen[name]} and {kind})")
                seen[name] = kind


def evaluate_shard(meta: ShardMetadata, rules: SelectionRules, shard: str, input_folder: DataFolderLike,
                   uid_lists: dict[str, UidList]) -> tuple[np.ndarray, list[str | None]]:
    """(keep mask, reason per row): text rules, then image rules, then the ``where`` rule."""
    size = len(meta)
    reasons: list[str | None] = [rules.text.reason(caption) for caption in meta.caption]
    if rules.image.active:
        for i, reason in enumerate(rules.image.reasons(np.array(meta.width), np.array(meta.height))):
            reasons[i] = reasons[i] or reason
    expression = rules.expression()
    if expression is not None and size:
        columns: dict[str, np.ndarray] = {"width": np.array(meta.width), "height": np.array(meta.height)}
        for name, uid_list in uid_lists.items():
            columns[name] = uid_list.contains(meta.uid)
        for name, folder in rules.selections.items():
            table = read_selection(folder, shard)
            kept = dict(zip(table.column("key").to_pylist(), table.column("keep").to_pylist()))
            columns[name] = np.array([bool(kept.get(key, False)) for key in meta.key])
        for folder in rules.scores.values():
            for column, values in read_score_columns(folder, shard, meta.uid, meta.key).items():
                if column in columns:
                    raise RuleError(f"column {column!r} exists in two sources; rename one score column")
                columns[column] = values
        truth = expression.evaluate(columns, size, rules.thresholds)
        for i in range(size):
            if reasons[i] is None and not truth.value[i]:
                reasons[i] = "rule" if truth.known[i] else "missing_score"
    keep = np.array([reason is None for reason in reasons], dtype=bool)
    return keep, reasons


def resolve_thresholds(rules: SelectionRules, input_folder: DataFolderLike) -> dict[str, float]:
    """Global thresholds for every ``top(column, fraction)``, over the scores of all input shards."""
    expression = rules.expression()
    if expression is None or not expression.top_calls:
        return {}
    shards = list_shards(input_folder)
    thresholds = {}
    for column, fraction in expression.top_calls:
        values = []
        for folder_path in rules.scores.values():
            folder = get_datafolder(folder_path)
            for shard in shards:
                name = shard_stem(shard) + ".parquet"
                if not folder.exists(name):
                    raise FileNotFoundError(f"no scores for shard {shard} in {folder.path}; run the score stage")
                with folder.open(name, "rb") as handle:
                    scores = open_parquet(handle)
                    if column not in scores.schema_arrow.names:
                        break
                    values.append(scores.read(columns=[column]).column(column).to_numpy(zero_copy_only=False))
        if not values:
            raise RuleError(f"top({column}, {fraction}): no score folder has a column {column!r}")
        thresholds[top_key(column, fraction)] = resolve_top_threshold(
            np.concatenate([np.asarray(v, dtype=float) for v in values]), fraction)
    return thresholds


def later_duplicates(uids: list, keep: list[np.ndarray]) -> list[np.ndarray]:
    """For shards in order, mark kept rows whose uid was already kept earlier (in this or a previous shard).

    ``uids``: per shard, hex strings or their ``uids_to_array`` form. Works on 128-bit integers (16 bytes a row),
    so a DataComp-medium pool fits in memory.
    """
    arrays, sizes = [], []
    for shard_uids in uids:
        array = shard_uids if isinstance(shard_uids, np.ndarray) else uids_to_array(list(shard_uids))[0]
        arrays.append(array)
        sizes.append(len(array))
    if not arrays:
        return []
    everything = np.concatenate(arrays)
    kept = np.concatenate([np.asarray(k, dtype=bool) for k in keep])
    kept_index = np.flatnonzero(kept)
    _, first = np.unique(everything[kept_index], return_index=True)  # first occurrence in order
    duplicate = np.zeros(len(everything), dtype=bool)
    duplicate[kept_index] = True
    duplicate[kept_index[first]] = False
    return np.split(duplicate, np.cumsum(sizes)[:-1])


def mark_duplicates(table: pa.Table, duplicate: np.ndarray) -> pa.Table:
    """The table with ``duplicate`` rows set to keep=False, reason="duplicate_uid"."""
    keep = np.asarray(table.column("keep").to_pylist(), dtype=bool) & ~duplicate
    reason = [("duplicate_uid" if dup else r) for dup, r in zip(duplicate, table.column("reason").to_pylist())]
    return pa.Table.from_pydict(
        {"key": table.column("key"), "uid": table.column("uid"), "keep": keep.tolist(), "reason": reason},
        schema=SELECTION_SCHEMA.with_metadata(table.schema.metadata or {}),  # keeps the shard's events
    )
