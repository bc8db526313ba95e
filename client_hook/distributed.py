"""Per-task statistics of the GLOBAL batch under torch.distributed data parallelism.

Under DistributedDataParallel every rank computes its per-task gradients on its own batch
(`client_hook.engine`; DDP's reducer plays no part, so ``no_sync()`` changes nothing). DDP
applies the mean of the ranks' gradients, which is the gradient of the mean loss over the
global batch; the per-task gradients of the global batch are therefore the means of the
ranks' per-task gradients. On a sampled optimizer step `global_mean` averages them, and
the step's losses, with ONE all-reduce of ``T * N + T`` numbers (N = monitored elements,
float32 unless the parameters are wider) before the Gram matrices are taken, so every rank
holds the global numbers; only rank 0 sends them. A one-number all-reduce before it tells
whether every rank measured the step (if not, all drop it). No collective runs on a step that
is not sampled, and every rank samples the same steps: the decision is a pure function of the
step counters, which DDP keeps equal across ranks (every rank runs every step).

FSDP2 (``fully_shard``) is measured the same way: autograd reaches the unsharded parameters
(`client_hook.engine.ParamGroups`), whose gradients are each rank's local ones, full size.
Partial Grams of shards (``T (T+1) / 2`` numbers per group) would need the global per-task
gradients sharded first, i.e. a reduce-scatter of the same ``T * N`` numbers: half a ring
all-reduce's bytes, but no faster on gloo (bench: README), so one all-reduce serves both.

Balancers that measure task gradients themselves (GradNorm, inverse-grad, the Gram methods,
PCGrad) would otherwise decide per rank from the local batch, and the ranks' task weights would
drift apart: they too combine the ranks on every step (`client_hook.balancers.task_grad`,
`client_hook.balancers.pcgrad`) with `all_reduce_mean`, whenever `data_parallel_ranks` > 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor


def data_parallel_ranks() -> int:
    """How many ranks' batches make the global batch: the world size of an initialised
    torch.distributed default group, else 1."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def global_batch_reducer(
    all_ranks: bool,
) -> Callable[[list[Tensor] | None, torch.device], bool] | None:
    """`global_mean` when this process is one of several data-parallel ranks whose numbers
    are combined (`all_ranks` False); None otherwise (one process, or each rank its own run)."""
    return None if all_ranks or data_parallel_ranks() == 1 else global_mean


def global_mean(tensors: list[Tensor] | None, device: torch.device) -> bool:
    """Called by every rank on every sampled optimizer step. If every rank measured the step
    (`tensors` given), average them in place (`all_reduce_mean`) and return True; if any rank
    could not (None: its measurement failed), return False on every rank. A one-number
    all-reduce decides first, so the ranks always enter the same collectives: a measurement
    that fails on one rank only never leaves the others waiting in the big one. Reading its
    result is a host read: on CUDA the step's queued work is waited for, once per sampled
    step and only under data parallelism."""
    ok = torch.full((1,), 0.0 if tensors is None else 1.0, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if tensors is None or not ok.item():
        return False
    all_reduce_mean(tensors)
    return True


def all_reduce_mean(tensors: list[Tensor]) -> None:
    """Average `tensors` across the ranks of the default group, in place, in one all-reduce."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def all_gather_rows(tensors: list[Tensor]) -> list[Tensor]:
    """Each of `tensors` (one dtype, the same shapes on every rank) from every rank,
    concatenated along the first dimension in rank order, in one all-gather."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    every = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(every, flat)
    out, offset = [], 0
    for t in tensors:
        out.append(torch.cat([part[offset : offset + t.numel()].view_as(t) for part in every]))
        offset += t.numel()
    return out
