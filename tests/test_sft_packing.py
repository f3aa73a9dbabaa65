"""Isolated SFT packing: every conversation's loss equals its unpacked loss (TRL's training forward included)."""

import copy
import json

import pytest
import torch

from modeling_open_qwen2vl import OpenQwen2VLConfig, OpenQwen2VLForConditionalGeneration
from recipes.sft_data import PackedSFTCollator, SFTCollator, SFTEncoder, encode_sft_dataset, load_raw_sft_dataset
from recipes.sft_data.packing import pack_sft_dataset

IGNORE = -100


@pytest.fixture(scope="module")
def conversations(tmp_path_factory, easy_vqa_images):
    folder = tmp_path_factory.mktemp("pack")
    rows = []
    for i in range(6):
        images = []
        if i % 3 != 2:  # every third conversation is text only
            easy_vqa_images[i % 4].save(folder / f"{i}.png")
            images = [f"{i}.png"]
        user = ("<image>\n" if images else "") + "What is shown? " * (i + 1)
        rows.append({"id": f"c{i}", "messages": [{"role": "user", "content": user},
                                                 {"role": "assistant", "content": "A shape, " * (i + 1)},
                                                 {"role": "user", "content": "Colour?"},
                                                 {"role": "assistant", "content": "Blue."}],
                     "images": images})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), str(folder)


@pytest.fixture(scope="module")
def encoded(conversations, processor):
    path, folder = conversations
    return encode_sft_dataset(load_raw_sft_dataset(path), SFTEncoder(processor, "chatml"), image_root=folder)


def _label_log_probs(model, batch):
    """Per-row sum of log p(label) over supervised positions, from full logits (independent of TRL)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inputs["use_cache"] = False
    with torch.no_grad():
        logits = model(**inputs).logits.double()
    labels = batch["labels"][:, 1:]
    log_probs = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return torch.where(labels != IGNORE, log_probs, torch.zeros_like(log_probs))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_of_each_conversation_equals_its_unpacked_loss(encoded, processor, attention):
    torch.manual_seed(0)
    model = OpenQwen2VLForConditionalGeneration(OpenQwen2VLConfig.tiny()).eval()
    model.set_attn_implementation(attention)
    rows = [encoded[i] for i in range(len(encoded))]
    alone = [_label_log_probs(model, SFTCollator(processor)([row])).sum().item() for row in rows]

    pack = {name: [row[name] for row in rows] for name in ("sample_id", "input_ids", "labels", "images")}
    batch = PackedSFTCollator(processor)([pack])
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    bounds = batch["cu_seq_lens_q"].tolist()
    starts = bounds[:-1]
    assert batch["position_ids"][0, starts].tolist() == [0] * len(rows)
    assert (batch["labels"][0, starts] == IGNORE).all()
    per_position = _label_log_probs(model, batch)[0]
    packed = [per_position[a:b - 1].sum().item() for a, b in zip(bounds[:-1], bounds[1:])]
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(alone), rtol=0, atol=1e-4)

    # Without the position restarts (the paper's "faithful" layout) later conversations see earlier ones.
    faithful = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1])[None])
    leaked = _label_log_probs(model, faithful)[0]
    leaked = [leaked[a:b - 1].sum().item() for a, b in zip(bounds[:-1], bounds[1:])]
    assert abs(leaked[-1] - alone[-1]) > 1e-3


def test_trl_fused_training_forward_sees_isolated_conversations(encoded, processor):
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(1)
    model = OpenQwen2VLForConditionalGeneration(OpenQwen2VLConfig.tiny()).eval()
    fused = copy.deepcopy(model)
    add_fused_lm_head(fused)
    rows = [encoded[i] for i in range(len(encoded))]
    pack = {name: [row[name] for row in rows] for name in ("sample_id", "input_ids", "labels", "images")}
    batch = PackedSFTCollator(processor)([pack])
    with torch.no_grad():  # the call SFTTrainer.compute_loss makes
        out = fused(**batch, fused_lm_head=True)
    bounds = batch["cu_seq_lens_q"].tolist()
    packed = [out.log_probs[0, a:b - 1].sum().item() for a, b in zip(bounds[:-1], bounds[1:])]
    alone = [_label_log_probs(model, SFTCollator(processor)([row])).sum().item() for row in rows]
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(alone), rtol=0, atol=1e-3)


def test_map_style_packs_hold_every_conversation_once_within_capacity(encoded, processor):
    capacity = 160
    packs = pack_sft_dataset(encoded, capacity=capacity)
    seen = []
    for i in range(len(packs)):
        pack = packs[i]
        assert sum(pack["length"]) <= capacity
        seen += pack["sample_id"]
        for sample_id, ids in zip(pack["sample_id"], pack["input_ids"]):
            assert ids == encoded[int(sample_id[1:])]["input_ids"]
    assert sorted(seen) == sorted(encoded["sample_id"])
    assert len(packs) < len(encoded)
    batch = PackedSFTCollator(processor)([packs[0], packs[1]])
    assert batch["input_ids"].shape[1] == sum(packs[0]["length"]) + sum(packs[1]["length"])
    n_images = sum(len(x) for p in (packs[0], packs[1]) for x in p["images"])
    assert batch.get("pixel_values", torch.zeros(0)).shape[0] == n_images


def test_packing_refuses_a_conversation_longer_than_capacity(encoded):
    with pytest.raises(ValueError, match="cannot be packed into capacity 20"):
        pack_sft_dataset(encoded, capacity=20)


def test_streaming_packs_cover_the_stream(conversations, processor):
    pytest.importorskip("dataset_builders.streaming_packing", reason="the streaming packer is not in this checkout")
    path, folder = conversations
    stream = encode_sft_dataset(load_raw_sft_dataset(path, streaming=True), SFTEncoder(processor, "chatml"),
                                image_root=folder)
    packs = list(pack_sft_dataset(stream, capacity=160, buffer_size=4))
    assert sorted(s for p in packs for s in p["sample_id"]) == [f"c{i}" for i in range(6)]
    assert all(sum(p["length"]) <= 160 for p in packs)
