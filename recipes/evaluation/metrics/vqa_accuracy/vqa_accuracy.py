"""VQA soft accuracy (TextVQA, VQAv2 style) against ten human answers.

Answers are normalised as the EvalAI / VQA evaluation does: lower-case, drop "," and "?" tokens, strip
punctuation (kept between digits), drop a period that is not a decimal point, spell-out numbers ("two" -> "2"),
drop articles, restore contractions ("dont" -> "don't").

Configurations:

- ``official``: the VQA evaluation: for each of the ten answers, min(1, matches among the other nine / 3); the
  score is the mean over the ten.
- ``m4c``: what the Open-Qwen2VL harness ran: the same soft score (M4C's ``TextVQAAccuracyEvaluator``), after the
  harness's own clean-up of the generated text: newlines, "." and "," removed, lower-cased. The clean-up matters
  for decimals ("3.5" becomes "35") and for answers the model ends with a period.

Inputs: ``predictions`` (text), ``references`` (the list of human answers). Output: ``accuracy`` plus per-sample
``parsed`` (normalised prediction) and ``correct`` (the soft score in [0, 1]).
"""

import re

import datasets
import evaluate

_CITATION = """\
@inproceedings{singh2019textvqa, title={Towards VQA Models That Can Read}, author={Singh, Amanpreet and others},
booktitle={CVPR}, year={2019}}
"""

_CONFIGS = ("official", "m4c")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the VQA code's pattern, look-behind typo included
# Contractions as written correctly; the normaliser maps spellings with one apostrophe left out to these.
_CONTRACTIONS = [
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "i'd", "i'd've", "i'm",
    "i've", "isn't", "it'd", "it'd've", "it'll", "let's", "ma'am", "mightn't", "mightn't've", "might've", "mustn't",
    "must've", "needn't", "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd", "she'd've", "she's",
    "should've", "shouldn't", "shouldn't've", "somebody'd", "somebody'd've", "somebody'll", "somebody's",
    "someone'd", "someone'd've", "someone'll", "someone's", "something'd", "something'd've", "something'll",
    "that's", "there'd", "there'd've", "there're", "there's", "they'd", "they'd've", "they'll", "they're",
    "they've", "'twas", "wasn't", "we'd", "we'd've", "we're", "we've", "weren't", "what'll", "what're", "what's",
    "what've", "when's", "where'd", "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've",
    "why'll", "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've",
    "you'd", "you'd've", "you'll", "you're", "you've",
]
# Spellings the table does not map: English words ("were", "shed", "lets") and the I-contractions, which the table
# lists capitalised ("Im", "Id've") and so never match a lower-cased answer.
_LEFT_ALONE = {"id", "im", "ive", "id've", "i'dve", "lets", "shed", "shes", "wed", "were"}


def _contraction_spellings() -> dict:
    """The EvalAI table: each contraction spelt with ONE of its apostrophes left out ("dont", "couldnt've",
    "couldn'tve"; not "couldntve"), except those in ``_LEFT_ALONE``, and with the table's one reversed entry."""
    spellings = {}
    for word in _CONTRACTIONS:
        for i in (i for i, char in enumerate(word) if char == "'"):
            spelling = word[:i] + word[i + 1:]
            if spelling not in _LEFT_ALONE:
                spellings.setdefault(spelling, word)
    # The table has this entry reversed ("somebody'd" -> "somebodyd"); scores depend on it, so it is kept.
    del spellings["somebodyd"]
    spellings["somebody'd"] = "somebodyd"
    return spellings


_CONTRACTION_MAP = _contraction_spellings()


def strip_punctuation(text: str) -> str:
    # Whether a mark is deleted or becomes a space is decided on the answer as given, not as edited by earlier marks
    # (the EvalAI code tests its input and edits a copy): in 'coca"-cola t-shirt' the '"' becomes a space, which
    # must not make the '-' of "t-shirt" count as spaced ("t shirt", not "tshirt").
    out = text
    for mark in _PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or _COMMA_BETWEEN_DIGITS.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_DECIMAL.sub("", out)


def digits_and_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTION_MAP.get(word, word))
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """The EvalAI answer processor."""
    answer = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return digits_and_articles(strip_punctuation(answer))


def soft_score(prediction: str, answers: list) -> float:
    """Mean over the answers of min(1, how many of the *other* answers equal the prediction / 3)."""
    scores = []
    for index in range(len(answers)):
        others = answers[:index] + answers[index + 1 :]
        scores.append(min(1.0, sum(other == prediction for other in others) / 3))
    return sum(scores) / len(scores) if scores else 0.0


def m4c_clean_output(output: str) -> str:
    """The harness's own clean-up of the generated text before scoring."""
    return output.replace("\n", "").replace(".", "").replace(",", "").lower()


class VqaAccuracy(evaluate.Metric):
    """VQA soft accuracy (see the module docstring)."""

    def _info(self):
        if self.config_name not in _CONFIGS:
            raise KeyError(f"unknown vqa_accuracy configuration {self.config_name!r}; expected one of {_CONFIGS}")
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description="predictions: text; references: list of human answers",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        parsed, correct = [], []
        for output, answers in zip(predictions, references):
            answers = [normalize_answer(answer) for answer in answers]
            cleaned = m4c_clean_output(output) if self.config_name == "m4c" else output
            prediction = normalize_answer(cleaned)
            parsed.append(prediction)
            correct.append(soft_score(prediction, answers))
        accuracy = sum(correct) / len(correct) if correct else 0.0
        return {"accuracy": accuracy, "parsed": parsed, "correct": correct}
