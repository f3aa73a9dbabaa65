"""Pretraining on a CUDA device through accelerate FSDP2 (bf16): sharded checkpoints resume to the same losses.

Skipped without CUDA (CI has none); run on a GPU machine with ``pytest tests/test_pretrain_cuda.py``. The CPU tests
cover the same logic with gloo; this checks the CUDA path: FSDP2 via accelerate's yaml, bf16 mixed precision, the
fused AdamW default and torch.distributed.checkpoint on GPU tensors.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes.training.run_logs import read_jsonl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ROOT = Path(__file__).resolve().parent.parent


def _launch(corpus: tuple[str, str], output_dir: Path, *extra: str) -> None:
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    command = [accelerate, "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / "fsdp2_1gpu.yaml"),
               str(ROOT / "recipes" / "pretrain.py"),
               "--config", str(ROOT / "recipes" / "configs" / "pretrain_tiny.yaml"),
               "--dataset_name_or_path", corpus[0], "--dataset_config_name", corpus[1], "--output_dir",
               str(output_dir), "--report_to", "none", "--mixed_precision", "bf16", "--max_steps", "8",
               "--save_steps", "4", "--gradient_accumulation_steps", "2", *extra]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def corpus(processor, tmp_path_factory) -> tuple[str, str]:
    from recipes.training.toy_corpus import write_toy_corpus

    folder = tmp_path_factory.mktemp("corpus")
    return str(folder), write_toy_corpus(folder, processor, num_documents=160, capacity=256)


def test_fsdp2_bf16_run_resumes_from_a_sharded_checkpoint_to_the_same_losses(corpus, tmp_path):
    reference = tmp_path / "reference"
    _launch(corpus, reference)
    records = read_jsonl(reference / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[0]["max_memory_gib"] > 0

    # The run as if killed after step 6: only the step-4 checkpoint is left.
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000008")
    shutil.rmtree(resumed / "final_model", ignore_errors=True)
    _launch(corpus, resumed, "--resume")
    got = read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 9))
    for a, b in zip(records, got):  # GPU kernels are not bitwise deterministic: a tolerance
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3), (a["step"], a["loss"], b["loss"])
        assert b["lr"] == pytest.approx(a["lr"])


def test_compiled_layers_under_fsdp2_train_like_eager(corpus, tmp_path):
    """--compile_layers with accelerate's FSDP2 (hooks installed after the in-place compile) and its activation
    checkpointing: the same losses as the eager run within bf16 tolerance."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    _launch(corpus, eager)
    _launch(corpus, compiled, "--compile_layers", "true")
    expected, got = read_jsonl(eager / "metrics.jsonl"), read_jsonl(compiled / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 9))
    for a, b in zip(expected, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2), (a["step"], a["loss"], b["loss"])
