"""A periodic progress line for long loops (nnU-Net prints one block per epoch; a long epoch would otherwise be
silent for minutes): steps done, rate and the time left, at most once every `every_s` seconds."""
from __future__ import annotations

import time
from typing import Callable

__all__ = ["StepProgress", "format_duration"]


def format_duration(seconds: float) -> str:
    """'45 s', '12.5 min' or '3.2 h'."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class StepProgress:
    """>>> p = StepProgress(every_s=60); p.start(250, "epoch 3"); line = p.step()   # None until 60 s have passed

    ``step()`` returns e.g. ``"epoch 3: step 120/250, 2.10 s/step, about 4.6 min left in this epoch"`` when
    ``every_s`` seconds have passed since the start or the last line, else None. ``every_s`` None, or steps
    taken without a ``start`` (a trainer's train_step called on its own): never.
    """

    def __init__(self, every_s: float | None = 60.0, clock: Callable[[], float] = time.monotonic):
        self.every_s, self.clock = every_s, clock
        self.total, self.done, self.label, self.t0, self.last = 0, 0, "", 0.0, 0.0

    def start(self, total: int, label: str) -> None:
        self.total, self.done, self.label = int(total), 0, label
        self.t0 = self.last = self.clock()

    def step(self) -> str | None:
        self.done += 1
        now = self.clock()
        if self.every_s is None or not self.total or now - self.last < self.every_s:  # (no line outside a loop)
            return None
        self.last = now
        rate = (now - self.t0) / self.done
        left = max(self.total - self.done, 0) * rate
        return (f"{self.label}: step {self.done}/{self.total}, {rate:.2f} s/step, about {format_duration(left)} "
                f"left in this epoch")
