"""A saved folder loads through the Auto classes with trust_remote_code in a process where the kit cannot be imported."""

import json
import subprocess
import sys
import textwrap

import torch

from modeling_open_qwen2vl import OpenQwen2VLForConditionalGeneration

BLOCK_KIT = textwrap.dedent(
    """
    import sys, importlib.abc
    class BlockKit(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"modeling_open_qwen2vl", "dataset_builders", "recipes"}:
                raise ImportError(f"kit import blocked: {name}")
    sys.meta_path.insert(0, BlockKit())
    """
)

CHILD = BLOCK_KIT + textwrap.dedent(
    """
    import json, torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    folder, out = sys.argv[1], sys.argv[2]
    try:
        import modeling_open_qwen2vl
        raise SystemExit("kit was importable")
    except ImportError:
        pass
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image = Image.new("RGB", (50, 30), (200, 30, 30))
    enc = processor(text="<s><image>\\nWhat colour?", images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    gen = model.generate(**enc, max_new_tokens=5, do_sample=False)
    json.dump({"class": type(model).__module__, "proc": type(processor).__module__,
               "ids": enc["input_ids"][0].tolist(), "logits": logits[0, -1, :50].tolist(),
               "gen": gen[0].tolist()}, open(out, "w"))
    """
)


def test_fresh_process_remote_code_round_trip(tmp_path, tiny_config, processor):
    from PIL import Image

    torch.manual_seed(1)
    model = OpenQwen2VLForConditionalGeneration(tiny_config).eval()
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == \
        "modeling_open_qwen2vl.OpenQwen2VLForConditionalGeneration"
    for name in ("configuration_open_qwen2vl.py", "modeling_open_qwen2vl.py", "processing_open_qwen2vl.py",
                 "model.safetensors"):
        assert (folder / name).is_file(), name

    out = tmp_path / "child.json"
    subprocess.run([sys.executable, "-c", CHILD, str(folder), str(out)], check=True, cwd=tmp_path,
                   env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    child = json.loads(out.read_text())
    assert child["class"].startswith("transformers_modules.")  # the remote copy, not the kit
    assert child["proc"].startswith("transformers_modules.")

    image = Image.new("RGB", (50, 30), (200, 30, 30))
    enc = processor(text="<s><image>\nWhat colour?", images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    gen = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert child["ids"] == enc["input_ids"][0].tolist()
    assert child["logits"] == logits[0, -1, :50].tolist()
    assert child["gen"] == gen[0].tolist()
