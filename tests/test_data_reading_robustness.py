"""Damaged or inconsistent inputs that used to lose samples silently: a tar damaged in the middle, a key repeated in
the img2dataset parquet, a corrupt metadata parquet, two samples sharing a uid, and `stats` of a de-duplicated
selection. Each is counted (read = kept + dropped) and reported, never lost."""

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from dataset_builders.accounting import collect
from dataset_builders.pipelines import run_reshard, run_select
from dataset_builders.selection import SelectionRules, load_shard_metadata, read_score_columns
from dataset_builders.shards import Dropped, Sample, ShardProblem, UnreadableParquet, iter_samples
from dataset_builders.synthetic import clean_sample, write_clean_shards, write_metadata_parquet, write_shard


def _shard(folder: Path, keys: list[str], seed: int = 0, uids: dict[str, str] | None = None,
           parquet: bool = True) -> tuple[bytes, list[dict]]:
    """``00000.tar`` (+ parquet) of clean samples with these keys (in this order, repeats allowed); ``uids``
    overrides the uid of a key's last sample in both the json and the parquet."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    members, rows = [], []
    last = {key: i for i, key in enumerate(keys)}
    for i, key in enumerate(keys):
        sample, meta = clean_sample(rng, key)
        if uids and key in uids and last[key] == i:
            meta["uid"] = uids[key]
            sample = [(n, json.dumps(meta).encode() if n.endswith(".json") else b) for n, b in sample]
        members += sample
        rows.append(meta)
    data = write_shard(str(folder / "00000.tar"), members)
    if parquet:
        write_metadata_parquet(str(folder / "00000.parquet"), rows)
    return data, rows


def _logs(logging_dir: Path) -> str:
    return "".join(path.read_text() for path in sorted((logging_dir / "logs").glob("*.log")))


def _decisions(folder: Path) -> dict:
    rows = pq.read_table(folder / "00000.parquet").to_pylist()
    return {(row["key"], row["uid"]): (row["keep"], row["reason"]) for row in rows}


# -- 1. a tar damaged in the middle ----------------------------------------------------------------------------


def _damage(data: bytes, offset: int, how: str) -> bytes:
    damaged = bytearray(data)
    if how == "garbage_header":  # the header block overwritten (a bad disk block, a partial overwrite)
        damaged[offset:offset + 512] = bytes(random.Random(1).randrange(256) for _ in range(512))
    else:  # a zeroed 1 KiB hole: tarfile takes it for the end-of-archive marker
        damaged[offset:offset + 1024] = bytes(1024)
    assert len(damaged) == len(data)
    return bytes(damaged)


@pytest.mark.parametrize("how", ["garbage_header", "zeroed_hole"])
def test_a_tar_damaged_in_the_middle_is_a_corrupt_shard_not_a_silent_end(tmp_path, how):
    data, _ = _shard(tmp_path, [f"k{i}" for i in range(10)], parquet=False)
    offset = {m.name: m.offset for m in tarfile.open(fileobj=io.BytesIO(data))}["k5.jpg"]
    (tmp_path / "00000.tar").write_bytes(_damage(data, offset, how))
    items = list(iter_samples(str(tmp_path), "00000.tar"))
    # k0..k3 were read whole before the damage; k4 was being read when the damage showed (its last member could
    # have been lost with the header), so it is a corrupt_shard drop, as with a truncated tar
    assert [i.key for i in items if isinstance(i, Sample)] == ["k0", "k1", "k2", "k3"]
    assert [(i.key, i.reason) for i in items if isinstance(i, Dropped)] == [("k4", "corrupt_shard")]
    problems = [i for i in items if isinstance(i, ShardProblem)]
    assert len(problems) == 1 and problems[0].shard == "00000.tar"
    assert f"unreadable member header at byte {offset}" in problems[0].detail
    assert f"the {len(data.rstrip(bytes(1))) - offset} bytes after it cannot be read" in problems[0].detail


def test_a_zeroed_first_header_is_a_corrupt_shard_not_an_empty_one(tmp_path):
    data, _ = _shard(tmp_path, ["k0", "k1"], parquet=False)
    (tmp_path / "00000.tar").write_bytes(_damage(data, 0, "zeroed_hole"))
    items = list(iter_samples(str(tmp_path), "00000.tar"))
    assert len(items) == 1 and isinstance(items[0], ShardProblem)
    assert "unreadable member header at byte 0" in items[0].detail


def test_zero_padding_after_the_archive_is_not_damage(tmp_path):
    data, _ = _shard(tmp_path, ["k0", "k1", "k2"], parquet=False)
    (tmp_path / "00000.tar").write_bytes(data + bytes(5 * 10240))  # tar writers pad to their record size
    items = list(iter_samples(str(tmp_path), "00000.tar"))
    assert [i.key for i in items] == ["k0", "k1", "k2"] and all(isinstance(i, Sample) for i in items)


def test_select_counts_logs_and_reports_a_shard_damaged_in_the_middle(tmp_path):
    shards = tmp_path / "shards"
    data, _ = _shard(shards, [f"k{i}" for i in range(10)], parquet=False)
    offset = {m.name: m.offset for m in tarfile.open(fileobj=io.BytesIO(data))}["k5.jpg"]
    (shards / "00000.tar").write_bytes(_damage(data, offset, "garbage_header"))
    selection = run_select(str(shards), str(tmp_path / "sel"), SelectionRules())
    assert (selection.read, selection.kept, selection.dropped) == (5, 4, {"corrupt_shard": 1})
    assert selection.events == {"corrupt_shards": 1}  # the selection's own accounting (manifest, accounting.json)
    manifest = json.loads((tmp_path / "sel" / "_manifest.json").read_text())
    assert manifest["accounting"]["events"] == {"corrupt_shards": 1}
    stats = collect(str(tmp_path / "sel" / ".datatrove" / "select"))  # what `stats` prints
    assert stats.to_dict() == selection.to_dict()
    assert "shard 00000.tar is truncated or corrupt" in _logs(tmp_path / "sel" / ".datatrove" / "select")


# -- 2. a key repeated in the img2dataset parquet --------------------------------------------------------------


def test_a_key_repeated_in_the_parquet_is_a_duplicate_key_drop_as_in_the_tar(tmp_path):
    keys = ["k0", "k1", "k2", "k3", "k1"]  # the second k1 is another sample (other uid, other image)
    _shard(tmp_path, keys, uids={"k1": "f" * 32})
    from_parquet = load_shard_metadata(str(tmp_path), "00000.tar", source="parquet")
    from_tar = load_shard_metadata(str(tmp_path), "00000.tar", source="tar")
    assert from_parquet.source == "parquet" and from_tar.source == "tar"
    for meta in (from_parquet, from_tar):
        assert meta.key == ["k0", "k1", "k2", "k3"]
        assert [(key, reason) for key, reason, _ in meta.drops] == [("k1", "duplicate_key")]
    assert from_parquet.uid == from_tar.uid and "f" * 32 not in from_parquet.uid  # the first k1 is the sample


def test_select_then_reshard_of_a_repeated_key_balances(tmp_path):
    shards = tmp_path / "shards"
    _, rows = _shard(shards, ["k0", "k1", "k2", "k3", "k1"], uids={"k1": "f" * 32})
    selection = run_select(str(shards), str(tmp_path / "sel"), SelectionRules())
    assert (selection.read, selection.kept, selection.dropped) == (5, 4, {"duplicate_key": 1})
    resharded = run_reshard(str(shards), str(tmp_path / "sel"), str(tmp_path / "out"), shard_size=10)
    assert resharded.balanced and (resharded.read, resharded.kept) == (4, 4)
    written = {s.meta["source_key"]: s.uid for s in iter_samples(str(tmp_path / "out"), "00000.tar")}
    assert written == {row["key"]: row["uid"] for row in rows[:4]}


def test_reshard_counts_a_key_planned_twice_instead_of_collapsing_it(tmp_path):
    shards = tmp_path / "shards"
    _shard(shards, ["k0", "k1", "k2"])
    run_select(str(shards), str(tmp_path / "sel"), SelectionRules())
    # a selection holding one key twice (written by hand or by an older kit): the tar can give only one sample
    decisions = pq.read_table(tmp_path / "sel" / "00000.parquet")
    repeat = decisions.filter(pc.equal(decisions.column("key"), "k1"))
    pq.write_table(pa.concat_tables([decisions, repeat.set_column(1, "uid", pa.array(["e" * 32]))]),
                   tmp_path / "sel" / "00000.parquet")
    resharded = run_reshard(str(shards), str(tmp_path / "sel"), str(tmp_path / "out"), shard_size=10)
    assert (resharded.read, resharded.kept, resharded.dropped) == (4, 3, {"duplicate_key": 1})
    assert resharded.balanced
    assert "00000.tar:k1 (duplicate_key)" in _logs(tmp_path / "out" / ".datatrove" / "reshard")


# -- 3. a truncated metadata parquet ---------------------------------------------------------------------------


def _truncate_parquet(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_auto_metadata_falls_back_to_the_tar_when_the_parquet_is_corrupt(tmp_path):
    shards = tmp_path / "shards"
    write_clean_shards(str(shards), num_shards=3, per_shard=4)
    _truncate_parquet(shards / "00001.parquet")
    selection = run_select(str(shards), str(tmp_path / "sel"), SelectionRules())
    from_tars = run_select(str(shards), str(tmp_path / "sel_tar"), SelectionRules(), metadata_source="tar")
    assert (selection.read, selection.kept, selection.dropped) == (12, 12, {})
    assert selection.events == {"metadata_parquet_unreadable": 1}
    for shard in ("00000", "00001", "00002"):
        assert (pq.read_table(tmp_path / "sel" / f"{shard}.parquet").to_pylist()
                == pq.read_table(tmp_path / "sel_tar" / f"{shard}.parquet").to_pylist())
    assert from_tars.events == {}
    assert collect(str(tmp_path / "sel" / ".datatrove" / "select")).events == {"metadata_parquet_unreadable": 1}
    logs = _logs(tmp_path / "sel" / ".datatrove" / "select")
    assert f"metadata parquet {shards}/00001.parquet of shard 00001.tar is unreadable" in logs
    assert "read the metadata of 00001.tar from the tar instead" in logs


def test_explicit_parquet_metadata_refuses_a_corrupt_parquet_naming_it(tmp_path):
    write_clean_shards(str(tmp_path), num_shards=1, per_shard=3)
    _truncate_parquet(tmp_path / "00000.parquet")
    with pytest.raises(UnreadableParquet, match=rf"metadata parquet {tmp_path}/00000.parquet of shard 00000.tar "
                                                r"is unreadable \(.*magic bytes.*--metadata auto or tar"):
        load_shard_metadata(str(tmp_path), "00000.tar", source="parquet")
    assert issubclass(UnreadableParquet, ValueError)  # the CLI prints it as one line, exit status 2


# -- 4. two samples of a shard with the same uid ---------------------------------------------------------------


def _scores(folder: Path, rows: list[dict], values: list[float], with_key: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    columns = {"uid": [r["uid"] for r in rows], "clip_score": pa.array(values, pa.float32())}
    if with_key:
        columns["key"] = [r["key"] for r in rows]
    pq.write_table(pa.table(columns), folder / "00000.parquet")


def test_scores_are_joined_on_uid_and_key(tmp_path):
    shards = tmp_path / "shards"
    _, rows = _shard(shards, [f"k{i}" for i in range(6)], uids={"k1": "a" * 32, "k4": "a" * 32})
    values = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]  # k1 and k4 share a uid but not their scores
    _scores(tmp_path / "scores", rows, values)
    rules = SelectionRules(where="clip_score >= 0.35", scores={"clip": str(tmp_path / "scores")})
    run_select(str(shards), str(tmp_path / "sel"), rules, dedup_uid=False)
    expected = {(r["key"], r["uid"]): (True, None) if v >= 0.35 else (False, "rule") for r, v in zip(rows, values)}
    assert _decisions(tmp_path / "sel") == expected
    assert expected[("k1", "a" * 32)] == (False, "rule") and expected[("k4", "a" * 32)] == (True, None)


def test_a_score_file_without_keys_is_still_joined_on_uid(tmp_path):
    _, rows = _shard(tmp_path / "shards", ["k0", "k1", "k2"], uids={"k2": "b" * 32})
    _scores(tmp_path / "scores", rows[:2], [0.25, 0.75], with_key=False)
    uids, keys = [r["uid"] for r in rows], [r["key"] for r in rows]
    columns = read_score_columns(str(tmp_path / "scores"), "00000.tar", uids, keys)
    np.testing.assert_array_equal(columns["clip_score"], [0.25, 0.75, np.nan])
    _scores(tmp_path / "keyed", rows[:2], [0.25, 0.75])
    keyed = read_score_columns(str(tmp_path / "keyed"), "00000.tar", uids, ["k0", "other", "k2"])
    np.testing.assert_array_equal(keyed["clip_score"], [0.25, np.nan, np.nan])  # a key mismatch is no score


# -- 5. `stats` of a de-duplicated selection -------------------------------------------------------------------


def test_stats_of_a_select_logging_folder_agree_with_the_selection(tmp_path):
    shards = tmp_path / "shards"
    write_clean_shards(str(shards), num_shards=2, per_shard=4)
    for ext in ("tar", "parquet"):  # the same samples again: 4 uids repeat
        (shards / f"00002.{ext}").write_bytes((shards / f"00000.{ext}").read_bytes())
    selection = run_select(str(shards), str(tmp_path / "sel"), SelectionRules())
    assert (selection.read, selection.kept, selection.dropped) == (12, 8, {"duplicate_uid": 4})
    logging_dir = str(tmp_path / "sel" / ".datatrove" / "select")
    assert collect(logging_dir).to_dict() == selection.to_dict()
    # a rerun skips the select tasks and re-runs the (idempotent) de-duplication, which now marks nothing new
    rerun = run_select(str(shards), str(tmp_path / "sel"), SelectionRules())
    assert rerun.to_dict() == selection.to_dict() == collect(logging_dir).to_dict()


def test_stats_and_selection_agree_on_duplicates_and_a_damaged_shard(tmp_path):
    shards = tmp_path / "shards"
    write_clean_shards(str(shards), num_shards=1, per_shard=4)
    # 00001: the same 4 samples, tar only (so it is scanned), damaged at the third sample's first member
    data = (shards / "00000.tar").read_bytes()
    offset = [m.offset for m in tarfile.open(fileobj=io.BytesIO(data))][2 * 3]
    (shards / "00001.tar").write_bytes(_damage(data, offset, "garbage_header"))
    selection = run_select(str(shards), str(tmp_path / "sel"), SelectionRules())
    # 00001 gives its first sample (a duplicate of 00000's) and its second, being read when the damage shows, as a
    # corrupt_shard drop; the last two are lost with the tar (the shard event)
    assert (selection.read, selection.kept) == (6, 4)
    assert selection.dropped == {"duplicate_uid": 1, "corrupt_shard": 1}
    assert selection.events == {"corrupt_shards": 1}  # kept through the de-duplication's rewrite of 00001
    assert collect(str(tmp_path / "sel" / ".datatrove" / "select")).to_dict() == selection.to_dict()
