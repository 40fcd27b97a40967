"""nnUNetv2_cl_robustness's scoring and verdict (nnunet_cl.bench.robustness) on known answers; the command end to
end on trained models is in tests/test_e2e_hippocampus.py."""
import math

import numpy as np
import pytest

from nnunet_cl.bench.robustness import CLEAN, dice_per_class, mean_dice, report, write_shifted


def test_dice_known_answers_and_ignored_voxels():
    label = np.zeros((4, 4, 4), np.uint8)
    label[:2] = 1
    assert dice_per_class(label, label, [1]) == [1.0]
    assert dice_per_class(1 - label, label, [1]) == [0.0]
    assert math.isnan(dice_per_class(label, label, [2])[0])  # absent from both: left out of means
    half = label.copy()
    half[0] = 0  # predicts half of class 1: Dice 2 * 16 / (16 + 32)
    assert dice_per_class(half, label, [1]) == [pytest.approx(2 / 3)]
    ignored = label.copy()
    ignored[0] = 9  # the reference ignores the voxels the prediction missed
    assert dice_per_class(half, ignored, [1], ignore_label=9) == [1.0]


def test_mean_dice_is_the_mean_over_classes_of_each_class_mean():
    per_case = {"a": [1.0, float("nan")], "b": [0.5, 0.0], "c": [0.0, 0.0]}
    assert mean_dice(per_case) == pytest.approx((0.5 + 0.0) / 2)


def _results(clean, noisy):
    return {CLEAN: {"a": [clean]}, "noise_0.2": {"a": [noisy]}}


def test_the_goal_needs_equal_clean_dice_and_at_most_half_the_drop():
    met = report({"base": _results(0.80, 0.40), "dcl": _results(0.805, 0.65)}, ["base", "dcl"])
    assert "| noise_0.2 | +0.400 | +0.155 | 0.39 | met |" in met and "<= 1: yes" in met
    too_much = report({"base": _results(0.80, 0.40), "dcl": _results(0.80, 0.55)}, ["base", "dcl"])
    assert "| 0.62 | not met |" in too_much
    unequal = report({"base": _results(0.80, 0.40), "dcl": _results(0.83, 0.75)}, ["base", "dcl"])
    assert "<= 1: no" in unequal and "| 0.20 | not met |" in unequal


def test_shifted_images_are_redone_when_the_seed_changes(tmp_path):
    import SimpleITK as sitk
    src = tmp_path / "in"
    src.mkdir()
    image = sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 100, (6, 7, 8)).astype(np.float32))
    image.SetSpacing((0.5, 1.0, 2.0))
    sitk.WriteImage(image, str(src / "case_0000.nii.gz"))
    out = tmp_path / "noise"
    read = lambda: sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case_0000.nii.gz")))  # noqa: E731
    write_shifted(src, out, "noise", 0.2, 0, ".nii.gz")
    first = read()
    assert sitk.ReadImage(str(out / "case_0000.nii.gz")).GetSpacing() == (0.5, 1.0, 2.0)
    write_shifted(src, out, "noise", 0.2, 0, ".nii.gz")
    assert np.array_equal(read(), first)  # reused
    write_shifted(src, out, "noise", 0.2, 1, ".nii.gz")
    assert not np.array_equal(read(), first)  # another seed: made again
