"""The export back: a kit folder -> a prismatic run directory (``.pt`` checkpoint + ``config.json``).

The original ``prismatic.load(run_dir)`` reads only ``.pt`` files, so that is what is written. Kit-only, not copied
into checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .configuration_open_qwen2vl import OpenQwen2VLConfig
from .conversion_config import is_released_architecture
from .conversion_errors import CheckpointError
from .prismatic_layout import arch_specifier_for
from .weight_mapping import convert_to_prismatic


def load_hf_folder_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved transformers folder (single or sharded safetensors)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(folder / name))
    return state


def export_to_prismatic(
    model_dir: str | Path,
    output: str | Path,
    *,
    run_config_template: str | Path | None = None,
    include_vision_backbone: bool = True,
    model_id: str | None = None,
) -> Path:
    """Write ``output/checkpoints/latest-checkpoint.pt`` and ``output/config.json`` for the original ``load()``.

    The ``config.json`` is ``run_config_template`` (a prismatic run config) with ``arch_specifier`` set from the
    model's ``num_image_tokens``, or a minimal one naming the released backbones.
    """
    config = OpenQwen2VLConfig.from_pretrained(model_dir)
    if run_config_template is None and not is_released_architecture(config):
        raise CheckpointError(
            f"{model_dir} is not the released architecture (SigLIP-SO400M/14@384 + Qwen2.5-1.5B), so the default run "
            "config naming those backbones would make the original load() build the wrong modules; pass the run's "
            "config.json with --config (run_config_template)"
        )
    state = load_hf_folder_state_dict(model_dir)
    original = convert_to_prismatic(state, config, include_vision_backbone=include_vision_backbone)
    output = Path(output)
    (output / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save({"model": original}, output / "checkpoints" / "latest-checkpoint.pt")
    if run_config_template is not None:
        template = Path(run_config_template)
        run = json.loads((template / "config.json" if template.is_dir() else template).read_text(encoding="utf-8"))
    else:
        run = {
            "model": {
                "type": "one-stage+7b",
                "vision_backbone_id": "siglip-vit-so400m-384px",
                "llm_backbone_id": "qwen2.5-1.5b-instruct",
                "image_resize_strategy": "resize-naive",
                "llm_max_length": 4096,
            },
            "mount_path": "Qwen",
        }
    run["model"]["model_id"] = model_id or run["model"].get("model_id") or Path(model_dir).name
    run["model"]["arch_specifier"] = arch_specifier_for(config.num_image_tokens)
    (output / "config.json").write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    return output
