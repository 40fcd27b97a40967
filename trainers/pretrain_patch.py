"""Pretraining on patches smaller than the fine-tuning patch (more patches per step for the same cost), shared by
the methods whose pretraining batch is built from many small patches (PolyCL, SuperCL).

The patch is, in order: the `pretrain_patch_size` attribute; the plans' patch of a pretraining plans variant
(nnUNetv2_cl_pretrain_plans); else half the fine-tuning patch per axis, rounded to the network's downsampling.
"""
import numpy as np
from nnunetv2.configuration import ANISO_THRESHOLD
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

from nnunet_cl.paths import NnUNetCLError
from nnunet_cl.pretrain_plans import check_bottleneck, network_divisor, reduced_patch_size


class SmallPatchPretraining:
    """Mixin of an nnUNetTrainerCLBase subclass that sets `self.pretrain_patch_size` (None or a patch)."""

    def is_pretrain_plans_variant(self) -> bool:
        """True when this configuration inherits from another and sets its own patch (nnUNetv2_cl_pretrain_plans)."""
        raw = self.plans_manager.plans["configurations"].get(self.configuration_name, {})
        return "inherits_from" in raw and "patch_size" in raw

    def get_pretrain_patch_size(self) -> list[int]:
        divisor = network_divisor(self.configuration_manager)
        if self.pretrain_patch_size is not None:
            patch = [int(p) for p in self.pretrain_patch_size]
            if len(patch) != len(divisor) or any(p <= 0 or p % d for p, d in zip(patch, divisor)):
                nearest = [max(d, round(p / d) * d) for p, d in zip(patch, divisor)] if len(patch) == len(divisor) \
                    else None
                raise NnUNetCLError(f"pretrain_patch_size {patch}: each axis must be a positive multiple of the "
                                    f"network's total downsampling {divisor}. Fix: set pretrain_patch_size to "
                                    f"{nearest or f'{len(divisor)} such values'}.")
            check_bottleneck(patch, divisor, "pretrain_patch_size =")
        elif self.is_pretrain_plans_variant():
            patch = [int(p) for p in self.configuration_manager.patch_size]
            check_bottleneck(patch, divisor, "nnUNetv2_cl_pretrain_plans --patch")
        else:
            patch = reduced_patch_size(self.configuration_manager.patch_size, divisor)
        return patch

    def pretrain_augmentation(self, patch):
        """nnU-Net's rotation / dummy-2D / initial-patch rules (configure_rotation_dummyDA_mirroring_and_inital_
        patch_size) applied to the pretraining patch instead of the plans' patch."""
        _, _, _, mirror_axes = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if len(patch) == 2:
            do_dummy_2d = False
            angle = 15. if max(patch) / min(patch) > 1.5 else 180.
        else:
            do_dummy_2d = (max(patch) / patch[0]) > ANISO_THRESHOLD
            angle = 180. if do_dummy_2d else 30.
        rotation = (-angle / 360 * 2. * np.pi, angle / 360 * 2. * np.pi)
        initial = get_patch_size(patch, rotation, rotation, rotation, (0.85, 1.25))
        if do_dummy_2d:
            initial[0] = patch[0]
        return rotation, do_dummy_2d, [int(i) for i in initial], mirror_axes
