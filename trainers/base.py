"""The staged contrastive trainer every nnunet-cl method builds on.

One `nnUNetv2_train` call runs `pretrain_epochs` of self-supervised pretraining on the unlabeled pool, then
`finetune_epochs` of plain nnU-Net supervised training on the labeled split. `self.network` stays the stock
nnU-Net U-Net; projection heads, teachers and queues live in `self.cl_modules` beside it and are saved under
the checkpoint key 'nnunet_cl', which nnU-Net's predictor and `-pretrained_weights` ignore.

A method plugs in through these hooks (see docs/architecture.md):
  - build_cl_modules()            -> nn.ModuleDict of heads/teachers (outside self.network)
  - get_pretrain_dataloader()     -> iterator of pretraining batches (default: two views of pool crops)
  - pretrain_losses(batch)        -> {term: scalar} on one such batch (pretraining methods)
  - auxiliary_losses(data, output, target) -> {term: scalar} added to nnU-Net's loss (auxiliary-loss methods)
  - cl_extra_state() / load_cl_extra_state(state) for queues or anything not in cl_modules
"""
import math
import os
import time
from os.path import join
from typing import Dict

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

from nnunet_cl.memory import fix_mmap_threshold
from nnunet_cl.plotting import plot_loss_terms
from nnunet_cl.pool import list_pool
from nnunet_cl_trainers.pool_data import PoolDataset, TwoViewDataLoader
from nnunet_cl_trainers.seeding import augmenter_seed, seed_everything, seeded_augmenters

PRETRAIN, FINETUNE = "pretrain", "finetune"
# per-epoch keys nnU-Net's logger fills only while it validates; pretraining epochs get NaN there
_VAL_KEYS = ("val_losses", "mean_fg_dice", "ema_fg_dice")


class nnUNetTrainerCLBase(nnUNetTrainer):
    """Shared machinery; a method subclass sets `loss_terms` and implements its hooks."""

    loss_terms: tuple = ()  # names of the method's loss terms, logged per epoch as 'cl_<term>'

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # stage lengths; thin variants change these (nnUNetTrainerSimCLR_50pt_250ft ...)
        self.pretrain_epochs = 100
        self.finetune_epochs = 1000
        self.pretrain_iterations_per_epoch = 250
        self.finetune_iterations_per_epoch = self.num_iterations_per_epoch
        self.finetune_val_iterations_per_epoch = self.num_val_iterations_per_epoch
        self.pretrain_batch_size = None  # samples per pretraining step (two views each); None: plans' batch size
        # pretraining optimiser: AdamW with nnU-Net's poly decay over the pretraining stage
        self.pretrain_lr = 1e-3
        self.pretrain_weight_decay = 1e-5
        # glibc keeps freed multi-MiB blocks of the blockwise losses; a fixed threshold returns them (None: off)
        self.mmap_threshold_bytes = 131072
        # None: unseeded, as nnU-Net. An int seeds the initialisation, the patches and their augmentation: the run
        # repeats bit for bit on CPU with nnUNet_n_proc_DA 0 or 1 (trainers/seeding.py)
        self.training_seed = None
        self._augmenters_built = 0  # each augmenter of a run draws from a stream of its own
        self.cl_modules: nn.ModuleDict | None = None
        self._optimizer_stage = None
        self._pool_loader = None
        for term in ("total",) + tuple(self.loss_terms):
            self.logger.local_logger.my_fantastic_logging.setdefault(f"cl_{term}", [])

    # ---------------------------------------------------------------- hooks
    def build_cl_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict()

    def pretrain_losses(self, batch: dict) -> Dict[str, torch.Tensor]:
        raise NotImplementedError(f"{self.__class__.__name__} has no pretraining loss")

    def auxiliary_losses(self, data, output, target) -> Dict[str, torch.Tensor]:
        return {}

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

    def encode(self, x: torch.Tensor) -> list:
        """Encoder skips of the stock U-Net, bottleneck last."""
        return self.unwrapped_network.encoder(x)

    # ---------------------------------------------------------------- set-up
    def initialize(self):
        if self.mmap_threshold_bytes:
            fix_mmap_threshold(self.mmap_threshold_bytes)
        if self.training_seed is not None and not self.was_initialized:
            seed_everything(self.training_seed)  # before the network and the heads are built
            self.print_to_log_file(f"{type(self).__name__}: training seed {self.training_seed} (initialisation, "
                                   f"batches and augmentation)")
        self.num_epochs = self.num_epochs_total
        super().initialize()

    def configure_optimizers(self):
        return self._make_optimizer(self.stage())

    def _make_optimizer(self, stage: str):
        if self.cl_modules is None:
            self.cl_modules = self.build_cl_modules().to(self.device)
        self._optimizer_stage = stage
        if stage == FINETUNE:  # exactly nnU-Net's optimiser, plus the heads of auxiliary-loss methods
            params = list(self.network.parameters())
            if self.finetune_needs_cl_modules:
                params += list(self.cl_modules.parameters())
            optimizer = torch.optim.SGD(params, self.initial_lr, weight_decay=self.weight_decay,
                                        momentum=0.99, nesterov=True)
            return optimizer, PolyLRScheduler(optimizer, self.initial_lr, max(self.finetune_epochs, 1))
        params = list(self.network.parameters()) + list(self.cl_modules.parameters())
        optimizer = torch.optim.AdamW(params, lr=self.pretrain_lr, weight_decay=self.pretrain_weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.pretrain_lr, max(self.pretrain_epochs, 1))

    @property
    def finetune_needs_cl_modules(self) -> bool:
        """Auxiliary-loss methods train their heads during supervised training too."""
        return type(self).auxiliary_losses is not nnUNetTrainerCLBase.auxiliary_losses

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
        members = list_pool(self.preprocessed_dataset_folder_base, self.configuration_manager.data_identifier,
                            self.fold)
        rotation, do_dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = self.get_training_transforms(
            self.configuration_manager.patch_size, rotation, None, mirror_axes, do_dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels, regions=None,
            ignore_label=self.label_manager.ignore_label)
        batch_size = self.pretrain_batch_size or self.batch_size
        loader = TwoViewDataLoader(PoolDataset(members), batch_size, initial_patch_size,
                                   self.configuration_manager.patch_size, self.label_manager,
                                   oversample_foreground_percent=0.0, transforms=transforms)
        self.print_to_log_file(f"Pretraining pool: {len(members)} cases, {batch_size} samples x 2 views per step")
        return self.augmenter(loader)

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
        self.print_to_log_file(f"Current learning rate: {np.round(self.optimizer.param_groups[0]['lr'], decimals=5)}")
        self.logger.log("lrs", self.optimizer.param_groups[0]["lr"], self.current_epoch)

    def _backward_and_step(self, loss: torch.Tensor):
        params = list(self.network.parameters()) + list(self.cl_modules.parameters())
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            self._sync_cl_module_grads()
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            self._sync_cl_module_grads()
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.optimizer.step()

    def _sync_cl_module_grads(self):
        # heads are not inside nnU-Net's DDP wrapper, so average their gradients by hand
        if self.is_ddp:
            for p in self.cl_modules.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def train_step(self, batch: dict) -> dict:
        if self.stage() == FINETUNE and not self.finetune_needs_cl_modules:
            return super().train_step(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            if self.stage() == PRETRAIN:
                batch = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
                         for k, v in batch.items()}
                terms = self.pretrain_losses(batch)
                loss = sum(terms.values())
            else:
                data = batch["data"].to(self.device, non_blocking=True)
                target = batch["target"]
                target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
                    else target.to(self.device, non_blocking=True)
                output = self.network(data)
                seg_loss = self.loss(output, target)
                terms = self.auxiliary_losses(data, output, target)
                loss = seg_loss + sum(terms.values())
        self._backward_and_step(loss)
        out = {"loss": loss.detach().cpu().numpy()}
        out.update({f"cl_{k}": v.detach().float().cpu().numpy() for k, v in terms.items()})
        out["cl_total"] = float(sum(v.detach().float() for v in terms.values())) if terms else math.nan
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
            self.print_to_log_file("contrastive", {k: np.round(v, 4) for k, v in terms.items()})
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
        super().on_train_end()
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
                          "optimizer_stage": self._optimizer_stage},
        }
        tmp = filename + ".tmp"
        torch.save(checkpoint, tmp)
        os.replace(tmp, filename)  # a crash mid-write never leaves a broken checkpoint behind

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = torch.load(checkpoint, map_location=self.device, weights_only=False)
        # build the optimiser of the stage the checkpoint was written in before loading its state
        state = checkpoint.get("nnunet_cl")
        saved_stage = state["optimizer_stage"] if state else self.stage(checkpoint["current_epoch"])
        if self._optimizer_stage != saved_stage:
            self.optimizer, self.lr_scheduler = self._make_optimizer(saved_stage)
        self.current_epoch = checkpoint["current_epoch"]
        if state is not None:
            self.cl_modules.load_state_dict(state["cl_modules"])
            self.load_cl_extra_state(state["extra"])
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
            self.print_to_log_file("Pretraining only: no segmentation head was trained, so no validation. "
                                   "Fine-tune with: nnUNetv2_train DATASET CONFIG FOLD -pretrained_weights "
                                   f"{join(self.output_folder, 'checkpoint_final.pth')}")
            return
        super().perform_actual_validation(save_probabilities)


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
