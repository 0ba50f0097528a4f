"""Process-group set-up keyed on torchrun's environment, so CPU, one GPU and N GPUs share one
training code path.

Gradients are reduced by hand, once per optimizer step (`all_reduce_grads`), rather than by a
DistributedDataParallel wrapper: the memory-efficient loss runs several partial backward passes
per micro-batch, and DDP's hooks would reduce after each of them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from mtp.errors import MTPError

T = TypeVar("T")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """The one --dtype rule (training's autocast, FSDP's compute dtype, decoding): "auto" is
    bf16 on CUDA and float32 elsewhere; any other name is that dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def pick_device(pref: str = "auto", local_rank: int = 0) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MTPError(f"--device {pref} asked for, but CUDA is not available on this machine")
        return torch.device(pref if ":" in pref else f"cuda:{local_rank}")
    if pref != "cpu":
        raise MTPError(f"unknown device {pref!r}: use auto, cpu or cuda[:N]")
    return torch.device("cpu")


def setup(device_pref: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and ":" in device_pref:
        raise MTPError(f"--device {device_pref} under torchrun: give --device cuda, and each process "
                       "takes the GPU of its LOCAL_RANK")
    device = pick_device(device_pref, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, device)


def teardown(synchronize: bool = False) -> None:
    """Leave the process group. synchronize=True, when every rank got to the end: meet at a
    barrier first (it also waits for this rank's outstanding collectives), then give gloo's
    worker threads a moment to release their finished work. A worker thread that releases a
    collective's tensors while Python is shutting down needs the GIL, cannot have it, and aborts
    the process ("terminate called without an active exception", SIGABRT): a rank that finished
    a moment before the others used to die that way."""
    if not dist.is_initialized():
        return
    if synchronize:
        dist.barrier()
        time.sleep(0.05)
    dist.destroy_process_group()


def run_then_teardown(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs), then leave the process group: synchronised when fn returned (every
    rank does), at once when it raised (the other ranks may never get there)."""
    try:
        out = fn(*args, **kwargs)
    except BaseException:
        teardown()
        raise
    teardown(synchronize=True)
    return out


def broadcast_params(model: torch.nn.Module) -> None:
    """Make every rank start from rank 0's weights."""
    if dist.is_initialized():
        for p in model.parameters():
            dist.broadcast(p.data, src=0)


def all_reduce_grads(params: list[torch.nn.Parameter], world_size: int, bucket_numel: int = 2**25) -> int:
    """Average gradients over ranks: each gradient is reduced exactly once, packed into flat
    buckets. Parameters without a gradient (a head with zero loss weight) are skipped, as the
    optimizer skips them; which ones those are follows from the config, so it is the same on
    every rank. Returns the number of collectives."""
    if world_size == 1:
        return 0
    params = [p for p in params if p.grad is not None]
    calls, bucket, size = 0, [], 0
    for p in params + [None]:
        if p is not None:
            bucket.append(p.grad)
            size += p.grad.numel()
        if bucket and (p is None or size >= bucket_numel):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat /= world_size
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            calls += 1
            bucket, size = [], 0
    return calls


def mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Average a few Python floats over ranks (for logging, not gradients)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()
