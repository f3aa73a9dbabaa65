"""MathVista testmini (1,000 problems) as the Open-Qwen2VL harness ran it.

Row schema (``AI4Math/MathVista``, split testmini): pid, question, image (file name), decoded_image, choices (list or
None), unit, precision, answer, question_type ("multi_choice" / "free_form"), answer_type ("text", "integer",
"float", "list"), metadata, query.
Prompt: multiple choice ``<image>\\n{question}\\nA. ..\\nB. ..\\nAnswer with the option's letter from the given choices
directly.\\nAnswer:`` (at most 9 choices, A-I, as the harness's letter list); free form ``<image>\\n{question}\\nAnswer
the question using a single word or phrase.\\nAnswer:``.
Scoring: original = the harness as it ran: MMMU's open-answer parsing for EVERY row, gold = the choice's letter for
multiple choice or the answer text. (The harness meant to parse multiple choice MMMU-style, but its dataset hands
``answer_type`` to the slot read as the question type, so its ``== "multi_choice"`` branch never runs; that intended
rule is reported in ``extra["intended_mmmu_style"]``.) strict = MathVista's own normalisation and exact comparison
against the gold answer text.
"""

from __future__ import annotations

from ..metric_loader import compute
from ..prompts import ANSWER_CUE, IMAGE, MC_INSTRUCTION, SHORT_ANSWER_INSTRUCTION, letters, option_lines
from ..registry import Benchmark, Scores, register
from ..samples import EvalSample, SampleError
from ._common import accuracy_by, headline, image_field, per_sample, text_field

MAX_CHOICES = 9


@register
class MathVista(Benchmark):
    name = "mathvista"
    title = "MathVista testmini"
    hub_id = "AI4Math/MathVista"
    split = "testmini"
    required_columns = ("question", "answer", "question_type", "answer_type", "choices")

    def row_id(self, row: dict, index: int) -> str:
        return str(row.get("pid") if row.get("pid") is not None else index)

    def to_sample(self, row: dict, index: int) -> EvalSample:
        question = text_field(row, "question")
        answer = text_field(row, "answer")
        kind = row.get("question_type")
        decoded = row.get("decoded_image")
        image = image_field(decoded if decoded is not None else row.get("image"), "decoded_image")
        meta = {
            "question_type": kind,
            "answer_type": row.get("answer_type"),
            "precision": row.get("precision"),
            "gold_text": answer,
        }
        if kind == "multi_choice":
            choices = [str(c) for c in (row.get("choices") or [])]
            if not 2 <= len(choices) <= MAX_CHOICES:
                raise SampleError(
                    f"unsupported option count: {len(choices)} (the prompt takes 2-{MAX_CHOICES} choices)"
                )
            if answer not in choices:
                raise SampleError(f"answer {answer!r} is not one of the choices")
            options = dict(zip(letters(len(choices)), choices))
            text = f"{IMAGE}\n{question}\n{option_lines(options)}\n{MC_INSTRUCTION}{ANSWER_CUE}"
            gold = letters(len(choices))[choices.index(answer)]
            return EvalSample(self.name, self.row_id(row, index), text, [image], gold, options, meta)
        if kind != "free_form":
            raise SampleError(f"unknown question_type {kind!r}")
        text = f"{IMAGE}\n{question}\n{SHORT_ANSWER_INSTRUCTION}{ANSWER_CUE}"
        return EvalSample(self.name, self.row_id(row, index), text, [image], answer, {}, meta)

    def score(self, samples, outputs) -> Scores:
        multi = [s.meta["question_type"] == "multi_choice" for s in samples]

        def mmmu_style(question_types: list[str]) -> dict:
            return compute("mmmu_accuracy", "original", outputs, [s.answer for s in samples],
                           question_types=question_types, options=[list(s.choices.values()) for s in samples],
                           sample_ids=[s.sample_id for s in samples])

        original = mmmu_style(["open"] * len(samples))  # as run: see the module docstring
        intended = mmmu_style(["multiple-choice" if m else "open" for m in multi])
        strict = compute(
            "mathvista_accuracy",
            None,
            outputs,
            [s.meta["gold_text"] for s in samples],
            question_types=[s.meta["question_type"] for s in samples],
            answer_types=[s.meta["answer_type"] for s in samples],
            choices=[list(s.choices.values()) for s in samples],
            precisions=[s.meta["precision"] for s in samples],
        )
        extra = {"per_question_type": accuracy_by(samples, original["correct"], "question_type"),
                 "intended_mmmu_style": headline(intended)}
        return Scores(headline(original), headline(strict), per_sample(original, strict), extra)
