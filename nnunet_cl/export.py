"""`nnUNetv2_cl_export`: a trained model folder that stock nnU-Net predicts with, extension not installed."""
import argparse
import shutil
import sys
from os.path import isdir, isfile, join

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, maybe_mkdir_p, save_json, subdirs

from nnunet_cl.checkpoints import stock_network, weight_mismatches
from nnunet_cl.paths import NnUNetCLError, dataset_name, require_env

_MODEL_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json")


def export_model(model_folder: str, output_folder: str, checkpoint_names=("checkpoint_final.pth",),
                 folds=None) -> str:
    """Copy a trained nnunet-cl model folder into `output_folder` as a plain `nnUNetTrainer` model.

    Checkpoints get trainer_name 'nnUNetTrainer' and lose the 'nnunet_cl' entry (heads, queues); their
    network weights are checked to load strictly into the stock network the plans describe. Predict with
    `nnUNetv2_predict_from_modelfolder -m output_folder -i ... -o ...`.
    """
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
        checkpoint = torch.load(src, map_location="cpu", weights_only=False)
        net = stock_network(plans, dataset_json, checkpoint["init_args"]["configuration"])
        problems = weight_mismatches(net.state_dict(), checkpoint["network_weights"], skip_seg_layers=False)
        extra = set(checkpoint["network_weights"]) - set(net.state_dict())
        if problems or extra:
            raise NnUNetCLError(f"{src} does not hold a stock nnU-Net network:\n  " + "\n  ".join(
                problems + [f"unexpected {k}" for k in sorted(extra)]))
        checked.append((fold_dir, ckpt_name, checkpoint))
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
    save_json({"exported_from": model_folder, "source_trainer": ", ".join(sorted(source_trainers))},
              join(output_folder, "nnunet_cl_export.json"))
    return output_folder


def main_export():
    parser = argparse.ArgumentParser(description="Export an nnunet-cl model so that stock nnU-Net predicts with it "
                                                 "(nnUNetv2_predict_from_modelfolder), no extension needed.")
    parser.add_argument("-d", required=True, help="dataset name or id")
    parser.add_argument("-tr", required=True, help="trainer, e.g. nnUNetTrainerSimCLR")
    parser.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("-f", nargs="+", default=None, help="folds to export (default: all trained)")
    parser.add_argument("-chk", nargs="+", default=["checkpoint_final.pth"], help="checkpoint file names")
    parser.add_argument("-o", required=True, help="output model folder")
    args = parser.parse_args()
    try:
        src = join(require_env("nnUNet_results"), dataset_name(args.d), f"{args.tr}__{args.p}__{args.c}")
        out = export_model(src, args.o, tuple(args.chk), args.f)
    except NnUNetCLError as e:
        sys.exit(f"nnUNetv2_cl_export: error: {e}")
    print(f"Exported {src}\n     to {out}\nPredict with stock nnU-Net: nnUNetv2_predict_from_modelfolder -m {out} "
          f"-i INPUT -o OUTPUT{' -f ' + ' '.join(args.f) if args.f else ''}")
