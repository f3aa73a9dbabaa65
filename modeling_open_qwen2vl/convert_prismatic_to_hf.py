"""Convert released Open-Qwen2VL (prismatic) checkpoints to the kit's transformers format, and back.

Forward (original -> Hugging Face folder)::

    python -m modeling_open_qwen2vl.convert_prismatic_to_hf \\
        --checkpoint Open-Qwen2VL/checkpoints/latest-checkpoint.pt --config Open-Qwen2VL/config.json \\
        --output open-qwen2vl-hf [--vision-weights google/siglip-so400m-patch14-384 | timm.safetensors] \\
        [--tokenizer Qwen/Qwen2.5-1.5B-Instruct] [--dtype auto|float32|bfloat16|float16]

The folder loads with ``AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)`` and
``AutoProcessor.from_pretrained(folder, trust_remote_code=True)``; the processor's default chat template is
``compat`` (the strings the released weights were trained on).

Back (kit folder -> prismatic run directory that the original ``prismatic.load(run_dir)`` reads)::

    python -m modeling_open_qwen2vl.convert_prismatic_to_hf --to-prismatic open-qwen2vl-hf --output run_dir

The checkpoint is read with ``torch.load(..., weights_only=True, mmap=True)`` only, and tensors are renamed or
split as views: conversion holds about one copy of the checkpoint in memory (see ``bench/convert_2b.py``).
The export back writes a ``.pt`` file because that is the only format the original codebase reads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import GenerationConfig

from .configuration_open_qwen2vl import EOS_TOKEN_ID, PAD_TOKEN_ID, OpenQwen2VLConfig
from .factory import build_processor
from .modeling_open_qwen2vl import OpenQwen2VLForConditionalGeneration
from .prismatic_layout import (
    HF_LANGUAGE,
    HF_LM_HEAD,
    HF_PROJECTOR,
    HF_VISION,
    LLM_PREFIX,
    ORIGINAL_LM_HEAD,
    TIMM_PREFIX,
    arch_specifier_for,
    hf_to_projector,
    hf_vision_to_timm,
    is_vision_head_key,
    llm_to_hf,
    num_image_tokens_from_arch_specifier,
    projector_to_hf,
    split_hf_state_dict,
    timm_vision_to_hf,
)

logger = logging.getLogger(__name__)

# Backbone ids of the released runs (prismatic registry names) -> the kit preset that reproduces them.
RELEASED_VISION_BACKBONES = {"siglip-vit-so400m-384px"}
RELEASED_LLM_BACKBONES = {"qwen2.5-1.5b-instruct", "qwen2.5-1.5b"}
# The original's inference defaults: greedy decoding, stop at <|im_end|>; 512 new tokens as in its README call.
GENERATION_DEFAULTS = {"do_sample": False, "num_beams": 1, "max_new_tokens": 512}
_MAX_LISTED_KEYS = 25


class CheckpointError(ValueError):
    """A checkpoint or weight file that cannot be converted; the message names the file and the offending keys."""


# ----------------------------------------------------------------------------------------------- reading inputs


def load_torch_file(path: str | Path) -> dict:
    """``torch.load`` with ``weights_only=True`` (memory-mapped for zip-format files), with errors naming the file.

    Raises ``FileNotFoundError`` for a missing path and ``CheckpointError`` for a file that is not a PyTorch
    checkpoint or whose pickle would need to run code (custom classes, functions).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        # mmap keeps tensors on disk until touched; it needs the zip format (the default since torch 1.6).
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, KeyError... depending on the bytes
        message = str(error)
        unsupported = re.search(r"Unsupported global: (?:GLOBAL )?([^\s]+)", message)
        code = [unsupported.group(1)] if unsupported else _pickle_globals(path)
        if code:
            raise CheckpointError(
                f"{path}: refusing to load: its pickle needs code execution ({', '.join(code[:5])}). Only plain "
                "tensor checkpoints are read (torch.load(weights_only=True)); re-save the state dicts as plain tensors."
            ) from error
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", message)
        detail = detail.group(1).strip() if detail else (message.splitlines()[0] if message else "")
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {detail})"
        ) from error


def _pickle_globals(path: Path) -> list[str]:
    """Names a pickle would import (GLOBAL / STACK_GLOBAL), read with pickletools without running anything.

    Looks at a plain pickle file or the ``data.pkl`` of a zip checkpoint; returns [] when the bytes are no pickle.
    """
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                data = archive.read(names[0]) if names else b""
        else:
            data = path.read_bytes()
        found, strings = [], []
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
                strings.append(arg)
            elif opcode.name == "GLOBAL":
                found.append(arg.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
        return found
    except Exception:  # not a pickle stream: the caller reports an unreadable file
        return []


def load_prismatic_checkpoint(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """The ``["model"]`` dict of a prismatic checkpoint: ``{"projector", "llm_backbone", "vision_backbone"?}``.

    A dict holding those groups directly (no ``"model"`` wrapper) is accepted too.
    """
    checkpoint = load_torch_file(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a dict with a 'model' entry, got {type(checkpoint).__name__}")
    original = checkpoint.get("model", checkpoint)
    if not isinstance(original, dict):
        raise CheckpointError(
            f"{path}: checkpoint['model'] must be a dict of state dicts, got {type(original).__name__}"
        )
    validate_original_groups(original, source=str(path))
    return original


def validate_original_groups(original: Mapping, source: str = "checkpoint") -> None:
    """Require ``projector`` and ``llm_backbone`` (and nothing unknown), each a mapping of tensors."""
    missing = [group for group in ("projector", "llm_backbone") if group not in original]
    if missing:
        raise CheckpointError(
            f"{source}: missing {' and '.join(repr(m) for m in missing)} in checkpoint['model'] (found keys: "
            f"{sorted(map(str, original))}); a prismatic checkpoint holds 'projector', 'llm_backbone' and optionally "
            "'vision_backbone'"
        )
    unknown = sorted(set(map(str, original)) - {"projector", "llm_backbone", "vision_backbone"})
    if unknown:
        raise CheckpointError(f"{source}: unknown checkpoint['model'] entries {unknown}")
    for group, state in original.items():
        if not isinstance(state, Mapping):
            raise CheckpointError(
                f"{source}: checkpoint['model'][{group!r}] is a {type(state).__name__}, not a state dict"
            )
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{source}: {group}/{key} is a {type(value).__name__}, not a tensor")


def read_prismatic_run_config(path: str | Path) -> dict:
    """The ``model`` section of a prismatic run's ``config.json`` (a folder holding it is accepted too)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"prismatic config not found: {path}") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or "arch_specifier" not in model:
        raise CheckpointError(f"{path}: expected a prismatic run config with model.arch_specifier")
    return model


# ------------------------------------------------------------------------------------------- configuration


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
    num_image_tokens = num_image_tokens_from_arch_specifier(run_config["arch_specifier"])
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
        base = OpenQwen2VLConfig.from_pretrained(base_config)
    if run_config.get("image_resize_strategy", "resize-naive") != "resize-naive":
        logger.warning(
            "run config uses image_resize_strategy=%r; the kit's processor squashes images (resize-naive)",
            run_config["image_resize_strategy"],
        )
    return derive_config(base, num_image_tokens=num_image_tokens)


def expected_state_dict_shapes(config: OpenQwen2VLConfig) -> dict[str, torch.Size]:
    """Key -> shape of ``OpenQwen2VLForConditionalGeneration(config).state_dict()``, built on the meta device."""
    with torch.device("meta"):
        model = OpenQwen2VLForConditionalGeneration(config)
    return {key: tensor.shape for key, tensor in model.state_dict().items()}


# ------------------------------------------------------------------------------------------- vision weights


def _strip_timm_prefix(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Keys of the one timm ViT inside ``state`` (prismatic ``featurizer.``, open_clip ``visual.trunk.``, bare...)."""
    marker = "patch_embed.proj.weight"
    prefixes = sorted({key[: -len(marker)] for key in state if key.endswith(marker)})
    if len(prefixes) != 1:
        raise CheckpointError(
            f"{source}: expected exactly one timm ViT (a '...{marker}' key), found prefixes {prefixes or 'none'}"
        )
    prefix = prefixes[0]
    return {key[len(prefix) :]: tensor for key, tensor in state.items() if key.startswith(prefix)}


def load_timm_vision_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A timm SigLIP state dict from ``.safetensors`` or a torch file, converted to SiglipVisionModel keys."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except Exception as error:
            raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error
    else:
        state = load_torch_file(path)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    converted = timm_vision_to_hf(_strip_timm_prefix(state, str(path)))
    if converted.unknown:
        raise CheckpointError(
            f"{path}: timm keys without an equivalent in the vision tower: {_listing(converted.unknown)}"
        )
    return converted.tensors


def load_hf_siglip_vision(source: str | Path, config: OpenQwen2VLConfig) -> dict[str, torch.Tensor]:
    """SiglipVisionModel weights from a transformers SigLIP folder or hub id (full SiglipModel checkpoints work too).

    The architecture must match ``config.vision_config``; the source's activation is ignored because the kit keeps
    the original's exact GELU (HF SigLIP checkpoints declare the tanh approximation).
    """
    from transformers import SiglipVisionModel

    try:
        model, info = SiglipVisionModel.from_pretrained(str(source), dtype="auto", output_loading_info=True)
    except (OSError, ValueError) as error:  # not found offline / on the hub, or not a SigLIP checkpoint
        raise CheckpointError(f"cannot load SigLIP vision weights from {str(source)!r}: {error}") from error
    if info["missing_keys"]:
        raise CheckpointError(
            f"{source}: the SigLIP checkpoint lacks vision weights {_listing(sorted(info['missing_keys']))}; "
            "refusing to use randomly initialised vision weights"
        )
    ours, theirs = config.vision_config, model.config
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
              "patch_size")
    mismatched = {f: (getattr(theirs, f), getattr(ours, f)) for f in fields if getattr(theirs, f) != getattr(ours, f)}
    if mismatched:
        raise CheckpointError(
            f"{source}: SigLIP architecture differs from the model config (theirs, ours): {mismatched}"
        )
    return dict(model.state_dict())


def load_vision_weights(source: str | Path, config: OpenQwen2VLConfig) -> dict[str, torch.Tensor]:
    """Vision tower weights (SiglipVisionModel keys) from a timm file, or a transformers SigLIP folder / hub id."""
    if Path(source).is_file():
        return load_timm_vision_file(source)
    return load_hf_siglip_vision(source, config)


# ------------------------------------------------------------------------------------------- conversion


def _listing(keys, limit: int = _MAX_LISTED_KEYS) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''}] ({len(keys)} keys)"


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    return torch.equal(a, b)


def convert_state_dict(
    original: Mapping[str, Mapping[str, torch.Tensor]],
    config: OpenQwen2VLConfig,
    *,
    vision: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Prismatic ``checkpoint["model"]`` -> the state dict of ``OpenQwen2VLForConditionalGeneration(config)``.

    Args:
        original: ``{"projector": ..., "llm_backbone": ..., "vision_backbone"?: ...}`` with the original prefixes
            (``mlp_projector.{0,2}.*``, ``llm.model.*``, ``llm.lm_head.weight``, timm ``featurizer.*``).
        config: the target architecture; every tensor is checked against its shapes.
        vision: SiglipVisionModel-layout vision weights (see ``load_vision_weights``) for checkpoints that carry no
            ``vision_backbone`` (the vision tower was frozen in training).

    Returns exactly the keys of the model's ``state_dict()``; values are the input tensors (renamed, or views for the
    split qkv), and with tied embeddings ``lm_head.weight`` is the embedding tensor itself. Tensors the model does not
    hold by design (the attention-pool head when ``config.vision_config.vision_use_head`` is False, derived rotary
    buffers) are dropped and logged. Anything else missing, unexpected or of the wrong shape raises
    ``CheckpointError`` listing the keys.
    """
    validate_original_groups(original)
    converted: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}  # HF key -> where it came from, for error messages
    unknown: list[str] = []
    dropped: list[str] = []

    if "vision_backbone" in original:
        if vision is not None:
            raise CheckpointError("the checkpoint has its own 'vision_backbone'; do not pass other vision weights")
        timm_state = {}
        for key, tensor in original["vision_backbone"].items():
            if key.startswith(TIMM_PREFIX):
                timm_state[key[len(TIMM_PREFIX) :]] = tensor
            else:
                unknown.append(f"vision_backbone/{key}")
        vision_state, vision_unknown, vision_origins = timm_vision_to_hf(timm_state)
        unknown += [f"vision_backbone/{TIMM_PREFIX}{key}" for key in vision_unknown]
        vision_origins = {k: f"vision_backbone/{TIMM_PREFIX}{v}" for k, v in vision_origins.items()}
    else:
        vision_state = dict(vision) if vision is not None else {}
        vision_origins = {key: f"vision weights/{key}" for key in vision_state}
    keep_head = bool(getattr(config.vision_config, "vision_use_head", False))
    for key, tensor in vision_state.items():
        if is_vision_head_key(key, "hf") and not keep_head:
            dropped.append(vision_origins[key])
            continue
        converted[HF_VISION + key] = tensor
        origin[HF_VISION + key] = vision_origins[key]

    projector = projector_to_hf(original["projector"])
    unknown += [f"projector/{key}" for key in projector.unknown]
    for key, tensor in projector.tensors.items():
        converted[HF_PROJECTOR + key] = tensor
        origin[HF_PROJECTOR + key] = f"projector/{projector.origins[key]}"

    language_state, lm_head, llm_unknown, llm_ignored = llm_to_hf(original["llm_backbone"])
    unknown += [f"llm_backbone/{key}" for key in llm_unknown]
    dropped += [f"llm_backbone/{key}" for key in llm_ignored]
    for key, tensor in language_state.items():
        converted[key] = tensor
        origin[key] = f"llm_backbone/{LLM_PREFIX}model.{key[len(HF_LANGUAGE):]}"
    embed_key = HF_LANGUAGE + "embed_tokens.weight"
    if config.tie_word_embeddings:
        embed = converted.get(embed_key)
        if lm_head is not None and embed is not None and not _same_tensor(lm_head, embed):
            raise CheckpointError(
                f"llm_backbone/{ORIGINAL_LM_HEAD} differs from llm_backbone/{LLM_PREFIX}model.embed_tokens.weight "
                "but the config ties them; convert with tie_word_embeddings=False"
            )
        if embed is not None:
            converted[HF_LM_HEAD] = embed
            origin[HF_LM_HEAD] = origin[embed_key] + " (tied)"
    elif lm_head is not None:
        converted[HF_LM_HEAD] = lm_head
        origin[HF_LM_HEAD] = f"llm_backbone/{ORIGINAL_LM_HEAD}"

    expected = expected_state_dict_shapes(config)
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(unknown + [origin[key] for key in set(converted) - set(expected)])
    problems = []
    if missing:
        hint = ""
        if any(key.startswith(HF_VISION) for key in missing) and "vision_backbone" not in original:
            hint = (" The checkpoint has no 'vision_backbone' (the vision tower was frozen in training): pass the "
                    "pretrained SigLIP weights (--vision-weights / vision=).")
        problems.append(f"missing weights {_listing(missing)}.{hint}")
    if unexpected:
        problems.append(f"unexpected weights (no place in the model) {_listing(unexpected)}")
    wrong = [
        f"{origin[key]} -> {key}: checkpoint {list(converted[key].shape)} vs model {list(expected[key])}"
        for key in sorted(set(converted) & set(expected))
        if converted[key].shape != expected[key]
    ]
    if wrong:
        problems.append(f"shape mismatches against the config: {_listing(wrong)}")
    if problems:
        raise CheckpointError("cannot convert the checkpoint: " + "; ".join(problems))
    if dropped:
        logger.warning("dropped %d tensors the model does not use: %s", len(dropped), _listing(dropped, 8))
    return {key: converted[key] for key in expected}


def convert_to_prismatic(
    hf_state_dict: Mapping[str, torch.Tensor],
    config: OpenQwen2VLConfig,
    *,
    include_vision_backbone: bool = True,
    include_lm_head: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """A kit state dict -> prismatic ``checkpoint["model"]`` (the inverse of ``convert_state_dict``).

    Args:
        hf_state_dict: ``model.state_dict()`` or the tensors of a saved folder (a tied ``lm_head.weight`` may be
            absent: the embedding is used).
        config: the model's config.
        include_vision_backbone: write ``vision_backbone`` (timm layout). The original loads it with a strict
            ``load_state_dict`` that needs timm's ``attn_pool.*`` head, so the model must hold the pooling head
            (converted checkpoints keep it). Without ``vision_backbone`` the original uses timm's pretrained SigLIP,
            which is right when the vision tower was never trained.
        include_lm_head: write ``llm.lm_head.weight`` (the original's ``Qwen2ForCausalLM`` has it, tied or not).
    """
    expected = expected_state_dict_shapes(config)
    absent = sorted(set(expected) - set(hf_state_dict) - ({HF_LM_HEAD} if config.tie_word_embeddings else set()))
    wrong = [f"{key}: {list(hf_state_dict[key].shape)} vs config {list(expected[key])}"
             for key in sorted(set(expected) & set(hf_state_dict)) if hf_state_dict[key].shape != expected[key]]
    if absent or wrong:
        raise CheckpointError(f"the state dict does not match its config: missing {_listing(absent)}, "
                              f"wrong shapes {_listing(wrong)}")
    groups = split_hf_state_dict(hf_state_dict)
    if groups["other"]:
        raise CheckpointError(f"keys outside the Open-Qwen2VL layout: {_listing(sorted(groups['other']))}")
    result: dict[str, dict[str, torch.Tensor]] = {}
    if include_vision_backbone:
        vision = groups["vision"]
        if not any(is_vision_head_key(key, "hf") for key in vision):
            raise CheckpointError(
                "the model has no vision pooling head, but the original codebase loads vision_backbone strictly and "
                "expects timm's attn_pool.* weights; export with include_vision_backbone=False (--no-vision-backbone) "
                "if the vision tower was not trained"
            )
        result["vision_backbone"] = {TIMM_PREFIX + key: tensor for key, tensor in hf_vision_to_timm(vision).items()}
    result["projector"] = hf_to_projector(groups["projector"])
    llm = {f"{LLM_PREFIX}model.{key}": tensor for key, tensor in groups["language"].items()}
    if include_lm_head:
        lm_head = groups["lm_head"].get(HF_LM_HEAD)
        if lm_head is None:
            if not config.tie_word_embeddings:
                raise CheckpointError("lm_head.weight is missing and the config does not tie it to the embeddings")
            lm_head = groups["language"]["embed_tokens.weight"]
        llm[ORIGINAL_LM_HEAD] = lm_head
    result["llm_backbone"] = llm
    return result


# ------------------------------------------------------------------------------------------- whole checkpoints


def _resolve_dtype(original: Mapping[str, Mapping[str, torch.Tensor]], dtype: str) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    found = {t.dtype for state in original.values() for t in state.values() if t.is_floating_point()}
    if len(found) == 1:
        return found.pop()
    # Mixed (e.g. fp32 LLM + a bf16 frozen vision tower): the widest one loses nothing.
    return max(found, key=lambda d: torch.finfo(d).bits) if found else torch.float32


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cast floating tensors once each, so tied tensors stay one tensor."""
    done: dict[int, torch.Tensor] = {}
    out = {}
    for key, tensor in state.items():
        if tensor.is_floating_point() and tensor.dtype != dtype:
            if id(tensor) not in done:
                done[id(tensor)] = tensor.to(dtype)
            tensor = done[id(tensor)]
        out[key] = tensor
    return out


def generation_config_for(config: OpenQwen2VLConfig) -> GenerationConfig:
    """Greedy decoding that stops at ``<|im_end|>``, as the original's ``generate_batch`` (README: 512 new tokens);
    the image placeholder is never generated (it has no image behind it)."""
    text = config.text_config
    eos = text.eos_token_id if text.eos_token_id is not None else EOS_TOKEN_ID
    pad = text.pad_token_id if text.pad_token_id is not None else PAD_TOKEN_ID
    return GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=eos, pad_token_id=pad,
                            suppress_tokens=[config.image_token_id], **GENERATION_DEFAULTS)


def _sha256(path: Path) -> str:
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    with path.open("rb") as handle, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                          desc=f"sha256 {path.name}", leave=False) as bar:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _model_card(facts: dict) -> str:
    dropped = facts["dropped"] or "none"
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- open-qwen2vl
- prismatic-conversion
---

# {facts['model_id']} (transformers format)

Converted from the prismatic checkpoint of Open-Qwen2VL (arXiv 2504.00595) with
`python -m modeling_open_qwen2vl.convert_prismatic_to_hf`. The weights are the original tensors, renamed (the timm
vision encoder's fused `qkv` split into `q/k/v`, `pos_embed` reshaped); none were retrained or re-initialised.

| | |
|---|---|
| source checkpoint | `{facts['checkpoint_name']}` (sha256 `{facts['sha256']}`) |
| prismatic config | model_id `{facts['run_model_id']}`, arch_specifier `{facts['arch_specifier']}`, vision `{facts['vision_backbone_id']}`, LLM `{facts['llm_backbone_id']}` |
| visual tokens per image | {facts['num_image_tokens']} (from the arch_specifier; change `num_image_tokens` in config.json for 144 <-> 729, no weight changes) |
| vision tower weights | {facts['vision_source']} |
| vision pooling head | {facts['head']} |
| dropped tensors | {dropped} |
| dtype | {facts['dtype']} |
| tokenizer | {facts['tokenizer']} + `<|endofchunk|>` (151665), BOS `<s>` (128245), image placeholder `<|image_pad|>` |

The vision encoder uses exact (erf) GELU like the original timm SigLIP; features come from the second-to-last
encoder layer without the final layer norm, pooled by adaptive average pooling to a square grid.

## Usage

```python
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
# The original README / evaluation format: <s> + raw prompt, one <image> marker per image.
inputs = processor(text="<s><image>\\nDescribe the image.", images=[image], return_tensors="pt")
output = model.generate(**inputs)  # greedy, stops at <|im_end|> (generation_config.json)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

The processor's default chat template is `compat`: it reproduces the original SFT prompt strings byte for byte,
quirks included (`...<|im_end|>assistant\\n` without `<|im_start|>`, and the token after an image in the first turn
dropped), which is what these weights were trained on. `chat_template="chatml"` gives clean ChatML.

Convert back for the original codebase with
`python -m modeling_open_qwen2vl.convert_prismatic_to_hf --to-prismatic <this folder> --output <run dir>`.
"""


def convert_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    run_config: str | Path | None = None,
    vision_weights: str | Path | None = None,
    tokenizer: str | Path | None = None,
    base_config: str | Path | OpenQwen2VLConfig | None = None,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    drop_vision_head: bool = False,
    compute_sha256: bool = True,
) -> Path:
    """Convert one prismatic checkpoint into a transformers folder (weights, config, processor, card); returns it.

    ``checkpoint`` is a ``.pt`` file or a prismatic run directory (``checkpoints/latest-checkpoint.pt`` and
    ``config.json``); ``run_config`` defaults to the ``config.json`` of that run directory. See ``main`` for the rest.
    """
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        run_config = run_config or checkpoint / "config.json"
        checkpoint = checkpoint / "checkpoints" / "latest-checkpoint.pt"
    if run_config is None:
        guess = checkpoint.parent.parent / "config.json"
        if not guess.is_file():
            raise FileNotFoundError(f"pass the prismatic config.json of {checkpoint} (--config)")
        run_config = guess
    run = read_prismatic_run_config(run_config)
    config = config_from_run(run, base_config)
    original = load_prismatic_checkpoint(checkpoint)
    logger.info("read %s: %s", checkpoint, {group: len(state) for group, state in original.items()})

    if "vision_backbone" in original:
        if vision_weights is not None:
            raise CheckpointError(f"{checkpoint} has its own vision_backbone; drop --vision-weights")
        vision, vision_source = None, "the checkpoint's `vision_backbone` (vision tower trained with the LLM)"
        has_head = any(key.startswith(TIMM_PREFIX + "attn_pool.") for key in original["vision_backbone"])
    elif vision_weights is not None:
        vision = load_vision_weights(vision_weights, config)
        # A hub id is quoted as given; a local path only by its name (no paths of this machine in the card).
        name = Path(vision_weights).name if Path(vision_weights).exists() else str(vision_weights)
        vision_source = f"`{name}` (the checkpoint has no vision_backbone: the tower was frozen in training)"
        has_head = any(is_vision_head_key(key, "hf") for key in vision)
    else:
        raise CheckpointError(
            f"{checkpoint} has no vision_backbone (the vision tower was frozen in training): pass the pretrained "
            "SigLIP with --vision-weights (e.g. google/siglip-so400m-patch14-384 or timm's "
            "ViT-SO400M-14-SigLIP-384 weights)"
        )
    keep_head = has_head and not drop_vision_head
    llm = original["llm_backbone"]
    embed = llm.get(LLM_PREFIX + "model.embed_tokens.weight")
    lm_head = llm.get(ORIGINAL_LM_HEAD)
    tie = config.tie_word_embeddings
    if tie and embed is not None and lm_head is not None and not _same_tensor(embed, lm_head):
        logger.warning("llm.lm_head.weight differs from the embeddings: converting with untied embeddings")
        tie = False
    config = derive_config(config, vision_use_head=keep_head, tie_word_embeddings=tie)

    state = convert_state_dict(original, config, vision=vision)
    target_dtype = _resolve_dtype(original, dtype)
    state = _cast(state, target_dtype)

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shell = OpenQwen2VLForConditionalGeneration._from_config(config, dtype=target_dtype)
    shell.generation_config = generation_config_for(config)
    # The meta model supplies the config, remote-code files and tied-weight rules; the tensors come from `state`.
    shell.save_pretrained(output, state_dict=state, max_shard_size=max_shard_size)
    del state

    processor = build_processor(config, chat_format="compat", tokenizer_source=tokenizer,
                                model_max_length=int(run.get("llm_max_length", 4096)))
    processor.save_pretrained(output)

    dropped = []
    if has_head and not keep_head:
        dropped.append("vision attention-pool head (--drop-vision-head)")
    facts = {
        "model_id": run.get("model_id") or checkpoint.stem,
        "run_model_id": run.get("model_id"),
        "checkpoint_name": checkpoint.name,
        "sha256": _sha256(checkpoint) if compute_sha256 else "not computed",
        "arch_specifier": run["arch_specifier"],
        "vision_backbone_id": run.get("vision_backbone_id"),
        "llm_backbone_id": run.get("llm_backbone_id"),
        "num_image_tokens": config.num_image_tokens,
        "vision_source": vision_source,
        "head": "kept (unused by the forward; kept so the export back is lossless)" if keep_head else "not kept",
        "dropped": ", ".join(dropped),
        "dtype": str(target_dtype).removeprefix("torch."),
        "tokenizer": f"`{Path(tokenizer).name if Path(tokenizer).exists() else tokenizer}`" if tokenizer
        else "the official Qwen2.5 tokenizer.json (offline copy)",
    }
    (output / "README.md").write_text(_model_card(facts), encoding="utf-8")
    logger.info("wrote %s", output)
    return output


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


def _is_released_architecture(config: OpenQwen2VLConfig) -> bool:
    """Whether the towers have the shapes of the released backbones (what the default run config names)."""
    released = OpenQwen2VLConfig.open_qwen2vl_2b()
    fields = {"vision_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "image_size", "patch_size"),
              "text_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "num_key_value_heads", "vocab_size")}
    return all(getattr(getattr(config, tower), name) == getattr(getattr(released, tower), name)
               for tower, names in fields.items() for name in names)


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
    if run_config_template is None and not _is_released_architecture(config):
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


# ------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_open_qwen2vl.convert_prismatic_to_hf",
        description="Convert a prismatic Open-Qwen2VL checkpoint to a transformers folder "
                    "(or back with --to-prismatic).",
    )
    parser.add_argument("--checkpoint", help="latest-checkpoint.pt, or a prismatic run directory")
    parser.add_argument("--config", help="the prismatic run's config.json (default: the run directory's)")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--vision-weights",
                        help="SigLIP weights when the checkpoint has no vision_backbone: a transformers folder or hub "
                             "id (google/siglip-so400m-patch14-384), or a timm .safetensors/.bin/.pth file")
    parser.add_argument("--tokenizer", help="Qwen2.5 tokenizer folder or hub id (default: the offline official file)")
    parser.add_argument("--base-config", help="OpenQwen2VLConfig folder/json for non-released backbones")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights dtype (auto: the checkpoint's, the widest if mixed)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--drop-vision-head", action="store_true",
                        help="drop the unused attention-pool head (the export back then needs --no-vision-backbone)")
    parser.add_argument("--no-sha256", action="store_true", help="skip hashing the checkpoint for the model card")
    parser.add_argument("--to-prismatic", metavar="HF_FOLDER",
                        help="export a kit folder to a prismatic run directory at --output")
    parser.add_argument("--no-vision-backbone", action="store_true",
                        help="with --to-prismatic: omit vision_backbone (the original then uses timm's SigLIP)")
    parser.add_argument("--model-id", help="with --to-prismatic: model_id written into config.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.to_prismatic:
            path = export_to_prismatic(args.to_prismatic, args.output, run_config_template=args.config,
                                       include_vision_backbone=not args.no_vision_backbone, model_id=args.model_id)
        else:
            if not args.checkpoint:
                raise CheckpointError("--checkpoint is required (or --to-prismatic for the export back)")
            path = convert_checkpoint(
                args.checkpoint, args.output, run_config=args.config, vision_weights=args.vision_weights,
                tokenizer=args.tokenizer, base_config=args.base_config, dtype=args.dtype,
                max_shard_size=args.max_shard_size, drop_vision_head=args.drop_vision_head,
                compute_sha256=not args.no_sha256,
            )
    except (CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
