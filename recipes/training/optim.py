"""AdamW with weight decay only on matrices, and the learning-rate schedule.

The decay split reuses transformers' own rule (``get_parameter_names`` with the name patterns the Trainer uses:
no decay for biases and layer/RMS-norm weights); only trainable parameters enter the optimizer.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import get_scheduler
from transformers.trainer_pt_utils import get_parameter_names

# The patterns transformers' Trainer.get_decay_parameter_names uses, plus "layer_norm" (SigLIP's layer_norm1/2).
NO_DECAY_NAME_PATTERNS = [r"bias", r"layernorm", r"layer_norm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get weight decay: everything but biases and normalisation weights."""
    return set(get_parameter_names(model, [nn.LayerNorm], NO_DECAY_NAME_PATTERNS))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters: ``decay`` and ``no_decay`` (each parameter once)."""
    decay_names = decay_parameter_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # named_parameters() yields a tied parameter once
        if not param.requires_grad:
            continue
        (decay if name in decay_names else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters: check the stage")
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float, betas: tuple[float, float],
                    eps: float, fused: bool | None = None) -> torch.optim.AdamW:
    """torch AdamW (the original's optimizer, torch defaults for anything not given).

    ``fused=True`` uses torch's single-kernel implementation (CUDA, CPU; same update rule, rounding may differ in
    the last bits): on one GPU the per-tensor loop spends more time launching kernels than computing, and on CPU it
    makes several passes over memory per parameter.
    """
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=learning_rate, betas=betas, eps=eps,
                             fused=fused)


def warmup_steps_for(total_steps: int, warmup_ratio: float, warmup_steps: int = 0) -> int:
    """Explicit ``warmup_steps`` wins; otherwise ``int(warmup_ratio * total_steps)`` as the original computes it."""
    return warmup_steps if warmup_steps > 0 else int(warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int,
                    kwargs: dict | None = None):
    """transformers' schedule (``cosine`` = linear warmup then cosine decay to 0), stepped once per optimizer step;
    ``kwargs``: the schedule's own arguments (``lr_scheduler_kwargs``, e.g. ``min_lr_rate``)."""
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         scheduler_specific_kwargs=kwargs or None)


def apply_schedule_at_current_step(scheduler, optimizer: torch.optim.Optimizer) -> list[float]:
    """Set the optimizer's learning rates to ``scheduler``'s at its current step. A checkpoint restores the rates its
    own schedule set; a resume with another run length (a new ``total_steps``) must use this schedule's from its first
    step on, not from the second. The schedules are ``LambdaLR`` (transformers' step schedules): lr = base x
    lambda(step)."""
    rates = [base * rate(scheduler.last_epoch) for base, rate in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = list(rates)  # what get_last_lr() reports (and the step's log shows)
    return rates


__all__ = ["apply_schedule_at_current_step", "build_optimizer", "build_scheduler", "decay_parameter_names", "parameter_groups", "warmup_steps_for"]
