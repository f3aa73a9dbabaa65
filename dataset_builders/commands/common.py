"""Arguments shared by every stage: executor choice and its options."""

from __future__ import annotations

import argparse

from ..accounting import Accounting
from ..pipelines import EXECUTORS, ExecutorConfig


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad count must fail before any settings are recorded)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("execution (datatrove)")
    group.add_argument("--executor", choices=EXECUTORS, default="local",
                       help="local processes (default), a Slurm job array, or a Ray cluster")
    group.add_argument("--tasks", type=positive_int, default=None,
                       help="number of tasks (default: one per shard; a rerun skips completed tasks)")
    group.add_argument("--workers", type=positive_int, default=1, help="tasks run at the same time (default 1)")
    group.add_argument("--logging-dir", default=None,
                       help="datatrove logs, stats and completion markers (default: <output>/.datatrove/<stage>)")
    group.add_argument("--no-skip-completed", action="store_true", help="rerun tasks that already completed")
    resources = parser.add_argument_group("resources per task (slurm and ray)")
    resources.add_argument("--cpus-per-task", type=int, default=1)
    resources.add_argument("--mem-per-cpu-gb", type=float, default=2.0)
    resources.add_argument("--gpus-per-task", type=int, default=0)
    slurm = parser.add_argument_group("slurm (with --executor slurm)")
    slurm.add_argument("--slurm-partition", default=None)
    slurm.add_argument("--slurm-time", default="24:00:00", help="time limit per job (default 24:00:00)")
    slurm.add_argument("--slurm-venv", default=None, help="virtualenv to activate in the jobs")
    slurm.add_argument("--slurm-env-command", default=None, help="shell command run before each job")
    slurm.add_argument("--slurm-sbatch-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="extra #SBATCH option (repeatable), e.g. account=myproject")
    ray = parser.add_argument_group("ray (with --executor ray)")
    ray.add_argument("--ray-address", default=None,
                     help='address of a running Ray cluster ("auto"); default starts Ray locally')


def executor_config(args: argparse.Namespace) -> ExecutorConfig:
    sbatch = {}
    for item in args.slurm_sbatch_arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--slurm-sbatch-arg expects KEY=VALUE, got {item!r}")
        sbatch[key] = value
    return ExecutorConfig(
        kind=args.executor, tasks=args.tasks, workers=args.workers, logging_dir=args.logging_dir,
        skip_completed=not args.no_skip_completed, partition=args.slurm_partition, time=args.slurm_time,
        cpus_per_task=args.cpus_per_task, mem_per_cpu_gb=args.mem_per_cpu_gb, gpus_per_task=args.gpus_per_task,
        venv_path=args.slurm_venv, env_command=args.slurm_env_command, sbatch_args=sbatch,
        ray_address=args.ray_address,
    )


def parse_named(values: list[str], option: str) -> dict[str, str]:
    """``NAME=PATH`` pairs of a repeatable option."""
    named = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name.isidentifier():
            raise SystemExit(f"{option} expects NAME=PATH with NAME a valid identifier, got {value!r}")
        named[name] = path
    return named


def report(stage: str, accounting: Accounting | None) -> int:
    if accounting is None:
        print(f"{stage}: submitted")
        return 0
    print(f"{stage}: {accounting.summary()}")
    return 0 if accounting.balanced else 1
