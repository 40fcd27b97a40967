"""A scribble dataset into nnU-Net's raw format: unannotated voxels become nnU-Net's ignore label, so nnU-Net's own
Dice + CE is the partial loss of scribble supervision (no extra code in the loss).

Input (nnU-Net's raw layout plus scribbles): ``imagesTr/<case>_0000.nii.gz``, ``scribblesTr/<case>.nii.gz`` with one
value meaning "unannotated" (ACDC scribbles of Valvano et al.: 4), optionally dense ``labelsTr/<case>.nii.gz`` for
evaluation, and a ``dataset.json`` naming the classes. Output: ``nnUNet_raw/DatasetXXX_Name`` with

* ``labelsTr``: the scribbles, unannotated = the ignore label (the highest value, as nnU-Net requires);
* ``labelsTr_dense``: the dense labels, kept aside (nnU-Net never reads them; `nnUNetv2_evaluate_folder` does);
* ``dataset.json`` with ``"ignore"`` in its labels;
* ``splits_final.json`` in nnUNet_preprocessed: 5 folds by patient (cases grouped by a regular expression), since
  the frames of one patient must never sit on both sides of a split.

``--labels dense`` writes the same cases with the dense labels in labelsTr (the full-supervision baseline).
Everything is checked before anything is written, and the dataset folder appears whole or not at all.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from os.path import isdir, isfile, join

import numpy as np
import SimpleITK as sitk

from nnunet_cl.paths import NnUNetCLError, require_env, save_json_atomic

__all__ = ["find_scribble_cases", "check_scribble_cases", "patient_splits", "convert_scribbles"]

DEFAULT_GROUP = r"^(patient\d+)"  # ACDC: patient001_frame01 and patient001_frame12 belong together
_GEOMETRY_TOL = 1e-3


def find_scribble_cases(folder: str, scribbles: str = "scribblesTr", dense: str | None = "labelsTr",
                        num_channels: int = 1) -> list:
    """The cases of a scribble dataset folder, as {'case', 'image' (channel 0), 'channels' (every channel's file),
    'scribble', 'dense'} (dense None when absent); every image needs its scribble map and all its channels, dense
    labels are optional."""
    images = join(folder, "imagesTr")
    if not isdir(images) or not isdir(join(folder, scribbles)):
        raise NnUNetCLError(f"{folder} needs imagesTr/ and {scribbles}/ (nnU-Net's raw layout plus a scribble "
                            f"folder). Fix: point -i at the dataset folder, or name the scribble folder with "
                            f"--scribbles.")
    names = sorted(f for f in os.listdir(images) if f.endswith("_0000.nii.gz"))
    if not names:
        raise NnUNetCLError(f"No image in {images} (expected <case>_0000.nii.gz).")
    cases, missing = [], []
    for f in names:
        case = f[:-len("_0000.nii.gz")]
        scribble = join(folder, scribbles, f"{case}.nii.gz")
        if not isfile(scribble):
            missing.append(case)
            continue
        d = join(folder, dense, f"{case}.nii.gz") if dense else None
        channels = [join(images, f"{case}_{c:04d}.nii.gz") for c in range(num_channels)]
        absent = [c for c in channels if not isfile(c)]
        if absent:
            raise NnUNetCLError(f"Case {case} lacks {absent[0]} (dataset.json names {num_channels} channels). Fix: add "
                                f"the file, or correct channel_names.")
        cases.append(dict(case=case, image=join(images, f), channels=channels, scribble=scribble,
                          dense=d if d and isfile(d) else None))
    if missing:
        raise NnUNetCLError(f"{len(missing)} image(s) have no scribble map in {join(folder, scribbles)}: "
                            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. Fix: add "
                            f"<case>.nii.gz for each (all voxels unannotated if a case has none), or remove the "
                            f"image.")
    return cases


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=_GEOMETRY_TOL)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=_GEOMETRY_TOL)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=_GEOMETRY_TOL))


def _grid(img: sitk.Image) -> str:
    return f"size {img.GetSize()}, spacing {tuple(round(s, 4) for s in img.GetSpacing())}, origin " \
           f"{tuple(round(o, 3) for o in img.GetOrigin())}"


def check_scribble_cases(cases: list, classes: dict, unannotated: int, progress: bool = True) -> dict:
    """Read every case once and refuse the dataset, naming the case and the fix, when a scribble (or dense) map
    does not lie on its image's grid, holds a value that is neither a class nor ``unannotated``, or when a class has
    no scribbled voxel in any case (the network could never learn it).

    Returns {'scribbled': {class value: voxels}, 'annotated_fraction': share of voxels with a scribble}.
    """
    from tqdm import tqdm
    allowed = set(classes.values()) | {unannotated}
    counts = {v: 0 for v in classes.values()}
    total = 0
    for c in tqdm(cases, desc="Checking scribbles", unit="case", disable=not progress):
        image = sitk.ReadImage(c["image"])
        for kind in ("scribble", "dense"):
            if c[kind] is None:
                continue
            lab = sitk.ReadImage(c[kind])
            if not _same_grid(image, lab):
                raise NnUNetCLError(f"The {kind} map of case {c['case']} does not match its image: {_grid(lab)} "
                                    f"against {_grid(image)} ({c[kind]}). Fix: resample the map onto the image's "
                                    f"grid (nearest neighbour) or correct its header.")
            arr = sitk.GetArrayViewFromImage(lab)
            values, n = np.unique(arr, return_counts=True)
            bad = sorted(set(values.tolist()) - (allowed if kind == "scribble" else set(classes.values())))
            if bad:
                raise NnUNetCLError(f"The {kind} map of case {c['case']} holds values {bad} that are not classes "
                                    f"{sorted(classes.values())}{' or the unannotated value ' + str(unannotated) if kind == 'scribble' else ''}. "
                                    f"Fix: check --unannotated and the labels of dataset.json.")
            if kind == "scribble":
                total += arr.size
                for v, k in zip(values.tolist(), n.tolist()):
                    if v in counts:
                        counts[v] += k
    empty = [name for name, v in classes.items() if counts[v] == 0]
    if empty:
        raise NnUNetCLError(f"Class(es) {', '.join(empty)} have no scribble in any of the {len(cases)} cases, so no "
                            f"training could learn them. Fix: scribble at least one case of each class, or drop the "
                            f"class from dataset.json.")
    return {"scribbled": counts, "annotated_fraction": sum(counts.values()) / max(total, 1)}


def patient_splits(cases: list[str], group: str | None = DEFAULT_GROUP, folds: int = 5, seed: int = 12345) -> list:
    """nnU-Net's 5-fold split (KFold, shuffled with nnU-Net's seed 12345), over groups of cases rather than cases:
    the cases whose ids share the first match of ``group`` (a regular expression with one group) stay together;
    a case that does not match is a group of its own."""
    from sklearn.model_selection import KFold
    key = _group_key(cases, group)
    groups = sorted({key(c) for c in cases})
    if len(groups) < folds:
        raise NnUNetCLError(f"{len(groups)} patient group(s) for {folds} folds. Fix: convert more cases, or fewer "
                            f"--folds.")
    splits = []
    for train_idx, val_idx in KFold(folds, shuffle=True, random_state=seed).split(groups):
        train = {groups[i] for i in train_idx}
        splits.append({"train": sorted(c for c in cases if key(c) in train),
                       "val": sorted(c for c in cases if key(c) not in train)})
    return splits


def _group_key(cases: list[str], group: str | None):
    """case id -> its patient (the first group of the regular expression ``group``); every case must match."""
    if not group:
        return lambda c: c
    unmatched = [c for c in cases if not re.match(group, c)]
    if unmatched:
        raise NnUNetCLError(f"{len(unmatched)} case(s) do not match --group {group!r} (e.g. {unmatched[0]}), so their "
                            f"patient is unknown and its frames could fall on both sides of a split. Fix: a --group "
                            f"whose first group names the patient of every case, or --group '' if every case is a "
                            f"patient of its own.")
    return lambda c: re.match(group, c)[1]


def _write_label(src: str, dst: str, image: sitk.Image, lut: np.ndarray) -> None:
    arr = lut[sitk.GetArrayFromImage(sitk.ReadImage(src)).astype(np.int64)]
    out = sitk.GetImageFromArray(arr.astype(np.uint8))
    out.CopyInformation(image)  # exactly the image's grid (checked equal within tolerance)
    sitk.WriteImage(out, dst, useCompression=True)


def convert_scribbles(folder: str, dataset_id: int, name: str, unannotated: int = 4, scribbles: str = "scribblesTr",
                      dense: str | None = "labelsTr", labels: str = "scribbles", group: str | None = DEFAULT_GROUP,
                      max_groups: int | None = None, folds: int = 5, progress: bool = True) -> str:
    """Write nnUNet_raw/Dataset{id:03d}_{name} (and its splits in nnUNet_preprocessed); returns the raw folder.

    ``labels``: 'scribbles' (unannotated -> ignore label) or 'dense' (the dense maps, for full supervision).
    ``max_groups``: keep only the first N patient groups (sorted), e.g. for a quick benchmark.
    """
    if labels not in ("scribbles", "dense"):
        raise NnUNetCLError(f"labels must be 'scribbles' or 'dense', got {labels!r}")
    spec_file = join(folder, "dataset.json")
    if not isfile(spec_file):
        raise NnUNetCLError(f"No dataset.json in {folder}. Fix: add one with 'channel_names' and 'labels'.")
    spec = json.load(open(spec_file))
    if not isinstance(spec.get("labels"), dict) or not isinstance(spec.get("channel_names"), dict):
        raise NnUNetCLError(f"{spec_file} needs 'channel_names' and 'labels' ({{name: value}}). Fix: add them as in "
                            f"nnU-Net's dataset.json.")
    classes = {k: v for k, v in spec["labels"].items() if k != "ignore"}
    if not all(isinstance(v, int) for v in classes.values()) or \
            sorted(classes.values()) != list(range(len(classes))):
        raise NnUNetCLError(f"The labels of {spec_file} must be integers 0, 1, ..., N-1 (one class per value; region "
                            f"labels are not for scribbles); got {classes}. Fix: renumber them.")
    if unannotated in classes.values():
        raise NnUNetCLError(f"The unannotated value {unannotated} is also class "
                            f"{[k for k, v in classes.items() if v == unannotated][0]}. Fix: --unannotated VALUE.")
    dataset = f"Dataset{int(dataset_id):03d}_{name}"
    raw_root, pre_root = require_env("nnUNet_raw"), require_env("nnUNet_preprocessed")
    for var, root in (("nnUNet_raw", raw_root), ("nnUNet_preprocessed", pre_root),
                      ("nnUNet_results", os.environ.get("nnUNet_results"))):
        taken = [d for d in (os.listdir(root) if root and isdir(root) else [])
                 if d.startswith(f"Dataset{int(dataset_id):03d}_")]
        if taken:  # nnU-Net resolves an id through all three folders: one name per id
            raise NnUNetCLError(f"{var} already holds {taken[0]} with id {dataset_id}. Fix: choose another -d, or "
                                f"delete {join(root, taken[0])} to convert again.")
    cases = find_scribble_cases(folder, scribbles, dense, len(spec["channel_names"]))
    key = _group_key([c["case"] for c in cases], group)
    if max_groups:
        keep = sorted({key(c["case"]) for c in cases})[:max_groups]
        cases = [c for c in cases if key(c["case"]) in keep]
    if labels == "dense" and any(c["dense"] is None for c in cases):
        raise NnUNetCLError(f"--labels dense needs a dense map for every case in {join(folder, dense or 'labelsTr')}.")
    stats = check_scribble_cases(cases, classes, unannotated, progress)
    splits = patient_splits([c["case"] for c in cases], group, folds)

    ignore = max(classes.values()) + 1  # nnU-Net: the ignore label is the highest value
    lut = np.arange(max(ignore, unannotated) + 1)
    lut[unannotated] = ignore
    tmp = join(raw_root, f".{dataset}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_dataset(tmp, cases, spec, classes, labels, lut, ignore, unannotated, stats, folder, progress)
        os.replace(tmp, join(raw_root, dataset))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a write that failed part-way leaves nothing behind
    os.makedirs(join(pre_root, dataset), exist_ok=True)
    save_json_atomic(splits, join(pre_root, dataset, "splits_final.json"))
    return join(raw_root, dataset)


def _write_dataset(tmp, cases, spec, classes, labels, lut, ignore, unannotated, stats, folder, progress) -> None:
    from tqdm import tqdm
    for sub in ("imagesTr", "labelsTr") + (("labelsTr_dense",) if labels == "scribbles" else ()):
        os.makedirs(join(tmp, sub))
    for c in tqdm(cases, desc=f"Writing {os.path.basename(tmp)}", unit="case", disable=not progress):
        image = sitk.ReadImage(c["image"])
        for i, channel in enumerate(c["channels"]):
            shutil.copy(channel, join(tmp, "imagesTr", f"{c['case']}_{i:04d}.nii.gz"))
        if labels == "scribbles":
            _write_label(c["scribble"], join(tmp, "labelsTr", f"{c['case']}.nii.gz"), image, lut)
            if c["dense"]:
                _write_label(c["dense"], join(tmp, "labelsTr_dense", f"{c['case']}.nii.gz"), image, lut)
        else:
            _write_label(c["dense"], join(tmp, "labelsTr", f"{c['case']}.nii.gz"), image, lut)
    out_spec = {"channel_names": spec["channel_names"], "labels": dict(classes), "numTraining": len(cases),
                "file_ending": ".nii.gz",
                "description": f"{labels} of {folder} (nnunet-cl: nnUNetv2_cl_scribbles_to_nnunet)"}
    if labels == "scribbles":
        out_spec["labels"]["ignore"] = ignore
        out_spec["scribbles"] = {"source_unannotated_value": unannotated,
                                 "annotated_fraction": round(stats["annotated_fraction"], 5),
                                 "dense_labels": "labelsTr_dense" if any(c["dense"] for c in cases) else None}
    with open(join(tmp, "dataset.json"), "w") as f:
        json.dump(out_spec, f, indent=2)


def main() -> None:
    """Entry point of nnUNetv2_cl_scribbles_to_nnunet."""
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_cl_scribbles_to_nnunet",
        description="Turn a scribble dataset (imagesTr, scribblesTr with an 'unannotated' value, optional dense "
                    "labelsTr, dataset.json) into nnU-Net's raw format with unannotated voxels as nnU-Net's ignore "
                    "label (partial Dice + CE), dense labels kept in labelsTr_dense for evaluation, and 5-fold "
                    "splits by patient in nnUNet_preprocessed. Then: nnUNetv2_plan_and_preprocess -d ID, and "
                    "nnUNetv2_train ID 3d_fullres FOLD -tr nnUNetTrainerPCLMix.")
    parser.add_argument("-i", required=True, help="the scribble dataset folder (e.g. ../shared/data/ACDC_scribbles)")
    parser.add_argument("-d", required=True, type=int, help="the new dataset's id")
    parser.add_argument("-n", default=None, help="the new dataset's name. Default: the input folder's name "
                                                 "(+ 'Dense' with --labels dense)")
    parser.add_argument("--unannotated", type=int, default=4, help="the scribble maps' value for unannotated voxels. "
                                                                   "Default: 4 (ACDC scribbles)")
    parser.add_argument("--scribbles", default="scribblesTr", help="scribble folder name. Default: scribblesTr")
    parser.add_argument("--dense", default="labelsTr", help="dense label folder name ('' for none). Default: labelsTr")
    parser.add_argument("--labels", choices=("scribbles", "dense"), default="scribbles",
                        help="what labelsTr gets: the scribbles (default) or the dense maps (full-supervision "
                             "baseline)")
    parser.add_argument("--group", default=DEFAULT_GROUP, help="regular expression whose first group names a case's "
                        f"patient, for splits by patient ('' for none). Default: {DEFAULT_GROUP}")
    parser.add_argument("--max_patients", type=int, default=None, help="convert only the first N patients (sorted)")
    parser.add_argument("--folds", type=int, default=5, help="folds of splits_final.json. Default: 5")
    args = parser.parse_args()
    name = args.n or os.path.basename(os.path.normpath(args.i)).replace("_", "") + \
        ("Dense" if args.labels == "dense" else "")
    try:
        out = convert_scribbles(args.i, args.d, name, args.unannotated, args.scribbles, args.dense or None,
                                args.labels, args.group or None, args.max_patients, args.folds)
    except NnUNetCLError as e:
        raise SystemExit(f"nnUNetv2_cl_scribbles_to_nnunet: error: {e}")
    spec = json.load(open(join(out, "dataset.json")))
    print(f"Wrote {out} ({spec['numTraining']} cases, labels {spec['labels']})")
    if "scribbles" in spec:
        print(f"  {100 * spec['scribbles']['annotated_fraction']:.2f}% of voxels scribbled; the rest is the ignore "
              f"label {spec['labels']['ignore']}")
    ds = os.path.basename(out)
    print(f"  splits by patient: {join(require_env('nnUNet_preprocessed'), ds, 'splits_final.json')}")
    print(f"Next: nnUNetv2_plan_and_preprocess -d {args.d} -c 3d_fullres\n"
          f"      nnUNetv2_train {args.d} 3d_fullres 0 -tr nnUNetTrainerPCLMix")


if __name__ == "__main__":
    main()
