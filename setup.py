from setuptools import find_packages, setup

setup(
    name="nnunet-cl",
    version="0.1.0",
    description="Contrastive pretraining for nnU-Net v2 when labels are scarce",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `trainers/` is installed as the package `nnunet_cl_trainers`; nnU-Net finds its classes through the
    # small shim folder `trainers/ext` (see docs/architecture.md, "Trainer discovery").
    packages=find_packages(include=["nnunet_cl", "nnunet_cl.*"]) + ["nnunet_cl_trainers"],
    package_dir={"nnunet_cl_trainers": "trainers"},
    package_data={"nnunet_cl_trainers": ["ext/*.py"]},
    install_requires=[
        "nnunetv2>=2.8,<2.9",
        "torch>=2.1",
        "numpy",
        "scipy",
        "SimpleITK",
        "batchgenerators",
        "tqdm",
        "matplotlib",
        "scikit-image",
        "scikit-learn",
        "connected-components-3d",
        "safetensors",  # nnUNetv2_cl_export --safetensors: weights without pickle
    ],
    extras_require={
        # the SAM packages too: their CLIs are tested through the real APIs (random weights, nothing downloaded)
        "test": ["pytest", "pytest-xdist", "pytorch-metric-learning", "segment-anything", "sam2"],
        "sam": ["segment-anything", "sam2"],
    },
    entry_points={
        "console_scripts": [
            "nnUNetv2_cl_ext_trainer_path=nnunet_cl.ext_path:main",
            "nnUNetv2_cl_train=nnunet_cl_trainers.launch:main",
            "nnUNetv2_cl_add_unlabeled=nnunet_cl.pool:main_add_unlabeled",
            "nnUNetv2_cl_limited_split=nnunet_cl.splits:main_limited_split",
            "nnUNetv2_cl_export=nnunet_cl.export:main_export",
            "nnUNetv2_cl_check_pretrained=nnunet_cl.checkpoints:main_check_pretrained",
            "nnUNetv2_cl_demo=nnunet_cl.demo:main",
            "nnUNetv2_cl_benchmark=nnunet_cl.bench.runner:main",
            "nnUNetv2_cl_robustness=nnunet_cl.bench.robustness:main",
            "nnUNetv2_cl_separeg_preview=nnunet_cl.methods.separeg.cli:main",
            "nnUNetv2_cl_supercl_preview=nnunet_cl.methods.supercl.cli:main",
            "nnUNetv2_cl_pretrain_plans=nnunet_cl.pretrain_plans:main_pretrain_plans",
            "nnUNetv2_cl_sam_refine=nnunet_cl.methods.polycl.sam_refine:main_sam_refine",
            "nnUNetv2_cl_scribbles_to_nnunet=nnunet_cl.methods.pclmix.scribbles:main",
            "nnUNetv2_cl_sam2_propagate=nnunet_cl.methods.polycl.sam2_propagate:main_sam2_propagate",
        ],
    },
)
