"""SuperCL's supervoxels of every pool case, computed once and cached, one ``<case_id>.npz`` per case.

Each file holds ``supervoxels`` (uint16, or uint32 above 65535 labels; the full preprocessed shape, 0 outside
the body), ``shape`` int64 (3,), ``params`` (JSON) and ``cache_key``. Writes are atomic; a rerun skips the cases
made with the same parameters and recomputes the others with a warning; :func:`load_supervoxels` checks what it
reads against the case and names the fix.
"""
from __future__ import annotations

import json
import os
from os.path import join
from typing import Callable, Sequence

import numpy as np

from nnunet_cl.case_cache import (PreprocessedCaseLoader, check_cache_folder, pending_cases, run_case_jobs,
                                  save_npz_atomic)
from nnunet_cl.regions.supervoxels import body_mask, supervoxels

from .defaults import CACHE_FOLDER, SUPERVOXEL_DEFAULTS

__all__ = ["case_supervoxels", "build_supervoxel_cache", "load_supervoxels", "cache_path", "n_segments_for"]


def n_segments_for(n_voxels: int, supervoxel_edge: float) -> int:
    """Supervoxels to request for a body of ``n_voxels``: one per ``supervoxel_edge``^3 voxels, at least 1."""
    if not supervoxel_edge > 0:
        raise ValueError(f"supervoxel_edge must be > 0; got {supervoxel_edge}")
    return max(1, int(round(n_voxels / float(supervoxel_edge) ** 3)))


def case_supervoxels(image: np.ndarray, spacing: Sequence[float], supervoxel_edge: float = 8,
                     compactness: float = 0.1, downsample: int = 2) -> np.ndarray:
    """Body-masked 3-D SLIC supervoxels of one preprocessed volume (z, y, x): int32, 0 outside the body, 1..K."""
    image = np.asarray(image, dtype=np.float32)
    mask = body_mask(image)
    return supervoxels(image, mask, n_segments=n_segments_for(int(mask.sum()), supervoxel_edge),
                       compactness=compactness, spacing=spacing, downsample=downsample)


def cache_path(out_folder: str, case_id: str) -> str:
    return join(out_folder, f"{case_id}.npz")


def _params_key(params: dict) -> str:
    return json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True, default=str)


def _compute_one(case_id: str, loader: Callable, out_folder: str, key: str, params: dict) -> tuple[str, int]:
    image, spacing = loader()
    labels = case_supervoxels(image, spacing, **params)
    n = int(labels.max())
    save_npz_atomic(cache_path(out_folder, case_id), supervoxels=labels.astype(np.uint16 if n < 65535 else np.uint32),
                    shape=np.array(labels.shape, np.int64), params=json.dumps(params, default=str), cache_key=key)
    return case_id, n


def build_supervoxel_cache(cases: Sequence[tuple[str, Callable | tuple]], out_folder: str, num_processes: int = 1,
                           progress: bool = True, **params) -> dict:
    """Compute :func:`case_supervoxels` for every case not cached yet and write ``<case_id>.npz``.

    Args:
        cases: ``(case_id, loader)``; a loader returns ``(image (z, y, x), spacing)``, or is ``(folder, identifier
            [, spacing])`` of nnU-Net's preprocessed data (:class:`~nnunet_cl.case_cache.PreprocessedCaseLoader`).
        out_folder: the trainers use ``<nnUNet_preprocessed>/DatasetXXX/nnunet_cl_supercl/<data_identifier>``;
            never nnU-Net's own data folder.
        num_processes: worker processes (1: in this process).
        progress: a tqdm bar.
        **params: supervoxel_edge, compactness, downsample (defaults: ``SUPERVOXEL_DEFAULTS``).

    Returns:
        {"computed": [case ids], "skipped": [case ids], "n_supervoxels": {case id: K of computed cases}}.
    """
    unknown = set(params) - set(SUPERVOXEL_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown supervoxel parameter(s) {sorted(unknown)}; known: {sorted(SUPERVOXEL_DEFAULTS)}")
    params = {**SUPERVOXEL_DEFAULTS, **params}
    ids = [str(c[0]) for c in cases]
    if len(set(ids)) != len(ids):
        raise ValueError("case ids must be unique")
    os.makedirs(out_folder, exist_ok=True)
    check_cache_folder(out_folder, CACHE_FOLDER)
    key = _params_key(params)
    todo, skipped = pending_cases(cases, lambda c: cache_path(out_folder, c), key, "build_supervoxel_cache")
    jobs = [(case_id, spec if callable(spec) else PreprocessedCaseLoader(*spec), out_folder, key, params)
            for case_id, spec in todo]
    n = dict(run_case_jobs(_compute_one, jobs, num_processes, "SuperCL supervoxels", progress))
    return {"computed": [j[0] for j in jobs], "skipped": skipped, "n_supervoxels": n}


def load_supervoxels(out_folder: str, case_id: str, expected_shape: Sequence[int] | None = None) -> np.ndarray:
    """The cached supervoxel map of ``case_id`` as int32, checked against the case's shape.

    Raises a ValueError naming the file and the fix when it is missing, unreadable or of another shape (the
    preprocessed data changed after the cache was made).
    """
    path = cache_path(out_folder, case_id)
    fix = (f"Fix: delete {path} (or the whole folder {out_folder}); the trainer recomputes what is missing at its "
           f"next start.")
    try:
        with open(path, "rb") as fh, np.load(fh) as f:
            labels = np.asarray(f["supervoxels"]).astype(np.int32)
            shape = tuple(int(s) for s in f["shape"])
    except FileNotFoundError:
        raise ValueError(f"no supervoxels cached for case {case_id} in {out_folder}. Fix: start the SuperCL trainer "
                         f"again (it computes missing cases), or build_supervoxel_cache.") from None
    except Exception as e:
        raise ValueError(f"the supervoxel cache {path} is unreadable ({type(e).__name__}: {e}). {fix}") from None
    if labels.shape != shape or labels.ndim != 3:
        raise ValueError(f"the supervoxel cache {path} is inconsistent (map {labels.shape}, stored shape {shape}). {fix}")
    if expected_shape is not None and tuple(int(s) for s in expected_shape) != shape:
        raise ValueError(f"the supervoxel cache {path} has shape {shape} but the preprocessed case has "
                         f"{tuple(expected_shape)}: the data were preprocessed again after the cache was made. {fix}")
    return labels
