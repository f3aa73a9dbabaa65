"""Datatrove steps of the offline packer: image-text Documents -> packed parquet shards that ``load_dataset`` reads.

``PackWriter`` consumes the Documents of its task (from ``WebDatasetReader`` for the data stages' shards, or from
``ImageTextDatasetReader`` for any ``load_dataset``-readable image-text set), packs them with the packing core
through ``StreamingPacker`` (windows of ``buffer_size`` samples, so memory stays bounded whatever the task size) and
writes one parquet file per task: ``<output>/<config>/train-<rank>-of-<tasks>.parquet``. A row is one pack::

    images: list[Image]   (the original encoded bytes, decoded by datasets on load)
    texts:  list[str]     (one caption per document; document i uses images[i])
    lengths: list[int32]  (positions per document at the pack's num_image_tokens, same tokenizer)
    uids:   list[str]

which is enough to rebuild the sequence with any compatible tokenizer (``PackedCollator``). Counted per task in
datatrove's stats: ``kept`` (documents packed), ``dropped/<reason>`` (missing_image, image_unreadable (a file
referenced by path that cannot be read), image_undecodable, image_truncated, image_empty, image_too_large,
empty_caption, caption_not_text, caption_has_image_token, too_long), ``event/truncated``, and per pack
``pack_positions``, ``pack_documents``, ``pack_images`` (datatrove keeps total, mean, min, max of each).
"""

from __future__ import annotations

import functools
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.readers import HuggingFaceDatasetReader

from ..accounting import READ
from ..images import BadImage, inspect_image
from ..packing import DEFAULT_CAPACITY
from ..shards import atomic_write
from .base import CountingStep

PACK_STATS = ("pack_positions", "pack_documents", "pack_images")
IMAGE_ERROR = "image_error"  # Document metadata: why the reader could not read the row's image file
# Image column types read as images besides datasets' Image feature: file paths (json/csv sets) and encoded bytes.
IMAGE_VALUE_TYPES = ("string", "large_string", "binary", "large_binary")
ROWS_PER_GROUP = 16  # packs per parquet row group (~24 images each): bounded memory when streaming the corpus


def packed_features():
    """The ``datasets`` features of a packed corpus (images decoded to PIL on load)."""
    from datasets import Features, Image, List, Value

    return Features(
        {
            "images": List(Image()),
            "texts": List(Value("string")),
            "lengths": List(Value("int32")),
            "uids": List(Value("string")),
        }
    )


def packed_file_name(rank: int, world_size: int) -> str:
    return f"train-{rank:05d}-of-{world_size:05d}.parquet"


@functools.lru_cache(maxsize=2)
def _tokenizer(source: str | None):
    """The kit's tokenizer, built once per process: it takes ~2 s, and a worker runs one task per shard, often
    thousands (only read afterwards: ``PretrainingDocuments`` encodes and decodes with it)."""
    from modeling_open_qwen2vl import build_open_qwen2vl_tokenizer

    return build_open_qwen2vl_tokenizer(source)


class PackWriter(CountingStep):
    """Packs a task's image-caption Documents into 4096-position sequences and writes them as a parquet shard.

    Args:
        output_folder: the corpus folder (local path or fsspec URL); files go to ``<output>/<config_name>/``.
        config_name: the dataset-card config, e.g. ``packed_144``.
        num_image_tokens: positions per image (144 for pretraining, as the paper).
        capacity: positions per pack (4096).
        algorithm: packing algorithm (``packing.pack_lengths``; "default" or "ffd" for the paper's packs).
        buffer_size: samples packed together (per window); larger windows fill slightly better.
        tokenizer: tokenizer folder / hub id / tokenizer.json (None: the offline Qwen tokenizer).
        truncate: cut over-long captions to fit instead of dropping them.
    """

    name = "pack"
    type = "📦 - PACK"

    def __init__(
        self,
        output_folder: str,
        config_name: str = "packed_144",
        num_image_tokens: int = 144,
        capacity: int = DEFAULT_CAPACITY,
        algorithm: str = "default",
        buffer_size: int = 10_000,
        tokenizer: str | None = None,
        truncate: bool = False,
    ):
        super().__init__()
        self.output_folder = output_folder
        self.config_name = config_name
        self.num_image_tokens = num_image_tokens
        self.capacity = capacity
        self.algorithm = algorithm
        self.buffer_size = buffer_size
        self.tokenizer = tokenizer
        self.truncate = truncate

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from ..packed_collator import PretrainingDocuments
        from ..streaming_packing import StreamingPacker

        documents = PretrainingDocuments(
            _tokenizer(self.tokenizer), num_image_tokens=self.num_image_tokens,
            capacity=self.capacity, truncate=self.truncate,
        )
        packer = StreamingPacker(
            (_example(doc) for doc in self._decodable(data)), documents, capacity=self.capacity,
            buffer_size=self.buffer_size, algorithm=self.algorithm, batched=True, output_fn=documents.to_row,
        )
        features = packed_features()
        schema = features.arrow_schema
        name = f"{self.config_name}/{packed_file_name(rank, world_size)}"
        with atomic_write(self.output_folder, name) as handle, pq.ParquetWriter(handle, schema) as writer:
            batch: list[dict] = []
            for row in packer:
                with self.track_time():
                    self.stat_update("pack_positions", value=sum(row["lengths"]), unit="pack")
                    self.stat_update("pack_documents", value=len(row["texts"]), unit="pack")
                    self.stat_update("pack_images", value=len(row["images"]), unit="pack")
                    batch.append(row)
                    if len(batch) == ROWS_PER_GROUP:
                        writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                        batch = []
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        self._account(packer.stats)
        return
        yield  # a generator step that forwards nothing (it is the last step)

    def _decodable(self, data: DocumentsPipeline) -> DocumentsPipeline:
        """The documents whose image fully decodes: the bytes are copied into the corpus as they are, and one that
        does not decode would make iterating ``load_dataset(corpus)`` fail. Others are counted drops (image_*)."""
        for doc in data:
            where = f"{doc.metadata.get('shard', '')}:{doc.metadata.get('key', '')}".strip(":")
            where = f"{where or 'sample'} (uid {doc.id})"
            if doc.metadata.get(IMAGE_ERROR):  # the reader could not read the image file the row names
                self.drop("image_unreadable", where, doc.metadata[IMAGE_ERROR])
                continue
            media = doc.media[0] if doc.media else None
            if media is not None and media.media_bytes is not None:  # b"" too: inspect_image calls it image_empty
                try:
                    with self.track_time():
                        inspect_image(media.media_bytes, full_decode=True)
                except BadImage as error:
                    self.drop(error.reason, where, error.detail)
                    continue
            yield doc

    def _account(self, stats) -> None:
        self.count_kept(stats.get("samples_packed", 0))
        for label, value in stats.items():
            if label.startswith("dropped/"):
                self.drop(label[len("dropped/"):], value=value, detail=f"{value} sample(s) in this task")
            elif label.startswith("event/"):
                self.count_event(label[len("event/"):], value)


def _example(doc: Document) -> dict[str, Any]:
    """A Document from the kit's readers -> the example dict ``PretrainingDocuments`` measures."""
    media = doc.media[0] if doc.media else None
    image = media.media_bytes if media is not None and media.media_bytes else None
    if image is None and media is not None and media.path:
        image = {"bytes": None, "path": media.path}
    if isinstance(image, (bytes, bytearray)):
        image = {"bytes": bytes(image), "path": None}
    caption = doc.metadata.get("caption", doc.text)
    return {"image": image, "text": caption, "uid": doc.id}


class ImageTextDatasetReader(HuggingFaceDatasetReader):
    """Any ``load_dataset``-readable image-text set as Documents (image kept as encoded bytes, never re-encoded).

    Every row is counted as ``read``; rows with an empty caption are passed on (and dropped, counted, by
    ``PackWriter``) rather than skipped silently as datatrove's reader does with empty text.
    """

    name = "🤗 image-text dataset"

    def __init__(
        self,
        dataset: str,
        dataset_options: dict | None = None,
        image_column: str = "image",
        text_column: str = "text",
        uid_column: str | None = None,
        streaming: bool = True,
        limit: int = -1,
        doc_progress: bool = False,
    ):
        super().__init__(dataset, dataset_options=dataset_options, streaming=streaming, limit=limit,
                         doc_progress=doc_progress, adapter=_adapt_image_text)
        self.image_column = image_column
        self.text_column = text_column
        self.uid_column = uid_column

    def _get_dataset_shard(self, dst, rank: int, world_size: int):
        from datasets import Image, Value

        columns = dst.column_names
        if columns is None:  # a streamed csv is typed only once read: its first row names the columns
            columns = list(next(iter(dst.take(1)), {}))
        missing = [c for c in (self.image_column, self.text_column, self.uid_column) if c and c not in columns]
        if missing:
            raise ValueError(f"dataset {self.dataset!r} has no column(s) {missing}; columns: {columns}")
        feature = dst.features[self.image_column] if dst.features else None
        if isinstance(feature, Image):
            dst = dst.cast_column(self.image_column, Image(decode=False))
        elif feature is not None and not (isinstance(feature, Value) and feature.dtype in IMAGE_VALUE_TYPES):
            # else every row would be dropped as missing_image
            raise ValueError(f"column {self.image_column!r} of dataset {self.dataset!r} is {feature}: expected an "
                             "Image feature, image file paths (strings) or encoded image bytes")
        return super()._get_dataset_shard(dst, rank, world_size)

    def get_document_from_dict(self, data: dict, source_file: str, id_in_file: int | str):
        self.stat_update(READ)
        return super().get_document_from_dict(data, source_file, id_in_file)


def _adapt_image_text(reader: ImageTextDatasetReader, data: dict, path: str, id_in_file: int | str) -> dict:
    """Row -> Document fields (datatrove binds the adapter to the reader). An image file that cannot be read is
    noted in the metadata (``IMAGE_ERROR``) for ``PackWriter`` to count as a drop, not raised (one missing file
    would fail the whole task)."""
    image = data.get(reader.image_column)
    if isinstance(image, str):  # a path (json/csv sets): as datasets' Image feature, relative to the working folder
        image = {"bytes": None, "path": image}
    elif isinstance(image, (bytes, bytearray)):
        image = {"bytes": bytes(image), "path": None}
    media, metadata = [], {"caption": data.get(reader.text_column)}
    if isinstance(image, dict) and (image.get("bytes") is not None or image.get("path")):
        media_bytes = image.get("bytes")  # b"" (a zero-byte image) goes on, to be counted as image_empty
        if media_bytes is None:  # image files referenced by path (imagefolder, local json/csv sets)
            try:
                with fsspec.open(image["path"], "rb") as handle:
                    media_bytes = handle.read()
            except (OSError, ValueError) as error:
                metadata[IMAGE_ERROR] = f"cannot read image file {image['path']!r}: {error}"
        if media_bytes is not None:
            media = [{"id": str(id_in_file), "type": 0, "url": image.get("path") or "", "media_bytes": media_bytes}]
    caption = metadata["caption"]
    uid = data.get(reader.uid_column) if reader.uid_column else None
    return {
        "text": caption if isinstance(caption, str) and caption else " ",  # datatrove skips empty text
        "id": str(uid) if uid is not None else f"{path}/{id_in_file}",
        "media": media,
        "metadata": metadata,
    }
