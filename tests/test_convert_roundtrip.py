"""Export back: original -> HF -> original is the identity, and the export loads strictly into the original layout."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from test_convert_reference import PrismaticReference, build_reference, run_config, tiny_base_config
from transformers import AutoModelForImageTextToText

from modeling_open_qwen2vl import OpenQwen2VLForConditionalGeneration
from modeling_open_qwen2vl.conversion_config import derive_config
from modeling_open_qwen2vl.conversion_errors import CheckpointError
from modeling_open_qwen2vl.convert_prismatic_to_hf import main
from modeling_open_qwen2vl.weight_mapping import convert_state_dict, convert_to_prismatic


@pytest.fixture(scope="module")
def reference():
    return build_reference(seed=3)


def _config(head=True, tie=True):
    return derive_config(tiny_base_config(), vision_use_head=head, tie_word_embeddings=tie)


def assert_same_groups(actual, expected):
    assert actual.keys() == expected.keys()
    for group in expected:
        assert actual[group].keys() == expected[group].keys(), group
        for key, tensor in expected[group].items():
            assert actual[group][key].dtype == tensor.dtype, key
            assert torch.equal(actual[group][key], tensor), key


def test_round_trip_with_vision_backbone_is_identical(reference):
    original = reference.checkpoint()["model"]
    config = _config()
    hf = convert_state_dict(original, config)
    model = OpenQwen2VLForConditionalGeneration(config)
    assert list(hf) == list(model.state_dict())
    model.load_state_dict(hf, strict=True)
    assert hf["lm_head.weight"] is hf["model.language_model.embed_tokens.weight"]  # tied: one tensor, no copy
    assert_same_groups(convert_to_prismatic(hf, config), original)


def test_round_trip_without_vision_backbone_or_lm_head(reference):
    """Checkpoints of frozen-vision runs carry no vision_backbone; tied ones may omit llm.lm_head.weight."""
    original = reference.checkpoint(with_vision=False, with_lm_head=False)["model"]
    full = convert_state_dict(reference.checkpoint()["model"], _config())
    vision = {k.removeprefix("model.vision_tower."): v for k, v in full.items() if k.startswith("model.vision_tower.")}
    config = _config()
    hf = convert_state_dict(original, config, vision=vision)
    back = convert_to_prismatic(hf, config, include_vision_backbone=False, include_lm_head=False)
    assert_same_groups(back, original)


def test_pooling_head_maps_to_the_transformers_head(reference):
    """timm's attn_pool (q + fused kv) and transformers' MultiheadAttention head compute the same pooled vector."""
    config = _config()
    model = OpenQwen2VLForConditionalGeneration(config).eval()
    model.load_state_dict(convert_state_dict(reference.checkpoint()["model"], config))
    pixels = torch.randn(2, 3, 54, 54)
    with torch.no_grad():
        ours = model.model.vision_tower(pixel_values=pixels).pooler_output
        theirs = reference.vision_backbone.featurizer.pooled(pixels)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_derived_rotary_buffers_are_dropped_and_logged(reference, caplog):
    original = reference.checkpoint()["model"]
    original["llm_backbone"]["llm.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    with caplog.at_level(logging.WARNING):
        hf = convert_state_dict(original, _config())
    assert not any("inv_freq" in key for key in hf)
    assert "dropped 1 tensors" in caplog.text and "rotary_emb.inv_freq" in caplog.text


def test_head_free_model_refuses_a_vision_export_the_original_could_not_load(reference):
    config = _config(head=False)
    hf = convert_state_dict(reference.checkpoint()["model"], config)
    with pytest.raises(CheckpointError, match=r"expects timm's attn_pool\.\* weights"):
        convert_to_prismatic(hf, config)
    back = convert_to_prismatic(hf, config, include_vision_backbone=False)
    assert set(back) == {"projector", "llm_backbone"}


def _write_run(root, reference_checkpoint, arch="full-align+729-avgpool"):
    (root / "checkpoints").mkdir(parents=True)
    torch.save(reference_checkpoint, root / "checkpoints" / "latest-checkpoint.pt")
    (root / "config.json").write_text(json.dumps(run_config(arch)))
    tiny_base_config().save_pretrained(root / "base")


def test_cli_export_back_loads_strictly_into_the_original_modules(tmp_path, reference):
    run = tmp_path / "run"
    _write_run(run, reference.checkpoint())
    assert main(["--checkpoint", str(run), "--base-config", str(run / "base"), "--output", str(tmp_path / "hf"),
                 "--no-sha256"]) == 0
    assert main(["--to-prismatic", str(tmp_path / "hf"), "--output", str(tmp_path / "back"),
                 "--config", str(run / "config.json")]) == 0

    exported = torch.load(tmp_path / "back" / "checkpoints" / "latest-checkpoint.pt", weights_only=True)
    assert_same_groups(exported["model"], reference.checkpoint()["model"])
    # What PrismaticVLM.from_pretrained does: strict load_state_dict per module.
    fresh = PrismaticReference(729)
    for group in ("vision_backbone", "projector", "llm_backbone"):
        getattr(fresh, group).load_state_dict(exported["model"][group], strict=True)
    run_cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert run_cfg["model"]["arch_specifier"] == "full-align+729-avgpool"
    assert run_cfg["model"]["model_id"] == "tiny-open-qwen2vl" and run_cfg["mount_path"] == "Qwen"


def test_untied_checkpoint_converts_untied_and_round_trips(tmp_path, reference):
    checkpoint = reference.checkpoint()
    llm = checkpoint["model"]["llm_backbone"]
    llm["llm.lm_head.weight"] = llm["llm.lm_head.weight"].clone() + 0.5
    run = tmp_path / "run"
    _write_run(run, checkpoint)
    assert main(["--checkpoint", str(run), "--base-config", str(run / "base"), "--output", str(tmp_path / "hf"),
                 "--no-sha256"]) == 0
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.lm_head.weight, llm["llm.lm_head.weight"])
    assert torch.equal(model.get_input_embeddings().weight, llm["llm.model.embed_tokens.weight"])
    hf = {k: v for k, v in model.state_dict().items()}
    assert_same_groups(convert_to_prismatic(hf, model.config), checkpoint["model"])
    # The same mismatch against a tied config is an error, not a silent choice of one tensor.
    with pytest.raises(CheckpointError, match=r"llm\.lm_head\.weight differs from .*embed_tokens"):
        convert_state_dict(checkpoint["model"], _config(tie=True))


def test_dtype_auto_keeps_bf16_and_widens_mixed_checkpoints(tmp_path, reference):
    checkpoint = reference.checkpoint()
    bf16 = {"model": {g: {k: v.to(torch.bfloat16) for k, v in s.items()} for g, s in checkpoint["model"].items()}}
    _write_run(tmp_path / "bf16", bf16)
    assert main(["--checkpoint", str(tmp_path / "bf16"), "--base-config", str(tmp_path / "bf16" / "base"),
                 "--output", str(tmp_path / "hf16"), "--no-sha256"]) == 0
    weights = load_file(tmp_path / "hf16" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["dtype"] == "bfloat16"

    mixed = {"model": dict(checkpoint["model"])}
    mixed["model"]["vision_backbone"] = bf16["model"]["vision_backbone"]  # a frozen tower cast to bf16 in training
    _write_run(tmp_path / "mixed", mixed)
    assert main(["--checkpoint", str(tmp_path / "mixed"), "--base-config", str(tmp_path / "mixed" / "base"),
                 "--output", str(tmp_path / "hfmixed"), "--no-sha256"]) == 0
    weights = load_file(tmp_path / "hfmixed" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    patch = mixed["model"]["vision_backbone"]["featurizer.patch_embed.proj.weight"]
    assert torch.equal(weights["model.vision_tower.embeddings.patch_embedding.weight"], patch.float())


def test_drop_vision_head_option(tmp_path, reference):
    run = tmp_path / "run"
    _write_run(run, reference.checkpoint())
    assert main(["--checkpoint", str(run), "--base-config", str(run / "base"), "--output", str(tmp_path / "hf"),
                 "--no-sha256", "--drop-vision-head"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vision_config"]["vision_use_head"] is False
    assert not any(".head." in k for k in load_file(tmp_path / "hf" / "model.safetensors"))
    assert "--drop-vision-head" in (tmp_path / "hf" / "README.md").read_text()
    back = ["--to-prismatic", str(tmp_path / "hf"), "--output", str(tmp_path / "back")]
    assert main([*back, "--config", str(run / "config.json")]) == 2  # the original needs the head
    assert main([*back, "--config", str(run / "config.json"), "--no-vision-backbone"]) == 0
    exported = torch.load(tmp_path / "back" / "checkpoints" / "latest-checkpoint.pt", weights_only=True)["model"]
    original = reference.checkpoint(with_vision=False)["model"]
    assert_same_groups(exported, original)


def test_export_of_another_architecture_needs_its_run_config(tmp_path, reference, capsys):
    run = tmp_path / "run"
    _write_run(run, reference.checkpoint())
    assert main(["--checkpoint", str(run), "--base-config", str(run / "base"), "--output", str(tmp_path / "hf"),
                 "--no-sha256"]) == 0
    # The default run config names the released backbones: the original load() would build 2B modules.
    assert main(["--to-prismatic", str(tmp_path / "hf"), "--output", str(tmp_path / "back")]) == 2
    assert "is not the released architecture" in capsys.readouterr().err
    assert not (tmp_path / "back").exists()


def test_export_checks_the_state_dict_against_its_config(reference):
    config = _config()
    hf = convert_state_dict(reference.checkpoint()["model"], config)
    incomplete = {k: v for k, v in hf.items() if k != "model.language_model.norm.weight"}
    with pytest.raises(CheckpointError, match=r"missing \[model\.language_model\.norm\.weight\] \(1 keys\)"):
        convert_to_prismatic(incomplete, config)
    extra = {**hf, "model.extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"keys outside the Open-Qwen2VL layout: \[model\.extra\.weight\]"):
        convert_to_prismatic(extra, config)
