"""DataComp-style 128-bit uids: hex strings in the shards, ``np.dtype("u8,u8")`` arrays in ``.npy`` uid lists.

DataComp (and the DFN release, e.g. ``datacomp_medium_dfn_20m_inds.npy``) stores a selection as a sorted array of
(upper 64 bits, lower 64 bits) pairs. ``UidList`` loads such a file (memory-mapped when local, so parallel workers
share the pages) and answers membership for a batch of hex uids with one ``searchsorted``.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Sequence

import fsspec
import numpy as np

UID_DTYPE = np.dtype("u8,u8")
_HEX128 = re.compile(r"^[0-9a-fA-F]{32}$")


def is_uid(value: object) -> bool:
    """A 32-digit hex string (128 bits), the DataComp uid format."""
    return isinstance(value, str) and bool(_HEX128.match(value))


def derive_uid(*parts: str | bytes) -> str:
    """A stable 128-bit hex uid for samples that carry none (e.g. CC3M/CC12M/SBU from img2dataset): md5 of the parts."""
    digest = hashlib.md5()
    for part in parts:
        # surrogatepass: a lone surrogate (from a json escape) must not crash the task; valid text hashes as UTF-8
        digest.update(part.encode("utf-8", "surrogatepass") if isinstance(part, str) else part)
        digest.update(b"\x1f")
    return digest.hexdigest()


def uids_to_array(uids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(structured ``u8,u8`` array, validity mask); invalid uids get (0, 0) and ``False`` in the mask."""
    out = np.zeros(len(uids), dtype=UID_DTYPE)
    valid = np.zeros(len(uids), dtype=bool)
    for i, uid in enumerate(uids):
        if is_uid(uid):
            out[i] = (int(uid[:16], 16), int(uid[16:], 16))
            valid[i] = True
    return out, valid


def array_to_uids(array: np.ndarray) -> list[str]:
    return [f"{int(hi):016x}{int(lo):016x}" for hi, lo in array.tolist()]


def save_uid_list(path: str, uids: Iterable[str]) -> int:
    """Write a sorted, de-duplicated ``u8,u8`` ``.npy`` (the DataComp format); returns the number of uids written."""
    array, valid = uids_to_array(list(uids))
    array = np.unique(array[valid])
    buffer = io.BytesIO()
    np.save(buffer, array)
    with fsspec.open(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return len(array)


class UidList:
    """Membership test against a DataComp uid ``.npy`` (local path or any fsspec URL)."""

    def __init__(self, path: str):
        self.path = path
        fs, local = fsspec.core.url_to_fs(path)
        if getattr(fs, "protocol", None) in ("file", ("file", "local")) or fs.__class__.__name__ == "LocalFileSystem":
            array = np.load(local, mmap_mode="r", allow_pickle=False)
        else:
            with fs.open(local, "rb") as handle:
                array = np.load(io.BytesIO(handle.read()), allow_pickle=False)
        if array.dtype != UID_DTYPE:
            raise ValueError(f"{path}: expected a DataComp uid list with dtype {UID_DTYPE} (got {array.dtype})")
        if len(array) > 1 and not _is_sorted(array):
            array = np.sort(array)
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def contains(self, uids: Sequence[str]) -> np.ndarray:
        """Boolean mask: which of ``uids`` are in the list (malformed uids are never members)."""
        query, valid = uids_to_array(uids)
        if len(self.array) == 0 or len(query) == 0:
            return np.zeros(len(query), dtype=bool)
        index = np.minimum(np.searchsorted(self.array, query), len(self.array) - 1)
        return valid & (self.array[index] == query)


def _is_sorted(array: np.ndarray, chunk: int = 1 << 22) -> bool:
    for start in range(0, len(array) - 1, chunk):
        block = np.asarray(array[start : start + chunk + 1])
        hi, lo = block["f0"], block["f1"]
        if np.any((hi[1:] < hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] < lo[:-1]))):
            return False
    return True
