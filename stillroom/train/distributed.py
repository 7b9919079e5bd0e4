"""Data-parallel training across processes started by `torchrun` (or `accelerate launch`).

Every process runs the same `stillroom train NAME`. Rank 0 alone decides whether to train (an
identical run is reused), records the run, writes the student folder and prints; the others
receive its decision, train their share of each batch and return. A LoRA's gradients are
averaged by `torch.nn.parallel.DistributedDataParallel`; a full fine-tune is sharded by FSDP2
(`lora.train_lora`). NCCL on GPUs, gloo on CPUs. A single process, the usual case, never touches
`torch.distributed`.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from dataclasses import dataclass

@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place, from the launcher's environment; the process group is started on
    first use (NCCL when CUDA is there, gloo otherwise)."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # Long enough for rank 0's work before the first collective (a self-training labeller, say).
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=6))
        atexit.register(_shut_down)
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def _shut_down() -> None:
    """Destroy the process group at exit, before the interpreter's own teardown. Without it a CI
    rehearsal once saw a rank abort while exiting ("terminate called without an active exception",
    a C++ thread still running as the process went down), its buffered output lost."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def alone():
    """Work rank 0 does while the others wait (training a self-training labeller, say) runs as a
    single process: `world()` inside reports one process and nothing in it joins a collective."""
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = saved


def share(value=None):
    """Rank 0's `value`, on every rank (each other rank calls it with no argument)."""
    import torch.distributed as dist

    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()
