"""Selection rules: the expression language (three-valued logic), top fractions, text/image rules, uid lists."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataset_builders.rules import Expression, ImageRules, RuleError, TextRules, resolve_top_threshold, top_key
from dataset_builders.selection import later_duplicates
from dataset_builders.uids import UidList, array_to_uids, derive_uid, is_uid, save_uid_list, uids_to_array

scores = st.one_of(st.none(), st.floats(min_value=-5, max_value=100, allow_nan=False))


def _kleene(expr, row):
    """Reference evaluation of the rules below in plain Python, None for unknown (SQL semantics)."""
    def cmp(value, op, bound):
        if value is None:
            return None
        return {"<": value < bound, ">=": value >= bound, "==": value == bound}[op]

    def both(a, b):
        if a is False or b is False:
            return False
        return None if a is None or b is None else True

    def either(a, b):
        if a is True or b is True:
            return True
        return None if a is None or b is None else False

    def negate(a):
        return None if a is None else not a

    a, b, flag = row
    return {
        "a >= 50 or flag": either(cmp(a, ">=", 50), flag),
        "a >= 50 and not flag": both(cmp(a, ">=", 50), negate(flag)),
        "not (a < 10)": negate(cmp(a, "<", 10)),
        "10 <= a < 60 and (b >= 3 or flag)": both(both(cmp(a, ">=", 10), cmp(a, "<", 60)),
                                                  either(cmp(b, ">=", 3), flag)),
        "a + b >= 40": None if a is None or b is None else a + b >= 40,
        "not (a >= 50 or b >= 50)": negate(either(cmp(a, ">=", 50), cmp(b, ">=", 50))),
    }[expr]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(scores, scores, st.booleans()), min_size=1, max_size=30))
def test_expression_matches_three_valued_reference(rows):
    columns = {
        "a": np.array([np.nan if r[0] is None else r[0] for r in rows]),
        "b": np.array([np.nan if r[1] is None else r[1] for r in rows]),
        "flag": np.array([r[2] for r in rows]),
    }
    for source in ("a >= 50 or flag", "a >= 50 and not flag", "not (a < 10)", "10 <= a < 60 and (b >= 3 or flag)",
                   "a + b >= 40", "not (a >= 50 or b >= 50)"):
        truth = Expression(source).evaluate(columns, len(rows))
        expected = [_kleene(source, row) for row in rows]
        got = [bool(v) if k else None for v, k in zip(truth.value, truth.known)]
        assert got == expected, source


def test_expression_errors_name_the_problem():
    with pytest.raises(RuleError, match="invalid selection rule"):
        Expression("a >=")
    with pytest.raises(RuleError, match="unsupported element"):
        Expression("__import__('os').system('x')")
    with pytest.raises(RuleError, match=r"unknown name 'nope'.*available: \['a'\]"):
        Expression("nope > 1").evaluate({"a": np.zeros(2)}, 2)
    with pytest.raises(RuleError, match="is a number, not a condition"):
        Expression("a + 1").evaluate({"a": np.zeros(2)}, 2)
    with pytest.raises(RuleError, match="fraction must be in"):
        Expression("top(a, 1.5)")
    assert Expression("top(clip_score, 0.3) and dfn").top_calls == [("clip_score", 0.3)]
    assert Expression("top(clip_score, 0.3) and dfn").names == {"clip_score", "dfn"}


def test_top_fraction_threshold_keeps_the_best_fraction_ignoring_unscored():
    rng = np.random.default_rng(0)
    values = rng.normal(size=1000)
    values[::7] = np.nan
    scored = np.sort(values[~np.isnan(values)])[::-1]
    for fraction in (0.01, 0.3, 0.5, 1.0):
        threshold = resolve_top_threshold(values, fraction)
        assert threshold == scored[max(int(len(scored) * fraction), 1) - 1]
        thresholds = {top_key("s", fraction): threshold}
        kept = Expression(f"top(s, {fraction})").evaluate({"s": values}, len(values), thresholds)
        assert int(kept.value.sum()) == max(int(len(scored) * fraction), 1)
        assert not kept.known[np.isnan(values)].any()  # unscored samples are unknown, not "low"
    assert math.isinf(resolve_top_threshold(np.array([np.nan]), 0.5))


def test_text_rules():
    rules = TextRules(min_words=2, max_chars=30, boilerplate=True)  # checked in order: empty, short, long, boilerplate
    cases = {"": "text_empty", "   ": "text_empty", "cat": "text_too_short", "IMG_1234.JPG": "text_too_short",
             "a" * 31 + " b": "text_too_long", "photo 12": "text_boilerplate",
             "Stock Photo of a cat": "text_boilerplate", "click to enlarge": "text_boilerplate",
             "a cat on a mat": None, "an image of a dog": None}
    assert {caption: rules.reason(caption) for caption in cases} == cases
    boilerplate = TextRules(boilerplate=True)
    cases = {"IMG_1234.JPG": "text_boilerplate", "image": "text_boilerplate", "DSC01234": "text_boilerplate",
             "n/a": "text_boilerplate", "No description available": "text_boilerplate", "untitled": "text_boilerplate",
             "cat": None, "sunset over the image of a lake": None}
    assert {caption: boilerplate.reason(caption) for caption in cases} == cases
    assert TextRules(drop_empty=False).reason("") is None


def test_image_rules():
    rules = ImageRules(min_side=10, max_aspect_ratio=4)
    width, height = np.array([1, 9, 10, 100, 41, 40]), np.array([1, 100, 10, 20, 10, 10])
    assert rules.reasons(width, height) == ["image_too_small", "image_too_small", None, "aspect_ratio",
                                            "aspect_ratio", None]
    assert not ImageRules().active


def test_uid_list_round_trip_and_membership(tmp_path):
    rng = np.random.default_rng(1)
    pool = [f"{int(x):032x}" for x in rng.integers(0, 2**62, 500)]
    listed = set(pool[::3])
    path = str(tmp_path / "dfn.npy")
    assert save_uid_list(path, sorted(listed, reverse=True)) == len(listed)
    stored = np.load(path)
    assert stored.dtype == np.dtype("u8,u8")
    assert array_to_uids(stored) == sorted(listed)  # sorted by (hi, lo) = sorted as hex strings
    uid_list = UidList(path)
    queries = pool + ["not-a-uid", "", "F" * 32]
    assert uid_list.contains(queries).tolist() == [q in listed for q in queries]


def test_uid_list_accepts_an_unsorted_datacomp_file(tmp_path):
    uids = [derive_uid(str(i)) for i in range(50)]
    array, valid = uids_to_array(uids)
    assert valid.all()
    np.save(tmp_path / "unsorted.npy", array[::-1])
    assert UidList(str(tmp_path / "unsorted.npy")).contains(uids + [derive_uid("x")]).tolist() == [True] * 50 + [False]
    np.save(tmp_path / "wrong.npy", np.arange(3))
    with pytest.raises(ValueError, match=r"wrong.npy: expected a DataComp uid list with dtype"):
        UidList(str(tmp_path / "wrong.npy"))


def test_derive_uid_is_stable_and_128_bit():
    assert derive_uid("http://a", "cap") == derive_uid("http://a", "cap") != derive_uid("http://a", "cap2")
    assert is_uid(derive_uid(b"bytes")) and not is_uid("xyz") and not is_uid(None)


def test_later_duplicates_keeps_the_first_kept_occurrence_across_shards():
    uids = [[derive_uid(c) for c in "abca"], [derive_uid(c) for c in "dbae"], [derive_uid(c) for c in "e"]]
    keep = [np.array([True, False, True, True]), np.array([True, True, True, True]), np.array([True])]
    got = [d.tolist() for d in later_duplicates(uids, keep)]
    # shard 0: "a" kept, "b" not kept (so shard 1's "b" is the first kept one), "c" kept, second "a" is a duplicate
    assert got == [[False, False, False, True], [False, False, True, False], [True]]
