"""nnunet_cl.export on a hand-made model folder: what is exported, and bad input refused before anything is written."""
import json

import pytest
import torch

from nnunet_cl.checkpoints import stock_network
from nnunet_cl.export import export_model
from nnunet_cl.paths import NnUNetCLError

from helpers import tiny_plans

DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 4,
                "file_ending": ".nii.gz"}


def _model_folder(root, folds=(0, 1), extra_key=None):
    """A model folder as nnUNetv2_train leaves it for an nnunet-cl trainer: stock weights plus the heads' entry."""
    folder = root / "nnUNetTrainerSimCLR__nnUNetPlans__3d_fullres"
    folder.mkdir(parents=True)
    plans = tiny_plans()
    for name, content in (("plans.json", plans), ("dataset.json", DATASET_JSON), ("dataset_fingerprint.json", {})):
        (folder / name).write_text(json.dumps(content))
    weights = stock_network(plans, DATASET_JSON, "3d_fullres").state_dict()
    if extra_key:
        weights[extra_key] = torch.zeros(1)
    for f in folds:
        (folder / f"fold_{f}").mkdir()
        torch.save({"network_weights": weights, "init_args": {"configuration": "3d_fullres"},
                    "trainer_name": "nnUNetTrainerSimCLR", "nnunet_cl": {"heads": {"w": torch.ones(2)}}},
                   folder / f"fold_{f}" / "checkpoint_final.pth")
    return folder


def test_export_gives_plain_nnunet_checkpoints(tmp_path):
    out = tmp_path / "out"
    export_model(str(_model_folder(tmp_path)), str(out), folds=["1"])
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "dataset_fingerprint.json", "fold_1",
                                                     "nnunet_cl_export.json", "plans.json"]
    ckpt = torch.load(out / "fold_1" / "checkpoint_final.pth", weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainer" and "nnunet_cl" not in ckpt
    assert json.loads((out / "nnunet_cl_export.json").read_text())["source_trainer"] == "nnUNetTrainerSimCLR"


def test_missing_folds_are_named_and_nothing_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(NnUNetCLError, match=r"has no fold_3 \(it has: fold_0, fold_1\)\. Fix: pass -f"):
        export_model(str(_model_folder(tmp_path)), str(out), folds=["0", "3"])
    assert not out.exists()


def test_missing_checkpoint_lists_the_folds_searched(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(NnUNetCLError, match=r"No checkpoint_best.pth found .*\(fold_0, fold_1\)\. Fix: "):
        export_model(str(_model_folder(tmp_path)), str(out), checkpoint_names=("checkpoint_best.pth",))
    assert not out.exists()


def test_non_stock_weights_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(NnUNetCLError, match="does not hold a stock nnU-Net network:\n  unexpected projector.w"):
        export_model(str(_model_folder(tmp_path, extra_key="projector.w")), str(out))
    assert not out.exists()
