"""Process settings for training on a CPU: keep freed memory for reuse, and say when bf16 is emulated or an
accelerate FSDP config is dropped.

A training step on a CPU allocates and frees the same large tensors every step (the tiny model's tied
151,936 x 64 embedding gradient alone is 39 MB). glibc returns every freed block above its mmap threshold (at most
32 MiB) to the kernel, so the next step page-faults the same amount of memory afresh: measured on a 2-core VM,
a 39 MB ``torch.zeros`` costs 32 ms that way and 3 ms once freed memory stays in the heap, and the tiny model's
backward pass took 39 ms instead of 14 ms. PyTorch's CUDA caching allocator does the same reuse on GPUs; on CPUs the
usual advice is to preload jemalloc or tcmalloc, which a recipe cannot do from inside its own process, but glibc's
``mallopt`` can.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import torch

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h) and the sizes the kit sets: blocks up to 1 GiB come from the heap, and up
# to 1 GiB of freed memory at its top is kept instead of being returned to the kernel.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_BYTES = 1 << 30


def keep_freed_memory_for_reuse() -> bool:
    """Make glibc keep large freed blocks for the next allocation; True where it took effect (Linux with glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl, macOS): leave the allocator alone
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES)) and bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512 or AMX through oneDNN); on AVX2-only CPUs bf16
    products are emulated, ~7x (the tiny LM head) to ~17x (small layers) slower than fp32 on a 2-core VM."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def prepare_cpu_training(device: torch.device, mixed_precision: str | None) -> None:
    """On a CPU device: refuse fp16 mixed precision (nothing applies it there); keep freed memory for reuse; warn when
    bf16 mixed precision will be emulated, and when an accelerate FSDP config asks for sharding that accelerate drops
    on CPUs without a word."""
    if device.type != "cpu":
        return
    if mixed_precision == "fp16":  # accelerate sets up neither fp16 autocast nor a scaler on a CPU
        raise ValueError("mixed_precision fp16 has no effect on a CPU: the run would train in fp32 while its config "
                         "records fp16; use bf16 (the paper's precision) or no mixed precision")
    if keep_freed_memory_for_reuse():
        logger.info("CPU training: freed blocks up to %d MiB stay in the heap for reuse", KEEP_BYTES >> 20)
    if mixed_precision == "bf16" and not cpu_has_native_bf16():
        logger.warning("mixed_precision bf16 on a CPU without native bf16 (%s): every matrix product is emulated and "
                       "several times slower than in fp32; use --mixed_precision no on this machine",
                       torch.backends.cpu.get_cpu_capability())
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):  # set by `accelerate launch` from the yaml
        logger.warning("the accelerate config asks for FSDP, but accelerate does not apply it on a CPU: this run is "
                       "not sharded, and the yaml's fsdp_activation_checkpointing does not apply (the recipes' "
                       "--activation_checkpointing does); pretraining shards on CPUs under `torchrun "
                       "--nproc_per_node N recipes/pretrain.py ... --cpu_fsdp true`")


__all__ = ["cpu_has_native_bf16", "keep_freed_memory_for_reuse", "prepare_cpu_training"]
