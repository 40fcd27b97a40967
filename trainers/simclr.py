"""SimCLR reference method: global InfoNCE on pooled bottleneck features of two augmented views."""
import torch
from torch import nn

from nnunet_cl.losses import info_nce_two_views
from nnunet_cl_trainers.base import nnUNetTrainerCLBase


class nnUNetTrainerSimCLR(nnUNetTrainerCLBase):
    """Staged: `pretrain_epochs` of SimCLR on the pool, then `finetune_epochs` of nnU-Net on the labeled split.

    Each pool sample gives two views (nnU-Net's augmentation drawn twice); both go through the stock encoder
    in one pass, the bottleneck is average-pooled and projected (MLP outside self.network), and every other
    view in the batch is a negative (NT-Xent, Chen et al. 2020).
    """

    loss_terms = ("infonce",)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.temperature = 0.1
        self.projection_dim = 128

    def build_cl_modules(self) -> nn.ModuleDict:
        channels = self.unwrapped_network.encoder.output_channels[-1]
        conv = self.configuration_manager.network_arch_init_kwargs.get("conv_op", "Conv3d")
        conv_op = nn.Conv3d if str(conv).endswith("3d") else nn.Conv2d
        return nn.ModuleDict({
            # nnU-Net's bottleneck ends in InstanceNorm + LeakyReLU, so a plain average over space is nearly the
            # same vector for every image; a 1x1 conv and nonlinearity before pooling keeps it informative
            "local": nn.Sequential(conv_op(channels, channels, 1), nn.LeakyReLU(inplace=True)),
            "projector": nn.Sequential(nn.Linear(channels, channels), nn.ReLU(inplace=True),
                                       nn.Linear(channels, self.projection_dim))})

    def pretrain_losses(self, batch: dict) -> dict:
        views = torch.cat([batch["data"], batch["data2"]])
        bottleneck = self.cl_modules["local"](self.encode(views)[-1])
        z = self.cl_modules["projector"](bottleneck.flatten(2).mean(-1))
        z1, z2 = z.chunk(2)
        return {"infonce": info_nce_two_views(z1, z2, self.temperature, gather=self.is_ddp)}


class nnUNetTrainerSimCLRPretrain(nnUNetTrainerSimCLR):
    """Pool only: its checkpoint_final.pth goes to `nnUNetv2_train ... -pretrained_weights` of any trainer."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.finetune_epochs = 0
