"""Tiny-schedule PCLMix for the end-to-end test on ACDC scribbles (found through a second nnUNet_extTrainer path)."""
import torch

from nnunet_cl_trainers import nnUNetTrainerPCLMix


class nnUNetTrainerPCLMix_test(nnUNetTrainerPCLMix):
    """PCLMix for 2 x 3 steps, the contrast from the second step on, no mirroring (as nnU-Net's
    nnUNetTrainerNoMirroring) and no final validation: the test predicts with nnUNetv2_predict itself."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.finetune_epochs, self.finetune_iterations_per_epoch, self.finetune_val_iterations_per_epoch = 2, 3, 1
        self.contrast_start_iteration = 1

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, do_dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, do_dummy_2d, initial_patch_size, None

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("No final validation (test trainer): the test runs nnUNetv2_predict")
