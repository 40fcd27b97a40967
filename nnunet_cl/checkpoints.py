"""Checkpoint compatibility: which weights a stock nnU-Net network of given plans expects, and what differs."""
import argparse
import sys
from os.path import isfile, join

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_cl.paths import NnUNetCLError, load_plans, preprocessed_folder
from nnunet_cl.safe_load import load_checkpoint_file


def stock_network(plans: dict, dataset_json: dict, configuration: str) -> torch.nn.Module:
    """The network plain nnU-Net builds (and predicts with) for these plans, deep supervision off.

    The same call as nnUNetTrainer.build_network_architecture in nnU-Net 2.8.1, without importing the trainer.
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    if configuration not in pm.available_configurations:
        raise NnUNetCLError(f"Configuration {configuration!r} is not in plans {pm.plans_name} "
                            f"(available: {', '.join(pm.available_configurations)}). Fix: pass -c with one of them.")
    cm = pm.get_configuration(configuration)
    n_in = determine_num_input_channels(pm, cm, dataset_json)
    n_out = pm.get_label_manager(dataset_json).num_segmentation_heads
    return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                  cm.network_arch_init_kwargs_req_import, n_in, n_out, allow_init=True,
                                  deep_supervision=False)


def weight_mismatches(expected: dict, found: dict, skip_seg_layers: bool = True) -> list[str]:
    """Every key of `expected` (a state dict) missing from `found` or with another shape, one line each.

    With skip_seg_layers, keys containing '.seg_layers.' are not compared: nnU-Net's -pretrained_weights
    re-initialises them, so a checkpoint with another number of classes still loads.
    """
    problems = []
    for key, value in expected.items():
        if skip_seg_layers and ".seg_layers." in key:
            continue
        if key not in found:
            problems.append(f"missing   {key}  (expected shape {tuple(value.shape)})")
        elif tuple(found[key].shape) != tuple(value.shape):
            problems.append(f"shape     {key}  expected {tuple(value.shape)}, checkpoint has {tuple(found[key].shape)}")
    return problems


def check_pretrained(checkpoint_file: str, dataset: str | int, configuration: str,
                     plans_identifier: str = "nnUNetPlans") -> list[str]:
    """Mismatches that would make `nnUNetv2_train ... -pretrained_weights checkpoint_file` fail."""
    if not isfile(checkpoint_file):
        raise NnUNetCLError(f"Checkpoint {checkpoint_file} does not exist. Fix: give the path of a "
                            f"checkpoint_final.pth (or checkpoint_best.pth) that a pretraining run wrote.")
    folder = preprocessed_folder(dataset)
    _, plans = load_plans(folder, plans_identifier, dataset)
    net = stock_network(plans, load_json(join(folder, "dataset.json")), configuration)
    checkpoint = load_checkpoint_file(checkpoint_file)  # refuses pickled code before anything runs
    return weight_mismatches(net.state_dict(), checkpoint.get("network_weights", checkpoint))


def main_check_pretrained():
    parser = argparse.ArgumentParser(description="Check that a pretrained checkpoint fits a dataset's plans "
                                                 "before nnUNetv2_train -pretrained_weights; lists every "
                                                 "mismatched key and shape.")
    parser.add_argument("-d", required=True, help="target dataset name or id")
    parser.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-pretrained_weights", required=True, help="checkpoint file")
    args = parser.parse_args()
    try:
        problems = check_pretrained(args.pretrained_weights, args.d, args.c, args.p)
    except NnUNetCLError as e:
        sys.exit(f"nnUNetv2_cl_check_pretrained: error: {e}")
    if not problems:
        print(f"OK: {args.pretrained_weights} fits {args.d} {args.c} ({args.p}); seg layers are re-initialised.")
        return
    print(f"{args.pretrained_weights} does NOT fit {args.d} {args.c} ({args.p}): {len(problems)} mismatches")
    print("\n".join("  " + p for p in problems))
    sys.exit("Fix: pretrain with the target dataset's own plans (same -p and -c as the fine-tuning run), e.g. "
             "ingest the unlabeled data into the target dataset's pool with nnUNetv2_cl_add_unlabeled and pretrain "
             "there, so both networks are built from identical plans.")
