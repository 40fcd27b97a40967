"""Per-case work over nnU-Net's preprocessed cases, cached as one ``<case_id>.npz`` per case.

Shared by every method that computes something once per pool case (SepaReg's separation, SuperCL's
supervoxels):

* :class:`PreprocessedCaseLoader` -- one channel of a preprocessed case and its (plans) spacing, picklable;
* :func:`preprocessed_cases` -- the labeled dataset's preprocessed images and the ingested pool cases;
* :func:`save_npz_atomic`, :func:`stored_key` -- writes that never leave a truncated file, and the key that
  says with which parameters a file was made; :func:`pending_cases` -- which cases a rerun must (re)compute;
* :func:`run_case_jobs` -- run jobs in parallel over cases with a progress bar.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import warnings
from glob import glob
from os.path import basename, dirname, isfile, join
from typing import Callable, Iterator, Sequence

import numpy as np

__all__ = ["PreprocessedCaseLoader", "spacing_from_plans", "plans_configuration", "preprocessed_cases", "save_npz_atomic",
           "stored_key", "pending_cases", "run_case_jobs", "check_cache_folder"]


def spacing_from_plans(folder: str) -> list[float]:
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
        spacing = self.spacing if self.spacing is not None else spacing_from_plans(self.folder)
        return np.asarray(data[self.channel], dtype=np.float32), spacing

    def __repr__(self):
        return (f"PreprocessedCaseLoader({self.folder!r}, {self.identifier!r}, spacing={self.spacing}, "
                f"channel={self.channel})")


def plans_configuration(plans: dict, name: str) -> dict:
    """The configuration `name` with nnU-Net's inheritance (`inherits_from`) resolved, or an error naming the
    configurations there are."""
    from nnunet_cl.paths import NnUNetCLError, resolved_configuration
    if name not in plans["configurations"]:
        raise NnUNetCLError(f"configuration {name!r} is not in the plans (available: "
                            f"{sorted(plans['configurations'])}). Fix: pick one with -c.")
    return resolved_configuration(plans, name)


def preprocessed_cases(folder: str, data_identifier: str) -> list[tuple[str, str]]:
    """(folder, identifier) of the labeled dataset's preprocessed images and of the ingested pool cases."""
    from nnunet_cl.paths import NnUNetCLError
    from nnunet_cl.pool import pool_identifiers
    from nnunet_cl.splits import preprocessed_identifiers
    labeled = join(folder, data_identifier)
    try:
        out = [(labeled, i) for i in preprocessed_identifiers(folder, data_identifier)]
    except NnUNetCLError:  # no labeled cases in this configuration: the pool alone may do
        out = []
    return out + pool_identifiers(folder, data_identifier)


def save_npz_atomic(path: str, **arrays) -> None:
    """``np.savez_compressed`` to a temporary name in the same folder, then renamed: an interrupted write
    never leaves a truncated file under ``path``."""
    folder, name = dirname(path) or ".", basename(path)
    tmp = join(folder, f".{name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    finally:
        if isfile(tmp):
            os.remove(tmp)


def stored_key(path: str, key: str) -> bool | None:
    """True: ``path`` was written with ``key`` (its ``cache_key`` entry); False: with another key; None: missing
    or unreadable (truncated, an old format), so it must be computed."""
    if not isfile(path):
        return None
    try:  # the file is opened here, so a truncated one that np.load rejects is still closed
        with open(path, "rb") as fh, np.load(fh) as f:
            return str(f["cache_key"]) == key
    except Exception:
        return None


def pending_cases(cases: Sequence[tuple[str, object]], path_of: Callable[[str], str], key: str,
                  what: str) -> tuple[list[tuple[str, object]], list[str]]:
    """Split ``(case_id, spec)`` pairs into those to compute (missing, unreadable, or cached with another key;
    the last are warned about, naming ``what``) and the ids already cached with ``key``."""
    todo, skipped, stale = [], [], []
    for case_id, spec in cases:
        state = stored_key(path_of(str(case_id)), key)
        if state:
            skipped.append(str(case_id))
            continue
        if state is False:
            stale.append(str(case_id))
        todo.append((str(case_id), spec))
    if stale:
        warnings.warn(f"{what}: {len(stale)} cached case(s) were made with other parameters and are recomputed "
                      f"(e.g. {stale[:3]})", RuntimeWarning, stacklevel=3)
    return todo, skipped


def check_cache_folder(out_folder: str, cache_folder_name: str) -> None:
    """Refuse nnU-Net's own data folder: .npz files there would break nnU-Net's dataset-format detection."""
    foreign = [f for f in os.listdir(out_folder) if f.endswith((".b2nd", ".pkl", ".npy"))] \
        if os.path.isdir(out_folder) else []
    if foreign:
        raise ValueError(f"{out_folder} holds nnU-Net data ({foreign[0]}, ...). Writing .npz files there would break "
                         f"nnU-Net's dataset-format detection. Fix: use a separate folder, e.g. "
                         f"<nnUNet_preprocessed>/DatasetXXX/{cache_folder_name}/<data_identifier>, as the trainers do.")


# work shared with forked workers, so that a job's arguments need not be picklable (e.g. lambdas)
_JOBS: list = []
_COMPUTE: list = []


def _run_job(i: int):
    return _COMPUTE[0](*_JOBS[i])


def _worker_init():
    try:  # one thread per worker: the parallelism is over cases
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
    except Exception:
        pass


def run_case_jobs(compute: Callable, jobs: Sequence[tuple], num_processes: int = 1, desc: str = "cases",
                  progress: bool = True) -> Iterator:
    """Yield ``compute(*job)`` for every job, in completion order, with a tqdm bar ("<desc>: n/N case").

    ``num_processes > 1`` uses a ``fork`` pool where available (jobs may hold lambdas), elsewhere the default
    start method (jobs and ``compute`` must then be picklable); 1 runs in this process.
    """
    from tqdm import tqdm

    global _JOBS, _COMPUTE
    bar = tqdm(total=len(jobs), desc=desc, unit="case", disable=not progress or not jobs)
    try:
        if num_processes <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield compute(*job)
                bar.update()
        elif "fork" in mp.get_all_start_methods():
            _JOBS, _COMPUTE = list(jobs), [compute]
            try:
                with mp.get_context("fork").Pool(min(num_processes, len(jobs)), initializer=_worker_init) as pool:
                    for result in pool.imap_unordered(_run_job, range(len(jobs))):
                        yield result
                        bar.update()
            finally:
                _JOBS, _COMPUTE = [], []
        else:
            with mp.get_context().Pool(min(num_processes, len(jobs)), initializer=_worker_init) as pool:
                for result in pool.starmap(compute, jobs):
                    yield result
                    bar.update()
    finally:
        bar.close()
