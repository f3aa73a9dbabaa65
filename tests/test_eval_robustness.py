"""Evaluation rules and checks a reviewer found wrong: MMBench's CircularEval, textvqa_ocr's OCR column, the chat
template name, and lmms-eval plugin errors that name the doc. Expected scores are worked out by hand in comments."""

import json
import logging
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures.eval import easy_vqa_image, fixture, write_local_copy  # noqa: E402

from modeling_open_qwen2vl import OpenQwen2VLConfig, OpenQwen2VLForConditionalGeneration, build_processor  # noqa: E402
from recipes.evaluation import EvalOptions, evaluate_benchmark, get_benchmark  # noqa: E402
from recipes.evaluation.prompts import PromptFormatter, PromptOptionError  # noqa: E402
from recipes.evaluation.report import write_reports  # noqa: E402
from recipes.evaluation.resume import PredictionSpool  # noqa: E402
from recipes.evaluation.samples import SampleError  # noqa: E402

STRIDE = 1_000_000
SHAPES = ["circle", "triangle", "rectangle", "star"]


def mmbench_row(index: int, options: list[str], answer: str, category: str, image="easy_vqa:1") -> dict:
    """An MMBench_EN row (the fixture's schema) whose gold letter is where ``answer`` sits among ``options``."""
    padded = options + ["nan"] * (4 - len(options))
    return {"index": index, "question": f"Question {index % STRIDE}?", "hint": "nan", **dict(zip("ABCD", padded)),
            "answer": "ABCD"[options.index(answer)], "category": category, "image": image, "source": "test",
            "l2-category": "l2", "comment": "nan", "split": "dev"}


def rotated(options: list[str], shift: int) -> list[str]:
    return options[shift:] + options[:shift]


# Base questions first, then their copies (index + k * 1e6, options rotated): question 7 (4 options, 4 copies),
# question 8 (yes/no, 2 copies), question 10 (yes/no, 2 copies, the second without an image -> dropped).
CIRCULAR_ROWS = [
    mmbench_row(7, SHAPES, "rectangle", "shapes"),
    mmbench_row(8, ["yes", "no"], "yes", "yesno"),
    mmbench_row(10, ["yes", "no"], "yes", "yesno"),
    mmbench_row(STRIDE + 7, rotated(SHAPES, 1), "rectangle", "shapes"),
    mmbench_row(STRIDE + 8, ["no", "yes"], "yes", "yesno"),
    mmbench_row(STRIDE + 10, ["no", "yes"], "yes", "yesno", image=None),
    mmbench_row(2 * STRIDE + 7, rotated(SHAPES, 2), "rectangle", "shapes"),
    mmbench_row(3 * STRIDE + 7, rotated(SHAPES, 3), "rectangle", "shapes"),
]


class KnowsTheAnswer:
    """Stands in for ``Predictor``: answers each prompt with the letter of "rectangle" / "yes", except the copy of
    question 7 whose options start with "A. star" (gold D), where it answers A."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.seen = []

    def generate(self, prompts, images, max_new_tokens, stop_token_ids):
        self.seen.extend(prompts)
        return ["A" if "\nA. star\n" in p else re.search(r"\n([A-D])\. (?:rectangle|yes)\n", p).group(1)
                for p in prompts]


def run_mmbench(data_dir, processor, limit=None, spool=None):
    predictor = KnowsTheAnswer(processor.tokenizer)
    options = EvalOptions(data_dir=data_dir, limit=limit, spool=spool)
    result = evaluate_benchmark(get_benchmark("mmbench"), predictor, options, PromptFormatter("raw", processor))
    return result, predictor


# --- 1. MMBench: the benchmark's own rule is CircularEval over questions ------------------------------------------


def test_mmbench_strict_score_credits_a_question_only_when_every_copy_is_right(tmp_path, processor, caplog):
    write_local_copy("mmbench", tmp_path, CIRCULAR_ROWS)
    with caplog.at_level(logging.WARNING, logger="recipes.evaluation.benchmarks.mmbench"):
        result, _ = run_mmbench(tmp_path, processor)
    scores = result.scores
    assert result.drops.total == 1 and [e["id"] for e in result.drops.examples] == [str(STRIDE + 10)]
    # 7 rows scored; only 3000007 is wrong -> 6/7 per row, under both letter rules.
    assert scores.original["accuracy"] == pytest.approx(6 / 7)
    assert scores.strict["row_accuracy"] == pytest.approx(6 / 7)
    # Questions: 7 (3 of 4 copies right -> wrong), 8 (2 of 2 -> right), 10 (its one scored copy right) -> 2/3.
    assert scores.strict["accuracy"] == pytest.approx(2 / 3)
    assert scores.strict["num_questions"] == 3
    assert scores.extra["per_category_strict"] == {"shapes": 0.0, "yesno": 1.0}
    assert scores.extra["per_category"] == {"shapes": pytest.approx(3 / 4), "yesno": 1.0}  # harness: per row
    # Question 10 lost a copy: judged on the other, counted and logged.
    assert scores.extra["circular"] == {"split_has_copies": True, "copies_per_question": {"1": 1, "2": 1, "4": 1},
                                        "questions_with_fewer_copies_than_options": 1}
    assert "1 question(s) judged on fewer circular copies than options" in caplog.text
    assert "the question of row 10" in caplog.text

    # The reports carry the question-level score and say, per row, what it averaged.
    out = tmp_path / "out"
    summary = write_reports(out, "m", {"prompt_format": "raw", "batch_size": 8}, [result], False)
    assert summary["benchmarks"]["mmbench"]["accuracy_strict"] == pytest.approx(2 / 3)
    records = {r["id"]: r for r in map(json.loads, (out / "samples" / "mmbench.jsonl").read_text().splitlines())}
    assert records[str(STRIDE + 7)]["correct_strict"] is True
    assert records[str(STRIDE + 7)]["question_correct_strict"] is False
    assert "| MMBench-EN dev | 7 (1 dropped) | 85.7 | 66.7 |" in (out / "results.md").read_text()
    assert "CircularEval" in (out / "results.md").read_text()


def test_mmbench_limit_and_resume_score_the_copies_present(tmp_path, processor, caplog):
    """--limit cuts copies off; a resumed run reuses the earlier predictions and scores every copy together."""
    write_local_copy("mmbench", tmp_path, CIRCULAR_ROWS)
    (tmp_path / "spool").mkdir()
    spool = PredictionSpool(tmp_path / "spool", rank=0)

    # The first 3 rows are the base questions only: no copies, so the rule is the per-row one (3/3), nothing flagged.
    first, _ = run_mmbench(tmp_path, processor, limit=3, spool=spool)
    assert first.scores.strict["accuracy"] == 1.0
    assert first.scores.extra["circular"]["split_has_copies"] is False
    assert first.scores.extra["circular"]["questions_with_fewer_copies_than_options"] == 0

    # 5 rows: question 7 has 2 of its 4 copies (both right), 8 both, 10 one of two -> 3/3, two questions flagged.
    with caplog.at_level(logging.WARNING, logger="recipes.evaluation.benchmarks.mmbench"):
        second, predictor = run_mmbench(tmp_path, processor, limit=5, spool=spool)
    assert len(predictor.seen) == 2  # rows 3 and 4; rows 0-2 came from the spool
    assert second.scores.strict["accuracy"] == 1.0
    assert second.scores.extra["circular"]["questions_with_fewer_copies_than_options"] == 2
    assert "2 question(s) judged on fewer circular copies than options" in caplog.text

    # Resumed without the limit: only the last two copies of question 7 are predicted; the score is the full run's.
    full, predictor = run_mmbench(tmp_path, processor, spool=spool)
    assert [p.split("\n")[2] for p in predictor.seen] == ["A. rectangle", "A. star"]
    assert full.scores.strict["accuracy"] == pytest.approx(2 / 3)
    assert full.scores.strict["row_accuracy"] == pytest.approx(6 / 7)


def test_mmbench_rows_without_an_index_are_separate_questions(processor):
    bench = get_benchmark("mmbench")
    rows = [mmbench_row(i, SHAPES, "rectangle", "shapes") for i in (1, 2)]
    for row in rows:
        del row["index"]
        row["image"] = easy_vqa_image(1)
    samples = [bench.to_sample(row, i) for i, row in enumerate(rows)]
    scores = bench.score(samples, ["C", "A"])  # gold C: right, wrong -> one question of two
    assert scores.strict["accuracy"] == 0.5 and scores.strict["num_questions"] == 2


def test_mmbench_copies_that_are_not_the_same_question_fail_by_row(tmp_path, processor):
    """Rows sharing index % 1e6 must repeat one question with its options rotated; otherwise CircularEval would judge
    unrelated rows together, so scoring stops and names each offending row and what differs."""
    rows = [dict(row) for row in CIRCULAR_ROWS]
    rows[4]["question"] = "Is this another question?"  # 1000008: copy of question 8 with other text
    rows[3]["D"] = "hexagon"  # 1000007: "circle" replaced, so its option set differs from row 7's
    rows[6]["answer"] = "B"  # 2000007: options rotated but the answer not ("star" instead of "rectangle")
    write_local_copy("mmbench", tmp_path, rows)
    from recipes.evaluation.benchmarks.mmbench import CircularCopyMismatch

    with pytest.raises(CircularCopyMismatch) as caught:
        run_mmbench(tmp_path, processor)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert message.startswith("mmbench: 3 row(s) share an index % 1,000,000 with another row but are not a rotated "
                              "copy of its question")
    assert "row 1000007 vs row 7: options ['hexagon', 'rectangle', 'star', 'triangle'] vs " \
           "['circle', 'rectangle', 'star', 'triangle']" in message
    assert "row 1000008 vs row 8: question 'Is this another question?' vs 'Question 8?'" in message
    assert "row 2000007 vs row 7: right option 'star' vs 'rectangle'" in message
    assert "row 3000007" not in message  # a proper copy is not listed

    # Checked on every process, not only the one that scores, so that all of them fail the benchmark alike.
    not_main = SimpleNamespace(process_index=0, num_processes=1, is_main_process=False)
    options = EvalOptions(data_dir=tmp_path, show_progress=False)
    with pytest.raises(CircularCopyMismatch, match="mmbench: 3 row"):
        evaluate_benchmark(get_benchmark("mmbench"), KnowsTheAnswer(processor.tokenizer), options,
                           PromptFormatter("raw", processor), not_main)


def test_mmbench_copies_of_one_question_pass_the_check_in_either_prompt_format(processor):
    """Copies are compared on the question and option texts, not on the prompt, and surrounding spaces do not count."""
    bench = get_benchmark("mmbench")
    rows = [{**mmbench_row(index, options, "rectangle", "shapes"), "image": easy_vqa_image(1)}
            for index, options in ((7, SHAPES), (STRIDE + 7, rotated(SHAPES, 1)))]
    rows[1]["question"] = " Question 7? "
    samples = [bench.to_sample(row, i) for i, row in enumerate(rows)]
    scores = bench.score(samples, ["C", "B"])
    assert scores.strict["accuracy"] == 1.0 and scores.strict["num_questions"] == 1


def test_mmbench_index_must_be_an_integer():
    bench = get_benchmark("mmbench")
    row = {**mmbench_row(0, SHAPES, "rectangle", "shapes"), "image": easy_vqa_image(1)}
    assert bench.to_sample({**row, "index": 1000007.0}, 0).meta["circular_index"] == 1000007  # pandas float export
    expected = r"^index 'q7' is not an integer \(MMBench groups circular copies by index\)$"
    with pytest.raises(SampleError, match=expected):
        bench.to_sample({**row, "index": "q7"}, 0)


# --- 2. textvqa_ocr needs the OCR tokens -----------------------------------------------------------------------------


def test_textvqa_ocr_requires_the_ocr_tokens_column(tmp_path, processor):
    rows = [{k: v for k, v in row.items() if k != "ocr_tokens"} for row in fixture("textvqa")["rows"]]
    write_local_copy("textvqa", tmp_path, rows)
    predictor = KnowsTheAnswer(processor.tokenizer)
    formatter = PromptFormatter("raw", processor)
    with pytest.raises(ValueError, match=re.escape(
        f"textvqa_ocr: the data from {tmp_path} lacks column(s) ['ocr_tokens']; expected the schema of "
        "lmms-lab/textvqa"
    )):
        evaluate_benchmark(get_benchmark("textvqa_ocr"), predictor, EvalOptions(data_dir=tmp_path), formatter)
    assert predictor.seen == []
    # Plain textvqa does not use the column.
    assert "ocr_tokens" not in get_benchmark("textvqa").required_columns


# --- 3. the chat template name is checked against the processor's ---------------------------------------------------


def test_unknown_chat_template_name_is_rejected(processor):
    with pytest.raises(PromptOptionError, match=re.escape(
        "unknown chat template 'chatmll'; the processor's templates: chatml, compat, default"
    )):
        PromptFormatter("chat", processor, "chatmll")
    # A known name selects that template (compat: the original SFT strings, quirks included).
    assert PromptFormatter("chat", processor, "compat")("<image>\nHi") == (
        "<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nHi<|im_end|>"
        "assistant\n"
    )
    with pytest.raises(PromptOptionError, match="chat template 'chatml' given with the raw prompt format"):
        PromptFormatter("raw", processor, "chatml")


def test_processor_without_a_default_template_is_rejected():
    processor = build_processor(OpenQwen2VLConfig.tiny())
    processor.chat_template = {"chatml": processor.chat_template["chatml"]}
    with pytest.raises(PromptOptionError, match="no default chat template; name one of chatml"):
        PromptFormatter("chat", processor)
    processor.chat_template = None
    with pytest.raises(PromptOptionError, match="no default chat template; use the raw prompt format"):
        PromptFormatter("chat", processor)


@pytest.fixture()
def processor_only_folder(tmp_path):
    """A folder with the processor's files but no model: loading the model from it would fail with OSError."""
    folder = tmp_path / "model"
    build_processor(OpenQwen2VLConfig.tiny()).save_pretrained(folder)
    return folder


def test_cli_rejects_a_misspelt_template_before_loading_the_model(processor_only_folder, tmp_path, capsys):
    from recipes.eval import main

    base = ["--model", str(processor_only_folder), "--benchmarks", "pope", "--output", str(tmp_path / "out"),
            "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main(base + ["--prompt", "chat", "--chat-template", "chatmll"])
    assert exit_info.value.code == 2
    assert ("error: --chat-template: unknown chat template 'chatmll'; the processor's templates: chatml, compat, "
            "default") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was run
    with pytest.raises(SystemExit) as exit_info:
        main(base + ["--chat-template", "chatml"])  # --prompt raw
    assert exit_info.value.code == 2
    assert "error: --chat-template applies to --prompt chat only" in capsys.readouterr().err


# --- 4. lmms-eval plugin errors name the doc --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra (pip install --no-deps lmms-eval)")
    from recipes.evaluation.lmms_eval_plugin import OpenQwen2VLLmms

    folder = tmp_path_factory.mktemp("plugin") / "model"
    torch.manual_seed(0)
    config = OpenQwen2VLConfig.tiny()
    OpenQwen2VLForConditionalGeneration(config).save_pretrained(folder)
    build_processor(config).save_pretrained(folder)
    lm = OpenQwen2VLLmms(pretrained=str(folder), device="cpu", batch_size=2, max_new_tokens=2)
    lm.task_dict = {"mytask": {"test": [{"img": easy_vqa_image(0)}, {"img": easy_vqa_image(1)}, {"img": "clip.mp4"}]}}
    return lm


def request(context, doc_id, visual, second=None):
    return SimpleNamespace(args=(context, second if second is not None else {"max_new_tokens": 2}, visual, doc_id,
                                 "mytask", "test"))


def test_plugin_marker_mismatch_names_the_doc(plugin):
    good = request("What shape?", 0, lambda d: [d["img"]])
    bad = request("<image> left, <image> right: same?", 1, lambda d: [d["img"]])
    with pytest.raises(ValueError, match=re.escape(
        "task mytask split test doc 1: context has 2 <image> markers for 1 images"
    )):
        plugin.generate_until([good, bad])
    with pytest.raises(ValueError, match=re.escape("task mytask split test doc 1: context has 2 <image> markers")):
        plugin.loglikelihood([request("<image><image> Answer:", 1, lambda d: [d["img"]], second=" yes")])


def test_plugin_non_image_visual_names_the_doc_and_the_offending_item(plugin):
    good = request("What shape?", 0, lambda d: [d["img"]])
    mixed = request("Which?", 2, lambda d: [easy_vqa_image(2), d["img"]])  # an image, then a video path
    with pytest.raises(NotImplementedError, match=re.escape(
        "open_qwen2vl takes images only; task mytask split test doc 2 gave a str as visual 1 ('clip.mp4')"
    )):
        plugin.generate_until([good, mixed])


def test_plugin_rejects_a_misspelt_template_before_loading_the_model(processor_only_folder):
    pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra (pip install --no-deps lmms-eval)")
    from recipes.evaluation.lmms_eval_plugin import OpenQwen2VLLmms

    with pytest.raises(PromptOptionError, match="unknown chat template 'chatmll'"):
        OpenQwen2VLLmms(pretrained=str(processor_only_folder), device="cpu", chat_template="chatmll")
