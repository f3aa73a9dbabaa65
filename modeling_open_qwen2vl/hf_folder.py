"""Writing a prismatic checkpoint as a transformers folder: weights, config, generation config, processor, card.

Kit-only, not copied into checkpoints.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from transformers import GenerationConfig

from .configuration_open_qwen2vl import EOS_TOKEN_ID, PAD_TOKEN_ID, OpenQwen2VLConfig
from .conversion_config import config_from_run, derive_config
from .conversion_errors import CheckpointError
from .factory import build_processor
from .model_card import model_card
from .modeling_open_qwen2vl import OpenQwen2VLForConditionalGeneration
from .original_checkpoint import load_prismatic_checkpoint, load_vision_weights, read_prismatic_run_config
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


def sha256_of_file(path: Path) -> str:
    """The file's sha256 hex digest, read in 16 MiB blocks with a progress bar (checkpoints are gigabytes)."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    with path.open("rb") as handle, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                          desc=f"sha256 {path.name}", leave=False) as bar:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


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
) -> Path:
    """Convert one prismatic checkpoint into a transformers folder (weights, config, processor, card); returns it.

    ``checkpoint`` is a ``.pt`` file or a prismatic run directory (``checkpoints/latest-checkpoint.pt`` and
    ``config.json``); ``run_config`` defaults to the ``config.json`` of that run directory. The other arguments
    are the options of ``convert_prismatic_to_hf.main``.
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
    run = read_prismatic_run_config(run_config)
    config = config_from_run(run, base_config)
    original = load_prismatic_checkpoint(checkpoint)
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

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shell = OpenQwen2VLForConditionalGeneration._from_config(config, dtype=target_dtype)
    shell.generation_config = generation_config_for(config)
    # The meta model supplies the config, remote-code files and tied-weight rules; the tensors come from `state`.
    shell.save_pretrained(output, state_dict=state, max_shard_size=max_shard_size)
    del state

    processor = build_processor(config, chat_format="compat", tokenizer_source=tokenizer,
                                model_max_length=int(run.get("llm_max_length", 4096)))
    processor.save_pretrained(output)

    dropped = []
    if has_head and not keep_head:
        dropped.append("vision attention-pool head (--drop-vision-head)")
    facts = {
        "model_id": run.get("model_id") or checkpoint.stem,
        "run_model_id": run.get("model_id"),
        "checkpoint_name": checkpoint.name,
        "sha256": sha256_of_file(checkpoint) if compute_sha256 else "not computed",
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
