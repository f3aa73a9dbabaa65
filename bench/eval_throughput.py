"""Evaluation throughput: batched generation (batch 8, left padding) vs one prompt at a time (the original harness).

Both runs go through the kit's evaluation path (``recipes.evaluation.Predictor.generate``: processor, ``generate``,
decoding) on the same prompts: MMBench-style multiple-choice prompts in the original raw format over real easy-vqa
images, greedy decoding with the original's stop tokens, on the tiny model (its language-model weights scaled so its
answers depend on the prompt and never hit a stop token). Two answer lengths:

- 2-token answers (what a trained model answers, e.g. "A."): prefill-dominated;
- 16-token answers (the original's cap): decode-dominated.

The two batch sizes are timed in turn, 8 prompts at a time, so that other jobs on the (shared) machine slow both
alike; each setting runs three times: samples/s is the fastest run, the speed-up the median of the three ratios.
The table reports samples/s, the speed-up of batch 8 over batch 1 (target >= 4x on CPU) and whether the predictions
of the two runs are identical. Run from the repository root: ``.venv/bin/python bench/eval_throughput.py``.

``--gpu`` (needs CUDA) runs the same comparison on the real 2B architecture (random init, bf16, sdpa) and stores it
as a separate section; it has no target (the target is the CPU figure).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from bench._common import markdown_table, write_result  # noqa: E402
from modeling_open_qwen2vl import OpenQwen2VLConfig, OpenQwen2VLForConditionalGeneration, build_processor  # noqa: E402
from recipes.evaluation.benchmarks.easy_vqa import ANSWER_KINDS, package_split  # noqa: E402
from recipes.evaluation.original_settings import ORIGINAL_MAX_NEW_TOKENS, ORIGINAL_STOP_TOKEN_IDS  # noqa: E402
from recipes.evaluation.prompts import PromptFormatter, option_lines  # noqa: E402
from recipes.evaluation.generation import Predictor  # noqa: E402
from tests.fixtures.eval import lively_tiny_model  # noqa: E402  (the eval tests' tiny model)

NUM_SAMPLES = 48
TARGET_SPEEDUP = 4.0
REPEATS = 3


def workload(count: int):
    """Raw-format multiple-choice prompts over real easy-vqa test images."""
    rows = package_split("test").select(range(count))
    formatter = PromptFormatter("raw")
    prompts, images = [], []
    for row in rows:
        kind = next(k for k, answers in ANSWER_KINDS.items() if row["answer"] in answers)
        options = {chr(ord("A") + i): a for i, a in enumerate(ANSWER_KINDS[kind])}
        text = (f"<image>\n{row['question']}\n{option_lines(options)}\n"
                "Answer with the option's letter from the given choices directly.\nAnswer:")
        prompts.append(formatter(text))
        images.append([row["image"].convert("RGB")])
    return prompts, images


def interleaved_rates(predictors, prompts, images, max_new_tokens: int):
    """Samples/s of each predictor on the same prompts, timed chunk by chunk in turn (8 prompts at a time), so that
    other jobs on the machine slow both runs alike; also returns each run's outputs."""
    seconds = {size: 0.0 for size in predictors}
    outputs = {size: [] for size in predictors}
    for start in range(0, len(prompts), 8):
        chunk = slice(start, start + 8)
        for size, predictor in predictors.items():
            begin = time.perf_counter()
            outputs[size] += predictor.generate(prompts[chunk], images[chunk], max_new_tokens, ORIGINAL_STOP_TOKEN_IDS)
            seconds[size] += time.perf_counter() - begin
    return {size: len(prompts) / seconds[size] for size in predictors}, outputs


def gpu_2b_model():
    """The released 2B architecture, random weights, bf16 on the GPU (no download; sdpa, the default)."""
    config = OpenQwen2VLConfig.open_qwen2vl_2b()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = OpenQwen2VLForConditionalGeneration(config).to(torch.bfloat16).eval()
    return model


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the 2B architecture on CUDA instead of the tiny model")
    gpu = parser.parse_args().gpu
    prompts, images = workload(NUM_SAMPLES)
    model = gpu_2b_model() if gpu else lively_tiny_model()
    processor = build_processor(model.config)
    predictors = {size: Predictor(model, processor, batch_size=size, show_progress=False) for size in (1, 8)}
    for predictor in predictors.values():
        predictor.generate(prompts[:8], images[:8], 2, ORIGINAL_STOP_TOKEN_IDS)  # warm-up
    rows, speedups = [], []
    for label, max_new_tokens in (("2-token answers", 2), ("16-token answers", ORIGINAL_MAX_NEW_TOKENS)):
        rates, ratios = {1: 0.0, 8: 0.0}, []
        for _ in range(REPEATS):
            pair, outputs = interleaved_rates(predictors, prompts, images, max_new_tokens)
            rates = {size: max(rates[size], pair[size]) for size in rates}
            ratios.append(pair[8] / pair[1])
        speedup = statistics.median(ratios)
        speedups.append(speedup)
        rows.append([label, NUM_SAMPLES, f"{rates[1]:.2f}", f"{rates[8]:.2f}", f"{speedup:.2f}x",
                     "yes" if outputs[1] == outputs[8] else "NO"])
    table = markdown_table(
        ["workload", "samples", "batch 1 samples/s (original)", "batch 8 samples/s (kit)", "speed-up",
         "identical predictions"],
        rows,
    )
    verdict = "met" if min(speedups) >= TARGET_SPEEDUP else "NOT met"
    if gpu:
        body = (f"Card: {torch.cuda.get_device_name(0)}. The same comparison on the 2B architecture (random init, "
                "bf16, sdpa): batch 8 with left padding vs batch 1. No target (the target is the CPU figure "
                "above); random weights answer at random, so identical predictions are not expected where bf16 "
                f"rounding differs between batch shapes.\n\n{table}\n")
        print(body)
        write_result("eval_throughput_gpu", "Evaluation throughput on a GPU (2B architecture)", body,
                     command="bench/eval_throughput.py --gpu")
        return 0
    body = (
        "Greedy generation through `recipes.evaluation.Predictor` on the tiny model (MMBench-style raw prompts over "
        "real easy-vqa images, original stop tokens), batch 8 with left padding vs batch 1 (the original harness). "
        f"Batch sizes timed in turn, 8 prompts at a time; samples/s: fastest of {REPEATS} runs; speed-up: median of "
        f"the {REPEATS} ratios.\n\n"
        f"{table}\n\nTarget: batch 8 at least {TARGET_SPEEDUP:.0f}x the samples/s of batch 1 on CPU: **{verdict}** "
        f"(lowest speed-up {min(speedups):.2f}x).\n\n"
        "Where the time goes: in the tiny model the LM head (151,936-token vocabulary x hidden 64, tied embeddings) "
        "is about half of every decoding step; for 8 rows MKL's matrix product costs about 1.9x the one-row product "
        "(3.3 ms vs 1.75 ms here), which holds the batched gain near 4x on 2 cores. Models with wider layers spend "
        "their time in matrix products that batch far better."
    )
    print(body)
    write_result("eval_throughput", "Evaluation throughput: batched vs one prompt at a time", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
