"""`nnUNetv2_cl_export`: a trained model folder that stock nnU-Net predicts with, extension not installed."""
import argparse
import os
import shlex
import shutil
import sys
from os.path import isdir, isfile, join

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, maybe_mkdir_p, save_json, subdirs

from nnunet_cl.checkpoints import stock_network, weight_mismatches
from nnunet_cl.paths import NnUNetCLError, dataset_name, require_env
from nnunet_cl.safe_load import load_checkpoint_file

_MODEL_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json")


def export_model(model_folder: str, output_folder: str, checkpoint_names=("checkpoint_final.pth",),
                 folds=None, overwrite: bool = False, safetensors: bool = False) -> str:
    """Copy a trained nnunet-cl model folder into `output_folder` as a plain `nnUNetTrainer` model.

    Checkpoints get trainer_name 'nnUNetTrainer' and lose the 'nnunet_cl' entry (heads, queues); their
    network weights are checked to load strictly into the stock network the plans describe. Checkpoints are
    read weights-only (nnunet_cl.safe_load), so a crafted file is refused and none of its code runs.
    A non-empty `output_folder` is refused unless `overwrite`. With `safetensors`, each exported
    `checkpoint_*.pth` gets a `checkpoint_*.safetensors` beside it holding the network weights.
    Predict with the commands `predict_commands(output_folder)` returns.
    """
    if isdir(output_folder) and os.listdir(output_folder) and not overwrite:
        raise NnUNetCLError(f"Output folder {output_folder} is not empty; exporting into it would overwrite or mix "
                            f"with what is there. Fix: choose another -o, or pass --overwrite to replace it.")
    if os.path.realpath(output_folder) == os.path.realpath(model_folder):
        raise NnUNetCLError(f"Output folder {output_folder} is the model folder itself. Fix: export to a "
                            f"separate folder with -o.")
    if overwrite and isdir(output_folder) and os.listdir(output_folder) and \
            not isfile(join(output_folder, "nnunet_cl_export.json")):
        raise NnUNetCLError(f"Output folder {output_folder} is not empty and holds no earlier export "
                            f"(nnunet_cl_export.json), so --overwrite would delete folders that are not ours (e.g. "
                            f"a trained model's fold_* checkpoints). Fix: choose an empty or new -o.")
    if not isdir(model_folder):
        raise NnUNetCLError(f"Model folder {model_folder} does not exist. Fix: train it first, or check -tr/-p/-c.")
    missing = [f for f in _MODEL_FILES if not isfile(join(model_folder, f))]
    if missing:
        raise NnUNetCLError(f"{model_folder} lacks {', '.join(missing)}: it is not a complete nnU-Net model "
                            f"folder. Fix: point -tr/-p/-c at the folder nnUNetv2_train wrote, or rerun that training.")
    plans, dataset_json = load_json(join(model_folder, "plans.json")), load_json(join(model_folder, "dataset.json"))
    present = subdirs(model_folder, prefix="fold_", join=False)
    fold_dirs = present
    if folds is not None:
        wanted = [f"fold_{f}" for f in folds]
        absent = [d for d in wanted if d not in present]
        if absent:
            raise NnUNetCLError(f"{model_folder} has no {', '.join(absent)} (it has: "
                                f"{', '.join(sorted(present)) or 'no fold folder'}). Fix: pass -f with folds that "
                                f"were trained, or leave -f out to export every fold.")
        fold_dirs = [d for d in present if d in wanted]
    sources = [(d, n) for d in fold_dirs for n in checkpoint_names if isfile(join(model_folder, d, n))]
    if not sources:
        raise NnUNetCLError(f"No {', '.join(checkpoint_names)} found in the fold folders of {model_folder} "
                            f"({', '.join(sorted(fold_dirs)) or 'none'}). Fix: let training finish, or pass -chk with "
                            f"the checkpoint name that is there (e.g. checkpoint_best.pth).")
    # every checkpoint is checked before anything is written, so a failed export leaves no partial model folder
    checked = []
    for fold_dir, ckpt_name in sources:
        src = join(model_folder, fold_dir, ckpt_name)
        checkpoint = load_checkpoint_file(src)
        net = stock_network(plans, dataset_json, checkpoint["init_args"]["configuration"])
        problems = weight_mismatches(net.state_dict(), checkpoint["network_weights"], skip_seg_layers=False)
        extra = set(checkpoint["network_weights"]) - set(net.state_dict())
        if problems or extra:
            raise NnUNetCLError(f"{src} does not hold a stock nnU-Net network:\n  " + "\n  ".join(
                problems + [f"unexpected {k}" for k in sorted(extra)]))
        checked.append((fold_dir, ckpt_name, checkpoint))
    _clear_previous_export(output_folder)
    maybe_mkdir_p(output_folder)
    for name in _MODEL_FILES:
        shutil.copy(join(model_folder, name), join(output_folder, name))
    source_trainers = set()
    for fold_dir, ckpt_name, checkpoint in checked:
        source_trainers.add(checkpoint["trainer_name"])
        checkpoint.pop("nnunet_cl", None)
        checkpoint["trainer_name"] = "nnUNetTrainer"
        maybe_mkdir_p(join(output_folder, fold_dir))
        torch.save(checkpoint, join(output_folder, fold_dir, ckpt_name))
        if safetensors:
            _save_safetensors(checkpoint["network_weights"], join(output_folder, fold_dir, ckpt_name))
    exported = {n: [d[len("fold_"):] for d, c, _ in checked if c == n] for n in checkpoint_names}
    save_json({"exported_from": model_folder, "source_trainer": ", ".join(sorted(source_trainers)),
               "folds_per_checkpoint": {n: f for n, f in exported.items() if f}},
              join(output_folder, "nnunet_cl_export.json"))
    return output_folder


def _clear_previous_export(output_folder: str) -> None:
    """--overwrite: remove what an export writes (fold folders, model files), so no fold of an earlier export
    lingers; anything else the user keeps there is left alone."""
    if not isdir(output_folder):
        return
    for name in os.listdir(output_folder):
        path = join(output_folder, name)
        if name.startswith("fold_") and isdir(path):
            shutil.rmtree(path)
        elif name in _MODEL_FILES + ("nnunet_cl_export.json",):
            os.remove(path)


def _save_safetensors(weights: dict, pth_file: str) -> str:
    """Write the network weights beside `pth_file` as `<same stem>.safetensors` (no pickle, loads anywhere)."""
    from safetensors.torch import save_file
    out = pth_file[:-len(".pth")] + ".safetensors" if pth_file.endswith(".pth") else pth_file + ".safetensors"
    # safetensors wants contiguous tensors that share no memory
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}, out)
    return out


def predict_commands(output_folder: str) -> list[str]:
    """One runnable nnUNetv2_predict_from_modelfolder line per exported checkpoint name.

    `-f` is always given (the command defaults to folds 0-4, which may not all exist), and `-chk` whenever the
    checkpoint is not checkpoint_final.pth (the command's default).
    """
    meta = load_json(join(output_folder, "nnunet_cl_export.json"))
    lines = []
    for name, folds in meta["folds_per_checkpoint"].items():
        cmd = (f"nnUNetv2_predict_from_modelfolder -m {shlex.quote(output_folder)} -i INPUT -o OUTPUT "
               f"-f {' '.join(folds)}")
        lines.append(cmd + (f" -chk {shlex.quote(name)}" if name != "checkpoint_final.pth" else ""))
    return lines


def main_export():
    parser = argparse.ArgumentParser(description="Export an nnunet-cl model so that stock nnU-Net predicts with it "
                                                 "(nnUNetv2_predict_from_modelfolder), no extension needed.")
    parser.add_argument("-d", required=True, help="dataset name or id")
    parser.add_argument("-tr", required=True, help="trainer, e.g. nnUNetTrainerSimCLR")
    parser.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("-f", nargs="+", default=None, help="folds to export (default: all trained)")
    parser.add_argument("-chk", nargs="+", default=["checkpoint_final.pth"], help="checkpoint file names")
    parser.add_argument("-o", required=True, help="output model folder (must be empty or absent)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--safetensors", action="store_true",
                        help="also write each checkpoint's network weights as <checkpoint>.safetensors")
    args = parser.parse_args()
    try:
        src = join(require_env("nnUNet_results"), dataset_name(args.d), f"{args.tr}__{args.p}__{args.c}")
        out = export_model(src, args.o, tuple(args.chk), args.f, overwrite=args.overwrite,
                           safetensors=args.safetensors)
    except NnUNetCLError as e:
        sys.exit(f"nnUNetv2_cl_export: error: {e}")
    print(f"Exported {src}\n     to {out}\nPredict with stock nnU-Net:")
    print("\n".join("  " + c for c in predict_commands(out)))
