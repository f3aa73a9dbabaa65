"""Offline packer: corpus -> packed parquet + card + stats, read back by load_dataset (also in a fresh process)."""

import io
import json
import random
import subprocess
import sys
import textwrap

import datasets
import numpy as np
import pytest
import webdataset
from PIL import Image

from dataset_builders.cli import main as cli_main
from dataset_builders.commands.pack import PackSettings, run_pack
from dataset_builders.packed_collator import PackedCollator
from dataset_builders.pipelines import ExecutorConfig
from test_packing import linear_scan_ffd

NUM_IMAGE_TOKENS = 16
CAPACITY = 256


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def source(tmp_path_factory, easy_vqa_images):
    """An image-caption parquet set with one bad sample of each kind."""
    import easy_vqa

    questions, answers, _ = easy_vqa.get_train_questions()
    rows = [{"image": _png(easy_vqa_images[i % 4]), "text": f"{questions[i]} {answers[i]}", "uid": f"u{i:03d}"}
            for i in range(120)]
    rows[3]["text"] = ""                             # zero-length caption
    rows[5]["text"] = "a caption with <|image_pad|>"  # text that would add image placeholders
    rows[7]["image"] = None                          # caption without an image
    rows[9]["text"] = "long " * 400                  # longer than the capacity
    folder = tmp_path_factory.mktemp("source")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "uid": datasets.Value("string")})
    table = datasets.Dataset.from_list(
        [dict(r, image=None if r["image"] is None else {"bytes": r["image"], "path": None}) for r in rows],
        features=features)
    table.to_parquet(str(folder / "train.parquet"))
    return folder, rows


@pytest.fixture(scope="module")
def packed(source, tmp_path_factory):
    folder, rows = source
    output = tmp_path_factory.mktemp("corpus")
    settings = PackSettings(num_image_tokens=NUM_IMAGE_TOKENS, capacity=CAPACITY, buffer_size=50, uid_column="uid")
    stats = run_pack(str(folder), str(output), settings, ExecutorConfig(tasks=1))
    return output, rows, stats


@pytest.mark.slow
def test_corpus_loads_in_a_fresh_process(packed):
    output, rows, _ = packed
    script = textwrap.dedent(f"""
        import json, datasets
        ds = datasets.load_dataset({str(output)!r}, "packed_16", split="train")
        stream = datasets.load_dataset({str(output)!r}, "packed_16", split="train", streaming=True)
        first = next(iter(stream))
        print(json.dumps({{"rows": ds.num_rows, "uids": [u for r in ds["uids"] for u in r],
                          "image_type": type(ds[0]["images"][0]).__name__,
                          "stream_first": first["uids"], "size": list(first["images"][0].size)}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    kept = {r["uid"] for i, r in enumerate(rows) if i not in (3, 5, 7, 9)}
    assert sorted(loaded["uids"]) == sorted(kept)  # every good sample exactly once
    assert loaded["image_type"].endswith("ImageFile") or loaded["image_type"] == "Image"
    assert loaded["size"] == [64, 64]
    assert loaded["stream_first"]


def test_rows_rebuild_the_documents(packed, processor):
    output, rows, _ = packed
    ds = datasets.load_dataset(str(output), "packed_16", split="train")
    by_uid = {r["uid"]: r for r in rows}
    collator = PackedCollator(processor, max_length=CAPACITY)
    for pack in ds:
        assert len(pack["images"]) == len(pack["texts"]) == len(pack["lengths"]) == len(pack["uids"])
        assert sum(pack["lengths"]) <= CAPACITY
        assert pack["lengths"] == [len(d) for d in collator.document_ids(pack["texts"])]
        for uid, text, image in zip(pack["uids"], pack["texts"], pack["images"]):
            assert text == by_uid[uid]["text"]
            original = np.asarray(Image.open(io.BytesIO(by_uid[uid]["image"])).convert("RGB"))
            assert np.array_equal(np.asarray(image.convert("RGB")), original)
    batch = collator([ds[0], ds[1]])
    assert batch["input_ids"].shape[0] == 2


def test_statistics_match_the_corpus(packed, source):
    output, rows, stats = packed
    ds = datasets.load_dataset(str(output), "packed_16", split="train")
    on_disk = json.loads((output / "packed_16" / "packing_stats.json").read_text())
    assert on_disk == stats
    assert on_disk["input"] == source[0].name  # published with the corpus: no path of this machine
    positions = sum(sum(p) for p in ds["lengths"])
    assert stats["packs"] == ds.num_rows
    assert stats["positions"] == positions
    assert stats["fill"] == pytest.approx(positions / (ds.num_rows * CAPACITY))
    assert stats["documents"] == sum(len(t) for t in ds["texts"]) == 116
    assert stats["documents_per_pack"]["max"] == max(len(t) for t in ds["texts"])
    assert stats["images_per_pack"]["mean"] == pytest.approx(116 / ds.num_rows)
    assert stats["read"] == 120 and stats["balanced"]
    assert stats["dropped"] == {"caption_has_image_token": 1, "empty_caption": 1, "missing_image": 1, "too_long": 1}
    card = (output / "README.md").read_text()
    assert "config_name: packed_16" in card and "packed_16/*.parquet" in card


def test_statistics_of_a_single_pack_corpus(source, tmp_path):
    folder, rows = source
    settings = PackSettings(num_image_tokens=NUM_IMAGE_TOKENS, capacity=16384, buffer_size=200, uid_column="uid",
                            config_name="one_pack")
    stats = run_pack(str(folder), str(tmp_path), settings, ExecutorConfig(tasks=1))
    ds = datasets.load_dataset(str(tmp_path), "one_pack", split="train")
    assert ds.num_rows == 1 and stats["packs"] == 1  # the compact stats form of one value had no count
    assert stats["positions"] == sum(ds[0]["lengths"])
    assert stats["fill"] == pytest.approx(stats["positions"] / 16384)
    assert stats["positions_per_pack"]["n"] == 1 and stats["positions_per_pack"]["max"] == stats["positions"]


def test_ffd_algorithm_gives_the_papers_packs(source, tmp_path, processor):
    folder, rows = source
    settings = PackSettings(num_image_tokens=NUM_IMAGE_TOKENS, capacity=CAPACITY, buffer_size=1000,
                            uid_column="uid", algorithm="ffd", config_name="ffd_16")
    run_pack(str(folder), str(tmp_path), settings, ExecutorConfig(tasks=1))
    ds = datasets.load_dataset(str(tmp_path), "ffd_16", split="train")
    good = [r for i, r in enumerate(rows) if i not in (3, 5, 7, 9)]
    collator = PackedCollator(processor, max_length=CAPACITY)
    lengths = [len(d) for d in collator.document_ids([r["text"] for r in good])]
    expected = [[good[i]["uid"] for i in bin_] for bin_ in linear_scan_ffd(lengths, CAPACITY)]
    assert ds["uids"] == expected


@pytest.mark.slow
def test_webdataset_shards_through_the_cli(tmp_path, easy_vqa_images):
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        with webdataset.TarWriter(str(shards / f"{s:05d}.tar")) as sink:
            for i in range(10):
                uid = f"{s * 10 + i:032x}"
                caption = f"shape number {s * 10 + i}" if i != 4 else ""
                sink.write({"__key__": f"{s:05d}{i:04d}", "png": _png(easy_vqa_images[i % 4]),
                            "txt": caption, "json": {"uid": uid, "caption": caption, "url": ""}})
    output = tmp_path / "out"
    args = ["pack", "--input", str(shards), "--output", str(output), "--num-image-tokens", "16",
            "--capacity", "256", "--buffer-size", "8"]
    assert cli_main(args) == 0
    stats = json.loads((output / "packed_16" / "packing_stats.json").read_text())
    assert stats["tasks"] == 2 and stats["read"] == 20 and stats["documents"] == 18
    assert stats["dropped"] == {"empty_caption": 2}
    ds = datasets.load_dataset(str(output), "packed_16", split="train", streaming=True)
    uids = sorted(u for row in ds for u in row["uids"])
    assert uids == sorted(f"{n:032x}" for n in range(20) if n % 10 != 4)
    assert len(list((output / "packed_16").glob("*.parquet"))) == 2
    # A rerun with the same settings skips the completed tasks; other settings in the same place are refused.
    before = {p.name: p.stat().st_mtime_ns for p in (output / "packed_16").glob("*.parquet")}
    assert cli_main(args) == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in (output / "packed_16").glob("*.parquet")}
    with pytest.raises(ValueError, match="packed with other settings"):
        cli_main(args[:-1] + ["16"])


def test_card_split_sizes_are_read_by_datasets_without_warnings(packed, tmp_path):
    import os

    import pyarrow.parquet as pq
    from test_data_select_reshard import card_splits_as_datasets_reads_them

    output, _, _ = packed
    splits, warnings = card_splits_as_datasets_reads_them(output, "packed_16", tmp_path)
    assert warnings == []
    files = list((output / "packed_16").glob("*.parquet"))
    assert splits["train"].num_examples == sum(pq.ParquetFile(f).metadata.num_rows for f in files) > 0
    assert splits["train"].num_bytes == sum(os.path.getsize(f) for f in files)


def test_card_keeps_other_configs(packed, tmp_path):
    from dataset_builders.commands.pack import write_card

    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n- config_name: ccs\n  data_files:\n  - split: train\n    path: ccs_webdataset/*.tar\n---\n\n"
        "# Existing card\n")
    write_card(str(tmp_path), "packed_144")
    write_card(str(tmp_path), "packed_144")  # idempotent
    from huggingface_hub import DatasetCard

    card = (tmp_path / "README.md").read_text()
    data = DatasetCard(card).data.to_dict()
    assert [c["config_name"] for c in data["configs"]] == ["ccs", "packed_144"]
    assert [i["config_name"] for i in data["dataset_info"]] == ["packed_144"]  # its count and content fingerprint
    assert "# Existing card" in card and card.count("# Packed Open-Qwen2VL") == 1


def _shards(folder, per_shard, seed, extra=()):
    """One img2dataset-style shard of ``per_shard`` clean samples (+ ``extra`` members); returns the clean uids."""
    from dataset_builders.synthetic import write_clean_shards, write_shard

    rows = write_clean_shards(str(folder), 1, per_shard, seed=seed, parquet=False)
    if extra:
        import tarfile

        with tarfile.open(folder / "00000.tar") as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        write_shard(str(folder / "00000.tar"), members + list(extra))
    return [r["uid"] for r in rows]


def test_repacking_into_the_same_path_loads_the_new_rows(tmp_path):
    """datasets caches a local folder under its name and card: the card's content fingerprint changes with the
    files (here 3 then 9 samples, one pack each: the same row count)."""
    import shutil

    cache = str(tmp_path / "hf_cache")
    for per_shard, seed in ((3, 1), (9, 2)):
        shutil.rmtree(tmp_path / "in", ignore_errors=True)
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        uids = _shards(tmp_path / "in", per_shard, seed)
        stats = run_pack(str(tmp_path / "in"), str(tmp_path / "out"), PackSettings(), ExecutorConfig(tasks=1))
        ds = datasets.load_dataset(str(tmp_path / "out"), "packed_144", split="train", cache_dir=cache)
        assert stats["packs"] == ds.num_rows == 1
        assert sorted(u for row in ds["uids"] for u in row) == sorted(uids)  # packing reorders


def test_undecodable_images_are_dropped_not_packed(tmp_path):
    from dataset_builders.synthetic import encode, sample_members, shape_image
    from test_data_select_reshard import corrupt_scan_jpeg

    good = encode(shape_image(random.Random(0), 40, 40))
    extra = (sample_members("bad_random", bytes(range(256)) * 2, "random bytes", {"uid": "b" * 32, "url": "u"})
             + sample_members("bad_trunc", good[: len(good) // 2], "a truncated jpeg", {"uid": "c" * 32, "url": "u"})
             + sample_members("bad_scan", corrupt_scan_jpeg(), "corrupt scan data", {"uid": "d" * 32, "url": "u"})
             + sample_members("zero_bytes", b"", "a zero-byte image", {"uid": "e" * 32, "url": "u"}))
    uids = _shards(tmp_path / "in", 5, 3, extra)
    stats = run_pack(str(tmp_path / "in"), str(tmp_path / "out"), PackSettings(), ExecutorConfig(tasks=1))
    assert stats["read"] == 9 and stats["documents"] == 5 and stats["balanced"]
    # the reasons the other stages give the same samples (a zero-byte image is image_empty, not missing_image)
    assert stats["dropped"] == {"image_truncated": 1, "image_undecodable": 2, "image_empty": 1}
    ds = datasets.load_dataset(str(tmp_path / "out"), "packed_144", split="train", cache_dir=str(tmp_path / "c"))
    for row in ds:  # decodes every image (an undecodable one raised here)
        for image in row["images"]:
            image.load()
    assert sorted(u for row in ds["uids"] for u in row) == sorted(uids)


def test_a_zero_byte_image_of_a_dataset_is_image_empty(tmp_path, easy_vqa_images):
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    (tmp_path / "in").mkdir()
    datasets.Dataset.from_list([{"image": {"bytes": _png(easy_vqa_images[0]), "path": None}, "text": "a shape"},
                                {"image": {"bytes": b"", "path": None}, "text": "a zero-byte image"}],
                               features=features).to_parquet(str(tmp_path / "in" / "train.parquet"))
    settings = PackSettings(num_image_tokens=NUM_IMAGE_TOKENS, capacity=CAPACITY)
    stats = run_pack(str(tmp_path / "in"), str(tmp_path / "out"), settings, ExecutorConfig(tasks=1))
    assert stats["read"] == 2 and stats["documents"] == 1 and stats["dropped"] == {"image_empty": 1}
    # a misspelt uid column is refused as the image and text columns are (the uids would be local file paths)
    with pytest.raises(ValueError, match=r"has no column\(s\) \['sample_id'\]; columns: \['image', 'text'\]"):
        run_pack(str(tmp_path / "in"), str(tmp_path / "out2"), PackSettings(num_image_tokens=NUM_IMAGE_TOKENS,
                 capacity=CAPACITY, uid_column="sample_id"), ExecutorConfig(tasks=1))


def test_a_pack_whose_tasks_all_failed_does_not_lock_its_output(tmp_path):
    _shards(tmp_path / "in", 4, 5)
    with pytest.raises(OSError, match="no_tokenizer"):  # a mistyped --tokenizer: the task fails, nothing packed
        run_pack(str(tmp_path / "in"), str(tmp_path / "out"), PackSettings(tokenizer=str(tmp_path / "no_tokenizer")),
                 ExecutorConfig(tasks=1))
    assert (tmp_path / "out" / ".datatrove" / "pack-packed_144" / "settings.json").exists()
    stats = run_pack(str(tmp_path / "in"), str(tmp_path / "out"), PackSettings(), ExecutorConfig(tasks=1))
    assert stats["documents"] == 4 and stats["tokenizer"] is None
    with pytest.raises(ValueError, match="packed with other settings"):  # a completed task binds them
        run_pack(str(tmp_path / "in"), str(tmp_path / "out"), PackSettings(buffer_size=8), ExecutorConfig(tasks=1))


@pytest.mark.parametrize("option, value, message", [
    ("--num-image-tokens", "-1", "--num-image-tokens -1 is not a positive perfect square"),
    ("--num-image-tokens", "0", "--num-image-tokens 0 is not a positive perfect square"),
    ("--num-image-tokens", "150", "--num-image-tokens 150 is not a positive perfect square"),
    ("--capacity", "16", "--capacity 16 cannot hold one document of 16 image tokens"),
    ("--buffer-size", "0", "--buffer-size must be >= 1, got 0"),
])
def test_sizes_no_model_can_use_are_refused_before_anything_is_written(tmp_path, option, value, message):
    # -1 used to pack with negative image positions (lengths shorter than the sequences), 150 a corpus the model
    # and the training arguments refuse, --capacity 16 dropped every sample as too_long, --buffer-size 0 failed
    # inside the task after its settings were recorded
    _shards(tmp_path / "shards", 3, seed=0)
    args = ["pack", "--input", str(tmp_path / "shards"), "--output", str(tmp_path / "out"),
            "--num-image-tokens", "16", "--capacity", "256", "--buffer-size", "8"]
    args[args.index(option) + 1] = value
    with pytest.raises(ValueError, match=message):
        cli_main(args)
    assert not (tmp_path / "out").exists()


def test_the_pack_summary_reports_corrupt_shards_and_drops(tmp_path, capsys):
    # the summary line left out the events: a shard lost to damage showed only in the task logs
    uids = _shards(tmp_path / "in", 4, seed=3)
    (tmp_path / "in" / "00001.tar").write_bytes(b"")  # e.g. a copy that never started
    args = ["pack", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--num-image-tokens", "16",
            "--capacity", "256"]
    assert cli_main(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    packed = datasets.load_dataset(str(tmp_path / "out"), "packed_16", split="train")
    documents = sum(len(row) for row in packed["uids"])
    assert sorted(u for row in packed["uids"] for u in row) == sorted(uids)
    assert line.startswith(f"pack: {packed.num_rows} packs of {documents} documents, fill ")
    assert line.endswith(f"read {len(uids)} = kept {documents} + dropped 0 (none); events: corrupt_shards=1")
