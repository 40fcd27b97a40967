"""The staged contrastive trainer every nnunet-cl method builds on.

One `nnUNetv2_train` call runs `pretrain_epochs` of self-supervised pretraining on the unlabeled pool, then
`finetune_epochs` of plain nnU-Net supervised training on the labeled split. `self.network` stays the stock
nnU-Net U-Net; projection heads, teachers and queues live in `self.cl_modules` beside it and are saved under
the checkpoint key 'nnunet_cl', which nnU-Net's predictor and `-pretrained_weights` ignore.

A method declares what it is with two class attributes, never by which hooks it overrides:
  - has_pretraining    (True)   a self-supervised stage on the pool: `pretrain_losses`
  - has_auxiliary_loss (False)  terms added to nnU-Net's loss while it fine-tunes (`auxiliary_losses`); the
                                extra modules then train in that stage too

Every training step, of either stage, is the same (`train_step`): prepare_batch(batch) -> one forward through
`self.train_modules` (the stock network and the extra modules as one module, DDP-wrapped in a distributed run,
so that DDP averages every gradient) computing the method's named terms -> backward -> the optimiser's step ->
on_after_step(batch, terms) (EMA teachers, queues).

Hooks (see docs/architecture.md):
  - build_cl_modules()            -> nn.ModuleDict of heads/teachers/queues (outside self.network)
  - get_pretrain_dataloader()     -> iterator of pretraining batches (default: two views of pool crops)
  - prepare_batch(batch)          -> the batch on the device, plus the views, mixes or masks the method makes
  - step_inputs(batch)            -> (images, targets) of nnU-Net's loss, made inside the wrapped forward
  - pretrain_losses(batch)        -> {term: scalar} on one such batch
  - auxiliary_losses(batch, output, features) -> {term: scalar}; features: the maps named by feature_request
  - on_after_step(batch, terms)   after the optimiser's step
  - build_optimizer(stage), build_scheduler(optimizer, stage): a method's own optimiser or schedule
  - build_extra_optimizers()      -> {name: optimiser} for modules with an update of their own
  - cl_extra_state() / load_cl_extra_state(state) for queues or anything not in cl_modules
"""
import math
import os
import time
from os.path import basename, isfile, join
from typing import Callable, Dict

import numpy as np
import torch
import torch.distributed as dist
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_cl.distributed import rank, shard
from nnunet_cl.features import unet_features
from nnunet_cl.memory import fix_mmap_threshold
from nnunet_cl.paths import NnUNetCLError, save_json_atomic
from nnunet_cl.processes import end_children_with_parent, exit_on_sigterm
from nnunet_cl.safe_load import CorruptCheckpointError, load_checkpoint_file
from nnunet_cl.plotting import plot_loss_terms
from nnunet_cl.progress import StepProgress
from nnunet_cl.pool import POOL_RECORD, list_pool, load_manifest, pool_identifiers
from nnunet_cl_trainers.pool_data import PoolDataset, TwoViewDataLoader
from nnunet_cl_trainers.seeding import augmenter_seed, seed_everything, seeded_augmenters

PRETRAIN, FINETUNE = "pretrain", "finetune"
# per-epoch keys nnU-Net's logger fills only while it validates; pretraining epochs get NaN there
_VAL_KEYS = ("val_losses", "mean_fg_dice", "ema_fg_dice")
PREVIOUS_SUFFIX = ".previous"  # checkpoint_latest.pth -> checkpoint_latest.previous.pth, the one kept before it


class TrainModules(nn.Module):
    """The stock network and a method's extra modules as one module, so that one DDP wrapper averages every
    gradient. Its forward runs `compute(*args)`: the step's whole computation, through whatever wrapper is around."""

    def __init__(self, network: nn.Module, extra: nn.ModuleDict):
        super().__init__()
        self.network = network
        self.extra = extra

    def forward(self, compute: Callable, *args):
        return compute(*args)


class RankNetwork(nn.Module):
    """`self.network` on each rank of a distributed run: the stock network, where nnU-Net's code looks for it
    (`self.network.module`: deep supervision switch, validation, -pretrained_weights). Training steps never call
    it; they go through the DDP-wrapped TrainModules. Its state dict is the stock network's."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.module = network

    def forward(self, x):
        return self.module(x)

    def state_dict(self, *args, **kwargs):  # the stock network's keys, also when nnU-Net compiled it
        return getattr(self.module, "_orig_mod", self.module).state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return getattr(self.module, "_orig_mod", self.module).load_state_dict(state_dict, strict, assign)


class nnUNetTrainerCLBase(nnUNetTrainer):
    """Shared machinery; a method subclass sets `loss_terms` and its kind, and implements its hooks."""

    loss_terms: tuple = ()  # names of the method's loss terms, logged per epoch as 'cl_<term>'
    has_pretraining: bool = True  # a self-supervised stage (pretrain_epochs > 0 runs pretrain_losses)
    has_auxiliary_loss: bool = False  # auxiliary_losses join nnU-Net's loss while fine-tuning
    feature_request: dict = {}  # maps auxiliary_losses gets: {"encoder": (stages...), "decoder": (stages...)}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and device.type != "cuda":  # nnU-Net assumes DDP means CUDA; torchrun with gloo runs on CPU
            self.device, self.grad_scaler = device, None
        elif self.is_ddp:  # nnU-Net takes the global rank as the GPU index; on several machines it is the local one
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.local_rank)))
        # stage lengths; thin variants change these (nnUNetTrainerSimCLR_50pt_250ft ...)
        self.pretrain_epochs = 100
        self.finetune_epochs = 1000
        self.pretrain_iterations_per_epoch = 250
        self.finetune_iterations_per_epoch = self.num_iterations_per_epoch
        self.finetune_val_iterations_per_epoch = self.num_val_iterations_per_epoch
        self.pretrain_batch_size = None  # samples per step (two views each); None: half the plans' batch, >= 2
        # pretraining optimiser: AdamW with nnU-Net's poly decay over the pretraining stage
        self.pretrain_lr = 1e-3
        self.pretrain_weight_decay = 1e-5
        # glibc keeps freed multi-MiB blocks of the blockwise losses; a fixed threshold returns them (None: off)
        self.mmap_threshold_bytes = 131072
        # None: unseeded, as nnU-Net. An int seeds the initialisation, the patches and their augmentation: the run
        # repeats bit for bit on CPU with nnUNet_n_proc_DA 0 or 1 (trainers/seeding.py)
        self.training_seed = None
        # a progress line (steps, rate, time left in the epoch) at most this often inside an epoch; None: off
        self.progress_every_s = 60.0
        self._progress = StepProgress()
        self._augmenters_built = 0  # each augmenter of a run draws from a stream of its own
        # the step's own draws (mix boxes, codes, anchors; sample_generators): seeded with the run, in checkpoints
        self._step_rng = torch.Generator()
        self.cl_modules: nn.ModuleDict | None = None
        self.train_modules: nn.Module | None = None  # TrainModules, DDP-wrapped in a distributed run
        self.extra_optimizers: Dict[str, torch.optim.Optimizer] | None = None
        self._in_step = False  # inside step_losses, the wrapped forward
        self._optimizer_stage = None
        self._pool_loader = None
        for term in ("total",) + tuple(self.loss_terms):
            self.logger.local_logger.my_fantastic_logging.setdefault(f"cl_{term}", [])

    # ---------------------------------------------------------------- hooks
    def build_cl_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict()

    def pretrain_losses(self, batch: dict) -> Dict[str, torch.Tensor]:
        raise NotImplementedError(f"{self.__class__.__name__} has no pretraining loss")

    def auxiliary_losses(self, batch: dict, output, features: dict) -> Dict[str, torch.Tensor]:
        raise NotImplementedError(f"{self.__class__.__name__} sets has_auxiliary_loss but has no auxiliary_losses")

    def prepare_batch(self, batch: dict) -> dict:
        """Hook: the batch as the step's forward gets it. Default: tensors (and lists of them) on the device."""
        def move(v):
            if torch.is_tensor(v):
                return v.to(self.device, non_blocking=True)
            if isinstance(v, list) and v and torch.is_tensor(v[0]):
                return [t.to(self.device, non_blocking=True) for t in v]
            return v
        return {k: move(v) for k, v in batch.items()}

    def step_inputs(self, batch: dict):
        """Hook (fine-tuning): (images, targets) of nnU-Net's loss in this step. It runs inside the step's wrapped
        forward, so a module that makes inputs (DCL-Seg's positive generator) has its gradients averaged by DDP.
        Default: batch['data'], batch['target']."""
        return batch["data"], batch["target"]

    def on_after_step(self, batch: dict, terms: dict) -> None:
        """Hook: after the optimiser's step (EMA teachers, queue pushes)."""

    def build_optimizer(self, stage: str) -> torch.optim.Optimizer:
        """Hook: the optimiser of a stage. Fine-tuning: exactly nnU-Net's SGD (plus the extra modules of an
        auxiliary-loss method); pretraining: AdamW over the network and the extra modules. Parameters that an
        extra optimiser (build_extra_optimizers) holds are left to it."""
        own = {id(p) for opt in (self.extra_optimizers or {}).values() for g in opt.param_groups for p in g["params"]}
        if stage == FINETUNE:
            params = list(self.network.parameters())
            if self.has_auxiliary_loss:
                params += [p for p in self.cl_modules.parameters() if id(p) not in own]
            return torch.optim.SGD(params, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                   nesterov=True)
        params = list(self.network.parameters()) + [p for p in self.cl_modules.parameters() if id(p) not in own]
        return torch.optim.AdamW(params, lr=self.pretrain_lr, weight_decay=self.pretrain_weight_decay)

    def build_extra_optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        """Hook: optimisers of their own for extra modules (a positive generator, a second decoder), by name.
        Built once with the extra modules; each steps after the main one in every step that trains the module
        (its parameters have a gradient); all are saved in checkpoints and restored with --c."""
        return {}

    def build_scheduler(self, optimizer: torch.optim.Optimizer, stage: str):
        """Hook: the learning-rate schedule of a stage, stepped with the epoch within the stage. Default: poly."""
        if stage == FINETUNE:
            return PolyLRScheduler(optimizer, self.initial_lr, max(self.finetune_epochs, 1))
        return PolyLRScheduler(optimizer, self.pretrain_lr, max(self.pretrain_epochs, 1))

    def cl_extra_state(self) -> dict:
        return {}

    def load_cl_extra_state(self, state: dict) -> None:
        pass

    # ---------------------------------------------------------------- helpers
    @property
    def num_epochs_total(self) -> int:
        return self.pretrain_epochs + self.finetune_epochs

    def stage(self, epoch: int | None = None) -> str:
        epoch = self.current_epoch if epoch is None else epoch
        return PRETRAIN if epoch < self.pretrain_epochs else FINETUNE

    @property
    def unwrapped_network(self) -> nn.Module:
        net = self.network.module if self.is_ddp else self.network
        return net._orig_mod if isinstance(net, OptimizedModule) else net

    @property
    def step_network(self) -> nn.Module:
        """The network the step runs: the stock one, compiled where nnU-Net compiles it."""
        mod = self.train_modules.module if isinstance(self.train_modules, DDP) else self.train_modules
        return mod.network

    def step_parts(self) -> nn.Module:
        """The network whose parts (encoder, decoder stages) the step calls. Only inside the step's wrapped
        forward (step_losses): called from anywhere else in a distributed run, their gradients would not be
        averaged across ranks, so that is refused."""
        if self.is_ddp and not self._in_step:
            raise RuntimeError("the network's parts were called outside the step's DDP-wrapped forward; call them "
                               "from pretrain_losses / auxiliary_losses (inside step_losses)")
        return self.unwrapped_network

    def sample_generators(self, n: int) -> list:
        """One torch.Generator per sample of this rank's batch, seeded by one draw of the run's step stream and the
        sample's index in the global batch: a sample's draws (a mix box, a code, its anchors) do not depend on how
        many ranks share the batch (2 processes draw what 1 process draws for the whole batch)."""
        base = int(torch.randint(2 ** 62, (), generator=self._step_rng))
        return [torch.Generator().manual_seed(base + rank() * n + i) for i in range(n)]

    def encode(self, x: torch.Tensor) -> list:
        """Encoder skips of the stock U-Net, bottleneck last (inside the step, see step_parts)."""
        return self.step_parts().encoder(x)

    def forward_features(self, x: torch.Tensor, encoder=(), decoder=(), with_output: bool = True):
        """(segmentation output, {'enc<i>' / 'dec<s>': feature map}) in one pass (nnunet_cl.features)."""
        if not encoder and not decoder:
            return (self.step_network(x) if with_output else None), {}
        return unet_features(self.step_parts(), x, encoder, decoder, with_output)

    # ---------------------------------------------------------------- set-up
    def initialize(self):
        if self.mmap_threshold_bytes:
            fix_mmap_threshold(self.mmap_threshold_bytes)
        end_children_with_parent()  # augmentation workers die with the trainer, even on SIGKILL
        exit_on_sigterm()  # and a SIGTERM ends it like Ctrl-C, so its workers are stopped
        if self.training_seed is not None and not self.was_initialized:
            seed_everything(self.training_seed)  # before the network and the heads are built
            self.print_to_log_file(f"{type(self).__name__}: training seed {self.training_seed} (initialisation, "
                                   f"batches and augmentation)")
        if not self.was_initialized:
            self._step_rng.manual_seed(int(torch.randint(2 ** 62, ())) if self.training_seed is None
                                       else self.training_seed)
        self.num_epochs = self.num_epochs_total
        self.check_settings()
        # nnU-Net would DDP-wrap self.network alone (CUDA only); the network and the extra modules are wrapped
        # together below, so nnU-Net builds the plain network here
        ddp, self.is_ddp = self.is_ddp, False
        try:
            super().initialize()
        finally:
            self.is_ddp = ddp
        self.train_modules = TrainModules(self.network, self.cl_modules)
        if ddp:
            self._set_batch_size_and_oversample()  # nnU-Net's split of the global batch over the ranks
            self.loss = self._build_loss()  # with nnU-Net's DDP settings
            if self.device.type == "cuda":
                self.train_modules = nn.SyncBatchNorm.convert_sync_batchnorm(self.train_modules)
            # find_unused_parameters: a stage leaves modules out (the decoder while pretraining the encoder)
            self.train_modules = DDP(self.train_modules, device_ids=[self.device.index] if self.device.type == "cuda"
                                     else None, find_unused_parameters=True)
            self.network = RankNetwork(self.network)

    def check_settings(self) -> None:
        """Hook: refuse bad attribute values at set-up with a message naming the fix (before any worker runs)."""
        if self.pretrain_epochs < 0 or self.finetune_epochs < 0:
            raise NnUNetCLError(f"pretrain_epochs={self.pretrain_epochs}, finetune_epochs={self.finetune_epochs}: "
                                f"stage lengths must be >= 0.")
        if self.pretrain_epochs > 0 and not self.has_pretraining:
            raise NnUNetCLError(f"{type(self).__name__} has no pretraining stage; set pretrain_epochs = 0.")
        if not self.pretrain_lr > 0:
            raise NnUNetCLError(f"pretrain_lr={self.pretrain_lr}: must be > 0. Fix: e.g. 1e-3 (the default).")
        if self.pretrain_batch_size is not None and not (isinstance(self.pretrain_batch_size, int)
                                                         and self.pretrain_batch_size >= 2):
            raise NnUNetCLError(f"pretrain_batch_size={self.pretrain_batch_size!r}: a whole number >= 2 (the heads' "
                                f"BatchNorm and the negatives need two samples), or None for the default.")
        folder = self.preprocessed_dataset_folder
        cases = [f for f in (os.listdir(folder) if os.path.isdir(folder) else [])
                 if f.endswith((".b2nd", ".npz", ".npy")) and not f.endswith(("_seg.b2nd", "_seg.npy"))]
        if not cases:  # nnU-Net would stop with a bare "more than one file ending" AssertionError
            name = self.plans_manager.dataset_name
            raise NnUNetCLError(f"No preprocessed case in {folder} (configuration {self.configuration_name} of "
                                f"{self.plans_manager.plans_name}). Fix: nnUNetv2_plan_and_preprocess -d {name} -c "
                                f"{self.configuration_name} (or nnUNetv2_preprocess -d {name} -plans_name "
                                f"{self.plans_manager.plans_name} -c {self.configuration_name}).")

    def configure_optimizers(self):
        return self._stage_optimizer(self.stage())

    def _stage_optimizer(self, stage: str):
        if self.cl_modules is None:
            self.cl_modules = self.build_cl_modules().to(self.device)
            self.extra_optimizers = self.build_extra_optimizers()
        self._optimizer_stage = stage
        optimizer = self.build_optimizer(stage)
        return optimizer, self.build_scheduler(optimizer, stage)

    def pretrain_batch_per_rank(self, global_batch: int) -> int:
        """Samples each rank takes of a pretraining batch of `global_batch`: the same on every rank (the losses
        gather equal shares), so a global batch that W does not divide is rounded up to a multiple of W."""
        w = dist.get_world_size() if self.is_ddp else 1
        return max(1, int(np.ceil(global_batch / w)))

    def get_dataloaders(self):
        if self.stage() == FINETUNE:
            if self.training_seed is None:
                return super().get_dataloaders()
            with seeded_augmenters(self.training_seed, self.current_epoch, self.local_rank,
                                   first=self._augmenters_built + 1) as seeded:
                loaders = super().get_dataloaders()
            self._augmenters_built += seeded.calls
            return loaders
        self._pool_loader = self.get_pretrain_dataloader()
        return self._pool_loader, None

    def get_pretrain_dataloader(self):
        """Hook: batches for `pretrain_losses`. Default: two nnU-Net-augmented views of pool crops."""
        members = self.pool_members(shard_by_rank=True)
        rotation, do_dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = self.get_training_transforms(
            self.configuration_manager.patch_size, rotation, None, mirror_axes, do_dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels, regions=None,
            ignore_label=self.label_manager.ignore_label)
        # pretrain_batch_size is the global batch of samples (two views each); by default half the plans' batch, so
        # that a step holds the images the plans sized it for. Every rank takes the same share (the gathers need it)
        batch_size = self.pretrain_batch_per_rank(self.pretrain_batch_size or
                                                  max(2, int(self.configuration_manager.batch_size) // 2))
        loader = TwoViewDataLoader(PoolDataset(members), batch_size, initial_patch_size,
                                   self.configuration_manager.patch_size, self.label_manager,
                                   oversample_foreground_percent=0.0, transforms=transforms)
        self.print_to_log_file(f"Pretraining pool: {len(members)} cases, {batch_size} samples x 2 views per step")
        return self.augmenter(loader)

    def pool_members(self, shard_by_rank: bool) -> list[tuple[str, str]]:
        """The pretraining pool of this configuration and fold (nnunet_cl.pool.list_pool), this rank's share of
        it with shard_by_rank. Refused when ingested unlabeled cases lack this configuration: pretraining would
        silently leave them out."""
        folder, data_identifier = self.preprocessed_dataset_folder_base, self.configuration_manager.data_identifier
        ingested = load_manifest(folder)
        present = {i for _, i in pool_identifiers(folder, data_identifier)}
        missing = [c for c in ingested if c not in present]
        if missing:
            name, plans = self.plans_manager.dataset_name, self.plans_manager.plans_name
            raise NnUNetCLError(
                f"{len(missing)} of the {len(ingested)} unlabeled pool cases of {name} are not preprocessed for "
                f"configuration {self.configuration_name} of plans {plans} (folder {data_identifier}), so "
                f"pretraining would leave them out. Fix: nnUNetv2_cl_add_unlabeled -d {name} -i FOLDER -p {plans} "
                f"-c {self.configuration_name} with the folder you added them from (cases already there are kept).")
        members = list_pool(folder, data_identifier, self.fold)
        if self.local_rank == 0:  # what the pretraining read, for the benchmark and for the user
            os.makedirs(self.output_folder, exist_ok=True)
            save_json_atomic({"cases": len(members), "ingested": len(ingested), "members": [i for _, i in members]},
                             join(self.output_folder, POOL_RECORD))
        return shard(members) if shard_by_rank else members

    def augmenter(self, loader):
        """The loader in nnU-Net's background augmenter, with nnU-Net's worker count (nnUNet_n_proc_DA)."""
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:  # in this process: seeded with the run (initialize)
            return SingleThreadedAugmenter(loader, None)
        self._augmenters_built += 1
        seeds = None if self.training_seed is None else [
            augmenter_seed(self.training_seed, self._augmenters_built, i, self.current_epoch, self.local_rank)
            for i in range(n_proc)]
        return NonDetMultiThreadedAugmenter(loader, None, n_proc, max(6, n_proc // 2), seeds,
                                            pin_memory=self.device.type == "cuda", wait_time=0.002)

    def _stop_pool_loader(self):
        if hasattr(self._pool_loader, "_finish"):  # nnU-Net's multi-process augmenters
            self._pool_loader._finish()
        self._pool_loader = None

    # ---------------------------------------------------------------- epoch loop
    def on_train_epoch_start(self):
        stage = self.stage()
        if stage != self._optimizer_stage:  # crossing from pretraining into fine-tuning
            self.print_to_log_file(f"Stage switch at epoch {self.current_epoch}: supervised fine-tuning "
                                   f"({self.finetune_epochs} epochs) on the labeled split")
            self.optimizer, self.lr_scheduler = self.configure_optimizers()
            if self._pool_loader is not None:  # (after --c the fine-tuning loaders may already exist)
                self._stop_pool_loader()
                self.dataloader_train, self.dataloader_val = self.get_dataloaders()
        if stage == PRETRAIN:
            self.num_iterations_per_epoch = self.pretrain_iterations_per_epoch
            self.num_val_iterations_per_epoch = 0
            stage_epoch = self.current_epoch
        else:
            self.num_iterations_per_epoch = self.finetune_iterations_per_epoch
            self.num_val_iterations_per_epoch = self.finetune_val_iterations_per_epoch
            stage_epoch = self.current_epoch - self.pretrain_epochs
        self.network.train()
        self.cl_modules.train()
        self.lr_scheduler.step(stage_epoch)
        self.print_to_log_file("")
        self.print_to_log_file(f"Epoch {self.current_epoch} ({stage} epoch {stage_epoch})")
        self._progress.every_s = self.progress_every_s
        self._progress.start(self.num_iterations_per_epoch, f"epoch {self.current_epoch}")
        self.print_to_log_file(f"Current learning rate: {np.round(self.optimizer.param_groups[0]['lr'], decimals=5)}")
        self.logger.log("lrs", self.optimizer.param_groups[0]["lr"], self.current_epoch)

    def _backward_and_step(self, loss: torch.Tensor):
        # the gradients are DDP's averages already: every parameter is inside the wrapped train_modules
        scaler = self.grad_scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()
        # an extra optimiser steps when its modules took part in this step
        optimizers = [self.optimizer] + [o for o in (self.extra_optimizers or {}).values()
                                         if any(p.grad is not None for g in o.param_groups for p in g["params"])]
        if scaler is not None:
            for opt in optimizers:
                scaler.unscale_(opt)
        # nnU-Net's clipping at 12, per optimiser: an extra module's gradient never shrinks the network's step
        for opt in optimizers:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 12)
        for opt in optimizers:
            scaler.step(opt) if scaler is not None else opt.step()
        if scaler is not None:
            scaler.update()

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def step_losses(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """(loss to back-propagate, the method's named terms) of one prepared batch; runs inside the wrapped
        forward of train_modules."""
        self._in_step = True
        try:
            return self._step_losses(batch)
        finally:
            self._in_step = False

    def _step_losses(self, batch: dict) -> tuple[torch.Tensor, dict]:
        if self.stage() == PRETRAIN:
            terms = self.pretrain_losses(batch)
            return sum(terms.values()), terms
        request = self.feature_request if self.has_auxiliary_loss else {}
        data, target = self.step_inputs(batch)
        output, features = self.forward_features(data, request.get("encoder", ()), request.get("decoder", ()))
        seg_loss = self.loss(output, target)
        terms = self.auxiliary_losses(batch, output, features) if self.has_auxiliary_loss else {}
        return seg_loss + sum(terms.values()), terms

    def train_step(self, batch: dict) -> dict:
        batch = self.prepare_batch(batch)
        for opt in [self.optimizer, *(self.extra_optimizers or {}).values()]:
            opt.zero_grad(set_to_none=True)
        with self._autocast():
            loss, terms = self.train_modules(self.step_losses, batch)  # one forward through the wrapped module
        self._backward_and_step(loss)
        self.on_after_step(batch, terms)
        line = self._progress.step()
        if line:
            self.print_to_log_file(line)
        out = {"loss": loss.detach().cpu().numpy()}
        out.update({f"cl_{k}": v.detach().float().cpu().numpy() for k, v in terms.items()})
        if terms:
            out["cl_total"] = float(sum(v.detach().float() for v in terms.values()))
        return out

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        outputs = collate_outputs(train_outputs)
        for key in ["cl_total"] + [f"cl_{t}" for t in self.loss_terms]:
            self._log_term(key, float(np.mean(outputs[key])) if key in outputs else math.nan)

    def _log_term(self, key: str, value: float):
        if self.is_ddp:
            values = [None] * dist.get_world_size()
            dist.all_gather_object(values, value)
            value = float(np.nanmean(values)) if not all(math.isnan(v) for v in values) else math.nan
        self.logger.log(key, value, self.current_epoch)

    def on_validation_epoch_end(self, val_outputs):
        if self.stage() == PRETRAIN:
            # no supervised validation while pretraining: placeholders keep nnU-Net's one-value-per-epoch lists
            for key in _VAL_KEYS:
                self.logger.local_logger.log(key, math.nan, self.current_epoch)
            n = len(self.label_manager.foreground_regions if self.label_manager.has_regions
                    else self.label_manager.foreground_labels)
            self.logger.local_logger.log("dice_per_class_or_region", [math.nan] * n, self.current_epoch)
            return
        super().on_validation_epoch_end(val_outputs)
        ema = self.logger.local_logger.my_fantastic_logging["ema_fg_dice"]
        if math.isnan(ema[self.current_epoch]):  # first fine-tuning epoch: restart the moving average
            ema[self.current_epoch] = self.logger.get_value("mean_fg_dice", step=self.current_epoch)

    def on_epoch_end(self):
        terms = {k: self.logger.get_value(f"cl_{k}", step=-1) for k in ("total",) + tuple(self.loss_terms)}
        if not all(math.isnan(v) for v in terms.values()):
            # only the terms this stage has, as plain numbers
            self.print_to_log_file("contrastive", {k: round(float(v), 4) for k, v in terms.items() if not math.isnan(v)})
        if self.stage() == FINETUNE:
            super().on_epoch_end()
        else:
            self.logger.log("epoch_end_timestamps", time.time(), self.current_epoch)
            self.print_to_log_file("train_loss", np.round(self.logger.get_value("train_losses", step=-1), 4))
            seconds = (self.logger.get_value("epoch_end_timestamps", step=-1)
                       - self.logger.get_value("epoch_start_timestamps", step=-1))
            self.print_to_log_file(f"Epoch time: {np.round(seconds, 2)} s")
            if self.current_epoch == self.pretrain_epochs - 1 and self.finetune_epochs > 0:
                # staged runs keep the end of pretraining: a checkpoint -pretrained_weights can take
                self.save_checkpoint(join(self.output_folder, "checkpoint_pretrained.pth"))
                self.save_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))
            elif (self.current_epoch + 1) % self.save_every == 0 and self.current_epoch != self.num_epochs - 1:
                self.save_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))
            if self.local_rank == 0:
                self.logger.plot_progress_png(self.output_folder)
            self.current_epoch += 1
        if self.local_rank == 0:
            plot_loss_terms(self.logger.local_logger.my_fantastic_logging,
                            ["cl_total"] + [f"cl_{t}" for t in self.loss_terms],
                            join(self.output_folder, "progress.png"))

    def on_train_end(self):
        super().on_train_end()  # removes checkpoint_latest.pth, so its predecessor goes too
        previous = previous_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))
        if self.local_rank == 0 and isfile(previous):
            os.remove(previous)
        self._stop_pool_loader()

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = {
            "network_weights": self.unwrapped_network.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            # ours; ignored by nnU-Net's predictor and by load_pretrained_weights
            "nnunet_cl": {"cl_modules": self.cl_modules.state_dict(), "extra": self.cl_extra_state(),
                          "extra_optimizers": {k: o.state_dict() for k, o in (self.extra_optimizers or {}).items()},
                          "optimizer_stage": self._optimizer_stage, "step_rng": self._step_rng.get_state()},
        }
        tmp = filename + ".tmp"
        torch.save(checkpoint, tmp)
        if basename(filename) == "checkpoint_latest.pth" and isfile(filename):
            keep_previous(filename)  # --c falls back to it if latest breaks
        os.replace(tmp, filename)  # a crash mid-write never leaves a broken checkpoint behind

    def read_checkpoint(self, filename: str) -> dict:
        """The checkpoint in `filename` (weights only, nnunet_cl.safe_load); a broken file falls back, with a
        message, to the one saved before it (checkpoint_latest.previous.pth)."""
        try:
            return load_checkpoint_file(filename, map_location=self.device)
        except CorruptCheckpointError as e:
            previous = previous_checkpoint(filename)
            if not isfile(previous):
                raise NnUNetCLError(f"{e} No earlier checkpoint to fall back to. Fix: delete {filename} to resume "
                                    f"from checkpoint_best.pth, or restart without --c.") from None
            self.print_to_log_file(f"WARNING: {e} Resuming from the checkpoint saved before it, {previous}.")
            return load_checkpoint_file(previous, map_location=self.device)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = self.read_checkpoint(checkpoint)
        # build the optimiser of the stage the checkpoint was written in before loading its state
        state = checkpoint.get("nnunet_cl")
        saved_stage = state["optimizer_stage"] if state else self.stage(checkpoint["current_epoch"])
        if self._optimizer_stage != saved_stage:
            self.optimizer, self.lr_scheduler = self._stage_optimizer(saved_stage)
        self.current_epoch = checkpoint["current_epoch"]
        if state is not None:
            self.cl_modules.load_state_dict(state["cl_modules"])
            for name, opt_state in state.get("extra_optimizers", {}).items():
                self.extra_optimizers[name].load_state_dict(opt_state)
            self.load_cl_extra_state(state["extra"])
            rng = state.get("step_rng", state["extra"].get("rng"))  # ("rng": DCL-Seg's checkpoints before the base had it)
            if rng is not None:
                self._step_rng.set_state(rng.cpu())  # (a checkpoint read with map_location cuda)
        self.my_init_kwargs = checkpoint["init_args"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        self.unwrapped_network.load_state_dict(checkpoint["network_weights"])
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint["grad_scaler_state"] is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
        if self.training_seed is not None:  # a resumed run draws a stream of its own, as its augmenters do
            seed_everything(augmenter_seed(self.training_seed, 0, 0, self.current_epoch, self.local_rank))

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.finetune_epochs == 0:
            # a pretraining plans variant (nnUNetv2_cl_pretrain_plans) fine-tunes on the configuration it inherits
            raw = self.plans_manager.plans["configurations"].get(self.configuration_name, {})
            config = raw.get("inherits_from", self.configuration_name) if "patch_size" in raw else \
                self.configuration_name
            self.print_to_log_file(
                "Pretraining only: no segmentation head was trained, so no validation. Fine-tune with: nnUNetv2_train "
                f"{self.plans_manager.dataset_name} {config} FOLD -p {self.plans_manager.plans_name} "
                f"-pretrained_weights {join(self.output_folder, 'checkpoint_final.pth')}")
            return
        super().perform_actual_validation(save_probabilities)


def keep_previous(filename: str) -> None:
    """Make `filename`'s current content its previous checkpoint, while `filename` itself stays in place (so a
    kill at any moment leaves a checkpoint_latest.pth for nnU-Net's --c): a hard link, or a copy where the file
    system has none, renamed into place."""
    import shutil
    staged = previous_checkpoint(filename) + ".tmp"
    if os.path.exists(staged):
        os.remove(staged)
    try:
        os.link(filename, staged)
    except OSError:
        shutil.copy2(filename, staged)
    os.replace(staged, previous_checkpoint(filename))


def previous_checkpoint(filename: str) -> str:
    """checkpoint_latest.pth -> checkpoint_latest.previous.pth: the checkpoint kept before the latest one."""
    root, ext = os.path.splitext(filename)
    return root + PREVIOUS_SUFFIX + ext


def attribute_variant(base: type, name: str, module: str, doc: str | None = None, **attrs) -> type:
    """A subclass `name` of `base` that only sets attributes after base.__init__ (nnU-Net's variant style).

    `module` is the module whose namespace receives the class, so nnU-Net's lookup and pickling find it. An
    attribute the base does not have is refused: a renamed hyperparameter would otherwise change nothing.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        for key, value in attrs.items():
            if not hasattr(self, key):
                raise AttributeError(f"{base.__name__} has no attribute {key!r}; variant {name} is out of date")
            setattr(self, key, value)

    doc = doc or f"{base.__name__} with " + ", ".join(f"{k}={v!r}" for k, v in attrs.items()) + "."
    return type(name, (base,), {"__init__": __init__, "__module__": module, "__qualname__": name, "__doc__": doc})
