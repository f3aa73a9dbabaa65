"""Parity: a converted checkpoint reproduces the original forward (the independent reference) and its token ids.

One tiny random model is written in the original layout and converted twice through the CLI entry point, with the
pretraining arch_specifier (144 tokens) and the SFT one (729 tokens). The converted folders are loaded through the
Auto classes and compared with the reference on (a) packed pretraining rows with several images and right padding,
(b) an SFT chat row, plus the README prompt's ids and greedy generation.
"""

import json

import pytest
import torch
from test_convert_reference import (
    BOS_ID,
    EOS_ID,
    IMAGE_PAD_ID,
    PAD_ID,
    build_reference,
    expand,
    generate_batch_ids,
    pretraining_doc_ids,
    right_pad,
    run_config,
    sft_ids,
    tiny_base_config,
)
from transformers import AutoModelForImageTextToText, AutoProcessor

from modeling_open_qwen2vl import build_open_qwen2vl_tokenizer, format_pretraining_text, format_raw_prompt
from modeling_open_qwen2vl.convert_prismatic_to_hf import main

TOLERANCE = 1e-4
CHUNK = 160  # positions per logits comparison (the vocabulary is the real 151936 rows)


@pytest.fixture(scope="module")
def reference():
    return build_reference(seed=0)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, reference):
    """{num_image_tokens: folder} converted by the CLI from one original-layout checkpoint."""
    root = tmp_path_factory.mktemp("parity")
    torch.save(reference.checkpoint(), root / "latest-checkpoint.pt")
    tiny_base_config().save_pretrained(root / "base")
    folders = {}
    for tokens, arch in ((144, "no-align+avgpool"), (729, "full-align+729-avgpool")):
        (root / f"run{tokens}.json").write_text(json.dumps(run_config(arch)))
        out = root / f"hf{tokens}"
        assert main(["--checkpoint", str(root / "latest-checkpoint.pt"), "--config", str(root / f"run{tokens}.json"),
                     "--base-config", str(root / "base"), "--output", str(out), "--no-sha256"]) == 0
        folders[tokens] = out
    return folders


@pytest.fixture(scope="module")
def tokenizer():
    return build_open_qwen2vl_tokenizer()


def _load(folder):
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    return model, processor


def _images(easy_vqa_images, count):
    return [easy_vqa_images[i % len(easy_vqa_images)].rotate(17 * i) for i in range(count)]


@torch.no_grad()
def assert_logits_match(model, inputs, reference, ref_ids, ref_pixels):
    """Every non-padding position's logits, compared chunk by chunk (full-vocabulary logits are large)."""
    mask = inputs["attention_mask"].bool()
    length = mask.shape[1]
    worst = 0.0
    for start in range(0, length, CHUNK):
        positions = torch.arange(start, min(start + CHUNK, length))
        ours = model(**inputs, logits_to_keep=positions).logits
        theirs = reference(ref_ids, ref_pixels, logits_to_keep=positions).logits
        assert theirs.shape == ours.shape
        keep = mask[:, positions]
        worst = max(worst, float((ours - theirs).abs()[keep].max()))
    assert worst <= TOLERANCE, f"max |logits difference| {worst:.3g} > {TOLERANCE}"
    return worst


def test_converted_config_and_processor(converted):
    for tokens, folder in converted.items():
        config = json.loads((folder / "config.json").read_text())
        assert config["num_image_tokens"] == tokens
        assert config["vision_config"]["hidden_act"] == "gelu" and config["vision_feature_layer"] == -2
        _, processor = _load(folder)
        assert processor.num_image_tokens == tokens
        assert processor.chat_template["default"] == processor.chat_template["compat"]


def test_packed_pretraining_rows_at_144_tokens_match_the_original(converted, reference, tokenizer, easy_vqa_images):
    """(a) Two packs (3 and 2 documents, one image each), right padded: documents attend across the pack."""
    model, processor = _load(converted[144])
    packs = [["a red circle", "two blue squares on grey", "triangle"], ["green rectangle at the top", "x"]]
    images = _images(easy_vqa_images, 5)
    per_pack = [images[:3], images[3:]]

    texts = ["".join(format_pretraining_text(caption) for caption in pack) for pack in packs]
    inputs = processor(text=texts, images=per_pack, padding="longest", padding_side="right", return_tensors="pt")
    original_rows = [sum((pretraining_doc_ids(c, tokenizer) for c in pack), []) for pack in packs]
    for row, original in enumerate(original_rows):
        real = inputs["attention_mask"][row].bool()
        assert inputs["input_ids"][row][real].tolist() == expand(original, 144)
    assert inputs["attention_mask"][1].sum() < inputs["attention_mask"].shape[1]  # the second pack is padded

    pixels = inputs["pixel_values"]
    ref_pixels = [list(pixels[:3]), list(pixels[3:])]
    reference.set_query_num(144)
    assert_logits_match(model, inputs, reference, right_pad(original_rows), ref_pixels)


def test_sft_chat_row_at_729_tokens_matches_the_original(converted, reference, tokenizer, easy_vqa_images):
    """(b) The compat chat template + processor give the original SFT ids (quirks included) and the same logits."""
    model, processor = _load(converted[729])
    conversation = ["<image>\nWhat shape is in the picture?", "A blue circle.", "And its colour?", "Blue."]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is in the picture?"}]},
        {"role": "assistant", "content": "A blue circle."},
        {"role": "user", "content": "And its colour?"},
        {"role": "assistant", "content": "Blue."},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    image = _images(easy_vqa_images, 1)
    inputs = processor(text=text, images=image, return_tensors="pt")
    original = sft_ids(conversation, tokenizer)
    assert inputs["input_ids"][0].tolist() == expand(original, 729)
    # The first-turn quirk: the "\n" after the image is gone, "What" follows the 729 placeholders directly.
    assert inputs["input_ids"][0][original.index(-200) + 729].item() == tokenizer("What").input_ids[0]

    reference.set_query_num(729)
    assert_logits_match(model, inputs, reference, torch.tensor([original]), [[inputs["pixel_values"][0]]])


def test_readme_prompt_ids_and_greedy_generation_match_generate_batch(converted, reference, tokenizer,
                                                                      easy_vqa_images):
    """README: generate_batch(image, ["<image>\\nDescribe the image."], do_sample=False) on the 729-token model."""
    model, processor = _load(converted[729])
    prompt = "<image>\nDescribe the image."
    image = _images(easy_vqa_images, 1)
    inputs = processor(text=format_raw_prompt(prompt), images=image, return_tensors="pt")
    original = generate_batch_ids(prompt, tokenizer)
    assert original[:2] == [BOS_ID, -200] and inputs["input_ids"][0].tolist() == expand(original, 729)

    assert model.generation_config.do_sample is False and model.generation_config.eos_token_id == EOS_ID
    assert model.generation_config.pad_token_id == PAD_ID
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=6)[0, inputs["input_ids"].shape[1]:].tolist()
    reference.set_query_num(729)
    expected = reference.greedy(torch.tensor([original]), [[inputs["pixel_values"][0]]], max_new_tokens=6)
    assert generated == expected


def test_one_checkpoint_serves_both_resolutions(converted):
    """144 and 729 tokens are a config change: the converted weights are identical."""
    from safetensors.torch import load_file

    a, b = (load_file(converted[t] / "model.safetensors") for t in (144, 729))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert IMAGE_PAD_ID == json.loads((converted[144] / "config.json").read_text())["image_token_id"]
