"""PCLMix's step cost against nnUNetTrainer on the same plans, in the same run, on real scribble batches.

Trainers (each through its real `train_step`, steps alternating so machine load falls on all alike):
  nnUNetTrainer               the plans' batch
  nnUNetTrainer, 2x batch     the floor of any method that trains on [x; x_mix] in one pass
  nnUNetTrainerPCLMix...      with the pixel contrast on (its memory filled by the warm-up steps, the start
                              iteration passed), as in all but the first 1000 steps of a run
Batches: `--batches` real batches from nnU-Net's own loader of fold 0 (scribbles, ignore label), made once and
reused, so anchors, certainty and class means see real sparse labels. `--profile` adds torch.profiler's top
operators of one PCLMix step.

Usage (a dataset from nnUNetv2_cl_scribbles_to_nnunet, planned and preprocessed; nnUNet_* variables set):
  python benchmarks/pclmix_step_cost.py -d 960 -p nnUNetPlans_clBench --steps 10 \
      --out benchmarks/results/pclmix_step_cost_acdc.md
"""
import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from os.path import dirname, join

import numpy as np
import torch

sys.path.insert(0, dirname(os.path.abspath(__file__)))
from step_cost import write_report  # noqa: E402

VARIANTS = {"nnUNetTrainerPCLMix, aux_output_stage 0 (full resolution)": {"aux_output_stage": 0},
            "nnUNetTrainerPCLMix, aux_output_stage 0, aux_width 0.25": {"aux_output_stage": 0, "aux_width": 0.25},
            "nnUNetTrainerPCLMix (defaults: aux_output_stage 1, aux_width 0.5)": {}}


def make(name: str, dataset: str, plans_identifier: str, batch_factor: int = 1, **attributes):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_cl.paths import preprocessed_folder
    folder = preprocessed_folder(dataset)
    plans = load_json(join(folder, plans_identifier + ".json"))
    plans["continue_training"] = False
    plans = copy.deepcopy(plans)
    plans["configurations"]["3d_fullres"]["batch_size"] *= batch_factor
    trainer = recursive_find_trainer_class_by_name(name)(plans, "3d_fullres", 0,
                                                         load_json(join(folder, "dataset.json")), torch.device("cpu"))
    for key, value in attributes.items():
        setattr(trainer, key, value)
    trainer.initialize()
    trainer.network.train()
    return trainer


def real_batches(trainer, n: int) -> list[dict]:
    """n batches from nnU-Net's training loader of the trainer's fold (augmented as in training)."""
    train, val = trainer.get_dataloaders()
    batches = [next(train) for _ in range(n)]
    for loader in (train, val):
        if hasattr(loader, "_finish"):
            loader._finish()
    return batches


def doubled(a: dict, b: dict) -> dict:
    cat = lambda x, y: [torch.cat([u, v]) for u, v in zip(x, y)] if isinstance(x, list) else torch.cat([x, y])  # noqa
    return {"data": torch.cat([a["data"], b["data"]]), "target": cat(a["target"], b["target"])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True)
    p.add_argument("-p", default="nnUNetPlans")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("nnUNet_results", tempfile.mkdtemp(prefix="nnunet_cl_bench_"))
    torch.set_num_threads(os.cpu_count())
    plain = make("nnUNetTrainer", args.d, args.p)
    batches = real_batches(plain, args.batches)
    trainers = {"nnUNetTrainer": (plain, 1), "nnUNetTrainer, 2x batch": (make("nnUNetTrainer", args.d, args.p, 2), 2)}
    for label, attributes in VARIANTS.items():
        trainers[label] = (make("nnUNetTrainerPCLMix", args.d, args.p, contrast_start_iteration=0, **attributes), 1)
    times = {k: [] for k in trainers}
    load0, t_start = os.getloadavg()[0], time.time()
    for i in range(args.warmup + args.steps):
        for label, (trainer, factor) in trainers.items():
            batch = batches[i % len(batches)]
            if factor == 2:
                batch = doubled(batch, batches[(i + 1) % len(batches)])
            t0 = time.perf_counter()
            out = trainer.train_step(dict(batch))
            if i >= args.warmup:
                times[label].append(time.perf_counter() - t0)
            if i == args.warmup - 1 and "cl_contrast" in out:
                assert float(out["cl_contrast"]) > 0, "the contrast is off after the warm-up: nothing is measured"
    base = statistics.median(times["nnUNetTrainer"])
    rows = [f"| {k} | {statistics.median(t) * 1000:.0f} | {np.percentile(t, 25) * 1000:.0f}–"
            f"{np.percentile(t, 75) * 1000:.0f} | {statistics.median(t) / base:.2f} |" for k, t in times.items()]
    cfg = plain.configuration_manager
    lines = [f"PCLMix step cost on {plain.plans_manager.dataset_name} ({args.p}, 3d_fullres): patch "
             f"{list(cfg.patch_size)}, batch {cfg.batch_size}, features "
             f"{cfg.network_arch_init_kwargs['features_per_stage']}, {torch.get_num_threads()} torch threads, CPU; "
             f"{args.steps} timed steps each after {args.warmup} "
             f"warm-up steps (median; interquartile range), on {args.batches} real augmented batches of fold 0.",
             "", "| trainer | ms / step | IQR ms | ratio to nnUNetTrainer |", "|---|---|---|---|", *rows, "",
             f"Load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after ({time.time() - t_start:.0f} s). "
             f"PCLMix rows run with the pixel contrast on (`contrast_start_iteration = 0`, memory filled by the "
             f"warm-up).", ""]
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        trainer = trainers[list(VARIANTS)[-1]][0]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.train_step(batches[0])
        lines += ["One PCLMix step (defaults), torch.profiler, top operators by self CPU time:", "", "```",
                  prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), "```", ""]
    cmd = " ".join(["python benchmarks/pclmix_step_cost.py", *(argv if argv is not None else sys.argv[1:])])
    lines.append(f"Command: `{cmd}`")
    write_report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
