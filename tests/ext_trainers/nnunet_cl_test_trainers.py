"""Tiny-schedule trainers for the end-to-end tests (found through a second nnUNet_extTrainer path)."""
import torch

from nnunet_cl_trainers import nnUNetTrainerSimCLR


class nnUNetTrainerSimCLR_test(nnUNetTrainerSimCLR):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pretrain_epochs, self.pretrain_iterations_per_epoch = 2, 3
        self.finetune_epochs, self.finetune_iterations_per_epoch = 2, 3
        self.finetune_val_iterations_per_epoch = 2
