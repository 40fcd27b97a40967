"""End to end through the real command lines on real MRI (MSD Task04 hippocampus, ../shared/data).

8 labeled cases + 20 other hippocampus images as the unlabeled pool; nnU-Net plans and preprocesses; the
staged SimCLR trainer pretrains and fine-tunes with tiny epochs on -device cpu; nnUNetv2_predict works through
the extension; the exported model predicts identically with stock nnU-Net (extension made unimportable);
-pretrained_weights and --c round trips. Tiny schedules live in tests/ext_trainers (a second
nnUNet_extTrainer path, as a user's own variants would).
"""
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_cl.safe_load import load_checkpoint_file


from helpers import cli_env, run

DATASET = "Dataset905_HippoCL"
TRAINER = "nnUNetTrainerSimCLR_test"




@pytest.fixture(scope="module")
def hippo(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("e2e")
    env = cli_env(root, ["nnunet_cl_test_trainers.py"])
    run(["nnUNetv2_convert_MSD_dataset", "-i", str(shared_data / "Task04_Hippocampus"), "-np", "1"], env)
    msd = root / "nnUNet_raw" / "Dataset004_Hippocampus"
    raw = root / "nnUNet_raw" / DATASET
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    cases = sorted(p.name[:-12] for p in (msd / "imagesTr").glob("*_0000.nii.gz"))
    for c in cases[:8]:
        shutil.copy(msd / "imagesTr" / f"{c}_0000.nii.gz", raw / "imagesTr")
        shutil.copy(msd / "labelsTr" / f"{c}.nii.gz", raw / "labelsTr")
    unlabeled, test_in = root / "unlabeled", root / "test_in"
    unlabeled.mkdir(), test_in.mkdir()
    for c in cases[8:28]:
        shutil.copy(msd / "imagesTr" / f"{c}_0000.nii.gz", unlabeled / f"{c}.nii.gz")
    for c in cases[28:30]:  # two held-out images to predict
        shutil.copy(msd / "imagesTr" / f"{c}_0000.nii.gz", test_in)
    dataset_json = json.loads((msd / "dataset.json").read_text())
    dataset_json["numTraining"] = 8
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    shutil.rmtree(msd)
    run(["nnUNetv2_plan_and_preprocess", "-d", "905", "-c", "3d_fullres", "-np", "1"], env)
    return {"root": root, "env": env, "unlabeled": unlabeled, "test_in": test_in}


def model_folder(hippo, trainer):
    return hippo["root"] / "nnUNet_results" / DATASET / f"{trainer}__nnUNetPlans__3d_fullres"


def test_pool_ingestion_cli(hippo):
    out = run(["nnUNetv2_cl_add_unlabeled", "-d", "905", "-i", str(hippo["unlabeled"])], hippo["env"]).stdout
    pool = json.loads((hippo["root"] / "nnUNet_preprocessed" / DATASET / "nnunet_cl_pool" / "pool.json").read_text())
    assert len(pool) == 20, out
    again = run(["nnUNetv2_cl_add_unlabeled", "-d", "905", "-i", str(hippo["unlabeled"])], hippo["env"]).stdout
    assert "Added: 0" in again


def test_limited_split_cli(hippo):
    run(["nnUNetv2_cl_limited_split", "-d", "905", "-k", "4", "--seed", "0"], hippo["env"])
    splits = json.loads((hippo["root"] / "nnUNet_preprocessed" / DATASET / "splits_final.json").read_text())
    assert all(len(s["train"]) == 4 and len(s["val"]) >= 1 for s in splits)


@pytest.fixture(scope="module")
def staged_run(hippo):
    test_pool_ingestion_cli(hippo)  # the pool must exist before pretraining
    test_limited_split_cli(hippo)
    proc = run(["nnUNetv2_train", "905", "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"], hippo["env"])
    return proc


def test_staged_training_logs_and_checkpoints(hippo, staged_run):
    fold = model_folder(hippo, TRAINER) / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "checkpoint_pretrained.pth").is_file()
    assert (fold / "progress.png").is_file()
    ckpt = load_checkpoint_file(fold / "checkpoint_final.pth")
    assert ckpt["trainer_name"] == TRAINER and ckpt["current_epoch"] == 4
    assert set(ckpt["nnunet_cl"]["cl_modules"]) >= {"projector.0.weight", "local.0.weight"}
    assert not any(k.startswith(("projector", "local")) for k in ckpt["network_weights"])
    log = ckpt["logging"]
    infonce = np.array(log["cl_infonce"], dtype=float)
    assert np.isfinite(infonce[:2]).all() and np.isnan(infonce[2:]).all()  # pretraining epochs only
    assert np.isnan(log["mean_fg_dice"][:2]).all() and np.isfinite(log["mean_fg_dice"][2:]).all()
    assert np.isfinite(log["ema_fg_dice"][2:]).all()
    assert "Stage switch at epoch 2" in staged_run.stdout
    assert "pool: 26 cases" in staged_run.stdout  # 20 ingested + the 6 labeled-dataset images outside validation


def test_predict_export_and_stock_predict_identical(hippo, staged_run, tmp_path):
    env = hippo["env"]
    ours = tmp_path / "ours"
    run(["nnUNetv2_predict", "-i", str(hippo["test_in"]), "-o", str(ours), "-d", "905", "-c", "3d_fullres",
         "-tr", TRAINER, "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    exported = tmp_path / "exported"
    run(["nnUNetv2_cl_export", "-d", "905", "-tr", TRAINER, "-c", "3d_fullres", "-f", "0", "-o", str(exported)], env)
    # stock nnU-Net: no extTrainer variable, and importing the extension fails loudly
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    for mod in ("nnunet_cl", "nnunet_cl_trainers"):
        (blocker / f"{mod}.py").write_text("raise ImportError('extension must not be needed')\n")
    stock_env = {k: v for k, v in env.items() if k != "nnUNet_extTrainer"}
    stock_env["PYTHONPATH"] = str(blocker)
    stock = tmp_path / "stock"
    run(["nnUNetv2_predict_from_modelfolder", "-i", str(hippo["test_in"]), "-o", str(stock), "-m", str(exported),
         "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], stock_env)
    files = sorted(p.name for p in ours.glob("*.nii.gz"))
    assert len(files) == 2 and files == sorted(p.name for p in stock.glob("*.nii.gz"))
    for name in files:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(ours / name)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(stock / name)))
        assert np.array_equal(a, b)
    # without the variable, stock nnU-Net cannot find our trainer: that is why export exists
    proc = run(["nnUNetv2_predict", "-i", str(hippo["test_in"]), "-o", str(tmp_path / "x"), "-d", "905",
                "-c", "3d_fullres", "-tr", TRAINER, "-f", "0", "-device", "cpu"], stock_env, check=False)
    assert proc.returncode != 0 and "Could not find requested nnunet trainer" in proc.stderr, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def dclseg_run(hippo, staged_run):
    """The composition docs/methods/dclseg.md gives: one nnUNetv2_train -tr nnUNetTrainerDCLSeg command with
    -pretrained_weights of a pretraining run (here SimCLR's), on -device cpu."""
    pretrained = model_folder(hippo, TRAINER) / "fold_0" / "checkpoint_pretrained.pth"
    proc = run(["nnUNetv2_train", "905", "3d_fullres", "0", "-tr", "nnUNetTrainerDCLSeg_test", "-device", "cpu",
                "-pretrained_weights", str(pretrained)], hippo["env"])
    return proc, pretrained


def test_dclseg_fine_tunes_from_another_methods_pretraining_and_predicts(hippo, dclseg_run, tmp_path):
    env = hippo["env"]
    proc, pretrained = dclseg_run
    assert f"Loading pretrained weights from file  {pretrained}" in proc.stdout
    fold = model_folder(hippo, "nnUNetTrainerDCLSeg_test") / "fold_0"
    ckpt = load_checkpoint_file(fold / "checkpoint_final.pth")
    log = ckpt["logging"]
    for key in ("cl_contrast", "cl_structure", "mean_fg_dice"):
        assert len(log[key]) == 2 and np.isfinite(log[key]).all(), (key, log[key])
    assert set(ckpt["nnunet_cl"]["extra_optimizers"]) == {"generator"}
    assert not any(k.startswith(("generator", "head")) for k in ckpt["network_weights"])
    assert not [line for line in proc.stdout.splitlines() if "contrastive" in line and "nan" in line]
    out = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(hippo["test_in"]), "-o", str(out), "-d", "905", "-c", "3d_fullres",
         "-tr", "nnUNetTrainerDCLSeg_test", "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
        env)
    predictions = sorted(out.glob("*.nii.gz"))
    assert len(predictions) == 2
    for p in predictions:
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(p))))) <= {0, 1, 2}


def test_robustness_command_scores_two_models_under_shifts(hippo, dclseg_run, tmp_path):
    """nnUNetv2_cl_robustness on two labeled cases: every condition scored for both models, the table with the
    goal check, the plot; a rerun reuses everything; a test folder without labels is refused with the fix."""
    raw = hippo["root"] / "nnUNet_raw" / DATASET
    images, labels = tmp_path / "imagesTs", tmp_path / "labelsTs"
    images.mkdir(), labels.mkdir()
    for p in sorted((raw / "labelsTr").glob("*.nii.gz"))[:2]:
        shutil.copy(p, labels / p.name)
        shutil.copy(raw / "imagesTr" / p.name.replace(".nii.gz", "_0000.nii.gz"), images)
    models = [f"simclr={model_folder(hippo, TRAINER)}", f"dclseg={model_folder(hippo, 'nnUNetTrainerDCLSeg_test')}"]
    out = tmp_path / "robust"
    cmd = ["nnUNetv2_cl_robustness", "-i", str(images), "-l", str(labels), "-m", *models, "-o", str(out),
           "--shifts", "noise"]
    run(cmd, hippo["env"])
    result = json.loads((out / "robustness.json").read_text())
    conds = ["clean", "noise_0.05", "noise_0.1", "noise_0.2"]
    for model in ("simclr", "dclseg"):
        assert list(result["dice"][model]) == conds
        assert all(len(result["dice"][model][c]) == 2 for c in conds)
        assert all(0 <= d <= 1 for c in conds for case in result["dice"][model][c].values() for d in case
                   if d == d)
    table = (out / "robustness.md").read_text()
    assert "| noise_0.2 |" in table and "goal (<= 0.5)" in table and (out / "robustness.png").stat().st_size > 0
    clean = sitk.GetArrayFromImage(sitk.ReadImage(str(next((out / "images" / "clean").glob("*.nii.gz")))))
    noisy = sitk.GetArrayFromImage(sitk.ReadImage(str(next((out / "images" / "noise_0.2").glob("*.nii.gz")))))
    assert clean.shape == noisy.shape and 0.1 * clean.std() < (noisy - clean).std() < 0.3 * clean.std()
    again = run(cmd, hippo["env"])  # everything reused: nothing predicted, the same table
    assert "would like to predict" not in again.stdout and (out / "robustness.md").read_text() == table
    (labels / sorted(p.name for p in labels.iterdir())[0]).unlink()
    refused = run(cmd, hippo["env"], check=False)
    assert refused.returncode != 0 and "have no label" in refused.stderr and "Fix:" in refused.stderr


def test_pretrained_weights_round_trip(hippo, staged_run):
    env = hippo["env"]
    run(["nnUNetv2_train", "905", "3d_fullres", "0", "-tr", "nnUNetTrainerSimCLRPretrain_test", "-device", "cpu"],
        env)
    ckpt_file = model_folder(hippo, "nnUNetTrainerSimCLRPretrain_test") / "fold_0" / "checkpoint_final.pth"
    ok = run(["nnUNetv2_cl_check_pretrained", "-d", "905", "-c", "3d_fullres", "-pretrained_weights",
              str(ckpt_file)], env)
    assert ok.stdout.startswith("OK")
    proc = run(["nnUNetv2_train", "905", "3d_fullres", "0", "-tr", "nnUNetTrainer_clTest", "-device", "cpu",
                "-pretrained_weights", str(ckpt_file)], env)
    assert "Loading pretrained weights from file" in proc.stdout
    # a damaged checkpoint is reported key by key, not with nnU-Net's first-key assertion
    bad = load_checkpoint_file(ckpt_file)
    first = next(k for k in bad["network_weights"] if "encoder" in k and k.endswith("weight"))
    bad["network_weights"][first] = torch.zeros(3, 3)
    bad["network_weights"].pop(next(k for k in bad["network_weights"] if "decoder.stages" in k))
    bad_file = hippo["root"] / "bad.pth"
    torch.save(bad, bad_file)
    proc = run(["nnUNetv2_cl_check_pretrained", "-d", "905", "-c", "3d_fullres", "-pretrained_weights",
                str(bad_file)], env, check=False)
    assert proc.returncode != 0 and "2 mismatches" in proc.stdout and first in proc.stdout
    assert "Fix:" in proc.stderr


def test_resume_with_c_continues_into_finetuning(hippo, staged_run):
    fold = model_folder(hippo, TRAINER) / "fold_0"
    final = load_checkpoint_file(fold / "checkpoint_final.pth")
    for f in ("checkpoint_final.pth", "checkpoint_best.pth"):
        (fold / f).unlink()
    shutil.copy(fold / "checkpoint_pretrained.pth", fold / "checkpoint_latest.pth")  # as left after a crash
    proc = run(["nnUNetv2_train", "905", "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu", "--c"], hippo["env"])
    assert "Epoch 2 (finetune epoch 0)" in proc.stdout and "Epoch 0 " not in proc.stdout
    resumed = load_checkpoint_file(fold / "checkpoint_final.pth")
    assert resumed["current_epoch"] == 4
    # pretraining history survived the resume; the heads are those of the pretraining checkpoint
    assert resumed["logging"]["cl_infonce"][:2] == final["logging"]["cl_infonce"][:2]
    pre = load_checkpoint_file(fold / "checkpoint_pretrained.pth")
    for k, v in pre["nnunet_cl"]["cl_modules"].items():
        assert torch.equal(v, resumed["nnunet_cl"]["cl_modules"][k])


def test_torchrun_two_cpu_processes_train_and_validate(hippo, staged_run):
    """The documented multi-process command: torchrun starts 2 gloo ranks on CPU, each takes half of the pool
    (shard) and of nnU-Net's batch; the run pretrains, fine-tunes and validates as one process does."""
    env = dict(hippo["env"], OMP_NUM_THREADS="1")
    proc = run(["torchrun", "--standalone", "--nproc_per_node", "2", "--no-python", "nnUNetv2_cl_train", "905",
                "3d_fullres", "1", "-tr", TRAINER, "-device", "cpu"], env)
    out = proc.stdout
    assert "The world size is 2" in out and "pool: 13 cases" in out, out[-3000:]  # 26 cases, half per rank
    fold = model_folder(hippo, TRAINER) / "fold_1"
    ckpt = load_checkpoint_file(str(fold / "checkpoint_final.pth"))
    assert ckpt["current_epoch"] == 4 and np.isfinite(ckpt["logging"]["cl_infonce"][:2]).all()
    assert (fold / "validation" / "summary.json").is_file()


def test_nnunetv2_cl_train_refuses_pretrained_weights_that_carry_code(hippo, staged_run, tmp_path):
    marker = tmp_path / "code_ran"
    crafted = tmp_path / "crafted.pth"
    torch.save({"network_weights": {}, "x": _WritesAFile(str(marker))}, crafted)
    proc = run(["nnUNetv2_cl_train", "905", "3d_fullres", "0", "-tr", "nnUNetTrainer_clTest", "-device", "cpu",
                "-pretrained_weights", str(crafted)], hippo["env"], check=False)
    assert proc.returncode != 0 and "Refused to load" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()


class _WritesAFile:
    """Unpickling this writes a file: what a hostile checkpoint could do with weights_only=False."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def _children(pid: int) -> set[int]:
    """Every live descendant of pid (from /proc)."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = {int(c) for c in f.read().split()}
                todo += list(kids - found)
                found |= kids
        except FileNotFoundError:
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads child processes from /proc (Linux)")
def test_no_worker_of_a_training_run_outlives_its_sigterm(hippo, staged_run, tmp_path):
    """A real `nnUNetv2_train` with 2 augmentation workers, ended by SIGTERM while it pretrains."""
    env = dict(hippo["env"], nnUNet_n_proc_DA="2")
    log = open(tmp_path / "train.log", "w")
    proc = subprocess.Popen(["nnUNetv2_train", "905", "3d_fullres", "2", "-tr", TRAINER, "-device", "cpu"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and "Epoch 0 " not in (tmp_path / "train.log").read_text():
            time.sleep(0.5)
        time.sleep(3)  # the workers of the pool loader are up
        workers = _children(proc.pid)
        assert len(workers) >= 2, (tmp_path / "train.log").read_text()[-2000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.time() + 15
        while time.time() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.2)
        assert not [p for p in workers if _alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in _children(proc.pid):
            os.kill(p, signal.SIGKILL)
        log.close()
