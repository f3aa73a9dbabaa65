"""The recipes free torch.distributed's process group when their process ends (recipes/process_exit.py)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import socket, torch.distributed as dist
from recipes.process_exit import destroy_process_group_if_any
destroy_process_group_if_any()  # no group yet: nothing to do
with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
before = dist.is_initialized()
destroy_process_group_if_any()
print(before, dist.is_initialized())
destroy_process_group_if_any()  # twice (an atexit hook after the recipe's own call) is harmless
"""


def test_the_process_group_is_destroyed_once_and_a_second_call_is_harmless():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["True", "False"]

