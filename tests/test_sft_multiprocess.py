"""SFT across processes (torchrun + gloo on CPU) and at a run's end: the evaluation loss of 2 processes equals 1
process's with packed and with streamed data (no wrap-around sample scored twice), a LoRA run merged on 2 processes
keeps its --dtype, and resuming a finished run trains nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recipes.sft import main
from recipes.sft_data.easy_vqa import write_easy_vqa_sft
from recipes.training.run_logs import SFT_TRAINING_LOG, read_jsonl

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mp_data")
    write_easy_vqa_sft(folder, "train", limit=16)
    write_easy_vqa_sft(folder, "test", limit=10)  # 10 conversations: no batch layout divides them evenly
    return folder


def _argv(output_dir, data, model, *extra):
    return ["--output_dir", str(output_dir), "--dataset_name", str(data / "train.jsonl"), "--image_root", str(data),
            "--eval_dataset_name", str(data / "test.jsonl"), "--model_name_or_path", str(model),
            "--learning_rate", "1e-3", "--max_length", "128", "--bf16", "false", "--use_cpu", "true",
            "--report_to", "none", "--logging_steps", "1", "--seed", "0", "--activation_checkpointing", "false",
            *map(str, extra)]


def _run(processes: int, port: int, argv: list[str]) -> None:
    launcher = ([str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(processes),
                 "--master_port", str(port)] if processes > 1 else [sys.executable])
    result = subprocess.run([*launcher, str(ROOT / "recipes" / "sft.py"), *argv], env=ENV, cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


def _eval_loss(output_dir: Path) -> float:
    return next(r["eval_loss"] for r in read_jsonl(output_dir / SFT_TRAINING_LOG) if "eval_loss" in r)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["packed_lora_bf16", "streamed"])
def test_two_processes_evaluate_and_save_what_one_process_does(data, base_dir, tmp_path, variant):
    common = ["--max_steps", 1, "--save_strategy", "no", "--eval_strategy", "steps", "--eval_steps", 1]
    if variant == "packed_lora_bf16":
        # 10 conversations make 5 packs of 128 positions; 1 process evaluates one pack per batch, 2 processes are
        # asked for 2 (the recipe takes 1: the Trainer drops wrap-around duplicates row by row, a packed batch
        # is one row)
        # (learning rate 0: bf16 steps on 1 and 2 processes round apart by more than a duplicate's share moves
        # the loss; the merged model must still come out in bf16, as the base was loaded)
        extra = ["--packing", "--use_peft", "--lora_r", 4, "--dtype", "bfloat16", "--learning_rate", 0]
        one = _argv(tmp_path / "one", data, base_dir, *common, *extra, "--per_device_train_batch_size", 4,
                    "--per_device_eval_batch_size", 1)
        two = _argv(tmp_path / "two", data, base_dir, *common, *extra, "--per_device_train_batch_size", 2,
                    "--per_device_eval_batch_size", 2)
    else:  # a streamed eval split has no length: wrap-around samples could not be dropped
        extra = ["--dataset_streaming", "--per_device_eval_batch_size", 2]
        one = _argv(tmp_path / "one", data, base_dir, *common, *extra, "--per_device_train_batch_size", 4)
        two = _argv(tmp_path / "two", data, base_dir, *common, *extra, "--per_device_train_batch_size", 2)
    _run(1, 0, one)
    _run(2, 29561 if variant == "streamed" else 29563, two)
    assert _eval_loss(tmp_path / "two") == pytest.approx(_eval_loss(tmp_path / "one"), rel=1e-5)
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("one", "two"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype == (torch.bfloat16 if variant == "packed_lora_bf16" else torch.float32)
        torch.testing.assert_close(b[key].float(), a[key].float(), rtol=0, atol=4e-3 if a[key].dtype == torch.bfloat16
                                   else 1e-5)


def test_resuming_a_finished_run_trains_nothing_and_keeps_its_model(data, base_dir, tmp_path):
    out = tmp_path / "run"
    argv = _argv(out, data, base_dir, "--max_steps", 2, "--save_strategy", "steps", "--save_steps", 2,
                 "--per_device_train_batch_size", 2)
    main(argv)
    before = load_file(str(out / "model.safetensors"))
    log = read_jsonl(out / SFT_TRAINING_LOG)
    main(argv + ["--resume_from_checkpoint", "latest"])  # e.g. a requeued job after the run ended
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # no step 3
    after = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert read_jsonl(out / SFT_TRAINING_LOG) == log
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
