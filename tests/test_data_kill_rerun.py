"""A data-stage command killed midway (like a SIGKILL: no cleanup, no completion marker) and rerun unchanged into
the same folder gives exactly the output of an uninterrupted run into another folder: nothing duplicated, nothing
lost, no leftover temp files, the same balanced accounting. Each stage runs 2 tasks on one worker; task 0 completes
and task 1 dies after writing some of its output: score, select (a per-shard task, and the finalizer) and pack
(reshard's tasks: test_data_select_reshard.py). The records a rerun reads back (select's and pack's settings,
reshard's plan, pack's dataset card) are killed while being written too."""

import json
import os
import random
import re
import sys
import textwrap

import pyarrow.parquet as pq
import pytest

from dataset_builders.commands.pack import PackSettings, run_pack
from dataset_builders.pipelines import ExecutorConfig, run_reshard, run_score, run_select
from dataset_builders.selection import SelectionRules
from dataset_builders.steps.clip_score import ClipScorer
from dataset_builders.synthetic import damaged_shard_members, write_clean_shards, write_shard
from test_data_scoring import tiny_clip  # noqa: F401 - fixture
from test_data_select_reshard import pool, run_and_reap  # noqa: F401 - pool is a fixture

TASKS = 2
PER_SHARD = 36  # pack task 1 gets 2 x 36 documents of ~26 positions at capacity 64: over one 16-pack row group
KILLED = 17

# What the killed command runs before the stage: ways to die halfway through writing an output file.
DIE = textwrap.dedent("""
    import io, os, sys
    import pyarrow.parquet as pq
    from dataset_builders.shards import atomic_write

    def die_writing(module, target, nth=1):
        '''The nth write of ``target`` by ``module.write_parquet_atomic`` stops halfway through its temp file.'''
        real, seen = module.write_parquet_atomic, []

        def write(folder, name, table):
            if name == target:
                seen.append(name)
                if len(seen) == nth:
                    buffer = io.BytesIO()
                    pq.write_table(table, buffer)
                    with atomic_write(folder, name) as handle:
                        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                        handle.flush()
                        os._exit(17)  # like a SIGKILL: no cleanup, no rename, no completion marker
            real(folder, name, table)

        module.write_parquet_atomic = write

    def die_after_first_row_group(file_part):
        '''A parquet writer whose file name contains ``file_part`` dies once its first row group is on disk.'''

        class Dies(pq.ParquetWriter):
            def __init__(self, where, *args, **kwargs):
                super().__init__(where, *args, **kwargs)
                self.dies, self.handle = file_part in str(getattr(where, "path", where)), where

            def write_table(self, *args, **kwargs):
                super().write_table(*args, **kwargs)
                if self.dies:
                    self.handle.flush()
                    os._exit(17)

        pq.ParquetWriter = Dies

    def die_writing_file(name):
        '''The first write into a file whose name contains ``name`` (a temp file of it too) stops halfway.'''
        from fsspec.implementations.local import LocalFileOpener

        real = LocalFileOpener.write

        def write(self, data):
            if name in os.path.basename(self.path):
                real(self, data[: len(data) // 2])
                self.flush()
                os._exit(17)
            return real(self, data)

        LocalFileOpener.write = write
""")


def run_killed(tmp_path, script, *args):
    returncode, log = run_and_reap([sys.executable, "-c", DIE + textwrap.dedent(script), *map(str, args)],
                                   tmp_path / "killed.log")
    assert returncode == KILLED, log[-3000:]


def output_tree(folder):
    """Every file of a stage's output by relative path, hidden ones included (a leftover temp file is a difference),
    except the executor's own folder (logs, timings, completion markers)."""
    tree = {}
    for root, dirs, files in os.walk(folder):
        if root == str(folder):
            dirs[:] = [d for d in dirs if d != ".datatrove"]
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                tree[os.path.relpath(path, folder)] = handle.read()
    return tree


def without_fingerprint(card: bytes) -> bytes:
    """A dataset card without its content fingerprint (it hashes file modification times)."""
    return re.sub(rb"content fingerprint [0-9a-f]{32}", b"content fingerprint <md5>", card)


def temps(folder, under=""):
    """Temp files left under ``folder`` (in ``under``: e.g. the executor's folder, which output_tree leaves out)."""
    root = os.path.join(folder, under)
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, files in os.walk(root)
                  for n in files if n.endswith(".tmp"))


def completions(folder, stage):
    path = os.path.join(folder, ".datatrove", stage, "completions")
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """3 clean shards and a damaged one (a drop of every kind): task 1 of 2 reads 00001 and the damaged 00003."""
    folder = tmp_path_factory.mktemp("corpus")
    write_clean_shards(str(folder), 3, PER_SHARD, seed=31)
    write_shard(str(folder / "00003.tar"), damaged_shard_members(random.Random(32))[0])
    return str(folder)


SCORE = """
    import dataset_builders.steps.score_writer as score_writer
    from dataset_builders.pipelines import ExecutorConfig, run_score
    from dataset_builders.steps.clip_score import ClipScorer

    die_writing(score_writer, "00003.parquet")  # task 1, after it wrote 00001.parquet
    run_score(sys.argv[1], sys.argv[2], ClipScorer(sys.argv[3], batch_size=4), ExecutorConfig(tasks=int(sys.argv[4])))
"""


def test_score_task_killed_midway_reruns_to_the_uninterrupted_output(corpus, tiny_clip, tmp_path):  # noqa: F811
    killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")
    run_killed(tmp_path, SCORE, corpus, killed, tiny_clip, TASKS)
    left = output_tree(killed)
    assert sorted(n for n in left if not n.startswith(".")) == ["00000.parquet", "00001.parquet", "00002.parquet"]
    assert [n for n in left if n.startswith(".00003.parquet.") and n.endswith(".tmp")] and len(left) == 4
    assert completions(killed, "score") == ["00000"]

    rerun = run_score(corpus, killed, ClipScorer(tiny_clip, batch_size=4), ExecutorConfig(tasks=TASKS))
    uninterrupted = run_score(corpus, clean, ClipScorer(tiny_clip, batch_size=4), ExecutorConfig(tasks=TASKS))
    assert output_tree(killed) == output_tree(clean)  # byte for byte, and the temp file is gone
    assert not temps(killed)
    assert rerun.to_dict() == uninterrupted.to_dict()
    assert rerun.balanced and rerun.tasks == TASKS and rerun.dropped  # the damaged shard's drops are counted once
    uids = [u for n in sorted(output_tree(killed)) for u in pq.read_table(os.path.join(killed, n))["uid"].to_pylist()]
    assert len(uids) == len(set(uids)) == rerun.kept
    with open(os.path.join(killed, ".datatrove", "score", "accounting.json")) as handle:
        assert json.load(handle) == uninterrupted.to_dict()


SELECT = """
    import dataset_builders.steps.select as select
    from dataset_builders.pipelines import ExecutorConfig, run_select
    from dataset_builders.selection import SelectionRules

    if sys.argv[5].isdigit():
        die_writing(select, "00003.parquet", nth=int(sys.argv[5]))
    else:
        die_writing_file(sys.argv[5])
    run_select(sys.argv[1], sys.argv[2], SelectionRules(where=sys.argv[4], scores={"s": sys.argv[3]}),
               ExecutorConfig(tasks=int(sys.argv[6])))
"""
WHERE = "clip_score > 0.1"


@pytest.mark.parametrize("kill, dies_in", [("1", "per-shard task"), ("2", "finalizer"),
                                           ("settings.json", "recording its settings")])
def test_select_killed_midway_reruns_to_the_uninterrupted_output(pool, tmp_path, kill, dies_in):  # noqa: F811
    """The first write of 00003.parquet is task 1's decisions (after it wrote 00001); the second is the finalizer
    marking the uids that shard 0 already kept as duplicates (after every per-shard task completed). The stage's
    settings are recorded before any task runs, and read back by every rerun."""
    root, rows, _, _ = pool
    shards, scores = str(root / "shards"), str(root / "scores")
    killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")
    run_killed(tmp_path, SELECT, shards, killed, scores, WHERE, kill, TASKS)
    left = sorted(n for n in output_tree(killed) if not n.startswith("."))
    if dies_in == "per-shard task":
        assert left == ["00000.parquet", "00001.parquet", "00002.parquet"] and temps(killed)
        assert completions(killed, "select") == ["00000"]
    elif dies_in == "finalizer":
        assert left == [f"0000{i}.parquet" for i in range(4)] and temps(killed)  # no _manifest.json
        assert completions(killed, "select") == ["00000", "00001"] and not completions(killed, "select-finalize")
    else:
        assert left == [] and not completions(killed, "select")

    rules = {"where": WHERE, "scores": {"s": scores}}
    rerun = run_select(shards, killed, SelectionRules(**rules), ExecutorConfig(tasks=TASKS))
    uninterrupted = run_select(shards, clean, SelectionRules(**rules), ExecutorConfig(tasks=TASKS))
    assert output_tree(killed) == output_tree(clean)  # decisions and manifest (with its accounting)
    assert not temps(killed)
    assert rerun.to_dict() == uninterrupted.to_dict()
    assert rerun.balanced and rerun.read == len(rows) and rerun.dropped.get("duplicate_uid", 0) >= 1
    kept = [r["uid"] for n in sorted(output_tree(killed)) if n.endswith(".parquet")
            for r in pq.read_table(os.path.join(killed, n)).to_pylist() if r["keep"]]
    assert len(kept) == len(set(kept)) == rerun.kept


RESHARD = """
    from dataset_builders.pipelines import run_reshard

    die_writing_file("plan.parquet")
    run_reshard(sys.argv[1], sys.argv[2], sys.argv[3], shard_size=10)
"""


def test_reshard_killed_writing_its_plan_reruns_to_the_uninterrupted_output(pool, tmp_path):  # noqa: F811
    """The plan (which sample goes to which output shard) is written before any task runs and read back by every
    rerun to check that it still holds (a task killed midway: test_data_select_reshard.py)."""
    root, _, _, _ = pool
    shards, sel = str(root / "shards"), str(tmp_path / "sel")
    run_select(shards, sel, SelectionRules())
    killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")
    run_killed(tmp_path, RESHARD, shards, sel, killed)
    assert not completions(killed, "reshard") and not [n for n in os.listdir(killed) if not n.startswith(".")]
    rerun = run_reshard(shards, sel, killed, shard_size=10)
    uninterrupted = run_reshard(shards, sel, clean, shard_size=10)
    assert output_tree(killed) == output_tree(clean)
    assert not temps(killed)
    assert rerun.to_dict() == uninterrupted.to_dict() and rerun.balanced and rerun.kept



RESHARD_CARD = """
    from dataset_builders.cards import write_dataset_card

    die_writing_file("README.md")
    write_dataset_card(sys.argv[1])
"""


def test_dataset_card_killed_while_rewritten_keeps_the_other_stages_configs(pool, tmp_path):  # noqa: F811
    """The corpus card is rewritten after each reshard and merged with what other stages (pack) put in it: a kill
    while writing must leave the previous card whole, and the rerun gives the card an unbroken run gives."""
    from dataset_builders.cards import write_dataset_card
    from dataset_builders.commands.pack import write_card as write_pack_card

    root, _, _, _ = pool
    run_select(str(root / "shards"), str(tmp_path / "sel"), SelectionRules())
    corpora = {}
    for name in ("killed", "clean"):
        corpus = tmp_path / name
        run_reshard(str(root / "shards"), str(tmp_path / "sel"), str(corpus / "ccs_webdataset"), shard_size=50)
        (corpus / "packed_144").mkdir()
        write_pack_card(str(corpus), "packed_144")
        corpora[name] = corpus
    before = (corpora["killed"] / "README.md").read_bytes()
    run_killed(tmp_path, RESHARD_CARD, corpora["killed"])
    assert (corpora["killed"] / "README.md").read_bytes() == before  # the torn text went to a temp file only
    write_dataset_card(str(corpora["killed"]))
    write_dataset_card(str(corpora["clean"]))
    cards = {name: (corpus / "README.md").read_bytes() for name, corpus in corpora.items()}
    # the two corpora's shards differ only in their files' times, which the content fingerprint covers
    assert without_fingerprint(cards["killed"]) == without_fingerprint(cards["clean"])
    assert cards["killed"].count(b"config_name: packed_144") == 2  # the pack stage's config and info
    assert not temps(corpora["killed"])

PACK = """
    from dataset_builders.commands.pack import PackSettings, run_pack
    from dataset_builders.pipelines import ExecutorConfig

    if sys.argv[4] == "task":
        die_after_first_row_group("train-00001-of-")
    else:
        die_writing_file(sys.argv[4])
    run_pack(sys.argv[1], sys.argv[2], PackSettings(num_image_tokens=16, capacity=64, buffer_size=8),
             ExecutorConfig(tasks=int(sys.argv[3])))
"""
PACK_SETTINGS = PackSettings(num_image_tokens=16, capacity=64, buffer_size=8)
# The corpus folder already has a card (the reshard stage's config): packing adds its config and keeps that one.
CORPUS_CARD = """---
configs:
- config_name: ccs
  data_files:
  - split: train
    path: ccs_webdataset/*.tar
---

# A corpus
"""


def corpus_folder(path):
    os.makedirs(path)
    with open(os.path.join(path, "README.md"), "w") as handle:
        handle.write(CORPUS_CARD)
    return str(path)


@pytest.fixture(scope="module")
def packed(corpus, tmp_path_factory):
    """The uninterrupted run: (output folder, packing statistics)."""
    clean = corpus_folder(tmp_path_factory.mktemp("packed") / "clean")
    return clean, run_pack(corpus, clean, PACK_SETTINGS, ExecutorConfig(tasks=TASKS))


def _card(tree):
    return without_fingerprint(tree.pop("README.md"))


@pytest.mark.parametrize("kill", ["task", "settings.json", "README.md"])
def test_pack_killed_midway_reruns_to_the_uninterrupted_output(corpus, packed, tmp_path, kill):
    """``task``: task 1 dies once its first row group (16 packs) is in its temp file. The settings are recorded
    before any task runs and read back by every rerun; the card is written after the tasks, merged into the one the
    folder has."""
    clean, uninterrupted = packed
    killed = corpus_folder(tmp_path / "killed")
    run_killed(tmp_path, PACK, corpus, killed, TASKS, kill)
    left = output_tree(killed)
    if kill == "task":
        assert set(left) == {*temps(killed), "README.md", "packed_16/train-00000-of-00002.parquet"}
        assert os.path.basename(temps(killed)[0]).startswith(".train-00001-of-00002.parquet.")
        assert len(left[temps(killed)[0]]) > 16 * 2 * 1000  # its first row group (16 packs, their images)
        assert completions(killed, "pack-packed_16") == ["00000"]
    elif kill == "settings.json":
        assert sorted(left) == ["README.md"] and not completions(killed, "pack-packed_16")
    else:
        assert completions(killed, "pack-packed_16") == ["00000", "00001"]

    rerun = run_pack(corpus, killed, PACK_SETTINGS, ExecutorConfig(tasks=TASKS))
    got, want = output_tree(killed), output_tree(clean)
    assert _card(got) == _card(want)  # with both configs
    assert got == want  # the packs byte for byte, and packing_stats.json
    assert not temps(killed)
    assert rerun == uninterrupted and rerun["balanced"] and rerun["dropped"]
    assert pq.ParquetFile(os.path.join(killed, "packed_16/train-00001-of-00002.parquet")).metadata.num_row_groups > 1
    uids = [u for n in sorted(got) if n.endswith(".parquet")
            for pack in pq.read_table(os.path.join(killed, n))["uids"].to_pylist() for u in pack]
    assert len(uids) == len(set(uids)) == rerun["documents"]
