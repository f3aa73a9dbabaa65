"""MMMU-style answer parsing and accuracy (used by Open-Qwen2VL's harness for MMMU and MathVista).

The rules are those of the MMMU benchmark's own evaluation (``parse_multi_choice_response``,
``parse_open_response``, ``eval_multi_choice``, ``eval_open``), which the original harness applies to both MMMU and
MathVista:

- multiple choice: strip surrounding punctuation, then look for "(X)", then "X " then "X." for the option letters;
  failing that, when the answer is longer than five words, look for option texts inside it; with several candidates
  the one that occurs last wins. Nothing found: a random letter.
- open: keep the shortest tail after an indicator ("is ", "so ", "therefore ", "answer ", ... and "=" in the last
  line), add every number found, normalise (numbers rounded to 2 decimals, strings lower-cased); correct when a
  normalised gold string is contained in a predicted string, or a gold number equals a predicted number.

Configurations: ``original`` reproduces the harness, including the random letter for an unparsable multiple-choice
answer (seeded per sample, so runs are reproducible; the original used the unseeded global generator); ``strict``
gives no credit for an unparsable answer and reads a gold answer written as a Python list ("['1', '2']") as a list.

Inputs: ``predictions`` (text), ``references`` (gold letter for multiple choice, gold text for open questions);
keywords ``question_types`` ("multiple-choice" or "open" per sample), ``options`` (option texts per sample; letters
A, B, ... in order), ``sample_ids`` and ``seed`` (seed the random letter). Output: ``accuracy``, per-sample
``parsed`` and ``correct``, and ``random_guesses`` (how many answers needed the random letter).
"""

import ast
import random
import re

import datasets
import evaluate

_CITATION = """\
@inproceedings{yue2023mmmu, title={MMMU: A Massive Multi-discipline Multimodal Understanding and Reasoning Benchmark
for Expert AGI}, author={Yue, Xiang and others}, booktitle={CVPR}, year={2024}}
"""

_CONFIGS = ("original", "strict")
_EDGE_PUNCTUATION = [",", ".", "!", "?", ";", ":", "'"]
_KEY_INDICATORS = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
_TRIVIAL = {":", ",", ".", "!", "?", ";", "'"}
_NUMBER_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUMBER_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUMBER_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def parse_multi_choice(response: str, letters: list, option_texts: dict):
    """The letter a multiple-choice answer names, or None when no rule finds one."""
    for char in _EDGE_PUNCTUATION:  # stripped one after the other, in this order, as the MMMU code does
        response = response.strip(char)
    padded = " " + response + " "
    bracketed = [letter for letter in letters if f"({letter})" in padded]
    candidates, by_content = bracketed, False
    if not candidates:
        candidates = [letter for letter in letters if f"{letter} " in padded]
    if not candidates:
        candidates = [letter for letter in letters if f"{letter}." in padded]
    if not candidates and len(padded.split()) > 5:
        candidates = [letter for letter, text in option_texts.items() if text.lower() in padded.lower()]
        by_content = bool(candidates)
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    if by_content:
        positions = [padded.lower().rfind(option_texts[letter].lower()) for letter in candidates]
    elif bracketed:
        positions = [padded.rfind(f"({letter})") for letter in candidates]
    else:
        positions = [padded.rfind(f" {letter} ") for letter in candidates]
    return candidates[positions.index(max(positions))]  # the last mention wins; ties go to the first


def is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize(text: str) -> list:
    """Numbers -> [float rounded to 2 decimals]; strings -> [lower-cased]; one character -> padded both ways."""
    text = text.strip()
    if is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    if len(text) == 1:
        return [" " + text, text + " "]  # so a one-letter answer does not match inside any word
    return [text]


def extract_numbers(text: str) -> list:
    return _NUMBER_WITH_COMMAS.findall(text) + _NUMBER_SCIENTIFIC.findall(text) + _NUMBER_SIMPLE.findall(text)


def key_responses(response: str) -> list:
    response = response.strip().strip(".").lower()
    # The MMMU code splits sentences with r"\.\s(?=[A-Z])" on an already lower-cased string, so in effect it only
    # splits at newlines; kept for parity.
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for index, sentence in enumerate(sentences):
        indicators = _KEY_INDICATORS + (["="] if index == len(sentences) - 1 else [])
        shortest = ""
        for indicator in indicators:
            if indicator in sentence:
                tail = sentence.split(indicator)[-1].strip()
                # As in the MMMU code: an empty current pick is replaced by any tail, else only by a shorter one.
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL:
            keys.append(shortest)
    return keys or [response]


def parse_open(response: str) -> list:
    """Normalised candidate answers (strings and numbers) found in an open answer."""
    keys = key_responses(response)
    candidates = keys + [number for key in keys for number in extract_numbers(key)]
    normalized = [value for candidate in candidates for value in normalize(candidate)]
    return list(dict.fromkeys(normalized))


def open_correct(gold, predicted: list) -> bool:
    golds = gold if isinstance(gold, list) else [gold]
    normalized_golds = [value for answer in golds for value in normalize(str(answer))]
    for prediction in predicted:
        if isinstance(prediction, str):
            if any(isinstance(g, str) and g in prediction for g in normalized_golds):
                return True
        elif prediction in normalized_golds:
            return True
    return False


def read_gold_list(gold: str):
    """A gold answer written as a Python list ("['1', '2']") as a list; anything else unchanged."""
    if gold.startswith("[") and gold.endswith("]"):
        try:
            value = ast.literal_eval(gold)
        except (ValueError, SyntaxError):
            return gold
        if isinstance(value, list):
            return [str(v) for v in value]
    return gold


class MmmuAccuracy(evaluate.Metric):
    """MMMU-style parsing accuracy (see the module docstring)."""

    def _info(self):
        if self.config_name not in _CONFIGS:
            raise KeyError(f"unknown mmmu_accuracy configuration {self.config_name!r}; expected one of {_CONFIGS}")
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description="predictions, references; question_types, options, sample_ids, seed",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, question_types=None, options=None, sample_ids=None, seed=21):
        count = len(predictions)
        question_types = question_types or ["multiple-choice"] * count
        options = options or [[] for _ in range(count)]
        sample_ids = sample_ids or [str(i) for i in range(count)]
        if not len(question_types) == len(options) == len(sample_ids) == count:
            raise ValueError("question_types, options and sample_ids must have one entry per prediction")
        parsed, correct, random_guesses = [], [], 0
        for output, gold, kind, texts, sample_id in zip(predictions, references, question_types, options, sample_ids):
            if kind == "multiple-choice":
                letters = [chr(ord("A") + i) for i in range(len(texts))]
                letter = parse_multi_choice(output, letters, dict(zip(letters, texts)))
                if letter is None and self.config_name == "original" and letters:
                    letter = random.Random(f"{seed}:{sample_id}").choice(letters)
                    random_guesses += 1
                parsed.append(letter or "")
                correct.append(letter is not None and letter == gold)
            elif kind == "open":
                predicted = parse_open(output)
                target = read_gold_list(gold) if self.config_name == "strict" else gold
                parsed.append(" | ".join(str(p) for p in predicted))
                correct.append(open_correct(target, predicted))
            else:
                raise ValueError(f"question type {kind!r} of sample {sample_id}: expected 'multiple-choice' or 'open'")
        accuracy = sum(correct) / len(correct) if correct else 0.0
        return {"accuracy": accuracy, "parsed": parsed, "correct": correct, "random_guesses": random_guesses}
