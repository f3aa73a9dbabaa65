"""The converter's error type and the key listings its messages use (kit-only, not copied into checkpoints)."""

from __future__ import annotations

from collections.abc import Iterable

# Checkpoints have thousands of keys; a message names the first ones and counts the rest.
MAX_LISTED_KEYS = 25


class CheckpointError(ValueError):
    """A checkpoint or weight file that cannot be converted; the message names the file and the offending keys."""


def format_keys(keys: Iterable[str], limit: int = MAX_LISTED_KEYS) -> str:
    """``[a, b, ... (N more)] (M keys)``: the first ``limit`` keys and the total, for error and log messages."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''}] ({len(keys)} keys)"
