"""Convert released Open-Qwen2VL (prismatic) checkpoints to the kit's transformers format, and back.

Forward (original -> Hugging Face folder)::

    python -m modeling_open_qwen2vl.convert_prismatic_to_hf \\
        --checkpoint Open-Qwen2VL/checkpoints/latest-checkpoint.pt --config Open-Qwen2VL/config.json \\
        --output open-qwen2vl-hf [--vision-weights google/siglip-so400m-patch14-384 | timm.safetensors] \\
        [--tokenizer Qwen/Qwen2.5-1.5B-Instruct] [--dtype auto|float32|bfloat16|float16] [--overwrite]

The folder loads with ``AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)`` and
``AutoProcessor.from_pretrained(folder, trust_remote_code=True)``; the processor's default chat template is
``compat`` (the strings the released weights were trained on).

Back (kit folder -> prismatic run directory that the original ``prismatic.load(run_dir)`` reads)::

    python -m modeling_open_qwen2vl.convert_prismatic_to_hf --to-prismatic open-qwen2vl-hf --output run_dir

Every input is checked before anything is written. ``--output`` is never an input's folder and may not already
hold model files unless ``--overwrite`` is given; that replaces every file of the old model (weights, configs,
processor and tokenizer files, remote code, card), names them in the log, and refuses a folder that also holds
files of no model (move them out first). The new folder is written beside ``--output`` and moved there complete: an
interrupted conversion leaves ``--output`` as it was. The checkpoint's zip CRCs are checked in the same read that
hashes it for the model card.
The checkpoint is read with ``torch.load(..., weights_only=True, mmap=True)`` only, and tensors are renamed or
split as views: conversion holds about one copy of the checkpoint in memory (see ``bench/convert_2b.py``).
The export back writes a ``.pt`` file because that is the only format the original codebase reads.

This module is the command line only. The work is done by (all kit-only, none copied into converted folders):
``original_checkpoint`` (reading the inputs), ``conversion_config`` (the kit config of a run), ``weight_mapping``
(state dicts both ways, over the per-key renames of ``prismatic_layout``), ``hf_folder`` + ``model_card`` (writing
the transformers folder) and ``prismatic_export`` (the export back); errors are ``conversion_errors.CheckpointError``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .conversion_errors import CheckpointError
from .hf_folder import convert_checkpoint
from .prismatic_export import export_to_prismatic


def build_parser() -> argparse.ArgumentParser:
    """The converter's options: the forward conversion, or the export back with ``--to-prismatic``."""
    parser = argparse.ArgumentParser(
        prog="python -m modeling_open_qwen2vl.convert_prismatic_to_hf",
        description="Convert a prismatic Open-Qwen2VL checkpoint to a transformers folder "
                    "(or back with --to-prismatic).",
    )
    parser.add_argument("--checkpoint", help="latest-checkpoint.pt, or a prismatic run directory")
    parser.add_argument("--config", help="the prismatic run's config.json (default: the run directory's)")
    parser.add_argument("--output", required=True,
                        help="folder to write (never an input's folder; one that holds a model needs --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the model an --output already holds: every file of it (weights, configs, "
                             "processor, tokenizer, remote code, card) is deleted, by name, once the new one is "
                             "complete; a folder that also holds other files is refused")
    parser.add_argument("--vision-weights",
                        help="SigLIP weights when the checkpoint has no vision_backbone: a transformers folder or hub "
                             "id (google/siglip-so400m-patch14-384), or a timm .safetensors/.bin/.pth file")
    parser.add_argument("--tokenizer", help="Qwen2.5 tokenizer folder or hub id (default: the offline official file)")
    parser.add_argument("--base-config", help="OpenQwen2VLConfig folder/json for non-released backbones")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights dtype (auto: the checkpoint's, the widest if mixed, float32 for fp16 + bf16)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--drop-vision-head", action="store_true",
                        help="drop the unused attention-pool head (the export back then needs --no-vision-backbone)")
    parser.add_argument("--no-sha256", action="store_true",
                        help="skip hashing the checkpoint for the model card (its zip CRCs are still checked)")
    parser.add_argument("--to-prismatic", metavar="HF_FOLDER",
                        help="export a kit folder to a prismatic run directory at --output")
    parser.add_argument("--no-vision-backbone", action="store_true",
                        help="with --to-prismatic: omit vision_backbone (the original then uses timm's SigLIP)")
    parser.add_argument("--model-id", help="with --to-prismatic: model_id written into config.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns 0, or 2 after printing ``error: ...`` for a bad or missing input."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.to_prismatic:
            path = export_to_prismatic(args.to_prismatic, args.output, run_config_template=args.config,
                                       include_vision_backbone=not args.no_vision_backbone, model_id=args.model_id,
                                       overwrite=args.overwrite)
        else:
            if not args.checkpoint:
                raise CheckpointError("--checkpoint is required (or --to-prismatic for the export back)")
            path = convert_checkpoint(
                args.checkpoint, args.output, run_config=args.config, vision_weights=args.vision_weights,
                tokenizer=args.tokenizer, base_config=args.base_config, dtype=args.dtype,
                max_shard_size=args.max_shard_size, drop_vision_head=args.drop_vision_head,
                compute_sha256=not args.no_sha256, overwrite=args.overwrite,
            )
    except (CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
