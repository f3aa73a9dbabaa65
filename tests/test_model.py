"""Model behaviour checked against independent computations on tiny random models."""

import json
import math

import pytest
import torch
from transformers import SiglipVisionModel

from modeling_open_qwen2vl import OpenQwen2VLConfig, OpenQwen2VLForConditionalGeneration

IMG = 151655


def _ids_with_images(rows, tokens_per_image, seed=0):
    """rows: list of (length, [image start positions]) -> LongTensor with placeholders at those positions."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for length, starts in rows:
        ids = torch.randint(100, 5000, (length,), generator=g)
        for s in starts:
            ids[s : s + tokens_per_image] = IMG
        out.append(ids)
    return torch.stack(out)


def test_vision_features_are_hidden_state_minus_two_without_post_layernorm(tiny_model, tiny_config):
    reference = SiglipVisionModel(tiny_config.vision_config).eval()
    reference.load_state_dict(tiny_model.model.vision_tower.state_dict())
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        got = tiny_model.model.get_vision_features(pixels)
        last = reference(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(got, last)



@pytest.mark.parametrize("feature_layer", [-2, -1, 0, 1])
def test_only_the_vision_layers_up_to_the_feature_layer_run(tiny_model, tiny_config, feature_layer):
    reference = SiglipVisionModel(tiny_config.vision_config).eval()
    reference.load_state_dict(tiny_model.model.vision_tower.state_dict())
    layers = tiny_model.model.vision_tower.encoder.layers
    calls = []
    hooks = [layer.register_forward_hook(lambda module, args, out, i=i: calls.append(i)) for i, layer in
             enumerate(layers)]
    saved = tiny_model.config.vision_feature_layer
    tiny_model.config.vision_feature_layer = feature_layer
    pixels = torch.randn(2, 3, 64, 64)
    try:
        with torch.no_grad():
            got = tiny_model.model.get_vision_features(pixels)
            expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer]
    finally:
        tiny_model.config.vision_feature_layer = saved
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert calls == list(range(feature_layer % (len(layers) + 1)))


def _reference_adaptive_pool(features, grid, side):
    """Adaptive average pooling written out: window i spans [floor(i*G/s), ceil((i+1)*G/s))."""
    n, _, c = features.shape
    grid_features = features.reshape(n, grid, grid, c)
    out = torch.empty(n, side * side, c, dtype=features.dtype)
    for i in range(side):
        r0, r1 = (i * grid) // side, math.ceil((i + 1) * grid / side)
        for j in range(side):
            c0, c1 = (j * grid) // side, math.ceil((j + 1) * grid / side)
            out[:, i * side + j] = grid_features[:, r0:r1, c0:c1].mean(dim=(1, 2))
    return out


@pytest.mark.parametrize("grid, tokens", [(8, 16), (8, 9), (8, 64), (27, 144), (27, 729)])
def test_projector_pooling_matches_independent_computation(grid, tokens):
    cfg = OpenQwen2VLConfig.tiny(image_size=grid * 2, patch_size=2, num_image_tokens=tokens, vocab_size=512,
                                 image_token_id=5)
    from modeling_open_qwen2vl import OpenQwen2VLProjector

    projector = OpenQwen2VLProjector(cfg)
    feats = torch.randn(2, grid * grid, cfg.vision_config.hidden_size, dtype=torch.float64)
    side = int(math.isqrt(tokens))
    torch.testing.assert_close(projector.pool_patches(feats), _reference_adaptive_pool(feats, grid, side))


def test_projector_mlp_uses_exact_gelu(tiny_model):
    projector = tiny_model.model.multi_modal_projector
    x = torch.randn(1, 64, projector.linear_1.in_features)
    pooled = projector.pool_patches(x)
    hidden = pooled @ projector.linear_1.weight.T + projector.linear_1.bias
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    expected = hidden @ projector.linear_2.weight.T + projector.linear_2.bias
    torch.testing.assert_close(projector(x), expected)


def test_image_features_are_scattered_at_placeholders(tiny_model):
    ids = _ids_with_images([(40, [3, 20])], 16)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = tiny_model.model.get_image_features(pixels).pooler_output  # one tensor per image
        captured = {}
        hook = tiny_model.model.language_model.register_forward_pre_hook(
            lambda mod, args, kwargs: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
        )
        tiny_model(input_ids=ids, pixel_values=pixels)
        hook.remove()
    embeds = captured["embeds"][0]
    torch.testing.assert_close(embeds[3:19], feats[0])
    torch.testing.assert_close(embeds[20:36], feats[1])
    text_positions = [i for i in range(40) if not (3 <= i < 19 or 20 <= i < 36)]
    expected_text = tiny_model.get_input_embeddings()(ids[0, text_positions])
    torch.testing.assert_close(embeds[text_positions], expected_text)


def test_mixed_text_only_and_image_rows_in_one_batch(tiny_model):
    ids = _ids_with_images([(40, [2, 20]), (40, [])], 16, seed=1)
    pixels = torch.randn(2, 3, 64, 64)  # both images belong to row 0; row 1 is text only (no dummy image)
    with torch.no_grad():
        batch = tiny_model(input_ids=ids, pixel_values=pixels).logits
        row0 = tiny_model(input_ids=ids[:1], pixel_values=pixels).logits
        row1 = tiny_model(input_ids=ids[1:]).logits
    torch.testing.assert_close(batch[0], row0[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch[1], row1[0], rtol=1e-5, atol=1e-5)


def test_many_images_per_sequence(tiny_model):
    starts = [1 + 17 * k for k in range(6)]
    ids = _ids_with_images([(110, starts)], 16)
    with torch.no_grad():
        out = tiny_model(input_ids=ids, pixel_values=torch.randn(6, 3, 64, 64))
    assert out.logits.shape == (1, 110, tiny_model.config.text_config.vocab_size)


@pytest.mark.parametrize("n_images", [1, 3])
def test_placeholder_image_count_mismatch_raises_with_both_counts(tiny_model, n_images):
    ids = _ids_with_images([(40, [2, 20])], 16)
    with pytest.raises(ValueError, match=rf"tokens 32, features {16 * n_images}"):
        tiny_model(input_ids=ids, pixel_values=torch.randn(n_images, 3, 64, 64))


def test_an_image_split_over_two_rows_is_refused(tiny_model):
    ids = _ids_with_images([(40, [2]), (40, [2])], 16)
    ids[0, 2 + 16:2 + 24] = IMG  # row 0: 24 placeholders, row 1: 16 (40 = 2.5 images of 16)
    ids[1, 2 + 8:2 + 16] = 7  # row 1: 8, so 32 in all = 2 images, but one would straddle the rows
    with pytest.raises(ValueError, match=r"row\(s\) \[0, 1\] hold \[24, 8\] image placeholders, not a multiple of "
                                         r"num_image_tokens=16"):
        tiny_model(input_ids=ids, pixel_values=torch.randn(2, 3, 64, 64))


def test_placeholders_without_images_raise(tiny_model):
    ids = _ids_with_images([(40, [2])], 16)
    with pytest.raises(ValueError, match="tokens 16, features 0"):
        tiny_model(input_ids=ids)


def test_labels_give_the_causal_lm_loss(tiny_model):
    ids = _ids_with_images([(30, [2])], 16)
    labels = ids.clone()
    labels[ids == IMG] = -100
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = tiny_model(input_ids=ids, pixel_values=pixels, labels=labels)
    logits = out.logits[0, :-1]
    target = labels[0, 1:]
    expected = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_boolean_logits_to_keep_selects_row_position_pairs(tiny_model):
    ids = _ids_with_images([(30, [2]), (30, [10])], 16)
    pixels = torch.randn(2, 3, 64, 64)
    keep = torch.zeros(ids.shape, dtype=torch.bool)
    keep[0, [0, 20, 29]] = True
    keep[1, [5, 28]] = True
    with torch.no_grad():
        full = tiny_model(input_ids=ids, pixel_values=pixels).logits
        kept = tiny_model(input_ids=ids, pixel_values=pixels, logits_to_keep=keep).logits
    expected = torch.stack([full[0, 0], full[0, 20], full[0, 29], full[1, 5], full[1, 28]])
    torch.testing.assert_close(kept, expected)
    with pytest.raises(ValueError, match=r"must have the input's shape \(2, 30\), got \(2, 29\)"):
        tiny_model(input_ids=ids, pixel_values=pixels, logits_to_keep=keep[:, 1:])


def test_position_ids_pass_through(tiny_model):
    ids = _ids_with_images([(24, [0])], 16)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        default = tiny_model(input_ids=ids, pixel_values=pixels).logits
        explicit = tiny_model(input_ids=ids, pixel_values=pixels, position_ids=torch.arange(24)[None]).logits
        restarted = torch.cat([torch.arange(18), torch.arange(6)])[None]  # as packing's isolated mode does
        reset = tiny_model(input_ids=ids, pixel_values=pixels, position_ids=restarted).logits
    torch.testing.assert_close(default, explicit)
    torch.testing.assert_close(default[:, :18], reset[:, :18])
    assert not torch.allclose(default[:, 18:], reset[:, 18:], atol=1e-4)


def test_144_to_729_is_a_config_change_only(tmp_path):
    low = OpenQwen2VLConfig.tiny(num_image_tokens=16, vocab_size=512, image_token_id=5)
    torch.manual_seed(0)
    model = OpenQwen2VLForConditionalGeneration(low)
    model.save_pretrained(tmp_path)
    high = OpenQwen2VLConfig.from_pretrained(tmp_path)
    high.num_image_tokens = 64
    reloaded, info = OpenQwen2VLForConditionalGeneration.from_pretrained(tmp_path, config=high, output_loading_info=True)
    assert not any(info.values()), info
    ids = torch.full((1, 70), 7)
    ids[0, 2:66] = 5
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = reloaded(input_ids=ids, pixel_values=pixels)
    assert out.logits.shape[1] == 70
    # The same switch on a model already loaded: set the config attribute, nothing else.
    model.config.num_image_tokens = 64
    with torch.no_grad():
        switched = model(input_ids=ids, pixel_values=pixels)
    torch.testing.assert_close(switched.logits, out.logits)
    model.config.num_image_tokens = 50
    with pytest.raises(ValueError, match="num_image_tokens=50 is not a positive perfect square"):
        model(input_ids=ids, pixel_values=pixels)


def test_num_image_tokens_set_after_the_config_is_built_is_still_checked(tmp_path):
    config = OpenQwen2VLConfig.tiny(num_image_tokens=16)  # 8x8 patch grid
    config.num_image_tokens = 5
    with pytest.raises(ValueError, match="num_image_tokens=5 is not a positive perfect square"):
        OpenQwen2VLForConditionalGeneration(config)
    OpenQwen2VLForConditionalGeneration(OpenQwen2VLConfig.tiny(num_image_tokens=16)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"num_image_tokens=100 \(side 10\) exceeds the vision patch grid 8x8"):
        OpenQwen2VLForConditionalGeneration.from_pretrained(tmp_path, num_image_tokens=100)


def test_sdpa_and_eager_agree(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    ids = _ids_with_images([(30, [4])], 16)
    pixels = torch.randn(1, 3, 64, 64)
    outs = {}
    for impl in ("eager", "sdpa"):
        m = OpenQwen2VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=impl).eval()
        assert m.config.text_config._attn_implementation == impl
        with torch.no_grad():
            outs[impl] = m(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(outs["eager"], outs["sdpa"], rtol=1e-4, atol=1e-4)


def _count_mlp_forwards(model):
    """Wrap each MLP's forward (on the instance) to count its runs, keyed by (tower, layer index).

    Transformers checkpoints a layer's ``forward`` rather than its ``__call__``, so hooks on the layer do not
    see the recompute; the MLP's own forward does run again, so it is counted here.
    """
    towers = {"vision": model.model.vision_tower.encoder.layers, "text": model.model.language_model.layers}
    calls = {(tower, i): 0 for tower, layers in towers.items() for i in range(len(layers))}
    for tower, layers in towers.items():
        for i, layer in enumerate(layers):

            def counted(*args, _forward=layer.mlp.forward, _key=(tower, i), **kwargs):
                calls[_key] += 1
                return _forward(*args, **kwargs)

            layer.mlp.forward = counted
    return calls


def test_activation_checkpointing_gives_the_same_gradients(tiny_config):
    """Checkpointing recomputes the layers of both towers in backward and gives every parameter the same gradient."""
    torch.manual_seed(0)
    model = OpenQwen2VLForConditionalGeneration(tiny_config).train()
    calls = _count_mlp_forwards(model)
    ids = _ids_with_images([(30, [4])], 16)
    pixels = torch.randn(1, 3, 64, 64)
    grads, counts = [], []
    for checkpointing in (False, True):
        model.zero_grad(set_to_none=True)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        calls.update(dict.fromkeys(calls, 0))
        model(input_ids=ids, pixel_values=pixels, labels=ids.masked_fill(ids == IMG, -100)).loss.backward()
        counts.append(dict(calls))
        grads.append({name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()})

    # Without checkpointing every layer that runs does so once: all text layers, vision layers up to the feature layer.
    n_vision = len(model.model.vision_tower.encoder.layers)
    vision_run = range(tiny_config.vision_feature_layer % (n_vision + 1))
    assert len(vision_run) > 0 and len(model.model.language_model.layers) > 0
    assert counts[0] == {(tower, i): int(tower == "text" or i in vision_run) for tower, i in counts[0]}
    # With it, each of those layers runs again in backward, in both towers: twice per step.
    assert counts[1] == {key: 2 * n for key, n in counts[0].items()}

    assert grads[0].keys() == grads[1].keys()
    with_grad = [name for name, g in grads[0].items() if g is not None]
    assert any(n.startswith("model.vision_tower.") for n in with_grad)
    assert any(n.startswith("model.language_model.") for n in with_grad)
    assert any(n.startswith("model.multi_modal_projector.") for n in with_grad)
    for name in grads[0]:
        assert (grads[0][name] is None) == (grads[1][name] is None), name
        if grads[0][name] is not None:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_casts_vision_tower_and_projector(tiny_config, dtype):
    torch.manual_seed(0)
    model = OpenQwen2VLForConditionalGeneration(tiny_config).to(dtype).eval()
    ids = _ids_with_images([(20, [1])], 16)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 64, 64))  # float32 pixels are cast
    assert out.logits.dtype == dtype
    assert model.model.multi_modal_projector.linear_1.weight.dtype == dtype


def test_generate_with_and_without_cache_is_identical(tiny_model):
    ids = _ids_with_images([(24, [1])], 16)
    pixels = torch.randn(1, 3, 64, 64)
    kw = dict(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), max_new_tokens=8,
              do_sample=False)
    with_cache = tiny_model.generate(**kw, use_cache=True)
    without = tiny_model.generate(**kw, use_cache=False)
    assert torch.equal(with_cache, without)


def test_the_image_placeholder_is_never_generated(tiny_model, tmp_path):
    ids = _ids_with_images([(24, [1])], 16)
    kw = dict(input_ids=ids, pixel_values=torch.randn(1, 3, 64, 64), attention_mask=torch.ones_like(ids),
              max_new_tokens=4, do_sample=False)

    def favour_the_placeholder(module, inputs, logits):  # a model whose every argmax is the placeholder
        logits[..., IMG] += 1e4
        return logits

    handle = tiny_model.lm_head.register_forward_hook(favour_the_placeholder)
    try:
        unsuppressed = tiny_model.generate(**kw, suppress_tokens=None, use_cache=True)[0, 24:]
        assert unsuppressed.tolist() == [IMG] * 4  # the hook works: without the default, the placeholder comes out
        with pytest.raises(ValueError, match=r"do not match: row\(s\) \[0\] hold \[17\] image placeholders"):
            tiny_model.generate(**kw, suppress_tokens=None, use_cache=False)
        outputs = [tiny_model.generate(**kw, use_cache=cache)[0, 24:] for cache in (True, False)]
    finally:
        handle.remove()
    assert IMG not in outputs[0].tolist() and torch.equal(outputs[0], outputs[1])
    tiny_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["suppress_tokens"] == [IMG]


def test_batched_left_padded_generation_matches_one_by_one(tiny_model, processor, easy_vqa_images):
    prompts = ["<s><image>\nWhat shape is in the image?", "<s><image>\nIs there a blue shape?",
               "<s>Hello, how are you today? Tell me about circles."]
    images = [[easy_vqa_images[0]], [easy_vqa_images[1]], []]
    singles = []
    for prompt, imgs in zip(prompts, images):
        enc = processor(text=prompt, images=imgs or None, return_tensors="pt")
        out = tiny_model.generate(**enc, max_new_tokens=6, do_sample=False)
        singles.append(out[0, enc["input_ids"].shape[1]:])
    batch = processor(text=prompts, images=images, padding=True, padding_side="left", return_tensors="pt")
    out = tiny_model.generate(**batch, max_new_tokens=6, do_sample=False)
    new = out[:, batch["input_ids"].shape[1]:]
    for row, single in zip(new, singles):
        assert torch.equal(row, single)
