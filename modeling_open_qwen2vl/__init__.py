"""Open-Qwen2VL as transformers remote code.

Importing the kit registers the classes with the Auto factories; a saved folder carries the configuration,
modeling and processing files plus an ``auto_map``, so it also loads with ``trust_remote_code=True`` where the kit
is not installed.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_open_qwen2vl import OpenQwen2VLConfig
from .factory import build_image_processor, build_processor
from .modeling_open_qwen2vl import (
    OpenQwen2VLForConditionalGeneration,
    OpenQwen2VLModel,
    OpenQwen2VLPreTrainedModel,
    OpenQwen2VLProjector,
)
from .processing_open_qwen2vl import (
    CHATML_CHAT_TEMPLATE,
    COMPAT_CHAT_TEMPLATE,
    OpenQwen2VLProcessor,
    chat_templates,
    format_pretraining_text,
    format_raw_prompt,
)
from .tokenizer_utils import build_open_qwen2vl_tokenizer, offline_qwen_tokenizer_json


def _register() -> None:
    AutoConfig.register(OpenQwen2VLConfig.model_type, OpenQwen2VLConfig, exist_ok=True)
    AutoModel.register(OpenQwen2VLConfig, OpenQwen2VLModel, exist_ok=True)
    AutoModelForCausalLM.register(OpenQwen2VLConfig, OpenQwen2VLForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(OpenQwen2VLConfig, OpenQwen2VLForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(OpenQwen2VLConfig, OpenQwen2VLProcessor, exist_ok=True)
    # Makes save_pretrained copy the .py files next to the weights (the auto_map itself comes from the config).
    OpenQwen2VLConfig.register_for_auto_class()
    OpenQwen2VLForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    OpenQwen2VLModel.register_for_auto_class("AutoModel")
    OpenQwen2VLProcessor.register_for_auto_class("AutoProcessor")


_register()

__all__ = [
    "CHATML_CHAT_TEMPLATE",
    "COMPAT_CHAT_TEMPLATE",
    "OpenQwen2VLConfig",
    "OpenQwen2VLForConditionalGeneration",
    "OpenQwen2VLModel",
    "OpenQwen2VLPreTrainedModel",
    "OpenQwen2VLProcessor",
    "OpenQwen2VLProjector",
    "build_image_processor",
    "build_open_qwen2vl_tokenizer",
    "build_processor",
    "chat_templates",
    "format_pretraining_text",
    "format_raw_prompt",
    "offline_qwen_tokenizer_json",
]
