"""SuperCL's supervoxels: their properties on a phantom and on real CT, the cache, and their alignment with the
image through nnU-Net's spatial augmentation.

The phantom (made here, synthetic): an ellipsoidal body split into 3 x 3 x 3 compartments by jittered walls,
each compartment at its own intensity, plus a little noise; its compartment walls are the known edges.
"""
import json
import warnings

import cc3d
import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.segmentation import find_boundaries

from nnunet_cl.methods.supercl.cache import (build_supervoxel_cache, cache_path, case_supervoxels, load_supervoxels,
                                             n_segments_for)
from nnunet_cl.regions.supervoxels import body_mask, supervoxels

EDGE = 8  # the trainers' default supervoxel edge (voxels)


def phantom(seed=0, shape=(40, 48, 48)):
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    body = (z ** 2 / 0.9 + y ** 2 / 0.85 + x ** 2 / 0.85) < 1
    walls = [np.digitize(a, [-0.3 + rng.uniform(-.1, .1), 0.3 + rng.uniform(-.1, .1)]) for a in (z, y, x)]
    compartments = (1 + walls[0] * 9 + walls[1] * 3 + walls[2]) * body
    levels = np.r_[0, rng.permutation(np.linspace(0.2, 1.0, 27))]
    image = levels[compartments] + 0.02 * rng.standard_normal(shape)
    return image.astype(np.float32), body, compartments


def boundary_recall(labels, truth, body, tolerance=1):
    """Fraction of the true inner edges (compartment walls inside the body) within `tolerance` voxels of a
    supervoxel boundary."""
    true_edges = find_boundaries(truth, mode="inner") & body & ~find_boundaries(body, mode="inner")
    near = find_boundaries(labels, mode="thick")
    if tolerance:
        near = ndimage.binary_dilation(near, iterations=tolerance)
    return float((near & true_edges).sum() / true_edges.sum())


def _check_partition(labels, mask, requested):
    assert labels.shape == mask.shape and labels.dtype == np.int32
    assert np.array_equal(labels > 0, mask)  # covers the masked volume, nothing outside
    ids = np.unique(labels[labels > 0])
    assert 0.5 * requested <= len(ids) <= 2 * requested, (len(ids), requested)
    for i in ids:  # each one piece (26-connected)
        assert cc3d.connected_components(labels == i, connectivity=26, return_N=True)[1] == 1, i


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_phantom_supervoxels_cover_the_body_are_connected_and_follow_the_edges(seed):
    image, body, compartments = phantom(seed)
    requested = n_segments_for(int(body.sum()), EDGE)
    labels = supervoxels(image, body, n_segments=requested, downsample=2)
    _check_partition(labels, body, requested)
    recall, exact = boundary_recall(labels, compartments, body, 1), boundary_recall(labels, compartments, body, 0)
    # a regular grid of cubes of the same size, which knows nothing of the image
    k = np.ceil(np.cbrt(body.sum() / requested)).astype(int)
    grid = (np.ravel_multi_index(np.indices(body.shape) // k, [s // k + 1 for s in body.shape]) + 1) * body
    grid_exact = boundary_recall(grid, compartments, body, 0)
    # measured on seeds 0-2: within 1 voxel 0.92-0.96; on the wall itself 0.70-0.78 against the grid's 0.46-0.53
    assert recall >= 0.9 and exact >= grid_exact + 0.1, (recall, exact, grid_exact)


def test_real_ct_supervoxels_cover_the_body_and_are_connected(shared_data):
    import SimpleITK as sitk
    path = shared_data / "OpenKBP_HN" / "imagesTr" / "openkbp_001_0000.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} not in the shared data")
    img = sitk.ReadImage(str(path))
    image = np.clip(sitk.GetArrayFromImage(img).astype(np.float32), -1000, 1500)
    image = (image - image.mean()) / image.std()  # nnU-Net's CT normalisation, roughly
    labels = case_supervoxels(image, list(img.GetSpacing())[::-1])
    mask = body_mask(image)
    _check_partition(labels, mask, n_segments_for(int(mask.sum()), EDGE))


# ----------------------------------------------------------------------------------------------- the cache
def _cases(n=3):
    out = []
    for i in range(n):
        image, _, _ = phantom(i, (24, 32, 32))
        out.append((f"case_{i}", lambda image=image: (image, [1.0, 1.0, 1.0])))
    return out


def test_cache_is_written_once_and_recomputed_when_parameters_change(tmp_path):
    out = tmp_path / "cache"
    first = build_supervoxel_cache(_cases(), str(out), progress=False)
    assert sorted(first["computed"]) == ["case_0", "case_1", "case_2"] and not first["skipped"]
    stored = load_supervoxels(str(out), "case_1", (24, 32, 32))
    image, _, _ = phantom(1, (24, 32, 32))
    np.testing.assert_array_equal(stored, case_supervoxels(image, [1, 1, 1]))
    with np.load(cache_path(str(out), "case_1")) as f:
        assert json.loads(str(f["params"])) == {"supervoxel_edge": 8, "compactness": 0.1, "downsample": 2}
    again = build_supervoxel_cache(_cases(), str(out), progress=False)
    assert again["computed"] == [] and len(again["skipped"]) == 3
    with pytest.warns(RuntimeWarning, match="other parameters"):
        changed = build_supervoxel_cache(_cases(), str(out), progress=False, supervoxel_edge=6)
    assert len(changed["computed"]) == 3
    with pytest.raises(TypeError, match="unknown supervoxel parameter"):
        build_supervoxel_cache(_cases(), str(out), progress=False, n_segments=10)


def test_cache_runs_in_parallel_like_in_process(tmp_path):
    build_supervoxel_cache(_cases(), str(tmp_path / "a"), num_processes=1, progress=False)
    build_supervoxel_cache(_cases(), str(tmp_path / "b"), num_processes=2, progress=False)
    for i in range(3):
        np.testing.assert_array_equal(load_supervoxels(str(tmp_path / "a"), f"case_{i}"),
                                      load_supervoxels(str(tmp_path / "b"), f"case_{i}"))


def test_a_truncated_or_stale_cache_file_is_named_with_the_fix(tmp_path):
    out = tmp_path / "cache"
    build_supervoxel_cache(_cases(2), str(out), progress=False)
    with pytest.raises(ValueError, match="preprocessed again.*Fix: delete"):
        load_supervoxels(str(out), "case_0", (24, 32, 30))
    path = cache_path(str(out), "case_1")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable.*Fix: delete"):
        load_supervoxels(str(out), "case_1")
    with pytest.raises(ValueError, match="no supervoxels cached"):
        load_supervoxels(str(out), "case_9")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unreadable file is recomputed silently: it was never finished
        summary = build_supervoxel_cache(_cases(2), str(out), progress=False)
    assert summary["computed"] == ["case_1"]
    assert load_supervoxels(str(out), "case_1").shape == (24, 32, 32)


def test_the_cache_refuses_nnunets_own_data_folder(tmp_path):
    (tmp_path / "case_0.b2nd").write_bytes(b"")
    with pytest.raises(ValueError, match="dataset-format detection"):
        build_supervoxel_cache(_cases(1), str(tmp_path), progress=False)


# ----------------------------------------------------------------------------------------------- augmentation
def test_the_supervoxel_map_stays_aligned_with_the_patch_through_rotation_and_scaling():
    """nnU-Net's SpatialTransform (as its training transforms build it), rotation and scaling forced on, with the
    nearest-neighbour segmentation the SuperCL loader sets: every voxel's id still names the compartment the
    image shows there. Checked against the image: inside each id the transformed intensities stay at that
    compartment's level (away from walls, where the image is interpolated linearly)."""
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from nnunet_cl_trainers.supercl_data import nearest_segmentation

    image, body, compartments = phantom(0, (48, 56, 56))
    levels = {int(c): float(np.median(image[compartments == c])) for c in np.unique(compartments) if c}
    spatial = SpatialTransform((32, 40, 40), patch_center_dist_from_border=0, random_crop=False, p_rotation=1.0,
                               rotation=(-np.pi / 6, np.pi / 6), p_scaling=1.0, scaling=(0.7, 1.4),
                               p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False,
                               border_mode_seg="constant", padding_value_seg=-1)
    transforms = nearest_segmentation(ComposeTransforms([spatial]))
    assert spatial.mode_seg == "nearest"
    for trial in range(4):
        torch.manual_seed(trial)
        np.random.seed(trial)
        out = transforms(image=torch.from_numpy(image)[None].float(),
                         segmentation=torch.from_numpy(compartments.astype(np.int32))[None])
        img, seg = out["image"][0].numpy(), out["segmentation"][0].numpy()
        assert seg.dtype == np.int32 and set(np.unique(seg)) <= set(levels) | {0, -1}
        inner = np.zeros(seg.shape, bool)
        for c in levels:  # voxels at least 2 voxels inside their id's region
            inner |= ndimage.binary_erosion(seg == c, iterations=2)
        expected = np.vectorize(lambda c: levels.get(int(c), np.nan))(seg[inner])
        error = np.abs(img[inner] - expected)
        assert inner.sum() > 1000 and np.median(error) < 0.02 and np.mean(error < 0.05) > 0.97, \
            (trial, np.median(error), np.mean(error < 0.05))
        # and a map shifted by 8 voxels is clearly wrong: the check can tell
        shifted = np.vectorize(lambda c: levels.get(int(c), np.nan))(np.roll(seg, 8, axis=1)[inner])
        ok = ~np.isnan(shifted)
        assert np.mean(np.abs(img[inner][ok] - shifted[ok]) < 0.05) < 0.8
