"""The unlabeled pool on a tiny synthetic dataset: ingestion matches nnU-Net's own preprocessing, bad files are
reported and skipped, re-runs add nothing, list_pool, and the user-facing errors.

One nnUNetv2_plan_and_preprocess run (about 20 s) is shared by the module.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_cl.image_io import find_sources, read_sitk_images
from nnunet_cl.paths import NnUNetCLError
from nnunet_cl.pool import (add_unlabeled, format_summary, labeled_pool_members, list_pool, load_manifest,
                            pool_case_folder, pool_identifiers)

DATASET = "Dataset951_PoolTiny"


def _blob(rng, shape, offset=100.0):
    """Noisy bright box inside a zero border, like a skull-stripped MRI: cropping to nonzero matters."""
    img = np.zeros(shape, np.float32)
    z, y, x = shape
    img[2:z - 2, 3:y - 3, 3:x - 3] = rng.normal(offset, 20, (z - 4, y - 6, x - 6))
    return img


def _write(arr, fname, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)):
    """Write a (z, y, x) array; spacing and origin in SimpleITK's x, y, z order (a 4D array gets t = 1)."""
    im = sitk.GetImageFromArray(arr, isVector=False)  # 4D arrays are 4D scalar images, not vector pixels
    dim = im.GetDimension()
    im.SetSpacing((tuple(spacing) + (1.0,))[:dim])
    im.SetOrigin((tuple(origin) + (0.0,))[:dim])
    sitk.WriteImage(im, str(fname))


def write_dicom_series(arr: np.ndarray, folder: Path, spacing=(0.9, 0.9, 3.0)) -> None:
    """Write a (z, y, x) int16 volume as a CT DICOM series, one file per slice, like SimpleITK's example."""
    folder.mkdir(parents=True)
    vol = sitk.GetImageFromArray(arr.astype(np.int16))
    vol.SetSpacing(spacing)
    series_uid = "1.2.826.0.1.3680043.2.1125.951.1"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i in range(vol.GetDepth()):
        sl = vol[:, :, i]
        for tag, value in (("0008|0060", "CT"), ("0008|0016", "1.2.840.10008.5.1.4.1.1.2"),
                           ("0008|0018", f"{series_uid}.{i + 1}"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.951"),
                           ("0020|000e", series_uid), ("0020|0013", str(i + 1)),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0020|0032", "\\".join(map(str, vol.TransformIndexToPhysicalPoint((0, 0, i))))),
                           ("0028|0030", f"{spacing[1]}\\{spacing[0]}"), ("0018|0050", str(spacing[2]))):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{i:03d}.dcm"))
        writer.Execute(sl)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A planned and preprocessed 5-case dataset (1 channel, 24x28x20 voxels, spacing 2x1x1 mm zyx)."""
    root = tmp_path_factory.mktemp("nnunet")
    env = {k: root / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    raw = env["nnUNet_raw"] / DATASET
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True)
    env["nnUNet_preprocessed"].mkdir()
    env["nnUNet_results"].mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        img = _blob(rng, (20, 28, 24))
        seg = np.zeros(img.shape, np.uint8)
        seg[6:14, 10:18, 8:16] = 1
        img[seg == 1] += 60
        _write(img, raw / "imagesTr" / f"tiny_{i:03d}_0000.nii.gz")
        _write(seg, raw / "labelsTr" / f"tiny_{i:03d}.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "blob": 1},
        "numTraining": 5, "file_ending": ".nii.gz"}))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, str(v))
        out = subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", "951", "-c", "3d_fullres", "-np", "1",
                              "-npfp", "1"], capture_output=True, text=True, encoding="utf-8", errors="replace",
                             env=os.environ.copy())
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        yield env


@pytest.fixture(scope="module")
def scans(tiny, tmp_path_factory):
    """Input folder: good files in four formats plus a DICOM series, and one bad file of each kind."""
    folder = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(1)
    _write(_blob(rng, (16, 30, 26)), folder / "good_a.nii.gz", spacing=(1.5, 1.5, 2.5), origin=(10.0, -5.0, 3.0))
    _write(_blob(rng, (24, 22, 30), offset=300), folder / "good b.nrrd", spacing=(0.8, 0.9, 1.6))
    _write(_blob(rng, (12, 20, 20)).astype(np.int16), folder / "good_c.mha", spacing=(1.2, 1.2, 4.0))
    sub = folder / "more"
    sub.mkdir()
    _write(_blob(rng, (18, 26, 22)), sub / "good_d.mhd", spacing=(1.0, 1.0, 2.0))
    write_dicom_series(_blob(rng, (10, 32, 28), offset=40), folder / "series1")
    # bad ones
    (folder / "corrupt.nii.gz").write_bytes(b"this is not a nifti file" * 20)
    _write(np.stack([_blob(rng, (16, 20, 20))] * 2), folder / "two_channels.nii.gz")
    nan = _blob(rng, (16, 20, 20))
    nan[5, 5, 5] = np.nan
    _write(nan, folder / "has_nan.nrrd")
    _write(np.zeros((16, 20, 20), np.float32), folder / "all_zero.nii.gz")
    _write(_blob(rng, (5, 20, 20))[2], folder / "flat2d.nii.gz", spacing=(1.0, 1.0))
    (folder / "notes.txt").write_text("not an image, ignored")
    broken = folder / "broken_dicom"
    broken.mkdir()
    (broken / "x.dcm").write_bytes(b"\0" * 300)
    return folder


@pytest.fixture(scope="module")
def ingested(tiny, scans):
    summary = add_unlabeled(DATASET, str(scans), verbose=False)
    return summary


def _managers(tiny):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    folder = tiny["nnUNet_preprocessed"] / DATASET
    pm = PlansManager(str(folder / "nnUNetPlans.json"))
    dataset_json = json.loads((folder / "dataset.json").read_text())
    return folder, pm, pm.get_configuration("3d_fullres"), dataset_json


def _load(folder, identifier):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    data, seg, _, props = nnUNetDatasetBlosc2(str(folder), [identifier]).load_case(identifier)
    return np.asarray(data[:]), np.asarray(seg[:]), props


GOOD = {"good_a.nii.gz": "pool_good_a", "good b.nrrd": "pool_good_b", "good_c.mha": "pool_good_c",
        "more/good_d.mhd": "pool_good_d", "series1": "pool_series1"}
BAD = {"corrupt.nii.gz": "unreadable", "two_channels.nii.gz": "channel", "has_nan.nrrd": "NaN",
       "all_zero.nii.gz": "constant", "flat2d.nii.gz": "2D", "broken_dicom/x.dcm": "DICOM"}


def test_summary_names_good_and_bad_files(ingested):
    assert sorted(ingested["added"]) == sorted(GOOD.values())
    assert ingested["already_present"] == [] and ingested["updated"] == []
    assert set(ingested["skipped"]) == set(BAD)
    for name, word in BAD.items():
        assert word in ingested["skipped"][name], (name, ingested["skipped"][name])
    assert list(ingested["configurations"]) == ["nnUNetPlans_3d_fullres"]
    report = format_summary(ingested)
    assert "Added: 5" in report and "corrupt.nii.gz: unreadable" in report


def test_cases_match_nnunet_preprocessing(tiny, scans, ingested, tmp_path):
    """Each pool case equals DefaultPreprocessor.run_case on the same image (DICOM: on the series as NIfTI)."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
    folder, pm, cm, dataset_json = _managers(tiny)
    manifest = load_manifest(str(folder))
    pool_folder = pool_case_folder(str(folder), cm.data_identifier)
    for name, case_id in GOOD.items():
        src = scans / name
        if src.is_dir():  # nnU-Net cannot read DICOM: give it the same series as NIfTI
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(src)))
            sitk.WriteImage(reader.Execute(), str(tmp_path / "series.nii.gz"))
            src = tmp_path / "series.nii.gz"
        ref_data, ref_seg, ref_props = DefaultPreprocessor(verbose=False).run_case(
            [str(src)], None, pm, cm, dataset_json)
        data, seg, props = _load(pool_folder, case_id)
        assert data.dtype == np.float32 and seg.dtype == np.int16
        np.testing.assert_allclose(data, ref_data, rtol=1e-6, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(seg, ref_seg, err_msg=name)
        assert set(np.unique(seg)) <= {-1, 0} and props["class_locations"] == {}
        for key in ("spacing", "shape_before_cropping", "bbox_used_for_cropping",
                    "shape_after_cropping_and_before_resampling"):
            np.testing.assert_allclose(np.asarray(props[key], float), np.asarray(ref_props[key], float), err_msg=key)
        np.testing.assert_allclose(props["sitk_stuff"]["spacing"], ref_props["sitk_stuff"]["spacing"])
        np.testing.assert_allclose(props["sitk_stuff"]["origin"], ref_props["sitk_stuff"]["origin"], atol=1e-4)
        # resampled to the plans' target spacing
        spacing_t = [props["spacing"][i] for i in pm.transpose_forward]
        expected_shape = compute_new_shape(props["shape_after_cropping_and_before_resampling"], spacing_t, cm.spacing)
        assert list(data.shape[1:]) == list(expected_shape)
        entry = manifest[case_id]
        assert entry["preprocessed"][cm.data_identifier] == {"shape": list(data.shape[1:]), "spacing": cm.spacing}
        assert entry["spacing"] == pytest.approx(props["spacing"])
        assert os.path.isabs(entry["source"]) and os.path.exists(entry["source"])
    assert manifest["pool_series1"]["kind"] == "dicom"
    assert manifest["pool_series1"]["spacing"] == pytest.approx([3.0, 0.9, 0.9])


def test_reader_matches_simpleitkio(scans):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    sources, _ = find_sources(str(scans))
    for s in sources:
        if s["kind"] == "file" and s["name"] in ("good_a.nii.gz", "two_channels.nii.gz"):
            ours = read_sitk_images(s)
            ref = SimpleITKIO().read_images(s["files"])
            np.testing.assert_array_equal(ours[0], ref[0])
            assert ours[0].dtype == ref[0].dtype == np.float32
            assert ours[1] == ref[1]


def test_rerun_adds_nothing(tiny, scans, ingested):
    again = add_unlabeled(DATASET, str(scans), verbose=False)
    assert again["added"] == [] and again["updated"] == []
    assert sorted(again["already_present"]) == sorted(GOOD.values())
    assert set(again["skipped"]) == set(BAD)  # bad files are reported again, not silently remembered


def test_list_pool(tiny, ingested):
    folder, pm, cm, _ = _managers(tiny)
    folder = str(folder)
    di = cm.data_identifier
    labeled = [f"tiny_{i:03d}" for i in range(5)]
    assert not (Path(folder) / "splits_final.json").exists()  # nnU-Net's default split: what do_split would write
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    val0 = [str(v) for v in generate_crossval_split(labeled, seed=12345, n_splits=5)[0]["val"]]

    members = list_pool(folder, di, 0)
    ids = [i for _, i in members]
    assert sorted(ids) == sorted([c for c in labeled if c not in val0] + list(GOOD.values()))
    assert not set(val0) & set(ids)
    assert all(f == os.path.join(folder, di) for f, i in members if i in labeled)
    assert all(f == pool_case_folder(folder, di) for f, i in members if i.startswith("pool_"))
    assert sorted(i for _, i in list_pool(folder, di, "all")) == sorted(labeled + list(GOOD.values()))
    assert [i for _, i in labeled_pool_members(folder, di, "all")] == labeled
    assert [i for _, i in pool_identifiers(folder, di, exclude=["pool_good_a"])] == sorted(
        set(GOOD.values()) - {"pool_good_a"})
    # every member loads with nnU-Net's dataset class
    data, seg, props = _load(*members[-1])
    assert data.ndim == 4

    with pytest.raises(NnUNetCLError, match="pool is empty.*Fix: "):
        list_pool(folder, "nnUNetPlans_3d_lowres", 0)


def test_new_configuration_completes_existing_cases(tiny, scans, ingested, tmp_path):
    """A 3d configuration added to the plans later is preprocessed for the cases already in the pool."""
    import shutil
    folder, pm, cm, _ = _managers(tiny)
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    plans["configurations"]["3d_coarse"] = {"inherits_from": "3d_fullres", "data_identifier": "nnUNetPlans_3d_coarse",
                                            "spacing": [4.0, 2.0, 2.0]}
    (folder / "coarsePlans.json").write_text(json.dumps(plans))
    only_a = tmp_path / "only_a"
    only_a.mkdir()
    shutil.copy(scans / "good_a.nii.gz", only_a / "good_a.nii.gz")
    s = add_unlabeled(DATASET, str(only_a), plans_identifier="coarsePlans", configurations=["3d_coarse"],
                      verbose=False)
    assert s["added"] == ["pool_good_a_2"]  # a different path is a different source, with a unique id
    data, _, _ = _load(pool_case_folder(str(folder), "nnUNetPlans_3d_coarse"), "pool_good_a_2")
    full, _, _ = _load(pool_case_folder(str(folder), cm.data_identifier), "pool_good_a")
    assert all(c <= f / 1.5 for c, f in zip(data.shape[1:], full.shape[1:]))
    s = add_unlabeled(DATASET, str(scans), plans_identifier="coarsePlans", configurations=["3d_coarse"],
                      verbose=False)
    assert sorted(s["updated"]) == sorted(GOOD.values()) and s["added"] == []
    assert len(pool_identifiers(str(folder), "nnUNetPlans_3d_coarse")) == len(GOOD) + 1
    # a 2d configuration, when named, stores the 3d volumes at its own spacing, as nnU-Net does for its cases
    s = add_unlabeled(DATASET, str(scans), configurations=["2d"], verbose=False)
    flat_id = pm.get_configuration("2d").data_identifier
    if flat_id != cm.data_identifier:
        assert sorted(s["updated"]) == sorted(GOOD.values())
    assert len(pool_identifiers(str(folder), flat_id)) == len(GOOD)
    with pytest.raises(NnUNetCLError, match="not in the plans"):
        add_unlabeled(DATASET, str(scans), configurations=["3d_nope"], verbose=False)
    # keep the module's pool as the other tests expect it
    manifest = load_manifest(str(folder))
    manifest.pop("pool_good_a_2")
    (folder / "nnunet_cl_pool" / "pool.json").write_text(json.dumps(manifest))


def test_cli_multiprocess(tiny, tmp_path, monkeypatch, capsys):
    """The console script's main, by numeric id, with -np 2 (spawned workers)."""
    from nnunet_cl.pool import main_add_unlabeled
    folder = tmp_path / "cli_scans"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(2):
        _write(_blob(rng, (14, 20, 18)), folder / f"cli_{i}.nii.gz", spacing=(1.0, 1.0, 2.0))
    (folder / "junk.nii.gz").write_bytes(b"junk" * 10)
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_cl_add_unlabeled", "-d", "951", "-i", str(folder), "-np", "2"])
    main_add_unlabeled()
    out = capsys.readouterr().out
    assert "Added: 2" in out and "junk.nii.gz: unreadable" in out
    pre = str(tiny["nnUNet_preprocessed"] / DATASET)
    ids = [i for _, i in pool_identifiers(pre, "nnUNetPlans_3d_fullres")]
    assert {"pool_cli_0", "pool_cli_1"} <= set(ids)
    # user errors end the command with a message, not a traceback
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_cl_add_unlabeled", "-d", "951", "-i", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="error: Input folder .* does not exist"):
        main_add_unlabeled()


def test_user_errors(tiny, scans, tmp_path, monkeypatch):
    with pytest.raises(NnUNetCLError, match="nnUNetv2_plan_and_preprocess"):
        add_unlabeled(DATASET, str(scans), plans_identifier="nnUNetResEncUNetMPlans", verbose=False)
    with pytest.raises(NnUNetCLError, match="does not exist"):
        add_unlabeled(DATASET, str(tmp_path / "missing"), verbose=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(NnUNetCLError, match="Nothing readable"):
        add_unlabeled(DATASET, str(empty), verbose=False)
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "x.nii.gz").write_bytes(b"bad" * 10)
    with pytest.raises(NnUNetCLError, match="Nothing readable.*x.nii.gz: unreadable"):
        add_unlabeled(DATASET, str(only_bad), verbose=False)
    with pytest.raises(NnUNetCLError, match="Dataset952_Nope|does not exist"):
        add_unlabeled("Dataset952_Nope", str(scans), verbose=False)
    with pytest.raises(NnUNetCLError, match="does not exist"):
        add_unlabeled("Dataset951_Other", str(scans), verbose=False)
    monkeypatch.delenv("nnUNet_preprocessed")
    with pytest.raises(NnUNetCLError, match="nnUNet_preprocessed is not set"):
        add_unlabeled(DATASET, str(scans), verbose=False)
    monkeypatch.setenv("nnUNet_preprocessed", str(tiny["nnUNet_preprocessed"]))
    monkeypatch.delenv("nnUNet_raw")
    with pytest.raises(NnUNetCLError, match="nnUNet_raw is not set"):
        add_unlabeled(DATASET, str(scans), verbose=False)


def test_dataset_missing_preprocessing(nnunet_env, scans):
    """A dataset that exists only in nnUNet_raw was never planned: say so."""
    (nnunet_env["nnUNet_raw"] / "Dataset953_Raw").mkdir()
    with pytest.raises(NnUNetCLError, match="nnUNetv2_plan_and_preprocess"):
        add_unlabeled("Dataset953_Raw", str(scans), verbose=False)


def test_find_sources_groups_channels(tmp_path):
    """Multi-channel datasets: case_0000/case_0001 files form one case; incomplete groups stay single files."""
    for name in ("p1_0000.nii.gz", "p1_0001.nii.gz", "p2_0000.nii.gz", "solo.nii.gz"):
        _write(np.ones((4, 5, 6), np.float32), tmp_path / name)
    sources, _ = find_sources(str(tmp_path), num_channels=2)
    by_stem = {s["stem"]: s for s in sources}
    assert by_stem["p1"]["kind"] == "channels" and len(by_stem["p1"]["files"]) == 2
    assert by_stem["p1"]["files"][0].endswith("p1_0000.nii.gz")
    assert {"p2_0000", "solo"} <= set(by_stem)
    data, props = read_sitk_images(by_stem["p1"])
    assert data.shape == (2, 4, 5, 6)
    one, _ = find_sources(str(tmp_path), num_channels=1)
    assert {s["stem"] for s in one} == {"p1", "p1_0001", "p2", "solo"}
