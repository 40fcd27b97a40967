"""Reading the unlabeled pool through nnU-Net's own data loading and augmentation, two views per sample."""
from typing import Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset, infer_dataset_class
from threadpoolctl import threadpool_limits


class PoolDataset(nnUNetBaseDataset):
    """Cases spread over several preprocessed folders (the labeled dataset's and the pool's), images only.

    Labels never leave this class: the segmentation it returns keeps only nnU-Net's "outside the nonzero
    mask" marker (-1) and sets every label to 0, and class locations are dropped.
    """

    def __init__(self, members: Sequence[tuple[str, str]]):
        by_folder: dict[str, list[str]] = {}
        for folder, identifier in members:
            by_folder.setdefault(folder, []).append(identifier)
        self._datasets = {f: infer_dataset_class(f)(f, ids) for f, ids in by_folder.items()}
        self._folder_of = {i: f for f, ids in by_folder.items() for i in ids}
        if len(self._folder_of) != len(members):
            raise ValueError("pool identifiers must be unique across folders")
        self.identifiers = sorted(self._folder_of)
        self.source_folder = None
        self.folder_with_segs_from_previous_stage = None

    def load_case(self, identifier):
        data, seg, _, properties = self._datasets[self._folder_of[identifier]].load_case(identifier)
        seg = np.where(np.asarray(seg) < 0, -1, 0).astype(np.int16)
        properties = {k: v for k, v in properties.items() if k != "class_locations"}
        properties["class_locations"] = {}
        return data, seg, None, properties

    @staticmethod
    def save_case(data, seg, properties, output_filename_truncated):
        raise NotImplementedError("the pool is written by nnunet_cl.pool, not through this reader")

    @staticmethod
    def get_identifiers(folder: str):
        raise NotImplementedError


class TwoViewDataLoader(nnUNetDataLoader):
    """nnU-Net's data loader, but each sampled crop goes through the augmentation twice.

    Returns {'data': view 1 (B, C, *patch), 'data2': view 2, 'keys': case ids}. Both views come from the same
    random crop, each with its own draw of nnU-Net's spatial and intensity augmentation.
    """

    def generate_train_batch(self):
        keys = self.get_indices()
        views = ([], [])
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for key in keys:
                data, seg, _, properties = self._data.load_case(key)
                bbox_lbs, bbox_ubs = self.get_bbox(data.shape[1:], False, properties["class_locations"])
                bbox = [[lo, hi] for lo, hi in zip(bbox_lbs, bbox_ubs)]
                data = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
                seg = torch.from_numpy(crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)).to(torch.int16)
                if self.patch_size_was_2d:
                    data, seg = data[:, 0], seg[:, 0]
                for out in views:
                    sample = self.transforms(image=data.clone(), segmentation=seg.clone()) \
                        if self.transforms is not None else {"image": data}
                    out.append(sample["image"])
        return {"data": torch.stack(views[0]), "data2": torch.stack(views[1]), "keys": keys}
