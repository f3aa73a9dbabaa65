"""The chunked linear + cross-entropy matches torch's plain path: loss and both gradients."""

import pytest
import torch
import torch.nn.functional as F

from recipes.training.fused_cross_entropy import CHUNK_BYTES, chunk_tokens, linear_cross_entropy_sum


def _plain(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_loss_and_gradients_match_the_plain_path(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (50,))
    fused = linear_cross_entropy_sum(hidden, weight, targets, chunk)
    (fused * 0.5).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = _plain(hidden, weight, targets)
    (plain * 0.5).backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-5)


def test_frozen_weight_gets_no_gradient_and_bf16_matches_the_plain_bf16_path():
    torch.manual_seed(1)
    hidden = torch.randn(9, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(40, 8, dtype=torch.bfloat16)
    targets = torch.randint(0, 40, (9,))
    fused = linear_cross_entropy_sum(hidden, weight, targets, 4)
    fused.backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad is None
    fused_grad, hidden.grad = hidden.grad, None
    plain = _plain(hidden, weight, targets)  # bf16 product, fp32 loss: what the unfused recipe computed
    plain.backward()
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(fused_grad, hidden.grad)


def test_bf16_weight_gradient_is_accumulated_in_fp32_across_chunks():
    torch.manual_seed(2)
    hidden = torch.randn(64, 8, dtype=torch.bfloat16)
    weight = torch.randn(30, 8, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 30, (64,))
    linear_cross_entropy_sum(hidden, weight, targets, 5).backward()
    reference = weight.detach().float().requires_grad_()
    _plain(hidden.float(), reference, targets).backward()
    assert weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(weight.grad.float(), reference.grad, rtol=3e-2, atol=3e-2)


def test_shapes_are_checked_and_chunks_follow_the_device():
    with pytest.raises(ValueError, match=r"hidden must be \[N, H\] with targets \[N\]; got \(2, 3, 4\)"):
        linear_cross_entropy_sum(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))
    for device in ("cpu", "cuda"):  # the most tokens whose fp32 logits fit the device's chunk budget
        tokens = chunk_tokens(151936, torch.device(device))
        assert tokens * 4 * 151936 <= CHUNK_BYTES[device] < (tokens + 1) * 4 * 151936
    assert chunk_tokens(10**12, torch.device("cpu")) == 1


def test_no_supervised_tokens_give_a_zero_loss_and_zero_gradients():
    hidden = torch.zeros(0, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    loss = linear_cross_entropy_sum(hidden, weight, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == (0, 8)
    assert torch.count_nonzero(weight.grad) == 0


def test_bf16_products_of_fp32_weights_match_the_plain_autocast_path_over_several_chunks():
    """accelerate's CPU/GPU mixed precision: fp32 master weights, products in bf16, softmax and loss in fp32."""
    torch.manual_seed(3)
    hidden = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(500, 16, requires_grad=True)
    targets = torch.randint(0, 500, (40,))
    fused = linear_cross_entropy_sum(hidden, weight, targets, 6, compute_dtype=torch.bfloat16)
    fused.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = hidden @ weight.T
    plain = F.cross_entropy(logits.float(), targets, reduction="sum")
    plain.backward()
    assert grads[0].dtype == grads[1].dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-2, atol=1e-3)  # both rounded to bf16 once
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-2, atol=1e-3)


def test_a_target_probability_below_fp32_range_still_gives_the_exact_loss():
    """Logit gaps beyond ~87 underflow an fp32 softmax: the loss there comes from an exact log-softmax, not inf."""
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    weight = torch.tensor([[150.0, 0.0], [-150.0, 0.0], [0.0, 2.0]], requires_grad=True)
    targets = torch.tensor([1, 2, 0])  # row 0: target logit 300 below the best one
    fused = linear_cross_entropy_sum(hidden, weight, targets, 2)
    fused.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = _plain(hidden, weight, targets)
    plain.backward()
    assert torch.isfinite(fused) and fused.item() > 300
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)


def test_cpu_scratch_buffers_are_reused_and_calls_of_other_shapes_stay_exact():
    """CPU scratch is kept between calls (fresh pages cost as much as the work); a smaller or differently shaped
    call after a larger one must not see the larger call's leftovers."""
    from recipes.training import fused_cross_entropy

    torch.manual_seed(4)
    shapes = [(30, 8, 400), (30, 8, 400), (7, 4, 50), (30, 8, 400)]
    pointers = []
    for tokens, width, vocab in shapes:
        hidden = torch.randn(tokens, width, requires_grad=True)
        weight = torch.randn(vocab, width, requires_grad=True)
        targets = torch.randint(0, vocab, (tokens,))
        fused = linear_cross_entropy_sum(hidden, weight, targets, 16, compute_dtype=torch.bfloat16)
        pointers.append({key: buf.data_ptr() for key, buf in fused_cross_entropy._CPU_SCRATCH.items()})
        fused.backward()
        grads = hidden.grad.clone(), weight.grad.clone()
        hidden.grad = weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = hidden @ weight.T
        F.cross_entropy(logits.float(), targets, reduction="sum").backward()
        torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-2, atol=1e-3)
        # per-chunk bf16 products summed in fp32 vs one bf16 product: rounding differs where terms cancel
        torch.testing.assert_close(grads[1], weight.grad, rtol=2e-2, atol=1e-2)
    assert pointers[1] == pointers[0]  # the same shapes again: nothing new allocated
    assert pointers[3] == pointers[2]  # a smaller call in between did not shrink them
