"""Draws docs/figures/step_data_path.png: the data path of one training step (docs/architecture.md).

python docs/figures/step_data_path.py
"""
from os.path import dirname, join

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

BOXES = {  # name: (x, y, w, h, text, colour)
    "loader": (0.2, 5.6, 2.6, 1.0, "loader\npool views or labeled\npatches (this rank's share)", "#e8eef7"),
    "prepare": (3.4, 5.6, 2.6, 1.0, "prepare_batch\nto device, views, mixes,\nmasks", "#e8eef7"),
    "ddp": (6.6, 3.0, 5.7, 4.1, "", "#fff4e0"),
    "network": (6.9, 5.55, 2.4, 1.1, "self.network\nstock U-Net\n(encoder, decoder)", "#ffffff"),
    "extra": (9.6, 5.55, 2.3, 1.1, "extra modules\nheads, teacher,\nsecond decoder", "#ffffff"),
    "terms": (6.9, 3.3, 5.0, 1.3, "step_losses\nseg loss + named terms;\ncontrastive terms gather across\n"
              "ranks with gradients", "#ffffff"),
    "backward": (3.4, 1.0, 2.6, 1.0, "backward\nDDP averages every\ngradient", "#e8f5e9"),
    "step": (6.6, 1.0, 2.6, 1.0, "optimiser step\n(clip at 12, AMP on GPU)", "#e8f5e9"),
    "after": (9.8, 1.0, 2.4, 1.0, "on_after_step\nEMA teacher, queue", "#e8f5e9"),
}
ARROWS = [("loader", "prepare"), ("prepare", "network"), ("network", "extra"), ("network", "terms"),
          ("extra", "terms"), ("terms", "backward"), ("backward", "step"), ("step", "after")]


def centre(name, side):
    x, y, w, h = BOXES[name][:4]
    return {"l": (x, y + h / 2), "r": (x + w, y + h / 2), "t": (x + w / 2, y + h), "b": (x + w / 2, y)}[side]


def main():
    fig, ax = plt.subplots(figsize=(11, 6.2))
    for name, (x, y, w, h, text, colour) in BOXES.items():
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=colour, ec="#445"))
        if text:
            ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9)
    ax.text(6.75, 6.75, "train_modules (DDP-wrapped when distributed): one forward a step",
            fontsize=9, weight="bold")
    sides = {("loader", "prepare"): ("r", "l"), ("prepare", "network"): ("r", "l"), ("network", "extra"): ("r", "l"),
             ("network", "terms"): ("b", "t"), ("extra", "terms"): ("b", "t"), ("terms", "backward"): ("b", "t"),
             ("backward", "step"): ("r", "l"), ("step", "after"): ("r", "l")}
    for a, b in ARROWS:
        s, e = sides[a, b]
        p, q = centre(a, s), centre(b, e)
        if (a, b) == ("terms", "backward"):
            p = (BOXES["terms"][0] + 0.6, BOXES["terms"][1])
        ax.add_patch(FancyArrowPatch(p, q, arrowstyle="-|>", mutation_scale=14, color="#334"))
    ax.text(0.2, 0.2, "Inference and nnUNetv2_cl_export use self.network alone; the extra modules live in the "
            "checkpoint's 'nnunet_cl' entry.", fontsize=9, style="italic")
    ax.set_xlim(0, 12.4)
    ax.set_ylim(0, 7.3)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(join(dirname(__file__), "step_data_path.png"), dpi=110)


if __name__ == "__main__":
    main()
