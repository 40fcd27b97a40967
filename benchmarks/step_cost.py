"""Cost of one contrastive training step against one plain nnUNetTrainer step, measured in the same run.

Both steps go through the trainers' real `train_step` on the same plans, configuration, patch and batch size,
with batches of the shapes nnU-Net's loaders produce (contents random: cost does not depend on them). Steps
alternate between trainers so machine load affects both alike; the median of `--steps` timed steps is used.

Peak memory: each case runs in a fresh subprocess and reports its peak resident set size (VmHWM):
  plain      one nnUNetTrainer step
  plain+core the same step plus the masked contrastive loss core on 4096 sampled voxels per patch of the
             last-but-one decoder stage (what a dense method adds), gradients included.

Usage (needs a preprocessed dataset; nnUNet_preprocessed set):
  python benchmarks/step_cost.py -d 4 -c 3d_fullres --steps 20 --out benchmarks/results/step_cost_hippocampus.md
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from os.path import join

import numpy as np
import torch

TRAINERS = ["nnUNetTrainer", "nnUNetTrainerSimCLR"]


def make_trainer(name: str, dataset: str, configuration: str, plans_identifier: str = "nnUNetPlans"):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_cl.paths import preprocessed_folder
    folder = preprocessed_folder(dataset)
    plans = load_json(join(folder, plans_identifier + ".json"))
    plans["continue_training"] = False
    cls = recursive_find_trainer_class_by_name(name)
    trainer = cls(plans, configuration, 0, load_json(join(folder, "dataset.json")), torch.device("cpu"))
    trainer.initialize()
    trainer.network.train()
    return trainer


def fake_batch(trainer, generator: torch.Generator) -> dict:
    """A batch with the shapes the trainer's data loader would give it."""
    b = trainer.batch_size
    patch = list(trainer.configuration_manager.patch_size)
    c = trainer.num_input_channels
    data = torch.randn((b, c, *patch), generator=generator)
    if getattr(trainer, "stage", None) and trainer.stage() == "pretrain":
        n = trainer.pretrain_batch_size or b
        return {"data": torch.randn((n, c, *patch), generator=generator),
                "data2": torch.randn((n, c, *patch), generator=generator), "keys": list(range(n))}
    n_classes = len(trainer.label_manager.all_labels)
    scales = trainer._get_deep_supervision_scales() or [[1.0] * len(patch)]
    target = [torch.randint(0, n_classes, (b, 1, *[int(round(p * s)) for p, s in zip(patch, sc)]),
                            generator=generator).float() for sc in scales]
    return {"data": data, "target": target if trainer.enable_deep_supervision else target[0]}


def time_steps(trainers: dict, steps: int, warmup: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    times = {k: [] for k in trainers}
    for i in range(warmup + steps):
        for name, tr in trainers.items():
            batch = fake_batch(tr, g)
            t0 = time.perf_counter()
            tr.train_step(batch)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def memory_case(args) -> None:
    """Child process: one plain step, optionally with the loss core on 4096 sampled voxels per patch."""
    from nnunet_cl.features import tap
    from nnunet_cl.losses import masked_supcon
    from nnunet_cl.sampling import sample_voxels

    if args.memory_case == "plain+core+trainer_setting":
        from nnunet_cl.memory import fix_mmap_threshold
        fix_mmap_threshold()  # what nnunet-cl's trainers do in initialize()
    trainer = make_trainer("nnUNetTrainer", args.d, args.c, args.p)
    batch = fake_batch(trainer, torch.Generator().manual_seed(0))
    if args.memory_case.startswith("plain+core"):
        net = trainer.network
        trainer.optimizer.zero_grad(set_to_none=True)
        with tap({"f": net.decoder.stages[-2]}) as feats:
            out = net(batch["data"])
        seg = trainer.loss(out, batch["target"])
        f = feats["f"]
        proj = torch.nn.functional.normalize(f, dim=1)
        sample = sample_voxels(proj, 4096, generator=torch.Generator().manual_seed(0))
        labels = torch.randint(0, 4, (sample.feats.shape[0],))
        core = masked_supcon(sample.feats, labels=labels, temperature=0.1)  # positives per block, no N x N mask
        (seg + core).backward()
        trainer.optimizer.step()
    else:
        trainer.train_step(batch)
    print(json.dumps({"maxrss_mb": peak_rss_mb()}))


# glibc's default raises its mmap threshold after large frees, so freed blocks stay in the heap and the peak
# varies by hundreds of MB between identical runs; a fixed threshold returns large blocks to the system at once.
MALLOC_SETTINGS = {"default": {}, "MALLOC_MMAP_THRESHOLD_=131072": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def memory_run(args, case: str, malloc: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(MALLOC_SETTINGS[malloc])
    out = subprocess.run([sys.executable, __file__, "-d", args.d, "-c", args.c, "-p", args.p,
                          "--memory_case", case], capture_output=True, text=True, encoding="utf-8",
                         errors="replace", env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["maxrss_mb"]


def measure_memory(args) -> dict:
    """{(case, malloc setting): [peak MB of each fresh process]}."""
    mem = {}
    for malloc in MALLOC_SETTINGS:
        for case in ("plain", "plain+core") + (("plain+core+trainer_setting",) if malloc == "default" else ()):
            mem[case, malloc] = [memory_run(args, case, malloc) for _ in range(args.mem_repeats)]
    return mem


def memory_table(args) -> list[str]:
    """Markdown lines of the peak-memory table (runs the fresh processes), ending with a blank line."""
    return [f"| peak memory (VmHWM; median of {args.mem_repeats} fresh processes, range) | glibc malloc | MB | "
            f"ratio |", "|---|---|---|---|", *memory_rows(measure_memory(args)), ""]


def memory_rows(mem: dict) -> list[str]:
    rows = []
    for malloc in MALLOC_SETTINGS:
        plain = statistics.median(mem["plain", malloc])
        for case, label in (("plain", "plain nnUNetTrainer step"),
                            ("plain+core", "plain step + loss core, 4096 sampled voxels/patch"),
                            ("plain+core+trainer_setting", "the same, with nnunet-cl's trainer setting "
                                                           "(`fix_mmap_threshold` in `initialize`)")):
            if (case, malloc) not in mem:
                continue
            runs = mem[case, malloc]
            rows.append(f"| {label} | {malloc} | {statistics.median(runs):.0f} ({min(runs):.0f}–{max(runs):.0f}) | "
                        f"{statistics.median(runs) / plain:.2f} |")
    return rows


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). ru_maxrss would carry the parent's peak across exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True)
    parser.add_argument("-c", default="3d_fullres")
    parser.add_argument("-p", default="nnUNetPlans")
    parser.add_argument("--trainers", nargs="+", default=TRAINERS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as nnU-Net, all cores)")
    parser.add_argument("--out", default=None, help="write a Markdown report here")
    parser.add_argument("--mem_repeats", type=int, default=3, help="fresh processes per memory case (default 3)")
    parser.add_argument("--memory_only", action="store_true", help="only the peak-memory table")
    parser.add_argument("--memory_case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count())
    if args.memory_case:
        return memory_case(args)

    if args.memory_only:
        return write_report("\n".join(memory_table(args) + [
            f"Command: python benchmarks/step_cost.py -d {args.d} -c {args.c} -p {args.p} --memory_only "
            f"--mem_repeats {args.mem_repeats}"]), args.out)
    tmp = tempfile.mkdtemp(prefix="nnunet_cl_bench_")
    os.environ.setdefault("nnUNet_results", tmp)  # trainers create output folders on construction
    trainers = {name: make_trainer(name, args.d, args.c, args.p) for name in args.trainers}
    times = time_steps(trainers, args.steps)
    base = statistics.median(times["nnUNetTrainer"])
    rows = [f"| {n} | {statistics.median(t) * 1000:.0f} | {np.percentile(t, 25) * 1000:.0f}–"
            f"{np.percentile(t, 75) * 1000:.0f} | {statistics.median(t) / base:.2f} |" for n, t in times.items()]
    tr = trainers["nnUNetTrainer"]
    report = "\n".join([
        f"Step cost on {tr.plans_manager.dataset_name} {args.c}: patch {list(tr.configuration_manager.patch_size)}, "
        f"batch {tr.batch_size}, {torch.get_num_threads()} torch threads, {args.steps} timed steps each "
        f"(median; interquartile range), CPU.",
        "", "| trainer | ms / step | IQR ms | ratio to nnUNetTrainer |", "|---|---|---|---|", *rows, "",
        *memory_table(args),
        f"Command: python benchmarks/step_cost.py -d {args.d} -c {args.c} -p {args.p} --steps {args.steps} "
        f"--mem_repeats {args.mem_repeats}"])
    write_report(report, args.out)


def write_report(report: str, out: str | None) -> None:
    """Print the Markdown report and, if asked, write it to `out`."""
    print(report)
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
