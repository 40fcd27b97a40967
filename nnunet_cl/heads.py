"""Heads that turn an nnU-Net feature map into an image-level embedding."""
import torch
from torch import nn

from nnunet_cl.distributed import CrossRankBatchNorm1d


def local_head(channels: int, conv_op=nn.Conv3d) -> nn.Sequential:
    """1x1 conv + LeakyReLU, applied to a feature map before global average pooling (see below for why)."""
    return nn.Sequential(conv_op(channels, channels, 1), nn.LeakyReLU(inplace=True))


def pooled_projection_heads(channels: int, hidden: int, out_dim: int, conv_op=nn.Conv3d) -> dict[str, nn.Module]:
    """{'local': 1x1 conv + LeakyReLU, 'projector': MLP channels -> hidden (BatchNorm) -> out_dim}.

    nnU-Net's encoder stages end in InstanceNorm + LeakyReLU, so the spatial average of a stage is nearly the
    same vector for every image; a learned 1x1 conv and nonlinearity before pooling keep the average informative.
    Even so, at initialisation the pooled vectors of different images differ by well under 1% (cosine 0.999), and
    a plain MLP maps them onto one embedding: NT-Xent then starts at its collapse value ln(2N - 1) with tiny
    gradients (the demo stayed there). The BatchNorm in the projector (as in SimCLR's own head) removes that
    shared component across the batch, so training starts from spread-out embeddings (measured in
    docs/methods/simclr.md). Needs at least 2 samples per step in training mode.
    """
    return {"local": local_head(channels, conv_op),
            "projector": nn.Sequential(nn.Linear(channels, hidden), CrossRankBatchNorm1d(hidden),
                                       nn.ReLU(inplace=True),
                                       nn.Linear(hidden, out_dim))}


def pooled_embedding(heads: nn.ModuleDict, feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B, out_dim): local transform, global average pool, projection."""
    return heads["projector"](heads["local"](feature_map).flatten(2).mean(-1))


def dense_projection_head(channels: int, out_dim: int = 128, conv_op=nn.Conv3d) -> nn.Sequential:
    """Voxel-wise projector of a feature map for dense (local) contrast: 1x1 conv C -> C, ReLU, 1x1 conv C -> out_dim
    (the two-layer projector of SimCLR applied at every voxel, as in Chaitanya et al. 2020's local head)."""
    return nn.Sequential(conv_op(channels, channels, 1), nn.ReLU(inplace=True), conv_op(channels, out_dim, 1))
