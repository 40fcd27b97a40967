"""A pretraining plans variant: same network, smaller patch, larger batch (`nnUNetv2_cl_pretrain_plans`).

Instance-level contrastive losses (PolyCL, SimCLR) need many patches per step, but nnU-Net's 3d_fullres plan
gives a batch of 2 large patches. nnU-Net's own plans mechanism solves this without touching the network: a
configuration may `inherits_from` another one and override single keys (nnU-Net's plans documentation uses
`3d_fullres_bs40` as its example). This module adds such a configuration to the dataset's plans file::

    "3d_fullres_clpretrain": {"inherits_from": "3d_fullres", "patch_size": [64, 64, 64], "batch_size": 8}

Only patch_size and batch_size are overridden, so the data identifier (the preprocessed folder), spacing,
normalisation and the architecture are the parent's. The U-Net is fully convolutional, so a checkpoint of
`nnUNetv2_train D 3d_fullres_clpretrain F -tr nnUNetTrainerPolyCLPretrain` loads with `-pretrained_weights`
into `nnUNetv2_train D 3d_fullres F` unchanged. The patch must stay divisible by the network's total
downsampling per axis (the product of its pooling strides); the default is half the parent's patch per axis,
rounded to that multiple.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from nnunet_cl.paths import NnUNetCLError, dataset_name, load_plans, preprocessed_folder, save_json_atomic

__all__ = ["SUFFIX", "network_divisor", "reduced_patch_size", "check_bottleneck", "pretrain_configuration",
           "add_pretrain_configuration", "write_pretrain_plans", "main_pretrain_plans"]

SUFFIX = "_clpretrain"
DEFAULT_BATCH = 8


def network_divisor(configuration_manager) -> list[int]:
    """Total downsampling of the configuration's U-Net per axis (product of its pooling strides).

    Every patch fed to the network must be a multiple of this per axis (nnU-Net plans patches that way).
    """
    kwargs = configuration_manager.network_arch_init_kwargs or {}
    strides = kwargs.get("strides")
    if strides is None:  # plans written before the arch_kwargs layout
        strides = configuration_manager.configuration.get("pool_op_kernel_sizes")
    if strides is None:
        raise NnUNetCLError("The configuration names no pooling strides (arch_kwargs['strides']); cannot tell which "
                            "patch sizes its network accepts.")
    dim = len(configuration_manager.patch_size)
    out = np.ones(dim, dtype=np.int64)
    for s in strides:
        s = [s] * dim if isinstance(s, (int, np.integer)) else list(s)
        out *= np.asarray(s, dtype=np.int64)
    return [int(v) for v in out]


def reduced_patch_size(patch_size, divisor, factor: float = 0.5) -> list[int]:
    """`factor` times the patch per axis, rounded to the nearest multiple of `divisor`, at most the original patch.

    Where the original patch has at least two multiples of `divisor` on an axis, so does the result: nnU-Net's
    bottleneck ends in instance normalisation, which fails on a single voxel, and the embedding pools that
    bottleneck, so it keeps at least 2 voxels per axis (SepaReg's feature stage follows the same rule).
    OpenKBP's 64^3 patch with stride 32 would halve to 32^3, a 1-voxel bottleneck, so it stays 64^3.
    """
    out = []
    for p, d in zip(patch_size, divisor):
        p, d = int(p), int(d)
        k = max(2 if p >= 2 * d else 1, int(np.floor(p * factor / d + 0.5)))
        out.append(min(p, k * d) if p >= d else p)
    return out


def _check_patch(patch, divisor, source_patch) -> list[int]:
    patch = [int(p) for p in patch]
    if len(patch) != len(divisor):
        raise NnUNetCLError(f"--patch has {len(patch)} values but the configuration is {len(divisor)}-D "
                            f"(its patch is {list(source_patch)}). Fix: give one value per axis.")
    bad = [(p, d) for p, d in zip(patch, divisor) if p <= 0 or p % d]
    if bad:
        fix = [max(d, int(round(p / d)) * d) for p, d in zip(patch, divisor)]
        raise NnUNetCLError(f"Patch {patch} is not divisible by the network's downsampling {divisor} per axis. "
                            f"Fix: use multiples of it, e.g. --patch {' '.join(map(str, fix))}.")
    check_bottleneck(patch, divisor)
    return patch


def check_bottleneck(patch, divisor, what: str = "--patch") -> None:
    """Refuse a patch whose bottleneck is a single voxel: its instance normalisation fails in training.

    what: how the user set the patch, named in the fix (a CLI option or a trainer attribute).
    """
    if all(int(p) // int(d) <= 1 for p, d in zip(patch, divisor)):
        fix = [2 * int(divisor[0])] + [int(d) for d in list(divisor)[1:]]
        raise NnUNetCLError(f"Patch {list(patch)} leaves one voxel at the network's bottleneck (downsampling "
                            f"{list(divisor)}), where instance normalisation fails. Fix: two multiples on at least "
                            f"one axis, e.g. {what} {' '.join(map(str, fix))}.")


def pretrain_configuration(plans: dict, source: str = "3d_fullres", patch=None,
                           batch: int = DEFAULT_BATCH) -> dict:
    """The plans entry of the pretraining variant of `source` (not yet added to `plans`)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(plans)
    if source not in pm.available_configurations and source not in plans.get("configurations", {}):
        raise NnUNetCLError(f"Configuration {source!r} is not in the plans (available: "
                            f"{list(plans.get('configurations', {}))}). Fix: pick one with -c.")
    cm = pm.get_configuration(source)
    divisor = network_divisor(cm)
    patch = reduced_patch_size(cm.patch_size, divisor) if patch is None else _check_patch(patch, divisor, cm.patch_size)
    if int(batch) < 2:
        raise NnUNetCLError(f"--batch {batch}: contrastive pretraining needs at least 2 patches per step "
                            f"(PolyCL: at least 4, 8 or more recommended).")
    return {"inherits_from": source, "patch_size": patch, "batch_size": int(batch)}


def add_pretrain_configuration(plans: dict, source: str = "3d_fullres", name: str | None = None, patch=None,
                               batch: int = DEFAULT_BATCH, overwrite: bool = False) -> tuple[str, dict, bool]:
    """Add the pretraining variant of `source` to `plans` (in place).

    Returns (name, entry, changed). An identical existing entry is left alone (changed False); a different
    one is replaced only with `overwrite`.
    """
    name = name or source + SUFFIX
    if name == source:
        raise NnUNetCLError(f"The variant cannot be named like its source configuration ({source}): it would "
                            f"replace it. Fix: choose another -n, or leave -n out for {source}{SUFFIX}.")
    entry = pretrain_configuration(plans, source, patch, batch)
    configurations = plans.setdefault("configurations", {})
    existing = configurations.get(name)
    if existing == entry:
        return name, entry, False
    if existing is not None and not overwrite:
        raise NnUNetCLError(f"The plans already have a configuration {name!r} ({existing}) that differs from "
                            f"{entry}. Fix: pass --overwrite to replace it, or choose another name with -n.")
    configurations[name] = entry
    return name, entry, True


def write_pretrain_plans(dataset: str | int, plans_identifier: str = "nnUNetPlans", source: str = "3d_fullres",
                         patch=None, batch: int = DEFAULT_BATCH, name: str | None = None,
                         overwrite: bool = False) -> dict:
    """Add the variant to nnUNet_preprocessed/<dataset>/<plans_identifier>.json, the file nnUNetv2_train reads.

    Returns {'plans_file', 'name', 'entry', 'changed', 'source_patch', 'source_batch', 'divisor'}.
    """
    folder = preprocessed_folder(dataset)
    plans_file, plans = load_plans(folder, plans_identifier, dataset)
    name, entry, changed = add_pretrain_configuration(plans, source, name, patch, batch, overwrite)
    if changed:
        save_json_atomic(plans, plans_file)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    cm = PlansManager(plans).get_configuration(source)
    return {"plans_file": plans_file, "name": name, "entry": entry, "changed": changed,
            "source_patch": [int(p) for p in cm.patch_size], "source_batch": int(cm.batch_size),
            "divisor": network_divisor(cm), "dataset": dataset_name(dataset), "plans_identifier": plans_identifier}


def main_pretrain_plans(argv: list[str] | None = None) -> None:
    """Entry point of nnUNetv2_cl_pretrain_plans."""
    p = argparse.ArgumentParser(
        prog="nnUNetv2_cl_pretrain_plans",
        description="Add a pretraining configuration to a dataset's plans: it inherits everything (preprocessed "
                    "data, network) from -c and overrides only patch and batch size, so contrastive pretraining "
                    "sees many small patches per step and its checkpoint loads into -c with -pretrained_weights.")
    p.add_argument("-d", required=True, help="dataset name or id (planned and preprocessed)")
    p.add_argument("-c", default="3d_fullres", help="configuration to derive from. Default: 3d_fullres")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier. Default: nnUNetPlans")
    p.add_argument("-n", default=None, help="name of the new configuration. Default: <c>" + SUFFIX)
    p.add_argument("--patch", type=int, nargs="+", default=None,
                   help="patch size, one value per axis, multiples of the network's downsampling. Default: half "
                        "of -c's patch per axis, rounded to such a multiple")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help=f"batch size. Default: {DEFAULT_BATCH}")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, different configuration -n")
    args = p.parse_args(argv)
    try:
        r = write_pretrain_plans(args.d, args.p, args.c, args.patch, args.batch, args.n, args.overwrite)
    except NnUNetCLError as e:
        raise SystemExit(f"nnUNetv2_cl_pretrain_plans: error: {e}")
    what = "Added" if r["changed"] else "Already present"
    print(f"{what}: configuration {r['name']!r} in {r['plans_file']}\n"
          f"  {json.dumps(r['entry'])}\n"
          f"  {args.c}: patch {r['source_patch']}, batch {r['source_batch']}; network downsampling {r['divisor']}\n"
          f"Pretrain:  nnUNetv2_train {args.d} {r['name']} FOLD -tr nnUNetTrainerPolyCLPretrain"
          + ("" if args.p == "nnUNetPlans" else f" -p {args.p}") + "\n"
          f"Fine-tune: nnUNetv2_train {args.d} {args.c} FOLD -pretrained_weights "
          f"$nnUNet_results/{r['dataset']}/nnUNetTrainerPolyCLPretrain__{args.p}__{r['name']}/fold_FOLD/"
          f"checkpoint_final.pth" + ("" if args.p == "nnUNetPlans" else f" -p {args.p}"))


if __name__ == "__main__":
    main_pretrain_plans()
