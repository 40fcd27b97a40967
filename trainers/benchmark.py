"""Schedules of `nnUNetv2_cl_benchmark` (docs/benchmarks.md): one supervised schedule shared by every arm, and
one pretraining schedule per contrastive method.

- `nnUNetTrainer_clBench` is plain nnU-Net with fewer epochs and iterations. Every arm fine-tunes with it:
  scratch without weights, each contrastive arm with `-pretrained_weights` of its pretraining run, the
  ceiling on all non-validation labels. Plans, network, iterations and augmentation are therefore identical;
  only the initialisation differs.
- `nnUNetTrainer<Method>Pretrain_clBench` pretrains on the pool only (`finetune_epochs = 0`); its
  `checkpoint_final.pth` is what the fine-tuning runs load.

Methods written in other modules (SepaReg, PolyCL) get their schedule class only when their module imports and
has the class: nnU-Net imports every trainer module when it looks one up, so a missing or broken method must
never break this module. Why a class is missing is kept in `UNAVAILABLE` (the benchmark reports it).
"""
import importlib

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_cl_trainers.simclr import nnUNetTrainerSimCLRPretrain

# Sized for a 2-core CPU on MSD Hippocampus (patch 40x56x40, batch 7); the arithmetic is in docs/benchmarks.md.
FINETUNE_EPOCHS = 20
FINETUNE_ITERATIONS = 25
FINETUNE_VAL_ITERATIONS = 4
PRETRAIN_EPOCHS = 20
PRETRAIN_ITERATIONS = 25

# Pretraining schedule per method: the same number of steps (PRETRAIN_EPOCHS x PRETRAIN_ITERATIONS) for each;
# SepaReg splits its epochs into phases (region + k experts + distillation, the paper's 50:40:40 ratio).
PRETRAIN_SCHEDULES = {
    "nnUNetTrainerSimCLRPretrain": {"pretrain_epochs": PRETRAIN_EPOCHS},
    "nnUNetTrainerSepaRegPretrain": {"region_epochs": 8, "k": 4, "expert_epochs": 2, "distill_epochs": 4},
    "nnUNetTrainerPolyCLPretrain": {"pretrain_epochs": PRETRAIN_EPOCHS},
}


class nnUNetTrainer_clBench(nnUNetTrainer):
    """nnU-Net with the benchmark's supervised schedule; every arm fine-tunes with exactly this class."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = FINETUNE_EPOCHS
        self.num_iterations_per_epoch = FINETUNE_ITERATIONS
        self.num_val_iterations_per_epoch = FINETUNE_VAL_ITERATIONS


def pretrain_schedule(base: type, attrs: dict, suffix: str = "clBench", iterations: int = PRETRAIN_ITERATIONS,
                      module: str = __name__) -> type:
    """Subclass `<base>_<suffix>` of a pretraining-only trainer that only sets its stage lengths (`attrs`).

    `module` must be the module whose namespace receives the class (for pickling by nnU-Net's workers).
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        for key, value in attrs.items():
            if not hasattr(self, key):  # a renamed attribute would silently change nothing
                raise AttributeError(f"{base.__name__} has no attribute {key!r} (benchmark schedule out of date)")
            setattr(self, key, value)
        self.pretrain_iterations_per_epoch = iterations
        self.finetune_epochs = 0

    text = ", ".join(f"{k}={v}" for k, v in attrs.items())
    return type(f"{base.__name__}_{suffix}", (base,),
                {"__init__": __init__, "__module__": module,
                 "__doc__": f"{base.__name__} on the pool only ({text}; {iterations} iterations per epoch): its "
                            f"checkpoint_final.pth goes to nnUNetTrainer_{suffix} -pretrained_weights."})


nnUNetTrainerSimCLRPretrain_clBench = pretrain_schedule(nnUNetTrainerSimCLRPretrain,
                                                        PRETRAIN_SCHEDULES["nnUNetTrainerSimCLRPretrain"])

# {pretraining trainer: why it (and so its schedule class) does not exist}, for methods not there (yet)
UNAVAILABLE: dict[str, str] = {}
OPTIONAL_METHODS = (("nnunet_cl_trainers.separeg", "nnUNetTrainerSepaRegPretrain"),
                    ("nnunet_cl_trainers.polycl", "nnUNetTrainerPolyCLPretrain"))

for _module, _base in OPTIONAL_METHODS:
    try:
        _cls = getattr(importlib.import_module(_module), _base)
    except Exception as _e:  # noqa: BLE001 - whatever breaks a method's module must not break the lookup
        _why = " ".join(str(_e).split())[:300]
        UNAVAILABLE[_base] = (f"{_module} is not there yet" if isinstance(_e, ModuleNotFoundError)
                              and _e.name == _module else
                              f"{_module} has no class {_base}" if isinstance(_e, AttributeError) else
                              f"importing {_module} failed: {type(_e).__name__}: {_why}")
        continue
    globals()[f"{_base}_clBench"] = pretrain_schedule(_cls, PRETRAIN_SCHEDULES[_base])

# only the classes defined here: re-exporting nnUNetTrainer itself would shadow nothing but confuse name checks
__all__ = sorted(n for n, o in list(globals().items())
                 if n.startswith("nnUNetTrainer") and getattr(o, "__module__", None) == __name__)
