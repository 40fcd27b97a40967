"""A quick-look PNG of a SepaReg separation: axial slices with supervoxels, kept/filtered regions, clusters."""
from __future__ import annotations

import os
from collections import Counter
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["draw_separation_png"]


def _cluster_map(kept_ids: Sequence[int], cluster_of_region) -> dict[int, int] | None:
    if cluster_of_region is None:
        return None
    if isinstance(cluster_of_region, Mapping):
        return {int(k): int(v) for k, v in cluster_of_region.items()}
    vals = np.asarray(cluster_of_region).ravel()
    if vals.size != len(kept_ids):
        raise ValueError(f"cluster_of_region has {vals.size} entries for {len(kept_ids)} kept regions")
    return {int(k): int(v) for k, v in zip(kept_ids, vals)}


def draw_separation_png(image: np.ndarray, labels: np.ndarray, kept_ids: Iterable[int],
                        filtered_ids: Iterable[int] | Mapping[int, Sequence[str]], out_png: str,
                        cluster_of_region=None, n_slices: int = 3, title: str | None = None,
                        dpi: int = 100) -> str:
    """Write a PNG with ``n_slices`` axial slices (evenly spaced through the labelled extent).

    Each panel shows the image in grey, supervoxel boundaries (``skimage.segmentation.find_boundaries``),
    kept regions filled with a colour per region -- or per cluster when ``cluster_of_region`` is given
    ({region id: cluster} or a sequence aligned with ``kept_ids``) -- and filtered regions grey and hatched.
    The legend lists the clusters and the filter reasons (when ``filtered_ids`` is the reasons dict of
    ``filter_regions``); the title gives the counts. Renders with the Agg canvas directly (pyplot's
    backend and figure list are left alone); returns ``out_png``.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from skimage.segmentation import find_boundaries

    image = np.asarray(image, dtype=np.float32)
    labels = np.asarray(labels)
    if image.ndim != 3 or labels.shape != image.shape:
        raise ValueError(f"image and labels must be 3-D arrays of one shape; got {image.shape}, {labels.shape}")
    kept = [int(i) for i in kept_ids]
    reasons = {int(k): tuple(v) for k, v in filtered_ids.items()} if isinstance(filtered_ids, Mapping) else None
    filtered = sorted(reasons) if reasons is not None else sorted(int(i) for i in filtered_ids)
    clusters = _cluster_map(kept, cluster_of_region)

    # colour lookup per label: RGBA, 0 = transparent
    nlab = int(labels.max()) + 1 if labels.size else 1
    lut = np.zeros((nlab, 4), np.float32)
    tab = matplotlib.colormaps["tab20"]
    cmap_clusters = matplotlib.colormaps["tab10"]
    for i in kept:
        if 0 < i < nlab:
            rgb = cmap_clusters(clusters[i] % 10)[:3] if clusters is not None and i in clusters else tab(i % 20)[:3]
            lut[i] = (*rgb, 0.45)
    for i in filtered:
        if 0 < i < nlab:
            lut[i] = (0.55, 0.55, 0.55, 0.6)
    filtered_mask_lut = np.zeros(nlab, bool)
    filtered_mask_lut[[i for i in filtered if 0 < i < nlab]] = True

    zs = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    if zs.size == 0:
        zs = np.arange(labels.shape[0])
    n_slices = max(1, min(int(n_slices), zs.size))
    picks = zs[np.linspace(0, zs.size - 1, n_slices + 2)[1:-1].round().astype(int)] if zs.size > 2 else zs[:n_slices]

    shown = image[labels > 0] if (labels > 0).any() else image.ravel()  # grey window from the body
    lo, hi = (float(v) for v in np.percentile(shown, (1, 99))) if shown.size else (0.0, 1.0)
    fig = Figure(figsize=(4 * len(picks), 4.6))   # no pyplot: no global backend or figure state is touched
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(picks), squeeze=False)
    for ax, z in zip(axes[0], picks):
        lab = labels[z]
        ax.imshow(image[z], cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
        ax.imshow(lut[np.clip(lab, 0, nlab - 1)], interpolation="nearest")
        fm = filtered_mask_lut[np.clip(lab, 0, nlab - 1)]
        if fm.any():
            ax.contourf(fm.astype(float), levels=[0.5, 1.5], colors="none", hatches=["////"])
        # boundaries on the half-voxel grid: one thin line between neighbours instead of two voxels
        bnd = find_boundaries(lab, mode="subpixel")
        over = np.zeros(bnd.shape + (4,), np.float32)
        over[bnd] = (1.0, 1.0, 0.2, 0.9)
        h, w = lab.shape
        ax.imshow(over, interpolation="nearest", extent=(-0.25, w - 0.75, h - 0.75, -0.25))
        ax.set_title(f"z = {int(z)}", fontsize=9)
        ax.set_axis_off()

    handles = []
    if clusters is not None:
        sizes = Counter(clusters[i] for i in kept if i in clusters)
        for c in sorted(sizes):
            handles.append(Patch(facecolor=cmap_clusters(c % 10), alpha=0.6, label=f"cluster {c} ({sizes[c]})"))
    else:
        handles.append(Patch(facecolor=tab(1), alpha=0.6, label=f"kept ({len(kept)})"))
    if reasons is not None and reasons:
        why = Counter(r for rs in reasons.values() for r in rs)
        for r in sorted(why):
            handles.append(Patch(facecolor="0.55", hatch="////", label=f"filtered: {r} ({why[r]})"))
    elif filtered:
        handles.append(Patch(facecolor="0.55", hatch="////", label=f"filtered ({len(filtered)})"))
    handles.append(Patch(facecolor="none", edgecolor=(1.0, 1.0, 0.2), label="supervoxel boundary"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    n_sv = int(np.unique(labels[labels > 0]).size)
    head = title + "\n" if title else ""
    fig.suptitle(f"{head}{n_sv} supervoxels: {len(kept)} kept, {len(filtered)} filtered"
                 + (f", {len(set(clusters.values()))} clusters" if clusters else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.93))
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=dpi)
    return out_png
