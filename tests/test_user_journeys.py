"""Standard transformers paths as a user writes them against a saved folder (trust_remote_code), each checked against
an independent computation: streaming, sampling / beams with several images per row, scores, hidden states,
static cache, compiled decoding, cache continuation, dtypes, sharding, AutoModel, resizing, PEFT, processor reload."""

import contextlib
import copy
import io
import json
import threading

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    StaticCache,
    TextIteratorStreamer,
    TextStreamer,
)

from modeling_open_qwen2vl import OpenQwen2VLConfig, OpenQwen2VLForConditionalGeneration, build_processor

N = 16  # num_image_tokens of the tiny config
PROMPT = "<s><image>\nWhat shape is in the image?"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("journeys") / "ckpt"
    OpenQwen2VLForConditionalGeneration(OpenQwen2VLConfig.tiny()).save_pretrained(path)
    build_processor(OpenQwen2VLConfig.tiny()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()


@pytest.fixture(scope="module")
def proc(folder):
    return AutoProcessor.from_pretrained(folder, trust_remote_code=True)


@pytest.fixture(scope="module")
def enc(proc, easy_vqa_images):
    return proc(text=PROMPT, images=[easy_vqa_images[0]], return_tensors="pt")


def _logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_streamers_give_the_non_streamed_text(model, proc, enc):
    kw = dict(**enc, max_new_tokens=8, do_sample=False)
    plain = model.generate(**kw)
    expected = proc.decode(plain[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert expected.strip()

    streamer = TextIteratorStreamer(proc, skip_prompt=True, skip_special_tokens=True)  # the processor decodes too
    thread = threading.Thread(target=model.generate, kwargs=dict(**kw, streamer=streamer))
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert "".join(pieces) == expected

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        model.generate(**kw, streamer=TextStreamer(proc.tokenizer, skip_prompt=True, skip_special_tokens=True))
    assert printed.getvalue() == expected + "\n"


@pytest.mark.parametrize("mode", ["sample", "beams"])
def test_every_returned_sequence_sees_its_own_rows_images(model, proc, easy_vqa_images, mode):
    """num_return_sequences / beams copy each row; a copy of a two-image row must read both images, in order.

    transformers repeats pixel_values image by image ([A, B] -> [A, A, B, B]): the copies of row 0 read A twice and B
    twice, with no error since the counts still match.
    """
    a, b, c = easy_vqa_images[:3]
    batch = proc(text=["<s><image>\n<image>\nWhich differs?", PROMPT], images=[[a, b], [c]], padding=True,
                 return_tensors="pt")
    reference = _logits(model, **batch)[:, -1]
    options = dict(do_sample=True, top_k=0) if mode == "sample" else dict(do_sample=False, num_beams=2)
    torch.manual_seed(0)
    out = model.generate(**batch, max_new_tokens=1, num_return_sequences=2, return_dict_in_generate=True,
                         output_logits=True, **options)
    first_step = out.logits[0]
    assert first_step.shape[0] == 4
    torch.testing.assert_close(first_step, reference.repeat_interleave(2, dim=0), rtol=1e-4, atol=1e-5)


def test_sampling_with_a_seed_is_reproducible(model, enc):
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(model.generate(**enc, max_new_tokens=5, do_sample=True, top_k=0, num_return_sequences=3))
    assert runs[0].shape == (3, enc["input_ids"].shape[1] + 5) and torch.equal(runs[0], runs[1])
    assert len({tuple(row.tolist()) for row in runs[0]}) > 1  # three samples, not one copied


def test_transition_scores_are_the_log_probs_of_a_forward(model, enc):
    prompt_length = enc["input_ids"].shape[1]
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_scores=True)
    scores = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)[0]
    full = _logits(model, input_ids=out.sequences, pixel_values=enc["pixel_values"])[0]
    log_probs = full[prompt_length - 1:-1].log_softmax(-1)
    expected = log_probs.gather(-1, out.sequences[0, prompt_length:, None])[:, 0]
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)

    beams = model.generate(**enc, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False,
                           return_dict_in_generate=True, output_scores=True)
    beam_scores = model.compute_transition_scores(beams.sequences, beams.scores, beams.beam_indices)
    torch.testing.assert_close(beam_scores.sum(1) / beam_scores.shape[1], beams.sequences_scores, rtol=1e-4,
                               atol=1e-4)


def test_hidden_states_and_attentions_in_forward_and_generate(folder, enc):
    eager = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True,
                                                        attn_implementation="eager").eval()
    n_layers, length = eager.config.text_config.num_hidden_layers, enc["input_ids"].shape[1]
    with torch.no_grad():
        out = eager(**enc, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == n_layers + 1 and len(out.attentions) == n_layers
    assert out.attentions[0].shape == (1, eager.config.text_config.num_attention_heads, length, length)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(out.attentions[0].shape[:-1]))
    torch.testing.assert_close(eager.lm_head(out.hidden_states[-1]), out.logits)

    gen = eager.generate(**enc, max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                         output_hidden_states=True, output_attentions=True)
    for layer in range(n_layers + 1):
        torch.testing.assert_close(gen.hidden_states[0][layer], out.hidden_states[layer])
    # The decoding step's states are those of a forward over prompt + first token, at its last position.
    with torch.no_grad():
        longer = eager(input_ids=gen.sequences[:, :-1], pixel_values=enc["pixel_values"], output_hidden_states=True,
                       output_attentions=True)
    torch.testing.assert_close(gen.hidden_states[1][-1][:, -1], longer.hidden_states[-1][:, -1], rtol=1e-4,
                               atol=1e-5)
    assert gen.attentions[1][0].shape[-2:] == (1, length + 1)
    torch.testing.assert_close(gen.attentions[1][0][..., -1, :], longer.attentions[0][..., -1, :], rtol=1e-4,
                               atol=1e-5)


def test_static_cache_generation_equals_dynamic(model, proc, easy_vqa_images):
    batch = proc(text=[PROMPT, "<s>Hello there, tell me about circles and squares."],
                 images=[[easy_vqa_images[1]], []], padding=True, return_tensors="pt")
    dynamic = model.generate(**batch, max_new_tokens=6, do_sample=False)
    static = model.generate(**batch, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(static, dynamic)


def test_decoding_steps_compile_with_fullgraph(model, enc):
    """generate compiles the decoding forward (static cache, on GPU) with the user's CompileConfig, e.g.
    fullgraph=True; the forward's no-image check read the static cache's length, a tensor: data-dependent branch."""
    torch._dynamo.reset()
    ids = enc["input_ids"]
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 4)
    with torch.no_grad():
        prefill = model(**enc, cache=cache)
        next_token = prefill.logits[:, -1].argmax(-1, keepdim=True)
        attention = torch.ones(1, ids.shape[1] + 1, dtype=torch.long)
        compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
        step = compiled(input_ids=next_token, attention_mask=attention, cache=prefill.cache).logits
        full = model(input_ids=torch.cat([ids, next_token], 1), pixel_values=enc["pixel_values"]).logits
        torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_generation_continues_from_a_returned_cache_with_the_same_inputs(model, proc, easy_vqa_images):
    """Second call with the whole conversation (ids and pixel_values as the processor gives them) plus the first
    call's cache: equal to generating from scratch; images already in the cache are not fed again."""
    a, b = easy_vqa_images[:2]
    first = proc(text=PROMPT, images=[a], return_tensors="pt")
    turn1 = model.generate(**first, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert turn1.cache.get_seq_length() == turn1.sequences.shape[1] - 1

    def continue_with(text, images):
        follow = proc(text=text, images=images or None, return_tensors="pt")
        ids = torch.cat([turn1.sequences, follow["input_ids"]], 1)
        pixels = torch.cat([first["pixel_values"]] + ([follow["pixel_values"]] if images else []))
        kw = dict(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                  do_sample=False)
        scratch = model.generate(**kw)
        continued = model.generate(**kw, cache=copy.deepcopy(turn1.cache))
        return continued, scratch

    for text, images in ((" And the colour?", []), ("\n<image>\nAnd this one?", [b])):
        continued, scratch = continue_with(text, images)
        assert torch.equal(continued, scratch), text

    # A cache that ends inside an image's placeholders cannot be continued: named, not a shape error.
    ids = first["input_ids"]
    start = ids[0].tolist().index(model.config.image_token_id)
    with torch.no_grad():
        prefix = model.model.language_model(inputs_embeds=model.get_input_embeddings()(ids[:, :start + 3]),
                                            use_cache=True).cache
    with pytest.raises(ValueError, match=r"ends inside an image's 16 placeholders in row\(s\) \[0\]"):
        model.generate(**first, cache=prefix, max_new_tokens=1)


def test_dtype_bfloat16_and_auto(folder, model, enc, tmp_path):
    bf16 = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    logits, reference = _logits(bf16, **enc), _logits(model, **enc)  # float32 pixels are cast inside
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, rtol=0.05, atol=0.05 * reference.abs().max().item())
    assert (logits.float() - reference).abs().max() > 0  # really computed in bfloat16

    auto = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype="auto")
    assert {p.dtype for p in auto.parameters()} == {torch.float32}
    bf16.save_pretrained(tmp_path / "bf16")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "bf16", trust_remote_code=True,
                                                           dtype="auto").eval()
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    assert torch.equal(_logits(reloaded, **enc), logits)


def test_sharded_save_reloads_equal_also_as_automodel(model, enc, tmp_path):
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="1MB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = AutoModelForImageTextToText.from_pretrained(sharded, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(sharded, trust_remote_code=True).eval()
    assert type(base).__name__ == "OpenQwen2VLModel"
    assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    expected = _logits(model, **enc)
    assert torch.equal(_logits(reloaded, **enc), expected)
    with torch.no_grad():
        assert torch.equal(model.lm_head(base(**enc).last_hidden_state), expected)


def test_generate_from_inputs_embeds_built_with_get_image_features(model, enc):
    ids = enc["input_ids"]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        features = torch.cat(model.get_image_features(enc["pixel_values"]).pooler_output)  # one tensor per image
        embeds[ids == model.config.image_token_id] = features.reshape(-1, features.shape[-1])
    torch.testing.assert_close(_logits(model, inputs_embeds=embeds), _logits(model, **enc))
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=enc["attention_mask"], max_new_tokens=5,
                                 do_sample=False)
    from_ids = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert torch.equal(from_embeds[0], from_ids[0, ids.shape[1]:])


def test_resize_token_embeddings_then_save_and_reload(folder, enc, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    reference = _logits(model, **enc)
    old = model.config.text_config.vocab_size
    model.resize_token_embeddings(old + 8, mean_resizing=False)
    assert model.config.text_config.vocab_size == old + 8 and model.lm_head.weight.shape[0] == old + 8
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    logits = _logits(model, **enc)
    torch.testing.assert_close(logits[..., :old], reference)
    model.save_pretrained(tmp_path / "resized")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "resized", trust_remote_code=True).eval()
    assert reloaded.config.text_config.vocab_size == old + 8
    assert torch.equal(_logits(reloaded, **enc), logits)


def test_peft_lora_generate_and_merge_and_unload(folder, enc, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    base = _logits(model, **enc)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                  target_modules=["q_proj", "v_proj", "linear_1", "linear_2"]))
    wrapped = {name.split(".lora_A")[0] for name, _ in peft_model.named_modules() if name.endswith("lora_A")}
    assert any(".vision_tower." in n for n in wrapped) and any(".language_model." in n for n in wrapped)
    assert any(".multi_modal_projector." in n for n in wrapped)
    adapted = _logits(peft_model, **enc)
    assert (adapted - base).abs().max() > 1e-3  # the adapters act
    generated = peft_model.generate(**enc, max_new_tokens=5, do_sample=False)
    merged = peft_model.merge_and_unload()
    assert type(merged).__name__ == "OpenQwen2VLForConditionalGeneration"
    torch.testing.assert_close(_logits(merged, **enc), adapted, rtol=1e-4, atol=1e-5)
    assert torch.equal(merged.generate(**enc, max_new_tokens=5, do_sample=False), generated)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", trust_remote_code=True).eval()
    torch.testing.assert_close(_logits(reloaded, **enc), adapted, rtol=1e-4, atol=1e-5)


def test_auto_processor_round_trip_and_post_processing(proc, model, enc, easy_vqa_images, tmp_path):
    proc.save_pretrained(tmp_path / "proc")
    again = AutoProcessor.from_pretrained(tmp_path / "proc", trust_remote_code=True)
    assert type(again).__name__ == "OpenQwen2VLProcessor" and again.tokenizer.padding_side == "left"
    texts, images = [PROMPT, "<s><image>\n<image>\nCompare."], [[easy_vqa_images[0]], easy_vqa_images[1:3]]
    one, two = (p(text=texts, images=images, padding=True, return_tensors="pt") for p in (proc, again))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    messages = [{"role": "user", "content": [{"type": "image", "image": easy_vqa_images[0]},
                                             {"type": "text", "text": "What is this?"}]}]
    for template in (None, "compat", "chatml"):
        rendered = [p.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                          tokenize=True, return_dict=True, return_tensors="pt") for p in (proc, again)]
        assert all(torch.equal(rendered[0][k], rendered[1][k]) for k in rendered[0]), template

    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    new_tokens = out[:, enc["input_ids"].shape[1]:]
    assert again.post_process_image_text_to_text(new_tokens, skip_special_tokens=True) == \
        again.batch_decode(new_tokens, skip_special_tokens=True) == \
        [proc.tokenizer.decode(new_tokens[0], skip_special_tokens=True)]
