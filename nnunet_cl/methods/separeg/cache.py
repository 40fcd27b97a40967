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
import multiprocessing as mp
import os
import warnings
from dataclasses import dataclass
from glob import glob
from os.path import basename, dirname, isfile, join
from typing import Callable, Sequence, Union

import numpy as np

from .defaults import CACHE_FOLDER
from .separation import separate_case

__all__ = ["build_region_cache", "load_region_cache", "RegionIndex", "PreprocessedCaseLoader", "cache_path"]

Loader = Callable[[], tuple[np.ndarray, Sequence[float]]]
CaseSpec = Union[Loader, tuple]


# ----------------------------------------------------------------------------------------------- loaders
def _spacing_from_plans(folder: str) -> list[float]:
    """Spacing of the configuration whose data_identifier is the folder's name (plans json beside it)."""
    from nnunet_cl.paths import NnUNetCLError, resolved_configuration
    ident = basename(os.path.normpath(folder))
    for plans_file in sorted(glob(join(dirname(os.path.normpath(folder)), "*.json"))):
        try:
            with open(plans_file) as f:
                plans = json.load(f)
        except (OSError, ValueError):
            continue
        configs = plans.get("configurations") if isinstance(plans, dict) else None
        if not isinstance(configs, dict):
            continue
        for name in configs:
            try:
                c = resolved_configuration(plans, name)
            except NnUNetCLError:  # a broken configuration in some json: not the one we look for
                continue
            if c.get("data_identifier") == ident and c.get("spacing") is not None:
                return [float(s) for s in c["spacing"]]
    raise ValueError(f"cannot find the spacing of {folder}: no plans json beside it has a configuration with "
                     f"data_identifier {ident!r}. Fix: pass (folder, identifier, spacing) or a loader callable.")


class PreprocessedCaseLoader:
    """Picklable loader of one case of nnU-Net's preprocessed data (any of nnU-Net's dataset formats).

    Returns (data[channel] as float32 (z, y, x), spacing). ``spacing`` defaults to the spacing of the
    plans configuration the folder belongs to (the preprocessed data are resampled to it; the case's
    ``properties['spacing']`` is the original spacing and would be wrong).
    """

    def __init__(self, folder: str, identifier: str, spacing: Sequence[float] | None = None, channel: int = 0):
        self.folder, self.identifier, self.channel = folder, identifier, int(channel)
        self.spacing = None if spacing is None else [float(s) for s in spacing]

    def __call__(self) -> tuple[np.ndarray, list[float]]:
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        ds = infer_dataset_class(self.folder)(self.folder, [self.identifier])
        data, _seg, _prev, _props = ds.load_case(self.identifier)
        spacing = self.spacing if self.spacing is not None else _spacing_from_plans(self.folder)
        return np.asarray(data[self.channel], dtype=np.float32), spacing

    def __repr__(self):
        return (f"PreprocessedCaseLoader({self.folder!r}, {self.identifier!r}, spacing={self.spacing}, "
                f"channel={self.channel})")


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


def _is_done(path: str, key: str) -> bool | None:
    """True: finished with these parameters; False: finished with others; None: missing or unreadable."""
    if not isfile(path):
        return None
    try:
        with np.load(path) as f:
            return str(f["cache_key"]) == key
    except Exception:  # truncated by hand or from an old format: recompute
        return None


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
    path = cache_path(out_folder, case_id)
    tmp = join(out_folder, f".{case_id}.npz.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f, crops=crops, region_ids=res["region_ids"].astype(np.int32), bboxes=res["bboxes"].astype(np.int32),
                labels_lowres=low, shape=np.array(labels.shape, np.int64), downsample=np.int64(d),
                filtered_ids=filtered_ids, filtered_reasons=reasons,
                spacing=np.array(res["params"]["spacing"], np.float64), window=np.array(res["window"], np.float64),
                params=json.dumps(res["params"], default=str), cache_key=key)
        os.replace(tmp, path)
    finally:
        if isfile(tmp):
            os.remove(tmp)
    return case_id, int(crops.shape[0])


# Work shared with forked workers (so that loaders need not be picklable, e.g. lambdas).
_JOBS: list = []


def _run_job(i: int):
    return _compute_one(*_JOBS[i])


def _run_args(args):
    return _compute_one(*args)


def _worker_init():
    # one thread per worker: the parallelism is over cases
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
    except Exception:
        pass


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
    from tqdm import tqdm

    if crop_dtype not in ("uint8", "float16"):
        raise ValueError(f"crop_dtype must be 'uint8' or 'float16'; got {crop_dtype!r}")
    ids = [str(c[0]) for c in cases]
    if len(set(ids)) != len(ids):
        raise ValueError("case ids must be unique")
    bad = [c for c in ids if not c or os.sep in c or c.startswith(".")]
    if bad:
        raise ValueError(f"case ids must be plain file names; got {bad[:3]}")
    os.makedirs(out_folder, exist_ok=True)
    foreign = [f for f in os.listdir(out_folder) if f.endswith((".b2nd", ".pkl", ".npy"))]
    if foreign:
        raise ValueError(f"{out_folder} holds nnU-Net data ({foreign[0]}, ...). Writing .npz files there would break "
                         f"nnU-Net's dataset-format detection. Fix: use a separate folder, e.g. "
                         f"<nnUNet_preprocessed>/DatasetXXX/{CACHE_FOLDER}/<data_identifier>, as the trainers do.")
    key = _params_key(separation_kwargs, crop_dtype)
    jobs, skipped, stale = [], [], []
    for case_id, spec in cases:
        state = _is_done(cache_path(out_folder, str(case_id)), key)
        if state:
            skipped.append(str(case_id))
            continue
        if state is False:
            stale.append(str(case_id))
        jobs.append((str(case_id), _as_loader(spec), out_folder, crop_dtype, key, dict(separation_kwargs)))
    if stale:
        warnings.warn(f"build_region_cache: {len(stale)} cached case(s) were made with other parameters and are "
                      f"recomputed (e.g. {stale[:3]})", RuntimeWarning, stacklevel=2)
    n_regions: dict[str, int] = {}
    bar = tqdm(total=len(jobs), desc="SepaReg separation", unit="case", disable=not progress or not jobs)
    try:
        if num_processes <= 1 or len(jobs) <= 1:
            for job in jobs:
                cid, r = _compute_one(*job)
                n_regions[cid] = r
                bar.update()
        elif "fork" in mp.get_all_start_methods():
            global _JOBS
            _JOBS = jobs
            try:
                with mp.get_context("fork").Pool(min(num_processes, len(jobs)), initializer=_worker_init) as pool:
                    for cid, r in pool.imap_unordered(_run_job, range(len(jobs))):
                        n_regions[cid] = r
                        bar.update()
            finally:
                _JOBS = []
        else:
            with mp.get_context().Pool(min(num_processes, len(jobs)), initializer=_worker_init) as pool:
                for cid, r in pool.imap_unordered(_run_args, jobs):
                    n_regions[cid] = r
                    bar.update()
    finally:
        bar.close()
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
