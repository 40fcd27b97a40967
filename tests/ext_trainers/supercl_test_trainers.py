"""Tiny-schedule SuperCL trainers for the end-to-end tests (found through a second nnUNet_extTrainer path)."""
import torch

from nnunet_cl_trainers.supercl import nnUNetTrainerSuperCL, nnUNetTrainerSuperCLPretrain


def _tiny(trainer):
    trainer.pretrain_epochs, trainer.pretrain_iterations_per_epoch = 2, 2
    trainer.pretrain_batch_size, trainer.queue_size = 4, 16
    trainer.progress_every_s = 0  # a progress line after every step


class nnUNetTrainerSuperCL_test(nnUNetTrainerSuperCL):
    """Staged: 2 pretraining epochs x 2 steps of 4 patches, then 1 fine-tuning epoch of 2 steps."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _tiny(self)
        self.finetune_epochs, self.finetune_iterations_per_epoch = 1, 2
        self.finetune_val_iterations_per_epoch = 1


class nnUNetTrainerSuperCLPretrain_test(nnUNetTrainerSuperCLPretrain):
    """Pool only, the positional instance term, 1 epoch."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _tiny(self)
        self.pretrain_epochs, self.instance_term = 1, "position"
