"""Configuration of Open-Qwen2VL: SigLIP vision tower + adaptive-average-pool projector + Qwen2 language model.

This file is copied into every saved checkpoint and runs as transformers remote code: it may import only
transformers, torch, the standard library and sibling files (``from .x import y``).
"""

import math

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.configuration_utils import SubConfigSpec

# Token ids of the released model's tokenizer (Qwen2.5 vocabulary + the original's additions).
IMAGE_PAD_TOKEN_ID = 151655  # "<|image_pad|>", an existing Qwen2.5 special token: no new embedding row
BOS_TOKEN_ID = 128245  # "<s>", an ordinary Qwen BPE entry that the original made its BOS
EOS_TOKEN_ID = 151645  # "<|im_end|>"
PAD_TOKEN_ID = 151643  # "<|endoftext|>"

# Written into config.json so a saved folder loads with trust_remote_code and without the kit installed.
AUTO_MAP = {
    "AutoConfig": "configuration_open_qwen2vl.OpenQwen2VLConfig",
    "AutoModel": "modeling_open_qwen2vl.OpenQwen2VLModel",
    "AutoModelForCausalLM": "modeling_open_qwen2vl.OpenQwen2VLForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_open_qwen2vl.OpenQwen2VLForConditionalGeneration",
}


def is_square_token_count(count: int) -> bool:
    """Whether the projector can give ``count`` tokens per image: it pools the square patch grid to a square grid, so
    a positive perfect square. The one rule the config, the training arguments and the packer check."""
    return count > 0 and math.isqrt(count) ** 2 == count


@strict
class OpenQwen2VLConfig(PreTrainedConfig):
    """Configuration of an Open-Qwen2VL model.

    Args:
        vision_config: a ``SiglipVisionConfig`` or its dict. Required.
        text_config: a ``Qwen2Config`` or its dict. Required.
        num_image_tokens: visual tokens per image after adaptive average pooling of the patch grid. A perfect square
            whose side is at most the grid side (``image_size // patch_size``): 144 for pretraining and 729 for SFT
            with the released 27x27 grid. Changing it changes no weight.
        vision_feature_layer: index into the vision tower's hidden states (-2 = second-to-last encoder layer,
            before any final layer norm).
        image_token_id: id of the placeholder token that image features replace.
        projector_hidden_act: activation between the two projector linears; the original uses exact ``gelu``.
    """

    model_type = "open_qwen2vl"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(AutoConfig, model_type="siglip_vision_model"),
        "text_config": SubConfigSpec(AutoConfig, model_type="qwen2"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_image_tokens: int = 144
    vision_feature_layer: int = -2
    image_token_id: int = IMAGE_PAD_TOKEN_ID
    projector_hidden_act: str = "gelu"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        for name in ("vision_config", "text_config"):
            if getattr(self, name) is None:
                raise ValueError(
                    f"OpenQwen2VLConfig needs `{name}` (a config object or dict); got None. "
                    "Use OpenQwen2VLConfig.open_qwen2vl_2b() or OpenQwen2VLConfig.tiny() for a preset."
                )
        super().__post_init__(**kwargs)
        # Qwen2.5-1.5B ties embeddings in its own config; tying follows the top-level flag in transformers 5.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        if not getattr(self, "auto_map", None):
            self.auto_map = dict(AUTO_MAP)
        self._validate_open_qwen2vl()

    @property
    def patch_grid_side(self) -> int:
        image_size = self.vision_config.image_size
        patch_size = self.vision_config.patch_size
        image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
        patch_size = patch_size[0] if isinstance(patch_size, (list, tuple)) else patch_size
        return image_size // patch_size

    @property
    def pooled_grid_side(self) -> int:
        return math.isqrt(self.num_image_tokens)

    def vision_layers_run(self, vision_feature_layer: int | None = None) -> int:
        """How many vision encoder layers run to produce the features at ``vision_feature_layer`` (default: this
        config's): hidden state ``i`` is the output of layer ``i - 1``, so layers ``[0, result)`` run and the later
        ones, the post-layernorm and the head never do. The one place this is computed: the model's forward and
        the training recipes (what to freeze, what to count) read it here."""
        num_layers = self.vision_config.num_hidden_layers
        layer = self.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        # bool is an int subclass, but True/False is no layer index
        if isinstance(layer, bool) or not isinstance(layer, int) or not -num_layers - 1 <= layer <= num_layers:
            # one layer only: the projector takes one layer's width (LLaVA's list of layers would concatenate)
            raise ValueError(f"vision_feature_layer must be one hidden-state index of the {num_layers}-layer tower "
                             f"(-{num_layers + 1}..{num_layers}), got {layer!r}")
        return layer % (num_layers + 1)

    def _validate_open_qwen2vl(self) -> None:
        grid = self.patch_grid_side
        if not is_square_token_count(self.num_image_tokens):
            raise ValueError(
                f"num_image_tokens={self.num_image_tokens} is not a positive perfect square: the projector pools the "
                "square patch grid to a square grid of side sqrt(num_image_tokens)"
            )
        side = self.pooled_grid_side
        if side > grid:
            raise ValueError(
                f"num_image_tokens={self.num_image_tokens} (side {side}) exceeds the vision patch grid "
                f"{grid}x{grid} = {grid * grid} (image_size // patch_size = {grid}); adaptive pooling cannot upsample"
            )
        n_layers = self.vision_config.num_hidden_layers
        if not -(n_layers + 1) <= self.vision_feature_layer <= n_layers:
            raise ValueError(
                f"vision_feature_layer={self.vision_feature_layer} is outside the vision tower's hidden states "
                f"(indices {-(n_layers + 1)}..{n_layers} for {n_layers} layers)"
            )
        if not 0 <= self.image_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"image_token_id={self.image_token_id} is outside the text vocabulary "
                f"(vocab_size={self.text_config.vocab_size})"
            )
        if self.projector_hidden_act not in ACT2FN:
            raise ValueError(
                f"projector_hidden_act={self.projector_hidden_act!r} is not a transformers activation "
                f"(for example {', '.join(sorted(ACT2FN)[:6])}, ...; the original uses 'gelu')"
            )

    @classmethod
    def open_qwen2vl_2b(cls, num_image_tokens: int = 144, **kwargs) -> "OpenQwen2VLConfig":
        """The released architecture: SigLIP-SO400M/14 @384 (exact GELU, no head) + Qwen2.5-1.5B-Instruct."""
        vision = {
            "model_type": "siglip_vision_model",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "image_size": 384,
            "patch_size": 14,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-6,
            "vision_use_head": False,
        }
        text = {
            "model_type": "qwen2",
            "vocab_size": 151936,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "tie_word_embeddings": True,
            # The processor's BOS (Qwen2.5's config says 151643; the original prepends "<s>"): Trainer would
            # otherwise "align" the config to the tokenizer and warn on every SFT run.
            "bos_token_id": BOS_TOKEN_ID,
            "eos_token_id": EOS_TOKEN_ID,
            "pad_token_id": PAD_TOKEN_ID,
            "max_window_layers": 21,
        }
        return cls(vision_config=vision, text_config=text, num_image_tokens=num_image_tokens, **kwargs)

    @classmethod
    def tiny(
        cls,
        num_image_tokens: int = 16,
        vocab_size: int = 151936,
        image_size: int = 64,
        patch_size: int = 8,
        hidden_size: int = 64,
        vision_hidden_size: int = 32,
        num_hidden_layers: int = 2,
        vision_layers: int = 3,
        image_token_id: int = IMAGE_PAD_TOKEN_ID,
        **kwargs,
    ) -> "OpenQwen2VLConfig":
        """A tiny model for tests and the offline demo; the default vocabulary fits the real Qwen tokenizer."""
        vision = {
            "model_type": "siglip_vision_model",
            "hidden_size": vision_hidden_size,
            "intermediate_size": 2 * vision_hidden_size,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch_size,
            "hidden_act": "gelu",
            "vision_use_head": False,
        }
        text = {
            "model_type": "qwen2",
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": True,
            "bos_token_id": BOS_TOKEN_ID if vocab_size > BOS_TOKEN_ID else None,
            "eos_token_id": EOS_TOKEN_ID if vocab_size > EOS_TOKEN_ID else None,
            "pad_token_id": PAD_TOKEN_ID if vocab_size > PAD_TOKEN_ID else None,
        }
        return cls(
            vision_config=vision,
            text_config=text,
            num_image_tokens=num_image_tokens,
            image_token_id=image_token_id,
            **kwargs,
        )


__all__ = ["OpenQwen2VLConfig"]
