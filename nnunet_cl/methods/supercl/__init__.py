"""SuperCL (supervoxel-guided contrastive learning, 2025; METHODS_SPEC.md §2) building blocks, 3-D adaptation.

* :mod:`.pairs` -- which samples and voxels are positives: supervoxel ids at a feature grid, ASP, CCL, positions.
* :mod:`.losses` -- ILCP (intra-image local pairs) and the masked-rows loss of IGCP and the positional term.
* :mod:`.cache` -- the supervoxels of every pool case, computed once, one ``.npz`` per case, in parallel.
* :mod:`.defaults` -- the supervoxel parameters the trainers use by default, the cache folder name.
* :mod:`.cli` -- ``nnUNetv2_cl_supercl_preview`` (one case's supervoxels as a PNG).

Nothing here knows about nnU-Net's trainer; the trainer lives in ``nnunet_cl_trainers.supercl``. Names are
imported lazily, so the numpy-only parts (cache workers) never import torch.
"""
from importlib import import_module

_EXPORTS = {
    "pairs": ["grid_labels", "average_supervoxel_map", "component_mask", "position_mask"],
    "losses": ["ilcp_loss", "masked_rows_loss"],
    "cache": ["case_supervoxels", "build_supervoxel_cache", "load_supervoxels", "n_segments_for"],
    "defaults": ["CACHE_FOLDER", "SUPERVOXEL_DEFAULTS"],
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
