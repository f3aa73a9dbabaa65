"""Pretraining building blocks checked against independent computations (tiny model, CPU)."""

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modeling_open_qwen2vl import OpenQwen2VLConfig, OpenQwen2VLForConditionalGeneration, build_processor
from recipes.training import checkpointing as ckpt
from recipes.training.data import GlobalMicroBatchSampler, StreamingMicroBatches, check_dataset_source
from recipes.training.flops import StepWork, attention_pairs_for_batch, causal_pairs, training_flops
from recipes.training.loss import micro_batch_objective, summed_lm_loss, supervised_tokens
from recipes.training.model_setup import apply_stage
from recipes.training.optim import build_optimizer, build_scheduler, parameter_groups, warmup_steps_for


@pytest.fixture()
def fresh_model(tiny_config):
    torch.manual_seed(0)
    return OpenQwen2VLForConditionalGeneration(tiny_config)


def _batch(processor, images, captions, attention="faithful"):
    from dataset_builders.packed_collator import PackedCollator

    rows = [{"images": images[: len(captions)], "texts": captions, "uids": [str(i) for i in range(len(captions))]}]
    return PackedCollator(processor, attention=attention, max_length=512)(rows)


# ---------------------------------------------------------------- stages and optimizer


@pytest.mark.parametrize(
    "stage, trains",
    [("projector", {"multi_modal_projector"}), ("pretrain", {"multi_modal_projector", "language_model"}),
     ("full", {"multi_modal_projector", "language_model", "vision_tower"})],
)
def test_stage_freezes_exactly_the_other_modules(fresh_model, stage, trains, processor, easy_vqa_images):
    # Independent of the model's code: the parameters a forward/backward never reaches (vision layers past the
    # feature layer, the post-layernorm) stay frozen even in a stage that trains their module.
    fresh_model.requires_grad_(True)
    fresh_model(**_batch(processor, easy_vqa_images, ["A red circle."])).loss.backward()
    unread = {name for name, param in fresh_model.named_parameters() if param.grad is None}
    assert unread and all(".vision_tower." in name for name in unread)
    fresh_model.zero_grad(set_to_none=True)
    counts = apply_stage(fresh_model, stage)
    for name, param in fresh_model.named_parameters():
        module = name.split(".")[1] if name.startswith("model.") else "language_model"  # lm_head is tied to the LM
        assert param.requires_grad == (module in trains and name not in unread), name
    expected = sum(p.numel() for n, p in fresh_model.named_parameters() if p.requires_grad)
    assert counts["trainable"] == expected
    assert counts["trainable"] + counts["frozen"] == sum(p.numel() for p in fresh_model.parameters())


def test_weight_decay_only_on_matrices(fresh_model):
    apply_stage(fresh_model, "full")
    decay, no_decay = parameter_groups(fresh_model, 0.01)
    names = {id(p): n for n, p in fresh_model.named_parameters()}
    # Independent rule: matrices (and the conv patch embedding) decay; vectors (biases, norm weights) do not.
    assert all(p.ndim >= 2 for p in decay["params"]), [names[id(p)] for p in decay["params"] if p.ndim < 2]
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert any(names[id(p)].endswith("layer_norm1.weight") for p in no_decay["params"])
    assert any(names[id(p)].endswith("input_layernorm.weight") for p in no_decay["params"])
    assert any(names[id(p)].endswith("q_proj.bias") for p in no_decay["params"])
    total = len(decay["params"]) + len(no_decay["params"])
    # every trainable parameter once, tied head counted once
    assert total == len([p for p in fresh_model.parameters() if p.requires_grad])
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0


def test_frozen_parameters_stay_out_of_the_optimizer(fresh_model):
    apply_stage(fresh_model, "pretrain")
    optimizer = build_optimizer(fresh_model, 1e-3, 0.01, (0.9, 0.999), 1e-8)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    vision = {id(p) for p in fresh_model.model.vision_tower.parameters()}
    assert not in_optimizer & vision
    assert {id(p) for p in fresh_model.model.multi_modal_projector.parameters()} <= in_optimizer


def test_cosine_schedule_with_three_percent_warmup(fresh_model):
    optimizer = build_optimizer(fresh_model, 5e-5, 0.01, (0.9, 0.999), 1e-8)
    total = 1000
    warmup = warmup_steps_for(total, 0.03)
    assert warmup == 30 and warmup_steps_for(total, 0.03, warmup_steps=7) == 7
    scheduler = build_scheduler(optimizer, "cosine", total, warmup)
    lrs = []
    for _ in range(total):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[15] == pytest.approx(5e-5 * 15 / 30)
    assert lrs[30] == pytest.approx(5e-5)
    step = 500  # cosine decay, independent formula
    assert lrs[step] == pytest.approx(5e-5 * 0.5 * (1 + np.cos(np.pi * (step - 30) / (total - 30))))
    assert lrs[-1] < 1e-9 * 5e-5 + 1e-9


def test_fused_adamw_takes_the_same_steps_as_the_per_tensor_loop(fresh_model):
    """The recipe's default on CPU and CUDA is torch's fused AdamW: same updates as the loop, decay groups included."""
    apply_stage(fresh_model, "pretrain")
    twin = OpenQwen2VLForConditionalGeneration(fresh_model.config)
    twin.load_state_dict(fresh_model.state_dict())
    apply_stage(twin, "pretrain")
    optimizers = [build_optimizer(m, 1e-2, 0.1, (0.9, 0.95), 1e-8, fused=f) for m, f in ((fresh_model, False),
                                                                                           (twin, True))]
    generator = torch.Generator().manual_seed(0)
    trainable = [[p for p in m.parameters() if p.requires_grad] for m in (fresh_model, twin)]
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=generator) for p in trainable[0]]
        for params, optimizer in zip(trainable, optimizers):  # the same gradients for both models
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            optimizer.step()
    assert optimizers[1].defaults["fused"] is True
    loop, fused = dict(fresh_model.named_parameters()), dict(twin.named_parameters())
    moved = 0
    for name, param in loop.items():
        torch.testing.assert_close(fused[name], param, rtol=1e-5, atol=1e-6)
        moved += int(param.requires_grad)
    assert moved > 0


# ---------------------------------------------------------------- loss


def test_summed_loss_equals_cross_entropy_over_all_logits(fresh_model, processor, easy_vqa_images):
    batch = _batch(processor, easy_vqa_images, ["a red circle", "a blue square with a long caption"])
    loss_sum, count = summed_lm_loss(fresh_model, batch)
    # Independent: full logits from the model, shift, mean CE over supervised positions.
    logits = fresh_model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                         attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
    targets = batch["labels"][:, 1:]
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                ignore_index=-100, reduction="sum")
    assert count == int((targets != -100).sum()) == supervised_tokens(batch["labels"])
    torch.testing.assert_close(loss_sum, reference, rtol=1e-5, atol=1e-4)
    # The model's own mean loss agrees too.
    own = fresh_model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                      attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                      labels=batch["labels"]).loss
    torch.testing.assert_close(loss_sum / count, own, rtol=1e-5, atol=1e-5)


def test_right_padding_mask_changes_nothing_under_causal_attention(fresh_model, processor, easy_vqa_images):
    """The trainer's collator leaves out the faithful mode's 2-D mask (so sdpa can take its causal kernels): same
    loss and gradients on rows of different lengths, i.e. with real right padding."""
    from dataset_builders.packed_collator import PackedCollator

    rows = [{"images": easy_vqa_images[:2], "texts": ["a red circle", "a blue square and some more words here"]},
            {"images": easy_vqa_images[2:3], "texts": ["a green triangle"]}]
    batch = PackedCollator(processor, attention="faithful", max_length=512)(rows)
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]  # the second row is padded
    unmasked_batch = PackedCollator(processor, attention="faithful", max_length=512, padding_mask=False)(rows)
    assert unmasked_batch["attention_mask"] is None
    for key in ("input_ids", "labels", "position_ids", "pixel_values"):
        assert torch.equal(unmasked_batch[key], batch[key]), key

    def loss_and_grads(inputs):
        fresh_model.zero_grad(set_to_none=True)
        loss_sum, count = summed_lm_loss(fresh_model, inputs)
        loss_sum.backward()
        return loss_sum.detach(), count, [p.grad.clone() for p in fresh_model.parameters() if p.grad is not None]

    masked, unmasked = loss_and_grads(batch), loss_and_grads(unmasked_batch)
    assert masked[1] == unmasked[1]
    torch.testing.assert_close(unmasked[0], masked[0], rtol=1e-6, atol=1e-4)
    assert len(masked[2]) == len(unmasked[2]) > 0
    for a, b in zip(masked[2], unmasked[2]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_under_autocast_the_fused_head_multiplies_in_autocast_dtype(fresh_model, processor, easy_vqa_images):
    """accelerate's mixed precision without FSDP runs the forward under autocast: the fused loss must then compute
    the products in bf16 like the plain LM head does (fp32 products would be both different and slow on GPUs)."""
    batch = _batch(processor, easy_vqa_images, ["a red circle", "a blue square with a longer caption"])
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "position_ids")}
    targets = batch["labels"][:, 1:].reshape(-1)

    def plain_head():
        fresh_model.zero_grad(set_to_none=True)
        logits = fresh_model(**inputs).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets, ignore_index=-100,
                               reduction="sum")
        loss.backward()
        return loss.detach(), fresh_model.lm_head.weight.grad.clone()

    def fused_head():
        fresh_model.zero_grad(set_to_none=True)
        loss, _ = summed_lm_loss(fresh_model, batch)
        loss.backward()
        return loss.detach(), fresh_model.lm_head.weight.grad.clone()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, fused = plain_head(), fused_head()
    full_precision = plain_head()
    assert fused[1].dtype == torch.float32  # the master weight's gradient keeps its dtype
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-3, atol=1e-4)
    assert (fused[1] - full_precision[1]).abs().max() > 1e-2  # bf16 products are visibly not fp32 ones


def test_token_weighting_gives_the_gradient_of_the_whole_step(fresh_model, processor, easy_vqa_images):
    short = _batch(processor, easy_vqa_images[:1], ["a red circle"])
    long = _batch(processor, easy_vqa_images[1:], ["a blue square", "a green triangle drawn on white",
                                                     "a black rectangle"])
    batches = [short, long]
    params = [p for p in fresh_model.parameters() if p.requires_grad]

    def collected():  # parameters the loss does not reach (e.g. SigLIP's last layer) have no gradient
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    def grads_of(objective):
        fresh_model.zero_grad(set_to_none=True)
        objective().backward()
        return collected()

    counts = [supervised_tokens(b["labels"]) for b in batches]
    total = sum(counts)
    assert counts[0] != counts[1]

    def accumulate(reduction):  # what the loop back-propagates, micro-batch by micro-batch
        fresh_model.zero_grad(set_to_none=True)
        for b in batches:
            s, n = summed_lm_loss(fresh_model, b)
            micro_batch_objective(s, n, reduction=reduction, step_tokens=total, num_micro_batches=2,
                                  world_size=1).backward()
        return collected()

    accumulated = accumulate("token")
    # Independent: the mean CE over all supervised tokens of both micro-batches as one objective.
    whole = grads_of(lambda: sum(summed_lm_loss(fresh_model, b)[0] for b in batches) / total)
    for a, w in zip(accumulated, whole):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-7)

    # The original's mean of micro-batch means is a different objective (the known bug), kept on request.
    original = accumulate("micro_batch_mean")

    def mean_of_means():
        losses = [summed_lm_loss(fresh_model, b) for b in batches]
        return sum(s / n for s, n in losses) / 2

    for a, w in zip(original, grads_of(mean_of_means)):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-7)
    assert max((a - o).abs().max().item() for a, o in zip(accumulated, original)) > 1e-6


# ---------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("stage", ["projector", "pretrain", "full"])
def test_flops_formula_matches_torch_flop_counter(processor, easy_vqa_images, stage):
    from torch.utils.flop_counter import FlopCounterMode

    config = OpenQwen2VLConfig.tiny()
    torch.manual_seed(0)
    model = OpenQwen2VLForConditionalGeneration(config)
    model.set_attn_implementation("eager")  # plain matmuls that compute full score matrices
    apply_stage(model, stage)
    batch = _batch(processor, easy_vqa_images, ["a red circle", "a blue square", "a green triangle"])
    length = batch["input_ids"].shape[1]  # one row, no padding
    with FlopCounterMode(display=False) as counter:
        loss_sum, count = summed_lm_loss(model, batch)
        loss_sum.backward()
    patches = config.patch_grid_side ** 2
    # Eager attention computes every (query, key) pair; the formula gets the same pairs to compare like with like.
    work = StepWork(llm_positions=length, attention_pairs=length * length, images=3, supervised_positions=count)
    formula = training_flops(config, work, stage)
    # SigLIP attention is full (patches^2) in the formula already. Exact: every matmul the counter sees is in the
    # formula, so even the projector's linear_2 input gradient (0.06% of the total) cannot go missing unnoticed.
    assert formula == counter.get_total_flops()
    assert patches == 64


def test_causal_pairs_per_row_or_per_document(processor, easy_vqa_images):
    faithful = _batch(processor, easy_vqa_images, ["a red circle", "a blue square with a longer caption"])
    isolated = _batch(processor, easy_vqa_images, ["a red circle", "a blue square with a longer caption"],
                      attention="isolated")
    pad = processor.tokenizer.pad_token_id
    length = int(faithful["attention_mask"].sum())
    assert attention_pairs_for_batch(faithful["input_ids"], faithful["position_ids"], pad, False) == \
        length * (length + 1) // 2
    starts = (isolated["position_ids"][0] == 0).nonzero().squeeze(-1).tolist()
    docs = [b - a for a, b in zip(starts, starts[1:] + [length])]
    assert attention_pairs_for_batch(isolated["input_ids"], isolated["position_ids"], pad, True) == causal_pairs(docs)
    assert len(docs) == 2


# ---------------------------------------------------------------- data position


def test_global_sampler_covers_each_pack_once_per_epoch_across_processes():
    num_rows, per_device, world = 23, 2, 3
    samplers = [GlobalMicroBatchSampler(num_rows, per_device, rank, world, seed=5, shuffle=True)
                for rank in range(world)]
    per_epoch = samplers[0].per_epoch
    assert per_epoch == 23 // 6
    for epoch in range(2):
        seen = []
        for micro in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            for s in samplers:
                seen.extend(s.indices(micro))
        assert len(seen) == len(set(seen)) == per_epoch * per_device * world  # no pack twice, 5 dropped
    assert samplers[0].epoch_order(0) != samplers[0].epoch_order(1)  # a new permutation each epoch
    # Resuming at any position yields exactly the continuation.
    full = [b for _, b in zip(range(10), iter(samplers[1]))]
    resumed = GlobalMicroBatchSampler(num_rows, per_device, 1, world, seed=5, shuffle=True, start=4)
    assert [b for _, b in zip(range(6), iter(resumed))] == full[4:]


def _stream_corpus(tmp_path, shards=3, rows=5):
    import datasets

    for shard in range(shards):
        datasets.Dataset.from_dict({"uids": [[f"{shard}-{i}"] for i in range(rows)]}).to_parquet(
            str(tmp_path / f"train-{shard:05d}.parquet"))
    return lambda: datasets.load_dataset(str(tmp_path), split="train", streaming=True)


def test_streaming_position_is_exact_despite_prefetching(tmp_path):
    load = _stream_corpus(tmp_path)
    collate = lambda rows: {"uids": [r["uids"][0] for r in rows]}  # noqa: E731
    reference = StreamingMicroBatches(load(), collate, per_device=2, rank=0, world=1, prefetch=4)
    all_batches = [b["uids"] for b, _ in zip((x for x, _ in reference), range(9))]
    assert all_batches[:7] == [["0-0", "0-1"], ["0-2", "0-3"], ["0-4", "1-0"], ["1-1", "1-2"], ["1-3", "1-4"],
                               ["2-0", "2-1"], ["2-2", "2-3"]]
    assert all_batches[7] == ["0-0", "0-1"]  # epoch 2 (the last odd pack "2-4" is dropped and logged)

    first = StreamingMicroBatches(load(), collate, per_device=2, rank=0, world=1, prefetch=4)
    iterator = iter(first)
    for _ in range(3):
        _, state = next(iterator)
    json.dumps(state)  # the position is JSON
    second = StreamingMicroBatches(load(), collate, per_device=2, rank=0, world=1, prefetch=4)
    second.load_state_dict(state)
    resumed = [b["uids"] for b, _ in zip((x for x, _ in second), range(6))]
    assert resumed == all_batches[3:9]


def test_streaming_shards_split_between_processes(tmp_path):
    load = _stream_corpus(tmp_path, shards=4, rows=2)
    collate = lambda rows: {"uids": [r["uids"][0] for r in rows]}  # noqa: E731
    seen = []
    for rank in range(2):
        stream = StreamingMicroBatches(load(), collate, per_device=1, rank=rank, world=2)
        seen.append([b["uids"][0] for b, _ in zip((x for x, _ in stream), range(4))])
    assert sorted(seen[0] + seen[1]) == sorted(f"{s}-{i}" for s in range(4) for i in range(2))


def test_dataset_folder_without_shards_is_an_error(tmp_path):
    (tmp_path / "README.md").write_text("no data here")
    with pytest.raises(FileNotFoundError, match=r"holds no data shards"):
        check_dataset_source(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_dataset_source(str(tmp_path / "missing"))


def test_same_named_corpus_folders_do_not_share_a_stale_cache(tmp_path):
    """datasets keys a local folder's Arrow cache on its name and card; the loader checks rows against the shards."""
    import datasets

    from recipes.training.data import load_packed_corpus

    card = "---\nconfigs:\n- config_name: packed\n  data_files:\n  - split: train\n    path: data/*.parquet\n---\n"
    for parent, rows in (("a", 3), ("b", 5)):
        folder = tmp_path / parent / "corpus"
        (folder / "data").mkdir(parents=True)
        (folder / "README.md").write_text(card)
        datasets.Dataset.from_dict({"images": [["x"]] * rows, "texts": [["t"]] * rows}).to_parquet(
            str(folder / "data" / "train-00000.parquet"))
    for parent, rows in (("a", 3), ("b", 5), ("a", 3)):
        assert len(load_packed_corpus(str(tmp_path / parent / "corpus"), "packed", "train", False)) == rows


def test_corpus_without_the_packed_columns_is_an_error(tmp_path):
    import datasets

    from recipes.training.data import load_packed_corpus

    datasets.Dataset.from_dict({"texts": [["t"]]}).to_parquet(str(tmp_path / "train-00000.parquet"))
    with pytest.raises(ValueError, match=rf"packed corpus {tmp_path} \(config None\) lacks column\(s\) \['images'\]"):
        load_packed_corpus(str(tmp_path), None, "train", False)


# ---------------------------------------------------------------- checkpoints


def test_rng_states_round_trip_through_safetensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    tensors, metadata = ckpt.rng_state()
    save_file(tensors, str(tmp_path / "rng.safetensors"), metadata=metadata)
    expected = (torch.rand(3), np.random.rand(3), np.random.standard_normal(), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    with safe_open(str(tmp_path / "rng.safetensors"), framework="pt") as handle:
        stored = handle.metadata()
    ckpt.set_rng_state(load_file(str(tmp_path / "rng.safetensors")), stored)
    again = (torch.rand(3), np.random.rand(3), np.random.standard_normal(), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2] and expected[3] == again[3]


def _seeded_training_parts(config):
    """A freshly seeded tiny model at stage pretrain with its AdamW and 10-step cosine schedule (2 warm-up steps)."""
    torch.manual_seed(0)
    model = OpenQwen2VLForConditionalGeneration(config)
    apply_stage(model, "pretrain")
    optimizer = build_optimizer(model, 1e-3, 0.01, (0.9, 0.999), 1e-8)
    return model, optimizer, build_scheduler(optimizer, "cosine", 10, 2)


def test_checkpoint_restores_model_optimizer_scheduler(tmp_path, tiny_config, processor, easy_vqa_images):
    batch = _batch(processor, easy_vqa_images, ["a red circle", "a blue square"])

    def train_step(model, optimizer, scheduler):
        optimizer.zero_grad()
        loss_sum, n = summed_lm_loss(model, batch)
        (loss_sum / n).backward()
        optimizer.step()
        scheduler.step()
        return (loss_sum / n).item()

    model, optimizer, scheduler = _seeded_training_parts(tiny_config)
    train_step(model, optimizer, scheduler)
    state = {"architecture": ckpt.architecture(tiny_config), "stage": "pretrain"}
    path = ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler,
                                trainer_state=state, data_state={"kind": "map", "micro_batches": 1}, is_main=True)
    expected = [train_step(model, optimizer, scheduler) for _ in range(2)]

    other, other_optimizer, other_scheduler = _seeded_training_parts(tiny_config)
    trainer_state, data_state = ckpt.load_checkpoint(path, model=other, optimizer=other_optimizer,
                                                     scheduler=other_scheduler)
    assert trainer_state["global_step"] == 1 and data_state == {"kind": "map", "micro_batches": 1}
    assert [train_step(other, other_optimizer, other_scheduler) for _ in range(2)] == expected
    assert other.lm_head.weight is other.model.language_model.embed_tokens.weight


def test_checkpoint_restores_the_fp16_loss_scale(tmp_path, tiny_config, processor, easy_vqa_images, caplog):
    """fp16's loss scale (and its growth counter) decides which later steps are skipped: a resume must continue with
    the saved scale, not the initial one. CPU GradScaler here: the recipe hands accelerate's (CUDA) scaler over alike."""
    batch = _batch(processor, easy_vqa_images, ["a red circle", "a blue square"])

    def make():
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        return *_seeded_training_parts(tiny_config), scaler

    def train_step(model, optimizer, scheduler, scaler):
        optimizer.zero_grad()
        loss_sum, n = summed_lm_loss(model, batch)
        scaler.scale(loss_sum / n).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        return (loss_sum / n).item(), scaler.get_scale()

    model, optimizer, scheduler, scaler = make()
    for _ in range(3):  # the scale grows at step 2; step 3 is one step into the next growth interval
        train_step(model, optimizer, scheduler, scaler)
    saved_scaler_state = scaler.state_dict()
    assert saved_scaler_state["scale"] == 2.0**11 and saved_scaler_state["_growth_tracker"] == 1
    state = {"architecture": ckpt.architecture(tiny_config), "stage": "pretrain"}
    path = ckpt.save_checkpoint(tmp_path, 3, model=model, optimizer=optimizer, scheduler=scheduler,
                                trainer_state=state, data_state={"kind": "map", "micro_batches": 3}, is_main=True,
                                grad_scaler=scaler)
    expected = [train_step(model, optimizer, scheduler, scaler) for _ in range(3)]

    other, other_optimizer, other_scheduler, other_scaler = make()
    ckpt.load_checkpoint(path, model=other, optimizer=other_optimizer, scheduler=other_scheduler,
                         grad_scaler=other_scaler)
    assert other_scaler.state_dict() == saved_scaler_state
    assert [train_step(other, other_optimizer, other_scheduler, other_scaler) for _ in range(3)] == expected

    # A checkpoint without a scale (a bf16 run's) resumes with the initial scale and says so.
    bf16_path = ckpt.save_checkpoint(tmp_path / "bf16", 3, model=model, optimizer=optimizer, scheduler=scheduler,
                                     trainer_state=state, data_state={"kind": "map", "micro_batches": 3},
                                     is_main=True)
    fresh_scaler = make()[3]
    with caplog.at_level("WARNING", logger=ckpt.__name__):
        ckpt.load_checkpoint(bf16_path, model=other, optimizer=other_optimizer, scheduler=other_scheduler,
                             grad_scaler=fresh_scaler)
    assert fresh_scaler.get_scale() == 2.0**10
    assert "holds no fp16 loss scale" in caplog.text and "initial scale 1024" in caplog.text


def test_resuming_into_another_architecture_or_stage_is_refused(tmp_path, tiny_config):
    state = {"architecture": ckpt.architecture(tiny_config), "stage": "pretrain"}
    ckpt.check_resumable(tmp_path, state, model_config=tiny_config, stage="pretrain")  # same: fine
    wider = OpenQwen2VLConfig.tiny(hidden_size=128)
    with pytest.raises(ValueError, match=r"different model config; text_config.hidden_size: checkpoint 64, this "
                                         r"run 128"):
        ckpt.check_resumable(tmp_path, state, model_config=wider, stage="pretrain")
    with pytest.raises(ValueError, match=r"written by stage 'pretrain', this run is stage 'full'"):
        ckpt.check_resumable(tmp_path, state, model_config=tiny_config, stage="full")


def test_only_complete_checkpoints_are_resumable(tmp_path):
    for step in (2, 10):
        ckpt.checkpoint_path(tmp_path, step).mkdir(parents=True)
        (ckpt.checkpoint_path(tmp_path, step) / ckpt.STATE_FILE).write_text("{}")
    ckpt.checkpoint_path(tmp_path, 12).mkdir()  # killed before its trainer_state.json
    unfinished = ckpt.checkpoint_path(tmp_path, 14).with_name("step-00000014.tmp")
    unfinished.mkdir()
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.checkpoint_path(tmp_path, 10)
    assert ckpt.remove_unfinished(tmp_path) == [unfinished] and not unfinished.exists()
    with pytest.raises(FileNotFoundError, match="is not a finished checkpoint"):
        ckpt.read_trainer_state(ckpt.checkpoint_path(tmp_path, 12))


def test_more_processes_share_a_global_map_position_but_not_a_streaming_one(tmp_path):
    """A checkpoint of 1 process scaled out to 2: map-style positions count global micro-batches (the same on every
    process), so process 1 takes process 0's; a streaming position is per process, so it is refused by name."""
    map_state = {"kind": "map", "micro_batches": 6, "per_device": 2, "world": 1, "seed": 0, "shuffle": True,
                 "num_rows": 40}
    (tmp_path / "data_rank0.json").write_text(json.dumps(map_state))
    assert ckpt._data_position(tmp_path, 1, {"world_size": 1}) == map_state
    (tmp_path / "data_rank0.json").write_text(json.dumps({"kind": "stream", "epoch": 0, "world": 1}))
    with pytest.raises(FileNotFoundError, match=r"no data position for process 1 \(data_rank1.json\): it was "
                                                r"written by 1 processes, and a streaming position"):
        ckpt._data_position(tmp_path, 1, {"world_size": 1})


# ---------------------------------------------------------------- model sources


def test_paper_init_from_a_siglip_and_a_qwen2_checkpoint(tmp_path):
    """Vision tower and LM take the checkpoints' weights exactly; the projector is fresh; exact GELU."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipConfig, SiglipModel

    from recipes.training.arguments import ModelArguments
    from recipes.training.model_setup import build_model

    torch.manual_seed(1)
    siglip = SiglipModel(SiglipConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 100},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
                       "image_size": 64, "patch_size": 8, "hidden_act": "gelu_pytorch_tanh"},
    ))
    siglip.save_pretrained(tmp_path / "siglip")
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    qwen.save_pretrained(tmp_path / "qwen")

    args = ModelArguments(vision_model_name_or_path=str(tmp_path / "siglip"),
                          text_model_name_or_path=str(tmp_path / "qwen"), num_image_tokens=16)
    model = build_model(args)
    assert model.config.vision_config.hidden_act == "gelu" and model.config.num_image_tokens == 16
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.get_input_embeddings().weight
    assert model.config.text_config.bos_token_id == build_processor(model.config).tokenizer.bos_token_id  # "<s>"
    vision_source = siglip.vision_model.state_dict()
    for name, value in model.model.vision_tower.state_dict().items():
        torch.testing.assert_close(value, vision_source[name], rtol=0, atol=0)
    for name, value in model.model.language_model.state_dict().items():
        torch.testing.assert_close(value, qwen.model.state_dict()[name], rtol=0, atol=0)
    projector = model.model.multi_modal_projector.linear_1.weight
    assert projector.std().item() == pytest.approx(model.config.text_config.initializer_range, rel=0.2)
    assert model.dtype == torch.float32 and model.config.use_cache is False


def test_init_from_a_kit_checkpoint_can_change_the_token_count(tmp_path, tiny_config):
    from recipes.training.arguments import ModelArguments
    from recipes.training.model_setup import build_model

    torch.manual_seed(0)
    source = OpenQwen2VLForConditionalGeneration(tiny_config)
    source.save_pretrained(tmp_path / "kit")
    model = build_model(ModelArguments(model_name_or_path=str(tmp_path / "kit"), num_image_tokens=64))
    assert model.config.num_image_tokens == 64
    for (name, value), (_, expected) in zip(model.state_dict().items(), source.state_dict().items()):
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
    pixels = torch.randn(1, 3, 64, 64)
    features = model.model.get_image_features(pixels).pooler_output
    assert [f.shape for f in features] == [(64, tiny_config.text_config.hidden_size)]
