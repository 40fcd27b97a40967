"""Augmentation workers end with their trainer: nnU-Net's NonDetMultiThreadedAugmenter in a process that is
ended by SIGTERM or SIGKILL, with and without nnunet_cl.processes' remedies (the control shows the problem)."""
import os
import signal
import subprocess
import sys
import time

import pytest

SCRIPT = r"""
import sys, time
import numpy as np
from batchgenerators.dataloading.data_loader import DataLoader
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from nnunet_cl.processes import end_children_with_parent, exit_on_sigterm

class Random(DataLoader):
    def generate_train_batch(self):
        return {"data": np.random.rand(2, 1, 8, 8, 8).astype(np.float32)}

if sys.argv[1] == "remedies":
    end_children_with_parent()
    exit_on_sigterm()
aug = NonDetMultiThreadedAugmenter(Random(None, 2, 2, infinite=True), None, 2, 2, None, pin_memory=False)
next(aug)
print(" ".join(str(p.pid) for p in aug._processes), flush=True)
while True:
    next(aug)
    time.sleep(0.05)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def _workers_after(sig: int, remedies: bool) -> list[int]:
    """Start the script, wait for its workers, send `sig` to it; the workers still alive 10 s later."""
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, "remedies" if remedies else "none"],
                            stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert len(workers) == 2 and all(_alive(p) for p in workers)
    os.kill(proc.pid, sig)
    proc.wait(timeout=30)
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.1)
    left = [p for p in workers if _alive(p)]
    for p in left:  # never leave them behind
        os.kill(p, signal.SIGKILL)
    return left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_end_with_a_killed_trainer():
    assert len(_workers_after(signal.SIGKILL, remedies=False)) == 2  # the problem: orphans
    assert _workers_after(signal.SIGKILL, remedies=True) == []
    assert _workers_after(signal.SIGTERM, remedies=True) == []
