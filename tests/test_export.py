"""nnunet_cl.export on a hand-made model folder: what is exported, and bad input refused before anything is written."""
import json

import pytest
import torch

from nnunet_cl.checkpoints import stock_network
from nnunet_cl.export import export_model
from nnunet_cl.paths import NnUNetCLError
from nnunet_cl.safe_load import load_checkpoint_file

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
    ckpt = load_checkpoint_file(str(out / "fold_1" / "checkpoint_final.pth"))
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


def test_non_empty_output_is_refused_unless_overwrite(tmp_path):
    model = _model_folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(NnUNetCLError, match=r"Output folder .*out is not empty.*Fix: .*--overwrite"):
        export_model(str(model), str(out))
    # --overwrite replaces an earlier export only: a folder that holds none is refused, nothing deleted
    with pytest.raises(NnUNetCLError, match="holds no earlier export.*Fix: choose an empty or new -o"):
        export_model(str(model), str(out), overwrite=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    export_model(str(model), str(out), folds=["0", "1"])
    (out / "notes.txt").write_text("mine")
    # a second export of one fold replaces the first: fold_1 of the earlier export does not linger
    export_model(str(model), str(out), folds=["0"], overwrite=True)
    assert sorted(p.name for p in out.glob("fold_*")) == ["fold_0"]
    assert (out / "notes.txt").read_text() == "mine"  # not ours, kept
    with pytest.raises(NnUNetCLError, match="is the model folder itself"):
        export_model(str(model), str(model), overwrite=True)
    other = _model_folder(tmp_path / "another")  # a trained model folder as -o: its checkpoints are not ours
    with pytest.raises(NnUNetCLError, match="holds no earlier export"):
        export_model(str(model), str(other), overwrite=True)
    assert (model / "fold_1" / "checkpoint_final.pth").is_file()
    assert (other / "fold_1" / "checkpoint_final.pth").is_file()


def test_printed_predict_command_names_folds_and_checkpoint(tmp_path, monkeypatch, capsys):
    """The printed line is nnUNetv2_predict_from_modelfolder's own arguments: -f always, -chk when not final."""
    import sys

    from nnunet_cl.export import main_export
    results = tmp_path / "results"
    monkeypatch.setenv("nnUNet_results", str(results))
    model = _model_folder(results / "Dataset997_Tiny")
    for f in (0, 1):
        (model / f"fold_{f}" / "checkpoint_final.pth").rename(model / f"fold_{f}" / "checkpoint_best.pth")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_cl_export", "-d", "Dataset997_Tiny", "-tr", "nnUNetTrainerSimCLR",
                                      "-c", "3d_fullres", "-chk", "checkpoint_best.pth", "-o", str(out)])
    main_export()
    lines = [ln.strip() for ln in capsys.readouterr().out.splitlines() if "predict_from_modelfolder" in ln]
    assert lines == [f"nnUNetv2_predict_from_modelfolder -m {out} -i INPUT -o OUTPUT -f 0 1 -chk checkpoint_best.pth"]
    # nnU-Net's own command initialises from exactly those arguments (prediction itself is stubbed out)
    from nnunetv2.inference import predict_from_raw_data
    seen = {}

    def stop(self, *args, **kwargs):
        seen.update(folds=self.list_of_parameters, trainer=self.trainer_name)
        raise SystemExit(0)
    monkeypatch.setattr(predict_from_raw_data.nnUNetPredictor, "predict_from_files", stop)
    monkeypatch.setattr(sys, "argv", lines[0].split() + ["-device", "cpu"])
    with pytest.raises(SystemExit):
        predict_from_raw_data.predict_entry_point_modelfolder()
    assert len(seen["folds"]) == 2 and seen["trainer"] == "nnUNetTrainer"
    # exporting again into the same folder is refused on the command line, cleanly
    with pytest.raises(SystemExit, match=r"^nnUNetv2_cl_export: error: Output folder .* is not empty"):
        monkeypatch.setattr(sys, "argv", ["nnUNetv2_cl_export", "-d", "Dataset997_Tiny", "-tr",
                                          "nnUNetTrainerSimCLR", "-c", "3d_fullres", "-o", str(out)])
        main_export()


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file
    out = tmp_path / "out"
    export_model(str(_model_folder(tmp_path)), str(out), safetensors=True)
    for f in (0, 1):
        pth = torch.load(out / f"fold_{f}" / "checkpoint_final.pth", weights_only=True)["network_weights"]
        st = load_file(str(out / f"fold_{f}" / "checkpoint_final.safetensors"))
        assert set(st) == set(pth) and all(torch.equal(st[k], pth[k]) and st[k].dtype == pth[k].dtype for k in pth)
    # they load strictly into the stock network
    from helpers import tiny_plans
    stock_network(tiny_plans(), DATASET_JSON, "3d_fullres").load_state_dict(st, strict=True)
