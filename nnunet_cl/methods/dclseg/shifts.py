"""Synthetic intensity shifts of the robustness benchmark (nnUNetv2_cl_robustness), on raw image arrays (numpy).

Each shift keeps geometry and labels; ``strength`` is the parameter named per kind below. Applied to the raw
intensities, before nnU-Net's normalisation, as a scanner or protocol change would be. Note that nnU-Net's
z-score normalisation (MRI) absorbs a global linear change, which is why contrast is clipped to the image range.
"""
from __future__ import annotations

import numpy as np

__all__ = ["SHIFTS", "apply_shift", "smooth_field"]

# kind -> strengths, mildest first within each direction; the benchmark's "strongest" are the extremes
SHIFTS = {
    "gamma": (0.5, 0.67, 1.5, 2.0),  # exponent on intensities scaled to [0, 1]
    "bias": (0.2, 0.4, 0.6),  # multiply by exp(s * f), f a smooth random field in [-1, 1]
    "contrast": (1.5, 2.0, 3.0),  # stretch about the median, clipped to the image's range
    "noise": (0.05, 0.1, 0.2),  # Gaussian noise, standard deviation s * the image's standard deviation
}


def smooth_field(shape, rng: np.random.Generator, degree: int = 3) -> np.ndarray:
    """A random polynomial of ``degree`` over the array, scaled to [-1, 1] (a smooth bias field)."""
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    field = np.zeros(shape)
    for exps in np.ndindex(*([degree + 1] * len(shape))):
        if 1 <= sum(exps) <= degree:
            field += rng.normal() * np.prod([a ** e for a, e in zip(axes, exps)], axis=0)
    span = np.abs(field).max()
    return field / span if span > 0 else field


def apply_shift(image: np.ndarray, kind: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """``image`` (any shape, raw intensities) under shift ``kind`` at ``strength``; float32."""
    x = np.asarray(image, dtype=np.float64)
    lo, hi = float(x.min()), float(x.max())
    if kind == "gamma":
        if strength <= 0:
            raise ValueError(f"gamma must be > 0, got {strength}")
        unit = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
        y = lo + unit ** strength * (hi - lo)
    elif kind == "bias":
        y = x * np.exp(strength * smooth_field(x.shape, rng))
    elif kind == "contrast":
        median = float(np.median(x))
        y = np.clip(median + strength * (x - median), lo, hi)
    elif kind == "noise":
        y = x + rng.normal(0, strength * x.std(), x.shape)
    else:
        raise ValueError(f"unknown shift {kind!r}; choose from {sorted(SHIFTS)}")
    return y.astype(np.float32)
