"""PolyCL's pretraining batches: several nnU-Net-augmented patches of several scans, with organ presence.

Each step draws `n_cases` pool cases and `patches_per_case` patches of each (`nnunet_cl.methods.polycl.sample_patch_batch`),
so that every patch has a same-scan partner (PolyCL-S positive) and other scans (negatives). Every patch is
cropped like nnU-Net crops a training patch and goes once through nnU-Net's own training augmentation.

Organ presence of a patch comes only from nnU-Net's preprocessed `class_locations`, and only for cases in the
fold's labeled training split (the cases nnU-Net itself trains on). Every other pool case -- ingested unlabeled
scans, and images of the labeled dataset outside the training split (e.g. left out by nnUNetv2_cl_limited_split)
-- is "unknown" (-1): its class locations are dropped when the case is loaded and never reach the sampler.
"""
from typing import Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from threadpoolctl import threadpool_limits

from nnunet_cl.methods.polycl.pairs import UNKNOWN, organ_class_locations, presence_from_class_locations, sample_patch_batch
from nnunet_cl_trainers.pool_data import PoolDataset


class PolyCLPoolDataset(PoolDataset):
    """The pool (images only, as PoolDataset), plus class locations for the cases whose presence is known.

    Args:
        members: (folder, identifier) of every pool case (`nnunet_cl.pool.list_pool`).
        known_presence: (folder, identifier) of the cases whose labels may be used: the fold's labeled training
            split. A case counts only when folder and identifier both match, so an ingested case can never
            borrow a labeled case's locations.

        read_nonzero_mask: True only when the plans normalise inside the nonzero mask (use_mask_for_norm), the
            one case where nnU-Net's augmentation needs the seg's "outside" marker (-1): the seg is then read and
            reduced to that marker, as in PoolDataset. Otherwise no segmentation is read at all.

    `load_case` returns properties['class_locations'] = the stored locations for known cases, {} for the others
    (never looked at), and properties['presence_known'] (bool); the seg it returns is the marker or zeros.
    """

    def __init__(self, members: Sequence[tuple[str, str]], known_presence: Sequence[tuple[str, str]] = (),
                 read_nonzero_mask: bool = False):
        super().__init__(members)
        known = {(str(f), str(i)) for f, i in known_presence}
        self.presence_known = frozenset(i for i in self.identifiers if (self._folder_of[i], i) in known)
        self.read_nonzero_mask = read_nonzero_mask

    def load_case(self, identifier):
        data, seg, _, properties = self._datasets[self._folder_of[identifier]].load_case(identifier)
        known = identifier in self.presence_known
        class_locations = (properties.get("class_locations") or {}) if known else {}
        if self.read_nonzero_mask:
            seg = np.where(np.asarray(seg) < 0, -1, 0).astype(np.int16)
        else:  # a zero view of the image's shape: nothing of the stored segmentation is read
            seg = np.broadcast_to(np.zeros((), dtype=np.int16), (1, *data.shape[1:]))
        properties = {k: v for k, v in properties.items() if k != "class_locations"}
        properties["class_locations"] = class_locations
        properties["presence_known"] = known
        return data, seg, None, properties


class PolyCLPatchLoader(nnUNetDataLoader):
    """nnU-Net's data loader, reorganised for PolyCL: n_cases x patches_per_case augmented patches per batch.

    Returns {'data': (N, C, *patch) float, 'case_index': (N,) long (index of the case in `data.identifiers`,
    stable across batches), 'organ_present': (N,) int8 (1 present, 0 absent, -1 unknown), 'keys': N case ids}.

    Presence of a patch is measured on the box the network sees: the final patch centred in the crop (nnU-Net's
    spatial augmentation crops the centre of the larger initial crop; rotation and scaling move the border by a
    few voxels, which we ignore). With `balance_presence`, patches of known cases alternate in pairs between a
    target "organ present" (nnU-Net's foreground crop on an organ voxel) and "organ absent" (up to
    `presence_tries` random crops until one is organ-free, as the paper retries up to 10 times), so that O and M
    find both kinds in a batch. The flag is always the measured presence, never the target.
    """

    def __init__(self, data: PolyCLPoolDataset, n_cases: int, patches_per_case: int, patch_size, final_patch_size,
                 label_manager, organ_labels=None, transforms=None, balance_presence: bool = True,
                 presence_tries: int = 10):
        super().__init__(data, n_cases * patches_per_case, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, transforms=transforms)
        self.n_cases = int(n_cases)
        self.patches_per_case = int(patches_per_case)
        self.organ_labels = organ_labels
        self.balance_presence = balance_presence
        self.presence_tries = max(1, int(presence_tries))
        self.case_ids = list(data.identifiers)
        self._center_offset = [(int(p) - int(f)) // 2 for p, f in zip(self.patch_size, self.final_patch_size)]

    def _center_box(self, bbox_lbs) -> list[list[int]]:
        return [[lb + o, lb + o + int(f)] for lb, o, f in zip(bbox_lbs, self._center_offset, self.final_patch_size)]

    def _crop(self, shape, target: int, organ_locs: dict):
        """bbox lower bounds and measured presence (None for unknown cases) of one patch."""
        if target == UNKNOWN:
            lbs, _ = self.get_bbox(shape, True, {})  # force_fg without locations = nnU-Net's random crop
            return lbs, None
        tries = 1 if target == 1 or not self.balance_presence else self.presence_tries
        for _ in range(tries):
            # target 1: nnU-Net's foreground crop centred on a random organ voxel (random crop if none)
            lbs, _ = self.get_bbox(shape, True, organ_locs if target == 1 else {})
            present = presence_from_class_locations(organ_locs, self._center_box(lbs), None)
            if target == 1 or not present:
                break
        return lbs, bool(present)

    def generate_train_batch(self):
        rng = np.random.default_rng(np.random.randint(0, 2 ** 31 - 1))  # follows np.random's seed, as nnU-Net
        case_index = sample_patch_batch(len(self.case_ids), self.n_cases, self.patches_per_case, rng)
        images, presence, keys, order = [], [], [], []
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            position = 0
            for idx in dict.fromkeys(case_index):  # cases in batch order, each loaded once
                key = self.case_ids[idx]
                data, seg, _, properties = self._data.load_case(key)
                known = bool(properties.get("presence_known", False))
                organ_locs = organ_class_locations(properties["class_locations"], self.organ_labels) if known else {}
                shape = data.shape[1:]
                for _ in range(case_index.count(idx)):
                    if not known:
                        target = UNKNOWN
                    elif self.balance_presence:
                        target = 1 if (position // 2) % 2 == 0 else 0
                    else:
                        target = 0  # plain random crop, presence measured
                    position += 1
                    lbs, present = self._crop(shape, target, organ_locs)
                    bbox = [[lb, lb + int(p)] for lb, p in zip(lbs, self.patch_size)]
                    image = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
                    mask = torch.from_numpy(np.array(crop_and_pad_nd(seg, bbox, -1), dtype=np.int16))  # copy: writable
                    if self.patch_size_was_2d:
                        image, mask = image[:, 0], mask[:, 0]
                    if self.transforms is not None:
                        image = self.transforms(image=image, segmentation=mask)["image"]
                    images.append(image)
                    presence.append(UNKNOWN if present is None else int(present))
                    keys.append(key)
                    order.append(idx)
        return {"data": torch.stack(images),
                "case_index": torch.as_tensor(order, dtype=torch.long),
                "organ_present": torch.as_tensor(presence, dtype=torch.int8),
                "keys": keys}
