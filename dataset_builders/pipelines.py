"""The stage graphs (score, select, reshard) and the executor switch: local (default), Slurm or Ray.

Every stage is a list of datatrove steps run by a datatrove executor; the same list runs under
``LocalPipelineExecutor``, ``SlurmPipelineExecutor`` or ``RayPipelineExecutor``. Tasks are shards: one task per
input shard for score and select, one per output shard for reshard, so a rerun skips completed shards and a task
killed midway is redone from its start (outputs are written atomically under deterministic names, so the redo
gives the same files). Each stage keeps its datatrove logs, stats and completion markers in
``<output>/.datatrove/<stage>``, plus ``accounting.json`` (read = kept + dropped by reason) and the settings the
output was made with: once a task has completed, rerunning into the same folder with different settings is refused.
An output folder the stage reads from, or one holding shards (packs) the run does not make, is refused before anything
is written.
"""

from __future__ import annotations

import json
import keyword
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from datatrove.executor.base import PipelineExecutor
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.utils.logging import logger

from .accounting import FOLLOW_UP_SUFFIX, Accounting, collect, write_accounting
from .selection import SelectionRules, require_finalized, resolve_thresholds
from .shards import atomic_write, list_shards, open_folder, read_parquet
from .steps.decode import DecodeImages
from .steps.reader import WebDatasetReader
from .steps.reshard import ReshardWriter, output_stem, plan_reshard, write_plan
from .steps.score_writer import ScoreWriter
from .steps.scoring import BatchScorer
from .steps.select import SelectionFinalizer, ShardSelector, selection_accounting

EXECUTORS = ("local", "slurm", "ray")
STAGE_SETTINGS = "settings.json"
# Columns of every score file (uid, key) and names every --where has (width, height): no score column may be one.
RESERVED_SCORE_COLUMNS = ("uid", "key", "width", "height")


@dataclass
class ExecutorConfig:
    """Where and how a stage's tasks run.

    ``tasks``: number of datatrove tasks (None: one per shard, the finest restart granularity). ``workers``: tasks
    run at once (local processes, Ray or Slurm array slots). Slurm needs ``partition``; ``time``, ``cpus_per_task``,
    ``mem_per_cpu_gb``, ``gpus_per_task``, ``venv_path`` / ``env_command`` and ``sbatch_args`` are passed through.
    Ray connects to ``ray_address`` ("auto" for a running cluster; None starts a local Ray).
    """

    kind: str = "local"
    tasks: int | None = None
    workers: int = 1
    logging_dir: str | None = None
    skip_completed: bool = True
    partition: str | None = None
    time: str = "24:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: float = 2.0
    gpus_per_task: int = 0
    venv_path: str | None = None
    env_command: str | None = None
    sbatch_args: dict = field(default_factory=dict)
    ray_address: str | None = None

    def __post_init__(self):
        if self.kind not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {self.kind!r}")
        if self.kind == "slurm" and not self.partition:
            raise ValueError("the slurm executor needs a partition (--slurm-partition)")


def make_executor(pipeline: list, config: ExecutorConfig, tasks: int, logging_dir: str,
                  depends: PipelineExecutor | None = None, job_name: str = "open-qwen2vl-data") -> PipelineExecutor:
    """The datatrove executor of ``config.kind`` for ``pipeline`` with ``tasks`` tasks."""
    workers = max(1, min(config.workers, tasks)) if config.workers > 0 else tasks
    if config.kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir,
                                     skip_completed=config.skip_completed, depends=depends)
    if config.kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        return SlurmPipelineExecutor(
            pipeline, tasks=tasks, workers=config.workers if config.workers > 0 else -1, time=config.time,
            partition=config.partition, cpus_per_task=config.cpus_per_task, mem_per_cpu_gb=config.mem_per_cpu_gb,
            gpus_per_task=config.gpus_per_task, job_name=job_name, logging_dir=logging_dir,
            skip_completed=config.skip_completed, venv_path=config.venv_path, env_command=config.env_command,
            sbatch_args=config.sbatch_args or None, depends=depends,
        )
    from datatrove.executor.ray import RayPipelineExecutor

    return RayPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir,
                               skip_completed=config.skip_completed, cpus_per_task=config.cpus_per_task,
                               mem_per_cpu_gb=config.mem_per_cpu_gb, gpus_per_task=config.gpus_per_task,
                               depends=depends)


def _ensure_ray(config: ExecutorConfig) -> None:
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if config.ray_address:
            ray.init(address=config.ray_address)
        else:
            ray.init(num_cpus=max(config.workers * config.cpus_per_task, 1), include_dashboard=False)


def run_executor(executor: PipelineExecutor, config: ExecutorConfig) -> bool:
    """Run (or, for Slurm, submit) ``executor``. Returns True when the stage finished here and now; raises if a
    task failed."""
    if config.kind == "ray":
        _ensure_ray(config)
    executor.run()
    if config.kind == "slurm":
        logger.info("submitted to Slurm; when the jobs end: "
                    f"python -m dataset_builders stats {executor.logging_dir.path}")
        return False
    incomplete = executor.get_incomplete_ranks(skip_completed=True)
    if incomplete:
        raise RuntimeError(f"{len(incomplete)} task(s) did not complete (first: {incomplete[:5]}); see the logs in "
                           f"{executor.logging_dir.path}/logs; rerun the same command to redo only those")
    return True


def _stage_dir(output: str, stage: str, config: ExecutorConfig) -> str:
    return config.logging_dir or f"{output.rstrip('/')}/.datatrove/{stage}"


def completed_tasks(logging_dir: str) -> int:
    """Tasks datatrove marked completed in ``logging_dir`` (the ones a rerun skips)."""
    folder = get_datafolder(logging_dir)
    return len(folder.list_files("completions")) if folder.isdir("completions") else 0


def settings_differences(previous: dict, current: dict) -> list[str]:
    """``key: old -> new`` for each recorded setting that differs (as read back from JSON); two spellings of one
    local folder (relative, absolute, a trailing slash) are the same setting."""
    differences = []
    for key in sorted(set(previous) | set(current)):
        old, new = previous.get(key), current.get(key)
        if old == new or (isinstance(old, str) and isinstance(new, str) and _same_local_path(old, new)):
            continue
        if isinstance(old, dict) and isinstance(new, dict):  # nested settings (rules) by dotted name
            differences += [f"{key}.{difference}" for difference in settings_differences(old, new)]
        else:
            differences.append(f"{key}: {old!r} -> {new!r}")
    return differences


def _same_local_path(a: str, b: str) -> bool:
    if "://" in a or "://" in b or not (os.path.exists(a) and os.path.exists(b)):
        return False
    return os.path.realpath(a) == os.path.realpath(b)


def recorded_settings(logging_dir: DataFolderLike) -> dict | None:
    """The settings an earlier run recorded in ``logging_dir`` (None when none did)."""
    folder = get_datafolder(logging_dir)
    if not folder.exists(STAGE_SETTINGS):
        return None
    with folder.open(STAGE_SETTINGS, "rt") as handle:
        return json.load(handle)


def bind_settings(logging_dir: DataFolderLike, settings: dict, previous: dict | None, started: bool,
                  outputs: str = "", conflict: str = "holds a run with different settings",
                  elsewhere: str = "another output folder") -> None:
    """Record ``settings`` in ``logging_dir``, or refuse them: a rerun skips completed tasks, so it must not mix
    settings. ``previous``: what the folder recorded (``recorded_settings``); once ``started`` (some task of that run
    completed or wrote its output), other settings are refused, naming what changed; before that they replace the
    old ones (a run that failed on a mistyped --model binds nothing). ``outputs``: the files that run made, named in
    the error (deleting the logs alone would leave them behind); ``conflict`` and ``elsewhere`` word the error."""
    folder = get_datafolder(logging_dir)
    text = json.dumps(settings, sort_keys=True, default=str)
    if previous is not None:
        differences = settings_differences(previous, json.loads(text))
        if not differences:
            return
        if started:
            also = f" and {outputs}" if outputs else ""
            raise ValueError(f"{folder.path} {conflict} ({STAGE_SETTINGS}: {'; '.join(differences)}); use "
                             f"{elsewhere}, or delete that folder{also} to start over")
        logger.info(f"{folder.path}: no task of the earlier run completed; its settings are replaced")
    with atomic_write(folder, STAGE_SETTINGS, "wt") as handle:  # every rerun reads it back: never half-written
        handle.write(text)


def _check_settings(logging_dir: str, settings: dict, outputs: str = "") -> None:
    """``bind_settings`` for score, select and reshard: a run binds its settings once one of its tasks completed."""
    bind_settings(logging_dir, settings, recorded_settings(logging_dir), completed_tasks(logging_dir) > 0, outputs)


def _folder_identity(folder: DataFolderLike) -> tuple[str, str]:
    """(protocol, normalised path) of a folder: two spellings of one place (relative, trailing slash, symlink) are
    equal."""
    data_folder = open_folder(folder)
    protocol = data_folder.fs.protocol
    protocol = protocol if isinstance(protocol, str) else protocol[0]
    path = data_folder.path.rstrip("/") or "/"
    return protocol, os.path.realpath(path) if protocol in ("file", "local") else path


def refuse_writing_into_inputs(output_folder: DataFolderLike, inputs: dict[str, DataFolderLike | None]) -> None:
    """Refuse an output folder that is one of the folders the stage reads (``inputs``: option -> folder): its
    ``<shard>.parquet`` / ``<shard>.tar`` files would replace the input's (img2dataset metadata, scores, decisions,
    shards) while later tasks still read them. Raised before anything is written."""
    target = _folder_identity(output_folder)
    for option, folder in inputs.items():
        if folder is not None and _folder_identity(folder) == target:
            raise ValueError(f"the output folder {open_folder(output_folder).path} is the {option} folder: writing "
                             "there would overwrite the files this stage reads; choose another --output")


def refuse_unplanned_files(folder: DataFolderLike, patterns: tuple[str, ...], planned: set[str], resumed: bool,
                           logging_dir: str) -> None:
    """Refuse an output folder holding shard or pack files (``patterns``) this run does not write: left there by an
    earlier run (its logs deleted, or kept elsewhere), they would be loaded and published with the new corpus.
    ``resumed``: ``logging_dir`` records an earlier run of this plan, so files named as ``planned`` are its own
    (a rerun after an interruption completes them); otherwise no file there is this run's. Raised before anything
    is written."""
    data_folder = open_folder(folder)
    existing = sorted({name for pattern in patterns for name in data_folder.glob(pattern)})
    unexpected = [name for name in existing if not resumed or name not in planned]
    if not unexpected:
        return
    shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
    origin = ("this run does not write (left by an earlier run with other settings)" if resumed else
              f"not made by a run recorded in {get_datafolder(logging_dir).path}")
    raise ValueError(f"{data_folder.path} holds {len(unexpected)} file(s) {origin}: {shown}; they would be "
                     "published with the new ones. Delete them to start over, or use another output folder")


def _finish(logging_dir: str, finished: bool) -> Accounting | None:
    if not finished:
        return None
    accounting = collect(logging_dir)
    write_accounting(logging_dir, accounting)
    logger.info(accounting.summary())
    return accounting


def _shards_in(folder: str) -> list[str]:
    try:
        return list_shards(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _shard_count(folder: str) -> int:
    shards = list_shards(folder)
    if not shards:
        raise FileNotFoundError(f"no *.tar shards in {open_folder(folder).path}")
    return len(shards)


def check_score_columns(columns: Iterable[str]) -> None:
    """Refuse score column names that collide with the score file's own columns or --where's builtins, or that
    --where cannot name: checked before any sample is scored."""
    for name in columns:
        if name in RESERVED_SCORE_COLUMNS:
            raise ValueError(f"score column {name!r} is reserved (score files have uid and key columns, --where has "
                             "width and height); choose another name")
        if not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"score column {name!r} cannot be used in --where: use letters, digits and "
                             "underscores, not starting with a digit")


def score_pipeline(input_folder: str, output_folder: str, scorer: BatchScorer, missing_uid: str = "derive",
                   max_pixels: int | None = None) -> list:
    """reader -> decode -> scorer -> one score parquet per input shard."""
    decode = DecodeImages(max_pixels) if max_pixels else DecodeImages()
    info = {k: v for k, v in vars(scorer).items() if not k.startswith("_") and k != "stats"}
    return [
        WebDatasetReader(input_folder, missing_uid=missing_uid),
        decode,
        scorer,
        ScoreWriter(input_folder, output_folder, scorer.output_columns, info=info),
    ]


def run_score(input_folder: str, output_folder: str, scorer: BatchScorer, config: ExecutorConfig | None = None,
              missing_uid: str = "derive", max_pixels: int | None = None) -> Accounting | None:
    """Score every sample of ``input_folder``; returns the stage accounting (None when submitted to Slurm)."""
    config = config or ExecutorConfig()
    refuse_writing_into_inputs(output_folder, {"--input": input_folder})
    check_score_columns(scorer.output_columns)
    tasks = config.tasks or _shard_count(input_folder)
    logging_dir = _stage_dir(output_folder, "score", config)
    pipeline = score_pipeline(input_folder, output_folder, scorer, missing_uid, max_pixels)
    scorer_settings = {k: v for k, v in pipeline[-1].info.items() if k not in ("batch_size", "device")}
    _check_settings(logging_dir, {"stage": "score", "input": input_folder, "tasks": tasks,
                                  "missing_uid": missing_uid, "max_pixels": max_pixels, **scorer_settings},
                    outputs=f"the score files in {output_folder}")
    executor = make_executor(pipeline, config, tasks, logging_dir, job_name="score")
    return _finish(logging_dir, run_executor(executor, config))


def run_select(input_folder: str, output_folder: str, rules: SelectionRules, config: ExecutorConfig | None = None,
               metadata_source: str = "auto", missing_uid: str = "derive",
               dedup_uid: bool = True) -> Accounting | None:
    """Decide keep/drop for every sample; ``top()`` thresholds are resolved over the whole pool before any task
    runs, uid de-duplication runs after all of them. Returns the selection's accounting (from its files)."""
    config = config or ExecutorConfig()
    refuse_writing_into_inputs(output_folder, {"--input": input_folder,
                                               **{f"--scores {n}": f for n, f in rules.scores.items()},
                                               **{f"--selection {n}": f for n, f in rules.selections.items()}})
    rules.check_names()
    expression = rules.expression()  # parse errors surface before anything runs
    num_shards = _shard_count(input_folder)
    tasks = config.tasks or num_shards
    rules.check_where_names(input_folder)  # a mistyped name fails here, not in every task
    if expression is not None:  # a type error too: a task on an empty shard would never evaluate the rule
        expression.check_types(conditions=set(rules.uid_lists) | set(rules.selections))
    for folder in rules.selections.values():  # an unfinished selection has no uid de-duplication yet
        require_finalized(folder, num_shards)
    rules.thresholds = resolve_thresholds(rules, input_folder)
    for name, threshold in rules.thresholds.items():
        logger.info(f"{name} resolved to a threshold of {threshold:.6g}")
    logging_dir = _stage_dir(output_folder, "select", config)
    settings = {"stage": "select", "input": input_folder, "tasks": tasks, "metadata_source": metadata_source,
                "missing_uid": missing_uid, "rules": _rules_dict(rules),
                # marks of an earlier de-duplication stay in the decision files: turning it off must start over
                "dedup_uid": dedup_uid}
    _check_settings(logging_dir, settings, outputs=f"the decision files in {output_folder}")
    selector = make_executor([ShardSelector(input_folder, output_folder, rules, metadata_source, missing_uid)],
                             config, tasks, logging_dir, job_name="select")
    finalizer_config = ExecutorConfig(**{**asdict(config), "tasks": 1, "workers": 1, "logging_dir": None})
    finalizer = make_executor(
        [SelectionFinalizer(input_folder, output_folder, dedup_uid, info={**settings, "where": expression and
                                                                           expression.source})],
        finalizer_config, 1, f"{logging_dir}{FOLLOW_UP_SUFFIX}", depends=selector if config.kind != "ray" else None,
        job_name="select-finalize",
    )
    if config.kind == "ray":  # datatrove's Ray executor waits on dependencies in 2-minute sleeps: run in order
        run_executor(selector, config)
    # the finalizer always reruns: it is idempotent and must see every shard's latest decisions
    finalizer.skip_completed = False
    if not run_executor(finalizer, finalizer_config):
        return None
    accounting = selection_accounting(output_folder, list_shards(input_folder))
    write_accounting(logging_dir, accounting)
    logger.info(f"selection: {accounting.summary()}")
    return accounting


def _rules_dict(rules: SelectionRules) -> dict:
    data = asdict(rules)
    data["text"] = {k: v for k, v in asdict(rules.text).items() if k != "boilerplate_patterns"}
    return data


def run_reshard(input_folder: str, selection_folder: str, output_folder: str, config: ExecutorConfig | None = None,
                shard_size: int = 10_000, verify_images: str = "full",
                missing_uid: str = "derive") -> Accounting | None:
    """Copy the selected samples into shards of ``shard_size``; the plan is fixed once a task has completed or an
    output shard exists and checked on reruns (a changed selection is refused rather than mixed into half-written
    output). ``verify_images``: "full" decodes every image (what guarantees the corpus loads), "quick" only checks
    headers and truncation (faster; corrupt scan data gets through)."""
    config = config or ExecutorConfig()
    refuse_writing_into_inputs(output_folder, {"--input": input_folder, "--selection": selection_folder})
    logging_dir = _stage_dir(output_folder, "reshard", config)
    plan = plan_reshard(input_folder, selection_folder, shard_size)
    log_folder = get_datafolder(logging_dir)
    previous = None
    if log_folder.exists("plan.parquet"):
        with log_folder.open("plan.parquet", "rb") as handle:
            previous = read_parquet(handle)
    start_over = (f"use another output folder, or delete {log_folder.path} and the shards in "
                  f"{open_folder(output_folder).path} to start over")
    if previous is not None and not previous.equals(plan) and (completed_tasks(logging_dir)
                                                               or _shards_in(output_folder)):
        # a plan no output was made from yet (the earlier run failed before writing any shard) binds nothing
        raise ValueError(f"{output_folder} was resharded from a different selection or shard size; {start_over}")
    num_shards = -(-plan.num_rows // shard_size)
    stems = [output_stem(index, num_shards) for index in range(num_shards)]
    refuse_unplanned_files(output_folder, ("*.tar", "*.parquet"),
                           {f"{stem}.{ext}" for stem in stems for ext in ("tar", "parquet")},
                           resumed=previous is not None, logging_dir=logging_dir)
    if previous is None or not previous.equals(plan):
        with atomic_write(log_folder, "plan.parquet") as handle:  # read back by every rerun
            handle.write(write_plan(plan, shard_size))
    if num_shards == 0:
        logger.warning("the selection keeps no sample: nothing to reshard")
        accounting = Accounting()
        write_accounting(logging_dir, accounting)
        return accounting
    tasks = min(config.tasks or num_shards, num_shards)
    _check_settings(logging_dir, {"stage": "reshard", "input": input_folder, "selection": selection_folder,
                                  "shard_size": shard_size, "verify_images": verify_images, "tasks": tasks,
                                  "missing_uid": missing_uid}, outputs=f"the shards in {output_folder}")
    writer = ReshardWriter(input_folder, output_folder, log_folder.resolve_paths("plan.parquet"),
                           verify_images=verify_images, missing_uid=missing_uid)
    executor = make_executor([writer], config, tasks, logging_dir, job_name="reshard")
    return _finish(logging_dir, run_executor(executor, config))
