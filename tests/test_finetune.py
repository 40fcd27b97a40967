"""The fine-tuning recipe for pretrained weights (trainers/finetune.py): a linear warm-up to a peak of 1e-3, then
nnU-Net's poly decay; and the benchmark's fine-tuning schedule that uses it for every arm (`clBenchFT`)."""
import pytest
import torch

from nnunet_cl_trainers.finetune import WarmupPolyLRScheduler, nnUNetTrainerFinetune, warmup_epochs

from helpers import fake_preprocessed_folder, tiny_plans

DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 4,
                "file_ending": ".nii.gz"}


def _optimizer(lr=1e-3):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(epochs: int, warmup: int, peak: float = 1e-3) -> list[float]:
    opt = _optimizer(peak)
    scheduler = WarmupPolyLRScheduler(opt, peak, epochs, warmup)
    out = []
    for epoch in range(epochs):  # nnU-Net steps its scheduler with the epoch at every epoch start
        scheduler.step(epoch)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_learning_rate_rises_linearly_then_decays_to_zero():
    lrs = _lrs(40, 2)
    assert lrs[:3] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))  # poly decay after the peak
    assert lrs[-1] == pytest.approx(1e-3 * (1 / 38) ** 0.9)
    dkfz = _lrs(1000, 50)  # DKFZ's PretrainedTrainer: 50 of 1000 epochs, from peak / 50 up to the peak
    assert dkfz[0] == pytest.approx(2e-5) and dkfz[49] == pytest.approx(1e-3) and dkfz[50] == pytest.approx(1e-3)


def test_warmup_length_and_bad_warmup():
    assert [warmup_epochs(n, 0.05) for n in (40, 1000, 10, 2)] == [2, 50, 1, 1]
    with pytest.raises(ValueError, match="warm-up of 10 epochs"):
        WarmupPolyLRScheduler(_optimizer(), 1e-3, 10, 10)
    with pytest.raises(ValueError, match="at least 2 epochs .* Fix: num_epochs >= 2"):
        WarmupPolyLRScheduler(_optimizer(), 1e-3, 1, warmup_epochs(1, 0.05))


def test_trainers_use_the_recipe(nnunet_env):
    from nnunet_cl_trainers.benchmark import SCHEDULES, nnUNetTrainer_clBench, nnUNetTrainer_clBenchFT
    fake_preprocessed_folder(nnunet_env, "Dataset997_Tiny")

    def make(cls):
        return cls(dict(tiny_plans(), continue_training=False), "3d_fullres", 0, dict(DATASET_JSON),
                   torch.device("cpu"))

    bench, stock = make(nnUNetTrainer_clBenchFT), make(nnUNetTrainer_clBench)
    # the benchmark variant changes only the learning rate schedule: same steps, seed and validation
    assert (bench.num_epochs, bench.num_iterations_per_epoch, bench.num_val_iterations_per_epoch) == \
        SCHEDULES["clBench"]["finetune"] == (stock.num_epochs, stock.num_iterations_per_epoch,
                                             stock.num_val_iterations_per_epoch)
    assert bench.seed == stock.seed and stock.initial_lr == 1e-2 and bench.initial_lr == 1e-3
    for trainer, warmup in ((bench, 2), (make(nnUNetTrainerFinetune), 50)):
        trainer.network = torch.nn.Conv3d(1, 2, 1)  # configure_optimizers needs only the parameters
        optimizer, scheduler = trainer.configure_optimizers()
        assert isinstance(optimizer, torch.optim.SGD) and scheduler.warmup_steps == warmup
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / warmup)  # the first epoch's
