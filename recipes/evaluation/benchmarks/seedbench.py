"""SEED-Bench (image questions: 14,233 of its 17,990) as the Open-Qwen2VL harness ran it.

Row schema (``lmms-lab/SEED-Bench``, split test): answer (letter), choice_a, choice_b, choice_c, choice_d, data_id,
data_type ("image" or "video"), question, question_id, question_type_id, image (list of images).
Only ``data_type == "image"`` rows are evaluated, as in the original (the video questions are not part of it).
Prompt: ``<image>\\n{question}\\nA. {choice_a}\\nB. ..\\nC. ..\\nD. {choice_d}\\nAnswer with the option's letter
from the given choices directly.\\nAnswer:``.
Scoring: original = the gold letter is a case-insensitive substring of the output; strict = VLMEvalKit matching.
"""

from __future__ import annotations

from ..prompts import ANSWER_CUE, IMAGE, MC_INSTRUCTION, option_lines
from ..registry import Benchmark, register
from ..samples import EvalSample, SampleError
from ._common import image_field, is_missing, score_generated_choice, text_field

CHOICE_COLUMNS = {"A": "choice_a", "B": "choice_b", "C": "choice_c", "D": "choice_d"}


def _is_image_question(data_type) -> bool:
    return data_type == "image"


@register
class SeedBench(Benchmark):
    name = "seedbench"
    title = "SEED-Bench (image)"
    hub_id = "lmms-lab/SEED-Bench"
    split = "test"
    row_filter = ("data_type", _is_image_question)
    required_columns = ("question", "answer", "image", "choice_a", "choice_b", "choice_c", "choice_d")

    def to_sample(self, row: dict, index: int) -> EvalSample:
        if row.get("data_type", "image") != "image":
            raise SampleError(f"not an image question (data_type {row.get('data_type')!r})")
        question = text_field(row, "question")
        missing = [column for column in CHOICE_COLUMNS.values() if is_missing(row.get(column))]
        if missing:
            raise SampleError(f"unsupported option count: {4 - len(missing)} (the SEED-Bench prompt needs choices A-D)")
        options = {letter: str(row[column]) for letter, column in CHOICE_COLUMNS.items()}
        answer = text_field(row, "answer").strip()
        if answer not in options:
            raise SampleError(f"answer {answer!r} is not one of the options {sorted(options)}")
        image = image_field(row.get("image"))
        text = f"{IMAGE}\n{question}\n{option_lines(options)}\n{MC_INSTRUCTION}{ANSWER_CUE}"
        meta = {"question_type_id": row.get("question_type_id"), "data_id": row.get("data_id")}
        return EvalSample(self.name, self.row_id(row, index), text, [image], answer, options, meta)

    def score(self, samples, outputs):
        return score_generated_choice(samples, outputs, "lenient", category_key="question_type_id")
