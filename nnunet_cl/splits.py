"""Limited-label splits: nnU-Net's standard validation folds, with only k labeled training cases per fold.

`nnUNetv2_cl_limited_split -d DATASET -k 5` rewrites `splits_final.json` in the preprocessed dataset folder so
that nnU-Net trains each fold on k cases and validates on the same cases it always would:

- 'val' is the fold's validation set of the existing splits_final.json, or, without one, the split
  nnUNetTrainer.do_split creates (`generate_crossval_split` on the sorted identifiers, seed 12345).
- 'train' is k cases (or round(fraction * n)) drawn from that fold's training cases with a seeded
  permutation: for one seed the draws are nested (k=2 is a subset of k=5, which is a subset of k=10).
- The previous splits_final.json is copied to `splits_final.json.bak_<timestamp>` first, and
  `splits_limited.json` records k/fraction, seed, the unused training cases and the full splits the draw was
  made from (so running it again with another k draws from the full training sets, not from the last draw).
- splits_final.json stays a plain list of {'train', 'val'} dicts, the only thing nnU-Net reads.

The unused training images stay available to self-supervised pretraining: `nnunet_cl.pool.list_pool` takes
every labeled case except the fold's validation cases.
"""
import argparse
import json
import os
import shutil
import time
from os.path import isdir, isfile, join

import numpy as np

from nnunet_cl.paths import NnUNetCLError, preprocessed_folder, save_json_atomic

SPLITS_FILE = "splits_final.json"
LIMITED_FILE = "splits_limited.json"
NNUNET_SPLIT_SEED = 12345  # nnUNetTrainer.do_split


def _load_json(fname: str):
    with open(fname) as f:
        return json.load(f)


def preprocessed_identifiers(preprocessed_dataset_folder: str, data_identifier: str | None = None) -> list[str]:
    """Sorted case identifiers of the labeled preprocessed dataset.

    Read from `<folder>/<data_identifier>` (.b2nd or .npz cases, like nnU-Net's dataset classes), or, when no
    data identifier is given, from the first configuration folder on disk, falling back to gt_segmentations.
    """
    candidates = [data_identifier] if data_identifier else sorted(
        d for d in os.listdir(preprocessed_dataset_folder)
        if isdir(join(preprocessed_dataset_folder, d)) and d not in ("gt_segmentations", "nnunet_cl_pool"))
    for d in candidates:
        folder = join(preprocessed_dataset_folder, d)
        if not isdir(folder):
            continue
        ids = [f[:-5] for f in os.listdir(folder) if f.endswith(".b2nd") and not f.endswith("_seg.b2nd")]
        ids += [f[:-4] for f in os.listdir(folder) if f.endswith(".npz")]
        if ids:
            return sorted(set(ids))
    gt = join(preprocessed_dataset_folder, "gt_segmentations")
    if data_identifier is None and isdir(gt):
        ids = [f.split(".")[0] for f in os.listdir(gt) if not f.startswith(".")]
        if ids:
            return sorted(ids)
    where = join(preprocessed_dataset_folder, data_identifier) if data_identifier else preprocessed_dataset_folder
    raise NnUNetCLError(f"No preprocessed cases found in {where}. "
                        f"Fix: run nnUNetv2_plan_and_preprocess -d DATASET for this dataset first.")


def default_splits(identifiers: list[str], num_folds: int = 5) -> list[dict]:
    """The split nnUNetTrainer.do_split writes when there is no splits_final.json (sorted ids, seed 12345)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    if len(identifiers) < num_folds:
        raise NnUNetCLError(f"{len(identifiers)} cases cannot be split into {num_folds} folds. "
                            f"Fix: use --folds {max(2, len(identifiers))} or fewer, or add cases.")
    splits = generate_crossval_split(sorted(identifiers), seed=NNUNET_SPLIT_SEED, n_splits=num_folds)
    return [{"train": [str(i) for i in s["train"]], "val": [str(i) for i in s["val"]]} for s in splits]


def current_splits(preprocessed_dataset_folder: str, num_folds: int = 5,
                   data_identifier: str | None = None) -> list[dict]:
    """The splits nnU-Net would train with now: splits_final.json if present, else its default split."""
    splits_file = join(preprocessed_dataset_folder, SPLITS_FILE)
    if isfile(splits_file):
        return _load_json(splits_file)
    return default_splits(preprocessed_identifiers(preprocessed_dataset_folder, data_identifier), num_folds)


def validation_cases(preprocessed_dataset_folder: str, fold: int | str,
                     data_identifier: str | None = None) -> list[str]:
    """Validation identifiers nnUNetTrainer.do_split uses for `fold` ('all' -> none held out here).

    For fold 'all' nnU-Net validates on its training cases, so nothing is held out. A fold beyond the
    splits file gets nnU-Net's seeded random 80:20 split.
    """
    if str(fold) == "all":
        return []
    fold = int(fold)
    splits = current_splits(preprocessed_dataset_folder, data_identifier=data_identifier)
    if fold < len(splits):
        return list(splits[fold]["val"])
    # same fallback as nnUNetTrainer.do_split for folds the splits file does not have
    keys = np.sort(preprocessed_identifiers(preprocessed_dataset_folder, data_identifier))
    rnd = np.random.RandomState(seed=NNUNET_SPLIT_SEED + fold)
    idx_tr = rnd.choice(len(keys), int(len(keys) * 0.8), replace=False)
    return [str(keys[i]) for i in range(len(keys)) if i not in idx_tr]


def _source_splits(preprocessed_dataset_folder: str, num_folds: int) -> list[dict]:
    """Full splits to draw from: the ones recorded by our last run if splits_final.json is still that run's
    output, else splits_final.json itself, else nnU-Net's default split."""
    splits_file = join(preprocessed_dataset_folder, SPLITS_FILE)
    limited_file = join(preprocessed_dataset_folder, LIMITED_FILE)
    if isfile(splits_file):
        splits = _load_json(splits_file)
        if isfile(limited_file):
            meta = _load_json(limited_file)
            if meta.get("limited_splits") == splits and meta.get("source_splits"):
                splits = meta["source_splits"]
        if len(splits) != num_folds:
            raise NnUNetCLError(
                f"{splits_file} has {len(splits)} folds but {num_folds} were requested. Fix: pass --folds "
                f"{len(splits)} to keep its validation sets, or move the file away to get nnU-Net's default split.")
        for i, s in enumerate(splits):
            if not isinstance(s, dict) or "train" not in s or "val" not in s:
                raise NnUNetCLError(f"Fold {i} of {splits_file} is not a {{'train': [...], 'val': [...]}} dict. "
                                    f"Fix: repair or remove the file.")
        return [{"train": list(s["train"]), "val": list(s["val"])} for s in splits]
    return default_splits(preprocessed_identifiers(preprocessed_dataset_folder), num_folds)


def draw_order(train_cases: list[str], seed: int, fold: int) -> list[str]:
    """Seeded order of a fold's training cases; the first k of it are the limited training set.

    Taking prefixes of one permutation is what makes the draws nested across k for a seed.
    """
    rng = np.random.default_rng([seed, fold])
    ordered = sorted(train_cases)
    return [ordered[i] for i in rng.permutation(len(ordered))]


def write_limited_splits(preprocessed_dataset_folder: str, k: int | None = None, fraction: float | None = None,
                         seed: int = 0, num_folds: int = 5) -> list[dict]:
    """Write splits_final.json with k (or round(fraction * n)) training cases per fold and nnU-Net's val.

    Parameters
    ----------
    preprocessed_dataset_folder : nnUNet_preprocessed/DatasetXXX_Name
    k : number of labeled training cases per fold (exclusive with fraction)
    fraction : share of each fold's training cases, in (0, 1]; at least one case is kept
    seed : draws are deterministic per (seed, fold) and nested across k for one seed
    num_folds : folds of nnU-Net's default split (must match an existing splits_final.json)

    Returns the written splits (list of {'train', 'val'}). The previous splits_final.json is backed up to
    splits_final.json.bak_<timestamp>; metadata and unused cases go to splits_limited.json.
    """
    if (k is None) == (fraction is None):
        raise NnUNetCLError("Give exactly one of k (cases per fold) or fraction (share of each fold's training cases).")
    if k is not None and (int(k) != k or k < 1):
        raise NnUNetCLError(f"k must be a positive integer, got {k}.")
    if fraction is not None and not 0 < fraction <= 1:
        raise NnUNetCLError(f"fraction must be in (0, 1], got {fraction}.")
    if int(num_folds) != num_folds or num_folds < 2:
        # scikit-learn's KFold would stop with a traceback; cross-validation needs two folds at least
        raise NnUNetCLError(f"--folds must be an integer of at least 2 (cross-validation folds), got {num_folds}. "
                            f"Fix: use --folds 5 (nnU-Net's default) or another number >= 2.")
    if not isdir(preprocessed_dataset_folder):
        raise NnUNetCLError(f"{preprocessed_dataset_folder} does not exist. "
                            f"Fix: run nnUNetv2_plan_and_preprocess for this dataset first.")

    source = _source_splits(preprocessed_dataset_folder, num_folds)
    limited, unused, k_per_fold = [], [], []
    for fold, s in enumerate(source):
        n = len(s["train"])
        n_take = int(k) if k is not None else max(1, int(round(fraction * n)))
        if n_take > n:
            raise NnUNetCLError(f"k={n_take} but fold {fold} has only {n} training cases. Fix: use -k {n} or less.")
        order = draw_order(s["train"], seed, fold)
        limited.append({"train": order[:n_take], "val": list(s["val"])})
        unused.append(sorted(order[n_take:]))
        k_per_fold.append(n_take)

    splits_file = join(preprocessed_dataset_folder, SPLITS_FILE)
    backup = None
    if isfile(splits_file):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup, i = f"{splits_file}.bak_{stamp}", 1
        while os.path.exists(backup):  # two runs within a second must not overwrite each other's backup
            i += 1
            backup = f"{splits_file}.bak_{stamp}_{i}"
        shutil.copy2(splits_file, backup)
    save_json_atomic(limited, splits_file)
    save_json_atomic({
        "k": k, "fraction": fraction, "seed": seed, "num_folds": num_folds, "k_per_fold": k_per_fold,
        "unused_train": unused, "backup_of_previous_splits": backup,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "note": "splits_final.json holds only the limited training sets; unused_train cases keep their images in "
                "the self-supervised pool (nnunet_cl.pool.list_pool excludes only validation cases).",
        "source_splits": source, "limited_splits": limited,
    }, join(preprocessed_dataset_folder, LIMITED_FILE))
    return limited


def main_limited_split() -> None:
    """Entry point of nnUNetv2_cl_limited_split."""
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_cl_limited_split",
        description="Write splits_final.json with only k labeled training cases per fold (nnU-Net's validation "
                    "folds unchanged). The old file is backed up; unused training cases stay in the pretraining pool.")
    parser.add_argument("-d", required=True, help="dataset name or id")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("-k", type=int, help="labeled training cases per fold")
    group.add_argument("-f", "--fraction", type=float, help="share of each fold's training cases, in (0, 1]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (nested across k). Default: 0")
    parser.add_argument("--folds", type=int, default=5, help="number of folds. Default: 5")
    args = parser.parse_args()
    try:
        folder = preprocessed_folder(args.d)
        splits = write_limited_splits(folder, k=args.k, fraction=args.fraction, seed=args.seed, num_folds=args.folds)
    except NnUNetCLError as e:
        raise SystemExit(f"nnUNetv2_cl_limited_split: error: {e}")
    meta = _load_json(join(folder, LIMITED_FILE))
    print(f"Wrote {join(folder, SPLITS_FILE)} ({len(splits)} folds)")
    for i, s in enumerate(splits):
        print(f"  fold {i}: {len(s['train'])} train, {len(s['val'])} val, {len(meta['unused_train'][i])} unused "
              f"(kept in the pretraining pool)")
    if meta["backup_of_previous_splits"]:
        print(f"Previous splits kept in {meta['backup_of_previous_splits']}")


if __name__ == "__main__":
    main_limited_split()
