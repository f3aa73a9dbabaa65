"""Packed corpus -> per-process micro-batches, with a data position that resumes exactly.

Map-style corpora (``load_dataset(...)``): every epoch is a seeded permutation of the packs, cut into global
micro-batches of ``processes * per_device_batch`` packs; process ``r`` takes slice ``r`` of each. The position is one
integer, global micro-batches consumed, so a resumed run continues with the next unseen micro-batch (and works on a
different number of processes as long as the global micro-batch is the same). The packs that do not fill a last
global micro-batch are dropped, counted and logged.

Streaming corpora (``streaming=True``): each process reads its part (``datasets.distributed.split_dataset_by_node``)
in shard order; a background thread reads and collates ahead and attaches ``IterableDataset.state_dict()`` taken
right after each micro-batch, so the saved position is exactly the last consumed micro-batch, never the prefetched
ones. Streaming reads shards in order (datasets' shuffle buffer cannot resume exactly); shuffle when packing.
"""

from __future__ import annotations

import copy
import json
import logging
import queue
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from dataset_builders.images import DECODE_ERRORS

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("images", "texts")
DATA_FILE_SUFFIXES = (".parquet", ".arrow", ".tar", ".jsonl", ".json", ".csv")


def check_dataset_source(path: str) -> None:
    """A local folder must hold data shards; raise FileNotFoundError naming the folder otherwise."""
    local = Path(path)
    if local.is_file():
        return
    if not local.is_dir():
        if path.startswith((".", "/", "~")) or local.suffix:
            raise FileNotFoundError(f"dataset path {path} does not exist")
        return  # a hub dataset id
    shards = [p for p in local.rglob("*") if p.is_file() and p.name.endswith(DATA_FILE_SUFFIXES)
              and ".cache" not in p.parts]
    if not shards:
        raise FileNotFoundError(
            f"dataset folder {path} holds no data shards (looked for {', '.join(DATA_FILE_SUFFIXES)} files)"
        )


def load_packed_corpus(path: str, config_name: str | None, split: str, streaming: bool,
                       required_columns: tuple[str, ...] = REQUIRED_COLUMNS):
    """``datasets.load_dataset`` of a packed corpus, with clear errors for a bad path, config or schema."""
    import datasets

    check_dataset_source(path)
    try:
        # Footers first: a truncated local shard fails here, named, before datasets builds anything.
        expected = _parquet_rows(path, config_name, split)
        dataset = datasets.load_dataset(path, config_name, split=split, streaming=streaming)
        if not streaming and expected is not None and len(dataset) != expected:
            # datasets keys the Arrow cache of a local folder on its name and card, not on its files: another
            # folder with the same name and card (or rewritten shards) is served from a stale cache.
            logger.warning("cached copy of %s has %d rows, its parquet shards %d: rebuilding the cache",
                           path, len(dataset), expected)
            dataset = datasets.load_dataset(path, config_name, split=split, download_mode="force_redownload",
                                            verification_mode="no_checks")
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        raise type(error)(f"could not load the packed corpus {path} (config {config_name}, split {split}): "
                          f"{error}") from error
    columns = list(dataset.features or {}) if dataset.features is not None else None
    if columns is not None:
        missing = [c for c in required_columns if c not in columns]
        if missing:
            raise ValueError(f"packed corpus {path} (config {config_name}) lacks column(s) {missing}; it has "
                             f"{columns}. Expected packed rows: images, texts, lengths, uids")
    if not streaming and len(dataset) == 0:
        raise ValueError(f"packed corpus {path} (config {config_name}, split {split}) has no rows")
    if streaming:  # the collator decodes the images, so a corrupt one costs its document, not the stream
        dataset = dataset.decode(False)
    return dataset


def _parquet_rows(path: str, config_name: str | None, split: str) -> int | None:
    """Rows in a local corpus' parquet shards for ``split`` (from the footers), or None if not local parquet."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not Path(path).is_dir():
        return None
    files = datasets.load_dataset_builder(path, config_name).config.data_files.get(split, [])
    if not files or not all(str(f).endswith(".parquet") for f in files):
        return None
    rows = 0
    for file in files:
        try:
            rows += pq.read_metadata(str(file)).num_rows
        except (OSError, pa.ArrowInvalid) as error:  # e.g. a shard cut short by an interrupted copy
            raise ValueError(f"data shard {file} is not a readable parquet file (truncated or corrupt?): "
                             f"{error}") from None
    return rows


def packing_stats(path: str, config_name: str | None, split: str) -> dict | None:
    """The ``packing_stats.json`` that ``python -m dataset_builders pack`` writes next to a local corpus' shards
    (``num_image_tokens``, ``capacity``, ...), or None (a hub dataset, a corpus packed otherwise, stats without
    those two)."""
    import datasets

    from dataset_builders.accounting import PACKING_STATS_FILE

    if not Path(path).is_dir():
        return None
    files = datasets.load_dataset_builder(path, config_name).config.data_files.get(split, [])
    for folder in dict.fromkeys(Path(str(file)).parent for file in files):
        stats = folder / PACKING_STATS_FILE
        if stats.is_file():
            content = json.loads(stats.read_text(encoding="utf-8"))
            return content if {"num_image_tokens", "capacity"} <= set(content) else None
    return None


def _first_packs(dataset, count: int) -> list[dict]:
    """The texts and lengths of the first ``count`` packs (images are not read)."""
    columns = [c for c in ("texts", "lengths") if c in (dataset.features or {})]
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        return list((dataset.select_columns(columns) if columns else dataset).take(count))
    return list(dataset.select_columns(columns).select(range(min(count, len(dataset)))))


def check_packing_stats(name: str, stats: dict, num_image_tokens: int, max_length: int) -> None:
    """Raise ValueError when the corpus' ``packing_stats.json`` says it was packed for another ``num_image_tokens``
    or into packs longer than ``max_length`` (see ``check_first_packs``)."""
    _check_packed_for(name, stats.get("num_image_tokens"), stats.get("capacity"), "its packing_stats.json",
                      num_image_tokens, max_length)


def check_first_packs(dataset, collator, name: str, max_length: int, sample: int = 8) -> None:
    """Raise ValueError, before training, for a corpus packed for another ``num_image_tokens`` or into packs longer
    than ``max_length``: the collator would otherwise drop every document that no longer fits, batch after batch,
    with only per-batch warnings. For a corpus without packing statistics, its first ``sample`` packs tell: each
    ``lengths`` entry is the document's positions at the corpus' image-token count, so with the same tokenizer
    ``stored - this run's length`` is the same for every document; without ``lengths``, the packs are measured."""
    run_tokens = collator.num_image_tokens
    implied, capacity, longest_here = set(), None, 0
    rows = _first_packs(dataset, sample)
    for row in rows:
        lengths, positions = row.get("lengths"), 0
        for index, text in enumerate(row.get("texts") or []):
            if not isinstance(text, str) or not text.strip():
                continue  # a bad document: the collator drops it, counted
            try:
                here = len(collator.document_ids([text])[0])
            except ValueError:  # an image placeholder in the caption: dropped too
                continue
            positions += here
            if lengths is not None and index < len(lengths):
                implied.add(int(lengths[index]) - here + run_tokens)
        longest_here = max(longest_here, positions)
        if lengths:
            capacity = max(capacity or 0, sum(int(n) for n in lengths))
    # Another tokenizer gives other differences per document: then no verdict on the image tokens.
    packed_for = implied.pop() if len(implied) == 1 else None
    where = f"the lengths column of its first {len(rows)} packs"
    if capacity is None:  # no lengths column: this run's own count
        capacity, where = longest_here, f"its first {len(rows)} packs, tokenized by this run"
    _check_packed_for(name, packed_for, capacity, where, run_tokens, max_length)


def _check_packed_for(name: str, packed_for: int | None, capacity: int | None, where: str, num_image_tokens: int,
                      max_length: int) -> None:
    if packed_for is not None and packed_for != num_image_tokens:
        raise ValueError(
            f"packed corpus {name} was packed for num_image_tokens={packed_for} ({where}), this run uses "
            f"num_image_tokens={num_image_tokens}: every document would take other positions than its pack was cut "
            f"for (with more image tokens the collator drops those that no longer fit). Set --num_image_tokens "
            f"{packed_for}, or pack the corpus again with --num-image-tokens {num_image_tokens}"
        )
    if capacity is not None and capacity > max_length:
        raise ValueError(
            f"packed corpus {name} holds packs of up to {capacity} positions ({where}), over this run's "
            f"max_length={max_length}: the collator would drop the documents past {max_length} in every longer "
            f"pack. Set --max_length {capacity} (or more), or pack the corpus again with --capacity {max_length}"
        )


class GlobalMicroBatchSampler(Sampler[list[int]]):
    """Yields this process's pack indices for every global micro-batch from ``start`` on, epoch after epoch."""

    def __init__(self, num_rows: int, per_device: int, rank: int, world: int, seed: int, shuffle: bool,
                 start: int = 0):
        self.num_rows, self.per_device, self.rank, self.world = num_rows, per_device, rank, world
        self.seed, self.shuffle, self.start = seed, shuffle, start
        self.global_size = per_device * world
        self.per_epoch = num_rows // self.global_size
        if self.per_epoch == 0:
            raise ValueError(f"the corpus has {num_rows} packs, fewer than one global micro-batch "
                             f"({world} processes x {per_device} packs)")

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_rows))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_rows, generator=generator).tolist()

    def indices(self, micro_batch: int) -> list[int]:
        """Pack indices of this process for the global micro-batch number ``micro_batch`` (0-based, all epochs)."""
        epoch, offset = divmod(micro_batch, self.per_epoch)
        order = self.epoch_order(epoch)
        begin = offset * self.global_size + self.rank * self.per_device
        return order[begin:begin + self.per_device]

    def __iter__(self) -> Iterator[list[int]]:
        micro_batch = self.start
        order_epoch, order = None, None
        while True:
            epoch, offset = divmod(micro_batch, self.per_epoch)
            if epoch != order_epoch:
                order_epoch, order = epoch, self.epoch_order(epoch)
            begin = offset * self.global_size + self.rank * self.per_device
            yield order[begin:begin + self.per_device]
            micro_batch += 1

    def __len__(self) -> int:  # per epoch; iteration itself does not stop
        return self.per_epoch


class DecodeTolerantRows(torch.utils.data.Dataset):
    """A map-style corpus whose rows come back undecoded when one of their images cannot be decoded.

    ``datasets`` decodes every image of a row on access, so one corrupt image would fail the whole row (and the
    run). Such a row is read again as stored (images as ``{"bytes", "path"}``) and the collator drops just the
    documents whose image is bad, counted and logged with their uids.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self._undecoded = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            return self.dataset[index]
        except DECODE_ERRORS as error:
            logger.warning("pack %d: an image fails to decode (%s); reading the pack undecoded", index, error)
            if self._undecoded is None:
                self._undecoded = self.dataset.with_format("arrow")  # no feature decoding
            return self._undecoded[index].to_pylist()[0]


# The signals the trainer turns into "checkpoint after this step" (Slurm sends them to the whole process group).
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGTERM/SIGUSR1. Slurm signals the whole process group; a worker
    killed by it would make the main process fail with "DataLoader worker ... killed by signal" before it can
    checkpoint. The main process coordinates the stop and shuts the workers down itself."""
    for name in STOP_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None:
            signal.signal(number, signal.SIG_IGN)


class MapStyleMicroBatches:
    """Micro-batches of a map-style corpus; position = global micro-batches consumed."""

    def __init__(self, dataset, collate_fn, per_device: int, rank: int, world: int, seed: int, shuffle: bool,
                 num_workers: int = 0):
        self.dataset, self.collate_fn = dataset, collate_fn
        self.per_device, self.rank, self.world = per_device, rank, world
        self.seed, self.shuffle, self.num_workers = seed, shuffle, num_workers
        self.position = 0
        probe = GlobalMicroBatchSampler(len(dataset), per_device, rank, world, seed, shuffle)
        self.micro_batches_per_epoch = probe.per_epoch
        self.dropped_per_epoch = len(dataset) - probe.per_epoch * probe.global_size
        if self.dropped_per_epoch and rank == 0:
            logger.warning("%d of %d packs do not fill a last global micro-batch of %d and are skipped each epoch",
                           self.dropped_per_epoch, len(dataset), probe.global_size)

    def state_dict(self) -> dict:
        return {"kind": "map", "micro_batches": self.position, "per_device": self.per_device, "world": self.world,
                "seed": self.seed, "shuffle": self.shuffle, "num_rows": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "map":
            raise ValueError("the checkpoint's data position is not from a map-style corpus")
        for key in ("num_rows", "seed", "shuffle"):
            if state[key] != self.state_dict()[key]:
                raise ValueError(f"the checkpoint's data position was made with {key}={state[key]!r}, "
                                 f"this run has {self.state_dict()[key]!r}")
        if state["per_device"] * state["world"] != self.per_device * self.world:
            raise ValueError(f"the checkpoint's global micro-batch is {state['per_device'] * state['world']} packs, "
                             f"this run's is {self.per_device * self.world}")
        self.position = int(state["micro_batches"])

    def epoch_of(self, state: dict) -> float:
        """Epochs completed, fractional (as transformers' Trainer reports it)."""
        return round(state["micro_batches"] / self.micro_batches_per_epoch, 4)

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        sampler = GlobalMicroBatchSampler(len(self.dataset), self.per_device, self.rank, self.world, self.seed,
                                          self.shuffle, start=self.position)
        loader = DataLoader(DecodeTolerantRows(self.dataset), batch_sampler=sampler, collate_fn=self.collate_fn,
                            num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                            worker_init_fn=ignore_stop_signals if self.num_workers else None)
        for batch in loader:
            self.position += 1
            yield batch, self.state_dict()


class StreamingMicroBatches:
    """Micro-batches of a streaming corpus, read and collated ahead in a thread; exact position per micro-batch."""

    def __init__(self, dataset, collate_fn, per_device: int, rank: int, world: int, prefetch: int = 4):
        from datasets.distributed import split_dataset_by_node

        self.dataset = split_dataset_by_node(dataset, rank=rank, world_size=world) if world > 1 else dataset
        self.collate_fn, self.per_device, self.rank, self.world = collate_fn, per_device, rank, world
        self.prefetch = prefetch
        self.epoch = 0
        self._state = {"kind": "stream", "epoch": 0, "dataset": None, "world": world, "per_device": per_device}

    def state_dict(self) -> dict:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "stream":
            raise ValueError("the checkpoint's data position is not from a streaming corpus")
        if (state["world"], state["per_device"]) != (self.world, self.per_device):
            raise ValueError(f"a streaming position resumes only with the same processes x batch: checkpoint "
                             f"{state['world']} x {state['per_device']}, this run {self.world} x {self.per_device}")
        self._state = copy.deepcopy(state)

    def epoch_of(self, state: dict) -> int:
        """The epoch being read (the stream's length is unknown, so no fraction)."""
        return state["epoch"]

    @staticmethod
    def _put(out: queue.Queue, stop: threading.Event, item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        try:
            epoch, resume = self._state["epoch"], self._state["dataset"]
            while not stop.is_set():
                self.dataset.set_epoch(epoch)
                # load_state_dict also sets where every later iteration starts: reset it for a new epoch.
                self.dataset.load_state_dict(resume if resume is not None else self._fresh_state)
                rows, produced = [], 0
                for row in self.dataset:
                    rows.append(row)
                    if len(rows) < self.per_device:
                        continue
                    state = {"kind": "stream", "epoch": epoch, "dataset": self.dataset.state_dict(),
                             "world": self.world, "per_device": self.per_device}
                    if not self._put(out, stop, (self.collate_fn(rows), state)):
                        return
                    rows, produced = [], produced + 1
                if rows:
                    logger.warning("process %d: %d packs at the end of epoch %d do not fill a micro-batch; skipped",
                                   self.rank, len(rows), epoch)
                if produced == 0 and resume is None:
                    raise ValueError(f"process {self.rank} read a whole epoch of the stream without filling one "
                                     f"micro-batch of {self.per_device} packs")
                resume = None
                epoch += 1
        except BaseException as error:  # surface reader/collator errors in the training loop
            self._put(out, stop, error)

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        self._fresh_state = copy.deepcopy(self.dataset.state_dict())
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(out, stop), daemon=True, name="stream-reader")
        thread.start()
        try:
            while True:
                item = out.get()
                if isinstance(item, BaseException):
                    raise item
                batch, state = item
                self._state = state
                yield batch, copy.deepcopy(state)
        finally:
            stop.set()
            thread.join(timeout=5)


__all__ = ["DecodeTolerantRows", "GlobalMicroBatchSampler", "MapStyleMicroBatches", "STOP_SIGNALS",
           "StreamingMicroBatches", "check_dataset_source", "check_first_packs", "check_packing_stats",
           "ignore_stop_signals", "load_packed_corpus", "packing_stats"]
