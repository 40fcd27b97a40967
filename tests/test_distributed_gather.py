"""gather_with_grad and the gathered InfoNCE on 2 gloo CPU processes against one process on the whole batch.

What is checked (W = 2 ranks, each with half of a fixed batch, a Linear model wrapped in DDP):
  * mean_r L_r == L_full (per-rank loss = mean over own anchors against all gathered keys);
  * x_r.grad on rank r == d(sum_s L_s)/dx_r == W * dL_full/dx_r (the gather's backward sums the gradient
    of every rank's loss);
  * DDP-averaged parameter gradients == dL_full/dtheta, identical on both ranks.
"""
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunet_cl.distributed import gather_with_grad, rank, world_size
from nnunet_cl.losses import info_nce_two_views

WORLD = 2
B_PER_RANK = 4
D_IN, D_OUT = 6, 5
TAU = 0.2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    """The fixed full batch (two views) and model; identical in every process."""
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(WORLD * B_PER_RANK, D_IN, generator=gen, dtype=torch.float64)
    x2 = torch.randn(WORLD * B_PER_RANK, D_IN, generator=gen, dtype=torch.float64)
    torch.manual_seed(1)
    model = torch.nn.Linear(D_IN, D_OUT).double()
    return x1, x2, model


def _worker(rank_: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank_, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        out: dict = {"rank": rank(), "world": world_size()}

        # 1) the gather alone: forward is the rank-ordered concatenation, backward sums all ranks' grads
        x = (torch.arange(6, dtype=torch.float64).view(3, 2) + 10 * rank_).requires_grad_()
        y = gather_with_grad(x)
        weight = (rank_ + 1) * torch.arange(y.numel(), dtype=torch.float64).view_as(y)
        (y * weight).sum().backward()
        out["gathered"] = y.detach()
        out["gather_grad"] = x.grad

        # 2) gathered InfoNCE under DDP
        x1, x2, model = _data()
        sl = slice(rank_ * B_PER_RANK, (rank_ + 1) * B_PER_RANK)
        x1_r, x2_r = x1[sl].clone().requires_grad_(), x2[sl].clone().requires_grad_()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        z = ddp(torch.cat([x1_r, x2_r]))  # one forward, so DDP sees each parameter used once
        loss = info_nce_two_views(z[:B_PER_RANK], z[B_PER_RANK:], temperature=TAU, gather=True)
        loss.backward()
        out.update(
            loss=loss.detach(),
            x1_grad=x1_r.grad,
            x2_grad=x2_r.grad,
            param_grads=[p.grad.clone() for p in model.parameters()],
        )
        torch.save(out, Path(out_dir) / f"rank{rank_}.pt")
        # no rank may tear down while the other still talks to it: gloo aborts the process
        # ("terminate called without an active exception") when a peer closes first
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_workers(out_dir: Path, timeout_s: float = 120.0) -> None:
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):  # raises ProcessRaisedException if a worker failed
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {timeout_s} s")
    finally:
        for p in ctx.processes:  # only our own children, and only if still running
            if p.is_alive():
                p.terminate()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out_dir = tmp_path_factory.mktemp("gather")
    _run_workers(out_dir)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_rank_and_world_size(results):
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == WORLD for r in results)


def test_gather_forward_and_backward(results):
    xs = [torch.arange(6, dtype=torch.float64).view(3, 2) + 10 * r for r in range(WORLD)]
    full = torch.cat(xs)
    base = torch.arange(full.numel(), dtype=torch.float64).view_as(full)
    total_weight = sum(r + 1 for r in range(WORLD))  # rank s uses weight (s + 1) * base
    for r, res in enumerate(results):
        torch.testing.assert_close(res["gathered"], full, rtol=0, atol=0)
        torch.testing.assert_close(res["gather_grad"], total_weight * base[3 * r:3 * (r + 1)], rtol=0, atol=0)


def test_gathered_info_nce_matches_single_process(results):
    x1, x2, model = _data()
    x1.requires_grad_()
    x2.requires_grad_()
    z = model(torch.cat([x1, x2]))
    n = WORLD * B_PER_RANK
    loss_full = info_nce_two_views(z[:n], z[n:], temperature=TAU)
    loss_full.backward()

    # the mean of the per-rank losses is the full-batch loss
    mean_loss = torch.stack([r["loss"] for r in results]).mean()
    torch.testing.assert_close(mean_loss, loss_full.detach(), rtol=1e-10, atol=1e-10)
    assert not torch.isclose(results[0]["loss"], results[1]["loss"])  # really different anchors per rank

    for r, res in enumerate(results):
        sl = slice(r * B_PER_RANK, (r + 1) * B_PER_RANK)
        # input gradient on rank r = d(sum_s L_s)/dx_r = W * dL_full/dx_r
        torch.testing.assert_close(res["x1_grad"], WORLD * x1.grad[sl], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(res["x2_grad"], WORLD * x2.grad[sl], rtol=1e-9, atol=1e-12)
        # DDP averages the summed contributions over W: exactly the single-process parameter gradient
        for g_ddp, p in zip(res["param_grads"], model.parameters()):
            torch.testing.assert_close(g_ddp, p.grad, rtol=1e-9, atol=1e-12)


def test_not_distributed_is_identity():
    assert world_size() == 1 and rank() == 0
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x
