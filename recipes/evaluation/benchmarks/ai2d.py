"""AI2D (test split, 3,088 questions) scored by likelihood, as the Open-Qwen2VL harness did.

Row schema (``lmms-lab/ai2d``, split test): question, options (list of 2-4 texts), answer (index of the correct
option, as a string), image.
Prompt: ``<image>\\n{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer with the option's letter from the given choices
directly.\\nAnswer:``. Nothing is generated: the probabilities of the tokens "A".."D" at the first answer position
are read from one forward pass and renormalised over the four letters.
Scoring: original = argmax over A-D (the harness always read four letters); strict = argmax over the letters of the
options the question actually has. The original also reported AUCs; ``mean_gold_score`` (mean probability of the
correct letter) is reported instead.
"""

from __future__ import annotations

from ..metric_loader import compute
from ..prompts import ANSWER_CUE, IMAGE, MC_INSTRUCTION, letters, option_lines
from ..registry import LETTER_PROBS, Benchmark, Scores, register
from ..samples import EvalSample, SampleError
from ._common import headline, image_field, text_field

PROBABILITY_LETTERS = ("A", "B", "C", "D")


def restrict(probabilities: list[float], count: int) -> list[float]:
    """Probabilities of the first ``count`` letters, renormalised."""
    kept = probabilities[:count]
    total = sum(kept)
    return [p / total for p in kept] if total > 0 else kept


@register
class AI2D(Benchmark):
    name = "ai2d"
    title = "AI2D test"
    hub_id = "lmms-lab/ai2d"
    split = "test"
    method = LETTER_PROBS
    probability_letters = PROBABILITY_LETTERS
    required_columns = ("question", "options", "answer", "image")

    def to_sample(self, row: dict, index: int) -> EvalSample:
        question = text_field(row, "question")
        options = row.get("options")
        if not isinstance(options, (list, tuple)) or not 2 <= len(options) <= len(PROBABILITY_LETTERS):
            count = len(options) if isinstance(options, (list, tuple)) else 0
            raise SampleError(f"unsupported option count: {count} (AI2D is scored over the letters A-D)")
        try:
            answer = int(str(row.get("answer")).strip())
        except ValueError as err:
            raise SampleError(f"answer {row.get('answer')!r} is not an option index") from err
        if not 0 <= answer < len(options):
            raise SampleError(f"answer index {answer} is outside the {len(options)} options")
        image = image_field(row.get("image"))
        choices = dict(zip(letters(len(options)), (str(o) for o in options)))
        text = f"{IMAGE}\n{question}\n{option_lines(choices)}\n{MC_INSTRUCTION}{ANSWER_CUE}"
        return EvalSample(self.name, self.row_id(row, index), text, [image], answer, choices)

    def score(self, samples, outputs) -> Scores:
        references = [s.answer for s in samples]
        original = compute("choice_accuracy", None, outputs, references)
        restricted = [restrict(p, len(s.choices)) for s, p in zip(samples, outputs)]
        strict = compute("choice_accuracy", None, restricted, references)
        rows = [
            {
                "parsed": PROBABILITY_LETTERS[o],
                "correct": c,
                "parsed_strict": PROBABILITY_LETTERS[so],
                "correct_strict": sc,
                "probabilities": dict(zip(PROBABILITY_LETTERS, probs)),
            }
            for o, c, so, sc, probs in zip(
                original["parsed"], original["correct"], strict["parsed"], strict["correct"], outputs
            )
        ]
        return Scores(headline(original), headline(strict), rows)
