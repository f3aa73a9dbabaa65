"""The Open-Qwen2VL paper's scores (arXiv 2504.00595, Table 4, instruction-tuned model), for the model-card table.

Only numbers that could be checked against a public source are filled in; the others are None and show as "n/a"
until someone copies them from the paper's Table 4. Values are percentages.
"""

from __future__ import annotations

PAPER = "Open-Qwen2VL (arXiv 2504.00595), Table 4"

PAPER_SCORES: dict[str, float | None] = {
    "mmbench": None,
    "seedbench": None,
    "mmstar": None,
    "mathvista": None,
    # Quoted from Table 4 in the public issue Victorwz/Open-Qwen2VL#6 ("Table 4 reports a score of 66.3").
    "ai2d": 66.3,
    "textvqa": None,
    "textvqa_ocr": None,
    "pope": None,
    "mmmu": None,
}

# Model ids / folder names that mark a converted Open-Qwen2VL release (the "auto" paper column turns on for them).
RELEASE_MARKERS = ("open-qwen2vl",)  # the Hub name of the releases, e.g. weizhiwang/Open-Qwen2VL


def is_release(model_id: str, config=None) -> bool:
    """True for a converted release: its id/folder name contains a marker, or its config says where it came from."""
    if any(marker in str(model_id).lower() for marker in RELEASE_MARKERS):
        return True
    return bool(getattr(config, "converted_from", None))
