"""`nnUNetv2_cl_demo`: pretrain -> fine-tune -> predict, scratch vs. pretrained, through nnU-Net's own commands.

Default data: synthetic CT-like phantoms made on the spot (nnunet_cl.phantom; synthetic, not patient data).
With `--dataset FOLDER` it runs on a real dataset in MSD layout (e.g. ../shared/data/Task04_Hippocampus) or
nnU-Net raw layout (imagesTr/labelsTr/dataset.json). Everything goes to its own nnUNet_raw/_preprocessed/
_results under --work, so a user's folders are never touched.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from nnunet_cl.ext_path import ext_trainer_path
from nnunet_cl.paths import is_msd_dataset_json

DEMO_ID = 991
SEED_ENV = "nnUNet_cl_demo_seed"  # the demo's --seed, read by its trainers (nnunet_cl_trainers.demo)
NEXT_TRAINER = "nnUNetTrainerSuperCL_quick"  # what the way-on lines suggest trying next
ARMS = {"scratch (nnUNetTrainer)": "nnUNetTrainer_clDemo", "SimCLR pretrained": "nnUNetTrainerSimCLR_clDemo"}


class EpochStatus:
    """Condenses nnU-Net's training output into one console line per epoch: its number (and stage), the losses
    and the epoch time. Lines are nnU-Net's log lines, ``<date> <time>: <message>``."""

    KEEP = ("train_loss", "val_loss", "Pseudo dice", "contrastive")

    def __init__(self, out=None):
        self.out, self.epoch, self.parts = out or sys.stdout, None, []

    def feed(self, line: str) -> None:
        message = line.split(": ", 1)[1].strip() if re.match(r"^\d{4}-\d\d-\d\d [\d:.]+: ", line) else ""
        if message.startswith("Epoch time:"):
            if self.epoch is not None:
                seconds = message.removeprefix("Epoch time:").strip()
                print(f"  {self.epoch}: {', '.join(self.parts)}; {seconds}", file=self.out, flush=True)
            self.epoch, self.parts = None, []
        elif re.match(r"Epoch \d+", message):
            self.epoch, self.parts = message.replace("Epoch", "epoch", 1), []
        elif self.epoch is not None and message.startswith(self.KEEP):
            self.parts.append(re.sub(r"np\.float\d+\(([^)]*)\)", r"\1", message))  # numpy 2's scalar repr


def _run(cmd: list[str], env: dict, log: Path) -> None:
    """Run one nnU-Net command, its output to `log` and one line per training epoch to the console; on failure
    show the tail and stop."""
    print(f"$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    status = EpochStatus()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              encoding="utf-8", errors="replace") as proc:
            for line in proc.stdout:
                f.write(line)
                f.flush()
                status.feed(line)
        code = proc.returncode
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


def unlearned_structures(scores: dict[str, dict], label_names: dict | None = None, below: float = 0.0005) -> list[str]:
    """Names of the classes whose Dice is below `below` (0.000 as the table prints it) in every arm."""
    names = {str(v): k for k, v in (label_names or {}).items() if isinstance(v, int)}
    classes = sorted({c for s in scores.values() for c in s["mean"]}, key=lambda c: int(c) if str(c).isdigit() else c)
    return [names.get(str(c), str(c)) for c in classes
            if all(s["mean"][c]["Dice"] < below for s in scores.values() if c in s["mean"])]


def way_on(env: dict, work: Path, dataset: Path, trainer: str = NEXT_TRAINER) -> str:
    """The exact lines that go on by hand with the demo's dataset: its nnU-Net folders, then train, predict, export."""
    d, q = str(DEMO_ID), shlex.quote
    exports = " ".join(f"{k}={q(env[k])}" for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results",
                                                    "nnUNet_extTrainer"))
    pred, model = q(str(work / "my_predictions")), q(str(work / "my_model_for_stock_nnunet"))
    return "\n".join([
        "To go on by hand with this dataset (another method, longer schedules, your own data later):",
        f"  export {exports}",
        f"  nnUNetv2_train {d} 3d_fullres 0 -tr {trainer} -device cpu",
        f"  nnUNetv2_predict -i {q(str(dataset / 'imagesTs'))} -o {pred} -d {d} -c 3d_fullres -tr {trainer} -f 0 -device cpu",
        f"  nnUNetv2_cl_export -d {d} -tr {trainer} -c 3d_fullres -o {model}"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="nnunet_cl_demo", help="working folder (default ./nnunet_cl_demo)")
    parser.add_argument("--dataset", default=None, help="real dataset folder (MSD or nnU-Net raw layout)")
    parser.add_argument("--labeled", type=int, default=4, help="labeled training cases used for fine-tuning")
    parser.add_argument("--quick", action="store_true", help="tiny schedule and data (used by the test suite)")
    parser.add_argument("--overwrite", action="store_true", help="start again from an empty --work folder")
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed of both arms (initialisation, patches, augmentation); the same seed "
                             "gives the same table. Default: 0")
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
    env.setdefault("nnUNet_n_proc_DA", "1")  # one worker per augmenter: batches in a fixed order (repeatable)
    if env["nnUNet_n_proc_DA"] not in ("0", "1"):
        print(f"Note: nnUNet_n_proc_DA={env['nnUNet_n_proc_DA']} is set: with several augmentation workers nnU-Net "
              f"takes batches in the order they finish, so the same --seed does not repeat the table exactly "
              f"(unset it, or set it to 1, for that).", flush=True)
    env[SEED_ENV] = str(args.seed)
    env["PYTHONUNBUFFERED"] = "1"  # nnU-Net's epoch lines reach the console as they are printed
    env.setdefault("nnUNet_def_n_proc", "2")  # nnU-Net spawns 8 export workers by default: slow on 2 cores
    log = work / "demo_log.txt"
    suffix = "Quick" if args.quick else ""
    print(f"nnunet-cl demo in {work} (command output in {log}); training seed {args.seed}", flush=True)

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
    labels = json.loads((dataset / "dataset.json").read_text())["labels"]
    table = dice_table(scores, labels)
    missing = unlearned_structures(scores, labels)
    if missing:
        it = "it" if len(missing) == 1 else "them"
        table += (f"\n\n{', '.join(missing)}: Dice 0.000 in both arms. Neither arm has learned {it} within the "
                  f"demo's short schedule (a few hundred fine-tuning steps on {args.labeled} labeled cases); small "
                  f"structures are learned last. This is the demo's budget, not a property of the method.")
    (work / "dice_table.md").write_text(table + "\n")
    print(f"\nDice on {len(list((dataset / 'labelsTs').iterdir()))} held-out test cases, {args.labeled} labeled "
          f"training cases ({'real data: ' + args.dataset if args.dataset else 'synthetic phantoms'}), training "
          f"seed {args.seed}:\n")
    print(table)
    print(f"\nTotal time {(time.time() - t_start) / 60:.1f} min. Training curves: "
          f"{work / 'nnUNet_results' / dataset.name}/*/fold_0/progress.png\n")
    print(way_on(env, work, dataset))


if __name__ == "__main__":
    main()
