"""The README's front-page figure: one cell's arms, normalized score and p over the online steps.

    python benchmark/front_figure.py --from-csv benchmark/results/plateau/scalars \
        --out benchmark/results/plateau/front.png --title "HalfCheetah medium, TD3+BC pretrained 300k steps"

Reads the per-run CSVs that `report.py --export-csv` writes (one line per arm: the mean over runs and its 95%
percentile bootstrap band over runs, as report.py draws them), so the figure rebuilds from committed results alone.
"""
import io
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import tyro

from report import SCORE_TAG, fail, mean_band, method_rank, runs_from_csv, write_staged

LABELS = {  # run_suite's method names, as a reader of the figure would say them
    "none": "plain fine-tuning (p = 0)",
    "offline-0.5": "plain, half of each batch offline",
    "samg-adaptive": "SAMG default (Q_off frozen, C-VAE adaptive)",
    "samg-static": "SAMG, C-VAE frozen too",
    "samg": "SAMG, adaptive, Q_off replaced every 50k steps (earlier default)",
    "even-0.05-static": "constant p = 0.05 (no conditioning)",
}


@dataclass
class Args:
    from_csv: str
    """a folder of report.py --export-csv files (one cell: one dataset and algorithm)"""
    out: str
    """the PNG to write"""
    title: str = ""
    """the figure's title (default: the cell's dataset and algorithm)"""
    methods: Optional[List[str]] = None
    """the arms to draw, in this order (default: every arm in the folder)"""
    reps: int = 2000
    """bootstrap resamples of the bands"""


def main(args: Args):
    runs = runs_from_csv([args.from_csv])
    cells = {(run["meta"]["env_id"], run["meta"]["algo"]) for run in runs}
    if len(cells) != 1:
        fail(f"{args.from_csv} holds {len(cells)} cells (dataset, algorithm); the figure shows one")
    methods = args.methods or sorted({run["meta"]["method"] for run in runs}, key=method_rank)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for index, method in enumerate(methods):
        arm = [run["scalars"] for run in runs if run["meta"]["method"] == method]
        for ax, tag in zip(axes, (SCORE_TAG, "samg/p_mean")):
            curves = [scalars[tag] for scalars in arm if tag in scalars and len(scalars[tag][0])]
            if not curves:
                continue
            steps, mean, low, high = mean_band(curves, args.reps, seed=0)
            ax.plot(steps, mean, color=f"C{index}", label=f"{LABELS.get(method, method)} (n={len(curves)})")
            ax.fill_between(steps, low, high, color=f"C{index}", alpha=0.15, linewidth=0)
    axes[0].set(title="normalized score (evaluation, 5 episodes)", xlabel="online environment steps")
    axes[1].set(title="p: mean over the batch", xlabel="online environment steps", ylim=(-0.02, None))
    axes[0].legend(fontsize=7, loc="lower right")
    for ax in axes:
        ax.grid(alpha=0.3)
    env_id, algo = next(iter(cells))
    fig.suptitle(args.title or f"{env_id}, {algo}: mean over runs, 95% bootstrap band")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    write_staged(Path(args.out), buffer.getvalue())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
