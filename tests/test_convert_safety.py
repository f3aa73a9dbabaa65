"""The converter never writes on bad input and never leaves another model's files to win: the output folder is
checked first (an input's folder is refused, a model folder needs --overwrite), the tokenizer, run config and
export template are read before writing, the checkpoint's zip CRCs are checked, and mixed fp16/bf16 widens."""

import json
import logging
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_convert_reference import build_reference, run_config, tiny_base_config
from transformers import AutoModelForImageTextToText, AutoProcessor

from modeling_open_qwen2vl.conversion_config import config_from_run
from modeling_open_qwen2vl.conversion_errors import CheckpointError, OutputFolderError
from modeling_open_qwen2vl.convert_prismatic_to_hf import main
from modeling_open_qwen2vl.hf_folder import convert_checkpoint
from modeling_open_qwen2vl.original_checkpoint import load_prismatic_checkpoint, scan_checkpoint_file
from modeling_open_qwen2vl.prismatic_export import export_to_prismatic, load_hf_folder_state_dict
from modeling_open_qwen2vl.weight_mapping import resolve_dtype

PROJECTOR = "model.multi_modal_projector.linear_1.weight"


def _write_run(root: Path, checkpoint: dict, arch: str = "full-align+729-avgpool") -> Path:
    (root / "checkpoints").mkdir(parents=True)
    torch.save(checkpoint, root / "checkpoints" / "latest-checkpoint.pt")
    (root / "config.json").write_text(json.dumps(run_config(arch)))
    tiny_base_config().save_pretrained(root / "base")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two prismatic runs with different weights: {"a": (run dir, checkpoint), "b": ...}."""
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for name, seed in (("a", 3), ("b", 5)):
        checkpoint = build_reference(seed=seed).checkpoint()
        made[name] = (_write_run(root / name, checkpoint), checkpoint)
    return made


def _convert(run: Path, output: Path, *extra: str) -> int:
    return main(["--checkpoint", str(run), "--base-config", str(run / "base"), "--output", str(output),
                 "--no-sha256", *extra])


def _projector(checkpoint: dict) -> torch.Tensor:
    return checkpoint["model"]["projector"]["mlp_projector.0.weight"]


def _error_line(capsys) -> str:
    """The CLI's one ``error: ...`` line (progress bars share stderr); no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ 1. the output folder is checked


def test_folder_holding_a_model_is_refused_before_anything_is_written(tmp_path, runs, capsys):
    (run_a, _), (run_b, _) = runs["a"], runs["b"]
    out = tmp_path / "hf"
    assert _convert(run_a, out) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert _convert(run_b, out, "--max-shard-size", "20MB") == 2
    err = _error_line(capsys)
    assert "already holds model files (config.json, model.safetensors, " in err and "--overwrite" in err
    assert _snapshot(out) == before
    with pytest.raises(OutputFolderError, match=r"already holds model files"):
        convert_checkpoint(run_b, out, base_config=run_b / "base", compute_sha256=False)
    assert _snapshot(out) == before


def test_overwrite_removes_the_old_weights_single_to_sharded_and_back(tmp_path, runs):
    (run_a, checkpoint_a), (run_b, checkpoint_b) = runs["a"], runs["b"]
    out = tmp_path / "hf"
    assert _convert(run_a, out) == 0
    assert _convert(run_b, out, "--max-shard-size", "20MB", "--overwrite") == 0
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    assert torch.equal(model.state_dict()[PROJECTOR], _projector(checkpoint_b))

    # Sharded -> single file: no index (which --to-prismatic read first) and no shards may survive.
    assert _convert(run_a, out, "--overwrite") == 0
    assert sorted(p.name for p in out.glob("model*.*") if p.suffix != ".py") == ["model.safetensors"]
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    assert torch.equal(model.state_dict()[PROJECTOR], _projector(checkpoint_a))
    back = tmp_path / "back"
    assert main(["--to-prismatic", str(out), "--output", str(back), "--config", str(run_a / "config.json")]) == 0
    exported = torch.load(back / "checkpoints" / "latest-checkpoint.pt", weights_only=True)
    assert torch.equal(_projector(exported), _projector(checkpoint_a))


def test_empty_or_unrelated_folders_are_written_as_before(tmp_path, runs):
    run_a, _ = runs["a"]
    (tmp_path / "empty").mkdir()
    assert _convert(run_a, tmp_path / "empty") == 0
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    assert _convert(run_a, tmp_path / "notes") == 0
    assert (tmp_path / "notes" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "notes" / "model.safetensors").is_file()


def test_output_that_is_the_input_is_refused_even_with_overwrite(tmp_path, runs, capsys):
    run_a, _ = runs["a"]
    run = tmp_path / "run"
    shutil.copytree(run_a, run)
    before = _snapshot(run)
    for output in (run, run / "checkpoints"):
        for extra in ((), ("--overwrite",)):
            assert _convert(run, output, *extra) == 2
            assert "is, or contains, the input" in _error_line(capsys)
    with pytest.raises(OutputFolderError, match=r"is, or contains, the input .*latest-checkpoint\.pt"):
        convert_checkpoint(run, run, base_config=run / "base", compute_sha256=False, overwrite=True)
    assert _snapshot(run) == before  # the run's config.json is still the prismatic one

    hf = tmp_path / "hf"
    assert _convert(run, hf) == 0
    hf_before = _snapshot(hf)
    assert main(["--to-prismatic", str(hf), "--output", str(hf), "--config", str(run / "config.json"),
                 "--overwrite"]) == 2
    assert "is, or contains, the input" in _error_line(capsys)
    with pytest.raises(OutputFolderError, match=r"is, or contains, the input"):
        export_to_prismatic(hf, tmp_path, run_config_template=run / "config.json", overwrite=True)
    # The template lives inside the output too: exporting over the run directory would replace its checkpoint.
    with pytest.raises(OutputFolderError, match=r"is, or contains, the input"):
        export_to_prismatic(hf, run, run_config_template=run / "config.json", overwrite=True)
    assert _snapshot(hf) == hf_before and _snapshot(run) == before
    AutoModelForImageTextToText.from_pretrained(hf, trust_remote_code=True)  # the HF folder still loads


def test_export_into_a_model_folder_needs_overwrite(tmp_path, runs, capsys):
    (run_a, checkpoint_a), (run_b, _) = runs["a"], runs["b"]
    assert _convert(run_a, tmp_path / "hf_a") == 0
    assert _convert(run_b, tmp_path / "hf_b") == 0
    target = tmp_path / "hf_b"
    before = _snapshot(target)
    export = ["--to-prismatic", str(tmp_path / "hf_a"), "--output", str(target), "--config", str(run_a / "config.json")]
    assert main(export) == 2
    assert "already holds model files" in _error_line(capsys)
    assert _snapshot(target) == before
    assert main([*export, "--overwrite"]) == 0
    assert not list(target.glob("model*.safetensors"))  # no HF model left to load beside the run
    exported = torch.load(target / "checkpoints" / "latest-checkpoint.pt", weights_only=True)
    assert torch.equal(_projector(exported), _projector(checkpoint_a))
    assert json.loads((target / "config.json").read_text())["model"]["arch_specifier"] == "full-align+729-avgpool"


def test_export_reads_the_weights_from_pretrained_loads(tmp_path, runs):
    """A folder with both model.safetensors and an index: transformers loads model.safetensors, so must the export."""
    (run_a, checkpoint_a), (run_b, _) = runs["a"], runs["b"]
    assert _convert(run_a, tmp_path / "single") == 0
    assert _convert(run_b, tmp_path / "sharded", "--max-shard-size", "20MB") == 0
    both = tmp_path / "both"
    shutil.copytree(tmp_path / "sharded", both)
    shutil.copy(tmp_path / "single" / "model.safetensors", both / "model.safetensors")
    loaded = AutoModelForImageTextToText.from_pretrained(both, trust_remote_code=True).state_dict()
    state = load_hf_folder_state_dict(both)
    assert torch.equal(loaded[PROJECTOR], _projector(checkpoint_a))
    assert torch.equal(state[PROJECTOR], loaded[PROJECTOR])


# ------------------------------------------------------------------------------------------------- 2. the model card


def test_model_card_says_to_change_both_files_and_its_python_works(tmp_path, runs):
    run_a, _ = runs["a"]
    out = tmp_path / "hf"
    assert _convert(run_a, out) == 0
    card = (out / "README.md").read_text()
    line = next(line for line in card.splitlines() if line.startswith("| visual tokens per image"))
    assert "config.json" in line and "processor_config.json" in line

    # The card's Python: set both, save both; the reloaded pair takes images.
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert "model.config.num_image_tokens = processor.num_image_tokens = 144" in card
    model.config.num_image_tokens = processor.num_image_tokens = 144
    model.save_pretrained(tmp_path / "144")
    processor.save_pretrained(tmp_path / "144")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "144", trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "144", trust_remote_code=True)
    inputs = processor(text="<s><image>\nDescribe the image.", images=[Image.new("RGB", (30, 40))],
                       return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 144
    with torch.no_grad():
        model(**inputs, logits_to_keep=1)


# ------------------------------------------------------------------------- 3. tokenizer and run config before writing


def _wordlevel_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind, message", [
    ("missing-folder", r"--tokenizer .*missing-folder: no such file or folder"),
    ("missing.json", r"--tokenizer .*missing\.json: no such file or folder"),
    ("wordlevel", r"cannot build the processor from --tokenizer .*wordlevel.*not a Qwen2-family tokenizer"),
])
def test_bad_tokenizer_fails_before_writing(tmp_path, runs, capsys, kind, message):
    run_a, _ = runs["a"]
    tokenizer = _wordlevel_tokenizer(tmp_path / kind) if kind == "wordlevel" else tmp_path / kind
    out = tmp_path / "hf"
    assert _convert(run_a, out, "--tokenizer", str(tokenizer)) == 2
    assert "--tokenizer" in _error_line(capsys)
    assert not out.exists()
    with pytest.raises(CheckpointError, match=message):
        convert_checkpoint(run_a, out, base_config=run_a / "base", tokenizer=tokenizer, compute_sha256=False)
    assert not out.exists()


def test_other_projector_in_the_run_config_is_an_error_line(tmp_path, runs, capsys):
    run_a, _ = runs["a"]
    (tmp_path / "gelu.json").write_text(json.dumps(run_config("gelu-mlp")))
    out = tmp_path / "hf"
    code = main(["--checkpoint", str(run_a / "checkpoints" / "latest-checkpoint.pt"), "--config",
                 str(tmp_path / "gelu.json"), "--base-config", str(run_a / "base"), "--output", str(out)])
    assert code == 2
    assert "error: run config: arch_specifier 'gelu-mlp' does not use the average-pool" in _error_line(capsys)
    assert not out.exists()
    with pytest.raises(CheckpointError, match=r"arch_specifier 'gelu-mlp'"):
        config_from_run(run_config("gelu-mlp")["model"], tiny_base_config())


def test_bad_shard_size_fails_before_writing(tmp_path, runs, capsys):
    run_a, _ = runs["a"]
    assert _convert(run_a, tmp_path / "hf", "--max-shard-size", "20XB") == 2
    assert "error: --max-shard-size '20XB'" in _error_line(capsys)
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------ 4. the export's run config template


def test_export_checks_its_run_config_template_before_writing(tmp_path, runs, capsys):
    run_a, _ = runs["a"]
    hf = tmp_path / "hf"
    assert _convert(run_a, hf) == 0
    back = tmp_path / "back"
    assert main(["--to-prismatic", str(hf), "--output", str(back), "--config", str(hf / "config.json")]) == 2
    assert "is not a prismatic run config: it needs a 'model' object" in _error_line(capsys)
    assert not back.exists()
    assert main(["--to-prismatic", str(hf), "--output", str(back), "--config", str(tmp_path / "nope.json")]) == 2
    assert "error: prismatic run config (--config) not found" in _error_line(capsys)
    assert not back.exists()
    with pytest.raises(CheckpointError, match=r"not a prismatic run config"):
        export_to_prismatic(hf, back, run_config_template=hf / "config.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"broken\.json is not a readable JSON file"):
        export_to_prismatic(hf, back, run_config_template=tmp_path / "broken.json")
    assert not back.exists()


# ---------------------------------------------------------------------------------------- 5. mixed half precisions


def test_mixed_fp16_and_bf16_widen_to_float32_in_any_order(caplog):
    fp16 = {"a": torch.ones(2, dtype=torch.float16)}
    bf16 = {"b": torch.ones(2, dtype=torch.bfloat16)}
    with caplog.at_level(logging.WARNING, logger="modeling_open_qwen2vl.weight_mapping"):
        assert resolve_dtype({"llm_backbone": fp16, "vision_backbone": bf16}, "auto") is torch.float32
        assert resolve_dtype({"vision_backbone": bf16, "llm_backbone": fp16}, "auto") is torch.float32
    assert "mixes bfloat16 and float16; writing float32" in caplog.text
    fp32 = {"c": torch.ones(2)}
    assert resolve_dtype({"x": fp16, "y": bf16, "z": fp32}, "auto") is torch.float32
    assert resolve_dtype({"x": bf16, "y": bf16}, "auto") is torch.bfloat16


def test_mixed_half_checkpoint_keeps_bf16_values_fp16_cannot_hold(tmp_path, runs):
    _, checkpoint = runs["a"]
    model = {g: dict(s) for g, s in checkpoint["model"].items()}
    for group in ("projector", "llm_backbone"):
        model[group] = {k: v.half() for k, v in model[group].items()}
    model["vision_backbone"] = {k: v.bfloat16() for k, v in model["vision_backbone"].items()}
    model["vision_backbone"]["featurizer.pos_embed"][0, 0, 0] = 1e5  # fine in bf16, inf in fp16
    run = _write_run(tmp_path / "run", {"model": model})
    assert _convert(run, tmp_path / "hf") == 0
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    position = weights["model.vision_tower.embeddings.position_embedding.weight"]
    assert float(position[0, 0]) == float(torch.tensor(1e5, dtype=torch.bfloat16))
    embed = model["llm_backbone"]["llm.model.embed_tokens.weight"]
    assert torch.equal(weights["model.language_model.embed_tokens.weight"], embed.float())


# ------------------------------------------------------------------------------------ 6. damaged checkpoint bytes


def _damage_a_tensor_record(source: Path, target: Path) -> str:
    """Copy ``source`` with 4 KiB of zeros in the middle of its largest tensor record (the zip index intact)."""
    with zipfile.ZipFile(source) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(source.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
    data[start : start + 4096] = bytes(4096)
    target.write_bytes(bytes(data))
    return info.filename


@pytest.mark.parametrize("hash_it", [True, False])
def test_checkpoint_damaged_inside_a_tensor_is_refused(tmp_path, runs, capsys, hash_it):
    run_a, _ = runs["a"]
    bad = tmp_path / "damaged.pt"
    member = _damage_a_tensor_record(run_a / "checkpoints" / "latest-checkpoint.pt", bad)
    out = tmp_path / "hf"
    code = main(["--checkpoint", str(bad), "--config", str(run_a / "config.json"), "--base-config",
                 str(run_a / "base"), "--output", str(out), *([] if hash_it else ["--no-sha256"])])
    assert code == 2
    assert f"damaged.pt is damaged: zip member '{member}' fails its CRC-32 check" in _error_line(capsys)
    assert not out.exists()
    with pytest.raises(CheckpointError, match=rf"damaged\.pt is damaged: zip member '{member}'"):
        load_prismatic_checkpoint(bad)


def test_crc_scan_across_block_boundaries_and_its_sha256(tmp_path, runs, monkeypatch):
    import hashlib

    import modeling_open_qwen2vl.original_checkpoint as original_checkpoint

    run_a, _ = runs["a"]
    good = run_a / "checkpoints" / "latest-checkpoint.pt"
    expected = hashlib.sha256(good.read_bytes()).hexdigest()
    assert scan_checkpoint_file(good) == expected
    monkeypatch.setattr(original_checkpoint, "_SCAN_BLOCK", 4099)  # records split over many reads
    assert scan_checkpoint_file(good) == expected and scan_checkpoint_file(good, sha256=False) is None
    bad = tmp_path / "damaged.pt"
    member = _damage_a_tensor_record(good, bad)
    with pytest.raises(CheckpointError, match=rf"zip member '{member}' fails its CRC-32 check"):
        scan_checkpoint_file(bad)


def test_dtype_too_narrow_for_the_weights_is_refused_before_writing(tmp_path, runs, capsys):
    _, checkpoint = runs["a"]
    model = {group: dict(state) for group, state in checkpoint["model"].items()}
    model["projector"]["mlp_projector.0.weight"] = model["projector"]["mlp_projector.0.weight"].clone()
    model["projector"]["mlp_projector.0.weight"][0, 0] = 1e5  # a float32 value float16 cannot hold
    run = _write_run(tmp_path / "run", {"model": model})
    assert _convert(run, tmp_path / "hf", "--dtype", "float16") == 2
    err = _error_line(capsys)
    assert "error: --dtype float16: weights [model.multi_modal_projector.linear_1.weight] (1 keys)" in err
    assert "beyond float16's range (+-65504)" in err and "--dtype auto, bfloat16 or float32" in err
    assert not (tmp_path / "hf").exists()
    assert _convert(run, tmp_path / "hf", "--dtype", "bfloat16") == 0
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert float(weights[PROJECTOR][0, 0]) == float(torch.tensor(1e5, dtype=torch.bfloat16))


def test_model_card_convert_back_command_works_without_the_vision_head(tmp_path, runs):
    import re

    run_a, _ = runs["a"]
    out = tmp_path / "hf"
    assert _convert(run_a, out, "--drop-vision-head") == 0
    card = (out / "README.md").read_text()
    command = re.search(r"`python -m modeling_open_qwen2vl\.convert_prismatic_to_hf (--to-prismatic [^`]+)`", card)
    argv = command.group(1).replace("<this folder>", str(out)).replace("<run dir>", str(tmp_path / "run")).split()
    assert "--no-vision-backbone" in argv and "uses timm's pretrained SigLIP" in card
    assert main([*argv, "--config", str(run_a / "config.json")]) == 0  # a tiny model needs its run config
    exported = torch.load(tmp_path / "run" / "checkpoints" / "latest-checkpoint.pt", weights_only=True)
    assert set(exported["model"]) == {"projector", "llm_backbone"}
    # With the head kept, the command is the plain one.
    assert _convert(run_a, tmp_path / "kept") == 0
    assert "--output <run dir>`." in (tmp_path / "kept" / "README.md").read_text()
