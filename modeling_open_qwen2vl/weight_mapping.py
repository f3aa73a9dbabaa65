"""The state-dict mapping between a prismatic ``checkpoint["model"]`` and the kit model, both ways, with the checks.

The per-key renames live in ``prismatic_layout``; this module applies them to whole checkpoints, checks the result
against the config's shapes and reports every missing, unexpected or misshapen key at once. Also the dtype helpers
of the conversion. Kit-only, not copied into checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from .configuration_open_qwen2vl import OpenQwen2VLConfig
from .conversion_config import expected_state_dict_shapes
from .conversion_errors import CheckpointError, format_keys
from .original_checkpoint import validate_original_groups
from .prismatic_layout import (
    HF_LANGUAGE,
    HF_LM_HEAD,
    HF_PROJECTOR,
    HF_VISION,
    LLM_PREFIX,
    ORIGINAL_LM_HEAD,
    TIMM_PREFIX,
    hf_to_projector,
    hf_vision_to_timm,
    is_vision_head_key,
    llm_to_hf,
    projector_to_hf,
    split_hf_state_dict,
    timm_vision_to_hf,
)

logger = logging.getLogger(__name__)


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same values (cheap when they are one storage, as tied weights are)."""
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
        vision: SiglipVisionModel-layout vision weights (see ``original_checkpoint.load_vision_weights``) for
            checkpoints that carry no ``vision_backbone`` (the vision tower was frozen in training).

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
        if lm_head is not None and embed is not None and not same_tensor(lm_head, embed):
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
        problems.append(f"missing weights {format_keys(missing)}.{hint}")
    if unexpected:
        problems.append(f"unexpected weights (no place in the model) {format_keys(unexpected)}")
    wrong = [
        f"{origin[key]} -> {key}: checkpoint {list(converted[key].shape)} vs model {list(expected[key])}"
        for key in sorted(set(converted) & set(expected))
        if converted[key].shape != expected[key]
    ]
    if wrong:
        problems.append(f"shape mismatches against the config: {format_keys(wrong)}")
    if problems:
        raise CheckpointError("cannot convert the checkpoint: " + "; ".join(problems))
    if dropped:
        logger.warning("dropped %d tensors the model does not use: %s", len(dropped), format_keys(dropped, 8))
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
        raise CheckpointError(f"the state dict does not match its config: missing {format_keys(absent)}, "
                              f"wrong shapes {format_keys(wrong)}")
    groups = split_hf_state_dict(hf_state_dict)
    if groups["other"]:
        raise CheckpointError(f"keys outside the Open-Qwen2VL layout: {format_keys(sorted(groups['other']))}")
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


def resolve_dtype(original: Mapping[str, Mapping[str, torch.Tensor]], dtype: str) -> torch.dtype:
    """``dtype`` by name, or for "auto" the checkpoint's floating dtype: the widest when mixed, float32 when the
    widest are fp16 and bf16 together (neither holds the other). The same checkpoint always gives the same dtype."""
    if dtype != "auto":
        return getattr(torch, dtype)
    found = {t.dtype for state in original.values() for t in state.values() if t.is_floating_point()}
    if len(found) == 1:
        return found.pop()
    if not found:
        return torch.float32
    # Mixed (e.g. fp32 LLM + a bf16 frozen vision tower): the widest one loses nothing...
    widest = max(torch.finfo(d).bits for d in found)
    candidates = sorted((d for d in found if torch.finfo(d).bits == widest), key=str)
    if len(candidates) == 1:
        return candidates[0]
    # ...unless two formats of that width tie (fp16 + bf16, or two fp8s): neither holds the other's values (bf16's
    # 1e5 is inf in fp16, fp16's precision is lost in bf16); float32 holds all of them exactly.
    logger.warning("--dtype auto: the checkpoint mixes %s; writing float32, which holds both exactly",
                   " and ".join(str(d).removeprefix("torch.") for d in candidates))
    return torch.float32


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether no value is inf or NaN (min and max only: no tensor-sized temporary)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def cast_state_dict(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cast floating tensors once each, so tied tensors stay one tensor.

    A finite tensor that the cast turns into inf (a value beyond float16's 65504, say) raises ``CheckpointError``
    naming the tensors: written as is, the model would compute NaN."""
    done: dict[int, torch.Tensor] = {}
    overflowed = []
    out = {}
    for key, tensor in state.items():
        if tensor.is_floating_point() and tensor.dtype != dtype:
            if id(tensor) not in done:
                done[id(tensor)] = tensor.to(dtype)
                if not _all_finite(done[id(tensor)]) and _all_finite(tensor):
                    overflowed.append(key)
            tensor = done[id(tensor)]
        out[key] = tensor
    if overflowed:
        name = str(dtype).removeprefix("torch.")
        raise CheckpointError(
            f"--dtype {name}: weights {format_keys(overflowed)} hold values beyond {name}'s range "
            f"(+-{torch.finfo(dtype).max:g}), which would be written as inf; convert with --dtype auto, bfloat16 or "
            "float32"
        )
    return out
