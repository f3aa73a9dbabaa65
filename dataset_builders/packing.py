"""The one packing core: bin packing of sample lengths (in LLM positions) into fixed-capacity sequences.

Used by the offline packer (``steps/pack.py``) and the streaming packer (``streaming_packing.py``); nothing else
packs. Lengths count LLM positions: text tokens plus ``num_image_tokens`` per image (``sample_length``).

Algorithms (all deterministic; every index exactly once; no bin over capacity):

- ``"ffd"``: first-fit-decreasing, as the paper. Items sorted by length, longest first (ties by index), each into
  the first bin it fits. Same bins as the original's linear scan over open bins, computed per distinct length with
  numpy instead of per item: identical items placed by first fit fill the eligible bins in index order, each
  taking ``gap // length``, so a whole group is placed in one vectorised step.
- ``"bfd"``: best-fit-decreasing (tightest bin first), same vectorisation.
- ``"exact"`` (the default): FFD and BFD leave the last gap of every bin empty, because every item is at least
  ~148 positions long on caption data (~98.3% fill). This packer builds bins filled *exactly* to the capacity: a
  bin pattern (a multiset of lengths) is found by an exact subset-sum over the length histogram, reconstructed to
  take the longest items possible, and repeated as many times as the counts allow. Patterns are first searched
  among the most plentiful lengths (a repeat target that halves when no pattern exists), so common lengths are
  used in bulk and the pool keeps its variety for the last bins; the remainder gets the fullest patterns the
  leftover lengths allow. On caption lengths this reaches the lower bound ``ceil(sum / capacity)`` (99.998% fill on
  1M samples, ``bench/packing.py``). When it does not, FFD is run too and the result with fewer bins is returned,
  so the default is never worse than the paper's packer.

The work is over the histogram of lengths, not per item, so 1M caption samples pack in ~0.1-0.2 s (75x faster
than the original's per-shard linear scan). Each pattern search costs ~1-2 ms at capacity 4096 and caption data
needs a few dozen; lengths spread over the whole capacity (SFT conversations) would need one per bin for little or
no gain over FFD, so after ``MAX_PATTERN_SEARCHES`` the rest is packed first-fit decreasing (< 1 s extra).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

DEFAULT_CAPACITY = 4096
ALGORITHMS = ("exact", "ffd", "bfd")


def sample_length(num_text_tokens: int, num_images: int, num_image_tokens: int) -> int:
    """Positions a sample takes in the LLM sequence: its text tokens plus ``num_image_tokens`` per image.

    ``num_text_tokens`` excludes image placeholders (e.g. ``<s>``, ``\\n``, the caption and ``<|im_end|>``).
    """
    if num_text_tokens < 0 or num_images < 0 or num_image_tokens < 0:
        raise ValueError(
            f"sample_length needs non-negative counts, got text={num_text_tokens}, images={num_images}, "
            f"image_tokens={num_image_tokens}"
        )
    return int(num_text_tokens) + int(num_images) * int(num_image_tokens)


def pack_lengths(
    lengths: Sequence[int] | np.ndarray,
    capacity: int = DEFAULT_CAPACITY,
    algorithm: str = "default",
) -> list[list[int]]:
    """Pack samples into bins of at most ``capacity`` positions; returns bins of sample indices.

    Every index appears exactly once. Bins are listed in creation order; inside a bin, indices are ordered by
    length (longest first, ties by index), the order FFD places them.

    Args:
        lengths: positions per sample (``sample_length``); a list or a 1-D integer array.
        capacity: positions per packed sequence (4096 as the paper).
        algorithm: ``"default"`` (= ``"exact"``), ``"exact"``, ``"ffd"`` (the paper) or ``"bfd"``.

    Raises:
        ValueError: an unknown algorithm, a length that is not positive, or a length over ``capacity`` (the message
            names the first offending indices; filter or truncate those samples before packing).
    """
    order, offsets = pack_lengths_array(lengths, capacity, algorithm)
    with _gc_paused():  # tens of thousands of new lists would trigger full cyclic-GC passes for nothing
        flat = order.tolist()
        bounds = offsets.tolist()
        return [flat[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


def pack_lengths_array(
    lengths: Sequence[int] | np.ndarray,
    capacity: int = DEFAULT_CAPACITY,
    algorithm: str = "default",
) -> tuple[np.ndarray, np.ndarray]:
    """Same packing as ``pack_lengths`` in CSR form: bin ``b`` holds ``order[offsets[b]:offsets[b + 1]]``."""
    algorithm = "exact" if algorithm == "default" else algorithm
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown packing algorithm {algorithm!r}; expected 'default' or one of {ALGORITHMS}")
    if capacity < 1:
        raise ValueError(f"capacity must be positive, got {capacity}")
    lengths = _validated_lengths(lengths, capacity)
    if lengths.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
    counts = np.bincount(lengths, minlength=capacity + 1)
    if algorithm == "ffd":
        placements = _fit_decreasing(counts, capacity, best_fit=False)
    elif algorithm == "bfd":
        placements = _fit_decreasing(counts, capacity, best_fit=True)
    else:
        placements = _exact_fill(counts, capacity)
        lower_bound = -(-int(counts @ np.arange(capacity + 1)) // capacity)
        if placements.num_bins > lower_bound:  # not provably optimal: never return worse than FFD
            baseline = _fit_decreasing(counts, capacity, best_fit=False)
            if baseline.num_bins < placements.num_bins:
                placements = baseline
    return placements.to_bins(lengths)


@contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _validated_lengths(lengths, capacity: int) -> np.ndarray:
    array = np.asarray(lengths)
    if array.ndim != 1:
        raise ValueError(f"lengths must be one-dimensional, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating) or not np.all(array == np.round(array)):
            raise ValueError(f"lengths must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    bad = np.flatnonzero((array < 1) | (array > capacity))
    if bad.size:
        shown = ", ".join(f"index {i} (length {array[i]})" for i in bad[:5].tolist())
        more = f" and {bad.size - 5} more" if bad.size > 5 else ""
        raise ValueError(
            f"{bad.size} sample(s) cannot be packed into capacity {capacity}: {shown}{more}; lengths must be in "
            f"[1, {capacity}] (drop or truncate over-long samples first)"
        )
    return array


class _Placements:
    """Which bins take how many items of each length, recorded per length group in placement order."""

    def __init__(self) -> None:
        self.group_lengths: list[int] = []
        self.group_bins: list[np.ndarray] = []
        self.group_takes: list[np.ndarray] = []
        self.num_bins = 0

    def add(self, length: int, bins: np.ndarray, takes: np.ndarray) -> None:
        if bins.size:
            self.group_lengths.append(int(length))
            self.group_bins.append(np.asarray(bins, dtype=np.int64))
            self.group_takes.append(np.asarray(takes, dtype=np.int64))

    def new_bins(self, count: int) -> np.ndarray:
        start = self.num_bins
        self.num_bins += count
        return np.arange(start, start + count, dtype=np.int64)

    def to_bins(self, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Turn per-length placements into per-item bins: items of one length are taken in index order."""
        # Slots sorted by (length descending, placement order) line up with items sorted by (length desc, index).
        group_rank = np.argsort(-np.asarray(self.group_lengths, dtype=np.int64), kind="stable").tolist()
        slot_bins = np.repeat(
            np.concatenate([self.group_bins[g] for g in group_rank]),
            np.concatenate([self.group_takes[g] for g in group_rank]),
        )
        items_by_length = _stable_argsort(lengths.max() - lengths)
        if slot_bins.size != items_by_length.size:  # an internal invariant, never a user error
            raise RuntimeError(f"packing placed {slot_bins.size} items for {items_by_length.size} samples")
        # Group by bin, keeping (length desc, index) order inside each bin.
        order = items_by_length[_stable_argsort(slot_bins)]
        offsets = np.zeros(self.num_bins + 1, dtype=np.int64)
        np.cumsum(np.bincount(slot_bins, minlength=self.num_bins), out=offsets[1:])
        return order, offsets


def _stable_argsort(keys: np.ndarray) -> np.ndarray:
    """Stable argsort of non-negative integers; 16-bit digits so numpy uses its radix sort (LSD, two passes max)."""
    if keys.size == 0 or int(keys.max()) < (1 << 16):
        return np.argsort(keys.astype(np.uint16), kind="stable")
    if int(keys.max()) < (1 << 32):
        low = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
        high = np.argsort((keys[low] >> 16).astype(np.uint16), kind="stable")
        return low[high]
    return np.argsort(keys, kind="stable")


class _FitDecreasing:
    """First-fit (or best-fit) decreasing over a length histogram.

    For a run of identical items, first fit fills the eligible bins (gap >= length) in index order and best fit
    fills them in increasing-gap order (ties by index); either way each eligible bin takes ``gap // length`` items
    until the run is used up, and the rest opens new bins holding ``capacity // length`` each.
    """

    def __init__(self, placements: _Placements, capacity: int, best_fit: bool):
        self.placements = placements
        self.capacity = capacity
        self.best_fit = best_fit
        self.bins = np.zeros(0, dtype=np.int64)  # ids of bins this packer opened, and their gaps
        self.gaps = np.zeros(0, dtype=np.int64)

    def place_histogram(self, counts: np.ndarray) -> None:
        for length in np.flatnonzero(counts)[::-1].tolist():
            self.place_run(length, int(counts[length]))

    def place_run(self, length: int, count: int) -> None:
        eligible = np.flatnonzero(self.gaps >= length)
        if eligible.size:
            if self.best_fit:
                eligible = eligible[np.argsort(self.gaps[eligible], kind="stable")]
            fits = self.gaps[eligible] // length
            takes = np.clip(count - (np.cumsum(fits) - fits), 0, fits)
            used = takes > 0
            self.placements.add(length, self.bins[eligible[used]], takes[used])
            self.gaps[eligible] -= takes * length
            count -= int(takes.sum())
        if count:
            per_bin = self.capacity // length
            num_new = -(-count // per_bin)
            takes = np.full(num_new, per_bin, dtype=np.int64)
            takes[-1] = count - per_bin * (num_new - 1)
            new = self.placements.new_bins(num_new)
            self.placements.add(length, new, takes)
            self.bins = np.concatenate((self.bins, new))
            self.gaps = np.concatenate((self.gaps, self.capacity - takes * length))


def _fit_decreasing(counts: np.ndarray, capacity: int, best_fit: bool) -> _Placements:
    placements = _Placements()
    _FitDecreasing(placements, capacity, best_fit).place_histogram(counts)
    return placements


# Each pattern search is a subset-sum over the capacity (~1-2 ms at 4096). Caption data needs a few dozen; lengths
# spread over the whole capacity would need one per bin (seconds for 10k samples) for no gain over FFD.
MAX_PATTERN_SEARCHES = 256


def _exact_fill(counts: np.ndarray, capacity: int) -> _Placements:
    """Exactly full bin patterns while they exist, then the fullest patterns the remaining lengths allow; past
    ``MAX_PATTERN_SEARCHES`` searches, whatever is left goes to first-fit decreasing."""
    counts = counts.astype(np.int64, copy=True)
    placements = _Placements()
    budget = [MAX_PATTERN_SEARCHES]
    _PatternFiller(counts, capacity, placements, exact=True, budget=budget).run()
    _PatternFiller(counts, capacity, placements, exact=False, budget=budget).run()
    if counts.any():
        _FitDecreasing(placements, capacity, best_fit=False).place_histogram(counts)
    return placements


class _PatternFiller:
    """Builds bins whose lengths sum to exactly ``capacity``, consuming the histogram ``counts`` in place.

    A pattern (a multiset of lengths summing to the capacity) is searched for a repeat target ``k``: only lengths
    with at least ``k`` items left may be used, each at most ``counts // k`` times, so the pattern can be repeated
    at least ``k`` times. The search is an exact subset-sum over those bounded multiplicities (a bitset held in a
    Python int, multiplicities split in powers of two), reconstructed so that it takes as many long items as
    possible, as FFD would. ``k`` starts at the largest count and halves when no pattern exists: common lengths are
    consumed in bulk first and the pool keeps its variety for the last bins. With ``exact=False`` the fullest
    pattern is taken instead of an exactly full one. ``budget`` (a one-item list, shared between fillers) counts the
    searches left; the filler stops when it runs out.
    """

    def __init__(self, counts: np.ndarray, capacity: int, placements: _Placements, exact: bool, budget: list[int]):
        self.counts = counts
        self.capacity = capacity
        self.placements = placements
        self.exact = exact
        self.budget = budget

    def run(self) -> None:
        k = int(self.counts.max(initial=0))
        while k >= 1 and self.budget[0] > 0:
            self.budget[0] -= 1
            pattern = self._pattern(k)
            if pattern is None:
                k //= 2
                continue
            lengths, multiplicity = pattern
            repeat = int(np.min(self.counts[lengths] // multiplicity))
            bins = self.placements.new_bins(repeat)
            for length, times in zip(lengths.tolist(), multiplicity.tolist()):
                self.placements.add(length, bins, np.full(repeat, times, dtype=np.int64))
            self.counts[lengths] -= repeat * multiplicity

    def _pattern(self, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        capacity = self.capacity
        usable = np.flatnonzero(self.counts >= k)
        if usable.size == 0:
            return None
        caps = np.minimum(self.counts[usable] // k, capacity // usable)
        if self.exact and int(caps @ usable) < capacity:
            return None
        # 0/1 items: each length split into chunks of 1, 2, 4, ... copies (any count up to its cap is a sum of
        # chunks), shortest lengths first so that the reconstruction below meets the longest first.
        chunk_length: list[int] = []
        chunk_copies: list[int] = []
        for length, cap in zip(usable.tolist(), caps.tolist()):
            size = 1
            while cap > 0:
                copies = min(size, cap)
                chunk_length.append(length)
                chunk_copies.append(copies)
                cap -= copies
                size *= 2
        mask = (1 << (capacity + 1)) - 1
        reach = 1  # bit s set: sum s is reachable with the chunks seen so far
        before: list[int] = []
        for length, copies in zip(chunk_length, chunk_copies):
            before.append(reach)
            reach = (reach | (reach << (length * copies))) & mask
        if self.exact and not (reach >> capacity) & 1:
            return None
        fullest = reach.bit_length() - 1  # the capacity itself when exact
        if k > 1 and capacity - fullest >= int(np.flatnonzero(self.counts)[0]):
            return None  # an item would still fit: repeating this pattern would waste space (k == 1 is optimal)
        gap = fullest
        taken: dict[int, int] = {}
        for i in range(len(chunk_length) - 1, -1, -1):
            weight = chunk_length[i] * chunk_copies[i]
            if weight <= gap and (before[i] >> (gap - weight)) & 1:
                taken[chunk_length[i]] = taken.get(chunk_length[i], 0) + chunk_copies[i]
                gap -= weight
                if gap == 0:
                    break
        lengths = np.fromiter(taken.keys(), dtype=np.int64, count=len(taken))
        return lengths, np.fromiter(taken.values(), dtype=np.int64, count=len(taken))
