"""Process-group set-up shared by every phase: under the `deepspeed` launcher or as a plain single process.

Under the launcher, RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* are set and `deepspeed.init_distributed` picks NCCL on GPUs
or gloo on DeepSpeed's CPU accelerator. Run as a plain process (`dsincubate pipeline` on a laptop), we fill in a
one-rank world on a free local port so the same engine code runs unchanged.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from dsincubate.procutil import free_port


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    device_type: str
    device_name: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def has_cuda(self) -> bool:
        return self.device_type == "cuda"


def init() -> DistContext:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(verbose=False)
    acc = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device_type = acc.device_name()
    if device_type == "cpu":
        _unlink_shm_buffer(dist)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        device_name = torch.cuda.get_device_name(device)
    else:
        device = torch.device(device_type)
        device_name = f"{device_type} ({os.cpu_count()} cores)"
        if "OMP_NUM_THREADS" not in os.environ:
            # Ranks sharing a CPU must split its cores: oversubscribed OpenMP threads make every op several times slower.
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 0)) or
                              min(dist.get_world_size(), os.cpu_count() or 1))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, device_type, device_name)


def _unlink_shm_buffer(dist) -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer from /dev/shm, keeping the mapping.

    DeepSpeed's CPU accelerator maps one 69 MB /dev/shm file per rank at init and never unlinks it, so every CPU run
    (and every test run) leaked RAM in tmpfs until reboot: gigabytes after a day of runs, enough to OOM-kill a ViT-H
    step. Every rank maps all ranks' files during init_distributed, so after a barrier the names are no longer needed;
    the mappings live until the processes exit, even when they are killed.
    """
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    if dist.get_world_size() > 1:
        dist.barrier()  # on every rank, file or not, so no rank waits alone
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
