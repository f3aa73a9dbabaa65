"""select -> reshard -> load_dataset, end to end on synthetic shards, checked against independent computations."""

import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataset_builders.cards import card_configs, discover_subsets, hub_data_files, write_dataset_card
from dataset_builders.pipelines import ExecutorConfig, run_reshard, run_select
from dataset_builders.rules import ImageRules, TextRules
from dataset_builders.selection import SelectionRules
from dataset_builders.shards import iter_samples, list_shards
from dataset_builders.synthetic import (
    clean_sample,
    damaged_shard_members,
    write_clean_shards,
    write_metadata_parquet,
    write_shard,
)
from dataset_builders.uids import save_uid_list

SHARDS, PER_SHARD = 3, 12


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """3 clean shards (+ img2dataset parquets), a 4th re-using 3 uids of shard 0 (duplicates), hand-made scores
    and a DFN-style uid list. Returns (root, rows in shard order, scores by uid, dfn uid set)."""
    root = tmp_path_factory.mktemp("pool")
    shards = root / "shards"
    shards.mkdir()
    rows = write_clean_shards(str(shards), SHARDS, PER_SHARD, seed=11)
    for row in rows:
        row["shard"] = f"{row['key'][:5]}.tar"
    rng = random.Random(12)
    members, extra = [], []
    for index, source in enumerate(rows[:3] + [None] * 4):
        key = f"00003{index:04d}"
        sample, meta = clean_sample(rng, key)
        if source is not None:  # same uid as a shard-0 sample: a duplicate across shards
            meta["uid"] = source["uid"]
            sample = [(n, (b if not n.endswith(".json") else __import__("json").dumps(meta).encode()))
                      for n, b in sample]
        meta["shard"] = "00003.tar"
        members += sample
        extra.append(meta)
    write_shard(str(shards / "00003.tar"), members)
    write_metadata_parquet(str(shards / "00003.parquet"), extra)
    rows += extra
    # scores: clip float for everyone but every 5th sample (unscored), SU int with some nulls
    scores = {}
    score_dir = root / "scores"
    score_dir.mkdir()
    for shard in list_shards(str(shards)):
        shard_rows = [r for r in rows if r["shard"] == shard]
        table = {"uid": [], "key": [], "clip_score": [], "semantic_understanding_score": []}
        for i, row in enumerate(shard_rows):
            clip = None if i % 5 == 4 else rng.uniform(0.0, 0.5)
            su = None if i % 7 == 6 else rng.randrange(60, 100)
            clip, su = scores.setdefault(row["uid"], (clip, su))  # a duplicated uid is the same sample: same scores
            for column, value in zip(table, (row["uid"], row["key"], clip, su)):
                table[column].append(value)
        pq.write_table(pa.table(table, schema=pa.schema([("uid", pa.string()), ("key", pa.string()),
                                                         ("clip_score", pa.float32()),
                                                         ("semantic_understanding_score", pa.int16())])),
                       score_dir / f"{shard[:-4]}.parquet")
    dfn = {r["uid"] for r in rows[::4]}
    save_uid_list(str(root / "dfn.npy"), dfn)
    return root, rows, scores, dfn


def _decisions(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".parquet"):
            for row in pq.read_table(os.path.join(folder, name)).to_pylist():
                out[(name[:-8], row["key"])] = (row["keep"], row["reason"])
    return out


def _expected_union(rows, scores, dfn, min_side=0):
    """SU >= 85 or listed in DFN, image min side, then first-kept-uid-wins, computed by hand."""
    expected, seen = {}, set()
    for row in rows:
        su = scores[row["uid"]][1]
        if min(row["width"], row["height"]) < min_side:
            decision = (False, "image_too_small")
        elif row["uid"] in dfn or (su is not None and su >= 85):
            decision = (True, None)
        else:
            decision = (False, "missing_score" if su is None else "rule")
        if decision[0] and row["uid"] in seen:
            decision = (False, "duplicate_uid")
        if decision[0]:
            seen.add(row["uid"])
        expected[(row["shard"][:-4], row["key"])] = decision
    return expected


def test_select_union_of_scores_and_uid_list_matches_hand_computation(pool, tmp_path):
    root, rows, scores, dfn = pool
    rules = SelectionRules(where="semantic_understanding_score >= 85 or dfn", scores={"mlmf": str(root / "scores")},
                           uid_lists={"dfn": str(root / "dfn.npy")}, image=ImageRules(min_side=40))
    accounting = run_select(str(root / "shards"), str(tmp_path / "sel"), rules)
    expected = _expected_union(rows, scores, dfn, min_side=40)
    assert _decisions(tmp_path / "sel") == expected
    assert accounting.balanced and accounting.read == len(rows)
    assert accounting.kept == sum(keep for keep, _ in expected.values())
    assert accounting.dropped.get("duplicate_uid", 0) >= 1


def test_top_fraction_and_intersection_of_selections(pool, tmp_path):
    root, rows, scores, _ = pool
    shards = str(root / "shards")
    run_select(shards, str(tmp_path / "clip"), SelectionRules(where="top(clip_score, 0.5)",
                                                              scores={"c": str(root / "scores")}), dedup_uid=False)
    run_select(shards, str(tmp_path / "su"), SelectionRules(where="semantic_understanding_score >= 80",
                                                            scores={"c": str(root / "scores")}), dedup_uid=False)
    clip_values = np.array([np.nan if scores[r["uid"]][0] is None else scores[r["uid"]][0] for r in rows],
                           dtype=np.float32).astype(float)
    scored = np.sort(clip_values[~np.isnan(clip_values)])[::-1]
    threshold = scored[int(len(scored) * 0.5) - 1]
    clip = _decisions(tmp_path / "clip")
    assert {k for k, (keep, _) in clip.items() if keep} == {
        (r["shard"][:-4], r["key"]) for r, v in zip(rows, clip_values) if v >= threshold}
    su = _decisions(tmp_path / "su")
    run_select(shards, str(tmp_path / "both"), SelectionRules(where="a and b", selections={
        "a": str(tmp_path / "clip"), "b": str(tmp_path / "su")}), dedup_uid=False)
    both = _decisions(tmp_path / "both")
    assert {k for k, (keep, _) in both.items() if keep} == {k for k in clip if clip[k][0] and su[k][0]}
    assert {reason for keep, reason in both.values() if not keep} == {"rule"}


def test_select_from_tar_scan_equals_select_from_parquet(pool, tmp_path):
    root, _, _, _ = pool
    rules = SelectionRules(where="clip_score >= 0.2", scores={"s": str(root / "scores")},
                           text=TextRules(min_words=3), image=ImageRules(min_side=30, max_aspect_ratio=2))
    run_select(str(root / "shards"), str(tmp_path / "p"), rules, metadata_source="parquet")
    run_select(str(root / "shards"), str(tmp_path / "t"), rules, metadata_source="tar")
    assert _decisions(tmp_path / "p") == _decisions(tmp_path / "t")


def test_a_sample_without_uid_or_url_gets_the_same_decision_from_either_metadata_source(tmp_path):
    """The tar scan derives its uid from the image bytes; with metadata="auto" the parquet shard is read from the
    tar then, so it is kept either way; metadata="parquet" cannot derive it and drops it, counted."""
    import pyarrow.parquet as pq

    from dataset_builders.synthetic import clean_sample, encode, sample_members, shape_image, write_metadata_parquet

    rng = random.Random(0)
    members, good = clean_sample(rng, "good")
    caption = "a caption without uid or url"
    members += sample_members("nouid", encode(shape_image(rng)), caption, {"caption": caption})
    (tmp_path / "in").mkdir()
    write_shard(str(tmp_path / "in" / "00000.tar"), members)
    write_metadata_parquet(str(tmp_path / "in" / "00000.parquet"),
                           [good, {"key": "nouid", "caption": caption, "width": 64, "height": 48, "status": "success"}])
    decisions = {}
    for source in ("auto", "tar", "parquet"):
        accounting = run_select(str(tmp_path / "in"), str(tmp_path / source), SelectionRules(), metadata_source=source)
        table = pq.read_table(tmp_path / source / "00000.parquet").to_pylist()
        decisions[source] = {row["key"]: (row["keep"], row["reason"]) for row in table}
        assert accounting.balanced
    assert decisions["auto"] == decisions["tar"] == {"good": (True, None), "nouid": (True, None)}
    assert decisions["parquet"]["nouid"] == (False, "missing_uid")


def _tree(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if not name.startswith(".")}


def test_reshard_sizes_order_and_independence_from_task_count(pool, tmp_path):
    root, rows, _, _ = pool
    shards = str(root / "shards")
    run_select(shards, str(tmp_path / "sel"), SelectionRules(image=ImageRules(min_side=35)))
    decisions = _decisions(tmp_path / "sel")
    selected = [r for r in rows if decisions[(r["shard"][:-4], r["key"])][0]]
    one = run_reshard(shards, str(tmp_path / "sel"), str(tmp_path / "one"), ExecutorConfig(tasks=1), shard_size=5)
    many = run_reshard(shards, str(tmp_path / "sel"), str(tmp_path / "many"), ExecutorConfig(workers=2), shard_size=5)
    assert _tree(tmp_path / "one") == _tree(tmp_path / "many")  # byte for byte
    assert one.read == many.read == one.kept == len(selected) and one.balanced
    written = [s for shard in list_shards(str(tmp_path / "one")) for s in iter_samples(str(tmp_path / "one"), shard)]
    sizes = [len(list(iter_samples(str(tmp_path / "one"), s))) for s in list_shards(str(tmp_path / "one"))]
    assert sizes == [5] * (len(selected) // 5) + ([len(selected) % 5] if len(selected) % 5 else [])
    assert [(s.meta["source_shard"], s.meta["source_key"], s.uid, s.caption) for s in written] == [
        (r["shard"], r["key"], r["uid"], r["caption"]) for r in selected]
    assert [s.key for s in written[:6]] == ["000000", "000001", "000002", "000003", "000004", "000010"]


def test_a_shard_with_nothing_kept_reshards_the_others(tmp_path):
    shards = tmp_path / "shards"
    rows = write_clean_shards(str(shards), 2, 4, seed=3)
    table = pq.read_table(shards / "00001.parquet")  # every caption of shard 1 becomes one word
    pq.write_table(table.set_column(table.column_names.index("caption"), "caption", pa.array(["x"] * 4)),
                   shards / "00001.parquet")
    run_select(str(shards), str(tmp_path / "sel"), SelectionRules(text=TextRules(min_words=2)))
    stats = run_reshard(str(shards), str(tmp_path / "sel"), str(tmp_path / "out"), ExecutorConfig(tasks=1))
    written = [s.uid for shard in list_shards(str(tmp_path / "out")) for s in iter_samples(str(tmp_path / "out"), shard)]
    assert written == [r["uid"] for r in rows[:4]] and stats.kept == 4 and stats.balanced


def test_rerun_skips_completed_tasks_and_refuses_changed_inputs(pool, tmp_path):
    root, _, _, _ = pool
    shards, sel, out = str(root / "shards"), str(tmp_path / "sel"), str(tmp_path / "out")
    run_select(shards, sel, SelectionRules())
    run_reshard(shards, sel, out, shard_size=10)
    before = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out) if not n.startswith(".")}
    run_reshard(shards, sel, out, shard_size=10)
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in before} == before
    with pytest.raises(ValueError, match="different settings"):
        run_reshard(shards, sel, out, shard_size=10, verify_images="quick")
    run_select(shards, str(tmp_path / "sel2"), SelectionRules(text=TextRules(min_words=6)))
    with pytest.raises(ValueError, match="resharded from a different selection"):
        run_reshard(shards, str(tmp_path / "sel2"), out, shard_size=10)


def run_and_reap(command, log_path):
    """Run ``command`` in its own session and wait for it only (not for pipes: datatrove's manager process would
    survive the kill and hold them); then kill whatever of that session is left. Returns (exit code, log)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = proc.wait(timeout=300)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return returncode, open(log_path).read()


KILLER = textwrap.dedent("""
    import os, sys
    import dataset_builders.pipelines as pipelines
    from dataset_builders.steps.reshard import ReshardWriter

    class DiesInShardOne(ReshardWriter):
        def _copy(self, src, needed, writer, stem, width):
            if stem.endswith("1") and len(writer) >= 2:
                os._exit(17)  # like a SIGKILL: no cleanup, no completion marker
            super()._copy(src, needed, writer, stem, width)
            if stem.endswith("1"):
                os._exit(17)

    pipelines.ReshardWriter = DiesInShardOne
    pipelines.run_reshard(sys.argv[1], sys.argv[2], sys.argv[3], pipelines.ExecutorConfig(workers=1), shard_size=10)
""")


def test_task_killed_midway_reruns_to_the_uninterrupted_output(pool, tmp_path):
    root, _, _, _ = pool
    shards, sel = str(root / "shards"), str(tmp_path / "sel")
    run_select(shards, sel, SelectionRules())
    killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")
    returncode, log = run_and_reap([sys.executable, "-c", KILLER, shards, sel, killed], tmp_path / "killed.log")
    assert returncode == 17, log[-2000:]
    visible = sorted(n for n in os.listdir(killed) if not n.startswith("."))
    assert visible == ["00000.parquet", "00000.tar"]  # shard 1 died half-written: nothing of it is visible
    assert any(n.startswith(".00001.tar.") for n in os.listdir(killed))
    assert sorted(os.listdir(os.path.join(killed, ".datatrove/reshard/completions"))) == ["00000"]
    accounting = run_reshard(shards, sel, killed, shard_size=10)
    run_reshard(shards, sel, clean, shard_size=10)
    assert _tree(killed) == _tree(clean)
    assert not [n for n in os.listdir(killed) if n.endswith(".tmp")]
    assert accounting.tasks == 4 and accounting.balanced  # the stats of the task completed before the kill count


def test_damaged_shard_accounting_across_select_and_reshard(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    members, expected = damaged_shard_members(random.Random(3))
    write_shard(str(shards / "00000.tar"), members)
    selection = run_select(str(shards), str(tmp_path / "sel"), SelectionRules())
    resharded = run_reshard(str(shards), str(tmp_path / "sel"), str(tmp_path / "out"), shard_size=100)
    assert selection.balanced and resharded.balanced
    assert selection.read == len(expected) + 1  # + the second occurrence of a duplicated key
    assert resharded.read == selection.kept
    everywhere = {**selection.dropped, **resharded.dropped}
    for key, reason in expected.items():
        if reason != "ok":
            assert everywhere.get(reason, 0) >= 1, reason
    assert everywhere["text_empty"] == 1 and everywhere["duplicate_key"] == 1
    survivors = {s.meta["source_key"] for s in iter_samples(str(tmp_path / "out"), "00000.tar")}
    assert survivors == {k for k, r in expected.items() if r == "ok" and k != "bad_empty_caption"}
    assert resharded.events["reencoded"] == 5  # CMYK, palette, LA, 16-bit and WebP became RGB JPEGs
    assert not any(".." in p or p.startswith("/") for p in os.listdir(tmp_path / "out"))
    assert not (tmp_path / "bad_escape.jpg").exists() and not (tmp_path.parent / "bad_escape.jpg").exists()


def test_corpus_card_loads_with_datasets_map_style_and_streaming(pool, tmp_path):
    from datasets import get_dataset_config_names, load_dataset

    root, rows, _, _ = pool
    shards = str(root / "shards")
    run_select(shards, str(tmp_path / "sel_a"), SelectionRules(image=ImageRules(min_side=50)))
    run_select(shards, str(tmp_path / "sel_b"), SelectionRules(text=TextRules(min_words=6)))
    corpus = tmp_path / "corpus"
    run_reshard(shards, str(tmp_path / "sel_a"), str(corpus / "ccs_webdataset"), shard_size=7)
    run_reshard(shards, str(tmp_path / "sel_b"), str(corpus / "datacomp_medium_mlm_filter_su_85_union_dfn_webdataset"),
                shard_size=7)
    write_dataset_card(str(corpus))
    assert discover_subsets(str(corpus)) == {
        "ccs": "ccs_webdataset",
        "datacomp_mlmf_su85_union_dfn": "datacomp_medium_mlm_filter_su_85_union_dfn_webdataset",
    }
    assert get_dataset_config_names(str(corpus)) == ["ccs", "datacomp_mlmf_su85_union_dfn", "pretraining"]
    ccs = load_dataset(str(corpus), "ccs", split="train")
    decisions = _decisions(tmp_path / "sel_a")  # min side 50, then uid de-dup
    expected = [r["caption"] for r in rows if decisions[(r["shard"][:-4], r["key"])][0]]
    assert 0 < len(expected) < len(rows) and list(ccs["txt"]) == expected
    first = ccs[0]
    assert first["jpg"].size == (first["json"]["width"], first["json"]["height"])
    streamed = list(load_dataset(str(corpus), "ccs", split="train", streaming=True))
    assert [r["txt"] for r in streamed] == expected and streamed[0]["jpg"].size == first["jpg"].size
    mixture = load_dataset(str(corpus), "pretraining", split="train")
    assert mixture.num_rows == ccs.num_rows + load_dataset(str(corpus), "datacomp_mlmf_su85_union_dfn",
                                                          split="train").num_rows


def card_splits_as_datasets_reads_them(folder, config, cache_dir):
    """(split infos, warnings) of ``load_dataset_builder(folder, config)`` on an empty cache: what datasets takes
    from the card (once built, the cache holds datasets' own counts and Arrow size)."""
    import logging

    from datasets import load_dataset_builder

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("datasets")
    logger.addHandler(handler)
    try:
        builder = load_dataset_builder(str(folder), config, cache_dir=str(cache_dir))
    finally:
        logger.removeHandler(handler)
    return builder.info.splits, [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def test_corpus_card_split_sizes_are_read_by_datasets_without_warnings(pool, tmp_path):
    root, _, _, _ = pool
    run_select(str(root / "shards"), str(tmp_path / "sel"), SelectionRules(image=ImageRules(min_side=50)))
    corpus = tmp_path / "corpus"
    run_reshard(str(root / "shards"), str(tmp_path / "sel"), str(corpus / "ccs_webdataset"), shard_size=7)
    write_dataset_card(str(corpus))
    splits, warnings = card_splits_as_datasets_reads_them(corpus, "ccs", tmp_path / "hf_cache")
    assert warnings == []  # was: "Ignoring part of dataset_info from the dataset card" on every load
    kept = sum(pq.ParquetFile(p).metadata.num_rows for p in (corpus / "ccs_webdataset").glob("*.parquet"))
    tars = list((corpus / "ccs_webdataset").glob("*.tar"))
    assert splits["train"].num_examples == kept > 0
    assert splits["train"].num_bytes == sum(os.path.getsize(t) for t in tars)


def test_card_configs_and_hub_data_files():
    configs = card_configs({"ccs": "ccs_webdataset", "laion": "laion_webdataset"})
    assert [c["config_name"] for c in configs] == ["ccs", "laion", "pretraining"]
    assert configs[2]["default"] and configs[2]["data_files"][0]["path"] == ["ccs_webdataset/*.tar",
                                                                              "laion_webdataset/*.tar"]
    assert hub_data_files("datacomp_dfn") == {
        "train": ["hf://datasets/weizhiwang/Open-Qwen2VL-Data/datacomp_medium_dfn_webdataset/*.tar"]}
    with pytest.raises(ValueError, match="unknown subset 'nope'"):
        hub_data_files("nope")


def test_generator_based_builder_download_prepare_and_stream(pool, tmp_path):
    from dataset_builders.open_qwen2vl_data import OpenQwen2VLData

    root, rows, _, _ = pool
    corpus = tmp_path / "corpus"
    (corpus / "ccs_webdataset").mkdir(parents=True)
    for name in ("00000.tar", "00001.tar"):
        os.link(root / "shards" / name, corpus / "ccs_webdataset" / name)
    members, expected = damaged_shard_members(random.Random(5))
    # A JPEG whose header and end marker are fine but whose scan data is not: only a full decode finds it.
    members += [("corruptscan.jpg", corrupt_scan_jpeg()), ("corruptscan.txt", b"a caption")]
    write_shard(str(corpus / "ccs_webdataset" / "00002.tar"), members)
    builder = OpenQwen2VLData(config_name="ccs", data_dir=str(corpus), cache_dir=str(tmp_path / "cache"))
    builder.download_and_prepare()
    ds = builder.as_dataset(split="train")
    good = [k for k, r in expected.items() if r == "ok"]
    assert ds.num_rows == 2 * PER_SHARD + len(good)
    assert list(ds["text"][: 2 * PER_SHARD]) == [r["caption"] for r in rows[: 2 * PER_SHARD]]
    assert list(ds["uid"][: 2 * PER_SHARD]) == [r["uid"] for r in rows[: 2 * PER_SHARD]]
    assert set(ds["key"][2 * PER_SHARD:]) == set(good) and set(ds["subset"]) == {"ccs"}
    assert ds[0]["image"].size == (rows[0]["width"], rows[0]["height"])
    assert all(image.mode == "RGB" for image in ds["image"][2 * PER_SHARD:] if image.mode != "L")
    stream = builder.as_streaming_dataset(split="train")
    assert [row["text"] for row in stream] == list(ds["text"])


MIXTURE_SHARDS = {"ccs": (2, 3), "datacomp_mlmf_su85_union_dfn": (1, 2), "laion": (1, 4)}  # (shards, per shard)


def write_mixture_corpus(corpus, subsets) -> dict[str, list[dict]]:
    """Tiny shards for some of the pretraining subsets, each from its own seed; returns the rows written per subset."""
    from dataset_builders.cards import KNOWN_SUBSETS

    return {name: write_clean_shards(str(corpus / KNOWN_SUBSETS[name].folder), *MIXTURE_SHARDS[name], seed=seed)
            for seed, name in enumerate(subsets, start=40)}


def test_builder_loads_only_the_chosen_subsets_of_a_mixture_into_their_own_cache(tmp_path):
    from dataset_builders.open_qwen2vl_data import OpenQwen2VLData

    written = write_mixture_corpus(tmp_path / "corpus", MIXTURE_SHARDS)
    kwargs = {"data_dir": str(tmp_path / "corpus"), "cache_dir": str(tmp_path / "cache")}
    full = OpenQwen2VLData(config_name="pretraining", **kwargs)
    full.download_and_prepare()  # built first: the chosen-subset config must not pick up its cache
    chosen = OpenQwen2VLData(config_name="pretraining", subsets=["laion", "ccs"], **kwargs)
    assert chosen.config.subsets == ("ccs", "laion")  # the mixture's order
    assert chosen.config_id != full.config_id and chosen.cache_dir != full.cache_dir
    chosen.download_and_prepare()
    ds = chosen.as_dataset(split="train")
    expected = [(name, row["uid"]) for name in ("ccs", "laion") for row in written[name]]
    assert list(zip(ds["subset"], ds["uid"])) == expected
    assert len(full.as_dataset(split="train")) == sum(len(rows) for rows in written.values())
    assert [row["subset"] for row in chosen.as_streaming_dataset(split="train")] == [s for s, _ in expected]
    # The same selection in another order (or with repeats) is the same cache; all parts are the full config.
    again = OpenQwen2VLData(config_name="pretraining", subsets=("ccs", "laion", "ccs"), **kwargs)
    assert again.cache_dir == chosen.cache_dir
    every = OpenQwen2VLData(config_name="pretraining", subsets=["laion", "ccs", "datacomp_mlmf_su85_union_dfn"],
                            **kwargs)
    assert every.cache_dir == full.cache_dir


@pytest.mark.parametrize("subsets, message", [
    ([], r"subsets=\[\] selects nothing: pass some of \['ccs', 'datacomp_mlmf_su85_union_dfn', 'laion'\]"),
    (["ccs", "nope"], r"unknown subset\(s\) \['nope'\] for config 'pretraining'; its subsets are \['ccs', "
                      r"'datacomp_mlmf_su85_union_dfn', 'laion'\]"),
    (["datacomp_dfn"], r"\['datacomp_dfn'\] .*a config of its own, config_name='datacomp_dfn'"),
])
def test_builder_refuses_a_bad_subset_choice(tmp_path, subsets, message):
    from dataset_builders.open_qwen2vl_data import OpenQwen2VLData

    with pytest.raises(ValueError, match=message):
        OpenQwen2VLData(config_name="pretraining", subsets=subsets, data_dir=str(tmp_path),
                        cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("present", [("ccs",), ()])
def test_builder_names_every_missing_subset_and_how_to_load_the_rest(tmp_path, present):
    from dataset_builders.cards import KNOWN_SUBSETS
    from dataset_builders.open_qwen2vl_data import OpenQwen2VLData

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_mixture_corpus(corpus, present)
    builder = OpenQwen2VLData(config_name="pretraining", data_dir=str(corpus), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as error:
        builder.download_and_prepare()
    message = str(error.value)
    missing = [name for name in MIXTURE_SHARDS if name not in present]
    assert f"for {len(missing)} of its 3 subset(s)" in message
    for name in missing:
        assert f"  - {name!r}: looked in {corpus}/{KNOWN_SUBSETS[name].folder}" in message
    if present:
        assert "Present: ['ccs']. To load only those, pass subsets=['ccs']" in message
    else:
        assert "None of them is present: check data_dir" in message


def test_two_corpora_with_the_same_folder_name_do_not_share_a_stale_cache(pool, tmp_path):
    """datasets caches a local folder under its name and card; the card's per-config counts keep them apart."""
    from datasets import load_dataset

    root, _, _, _ = pool
    shards = str(root / "shards")
    rows = {}
    for name, side in (("a", 45), ("b", 70)):
        run_select(shards, str(tmp_path / f"sel_{name}"), SelectionRules(image=ImageRules(min_side=side)))
        corpus = tmp_path / name / "corpus"
        run_reshard(shards, str(tmp_path / f"sel_{name}"), str(corpus / "ccs_webdataset"), shard_size=50)
        write_dataset_card(str(corpus))
        rows[name] = sum(k for k, _ in _decisions(tmp_path / f"sel_{name}").values())
        assert load_dataset(str(corpus), "ccs", split="train").num_rows == rows[name]
    assert rows["a"] != rows["b"]


def test_card_keeps_the_configs_and_sections_other_stages_added(pool, tmp_path):
    from datasets import get_dataset_config_names
    from huggingface_hub import DatasetCard

    from dataset_builders.commands.pack import write_card as write_pack_card

    root, _, _, _ = pool
    corpus = tmp_path / "corpus"
    run_select(str(root / "shards"), str(tmp_path / "sel"), SelectionRules())
    run_reshard(str(root / "shards"), str(tmp_path / "sel"), str(corpus / "ccs_webdataset"), shard_size=50)
    (corpus / "packed_144").mkdir()
    write_dataset_card(str(corpus))
    write_pack_card(str(corpus), "packed_144")
    write_dataset_card(str(corpus))  # regenerating ours must not lose the pack stage's config or section
    card = DatasetCard((corpus / "README.md").read_text())
    assert [c["config_name"] for c in card.data.to_dict()["configs"]] == ["ccs", "packed_144"]
    assert card.text.count("# Open-Qwen2VL pretraining corpora") == 1
    assert card.text.count("# Packed Open-Qwen2VL") == 1
    assert get_dataset_config_names(str(corpus)) == ["ccs", "packed_144"]


def test_a_corpus_rebuilt_in_place_with_the_same_count_loads_its_new_rows(tmp_path):
    """Same folder, same sample count, other samples: only the card's content fingerprint changes datasets' cache
    key (it holds the folder name and the card, not file paths or times)."""
    import shutil

    from datasets import load_dataset

    corpus, cache = tmp_path / "corpus", str(tmp_path / "hf_cache")
    loaded = []
    for seed in (1, 2):
        for folder in ("in", "sel", "corpus"):
            shutil.rmtree(tmp_path / folder, ignore_errors=True)
        rows = write_clean_shards(str(tmp_path / "in"), 1, 4, seed=seed)
        run_select(str(tmp_path / "in"), str(tmp_path / "sel"), SelectionRules())
        run_reshard(str(tmp_path / "in"), str(tmp_path / "sel"), str(corpus / "ccs_webdataset"))
        write_dataset_card(str(corpus))
        loaded.append(list(load_dataset(str(corpus), "ccs", split="train", cache_dir=cache)["txt"]))
        assert loaded[-1] == [r["caption"] for r in rows]
    assert len(loaded[0]) == len(loaded[1]) == 4 and loaded[0] != loaded[1]


def test_lone_surrogates_are_counted_drops_in_select_and_reshard(tmp_path):
    from test_data_shards import surrogate_members

    shards = tmp_path / "shards"
    shards.mkdir()
    members, good = surrogate_members(random.Random(4))
    write_shard(str(shards / "00000.tar"), members)
    selection = run_select(str(shards), str(tmp_path / "sel"), SelectionRules(), metadata_source="tar")
    assert selection.read == 4 and selection.kept == 1 and selection.balanced
    assert selection.dropped == {"bad_key": 1, "caption_not_utf8": 1, "bad_json": 1}
    assert _decisions(tmp_path / "sel")[("00000", "caf\\udce9")] == (False, "bad_key")  # named, and writable
    # An img2dataset parquet that lists the sample with a clean caption: select keeps it, reshard meets the tar's
    # json caption (it crashed writing it) and drops it, counted.
    listed = {"key": "bad_caption", "uid": "c" * 32, "url": "u", "caption": "cat", "width": 40, "height": 40,
              "status": "success"}
    write_metadata_parquet(str(shards / "00000.parquet"), [good, listed])
    assert run_select(str(shards), str(tmp_path / "sel2"), SelectionRules()).kept == 2
    resharded = run_reshard(str(shards), str(tmp_path / "sel2"), str(tmp_path / "out"))
    assert (resharded.read, resharded.kept, resharded.dropped) == (2, 1, {"caption_not_utf8": 1})
    written = list(iter_samples(str(tmp_path / "out"), "00000.tar"))
    assert [(s.uid, s.caption) for s in written] == [(good["uid"], good["caption"])]


def _finalizer_dies(monkeypatch):
    """select is killed after its per-shard tasks, before uid de-duplication and the manifest."""
    from dataset_builders.steps.select import SelectionFinalizer

    def dies(self, data=None, rank=0, world_size=1):
        raise RuntimeError("killed before finalizing")
        yield

    monkeypatch.setattr(SelectionFinalizer, "run", dies)


def test_reshard_and_select_refuse_a_selection_that_was_not_finalized(pool, tmp_path, monkeypatch):
    import json

    from dataset_builders.selection import SelectionNotFinalized

    root, rows, _, _ = pool
    shards, sel = str(root / "shards"), str(tmp_path / "sel")
    with monkeypatch.context() as patch:
        _finalizer_dies(patch)
        with pytest.raises(RuntimeError, match="killed before finalizing"):
            run_select(shards, sel, SelectionRules())
    assert sorted(n for n in os.listdir(sel) if not n.startswith(".")) == [f"0000{i}.parquet" for i in range(4)]
    with pytest.raises(SelectionNotFinalized, match="not finalized .*rerun select"):
        run_reshard(shards, sel, str(tmp_path / "out"))
    with pytest.raises(SelectionNotFinalized, match="not finalized .*rerun select"):
        run_select(shards, str(tmp_path / "sel_b"), SelectionRules(where="a", selections={"a": sel}))
    assert not (tmp_path / "out").exists() and not (tmp_path / "sel_b").exists()  # refused before writing anything
    # rerun: the finalizer de-duplicates; the corpus holds each uid once
    run_select(shards, sel, SelectionRules())
    accounting = run_reshard(shards, sel, str(tmp_path / "out"), shard_size=100)
    uids = [s.uid for s in iter_samples(str(tmp_path / "out"), "00000.tar")]
    assert len(uids) == accounting.kept == len({r["uid"] for r in rows}) == len(set(uids))
    # a rerun of the per-shard tasks (here all of them) takes the manifest away until the finalizer runs again
    with monkeypatch.context() as patch:
        _finalizer_dies(patch)
        with pytest.raises(RuntimeError):
            run_select(shards, sel, SelectionRules(), ExecutorConfig(skip_completed=False))
    with pytest.raises(SelectionNotFinalized):
        run_reshard(shards, sel, str(tmp_path / "out2"))
    # a manifest for another number of shards is refused too
    run_select(shards, sel, SelectionRules())
    manifest = json.loads((tmp_path / "sel" / "_manifest.json").read_text())
    (tmp_path / "sel" / "_manifest.json").write_text(json.dumps({**manifest, "shards": 3}))
    with pytest.raises(SelectionNotFinalized, match="covers 3 shard.*the input has 4; rerun select"):
        run_reshard(shards, sel, str(tmp_path / "out3"))


def corrupt_scan_jpeg() -> bytes:
    """A JPEG with a valid header and EOI but garbage scan data: passes the quick check, PIL cannot decode it."""
    import io

    from PIL import Image

    from dataset_builders.images import BadImage, inspect_image, strict_decoding
    from dataset_builders.synthetic import encode, shape_image

    good = encode(shape_image(random.Random(0), 64, 64), "JPEG")
    start = good.index(b"\xff\xda") + 20
    for attempt in range(200):
        rng, body = random.Random(attempt), bytearray(good)
        for i in range(start, len(body) - 2):
            if rng.random() < 0.3:
                body[i] = rng.randrange(256)
        data = bytes(body)
        try:
            inspect_image(data)
        except BadImage:
            continue
        try:
            with strict_decoding():  # lmms-eval, imported by other tests, switches truncated loading on
                Image.open(io.BytesIO(data)).load()
        except OSError:
            return data
    raise AssertionError("no corrupt-scan mutant found")


def test_full_decode_fails_on_corrupt_data_even_with_truncated_loading_switched_on(monkeypatch):
    from PIL import ImageFile

    from dataset_builders.images import BadImage, inspect_image

    corrupt = corrupt_scan_jpeg()
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as lmms-eval sets it when imported
    with pytest.raises(BadImage):
        inspect_image(corrupt, full_decode=True)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the process's setting is left as it was


def test_reshard_decodes_every_image_by_default_so_the_corpus_loads(tmp_path):
    from datasets import load_dataset

    from dataset_builders.synthetic import sample_members

    shards = tmp_path / "shards"
    shards.mkdir()
    rng, members, good = random.Random(8), [], []
    for i in range(3):
        sample, meta = clean_sample(rng, f"k{i}")
        members += sample
        good.append(meta)
    members += sample_members("corrupt", corrupt_scan_jpeg(), "a corrupt jpeg", {"uid": "a" * 32, "url": "u"})
    write_shard(str(shards / "00000.tar"), members)
    run_select(str(shards), str(tmp_path / "sel"), SelectionRules())
    corpus = tmp_path / "corpus"
    accounting = run_reshard(str(shards), str(tmp_path / "sel"), str(corpus / "ccs_webdataset"))
    assert (accounting.read, accounting.kept, accounting.dropped) == (4, 3, {"image_undecodable": 1})
    write_dataset_card(str(corpus))
    ds = load_dataset(str(corpus), "ccs", split="train", cache_dir=str(tmp_path / "hf_cache"))
    assert [row["json"]["uid"] for row in ds] == [m["uid"] for m in good]  # iterating decodes every image
    # "quick" stays available, documented as not guaranteeing loadability: this image gets through it
    quick = run_reshard(str(shards), str(tmp_path / "sel"), str(tmp_path / "quick"), verify_images="quick")
    assert quick.kept == 4 and quick.dropped == {}


def test_a_run_whose_tasks_all_failed_does_not_lock_its_output(pool, tmp_path, monkeypatch):
    from dataset_builders.rules import RuleError
    from dataset_builders.steps.reshard import ReshardWriter

    root, _, _, _ = pool
    shards, sel, out = str(root / "shards"), str(tmp_path / "sel"), str(tmp_path / "out")
    # a mistyped --where name fails before anything is written
    scores = {"s": str(root / "scores")}
    with pytest.raises(RuleError, match=r"unknown name 'clip_scor' in selection rule 'clip_scor > 0'; available: "
                                        r"\['clip_score', 'height', 'semantic_understanding_score', 'width'\]"):
        run_select(shards, sel, SelectionRules(where="clip_scor > 0", scores=scores))
    assert not (tmp_path / "sel").exists()
    run_select(shards, sel, SelectionRules(where="clip_score > 0.1", scores=scores))

    # a reshard whose every task fails has recorded its settings and plan, but no output depends on them
    def disk_full(self, *args):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(ReshardWriter, "_write_shard", disk_full)
        with pytest.raises(OSError, match="disk full"):
            run_reshard(shards, sel, out, shard_size=10, verify_images="quick")
    assert (tmp_path / "out" / ".datatrove" / "reshard" / "settings.json").exists()
    accounting = run_reshard(shards, sel, out, shard_size=7)  # other settings and plan: accepted
    assert accounting.balanced and accounting.kept == sum(k for k, _ in _decisions(tmp_path / "sel").values())
    assert [len(list(iter_samples(out, s))) for s in list_shards(out)][0] == 7
    # once a task completed, the settings and the plan bind
    with pytest.raises(ValueError, match="resharded from a different selection or shard size"):
        run_reshard(shards, sel, out, shard_size=10)
    with pytest.raises(ValueError, match="different settings"):
        run_reshard(shards, sel, out, shard_size=7, verify_images="quick")


def test_a_reshard_task_reads_the_plan_footer_and_only_its_row_groups_on_its_own_thread(tmp_path, monkeypatch):
    """The plan (one row per selected sample, one row group per output shard) is read in place, not whole: a task
    reads the footer and its own row groups, all on the task's thread (a read on pyarrow's IO threads can abort the
    process at exit), and the plan is closed when the task returns."""
    import threading
    import types

    import fsspec

    import dataset_builders.steps.reshard as reshard
    from dataset_builders.steps.reshard import PLAN_SCHEMA, ReshardWriter, write_plan

    rng = random.Random(8)
    size, shards = 1000, 6
    plan = pa.table({"out_shard": [i // size for i in range(size * shards)],
                     "src_shard": [f"{i // 500:05d}.tar" for i in range(size * shards)],
                     "key": ["%032x" % rng.getrandbits(128) for _ in range(size * shards)],
                     "uid": ["%032x" % rng.getrandbits(128) for _ in range(size * shards)]}, schema=PLAN_SCHEMA)
    data = write_plan(plan, size)
    (tmp_path / "plan.parquet").write_bytes(data)
    reads, opened = [], []

    class Recording:  # the plan file, recording each read's thread and byte range
        def __init__(self, handle):
            self.handle = handle

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def read(self, *args):
            start = self.handle.tell()
            chunk = self.handle.read(*args)
            reads.append((threading.get_ident(), start, start + len(chunk)))
            return chunk

    class Opener:
        def __init__(self, path, mode):
            self.file = fsspec.open(path, mode)

        def __enter__(self):
            opened.append(Recording(self.file.__enter__()))
            return opened[-1]

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

    monkeypatch.setattr(reshard, "fsspec", types.SimpleNamespace(open=Opener))
    written = {}
    monkeypatch.setattr(ReshardWriter, "_write_shard", lambda self, index, num, rows: written.setdefault(index, rows))
    writer = ReshardWriter(str(tmp_path), str(tmp_path / "out"), str(tmp_path / "plan.parquet"))
    list(writer.run(rank=1, world_size=2))

    assert sorted(written) == [1, 3, 5]
    for index, rows in written.items():
        assert rows.equals(plan.slice(index * size, size))
    assert {thread for thread, _, _ in reads} == {threading.get_ident()} and opened[0].closed
    metadata = pq.ParquetFile(pa.BufferReader(data)).metadata
    spans = []
    for index in range(shards):
        group = metadata.row_group(index)
        columns = [group.column(c) for c in range(group.num_columns)]
        starts = [min(c.data_page_offset, c.dictionary_page_offset or c.data_page_offset) for c in columns]
        spans.append((min(starts), max(s + c.total_compressed_size for s, c in zip(starts, columns))))
    footer_start = min(start for _, start, end in reads if end == len(data))  # the footer read, at the file's end
    assert footer_start > spans[2][1]  # the plan is large enough for the other tasks' row groups to lie before it
    for _, start, end in reads:
        assert end == len(data) or any(spans[i][0] <= start and end <= spans[i][1] for i in written), (start, end)
    assert sum(end - start for _, start, end in reads) < len(data) * 2 // 3
