"""SuperCL (supervoxel-guided contrastive learning, 2025; METHODS_SPEC §2), 3-D on nnU-Net's U-Net.

Supervoxels of every pool case (3-D SLIC, cached once) choose the pairs, instead of hand-set thresholds:
  ILCP (intra)  voxels of one supervoxel are positives, in the encoder and the decoder feature maps of two
                voxel-aligned views of the patch;
  IGCP (inter)  patches whose average-supervoxel feature maps (ASP) fall into one connected component of the
                top-1 similarity graph (CCL) are positives, over this step's patches of every rank and a queue;
  instance      SimCLR's two-view term (or, as an option, patches at close positions along the body axis).
Total = w_ins * L_ins + w_intra * L_intra + w_inter * L_inter (1 / 1 / 0.5); the logged terms are weighted.
docs/methods/supercl.md lists every 2-D -> 3-D change.

Trainers: nnUNetTrainerSuperCL (staged: pretraining on the pool, then nnU-Net fine-tuning on the labeled split),
nnUNetTrainerSuperCLPretrain (pool only; its checkpoint goes to -pretrained_weights); variants in trainers/variants.py.
"""
import time
from os.path import join

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from torch import nn

from nnunet_cl.case_cache import PreprocessedCaseLoader
from nnunet_cl.distributed import gather_with_grad, rank, shard, world_size
from nnunet_cl.heads import dense_projection_head, pooled_embedding, pooled_projection_heads
from nnunet_cl.methods.supercl.cache import build_supervoxel_cache
from nnunet_cl.methods.supercl.defaults import CACHE_FOLDER, SUPERVOXEL_DEFAULTS
from nnunet_cl.methods.supercl.losses import ilcp_loss, masked_rows_loss
from nnunet_cl.methods.supercl.pairs import ASP_MODES, average_supervoxel_map, component_mask, grid_labels, position_mask
from nnunet_cl.paths import NnUNetCLError
from nnunet_cl.queues import FifoQueue
from nnunet_cl.views import flip_view, intensity_view, unflip
from nnunet_cl_trainers.base import PRETRAIN, nnUNetTrainerCLBase
from nnunet_cl_trainers.pretrain_patch import SmallPatchPretraining
from nnunet_cl_trainers.supercl_data import SupervoxelPatchLoader, SupervoxelPoolDataset, nearest_segmentation

INSTANCE_TERMS = ("simclr", "position")
MIN_DEFAULT_SAMPLES, MAX_DEFAULT_SAMPLES = 4, 32


class nnUNetTrainerSuperCL(SmallPatchPretraining, nnUNetTrainerCLBase):
    """Staged SuperCL: `pretrain_epochs` on the pool, then `finetune_epochs` of nnU-Net on the labeled split.

    Hyperparameters (attributes; a variant changes them in its own __init__):
      w_ins, w_intra, w_inter       loss weights (1, 1, 0.5 as the paper); 0 switches a term off
      temperature, base_temperature tau 0.1 (the paper) and the SupCon scale tau_b 0.07 of ILCP and IGCP
      instance_term                 "simclr" (two views, every other patch a negative) or "position" (patches
                                    whose centres lie within position_threshold along axis 0 are positives)
      asp_mode                      "mean" (the supervoxel average) or "area" (the authors' division by the map)
      ccl_other_samples_only        CCL's graph over patches, each linked to its most similar other patch (True);
                                    False: the authors' graph over views (a view's top-1 may be its own other view)
      ccl_center                    CCL's cosines of the ASP vectors' deviations from their mean (True), which
                                    keeps a few hub nodes from joining most patches in one component
      queue_size                    past patches (both views) kept for IGCP's graph and contrast set
      encoder_tap_stride, decoder_tap_stride   which feature maps ILCP contrasts (by their stride)
      n_labels, per_label           ILCP's sampling: supervoxels per image, voxels per supervoxel
      supervoxel_edge, compactness, downsample   the supervoxels (nnunet_cl.methods.supercl.defaults)
      pretrain_batch_size           patches per step (None: the two views fill the plans' batch's voxels; 4-32)
      pretrain_patch_size           None: the plans' patch of a pretraining plans variant, else half the
                                    fine-tuning patch (trainers/pretrain_patch.py)
      hidden_dim, projection_dim    the instance head C -> hidden -> projection; the dense heads C -> C -> projection
    """

    loss_terms = ("ins", "intra", "inter")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.w_ins, self.w_intra, self.w_inter = 1.0, 1.0, 0.5
        self.temperature = 0.1
        self.base_temperature = 0.07
        self.instance_term = "simclr"
        self.position_threshold = 0.1
        self.asp_mode = "mean"
        self.ccl_other_samples_only = True
        self.ccl_center = True
        self.queue_size = 128
        self.encoder_tap_stride = 4
        self.decoder_tap_stride = 2
        self.n_labels = 64
        self.per_label = 8
        self.supervoxel_edge = SUPERVOXEL_DEFAULTS["supervoxel_edge"]
        self.compactness = SUPERVOXEL_DEFAULTS["compactness"]
        self.downsample = SUPERVOXEL_DEFAULTS["downsample"]
        self.pretrain_batch_size = None
        self.pretrain_patch_size = None
        self.hidden_dim = 256
        self.projection_dim = 128
        self._nodes = None  # this step's patches for the queue (pushed after the optimiser's step)
        self._stats = []

    # ---------------------------------------------------------------- sizes
    def supervoxel_params(self) -> dict:
        return {k: getattr(self, k) for k in SUPERVOXEL_DEFAULTS}

    def get_pretrain_batch_size(self) -> int:
        """Patches per step on this rank. Default: as many as fit, with their two views, into the voxels of the
        plans' fine-tuning batch (so a step costs about what nnU-Net's does), between 4 and 32; IGCP's graph gets
        its other nodes from the queue."""
        n = self.pretrain_batch_size
        if not n:
            budget = int(self.configuration_manager.batch_size) * int(np.prod(self.configuration_manager.patch_size))
            n = budget // (2 * int(np.prod(self.get_pretrain_patch_size())))
            n = min(MAX_DEFAULT_SAMPLES, max(MIN_DEFAULT_SAMPLES, n))
        return self.pretrain_batch_per_rank(n)

    def _stage_strides(self) -> list[list[int]]:
        """Cumulative stride of each encoder stage, per axis."""
        strides = (self.configuration_manager.network_arch_init_kwargs or {}).get("strides")
        dim = len(self.configuration_manager.patch_size)
        out, total = [], [1] * dim
        for s in strides:
            s = [int(s)] * dim if np.isscalar(s) else [int(v) for v in s]
            total = [t * v for t, v in zip(total, s)]
            out.append(list(total))
        return out

    def tap_stages(self) -> tuple[int, int]:
        """(encoder stage, decoder stage) ILCP reads: the first whose largest stride reaches the tap's stride
        (decoder stage s, 0 = coarsest, has the resolution of encoder stage n - 2 - s)."""
        strides = self._stage_strides()
        n = len(strides)
        enc = next((i for i, s in enumerate(strides) if max(s) >= self.encoder_tap_stride), n - 1)
        dec_enc = next((i for i, s in enumerate(strides[:n - 1]) if max(s) >= self.decoder_tap_stride), n - 2)
        return enc, n - 2 - dec_enc

    def asp_length(self) -> int:
        enc, _ = self.tap_stages()
        return int(np.prod([p // s for p, s in zip(self.get_pretrain_patch_size(), self._stage_strides()[enc])]))

    def check_settings(self) -> None:
        super().check_settings()
        if not self.temperature > 0 or not (self.base_temperature is None or self.base_temperature > 0):
            raise NnUNetCLError(f"temperature={self.temperature}, base_temperature={self.base_temperature}: both must "
                                f"be > 0 (base_temperature may be None). Fix: e.g. 0.1 and 0.07 (the defaults).")
        weights = (self.w_ins, self.w_intra, self.w_inter)
        if any(not w >= 0 for w in weights) or not any(weights):
            raise NnUNetCLError(f"w_ins, w_intra, w_inter = {weights}: weights must be >= 0, at least one > 0. "
                                f"Fix: e.g. 1, 1, 0.5 (the defaults).")
        if self.instance_term not in INSTANCE_TERMS:
            raise NnUNetCLError(f"instance_term {self.instance_term!r}: choose one of {INSTANCE_TERMS}.")
        if self.asp_mode not in ASP_MODES:
            raise NnUNetCLError(f"asp_mode {self.asp_mode!r}: choose one of {ASP_MODES}.")
        if not (isinstance(self.queue_size, int) and self.queue_size >= 0):
            raise NnUNetCLError(f"queue_size={self.queue_size!r}: a whole number >= 0 (0: no queue).")
        if self.n_labels < 1 or self.per_label < 1:
            raise NnUNetCLError(f"n_labels={self.n_labels}, per_label={self.per_label}: both must be >= 1. Fix: e.g. "
                                f"64 and 8 (the defaults).")
        if not self.supervoxel_edge > 0 or int(self.downsample) < 1 or not self.compactness > 0:
            raise NnUNetCLError(f"supervoxel_edge={self.supervoxel_edge}, downsample={self.downsample}, compactness="
                                f"{self.compactness}: need an edge > 0, downsample >= 1 and compactness > 0.")
        if self.pretrain_epochs > 0 and self.get_pretrain_batch_size() < 2:
            raise NnUNetCLError(f"pretrain_batch_size={self.pretrain_batch_size} gives "
                                f"{self.get_pretrain_batch_size()} patch per process; SuperCL needs >= 2 (the heads' "
                                f"BatchNorm). Fix: set pretrain_batch_size >= "
                                f"{2 * (dist.get_world_size() if self.is_ddp else 1)}.")
        self.get_pretrain_patch_size()  # refuses a patch the network cannot take, with the fix

    # ---------------------------------------------------------------- modules
    def build_cl_modules(self) -> nn.ModuleDict:
        channels = self.unwrapped_network.encoder.output_channels
        enc, dec = self.tap_stages()
        conv_op = nn.Conv3d if len(self.configuration_manager.patch_size) == 3 else nn.Conv2d
        float_type = torch.get_default_dtype()
        return nn.ModuleDict({
            "instance": nn.ModuleDict(pooled_projection_heads(channels[-1], self.hidden_dim, self.projection_dim,
                                                              conv_op)),
            "local_enc": dense_projection_head(channels[enc], self.projection_dim, conv_op),
            "local_dec": dense_projection_head(channels[len(channels) - 2 - dec], self.projection_dim, conv_op),
            "queue": FifoQueue(self.queue_size, embedding=((self.projection_dim,), float_type),
                               asp=((self.asp_length(),), float_type), sample=((), torch.long)),
        })

    # ---------------------------------------------------------------- data
    @property
    def supervoxel_cache_folder(self) -> str:
        return join(self.preprocessed_dataset_folder_base, CACHE_FOLDER, self.configuration_manager.data_identifier)

    def supervoxel_spacing(self) -> list[float]:
        spacing = [float(s) for s in self.configuration_manager.spacing]
        if len(spacing) == 2:  # a 2d configuration keeps each case's slices; the plans' median slice spacing
            spacing = [float(self.plans_manager.plans["original_median_spacing_after_transp"][0])] + spacing
        return spacing

    def prepare_supervoxels(self, members) -> None:
        """Supervoxels of every pool case not cached yet (rank 0; the others wait). Never reads labels."""
        if self.local_rank == 0:
            t0 = time.time()
            n_proc = max(1, get_allowed_n_proc_DA())
            cases = [(ident, PreprocessedCaseLoader(folder, ident, spacing=self.supervoxel_spacing()))
                     for folder, ident in members]
            summary = build_supervoxel_cache(cases, self.supervoxel_cache_folder, num_processes=n_proc, progress=True,
                                             **self.supervoxel_params())
            if summary["computed"]:
                n = list(summary["n_supervoxels"].values())
                self.print_to_log_file(
                    f"SuperCL supervoxels: {len(summary['computed'])} case(s) in {time.time() - t0:.1f} s with "
                    f"{n_proc} process(es) (median {int(np.median(n))} supervoxels per case), "
                    f"{len(summary['skipped'])} already cached, in {self.supervoxel_cache_folder}")
        if self.is_ddp:
            dist.barrier()

    def get_pretrain_dataloader(self):
        self.check_settings()
        members = self.pool_members(shard_by_rank=False)
        w = dist.get_world_size() if self.is_ddp else 1
        if len(members) < w:
            raise NnUNetCLError(f"The pool has {len(members)} case(s) for {w} processes. Fix: nnUNetv2_cl_add_unlabeled "
                                f"-d DATASET -i FOLDER, or fewer processes.")
        self.prepare_supervoxels(members)
        dataset = SupervoxelPoolDataset(shard(members), self.supervoxel_cache_folder)
        patch, batch = self.get_pretrain_patch_size(), self.get_pretrain_batch_size()
        rotation, do_dummy_2d, initial_patch, mirror_axes = self.pretrain_augmentation(patch)
        transforms = nearest_segmentation(self.get_training_transforms(
            patch, rotation, None, mirror_axes, do_dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels, regions=None, ignore_label=None))
        loader = SupervoxelPatchLoader(dataset, batch, initial_patch, patch, self.label_manager,
                                       oversample_foreground_percent=0.0, transforms=transforms)
        enc, dec = self.tap_stages()
        self.print_to_log_file(
            f"Pretraining pool: {len(members)} cases, {batch} patches of {patch} x 2 views per step (configuration "
            f"patch {list(self.configuration_manager.patch_size)}); SuperCL weights ins/intra/inter {self.w_ins}/"
            f"{self.w_intra}/{self.w_inter} ({self.instance_term}), ILCP on encoder stage {enc} and decoder stage "
            f"{dec}, IGCP with a queue of {self.queue_size}")
        return self.augmenter(loader)

    def prepare_batch(self, batch: dict) -> dict:
        """Two voxel-aligned views of each patch: view 1 = a random intensity view, view 2 = another one, mirrored
        along random axes (undone on its feature maps). Each sample draws from its own seed ('seeds' of the loader;
        drawn from torch's generator when a batch has none), so a sample's views do not depend on which rank holds
        it."""
        batch = super().prepare_batch(batch)
        if "views" in batch:
            return batch
        x = batch["data"]
        if "seeds" not in batch:
            batch["seeds"] = torch.randint(0, 2 ** 31 - 1, (x.shape[0],))
        v1, v2, flips = [], [], []
        for b, seed in enumerate(batch["seeds"].tolist()):
            g = torch.Generator().manual_seed(int(seed))
            v1.append(intensity_view(x[b:b + 1], g))
            flipped, f = flip_view(intensity_view(x[b:b + 1], g), None, g)
            v2.append(flipped)
            flips.append(f)
        batch["views"], batch["flips"] = torch.cat(v1 + v2), torch.cat(flips)
        return batch

    # ---------------------------------------------------------------- losses
    def pretrain_losses(self, batch: dict) -> dict:
        views, flips, sv, seeds = batch["views"], batch["flips"], batch["supervoxels"], batch["seeds"].tolist()
        b = sv.shape[0]
        enc, dec = self.tap_stages()
        _, feats = self.forward_features(views, encoder=(enc, -1), decoder=(dec,), with_output=False)

        def view_labels(shape):  # each view's supervoxel ids at the centres of its feature voxels
            return grid_labels(sv, shape), grid_labels(sv, shape, flips)

        terms = {}
        if self.w_intra:
            per_tap = []
            for t, (head, key) in enumerate((("local_enc", f"enc{enc}"), ("local_dec", f"dec{dec}"))):
                f = self.cl_modules[head](feats[key])
                f1, f2 = f[:b], unflip(f[b:], flips)
                lab1, lab2 = view_labels(f.shape[2:])
                # per image, with its own seed; an image without a pair counts as 0, so ranks stay exact
                per_tap.append(torch.stack([
                    ilcp_loss(f1[i:i + 1], f2[i:i + 1], lab1[i:i + 1], self.n_labels, self.per_label,
                              self.temperature, self.base_temperature,
                              torch.Generator().manual_seed(int(seeds[i]) + 1 + t), lab2[i:i + 1])
                    for i in range(b)]).mean())
            terms["intra"] = self.w_intra * torch.stack(per_tap).mean()

        z = pooled_embedding(self.cl_modules["instance"], feats["enc-1"])  # (2b, D): [view 1; view 2]
        if not (self.w_ins or self.w_inter):
            return terms
        # the step's nodes of every rank, [view 1 of all ranks; view 2 of all ranks] (as one process would order
        # them); this rank's anchors are rows r*b + i and W*b + r*b + i
        w, r = world_size(), rank()
        nodes = torch.cat([gather_with_grad(z[:b]), gather_with_grad(z[b:])])
        rows = torch.cat([torch.arange(b) + r * b, torch.arange(b) + w * b + r * b]).to(z.device)
        queue = self.cl_modules["queue"]
        sample = (int(queue.pushed) // 2 + torch.arange(w * b, device=z.device)).repeat(2)
        if self.w_ins:  # SimCLR: the other view is the positive; "position": and patches at close positions
            pos = sample[:, None] == sample[None, :]
            if self.instance_term == "position":
                with torch.no_grad():
                    position = gather_with_grad(batch["position"].to(z.device, torch.float32)).repeat(2)
                pos = pos | position_mask(position, self.position_threshold)
            terms["ins"] = self.w_ins * masked_rows_loss(z, nodes, pos[rows], rows, self.temperature,
                                                         self.base_temperature)
        if self.w_inter:
            with torch.no_grad():
                enc_map = feats[f"enc{enc}"].detach()
                lab1, lab2 = view_labels(enc_map.shape[2:])
                asp = torch.cat([gather_with_grad(average_supervoxel_map(m, lab, self.asp_mode).flatten(1))
                                 for m, lab in ((enc_map[:b], lab1), (unflip(enc_map[b:], flips), lab2))])
            past = queue.items()
            keys = torch.cat([nodes, past["embedding"].to(nodes.dtype)])
            mask = component_mask(torch.cat([asp, past["asp"].to(asp.dtype)]), torch.cat([sample, past["sample"]]),
                                  self.ccl_other_samples_only, self.ccl_center)
            terms["inter"] = self.w_inter * masked_rows_loss(z, keys, mask[rows], rows, self.temperature,
                                                             self.base_temperature)
            self._nodes = {"embedding": nodes.detach(), "asp": asp, "sample": sample}
            own = mask[rows]
            self._stats.append((float(own.sum(1).float().mean()) - 1, own.shape[1]))
        return terms

    def on_after_step(self, batch: dict, terms: dict) -> None:
        if self.stage() == PRETRAIN and self._nodes is not None:
            self.cl_modules["queue"].push(**self._nodes)
        self._nodes = None

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        if self.stage() == PRETRAIN and self._stats:
            positives, keys = np.mean(self._stats, axis=0)
            self.print_to_log_file(f"SuperCL IGCP: {positives:.1f} positives per anchor among {keys:.0f} keys "
                                   f"(step's patches of every rank and the queue)")
        self._stats = []


class nnUNetTrainerSuperCLPretrain(nnUNetTrainerSuperCL):
    """Pool only; checkpoint_final.pth goes to `nnUNetv2_train ... -pretrained_weights` of any trainer."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.finetune_epochs = 0
