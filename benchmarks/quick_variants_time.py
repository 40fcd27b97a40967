"""Wall time of each method family's `_quick` variant through `nnUNetv2_train ... -device cpu` on real MRI.

The dataset is the one of benchmarks/supercl_cost.py (MSD Task04 hippocampus from ../shared/data: `--cases`
labeled cases, `--pool` ingested unlabeled ones, stock nnUNetPlans; made once and reused). Each variant trains
fold 0 from scratch (its results folder is removed first), including what its first start computes (SepaReg's
separation, SuperCL's supervoxels: their caches are removed too) and nnU-Net's final validation, as a user's
first try would. The table goes to `--out` with the machine's load before and after each run.

Usage:  python benchmarks/quick_variants_time.py [--work /tmp/nnunet_cl_supercl_bench] [--out FILE]
"""
import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from os.path import dirname, join
from pathlib import Path

_spec = importlib.util.spec_from_file_location("supercl_cost", join(dirname(os.path.abspath(__file__)),
                                                                    "supercl_cost.py"))
supercl_cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(supercl_cost)

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["nnUNetTrainerSimCLR_quick", "nnUNetTrainerPolyCL_quick", "nnUNetTrainerSuperCL_quick",
            "nnUNetTrainerSepaReg_quick", "nnUNetTrainerDCLSeg_quick", "nnUNetTrainerPCLMix_quick"]
CACHES = ("nnunet_cl_separeg", "nnunet_cl_supercl")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/nnunet_cl_supercl_bench")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--pool", type=int, default=20)
    p.add_argument("--trainers", nargs="+", default=FAMILIES)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quick_variants_time_hippocampus.md"))
    args = p.parse_args(argv)
    work = Path(args.work)
    supercl_cost.prepare(work, args.cases, args.pool)
    env = {**os.environ, "nnUNet_extTrainer": subprocess.check_output(["nnUNetv2_cl_ext_trainer_path"], text=True)
           .strip()}
    pre = work / "nnUNet_preprocessed" / supercl_cost.DATASET
    rows = []
    for trainer in args.trainers:
        shutil.rmtree(work / "nnUNet_results" / supercl_cost.DATASET / f"{trainer}__nnUNetPlans__3d_fullres",
                      ignore_errors=True)
        for cache in CACHES:
            shutil.rmtree(pre / cache, ignore_errors=True)
        load0, t0 = os.getloadavg()[0], time.time()
        proc = subprocess.run(["nnUNetv2_train", supercl_cost.DATASET_ID, "3d_fullres", "0", "-tr", trainer, "-device",
                               "cpu"], env=env, capture_output=True, text=True)
        seconds, load1 = time.time() - t0, os.getloadavg()[0]
        status = "ok" if proc.returncode == 0 else f"failed ({proc.returncode}): {proc.stderr.strip()[-200:]}"
        rows.append(f"| `{trainer}` | {seconds / 60:.1f} | {load0:.1f} / {load1:.1f} | {status} |")
        print(rows[-1], flush=True)
    lines = [f"# Quick variants: wall time of a first try on {supercl_cost.DATASET} (stock nnUNetPlans, 3d_fullres)",
             "", f"{args.cases} labeled cases (fold 0 trains on 4/5 of them) and {args.pool} ingested unlabeled "
             f"scans; CPU with {os.cpu_count()} cores, `nnUNetv2_train ... -device cpu` with nnU-Net's default "
             f"workers; each run from an empty results folder and empty method caches, final validation included.",
             "", "| trainer | minutes | load before / after | result |", "|---|---|---|---|", *rows, "",
             "Command: `python benchmarks/quick_variants_time.py`"]
    supercl_cost.step_cost.write_report("\n".join(lines), args.out)


if __name__ == "__main__":
    sys.exit(main())
