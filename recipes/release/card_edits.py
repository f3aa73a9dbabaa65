"""What the released cards take from the user: a README.md written by hand in a model folder (kept in the generated
card, never replaced silently), the sections of an earlier released card, and the repo id and the branch of
``--revision`` (loaded by the cards' snippets)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import yaml

from .errors import ReleaseError

# transformers' Trainer (and TRL's, at every checkpoint save) writes a draft card with this tag into output_dir: its
# usage snippet is for a text-generation pipeline, and the facts it holds are in the generated Training section.
TRAINER_CARD_TAG = "generated_from_trainer"
# Metadata of every released model card that the repository depends on (the hub's widget and loading code): a user's
# other value is refused rather than published beside a card that says otherwise.
FIXED_METADATA = {"library_name": "transformers", "pipeline_tag": "image-text-to-text"}
FRONT_MATTER = re.compile(r"---\n(.*?)^---[ \t]*$\n?(.*)", re.DOTALL | re.MULTILINE)
# modeling_open_qwen2vl/model_card.py tags every card the converter writes with it (model_repo.converter_card).
CONVERTER_CARD_TAG = "prismatic-conversion"
# Every card the release tool generates carries this tag: releasing a downloaded release again (after a fine-tune, a
# quantization...) takes back the sections that came from the user and the converter instead of nesting the whole
# earlier card.
RELEASE_CARD_TAG = "open-qwen2vl-release"
# dataset_builders.cards writes it as the first argument of a corpus card's load_dataset snippets (without a
# --path-hint); the released card loads the repository instead.
FOLDER_PLACEHOLDER = "path/to/this/folder"
# The line that opens a released card's Conversion section, before the converter card's body.
CONVERSION_INTRO = ("From the model card the converter wrote "
                    "(`python -m modeling_open_qwen2vl.convert_prismatic_to_hf`):")


def card_section(body: str, title: str) -> str | None:
    """The text under ``## title`` of a card, up to its next ``## `` heading outside code; None without one."""
    lines, in_code, start = body.splitlines(), False, None
    for index, line in enumerate(lines):
        in_code ^= line.startswith("```")
        if in_code or not line.startswith("## "):
            continue
        if start is not None:
            return "\n".join(lines[start:index]).strip()
        if line[3:].strip() == title:
            start = index + 1
    return "\n".join(lines[start:]).strip() if start is not None else None


def _nested(body: str, level: int) -> str:
    """``body`` with its headings moved down so the shallowest one is at ``level`` (code comments left as they are)."""
    lines, in_code, levels = body.splitlines(), False, []
    for line in lines:
        in_code ^= line.startswith("```")
        if not in_code and re.match(r"#{1,6} ", line):
            levels.append(len(line) - len(line.lstrip("#")))
    shift, out, in_code = max(0, level - min(levels, default=level)), [], False
    for line in lines:
        in_code ^= line.startswith("```")
        if not in_code and re.match(r"#{1,6} ", line):
            line = "#" * min(6, shift + len(line) - len(line.lstrip("#"))) + " " + line.lstrip("#").lstrip()
        out.append(line)
    return "\n".join(out).strip()


def _tags(value: object) -> list:
    return value if isinstance(value, list) else [value] if value else []  # YAML allows one tag without a list


def read_card(readme: Path) -> tuple[object, str]:
    """(front-matter metadata ({} without front matter), body) of a card; raises yaml.YAMLError."""
    text = readme.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").lstrip("\ufeff")
    match = FRONT_MATTER.match(text)
    return ((yaml.safe_load(match.group(1)) or {}) if match else {}), (match.group(2) if match else text)


def released_section(folder: Path, title: str) -> str | None:
    """The ``## title`` section of the card this tool released (tagged ``RELEASE_CARD_TAG``) that is ``folder``'s
    README.md, as a downloaded release has it; None for any other README.md or without one."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    try:
        metadata, body = read_card(readme)
    except yaml.YAMLError:  # not a card this tool wrote (user_card refuses it with the reason)
        return None
    if not isinstance(metadata, dict) or RELEASE_CARD_TAG not in _tags(metadata.get("tags")):
        return None
    return card_section(body, title)


def user_card(folder: Path) -> tuple[dict, str] | None:
    """(front-matter metadata, body with its headings under a ``##`` section) of a README.md the user wrote in
    ``folder``; None without one, or when it is a Trainer's draft (``TRAINER_CARD_TAG``) or the converter's card
    (``model_repo.converter_card`` keeps that). Of a card this tool released, only its Notes section."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    try:
        metadata, body = read_card(readme)
    except yaml.YAMLError as err:
        reason = " ".join(str(err).split())  # one line: YAML's own message spans several
        raise ReleaseError(f"{readme} has front matter that is not valid YAML ({reason}); fix it (its text is kept in "
                           "the released card) or move README.md out of the folder") from err
    if not isinstance(metadata, dict):
        raise ReleaseError(f"{readme} front matter is not a mapping of metadata keys; fix it or move README.md out "
                           "of the folder")
    tags = _tags(metadata.get("tags"))
    if TRAINER_CARD_TAG in tags or (CONVERTER_CARD_TAG in tags and RELEASE_CARD_TAG not in tags):
        return None  # a Trainer's draft is replaced; the converter's card is kept by converter_card
    if RELEASE_CARD_TAG in tags:  # a card this tool made: only its Notes came from the user
        body = card_section(body, "Notes") or ""
    conflicts = [f"{key}: {metadata[key]!r} (the release needs {value!r})" for key, value in FIXED_METADATA.items()
                 if key in metadata and metadata[key] != value]
    if conflicts:
        raise ReleaseError(f"{readme} front matter sets {'; '.join(conflicts)}; remove these keys (the rest of the "
                           "card is kept in the released card) or move README.md out of the folder")
    return metadata, _nested(body, 3)


def merged_metadata(ours: dict, theirs: dict) -> dict:
    """The generated card's metadata with the user's (``user_card``): their keys added or taking precedence (a
    license they chose stays theirs), tags joined."""
    merged = {**ours, **{key: value for key, value in theirs.items() if key != "tags"}}
    merged["tags"] = ours["tags"] + [tag for tag in _tags(theirs.get("tags")) if tag not in ours["tags"]]
    return merged


def revision_argument(revision: str | None) -> str:
    """``, revision="<branch>"`` for a loading call, or "" for main: a snippet that loads main would not load what
    a release to another branch uploaded."""
    return f", revision={json.dumps(revision)}" if revision and revision != "main" else ""


def _names_folder(value: str, folder: Path | None) -> bool:
    """Whether a ``load_dataset`` first argument names the released folder: the card writer's placeholder, or the
    folder's path as written (relative to the working folder) or resolved; a packaged builder's name never does."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    if value == FOLDER_PLACEHOLDER:
        return True
    if folder is None or value in _PACKAGED_DATASETS_MODULES or re.match(r"^[a-z][\w+.-]*://", value):
        return False  # a packaged builder ("webdataset") or a URL, even where a folder of that name exists
    try:
        return Path(value).expanduser().resolve() == folder.resolve()
    except (OSError, RuntimeError, ValueError):  # not a path this machine can resolve
        return False


def _edited_loads(code: str, argument: str, repo_id: str | None, folder: Path | None) -> str:
    try:
        tree = ast.parse(code)
    except SyntaxError:  # not Python that can be edited safely (e.g. a <placeholder>): left as written
        return code
    starts = [0]  # byte offset of each line: ast offsets count UTF-8 bytes
    for line in code.split("\n"):
        starts.append(starts[-1] + len(line.encode()) + 1)
    edits = []  # (start, end, replacement) in bytes of the code
    for node in ast.walk(tree):
        func = node.func if isinstance(node, ast.Call) else None
        name = getattr(func, "id", None) or getattr(func, "attr", None)
        first = node.args[0] if name == "load_dataset" and node.args else None
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            continue
        value = first.value
        if repo_id and _names_folder(value, folder):
            edits.append((starts[first.lineno - 1] + first.col_offset,
                          starts[first.end_lineno - 1] + first.end_col_offset, json.dumps(repo_id)))
            value = repo_id
        # the branch is the released repository's (another repository may not have it); without a repo id, any
        # repository id or path (a "/"; a packaged builder such as "webdataset" has none)
        loads_release = value == repo_id if repo_id else "/" in value
        if argument and loads_release and not any(keyword.arg == "revision" for keyword in node.keywords):
            last = max(node.args + node.keywords, key=lambda arg: (arg.end_lineno, arg.end_col_offset))
            end = starts[last.end_lineno - 1] + last.end_col_offset
            edits.append((end, end, argument))
    raw = code.encode()
    for start, end, text in sorted(edits, reverse=True):  # from the end: earlier offsets stay valid
        raw = raw[:start] + text.encode() + raw[end:]
    return raw.decode()


def with_repo_loads(card: str, revision: str | None, repo_id: str | None = None, folder: Path | None = None) -> str:
    """``card`` with the ``load_dataset`` calls of its Python code blocks made to load the released repository:
    a first argument that is the card writer's placeholder or names the local ``folder`` becomes ``repo_id``, and
    ``revision=`` is added to the calls that load ``repo_id`` and name no revision, unless it is main. Without
    ``repo_id``, only ``revision=`` is added, to every call that loads a repository (a first argument with a "/",
    not a packaged builder such as ``"webdataset"``)."""
    argument = revision_argument(revision)
    if not argument and not repo_id:
        return card
    return re.sub(r"^(```python[ \t]*\n)(.*?)(^```)",
                  lambda m: m.group(1) + _edited_loads(m.group(2), argument, repo_id, folder) + m.group(3),
                  card, flags=re.DOTALL | re.MULTILINE)
