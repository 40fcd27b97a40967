"""SuperCL supervoxel time per volume on one core, on real CT (OpenKBP head-and-neck, 128^3 voxels each).

Each volume goes through exactly what the supervoxel cache computes per case (body mask, windowing, block
average, 3-D SLIC, connectivity repair; nnunet_cl.methods.supercl.cache.case_supervoxels), with one BLAS/OpenMP
thread. Intensities are clipped to [-1000, 1500] HU and z-scored first, as nnU-Net's CT normalisation does (the
supervoxels only see the windowed [0, 1] image, so the exact normalisation does not matter).

Usage:  python benchmarks/supercl_supervoxel_time.py [--cases 5] [--out benchmarks/results/supercl_supervoxel_time.md]
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "OpenKBP_HN" / "imagesTr"


def load(path: Path) -> tuple[np.ndarray, list[float]]:
    import SimpleITK as sitk
    img = sitk.ReadImage(str(path))
    arr = np.clip(sitk.GetArrayFromImage(img).astype(np.float32), -1000, 1500)
    return (arr - arr.mean()) / max(float(arr.std()), 1e-6), list(img.GetSpacing())[::-1]


def main(argv=None) -> None:
    from threadpoolctl import threadpool_limits
    from nnunet_cl.methods.supercl.cache import case_supervoxels
    from nnunet_cl.regions.supervoxels import body_mask

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "supercl_supervoxel_time.md"))
    args = p.parse_args(argv)
    files = sorted(DATA.glob("openkbp_*_0000.nii.gz"))[:args.cases]
    settings = [(8, 2), (12, 2), (8, 1)]  # (supervoxel_edge, downsample); (8, 2) is the trainers' default
    rows = {s: [] for s in settings}
    t_start, load0 = time.time(), os.getloadavg()[0]
    with threadpool_limits(1):
        for f in files:
            image, spacing = load(f)
            n_body = int(body_mask(image).sum())
            for edge, d in settings:
                t0 = time.perf_counter()
                labels = case_supervoxels(image, spacing, supervoxel_edge=edge, downsample=d)
                sec = time.perf_counter() - t0
                rows[(edge, d)].append((f.name.split("_0000")[0], image.shape, sec, int(labels.max()),
                                        round(n_body / edge ** 3)))
                print(f"{f.name}: edge {edge}, downsample {d}: {sec:.2f} s, {labels.max()} supervoxels "
                      f"(requested {round(n_body / edge ** 3)})", flush=True)
    lines = ["# SuperCL supervoxel time per volume (one core)", "",
             f"Command: `python benchmarks/supercl_supervoxel_time.py --cases {args.cases}`; {len(files)} OpenKBP CTs "
             f"of 128^3 voxels; machine load {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
             f"wall time {time.time() - t_start:.0f} s; {os.cpu_count()} cores, 1 thread used.", "",
             "| supervoxel_edge | downsample | median s per volume | max s | supervoxels (median) | requested (median) |",
             "|---|---|---|---|---|---|"]
    for (edge, d), r in rows.items():
        secs = [x[2] for x in r]
        lines.append(f"| {edge} | {d} | {statistics.median(secs):.2f} | {max(secs):.2f} | "
                     f"{int(statistics.median(x[3] for x in r))} | {int(statistics.median(x[4] for x in r))} |")
    lines += ["", "Per case (edge, downsample, seconds, supervoxels):", ""]
    lines += [f"- {x[0]} {x[1]}: " + ", ".join(f"({e}, {d}) {rows[(e, d)][i][2]:.2f} s / {rows[(e, d)][i][3]}"
                                                for e, d in settings) for i, x in enumerate(rows[settings[0]])]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
