"""Model FLOPs of a training step and model FLOPs utilisation (MFU).

Counted: every matrix multiplication the model needs (2 FLOPs per multiply-add), for the real (non-padding) work:

- vision tower, per image: patch-embedding conv ``2 * 3p^2 * Dv`` per patch; per layer and patch
  ``2 * (4 Dv^2 + 2 Dv Fv)`` (q, k, v, o, fc1, fc2) plus attention ``4 * Dv`` per (query, key) pair (P^2 pairs);
  the layers up to the feature layer (the model runs no further: 26 of 27 with -2), forward and in the ``full``
  stage backward;
- projector, per image token: ``2 * (Dv Dt + Dt^2)`` (linear_1, linear_2);
- language model, per real position: ``2 * (d (h + 2 kv) hd + h hd d + 3 d F)`` per layer, plus attention
  ``4 * h * hd`` per (query, key) pair actually attended: causal pairs ``T(T+1)/2`` per row (``faithful``) or per
  document (``isolated``) -- not the full square;
- LM head: ``2 * d * V`` per supervised position (the loss only computes logits there).

Training multiplies each forward term: x1 forward, +1 for gradients w.r.t. inputs when anything upstream trains, +1
for gradients w.r.t. weights when the module trains (the usual 6N = 2N + 2N + 2N for a fully trained LM; a frozen
vision tower costs only its forward). Attention scores always cost 3x. Recomputation by activation checkpointing is
not counted (it is not model work). Norms, softmax, embeddings and the loss are ignored (not matmuls).

MFU = model FLOPs of the step (all processes) / (step seconds * processes * peak dense bf16 FLOP/s of one device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model_setup import STAGE_TRAINABLE

# Peak dense (no sparsity) bf16 tensor-core FLOP/s per device, from the vendors' data sheets.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 125e12),
    ("L4", 121e12),
)


def peak_flops_per_device(override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the override, else a known GPU's data-sheet value, else None (CPU: unknown)."""
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for key, value in PEAK_BF16_FLOPS:
        if key in name:
            return value
    return None


@dataclass
class StepWork:
    """What one micro-batch (or a sum of them) asks of the model."""

    llm_positions: int = 0  # real (non-padding) positions
    attention_pairs: int = 0  # (query, key) pairs attended in one LM layer, summed over rows
    images: int = 0
    supervised_positions: int = 0  # positions whose logits feed the loss

    def __add__(self, other: "StepWork") -> "StepWork":
        return StepWork(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple())))

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.llm_positions, self.attention_pairs, self.images, self.supervised_positions)


def causal_pairs(lengths: list[int] | torch.Tensor) -> int:
    """(query, key) pairs of causal attention over independent runs of the given lengths."""
    return int(sum(int(n) * (int(n) + 1) // 2 for n in lengths))


def real_lengths(input_ids: torch.Tensor, pad_token_id: int) -> list[int]:
    """Per right-padded row: positions up to and including the last non-padding token."""
    not_pad = (input_ids != pad_token_id).long()
    positions = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)
    return (not_pad * positions).max(dim=1).values.tolist()


def attention_pairs_for_batch(input_ids: torch.Tensor, position_ids: torch.Tensor | None, pad_token_id: int,
                              isolated: bool) -> int:
    """Causal (query, key) pairs of a right-padded batch: per row (faithful) or per document (isolated, where
    ``position_ids`` restart at 0 for every document)."""
    total = 0
    for row, count in enumerate(real_lengths(input_ids, pad_token_id)):
        if not isolated or position_ids is None:
            total += causal_pairs([count])
            continue
        starts = (position_ids[row, :count] == 0).nonzero().squeeze(-1).tolist()
        if not starts or starts[0] != 0:
            starts = [0] + starts
        bounds = starts + [count]
        total += causal_pairs([b - a for a, b in zip(bounds, bounds[1:])])
    return total


def _mults(trains_weights: bool, needs_input_grad: bool) -> int:
    return 1 + int(needs_input_grad) + int(trains_weights)


def training_flops(config, work: StepWork, stage: str) -> float:
    """Model FLOPs of forward + backward for ``work`` in ``stage`` (see the module docstring)."""
    trainable = STAGE_TRAINABLE[stage]
    vision_trains = "vision_tower" in trainable
    llm_trains = "language_model" in trainable
    vc, tc = config.vision_config, config.text_config

    # Vision tower (per image).
    patch = vc.patch_size if isinstance(vc.patch_size, int) else vc.patch_size[0]
    grid = config.patch_grid_side
    patches = grid * grid
    dv, fv = vc.hidden_size, vc.intermediate_size
    embed = 2 * 3 * patch * patch * dv * patches
    layer_linear = 2 * (4 * dv * dv + 2 * dv * fv) * patches
    layer_attention = 4 * dv * patches * patches
    # Only the layers up to the feature layer run (hidden state k = output of layer k; the model stops there).
    used = config.vision_layers_run()
    backward_layers = used if vision_trains else 0
    vision_forward = embed + used * (layer_linear + layer_attention)
    vision_backward = (embed if vision_trains else 0) + backward_layers * 2 * (layer_linear + layer_attention)
    vision = work.images * (vision_forward + vision_backward)

    # Projector (per image token): linear_1's input needs a gradient only when the vision tower trains; linear_2's
    # always does, since linear_1 trains in every stage.
    dt = tc.hidden_size
    projector = work.images * config.num_image_tokens * 2 * (dv * dt * _mults(True, vision_trains)
                                                             + dt * dt * _mults(True, True))

    # Language model. Something upstream (at least the projector) always trains, so input gradients flow.
    heads, kv_heads = tc.num_attention_heads, tc.num_key_value_heads
    head_dim = getattr(tc, "head_dim", None) or dt // heads
    per_token = 2 * (dt * (heads + 2 * kv_heads) * head_dim + heads * head_dim * dt + 3 * dt * tc.intermediate_size)
    llm_linear = tc.num_hidden_layers * per_token * work.llm_positions * _mults(llm_trains, True)
    llm_attention = tc.num_hidden_layers * 4 * heads * head_dim * work.attention_pairs * 3
    head = 2 * dt * tc.vocab_size * work.supervised_positions * _mults(llm_trains, True)
    return float(vision + projector + llm_linear + llm_attention + head)


__all__ = ["PEAK_BF16_FLOPS", "StepWork", "attention_pairs_for_batch", "causal_pairs", "peak_flops_per_device",
           "real_lengths", "training_flops"]
