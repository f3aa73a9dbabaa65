"""Predictions written as they are made, so an interrupted evaluation (a preempted job, a crash) resumes where it
stopped instead of generating every answer again.

``<output>/.partial/settings.json`` records what the predictions depend on (model, prompt format, token budget...);
``<output>/.partial/<benchmark>.rank<k>.jsonl`` holds ``{"row": index, "output": ...}`` lines appended chunk by
chunk by process ``k``. Rows are keyed by their index in the benchmark, so a resumed run may use another number of
processes. The folder is removed once the reports are written.
"""

from __future__ import annotations

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

    def append(self, benchmark: str, predictions: list[tuple[int, Any]]) -> None:
        if not predictions:
            return
        with (self.folder / f"{benchmark}.rank{self.rank}.jsonl").open("a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps({"row": row, "output": output}) + "\n" for row, output in predictions))
            handle.flush()

    def done(self, benchmark: str) -> dict[int, Any]:
        """Row index -> output of every prediction already made for ``benchmark`` (by any process)."""
        found = {}
        for path in sorted(self.folder.glob(f"{benchmark}.rank*.jsonl")):
            for _, record in read_json_lines(path):  # a torn last write is skipped: predicted again
                found[int(record["row"])] = record["output"]
        return found


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


__all__ = ["PARTIAL_DIR", "PredictionSpool", "close_spool", "open_spool"]
