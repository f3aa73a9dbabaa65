"""What a release publishes and what it leaves out of the released folder, printed before any upload so that a
dry run shows both: a user's notes or a stray checkpoint folder are named, never silently published or dropped."""

from __future__ import annotations

from pathlib import Path

from .staging import STAGING_MARKER

# Above this many staged files, they are counted per folder (a corpus has thousands of shards).
MAX_LISTED_FILES = 50


def _size(num_bytes: float) -> str:
    for unit in ("B", "kB", "MB"):
        if num_bytes < 1000:
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} GB"


def staged_files(staging: Path) -> dict[str, int]:
    """Repository path -> size of every file the upload sends (the staging folder's marker is never sent)."""
    return {p.relative_to(staging).as_posix(): p.stat().st_size for p in sorted(staging.rglob("*"))
            if p.is_file() and p.name != STAGING_MARKER}


def left_out(folder: Path, staged: set[str], prefix: str = "") -> list[str]:
    """The folder's files that are not staged: a file by its path, a folder without any staged file as
    ``name/ (N files)`` (a Trainer checkpoint folder is one line, not hundreds)."""
    entries = []
    for path in sorted(folder.iterdir()):
        name = prefix + path.name
        if path.is_dir():
            if any(item.startswith(name + "/") for item in staged):
                entries += left_out(path, staged, name + "/")
            else:
                count = sum(1 for p in path.rglob("*") if p.is_file())
                entries.append(f"{name}/ ({count} file{'' if count == 1 else 's'})")
        elif path.is_file() and name not in staged:
            entries.append(name)
    return entries


def _staged_lines(staged: dict[str, int]) -> list[str]:
    if len(staged) <= MAX_LISTED_FILES:
        return [f"  {name}  {_size(size)}" for name, size in staged.items()]
    by_folder: dict[str, list[int]] = {}
    for name, size in staged.items():
        by_folder.setdefault(name.rpartition("/")[0] + "/" if "/" in name else name, []).append(size)
    return [f"  {name}  {len(sizes)} files, {_size(sum(sizes))}" if name.endswith("/") else
            f"  {name}  {_size(sizes[0])}" for name, sizes in by_folder.items()]


def release_listing(folder: Path, staging: Path, repo_id: str, kind: str) -> str:
    """The staged files with their sizes and the folder's files left out (with how to publish them)."""
    staged = staged_files(staging)
    lines = [f"staged for {kind} repository {repo_id}: {len(staged)} files, {_size(sum(staged.values()))}"]
    lines += _staged_lines(staged)
    skipped = left_out(folder, set(staged))
    if skipped:
        lines.append(f"left out of the release (not part of a {kind} repository; --include PATTERN publishes "
                     f"them): {', '.join(skipped)}")
    return "\n".join(lines)
