"""End-to-end pretraining on CPU with the tiny config: loss, outputs, exact resume after SIGKILL, bad input."""

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from recipes.training.run_logs import read_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures.pretrain_runs import ROOT, TINY, pretrain_argv, run_in_process, toy_corpus  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, processor):
    return toy_corpus(tmp_path_factory, processor, "packed_corpus", num_documents=160)


def _args(corpus, output_dir, *extra) -> list[str]:
    return pretrain_argv(corpus, output_dir, "--report_to", "none", *extra)


def _pretrain(args, launcher=(sys.executable,), **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, str(ROOT / "recipes" / "pretrain.py"), *args], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=600, **kwargs)


def _start_and_wait_for_steps(args, output_dir: Path, steps: int, **popen_kwargs) -> subprocess.Popen:
    """Start the recipe in the background; return once ``steps`` lines are in its metrics.jsonl (or it ended)."""
    process = subprocess.Popen([sys.executable, str(ROOT / "recipes" / "pretrain.py"), *args], env=ENV, cwd=ROOT,
                               stdout=subprocess.DEVNULL, **popen_kwargs)
    metrics = output_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            break
        time.sleep(0.02)
    return process


def _check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """24 steps through `accelerate launch` (no config: one CPU process), as the demo runs it."""
    output_dir = tmp_path_factory.mktemp("pretrain") / "run"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    result = _pretrain(_args(corpus, output_dir, "--max_steps", 24, "--save_steps", 12, "--report_to",
                             "tensorboard"), launcher=(accelerate, "launch"))
    _check(result)
    return output_dir


def test_tiny_pretraining_drives_the_loss_down(trained):
    records = read_jsonl(trained / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 25))
    first = records[0]["loss"]
    assert first > 10  # ~ln(151936): a random model over the real Qwen vocabulary
    assert sum(r["loss"] for r in records[-5:]) / 5 < 0.35 * first
    for record in records:
        assert record["tokens"] > 0 and record["tokens_per_s"] > 0 and record["tflops_per_s"] > 0
        assert record["grad_norm"] > 0 and record["mfu"] is None  # CPU: no peak known, no MFU
    assert records[0]["lr"] == pytest.approx(1e-2)  # warmup int(0.03 * 24) = 0 steps
    assert records[-1]["lr"] < records[12]["lr"] < records[0]["lr"]  # cosine decay
    assert list((trained / "logs").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    resolved = (trained / "pretrain_config.yaml").read_text()
    assert "max_steps: 24" in resolved


def test_checkpoints_and_final_model_are_written(trained):
    from recipes.training.checkpointing import complete_checkpoints, read_trainer_state

    found = complete_checkpoints(trained)
    assert [p.name for p in found] == ["step-00000012", "step-00000024"]
    state = read_trainer_state(found[-1])
    assert state["global_step"] == 24 and state["stage"] == "pretrain" and state["total_steps"] == 24
    assert (found[-1] / "data_rank0.json").is_file() and (found[-1] / "rng_rank0.safetensors").is_file()
    assert list((found[-1] / "model_optimizer").glob("*.distcp"))
    assert not list(trained.rglob("*.bin")) and not list(trained.rglob("*.pt")) and not list(trained.rglob("*.pkl"))
    final = trained / "final_model"
    assert (final / "model.safetensors").is_file() and (final / "modeling_open_qwen2vl.py").is_file()


def test_final_model_loads_with_remote_code_in_a_fresh_process(trained, tiny_config, processor, easy_vqa_images):
    """The remote-code model's logits equal those of a kit model restored from the last training checkpoint."""
    from safetensors.torch import load_file, save_file

    from modeling_open_qwen2vl import OpenQwen2VLForConditionalGeneration
    from recipes.training.checkpointing import latest_checkpoint, load_checkpoint
    from recipes.training.model_setup import apply_stage
    from recipes.training.optim import build_optimizer, build_scheduler

    inputs = processor(text=["<s><image>\na"], images=easy_vqa_images[:1], return_tensors="pt")
    inputs_file = trained.parent / "inputs.safetensors"
    save_file({"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"]}, str(inputs_file))
    script = textwrap.dedent(f"""
        import sys, torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForImageTextToText
        model = AutoModelForImageTextToText.from_pretrained({str(trained / "final_model")!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert "modeling_open_qwen2vl" not in sys.modules
        inputs = load_file({str(inputs_file)!r})
        with torch.no_grad():
            logits = model.eval()(**inputs).logits
        save_file({{"logits": logits.contiguous()}}, {str(trained.parent / "logits.safetensors")!r})
    """)
    _check(subprocess.run([sys.executable, "-c", script], env=ENV, cwd=trained.parent, capture_output=True,
                          text=True, timeout=300))
    remote = load_file(str(trained.parent / "logits.safetensors"))["logits"]

    model = OpenQwen2VLForConditionalGeneration(tiny_config)
    apply_stage(model, "pretrain")
    optimizer = build_optimizer(model, 1e-3, 0.01, (0.9, 0.999), 1e-8)
    load_checkpoint(latest_checkpoint(trained), model=model, optimizer=optimizer,
                    scheduler=build_scheduler(optimizer, "cosine", 24, 0))
    with torch.no_grad():
        expected = model.eval()(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
    torch.testing.assert_close(remote, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_losses_and_samples(corpus, tmp_path):
    """Uninterrupted vs killed (SIGKILL mid-run) + --resume: same per-step losses; every pack once per epoch."""
    common = ("--max_steps", 14, "--gradient_accumulation_steps", 2, "--save_steps", 3, "--log_sample_uids", "true")
    reference = tmp_path / "reference"
    _check(_pretrain(_args(corpus, reference, *common)))

    interrupted = tmp_path / "interrupted"
    process = _start_and_wait_for_steps(_args(corpus, interrupted, *common), interrupted, 7,
                                        stderr=subprocess.DEVNULL)
    metrics = interrupted / "metrics.jsonl"
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = len(read_jsonl(metrics))
    assert 7 <= killed_at < 14 and not (interrupted / "final_model").exists()

    resumed = _pretrain(_args(corpus, interrupted, *common, "--resume"))
    _check(resumed)
    assert "resumed from" in resumed.stderr and "step-0000000" in resumed.stderr

    expected, got = read_jsonl(reference / "metrics.jsonl"), read_jsonl(metrics)
    assert [r["step"] for r in got] == list(range(1, 15))
    for a, b in zip(expected, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-6), (a["step"], a["loss"], b["loss"])
        assert b["lr"] == pytest.approx(a["lr"]) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    samples_expected = read_jsonl(reference / "samples.jsonl")
    samples_got = read_jsonl(interrupted / "samples.jsonl")
    assert samples_got == samples_expected
    # 15 packs, 2 micro-batches per step: epoch 0 is steps 1-8 (its last step takes the one pack left).
    import datasets

    all_uids = [uid for row in datasets.load_dataset(corpus[0], corpus[1], split="train")["uids"] for uid in row]
    epoch_0 = [uid for record in samples_got[:8] for uid in record["uids"]]
    epoch_1 = [uid for record in samples_got[8:] for uid in record["uids"]]
    assert sorted(epoch_0) == sorted(all_uids)  # every document exactly once
    assert len(epoch_1) == len(set(epoch_1)) and set(epoch_1) < set(all_uids)
    state = json.loads((reference / "checkpoints" / "step-00000014" / "data_rank0.json").read_text())
    assert state["micro_batches"] == 15 + 12


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_exits(corpus, tmp_path):
    output = tmp_path / "preempted"
    process = _start_and_wait_for_steps(_args(corpus, output, "--max_steps", 40, "--save_steps", 100), output, 3,
                                        stderr=subprocess.PIPE, text=True)
    metrics = output / "metrics.jsonl"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-3000:]
    assert "stopped by signal SIGTERM" in stderr
    from recipes.training.checkpointing import complete_checkpoints, read_trainer_state

    steps = [r["step"] for r in read_jsonl(metrics)]
    (last,) = complete_checkpoints(output)
    assert read_trainer_state(last)["global_step"] == steps[-1] < 40
    assert not (output / "final_model").exists()


@pytest.fixture()
def in_process():
    """Run the recipe in this process (accelerate's singleton state is reset after each run)."""
    return run_in_process


def test_data_path_without_shards_exits_with_a_clear_error(corpus, tmp_path):
    empty = tmp_path / "empty_corpus"
    empty.mkdir()
    (empty / "README.md").write_text("---\nconfigs: []\n---\n")
    result = _pretrain(["--config", TINY, "--dataset_name_or_path", str(empty), "--output_dir", str(tmp_path / "out")])
    assert result.returncode != 0
    assert f"FileNotFoundError: dataset folder {empty} holds no data shards" in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_resuming_a_checkpoint_of_another_model_fails_before_training(corpus, tmp_path, trained, in_process):
    with pytest.raises(ValueError, match="was written for a different model config; text_config.hidden_size: "
                                         "checkpoint 64, this run 32"):
        in_process(_args(corpus, tmp_path / "out", "--max_steps", 24, "--resume_from_checkpoint",
                         trained / "checkpoints" / "step-00000024", "--model_preset_kwargs", '{"hidden_size": 32}'))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match="written by stage 'pretrain', this run is stage 'full'"):
        in_process(_args(corpus, tmp_path / "out", "--max_steps", 24, "--resume_from_checkpoint",
                         trained / "checkpoints" / "step-00000024", "--stage", "full"))
    with pytest.raises(FileNotFoundError, match="is not a finished checkpoint"):
        in_process(_args(corpus, tmp_path / "out", "--resume_from_checkpoint", tmp_path))


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_a_truncated_shard_is_named_before_training(corpus, tmp_path, in_process, streaming):
    import shutil

    folder = tmp_path / "truncated_corpus"
    shutil.copytree(corpus[0], folder)
    shard = sorted((folder / "data" / corpus[1]).glob("*.parquet"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # as an interrupted copy leaves it
    with pytest.raises(ValueError, match=f"data shard {shard} is not a readable parquet file"):
        in_process(_args((str(folder), corpus[1]), tmp_path / "out", "--streaming", streaming, "--max_steps", 2))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_streaming_needs_max_steps(corpus, tmp_path, in_process):
    with pytest.raises(ValueError, match="streaming=True needs max_steps > 0"):
        in_process(_args(corpus, tmp_path / "out", "--streaming", "true"))


def test_an_fsdp_accelerate_config_on_cpu_says_the_run_is_not_sharded(corpus, tmp_path, in_process, monkeypatch,
                                                                        caplog):
    """`accelerate launch --config_file recipes/accelerate/fsdp2_1gpu.yaml` on a CPU: accelerate drops FSDP without a
    word; the recipe says so and names the CPU way to shard."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch exports for that yaml
    with caplog.at_level(logging.WARNING, logger="recipes"):
        in_process(_args(corpus, tmp_path / "out", "--max_steps", 1, "--save_final_model", "false",
                         "--save_final_checkpoint", "false"))
    (message,) = [r.getMessage() for r in caplog.records if "asks for FSDP" in r.getMessage()]
    assert "does not apply it on a CPU: this run is not sharded" in message and "--cpu_fsdp true" in message
    assert read_jsonl(tmp_path / "out" / "metrics.jsonl")[0]["step"] == 1  # and it trains


def test_trackio_tracker_logs_every_step_to_trackio_dir(corpus, tmp_path, in_process, monkeypatch):
    import sqlite3

    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    output = tmp_path / "tracked"
    in_process(_args(corpus, output, "--max_steps", 2, "--save_final_model", "false", "--save_final_checkpoint",
                     "false")[:-2] + ["--report_to", "trackio"])
    (database,) = (tmp_path / "trackio").glob("*.db")
    rows = sqlite3.connect(database).execute("select step, metrics from metrics order by step").fetchall()
    logged = [(step, json.loads(payload)) for step, payload in rows]
    expected = read_jsonl(output / "metrics.jsonl")
    assert [step for step, _ in logged] == [1, 2]
    for (_, values), record in zip(logged, expected):
        assert values["train/loss"] == pytest.approx(record["loss"]) and values["train/lr"] == record["lr"]


@pytest.fixture(scope="module")
def corpus_with_a_corrupt_image(tmp_path_factory, processor):
    """The toy corpus with the second image of the first pack replaced by bytes that are no image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recipes.training.toy_corpus import write_toy_corpus

    folder = tmp_path_factory.mktemp("corrupt_corpus")
    name = write_toy_corpus(folder, processor, num_documents=64, capacity=256)
    shard = sorted((folder / "data" / name).glob("*.parquet"))[0]
    table = pq.read_table(shard)
    rows = table.to_pylist()
    rows[0]["images"][1] = {"bytes": b"\xff\xd8\xff not a jpeg", "path": None}
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), shard)
    return (str(folder), name), rows[0]["uids"][1]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_corrupt_image_costs_its_document_not_the_run(corpus_with_a_corrupt_image, tmp_path, in_process, caplog,
                                                        streaming):
    (corpus, bad_uid) = corpus_with_a_corrupt_image
    output = tmp_path / "run"
    extra = ("--streaming", "true", "--max_steps", 6) if streaming else ()
    with caplog.at_level("WARNING"):
        in_process(_args(corpus, output, "--save_final_model", "false", "--save_steps", 0, "--log_sample_uids", "true",
                         *extra))
    records = read_jsonl(output / "metrics.jsonl")
    assert sum(r["documents_dropped"] for r in records) == 1
    trained = [uid for record in read_jsonl(output / "samples.jsonl") for uid in record["uids"]]
    assert bad_uid not in trained and len(trained) == len(set(trained)) > 0  # samples.jsonl: what trained
    assert all(math.isfinite(r["loss"]) for r in records)
    assert f"(uid {bad_uid}) has an image that cannot be decoded" in caplog.text
    if not streaming:  # on request the same document stops the run, named
        with pytest.raises(ValueError, match=rf"\(uid {bad_uid}\) has an image that cannot be decoded"):
            in_process(_args(corpus, tmp_path / "strict", "--on_bad_document", "raise", "--save_final_model", "false"))


def _checkpoint_steps(output):
    from recipes.training.checkpointing import complete_checkpoints

    return [int(path.name.split("-")[1]) for path in complete_checkpoints(output)]


def test_an_output_dir_holds_one_run(corpus, tmp_path, in_process, caplog):
    """A fresh start over an earlier run's checkpoints is refused (pruning and --resume would mix the runs);
    resuming from an earlier checkpoint drops the later ones; a torn metrics line does not stop a resume."""
    output = tmp_path / "run"
    common = ("--save_final_model", "false", "--save_total_limit", 5, "--save_steps", 1)
    in_process(_args(corpus, output, "--max_steps", 4, *common))
    assert _checkpoint_steps(output) == [1, 2, 3, 4]
    first_run = (output / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(newest: step-00000004\); continue it "
                                         "with --resume, start over with --overwrite_output_dir"):
        in_process(_args(corpus, output, "--max_steps", 2, *common))
    assert (output / "metrics.jsonl").read_text() == first_run  # refused before anything was touched

    with open(output / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "loss": 1.2')  # the torn last write of a killed process
    with caplog.at_level("WARNING"):
        in_process(_args(corpus, output, "--max_steps", 4, *common, "--resume_from_checkpoint",
                         output / "checkpoints" / "step-00000002"))
    assert "metrics.jsonl line 5 is not valid JSON (an interrupted write?); ignoring it" in caplog.text
    assert "deleted step-00000003: this run continues from the earlier step 2" in caplog.text
    assert [r["step"] for r in read_jsonl(output / "metrics.jsonl")] == [1, 2, 3, 4]
    assert _checkpoint_steps(output) == [1, 2, 3, 4]  # 3 and 4 written anew by the continuation

    in_process(_args(corpus, output, "--max_steps", 2, *common[:-2], "--save_total_limit", 1,
                     "--overwrite_output_dir", "true"))
    assert _checkpoint_steps(output) == [2]  # the earlier run's 4 checkpoints are gone, this run's newest is kept
    assert [r["step"] for r in read_jsonl(output / "metrics.jsonl")] == [1, 2]


def test_collator_counts_reach_the_summary_from_dataloader_workers(corpus_with_a_corrupt_image, tmp_path,
                                                                    in_process):
    (corpus, _) = corpus_with_a_corrupt_image
    summaries = [in_process(_args(corpus, tmp_path / f"workers{n}", "--save_final_model", "false", "--save_steps", 0,
                                  "--save_final_checkpoint", "false", "--dataloader_num_workers", n))
                 for n in (0, 1)]
    packs = 0
    for summary in summaries:
        stats = summary["collator_stats"]
        assert stats["documents_dropped_bad_image"] == 1
        packs = packs or stats["documents"]
        assert stats["documents"] == packs > 0  # every kept document of the epoch, counted in either layout


def test_a_micro_batch_with_no_usable_document_trains_on_nothing(corpus_with_a_corrupt_image, tmp_path, in_process,
                                                                 caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (corpus, _) = corpus_with_a_corrupt_image
    folder = tmp_path / "hopeless_corpus"
    shutil.copytree(corpus[0], folder)
    shard = sorted((folder / "data" / corpus[1]).glob("*.parquet"))[0]
    table = pq.read_table(shard)
    rows = table.to_pylist()
    rows[0]["images"] = [{"bytes": b"no image", "path": None}] * len(rows[0]["images"])  # every document of pack 0
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), shard)
    output = tmp_path / "run"
    with caplog.at_level("WARNING"):
        in_process(_args((str(folder), corpus[1]), output, "--shuffle", "false", "--max_steps", 2,
                         "--per_device_train_batch_size", 1, "--save_final_model", "false", "--save_steps", 0))
    first, second = read_jsonl(output / "metrics.jsonl")
    assert first["documents_dropped"] == len(rows[0]["uids"]) and first["tokens"] == 0
    assert first["supervised_tokens"] == 0 and first["loss"] == 0.0 and first["grad_norm"] == 0.0
    assert second["documents_dropped"] == 0 and second["supervised_tokens"] > 0 and math.isfinite(second["loss"])
    assert "no document of this batch is usable, all were dropped" in caplog.text


def test_compiled_layers_train_like_eager_and_share_checkpoints(corpus, tmp_path, in_process, caplog, tiny_config):
    """--compile_layers: the same per-step losses as eager, and its checkpoint resumes an eager run."""
    common = ("--max_steps", 3, "--save_steps", 2, "--save_final_model", "false", "--log_sample_uids", "true")
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    in_process(_args(corpus, eager, *common))
    with caplog.at_level("INFO", logger="recipes.pretrain"):
        in_process(_args(corpus, compiled, *common, "--compile_layers", "true"))
    layers = tiny_config.vision_config.num_hidden_layers + tiny_config.text_config.num_hidden_layers
    assert f"compile_layers: {layers} layers compiled in place" in caplog.text
    expected, got = read_jsonl(eager / "metrics.jsonl"), read_jsonl(compiled / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3]
    for a, b in zip(expected, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    resumed = tmp_path / "resumed"
    in_process(_args(corpus, resumed, *common, "--resume_from_checkpoint", compiled / "checkpoints" / "step-00000002"))
    (last,) = read_jsonl(resumed / "metrics.jsonl")
    assert last["step"] == 3 and last["loss"] == pytest.approx(got[2]["loss"], rel=1e-4)


def test_streaming_corpus_trains_and_resumes_exactly(corpus, tmp_path, in_process):
    """streaming=True: the checkpoint's stream position continues with the next unseen packs."""
    streaming = ("--streaming", "true", "--max_steps", 5, "--save_steps", 2, "--save_total_limit", 5,
                 "--log_sample_uids", "true",
                 "--save_final_model", "false")
    whole = tmp_path / "whole"
    in_process(_args(corpus, whole, *streaming))
    resumed = tmp_path / "resumed"
    in_process(_args(corpus, resumed, *streaming, "--resume_from_checkpoint",
                     whole / "checkpoints" / "step-00000002"))
    expected, got = read_jsonl(whole / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in got] == [3, 4, 5]
    for a, b in zip(expected[2:], got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert read_jsonl(resumed / "samples.jsonl") == read_jsonl(whole / "samples.jsonl")[2:]
    first_five = [uid for r in read_jsonl(whole / "samples.jsonl") for uid in r["uids"]]
    assert len(first_five) == len(set(first_five))  # 5 of the 15 packs: nothing twice


def test_cpu_runs_keep_freed_memory_and_name_emulated_bf16(corpus, tmp_path, in_process, caplog, monkeypatch):
    from recipes import cpu_runtime

    monkeypatch.setattr(cpu_runtime, "cpu_has_native_bf16", lambda: False)  # as on an AVX2-only CPU
    with caplog.at_level("INFO", logger="recipes.cpu_runtime"):
        in_process(_args(corpus, tmp_path / "run", "--max_steps", 1, "--mixed_precision", "bf16",
                         "--save_final_model", "false", "--save_final_checkpoint", "false"))
    messages = [r.getMessage() for r in caplog.records if r.name == "recipes.cpu_runtime"]
    if sys.platform.startswith("linux"):
        assert any("stay in the heap for reuse" in m for m in messages)
    assert any("without native bf16" in m and "--mixed_precision no" in m for m in messages)
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 1
