"""Compute SepaReg separations for many cases once and cache them, one ``<case_id>.npz`` per case.

Each file holds:

* ``crops``       uint8 (R, 1, s, s, s) -- windowed intensities in [0, 1] x 255 (0 outside the region)
                  or float16 with ``crop_dtype="float16"``;
* ``region_ids``  int32 (R,), ``bboxes`` int32 (R, 6) (z0, y0, x0, z1, y1, x1, end exclusive, full res);
* ``labels_lowres`` uint16/uint32 -- the final supervoxel labels sampled every ``downsample`` voxels
                  (``labels[::d, ::d, ::d]``), ``shape`` int64 (3,) -- the full-resolution shape;
* ``filtered_ids`` int32, ``filtered_reasons`` str -- dropped regions and why ("too_small,low_fill");
* ``spacing`` float64 (3,), ``window`` float64 (2,), ``params`` str (JSON of the separation parameters).

Files are written to a temporary name in the same folder and renamed, so an interrupted run never leaves
a truncated ``.npz``; rerunning skips finished cases whose stored parameters match (cases with other
parameters are recomputed, with a warning).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from glob import glob
from os.path import basename, isfile, join
from typing import Callable, Sequence, Union

import numpy as np

from nnunet_cl.case_cache import (PreprocessedCaseLoader, check_cache_folder, pending_cases, run_case_jobs,
                                  save_npz_atomic)

from .defaults import CACHE_FOLDER
from .separation import separate_case

__all__ = ["build_region_cache", "load_region_cache", "RegionIndex", "PreprocessedCaseLoader", "cache_path"]

Loader = Callable[[], tuple[np.ndarray, Sequence[float]]]
CaseSpec = Union[Loader, tuple]


def _as_loader(spec: CaseSpec) -> Loader:
    if callable(spec):
        return spec
    if isinstance(spec, (tuple, list)) and len(spec) in (2, 3):
        return PreprocessedCaseLoader(*spec)
    raise TypeError(f"a case must be a loader callable or (folder, identifier[, spacing]); got {spec!r}")


# ----------------------------------------------------------------------------------------------- one case
def cache_path(out_folder: str, case_id: str) -> str:
    return join(out_folder, f"{case_id}.npz")


def _params_key(kwargs: dict, crop_dtype: str) -> str:
    return json.dumps({"separation": {k: kwargs[k] for k in sorted(kwargs)}, "crop_dtype": crop_dtype},
                      sort_keys=True, default=str)


def _compute_one(case_id: str, loader: Loader, out_folder: str, crop_dtype: str, key: str,
                 kwargs: dict) -> tuple[str, int]:
    image, spacing = loader()
    res = separate_case(np.asarray(image), spacing, **kwargs)
    crops = res["crops"]
    if crop_dtype == "uint8":
        crops = np.round(np.clip(crops, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        crops = crops.astype(np.float16)
    d = res["params"]["downsample"]
    labels = res["labels"]
    low = labels[::d, ::d, ::d]
    low = low.astype(np.uint16 if labels.max() < 65535 else np.uint32)
    filtered_ids = np.array(sorted(res["filtered"]), dtype=np.int32)
    reasons = np.array([",".join(res["filtered"][i]) for i in sorted(res["filtered"])], dtype=str)
    save_npz_atomic(
        cache_path(out_folder, case_id), crops=crops, region_ids=res["region_ids"].astype(np.int32),
        bboxes=res["bboxes"].astype(np.int32), labels_lowres=low, shape=np.array(labels.shape, np.int64),
        downsample=np.int64(d), filtered_ids=filtered_ids, filtered_reasons=reasons,
        spacing=np.array(res["params"]["spacing"], np.float64), window=np.array(res["window"], np.float64),
        params=json.dumps(res["params"], default=str), cache_key=key)
    return case_id, int(crops.shape[0])


def build_region_cache(cases: Sequence[tuple[str, CaseSpec]], out_folder: str, num_processes: int = 1,
                       crop_dtype: str = "uint8", progress: bool = True, **separation_kwargs) -> dict:
    """Run :func:`~nnunet_cl.methods.separeg.separation.separate_case` on every case and write ``<case_id>.npz``.

    Args:
        cases: ``(case_id, loader)`` pairs; a loader is a callable returning ``(image (z, y, x), spacing)``,
            or ``(folder, identifier)`` / ``(folder, identifier, spacing)`` of nnU-Net's preprocessed data
            (:class:`PreprocessedCaseLoader`).
        out_folder: created if needed; the trainers use ``<nnUNet_preprocessed>/DatasetXXX/nnunet_cl_separeg/
            <data_identifier>`` (``CACHE_FOLDER``);
            never nnU-Net's own data folder (its format detection expects one file type there).
        num_processes: worker processes (a ``fork`` pool where available, so loaders may be lambdas;
            elsewhere the loaders must be picklable). 1 runs in this process.
        crop_dtype: "uint8" (default, crops x 255) or "float16".
        progress: show a tqdm bar.
        **separation_kwargs: passed to ``separate_case`` (n_segments, compactness, downsample, crop_size, ...).

    Returns:
        {"computed": [case ids], "skipped": [case ids], "n_regions": {case id: R for computed cases}}.
    """
    if crop_dtype not in ("uint8", "float16"):
        raise ValueError(f"crop_dtype must be 'uint8' or 'float16'; got {crop_dtype!r}")
    ids = [str(c[0]) for c in cases]
    if len(set(ids)) != len(ids):
        raise ValueError("case ids must be unique")
    bad = [c for c in ids if not c or os.sep in c or c.startswith(".")]
    if bad:
        raise ValueError(f"case ids must be plain file names; got {bad[:3]}")
    os.makedirs(out_folder, exist_ok=True)
    check_cache_folder(out_folder, CACHE_FOLDER)
    key = _params_key(separation_kwargs, crop_dtype)
    todo, skipped = pending_cases(cases, lambda c: cache_path(out_folder, c), key, "build_region_cache")
    jobs = [(case_id, _as_loader(spec), out_folder, crop_dtype, key, dict(separation_kwargs)) for case_id, spec in todo]
    n_regions = dict(run_case_jobs(_compute_one, jobs, num_processes, "SepaReg separation", progress))
    return {"computed": [j[0] for j in jobs], "skipped": skipped, "n_regions": n_regions}


# ----------------------------------------------------------------------------------------------- loading
@dataclass
class RegionIndex:
    """Where every cached crop comes from: crop n is region ``region_id[n]`` of case ``case_ids[case[n]]``."""
    case_ids: list[str]
    case: np.ndarray       # int64 (N,) index into case_ids
    region_id: np.ndarray  # int64 (N,)
    bbox: np.ndarray       # int64 (N, 6)

    def __len__(self) -> int:
        return int(self.case.shape[0])


def load_region_cache(out_folder: str, case_ids: Sequence[str] | None = None,
                      dtype: np.dtype | str | None = np.float32) -> tuple[np.ndarray, RegionIndex]:
    """All cached crops stacked: (crops (N, 1, s, s, s), :class:`RegionIndex`).

    ``case_ids`` selects cases (default: every ``*.npz`` in the folder, sorted). With ``dtype=float32``
    (default) crops are returned as float32 in [0, 1]; ``dtype=None`` keeps the stored uint8/float16
    (4x smaller; divide uint8 by 255 when batching).
    """
    if case_ids is None:
        case_ids = sorted(basename(p)[:-4] for p in glob(join(out_folder, "*.npz")))
    case_ids = list(case_ids)
    crops, case, rid, bbox = [], [], [], []
    for n, cid in enumerate(case_ids):
        path = cache_path(out_folder, cid)
        if not isfile(path):
            raise FileNotFoundError(f"{path} is missing. Fix: run build_region_cache for case {cid!r} first.")
        with np.load(path) as f:
            c = f["crops"]
            crops.append(c)
            case.append(np.full(c.shape[0], n, np.int64))
            rid.append(f["region_ids"].astype(np.int64))
            bbox.append(f["bboxes"].astype(np.int64).reshape(-1, 6))
    if not crops:
        raise FileNotFoundError(f"no cached cases in {out_folder}")
    stored = np.concatenate(crops, axis=0)
    if dtype is not None:
        dtype = np.dtype(dtype)
        out = stored.astype(dtype)
        if stored.dtype == np.uint8 and dtype.kind == "f":
            out /= 255.0
        stored = out
    return stored, RegionIndex(case_ids=case_ids, case=np.concatenate(case), region_id=np.concatenate(rid),
                               bbox=np.concatenate(bbox))
