"""POPE (object hallucination, 9,000 yes/no questions over adversarial / popular / random) as the harness ran it.

Row schema (``lmms-lab/POPE``, split test): id, question_id, question, answer ("yes"/"no"), image_source, image,
category ("adversarial", "popular", "random").
Prompt: ``<image>\\nQuestion: {question}\\nAnswer the question using a single word or phrase.\\nAnswer:``.
Scoring: original = the output stripped of "," and "." and lower-cased must be exactly the label, means over the
three categories; strict = the POPE repository's rule (a "no"/"not" in the first sentence means no).
"""

from __future__ import annotations

from ..metric_loader import compute
from ..prompts import ANSWER_CUE, IMAGE, SHORT_ANSWER_INSTRUCTION
from ..registry import Benchmark, Scores, register
from ..samples import EvalSample, SampleError
from ._common import headline, image_field, per_sample, text_field


@register
class Pope(Benchmark):
    name = "pope"
    title = "POPE"
    hub_id = "lmms-lab/POPE"
    split = "test"
    required_columns = ("question", "answer", "image")

    def to_sample(self, row: dict, index: int) -> EvalSample:
        question = text_field(row, "question")
        answer = text_field(row, "answer").strip().lower()
        if answer not in ("yes", "no"):
            raise SampleError(f"answer {answer!r} is not yes/no")
        image = image_field(row.get("image"))
        text = f"{IMAGE}\nQuestion: {question}\n{SHORT_ANSWER_INSTRUCTION}{ANSWER_CUE}"
        meta = {"category": row.get("category") or "all"}
        return EvalSample(self.name, self.row_id(row, index), text, [image], answer, {}, meta)

    def score(self, samples, outputs) -> Scores:
        references = [s.answer for s in samples]
        categories = [s.meta["category"] for s in samples]
        original = compute("pope_accuracy", "original", outputs, references, categories=categories)
        strict = compute("pope_accuracy", "official", outputs, references, categories=categories)
        return Scores(headline(original), headline(strict), per_sample(original, strict))
