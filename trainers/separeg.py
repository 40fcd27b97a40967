"""SepaReg (Wang et al., AAAI 2022) as staged nnU-Net trainers, 3-D adaptation (docs/methods/separeg.md).

One `nnUNetv2_train` call runs, in this order:

1. separation (SIS), once per pool case, cached in
   ``$nnUNet_preprocessed/<Dataset>/nnunet_cl_separeg/<data_identifier>/<case>.npz`` (a rerun skips finished
   cases); every kept supervoxel becomes its own small image (region crop, zero outside the region);
2. pretraining, whose phase follows from the epoch, so `--c` resumes anywhere:

   | epochs                                  | phase    | what is trained                                   |
   |-----------------------------------------|----------|---------------------------------------------------|
   | [0, R)                                  | region   | base: SimSiam or BYOL on two views of every crop  |
   | [R, R + k E)                            | expert   | expert j = (epoch - R) // E, from the base, on    |
   |                                         |          | the regions of k-means cluster j                  |
   | [R + k E, R + k E + D)                  | distill  | student (from the base) regresses frozen experts, |
   |                                         |          | one expert's block of regions per step            |

   R = region_epochs, E = expert_epochs (per expert), D = distill_epochs; pretrain_epochs is their sum;
3. supervised fine-tuning exactly as nnUNetTrainer (the base class), unless finetune_epochs = 0.

The model that is trained always sits in nnU-Net's own network (`self.network`'s encoder) and the heads in
`self.cl_modules`, so the base class's optimiser, gradient clipping, logging and checkpoints apply unchanged.
The base, the trained experts and the k-means assignments are kept on the CPU and saved in the
checkpoint's extra state while a later pretraining phase still needs them. The student ends up in
`self.network`, so checkpoint_final of the pretraining-only trainer loads with `-pretrained_weights`.
"""
from __future__ import annotations

import time
from os.path import join

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from torch import nn

from nnunet_cl.distributed import broadcast_objects
from nnunet_cl.heads import local_head
from nnunet_cl.methods.separeg.cache import PreprocessedCaseLoader, build_region_cache, load_region_cache
from nnunet_cl.methods.separeg.clustering import expert_blocks, kmeans_regions
from nnunet_cl.methods.separeg.defaults import CACHE_FOLDER, SEPARATION_DEFAULTS
from nnunet_cl.methods.separeg.losses import (byol_loss, distill_cosine_loss, distill_kl_loss, ema_update, mlp_head,
                                      simsiam_loss)
from nnunet_cl.views import flip_view, intensity_view
from nnunet_cl_trainers.base import FINETUNE, PRETRAIN, nnUNetTrainerCLBase
from nnunet_cl_trainers.seeding import augmenter_seed

REGION, EXPERT, DISTILL = "region", "expert", "distill"


class _SepaRegState:
    """Run-time state of the pretraining phases (kept out of the trainer's attribute dump: short repr)."""

    def __init__(self):
        self.regions: np.ndarray | None = None  # (N, 1, s, s, s) uint8 (x 255) or float crops
        self.region_cases: list[str] | None = None  # case ids the crops were loaded from, in order
        self.region_case: np.ndarray | None = None  # (N,) index into region_cases
        self.region_id: np.ndarray | None = None    # (N,) supervoxel label of each crop in its case
        self.assignments: np.ndarray | None = None  # (N,) k-means cluster of each crop
        self.centroids: np.ndarray | None = None
        self.base: dict | None = None                # {"encoder": sd, "heads": sd} on the CPU, teacher included
        self.experts: dict[int, dict] = {}           # expert id -> {"encoder": sd, "heads": sd}
        self.working = ("base", None)                # what self.network's encoder and cl_modules hold
        self.frozen: dict[str, list] = {}            # "expert"/"base" -> [module, tag of the loaded weights]
        self.blocks = None                           # iterator of expert blocks (distill phase)

    def __repr__(self):
        n = 0 if self.regions is None else len(self.regions)
        return f"SepaRegState(regions={n}, clusters={None if self.centroids is None else len(self.centroids)}, " \
               f"experts={sorted(self.experts)}, working={self.working})"


class _RegionBatches:
    """The pretraining 'data loader': an in-process iterator over the region cache, phase-aware."""

    def __init__(self, trainer: "nnUNetTrainerSepaReg"):
        self.trainer = trainer

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.trainer.next_region_batch()


class _PhasePolyLR:
    """nnU-Net's poly decay, restarted at every pretraining phase and for every expert."""

    def __init__(self, optimizer, trainer: "nnUNetTrainerSepaReg", exponent: float = 0.9):
        self.optimizer, self.trainer, self.exponent = optimizer, trainer, exponent

    def step(self, current_step: int | None = None):
        epoch = self.trainer.current_epoch if current_step is None else current_step
        _, local, length = self.trainer.phase_position(epoch)
        lr = self.trainer.pretrain_lr * (1 - min(local, length - 1) / max(length, 1)) ** self.exponent
        for g in self.optimizer.param_groups:
            g["lr"] = lr


class nnUNetTrainerSepaReg(nnUNetTrainerCLBase):
    """Staged SepaReg: separation, region pretraining, experts, distillation, then nnU-Net fine-tuning.

    Hyperparameters are attributes (set in __init__; a variant is a small subclass). See
    docs/methods/separeg.md for what each does and where it departs from the paper.
    """

    loss_terms = (REGION, EXPERT, DISTILL)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # structure-aware image separation (nnunet_cl.methods.separeg.separation.separate_case)
        self.n_segments = SEPARATION_DEFAULTS["n_segments"]
        self.compactness = SEPARATION_DEFAULTS["compactness"]
        self.separation_downsample = SEPARATION_DEFAULTS["downsample"]
        self.crop_size = SEPARATION_DEFAULTS["crop_size"]
        self.min_region_size = SEPARATION_DEFAULTS["min_size"]
        self.min_fill_ratio = SEPARATION_DEFAULTS["min_fill_ratio"]
        self.max_elongation = SEPARATION_DEFAULTS["max_elongation"]
        # inter-organ representation
        self.objective = "simsiam"  # 'simsiam' (the paper's figure) or 'byol' (the authors' code)
        self.byol_momentum = 0.99
        # region crops per step (two views each), also the distillation block size; None: as many as hold the voxels
        # of the plans' batch (>= 8, <= 256), so a step costs what an nnU-Net step does. The paper uses 32
        self.regions_per_step = None
        self.projection_dim = 256
        self.projection_hidden = 1024
        self.predictor_hidden = 64
        self.feature_stage = None  # encoder stage that is pooled; None: deepest with >= 2 voxels per axis
        self.scale_jitter = (0.8, 1.0)  # fraction of the crop each view shows, per axis (random resized crop)
        self.view_noise_std = (0.0, 0.05)  # Gaussian noise of the intensity views, crop units ([0, 1])
        # intra- and inter-organ distillation (IID)
        self.k = 4
        self.kmeans_seed = 0
        self.cluster_features = "projection"  # what k-means clusters: 'projection' (authors' code) or 'pooled'
        self.distill_balanced = True  # every cluster the same number of distillation blocks per pass, as the
        # authors' batches hold one block per expert; False: blocks in proportion to cluster size
        self.embed_batch_size = 64
        self.cluster_max_regions = 4096  # k-means (and the experts) on at most this many regions, drawn at random
        # with kmeans_seed; None: all of them, as the paper. Bounds the embedding pass on large pools
        self.distill_loss = "cosine"  # 'cosine' (regression of the expert's projection) or 'kl'
        self.distill_temperature = 0.1  # KL variant
        self.distill_base_weight = 1.0  # KL variant: weight of the regression onto the base model ("chair")
        self.distill_via_expert_predictor = False  # True: the authors' type 0 (expert predictor on the student)
        # phase lengths (pretrain_epochs is their sum)
        self.region_epochs = 50
        self.expert_epochs = 10  # per expert
        self.distill_epochs = 40
        self.seed = None  # region batches and distillation blocks; None: training_seed, or 0 without one
        self.sepa = _SepaRegState()
        self._rng = None  # made at the first batch, once the seed attributes are final
        self._block_rng = None

    # ------------------------------------------------------------------------------------------ schedule
    @property
    def pretrain_epochs(self) -> int:
        return self.region_epochs + self.k * self.expert_epochs + self.distill_epochs

    @pretrain_epochs.setter
    def pretrain_epochs(self, value):
        # the base class's __init__ assigns a default before the phase lengths exist; ignore that one
        if "region_epochs" in self.__dict__ and value != self.pretrain_epochs:
            raise AttributeError("SepaReg's pretrain_epochs is region_epochs + k * expert_epochs + distill_epochs; "
                                 "set those instead")

    @property
    def n_experts(self) -> int:
        """Experts actually trained: k, or fewer when k-means found fewer distinct regions."""
        return self.k if self.sepa.centroids is None else int(len(self.sepa.centroids))

    def phase_position(self, epoch: int | None = None) -> tuple[str, int, int]:
        """(phase, epoch within the phase's current segment, segment length); experts are one segment each."""
        e = self.current_epoch if epoch is None else int(epoch)
        if e < self.region_epochs:
            return REGION, e, self.region_epochs
        e -= self.region_epochs
        if e < self.k * self.expert_epochs:
            return EXPERT, e % self.expert_epochs, self.expert_epochs
        e -= self.k * self.expert_epochs
        if e < self.distill_epochs:
            return DISTILL, e, self.distill_epochs
        return FINETUNE, e - self.distill_epochs, self.finetune_epochs

    def phase(self, epoch: int | None = None) -> str:
        return self.phase_position(epoch)[0]

    def expert_of_epoch(self, epoch: int | None = None) -> int:
        """Expert trained in an expert-phase epoch (when k-means gave k' < k clusters, the last one goes on)."""
        e = (self.current_epoch if epoch is None else int(epoch)) - self.region_epochs
        return min(e // max(self.expert_epochs, 1), self.n_experts - 1)

    def separation_params(self) -> dict:
        return dict(n_segments=int(self.n_segments), compactness=float(self.compactness),
                    downsample=int(self.separation_downsample), crop_size=int(self.crop_size),
                    min_size=None if self.min_region_size is None else int(self.min_region_size),
                    min_fill_ratio=float(self.min_fill_ratio), max_elongation=float(self.max_elongation))

    # ------------------------------------------------------------------------------------------ modules
    def _conv_op(self):
        conv = self.configuration_manager.network_arch_init_kwargs.get("conv_op", "Conv3d")
        return nn.Conv3d if str(conv).endswith("3d") else nn.Conv2d

    def resolved_feature_stage(self) -> int:
        """Encoder stage whose output is pooled. nnU-Net's deepest stage on a 32^3 crop is often 1 voxel,
        where instance normalisation is undefined; the default takes the deepest stage with >= 2 voxels per axis."""
        enc = self.unwrapped_network.encoder
        n = len(enc.stages)
        if self.feature_stage is not None:
            return int(self.feature_stage) % n
        dim = 3 if self._conv_op() is nn.Conv3d else 2
        strides = getattr(enc, "strides", None) or \
            self.configuration_manager.network_arch_init_kwargs.get("strides")
        size = np.full(dim, int(self.crop_size))
        best = 0
        for i in range(n):
            s = np.broadcast_to(np.asarray(strides[i]), (dim,))
            size = -(-size // s)  # conv with stride s and 'same' padding: ceil
            if (size >= 2).all():
                best = i
        return best

    def build_cl_modules(self) -> nn.ModuleDict:
        # attributes checked here, before the region phase trains, not when an expert epoch first needs them
        for attr, allowed in (("objective", ("simsiam", "byol")), ("distill_loss", ("cosine", "kl")),
                              ("cluster_features", ("projection", "pooled"))):
            if getattr(self, attr) not in allowed:
                raise ValueError(f"{attr} must be one of {allowed}; got {getattr(self, attr)!r}. Fix: set "
                                 f"self.{attr} in your subclass's __init__ to one of them.")
        if self._conv_op() is not nn.Conv3d:
            raise ValueError(f"SepaReg separates 3d volumes into 3d region crops; configuration "
                             f"{self.configuration_name!r} is 2d. Fix: train a 3d configuration (3d_fullres).")
        if self.resolved_regions_per_step() < 2:
            raise ValueError("regions_per_step must be >= 2 (the heads use batch normalisation)")
        import copy
        enc = self.unwrapped_network.encoder
        channels = enc.output_channels[self.resolved_feature_stage()]
        mods = nn.ModuleDict({
            "local": local_head(channels, self._conv_op()),  # as SimCLR's: pooling nnU-Net's stages needs it
            "projector": mlp_head(channels, self.projection_hidden, self.projection_dim),
            "predictor": mlp_head(self.projection_dim, self.predictor_hidden, self.projection_dim)})
        if self.objective == "byol":
            teacher = nn.ModuleDict({"encoder": copy.deepcopy(enc), "local": copy.deepcopy(mods["local"]),
                                     "projector": copy.deepcopy(mods["projector"])})
            for p in teacher.parameters():
                p.requires_grad_(False)
            mods["teacher"] = teacher
        return mods

    def build_scheduler(self, optimizer, stage: str):
        if stage == PRETRAIN:  # poly decay restarted for each phase and each expert
            return _PhasePolyLR(optimizer, self)
        return super().build_scheduler(optimizer, stage)

    def _online(self) -> nn.ModuleDict:
        """The trained branch (nnU-Net's encoder and the heads), in the teacher's layout."""
        return nn.ModuleDict({"encoder": self.unwrapped_network.encoder, "local": self.cl_modules["local"],
                              "projector": self.cl_modules["projector"], "predictor": self.cl_modules["predictor"]})

    def _encode_to(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        stage = self.resolved_feature_stage()
        if getattr(encoder, "stem", None) is not None:
            x = encoder.stem(x)
        for s in encoder.stages[:stage + 1]:
            x = s(x)
        return x

    def embed(self, branch, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled features, projection) of region crops through one branch (online, teacher, expert, base)."""
        f = branch["local"](self._encode_to(branch["encoder"], x)).flatten(2).mean(-1)
        return f, branch["projector"](f)

    # ------------------------------------------------------------------------------------------ views
    def region_view(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One augmented view of region crops (B, 1, s, s, s) in [0, 1]: random resized sub-box, flips,
        intensity changes (nnunet_cl.views); voxels outside the region stay 0."""
        b, nd = x.shape[0], x.ndim - 2
        lo, hi = self.scale_jitter
        if hi < 1 or lo < 1:
            dev = generator.device if generator is not None else x.device
            s = lo + (hi - lo) * torch.rand((b, nd), generator=generator, device=dev).to(x)
            t = (torch.rand((b, nd), generator=generator, device=dev).to(x) * 2 - 1) * (1 - s)
            theta = torch.zeros(b, nd, nd + 1, dtype=x.dtype, device=x.device)
            idx = torch.arange(nd)
            theta[:, idx, idx] = s
            theta[:, :, nd] = t
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        x, _ = flip_view(x, None, generator)
        inside = x > 1e-3
        y = intensity_view(x, generator, noise_std=self.view_noise_std)
        return y * inside

    # ------------------------------------------------------------------------------------------ losses
    def prepare_batch(self, batch: dict) -> dict:
        batch = super().prepare_batch(batch)
        if self.stage() == PRETRAIN and "views" not in batch:  # two augmented views of every crop, concatenated
            x = batch["data"].float()
            batch["views"] = torch.cat([self.region_view(x), self.region_view(x)])
        return batch

    def pretrain_losses(self, batch: dict) -> dict:
        phase = batch.get("phase") or self.phase()
        views = batch["views"]
        if phase in (REGION, EXPERT):
            return {phase: self.inter_organ_loss(views)}
        return {DISTILL: self.distillation_loss(views, int(batch["expert"]))}

    def inter_organ_loss(self, views: torch.Tensor) -> torch.Tensor:
        """SimSiam or BYOL on two views (concatenated along the batch) of the same region crops."""
        online = self._online()
        _, z = self.embed(online, views)
        p = online["predictor"](z)
        z1, z2 = z.chunk(2)
        p1, p2 = p.chunk(2)
        if self.objective == "simsiam":
            return simsiam_loss(p1, p2, z1, z2)
        with torch.no_grad():
            _, zt = self.embed(self.cl_modules["teacher"], views)
        zt1, zt2 = zt.chunk(2)
        return byol_loss(p1, p2, zt1, zt2)

    def distillation_loss(self, views: torch.Tensor, expert: int) -> torch.Tensor:
        """The student (online branch) against frozen expert `expert` on the same views.

        'cosine': 2 - 2 cos(z_student, sg(z_expert)) (through the expert's predictor first when
        distill_via_expert_predictor, the authors' type 0). 'kl': KL(softmax(f_expert / T) || softmax(f_student / T))
        on the pooled features plus distill_base_weight x the cosine regression onto the base model.
        Both are 0 when the student equals the expert (and, for 'kl', the base).
        """
        online = self._online()
        teacher = self._frozen_branch("expert", expert)
        with torch.no_grad():
            fe, ze = self.embed(teacher, views)
        fs, zs = self.embed(online, views)
        if self.distill_loss == "cosine":
            pred = teacher["predictor"](zs) if self.distill_via_expert_predictor else zs
            return distill_cosine_loss(pred, ze)
        loss = distill_kl_loss(fs, fe, self.distill_temperature)
        if self.distill_base_weight > 0:
            base = self._frozen_branch("base")
            with torch.no_grad():
                _, zb = self.embed(base, views)
            pred = base["predictor"](zs) if self.distill_via_expert_predictor else zs
            loss = loss + self.distill_base_weight * distill_cosine_loss(pred, zb)
        return loss

    def on_after_step(self, batch: dict, terms: dict) -> None:
        if self.stage() == PRETRAIN and self.objective == "byol" and self.phase() in (REGION, EXPERT):
            online = self._online()
            student = nn.ModuleDict({k: online[k] for k in ("encoder", "local", "projector")})
            ema_update(self.cl_modules["teacher"], student, self.byol_momentum)

    # ------------------------------------------------------------------------------------------ weights
    def _snapshot(self, with_teacher: bool) -> dict:
        heads = {k: v.detach().cpu().clone() for k, v in self.cl_modules.state_dict().items()
                 if with_teacher or not k.startswith("teacher.")}
        encoder = self.unwrapped_network.encoder.state_dict()
        return {"encoder": {k: v.detach().cpu().clone() for k, v in encoder.items()}, "heads": heads}

    def _restore(self, state: dict) -> None:
        """Load a snapshot into the working copy (nnU-Net's encoder + heads) and forget AdamW's moments."""
        self.unwrapped_network.encoder.load_state_dict(state["encoder"])
        heads = state["heads"]
        own = self.cl_modules.state_dict()
        missing = [k for k in own if k not in heads]
        if missing and not all(k.startswith("teacher.") for k in missing):
            raise RuntimeError(f"snapshot lacks head weights {missing[:3]}")
        self.cl_modules.load_state_dict({**own, **heads})
        self.optimizer.state.clear()

    def _frozen_branch(self, which: str, expert: int | None = None) -> nn.ModuleDict:
        """A frozen copy of encoder + heads holding the base's or an expert's weights (one working copy each)."""
        state = self.sepa.base if which == "base" else self.sepa.experts.get(expert)
        if state is None:
            raise RuntimeError(f"no weights for the {which} model {'' if expert is None else expert}: "
                               f"the distillation phase needs the base and the experts")
        entry = self.sepa.frozen.get(which)
        if entry is None:
            import copy
            online = self._online()
            mod = nn.ModuleDict({k: copy.deepcopy(online[k]) for k in ("encoder", "local", "projector", "predictor")})
            for p in mod.parameters():
                p.requires_grad_(False)
            entry = self.sepa.frozen[which] = [mod.to(self.device), None]
        mod, tag = entry
        if tag != (which, expert):
            mod["encoder"].load_state_dict(state["encoder"])
            for k in ("local", "projector", "predictor"):
                mod[k].load_state_dict({n[len(k) + 1:]: v for n, v in state["heads"].items() if n.startswith(k + ".")})
            entry[1] = (which, expert)
        # batch statistics in the heads' BN, like the online branch (and BYOL's target network)
        mod.train()
        return mod

    # ------------------------------------------------------------------------------------------ phases
    def on_train_epoch_start(self):
        if self.stage() == PRETRAIN:
            self.enter_phase()
        elif self.sepa.base is not None or self.sepa.experts or self.sepa.frozen:
            self.sepa.base, self.sepa.experts, self.sepa.frozen = None, {}, {}  # fine-tuning needs none of it
        super().on_train_epoch_start()
        if self.stage() == PRETRAIN:
            phase, local, length = self.phase_position()
            what = f"expert {self.expert_of_epoch()} of {self.n_experts}" if phase == EXPERT else phase
            self.print_to_log_file(f"SepaReg {what}: epoch {local + 1} of {length}")

    def enter_phase(self) -> None:
        """Make the working copy hold what the current epoch trains; idempotent, so --c can resume anywhere."""
        phase = self.phase()
        st = self.sepa
        if phase == REGION:
            return
        if st.base is None:  # first epoch after the region phase: the working copy is the base
            st.base = self._snapshot(with_teacher=True)
        if st.assignments is None:
            self.cluster_regions()
        if phase == EXPERT:
            j = self.expert_of_epoch()
            if st.working != ("expert", j):
                self._stash_expert()
                self._restore(st.base)
                st.working = ("expert", j)
                self.print_to_log_file(f"SepaReg: training expert {j} from the base on "
                                       f"{int((st.assignments == j).sum())} regions of cluster {j}")
        elif phase == DISTILL and st.working[0] != "student":
            self._stash_expert()
            for j in range(self.n_experts):
                if j not in st.experts:  # expert_epochs = 0 (or k' < k): the base stands in
                    heads = {k: v for k, v in st.base["heads"].items() if not k.startswith("teacher.")}
                    st.experts[j] = {"encoder": st.base["encoder"], "heads": heads}
            self._restore(st.base)
            st.working = ("student", None)
            self.print_to_log_file(f"SepaReg: distilling {self.n_experts} frozen experts into the student "
                                   f"(initialised from the base), {self.resolved_regions_per_step()} regions of one "
                                   f"cluster per step, clusters {'balanced' if self.distill_balanced else 'by size'}")

    def _stash_expert(self):
        st = self.sepa
        if st.working[0] == "expert":
            st.experts[st.working[1]] = self._snapshot(with_teacher=False)

    @torch.no_grad()
    def region_embeddings(self, branch=None, indices: np.ndarray | None = None) -> np.ndarray:
        """Embeddings of the cached crops `indices` (default: all), no augmentation, float32 (n, D): the
        projections, or the pooled features with cluster_features = 'pooled'. Batched, with a progress bar."""
        if self.cluster_features not in ("projection", "pooled"):
            raise ValueError(f"cluster_features must be 'projection' or 'pooled', not {self.cluster_features!r}")
        which = 1 if self.cluster_features == "projection" else 0
        branch = self._online() if branch is None else branch
        was_training = [m.training for m in branch.values()]
        for m in branch.values():
            m.eval()
        from tqdm import tqdm
        indices = np.arange(len(self.sepa.regions)) if indices is None else np.asarray(indices)
        out = []
        try:
            starts = range(0, len(indices), self.embed_batch_size)
            for start in tqdm(starts, desc="SepaReg: embedding regions for k-means", unit="batch",
                              disable=self.local_rank != 0, mininterval=10):
                x = self._crops_tensor(indices[start:start + self.embed_batch_size])
                out.append(self.embed(branch, x)[which].float().cpu())
        finally:
            for m, t in zip(branch.values(), was_training):
                m.train(t)
        return torch.cat(out).numpy()

    def cluster_regions(self) -> None:
        """IID step (i): k-means of the base's region embeddings into k pseudo-organs."""
        if self.sepa.regions is None:
            raise RuntimeError("no region crops loaded: the region cache must be built first")
        t0 = time.time()
        n = len(self.sepa.regions)
        sample = np.arange(n)
        if self.cluster_max_regions is not None and n > self.cluster_max_regions:
            sample = np.sort(np.random.default_rng(self.kmeans_seed).choice(n, self.cluster_max_regions,
                                                                           replace=False))
        n_emb = len(sample)
        assignments = centroids = None
        if self.local_rank == 0:  # once, then every rank trains on the same clusters
            assignments = np.full(n, -1, dtype=np.int64)  # -1: not clustered, never drawn for an expert
            assignments[sample], centroids = kmeans_regions(self.region_embeddings(indices=sample), self.k,
                                                            seed=self.kmeans_seed)
        assignments, centroids = broadcast_objects(assignments, centroids)
        self.sepa.assignments, self.sepa.centroids = assignments, centroids
        sizes = np.bincount(assignments[assignments >= 0], minlength=len(centroids))
        self.print_to_log_file(f"SepaReg: k-means of {n_emb} of {n} region embeddings ({self.cluster_features}) into "
                               f"{len(centroids)} clusters "
                               f"(sizes {sizes.tolist()}) in {time.time() - t0:.1f} s")

    # ------------------------------------------------------------------------------------------ data
    @property
    def region_cache_folder(self) -> str:
        return join(self.preprocessed_dataset_folder_base, CACHE_FOLDER, self.configuration_manager.data_identifier)

    def get_pretrain_dataloader(self):
        self.prepare_regions()
        return _RegionBatches(self)

    def prepare_regions(self) -> None:
        """Separate every pool case not yet cached (never reads labels), then load the crops into memory."""
        members = self.pool_members(shard_by_rank=False)  # every rank holds all crops, draws its own batches
        spacing = [float(s) for s in self.configuration_manager.spacing]
        cases = [(ident, PreprocessedCaseLoader(folder, ident, spacing=spacing)) for folder, ident in members]
        if self.local_rank == 0:
            t0 = time.time()
            n_proc = max(1, get_allowed_n_proc_DA())
            summary = build_region_cache(cases, self.region_cache_folder, num_processes=n_proc, progress=True,
                                         **self.separation_params())
            if summary["computed"]:
                self.print_to_log_file(f"SepaReg separation: {len(summary['computed'])} case(s) in "
                                       f"{time.time() - t0:.1f} s with {n_proc} process(es), "
                                       f"{len(summary['skipped'])} already cached, in {self.region_cache_folder}")
        if self.is_ddp:
            dist.barrier()
        pinned = self.sepa.assignments is not None and self.sepa.region_cases
        ids = list(self.sepa.region_cases) if pinned else [ident for _, ident in members]
        if pinned and set(ids) != {i for _, i in members}:
            self.print_to_log_file("SepaReg: the pool changed since the regions were clustered; this run keeps "
                                   "the regions of the original cases")
        crops, index = load_region_cache(self.region_cache_folder, ids, dtype=None)
        self.set_regions(crops, index.case_ids, index.case, index.region_id)
        self.print_to_log_file(f"SepaReg pool: {len(ids)} cases, {len(crops)} region crops of {crops.shape[2:]}, "
                               f"{self.resolved_regions_per_step()} regions x 2 views per step")

    def set_regions(self, crops: np.ndarray, case_ids, case: np.ndarray | None = None,
                    region_id: np.ndarray | None = None) -> None:
        """Use these crops (N, 1, s, s, s; uint8 x 255 or float in [0, 1]) for pretraining."""
        st = self.sepa
        if st.assignments is not None and len(st.assignments) != len(crops):
            raise RuntimeError(f"{len(crops)} region crops but {len(st.assignments)} cluster assignments: the cache "
                               f"of the clustered cases changed. Fix: restart pretraining, or restore the cache.")
        st.regions = crops
        st.region_cases = list(case_ids)
        st.region_case = np.zeros(len(crops), np.int64) if case is None else np.asarray(case)
        st.region_id = np.arange(len(crops)) if region_id is None else np.asarray(region_id)
        st.blocks = None

    def _crops_tensor(self, idx: np.ndarray) -> torch.Tensor:
        c = self.sepa.regions[idx]
        x = torch.from_numpy(np.ascontiguousarray(c)).float()
        if c.dtype == np.uint8:
            x /= 255.0
        return x.to(self.device, non_blocking=True)

    @property
    def region_rng(self) -> np.random.Generator:
        if self._rng is None:
            seed = self.seed if self.seed is not None else (self.training_seed or 0)
            # stream 0 of the run (its augmenters have 1, 2, ...): a resumed run or another rank gets its own
            self._rng = np.random.default_rng(augmenter_seed(seed, 0, 0, self.current_epoch, self.local_rank))
        return self._rng

    @property
    def block_rng(self) -> np.random.Generator:
        """The distillation blocks' stream in a distributed run: the same on every rank."""
        if self._block_rng is None:
            seed = self.seed if self.seed is not None else (self.training_seed or 0)
            self._block_rng = np.random.default_rng(augmenter_seed(seed, 0, 1, self.current_epoch, 0))
        return self._block_rng

    def next_region_batch(self) -> dict:
        st = self.sepa
        n, b = len(st.regions), self.regions_per_rank
        phase = self.phase()
        expert = -1
        if phase == REGION:
            idx = self.region_rng.choice(n, size=b, replace=n < b)
        elif phase == EXPERT:
            expert = self.expert_of_epoch()
            members = np.flatnonzero(st.assignments == expert)
            idx = self.region_rng.choice(members, size=b, replace=members.size < b)
        elif phase == DISTILL:
            w = dist.get_world_size() if self.is_ddp else 1
            idx = next(st.blocks, None) if st.blocks is not None else None
            if idx is None:  # a new pass of blocks, one cluster each
                # distributed: every rank draws the same global blocks and takes its share of each, so all ranks
                # distil the same expert in a step
                st.blocks = expert_blocks(st.assignments, b * w, self.region_rng if w == 1 else self.block_rng,
                                          blocks_per_cluster=self._blocks_per_cluster())
                idx = next(st.blocks)
            expert = int(st.assignments[idx[0]])
            idx = idx[self.local_rank::w]
        else:
            raise RuntimeError(f"no region batches in phase {phase}")
        idx = np.sort(idx)
        return {"data": self._crops_tensor(idx), "phase": phase, "expert": expert, "index": idx}

    @property
    def regions_per_rank(self) -> int:
        """This rank's share of regions_per_step (the global batch, as nnU-Net's batch size is)."""
        return self.pretrain_batch_per_rank(self.resolved_regions_per_step())

    def resolved_regions_per_step(self) -> int:
        """regions_per_step, or (None) the crops whose two views hold as many voxels as the plans' batch."""
        if self.regions_per_step is not None:
            return int(self.regions_per_step)
        voxels = int(self.configuration_manager.batch_size) * int(np.prod(self.configuration_manager.patch_size))
        return int(min(256, max(8, round(voxels / (2 * int(self.crop_size) ** 3)))))

    def _blocks_per_cluster(self) -> int | None:
        """Balanced distillation: as many blocks in a pass as proportional sampling would give, split evenly
        over the clusters (None: proportional)."""
        if not self.distill_balanced:
            return None
        clustered = self.sepa.assignments[self.sepa.assignments >= 0]
        return max(1, round(len(clustered) / (len(np.unique(clustered)) * self.resolved_regions_per_step())))

    # ------------------------------------------------------------------------------------------ checkpoints
    def cl_extra_state(self) -> dict:
        st = self.sepa
        state = {"working": list(st.working), "assignments": st.assignments, "centroids": st.centroids,
                 "region_cases": st.region_cases, "region_case": st.region_case, "region_id": st.region_id,
                 "separation": self.separation_params(), "objective": self.objective, "k": self.k}
        nxt = self.current_epoch + 1  # the epoch a run resumed from this checkpoint starts with
        if self.stage(nxt) == PRETRAIN and self.phase(nxt) != REGION:  # later phases still need them
            state["base"] = st.base
            state["experts"] = st.experts
        return state

    def load_cl_extra_state(self, state: dict) -> None:
        st = self.sepa
        st.working = tuple(state.get("working", ("base", None)))
        st.assignments, st.centroids = state.get("assignments"), state.get("centroids")
        st.region_cases = state.get("region_cases")
        st.region_case, st.region_id = state.get("region_case"), state.get("region_id")
        to_cpu = lambda sd: {k: v.cpu() for k, v in sd.items()}  # noqa: E731
        base = state.get("base")
        st.base = None if base is None else {k: to_cpu(v) for k, v in base.items()}
        st.experts = {int(j): {k: to_cpu(v) for k, v in e.items()} for j, e in (state.get("experts") or {}).items()}
        st.frozen, st.blocks = {}, None


class nnUNetTrainerSepaRegPretrain(nnUNetTrainerSepaReg):
    """Pool only: its checkpoint_final.pth (the student in nnU-Net's network) goes to `-pretrained_weights`."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.finetune_epochs = 0
