"""Contract of every trainer, parametrised from the trainer list itself: a new method gets these for free.

Every nnunet-cl trainer class: found by `-tr`, built on a tiny plan, its declared kind matches its hooks, and
`self.network` is exactly the network stock nnU-Net builds from the plans.

Every method family (a trainer class defined in a method module, not a generated variant or a schedule; pretraining
families and auxiliary-loss families such as DCL-Seg and PCLMix alike), on real MRI (MSD Hippocampus, ../shared/data; 8 labeled
cases and an unlabeled pool), in process:
  * two steps from its own data loaders on CPU;
  * a checkpoint round trip (`--c`): extra modules, optimiser and extra state restored, so the next step's loss
    equals the uninterrupted run's;
  * its checkpoint goes into a stock nnUNetTrainer through nnU-Net's `-pretrained_weights` loader;
  * `nnUNetv2_cl_export` of it loads into nnU-Net's predictor;
  * a seeded run repeats its losses;
  * (pretraining families) the plans/configuration matrix (3d_fullres and 2d, nnUNetPlans and
    nnUNetResEncUNetMPlans): the trainer either pretrains on the whole pool there or refuses at set-up with a
    message naming the fix, never silently; (auxiliary-loss families) a step with every term finite on each of them.
"""
import inspect
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import nnunet_cl_trainers
from nnunet_cl.paths import NnUNetCLError
from nnunet_cl.safe_load import load_checkpoint_file
from nnunet_cl_trainers.base import FINETUNE, PRETRAIN, nnUNetTrainerCLBase

from helpers import cli_env, fake_preprocessed_folder, run, tiny_plans

CL_TRAINERS = sorted(n for n, o in vars(nnunet_cl_trainers).items()
                     if inspect.isclass(o) and issubclass(o, nnUNetTrainerCLBase) and o is not nnUNetTrainerCLBase)
_GENERATED = ("nnunet_cl_trainers.variants", "nnunet_cl_trainers.benchmark", "nnunet_cl_trainers.demo")
_METHOD_CLASSES = [n for n in CL_TRAINERS if getattr(nnunet_cl_trainers, n).__module__ not in _GENERATED
                   and not n.endswith("Pretrain")]
FAMILIES = sorted(n for n in _METHOD_CLASSES if getattr(nnunet_cl_trainers, n).has_pretraining)  # pretrain on the pool
AUXILIARY_FAMILIES = sorted(n for n in _METHOD_CLASSES if not getattr(nnunet_cl_trainers, n).has_pretraining)
DATASET = "Dataset906_HippoContract"
TINY_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "organ": 1}, "numTraining": 4,
             "file_ending": ".nii.gz"}
# a couple of short steps per family; SepaReg's separation gets few, coarse supervoxels per case
CONTRACT_BATCH = 2  # patches per fine-tuning step (PCLMix's mix needs 2)
SMALL = {"pretrain_iterations_per_epoch": 2, "finetune_iterations_per_epoch": 1,
         "finetune_val_iterations_per_epoch": 1, "training_seed": 0}
FAMILY_ATTRS = {"nnUNetTrainerSepaReg": {"n_segments": 24, "regions_per_step": 4, "crop_size": 16},
                "nnUNetTrainerPolyCL": {"pretrain_batch_size": 4}, "nnUNetTrainerSimCLR": {"pretrain_batch_size": 2},
                "nnUNetTrainerSuperCL": {"pretrain_batch_size": 4, "queue_size": 16, "n_labels": 16, "per_label": 4},
                "nnUNetTrainerDCLSeg": {"anchors_per_sample": 64},
                "nnUNetTrainerPCLMix": {"contrast_start_iteration": 0, "queue_size": 16, "max_anchors": 256}}


def test_the_families_are_the_methods():
    assert FAMILIES == ["nnUNetTrainerPolyCL", "nnUNetTrainerSepaReg", "nnUNetTrainerSimCLR", "nnUNetTrainerSuperCL"]
    assert AUXILIARY_FAMILIES == ["nnUNetTrainerDCLSeg", "nnUNetTrainerPCLMix"]


@pytest.mark.parametrize("name", CL_TRAINERS)
def test_every_trainer_is_found_builds_and_keeps_the_stock_network(name, nnunet_env, monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunet_cl.checkpoints import stock_network
    from nnunet_cl.ext_path import ext_trainer_path
    monkeypatch.setenv("nnUNet_extTrainer", ext_trainer_path())
    cls = recursive_find_trainer_class_by_name(name)
    assert cls is getattr(nnunet_cl_trainers, name)
    fake_preprocessed_folder(nnunet_env, "Dataset997_Tiny")
    trainer = cls(tiny_plans(), "3d_fullres", 0, dict(TINY_JSON), torch.device("cpu"))
    trainer.initialize()
    overrides = {h: getattr(cls, h) is not getattr(nnUNetTrainerCLBase, h)
                 for h in ("pretrain_losses", "auxiliary_losses")}
    assert overrides["pretrain_losses"] == cls.has_pretraining  # the declared kind is what the class implements
    assert overrides["auxiliary_losses"] == cls.has_auxiliary_loss
    stock = stock_network(tiny_plans(), TINY_JSON, "3d_fullres").state_dict()
    own = trainer.unwrapped_network.state_dict()
    assert own.keys() == stock.keys() and all(own[k].shape == stock[k].shape for k in own)


# ------------------------------------------------------------------------------------------- on real data
@pytest.fixture(scope="module")
def real(tmp_path_factory, shared_data):
    """Hippocampus: 8 labeled cases and 10 unlabeled ones; nnUNetPlans 3d_fullres and 2d, ResEnc M 3d_fullres and
    2d; the pool ingested for nnUNetPlans 3d_fullres only (the matrix shows what the other combinations do)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    root = tmp_path_factory.mktemp("contract")
    env = cli_env(root)
    src = shared_data / "Task04_Hippocampus"
    images = sorted(p for p in (src / "imagesTr").glob("hippocampus_*.nii.gz"))
    raw = root / "nnUNet_raw" / DATASET
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    unlabeled = root / "unlabeled"
    unlabeled.mkdir()
    for p in images[:8]:
        shutil.copy(p, raw / "imagesTr" / p.name.replace(".nii.gz", "_0000.nii.gz"))
        shutil.copy(src / "labelsTr" / p.name, raw / "labelsTr" / p.name)
    for p in images[8:18]:
        shutil.copy(p, unlabeled / p.name)
    generate_dataset_json(str(raw), {0: "MRI"}, {"background": 0, "Anterior": 1, "Posterior": 2}, 8, ".nii.gz",
                          dataset_name=DATASET)
    run(["nnUNetv2_plan_and_preprocess", "-d", "906", "-c", "3d_fullres", "2d", "-np", "1"], env)
    run(["nnUNetv2_plan_experiment", "-d", "906", "-pl", "nnUNetPlannerResEncM"], env)
    run(["nnUNetv2_preprocess", "-d", "906", "-plans_name", "nnUNetResEncUNetMPlans", "-c", "3d_fullres", "2d",
         "-np", "1", "1"], env)
    run(["nnUNetv2_cl_add_unlabeled", "-d", "906", "-i", str(unlabeled), "-np", "1"], env)
    return {"root": root, "env": env, "unlabeled": unlabeled}


def _make(real, name, configuration="3d_fullres", plans="nnUNetPlans", **attrs):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    folder = real["root"] / "nnUNet_preprocessed" / DATASET
    plans_dict = load_json(str(folder / f"{plans}.json"))
    plans_dict["continue_training"] = False
    # the plans' network and patch, at CONTRACT_BATCH patches per step: the contract is about the mechanics, and
    # the plans' batches (5 in 3d_fullres, 208 in 2d here, doubled by DCL-Seg and PCLMix) cost minutes per CPU step
    cfg = plans_dict["configurations"][configuration]
    cfg["batch_size"] = min(int(cfg["batch_size"]), CONTRACT_BATCH)
    trainer = getattr(nnunet_cl_trainers, name)(plans_dict, configuration, 0, load_json(str(folder / "dataset.json")),
                                                torch.device("cpu"))
    for k, v in {**SMALL, **FAMILY_ATTRS.get(name, {}), **attrs}.items():
        setattr(trainer, k, v)
    return trainer


@pytest.fixture
def real_env(real, monkeypatch):
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_compile"):
        monkeypatch.setenv(k, real["env"][k])
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # in process: the seeded run repeats bit for bit
    return real


def _fixed(trainer, batch):
    """A copy of a real batch (every tensor cloned), to give two trainers the same step."""
    return {k: (v.clone() if torch.is_tensor(v) else [t.clone() for t in v] if isinstance(v, list) and v
                and torch.is_tensor(v[0]) else v) for k, v in batch.items()}


def _step(trainer, batch, seed=123):
    torch.manual_seed(seed)  # views made inside the step (SepaReg's) draw the same numbers
    np.random.seed(seed)
    return float(trainer.train_step(_fixed(trainer, batch))["loss"])


@pytest.mark.parametrize("name", FAMILIES + AUXILIARY_FAMILIES)
def test_family_contract_on_real_data(real_env, name, tmp_path):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    trainer = _make(real_env, name)
    trainer.on_train_start()
    try:  # a pretraining family steps on the pool, an auxiliary-loss family on nnU-Net's labeled batches
        assert trainer.stage() == (PRETRAIN if trainer.has_pretraining else FINETUNE)
        batches = [next(trainer.dataloader_train) for _ in range(3)]
        losses = [float(trainer.train_step(_fixed(trainer, b))["loss"]) for b in batches[:2]]
        assert all(math.isfinite(v) for v in losses), losses
        # --c: a checkpoint, a fresh trainer, the same next step
        ckpt = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
        trainer.save_checkpoint(ckpt)
        resumed = _make(real_env, name)
        resumed.load_checkpoint(ckpt)
        assert _step(resumed, batches[2]) == pytest.approx(_step(trainer, batches[2]), rel=1e-6, abs=1e-7)
        # -pretrained_weights into stock nnU-Net, and an export stock nnU-Net's predictor loads
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        from batchgenerators.utilities.file_and_folder_operations import load_json
        folder = real_env["root"] / "nnUNet_preprocessed" / DATASET
        plans = load_json(str(folder / "nnUNetPlans.json"))
        plans["continue_training"] = False
        stock = nnUNetTrainer(plans, "3d_fullres", 0, load_json(str(folder / "dataset.json")), torch.device("cpu"))
        stock.initialize()
        load_pretrained_weights(stock.network, ckpt)
        own = load_checkpoint_file(ckpt)["network_weights"]  # (the trainer has stepped on since)
        assert all(torch.equal(v, own[k]) for k, v in stock.network.state_dict().items() if ".seg_layers." not in k)
        final = os.path.join(trainer.output_folder, "checkpoint_final.pth")
        shutil.copy(ckpt, final)
        from nnunet_cl.export import export_model
        exported = export_model(trainer.output_folder_base, str(tmp_path / "exported"), folds=[0])
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        predictor = nnUNetPredictor(device=torch.device("cpu"))
        predictor.initialize_from_trained_model_folder(exported, (0,))
        assert all(torch.equal(v, own[k]) for k, v in predictor.network.state_dict().items())
    finally:
        trainer._stop_pool_loader()
    # a seeded run repeats: the same calls in the same order (3 batches, then the steps; dropout in an extra module
    # and the in-process augmentation draw from one global stream, so their order matters)
    again = _make(real_env, name)
    again.on_train_start()
    try:
        replay = [next(again.dataloader_train) for _ in range(3)]
        assert [float(again.train_step(_fixed(again, b))["loss"]) for b in replay[:2]] == losses
    finally:
        again._stop_pool_loader()


MATRIX = [("nnUNetPlans", "3d_fullres"), ("nnUNetPlans", "2d"), ("nnUNetResEncUNetMPlans", "3d_fullres"),
          ("nnUNetResEncUNetMPlans", "2d")]


def _set_up(real_env, name, configuration, plans):
    trainer = _make(real_env, name, configuration, plans)
    trainer.on_train_start()
    return trainer


@pytest.mark.parametrize("plans,configuration", MATRIX)
@pytest.mark.parametrize("name", FAMILIES)
def test_the_pool_is_used_or_refused_with_the_fix(real_env, name, plans, configuration, capsys):
    """Set-up either pretrains on the whole pool or stops with a fix; a fix that names nnUNetv2_cl_add_unlabeled
    is run as printed (with the real folder), and then the pool is used."""
    try:
        trainer = _set_up(real_env, name, configuration, plans)
    except (NnUNetCLError, ValueError) as e:
        message = str(e)
        assert "Fix:" in message, message
        if "nnUNetv2_cl_add_unlabeled" not in message:
            assert (plans, configuration) != ("nnUNetPlans", "3d_fullres")  # refusals are for other combinations
            return
        fix = message.split("Fix: ")[1].split(" with the folder")[0].replace("FOLDER", str(real_env["unlabeled"]))
        run(fix.split() + ["-np", "1"], real_env["env"])
        capsys.readouterr()
        trainer = _set_up(real_env, name, configuration, plans)
    try:
        out = capsys.readouterr().out
        pool = json.loads((real_env["root"] / "nnUNet_preprocessed" / DATASET / "nnunet_cl_pool" /
                           "pool.json").read_text())
        n_labeled = len(trainer.do_split()[0])  # labeled images outside validation are pool images too
        assert f"pool: {len(pool) + n_labeled} cases" in out, out[-2000:]
        record = json.loads((Path(trainer.output_folder) / "pretraining_pool.json").read_text())
        assert record["cases"] == len(record["members"]) == len(pool) + n_labeled  # what the benchmark reads
        assert math.isfinite(float(trainer.train_step(next(trainer.dataloader_train))["loss"]))
    finally:
        trainer._stop_pool_loader()


@pytest.mark.parametrize("plans,configuration", MATRIX)
@pytest.mark.parametrize("name", AUXILIARY_FAMILIES)
def test_auxiliary_families_train_on_every_plans_and_configuration(real_env, name, plans, configuration):
    """An auxiliary-loss family reads no pool: on 3d_fullres and 2d, nnUNetPlans and ResEnc M, a step from nnU-Net's
    own loaders gives finite losses and every term of the method."""
    trainer = _set_up(real_env, name, configuration, plans)
    try:
        assert trainer.stage() == FINETUNE
        out = trainer.train_step(next(trainer.dataloader_train))
        assert math.isfinite(float(out["loss"]))
        assert all(math.isfinite(float(out[f"cl_{t}"])) for t in trainer.loss_terms)
    finally:
        trainer._stop_pool_loader()
