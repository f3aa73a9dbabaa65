"""Bad input: clear errors that name the file, the key and the shapes; never a partial or random model."""

import json
import pickle
import re

import pytest
import torch
from test_convert_reference import build_reference, run_config, tiny_base_config

from modeling_open_qwen2vl.conversion_config import config_from_run, derive_config
from modeling_open_qwen2vl.conversion_errors import CheckpointError
from modeling_open_qwen2vl.convert_prismatic_to_hf import main
from modeling_open_qwen2vl.original_checkpoint import load_prismatic_checkpoint
from modeling_open_qwen2vl.prismatic_layout import num_image_tokens_from_arch_specifier
from modeling_open_qwen2vl.weight_mapping import convert_state_dict


@pytest.fixture(scope="module")
def original():
    return build_reference(seed=7).checkpoint()["model"]


@pytest.fixture(scope="module")
def config():
    return derive_config(tiny_base_config(), vision_use_head=True)


def _copy(original):
    return {group: dict(state) for group, state in original.items()}


class NeedsCode:
    """A class the unpickler would have to import and run to rebuild."""


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights")
    with pytest.raises(CheckpointError, match=r"notes\.pt is not a readable PyTorch checkpoint"):
        load_prismatic_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint file not found: .*absent\.pt"):
        load_prismatic_checkpoint(tmp_path / "absent.pt")


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_that_needs_code_execution_is_refused(tmp_path, zip_format):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"projector": NeedsCode()}}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refusing to load: its pickle needs code execution "
                                              r"\(.*NeedsCode"):
        load_prismatic_checkpoint(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_with_a_reduce_hook_is_refused(tmp_path):
    class RunsCode:
        def __reduce__(self):
            return (print, ("this would run on load",))

    path = tmp_path / "reduce.pt"
    path.write_bytes(pickle.dumps({"model": RunsCode()}))
    with pytest.raises(CheckpointError,
                       match=r"reduce\.pt: refusing to load: its pickle needs code execution \(builtins\.print\)"):
        load_prismatic_checkpoint(path)


@pytest.mark.parametrize("group", ["projector", "llm_backbone"])
def test_checkpoint_missing_a_group(tmp_path, original, group):
    broken = _copy(original)
    del broken[group]
    path = tmp_path / "partial.pt"
    torch.save({"model": broken}, path)
    with pytest.raises(CheckpointError, match=rf"partial\.pt: missing '{group}' in checkpoint\['model'\]"):
        load_prismatic_checkpoint(path)


def test_checkpoint_that_is_not_a_dict_of_state_dicts(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list\.pt: expected a dict with a 'model' entry, got list"):
        load_prismatic_checkpoint(tmp_path / "list.pt")
    torch.save({"model": {"projector": {"w": 3}, "llm_backbone": {}}}, tmp_path / "nontensor.pt")
    with pytest.raises(CheckpointError, match=r"nontensor\.pt: projector/w is a int, not a tensor"):
        load_prismatic_checkpoint(tmp_path / "nontensor.pt")


def test_shape_mismatch_names_the_key_and_both_shapes(original, config):
    broken = _copy(original)
    broken["projector"]["mlp_projector.0.weight"] = torch.zeros(64, 32)
    with pytest.raises(CheckpointError, match=r"projector/mlp_projector\.0\.weight -> model\.multi_modal_projector"
                                              r"\.linear_1\.weight: checkpoint \[64, 32\] vs model \[64, 24\]"):
        convert_state_dict(broken, config)


def test_grid_mismatch_in_the_vision_tower(original, config):
    broken = _copy(original)
    broken["vision_backbone"]["featurizer.pos_embed"] = torch.zeros(1, 196, 24)
    with pytest.raises(CheckpointError, match=r"vision_backbone/featurizer\.pos_embed -> model\.vision_tower\."
                                              r"embeddings\.position_embedding\.weight: "
                                              r"checkpoint \[196, 24\] vs model \[729, 24\]"):
        convert_state_dict(broken, config)


def test_missing_and_unexpected_keys_are_listed(original, config):
    broken = _copy(original)
    del broken["llm_backbone"]["llm.model.layers.1.post_attention_layernorm.weight"]
    del broken["vision_backbone"]["featurizer.blocks.2.norm2.bias"]
    broken["projector"]["mlp_projector.4.weight"] = torch.zeros(64, 64)
    broken["vision_backbone"]["featurizer.cls_token"] = torch.zeros(1, 1, 24)
    with pytest.raises(CheckpointError) as error:
        convert_state_dict(broken, config)
    message = str(error.value)
    assert "missing weights [model.language_model.layers.1.post_attention_layernorm.weight, " \
           "model.vision_tower.encoder.layers.2.layer_norm2.bias] (2 keys)" in message
    assert "unexpected weights (no place in the model) [projector/mlp_projector.4.weight, " \
           "vision_backbone/featurizer.cls_token] (2 keys)" in message


def test_missing_vision_without_a_source_says_what_to_pass(original, config):
    broken = _copy(original)
    del broken["vision_backbone"]
    with pytest.raises(CheckpointError, match=r"missing weights \[model\.vision_tower\..*no 'vision_backbone'.*"
                                              r"--vision-weights"):
        convert_state_dict(broken, config)


def test_incomplete_fused_tensors(original, config):
    broken = _copy(original)
    del broken["vision_backbone"]["featurizer.attn_pool.kv.weight"]
    with pytest.raises(ValueError, match=r"vision head: attn_pool\.kv\.weight is missing"):
        convert_state_dict(broken, config)
    broken = _copy(original)
    broken["vision_backbone"]["featurizer.blocks.0.attn.qkv.weight"] = torch.zeros(71, 24)
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.qkv\.weight': fused qkv must have 3\*dim rows"):
        convert_state_dict(broken, config)


@pytest.mark.parametrize("arch, expected", [("no-align+avgpool", 144), ("full-align+729-avgpool", 729),
                                            ("full-align+576-avgpool", 576)])
def test_arch_specifier_token_counts(arch, expected):
    assert num_image_tokens_from_arch_specifier(arch) == expected


@pytest.mark.parametrize("arch", ["gelu-mlp", "no-align+fused-gelu-mlp", "linear"])
def test_other_projectors_are_refused(arch):
    with pytest.raises(ValueError, match=re.escape(f"arch_specifier '{arch}' does not use the average-pool")):
        num_image_tokens_from_arch_specifier(arch)


def test_token_count_outside_the_patch_grid(config):
    with pytest.raises(ValueError, match=r"num_image_tokens=900 .*exceeds the vision patch grid 27x27"):
        config_from_run(run_config("full-align+900-avgpool")["model"], config)


def test_other_backbones_need_a_base_config():
    run = run_config("no-align+avgpool")["model"] | {"llm_backbone_id": "llama2-7b-pure"}
    with pytest.raises(CheckpointError, match=r"llm_backbone_id='llama2-7b-pure'.*Pass --base-config"):
        config_from_run(run)
    released = config_from_run(run_config("full-align+729-avgpool")["model"])
    assert released.num_image_tokens == 729 and released.text_config.hidden_size == 1536


def test_cli_reports_errors_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(run_config("no-align+avgpool")))
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 64)
    code = main(["--checkpoint", str(tmp_path / "bad.pt"), "--config", str(tmp_path / "config.json"),
                 "--output", str(tmp_path / "out")])
    assert code == 2
    message = capsys.readouterr().err
    assert "bad.pt is not a readable PyTorch checkpoint (UnpicklingError: Unsupported operand 0)" in message
    (tmp_path / "broken.json").write_text("{not json")
    code = main(["--checkpoint", str(tmp_path / "bad.pt"), "--config", str(tmp_path / "broken.json"),
                 "--output", str(tmp_path / "out")])
    assert code == 2 and "broken.json is not a readable JSON file" in capsys.readouterr().err
