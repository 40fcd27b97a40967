"""SepaReg costs on a preprocessed dataset: separation time per volume, and the cost of a pretraining step in
each phase (region, expert, distill) against one plain nnUNetTrainer step, measured in the same run.

Steps go through the trainers' real `train_step`. The nnUNetTrainer step gets a random batch of the plans' patch
and batch size (benchmarks/step_cost.py's fake_batch); the SepaReg steps get real region crops from the dataset's
region cache (built here first if missing, exactly as the trainer builds it). Steps alternate between trainers
so machine load affects both alike; medians of `--steps` timed steps after 2 warm-up steps.

Usage (nnUNet_preprocessed set; the dataset planned and preprocessed, pool optional):
  python benchmarks/separeg_cost.py -d 951 -c 3d_fullres --steps 5 [--trainer nnUNetTrainerSepaReg] [--separation]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_cost import fake_batch, make_trainer  # noqa: E402


def separation_times(trainer) -> list[tuple[str, tuple, float, int]]:
    """Separate every pool case once, in this process on one core (not cached): (case, shape, seconds, regions)."""
    from threadpoolctl import threadpool_limits

    from nnunet_cl.pool import list_pool
    from nnunet_cl.case_cache import PreprocessedCaseLoader
    from nnunet_cl.methods.separeg.separation import separate_case
    members = list_pool(trainer.preprocessed_dataset_folder_base, trainer.configuration_manager.data_identifier,
                        trainer.fold)
    out = []
    with threadpool_limits(1):
        for folder, ident in members:
            img, sp = PreprocessedCaseLoader(folder, ident, spacing=trainer.configuration_manager.spacing)()
            t0 = time.perf_counter()
            res = separate_case(img, sp, **trainer.separation_params())
            out.append((ident, img.shape, time.perf_counter() - t0, len(res["region_ids"])))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True)
    parser.add_argument("-c", default="3d_fullres")
    parser.add_argument("-p", default="nnUNetPlans")
    parser.add_argument("--trainer", default="nnUNetTrainerSepaReg")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--separation", action="store_true", help="also time the separation of every pool case")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count())
    os.environ.setdefault("nnUNet_results", tempfile.mkdtemp(prefix="nnunet_cl_bench_"))

    plain = make_trainer("nnUNetTrainer", args.d, args.c, args.p)
    sepa = make_trainer(args.trainer, args.d, args.c, args.p)
    lines = []
    if args.separation:
        rows = separation_times(sepa)
        per = [s / (np.prod(shape) / 128 ** 3) for _, shape, s, _ in rows]
        lines += ["| case | shape | seconds | s per 128^3 | regions kept |", "|---|---|---|---|---|"]
        lines += [f"| {c} | {'x'.join(map(str, sh))} | {s:.2f} | {p:.2f} | {r} |"
                  for (c, sh, s, r), p in zip(rows, per)]
        lines += [f"\nSeparation, one core: median {statistics.median(r[2] for r in rows):.2f} s per volume, "
                  f"{statistics.median(per):.2f} s per 128^3 (max {max(per):.2f}).\n"]
    t0 = time.perf_counter()
    sepa.prepare_regions()  # separation of missing cases + loading, as at the start of pretraining
    lines.append(f"Region cache ready in {time.perf_counter() - t0:.1f} s: {len(sepa.sepa.regions)} crops of "
                 f"{sepa.crop_size}^3; encoder stage pooled: {sepa.resolved_feature_stage()} of "
                 f"{len(sepa.unwrapped_network.encoder.stages)}.\n")
    # the first epoch of each phase (cluster + experts from the base as the schedule does)
    phases = {"region": 0, "expert": sepa.region_epochs,
              "distill": sepa.region_epochs + sepa.k * sepa.expert_epochs}
    g = torch.Generator().manual_seed(0)
    times = {"nnUNetTrainer": []} | {p: [] for p in phases}
    t_cluster = None
    for phase, epoch in phases.items():
        sepa.current_epoch = epoch
        t0 = time.perf_counter()
        sepa.on_train_epoch_start()
        if phase == "expert":
            t_cluster = time.perf_counter() - t0
        for i in range(2 + args.steps):
            if phase == "region":  # alternate with the plain steps in one phase only: they cost the most
                batch = fake_batch(plain, g)
                t0 = time.perf_counter()
                plain.train_step(batch)
                if i >= 2:
                    times["nnUNetTrainer"].append(time.perf_counter() - t0)
            batch = sepa.next_region_batch()
            t0 = time.perf_counter()
            sepa.train_step(batch)
            if i >= 2:
                times[phase].append(time.perf_counter() - t0)
    base = statistics.median(times["nnUNetTrainer"])
    lines += [f"Step cost on {plain.plans_manager.dataset_name} {args.c}: nnUNetTrainer patch "
              f"{list(plain.configuration_manager.patch_size)} x batch {plain.batch_size}; {args.trainer} "
              f"{sepa.regions_per_step} regions x 2 views of {sepa.crop_size}^3; {torch.get_num_threads()} torch "
              f"threads, {args.steps} timed steps each (median), CPU.", "",
              "| step | ms / step | ratio to nnUNetTrainer | regions / s |", "|---|---|---|---|"]
    for name, t in times.items():
        med = statistics.median(t)
        rps = "" if name == "nnUNetTrainer" else f"{sepa.regions_per_step / med:.1f}"
        lines.append(f"| {name} | {med * 1000:.0f} | {med / base:.2f} | {rps} |")
    lines.append(f"\nk-means (embedding {len(sepa.sepa.regions)} crops + clustering, once): {t_cluster:.1f} s")
    lines.append(f"\nCommand: python benchmarks/separeg_cost.py -d {args.d} -c {args.c} --trainer {args.trainer} "
                 f"--steps {args.steps}" + (" --separation" if args.separation else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
