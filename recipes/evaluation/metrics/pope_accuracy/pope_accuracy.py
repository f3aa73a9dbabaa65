"""POPE yes/no scoring: accuracy, precision, recall, F1 and yes-ratio ("yes" is the positive class).

Configurations:

- ``original``: the Open-Qwen2VL harness: the output, with "," then "." stripped from its ends and lower-cased, must
  equal "yes" or "no" exactly (anything else is wrong and counts as a negative); accuracy and F1 are computed per
  category (adversarial / popular / random) and the headline numbers are their means.
- ``official``: the POPE repository's rule: keep the first sentence, drop commas; the answer is "no" when the words
  "No", "no" or "not" occur in it, else "yes"; the headline numbers are over all samples.

Inputs: ``predictions`` (text), ``references`` ("yes"/"no"); keyword ``categories`` (one per sample; optional).
Output: ``accuracy``, ``f1``, ``precision``, ``recall``, ``yes_ratio``, ``per_category`` (the same numbers per
category), per-sample ``parsed`` and ``correct``.
"""

import datasets
import evaluate

_CITATION = """\
@inproceedings{li2023pope, title={Evaluating Object Hallucination in Large Vision-Language Models},
author={Li, Yifan and others}, booktitle={EMNLP}, year={2023}}
"""

_CONFIGS = ("original", "official")


def original_label(output: str) -> str:
    return output.strip(",").strip(".").lower()


def official_label(output: str) -> str:
    first_sentence = output.split(".")[0] if "." in output else output
    words = first_sentence.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def binary_scores(labels: list, golds: list) -> dict:
    true_pos = sum(p == "yes" and g == "yes" for p, g in zip(labels, golds))
    false_pos = sum(p == "yes" and g == "no" for p, g in zip(labels, golds))
    false_neg = sum(p != "yes" and g == "yes" for p, g in zip(labels, golds))
    precision = true_pos / (true_pos + false_pos) if true_pos + false_pos else 0.0
    recall = true_pos / (true_pos + false_neg) if true_pos + false_neg else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    count = len(golds)
    return {
        "accuracy": sum(p == g for p, g in zip(labels, golds)) / count if count else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(p == "yes" for p in labels) / count if count else 0.0,
        "count": count,
    }


class PopeAccuracy(evaluate.Metric):
    """POPE yes/no scoring (see the module docstring)."""

    def _info(self):
        if self.config_name not in _CONFIGS:
            raise KeyError(f"unknown pope_accuracy configuration {self.config_name!r}; expected one of {_CONFIGS}")
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description="predictions: text; references: 'yes' or 'no'; categories: optional per-sample names",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, categories=None):
        categories = categories or ["all"] * len(predictions)
        if len(categories) != len(predictions):
            raise ValueError(f"got {len(categories)} categories for {len(predictions)} predictions")
        to_label = original_label if self.config_name == "original" else official_label
        labels = [to_label(output) for output in predictions]
        golds = [gold.strip().lower() for gold in references]
        per_category = {}
        for name in dict.fromkeys(categories):
            members = [i for i, c in enumerate(categories) if c == name]
            per_category[name] = binary_scores([labels[i] for i in members], [golds[i] for i in members])
        if self.config_name == "original":
            headline = {
                key: sum(scores[key] for scores in per_category.values()) / len(per_category)
                for key in ("accuracy", "precision", "recall", "f1", "yes_ratio")
            }
        else:
            headline = binary_scores(labels, golds)
            headline.pop("count")
        correct = [label == gold for label, gold in zip(labels, golds)]
        return {**headline, "per_category": per_category, "parsed": labels, "correct": correct}
