"""A model repository: the folder's checks (complete, remote code wired, no pickle weights), the model card with
its evaluation table and Training section, assembly in the staging folder and the load check in a fresh process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from recipes.training.run_logs import SFT_TRAINING_LOG

from .errors import ReleaseError
from .staging import check_no_local_paths, copy_matching, prepare_staging
from .training_facts import training_section

# The only kit code a model folder carries (what save_pretrained copies); the converter's modules, factory.py and
# tokenizer_utils.py are kit-only and never staged.
REMOTE_CODE_FILES = ("configuration_open_qwen2vl.py", "modeling_open_qwen2vl.py", "processing_open_qwen2vl.py")
MODEL_REQUIRED = ("config.json", "generation_config.json", "processor_config.json", "tokenizer.json",
                  "tokenizer_config.json") + REMOTE_CODE_FILES
MODEL_OPTIONAL_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "chat_template.jinja",
                           "additional_chat_templates/*.jinja", "special_tokens_map.json", SFT_TRAINING_LOG,
                           "*.md")
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


def _check_model_folder(folder: Path) -> dict:
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
    return config


def model_card(config: dict, repo_id: str, eval_table: str | None, training: str | None) -> str:
    text, vision = config["text_config"], config["vision_config"]
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "license": "apache-2.0",
        "tags": ["open-qwen2vl", "vision-language", "multimodal", "custom_code"],
    }
    name = repo_id.split("/")[-1]
    lines = [
        "---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---", "",
        f"# {name}", "",
        "An [Open-Qwen2VL](https://arxiv.org/abs/2504.00595) model packaged by the Open-Qwen2VL kit: a SigLIP vision "
        "encoder, an adaptive average-pool projector and a Qwen2 language model, loadable with the standard "
        "transformers Auto classes (the modeling code ships in this repository).", "",
        "## Use", "", "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        f'model = AutoModelForImageTextToText.from_pretrained("{repo_id}", trust_remote_code=True)',
        f'processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)',
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
    if eval_table:
        lines += ["## Evaluation", "", eval_table.strip(), ""]
    if training:
        lines += ["## Training", "", training.strip(), ""]
    return "\n".join(lines)


def build_model_repo(folder: Path, staging: Path, repo_id: str, eval_table: Path | None = None,
                     training_notes: Path | None = None) -> Path:
    """Assemble a model repository in ``staging`` from a kit model folder, check that it holds no local path and
    loads; returns ``staging``."""
    config = _check_model_folder(folder)
    prepare_staging(folder, staging)
    copy_matching(folder, staging, MODEL_REQUIRED + MODEL_OPTIONAL_PATTERNS)
    card = model_card(
        config, repo_id,
        _eval_table_text(eval_table.read_text(), folder, repo_id) if eval_table else None,
        training_section(folder, config, training_notes.read_text() if training_notes else None),
    )
    (staging / "README.md").write_text(card, encoding="utf-8")
    check_no_local_paths(staging, folder)
    _check_model_loads(staging)
    return staging


def _eval_table_text(table: str, folder: Path, repo_id: str) -> str:
    """recipes/eval.py's table names the model by the path it was evaluated from; the card names it by repo id."""
    table = re.sub(r"^(Evaluation of `)[^`]*(`)", lambda m: m.group(1) + repo_id + m.group(2), table)
    return table.replace(str(folder.resolve()), repo_id)
