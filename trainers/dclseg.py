"""DCL-Seg (distribution-aware contrastive learning with learnable positives; METHODS_SPEC §6): our 3-D design from
the paper's abstract, as an auxiliary loss of nnU-Net's supervised training (docs/methods/dclseg.md).

Each step a learnable appearance transform (the generator, nnunet_cl.methods.dclseg.generator) makes a positive
x+ of every patch x: the same geometry, another intensity distribution. The network takes [x; x+] in one pass and
minimises
    nnU-Net's Dice + CE on x and x+   +   contrast_weight * SupCon(voxel embeddings of x and x+, same class = positive)
with boundary voxels oversampled as anchors. The generator, with an optimiser of its own, minimises
    structure_weight * (1 - local NCC(x, x+))  -  SupCon
so it seeks the hardest positives that keep the image's structure. Its gradient of the contrast is exact: the
network sees x+ detached, and the contrast's gradient at x+ (one extra input-gradient pass) is applied to the
generator's output.

Trainers: nnUNetTrainerDCLSeg (no pretraining stage; `-pretrained_weights` of any method's pretraining composes the
two), variants in trainers/variants.py.
"""
import torch
from torch import nn

from nnunet_cl.methods.dclseg.boundary import sample_anchors
from nnunet_cl.methods.dclseg.generator import AppearanceGenerator
from nnunet_cl.methods.dclseg.loss import two_view_supcon
from nnunet_cl.methods.dclseg.structure import STRUCTURE_WEIGHT, structure_penalty
from nnunet_cl.paths import NnUNetCLError
from nnunet_cl_trainers.base import nnUNetTrainerCLBase


def _twice(target):
    """nnU-Net's target (a tensor, or a list per deep-supervision scale) for the batch [x; x+]."""
    return [torch.cat([t, t]) for t in target] if isinstance(target, (list, tuple)) else torch.cat([target, target])


class nnUNetTrainerDCLSeg(nnUNetTrainerCLBase):
    """nnU-Net's supervised training plus DCL-Seg's learned positives and supervised voxel contrast.

    Hyperparameters (attributes; a variant changes them in its own __init__):
      contrast_weight      beta: weight of the voxel contrast in the network's loss (0.1)
      structure_weight     lambda: weight of the structure penalty in the generator's objective (10.0)
      temperature          tau of the voxel contrast (0.1)
      anchors_per_sample   voxels per patch, the same voxels in x and x+ (256)
      boundary_fraction    share of them within boundary_distance voxels of a label change (0.5, distance 2)
      embedding_dim        the voxel projection head's output (64; head: C -> C -> 64 on the last decoder stage)
      generator_lr         the generator's Adam learning rate (1e-3)
      generator_hidden, generator_code_dim, bias_degree, max_log_bias, structure_window: the generator and penalty
    """

    loss_terms = ("contrast", "structure")
    has_pretraining = False
    has_auxiliary_loss = True
    feature_request = {"decoder": (-1,)}  # the full-resolution decoder stage: one feature per voxel of the labels

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pretrain_epochs = 0
        self.finetune_epochs = self.num_epochs  # nnU-Net's 1000
        self.contrast_weight = 0.1
        self.structure_weight = STRUCTURE_WEIGHT  # 10.0, measured (nnunet_cl.methods.dclseg.structure)
        self.temperature = 0.1
        self.anchors_per_sample = 256
        self.boundary_fraction = 0.5
        self.boundary_distance = 2
        self.embedding_dim = 64
        self.generator_lr = 1e-3
        self.generator_hidden = 16
        self.generator_code_dim = 8
        self.bias_degree = 2
        self.max_log_bias = 0.4
        self.structure_window = 5

    def check_settings(self) -> None:
        super().check_settings()
        problems = []
        if not (isinstance(self.anchors_per_sample, int) and self.anchors_per_sample >= 2):
            problems.append(f"anchors_per_sample={self.anchors_per_sample!r} (a whole number >= 2)")
        if not 0 <= self.boundary_fraction <= 1:
            problems.append(f"boundary_fraction={self.boundary_fraction} (in [0, 1])")
        if not (isinstance(self.boundary_distance, int) and self.boundary_distance >= 1):
            problems.append(f"boundary_distance={self.boundary_distance!r} (voxels, >= 1)")
        if self.contrast_weight < 0 or self.structure_weight < 0:
            problems.append(f"contrast_weight={self.contrast_weight}, structure_weight={self.structure_weight} (>= 0)")
        if not self.temperature > 0 or not self.generator_lr > 0:
            problems.append(f"temperature={self.temperature}, generator_lr={self.generator_lr} (> 0)")
        if self.structure_window < 1 or self.structure_window % 2 == 0:
            problems.append(f"structure_window={self.structure_window} (odd, >= 1)")
        if self.label_manager.has_regions:
            problems.append("region-based labels (the contrast needs one class per voxel; train with labels)")
        if self.is_ddp:  # the contrast gathers equal shares: every rank the same patches and the same anchor count
            world = torch.distributed.get_world_size()
            if int(self.configuration_manager.batch_size) % world:
                problems.append(f"batch size {self.configuration_manager.batch_size} with {world} processes (nnU-Net "
                                f"would split it unevenly; use a batch size divisible by the process count)")
            if self.label_manager.ignore_label is not None:
                problems.append("an ignore label with several processes (patches with few labelled voxels give the "
                                "ranks different anchor counts; train in one process)")
        if problems:
            raise NnUNetCLError(f"{type(self).__name__}: " + "; ".join(problems) + ". Fix: set these attributes "
                                f"in your variant to the ranges given (defaults in the class docstring).")

    def build_cl_modules(self) -> nn.ModuleDict:
        channels = self.configuration_manager.network_arch_init_kwargs["features_per_stage"][0]
        generator = AppearanceGenerator(self.num_input_channels, self.generator_hidden, self.generator_code_dim,
                                        self.bias_degree, self.max_log_bias,
                                        spatial_dims=len(self.configuration_manager.patch_size))
        head = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(inplace=True),
                             nn.Linear(channels, self.embedding_dim))
        return nn.ModuleDict({"generator": generator, "head": head})

    def build_extra_optimizers(self):
        return {"generator": torch.optim.Adam(self.cl_modules["generator"].parameters(), lr=self.generator_lr)}

    def step_inputs(self, batch: dict):
        x = batch["data"]
        batch["generators"] = self.sample_generators(x.shape[0])
        code = torch.cat([torch.randn(1, self.generator_code_dim, generator=g) for g in batch["generators"]])
        code = code.to(device=x.device, dtype=x.dtype)
        positive = self.cl_modules["generator"](x, code)
        # the network sees x+ as a leaf: its loss trains the network only; the generator's gradient is set below
        batch["positive"], batch["positive_input"] = positive, positive.detach().requires_grad_(True)
        return torch.cat([x, batch["positive_input"]]), _twice(batch["target"])

    def auxiliary_losses(self, batch: dict, output, features: dict) -> dict:
        feats = features["dec-1"]  # (2B, C, *spatial): x's features, then x+'s
        n = feats.shape[0] // 2
        target = batch["target"][0] if isinstance(batch["target"], (list, tuple)) else batch["target"]
        labels = target[:, 0].long()
        b_idx, v_idx, _ = sample_anchors(labels, self.anchors_per_sample, self.boundary_fraction,
                                         self.boundary_distance, self.label_manager.ignore_label, batch["generators"])
        flat = feats.flatten(2)
        head = self.cl_modules["head"]
        e1, e2 = head(flat[b_idx, :, v_idx]), head(flat[b_idx + n, :, v_idx])
        contrast = two_view_supcon(e1, e2, labels.flatten(1)[b_idx, v_idx], self.temperature, gather=self.is_ddp)
        # the generator ascends the contrast: its gradient at x+ (scaled like the loss under AMP, against fp16
        # underflow), applied to the generator's output by a term whose value is zero
        scale = float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0
        (grad,) = torch.autograd.grad(contrast * scale, batch["positive_input"], retain_graph=True)
        grad = torch.nan_to_num(grad.float() / scale, nan=0.0, posinf=0.0, neginf=0.0)  # an fp16 overflow: no ascent
        ascent = -(batch["positive"] * grad).sum()
        structure = structure_penalty(batch["data"], batch["positive"], self.structure_window)
        return {"contrast": self.contrast_weight * contrast,
                "structure": self.structure_weight * structure + (ascent - ascent.detach())}
