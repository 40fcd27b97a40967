"""`nnUNetv2_cl_separeg_preview`: draw one pool case's SepaReg separation, to check it before pretraining.

    nnUNetv2_cl_separeg_preview -d DATASET [-c 3d_fullres] [--case ID] -o out.png [--checkpoint CKPT]

The case is read from nnU-Net's preprocessed data (the labeled dataset's images or the ingested pool), so
the picture shows exactly what pretraining separates: the same spacing, normalisation and parameters.
Slices are axial (the preprocessed axes are transposed back to the original image order). With
``--checkpoint`` (a SepaReg checkpoint, staged or pretraining-only, from the clustering epoch on) the
separation parameters of that run are used and kept regions are coloured by their k-means cluster.
Labels are never read.
"""
from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from os.path import join

import numpy as np

from nnunet_cl.case_cache import plans_configuration, preprocessed_cases
from nnunet_cl.paths import NnUNetCLError, dataset_name, load_plans, require_env
from nnunet_cl.methods.separeg.defaults import SEPARATION_DEFAULTS

__all__ = ["preview", "main"]


def _clusters_from_checkpoint(path: str, case_id: str):
    """(separation parameters, {region id: cluster} for case_id or None, message) from a SepaReg checkpoint."""
    from nnunet_cl.safe_load import load_checkpoint_file
    ckpt = load_checkpoint_file(path)
    extra = (ckpt.get("nnunet_cl") or {}).get("extra") or {}
    if "separation" not in extra:
        raise NnUNetCLError(f"{path} is not a SepaReg checkpoint (no separation parameters in its 'nnunet_cl' "
                            f"entry; trainer {ckpt.get('trainer_name')!r}). Fix: pass a checkpoint of a "
                            f"nnUNetTrainerSepaReg* run, or leave out --checkpoint.")
    params = dict(extra["separation"])
    if extra.get("assignments") is None:
        return params, None, "the checkpoint was written before k-means (region phase): no cluster colours"
    cases = list(extra["region_cases"])
    if case_id not in cases:
        return params, None, f"case {case_id} was not in that run's pretraining pool: no cluster colours"
    n = cases.index(case_id)
    sel = np.asarray(extra["region_case"]) == n
    rid = np.asarray(extra["region_id"])[sel]
    cl = np.asarray(extra["assignments"])[sel]
    return params, {int(r): int(c) for r, c in zip(rid, cl)}, \
        f"{len(set(np.asarray(extra['assignments']).tolist()))} clusters from {os.path.basename(path)}"


def preview(dataset: str | int, out_png: str, configuration: str = "3d_fullres", case: str | None = None,
            plans_identifier: str = "nnUNetPlans", checkpoint: str | None = None, n_slices: int = 3,
            overrides: dict | None = None, verbose: bool = True) -> dict:
    """Separate one preprocessed case and draw it. Returns a summary dict (case, counts, seconds, png)."""
    from nnunet_cl.case_cache import PreprocessedCaseLoader
    from nnunet_cl.methods.separeg.separation import separate_case
    from nnunet_cl.regions.visualize import draw_regions_png

    name = dataset_name(dataset)
    folder = join(require_env("nnUNet_preprocessed"), name)
    _, plans = load_plans(folder, plans_identifier, dataset)
    config = plans_configuration(plans, configuration)
    data_identifier, spacing = config["data_identifier"], [float(s) for s in config["spacing"]]
    if len(spacing) != 3:
        raise NnUNetCLError(f"configuration {configuration} is 2d; SepaReg separates 3d volumes. Fix: -c 3d_fullres.")
    cases = preprocessed_cases(folder, data_identifier)
    if not cases:
        raise NnUNetCLError(f"no preprocessed cases for {name} / {data_identifier}. Fix: run "
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

    params = dict(SEPARATION_DEFAULTS)
    clusters, note = None, None
    if checkpoint:
        ck_params, clusters, note = _clusters_from_checkpoint(checkpoint, case)
        params.update(ck_params)
        if overrides:
            note += "; separation options given on the command line were ignored (the checkpoint's are used)"
    elif overrides:
        params.update(overrides)

    image, sp = PreprocessedCaseLoader(by_id[case], case, spacing=spacing)()
    t0 = time.perf_counter()
    res = separate_case(image, sp, **params)
    seconds = time.perf_counter() - t0
    kept = [int(i) for i in res["region_ids"]]
    cluster_of_region = None
    if clusters is not None:
        cluster_of_region = {i: clusters[i] for i in kept if i in clusters}
        if len(cluster_of_region) != len(kept):
            note = (note or "") + f"; {len(kept) - len(cluster_of_region)} kept regions have no cluster"

    # back to the image's own axis order (z, y, x as SimpleITK reads it): axis 0 is axial for CT
    back = plans.get("transpose_backward", [0, 1, 2])
    img_show = np.transpose(image, back)
    lab_show = np.transpose(res["labels"], back)
    sp_show = [sp[a] for a in back]
    why = Counter(r for rs in res["filtered"].values() for r in rs)
    title = (f"{name} / {case} ({configuration}, {'x'.join(map(str, img_show.shape))} voxels of "
             f"{'x'.join(f'{s:.2g}' for s in sp_show)} mm)\n"
             f"n_segments={params['n_segments']}, compactness={params['compactness']}, "
             f"min_size={res['min_size']}, fill>{params['min_fill_ratio']}, elong<{params['max_elongation']}; "
             f"{seconds:.1f} s")
    draw_regions_png(img_show, lab_show, kept, res["filtered"], out_png, cluster_of_region=cluster_of_region,
                        n_slices=n_slices, title=title, pixel_aspect=sp_show[1] / sp_show[2], crops=res["crops"])
    summary = {"case": case, "png": out_png, "supervoxels": int(res["n_supervoxels"]), "kept": len(kept),
               "filtered": len(res["filtered"]), "filtered_reasons": dict(why), "seconds": seconds,
               "params": params, "note": note,
               "clusters": None if cluster_of_region is None else dict(Counter(cluster_of_region.values()))}
    if verbose:
        print(f"{case}: {summary['supervoxels']} supervoxels, {summary['kept']} kept, {summary['filtered']} filtered"
              + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(why.items()))})" if why else "")
              + f", separated in {seconds:.1f} s")
        if note:
            print(note)
        print(f"Wrote {out_png}")
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_cl_separeg_preview",
        description="Draw one preprocessed case's SepaReg separation (supervoxels, kept and filtered regions, "
                    "k-means clusters with --checkpoint) as a PNG, to check it before pretraining.")
    parser.add_argument("-d", required=True, help="dataset name or id (planned and preprocessed)")
    parser.add_argument("-o", required=True, help="output PNG file")
    parser.add_argument("-c", default="3d_fullres", help="configuration. Default: 3d_fullres")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier. Default: nnUNetPlans")
    parser.add_argument("--case", default=None,
                        help="case identifier (a labeled case or an ingested pool case, 'pool_' may be left out). "
                             "Default: the first pool case, else the first labeled case")
    parser.add_argument("--checkpoint", default=None,
                        help="a SepaReg checkpoint: use its separation parameters and colour regions by cluster")
    parser.add_argument("--slices", type=int, default=3, help="number of axial slices. Default: 3")
    for key, typ in (("n_segments", int), ("compactness", float), ("downsample", int), ("min_size", int),
                     ("min_fill_ratio", float), ("max_elongation", float)):
        parser.add_argument(f"--{key}", type=typ, default=None,
                            help=f"separation parameter (trainer default: {SEPARATION_DEFAULTS[key]})")
    args = parser.parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("n_segments", "compactness", "downsample", "min_size",
                                                "min_fill_ratio", "max_elongation") if getattr(args, k) is not None}
    try:
        preview(args.d, args.o, args.c, args.case, args.p, args.checkpoint, args.slices, overrides)
    except NnUNetCLError as e:
        raise SystemExit(f"nnUNetv2_cl_separeg_preview: error: {e}")


if __name__ == "__main__":
    main()
