"""End to end on real scribbles (ACDC cine MRI with the scribbles of Valvano et al., ../shared/data/ACDC_scribbles):
nnUNetv2_cl_scribbles_to_nnunet on 5 patients (10 volumes), nnU-Net plans and preprocesses, nnUNetTrainerPCLMix (a
tiny schedule on a small patch) trains with -device cpu, nnUNetv2_predict predicts with the stock network, and
nnUNetv2_evaluate_folder scores the prediction against the dense labels the conversion kept aside."""
import json

import pytest
import SimpleITK as sitk

from nnunet_cl.bench.design import BENCH_PLANS, write_bench_plans

from helpers import cli_env, run

DATASET = "Dataset966_ACDCScrib"
TRAINER = "nnUNetTrainerPCLMix_test"


@pytest.fixture(scope="module")
def acdc(tmp_path_factory, shared_data):
    source = shared_data / "ACDC_scribbles"
    if not source.is_dir():
        pytest.skip(f"ACDC scribbles not found at {source}")
    root = tmp_path_factory.mktemp("acdc")
    env = cli_env(root, ["pclmix_test_trainers.py"])
    out = run(["nnUNetv2_cl_scribbles_to_nnunet", "-i", str(source), "-d", "966", "-n", "ACDCScrib",
               "--max_patients", "5"], env).stdout
    run(["nnUNetv2_plan_and_preprocess", "-d", "966", "-c", "3d_fullres", "-np", "1"], env)
    pre = root / "nnUNet_preprocessed" / DATASET
    write_bench_plans(pre, patch=[8, 64, 64], batch_size=2, width=8, topology="planned")
    return {"root": root, "env": env, "convert_out": out, "pre": pre}


def test_conversion_keeps_dense_labels_aside_and_splits_by_patient(acdc):
    raw = acdc["root"] / "nnUNet_raw" / DATASET
    spec = json.loads((raw / "dataset.json").read_text())
    assert spec["labels"]["ignore"] == 4 and spec["numTraining"] == 10
    assert len(list((raw / "labelsTr_dense").iterdir())) == 10
    assert 0.001 < spec["scribbles"]["annotated_fraction"] < 0.05  # scribbles: about 1% of the voxels
    splits = json.loads((acdc["pre"] / "splits_final.json").read_text())
    for s in splits:  # written before planning, still there after it
        assert not {c.split("_")[0] for c in s["train"]} & {c.split("_")[0] for c in s["val"]}
    assert "nnUNetTrainerPCLMix" in acdc["convert_out"]  # the next commands are printed


def test_pclmix_trains_predicts_with_the_stock_network_and_is_scored_on_dense_labels(acdc, tmp_path):
    env, root = acdc["env"], acdc["root"]
    run(["nnUNetv2_train", "966", "3d_fullres", "0", "-tr", TRAINER, "-p", BENCH_PLANS, "-device", "cpu"], env)
    fold = root / "nnUNet_results" / DATASET / f"{TRAINER}__{BENCH_PLANS}__3d_fullres" / "fold_0"
    log = next(fold.glob("training_log_*.txt")).read_text()
    import ast
    epochs = [ast.literal_eval(line.split("contrastive ", 1)[1]) for line in log.splitlines() if "contrastive {" in line]
    assert len(epochs) == 2 and all(set(e) == {"total", "aux_decoder", "mix", "contrast", "consistency"} for e in epochs)
    assert epochs[-1]["contrast"] > 0  # the memory filled in the first epoch; the contrast ran in the second
    splits = json.loads((acdc["pre"] / "splits_final.json").read_text())
    val = splits[0]["val"][:2]
    test_in, out = tmp_path / "in", tmp_path / "out"
    test_in.mkdir()
    for case in val:
        (test_in / f"{case}_0000.nii.gz").symlink_to(root / "nnUNet_raw" / DATASET / "imagesTr" / f"{case}_0000.nii.gz")
    run(["nnUNetv2_predict", "-i", str(test_in), "-o", str(out), "-d", "966", "-c", "3d_fullres", "-tr", TRAINER,
         "-p", BENCH_PLANS, "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    for case in val:
        pred = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        ref = sitk.ReadImage(str(root / "nnUNet_raw" / DATASET / "labelsTr_dense" / f"{case}.nii.gz"))
        assert pred.GetSize() == ref.GetSize()
        assert set(sitk.GetArrayViewFromImage(pred).ravel().tolist()) <= {0, 1, 2, 3}  # never the ignore label
    run(["nnUNetv2_evaluate_folder", str(root / "nnUNet_raw" / DATASET / "labelsTr_dense"), str(out), "-djfile",
         str(root / "nnUNet_raw" / DATASET / "dataset.json"), "-pfile",
         str(acdc["pre"] / f"{BENCH_PLANS}.json"), "-np", "1", "--chill"], env)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2", "3"} and len(summary["metric_per_case"]) == 2
    assert all(0 <= summary["mean"][c]["Dice"] <= 1 for c in ("1", "2", "3"))
