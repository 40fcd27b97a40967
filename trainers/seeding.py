"""Seeded training: the same seed gives the same run, bit for bit, on CPU with nnUNet_n_proc_DA 0 or 1.

nnU-Net seeds nothing: the network's initialisation, the patches drawn and their augmentation come from fresh
entropy in every run. A seed here covers all three: the global RNGs of the training process (`seed_everything`)
and one seed per data-augmentation worker (`augmenter_seed`), which batchgenerators hands to numpy and torch
in the worker. With more than one worker per augmenter nnU-Net takes batches in whichever order the workers
deliver them, so the run is no longer repeatable.
"""
import random
from contextlib import contextmanager

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as _trainer_module


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global RNGs in this process."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def augmenter_seed(seed: int, augmenter: int, worker: int, epoch: int = 0, rank: int = 0) -> int:
    """Seed of one data-augmentation worker: `seed * 1000 + 100 * augmenter + worker` for a fresh run on one
    process; a run resumed at `epoch` or a DDP rank > 0 gets its own stream (numpy's SeedSequence), so a resume
    does not replay epoch 0's batches and ranks do not train on the same ones."""
    if epoch == 0 and rank == 0:
        return seed * 1000 + 100 * augmenter + worker
    return int(np.random.SeedSequence([seed, augmenter, worker, epoch, rank]).generate_state(1)[0])


@contextmanager
def seeded_augmenters(seed: int, epoch: int = 0, rank: int = 0, first: int = 1):
    """Inside, nnU-Net's data-augmentation workers get seeds from `augmenter_seed` instead of fresh entropy.

    nnUNetTrainer.get_dataloaders builds them with `seeds=None` and starts them before returning, so the seeds can
    only go in through the class it calls (looked up in its module at call time). Yields the call counter: 2 after
    nnU-Net's get_dataloaders (training and validation augmenters). `first`: the augmenter number of the first
    call, so augmenters built earlier in the same run keep streams of their own.
    """
    cls = _trainer_module.NonDetMultiThreadedAugmenter

    def seeded(*args, num_processes: int, seeds=None, **kwargs):
        number = first + seeded.calls  # training and validation augmenters must not share a stream
        seeded.calls += 1
        return cls(*args, num_processes=num_processes, **kwargs,
                   seeds=[augmenter_seed(seed, number, i, epoch, rank) for i in range(num_processes)])

    seeded.calls = 0
    _trainer_module.NonDetMultiThreadedAugmenter = seeded
    try:
        yield seeded
    finally:
        _trainer_module.NonDetMultiThreadedAugmenter = cls
