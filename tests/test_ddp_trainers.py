"""Every trainer kind on torch.distributed: 2 gloo processes on CPU with half the batch each against 1 process on
the whole batch, through the trainers' own train_step.

Checked for SimCLR, PolyCL (pairs across ranks), SuperCL (IGCP's graph over every rank's patches and a queue),
SepaReg (SimSiam and BYOL region phase, heads with
cross-rank BatchNorm), an auxiliary-loss trainer (nnU-Net's segmentation loss plus a gathered InfoNCE while
fine-tuning), DCL-Seg (learned positives made inside the step, a gathered voxel contrast, the generator's own
optimiser and its exact ascent gradient) and PCLMix (mixed patches, a second decoder, a pixel contrast over every
rank's anchors and a memory every rank pushes to):
  * the mean over ranks of the step loss equals the single-process loss (rtol 1e-5);
  * after the first step every gradient (network and extra modules), as DDP averaged it, equals the
    single-process gradient, on both ranks;
  * after 3 optimiser steps the parameters are identical on both ranks and match the single process.
The runs are in float64: in float32 the summation order alone moves a gradient by ~1e-6 of its scale, and
AdamW turns the float noise of gradients that are exactly zero in theory (a conv bias before InstanceNorm) into
full steps of lr, so float32 parameters could not be compared after a few steps.
"""
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunet_cl.heads import pooled_embedding
from nnunet_cl.losses import info_nce_two_views
from nnunet_cl_trainers import (nnUNetTrainerDCLSeg, nnUNetTrainerPCLMix, nnUNetTrainerPolyCL, nnUNetTrainerSepaReg,
                                nnUNetTrainerSimCLR, nnUNetTrainerSuperCL)
from nnunet_cl_trainers.base import FINETUNE, PRETRAIN

from helpers import fake_preprocessed_folder, tiny_plans

WORLD, STEPS = 2, 3
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 4,
                "file_ending": ".nii.gz"}


class AuxInfoNCETrainer(nnUNetTrainerSimCLR):
    """An auxiliary-loss trainer: InfoNCE of two views' pooled bottlenecks beside nnU-Net's loss."""

    has_auxiliary_loss = True
    feature_request = {"encoder": (-1,)}

    def auxiliary_losses(self, batch, output, features):
        z1 = pooled_embedding(self.cl_modules, features["enc-1"])
        z2 = pooled_embedding(self.cl_modules, self.encode(batch["data2"])[-1])
        return {"aux": 0.5 * info_nce_two_views(z1, z2, self.temperature, gather=self.is_ddp)}


def _views(g, n, shape=(16, 16, 16)):
    x = torch.randn((n, 1, *shape), generator=g)
    return x, 1.1 * x + 0.3 * torch.randn(x.shape, generator=g)


def simclr_batch(step):
    x, x2 = _views(torch.Generator().manual_seed(step), 4)
    return {"data": x, "data2": x2}, ("data", "data2")


def polycl_batch(step):
    g = torch.Generator().manual_seed(step)
    base = torch.randn((4, 1, 16, 16, 16), generator=g)
    data = base.repeat_interleave(2, 0) + 0.3 * torch.randn((8, 1, 16, 16, 16), generator=g)
    return {"data": data, "case_index": torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
            "organ_present": torch.tensor([1, 1, 0, 0, 1, 0, -1, -1], dtype=torch.int8)}, \
        ("data", "case_index", "organ_present")


def supercl_batch(step):
    """Patches with a blocky supervoxel map (4^3 blocks, 0 on one border slab), positions and per-sample seeds."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn((4, 1, 16, 16, 16), generator=g)
    block = torch.arange(4).repeat_interleave(4)
    ids = 1 + block[:, None, None] * 16 + block[None, :, None] * 4 + block[None, None, :]
    sv = ids.expand(4, 16, 16, 16).clone()
    sv[:, :2] = 0
    return {"data": x, "supervoxels": sv, "position": torch.rand(4, generator=g),
            "seeds": torch.arange(4) + 100 * step}, ("data", "supervoxels", "position", "seeds")


def separeg_batch(step):
    """Region crops with their two views made already (prepare_batch keeps given views), split view-wise."""
    x, x2 = _views(torch.Generator().manual_seed(step), 4)
    x, x2 = x.clamp(0, 1), x2.clamp(0, 1)
    return {"data": x, "views1": x, "views2": x2, "phase": "region"}, ("data", "views1", "views2")


def finetune_batch(step):
    g = torch.Generator().manual_seed(step)
    x, x2 = _views(g, 4)
    target = (x > 0.5).to(x.dtype)
    return {"data": x, "data2": x2, "target": target}, ("data", "data2", "target")


def scribble_batch(step):
    """Two classes annotated on every 4th slice of each patch, 2 (the ignore label) elsewhere: every sample (and every
    mix of two) has the same number of annotated voxels, so the ranks' partial-loss means average to the global one."""
    g = torch.Generator().manual_seed(step)
    x = torch.nn.functional.avg_pool3d(torch.randn((4, 1, 16, 16, 16), generator=g), 5, 1, 2) * 5
    target = torch.full_like(x, 2.0)
    target[:, :, ::4] = (x[:, :, ::4] > 0).to(x.dtype)
    return {"data": x, "target": target}, ("data", "target")


SCRIBBLE_JSON = {**DATASET_JSON, "labels": {"background": 0, "organ": 1, "ignore": 2}}

CASES = {
    "simclr": (nnUNetTrainerSimCLR, simclr_batch, {}),
    "polycl": (nnUNetTrainerPolyCL, polycl_batch, {"pretrain_patch_size": [16, 16, 16]}),
    "supercl": (nnUNetTrainerSuperCL, supercl_batch, {"pretrain_patch_size": [16, 16, 16], "queue_size": 12,
                                                      "n_labels": 8, "per_label": 4}),
    "supercl_position": (nnUNetTrainerSuperCL, supercl_batch, {"pretrain_patch_size": [16, 16, 16], "queue_size": 4,
                                                               "n_labels": 8, "per_label": 4,
                                                               "instance_term": "position"}),
    "separeg_simsiam": (nnUNetTrainerSepaReg, separeg_batch, {"crop_size": 16, "regions_per_step": 4}),
    "separeg_byol": (nnUNetTrainerSepaReg, separeg_batch, {"crop_size": 16, "regions_per_step": 4,
                                                           "objective": "byol"}),
    "auxiliary": (AuxInfoNCETrainer, finetune_batch, {"pretrain_epochs": 0, "enable_deep_supervision": False}),
    # learned positives inside the wrapped step, the voxel contrast gathered, the generator's own optimiser
    "dclseg": (nnUNetTrainerDCLSeg, finetune_batch, {"enable_deep_supervision": False, "anchors_per_sample": 32}),
    # mix pairs within each rank, the pixel contrast's mean over every rank's anchors, the memory fed by all ranks
    "pclmix": (nnUNetTrainerPCLMix, scribble_batch, {"enable_deep_supervision": False, "contrast_start_iteration": 0,
                                                     "finetune_epochs": 1, "finetune_iterations_per_epoch": STEPS,
                                                     "queue_size": 6, "max_anchors": 64, "aux_dropout": 0.0,
                                                     "_dataset_json": SCRIBBLE_JSON, "_batch_size": 4}),
}


def _local(batch: dict, split_keys, rank: int, world: int) -> dict:
    out = {}
    for k, v in batch.items():
        out[k] = v.chunk(world)[rank] if k in split_keys else v
    if "views1" in out:  # SepaReg's prepared views: [view 1 of the crops; view 2 of the crops]
        out["views"] = torch.cat([out.pop("views1"), out.pop("views2")])
    if "target" in out:
        out["target"] = out["target"].clone()
    return out


def _worker(rank: int, world: int, port: int, root: str, case: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # network, heads and batches
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[name] = os.path.join(root, name)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    cls, make_batch, attrs = CASES[case]
    attrs = dict(attrs)
    plans = tiny_plans()
    plans["configurations"]["3d_fullres"]["batch_size"] = attrs.pop("_batch_size", 2)
    trainer = cls(plans, "3d_fullres", 0, dict(attrs.pop("_dataset_json", DATASET_JSON)), torch.device("cpu"))
    for k, v in {"training_seed": 0, **attrs}.items():
        setattr(trainer, k, v)
    trainer.initialize()
    assert trainer.is_ddp == (world > 1)
    assert trainer.stage() == (FINETUNE if case in ("auxiliary", "dclseg", "pclmix") else PRETRAIN)
    named = list(trainer.unwrapped_network.named_parameters()) + \
        [("cl." + n, p) for n, p in trainer.cl_modules.named_parameters()]
    losses, grads = [], None
    for step in range(STEPS):
        batch, split_keys = make_batch(step)
        out = trainer.train_step(_local(batch, split_keys, rank, world))
        losses.append(float(out["loss"]))
        if step == 0:
            grads = {n: p.grad.detach().clone() for n, p in named if p.grad is not None}
    params = {n: p.detach().clone() for n, p in named}
    params.update({"buffer." + n: b.detach().clone() for n, b in trainer.cl_modules.named_buffers()
                   if b.is_floating_point()})
    torch.save({"losses": losses, "grads": grads, "params": params}, os.path.join(root, f"rank{rank}.pt"))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, case: str, world: int) -> list[dict]:
    root = tmp_path / f"world{world}"
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / name).mkdir(parents=True)
    fake_preprocessed_folder({"nnUNet_preprocessed": root / "nnUNet_preprocessed"}, "Dataset997_Tiny")
    mp.spawn(_worker, args=(world, _free_port(), str(root), case), nprocs=world, join=True)
    return [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _close(a: torch.Tensor, b: torch.Tensor, what: str, floor: float, rtol=1e-5):
    """Equal to rtol of the tensor's own scale, plus `floor` for what is 0 in theory (float64 noise)."""
    own = float(b.abs().max())
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * own + floor, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_with_half_the_batch_equal_one_process(tmp_path, case):
    single, = _run(tmp_path, case, 1)
    ranks = _run(tmp_path, case, WORLD)
    for step in range(STEPS):
        mean_loss = sum(r["losses"][step] for r in ranks) / WORLD
        assert mean_loss == pytest.approx(single["losses"][step], rel=1e-5), (step, mean_loss, single["losses"])
    assert single["grads"].keys() == ranks[0]["grads"].keys() and len(single["grads"]) > 10
    assert any(k.startswith("cl.") for k in single["grads"]) and any(k.startswith("encoder.") for k in single["grads"])
    grad_scale = max(float(g.abs().max()) for g in single["grads"].values())
    for i, r in enumerate(ranks):
        for name, g in single["grads"].items():
            # a gradient that is 0 in theory (a bias before a normalisation) is ~1e-16 of the largest one
            _close(r["grads"][name], g, f"gradient of {name} on rank {i}", 1e-12 * grad_scale)
    for name, p in single["params"].items():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), f"{name} differs between ranks"
        # AdamW turns that noise into steps of ~lr * 1e-8: parameters are compared to 1e-8 on top of rtol
        _close(ranks[0]["params"][name], p, f"{name} after {STEPS} steps", 1e-8)


def _blocks_worker(rank: int, world: int, port: int, root: str, _case: str) -> None:
    """SepaReg's distillation batches on each rank: 4 steps' (expert, crop indices)."""
    import numpy as np
    from nnunet_cl_trainers.separeg import DISTILL
    torch.set_num_threads(1)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[name] = os.path.join(root, name)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    trainer = nnUNetTrainerSepaReg(tiny_plans(), "3d_fullres", 0, dict(DATASET_JSON), torch.device("cpu"))
    for k, v in {"crop_size": 16, "regions_per_step": 6, "region_epochs": 1, "k": 3, "expert_epochs": 0,
                 "distill_epochs": 2, "training_seed": 0}.items():
        setattr(trainer, k, v)
    trainer.initialize()
    trainer.set_regions(np.random.default_rng(0).integers(0, 255, (36, 1, 16, 16, 16), dtype=np.uint8), ["x"])
    trainer.sepa.assignments = np.repeat([0, 1, 2], 12)
    trainer.sepa.centroids = np.zeros((3, 4))
    trainer.current_epoch = 1
    assert trainer.phase() == DISTILL
    draws = [trainer.next_region_batch() for _ in range(4)]
    torch.save({"experts": [d["expert"] for d in draws], "index": [d["index"].tolist() for d in draws]},
               os.path.join(root, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_sepa_reg_ranks_distil_the_same_expert_in_each_step(tmp_path):
    """Each rank takes its share of one global block, so all ranks distil the same expert in a step (the frozen
    expert's batch statistics are taken over all ranks)."""
    root = tmp_path / "blocks"
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / name).mkdir(parents=True)
    fake_preprocessed_folder({"nnUNet_preprocessed": root / "nnUNet_preprocessed"}, "Dataset997_Tiny")
    mp.spawn(_blocks_worker, args=(WORLD, _free_port(), str(root), ""), nprocs=WORLD, join=True)
    a, b = (torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert a["experts"] == b["experts"] and len(set(a["experts"])) > 1
    for i, j, expert in zip(a["index"], b["index"], a["experts"]):
        assert len(i) == len(j) == 3 and not set(i) & set(j)  # halves of one block of 6
        assert all(k // 12 == expert for k in i + j)  # all crops of that expert's cluster


def _uneven_worker(rank: int, world: int, port: int, root: str, _case: str) -> None:
    from nnunet_cl.distributed import gather_with_grad
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        gather_with_grad(torch.zeros(2 + rank, 3))
        message = ""
    except RuntimeError as e:
        message = str(e)
    with open(os.path.join(root, f"rank{rank}.txt"), "w") as f:
        f.write(message)
    dist.barrier()  # a rank that closes first makes gloo abort its peer
    dist.destroy_process_group()


def test_gathering_unequal_shares_is_refused_on_every_rank(tmp_path):
    mp.spawn(_uneven_worker, args=(WORLD, _free_port(), str(tmp_path), ""), nprocs=WORLD, join=True)
    for r in range(WORLD):
        assert "different shapes [(2, 3), (3, 3)]" in (tmp_path / f"rank{r}.txt").read_text()
