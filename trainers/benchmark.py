"""Schedules of `nnUNetv2_cl_benchmark` (docs/benchmarks.md): one supervised schedule shared by every arm, and
one pretraining schedule per contrastive method, in three sizes: `clBench` (the full table), `clBenchQuick`
and `clBenchCT` (OpenKBP-sized CT).

- `nnUNetTrainer_clBench` is plain nnU-Net with fewer epochs and iterations. Every arm fine-tunes with it:
  scratch without weights, each contrastive arm with `-pretrained_weights` of its pretraining run, the
  ceiling on all non-validation labels. Plans, network, iterations and augmentation are therefore identical;
  only the initialisation differs.
- `nnUNetTrainer<Method>Pretrain_clBench` pretrains on the pool only (`finetune_epochs = 0`); its
  `checkpoint_final.pth` is what the fine-tuning runs load. Every method gets the same number of steps.

"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.loss.nnUNetTrainerDiceLoss import nnUNetTrainerDiceCELoss_noSmooth
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnunet_cl.bench.design import LONG_PRETRAIN, METHODS
from nnunet_cl_trainers.base import attribute_variant
from nnunet_cl_trainers.finetune import FinetuneRecipe
from nnunet_cl_trainers.seeding import seed_everything, seeded_augmenters

# Sized for a 2-core CPU on MSD Hippocampus with the benchmark's plans variant (patch 40x56x40, batch 2, features
# 16-128); the arithmetic is in docs/benchmarks.md. Per schedule:
#   finetune: (epochs, iterations per epoch, validation iterations per epoch)
#   pretrain_iterations: iterations per pretraining epoch, every method
#   pretrain: {pretraining trainer: attributes}, from the arms table (nnunet_cl.bench.design.METHODS)
SCHEDULES = {
    # 1000 steps: with 250 (the first version) scratch nnU-Net still predicted only background at k = 5 and 10
    "clBench": {"finetune": (40, 25, 3), "pretrain_iterations": 25},
    "clBenchQuick": {"finetune": (16, 25, 2), "pretrain_iterations": 10},  # 400 steps
    # OpenKBP-sized CT (docs/benchmarks.md "OpenKBP"): 2x spacing, patch 32x48x32, the 4-stage network nnU-Net
    # plans for it (--spacing_factor 2 --patch 32 48 32 --plan_network); 4000 steps (with the noSmooth loss
    # below, scratch at k = 5 leaves background only near the end of them)
    "clBenchCT": {"finetune": (160, 25, 2), "pretrain_iterations": 25},
}
for _name, _schedule in SCHEDULES.items():  # {pretraining trainer: attributes}, from the arms table
    _schedule["pretrain"] = {trainer: stages[_name] for trainer, stages in METHODS.values()}


# Every pretraining of the benchmark starts from this seed (fine-tuning runs: their fold). Pretrainings are shared
# by all (k, seed) of a table, so one seed is enough.
PRETRAIN_SEED = 0


class nnUNetTrainer_clBench(nnUNetTrainer):
    """nnU-Net with the benchmark's supervised schedule; every arm fine-tunes with exactly this class.

    Training is nnUNetTrainer's, with fewer epochs and iterations, and two changes:
    - it is seeded (`training_seed`, default: the fold). The benchmark gives every arm the same fold for the same
      (k, seed), so all arms start from the same random segmentation layers, see the same patches in the same
      order with the same augmentation, and differ only in the weights `-pretrained_weights` transfers: encoder and
      decoder (the decoder is the pretraining run's own random initialisation for the methods that train only the
      encoder; SuperCL's decoder tap trains the decoder's deeper stages too) (paired runs: less noise between
      arms). With
      nnUNet_n_proc_DA = 1 (the benchmark's default) or 0 the run is repeatable on CPU; with more workers nnU-Net
      takes batches in whichever order the workers deliver them. A run resumed with --c continues on a stream
      of its own (`augmenter_seed`): it is paired with another run only up to the epoch where it resumed;
    - no final validation (nnU-Net predicting every validation case with test-time mirroring after training).
      The benchmark scores the held-out test set itself, and on a 2-core CPU that validation costs minutes per
      run; it never changes the model. `final_validation = True` brings it back.
    """

    schedule = "clBench"
    final_validation = False
    training_seed = None  # None: the fold

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = \
            SCHEDULES[self.schedule]["finetune"]
        self.save_every = 1  # checkpoint_latest after every epoch: an interrupted benchmark resumes with --c

    @property
    def seed(self) -> int:
        if self.training_seed is not None:
            return int(self.training_seed)
        return int(self.fold) if str(self.fold).isdigit() else 0  # fold 'all': seed 0

    def initialize(self):
        if not self.was_initialized:  # the network's random initialisation (decoder, and encoder without weights)
            seed_everything(self.seed)
            self.print_to_log_file(f"{type(self).__name__}: training seed {self.seed} (network initialisation and "
                                   f"data augmentation), the same for every arm of this fold")
        super().initialize()

    def get_dataloaders(self):
        if get_allowed_n_proc_DA() == 0:  # augmentation in this process: seed its RNGs again, past the init
            seed_everything(self.seed)
            return super().get_dataloaders()
        with seeded_augmenters(self.seed, self.current_epoch, self.local_rank) as seeded:
            loaders = super().get_dataloaders()
        if seeded.calls != 2:  # nnU-Net built its augmenters some other way: say so rather than pretend
            self.print_to_log_file(f"WARNING: {seeded.calls} of nnU-Net's 2 data-augmentation pipelines were seeded; "
                                   f"this run is not paired with the other arms")
        return loaders

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.final_validation:
            return super().perform_actual_validation(save_probabilities)
        self.print_to_log_file("No final validation (nnUNetTrainer_clBench): the benchmark predicts and scores the "
                               "held-out test set with nnUNetv2_predict and nnUNetv2_evaluate_folder.")


class nnUNetTrainer_clBenchQuick(nnUNetTrainer_clBench):
    """The fine-tuning schedule of `nnUNetv2_cl_benchmark --quick`."""

    schedule = "clBenchQuick"


class nnUNetTrainer_clBenchFT(FinetuneRecipe, nnUNetTrainer_clBench):
    """`clBench`'s 1000 steps with the fine-tuning recipe of trainers/finetune.py for every arm alike: peak
    learning rate 1e-3 after a linear warm-up over 2 of the 40 epochs, then poly decay. Its arms reuse the
    `clBench` pretrainings: `--schedule clBenchFT --pretrain_schedule clBench`."""


class nnUNetTrainer_clBenchCT(nnUNetTrainer_clBench, nnUNetTrainerDiceCELoss_noSmooth):
    """The fine-tuning schedule of `nnUNetv2_cl_benchmark --schedule clBenchCT` (OpenKBP-sized CT).

    Its loss is nnU-Net's own Dice + CE without smoothing (`nnUNetTrainerDiceCELoss_noSmooth`). With the
    default smooth of 1e-5, per-sample Dice and small patches that hold 1-3 of 7 organs, every absent class
    scores Dice ~1 once its predicted volume is ~0, so the network learned to predict no organ anywhere
    (docs/benchmarks.md "OpenKBP"). Without smoothing an absent class scores 0 whatever is predicted.
    """

    schedule = "clBenchCT"


def pretrain_schedule(base: type, attrs: dict, suffix: str = "clBench", iterations: int | None = None,
                      module: str = __name__, prefix: str | None = None) -> type:
    """Subclass `<prefix>_<suffix>` of a pretraining-only trainer that only sets its stage lengths (`attrs`) and
    seeds it (`PRETRAIN_SEED`), so a table rerun from an empty folder repeats its pretrainings bit for bit.

    iterations: per pretraining epoch (default: the schedule's). `module` must be the module whose namespace
    receives the class (for pickling by nnU-Net's workers). prefix: default the base's name.
    """
    if iterations is None:
        iterations = SCHEDULES[suffix]["pretrain_iterations"]
    prefix = prefix or base.__name__

    text = ", ".join(f"{k}={v}" for k, v in attrs.items())
    doc = (f"{base.__name__} on the pool only ({text}; {iterations} iterations per epoch): its "
           f"checkpoint_final.pth goes to nnUNetTrainer_{suffix} -pretrained_weights.")
    # save_every 1: checkpoint_latest after every epoch, so an interrupted benchmark resumes with --c
    return attribute_variant(base, f"{prefix}_{suffix}", module, doc, **attrs,
                             pretrain_iterations_per_epoch=iterations, finetune_epochs=0, save_every=1,
                             training_seed=PRETRAIN_SEED)


def scale_epochs(attrs: dict, factor: int) -> dict:
    """The stage lengths (`*_epochs`) times factor; everything else (k, batch size) as it is."""
    return {k: v * factor if k.endswith("_epochs") else v for k, v in attrs.items()}


# The '<Method>Pretrain5x' arms (LONG_PRETRAIN, set in nnunet_cl.bench.design, which names the arms): the same
# method and fine-tuning with 5 times the pretraining steps, to measure whether the short pretraining of the
# schedules is what limits the gain (docs/benchmarks.md).


def _define(base: type) -> None:
    for suffix, schedule in SCHEDULES.items():
        attrs = schedule["pretrain"][base.__name__]
        for prefix, factor in ((base.__name__, 1), (f"{base.__name__}{LONG_PRETRAIN}x", LONG_PRETRAIN)):
            cls = pretrain_schedule(base, scale_epochs(attrs, factor), suffix, prefix=prefix)
            globals()[cls.__name__] = cls


import nnunet_cl_trainers as _package  # noqa: E402  (every method's trainers are imported before this module)

for _trainer, _ in METHODS.values():
    _define(getattr(_package, _trainer))


def _supervised_schedule(base: type, suffix: str, **extra) -> type:
    """An auxiliary-loss method on a benchmark schedule's supervised budget (the same epochs and iterations as
    nnUNetTrainer_<suffix>), seeded; its benchmark compares the two (docs/benchmarks.md "Robustness", "PCLMix")."""
    epochs, iterations, val_iterations = SCHEDULES[suffix]["finetune"]
    name = f"{base.__name__}_{suffix}"
    return attribute_variant(base, name, __name__, f"{base.__name__} with the supervised budget of "
                             f"nnUNetTrainer_{suffix} ({epochs} x {iterations} steps).", finetune_epochs=epochs,
                             finetune_iterations_per_epoch=iterations, finetune_val_iterations_per_epoch=val_iterations,
                             save_every=1, training_seed=0, **extra)


nnUNetTrainerDCLSeg_clBench = _supervised_schedule(_package.nnUNetTrainerDCLSeg, "clBench")
nnUNetTrainerDCLSeg_clBenchQuick = _supervised_schedule(_package.nnUNetTrainerDCLSeg, "clBenchQuick")
# PCLMix's contrast starts after 1/60 of the steps, as the authors' 1000 of 60k iterations
nnUNetTrainerPCLMix_clBench = _supervised_schedule(_package.nnUNetTrainerPCLMix, "clBench",
                                                   contrast_start_iteration=40 * 25 // 60)
nnUNetTrainerPCLMix_clBenchQuick = _supervised_schedule(_package.nnUNetTrainerPCLMix, "clBenchQuick",
                                                        contrast_start_iteration=16 * 25 // 60)


# only the classes defined here: re-exporting nnUNetTrainer itself would confuse nnU-Net's name checks
__all__ = sorted(n for n, o in list(globals().items())
                 if n.startswith("nnUNetTrainer") and getattr(o, "__module__", None) == __name__)
