"""A quick-look PNG of regions over a volume: axial slices with supervoxel boundaries, kept/filtered regions
and clusters (SepaReg's separation preview, SuperCL's supervoxel preview)."""
from __future__ import annotations

import os
from collections import Counter
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["draw_regions_png"]


def _cluster_map(kept_ids: Sequence[int], cluster_of_region) -> dict[int, int] | None:
    if cluster_of_region is None:
        return None
    if isinstance(cluster_of_region, Mapping):
        return {int(k): int(v) for k, v in cluster_of_region.items()}
    vals = np.asarray(cluster_of_region).ravel()
    if vals.size != len(kept_ids):
        raise ValueError(f"cluster_of_region has {vals.size} entries for {len(kept_ids)} kept regions")
    return {int(k): int(v) for k, v in zip(kept_ids, vals)}


def draw_regions_png(image: np.ndarray, labels: np.ndarray, kept_ids: Iterable[int],
                        filtered_ids: Iterable[int] | Mapping[int, Sequence[str]], out_png: str,
                        cluster_of_region=None, n_slices: int = 3, title: str | None = None,
                        dpi: int = 100, pixel_aspect: float = 1.0, crops=None, max_crops: int = 10) -> str:
    """Write a PNG with ``n_slices`` axial slices (evenly spaced through the labelled extent).

    Each panel shows the image in grey, supervoxel boundaries (``skimage.segmentation.find_boundaries``),
    kept regions filled with a colour per region -- or per cluster when ``cluster_of_region`` is given
    ({region id: cluster} or a sequence aligned with ``kept_ids``) -- and filtered regions grey and hatched.
    The legend lists the clusters and the filter reasons (when ``filtered_ids`` is the reasons dict of
    ``filter_regions``); the title gives the counts. Renders with the Agg canvas directly (pyplot's
    backend and figure list are left alone); returns ``out_png``. ``pixel_aspect`` is the height / width of
    one pixel (row spacing / column spacing), so anisotropic slices are drawn to scale.

    Layout: per slice (zoomed to the body) the anatomy with supervoxel boundaries above and the region fill
    below; with ``crops`` ((R, 1, s, s, s) aligned with ``kept_ids``) a strip of up to ``max_crops`` region
    crops (their middle slice) at the bottom, i.e. what the encoder sees.
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

    # slices: evenly spaced through the part of the labelled extent where the body is at least a third of its
    # largest cross-section (the first and last labelled slices often hold a few voxels only)
    area = (labels > 0).reshape(labels.shape[0], -1).sum(axis=1)
    zs = np.flatnonzero(area >= max(1, area.max() / 3)) if area.any() else np.arange(labels.shape[0])
    n_slices = max(1, min(int(n_slices), zs.size))
    picks = zs[np.linspace(0, zs.size - 1, n_slices + 2)[1:-1].round().astype(int)] if zs.size > 2 else zs[:n_slices]

    shown = image[labels > 0] if (labels > 0).any() else image.ravel()  # grey window from the body
    lo, hi = (float(v) for v in np.percentile(shown, (1, 99))) if shown.size else (0.0, 1.0)
    # zoom to the body's in-plane bounding box (plus a margin), the same for every panel
    yy, xx = np.nonzero((labels > 0).any(axis=0)) if (labels > 0).any() else (np.arange(labels.shape[1]),
                                                                               np.arange(labels.shape[2]))
    m = 3
    y0, y1 = max(int(yy.min()) - m, 0), min(int(yy.max()) + 1 + m, labels.shape[1])
    x0, x1 = max(int(xx.min()) - m, 0), min(int(xx.max()) + 1 + m, labels.shape[2])
    crops = None if crops is None else np.asarray(crops)
    n_crops = 0 if crops is None else min(len(crops), max_crops)
    rows = 2 + (1 if n_crops else 0)
    panel_h = 3.6 * (y1 - y0) * pixel_aspect / max(x1 - x0, 1)
    fig = Figure(figsize=(3.6 * len(picks) + 0.4, 2 * panel_h + (1.6 if n_crops else 0) + 1.6))
    FigureCanvasAgg(fig)   # no pyplot: no global backend or figure state is touched
    grid = fig.add_gridspec(rows, 1, height_ratios=[panel_h, panel_h] + ([1.4] if n_crops else []))
    top = grid[0].subgridspec(1, len(picks)).subplots(squeeze=False)[0]
    mid = grid[1].subgridspec(1, len(picks)).subplots(squeeze=False)[0]
    for ax_b, ax_f, z in zip(top, mid, picks):
        lab = labels[z, y0:y1, x0:x1]
        img = image[z, y0:y1, x0:x1]
        # boundaries on the half-voxel grid: one thin line between neighbours instead of two voxels
        bnd = find_boundaries(lab, mode="subpixel")
        over = np.zeros(bnd.shape + (4,), np.float32)
        over[bnd] = (1.0, 0.85, 0.1, 0.95)
        h, w = lab.shape
        for ax in (ax_b, ax_f):
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest",
                      aspect=pixel_aspect)
        ax_b.imshow(over, interpolation="nearest", extent=(-0.25, w - 0.75, h - 0.75, -0.25), aspect=pixel_aspect)
        ax_f.imshow(lut[np.clip(lab, 0, nlab - 1)], interpolation="nearest", aspect=pixel_aspect)
        fm = filtered_mask_lut[np.clip(lab, 0, nlab - 1)]
        if fm.any():
            ax_f.contourf(fm.astype(float), levels=[0.5, 1.5], colors="none", hatches=["////"])
        ax_f.imshow(over * np.array([1, 1, 1, 0.5], np.float32), interpolation="nearest",
                    extent=(-0.25, w - 0.75, h - 0.75, -0.25), aspect=pixel_aspect)
        ax_b.set_title(f"slice {int(z)}: supervoxels", fontsize=9)
        ax_f.set_title(f"slice {int(z)}: " + ("clusters" if clusters is not None else "kept / filtered"), fontsize=9)
        ax_b.set_axis_off()
        ax_f.set_axis_off()
    if n_crops:
        strip = grid[2].subgridspec(1, n_crops).subplots(squeeze=False)[0]
        order = np.linspace(0, len(crops) - 1, n_crops).round().astype(int)
        for ax, r in zip(strip, order):
            c = crops[r].reshape(crops.shape[-3:])
            ax.imshow(c[c.shape[0] // 2], cmap="gray", vmin=0, vmax=float(c.max()) or 1.0, interpolation="nearest")
            rid = kept[r] if r < len(kept) else r
            ax.set_title(f"region {rid}" + (f" (c{clusters[rid]})" if clusters is not None and rid in clusters else ""),
                         fontsize=7)
            ax.set_axis_off()
        strip[0].text(0.0, 1.32, "region crops as the encoder sees them (middle slice):", transform=strip[0].transAxes,
                      ha="left", va="bottom", fontsize=8)

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
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.06 if n_crops else 0.09, top=0.86, hspace=0.25, wspace=0.05)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=dpi)
    return out_png
