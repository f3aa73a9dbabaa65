"""Each benchmark: hand-written rows in its Hub schema -> local copy -> loader -> prompt -> scorer.

A scripted predictor answers each prompt with a chosen output, so every expected score below is worked out by hand
from the rules (see the comments), independently of the code under test.
"""

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures.eval import easy_vqa_image, fixture, write_local_copy  # noqa: E402

from recipes.evaluation import EvalOptions, UnknownBenchmarkError, evaluate_benchmark, get_benchmark  # noqa: E402
from recipes.evaluation.prompts import PromptFormatter  # noqa: E402


class ScriptedPredictor:
    """Stands in for ``Predictor``: answers by the first script key found in the prompt, records what it saw."""

    def __init__(self, tokenizer, script: dict):
        self.tokenizer = tokenizer
        self.script = script
        self.seen = []  # (prompt, images)

    def _lookup(self, prompt):
        for key, value in self.script.items():
            if key in prompt:
                return value
        raise AssertionError(f"no scripted answer for prompt {prompt!r}")

    def _record(self, prompts, images):
        self.seen.extend(zip(prompts, images))
        return [self._lookup(p) for p in prompts]

    def generate(self, prompts, images, max_new_tokens, stop_token_ids):
        return self._record(prompts, images)

    def letter_probabilities(self, prompts, images, letters):
        assert tuple(letters) == ("A", "B", "C", "D")
        return self._record(prompts, images)

    def continuation_scores(self, prompts, images, continuations):
        scores = self._record(prompts, images)
        return [[(s, False) for s in row] for row in scores]


def run(name, tmp_path, processor, script, prompt_format="raw", limit=None, rows=None):
    if name != "easy_vqa":
        write_local_copy(get_benchmark(name).data_name or name, tmp_path, rows)
    predictor = ScriptedPredictor(processor.tokenizer, script)
    options = EvalOptions(data_dir=None if name == "easy_vqa" else tmp_path, limit=limit, prompt_format=prompt_format)
    formatter = PromptFormatter(prompt_format, processor)
    result = evaluate_benchmark(get_benchmark(name), predictor, options, formatter)
    return result, predictor


def same_image(a, b) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def test_mmbench(tmp_path, processor):
    script = {
        "What shape": "C",  # gold C: both rules
        "single colour": "A",  # gold A: both rules
        "Which colour": "It is blue",  # gold B: lenient finds "b" in "blue"; VLMEvalKit reads option C (blue)
    }
    result, predictor = run("mmbench", tmp_path, processor, script)
    assert [s.sample_id for s in result.samples] == ["1001", "1002", "1003"]
    assert result.scores.original["accuracy"] == pytest.approx(3 / 3)
    assert result.scores.strict["accuracy"] == pytest.approx(2 / 3)
    assert result.drops.total == 2
    reasons = " | ".join(result.drops.reasons)
    assert "missing image" in reasons and "unsupported option count" in reasons
    assert {e["id"] for e in result.drops.examples} == {"1004", "1005"}
    # The original prompt lists all four options, an absent one as "nan", and ends with the answer cue.
    assert result.samples[1].prompt == (
        "<s><image>\nIs the shape filled with a single colour?\nA. yes\nB. no\nC. nan\nD. nan\n"
        "Answer with the option's letter from the given choices directly.\nAnswer:"
    )
    assert same_image(predictor.seen[0][1][0], easy_vqa_image(1))
    assert result.scores.extra["per_category"] == {"attribute_recognition": 1.0, "object_localization": 1.0}


def test_mmbench_chat_prompt_lists_only_present_options(tmp_path, processor):
    script = {"single colour": "A", "What shape": "C", "Which colour": "B"}
    result, _ = run("mmbench", tmp_path, processor, script, prompt_format="chat")
    assert result.samples[1].prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
        "Is the shape filled with a single colour?\nA. yes\nB. no\n"
        "Answer with the option's letter from the given choices directly.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert result.scores.original["accuracy"] == 1.0


def test_seedbench_keeps_image_questions_only(tmp_path, processor):
    script = {
        "in the picture": "A",  # gold A
        "colour dominates": "d",  # gold D: lenient yes; VLMEvalKit needs the capital letter -> no
        "Where is": "C",  # gold B
    }
    result, _ = run("seedbench", tmp_path, processor, script)
    assert result.num_rows == 4  # the video question is not part of the benchmark (filtered before --limit)
    assert [s.sample_id for s in result.samples] == ["101", "102", "105"]
    assert result.scores.original["accuracy"] == pytest.approx(2 / 3)
    assert result.scores.strict["accuracy"] == pytest.approx(1 / 3)
    assert result.drops.total == 1 and "unsupported option count: 3" in next(iter(result.drops.reasons))


def test_mmstar(tmp_path, processor):
    script = {"Which shape": "B", "background": "white"}  # gold B; gold A: only VLMEvalKit's text match gets it
    result, _ = run("mmstar", tmp_path, processor, script)
    assert result.scores.original["accuracy"] == pytest.approx(1 / 2)
    assert result.scores.strict["accuracy"] == pytest.approx(2 / 2)
    assert result.samples[1].choices == {"A": "white", "B": "black", "C": "grey", "D": "blue"}
    assert result.samples[0].prompt.startswith("<s><image>\nQuestion: Which shape is drawn?\nOptions: A: a circle")
    assert result.drops.reasons == Counter({"missing image (image)": 1})


def test_mathvista(tmp_path, processor):
    script = {
        # gold C / "rectangle". As the harness ran, the open-answer rule: a one-letter gold matches only as " c" or
        # "c " in the lowercased output, which "(c) rectangle" does not hold; the intended multiple-choice parse
        # finds "(C)"; MathVista's own rule finds the choice text.
        "most sides": "(C) rectangle",
        "triangle have": "3 sides",  # MMMU-style finds the number 3; MathVista's int("3 sides") fails
        "ratio of width": "1.5",  # all rules
    }
    result, _ = run("mathvista", tmp_path, processor, script)
    assert result.scores.original["accuracy"] == pytest.approx(2 / 3)
    assert result.scores.extra["intended_mmmu_style"]["accuracy"] == pytest.approx(3 / 3)
    assert result.scores.strict["accuracy"] == pytest.approx(2 / 3)
    assert [r["correct"] for r in result.scores.per_sample] == [False, True, True]
    assert [r["correct_strict"] for r in result.scores.per_sample] == [True, False, True]
    assert result.samples[0].answer == "C" and result.samples[0].meta["gold_text"] == "rectangle"
    assert result.samples[1].prompt.endswith("\nAnswer the question using a single word or phrase.\nAnswer:")
    assert result.drops.total == 1 and "unsupported option count: 10" in next(iter(result.drops.reasons))


def test_ai2d_by_letter_probabilities(tmp_path, processor):
    script = {
        "Which label": [0.1, 0.6, 0.2, 0.1],  # gold B (1): argmax B under both rules
        "egg stage": [0.3, 0.2, 0.1, 0.4],  # gold A (0), 3 options: the original picks D, restricted to A-C picks A
    }
    result, _ = run("ai2d", tmp_path, processor, script)
    assert result.scores.original["accuracy"] == pytest.approx(1 / 2)
    assert result.scores.strict["accuracy"] == pytest.approx(2 / 2)
    assert [r["parsed"] for r in result.scores.per_sample] == ["B", "D"]
    assert [r["parsed_strict"] for r in result.scores.per_sample] == ["B", "A"]
    assert result.drops.total == 1 and "unsupported option count: 5" in next(iter(result.drops.reasons))


def test_textvqa_and_its_ocr_variant(tmp_path, processor):
    script = {
        "brand": "Dakota.",  # 5 of 10 annotators said dakota: soft score 1.0 under both rules
        "number": "2.2",  # the harness's clean-up turns it into "22" (1 annotator: 9 x 1/3 / 10 = 0.3); 0 officially
    }
    result, _ = run("textvqa", tmp_path, processor, script)
    assert result.scores.original["accuracy"] == pytest.approx((1.0 + 0.3) / 2)
    assert result.scores.strict["accuracy"] == pytest.approx((1.0 + 0.0) / 2)
    assert result.drops.reasons == Counter({"missing answers": 1})
    ocr, _ = run("textvqa_ocr", tmp_path, processor, script)
    assert ocr.samples[0].prompt == (
        "<s><image>\nQuestion: what is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL, "
        "Single-Use, Camera\nAnswer the question using a single word or phrase.\nAnswer:"
    )
    assert "Reference OCR token" not in ocr.samples[1].prompt  # no OCR tokens for that row


def test_pope(tmp_path, processor):
    script = {
        "triangle": "Yes",  # adversarial, gold yes
        "dog": "No,",  # adversarial, gold no
        "circle": "yes, there is a circle",  # popular, gold yes: not exactly "yes" for the harness
        "car": "There is no car.",  # random, gold no: POPE's rule reads "no"
    }
    result, _ = run("pope", tmp_path, processor, script)
    # harness: mean of per-category accuracies (adversarial 2/2, popular 0/1, random 0/1); official: pooled 4/4
    assert result.scores.original["accuracy"] == pytest.approx((1.0 + 0.0 + 0.0) / 3)
    assert result.scores.strict["accuracy"] == pytest.approx(1.0)
    assert result.drops.reasons == Counter({"answer 'maybe' is not yes/no": 1})


def test_mmmu_prompts_and_images(tmp_path, processor):
    script = {"Which shape": "(B)", "How many shapes": "There are 2 shapes", "no corners": "zzz", "pendulum": "B"}
    result, predictor = run("mmmu", tmp_path, processor, script)
    first = result.samples[0]
    assert first.prompt == (
        "<s>The following are multiple choice questions about  Visual Arts.\n\nWhich shape is shown in <image>\n?\n"
        "A. A circle\nB. A triangle\nC. A rectangle\nD. A star\n"
        "Answer with the option's letter from the given choices directly.\nAnswer:"
    )
    images = {prompt: imgs for prompt, imgs in predictor.seen}
    two = images[result.samples[1].prompt]  # two tags -> image_1 then image_2
    assert len(two) == 2 and same_image(two[0], easy_vqa_image(27)) and same_image(two[1], easy_vqa_image(28))
    cycled = images[result.samples[2].prompt]  # tags in the options, one image: cycled
    assert len(cycled) == 2 and all(same_image(i, easy_vqa_image(29)) for i in cycled)
    assert images[result.samples[3].prompt] == []  # no tag: asked without its image, as the harness did
    per_sample = result.scores.per_sample
    assert [r["correct_strict"] for r in per_sample] == [True, True, False, True]
    random_hit = per_sample[2]["parsed"] == "A"  # the unparsable answer gets a random letter under the harness
    assert result.scores.original["accuracy"] == pytest.approx((3 + random_hit) / 4)
    assert result.scores.original["random_guesses"] == 1
    assert result.drops.total == 1


def test_easy_vqa_with_baselines(processor):
    import easy_vqa

    questions, answers, _ = easy_vqa.get_test_questions()
    kinds = {"yes/no": ["yes", "no"], "shape": ["circle", "rectangle", "triangle"],
             "color": ["red", "green", "blue", "black", "gray", "teal", "brown", "yellow"]}
    kind_of = {a: k for k, members in kinds.items() for a in members}
    limit = 12
    # Script: the gold candidate wins for even rows, the first wrong candidate for odd rows.
    script = {}
    for i in range(limit):
        candidates = kinds[kind_of[answers[i]]]
        gold = candidates.index(answers[i])
        scores = [-5.0] * len(candidates)
        scores[gold if i % 2 == 0 else (gold + 1) % len(candidates)] = -1.0
        script[f"Question: {questions[i]}\n"] = scores
    # Questions repeat in the test split: keep only rows whose question text is unique within the first `limit`.
    unique = [i for i in range(limit) if sum(q == questions[i] for q in questions[:limit]) == 1]
    result, _ = run("easy_vqa", None, processor, script, limit=limit)
    correct = {r["id"]: r["correct"] for r in [
        {"id": s.sample_id, "correct": c["correct"]} for s, c in zip(result.samples, result.scores.per_sample)]}
    for i in unique:
        assert correct[str(i)] == (i % 2 == 0)
    _, train_answers, _ = easy_vqa.get_train_questions()
    majority = {k: Counter(a for a in train_answers if kind_of[a] == k).most_common(1)[0][0] for k in kinds}
    expected_majority = sum(answers[i] == majority[kind_of[answers[i]]] for i in range(limit)) / limit
    expected_chance = sum(1 / len(kinds[kind_of[answers[i]]]) for i in range(limit)) / limit
    assert result.scores.extra["majority_baseline"] == pytest.approx(expected_majority)
    assert result.scores.extra["chance_baseline"] == pytest.approx(expected_chance)
    assert result.scores.extra["majority_answers"] == majority
    assert result.samples[0].prompt.endswith("\nAnswer the question using a single word or phrase.\nAnswer:")


def test_easy_vqa_candidates_follow_the_prompt_format():
    benchmark = get_benchmark("easy_vqa")
    sample = benchmark.to_sample({"question": "is there a circle?", "answer": "no", "image": easy_vqa_image(0)}, 0)
    assert benchmark.candidates(sample, "raw") == [" yes", " no"]  # after "Answer:"
    assert benchmark.candidates(sample, "chat") == ["yes", "no"]  # after "assistant\n"
    assert sample.chat_text == "<image>\nis there a circle?"


def test_limit_keeps_the_first_rows(tmp_path, processor):
    result, _ = run("pope", tmp_path, processor, {"triangle": "yes", "dog": "no"}, limit=2)
    assert result.num_rows == 2 and [s.sample_id for s in result.samples] == ["1", "2"]


def test_corrupt_image_is_dropped_and_counted(tmp_path, processor):
    rows = [dict(r) for r in fixture("pope")["rows"][:3]]
    rows[1]["image"] = "corrupt"
    result, _ = run("pope", tmp_path, processor, {"triangle": "yes", "circle": "yes"}, rows=rows)
    assert [s.sample_id for s in result.samples] == ["1", "3"]
    assert result.drops.total == 1
    assert next(iter(result.drops.reasons)).startswith("unreadable row:")


def test_a_benchmark_with_no_row_left_to_score_fails_naming_why(tmp_path, processor):
    """Every row dropped (here: two corrupt images, one missing) is a failed benchmark, not a score of "n/a"."""
    from recipes.evaluation.runner import NothingToScoreError

    rows = [dict(r) for r in fixture("pope")["rows"][:3]]
    rows[0]["image"] = rows[1]["image"] = "corrupt"
    rows[2]["image"] = None
    with pytest.raises(NothingToScoreError) as caught:
        run("pope", tmp_path, processor, {}, rows=rows)
    assert isinstance(caught.value, ValueError)
    assert str(caught.value) == ("pope: no row could be evaluated: all 3 row(s) were dropped: "
                                 "{'unreadable row: UnidentifiedImageError': 2, 'missing image (image)': 1}")


def test_wrong_schema_fails_with_the_missing_columns(tmp_path, processor):
    rows = [{k: v for k, v in r.items() if k != "answer"} for r in fixture("pope")["rows"]]
    with pytest.raises(ValueError, match=r"pope: the data from .* lacks column\(s\) \['answer'\]"):
        run("pope", tmp_path, processor, {}, rows=rows)


def test_missing_local_copy_says_how_to_make_it(tmp_path):
    from recipes.evaluation.loading import load_split

    with pytest.raises(FileNotFoundError, match="hf download lmms-lab/POPE --repo-type dataset"):
        load_split(get_benchmark("pope"), tmp_path)


def test_unknown_benchmark_lists_the_known_ones():
    with pytest.raises(UnknownBenchmarkError) as info:
        get_benchmark("mmbench_cn")
    message = str(info.value)
    assert message.startswith("unknown benchmark 'mmbench_cn'; known benchmarks: ai2d, easy_vqa, mathvista, mmbench")
    for name in ["mmmu", "mmstar", "pope", "seedbench", "textvqa", "textvqa_ocr"]:
        assert name in message
    assert get_benchmark("SeedBench").name == "seedbench"  # names are case-insensitive


def test_download_to_saves_the_split_that_data_dir_then_reads(tmp_path, processor, monkeypatch):
    import datasets

    from recipes.evaluation.loading import load_split, save_local_copy

    hub_copy = write_local_copy("pope", tmp_path / "hub")
    real_load_dataset = datasets.load_dataset
    calls = []

    def hub_stand_in(path, name=None, split=None, **kwargs):  # what the Hub would serve for lmms-lab/POPE
        calls.append((path, name, split))
        return real_load_dataset(str(hub_copy), split=split)

    monkeypatch.setattr(datasets, "load_dataset", hub_stand_in)
    target = save_local_copy(get_benchmark("pope"), tmp_path / "local")
    assert calls == [("lmms-lab/POPE", None, "test")]
    assert target == tmp_path / "local" / "pope" and (target / "state.json").exists()
    assert save_local_copy(get_benchmark("pope"), tmp_path / "local") == target and len(calls) == 1  # kept
    assert save_local_copy(get_benchmark("easy_vqa"), tmp_path / "local") is None  # no Hub dataset
    monkeypatch.setattr(datasets, "load_dataset", real_load_dataset)
    loaded = load_split(get_benchmark("pope"), tmp_path / "local")
    assert loaded.num_rows == 5 and loaded.features["image"] == datasets.Image()
    predictor = ScriptedPredictor(processor.tokenizer, {"triangle": "yes", "dog": "no", "circle": "yes", "car": "no"})
    options = EvalOptions(data_dir=tmp_path / "local")
    result = evaluate_benchmark(get_benchmark("pope"), predictor, options, PromptFormatter("raw"))
    assert result.scores.strict["accuracy"] == 1.0 and len(result.samples) == 4
