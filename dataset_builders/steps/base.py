"""Shared behaviour of the kit's datatrove steps: counted, logged drops with the accounting labels."""

from __future__ import annotations

from collections import Counter

from datatrove.pipeline.base import PipelineStep
from datatrove.utils.logging import logger

from ..accounting import DROPPED, EVENT, KEPT, READ, RECLASSIFIED

# Each task logs the first few drops of every reason with the sample and shard, then only counts.
LOGGED_DROPS_PER_REASON = 20


class CountingStep(PipelineStep):
    """A PipelineStep that counts ``read`` / ``kept`` / ``dropped/<reason>`` / ``event/<name>`` /
    ``reclassified/<reason>`` (see accounting)."""

    def __init__(self):
        super().__init__()
        self._logged: Counter = Counter()

    def count_read(self, value: int = 1) -> None:
        if value:
            self.stat_update(READ, value=value)

    def count_kept(self, value: int = 1) -> None:
        if value:
            self.stat_update(KEPT, value=value)

    def count_event(self, name: str, value: int = 1) -> None:
        if value:
            self.stat_update(EVENT + name, value=value)

    def reclassify(self, reason: str, value: int) -> None:
        """Count ``value`` samples an earlier task of the stage counted as kept as dropped for ``reason``."""
        if value:
            self.stat_update(RECLASSIFIED + reason, value=value)

    def drop(self, reason: str, where: str = "", detail: str = "", value: int = 1) -> None:
        """Count ``value`` dropped samples for ``reason``; log the first few with where they were and why."""
        if not value:
            return
        self.stat_update(DROPPED + reason, value=value)
        if self._logged[reason] < LOGGED_DROPS_PER_REASON:
            self._logged[reason] += 1
            last = self._logged[reason] == LOGGED_DROPS_PER_REASON
            suffix = " (further drops for this reason are only counted)" if last else ""
            why = f": {detail}" if detail else ""
            logger.warning(f"{self.name}: dropped {where or 'sample'} ({reason}){why}{suffix}")
