"""Summed cross-entropy of ``hidden @ weight.T`` computed in chunks, without keeping ``[tokens, vocab]`` logits.

The forward pass walks the tokens in chunks: logits of one chunk (products in the weight's dtype, softmax in fp32),
their log-softmax and the loss, and at the same time the gradients with respect to the hidden states and the weight
(``softmax - one_hot`` times the other operand). Backward only scales the stored gradients. Same three matrix
products as the plain path (no recomputation); the memory of the logits, their log-softmax and its gradient -- three
``[tokens, 151,936]`` fp32 tensors, hundreds of MiB to GiB per micro-batch -- shrinks to two chunk-sized buffers,
allocated once per call. The idea is Liger-Kernel's fused linear cross-entropy, written here in plain torch.
"""

from __future__ import annotations

import torch

# Bytes of one fp32 ``[chunk, vocab]`` buffer (two are allocated once per call and reused by every chunk, so the
# allocator's page faults are paid once): bigger chunks mean fewer passes over the weight.
CHUNK_BYTES = {"cpu": 64 * 2**20, "cuda": 1024 * 2**20}


def chunk_tokens(vocab_size: int, device: torch.device) -> int:
    return max(1, CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"]) // (4 * vocab_size))


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                compute_dtype: torch.dtype) -> torch.Tensor:
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(compute_dtype)  # a no-op unless autocast asked for lower-precision products
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunk = max(1, min(chunk, hidden.shape[0]))  # buffers no larger than the input; a step > 0 even for none
        logits_buffer = torch.empty((chunk, weight.shape[0]), dtype=torch.float32, device=hidden.device)
        log_probs_buffer = torch.empty_like(logits_buffer)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk].to(compute_dtype)
            t = targets[start:start + chunk]
            n = t.shape[0]
            if compute_dtype == torch.float32:
                logits = torch.mm(h, w.T, out=logits_buffer[:n])
            else:
                logits = logits_buffer[:n].copy_(h @ w.T)
            # One fused log-softmax pass gives both the loss and (exponentiated) the softmax.
            log_probs = torch.log_softmax(logits, dim=-1, out=log_probs_buffer[:n])
            rows = torch.arange(n, device=t.device)
            total -= log_probs[rows, t].sum()
            if not (needs_hidden or needs_weight):
                continue
            grad_logits = torch.exp(log_probs, out=logits)  # softmax, in place of the logits
            grad_logits[rows, t] -= 1.0
            grad_logits = grad_logits.to(compute_dtype)
            if needs_hidden and compute_dtype == hidden.dtype:
                torch.mm(grad_logits, w, out=grad_hidden[start:start + n])
            elif needs_hidden:
                grad_hidden[start:start + n] = (grad_logits @ w).to(hidden.dtype)
            if needs_weight and compute_dtype == torch.float32:  # in place (addmm_ escapes FLOP counters)
                torch.addmm(grad_weight, grad_logits.T, h, out=grad_weight)
            elif needs_weight:
                grad_weight += (grad_logits.T @ h).float()  # fp32 accumulation across chunks
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
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
