"""Writing a prismatic checkpoint as a transformers folder: weights, config, generation config, processor, card.

Kit-only, not copied into checkpoints.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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


# Files of a model folder or a prismatic run, as ``glob`` patterns relative to the folder. Without --overwrite a
# folder holding any of them is refused (the new files would mix with them, or replace a README.md silently); with
# --overwrite every one of them is deleted, by name, once the new model is complete.
WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth",
                        "*.ckpt")
MODEL_FILE_PATTERNS = (
    *WEIGHT_FILE_PATTERNS,
    # configs, processor and tokenizer files of any transformers model (a leftover one is read by the new model)
    "config.json", "generation_config.json", "adapter_config.json", "processor_config.json", "preprocessor_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
    "additional_chat_templates/*.jinja",
    # remote code, the model card, what training leaves (recipes.release builds a card's Training section from it)
    "configuration_*.py", "modeling_*.py", "processing_*.py", "image_processing_*.py", "tokenization_*.py",
    "README.md", "trainer_state.json", "*_results.json", "training_log.jsonl", "pretrain_config.yaml",
    "metrics.jsonl",
    # a prismatic run directory
    "checkpoints/*.pt", "config.yaml", "run-metrics.jsonl",
)
# Repository plumbing that --overwrite neither deletes nor counts as a stranger's file (a cloned hub repository).
KEPT_ENTRIES = (".git", ".gitattributes", ".cache")
# Written into a hidden folder beside --output, which becomes (or is moved into) --output once complete: an
# interrupted conversion never leaves a folder that looks like a model.
STAGING_INFIX = ".partial-"


def _folder_entries(folder: Path) -> list[str]:
    """Every file (and link) under ``folder`` as a relative posix path, links not followed, ``KEPT_ENTRIES`` skipped."""
    entries = []
    for root, dirs, files in os.walk(folder):
        relative = Path(root).relative_to(folder)
        if relative == Path("."):
            dirs[:] = [name for name in dirs if name not in KEPT_ENTRIES]
            files = [name for name in files if name not in KEPT_ENTRIES]
        links = [name for name in dirs if (Path(root) / name).is_symlink()]
        dirs[:] = [name for name in dirs if name not in links]
        entries += [(relative / name).as_posix() for name in files + links]
    return sorted(entries)


def is_model_file(relative: str) -> bool:
    """Whether a folder's file (relative posix path) is one of ``MODEL_FILE_PATTERNS``, at the pattern's depth."""
    parent, _, name = relative.rpartition("/")
    for pattern in MODEL_FILE_PATTERNS:
        pattern_parent, _, pattern_name = pattern.rpartition("/")
        if parent == pattern_parent and fnmatch.fnmatchcase(name, pattern_name):
            return True
    return False


def _listed(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _model_file_rank(relative: str) -> tuple[int, str]:
    """Configs and weights first: what makes the folder load as a model leads the list in a refusal."""
    loads = relative == "config.json" or any(fnmatch.fnmatchcase(relative, p) for p in WEIGHT_FILE_PATTERNS)
    return (0 if loads else 1, relative)


def check_output_folder(output: Path, inputs: Iterable[str | Path | None], *, overwrite: bool) -> None:
    """Refuse ``output`` before anything is read or written when it would overwrite or mix with other files.

    ``output`` may not be one of ``inputs`` (local paths; hub ids and None are skipped) nor a folder above one.
    A folder already holding model files (``MODEL_FILE_PATTERNS``) needs ``overwrite``, and then may hold nothing
    else: its other files might be the old model's or someone's, so they are neither mixed with the new model nor
    deleted. An empty, missing or unrelated folder is written as is. Raises ``OutputFolderError``.
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
    if not output.is_dir():
        return
    entries = _folder_entries(output)
    found = sorted((entry for entry in entries if is_model_file(entry)), key=_model_file_rank)
    if found and not overwrite:
        raise OutputFolderError(
            f"--output {output} already holds model files ({_listed(found, 4)}): the new files would mix with them "
            "(transformers loads a leftover model.safetensors before new shards). Choose an empty folder, or pass "
            "--overwrite (overwrite=True) to replace them"
        )
    strangers = [entry for entry in entries if not is_model_file(entry)]
    if found and strangers:
        raise OutputFolderError(
            f"--output {output} holds a model and files that are not part of one ({_listed(strangers)}): --overwrite "
            "replaces the whole model folder, and these would either stay mixed with the new model or be deleted "
            "unasked; move them out of the folder, or choose another folder"
        )


def _remove_model_files(output: Path) -> list[str]:
    """Delete ``output``'s model files (and the folders they leave empty); returns their relative paths."""
    removed = [entry for entry in _folder_entries(output) if is_model_file(entry)]
    for entry in removed:
        (output / entry).unlink()
    for parent in sorted({Path(entry).parent for entry in removed if "/" in entry}, reverse=True):
        if not any((output / parent).iterdir()):
            (output / parent).rmdir()
    return removed


def _publish(staging: Path, output: Path, *, overwrite: bool) -> None:
    """Make the complete ``staging`` folder's files ``output``'s: a rename when ``output`` does not exist, else the
    old model files are deleted (named in the log) and the new ones moved in, ``config.json`` last so a folder
    interrupted here does not load as a model."""
    if not output.exists():
        staging.rename(output)
        return
    check_output_folder(output, (), overwrite=overwrite)  # again: the folder may have changed in the meantime
    removed = _remove_model_files(output) if overwrite else []
    if removed:
        logger.warning("--overwrite: removed %d files of the previous model in %s: %s", len(removed), output,
                       ", ".join(removed))
    new = sorted((path.name for path in staging.iterdir()), key=lambda name: name == "config.json")
    # After the check, an existing name can only be a stranger's (nothing was removed then): never replace it.
    taken = [name for name in new if (output / name).is_symlink() or (output / name).is_file()
             or (output / name).is_dir() and any((output / name).iterdir())]
    if taken:
        raise OutputFolderError(f"--output {output} holds {_listed(taken)}, which the new model would replace; "
                                "move it away or choose another folder (nothing was changed there)")
    for name in new:
        (staging / name).replace(output / name)
    staging.rmdir()


@contextmanager
def staged_output(output: Path, *, overwrite: bool) -> Iterator[Path]:
    """A new hidden folder beside ``output`` to write the whole model into; when the block completes, its files
    become ``output``'s (``_publish``). On any error or interrupt it is deleted and ``output`` is left as it was
    (a killed process leaves only the hidden folder, named in the next run's log)."""
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    for leftover in sorted(output.parent.glob(f".{glob.escape(output.name)}{STAGING_INFIX}*")):
        logger.warning("%s was left by an interrupted conversion into %s: delete it to free its space", leftover,
                       output)
    staging = output.parent / f".{output.name}{STAGING_INFIX}{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()  # not tempfile.mkdtemp: its 0700 mode would become the published folder's
    try:
        yield staging
        _publish(staging, output, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
    (or contain) an input; a folder already holding model files needs ``overwrite``, which replaces all of them
    (``check_output_folder``). The model is written beside ``output`` and moved there complete, so an interrupted
    conversion leaves ``output`` as it was.
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
    card = model_card(facts)

    with staged_output(output, overwrite=overwrite) as folder:
        with torch.device("meta"):
            shell = OpenQwen2VLForConditionalGeneration._from_config(config, dtype=target_dtype)
        shell.generation_config = generation_config_for(config)
        # The meta model supplies the config, remote-code files and tied-weight rules; the tensors come from `state`.
        shell.save_pretrained(folder, state_dict=state, max_shard_size=max_shard_size)
        del state
        processor.save_pretrained(folder)
        (folder / "README.md").write_text(card, encoding="utf-8")
    logger.info("wrote %s", output)
    return output
