"""MMStar (1,500 questions) as the Open-Qwen2VL harness ran it.

Row schema (``Lin-Chen/MMStar``, split val): index, question (options are written inside it, after "Options:"),
image, answer (letter), category, l2_category, meta_info.
Prompt: ``<image>\\nQuestion: {question}\\nAnswer with the option's letter from the given choices directly.\\nAnswer:``.
Scoring: original = the gold letter is a case-sensitive substring of the output; strict = VLMEvalKit matching
(option texts are parsed out of the question for its text fallback).
"""

from __future__ import annotations

import re

from ..prompts import ANSWER_CUE, IMAGE, MC_INSTRUCTION, letters
from ..registry import Benchmark, register
from ..samples import EvalSample, SampleError
from ._common import image_field, score_generated_choice, text_field

_OPTION_SPLIT = re.compile(r"(?:^|,\s+|\n)([A-H])[:.]\s")


def options_in_question(question: str) -> dict:
    """``{"A": text, ...}`` from "...Options: A: x, B: y, C: z"; empty when the question has no such list."""
    if "Options:" not in question:
        return {}
    tail = question.split("Options:", 1)[1].strip()
    parts = _OPTION_SPLIT.split(tail)
    found = {letter: text.strip().rstrip(",").strip() for letter, text in zip(parts[1::2], parts[2::2])}
    expected = letters(len(found))
    return found if list(found) == expected and len(found) >= 2 else {}


@register
class MMStar(Benchmark):
    name = "mmstar"
    title = "MMStar"
    hub_id = "Lin-Chen/MMStar"
    split = "val"
    required_columns = ("question", "answer", "image")

    def to_sample(self, row: dict, index: int) -> EvalSample:
        question = text_field(row, "question")
        answer = text_field(row, "answer").strip()
        options = options_in_question(question)
        if not options:
            options = dict.fromkeys(letters(4))  # letters only: the strict text fallback has nothing to match
        if answer not in options:
            raise SampleError(f"answer {answer!r} is not one of the options {sorted(options)}")
        image = image_field(row.get("image"))
        text = f"{IMAGE}\nQuestion: {question}\n{MC_INSTRUCTION}{ANSWER_CUE}"
        meta = {"category": row.get("category"), "l2_category": row.get("l2_category")}
        return EvalSample(self.name, self.row_id(row, index), text, [image], answer, options, meta)

    def score(self, samples, outputs):
        return score_generated_choice(samples, outputs, "case_sensitive", category_key="category")
