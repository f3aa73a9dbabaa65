"""Load the model and processor to evaluate, from a folder or a Hub id."""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA (the original harness's setting), float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return getattr(torch, dtype)


def load_model_and_processor(
    model_id: str, device: str | torch.device | None = None, dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = True, check_processor: Callable[[Any], None] | None = None,
):
    """``AutoModelForImageTextToText`` + ``AutoProcessor`` in eval mode on ``device``.

    ``check_processor`` is called on the processor before the model loads, so that an option the processor rejects
    (e.g. an unknown chat template name) fails at once instead of after the slow model load.
    The processor's ``num_image_tokens`` is made to agree with the model config (a mismatch would make every forward
    pass fail with "Image features and image tokens do not match").
    """
    import modeling_open_qwen2vl  # noqa: F401  (registers the Auto classes, so the kit's code is used when present)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    if check_processor is not None:
        check_processor(processor)
    model = AutoModelForImageTextToText.from_pretrained(
        model_id, dtype=torch_dtype, trust_remote_code=trust_remote_code
    )
    model.to(device).eval()
    wanted = getattr(model.config, "num_image_tokens", None)
    if wanted is not None and getattr(processor, "num_image_tokens", wanted) != wanted:
        logger.warning(
            "processor of %s expands <image> to %s placeholders but the model config says %s; using %s",
            model_id, processor.num_image_tokens, wanted, wanted,
        )
        processor.num_image_tokens = wanted
    return model, processor
