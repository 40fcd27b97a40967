# ruff: noqa: F401, F403
"""nnU-Net trainer classes of nnunet-cl (installed as the package `nnunet_cl_trainers`).

It only re-exports the trainers (hence the noqa above), importing nothing beyond torch, nnunetv2 and
nnunet_cl's core: an optional dependency failing at import time would break nnU-Net's whole trainer lookup.
"""
from nnunet_cl_trainers.base import nnUNetTrainerCLBase
from nnunet_cl_trainers.simclr import nnUNetTrainerSimCLR, nnUNetTrainerSimCLRPretrain
from nnunet_cl_trainers.variants import *  # noqa: F401,F403
from nnunet_cl_trainers.finetune import nnUNetTrainerFinetune
from nnunet_cl_trainers.separeg import nnUNetTrainerSepaReg, nnUNetTrainerSepaRegPretrain
from nnunet_cl_trainers.polycl import nnUNetTrainerPolyCL, nnUNetTrainerPolyCLPretrain
from nnunet_cl_trainers.supercl import nnUNetTrainerSuperCL, nnUNetTrainerSuperCLPretrain
from nnunet_cl_trainers.dclseg import nnUNetTrainerDCLSeg
from nnunet_cl_trainers.pclmix import nnUNetTrainerPCLMix
from nnunet_cl_trainers.benchmark import *
from nnunet_cl_trainers.demo import (nnUNetTrainer_clDemo, nnUNetTrainer_clDemoQuick, nnUNetTrainerSimCLR_clDemo,  # after benchmark
                                     nnUNetTrainerSimCLR_clDemoQuick)
