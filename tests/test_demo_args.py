"""recipes/demo.py up to its first step: option checks, the output-folder guard, --keep with other settings.
The steps themselves are not run (the whole demo takes ~10 minutes): StepRunner.run is replaced."""

import json
from pathlib import Path

import pytest

import recipes.demo as demo


class Started(Exception):
    """Raised instead of running the steps: main got past its checks."""


@pytest.fixture()
def started(monkeypatch):
    calls = []

    def run(runner):
        calls.append(runner)
        raise Started

    monkeypatch.setattr(demo.StepRunner, "run", run)
    return calls


def _refused(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        demo.main(argv)
    assert exit_info.value.code == 2  # argparse's usage error
    return capsys.readouterr().err


def _start(argv: list[str]) -> None:
    with pytest.raises(Started):
        demo.main(argv)


def test_folder_with_other_files_is_neither_deleted_nor_reused(tmp_path, capsys, started):
    model = tmp_path / "runs" / "pretrain_2b" / "model.safetensors"
    model.parent.mkdir(parents=True)
    model.write_text("weeks of training")
    for extra in ([], ["--keep"]):
        err = _refused(capsys, ["--output", str(tmp_path / "runs"), *extra])
        assert f"--output {tmp_path / 'runs'} is not empty and is not a demo output folder" in err
    assert model.read_text() == "weeks of training"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["pretrain_2b"]
    assert not started


def test_output_that_is_a_file_is_refused(tmp_path, capsys, started):
    (tmp_path / "notes.txt").write_text("x")
    assert "is a file, not a folder" in _refused(capsys, ["--output", str(tmp_path / "notes.txt")])
    assert (tmp_path / "notes.txt").read_text() == "x"


def test_demo_folder_and_empty_folder_start_fresh_with_a_marker(tmp_path, started):
    out = tmp_path / "out"
    out.mkdir()  # empty: allowed
    _start(["--output", str(out), "--seed", "3"])
    recorded = json.loads((out / demo.MARKER).read_text())
    assert recorded == {**demo.SETTINGS, "seed": 3}
    (out / "raw").mkdir()
    (out / "raw" / "old.tar").write_text("old")
    _start(["--output", str(out)])  # a demo folder (marker): deleted and started afresh
    assert sorted(p.name for p in out.iterdir()) == [demo.MARKER]
    assert json.loads((out / demo.MARKER).read_text())["seed"] == 0


def test_keep_with_other_data_settings_is_refused(tmp_path, capsys, started):
    out = tmp_path / "out"
    _start(["--output", str(out), "--seed", "0"])
    (out / "packed").mkdir()  # stands for the packs of the seed-0 data
    err = _refused(capsys, ["--output", str(out), "--keep", "--seed", "1"])
    assert "--keep: " in err and "(seed 0 -> 1)" in err and "run without --keep" in err
    assert json.loads((out / demo.MARKER).read_text())["seed"] == 0  # still describes what is on disk
    assert (out / "packed").is_dir()
    assert len(started) == 1


def test_keep_with_the_same_data_settings_reuses_the_folder(tmp_path, started):
    out = tmp_path / "out"
    _start(["--output", str(out), "--seed", "2"])
    (out / "packed").mkdir()
    _start(["--output", str(out), "--keep", "--seed", "2", "--sft-steps", "7"])  # training settings may change
    assert (out / "packed").is_dir()
    assert json.loads((out / demo.MARKER).read_text()) == {**demo.SETTINGS, "seed": 2, "sft_steps": 7}


@pytest.mark.parametrize("option, value", [
    ("--eval-limit", "0"), ("--eval-limit", "-5"), ("--sft-steps", "0"), ("--sft-steps", "-1"),
    ("--pretrain-epochs", "0"), ("--pretrain-epochs", "-2"),
])
def test_odd_counts_are_refused_up_front(tmp_path, capsys, started, option, value):
    err = _refused(capsys, ["--output", str(tmp_path / "out"), option, value])
    assert f"{option} must be >= 1, got {value}" in err
    assert not (tmp_path / "out").exists() and not started


def test_negative_seed_is_refused_up_front(tmp_path, capsys, started):
    assert "--seed must be in [0, 2**32), got -1" in _refused(capsys, ["--output", str(tmp_path / "o"), "--seed", "-1"])


@pytest.mark.parametrize("extra, expected", [([], None), (["--eval-limit", "1"], "1")])
def test_eval_limit_reaches_the_eval_command(tmp_path, monkeypatch, extra, expected):
    commands = []
    monkeypatch.setattr(demo, "run_command", lambda args, **kwargs: commands.append(args))

    def run_eval_step_only(runner):
        (step,) = [func for title, func in runner.steps if title.startswith("evaluate")]
        step()
        raise Started

    monkeypatch.setattr(demo.StepRunner, "run", run_eval_step_only)
    _start(["--output", str(tmp_path / "out"), *extra])
    (command,) = commands
    assert command[1] == str(demo.RECIPES_DIR / "eval.py")
    assert (command[command.index("--limit") + 1] if "--limit" in command else None) == expected


def test_steps_find_the_kits_scripts_and_configs_from_any_working_folder(tmp_path, monkeypatch):
    """Run from another folder, every script and config a step names is an existing file of the kit (they were
    paths relative to the working folder), while the default output stays demo_output/ in the working folder."""
    commands = []
    monkeypatch.setattr(demo, "run_command", lambda args, **kwargs: commands.append(args))

    def run_command_steps_only(runner):
        for title, func in runner.steps:
            if title in (demo.STEPS[name] for name in ("select", "reshard", "pack", "pretrain", "sft", "eval")):
                func()
        raise Started

    monkeypatch.setattr(demo.StepRunner, "run", run_command_steps_only)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _start([])
    assert (elsewhere / "demo_output" / demo.MARKER).is_file()
    named = [arg for command in commands for arg in command if arg.endswith((".py", ".yaml"))]
    assert len(named) == 5  # pretrain.py and its config, sft.py and its config, eval.py
    for arg in named:
        assert Path(arg).is_absolute() and Path(arg).is_file(), arg
        assert Path(arg).resolve().is_relative_to(Path(demo.__file__).resolve().parent), arg


@pytest.mark.parametrize("omp", [None, "1"])
def test_accelerate_launch_runs_with_accelerates_default_threads_and_no_warning(tmp_path, monkeypatch, omp):
    """The demo's launches pass the CPU thread count accelerate would choose itself (OMP_NUM_THREADS, else the
    physical cores), so the launcher no longer warns that it picked a default."""
    import os
    import subprocess

    import psutil

    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    script = tmp_path / "threads.py"
    script.write_text("import torch; print(torch.get_num_threads())\n")
    result = subprocess.run(demo.accelerate_launch(str(script), []), capture_output=True, text=True, timeout=300,
                            env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-2000:]
    expected = int(omp) if omp else psutil.cpu_count(logical=False)
    assert int(result.stdout.split()[-1]) == expected
    assert "were not passed to `accelerate launch`" not in result.stderr
