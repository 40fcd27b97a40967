"""The learnable positive of DCL-Seg: x+ = clamp(b(z) * (x + s(x, z)), range of x).

Geometry is untouched by construction: every voxel of x+ is a function of the same voxel of x (a per-voxel
style network s, 1x1x1 convolutions) times a smooth multiplicative bias field b (a low-order polynomial in the
voxel coordinates). A random code z per sample makes each positive a different draw; the code enters both parts.
Works for any number of spatial dimensions (nnU-Net's 2d and 3d configurations).
"""
from __future__ import annotations

import itertools

import torch
from torch import nn

__all__ = ["AppearanceGenerator", "clamp_to_range", "polynomial_basis"]


def clamp_to_range(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` clamped, per sample and channel, to the [min, max] of ``x`` (B, C, *spatial): x+ never leaves the
    intensity range the network was trained on."""
    dims = tuple(range(2, x.dim()))
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    return torch.maximum(torch.minimum(y, hi), lo)


def polynomial_basis(shape, degree: int, device=None, dtype=None) -> torch.Tensor:
    """(P, *shape): every monomial prod_d u_d^e_d with 1 <= sum e_d <= degree, u_d in [-1, 1] along axis d."""
    axes = [torch.linspace(-1, 1, n, device=device, dtype=dtype) if n > 1 else
            torch.zeros(1, device=device, dtype=dtype) for n in shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    terms = []
    for exps in itertools.product(range(degree + 1), repeat=len(shape)):
        if 1 <= sum(exps) <= degree:
            term = torch.ones(shape, device=device, dtype=dtype)
            for g, e in zip(grids, exps):
                term = term * g ** e
            terms.append(term)
    return torch.stack(terms)


class AppearanceGenerator(nn.Module):
    """x+ = clamp(b(z) * (x + s([x, z])), [min x, max x]) per sample and channel.

    s: per-voxel MLP (channels + code_dim -> hidden -> channels), its last layer zero at start, so x+ = x until
       the generator's first step; b = exp(max_log_bias * tanh(sum_k c_k(z) P_k)), P_k the polynomial basis of
       ``bias_degree`` over the patch, c = linear(z), zero at start. ``max_log_bias`` bounds the field to
       [exp(-m), exp(m)] (0.4: x0.67 to x1.49).

    forward(x, code=None): ``code`` (B, code_dim) defaults to a standard normal draw from torch's RNG.
    """

    def __init__(self, channels: int, hidden: int = 16, code_dim: int = 8, bias_degree: int = 2,
                 max_log_bias: float = 0.4, spatial_dims: int = 3):
        super().__init__()
        self.code_dim, self.bias_degree, self.max_log_bias = code_dim, bias_degree, max_log_bias
        self.style = nn.Sequential(nn.Linear(channels + code_dim, hidden), nn.LeakyReLU(0.2),
                                   nn.Linear(hidden, channels))
        n_terms = len(polynomial_basis((2,) * spatial_dims, bias_degree))
        self.bias = nn.Linear(code_dim, n_terms, bias=False)
        self._basis = None  # (shape, device, dtype, basis): the patch shape is the same every step
        for layer in (self.style[-1], self.bias):  # identity at start: the first positives are x itself
            nn.init.zeros_(layer.weight)
        nn.init.zeros_(self.style[-1].bias)

    def forward(self, x: torch.Tensor, code: torch.Tensor | None = None) -> torch.Tensor:
        b, spatial = x.shape[0], x.shape[2:]
        if code is None:
            code = torch.randn(b, self.code_dim, device=x.device, dtype=x.dtype)
        channels_last = x.movedim(1, -1)  # (B, *spatial, C)
        z = code.to(x.dtype).view(b, *([1] * len(spatial)), self.code_dim).expand(*channels_last.shape[:-1], -1)
        styled = channels_last + self.style(torch.cat([channels_last, z], dim=-1))
        key = (tuple(spatial), x.device, x.dtype)
        if self._basis is None or self._basis[0] != key:
            self._basis = (key, polynomial_basis(spatial, self.bias_degree, x.device, x.dtype))  # (P, *spatial)
        basis = self._basis[1]
        log_field = torch.einsum("bp,p...->b...", self.bias(code.to(x.dtype)), basis)
        field = torch.exp(self.max_log_bias * torch.tanh(log_field)).unsqueeze(1)  # (B, 1, *spatial)
        return clamp_to_range(styled.movedim(-1, 1) * field, x)
