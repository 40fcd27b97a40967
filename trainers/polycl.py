"""PolyCL (Ward, Moseley, Imran 2025): contrastive pretraining with positives and negatives chosen across scans.

The paper contrasts 2-D slices; here the unit is a 3-D patch (docs/methods/polycl.md lists every deviation).
Strategies (nnunet_cl.methods.polycl.pairs):
  S  positive: another patch of the same scan          negative: a patch of another scan      (label-free)
  O  positive: a patch with the same organ presence    negative: a patch with the opposite presence
  M  positive: same scan and same presence             negative: another scan without the organ
Organ presence is known only for the fold's labeled training cases (nnU-Net's class_locations); every other
pool case is unknown and takes part as under S.

Trainers: nnUNetTrainerPolyCL (staged: pretraining on the pool, then nnU-Net fine-tuning on the labeled split),
nnUNetTrainerPolyCLPretrain (pool only; its checkpoint goes to -pretrained_weights); their _S/_O/_M variants are
rows of trainers/variants.py.
"""
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from nnunet_cl.distributed import broadcast_objects, gather_with_grad, rank, shard
from nnunet_cl.heads import pooled_embedding, pooled_projection_heads
from nnunet_cl.paths import NnUNetCLError
from nnunet_cl.methods.polycl.loss import DEFAULT_TEMPERATURE, polycl_infonce_loss, polycl_triplet_loss
from nnunet_cl.methods.polycl.pairs import STRATEGIES, normalize_presence, sample_triplets, strategy_masks, valid_anchor_mask
from nnunet_cl_trainers.base import PRETRAIN, nnUNetTrainerCLBase
from nnunet_cl_trainers.pretrain_patch import SmallPatchPretraining
from nnunet_cl_trainers.polycl_data import PolyCLPatchLoader, PolyCLPoolDataset

LOSS_FORMS = ("infonce", "triplet")
MIN_PATCHES_PER_STEP = 8


class nnUNetTrainerPolyCL(SmallPatchPretraining, nnUNetTrainerCLBase):
    """Staged PolyCL: `pretrain_epochs` on the pool, then `finetune_epochs` of nnU-Net on the labeled split.

    Hyperparameters (attributes, set in __init__; a variant changes them in its own __init__):
      strategy            "S", "O" or "M" (default "S": the label-free one)
      loss_form           "infonce" (every valid in-batch negative, default) or "triplet" (the paper's one
                          positive and one negative per anchor)
      temperature         tau of both forms (default nnunet_cl.methods.polycl.DEFAULT_TEMPERATURE = 0.1)
      organ_labels        labels that make "the organ" for O/M (None: any foreground label)
      patches_per_case    patches drawn from each scan per step (>= 2: the S positive)
      pretrain_batch_size patches per step (None: max(8, plans' batch size)); n_cases = this // patches_per_case
      pretrain_patch_size patch of pretraining (None: the plans' patch on a pretraining plans variant
                          (nnUNetv2_cl_pretrain_plans), else half the fine-tuning patch per axis, rounded to
                          the network's downsampling)
      balance_presence, presence_tries   steer crops of known cases towards half organ / half organ-free
      triplet_max_tries   None: triplets drawn from the valid sets; k: the paper's k rejection draws
      hidden_dim, projection_dim         the MLP head C -> hidden -> projection
    """

    loss_terms = ("polycl",)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.strategy = "S"
        self.loss_form = "infonce"
        self.temperature = DEFAULT_TEMPERATURE
        self.organ_labels = None
        self.patches_per_case = 2
        self.pretrain_batch_size = None
        self.pretrain_patch_size = None
        self.balance_presence = True
        self.presence_tries = 10
        self.triplet_max_tries = None
        self.hidden_dim = 256
        self.projection_dim = 128
        self._batch_stats = []

    def get_pretrain_batch_size(self) -> int:
        """Patches per step on this rank: the global batch split over the ranks, whole scans each."""
        n = self.pretrain_batch_size or max(MIN_PATCHES_PER_STEP, int(self.configuration_manager.batch_size))
        n = self.pretrain_batch_per_rank(n)
        return int(np.ceil(n / self.patches_per_case) * self.patches_per_case)

    def check_settings(self) -> None:
        super().check_settings()
        if str(self.strategy).upper() not in STRATEGIES:
            raise NnUNetCLError(f"strategy {self.strategy!r}: choose one of {STRATEGIES}.")
        if self.loss_form not in LOSS_FORMS:
            raise NnUNetCLError(f"loss_form {self.loss_form!r}: choose one of {LOSS_FORMS}.")
        if self.patches_per_case < 2:
            raise NnUNetCLError(f"patches_per_case={self.patches_per_case}: PolyCL needs >= 2 (a same-scan positive).")
        if self.pretrain_epochs > 0 and self.get_pretrain_batch_size() // self.patches_per_case < 2:
            raise NnUNetCLError(
                f"pretrain_batch_size={self.pretrain_batch_size} with patches_per_case={self.patches_per_case} gives "
                f"{self.get_pretrain_batch_size() // self.patches_per_case} scan(s) per step on each process; PolyCL "
                f"needs >= 2 (negatives come from other scans). Fix: set pretrain_batch_size >= "
                f"{2 * self.patches_per_case * (dist.get_world_size() if self.is_ddp else 1)}.")

    # ---------------------------------------------------------------- hooks
    def build_cl_modules(self) -> nn.ModuleDict:
        channels = self.unwrapped_network.encoder.output_channels[-1]
        conv_op = nn.Conv3d if len(self.configuration_manager.patch_size) == 3 else nn.Conv2d
        return nn.ModuleDict(pooled_projection_heads(channels, self.hidden_dim, self.projection_dim, conv_op))

    def get_pretrain_dataloader(self):
        self.check_settings()
        members = self.pool_members(shard_by_rank=False)
        w = dist.get_world_size() if self.is_ddp else 1
        if len(members) < 2 * w:  # checked on the whole pool, so every rank stops alike
            raise NnUNetCLError(f"The pool has {len(members)} case(s); PolyCL needs >= 2 scans per process "
                                f"({w} process(es): negatives come from other scans). Fix: nnUNetv2_cl_add_unlabeled "
                                f"-d DATASET -i FOLDER, or fewer processes.")
        members = shard(members)
        # organ presence only from the cases nnU-Net itself trains this fold on
        train_keys, _ = self.do_split()
        known = [(self.preprocessed_dataset_folder, k) for k in train_keys]
        dataset = PolyCLPoolDataset(members, known,
                                    read_nonzero_mask=any(self.configuration_manager.use_mask_for_norm or []))
        patch = self.get_pretrain_patch_size()
        batch = self.get_pretrain_batch_size()
        rotation, do_dummy_2d, initial_patch, mirror_axes = self.pretrain_augmentation(patch)
        transforms = self.get_training_transforms(
            patch, rotation, None, mirror_axes, do_dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels, regions=None,
            ignore_label=self.label_manager.ignore_label)
        loader = PolyCLPatchLoader(dataset, batch // self.patches_per_case, self.patches_per_case, initial_patch,
                                   patch, self.label_manager, organ_labels=self.organ_labels, transforms=transforms,
                                   balance_presence=self.balance_presence, presence_tries=self.presence_tries)
        n_known = len(dataset.presence_known)
        self.print_to_log_file(
            f"Pretraining pool: {len(members)} cases ({n_known} with organ presence from fold {self.fold}'s training "
            f"split, {len(members) - n_known} unknown); PolyCL-{self.strategy.upper()} ({self.loss_form}, "
            f"tau {self.temperature}), {batch // self.patches_per_case} scans x {self.patches_per_case} patches "
            f"of {patch} per step (configuration patch {list(self.configuration_manager.patch_size)})")
        if self.strategy.upper() != "S" and n_known == 0:
            self.print_to_log_file(f"PolyCL-{self.strategy.upper()}: no pool case has known organ presence, so every "
                                   f"anchor falls back to S.")
        return self.augmenter(loader)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding: stock encoder bottleneck -> 1x1 conv + LeakyReLU -> global average -> MLP."""
        return pooled_embedding(self.cl_modules, self.encode(x)[-1])

    def pretrain_losses(self, batch: dict) -> dict:
        strategy = self.strategy.upper()
        case_index, presence = batch["case_index"], batch.get("organ_present")
        z = self.embed(batch["data"])
        if self.is_ddp:  # pairs across all ranks' patches: every rank computes the loss of the whole batch
            n = z.shape[0]
            case_index = gather_with_grad(torch.as_tensor(case_index, device=z.device) + rank() * n)
            presence = gather_with_grad(torch.as_tensor(normalize_presence(presence, n), device=z.device))
            z = gather_with_grad(z)
        if self.loss_form == "infonce":
            loss = polycl_infonce_loss(z, case_index, presence, strategy, self.temperature)
        elif self.loss_form == "triplet":
            rng = np.random.default_rng(np.random.randint(0, 2 ** 31 - 1))
            triplets, = broadcast_objects(sample_triplets(case_index, presence, strategy, rng,
                                                          self.triplet_max_tries))  # rank 0 draws for all
            a, p, n = (torch.as_tensor(i, device=z.device) for i in triplets)
            loss = polycl_triplet_loss(z[a], z[p], z[n], self.temperature)
        else:
            raise NnUNetCLError(f"loss_form {self.loss_form!r}: choose one of {LOSS_FORMS}.")
        self._record(case_index, presence, strategy)
        return {"polycl": loss}

    # ---------------------------------------------------------------- what the batches looked like
    def _record(self, case_index, presence, strategy: str) -> None:
        n = int(case_index.shape[0])
        pres = normalize_presence(presence, n)
        valid = valid_anchor_mask(*strategy_masks(case_index, pres, strategy))
        self._batch_stats.append((n, int((pres >= 0).sum()), int((pres == 1).sum()), int(valid.sum())))

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        if self.stage() == PRETRAIN and self._batch_stats:
            n, known, present, valid = np.sum(self._batch_stats, axis=0)
            self.print_to_log_file(
                f"PolyCL patches: {n}, presence known {known} ({present} with the organ), anchors with a positive "
                f"and a negative under {self.strategy.upper()}: {valid} ({100. * valid / max(n, 1):.0f}%)")
        self._batch_stats = []


class nnUNetTrainerPolyCLPretrain(nnUNetTrainerPolyCL):
    """Pool only; checkpoint_final.pth goes to `nnUNetv2_train ... -pretrained_weights` of any trainer.

    Run it on a pretraining plans variant (nnUNetv2_cl_pretrain_plans) for many small patches per step:
    nnUNetv2_train D 3d_fullres_clpretrain F -tr nnUNetTrainerPolyCLPretrain.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.finetune_epochs = 0
