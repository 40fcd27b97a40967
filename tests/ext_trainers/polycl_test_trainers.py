"""Tiny-schedule PolyCL trainers for the end-to-end tests (found through a second nnUNet_extTrainer path)."""
import torch

from nnunet_cl_trainers.polycl import nnUNetTrainerPolyCL, nnUNetTrainerPolyCLPretrain


class nnUNetTrainerPolyCL_M_test(nnUNetTrainerPolyCL):
    """Staged PolyCL-M, many-negatives form: 2 pretraining epochs x 1 step of 8 patches, 1 fine-tuning step.

    No final validation: on a 2-core CPU it costs more than the rest of the run, and the hippocampus end-to-end
    test already covers the staged base trainer's validation; this test predicts through nnUNetv2_predict.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.strategy, self.loss_form = "M", "infonce"
        self.pretrain_epochs, self.pretrain_iterations_per_epoch = 2, 1
        self.finetune_epochs, self.finetune_iterations_per_epoch = 1, 1
        self.finetune_val_iterations_per_epoch = 1

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("Final validation skipped by the test trainer")


class nnUNetTrainerPolyCLPretrain_O_test(nnUNetTrainerPolyCLPretrain):
    """Pool only, PolyCL-O with the paper's triplet form, run on the pretraining plans variant."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.strategy, self.loss_form = "O", "triplet"
        self.pretrain_epochs, self.pretrain_iterations_per_epoch = 1, 2
