"""torch.distributed helpers: rank/world size that also work without a process group, and an all-gather
that lets gradients flow back to the rank that produced each slice.

Plain ``torch.distributed.all_gather`` returns tensors without history, so a contrastive loss over gathered
embeddings would only train on the local ones (pytorch-metric-learning's ``DistributedLossWrapper`` behaves
like that). ``gather_with_grad`` is differentiable.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from torch import nn

__all__ = ["is_distributed", "world_size", "rank", "gather_with_grad", "sum_with_grad", "broadcast_objects",
           "shard", "CrossRankBatchNorm1d"]


def is_distributed() -> bool:
    """True when torch.distributed is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks in the default group, 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process' rank in the default group, 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


class _AllGatherWithGrad(torch.autograd.Function):
    """forward: y = [x_0; ...; x_{W-1}] (all_gather).  backward: dL/dx_r = sum_s (dL_s/dy)[slice r].

    Every rank s back-propagates its own loss L_s into its copy of y; the all-reduce sums those copies so
    that rank r receives the gradient of sum_s L_s with respect to its own x_r.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        stacked = torch.stack(grads)  # (W, *x.shape)
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return stacked[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, keeping autograd history to every rank.

    Returns (W * n, ...) ordered by rank, so this rank's rows are ``[rank() * n, (rank() + 1) * n)``.
    Every rank must pass the same shape. Identity when not distributed or with a single rank.

    Gradient convention (as lightly's GatherLayer): after each rank calls ``L_r.backward()``, ``x.grad`` on
    rank r equals d(sum_s L_s)/dx_r. With L_r = a mean over this rank's anchors, DDP's averaging of
    parameter gradients over the W ranks then reproduces the single-process gradient of the global mean.
    """
    if world_size() == 1:
        return x
    sizes = [None] * world_size()
    dist.all_gather_object(sizes, tuple(x.shape))
    if len(set(sizes)) > 1:
        raise RuntimeError(f"gather_with_grad: the ranks hold tensors of different shapes {sizes}. Fix: give every "
                           f"rank the same number of samples (a global batch divisible by the number of processes).")
    return torch.cat(_AllGatherWithGrad.apply(x), dim=0)


def sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """sum_r x_r over ranks, differentiable: the backward sums every rank's gradient (identity with one rank)."""
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_reduce
    return all_reduce(x)


def broadcast_objects(*objects):
    """Rank 0's objects on every rank (decisions that must agree: clusters, sampled pairs). Identity alone."""
    if world_size() == 1:
        return objects
    out = list(objects)
    dist.broadcast_object_list(out, src=0)
    return tuple(out)


def shard(items: list) -> list:
    """This rank's share of `items` (every W-th, from its rank), so that ranks see different cases.

    With fewer items than ranks every rank keeps them all rather than train on nothing.
    """
    w = world_size()
    return list(items) if w == 1 or len(items) < w else list(items)[rank()::w]


class CrossRankBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the whole batch over all ranks.

    torch's SyncBatchNorm runs on GPUs only; this one runs wherever a process group does (gloo on CPU). Alone it is
    exactly nn.BatchNorm1d. In a distributed run mean and variance come from two differentiable all-reduces, so
    W ranks with B samples each normalise (and back-propagate) as one process with W * B samples would.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1 or x.dim() != 2:
            return super().forward(x)
        n = sum_with_grad(x.new_tensor(float(x.shape[0])))
        mean = sum_with_grad(x.sum(0)) / n
        var = sum_with_grad(((x - mean) ** 2).sum(0)) / n
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))
                self.num_batches_tracked += 1
        y = (x - mean) / torch.sqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y
