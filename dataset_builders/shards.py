"""WebDataset shard I/O in the img2dataset layout, on local paths or any fsspec URL (``hf://datasets/...``, ``s3://``).

A shard is a tar of samples ``KEY.jpg|png|webp`` + ``KEY.txt`` (caption) + ``KEY.json`` (at least ``uid``, ``url``,
``caption``), with the shard's metadata in a parquet beside it (``00000.tar`` -> ``00000.parquet``), as
img2dataset writes them.

Reading never raises on bad content: ``iter_samples`` yields either a ``Sample`` or a ``Dropped`` with a reason
(corrupt tar, unsafe member path, duplicate key, member name not UTF-8, missing image or caption, non-UTF-8 caption,
bad json, missing uid),
so every stage can count what it lost; a shard that is corrupt or unreadable also yields one ``ShardProblem``.
Members are read into memory, never extracted, so a member named ``../x`` or ``/etc/x`` cannot write anywhere.

Writing is atomic: ``ShardWriter`` writes hidden temp files and renames them into place on ``commit``; a killed
writer leaves only a hidden ``.NAME.*.tmp`` that the next writer of the same shard removes.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import tarfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datatrove.io import DataFolder, DataFolderLike, get_datafolder

from .uids import derive_uid, is_uid

# Extensions that hold the sample's image, in order of preference when a sample has several.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SHARD_GLOB = "*.tar"
# Fixed mtime for written tar members, so that rewriting a shard from the same input gives identical bytes.
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z
# The json written with every output sample (a fixed schema keeps datasets' feature inference stable).
SAMPLE_JSON_FIELDS = ("uid", "key", "url", "caption", "width", "height", "source_shard", "source_key")
_META_MEMBER = re.compile(r"__[^/]*__($|/)")


@dataclass
class RawSample:
    """The members of one key, as bytes by (lower-cased) extension."""

    key: str
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Dropped:
    """A sample that could not be used, with the reason counted by the stages."""

    key: str | None
    reason: str
    detail: str = ""

    def __post_init__(self):
        # A key from a non-UTF-8 member name holds lone surrogates: keep it printable and writable (logs, the
        # selection's key column), e.g. 'caf\udce9'.
        if self.key is not None and not is_utf8(self.key):
            self.key = printable(self.key)


@dataclass
class ShardProblem:
    """A shard that is truncated, corrupt or unreadable (not a sample: counted and logged per shard)."""

    shard: str
    detail: str


@dataclass
class Sample:
    key: str
    uid: str
    caption: str
    url: str
    image: bytes
    image_ext: str
    meta: dict[str, Any]
    shard: str
    uid_derived: bool = False


def is_utf8(text: str) -> bool:
    """False for strings holding lone surrogates (a ``\\ud800`` escape in json, a non-UTF-8 tar member name): they
    cannot be written as UTF-8 (json, tar, parquet, md5 of the text all raise)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """``text`` with lone surrogates as backslash escapes, safe to log and write."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset convention: key = path up to the first dot of the basename, extension = the rest (lower-cased)."""
    directory, base = posixpath.split(name)
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return posixpath.join(directory, stem) if directory else stem, ext.lower()


def is_unsafe_member(name: str) -> bool:
    """Absolute paths, drive letters, backslashes and ``..`` components (tar path traversal)."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\\" in name:
        return True
    return ".." in name.split("/")


def iter_tar(fileobj, name: str = "<tar>") -> Iterator[RawSample | Dropped | ShardProblem]:
    """Group a tar stream's regular members by key, with structural checks.

    Drops: ``unsafe_member_path`` (the whole key), ``duplicate_key`` (a key seen earlier in the shard; the first
    occurrence is kept), ``duplicate_field`` (the same extension twice in one key), ``corrupt_shard`` (the sample
    being read when the tar turned out truncated or corrupt; samples before it are kept).
    """
    seen: set[str] = set()
    current: RawSample | None = None
    problem: str | None = None

    def finish() -> RawSample | Dropped | None:
        if current is None:
            return None
        seen.add(current.key)
        return Dropped(current.key, problem) if problem else current

    reader = _CountingReader(fileobj)
    try:
        with tarfile.open(fileobj=reader, mode="r|*") as stream:
            for member in stream:
                if not member.isreg() or _META_MEMBER.match(member.name):
                    continue
                parts = split_member_name(member.name)
                if parts is None:
                    continue
                key, ext = parts
                if current is None or key != current.key:
                    if (done := finish()) is not None:
                        yield done
                    current, problem = RawSample(key), ("duplicate_key" if key in seen else None)
                if is_unsafe_member(member.name):
                    problem = problem or "unsafe_member_path"
                if ext in current.files:
                    problem = problem or "duplicate_field"
                current.files[ext] = stream.extractfile(member).read()
                stream.members = []  # a streamed tar otherwise keeps every TarInfo in memory
            # tarfile ends silently, as if the archive ended, when the file stops inside a member header or a header
            # is damaged (garbage, a zeroed hole): a complete uncompressed tar has an end-of-archive block after its
            # last member and nothing but zero padding after that.
            reader.drain()
            if reader.uncompressed and reader.total < stream.offset + tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"file ends inside a member header at byte {reader.total}")
            if reader.uncompressed and reader.data_end > stream.offset:
                raise tarfile.ReadError(
                    f"unreadable member header at byte {stream.offset} (damaged tar); the "
                    f"{reader.data_end - stream.offset} bytes after it cannot be read")
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        if current is not None:
            yield Dropped(current.key, "corrupt_shard", f"{name}: {error}")
            current = None
        yield ShardProblem(name, str(error))
        return
    if (done := finish()) is not None:
        yield done


class _CountingReader(io.RawIOBase):
    """Counts the bytes of a stream, remembers its first block (to tell a plain tar from a compressed one) and where
    its last non-zero byte ends (``data_end``: anything past the end-of-archive block but zero padding is damage)."""

    def __init__(self, raw):
        super().__init__()
        self.raw = raw
        self.total = 0
        self.data_end = 0
        self.head = b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if len(self.head) < tarfile.BLOCKSIZE:
            self.head += data[: tarfile.BLOCKSIZE - len(self.head)]
        if data and data[-1]:  # the common case, without copying the chunk
            self.data_end = self.total + len(data)
        elif nonzero := len(data.rstrip(b"\0")):
            self.data_end = self.total + nonzero
        self.total += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    @property
    def uncompressed(self) -> bool:
        # tarfile's own test (_StreamProxy.getcomptype), not the ustar magic: a tar whose first header is damaged
        # has none, and must still be checked
        head = self.head
        compressed = (head.startswith((b"\x1f\x8b\x08", b"\x5d\x00\x00\x80", b"\xfd7zXZ"))
                      or (head[:3] == b"BZh" and head[4:10] == b"1AY&SY"))
        return bool(head) and not compressed


def _decode_caption(raw: RawSample, meta: dict) -> str | Dropped:
    if "txt" in raw.files:
        try:
            return raw.files["txt"].decode("utf-8")
        except UnicodeDecodeError as error:
            return Dropped(raw.key, "caption_not_utf8", str(error))
    caption = meta.get("caption")
    if isinstance(caption, str):
        if not is_utf8(caption):  # valid json can escape a lone surrogate ("\\udc80")
            return Dropped(raw.key, "caption_not_utf8", f"json caption '{printable(caption)[:80]}'")
        return caption
    return Dropped(raw.key, "missing_caption")


def parse_sample(raw: RawSample, shard: str, *, missing_uid: str = "derive") -> Sample | Dropped:
    """Image, caption, json and uid of one grouped sample, or the reason it is unusable.

    ``missing_uid``: "derive" gives samples without a valid uid a stable one (md5 of url and caption, or of the image
    bytes), "drop" drops them (reason ``missing_uid``). Key, caption and url must be valid UTF-8 (``bad_key``,
    ``caption_not_utf8``, ``bad_json``): every stage writes them.
    """
    if not is_utf8(raw.key):  # a member name that is not UTF-8 (tarfile decodes it to surrogates)
        return Dropped(raw.key, "bad_key", "member name is not valid UTF-8")
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw.files), None)
    if image_ext is None:
        return Dropped(raw.key, "missing_image")
    meta: dict[str, Any] = {}
    if "json" in raw.files:
        try:
            meta = json.loads(raw.files["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            return Dropped(raw.key, "bad_json", str(error))
        if not isinstance(meta, dict):
            return Dropped(raw.key, "bad_json", f"json is a {type(meta).__name__}, not an object")
    caption = _decode_caption(raw, meta)
    if isinstance(caption, Dropped):
        return caption
    url = meta.get("url") if isinstance(meta.get("url"), str) else ""
    if not is_utf8(url):
        return Dropped(raw.key, "bad_json", f"url '{printable(url)[:80]}' is not valid UTF-8")
    uid = meta.get("uid")
    derived = False
    if not is_uid(uid):
        if missing_uid == "drop":
            return Dropped(raw.key, "missing_uid", f"uid={uid!r}")
        uid = derive_uid(url, caption) if url else derive_uid(raw.files[image_ext])
        derived = True
    return Sample(raw.key, uid.lower(), caption, url, raw.files[image_ext], image_ext, meta, shard, derived)


def open_folder(folder: DataFolderLike) -> DataFolder:
    """A datatrove DataFolder (fsspec DirFileSystem) for a local path, URL, (URL, options) or DataFolder."""
    return get_datafolder(folder)


def list_shards(folder: DataFolderLike) -> list[str]:
    """Sorted shard names (``*.tar``, top level) relative to ``folder``: the task order of every stage."""
    return open_folder(folder).list_files(glob_pattern=SHARD_GLOB, recursive=False)


def shard_stem(shard: str) -> str:
    """``00000.tar`` -> ``00000``: the name of the shard's parquet, score and selection files."""
    return shard[: -len(".tar")] if shard.endswith(".tar") else shard


def iter_samples(
    folder: DataFolderLike, shard: str, *, missing_uid: str = "derive"
) -> Iterator[Sample | Dropped | ShardProblem]:
    """Samples of one shard of ``folder``, drops with their reason, and a ``ShardProblem`` if the shard is damaged."""
    data_folder = open_folder(folder)
    try:
        handle = data_folder.open(shard, "rb", block_size=1 << 20)
    except (OSError, ValueError) as error:
        yield ShardProblem(shard, str(error))
        return
    with handle:
        for item in iter_tar(handle, shard):
            yield parse_sample(item, shard, missing_uid=missing_uid) if isinstance(item, RawSample) else item


def open_parquet(handle) -> pq.ParquetFile:
    """A parquet file from an open (fsspec) file, read into memory first and parsed from there.

    pyarrow reads a Python file object through its IO threads (``ReadAsync``); a read whose future is released when
    the process exits wants the GIL during interpreter shutdown, and the process aborts ("terminate called without
    an active exception", exit status 134) after its work is done. An in-memory buffer is read synchronously.
    These files are small: one shard's rows or a footer.
    """
    return pq.ParquetFile(pa.BufferReader(handle.read()))


def read_parquet(handle, columns: list[str] | None = None) -> pa.Table:
    """The table (or some columns) of a parquet file given as an open (fsspec) file; see ``open_parquet``."""
    return open_parquet(handle).read(columns=columns)


@contextmanager
def parquet_on_this_thread(handle) -> Iterator[pq.ParquetFile]:
    """A parquet file read through an open (fsspec) file in place, for files too large to read whole (a reshard
    plan): the footer, then only the row groups asked for. Read them with ``read_row_group(i, use_threads=False)``.

    Every read of ``handle`` happens on the calling thread, synchronously, so no arrow thread ever holds the Python
    file or a buffer of it (see ``open_parquet``). ``pq.ParquetFile`` pre-buffers by default (``pre_buffer=True``),
    which reads column chunks through ``ReadAsync`` on arrow's IO threads; with ``pre_buffer=False`` each column
    chunk is read by ``ReadAt`` on the thread that reads the row group, and ``use_threads=False`` keeps that the
    calling one. The reader is closed on exit (which closes ``handle`` too): a stray later use fails instead of
    reaching Python.
    """
    parquet = pq.ParquetFile(handle, pre_buffer=False)
    try:
        yield parquet
    finally:
        # a ParquetFile given a file object leaves it open on close() unless forced
        parquet.close(force=True)


class UnreadableParquet(ValueError):
    """A metadata parquet that exists but cannot be read (truncated, corrupt); the message names the file."""


def read_sidecar_parquet(folder: DataFolderLike, shard: str) -> pa.Table | None:
    """The img2dataset metadata parquet next to a shard, or None when there is none; ``UnreadableParquet`` when it
    is truncated or corrupt (pyarrow's own error does not say which file)."""
    data_folder = open_folder(folder)
    name = shard_stem(shard) + ".parquet"
    if not data_folder.exists(name):
        return None
    try:
        with data_folder.open(name, "rb") as handle:
            return read_parquet(handle)
    except (pa.ArrowException, OSError) as error:
        raise UnreadableParquet(f"metadata parquet {posixpath.join(data_folder.path, name)} of shard {shard} is "
                                f"unreadable ({error})") from error


def _temp_name(name: str) -> str:
    directory, base = posixpath.split(name)
    return posixpath.join(directory, f".{base}.{uuid.uuid4().hex[:12]}.tmp")


def remove_stale_temps(folder: DataFolder, name: str) -> None:
    """Delete hidden temp files a killed writer of ``name`` left behind."""
    directory, base = posixpath.split(name)
    for path in folder.glob(posixpath.join(directory, f".{base}.*.tmp") if directory else f".{base}.*.tmp"):
        folder.rm(path)


@contextmanager
def atomic_write(folder: DataFolderLike, name: str, mode: str = "wb"):
    """Open ``name`` for writing under a hidden temp name; rename into place only if the block succeeds."""
    data_folder = open_folder(folder)
    remove_stale_temps(data_folder, name)
    temp = _temp_name(name)
    try:
        with data_folder.open(temp, mode) as handle:
            yield handle
        data_folder.mv(temp, name)
    except BaseException:
        if data_folder.exists(temp):
            data_folder.rm(temp)
        raise


def write_parquet_atomic(folder: DataFolderLike, name: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    with atomic_write(folder, name) as handle:
        handle.write(buffer.getvalue())


class ShardWriter:
    """Writes one shard (``NAME.tar`` + ``NAME.parquet``) atomically, in the img2dataset layout.

    Use as a context manager: on a clean exit both files are renamed into place (parquet first, so a visible tar
    always has its metadata); on an exception, or if the process dies, nothing visible is left.
    """

    def __init__(self, folder: DataFolderLike, stem: str):
        self.folder = open_folder(folder)
        self.stem = stem
        self.tar_name, self.parquet_name = f"{stem}.tar", f"{stem}.parquet"
        for name in (self.tar_name, self.parquet_name):
            remove_stale_temps(self.folder, name)
        self._temp_tar = _temp_name(self.tar_name)
        self._handle = self.folder.open(self._temp_tar, "wb", block_size=1 << 20)
        # ustar headers (as webdataset's TarWriter intends): keys are short, and pax headers cost ~30% of writing
        self._tar = tarfile.open(fileobj=self._handle, mode="w|", format=tarfile.USTAR_FORMAT)
        self.rows: list[dict[str, Any]] = []

    def write(self, key: str, image: bytes, caption: str, meta: dict[str, Any], image_ext: str = "jpg") -> None:
        record = {name: meta.get(name) for name in SAMPLE_JSON_FIELDS}
        record.update(key=key, caption=caption)
        members = ((image_ext, image), ("json", json.dumps(record, ensure_ascii=False).encode("utf-8")),
                   ("txt", caption.encode("utf-8")))
        for ext, data in sorted(members):  # webdataset's member order within a sample: sorted extensions
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
            info.uname = info.gname = "bigdata"
            self._tar.addfile(info, io.BytesIO(data))
        self.rows.append({**record, "status": "success"})

    def __len__(self) -> int:
        return len(self.rows)

    def commit(self) -> None:
        self._tar.close()
        self._handle.close()
        columns = list(SAMPLE_JSON_FIELDS) + ["status"]
        table = pa.Table.from_pylist(self.rows, schema=_metadata_schema(columns))
        write_parquet_atomic(self.folder, self.parquet_name, table)
        self.folder.mv(self._temp_tar, self.tar_name)

    def abort(self) -> None:
        try:
            self._tar.close()
            self._handle.close()
        finally:
            if self.folder.exists(self._temp_tar):
                self.folder.rm(self._temp_tar)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _metadata_schema(columns: list[str]) -> pa.Schema:
    types = {"width": pa.int64(), "height": pa.int64()}
    return pa.schema([(name, types.get(name, pa.string())) for name in columns])
