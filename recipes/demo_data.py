"""Demo data from the `easy-vqa` package (MIT, on PyPI): caption shards for pretraining.

Each easy-vqa image shows one shape in one colour; its training questions reveal both (answers to "what shape ..."
and "what color ..." questions). Captions are composed from those ground-truth answers. A few deliberately broken
web-style samples are added so the data stages have something to drop and count.
"""

from __future__ import annotations

import io
import random
from collections import defaultdict
from pathlib import Path

from PIL import Image

from dataset_builders.shards import ShardWriter
from dataset_builders.uids import derive_uid

SHAPES = {"circle", "rectangle", "triangle"}
CAPTION_TEMPLATES = (
    "a {color} {shape}",
    "a {color} {shape} on a white background",
    "a picture of a {color} {shape}",
    "the image shows a {color} {shape}",
    "a simple drawing of a {color} {shape}",
)
# What scraped web data also contains; the demo's selection rules must drop each of these, with a reason.
NOISE_CAPTIONS = ("", "IMG_0042.jpg", "a tiny speck")


def image_attributes(split: str = "train") -> dict[int, dict[str, str]]:
    """image id -> {"shape": ..., "color": ...} from the ground-truth answers of the split's questions."""
    import easy_vqa

    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
    else:
        questions, answers, image_ids = easy_vqa.get_test_questions()
    colors = set(easy_vqa.get_answers()) - SHAPES - {"yes", "no"}
    found: dict[int, dict[str, str]] = defaultdict(dict)
    for question, answer, image_id in zip(questions, answers, image_ids):
        words = question.rstrip("?").split()
        named = {"shape": [w for w in words if w in SHAPES], "color": [w for w in words if w in colors]}
        if answer in ("yes", "no"):
            # "is there a red shape?" yes / "is there not a red shape?" no: the named attribute is present
            negated = "not" in words or "no" in words
            if (answer == "yes") != negated:
                for kind, values in named.items():
                    if values:
                        found[image_id][kind] = values[0]
            continue
        kind = "shape" if answer in SHAPES else "color" if answer in colors else None
        if kind is None:
            continue
        found[image_id][kind] = answer
        other = "color" if kind == "shape" else "shape"
        if named[other]:  # "what is the blue shape?" -> rectangle: the question names the colour
            found[image_id][other] = named[other][0]
    return {i: attrs for i, attrs in found.items() if len(attrs) == 2}


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_caption_shards(folder: str | Path, shard_size: int = 1000, seed: int = 0, noise: bool = True) -> dict:
    """Write easy-vqa training images with composed captions as img2dataset-style shards; returns counts."""
    import easy_vqa

    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = easy_vqa.get_train_image_paths()
    attributes = image_attributes("train")
    samples = []
    for image_id in sorted(attributes):
        caption = rng.choice(CAPTION_TEMPLATES).format(**attributes[image_id])
        samples.append((f"evqa{image_id:05d}", Path(paths[image_id]).read_bytes(), caption))

    if noise:
        samples.append(("noise00000", _png_bytes(Image.new("RGB", (64, 64), "white")), NOISE_CAPTIONS[0]))
        samples.append(("noise00001", _png_bytes(Image.new("RGB", (64, 64), "gray")), NOISE_CAPTIONS[1]))
        samples.append(("noise00002", _png_bytes(Image.new("RGB", (1, 1), "red")), NOISE_CAPTIONS[2]))
    rng.shuffle(samples)
    shards = 0
    for start in range(0, len(samples), shard_size):
        with ShardWriter(str(folder), f"{shards:05d}") as writer:
            for key, image, caption in samples[start:start + shard_size]:
                width, height = Image.open(io.BytesIO(image)).size
                meta = {"uid": derive_uid(key), "url": f"easy-vqa://train/{key}", "caption": caption,
                        "width": width, "height": height}
                writer.write(key, image, caption, meta, image_ext="png")
        shards += 1
    return {"samples": len(samples), "shards": shards, "noise": 3 if noise else 0}
