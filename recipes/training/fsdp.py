"""The kit's FSDP2 wrap plan, applied with torch's ``fully_shard`` where accelerate cannot (CPU, gloo).

On GPUs, ``accelerate launch --config_file recipes/accelerate/fsdp2_*.yaml`` shards the model with the same plan
(``fsdp_transformer_layer_cls_to_wrap``): one FSDP unit per SigLIP encoder layer and per Qwen2 decoder layer, the
rest (embeddings, projector, final norm, LM head) in the root unit. Accelerate refuses FSDP on CPU, so
``--cpu_fsdp true`` under ``torchrun`` + gloo applies the plan here, which is what the CPU tests exercise.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

# Keep in sync with fsdp_transformer_layer_cls_to_wrap in recipes/accelerate/fsdp2_*.yaml (a test checks it).
WRAP_CLASS_NAMES = ("SiglipEncoderLayer", "Qwen2DecoderLayer")


def shard_model(model: nn.Module, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` every wrap-class layer, then the root, over all processes (1-D mesh). In place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise RuntimeError("shard_model needs an initialised process group (run under torchrun)")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    layers = [m for m in model.modules() if type(m).__name__ in WRAP_CLASS_NAMES]
    if not layers:
        raise ValueError(f"no {WRAP_CLASS_NAMES} layer found in {type(model).__name__}")
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh)
    return model


def is_fsdp2(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module):
    """Accumulate gradients locally (FSDP2: no reduce-scatter; DDP: no all-reduce); a no-op otherwise."""
    if is_fsdp2(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Clip the global gradient norm (DTensor-aware for FSDP2) and return the norm before clipping."""
    grads = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


__all__ = ["WRAP_CLASS_NAMES", "clip_grad_norm", "is_fsdp2", "no_gradient_sync", "shard_model"]
