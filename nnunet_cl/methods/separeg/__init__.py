"""SepaReg (Wang et al., AAAI 2022) building blocks in plain numpy/torch, 3-D adaptation (METHODS_SPEC.md §3).

* :mod:`.separation` -- structure-aware image separation: body mask, 3-D SLIC supervoxels, shape filters,
  per-region crops (``separate_case`` runs it all).
* :mod:`.cache` -- separation of many cases once, one ``.npz`` per case, in parallel.
* :mod:`.losses` -- SimSiam / BYOL losses, EMA update, IID distillation losses, MLP heads.
* :mod:`.clustering` -- k-means of region embeddings, per-expert index blocks.
* :mod:`.defaults` -- the separation parameters the trainers use by default, the cache folder name.
* :mod:`.cli` -- ``nnUNetv2_cl_separeg_preview`` (one case's separation as a PNG).

Nothing here knows about nnU-Net's trainer; the trainer lives in ``nnunet_cl_trainers``.
Names are imported lazily, so the numpy-only parts (separation, cache workers) never import torch.
"""
from importlib import import_module

_EXPORTS = {
    "separation": ["FILTER_REASONS", "RegionProps", "body_mask", "filter_regions", "region_bbox_crop",
                   "region_crops", "region_properties", "separate_case", "supervoxels", "window_intensities"],
    "losses": ["byol_loss", "distill_cosine_loss", "distill_kl_loss", "ema_update", "mlp_head", "negative_cosine",
               "simsiam_loss"],
    "clustering": ["expert_blocks", "kmeans_regions"],
    "cache": ["PreprocessedCaseLoader", "RegionIndex", "build_region_cache", "load_region_cache"],
    "defaults": ["CACHE_FOLDER", "SEPARATION_DEFAULTS"],
    "cli": ["preview"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
