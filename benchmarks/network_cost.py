"""Cost of one training step of nnU-Net's network alone, for plans at other patch sizes and widths.

Sizing a benchmark schedule needs the step cost of a reduced network before any data is preprocessed. This
times forward + backward + SGD step of the 3d_fullres network built from a plans file (deep supervision on,
batch size given, random input), with the cases interleaved so machine load affects all alike. Data
augmentation, the loss and nnU-Net's loop are not included: ratios between cases are what it is for.

Each case is PLANS[:PATCH[:WIDTH]], PATCH as 64x64x64 (default: the plans' patch), WIDTH the first stage's
features with every stage scaled alike (as nnUNetv2_cl_benchmark --width). The first case is the reference.

  python benchmarks/network_cost.py \\
      $W/nnUNet_preprocessed/Dataset950_Hippocampus/nnUNetPlans_clBench.json \\
      $P/Dataset960_OpenKBP/nnUNetPlans.json:64x64x64:16 --classes 3 8
"""
import argparse
import copy
import json
import statistics
import time

import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans


def build(plans_file: str, patch: list[int] | None, width: int | None, classes: int):
    cfg = json.load(open(plans_file))["configurations"]["3d_fullres"]
    arch = cfg["architecture"]
    kwargs = copy.deepcopy(arch["arch_kwargs"])
    if width:
        first = kwargs["features_per_stage"][0]
        kwargs["features_per_stage"] = [max(1, f * width // first) for f in kwargs["features_per_stage"]]
    net = get_network_from_plans(arch["network_class_name"], kwargs, arch["_kw_requires_import"], 1, classes,
                                 deep_supervision=True)
    return net, patch or cfg["patch_size"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cases", nargs="+", help="PLANS[:PATCH[:WIDTH]]")
    p.add_argument("--classes", type=int, nargs="+", default=[3], help="output classes, one per case or one for all")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per case after one warm-up (default 5)")
    a = p.parse_args()
    if len(a.classes) not in (1, len(a.cases)):
        p.error(f"--classes takes one value or one per case ({len(a.cases)}), got {len(a.classes)}")
    if len(set(a.cases)) != len(a.cases):
        p.error("each case once")
    nets = {}
    for i, case in enumerate(a.cases):
        plans, patch, width = (case.split(":") + [None, None])[:3]
        patch = [int(x) for x in patch.split("x")] if patch else None
        classes = a.classes[i] if len(a.classes) > 1 else a.classes[0]
        net, patch = build(plans, patch, int(width) if width else None, classes)
        nets[case] = (net, patch, torch.optim.SGD(net.parameters(), lr=1e-3))
    times = {c: [] for c in nets}
    for step in range(a.steps + 1):
        for case, (net, patch, opt) in nets.items():
            x = torch.randn(a.batch_size, 1, *patch)
            t = time.perf_counter()
            out = net(x)
            sum(o.float().mean() for o in out).backward()
            opt.step()
            opt.zero_grad()
            if step:  # the first step warms up allocators
                times[case].append(time.perf_counter() - t)
    ref = statistics.median(times[a.cases[0]])
    print("| case | patch | s / step | ratio |\n|---|---|---|---|")
    for case, (_, patch, _) in nets.items():
        med = statistics.median(times[case])
        print(f"| {case} | {'x'.join(map(str, patch))} | {med:.2f} | {med / ref:.1f} |")


if __name__ == "__main__":
    main()
