"""Supervoxels of a 3-D volume, shared by every method that needs regions (SepaReg's separation, SuperCL's
pseudo masks), as plain numpy functions.

* :func:`body_mask` -- threshold, keep the largest connected component, fill holes.
* :func:`window_intensities` -- clip to a window and rescale to [0, 1] (body percentiles by default).
* :func:`supervoxels` -- 3-D SLIC (scikit-image) at reduced resolution inside the body, nearest-upsampled
  back, every body voxel labelled, each label one connected component.
"""
from __future__ import annotations

from typing import Sequence

import cc3d
import numpy as np
from scipy import ndimage

__all__ = ["body_mask", "window_intensities", "supervoxels", "upsample_nearest", "block_mean"]

def _as_volume(image: np.ndarray, name: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"{name} must be a 3-D array (z, y, x); got shape {image.shape}. "
                         f"For nnU-Net data (c, z, y, x) pass one channel, e.g. data[0].")
    return image


def _spacing3(spacing: Sequence[float] | None) -> np.ndarray:
    if spacing is None:
        return np.ones(3)
    sp = np.asarray(spacing, dtype=np.float64).ravel()
    if sp.shape != (3,) or np.any(sp <= 0):
        raise ValueError(f"spacing must be three positive numbers (z, y, x); got {spacing!r}")
    return sp


# ----------------------------------------------------------------------------------------------- body mask
def body_mask(image: np.ndarray, threshold: float | None = None, rel_eps: float = 0.01) -> np.ndarray:
    """Foreground (body) mask: ``image > threshold``, largest connected component, holes filled.

    Args:
        image: 3-D array (z, y, x).
        threshold: intensity threshold. ``None`` (default) picks one relative to the volume's minimum,
            ``min + rel_eps * (p99.5 - min)``: in nnU-Net's z-scored data the air around the body sits at
            (or near) the minimum, so anything clearly above it is body.
        rel_eps: the fraction of the robust intensity range used when ``threshold`` is None.

    Returns:
        bool array of the image's shape; all False when nothing exceeds the threshold. Holes are filled in
        3-D and then slice by slice along axis 0 (axial), which also closes cavities open at the volume's
        top or bottom (e.g. lungs connected to the trachea).
    """
    image = _as_volume(image)
    if threshold is None:
        vmin = float(image.min())
        vhigh = float(np.percentile(image[::2, ::2, ::2], 99.5))
        threshold = vmin + rel_eps * max(vhigh - vmin, 0.0)
    fg = image > threshold
    if not fg.any():
        return np.zeros(image.shape, dtype=bool)
    cc, n = cc3d.connected_components(fg, connectivity=26, return_N=True)
    if n > 1:
        counts = np.bincount(cc.ravel())
        counts[0] = 0
        fg = cc == int(np.argmax(counts))
    fg = ndimage.binary_fill_holes(fg)
    for z in range(fg.shape[0]):
        if fg[z].any():
            fg[z] = ndimage.binary_fill_holes(fg[z])
    return fg


# ----------------------------------------------------------------------------------------------- windowing
def window_intensities(image: np.ndarray, mask: np.ndarray | None = None,
                       window: tuple[float, float] | None = None,
                       percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Clip ``image`` to a window and rescale it to [0, 1] (float32).

    ``window=(lo, hi)`` in the image's own units; by default the window is the given percentiles of the
    voxels inside ``mask`` (the whole volume without a mask). Voxels outside ``mask`` are set to 0.
    A constant image maps to 0.
    """
    image = _as_volume(image).astype(np.float32, copy=False)
    if window is None:
        vals = image[mask] if mask is not None and mask.any() else image.ravel()
        if vals.size > 2_000_000:  # percentiles of a deterministic subsample are plenty
            vals = vals[:: vals.size // 1_000_000]
        lo, hi = (float(v) for v in np.percentile(vals, percentiles))
    else:
        lo, hi = float(window[0]), float(window[1])
    if hi <= lo:
        out = np.zeros(image.shape, np.float32)
    else:
        out = np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    if mask is not None:
        out[~mask] = 0.0
    return out


# ----------------------------------------------------------------------------------------------- supervoxels
def block_mean(arr: np.ndarray, d: int) -> np.ndarray:
    """Mean over d x d x d blocks; the volume is edge-padded up to a multiple of d."""
    if d == 1:
        return arr.astype(np.float32, copy=True)
    pad = [(0, (-s) % d) for s in arr.shape]
    if any(p[1] for p in pad):
        arr = np.pad(arr, pad, mode="edge")
    z, y, x = (s // d for s in arr.shape)
    return arr.reshape(z, d, y, d, x, d).mean(axis=(1, 3, 5), dtype=np.float32)


def upsample_nearest(small: np.ndarray, shape: Sequence[int], d: int) -> np.ndarray:
    """Inverse of :func:`block_mean`'s grid: full-resolution voxel i takes block i // d."""
    if d == 1:
        return small.copy()
    idx = [np.minimum(np.arange(s) // d, small.shape[a] - 1) for a, s in enumerate(shape)]
    return small[np.ix_(*idx)]


def _merge_small_fragments(labels: np.ndarray, max_size: int, connectivity: int = 26) -> np.ndarray:
    """Merge components smaller than ``max_size`` voxels into the touching label with the largest contact.

    ``labels`` must already have one connected component per label; then the union of a fragment and a
    label it touches is again one component, so connectivity is preserved. Fragments are visited smallest
    first; sizes and bounding boxes are updated as labels grow, so a fragment that has absorbed others is
    moved whole (or kept once it is large enough). Fragments without a labelled neighbour keep their own
    label. In place; returns ``labels``.
    """
    if max_size <= 1:
        return labels
    counts = np.bincount(labels.ravel()).astype(np.int64)
    small = np.flatnonzero(counts[1:] < max_size) + 1
    if small.size == 0:
        return labels
    small = small[np.argsort(counts[small], kind="stable")]
    lo = np.zeros((counts.size, 3), np.int64)
    hi = np.zeros((counts.size, 3), np.int64)
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is not None:
            lo[i] = [s.start for s in sl]
            hi[i] = [s.stop for s in sl]
    shape = np.array(labels.shape)
    struct = ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])
    for lab in small:
        if counts[lab] == 0 or counts[lab] >= max_size:
            continue
        a, b = np.maximum(lo[lab] - 1, 0), np.minimum(hi[lab] + 1, shape)
        sub = labels[a[0]:b[0], a[1]:b[1], a[2]:b[2]]
        comp = sub == lab
        ring = ndimage.binary_dilation(comp, struct) & ~comp
        neigh = sub[ring]
        neigh = neigh[neigh > 0]
        if neigh.size == 0:
            continue
        vals, cnt = np.unique(neigh, return_counts=True)
        tgt = vals[np.argmax(cnt)]  # ties -> the smallest label id (np.unique is sorted)
        sub[comp] = tgt
        counts[tgt] += counts[lab]
        counts[lab] = 0
        lo[tgt] = np.minimum(lo[tgt], lo[lab])
        hi[tgt] = np.maximum(hi[tgt], hi[lab])
    return labels


def supervoxels(image: np.ndarray, mask: np.ndarray, n_segments: int = 64, compactness: float = 0.1,
                spacing: Sequence[float] = (1.0, 1.0, 1.0), downsample: int = 2, sigma: float = 0.0,
                max_num_iter: int = 10, window: tuple[float, float] | None = None,
                min_fragment_fraction: float = 0.25, connectivity: int = 26) -> np.ndarray:
    """3-D SLIC supervoxels inside ``mask``.

    The image is windowed to [0, 1] (:func:`window_intensities`; ``window=None`` uses the body's
    0.5/99.5 percentiles), block-averaged by ``downsample`` along every axis, segmented with
    ``skimage.segmentation.slic(..., channel_axis=None, mask=..., spacing=spacing * downsample)`` and
    nearest-upsampled back. ``channel_axis=None`` matters: with skimage's default (-1) a volume is read
    as a 2-D multichannel image.

    skimage's SLIC with a mask does not always return connected labels (on a real abdominal CT, 65 labels
    were 270 6-connected pieces), so labels are split into connected components (``connectivity`` 26,
    18 or 6; the body mask is one 26-connected component, so with 26 every fragment has a neighbour to
    join) and every component smaller than ``min_fragment_fraction`` x the expected supervoxel size
    (body voxels / n_segments) is merged into the neighbour it touches most -- once on the coarse grid
    and once after upsampling, where voxels outside ``mask`` are set to 0 and body voxels the coarse mask
    missed take the nearest label. Labels are renumbered 1..K.

    Returns:
        int32 array of the image's shape, 0 outside ``mask`` and 1..K inside, every label one connected
        component (26-connected by default). Fragments without any labelled neighbour (possible only
        when ``mask`` has several components, or with connectivity 6) stay separate labels.
    """
    from skimage.segmentation import slic

    image = _as_volume(image)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != image.shape:
        raise ValueError(f"mask shape {mask.shape} != image shape {image.shape}")
    d = int(downsample)
    if d < 1:
        raise ValueError(f"downsample must be >= 1; got {downsample}")
    sp = _spacing3(spacing)
    if not mask.any():
        return np.zeros(image.shape, dtype=np.int32)

    img01 = window_intensities(image, mask, window=window)
    small_img = block_mean(img01, d)
    small_mask = block_mean(mask.astype(np.float32), d) >= 0.5
    if not small_mask.any():  # body thinner than one coarse voxel: fall back to any overlap
        small_mask = block_mean(mask.astype(np.float32), d) > 0
    small = slic(small_img, n_segments=int(n_segments), compactness=float(compactness),
                 max_num_iter=int(max_num_iter), sigma=float(sigma), spacing=sp * d, mask=small_mask,
                 channel_axis=None, start_label=1, enforce_connectivity=True)
    if small.shape != small_img.shape:  # guards against the 2-D multichannel reading
        raise RuntimeError(f"slic returned shape {small.shape} for a {small_img.shape} volume")
    expected = small_mask.sum() / max(int(n_segments), 1)  # coarse voxels per supervoxel
    small = cc3d.connected_components(small, connectivity=connectivity, out_dtype=np.uint32).astype(np.int32)
    small = _merge_small_fragments(small, int(np.ceil(min_fragment_fraction * expected)), connectivity)

    labels = upsample_nearest(small, image.shape, d)
    labels[~mask] = 0
    missing = mask & (labels == 0)
    if missing.any():
        # nearest labelled voxel (physical distance); only the coarse/fine mask disagreement is filled
        _, inds = ndimage.distance_transform_edt(labels == 0, sampling=sp, return_indices=True)
        labels[missing] = labels[tuple(i[missing] for i in inds)]
    labels = cc3d.connected_components(labels, connectivity=connectivity, out_dtype=np.uint32).astype(np.int32)
    labels = _merge_small_fragments(labels, int(np.ceil(min_fragment_fraction * expected * d ** 3)), connectivity)
    uniq, inv = np.unique(labels, return_inverse=True)  # renumber 1..K (0 stays 0: it is always present
    out = inv.reshape(labels.shape).astype(np.int32)    # outside the body, or absent when mask is full)
    if uniq[0] != 0:
        out += 1
    return out
