"""Fine-tuning pretrained weights with a linear warm-up and a lower peak learning rate.

nnU-Net's own schedule starts at its peak learning rate (1e-2) from the first step: fine for random weights,
but large first updates through a random decoder can wash out what pretraining put into the encoder. DKFZ's
fine-tuning trainer for self-supervised checkpoints (`PretrainedTrainer`, nnU-Net master, unreleased after
2.8.1) instead uses SGD with a peak of 1e-3, reached by a linear warm-up over the first 5 % of the epochs
(50 of 1000), then nnU-Net's poly decay to 0. These trainers follow that recipe on 2.8.1:

    nnUNetv2_train D 3d_fullres 0 -tr nnUNetTrainerFinetune -pretrained_weights CHECKPOINT

Hyperparameters are class attributes (`peak_lr`, `warmup_fraction`), as in nnU-Net's variants.
"""
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class WarmupPolyLRScheduler(PolyLRScheduler):
    """lr(e) = peak * (e + 1) / W for the first W epochs, then peak * (1 - (e - W) / (E - W)) ** 0.9.

    Stepped once per epoch with the epoch, as nnU-Net steps its schedulers. W >= 1, E > W.
    """

    def __init__(self, optimizer, initial_lr: float, max_steps: int, warmup_steps: int, exponent: float = 0.9):
        if max_steps < 2:
            raise ValueError(f"a warm-up schedule needs at least 2 epochs (1 of warm-up), got {max_steps}. Fix: "
                             f"num_epochs >= 2, or nnU-Net's own schedule (nnUNetTrainer) for a 1-epoch run.")
        if not 1 <= warmup_steps < max_steps:
            raise ValueError(f"warm-up of {warmup_steps} epochs needs 1 <= warm-up < {max_steps} epochs")
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, initial_lr, max_steps, exponent)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.initial_lr * (step + 1) / self.warmup_steps
        done = (step - self.warmup_steps) / (self.max_steps - self.warmup_steps)
        return self.initial_lr * max(0.0, 1 - done) ** self.exponent

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(current_step)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def warmup_epochs(num_epochs: int, fraction: float) -> int:
    """Warm-up length in epochs: `fraction` of the run, at least 1 and short of the whole run."""
    return min(max(1, round(fraction * num_epochs)), num_epochs - 1)


class FinetuneRecipe:
    """Mixin for an nnUNetTrainer subclass: SGD as nnU-Net's, `peak_lr` after a linear warm-up over
    `warmup_fraction` of the epochs, then poly decay (the recipe of DKFZ's PretrainedTrainer)."""

    peak_lr = 1e-3
    warmup_fraction = 0.05

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.peak_lr

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True)
        warmup = warmup_epochs(self.num_epochs, self.warmup_fraction)
        self.print_to_log_file(f"{type(self).__name__}: learning rate rises linearly to {self.initial_lr} over "
                               f"{warmup} of {self.num_epochs} epochs, then poly decay")
        return optimizer, WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, warmup)


class nnUNetTrainerFinetune(FinetuneRecipe, nnUNetTrainer):
    """nnUNetTrainer for `-pretrained_weights`: peak 1e-3 after a linear warm-up over 5 % of the epochs."""
