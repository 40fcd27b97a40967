"""Table and plot of `nnUNetv2_cl_benchmark` from its per-run JSON files (work/runs/*.json).

- results_<schedule>.md / .csv: one row per arm and k; Dice per class and mean foreground Dice as mean ± std over
  seeds (sample std; '—' with one seed), the number of seeds, the paired difference to scratch (same k and seed,
  so the same labeled cases), and wall times (fine-tuning, prediction per run; pretraining once per method).
- dice_vs_labels_<schedule>.png: mean foreground Dice against the number of labeled cases, one line per arm, error bars
  = std over seeds; the ceiling (all non-validation labels) as a horizontal line with its spread as a band.
- dice_per_class_<schedule>.png: Dice of every class, one panel per k, one bar per arm (error bars = std over seeds),
  the ceiling as a black mark per class: whether a gain comes from every class or from a few (small organs).
- delta_vs_scratch_<schedule>.png: each arm minus scratch on the same k and seed, one dot per seed and a bar at
  their mean: which gains stand clear of the seed-to-seed noise.
"""
import csv
import json
import math
from pathlib import Path

import numpy as np

CEILING, SCRATCH = "ceiling", "scratch"
ORDER = ["scratch", "simclr", "separeg", "polycl"]


def load_runs(runs_dir) -> list[dict]:
    """Finished runs (work/runs/<arm>__k<k>__seed<s>.json); pretraining records and partial files are not runs."""
    out = []
    for f in sorted(Path(runs_dir).glob("*.json")):
        if f.name.startswith("pretrain__"):
            continue
        out.append(json.loads(f.read_text()))
    return out


def run_filter(arms=None, ks=None, seeds=None):
    """A predicate on run records: the runs of these arms, k and seeds (None: any). The ceiling has no k of the
    list (it trains on every labeled case), so only its arm and seed are checked."""
    def keep(run: dict) -> bool:
        return ((arms is None or run["arm"] in arms) and (seeds is None or run["seed"] in seeds)
                and (ks is None or run["arm"] == CEILING or run["k"] in ks))
    return keep


def load_pretraining(runs_dir) -> dict:
    records = [json.loads(f.read_text()) for f in Path(runs_dir).glob("pretrain__*.json")]
    return {r["arm"]: r for r in records}


def _stats(values) -> tuple[float, float, int]:
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def paired_interval(mean: float, std: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of a mean of n paired differences (sample std); (nan, nan) below 2 pairs."""
    if n < 2 or math.isnan(std):
        return math.nan, math.nan
    from scipy.stats import t
    half = float(t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


def _interval(lo: float, hi: float, digits: int = 3) -> str:
    return "—" if math.isnan(lo) else f"[{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _pm(mean: float, std: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if not math.isnan(std) else "")


def _wrap(title: str, fig) -> str:
    """A title in lines that fit the figure's width (about 9 characters per inch at 11-12 pt)."""
    import textwrap
    return "\n".join(textwrap.wrap(title, width=int(fig.get_figwidth() * 9))) or title


def _arm_order(arms) -> list[str]:
    arms = set(arms)
    return [a for a in ORDER if a in arms] + sorted(a for a in arms if a not in ORDER and a != CEILING) + \
        ([CEILING] if CEILING in arms else [])


def aggregate(runs: list[dict]) -> tuple[list[dict], list[str], dict]:
    """Rows (arm, k) with per-class and mean-foreground statistics over seeds; the classes; label names."""
    classes = sorted({c for r in runs for c in r["dice"]}, key=lambda c: (len(c), c))
    labels = {}
    for r in runs:
        labels.update(r.get("labels", {}))
    scratch = {(r["k"], r["seed"]): r["mean_fg_dice"] for r in runs if r["arm"] == SCRATCH}
    rows = []
    for arm in _arm_order({r["arm"] for r in runs}):
        for k in sorted({r["k"] for r in runs if r["arm"] == arm}):
            group = sorted((r for r in runs if r["arm"] == arm and r["k"] == k), key=lambda r: r["seed"])
            row = {"arm": arm, "k": k, "ceiling": arm == CEILING, "seeds": [r["seed"] for r in group]}
            row["mean_fg"] = _stats([r["mean_fg_dice"] for r in group])
            row["per_class"] = {c: _stats([r["dice"].get(c) for r in group]) for c in classes}
            paired = {r["seed"]: r["mean_fg_dice"] - scratch[(k, r["seed"])] for r in group
                      if arm not in (SCRATCH, CEILING) and (k, r["seed"]) in scratch
                      and r["mean_fg_dice"] is not None and scratch[(k, r["seed"])] is not None}
            row["delta_scratch"] = _stats(paired.values())
            row["delta_interval"] = paired_interval(*row["delta_scratch"])
            row["delta_per_seed"] = paired
            row["resumed_seeds"] = [r["seed"] for r in group if r.get("resumed")]
            for key in ("predict", "pretrain"):
                row[f"{key}_s"] = _stats([r["wall_s"].get(key) for r in group])[0]
            row["finetune_s"] = _stats([finetune_seconds(r) for r in group])[0]
            rows.append(row)
    return rows, classes, labels


def finetune_seconds(run: dict) -> float | None:
    """Fine-tuning time of a run: its wall time, or for a run resumed with --c (whose wall time covers only the
    part after the resume) the sum of nnU-Net's epoch times over all its epochs."""
    if run.get("resumed"):
        return run.get("finetune_epochs_s")
    return run["wall_s"].get("finetune")


def resumed_runs(rows) -> list[str]:
    """'arm k=K seed S' of every run resumed with --c, for the note under the table."""
    return [f"{r['arm']} k={r['k']} seed {s}" for r in rows for s in r.get("resumed_seeds", [])]


def prediction_settings(run: dict) -> str:
    """How a run's test set was predicted (old run files without the fields: nnU-Net's defaults, no mirroring)."""
    return f"step {run.get('step_size') or 0.5}, {'mirroring' if run.get('tta') else 'no mirroring'}"


def markdown_table(rows, classes, labels, skipped: dict | None = None, predicted_with: set | None = None) -> str:
    head = ["arm", "labeled cases", "seeds"] + [f"Dice {labels.get(c, c)}" for c in classes] + \
        ["mean foreground Dice", "Δ vs scratch (paired)", "Δ 95% interval", "fine-tune min", "predict min", "pretrain min (once)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        k = f"all ({r['k']})" if r["ceiling"] else str(r["k"])
        cells = [r["arm"], k, str(len(r["seeds"]))]
        cells += [_pm(*r["per_class"][c][:2]) for c in classes]
        cells += [f"**{_pm(*r['mean_fg'][:2])}**", _pm(*r["delta_scratch"][:2]) if r["delta_scratch"][2] else "—",
                  _interval(*r["delta_interval"])]
        cells += [f"{v / 60:.1f}" if not math.isnan(v) else "—" for v in (r["finetune_s"], r["predict_s"],
                                                                           r["pretrain_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "Mean ± sample std over seeds (a seed fixes which k cases are labeled). Δ vs scratch: the arm minus "
                 "scratch on the same k and seed, averaged over seeds; its 95% interval is Student's t over those "
                 "paired differences (from 2 seeds on). Wall times are per run; pretraining runs once per method "
                 "and serves every k and seed (where an earlier invocation finished it, the sum of nnU-Net's "
                 "epoch times stands in for its wall time)."]
    resumed = resumed_runs(rows)
    if resumed:
        notes.append(f"- resumed after an interruption (nnU-Net --c): {', '.join(resumed)}. Such a run continues on "
                     f"an augmentation stream of its own, so it is paired with the other arms of its k and seed only "
                     f"up to the epoch it resumed at; its fine-tuning time is the sum of nnU-Net's epoch times.")
    for arm, why in sorted((skipped or {}).items()):
        notes.append(f"- skipped arm **{arm}**: {why}")
    if predicted_with and len(predicted_with) > 1:
        notes.append(f"- **runs were predicted with different settings** ({', '.join(sorted(predicted_with))}): "
                     f"their Dice values are not strictly comparable")
    return "\n".join(lines + notes) + "\n"


def write_csv(rows, classes, labels, path) -> None:
    fields = ["arm", "k", "ceiling", "n_seeds", "seeds"]
    for c in classes:
        fields += [f"dice_{labels.get(c, c)}_mean", f"dice_{labels.get(c, c)}_std"]
    fields += ["mean_fg_dice_mean", "mean_fg_dice_std", "delta_vs_scratch_mean", "delta_vs_scratch_std",
               "delta_vs_scratch_ci95_low", "delta_vs_scratch_ci95_high",
               "finetune_s_mean", "predict_s_mean", "pretrain_s", "resumed_seeds"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for r in rows:
            vals = [r["arm"], r["k"], int(r["ceiling"]), len(r["seeds"]), " ".join(map(str, r["seeds"]))]
            for c in classes:
                vals += list(r["per_class"][c][:2])
            vals += list(r["mean_fg"][:2]) + list(r["delta_scratch"][:2]) + list(r["delta_interval"])
            vals += [r["finetune_s"], r["predict_s"], r["pretrain_s"], " ".join(map(str, r["resumed_seeds"]))]
            w.writerow(["" if isinstance(v, float) and math.isnan(v) else
                        (round(v, 5) if isinstance(v, float) else v) for v in vals])


def plot(rows, path, title: str = "") -> dict:
    """Draw the PNG; returns what the axes hold, read back from them: {label: (x, y)} of every curve and
    horizontal line, and the Dice axis limits."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    curves = [r for r in rows if not r["ceiling"]]
    arms = _arm_order({r["arm"] for r in curves})
    ks = sorted({r["k"] for r in curves})
    colours = plt.get_cmap("tab10")
    spread = 0.035  # arms side by side at each k (log axis), so error bars do not hide each other
    for i, arm in enumerate(arms):
        pts = sorted((r for r in curves if r["arm"] == arm), key=lambda r: r["k"])
        x = np.array([r["k"] for r in pts], dtype=float) * 10 ** (spread * (i - (len(arms) - 1) / 2))
        y = np.array([r["mean_fg"][0] for r in pts])
        err = np.nan_to_num(np.array([r["mean_fg"][1] for r in pts]))
        n = sorted({len(r["seeds"]) for r in pts})
        ax.errorbar(x, y, yerr=err, marker="o", markersize=6, linewidth=2, capsize=4, color=colours(i % 10),
                    label=f"{arm} (seeds: {'/'.join(map(str, n))})")
    for r in [r for r in rows if r["ceiling"]]:
        m, s, n = r["mean_fg"]
        ax.axhline(m, color="black", linestyle="--", linewidth=1.5,
                   label=f"ceiling: all {r['k']} labels (seeds: {n})")
        if not math.isnan(s):
            ax.axhspan(m - s, m + s, color="black", alpha=0.08)
    # Dice axis: every point, bar and the ceiling band in view, at least 0.1 tall so noise does not look like a trend
    lows = [r["mean_fg"][0] - np.nan_to_num(r["mean_fg"][1]) for r in rows if not math.isnan(r["mean_fg"][0])]
    highs = [r["mean_fg"][0] + np.nan_to_num(r["mean_fg"][1]) for r in rows if not math.isnan(r["mean_fg"][0])]
    if lows:
        lo, hi = min(lows), max(highs)
        pad = max(0.02, (0.1 - (hi - lo)) / 2)
        bottom, top = max(0.0, lo - pad), min(1.0, hi + pad)
        if top - bottom < 0.1:  # squeezed against 0 or 1
            bottom, top = (0.9, 1.0) if top >= 1.0 else (bottom, bottom + 0.1)
        ax.set_ylim(bottom, top)
    if ks:
        ax.set_xscale("log")
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlim(min(ks) / 1.35, max(ks) * 1.35)
    ax.set_xlabel("labeled training cases (k)", fontsize=12)
    ax.set_ylabel("mean foreground Dice (test set)", fontsize=12)
    ax.tick_params(labelsize=11)
    ax.grid(True, alpha=0.3)
    ax.set_title(_wrap(title or "Dice against labeled cases", fig), fontsize=12)
    ax.legend(fontsize=10, loc="best")
    fig.text(0.01, 0.01, "error bars / band: std over seeds", fontsize=9, color="0.35")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path)
    drawn = {c.get_label(): (list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata())) for c in ax.containers}
    drawn.update({ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.lines
                  if not ln.get_label().startswith("_")})
    ylim = ax.get_ylim()
    plt.close(fig)
    return {"curves": drawn, "ylim": ylim}


def plot_per_class(rows, classes, labels, path, title: str = "") -> dict:
    """Draw the per-class PNG; returns the bar heights read back from the axes, {(k, arm): [Dice per class]}, and
    the ceiling marks, {'ceiling': [Dice per class]} (when there is a ceiling run)."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    curves = [r for r in rows if not r["ceiling"]]
    ks = sorted({r["k"] for r in curves})
    arms = _arm_order({r["arm"] for r in curves})
    ceiling = next((r for r in rows if r["ceiling"]), None)
    fig, axes = plt.subplots(len(ks), 1, figsize=(max(8.0, 1.3 * len(classes) + 2), 2.8 * len(ks) + 1.2), dpi=120,
                             squeeze=False, layout="constrained")
    colours = plt.get_cmap("tab10")
    group = 0.8
    width = group / max(1, len(arms))
    x = np.arange(len(classes))
    drawn = {}
    for ax, k in zip(axes[:, 0], ks):
        for i, arm in enumerate(arms):
            row = next((r for r in curves if r["arm"] == arm and r["k"] == k), None)
            if row is None:
                continue
            y = np.nan_to_num(np.array([row["per_class"][c][0] for c in classes]))
            std = np.array([row["per_class"][c][1] for c in classes])
            bars = ax.bar(x + (i - (len(arms) - 1) / 2) * width, y, width, color=colours(i % 10),
                          yerr=None if np.isnan(std).all() else np.nan_to_num(std), capsize=2,
                          label=f"{arm} (seeds: {len(row['seeds'])})")
            drawn[(k, arm)] = [float(b.get_height()) for b in bars]
        if ceiling is not None:  # a black line across each class's group of bars
            ceil = [ceiling["per_class"][c][0] for c in classes]
            ax.hlines(ceil, x - group / 2, x + group / 2, colors="black", linewidth=2.5,
                      label=f"ceiling: all {ceiling['k']} labels", zorder=3)
            drawn["ceiling"] = [float(v) for v in ceil]
        ax.set_ylim(0, 1)
        ax.set_xticks(x)
        ax.set_xticklabels([labels.get(c, c) for c in classes], fontsize=10)
        ax.set_ylabel(f"Dice, k = {k}", fontsize=11)
        ax.grid(True, axis="y", alpha=0.3)
    handles, names = axes[0, 0].get_legend_handles_labels()
    # the title heads the legend: a suptitle and an "outside" legend would overlap
    fig.legend(handles, names, loc="outside upper center", ncol=min(3, len(names)), fontsize=9, frameon=False,
               title=title or "Dice per class", title_fontsize=12)
    fig.supxlabel("test set; error bars: std over seeds", fontsize=9, color="0.35", x=0.01, ha="left")
    fig.savefig(path)
    plt.close(fig)
    return drawn


def plot_deltas(rows, path, title: str = "") -> dict:
    """Draw the paired differences to scratch: a group of bars per k, one bar per arm at the mean of its seeds and
    each seed's difference as a dot on it, so gains and seed-to-seed noise show side by side. Returns the dots and
    bars read back from the axes, {(k, arm): ([per-seed differences], mean)}; empty (and no file) when no arm
    pairs with scratch."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    paired = [r for r in rows if r.get("delta_per_seed")]
    if not paired:
        return {}
    ks = sorted({r["k"] for r in paired})
    arms = _arm_order({r["arm"] for r in paired})
    colours = plt.get_cmap("tab10")
    order = _arm_order({r["arm"] for r in rows if not r["ceiling"]})  # colours as in the Dice plot
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 0.55 * len(ks) * len(arms)), 4.5), dpi=120)
    drawn = {}
    for j, k in enumerate(ks):
        for i, arm in enumerate(arms):
            row = next((r for r in paired if r["arm"] == arm and r["k"] == k), None)
            if row is None:
                continue
            x = j * (len(arms) + 1) + i
            colour = colours(order.index(arm) % 10)
            seeds = sorted(row["delta_per_seed"])
            d = [row["delta_per_seed"][s] for s in seeds]
            bar = ax.bar(x, np.mean(d), 0.7, color=colour, alpha=0.45, label=arm if j == 0 else None)
            dots = ax.scatter([x] * len(d), d, color=colour, edgecolor="black", zorder=3, s=28)
            drawn[(k, arm)] = ([float(v) for v in dots.get_offsets()[:, 1]], float(bar[0].get_height()))
    ax.axhline(0, color="black", linewidth=1.2)
    centre = (len(arms) - 1) / 2
    ax.set_xticks([j * (len(arms) + 1) + centre for j in range(len(ks))])
    ax.set_xticklabels([f"k = {k}" for k in ks], fontsize=11)
    ax.set_ylabel("mean foreground Dice minus scratch\n(same labeled cases)", fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(_wrap(title or "Paired difference to scratch", fig), fontsize=11)
    ax.legend(fontsize=9, loc="best")
    fig.text(0.01, 0.01, "dots: one seed each; bars: their mean", fontsize=9, color="0.35")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return drawn


def write_report(runs_dir, out_dir, skipped: dict | None = None, title: str = "", suffix: str = "",
                 select=None) -> dict | None:
    """Write results<suffix>.md, .csv, dice_vs_labels<suffix>.png, dice_per_class<suffix>.png and (when an arm
    pairs with scratch) delta_vs_scratch<suffix>.png into out_dir and return their paths ('md', 'csv', 'png',
    'png_per_class', 'png_deltas') and what the plots drew ('drawn', see plot; 'drawn_per_class', see
    plot_per_class; 'drawn_deltas', see plot_deltas); None when no run has finished. select (see run_filter) keeps a
    subset of the runs, e.g. one table of the default arms apart from extra arms in the same work folder."""
    runs = [r for r in load_runs(runs_dir) if select is None or select(r)]
    if not runs:
        return None
    rows, classes, labels = aggregate(runs)
    pre = load_pretraining(runs_dir)
    for r in rows:  # pretraining time from the pretraining record (the same for every k and seed)
        if r["arm"] in pre:
            # a pretraining finished by an earlier invocation has no wall time here: nnU-Net's epoch times instead
            rec = pre[r["arm"]]
            r["pretrain_s"] = rec.get("wall_s") or rec.get("epochs_s") or float("nan")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"results{suffix}.md", "csv": out / f"results{suffix}.csv",
             "png": out / f"dice_vs_labels{suffix}.png", "png_per_class": out / f"dice_per_class{suffix}.png",
             "png_deltas": out / f"delta_vs_scratch{suffix}.png"}
    table = markdown_table(rows, classes, labels, skipped, {prediction_settings(r) for r in runs})
    paths["md"].write_text(f"{title}\n\n{table}" if title else table)
    write_csv(rows, classes, labels, paths["csv"])
    drawn = plot(rows, paths["png"], title)
    per_class = plot_per_class(rows, classes, labels, paths["png_per_class"], title)
    deltas = plot_deltas(rows, paths["png_deltas"], title)
    if not deltas:
        del paths["png_deltas"]
    return {**{k: str(v) for k, v in paths.items()}, "drawn": drawn, "drawn_per_class": per_class,
            "drawn_deltas": deltas}
