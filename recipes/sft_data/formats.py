"""Raw SFT rows (LLaVA-665k, MAmmoTH-VL, TRL messages+images) -> one canonical sample.

Accepted layouts (one JSON object per sample; JSON array, JSONL or parquet files, or a `datasets` folder/repo):

* ``llava`` (LLaVA-1.5 ``llava_v1_5_mix665k.json``)::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

  ``image`` is a path relative to ``--image_root`` (or a list of paths for multi-image samples), absent for
  text-only samples. Every image needs exactly one ``<image>`` tag in the human turns.
* ``mammoth`` (MAmmoTH-VL-Instruct ``mammoth_si_10M.json``): the LLaVA layout plus a ``source`` field; image paths
  relative to the extracted ``single_image_data`` folder.
* ``mammoth_split`` (the original Open-Qwen2VL preparation of MAmmoTH-VL): an index JSONL of
  ``{"path": "<file>.json", "length": int}`` rows, each file holding one sample in the ``mammoth`` layout, read
  lazily from ``--sample_dir``.
* ``messages`` (TRL's standard format)::

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]},
                  {"role": "assistant", "content": "A circle."}],
     "images": ["images/0.png"]}

  ``content`` may be a string (``<image>`` tags mark images) or a list of parts, the part types transformers'
  ``apply_chat_template`` takes for images and text: ``{"type": "text", "text": str}``, ``{"type": "image"}`` and
  OpenAI's ``{"type": "image_url", "image_url": {"url": ...}}`` (read as an image part, as transformers does). Any
  other part (``input_text``, no ``type``, a plain string) or content (null, a number), and a message with
  ``tool_calls``, ``reasoning_content`` or ``thinking`` (text the templates do not render), is a ``bad_content``
  error.
  ``images`` holds paths, ``datasets`` Image values or PIL images; without an ``images`` column, the images may
  sit in their parts as in transformers' chat convention (``{"type": "image", "image" | "path" | "url" | "base64":
  ...}``). An image given as a string is a local path (relative to ``--image_root``), a ``file://`` URL or a
  ``data:`` URI; web (``http(s)://``) addresses are not fetched (a ``remote_image`` error). As in TRL, when no
  message marks an image, the images are placed at the start of the first user message (whose content must then
  be a string; otherwise an ``image_count_mismatch`` error).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadSampleError

IMAGE_MARKER = "<image>"
FORMATS = ("llava", "mammoth", "mammoth_split", "messages")
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class SFTSample:
    """One conversation: ``messages`` as the chat template expects them, images in order of their markers.

    ``images`` holds image references ``{"bytes": bytes | None, "path": str | None}`` (the layout of a
    ``datasets.Image(decode=False)`` value); nothing is decoded here.
    """

    sample_id: str
    messages: list[dict[str, Any]]
    images: list[dict[str, Any]] = field(default_factory=list)


def detect_format(row: dict) -> str:
    """The layout of one raw row (``llava``, ``mammoth``, ``mammoth_split`` or ``messages``)."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "mammoth" if "source" in row else "llava"
    if "path" in row and "length" in row:
        return "mammoth_split"
    raise ValueError(
        f"cannot tell the SFT data layout from the columns {sorted(row)}; expected `messages` (+ `images`), "
        "`conversations` (LLaVA / MAmmoTH-VL) or `path` + `length` (MAmmoTH-VL split index)"
    )


PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})  # what PIL writes as PNG losslessly


def image_ref(value: Any, image_root: str | None, sample_id: str) -> dict[str, Any]:
    """Normalise one image (path, ``{"bytes", "path"}`` dict or PIL image) to ``{"bytes", "path"}``."""
    if isinstance(value, (str, os.PathLike)):
        return _string_image_ref(str(value), image_root, sample_id)
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes"):
            return {"bytes": value["bytes"], "path": value.get("path")}
        if value.get("path"):
            return _string_image_ref(value["path"], image_root, sample_id)
    try:  # a decoded PIL image (in-memory datasets): keep it losslessly as PNG bytes
        from PIL import Image

        if isinstance(value, Image.Image):
            if value.mode not in PNG_MODES:  # e.g. CMYK JPEGs: PNG cannot hold them; the collator makes RGB anyway
                from dataset_builders.images import to_rgb

                value = to_rgb(value)
            buffer = io.BytesIO()
            try:
                value.save(buffer, format="PNG")
            except (OSError, ValueError) as error:
                raise BadSampleError(sample_id, "bad_image", f"cannot keep the {value.mode} image: {error}") from None
            return {"bytes": buffer.getvalue(), "path": None}
    except ImportError:  # pragma: no cover - PIL is a dependency of the kit
        pass
    raise BadSampleError(sample_id, "bad_image", f"unsupported image value of type {type(value).__name__}")


def _string_image_ref(value: str, image_root: str | None, sample_id: str) -> dict[str, Any]:
    """A local path, ``file://`` URL or ``data:`` URI -> ``{"bytes", "path"}``; web addresses are refused (the kit
    trains offline, and a fetch per sample and epoch would be slow and unrepeatable)."""
    if value.startswith(("http://", "https://")):
        raise BadSampleError(sample_id, "remote_image", f"image {value} is a web address; the kit reads local images "
                             "only (download the images and give their paths)")
    if value.startswith("data:"):
        header, _, payload = value.partition(",")
        if not header.endswith(";base64"):
            raise BadSampleError(sample_id, "bad_image", f"data URI {value[:40]!r}... is not base64-encoded")
        return {"bytes": _base64_bytes(payload, sample_id), "path": None}
    if value.startswith("file://"):
        value = urllib.parse.unquote(value[len("file://"):])
    return {"bytes": None, "path": _resolve(value, image_root)}


def _base64_bytes(payload: Any, sample_id: str) -> bytes:
    if not isinstance(payload, str):
        raise BadSampleError(sample_id, "bad_image", f"base64 image data is a {type(payload).__name__}, not a string")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)  # MIME base64 may wrap lines
    except (binascii.Error, ValueError) as error:
        raise BadSampleError(sample_id, "bad_image", f"image data is not valid base64: {error}") from None


def _resolve(path: str, image_root: str | None) -> str:
    if image_root and not os.path.isabs(path):
        return os.path.join(image_root, path)
    return path


def count_image_markers(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return content.count(IMAGE_MARKER)
    total = 0
    for part in content:
        if part.get("type") == "image":
            total += 1
        elif part.get("type") == "text":
            total += (part.get("text") or "").count(IMAGE_MARKER)
    return total


def content_text(content: Any) -> str:
    """The text of a message (image parts ignored), for emptiness checks."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content.replace(IMAGE_MARKER, "")
    return "".join((p.get("text") or "") for p in content if p.get("type") == "text").replace(IMAGE_MARKER, "")


def _describe(value: Any) -> str:
    """A wrong value, for an error message: ``null`` or its type and the start of its repr."""
    return "null" if value is None else f"a {type(value).__name__} ({value!r:.40})"


def _conversations_to_messages(conversations: Any, sample_id: str) -> list[dict]:
    if conversations is not None and not isinstance(conversations, list):
        raise BadSampleError(sample_id, "bad_content", f"`conversations` is {_describe(conversations)}; expected a "
                             "list of {from, value} turns")
    messages = []
    for turn_index, turn in enumerate(conversations or []):
        if not isinstance(turn, dict):
            raise BadSampleError(sample_id, "bad_content", f"turn {turn_index} is {_describe(turn)}; expected a "
                                 "{from, value} object")
        speaker = turn.get("from")
        role = ROLE_ALIASES.get(str(speaker).lower())
        if role is None:
            raise BadSampleError(sample_id, "bad_role", f"turn {turn_index} is from {speaker!r}; expected "
                                 "human/gpt/system")
        value = turn.get("value")
        if not isinstance(value, str):  # a null or a number would lose the turn or crash the chat template
            raise BadSampleError(sample_id, "bad_content", f"turn {turn_index} ({speaker}): value is "
                                 f"{_describe(value)}; expected a string")
        messages.append({"role": role, "content": value})
    return messages


# What transformers' apply_chat_template takes for a VLM without video/audio (image_url is normalised to image).
PART_TYPES = ("text", "image", "image_url")
# Message fields of TRL / transformers chat data that carry text the kit's templates never render.
UNRENDERED_KEYS = ("tool_calls", "reasoning_content", "thinking")


def _checked_message(message: Any, index: int, sample_id: str) -> dict:
    """One ``messages`` entry as the templates take it: ``role`` and a string or a list of ``text``/``image``
    parts (OpenAI's ``image_url`` part becomes ``{"type": "image", "url": ...}``, as in transformers). Anything the
    template would drop or crash on is a ``bad_content`` error naming the sample."""
    if not isinstance(message, dict):
        raise BadSampleError(sample_id, "bad_content", f"message {index} is {_describe(message)}; expected a "
                             "{role, content} object")
    role = ROLE_ALIASES.get(message.get("role"), message.get("role"))
    content = message.get("content")
    where = f"message {index} ({role})"
    unrendered = [key for key in UNRENDERED_KEYS if message.get(key)]
    if unrendered:  # only role and content are rendered: this text would vanish from training without a trace
        raise BadSampleError(sample_id, "bad_content", f"{where} has {', '.join(unrendered)}, which the kit's chat "
                             "templates do not render; write it into the content, or leave such conversations out")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise BadSampleError(sample_id, "bad_content", f"{where}: content is {_describe(content)}; expected a "
                             "string or a list of parts")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in PART_TYPES:
            shown = f"has type {kind!r}" if isinstance(part, dict) else f"is {_describe(part)}"
            raise BadSampleError(sample_id, "bad_content", f"{where}: part {j} {shown}; supported parts: "
                                 "{'type': 'text', 'text': ...}, {'type': 'image', ...}, {'type': 'image_url', ...}")
        if kind == "text" and not isinstance(part.get("text"), str):
            raise BadSampleError(sample_id, "bad_content", f"{where}: text part {j} has no text string")
        if kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise BadSampleError(sample_id, "bad_content", f"{where}: image_url part {j} has no url")
            part = {"type": "image", "url": url}
        parts.append(part)
    return {"role": role, "content": parts}


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _image_column(row: dict, sample_id: str) -> list:
    """The images of the ``images`` or ``image`` column. ``datasets`` gives a row every column of its file (null
    where the row had none), so the one holding images is taken; both holding some is a conflict (taking one would
    drop the other silently)."""
    found = [(name, _as_list(row.get(name))) for name in ("images", "image")]
    found = [(name, images) for name, images in found if images]
    if len(found) > 1:
        raise BadSampleError(sample_id, "conflicting_images", f"the row has {len(found[0][1])} image(s) in its "
                             f"`images` column and {len(found[1][1])} in its `image` column; give them in one only")
    return found[0][1] if found else []


IMAGE_PAYLOAD_KEYS = ("image", "path", "url", "base64")  # transformers' keys of an image part


def _inline_images(messages: list[dict], sample_id: str) -> list:
    """Images carried inside the image parts of the messages, in order (empty when no part carries one)."""
    found = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if part.get("type") == "image":
                key = next((k for k in IMAGE_PAYLOAD_KEYS if part.get(k) is not None), None)
                if key == "base64" and not str(part[key]).startswith("data:"):
                    found.append({"bytes": _base64_bytes(part[key], sample_id), "path": None})
                elif key is not None:
                    found.append(part[key])
    return found


def _strip_image_payloads(messages: list[dict]) -> list[dict]:
    """Image parts without their payload: the template only needs to know where images go."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [{"type": "image"} if p.get("type") == "image" else p for p in content]
        out.append({"role": message["role"], "content": content})
    return out


def read_split_sample(sample_dir: str, path: str, sample_id: str) -> dict:
    """One per-sample JSON file of the original MAmmoTH-VL split layout."""
    file = Path(sample_dir) / path
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadSampleError(sample_id, "missing_sample_file", f"sample file {file} does not exist") from None
    except (OSError, json.JSONDecodeError) as error:
        raise BadSampleError(sample_id, "bad_sample_file", f"cannot read {file}: {error}") from None


def to_sft_sample(
    row: dict,
    data_format: str,
    image_root: str | None = None,
    index: int | None = None,
    sample_dir: str | None = None,
    check_files: bool = True,
) -> SFTSample:
    """Convert one raw row to an :class:`SFTSample`, checking what can be checked without decoding images.

    Raises:
        BadSampleError: unknown role, content the chat template cannot take (``bad_content``), no assistant turn, an
            empty assistant turn, a different number of image markers and images, images both in the ``images``
            column and inside message parts (``conflicting_images``), a web image address, or
            (``check_files``) an image file that does not exist.
    """
    fallback_id = f"row {index}" if index is not None else "row ?"
    if data_format == "mammoth_split":
        sample_id = str(row.get("path") or fallback_id)
        if not isinstance(row.get("path"), str) or not row["path"]:
            hint = (" (this row is a sample itself: read such a file with --dataset_format mammoth)"
                    if "conversations" in row else "")
            raise BadSampleError(sample_id, "bad_index_row", "a mammoth_split index row needs a `path` to its "
                                 f"sample file, got keys {sorted(row)}{hint}")
        row = read_split_sample(sample_dir or ".", row["path"], sample_id)
        data_format = "mammoth"
    raw_id = row.get("id")
    sample_id = str(raw_id) if raw_id not in (None, "") else fallback_id
    if data_format in ("llava", "mammoth"):
        messages = _conversations_to_messages(row.get("conversations"), sample_id)
        images = _image_column(row, sample_id)
    elif data_format == "messages":
        raw_messages = row.get("messages")
        if raw_messages is not None and not isinstance(raw_messages, list):
            raise BadSampleError(sample_id, "bad_content", f"`messages` is {_describe(raw_messages)}; expected a "
                                 "list of {role, content} objects")
        messages = [_checked_message(m, i, sample_id) for i, m in enumerate(raw_messages or [])]
        images = _image_column(row, sample_id)
        inline = _inline_images(messages, sample_id)  # transformers' convention: {"type": "image", "image": ...}
        if images and inline:  # which set is meant cannot be told, and taking one would drop the other silently
            raise BadSampleError(sample_id, "conflicting_images",
                                 f"the row has {len(images)} image(s) in its `images` column and {len(inline)} "
                                 "inside its message parts; give the images in one place only")
        images = images or inline
        unknown = sorted({m["role"] for m in messages} - {"user", "assistant", "system"})
        if unknown:
            raise BadSampleError(sample_id, "bad_role", f"unsupported message role(s) {unknown}")
        if images and sum(count_image_markers(m["content"]) for m in messages) == 0:
            from trl.data_utils import prepare_multimodal_messages  # TRL's convention for unmarked images

            try:
                messages = prepare_multimodal_messages(messages, images=[None] * len(images))
            except ValueError:  # TRL places them only in a first user message whose content is a string
                raise BadSampleError(sample_id, "image_count_mismatch",
                                     f"no {IMAGE_MARKER} marker or image part in the text but {len(images)} "
                                     "image(s), and the first user message is no plain string to put them in "
                                     "(TRL's convention); mark each image with an image part") from None
    else:
        raise ValueError(f"unknown SFT data format {data_format!r}; expected one of {FORMATS}")

    messages = _strip_image_payloads(messages)
    _check_turns(messages, sample_id)
    markers = sum(count_image_markers(m["content"]) for m in messages)
    if markers != len(images):
        raise BadSampleError(sample_id, "image_count_mismatch",
                             f"{markers} {IMAGE_MARKER} marker(s) in the text but {len(images)} image(s)")
    refs = [image_ref(image, image_root, sample_id) for image in images]
    if check_files:
        for ref in refs:
            if ref["bytes"] is None and not os.path.isfile(ref["path"]):
                raise BadSampleError(sample_id, "missing_image", f"image file {ref['path']} does not exist"
                                     + _image_root_hint(ref["path"], image_root))
    return SFTSample(sample_id=sample_id, messages=messages, images=refs)


def _image_root_hint(path: str, image_root: str | None) -> str:
    """Why a relative path was looked up where it was: without ``--image_root`` it starts from the current folder,
    not from the data file's."""
    if image_root or os.path.isabs(path):
        return ""
    return f" (relative to the current folder {os.getcwd()}: set --image_root to the folder image paths start from)"


def _check_turns(messages: list[dict], sample_id: str) -> None:
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant_turns:
        raise BadSampleError(sample_id, "no_assistant_turn", "the conversation has no assistant turn to learn from")
    for i in assistant_turns:
        if not content_text(messages[i]["content"]).strip():
            raise BadSampleError(sample_id, "empty_assistant_turn", f"assistant turn (message {i}) is empty")
