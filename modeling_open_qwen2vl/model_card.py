"""The README.md model card of a converted folder: where the weights came from and how to use them.

Kit-only, not copied into checkpoints.
"""

from __future__ import annotations


def model_card(facts: dict) -> str:
    """The card's markdown from the facts ``convert_checkpoint`` gathers (source, sha256, dtype, vision weights...)."""
    dropped = facts["dropped"] or "none"
    # Without the pooling head the original cannot load a vision_backbone (it loads it strictly, head included).
    head_kept = facts["head"].startswith("kept")
    export_option = "" if head_kept else " --no-vision-backbone"
    export_note = "" if head_kept else (
        "The folder has no vision pooling head, which the original loads strictly with a `vision_backbone`: the "
        "export omits the vision tower, and the original then uses timm's pretrained SigLIP.\n")
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- open-qwen2vl
- prismatic-conversion
---

# {facts['model_id']} (transformers format)

Converted from the prismatic checkpoint of Open-Qwen2VL (arXiv 2504.00595) with
`python -m modeling_open_qwen2vl.convert_prismatic_to_hf`. The weights are the original tensors, renamed (the timm
vision encoder's fused `qkv` split into `q/k/v`, `pos_embed` reshaped); none were retrained or re-initialised.

| | |
|---|---|
| source checkpoint | `{facts['checkpoint_name']}` (sha256 `{facts['sha256']}`) |
| prismatic config | model_id `{facts['run_model_id']}`, arch_specifier `{facts['arch_specifier']}`, vision `{facts['vision_backbone_id']}`, LLM `{facts['llm_backbone_id']}` |
| visual tokens per image | {facts['num_image_tokens']} (from the arch_specifier; for 144 <-> 729 change `num_image_tokens` in both config.json and processor_config.json, no weight changes) |
| vision tower weights | {facts['vision_source']} |
| vision pooling head | {facts['head']} |
| dropped tensors | {dropped} |
| dtype | {facts['dtype']} |
| tokenizer | {facts['tokenizer']} + `<|endofchunk|>` (151665), BOS `<s>` (128245), image placeholder `<|image_pad|>` |

The vision encoder uses exact (erf) GELU like the original timm SigLIP; features come from the second-to-last
encoder layer without the final layer norm, pooled by adaptive average pooling to a square grid.

## Usage

```python
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
# The original README / evaluation format: <s> + raw prompt, one <image> marker per image.
inputs = processor(text="<s><image>\\nDescribe the image.", images=[image], return_tensors="pt")
output = model.generate(**inputs)  # greedy, stops at <|im_end|> (generation_config.json)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

The model and the processor must agree on the visual tokens per image. To switch between 144 and 729 in Python:

```python
model.config.num_image_tokens = processor.num_image_tokens = 144
model.save_pretrained(new_folder)
processor.save_pretrained(new_folder)  # processor_config.json; config.json alone leaves every image input failing
```

The processor's default chat template is `compat`: it reproduces the original SFT prompt strings byte for byte,
quirks included (`...<|im_end|>assistant\\n` without `<|im_start|>`, and the token after an image in the first turn
dropped), which is what these weights were trained on. `chat_template="chatml"` gives clean ChatML.

Convert back for the original codebase with
`python -m modeling_open_qwen2vl.convert_prismatic_to_hf --to-prismatic <this folder> --output <run dir>{export_option}`.
{export_note}"""
