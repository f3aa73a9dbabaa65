"""Datatrove reader for WebDataset shards: one Document per usable sample, every unusable one counted."""

from __future__ import annotations

from datatrove.data import Document, DocumentsPipeline, Media, MediaType
from datatrove.io import DataFolderLike
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.utils.logging import logger

from ..accounting import DROPPED, EVENT, READ
from ..shards import SHARD_GLOB, Dropped, ShardProblem, iter_samples
from .base import LOGGED_DROPS_PER_REASON


class WebDatasetReader(BaseDiskReader):
    """Reads ``*.tar`` shards (img2dataset layout) of ``data_folder``; task ``rank`` takes shards ``rank::world_size``.

    Document: ``text`` = caption, ``id`` = uid, ``media[0]`` = the image (``media_bytes``, ``metadata["ext"]``),
    ``metadata`` = ``{"key", "shard", "url", "json"}``. Drops (counted as ``dropped/<reason>``): corrupt_shard,
    unsafe_member_path, duplicate_key, duplicate_field, bad_key, missing_image, bad_json, missing_caption,
    caption_not_utf8, missing_uid (only with ``missing_uid="drop"``).
    """

    name = "WebDataset shards"

    def __init__(
        self,
        data_folder: DataFolderLike,
        missing_uid: str = "derive",
        limit: int = -1,
        file_progress: bool = True,
        doc_progress: bool = False,
    ):
        if missing_uid not in ("derive", "drop"):
            raise ValueError(f"missing_uid must be 'derive' or 'drop', got {missing_uid!r}")
        super().__init__(
            data_folder,
            limit=limit,
            file_progress=file_progress,
            doc_progress=doc_progress,
            recursive=False,
            glob_pattern=SHARD_GLOB,
        )
        self.missing_uid = missing_uid

    def read_file(self, filepath: str) -> DocumentsPipeline:
        logged = 0
        for item in iter_samples(self.data_folder, filepath, missing_uid=self.missing_uid):
            if isinstance(item, ShardProblem):
                self.stat_update(EVENT + "corrupt_shards")
                logger.error(f"shard {item.shard} is truncated or corrupt, samples after the damage are lost: "
                             f"{item.detail}")
                continue
            self.stat_update(READ)
            if isinstance(item, Dropped):
                self.stat_update(DROPPED + item.reason)
                if logged < LOGGED_DROPS_PER_REASON:
                    logged += 1
                    logger.warning(f"dropped {filepath}:{item.key} ({item.reason}) {item.detail}")
                continue
            if item.uid_derived:
                self.stat_update(EVENT + "uid_derived")
            yield Document(
                text=item.caption,
                id=item.uid,
                media=[
                    Media(id=item.key, type=MediaType.IMAGE, url=item.url, media_bytes=item.image,
                          metadata={"ext": item.image_ext})
                ],
                metadata={"key": item.key, "shard": filepath, "url": item.url, "json": item.meta},
            )
