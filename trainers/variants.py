"""Every thin variant of every method, generated from one table (nnU-Net's variant style: a subclass that only
sets attributes, named `<base>_<suffix>` or `<base><Suffix>`).

A new method adds its rows here; nothing else names its variants. Rows:
  - `_<P>pt_<F>ft`: P pretraining epochs, then F fine-tuning epochs, 250 iterations each as in nnU-Net;
  - `_quick`: a first look at a method on a CPU: 5 short pretraining epochs, then 5 short fine-tuning epochs;
  - method options (PolyCL's strategies, SepaReg's objective, distillation loss and k, SuperCL's ASP and
    instance term, DCL-Seg's and PCLMix's ablations).
"""
from nnunet_cl_trainers.base import attribute_variant
from nnunet_cl_trainers.dclseg import nnUNetTrainerDCLSeg
from nnunet_cl_trainers.pclmix import nnUNetTrainerPCLMix
from nnunet_cl_trainers.polycl import nnUNetTrainerPolyCL, nnUNetTrainerPolyCLPretrain
from nnunet_cl_trainers.separeg import nnUNetTrainerSepaReg, nnUNetTrainerSepaRegPretrain
from nnunet_cl_trainers.simclr import nnUNetTrainerSimCLR, nnUNetTrainerSimCLRPretrain
from nnunet_cl_trainers.supercl import nnUNetTrainerSuperCL, nnUNetTrainerSuperCLPretrain

_QUICK_ITERATIONS = dict(pretrain_iterations_per_epoch=10, finetune_iterations_per_epoch=10,
                         finetune_val_iterations_per_epoch=5)
_POLYCL_RULES = {"S": "same scan = positive, other scans = negatives. Needs no labels",
                 "O": "same organ presence = positive, opposite presence = negative (any scan)",
                 "M": "same scan and same presence = positive; another scan without the organ = negative"}

# (base class, name of the variant, attributes, docstring or None)
VARIANTS = [
    (nnUNetTrainerSimCLR, "nnUNetTrainerSimCLR_10pt_50ft", dict(pretrain_epochs=10, finetune_epochs=50), None),
    (nnUNetTrainerSimCLR, "nnUNetTrainerSimCLR_50pt_250ft", dict(pretrain_epochs=50, finetune_epochs=250), None),
    (nnUNetTrainerSimCLR, "nnUNetTrainerSimCLR_100pt_1000ft", dict(pretrain_epochs=100, finetune_epochs=1000),
     "The defaults, named for sweeps."),
    (nnUNetTrainerSimCLRPretrain, "nnUNetTrainerSimCLRPretrain_10pt", dict(pretrain_epochs=10), None),
    (nnUNetTrainerSimCLRPretrain, "nnUNetTrainerSimCLRPretrain_50pt", dict(pretrain_epochs=50), None),
    (nnUNetTrainerSimCLRPretrain, "nnUNetTrainerSimCLRPretrain_300pt", dict(pretrain_epochs=300), None),
]
for _s, _rule in _POLYCL_RULES.items():
    VARIANTS += [(nnUNetTrainerPolyCL, f"nnUNetTrainerPolyCL_{_s}", dict(strategy=_s), f"PolyCL-{_s}: {_rule}."),
                 (nnUNetTrainerPolyCLPretrain, f"nnUNetTrainerPolyCLPretrain_{_s}", dict(strategy=_s),
                  f"PolyCL-{_s}, pretraining only: {_rule}.")]
for _base in (nnUNetTrainerSepaReg, nnUNetTrainerSepaRegPretrain):
    _stem = _base.__name__[:-len("Pretrain")] if _base is nnUNetTrainerSepaRegPretrain else _base.__name__
    _tail = "Pretrain" if _base is nnUNetTrainerSepaRegPretrain else ""
    VARIANTS += [(_base, f"{_stem}SimSiam{_tail}", dict(objective="simsiam"), None),
                 (_base, f"{_stem}BYOL{_tail}", dict(objective="byol"), None),
                 (_base, f"{_stem}KL{_tail}", dict(distill_loss="kl"), None)]
    for _k in (4, 8):  # _k4 is the default k, named so that a sweep over k reads alike
        VARIANTS += [(_base, f"{_base.__name__}_k{_k}", dict(k=_k), None),
                     (_base, f"{_stem}BYOL{_tail}_k{_k}", dict(objective="byol", k=_k), None)]
VARIANTS += [
    (nnUNetTrainerSuperCL, "nnUNetTrainerSuperCL_10pt_50ft", dict(pretrain_epochs=10, finetune_epochs=50), None),
    (nnUNetTrainerSuperCL, "nnUNetTrainerSuperCL_50pt_250ft", dict(pretrain_epochs=50, finetune_epochs=250), None),
    (nnUNetTrainerSuperCLPretrain, "nnUNetTrainerSuperCLPretrain_10pt", dict(pretrain_epochs=10), None),
    (nnUNetTrainerSuperCLPretrain, "nnUNetTrainerSuperCLPretrain_50pt", dict(pretrain_epochs=50), None),
    (nnUNetTrainerSuperCL, "nnUNetTrainerSuperCL_area", dict(asp_mode="area"),
     "SuperCL with the authors' ASP (supervoxel sums divided by the whole map's size, not the supervoxel's)."),
    (nnUNetTrainerSuperCL, "nnUNetTrainerSuperCL_position", dict(instance_term="position"),
     "SuperCL with the positional instance term: patches centred within 10% of the body axis are positives."),
    (nnUNetTrainerSuperCLPretrain, "nnUNetTrainerSuperCLPretrain_position", dict(instance_term="position"), None),
    (nnUNetTrainerDCLSeg, "nnUNetTrainerDCLSeg_250epochs", dict(finetune_epochs=250), None),
    (nnUNetTrainerDCLSeg, "nnUNetTrainerDCLSeg_noBoundary", dict(boundary_fraction=0.0),
     "DCL-Seg with anchors drawn uniformly, boundary voxels not oversampled (an ablation)."),
    (nnUNetTrainerPCLMix, "nnUNetTrainerPCLMix_250epochs", dict(finetune_epochs=250), None),
    (nnUNetTrainerPCLMix, "nnUNetTrainerPCLMix_ln2", dict(uncertainty_paper_ln2=True),
     "PCLMix with the paper's uncertainty threshold, 0.75..1 x ln 2 (the default scales it to ln C)."),
    (nnUNetTrainerPCLMix, "nnUNetTrainerPCLMix_noContrast", dict(contrast_weight=0.0),
     "PCLMix without the pixel contrast: dual decoder, dynamic mix and consistency only (an ablation)."),
]
# quick variants: one per family, the same name pattern for all
VARIANTS += [
    (nnUNetTrainerSimCLR, "nnUNetTrainerSimCLR_quick", dict(pretrain_epochs=5, finetune_epochs=5, **_QUICK_ITERATIONS),
     "SimCLR, a first look: 5 x 10 pretraining steps, then 5 x 10 fine-tuning steps."),
    (nnUNetTrainerPolyCL, "nnUNetTrainerPolyCL_quick", dict(pretrain_epochs=5, finetune_epochs=5, **_QUICK_ITERATIONS),
     "PolyCL-S, a first look: 5 x 10 pretraining steps, then 5 x 10 fine-tuning steps."),
    (nnUNetTrainerSepaReg, "nnUNetTrainerSepaReg_quick",
     dict(region_epochs=2, k=2, expert_epochs=1, distill_epochs=1, finetune_epochs=5, **_QUICK_ITERATIONS),
     "SepaReg, a first look: separation, 2 region epochs, 2 experts of 1 epoch, 1 distillation epoch (10 steps "
     "each), then 5 x 10 fine-tuning steps."),
    (nnUNetTrainerSuperCL, "nnUNetTrainerSuperCL_quick", dict(pretrain_epochs=5, finetune_epochs=5, **_QUICK_ITERATIONS),
     "SuperCL, a first look: supervoxels of the pool, 5 x 10 pretraining steps, then 5 x 10 fine-tuning steps."),
    (nnUNetTrainerDCLSeg, "nnUNetTrainerDCLSeg_quick", dict(finetune_epochs=5, **_QUICK_ITERATIONS),
     "DCL-Seg, a first look: 5 x 10 supervised steps with learned positives and voxel contrast (no pretraining)."),
    (nnUNetTrainerPCLMix, "nnUNetTrainerPCLMix_quick",
     dict(finetune_epochs=5, contrast_start_iteration=10, **_QUICK_ITERATIONS),
     "PCLMix, a first look: 5 x 10 steps with dual decoder, mix and consistency; the contrast from step 10."),
]

for _base, _name, _attrs, _doc in VARIANTS:
    globals()[_name] = attribute_variant(_base, _name, __name__, _doc, **_attrs)

__all__ = [name for _, name, _, _ in VARIANTS]
del _s, _rule, _base, _stem, _tail, _k, _name, _attrs, _doc
