"""The staged base trainer at the Python level, on a tiny hand-written plan (no preprocessing needed)."""
import math
import os

import pytest
import torch

from nnunet_cl_trainers import nnUNetTrainerSimCLR, nnUNetTrainerSimCLRPretrain
import nnunet_cl_trainers.base as trainer_base
from nnunet_cl_trainers.base import FINETUNE, PRETRAIN

from helpers import fake_preprocessed_folder, tiny_plans

DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 4,
                "file_ending": ".nii.gz"}




@pytest.fixture
def make_trainer(nnunet_env):
    fake_preprocessed_folder(nnunet_env, "Dataset997_Tiny")

    def make(cls=nnUNetTrainerSimCLR, **attrs):
        trainer = cls(tiny_plans(), "3d_fullres", 0, dict(DATASET_JSON), torch.device("cpu"))
        for k, v in attrs.items():
            setattr(trainer, k, v)
        trainer.initialize()
        return trainer
    return make


def two_view_batch(seed=0, n=4, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 1, 16, 16, 16), generator=g)
    # two views of the same images: intensity change and noise, so the positive pairs are learnable
    return {"data": x, "data2": 1.1 * x + noise * torch.randn(x.shape, generator=g), "keys": list(range(n))}


def test_heads_live_beside_the_stock_network(make_trainer):
    trainer = make_trainer()
    net_keys = set(trainer.network.state_dict())
    assert not any(k.startswith(("projector", "local")) for k in net_keys)
    assert set(trainer.cl_modules.keys()) == {"local", "projector"}
    assert trainer.num_epochs == trainer.pretrain_epochs + trainer.finetune_epochs
    for key in ("cl_total", "cl_infonce"):
        assert key in trainer.logger.local_logger.my_fantastic_logging


def test_simclr_steps_on_a_fixed_batch_lower_the_loss(make_trainer):
    torch.manual_seed(0)
    trainer = make_trainer(pretrain_lr=3e-3)
    assert trainer.stage() == PRETRAIN and isinstance(trainer.optimizer, torch.optim.AdamW)
    batch = two_view_batch(noise=1.0)  # noisy enough that the first step is far from the minimum
    losses = [float(trainer.train_step(batch)["loss"]) for _ in range(15)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.1, losses


def test_initialize_sets_the_mmap_threshold(make_trainer, monkeypatch):
    """The glibc setting of nnunet_cl.memory (its effect is tested in test_memory.py) is made by every trainer."""
    calls = []
    monkeypatch.setattr(trainer_base, "fix_mmap_threshold", calls.append)
    trainer = make_trainer()
    assert calls == [trainer.mmap_threshold_bytes] and trainer.mmap_threshold_bytes > 0



def test_training_seed_fixes_initialisation_and_augmentation_streams(make_trainer, monkeypatch, tmp_path):
    """With training_seed the network and the heads start alike in every run, and each augmenter of the run gets
    worker seeds of its own (trainers/seeding.py); without it nothing is seeded, as in nnU-Net."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    torch.manual_seed(1)
    a = make_trainer(training_seed=7)
    torch.manual_seed(2)  # the global state before the run must not matter
    b = make_trainer(training_seed=7)
    for x, y in ((a.network, b.network), (a.cl_modules, b.cl_modules)):
        sa, sb = x.state_dict(), y.state_dict()
        assert sa and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [a.augmenter(object()).seeds for _ in range(2)] == [[7100], [7200]]  # e.g. the pool loader
    # at the stage switch nnU-Net's get_dataloaders builds its two augmenters: streams 3 and 4, at that epoch
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as nnunet_module

    def nnunet_loaders(self):
        return tuple(nnunet_module.NonDetMultiThreadedAugmenter(object(), None, num_processes=1) for _ in range(2))

    monkeypatch.setattr(nnunet_module.nnUNetTrainer, "get_dataloaders", nnunet_loaders)
    a.current_epoch = a.pretrain_epochs
    assert a.stage() == FINETUNE
    from nnunet_cl_trainers.seeding import augmenter_seed
    assert [x.seeds for x in a.get_dataloaders()] == [[augmenter_seed(7, n, 0, a.pretrain_epochs)] for n in (3, 4)]
    assert a._augmenters_built == 4
    assert nnunet_module.NonDetMultiThreadedAugmenter(object(), None, num_processes=1).seeds == [None]  # restored
    # resumed (--c) at that epoch, the training process does not replay the fresh run's stream either
    a.save_checkpoint(str(tmp_path / "checkpoint_latest.pth"))
    resumed = make_trainer(training_seed=7)
    resumed.load_checkpoint(str(tmp_path / "checkpoint_latest.pth"))
    drawn = torch.rand(4)
    from nnunet_cl_trainers.seeding import seed_everything
    seed_everything(augmenter_seed(7, 0, 0, resumed.current_epoch))  # stream 0 (the process) at the resumed epoch
    assert resumed.current_epoch == a.pretrain_epochs + 1 and torch.equal(drawn, torch.rand(4))
    seed_everything(7)
    assert not torch.equal(drawn, torch.rand(4))
    c = make_trainer()
    assert c.training_seed is None and c.augmenter(object()).seeds == [None]
    c.current_epoch = c.pretrain_epochs
    assert [x.seeds for x in c.get_dataloaders()] == [[None], [None]]
    weight = "encoder.stages.0.0.convs.0.conv.weight"
    assert not torch.equal(c.network.state_dict()[weight], a.network.state_dict()[weight])


def test_embeddings_start_spread_out_not_collapsed(make_trainer):
    """Without the projector's BatchNorm every image starts at nearly one embedding: NT-Xent's collapse value."""
    torch.manual_seed(0)
    trainer = make_trainer()
    heads = trainer.cl_modules
    x = two_view_batch(n=8)["data"]
    with torch.no_grad():
        pooled = heads["local"](trainer.encode(x)[-1]).flatten(2).mean(-1)
        with_bn = torch.nn.functional.normalize(heads["projector"](pooled), dim=1)
        no_bn = [m for m in heads["projector"] if not isinstance(m, torch.nn.BatchNorm1d)]
        without_bn = torch.nn.functional.normalize(torch.nn.Sequential(*no_bn)(pooled), dim=1)
    off_diagonal = ~torch.eye(len(x), dtype=torch.bool)
    mean_cos = lambda z: (z @ z.T)[off_diagonal].mean().item()  # noqa: E731
    assert mean_cos(without_bn) > 0.95  # the failure the BatchNorm is there for
    assert mean_cos(with_bn) < 0.5


def test_resume_mid_pretraining_restores_heads_and_optimizer(make_trainer, tmp_path):
    torch.manual_seed(0)
    trainer = make_trainer()
    for _ in range(3):
        trainer.train_step(two_view_batch())
    trainer.current_epoch = 4
    for key in trainer.logger.local_logger.my_fantastic_logging:  # nnU-Net's logger wants one value per epoch
        trainer.logger.local_logger.my_fantastic_logging[key] = [0.0] * 5
    ckpt = str(tmp_path / "checkpoint_latest.pth")
    trainer.save_checkpoint(ckpt)
    assert not os.path.exists(ckpt + ".tmp")

    resumed = make_trainer()
    resumed.load_checkpoint(ckpt)
    assert resumed.current_epoch == 5 and resumed.stage() == PRETRAIN
    for k, v in trainer.cl_modules.state_dict().items():
        assert torch.equal(v, resumed.cl_modules.state_dict()[k])
    for k, v in trainer.network.state_dict().items():
        assert torch.equal(v, resumed.network.state_dict()[k])
    a, b = trainer.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert isinstance(resumed.optimizer, torch.optim.AdamW) and len(a["state"]) == len(b["state"]) > 0
    for i, s in a["state"].items():
        assert torch.equal(s["exp_avg"], b["state"][i]["exp_avg"])
    # both continue identically from here
    batch = two_view_batch(seed=1)
    torch.manual_seed(1)
    la = float(trainer.train_step(batch)["loss"])
    torch.manual_seed(1)
    lb = float(resumed.train_step(batch)["loss"])
    assert la == pytest.approx(lb, rel=1e-5)


def test_checkpoint_from_last_pretraining_epoch_resumes_into_finetuning(make_trainer, tmp_path):
    trainer = make_trainer(pretrain_epochs=2, finetune_epochs=3)
    trainer.current_epoch = 1  # the last pretraining epoch; the checkpoint records epoch 2
    ckpt = str(tmp_path / "checkpoint_pretrained.pth")
    trainer.save_checkpoint(ckpt)
    resumed = make_trainer(pretrain_epochs=2, finetune_epochs=3)
    resumed.load_checkpoint(ckpt)
    assert resumed.stage() == FINETUNE
    assert isinstance(resumed.optimizer, torch.optim.AdamW)  # the saved state belongs to the pretraining optimiser
    resumed.num_iterations_per_epoch = 0
    resumed.dataloader_train = resumed.dataloader_val = object()  # stand-ins: no data is read in this test
    resumed.on_train_epoch_start()
    assert isinstance(resumed.optimizer, torch.optim.SGD)  # nnU-Net's own optimiser from the switch on
    assert not any(p is q for g in resumed.optimizer.param_groups for p in g["params"]
                   for q in resumed.cl_modules.parameters())


class _WithAuxiliaryLoss(nnUNetTrainerSimCLR):
    """An auxiliary-loss method in miniature: a term on the heads' pooled bottleneck, added during fine-tuning."""

    has_auxiliary_loss = True
    feature_request = {"encoder": (-1,)}

    def auxiliary_losses(self, batch, output, features):
        pooled = self.cl_modules["local"](features["enc-1"]).flatten(2).mean(-1)
        return {"aux": pooled.pow(2).mean()}


def test_auxiliary_loss_trains_the_heads_during_fine_tuning(make_trainer):
    torch.manual_seed(0)
    trainer = make_trainer(cls=_WithAuxiliaryLoss, pretrain_epochs=1, finetune_epochs=2)
    trainer.current_epoch = 1
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    assert trainer.stage() == FINETUNE and isinstance(trainer.optimizer, torch.optim.SGD)
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in trainer.cl_modules.parameters()} <= in_optimizer
    assert {id(p) for p in trainer.network.parameters()} <= in_optimizer
    x = two_view_batch()["data"]
    with torch.no_grad():
        outputs = trainer.network(x)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    target = [torch.zeros_like(o[:, :1]) for o in outputs]  # background everywhere, at every output scale
    target = target if len(target) > 1 else target[0]
    head = trainer.cl_modules["local"]
    before = [p.detach().clone() for p in head.parameters()]
    out = trainer.train_step({"data": x, "target": target})
    assert math.isfinite(float(out["cl_aux"])) and float(out["cl_aux"]) > 0
    assert float(out["loss"]) > float(out["cl_aux"])  # nnU-Net's segmentation loss plus the term
    assert out["cl_total"] == pytest.approx(float(out["cl_aux"]))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, head.parameters()))


def test_pretraining_only_trainer_skips_validation(make_trainer, capsys):
    trainer = make_trainer(cls=nnUNetTrainerSimCLRPretrain)
    assert trainer.finetune_epochs == 0 and trainer.num_epochs == trainer.pretrain_epochs
    trainer.perform_actual_validation()
    assert "-pretrained_weights" in capsys.readouterr().out


def test_attribute_variant_sets_only_known_attributes(nnunet_env):
    from nnunet_cl_trainers.base import attribute_variant
    fake_preprocessed_folder(nnunet_env, "Dataset997_Tiny")
    short = attribute_variant(nnUNetTrainerSimCLR, "nnUNetTrainerSimCLR_probe", __name__, pretrain_epochs=3)
    trainer = short(tiny_plans(), "3d_fullres", 0, dict(DATASET_JSON), torch.device("cpu"))
    assert trainer.pretrain_epochs == 3 and isinstance(trainer, nnUNetTrainerSimCLR)
    assert short.__qualname__ == "nnUNetTrainerSimCLR_probe" and "pretrain_epochs=3" in short.__doc__
    typo = attribute_variant(nnUNetTrainerSimCLR, "nnUNetTrainerSimCLR_typo", __name__, pretrain_epoch=3)
    with pytest.raises(AttributeError, match="no attribute 'pretrain_epoch'"):
        typo(tiny_plans(), "3d_fullres", 0, dict(DATASET_JSON), torch.device("cpu"))


def test_long_pretraining_arms_scale_only_the_stage_lengths(nnunet_env):
    """'<method>5x' arms: the same method and schedule with 5 times each pretraining stage; k, batch size and
    iterations per epoch stay, so the arm differs from its short twin only in pretraining steps."""
    from nnunet_cl.bench.design import DEFAULT_ARMS, KNOWN_ARMS, parse_arms
    from nnunet_cl_trainers import benchmark as bench
    fake_preprocessed_folder(nnunet_env, "Dataset997_Tiny")
    for method, pretrainer in KNOWN_ARMS.items():
        if not method.endswith("5x"):
            continue
        base = pretrainer[:-2]
        for suffix in bench.SCHEDULES:
            short, long = (getattr(bench, f"{p}_{suffix}")(dict(tiny_plans(), continue_training=False), "3d_fullres",
                                                           0, dict(DATASET_JSON), torch.device("cpu"))
                           for p in (base, pretrainer))
            stages = bench.SCHEDULES[suffix]["pretrain"][base]
            assert any(k.endswith("_epochs") for k in stages)
            for key, value in stages.items():
                assert getattr(short, key) == value
                assert getattr(long, key) == (bench.LONG_PRETRAIN * value if key.endswith("_epochs") else value)
            assert long.pretrain_iterations_per_epoch == short.pretrain_iterations_per_epoch
            assert long.finetune_epochs == short.finetune_epochs == 0
    assert parse_arms(["separeg5x"]) == [("separeg5x", "nnUNetTrainerSepaRegPretrain5x")]
    assert not any(a.endswith("5x") for a in DEFAULT_ARMS)  # on request only


# ------------------------------------------------------------------------------------------- reliability
class _WritesAFile:
    """Unpickling this writes a file: what a hostile checkpoint could do with weights_only=False."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_resume_refuses_a_checkpoint_that_carries_code(make_trainer, tmp_path):
    from nnunet_cl.safe_load import UnsafeCheckpointError
    marker = tmp_path / "code_ran"
    crafted = tmp_path / "checkpoint_latest.pth"
    torch.save({"network_weights": {}, "x": _WritesAFile(str(marker))}, crafted)
    with pytest.raises(UnsafeCheckpointError, match="Refused to load .*could run code"):
        make_trainer().load_checkpoint(str(crafted))
    assert not marker.exists()


def test_a_truncated_latest_checkpoint_resumes_from_the_previous_one(make_trainer, capsys):
    trainer = make_trainer()
    latest = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
    os.makedirs(trainer.output_folder, exist_ok=True)
    trainer.current_epoch = 3
    trainer.save_checkpoint(latest)  # becomes the previous one at the next save
    trainer.current_epoch = 5
    trainer.save_checkpoint(latest)
    assert os.path.isfile(trainer_base.previous_checkpoint(latest))
    with open(latest, "r+b") as f:  # a crash of the disk, not of our write (which is atomic)
        f.truncate(os.path.getsize(latest) // 2)
    resumed = make_trainer()
    resumed.load_checkpoint(latest)
    assert resumed.current_epoch == 4  # the previous checkpoint's next epoch
    assert "Resuming from the checkpoint saved before it" in capsys.readouterr().out
    os.remove(trainer_base.previous_checkpoint(latest))
    with pytest.raises(trainer_base.NnUNetCLError, match="No earlier checkpoint to fall back to. Fix: delete"):
        make_trainer().load_checkpoint(latest)


def test_bad_settings_are_refused_at_set_up(make_trainer):
    from nnunet_cl_trainers import nnUNetTrainerPolyCL
    with pytest.raises(trainer_base.NnUNetCLError, match="gives 1 scan.* Fix: set pretrain_batch_size >= 4"):
        make_trainer(cls=nnUNetTrainerPolyCL, pretrain_batch_size=2)
    with pytest.raises(trainer_base.NnUNetCLError, match="strategy 'X'"):
        make_trainer(cls=nnUNetTrainerPolyCL, strategy="X")
    with pytest.raises(trainer_base.NnUNetCLError, match="stage lengths must be >= 0"):
        make_trainer(finetune_epochs=-1)
    with pytest.raises(trainer_base.NnUNetCLError, match="pretrain_batch_size=1: a whole number >= 2"):
        make_trainer(pretrain_batch_size=1)
    with pytest.raises(trainer_base.NnUNetCLError, match="temperature=0: must be > 0"):
        make_trainer(temperature=0)
    with pytest.raises(trainer_base.NnUNetCLError, match="pretrain_lr=-1"):
        make_trainer(pretrain_lr=-1)


class _WithExtraOptimizer(nnUNetTrainerSimCLR):
    """The projector gets an optimiser of its own (as a positive generator would)."""

    def build_extra_optimizers(self):
        return {"projector": torch.optim.SGD(self.cl_modules["projector"].parameters(), lr=0.1, momentum=0.9)}


def test_an_extra_optimizer_steps_its_modules_and_round_trips(make_trainer, tmp_path):
    torch.manual_seed(0)
    trainer = make_trainer(cls=_WithExtraOptimizer)
    main = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    extra = trainer.extra_optimizers["projector"]
    assert not main & {id(p) for p in trainer.cl_modules["projector"].parameters()}  # left to its own optimiser
    before = [p.detach().clone() for p in trainer.cl_modules["projector"].parameters()]
    trainer.train_step(two_view_batch())
    assert all(not torch.equal(a, b) for a, b in zip(before, trainer.cl_modules["projector"].parameters()))
    assert extra.state  # momentum buffers exist after the step
    ckpt = str(tmp_path / "c.pth")
    trainer.save_checkpoint(ckpt)
    resumed = make_trainer(cls=_WithExtraOptimizer)
    resumed.load_checkpoint(ckpt)
    for a, b in zip(extra.state.values(), resumed.extra_optimizers["projector"].state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    batch = two_view_batch(seed=3)
    assert float(resumed.train_step(batch)["loss"]) == pytest.approx(float(trainer.train_step(batch)["loss"]),
                                                                     rel=1e-6)


def test_an_empty_dataset_is_named_with_the_fix(nnunet_env):
    (nnunet_env["nnUNet_preprocessed"] / "Dataset997_Tiny" / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    trainer = nnUNetTrainerSimCLR(tiny_plans(), "3d_fullres", 0, dict(DATASET_JSON), torch.device("cpu"))
    with pytest.raises(trainer_base.NnUNetCLError, match="No preprocessed case in .*Fix: nnUNetv2_plan_and_preprocess "
                                                         "-d Dataset997_Tiny -c 3d_fullres"):
        trainer.initialize()


def test_gradients_are_clipped_per_optimiser(make_trainer, monkeypatch):
    """A huge gradient in an extra optimiser's module is clipped to 12 alone; the network's gradient is untouched."""
    torch.manual_seed(0)
    trainer = make_trainer(cls=_WithExtraOptimizer)
    clipped = []
    real = torch.nn.utils.clip_grad_norm_

    def record(params, max_norm):
        params = list(params)
        clipped.append(({id(p) for p in params}, float(real(params, max_norm))))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record)
    original = trainer.pretrain_losses
    trainer.pretrain_losses = lambda batch: {k: v + 1e6 * sum(p.sum() for p in trainer.cl_modules["projector"].
                                                                 parameters()) for k, v in original(batch).items()}
    trainer.train_step(two_view_batch())
    network = {id(p) for p in trainer.network.parameters()}
    projector = {id(p) for p in trainer.cl_modules["projector"].parameters()}
    assert len(clipped) == 2
    (first, norm_main), (second, norm_extra) = clipped
    assert network <= first and not first & projector and second == projector
    assert norm_extra > 1e5 > norm_main  # the projector's norm was clipped on its own
