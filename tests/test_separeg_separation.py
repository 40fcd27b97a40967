"""SepaReg separation (SIS), region cache and PNG, on a small synthetic CT-like phantom."""
import os

import cc3d
import numpy as np
import pytest

from nnunet_cl.methods.separeg.cache import build_region_cache, load_region_cache
from nnunet_cl.methods.separeg.separation import (body_mask, filter_regions, region_bbox_crop, region_crops,
                                          region_properties, separate_case, supervoxels)
from nnunet_cl.regions.visualize import draw_regions_png

N_SEG = 32


def make_phantom(shape=(56, 56, 56), seed=0, noise=0.15):
    """z-scored-CT-like volume: air at the minimum, an ellipsoid body, four ellipsoid 'organs', noise.

    Returns (image float32, true body mask).
    """
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    img = np.full(shape, -2.0, np.float32)
    body = (zz / 0.9) ** 2 + (yy / 0.75) ** 2 + (xx / 0.85) ** 2 < 1
    img[body] = 0.0
    organs = [((0.3, 0.2, -0.3), (0.3, 0.25, 0.25), 1.0), ((-0.3, -0.2, 0.3), (0.25, 0.2, 0.3), -0.8),
              ((0.0, 0.3, 0.35), (0.2, 0.2, 0.2), 1.8), ((-0.2, 0.1, -0.35), (0.35, 0.15, 0.15), 0.6)]
    for c, r, v in organs:
        m = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip((zz, yy, xx), c, r)) < 1
        img[m & body] = v
    img[body] += rng.normal(0, noise, int(body.sum())).astype(np.float32)
    return img, body


@pytest.fixture(scope="module")
def phantom():
    return make_phantom()


@pytest.fixture(scope="module")
def separated(phantom):
    img, _ = phantom
    return separate_case(img, (1.0, 1.0, 1.0), n_segments=N_SEG, crop_size=16)


def n_components(mask, connectivity=26):
    return cc3d.connected_components(mask, connectivity=connectivity, return_N=True)[1]


# ------------------------------------------------------------------------------------------- body mask
def test_body_mask_keeps_largest_component_and_fills_holes(phantom):
    img, body = phantom
    img = img.copy()
    img[26:30, 26:30, 26:30] = img.min()          # an air pocket inside the body
    img[0:3, 0:3, 0:3] = 1.0                       # a detached speck (think: the CT table)
    got = body_mask(img)
    assert got.dtype == bool and got.shape == img.shape
    assert np.array_equal(got, body)
    assert not got[0:3, 0:3, 0:3].any()
    assert got[26:30, 26:30, 26:30].all()
    assert not body_mask(np.zeros((8, 8, 8), np.float32)).any()   # nothing above the threshold


def test_body_mask_explicit_threshold(phantom):
    img, body = phantom
    assert np.array_equal(body_mask(img, threshold=-1.5), body)


# ------------------------------------------------------------------------------------------- supervoxels
def test_supervoxels_cover_body_connected_and_counted(phantom, separated):
    _, body = phantom
    lab = separated["labels"]
    assert lab.shape == body.shape and lab.dtype == np.int32
    assert np.array_equal(lab > 0, separated["body"])      # every body voxel labelled, none outside
    assert np.array_equal(separated["body"], body)
    ids = np.unique(lab[lab > 0])
    assert np.array_equal(ids, np.arange(1, ids.size + 1))  # consecutive 1..K
    assert 0.5 * N_SEG <= ids.size <= 2 * N_SEG
    assert separated["n_supervoxels"] == ids.size
    for i in ids:
        assert n_components(lab == i) == 1, f"label {i} is split"


def test_supervoxels_channel_axis_regression():
    """A (z, y, x) volume must come back 3-D, with supervoxels that extend along every axis.

    With skimage's default channel_axis=-1 the volume would be read as a 2-D image with x channels.
    """
    img, body = make_phantom((40, 48, 56), seed=1)
    lab = supervoxels(img, body, n_segments=24, downsample=2)
    assert lab.shape == (40, 48, 56)
    assert np.array_equal(lab > 0, body)
    # real supervoxels: most labels extend over several voxels along every axis
    ids = np.unique(lab[lab > 0])
    for ax in range(3):
        ext = np.array([np.ptp(np.nonzero(lab == i)[ax]) for i in ids])
        assert np.median(ext) >= 3


def test_supervoxels_full_resolution_path(phantom):
    img, body = phantom
    lab = supervoxels(img[::2, ::2, ::2], body[::2, ::2, ::2], n_segments=16, downsample=1)
    assert np.array_equal(lab > 0, body[::2, ::2, ::2])
    for i in np.unique(lab[lab > 0]):
        assert n_components(lab == i) == 1


def test_separation_is_deterministic(phantom, separated):
    img, _ = phantom
    again = separate_case(img, (1.0, 1.0, 1.0), n_segments=N_SEG, crop_size=16)
    assert np.array_equal(again["labels"], separated["labels"])
    assert np.array_equal(again["region_ids"], separated["region_ids"])
    assert np.array_equal(again["crops"], separated["crops"])
    assert again["filtered"] == separated["filtered"]


# ------------------------------------------------------------------------------------------- crops
def test_crops_hold_only_their_region_in_a_tight_box(phantom, separated):
    lab = separated["labels"]
    img01 = np.random.default_rng(3).uniform(0.5, 1.0, lab.shape).astype(np.float32)  # never 0 inside
    ids = separated["region_ids"]
    assert ids.size > 0
    for i in ids[:12]:
        crop, m, bb = region_bbox_crop(img01, lab, int(i))
        sl = tuple(slice(bb[a], bb[a + 3]) for a in range(3))
        assert np.array_equal(m, lab[sl] == i)
        assert np.array_equal(crop, np.where(m, img01[sl], 0))          # only the region's voxels
        assert np.array_equal(crop > 0, m)
        for ax in range(3):                                              # tight: every face touched
            other = tuple(a for a in range(3) if a != ax)
            prof = m.any(axis=other)
            assert prof[0] and prof[-1]
    crops, bboxes, masks = region_crops(img01, lab, ids, size=16, return_masks=True)
    assert crops.shape == (ids.size, 1, 16, 16, 16) and crops.dtype == np.float32
    assert bboxes.shape == (ids.size, 6)
    assert np.all(crops[~masks] == 0)                 # zero outside the resampled region
    assert np.all(crops[masks] >= 0.5 - 1e-5) and np.all(crops[masks] <= 1.0 + 1e-5)  # only region values
    assert masks.reshape(ids.size, -1).any(axis=1).all()
    # crops of separate_case are windowed intensities in [0, 1]
    c = separated["crops"]
    assert c.min() >= 0 and c.max() <= 1 and c.shape[0] == ids.size


def test_crop_identity_when_box_matches_size():
    lab = np.zeros((20, 20, 20), np.int32)
    lab[3:11, 5:13, 7:15] = 1
    lab[3, 5, 7] = 2                                   # carve one voxel out of region 1's box
    img = np.random.default_rng(0).normal(size=lab.shape).astype(np.float32)
    crops, bboxes = region_crops(img, lab, [1], size=8)
    assert tuple(bboxes[0]) == (3, 5, 7, 11, 13, 15)
    expect = np.where(lab[3:11, 5:13, 7:15] == 1, img[3:11, 5:13, 7:15], 0)
    np.testing.assert_allclose(crops[0, 0], expect, atol=1e-6)


# ------------------------------------------------------------------------------------------- filters
def test_filters_drop_crafted_regions_with_the_right_reason():
    lab = np.zeros((48, 48, 48), np.int32)
    lab[2:12, 2:12, 2:12] = 1                          # compact cube: kept
    lab[20:46, 2:4, 2:4] = 2                           # 26 x 2 x 2 rod: elongation 13 -> kept at 1 mm
    lab[2:4, 20:22, 14:46] = 3                         # 2 x 2 x 32 rod: elongation 16 -> elongated
    for t in range(10):                                # diagonal chain: fill 10/1000 -> low_fill
        lab[20 + t, 20 + t, 20 + t] = 4
    lab[40, 40, 40:42] = 5                             # 2 voxels: too_small
    props = region_properties(lab)
    assert props[1].size == 1000 and props[1].fill_ratio == 1.0 and props[1].elongation == 1.0
    assert props[3].bbox == (2, 20, 14, 4, 22, 46)
    kept, why = filter_regions(lab, min_size=8)
    assert kept.tolist() == [1, 2]
    assert why[3] == ("elongated",)
    assert why[4] == ("low_fill",)
    assert "too_small" in why[5]
    # elongation is measured in mm: with 2 mm slices (axis 0) rod 2 becomes 52 / 2 = 26 long
    kept_aniso, why_aniso = filter_regions(lab, min_size=8, spacing=(2.0, 1.0, 1.0))
    assert 2 not in kept_aniso and "elongated" in why_aniso[2]
    assert 1 not in why_aniso                          # 20 x 10 x 10 mm cube: elongation 2, kept
    # thresholds are parameters
    kept_loose, _ = filter_regions(lab, min_size=1, min_fill_ratio=0.0, max_elongation=100)
    assert kept_loose.tolist() == [1, 2, 3, 4, 5]


def test_separate_case_reports_filtered_regions(separated):
    kept = set(separated["region_ids"].tolist())
    filtered = set(separated["filtered"])
    assert kept.isdisjoint(filtered)
    assert kept | filtered == set(range(1, separated["n_supervoxels"] + 1))
    for i in kept:
        p = separated["props"][i]
        assert p.size >= separated["min_size"] and p.fill_ratio > 0.2 and p.elongation < 15


# ------------------------------------------------------------------------------------------- cache
def test_region_cache_build_skip_and_load(tmp_path):
    cases = [(f"case{i}", (lambda i=i: (make_phantom((40, 40, 40), seed=i)[0], (1.0, 1.0, 1.0)))) for i in range(2)]
    out = tmp_path / "regions"
    res = build_region_cache(cases, str(out), num_processes=2, progress=False, n_segments=16, crop_size=12)
    assert sorted(res["computed"]) == ["case0", "case1"] and res["skipped"] == []
    assert sorted(os.listdir(out)) == ["case0.npz", "case1.npz"]      # no temporary files left
    with np.load(out / "case0.npz") as f:
        assert f["crops"].dtype == np.uint8 and f["crops"].shape[1:] == (1, 12, 12, 12)
        assert f["labels_lowres"].shape == (20, 20, 20)
        assert f["bboxes"].shape == (f["crops"].shape[0], 6)
    mtime = os.path.getmtime(out / "case0.npz")

    again = build_region_cache(cases, str(out), num_processes=2, progress=False, n_segments=16, crop_size=12)
    assert again["computed"] == [] and sorted(again["skipped"]) == ["case0", "case1"]
    assert os.path.getmtime(out / "case0.npz") == mtime

    crops, index = load_region_cache(str(out))
    assert index.case_ids == ["case0", "case1"]
    assert crops.dtype == np.float32 and crops.shape[0] == len(index) == sum(res["n_regions"].values())
    assert 0.0 <= crops.min() and crops.max() <= 1.0
    direct = separate_case(make_phantom((40, 40, 40), seed=0)[0], (1, 1, 1), n_segments=16, crop_size=12)
    sel = index.case == 0
    np.testing.assert_array_equal(index.region_id[sel], direct["region_ids"])
    np.testing.assert_allclose(crops[sel], direct["crops"], atol=0.5 / 255 + 1e-6)

    with pytest.warns(RuntimeWarning, match="other parameters"):
        changed = build_region_cache(cases[:1], str(out), progress=False, n_segments=20, crop_size=12)
    assert changed["computed"] == ["case0"]


# ------------------------------------------------------------------------------------------- PNG
def test_separation_png_is_written(tmp_path, phantom, separated):
    img, _ = phantom
    ids = separated["region_ids"]
    filtered = {**separated["filtered"], int(ids[0]): ("low_fill",)}   # make sure hatching is drawn
    out = draw_regions_png(img, separated["labels"], ids[1:], filtered, str(tmp_path / "sep.png"),
                              cluster_of_region=np.arange(ids.size - 1) % 3, n_slices=3)
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg
    arr = mpimg.imread(out)
    assert arr.ndim == 3 and arr.shape[0] > 100 and arr.shape[1] > 300
    assert arr[..., :3].std() > 0.05                   # not a blank canvas
    # coloured by cluster: each cluster's legend colour (tab10, alpha 0.6 over white) is drawn
    import matplotlib
    rgb = arr[..., :3].reshape(-1, 3)
    for c in range(3):
        want = 0.6 * np.asarray(matplotlib.colormaps["tab10"](c)[:3]) + 0.4
        assert (np.abs(rgb - want).max(axis=1) < 0.02).sum() > 20, f"cluster {c}'s colour is missing"


def test_cache_reads_nnunet_preprocessed_cases(tmp_path):
    """(folder, identifier) cases: data read with nnU-Net's dataset class, spacing from the plans beside it."""
    import json
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunet_cl.case_cache import PreprocessedCaseLoader

    ds_folder = tmp_path / "Dataset999_Phantom"
    data_folder = ds_folder / "nnUNetPlans_3d_lowres"
    data_folder.mkdir(parents=True)
    plans = {"configurations": {
        "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "spacing": [2.0, 1.0, 1.0]},
        "3d_lowres": {"inherits_from": "3d_fullres", "data_identifier": "nnUNetPlans_3d_lowres",
                      "spacing": [4.0, 2.0, 2.0]}}}
    (ds_folder / "nnUNetPlans.json").write_text(json.dumps(plans))
    img, body = make_phantom((32, 40, 40), seed=2)
    data = np.stack([img, -img])                                # two channels (c, z, y, x)
    nnUNetDatasetBlosc2.save_case(data, body[None].astype(np.int8), {"spacing": [9.0, 9.0, 9.0]},
                                  str(data_folder / "case_000"), chunks=(1, 32, 40, 40), blocks=(1, 16, 20, 20))

    image, spacing = PreprocessedCaseLoader(str(data_folder), "case_000")()
    assert spacing == [4.0, 2.0, 2.0]                            # the plans' spacing, not properties['spacing']
    np.testing.assert_array_equal(image, img)

    out = ds_folder / "separeg_regions_3d_lowres"
    res = build_region_cache([("case_000", (str(data_folder), "case_000"))], str(out), progress=False,
                             n_segments=12, crop_size=8)
    assert res["computed"] == ["case_000"]
    with np.load(out / "case_000.npz") as f:
        np.testing.assert_array_equal(f["spacing"], [4.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="nnU-Net data"):
        build_region_cache([("x", (str(data_folder), "case_000"))], str(data_folder), progress=False)


def test_shared_defaults_are_the_functions_defaults():
    """SEPARATION_DEFAULTS (trainers, preview) and separate_case's signature (scikit-image style) cannot drift."""
    import inspect

    from nnunet_cl.methods.separeg.defaults import SEPARATION_DEFAULTS
    from nnunet_cl.methods.separeg.separation import filter_regions, separate_case, supervoxels
    for fn in (separate_case, supervoxels, filter_regions):
        params = inspect.signature(fn).parameters
        for key, value in SEPARATION_DEFAULTS.items():
            if key in params and not (fn is filter_regions and key == "min_size"):  # there 0: the caller decides
                assert params[key].default == value, (fn.__name__, key)
    assert set(SEPARATION_DEFAULTS) <= set(inspect.signature(separate_case).parameters)
