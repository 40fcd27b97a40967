"""Thin variants for common stage lengths, in nnU-Net's naming style (`nnUNetTrainer_100epochs` ...).

`_<P>pt_<F>ft`: P pretraining epochs, then F fine-tuning epochs, 250 iterations each as in nnU-Net.
"""
from nnunet_cl_trainers.base import attribute_variant
from nnunet_cl_trainers.simclr import nnUNetTrainerSimCLR, nnUNetTrainerSimCLRPretrain


def _stages(base, pretrain_epochs: int, finetune_epochs: int | None = None):
    """`base` with only the stage lengths set (like nnU-Net's epoch variants)."""
    attrs = {"pretrain_epochs": pretrain_epochs}
    if finetune_epochs is not None:
        attrs["finetune_epochs"] = finetune_epochs
    suffix = f"_{pretrain_epochs}pt" + (f"_{finetune_epochs}ft" if finetune_epochs is not None else "")
    return attribute_variant(base, base.__name__ + suffix, __name__, **attrs)


nnUNetTrainerSimCLR_10pt_50ft = _stages(nnUNetTrainerSimCLR, 10, 50)
nnUNetTrainerSimCLR_50pt_250ft = _stages(nnUNetTrainerSimCLR, 50, 250)
nnUNetTrainerSimCLR_100pt_1000ft = _stages(nnUNetTrainerSimCLR, 100, 1000)  # the defaults, named for sweeps
nnUNetTrainerSimCLRPretrain_10pt = _stages(nnUNetTrainerSimCLRPretrain, 10)
nnUNetTrainerSimCLRPretrain_50pt = _stages(nnUNetTrainerSimCLRPretrain, 50)
nnUNetTrainerSimCLRPretrain_300pt = _stages(nnUNetTrainerSimCLRPretrain, 300)
