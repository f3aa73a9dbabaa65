"""Multiple-choice accuracy from a generated answer, under three matching rules.

Configurations (``evaluate.load(<this folder>, config_name)``):

- ``lenient``: the Open-Qwen2VL harness for MMBench and SEED-Bench: correct when the gold letter, lower-cased, is a
  substring of the lower-cased output. "A cat." therefore counts as answer "A".
- ``case_sensitive``: the Open-Qwen2VL harness for MMStar: correct when the gold letter is a substring of the output.
- ``vlmevalkit``: the exact-matching stage of the benchmarks' own evaluator (VLMEvalKit's ``can_infer``, without the
  GPT judge): punctuation is blanked out, and the answer is the one option letter that appears as a word, so "A cat
  is on the mat" answers A (VLMEvalKit rejects such an "A" as a possible article only with ``VERBOSE`` set, which
  is off by default); when no single letter is found, an answer that contains exactly one option's text picks that
  option. Anything else is unanswered (wrong).

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
    return found[0] if len(found) == 1 else ""


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
            # The harness rules only test the gold letter; "parsed" names it when it is found (so that it agrees
            # with "correct"), otherwise the first letter the rule would accept.
            if self.config_name == "lenient":
                ok = gold.lower() in output.lower()
                letter = gold if ok else lenient_letter(output, letters)
            elif self.config_name == "case_sensitive":
                ok = gold in output
                letter = gold if ok else case_sensitive_letter(output, letters)
            else:
                letter = vlmevalkit_letter(output, choices)
                ok = letter == gold
            parsed.append(letter)
            correct.append(bool(ok))
        accuracy = sum(correct) / len(correct) if correct else 0.0
        return {"accuracy": accuracy, "parsed": parsed, "correct": correct}


__all__ = ["McAccuracy", "lenient_letter", "case_sensitive_letter", "vlmevalkit_letter"]
