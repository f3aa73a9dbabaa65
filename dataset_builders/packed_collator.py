"""From packed pretraining rows to model inputs, in the paper's attention mode or with documents isolated.

A packed row (what the offline and streaming packers yield) is a dict::

    {"images": [PIL.Image, ...], "texts": [caption, ...], "lengths": [int, ...], "uids": [str, ...]}

Document ``i`` is ``<s><image>\\n{texts[i]}<|im_end|>`` with ``images[i]`` (the pretraining format of
``modeling_open_qwen2vl.format_pretraining_text``); ``lengths`` are its positions at the pack's ``num_image_tokens``.
The collator re-tokenizes the texts with the processor it is given, so a pack built for one tokenizer works with
any compatible one.

Attention modes:

- ``faithful`` (the paper): documents follow each other in one causal sequence; positions run ``0..L-1`` across
  the pack and each document sees the ones before it. ``attention_mask`` only hides the right padding. The ``<s>``
  of a later document is supervised (predicted from the previous document), as in the original.
- ``isolated``: positions restart at 0 for every document (and for the padding block), and the batch carries
  ``attention_mask=None`` and ``use_cache=False``. transformers (5.x, ``masking_utils.find_packed_sequence_indices``)
  then builds a block-causal mask from the restarting ``position_ids`` for the sdpa, eager and flex kernels, so a
  document sees only itself: its per-token loss equals the document's loss run alone. Both are required: a 2-D
  ``attention_mask`` or a KV cache (which Qwen2 creates whenever ``use_cache`` is true, training included) switch
  packed-sequence detection off and the documents silently attend to each other again. The first token of each
  document is not supervised (it would be predicted from the previous document). With flash-attention kernels,
  transformers infers the document boundaries from ``position_ids`` only for a batch of one row; for more rows pass
  ``return_flash_attn_kwargs=True`` (``cu_seq_lens_q/k``, ``max_length_q/k`` over the flattened batch).

In both modes image placeholders and padding are never supervised (label -100) and padding is never attended by a
real token.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from modeling_open_qwen2vl.processing_open_qwen2vl import BOS, EOS, IMAGE_MARKER, IMAGE_PAD_TOKEN

from .images import BadImage, decode_rgb, to_rgb
from .packing import DEFAULT_CAPACITY
from .streaming_packing import Drop, Measured, StreamingPacker

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ATTENTION_MODES = ("faithful", "isolated")
BAD_DOCUMENT_POLICIES = ("drop", "raise")


class PackedCollator:
    """Packed rows -> ``input_ids``, ``labels``, ``attention_mask``, ``position_ids``, ``pixel_values``.

    Args:
        processor: an ``OpenQwen2VLProcessor`` (its tokenizer, image processor and ``num_image_tokens`` are used).
        attention: ``"faithful"`` (the paper) or ``"isolated"`` (documents cannot see each other).
        max_length: the longest row; a row that re-tokenizes longer (another tokenizer, more image tokens) loses
            its trailing documents, counted in ``stats`` and logged, never cut through a document.
        pad_to_multiple_of: pad the batch length up to a multiple of this (e.g. 8 or 64 for tensor cores).
        return_flash_attn_kwargs: isolated mode only; add the varlen kwargs flash-attention needs for batches of
            more than one row.
        padding_mask: faithful mode only; ``False`` leaves ``attention_mask`` out (``None``). Rows are right-padded
            and attention is causal, so no real position ever sees the padding: the loss is the same, and without a
            mask transformers gives sdpa ``is_causal`` (flash kernels on GPUs) instead of a materialised 4-D mask.
        on_bad_document: what a bad document does -- no image, an image that cannot be decoded, an empty caption, a
            caption that tokenizes to image placeholders, or a document that does not fit ``max_length`` (with the
            ones after it: a row never loses a document from its middle).
            ``"drop"`` (default): it leaves its row, counted in ``stats["documents_dropped_<reason>"]`` and logged
            with its uid (a batch left with no document becomes one padding position without a loss, counted in
            ``stats["batches_without_documents"]``); ``"raise"``: a ValueError naming it. A malformed row (image and text counts differ, no
            documents) always raises: that is a wrong corpus, not a bad sample.

    Returns (``__call__``): ``input_ids`` [B, L] (right padded with the tokenizer's pad id), ``labels`` [B, L],
    ``attention_mask`` ([B, L] of 0/1 in faithful mode, ``None`` with ``padding_mask=False`` or in isolated mode,
    see the module doc),
    ``position_ids`` [B, L], ``pixel_values`` [N_images, 3, H, W] (documents in order, row by row), and
    ``num_real_tokens`` (int, non-padding positions, for throughput accounting), ``documents_dropped`` (int, this
    batch's documents left out: bad documents, over ``max_length``), ``stats`` (this batch's increments of
    ``self.stats``), ``uids`` (of the documents kept, in order);
    isolated batches also carry ``use_cache=False``. Pass only the model's inputs to the model.
    """

    def __init__(
        self,
        processor,
        attention: str = "faithful",
        max_length: int = 4096,
        pad_to_multiple_of: int | None = None,
        return_flash_attn_kwargs: bool = False,
        on_bad_document: str = "drop",
        padding_mask: bool = True,
    ):
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if on_bad_document not in BAD_DOCUMENT_POLICIES:
            raise ValueError(f"on_bad_document must be one of {BAD_DOCUMENT_POLICIES}, got {on_bad_document!r}")
        if return_flash_attn_kwargs and attention != "isolated":
            raise ValueError("return_flash_attn_kwargs only applies to attention='isolated'")
        self.on_bad_document = on_bad_document
        self.padding_mask = padding_mask
        self.processor = processor
        self.attention = attention
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.return_flash_attn_kwargs = return_flash_attn_kwargs
        tokenizer = processor.tokenizer
        self.pad_token_id = tokenizer.pad_token_id
        self.image_token_id = processor.image_token_id
        self.bos_ids = tokenizer.encode(BOS, add_special_tokens=False)
        self.stats: Counter = Counter()

    @property
    def num_image_tokens(self) -> int:
        return self.processor.num_image_tokens

    def document_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of pretraining documents ``<s><image>\\n{text}<|im_end|>`` (placeholders expanded).

        Same ids as ``processor(text=format_pretraining_text(text))``: a literal ``<image>`` inside a caption is
        neutralised; a caption that tokenizes to image placeholders itself (e.g. contains ``<|image_pad|>``) is
        rejected, since its image count would no longer match.
        """
        documents = self._document_ids_or_none(texts)
        for text, ids in zip(texts, documents):
            if ids is None:
                raise ValueError(self._placeholder_message(text))
        return documents

    def _document_ids_or_none(self, texts: list[str]) -> list[list[int] | None]:
        """``document_ids`` with ``None`` for a caption that tokenizes to image placeholders."""
        if not texts:
            return []
        tails = [
            "\n" + text.replace(IMAGE_MARKER, "<image-placeholder>") + EOS for text in texts
        ]
        encoded = self.processor.tokenizer(tails, add_special_tokens=False)["input_ids"]
        head = self.bos_ids + [self.image_token_id] * self.num_image_tokens
        return [None if self.image_token_id in tail else head + tail for tail in encoded]

    def _placeholder_message(self, text: str) -> str:
        token = self.processor.tokenizer.convert_ids_to_tokens(self.image_token_id)
        return f"caption {text[:60]!r} contains the image placeholder token {token}"

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if not rows:
            raise ValueError("PackedCollator got an empty batch")
        sequences, images, uids = [], [], []
        stats_before = Counter(self.stats)
        for row in rows:
            documents, row_images, row_uids = self._row_documents(row)
            if documents:  # a row whose every document was bad leaves the batch (its drops are counted)
                sequences.append(documents)
                images.extend(row_images)
                uids.extend(uid for uid in row_uids if uid is not None)
        if not sequences:
            # Rare (every document of the micro-batch bad), but a multi-day run must not stop on it: the step
            # trains on one padding position without a loss, which the token-weighted loss and every process's
            # collectives handle like any other micro-batch.
            dropped_uids = [uid for row in rows for uid in (row.get("uids") or [])]
            logger.warning("no document of this batch is usable, all were dropped (uids %s; the warnings above say "
                           "why): it contributes no loss", dropped_uids[:6])
            self.stats["batches_without_documents"] += 1
            sequences, no_loss = [[[self.pad_token_id]]], True
        else:
            no_loss = False
        longest = max(sum(len(d) for d in docs) for docs in sequences)
        width = longest
        if self.pad_to_multiple_of:
            width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_size = len(sequences)
        input_ids = torch.full((batch_size, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((batch_size, width), dtype=torch.long)
        attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
        boundaries = []  # flattened document (and padding-block) starts, for flash-attention varlen
        for b, documents in enumerate(sequences):
            offset = 0
            for doc in documents:
                ids = torch.tensor(doc, dtype=torch.long)
                end = offset + ids.numel()
                input_ids[b, offset:end] = ids
                labels[b, offset:end] = ids
                if self.attention == "isolated":
                    position_ids[b, offset:end] = torch.arange(ids.numel())
                    labels[b, offset] = IGNORE_INDEX  # would be predicted from the previous document
                boundaries.append(b * width + offset)
                offset = end
            attention_mask[b, :offset] = 1
            if offset < width:
                boundaries.append(b * width + offset)
                if self.attention == "isolated":
                    position_ids[b, offset:] = torch.arange(width - offset)
            if self.attention == "faithful":
                position_ids[b] = torch.arange(width)
        labels[input_ids == self.image_token_id] = IGNORE_INDEX
        if no_loss:
            labels.fill_(IGNORE_INDEX)
        num_real_tokens = 0 if no_loss else int(attention_mask.sum())
        batch_stats = self.stats - stats_before
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "num_real_tokens": num_real_tokens,
            "documents_dropped": sum(n for key, n in batch_stats.items() if key.startswith("documents_dropped_")),
            # This batch's share of ``stats``: in DataLoader workers the collator's own counters are copies that
            # the main process never sees, so the trainer adds these up.
            "stats": dict(batch_stats),
            "uids": uids,
        }
        if self.attention == "faithful":
            batch["attention_mask"] = attention_mask if self.padding_mask else None
        else:
            batch["attention_mask"] = None
            batch["use_cache"] = False
            if self.return_flash_attn_kwargs:
                cu = torch.tensor(boundaries + [batch_size * width], dtype=torch.int32)
                batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
                batch["max_length_q"] = batch["max_length_k"] = int(cu.diff().max())
        if images:
            batch["pixel_values"] = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return batch

    def _row_documents(self, row: dict[str, Any]) -> tuple[list[list[int]], list, list]:
        """The row's kept documents: token ids, images and uids (``None`` where the row has no uids)."""
        texts, images = list(row.get("texts") or []), list(row.get("images") or [])
        uids = list(row.get("uids") or [])
        name = f"packed row (uids {uids[:3]}{'...' if len(uids) > 3 else ''})"
        if len(texts) != len(images):
            raise ValueError(
                f"{name}: {len(images)} image(s) for {len(texts)} text(s); each packed document is one caption "
                "with exactly one image"
            )
        if not texts:
            raise ValueError(f"{name} has no documents")
        usable = []  # (index, uid, caption, decoded image)
        for i, (text, image) in enumerate(zip(texts, images)):
            uid = uids[i] if i < len(uids) else None
            if not isinstance(text, str) or not text.strip():
                self._bad_document(name, i, uid, "empty_caption", f"has an empty caption ({text!r})")
                continue
            if image is None:
                self._bad_document(name, i, uid, "missing_image", "has no image")
                continue
            try:
                image = _as_image(image)
            except (BadImage, OSError) as error:
                self._bad_document(name, i, uid, "bad_image", f"has an image that cannot be decoded: {error}")
                continue
            usable.append((i, uid, text, image))
        documents, kept_images, kept_uids, indices = [], [], [], []
        for (i, uid, text, image), ids in zip(usable, self._document_ids_or_none([u[2] for u in usable])):
            if ids is None:
                self._bad_document(name, i, uid, "image_token_in_caption",
                                   f"is rejected: {self._placeholder_message(text)}")
                continue
            documents.append(ids)
            kept_images.append(image)
            kept_uids.append(uid)
            indices.append(i)
        kept, total = [], 0
        for doc in documents:
            if total + len(doc) > self.max_length:
                break
            kept.append(doc)
            total += len(doc)
        if len(kept) < len(documents):
            # The documents from the first that does not fit on leave the row (never cut through one).
            first = len(kept)
            where = (f"the row re-tokenizes to {sum(len(d) for d in documents)} positions, over "
                     f"max_length={self.max_length} (this document: {len(documents[first])})")
            if self.on_bad_document == "raise":
                raise ValueError(f"{name}: document {indices[first]} (uid {kept_uids[first]}) does not fit: {where}")
            dropped = [f"{index} (uid {uid})" for index, uid in zip(indices[first:], kept_uids[first:])]
            self.stats["documents_dropped_over_max_length"] += len(dropped)
            logger.warning("%s: %s; dropping document(s) %s", name, where, ", ".join(dropped))
        self.stats["documents"] += len(kept)
        return kept, kept_images[: len(kept)], kept_uids[: len(kept)]

    def _bad_document(self, name: str, index: int, uid: str | None, reason: str, problem: str) -> None:
        """Raise (``on_bad_document="raise"``) or count and log the drop of one document."""
        message = f"{name}: document {index} (uid {uid}) {problem}"
        if self.on_bad_document == "raise":
            raise ValueError(message)
        self.stats[f"documents_dropped_{reason}"] += 1
        logger.warning("%s; dropping that document", message)


def _as_image(image):
    """8-bit RGB from a PIL image (as ``datasets`` decodes it: a 16-bit PNG stays 16-bit, which the image processor
    would clip to white) or from encoded bytes (``{"bytes": ...}`` of an undecoded datasets Image, raw bytes, or a
    path). Raises ``BadImage`` (or ``OSError`` for an unreadable path)."""
    if isinstance(image, dict):
        data = image.get("bytes")
        image = data if data is not None else image.get("path")
        if image is None:
            raise BadImage("image_missing", "neither bytes nor a path")
    if isinstance(image, str):
        image = Path(image).read_bytes()
    if isinstance(image, (bytes, bytearray)):
        return decode_rgb(bytes(image))
    return to_rgb(image)


class PretrainingDocuments:
    """Image-caption examples -> pretraining documents with their length, for both packers (a batched ``length_fn``).

    Each example (a dict with ``image_column``, ``text_column`` and optionally ``uid_column``) becomes
    ``{"image", "text", "uid", "length"}`` where ``length`` = positions of ``<s><image>\n{text}<|im_end|>`` at
    ``num_image_tokens`` (the processor's by default). Bad examples come back as ``Drop``: ``missing_image``,
    ``empty_caption``, ``caption_not_text``, ``caption_has_image_token`` (a caption that tokenizes to image
    placeholders would break the image/placeholder count); over ``capacity`` the packer drops them as ``too_long``,
    or with ``truncate=True`` the caption is cut to fit (counted as ``event/truncated``).
    """

    def __init__(
        self,
        processor,
        image_column: str = "image",
        text_column: str = "text",
        uid_column: str | None = None,
        num_image_tokens: int | None = None,
        capacity: int = DEFAULT_CAPACITY,
        truncate: bool = False,
    ):
        # A processor, or just its tokenizer (then ``num_image_tokens`` is required): the packers need no images.
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD_TOKEN)
        if num_image_tokens is None:
            if not hasattr(processor, "num_image_tokens"):
                raise ValueError("PretrainingDocuments needs num_image_tokens when given a tokenizer")
            num_image_tokens = processor.num_image_tokens
        self.num_image_tokens = num_image_tokens
        self.image_column, self.text_column, self.uid_column = image_column, text_column, uid_column
        self.capacity = capacity
        self.truncate = truncate
        self.head_length = len(self.tokenizer.encode(BOS, add_special_tokens=False)) + self.num_image_tokens

    def __call__(self, examples: list[dict]) -> list[Measured | Drop]:
        results: list[Measured | Drop | None] = [None] * len(examples)
        texts, positions = [], []
        for i, example in enumerate(examples):
            image, text = example.get(self.image_column), example.get(self.text_column)
            if image is None or (isinstance(image, dict) and not (image.get("bytes") or image.get("path"))):
                results[i] = Drop("missing_image", self._where(example))
            elif not isinstance(text, str):
                results[i] = Drop("caption_not_text", f"{self._where(example)}: {type(text).__name__}")
            elif not text.strip():
                results[i] = Drop("empty_caption", self._where(example))
            else:
                texts.append(text)
                positions.append(i)
        tails = self._tails(texts)
        for i, text, tail in zip(positions, texts, tails):
            example = examples[i]
            if self.image_token_id in tail:
                results[i] = Drop("caption_has_image_token", self._where(example))
                continue
            length = self.head_length + len(tail)
            event = ""
            if length > self.capacity and self.truncate:
                text, length = self._truncated(text)
                event = "truncated"
                if not text.strip():  # nothing of the caption fits (or only its leading blanks)
                    results[i] = Drop("empty_caption", f"{self._where(example)} (after truncation to fit)")
                    continue
            document = {"image": example[self.image_column], "text": text, "uid": self._uid(example, text),
                        "length": length}
            results[i] = Measured(length, document, event)
        return results

    def to_row(self, documents: list[dict]) -> dict:
        """A packed row (the format ``PackedCollator`` and the offline corpora use)."""
        return {
            "images": [d["image"] for d in documents],
            "texts": [d["text"] for d in documents],
            "lengths": [d["length"] for d in documents],
            "uids": [d["uid"] for d in documents],
        }

    def _tails(self, texts: list[str]) -> list[list[int]]:
        tails = ["\n" + t.replace(IMAGE_MARKER, "<image-placeholder>") + EOS for t in texts]
        if not tails:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the Rust tokenizer directly: same ids, half the time of the Python wrapper
            return [encoding.ids for encoding in backend.encode_batch(tails, add_special_tokens=False)]
        return self.tokenizer(tails, add_special_tokens=False)["input_ids"]

    def _truncated(self, text: str) -> tuple[str, int]:
        """The longest prefix of the caption (cut after a whole token and character) whose document fits the
        capacity. The cut follows the tokens' character offsets: decoding a prefix of byte-level ids could end in
        half a character, which decodes to U+FFFD, no prefix of the caption."""
        original = text
        if getattr(self.tokenizer, "is_fast", False):
            ends = [end for _, end in self.tokenizer(text, add_special_tokens=False,
                                                     return_offsets_mapping=True)["offset_mapping"]]
        else:
            ends = None
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        keep = len(ends) if ends is not None else len(ids)
        while True:
            length = self.head_length + len(self._tails([text])[0])
            if length <= self.capacity or keep == 0:
                return text, length
            keep = max(0, keep - (length - self.capacity))
            if ends is not None:
                text = original[: ends[keep - 1]] if keep else ""
            else:
                text = self.tokenizer.decode(ids[:keep]).rstrip("\ufffd")

    def _uid(self, example: dict, text: str) -> str:
        if self.uid_column and example.get(self.uid_column) is not None:
            return str(example[self.uid_column])
        for key in ("uid", "__key__", "key", "id"):
            if example.get(key) is not None:
                return str(example[key])
        digest = hashlib.md5(text.encode("utf-8"))
        image = example.get(self.image_column)
        if isinstance(image, (bytes, bytearray)):
            digest.update(image)
        elif isinstance(image, dict) and image.get("bytes"):
            digest.update(image["bytes"])
        elif hasattr(image, "tobytes"):
            digest.update(image.tobytes())
        return digest.hexdigest()

    def _where(self, example: dict) -> str:
        for key in (self.uid_column, "uid", "__key__", "key", "id"):
            if key and example.get(key) is not None:
                return f"sample {example[key]}"
        return "sample"


def stream_packed_rows(
    examples: Iterable[dict],
    processor,
    capacity: int = DEFAULT_CAPACITY,
    buffer_size: int = 10_000,
    algorithm: str = "default",
    image_column: str = "image",
    text_column: str = "text",
    uid_column: str | None = None,
    truncate: bool = False,
) -> StreamingPacker:
    """Packed pretraining rows straight from image-caption examples (e.g. ``load_dataset(..., streaming=True)``).

    Returns the resumable ``StreamingPacker``: iterate it for rows (``PackedCollator`` input), save and restore its
    position with ``state_dict`` / ``load_state_dict``, read its drop counters in ``stats``.
    """
    documents = PretrainingDocuments(
        processor, image_column, text_column, uid_column, capacity=capacity, truncate=truncate
    )
    return StreamingPacker(
        examples, documents, capacity=capacity, buffer_size=buffer_size, algorithm=algorithm, batched=True,
        output_fn=documents.to_row,
    )
