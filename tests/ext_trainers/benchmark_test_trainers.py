"""Tiny schedules of nnUNetv2_cl_benchmark for the test suite (`--schedule clBenchTest`)."""
import torch

from nnunet_cl_trainers.benchmark import nnUNetTrainer_clBench, pretrain_schedule
from nnunet_cl_trainers.finetune import FinetuneRecipe
from nnunet_cl_trainers.polycl import nnUNetTrainerPolyCLPretrain
from nnunet_cl_trainers.simclr import nnUNetTrainerSimCLRPretrain


class nnUNetTrainer_clBenchTest(nnUNetTrainer_clBench):
    """The benchmark's fine-tuning trainer, 2 epochs x 3 iterations."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 2, 3, 2


class nnUNetTrainer_clBenchTestFT(FinetuneRecipe, nnUNetTrainer_clBenchTest):
    """clBenchTest with the fine-tuning recipe (warm-up, peak 1e-3), as clBenchFT is to clBench."""


nnUNetTrainerSimCLRPretrain_clBenchTest = pretrain_schedule(
    nnUNetTrainerSimCLRPretrain, {"pretrain_epochs": 2, "pretrain_batch_size": 4}, suffix="clBenchTest",
    iterations=3, module=__name__)

nnUNetTrainerPolyCLPretrain_clBenchTest = pretrain_schedule(
    nnUNetTrainerPolyCLPretrain, {"pretrain_epochs": 2}, suffix="clBenchTest", iterations=2, module=__name__)
