"""PCLMix on ACDC scribbles against scribble-only nnU-Net and fully supervised nnU-Net (issue #23's benchmark).

Arms, every one on the same plans variant (nnUNetPlans_clBench: --patch, --batch_size, --width), the same
supervised budget (nnUNetTrainer_<schedule>'s epochs x iterations) and the same folds (5 folds by patient, written
by nnUNetv2_cl_scribbles_to_nnunet; both datasets hold the same cases and splits):
  scribble  nnUNetTrainer_<schedule> on Dataset960 (scribbles, unannotated = ignore label: nnU-Net's partial loss)
  pclmix    nnUNetTrainerPCLMix_<schedule> on Dataset960
  full      nnUNetTrainer_<schedule> on Dataset961 (the dense labels)
Each run predicts its fold's validation cases (nnUNetv2_predict, no test-time mirroring) and is scored against the
dense labels (nnUNetv2_evaluate_folder). Everything is resumable: a finished run, prediction or score is kept; an
interrupted training continues with --c. Each command is logged with its wall time and the load average.

Usage (nnUNet_extTrainer=$(nnUNetv2_cl_ext_trainer_path) exported; the script sets the nnUNet_* folders itself):
  python benchmarks/pclmix_acdc.py --work /work/pclmix_bench --folds 0 1 2 --schedule clBenchQuick \
      --patch 8 128 128 --batch_size 2 --width 16
  python benchmarks/pclmix_acdc.py --work /work/pclmix_bench --folds 0 1 2 --schedule clBenchQuick --report_only
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ARMS = {"scribble": ("nnUNetTrainer_{s}", 960), "pclmix": ("nnUNetTrainerPCLMix_{s}", 960),
        "full": ("nnUNetTrainer_{s}", 961)}
NAMES = {960: "Dataset960_ACDCScribbles", 961: "Dataset961_ACDCDense"}
STRUCTURES = {"1": "RV", "2": "MYO", "3": "LV"}


def log(work: Path, text: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {text}"
    print(line, flush=True)
    with open(work / "pclmix_acdc_log.txt", "a") as f:
        f.write(line + "\n")


def sh(work: Path, cmd: list, env: dict) -> None:
    t0 = time.time()
    log(work, " ".join(map(str, cmd)))
    with open(work / "pclmix_acdc_commands.txt", "a") as out:
        subprocess.run(list(map(str, cmd)), env=env, check=True, stdout=out, stderr=subprocess.STDOUT)
    log(work, f"  done in {time.time() - t0:.0f} s (load {os.getloadavg()[0]:.1f})")


def set_up(work: Path, source: str, env: dict, args) -> None:
    from nnunet_cl.bench.design import write_bench_plans
    raw, pre = Path(env["nnUNet_raw"]), Path(env["nnUNet_preprocessed"])
    for d, labels in ((960, "scribbles"), (961, "dense")):
        if not (raw / NAMES[d]).is_dir():
            sh(work, ["nnUNetv2_cl_scribbles_to_nnunet", "-i", source, "-d", d, "-n", NAMES[d].split("_", 1)[1],
                      "--labels", labels], env)
        if not list((pre / NAMES[d] / "nnUNetPlans_3d_fullres").glob("*.b2nd")):
            sh(work, ["nnUNetv2_plan_and_preprocess", "-d", d, "-c", "3d_fullres", "-np", "1"], env)
        cfg = write_bench_plans(pre / NAMES[d], patch=args.patch, batch_size=args.batch_size, width=args.width,
                                topology="planned")
        log(work, f"{NAMES[d]}: nnUNetPlans_clBench patch {cfg['patch_size']}, batch {cfg['batch_size']}, "
                  f"features {cfg['architecture']['arch_kwargs']['features_per_stage']}")


def run_arm(work: Path, env: dict, arm: str, fold: int, schedule: str) -> Path:
    trainer, d = ARMS[arm]
    trainer = trainer.format(s=schedule)
    results = Path(env["nnUNet_results"]) / NAMES[d] / f"{trainer}__nnUNetPlans_clBench__3d_fullres"
    folder = results / f"fold_{fold}"
    if not (folder / "checkpoint_final.pth").exists():
        resume = ["--c"] if (folder / "checkpoint_latest.pth").exists() else []
        sh(work, ["nnUNetv2_train", d, "3d_fullres", fold, "-tr", trainer, "-p", "nnUNetPlans_clBench", "-device",
                  "cpu", *resume], env)
    out = work / "predictions" / schedule / arm / f"fold_{fold}"
    if not (out / "summary.json").exists():
        splits = json.loads((Path(env["nnUNet_preprocessed"]) / NAMES[d] / "splits_final.json").read_text())
        inputs = work / "inputs" / f"fold_{fold}"
        inputs.mkdir(parents=True, exist_ok=True)
        for case in splits[fold]["val"]:
            link = inputs / f"{case}_0000.nii.gz"
            if not link.exists():
                link.symlink_to(Path(env["nnUNet_raw"]) / NAMES[960] / "imagesTr" / f"{case}_0000.nii.gz")
        sh(work, ["nnUNetv2_predict", "-i", inputs, "-o", out, "-d", d, "-c", "3d_fullres", "-tr", trainer, "-p",
                  "nnUNetPlans_clBench", "-f", fold, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
        dense = Path(env["nnUNet_raw"]) / NAMES[960] / "labelsTr_dense"
        sh(work, ["nnUNetv2_evaluate_folder", dense, out, "-djfile", Path(env["nnUNet_raw"]) / NAMES[961] /
                  "dataset.json", "-pfile", results / "plans.json", "-np", "1", "--chill"], env)
    return out / "summary.json"


def report(work: Path, folds: list, schedule: str) -> str:
    scores = {}  # arm -> fold -> {structure: dice}
    for arm in ARMS:
        for fold in folds:
            f = work / "predictions" / schedule / arm / f"fold_{fold}" / "summary.json"
            if f.exists():
                mean = json.loads(f.read_text())["mean"]
                scores.setdefault(arm, {})[fold] = {s: mean[s]["Dice"] for s in STRUCTURES}
    lines = [f"ACDC scribbles, schedule {schedule}, folds by patient {folds}: Dice on each fold's validation cases "
             f"(dense labels), mean over folds (sd)", "",
             "| arm | folds | " + " | ".join(STRUCTURES.values()) + " | mean |", "|---" * (len(STRUCTURES) + 3) + "|"]
    for arm, per_fold in scores.items():
        m = np.array([[d[s] for s in STRUCTURES] for d in per_fold.values()])
        cells = [f"{m[:, i].mean():.3f} ({m[:, i].std(ddof=1) if len(m) > 1 else 0:.3f})" for i in range(m.shape[1])]
        means = m.mean(1)
        lines.append(f"| {arm} | {len(m)} | " + " | ".join(cells) +
                     f" | {means.mean():.3f} ({means.std(ddof=1) if len(means) > 1 else 0:.3f}) |")
    for a, b in (("pclmix", "scribble"), ("full", "pclmix")):
        common = sorted(set(scores.get(a, {})) & set(scores.get(b, {})))
        if len(common) >= 2:
            from scipy import stats
            diff = np.array([np.mean([scores[a][f][s] - scores[b][f][s] for s in STRUCTURES]) for f in common])
            half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
            lines.append(f"\n{a} − {b}, mean Dice, paired over folds {common}: {diff.mean():+.3f} "
                         f"(95% interval {diff.mean() - half:+.3f} … {diff.mean() + half:+.3f})")
    text = "\n".join(lines) + "\n"
    (work / f"pclmix_acdc_{schedule}.md").write_text(text)
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True)
    parser.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared/data/ACDC_scribbles"))
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--schedule", default="clBenchQuick", choices=["clBench", "clBenchQuick"])
    parser.add_argument("--patch", type=int, nargs=3, default=[8, 128, 128])
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--report_only", action="store_true")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        env = dict(os.environ)
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            (work / name).mkdir(exist_ok=True)
            env[name] = str(work / name)
        env.setdefault("nnUNet_n_proc_DA", "1")
        env.setdefault("nnUNet_compile", "0")
        set_up(work, args.source, env, args)
        for fold in args.folds:  # fold by fold, so that a partial table already pairs the arms
            for arm in args.arms:
                run_arm(work, env, arm, fold, args.schedule)
                print(report(work, args.folds, args.schedule))
    print(report(work, args.folds, args.schedule))


if __name__ == "__main__":
    sys.exit(main())
