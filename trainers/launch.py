"""`nnUNetv2_cl_train`: nnUNetv2_train's arguments, alone or as one of several processes started by torchrun.

nnU-Net's own `-num_gpus N` spawns its ranks itself and needs CUDA (NCCL). For CPU machines and clusters,
torchrun starts the processes and this command joins them to a process group (gloo on CPU, NCCL on GPU):

    torchrun --standalone --nproc_per_node 2 --no-python \\
        nnUNetv2_cl_train 4 3d_fullres 0 -tr nnUNetTrainerSimCLR -device cpu
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --no-python \\
        nnUNetv2_cl_train 4 3d_fullres 0 -tr nnUNetTrainerSimCLR -device cuda

Without torchrun it runs one process, like nnUNetv2_train. `-pretrained_weights` is read with the weights-only
loader (nnunet_cl.safe_load), which nnU-Net 2.8.1's own loader is not.
"""
import argparse
import multiprocessing
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from nnunet_cl.checkpoints import weight_mismatches
from nnunet_cl.paths import NnUNetCLError
from nnunet_cl.safe_load import load_checkpoint_file


DIST_TIMEOUT_H = 4  # torch's default is 10 min (NCCL) / 30 min (gloo)


def load_pretrained_weights_safely(network: torch.nn.Module, fname: str) -> None:
    """nnU-Net's -pretrained_weights (every key but the seg layers, same shapes), read weights only."""
    checkpoint = load_checkpoint_file(fname, map_location="cpu")
    found = checkpoint.get("network_weights", checkpoint)
    mod = getattr(network, "module", network)
    mod = getattr(mod, "_orig_mod", mod)
    own = mod.state_dict()
    problems = weight_mismatches(own, found)
    if problems:
        raise NnUNetCLError(f"{fname} does not fit this network ({len(problems)} mismatches, first: {problems[0]}). "
                            f"Fix: pretrain with the same plans and configuration (nnUNetv2_cl_check_pretrained "
                            f"lists every mismatch).")
    own.update({k: v for k, v in found.items() if k in own and ".seg_layers." not in k})
    mod.load_state_dict(own)
    print(f"Loaded pretrained weights from {fname} (all but the segmentation layers)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnUNetv2_cl_train", description=__doc__.split("\n\n")[0] + " Start several "
                                "processes with torchrun (see docs/user_guide.md, 'Several processes').")
    p.add_argument("dataset_name_or_id")
    p.add_argument("configuration")
    p.add_argument("fold")
    p.add_argument("-tr", default="nnUNetTrainer", help="trainer class. Default: nnUNetTrainer")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier. Default: nnUNetPlans")
    p.add_argument("-pretrained_weights", default=None, help="checkpoint to start from (not with --c)")
    p.add_argument("--npz", action="store_true", help="save softmax of the final validation")
    p.add_argument("--c", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--val", action="store_true", help="only run the final validation")
    p.add_argument("--val_best", action="store_true", help="validate with checkpoint_best.pth")
    p.add_argument("--disable_checkpointing", action="store_true")
    p.add_argument("-device", default="cuda", choices=("cuda", "cpu"), help="Default: cuda")
    return p


def _int_fold(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        sys.exit(f"nnUNetv2_cl_train: error: fold {text!r} is neither an integer nor 'all'. Fix: e.g. 0.")


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.c and args.pretrained_weights:
        sys.exit("nnUNetv2_cl_train: error: --c continues a run; -pretrained_weights starts one. Fix: pass only one.")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("nnUNetv2_cl_train: error: -device cuda but torch sees no GPU. Fix: pass -device cpu.")
    if world > 1:
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # long work of rank 0 (SepaReg's separation of a large pool) must not time out the others' wait
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo", timeout=timedelta(hours=DIST_TIMEOUT_H))
    if args.device == "cpu":  # the machine's cores shared by the processes on it
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, multiprocessing.cpu_count() // per_node))
    else:
        torch.set_num_threads(1)
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    fold = args.fold if args.fold == "all" else _int_fold(args.fold)
    try:
        trainer = get_trainer_from_args(args.dataset_name_or_id, args.configuration, fold, args.tr, args.p,
                                        args.c, device=torch.device(args.device))
        if args.disable_checkpointing:
            trainer.disable_checkpointing = True
        if args.pretrained_weights:
            trainer.initialize()
            load_pretrained_weights_safely(trainer.network, args.pretrained_weights)
        else:
            maybe_load_checkpoint(trainer, args.c, args.val)
        if not args.val:
            trainer.run_training()
        if args.val_best:
            trainer.load_checkpoint(os.path.join(trainer.output_folder, "checkpoint_best.pth"))
        trainer.perform_actual_validation(args.npz)
    except NnUNetCLError as e:
        sys.exit(f"nnUNetv2_cl_train: error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
