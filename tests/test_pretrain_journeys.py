"""What a Trainer user tries with the tiny CPU config: trackers read back after a resume, options that must not be
silently ignored."""

import logging
import math
import sys
from pathlib import Path

import pytest

from recipes.training.run_logs import read_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures.pretrain_runs import pretrain_argv, run_in_process, toy_corpus  # noqa: E402

_main = run_in_process


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, processor):
    return toy_corpus(tmp_path_factory, processor, "journeys_corpus", num_documents=64)


def _args(corpus, output_dir, *extra) -> list[str]:
    return pretrain_argv(corpus, output_dir, "--save_final_model", "false", *extra)


def _tensorboard_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_tensorboard_after_a_resume_holds_each_step_once_with_the_resumed_values(corpus, tmp_path):
    """A resume from an earlier checkpoint (here with a longer run, so another schedule) replaces the abandoned
    steps in TensorBoard, as in metrics.jsonl, instead of showing both."""
    output = tmp_path / "run"
    common = ("--save_steps", 2, "--save_total_limit", 5, "--report_to", "tensorboard")
    _main(_args(corpus, output, "--max_steps", 4, *common))
    _main(_args(corpus, output, "--max_steps", 5, *common, "--resume_from_checkpoint",
                output / "checkpoints" / "step-00000002"))
    records = read_jsonl(output / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    for tag in ("lr", "loss"):
        logged = _tensorboard_scalars(output / "logs" / "run", f"train/{tag}")
        assert [step for step, _ in logged] == [1, 2, 3, 4, 5]
        assert [value for _, value in logged] == pytest.approx([r[tag] for r in records], rel=1e-6)


def test_streaming_says_shuffle_does_nothing_and_a_resume_may_turn_it_off(corpus, tmp_path, caplog):
    """shuffle defaults to True, which a stream cannot do and resume exactly: the run says so, and a resume that
    sets --shuffle false (to silence it) continues the same run."""
    streaming = ("--streaming", "true", "--max_steps", 3, "--save_steps", 1, "--save_total_limit", 5,
                 "--report_to", "none")
    whole = tmp_path / "whole"
    with caplog.at_level(logging.WARNING, logger="recipes.pretrain"):
        _main(_args(corpus, whole, *streaming))
    assert "streaming=True reads the packs in shard order: shuffle=True applies to map-style corpora" in caplog.text
    resumed = tmp_path / "resumed"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="recipes.pretrain"):
        _main(_args(corpus, resumed, *streaming, "--shuffle", "false", "--resume_from_checkpoint",
                    whole / "checkpoints" / "step-00000001"))
    assert "shuffle=True" not in caplog.text
    expected = [r["loss"] for r in read_jsonl(whole / "metrics.jsonl")][1:]
    assert [r["loss"] for r in read_jsonl(resumed / "metrics.jsonl")] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("key", ["model_name_or_path", "tokenizer_name_or_path"])
def test_a_missing_model_path_is_named_not_taken_for_a_hub_id(corpus, tmp_path, key):
    """A typo in a local path (e.g. the previous run's final_model for stage full) fails before the corpus is read,
    naming the key, instead of transformers' "Repo id must be in the form ..."."""
    missing = tmp_path / "earlier_run" / "final_model"
    with pytest.raises(FileNotFoundError, match=f"{key}={missing}: no such file or folder"):
        _main(_args(corpus, tmp_path / "out", "--max_steps", 1, "--stage", "full", f"--{key}", missing))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def _interval_figures(records: list[dict]) -> dict:
    """What a tracker should show for these steps, computed here from metrics.jsonl's per-step lines."""
    supervised = sum(r["supervised_tokens"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    return {"loss": sum(r["loss"] * r["supervised_tokens"] for r in records) / supervised,
            "tokens_per_s": sum(r["tokens"] for r in records) / seconds,
            "tokens": sum(r["tokens"] for r in records),
            "grad_norm": sum(r["grad_norm"] for r in records) / len(records),
            "lr": records[-1]["lr"]}


def _check_tracker_intervals(output: Path, intervals: dict[int, range]) -> None:
    records = {r["step"]: r for r in read_jsonl(output / "metrics.jsonl")}
    for tag in ("loss", "tokens_per_s", "tokens", "grad_norm", "lr"):
        logged = _tensorboard_scalars(output / "logs" / "run", f"train/{tag}")
        assert [step for step, _ in logged] == list(intervals), tag
        expected = [_interval_figures([records[s] for s in steps])[tag] for steps in intervals.values()]
        assert [value for _, value in logged] == pytest.approx(expected, rel=1e-5), tag


def test_trackers_get_the_figures_of_each_logging_interval_not_its_last_step(corpus, tmp_path):
    """With logging_steps=3 the loss shown at step 3 is that of steps 1-3 (as the Trainer's), tokens/s is over
    their time; the run's last step logs what is left."""
    output = tmp_path / "run"
    _main(_args(corpus, output, "--max_steps", 7, "--logging_steps", 3, "--report_to", "tensorboard"))
    _check_tracker_intervals(output, {3: range(1, 4), 6: range(4, 7), 7: range(7, 8)})


def test_a_resumed_run_logs_the_same_intervals_as_an_uninterrupted_one(corpus, tmp_path):
    """Resumed at step 2 inside the interval 1-3: step 3's log still covers steps 1-3 (1 and 2 from metrics.jsonl
    of the run before), not step 3 alone."""
    output = tmp_path / "run"
    common = ("--max_steps", 4, "--logging_steps", 3, "--save_steps", 2, "--save_total_limit", 5,
              "--report_to", "tensorboard")
    _main(_args(corpus, output, *common))
    _main(_args(corpus, output, *common, "--resume_from_checkpoint", output / "checkpoints" / "step-00000002"))
    _check_tracker_intervals(output, {3: range(1, 4), 4: range(4, 5)})


def test_a_fraction_of_an_epoch_stops_part_way_with_the_steps_rounded_up(corpus, tmp_path):
    """num_train_epochs takes a float, as the Trainer's: 0.3 epochs runs ceil(0.3 x the steps of one epoch)."""
    whole = _main(_args(corpus, tmp_path / "whole", "--report_to", "none"))["steps"]
    part = _main(_args(corpus, tmp_path / "part", "--report_to", "none", "--num_train_epochs", 0.3))
    assert whole > 3 and part["steps"] == math.ceil(0.3 * whole)
    assert part["last"]["epoch"] == pytest.approx(part["steps"] / whole, abs=1e-4)
