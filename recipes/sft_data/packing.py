"""Isolated packing of encoded SFT conversations (TRL refuses packing for image datasets).

Bins come from the kit's one packing core (``dataset_builders.packing.pack_lengths``; lengths already count
``num_image_tokens`` per image). A pack row holds its conversations as lists (``sample_id``, ``input_ids``,
``labels``, ``images``, ``length``); ``PackedSFTCollator`` lays them out with positions restarting per conversation.

Map-style data is packed once over all lengths and read lazily (``with_transform`` gathers a pack's rows from the
encoded dataset when the trainer asks for it). Streaming data goes through the streaming packer, buffer by buffer.
Packing changes the number of optimizer steps per epoch: with ``per_device_train_batch_size`` packs per step, a
step sees about ``capacity / mean length`` times more conversations than unpacked; the loss is still the mean over
supervised tokens of the whole step.
"""

from __future__ import annotations

from datasets import Dataset, Features, IterableDataset, List, Value

from .loading import IMAGE_REF

PACK_FIELDS = ("sample_id", "input_ids", "labels", "images", "length")
PACKED_FEATURES = Features(
    {
        "sample_id": List(Value("string")),
        "input_ids": List(List(Value("int32"))),
        "labels": List(List(Value("int32"))),
        "images": List(List(IMAGE_REF)),
        "length": List(Value("int64")),
    }
)


class GatherPacks:
    """``with_transform`` function: a batch of ``pack`` index lists -> the packs' conversations, field by field."""

    def __init__(self, encoded: Dataset):
        self.encoded = encoded

    def __call__(self, batch: dict) -> dict:
        out = {name: [] for name in PACK_FIELDS}
        for indices in batch["pack"]:
            rows = self.encoded[list(indices)]
            for name in PACK_FIELDS:
                out[name].append(rows[name])
        return out


def _stream_packs(encoded: IterableDataset, capacity: int, algorithm: str, buffer_size: int):
    from dataset_builders.streaming_packing import StreamingPacker

    packer = StreamingPacker(encoded, length_fn=lambda row: row["length"], capacity=capacity,
                             buffer_size=buffer_size, algorithm=algorithm)
    for pack in packer:
        yield {name: [row[name] for row in pack] for name in PACK_FIELDS}


def pack_sft_dataset(
    encoded: Dataset | IterableDataset,
    capacity: int,
    algorithm: str = "default",
    buffer_size: int = 10_000,
) -> Dataset | IterableDataset:
    """Packs of conversations whose lengths (after image expansion) sum to at most ``capacity``."""
    from dataset_builders.packing import pack_lengths

    if isinstance(encoded, IterableDataset):
        return IterableDataset.from_generator(
            _stream_packs,
            features=PACKED_FEATURES,
            gen_kwargs={"encoded": encoded, "capacity": capacity, "algorithm": algorithm, "buffer_size": buffer_size},
        )
    bins = pack_lengths(encoded["length"], capacity=capacity, algorithm=algorithm)
    return Dataset.from_dict({"pack": bins}).with_transform(GatherPacks(encoded))
