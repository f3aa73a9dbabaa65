"""Where a pretraining step's time goes: data wait, forward, backward, clipping, optimizer (GPU or CPU).

Run under the same launcher and arguments as the recipe:

    accelerate launch --config_file recipes/accelerate/fsdp2_1gpu.yaml bench/profile_pretrain_step.py \
        --config recipes/configs/pretrain_2b_random_init.yaml --dataset_name_or_path <corpus> --max_steps 12

It builds the recipe's own setup (``recipes.training.trainer._Setup``), runs ``max_steps`` steps timing each phase
(synchronising the device between phases), then profiles three more steps with ``torch.profiler`` and prints the
operators that took the most device (or CPU) time. A diagnostic for tuning, not a benchmark with a target.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from recipes.training.arguments import parse_pretrain_args  # noqa: E402
from recipes.training.fsdp import clip_grad_norm  # noqa: E402
from recipes.training.loss import summed_lm_loss, supervised_tokens  # noqa: E402
from recipes.training.trainer import _Setup, _to_device  # noqa: E402

WARMUP = 3
PROFILED_STEPS = 3


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _step(setup: _Setup, iterator, phases: dict | None) -> None:
    def mark(name: str, since: float) -> float:
        _sync()
        now = time.perf_counter()
        if phases is not None:
            phases[name].append(now - since)
        return now

    t = time.perf_counter()
    cpu_batch, _ = next(iterator)
    t = mark("data wait", t)
    batch = _to_device(cpu_batch, setup.accelerator.device)
    t = mark("host to device", t)
    loss_sum, _ = summed_lm_loss(setup.model, batch)
    t = mark("forward + loss", t)
    tokens = max(supervised_tokens(batch["labels"]), 1)
    setup.accelerator.backward(loss_sum / tokens)
    t = mark("backward", t)
    clip_grad_norm(setup.model.parameters(), setup.args.max_grad_norm)
    t = mark("clip grad norm", t)
    setup.optimizer.step()
    setup.scheduler.step()
    setup.optimizer.zero_grad(set_to_none=True)
    mark("optimizer step", t)


def main() -> None:
    setup = _Setup(parse_pretrain_args(sys.argv[1:]))
    setup.model.train()
    iterator = iter(setup.batches)
    phases: dict[str, list[float]] = defaultdict(list)
    for index in range(setup.total_steps):
        _step(setup, iterator, phases if index >= WARMUP else None)
    total = sum(statistics.median(v) for v in phases.values())
    print(f"\nmedian seconds per phase over {setup.total_steps - WARMUP} steps (device synchronised between phases):")
    for name, values in phases.items():
        median = statistics.median(values)
        print(f"  {name:16s} {median:8.4f} s  {median / total:6.1%}")
    print(f"  {'total':16s} {total:8.4f} s")

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(PROFILED_STEPS):
            _step(setup, iterator, None)
    sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=60))


if __name__ == "__main__":
    main()
