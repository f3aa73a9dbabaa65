"""Helpers shared by the benchmark definitions: reading fields safely and packaging metric results."""

from __future__ import annotations

import io
import math
from collections import defaultdict

from PIL import Image

from ..metric_loader import compute
from ..registry import Scores
from ..samples import SampleError


def is_missing(value) -> bool:
    """None, NaN, empty, or the string "nan" (how pandas-exported benchmark files mark an absent option)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() in ("", "nan")


def text_field(row: dict, key: str) -> str:
    value = row.get(key)
    if is_missing(value):
        raise SampleError(f"missing {key}")
    return str(value)


def image_field(value, field: str = "image") -> Image.Image:
    """An RGB PIL image from a decoded image, a {'bytes','path'} dict or a path; SampleError when absent/unreadable."""
    if value is None or (isinstance(value, (list, tuple)) and not value):
        raise SampleError(f"missing image ({field})")
    if isinstance(value, (list, tuple)):
        value = value[0]
    try:
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict) and value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
        if isinstance(value, dict) and value.get("path"):
            return Image.open(value["path"]).convert("RGB")
        if isinstance(value, str) and value:
            return Image.open(value).convert("RGB")
    except (OSError, ValueError) as err:
        raise SampleError(f"unreadable image ({field}): {type(err).__name__}", detail=str(err)) from err
    raise SampleError(f"missing image ({field})")


def headline(result: dict) -> dict:
    """A metric result without its per-sample lists."""
    return {key: value for key, value in result.items() if key not in ("parsed", "correct")}


def per_sample(original: dict, strict: dict | None) -> list[dict]:
    rows = [{"parsed": p, "correct": c} for p, c in zip(original["parsed"], original["correct"])]
    if strict is not None:
        for row, parsed, correct in zip(rows, strict["parsed"], strict["correct"]):
            row.update(parsed_strict=parsed, correct_strict=correct)
    return rows


def accuracy_by(samples, correct: list, key: str) -> dict:
    """Mean of ``correct`` per value of ``sample.meta[key]`` (samples without the key are left out)."""
    groups = defaultdict(list)
    for sample, value in zip(samples, correct):
        if sample.meta.get(key) is not None:
            groups[str(sample.meta[key])].append(float(value))
    return {name: sum(values) / len(values) for name, values in sorted(groups.items())}


def score_generated_choice(samples, outputs: list[str], original_rule: str, category_key: str | None = None) -> Scores:
    """Letter answers scored with the harness's ``original_rule`` and with VLMEvalKit's matching (strict)."""
    references = [sample.answer for sample in samples]
    options = [sample.choices for sample in samples]
    original = compute("mc_accuracy", original_rule, outputs, references, options=options)
    strict = compute("mc_accuracy", "vlmevalkit", outputs, references, options=options)
    extra = {}
    if category_key:
        extra["per_category"] = accuracy_by(samples, original["correct"], category_key)
        extra["per_category_strict"] = accuracy_by(samples, strict["correct"], category_key)
    return Scores(headline(original), headline(strict), per_sample(original, strict), extra)
