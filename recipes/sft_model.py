"""Model side of the SFT recipe: load (or build) the model and processor, choose what trains, LoRA on the LM only.

Going from the 144-token pretrained checkpoint to 729-token SFT is a config change: the checkpoint is loaded with
``num_image_tokens=729`` (the projector pools to a finer grid with the same weights) and the processor is told to
write 729 placeholders per image.
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from modeling_open_qwen2vl import (
    OpenQwen2VLConfig,
    OpenQwen2VLForConditionalGeneration,
    build_processor,
    chat_templates,
)
from recipes.training.model_setup import freeze_unread_vision_parameters

logger = logging.getLogger(__name__)

PRESETS = {"tiny": OpenQwen2VLConfig.tiny, "open_qwen2vl_2b": OpenQwen2VLConfig.open_qwen2vl_2b}
LM_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Never wrapped by LoRA: the modules quantized QLoRA must leave in full precision (trainable or tiny).
KEEP_FULL_PRECISION = ["vision_tower", "multi_modal_projector", "lm_head"]


def load_model_and_processor(
    model_name_or_path: str | None,
    init_from_preset: str | None = None,
    num_image_tokens: int | None = None,
    chat_format: str = "chatml",
    trust_remote_code: bool = False,
    dtype: str | None = None,
    attn_implementation: str | None = None,
    quantization_config=None,
    seed: int = 0,
    revision: str | None = None,
):
    """The model and a processor that agree on ``num_image_tokens`` and default to ``chat_format``.

    ``model_name_or_path`` (an HF folder or hub id of an Open-Qwen2VL checkpoint, at ``revision`` for a hub id)
    wins; otherwise a randomly initialised preset (``tiny`` or ``open_qwen2vl_2b``) is built, for smoke tests.
    """
    if revision not in (None, "main") and not (model_name_or_path and not os.path.isdir(model_name_or_path)):
        # transformers ignores a revision for a local folder: refuse it rather than train on something else
        raise ValueError(f"model_revision={revision!r} selects a version of a hub model, but "
                         f"{model_name_or_path or 'a preset'} is not one (a local folder has no revisions)")
    if model_name_or_path:
        overrides = {"num_image_tokens": num_image_tokens} if num_image_tokens else {}
        config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code,
                                            revision=revision, **overrides)
        kwargs = {"config": config, "trust_remote_code": trust_remote_code, "revision": revision}
        if dtype not in (None, "auto"):
            kwargs["dtype"] = getattr(torch, dtype)
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if quantization_config is not None:
            quantization_config.llm_int8_skip_modules = KEEP_FULL_PRECISION
            kwargs["quantization_config"] = quantization_config
        model = AutoModelForImageTextToText.from_pretrained(model_name_or_path, **kwargs)
        try:
            processor = AutoProcessor.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code,
                                                      revision=revision)
        except (OSError, ValueError, TypeError):
            logger.warning("no processor saved with %s; building the kit's processor for its config", model_name_or_path)
            processor = build_processor(model.config, chat_format=chat_format)
    elif init_from_preset:
        if init_from_preset not in PRESETS:
            raise ValueError(f"unknown preset {init_from_preset!r}; expected one of {sorted(PRESETS)}")
        if quantization_config is not None:
            raise ValueError("QLoRA (load_in_4bit/8bit) needs a saved checkpoint in --model_name_or_path")
        config = PRESETS[init_from_preset](**({"num_image_tokens": num_image_tokens} if num_image_tokens else {}))
        torch.manual_seed(seed)
        model = OpenQwen2VLForConditionalGeneration(config)
        if dtype not in (None, "auto"):  # as from_pretrained(dtype=...) does for a saved model
            model.to(getattr(torch, dtype))
        if attn_implementation:
            model.set_attn_implementation(attn_implementation)
        processor = build_processor(model.config, chat_format=chat_format)
    else:
        raise ValueError("set --model_name_or_path (an Open-Qwen2VL checkpoint) or --init_from_preset tiny")
    processor.num_image_tokens = model.config.num_image_tokens
    # The saved processor defaults to the template the model was trained with.
    processor.chat_template = chat_templates(chat_format)
    return model, processor


def set_trainable(model, train_vision: bool = False) -> dict[str, int]:
    """Full fine-tuning of projector + language model; the SigLIP tower only with ``train_vision``.

    Returns trainable parameter counts per part (for the log).
    """
    model.requires_grad_(True)
    model.model.vision_tower.requires_grad_(train_vision)
    freeze_unread_vision_parameters(model)  # the tower's layers past the feature layer get no gradient
    return trainable_counts(model)


def trainable_counts(model) -> dict[str, int]:
    parts = {"vision_tower": 0, "multi_modal_projector": 0, "language_model": 0, "other": 0}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = next((p for p in parts if f".{p}." in f".{name}"), "other")
        parts[part] += param.numel()
    return parts


def language_model_lora_pattern(target_modules: list[str] | str | None = None) -> str:
    """A regex (matched by PEFT with ``re.fullmatch``) selecting linears of the Qwen2 decoder layers only.

    ``target_modules`` are module names such as ``q_proj``; ``None`` or ``["all-linear"]`` means every projection of
    attention and MLP. The pattern is anchored on ``model.language_model.layers`` so it cannot match the SigLIP
    tower, whose attention also has ``q_proj``/``k_proj``/``v_proj``.
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    names = list(target_modules or LM_LINEAR_MODULES)
    if names == ["all-linear"]:
        names = list(LM_LINEAR_MODULES)
    bad = [n for n in names if not n.replace("_", "").isalnum()]
    if bad:
        raise ValueError(f"lora_target_modules must be plain module names (e.g. q_proj), got {bad}")
    return r"model\.language_model\.layers\.\d+\.(?:self_attn|mlp)\.(?:" + "|".join(names) + r")"


def build_lora_config(
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: list[str] | None = None,
    modules_to_save: list[str] | None = None,
    train_vision: bool = False,
    use_rslora: bool = False,
    use_dora: bool = False,
    tied_embeddings: bool = False,
    task_type: str = "CAUSAL_LM",
):
    """LoRA on the language model; the projector (and, with ``train_vision``, the tower) trains fully.

    ``modules_to_save`` (e.g. ``["lm_head"]``) are trained fully in addition to those: the projector and, with
    ``train_vision``, the tower are added to the list when it lacks them (logged).

    With ``tied_embeddings`` (the model's input embeddings and LM head share one matrix), an ``lm_head`` or
    ``embed_tokens`` module to save trains that one shared matrix, as full fine-tuning would, instead of splitting it
    into a trained copy and a frozen one (peft's ``ensure_weight_tying``).
    """
    from peft import LoraConfig

    if str(task_type).upper() != "CAUSAL_LM":
        raise ValueError(f"lora_task_type={task_type!r}: SFT trains the model as a causal LM (generation), so only "
                         "CAUSAL_LM applies")
    required = ["multi_modal_projector"] + (["vision_tower"] if train_vision else [])
    given = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save or [])
    # peft matches a name as the suffix of a module path, so "model.multi_modal_projector" covers the projector
    added = [name for name in required if not any(n.split(".")[-1] == name for n in given)]
    if given and added:
        logger.info("lora_modules_to_save %s: also training %s fully (the projector always trains, the vision tower "
                    "with --train_vision)", given, added)
    modules_to_save = added + given
    adapts_embeddings = any(name.split(".")[-1] in ("lm_head", "embed_tokens") for name in modules_to_save)
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=language_model_lora_pattern(target_modules),
        modules_to_save=modules_to_save or None,
        bias="none",
        task_type="CAUSAL_LM",
        use_rslora=use_rslora,
        use_dora=use_dora,
        ensure_weight_tying=tied_embeddings and adapts_embeddings,
    )
