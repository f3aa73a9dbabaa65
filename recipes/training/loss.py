"""Causal-LM loss for packed batches, and how it is weighted across micro-batches and processes.

The loss is taken only at the (row, position) pairs whose next token is supervised (a boolean ``[batch, seq]``
``logits_to_keep`` through the model's own forward, so FSDP's hooks still run): image placeholders and padding carry
no loss, and the vocabulary projection is the largest single matmul. A mask per row, not the union of positions over
rows, matters with several rows per micro-batch. The projection and the cross-entropy are fused and chunked
(``fused_cross_entropy``), so the ``[tokens, vocab]`` logits never exist in full.

Weighting of one optimizer step made of ``k`` micro-batches on ``w`` processes:
- ``token``: every supervised token weighs the same. Each micro-batch contributes ``sum(CE) * w / T`` where ``T`` is
  the number of supervised tokens of the whole step over all processes (gradient averaging divides by ``w`` again),
  so the gradient is that of ``sum(CE over the step) / T``.
- ``micro_batch_mean``: the original's ``mean(CE of micro-batch) / k``, averaged over processes: a micro-batch with
  few supervised tokens weighs as much as a full one (kept for exact reproduction).
"""

from __future__ import annotations

import torch
from accelerate.utils import extract_model_from_parallel

from .fused_cross_entropy import linear_cross_entropy_sum

IGNORE_INDEX = -100
# What the model's forward takes from a PackedCollator batch (the flash-attention varlen keys exist only when the
# collator is asked for them: isolated attention with a flash kernel).
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "cu_seq_lens_q", "cu_seq_lens_k",
                    "max_length_q", "max_length_k")


def supervised_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry a loss: labels shifted by one, not ``IGNORE_INDEX``."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def summed_lm_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over the batch's supervised tokens, and their count.

    ``batch`` holds ``labels`` and the model inputs; other keys (e.g. ``num_real_tokens``) are ignored. The LM head
    and the loss are fused (``fused_cross_entropy``): a pre-hook on the model's output embedding takes the hidden
    states of the kept positions and the head's weight as the model's own forward sees them (gathered under FSDP),
    and hands the head an empty input, so no ``[tokens, vocab]`` logits are ever materialised.
    """
    labels = batch["labels"]
    supervised = labels[:, 1:] != IGNORE_INDEX
    # Position t predicts token t + 1: keep the (row, position) pairs whose next token is supervised.
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = supervised
    inputs = {key: batch[key] for key in MODEL_INPUT_KEYS if batch.get(key) is not None}
    # The head of the model inside DistributedDataParallel (several processes without FSDP), which hides its methods;
    # the forward below still goes through the wrapper, where DDP hooks its gradient all-reduce.
    head = extract_model_from_parallel(model).get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("the fused LM-head loss assumes an output embedding without bias")
    captured = {}

    def take_hidden_states(module, args):
        captured["hidden"], captured["weight"] = args[0], module.weight
        # Under autocast (accelerate's mixed precision without FSDP) the head would multiply in autocast's dtype.
        device_type = args[0].device.type
        if torch.is_autocast_enabled(device_type):
            captured["dtype"] = torch.get_autocast_dtype(device_type)
        return (args[0][:0],)

    handle = head.register_forward_pre_hook(take_hidden_states)
    try:
        model(**inputs, logits_to_keep=keep, use_cache=False)
    finally:
        handle.remove()
    loss_sum = linear_cross_entropy_sum(captured["hidden"], captured["weight"], labels[:, 1:][supervised],
                                        compute_dtype=captured.get("dtype"))
    return loss_sum, int(supervised.sum())


def micro_batch_objective(loss_sum: torch.Tensor, num_tokens: int, *, reduction: str, step_tokens: int,
                          num_micro_batches: int, world_size: int) -> torch.Tensor:
    """The value to back-propagate for one micro-batch (see the module docstring)."""
    if reduction == "token":
        return loss_sum * world_size / max(step_tokens, 1)
    if reduction == "micro_batch_mean":
        return loss_sum / max(num_tokens, 1) / num_micro_batches
    raise ValueError(f"unknown loss reduction {reduction!r}")


def reference_step_loss(per_micro: list[tuple[float, int]], reduction: str) -> float:
    """The step loss of one process's micro-batches ``[(loss_sum, num_tokens), ...]`` (single-process reference)."""
    if reduction == "token":
        return sum(s for s, _ in per_micro) / max(sum(n for _, n in per_micro), 1)
    return sum(s / max(n, 1) for s, n in per_micro) / len(per_micro)


__all__ = ["IGNORE_INDEX", "MODEL_INPUT_KEYS", "micro_batch_objective", "reference_step_loss", "summed_lm_loss",
           "supervised_tokens"]
