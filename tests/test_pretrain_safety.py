"""Pretraining refuses what it could not do as asked, before the first step, and survives what Slurm does to it:
signals to the whole process group, resumes with other settings or into another run's folder, a kill while deleting
a checkpoint, a corpus packed for other image tokens or longer packs, schedules that need arguments."""

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from recipes.training import checkpointing as ckpt
from recipes.training.run_logs import read_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures.pretrain_runs import ROOT, TINY, pretrain_argv, run_in_process, toy_corpus  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
_main = run_in_process


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, processor):
    return toy_corpus(tmp_path_factory, processor, "safety_corpus", num_documents=64)


def _args(corpus, output_dir, *extra) -> list[str]:
    return pretrain_argv(corpus, output_dir, "--report_to", "none", "--save_final_model", "false", *extra)


@pytest.fixture(scope="module")
def base_run(corpus, tmp_path_factory):
    """4 steps, checkpoints at steps 2 and 4."""
    output = tmp_path_factory.mktemp("safety_base") / "run"
    _main(_args(corpus, output, "--max_steps", 4, "--save_steps", 2, "--save_total_limit", 5))
    assert [p.name for p in ckpt.complete_checkpoints(output)] == ["step-00000002", "step-00000004"]
    return output


def _step(run: Path, step: int) -> Path:
    return ckpt.checkpoint_path(run, step)


# ---------------------------------------------------------------- 1. SIGTERM to the process group


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_dataloader_workers_checkpoints_and_exits(corpus, tmp_path):
    """Slurm signals every process of the job: DataLoader workers ignore it, the main process stops after the
    current step, writes a checkpoint and exits 143 (a worker killed by the signal used to crash the run)."""
    output = tmp_path / "preempted"
    process = subprocess.Popen([sys.executable, str(ROOT / "recipes" / "pretrain.py"),
                                *_args(corpus, output, "--max_steps", 40, "--save_steps", 100,
                                       "--dataloader_num_workers", 2)],
                               env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # its own process group, as a Slurm job step
    metrics = output / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be signalled"
    os.killpg(process.pid, signal.SIGTERM)  # main process and its DataLoader workers
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-3000:]
    assert "stopped by signal SIGTERM" in stderr and "killed by signal" not in stderr
    steps = [r["step"] for r in read_jsonl(metrics)]
    (last,) = ckpt.complete_checkpoints(output)
    assert ckpt.read_trainer_state(last)["global_step"] == steps[-1] < 40
    with pytest.raises(ProcessLookupError):  # no worker left behind
        os.killpg(process.pid, 0)


def test_dataloader_workers_ignore_the_stop_signals():
    from recipes.training.data import ignore_stop_signals

    previous = {name: signal.getsignal(getattr(signal, name)) for name in ("SIGTERM", "SIGUSR1")}
    try:
        ignore_stop_signals(0)
        assert all(signal.getsignal(getattr(signal, name)) is signal.SIG_IGN for name in previous)
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


# ---------------------------------------------------------------- 2. resuming with other settings


def test_resume_with_other_optimizer_and_run_settings_is_refused_naming_each(corpus, base_run, tmp_path,
                                                                              monkeypatch):
    from recipes.training import trainer

    def corpus_must_not_load(*args, **kwargs):
        raise AssertionError("the corpus was loaded before the settings were checked")

    monkeypatch.setattr(trainer, "load_packed_corpus", corpus_must_not_load)
    changed = ("--learning_rate", 1e-4, "--weight_decay", 0.5, "--adam_beta1", 0.8, "--adam_beta2", 0.95,
               "--adam_epsilon", 1e-6, "--gradient_accumulation_steps", 3, "--attention", "isolated",
               "--max_length", 1024, "--loss_reduction", "micro_batch_mean", "--seed", 1,
               "--lr_scheduler_type", "linear", "--warmup_ratio", 0.1, "--max_grad_norm", 0.5)
    with pytest.raises(ValueError, match="this run's settings differ from the checkpoint's run") as error:
        _main(_args(corpus, tmp_path / "out", "--max_steps", 4, "--resume_from_checkpoint", _step(base_run, 2),
                    *changed))
    message = str(error.value)
    for expected in ("learning_rate: 0.01 -> 0.0001", "weight_decay: 0.01 -> 0.5", "adam_beta1: 0.9 -> 0.8",
                     "adam_beta2: 0.999 -> 0.95", "adam_epsilon: 1e-08 -> 1e-06",
                     "gradient_accumulation_steps: 1 -> 3", "attention: 'faithful' -> 'isolated'",
                     "max_length: 512 -> 1024", "loss_reduction: 'token' -> 'micro_batch_mean'", "seed: 42 -> 1",
                     "lr_scheduler_type: 'cosine' -> 'linear'", "warmup_ratio: 0.03 -> 0.1",
                     "max_grad_norm: 1.0 -> 0.5"):
        assert expected in message, (expected, message)
    assert not (tmp_path / "out").exists()


def test_resume_with_another_global_micro_batch_is_refused_before_loading(corpus, base_run, tmp_path, monkeypatch):
    from recipes.training import trainer

    monkeypatch.setattr(trainer, "load_packed_corpus", None)  # would fail if reached
    with pytest.raises(ValueError, match=r"processes x per_device_train_batch_size: 1 x 1 -> 1 x 2 \(a global "
                                         r"micro-batch of 1 packs is needed\)"):
        _main(_args(corpus, tmp_path / "out", "--max_steps", 4, "--resume_from_checkpoint", _step(base_run, 2),
                    "--per_device_train_batch_size", 2))


def test_resume_with_settings_that_may_change_continues_exactly(corpus, base_run, tmp_path):
    """Where and how often to write, workers and sample logging may change: the same losses as the base run."""
    output = tmp_path / "moved"
    _main(_args(corpus, output, "--max_steps", 4, "--resume_from_checkpoint", _step(base_run, 2),
                "--save_steps", 1, "--save_total_limit", 1, "--logging_steps", 3, "--dataloader_num_workers", 1,
                "--log_sample_uids", "true", "--run_name", "other"))
    expected, got = read_jsonl(base_run / "metrics.jsonl")[2:], read_jsonl(output / "metrics.jsonl")
    assert [r["step"] for r in got] == [3, 4]
    for a, b in zip(expected, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["lr"] == a["lr"]


def test_unit_check_same_run_allows_more_processes_with_the_same_global_micro_batch():
    state = {"world_size": 2, "per_device_train_batch_size": 2, "config": {"learning_rate": 0.01}}
    ckpt.check_same_run("ckpt", state, {"learning_rate": 0.01, "per_device_train_batch_size": 1}, world_size=4)
    with pytest.raises(ValueError, match=r"2 x 2 -> 4 x 2"):
        ckpt.check_same_run("ckpt", state, {"learning_rate": 0.01, "per_device_train_batch_size": 2}, world_size=4)
    streaming = dict(state, config={"streaming": True})  # a streaming position: the same processes and batch
    with pytest.raises(ValueError, match=r"2 x 2 -> 4 x 1"):
        ckpt.check_same_run("ckpt", streaming, {"streaming": True, "per_device_train_batch_size": 1}, world_size=4)
    ckpt.check_same_run("ckpt", {}, {"learning_rate": 1.0}, world_size=1)  # a checkpoint that recorded nothing


# ---------------------------------------------------------------- 3. one run per output folder


def test_resuming_from_elsewhere_into_another_runs_folder_is_refused(corpus, base_run, tmp_path):
    output = tmp_path / "mixed"
    (output / "checkpoints").mkdir(parents=True)
    other = output / "checkpoints" / "step-00000016"
    shutil.copytree(_step(base_run, 4), other)  # another run's checkpoint
    with pytest.raises(ValueError, match=r"holds checkpoints of another run \(newest: step-00000016\), and this run "
                                         r"resumes from .*step-00000002, outside it"):
        _main(_args(corpus, output, "--max_steps", 3, "--save_steps", 0, "--resume_from_checkpoint",
                    _step(base_run, 2)))
    assert other.is_dir() and not (output / "metrics.jsonl").exists()
    # --overwrite_output_dir deletes the other run's checkpoints; this run's are the folder's only ones.
    _main(_args(corpus, output, "--max_steps", 3, "--save_steps", 0, "--resume_from_checkpoint", _step(base_run, 2),
                "--overwrite_output_dir", "true"))
    assert [p.name for p in ckpt.complete_checkpoints(output)] == ["step-00000003"]


def test_a_checkpoint_past_the_last_step_of_the_run_is_refused(corpus, base_run, tmp_path):
    requeued = tmp_path / "requeued"  # --resume picks the folder's newest checkpoint
    shutil.copytree(base_run / "checkpoints", requeued / "checkpoints")
    for output, resume in ((requeued, ("--resume", "true")),
                           (tmp_path / "fresh", ("--resume_from_checkpoint", _step(base_run, 4)))):
        with pytest.raises(ValueError, match=r"is at step 4, past this run's 3 steps in all \(max_steps=3"):
            _main(_args(corpus, output, "--max_steps", 3, *resume))
        assert not (output / "metrics.jsonl").exists()


# ---------------------------------------------------------------- 4. model overrides on a loaded checkpoint


def test_feature_layer_and_activation_apply_to_a_loaded_checkpoint(tmp_path, tiny_config):
    from transformers import SiglipVisionModel

    from modeling_open_qwen2vl import OpenQwen2VLForConditionalGeneration
    from recipes.training.arguments import ModelArguments
    from recipes.training.model_setup import build_model

    torch.manual_seed(0)
    source = OpenQwen2VLForConditionalGeneration(tiny_config)
    source.save_pretrained(tmp_path / "kit")
    assert tiny_config.vision_feature_layer == -2 and tiny_config.vision_config.hidden_act == "gelu"
    model = build_model(ModelArguments(model_name_or_path=str(tmp_path / "kit"), num_image_tokens=16,
                                       vision_feature_layer=-1, vision_hidden_act="gelu_pytorch_tanh"))
    assert model.config.vision_feature_layer == -1
    # Independently: transformers' own SigLIP tower with tanh GELU and the same weights, its last hidden state.
    vision_config = copy.deepcopy(tiny_config.vision_config)
    vision_config.hidden_act = "gelu_pytorch_tanh"
    reference = SiglipVisionModel(vision_config)
    reference.load_state_dict(source.model.vision_tower.state_dict())
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(pixels, output_hidden_states=True).hidden_states[-1]
        got = model.model.get_vision_features(pixels)
        default = source.model.get_vision_features(pixels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, default, atol=1e-3)
    # Unset, the activation is the source's own (a preset's too).
    kept = build_model(ModelArguments(model_name_or_path=str(tmp_path / "kit"), num_image_tokens=16))
    assert kept.config.vision_config.hidden_act == "gelu"
    preset = build_model(ModelArguments(model_preset="tiny", num_image_tokens=16, vision_hidden_act="relu"))
    assert preset.config.vision_config.hidden_act == "relu"


def test_resuming_with_another_activation_is_refused(tiny_config):
    from modeling_open_qwen2vl import OpenQwen2VLConfig

    state = {"architecture": ckpt.architecture(tiny_config), "stage": "pretrain"}
    other = OpenQwen2VLConfig.tiny()
    other.vision_config.hidden_act = "gelu_pytorch_tanh"
    with pytest.raises(ValueError, match="vision_config.hidden_act: checkpoint 'gelu', this run 'gelu_pytorch_tanh'"):
        ckpt.check_resumable("ckpt", state, model_config=other, stage="pretrain")
    older = {"architecture": {k: v for k, v in state["architecture"].items() if "hidden_act" not in k},
             "stage": "pretrain"}
    ckpt.check_resumable("ckpt", older, model_config=tiny_config, stage="pretrain")  # recorded before: fine


# ---------------------------------------------------------------- 5. learning-rate schedules


def _parse(*extra):
    from recipes.training.arguments import parse_pretrain_args

    return parse_pretrain_args(["--config", TINY, "--dataset_name_or_path", "corpus", *map(str, extra)])[2]


@pytest.mark.parametrize("extra, message", [
    (("--lr_scheduler_type", "cosin"), r"lr_scheduler_type='cosin' is not one of .* \(did you mean cosine"),
    (("--lr_scheduler_type", "reduce_lr_on_plateau"), "steps on an evaluation metric, which pretraining does not"),
    (("--lr_scheduler_type", "greedy"), "steps on an evaluation metric"),
    (("--lr_scheduler_type", "cosine_with_min_lr"), r"lr_scheduler_kwargs=\{\} do not fit lr_scheduler_type="
                                                    r"'cosine_with_min_lr': One of min_lr or min_lr_rate"),
    (("--lr_scheduler_type", "warmup_stable_decay"), "missing 1 required positional argument: 'num_decay_steps'"),
    (("--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}'), r"do not fit lr_scheduler_type='cosine': .*min_lr_rate"),
    (("--lr_scheduler_kwargs", "{min_lr_rate: 0.1}"), "lr_scheduler_kwargs is not valid JSON"),
    (("--lr_scheduler_kwargs", "[1]"), "lr_scheduler_kwargs must be a JSON object"),
    (("--lr_scheduler_type", "constant"), "'constant' has no warmup, so warmup_ratio=0.03"),
    (("--lr_scheduler_type", "constant_with_warmup", "--lr_scheduler_kwargs", '{"a": 1}'), "takes no lr_scheduler_k"),
    # Bad values that the schedule's first (warmup) step does not read: refused now, not once the warmup is over.
    (("--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr_rate": "0.1"}'),
     r"do not fit lr_scheduler_type='cosine_with_min_lr': unsupported operand type\(s\) for -: 'int' and 'str'"),
    (("--lr_scheduler_type", "polynomial", "--lr_scheduler_kwargs", '{"power": "2"}'),
     r"do not fit lr_scheduler_type='polynomial': unsupported operand type\(s\) for \*\* or pow\(\)"),
])
def test_schedules_the_run_cannot_apply_are_refused_at_parse_time(extra, message):
    with pytest.raises(ValueError, match=message):
        _parse(*extra)


def test_schedule_arguments_from_the_command_line_or_yaml(tmp_path):
    args = _parse("--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}')
    assert args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    config = tmp_path / "wsd.yaml"
    config.write_text(Path(TINY).read_text() + "lr_scheduler_type: warmup_stable_decay\n"
                      "lr_scheduler_kwargs:\n  num_decay_steps: 2\n")
    from recipes.training.arguments import parse_pretrain_args

    args = parse_pretrain_args(["--config", str(config), "--dataset_name_or_path", "corpus"])[2]
    assert args.lr_scheduler_kwargs == {"num_decay_steps": 2}
    assert _parse().lr_scheduler_kwargs == {} and _parse("--lr_scheduler_type", "constant", "--warmup_ratio", 0)


def test_cosine_with_min_lr_trains_with_the_schedule_it_names(corpus, tmp_path):
    output = tmp_path / "min_lr"
    _main(_args(corpus, output, "--max_steps", 3, "--save_steps", 0, "--warmup_ratio", 0, "--lr_scheduler_type",
                "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr_rate": 0.5}'))
    # Independently: lr(t) = peak * (rate + (1 - rate) * (1 + cos(pi * t / T)) / 2), t = steps taken before.
    expected = [0.01 * (0.5 + 0.5 * (1 + math.cos(math.pi * t / 3)) / 2) for t in range(3)]
    assert [r["lr"] for r in read_jsonl(output / "metrics.jsonl")] == pytest.approx(expected, rel=1e-12)
    state = ckpt.read_trainer_state(_step(output, 3))
    assert state["config"]["lr_scheduler_kwargs"] == {"min_lr_rate": 0.5}


# ---------------------------------------------------------------- 6. deleting checkpoints


def _fake_checkpoint(output: Path, step: int) -> Path:
    path = ckpt.checkpoint_path(output, step)
    (path / ckpt.MODEL_OPTIMIZER).mkdir(parents=True)
    (path / ckpt.MODEL_OPTIMIZER / "__0_0.distcp").write_bytes(b"weights")
    (path / ckpt.STATE_FILE).write_text(json.dumps({"global_step": step}))
    return path


def test_a_kill_while_deleting_a_checkpoint_leaves_nothing_resumable(tmp_path, monkeypatch):
    """rmtree may reach trainer_state.json last: a kill midway must not leave a 'complete' gutted checkpoint that
    --resume picks and fails on at every requeue."""
    kept, doomed = _fake_checkpoint(tmp_path, 2), _fake_checkpoint(tmp_path, 6)
    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        if Path(path).exists():
            real_rmtree(Path(path) / ckpt.MODEL_OPTIMIZER)  # the shards go first ...
            raise KeyboardInterrupt  # ... and the job is killed

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.remove_checkpoints_after(tmp_path, 2)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    assert ckpt.latest_checkpoint(tmp_path) == kept and not doomed.exists()
    leftover = doomed.with_name(doomed.name + ".deleting")
    assert ckpt.remove_unfinished(tmp_path) == [leftover] and not leftover.exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [kept.name]


def test_save_total_limit_deletes_through_the_same_rename(tmp_path, monkeypatch):
    removed = []
    monkeypatch.setattr(ckpt, "remove_checkpoint", lambda path: removed.append(Path(path).name))
    for step in (1, 2):
        _fake_checkpoint(tmp_path, step)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ckpt.save_checkpoint(tmp_path, 3, model=model, optimizer=optimizer, scheduler=scheduler, trainer_state={},
                         data_state={}, is_main=True, save_total_limit=1)
    assert removed == ["step-00000001", "step-00000002"]


# ---------------------------------------------------------------- 7. a corpus packed for another run


def _first_packs(corpus, count=8):
    import datasets

    dataset = datasets.load_dataset(corpus[0], corpus[1], split="train")
    return dataset.select(range(min(count, len(dataset))))


def test_a_corpus_packed_for_other_image_tokens_is_refused_before_training(corpus, tmp_path):
    for streaming in ("false", "true"):
        with pytest.raises(ValueError, match=r"was packed for num_image_tokens=16 \(the lengths column of its first \d "
                                             r"packs\), this run uses num_image_tokens=64"):
            _main(_args(corpus, tmp_path / "out", "--num_image_tokens", 64, "--max_steps", 2, "--streaming",
                        streaming))
        assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_packs_longer_than_max_length_are_refused_naming_both(corpus, tmp_path):
    longest = max(sum(row["lengths"]) for row in _first_packs(corpus))
    assert 128 < longest <= 256
    with pytest.raises(ValueError, match=rf"holds packs of up to {longest} positions .*, over this run's "
                                         r"max_length=128"):
        _main(_args(corpus, tmp_path / "out", "--max_length", 128))


def test_packing_stats_are_checked_before_the_model_is_built(corpus, tmp_path, monkeypatch):
    from recipes.training import trainer

    folder = tmp_path / "packed_elsewhere"
    shutil.copytree(corpus[0], folder)
    stats = {"num_image_tokens": 16, "capacity": 4096}  # as `python -m dataset_builders pack` records them
    (folder / "data" / corpus[1] / "packing_stats.json").write_text(json.dumps(stats))
    monkeypatch.setattr(trainer, "build_model", None)  # would fail if reached
    with pytest.raises(ValueError, match=r"holds packs of up to 4096 positions \(its packing_stats.json\), over "
                                         r"this run's max_length=512"):
        _main(_args((str(folder), corpus[1]), tmp_path / "out"))
    (folder / "data" / corpus[1] / "packing_stats.json").write_text(json.dumps(dict(stats, num_image_tokens=144)))
    with pytest.raises(ValueError, match=r"packed for num_image_tokens=144 \(its packing_stats.json\), this run "
                                         r"uses num_image_tokens=16"):
        _main(_args((str(folder), corpus[1]), tmp_path / "out"))


def test_first_packs_without_lengths_or_from_another_tokenizer(processor):
    import datasets

    from dataset_builders.packed_collator import PackedCollator
    from recipes.training.data import check_first_packs

    collator = PackedCollator(processor, max_length=512)
    texts = [["a red circle", "a blue square with a longer caption"], ["a green triangle"]]
    ours = [[len(ids) for ids in collator.document_ids(row)] for row in texts]
    # Another (compatible) tokenizer: differences vary per document, no verdict on the image tokens.
    other = datasets.Dataset.from_dict({"texts": texts, "lengths": [[ours[0][0] + 1, ours[0][1] - 2], [ours[1][0]]]})
    check_first_packs(other, collator, "other", max_length=512)
    # No lengths column: the packs are measured with this run's tokenizer.
    bare = datasets.Dataset.from_dict({"texts": texts})
    check_first_packs(bare, collator, "bare", max_length=sum(ours[0]))
    with pytest.raises(ValueError, match=rf"up to {sum(ours[0])} positions \(its first 2 packs, tokenized by this "
                                         rf"run\), over this run's max_length={sum(ours[0]) - 1}"):
        check_first_packs(bare, collator, "bare", max_length=sum(ours[0]) - 1)
    # The same tokenizer: every document 48 positions longer than ours -> packed for 16 + 48 image tokens.
    packed_64 = datasets.Dataset.from_dict({"texts": texts, "lengths": [[n + 48 for n in row] for row in ours]})
    with pytest.raises(ValueError, match="packed for num_image_tokens=64 .* this run uses num_image_tokens=16"):
        check_first_packs(packed_64, collator, "packed_64", max_length=4096)


def test_a_resume_with_another_run_length_uses_the_new_schedule_from_its_first_step(corpus, tmp_path):
    """A finished 6-step cosine run continued to 9 steps: step 7 runs at the 9-step schedule's learning rate (the
    checkpoint's optimizer holds the 6-step schedule's, 0 at its end), as a 9-step run from scratch would."""
    schedule = ("--lr_scheduler_type", "cosine", "--warmup_ratio", 0, "--learning_rate", 0.01, "--save_steps", 0)
    _main(_args(corpus, tmp_path / "short", "--max_steps", 6, *schedule))
    _main(_args(corpus, tmp_path / "short", "--max_steps", 9, "--resume", *schedule))
    _main(_args(corpus, tmp_path / "long", "--max_steps", 9, *schedule))
    continued, uninterrupted = read_jsonl(tmp_path / "short" / "metrics.jsonl"), read_jsonl(tmp_path / "long" /
                                                                                              "metrics.jsonl")
    assert [r["step"] for r in continued] == list(range(1, 10))
    expected = [0.01 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 9)) for step in (7, 8, 9)]  # cosine, by hand
    assert [r["lr"] for r in continued[6:]] == pytest.approx(expected, rel=1e-6)
    assert [r["lr"] for r in uninterrupted[6:]] == pytest.approx(expected, rel=1e-6)
    assert continued[5]["lr"] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 5 / 6)), rel=1e-6)
