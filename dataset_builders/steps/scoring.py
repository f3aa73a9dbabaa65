"""Batched scoring base: model loading (cached per worker process), device/dtype choice, per-sample fallback."""

from __future__ import annotations

from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.utils.batching import batched

from .base import CountingStep
from .decode import IMAGE_KEY

SCORES_KEY = "scores"
# Models stay loaded across the tasks a worker process runs (datatrove reuses pool processes).
_MODEL_CACHE: dict[tuple, Any] = {}


def resolve_device(device: str, rank: int = 0) -> str:
    """"auto" -> the task's GPU (rank modulo visible GPUs) when CUDA is available, else "cpu"."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return f"cuda:{rank % torch.cuda.device_count()}"
    return "cpu"


def resolve_dtype(dtype: str, device: str):
    """"auto" -> bfloat16 on GPU, float32 on CPU; otherwise a torch dtype name ("float16", "bfloat16", ...)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return value


def cached(key: tuple, load):
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = load()
    return _MODEL_CACHE[key]


class BatchScorer(CountingStep):
    """Scores decoded documents in batches and stores ``doc.metadata["scores"]`` (a dict of output columns).

    Subclasses implement ``setup(rank)`` (load the model) and ``score_batch(images, captions) -> list[dict]``. If a
    batch fails (one odd image can break a processor), its samples are scored one by one and only the failing ones
    are dropped (``score_error``).
    """

    type = "🎯 - SCORER"
    output_columns: dict[str, str] = {}

    def __init__(self, batch_size: int = 32, device: str = "auto", dtype: str = "auto"):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype

    def setup(self, rank: int) -> None:
        raise NotImplementedError

    def score_batch(self, images: list, captions: list[str]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _score(self, docs: list[Document]) -> list[tuple[Document, dict | None, str]]:
        images = [doc.metadata[IMAGE_KEY] for doc in docs]
        captions = [doc.text for doc in docs]
        try:
            return [(doc, scores, "") for doc, scores in zip(docs, self.score_batch(images, captions), strict=True)]
        except Exception as error:  # noqa: BLE001 - isolate the offending sample below
            if len(docs) == 1:
                return [(docs[0], None, f"{type(error).__name__}: {error}")]
        return [result for doc in docs for result in self._score([doc])]

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self.setup(rank)
        for batch in batched(data, self.batch_size):
            with self.track_time("batch"):
                results = self._score(list(batch))
            for doc, scores, error in results:
                doc.metadata.pop(IMAGE_KEY, None)
                if scores is None:
                    self.drop("score_error", f"{doc.metadata.get('shard')}:{doc.metadata.get('key')}", error)
                    continue
                doc.metadata.setdefault(SCORES_KEY, {}).update(scores)
                yield doc
