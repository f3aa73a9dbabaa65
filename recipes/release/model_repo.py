"""A model repository: the folder's checks (complete, remote code wired, no pickle weights), the model card with
its evaluation table and Training section, assembly in the staging folder and the load check in a fresh process."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from recipes.training.run_logs import SFT_TRAINING_LOG

from .card_edits import (
    CONVERSION_INTRO,
    CONVERTER_CARD_TAG,
    FIXED_METADATA,
    RELEASE_CARD_TAG,
    card_section,
    merged_metadata,
    read_card,
    released_section,
    revision_argument,
    user_card,
)
from .errors import ReleaseError
from .staging import check_no_local_paths, copy_files, copy_matching, included_files, prepare_staging
from .training_facts import training_section

logger = logging.getLogger(__name__)

# The only kit code a model folder carries (what save_pretrained copies); the converter's modules, factory.py and
# tokenizer_utils.py are kit-only and never staged.
REMOTE_CODE_FILES = ("configuration_open_qwen2vl.py", "modeling_open_qwen2vl.py", "processing_open_qwen2vl.py")
MODEL_REQUIRED = ("config.json", "generation_config.json", "processor_config.json", "tokenizer.json",
                  "tokenizer_config.json") + REMOTE_CODE_FILES
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHT_PATTERNS = ("*.safetensors", WEIGHTS_INDEX)
# Staged by pattern; the weights are staged by name (_weight_files), only those one load reads. No other markdown:
# a folder's notes.md or TODO.md are the user's, published only when named with --include.
OTHER_OPTIONAL_PATTERNS = ("chat_template.jinja", "additional_chat_templates/*.jinja", "special_tokens_map.json",
                           SFT_TRAINING_LOG)
# Every kind of file a model release manages (hub_upload deletes those of an earlier release that this one lacks).
MODEL_OPTIONAL_PATTERNS = WEIGHT_PATTERNS + OTHER_OPTIONAL_PATTERNS
# A converter card (card_edits.CONVERTER_CARD_TAG) holds the conversion's facts (source checkpoint and sha256,
# dropped tensors, the `compat` template note), kept on release.
# Pickled weights the kit does not release. Other .bin files are fine: TRL's training_args.bin (pickled arguments,
# not weights) is in every SFT folder, and only the allow-list above is copied anyway.
PICKLE_WEIGHTS = ("pytorch_model*.bin", "adapter_model*.bin", "*.pt", "*.pth", "*.ckpt")
# Loads the staged folder as a user would (fresh process, remote code, offline); missing, unexpected or mismatched
# weights only warn (or point to a report above the error), so they are collected and named on the last line.
LOAD_CHECK = """
import sys
from transformers import AutoModelForImageTextToText
_, info = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True, output_loading_info=True,
                                                      ignore_mismatched_sizes=True)
bad = [f"{key} ({len(value)}, e.g. {sorted(map(str, value))[0]})" for key, value in info.items() if value]
if bad:
    raise SystemExit("the weights do not match config.json: " + "; ".join(bad))
"""


def _check_model_loads(staging: Path) -> None:
    """Load the staged folder in a fresh process (a corrupt weights file or a config.json that does not match the
    weights only shows there); refuse with the error's last line."""
    result = subprocess.run([sys.executable, "-c", LOAD_CHECK, str(staging)], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()] or ["(no error output)"]
        raise ReleaseError(f"the staged model in {staging} does not load with AutoModelForImageTextToText: "
                           f"{lines[-1].strip()}")


def _weight_files(folder: Path) -> list[str]:
    """The weight files one load reads: ``model.safetensors`` alone, or the index and exactly the shards it lists.

    A mix (a single file left beside an index, shards the index does not list, listed shards or tensors missing)
    is refused: the load check reads only one of them, while every file would be published."""
    present = sorted(p.name for p in folder.glob("*.safetensors") if p.is_file())
    if not (folder / WEIGHTS_INDEX).is_file():
        if present != [SINGLE_WEIGHTS]:
            raise ReleaseError(f"{folder} holds {', '.join(present)} without {WEIGHTS_INDEX} (only "
                               f"{SINGLE_WEIGHTS} loads without an index); remove the files left from another save")
        return [SINGLE_WEIGHTS]
    if SINGLE_WEIGHTS in present:
        raise ReleaseError(f"{folder} holds both {SINGLE_WEIGHTS} and the sharded weights of {WEIGHTS_INDEX}: one "
                           "of them is left from an earlier save; remove the stale one (or convert into an empty "
                           "folder)")
    try:
        weight_map = json.loads((folder / WEIGHTS_INDEX).read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError) as err:
        raise ReleaseError(f"{folder / WEIGHTS_INDEX} is not readable JSON ({type(err).__name__})") from err
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise ReleaseError(f"{folder / WEIGHTS_INDEX} has no weight_map of tensor names to shard files")
    listed = sorted(set(weight_map.values()))
    outside = [name for name in listed if Path(name).name != name]  # would not be staged next to the index
    if outside:
        raise ReleaseError(f"{WEIGHTS_INDEX} in {folder} lists shards outside the folder: {', '.join(outside)}")
    missing = [name for name in listed if name not in present]
    unlisted = [name for name in present if name not in listed]
    if missing or unlisted:
        raise ReleaseError(f"{WEIGHTS_INDEX} in {folder} does not match its shards: "
                           + "; ".join(f"{what}: {', '.join(names)}" for what, names in
                                       (("listed but missing", missing), ("present but not listed", unlisted))
                                       if names))
    from safetensors import safe_open

    for shard in listed:  # an index left from another save can name same-named shards with other tensors
        try:
            with safe_open(folder / shard, framework="pt") as weights:
                held = set(weights.keys())
        except Exception as err:  # noqa: BLE001 - any unreadable shard is refused with its reason
            raise ReleaseError(f"{folder / shard} is not a readable safetensors file: {err}") from err
        absent = sorted(key for key, name in weight_map.items() if name == shard and key not in held)
        if absent:
            raise ReleaseError(f"{WEIGHTS_INDEX} in {folder} places {len(absent)} tensors in {shard} that it does "
                               f"not hold (e.g. {absent[0]}): the index is from another save")
    return [WEIGHTS_INDEX] + listed


def _check_processor_matches(folder: Path) -> None:
    """Refuse a processor that does not match the model config (e.g. ``num_image_tokens`` edited in config.json
    only): every user of the repository would fail on the first image."""
    from modeling_open_qwen2vl import OpenQwen2VLConfig
    from modeling_open_qwen2vl.processing_open_qwen2vl import OpenQwen2VLProcessor

    try:  # loaded, not read as JSON: values left at their defaults count as what a user gets
        config = OpenQwen2VLConfig.from_pretrained(folder)
        processor = OpenQwen2VLProcessor.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - named in the refusal
        raise ReleaseError(f"the config or processor in {folder} does not load: {type(err).__name__}: {err}") from err
    problems = []
    if processor.num_image_tokens != config.num_image_tokens:
        problems.append(f"num_image_tokens is {config.num_image_tokens} in config.json but "
                        f"{processor.num_image_tokens} in processor_config.json")
    size, image_size = processor.image_processor.size, config.vision_config.image_size
    resized = (getattr(size, "height", None), getattr(size, "width", None))
    if resized != (image_size, image_size):
        problems.append(f"the vision config's image_size is {image_size} but the image processor resizes to "
                        f"{size if isinstance(size, int) else dict(size)}")  # SizeDict: its set fields
    if problems:
        raise ReleaseError(f"{folder}: the processor does not match the model ({'; '.join(problems)}); fix "
                           "processor_config.json or config.json so they agree before releasing")


def _check_model_folder(folder: Path) -> tuple[dict, list[str]]:
    """The folder's config.json and the weight files to stage; refuses an incomplete or inconsistent folder."""
    missing = [name for name in MODEL_REQUIRED if not (folder / name).is_file()]
    if not list(folder.glob("*.safetensors")):
        missing.append("*.safetensors (weights)")
    if missing:
        raise ReleaseError(f"{folder} is not a complete Open-Qwen2VL folder; missing: {', '.join(missing)}")
    config = json.loads((folder / "config.json").read_text())
    auto_map = config.get("auto_map", {})
    for key in ("AutoConfig", "AutoModelForImageTextToText"):
        if key not in auto_map:
            raise ReleaseError(f"{folder}/config.json has no auto_map[{key!r}]: it would not load with trust_remote_code")
    pickles = sorted({p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern)})
    if pickles:
        raise ReleaseError(f"{folder} holds pickle weights ({', '.join(pickles)}); the kit releases safetensors only")
    weights = _weight_files(folder)
    _check_processor_matches(folder)
    return config, weights


def converter_card(folder: Path) -> str | None:
    """The body of the model card the converter wrote in ``folder`` (its title dropped, its headings one level
    down to sit under the released card's Conversion section); None when README.md is not a converter card."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    try:
        metadata, text = read_card(readme)
    except yaml.YAMLError:
        return None
    if not isinstance(metadata, dict) or CONVERTER_CARD_TAG not in (metadata.get("tags") or []):
        return None
    if RELEASE_CARD_TAG in metadata["tags"]:  # a card this tool made: its Conversion section holds the body
        section = card_section(text, "Conversion") or ""
        return section.removeprefix(CONVERSION_INTRO).strip() or None
    lines = text.strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    body, in_code = [], False
    for line in lines:
        in_code ^= line.startswith("```")
        body.append("#" + line if line.startswith("#") and not in_code else line)  # "# ..." in code is a comment
    return "\n".join(body).strip()


def _conversion_facts(card: str) -> list[str]:
    """The Training section's facts for a converted folder: the converter and the source checkpoint row."""
    facts = ["- recipe: converted from a prismatic checkpoint (the original Open-Qwen2VL codebase's format) with "
             "`python -m modeling_open_qwen2vl.convert_prismatic_to_hf` (details under Conversion)"]
    source = re.search(r"^\| source checkpoint \| (.+?) \|$", card, re.MULTILINE)
    if source:
        facts.append(f"- source checkpoint: {source.group(1)}")
    return facts


def model_card(config: dict, repo_id: str, eval_table: str | None, training: str | None,
               conversion: str | None = None, revision: str | None = None,
               own_card: tuple[dict, str] | None = None) -> str:
    """The released card; ``conversion`` is the converter's card body (``converter_card``), kept as a section, and
    ``own_card`` the README.md the user wrote (``user_card``), kept as the Notes section with its metadata merged.
    The Use snippet loads ``revision`` (the branch uploaded to) unless it is main."""
    text, vision = config["text_config"], config["vision_config"]
    metadata = {
        **FIXED_METADATA,
        "license": "apache-2.0",
        "tags": ["open-qwen2vl", "vision-language", "multimodal", "custom_code", RELEASE_CARD_TAG]
        + ([CONVERTER_CARD_TAG] if conversion else []),
    }
    if own_card:
        metadata = merged_metadata(metadata, own_card[0])
    name, loads = repo_id.split("/")[-1], f'"{repo_id}"{revision_argument(revision)}'
    lines = [
        "---", yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).strip(), "---", "",
        f"# {name}", "",
        "An [Open-Qwen2VL](https://arxiv.org/abs/2504.00595) model packaged by the Open-Qwen2VL kit: a SigLIP vision "
        "encoder, an adaptive average-pool projector and a Qwen2 language model, loadable with the standard "
        "transformers Auto classes (the modeling code ships in this repository).", "",
        "## Use", "", "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        f"model = AutoModelForImageTextToText.from_pretrained({loads}, trust_remote_code=True)",
        f"processor = AutoProcessor.from_pretrained({loads}, trust_remote_code=True)",
        'inputs = processor(text="<s><image>\\nDescribe the image.", images=[image], return_tensors="pt")',
        "print(processor.decode(model.generate(**inputs, max_new_tokens=64)[0], skip_special_tokens=True))",
        "```", "",
        "## Architecture", "",
        "| part | value |", "|---|---|",
        f"| vision | SigLIP, {vision.get('num_hidden_layers')} layers, width {vision.get('hidden_size')}, "
        f"{vision.get('image_size')}px, patch {vision.get('patch_size')}, features of layer "
        f"{config.get('vision_feature_layer')} |",
        f"| image tokens | {config.get('num_image_tokens')} per image (adaptive average pooling) |",
        f"| language model | Qwen2, {text.get('num_hidden_layers')} layers, width {text.get('hidden_size')}, "
        f"vocabulary {text.get('vocab_size')} |",
        "",
    ]
    if own_card and own_card[1]:
        lines += ["## Notes", "", own_card[1], ""]
    if conversion:
        lines += ["## Conversion", "", CONVERSION_INTRO, "", conversion.strip(), ""]
    if eval_table:
        lines += ["## Evaluation", "", eval_table.strip(), ""]
    if training:
        lines += ["## Training", "", training.strip(), ""]
    return "\n".join(lines)


def _extra_files(folder: Path, include: list[str], weights: list[str]) -> list[str]:
    """The files ``--include`` adds; weight and pickle files are refused there: only the safetensors one load reads
    (``weights``) are released, and the load check would not see others."""
    # README.md is never copied as is: the card is generated (the folder's own one kept in it)
    extra = [name for name in included_files(folder, include) if name != "README.md"]
    weight_like = [name for name in extra if name not in weights and any(
        Path(name).match(pattern) for pattern in WEIGHT_PATTERNS + PICKLE_WEIGHTS)]
    if weight_like:
        raise ReleaseError(f"--include names weight or pickle files the released model does not load: "
                           f"{', '.join(weight_like)}; the release stages the weights itself (safetensors only)")
    return extra


def build_model_repo(folder: Path, staging: Path, repo_id: str, eval_table: Path | None = None,
                     training_notes: Path | None = None, include: list[str] | None = None,
                     revision: str | None = None) -> Path:
    """Assemble a model repository in ``staging`` from a kit model folder (plus the files ``include`` names, as
    upload_folder's allow_patterns), check that it holds no local path and loads; returns ``staging``. The card's
    snippet loads ``revision``; a README.md the user wrote in the folder is kept in the card (``user_card``)."""
    config, weights = _check_model_folder(folder)
    extra = _extra_files(folder, include or [], weights)
    conversion = converter_card(folder)
    own_card = user_card(folder)  # refused here, before staging, if it cannot be kept
    if eval_table is None and released_section(folder, "Evaluation"):  # scores of the model as released then
        logger.warning("%s/README.md is a released card with an Evaluation section; it is not carried over (a "
                       "quantized or retrained model scores differently): pass --eval-table with this folder's "
                       "scores from recipes/eval.py", folder)
    prepare_staging(folder, staging)
    copy_matching(folder, staging, MODEL_REQUIRED + tuple(weights) + OTHER_OPTIONAL_PATTERNS)
    copy_files(folder, staging, extra)
    card = model_card(
        config, repo_id,
        _eval_table_text(eval_table.read_text(), folder, repo_id) if eval_table else None,
        training_section(folder, config, training_notes.read_text() if training_notes else None,
                         _conversion_facts(conversion) if conversion else None, released_section(folder, "Training")),
        conversion, revision, own_card,
    )
    (staging / "README.md").write_text(card, encoding="utf-8")
    check_no_local_paths(staging, folder)
    _check_model_loads(staging)
    return staging


def _eval_table_text(table: str, folder: Path, repo_id: str) -> str:
    """recipes/eval.py's table names the model by the path it was evaluated from; the card names it by repo id."""
    table = re.sub(r"^(Evaluation of `)[^`]*(`)", lambda m: m.group(1) + repo_id + m.group(2), table)
    return table.replace(str(folder.resolve()), repo_id)
