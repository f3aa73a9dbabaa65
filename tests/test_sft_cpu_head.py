"""Compact LM-head scoring on CPU gives TRL's exact loss and gradients (only faster)."""

import copy

import torch
from trl.trainer.utils import add_fused_lm_head

from modeling_open_qwen2vl import OpenQwen2VLForConditionalGeneration
from recipes.sft_cpu_head import enable_compact_lm_head_on_cpu


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, fused_lm_head=True)
    loss = -out.log_probs.sum() / out.label_mask.sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compact_scoring_matches_full_scoring(tiny_config, monkeypatch):
    import trl.trainer.utils as trl_utils

    torch.manual_seed(0)
    base = OpenQwen2VLForConditionalGeneration(tiny_config)
    ids = torch.randint(100, 5000, (2, 40))
    ids[:, 2:18] = tiny_config.image_token_id
    labels = torch.full_like(ids, -100)
    labels[0, 30:34] = ids[0, 30:34]  # a few supervised answer tokens, as in SFT
    labels[1, 36:40] = ids[1, 36:40]
    batch = {"input_ids": ids, "pixel_values": torch.randn(2, 3, 64, 64), "labels": labels,
             "attention_mask": torch.ones_like(ids)}

    # Start from TRL's own decision even when an earlier test in this process built an SFT trainer (which patches).
    original = getattr(trl_utils._use_triton, "__wrapped__", trl_utils._use_triton)
    monkeypatch.setattr(trl_utils, "_use_triton", original)  # restored after the test
    assert original(torch.device("cpu")) is False
    full_model = copy.deepcopy(base)
    add_fused_lm_head(full_model, outputs=("log_probs", "entropy"))
    full_loss, full_grads = _loss_and_grads(full_model, batch)

    assert enable_compact_lm_head_on_cpu() is True
    assert enable_compact_lm_head_on_cpu() is False  # idempotent
    assert trl_utils._use_triton(torch.device("cpu")) is True
    compact_model = copy.deepcopy(base)
    add_fused_lm_head(compact_model, outputs=("log_probs", "entropy"))
    compact_loss, compact_grads = _loss_and_grads(compact_model, batch)

    torch.testing.assert_close(compact_loss, full_loss, rtol=1e-5, atol=1e-6)
    assert compact_grads.keys() == full_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(compact_grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)
