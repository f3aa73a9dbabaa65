"""The demo's step runner: a failed step says which step, with what exit code and why (the end of the child's
stderr), main ends such a run with that one message, and --help numbers the steps as a run does.
No real demo step is run (the whole demo takes ~10 minutes): the commands are tiny inline scripts."""

import re
import sys

import pytest

import recipes.demo as demo
import recipes.demo_data as demo_data
from recipes.demo_steps import CommandError, DemoStepError, StepRunner, cause_lines, run_command

FAIL = "import sys; print('boom: no shards', file=sys.stderr); sys.exit(2)"


def _python(script: str) -> list[str]:
    return [sys.executable, "-c", script]


def test_failed_command_names_the_step_the_exit_code_and_the_cause(capsys):
    ran = []
    runner = StepRunner()
    runner.add("first step", lambda: ran.append("first"))
    runner.add("data stage: select", lambda: run_command(_python(FAIL)))
    runner.add("never reached", lambda: ran.append("third"))
    with pytest.raises(DemoStepError) as info:
        runner.run()
    message = str(info.value)
    assert message.startswith("demo step 2/3 'data stage: select' failed: command exited with code 2")
    assert "boom: no shards" in message
    assert isinstance(info.value.error, CommandError)
    assert (info.value.number, info.value.error.returncode, info.value.error.cause) == (2, 2, ["boom: no shards"])
    assert ran == ["first"]
    assert "boom: no shards" in capsys.readouterr().err  # the child's stderr was also shown as it came


def test_cause_is_the_last_meaningful_lines_without_progress_bars(capsys):
    script = "\n".join([
        "import sys",
        "for i in range(8): print(f'line {i}', file=sys.stderr)",
        r"sys.stderr.write('\r 40%|####      | 4/10 [00:00<00:00, 9.50it/s]\r100%|##########| 10/10 [00:01<00:00,"
        r" 9.50it/s]\n\n   \n')",
        r"sys.stderr.write('\r17it [00:02,  8.10it/s]\n\x1b[31mOSError: disk full\x1b[0m\n\n')",
        "sys.exit(3)",
    ])
    with pytest.raises(CommandError) as info:
        run_command(_python(script))
    assert info.value.returncode == 3
    assert info.value.cause == ["line 4", "line 5", "line 6", "line 7", "OSError: disk full"]
    assert "<inline script>" in str(info.value) and "import sys" not in str(info.value)


def test_cause_lines_of_a_traceback_end_with_the_exception():
    tail = "Traceback (most recent call last):\n  File \"x.py\", line 3, in <module>\n    main()\n" \
           "  File \"x.py\", line 2, in main\n    raise KeyError('summary')\nKeyError: 'summary'\n"
    assert cause_lines(tail, limit=2) == ["    raise KeyError('summary')", "KeyError: 'summary'"]
    assert cause_lines("\n \r\n") == []


def test_successful_command_raises_nothing():
    run_command(_python("import sys; print('only a warning', file=sys.stderr)"))


def test_in_process_failure_names_the_error_type():
    runner = StepRunner()
    runner.add("write the report", lambda: {}["summary"])
    with pytest.raises(DemoStepError, match=r"^demo step 1/1 'write the report' failed: KeyError: 'summary'$"):
        runner.run()


def _no_shards(folder, **kwargs) -> dict:
    return {"samples": 0, "shards": 0, "noise": 0}


def test_main_ends_a_failed_command_step_with_one_message(tmp_path, monkeypatch, capsys):
    commands = []

    def failing_command(args, **kwargs):
        commands.append(args)
        run_command(_python(FAIL))

    monkeypatch.setattr(demo_data, "write_caption_shards", _no_shards)
    monkeypatch.setattr(demo, "run_command", failing_command)
    assert demo.main(["--output", str(tmp_path / "out")]) == 1
    assert len(commands) == 1  # the run stopped at the failed step
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-3:]
    assert last[0].startswith(f"demo step 2/{len(demo.STEPS)} '{demo.STEPS['select']}' failed: command exited "
                              "with code 2: ")
    assert last[1:] == ["last lines of its stderr:", "  | boom: no shards"]


def test_main_ends_a_failed_in_process_step_with_its_traceback_then_the_message(tmp_path, monkeypatch, capsys):
    def disk_full(folder, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(demo_data, "write_caption_shards", disk_full)
    assert demo.main(["--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "in build_shards" in err and "recipes/demo_steps.py" not in err  # the step's frames, not the runner's
    assert err.rstrip().splitlines()[-1] == (f"demo step 1/{len(demo.STEPS)} '{demo.STEPS['shards']}' failed: "
                                             "OSError: disk full")


class Started(Exception):
    """Raised after the runner: main built its steps."""


def _help_steps(capsys) -> list[tuple[int, str]]:
    with pytest.raises(SystemExit) as info:
        demo.main(["--help"])
    assert info.value.code == 0
    return [(int(n), title) for n, title in re.findall(r"^  (\d+)\. (.+)$", capsys.readouterr().out, re.M)]


def test_help_numbers_the_steps_as_a_run_does(tmp_path, monkeypatch, capsys):
    listed = _help_steps(capsys)
    original_run = StepRunner.run

    def run_without_work(runner):
        runner.steps = [(title, lambda: None) for title, _ in runner.steps]
        original_run(runner)
        raise Started

    monkeypatch.setattr(StepRunner, "run", run_without_work)
    with pytest.raises(Started):
        demo.main(["--output", str(tmp_path / "out")])
    out = capsys.readouterr().out
    headers = re.findall(r"^=== \[(\d+)/(\d+)\] (?!done in )(.+)$", out, re.M)
    assert len(re.findall(r"^=== \[\d+/\d+\] done in ", out, re.M)) == len(listed)
    assert [(int(n), title) for n, _, title in headers] == listed
    assert {int(total) for _, total, _ in headers} == {len(listed)}
    assert listed[-1] == (len(demo.STEPS), demo.STEPS["report"])


def test_the_report_is_written_by_the_last_step(tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr(demo, "_report", lambda out, *args: written.append(out) or out / "report.md")

    def run_report_step_only(runner):
        title, func = runner.steps[-1]
        assert title == demo.STEPS["report"]
        func()
        raise Started

    monkeypatch.setattr(StepRunner, "run", run_report_step_only)
    with pytest.raises(Started):
        demo.main(["--output", str(tmp_path / "out")])
    assert written == [(tmp_path / "out").resolve()]


def test_the_report_reads_every_stage_s_files_by_their_writers_names(tmp_path, monkeypatch):
    """``_report`` on a folder laid out with the names the stages write (the data stages' accounting and packing
    statistics, the pretraining metrics, the SFT recipe's training log, the eval summary): every figure lands in
    report.md and both plots are written."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    import recipes.demo_report as demo_report
    from dataset_builders.accounting import PACKING_STATS_FILE
    from recipes.training.run_logs import METRICS_FILE, SFT_TRAINING_LOG

    plotted = {}
    plot_losses = demo_report.plot_losses
    monkeypatch.setattr(demo_report, "plot_losses",
                        lambda curves, path: plotted.update(curves) or plot_losses(curves, path))

    paths = {name: tmp_path / name for name in ("selection", "packed", "pretrain", "sft", "eval")}
    subset, config = tmp_path / "subset", "packed_16"
    for folder, stage, counts in ((paths["selection"], "select", (10, 8, 2)), (subset, "reshard", (8, 8, 0))):
        (folder / ".datatrove" / stage).mkdir(parents=True)
        read, kept, dropped = counts
        reasons = {"clip_score": dropped} if dropped else {}
        (folder / ".datatrove" / stage / "accounting.json").write_text(json.dumps(
            {"read": read, "kept": kept, "dropped": dropped, "dropped_by_reason": reasons}))
    (paths["packed"] / config).mkdir(parents=True)
    pq.write_table(pa.table({"lengths": [[10, 6], [12]]}), paths["packed"] / config / "00000.parquet")
    (paths["packed"] / config / PACKING_STATS_FILE).write_text(json.dumps(
        {"read": 8, "documents": 3, "packs": 2, "dropped": {"too_long": 5}}))
    paths["pretrain"].mkdir()
    (paths["pretrain"] / METRICS_FILE).write_text("".join(
        json.dumps({"step": s, "loss": 5.0 - s}) + "\n" for s in (1, 2, 3)))
    paths["sft"].mkdir()
    (paths["sft"] / SFT_TRAINING_LOG).write_text(json.dumps({"step": 2, "loss": 1.5}) + "\n"
                                                 + json.dumps({"step": 2, "train_runtime": 9.0}) + "\n")
    paths["eval"].mkdir()
    (paths["eval"] / "summary.json").write_text(json.dumps({"benchmarks": {"easy_vqa": {
        "accuracy": 0.671, "majority_baseline": 0.435, "chance_baseline": 0.25, "per_kind": {"shape": 0.8},
        "num_samples": 300}}}))
    answer = tmp_path / "answer.json"
    answer.write_text(json.dumps({"question": "What shape?", "answer": "triangle", "expected": "triangle"}))
    settings = {"capacity": 16, "pretrain_image_tokens": 4, "stage": "pretrain", "pretrain_epochs": 2,
                "sft_image_tokens": 16, "sft_steps": 2, "sft_batch": 4, "seed": 0}
    out = tmp_path / "out"
    out.mkdir()

    report = demo._report(out, paths, subset, config, settings, {"select": 1.0, "pack": 2.5}, answer).read_text()

    assert "| **tiny Open-Qwen2VL after the demo** | **67.1%** (+23.6 points) |" in report
    assert "| select | 10 | 8 | 2 | clip_score: 2 |" in report and "| reshard | 8 | 8 | 0 | - |" in report
    assert "| pack | 8 | 3 | 5 | too_long: 5 |" in report
    assert f"mean fill {100 * (16 + 12) / 32:.2f}%" in report  # (10 + 6) / 16 and 12 / 16
    assert "`triangle` (expected `triangle`)" in report and "Total: 4 s." in report
    assert list(plotted.values()) == [[(1, 4.0), (2, 3.0), (3, 2.0)], [(2, 1.5)]]  # SFT: records with a loss
    assert (out / "pack_fill.png").stat().st_size > 0 and (out / "loss_curves.png").stat().st_size > 0
