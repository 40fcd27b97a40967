"""SuperCL's pretraining batches: nnU-Net-augmented pool patches with their supervoxel map carried along.

The cached supervoxel map of a case takes the place of nnU-Net's segmentation: it is cropped with the image and
goes through nnU-Net's own training augmentation as the segmentation does, with nearest-neighbour interpolation
(nnU-Net's default for segmentations, a linear interpolation of every label's one-hot channel, would cost one
channel per supervoxel), so after rotation, scaling and mirroring every voxel of the patch keeps the id of the
supervoxel it shows. Voxels outside the image (padding) and outside nnU-Net's nonzero mask get 0, like the
region outside the body: never sampled.
"""
from typing import Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from threadpoolctl import threadpool_limits

from nnunet_cl.methods.supercl.cache import load_supervoxels
from nnunet_cl_trainers.pool_data import PoolDataset


def nearest_segmentation(transforms):
    """Set nearest-neighbour interpolation on every SpatialTransform of nnU-Net's composed training transforms."""
    found = 0
    for t in getattr(transforms, "transforms", [transforms]):
        if isinstance(t, SpatialTransform):
            t.mode_seg = "nearest"
            found += 1
    if not found:
        raise RuntimeError("nnU-Net's training transforms have no SpatialTransform; the supervoxel map would not "
                           "follow the image")
    return transforms


class SupervoxelPoolDataset(PoolDataset):
    """The pool (images only), each case's segmentation replaced by its cached supervoxel map (int32).

    nnU-Net's "outside the nonzero mask" marker (-1) of the stored segmentation is kept where nnU-Net's
    augmentation needs it (use_mask_for_norm) and turned into 0 by its RemoveLabelTansform; labels are never read
    otherwise.
    """

    def __init__(self, members: Sequence[tuple[str, str]], cache_folder: str):
        super().__init__(members)
        self.cache_folder = cache_folder

    def load_case(self, identifier):
        data, seg, _, properties = self._datasets[self._folder_of[identifier]].load_case(identifier)
        sv = load_supervoxels(self.cache_folder, identifier, data.shape[1:])
        seg = np.where(np.asarray(seg[0]) < 0, -1, sv)[None].astype(np.int32)
        properties = {k: v for k, v in properties.items() if k != "class_locations"}
        properties["class_locations"] = {}
        return data, seg, None, properties


class SupervoxelPatchLoader(nnUNetDataLoader):
    """nnU-Net's data loader for SuperCL: one augmented patch per sample and its aligned supervoxel ids.

    Returns {'data': (B, C, *patch) float, 'supervoxels': (B, *patch) long (0 = outside the body or the image),
    'position': (B,) float (the patch centre along axis 0 of the case, in [0, 1]: the body axis of a CT, the slice
    of a 2d configuration), 'seeds': (B,) long (each sample's own seed for the views made in the step, drawn
    here with nnU-Net's other random numbers, so a seeded run repeats however batches and steps interleave),
    'keys': case ids}.
    """

    def generate_train_batch(self):
        keys = self.get_indices()
        images, maps, position = [], [], []
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for key in keys:
                data, seg, _, properties = self._data.load_case(key)
                shape = data.shape[1:]
                lbs, ubs = self.get_bbox(shape, False, properties["class_locations"])
                bbox = [[lo, hi] for lo, hi in zip(lbs, ubs)]
                image = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
                labels = torch.from_numpy(np.array(crop_and_pad_nd(seg, bbox, -1), dtype=np.int32))
                if self.patch_size_was_2d:
                    image, labels = image[:, 0], labels[:, 0]
                if self.transforms is not None:
                    out = self.transforms(image=image, segmentation=labels)
                    image, labels = out["image"], out["segmentation"]
                images.append(image)
                maps.append(labels[0].long().clamp_min(0))
                position.append(((lbs[0] + ubs[0]) / 2.0) / max(int(shape[0]), 1))
        return {"data": torch.stack(images), "supervoxels": torch.stack(maps),
                "position": torch.as_tensor(position, dtype=torch.float32).clamp(0, 1),
                "seeds": torch.as_tensor(np.random.randint(0, 2 ** 31 - 1, len(keys)), dtype=torch.long), "keys": keys}
