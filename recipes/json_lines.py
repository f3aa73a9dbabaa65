"""Reading the JSON-lines files that runs append to (metrics, skip spools, prediction spools).

A process killed mid-write leaves at most a torn last line; readers skip such a line with a warning (its record is
recomputed or re-counted by the run that resumes) instead of failing the resume.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


def read_json_lines(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield ``(line, record)`` for every parseable non-blank line of ``path``; torn lines are logged and skipped."""
    path = Path(path)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s line %d is not valid JSON (an interrupted write?); ignoring it", path, number)
            continue
        yield line, record
