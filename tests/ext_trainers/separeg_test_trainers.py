"""Tiny-schedule SepaReg trainers for the end-to-end tests (found through a second nnUNet_extTrainer path).

Each phase lasts one epoch of two steps: region pretraining, two experts, distillation, then one fine-tuning
epoch, so a whole staged run on a few small CTs takes well under a minute of training on a CPU.
"""
import torch

from nnunet_cl_trainers.separeg import nnUNetTrainerSepaReg
from nnunet_cl_trainers.variants import nnUNetTrainerSepaRegBYOLPretrain


def _tiny(trainer):
    trainer.region_epochs, trainer.expert_epochs, trainer.distill_epochs, trainer.k = 1, 1, 1, 2
    trainer.pretrain_iterations_per_epoch = 2
    trainer.regions_per_step = 4
    trainer.n_segments, trainer.crop_size = 16, 16  # about 15 crops of 16^3 per case


class nnUNetTrainerSepaReg_test(nnUNetTrainerSepaReg):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _tiny(self)
        self.finetune_epochs, self.finetune_iterations_per_epoch = 1, 2
        self.finetune_val_iterations_per_epoch = 1


class nnUNetTrainerSepaRegBYOLPretrain_test(nnUNetTrainerSepaRegBYOLPretrain):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _tiny(self)
