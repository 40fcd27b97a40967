"""What the shared training step costs (issue "One training step for every method"), in one run:

1. step cost of every method's pretraining step and of a staged trainer's fine-tuning step against a plain
   nnUNetTrainer step on the same plans (steps interleaved, so machine load hits all alike; median);
2. peak memory (VmHWM) of a few steps of each, every case in a fresh process;
3. 1 against 2 CPU processes (torch.distributed, gloo) on the same global SimCLR batch: throughput and scaling
   efficiency (the 2 processes share the machine's cores: 1 thread each against 2 threads for 1 process).

Batches have the shapes the trainers' loaders produce (contents random: cost does not depend on them).

Usage (a preprocessed dataset with nnUNet_preprocessed set; writes a Markdown report):
  python benchmarks/machinery_cost.py -d 905 -c 3d_fullres --steps 10 --out benchmarks/results/machinery_cost.md
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_cost import fake_batch, make_trainer, peak_rss_mb, write_report  # noqa: E402

CASES = ("nnUNetTrainer", "SimCLR pretrain", "PolyCL pretrain", "SepaReg pretrain (region)", "SimCLR fine-tune")


def build(case: str, args):
    """(trainer, batch maker) of one case, in the stage it measures."""
    if case == "nnUNetTrainer":
        tr = make_trainer("nnUNetTrainer", args.d, args.c, args.p)
        return tr, lambda g: fake_batch(tr, g)
    if case == "SimCLR fine-tune":
        tr = make_trainer("nnUNetTrainerSimCLR", args.d, args.c, args.p)
        tr.current_epoch = tr.pretrain_epochs
        tr.optimizer, tr.lr_scheduler = tr.configure_optimizers()
        return tr, lambda g: fake_batch(tr, g)
    if case == "SimCLR pretrain":
        tr = make_trainer("nnUNetTrainerSimCLR", args.d, args.c, args.p)
        n = max(2, tr.batch_size // 2)  # the trainer's default samples per step (two views each)
        patch = list(tr.configuration_manager.patch_size)
        return tr, lambda g: {"data": torch.randn((n, 1, *patch), generator=g),
                              "data2": torch.randn((n, 1, *patch), generator=g)}
    if case == "PolyCL pretrain":
        tr = make_trainer("nnUNetTrainerPolyCL", args.d, args.c, args.p)
        n, patch = tr.get_pretrain_batch_size(), tr.get_pretrain_patch_size()
        cases = torch.arange(n) // tr.patches_per_case
        return tr, lambda g: {"data": torch.randn((n, 1, *patch), generator=g), "case_index": cases,
                              "organ_present": None}
    if case == "SepaReg pretrain (region)":
        tr = make_trainer("nnUNetTrainerSepaReg", args.d, args.c, args.p)
        s = tr.crop_size
        tr.set_regions(np.random.default_rng(0).integers(0, 255, (4 * tr.resolved_regions_per_step(), 1, s, s, s),
                                                          dtype=np.uint8), ["random"])
        return tr, lambda g: tr.next_region_batch()
    raise ValueError(case)


def images_per_step(batch: dict) -> int:
    views = 2 if "data2" in batch or "phase" in batch else 1  # SepaReg makes its two views in prepare_batch
    return int(batch["data"].shape[0]) * views


def time_steps(args) -> dict:
    built = {c: build(c, args) for c in CASES}
    g = torch.Generator().manual_seed(0)
    times, shapes = {c: [] for c in CASES}, {}
    for i in range(2 + args.steps):
        for case, (tr, make) in built.items():
            batch = make(g)
            shapes[case] = (images_per_step(batch), list(batch["data"].shape[2:]))
            t0 = time.perf_counter()
            tr.train_step(batch)
            if i >= 2:
                times[case].append(time.perf_counter() - t0)
    return {"times": times, "shapes": shapes}


def memory_child(args) -> None:
    tr, make = build(args.memory_case, args)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        tr.train_step(make(g))
    print(json.dumps({"mb": peak_rss_mb()}))


def measure_memory(args) -> dict:
    out = {}
    for case in CASES:
        runs = []
        for _ in range(args.mem_repeats):
            proc = subprocess.run([sys.executable, __file__, "-d", args.d, "-c", args.c, "-p", args.p,
                                   "--memory_case", case], capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1])["mb"])
        out[case] = runs
    return out


def _ddp_worker(rank: int, world: int, port: int, args, result_file: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(max(1, os.cpu_count() // world))
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    tr = make_trainer("nnUNetTrainerSimCLR", args.d, args.c, args.p)
    patch = list(tr.configuration_manager.patch_size)
    n = args.ddp_batch // world
    g = torch.Generator().manual_seed(rank)
    times = []
    for i in range(2 + args.steps):
        batch = {"data": torch.randn((n, 1, *patch), generator=g), "data2": torch.randn((n, 1, *patch), generator=g)}
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        tr.train_step(batch)
        if world > 1:
            dist.barrier()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        with open(result_file, "w") as f:
            json.dump(times, f)
    if world > 1:
        dist.destroy_process_group()


def measure_scaling(args) -> dict:
    import torch.multiprocessing as mp
    out = {}
    for world in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        result = tempfile.mktemp(suffix=".json")
        mp.spawn(_ddp_worker, args=(world, port, args, result), nprocs=world, join=True)
        with open(result) as f:
            out[world] = json.load(f)
    return out


def measure_clustering(args) -> dict:
    """SepaReg's clustering pass with the default bound: embed cluster_max_regions crops, k-means."""
    tr = make_trainer("nnUNetTrainerSepaReg", args.d, args.c, args.p)
    s, n = tr.crop_size, tr.cluster_max_regions
    tr.set_regions(np.random.default_rng(0).integers(0, 255, (n, 1, s, s, s), dtype=np.uint8), ["random"])
    t0 = time.perf_counter()
    tr.cluster_regions()
    seconds = time.perf_counter() - t0
    steps = tr.pretrain_epochs * tr.pretrain_iterations_per_epoch
    return {"crops": n, "seconds": seconds, "pretrain_steps": steps}


def load_average() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True)
    p.add_argument("-c", default="3d_fullres")
    p.add_argument("-p", default="nnUNetPlans")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--mem_repeats", type=int, default=2)
    p.add_argument("--ddp_batch", type=int, default=4, help="global SimCLR samples per step for 1 vs 2 processes")
    p.add_argument("--out", default=None)
    p.add_argument("--memory_case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("nnUNet_results", tempfile.mkdtemp(prefix="nnunet_cl_bench_"))
    if args.memory_case:
        return memory_child(args)
    t_start, load_before = time.time(), load_average()
    steps = time_steps(args)
    memory = measure_memory(args)
    scaling = measure_scaling(args)
    clustering = measure_clustering(args)
    base = statistics.median(steps["times"]["nnUNetTrainer"])
    mem_base = statistics.median(memory["nnUNetTrainer"])
    rows = []
    for case in CASES:
        t = steps["times"][case]
        imgs, patch = steps["shapes"][case]
        m = memory[case]
        rows.append(f"| {case} | {imgs} x {patch} | {statistics.median(t) * 1000:.0f} | "
                    f"{np.percentile(t, 25) * 1000:.0f}–{np.percentile(t, 75) * 1000:.0f} | "
                    f"{statistics.median(t) / base:.2f} | {statistics.median(m):.0f} ({min(m):.0f}–{max(m):.0f}) | "
                    f"{statistics.median(m) / mem_base:.2f} |")
    t1, t2 = (statistics.median(scaling[w]) for w in (1, 2))
    region_step = statistics.median(steps["times"]["SepaReg pretrain (region)"])
    pretrain_s = clustering["pretrain_steps"] * region_step
    report = "\n".join([
        f"Machinery cost on dataset {args.d} {args.c} ({args.p}), CPU ({os.cpu_count()} cores), "
        f"{time.strftime('%Y-%m-%d')}; load average before {load_before}, after {load_average()}; "
        f"wall time {time.time() - t_start:.0f} s.", "",
        f"Steps through each trainer's train_step, interleaved; median of {args.steps} timed steps (IQR); peak "
        f"memory of 3 steps in a fresh process (median of {args.mem_repeats}, range).", "",
        "| step | images x patch | ms / step | IQR ms | time ratio | peak MB | memory ratio |",
        "|---|---|---|---|---|---|---|", *rows, "",
        f"1 vs 2 processes (gloo), SimCLR pretraining, {args.ddp_batch} samples x 2 views per step in all: ",
        "", "| processes | threads each | ms / step | samples / s | scaling efficiency |", "|---|---|---|---|---|",
        f"| 1 | {os.cpu_count()} | {t1 * 1000:.0f} | {args.ddp_batch / t1:.2f} | 1.00 |",
        f"| 2 | {max(1, os.cpu_count() // 2)} | {t2 * 1000:.0f} | {args.ddp_batch / t2:.2f} | {t1 / t2:.2f} |", "",
        f"SepaReg's clustering pass at the default bound (cluster_max_regions = {clustering['crops']} crops embedded, "
        f"then k-means): {clustering['seconds']:.0f} s, against {pretrain_s / 3600:.1f} h for the default "
        f"pretraining ({clustering['pretrain_steps']} steps at the region step above): "
        f"{100 * clustering['seconds'] / pretrain_s:.2f} %.", "",
        f"Command: python benchmarks/machinery_cost.py -d {args.d} -c {args.c} -p {args.p} --steps {args.steps} "
        f"--mem_repeats {args.mem_repeats} --ddp_batch {args.ddp_batch}"])
    write_report(report, args.out)


if __name__ == "__main__":
    main()
