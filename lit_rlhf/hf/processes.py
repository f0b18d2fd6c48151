"""Process groups for commands that run outside Lightning's Trainer under ``torchrun`` (evaluation).

``python -m torch.distributed.run --nproc-per-node N -m lit_rlhf.<command>`` starts ``N`` processes with
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``).
:func:`init_from_env` joins them in one process group (NCCL on CUDA, one device per process; gloo on CPU) with a
timeout, so a process waiting on a dead or stuck peer fails instead of hanging; :func:`destroy` leaves it. The
training stages need none of this: Lightning's strategies set up their own group.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_object",
    "destroy",
    "device",
    "group_from_env",
    "init_from_env",
    "is_launched",
    "mesh",
    "rank",
    "world_size",
]


def is_launched() -> bool:
    """Whether this process was started by torchrun (its environment names a world size)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(timeout_s: float = 1800.0, force: bool = False) -> bool:
    """Join torchrun's processes in the default process group when there are several (or ``force``: one too).

    The backend is NCCL when CUDA is available (each process on ``cuda:LOCAL_RANK``), else gloo; a collective
    that waits ``timeout_s`` seconds fails. Returns whether this call created the group (a group that already
    exists, e.g. the caller's own, is used as it is and is not the caller's to :func:`destroy`).
    """
    if dist.is_initialized() or not is_launched():
        return False
    if int(os.environ["WORLD_SIZE"]) == 1 and not force:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return True


@contextmanager
def group_from_env(timeout_s: float = 1800.0, force: bool = False) -> Iterator[bool]:
    """:func:`init_from_env` on entry and :func:`destroy` of the group it created on exit (errors included)."""
    created = init_from_env(timeout_s, force)
    try:
        yield created
    finally:
        destroy(created)


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def device() -> torch.device:
    """Where this process computes: its ``cuda:LOCAL_RANK`` under a process group on CUDA, else the CPU."""
    if dist.is_initialized() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mesh():
    """The 1-D device mesh over every process: FSDP2's data-parallel mesh (:func:`~lit_rlhf.hf.sharding.shard_model`
    takes it)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device().type, (world_size(),), mesh_dim_names=("data_parallel",))


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` without a process group. A collective: every
    process must call it."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def destroy(created: bool = True) -> None:
    """Leave the default process group if :func:`init_from_env` created it (``created``)."""
    if created and dist.is_initialized():
        dist.destroy_process_group()
