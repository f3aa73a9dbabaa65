"""Collators for encoded SFT samples: images opened here, placeholders expanded, labels already assistant-only.

``SFTCollator`` pads a batch of conversations (right padding, ``attention_mask``). ``PackedSFTCollator`` takes packs
of conversations and lays the whole micro-batch out as ONE padding-free row whose ``position_ids`` restart at 0 for
every conversation ("isolated" packing): transformers then builds a block-causal mask (SDPA / eager) or calls the
varlen flash-attention kernel, so no conversation sees another, and each conversation's loss equals its unpacked loss.
Text-only samples contribute no image; a batch without images has no ``pixel_values``.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from dataset_builders.images import to_rgb

from .encoding import IGNORE_INDEX
from .errors import BadSampleError, SkipLog

logger = logging.getLogger(__name__)


def open_image(ref: dict[str, Any] | str, sample_id: str) -> Image.Image:
    """Decode one image reference (``{"bytes", "path"}``, a path or a PIL image) to 8-bit RGB; errors name the
    sample and the file."""
    if isinstance(ref, Image.Image):
        return to_rgb(ref)
    if isinstance(ref, str):
        ref = {"bytes": None, "path": ref}
    where = ref.get("path") or "<embedded bytes>"
    try:
        image = Image.open(io.BytesIO(ref["bytes"])) if ref.get("bytes") else Image.open(ref["path"])
        image.load()
        return to_rgb(image)  # the image processor's own RGB conversion clips 16-bit images to white
    except FileNotFoundError:
        raise BadSampleError(sample_id, "missing_image", f"image file {where} does not exist") from None
    except Exception as error:  # PIL raises many types for broken files
        raise BadSampleError(sample_id, "unreadable_image", f"cannot decode image {where}: {error}") from None


@dataclass
class SFTCollator:
    """Batches rows of ``encode_sft_dataset`` into model inputs.

    Args:
        processor: the kit's processor (its image processor turns images into ``pixel_values``).
        num_image_tokens: placeholders per image in the model input (default: ``processor.num_image_tokens``).
        pad_to_multiple_of: round the padded length up to a multiple of this.
        skip_bad_samples: drop a sample whose image cannot be decoded (counted in ``skip_log``) instead of raising.
            A batch in which every sample is bad is replaced by the previous batch's first good sample (logged), so
            a run over web data does not stop hours in; before any good sample, by one padding token without a label
            (a step with no loss and zero gradients).
        skip_log: where skipped samples are counted (a fresh one by default).
    """

    processor: Any
    num_image_tokens: int | None = None
    pad_to_multiple_of: int | None = None
    skip_bad_samples: bool = False
    skip_log: SkipLog = field(default_factory=SkipLog)
    _fallback: tuple[dict, list[Image.Image]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.num_image_tokens = int(self.num_image_tokens or self.processor.num_image_tokens)
        self.image_token_id = self.processor.image_token_id
        self.pad_token_id = self.processor.tokenizer.pad_token_id

    def _expand(self, input_ids: list[int], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        lab = torch.as_tensor(labels, dtype=torch.long)
        repeats = torch.where(ids == self.image_token_id, self.num_image_tokens, 1)
        lab = torch.where(ids == self.image_token_id, IGNORE_INDEX, lab)
        return ids.repeat_interleave(repeats), lab.repeat_interleave(repeats)

    def _load(self, rows: list[dict]) -> list[tuple[dict, list[Image.Image]]]:
        """Rows with their decoded images; bad ones raise, or are dropped and counted with ``skip_bad_samples``."""
        loaded, failed = [], []
        for row in rows:
            try:
                loaded.append((row, [open_image(ref, row["sample_id"]) for ref in row["images"]]))
            except BadSampleError as error:
                if not self.skip_bad_samples:
                    raise
                self.skip_log.add(error, stage="collate")
                failed.append(error.sample_id)
        if loaded:
            self._fallback = loaded[0]
            return loaded
        if self._fallback is None:
            # Nothing good seen yet in this worker: one padding token with no label (no loss, no gradient).
            logger.warning("every sample of this batch had an unreadable image (%s, counted as skipped) and this data "
                           "worker has no earlier good sample: the batch is one padding token without a loss", failed)
            empty = {"sample_id": "<no-good-sample>", "input_ids": [self.pad_token_id], "labels": [IGNORE_INDEX]}
            return [(empty, [])]
        logger.warning("every sample of this batch had an unreadable image (%s, counted as skipped); training on "
                       "sample %r of the previous batch again instead", failed, self._fallback[0]["sample_id"])
        return [self._fallback]

    def _pixel_values(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        if not images:
            return {}
        return {"pixel_values": self.processor(images=images, return_tensors="pt")["pixel_values"]}

    def _pad(self, tensors: list[torch.Tensor], value: int) -> torch.Tensor:
        length = max(t.numel() for t in tensors)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out = torch.full((len(tensors), length), value, dtype=torch.long)
        for i, t in enumerate(tensors):
            out[i, : t.numel()] = t
        return out

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        loaded = self._load(rows)
        ids, labels, images = [], [], []
        for row, row_images in loaded:
            row_ids, row_labels = self._expand(row["input_ids"], row["labels"])
            ids.append(row_ids)
            labels.append(row_labels)
            images.extend(row_images)
        batch = {
            "input_ids": self._pad(ids, self.pad_token_id),
            "attention_mask": self._pad([torch.ones_like(t) for t in ids], 0),
            "labels": self._pad(labels, IGNORE_INDEX),
        }
        batch.update(self._pixel_values(images))
        return batch


@dataclass
class PackedSFTCollator(SFTCollator):
    """Collates packs (rows whose fields are lists, one entry per conversation) into one isolated packed row.

    Returns ``input_ids``, ``labels`` and ``position_ids`` of shape ``[1, total]`` (no padding, no attention mask:
    transformers derives the block-causal mask from the position restarts), ``pixel_values`` for all images in
    order, the flash-attention varlen boundaries ``cu_seq_lens_q/k`` and ``max_length_q/k``, and ``use_cache=False``.
    Unpacked rows (one conversation each, e.g. an eval split with ``eval_packing=False``) are padded as by
    :class:`SFTCollator`, or with ``padding_free`` (TRL's ``padding_free`` without packing) laid out the same way
    as a pack: one row, no padding.
    """

    padding_free: bool = False

    def __call__(self, packs: list[dict]) -> dict[str, torch.Tensor]:
        if packs and isinstance(packs[0]["sample_id"], str):  # not packs: one conversation per row
            if not self.padding_free:
                return super().__call__(packs)
            return self._isolated_row(packs)
        rows = [
            {name: pack[name][i] for name in ("sample_id", "input_ids", "labels", "images")}
            for pack in packs
            for i in range(len(pack["sample_id"]))
        ]
        return self._isolated_row(rows)

    def _isolated_row(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Conversations laid end to end in one row, positions restarting at 0 for each."""
        loaded = self._load(rows)
        ids, labels, positions, images = [], [], [], []
        for row, row_images in loaded:
            row_ids, row_labels = self._expand(row["input_ids"], row["labels"])
            row_labels[0] = IGNORE_INDEX  # never predict a conversation's first token from the previous one
            ids.append(row_ids)
            labels.append(row_labels)
            positions.append(torch.arange(row_ids.numel()))
            images.extend(row_images)
        lengths = torch.tensor([t.numel() for t in ids])
        cu_seq_lens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
        batch = {
            "input_ids": torch.cat(ids)[None],
            "labels": torch.cat(labels)[None],
            "position_ids": torch.cat(positions)[None],
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": int(lengths.max()),
            "max_length_k": int(lengths.max()),
            # A KV cache (or a 2-D attention mask) turns transformers' packed-sequence detection off.
            "use_cache": False,
        }
        batch.update(self._pixel_values(images))
        return batch
