"""Conversation -> token ids and labels that cover only the assistant turns.

The chat template marks each assistant reply (with its ``<|im_end|>\\n``) between ``{% generation %}`` tags;
transformers reports those character spans. The rendered text is cut at the spans and each piece is tokenized on
its own with the kit's processor, so:

* a prompt piece ends exactly where generation starts at inference (``...assistant\\n``), and an assistant piece
  is tokenized like a reply the model generates;
* in the ``compat`` format each piece is one turn of the original ``Qwen2PromptBuilder``, tokenized as the original
  tokenized turns one by one (the processor reproduces its first-turn image quirk); that builder has no system role,
  so system turns are dropped: each such conversation is reported (``EncodedSample.dropped``, counted by
  ``encode_sft_dataset``), and a system turn holding an image is a :class:`BadSampleError`;
* labels are the ids of the assistant pieces; system/user text, image placeholders and padding are ``-100``
  (with ``assistant_only=False``, TRL's ``completion_only_loss=False``: every text token, never an image placeholder).

Ids are stored with ONE placeholder per image; the collator expands each to ``num_image_tokens`` copies, so an
encoded dataset serves any token count (144 or 729) and stays small.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError
from transformers.utils.chat_template_utils import render_jinja_template

from modeling_open_qwen2vl import chat_templates

from .errors import BadSampleError, DroppedContent
from .formats import SFTSample, count_image_markers

IGNORE_INDEX = -100
SYSTEM_TURNS_DROPPED = "system_turns_dropped"
COMPAT_NO_SYSTEM = ("system turn(s) dropped by chat_format 'compat': the original Open-Qwen2VL prompt builder it "
                    "reproduces has no system role (it writes its fixed 'You are a helpful assistant.' prompt "
                    "instead); use chat_format 'chatml' (--chat_format chatml) to keep system turns")


@dataclass
class EncodedSample:
    """Compact encoding of one conversation (one placeholder id per image)."""

    sample_id: str
    input_ids: list[int]
    labels: list[int]
    images: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[DroppedContent] = field(default_factory=list)  # content the chat format could not show

    @property
    def num_images(self) -> int:
        return len(self.images)


class SFTEncoder:
    """Renders a conversation with the ``compat`` or ``chatml`` template and tokenizes it with assistant-only labels.

    Args:
        processor: the kit's ``OpenQwen2VLProcessor`` (its tokenizer and ``<image>`` handling are used).
        chat_format: ``"chatml"`` (clean ChatML, for new training) or ``"compat"`` (the original's SFT strings, for
            continuing from released checkpoints).
        max_length: the longest allowed sequence after image expansion (``None``: no limit).
        num_image_tokens: placeholders per image in the model input (default: the processor's).
        assistant_only: labels on the assistant turns only (default); ``False`` labels every text token of the
            conversation (TRL's ``completion_only_loss=False``), image placeholders still excluded.
    """

    def __init__(self, processor, chat_format: str = "chatml", max_length: int | None = 4096,
                 num_image_tokens: int | None = None, assistant_only: bool = True):
        templates = chat_templates()
        if chat_format not in ("compat", "chatml"):
            raise ValueError(f"unknown chat_format {chat_format!r}; expected 'compat' or 'chatml'")
        self.chat_format = chat_format
        self.template = templates[chat_format]
        self.max_length = max_length
        self.assistant_only = assistant_only
        self.num_image_tokens = int(num_image_tokens or processor.num_image_tokens)
        self.image_token_id = processor.image_token_id
        self.pad_token_id = processor.tokenizer.pad_token_id
        # A private copy that writes one placeholder per image (the shared processor is left untouched).
        self._compact = copy.copy(processor)
        self._compact.num_image_tokens = 1
        if not hasattr(self._compact, "encode_text"):
            raise TypeError(f"{type(processor).__name__} is not the kit's OpenQwen2VLProcessor (no `encode_text`)")

    def expanded_length(self, num_ids: int, num_images: int) -> int:
        """Positions of a compact sequence once each image takes ``num_image_tokens`` positions."""
        return num_ids + (self.num_image_tokens - 1) * num_images

    def render_segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """The rendered conversation cut into ``(text, is_assistant)`` pieces at the generation spans."""
        rendered, spans = render_jinja_template(
            conversations=[messages], chat_template=self.template, return_assistant_tokens_mask=True
        )
        text, spans = rendered[0], spans[0]
        pieces, cursor = [], 0
        for start, end in spans:
            if start > cursor:
                pieces.append((text[cursor:start], False))
            if end > start:
                pieces.append((text[start:end], True))
            cursor = end
        if cursor < len(text):
            pieces.append((text[cursor:], False))
        return pieces

    def encode(self, sample: SFTSample) -> EncodedSample:
        """Token ids and labels of one sample; raises :class:`BadSampleError` for unusable samples. Content the
        chat format cannot show (system turns in ``compat``) is listed in the result's ``dropped``."""
        dropped = self._check_compat_roles(sample) if self.chat_format == "compat" else []
        try:
            segments = self.render_segments(sample.messages)
        except (TypeError, AttributeError, KeyError, TemplateError) as error:  # content formats.py did not check
            raise BadSampleError(sample.sample_id, "bad_content",
                                 f"the chat template cannot render the messages: {type(error).__name__}: {error}"
                                 ) from None
        input_ids: list[int] = []
        labels: list[int] = []
        for text, is_assistant in segments:
            ids = self._compact.encode_text(text)
            input_ids.extend(ids)
            if is_assistant:
                labels.extend(IGNORE_INDEX if t == self.image_token_id else t for t in ids)
            else:
                labels.extend([IGNORE_INDEX] * len(ids))
        placeholders = sum(1 for t in input_ids if t == self.image_token_id)
        if placeholders != len(sample.images):
            raise BadSampleError(
                sample.sample_id, "image_count_mismatch",
                f"the tokenized text holds {placeholders} image placeholder(s) for {len(sample.images)} image(s) "
                "(a literal <|image_pad|> in the text?)",
            )
        if all(label == IGNORE_INDEX for label in labels):
            raise BadSampleError(sample.sample_id, "no_assistant_turn", "no assistant token left to learn from")
        if not self.assistant_only:
            labels = [IGNORE_INDEX if t == self.image_token_id else t for t in input_ids]
        length = self.expanded_length(len(input_ids), len(sample.images))
        if self.max_length is not None and length > self.max_length:
            raise BadSampleError(
                sample.sample_id, "too_long",
                f"{length} positions after expanding {len(sample.images)} image(s) x {self.num_image_tokens} tokens, "
                f"over max_length={self.max_length} (not truncated: a cut could split an image's tokens or drop the "
                "answer); raise --max_length, or pass --skip_bad_samples to drop such conversations, counted",
            )
        return EncodedSample(sample.sample_id, input_ids, labels, list(sample.images), dropped)

    @staticmethod
    def _check_compat_roles(sample: SFTSample) -> list[DroppedContent]:
        # The original prompt builder takes roles by position (even = user, odd = assistant) and drops system turns.
        system = [m for m in sample.messages if m["role"] == "system"]
        images = sum(count_image_markers(m["content"]) for m in system)
        if images:  # the image would vanish with its turn while its pixels still reach the model
            raise BadSampleError(sample.sample_id, "image_in_system_turn",
                                 f"{images} image(s) in a system turn, which the compat format drops (the original "
                                 "prompt builder has no system role); move the image into a user turn, or use "
                                 "--chat_format chatml")
        roles = [m["role"] for m in sample.messages if m["role"] != "system"]
        expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(roles))]
        if roles != expected:
            raise BadSampleError(sample.sample_id, "bad_role_order",
                                 f"the compat format needs alternating user/assistant turns starting with user, got "
                                 f"{roles}")
        return [DroppedContent(sample.sample_id, SYSTEM_TURNS_DROPPED, COMPAT_NO_SYSTEM)] if system else []
