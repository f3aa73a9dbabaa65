"""The converter's error type and the key listings its messages use (kit-only, not copied into checkpoints)."""

from __future__ import annotations

from collections.abc import Iterable

# Checkpoints have thousands of keys; a message names the first ones and counts the rest.
MAX_LISTED_KEYS = 25


class CheckpointError(ValueError):
    """An input that cannot be converted (checkpoint, weight file, run config, tokenizer); the message names the
    file and the offending keys."""


class OutputFolderError(CheckpointError):
    """An ``--output`` the converter refuses to write: it is (or holds) an input, or holds another model's files."""


def format_keys(keys: Iterable[str], limit: int = MAX_LISTED_KEYS) -> str:
    """``[a, b, ... (N more)] (M keys)``: the first ``limit`` keys and the total, for error and log messages."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''}] ({len(keys)} keys)"
