"""A tiny step runner for the demo: numbered steps with timing, and a clear message naming the step that failed."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable


class DemoStepError(RuntimeError):
    """Raised when a demo step fails; the message names the step and the reason."""


@dataclass
class StepRunner:
    steps: list[tuple[str, Callable[[], object]]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, title: str, func: Callable[[], object]) -> None:
        self.steps.append((title, func))

    def run(self) -> None:
        total = len(self.steps)
        for number, (title, func) in enumerate(self.steps, start=1):
            print(f"\n=== [{number}/{total}] {title}", flush=True)
            start = time.perf_counter()
            try:
                func()
            except Exception as err:  # noqa: BLE001 - re-raised with the step's name
                raise DemoStepError(f"demo step {number}/{total} '{title}' failed: {err}") from err
            self.timings[title] = time.perf_counter() - start
            print(f"=== [{number}/{total}] done in {self.timings[title]:.1f}s", flush=True)


def run_command(args: list[str], env: dict | None = None, cwd: str | None = None) -> None:
    """Run a child process with live output; a non-zero exit becomes an error naming the command."""
    shown = [a if i != 2 or args[1] != "-c" else "<inline script>" for i, a in enumerate(args)]
    print("$ " + " ".join(shown), flush=True)
    result = subprocess.run(args, env=env, cwd=cwd)
    if result.returncode != 0:
        raise RuntimeError(f"command exited with code {result.returncode}: {' '.join(args[:4])} ...")


PYTHON = sys.executable
