"""Release tooling: built repositories load in a fresh process; incomplete folders are refused with a reason."""

import io
import json
import shutil
import subprocess
import sys
import tarfile
import textwrap

import pytest
import torch
import yaml
from PIL import Image

from modeling_open_qwen2vl import OpenQwen2VLForConditionalGeneration
from recipes.release import (
    STAGING_MARKER,
    ReleaseError,
    build_dataset_repo,
    main,
    prepare_staging,
    training_section,
    upload,
)

LOAD_MODEL = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    folder = sys.argv[1]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    ids = processor(text="<s>hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        print(json.dumps(model(input_ids=ids).logits[0, -1, :20].tolist()))
    """
)

LOAD_DATASET = textwrap.dedent(
    """
    import json, sys
    from datasets import load_dataset
    ds = load_dataset(sys.argv[1], sys.argv[2], split="train")
    print(json.dumps({"rows": len(ds), "captions": sorted(ds["txt"]), "size": list(ds[0]["jpg"].size)}))
    """
)


@pytest.fixture()
def model_folder(tmp_path, tiny_config, processor):
    torch.manual_seed(3)
    model = OpenQwen2VLForConditionalGeneration(tiny_config).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model


def test_model_release_dry_run_builds_a_loadable_repo(tmp_path, model_folder, processor):
    folder, model = model_folder
    table = tmp_path / "eval.md"  # as recipes/eval.py writes it: the model named by its local path
    table.write_text(f"Evaluation of `{folder}` (prompt format `chat`, batch size 16). Scores are accuracy in percent."
                     "\n\n| benchmark | accuracy |\n|---|---|\n| easy_vqa | 0.81 |\n")
    staging = tmp_path / "staging"
    assert main(["model", str(folder), "--repo-id", "org/tiny-open-qwen2vl", "--staging", str(staging),
                 "--eval-table", str(table), "--dry-run"]) == 0
    card = (staging / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text")
    assert "| easy_vqa | 0.81 |" in card and 'from_pretrained("org/tiny-open-qwen2vl", trust_remote_code=True)' in card
    assert "Evaluation of `org/tiny-open-qwen2vl` (prompt format" in card and str(tmp_path) not in card
    for name in ("model.safetensors", "config.json", "modeling_open_qwen2vl.py", "processor_config.json",
                 "generation_config.json", "chat_template.jinja"):
        assert (staging / name).is_file(), name
    result = subprocess.run([sys.executable, "-c", LOAD_MODEL, str(staging)], capture_output=True, text=True,
                            check=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    ids = processor(text="<s>hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits[0, -1, :20].tolist()
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


def test_incomplete_model_folder_is_refused(tmp_path, model_folder, capsys):
    folder, _ = model_folder
    (folder / "modeling_open_qwen2vl.py").unlink()
    assert main(["model", str(folder), "--repo-id", "org/x", "--dry-run"]) == 2
    assert "missing: modeling_open_qwen2vl.py" in capsys.readouterr().err


def _listing(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes()) for p in folder.rglob("*") if p.is_file())


def test_staging_that_is_holds_or_lies_in_the_folder_is_refused_and_nothing_is_deleted(tmp_path, model_folder,
                                                                                        capsys):
    folder, _ = model_folder
    before = _listing(folder)
    for staging in (folder, tmp_path, folder / "release"):
        assert main(["model", str(folder), "--repo-id", "org/x", "--staging", str(staging), "--dry-run"]) == 2
        assert "is, contains or lies inside the released folder" in capsys.readouterr().err
        assert _listing(folder) == before
    assert not (folder / "release").exists()
    foreign = tmp_path / "someone-else"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["model", str(folder), "--repo-id", "org/x", "--staging", str(foreign), "--dry-run"]) == 2
    assert "exists, is not empty and was not made by this tool" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me" and _listing(folder) == before


def test_a_staging_folder_made_by_the_tool_is_emptied_and_reused(tmp_path):
    folder, staging = tmp_path / "corpus", tmp_path / "staging"
    folder.mkdir()
    prepare_staging(folder, staging)
    (staging / "old-shard.tar").write_text("from the previous release")
    prepare_staging(folder, staging)
    assert sorted(p.name for p in staging.iterdir()) == [STAGING_MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_staging(folder, empty)
    assert (empty / STAGING_MARKER).is_file()


def test_sft_output_with_training_args_bin_is_released_but_pickle_weights_are_refused(tmp_path, model_folder,
                                                                                       capsys):
    folder, _ = model_folder
    torch.save({"learning_rate": 2e-5}, folder / "training_args.bin")  # what TRL's SFTTrainer writes
    staging = tmp_path / "staging"
    assert main(["model", str(folder), "--repo-id", "org/x", "--staging", str(staging), "--dry-run"]) == 0
    assert (staging / "model.safetensors").is_file() and not (staging / "training_args.bin").exists()
    torch.save({}, folder / "pytorch_model.bin")
    assert main(["model", str(folder), "--repo-id", "org/x", "--staging", str(staging), "--dry-run"]) == 2
    assert "holds pickle weights (pytorch_model.bin)" in capsys.readouterr().err


def _training_section(card):
    return card.split("## Training\n\n", 1)[1].split("\n## ", 1)[0]


def test_card_training_section_comes_from_the_sft_training_args_and_notes_are_appended(tmp_path, model_folder):
    from trl import SFTConfig

    folder, _ = model_folder
    args = SFTConfig(output_dir=str(folder), max_steps=12, learning_rate=3e-5, per_device_train_batch_size=2,
                     gradient_accumulation_steps=4, seed=7, report_to="none", bf16=False, use_cpu=True)
    torch.save(args, folder / "training_args.bin")  # as Trainer.save_model writes it
    (folder / "training_log.jsonl").write_text("".join(
        json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in (5, 10, 12)))
    notes = tmp_path / "notes.md"
    notes.write_text("Fine-tuned on the easy-vqa questions.\n")
    staging = tmp_path / "staging"
    assert main(["model", str(folder), "--repo-id", "org/x", "--staging", str(staging), "--training-notes",
                 str(notes), "--dry-run"]) == 0
    section = _training_section((staging / "README.md").read_text())
    assert "- recipe: supervised fine-tuning with TRL's `SFTTrainer` (`recipes/sft.py`)\n" in section
    for fact in ("- length: 12 optimizer steps (12 steps logged)", "- learning rate: 3e-05 (linear schedule)",
                 "- batch: 2 per device x 4 gradient accumulation steps", "- seed: 7",
                 "- image tokens: 16 per image (`num_image_tokens`)"):
        assert fact + "\n" in section, (fact, section)
    assert section.rstrip().endswith("- image tokens: 16 per image (`num_image_tokens`)\n\n"
                                     "Fine-tuned on the easy-vqa questions.")

    (folder / "training_args.bin").write_bytes(b"not a pickle")  # unreadable: unknown, not a failed release
    config = json.loads((folder / "config.json").read_text())
    assert "- hyperparameters: unknown (`training_args.bin` could not be read: UnpicklingError)" in \
        training_section(folder, config)


def test_card_training_section_of_a_pretraining_final_model(tmp_path, tiny_config, processor):
    from recipes.training.arguments import config_as_dict, parse_pretrain_args
    from recipes.training.run_logs import METRICS_FILE
    from recipes.training.trainer import FINAL_MODEL, RESOLVED_CONFIG

    run = tmp_path / "runs" / "pretrain"
    folder = run / FINAL_MODEL  # as recipes/pretrain.py leaves it: the config and metrics one level up
    OpenQwen2VLForConditionalGeneration(tiny_config).save_pretrained(folder)
    processor.save_pretrained(folder)
    corpus = tmp_path / "data" / "packed-corpus"
    corpus.mkdir(parents=True)
    config = parse_pretrain_args(["--config", "recipes/configs/pretrain_tiny.yaml", "--dataset_name_or_path",
                                  str(corpus), "--dataset_config_name", "packed_16", "--output_dir", str(run),
                                  "--max_steps", "7", "--learning_rate", "0.003", "--gradient_accumulation_steps",
                                  "2", "--seed", "5"])
    (run / RESOLVED_CONFIG).write_text(yaml.safe_dump(config_as_dict(config), sort_keys=False))
    (run / METRICS_FILE).write_text("".join(json.dumps({"step": s, "loss": 2.0}) + "\n" for s in range(1, 8)))
    staging = tmp_path / "staging"
    assert main(["model", str(folder), "--repo-id", "org/x", "--staging", str(staging), "--dry-run"]) == 0
    section = _training_section((staging / "README.md").read_text())
    assert section.splitlines() == [
        "- recipe: pretraining (`recipes/pretrain.py`), stage `pretrain`",
        "- data: a local folder named `packed-corpus`, config `packed_16`",  # not the machine's path
        "- length: 7 optimizer steps (7 steps logged)",
        "- learning rate: 0.003 (cosine schedule)",
        "- batch: 1 per device x 2 gradient accumulation steps",
        "- seed: 5",
        "- image tokens: 16 per image (`num_image_tokens`)",
    ]

    card_config = json.loads((folder / "config.json").read_text())
    (run / RESOLVED_CONFIG).write_text("stage: [unclosed")
    assert "- hyperparameters: unknown (`pretrain_config.yaml` could not be read: ParserError)" in \
        training_section(folder, card_config)
    (run / RESOLVED_CONFIG).unlink()
    assert training_section(folder, card_config, "Paper recipe.").splitlines() == [
        "- recipe: unknown (no `training_args.bin` of an SFT run in the folder and no `pretrain_config.yaml` of a "
        "pretraining run beside it)",
        "- image tokens: 16 per image (`num_image_tokens`)", "", "Paper recipe."]


def test_model_whose_weights_do_not_load_is_refused(tmp_path, model_folder, capsys):
    folder, _ = model_folder
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["hidden_size"] = 128
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["model", str(folder), "--repo-id", "org/x", "--staging", str(tmp_path / "s1"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "does not load with AutoModelForImageTextToText: the weights do not match config.json: mismatched_keys" \
        in err and "torch.Size([151936, 128])" in err
    config["text_config"]["hidden_size"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["model", str(folder), "--repo-id", "org/x", "--staging", str(tmp_path / "s2"), "--dry-run"]) == 2
    assert "does not load with AutoModelForImageTextToText: safetensors" in capsys.readouterr().err


def test_training_notes_with_a_local_path_are_refused(tmp_path, model_folder, capsys):
    folder, _ = model_folder
    notes = tmp_path / "notes.md"
    notes.write_text(f"Fine-tuned from `{folder.parent}/pretrain/final_model` for one epoch.\n")
    assert main(["model", str(folder), "--repo-id", "org/x", "--staging", str(tmp_path / "s"),
                 "--training-notes", str(notes), "--dry-run"]) == 2
    assert f"README.md contains the local path {folder.parent}" in capsys.readouterr().err


def _write_shard(path, captions):
    with tarfile.open(path, "w") as tar:
        for i, caption in enumerate(captions):
            buf = io.BytesIO()
            Image.new("RGB", (12, 10), (i * 40, 0, 0)).save(buf, format="JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()),
                              ("json", json.dumps({"uid": f"{i:032x}", "caption": caption}).encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _corpus(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "ccs").mkdir(parents=True)
    _write_shard(folder / "ccs" / "00000.tar", ["a red circle", "a blue square"])
    _write_shard(folder / "ccs" / "00001.tar", ["a green triangle"])
    stage = folder / "ccs" / ".datatrove" / "reshard"  # as the reshard stage leaves it (dataset_builders.pipelines)
    (stage / "stats").mkdir(parents=True)
    (stage / "accounting.json").write_text(json.dumps({"read": 4, "kept": 3, "dropped": 1}))
    (stage / "stats.json").write_text(json.dumps([{"name": "reshard", "time_stats": {"total": 0.1}}]))
    (stage / "stats" / "00000.json").write_text(json.dumps([{"name": "reshard", "stats": {"read": 4}}]))
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: ccs\n  data_files:\n  - split: train\n    path: ccs/*.tar\n---\n# corpus\n")
    return folder


def test_dataset_release_dry_run_loads_with_load_dataset(tmp_path):
    folder = _corpus(tmp_path)
    staging = tmp_path / "ds-staging"
    assert main(["dataset", str(folder), "--repo-id", "org/corpus", "--staging", str(staging), "--dry-run"]) == 0
    assert (staging / "ccs" / ".datatrove" / "reshard" / "accounting.json").is_file()
    assert (staging / "ccs" / "00001.tar").is_file() and not (staging / "ccs" / ".datatrove" / "reshard" /
                                                              "stats.json").exists()
    result = subprocess.run([sys.executable, "-c", LOAD_DATASET, str(staging), "ccs"], capture_output=True,
                            text=True, check=True,
                            env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                 "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")})
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == {"rows": 3, "captions": ["a blue square", "a green triangle", "a red circle"], "size": [12, 10]}


def test_dataset_release_stages_the_data_stages_outputs_but_not_their_logs(tmp_path):
    from dataset_builders.cards import write_dataset_card
    from dataset_builders.pipelines import ExecutorConfig, run_reshard, run_select
    from dataset_builders.rules import TextRules
    from dataset_builders.selection import SelectionRules
    from dataset_builders.synthetic import write_clean_shards

    (tmp_path / "shards").mkdir()
    write_clean_shards(str(tmp_path / "shards"), 2, 3, seed=1)
    single = ExecutorConfig(tasks=1, workers=1)
    run_select(str(tmp_path / "shards"), str(tmp_path / "sel"), SelectionRules(text=TextRules(min_words=4)), single)
    folder = tmp_path / "corpus"
    accounting = run_reshard(str(tmp_path / "shards"), str(tmp_path / "sel"), str(folder / "ccs_webdataset"), single,
                             shard_size=2)
    write_dataset_card(str(folder))
    (folder / "ccs_webdataset" / "packing_stats.json").write_text(json.dumps({"packs": 0}))
    stage = folder / "ccs_webdataset" / ".datatrove" / "reshard"
    assert (stage / "stats.json").is_file() and (stage / "plan.parquet").is_file()  # logs the release leaves out
    staging = build_dataset_repo(folder, tmp_path / "staging")
    staged = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file() and p.name != STAGING_MARKER)
    shards = sorted(p.stem for p in (folder / "ccs_webdataset").glob("*.tar"))
    assert len(shards) > 1 and accounting.kept > 0
    assert staged == sorted(["README.md", "ccs_webdataset/.datatrove/reshard/accounting.json",
                             "ccs_webdataset/packing_stats.json"]
                            + [f"ccs_webdataset/{stem}.{ext}" for stem in shards for ext in ("tar", "parquet")])
    record = json.loads((staging / "ccs_webdataset/.datatrove/reshard/accounting.json").read_text())
    assert record["read"] == record["kept"] + record["dropped"] == accounting.read


def test_dataset_card_whose_config_matches_no_file_is_refused(tmp_path):
    folder = _corpus(tmp_path)
    card = folder / "README.md"
    card.write_text(card.read_text().replace("ccs/*.tar", "missing/*.tar"))
    with pytest.raises(ReleaseError, match=r"config 'ccs': pattern 'missing/\*.tar' matches no file"):
        build_dataset_repo(folder, tmp_path / "s")


def _with_counts(folder, num_examples, parquets=True):
    """Metadata parquets per shard (as reshard writes them) and a card recording ``num_examples``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if parquets:
        for tar in sorted((folder / "ccs").glob("*.tar")):
            with tarfile.open(tar) as handle:
                keys = sorted({m.name.split(".")[0] for m in handle.getmembers()})
            pq.write_table(pa.table({"key": keys}), tar.with_suffix(".parquet"))
    card = folder / "README.md"
    card.write_text(card.read_text().replace(
        "---\n# corpus", f"dataset_info:\n- config_name: ccs\n  splits:\n  - name: train\n"
                          f"    num_examples: {num_examples}\n---\n# corpus"))


def test_dataset_card_whose_counts_do_not_match_the_shards_is_refused(tmp_path):
    folder = _corpus(tmp_path)
    _with_counts(folder, 3)
    build_dataset_repo(folder, tmp_path / "ok")
    (folder / "ccs" / "00001.tar").unlink()  # its metadata parquet stays, as in a half-deleted corpus
    with pytest.raises(ReleaseError, match=r"config 'ccs' split 'train': the card records 3 examples but the files "
                                           r"hold 2"):
        build_dataset_repo(folder, tmp_path / "s")


def test_dataset_counts_without_metadata_parquets_are_checked_by_loading(tmp_path):
    folder = _corpus(tmp_path)
    _with_counts(folder, 3, parquets=False)
    build_dataset_repo(folder, tmp_path / "ok")
    card = folder / "README.md"
    card.write_text(card.read_text().replace("num_examples: 3", "num_examples: 4"))
    with pytest.raises(ReleaseError, match=r"config 'ccs' split 'train' does not load: NonMatchingSplitsSizesError"):
        build_dataset_repo(folder, tmp_path / "s")


def test_dataset_statistics_with_a_local_path_are_refused(tmp_path):
    folder = _corpus(tmp_path)
    (folder / "ccs" / "packing_stats.json").write_text(json.dumps({"input": str(folder / "ccs"), "packs": 2}))
    with pytest.raises(ReleaseError, match=f"ccs/packing_stats.json contains the local path {folder}"):
        build_dataset_repo(folder, tmp_path / "s")


def _fake_hub(monkeypatch, hub):
    """HfApi whose repository is the local folder ``hub``: upload_folder's own deletion and addition logic runs, the
    commit is applied to ``hub``."""
    import huggingface_hub
    import huggingface_hub.constants as constants
    import huggingface_hub.hf_api as hf_api

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            if isinstance(op, huggingface_hub.CommitOperationDelete):
                (hub / op.path_in_repo).unlink()
            else:
                (hub / op.path_in_repo).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(op.path_or_fileobj, hub / op.path_in_repo)
        return type("Info", (), {"commit_url": "https://hf.co/fake/commit"})()

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    monkeypatch.setattr(hf_api, "is_xet_available", lambda: False)
    monkeypatch.setattr(hf_api.HfApi, "create_repo", lambda self, *a, **k: None)
    monkeypatch.setattr(hf_api.HfApi, "_validate_yaml", lambda self, *a, **k: None)
    monkeypatch.setattr(hf_api.HfApi, "list_repo_files", lambda self, *a, **k: sorted(
        str(p.relative_to(hub)) for p in hub.rglob("*") if p.is_file()))
    monkeypatch.setattr(hf_api.HfApi, "create_commit", create_commit)


def test_re_release_deletes_files_of_the_earlier_release(tmp_path, monkeypatch, tiny_config, processor):
    hub = tmp_path / "hub"
    torch.manual_seed(1)
    OpenQwen2VLForConditionalGeneration(tiny_config).save_pretrained(hub)  # release 1: one model.safetensors
    processor.save_pretrained(hub)
    (hub / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (hub / "notes" / "extra.bin").parent.mkdir()
    (hub / "notes" / "extra.bin").write_bytes(b"uploaded by hand")
    torch.manual_seed(2)
    second = OpenQwen2VLForConditionalGeneration(tiny_config).eval()
    staging = tmp_path / "staging"
    prepare_staging(tmp_path / "model", staging)
    second.save_pretrained(staging, max_shard_size="10MB")  # release 2: sharded
    processor.save_pretrained(staging)
    _fake_hub(monkeypatch, hub)
    assert upload(staging, "org/x", "model", private=False) == "https://hf.co/fake/commit"
    files = sorted(str(p.relative_to(hub)) for p in hub.rglob("*") if p.is_file())
    staged = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file() and p.name != STAGING_MARKER)
    assert files == sorted(staged + [".gitattributes", "notes/extra.bin"]) and "model.safetensors" not in files
    loaded = OpenQwen2VLForConditionalGeneration.from_pretrained(hub).eval()
    for key, value in second.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    corpus_hub = tmp_path / "corpus_hub"  # a dataset: a shard gone from the corpus goes from the repo too
    shutil.copytree(_corpus(tmp_path), corpus_hub)
    (tmp_path / "corpus" / "ccs" / "00001.tar").unlink()
    (tmp_path / "corpus" / "ccs" / ".datatrove" / "reshard" / "accounting.json").unlink()
    _fake_hub(monkeypatch, corpus_hub)
    upload(build_dataset_repo(tmp_path / "corpus", tmp_path / "ds-staging"), "org/c", "dataset", private=False)
    assert sorted(str(p.relative_to(corpus_hub)) for p in corpus_hub.rglob("*") if p.is_file()) == [
        "README.md", "ccs/00000.tar"]


def test_upload_refuses_offline_or_without_token(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ReleaseError, match="HF_HUB_OFFLINE is set"):
        upload(tmp_path, "org/x", "model", private=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(ReleaseError, match="no Hugging Face token found"):
        upload(tmp_path, "org/x", "model", private=False)
