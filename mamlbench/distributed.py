"""Several processes meta-training one model with `torch.distributed` (DDP semantics, no DDP wrapper).

Launched by `torchrun`, which sets RANK, WORLD_SIZE and LOCAL_RANK; without them every function
here is a no-op and a run is the plain one-process run. Each rank samples the *same full* meta-batch
from the run's (seed, iteration) generator and keeps its contiguous slice of the tasks (`shard`), so
the tasks are exactly those of a one-process run. Each rank's loss is the mean over its slice;
averaging the gradients over equal slices (`all_reduce_grads`) gives the full meta-batch's mean
gradient, so every rank takes the same optimiser step and the parameters stay identical across ranks.
Only rank 0 writes files, logs to MLflow and shows progress (`is_main`).

    torchrun --nproc-per-node 2 -m mamlbench.cli train omniglot      # gloo on CPU processes, nccl on GPUs
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T", bound=Sequence)


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes checkpoints and outputs and logs. Outside
    the process group (before `init`, after it ends) torchrun's RANK decides, so one process reports."""
    return rank() == 0 if active() else int(os.environ.get("RANK", 0)) == 0


def init(device: torch.device | str) -> bool:
    """Join the process group from torchrun's environment: nccl for a CUDA device (one GPU per local
    rank), gloo otherwise. True when this call created the group; a no-op without torchrun's variables."""
    if not launched() or active():
        return False
    if torch.device(device).type == "cuda":
        gpu = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(gpu)  # "cuda" now means this rank's GPU
        dist.init_process_group("nccl", device_id=gpu)
    else:
        dist.init_process_group("gloo")
    return True


@contextlib.contextmanager
def session(device: torch.device | str) -> Iterator[None]:
    """`init` on entry, and destroy the process group on exit when this session created it."""
    created = init(device)
    try:
        yield
    finally:
        if created and active():
            dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def check_divisible(meta_batch_size: int, key: str = "meta_batch_size") -> None:
    """Refuse a meta-batch that does not split into equal slices: unequal slices would weight tasks unequally."""
    n = world_size()
    if meta_batch_size % n:
        raise ValueError(f"{key} = {meta_batch_size}: not divisible by the {n} processes of this run "
                         f"(torchrun --nproc-per-node); use a multiple of {n}")


def shard(batch: T, meta_batch_size: int, key: str = "meta_batch_size") -> T:
    """This rank's contiguous slice of the tasks: every tensor of `batch` is cut along its leading
    (task) dimension. `batch` is a tuple, list or NamedTuple (e.g. `Episode`, `EpisodeIndex`)."""
    n = world_size()
    if n == 1:
        return batch
    check_divisible(meta_batch_size, key)
    per_rank = meta_batch_size // n
    lo = rank() * per_rank
    parts = [t[lo:lo + per_rank] for t in batch]
    return type(batch)(*parts) if hasattr(batch, "_fields") else type(batch)(parts)


def _flat_collective(tensors: list[torch.Tensor], collective) -> None:
    """Run `collective` in place on `tensors` flattened into one buffer per dtype (usually just one):
    one message instead of one per tensor."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        collective(flat)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def _mean(flat: torch.Tensor) -> None:
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()


@torch.no_grad()
def all_reduce_grads(module: nn.Module) -> None:
    """Average `.grad` over ranks. A parameter without a gradient keeps none (the same ones on every
    rank), so the optimiser skips it exactly as in a one-process run."""
    if world_size() == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if grads:
        _flat_collective(grads, _mean)


def mean_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Average per-rank metrics (means over equal slices) into the full meta-batch's values, so rank 0
    logs what a one-process run would."""
    if world_size() == 1 or not metrics:
        return metrics
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=device)
    _flat_collective([values], _mean)
    return dict(zip(metrics, values.tolist()))


@torch.no_grad()
def broadcast_state(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (one flattened broadcast per dtype), so
    the ranks start from the same weights whatever their own initialisation did."""
    if world_size() == 1:
        return
    tensors = [t for t in module.state_dict().values() if t.is_floating_point() and t.numel()]
    _flat_collective(tensors, lambda flat: dist.broadcast(flat, src=0))
