"""A first-in-first-out memory of past embeddings (MoCo-style), for contrastive terms that need more keys than a
step holds on a CPU."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["FifoQueue"]


class FifoQueue(nn.Module):
    """``size`` rows of several aligned fields, kept as buffers: saved in the state dict (checkpoints, ``--c``),
    moved by ``.to(device)``, never trained.

    >>> q = FifoQueue(4, z=((8,), torch.float32), sample=((), torch.long))
    >>> q.push(z=torch.randn(3, 8), sample=torch.arange(3))
    >>> q.items()["z"].shape          # the filled rows, oldest first
    torch.Size([3, 8])

    ``pushed`` counts every row ever pushed (callers use it for ids that stay unique across steps).
    """

    def __init__(self, size: int, **fields: tuple[tuple[int, ...], torch.dtype]):
        super().__init__()
        if int(size) < 0:
            raise ValueError(f"size must be >= 0; got {size}")
        if not fields:
            raise ValueError("give at least one field: name=(row shape, dtype)")
        self.size, self.fields = int(size), tuple(fields)
        for name, (shape, dtype) in fields.items():
            self.register_buffer(name, torch.zeros((self.size, *shape), dtype=dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("pushed", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, **rows: torch.Tensor) -> None:
        """Append rows (every field, the same number n); the oldest are overwritten once the queue is full."""
        if set(rows) != set(self.fields):
            raise ValueError(f"push needs exactly the fields {self.fields}; got {sorted(rows)}")
        n = {int(v.shape[0]) for v in rows.values()}
        if len(n) != 1:
            raise ValueError(f"every field needs the same number of rows; got {n}")
        n = n.pop()
        self.pushed += n
        if self.size == 0 or n == 0:
            return
        keep = min(n, self.size)  # more rows than the queue holds: the newest ones
        idx = (int(self.ptr) + torch.arange(keep, device=self.ptr.device)) % self.size
        for name, v in rows.items():
            buf = getattr(self, name)
            buf[idx] = v[n - keep:].detach().to(device=buf.device, dtype=buf.dtype)
        self.ptr.fill_((int(self.ptr) + keep) % self.size)
        self.count.fill_(min(self.size, int(self.count) + keep))

    def items(self) -> dict[str, torch.Tensor]:
        """{field: (count, ...)} of the filled rows, oldest first."""
        c = int(self.count)
        start = (int(self.ptr) - c) % self.size if self.size else 0
        idx = (start + torch.arange(c, device=self.ptr.device)) % max(self.size, 1)
        return {name: getattr(self, name)[idx] for name in self.fields}
