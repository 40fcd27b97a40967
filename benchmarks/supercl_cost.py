"""Cost of one SuperCL pretraining step against one plain nnUNetTrainer step, same plans, same run.

Works on real MRI (MSD Task04 hippocampus from ../shared/data): a work folder gets `--cases` labeled cases and
`--pool` unlabeled ones, planned and preprocessed with stock nnUNetPlans (done once, reused). The nnUNetTrainer step
gets a batch of nnU-Net's own shapes (benchmarks/step_cost.py's fake_batch); the SuperCL step gets real batches of
its own loader (supervoxels computed first, as the trainer does), drawn before timing, so both columns are the
step alone. Steps alternate between the trainers so machine load affects both alike; medians are reported. The
data side is timed separately: one batch of each trainer's real loader in this process.

Usage:  python benchmarks/supercl_cost.py [--work /tmp/nnunet_cl_supercl_bench] [--steps 8] [--out FILE]
"""
import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from os.path import dirname, join
from pathlib import Path

import numpy as np
import torch

_spec = importlib.util.spec_from_file_location("step_cost", join(dirname(os.path.abspath(__file__)), "step_cost.py"))
step_cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_cost)

ROOT = Path(__file__).resolve().parents[1]
DATASET_ID, DATASET = "963", "Dataset963_HippoSuperCLBench"


def prepare(work: Path, n_cases: int, n_pool: int) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / name).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(work / name)
    if (work / "nnUNet_preprocessed" / DATASET / "nnunet_cl_pool" / "pool.json").is_file():
        return
    src = ROOT.parent / "shared" / "data" / "Task04_Hippocampus"
    images = sorted((src / "imagesTr").glob("hippocampus_*.nii.gz"))
    raw = work / "nnUNet_raw" / DATASET
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(exist_ok=True)
    pool = work / "unlabeled"
    pool.mkdir(exist_ok=True)
    for p in images[:n_cases]:
        shutil.copy(p, raw / "imagesTr" / p.name.replace(".nii.gz", "_0000.nii.gz"))
        shutil.copy(src / "labelsTr" / p.name, raw / "labelsTr" / p.name)
    for p in images[n_cases:n_cases + n_pool]:
        shutil.copy(p, pool / p.name)
    generate_dataset_json(str(raw), {0: "MRI"}, {"background": 0, "Anterior": 1, "Posterior": 2}, n_cases, ".nii.gz",
                          dataset_name=DATASET)
    env = {**os.environ, "nnUNet_n_proc_DA": "1"}  # 0 breaks nnU-Net 2.8.1's planner (torch.set_num_threads(0))
    for cmd in (["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-np", "2"],
                ["nnUNetv2_cl_add_unlabeled", "-d", DATASET_ID, "-i", str(pool), "-np", "2"]):
        subprocess.run(cmd, env=env, check=True, capture_output=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/nnunet_cl_supercl_bench")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--pool", type=int, default=20)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--trainer", default="nnUNetTrainerSuperCL")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores, as nnU-Net)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "supercl_step_cost_hippocampus.md"))
    args = p.parse_args(argv)
    t_start, load0 = time.time(), os.getloadavg()[0]
    prepare(Path(args.work), args.cases, args.pool)
    os.environ["nnUNet_n_proc_DA"] = "0"
    torch.set_num_threads(args.threads or os.cpu_count())
    plain = step_cost.make_trainer("nnUNetTrainer", DATASET_ID, "3d_fullres")
    sup = step_cost.make_trainer(args.trainer, DATASET_ID, "3d_fullres")
    loader = sup.get_pretrain_dataloader()
    np.random.seed(0)
    lt = {"nnUNetTrainer": [], args.trainer: []}
    plain_loader, _ = plain.get_dataloaders()
    batches = []
    for _ in range(args.steps + 2):
        t0 = time.perf_counter()
        batches.append(next(loader))
        lt[args.trainer].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        next(plain_loader)
        lt["nnUNetTrainer"].append(time.perf_counter() - t0)
    g = torch.Generator().manual_seed(0)
    times = {"nnUNetTrainer": [], args.trainer: []}
    for i, batch in enumerate(batches):
        for name, tr, b in (("nnUNetTrainer", plain, step_cost.fake_batch(plain, g)), (args.trainer, sup, batch)):
            t0 = time.perf_counter()
            tr.train_step(b)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    base, lbase = statistics.median(times["nnUNetTrainer"]), statistics.median(lt["nnUNetTrainer"])
    enc, dec = sup.tap_stages()
    shapes = {"nnUNetTrainer": f"{plain.batch_size} x {list(plain.configuration_manager.patch_size)}, full U-Net, "
                               f"deep supervision",
              args.trainer: f"{sup.get_pretrain_batch_size()} x 2 views x {sup.get_pretrain_patch_size()}, full U-Net "
                            f"(ILCP at encoder stage {enc} and decoder stage {dec}), IGCP queue {sup.queue_size}"}
    lines = [f"# SuperCL step cost on {plain.plans_manager.dataset_name} 3d_fullres (stock nnUNetPlans)", "",
             f"{torch.get_num_threads()} torch threads, CPU ({os.cpu_count()} cores), {args.steps} timed steps each "
             f"after 2 warm-up steps (median; interquartile range); machine load {load0:.2f} at the start, "
             f"{os.getloadavg()[0]:.2f} at the end; wall time {time.time() - t_start:.0f} s.", "",
             "| trainer | batch | ms / step | IQR ms | ratio to nnUNetTrainer |", "|---|---|---|---|---|"]
    for n, t in times.items():
        lines.append(f"| {n} | {shapes[n]} | {statistics.median(t) * 1000:.0f} | {np.percentile(t, 25) * 1000:.0f}-"
                     f"{np.percentile(t, 75) * 1000:.0f} | {statistics.median(t) / base:.2f} |")
    lines += ["", "| data loader, one batch, in this process | ms / batch | ratio |", "|---|---|---|"]
    lines += [f"| {n} | {statistics.median(t) * 1000:.0f} | {statistics.median(t) / lbase:.2f} |" for n, t in lt.items()]
    lines += ["", f"Command: `python benchmarks/supercl_cost.py --steps {args.steps}`"
              + (f" --trainer {args.trainer}" if args.trainer != "nnUNetTrainerSuperCL" else "")]
    step_cost.write_report("\n".join(lines), args.out)
    print(json.dumps({k: statistics.median(v) for k, v in times.items()}))
    loader._finish() if hasattr(loader, "_finish") else None


if __name__ == "__main__":
    sys.exit(main())
