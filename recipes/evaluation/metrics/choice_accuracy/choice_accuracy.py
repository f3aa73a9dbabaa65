"""Accuracy of a choice made by scores: the option with the highest score is the prediction.

Used for likelihood-based multiple choice: AI2D in the Open-Qwen2VL harness (scores = first-step probabilities of the
option letters, renormalised) and easy-vqa (scores = log-likelihood of each candidate answer). Ties go to the first
option, as ``numpy.argmax`` does.

Inputs: ``predictions`` (one list of scores per sample), ``references`` (index of the correct option).
Output: ``accuracy``, per-sample ``parsed`` (chosen index) and ``correct``, and ``mean_gold_score`` (the average
score given to the correct option, e.g. its mean probability).
"""

import datasets
import evaluate


class ChoiceAccuracy(evaluate.Metric):
    """Argmax-of-scores accuracy (see the module docstring)."""

    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list of per-option scores; references: index of the correct option",
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        parsed, correct, gold_scores = [], [], []
        for index, (scores, gold) in enumerate(zip(predictions, references)):
            if not scores:
                raise ValueError(f"sample {index} has no option scores")
            if not 0 <= gold < len(scores):
                raise ValueError(f"sample {index}: correct option {gold} is outside its {len(scores)} options")
            choice = max(range(len(scores)), key=lambda i: (scores[i], -i))
            parsed.append(choice)
            correct.append(choice == gold)
            gold_scores.append(scores[gold])
        count = len(correct)
        return {
            "accuracy": sum(correct) / count if count else 0.0,
            "parsed": parsed,
            "correct": correct,
            "mean_gold_score": sum(gold_scores) / count if count else 0.0,
        }
