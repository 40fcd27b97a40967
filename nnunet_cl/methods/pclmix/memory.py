"""PCLMix's class-wise memory: per foreground class, a FIFO of L2-normalised mean embeddings of that class's
region in one image each."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_cl.queues import FifoQueue

__all__ = ["ClassQueue", "class_means"]


def class_means(embeddings: torch.Tensor, labels: torch.Tensor, classes) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per (image, class) present: the L2-normalised mean of the image's embeddings labelled with the class.

    Args:
        embeddings: (B, D, N) voxel embeddings.  labels: (B, N) integers (negative = none).
        classes: the classes to take (e.g. the foreground ones).
    Returns:
        (rows (R, D), row_classes (R,)), images in batch order, classes ascending within an image.
    """
    rows, row_classes = [], []
    for b in range(embeddings.shape[0]):
        for c in sorted(classes):
            mask = labels[b] == c
            if mask.any():
                rows.append(F.normalize(embeddings[b][:, mask].mean(1), dim=0))
                row_classes.append(c)
    if not rows:
        return embeddings.new_zeros((0, embeddings.shape[1])), torch.zeros(0, dtype=torch.long,
                                                                            device=embeddings.device)
    return torch.stack(rows), torch.tensor(row_classes, dtype=torch.long, device=embeddings.device)


class ClassQueue(nn.Module):
    """``size`` slots per class for ``classes`` (the foreground ones), kept as buffers (saved in checkpoints,
    restored with --c). Each class's slots are first in, first out. ``dtype``: torch's default dtype if None."""

    def __init__(self, classes, size: int, dim: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.classes = [int(c) for c in classes]
        dtype = dtype or torch.get_default_dtype()
        self.queues = nn.ModuleList(FifoQueue(size, z=((dim,), dtype)) for _ in self.classes)

    @torch.no_grad()
    def push(self, rows: torch.Tensor, row_classes: torch.Tensor) -> None:
        """Append each row to its class's queue, in order; rows of other classes are dropped."""
        for c, q in zip(self.classes, self.queues):
            q.push(z=rows[row_classes == c])

    def keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, D) stored embeddings of every class, (M,) their classes."""
        parts = [(q.items()["z"], c) for c, q in zip(self.classes, self.queues)]
        z = torch.cat([p for p, _ in parts])
        return z, torch.cat([torch.full((p.shape[0],), c, dtype=torch.long, device=z.device) for p, c in parts])
