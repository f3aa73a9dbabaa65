"""MathVista accuracy with the benchmark's own normalisation (its ``calculate_score`` rules), no GPT extractor.

MathVista's evaluator first extracts an answer from the response (rules, then a GPT call), then normalises it:

- multiple choice: "(B) text" -> "B"; a letter selects that choice; otherwise the choice closest to the extraction
  by edit distance is taken;
- integer answers: ``str(int(float(extraction)))``; float answers: ``str(round(float(extraction), precision))``;
  list answers: ``str(extraction)``; an extraction that does not convert scores 0;

and compares the normalised string with the gold answer for equality. Without a judge model, the extraction here
is the benchmark's rule-based part only: the stripped response itself (a response equal to a choice is that
choice). This is the strict counterpart to the MMMU-style parsing the Open-Qwen2VL harness used for MathVista.

Inputs: ``predictions`` (text), ``references`` (gold answer text, e.g. the choice text or "2.5"); keywords
``question_types`` ("multi_choice" or "free_form"), ``answer_types`` ("text", "integer", "float", "list"),
``choices`` (list of choice texts, empty for free-form) and ``precisions`` (decimals for float answers).
Output: ``accuracy``, per-sample ``parsed`` (normalised answer, "" when it did not convert) and ``correct``.
"""

import re

import datasets
import evaluate

_CITATION = """\
@inproceedings{lu2024mathvista, title={MathVista: Evaluating Mathematical Reasoning of Foundation Models in Visual
Contexts}, author={Lu, Pan and others}, booktitle={ICLR}, year={2024}}
"""


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def most_similar(text: str, choices: list) -> str:
    distances = [edit_distance(text, choice) for choice in choices]
    return choices[distances.index(min(distances))]


def normalize_extraction(extraction: str, choices: list, question_type: str, answer_type: str, precision):
    """MathVista's ``normalize_extracted_answer``: the answer in the gold answer's format, or None."""
    if question_type == "multi_choice":
        extraction = extraction.strip()
        bracketed = re.findall(r"\(([a-zA-Z])\)", extraction)
        if bracketed:
            extraction = bracketed[0].upper()
        letters = [chr(ord("A") + i) for i in range(len(choices))]
        if extraction in letters:
            return choices[letters.index(extraction)]
        return most_similar(extraction, choices) if choices else None
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), int(precision or 0)))
    except (ValueError, OverflowError):
        return None
    return str(extraction)


def extract(response: str, choices: list, question_type: str, answer_type: str) -> str:
    """The rule-based part of MathVista's ``extract_answer`` (what is left without the GPT call)."""
    response = response.strip()
    if question_type == "multi_choice" and response in choices:
        return response
    if answer_type == "integer":
        try:
            return str(int(response))
        except ValueError:
            pass
    if answer_type == "float":
        try:
            return str(float(response))
        except ValueError:
            pass
    quoted = re.search(r'The answer is "(.*)"\.', response)
    return quoted.group(1) if quoted else response


class MathvistaAccuracy(evaluate.Metric):
    """MathVista's normalise-and-compare scoring (see the module docstring)."""

    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description="predictions, references; question_types, answer_types, choices, precisions",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, question_types=None, answer_types=None, choices=None, precisions=None):
        count = len(predictions)
        question_types = question_types or ["free_form"] * count
        answer_types = answer_types or ["text"] * count
        choices = choices or [[] for _ in range(count)]
        precisions = precisions or [0] * count
        if not len(question_types) == len(answer_types) == len(choices) == len(precisions) == count:
            raise ValueError("question_types, answer_types, choices and precisions need one entry per prediction")
        parsed, correct = [], []
        for output, gold, kind, answer_type, options, precision in zip(
            predictions, references, question_types, answer_types, choices, precisions
        ):
            options = list(options or [])
            extraction = extract(output, options, kind, answer_type)
            normalized = normalize_extraction(extraction, options, kind, answer_type, precision)
            parsed.append("" if normalized is None else normalized)
            correct.append(normalized is not None and normalized == gold)
        accuracy = sum(correct) / len(correct) if correct else 0.0
        return {"accuracy": accuracy, "parsed": parsed, "correct": correct}
