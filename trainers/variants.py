"""Thin variants for common stage lengths, in nnU-Net's naming style (`nnUNetTrainer_100epochs` ...).

`_<P>pt_<F>ft`: P pretraining epochs, then F fine-tuning epochs, 250 iterations each as in nnU-Net.
"""
import torch

from nnunet_cl_trainers.simclr import nnUNetTrainerSimCLR, nnUNetTrainerSimCLRPretrain


def _stages(base, pretrain_epochs: int, finetune_epochs: int | None = None):
    """Make a subclass of `base` that only sets the stage lengths (like nnU-Net's epoch variants)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.pretrain_epochs = pretrain_epochs
        if finetune_epochs is not None:
            self.finetune_epochs = finetune_epochs

    suffix = f"_{pretrain_epochs}pt" + (f"_{finetune_epochs}ft" if finetune_epochs is not None else "")
    return type(base.__name__ + suffix, (base,), {"__init__": __init__, "__module__": __name__})


nnUNetTrainerSimCLR_10pt_50ft = _stages(nnUNetTrainerSimCLR, 10, 50)
nnUNetTrainerSimCLR_50pt_250ft = _stages(nnUNetTrainerSimCLR, 50, 250)
nnUNetTrainerSimCLR_100pt_1000ft = _stages(nnUNetTrainerSimCLR, 100, 1000)
nnUNetTrainerSimCLRPretrain_10pt = _stages(nnUNetTrainerSimCLRPretrain, 10)
nnUNetTrainerSimCLRPretrain_50pt = _stages(nnUNetTrainerSimCLRPretrain, 50)
nnUNetTrainerSimCLRPretrain_300pt = _stages(nnUNetTrainerSimCLRPretrain, 300)
