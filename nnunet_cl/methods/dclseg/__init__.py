"""DCL-Seg (distribution-aware contrastive learning with learnable positives; METHODS_SPEC.md §6), our 3-D design
from the paper's abstract (its full text is not public; docs/methods/dclseg.md names every choice).

* :mod:`.generator` -- the learnable positive: an appearance transform that leaves geometry untouched.
* :mod:`.structure` -- local NCC (the structure penalty) and edge maps (what "keeps edges" is measured with).
* :mod:`.boundary` -- voxels near a label change, and anchor sampling that oversamples them.
* :mod:`.loss` -- the supervised voxel contrast between an image and its positive.
* :mod:`.shifts` -- the intensity shifts of the robustness benchmark (numpy).

Nothing here knows about nnU-Net's trainer; the trainer lives in ``nnunet_cl_trainers.dclseg``.
"""
from nnunet_cl.methods.dclseg.boundary import boundary_mask, sample_anchors
from nnunet_cl.methods.dclseg.generator import AppearanceGenerator, clamp_to_range
from nnunet_cl.methods.dclseg.loss import two_view_supcon
from nnunet_cl.methods.dclseg.shifts import SHIFTS, apply_shift
from nnunet_cl.methods.dclseg.structure import (STRUCTURE_WEIGHT, edge_correlation, edge_map, local_ncc,
                                                structure_penalty)

__all__ = ["AppearanceGenerator", "clamp_to_range", "local_ncc", "structure_penalty", "edge_map", "edge_correlation",
           "STRUCTURE_WEIGHT", "boundary_mask", "sample_anchors", "two_view_supcon", "SHIFTS", "apply_shift"]
