"""Per-step cost of every trainer of a benchmark schedule against the fine-tuning step, measured in one run on a
benchmark work folder's own plans (docs/benchmarks.md, "Per-step cost of every trainer").

Trainers, each with the schedule's attributes (trainers/benchmark.py):
  nnUNetTrainer_<schedule>            the fine-tuning step every arm takes (batches of nnU-Net's shapes)
  nnUNetTrainerSimCLRPretrain_<s>     two views of its pretraining batch
  nnUNetTrainerPolyCLPretrain_<s>     its patch batch (cases x patches per case)
  nnUNetTrainerSepaRegPretrain_<s>    region, expert and distillation phases, on real crops of the work folder's
                                      region cache (built by the benchmark's SepaReg pretraining); the clusters
                                      are drawn at random, since k-means is timed once per pretraining, not per step
  the same with objective 'byol' (region phase) and distill_loss 'kl' (distillation phase)
Batch contents are random except SepaReg's crops: the cost of a step does not depend on them. Steps go through the
trainers' real `train_step`, interleaved round-robin so machine load affects all alike; medians of --steps
timed steps after one warm-up step.

Usage:
  python benchmarks/schedule_step_cost.py --work /work/bench_hippocampus --schedule clBench --steps 5 \
      --out benchmarks/results/step_cost_clBench_hippocampus.md
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def build(cls, dataset_folder: Path, plans_identifier: str, **attrs):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    plans = dict(load_json(str(dataset_folder / f"{plans_identifier}.json")), continue_training=False)
    trainer = cls(plans, "3d_fullres", 0, load_json(str(dataset_folder / "dataset.json")), torch.device("cpu"))
    for k, v in attrs.items():
        setattr(trainer, k, v)
    trainer.initialize()
    trainer.network.train()
    return trainer


def sepa_in_phase(cls, folder, plans, phase: str, crops=None, **attrs):
    """A SepaReg trainer at the first epoch of `phase` with random clusters (no k-means)."""
    t = build(cls, folder, plans, **attrs)
    if crops is None:
        t.prepare_regions()
    else:
        t.set_regions(*crops)
    n = len(t.sepa.regions)
    t.sepa.assignments = np.random.default_rng(0).integers(0, t.k, n)
    t.current_epoch = {"region": 0, "expert": t.region_epochs,
                       "distill": t.region_epochs + t.k * t.expert_epochs}[phase]
    t.enter_phase()
    return t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="a work folder of nnUNetv2_cl_benchmark (planned and preprocessed)")
    p.add_argument("--schedule", default="clBench")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=None, help="also write the Markdown report here")
    a = p.parse_args()
    work = Path(a.work).resolve()
    settings = json.loads((work / "benchmark.json").read_text())["settings"]
    os.environ["nnUNet_preprocessed"] = str(work / "nnUNet_preprocessed")
    os.environ.setdefault("nnUNet_raw", str(work / "nnUNet_raw"))
    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="nnunet_cl_stepcost_")  # trainers make output folders
    from nnunet_cl.bench.design import BENCH_PLANS
    from nnunet_cl.paths import preprocessed_folder
    from nnunet_cl_trainers import benchmark as bench
    from polycl_cost import polycl_batch
    from step_cost import fake_batch

    folder = Path(preprocessed_folder(str(settings["dataset_id"])))
    s = a.schedule
    cls = {name: getattr(bench, f"{name}_{s}") for name in
           ("nnUNetTrainerSimCLRPretrain", "nnUNetTrainerPolyCLPretrain", "nnUNetTrainerSepaRegPretrain")}
    t0 = time.perf_counter()
    region = sepa_in_phase(cls["nnUNetTrainerSepaRegPretrain"], folder, BENCH_PLANS, "region")
    crops = (region.sepa.regions, region.sepa.region_cases, region.sepa.region_case, region.sepa.region_id)
    load_s = time.perf_counter() - t0

    def sepa(phase: str, **attrs):  # another SepaReg trainer on the same crops, loaded once
        return sepa_in_phase(cls["nnUNetTrainerSepaRegPretrain"], folder, BENCH_PLANS, phase, crops, **attrs)

    trainers = {
        f"nnUNetTrainer_{s} (fine-tuning, every arm)": (build(getattr(bench, f"nnUNetTrainer_{s}"), folder,
                                                              BENCH_PLANS), fake_batch),
        f"SimCLRPretrain_{s}": (build(cls["nnUNetTrainerSimCLRPretrain"], folder, BENCH_PLANS), fake_batch),
        f"PolyCLPretrain_{s}": (build(cls["nnUNetTrainerPolyCLPretrain"], folder, BENCH_PLANS), polycl_batch),
        f"SepaRegPretrain_{s}, region": (region, None),
        f"SepaRegPretrain_{s}, expert": (sepa("expert"), None),
        f"SepaRegPretrain_{s}, distillation": (sepa("distill"), None),
        f"SepaRegPretrain_{s}, region, BYOL": (sepa("region", objective="byol"), None),
        f"SepaRegPretrain_{s}, distillation, KL": (sepa("distill", distill_loss="kl"), None),
    }
    g = torch.Generator().manual_seed(0)
    times = {name: [] for name in trainers}
    shapes = {}
    for i in range(1 + a.steps):
        for name, (tr, make_batch) in trainers.items():
            batch = make_batch(tr, g) if make_batch else tr.next_region_batch()
            shapes[name] = "x".join(map(str, batch["data"].shape))
            t1 = time.perf_counter()
            tr.train_step(batch)
            if i:
                times[name].append(time.perf_counter() - t1)
    base = statistics.median(next(iter(times.values())))
    plain = next(iter(trainers.values()))[0]
    rows = [f"| {n} | {shapes[n]} | {statistics.median(t):.2f} | {min(t):.2f}–{max(t):.2f} | "
            f"{statistics.median(t) / base:.2f} |" for n, t in times.items()]
    load = os.getloadavg()[0]
    report = "\n".join([
        f"Step cost on {plain.plans_manager.dataset_name}, plans {BENCH_PLANS} of {work.name} (patch "
        f"{list(plain.configuration_manager.patch_size)}, batch {plain.batch_size}, features "
        f"{plain.configuration_manager.network_arch_init_kwargs['features_per_stage']}), schedule {s}: "
        f"{a.steps} timed steps each, interleaved, {torch.get_num_threads()} torch threads, CPU, load {load:.1f} at "
        f"the end. SepaReg's {len(region.sepa.regions)} region crops loaded in {load_s:.0f} s.",
        "", "| trainer step | batch (data) | s / step (median) | range | ratio to fine-tuning step |",
        "|---|---|---|---|---|", *rows, "",
        f"Command: python benchmarks/schedule_step_cost.py --work {a.work} --schedule {s} --steps {a.steps}"])
    print(report)
    if a.out:
        Path(a.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
