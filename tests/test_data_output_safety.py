"""Outputs never destroy or pollute data: a stage refuses an output folder it reads from, a folder holding shards or
packs of another run (they would be published with the new corpus), and a --where or --column that can only fail
later; pack counts an unreadable image file as a drop and reads image paths of json/csv sets; reshard's dataset card
keeps what a user wrote in README.md."""

import json
import os
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import DatasetCard
from PIL import Image

from dataset_builders.cards import write_dataset_card
from dataset_builders.cli import build_parser
from dataset_builders.cli import main as cli_main
from dataset_builders.commands.pack import PackSettings, run_pack, write_card
from dataset_builders.pipelines import ExecutorConfig, run_reshard, run_score, run_select
from dataset_builders.rules import Expression, ImageRules, RuleError
from dataset_builders.selection import SelectionRules
from dataset_builders.steps.clip_score import ClipScorer
from dataset_builders.synthetic import write_clean_shards, write_shard

PACK = PackSettings(num_image_tokens=16, capacity=512)


def _files(folder):
    """Every file under ``folder`` by relative path -> bytes."""
    tree = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                tree[os.path.relpath(path, folder)] = handle.read()
    return tree


def _kept(selection):
    """Samples a selection keeps, from its decision files."""
    return sum(pq.read_table(os.path.join(selection, name)).column("keep").to_pylist().count(True)
               for name in os.listdir(selection) if name.endswith(".parquet"))


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """3 img2dataset shards of 4 samples, a selection keeping them all and a hand-made score folder."""
    root = tmp_path_factory.mktemp("pool")
    rows = write_clean_shards(str(root / "shards"), 3, 4, seed=7)
    run_select(str(root / "shards"), str(root / "all"), SelectionRules())
    (root / "scores").mkdir()
    for shard in range(3):
        part = rows[shard * 4:(shard + 1) * 4]
        pq.write_table(pa.table({"uid": [r["uid"] for r in part], "key": [r["key"] for r in part],
                                 "s": pa.array(np.linspace(0, 1, 4), pa.float32())}),
                       root / "scores" / f"{shard:05d}.parquet")
    return root, rows


# 1. an output folder that is an input folder


def test_stages_refuse_to_write_into_a_folder_they_read(pool, tmp_path, monkeypatch):
    root, _ = pool
    shards, all_, scores = str(root / "shards"), str(root / "all"), str(root / "scores")
    before = {name: _files(root / name) for name in ("shards", "all", "scores")}
    with pytest.raises(ValueError, match=r"the output folder .*/shards is the --input folder: writing there would "
                                         r"overwrite the files this stage reads"):
        run_select(shards, shards, SelectionRules())
    with pytest.raises(ValueError, match=r"is the --scores clip folder"):
        run_select(shards, scores, SelectionRules(where="s > 0.5", scores={"clip": scores}))
    with pytest.raises(ValueError, match=r"is the --selection a folder"):
        run_select(shards, all_, SelectionRules(where="a", selections={"a": all_}))
    with pytest.raises(ValueError, match=r"is the --input folder"):  # the model is never loaded
        run_score(shards, shards + "/", ClipScorer(str(tmp_path / "no_model")))
    with pytest.raises(ValueError, match=r"is the --input folder"):
        run_reshard(shards, all_, shards, shard_size=2)
    with pytest.raises(ValueError, match=r"is the --selection folder"):
        run_reshard(shards, all_, all_, shard_size=2)
    with pytest.raises(ValueError, match=r"is the --input folder"):
        run_pack(shards, shards, PACK)
    # the same folder spelled differently: relative, through a symlink
    monkeypatch.chdir(root)
    with pytest.raises(ValueError, match=r"is the --input folder"):
        run_select(shards, "./shards/", SelectionRules())
    os.symlink(shards, tmp_path / "link")
    with pytest.raises(ValueError, match=r"is the --input folder"):
        run_reshard(shards, all_, str(tmp_path / "link"), shard_size=2)
    assert {name: _files(root / name) for name in ("shards", "all", "scores")} == before  # nothing written


def test_pack_refuses_an_output_in_its_dataset_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    datasets.Dataset.from_dict({"image": [None], "text": ["x"]}).to_parquet(str(data / "train.parquet"))
    for output in (data, data / "packed"):
        with pytest.raises(ValueError, match="--input|inside the dataset folder"):
            run_pack(str(data), str(output), PACK)
    assert sorted(os.listdir(data)) == ["train.parquet"]


def test_the_command_line_says_it_in_one_line(pool):
    root, _ = pool
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "dataset_builders", "reshard", "--input", str(root / "shards"),
                           "--selection", str(root / "all"), "--output", str(root / "shards")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"python -m dataset_builders reshard: error: the output folder {root / 'shards'} is the --input folder")


# 2. shards or packs of another run in the output folder


def test_pack_refuses_packs_of_another_run_and_its_advice_works(tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "out"
    rows = write_clean_shards(str(shards), 3, 4, seed=3, parquet=False)
    run_pack(str(shards), str(out), PACK, ExecutorConfig(tasks=3))
    old = sorted(os.listdir(out / "packed_16"))
    with pytest.raises(ValueError, match=rf"pack-packed_16 was packed with other settings \(settings.json: tasks: "
                                         rf"3 -> 1\); use "
                                         rf"another --config-name or output folder, or delete that folder and "
                                         rf"{out}/packed_16/\*.parquet to start over"):
        run_pack(str(shards), str(out), PACK, ExecutorConfig(tasks=1))
    shutil.rmtree(out / ".datatrove")  # half of the advice: the old packs are still there
    with pytest.raises(ValueError, match=r"holds 3 file\(s\) not made by a run recorded in .*pack-packed_16: "
                                         r"packed_16/train-00000-of-00003.parquet, packed_16/train-00001-of-00003"
                                         r".parquet, packed_16/train-00002-of-00003.parquet; they would be published"):
        run_pack(str(shards), str(out), PACK, ExecutorConfig(tasks=1))
    assert sorted(os.listdir(out / "packed_16")) == old and not (out / ".datatrove").exists()  # nothing written
    for name in old:
        if name.endswith(".parquet"):
            os.remove(out / "packed_16" / name)
    stats = run_pack(str(shards), str(out), PACK, ExecutorConfig(tasks=1))
    ds = datasets.load_dataset(str(out), "packed_16", split="train", cache_dir=str(tmp_path / "cache"))
    assert sorted(u for pack in ds["uids"] for u in pack) == sorted(r["uid"] for r in rows)
    assert stats["documents"] == len(rows) and stats["packs"] == ds.num_rows
    info = DatasetCard((out / "README.md").read_text()).data.to_dict()["dataset_info"][0]
    assert info["splits"][0]["num_examples"] == ds.num_rows


def test_a_stray_pack_is_not_counted_in_the_card(tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "out"
    write_clean_shards(str(shards), 1, 4, seed=4, parquet=False)
    run_pack(str(shards), str(out), PACK, ExecutorConfig(tasks=1))
    shutil.copy(out / "packed_16" / "train-00000-of-00001.parquet", out / "packed_16" / "train-00000-of-00002.parquet")
    with pytest.raises(ValueError, match=r"holds 1 file\(s\) this run does not write \(left by an earlier run with "
                                         r"other settings\): packed_16/train-00000-of-00002.parquet"):
        run_pack(str(shards), str(out), PACK, ExecutorConfig(tasks=1))  # the same command, resumed
    write_card(str(out), "packed_16", ["packed_16/train-00000-of-00001.parquet"])
    info = DatasetCard((out / "README.md").read_text()).data.to_dict()["dataset_info"][0]
    assert info["splits"][0]["num_examples"] == pq.ParquetFile(out / "packed_16" / "train-00000-of-00001.parquet"
                                                                ).metadata.num_rows


def test_reshard_refuses_shards_of_another_run_and_its_advice_works(pool, tmp_path):
    root, rows = pool
    shards, corpus = str(root / "shards"), tmp_path / "corpus"
    subset = corpus / "x_webdataset"
    run_reshard(shards, str(root / "all"), str(subset), shard_size=2)
    write_dataset_card(str(corpus))
    run_select(shards, str(tmp_path / "big"), SelectionRules(image=ImageRules(min_side=45)))
    kept = _kept(tmp_path / "big")
    assert 0 < kept < len(rows)
    with pytest.raises(ValueError, match=rf"{subset} was resharded from a different selection or shard size; use "
                                         rf"another output folder, or delete {subset}/.datatrove/reshard and the "
                                         rf"shards in {subset} to start over"):
        run_reshard(shards, str(tmp_path / "big"), str(subset), shard_size=2)
    shutil.rmtree(subset / ".datatrove")
    before = _files(subset)
    with pytest.raises(ValueError, match=r"holds 12 file\(s\) not made by a run recorded in .*x_webdataset/"
                                         r".datatrove/reshard: 00000.parquet, 00000.tar, 00001.parquet, 00001.tar, "
                                         r"00002.parquet and 7 more; they would be published with the new ones. "
                                         r"Delete them to start over"):
        run_reshard(shards, str(tmp_path / "big"), str(subset), shard_size=2)
    assert _files(subset) == before
    for name in os.listdir(subset):
        os.remove(subset / name)
    accounting = run_reshard(shards, str(tmp_path / "big"), str(subset), shard_size=2)
    write_dataset_card(str(corpus))
    ds = datasets.load_dataset(str(corpus), "x", split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == accounting.kept == kept


def test_a_stray_shard_is_refused_on_rerun_and_not_counted_in_the_card(pool, tmp_path):
    root, rows = pool
    shards, corpus = str(root / "shards"), tmp_path / "corpus"
    subset = corpus / "x_webdataset"
    run_reshard(shards, str(root / "all"), str(subset), shard_size=5)  # 00000..00002
    for ext in ("tar", "parquet"):
        shutil.copy(subset / f"00000.{ext}", subset / f"00007.{ext}")
    with pytest.raises(ValueError, match=r"holds 2 file\(s\) this run does not write .*: 00007.parquet, 00007.tar"):
        run_reshard(shards, str(root / "all"), str(subset), shard_size=5)
    write_dataset_card(str(corpus))
    card = DatasetCard((corpus / "README.md").read_text()).data.to_dict()
    assert card["dataset_info"][0]["splits"][0]["num_examples"] == len(rows)  # not + the stray shard's 5
    with pytest.raises(datasets.exceptions.NonMatchingSplitsSizesError):  # loading it fails, it is never mixed in
        datasets.load_dataset(str(corpus), "x", split="train", cache_dir=str(tmp_path / "cache"))


def test_the_other_settings_error_names_the_outputs_to_delete(pool, tmp_path):
    root, _ = pool
    sel = tmp_path / "sel"
    run_select(str(root / "shards"), str(sel), SelectionRules())
    with pytest.raises(ValueError, match=rf"{sel}/.datatrove/select holds a run with different settings "
                                         rf"\(settings.json: rules.image.min_side: 0 -> 45\); use another output "
                                         rf"folder, or delete that folder and "
                                         rf"the decision files in {sel} to start over"):
        run_select(str(root / "shards"), str(sel), SelectionRules(image=ImageRules(min_side=45)))


def test_a_rerun_naming_its_input_folder_otherwise_is_the_same_run(tmp_path, monkeypatch):
    shards, out = tmp_path / "shards", tmp_path / "out"
    write_clean_shards(str(shards), 2, 4, seed=3, parquet=False)
    monkeypatch.chdir(tmp_path)
    first = run_pack("shards", str(out), PACK, ExecutorConfig(tasks=2))
    recorded = (out / ".datatrove" / "pack-packed_16" / "settings.json").read_text()
    for spelling in (str(shards), str(shards) + "/", "./shards"):
        again = run_pack(spelling, str(out), PACK, ExecutorConfig(tasks=2))
        assert again["documents"] == first["documents"] and again["packs"] == first["packs"], spelling
    assert (out / ".datatrove" / "pack-packed_16" / "settings.json").read_text() == recorded
    sel = tmp_path / "sel"
    run_select("shards", str(sel), SelectionRules())
    run_select(str(shards) + "/", str(sel), SelectionRules())  # select: the same run too


def test_turning_uid_deduplication_off_on_a_deduplicated_selection_is_refused(pool, tmp_path):
    # its duplicate_uid marks would stay in the decision files under settings that claim no de-duplication
    root, _ = pool
    sel = tmp_path / "sel"
    run_select(str(root / "shards"), str(sel), SelectionRules())
    with pytest.raises(ValueError, match="holds a run with different settings"):
        run_select(str(root / "shards"), str(sel), SelectionRules(), dedup_uid=False)
    run_select(str(root / "shards"), str(sel), SelectionRules())  # the same settings still rerun


def test_a_rerun_of_the_same_reshard_fills_in_a_missing_shard(pool, tmp_path):
    root, _ = pool
    shards, out = str(root / "shards"), tmp_path / "out"
    run_reshard(shards, str(root / "all"), str(out), shard_size=5)
    complete = _files(out)
    for name in ("00001.tar", "00001.parquet", ".datatrove/reshard/completions/00001"):
        os.remove(out / name)  # as if its task had died
    run_reshard(shards, str(root / "all"), str(out), shard_size=5)
    assert {k: v for k, v in _files(out).items() if not k.startswith(".")} == {
        k: v for k, v in complete.items() if not k.startswith(".")}


# 3. pack from a load_dataset input: image files by path


def _image_files(folder):
    folder.mkdir(parents=True)
    for colour in ("red", "blue"):
        Image.new("RGB", (20, 20), colour).save(folder / f"{colour}.jpg")


def _pixels(ds):
    return sorted(tuple(np.asarray(image.convert("RGB"))[0, 0]) for pack in ds["images"] for image in pack)


def test_a_missing_image_file_is_a_counted_drop_naming_the_file(tmp_path):
    _image_files(tmp_path / "imgs")
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": None, "path": str(tmp_path / "imgs" / name)}
                                         for name in ("red.jpg", "gone.jpg", "blue.jpg")], image),
                      "text": ["a red square", "a file that is gone", "a blue square"]})
    features = {"info": {"features": {"image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"}}}}
    (tmp_path / "data").mkdir()
    pq.write_table(table.replace_schema_metadata({b"huggingface": json.dumps(features).encode()}),
                   tmp_path / "data" / "train.parquet")
    stats = run_pack(str(tmp_path / "data"), str(tmp_path / "out"), PACK, ExecutorConfig(tasks=1))
    assert stats["read"] == 3 and stats["documents"] == 2 and stats["balanced"]
    assert stats["dropped"] == {"image_unreadable": 1}
    log = (tmp_path / "out" / ".datatrove" / "pack-packed_16" / "logs" / "task_00000.log").read_text()
    assert f"(image_unreadable): cannot read image file '{tmp_path / 'imgs' / 'gone.jpg'}'" in log
    ds = datasets.load_dataset(str(tmp_path / "out"), "packed_16", split="train", cache_dir=str(tmp_path / "c"))
    assert sorted(t for pack in ds["texts"] for t in pack) == ["a blue square", "a red square"]


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_image_paths_in_a_json_or_csv_set_are_read(tmp_path, monkeypatch, kind):
    _image_files(tmp_path / "data" / "imgs")
    rows = [{"image": str(tmp_path / "data" / "imgs" / "red.jpg"), "text": "absolute path"},
            {"image": "data/imgs/blue.jpg", "text": "relative path"},  # as datasets: from the working folder
            {"image": str(tmp_path / "data" / "imgs" / "gone.jpg"), "text": "a file that is gone"}]
    if kind == "jsonl":
        (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        (tmp_path / "data" / "train.csv").write_text("image,text\n" + "".join(f"{r['image']},{r['text']}\n"
                                                                               for r in rows))
    monkeypatch.chdir(tmp_path)
    stats = run_pack(str(tmp_path / "data"), str(tmp_path / "out"), PACK, ExecutorConfig(tasks=1))
    assert stats["read"] == 3 and stats["documents"] == 2 and stats["dropped"] == {"image_unreadable": 1}
    ds = datasets.load_dataset(str(tmp_path / "out"), "packed_16", split="train", cache_dir=str(tmp_path / "c"))
    assert sorted(t for pack in ds["texts"] for t in pack) == ["absolute path", "relative path"]
    expected = [Image.open(tmp_path / "data" / "imgs" / f"{c}.jpg").convert("RGB") for c in ("red", "blue")]
    assert _pixels(ds) == sorted(tuple(np.asarray(image)[0, 0]) for image in expected)


def test_an_image_column_of_another_type_fails_before_packing(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(json.dumps({"image": 3, "text": "a number"}) + "\n")
    with pytest.raises(ValueError, match=r"column 'image' of dataset .* is Value\('int64'\): expected an Image "
                                         r"feature, image file paths \(strings\) or encoded image bytes"):
        run_pack(str(tmp_path / "data"), str(tmp_path / "out"), PACK, ExecutorConfig(tasks=1))
    assert not (tmp_path / "out" / "packed_16").exists() or not os.listdir(tmp_path / "out" / "packed_16")


# 4. a --where type error is found before the settings are recorded


EXPRESSIONS = ["width and height > 10", "width", "not width", "-dfn", "dfn + 1 > 2", "dfn < 3", "top(dfn, 0.5)",
               "1", "(s > 0.1) > 0", "width > 10 and height > 10", "not dfn or s > 0.1", "top(s, 0.5)",
               "1 < s + width * 2 <= 3", "-s < 0 and True", "dfn"]


@pytest.mark.parametrize("source", EXPRESSIONS)
def test_type_check_agrees_with_evaluation(source):
    expression = Expression(source)
    columns = {"width": np.array([5.0, 20.0]), "height": np.array([30.0, np.nan]), "dfn": np.array([True, False]),
               "s": np.array([0.1, np.nan])}

    def outcome(check):
        try:
            check()
        except RuleError as error:
            return str(error)
        return "ok"

    evaluated = outcome(lambda: expression.evaluate(columns, 2, {"top(s, 0.5)": 0.1, "top(dfn, 0.5)": 0.1}))
    assert outcome(lambda: expression.check_types({"dfn"})) == evaluated


def test_a_where_type_error_is_refused_before_an_empty_shard_binds_it(tmp_path):
    shards = tmp_path / "shards"
    write_clean_shards(str(shards), 3, 3, seed=5, parquet=False)
    write_shard(str(shards / "00000.tar"), [])  # every download of this shard failed
    with pytest.raises(RuleError, match=r"selection rule 'width and height > 10' uses a number where a condition is "
                                        r"expected"):
        run_select(str(shards), str(tmp_path / "sel"), SelectionRules(where="width and height > 10"))
    assert not (tmp_path / "sel").exists()
    accounting = run_select(str(shards), str(tmp_path / "sel"), SelectionRules(where="width > 10 and height > 10"))
    assert accounting.read == 6 and accounting.balanced


# 5. reshard's card keeps the user's README


def test_reshard_card_keeps_the_users_metadata_and_prose(pool, tmp_path):
    root, rows = pool
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "README.md").write_text("---\nlicense: cc-by-4.0\nlanguage: [en]\n---\n\n# My corpus\n\n"
                                      "Provenance notes written by hand.\n")
    args = ["reshard", "--input", str(root / "shards"), "--selection", str(root / "all"), "--output", str(corpus),
            "--subset", "ccs"]
    assert cli_main(args) == 0
    first = (corpus / "README.md").read_text()
    card = DatasetCard(first)
    assert card.data.license == "cc-by-4.0" and card.data.language == ["en"]
    assert "# My corpus\n\nProvenance notes written by hand." in card.text
    assert card.text.count("# Open-Qwen2VL pretraining corpora") == 1
    assert [c["config_name"] for c in card.data.to_dict()["configs"]] == ["ccs"]
    write_dataset_card(str(corpus))
    assert (corpus / "README.md").read_text() == first  # regenerating adds nothing twice
    assert datasets.load_dataset(str(corpus), "ccs", split="train", cache_dir=str(tmp_path / "c")).num_rows == len(rows)


# 6. score column names


@pytest.mark.parametrize("column, message", [
    ("uid", "score column 'uid' is reserved"), ("key", "score column 'key' is reserved"),
    ("width", "score column 'width' is reserved"), ("clip score", "score column 'clip score' cannot be used in --where"),
    ("and", "score column 'and' cannot be used in --where"),
])
def test_score_column_names_are_checked_before_scoring(pool, tmp_path, capsys, column, message):
    root, _ = pool
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["score", "clip", "--input", str(root / "shards"), "--output", str(tmp_path / "o"),
                                   "--model", "m", "--column", column])
    assert exit_info.value.code == 2
    assert f"argument --column: {message}" in capsys.readouterr().err
    with pytest.raises(ValueError, match=message):  # the Python API too, before the model is loaded
        run_score(str(root / "shards"), str(tmp_path / "o"), ClipScorer(str(tmp_path / "no_model"), column=column))
    assert not (tmp_path / "o").exists()
