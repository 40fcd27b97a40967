"""Seeded loss curves of SimCLR, PolyCL and SepaReg pretraining, to compare two versions of the package.

Each method pretrains for --steps steps from its own data loader on a preprocessed dataset, seeded
(training_seed 0, nnUNet_n_proc_DA 0: the run repeats bit for bit), and the losses are printed as JSON. Run it
with two checkouts on PYTHONPATH (each a folder holding `nnunet_cl` and `nnunet_cl_trainers`) and compare:

  python benchmarks/loss_curve_check.py -d 905 --steps 6 > new.json
  DROP_EDITABLE_FINDER=1 PYTHONPATH=/tmp/old_pkg python benchmarks/loss_curve_check.py -d 905 --steps 6 > old.json

Settings that changed defaults on purpose are pinned to the older defaults (SimCLR: the plans' batch of samples;
SepaReg: 32 regions per step, k-means of all crops), so the curves compare the machinery alone.
"""
import argparse
import json
import os
import sys
import tempfile

if os.environ.get("DROP_EDITABLE_FINDER"):  # the editable install must not shadow the checkout on PYTHONPATH
    sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]

import torch  # noqa: E402

PINNED = {"nnUNetTrainerSimCLR": {"pretrain_batch_size": 2},
          "nnUNetTrainerPolyCL": {},
          "nnUNetTrainerSepaReg": {"regions_per_step": 32, "cluster_max_regions": None}}


def curve(name: str, dataset: str, steps: int) -> list[float]:
    from batchgenerators.utilities.file_and_folder_operations import load_json
    import nnunet_cl_trainers
    from nnunet_cl.paths import preprocessed_folder
    folder = preprocessed_folder(dataset)
    plans = load_json(os.path.join(folder, "nnUNetPlans.json"))
    plans["continue_training"] = False
    trainer = getattr(nnunet_cl_trainers, name)(plans, "3d_fullres", 0, load_json(os.path.join(folder, "dataset.json")),
                                                torch.device("cpu"))
    trainer.training_seed = 0
    for k, v in PINNED[name].items():
        if hasattr(trainer, k):
            setattr(trainer, k, v)
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    losses = [float(trainer.train_step(next(trainer.dataloader_train))["loss"]) for _ in range(steps)]
    trainer._stop_pool_loader()
    return losses


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--methods", nargs="+", default=list(PINNED))
    args = p.parse_args()
    os.environ["nnUNet_n_proc_DA"] = "0"
    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="nnunet_cl_curve_")
    import nnunet_cl
    out = {"package": os.path.dirname(nnunet_cl.__file__)}
    for name in args.methods:
        out[name] = curve(name, args.d, args.steps)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
