"""`nnUNetv2_cl_ext_trainer_path`: the folder nnU-Net's nnUNet_extTrainer must point at."""
import importlib.util
import os


def ext_trainer_path() -> str:
    """Folder of the shim that re-exports nnunet-cl's trainers, for editable and regular installs alike."""
    spec = importlib.util.find_spec("nnunet_cl_trainers")  # locates without importing torch or nnU-Net
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nnunet_cl_trainers is not installed. Fix: pip install nnunet-cl (or pip install -e .)")
    return os.path.join(list(spec.submodule_search_locations)[0], "ext")


def main(argv=None):
    """Print the path; `export nnUNet_extTrainer=$(nnUNetv2_cl_ext_trainer_path)` makes -tr find our trainers."""
    import argparse
    argparse.ArgumentParser(prog="nnUNetv2_cl_ext_trainer_path",
                            description="Print the folder nnUNet_extTrainer must point at so that nnUNetv2_train "
                                        "-tr finds nnunet-cl's trainers: export nnUNet_extTrainer="
                                        "$(nnUNetv2_cl_ext_trainer_path)").parse_args(argv)
    try:
        print(ext_trainer_path())
    except RuntimeError as e:  # on stderr with a non-zero exit, so $(...) is empty and the shell sees the failure
        raise SystemExit(f"nnUNetv2_cl_ext_trainer_path: error: {e}")
