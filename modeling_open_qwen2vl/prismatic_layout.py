"""Weight layout of prismatic (Open-Qwen2VL) checkpoints and its exact mapping to the kit's transformers model.

A prismatic checkpoint is ``torch.save({"model": {group: state_dict}})`` with the groups
- ``projector``: the AvgPoolProjector MLP, ``mlp_projector.0.*`` (in -> out) and ``mlp_projector.2.*`` (out -> out);
- ``llm_backbone``: ``llm.`` + a ``Qwen2ForCausalLM`` state dict (``llm.model.*``, ``llm.lm_head.weight``);
- ``vision_backbone`` (only when the vision tower was trained): ``featurizer.`` + a timm SigLIP ViT state dict
  (fused ``attn.qkv``, ``pos_embed`` with a batch axis, ``attn_pool`` head).

The kit's model is ``OpenQwen2VLForConditionalGeneration``: ``model.vision_tower.*`` (transformers'
``SiglipVisionModel``), ``model.multi_modal_projector.linear_{1,2}.*``, ``model.language_model.*`` (``Qwen2Model``)
and ``lm_head.weight``. Every function here is a pure rename/reshape: values are never changed, so the two layouts
convert into each other exactly. Renames return the same tensor objects (no copy); splits return views.

This module is part of the kit (the converter), not of the remote code copied into checkpoints.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

import torch

GROUPS = ("vision_backbone", "projector", "llm_backbone")
TIMM_PREFIX = "featurizer."  # prismatic's TimmViTBackbone keeps the timm model in `self.featurizer`
LLM_PREFIX = "llm."  # prismatic's LLMBackbone keeps the Qwen2ForCausalLM in `self.llm`
HF_VISION = "model.vision_tower."
HF_PROJECTOR = "model.multi_modal_projector."
HF_LANGUAGE = "model.language_model."
HF_LM_HEAD = "lm_head.weight"
ORIGINAL_LM_HEAD = "llm.lm_head.weight"

# Derived buffers that older transformers versions stored; they carry no learned value.
_IGNORABLE_LLM_SUFFIXES = ("rotary_emb.inv_freq",)

# One-to-one renames between a timm SigLIP ViT and transformers' SiglipVisionModel (keys relative to each model).
# `{i}` is a block index, `{p}` a parameter name. The fused / reshaped tensors are handled in the functions below.
_VISION_RENAMES = (
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
    ("blocks.{i}.norm1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layers.{i}.self_attn.out_proj.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layers.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layers.{i}.mlp.fc2.{p}"),
    ("norm.{p}", "post_layernorm.{p}"),
    ("attn_pool.latent", "head.probe"),
    ("attn_pool.proj.{p}", "head.attention.out_proj.{p}"),
    ("attn_pool.norm.{p}", "head.layernorm.{p}"),
    ("attn_pool.mlp.fc1.{p}", "head.mlp.fc1.{p}"),
    ("attn_pool.mlp.fc2.{p}", "head.mlp.fc2.{p}"),
)
_PROJECTOR_RENAMES = (
    ("mlp_projector.0.{p}", "linear_1.{p}"),
    ("mlp_projector.2.{p}", "linear_2.{p}"),
)
_FIELD_PATTERNS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)"}


def _pattern(template: str) -> re.Pattern:
    regex = re.escape(template)
    for field, pattern in _FIELD_PATTERNS.items():
        regex = regex.replace(re.escape("{" + field + "}"), pattern)
    return re.compile(regex + r"\Z")


_VISION_FORWARD = [(_pattern(src), dst) for src, dst in _VISION_RENAMES]
_VISION_BACKWARD = [(_pattern(dst), src) for src, dst in _VISION_RENAMES]
_PROJECTOR_FORWARD = [(_pattern(src), dst) for src, dst in _PROJECTOR_RENAMES]
_PROJECTOR_BACKWARD = [(_pattern(dst), src) for src, dst in _PROJECTOR_RENAMES]
_QKV = _pattern("blocks.{i}.attn.qkv.{p}")
_HF_QKV = re.compile(r"encoder\.layers\.(?P<i>\d+)\.self_attn\.(?P<which>[qkv])_proj\.(?P<p>weight|bias)\Z")
_POOL_Q_KV = re.compile(r"attn_pool\.(?P<which>q|kv)\.(?P<p>weight|bias)\Z")
_HF_IN_PROJ = re.compile(r"head\.attention\.in_proj_(?P<p>weight|bias)\Z")


class Conversion(NamedTuple):
    """Renamed tensors, the input keys no rule knows, and for each output key the input key(s) it came from."""

    tensors: dict[str, torch.Tensor]
    unknown: list[str]
    origins: dict[str, str]


def _rename(key: str, rules) -> str | None:
    for pattern, template in rules:
        match = pattern.match(key)
        if match:
            return template.format(**match.groupdict())
    return None


def is_vision_head_key(key: str, layout: str) -> bool:
    """Whether ``key`` belongs to the attention-pool head (``attn_pool.*`` in timm, ``head.*`` in transformers)."""
    return key.startswith("attn_pool." if layout == "timm" else "head.")


def timm_vision_to_hf(timm_state: Mapping[str, torch.Tensor]) -> Conversion:
    """timm SigLIP ViT keys (no prefix) -> SiglipVisionModel keys (no prefix).

    Unknown input keys are returned, not raised, so the caller can report them with everything else.
    The fused ``attn.qkv`` is split in thirds (timm orders its output rows q, k, v), ``pos_embed [1, N, D]`` drops its
    batch axis, and the pool head's separate ``q`` and fused ``kv`` projections become MultiheadAttention's
    ``in_proj`` (rows q, k, v).
    """
    converted: dict[str, torch.Tensor] = {}
    origins: dict[str, str] = {}
    unknown: list[str] = []
    pool_parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in timm_state.items():
        if key == "pos_embed":
            if tensor.dim() != 3 or tensor.shape[0] != 1:
                raise ValueError(
                    f"vision key 'pos_embed' must have shape [1, num_patches, dim], got {list(tensor.shape)}"
                )
            converted["embeddings.position_embedding.weight"] = tensor[0]
            origins["embeddings.position_embedding.weight"] = key
            continue
        qkv = _QKV.match(key)
        if qkv:
            if tensor.shape[0] % 3:
                raise ValueError(f"vision key {key!r}: fused qkv must have 3*dim rows, got shape {list(tensor.shape)}")
            layer, param = qkv["i"], qkv["p"]
            for which, part in zip("qkv", tensor.chunk(3, dim=0)):
                converted[f"encoder.layers.{layer}.self_attn.{which}_proj.{param}"] = part
                origins[f"encoder.layers.{layer}.self_attn.{which}_proj.{param}"] = key
            continue
        pool = _POOL_Q_KV.match(key)
        if pool:
            pool_parts.setdefault(pool["p"], {})[pool["which"]] = tensor
            continue
        target = _rename(key, _VISION_FORWARD)
        if target is None:
            unknown.append(key)
        else:
            converted[target] = tensor
            origins[target] = key
    for param, parts in pool_parts.items():
        if set(parts) != {"q", "kv"}:
            missing = {"q", "kv"} - set(parts)
            raise ValueError(f"vision head: attn_pool.{'/'.join(sorted(missing))}.{param} is missing")
        converted[f"head.attention.in_proj_{param}"] = torch.cat([parts["q"], parts["kv"]], dim=0)
        origins[f"head.attention.in_proj_{param}"] = f"attn_pool.q.{param} + attn_pool.kv.{param}"
    return Conversion(converted, unknown, origins)


def hf_vision_to_timm(hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SiglipVisionModel keys (no prefix) -> timm SigLIP ViT keys (no prefix); the inverse of ``timm_vision_to_hf``."""
    converted: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in hf_state.items():
        if key == "embeddings.position_embedding.weight":
            converted["pos_embed"] = tensor.unsqueeze(0)
            continue
        qkv = _HF_QKV.match(key)
        if qkv:
            qkv_parts.setdefault((qkv["i"], qkv["p"]), {})[qkv["which"]] = tensor
            continue
        in_proj = _HF_IN_PROJ.match(key)
        if in_proj:
            dim = tensor.shape[0] // 3
            converted[f"attn_pool.q.{in_proj['p']}"] = tensor[:dim]
            converted[f"attn_pool.kv.{in_proj['p']}"] = tensor[dim:]
            continue
        target = _rename(key, _VISION_BACKWARD)
        if target is None:
            raise ValueError(f"vision tower key {key!r} has no timm equivalent")
        converted[target] = tensor
    for (layer, param), parts in sorted(qkv_parts.items(), key=lambda item: (int(item[0][0]), item[0][1])):
        if set(parts) != set("qkv"):
            raise ValueError(f"vision layer {layer}: self_attn.{{q,k,v}}_proj.{param} incomplete, got {sorted(parts)}")
        converted[f"blocks.{layer}.attn.qkv.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return converted


def projector_to_hf(projector_state: Mapping[str, torch.Tensor]) -> Conversion:
    """``mlp_projector.{0,2}.*`` -> ``linear_{1,2}.*`` (no prefix)."""
    converted, unknown, origins = {}, [], {}
    for key, tensor in projector_state.items():
        target = _rename(key, _PROJECTOR_FORWARD)
        if target is None:
            unknown.append(key)
        else:
            converted[target] = tensor
            origins[target] = key
    return Conversion(converted, unknown, origins)


def hf_to_projector(hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = {}
    for key, tensor in hf_state.items():
        target = _rename(key, _PROJECTOR_BACKWARD)
        if target is None:
            raise ValueError(f"projector key {key!r} has no prismatic equivalent")
        converted[target] = tensor
    return converted


def llm_to_hf(
    llm_state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, list[str], list[str]]:
    """``llm.model.*`` -> ``model.language_model.*`` (full HF keys).

    Returns ``(converted, lm_head, unknown_keys, ignored_keys)``: ``lm_head`` is ``llm.lm_head.weight`` or None (tied
    checkpoints may omit it); ``ignored_keys`` are derived buffers such as old ``rotary_emb.inv_freq`` entries.
    """
    converted, unknown, ignored = {}, [], []
    lm_head = None
    for key, tensor in llm_state.items():
        if key == ORIGINAL_LM_HEAD:
            lm_head = tensor
        elif key.endswith(_IGNORABLE_LLM_SUFFIXES):
            ignored.append(key)
        elif key.startswith(LLM_PREFIX + "model."):
            converted[HF_LANGUAGE + key[len(LLM_PREFIX + "model.") :]] = tensor
        else:
            unknown.append(key)
    return converted, lm_head, unknown, ignored


def split_hf_state_dict(hf_state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group a kit state dict by component, prefixes stripped: vision, projector, language, lm_head, other."""
    groups: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "projector": {}, "language": {}, "lm_head": {},
                                                  "other": {}}
    for key, tensor in hf_state.items():
        for name, prefix in (("vision", HF_VISION), ("projector", HF_PROJECTOR), ("language", HF_LANGUAGE)):
            if key.startswith(prefix):
                groups[name][key[len(prefix) :]] = tensor
                break
        else:
            groups["lm_head" if key == HF_LM_HEAD else "other"][key] = tensor
    return groups


def num_image_tokens_from_arch_specifier(arch_specifier: str) -> int:
    """Visual tokens per image encoded in prismatic's ``arch_specifier``, the way PrismaticVLM builds its projector.

    ``no-align+avgpool`` -> 144 (the default pool size); ``full-align+729-avgpool`` -> 729. Other projectors
    (``linear``, ``gelu-mlp``, ``fused-gelu-mlp``) are not Open-Qwen2VL models and raise ``ValueError``.
    """
    if not arch_specifier.endswith("avgpool"):
        raise ValueError(
            f"arch_specifier {arch_specifier!r} does not use the average-pool projector; only Open-Qwen2VL's "
            "'...avgpool' projectors (e.g. 'no-align+avgpool', 'full-align+729-avgpool') can be converted"
        )
    last = arch_specifier.split("+")[-1].split("-")[0]
    if last == "avgpool":
        return 144
    if not last.isdigit():
        raise ValueError(f"arch_specifier {arch_specifier!r}: cannot read a token count from {last!r}")
    return int(last)


def arch_specifier_for(num_image_tokens: int) -> str:
    """The ``arch_specifier`` the original uses for ``num_image_tokens`` (144 -> pretraining, else ``N-avgpool``)."""
    return "no-align+avgpool" if num_image_tokens == 144 else f"full-align+{num_image_tokens}-avgpool"


__all__ = [
    "GROUPS",
    "Conversion",
    "arch_specifier_for",
    "hf_to_projector",
    "hf_vision_to_timm",
    "is_vision_head_key",
    "llm_to_hf",
    "num_image_tokens_from_arch_specifier",
    "projector_to_hf",
    "split_hf_state_dict",
    "timm_vision_to_hf",
]
