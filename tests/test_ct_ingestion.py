"""Real CT into the pool of a real labeled CT dataset.

A 4-case OpenKBP head-and-neck dataset (128^3 crops, about 3.9 x 3.9 x 2.5 mm) is planned and preprocessed
with 3d_fullres; then the four real CTs of ct_unlabeled (abdomen, head, chest, 0.8-5 mm, different fields of
view) and the TotalSegmentator 20-slice DICOM series are ingested into its pool. Every case must land at the
dataset's target spacing with the dataset's CT normalisation (clip to its 0.5/99.5 percentiles, z-score with
its foreground mean/std), exactly as nnU-Net preprocesses an image.
"""
import json
import os
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_cl.pool import add_unlabeled, list_pool, load_manifest, pool_case_folder

DATASET = "Dataset970_OpenKBPPool"
N_LABELED = 4


@pytest.fixture(scope="module")
def ct_dataset(shared_data, tmp_path_factory):
    kbp = shared_data / "OpenKBP_HN"
    unlabeled = shared_data / "ct_unlabeled"
    dicom = shared_data / "totalsegmentator_tests" / "example_ct_dicom"
    for p in (kbp, unlabeled, dicom):
        if not p.is_dir():
            pytest.skip(f"{p} not found in the shared data")
    root = tmp_path_factory.mktemp("ct")
    env = {k: root / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    raw = env["nnUNet_raw"] / DATASET
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    env["nnUNet_preprocessed"].mkdir()
    env["nnUNet_results"].mkdir()
    cases = sorted(f.name[:-len("_0000.nii.gz")] for f in (kbp / "imagesTr").glob("*_0000.nii.gz"))[:N_LABELED]
    for c in cases:
        os.symlink(kbp / "imagesTr" / f"{c}_0000.nii.gz", raw / "imagesTr" / f"{c}_0000.nii.gz")
        os.symlink(kbp / "labelsTr" / f"{c}.nii.gz", raw / "labelsTr" / f"{c}.nii.gz")
    dataset_json = json.loads((kbp / "dataset.json").read_text())
    dataset_json["numTraining"] = N_LABELED
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, str(v))
        out = subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", DATASET.split("_")[0][len("Dataset"):],
                              "-c", "3d_fullres", "-np", "2", "-npfp", "2"],
                             capture_output=True, text=True, encoding="utf-8", errors="replace", env=os.environ.copy())
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        summaries = [add_unlabeled(DATASET, str(unlabeled), num_processes=2, verbose=False),
                     add_unlabeled(DATASET, str(dicom), verbose=False)]
        yield {"env": env, "cases": cases, "summaries": summaries, "unlabeled": unlabeled, "dicom": dicom,
               "folder": env["nnUNet_preprocessed"] / DATASET}


def _managers(folder):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(str(folder / "nnUNetPlans.json"))
    return pm, pm.get_configuration("3d_fullres"), json.loads((folder / "dataset.json").read_text())


def _load(folder, identifier):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    data, seg, _, props = nnUNetDatasetBlosc2(str(folder), [identifier]).load_case(identifier)
    return np.asarray(data[:]), np.asarray(seg[:]), props


def _expected_ids(ct_dataset):
    return sorted(["pool_" + f.name[:-len(".nii.gz")] for f in ct_dataset["unlabeled"].glob("*.nii.gz")]
                  + ["pool_example_ct_dicom"])


def test_all_ct_ingested(ct_dataset):
    nifti, dicom = ct_dataset["summaries"]
    assert nifti["skipped"] == {} and dicom["skipped"] == {}
    assert sorted(nifti["added"] + dicom["added"]) == _expected_ids(ct_dataset)
    manifest = load_manifest(str(ct_dataset["folder"]))
    assert manifest["pool_example_ct_dicom"]["kind"] == "dicom"
    assert manifest["pool_example_ct_dicom"]["shape"] == [20, 512, 512]


def test_target_spacing_and_ct_normalisation(ct_dataset):
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
    folder = ct_dataset["folder"]
    pm, cm, _ = _managers(folder)
    assert cm.normalization_schemes == ["CTNormalization"]
    stats = pm.foreground_intensity_properties_per_channel["0"]
    lo, hi, mean, std = stats["percentile_00_5"], stats["percentile_99_5"], stats["mean"], stats["std"]
    manifest = load_manifest(str(folder))
    pool_folder = pool_case_folder(str(folder), cm.data_identifier)
    shapes = []
    for case_id in _expected_ids(ct_dataset):
        data, seg, props = _load(pool_folder, case_id)
        assert manifest[case_id]["preprocessed"][cm.data_identifier]["spacing"] == cm.spacing
        # resampled to the target spacing: same physical extent, nnU-Net's shape rule
        spacing_t = [props["spacing"][i] for i in pm.transpose_forward]
        cropped = props["shape_after_cropping_and_before_resampling"]
        assert list(data.shape[1:]) == list(compute_new_shape(cropped, spacing_t, cm.spacing))
        np.testing.assert_allclose(np.array(data.shape[1:]) * cm.spacing, np.array(cropped) * spacing_t,
                                   rtol=0.05, atol=max(cm.spacing))
        # CT normalisation with the dataset's statistics (computed on the labeled OpenKBP cases)
        source = manifest[case_id]["source"]
        if os.path.isdir(source):
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(source))
            raw_img = sitk.GetArrayFromImage(reader.Execute()).astype(np.float32)
        else:
            raw_img = sitk.GetArrayFromImage(sitk.ReadImage(source)).astype(np.float32)
        expected = (np.clip(raw_img, lo, hi) - mean) / std
        # cubic resampling may overshoot the clip range slightly, never by much
        margin = 0.05 * (hi - lo) / std
        assert (lo - mean) / std - margin <= data.min() and data.max() <= (hi - mean) / std + margin
        assert abs(data.mean() - expected.mean()) < 0.05 * expected.std(), case_id
        assert abs(np.median(data) - np.median(expected)) < 0.1 * expected.std(), case_id
        assert set(np.unique(seg)) <= {-1, 0} and props["class_locations"] == {}
        shapes.append(data.shape[1:])
    assert len(set(shapes)) == len(shapes)  # different fields of view stay different


def test_same_as_nnunet_preprocessing(ct_dataset, tmp_path):
    """The smallest NIfTI CT and the DICOM series (as NIfTI) through DefaultPreprocessor.run_case give the same case."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    folder = ct_dataset["folder"]
    pm, cm, dataset_json = _managers(folder)
    pool_folder = pool_case_folder(str(folder), cm.data_identifier)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(ct_dataset["dicom"])))
    sitk.WriteImage(reader.Execute(), str(tmp_path / "dicom.nii.gz"))
    smallest = min(ct_dataset["unlabeled"].glob("*.nii.gz"), key=lambda f: f.stat().st_size)
    for src, case_id in ((smallest, "pool_" + smallest.name[:-len(".nii.gz")]),
                         (tmp_path / "dicom.nii.gz", "pool_example_ct_dicom")):
        ref_data, ref_seg, ref_props = DefaultPreprocessor(verbose=False).run_case(
            [str(src)], None, pm, cm, dataset_json)
        data, seg, props = _load(pool_folder, case_id)
        np.testing.assert_allclose(data, ref_data, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(seg, ref_seg)
        assert props["bbox_used_for_cropping"] == ref_props["bbox_used_for_cropping"]
        np.testing.assert_allclose(props["spacing"], ref_props["spacing"])


def test_pool_lists_labeled_and_unlabeled(ct_dataset):
    folder = ct_dataset["folder"]
    _, cm, _ = _managers(folder)
    ids = [i for _, i in list_pool(str(folder), cm.data_identifier, "all")]
    assert sorted(ids) == sorted(ct_dataset["cases"] + _expected_ids(ct_dataset))
    again = add_unlabeled(DATASET, str(ct_dataset["unlabeled"]), verbose=False)
    assert again["added"] == [] and len(again["already_present"]) == 4
