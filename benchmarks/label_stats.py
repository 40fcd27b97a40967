"""How often each class is present in a folder of label maps, and how large it is.

A per-class Dice averaged over cases only counts the cases where the class is in the reference or the
prediction (nnU-Net's evaluation gives NaN when it is in neither), so the table of a benchmark needs these
figures beside it: a class present in half the test cases is scored on fewer cases than one present in all.

  python benchmarks/label_stats.py $WORK/nnUNet_raw/Dataset950_OpenKBPHNoar/labelsTs \\
      --dataset_json $WORK/nnUNet_raw/Dataset950_OpenKBPHNoar/dataset.json
"""
import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def label_stats(label_files: list[Path], labels: dict[str, int]) -> dict[str, dict]:
    """{class: {'present': cases holding it, 'cases': all cases, 'median_cm3', 'min_cm3'}}, background left out."""
    volumes = {name: [] for name, value in labels.items() if value != 0}
    for f in label_files:
        image = sitk.ReadImage(str(f))
        seg = sitk.GetArrayViewFromImage(image)
        voxel_cm3 = float(np.prod(image.GetSpacing())) / 1000.0
        counts = np.bincount(seg.ravel().astype(np.int64), minlength=max(labels.values()) + 1)
        for name in volumes:
            if counts[labels[name]]:
                volumes[name].append(counts[labels[name]] * voxel_cm3)
    return {name: {"present": len(v), "cases": len(label_files),
                   "median_cm3": float(np.median(v)) if v else None, "min_cm3": float(np.min(v)) if v else None}
            for name, v in volumes.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Per-class presence and volume in a folder of label maps")
    p.add_argument("folder", help="folder of label files (e.g. a labelsTs)")
    p.add_argument("--dataset_json", required=True, help="nnU-Net dataset.json with the 'labels' map")
    p.add_argument("--ending", default=".nii.gz", help="file ending (default .nii.gz)")
    a = p.parse_args(argv)
    labels = {k: int(v) for k, v in json.loads(Path(a.dataset_json).read_text())["labels"].items()}
    files = sorted(Path(a.folder).glob(f"*{a.ending}"))
    if not files:
        raise SystemExit(f"label_stats: error: no *{a.ending} file in {a.folder}. Fix: point at a labelsTr/labelsTs "
                         f"folder, or pass --ending.")
    print("| class | cases holding it | median volume (cm³) | smallest (cm³) |\n|---|---|---|---|")
    for name, s in label_stats(files, labels).items():
        med = "—" if s["median_cm3"] is None else f"{s['median_cm3']:.1f}"
        low = "—" if s["min_cm3"] is None else f"{s['min_cm3']:.1f}"
        print(f"| {name} | {s['present']} of {s['cases']} | {med} | {low} |")


if __name__ == "__main__":
    main()
