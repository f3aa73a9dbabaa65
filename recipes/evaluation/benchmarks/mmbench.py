"""MMBench (English, dev split, 4,377 questions) as the Open-Qwen2VL harness ran it.

Row schema (``lmms-lab/MMBench_EN``): index, question, hint, A, B, C, D, answer (letter), category, image,
source, l2-category, split; an absent option is the string "nan".
Prompt: ``<image>\\n{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer with the option's letter from the given
choices directly.\\nAnswer:``. The harness always printed the four options, absent ones as "nan", and ignored the
hint; the raw prompt does the same, the chat prompt lists only the present options.
Scoring: original = the gold letter is a case-insensitive substring of the output; strict = VLMEvalKit matching.
"""

from __future__ import annotations

from ..prompts import ANSWER_CUE, IMAGE, MC_INSTRUCTION, chat_text_from_raw, option_lines
from ..registry import Benchmark, register
from ..samples import EvalSample, SampleError
from ._common import image_field, is_missing, score_generated_choice, text_field

PRINTED_LETTERS = ("A", "B", "C", "D")


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
        meta = {"category": row.get("category"), "l2_category": row.get("l2-category")}
        return EvalSample(self.name, self.row_id(row, index), text, [image], answer, present, meta, chat_text)

    def score(self, samples, outputs):
        return score_generated_choice(samples, outputs, "lenient", category_key="category")
