"""Image-text similarity with any transformers CLIP or SigLIP checkpoint (DataComp's ``clip_score`` column)."""

from __future__ import annotations

from typing import Any

from .scoring import BatchScorer, cached, resolve_device, resolve_dtype

# Text towers trained on fixed-length padded text must see the same padding when scoring.
MAX_LENGTH_PADDING_MODELS = ("siglip", "siglip2")


def _pooled(output):
    # transformers 5 returns BaseModelOutputWithPooling (projected embeddings in pooler_output); 4.x a tensor.
    import torch

    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_clip(model_path: str, device: str, dtype):
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(model_path, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_path)
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise ValueError(f"{model_path} ({type(model).__name__}) is not a dual encoder with image and text features")
    return model, processor


class ClipScorer(BatchScorer):
    """Cosine similarity of the normalised image and text embeddings, stored as ``column`` (float32).

    ``model``: a checkpoint id or folder loadable with ``AutoModel`` + ``AutoProcessor`` (CLIP ViT-L/14, DFN-CLIP,
    SigLIP...). SigLIP text is padded to ``max_length`` as it was trained; captions longer than the text tower's
    context are truncated.
    """

    name = "CLIP score"

    def __init__(self, model: str, column: str = "clip_score", batch_size: int = 64, device: str = "auto",
                 dtype: str = "auto"):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        self.model_path = model
        self.column = column
        self.output_columns = {column: "float32"}

    def setup(self, rank: int) -> None:
        device = resolve_device(self.device, rank)
        torch_dtype = resolve_dtype(self.dtype, device)
        self._device = device
        self._model, self._processor = cached(
            ("clip", self.model_path, device, str(torch_dtype)),
            lambda: load_clip(self.model_path, device, torch_dtype),
        )
        model_type = getattr(self._model.config, "model_type", "")
        self._padding = "max_length" if model_type in MAX_LENGTH_PADDING_MODELS else True

    def embed(self, images: list, captions: list[str]):
        import torch

        inputs = self._processor(text=captions, images=images, padding=self._padding, truncation=True,
                                 return_tensors="pt")
        pixel_values = inputs.pop("pixel_values").to(self._device, self._model.dtype)
        text_inputs = {k: v.to(self._device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            image_embeds = _pooled(self._model.get_image_features(pixel_values=pixel_values))
            text_embeds = _pooled(self._model.get_text_features(**text_inputs))
        return image_embeds.float(), text_embeds.float()

    def score_batch(self, images: list, captions: list[str]) -> list[dict[str, Any]]:
        import torch

        image_embeds, text_embeds = self.embed(images, captions)
        similarity = (torch.nn.functional.normalize(image_embeds, dim=-1)
                      * torch.nn.functional.normalize(text_embeds, dim=-1)).sum(-1)
        return [{self.column: float(value)} for value in similarity.cpu().tolist()]
