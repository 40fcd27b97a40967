"""nnUNetv2_cl_benchmark's plumbing: splits, disjointness of test set and pool, resume, table and plot.

The pure pieces are tested directly; one end-to-end run goes through the real nnU-Net commands on a tiny
synthetic phantom dataset (10 cases of 24x40x40) with 2-epoch schedules from tests/ext_trainers: the scratch
and SimCLR arms at k=2 with one seed, plus an arm whose trainer does not exist (reported as skipped).
"""
import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnunet_cl.safe_load import load_checkpoint_file
from nnunet_cl.bench.design import (BenchmarkError, PRETRAIN_FOLD, build_folds, parse_arms, split_cases,
                                        splits_from_folds)
from nnunet_cl.bench.report import write_report

TESTS = Path(__file__).resolve().parent
CASES = [f"case_{i:03d}" for i in range(30)]


# ------------------------------------------------------------------------------------------------ pure pieces

def test_split_cases_is_a_seeded_partition():
    s = split_cases(CASES, n_test=6, n_val=4, seed=1)
    assert len(s["test"]) == 6 and len(s["val"]) == 4 and len(s["train"]) == 20
    assert set(s["test"]) | set(s["val"]) | set(s["train"]) == set(CASES)
    assert not (set(s["test"]) & set(s["val"]) or set(s["test"]) & set(s["train"]) or set(s["val"]) & set(s["train"]))
    assert split_cases(list(reversed(CASES)), 6, 4, 1) == s  # input order does not matter
    assert split_cases(CASES, 6, 4, 2)["test"] != s["test"]
    with pytest.raises(BenchmarkError):
        split_cases(CASES[:8], n_test=6, n_val=2, seed=0)  # no training case left
    with pytest.raises(BenchmarkError, match="more than once in the source: case_003"):
        split_cases(CASES + ["case_003"], n_test=6, n_val=4, seed=1)


def test_complete_cases_hold_the_test_set_and_the_labeled_draws():
    complete = CASES[::3]  # 10 of 30 hold every class
    s = split_cases(CASES, n_test=4, n_val=5, seed=1, complete=complete)
    assert set(s["test"]) <= set(complete) and len(s["test"]) == 4 and len(s["val"]) == 5
    assert set(s["test"]) | set(s["val"]) | set(s["train"]) == set(CASES) and len(s["train"]) == 21
    assert s["labeled"] == sorted(set(s["train"]) & set(complete))
    assert len(s["labeled"]) == len(complete) - 4 - len(set(s["val"]) & set(complete))
    folds = build_folds(s["train"], s["val"], [2, 5], [0, 1], labeled=s["labeled"])
    for f in folds:
        if f["kind"] == "k":
            assert set(f["train"]) <= set(s["labeled"])
        elif f["kind"] == "ceiling":
            assert f["train"] == s["train"]  # the ceiling keeps every training case, complete or not
    assert split_cases(CASES, 6, 4, 1, complete=None) == split_cases(CASES, 6, 4, 1)  # unchanged without it
    with pytest.raises(BenchmarkError, match="only 3 cases hold every class"):
        split_cases(CASES, n_test=4, n_val=5, seed=1, complete=CASES[:3])
    with pytest.raises(BenchmarkError, match="impossible"):
        build_folds(s["train"], s["val"], [len(s["labeled"]) + 1], [0], labeled=s["labeled"])


def test_complete_cases_are_read_from_the_label_maps(tmp_path):
    import numpy as np
    import SimpleITK as sitk
    from nnunet_cl.bench.design import complete_cases
    for case, present in (("a", [1, 2, 3]), ("b", [1, 3]), ("c", [3, 2, 1, 0]), ("d", [])):
        seg = np.zeros((4, 4, 4), np.uint8)
        for i, c in enumerate(present):
            seg[i, 0, 0] = c
        sitk.WriteImage(sitk.GetImageFromArray(seg), str(tmp_path / f"{case}.nii.gz"))
    labels = {"background": 0, "x": 1, "y": 2, "z": 3}
    assert complete_cases(tmp_path, ["a", "b", "c", "d"], ".nii.gz", labels) == ["a", "c"]


def test_folds_nested_fixed_val_ceiling_and_pretraining_fold():
    s = split_cases(CASES, 6, 4, 0)
    folds = build_folds(s["train"], s["val"], ks=[2, 5, 10], seeds=[0, 1, 2])
    assert [f["fold"] for f in folds] == list(range(len(folds)))
    pre = folds[PRETRAIN_FOLD]
    assert pre["kind"] == "pretrain" and pre["train"] == [] and pre["val"] == []
    runs = folds[1:]
    assert len(runs) == 3 * 3 + 3  # (k, seed) folds and one ceiling fold per seed
    for f in runs:
        assert f["val"] == s["val"]  # the same validation set everywhere
        assert not set(f["train"]) & set(s["val"]) and not set(f["train"]) & set(s["test"])
    for seed in (0, 1, 2):
        by_k = {f["k"]: f["train"] for f in runs if f["seed"] == seed and f["kind"] == "k"}
        assert [len(by_k[k]) for k in (2, 5, 10)] == [2, 5, 10]
        assert by_k[5][:2] == by_k[2] and by_k[10][:5] == by_k[5]  # nested across k for one seed
        ceiling = [f for f in runs if f["seed"] == seed and f["kind"] == "ceiling"]
        assert len(ceiling) == 1 and ceiling[0]["train"] == sorted(s["train"]) and ceiling[0]["k"] == 20
    assert len({tuple(f["train"]) for f in runs if f["kind"] == "k" and f["k"] == 2}) > 1  # seeds draw differently
    splits = splits_from_folds(folds)
    assert splits[0] == {"train": [], "val": []} and splits[3]["train"] == folds[3]["train"]


def test_folds_grow_without_moving_old_ones():
    s = split_cases(CASES, 6, 4, 0)
    first = build_folds(s["train"], s["val"], ks=[2], seeds=[0])
    more = build_folds(s["train"], s["val"], ks=[2, 5], seeds=[0, 1], existing=first)
    assert more[:len(first)] == first  # finished runs keep their fold
    assert len(more) == 1 + 2 * 2 + 2
    tampered = [dict(f) for f in first]
    tampered[1]["train"] = list(reversed(tampered[1]["train"])) + ["x"]
    with pytest.raises(BenchmarkError, match="new --work"):
        build_folds(s["train"], s["val"], [2], [0], existing=tampered)
    with pytest.raises(BenchmarkError, match="impossible"):
        build_folds(s["train"], s["val"], [50], [0])


def test_run_plan_seed_major_and_quick_leaves_out_the_ceiling():
    from nnunet_cl.bench.design import DEFAULT_ARMS, QUICK_ARMS, plan_runs
    s = split_cases(CASES, 6, 4, 0)
    folds = build_folds(s["train"], s["val"], ks=[2, 5], seeds=[0, 1])
    arms = parse_arms(DEFAULT_ARMS)
    plan = plan_runs(folds, arms, [2, 5], [0, 1], [0])
    assert len(plan) == 2 * 2 * (len(arms) - 1) + 1  # every method on each (k, seed); one ceiling
    assert [p[2]["seed"] for p in plan] == sorted(p[2]["seed"] for p in plan)  # whole seeds first
    assert [(a, f["kind"], f["seed"]) for a, _, f in plan if a == "ceiling"] == [("ceiling", "ceiling", 0)]
    assert all(f["kind"] == "k" for a, _, f in plan if a != "ceiling")
    quick = plan_runs(folds, parse_arms(QUICK_ARMS), [2], [0], [0])  # what --quick runs by default
    assert {a for a, _, _ in quick} == set(DEFAULT_ARMS) - {"ceiling"}
    assert {(f["k"], f["seed"]) for _, _, f in quick} == {(2, 0)}


def test_ct_schedule_fine_tunes_without_dice_smoothing():
    import torch
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.training.nnUNetTrainer.variants.loss.nnUNetTrainerDiceLoss import nnUNetTrainerDiceCELoss_noSmooth
    from nnunet_cl_trainers.benchmark import nnUNetTrainer_clBenchCT
    assert nnUNetTrainer_clBenchCT._build_loss is nnUNetTrainerDiceCELoss_noSmooth._build_loss
    # why: a small patch holds few of the organs; with smoothing, predicting no organ anywhere scores Dice ~1 on
    # every absent one, which is the minimum the first OpenKBP runs found
    y = torch.zeros(1, 1, 8, 8, 8)
    y[..., :3, :3, :3] = 1  # organ 1 present, organs 2 and 3 absent
    no_organ = torch.full((1, 4, 8, 8, 8), -30.0)
    no_organ[:, 0] = 30.0
    dice = {smooth: -float(MemoryEfficientSoftDiceLoss(lambda x: torch.softmax(x, 1), batch_dice=False, do_bg=False,
                                                      smooth=smooth)(no_organ, y)) for smooth in (1e-5, 0.0)}
    assert dice[1e-5] > 0.6  # 2 of 3 classes "perfect" for predicting nothing
    assert dice[0.0] < 1e-3


def test_step_size_must_be_a_fraction_of_the_patch():
    import argparse
    from nnunet_cl.bench.runner import _step_size
    assert _step_size("1") == 1.0 and _step_size("0.5") == 0.5
    for bad in ("0", "1.5", "-0.5"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"\(0, 1\]"):
            _step_size(bad)


def test_ceiling_seeds_below_one_is_refused_with_the_fix():
    import argparse
    from nnunet_cl.bench.runner import _ceiling_seeds
    assert _ceiling_seeds("2") == 2
    for bad in ("0", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="leave it out of --arms"):
            _ceiling_seeds(bad)


def test_without_source_given_dataset_options_must_match_the_work_folder(tmp_path, capsys):
    """Without -i the settings come from benchmark.json; an option given with another value is refused, not ignored."""
    from nnunet_cl.bench.runner import main
    settings = {"source": "/data/X", "labels_folder": "labelsTr", "dataset_json": "/data/X/dataset.json",
                "dataset_id": 950, "name": "X", "n_test": 20, "n_val": 10, "split_seed": 12345, "complete_cases": True,
                "plans_variant": {"patch": [32, 48, 32], "batch_size": 2, "width": 16, "topology": "planned",
                                  "spacing_factor": 2.0}}
    (tmp_path / "benchmark.json").write_text(json.dumps({"settings": settings, "stages": {}}))
    same = ["--n_test", "20", "--patch", "32", "48", "32", "--plan_network", "--complete_cases", "--spacing_factor",
            "2", "--width", "16", "--dataset_json", "/data/X/dataset.json"]
    with pytest.raises(SystemExit) as done:
        main(["--work", str(tmp_path), "--report_only"] + same)
    assert done.value.code == 0 and "No finished run yet" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"\(--n_test: 20 -> 30, --width: 16 -> 8\)\. Without -i .* Fix: "):
        main(["--work", str(tmp_path), "--report_only", "--n_test", "30", "--width", "8"])
    with pytest.raises(SystemExit, match=r"--dataset_json: /data/X/dataset.json -> /data/Y/dataset.json\)"):
        main(["--work", str(tmp_path), "--report_only", "--dataset_json", "/data/Y/dataset.json"])
    assert json.loads((tmp_path / "benchmark.json").read_text())["settings"] == settings


def _plans_with_deep_network(folder: Path) -> Path:
    """A 6-stage nnUNetPlans.json as nnU-Net plans a 128^3 CT (OpenKBP's), written by hand."""
    arch = {"n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 6,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "n_conv_per_stage": [2] * 6,
            "n_conv_per_stage_decoder": [2] * 5, "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True}}
    cfg = {"patch_size": [128, 128, 128], "batch_size": 2, "spacing": [3.9, 2.5, 3.9],
           "median_image_size_in_voxels": [128, 128, 128], "data_identifier": "nnUNetPlans_3d_fullres",
           "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                            "arch_kwargs": arch, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}
    (folder / "nnUNetPlans.json").write_text(json.dumps({"plans_name": "nnUNetPlans",
                                                          "configurations": {"3d_fullres": cfg}}))
    return folder


def test_bench_plans_keep_or_replan_the_network_for_the_patch(tmp_path):
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunet_cl.bench.design import write_bench_plans
    pre = _plans_with_deep_network(tmp_path)
    kept = write_bench_plans(pre, [64, 64, 64], 2, 16)  # the plans' 6 stages: total stride 32, a 2^3 bottleneck
    assert kept["architecture"]["arch_kwargs"]["n_stages"] == 6
    assert kept["architecture"]["arch_kwargs"]["features_per_stage"] == [16, 32, 64, 128, 160, 160]
    with pytest.raises(BenchmarkError, match="multiple of the network's total stride"):
        write_bench_plans(pre, [48, 64, 48])
    # planned: the stages nnU-Net's planner gives a 32x64x32 patch (feature maps of at least 4 voxels)
    cfg = write_bench_plans(pre, [32, 64, 32], 2, 16, "planned")
    arch = cfg["architecture"]["arch_kwargs"]
    assert arch["n_stages"] == 4 and arch["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 3
    assert arch["features_per_stage"] == [16, 32, 64, 128]
    assert len(arch["n_conv_per_stage"]) == 4 and len(arch["n_conv_per_stage_decoder"]) == 3
    assert json.loads((pre / "nnUNetPlans_clBench.json").read_text())["configurations"]["3d_fullres"] == cfg
    net = get_network_from_plans(cfg["architecture"]["network_class_name"], arch,
                                 cfg["architecture"]["_kw_requires_import"], 1, 8, deep_supervision=True)
    out = net(torch.zeros(1, 1, 32, 64, 32))
    assert [tuple(o.shape[2:]) for o in out] == [(32, 64, 32), (16, 32, 16), (8, 16, 8)]
    with pytest.raises(BenchmarkError, match="planner would make it"):
        write_bench_plans(pre, [30, 64, 32], topology="planned")
    assert cfg["spacing"] == [3.9, 2.5, 3.9] and cfg["data_identifier"] == "nnUNetPlans_3d_fullres"  # same data


def test_bench_plans_at_a_coarser_spacing_have_their_own_data(tmp_path):
    from nnunet_cl.bench.design import needs_preprocessing, write_bench_plans
    pre = _plans_with_deep_network(tmp_path)
    cfg = write_bench_plans(pre, [32, 48, 32], 2, 16, "planned", spacing_factor=2)
    assert cfg["spacing"] == pytest.approx([7.8, 5.0, 7.8]) and cfg["median_image_size_in_voxels"] == [64] * 3
    assert cfg["data_identifier"] == "nnUNetPlans_clBench_3d_fullres"  # never nnUNetPlans' full-resolution data
    # planned for the new spacing (axes within 2x of each other, so every axis pools alike)
    assert cfg["architecture"]["arch_kwargs"]["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 3
    for bad in (1, 0.5):
        with pytest.raises(BenchmarkError, match="above 1"):
            write_bench_plans(pre, spacing_factor=bad)
    assert needs_preprocessing({"patch": [32, 48, 32], "spacing_factor": 2.0})
    assert not needs_preprocessing({"patch": [32, 48, 32]}) and not needs_preprocessing(None)


def test_arms_are_data_driven():
    assert parse_arms(["scratch", "simclr", "ceiling"]) == [
        ("scratch", None), ("simclr", "nnUNetTrainerSimCLRPretrain"), ("ceiling", None)]
    assert parse_arms(["mine=nnUNetTrainerMinePretrain"]) == [("mine", "nnUNetTrainerMinePretrain")]
    for bad, says in ((["nosuch"], "unknown arm 'nosuch'"),
                      (["simclr", "scratch", "simclr"], "twice in --arms: simclr"),
                      (["ceiling=nnUNetTrainerX"], "write 'ceiling' alone"), (["a b=nnUNetTrainerX"], "letters")):
        with pytest.raises(BenchmarkError, match=says):
            parse_arms(bad)


def _run_record(arm, k, seed, d1, d2, ceiling=False):
    return {"arm": arm, "kind": "ceiling" if ceiling else "k", "k": k, "seed": seed, "dice": {"1": d1, "2": d2},
            "mean_fg_dice": (d1 + d2) / 2, "labels": {"1": "anterior", "2": "posterior"},
            "wall_s": {"pretrain": 600.0 if arm == "simclr" else None, "finetune": 120.0, "predict": 30.0}}


def test_table_and_plot_from_run_files(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    records = [_run_record("scratch", 2, 0, 0.5, 0.6), _run_record("scratch", 2, 1, 0.6, 0.7),
               _run_record("simclr", 2, 0, 0.6, 0.7), _run_record("simclr", 2, 1, 0.6, 0.9),
               _run_record("scratch", 5, 0, 0.7, 0.7), _run_record("ceiling", 20, 0, 0.85, 0.85, ceiling=True)]
    for r in records:
        (runs / f"{r['arm']}__k{r['k']}__seed{r['seed']}.json").write_text(json.dumps(r))
    (runs / "pretrain__simclr.json").write_text(json.dumps({"arm": "simclr", "wall_s": 600.0}))
    paths = write_report(runs, tmp_path, skipped={"polycl": "nnUNetTrainerPolyCLPretrain_clBench: not there"},
                         title="Phantom: 2 test cases")
    md = Path(paths["md"]).read_text()
    assert "| scratch | 2 | 2 | 0.550 ± 0.071 | 0.650 ± 0.071 | **0.600 ± 0.071** |" in md
    # simclr minus scratch on the same seed: 0.65 - 0.55 and 0.75 - 0.65
    assert ("| simclr | 2 | 2 | 0.600 ± 0.000 | 0.800 ± 0.141 | **0.700 ± 0.071** | 0.100 ± 0.000 | "
            "[+0.100, +0.100] | 2.0 | 0.5 | 10.0 |") in md
    assert "| ceiling | all (20) | 1 |" in md and "skipped arm **polycl**" in md
    rows = list(csv.DictReader(open(paths["csv"])))
    assert [(r["arm"], r["k"]) for r in rows] == [("scratch", "2"), ("scratch", "5"), ("simclr", "2"),
                                                  ("ceiling", "20")]
    assert float(rows[0]["mean_fg_dice_mean"]) == pytest.approx(0.6) and rows[1]["mean_fg_dice_std"] == ""
    from PIL import Image
    assert Image.open(paths["png"]).size[0] >= 800
    # the plot, read back from its axes: one curve per arm at its k values, the ceiling as a line, all in view
    curves, (lo, hi) = paths["drawn"]["curves"], paths["drawn"]["ylim"]
    scratch = next(v for label, v in curves.items() if label.startswith("scratch"))
    simclr = next(v for label, v in curves.items() if label.startswith("simclr"))
    ceiling = next(v for label, v in curves.items() if label.startswith("ceiling"))
    assert scratch[1] == pytest.approx([0.6, 0.7]) and simclr[1] == pytest.approx([0.7])
    assert sorted(round(x) for x in scratch[0]) == [2, 5]  # arms are nudged apart on the log axis, not moved
    assert ceiling[1] == pytest.approx([0.85, 0.85])  # axhline: a line across the axes at that Dice
    assert lo <= 0.6 - 0.071 and hi >= 0.85 and hi - lo >= 0.1
    # per class: one bar per arm and class in each k's panel, the ceiling marked per class
    bars = paths["drawn_per_class"]
    assert set(bars) == {(2, "scratch"), (2, "simclr"), (5, "scratch"), "ceiling"}
    assert bars[(2, "scratch")] == pytest.approx([0.55, 0.65]) and bars[(2, "simclr")] == pytest.approx([0.6, 0.8])
    assert bars[(5, "scratch")] == pytest.approx([0.7, 0.7]) and bars["ceiling"] == pytest.approx([0.85, 0.85])
    assert Image.open(paths["png_per_class"]).size[0] >= 800
    # paired differences: a dot per seed at simclr minus scratch on the same k and seed, a bar at their mean
    (dots, bar), = paths["drawn_deltas"].values()
    assert list(paths["drawn_deltas"]) == [(2, "simclr")]
    assert dots == pytest.approx([0.1, 0.1]) and bar == pytest.approx(0.1)
    assert Image.open(paths["png_deltas"]).size[0] >= 700
    only_scratch = write_report(runs, tmp_path / "scratch_only", select=lambda r: r["arm"] == "scratch")
    assert "png_deltas" not in only_scratch and not only_scratch["drawn_deltas"]
    assert write_report(tmp_path / "empty", tmp_path) is None
    # a pretraining finished by an earlier invocation has no wall time: nnU-Net's epoch times stand in
    (runs / "pretrain__simclr.json").write_text(json.dumps({"arm": "simclr", "wall_s": None, "epochs_s": 300.0}))
    md = Path(write_report(runs, tmp_path)["md"]).read_text()
    assert "| 0.100 ± 0.000 | [+0.100, +0.100] | 2.0 | 0.5 | 5.0 |" in md and "epoch times stands in" in md
    assert "different settings" not in md
    # one run predicted with another sliding-window step: the table says so
    (runs / "scratch__k5__seed0.json").write_text(json.dumps({**records[4], "step_size": 1.0}))
    md = Path(write_report(runs, tmp_path)["md"]).read_text()
    assert "runs were predicted with different settings** (step 0.5, no mirroring, step 1.0, no mirroring)" in md
    # a run resumed with --c: named as not fully paired; its time is nnU-Net's epoch times, not the wall time
    (runs / "simclr__k2__seed1.json").write_text(json.dumps({**records[3], "resumed": True,
                                                             "finetune_epochs_s": 300.0}))
    paths = write_report(runs, tmp_path)
    md = Path(paths["md"]).read_text()
    assert "resumed after an interruption (nnU-Net --c): simclr k=2 seed 1" in md
    assert "| 0.100 ± 0.000 | [+0.100, +0.100] | 3.5 | 0.5 | 5.0 |" in md  # (120 s wall + 300 s of epochs) / 2
    assert [r["resumed_seeds"] for r in csv.DictReader(open(paths["csv"])) if r["arm"] == "simclr"] == ["1"]


def test_paired_interval_is_students_t_over_the_differences():
    from nnunet_cl.bench.report import paired_interval
    import numpy as np
    d = np.array([0.01, 0.03, 0.02, 0.04, 0.00])  # mean 0.02, sample std 0.0158; t(0.975, 4 dof) = 2.7764
    lo, hi = paired_interval(float(d.mean()), float(d.std(ddof=1)), len(d))
    assert (lo, hi) == pytest.approx((0.02 - 2.7764 * 0.015811 / 5 ** 0.5, 0.02 + 2.7764 * 0.015811 / 5 ** 0.5),
                                     abs=1e-5)
    assert all(math.isnan(v) for v in paired_interval(0.1, float("nan"), 1))


def test_report_as_tables_a_subset_of_the_runs(tmp_path):
    from nnunet_cl.bench.runner import main
    runs = tmp_path / "runs" / "clBench"
    runs.mkdir(parents=True)
    records = [_run_record("scratch", 2, 0, 0.5, 0.6), _run_record("scratch", 2, 1, 0.6, 0.7),
               _run_record("scratch", 10, 0, 0.8, 0.8), _run_record("simclr", 2, 0, 0.6, 0.7),
               _run_record("polycl5x", 2, 0, 0.9, 0.9), _run_record("ceiling", 20, 0, 0.85, 0.85, ceiling=True)]
    for r in records:
        (runs / f"{r['arm']}__k{r['k']}__seed{r['seed']}.json").write_text(json.dumps(r))
    with pytest.raises(SystemExit) as stop:
        main(["--work", str(tmp_path), "--report_only", "--report_as", "main", "--arms", "scratch", "simclr",
              "ceiling", "--k", "2", "--seeds", "0"])
    assert stop.value.code == 0
    md = (tmp_path / "results_clBench_main.md").read_text()
    rows = [(r["arm"], r["k"], r["n_seeds"]) for r in csv.DictReader(open(tmp_path / "results_clBench_main.csv"))]
    assert rows == [("scratch", "2", "1"), ("simclr", "2", "1"), ("ceiling", "20", "1")]  # no polycl5x, k=10, seed 1
    assert "arms scratch, simclr, ceiling; k = 2; seeds 0" in md.splitlines()[0]
    assert (tmp_path / "dice_vs_labels_clBench_main.png").is_file()
    assert not (tmp_path / "results_clBench.md").exists()  # the table of all runs is left alone
    with pytest.raises(SystemExit) as stop:
        main(["--work", str(tmp_path), "--report_as", "main"])
    assert "Fix: add --report_only" in str(stop.value.code)
    with pytest.raises(SystemExit) as stop:  # argparse: the name becomes part of file names
        main(["--work", str(tmp_path), "--report_only", "--report_as", "../main"])
    assert stop.value.code == 2 and not (tmp_path.parent / "main").exists()


def test_augmenter_seeds_fresh_resumed_and_per_rank():
    from nnunet_cl_trainers.seeding import augmenter_seed
    assert augmenter_seed(3, 1, 0) == 3100 and augmenter_seed(3, 2, 1) == 3201  # fresh run, one process
    keys = [(a, w, e, r) for a in (1, 2) for w in range(2) for e in (0, 5) for r in (0, 1)]
    seeds = [augmenter_seed(3, a, w, epoch=e, rank=r) for a, w, e, r in keys]
    assert len(set(seeds)) == len(keys) and all(0 <= x < 2 ** 32 for x in seeds)  # resumes and ranks: own streams
    assert augmenter_seed(3, 1, 0, epoch=5) == augmenter_seed(3, 1, 0, epoch=5)



LIVE_CHILD = r"""
import os, sys, time
print("-".join(["live", "line"]), flush=True)  # a text its command line does not hold
deadline = time.time() + 60
while not os.path.exists(sys.argv[1]) and time.time() < deadline:  # until the test has seen the line in the log
    time.sleep(0.05)
print("seen" if os.path.exists(sys.argv[1]) else "never seen", flush=True)
"""


def test_log_follows_a_command_while_it_runs(tmp_path):
    """A command's output reaches benchmark_log.txt line by line, not when the command ends (a long pretraining
    printed for minutes without the log showing it)."""
    import argparse
    import threading
    from nnunet_cl.bench.runner import Bench
    bench = Bench(argparse.Namespace(work=str(tmp_path), schedule=None, quick=False, pretrain_schedule=None))
    marker = tmp_path / "seen"
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=bench.run(
        [sys.executable, "-c", LIVE_CHILD, str(marker)], dict(os.environ), "child")[1]))
    worker.start()

    def logged():
        return bench.log.is_file() and "\nlive-line\n" in bench.log.read_text()

    deadline = time.time() + 30
    while worker.is_alive() and time.time() < deadline and not logged():
        time.sleep(0.05)
    live = worker.is_alive() and logged()
    marker.touch()
    worker.join(90)
    assert live and result["out"] == "live-line\nseen\n"


# ------------------------------------------------------------------------------------------------ end to end

def _bench_cmd(src, work, unlabeled):
    return [sys.executable, "-m", "nnunet_cl.bench.runner", "-i", str(src), "--work", str(work), "--k", "2",
            "--seeds", "0", "--arms", "scratch", "simclr", "missing=nnUNetTrainerMissingPretrain",
            "--n_test", "2", "--n_val", "1", "--schedule", "clBenchTest", "--extra_unlabeled", str(unlabeled),
            "--batch_size", "2", "--width", "8", "--step_size", "1"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from nnunet_cl.phantom import write_phantom_dataset
    root = tmp_path_factory.mktemp("bench")
    src = write_phantom_dataset(root / "source", 1, "Phantom", num_labeled=10, num_unlabeled=2,
                                unlabeled_folder=root / "unlabeled", shape=(24, 40, 40), spacing=(2.5, 1.5, 1.5))
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(nnUNet_extTrainer=str(TESTS / "ext_trainers"), nnUNet_n_proc_DA="1")
    work = root / "work"
    cmd = _bench_cmd(src, work, root / "unlabeled")
    t = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    # later tests rerun the benchmark in this folder and append to its log: keep the first invocation's log
    first_log = (work / "benchmark_log.txt").read_text()
    return {"root": root, "src": src, "work": work, "env": env, "cmd": cmd, "first": proc, "first_log": first_log,
            "seconds": time.time() - t}


def test_dataset_test_set_never_trained_or_pretrained_on(bench):
    work = bench["work"]
    folds = json.loads((work / "benchmark_folds.json").read_text())
    raw = work / "nnUNet_raw" / "Dataset950_Phantom"
    test = {p.name[:-len("_0000.nii.gz")] for p in (raw / "imagesTs").glob("*_0000.nii.gz")}
    assert test == set(folds["test"]) and len(test) == 2
    assert {p.name[:-len(".nii.gz")] for p in (raw / "labelsTs").iterdir()} == test
    train_imgs = {p.name[:-len("_0000.nii.gz")] for p in (raw / "imagesTr").glob("*_0000.nii.gz")}
    assert not train_imgs & test and train_imgs == set(folds["train_candidates"]) | set(folds["val"])
    pre = work / "nnUNet_preprocessed" / "Dataset950_Phantom"
    # every arm trains with the same reduced plans on the same preprocessed data
    plans = json.loads((pre / "nnUNetPlans_clBench.json").read_text())["configurations"]["3d_fullres"]
    assert plans["batch_size"] == 2 and plans["architecture"]["arch_kwargs"]["features_per_stage"][:2] == [8, 16]
    assert plans["data_identifier"] == "nnUNetPlans_3d_fullres"
    splits = json.loads((pre / "splits_final.json").read_text())
    assert splits == [{"train": f["train"], "val": f["val"]} for f in folds["folds"]]
    for f in folds["folds"]:
        assert not set(f["train"]) & test and not set(f["val"]) & test and not set(f["train"]) & set(f["val"])
    # the pool pretraining reads (fold 0): all 8 training images (validation included) and the 2 ingested scans
    from nnunet_cl.pool import list_pool
    pool = [i for _, i in list_pool(str(pre), "nnUNetPlans_3d_fullres", PRETRAIN_FOLD)]
    assert len(pool) == 10 and not set(pool) & test
    assert set(pool) >= train_imgs and sum(i.startswith("pool_") for i in pool) == 2
    assert "Pretraining pool: 10 cases" in bench["first_log"]


def test_runs_table_plot_and_skipped_arm(bench):
    work = bench["work"]
    runs = work / "runs" / "clBenchTest"
    scratch = json.loads((runs / "scratch__k2__seed0.json").read_text())
    simclr = json.loads((runs / "simclr__k2__seed0.json").read_text())
    for r in (scratch, simclr):
        assert r["k"] == 2 and len(r["train_cases"]) == 2 and r["n_test"] == 2 and r["finetune_trainer"] == \
            "nnUNetTrainer_clBenchTest" and set(r["dice"]) == {"1", "2", "3", "4"}
        assert 0 <= r["mean_fg_dice"] <= 1 and r["wall_s"]["finetune"] > 0 and r["wall_s"]["predict"] > 0
        assert r["plans"] == "nnUNetPlans_clBench" and r["n_val"] == 1
    assert scratch["fold"] == simclr["fold"] and scratch["train_cases"] == simclr["train_cases"]
    assert scratch["pretrained_weights"] is None
    assert scratch["step_size"] == simclr["step_size"] == 1.0
    assert simclr["pretrained_weights"].endswith(
        "nnUNetTrainerSimCLRPretrain_clBenchTest__nnUNetPlans_clBench__3d_fullres/fold_0/checkpoint_final.pth")
    log = bench["first_log"]
    assert log.count("Loading pretrained weights from file") == 1  # simclr only, scratch starts from nothing
    predictions = [line for line in log.splitlines() if line.startswith("$ nnUNetv2_predict")]
    assert len(predictions) == 2 and all(line.endswith("-step_size 1.0") for line in predictions)
    pre = json.loads((runs / "pretrain__simclr.json").read_text())
    assert pre["pool_cases"] == 10 and pre["wall_s"] > 0
    md = (work / "results_clBenchTest.md").read_text()
    assert "| scratch | 2 | 1 |" in md and "| simclr | 2 | 1 |" in md
    assert "skipped arm **missing**: nnUNetTrainerMissingPretrain_clBenchTest" in md
    assert "SKIPPED arm missing" in bench["first"].stdout
    rows = list(csv.DictReader(open(work / "results_clBenchTest.csv")))
    assert {r["arm"] for r in rows} == {"scratch", "simclr"}
    assert (work / "dice_vs_labels_clBenchTest.png").stat().st_size > 10_000
    print(f"first benchmark invocation: {bench['seconds']:.0f} s")


def test_rerun_skips_finished_runs(bench, tmp_path):
    work, runs = bench["work"], bench["work"] / "runs" / "clBenchTest"
    scratch_file, simclr_file = runs / "scratch__k2__seed0.json", runs / "simclr__k2__seed0.json"
    before = scratch_file.stat().st_mtime_ns
    simclr_file.unlink()  # as if the run stopped after its training finished
    log_size = (work / "benchmark_log.txt").stat().st_size
    proc = subprocess.run(bench["cmd"], env=bench["env"], capture_output=True, text=True,
        encoding="utf-8", errors="replace", timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "1 finished before" in proc.stdout and "1 to do" in proc.stdout
    assert scratch_file.stat().st_mtime_ns == before and simclr_file.is_file()
    assert json.loads(simclr_file.read_text())["wall_s"]["finetune"] > 0  # the training time was kept
    with open(work / "benchmark_log.txt") as f:
        f.seek(log_size)
        second = f.read()
    # no preprocessing, no pretraining, no training again: only the missing prediction and its score
    assert "$ nnUNetv2_train" not in second and "nnUNetv2_plan_and_preprocess" not in second
    assert "nnUNetv2_cl_add_unlabeled" not in second
    assert second.count("$ nnUNetv2_predict") == 1 and second.count("$ nnUNetv2_evaluate_folder") == 1
    # a work folder remembers its test set: other settings are refused
    i = bench["cmd"].index("--n_test")
    other = bench["cmd"][:i + 1] + ["3"] + bench["cmd"][i + 2:]
    proc = subprocess.run(other, env=bench["env"], capture_output=True, text=True,
        encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode != 0 and "n_test: 2 -> 3" in proc.stderr
    # and so are they without -i, where the rest comes from benchmark.json
    j = other.index("-i")
    proc = subprocess.run(other[:j] + other[j + 2:] + ["--report_only"], env=bench["env"], capture_output=True,
                          text=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode != 0 and "--n_test: 2 -> 3" in proc.stderr and "Without -i" in proc.stderr


def test_interrupted_training_resumes_with_c(bench):
    """A fine-tuning stopped after epoch 1 of 2 (its checkpoint_latest.pth, no final) continues with nnU-Net's --c
    and without -pretrained_weights (nnU-Net refuses both; the checkpoint holds them); the run is marked resumed
    and the table says it is paired only up to that epoch."""
    import torch
    work, runs = bench["work"], bench["work"] / "runs" / "clBenchTest"
    folder = next((work / "nnUNet_results" / "simclr").glob("Dataset950_Phantom/nnUNetTrainer_clBenchTest__*/fold_*"))
    final = folder / "checkpoint_final.pth"
    ckpt = load_checkpoint_file(final)
    ckpt["current_epoch"] = 1  # what nnU-Net saves as checkpoint_latest after the first of two epochs
    torch.save(ckpt, folder / "checkpoint_latest.pth")
    final.unlink()
    (runs / "simclr__k2__seed0.json").unlink()
    log_size = (work / "benchmark_log.txt").stat().st_size
    proc = subprocess.run(bench["cmd"], env=bench["env"], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    with open(work / "benchmark_log.txt") as f:
        f.seek(log_size)
        train = [line for line in f.read().splitlines() if line.startswith("$ nnUNetv2_train")]
    assert len(train) == 1 and train[0].endswith("--c") and "-pretrained_weights" not in train[0]
    with open(work / "benchmark_log.txt") as f:  # nnU-Net trained the missing epoch only
        f.seek(log_size)
        epochs = re.findall(r": Epoch (\d+)\s*$", f.read(), flags=re.M)
    assert epochs == ["1"], epochs
    assert final.is_file() and not (folder / "checkpoint_latest.pth").exists()
    record = json.loads((runs / "simclr__k2__seed0.json").read_text())
    assert record["resumed"] is True and record["finetune_epochs_s"] > 0
    md = (work / "results_clBenchTest.md").read_text()
    assert "resumed after an interruption (nnU-Net --c): simclr k=2 seed 0" in md


def test_finetuning_is_seeded_by_fold_so_arms_are_paired(bench, tmp_path):
    """Retraining the scratch run's fold reproduces its weights exactly: a fold's run is a function of its seed
    (what arms of one fold share is checked in test_arms_of_a_fold_share_batches_and_segmentation_layers)."""
    import torch
    work = bench["work"]
    fold = json.loads((work / "runs" / "clBenchTest" / "scratch__k2__seed0.json").read_text())["fold"]
    env = dict(bench["env"], nnUNet_raw=str(work / "nnUNet_raw"), nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
               nnUNet_results=str(tmp_path), nnUNet_compile="0")
    cmd = ["nnUNetv2_train", "950", "3d_fullres", str(fold), "-tr", "nnUNetTrainer_clBenchTest", "-p",
           "nnUNetPlans_clBench", "-device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    name = (f"Dataset950_Phantom/nnUNetTrainer_clBenchTest__nnUNetPlans_clBench__3d_fullres/fold_{fold}/"
            f"checkpoint_final.pth")
    first, again = (load_checkpoint_file(root / name)["network_weights"]
                    for root in (work / "nnUNet_results" / "scratch", tmp_path))
    assert first.keys() == again.keys()
    for key in first:
        assert torch.equal(first[key], again[key]), key



def _pretrain(bench, trainer: str, results) -> dict:
    """One pretraining run (fold 0, the pool) of the bench folder's dataset into `results`; its final checkpoint."""
    import torch
    work = bench["work"]
    env = dict(bench["env"], nnUNet_raw=str(work / "nnUNet_raw"), nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
               nnUNet_results=str(results), nnUNet_compile="0")
    cmd = ["nnUNetv2_train", "950", "3d_fullres", str(PRETRAIN_FOLD), "-tr", trainer, "-p", "nnUNetPlans_clBench",
           "-device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return load_checkpoint_file(str(next(Path(results).glob(f"Dataset950_Phantom/{trainer}__*/fold_{PRETRAIN_FOLD}/"
                                                            f"checkpoint_final.pth"))))


def _assert_same_weights(first: dict, again: dict):
    import torch
    for part in ("network_weights", "cl_modules"):
        a = first[part] if part == "network_weights" else first["nnunet_cl"][part]
        b = again[part] if part == "network_weights" else again["nnunet_cl"][part]
        assert a.keys() == b.keys() and a
        for key in a:
            assert torch.equal(a[key], b[key]), (part, key)


@pytest.mark.parametrize("trainer", ["nnUNetTrainerSimCLRPretrain_clBenchTest",
                                     "nnUNetTrainerPolyCLPretrain_clBenchTest"])
def test_pretrainings_are_seeded_so_a_table_repeats(bench, tmp_path, trainer):
    """A benchmark pretraining run twice gives the same weights, heads included: the network's initialisation and
    the pool batches (nnU-Net's augmentation in a worker process; PolyCL's own patch loader) follow its seed."""
    first = _pretrain(bench, trainer, tmp_path / "first")
    assert first["current_epoch"] == 2  # it trained
    _assert_same_weights(first, _pretrain(bench, trainer, tmp_path / "again"))


PAIRING = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[5])
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from benchmark_test_trainers import nnUNetTrainer_clBenchTest
pre, fold, weights, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
plans = json.load(open(f"{pre}/nnUNetPlans_clBench.json"))
dataset_json = json.load(open(f"{pre}/dataset.json"))
found = {}
for arm, ckpt in (("scratch", None), ("simclr", weights)):
    t = nnUNetTrainer_clBenchTest(dict(plans, continue_training=False), "3d_fullres", fold, dataset_json,
                                  torch.device("cpu"))
    t.initialize()
    if ckpt:  # as nnUNetv2_train -pretrained_weights: after initialize, before the data loaders
        load_pretrained_weights(t.network, ckpt)
    train, val = t.get_dataloaders()
    batches = [next(train) for _ in range(2)]
    for loader in (train, val):
        loader._finish()
    found[arm] = {"weights": t.network.state_dict(), "batches": batches}
torch.save(found, out)
"""


def test_arms_of_a_fold_share_batches_and_segmentation_layers(bench, tmp_path):
    """Scratch and a contrastive arm on the same fold draw identical augmented batches and identical random
    segmentation layers; the encoder and decoder are the pretraining checkpoint's (nnU-Net's -pretrained_weights
    transfers all but the segmentation layers), so those are what differ between arms."""
    import torch
    work = bench["work"]
    fold = json.loads((work / "runs" / "clBenchTest" / "scratch__k2__seed0.json").read_text())["fold"]
    ckpt = next((work / "nnUNet_results" / "simclr").glob(
        "Dataset950_Phantom/nnUNetTrainerSimCLRPretrain_clBenchTest__*/fold_*/checkpoint_final.pth"))
    env = dict(bench["env"], nnUNet_raw=str(work / "nnUNet_raw"), nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
               nnUNet_results=str(tmp_path / "results"), nnUNet_compile="0")
    out = tmp_path / "pairing.pt"
    proc = subprocess.run([sys.executable, "-c", PAIRING, str(work / "nnUNet_preprocessed" / "Dataset950_Phantom"),
                           str(fold), str(ckpt), str(out), str(TESTS / "ext_trainers")],
                          env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = load_checkpoint_file(str(out))
    scratch, simclr = found["scratch"], found["simclr"]
    for a, b in zip(scratch["batches"], simclr["batches"]):
        assert torch.equal(a["data"], b["data"])
        assert all(torch.equal(x, y) for x, y in zip(a["target"], b["target"]))
    assert not torch.equal(scratch["batches"][0]["data"], scratch["batches"][1]["data"])
    pretrained = load_checkpoint_file(ckpt)["network_weights"]
    seg = [k for k in scratch["weights"] if ".seg_layers." in k]
    assert seg and all(torch.equal(scratch["weights"][k], simclr["weights"][k]) for k in seg)
    for key, value in simclr["weights"].items():
        if key not in seg:
            assert torch.equal(value, pretrained[key]), key
    assert not torch.equal(scratch["weights"]["encoder.stages.0.0.convs.0.conv.weight"],
                           simclr["weights"]["encoder.stages.0.0.convs.0.conv.weight"])


def test_fine_tuning_variant_reuses_the_pretrainings(bench):
    """--schedule clBenchTestFT --pretrain_schedule clBenchTest: only fine-tuning runs, from the clBenchTest
    pretraining checkpoints, with the warm-up recipe; their files are the new schedule's own."""
    work = bench["work"]
    i = bench["cmd"].index("--schedule")
    cmd = bench["cmd"][:i + 1] + ["clBenchTestFT", "--pretrain_schedule", "clBenchTest"] + bench["cmd"][i + 2:]
    log_size = (work / "benchmark_log.txt").stat().st_size
    proc = subprocess.run(cmd, env=bench["env"], capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    with open(work / "benchmark_log.txt") as f:
        f.seek(log_size)
        log = f.read()
    train = [line for line in log.splitlines() if line.startswith("$ nnUNetv2_train")]
    assert len(train) == 2 and all("-tr nnUNetTrainer_clBenchTestFT " in line for line in train), train
    assert "nnUNetTrainerSimCLRPretrain_clBenchTest__" in next(line for line in train if "-pretrained_weights" in line)
    assert "learning rate rises linearly to 0.001 over 1 of 2 epochs" in log
    runs = work / "runs" / "clBenchTestFT"
    record = json.loads((runs / "simclr__k2__seed0.json").read_text())
    assert record["finetune_trainer"] == "nnUNetTrainer_clBenchTestFT"
    assert record["pretrain_trainer"] == "nnUNetTrainerSimCLRPretrain_clBenchTest"
    assert (runs / "scratch__k2__seed0.json").is_file() and (work / "results_clBenchTestFT.md").is_file()
