"""Batched inference for evaluation: greedy generation, first-step letter probabilities, continuation likelihoods.

Prompts are left-padded so every row's next token sits in the last column; transformers derives the position ids
from the attention mask, so a prompt gets the same prediction alone or in a batch. Requests are sorted by length
before batching (less padding) and results are returned in request order.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .original_settings import ORIGINAL_MAX_NEW_TOKENS, ORIGINAL_STOP_TOKEN_IDS


def batched(items: list, size: int):
    """Consecutive slices of ``items`` of ``size`` (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Predictor:
    """Runs a model + processor over many prompts in batches.

    Args:
        model: an Open-Qwen2VL (or any ``generate``-capable image-text-to-text) model, in eval mode.
        processor: its processor (``<image>`` markers in prompts, ``padding_side`` supported).
        batch_size: rows per forward pass / ``generate`` call.
        show_progress: show a tqdm bar.
    """

    def __init__(self, model, processor, batch_size: int = 8, show_progress: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.processor = processor
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.tokenizer = processor.tokenizer
        self.num_image_tokens = int(getattr(processor, "num_image_tokens", 0) or 0)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _length_order(self, prompts: Sequence[str], images: Sequence[list]) -> list[int]:
        # Longest first: similar lengths share a batch, and an out-of-memory shows up on the first batch.
        cost = [len(p) + 4 * self.num_image_tokens * len(i) for p, i in zip(prompts, images)]
        return sorted(range(len(prompts)), key=lambda k: -cost[k])

    def _encode(self, prompts: list[str], images: list[list]) -> dict:
        flat = [image for row in images for image in row]
        encoded = self.processor(
            text=prompts, images=flat or None, padding=True, padding_side="left", return_tensors="pt"
        )
        return {key: value.to(self.device) for key, value in encoded.items()}

    def _progress(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="sample", disable=not self.show_progress, leave=False)

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        images: Sequence[list],
        max_new_tokens: int = ORIGINAL_MAX_NEW_TOKENS,
        stop_token_ids: Sequence[int] = ORIGINAL_STOP_TOKEN_IDS,
    ) -> list[str]:
        """Greedy continuations of ``prompts`` (decoded without special tokens, stripped), in request order."""
        outputs: list[str | None] = [None] * len(prompts)
        pad_id = self.tokenizer.pad_token_id
        with self._progress(len(prompts), "generating") as bar:
            for batch in batched(self._length_order(prompts, images), self.batch_size):
                inputs = self._encode([prompts[k] for k in batch], [images[k] for k in batch])
                generated = self.model.generate(
                    **inputs,
                    do_sample=False,
                    num_beams=1,
                    repetition_penalty=1.0,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=list(stop_token_ids),
                    pad_token_id=pad_id,
                )
                new_tokens = generated[:, inputs["input_ids"].shape[1] :]
                texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                for k, text in zip(batch, texts):
                    outputs[k] = text.strip()
                bar.update(len(batch))
        return outputs

    def letter_token_ids(self, letters: Sequence[str]) -> list[int]:
        ids = []
        for letter in letters:
            encoded = self.tokenizer.encode(letter, add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(f"{letter!r} is not a single token for this tokenizer ({encoded})")
            ids.append(encoded[0])
        return ids

    @torch.inference_mode()
    def letter_probabilities(self, prompts: Sequence[str], images: Sequence[list], letters: Sequence[str]) -> list:
        """Probabilities of ``letters`` as the first answer token, renormalised over them (the original's AI2D)."""
        letter_ids = torch.tensor(self.letter_token_ids(letters))
        outputs: list = [None] * len(prompts)
        with self._progress(len(prompts), "scoring letters") as bar:
            for batch in batched(self._length_order(prompts, images), self.batch_size):
                inputs = self._encode([prompts[k] for k in batch], [images[k] for k in batch])
                logits = self.model(**inputs, logits_to_keep=1).logits[:, -1, :].float()
                probabilities = torch.softmax(logits, dim=-1)[:, letter_ids.to(logits.device)]
                probabilities = probabilities / probabilities.sum(dim=-1, keepdim=True)
                for k, row in zip(batch, probabilities.tolist()):
                    outputs[k] = row
                bar.update(len(batch))
        return outputs

    @torch.inference_mode()
    def continuation_scores(
        self, prompts: Sequence[str], images: Sequence[list], continuations: Sequence[Sequence[str]]
    ) -> list[list[tuple[float, bool]]]:
        """For each prompt and each of its continuations: (sum of log-probabilities, whether greedy decoding
        would produce exactly that continuation). Continuations are tokenized on their own, after the prompt."""
        pairs = [(p, c) for p in range(len(prompts)) for c in range(len(continuations[p]))]
        prompt_ids, pixel_values = [], []
        for prompt, row_images in zip(prompts, images):
            encoded = self.processor(text=[prompt], images=list(row_images) or None, return_tensors="pt")
            prompt_ids.append(encoded["input_ids"][0].tolist())
            pixel_values.append(encoded.get("pixel_values"))
        targets = {
            (p, c): self.tokenizer.encode(continuations[p][c], add_special_tokens=False) for p, c in pairs
        }
        for key, ids in targets.items():
            if not ids:
                raise ValueError(f"continuation {continuations[key[0]][key[1]]!r} of prompt {key[0]} is empty")
        results = [[None] * len(c) for c in continuations]
        order = sorted(range(len(pairs)), key=lambda i: -(len(prompt_ids[pairs[i][0]]) + len(targets[pairs[i]])))
        with self._progress(len(pairs), "scoring answers") as bar:
            for batch in batched(order, self.batch_size):
                chosen = [pairs[i] for i in batch]
                rows = [prompt_ids[p] + targets[(p, c)] for p, c in chosen]
                scores = self._score_rows(rows, [targets[pc] for pc in chosen], [pixel_values[p] for p, _ in chosen])
                for (p, c), score in zip(chosen, scores):
                    results[p][c] = score
                bar.update(len(batch))
        return results

    def _score_rows(self, rows: list[list[int]], targets: list[list[int]], pixel_values: list) -> list:
        width = max(len(r) for r in rows)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        present = [pv for pv in pixel_values if pv is not None]
        kwargs = {"pixel_values": torch.cat(present).to(self.device)} if present else {}
        keep = max(len(t) for t in targets) + 1
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, **kwargs).logits
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        scores = []
        for row, target in enumerate(targets):
            # Token j of the continuation (j-th of the last len(target) columns) is predicted one column earlier.
            positions = range(keep - 1 - len(target), keep - 1)
            token_log_probs = [log_probs[row, pos, tok].item() for pos, tok in zip(positions, target)]
            greedy = all(int(log_probs[row, pos].argmax()) == tok for pos, tok in zip(positions, target))
            total = sum(token_log_probs)
            scores.append((total if math.isfinite(total) else -math.inf, greedy))
        return scores
