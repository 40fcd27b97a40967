"""Default SepaReg separation parameters, shared by the trainers and `nnUNetv2_cl_separeg_preview`.

The trainer copies these into attributes in ``__init__`` (variants change the attributes); the preview
command uses them unless a checkpoint tells which parameters its run used.
"""

#: keyword arguments of :func:`nnunet_cl.methods.separeg.separation.separate_case` (and of ``build_region_cache``)
SEPARATION_DEFAULTS = dict(
    n_segments=64,        # supervoxels requested per body volume
    compactness=0.1,      # SLIC compactness on intensities windowed to [0, 1]
    downsample=2,         # SLIC runs on a volume block-averaged by this factor
    crop_size=32,         # side of the cubic region crops
    min_size=None,        # voxels; None = 10 % of the expected supervoxel size (at least 8)
    min_fill_ratio=0.2,   # region voxels / bounding-box voxels must exceed this (paper: 0.2 in 2-D)
    max_elongation=15.0,  # longest / shortest bounding-box side in mm must stay below (paper: aspect 15)
)

#: name of the folder beside nnU-Net's preprocessed data that holds the region cache
CACHE_FOLDER = "nnunet_cl_separeg"
