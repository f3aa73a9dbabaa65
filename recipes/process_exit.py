"""Freeing ``torch.distributed``'s process group when a process of a multi-process run ends.

accelerate's ``end_training``, the Trainer and lmms-eval all leave the group to the C++ teardown at interpreter
exit, where a gloo group can abort a rank that exits first ("terminate called without an active exception", exit
-6): ``torchrun`` then reports the whole run as failed although its outputs are written.
"""

from __future__ import annotations


def destroy_process_group_if_any() -> None:
    """Destroy the default process group if one is up (a no-op in a single process); local, no collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["destroy_process_group_if_any"]
