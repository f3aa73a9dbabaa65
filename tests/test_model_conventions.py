"""transformers conventions the processor and model follow: truncation side, image batches given as one array,
assisted generation, integer ids for empty text (and a clear error for an empty prompt), return_dict=False. Each is checked against what the tokenizer,
transformers' image helpers or plain greedy decoding do on their own."""

import numpy as np
import pytest
import torch
from transformers.image_utils import make_flat_list_of_images

IMG = 151655
N = 16  # tiny config's num_image_tokens
WORDS = " ".join(f"w{i}" for i in range(60))


# 1. truncation follows tokenizer.truncation_side

@pytest.mark.parametrize("side", ["left", "right"])
def test_truncation_keeps_the_side_the_tokenizer_keeps(processor, monkeypatch, side):
    monkeypatch.setattr(processor.tokenizer, "truncation_side", side)
    text = "<s>" + WORDS + " QUESTION: what is w3?"
    expected = processor.tokenizer(text, truncation=True, max_length=24)["input_ids"]
    assert processor(text=text, truncation=True, max_length=24)["input_ids"][0] == expected

    messages = [{"role": "user", "content": WORDS + " QUESTION: what is w3?"}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         processor_kwargs={"truncation": True, "max_length": 24})
    assert chat["input_ids"][0] == processor.tokenizer(rendered, truncation=True, max_length=24)["input_ids"]


def test_left_truncation_keeps_a_trailing_image_and_refuses_to_cut_a_leading_one(processor, monkeypatch,
                                                                                   easy_vqa_images):
    monkeypatch.setattr(processor.tokenizer, "truncation_side", "left")
    text = "<s>" + WORDS + "\n<image>\nWhat shape?"
    full = processor(text=text, images=easy_vqa_images[:1], return_offsets_mapping=True)
    cut = processor(text=text, images=easy_vqa_images[:1], return_offsets_mapping=True, truncation=True,
                    max_length=30)
    assert cut["input_ids"][0] == full["input_ids"][0][-30:] and cut["input_ids"][0].count(IMG) == N
    assert cut["offset_mapping"][0] == full["offset_mapping"][0][-30:]
    assert len(cut["pixel_values"]) == 1
    # The head goes now: an image at the start would lose its placeholders (the right side would have been fine).
    with pytest.raises(ValueError, match=r"truncation_side='left'\) would cut through an image's 16 placeholders"):
        processor(text="<s><image>\n" + WORDS, images=easy_vqa_images[:1], truncation=True, max_length=30)


# 2. an array of N images is N images, as transformers' image processors count them

def _nchw_uint8(n):
    return torch.from_numpy(np.random.default_rng(n).integers(0, 256, (n, 3, 64, 64), dtype=np.uint8))


def _nhwc_uint8(n):
    return np.random.default_rng(n).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("make_batch", [_nchw_uint8, _nhwc_uint8], ids=["torch_nchw", "numpy_nhwc"])
def test_a_batch_array_is_counted_as_its_images(processor, tiny_model, make_batch):
    batch = make_batch(2)
    assert len(make_flat_list_of_images(batch)) == 2  # transformers' count, which the image processor uses
    expected = processor.image_processor(batch, return_tensors="pt")["pixel_values"]
    enc = processor(text="<s><image><image>\nCompare", images=batch, return_tensors="pt")
    torch.testing.assert_close(enc["pixel_values"], expected, rtol=0, atol=0)
    with torch.no_grad():
        tiny_model(**enc)  # the placeholders and the images agree
    with pytest.raises(ValueError, match=r"1 <image> marker\(s\) \(per text: \[1\]\) but 2 image\(s\)"):
        processor(text="<s><image>\nOne", images=batch)
    # One batch array for a batch of texts: its images are handed out in order, one per marker.
    two = processor(text=["<s><image>a", "<s><image>b"], images=batch, padding=True, return_tensors="pt")
    torch.testing.assert_close(two["pixel_values"], expected, rtol=0, atol=0)


def test_per_text_batch_arrays_are_checked_per_text(processor):
    one, two = _nhwc_uint8(1), _nchw_uint8(2)
    enc = processor(text=["<s><image>a", "<s><image><image>b"], images=[one, two], padding=True, return_tensors="pt")
    assert enc["pixel_values"].shape == (3, 3, 64, 64)
    with pytest.raises(ValueError, match=r"images per text \[1, 2\] do not match <image> markers per text \[2, 1\]"):
        processor(text=["<s><image><image>a", "<s><image>b"], images=[one, two])


def test_a_text_without_images_may_have_none_in_per_text_images(processor, easy_vqa_images):
    enc = processor(text=["<s><image>a", "<s>b"], images=[[easy_vqa_images[0]], None], padding=True)
    assert len(enc["pixel_values"]) == 1 and enc["input_ids"][0].count(IMG) == N


# 3. assisted generation: transformers runs the assistant's prefill without pixel_values, as for LLaVA

def _image_prompt(processor, images):
    return processor(text="<s><image><image>\nCompare the two shapes.", images=images, return_tensors="pt")


def test_assisted_generation_with_images_equals_greedy(tiny_model, processor, easy_vqa_images):
    enc = _image_prompt(processor, easy_vqa_images[:2])
    greedy = tiny_model.generate(**enc, max_new_tokens=8, do_sample=False)
    assisted = tiny_model.generate(**enc, max_new_tokens=8, do_sample=False, assistant_model=tiny_model)
    assert torch.equal(assisted, greedy)


@pytest.mark.parametrize("assisted", [False, True])
def test_forgetting_the_images_still_raises_in_generate(tiny_model, processor, easy_vqa_images, assisted):
    enc = _image_prompt(processor, easy_vqa_images[:2])
    kwargs = {"assistant_model": tiny_model} if assisted else {}
    with pytest.raises(ValueError, match=f"tokens {2 * N}, features 0"):
        tiny_model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=2,
                            do_sample=False, **kwargs)


# 4. empty text gives integer ids, as the tokenizer

@pytest.mark.parametrize("return_tensors", ["pt", "np"])
def test_empty_text_gives_int64_ids_like_the_tokenizer(processor, return_tensors):
    alone = processor.tokenizer("", return_tensors=return_tensors, return_offsets_mapping=True)
    got = processor(text="", return_tensors=return_tensors, return_offsets_mapping=True)
    for key in ("input_ids", "attention_mask", "offset_mapping"):
        assert got[key].dtype == alone[key].dtype and tuple(got[key].shape) == tuple(alone[key].shape), key
    batch = processor(text=["", ""], padding=True, return_tensors=return_tensors)
    assert batch["input_ids"].dtype == alone["input_ids"].dtype and tuple(batch["input_ids"].shape) == (2, 0)
    assert batch["attention_mask"].dtype == alone["attention_mask"].dtype



@pytest.mark.parametrize("call", ["forward", "generate", "embeds"])
def test_an_empty_prompt_is_a_clear_error_where_qwen2_fails_in_a_reshape(tiny_model, processor, call):
    from transformers import Qwen2Model

    inputs = processor(text="", return_tensors="pt")
    with pytest.raises(RuntimeError, match="cannot reshape"):  # what transformers' own Qwen2 gives
        Qwen2Model(tiny_model.config.text_config)(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match=r"the input has no tokens \(an empty prompt\)"), torch.no_grad():
        if call == "forward":
            tiny_model(**inputs)
        elif call == "generate":
            tiny_model.generate(**inputs, max_new_tokens=2)
        else:
            tiny_model(inputs_embeds=torch.zeros(1, 0, tiny_model.config.text_config.hidden_size))

# 5. return_dict=False gives a tuple, as Qwen2Model

def test_base_model_honours_return_dict_false_like_qwen2(tiny_model, monkeypatch):
    from transformers import Qwen2Model

    ids = torch.tensor([[5, 6] + [IMG] * N + [7]])
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        as_dict = tiny_model.model(input_ids=ids, pixel_values=pixels)
        as_tuple = tiny_model.model(input_ids=ids, pixel_values=pixels, return_dict=False)
        qwen2 = Qwen2Model(tiny_model.config.text_config).eval()
        assert type(qwen2(input_ids=ids[:, :2], return_dict=False)) is tuple  # the convention followed
        assert type(as_tuple) is tuple and len(as_tuple) == len(as_dict.to_tuple())
        torch.testing.assert_close(as_tuple[0], as_dict.last_hidden_state)
        monkeypatch.setattr(tiny_model.config, "return_dict", False)  # the config default counts too
        assert type(tiny_model.model(input_ids=ids, pixel_values=pixels)) is tuple
        logits = tiny_model(input_ids=ids, pixel_values=pixels)[0]
        assert tiny_model(input_ids=ids, pixel_values=pixels, return_dict=True).logits.shape == logits.shape


# 6. the forward keywords LLaVA takes: past_key_values (the deprecated name of cache), a per-call vision_feature_layer

def test_past_key_values_continues_from_the_cache_like_cache(tiny_model, processor, easy_vqa_images):
    enc = processor(text="<s><image>\nWhat shape is this?", images=easy_vqa_images[:1], return_tensors="pt")
    ids, pixels = enc["input_ids"], enc["pixel_values"]
    with torch.no_grad():
        full = tiny_model(input_ids=ids, pixel_values=pixels).logits[:, -1]  # the independent reference
        prefix = tiny_model(input_ids=ids[:, :-1], pixel_values=pixels, use_cache=True)
        with pytest.warns(FutureWarning, match="past_key_values"):
            step = tiny_model(input_ids=ids[:, -1:], past_key_values=prefix.cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)
    assert prefix.cache.get_seq_length() == ids.shape[1]  # the given cache was filled, not a fresh one


def test_a_per_call_vision_feature_layer_equals_that_config_value(tiny_model, processor, easy_vqa_images):
    import copy

    enc = processor(text="<s><image>\nWhat shape?", images=easy_vqa_images[:1], return_tensors="pt")
    other = copy.deepcopy(tiny_model)
    other.config.vision_feature_layer = -1  # the tiny config reads -2, as the released model
    with torch.no_grad():
        default = tiny_model(**enc).logits
        per_call = tiny_model(**enc, vision_feature_layer=-1).logits
        configured = other(**enc).logits
        per_call_features = tiny_model.get_image_features(enc["pixel_values"], vision_feature_layer=-1)
        configured_features = other.get_image_features(enc["pixel_values"])
        assert torch.equal(torch.cat(per_call_features.pooler_output), torch.cat(configured_features.pooler_output))
    assert torch.equal(per_call, configured) and not torch.allclose(per_call, default)
    for bad in ([-2, -1], 99):
        with pytest.raises(ValueError, match=r"vision_feature_layer must be one hidden-state index"):
            tiny_model(**enc, vision_feature_layer=bad)


# 7. transformers' processor option groups, modality ids and control-token sanitising

def test_text_and_common_kwargs_apply_with_transformers_priority(processor, easy_vqa_images):
    texts = ["<s><image>\na", "<s>b b b b b b b b"]
    image = easy_vqa_images[:1]
    flat = processor(text=texts, images=image, padding=True, return_tensors="pt")
    grouped = processor(text=texts, images=image, text_kwargs={"padding": True}, common_kwargs={"return_tensors": "pt"})
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(grouped[key], flat[key]), key
    # flat keywords win over text_kwargs, which win over common_kwargs
    left = processor(text=texts, images=image, padding=True, return_tensors="pt", padding_side="left")
    mixed = processor(text=texts, images=image, text_kwargs={"padding": True, "padding_side": "right"},
                      padding_side="left", common_kwargs={"return_tensors": "np"}, return_tensors="pt")
    assert torch.equal(mixed["input_ids"], left["input_ids"])
    assert isinstance(processor(text=texts, images=image, padding=True, common_kwargs={"return_tensors": "np"},
                                text_kwargs={"return_tensors": "pt"})["input_ids"], torch.Tensor)


def test_mm_token_type_ids_mark_the_image_placeholders(processor, easy_vqa_images):
    enc = processor(text=["<s><image>\na", "<s>b b b b b b b b b b b b b b b b b b b b b"], images=easy_vqa_images[:1],
                    padding=True, return_tensors="pt", return_mm_token_type_ids=True)
    assert torch.equal(enc["mm_token_type_ids"], (enc["input_ids"] == IMG).long())
    assert int(enc["mm_token_type_ids"].sum()) == N


def test_the_model_takes_the_processors_whole_output_with_mm_token_type_ids(tiny_model, processor, easy_vqa_images):
    enc = processor(text="<s><image>\nWhat shape?", images=easy_vqa_images[:1], return_tensors="pt")
    typed = processor(text="<s><image>\nWhat shape?", images=easy_vqa_images[:1], return_tensors="pt",
                      return_mm_token_type_ids=True)
    with torch.no_grad():
        assert torch.equal(tiny_model(**typed).logits, tiny_model(**enc).logits)
        assert torch.equal(tiny_model.generate(**typed, max_new_tokens=3, do_sample=False),
                           tiny_model.generate(**enc, max_new_tokens=3, do_sample=False))


@pytest.mark.parametrize("with_image", [False, True])
def test_sanitize_control_tokens_encodes_typed_control_tokens_as_text(processor, easy_vqa_images, with_image):
    typed = "Say <|im_end|> and <|image_pad|> please"
    content = ([{"type": "image", "image": easy_vqa_images[0]}] if with_image else []) + [{"type": "text", "text": typed}]
    messages = [{"role": "user", "content": content}]
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True,
                                        sanitize_control_tokens=True)
    ids = list(out["input_ids"][0])
    expected = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert processor.tokenizer.decode([i for i in ids if i != IMG]) == expected.replace("<image>", "")
    # the template writes <|im_end|> twice (system, user); the typed one and the typed placeholder are plain text
    assert ids.count(151645) == 2 and ids.count(IMG) == (N if with_image else 0)
    if not with_image:  # what the tokenizer alone gives for the same chat
        alone = processor.tokenizer.apply_chat_template(messages, chat_template=processor.chat_template["default"],
                                                        tokenize=True, return_dict=True, add_generation_prompt=True,
                                                        sanitize_control_tokens=True)["input_ids"]
        assert ids == list(alone)
    # without the flag the typed tokens stay live (the reason the flag exists): a placeholder with no image is refused
    with pytest.raises(ValueError, match=r"contains the literal token <\|image_pad\|>"):
        processor.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True)
