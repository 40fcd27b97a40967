"""DCL-Seg (distribution-aware contrastive learning with learnable positives; METHODS_SPEC.md §6), our 3-D design
from the paper's abstract (its full text is not public; docs/methods/dclseg.md names every choice).

* :mod:`.generator` -- the learnable positive: an appearance transform that leaves geometry untouched.
* :mod:`.structure` -- local NCC (the structure penalty) and edge maps (what "keeps edges" is measured with).
* :mod:`.boundary` -- voxels near a label change, and anchor sampling that oversamples them.
* :mod:`.loss` -- the supervised voxel contrast between an image and its positive.
* :mod:`.shifts` -- the intensity shifts of the robustness benchmark (numpy).

Nothing here knows about nnU-Net's trainer; the trainer lives in ``nnunet_cl_trainers.dclseg``.
"""
from importlib import import_module

_EXPORTS = {
    "generator": ["AppearanceGenerator", "clamp_to_range"],
    "structure": ["local_ncc", "structure_penalty", "edge_map", "edge_correlation", "STRUCTURE_WEIGHT"],
    "boundary": ["boundary_mask", "sample_anchors"],
    "loss": ["two_view_supcon"],
    "shifts": ["SHIFTS", "apply_shift"],
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
