"""Every method family's `_quick` variant, found by name as `-tr` finds it and trained to the end on real MRI.

In-process: nnU-Net's own `run_training` (what `nnUNetv2_train D 3d_fullres 0 -tr T -device cpu` calls) on MSD
Task04 hippocampus from ../shared/data: 6 labeled cases (fold 0: 5 to train, 1 to validate), 2 unlabeled
images for the pool, and the benchmark's smaller plans (patch 16x32x32, width 8) so that the six runs fit the test
suite. Each run goes through its whole
schedule (SepaReg's separation, SuperCL's supervoxels, every stage) and nnU-Net's final validation.
"""
import json
import shutil

import pytest
import torch

from nnunet_cl.bench.design import BENCH_PLANS, write_bench_plans
from nnunet_cl.checkpoints import stock_network
from nnunet_cl.safe_load import load_checkpoint_file

from helpers import cli_env, run

DATASET_ID, DATASET = "908", "Dataset908_HippoQuick"
QUICK = ["nnUNetTrainerSimCLR_quick", "nnUNetTrainerPolyCL_quick", "nnUNetTrainerSepaReg_quick",
         "nnUNetTrainerSuperCL_quick", "nnUNetTrainerDCLSeg_quick", "nnUNetTrainerPCLMix_quick"]


@pytest.fixture(scope="module")
def hippo(tmp_path_factory, shared_data):
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    root = tmp_path_factory.mktemp("quick")
    env = cli_env(root)
    src = shared_data / "Task04_Hippocampus"
    images = sorted((src / "imagesTr").glob("hippocampus_*.nii.gz"))
    raw = root / "nnUNet_raw" / DATASET
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    unlabeled = root / "unlabeled"
    unlabeled.mkdir()
    for p in images[:6]:
        shutil.copy(p, raw / "imagesTr" / p.name.replace(".nii.gz", "_0000.nii.gz"))
        shutil.copy(src / "labelsTr" / p.name, raw / "labelsTr" / p.name)
    for p in images[6:8]:
        shutil.copy(p, unlabeled / p.name)
    generate_dataset_json(str(raw), {0: "MRI"}, {"background": 0, "Anterior": 1, "Posterior": 2}, 6, ".nii.gz",
                          dataset_name=DATASET)
    run(["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-np", "1"], env)
    run(["nnUNetv2_cl_add_unlabeled", "-d", DATASET_ID, "-i", str(unlabeled), "-np", "1"], env)
    # fold 0: 5 training cases, 1 validation case (nnU-Net's final validation predicts it with mirroring)
    cases = sorted(p.name.replace(".nii.gz", "") for p in images[:6])
    (root / "nnUNet_preprocessed" / DATASET / "splits_final.json").write_text(
        json.dumps([{"train": cases[:5], "val": cases[5:]}]))
    write_bench_plans(root / "nnUNet_preprocessed" / DATASET, patch=[16, 32, 32], batch_size=2, width=8,
                      topology="planned")
    return {"root": root, "env": env}


@pytest.fixture
def nnunet_in_process(hippo, monkeypatch):
    """This process's nnU-Net pointed at the fixture's folders (nnU-Net 2.8.1 reads its path variables from the
    environment at each use, as a fresh `nnUNetv2_train` would find them exported)."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_n_proc_DA",
                 "nnUNet_def_n_proc", "nnUNet_compile"):
        monkeypatch.setenv(name, hippo["env"][name])
    return hippo


@pytest.mark.parametrize("trainer_name", QUICK)
def test_quick_variant_is_found_by_name_and_runs_to_the_end(nnunet_in_process, trainer_name, monkeypatch, tmp_path):
    from nnunetv2.run.run_training import get_trainer_from_args, run_training
    run_training(DATASET_ID, "3d_fullres", 0, trainer_name, plans_identifier=BENCH_PLANS, device=torch.device("cpu"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path))  # the schedule, from a trainer that writes its log elsewhere
    planned = get_trainer_from_args(DATASET_ID, "3d_fullres", 0, trainer_name, BENCH_PLANS,
                                    device=torch.device("cpu"))
    fold = nnunet_in_process["root"] / "nnUNet_results" / DATASET / f"{trainer_name}__{BENCH_PLANS}__3d_fullres" / \
        "fold_0"
    ckpt = load_checkpoint_file(fold / "checkpoint_final.pth")
    assert ckpt["trainer_name"] == trainer_name
    assert ckpt["current_epoch"] == planned.num_epochs_total <= 12  # nnU-Net saves the count of epochs done
    assert len(ckpt["logging"]["train_losses"]) == planned.num_epochs_total
    assert (fold / "validation" / "summary.json").is_file()  # nnU-Net's final validation ran
    # every epoch's log lines are plain numbers: no nan for a term a stage does not use (pretraining epochs too)
    log = next(fold.glob("training_log_*.txt")).read_text()
    epoch_lines = [line for line in log.splitlines() if "contrastive {" in line or "train_loss" in line]
    assert len(epoch_lines) >= planned.num_epochs_total
    assert not [line for line in epoch_lines if "nan" in line or "np.float" in line]
    # the stock network's weights only: loadable by plain nnU-Net
    stock = stock_network(planned.plans_manager.plans, planned.dataset_json, "3d_fullres").state_dict()
    assert ckpt["network_weights"].keys() == stock.keys()
