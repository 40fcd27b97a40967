"""SuperCL end to end on real MRI (MSD Task04 hippocampus, ../shared/data) through nnU-Net's commands on CPU.

8 labeled cases (4 in the fold's training split) and 8 unlabeled images as the pool. Pretraining only (the
positional instance term) computes the supervoxel cache; the staged trainer then reuses it, pretrains, fine-tunes
and validates; nnUNetv2_predict predicts two held-out images; nnUNetv2_cl_supercl_preview draws a case. The real
loader's supervoxel maps are checked against the augmented image they come with.
"""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_cl.safe_load import load_checkpoint_file

from helpers import cli_env, run

DATASET_ID, DATASET = "907", "Dataset907_HippoSuperCL"
TRAINER, PRETRAINER = "nnUNetTrainerSuperCL_test", "nnUNetTrainerSuperCLPretrain_test"


@pytest.fixture(scope="module")
def hippo(tmp_path_factory, shared_data):
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    root = tmp_path_factory.mktemp("supercl_e2e")
    env = cli_env(root, ["supercl_test_trainers.py"])
    src = shared_data / "Task04_Hippocampus"
    images = sorted((src / "imagesTr").glob("hippocampus_*.nii.gz"))
    raw = root / "nnUNet_raw" / DATASET
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    unlabeled, test_in = root / "unlabeled", root / "test_in"
    unlabeled.mkdir(), test_in.mkdir()
    for p in images[:8]:
        shutil.copy(p, raw / "imagesTr" / p.name.replace(".nii.gz", "_0000.nii.gz"))
        shutil.copy(src / "labelsTr" / p.name, raw / "labelsTr" / p.name)
    for p in images[8:16]:
        shutil.copy(p, unlabeled / p.name)
    for p in images[16:18]:
        shutil.copy(p, test_in / p.name.replace(".nii.gz", "_0000.nii.gz"))
    generate_dataset_json(str(raw), {0: "MRI"}, {"background": 0, "Anterior": 1, "Posterior": 2}, 8, ".nii.gz",
                          dataset_name=DATASET)
    run(["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-np", "1"], env)
    run(["nnUNetv2_cl_add_unlabeled", "-d", DATASET_ID, "-i", str(unlabeled), "-np", "1"], env)
    run(["nnUNetv2_cl_limited_split", "-d", DATASET_ID, "-k", "4", "--seed", "0"], env)
    return {"root": root, "env": env, "test_in": test_in, "pre": root / "nnUNet_preprocessed" / DATASET}


def _fold(hippo, trainer):
    return hippo["root"] / "nnUNet_results" / DATASET / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"


@pytest.fixture(scope="module")
def pretrain_run(hippo):
    return run(["nnUNetv2_train", DATASET_ID, "3d_fullres", "0", "-tr", PRETRAINER, "-device", "cpu"], hippo["env"])


@pytest.fixture(scope="module")
def staged_run(hippo, pretrain_run):
    return run(["nnUNetv2_train", DATASET_ID, "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"], hippo["env"])


def test_pretraining_computes_the_supervoxels_once(hippo, pretrain_run, staged_run):
    val = json.loads((hippo["pre"] / "splits_final.json").read_text())[0]["val"]
    n_pool = 8 + (8 - len(val))  # the ingested images and the labeled dataset's images outside fold 0's validation
    cache = hippo["pre"] / "nnunet_cl_supercl" / "nnUNetPlans_3d_fullres"
    assert len(list(cache.glob("*.npz"))) == n_pool
    assert f"SuperCL supervoxels: {n_pool} case(s)" in pretrain_run.stdout
    assert "epoch 0: step 1/2, " in pretrain_run.stdout and "left in this epoch" in pretrain_run.stdout
    assert "SuperCL supervoxels:" not in staged_run.stdout  # the staged run reuses the cache
    assert f"Pretraining pool: {n_pool} cases, 4 patches of" in staged_run.stdout
    ckpt = load_checkpoint_file(_fold(hippo, PRETRAINER) / "checkpoint_final.pth")
    assert np.isfinite(ckpt["logging"]["cl_ins"]).all() and np.isfinite(ckpt["logging"]["cl_inter"]).all()


def test_staged_training_validates_and_keeps_the_stock_network(hippo, staged_run):
    fold = _fold(hippo, TRAINER)
    ckpt = load_checkpoint_file(fold / "checkpoint_final.pth")
    assert ckpt["current_epoch"] == 3 and (fold / "checkpoint_pretrained.pth").is_file()
    modules = set(ckpt["nnunet_cl"]["cl_modules"])
    assert {"queue.embedding", "queue.asp", "local_enc.0.weight", "local_dec.2.weight",
            "instance.projector.0.weight"} <= modules
    assert int(ckpt["nnunet_cl"]["cl_modules"]["queue.count"]) == 16  # 2 x 2 steps x 4 patches x 2 views, full
    assert not any(k.startswith(("queue", "local_", "instance")) for k in ckpt["network_weights"])
    log = ckpt["logging"]
    for term in ("cl_ins", "cl_intra", "cl_inter"):
        values = np.array(log[term], dtype=float)
        assert np.isfinite(values[:2]).all() and (values[:2] > 0).all() and np.isnan(values[2:]).all(), term
    assert np.isfinite(log["mean_fg_dice"][2])
    assert "Stage switch at epoch 2" in staged_run.stdout
    # no term a stage does not use shows up as nan in the log lines of either stage
    loss_lines = [line for line in staged_run.stdout.splitlines() if "contrastive" in line or "train_loss" in line]
    assert len(loss_lines) >= 3 and not any("nan" in line.lower() for line in loss_lines)
    assert (fold / "validation" / "summary.json").is_file()


def test_predict(hippo, staged_run, tmp_path):
    out = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(hippo["test_in"]), "-o", str(out), "-d", DATASET_ID, "-c", "3d_fullres",
         "-tr", TRAINER, "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], hippo["env"])
    for image_file in sorted(hippo["test_in"].glob("*_0000.nii.gz")):
        image = sitk.ReadImage(str(image_file))
        pred = sitk.ReadImage(str(out / image_file.name.replace("_0000.nii.gz", ".nii.gz")))
        assert pred.GetSize() == image.GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2}


def test_preview_draws_a_case(hippo, tmp_path):
    png = tmp_path / "sv.png"
    out = run(["nnUNetv2_cl_supercl_preview", "-d", DATASET_ID, "-o", str(png)], hippo["env"]).stdout
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "supervoxels (requested" in out and "pool_" in out
    bad = run(["nnUNetv2_cl_supercl_preview", "-d", DATASET_ID, "-o", str(png), "--case", "nope"], hippo["env"],
              check=False)
    assert bad.returncode != 0 and "Fix: pass one of them with --case" in bad.stderr


def test_real_batches_carry_aligned_supervoxel_maps(hippo, monkeypatch, pretrain_run):
    """Each augmented patch's map: ids of its own case only, 0 in the padding, and aligned with the image: the
    image varies less inside the map's supervoxels than inside the same map moved by 4 voxels."""
    from nnunet_cl_trainers.supercl import nnUNetTrainerSuperCL
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, hippo["env"][k])
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    plans = json.loads((hippo["pre"] / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    trainer = nnUNetTrainerSuperCL(plans, "3d_fullres", 0, json.loads((hippo["pre"] / "dataset.json").read_text()),
                                   torch.device("cpu"))
    trainer.initialize()
    loader = trainer.get_pretrain_dataloader()
    patch, n = trainer.get_pretrain_patch_size(), trainer.get_pretrain_batch_size()
    # the default batch: as many patches as fit, with both views, into the voxels of the plans' batch (here 4)
    plans_voxels = trainer.configuration_manager.batch_size * np.prod(trainer.configuration_manager.patch_size)
    assert 2 * n * np.prod(patch) <= plans_voxels < 2 * (n + 1) * np.prod(patch) and n >= 4
    np.random.seed(0)
    ratios = []
    for _ in range(3):
        b = next(loader)
        assert b["data"].shape == (n, 1, *patch) and b["supervoxels"].shape == (n, *patch)
        assert b["seeds"].shape == (n,) and bool(((b["position"] >= 0) & (b["position"] <= 1)).all())
        for img, sv in zip(b["data"][:, 0], b["supervoxels"]):
            ids = sv[sv > 0]
            assert ids.numel() > 0.3 * sv.numel()
            def within(labels):
                lab, x = labels.flatten(), img.flatten()
                keep = lab > 0
                lab, x = lab[keep], x[keep]
                n = torch.bincount(lab).clamp_min(1).double()
                mean = torch.bincount(lab, x.double()) / n
                return float(((x.double() - mean[lab]) ** 2).mean())
            ratios.append(within(sv) / within(torch.roll(sv, 4, dims=1)))
    assert np.median(ratios) < 0.8, ratios
    terms = trainer.pretrain_losses(trainer.prepare_batch(b))
    assert set(terms) == {"ins", "intra", "inter"} and all(torch.isfinite(v) for v in terms.values())
