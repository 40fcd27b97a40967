"""Helpers shared by the test modules: a hand-written tiny plan, and running nnU-Net's command lines."""
import os
import shutil
import subprocess
from pathlib import Path

from nnunet_cl.ext_path import ext_trainer_path

EXT_TRAINERS = Path(__file__).resolve().parent / "ext_trainers"


def tiny_plans(dataset_name: str = "Dataset997_Tiny", patch=(16, 16, 16)) -> dict:
    """nnU-Net plans for a 3-stage PlainConvUNet (features 8-16-32): trainers build from it, nothing preprocessed."""
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": "torch.nn.modules.conv.Conv3d",
                            "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                            "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    config = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
              "batch_size": 2, "patch_size": list(patch), "median_image_size_in_voxels": list(patch),
              "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"],
              "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
              "resampling_fn_seg": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": resampling,
              "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
              "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
              "resampling_fn_probabilities_kwargs": {**resampling, "order": 1}, "architecture": arch,
              "batch_dice": False}
    intensities = {"max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0, "percentile_00_5": -1.0,
                   "percentile_99_5": 1.0, "std": 1.0}
    return {"dataset_name": dataset_name, "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
            "original_median_shape_after_transp": list(patch), "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": intensities},
            "configurations": {"3d_fullres": config}, "continue_training": False}


def fake_preprocessed_folder(nnunet_env: dict, dataset_name: str) -> Path:
    """The preprocessed folder a trainer expects, with one empty .b2nd so nnU-Net infers the format."""
    folder = nnunet_env["nnUNet_preprocessed"] / dataset_name / "nnUNetPlans_3d_fullres"
    folder.mkdir(parents=True)
    (folder / "case_000.b2nd").write_bytes(b"")  # never read by these tests
    return folder


def run(cmd: list, env: dict, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a command line; on failure show the tails of its output."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
        encoding="utf-8", errors="replace", timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def cli_env(root: Path, trainer_modules=()) -> dict:
    """Environment for nnU-Net's commands: fresh nnUNet_* folders under `root`, our trainers, and a second
    nnUNet_extTrainer folder holding only the given test-trainer modules (nnU-Net imports every module of an
    extTrainer folder, so one test's trainers never depend on another's)."""
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / name).mkdir(parents=True, exist_ok=True)
        env[name] = str(root / name)
    ext = root / "ext_trainers"
    ext.mkdir(exist_ok=True)
    for module in trainer_modules:
        shutil.copy(EXT_TRAINERS / module, ext)
    env.update(nnUNet_extTrainer=os.pathsep.join([ext_trainer_path(), str(ext)]),
               nnUNet_compile="0", nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1")
    return env
