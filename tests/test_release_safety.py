"""Release tool refusals for folders that would publish a broken or misleading repository (a stale mix of weight
files, a processor that does not match the model) and the converter's or the user's own model card kept in the
released card.

Fixtures are built here (save_pretrained, files copied by hand), not with the converter."""

import json
import shutil

import pytest
import torch
import yaml

import recipes.release.model_repo as model_repo
from modeling_open_qwen2vl import OpenQwen2VLForConditionalGeneration
from modeling_open_qwen2vl.model_card import model_card as converter_model_card
from recipes.release import STAGING_MARKER, main
from recipes.release.card_edits import card_section

SHARD_SIZE = "20MB"  # the tiny model (~40 MB, mostly the Qwen embedding) in a few shards


@pytest.fixture(scope="module")
def saved(tmp_path_factory, processor):
    """A tiny model saved as one file and the same weights saved in shards, each with its processor."""
    from modeling_open_qwen2vl import OpenQwen2VLConfig

    torch.manual_seed(5)
    model = OpenQwen2VLForConditionalGeneration(OpenQwen2VLConfig.tiny()).eval()
    root = tmp_path_factory.mktemp("saved")
    for name, shard_size in (("single", None), ("sharded", SHARD_SIZE)):
        model.save_pretrained(root / name, **({"max_shard_size": shard_size} if shard_size else {}))
        processor.save_pretrained(root / name)
    assert len(list((root / "sharded").glob("model-*.safetensors"))) >= 2
    return root


def _copy(saved, name, tmp_path):
    folder = tmp_path / name
    shutil.copytree(saved / name, folder)
    return folder


def _release(folder, tmp_path, capsys, *args):
    """(exit code, stderr, staging folder) of a dry run."""
    staging = tmp_path / "staging"
    code = main(["model", str(folder), "--repo-id", "org/x", "--staging", str(staging), "--dry-run", *args])
    return code, capsys.readouterr().err, staging


def _shards(folder):
    return sorted(p.name for p in folder.glob("model-*.safetensors"))


def test_single_weights_file_beside_a_sharded_index_is_refused(saved, tmp_path, capsys):
    folder = _copy(saved, "single", tmp_path)  # an earlier single-file save, then a sharded one into the same folder
    for path in (saved / "sharded").glob("model*"):
        shutil.copy2(path, folder / path.name)
    code, err, staging = _release(folder, tmp_path, capsys)
    assert code == 2 and "holds both model.safetensors and the sharded weights of model.safetensors.index.json" in err
    assert not staging.exists()


def test_a_sharded_folder_is_released_with_its_index_and_exactly_its_shards(saved, tmp_path, capsys):
    folder = _copy(saved, "sharded", tmp_path)
    code, err, staging = _release(folder, tmp_path, capsys)
    assert code == 0, err
    assert sorted(p.name for p in staging.glob("*.safetensors*")) == \
        sorted(_shards(folder) + ["model.safetensors.index.json"])


def test_shard_the_index_does_not_list_is_refused(saved, tmp_path, capsys):
    folder = _copy(saved, "sharded", tmp_path)
    shutil.copy2(folder / _shards(folder)[0], folder / "model-00001-of-00009.safetensors")  # from another save
    code, err, staging = _release(folder, tmp_path, capsys)
    assert code == 2 and "does not match its shards: present but not listed: model-00001-of-00009.safetensors" in err
    assert not staging.exists()


def test_listed_shard_that_is_missing_is_refused(saved, tmp_path, capsys):
    folder = _copy(saved, "sharded", tmp_path)
    gone = _shards(folder)[-1]
    (folder / gone).unlink()
    code, err, staging = _release(folder, tmp_path, capsys)
    assert code == 2 and f"does not match its shards: listed but missing: {gone}" in err
    assert not staging.exists()


def test_index_that_places_tensors_in_the_wrong_shard_is_refused(saved, tmp_path, capsys):
    folder = _copy(saved, "sharded", tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    counts = {shard: list(index["weight_map"].values()).count(shard) for shard in _shards(folder)}
    fuller = max(counts, key=counts.get)  # moving one of its tensors still leaves it listed
    other = next(shard for shard in counts if shard != fuller)
    key = next(k for k, shard in index["weight_map"].items() if shard == fuller)
    index["weight_map"][key] = other  # an index of another save over same-named shards
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    code, err, staging = _release(folder, tmp_path, capsys)
    assert code == 2 and f"places 1 tensors in {other} that it does not hold (e.g. {key})" in err
    assert not staging.exists()


def test_shards_without_an_index_beside_the_single_file_are_refused(saved, tmp_path, capsys):
    folder = _copy(saved, "single", tmp_path)
    stray = _shards(saved / "sharded")[0]
    shutil.copy2(saved / "sharded" / stray, folder / stray)
    code, err, staging = _release(folder, tmp_path, capsys)
    assert code == 2 and f"holds {stray}, model.safetensors without model.safetensors.index.json" in err
    assert not staging.exists()


def _edit_json(path, edit):
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def test_processor_image_tokens_that_differ_from_the_config_are_refused(saved, tmp_path, capsys):
    folder = _copy(saved, "single", tmp_path)  # num_image_tokens edited in config.json only (16 -> 4)
    _edit_json(folder / "config.json", lambda config: config.update(num_image_tokens=4))
    code, err, staging = _release(folder, tmp_path, capsys)
    assert code == 2 and "num_image_tokens is 4 in config.json but 16 in processor_config.json" in err
    assert not staging.exists()


def test_image_processor_size_that_differs_from_the_vision_config_is_refused(saved, tmp_path, capsys):
    folder = _copy(saved, "single", tmp_path)
    _edit_json(folder / "processor_config.json",
               lambda processor: processor["image_processor"].update(size={"height": 32, "width": 32}))
    code, err, staging = _release(folder, tmp_path, capsys)
    assert code == 2 and "the vision config's image_size is 64 but the image processor resizes to" in err
    assert "'height': 32" in err and not staging.exists()


CONVERTER_FACTS = {
    "model_id": "open-qwen2vl-tiny", "run_model_id": "open-qwen2vl-tiny", "checkpoint_name": "latest-checkpoint.pt",
    "sha256": "0123abcd" * 8, "arch_specifier": "full-align+729-avgpool",
    "vision_backbone_id": "siglip-vit-so400m-384px", "llm_backbone_id": "qwen2.5-1.5b-instruct",
    "num_image_tokens": 16, "vision_source": "the checkpoint's `vision_backbone`", "head": "not kept",
    "dropped": "vision attention-pool head (--drop-vision-head)", "dtype": "float32",
    "tokenizer": "the official Qwen2.5 tokenizer.json (offline copy)",
}


def test_converter_card_facts_are_kept_in_the_released_card(saved, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(model_repo, "_check_model_loads", lambda staging: None)  # loading is tested elsewhere
    folder = _copy(saved, "single", tmp_path)
    (folder / "README.md").write_text(converter_model_card(CONVERTER_FACTS), encoding="utf-8")
    code, err, staging = _release(folder, tmp_path, capsys)
    assert code == 0, err
    card = (staging / "README.md").read_text()
    conversion = card.split("## Conversion\n", 1)[1].split("\n## ", 1)[0]
    for fact in (f"| source checkpoint | `latest-checkpoint.pt` (sha256 `{'0123abcd' * 8}`) |",
                 "| dropped tensors | vision attention-pool head (--drop-vision-head) |",
                 "The processor's default chat template is `compat`", "### Usage",
                 "# The original README / evaluation format"):  # a code comment, not a heading: left as it is
        assert fact in conversion, fact
    training = card.split("## Training\n\n", 1)[1]
    assert training.startswith("- recipe: converted from a prismatic checkpoint")
    assert f"- source checkpoint: `latest-checkpoint.pt` (sha256 `{'0123abcd' * 8}`)" in training
    assert "recipe: unknown" not in card and "- prismatic-conversion" in card.split("\n---\n", 1)[0]
    assert "# open-qwen2vl-tiny (transformers format)" not in card  # one title: the converter's is dropped

    (folder / "README.md").write_text("# my notes\n\nnot a converter card\n")  # the user's: Notes, not Conversion
    code, err, staging = _release(folder, tmp_path, capsys)
    card = (staging / "README.md").read_text()
    assert code == 0 and "## Conversion" not in card and "- recipe: unknown" in card
    assert "## Notes\n\n### my notes\n\nnot a converter card\n" in card


USER_CARD = """---
license: cc-by-nc-4.0
datasets:
- org/my-captions
tags:
- my-finetune
---

# My captioner

Fine-tuned on my captions; not for medical images.

## Limitations

```python
# a comment in code, not a heading
```
"""


def test_users_own_readme_is_kept_in_the_released_card(saved, tmp_path, capsys, monkeypatch):
    from huggingface_hub import ModelCard

    monkeypatch.setattr(model_repo, "_check_model_loads", lambda staging: None)  # loading is tested elsewhere
    folder = _copy(saved, "single", tmp_path)
    (folder / "README.md").write_text(USER_CARD, encoding="utf-8")
    code, err, staging = _release(folder, tmp_path, capsys)
    assert code == 0, err
    card = ModelCard.load(staging / "README.md")  # parsed as the hub parses it
    notes = card.text.split("\n## Notes\n\n", 1)[1].split("\n## ", 1)[0]
    assert notes.startswith("### My captioner\n\nFine-tuned on my captions; not for medical images.\n\n"
                            "#### Limitations\n") and "# a comment in code, not a heading" in notes
    assert card.data.license == "cc-by-nc-4.0" and card.data.datasets == ["org/my-captions"]  # theirs kept
    assert card.data.tags == ["open-qwen2vl", "vision-language", "multimodal", "custom_code", "open-qwen2vl-release",
                              "my-finetune"]
    assert (card.data.library_name, card.data.pipeline_tag) == ("transformers", "image-text-to-text")
    assert card.text.lstrip().startswith("# x\n") and "\n# My captioner" not in card.text  # one title: ours


@pytest.mark.parametrize("own_readme", ["converter", "user", "none"])
def test_releasing_a_released_folder_again_gives_the_same_card(saved, tmp_path, capsys, monkeypatch, own_readme):
    """A downloaded release (its README.md is the card this tool made) released again, e.g. after a quantization:
    the Notes and Conversion sections are taken back from it, not the whole earlier card nested in the new one."""
    monkeypatch.setattr(model_repo, "_check_model_loads", lambda staging: None)
    folder = _copy(saved, "single", tmp_path)
    readme = {"converter": converter_model_card(CONVERTER_FACTS), "user": USER_CARD, "none": None}[own_readme]
    if readme:
        (folder / "README.md").write_text(readme, encoding="utf-8")
    code, err, staging = _release(folder, tmp_path, capsys)
    assert code == 0, err
    first = (staging / "README.md").read_text()
    (folder / "README.md").write_text(first, encoding="utf-8")  # as snapshot_download brings it back
    code, err, staging = _release(folder, tmp_path, capsys)
    assert code == 0, err
    again = (staging / "README.md").read_text()
    assert again == first
    assert again.count("\n## Use\n") == 1 and again.count("From the model card the converter wrote") == (
        own_readme == "converter")


def _trained(saved, tmp_path, trained_by):
    """A model folder with the files the training recipes leave: an SFT output, or a pretraining final_model."""
    if trained_by == "sft":
        folder = _copy(saved, "single", tmp_path)
        torch.save({"max_steps": 12, "learning_rate": 3e-5, "seed": 7}, folder / "training_args.bin")
        (folder / "training_log.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (5, 12)))
        return folder
    run = tmp_path / "run"  # recipes/pretrain.py: the config and metrics beside final_model
    shutil.copytree(saved / "single", run / "final_model")
    (run / "pretrain_config.yaml").write_text(yaml.safe_dump(
        {"stage": "pretrain", "dataset_name_or_path": "org/packed", "max_steps": 7, "learning_rate": 0.003}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 8)))
    return run / "final_model"


@pytest.mark.parametrize("trained_by", ["sft", "pretrain"])
def test_re_releasing_a_download_keeps_the_training_facts_of_its_card(saved, tmp_path, capsys, monkeypatch,
                                                                       trained_by):
    """A downloaded release has no training files (they are not published): released again, e.g. after a
    quantization, its card's Training section is taken back instead of "recipe: unknown"; training files of the
    folder's own (the model trained again) win."""
    monkeypatch.setattr(model_repo, "_check_model_loads", lambda staging: None)
    notes = tmp_path / "notes.md"
    notes.write_text("Trained on the easy-vqa questions.\n")
    code, err, staging = _release(_trained(saved, tmp_path, trained_by), tmp_path, capsys, "--training-notes",
                                  str(notes))
    assert code == 0, err
    first = (staging / "README.md").read_text()
    training = card_section(first, "Training")
    assert "recipe: unknown" not in training and training.endswith("Trained on the easy-vqa questions.")
    assert {"sft": "- length: 12 optimizer steps (12 steps logged)",
            "pretrain": "- data: `org/packed`"}[trained_by] in training
    download = tmp_path / "download"  # as snapshot_download brings it back
    shutil.copytree(staging, download, ignore=shutil.ignore_patterns(STAGING_MARKER))
    for args in ([], ["--training-notes", str(notes)]):  # the same notes again are not added twice
        code, err, staging = _release(download, tmp_path, capsys, *args)
        assert code == 0, err
        assert card_section((staging / "README.md").read_text(), "Training") == training
        assert (staging / "README.md").read_text() == first

    torch.save({"max_steps": 3, "seed": 9}, download / "training_args.bin")  # fine-tuned again
    code, err, staging = _release(download, tmp_path, capsys)
    again = card_section((staging / "README.md").read_text(), "Training")
    assert code == 0 and "- length: 3 optimizer steps" in again and "- seed: 9" in again
    assert "easy-vqa" not in again and "org/packed" not in again


def test_trainer_draft_card_is_replaced(saved, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(model_repo, "_check_model_loads", lambda staging: None)
    folder = _copy(saved, "single", tmp_path)
    (folder / "README.md").write_text(  # as TRL's SFTTrainer writes it at every checkpoint save
        "---\nlibrary_name: transformers\nmodel_name: sft\ntags:\n- generated_from_trainer\n- trl\n- sft\n---\n\n"
        "# Model Card for sft\n\n```python\ngenerator = pipeline(\"text-generation\", model=\"None\")\n```\n")
    code, err, staging = _release(folder, tmp_path, capsys)
    card = (staging / "README.md").read_text()
    assert code == 0 and "## Notes" not in card and "text-generation" not in card and "generated_from" not in card


@pytest.mark.parametrize(("front_matter", "message"), [
    ("pipeline_tag: text-generation\n", "README.md front matter sets pipeline_tag: 'text-generation' (the release "
                                        "needs 'image-text-to-text'); remove these keys"),
    ("license: [unclosed\n", "README.md has front matter that is not valid YAML"),
])
def test_users_readme_that_cannot_be_kept_is_refused(saved, tmp_path, capsys, front_matter, message):
    folder = _copy(saved, "single", tmp_path)
    (folder / "README.md").write_text(f"---\n{front_matter}---\n\n# mine\n")
    code, err, staging = _release(folder, tmp_path, capsys)
    assert code == 2 and message in err and "move README.md out of the folder" in err and not staging.exists()


def test_an_earlier_cards_scores_are_not_carried_over_and_the_release_says_so(saved, tmp_path, capsys, monkeypatch,
                                                                            caplog):
    """Scores belong to the model they were measured on: a re-released download (quantized, say) gets the
    Evaluation section of the --eval-table it is given, and without one a warning instead of the old scores."""
    monkeypatch.setattr(model_repo, "_check_model_loads", lambda staging: None)
    folder = _copy(saved, "single", tmp_path)
    table = tmp_path / "scores.md"
    table.write_text("| benchmark | score |\n|---|---|\n| mmbench | 61.0 |\n")
    code, err, staging = _release(folder, tmp_path, capsys, "--eval-table", str(table))
    assert code == 0, err
    released = (staging / "README.md").read_text()
    assert "## Evaluation" in released and "| mmbench | 61.0 |" in released
    (folder / "README.md").write_text(released, encoding="utf-8")
    with caplog.at_level("WARNING", logger="recipes.release.model_repo"):
        code, err, staging = _release(folder, tmp_path, capsys)
    assert code == 0, err
    assert "## Evaluation" not in (staging / "README.md").read_text()
    assert "is a released card with an Evaluation section; it is not carried over" in caplog.text
    assert "pass --eval-table" in caplog.text
    caplog.clear()
    table.write_text("| benchmark | score |\n|---|---|\n| mmbench | 58.5 |\n")
    code, err, staging = _release(folder, tmp_path, capsys, "--eval-table", str(table))
    card = (staging / "README.md").read_text()
    assert code == 0 and "| mmbench | 58.5 |" in card and "61.0" not in card and "not carried over" not in caplog.text
