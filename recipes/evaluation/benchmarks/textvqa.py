"""TextVQA validation (5,000 questions) as the Open-Qwen2VL harness ran it, without and with OCR tokens.

Row schema (``lmms-lab/textvqa``, split validation): image_id, question_id, question, question_tokens, image,
image_width, image_height, flickr_original_url, flickr_300k_url, answers (ten human answers), image_classes,
set_name, ocr_tokens.
Prompt: ``<image>\\nQuestion: {question}\\nAnswer the question using a single word or phrase.\\nAnswer:``.
``textvqa`` is the harness's "TextVQA-Pure"; ``textvqa_ocr`` ("TextVQA-OCR") appends LLaVA's OCR hint to the
question (``\\nReference OCR token: tok1, tok2, ...``, built here from the row's ``ocr_tokens``; omitted when empty).
Scoring: original = M4C's TextVQA evaluator after the harness's clean-up (newlines, "." and "," removed,
lower-cased); strict = the official VQA accuracy.
"""

from __future__ import annotations

from ..metric_loader import compute
from ..prompts import ANSWER_CUE, IMAGE, SHORT_ANSWER_INSTRUCTION
from ..registry import Benchmark, Scores, register
from ..samples import EvalSample, SampleError
from ._common import headline, image_field, per_sample, text_field


@register
class TextVQA(Benchmark):
    name = "textvqa"
    title = "TextVQA val"
    hub_id = "lmms-lab/textvqa"
    split = "validation"
    with_ocr_tokens = False
    required_columns = ("question", "answers", "image")

    def question_text(self, row: dict) -> str:
        question = text_field(row, "question")
        tokens = [str(t) for t in (row.get("ocr_tokens") or [])]
        if self.with_ocr_tokens and tokens:
            question += "\nReference OCR token: " + ", ".join(tokens)
        return question

    def to_sample(self, row: dict, index: int) -> EvalSample:
        answers = [str(a) for a in (row.get("answers") or []) if a is not None]
        if not answers:
            raise SampleError("missing answers")
        question = self.question_text(row)
        image = image_field(row.get("image"))
        text = f"{IMAGE}\nQuestion: {question}\n{SHORT_ANSWER_INSTRUCTION}{ANSWER_CUE}"
        return EvalSample(self.name, self.row_id(row, index), text, [image], answers)

    def score(self, samples, outputs) -> Scores:
        references = [s.answer for s in samples]
        original = compute("vqa_accuracy", "m4c", outputs, references)
        strict = compute("vqa_accuracy", "official", outputs, references)
        return Scores(headline(original), headline(strict), per_sample(original, strict))


@register
class TextVQAWithOCR(TextVQA):
    name = "textvqa_ocr"
    data_name = "textvqa"
    title = "TextVQA val (OCR tokens)"
    with_ocr_tokens = True
    # Without the column every prompt would silently lack its OCR hint under a title that promises one.
    required_columns = TextVQA.required_columns + ("ocr_tokens",)
