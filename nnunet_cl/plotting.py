"""Pictures of training progress."""
import os

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def plot_loss_terms(logging: dict, keys: list[str], progress_png: str) -> None:
    """Append a panel with the per-epoch contrastive loss terms under nnU-Net's progress.png.

    `logging` is nnU-Net's LocalLogger dict (one value per epoch per key); NaN epochs (the other stage) leave
    gaps. The panel is drawn at the width of the existing progress.png so the two read as one picture.
    """
    n = min(len(logging[k]) for k in keys)
    if n == 0:
        return
    base = Image.open(progress_png).convert("RGB") if os.path.isfile(progress_png) else None
    width_px = base.width if base is not None else 1500
    dpi = 100
    fig, ax = plt.subplots(figsize=(width_px / dpi, width_px / dpi / 3), dpi=dpi)
    x = np.arange(n)
    drawn = [k for k in keys if not np.all(np.isnan(np.asarray(logging[k][:n], dtype=float)))]
    for k in drawn:
        y = np.asarray(logging[k][:n], dtype=float)
        if k.endswith("total") and len(drawn) == 2:
            continue  # the total of one term is that term: drawn twice, one line would hide the other
        # the total dashed on top, so the terms beneath it stay visible
        ax.plot(x, y, linewidth=2, linestyle="--" if k.endswith("total") else "-", label=k.removeprefix("cl_"))
    ax.set_xlim(0, max(n - 1, 1))  # the same epoch axis as nnU-Net's panels above
    ax.set_xlabel("epoch", fontsize=24)
    ax.set_ylabel("contrastive loss", fontsize=24)
    ax.tick_params(labelsize=20)
    ax.set_title("nnunet-cl loss terms (gaps: supervised epochs)", fontsize=26)
    if ax.lines:
        ax.legend(loc="upper right", fontsize=20)
    fig.tight_layout()
    panel_file = progress_png + ".terms.png"
    fig.savefig(panel_file)
    plt.close(fig)
    panel = Image.open(panel_file).convert("RGB")
    os.remove(panel_file)
    if base is None:
        panel.save(progress_png)
        return
    combined = Image.new("RGB", (base.width, base.height + panel.height), "white")
    combined.paste(base, (0, 0))
    combined.paste(panel, (0, base.height))
    combined.save(progress_png)
