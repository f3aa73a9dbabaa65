"""Multiple-choice accuracy from a generated answer, under three matching rules.

Configurations (``evaluate.load(<this folder>, config_name)``):

- ``lenient``: the Open-Qwen2VL harness for MMBench and SEED-Bench: correct when the gold letter, lower-cased, is a
  substring of the lower-cased output. "A cat." therefore counts as answer "A".
- ``case_sensitive``: the Open-Qwen2VL harness for MMStar: correct when the gold letter is a substring of the output.
- ``vlmevalkit``: the exact-matching stage of the benchmarks' own evaluator (VLMEvalKit's ``can_infer``, without the
  GPT judge): punctuation is blanked out, and the answer is the one option letter that appears as a word; a lone
  "A" inside an answer of more than three words is ambiguous (the article) and does not count; when no letter is
  found, an answer that contains exactly one option's text picks that option. Anything else is unanswered (wrong).

Inputs: ``predictions`` (generated text), ``references`` (gold letter); keyword ``options``: one dict per sample
mapping each valid letter to its option text (letters only matter for ``lenient``/``case_sensitive``, where they
name the parsed answer). Output: ``accuracy`` plus per-sample ``parsed`` (letter or "") and ``correct``.
"""

import datasets
import evaluate

_CITATION = """\
@misc{liu2023mmbench, title={MMBench: Is Your Multi-modal Model an All-around Player?}, author={Liu, Yuan and others},
      year={2023}, eprint={2307.06281}, archivePrefix={arXiv}}
"""

_DEFAULT_LETTERS = ("A", "B", "C", "D")
_BLANKED = ".()[],:;!*#{}"
_CONFIGS = ("lenient", "case_sensitive", "vlmevalkit")


def lenient_letter(output: str, letters) -> str:
    """First letter (in option order) the lenient rule accepts: ``letter.lower() in output.lower()``."""
    lowered = output.lower()
    return next((letter for letter in letters if letter.lower() in lowered), "")


def case_sensitive_letter(output: str, letters) -> str:
    """First letter (in option order) that occurs in the output as is."""
    return next((letter for letter in letters if letter in output), "")


def letter_from_words(output: str, letters) -> str:
    """The single option letter that appears as a word once punctuation is blanked out ("" if none or several)."""
    text = output
    for char in _BLANKED:
        text = text.replace(char, " ")
    words = text.split()
    found = [letter for letter in letters if letter in words]
    if len(found) != 1:
        return ""
    if found[0] == "A" and len(words) > 3:
        return ""  # "A" in a sentence is most likely the article, not an answer
    return found[0]


def letter_from_text(output: str, options: dict) -> str:
    """The option whose text is contained in the output, when exactly one is."""
    lowered = output.lower()
    hits = [letter for letter, text in options.items() if text is not None and str(text).lower() in lowered]
    return hits[0] if len(hits) == 1 else ""


def vlmevalkit_letter(output: str, options: dict) -> str:
    return letter_from_words(output, list(options)) or letter_from_text(output, options)


class McAccuracy(evaluate.Metric):
    """Multiple-choice accuracy from generated text (see the module docstring for the rules)."""

    def _info(self):
        if self.config_name not in _CONFIGS:
            raise KeyError(f"unknown mc_accuracy configuration {self.config_name!r}; expected one of {_CONFIGS}")
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description="predictions: generated text; references: gold letter; options: list of {letter: text}",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, options=None):
        if options is None:
            options = [dict.fromkeys(_DEFAULT_LETTERS) for _ in predictions]
        if len(options) != len(predictions):
            raise ValueError(f"got {len(options)} option dicts for {len(predictions)} predictions")
        parsed, correct = [], []
        for output, gold, choices in zip(predictions, references, options):
            letters = list(choices)
            if self.config_name == "lenient":
                letter, ok = lenient_letter(output, letters), gold.lower() in output.lower()
            elif self.config_name == "case_sensitive":
                letter, ok = case_sensitive_letter(output, letters), gold in output
            else:
                letter = vlmevalkit_letter(output, choices)
                ok = letter == gold
            parsed.append(letter)
            correct.append(bool(ok))
        accuracy = sum(correct) / len(correct) if correct else 0.0
        return {"accuracy": accuracy, "parsed": parsed, "correct": correct}


__all__ = ["McAccuracy", "lenient_letter", "case_sensitive_letter", "vlmevalkit_letter"]
