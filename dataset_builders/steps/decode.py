"""Decode each Document's image to 8-bit RGB for the scorers; unusable images are counted drops."""

from __future__ import annotations

from datatrove.data import DocumentsPipeline

from ..images import DEFAULT_MAX_PIXELS, BadImage, decode_rgb
from .base import CountingStep

IMAGE_KEY = "_image"  # transient PIL image in Document.metadata; writers never persist keys starting with "_"


class DecodeImages(CountingStep):
    """Full decode + RGB conversion (CMYK, P, LA, 16-bit ...). Drops: image_empty, image_undecodable,
    image_truncated, image_too_large (decompression bombs, above ``max_pixels``)."""

    name = "decode images"
    type = "🖼 - DECODE"

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS):
        super().__init__()
        self.max_pixels = max_pixels

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            with self.track_time():
                try:
                    doc.metadata[IMAGE_KEY] = decode_rgb(doc.media[0].media_bytes or b"", max_pixels=self.max_pixels)
                except BadImage as error:
                    self.drop(error.reason, f"{doc.metadata.get('shard')}:{doc.metadata.get('key')}", error.detail)
                    continue
            yield doc
