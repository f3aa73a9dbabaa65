import pytest

from modeling_open_qwen2vl import OpenQwen2VLConfig


def test_presets_have_the_released_dimensions():
    cfg = OpenQwen2VLConfig.open_qwen2vl_2b()
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == (1152, 4304, 27, 16)
    assert (v.image_size, v.patch_size, v.hidden_act) == (384, 14, "gelu")
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers) == (1536, 8960, 28)
    assert (t.num_attention_heads, t.num_key_value_heads, t.vocab_size) == (12, 2, 151936)
    assert t.rope_parameters["rope_theta"] == 1e6
    assert cfg.patch_grid_side == 27 and cfg.num_image_tokens == 144 and cfg.pooled_grid_side == 12
    assert cfg.tie_word_embeddings is True
    assert OpenQwen2VLConfig.open_qwen2vl_2b(num_image_tokens=729).pooled_grid_side == 27


def test_sub_configs_accept_dicts_and_objects(tiny_config):
    from_objects = OpenQwen2VLConfig(
        vision_config=tiny_config.vision_config, text_config=tiny_config.text_config, num_image_tokens=64
    )
    from_dicts = OpenQwen2VLConfig(
        vision_config=tiny_config.vision_config.to_dict(), text_config=tiny_config.text_config.to_dict(),
        num_image_tokens=16,
    )
    assert type(from_dicts.vision_config).__name__ == "SiglipVisionConfig"
    assert type(from_dicts.text_config).__name__ == "Qwen2Config"
    assert from_objects.vision_config.hidden_size == from_dicts.vision_config.hidden_size
    assert from_objects.num_image_tokens == 64


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_image_tokens": 15}, "num_image_tokens=15 is not a positive perfect square"),
        ({"num_image_tokens": 0}, "num_image_tokens=0 is not a positive perfect square"),
        ({"num_image_tokens": 81}, "num_image_tokens=81 (side 9) exceeds the vision patch grid 8x8"),
        ({"vision_feature_layer": -9}, "vision_feature_layer=-9 is outside"),
        ({"image_token_id": 10**7}, "image_token_id=10000000 is outside the text vocabulary"),
        ({"projector_hidden_act": "nope"}, "projector_hidden_act='nope' is not a transformers activation"),
    ],
)
def test_invalid_values_raise_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError) as err:
        OpenQwen2VLConfig.tiny(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("missing", ["vision_config", "text_config"])
def test_missing_sub_config_raises(tiny_config, missing):
    kwargs = {"vision_config": tiny_config.vision_config, "text_config": tiny_config.text_config}
    kwargs.pop(missing)
    with pytest.raises(ValueError, match=f"needs `{missing}`"):
        OpenQwen2VLConfig(**kwargs)


def test_config_round_trip_keeps_auto_map(tmp_path, tiny_config):
    tiny_config.save_pretrained(tmp_path)
    loaded = OpenQwen2VLConfig.from_pretrained(tmp_path)
    assert loaded.num_image_tokens == tiny_config.num_image_tokens
    assert loaded.vision_config.hidden_act == "gelu"
    assert loaded.auto_map["AutoModelForImageTextToText"].endswith("OpenQwen2VLForConditionalGeneration")


def test_special_token_ids_match_the_processor_so_trainer_changes_nothing(processor):
    """transformers' Trainer (and so TRL's SFTTrainer) rewrites a config's BOS/EOS/PAD ids that differ from the
    tokenizer's, with a warning; the presets declare the processor's ids ("<s>" as BOS), so nothing changes."""
    from types import SimpleNamespace

    from transformers.trainer_utils import align_special_tokens

    from modeling_open_qwen2vl.hf_folder import generation_config_for

    tokenizer = processor.tokenizer
    for config in (OpenQwen2VLConfig.tiny(), OpenQwen2VLConfig.open_qwen2vl_2b()):
        text = config.text_config
        assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (
            tokenizer.convert_tokens_to_ids("<s>"), tokenizer.convert_tokens_to_ids("<|im_end|>"),
            tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        model = SimpleNamespace(config=config, generation_config=generation_config_for(config))
        before = (config.to_dict(), model.generation_config.to_dict())
        align_special_tokens(model, processor)
        assert (config.to_dict(), model.generation_config.to_dict()) == before
