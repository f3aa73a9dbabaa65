"""easy-VQA (the ``easy-vqa`` PyPI package, MIT): an offline, real benchmark for the demo.

Test split: 9,673 questions over 1,000 synthetic 64x64 images (shapes of one colour). Asked as multiple choice over
the answers of the question's kind: yes/no (2), shape (circle, rectangle, triangle) or colour (8 colours). Each
candidate answer is scored by its log-likelihood after the prompt; the highest wins. Nothing is generated.

Prompts: raw ``<s><image>\\nQuestion: {question}\\nAnswer the question using a single word or phrase.\\nAnswer:``
+ " {answer}"; chat: a user turn ``<image>\\n{question}`` (how a chat SFT on easy-vqa sees it) + "{answer}".

Reported beside the model's accuracy (all fractions):
- ``majority_baseline``: always answer the most frequent training answer of the question's kind;
- ``chance_baseline``: expected accuracy of a uniform guess among the candidates.

Row schema of a local copy (``--data-dir <dir>`` with ``<dir>/easy_vqa``): question, answer, image_id, image.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..metric_loader import compute
from ..prompts import ANSWER_CUE, IMAGE, SHORT_ANSWER_INSTRUCTION
from ..registry import CANDIDATES, Benchmark, Scores, register
from ..samples import EvalSample, SampleError
from ._common import accuracy_by, headline, image_field, text_field

ANSWER_KINDS = {
    "yes/no": ("yes", "no"),
    "shape": ("circle", "rectangle", "triangle"),
    "color": ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow"),
}


def answer_kind(answer: str) -> str:
    for kind, answers in ANSWER_KINDS.items():
        if answer in answers:
            return kind
    raise SampleError(f"answer {answer!r} is not one of easy-vqa's answers")


def package_split(split: str = "test"):
    """The split from the installed ``easy-vqa`` package as a Dataset with decoded images."""
    import datasets

    try:
        import easy_vqa
    except ImportError as err:
        raise ImportError("the easy_vqa benchmark needs the PyPI package easy-vqa==1.0") from err
    if split == "test":
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    table = {
        "question": list(questions),
        "answer": list(answers),
        "image_id": [int(i) for i in image_ids],
        "image": [paths.get(i) for i in image_ids],
    }
    return datasets.Dataset.from_dict(table).cast_column("image", datasets.Image())


def majority_answers() -> dict:
    """Most frequent training answer per kind (the majority baseline's prediction)."""
    import easy_vqa

    _, answers, _ = easy_vqa.get_train_questions()
    counts = {kind: Counter() for kind in ANSWER_KINDS}
    for answer in answers:
        counts[answer_kind(answer)][answer] += 1
    return {kind: counter.most_common(1)[0][0] for kind, counter in counts.items() if counter}


@register
class EasyVQA(Benchmark):
    name = "easy_vqa"
    title = "easy-VQA test (multiple choice)"
    hub_id = None
    split = "test"
    method = CANDIDATES
    required_columns = ("question", "answer", "image")

    def load(self, data_dir=None):
        """A local copy under ``--data-dir`` when there is one, else the installed package's data."""
        if data_dir is not None and (Path(data_dir) / self.name).exists():
            return super().load(data_dir)
        return package_split(self.split)

    def to_sample(self, row: dict, index: int) -> EvalSample:
        question = text_field(row, "question")
        answer = text_field(row, "answer").strip()
        kind = answer_kind(answer)
        image = image_field(row.get("image"))
        text = f"{IMAGE}\nQuestion: {question}\n{SHORT_ANSWER_INSTRUCTION}{ANSWER_CUE}"
        choices = dict(enumerate(ANSWER_KINDS[kind]))
        meta = {"kind": kind, "image_id": row.get("image_id")}
        sample_id = f"{index}"
        return EvalSample(self.name, sample_id, text, [image], answer, choices, meta, f"{IMAGE}\n{question}")

    def candidates(self, sample: EvalSample, prompt_format: str) -> list[str]:
        prefix = " " if prompt_format == "raw" else ""
        return [prefix + answer for answer in sample.choices.values()]

    def score(self, samples, outputs) -> Scores:
        references = [list(s.choices.values()).index(s.answer) for s in samples]
        result = compute("choice_accuracy", None, outputs, references)
        rows = [
            {"parsed": samples[i].choices[choice], "correct": correct}
            for i, (choice, correct) in enumerate(zip(result["parsed"], result["correct"]))
        ]
        majority = majority_answers()
        majority_hits = [s.answer == majority.get(s.meta["kind"]) for s in samples]
        count = len(samples)
        extra = {
            "majority_baseline": sum(majority_hits) / count if count else None,
            "majority_answers": majority,
            "chance_baseline": sum(1 / len(s.choices) for s in samples) / count if count else None,
            "per_kind": accuracy_by(samples, result["correct"], "kind"),
        }
        summary = headline(result)
        summary.pop("mean_gold_score", None)
        return Scores(summary, None, rows, extra)
