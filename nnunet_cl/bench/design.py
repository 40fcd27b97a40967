"""The design of a label-efficiency benchmark, as plain functions: test set, folds, arms, run plan and plans.

Nothing here runs nnU-Net; `nnunet_cl.bench.runner` orchestrates the runs these pieces describe, and the tests
check them directly. See docs/benchmarks.md for the protocol.
"""
import json
import re
from pathlib import Path

import numpy as np

from nnunet_cl.paths import save_json_atomic
from nnunet_cl.splits import draw_order

CONFIG = "3d_fullres"
BASE_PLANS = "nnUNetPlans"
BENCH_PLANS = "nnUNetPlans_clBench"  # with --patch/--batch_size/--width: same preprocessed data, smaller training
SCRATCH, CEILING = "scratch", "ceiling"
# The arms table: one row per contrastive method, the only place a new method is named for the benchmark.
# arm name -> (its pretraining-only trainer, {schedule: the attributes of its pretraining there}). Every method
# gets the same number of pretraining steps in a schedule; trainers/benchmark.py makes '<trainer>_<schedule>'
# (and the '<trainer>5x_<schedule>' arms) from these rows. SepaReg's epochs are its phases (region + k experts x
# expert_epochs + distillation); its paper batch of 32 regions and k-means of every crop are pinned, so the
# tables stay what they measured when those defaults changed.
_SEPAREG_PINNED = {"regions_per_step": 32, "cluster_max_regions": None}
METHODS = {
    "simclr": ("nnUNetTrainerSimCLRPretrain", {
        # SimCLR's negatives are the other samples of the step: 8 samples (16 views), not the batch of 2
        "clBench": {"pretrain_epochs": 8, "pretrain_batch_size": 8},
        "clBenchQuick": {"pretrain_epochs": 6, "pretrain_batch_size": 8},
        "clBenchCT": {"pretrain_epochs": 8, "pretrain_batch_size": 8}}),
    "separeg": ("nnUNetTrainerSepaRegPretrain", {
        "clBench": {**_SEPAREG_PINNED, "region_epochs": 2, "k": 4, "expert_epochs": 1, "distill_epochs": 2},
        # k = 2: 4 epochs instead of 6, since separation and k-means add a fixed cost the others do not have
        "clBenchQuick": {**_SEPAREG_PINNED, "region_epochs": 1, "k": 2, "expert_epochs": 1, "distill_epochs": 1},
        "clBenchCT": {**_SEPAREG_PINNED, "region_epochs": 2, "k": 4, "expert_epochs": 1, "distill_epochs": 2}}),
    "polycl": ("nnUNetTrainerPolyCLPretrain", {
        "clBench": {"pretrain_epochs": 8}, "clBenchQuick": {"pretrain_epochs": 6}, "clBenchCT": {"pretrain_epochs": 8}}),
    # its supervoxels are computed once per pool case at the first start, outside the steps counted here; 8 patches
    # (16 views) per step pinned, as SimCLR's, for a graph of more than the queue (the default batch is smaller)
    "supercl": ("nnUNetTrainerSuperCLPretrain", {
        "clBench": {"pretrain_epochs": 8, "pretrain_batch_size": 8},
        "clBenchQuick": {"pretrain_epochs": 6, "pretrain_batch_size": 8},
        "clBenchCT": {"pretrain_epochs": 8, "pretrain_batch_size": 8}}),
}
# arm name -> pretraining trainer (its schedule class is '<trainer>_<schedule>'); None: no pretraining
METHOD_ARMS = {arm: trainer for arm, (trainer, _) in METHODS.items()}
DEFAULT_ARMS = [SCRATCH, *METHOD_ARMS, CEILING]
# '<arm>5x': the same method with LONG_PRETRAIN times the pretraining steps (their classes are made in
# trainers/benchmark.py from this constant); on request
LONG_PRETRAIN = 5
KNOWN_ARMS = {SCRATCH: None, **METHOD_ARMS, CEILING: None,
              **{f"{a}{LONG_PRETRAIN}x": f"{t}{LONG_PRETRAIN}x" for a, t in METHOD_ARMS.items()}}
QUICK_ARMS = [a for a in DEFAULT_ARMS if a != CEILING]  # --quick is a first look at one k: no all-labels run
PRETRAIN_KEY, PRETRAIN_FOLD = "pretrain", 0
FOLDS_FILE = "benchmark_folds.json"


class BenchmarkError(RuntimeError):
    """A user-facing error: the message says what is wrong and what to do."""


def split_cases(cases: list[str], n_test: int, n_val: int, seed: int, complete: list[str] | None = None) -> dict:
    """Seeded partition of the labeled cases: {'test', 'val', 'train'} (train = every case not test or val).

    complete: the cases whose label map holds every class (a partially contoured dataset leaves organs it did
    not contour as background). When given, the test set is drawn from them only, so that no correct
    prediction of an uncontoured organ is scored as a miss, and 'labeled' lists the complete training cases,
    from which build_folds draws the k labeled cases.
    """
    cases = sorted(cases)
    if len(set(cases)) != len(cases):
        twice = sorted({c for c in cases if cases.count(c) > 1})
        raise BenchmarkError(f"case identifiers appear more than once in the source: {', '.join(twice[:10])}. Fix: "
                             f"give every image and label file a unique case name.")
    if n_test < 1 or n_val < 1:
        raise BenchmarkError(f"--n_test and --n_val must be at least 1 (got {n_test}, {n_val})")
    if n_test + n_val + 1 > len(cases):
        raise BenchmarkError(f"{len(cases)} labeled cases cannot hold {n_test} test + {n_val} validation cases and a "
                             f"training set. Fix: lower --n_test / --n_val.")
    if complete is None:
        order = [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]
        return {"test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
                "train": sorted(order[n_test + n_val:])}
    complete = sorted(set(complete) & set(cases))
    if len(complete) < n_test + 2:
        raise BenchmarkError(f"only {len(complete)} cases hold every class: too few for {n_test} test cases and "
                             f"labeled draws. Fix: lower --n_test, or leave out --complete_cases.")
    rng = np.random.default_rng(seed)
    test = [complete[i] for i in rng.permutation(len(complete))[:n_test]]
    rest = sorted(set(cases) - set(test))
    order = [rest[i] for i in rng.permutation(len(rest))]
    train = sorted(order[n_val:])
    return {"test": sorted(test), "val": sorted(order[:n_val]), "train": train,
            "labeled": sorted(set(train) & set(complete))}


def complete_cases(labels_dir: Path, cases: list[str], ending: str, labels: dict) -> list[str]:
    """The cases whose label map holds every class of dataset.json's `labels` (background and regions aside)."""
    import SimpleITK as sitk
    wanted = {int(v) for v in labels.values() if not isinstance(v, list) and int(v) != 0}

    def classes(case: str) -> set[int]:
        image = sitk.ReadImage(str(Path(labels_dir) / f"{case}{ending}"))  # kept: the view below borrows its memory
        return set(np.unique(sitk.GetArrayViewFromImage(image)).tolist())

    return [c for c in cases if wanted <= classes(c)]


def fold_key(kind: str, k, seed: int) -> str:
    return f"{kind}:k={k}:seed={seed}"


def build_folds(train: list[str], val: list[str], ks: list[int], seeds: list[int],
                existing: list[dict] = (), labeled: list[str] | None = None) -> list[dict]:
    """Fold list for splits_final.json: the pretraining fold, one fold per (k, seed), one ceiling fold per seed.

    Fold 0 is the pretraining fold, with empty train and val: `nnunet_cl.pool.list_pool` excludes only a fold's
    val cases, so its pool is every preprocessed training image plus the ingested scans (what fold 'all' gives),
    and a method that reads organ presence of "the fold's labeled training cases" (PolyCL O/M, its crop
    balancing) gets none: pretraining sees no label.

    Folds already in `existing` (an earlier invocation) keep their index, new ones are appended, so finished runs
    stay valid when k or seeds are added later. For a seed, the k-draws are prefixes of one seeded order of the
    training cases (draw_order, fold 0): the k=2 set is inside the k=5 set. Validation is `val` for every fold.
    labeled: the training cases the k-draws come from (split_cases' 'labeled'); default every training case.
    The ceiling always trains on every training case.
    """
    if set(train) & set(val):
        raise BenchmarkError("validation cases inside the training candidates")
    draw_from = list(train) if labeled is None else sorted(labeled)
    if set(draw_from) - set(train):
        raise BenchmarkError("labeled candidates outside the training cases")
    too_big = [k for k in ks if k > len(draw_from) or k < 1]
    if too_big:
        raise BenchmarkError(f"k={too_big} impossible with {len(draw_from)} training cases to draw from (outside test "
                             f"and validation). Fix: smaller --k, or lower --n_test/--n_val.")
    folds = [dict(f) for f in existing] or [{"key": PRETRAIN_KEY, "kind": PRETRAIN_KEY, "k": 0, "seed": None,
                                               "fold": PRETRAIN_FOLD, "train": []}]
    index = {f["key"]: f for f in folds}
    if index.get(PRETRAIN_KEY, {}).get("fold") != PRETRAIN_FOLD:
        raise BenchmarkError(f"{FOLDS_FILE} has no pretraining fold {PRETRAIN_FOLD}. Fix: use a new --work.")
    wanted = []
    for seed in seeds:
        order = draw_order(draw_from, seed, 0)
        for k in ks:
            wanted.append({"key": fold_key("k", k, seed), "kind": "k", "k": int(k), "seed": int(seed),
                           "train": order[:k]})
        wanted.append({"key": fold_key(CEILING, "all", seed), "kind": CEILING, "k": len(train), "seed": int(seed),
                       "train": sorted(train)})
    for w in wanted:
        old = index.get(w["key"])
        if old is None:
            w["fold"] = len(folds)
            folds.append(w)
            index[w["key"]] = w
        elif old["train"] != w["train"]:
            raise BenchmarkError(f"fold {old['fold']} ({w['key']}) in {FOLDS_FILE} trains on other cases than this "
                                 f"draw gives; the work folder was made with other settings. Fix: use a new --work.")
    for f in folds:
        f["val"] = [] if f["kind"] == PRETRAIN_KEY else list(val)
    return folds


def splits_from_folds(folds: list[dict]) -> list[dict]:
    """splits_final.json content: a plain list of {'train', 'val'}, fold i at index i."""
    by_index = sorted(folds, key=lambda f: f["fold"])
    assert [f["fold"] for f in by_index] == list(range(len(by_index)))
    return [{"train": list(f["train"]), "val": list(f["val"])} for f in by_index]


def parse_arms(names: list[str]) -> list[tuple[str, str | None]]:
    """[(arm, pretraining trainer or None)]; 'name=nnUNetTrainerXPretrain' adds an arm of your own."""
    arms = []
    for item in names:
        name, _, trainer = item.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise BenchmarkError(f"arm name {name!r}: use letters, digits, _ and - only")
        if trainer:
            if name in (SCRATCH, CEILING):
                raise BenchmarkError(f"{name} has no pretraining trainer: write '{name}' alone, or give your own "
                                     f"method another name (e.g. mine={trainer})")
            arms.append((name, trainer))
        elif name in KNOWN_ARMS:
            arms.append((name, KNOWN_ARMS[name]))
        else:
            raise BenchmarkError(f"unknown arm {name!r}. Known: {', '.join(KNOWN_ARMS)}; or give your own as "
                                 f"NAME=nnUNetTrainerXPretrain (its schedule class NAME_<schedule> must exist).")
    if len({a for a, _ in arms}) != len(arms):
        twice = sorted({a for a, _ in arms if [x for x, _ in arms].count(a) > 1})
        raise BenchmarkError(f"arm(s) listed twice in --arms: {', '.join(twice)}. Fix: name each arm once.")
    return arms


def run_id(arm: str, fold: dict) -> str:
    return f"{arm}__k{'all' if fold['kind'] == CEILING else fold['k']}__seed{fold['seed']}"


def plan_runs(folds: list[dict], arms: list[tuple[str, str | None]], ks: list[int], seeds: list[int],
              ceiling_seeds: list[int]) -> list[tuple[str, str | None, dict]]:
    """(arm, pretrainer, fold) to run, seed-major so that a stopped benchmark leaves whole seeds behind.

    Every arm but the ceiling runs on each fine-tuning fold of the wanted k and seeds; the ceiling runs on its
    all-labels fold for the seeds in ceiling_seeds, if it is among the arms.
    """
    wanted = [f for f in folds if f["kind"] != PRETRAIN_KEY and f["seed"] in seeds
              and (f["kind"] == CEILING or f["k"] in ks)]
    plan = []
    for seed in seeds:
        for fold in [f for f in wanted if f["seed"] == seed]:
            for arm, pre in arms:
                if fold["kind"] == CEILING:
                    if arm == CEILING and seed in ceiling_seeds:
                        plan.append((arm, pre, fold))
                elif arm != CEILING:
                    plan.append((arm, pre, fold))
    return plan


def write_bench_plans(pre_dataset: Path, patch: list[int] | None = None, batch_size: int | None = None,
                      width: int | None = None, topology: str | None = None,
                      spacing_factor: float | None = None) -> dict:
    """nnUNetPlans_clBench.json: nnUNetPlans with a smaller 3d_fullres training.

    patch: patch size; batch_size: samples per step; width: features of the first stage, every stage scaled
    alike (nnU-Net's 32 -> 16 halves them all). topology "planned": the network's stages, strides and kernels
    are planned for `patch` by nnU-Net's own rule (as its planner would for that patch); None: the plans'
    stages are kept and the patch must be a multiple of their total stride. spacing_factor: the target spacing
    times this factor on every axis (a coarser resampling, as nnU-Net's 3d_lowres), with its own data
    identifier, so the data must be preprocessed for these plans (`needs_preprocessing`); None keeps the plans'
    spacing and their preprocessed data. Either way the network is nnU-Net's PlainConvUNet, predictions are
    resampled back to each image's own spacing, and every arm trains and predicts with these plans. Returns
    the new 3d_fullres configuration.
    """
    if topology not in (None, "planned"):
        raise BenchmarkError(f"unknown topology {topology!r}: 'planned' or none")
    plans = json.loads((pre_dataset / f"{BASE_PLANS}.json").read_text())
    cfg = plans["configurations"][CONFIG]
    arch = cfg["architecture"]["arch_kwargs"]
    if spacing_factor is not None:
        if not spacing_factor > 1:
            raise BenchmarkError(f"--spacing_factor must be above 1 (a coarser spacing), got {spacing_factor}")
        cfg["spacing"] = [float(sp) * spacing_factor for sp in cfg["spacing"]]
        cfg["median_image_size_in_voxels"] = [round(float(n) / spacing_factor)
                                              for n in cfg["median_image_size_in_voxels"]]
        cfg["data_identifier"] = f"{BENCH_PLANS}_{CONFIG}"
    if patch is not None:
        if topology == "planned":
            plan_topology(cfg, [int(p) for p in patch])
        strides = np.prod(np.array(arch["strides"]), axis=0)
        if len(patch) != len(strides) or any(p < 1 or p % s for p, s in zip(patch, strides)):
            raise BenchmarkError(f"--patch {patch} must have {len(strides)} sizes, each a multiple of the network's "
                                 f"total stride {strides.tolist()} (the plans' patch is {cfg['patch_size']})")
        cfg["patch_size"] = [int(p) for p in patch]
    if batch_size is not None:
        if batch_size < 1:
            raise BenchmarkError(f"--batch_size must be at least 1, got {batch_size}")
        cfg["batch_size"] = int(batch_size)
    if width is not None:
        first = arch["features_per_stage"][0]
        if width < 1:
            raise BenchmarkError(f"--width must be at least 1, got {width}")
        arch["features_per_stage"] = [max(1, int(f * width // first)) for f in arch["features_per_stage"]]
    plans["plans_name"] = BENCH_PLANS
    save_json_atomic(plans, pre_dataset / f"{BENCH_PLANS}.json")
    return cfg


def plan_topology(cfg: dict, patch: list[int]) -> None:
    """Re-plan cfg's PlainConvUNet stages for `patch` in place, as nnU-Net's ExperimentPlanner does.

    A smaller patch through the plans' deep network leaves a 1-2 voxel bottleneck; nnU-Net itself would pool
    only while feature maps keep at least 4 voxels per axis (get_pool_and_conv_props), so a 32x64x32 patch
    gets 4 stages, not 6. Features double per stage from the first up to the plans' largest, as the planner's.
    """
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
    arch = cfg["architecture"]["arch_kwargs"]
    _, strides, kernels, fitted, _ = get_pool_and_conv_props(cfg["spacing"], patch, 4, 999999)
    if [int(p) for p in fitted] != list(patch):
        raise BenchmarkError(f"--patch {patch}: nnU-Net's planner would make it {[int(p) for p in fitted]} "
                             f"(each axis a multiple of its pooling). Fix: pass that patch.")
    n = len(strides)
    first, top = arch["features_per_stage"][0], max(arch["features_per_stage"])
    blocks, blocks_dec = arch["n_conv_per_stage"], arch["n_conv_per_stage_decoder"]
    arch.update(n_stages=n, strides=[list(s) for s in strides], kernel_sizes=[list(k) for k in kernels],
                features_per_stage=[min(top, first * 2 ** i) for i in range(n)],
                n_conv_per_stage=[blocks[min(i, len(blocks) - 1)] for i in range(n)],
                n_conv_per_stage_decoder=[blocks_dec[min(i, len(blocks_dec) - 1)] for i in range(n - 1)])


def needs_preprocessing(plans_variant: dict | None) -> bool:
    """Whether these bench plans resample the data (their own data identifier) rather than reuse nnUNetPlans'."""
    return bool(plans_variant and plans_variant.get("spacing_factor"))
