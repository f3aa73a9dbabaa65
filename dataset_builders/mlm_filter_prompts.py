"""The MLM-Filter scoring prompts and answer parsing.

MLM-Filter models (e.g. ``weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o``, used for Open-Qwen2VL's DataComp subset) were
fine-tuned to answer these exact instructions with an integer score on the first line, so the strings below are
reproduced character for character from the public ``Victorwz/MLM_Filter`` scoring scripts. Two wordings exist there:

- ``"qwen"``: ``mlm_filter_scoring_datacomp_batch_inference_v2.py``, the script with the Qwen branch
  (``conv_mode="qwen_instruct"``), i.e. the one for the Qwen2.5 MLM-Filter that Open-Qwen2VL used;
- ``"llama3"``: ``mlm_filter_scoring_datacomp_batch_inference_llama_3.py``, ``..._v3.py`` and
  ``mlm_filter_scoring_single_image.py`` (Llama-3 based filters): "multiples of 10.  Please" instead of
  "multiples of 5 or 10. Please".

The user turn is the image followed by ``"\\n"`` and the instruction (LLaVA's ``<image>\\n{text}``); the original
then appends a single space token after the assistant prefix before decoding.
"""

from __future__ import annotations

import re

METRICS = ("image_text_matching", "object_detail_fulfillment", "caption_text_quality", "semantic_understanding")

CRITERIA = {
    "image_text_matching": (
        "Please evaluate if the provided text caption accurately represents the main features and objects of the "
        "image. The caption doesn't need to detail every aspect of the image, but it should capture its primary "
        "theme. Rate the overall quality of the text caption's match to the image on a scale of 1-100, considering "
        "the criteria mentioned."
    ),
    "object_detail_fulfillment": (
        "Please evaluate the text caption to determine if it provides detailed descriptions of objects that align "
        "with the image. Specifically, assess if the caption sufficiently describes the color, size, position, "
        "shape, material, etc., of the objects. Afterward, rate the caption's overall accuracy in capturing object "
        "details from the image on a scale of 1-100, based on the criteria provided."
    ),
    "caption_text_quality": (
        "Please evaluate the text caption based on the following criteria: Grammatical Correctness, Diversity of "
        "Vocabulary (e.g., the range and uniqueness of words used), Fluency (e.g., smoothness and natural flow of "
        "sentences), Readability, Length, and Structure. Assign an overall quality score on a scale of 1-100."
    ),
    "semantic_understanding": (
        "Evaluate the given text caption in relation to its corresponding image. Your goal is to determine if the "
        "text caption provides additional semantic information that isn't readily apparent just from the image "
        "itself.\n\nFor example:\n\n"
        '1. If the image mentions "a man" but the caption elaborates he is a "homeless man" or a "businessman," '
        "then the caption is enriching the semantic context.\n"
        "2. If the caption introduces concepts like the mathematical tangent function, which require in-depth "
        "knowledge to deduce, it is imparting external semantics.\n"
        "3. Captions revealing specific location addresses, festival details, or other nuanced data not easy to "
        "infer from the image also provide external semantic information.\n"
        "4. Directly identifying specific entities in the image such as buildings, people, bird species, animal "
        "breeds, car models, engines, etc., in the caption introduces additional insights.\n"
        "5. Should the image act as a contextual backdrop and the caption describes elements not explicitly "
        "showcased in the image, it has semantic depth.\n"
        "6. Lastly, if the caption depicts relationships between the subjects in the image, which need commonsense "
        "knowledge to understand, it should be considered semantically rich.\n\n"
        "Please assess and determine the extent of semantic enrichment the caption provides over the image. Rate "
        "the text caption's semantic depth on a scale from 1 to 100."
    ),
}

_TEMPLATE_HEAD = (
    "Text Caption: {caption}\n\n{criteria} A higher score indicates higher level of {aspect}. Ensure that your "
    "scoring is nuanced and uses the entire range from 0 to 100, reflecting the subtle differences. The score should "
    "be given as an integer, with each number between 0 and 100 considered as a potential score, avoiding the "
    "tendency to round to multiples of "
)
_TEMPLATE_TAIL = (
    "Please first output a single line containing the value indicating the scores. In the subsequent line, please "
    "provide a comprehensive explanation of your evaluation, avoiding any potential bias."
)
TEMPLATES = {
    "qwen": _TEMPLATE_HEAD + "5 or 10. " + _TEMPLATE_TAIL,
    "llama3": _TEMPLATE_HEAD + "10.  " + _TEMPLATE_TAIL,
}

# Score columns as the DataComp baselines read them (``apply_filter.py``: ``<metric>_score``).
SCORE_COLUMNS = {metric: f"{metric}_score" for metric in METRICS}


def build_instruction(caption: str, metric: str, version: str = "qwen") -> str:
    """The text of the user turn (without the image) for one caption and one metric."""
    if metric not in CRITERIA:
        raise ValueError(f"unknown MLM-Filter metric {metric!r}; expected one of {list(METRICS)}")
    if version not in TEMPLATES:
        raise ValueError(f"unknown prompt version {version!r}; expected one of {sorted(TEMPLATES)}")
    return TEMPLATES[version].format(caption=caption, criteria=CRITERIA[metric], aspect=metric.replace("_", " "))


_SCORE_LINE = re.compile(r"^\s*(\d{1,3})\s*[.,;:]?\s*$")


def parse_score(answer: str) -> int | None:
    """The integer score on the answer's first line (0-100), or None when the answer is not such a line.

    Like the DataComp baselines, only the first line counts and trailing ``,``/``;`` are ignored; anything else
    (words, a fraction, a number out of range) is unparsable, never guessed.
    """
    if not isinstance(answer, str):
        return None
    first_line = answer.strip().split("\n", 1)[0] if answer.strip() else ""
    match = _SCORE_LINE.match(first_line)
    if not match:
        return None
    value = int(match.group(1))
    return value if 0 <= value <= 100 else None
