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


def test_image_text_to_text_pipeline_batches_like_single_calls_and_generate(tmp_path, easy_vqa_images):
    """The model card's pipeline tag works: ``pipeline("image-text-to-text")`` on a saved folder answers chat
    messages as the processor + ``generate`` do by hand, and a batch answers as the single calls (the saved
    tokenizer pads left; right padding made every batched row but the longest answer garbage)."""
    from pathlib import Path

    from transformers import AutoProcessor, pipeline

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fixtures.eval import lively_tiny_model

    from modeling_open_qwen2vl import OpenQwen2VLConfig, build_processor

    model = lively_tiny_model()  # greedy answers that depend on the image and prompt
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    build_processor(OpenQwen2VLConfig.tiny(num_image_tokens=model.config.num_image_tokens)).save_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert processor.tokenizer.padding_side == "left"

    questions = ["What shape is in the image?", "What color?", "Is there a circle in this picture?"]
    chats = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
             for image, question in zip(easy_vqa_images, questions)]
    by_hand = []
    for chat in chats:
        text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=text, images=[chat[0]["content"][0]["image"]], return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        by_hand.append(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    assert len(set(by_hand)) == len(by_hand)  # the comparison below is not vacuous

    pipe = pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)
    single = [pipe(text=chat, max_new_tokens=6)[0]["generated_text"][-1]["content"] for chat in chats]
    batched = [out[0]["generated_text"][-1]["content"]
               for out in pipe(text=chats, max_new_tokens=6, batch_size=len(chats))]
    assert single == by_hand
    assert batched == by_hand
