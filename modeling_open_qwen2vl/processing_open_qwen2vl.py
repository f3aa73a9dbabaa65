"""Open-Qwen2VL processor: SigLIP image processor + Qwen2 tokenizer, `<image>` expansion and the text formats.

Runs as transformers remote code: imports only transformers, torch and the standard library.

Text formats (the model sees `num_image_tokens` copies of `<|image_pad|>` wherever the user wrote `<image>`):
- pretraining: ``<s><image>\\n{caption}<|im_end|>`` (``format_pretraining_text``)
- raw inference, as the original README and evaluation harness: ``<s>`` + prompt (``format_raw_prompt``)
- chat: template ``compat`` reproduces the original SFT strings byte for byte (quirks included) and ``chatml`` is
  clean ChatML; pick one with ``apply_chat_template(..., chat_template="compat" | "chatml")``.
"""

import re

import torch
from transformers import BatchFeature
from transformers.image_utils import is_valid_image, make_flat_list_of_images
from transformers.processing_utils import ImagesKwargs, ProcessorMixin
from transformers.utils import logging

logger = logging.get_logger(__name__)

IMAGE_MARKER = "<image>"
IMAGE_PAD_TOKEN = "<|image_pad|>"
BOS = "<s>"
EOS = "<|im_end|>"
COMPAT_SYSTEM_PREFIX = "<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
COMPAT_USER_TURN_END = "<|im_end|>assistant\n"
# Keywords passed on to the image processor; keywords accepted with nothing to do: the tokenizer adds no special
# tokens, and offsets are already in the rendered text's characters (no replacement shifts them).
_IMAGE_OPTIONS = frozenset(ImagesKwargs.__annotations__) - {"return_tensors"}
_NOTHING_TO_DO = frozenset({"add_special_tokens", "return_text_replacement_offsets"})
# transformers' private markers around a control token typed in user text (apply_chat_template's
# sanitize_control_tokens): such a span is text, never an image marker or placeholder
_MARKED = re.compile("\U000f0000.*?\U000f0001")

# Renders a message's content: a string as is; a list of parts with images as `<image>` and parts joined by "\n"
# (so [image, text] -> "<image>\nText", the LLaVA data convention).
_CONTENT_MACRO = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- set ns = namespace(text='', first=true) -%}"
    "{%- for part in content if part['type'] in ['image', 'text'] -%}"
    "{%- if not ns.first -%}{%- set ns.text = ns.text + '\\n' -%}{%- endif -%}"
    "{%- set ns.text = ns.text + ('<image>' if part['type'] == 'image' else part['text']) -%}"
    "{%- set ns.first = false -%}"
    "{%- endfor -%}{{ ns.text }}"
    "{%- endif -%}"
    "{%- endmacro -%}"
)

# The original Qwen2PromptBuilder: fixed system prompt starting with <s>, user wrapper missing "\n<|im_start|>"
# before "assistant", messages stripped, an empty answer becomes " ", roles taken by position (system ignored).
COMPAT_CHAT_TEMPLATE = (
    _CONTENT_MACRO + "{{ '<s><|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- set text = render(message['content']) | trim -%}"
    "{%- if loop.index0 % 2 == 0 -%}{{ '<|im_start|>user\\n' + text + '<|im_end|>assistant\\n' }}"
    "{%- else -%}{% generation %}{{ (text if text else ' ') + '<|im_end|>\\n' }}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

CHATML_CHAT_TEMPLATE = (
    _CONTENT_MACRO + "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ render(message['content']) + '<|im_end|>\\n' }}{% endgeneration %}"
    "{%- else -%}{{ '<|im_start|>' + message['role'] + '\\n' + render(message['content']) + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def chat_templates(default: str = "chatml") -> dict:
    """Both templates, with ``default`` ("compat" or "chatml") also stored as the processor's default."""
    templates = {"compat": COMPAT_CHAT_TEMPLATE, "chatml": CHATML_CHAT_TEMPLATE}
    if default not in templates:
        raise ValueError(f"unknown chat format {default!r}; expected one of {sorted(templates)}")
    return {"default": templates[default], **templates}


def format_pretraining_text(caption: str) -> str:
    """``<s><image>\\n{caption}<|im_end|>``; a literal ``<image>`` inside the caption is neutralised as the original."""
    return BOS + IMAGE_MARKER + "\n" + caption.replace(IMAGE_MARKER, "<image-placeholder>") + EOS


def format_raw_prompt(prompt: str) -> str:
    """The original inference format: ``<s>`` + raw prompt, e.g. ``<s><image>\\nDescribe the image.``"""
    return BOS + prompt


def _flatten_images(images) -> list:
    """The single images in ``images``, in order, counted as transformers' image processors count them.

    Lists (nested or not) hold their elements and ``None`` holds nothing; an array or tensor is split by
    ``make_flat_list_of_images``, so a 4-D batch (N, C, H, W) or (N, H, W, C) is N images, not one; anything else
    (a path or URL, which the image processor loads) is one image.
    """
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten_images(item)]
    if is_valid_image(images):
        return list(make_flat_list_of_images(images))
    return [images]


def _is_image_group(item) -> bool:
    """Whether an entry of ``images`` reads as one text's images: a list, ``None``, or a 4-D batch array/tensor."""
    return item is None or isinstance(item, (list, tuple)) or (is_valid_image(item) and getattr(item, "ndim", 0) == 4)


class OpenQwen2VLProcessor(ProcessorMixin):
    """Images -> ``pixel_values``; text with ``<image>`` markers -> ids with ``num_image_tokens`` placeholders each.

    Args:
        image_processor: a SiglipImageProcessor (384x384 squash resize, bicubic, mean = std = 0.5 for the real model).
        tokenizer: the Open-Qwen2VL tokenizer (see ``tokenizer_utils.build_open_qwen2vl_tokenizer``).
        chat_template: a template string or a dict of named templates (``chat_templates()``).
        num_image_tokens: placeholders per image; must equal the model config's ``num_image_tokens``.
        compat_image_quirk: reproduce the original's tokenization of the first SFT turn (see ``_tokenize``).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        num_image_tokens: int = 144,
        compat_image_quirk: bool = True,
        **kwargs,
    ):
        self.num_image_tokens = num_image_tokens
        self.compat_image_quirk = compat_image_quirk
        self.image_token = IMAGE_MARKER
        self.image_pad_token = IMAGE_PAD_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD_TOKEN) if tokenizer is not None else None
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]

    def encode_text(self, text: str) -> list:
        """Token ids of one text, each ``<image>`` marker expanded to ``num_image_tokens`` placeholders.

        The original tokenizes each turn on its own with LLaVA's ``tokenizer_image_token``. When a turn starts with the
        BOS id (only the first SFT turn, whose system prompt starts with ``<s>``) that function skips the first token
        of every chunk after an image: the ``\\n`` after a leading image, or the ``<|im_end|>`` after a trailing one.
        With ``compat_image_quirk`` this is reproduced for texts in the compat chat format; everything else is
        tokenized plainly (the sentinel split and whole-text tokenization agree because the placeholder is special).
        """
        return self._encode(text, with_offsets=False)[0]

    def _encode(self, text: str, with_offsets: bool, marked: bool = False) -> tuple[list, list | None]:
        """``encode_text``'s ids and, with ``with_offsets``, each id's (start, end) characters in ``text`` (an image's
        placeholders all span its ``<image>`` marker), as a fast tokenizer's ``offset_mapping``. ``marked``: the
        text holds control tokens transformers marked in user input (``sanitize_control_tokens``), encoded as text."""
        if marked:
            from transformers.utils.chat_template_utils import encode_marked_chat  # transformers' own marker rules
        cut = 0
        if self.compat_image_quirk and text.startswith(COMPAT_SYSTEM_PREFIX) and COMPAT_USER_TURN_END in text:
            cut = text.index(COMPAT_USER_TURN_END) + len(COMPAT_USER_TURN_END)
        ids, offsets = [], [] if with_offsets else None
        # (part, whether the quirk drops the first token of each chunk after an image)
        for start, end, drop_after_image in ((0, cut, True), (cut, len(text), False)):
            position = start
            for i, chunk in enumerate(text[start:end].split(IMAGE_MARKER)):
                if i:
                    ids.extend([self.image_token_id] * self.num_image_tokens)
                    if with_offsets:
                        offsets.extend([(position, position + len(IMAGE_MARKER))] * self.num_image_tokens)
                    position += len(IMAGE_MARKER)
                if chunk:
                    drop = 1 if drop_after_image and i else 0
                    if with_offsets:
                        piece = self.tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
                        ids.extend(piece["input_ids"][drop:])
                        offsets.extend((position + a, position + b) for a, b in piece["offset_mapping"][drop:])
                    elif marked:
                        ids.extend(encode_marked_chat(self.tokenizer, chunk)[drop:])
                    else:
                        ids.extend(self.tokenizer.encode(chunk, add_special_tokens=False)[drop:])
                position += len(chunk)
        return ids, offsets

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs) -> BatchFeature:
        """Tokenize ``text`` (str or list) and preprocess ``images`` (flat in order of appearance, or one list per text;
        an array or tensor of shape (N, ...) is N images, as for transformers' image processors).

        Raises ``ValueError`` when the number of ``<image>`` markers and images differ, or a text holds the literal
        placeholder token. ``truncation`` (to ``max_length``, else the tokenizer's ``model_max_length``) drops tokens
        from the end the tokenizer's ``truncation_side`` names and never cuts through an image: a text whose
        placeholders would be cut raises instead. Options are taken as transformers' processors take them: flat
        keywords first, then ``text_kwargs`` / ``images_kwargs``, then ``common_kwargs``; image-processor options go
        in ``images_kwargs`` or as keywords (``input_data_format="channels_last"``...). ``return_offsets_mapping``
        gives each token's character span in its text (what ``apply_chat_template(return_assistant_tokens_mask=True)``
        and TRL's ``assistant_only_loss`` need); ``return_mm_token_type_ids`` marks image placeholders with 1;
        ``sanitize_control_tokens`` (set by ``apply_chat_template(..., sanitize_control_tokens=True)``) encodes the
        control tokens transformers marked in user text as plain text.
        """
        if videos is not None or audio is not None:
            raise ValueError("OpenQwen2VLProcessor takes images and text only (no videos or audio)")
        common = kwargs.pop("common_kwargs", None) or {}
        options = {**common, **(kwargs.pop("text_kwargs", None) or {}), **kwargs}
        image_options = {**{k: v for k, v in common.items() if k in _IMAGE_OPTIONS},
                         **(options.pop("images_kwargs", None) or {}),
                         **{k: options.pop(k) for k in list(options) if k in _IMAGE_OPTIONS}}
        return self._process(images, text, image_options, **options)

    def _process(
        self,
        images,
        text,
        image_options: dict,
        return_tensors=None,
        padding=False,
        padding_side=None,
        truncation: bool = False,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        return_attention_mask: bool | None = True,
        return_offsets_mapping: bool = False,
        return_mm_token_type_ids: bool = False,
        sanitize_control_tokens: bool = False,
        **kwargs,
    ) -> BatchFeature:
        unused = sorted(k for k in kwargs if k not in _NOTHING_TO_DO)
        if unused:
            logger.warning_once(f"OpenQwen2VLProcessor ignores the keyword argument(s) {unused}")
        if sanitize_control_tokens and return_offsets_mapping:
            raise ValueError("sanitize_control_tokens=True cannot give offsets (the markers it removes shift them), "
                             "as transformers' tokenizers refuse it with return_assistant_tokens_mask=True")
        if text is None:
            if images is None:
                raise ValueError("OpenQwen2VLProcessor needs `text`, `images` or both")
            return BatchFeature(self._pixel_values(_flatten_images(images), image_options), tensor_type=return_tensors)
        texts = [text] if isinstance(text, str) else list(text)
        # Control tokens marked in user text are text, never markers or placeholders.
        unmarked = [_MARKED.sub("", t) for t in texts] if sanitize_control_tokens else texts
        flat_images = _flatten_images(images)
        counts = [t.count(IMAGE_MARKER) for t in unmarked]
        if sum(counts) != len(flat_images):
            raise ValueError(
                f"the text has {sum(counts)} {IMAGE_MARKER} marker(s) (per text: {counts}) but {len(flat_images)} "
                f"image(s) were given; each {IMAGE_MARKER} takes exactly one image"
            )
        if isinstance(images, (list, tuple)) and len(images) == len(texts) and len(texts) > 1:
            per_text = [len(_flatten_images(x)) for x in images]
            if all(_is_image_group(x) for x in images) and per_text != counts:
                raise ValueError(f"images per text {per_text} do not match {IMAGE_MARKER} markers per text {counts}")
        if truncation and truncation != "do_not_truncate" and max_length is None:
            max_length = self.tokenizer.model_max_length
        input_ids, offsets = [], []
        for index, sample in enumerate(texts):
            if IMAGE_PAD_TOKEN in unmarked[index]:  # it would become a placeholder with no image features behind it
                raise ValueError(f"text {index} contains the literal token {IMAGE_PAD_TOKEN}; mark images with "
                                 f"{IMAGE_MARKER} (the processor expands each to {self.num_image_tokens} of them)")
            ids, spans = self._encode(sample, with_offsets=return_offsets_mapping, marked=sanitize_control_tokens)
            if truncation and truncation != "do_not_truncate" and len(ids) > max_length:
                # The tokenizer's truncation_side says which end goes, as with the tokenizer alone.
                side = self.tokenizer.truncation_side
                kept = slice(len(ids) - max_length, None) if side == "left" else slice(None, max_length)
                dropped = ids[: len(ids) - max_length] if side == "left" else ids[max_length:]
                if self.image_token_id in dropped:
                    raise ValueError(
                        f"text {index} has {len(ids)} tokens after image expansion; truncating it to "
                        f"max_length={max_length} (truncation_side={side!r}) would cut through an image's "
                        f"{self.num_image_tokens} placeholders"
                    )
                ids, spans = ids[kept], spans and spans[kept]
            input_ids.append(ids)
            offsets.append(spans)
        encoded = self.tokenizer.pad(
            {"input_ids": input_ids},
            padding=padding,
            padding_side=padding_side,
            max_length=max_length if padding == "max_length" else None,
            pad_to_multiple_of=pad_to_multiple_of,
            return_attention_mask=return_attention_mask,
        )
        data = dict(encoded)
        if return_mm_token_type_ids:  # 1 at image placeholders, 0 for text and padding (transformers' convention)
            data["mm_token_type_ids"] = [[int(i == self.image_token_id) for i in row] for row in data["input_ids"]]
        if return_offsets_mapping:  # padding positions span no characters
            left = (padding_side or self.tokenizer.padding_side) == "left"
            data["offset_mapping"] = [
                [(0, 0)] * (len(padded) - len(spans)) + spans if left else spans + [(0, 0)] * (len(padded) - len(spans))
                for padded, spans in zip(data["input_ids"], offsets)
            ]
        if return_tensors is not None:
            # Ids, mask and offsets are integers even when empty: BatchFeature would make [[]] a float tensor, where
            # the tokenizer gives int64 of shape (batch, 0). Ragged rows are left to BatchFeature, as before.
            for key in ("input_ids", "attention_mask", "offset_mapping", "mm_token_type_ids"):
                if key in data and len({len(row) for row in data[key]}) <= 1:
                    data[key] = torch.tensor(data[key], dtype=torch.long)
        if flat_images:
            data.update(self._pixel_values(flat_images, image_options))
        return BatchFeature(data, tensor_type=return_tensors)

    def _pixel_values(self, images: list, options: dict | None = None) -> dict:
        return {"pixel_values": self.image_processor(images, return_tensors="pt", **(options or {}))["pixel_values"]}

    def format_pretraining_text(self, caption: str) -> str:
        return format_pretraining_text(caption)

    def format_raw_prompt(self, prompt: str) -> str:
        return format_raw_prompt(prompt)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


__all__ = ["OpenQwen2VLProcessor"]
