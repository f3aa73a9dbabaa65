"""The export back: a kit folder -> a prismatic run directory (``.pt`` checkpoint + ``config.json``).

The original ``prismatic.load(run_dir)`` reads only ``.pt`` files, so that is what is written. Kit-only, not copied
into checkpoints.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .configuration_open_qwen2vl import OpenQwen2VLConfig
from .conversion_config import is_released_architecture
from .conversion_errors import CheckpointError
from .hf_folder import check_output_folder, staged_output
from .original_checkpoint import read_prismatic_run_file
from .prismatic_layout import arch_specifier_for
from .weight_mapping import convert_to_prismatic

logger = logging.getLogger(__name__)


def load_hf_folder_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved transformers folder, from the files ``from_pretrained`` would read.

    Like transformers, ``model.safetensors`` wins over ``model.safetensors.index.json`` when a folder has both
    (a leftover of an earlier save), so the export is the model that loads.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        if index.is_file():
            logger.warning("%s has model.safetensors and %s: reading model.safetensors, as from_pretrained does",
                           folder, index.name)
        files = ["model.safetensors"]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{index} is not a safetensors index ({type(error).__name__}: {error})") from error
        absent = [name for name in files if not (folder / name).is_file()]
        if absent:
            raise CheckpointError(f"{index} names shards that are not in {folder}: {absent}")
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(folder / name))
    return state


def read_run_config_template(path: str | Path) -> dict:
    """A prismatic run config (its ``config.json`` or folder) to fill in: a JSON object with a ``model`` object."""
    return read_prismatic_run_file(path)[1]


def export_to_prismatic(
    model_dir: str | Path,
    output: str | Path,
    *,
    run_config_template: str | Path | None = None,
    include_vision_backbone: bool = True,
    model_id: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``output/checkpoints/latest-checkpoint.pt`` and ``output/config.json`` for the original ``load()``.

    The ``config.json`` is ``run_config_template`` (a prismatic run config) with ``arch_specifier`` set from the
    model's ``num_image_tokens``, or a minimal one naming the released backbones. ``output`` must not be (or contain)
    ``model_dir`` or the template; a folder already holding model files needs ``overwrite``, which replaces all of them
    (``hf_folder.check_output_folder``). All inputs are checked before anything is written, and an interrupted export
    leaves ``output`` as it was.
    """
    output = Path(output)
    check_output_folder(output, [model_dir, run_config_template], overwrite=overwrite)
    try:
        config = OpenQwen2VLConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as error:  # no such folder, no config.json, another model_type
        raise CheckpointError(f"cannot read the kit folder {str(model_dir)!r} (--to-prismatic): {error}") from error
    if run_config_template is None and not is_released_architecture(config):
        raise CheckpointError(
            f"{model_dir} is not the released architecture (SigLIP-SO400M/14@384 + Qwen2.5-1.5B), so the default run "
            "config naming those backbones would make the original load() build the wrong modules; pass the run's "
            "config.json with --config (run_config_template)"
        )
    run = read_run_config_template(run_config_template) if run_config_template is not None else None
    state = load_hf_folder_state_dict(model_dir)
    original = convert_to_prismatic(state, config, include_vision_backbone=include_vision_backbone)
    if run is None:
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
    # Written beside `output` and moved there complete; --overwrite replaces every file of the model there (an HF
    # model left beside the run would still load, its README.md would describe another model).
    with staged_output(output, overwrite=overwrite) as folder:
        (folder / "checkpoints").mkdir()
        torch.save({"model": original}, folder / "checkpoints" / "latest-checkpoint.pt")
        (folder / "config.json").write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    return output
