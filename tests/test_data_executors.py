"""The same stage pipelines under the three datatrove executors: local (2 workers), Slurm (through stand-in
sbatch/srun/scontrol that run the generated job script here), and Ray (a local Ray runtime)."""

import json
import os
import stat
import sys

import pytest

from dataset_builders.accounting import collect
from dataset_builders.pipelines import ExecutorConfig, make_executor, run_reshard, run_select
from dataset_builders.rules import ImageRules, TextRules
from dataset_builders.selection import SelectionRules
from dataset_builders.synthetic import write_clean_shards

RULES = dict(text=TextRules(min_words=5), image=ImageRules(min_side=40))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write_clean_shards(str(folder), num_shards=4, per_shard=8, seed=31)
    return str(folder)


@pytest.fixture(scope="module")
def local_result(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    selection = run_select(shards, str(out / "sel"), SelectionRules(**RULES), ExecutorConfig(workers=2))
    resharded = run_reshard(shards, str(out / "sel"), str(out / "corpus"), ExecutorConfig(workers=2), shard_size=6)
    return out, selection, resharded


def _files(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
            if not n.startswith((".", "_"))}


def test_local_executor_with_two_workers(local_result):
    out, selection, resharded = local_result
    assert selection.balanced and resharded.balanced and resharded.read == selection.kept > 0
    assert len([n for n in os.listdir(out / "corpus") if n.endswith(".tar")]) == -(-selection.kept // 6)


FAKE_SBATCH = """#!{python}
# Stand-in for sbatch: runs every array task of the job script now, in order, and reports a job id.
import os, re, subprocess, sys
script = sys.argv[-1]
text = open(script).read()
env = dict(os.environ, SLURM_NODELIST="localhost", SLURM_JOB_ID="4242")
for arg in sys.argv[1:-1]:
    if arg.startswith("--export=ALL,"):
        env.update(kv.split("=", 1) for kv in arg[len("--export=ALL,"):].split(","))
log = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sbatch.log"), "a")
log.write(" ".join(sys.argv[1:-1]) + "\\n" + text + "\\n")
log.flush()
array = re.search(r"#SBATCH --array=(\\d+)-(\\d+)", text)
for index in range(int(array.group(1)), int(array.group(2)) + 1) if array else [None]:
    if index is not None:
        env["SLURM_ARRAY_TASK_ID"] = str(index)
    # exit codes are logged, not raised: the test judges the outputs (a task that did not finish leaves no
    # completion marker and no output, and the comparison with the local run fails)
    code = subprocess.run(["bash", script], env=env, stdout=log, stderr=log).returncode
    log.write("array task %s exit code %d\\n" % (index, code))
print("Submitted batch job 4242")
"""
FAKE_SRUN = """#!/bin/bash
# Stand-in for srun: drop srun's options, run the command.
while [[ "$1" == -* ]]; do if [[ "$1" == "-n" ]]; then shift; fi; shift; done
exec "$@"
"""
FAKE_SCONTROL = "#!/bin/bash\necho localhost\n"


@pytest.mark.slow
def test_slurm_executor_job_scripts_run_the_same_pipeline(shards, local_result, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH.format(python=sys.executable)), ("srun", FAKE_SRUN),
                       ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)  # datatrove writes slurm_logs/ in the working directory
    config = ExecutorConfig(kind="slurm", partition="cpu", time="01:00:00", workers=2,
                            sbatch_args={"account": "kit"})
    out = tmp_path / "slurm"
    assert run_select(shards, str(out / "sel"), SelectionRules(**RULES), config) is None  # submitted, not awaited
    assert run_reshard(shards, str(out / "sel"), str(out / "corpus"), config, shard_size=6) is None
    local_out, selection, resharded = local_result
    assert _files(out / "sel") == _files(local_out / "sel")
    assert _files(out / "corpus") == _files(local_out / "corpus")
    log = (bin_dir / "sbatch.log").read_text()
    assert "#SBATCH --partition=cpu" in log and "#SBATCH --account=kit" in log and "#SBATCH --time=01:00:00" in log
    assert "#SBATCH --array=0-3%2" in log  # select: one task per input shard, 2 at a time
    assert "--dependency=afterok:4242" in log  # the finalizer waits for the per-shard job
    assert collect(str(out / "corpus" / ".datatrove" / "reshard")).to_dict() == resharded.to_dict()
    for stage in ("sel/.datatrove/select", "sel/.datatrove/select-finalize", "corpus/.datatrove/reshard"):
        completions = os.listdir(out / stage / "completions")
        assert len(completions) == json.loads((out / stage / "executor.json").read_text())["world_size"], stage


@pytest.mark.slow
def test_ray_executor_runs_the_same_pipeline(shards, local_result, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        config = ExecutorConfig(kind="ray", workers=2, mem_per_cpu_gb=0.5)
        out = tmp_path / "ray"
        selection = run_select(shards, str(out / "sel"), SelectionRules(**RULES), config)
        resharded = run_reshard(shards, str(out / "sel"), str(out / "corpus"), config, shard_size=6)
    finally:
        ray.shutdown()
    local_out, local_selection, local_resharded = local_result
    assert selection.to_dict() == local_selection.to_dict()
    assert resharded.to_dict() == local_resharded.to_dict()
    assert _files(out / "sel") == _files(local_out / "sel")
    assert _files(out / "corpus") == _files(local_out / "corpus")


def test_executor_config_validation():
    with pytest.raises(ValueError, match="executor must be one of"):
        ExecutorConfig(kind="kubernetes")
    with pytest.raises(ValueError, match="needs a partition"):
        ExecutorConfig(kind="slurm")
    executor = make_executor([], ExecutorConfig(workers=8), tasks=3, logging_dir="memory://logs")
    assert (executor.tasks, executor.workers) == (3, 3)
