"""PCLMix (scribble supervision with a dual decoder, dynamic mix and uncertainty-guided pixel contrast; Lei et al.
2024, METHODS_SPEC §5) as an auxiliary loss of nnU-Net's supervised training, in 3-D (docs/methods/pclmix.md).

Scribbles reach nnU-Net as its ignore label (nnUNetv2_cl_scribbles_to_nnunet), so nnU-Net's Dice + CE is already the
partial loss. Each step:
  1. mix: every patch x_j gets a random box (about mix_fraction of the volume) filled from itself and the rest from
     its partner in the batch (nnunet_cl.methods.pclmix.mix); scribbles are mixed with the same box;
  2. one forward of [x; x_mix] through the stock network (encoder + stock decoder) and the second decoder;
  3. nnU-Net's loss on [x; x_mix] against [scribbles; mixed scribbles] (stock decoder), and the same loss for the
     second decoder (weight aux_decoder_weight);
  4. the mix's pseudo-label: the box from one decoder's detached prediction on x_j, the rest from the other
     decoder's on the partner (a coin flip per sample picks which), argmax; CE against it for both decoders;
  5. the certainty pseudo-label of x: argmax of the decoders' mean, -1 where its entropy exceeds the ramped
     threshold, scribbles written over it; hard and easy anchors per class from the embedding head's map are
     contrasted against the class-wise memory (weight contrast_weight * (it / max_it)^0.9 from
     contrast_start_iteration on); then the image's class means enter the memory;
  6. consistency: MSE between the two decoders' logits on clean and mixed patches (sigmoid ramp-up).
Prediction and export use the stock network alone; the second decoder, head and memory live in cl_modules.
"""
import torch
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from torch import nn

from nnunet_cl.distributed import is_distributed, sum_with_grad, world_size
from nnunet_cl.methods.pclmix import (ClassQueue, UpsampleAddDecoder, anchors_per_class, box_masks, certainty_labels,
                                      class_means, count_class_pairs, embedding_head, mix, mix_partners,
                                      queue_pixel_contrast, resize_mask, sample_class_anchors, sigmoid_rampup,
                                      uncertainty_threshold)
from nnunet_cl.paths import NnUNetCLError
from nnunet_cl_trainers.base import nnUNetTrainerCLBase


def _full(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors (under autocast) in float32; other dtypes as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _scales(target):
    return list(target) if isinstance(target, (list, tuple)) else [target]


class nnUNetTrainerPCLMix(nnUNetTrainerCLBase):
    """nnU-Net's (partial) supervised training plus PCLMix's second decoder, dynamic mix, pixel contrast and
    consistency.

    Hyperparameters (attributes; a variant changes them in its own __init__):
      aux_decoder_weight      the second decoder's losses (0.4, the authors' README; their scripts use 0.1)
      mix_fraction            volume share of the mix box (0.2)
      mix_pseudo_weight       CE of both decoders against the mix's pseudo-label (0.5: nnU-Net's loss averages the
                              clean and mixed scribble terms, so this keeps the paper's 1 : 1 : 1)
      contrast_weight         w in w * (it / max_it)^contrast_ramp_power (0.1, power 0.9)
      contrast_start_iteration  no contrast before this step of the stage (1000)
      temperature, base_temperature  tau and tau_b of the contrast (0.07, 0.07)
      max_anchors, max_anchors_per_class  anchors per batch and per (image, class) (1024, 100)
      min_class_voxels        an (image, class) gives anchors if it has this many voxels on the embedding map (10)
      queue_size              memory slots per foreground class (500)
      embedding_dim, embedding_stage  the head's output (128) on encoder stage 3 (stride 8; the deepest if fewer)
      consistency_weight      MSE between the decoders' logits, ramped up over the stage (0.1)
      uncertainty_paper_ln2   threshold ramp 0.75..1 x ln 2 (the paper) instead of x ln C (False)
      aux_dropout, aux_width  the second decoder's dropout (0.1) and width, a fraction of the stock one's (0.5)
      aux_output_stage        the stage the second decoder stops at, its logits then upsampled trilinearly (1: one
                              stage above full resolution, as Swin-UNet's decoder ends in an upsampling; 0: full)
    """

    loss_terms = ("aux_decoder", "mix", "contrast", "consistency")
    has_pretraining = False
    has_auxiliary_loss = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pretrain_epochs = 0
        self.finetune_epochs = self.num_epochs  # nnU-Net's 1000
        self.aux_decoder_weight = 0.4
        self.mix_fraction = 0.2
        self.mix_pseudo_weight = 0.5  # the paper's 1 : 1 : 1 of clean, mixed and pseudo-label terms (see the doc)
        self.contrast_weight = 0.1
        self.contrast_ramp_power = 0.9
        self.contrast_start_iteration = 1000
        self.temperature = 0.07
        self.base_temperature = 0.07
        self.max_anchors = 1024
        self.max_anchors_per_class = 100
        self.min_class_voxels = 10
        self.queue_size = 500
        self.embedding_dim = 128
        self.embedding_stage = 3
        self.consistency_weight = 0.1
        self.uncertainty_paper_ln2 = False
        self.aux_dropout = 0.1
        self.aux_width = 0.5
        self.aux_output_stage = 1  # at 0 the step cost 2.24x nnU-Net's, at 1 2.08x (docs/methods/pclmix.md)
        self._iteration = 0  # step within the fine-tuning stage (ramps), from the epoch: right after --c too
        self._enqueue = (None, None)  # this step's class means, pushed into the memory after the optimiser's step

    # ---------------------------------------------------------------- set-up
    def check_settings(self) -> None:
        super().check_settings()
        problems = []
        if not 0 < self.aux_width <= 4:
            problems.append(f"aux_width={self.aux_width} (in (0, 4])")
        if not (isinstance(self.aux_output_stage, int) and self.aux_output_stage >= 0):
            problems.append(f"aux_output_stage={self.aux_output_stage!r} (a whole number >= 0)")
        if not 0 < self.mix_fraction < 1:
            problems.append(f"mix_fraction={self.mix_fraction} (in (0, 1))")
        if not (self.temperature > 0 and self.base_temperature > 0):
            problems.append(f"temperature={self.temperature}, base_temperature={self.base_temperature} (> 0)")
        for name in ("aux_decoder_weight", "mix_pseudo_weight", "contrast_weight", "consistency_weight"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} (>= 0)")
        for name in ("max_anchors", "max_anchors_per_class", "queue_size", "embedding_dim", "min_class_voxels"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                problems.append(f"{name}={getattr(self, name)!r} (a whole number >= 1)")
        if self.label_manager.has_regions:
            problems.append("region-based labels (the pseudo-labels and the contrast need one class per voxel)")
        per_rank = int(self.configuration_manager.batch_size) // max(world_size() if self.is_ddp else 1, 1)
        if per_rank < 2:
            problems.append(f"{per_rank} patch per process (the mix pairs patches of one process: use a batch size "
                            f"of at least 2 per process)")
        if self.is_ddp and per_rank % 2:
            problems.append(f"an odd batch of {per_rank} per process (mix pairs would depend on the split; use an "
                            f"even batch size per process)")
        if problems:
            raise NnUNetCLError(f"{type(self).__name__}: " + "; ".join(problems) + ". Fix: set these attributes "
                                f"in your variant to the ranges given, or change the plans' batch size.")
        if self.label_manager.ignore_label is None:
            self.print_to_log_file(f"{type(self).__name__}: the dataset has no ignore label, so every voxel counts as "
                                   f"annotated (for scribbles: nnUNetv2_cl_scribbles_to_nnunet)")

    def build_cl_modules(self) -> nn.ModuleDict:
        encoder = self.unwrapped_network.encoder
        channels = list(encoder.output_channels)
        self.embedding_stage_used = min(self.embedding_stage, len(channels) - 1)
        # every encoder stage: the second decoder reads all skips of the step's one encoder pass
        self.feature_request = {"encoder": tuple(range(len(channels)))}
        output_stage = min(self.aux_output_stage, len(channels) - 2)  # a shallow network has fewer stages to skip
        if output_stage != self.aux_output_stage:
            self.print_to_log_file(f"PCLMix: aux_output_stage {self.aux_output_stage} -> {output_stage} (the network "
                                   f"has {len(channels)} stages)")
        decoder = UpsampleAddDecoder(channels, self.label_manager.num_segmentation_heads, encoder.conv_op,
                                     encoder.norm_op, encoder.norm_op_kwargs, encoder.nonlin, encoder.nonlin_kwargs,
                                     self.aux_dropout, self.aux_width, output_stage)
        head = embedding_head(channels[self.embedding_stage_used], self.embedding_dim, encoder.conv_op,
                              encoder.norm_op)
        memory = ClassQueue(self.label_manager.foreground_labels, self.queue_size, self.embedding_dim)
        return nn.ModuleDict({"aux_decoder": decoder, "head": head, "memory": memory})

    def initialize(self):
        super().initialize()
        # the second decoder's loss: nnU-Net's Dice + CE (ignore label: the partial loss) without deep supervision
        self.aux_loss = DC_and_CE_loss({"batch_dice": self.configuration_manager.batch_dice, "smooth": 1e-5,
                                        "do_bg": False, "ddp": self.is_ddp}, {}, weight_ce=1, weight_dice=1,
                                       ignore_label=self.label_manager.ignore_label,
                                       dice_class=MemoryEfficientSoftDiceLoss)

    def cl_extra_state(self) -> dict:
        return {"iteration": self._iteration}

    def load_cl_extra_state(self, state: dict) -> None:
        self._iteration = int(state.get("iteration", self._iteration))

    @property
    def max_iterations(self) -> int:
        return max(self.finetune_epochs * self.finetune_iterations_per_epoch, 1)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._iteration = (self.current_epoch - self.pretrain_epochs) * self.finetune_iterations_per_epoch

    # ---------------------------------------------------------------- the step
    def step_inputs(self, batch: dict):
        x, target = batch["data"], _scales(batch["target"])
        n = x.shape[0]
        batch["generators"] = self.sample_generators(n)
        masks = box_masks((n, *x.shape[2:]), self.mix_fraction, batch["generators"]).to(x.device)
        partner = mix_partners(n).to(x.device)
        batch["mask"], batch["partner"] = masks, partner
        batch["coin"] = torch.stack([torch.rand((), generator=g) < 0.5 for g in batch["generators"]]).to(x.device)
        x_mix = mix(x, x[partner], masks)
        mixed = [torch.cat([t, mix(t, t[partner], resize_mask(masks, t.shape[2:]))]) for t in target]
        batch["step_target"] = mixed[0]  # [scribbles; mixed scribbles] at full resolution, for the second decoder
        return torch.cat([x, x_mix]), (mixed if isinstance(batch["target"], (list, tuple)) else mixed[0])

    def auxiliary_losses(self, batch: dict, output, features: dict) -> dict:
        n = batch["data"].shape[0]
        skips = [features[f"enc{i}"] for i in range(len(self.feature_request["encoder"]))]
        main = output[0] if isinstance(output, (list, tuple)) else output  # full resolution, (2n, C, *S)
        aux = self.cl_modules["aux_decoder"](skips)
        scribbles = _scales(batch["target"])[0]  # (n, 1, *S), ignore label where unannotated
        terms = {"aux_decoder": self.aux_decoder_weight * self.aux_loss(aux, batch["step_target"])}

        # the mix's pseudo-label: the box from decoder A(j) on x_j, the rest from the other decoder on the partner
        with torch.no_grad():
            p_main, p_aux = torch.softmax(_full(main[:n]), 1), torch.softmax(_full(aux[:n]), 1)
            coin, partner = batch["coin"].view(-1, *[1] * (main.dim() - 1)), batch["partner"]
            inside = torch.where(coin, p_main, p_aux)
            outside = torch.where(coin, p_aux[partner], p_main[partner])
            pseudo = mix(inside, outside, batch["mask"]).argmax(1)
        terms["mix"] = self.mix_pseudo_weight * (F.cross_entropy(main[n:], pseudo) +
                                                 self.aux_decoder_weight * F.cross_entropy(aux[n:], pseudo))
        terms["contrast"] = self._contrast(batch, features[f"enc{self.embedding_stage_used}"][:n], p_main, p_aux,
                                           scribbles)
        ramp = sigmoid_rampup(self._iteration, self.max_iterations)
        terms["consistency"] = self.consistency_weight * ramp * F.mse_loss(_full(main), _full(aux))
        return terms

    def _contrast(self, batch, feature_map, p_main, p_aux, scribbles):
        """The pixel contrast of this step's clean patches against the memory; their class means wait on the trainer
        for on_after_step, which pushes them after the optimiser's step (this step contrasts the old memory)."""
        emb = F.normalize(_full(self.cl_modules["head"](feature_map)), dim=1)  # (n, D, *s)
        threshold = uncertainty_threshold(self._iteration, self.max_iterations, self.label_manager.num_segmentation_heads,
                                          self.uncertainty_paper_ln2)
        labels = certainty_labels((p_main + p_aux) / 2, scribbles, threshold, self.label_manager.ignore_label)
        prediction = p_main.argmax(1)
        size = emb.shape[2:]  # labels and prediction at the embedding's resolution (nearest, as the authors)
        labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long().flatten(1)
        prediction = F.interpolate(prediction[:, None].float(), size=size, mode="nearest")[:, 0].long().flatten(1)
        flat = emb.flatten(2)
        # kept on the trainer, not in the batch: DDP may hand the forward a copy of the batch dict
        self._enqueue = class_means(flat.detach(), labels, self.label_manager.foreground_labels)
        weight = 0.0 if self._iteration < self.contrast_start_iteration else \
            self.contrast_weight * (self._iteration / self.max_iterations) ** self.contrast_ramp_power
        keys, key_labels = self.cl_modules["memory"].keys()
        if weight == 0 or keys.shape[0] == 0:
            return flat.sum() * 0.0  # (in the graph: the head takes part in every step, as DDP expects)
        pairs = count_class_pairs(labels, self.min_class_voxels)
        if self.is_ddp:  # n_view from the whole batch's (image, class) pairs
            pairs = int(sum_with_grad(torch.tensor(float(pairs), device=flat.device)).round().item())
        n_view = anchors_per_class(pairs, self.max_anchors, self.max_anchors_per_class)
        b_idx, v_idx, classes, _ = sample_class_anchors(labels, prediction, n_view, self.min_class_voxels,
                                                        batch["generators"])
        anchors = flat[b_idx, :, v_idx]
        per_anchor = queue_pixel_contrast(anchors, classes, keys, key_labels, self.temperature, self.base_temperature,
                                          reduction="none")
        counted = (classes == 0) | torch.isin(classes, key_labels)
        total, count = per_anchor.sum(), counted.sum().to(per_anchor.dtype)
        if self.is_ddp:  # the mean over every rank's anchors, with gradients to each rank's anchors
            total, count = sum_with_grad(total), sum_with_grad(count.detach())
        return weight * total / count.clamp_min(1)

    def on_after_step(self, batch: dict, terms: dict) -> None:
        self._iteration += 1
        rows, classes = self._enqueue
        self._enqueue = (None, None)
        if rows is None:
            return
        if is_distributed() and self.is_ddp:  # every rank pushes every rank's rows, in rank order
            gathered = [None] * world_size()
            torch.distributed.all_gather_object(gathered, (rows.cpu(), classes.cpu()))
            rows = torch.cat([r for r, _ in gathered]).to(self.device)
            classes = torch.cat([c for _, c in gathered]).to(self.device)
        self.cl_modules["memory"].push(rows, classes)
