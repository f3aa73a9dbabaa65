"""What the model returns, as transformers 5's LLaVA returns it: ``get_image_features`` gives a
``BaseModelOutputWithPooling`` (per-image projected tokens in ``pooler_output``), the forward's outputs carry
``image_outputs``; and how many vision layers run, computed in one place (the config) for the model and for the
training recipe that freezes the layers that never run. Numbers are checked against SigLIP and the projector's
layers called by hand."""

import re

import pytest
import torch
from transformers import SiglipVisionModel
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)

from modeling_open_qwen2vl import OpenQwen2VLConfig, OpenQwen2VLForConditionalGeneration

IMG = 151655
N = 16  # tiny config's num_image_tokens: its 8x8 patch grid pooled to 4x4


def _by_hand(model, pixels, feature_layer=-2):
    """SigLIP's hidden state, 2x2 average pooling and Linear -> exact GELU -> Linear, each called on its own."""
    vision_config = model.config.vision_config
    reference = SiglipVisionModel(vision_config).eval()
    reference.load_state_dict(model.model.vision_tower.state_dict())
    vision = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer]
    n, _, channels = vision.shape
    grid = vision.reshape(n, 4, 2, 4, 2, channels).mean(dim=(2, 4)).reshape(n, N, channels)  # row-major windows
    projector = model.model.multi_modal_projector
    hidden = torch.nn.functional.gelu(torch.nn.functional.linear(grid, projector.linear_1.weight, projector.linear_1.bias))
    return vision, torch.nn.functional.linear(hidden, projector.linear_2.weight, projector.linear_2.bias)


def _one_image_prompt():
    return torch.tensor([[5, 6] + [IMG] * N + [7, 8], [9] * 2 + [IMG] * N + [10, 11]])


def test_get_image_features_returns_llavas_output_type(tiny_model):
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        vision, projected = _by_hand(tiny_model, pixels)
        out = tiny_model.get_image_features(pixels)
        base = tiny_model.model.get_image_features(pixels)
        as_tuple = tiny_model.get_image_features(pixels, return_dict=False)
    assert type(out) is BaseModelOutputWithPooling and type(base) is BaseModelOutputWithPooling
    assert isinstance(out.pooler_output, list) and len(out.pooler_output) == 2  # one entry per image, as LLaVA
    for image in range(2):
        torch.testing.assert_close(out.pooler_output[image], projected[image])
        torch.testing.assert_close(base.pooler_output[image], projected[image])
    torch.testing.assert_close(out.last_hidden_state, vision, rtol=0, atol=0)  # the features the projector read
    assert type(as_tuple) is tuple
    torch.testing.assert_close(as_tuple[0], vision, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(as_tuple[1]), projected.reshape(-1, projected.shape[-1]))


def test_image_features_are_no_views(tiny_model):
    """FSDP2 warns when a wrapped module returns a view (an in-place op on it would skip the pre-backward
    all-gather): the per-image tensors the forward returns must own their storage."""
    out = tiny_model(input_ids=_one_image_prompt(), pixel_values=torch.randn(2, 3, 64, 64))
    tensors = [out.image_outputs.last_hidden_state, *out.image_outputs.pooler_output]
    assert all(tensor._base is None for tensor in tensors)


def test_forward_outputs_carry_the_image_outputs(tiny_model):
    ids, pixels = _one_image_prompt(), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, projected = _by_hand(tiny_model, pixels)
        full = tiny_model(input_ids=ids, pixel_values=pixels)
        base = tiny_model.model(input_ids=ids, pixel_values=pixels)
    assert isinstance(full, MultimodalCausalLMOutputWithPast) and isinstance(base, MultimodalBaseModelOutputWithPast)
    for out in (full, base):
        assert isinstance(out.image_outputs, BaseModelOutputWithPooling)
        torch.testing.assert_close(torch.stack(out.image_outputs.pooler_output), projected)
        # the pre-5 name, deprecated as LLaVA's: the same projected features
        torch.testing.assert_close(torch.stack(out.image_hidden_states), projected)
    torch.testing.assert_close(tiny_model.lm_head(base.last_hidden_state), full.logits)


def test_text_only_forward_has_no_image_outputs(tiny_model):
    with torch.no_grad():
        out = tiny_model(input_ids=torch.tensor([[5, 6, 7]]))
    assert out.image_outputs is None and out.image_hidden_states is None


def test_image_outputs_keep_the_gradient_to_the_vision_tower(tiny_config):
    torch.manual_seed(0)
    model = OpenQwen2VLForConditionalGeneration(tiny_config)
    out = model(input_ids=_one_image_prompt(), pixel_values=torch.randn(2, 3, 64, 64))
    out.image_outputs.pooler_output[1].sum().backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert model.model.vision_tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- how many vision layers run: one source


@pytest.mark.parametrize("feature_layer", [-4, -2, -1, 0, 1, 3])
def test_vision_layers_run_counts_the_layers_the_model_runs(tiny_model, feature_layer):
    layers = tiny_model.model.vision_tower.encoder.layers  # 3 in the tiny config
    calls = []
    hooks = [layer.register_forward_hook(lambda module, args, out, i=i: calls.append(i))
             for i, layer in enumerate(layers)]
    pixels = torch.randn(1, 3, 64, 64)
    try:
        with torch.no_grad():
            got = tiny_model.model.get_vision_features(pixels, vision_feature_layer=feature_layer)
    finally:
        for hook in hooks:
            hook.remove()
    expected, _ = _by_hand(tiny_model, pixels, feature_layer)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert tiny_model.config.vision_layers_run(feature_layer) == len(calls)
    assert calls == list(range(len(calls)))


@pytest.mark.parametrize("bad", [[-2, -1], 4, -5, True, "-2"])
def test_vision_layers_run_refuses_what_is_no_hidden_state_index(bad):
    expected = f"vision_feature_layer must be one hidden-state index of the 3-layer tower (-4..3), got {bad!r}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        OpenQwen2VLConfig.tiny().vision_layers_run(bad)


@pytest.mark.parametrize("feature_layer", [-2, -1, 1])
def test_the_recipe_freezes_exactly_the_tower_parameters_that_get_no_gradient(feature_layer):
    from recipes.training.model_setup import freeze_unread_vision_parameters

    torch.manual_seed(0)
    model = OpenQwen2VLForConditionalGeneration(OpenQwen2VLConfig.tiny(vision_feature_layer=feature_layer))
    torch.cat(model.get_image_features(torch.randn(1, 3, 64, 64)).pooler_output).sum().backward()
    unreached = {name for name, p in model.model.vision_tower.named_parameters() if p.grad is None}
    freeze_unread_vision_parameters(model)
    frozen = {name for name, p in model.model.vision_tower.named_parameters() if not p.requires_grad}
    assert frozen == unreached and frozen


def test_the_model_and_the_recipe_read_the_same_count(monkeypatch):
    """Change the one count and both follow: the model runs one layer, the recipe keeps exactly that one trainable."""
    from recipes.training.model_setup import freeze_unread_vision_parameters

    monkeypatch.setattr(OpenQwen2VLConfig, "vision_layers_run", lambda self, vision_feature_layer=None: 1)
    torch.manual_seed(0)
    model = OpenQwen2VLForConditionalGeneration(OpenQwen2VLConfig.tiny())  # vision_feature_layer=-2: 2 layers
    layers = model.model.vision_tower.encoder.layers
    calls = []
    hooks = [layer.register_forward_hook(lambda module, args, out, i=i: calls.append(i))
             for i, layer in enumerate(layers)]
    with torch.no_grad():
        model.get_image_features(torch.randn(1, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    freeze_unread_vision_parameters(model)
    trainable_layers = [i for i, layer in enumerate(layers) if all(p.requires_grad for p in layer.parameters())]
    assert calls == [0] and trainable_layers == [0]
