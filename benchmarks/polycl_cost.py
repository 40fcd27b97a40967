"""Cost of one PolyCL pretraining step against one plain nnUNetTrainer step, same plans, same run.

benchmarks/step_cost.py builds the two-view batch of SimCLR-style trainers; PolyCL's batch is different
(N patches of the pretraining patch, their case indices and organ presence), so this script builds that one and
reuses step_cost's trainer construction and the nnUNetTrainer batch. Both steps go through the trainers' real
`train_step`; steps alternate between the two trainers so machine load affects both alike; medians are reported.

Optionally (--loader) it also times the data side on the real preprocessed cases: one batch of nnU-Net's own
training loader (batch x plans patch, nnU-Net augmentation) against one batch of PolyCL's patch loader.
Peak memory: each of the two steps once more in a fresh process (VmHWM; see peak_rss_mb).

Usage (a preprocessed dataset; nnUNet_preprocessed set):
  python benchmarks/polycl_cost.py -d 971 -c 3d_fullres --steps 5 [--loader] [--strategy M --loss_form triplet]
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from os.path import dirname, join

import numpy as np
import torch

_spec = importlib.util.spec_from_file_location("step_cost", join(dirname(os.path.abspath(__file__)), "step_cost.py"))
step_cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_cost)

POLYCL = "nnUNetTrainerPolyCL"


def polycl_batch(trainer, generator: torch.Generator) -> dict:
    """A batch with the layout PolyCLPatchLoader gives: n_cases x patches_per_case patches, ids, presence."""
    n, ppc = trainer.get_pretrain_batch_size(), trainer.patches_per_case
    patch = trainer.get_pretrain_patch_size()
    case_index = torch.arange(n // ppc).repeat_interleave(ppc)
    presence = torch.randint(-1, 2, (n,), generator=generator).to(torch.int8)
    return {"data": torch.randn((n, trainer.num_input_channels, *patch), generator=generator),
            "case_index": case_index, "organ_present": presence, "keys": [str(int(i)) for i in case_index]}


def make_polycl(args):
    """The PolyCL trainer, imported directly (works before trainers/__init__.py exports it)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_cl.paths import preprocessed_folder
    from nnunet_cl_trainers.polycl import nnUNetTrainerPolyCL
    folder = preprocessed_folder(args.d)
    plans = load_json(join(folder, args.p + ".json"))
    plans["continue_training"] = False
    trainer = nnUNetTrainerPolyCL(plans, args.c, 0, load_json(join(folder, "dataset.json")), torch.device("cpu"))
    trainer.strategy, trainer.loss_form = args.strategy, args.loss_form
    trainer.initialize()
    trainer.network.train()
    return trainer


def batch_for(name, trainer, g):
    return polycl_batch(trainer, g) if name == POLYCL else step_cost.fake_batch(trainer, g)


def time_steps(trainers: dict, steps: int, warmup: int = 1) -> dict:
    g = torch.Generator().manual_seed(0)
    times = {k: [] for k in trainers}
    for i in range(warmup + steps):
        for name, tr in trainers.items():
            batch = batch_for(name, tr, g)
            t0 = time.perf_counter()
            tr.train_step(batch)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def time_loaders(trainers: dict, n: int) -> dict:
    """Seconds per batch of each trainer's real training loader, single-threaded (nnUNet_n_proc_DA=0)."""
    os.environ["nnUNet_n_proc_DA"] = "0"
    out = {}
    for name, tr in trainers.items():
        loader = tr.get_pretrain_dataloader() if name == POLYCL else tr.get_dataloaders()[0]
        next(loader)  # first batch opens files
        t = []
        for _ in range(n):
            t0 = time.perf_counter()
            next(loader)
            t.append(time.perf_counter() - t0)
        out[name] = t
    return out


def memory_case(args) -> None:
    if args.memory_case == POLYCL:
        tr = make_polycl(args)
    else:
        tr = step_cost.make_trainer("nnUNetTrainer", args.d, args.c, args.p)
    tr.train_step(batch_for(args.memory_case, tr, torch.Generator().manual_seed(0)))
    print(json.dumps({"maxrss_mb": peak_rss_mb()}))


peak_rss_mb = step_cost.peak_rss_mb


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True)
    parser.add_argument("-c", default="3d_fullres")
    parser.add_argument("-p", default="nnUNetPlans")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--strategy", default="M")
    parser.add_argument("--loss_form", default="infonce")
    parser.add_argument("--loader", action="store_true", help="also time one batch of each real data loader")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores, as nnU-Net)")
    parser.add_argument("--out", default=None, help="write a Markdown report here")
    parser.add_argument("--memory_case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count())
    os.environ.setdefault("nnUNet_results", tempfile.mkdtemp(prefix="nnunet_cl_bench_"))
    if args.memory_case:
        return memory_case(args)

    trainers = {"nnUNetTrainer": step_cost.make_trainer("nnUNetTrainer", args.d, args.c, args.p),
                POLYCL: make_polycl(args)}
    times = time_steps(trainers, args.steps)
    base = statistics.median(times["nnUNetTrainer"])
    plain, poly = trainers["nnUNetTrainer"], trainers[POLYCL]
    shapes = {"nnUNetTrainer": f"{plain.batch_size} x {list(plain.configuration_manager.patch_size)}, full U-Net",
              POLYCL: f"{poly.get_pretrain_batch_size()} x {poly.get_pretrain_patch_size()}, encoder + head "
                      f"(PolyCL-{args.strategy}, {args.loss_form})"}
    rows = [f"| {n} | {shapes[n]} | {statistics.median(t) * 1000:.0f} | {np.percentile(t, 25) * 1000:.0f}-"
            f"{np.percentile(t, 75) * 1000:.0f} | {statistics.median(t) / base:.2f} |" for n, t in times.items()]
    mem = {}
    for case in ("nnUNetTrainer", POLYCL):
        proc = subprocess.run([sys.executable, __file__, "-d", args.d, "-c", args.c, "-p", args.p, "--strategy",
                               args.strategy, "--loss_form", args.loss_form, "--memory_case", case],
                              capture_output=True, text=True, encoding="utf-8", errors="replace", env=os.environ)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        mem[case] = json.loads(proc.stdout.strip().splitlines()[-1])["maxrss_mb"]
    lines = [f"PolyCL step cost on {plain.plans_manager.dataset_name} {args.c}, {torch.get_num_threads()} torch "
             f"threads, CPU, {args.steps} timed steps each (median; interquartile range).", "",
             "| trainer | batch | ms / step | IQR ms | ratio to nnUNetTrainer |", "|---|---|---|---|---|", *rows, "",
             "| peak memory of one step (VmHWM, fresh process) | MB | ratio |", "|---|---|---|",
             f"| nnUNetTrainer | {mem['nnUNetTrainer']:.0f} | 1.00 |",
             f"| {POLYCL} pretraining | {mem[POLYCL]:.0f} | {mem[POLYCL] / mem['nnUNetTrainer']:.2f} |"]
    if args.loader:
        lt = time_loaders(trainers, max(3, args.steps))
        lb = statistics.median(lt["nnUNetTrainer"])
        lines += ["", "| data loader, one batch, single process | ms / batch | ratio |", "|---|---|---|"]
        lines += [f"| {n} | {statistics.median(t) * 1000:.0f} | {statistics.median(t) / lb:.2f} |"
                  for n, t in lt.items()]
    cmd = f"python benchmarks/polycl_cost.py -d {args.d} -c {args.c} --steps {args.steps} --strategy {args.strategy} " \
          f"--loss_form {args.loss_form}" + (" --loader" if args.loader else "")
    lines += ["", f"Command: {cmd}"]
    report = "\n".join(lines)
    step_cost.write_report(report, args.out)


if __name__ == "__main__":
    main()
