"""PolyCL (Ward, Moseley, Imran 2025) pieces that know nothing of nnU-Net's trainer (METHODS_SPEC §4).

* ``pairs``: cross-image positives/negatives for 3-D patches (strategies S, O, M), triplet sampling,
  organ presence from a patch or from nnU-Net's ``class_locations``, batch composition.
* ``loss``: the paper's single-negative loss and its many-negatives form on the shared ``masked_supcon``.
* ``sam_refine`` / ``sam2_propagate``: optional SAM box refinement and SAM 2 slice propagation
  (``pip install "nnunet-cl[sam]"``, user-supplied checkpoints); import them explicitly.
"""
from nnunet_cl.methods.polycl.loss import DEFAULT_TEMPERATURE, polycl_infonce_loss, polycl_masks, polycl_triplet_loss
from nnunet_cl.methods.polycl.pairs import (
    STRATEGIES,
    normalize_presence,
    patch_organ_presence,
    presence_from_class_locations,
    sample_patch_batch,
    sample_triplets,
    strategy_masks,
    valid_anchor_mask,
)

__all__ = [
    "DEFAULT_TEMPERATURE",
    "STRATEGIES",
    "normalize_presence",
    "patch_organ_presence",
    "polycl_infonce_loss",
    "polycl_masks",
    "polycl_triplet_loss",
    "presence_from_class_locations",
    "sample_patch_batch",
    "sample_triplets",
    "strategy_masks",
    "valid_anchor_mask",
]
