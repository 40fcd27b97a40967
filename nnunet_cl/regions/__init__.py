"""Region generation shared by the methods: body masks, windowing and supervoxels (plain numpy)."""
from nnunet_cl.regions.supervoxels import (block_mean, body_mask, supervoxels, upsample_nearest,
                                           window_intensities)

__all__ = ["body_mask", "window_intensities", "supervoxels", "upsample_nearest", "block_mean"]
