"""Open-Qwen2VL model: transformers' SiglipVisionModel + average-pool projector + Qwen2, LLaVA-style.

Runs as transformers remote code: imports only transformers, torch and sibling files.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.utils import can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_open_qwen2vl import OpenQwen2VLConfig


logger = logging.get_logger(__name__)

# Private forward keyword: generate() left this step's images out on purpose, so placeholders without them are no error.
IMAGES_WITHHELD = "_images_withheld"


class _DeprecatedImageHiddenStates:
    """``image_hidden_states``, the name LLaVA's outputs used before transformers 5 gave them ``image_outputs``."""

    @property
    def image_hidden_states(self) -> list[torch.Tensor] | None:
        logger.warning_once("`image_hidden_states` is deprecated, as in transformers' LLaVA: use "
                            "`out.image_outputs.pooler_output` to obtain the projected image features.")
        return None if self.image_outputs is None else self.image_outputs.pooler_output


@dataclass
class OpenQwen2VLModelOutputWithPast(_DeprecatedImageHiddenStates, MultimodalBaseModelOutputWithPast):
    """The language model's outputs plus ``image_outputs`` (see ``OpenQwen2VLModel.get_image_features``)."""


@dataclass
class OpenQwen2VLCausalLMOutputWithPast(_DeprecatedImageHiddenStates, MultimodalCausalLMOutputWithPast):
    """Loss, logits and the language model's outputs plus ``image_outputs``."""


class OpenQwen2VLProjector(nn.Module):
    """Adaptive average pooling of the patch grid, then Linear -> GELU -> Linear (the original AvgPoolProjector).

    The pooling has no parameters, so the same weights serve any ``num_image_tokens`` (144 <-> 729 is config only):
    the pooled size is read from the config at every call, so setting ``config.num_image_tokens`` on a loaded model
    (with the processor's) switches it.
    """

    def __init__(self, config: OpenQwen2VLConfig):
        super().__init__()
        # num_image_tokens may have changed since the config was built (passed to from_pretrained): check it early.
        config._validate_open_qwen2vl()
        self.config = config
        self.grid_side = config.patch_grid_side
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size)

    def pool_patches(self, patch_features: torch.Tensor) -> torch.Tensor:
        """[N, grid*grid, C] -> [N, side*side, C]; tokens are read and written row-major."""
        n, num_patches, channels = patch_features.shape
        if num_patches != self.grid_side * self.grid_side:
            raise ValueError(
                f"expected {self.grid_side}x{self.grid_side}={self.grid_side ** 2} patch features per image, "
                f"got {num_patches}"
            )
        if self.config.pooled_grid_side ** 2 != self.config.num_image_tokens:
            self.config._validate_open_qwen2vl()  # raises, naming the bad value
        grid = patch_features.transpose(1, 2).reshape(n, channels, self.grid_side, self.grid_side)
        pooled = nn.functional.adaptive_avg_pool2d(grid, self.config.pooled_grid_side)
        return pooled.flatten(2).transpose(1, 2)

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        pooled = self.pool_patches(patch_features)
        return self.linear_2(self.act(self.linear_1(pooled)))


class OpenQwen2VLPreTrainedModel(PreTrainedModel):
    config_class = OpenQwen2VLConfig
    config: OpenQwen2VLConfig
    base_model_prefix = "model"  # TRL's fused LM head calls model.<base_model_prefix>
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = "cache"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # the placeholder checks trace (torch._check) when compiled

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, OpenQwen2VLProjector):
            std = self.config.text_config.initializer_range
            for linear in (module.linear_1, module.linear_2):
                init.normal_(linear.weight, mean=0.0, std=std)
                init.zeros_(linear.bias)

    def _restrict_no_split_modules(self) -> None:
        # post_init() unions the children's lists, which brings in SiglipTextEmbeddings (absent from a vision-only
        # tower) and breaks FSDP auto-wrap; these are the blocks worth wrapping.
        self._no_split_modules = {"SiglipEncoderLayer", "Qwen2DecoderLayer"}


class OpenQwen2VLModel(OpenQwen2VLPreTrainedModel):
    """Vision tower + projector + Qwen2 base model (no LM head); returns hidden states."""

    def __init__(self, config: OpenQwen2VLConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = OpenQwen2VLProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()
        self._restrict_no_split_modules()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_vision_features(self, pixel_values: torch.Tensor, vision_feature_layer: int | None = None) -> torch.Tensor:
        """Patch features of ``vision_feature_layer`` (default: the config's; no post-layernorm):
        [N, grid*grid, vision_hidden].

        Equal to ``vision_tower(..., output_hidden_states=True).hidden_states[vision_feature_layer]``, but only the
        layers up to that one run: the released model reads the second-to-last, so the tower's forward would spend
        a whole encoder layer and the post-layernorm on an output nobody reads.
        """
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)  # transformers < 5 nests the blocks
        depth = self.config.vision_layers_run(vision_feature_layer)
        hidden_states = tower.embeddings(pixel_values.to(dtype=self.vision_tower.dtype))
        for layer in tower.encoder.layers[:depth]:
            hidden_states = layer(hidden_states, None)
            hidden_states = hidden_states[0] if isinstance(hidden_states, tuple) else hidden_states
        return hidden_states

    @can_return_tuple  # return_dict=False gives a tuple, as LLaVA's
    def get_image_features(
        self, pixel_values: torch.Tensor, vision_feature_layer: int | None = None
    ) -> BaseModelOutputWithPooling | tuple:
        """The images' tokens, as transformers 5's LLaVA returns them: ``pooler_output`` is a list of one
        [num_image_tokens, text_hidden] tensor per image (the projected features that replace the placeholders;
        ``torch.cat(out.pooler_output)`` fills ``inputs_embeds[input_ids == image_token_id]``), and
        ``last_hidden_state`` the vision features they were pooled from ([N, grid*grid, vision_hidden]).
        """
        vision_features = self.get_vision_features(pixel_values, vision_feature_layer)
        projected = self.multi_modal_projector(vision_features.to(self.multi_modal_projector.linear_1.weight.dtype))
        # One tensor per image, each its own (not a view of `projected`): FSDP2 warns about views among a wrapped
        # module's outputs, since an in-place op on one would skip its pre-backward all-gather.
        per_image = [image.clone() for image in projected]
        return BaseModelOutputWithPooling(last_hidden_state=vision_features, pooler_output=per_image)

    def placeholder_positions(self, input_ids, inputs_embeds) -> torch.Tensor:
        """Boolean [batch, seq] mask of the image placeholders, from ``input_ids`` or else ``inputs_embeds``."""
        if input_ids is None:
            token = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            return (inputs_embeds == token).all(-1)
        return input_ids == self.config.image_token_id

    def get_placeholder_mask(self, input_ids, inputs_embeds, num_image_features: int) -> torch.Tensor:
        mask = self.placeholder_positions(input_ids, inputs_embeds)
        if torch.compiler.is_compiling():
            # The checks below read the counts on the host: a graph break (an error with fullgraph=True). Compiled,
            # only the total is checked, as a traceable assertion.
            torch._check_tensor_all(mask.sum() == num_image_features,
                                    lambda: "Image features and image tokens do not match")
            return mask
        per_row = mask.sum(-1).reshape(-1).tolist()  # one device sync for both checks (an empty prompt too)
        num_placeholders = sum(per_row)
        per_image = self.config.num_image_tokens
        split = [row for row, count in enumerate(per_row) if count % per_image]
        # The wording "Image features and image tokens do not match" of both errors is what TRL looks for.
        if split:  # an image's tokens would be spread over two rows
            raise ValueError(
                f"Image features and image tokens do not match: row(s) {split} hold {[per_row[r] for r in split]} "
                "image placeholders, not a multiple of "
                f"num_image_tokens={per_image}: each image needs its {per_image} placeholders in one row"
            )
        if num_placeholders != num_image_features:
            raise ValueError(
                f"Image features and image tokens do not match: tokens {num_placeholders}, features "
                f"{num_image_features} (image placeholders (id {self.config.image_token_id}) in input_ids: "
                f"{num_placeholders}; supplied images x num_image_tokens: {num_image_features})"
            )
        return mask

    @can_return_tuple  # return_dict=False (or config.return_dict=False) gives a tuple, as Qwen2Model / LlavaModel
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # the old name still works, as in LLaVA
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        vision_feature_layer: int | None = None,
        **kwargs,
    ) -> OpenQwen2VLModelOutputWithPast | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if (input_ids if input_ids is not None else inputs_embeds).shape[1] == 0:
            # Qwen2's attention would fail on it with a reshape error that names nothing
            raise ValueError("the input has no tokens (an empty prompt): give at least one token, e.g. the `<s>` "
                             "the kit's prompts start with")
        # Set by prepare_inputs_for_generation when generate() withholds the images on purpose (see there).
        images_withheld = kwargs.pop(IMAGES_WITHHELD, False)
        if use_cache is None and self.training:
            # A cache is useless in training, and its presence makes transformers ignore packed position_ids
            # (documents of an isolated pack would see each other again).
            use_cache = False
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_outputs = None
        if pixel_values is not None and pixel_values.shape[0] > 0:
            image_outputs = self.get_image_features(pixel_values, vision_feature_layer, return_dict=True)
            image_features = torch.cat(image_outputs.pooler_output).to(inputs_embeds.device, inputs_embeds.dtype)
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features.shape[0])
            inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1).expand_as(inputs_embeds), image_features)
        elif (
            input_ids is not None
            and not images_withheld
            and not torch.compiler.is_compiling()  # compiled decoding steps: a static cache's length is a tensor
            and (cache is None or cache.get_seq_length() == 0)
        ):
            # Prefill without images: placeholders would silently keep their (meaningless) embedding.
            self.get_placeholder_mask(input_ids, inputs_embeds, 0)
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        return OpenQwen2VLModelOutputWithPast(**outputs, image_outputs=image_outputs)


class OpenQwen2VLForConditionalGeneration(OpenQwen2VLPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: OpenQwen2VLConfig):
        super().__init__(config)
        self.model = OpenQwen2VLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        self._restrict_no_split_modules()
        if self.generation_config is not None and self.generation_config.suppress_tokens is None:
            # A generated placeholder has no image behind it: fed back without a cache it breaks the forward's
            # placeholder count (TRL's generating trainers suppress it too). Saved with the model.
            self.generation_config.suppress_tokens = [config.image_token_id]

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_image_features(
        self, pixel_values: torch.Tensor, vision_feature_layer: int | None = None, **kwargs
    ) -> BaseModelOutputWithPooling | tuple:
        """See ``OpenQwen2VLModel.get_image_features``."""
        return self.model.get_image_features(pixel_values, vision_feature_layer, **kwargs)

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: torch.LongTensor | None = None, **model_kwargs):
        """Beams and ``num_return_sequences`` copy each row ``expand_size`` times; each copy needs all its row's images.

        transformers repeats every tensor row by row (``repeat_interleave``), which is right for ``pixel_values`` only
        with one image per row: a row with images [A, B] would become copies reading [A, A] and [B, B]. The images
        are repeated here as whole per-row groups ([A, B, A, B]).
        """
        pixel_values = model_kwargs.pop("pixel_values", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if pixel_values is not None and expand_size > 1 and pixel_values.shape[0] > 0:
            pixel_values = self._repeat_images_per_row(pixel_values, input_ids, model_kwargs, expand_size)
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
        return input_ids, model_kwargs

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None,
                                      inputs_embeds=None, pixel_values=None, is_first_iteration=False, **kwargs):
        """Continuing from a filled cache (``generate(full_ids, pixel_values=..., cache=earlier_cache)``), only the
        uncached tail of ``input_ids`` runs: the images whose placeholders are already in the cache are left out of
        ``pixel_values``, those of the tail (a new turn's image) are kept."""
        if (
            pixel_values is not None
            and is_first_iteration
            and next_sequence_length is not None
            and inputs_embeds is None
            and 0 < next_sequence_length < input_ids.shape[1]
        ):
            pixel_values = self._images_of_the_tail(pixel_values, input_ids, input_ids.shape[1] - next_sequence_length)
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, pixel_values=pixel_values, is_first_iteration=is_first_iteration, **kwargs
        )
        if pixel_values is not None and not is_first_iteration and model_inputs.get("pixel_values") is None:
            # transformers gives pixel_values to the first iteration only. Besides decoding steps (images already in
            # the cache), it also withholds them from an assistant model's prefill in assisted generation (run with
            # is_first_iteration=False on an empty cache, so a text-only draft model can serve): the draft then reads
            # the placeholders' own embeddings, as LLaVA's does, and the main model checks every drafted token.
            model_inputs[IMAGES_WITHHELD] = True
        return model_inputs

    def _images_of_the_tail(self, pixel_values, input_ids, cached_length: int) -> torch.Tensor:
        per_image = self.config.num_image_tokens
        mask = input_ids == self.config.image_token_id
        total = (mask.sum(-1) // per_image).tolist()
        cached_placeholders = mask[:, :cached_length].sum(-1).tolist()
        if sum(total) != pixel_values.shape[0]:
            return pixel_values  # a count mismatch: the forward raises, naming it
        split = [row for row, count in enumerate(cached_placeholders) if count % per_image]
        if split:
            raise ValueError(
                f"the cache ({cached_length} tokens) ends inside an image's {per_image} placeholders in row(s) "
                f"{split}: continue from a cache that holds whole images"
            )
        keep, start = [], 0
        for row_total, row_cached in zip(total, cached_placeholders):
            keep.extend(range(start + row_cached // per_image, start + row_total))
            start += row_total
        return pixel_values[torch.tensor(keep, dtype=torch.long, device=pixel_values.device)]

    def _repeat_images_per_row(self, pixel_values, expanded_ids, model_kwargs, expand_size: int) -> torch.Tensor:
        embeds = model_kwargs.get("inputs_embeds")
        ids = expanded_ids if expanded_ids is not None and expanded_ids.shape[-1] > 0 else None
        if ids is None and embeds is None:
            return pixel_values.repeat_interleave(expand_size, dim=0)
        # The rows are already expanded: every expand_size-th one is an original row.
        mask = self.model.placeholder_positions(ids, embeds)[::expand_size]
        images_per_row = (mask.sum(-1) // self.config.num_image_tokens).tolist()
        if sum(images_per_row) != pixel_values.shape[0]:  # a count mismatch: the forward raises, naming it
            return pixel_values.repeat_interleave(expand_size, dim=0)
        groups = torch.split(pixel_values, images_per_row)
        return torch.cat([group for group in groups for _ in range(expand_size)])

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # the old name still works, as in LLaVA
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        vision_feature_layer: int | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> OpenQwen2VLCausalLMOutputWithPast | tuple:
        # mm_token_type_ids (processor(..., return_mm_token_type_ids=True)) is taken so that the processor's whole
        # output can be passed on, also to generate(); the placeholders are found from input_ids.
        del mm_token_type_ids
        if use_cache is None and labels is not None:
            use_cache = False  # computing a loss: no cache (it would also defeat packed-sequence isolation)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            vision_feature_layer=vision_feature_layer,
            return_dict=True,  # read by name below, whatever config.return_dict says
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        boolean_mask = isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dtype == torch.bool
        if boolean_mask and logits_to_keep.dim() == 2:
            # A [batch, seq] mask keeps exactly the marked (row, position) pairs: logits [kept, vocab] in row-major
            # order. Training computes the LM head only where a loss is taken, not at the union over rows.
            if logits_to_keep.shape != hidden_states.shape[:2]:
                raise ValueError("a boolean logits_to_keep must have the input's shape "
                                 f"{tuple(hidden_states.shape[:2])}, got {tuple(logits_to_keep.shape)}")
            logits = self.lm_head(hidden_states[logits_to_keep])
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return OpenQwen2VLCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
        )


__all__ = ["OpenQwen2VLModel", "OpenQwen2VLForConditionalGeneration", "OpenQwen2VLPreTrainedModel"]
