"""Schedules of `nnUNetv2_cl_demo`: scratch and SimCLR share the supervised schedule exactly, and both are seeded
with the demo's `--seed` (passed in the environment variable `nnunet_cl.demo.SEED_ENV`), so the same seed gives
the same table."""
import os

import torch

from nnunet_cl.demo import SEED_ENV
from nnunet_cl_trainers.benchmark import nnUNetTrainer_clBench
from nnunet_cl_trainers.simclr import nnUNetTrainerSimCLR


def demo_seed() -> int:
    return int(os.environ.get(SEED_ENV, "0"))


class nnUNetTrainer_clDemo(nnUNetTrainer_clBench):
    """nnU-Net from scratch, 8 epochs x 25 iterations (sized for a 2-core CPU), seeded (initialisation, patches,
    augmentation) like the benchmark's fine-tuning trainer; nnU-Net's final validation is kept."""

    final_validation = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 8, 25, 5
        self.training_seed = demo_seed()


class nnUNetTrainerSimCLR_clDemo(nnUNetTrainerSimCLR):
    """6 pretraining epochs x 25 iterations on the pool, then the schedule of nnUNetTrainer_clDemo."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pretrain_epochs, self.pretrain_iterations_per_epoch = 6, 25
        self.finetune_epochs, self.finetune_iterations_per_epoch, self.finetune_val_iterations_per_epoch = 8, 25, 5
        self.training_seed = demo_seed()


class nnUNetTrainer_clDemoQuick(nnUNetTrainer_clDemo):
    """The reduced demo of the test suite: 2 epochs x 3 iterations, no final validation (the demo predicts and scores
    its held-out cases itself; nnU-Net's validation of the fold would double the test's training time)."""

    final_validation = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 2, 3, 2


class nnUNetTrainerSimCLR_clDemoQuick(nnUNetTrainerSimCLR_clDemo):
    """The reduced demo's SimCLR arm: 2 + 2 epochs x 3 iterations, no final validation (as
    nnUNetTrainer_clDemoQuick)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pretrain_epochs, self.pretrain_iterations_per_epoch = 2, 3
        self.finetune_epochs, self.finetune_iterations_per_epoch, self.finetune_val_iterations_per_epoch = 2, 3, 2

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("No final validation (the reduced demo scores its held-out cases itself)")
