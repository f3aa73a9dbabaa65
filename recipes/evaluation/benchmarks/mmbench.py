"""MMBench (English, dev split, 4,377 rows: each question with its rotated CircularEval copies) as the
Open-Qwen2VL harness ran it.

Row schema (``lmms-lab/MMBench_EN``): index, question, hint, A, B, C, D, answer (letter), category, image,
source, l2-category, split; an absent option is the string "nan".
Prompt: ``<image>\\n{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer with the option's letter from the given
choices directly.\\nAnswer:``. The harness always printed the four options, absent ones as "nan", and ignored the
hint; the raw prompt does the same, the chat prompt lists only the present options.
Scoring: original = the gold letter is a case-insensitive substring of the output, averaged over rows (as the
harness did); strict = VLMEvalKit matching under MMBench's CircularEval (lmms-eval's
``MMBench_Evaluator.eval_result``): copy k of question q has index q + k * 1,000,000 with the options rotated, and a
question counts only when every copy of it is answered correctly; the mean is over questions (a split without copies
gives the per-row mean). A question is judged on the copies scored: a copy that was dropped or cut by ``--limit`` is
left out (counted in ``extra.circular`` and logged); unlike lmms-eval, a question whose first copy was dropped still
counts, on its other copies. ``strict.row_accuracy`` keeps the per-row VLMEvalKit score.
Copies grouped by index must be the same question (same question text, same set of options, the same option right);
VLMEvalKit and lmms-eval take that on trust, so a split that breaks it (an index column renumbered or merged from
another file) would be scored on unrelated rows: scoring stops with ``CircularCopyMismatch`` naming the rows instead.
"""

from __future__ import annotations

import logging
import textwrap
from collections import Counter, defaultdict

from ..prompts import ANSWER_CUE, IMAGE, MC_INSTRUCTION, chat_text_from_raw, option_lines
from ..registry import Benchmark, Scores, register
from ..samples import EvalSample, SampleError
from ._common import accuracy_by, image_field, is_missing, score_generated_choice, text_field

logger = logging.getLogger(__name__)

PRINTED_LETTERS = ("A", "B", "C", "D")
CIRCULAR_STRIDE = 1_000_000  # copy k of question q has index q + k * CIRCULAR_STRIDE (MMBench's CircularEval)


def printed(value) -> str:
    """An option as pandas printed it in the original prompt (absent -> "nan")."""
    return "nan" if is_missing(value) else str(value)


@register
class MMBench(Benchmark):
    name = "mmbench"
    title = "MMBench-EN dev"
    hub_id = "lmms-lab/MMBench_EN"
    split = "dev"
    required_columns = ("question", "answer", "image", "A", "B")

    def to_sample(self, row: dict, index: int) -> EvalSample:
        question = text_field(row, "question")
        present = {letter: str(row[letter]) for letter in "ABCDEFGH" if not is_missing(row.get(letter))}
        if len(present) < 2 or any(letter not in PRINTED_LETTERS for letter in present):
            raise SampleError(
                f"unsupported option count: options {sorted(present)} (the MMBench prompt lists options A-D, "
                "at least two of them present)"
            )
        answer = text_field(row, "answer").strip()
        if answer not in present:
            raise SampleError(f"answer {answer!r} is not one of the options {sorted(present)}")
        image = image_field(row.get("image"))
        printed_options = "".join(f"\n{letter}. {printed(row.get(letter))}" for letter in PRINTED_LETTERS)
        text = f"{IMAGE}\n{question}{printed_options}\n{MC_INSTRUCTION}{ANSWER_CUE}"
        chat_text = chat_text_from_raw(f"{IMAGE}\n{question}\n{option_lines(present)}\n{MC_INSTRUCTION}{ANSWER_CUE}")
        meta = {"category": row.get("category"), "l2_category": row.get("l2-category"),
                "circular_index": circular_index(row.get("index")), "question": question}
        return EvalSample(self.name, self.row_id(row, index), text, [image], answer, present, meta, chat_text)

    def check_samples(self, samples: list[EvalSample]) -> None:
        check_circular_copies(samples)

    def score(self, samples, outputs) -> Scores:  # the runner has called check_samples on every process
        scores = score_generated_choice(samples, outputs, "lenient", category_key="category")
        questions = circular_questions(samples, [row["correct_strict"] for row in scores.per_sample])
        scores.strict = {
            "accuracy": sum(q["correct"] for q in questions) / len(questions),
            "row_accuracy": scores.strict["accuracy"],  # VLMEvalKit matching per row, without CircularEval
            "num_questions": len(questions),
        }
        for question in questions:  # so that samples/mmbench.jsonl shows what accuracy_strict averaged
            for position in question["positions"]:
                scores.per_sample[position]["question_correct_strict"] = question["correct"]
        scores.extra["per_category_strict"] = accuracy_by(
            [q["sample"] for q in questions], [q["correct"] for q in questions], "category"
        )
        # In a split with circular copies, a question with fewer copies scored than options (a copy dropped, or cut
        # off by --limit) is judged on the copies present: flagged, as that is more lenient than the full CircularEval.
        circular = any((s.meta.get("circular_index") or 0) >= CIRCULAR_STRIDE for s in samples)
        partial = [q for q in questions if circular and len(q["positions"]) < len(q["sample"].choices)]
        copies = Counter(len(q["positions"]) for q in questions)
        scores.extra["circular"] = {
            "split_has_copies": circular,
            "copies_per_question": {str(n): count for n, count in sorted(copies.items())},
            "questions_with_fewer_copies_than_options": len(partial),
        }
        if partial:
            logger.warning(
                "%s: %d question(s) judged on fewer circular copies than options (copies dropped or cut by --limit), "
                "e.g. the question of row %s; CircularEval is more lenient for them", self.name, len(partial),
                partial[0]["sample"].sample_id,
            )
        return scores


def circular_index(index) -> int | None:
    """A row's ``index`` as an integer (its question is ``index % 1e6``); None for data without an index."""
    if is_missing(index):
        return None
    if isinstance(index, float) and index.is_integer():  # pandas-exported files may store it as a float
        return int(index)
    try:
        return int(str(index).strip())
    except ValueError:
        raise SampleError(f"index {index!r} is not an integer (MMBench groups circular copies by index)") from None


def circular_questions(samples, row_correct: list[bool]) -> list[dict]:
    """MMBench's questions: rows grouped by ``index % 1e6`` (a row without an index is its own question), each
    ``correct`` only when every copy is, with ``positions`` (its rows in ``samples``) and ``sample`` (the copy with
    the lowest index: the question as first posed, whose category it is reported under)."""
    if len(row_correct) != len(samples):
        raise ValueError(f"got {len(row_correct)} scores for {len(samples)} samples")
    return [{"sample": samples[positions[0]], "positions": positions, "correct": all(row_correct[i] for i in positions)}
            for positions in circular_groups(samples)]


def circular_groups(samples) -> list[list[int]]:
    """Positions in ``samples`` of each question's copies, the copy with the lowest index first (a row without an
    index is a question of its own)."""
    groups: dict = defaultdict(list)
    for position, sample in enumerate(samples):
        index = sample.meta.get("circular_index")
        groups[("row", position) if index is None else ("question", index % CIRCULAR_STRIDE)].append(position)
    return [sorted(positions, key=lambda p: samples[p].meta.get("circular_index") or 0)
            for positions in groups.values()]


class CircularCopyMismatch(ValueError):
    """Rows grouped as rotated copies of one MMBench question (same ``index % 1e6``) that are not the same question."""


MAX_LISTED_MISMATCHES = 5


def copy_signature(sample: EvalSample) -> dict:
    """What every rotated copy of a question shares: its text, its set of options and the option that is right."""
    question = sample.meta.get("question")
    return {
        "question": None if question is None else str(question).strip(),
        "options": sorted(str(text).strip() for text in sample.choices.values()),
        "right option": str(sample.choices.get(sample.answer, "")).strip(),
    }


def _shown(value) -> str:
    return textwrap.shorten(repr(value), width=80, placeholder="...")


def copy_mismatches(samples: list[EvalSample], positions: list[int]) -> list[str]:
    """How each copy of one question (``positions`` in ``samples``, first posed first) differs from its first copy."""
    first = samples[positions[0]]
    expected = copy_signature(first)
    found = []
    for position in positions[1:]:
        copy = samples[position]
        actual = copy_signature(copy)
        differences = [f"{field} {_shown(actual[field])} vs {_shown(expected[field])}"
                       for field in expected if actual[field] != expected[field]]
        if differences:
            found.append(f"row {copy.sample_id} vs row {first.sample_id}: " + "; ".join(differences))
    return found


def check_circular_copies(samples: list[EvalSample]) -> None:
    """Raise ``CircularCopyMismatch`` naming the rows when copies grouped by index are not one question."""
    mismatches = [line for positions in circular_groups(samples) for line in copy_mismatches(samples, positions)]
    if not mismatches:
        return
    listed = "\n  ".join(mismatches[:MAX_LISTED_MISMATCHES])
    more = len(mismatches) - MAX_LISTED_MISMATCHES
    raise CircularCopyMismatch(
        f"mmbench: {len(mismatches)} row(s) share an index % {CIRCULAR_STRIDE:,} with another row but are not a "
        f"rotated copy of its question (CircularEval would judge unrelated rows together):\n  {listed}"
        + (f"\n  ... and {more} more" if more > 0 else "")
        + "\nFix the data's index column (copy k of question q has index q + k * 1,000,000)."
    )
