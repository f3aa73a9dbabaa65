"""The scoring rules, through the `evaluate` modules loaded by local path, on known tricky outputs."""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from recipes.evaluation.metric_loader import METRICS_DIR, compute, load_metric, metric_path

LETTERS4 = {"A": "circle", "B": "triangle", "C": "rectangle", "D": "star"}


def mc(rule, outputs, answers, options=None):
    options = options or [LETTERS4] * len(outputs)
    return compute("mc_accuracy", rule, outputs, answers, options=options)


# ---------------------------------------------------------------- multiple choice from generated text


def test_lenient_rule_accepts_the_letter_anywhere_case_insensitively():
    # The harness's MMBench/SEED rule: gold.lower() in output.lower(). "a cat" counts as answer A.
    result = mc("lenient", ["A", "a cat.", "The answer is B", "b", "D"], ["A", "A", "A", "B", "C"])
    assert result["correct"] == [True, True, True, True, False]
    assert result["accuracy"] == pytest.approx(4 / 5)
    assert result["parsed"][1] == "A"


def test_case_sensitive_rule_of_mmstar():
    result = mc("case_sensitive", ["A", "a", "(B) triangle", "Answer: C"], ["A", "A", "B", "D"])
    assert result["correct"] == [True, False, True, False]
    # "parsed" agrees with "correct": "Answer: C" holds the letter A first, but gold C is what the rule found.
    found = mc("case_sensitive", ["Answer: C", "Answer: C"], ["C", "D"])
    assert found["parsed"] == ["C", "A"] and found["correct"] == [True, False]
    assert mc("lenient", ["The answer is B"], ["B"])["parsed"] == ["B"]


def test_vlmevalkit_matching_letters_articles_and_option_texts():
    outputs = [
        "B",  # bare letter
        "(C) rectangle",  # bracketed letter
        "The answer is D.",  # one letter among words
        "A cat is sitting on the mat",  # VLMEvalKit's default (VERBOSE off) takes the article as answer A
        "B or C",  # two letters: ambiguous
        "It is a triangle",  # no letter, one option text -> B
        "circle or star",  # two option texts: ambiguous
        "A.",  # letter with punctuation
    ]
    answers = ["B", "C", "D", "B", "B", "B", "A", "A"]
    result = mc("vlmevalkit", outputs, answers)
    assert result["parsed"] == ["B", "C", "D", "A", "", "B", "", "A"]
    assert result["correct"] == [True, True, True, False, False, True, False, True]


def test_rules_disagree_where_the_harness_is_lenient():
    # "a triangle" contains "a" -> lenient credits gold A although the model named option B.
    outputs, answers = ["a triangle"], ["A"]
    assert mc("lenient", outputs, answers)["accuracy"] == 1.0
    assert mc("vlmevalkit", outputs, answers)["accuracy"] == 0.0


def test_unknown_configuration_is_rejected_by_name():
    with pytest.raises(KeyError, match="unknown mc_accuracy configuration 'fuzzy'"):
        load_metric("mc_accuracy", "fuzzy")


def test_unknown_metric_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="known metrics: choice_accuracy, mathvista_accuracy"):
        metric_path("bleu")


# ---------------------------------------------------------------- MMMU-style parsing (MMMU and MathVista)


def mmmu(config, outputs, answers, kinds, options, ids=None):
    return compute(
        "mmmu_accuracy", config, outputs, answers, question_types=kinds, options=options,
        sample_ids=ids or [str(i) for i in range(len(outputs))],
    )


def test_mmmu_multiple_choice_parsing():
    options = [["red", "green", "blue", "yellow"]] * 6
    outputs = [
        "(B)",  # bracket
        "B.",  # trailing punctuation is stripped first
        "I think (A) is wrong, so the answer is (C)",  # several brackets: the last one wins
        "The colour of the shape in the picture is clearly green",  # > 5 words, option text
        "C is it",  # "C " form
        "The colour here is green but someone might say blue",  # two texts: the last mentioned (blue)
    ]
    result = mmmu("strict", outputs, ["B", "B", "C", "B", "C", "C"], ["multiple-choice"] * 6, options)
    assert result["parsed"] == ["B", "B", "C", "B", "C", "C"]
    assert result["accuracy"] == 1.0
    assert result["random_guesses"] == 0


def test_mmmu_unparsable_answer_random_in_original_no_credit_in_strict():
    outputs = ["no idea"] * 40
    options = [["w", "x", "y", "z"]] * 40
    ids = [f"q{i}" for i in range(40)]
    kinds = ["multiple-choice"] * 40
    original = mmmu("original", outputs, ["A"] * 40, kinds, options, ids)
    strict = mmmu("strict", outputs, ["A"] * 40, kinds, options, ids)
    assert original["random_guesses"] == 40
    assert set(original["parsed"]) <= {"A", "B", "C", "D"}
    assert 0 < original["accuracy"] < 1  # about a quarter of random letters hit A
    assert original["accuracy"] == sum(p == "A" for p in original["parsed"]) / 40
    assert strict["accuracy"] == 0.0 and strict["parsed"] == [""] * 40
    # seeded per sample: the same ids give the same letters
    assert mmmu("original", outputs, ["A"] * 40, kinds, options, ids)["parsed"] == original["parsed"]


def test_mmmu_open_answers():
    outputs = [
        "The answer is 3.14159",  # numbers are rounded to 2 decimals on both sides
        "x = 5",  # "=" counts as an indicator in the last line
        "1,000 apples",  # comma-grouped number
        "paris",  # string containment
        "5",  # a one-character gold does not match inside a word ...
        "the answer is 42",
    ]
    answers = ["3.14", "5", "1000", "Paris", "a", "41"]
    result = mmmu("original", outputs, answers, ["open"] * 6, [[]] * 6)
    assert result["correct"] == [True, True, True, True, False, False]


def test_mmmu_gold_written_as_a_list_is_read_as_a_list_only_by_strict():
    outputs, answers = ["24/7"], ["['24/7', '3.429']"]
    assert mmmu("original", outputs, answers, ["open"], [[]])["accuracy"] == 0.0
    assert mmmu("strict", outputs, answers, ["open"], [[]])["accuracy"] == 1.0


# ---------------------------------------------------------------- MathVista's own normalisation


def test_mathvista_normalisation():
    outputs = ["B", "(A) circle", "triangel", "3.0", "5 apples", "1.4999", "7"]
    answers = ["triangle", "circle", "triangle", "3", "5", "1.5", "7.0"]
    kinds = ["multi_choice"] * 3 + ["free_form"] * 4
    answer_types = ["text"] * 3 + ["integer", "integer", "float", "float"]
    choices = [["circle", "triangle"]] * 3 + [[]] * 4
    precisions = [None] * 5 + [1, 1]
    result = compute(
        "mathvista_accuracy", None, outputs, answers, question_types=kinds, answer_types=answer_types,
        choices=choices, precisions=precisions,
    )
    # letter -> choice; bracketed letter; closest choice by edit distance; int(float()); unconvertible -> wrong;
    # rounding to the precision; "7" rounds to "7.0" at precision 1.
    assert result["parsed"] == ["triangle", "circle", "triangle", "3", "", "1.5", "7.0"]
    assert result["correct"] == [True, True, True, True, False, True, True]


# ---------------------------------------------------------------- VQA soft accuracy (TextVQA)


def vqa_official_by_hand(prediction: str, answers: list[str]) -> float:
    scores = []
    for i in range(len(answers)):
        others = answers[:i] + answers[i + 1 :]
        scores.append(min(1.0, others.count(prediction) / 3))
    return sum(scores) / len(scores)


def test_vqa_normalisation_of_the_prediction():
    answers = ["2 dogs"] * 10
    outputs = ["Two dogs.", "two Dogs", "the 2 dogs!", "2 dogs\n"]
    result = compute("vqa_accuracy", "official", outputs, [answers] * 4)
    assert result["parsed"] == ["2 dogs"] * 4
    assert result["correct"] == [1.0] * 4
    contraction = compute("vqa_accuracy", "official", ["dont know"], [["don't know"] * 10])
    assert contraction["parsed"] == ["don't know"] and contraction["accuracy"] == 1.0
    # EvalAI's table maps spellings with one apostrophe left out, not words ("were", "id", "shed") nor lower-case
    # I-forms (it lists "Im"), nor "couldntve" (two left out); its "somebody'd" entry is reversed.
    words = ["were", "id", "im", "shed", "couldntve", "couldnt've", "somebody'd", "somebodyd", "twas"]
    spelled = compute("vqa_accuracy", "official", words, [["x"] * 10] * len(words))["parsed"]
    assert spelled == ["were", "id", "im", "shed", "couldntve", "couldn't've", "somebodyd", "somebodyd", "'twas"]
    assert compute("vqa_accuracy", "m4c", ["we're"], [["were"] * 10])["accuracy"] == 0.0
    decimal = compute("vqa_accuracy", "official", ["3.5"], [["3.5"] * 10])
    assert decimal["parsed"] == ["3.5"]
    # Each mark's rule looks at the answer as given: the '"' turning into a space must not make the later '-' count
    # as spaced (EvalAI: "t shirt"; testing the edited text would give "tshirt").
    quoted = compute("vqa_accuracy", "official", ['coca"-cola t-shirt'], [["coca cola t shirt"] * 10])
    assert quoted["parsed"] == ["coca cola t shirt"] and quoted["accuracy"] == 1.0


def test_soft_accuracy_against_a_hand_computation():
    answers = ["dakota"] * 5 + ["dakota digital"] * 3 + ["nous les gosses", "clos culombu"]
    for prediction, expected in [("dakota", 1.0), ("dakota digital", (3 * (2 / 3) + 7 * 1.0) / 10),
                                 ("nous les gosses", (9 * (1 / 3) + 0.0) / 10), ("kodak", 0.0)]:
        assert vqa_official_by_hand(prediction, answers) == pytest.approx(expected)
        for config in ("official", "m4c"):
            result = compute("vqa_accuracy", config, [prediction], [answers])
            assert result["accuracy"] == pytest.approx(expected)


def test_m4c_cleans_the_output_like_the_harness():
    # The harness drops "." before normalising, so "3.5" becomes "35" under m4c but stays "3.5" officially.
    answers = [["3.5"] * 10]
    assert compute("vqa_accuracy", "m4c", ["3.5"], answers)["parsed"] == ["35"]
    assert compute("vqa_accuracy", "official", ["3.5"], answers)["accuracy"] == 1.0


# ---------------------------------------------------------------- POPE


def test_pope_rules():
    # The harness stops generating at "," and ".", so its outputs look like "No," -> "no"; a longer answer is wrong.
    outputs = ["Yes.", "No,", "No, there is not.", "yes, it is", "There is no dog.", "Not sure", "no"]
    golds = ["yes", "no", "no", "yes", "no", "no", "no"]
    original = compute("pope_accuracy", "original", outputs, golds)
    official = compute("pope_accuracy", "official", outputs, golds)
    assert original["parsed"] == ["yes", "no", "no, there is not", "yes, it is", "there is no dog", "not sure", "no"]
    assert original["correct"] == [True, True, False, False, False, False, True]
    assert official["parsed"] == ["yes", "no", "no", "yes", "no", "yes", "no"]  # "Not" capitalised: not a no-word
    assert official["correct"] == [True, True, True, True, True, False, True]


def test_pope_original_averages_categories_official_pools_them():
    outputs = ["yes", "yes", "no", "yes", "no", "no", "no"]
    golds = ["yes", "no", "no", "yes", "yes", "no", "no"]
    categories = ["adversarial"] * 2 + ["random"] * 5
    original = compute("pope_accuracy", "original", outputs, golds, categories=categories)
    official = compute("pope_accuracy", "official", outputs, golds, categories=categories)
    adversarial_acc, random_acc = 1 / 2, 4 / 5
    assert original["accuracy"] == pytest.approx((adversarial_acc + random_acc) / 2)
    assert official["accuracy"] == pytest.approx(5 / 7)
    # F1 with "yes" positive over the pooled samples: tp=2, fp=1, fn=1
    assert official["f1"] == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert official["yes_ratio"] == pytest.approx(3 / 7)
    assert original["per_category"]["random"]["count"] == 5


# ---------------------------------------------------------------- likelihood choice


def test_choice_accuracy_takes_the_first_maximum():
    result = compute("choice_accuracy", None, [[0.1, 0.7, 0.2], [0.4, 0.4, 0.2], [-3.0, -1.0]], [1, 1, 1])
    assert result["parsed"] == [1, 0, 1]
    assert result["correct"] == [True, False, True]
    assert result["mean_gold_score"] == pytest.approx((0.7 + 0.4 - 1.0) / 3)


def test_choice_accuracy_rejects_an_out_of_range_reference():
    with pytest.raises(ValueError, match="sample 0: correct option 3 is outside its 2 options"):
        compute("choice_accuracy", None, [[0.5, 0.5]], [3])


def test_empty_input_gives_no_accuracy_instead_of_crashing():
    assert compute("mc_accuracy", "lenient", [], [])["accuracy"] is None


def test_every_metric_loads_offline_in_a_fresh_process_with_an_empty_cache(tmp_path):
    names = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
    assert names == ["choice_accuracy", "mathvista_accuracy", "mc_accuracy", "mmmu_accuracy", "pope_accuracy",
                     "vqa_accuracy"]
    script = (
        "import json, sys, evaluate\n"
        "out = {}\n"
        "for path, config in json.loads(sys.argv[1]):\n"
        "    out[path] = type(evaluate.load(path, config)).__name__\n"
        "print(json.dumps(out))\n"
    )
    configs = {"mc_accuracy": "lenient", "mmmu_accuracy": "strict", "vqa_accuracy": "m4c", "pope_accuracy": "official"}
    payload = json.dumps([[str(metric_path(n)), configs.get(n)] for n in names])
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    run = subprocess.run([sys.executable, "-c", script, payload], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert Counter(loaded.values()) == Counter(
        ["ChoiceAccuracy", "MathvistaAccuracy", "McAccuracy", "MmmuAccuracy", "PopeAccuracy", "VqaAccuracy"]
    )
