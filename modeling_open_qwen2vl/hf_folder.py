"""Writing a prismatic checkpoint as a transformers folder: weights, config, generation config, processor, card.

Kit-only, not copied into checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from transformers import GenerationConfig

from .configuration_open_qwen2vl import EOS_TOKEN_ID, PAD_TOKEN_ID, OpenQwen2VLConfig
from .conversion_config import config_from_run, derive_config
from .conversion_errors import CheckpointError, OutputFolderError
from .factory import build_processor
from .model_card import model_card
from .modeling_open_qwen2vl import OpenQwen2VLForConditionalGeneration
from .original_checkpoint import (
    load_prismatic_checkpoint,
    load_vision_weights,
    read_prismatic_run_config,
    scan_checkpoint_file,
)
from .prismatic_layout import LLM_PREFIX, ORIGINAL_LM_HEAD, TIMM_PREFIX, is_vision_head_key
from .weight_mapping import cast_state_dict, convert_state_dict, resolve_dtype, same_tensor

logger = logging.getLogger(__name__)

# The original's inference defaults: greedy decoding, stop at <|im_end|>; 512 new tokens as in its README call.
GENERATION_DEFAULTS = {"do_sample": False, "num_beams": 1, "max_new_tokens": 512}


def generation_config_for(config: OpenQwen2VLConfig) -> GenerationConfig:
    """Greedy decoding that stops at ``<|im_end|>``, as the original's ``generate_batch`` (README: 512 new tokens);
    the image placeholder is never generated (it has no image behind it)."""
    text = config.text_config
    eos = text.eos_token_id if text.eos_token_id is not None else EOS_TOKEN_ID
    pad = text.pad_token_id if text.pad_token_id is not None else PAD_TOKEN_ID
    return GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=eos, pad_token_id=pad,
                            suppress_tokens=[config.image_token_id], **GENERATION_DEFAULTS)


# Weight files transformers would load from a folder; a leftover one beats (or breaks) the newly written ones.
WEIGHT_FILE_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                        "pytorch_model.bin.index.json")
# What makes a folder a model folder or a prismatic run: converting into it would mix two models.
MODEL_FILE_PATTERNS = (*WEIGHT_FILE_PATTERNS, "config.json", "checkpoints/*.pt")


def check_output_folder(output: Path, inputs: Iterable[str | Path | None], *, overwrite: bool) -> None:
    """Refuse ``output`` before anything is read or written when it would overwrite or mix with other files.

    ``output`` may not be one of ``inputs`` (local paths; hub ids and None are skipped) nor a folder above one.
    A folder already holding model files (``MODEL_FILE_PATTERNS``) needs ``overwrite``; an empty, missing or
    unrelated folder is written as is. Raises ``OutputFolderError``.
    """
    target = output.resolve()
    for source in inputs:
        if source is None or isinstance(source, OpenQwen2VLConfig) or not Path(source).exists():
            continue
        resolved = Path(source).resolve()
        if resolved == target or target in resolved.parents:
            raise OutputFolderError(
                f"--output {output} is, or contains, the input {source}: writing there would overwrite it; "
                "choose another folder"
            )
    if output.exists() and not output.is_dir():
        raise OutputFolderError(f"--output {output} exists and is not a folder")
    if overwrite or not output.is_dir():
        return
    found = sorted({path.relative_to(output).as_posix() for pattern in MODEL_FILE_PATTERNS
                    for path in output.glob(pattern) if path.is_file()})
    if found:
        raise OutputFolderError(
            f"--output {output} already holds model files ({', '.join(found[:6])}{', ...' if len(found) > 6 else ''})"
            ": the new files would mix with them (transformers loads a leftover model.safetensors before new shards)."
            " Choose an empty folder, or pass --overwrite (overwrite=True) to replace them"
        )


def remove_weight_files(output: Path) -> None:
    """Delete ``output``'s transformers weight files (``--overwrite``) so none of the previous model's survive."""
    for pattern in WEIGHT_FILE_PATTERNS:
        for path in output.glob(pattern):
            if path.is_file():
                logger.info("--overwrite: removing %s", path)
                path.unlink()


def convert_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    run_config: str | Path | None = None,
    vision_weights: str | Path | None = None,
    tokenizer: str | Path | None = None,
    base_config: str | Path | OpenQwen2VLConfig | None = None,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    drop_vision_head: bool = False,
    compute_sha256: bool = True,
    overwrite: bool = False,
) -> Path:
    """Convert one prismatic checkpoint into a transformers folder (weights, config, processor, card); returns it.

    ``checkpoint`` is a ``.pt`` file or a prismatic run directory (``checkpoints/latest-checkpoint.pt`` and
    ``config.json``); ``run_config`` defaults to the ``config.json`` of that run directory. ``output`` must not be
    (or contain) an input; a folder already holding model files needs ``overwrite``, which deletes its weight files.
    Every input (run config, checkpoint CRCs, tokenizer, weights) is checked before anything is written; errors are
    ``CheckpointError`` (``OutputFolderError`` for the output) or ``FileNotFoundError``. The other arguments are the
    options of ``convert_prismatic_to_hf.main``.
    """
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        run_config = run_config or checkpoint / "config.json"
        checkpoint = checkpoint / "checkpoints" / "latest-checkpoint.pt"
    if run_config is None:
        guess = checkpoint.parent.parent / "config.json"
        if not guess.is_file():
            raise FileNotFoundError(f"pass the prismatic config.json of {checkpoint} (--config)")
        run_config = guess
    output = Path(output)
    check_output_folder(output, [checkpoint, run_config, base_config, vision_weights, tokenizer], overwrite=overwrite)
    try:  # parsed the way save_pretrained will, so a typo fails now rather than after config.json is written
        split_torch_state_dict_into_shards({}, max_shard_size=max_shard_size)
    except ValueError as error:
        raise CheckpointError(f"--max-shard-size {max_shard_size!r}: {error}") from error
    run = read_prismatic_run_config(run_config)
    config = config_from_run(run, base_config)
    try:
        max_length = int(run.get("llm_max_length", 4096))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{run_config}: model.llm_max_length is not an integer ({error})") from error
    # The tokenizer is the cheapest input to get wrong: build the processor before the gigabytes are read.
    if tokenizer is not None and not Path(tokenizer).exists() and (
            Path(tokenizer).is_absolute() or str(tokenizer).startswith(".") or str(tokenizer).endswith(".json")):
        raise CheckpointError(f"--tokenizer {tokenizer}: no such file or folder (nor a hub id)")
    try:
        processor = build_processor(config, chat_format="compat", tokenizer_source=tokenizer,
                                    model_max_length=max_length)
    except (OSError, ValueError, TypeError, KeyError) as error:  # no such folder/file/hub id, not a Qwen2 tokenizer
        source = "the default tokenizer" if tokenizer is None else f"--tokenizer {str(tokenizer)!r}"
        raise CheckpointError(f"cannot build the processor from {source}: {error}") from error
    # One read of the file checks every zip member's CRC (and hashes it for the card); torch.load does neither.
    sha256 = scan_checkpoint_file(checkpoint, sha256=compute_sha256)
    original = load_prismatic_checkpoint(checkpoint, verify=False)
    logger.info("read %s: %s", checkpoint, {group: len(state) for group, state in original.items()})

    if "vision_backbone" in original:
        if vision_weights is not None:
            raise CheckpointError(f"{checkpoint} has its own vision_backbone; drop --vision-weights")
        vision, vision_source = None, "the checkpoint's `vision_backbone` (vision tower trained with the LLM)"
        has_head = any(key.startswith(TIMM_PREFIX + "attn_pool.") for key in original["vision_backbone"])
    elif vision_weights is not None:
        vision = load_vision_weights(vision_weights, config)
        # A hub id is quoted as given; a local path only by its name (no paths of this machine in the card).
        name = Path(vision_weights).name if Path(vision_weights).exists() else str(vision_weights)
        vision_source = f"`{name}` (the checkpoint has no vision_backbone: the tower was frozen in training)"
        has_head = any(is_vision_head_key(key, "hf") for key in vision)
    else:
        raise CheckpointError(
            f"{checkpoint} has no vision_backbone (the vision tower was frozen in training): pass the pretrained "
            "SigLIP with --vision-weights (e.g. google/siglip-so400m-patch14-384 or timm's "
            "ViT-SO400M-14-SigLIP-384 weights)"
        )
    keep_head = has_head and not drop_vision_head
    llm = original["llm_backbone"]
    embed = llm.get(LLM_PREFIX + "model.embed_tokens.weight")
    lm_head = llm.get(ORIGINAL_LM_HEAD)
    tie = config.tie_word_embeddings
    if tie and embed is not None and lm_head is not None and not same_tensor(embed, lm_head):
        logger.warning("llm.lm_head.weight differs from the embeddings: converting with untied embeddings")
        tie = False
    config = derive_config(config, vision_use_head=keep_head, tie_word_embeddings=tie)

    state = convert_state_dict(original, config, vision=vision)
    target_dtype = resolve_dtype(original, dtype)
    state = cast_state_dict(state, target_dtype)

    if overwrite and output.is_dir():
        remove_weight_files(output)
    output.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shell = OpenQwen2VLForConditionalGeneration._from_config(config, dtype=target_dtype)
    shell.generation_config = generation_config_for(config)
    # The meta model supplies the config, remote-code files and tied-weight rules; the tensors come from `state`.
    shell.save_pretrained(output, state_dict=state, max_shard_size=max_shard_size)
    del state

    processor.save_pretrained(output)

    dropped = []
    if has_head and not keep_head:
        dropped.append("vision attention-pool head (--drop-vision-head)")
    facts = {
        "model_id": run.get("model_id") or checkpoint.stem,
        "run_model_id": run.get("model_id"),
        "checkpoint_name": checkpoint.name,
        "sha256": sha256 or "not computed",
        "arch_specifier": run["arch_specifier"],
        "vision_backbone_id": run.get("vision_backbone_id"),
        "llm_backbone_id": run.get("llm_backbone_id"),
        "num_image_tokens": config.num_image_tokens,
        "vision_source": vision_source,
        "head": "kept (unused by the forward; kept so the export back is lossless)" if keep_head else "not kept",
        "dropped": ", ".join(dropped),
        "dtype": str(target_dtype).removeprefix("torch."),
        "tokenizer": f"`{Path(tokenizer).name if Path(tokenizer).exists() else tokenizer}`" if tokenizer
        else "the official Qwen2.5 tokenizer.json (offline copy)",
    }
    (output / "README.md").write_text(model_card(facts), encoding="utf-8")
    logger.info("wrote %s", output)
    return output
