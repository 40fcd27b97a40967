"""SepaReg losses and heads: SimSiam/BYOL for the inter-organ stage, distillation for IID.

One small function per loss: tensors in, scalar out, no hidden state. Inputs are (B, D) unless stated.
All "sg(.)" targets are detached inside the function, so callers need not remember to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_cl.distributed import CrossRankBatchNorm1d

__all__ = [
    "negative_cosine",
    "simsiam_loss",
    "byol_loss",
    "ema_update",
    "distill_cosine_loss",
    "distill_kl_loss",
    "mlp_head",
]


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -mean_b cos(p_b, sg(z_b)), in [-1, 1]; -1 when p and z point the same way."""
    return -F.cosine_similarity(p, z.detach(), dim=-1, eps=1e-8).mean()


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric SimSiam loss (Chen & He 2021).

    L = 1/2 D(p1, sg(z2)) + 1/2 D(p2, sg(z1)),  D(p, z) = -cos(p, z) averaged over the batch.

    p_i are predictor outputs, z_i projector outputs of view i. Range [-1, 1]; -1 (the minimum) when each
    prediction is parallel to the other view's projection, e.g. identical views and an identity predictor.
    Gradients flow only through p1 and p2.
    """
    return 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))


def _two_minus_two_cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample 2 - 2 cos(x, sg(y)) = ||x/|x| - y/|y|||^2, in [0, 4]."""
    return 2.0 - 2.0 * F.cosine_similarity(x, y.detach(), dim=-1, eps=1e-8)


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1_teacher: torch.Tensor, z2_teacher: torch.Tensor) -> torch.Tensor:
    """Symmetrised BYOL loss (Grill et al. 2020), as in SepaReg's base model.

    L = 1/2 mean_b [ (2 - 2 cos(p1, sg(z2_t))) + (2 - 2 cos(p2, sg(z1_t))) ]

    p_i: online predictor outputs of view i; z_i_t: target (teacher/EMA) projections of view i.
    Range [0, 4] (the two terms are averaged; byol_pytorch sums them, giving [0, 8]); 0 when each
    prediction is parallel to the teacher's projection of the other view.
    """
    return 0.5 * (_two_minus_two_cos(p1, z2_teacher) + _two_minus_two_cos(p2, z1_teacher)).mean()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: theta_t <- m * theta_t + (1 - m) * theta_s for every parameter.

    Floating-point buffers (e.g. BatchNorm running statistics) get the same update, integer buffers
    (num_batches_tracked) are copied. m = 1 leaves the teacher unchanged, m = 0 copies the student.
    The two modules must have identical structure.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1]; got {momentum}")
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different numbers of parameters")
    for t, s in zip(t_params, s_params):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
    for t, s in zip(teacher.buffers(), student.buffers()):
        if t.dtype.is_floating_point:
            t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
        else:
            t.copy_(s)


def distill_cosine_loss(student_pred: torch.Tensor, expert_proj: torch.Tensor) -> torch.Tensor:
    """IID regression term: L = mean_b (2 - 2 cos(student_pred_b, sg(expert_proj_b))), in [0, 4].

    ``student_pred`` is the expert's (or base model's) predictor applied to the student's projection;
    ``expert_proj`` the frozen expert's projection of the same region. 0 when they are parallel.
    """
    return _two_minus_two_cos(student_pred, expert_proj).mean()


def distill_kl_loss(student_feat: torch.Tensor, expert_feat: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """IID feature term: L = 1/B sum_b KL( softmax(sg(e_b)/T) || softmax(s_b/T) ), >= 0.

    Softmax over the feature dimension (everything after dim 0 is flattened). 0 when the student's features
    equal the expert's (or differ by a constant shift per sample). The reduction is "batchmean"
    (sum over features, mean over the batch); SepaReg's released code uses PyTorch's elementwise "mean",
    which is this value divided by D.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    s = student_feat.flatten(1) / temperature
    e = expert_feat.detach().flatten(1) / temperature
    return F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(e, dim=1), reduction="batchmean", log_target=True)


def mlp_head(in_dim: int, hidden: int, out_dim: int, bn: bool = True, num_layers: int = 2) -> nn.Sequential:
    """Projector / predictor MLP: [Linear -> BN -> ReLU] x (num_layers - 1) -> Linear.

    SepaReg/BYOL use num_layers=2, hidden=4096 with BN. Without ``bn`` the hidden Linear layers keep
    their bias; with it the bias is dropped (BN supplies it).
    """
    if num_layers < 1:
        raise ValueError("num_layers must be >= 1")
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(d, hidden, bias=not bn))
        if bn:
            layers.append(CrossRankBatchNorm1d(hidden))
        layers.append(nn.ReLU(inplace=True))
        d = hidden
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)
