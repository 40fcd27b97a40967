"""Synthetic phantoms: geometry, intensities, reproducibility and the nnU-Net raw dataset writer."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nnunet_cl.phantom import LABELS, make_phantom, write_phantom_dataset

SEEDS = range(6)


@pytest.fixture(scope="module")
def phantoms():
    return {s: make_phantom(seed=s) for s in SEEDS}


def test_shape_and_dtype(phantoms):
    image, label = phantoms[0]
    assert image.shape == label.shape == (48, 64, 64)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    image, label = make_phantom(shape=(20, 30, 40), spacing=(3.0, 2.0, 1.0), seed=1)
    assert image.shape == label.shape == (20, 30, 40)


@pytest.mark.parametrize("seed", SEEDS)
def test_every_label_present(phantoms, seed):
    _, label = phantoms[seed]
    assert set(np.unique(label)) == {0, 1, 2, 3, 4}
    # the kidneys are a pair on either side of the spine
    _, n_kidneys = ndimage.label(label == LABELS["kidney"])
    assert n_kidneys == 2


def test_without_tumour_has_no_label_4():
    _, label = make_phantom(seed=3, with_tumour=False)
    assert set(np.unique(label)) == {0, 1, 2, 3}


@pytest.mark.parametrize("seed", SEEDS)
def test_tumour_enclosed_by_liver(phantoms, seed):
    _, label = phantoms[seed]
    tumour = label == LABELS["tumour"]
    rim = ndimage.binary_dilation(tumour) & ~tumour
    assert rim.any()
    # every face neighbour of the tumour is liver: it neither touches another organ nor leaves the liver
    assert np.all(label[rim] == LABELS["liver"])


def test_intensities_are_ct_like(phantoms):
    image, label = phantoms[0]
    corners = image[:, :3, :3]
    assert abs(float(corners.mean()) + 1000) < 15  # air outside the body
    mean = {name: float(image[label == v].mean()) for name, v in LABELS.items() if v}
    assert 60 < mean["liver"] < 100
    assert mean["kidney"] > mean["spleen"] > mean["liver"] > mean["tumour"]
    assert image.max() > 400  # the unlabelled spine
    # noise of about 20 HU: residual inside the liver after removing the smooth part
    liver_core = ndimage.binary_erosion(label == LABELS["liver"], iterations=2)
    residual = image - ndimage.uniform_filter(image, 5)
    assert 10 < float(residual[liver_core].std()) < 30


def test_same_seed_same_phantom(phantoms):
    image, label = make_phantom(seed=2)
    np.testing.assert_array_equal(image, phantoms[2][0])
    np.testing.assert_array_equal(label, phantoms[2][1])


def test_different_seeds_differ(phantoms):
    for a, b in [(0, 1), (1, 2), (0, 5)]:
        assert not np.array_equal(phantoms[a][1], phantoms[b][1])
        assert np.abs(phantoms[a][0] - phantoms[b][0]).mean() > 5


def test_write_dataset_layout(tmp_path):
    raw = tmp_path / "raw"
    unl = tmp_path / "unlabeled"
    spacing = (2.5, 1.5, 1.0)
    folder = write_phantom_dataset(raw, dataset_id=991, name="PhantomTest", num_labeled=2, num_test=1,
                                   num_unlabeled=2, unlabeled_folder=unl, shape=(16, 24, 32),
                                   spacing=spacing, seed=10)
    assert folder == raw / "Dataset991_PhantomTest"
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == ["case_000_0000.nii.gz",
                                                                       "case_001_0000.nii.gz"]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == ["case_000.nii.gz", "case_001.nii.gz"]
    assert [p.name for p in (folder / "imagesTs").iterdir()] == ["case_002_0000.nii.gz"]
    assert [p.name for p in (folder / "labelsTs").iterdir()] == ["case_002.nii.gz"]
    assert sorted(p.name for p in unl.iterdir()) == ["phantom_unlabeled_000.nii.gz",
                                                     "phantom_unlabeled_001.nii.gz"]

    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == {"background": 0, "liver": 1, "kidney": 2, "spleen": 3, "tumour": 4}
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"

    # SimpleITK reports spacing and size in (x, y, z); the arrays come back in (z, y, x)
    img = sitk.ReadImage(str(folder / "imagesTr" / "case_001_0000.nii.gz"))
    assert img.GetSpacing() == pytest.approx(spacing[::-1])
    assert img.GetSize() == (32, 24, 16)
    image, label = make_phantom((16, 24, 32), spacing, seed=11)  # case k uses seed + k
    np.testing.assert_allclose(sitk.GetArrayFromImage(img), image)
    lab = sitk.ReadImage(str(folder / "labelsTr" / "case_001.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lab), label)
    assert lab.GetSpacing() == img.GetSpacing()
    # the unlabelled phantoms come after the training and test cases, so they are new images
    unl_img = sitk.GetArrayFromImage(sitk.ReadImage(str(unl / "phantom_unlabeled_000.nii.gz")))
    np.testing.assert_allclose(unl_img, make_phantom((16, 24, 32), spacing, seed=13)[0])


def test_write_dataset_refuses_to_clobber(tmp_path):
    write_phantom_dataset(tmp_path, dataset_id=992, num_labeled=1, shape=(8, 12, 12))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_phantom_dataset(tmp_path, dataset_id=992, num_labeled=1, shape=(8, 12, 12))
    with pytest.raises(FileExistsError, match="id 992"):
        write_phantom_dataset(tmp_path, dataset_id=992, name="Other", num_labeled=1, shape=(8, 12, 12))
    folder = write_phantom_dataset(tmp_path, dataset_id=992, num_labeled=2, shape=(8, 12, 12), overwrite=True)
    assert len(list((folder / "imagesTr").iterdir())) == 2
    with pytest.raises(ValueError, match="unlabeled_folder"):
        write_phantom_dataset(tmp_path, dataset_id=993, num_labeled=1, num_unlabeled=1)


def test_dataset_passes_nnunet_integrity_check(tmp_path):
    verify = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity").verify_dataset_integrity
    folder = write_phantom_dataset(tmp_path, dataset_id=990, num_labeled=3, num_test=1, shape=(24, 32, 32))
    verify(str(folder), num_processes=1)  # raises on any problem
