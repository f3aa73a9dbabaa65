"""The kit config of a converted checkpoint: the released preset, adjusted to what the prismatic run and weights say.

Kit-only, not copied into checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from .configuration_open_qwen2vl import OpenQwen2VLConfig
from .conversion_errors import CheckpointError
from .modeling_open_qwen2vl import OpenQwen2VLForConditionalGeneration
from .prismatic_layout import num_image_tokens_from_arch_specifier

logger = logging.getLogger(__name__)

# Backbone ids of the released runs (prismatic registry names) -> the kit preset that reproduces them.
RELEASED_VISION_BACKBONES = {"siglip-vit-so400m-384px"}
RELEASED_LLM_BACKBONES = {"qwen2.5-1.5b-instruct", "qwen2.5-1.5b"}


def derive_config(
    base: OpenQwen2VLConfig,
    *,
    num_image_tokens: int | None = None,
    vision_use_head: bool | None = None,
    tie_word_embeddings: bool | None = None,
) -> OpenQwen2VLConfig:
    """A copy of ``base`` with the given fields changed (validated again)."""
    data = base.to_dict()
    if num_image_tokens is not None:
        data["num_image_tokens"] = num_image_tokens
    if vision_use_head is not None:
        data["vision_config"]["vision_use_head"] = vision_use_head
    if tie_word_embeddings is not None:
        data["tie_word_embeddings"] = tie_word_embeddings
        data["text_config"]["tie_word_embeddings"] = tie_word_embeddings
    return OpenQwen2VLConfig.from_dict(data)


def config_from_run(
    run_config: Mapping, base_config: str | Path | OpenQwen2VLConfig | None = None
) -> OpenQwen2VLConfig:
    """The kit config of a prismatic run: ``num_image_tokens`` from ``arch_specifier``, architecture from the preset.

    ``base_config`` (an ``OpenQwen2VLConfig``, a folder or a config.json) replaces the released architecture, for
    runs with other backbones; without it the backbone ids must be the released ones.
    """
    try:
        num_image_tokens = num_image_tokens_from_arch_specifier(str(run_config["arch_specifier"]))
    except ValueError as error:  # another projector (gelu-mlp, linear...): not an Open-Qwen2VL model
        raise CheckpointError(f"run config: {error}") from error
    if base_config is None:
        vision_id, llm_id = run_config.get("vision_backbone_id"), run_config.get("llm_backbone_id")
        if vision_id not in RELEASED_VISION_BACKBONES or llm_id not in RELEASED_LLM_BACKBONES:
            raise CheckpointError(
                f"run config has vision_backbone_id={vision_id!r}, llm_backbone_id={llm_id!r}; the built-in "
                f"architecture is Open-Qwen2VL's ({sorted(RELEASED_VISION_BACKBONES)} + "
                f"{sorted(RELEASED_LLM_BACKBONES)}). Pass --base-config with an OpenQwen2VLConfig for other backbones."
            )
        base = OpenQwen2VLConfig.open_qwen2vl_2b()
    elif isinstance(base_config, OpenQwen2VLConfig):
        base = base_config
    else:
        try:
            base = OpenQwen2VLConfig.from_pretrained(base_config)
        except (OSError, ValueError) as error:  # missing folder, not a config.json, another model_type
            raise CheckpointError(f"cannot read --base-config {str(base_config)!r}: {error}") from error
    if run_config.get("image_resize_strategy", "resize-naive") != "resize-naive":
        logger.warning(
            "run config uses image_resize_strategy=%r; the kit's processor squashes images (resize-naive)",
            run_config["image_resize_strategy"],
        )
    try:
        return derive_config(base, num_image_tokens=num_image_tokens)
    except ValueError as error:  # e.g. more tokens than the vision patch grid has
        raise CheckpointError(f"run config arch_specifier {run_config['arch_specifier']!r}: {error}") from error


def expected_state_dict_shapes(config: OpenQwen2VLConfig) -> dict[str, torch.Size]:
    """Key -> shape of ``OpenQwen2VLForConditionalGeneration(config).state_dict()``, built on the meta device."""
    with torch.device("meta"):
        model = OpenQwen2VLForConditionalGeneration(config)
    return {key: tensor.shape for key, tensor in model.state_dict().items()}


def is_released_architecture(config: OpenQwen2VLConfig) -> bool:
    """Whether the towers have the shapes of the released backbones (what the default run config names)."""
    released = OpenQwen2VLConfig.open_qwen2vl_2b()
    fields = {"vision_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "image_size", "patch_size"),
              "text_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "num_key_value_heads", "vocab_size")}
    return all(getattr(getattr(config, tower), name) == getattr(getattr(released, tower), name)
               for tower, names in fields.items() for name in names)
