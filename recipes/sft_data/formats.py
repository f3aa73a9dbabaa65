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

  ``content`` may be a string (``<image>`` tags mark images) or a list of ``text``/``image`` parts. ``images``
  holds paths, ``datasets`` Image values or PIL images; without an ``images`` column, the images may sit in their
  parts as in transformers' chat convention (``{"type": "image", "image" | "path" | "url": <local path or PIL
  image>}``). As in TRL, when no message marks an image, the images are placed at the start of the first user
  message.
"""

from __future__ import annotations

import io
import json
import os
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


def image_ref(value: Any, image_root: str | None, sample_id: str) -> dict[str, Any]:
    """Normalise one image (path, ``{"bytes", "path"}`` dict or PIL image) to ``{"bytes", "path"}``."""
    if isinstance(value, (str, os.PathLike)):
        return {"bytes": None, "path": _resolve(str(value), image_root)}
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes"):
            return {"bytes": value["bytes"], "path": value.get("path")}
        if value.get("path"):
            return {"bytes": None, "path": _resolve(value["path"], image_root)}
    try:  # a decoded PIL image (in-memory datasets): keep it losslessly as PNG bytes
        from PIL import Image

        if isinstance(value, Image.Image):
            buffer = io.BytesIO()
            value.save(buffer, format="PNG")
            return {"bytes": buffer.getvalue(), "path": None}
    except ImportError:  # pragma: no cover - PIL is a dependency of the kit
        pass
    raise BadSampleError(sample_id, "bad_image", f"unsupported image value of type {type(value).__name__}")


def _resolve(path: str, image_root: str | None) -> str:
    if image_root and not os.path.isabs(path):
        return os.path.join(image_root, path)
    return path


def _count_markers(content: Any) -> int:
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


def _conversations_to_messages(conversations: list, sample_id: str) -> list[dict]:
    messages = []
    for turn_index, turn in enumerate(conversations or []):
        speaker = turn.get("from")
        role = ROLE_ALIASES.get(str(speaker).lower())
        if role is None:
            raise BadSampleError(sample_id, "bad_role", f"turn {turn_index} is from {speaker!r}; expected "
                                 "human/gpt/system")
        messages.append({"role": role, "content": turn.get("value") or ""})
    return messages


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


IMAGE_PAYLOAD_KEYS = ("image", "path", "url")


def _inline_images(messages: list[dict]) -> list:
    """Images carried inside the image parts of the messages, in order (empty when no part carries one)."""
    found = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if part.get("type") == "image":
                payload = next((part[k] for k in IMAGE_PAYLOAD_KEYS if part.get(k) is not None), None)
                if payload is not None:
                    found.append(payload)
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
        BadSampleError: unknown role, no assistant turn, an empty assistant turn, a different number of image
            markers and images, or (``check_files``) an image file that does not exist.
    """
    fallback_id = f"row {index}" if index is not None else "row ?"
    if data_format == "mammoth_split":
        sample_id = str(row.get("path") or fallback_id)
        row = read_split_sample(sample_dir or ".", row["path"], sample_id)
        data_format = "mammoth"
    raw_id = row.get("id")
    sample_id = str(raw_id) if raw_id not in (None, "") else fallback_id
    if data_format in ("llava", "mammoth"):
        messages = _conversations_to_messages(row.get("conversations"), sample_id)
        images = _as_list(row.get("image", row.get("images")))
    elif data_format == "messages":
        messages = [{"role": ROLE_ALIASES.get(m.get("role"), m.get("role")), "content": m.get("content")}
                    for m in row.get("messages") or []]
        images = _as_list(row.get("images", row.get("image")))
        if not images:  # transformers' chat convention: the image inside its part ({"type": "image", "image": ...})
            images = _inline_images(messages)
        unknown = sorted({m["role"] for m in messages} - {"user", "assistant", "system"})
        if unknown:
            raise BadSampleError(sample_id, "bad_role", f"unsupported message role(s) {unknown}")
        if images and sum(_count_markers(m["content"]) for m in messages) == 0:
            from trl.data_utils import prepare_multimodal_messages  # TRL's convention for unmarked images

            messages = prepare_multimodal_messages(messages, images=[None] * len(images))
    else:
        raise ValueError(f"unknown SFT data format {data_format!r}; expected one of {FORMATS}")

    messages = _strip_image_payloads(messages)
    _check_turns(messages, sample_id)
    markers = sum(_count_markers(m["content"]) for m in messages)
    if markers != len(images):
        raise BadSampleError(sample_id, "image_count_mismatch",
                             f"{markers} {IMAGE_MARKER} marker(s) in the text but {len(images)} image(s)")
    refs = [image_ref(image, image_root, sample_id) for image in images]
    if check_files:
        for ref in refs:
            if ref["bytes"] is None and not os.path.isfile(ref["path"]):
                raise BadSampleError(sample_id, "missing_image", f"image file {ref['path']} does not exist")
    return SFTSample(sample_id=sample_id, messages=messages, images=refs)


def _check_turns(messages: list[dict], sample_id: str) -> None:
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant_turns:
        raise BadSampleError(sample_id, "no_assistant_turn", "the conversation has no assistant turn to learn from")
    for i in assistant_turns:
        if not content_text(messages[i]["content"]).strip():
            raise BadSampleError(sample_id, "empty_assistant_turn", f"assistant turn (message {i}) is empty")
