"""Synthetic img2dataset-style shards, clean or with every kind of damage web data has, for tests, demos and
benchmarks (no download needed).

``write_shard`` writes raw tar members exactly as given (so it can produce broken shards); ``clean_samples``
makes well-formed samples; ``BAD_SAMPLES`` lists the damaged ones with the drop reason each must produce.
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import tarfile
import zlib
from collections.abc import Iterable

import numpy as np
from PIL import Image

from .uids import derive_uid

COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "brown")
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "rectangle", "ellipse", "cross")
PLACES = ("on a table", "in a field", "on the beach", "at night", "in the snow", "near a river", "on a street")


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def shape_image(rng: random.Random, width: int = 64, height: int = 48) -> Image.Image:
    """A small RGB image: noise background plus a coloured block (varied content so JPEG sizes vary)."""
    array = np.asarray(
        np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, (height, width, 3)), dtype=np.uint8
    )
    x0, y0 = rng.randrange(width // 2), rng.randrange(height // 2)
    array[y0 : y0 + height // 2, x0 : x0 + width // 2] = [rng.randrange(256) for _ in range(3)]
    return Image.fromarray(array, "RGB")


def caption(rng: random.Random) -> str:
    return f"a {rng.choice(COLORS)} {rng.choice(SHAPES)} {rng.choice(PLACES)}"


def sample_members(key: str, image: bytes | None, text: str | bytes | None, meta: dict | None,
                   image_ext: str = "jpg") -> list[tuple[str, bytes]]:
    """Tar members of one sample; any part may be None (missing)."""
    members = []
    if image is not None:
        members.append((f"{key}.{image_ext}", image))
    if text is not None:
        members.append((f"{key}.txt", text.encode("utf-8") if isinstance(text, str) else text))
    if meta is not None:
        members.append((f"{key}.json", json.dumps(meta).encode("utf-8")))
    return members


def write_shard(path: str, members: Iterable[tuple[str, bytes]], truncate_at: int | None = None) -> bytes:
    """Write a tar with exactly these members (names unchecked); ``truncate_at`` cuts the file after that many
    bytes (a corrupt shard). Returns the bytes written."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 946684800
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()[:truncate_at] if truncate_at is not None else buffer.getvalue()
    with open(path, "wb") as handle:
        handle.write(data)
    return data


def clean_sample(rng: random.Random, key: str, *, with_uid: bool = True, size: tuple[int, int] | None = None
                 ) -> tuple[list[tuple[str, bytes]], dict]:
    """Members and metadata row of one well-formed sample."""
    width, height = size or (rng.randrange(32, 96), rng.randrange(32, 96))
    text = caption(rng)
    url = f"https://example.com/{key}.jpg"
    meta = {"key": key, "url": url, "caption": text, "width": width, "height": height, "status": "success"}
    if with_uid:
        meta["uid"] = derive_uid("synthetic", key)
    image = encode(shape_image(rng, width, height), "JPEG", quality=90)
    return sample_members(key, image, text, meta), meta


def write_metadata_parquet(path: str, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = ("key", "uid", "url", "caption", "width", "height", "status")
    pq.write_table(pa.table({c: [row.get(c) for row in rows] for c in columns}), path)


def write_clean_shards(folder: str, num_shards: int, per_shard: int, *, seed: int = 0, parquet: bool = True,
                       size: tuple[int, int] | None = None) -> list[dict]:
    """``num_shards`` clean shards ``00000.tar``... (+ img2dataset parquet); returns all metadata rows in order."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for shard in range(num_shards):
        members, shard_rows = [], []
        for index in range(per_shard):
            sample, meta = clean_sample(rng, f"{shard:05d}{index:04d}", size=size)
            members += sample
            shard_rows.append(meta)
        write_shard(f"{folder}/{shard:05d}.tar", members)
        if parquet:
            write_metadata_parquet(f"{folder}/{shard:05d}.parquet", shard_rows)
        rows += shard_rows
    return rows


# -- damaged inputs -------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def decompression_bomb_png(side: int = 100_000) -> bytes:
    """A few hundred bytes whose header claims ``side`` x ``side`` pixels (valid CRCs, so only the size is wrong)."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b"")


def odd_mode_images() -> dict[str, bytes]:
    """Valid images in modes that need care: CMYK JPEG, palette PNG with transparency, LA PNG, 16-bit PNG, 1x1."""
    palette = Image.new("P", (16, 12), 1)  # left half index 0 (transparent), right half index 1 (blue)
    palette.paste(0, (0, 0, 8, 12))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.info["transparency"] = 0
    sixteen = Image.fromarray((np.arange(16 * 12, dtype=np.uint16).reshape(12, 16) * 300), "I;16")
    return {
        "cmyk": encode(Image.new("CMYK", (16, 12), (0, 255, 255, 0)), "JPEG"),
        "palette": encode(palette, "PNG", transparency=0),
        "la": encode(Image.new("LA", (16, 12), (128, 64)), "PNG"),
        "sixteen_bit": encode(sixteen, "PNG"),
        "one_pixel": encode(Image.new("RGB", (1, 1), (10, 20, 30)), "JPEG"),
        "webp": encode(Image.new("RGB", (16, 12), (0, 128, 0)), "WEBP"),
    }


def damaged_shard_members(rng: random.Random, prefix: str = "bad") -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """Members of a shard mixing good samples with every structural and image defect.

    Returns (members, expected) where ``expected`` maps each key to the drop reason the reader (+ image decode)
    must give it, or "ok" for samples that must survive (odd modes are converted, not dropped).
    """
    good = encode(shape_image(rng, 40, 30), "JPEG")
    truncated = good[: len(good) // 2]
    members: list[tuple[str, bytes]] = []
    expected: dict[str, str] = {}

    def add(name: str, reason: str, image, text, meta, ext="jpg"):
        key = f"{prefix}_{name}"
        meta = dict(meta) if meta is not None else None
        if meta is not None:
            meta.setdefault("uid", derive_uid("damaged", key))
            meta.setdefault("url", f"https://example.com/{key}")
        members.extend(sample_members(key, image, text, meta, ext))
        expected[key] = reason

    add("good", "ok", good, "a good caption", {})
    for name, data in odd_mode_images().items():
        add(name, "ok", data, f"an image in mode {name}", {}, "png" if name in ("palette", "la", "sixteen_bit")
            else "webp" if name == "webp" else "jpg")
    add("truncated", "image_truncated", truncated, "cut in half", {})
    add("zero_bytes", "image_empty", b"", "empty file", {})
    add("not_an_image", "image_undecodable", b"this is not an image at all", "text as image", {})
    add("bomb", "image_too_large", decompression_bomb_png(), "a decompression bomb", {}, "png")
    add("no_caption", "missing_caption", good, None, {"caption": None})
    add("empty_caption", "ok", good, "", {})  # the reader keeps it; the select text rule drops it
    add("latin1_caption", "caption_not_utf8", good, "caf\xe9".encode("latin-1"), {})
    add("caption_from_json", "ok", good, None, {"caption": "caption only in the json"})
    add("no_uid", "ok", good, "no uid: a stable one is derived", {"uid": None})
    add("bad_json", "bad_json", good, "json is broken", None)
    members.append((f"{prefix}_bad_json.json", b"{not json"))
    add("json_only", "missing_image", None, None, {"caption": "json but no image"})
    add("dup", "ok", good, "first occurrence", {})
    members.extend(sample_members(f"{prefix}_between", good, "between the duplicates", {
        "uid": derive_uid("damaged", f"{prefix}_between"), "url": "https://example.com/between"}))
    expected[f"{prefix}_between"] = "ok"
    members.extend(sample_members(f"{prefix}_dup", good, "second occurrence", {"uid": derive_uid("x", "dup2")}))
    members.append((f"../{prefix}_escape.jpg", good))
    members.append((f"../{prefix}_escape.txt", b"path traversal"))
    expected[f"../{prefix}_escape"] = "unsafe_member_path"
    members.append((f"/abs/{prefix}_absolute.jpg", good))
    expected[f"/abs/{prefix}_absolute"] = "unsafe_member_path"
    return members, expected


# -- tiny random models (tests, demos, benchmarks: no download) -----------------------------------------------


def save_tiny_clip(path: str, image_size: int = 32, seed: int = 0) -> str:
    """A random CLIP (2 layers, width 32) with a word-level tokenizer over the synthetic captions' vocabulary and a
    CLIP image processor, saved as a normal checkpoint folder loadable with AutoModel + AutoProcessor."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast

    words = sorted({w for phrase in COLORS + SHAPES + PLACES for w in phrase.split()} | {"a", "an"})
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|startoftext|>",
                                        eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="[UNK]",
                                        model_max_length=32)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path
