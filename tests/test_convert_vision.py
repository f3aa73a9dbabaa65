"""Vision weights for checkpoints without a vision_backbone: a timm file or a transformers SigLIP folder."""

import json

import pytest
import torch
from safetensors.torch import save_file
from test_convert_reference import build_reference, run_config, tiny_base_config
from transformers import AutoModelForImageTextToText, SiglipConfig, SiglipModel

from modeling_open_qwen2vl.conversion_errors import CheckpointError
from modeling_open_qwen2vl.convert_prismatic_to_hf import main
from modeling_open_qwen2vl.hf_folder import convert_checkpoint


@pytest.fixture(scope="module")
def reference():
    return build_reference(seed=5)


@pytest.fixture()
def frozen_vision_run(tmp_path, reference):
    """A run whose checkpoint has no vision_backbone (the vision tower was frozen), plus a base config."""
    torch.save(reference.checkpoint(with_vision=False), tmp_path / "latest-checkpoint.pt")
    (tmp_path / "config.json").write_text(json.dumps(run_config("no-align+avgpool")))
    tiny_base_config().save_pretrained(tmp_path / "base")
    return tmp_path


def _convert(run, vision_weights, out="hf"):
    return convert_checkpoint(run / "latest-checkpoint.pt", run / out, run_config=run / "config.json",
                              vision_weights=vision_weights, base_config=run / "base", compute_sha256=False)


def _assert_vision_matches_reference(folder, reference):
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    pixels = torch.randn(2, 3, 54, 54)
    with torch.no_grad():
        torch.testing.assert_close(model.model.get_vision_features(pixels), reference.vision_backbone(pixels),
                                   rtol=0, atol=1e-5)
    return model


def test_timm_safetensors_file_with_bare_keys(frozen_vision_run, reference):
    timm_state = {k.removeprefix("featurizer."): v.contiguous()
                  for k, v in reference.vision_backbone.state_dict().items()}
    save_file(timm_state, frozen_vision_run / "vit.safetensors")
    folder = _convert(frozen_vision_run, frozen_vision_run / "vit.safetensors")
    model = _assert_vision_matches_reference(folder, reference)
    assert model.config.vision_config.vision_use_head is True  # timm's attn_pool kept, for a lossless export
    card = (folder / "README.md").read_text()
    assert "`vit.safetensors`" in card and str(frozen_vision_run) not in card


def test_open_clip_style_torch_file_with_other_towers(frozen_vision_run, reference):
    """open_clip checkpoints nest the timm trunk under visual.trunk. next to a text tower: only the trunk is used."""
    vit = reference.vision_backbone.state_dict()
    state = {"visual.trunk." + k.removeprefix("featurizer."): v for k, v in vit.items()}
    state["text.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(6, 2)
    state["logit_scale"] = torch.tensor(1.0)
    torch.save(state, frozen_vision_run / "open_clip_pytorch_model.bin")
    _assert_vision_matches_reference(_convert(frozen_vision_run, frozen_vision_run / "open_clip_pytorch_model.bin"),
                                     reference)


def test_transformers_siglip_folder(frozen_vision_run):
    """A full SiglipModel checkpoint (text tower, tanh-GELU config): its vision weights are taken verbatim and the
    kit keeps the original's exact GELU."""
    vision = {"hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 3, "num_attention_heads": 2,
              "image_size": 54, "patch_size": 2, "hidden_act": "gelu_pytorch_tanh"}
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 64, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    torch.manual_seed(0)
    siglip = SiglipModel(SiglipConfig(vision_config=vision, text_config=text))
    siglip.save_pretrained(frozen_vision_run / "siglip")
    folder = _convert(frozen_vision_run, frozen_vision_run / "siglip")
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    ours = model.model.vision_tower.state_dict()
    theirs = siglip.vision_model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert model.config.vision_config.hidden_act == "gelu"


def test_siglip_with_another_architecture_is_refused(frozen_vision_run):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                                         num_attention_heads=2, image_size=54, patch_size=2)).save_pretrained(
        frozen_vision_run / "wide")
    with pytest.raises(CheckpointError, match=r"SigLIP architecture differs.*'hidden_size': \(32, 24\)"):
        _convert(frozen_vision_run, frozen_vision_run / "wide")


def test_missing_vision_source_is_an_error_not_random_weights(frozen_vision_run, capsys):
    with pytest.raises(CheckpointError, match=r"has no vision_backbone .* --vision-weights"):
        _convert(frozen_vision_run, None)
    assert main(["--checkpoint", str(frozen_vision_run / "latest-checkpoint.pt"), "--config",
                 str(frozen_vision_run / "config.json"), "--base-config", str(frozen_vision_run / "base"),
                 "--output", str(frozen_vision_run / "out")]) == 2
    assert "--vision-weights" in capsys.readouterr().err
    assert not (frozen_vision_run / "out" / "config.json").exists()


def test_timm_file_without_exactly_one_vit_is_refused(frozen_vision_run, reference):
    vit = {k.removeprefix("featurizer."): v.contiguous() for k, v in reference.vision_backbone.state_dict().items()}
    save_file({**{"a." + k: v for k, v in vit.items()}, **{"b." + k: v.clone() for k, v in vit.items()}},
              frozen_vision_run / "two.safetensors")
    with pytest.raises(CheckpointError, match=r"two\.safetensors: expected exactly one timm ViT.*\['a\.', 'b\.'\]"):
        _convert(frozen_vision_run, frozen_vision_run / "two.safetensors")
    save_file({"something.weight": torch.zeros(2)}, frozen_vision_run / "none.safetensors")
    with pytest.raises(CheckpointError, match=r"none\.safetensors: expected exactly one timm ViT.*none"):
        _convert(frozen_vision_run, frozen_vision_run / "none.safetensors")


def test_vision_weights_next_to_a_checkpoint_vision_backbone_is_refused(tmp_path, reference):
    torch.save(reference.checkpoint(), tmp_path / "latest-checkpoint.pt")
    (tmp_path / "config.json").write_text(json.dumps(run_config("no-align+avgpool")))
    tiny_base_config().save_pretrained(tmp_path / "base")
    with pytest.raises(CheckpointError, match="has its own vision_backbone; drop --vision-weights"):
        _convert(tmp_path, tmp_path / "anything.safetensors")


def test_unreachable_siglip_id_is_a_conversion_error(frozen_vision_run):
    with pytest.raises(CheckpointError, match=r"cannot load SigLIP vision weights from 'no-such-org/no-such-siglip'"):
        _convert(frozen_vision_run, "no-such-org/no-such-siglip")
