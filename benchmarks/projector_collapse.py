"""Does SimCLR's projection head start collapsed on nnU-Net's encoder? (docs/methods/simclr.md)

Trains the stock nnU-Net encoder from a plans file with NT-Xent on random crops of preprocessed cases, with
simple views (flips, Gaussian noise, intensity scale and shift), once with a plain MLP projector and once
with the package's head (BatchNorm in the MLP), and prints the loss and the mean cosine between embeddings
of different images. One torch thread; seeds fixed.

Usage:
  python benchmarks/projector_collapse.py PREPROCESSED_DATASET_FOLDER --plans nnUNetPlans_clBench --steps 60
"""
import argparse
import glob
import json
import os

import blosc2
import numpy as np
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from nnunet_cl.heads import pooled_embedding, pooled_projection_heads
from nnunet_cl.losses import info_nce_two_views


def load_volumes(folder: str, data_identifier: str, n: int) -> list[np.ndarray]:
    files = sorted(f for f in glob.glob(os.path.join(folder, data_identifier, "*.b2nd")) if not f.endswith("_seg.b2nd"))
    return [np.asarray(blosc2.open(f)[:])[0] for f in files[:n]]


def crop(volume: np.ndarray, patch, rng) -> np.ndarray:
    volume = np.pad(volume, [(0, max(0, p - s)) for p, s in zip(patch, volume.shape)])
    o = [rng.integers(0, s - p + 1) for s, p in zip(volume.shape, patch)]
    return volume[tuple(slice(a, a + p) for a, p in zip(o, patch))]


def view(x: np.ndarray, rng) -> np.ndarray:
    x = x * rng.uniform(0.75, 1.25) + rng.uniform(-0.2, 0.2) + rng.normal(0, 0.1, x.shape)
    for axis in range(3):
        if rng.random() < 0.5:
            x = np.flip(x, axis)
    return np.ascontiguousarray(x, dtype=np.float32)


def run(volumes, cfg, batch: int, steps: int, lr: float, batchnorm: bool, report_every: int = 10) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    arch = cfg["architecture"]
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 2)
    channels = net.encoder.output_channels[-1]
    heads = nn.ModuleDict(pooled_projection_heads(channels, channels, 128))
    if not batchnorm:
        heads["projector"] = nn.Sequential(*[m for m in heads["projector"] if not isinstance(m, nn.BatchNorm1d)])
    params = list(net.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-5)
    print(f"projector {'with' if batchnorm else 'without'} BatchNorm; collapse value ln(2N-1) = "
          f"{np.log(2 * batch - 1):.3f}")
    window = []
    for step in range(steps):
        crops = [crop(volumes[i], cfg["patch_size"], rng) for i in rng.choice(len(volumes), batch, replace=False)]
        views = torch.from_numpy(np.stack([view(c, rng) for c in crops + crops]))[:, None]
        z = pooled_embedding(heads, net.encoder(views)[-1])
        loss = info_nce_two_views(*z.chunk(2), 0.1)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 12)
        optimizer.step()
        window.append(loss.item())
        if step % report_every == 0 or step == steps - 1:
            zn = nn.functional.normalize(z.detach(), dim=1)
            cos = (zn @ zn.T)[~torch.eye(len(zn), dtype=torch.bool)].mean().item()
            print(f"  step {step:3d}  loss {loss.item():.3f} (mean of the last {len(window)} steps "
                  f"{np.mean(window):.3f})  mean cosine between different images {cos:.3f}", flush=True)
            window = []


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="nnUNet_preprocessed/DatasetXXX_Name")
    p.add_argument("--plans", default="nnUNetPlans")
    p.add_argument("-c", default="3d_fullres")
    p.add_argument("--cases", type=int, default=60)
    p.add_argument("--batch", type=int, default=8, help="samples per step (two views each)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3)
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = json.load(open(os.path.join(a.folder, a.plans + ".json")))["configurations"][a.c]
    volumes = load_volumes(a.folder, cfg["data_identifier"], a.cases)
    for batchnorm in (False, True):
        run(volumes, cfg, a.batch, a.steps, a.lr, batchnorm)


if __name__ == "__main__":
    main()
