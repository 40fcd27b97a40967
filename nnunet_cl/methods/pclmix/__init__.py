"""PCLMix (Lei et al. 2024; METHODS_SPEC.md §5) in 3-D: scribble supervision with a second, heterogeneous decoder,
dynamic mix, and uncertainty-guided pixel contrast against a class-wise memory (docs/methods/pclmix.md).

* :mod:`.scribbles` -- a scribble dataset into nnU-Net's raw format (unannotated = nnU-Net's ignore label).
* :mod:`.mix` -- the 2-D / 3-D CutMix box, mixing, and the mix partners.
* :mod:`.uncertainty` -- entropy, the ramped threshold, the certainty pseudo-label.
* :mod:`.anchors` -- hard and easy anchors per image and class, capped.
* :mod:`.memory` -- class means and the class-wise FIFO memory.
* :mod:`.loss` -- the pixel contrast of anchors against the memory.
* :mod:`.decoder` -- the second decoder and the embedding head.

Nothing here knows about nnU-Net's trainer; the trainer lives in ``nnunet_cl_trainers.pclmix``.
"""
from nnunet_cl.methods.pclmix.anchors import anchors_per_class, count_class_pairs, sample_class_anchors
from nnunet_cl.methods.pclmix.decoder import UpsampleAddDecoder, embedding_head
from nnunet_cl.methods.pclmix.loss import queue_pixel_contrast
from nnunet_cl.methods.pclmix.memory import ClassQueue, class_means
from nnunet_cl.methods.pclmix.mix import box_mask, box_masks, mix, mix_partners, resize_mask
from nnunet_cl.methods.pclmix.uncertainty import (UNCERTAIN, certainty_labels, entropy, sigmoid_rampup,
                                                  uncertainty_threshold)

__all__ = ["anchors_per_class", "count_class_pairs", "sample_class_anchors", "UpsampleAddDecoder", "embedding_head",
           "queue_pixel_contrast", "ClassQueue", "class_means", "box_mask", "box_masks", "mix", "mix_partners",
           "resize_mask", "UNCERTAIN", "certainty_labels", "entropy", "sigmoid_rampup", "uncertainty_threshold"]
