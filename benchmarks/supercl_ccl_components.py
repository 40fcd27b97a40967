"""How SuperCL's CCL graph groups real patches: positives per anchor under each graph variant.

Real pretraining batches of a benchmark work folder (`nnUNetv2_cl_benchmark`, dataset 950 = Hippocampus, plans
nnUNetPlans_clBench) go through the network, either freshly initialised or from a SuperCL pretraining checkpoint;
the ASP vectors of `--steps` steps (8 patches x 2 views each, as many nodes as the step plus its queue) form one
graph, and for each variant of `component_mask` the table gives the positives per anchor (component size - 1)
and the largest component. The authors' graph links each node to its top-1 node; "samples" links each patch
(mean of its views) to its top-1 other patch; "center" takes cosines of the deviations from the nodes' mean.

Usage:  python benchmarks/supercl_ccl_components.py --work /work/bench_screen_supercl [--checkpoint F] [--out FILE]
"""
import argparse
import importlib.util
import os
import sys
from os.path import dirname, join

import numpy as np
import torch

_spec = importlib.util.spec_from_file_location("step_cost", join(dirname(os.path.abspath(__file__)), "step_cost.py"))
step_cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_cost)

VARIANTS = {"authors' (top-1 node, own view allowed)": dict(other_samples_only=False, center=False),
            "top-1 other patch": dict(other_samples_only=True, center=False),
            "top-1 node, centred": dict(other_samples_only=False, center=True),
            "top-1 other patch, centred": dict(other_samples_only=True, center=True)}


def asp_nodes(trainer, loader, steps: int):
    from nnunet_cl.methods.supercl.pairs import average_supervoxel_map, grid_labels
    from nnunet_cl.views import unflip
    enc, _ = trainer.tap_stages()
    vectors, samples = [], []
    with torch.no_grad():
        for s in range(steps):
            batch = trainer.prepare_batch(next(loader))
            b = batch["supervoxels"].shape[0]
            feats = trainer.unwrapped_network.encoder(batch["views"])[enc]
            lab1 = grid_labels(batch["supervoxels"], feats.shape[2:])
            lab2 = grid_labels(batch["supervoxels"], feats.shape[2:], batch["flips"])
            vectors += [average_supervoxel_map(feats[:b], lab1).flatten(1),
                        average_supervoxel_map(unflip(feats[b:], batch["flips"]), lab2).flatten(1)]
            samples += [torch.arange(b) + s * b] * 2
    return torch.cat(vectors), torch.cat(samples)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--dataset", default="950")
    p.add_argument("--plans", default="nnUNetPlans_clBench")
    p.add_argument("--checkpoint", default=None, help="a SuperCL pretraining checkpoint (weights-only read)")
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[name] = join(args.work, name)
    os.environ["nnUNet_n_proc_DA"] = "0"
    from nnunet_cl.methods.supercl.pairs import component_mask
    from nnunet_cl.safe_load import load_checkpoint_file
    torch.manual_seed(0)
    np.random.seed(0)
    trainer = step_cost.make_trainer("nnUNetTrainerSuperCLPretrain", args.dataset, "3d_fullres", args.plans)
    trainer.pretrain_batch_size = 8
    state = "initialisation"
    if args.checkpoint:
        ckpt = load_checkpoint_file(args.checkpoint)
        trainer.unwrapped_network.load_state_dict(ckpt["network_weights"])
        state = f"{os.path.basename(args.checkpoint)} (epoch {ckpt['current_epoch']})"
    loader = trainer.get_pretrain_dataloader()
    vectors, samples = asp_nodes(trainer, loader, args.steps)
    lines = [f"# SuperCL CCL components on real patches ({state})", "",
             f"{vectors.shape[0]} nodes: {args.steps} steps x 8 patches x 2 views of dataset {args.dataset}; "
             f"ASP of encoder stage {trainer.tap_stages()[0]} ({vectors.shape[1]} values per node).", "",
             "| graph | positives per anchor (mean) | median | largest component |", "|---|---|---|---|"]
    for name, kw in VARIANTS.items():
        size = component_mask(vectors, samples, **kw).sum(1).float()
        lines.append(f"| {name} | {float(size.mean()) - 1:.1f} | {float(size.median()) - 1:.0f} | "
                     f"{int(size.max())} of {vectors.shape[0]} |")
    lines += ["", f"Command: `python benchmarks/supercl_ccl_components.py --work {args.work}"
              + (f" --checkpoint {args.checkpoint}" if args.checkpoint else "") + "`"]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(report + "\n\n")


if __name__ == "__main__":
    sys.exit(main())
