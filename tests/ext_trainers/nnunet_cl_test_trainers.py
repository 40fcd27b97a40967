"""Tiny-schedule trainers for the end-to-end tests (found through a second nnUNet_extTrainer path)."""
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_cl_trainers import nnUNetTrainerDCLSeg, nnUNetTrainerSimCLR, nnUNetTrainerSimCLRPretrain


class nnUNetTrainerSimCLR_test(nnUNetTrainerSimCLR):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pretrain_epochs, self.pretrain_iterations_per_epoch = 2, 3
        self.finetune_epochs, self.finetune_iterations_per_epoch = 2, 3
        self.finetune_val_iterations_per_epoch = 2


class nnUNetTrainerSimCLRPretrain_test(nnUNetTrainerSimCLRPretrain):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pretrain_epochs, self.pretrain_iterations_per_epoch = 2, 3


class nnUNetTrainer_clTest(nnUNetTrainer):
    """Plain nnU-Net with the fine-tuning schedule of the tiny trainers above."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 2, 3, 2


class nnUNetTrainerDCLSeg_test(nnUNetTrainerDCLSeg):
    """DCL-Seg with the fine-tuning schedule of the tiny trainers above."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.finetune_epochs, self.finetune_iterations_per_epoch, self.finetune_val_iterations_per_epoch = 2, 3, 2
        self.anchors_per_sample = 64
