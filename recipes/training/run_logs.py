"""Machine-readable run logs next to the trackers: one JSON line per optimizer step.

``<output_dir>/metrics.jsonl``: step, epoch, loss, lr, grad_norm, tokens (real, all processes), tokens_per_s,
tflops_per_s (model FLOPs, all processes), mfu (when the device peak is known), seconds.
``<output_dir>/samples.jsonl`` (``log_sample_uids``): step and the uids of every document trained on in that step.

On resume, lines after the checkpoint's step (written by the interrupted run past its last checkpoint) are dropped,
so the files hold exactly one line per step of the combined run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..json_lines import read_json_lines

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# The run folder's other files that readers outside the loop need (the release tool's model card).
FINAL_MODEL = "final_model"
RESOLVED_CONFIG = "pretrain_config.yaml"
SAMPLES_FILE = "samples.jsonl"
# The SFT recipe's record of every Trainer log (recipes/sft.py), read by the demo's report and the release tool's card.
SFT_TRAINING_LOG = "training_log.jsonl"


class JsonLinesLog:
    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> int:
        """Keep lines with ``step <= step``; returns how many were dropped. A line that does not parse (the torn
        last write of a killed process, or a full disk) is dropped with a warning instead of failing the resume."""
        if not self.enabled or not self.path.is_file():
            return 0
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [line for line, record in read_json_lines(self.path) if record["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        return len(lines) - len(kept)

    def reset(self) -> None:
        if self.enabled and self.path.exists():
            self.path.unlink()

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a JSON-lines log (for plots and tests)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


__all__ = ["FINAL_MODEL", "JsonLinesLog", "METRICS_FILE", "RESOLVED_CONFIG", "SAMPLES_FILE", "SFT_TRAINING_LOG", "read_jsonl"]
