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
