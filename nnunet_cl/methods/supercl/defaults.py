"""Default SuperCL supervoxel parameters, shared by the trainers, the cache and `nnUNetv2_cl_supercl_preview`."""

#: keyword arguments of :func:`nnunet_cl.methods.supercl.cache.case_supervoxels` (and of ``build_supervoxel_cache``)
SUPERVOXEL_DEFAULTS = dict(
    supervoxel_edge=8,    # voxels (of the preprocessed data) per supervoxel edge: n_segments = body voxels / edge^3
    compactness=0.1,      # SLIC compactness on intensities windowed to [0, 1] (skimage's 10 is for 0..100 Lab)
    downsample=2,         # SLIC runs on a volume block-averaged by this factor (the time target, see the doc)
)

#: name of the folder beside nnU-Net's preprocessed data that holds the supervoxel cache
CACHE_FOLDER = "nnunet_cl_supercl"
