"""Process set-up under `accelerate launch` (or plain python for one process)."""

from __future__ import annotations

import os

import torch


def init_state():
    """The accelerate PartialState; on CPU with several processes the gloo backend, created before
    any Accelerator, else gathers fail."""
    from accelerate import PartialState

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.cuda.is_available():
        return PartialState(backend="gloo")
    return PartialState()


def barrier(state) -> None:
    if state.num_processes > 1:
        state.wait_for_everyone()


def shutdown(state) -> None:
    """Tear the process group down cleanly (an abort at interpreter exit otherwise)."""
    if state.num_processes > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
