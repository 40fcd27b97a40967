"""SepaReg trainers: each pretraining phase at the Python level on a tiny plan, phase state across checkpoints,
and end to end through the real command lines on real head-and-neck radiotherapy CT (OpenKBP, ../shared/data).
"""
import itertools
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_cl.safe_load import load_checkpoint_file

from nnunet_cl_trainers.base import FINETUNE, PRETRAIN
from nnunet_cl_trainers.separeg import DISTILL, EXPERT, REGION, nnUNetTrainerSepaReg, nnUNetTrainerSepaRegPretrain
from nnunet_cl_trainers.variants import nnUNetTrainerSepaRegBYOL

from helpers import cli_env, fake_preprocessed_folder, run, tiny_plans

DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 4,
                "file_ending": ".nii.gz"}




# tiny schedule: region 0-1, expert 0 at 2, expert 1 at 3, distill 4-5, fine-tune 6
SCHEDULE = dict(crop_size=16, region_epochs=2, expert_epochs=1, k=2, distill_epochs=2, regions_per_step=6,
                finetune_epochs=1)


def synthetic_regions(n=16, size=16, seed=0):
    """Region-like crops: two kinds (bright ball, dim slab), zero outside, uint8 x 255 as in the cache."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:size, :size, :size] - size / 2
    out = np.zeros((n, 1, size, size, size), np.uint8)
    for i in range(n):
        if i % 2:
            m = z ** 2 + y ** 2 + x ** 2 < (size / 2.5) ** 2
            val = 0.8 + 0.1 * rng.standard_normal(m.shape)
        else:
            m = np.abs(z) < size / 5
            val = 0.3 + 0.05 * rng.standard_normal(m.shape) + 0.02 * x
        out[i, 0] = np.round(np.clip(np.where(m, val, 0), 0, 1) * 255)
    return out


@pytest.fixture
def make_trainer(nnunet_env):
    fake_preprocessed_folder(nnunet_env, "Dataset996_TinySepa")

    def make(cls=nnUNetTrainerSepaReg, regions=True, **attrs):
        torch.manual_seed(0)
        trainer = cls(tiny_plans("Dataset996_TinySepa"), "3d_fullres", 0, dict(DATASET_JSON), torch.device("cpu"))
        for k, v in {**SCHEDULE, **attrs}.items():
            setattr(trainer, k, v)
        trainer.initialize()
        if regions:
            trainer.set_regions(synthetic_regions(), ["synthetic"])
        return trainer
    return make


def go_to(trainer, epoch):
    """What the training loop does at the start of an epoch."""
    trainer.current_epoch = epoch
    trainer.on_train_epoch_start()


# ------------------------------------------------------------------------------------------- schedule
def test_phase_schedule_and_pretrain_epochs(make_trainer):
    t = make_trainer()
    assert t.pretrain_epochs == 2 + 2 * 1 + 2 and t.num_epochs == 7
    assert [t.phase(e) for e in range(7)] == [REGION, REGION, EXPERT, EXPERT, DISTILL, DISTILL, FINETUNE]
    assert [t.expert_of_epoch(e) for e in (2, 3)] == [0, 1]
    assert t.stage(5) == PRETRAIN and t.stage(6) == FINETUNE
    with pytest.raises(AttributeError, match="region_epochs"):
        t.pretrain_epochs = 3
    # a 16^3 crop through strides 1, 2, 2 is 4^3 at the bottleneck: the bottleneck is pooled
    assert t.resolved_feature_stage() == 2
    t.crop_size = 4  # 4 -> 2 -> 1 voxel: instance norm is undefined there, so the stage before
    assert t.resolved_feature_stage() == 1
    # learning rate restarts for each phase and each expert
    t.crop_size = 16
    go_to(t, 2)
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(t.pretrain_lr)


def test_heads_beside_network_and_views_keep_regions(make_trainer):
    t = make_trainer(objective="byol")
    assert set(t.cl_modules) == {"local", "projector", "predictor", "teacher"}
    assert not any(k.startswith(("local", "projector", "predictor", "teacher")) for k in t.network.state_dict())
    x = torch.from_numpy(synthetic_regions(4)).float() / 255
    t.scale_jitter = (1.0, 1.0)
    v = t.region_view(x, torch.Generator().manual_seed(0))
    # no spatial jitter: the view is non-zero exactly where the crop is, up to flips of the spatial axes
    subsets = [d for n in range(4) for d in itertools.combinations((1, 2, 3), n)]
    for i in range(4):
        crop = x[i] > 0
        assert any(torch.equal(torch.flip(crop, d) if d else crop, v[i] != 0) for d in subsets), i


# ------------------------------------------------------------------------------------------- one step per phase
@pytest.mark.parametrize("cls", [nnUNetTrainerSepaReg, nnUNetTrainerSepaRegBYOL])
def test_one_step_of_every_phase(make_trainer, cls):
    t = make_trainer(cls)
    seen = {}
    for epoch in range(6):
        go_to(t, epoch)
        batch = t.next_region_batch()
        assert batch["data"].shape == (6, 1, 16, 16, 16)
        if t.phase() != REGION:  # every block of regions comes from one cluster: the expert's
            assert set(t.sepa.assignments[batch["index"]].tolist()) == {batch["expert"]}
        teacher_before = {k: v.clone() for k, v in t.cl_modules.state_dict().items() if k.startswith("teacher.")}
        out = t.train_step(batch)
        phase = t.phase()
        assert np.isfinite(out["loss"]) and f"cl_{phase}" in out
        seen[phase] = float(out[f"cl_{phase}"])
        if cls is nnUNetTrainerSepaRegBYOL and phase in (REGION, EXPERT):  # the EMA teacher moved
            assert any(not torch.equal(v, t.cl_modules.state_dict()[k]) for k, v in teacher_before.items())
    assert set(seen) == {REGION, EXPERT, DISTILL}
    lo, hi = (-1, 1) if cls is nnUNetTrainerSepaReg else (0, 4)
    assert lo <= seen[REGION] <= hi and lo <= seen[EXPERT] <= hi and 0 <= seen[DISTILL] <= 4
    st = t.sepa
    assert st.working == ("student", None) and sorted(st.experts) == [0, 1]
    assert len(st.assignments) == 16 and set(st.assignments.tolist()) == {0, 1}
    # the experts were trained from the base and differ from it and from each other
    key = next(k for k in st.base["encoder"] if k.endswith("weight"))
    assert not torch.equal(st.experts[0]["encoder"][key], st.base["encoder"][key])
    assert not torch.equal(st.experts[0]["encoder"][key], st.experts[1]["encoder"][key])


def test_kmeans_of_base_embeddings_is_stable(make_trainer):
    t = make_trainer()
    go_to(t, 2)  # clustering happens when the expert phase starts
    first = t.sepa.assignments.copy()
    t.sepa.assignments = None
    t.cluster_regions()
    assert np.array_equal(first, t.sepa.assignments)
    # the two kinds of synthetic region end up in different clusters
    kinds = np.arange(16) % 2
    assert abs(np.corrcoef(kinds, first)[0, 1]) > 0.9


def test_kmeans_clusters_the_projections_unless_told_pooled(make_trainer):
    t = make_trainer()
    x = torch.from_numpy(synthetic_regions()).float() / 255
    pooled, projected = (e.shape[1] for e in t.embed(t._online(), x))
    assert t.region_embeddings().shape == (16, projected) == (16, t.projection_dim)  # the authors' code
    t.cluster_features = "pooled"
    assert t.region_embeddings().shape == (16, pooled) and pooled != projected
    t.cluster_features = "pool"
    with pytest.raises(ValueError, match="'projection' or 'pooled'"):
        t.region_embeddings()


def test_clustering_embeds_a_bounded_sample_and_experts_draw_only_from_it(make_trainer):
    t = make_trainer(cluster_max_regions=8)
    seen = []
    original = t.region_embeddings
    t.region_embeddings = lambda **kw: seen.append(len(kw["indices"])) or original(**kw)
    go_to(t, 2)  # expert 0: clustering first
    assert seen == [8]
    clustered = np.flatnonzero(t.sepa.assignments >= 0)
    assert len(clustered) == 8 and (t.sepa.assignments[np.setdiff1d(np.arange(16), clustered)] == -1).all()
    for _ in range(5):
        assert set(t.next_region_batch()["index"]) <= set(clustered)
    for epoch in (3, 4):
        go_to(t, epoch)
    assert t.phase() == DISTILL
    for _ in range(5):
        batch = t.next_region_batch()
        assert set(batch["index"]) <= set(clustered) and batch["expert"] >= 0


def test_distillation_gives_every_cluster_the_same_blocks(make_trainer):
    t = make_trainer()
    for epoch in range(5):
        go_to(t, epoch)
    assert t.phase() == DISTILL
    skewed = np.array([0] * 30 + [1] * 3 + [2] * 3)  # one large pseudo-organ, two small ones
    t.sepa.assignments = None
    t.set_regions(synthetic_regions(36), ["synthetic"])  # 36 crops, 6 per block: 2 blocks per cluster a pass
    t.sepa.assignments = skewed
    experts = [t.next_region_batch()["expert"] for _ in range(6)]
    assert sorted(experts) == [0, 0, 1, 1, 2, 2]
    t.distill_balanced, t.sepa.blocks = False, None  # proportional: the large cluster takes 5 of 7 blocks
    experts = [t.next_region_batch()["expert"] for _ in range(7)]
    assert sorted(experts) == [0] * 5 + [1, 2]



def test_region_batches_follow_the_training_seed(make_trainer):
    """SepaReg draws its region batches in the training process: from `seed`, else the run's training_seed."""
    def first_batches(**attrs):
        t = make_trainer(**attrs)
        go_to(t, 0)
        return [t.next_region_batch()["index"].tolist() for _ in range(3)]

    assert first_batches(training_seed=3) == first_batches(training_seed=3)
    assert first_batches(training_seed=3) != first_batches(training_seed=4)
    assert first_batches(training_seed=4, seed=3) == first_batches(training_seed=3)
    assert first_batches() == first_batches(training_seed=0)  # unseeded runs keep the fixed stream of before


def test_simsiam_steps_on_a_fixed_batch_lower_the_loss(make_trainer):
    t = make_trainer()
    go_to(t, 0)
    x = torch.from_numpy(synthetic_regions(8, seed=3)).float() / 255
    g = torch.Generator().manual_seed(0)
    views = torch.cat([t.region_view(x, g), t.region_view(x, g)])
    losses = []
    for _ in range(6):
        t.optimizer.zero_grad(set_to_none=True)
        loss = t.inter_organ_loss(views)
        t._backward_and_step(loss)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("distill_loss", ["cosine", "kl"])
def test_distillation_loss_is_zero_when_student_equals_expert(make_trainer, distill_loss):
    t = make_trainer(distill_loss=distill_loss, expert_epochs=0)  # no expert training: experts = base = student
    go_to(t, 2)
    assert t.phase() == DISTILL and t.sepa.working == ("student", None)
    batch = t.next_region_batch()
    loss = t.pretrain_losses(t.prepare_batch(batch))[DISTILL]
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-5)
    # after the student moves, it no longer is the expert
    t.train_step(t.next_region_batch())
    t.train_step(t.next_region_batch())
    assert float(t.pretrain_losses(t.prepare_batch(t.next_region_batch()))[DISTILL].detach()) > 1e-6


# ------------------------------------------------------------------------------------------- checkpoints
def _state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), k


@pytest.mark.parametrize("stop_after", [2, 4])  # after expert 0 / after the first distillation epoch
def test_checkpoint_resume_restores_the_phase_state(make_trainer, tmp_path, stop_after, nnunet_env):
    a = make_trainer(nnUNetTrainerSepaRegBYOL)
    for epoch in range(stop_after + 1):
        go_to(a, epoch)
        a.train_step(a.next_region_batch())
    a.current_epoch = stop_after
    a.save_checkpoint(str(tmp_path / "ckpt.pth"))

    b = make_trainer(nnUNetTrainerSepaRegBYOL, regions=False)
    b.load_checkpoint(str(tmp_path / "ckpt.pth"))
    b.set_regions(synthetic_regions(), ["synthetic"])
    assert b.current_epoch == stop_after + 1
    _state_equal(a.cl_modules.state_dict(), b.cl_modules.state_dict())
    _state_equal(a.network.state_dict(), b.network.state_dict())
    assert np.array_equal(a.sepa.assignments, b.sepa.assignments) and b.sepa.working == a.sepa.working
    _state_equal(a.sepa.base["encoder"], b.sepa.base["encoder"])
    assert sorted(a.sepa.experts) == sorted(b.sepa.experts)
    for j in a.sepa.experts:
        _state_equal(a.sepa.experts[j]["heads"], b.sepa.experts[j]["heads"])
    # both continue identically
    for t in (a, b):
        go_to(t, stop_after + 1)
    assert a.sepa.working == b.sepa.working and sorted(a.sepa.experts) == sorted(b.sepa.experts)
    for j in a.sepa.experts:
        _state_equal(a.sepa.experts[j]["encoder"], b.sepa.experts[j]["encoder"])
    _state_equal(a.network.state_dict(), b.network.state_dict())
    # the checkpoint ending pretraining carries neither base nor experts, only what the preview needs
    a.current_epoch = a.pretrain_epochs - 1
    a.save_checkpoint(str(tmp_path / "end.pth"))
    extra = load_checkpoint_file(str(tmp_path / "end.pth"))["nnunet_cl"]["extra"]
    assert "base" not in extra and "experts" not in extra and len(extra["assignments"]) == 16


def test_pretrain_only_checkpoint_is_a_full_network(make_trainer, tmp_path):
    fresh = nnUNetTrainerSepaRegPretrain(tiny_plans(), "3d_fullres", 0, dict(DATASET_JSON), torch.device("cpu"))
    assert fresh.finetune_epochs == 0 and fresh.pretrain_epochs == 50 + 4 * 10 + 40
    t = make_trainer(nnUNetTrainerSepaRegPretrain, finetune_epochs=0)
    assert t.num_epochs == t.pretrain_epochs
    t.current_epoch = t.pretrain_epochs - 1
    t.save_checkpoint(str(tmp_path / "final.pth"))
    ckpt = load_checkpoint_file(str(tmp_path / "final.pth"))
    assert ckpt["network_weights"].keys() == t.network.state_dict().keys()
    assert all(v.shape == t.network.state_dict()[k].shape for k, v in ckpt["network_weights"].items())


# ------------------------------------------------------------------------------------------- end to end
DATASET, DATASET_ID = "Dataset953_KBPSepaTest", "953"
N_LABELED, N_POOL_KBP = 5, 2  # the first 5 OpenKBP cases labeled, the next 2 unlabeled, the next one to predict
POOL_OTHER = "cptac_c3l00189.nii.gz"  # abdomen CT, 428x319x35 at 1x1x5 mm: resampled to the OpenKBP plans' spacing




def _crop(src: Path, dst: Path, size=(40, 56, 56)):
    """Centre crop (z, y, x voxels) of a 128^3 OpenKBP volume: real CT, small enough for CPU fine-tuning."""
    img = sitk.ReadImage(str(src))
    arr = sitk.GetArrayFromImage(img)
    lo = [(s - c) // 2 for s, c in zip(arr.shape, size)]
    out = sitk.GetImageFromArray(arr[tuple(slice(a, a + c) for a, c in zip(lo, size))])
    out.SetSpacing(img.GetSpacing())
    out.SetDirection(img.GetDirection())
    sitk.WriteImage(out, str(dst))


@pytest.fixture(scope="module")
def kbp(tmp_path_factory, shared_data):
    src = shared_data / "OpenKBP_HN"
    other = shared_data / "ct_unlabeled" / POOL_OTHER
    if not (src / "imagesTr").is_dir() or not other.is_file():
        pytest.skip(f"OpenKBP_HN or ct_unlabeled/{POOL_OTHER} missing in {shared_data}")
    root = tmp_path_factory.mktemp("separeg_e2e")
    env = cli_env(root, ["separeg_test_trainers.py"])
    raw = root / "nnUNet_raw" / DATASET
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (src / "imagesTr").glob("*_0000.nii.gz"))
    labeled, pool_kbp = cases[:N_LABELED], cases[N_LABELED:N_LABELED + N_POOL_KBP]
    test_case = cases[N_LABELED + N_POOL_KBP]
    for c in labeled:
        _crop(src / "imagesTr" / f"{c}_0000.nii.gz", raw / "imagesTr" / f"{c}_0000.nii.gz")
        _crop(src / "labelsTr" / f"{c}.nii.gz", raw / "labelsTr" / f"{c}.nii.gz")
    dataset_json = json.loads((src / "dataset.json").read_text())
    dataset_json["numTraining"] = len(labeled)
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    unlabeled, test_in = root / "unlabeled", root / "test_in"
    unlabeled.mkdir(), test_in.mkdir()
    for c in pool_kbp:  # whole 128^3 volumes: only pretraining reads the pool
        shutil.copy(src / "imagesTr" / f"{c}_0000.nii.gz", unlabeled / f"{c}.nii.gz")
    shutil.copy(other, unlabeled / POOL_OTHER)
    _crop(src / "imagesTr" / f"{test_case}_0000.nii.gz", test_in / f"{test_case}_0000.nii.gz")
    run(["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env)
    run(["nnUNetv2_cl_add_unlabeled", "-d", DATASET_ID, "-i", str(unlabeled), "-np", "1"], env)
    return {"root": root, "env": env, "test_in": test_in, "pp": root / "nnUNet_preprocessed" / DATASET,
            "test_case": test_case, "pool_case": pool_kbp[0]}


def fold_folder(kbp, trainer):
    return kbp["root"] / "nnUNet_results" / DATASET / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"


def preview_cmd():
    exe = shutil.which("nnUNetv2_cl_separeg_preview")
    return [exe] if exe else [sys.executable, "-m", "nnunet_cl.methods.separeg.cli"]


def test_preview_before_pretraining(kbp, tmp_path):
    out = tmp_path / "sep.png"
    proc = run(preview_cmd() + ["-d", DATASET_ID, "--case", "cptac_c3l00189", "-o", str(out)], kbp["env"])
    assert "pool_cptac_c3l00189" in proc.stdout and "kept" in proc.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run(preview_cmd() + ["-d", DATASET_ID, "--case", "nope", "-o", str(out)], kbp["env"], check=False)
    assert bad.returncode != 0 and "Fix:" in bad.stderr


@pytest.fixture(scope="module")
def staged(kbp):
    return run(["nnUNetv2_train", DATASET_ID, "3d_fullres", "0", "-tr", "nnUNetTrainerSepaReg_test", "-device", "cpu"],
               kbp["env"])


def test_staged_sepa_reg_trains_and_finetunes(kbp, staged):
    cache = kbp["pp"] / "nnunet_cl_separeg" / "nnUNetPlans_3d_fullres"
    cached = sorted(p.stem for p in cache.glob("*.npz"))
    # 4 labeled images outside fold 0's validation case + 3 ingested scans; never the validation case
    assert len(cached) == 7 and sum(c.startswith("pool_") for c in cached) == 3
    assert "SepaReg separation: 7 case(s)" in staged.stdout
    fold = fold_folder(kbp, "nnUNetTrainerSepaReg_test")
    ckpt = load_checkpoint_file(fold / "checkpoint_final.pth")
    assert ckpt["current_epoch"] == 5 and ckpt["trainer_name"] == "nnUNetTrainerSepaReg_test"
    assert not any(k.startswith(("projector", "predictor", "local")) for k in ckpt["network_weights"])
    log = ckpt["logging"]
    finite = lambda key: [math.isfinite(v) for v in log[key]]  # noqa: E731
    assert finite("cl_region") == [True, False, False, False, False]
    assert finite("cl_expert") == [False, True, True, False, False]
    assert finite("cl_distill") == [False, False, False, True, False]
    assert finite("mean_fg_dice") == [False] * 4 + [True]
    extra = ckpt["nnunet_cl"]["extra"]
    assert "base" not in extra and len(extra["assignments"]) == len(extra["region_id"]) > 30
    assert (fold / "checkpoint_pretrained.pth").is_file() and (fold / "validation" / "summary.json").is_file()
    assert "training expert 1 from the base" in staged.stdout and "Stage switch at epoch 4" in staged.stdout
    # the k-means pass shows a progress bar from its start (tqdm, on stderr)
    assert "SepaReg: embedding regions for k-means" in staged.stderr


def test_predict_with_the_staged_model(kbp, staged, tmp_path):
    out = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(kbp["test_in"]), "-o", str(out), "-d", DATASET_ID, "-c", "3d_fullres",
         "-tr", "nnUNetTrainerSepaReg_test", "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
        kbp["env"])
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{kbp['test_case']}.nii.gz")))
    assert seg.shape == (40, 56, 56) and seg.min() >= 0 and seg.max() <= 7


def test_preview_with_clusters_from_the_checkpoint(kbp, staged, tmp_path):
    out = tmp_path / "clusters.png"
    ckpt = fold_folder(kbp, "nnUNetTrainerSepaReg_test") / "checkpoint_final.pth"
    proc = run(preview_cmd() + ["-d", DATASET_ID, "--case", kbp["pool_case"], "-o", str(out),
                                "--checkpoint", str(ckpt)],
               kbp["env"])
    assert "2 clusters" in proc.stdout and out.is_file()


def test_byol_pretraining_reuses_the_cache_and_loads_as_pretrained_weights(kbp, staged):
    proc = run(["nnUNetv2_train", DATASET_ID, "3d_fullres", "0", "-tr", "nnUNetTrainerSepaRegBYOLPretrain_test",
                "-device", "cpu"], kbp["env"])
    assert "SepaReg separation:" not in proc.stdout  # every case was cached by the staged run
    assert "SepaReg pool: 7 cases" in proc.stdout
    ckpt = fold_folder(kbp, "nnUNetTrainerSepaRegBYOLPretrain_test") / "checkpoint_final.pth"
    ok = run(["nnUNetv2_cl_check_pretrained", "-d", DATASET_ID, "-c", "3d_fullres", "-pretrained_weights", str(ckpt)],
             kbp["env"])
    assert ok.stdout.startswith("OK")
    # what `nnUNetv2_train D 3d_fullres F -pretrained_weights` does, into a plain nnUNetTrainer's network
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(json.loads((kbp["pp"] / "nnUNetPlans.json").read_text()))
    labels = json.loads((kbp["pp"] / "dataset.json").read_text())["labels"]
    net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, len(labels), True)
    load_pretrained_weights(net, str(ckpt))
    pretrained = load_checkpoint_file(ckpt)["network_weights"]
    for key, value in net.state_dict().items():
        if ".seg_layers." not in key:
            assert torch.equal(value, pretrained[key]), key
