"""Pretraining configuration: YAML + command-line overrides, unknown keys and bad values rejected up front."""

import re
from pathlib import Path

import pytest
import yaml

from recipes.training.arguments import parse_pretrain_args

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "recipes" / "configs"


def _write(tmp_path, content: dict) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(content))
    return str(path)


def test_yaml_values_and_command_line_overrides(tmp_path):
    config = _write(tmp_path, {"model_preset": "tiny", "num_image_tokens": 16, "dataset_name_or_path": "corpus",
                               "learning_rate": "3.0e-4", "gradient_accumulation_steps": 4, "stage": "full"})
    model_args, data_args, args = parse_pretrain_args(
        ["--config", config, "--learning_rate", "1e-3", "--attention", "isolated", "--resume"]
    )
    assert model_args.model_preset == "tiny" and model_args.num_image_tokens == 16
    assert args.learning_rate == pytest.approx(1e-3)  # the command line wins over the file
    assert args.gradient_accumulation_steps == 4 and args.stage == "full"  # the file wins over defaults
    assert data_args.attention == "isolated" and args.resume is True


def test_lists_nulls_and_bare_flags_on_the_command_line_and_in_yaml(tmp_path):
    config = _write(tmp_path, {"model_preset": "tiny", "dataset_name_or_path": "corpus", "report_to": ["tensorboard"],
                               "mixed_precision": "bf16", "dataset_config_name": "packed_144"})
    _, data_args, args = parse_pretrain_args(["--config", config])
    assert args.trackers == ["tensorboard"] and args.mixed_precision == "bf16"  # a YAML list, as TRL configs write
    _, data_args, args = parse_pretrain_args(
        ["--config", config, "--report_to", "tensorboard", "trackio", "--mixed_precision", "None",
         "--dataset_config_name", "null", "--adam_fused"]
    )
    assert args.trackers == ["tensorboard", "trackio"]
    assert args.mixed_precision is None and data_args.dataset_config_name is None  # the file's values undone
    assert args.adam_fused is True  # a bare flag, like every other boolean
    _, _, args = parse_pretrain_args(["--config", config, "--adam_fused", "false", "--report_to", "none"])
    assert args.adam_fused is False and args.trackers == []


def test_preset_kwargs_accept_a_yaml_mapping(tmp_path):
    config = _write(tmp_path, {"model_preset": "tiny", "model_preset_kwargs": {"hidden_size": 32},
                               "dataset_name_or_path": "corpus"})
    model_args, _, _ = parse_pretrain_args(["--config", config])
    assert model_args.preset_kwargs == {"hidden_size": 32}


def test_unknown_key_in_yaml_names_it_and_suggests(tmp_path):
    config = _write(tmp_path, {"model_preset": "tiny", "dataset_name_or_path": "c", "learning_rat": 1e-3})
    with pytest.raises(ValueError, match=r"unknown configuration key.*'learning_rat'.*did you mean learning_rate"):
        parse_pretrain_args(["--config", config])


def test_unknown_key_on_command_line_names_it(tmp_path):
    config = _write(tmp_path, {"model_preset": "tiny", "dataset_name_or_path": "c"})
    with pytest.raises(ValueError, match=r"on the command line.*--warmup_ration.*did you mean warmup_ratio"):
        parse_pretrain_args(["--config", config, "--warmup_ration", "0.1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ({"stage": "everything"}, r"stage='everything' is not one of"),
        ({"attention": "leaky"}, r"attention='leaky' is not one of"),
        ({"loss_reduction": "mean"}, r"loss_reduction='mean' is not one of"),
        ({"num_image_tokens": 150}, r"num_image_tokens=150 must be a positive perfect square"),
        ({"warmup_ratio": 1.5}, r"warmup_ratio=1.5 must be in \[0, 1\)"),
        ({"report_to": "wandb"}, r"report_to='wandb' is not one of"),
        ({"streaming": True, "dataloader_num_workers": 2}, r"dataloader_num_workers > 0 is not supported"),
        ({"text_model_name_or_path": "Qwen/Qwen2.5-1.5B-Instruct"}, r"choose exactly one model source"),
    ],
)
def test_bad_values_are_rejected(tmp_path, override, message):
    config = _write(tmp_path, {"model_preset": "tiny", "dataset_name_or_path": "c", **override})
    with pytest.raises(ValueError, match=message):
        parse_pretrain_args(["--config", config])


def test_missing_config_file_and_missing_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_pretrain_args(["--config", str(tmp_path / "nope.yaml")])
    config = _write(tmp_path, {"model_preset": "tiny"})
    with pytest.raises(ValueError, match="dataset_name_or_path is required"):
        parse_pretrain_args(["--config", config])


def test_shipped_configs_parse_with_a_dataset_override():
    files = sorted(CONFIGS.glob("pretrain_*.yaml"))
    assert {f.name for f in files} >= {"pretrain_tiny.yaml", "pretrain_open_qwen2vl_2b.yaml"}
    for path in files:
        parse_pretrain_args(["--config", str(path), "--dataset_name_or_path", "some/corpus"])


def test_paper_config_matches_the_paper_run():
    model_args, data_args, args = parse_pretrain_args(
        ["--config", str(CONFIGS / "pretrain_open_qwen2vl_2b.yaml"), "--dataset_name_or_path", "corpus"]
    )
    assert model_args.vision_model_name_or_path == "google/siglip-so400m-patch14-384"
    assert model_args.text_model_name_or_path == "Qwen/Qwen2.5-1.5B-Instruct"
    assert model_args.num_image_tokens == 144 and model_args.vision_feature_layer == -2
    assert model_args.vision_hidden_act == "gelu"
    assert data_args.max_length == 4096 and data_args.attention == "faithful"
    assert args.stage == "pretrain" and args.learning_rate == pytest.approx(5e-5)
    assert args.weight_decay == pytest.approx(0.01) and args.lr_scheduler_type == "cosine"
    assert args.warmup_ratio == pytest.approx(0.03) and args.max_grad_norm == pytest.approx(1.0)
    assert args.mixed_precision == "bf16" and args.num_train_epochs == 1 and args.max_steps == -1


def test_abbreviated_keys_are_not_guessed(tmp_path):
    config = _write(tmp_path, {"model_preset": "tiny", "dataset_name_or_path": "c"})
    with pytest.raises(ValueError, match=r"'--num_train_epoch'.*did you mean num_train_epochs"):
        parse_pretrain_args(["--config", config, "--num_train_epoch", "2"])


def test_a_model_source_on_the_command_line_replaces_the_files(tmp_path):
    tiny = str(CONFIGS / "pretrain_tiny.yaml")
    model_args, _, _ = parse_pretrain_args(["--config", tiny, "--dataset_name_or_path", "c",
                                            "--model_name_or_path", "runs/pretrain/final_model"])
    assert model_args.model_name_or_path == "runs/pretrain/final_model"
    assert model_args.model_preset is None and model_args.preset_kwargs == {}
    paper = str(CONFIGS / "pretrain_open_qwen2vl_2b.yaml")
    model_args, _, _ = parse_pretrain_args([f"--config={paper}", "--dataset_name_or_path", "c",
                                            "--model_preset", "tiny"])
    assert model_args.model_preset == "tiny"
    assert model_args.vision_model_name_or_path is None and model_args.text_model_name_or_path is None
    # Two sources on the command line itself are still an error.
    with pytest.raises(ValueError, match="choose exactly one model source"):
        parse_pretrain_args(["--config", tiny, "--dataset_name_or_path", "c", "--model_name_or_path", "m",
                             "--model_preset", "tiny"])


@pytest.mark.parametrize("preset, kwargs, unknown", [
    ("tiny", {"hiden_size": 128}, "['hiden_size']"),  # misspelt
    ("open_qwen2vl_2b", {"num_hidden_layers": 2}, "['num_hidden_layers']"),  # the 2B preset takes no widths
])
def test_preset_kwargs_the_preset_does_not_take_are_named(tmp_path, preset, kwargs, unknown):
    config = _write(tmp_path, {"model_preset": preset, "model_preset_kwargs": kwargs, "dataset_name_or_path": "c"})
    with pytest.raises(ValueError, match=rf"model_preset_kwargs: {re.escape(unknown)} not accepted by the "
                                         rf"'{preset}' preset; valid keys: \["):
        parse_pretrain_args(["--config", config])
    elsewhere = _write(tmp_path, {"model_name_or_path": "m", "model_preset_kwargs": {"hidden_size": 8},
                                  "dataset_name_or_path": "c"})
    with pytest.raises(ValueError, match="model_preset_kwargs is set but the model does not come from a model_preset"):
        parse_pretrain_args(["--config", elsewhere])


def test_help_names_the_config_file_option(capsys):
    with pytest.raises(SystemExit):
        parse_pretrain_args(["--help"])
    assert "--config PATH (or --config=PATH) reads a YAML file" in capsys.readouterr().out
