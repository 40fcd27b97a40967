"""`nnUNetv2_cl_demo`: pretrain -> fine-tune -> predict, scratch vs. pretrained, through nnU-Net's own commands.

Default data: synthetic CT-like phantoms made on the spot (nnunet_cl.phantom; synthetic, not patient data).
With `--dataset FOLDER` it runs on a real dataset in MSD layout (e.g. ../shared/data/Task04_Hippocampus) or
nnU-Net raw layout (imagesTr/labelsTr/dataset.json). Everything goes to its own nnUNet_raw/_preprocessed/
_results under --work, so a user's folders are never touched.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from nnunet_cl.ext_path import ext_trainer_path
from nnunet_cl.paths import is_msd_dataset_json

DEMO_ID = 991
ARMS = {"scratch (nnUNetTrainer)": "nnUNetTrainer_clDemo", "SimCLR pretrained": "nnUNetTrainerSimCLR_clDemo"}


def _run(cmd: list[str], env: dict, log: Path) -> None:
    """Run one nnU-Net command, its output to `log`; on failure show the tail and stop."""
    print(f"$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"Command failed ({code}): {' '.join(cmd)}\n--- last lines of {log} ---\n"
                 + "".join(open(log).readlines()[-30:]))
    print(f"  done in {time.time() - t0:.0f} s", flush=True)


def _real_dataset(src: Path, raw: Path, env: dict, log: Path, n_labeled: int, n_test: int, n_pool: int):
    """Copy a real dataset into the demo's nnUNet_raw: n_labeled training cases, n_test held out, n_pool unlabeled."""
    if not (src / "dataset.json").is_file():
        sys.exit(f"{src} has no dataset.json: give an MSD task folder or an nnU-Net raw dataset folder.")
    staging = raw.parent / "staging"
    if is_msd_dataset_json(json.loads((src / "dataset.json").read_text())):
        staging.mkdir(exist_ok=True)
        _run(["nnUNetv2_convert_MSD_dataset", "-i", str(src), "-np", "1", "-overwrite_id", str(DEMO_ID)],
             {**env, "nnUNet_raw": str(staging)}, log)
        src = next(staging.glob(f"Dataset{DEMO_ID}_*"))
    dj = json.loads((src / "dataset.json").read_text())
    ending = dj["file_ending"]
    cases = sorted(p.name[: -len(ending) - 5] for p in (src / "imagesTr").glob(f"*_0000{ending}"))
    if len(cases) < n_labeled + n_test + 2:
        sys.exit(f"{src} has {len(cases)} labeled cases; the demo needs at least {n_labeled + n_test + 2}.")
    out = raw / f"Dataset{DEMO_ID}_Demo"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    pool = raw.parent / "unlabeled"
    pool.mkdir(exist_ok=True)
    channels = len(dj["channel_names"])
    test, train, rest = cases[:n_test], cases[n_test:n_test + n_labeled], cases[n_test + n_labeled:][:n_pool]
    for group, img_dir, lab_dir in ((train, "imagesTr", "labelsTr"), (test, "imagesTs", "labelsTs")):
        for c in group:
            for ch in range(channels):
                shutil.copy(src / "imagesTr" / f"{c}_{ch:04d}{ending}", out / img_dir)
            shutil.copy(src / "labelsTr" / f"{c}{ending}", out / lab_dir)
    for c in rest:  # labels of these cases are never copied: they are the unlabeled pool
        for ch in range(channels):  # nnU-Net's raw names: nnUNetv2_cl_add_unlabeled groups the channels of a case
            shutil.copy(src / "imagesTr" / f"{c}_{ch:04d}{ending}", pool)
    dj["numTraining"] = len(train)
    (out / "dataset.json").write_text(json.dumps(dj, indent=1))
    shutil.rmtree(staging, ignore_errors=True)
    return out, pool


def dice_table(scores: dict[str, dict], label_names: dict[str, int] | None = None) -> str:
    """Markdown table: per-class and mean foreground Dice of each arm on the held-out test cases."""
    classes = sorted({c for s in scores.values() for c in s["mean"]}, key=lambda c: int(c) if str(c).isdigit() else c)
    names = {str(v): k for k, v in (label_names or {}).items() if isinstance(v, int)}
    lines = ["| arm | " + " | ".join(f"Dice {names.get(str(c), c)}" for c in classes) + " | mean foreground |",
             "|---" * (len(classes) + 2) + "|"]
    for arm, s in scores.items():
        cells = [f"{s['mean'][c]['Dice']:.3f}" for c in classes]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {s['foreground_mean']['Dice']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="nnunet_cl_demo", help="working folder (default ./nnunet_cl_demo)")
    parser.add_argument("--dataset", default=None, help="real dataset folder (MSD or nnU-Net raw layout)")
    parser.add_argument("--labeled", type=int, default=4, help="labeled training cases used for fine-tuning")
    parser.add_argument("--quick", action="store_true", help="tiny schedule and data (used by the test suite)")
    parser.add_argument("--overwrite", action="store_true", help="start again from an empty --work folder")
    args = parser.parse_args(argv)

    t_start = time.time()
    work = Path(args.work).resolve()
    if args.overwrite:
        shutil.rmtree(work, ignore_errors=True)
    if work.exists() and any(work.iterdir()):
        sys.exit(f"{work} is not empty. Use --overwrite to start again, or another --work folder.")
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / name).mkdir(parents=True, exist_ok=True)
        env[name] = str(work / name)
    env["nnUNet_extTrainer"] = ext_trainer_path()
    env.setdefault("nnUNet_compile", "0")
    env.setdefault("nnUNet_n_proc_DA", "2")
    env.setdefault("nnUNet_def_n_proc", "2")  # nnU-Net spawns 8 export workers by default: slow on 2 cores
    log = work / "demo_log.txt"
    suffix = "Quick" if args.quick else ""
    print(f"nnunet-cl demo in {work} (command output in {log})", flush=True)

    raw = work / "nnUNet_raw"
    if args.dataset:
        dataset, pool = _real_dataset(Path(args.dataset).resolve(), raw, env, log, n_labeled=args.labeled + 2,
                                      n_test=4 if args.quick else 10, n_pool=8 if args.quick else 40)
    else:
        from nnunet_cl.phantom import write_phantom_dataset
        shape = (24, 40, 40) if args.quick else (32, 48, 48)
        pool = work / "unlabeled"
        dataset = write_phantom_dataset(raw, DEMO_ID, "Demo", num_labeled=args.labeled + 2,
                                        num_unlabeled=6 if args.quick else 24, unlabeled_folder=pool,
                                        num_test=3 if args.quick else 8, shape=shape, spacing=(2.5, 1.5, 1.5))
        print(f"Synthetic phantom dataset written to {dataset} (synthetic CT-like shapes, not patient data)")
    d = str(DEMO_ID)
    _run(["nnUNetv2_plan_and_preprocess", "-d", d, "-c", "3d_fullres", "-np", "2"], env, log)
    _run(["nnUNetv2_cl_add_unlabeled", "-d", d, "-i", str(pool), "-np", "2"], env, log)
    # fold 0 trains on `labeled` cases; the two other training cases are its fixed validation set
    _run(["nnUNetv2_cl_limited_split", "-d", d, "-k", str(args.labeled), "--seed", "0"], env, log)
    scores = {}
    for arm, trainer in ARMS.items():
        trainer = trainer + suffix
        _run(["nnUNetv2_train", d, "3d_fullres", "0", "-tr", trainer, "-device", "cpu"], env, log)
        pred = work / "predictions" / trainer
        _run(["nnUNetv2_predict", "-i", str(dataset / "imagesTs"), "-o", str(pred), "-d", d, "-c", "3d_fullres",
              "-tr", trainer, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"]
             + (["--disable_tta"] if args.quick else []), env, log)
        _run(["nnUNetv2_evaluate_folder", str(dataset / "labelsTs"), str(pred), "-djfile",
              str(dataset / "dataset.json"), "-pfile", str(work / "nnUNet_results" / dataset.name /
                                                            f"{trainer}__nnUNetPlans__3d_fullres" / "plans.json")],
             env, log)
        scores[arm] = json.loads((pred / "summary.json").read_text())
    table = dice_table(scores, json.loads((dataset / "dataset.json").read_text())["labels"])
    (work / "dice_table.md").write_text(table + "\n")
    print(f"\nDice on {len(list((dataset / 'labelsTs').iterdir()))} held-out test cases, {args.labeled} labeled "
          f"training cases ({'real data: ' + args.dataset if args.dataset else 'synthetic phantoms'}):\n")
    print(table)
    print(f"\nTotal time {(time.time() - t_start) / 60:.1f} min. Training curves: "
          f"{work / 'nnUNet_results' / dataset.name}/*/fold_0/progress.png")


if __name__ == "__main__":
    main()
