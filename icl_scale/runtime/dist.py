"""Process set-up under `accelerate launch` (or plain python for one process)."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch


def die_with_launcher() -> None:
    """A rank started by a launcher ends when the launcher does: torch's launcher starts each rank
    in a session of its own, so killing the launcher's process group would leave the ranks running
    (and holding the run dir's lock). Linux: the kernel sends SIGKILL on the parent's death."""
    import sys

    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    if os.getppid() == 1:   # the launcher died before the line above
        os._exit(1)


def init_state():
    """The accelerate PartialState; on CPU with several processes the gloo backend, created before
    any Accelerator, else gathers fail. A launched rank is tied to its launcher first."""
    from accelerate import PartialState

    die_with_launcher()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.cuda.is_available():
        return PartialState(backend="gloo")
    return PartialState()


def barrier(state) -> None:
    # Not state.wait_for_everyone(): a CPU launch started with --multi_gpu leaves accelerate's
    # distributed_type at NO, which makes its barrier a no-op although the process group is up.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_max(state, value: int) -> int:
    """The largest `value` over the ranks."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([value], device=state.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def all_min(state, value: int) -> int:
    """The smallest `value` over the ranks."""
    return -all_max(state, -value)


def peak_gpu_mib(state) -> float | None:
    """This rank's peak allocated GPU memory (None on CPU)."""
    return round(torch.cuda.max_memory_allocated(state.device) / 2**20, 1) if state.device.type == "cuda" else None


@contextmanager
def main_first(state):
    """The main process runs the block first (e.g. a one-time model conversion), then the others."""
    if not state.is_main_process:
        barrier(state)
    yield
    if state.is_main_process:
        barrier(state)


def shutdown(state) -> None:
    """Tear the process group down cleanly (an abort at interpreter exit otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
