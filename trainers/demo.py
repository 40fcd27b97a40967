"""Schedules of `nnUNetv2_cl_demo`: scratch and SimCLR share the supervised schedule exactly."""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_cl_trainers.simclr import nnUNetTrainerSimCLR


class nnUNetTrainer_clDemo(nnUNetTrainer):
    """nnU-Net from scratch, 8 epochs x 25 iterations (sized for a 2-core CPU)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 8, 25, 5


class nnUNetTrainerSimCLR_clDemo(nnUNetTrainerSimCLR):
    """6 pretraining epochs x 25 iterations on the pool, then the schedule of nnUNetTrainer_clDemo."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pretrain_epochs, self.pretrain_iterations_per_epoch = 6, 25
        self.finetune_epochs, self.finetune_iterations_per_epoch, self.finetune_val_iterations_per_epoch = 8, 25, 5


class nnUNetTrainer_clDemoQuick(nnUNetTrainer):
    """The reduced demo of the test suite: 2 epochs x 3 iterations."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 2, 3, 2


class nnUNetTrainerSimCLR_clDemoQuick(nnUNetTrainerSimCLR):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pretrain_epochs, self.pretrain_iterations_per_epoch = 2, 3
        self.finetune_epochs, self.finetune_iterations_per_epoch, self.finetune_val_iterations_per_epoch = 2, 3, 2
