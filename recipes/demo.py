"""End-to-end offline demo (README command 1: `make demo`).

Builds a tiny Open-Qwen2VL with the real Qwen tokenizer, saves it as a Hugging Face folder, reloads it in a fresh
process through `AutoModelForImageTextToText.from_pretrained(..., trust_remote_code=True)` and answers a question
about a real easy-vqa test image, then writes a short report.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from recipes.demo_steps import PYTHON, StepRunner, run_command  # noqa: E402

RELOAD_AND_ANSWER = textwrap.dedent(
    """
    import json, sys, torch
    import easy_vqa
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    folder, out = sys.argv[1], sys.argv[2]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    questions, answers, image_ids = easy_vqa.get_test_questions()
    image = Image.open(easy_vqa.get_test_image_paths()[image_ids[0]]).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": questions[0]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = processor.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    json.dump({"class": type(model).__name__, "question": questions[0], "expected": answers[0], "answer": answer},
              open(out, "w"))
    print(f"Q: {questions[0]}  expected: {answers[0]}  model: {answer!r}")
    """
)


def build_tiny_model(folder: Path) -> None:
    import torch

    from modeling_open_qwen2vl import OpenQwen2VLConfig, OpenQwen2VLForConditionalGeneration, build_processor

    config = OpenQwen2VLConfig.tiny(num_image_tokens=16)
    torch.manual_seed(0)
    model = OpenQwen2VLForConditionalGeneration(config)
    processor = build_processor(config, chat_format="chatml")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    print(f"saved a tiny Open-Qwen2VL ({params / 1e6:.1f}M parameters, real Qwen tokenizer) to {folder}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=Path("demo_output"))
    args = parser.parse_args(argv)
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    model_dir, answer_file = out / "model", out / "answer.json"

    runner = StepRunner()
    runner.add("build a tiny model with the real Qwen tokenizer and save it", lambda: build_tiny_model(model_dir))
    runner.add(
        "reload in a fresh process with trust_remote_code and answer a question",
        lambda: run_command([PYTHON, "-c", RELOAD_AND_ANSWER, str(model_dir), str(answer_file)]),
    )
    runner.run()

    answer = json.loads(answer_file.read_text())
    report = out / "report.md"
    lines = ["# Open-Qwen2VL demo report", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {title} | {seconds:.1f} |" for title, seconds in runner.timings.items()]
    lines += ["", f"Reloaded class: `{answer['class']}`", "",
              f"Question: {answer['question']} (expected: {answer['expected']}); model answered: {answer['answer']!r}"]
    report.write_text("\n".join(lines) + "\n")
    print(f"\nReport written to {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
