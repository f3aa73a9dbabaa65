"""Processor: real Qwen tokenizer ids, <image> expansion, the original's text formats and chat quirks."""

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_open_qwen2vl import (
    OpenQwen2VLProcessor,
    build_open_qwen2vl_tokenizer,
    format_pretraining_text,
    format_raw_prompt,
)

N = 16  # tiny config's num_image_tokens
IMG = 151655
BOS = 128245
SENTINEL = -200


def test_tokenizer_ids_match_the_released_model():
    tok = build_open_qwen2vl_tokenizer()
    assert len(tok) == 151666  # Qwen2.5's 151665 + <|endofchunk|>; <s> reuses an existing BPE id
    assert tok.convert_tokens_to_ids("<|endofchunk|>") == 151665
    assert tok.bos_token == "<s>" and tok.bos_token_id == 128245
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert tok("Hello, world!").input_ids == [9707, 11, 1879, 0]
    assert tok("<s>hi<|endofchunk|>").input_ids == [128245, 6023, 151665]
    assert tok.convert_ids_to_tokens(151664) == "<|file_sep|>"  # Qwen3-only added tokens dropped after this


def test_image_marker_expands_to_num_image_tokens(processor, easy_vqa_images):
    enc = processor(text=["<s><image>\nA<image>B", "<s>no image"], images=easy_vqa_images[:2], padding=True,
                    return_tensors="pt")
    assert (enc["input_ids"][0] == IMG).sum() == 2 * N
    assert (enc["input_ids"][1] == IMG).sum() == 0
    assert enc["pixel_values"].shape == (2, 3, 64, 64)
    assert enc["attention_mask"][1].sum() == len(processor.tokenizer("<s>no image").input_ids)


@pytest.mark.parametrize("n_images", [0, 1, 3])
def test_image_count_mismatch_raises_with_counts(processor, easy_vqa_images, n_images):
    with pytest.raises(ValueError, match=rf"2 <image> marker\(s\) \(per text: \[2\]\) but {n_images} image\(s\)"):
        processor(text="<image><image>", images=easy_vqa_images[:n_images] or None)


def test_per_text_image_lists_must_match_markers(processor, easy_vqa_images):
    with pytest.raises(ValueError, match=r"images per text \[2, 0\] do not match <image> markers per text \[1, 1\]"):
        processor(text=["<image>a", "<image>b"], images=[easy_vqa_images[:2], []])


def test_pixel_values_are_a_bicubic_squash_to_minus_one_one(processor):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 90, 3), dtype=np.uint8))
    got = processor(text="<image>", images=[img])["pixel_values"][0]
    expected = np.asarray(img.resize((64, 64), Image.BICUBIC), dtype=np.float32) / 255.0
    expected = torch.from_numpy((expected - 0.5) / 0.5).permute(2, 0, 1)
    torch.testing.assert_close(torch.as_tensor(got), expected, atol=2e-2, rtol=0)
    assert float(torch.as_tensor(got).min()) >= -1.0 and float(torch.as_tensor(got).max()) <= 1.0


def test_processor_is_built_on_the_pil_backend_without_a_torchvision_warning():
    """The original resizes PIL images with PIL; transformers warned on every build that torchvision is missing."""
    import os
    import subprocess
    import sys

    code = ("from modeling_open_qwen2vl import OpenQwen2VLConfig, build_processor; "
            "print(type(build_processor(OpenQwen2VLConfig.tiny()).image_processor).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["SiglipImageProcessorPil"]
    assert "torchvision" not in result.stderr


def test_grayscale_and_rgba_images_are_converted(processor):
    for mode in ("L", "RGBA", "P", "CMYK"):
        out = processor(text="<image>", images=[Image.new(mode, (30, 20))])
        assert tuple(out["pixel_values"].shape) == (1, 3, 64, 64)


def test_pretraining_format(processor):
    text = format_pretraining_text("a red circle <image> on white")
    assert text == "<s><image>\na red circle <image-placeholder> on white<|im_end|>"
    ids = processor(text=text, images=[Image.new("RGB", (8, 8))])["input_ids"][0]
    tok = processor.tokenizer
    assert ids == [BOS] + [IMG] * N + tok.encode("\na red circle <image-placeholder> on white<|im_end|>")


def _original_tokenizer_image_token(prompt, tok):
    """LLaVA's tokenizer_image_token as the digest specifies it (sentinel -200 per <image>)."""
    chunks = [tok.encode(c) for c in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(SENTINEL)
        ids.extend(chunk[offset:])
    return ids


def _expand(ids):
    out = []
    for t in ids:
        out.extend([IMG] * N if t == SENTINEL else [t])
    return out


def test_readme_prompt_matches_the_original_generate_batch_path(compat_processor):
    tok = compat_processor.tokenizer
    prompt = "<image>\nDescribe the image."
    original = [tok.bos_token_id] + _original_tokenizer_image_token(prompt, tok)  # generate_batch prepends <s>
    ours = compat_processor(text=format_raw_prompt(prompt), images=[Image.new("RGB", (8, 8))])["input_ids"][0]
    assert ours == _expand(original)
    assert ours[N + 1] == 198  # the "\n" after the image is kept on this path


SYSTEM = "<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def _original_prompt_builder_turns(turns):
    """Qwen2PromptBuilder.add_turn as the digest specifies it: one string per turn."""
    out = []
    for i, msg in enumerate(turns):
        msg = msg.strip()
        if i % 2 == 0:
            wrapped = "<|im_start|>user\n" + msg + "<|im_end|>assistant\n"
            out.append(SYSTEM + wrapped if i == 0 else wrapped)
        else:
            out.append((msg if msg else " ") + "<|im_end|>\n")
    return out


CONVERSATION = [
    ("user", "<image>\nWhat is in the picture?"),
    ("assistant", "A blue circle."),
    ("user", "What colour is the shape?\n<image>"),
    ("assistant", ""),
    ("user", "  And now?  "),
    ("assistant", "Green."),
]


def _messages(conv):
    msgs = []
    for role, text in conv:
        parts = [p for p in text.split("\n")]
        content = []
        for p in parts:
            content.append({"type": "image"} if p == "<image>" else {"type": "text", "text": p})
        msgs.append({"role": role, "content": content if "<image>" in text else text})
    return msgs


def test_compat_template_reproduces_the_original_strings(compat_processor):
    single = compat_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
         {"role": "assistant", "content": "A"}], tokenize=False)
    assert single == ("<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                      "<|im_start|>user\n<image>\nQ<|im_end|>assistant\nA<|im_end|>\n")
    rendered = compat_processor.apply_chat_template(_messages(CONVERSATION), tokenize=False)
    assert rendered == "".join(_original_prompt_builder_turns([t for _, t in CONVERSATION]))
    assert rendered == (
        "<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>assistant\nA blue circle.<|im_end|>\n"
        "<|im_start|>user\nWhat colour is the shape?\n<image><|im_end|>assistant\n <|im_end|>\n"
        "<|im_start|>user\nAnd now?<|im_end|>assistant\nGreen.<|im_end|>\n"
    )


def test_compat_sft_ids_match_per_turn_tokenizer_image_token(compat_processor):
    tok = compat_processor.tokenizer
    for conv in (CONVERSATION, [("user", "Describe\n<image>"), ("assistant", "A square.")]):
        original = []
        for turn in _original_prompt_builder_turns([t for _, t in conv]):
            original.extend(_original_tokenizer_image_token(turn, tok))
        text = compat_processor.apply_chat_template(_messages(conv), tokenize=False)
        n_images = text.count("<image>")
        ours = compat_processor(text=text, images=[Image.new("RGB", (8, 8))] * n_images)["input_ids"][0]
        assert ours == _expand(original)
    # the quirk itself: the first turn loses the token after each image (here <|im_end|>), later turns do not
    ids = compat_processor(text=text, images=[Image.new("RGB", (8, 8))])["input_ids"][0]
    after_image = ids[ids.index(IMG) + N]
    assert tok.decode([after_image]) == "assistant"


def test_chatml_template(processor):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}]
    assert processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nQ<|im_end|>\n<|im_start|>assistant\n"
    )
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}]
    assert processor.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    )


def test_chat_template_with_images_returns_pixel_values(processor, easy_vqa_images):
    msgs = [{"role": "user", "content": [{"type": "image", "image": easy_vqa_images[0]},
                                         {"type": "text", "text": "What shape?"}]}]
    out = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 64, 64)
    assert int((out["input_ids"] == IMG).sum()) == N


def test_truncation_never_cuts_through_an_image(processor):
    text = "<s>" + "word " * 10 + "<image>"
    with pytest.raises(ValueError, match="would cut through an image's 16 placeholders"):
        processor(text=text, images=[Image.new("RGB", (8, 8))], truncation=True, max_length=15)
    out = processor(text="<s><image>" + "word " * 30, images=[Image.new("RGB", (8, 8))], truncation=True,
                    max_length=20)
    assert len(out["input_ids"][0]) == 20


def test_processor_save_and_reload(tmp_path, compat_processor):
    compat_processor.save_pretrained(tmp_path)
    loaded = OpenQwen2VLProcessor.from_pretrained(tmp_path)
    assert loaded.num_image_tokens == N and loaded.image_token_id == IMG
    assert loaded.chat_template["default"] == compat_processor.chat_template["compat"]
    assert set(loaded.chat_template) >= {"default", "compat", "chatml"}
    ip = loaded.image_processor
    assert ip.size == {"height": 64, "width": 64} and list(ip.image_mean) == [0.5] * 3 and int(ip.resample) == 3
    text = "<s><image>\nhello"
    assert loaded(text=text, images=[Image.new("RGB", (8, 8))])["input_ids"] == \
        compat_processor(text=text, images=[Image.new("RGB", (8, 8))])["input_ids"]


def _two_turns(image):
    return [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What shape?"}]},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "And the colour?"},
        {"role": "assistant", "content": "Red, mostly."},
    ]


@pytest.mark.parametrize("template", ["chatml", "compat"])
def test_assistant_masks_cover_exactly_the_answers(processor, easy_vqa_images, template):
    conversation = _two_turns(easy_vqa_images[0])
    out = processor.apply_chat_template(conversation, chat_template=template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"][0], out["assistant_masks"][0]
    # Same ids as without masks (the offsets path tokenizes like encode_text, compat's first-turn quirk included).
    assert ids == processor.apply_chat_template(conversation, chat_template=template, tokenize=True)[0]
    answers = "A red circle.<|im_end|>\nRed, mostly.<|im_end|>\n"
    assert processor.decode([t for t, m in zip(ids, mask) if m]) == answers
    assert not any(m for t, m in zip(ids, mask) if t == IMG)


def test_offsets_follow_left_padding_and_trl_assistant_only_loss_works(processor, easy_vqa_images):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    texts = ["<s><image>\nab", "<s>a much longer text without an image"]
    out = processor(text=texts, images=easy_vqa_images[:1], padding=True, padding_side="left",
                    return_offsets_mapping=True)
    for text, ids, spans in zip(texts, out["input_ids"], out["offset_mapping"]):
        assert len(spans) == len(ids)
        real = [(i, s) for i, s in zip(ids, spans) if s != (0, 0)]
        pad = len(ids) - len(real)
        assert all(s == (0, 0) for s in spans[:pad])  # the padding is on the left
        assert all(text[a:b] == "<image>" for i, (a, b) in real if i == IMG)
        assert "".join(text[a:b] for i, (a, b) in real if i != IMG) == text.replace("<image>", "")
    collator = DataCollatorForVisionLanguageModeling(processor=processor, assistant_only_loss=True)
    messages = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else "What shape?"}
                for m in _two_turns(None)]  # TRL puts the image into the first user turn itself
    batch = collator([{"images": [easy_vqa_images[0]], "messages": messages}])
    assert int((batch["input_ids"] == IMG).sum()) == N
    supervised = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert processor.decode(supervised) == "A red circle.<|im_end|>\nRed, mostly.<|im_end|>\n"


def test_image_options_reach_the_image_processor_and_unknown_ones_are_named(processor, caplog):
    hwc = np.random.default_rng(0).integers(0, 256, size=(3, 40, 3), dtype=np.uint8)  # height 3: ambiguous layout
    expected = processor.image_processor(hwc, input_data_format="channels_last", return_tensors="pt")["pixel_values"]
    got = processor(text="<image>", images=[hwc], input_data_format="channels_last")["pixel_values"]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    small = processor(images=[Image.new("RGB", (8, 8))], images_kwargs={"size": {"height": 32, "width": 32}})
    assert small["pixel_values"].shape == (1, 3, 32, 32)
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    processor(text="hi", foo_bar_option=1)
    assert "ignores the keyword argument(s) ['foo_bar_option']" in caplog.text


def test_truncation_without_max_length_uses_the_model_max_length(processor):
    long = "<s>" + "word " * (processor.tokenizer.model_max_length + 100)
    assert len(processor(text=long, truncation=True)["input_ids"][0]) == processor.tokenizer.model_max_length
    assert len(processor(text=long)["input_ids"][0]) > processor.tokenizer.model_max_length


def test_literal_placeholder_token_in_the_text_is_refused_naming_the_text(processor, easy_vqa_images):
    with pytest.raises(ValueError, match=r"text 1 contains the literal token <\|image_pad\|>; mark images with"):
        processor(text=["<s><image>\nfine", "<s>quoting <|image_pad|> here"], images=easy_vqa_images[:1])
