"""SimCLR reference method: global InfoNCE on pooled bottleneck features of two augmented views."""
import torch
from torch import nn

from nnunet_cl.heads import pooled_embedding, pooled_projection_heads
from nnunet_cl.losses import info_nce_two_views
from nnunet_cl.paths import NnUNetCLError
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

    def check_settings(self) -> None:
        super().check_settings()
        if not self.temperature > 0:
            raise NnUNetCLError(f"temperature={self.temperature}: must be > 0. Fix: e.g. 0.1 (the default).")

    def build_cl_modules(self) -> nn.ModuleDict:
        channels = self.unwrapped_network.encoder.output_channels[-1]
        conv_op = nn.Conv3d if len(self.configuration_manager.patch_size) == 3 else nn.Conv2d
        return nn.ModuleDict(pooled_projection_heads(channels, channels, self.projection_dim, conv_op))

    def pretrain_losses(self, batch: dict) -> dict:
        views = torch.cat([batch["data"], batch["data2"]])
        z = pooled_embedding(self.cl_modules, self.encode(views)[-1])
        z1, z2 = z.chunk(2)
        return {"infonce": info_nce_two_views(z1, z2, self.temperature, gather=self.is_ddp)}


class nnUNetTrainerSimCLRPretrain(nnUNetTrainerSimCLR):
    """Pool only: its checkpoint_final.pth goes to `nnUNetv2_train ... -pretrained_weights` of any trainer."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.finetune_epochs = 0
