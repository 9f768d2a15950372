"""Data parallelism: one process per GPU (or CPU worker), started by torchrun or accelerate.

Each process computes its own share of the batches and keeps its own state; at the end the
states are gathered on the main process and merged there exactly (as shards are merged).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from backend import UserError
from backend.state import RunState, merge_states


def init_processes(device: str, device_map: str | None) -> tuple[int, int, torch.device]:
    """(rank, number of processes, this process's device); a plain run is rank 0 of 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, torch.device(device)
    if device_map:
        raise UserError("--device-map spreads one model over GPUs; it does not combine with "
                        "several processes (run one process per model copy instead)")  # fmt: skip
    from accelerate import PartialState

    # cpu=True makes accelerate take the gloo backend: `accelerate launch --cpu` starts only
    # one process, so several CPU processes come from torchrun.
    state = PartialState(cpu=torch.device(device).type == "cpu")
    return state.process_index, state.num_processes, state.device


def gather_states(state: RunState, rank: int, world: int) -> RunState:
    """On the main process, the merge of every process's finished state; elsewhere, its own."""
    if world == 1:
        return state
    gathered: list[dict] | None = [{} for _ in range(world)] if rank == 0 else None
    dist.gather_object(state.to_dict(), gathered, dst=0)
    # Every process waits until the main one has every state, then all leave the group: a
    # process that exits with the group still up (gloo's threads running) may abort.
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return state
    states = [RunState.from_dict(s, torch.device("cpu")) for s in gathered]
    return merge_states(states, [f"process {r}" for r in range(world)])
