"""A tiny step runner for the demo: numbered steps with timing, and a clear message naming the step that failed
and why (for a child process, the last lines of its stderr)."""

from __future__ import annotations

import codecs
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Callable

# How many lines of a failed child's stderr the error carries, and how much of its stderr is kept to find them.
CAUSE_LINES = 5
TAIL_BYTES = 64 * 1024
# After the child exits, wait this long for its stderr to close: a grandchild it left behind may hold the pipe open.
DRAIN_SECONDS = 10.0
# The failure message names the command up to this length (the full one is echoed when the step starts).
COMMAND_CHARS = 160

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# tqdm bars ("45%|####  | 9/20 [00:01<00:02, 5.1it/s]", "120it [00:03, 40.2it/s]"): progress, never a cause.
_PROGRESS = re.compile(r"\d+%\|.*\||[\d.]+\s*(it|s|ex|examples|ba|B|kB|MB|GB)/(s|it)\]?\s*$|\d+it \[")


class CommandError(RuntimeError):
    """A child process exited non-zero; ``cause`` holds the last meaningful lines of its stderr."""

    def __init__(self, command: str, returncode: int, cause: list[str]) -> None:
        self.command, self.returncode, self.cause = command, returncode, cause
        message = f"command exited with code {returncode}: {command}"
        if cause:
            message += "\nlast lines of its stderr:\n" + "\n".join(f"  | {line}" for line in cause)
        super().__init__(message)


class DemoStepError(RuntimeError):
    """Raised when a demo step fails; the message names the step (number and title) and the reason."""

    def __init__(self, number: int, total: int, title: str, error: BaseException) -> None:
        self.number, self.total, self.title, self.error = number, total, title, error
        # A command's message already says what happened; an in-process error needs its type ("KeyError: 'x'").
        reason = str(error) if isinstance(error, CommandError) else f"{type(error).__name__}: {error}"
        super().__init__(f"demo step {number}/{total} '{title}' failed: {reason}")


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
                raise DemoStepError(number, total, title, err) from err
            self.timings[title] = time.perf_counter() - start
            print(f"=== [{number}/{total}] done in {self.timings[title]:.1f}s", flush=True)


def cause_lines(stderr_tail: str, limit: int = CAUSE_LINES) -> list[str]:
    """The last ``limit`` meaningful lines of a child's stderr: no blank lines, colour codes or progress bars.

    tqdm redraws its bar with carriage returns, so each ``\\r`` also ends a line."""
    lines = [_ANSI.sub("", line).rstrip() for line in re.split(r"\r\n|\r|\n", stderr_tail)]
    return [line for line in lines if line.strip() and not _PROGRESS.search(line)][-limit:]


def _describe(args: list[str]) -> str:
    """The command as a readable line: `python` for the interpreter, no inline script text."""
    shown = ["<inline script>" if i == 2 and args[1] == "-c" else a for i, a in enumerate(args)]
    return " ".join("python" if a == PYTHON else a for a in shown)


def _shorten(command: str, limit: int = COMMAND_CHARS) -> str:
    return command if len(command) <= limit else command[:limit] + " ..."


def _relay(stream: IO[bytes], tail: bytearray) -> None:
    """Copy the child's stderr to ours as it comes (progress bars stay live), keeping its last TAIL_BYTES."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := stream.read1(8192):
        sys.stderr.write(decoder.decode(chunk))
        sys.stderr.flush()
        tail += chunk
        del tail[:-TAIL_BYTES]
    sys.stderr.write(decoder.decode(b"", final=True))


def run_command(args: list[str], env: dict | None = None, cwd: str | None = None) -> None:
    """Run a child process with live output; a non-zero exit raises CommandError with the end of its stderr."""
    command = _describe(args)
    print("$ " + command, flush=True)
    tail = bytearray()
    process = subprocess.Popen(args, env=env, cwd=cwd, stderr=subprocess.PIPE)
    relay = threading.Thread(target=_relay, args=(process.stderr, tail), daemon=True)
    relay.start()
    try:
        returncode = process.wait()
    except BaseException:  # Ctrl-C or the like: do not leave the child running
        process.kill()
        process.wait()
        raise
    relay.join(DRAIN_SECONDS)
    if not relay.is_alive():  # else a grandchild still holds the pipe: closing it would block on the reader
        process.stderr.close()
    if returncode != 0:
        cause = cause_lines(bytes(tail).decode("utf-8", errors="replace"))
        raise CommandError(_shorten(command), returncode, cause)


PYTHON = sys.executable
