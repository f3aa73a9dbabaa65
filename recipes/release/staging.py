"""The staging folder a repository is assembled in: made empty and marked only where that is safe, filled by
copying, and checked for absolute paths of this machine before anything is published."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .errors import ReleaseError

# Written into every staging folder this tool makes: only such a folder is ever deleted (never uploaded).
STAGING_MARKER = ".open-qwen2vl-release-staging"
# Staged text files scanned for local absolute paths; vocabulary files hold token strings, not paths.
TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".yaml", ".yml", ".txt")
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "merges.txt")


def prepare_staging(folder: Path, staging: Path) -> None:
    """Make ``staging`` an empty folder marked as this tool's. Refuses a staging folder that is, contains or lies
    inside ``folder`` (emptying it would delete what is being released), and deletes an existing folder only when it
    holds the marker this tool writes: anything else may be someone's data."""
    folder, staging = folder.resolve(), staging.resolve()
    if staging == folder or staging in folder.parents or folder in staging.parents:
        raise ReleaseError(f"staging folder {staging} is, contains or lies inside the released folder {folder}; "
                           "pick a separate --staging")
    if (staging / STAGING_MARKER).is_file():
        shutil.rmtree(staging)
    elif staging.exists() and (not staging.is_dir() or any(staging.iterdir())):
        raise ReleaseError(f"staging folder {staging} exists, is not empty and was not made by this tool; "
                           "remove it or pick another --staging")
    staging.mkdir(parents=True, exist_ok=True)
    (staging / STAGING_MARKER).write_text("made by python -m recipes.release; emptied by the next release\n")


def _local_paths(folder: Path) -> list[str]:
    """Absolute paths of this machine that must not appear in a pushed file: the released folder and its parents
    down to the home folder (never a bare top-level folder such as /tmp), the working folder and the home folder."""
    home = Path.home().resolve()
    paths = {folder.resolve(), Path.cwd().resolve()}
    for parent in folder.resolve().parents:
        if parent == home:
            break
        paths.add(parent)
    paths = {p for p in paths if len(p.parts) > 2}
    if len(home.parts) > 1:
        paths.add(home)
    return sorted(map(str, paths), key=len, reverse=True)


def check_no_local_paths(staging: Path, folder: Path) -> None:
    """Refuse when a staged text file holds an absolute path of this machine (the released folder, its parents,
    the working or home folder): it would be published with the repository."""
    patterns = [(p, re.compile(r"(?<![\w.-])" + re.escape(p) + r"(?![\w.-])")) for p in _local_paths(folder)]
    for path in sorted(staging.rglob("*")):
        if not path.is_file() or path.suffix not in TEXT_SUFFIXES or path.name in VOCABULARY_FILES:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for local, pattern in patterns:
            if pattern.search(text):
                raise ReleaseError(f"{path.relative_to(staging)} contains the local path {local}: it would be "
                                   "published; remove it from the file before releasing")


def copy_matching(source: Path, staging: Path, patterns: tuple[str, ...]) -> list[str]:
    """Copy the files of ``source`` matching the kit's glob ``patterns`` (never its README.md: the card is built)."""
    copied = [str(path.relative_to(source)) for pattern in patterns for path in sorted(source.glob(pattern))
              if path.is_file() and path.name != "README.md"]
    copy_files(source, staging, copied)
    return copied


def included_files(source: Path, patterns: list[str]) -> list[str]:
    """The files of ``source`` (paths relative to it) that the user's ``--include`` patterns name, matched as
    upload_folder's ``allow_patterns`` (fnmatch; a trailing ``/`` means the whole folder). A pattern that matches no
    file is refused: it is a typo, and the release would silently lack what the user asked for."""
    from huggingface_hub.utils import filter_repo_objects

    if not patterns:  # a corpus folder can hold many files: walk it only when asked to
        return []
    files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    for pattern in patterns:
        if not list(filter_repo_objects(files, allow_patterns=[pattern])):
            raise ReleaseError(f"--include {pattern!r} matches no file in {source}")
    return list(filter_repo_objects(files, allow_patterns=patterns))


def copy_files(source: Path, staging: Path, names: list[str]) -> None:
    """Copy ``names`` (paths relative to ``source``) into ``staging`` at the same relative paths; a symlink is
    copied as the file it points to (what upload_folder would upload)."""
    for name in names:
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, target)
