"""nnunet-cl: contrastive pretraining and auxiliary contrastive losses for nnU-Net v2.

Library code here is plain torch/numpy (losses, views, region and pair generation) plus the pool,
split and export tools. The nnU-Net trainer classes live in the separate package `nnunet_cl_trainers`
(folder `trainers/`), which imports from here and never the other way round.
"""
__version__ = "0.1.0"
