"""SFT data for Open-Qwen2VL: LLaVA-665k / MAmmoTH-VL / TRL messages+images -> assistant-only labels -> batches.

Pipeline: ``load_raw_sft_dataset`` (datasets, map-style or streaming) -> ``encode_sft_dataset`` (chat template,
compact token ids, labels on assistant turns only, bad samples raised or counted, content a chat format cannot
show counted and logged) -> optional ``pack_sft_dataset`` (isolated packing) -> ``SFTCollator`` /
``PackedSFTCollator`` (images decoded per batch).

Data the demo (or any user) should write for ``recipes/sft.py``: a JSONL file of TRL messages rows with image paths
relative to ``--image_root``, one object per line::

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]},
                  {"role": "assistant", "content": "circle"}],
     "images": ["images/17.png"]}

(``recipes.sft_data.easy_vqa.write_easy_vqa_sft`` writes exactly this from the easy-vqa package.) LLaVA JSON
(``conversations`` with ``from: human|gpt`` and ``<image>`` tags, ``image`` relative to ``--image_root``) works too;
see ``formats`` for every accepted layout.
"""

from .collator import PackedSFTCollator, SFTCollator, open_image
from .encoding import IGNORE_INDEX, EncodedSample, SFTEncoder
from .errors import BadSampleError, DroppedContent, SkipLog
from .formats import FORMATS, SFTSample, detect_format, to_sft_sample
from .loading import ENCODED_FEATURES, encode_sft_dataset, load_raw_sft_dataset, resolve_format

__all__ = [
    "ENCODED_FEATURES",
    "FORMATS",
    "IGNORE_INDEX",
    "BadSampleError",
    "DroppedContent",
    "EncodedSample",
    "PackedSFTCollator",
    "SFTCollator",
    "SFTEncoder",
    "SFTSample",
    "SkipLog",
    "detect_format",
    "encode_sft_dataset",
    "load_raw_sft_dataset",
    "open_image",
    "resolve_format",
    "to_sft_sample",
]
