"""`nnUNetv2_cl_supercl_preview`: draw one preprocessed case's SuperCL supervoxels, to check them before pretraining.

    nnUNetv2_cl_supercl_preview -d DATASET [-c 3d_fullres] [-p nnUNetPlans] [--case ID] -o out.png

The case is read from nnU-Net's preprocessed data (the labeled dataset's images or the ingested pool) and
segmented with the trainers' supervoxel parameters (``SUPERVOXEL_DEFAULTS``, or the options given), exactly as
the supervoxel cache does. Slices are axial, in the image's own axis order. Labels are never read.
"""
from __future__ import annotations

import argparse
import time
from os.path import join

import numpy as np

from nnunet_cl.case_cache import PreprocessedCaseLoader, plans_configuration, preprocessed_cases
from nnunet_cl.paths import NnUNetCLError, dataset_name, load_plans, require_env
from nnunet_cl.methods.supercl.defaults import SUPERVOXEL_DEFAULTS

__all__ = ["preview", "main"]


def preview(dataset: str | int, out_png: str, configuration: str = "3d_fullres", case: str | None = None,
            plans_identifier: str = "nnUNetPlans", n_slices: int = 3, overrides: dict | None = None,
            verbose: bool = True) -> dict:
    """Supervoxels of one preprocessed case, drawn. Returns {case, png, supervoxels, requested, seconds, params}."""
    from nnunet_cl.methods.supercl.cache import case_supervoxels, n_segments_for
    from nnunet_cl.regions.supervoxels import body_mask
    from nnunet_cl.regions.visualize import draw_regions_png

    name = dataset_name(dataset)
    folder = join(require_env("nnUNet_preprocessed"), name)
    _, plans = load_plans(folder, plans_identifier, dataset)
    config = plans_configuration(plans, configuration)
    spacing = [float(s) for s in config["spacing"]]
    if len(spacing) == 2:  # a 2d configuration's cases are still volumes; their in-plane spacing is the plans'
        spacing = [float(plans.get("original_median_spacing_after_transp", [1.0] * 3)[0])] + spacing
    cases = preprocessed_cases(folder, config["data_identifier"])
    if not cases:
        raise NnUNetCLError(f"no preprocessed cases for {name} / {config['data_identifier']}. Fix: run "
                            f"nnUNetv2_plan_and_preprocess -d {dataset} -c {configuration}, or "
                            f"nnUNetv2_cl_add_unlabeled -d {dataset} -i FOLDER.")
    by_id = {i: f for f, i in cases}
    if case is None:
        pool = [i for _, i in cases if i.startswith("pool_")]
        case = pool[0] if pool else cases[0][1]
    elif case not in by_id and f"pool_{case}" in by_id:
        case = f"pool_{case}"
    if case not in by_id:
        shown = ", ".join(sorted(by_id)[:8]) + (" ..." if len(by_id) > 8 else "")
        raise NnUNetCLError(f"case {case!r} is not among the preprocessed cases of {name} ({shown}). Fix: pass one "
                            f"of them with --case.")
    params = {**SUPERVOXEL_DEFAULTS, **(overrides or {})}
    image, sp = PreprocessedCaseLoader(by_id[case], case, spacing=spacing)()
    t0 = time.perf_counter()
    labels = case_supervoxels(image, sp, **params)
    seconds = time.perf_counter() - t0
    requested = n_segments_for(int(body_mask(image).sum()), params["supervoxel_edge"])

    back = plans.get("transpose_backward", [0, 1, 2])
    img_show, lab_show = np.transpose(image, back), np.transpose(labels, back)
    sp_show = [sp[a] for a in back]
    ids = [int(i) for i in np.unique(labels) if i != 0]
    title = (f"{name} / {case} ({configuration}, {'x'.join(map(str, img_show.shape))} voxels of "
             f"{'x'.join(f'{s:.2g}' for s in sp_show)} mm)\nSuperCL supervoxels: {len(ids)} (requested {requested}: "
             f"edge {params['supervoxel_edge']}), compactness {params['compactness']}, downsample "
             f"{params['downsample']}; {seconds:.1f} s")
    draw_regions_png(img_show, lab_show, ids, [], out_png, n_slices=n_slices, title=title,
                     pixel_aspect=sp_show[1] / sp_show[2])
    summary = {"case": case, "png": out_png, "supervoxels": len(ids), "requested": requested, "seconds": seconds,
               "params": params}
    if verbose:
        print(f"{case}: {len(ids)} supervoxels (requested {requested}) in {seconds:.1f} s")
        print(f"Wrote {out_png}")
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_cl_supercl_preview",
        description="Draw one preprocessed case's SuperCL supervoxels over its axial slices as a PNG, with the "
                    "parameters pretraining uses, to check them before pretraining.")
    parser.add_argument("-d", required=True, help="dataset name or id (planned and preprocessed)")
    parser.add_argument("-o", required=True, help="output PNG file")
    parser.add_argument("-c", default="3d_fullres", help="configuration. Default: 3d_fullres")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier. Default: nnUNetPlans")
    parser.add_argument("--case", default=None,
                        help="case identifier (a labeled case or an ingested pool case, 'pool_' may be left out). "
                             "Default: the first pool case, else the first labeled case")
    parser.add_argument("--slices", type=int, default=3, help="number of axial slices. Default: 3")
    for key, typ in (("supervoxel_edge", float), ("compactness", float), ("downsample", int)):
        parser.add_argument(f"--{key}", type=typ, default=None,
                            help=f"supervoxel parameter (trainer default: {SUPERVOXEL_DEFAULTS[key]})")
    args = parser.parse_args(argv)
    overrides = {k: getattr(args, k) for k in SUPERVOXEL_DEFAULTS if getattr(args, k) is not None}
    try:
        preview(args.d, args.o, args.c, args.case, args.p, args.slices, overrides)
    except NnUNetCLError as e:
        raise SystemExit(f"nnUNetv2_cl_supercl_preview: error: {e}")


if __name__ == "__main__":
    main()
