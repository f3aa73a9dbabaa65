"""MMMU validation (900 questions) as the Open-Qwen2VL harness ran it.

Row schema (``lmms-lab/MMMU``, split validation): id, question, options (a Python list written as a string),
explanation, image_1 .. image_7, img_type, answer (letter, or text for open questions), topic_difficulty,
question_type ("multiple-choice" / "open"), subfield.
Prompt (reproduced character for character, quirks included): ``The following are multiple choice questions
about  {subfield}.\\n\\n{question}\\nA. ..\\nAnswer with the option's letter from the given choices
directly.\\nAnswer:``
(two spaces after "about": the harness prefixed each word of the subfield with a space), or, for open questions,
``...{question}\\nAnswer the question using a single word or phrase.\\nAnswer:``; then every ``<image N>`` tag in
the whole prompt becomes ``<image>\\n``. Images are taken in column order (image_1, image_2, ...), one per tag,
cycled when there are fewer images than tags; a question without tags is asked without its image, as the harness did.
Scoring: MMMU's own parsing; original = a random letter for an unparsable choice, strict = no credit.
"""

from __future__ import annotations

import ast
import re
from itertools import cycle, islice

from ..metric_loader import compute
from ..prompts import ANSWER_CUE, IMAGE, MC_INSTRUCTION, SHORT_ANSWER_INSTRUCTION, letters, option_lines
from ..registry import Benchmark, Scores, register
from ..samples import EvalSample, SampleError
from ._common import accuracy_by, headline, image_field, is_missing, per_sample, text_field

MAX_OPTIONS = 9
IMAGE_COLUMNS = [f"image_{i}" for i in range(1, 8)]
_IMAGE_TAG = re.compile(r"<image\s*\d+>")


def subject_words(subfield: str) -> str:
    """The harness's ``format_subject``: every "_"-separated word prefixed with a space."""
    return "".join(" " + word for word in subfield.split("_"))


def parse_options(value) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    try:
        parsed = ast.literal_eval(value) if isinstance(value, str) else None
    except (ValueError, SyntaxError) as err:
        raise SampleError(f"unreadable options {str(value)[:60]!r}") from err
    if not isinstance(parsed, list):
        raise SampleError(f"unreadable options {str(value)[:60]!r}")
    return [str(v) for v in parsed]


@register
class MMMU(Benchmark):
    name = "mmmu"
    title = "MMMU val"
    hub_id = "lmms-lab/MMMU"
    split = "validation"
    required_columns = ("question", "options", "answer", "question_type", "image_1")

    def to_sample(self, row: dict, index: int) -> EvalSample:
        question = text_field(row, "question")
        kind = text_field(row, "question_type")
        answer = text_field(row, "answer").strip()
        prompt = f"The following are multiple choice questions about {subject_words(str(row.get('subfield') or ''))}."
        prompt += f"\n\n{question}"
        options: dict = {}
        if kind == "multiple-choice":
            texts = parse_options(row.get("options"))
            if not 2 <= len(texts) <= MAX_OPTIONS:
                raise SampleError(f"unsupported option count: {len(texts)} (the prompt takes 2-{MAX_OPTIONS} options)")
            options = dict(zip(letters(len(texts)), texts))
            if answer not in options:
                raise SampleError(f"answer {answer!r} is not one of the options {sorted(options)}")
            prompt += f"\n{option_lines(options)}\n{MC_INSTRUCTION}{ANSWER_CUE}"
        elif kind == "open":
            prompt += f"\n{SHORT_ANSWER_INSTRUCTION}{ANSWER_CUE}"
        else:
            raise SampleError(f"unknown question_type {kind!r}")
        text = _IMAGE_TAG.sub(f"{IMAGE}\n", prompt)
        tags = text.count(IMAGE)
        available = [row[column] for column in IMAGE_COLUMNS if not is_missing(row.get(column))]
        if tags and not available:
            raise SampleError("missing image (the question refers to images but the row has none)")
        images = [image_field(value) for value in islice(cycle(available), tags)] if tags else []
        meta = {"question_type": kind, "subfield": row.get("subfield"), "num_images": len(images)}
        return EvalSample(self.name, self.row_id(row, index), text, images, answer, options, meta)

    def score(self, samples, outputs) -> Scores:
        kwargs = {
            "question_types": [s.meta["question_type"] for s in samples],
            "options": [list(s.choices.values()) for s in samples],
            "sample_ids": [s.sample_id for s in samples],
        }
        references = [s.answer for s in samples]
        original = compute("mmmu_accuracy", "original", outputs, references, **kwargs)
        strict = compute("mmmu_accuracy", "strict", outputs, references, **kwargs)
        extra = {"per_subfield": accuracy_by(samples, original["correct"], "subfield")}
        return Scores(headline(original), headline(strict), per_sample(original, strict), extra)
