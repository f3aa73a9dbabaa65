"""Decode each Document's image to 8-bit RGB for the scorers; unusable images are counted drops."""

from __future__ import annotations

from datatrove.data import DocumentsPipeline

from ..images import DEFAULT_MAX_PIXELS, BadImage, decode_rgb
from .base import CountingStep

IMAGE_KEY = "_image"  # transient PIL image in Document.metadata; writers never persist keys starting with "_"
# Scorers that keep the aspect ratio (CLIP: short side to 224, then a centre crop) blow a 1 x N image up to
# 224 x 224N pixels first: a few hundred bytes of 1 x 40,000 PNG would need ~20 GB. Far past any useful image.
MAX_SCORABLE_ASPECT_RATIO = 100.0


class DecodeImages(CountingStep):
    """Full decode + RGB conversion (CMYK, P, LA, 16-bit ...). Drops: image_empty, image_undecodable,
    image_truncated, image_too_large (decompression bombs, above ``max_pixels``), image_aspect_ratio (longer side
    more than ``max_aspect_ratio`` times the shorter)."""

    name = "decode images"
    type = "🖼 - DECODE"

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS, max_aspect_ratio: float = MAX_SCORABLE_ASPECT_RATIO):
        super().__init__()
        self.max_pixels = max_pixels
        self.max_aspect_ratio = max_aspect_ratio

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            with self.track_time():
                where = f"{doc.metadata.get('shard')}:{doc.metadata.get('key')}"
                try:
                    image = decode_rgb(doc.media[0].media_bytes or b"", max_pixels=self.max_pixels)
                except BadImage as error:
                    self.drop(error.reason, where, error.detail)
                    continue
                short, long = sorted(image.size)
                if long > self.max_aspect_ratio * max(short, 1):
                    self.drop("image_aspect_ratio", where,
                              f"{image.width}x{image.height} is more than {self.max_aspect_ratio:g}:1")
                    continue
                doc.metadata[IMAGE_KEY] = image
            yield doc
