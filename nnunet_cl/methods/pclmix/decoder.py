"""PCLMix's second, heterogeneous decoder and its voxel embedding head, built on nnU-Net's encoder.

The stock decoder upsamples with transposed convolutions, concatenates the skip and runs two convolutions per stage,
with deep supervision. This one differs in each of those (the paper pairs a CNN decoder with a transformer one):
interpolation (trilinear / bilinear), the skip added rather than concatenated, one convolution per stage at a
fraction of the stock width (1x1 projections bring the skip and the upsampled map to it), dropout, and one
full-resolution output. At width 0.5 its convolutions cost about a tenth of the stock decoder's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UpsampleAddDecoder", "embedding_head"]


class UpsampleAddDecoder(nn.Module):
    """skips (encoder outputs, bottleneck last) -> (B, num_classes, *skips[0].shape[2:]) logits.

    Args:
        channels: the encoder's output channels per stage (``encoder.output_channels``).
        conv_op, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs: the encoder's building blocks.
        dropout: channel dropout after each stage's convolution.
        width: the decoder's channels per stage as a fraction of the encoder's (at least 1 channel).
        output_stage: the stage it stops at (0: full resolution); above 0 its logits are upsampled to full
            resolution by interpolation, so it is shallower than the stock decoder and skips the costliest stages.
    """

    def __init__(self, channels, num_classes: int, conv_op=nn.Conv3d, norm_op=nn.InstanceNorm3d,
                 norm_op_kwargs=None, nonlin=nn.LeakyReLU, nonlin_kwargs=None, dropout: float = 0.1,
                 width: float = 0.5, output_stage: int = 0):
        super().__init__()
        if not 0 <= output_stage < len(channels) - 1:
            raise ValueError(f"output_stage {output_stage} must be in [0, {len(channels) - 2}] for "
                             f"{len(channels)} stages")
        self.output_stage = output_stage
        skip_channels = list(channels)
        channels = [max(1, round(c * width)) for c in skip_channels]
        norm_op_kwargs = dict(norm_op_kwargs or {"eps": 1e-5, "affine": True})
        nonlin_kwargs = dict(nonlin_kwargs or {"inplace": True})
        drop = {nn.Conv3d: nn.Dropout3d, nn.Conv2d: nn.Dropout2d}.get(conv_op, nn.Dropout)
        self.mode = "trilinear" if conv_op is nn.Conv3d else "bilinear"
        self.bottleneck = conv_op(skip_channels[-1], channels[-1], 1)
        used = range(output_stage, len(channels) - 1)  # module index i is stage output_stage + i
        self.skips = nn.ModuleList(conv_op(skip_channels[s], channels[s], 1) for s in used)
        self.project = nn.ModuleList(conv_op(channels[s + 1], channels[s], 1) for s in used)
        self.stages = nn.ModuleList(
            nn.Sequential(conv_op(channels[s], channels[s], 3, padding=1), norm_op(channels[s], **norm_op_kwargs),
                          nonlin(**nonlin_kwargs), drop(dropout) if dropout > 0 else nn.Identity())
            for s in used)
        self.seg = conv_op(channels[output_stage], num_classes, 1)

    def forward(self, skips) -> torch.Tensor:
        x = self.bottleneck(skips[-1])
        for s in reversed(range(self.output_stage, len(skips) - 1)):
            i = s - self.output_stage
            # project at the coarse resolution, then upsample: the same result as upsampling first, cheaper
            x = F.interpolate(self.project[i](x), size=skips[s].shape[2:], mode=self.mode, align_corners=False)
            x = self.stages[i](x + self.skips[i](skips[s]))
        x = self.seg(x)
        if self.output_stage:
            x = F.interpolate(x, size=skips[0].shape[2:], mode=self.mode, align_corners=False)
        return x


def embedding_head(channels: int, dim: int, conv_op=nn.Conv3d, norm_op=nn.InstanceNorm3d) -> nn.Sequential:
    """The authors' projection, voxel-wise: 1x1 conv, normalisation, ReLU, 1x1 conv to ``dim`` (L2-normalise after).
    Instance normalisation instead of their BatchNorm: statistics per image, so a distributed run (a few patches
    per process) normalises as one process does."""
    return nn.Sequential(conv_op(channels, channels, 1), norm_op(channels, affine=True), nn.ReLU(inplace=True),
                         conv_op(channels, dim, 1))
