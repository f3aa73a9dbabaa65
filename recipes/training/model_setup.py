"""Build the model and processor for a training stage, and choose which modules train.

Three sources (``ModelArguments``): a kit checkpoint (continue, e.g. ``pretrain`` -> ``full``), a SigLIP checkpoint +
a Qwen2 checkpoint with a fresh projector (the paper's start), or a preset config with random weights.
Weights are kept in float32 (master weights); mixed precision is the accelerator's job.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, SiglipVisionModel

from modeling_open_qwen2vl import (
    OpenQwen2VLConfig,
    OpenQwen2VLForConditionalGeneration,
    OpenQwen2VLProcessor,
    build_processor,
)
from modeling_open_qwen2vl.configuration_open_qwen2vl import BOS_TOKEN_ID

from .arguments import ModelArguments

logger = logging.getLogger(__name__)

# Module names (under model.model) that train in each stage; the LM head is tied to the LM's embeddings.
STAGE_TRAINABLE = {
    "projector": ("multi_modal_projector",),
    "pretrain": ("multi_modal_projector", "language_model"),
    "full": ("multi_modal_projector", "language_model", "vision_tower"),
}


def _vision_config(source: str, hidden_act: str):
    config = AutoConfig.from_pretrained(source)
    if getattr(config, "model_type", None) == "siglip":  # a full SigLIP (text + vision) checkpoint
        config = config.vision_config
    if getattr(config, "model_type", None) != "siglip_vision_model":
        raise ValueError(f"{source} is not a SigLIP checkpoint (model_type {config.model_type!r})")
    config.hidden_act = hidden_act
    config.vision_use_head = False  # the attention-pool head is unused by the VLM
    return config


def _from_parts(args: ModelArguments) -> OpenQwen2VLForConditionalGeneration:
    vision_config = _vision_config(args.vision_model_name_or_path, args.vision_hidden_act or "gelu")
    text_config = AutoConfig.from_pretrained(args.text_model_name_or_path)
    if text_config.model_type != "qwen2":
        raise ValueError(f"{args.text_model_name_or_path} is not a Qwen2 checkpoint ({text_config.model_type!r})")
    text_config.bos_token_id = BOS_TOKEN_ID  # the kit processor's "<s>", as in the presets (Qwen's config: 151643)
    config = OpenQwen2VLConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        num_image_tokens=args.num_image_tokens,
        vision_feature_layer=args.vision_feature_layer,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    torch.manual_seed(args.init_seed)
    model = OpenQwen2VLForConditionalGeneration(config)
    vision = SiglipVisionModel.from_pretrained(args.vision_model_name_or_path, config=vision_config,
                                               dtype=torch.float32)
    _load_exact(model.model.vision_tower, vision.state_dict(), args.vision_model_name_or_path, skip_prefix="head.")
    del vision
    text = AutoModelForCausalLM.from_pretrained(args.text_model_name_or_path, dtype=torch.float32)
    _load_exact(model.model.language_model, text.model.state_dict(), args.text_model_name_or_path)
    if not config.tie_word_embeddings:
        model.lm_head.load_state_dict(text.lm_head.state_dict())
    del text
    return model


def _load_exact(module: nn.Module, state_dict: dict, source: str, skip_prefix: str | None = None) -> None:
    if skip_prefix:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(skip_prefix)}
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights of {source} do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")


def apply_config_overrides(config: OpenQwen2VLConfig, args: ModelArguments, source: str | None = None) -> None:
    """The model arguments that are config changes without weights, applied to any source's config the same way:
    ``num_image_tokens`` (pooling), ``vision_feature_layer`` (which hidden state) and, when set,
    ``vision_hidden_act``. ``source``: a loaded checkpoint, whose changed values are logged."""
    overrides = {"num_image_tokens": args.num_image_tokens, "vision_feature_layer": args.vision_feature_layer}
    for name, value in overrides.items():
        if source is not None and getattr(config, name) != value:
            logger.info("%s %s -> %s (a config change of %s: no weights depend on it)", name, getattr(config, name),
                        value, source)
        setattr(config, name, value)
    if args.vision_hidden_act is not None:
        if source is not None and config.vision_config.hidden_act != args.vision_hidden_act:
            logger.info("vision_hidden_act %s -> %s (a config change of %s)", config.vision_config.hidden_act,
                        args.vision_hidden_act, source)
        config.vision_config.hidden_act = args.vision_hidden_act
    config._validate_open_qwen2vl()


def build_model(args: ModelArguments) -> OpenQwen2VLForConditionalGeneration:
    """The model in float32, ready for a training stage (``use_cache`` off)."""
    if args.model_name_or_path is not None:
        # Overrides go into the config before the modules are built (an activation is fixed at construction).
        config = OpenQwen2VLConfig.from_pretrained(args.model_name_or_path)
        apply_config_overrides(config, args, source=args.model_name_or_path)
        model = OpenQwen2VLForConditionalGeneration.from_pretrained(
            args.model_name_or_path, config=config, dtype=torch.float32, attn_implementation=args.attn_implementation
        )
    elif args.model_preset is not None:
        preset = getattr(OpenQwen2VLConfig, args.model_preset)
        config = preset(num_image_tokens=args.num_image_tokens, **args.preset_kwargs)
        apply_config_overrides(config, args)
        torch.manual_seed(args.init_seed)
        model = OpenQwen2VLForConditionalGeneration(config)
    else:
        model = _from_parts(args)
    if args.model_name_or_path is None:
        model.set_attn_implementation(args.attn_implementation)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    return model.float()


def build_training_processor(args: ModelArguments, model: OpenQwen2VLForConditionalGeneration) -> OpenQwen2VLProcessor:
    """The processor matching the model (image size, token count); a kit checkpoint's own processor if it has one."""
    if args.model_name_or_path is not None and args.tokenizer_name_or_path is None:
        try:
            processor = OpenQwen2VLProcessor.from_pretrained(args.model_name_or_path)
        except (OSError, ValueError, TypeError):
            processor = None
        if processor is not None:
            processor.num_image_tokens = model.config.num_image_tokens
            return processor
    return build_processor(model.config, tokenizer_source=args.tokenizer_name_or_path)


# A vision-tower module past the feature layer: encoder layer k (the index is checked against the depth read), the
# post-layernorm or the pooling head; matched on qualified names, so peft's wrapped copies match too.
_VISION_MODULE = re.compile(r"(^|\.)vision_tower\.(.*\.)?(encoder\.layers\.(?P<layer>\d+)|post_layernorm|head)$")


def freeze_unread_vision_parameters(model: nn.Module) -> int:
    """Freeze the vision tower's modules the model never runs: the encoder layers after ``vision_feature_layer``, the
    post-layernorm and the pooling head. Trainable, they would get no gradient: data-parallel training (DDP) stops at
    the second step waiting for it, and the optimizer would carry state for weights that cannot change. Works on a
    peft-wrapped model too (its copies of the tower). Returns the number of parameters frozen."""
    depth = model.config.vision_layers_run()  # layers [0, depth) produce the features; the model's own count
    frozen = 0
    for name, module in model.named_modules():
        match = _VISION_MODULE.search(name)
        if match is None or (match["layer"] is not None and int(match["layer"]) < depth):
            continue
        for param in module.parameters():
            if param.requires_grad:
                param.requires_grad_(False)
                frozen += param.numel()
    return frozen


def apply_stage(model: OpenQwen2VLForConditionalGeneration, stage: str) -> dict[str, int]:
    """Freeze everything but the stage's modules (and, in a stage that trains the vision tower, its modules the model
    never runs); returns parameter counts {trainable, frozen}."""
    if stage not in STAGE_TRAINABLE:
        raise ValueError(f"unknown stage {stage!r}; expected one of {list(STAGE_TRAINABLE)}")
    model.requires_grad_(False)
    for name in STAGE_TRAINABLE[stage]:
        getattr(model.model, name).requires_grad_(True)
    freeze_unread_vision_parameters(model)
    # The LM head is tied to the input embeddings; untied, it trains with the language model.
    model.lm_head.requires_grad_("language_model" in STAGE_TRAINABLE[stage])
    seen, counts = set(), {"trainable": 0, "frozen": 0}
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        counts["trainable" if param.requires_grad else "frozen"] += param.numel()
    return counts


def enable_activation_checkpointing(model: OpenQwen2VLForConditionalGeneration) -> None:
    """Non-reentrant recomputation of every decoder/encoder layer (the FSDP path uses accelerate's own)."""
    if hasattr(model, "activation_checkpointing_enable"):  # the transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_layers(model: nn.Module, layer_class_names: tuple[str, ...]) -> int:
    """``torch.compile`` each layer of the given classes in place; returns how many.

    In place (``module.compile()``) rather than ``torch.compile(module)``: parameter names stay the same (checkpoints
    load either way) and the hooks ``fully_shard`` installs later still run, as in accelerate's
    ``compile_regions_fsdp2``. Only the repeated layers: the output embedding stays eager, because the pretraining
    loss takes its input through a forward pre-hook added per micro-batch (compiled, that would recompile each time).
    """
    layers = [m for m in model.modules() if type(m).__name__ in layer_class_names]
    for layer in layers:
        layer.compile()
    return len(layers)


__all__ = ["STAGE_TRAINABLE", "apply_config_overrides", "apply_stage", "build_model", "build_training_processor",
           "compile_layers", "enable_activation_checkpointing", "freeze_unread_vision_parameters"]
