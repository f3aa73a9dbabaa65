"""Predictions written as they are made, so an interrupted evaluation (a preempted job, a crash) resumes where it
stopped instead of generating every answer again.

``<output>/.partial/settings.json`` records what the predictions depend on (model, prompt format, token budget...);
``<output>/.partial/<benchmark>.rank<k>.jsonl`` holds ``{"row": index, "key": ..., "output": ...}`` lines appended
chunk by chunk by process ``k``. Rows are keyed by their index in the benchmark, so a resumed run may use another
number of processes; ``key`` (``sample_key``: the row's id and prompt) must also match for a prediction to be reused,
so a row whose data changed in between (a fixed benchmark file) is predicted again. The folder is removed once the
reports are written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from ..json_lines import read_json_lines

logger = logging.getLogger(__name__)

PARTIAL_DIR = ".partial"
SETTINGS_FILE = "settings.json"


class PredictionSpool:
    """Appends each process's finished predictions and reads back every process's, for one output folder."""

    def __init__(self, folder: Path, rank: int):
        self.folder = Path(folder)
        self.rank = rank

    def append(self, benchmark: str, predictions: list[tuple[int, str, Any]]) -> None:
        """Append ``(row index, sample key, output)`` records for ``benchmark``."""
        if not predictions:
            return
        path = self.folder / f"{benchmark}.rank{self.rank}.jsonl"
        # A kill mid-write can leave a torn last line without its newline: start on a fresh line, or the first
        # record written now would be glued to the torn one and lost with it.
        torn = path.is_file() and path.stat().st_size > 0 and _last_byte(path) != b"\n"
        with path.open("a", encoding="utf-8") as handle:
            handle.write(("\n" if torn else "")
                         + "".join(json.dumps({"row": row, "key": key, "output": output}) + "\n"
                                   for row, key, output in predictions))
            handle.flush()

    def done(self, benchmark: str) -> dict[int, tuple[str | None, Any]]:
        """Row index -> (sample key, output) of every prediction already made for ``benchmark`` (by any process)."""
        found = {}
        for path in sorted(self.folder.glob(f"{benchmark}.rank*.jsonl")):
            for _, record in read_json_lines(path):  # a torn last write is skipped: predicted again
                found[int(record["row"])] = (record.get("key"), record["output"])
        return found


def sample_key(sample) -> str:
    """What a spooled prediction must still match to be reused: the row's id and its prompt."""
    return hashlib.sha256(f"{sample.sample_id}\0{sample.prompt}".encode()).hexdigest()[:16]


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as handle:
        handle.seek(-1, 2)
        return handle.read(1)


def model_fingerprint(model_id: str) -> dict:
    """What identifies the weights being evaluated, for the ``--resume`` check: a local folder by its resolved path and
    the name, size and modification time of each file in it (so a folder overwritten by a later training run is not
    taken for the one the spooled predictions came from); a Hub id by the snapshot (commit) of the local cache that
    loading it used."""
    path = Path(model_id)
    if path.is_dir():
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())
        digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
        return {"model": str(path.resolve()), "model_files": digest}
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(str(model_id), "config.json")
    return {"model": str(model_id), "model_files": Path(cached).parent.name if isinstance(cached, str) else None}


def open_spool(output: Path, settings: dict, resume: bool, state) -> PredictionSpool:
    """The run's spool. Without ``resume`` earlier predictions are discarded; with it they are reused when they were
    made with the same ``settings``, and a mismatch is an error naming the differences."""
    settings = json.loads(json.dumps(settings, default=str))  # compared in the form it is stored
    folder = Path(output) / PARTIAL_DIR
    settings_file = folder / SETTINGS_FILE
    reuse = resume and settings_file.is_file()
    if reuse:  # checked by every process, so that all of them stop on a mismatch
        recorded = json.loads(settings_file.read_text(encoding="utf-8"))
        differences = {key: (recorded.get(key), value) for key, value in settings.items()
                       if recorded.get(key) != value}
        if differences:
            listed = "; ".join(f"{key}: earlier {old!r}, now {new!r}" for key, (old, new) in differences.items())
            raise ValueError(f"--resume: the predictions in {folder} were made with other settings ({listed}); "
                             "run without --resume to start over")
        logger.info("--resume: reusing the predictions in %s", folder)
    elif state.is_main_process:
        if folder.exists() and not resume:
            logger.info("discarding the predictions of an earlier run in %s (use --resume to reuse them)", folder)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        settings_file.write_text(json.dumps(settings, indent=2), encoding="utf-8")
    state.wait_for_everyone()
    return PredictionSpool(folder, state.process_index)


def close_spool(spool: PredictionSpool, state) -> None:
    """Remove the spool once the reports hold every prediction."""
    state.wait_for_everyone()
    if state.is_main_process:
        shutil.rmtree(spool.folder, ignore_errors=True)


__all__ = ["PARTIAL_DIR", "PredictionSpool", "close_spool", "model_fingerprint", "open_spool", "sample_key"]
