"""PolyCL trainers: patch loader, organ presence, losses per strategy, plans variant, and end to end on real CT.

Fast part (no shared data): a hand-written tiny plan and tiny preprocessed cases written with nnU-Net's own
dataset class. End-to-end part: 4 OpenKBP head-and-neck CTs (7 organ-at-risk labels) as the labeled dataset,
planned at twice the target spacing so CPU steps stay small; 2 other OpenKBP images and 1 CT of ct_unlabeled
ingested into its pool; a limited split (2 labeled training cases, 1 left out, 1 validation); the pretraining
plans variant; nnUNetv2_train with tiny PolyCL trainers (tests/ext_trainers); nnUNetv2_predict.
"""
import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_cl.safe_load import load_checkpoint_file

from nnunet_cl.paths import NnUNetCLError
from nnunet_cl.pretrain_plans import add_pretrain_configuration, network_divisor, reduced_patch_size
from nnunet_cl_trainers.polycl import nnUNetTrainerPolyCL, nnUNetTrainerPolyCLPretrain
from nnunet_cl_trainers.variants import nnUNetTrainerPolyCL_M, nnUNetTrainerPolyCL_O
from nnunet_cl_trainers.polycl_data import PolyCLPatchLoader, PolyCLPoolDataset

from helpers import cli_env, fake_preprocessed_folder, run, tiny_plans

DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "other": 2},
                "numTraining": 4, "file_ending": ".nii.gz"}


# ------------------------------------------------------------------------------------------------ tiny plans


@pytest.fixture
def make_trainer(nnunet_env):
    fake_preprocessed_folder(nnunet_env, "Dataset996_PolyTiny")

    def make(cls=nnUNetTrainerPolyCL, plans=None, configuration="3d_fullres", **attrs):
        # nnU-Net pops a key from the plans it is given
        plans = copy.deepcopy(plans) if plans is not None else tiny_plans("Dataset996_PolyTiny", (16, 32, 32))
        trainer = cls(plans, configuration, 0, dict(DATASET_JSON), torch.device("cpu"))
        for k, v in attrs.items():
            setattr(trainer, k, v)
        trainer.initialize()
        return trainer
    return make


# ------------------------------------------------------------------------------------------------ tiny cases
SHAPE = (24, 40, 40)
ORGAN_BOX = (slice(2, 10), slice(4, 16), slice(4, 16))  # the organ fills one corner of every labeled case


class Poison:
    """Stands in for a label the loader must never look at: any use raises."""

    def __init__(self, what):
        self.what = what

    def _fail(self, *args, **kwargs):
        raise AssertionError(f"the loader read {self.what}")

    __getitem__ = __iter__ = __len__ = __bool__ = __array__ = __contains__ = _fail
    keys = items = values = get = _fail
    shape = property(_fail)


def _write_case(folder: Path, identifier: str, labeled: bool, rng):
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
    seg = np.zeros((1, *SHAPE), dtype=np.int16)
    if labeled:
        seg[(0, *ORGAN_BOX)] = 1
        seg[0, 18:22, 30:36, 30:36] = 2  # a second label, not the organ of organ_labels=[1]
        data = seg.astype(np.float32)  # the image shows the labels, so a patch reveals the organ's presence
        locations = {1: np.argwhere(seg == 1), 2: np.argwhere(seg == 2)}  # every voxel: presence is exact
    else:
        data = rng.normal(size=(1, *SHAPE)).astype(np.float32)
        locations = {}
    folder.mkdir(parents=True, exist_ok=True)
    props = {"class_locations": locations, "spacing": [1.0, 1.0, 1.0], "shape_before_cropping": SHAPE,
             "bbox_used_for_cropping": [[0, s] for s in SHAPE], "shape_after_cropping_and_before_resampling": SHAPE}
    blocks, chunks = comp_blosc2_params(data.shape, (8, 16, 16), data.itemsize)
    blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, (8, 16, 16), seg.itemsize)
    nnUNetDatasetBlosc2.save_case(data, seg, props, str(folder / identifier), chunks=chunks, blocks=blocks,
                                  chunks_seg=chunks_seg, blocks_seg=blocks_seg)


@pytest.fixture
def tiny_pool(tmp_path):
    rng = np.random.default_rng(0)
    labeled, pool = tmp_path / "labeled", tmp_path / "pool"
    for c in ("case_a", "case_b", "case_c"):  # a, b: the fold's training split; c: left out of it
        _write_case(labeled, c, True, rng)
    for c in ("pool_x", "pool_y"):
        _write_case(pool, c, False, rng)
    members = [(str(labeled), c) for c in ("case_a", "case_b", "case_c")] + \
              [(str(pool), c) for c in ("pool_x", "pool_y")]
    known = [(str(labeled), "case_a"), (str(labeled), "case_b"), (str(pool), "case_c")]  # wrong folder: not known
    return members, known


def _poison_unknown(monkeypatch, allowed: set):
    """nnU-Net's dataset hands out poison for the seg of every case and the class locations of non-split cases."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    original = nnUNetDatasetBlosc2.load_case

    def load_case(self, identifier):
        data, seg, seg_prev, props = original(self, identifier)
        if identifier not in allowed:
            props = {**props, "class_locations": Poison(f"class_locations of {identifier}")}
        return data, Poison(f"the segmentation of {identifier}"), seg_prev, props
    monkeypatch.setattr(nnUNetDatasetBlosc2, "load_case", load_case)


def test_loader_patches_cases_and_exact_presence(tiny_pool, monkeypatch):
    members, known = tiny_pool
    _poison_unknown(monkeypatch, {"case_a", "case_b"})
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    dataset = PolyCLPoolDataset(members, known)
    assert dataset.presence_known == {"case_a", "case_b"}
    patch = (8, 16, 16)
    loader = PolyCLPatchLoader(dataset, 4, 2, patch, patch, LabelManager(DATASET_JSON["labels"], None),
                               organ_labels=[1], transforms=None)
    np.random.seed(0)
    seen = {0: 0, 1: 0}
    for _ in range(25):
        b = loader.generate_train_batch()
        assert b["data"].shape == (8, 1, *patch)
        case, pres, keys = b["case_index"].numpy(), b["organ_present"].numpy(), b["keys"]
        assert [dataset.identifiers[i] for i in case] == keys
        assert all((case == c).sum() >= 2 for c in set(case))  # every patch has a same-scan partner
        for k, p, x in zip(keys, pres, b["data"]):
            if k in ("case_a", "case_b"):
                truth = bool((x == 1).any())  # the image is the label map: organ (label 1) present or not
                assert p == int(truth), (k, p)
                seen[int(p)] += 1
            else:
                assert p == -1, k
    assert seen[0] > 0 and seen[1] > 0  # balance_presence finds organ and organ-free patches


def test_loader_is_deterministic_under_a_seed(tiny_pool):
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    members, known = tiny_pool
    loader = PolyCLPatchLoader(PolyCLPoolDataset(members, known), 2, 4, (8, 16, 16), (8, 16, 16),
                               LabelManager(DATASET_JSON["labels"], None), transforms=None)
    out = []
    for _ in range(2):
        np.random.seed(3)
        out.append(loader.generate_train_batch())
    assert torch.equal(out[0]["data"], out[1]["data"]) and out[0]["keys"] == out[1]["keys"]
    assert torch.equal(out[0]["organ_present"], out[1]["organ_present"])
    assert out[0]["data"].shape[0] == 8


def test_nonzero_mask_is_read_only_when_normalisation_needs_it(tiny_pool):
    members, known = tiny_pool
    seg = PolyCLPoolDataset(members, known, read_nonzero_mask=True).load_case("case_c")[1]
    assert set(np.unique(seg)) <= {-1, 0}  # labels reduced to nnU-Net's outside marker
    data, seg, _, props = PolyCLPoolDataset(members, known).load_case("case_c")
    assert not seg.any() and seg.shape == (1, *SHAPE) and props["class_locations"] == {}
    assert not props["presence_known"]


# ------------------------------------------------------------------------------------------------ steps
def fixed_batch(seed=0):
    """4 scans x 2 patches: each scan its own texture, patches of a scan differ by noise; mixed presence."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn((4, 1, 16, 32, 32), generator=g)
    data = base.repeat_interleave(2, 0) + 0.3 * torch.randn((8, 1, 16, 32, 32), generator=g)
    return {"data": data, "case_index": torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
            "organ_present": torch.tensor([1, 1, 0, 0, 1, 0, -1, -1], dtype=torch.int8), "keys": list("aabbccdd")}


@pytest.mark.parametrize("form", ["infonce", "triplet"])
@pytest.mark.parametrize("strategy", ["S", "O", "M"])
def test_one_step_per_strategy_and_form(make_trainer, strategy, form):
    trainer = make_trainer(strategy=strategy, loss_form=form)
    assert set(trainer.cl_modules) == {"local", "projector"}
    assert trainer.cl_modules["projector"][-1].out_features == 128
    assert not any(k.startswith(("local", "projector")) for k in trainer.network.state_dict())
    np.random.seed(0)
    terms = trainer.pretrain_losses(fixed_batch())
    assert set(terms) == {"polycl"} and terms["polycl"].requires_grad and torch.isfinite(terms["polycl"])
    assert terms["polycl"] > 0
    out = trainer.train_step(fixed_batch())
    assert np.isfinite(out["loss"]) and "cl_polycl" in out


@pytest.mark.parametrize("form", ["infonce", "triplet"])
def test_steps_on_a_fixed_batch_lower_the_loss(make_trainer, form):
    torch.manual_seed(0)
    trainer = make_trainer(nnUNetTrainerPolyCL_M, loss_form=form)
    batch = fixed_batch()
    losses = []
    for _ in range(6):
        np.random.seed(1)  # the triplet form draws the same triplets each step: one fixed objective
        losses.append(float(trainer.train_step(batch)["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses


def test_sizes_and_variants(make_trainer):
    trainer = make_trainer(nnUNetTrainerPolyCLPretrain)
    assert trainer.finetune_epochs == 0 and trainer.strategy == "S" and trainer.loss_form == "infonce"
    assert trainer.temperature == 0.1 and trainer.organ_labels is None
    # half the (16, 32, 32) patch, in multiples of the network's downsampling (4 per axis)
    assert trainer.get_pretrain_patch_size() == [8, 16, 16]
    assert trainer.get_pretrain_batch_size() == 8  # max(8, plans' batch 2)
    trainer.patches_per_case, trainer.pretrain_batch_size = 3, 10
    assert trainer.get_pretrain_batch_size() == 12  # rounded up to whole scans
    assert make_trainer(nnUNetTrainerPolyCL_O).strategy == "O"
    trainer.pretrain_patch_size = (8, 18, 16)
    with pytest.raises(NnUNetCLError, match=r"multiple .* Fix: set pretrain_patch_size to \[8, 16, 16\]"):
        trainer.get_pretrain_patch_size()
    trainer.pretrain_patch_size = (4, 4, 4)  # one voxel at the bottleneck (downsampling 4 per axis)
    with pytest.raises(NnUNetCLError, match="one voxel at the network's bottleneck.*pretrain_patch_size = 8 4 4"):
        trainer.get_pretrain_patch_size()


# ------------------------------------------------------------------------------------------------ plans variant
def test_plans_variant_keeps_the_network(make_trainer):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans = tiny_plans("Dataset996_PolyTiny", (24, 48, 40))
    name, entry, changed = add_pretrain_configuration(plans, "3d_fullres", batch=8)
    assert changed and name == "3d_fullres_clpretrain"
    assert entry == {"inherits_from": "3d_fullres", "patch_size": [12, 24, 20], "batch_size": 8}
    assert add_pretrain_configuration(plans, "3d_fullres", batch=8)[2] is False  # idempotent
    with pytest.raises(NnUNetCLError, match="--overwrite"):
        add_pretrain_configuration(plans, "3d_fullres", batch=16)
    with pytest.raises(NnUNetCLError, match="divisible"):
        add_pretrain_configuration(plans, "3d_fullres", name="x", patch=[10, 24, 20])
    pm = PlansManager(plans)
    parent, child = pm.get_configuration("3d_fullres"), pm.get_configuration(name)
    for attr in ("data_identifier", "spacing", "normalization_schemes", "network_arch_class_name",
                 "network_arch_init_kwargs", "network_arch_init_kwargs_req_import"):
        assert getattr(parent, attr) == getattr(child, attr), attr
    assert child.patch_size == [12, 24, 20] and child.batch_size == 8
    assert network_divisor(child) == [4, 4, 4]
    # the pretraining trainer on the variant uses its patch as is; its network is the fine-tuning network
    pre = make_trainer(nnUNetTrainerPolyCLPretrain, plans=plans, configuration=name)
    fine = make_trainer(plans=plans)
    assert pre.is_pretrain_plans_variant() and not fine.is_pretrain_plans_variant()
    assert pre.get_pretrain_patch_size() == [12, 24, 20] and pre.get_pretrain_batch_size() == 8
    a, b = pre.network.state_dict(), fine.network.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert reduced_patch_size([40, 112, 64], [8, 16, 16]) == [24, 64, 32]
    # halving 64^3 at downsampling 32 would leave one bottleneck voxel (instance norm fails): keep two multiples
    assert reduced_patch_size([64, 64, 64], [32, 32, 32]) == [64, 64, 64]
    assert reduced_patch_size([32, 128, 128], [32, 32, 32]) == [32, 64, 64]


# ------------------------------------------------------------------------------------------------ real CT
DATASET, DATASET_ID = "Dataset971_KBPPolyCL", "971"
TRAINER, PRETRAINER = "nnUNetTrainerPolyCL_M_test", "nnUNetTrainerPolyCLPretrain_O_test"
N_LABELED = 4




@pytest.fixture(scope="module")
def kbp(tmp_path_factory, shared_data):
    src, ct = shared_data / "OpenKBP_HN", shared_data / "ct_unlabeled"
    for p in (src / "imagesTr", src / "labelsTr", ct):
        if not p.is_dir():
            pytest.skip(f"{p} not found in the shared data")
    root = tmp_path_factory.mktemp("polycl_e2e")
    env = cli_env(root, ["polycl_test_trainers.py"])
    cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (src / "imagesTr").glob("*_0000.nii.gz"))[:N_LABELED + 3]
    raw = root / "nnUNet_raw" / DATASET
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for c in cases[:N_LABELED]:
        os.symlink(src / "imagesTr" / f"{c}_0000.nii.gz", raw / "imagesTr" / f"{c}_0000.nii.gz")
        os.symlink(src / "labelsTr" / f"{c}.nii.gz", raw / "labelsTr" / f"{c}.nii.gz")
    dataset_json = json.loads((src / "dataset.json").read_text())
    dataset_json["numTraining"] = N_LABELED
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    unlabeled, test_in = root / "unlabeled", root / "test_in"
    unlabeled.mkdir(), test_in.mkdir()
    for c in cases[N_LABELED:N_LABELED + 2]:  # other OpenKBP images, their labels never copied
        os.symlink(src / "imagesTr" / f"{c}_0000.nii.gz", unlabeled / f"{c}.nii.gz")
    ct_file = sorted(ct.glob("*.nii.gz"), key=lambda p: p.stat().st_size)[0]  # the smallest other-region CT
    os.symlink(ct_file, unlabeled / ct_file.name)
    os.symlink(src / "imagesTr" / f"{cases[-1]}_0000.nii.gz", test_in / f"{cases[-1]}_0000.nii.gz")
    # twice nnU-Net's target spacing: about 40 x 110 x 64 voxels, so a CPU step takes seconds, not minutes
    run(["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-np", "1", "-npfp", "1",
         "-overwrite_target_spacing", "8.53", "5.0", "8.53"], env)
    run(["nnUNetv2_cl_add_unlabeled", "-d", DATASET_ID, "-i", str(unlabeled), "-np", "1"], env)
    run(["nnUNetv2_cl_limited_split", "-d", DATASET_ID, "-k", "2", "--folds", str(N_LABELED)], env)
    pre = root / "nnUNet_preprocessed" / DATASET
    split = json.loads((pre / "splits_final.json").read_text())[0]
    left_out = sorted(set(cases[:N_LABELED]) - set(split["train"]) - set(split["val"]))
    return {"root": root, "env": env, "pre": pre, "train": sorted(split["train"]), "val": split["val"],
            "left_out": left_out, "test_in": test_in, "test_case": cases[-1]}


def test_real_loader_reads_presence_only_for_the_training_split(kbp, monkeypatch):
    """In-process on the real pool: 8 patches, presence for the 2 training cases, -1 (never read) for the rest."""
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, kbp["env"][k])
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    _poison_unknown(monkeypatch, set(kbp["train"]))
    plans = json.loads((kbp["pre"] / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    trainer = nnUNetTrainerPolyCL_M(plans, "3d_fullres", 0, json.loads((kbp["pre"] / "dataset.json").read_text()),
                                    torch.device("cpu"))
    trainer.initialize()
    loader = trainer.get_pretrain_dataloader()
    ids = loader.data_loader.case_ids
    assert len(ids) == 6 and not set(kbp["val"]) & set(ids)  # 3 labeled-dataset images + 3 ingested
    assert loader.data_loader._data.presence_known == set(kbp["train"])
    np.random.seed(0)
    patch = trainer.get_pretrain_patch_size()
    for _ in range(2):
        b = next(loader)
        assert b["data"].shape == (8, 1, *patch) and torch.isfinite(b["data"]).all()
        assert [ids[i] for i in b["case_index"]] == b["keys"]
        for k, p in zip(b["keys"], b["organ_present"].tolist()):
            assert (p in (0, 1)) if k in kbp["train"] else p == -1, (k, p)
    terms = trainer.pretrain_losses(b)
    assert torch.isfinite(terms["polycl"])


@pytest.fixture(scope="module")
def variant_run(kbp):
    """nnUNetv2_cl_pretrain_plans, then pretraining only on the variant configuration."""
    out = run([sys.executable, "-m", "nnunet_cl.pretrain_plans", "-d", DATASET_ID], kbp["env"]).stdout
    proc = run(["nnUNetv2_train", DATASET_ID, "3d_fullres_clpretrain", "0", "-tr", PRETRAINER, "-device", "cpu"],
               kbp["env"])
    ckpt = kbp["root"] / "nnUNet_results" / DATASET / f"{PRETRAINER}__nnUNetPlans__3d_fullres_clpretrain" / \
        "fold_0" / "checkpoint_final.pth"
    return {"cli": out, "train": proc, "checkpoint": ckpt}


def test_pretrain_plans_variant(kbp, variant_run):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans = json.loads((kbp["pre"] / "nnUNetPlans.json").read_text())
    entry = plans["configurations"]["3d_fullres_clpretrain"]
    pm = PlansManager(plans)
    parent, child = pm.get_configuration("3d_fullres"), pm.get_configuration("3d_fullres_clpretrain")
    assert set(entry) == {"inherits_from", "patch_size", "batch_size"} and entry["batch_size"] == 8
    assert entry["patch_size"] == reduced_patch_size(parent.patch_size, network_divisor(parent))
    assert child.data_identifier == parent.data_identifier
    assert child.network_arch_init_kwargs == parent.network_arch_init_kwargs
    assert "Added" in variant_run["cli"]
    log = variant_run["train"].stdout
    assert f"of {entry['patch_size']} per step" in log and "4 scans x 2 patches" in log
    ckpt = load_checkpoint_file(variant_run["checkpoint"])
    assert ckpt["init_args"]["configuration"] == "3d_fullres_clpretrain"
    assert np.isfinite(ckpt["logging"]["cl_polycl"]).all()
    # what `nnUNetv2_train D 3d_fullres F -pretrained_weights` does, on the fine-tuning network
    dataset_json = json.loads((kbp["pre"] / "dataset.json").read_text())
    net = nnUNetTrainer.build_network_architecture(pm, parent, 1, len(dataset_json["labels"]), True)
    load_pretrained_weights(net, str(variant_run["checkpoint"]))
    for k, v in ckpt["network_weights"].items():
        if ".seg_layers." not in k:
            assert torch.equal(net.state_dict()[k], v), k


@pytest.fixture(scope="module")
def staged_run(kbp, variant_run):
    # the staged trainer on 3d_fullres starts from the variant's checkpoint: a real -pretrained_weights load
    return run(["nnUNetv2_train", DATASET_ID, "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu",
                "-pretrained_weights", str(variant_run["checkpoint"])], kbp["env"])


def test_staged_training_on_real_ct(kbp, staged_run):
    out = staged_run.stdout
    assert "Loading pretrained weights from file" in out
    assert "Pretraining pool: 6 cases (2 with organ presence from fold 0's training split, 4 unknown)" in out
    assert "PolyCL-M (infonce" in out and "Stage switch at epoch 2" in out
    fold = kbp["root"] / "nnUNet_results" / DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_0"
    ckpt = load_checkpoint_file(fold / "checkpoint_final.pth")
    assert ckpt["current_epoch"] == 3 and (fold / "checkpoint_pretrained.pth").is_file()
    assert set(ckpt["nnunet_cl"]["cl_modules"]) >= {"local.0.weight", "projector.1.running_mean", "projector.3.weight"}
    polycl = np.array(ckpt["logging"]["cl_polycl"], dtype=float)
    assert np.isfinite(polycl[:2]).all() and np.isnan(polycl[2:]).all()
    assert np.isfinite(ckpt["logging"]["mean_fg_dice"][2])


def test_predict_on_real_ct(kbp, staged_run, tmp_path):
    out = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(kbp["test_in"]), "-o", str(out), "-d", DATASET_ID, "-c", "3d_fullres",
         "-tr", TRAINER, "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], kbp["env"])
    image = sitk.ReadImage(str(kbp["test_in"] / f"{kbp['test_case']}_0000.nii.gz"))
    pred = sitk.ReadImage(str(out / f"{kbp['test_case']}.nii.gz"))
    assert pred.GetSize() == image.GetSize() and np.allclose(pred.GetSpacing(), image.GetSpacing())
    assert set(np.unique(sitk.GetArrayFromImage(pred))) <= set(range(8))
