"""Checkpoints are read weights-only everywhere: a crafted file is refused and its code never runs."""
import json
import pickle

import numpy as np
import pytest
import torch

from nnunet_cl.checkpoints import check_pretrained, stock_network
from nnunet_cl.export import export_model
from nnunet_cl.safe_load import CorruptCheckpointError, UnsafeCheckpointError, load_checkpoint_file

from helpers import tiny_plans
from test_export import DATASET_JSON, _model_folder


class _WritesAFile:
    """Unpickling this calls open(marker, 'w'): what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _stock_weights():
    return stock_network(tiny_plans(), DATASET_JSON, "3d_fullres").state_dict()


def _crafted(path, marker):
    """An nnU-Net-looking checkpoint whose logging entry runs code when unpickled."""
    torch.save({"network_weights": _stock_weights(), "init_args": {"configuration": "3d_fullres"},
                "trainer_name": "nnUNetTrainer", "logging": _WritesAFile(marker)}, path)
    return path


def test_the_crafted_payload_really_runs_code_under_pickle(tmp_path):
    """Control: plain pickle executes the payload, so the refusals below are refusals of real code."""
    marker = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(_WritesAFile(marker))).close()
    assert marker.exists()


def test_loader_refuses_code_and_reads_nnunet_checkpoints(tmp_path):
    marker = tmp_path / "marker"
    bad = _crafted(tmp_path / "bad.pth", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"Refused to load .*bad\.pth: it asks for io\.open.*Fix: "):
        load_checkpoint_file(str(bad))
    assert not marker.exists()

    # what nnU-Net 2.8 writes: tensors, optimizer state, float64 scalars in the log, numpy arrays, tuples
    weights = _stock_weights()
    good = {"network_weights": weights, "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01}]},
            "grad_scaler_state": None, "current_epoch": 3, "_best_ema": np.float64(0.5),
            "logging": {"mean_fg_dice": [np.float64(0.1), np.float64(0.2)], "lrs": [0.01, 0.009]},
            "inference_allowed_mirroring_axes": (0, 1, 2), "init_args": {"configuration": "3d_fullres"},
            "trainer_name": "nnUNetTrainer", "nnunet_cl": {"extra": {"region_id": np.arange(5, dtype=np.int64),
                                                                    "centres": np.ones((2, 3), np.float32)}}}
    torch.save(good, tmp_path / "good.pth")
    loaded = load_checkpoint_file(str(tmp_path / "good.pth"))
    assert loaded["logging"]["mean_fg_dice"] == [0.1, 0.2] and type(loaded["_best_ema"]) is np.float64
    np.testing.assert_array_equal(loaded["nnunet_cl"]["extra"]["region_id"], np.arange(5))
    assert all(torch.equal(loaded["network_weights"][k], v) for k, v in weights.items())

    raw = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        load_checkpoint_file(str(tmp_path / "truncated.pth"))


def test_check_pretrained_refuses_a_crafted_checkpoint(nnunet_env, tmp_path, capsys, monkeypatch):
    folder = nnunet_env["nnUNet_preprocessed"] / "Dataset997_Tiny"
    folder.mkdir()
    (folder / "nnUNetPlans.json").write_text(json.dumps(tiny_plans()))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    marker = tmp_path / "marker"
    bad = _crafted(tmp_path / "bad.pth", marker)
    with pytest.raises(UnsafeCheckpointError, match="Refused to load"):
        check_pretrained(str(bad), "Dataset997_Tiny", "3d_fullres")
    assert not marker.exists()
    # the command line prints it as nnU-Net's commands do, no traceback
    import sys
    from nnunet_cl.checkpoints import main_check_pretrained
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_cl_check_pretrained", "-d", "Dataset997_Tiny", "-c", "3d_fullres",
                                      "-pretrained_weights", str(bad)])
    with pytest.raises(SystemExit, match=r"^nnUNetv2_cl_check_pretrained: error: Refused to load"):
        main_check_pretrained()
    assert not marker.exists()


def test_export_refuses_a_crafted_checkpoint(tmp_path):
    model = _model_folder(tmp_path, folds=(0,))
    marker = tmp_path / "marker"
    _crafted(model / "fold_0" / "checkpoint_final.pth", marker)
    out = tmp_path / "out"
    with pytest.raises(UnsafeCheckpointError, match="Refused to load .*checkpoint_final.pth"):
        export_model(str(model), str(out))
    assert not marker.exists() and not out.exists()
