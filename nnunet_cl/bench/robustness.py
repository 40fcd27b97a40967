"""`nnUNetv2_cl_robustness`: Dice of trained nnU-Net models on test images under synthetic intensity shifts.

Each model folder (an nnU-Net training output, e.g. .../nnUNetTrainer__nnUNetPlans__3d_fullres) predicts the test
images clean and under every shift of nnunet_cl.methods.dclseg.shifts (gamma, smooth bias field, contrast, noise;
each at its stated strengths), and each prediction is scored against the labels. Written under -o:
  images/<shift>/            the shifted test images (made once, shared by the models)
  predictions/<model>/<shift>/
  robustness.json            Dice per case, class, shift and model
  robustness.md, robustness.png  the table and Dice against shift strength
Reruns skip shifted images and predictions already complete and made with the same settings (source images, seed;
model folder, fold, checkpoint, mirroring); a folder made otherwise is redone. Checkpoints are read with
nnunet_cl.safe_load (weights only) and the stock network is built from the model's plans, so no trainer class is
needed to predict.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from os.path import join
from pathlib import Path

import numpy as np

from nnunet_cl.methods.dclseg.shifts import SHIFTS, apply_shift
from nnunet_cl.paths import NnUNetCLError, save_json_atomic

CLEAN = "clean"
SUPPORTED_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")  # float images SimpleITK writes with their geometry
MANIFEST = "made_with.json"  # what a folder of shifted images or predictions was made from: a change redoes it


def _done(folder: Path, names, settings: dict) -> bool:
    """True when `folder` holds every file of `names` and was made with exactly `settings`."""
    try:
        made_with = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return made_with == settings and all((folder / n).is_file() for n in names)


def conditions(kinds) -> list[tuple[str, str, float]]:
    """(folder name, kind, strength): the clean images first, then every strength of every kind."""
    out = [(CLEAN, CLEAN, 0.0)]
    for kind in kinds:
        out += [(f"{kind}_{s:g}", kind, s) for s in SHIFTS[kind]]
    return out


def test_cases(images: Path, labels: Path, file_ending: str = ".nii.gz") -> list[str]:
    """Case ids with images CASE_0000<ending> (every channel) in `images` and a label CASE<ending> in `labels`."""
    cases = sorted(p.name[:-len("_0000" + file_ending)] for p in images.glob(f"*_0000{file_ending}"))
    if not cases:
        raise NnUNetCLError(f"No test image *_0000{file_ending} in {images}. Fix: pass nnU-Net's imagesTs folder "
                            f"(CASE_0000{file_ending}, one file per channel).")
    missing = [c for c in cases if not (labels / f"{c}{file_ending}").is_file()]
    if missing:
        raise NnUNetCLError(f"{len(missing)} test images have no label in {labels} (e.g. {missing[0]}{file_ending}). "
                            f"Fix: pass the labelsTs folder that belongs to {images}.")
    return cases


def write_shifted(images: Path, out: Path, kind: str, strength: float, seed: int, file_ending: str) -> None:
    """Every image file of `images` under one shift into `out` (skipped when `out` is complete). The random
    draws (bias field, noise) depend on (seed, file index, kind, strength) only."""
    import SimpleITK as sitk
    files = sorted(images.glob(f"*{file_ending}"))
    settings = {"images": str(images.resolve()), "files": [p.name for p in files], "kind": kind,
                "strength": strength, "seed": seed}
    if _done(out, settings["files"], settings):
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, f in enumerate(files):
        if kind == CLEAN:
            shutil.copy(f, tmp / f.name)
            continue
        image = sitk.ReadImage(str(f))
        rng = np.random.default_rng([seed, i, list(SHIFTS).index(kind), int(round(strength * 1000))])
        shifted = sitk.GetImageFromArray(apply_shift(sitk.GetArrayFromImage(image), kind, strength, rng))
        shifted.CopyInformation(image)
        sitk.WriteImage(shifted, str(tmp / f.name))
    (tmp / MANIFEST).write_text(json.dumps(settings))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def load_predictor(model_folder: Path, fold, checkpoint: str, device, tta: bool):
    """nnU-Net's predictor on the stock network of `model_folder`, its weights read with weights_only."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_cl.checkpoints import stock_network
    from nnunet_cl.safe_load import load_checkpoint_file
    path = model_folder / f"fold_{fold}" / checkpoint
    if not path.is_file():
        raise NnUNetCLError(f"No checkpoint {path}. Fix: train that fold first, or pass -f / -chk of one that exists.")
    ckpt = load_checkpoint_file(str(path), map_location="cpu")
    plans = json.loads((model_folder / "plans.json").read_text())
    dataset_json = json.loads((model_folder / "dataset.json").read_text())
    configuration = ckpt["init_args"]["configuration"]
    network = stock_network(plans, dataset_json, configuration)
    plans_manager = PlansManager(plans)
    predictor = nnUNetPredictor(use_mirroring=tta, perform_everything_on_device=device.type == "cuda",
                                device=device, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, plans_manager.get_configuration(configuration),
                                    [ckpt["network_weights"]], dataset_json, ckpt["trainer_name"],
                                    ckpt.get("inference_allowed_mirroring_axes"))
    return predictor, dataset_json


def dice_per_class(prediction: np.ndarray, label: np.ndarray, classes,
                   ignore_label: int | None = None) -> list[float]:
    """Dice of each class; NaN where the class is absent from both (left out of means, as nnU-Net does). Voxels
    the reference marks with `ignore_label` are left out, as nnU-Net's evaluation does."""
    keep = np.ones(label.shape, bool) if ignore_label is None else label != ignore_label
    out = []
    for c in classes:
        p, t = (prediction == c) & keep, (label == c) & keep
        denom = p.sum() + t.sum()
        out.append(float(2 * (p & t).sum() / denom) if denom else float("nan"))
    return out


def score(pred_folder: Path, labels: Path, cases, classes, file_ending: str, ignore_label: int | None = None) -> dict:
    import SimpleITK as sitk
    read = lambda p: sitk.GetArrayFromImage(sitk.ReadImage(str(p)))  # noqa: E731
    return {c: dice_per_class(read(pred_folder / f"{c}{file_ending}"), read(labels / f"{c}{file_ending}"), classes,
                              ignore_label) for c in cases}


def mean_dice(per_case: dict) -> float:
    """nnU-Net's foreground mean: each class's mean over the cases where it is defined, then the mean over classes."""
    per_class = np.array(list(per_case.values()), dtype=float)  # (cases, classes)
    return float(np.nanmean(np.nanmean(per_class, axis=0)))


def strongest(kind: str) -> list[float]:
    """The strongest strengths of a kind: both ends for gamma (darker and brighter), the last otherwise."""
    s = SHIFTS[kind]
    return [s[0], s[-1]] if kind == "gamma" else [s[-1]]


def report(results: dict, models: list[str]) -> str:
    """Markdown: mean foreground Dice per condition and model, its drop from clean; with two models (baseline
    first) the goal check: equal clean Dice within 1 point, the second's drop at most half the first's."""
    conds = list(next(iter(results.values())).keys())
    clean = {m: mean_dice(results[m][CLEAN]) for m in models}
    lines = ["| shift | " + " | ".join(f"{m} Dice | {m} drop" for m in models) + " |",
             "|---|" + "---:|---:|" * len(models)]
    for cond in conds:
        cells = []
        for m in models:
            d = mean_dice(results[m][cond])
            cells += [f"{d:.3f}", "" if cond == CLEAN else f"{clean[m] - d:+.3f}"]
        lines.append(f"| {cond} | " + " | ".join(cells) + " |")
    if len(models) == 2:
        base, method = models
        equal = abs(clean[method] - clean[base]) <= 0.01
        lines += ["", f"Clean Dice: {base} {clean[base]:.3f}, {method} {clean[method]:.3f} "
                      f"(difference {100 * (clean[method] - clean[base]):+.1f} points; the goal needs |diff| <= 1: "
                      f"{'yes' if equal else 'no, so no shift row below can meet it'})."]
        lines += ["", "| strongest shift | drop " + base + " | drop " + method + " | ratio | goal (<= 0.5) |",
                  "|---|---:|---:|---:|---|"]
        for kind in SHIFTS:
            for s in strongest(kind):
                cond = f"{kind}_{s:g}"
                if cond not in conds:
                    continue
                drops = [clean[m] - mean_dice(results[m][cond]) for m in models]
                ratio = drops[1] / drops[0] if drops[0] > 1e-9 else float("nan")
                ok = "n/a (no drop)" if drops[0] <= 1e-9 else ("met" if ratio <= 0.5 and equal else "not met")
                lines.append(f"| {cond} | {drops[0]:+.3f} | {drops[1]:+.3f} | {ratio:.2f} | {ok} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, models: list[str], kinds, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for i, m in enumerate(models):
            xs = list(SHIFTS[kind])
            ys = [mean_dice(results[m][f"{kind}_{s:g}"]) for s in xs]
            line, = ax.plot(xs, ys, "o-", label=m)
            ax.axhline(mean_dice(results[m][CLEAN]), color=line.get_color(), ls="--", lw=0.8)
        ax.set_title(kind)
        ax.set_xlabel("strength" + (" (exponent; 1 = clean)" if kind == "gamma" else ""))
        if kind == "gamma":
            ax.set_xscale("log")
        ax.set_ylabel("mean foreground Dice")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, title="dashed: clean")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(images: Path, labels: Path, models: dict, out: Path, kinds, fold="0", checkpoint="checkpoint_final.pth",
        device="cpu", tta=False, seed=0) -> dict:
    import torch
    from tqdm import tqdm
    device = torch.device(device)
    first = next(iter(models.values()))
    dataset_json = json.loads((first / "dataset.json").read_text())
    ending = dataset_json.get("file_ending", ".nii.gz")
    if ending not in SUPPORTED_ENDINGS:
        raise NnUNetCLError(f"file ending {ending!r}: the shifted float images are written with SimpleITK, which needs "
                            f"one of {', '.join(SUPPORTED_ENDINGS)}. Fix: convert the test set to NIfTI.")
    if any(not isinstance(v, int) for v in dataset_json["labels"].values()):
        raise NnUNetCLError("region-based labels are not supported: Dice is computed per label value. Fix: score "
                            "a label-based model.")
    cases = test_cases(images, labels, ending)
    ignore_label = dataset_json["labels"].get("ignore")
    classes = [v for k, v in dataset_json["labels"].items() if k not in ("background", "ignore")]
    conds = conditions(kinds)
    for name, kind, strength in tqdm(conds, desc="shifted test images"):
        write_shifted(images, out / "images" / name, kind, strength, seed, ending)
    results = {}
    for model, folder in models.items():
        predictor = None
        results[model] = {}
        for name, _, _ in tqdm(conds, desc=f"predict {model}"):
            pred = out / "predictions" / model / name
            images_made = json.loads((out / "images" / name / MANIFEST).read_text())
            settings = {"model": str(folder.resolve()), "fold": str(fold), "checkpoint": checkpoint, "tta": tta,
                        "images": images_made}
            if not _done(pred, [f"{c}{ending}" for c in cases], settings):
                if predictor is None:
                    predictor, _ = load_predictor(folder, fold, checkpoint, device, tta)
                shutil.rmtree(pred, ignore_errors=True)
                pred.mkdir(parents=True)
                predictor.predict_from_files_sequential(str(out / "images" / name), str(pred), False, True, None)
                (pred / MANIFEST).write_text(json.dumps(settings))
            results[model][name] = score(pred, labels, cases, classes, ending, ignore_label)
    save_json_atomic({"cases": cases, "classes": classes, "models": {m: str(f) for m, f in models.items()},
                      "fold": fold, "checkpoint": checkpoint, "tta": tta, "seed": seed,
                      "shifts": {k: list(SHIFTS[k]) for k in kinds}, "dice": results}, str(out / "robustness.json"))
    table = report(results, list(models))
    (out / "robustness.md").write_text(table)
    plot(results, list(models), list(kinds), out / "robustness.png")
    return results


def _model(spec: str) -> tuple[str, Path]:
    name, sep, folder = spec.partition("=")
    if not sep:
        folder, name = spec, Path(spec).name.split("__")[0]
    path = Path(folder)
    if not (path / "plans.json").is_file():
        raise argparse.ArgumentTypeError(f"{path} is not an nnU-Net model folder (no plans.json); pass "
                                         f"NAME=$nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIGURATION")
    return name, path


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_cl_robustness",
        description="Dice of trained nnU-Net models on test images under synthetic intensity shifts (gamma, smooth "
                    "bias field, contrast, noise at stated strengths): a table, a plot of Dice against shift strength "
                    "and, with two models (baseline first), whether the second loses at most half of what the first "
                    "loses under the strongest shifts.")
    parser.add_argument("-i", required=True, type=Path, help="test images, nnU-Net naming (imagesTs)")
    parser.add_argument("-l", required=True, type=Path, help="their labels (labelsTs)")
    parser.add_argument("-m", required=True, nargs="+", type=_model,
                        help="model folders, each NAME=FOLDER (FOLDER: .../TRAINER__PLANS__CONFIGURATION); the first "
                             "is the baseline")
    parser.add_argument("-o", required=True, type=Path, help="output folder (reruns skip finished work)")
    parser.add_argument("-f", default="0", help="fold to predict with (default 0)")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    parser.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=list(SHIFTS))
    parser.add_argument("--seed", type=int, default=0, help="seed of the bias fields and noise (default 0)")
    parser.add_argument("--tta", action="store_true", help="predict with mirroring (off by default: faster)")
    parser.add_argument("-device", default="cpu", choices=["cpu", "cuda", "mps"])
    args = parser.parse_args(argv)
    models = dict(args.m)
    if len(models) != len(args.m):
        parser.error("two models share a NAME; give each NAME=FOLDER a name of its own")
    try:
        run(args.i, args.l, models, args.o, args.shifts, args.f, args.chk, args.device, args.tta, args.seed)
    except NnUNetCLError as e:
        raise SystemExit(f"nnUNetv2_cl_robustness: error: {e}")
    print((args.o / "robustness.md").read_text())
    print(f"Written: {args.o / 'robustness.md'}, {args.o / 'robustness.png'}, {args.o / 'robustness.json'}")


if __name__ == "__main__":
    main()
