"""Summed cross-entropy of ``hidden @ weight.T`` computed in chunks, without keeping ``[tokens, vocab]`` logits.

The forward pass walks the tokens in chunks: logits of one chunk (products in the compute dtype: the weight's, or
autocast's), their fp32 softmax and the loss, and at the same time the gradients with respect to the hidden states
and the weight (``softmax - one_hot`` times the other operand). Backward only scales the stored gradients. Same three
matrix products as the plain path (no recomputation); the memory of the logits, their log-softmax and its gradient --
three ``[tokens, 151,936]`` fp32 tensors, hundreds of MiB to GiB per micro-batch -- shrinks to two chunk-sized fp32
buffers (and a compute-dtype one for lower-precision products).
The idea is Liger-Kernel's fused linear cross-entropy, written here in plain torch.
"""

from __future__ import annotations

import math

import torch

# Bytes of one fp32 ``[chunk, vocab]`` buffer (two per call, reused by every chunk): bigger chunks mean fewer passes
# over the weight.
CHUNK_BYTES = {"cpu": 64 * 2**20, "cuda": 1024 * 2**20}

# CPU scratch buffers kept between calls. glibc maps every allocation above 32 MiB afresh, and first-touching those
# pages costs about as much as the work done in them (0.35 ms per MiB measured on a 2-core VM: ~100 ms per call for
# the tiny model's 151,936-word head); CUDA's caching allocator already reuses memory, so other devices allocate.
# One loss computation at a time per process, as in a training loop.
_CPU_SCRATCH: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    buffer = _CPU_SCRATCH.get((name, dtype))
    if buffer is None or buffer.numel() < numel:
        buffer = _CPU_SCRATCH[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)


def chunk_tokens(vocab_size: int, device: torch.device) -> int:
    return max(1, CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"]) // (4 * vocab_size))


# Below the smallest normal fp32 number a probability has lost precision (or is 0).
_LOG_TINY = float(torch.log(torch.tensor(torch.finfo(torch.float32).tiny)))


def _exact_target_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits[torch.arange(targets.shape[0], device=targets.device), targets] - torch.logsumexp(logits, dim=-1)


def _accumulate_product(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool,
                        scratch: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """``total = a @ b`` for the first chunk, ``total += a @ b`` after; ``total`` is fp32. Products in a lower
    precision go through ``scratch`` (a compute-dtype and an fp32 buffer of ``total``'s shape): an add_ of mixed
    dtypes is several times slower on CPU than a copy and an fp32 add."""
    if scratch is None:
        if first:
            torch.mm(a, b, out=total)
        else:  # in place (addmm_ escapes FLOP counters)
            torch.addmm(total, a, b, out=total)
        return
    low, full = scratch
    torch.mm(a, b, out=low)
    if first:
        total.copy_(low)
    else:
        total += full.copy_(low)


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                compute_dtype: torch.dtype) -> torch.Tensor:
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        low_precision = compute_dtype != torch.float32
        w = weight.to(compute_dtype)  # a no-op unless autocast asked for lower-precision products
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.empty_like(weight, dtype=torch.float32) if needs_weight else None  # the first chunk sets it
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunk = max(1, min(chunk, hidden.shape[0]))  # buffers no larger than the input; a step > 0 even for none
        buffer_shape, device = (chunk, weight.shape[0]), hidden.device
        logits_buffer = _scratch("logits", buffer_shape, torch.float32, device)
        probs_buffer = _scratch("probs", buffer_shape, torch.float32, device)
        if low_precision:  # products land in a compute-dtype buffer first
            products_buffer = _scratch("products", buffer_shape, compute_dtype, device)
        weight_scratch = None
        if low_precision and needs_weight:
            weight_scratch = tuple(_scratch("chunk_grad_weight", tuple(weight.shape), dtype, device)
                                   for dtype in (compute_dtype, torch.float32))
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk].to(compute_dtype)
            t = targets[start:start + chunk]
            n = t.shape[0]
            if low_precision:
                logits = logits_buffer[:n].copy_(torch.mm(h, w.T, out=products_buffer[:n]))
            else:
                logits = torch.mm(h, w.T, out=logits_buffer[:n])
            # One softmax pass (fp32) gives the gradient and, at the targets, the loss.
            probs = torch.softmax(logits, dim=-1, out=probs_buffer[:n])
            rows = torch.arange(n, device=t.device)
            target_log_probs = torch.log(probs[rows, t])
            underflow = target_log_probs < _LOG_TINY
            if bool(underflow.any()):  # a logit gap beyond ~87: the fp32 softmax underflows there, so those are exact
                target_log_probs[underflow] = _exact_target_log_probs(logits[underflow], t[underflow])
            total -= target_log_probs.sum()
            if not (needs_hidden or needs_weight):
                continue
            grad_logits = probs
            grad_logits[rows, t] -= 1.0
            if low_precision:
                grad_logits = products_buffer[:n].copy_(grad_logits)
            if needs_hidden and compute_dtype == hidden.dtype:
                torch.mm(grad_logits, w, out=grad_hidden[start:start + n])
            elif needs_hidden:
                grad_hidden[start:start + n] = grad_logits @ w
            if needs_weight:
                _accumulate_product(grad_weight, grad_logits.T, h, start == 0, weight_scratch)
        if needs_weight and hidden.shape[0] == 0:
            grad_weight.zero_()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # The stored gradients belong to this call alone: scaled in place (no second weight-sized allocation).
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk: int | None = None, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")``, chunked (``hidden``: ``[N, H]``,
    ``weight``: ``[V, H]``, ``targets``: ``[N]`` with no ignored entries).

    The products run in ``compute_dtype`` (default: the weight's dtype; pass autocast's dtype to match an LM head
    that ran under autocast), the softmax and the loss in fp32; the weight's gradient comes back in its own dtype.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, H] with targets [N]; got {tuple(hidden.shape)} and "
                         f"{tuple(targets.shape)}")
    chunk = chunk or chunk_tokens(weight.shape[0], hidden.device)
    return _LinearCrossEntropySum.apply(hidden, weight, targets, chunk, compute_dtype or weight.dtype)


__all__ = ["chunk_tokens", "linear_cross_entropy_sum"]
