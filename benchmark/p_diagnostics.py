"""p in one cell, per arm over the online steps: the table of SAMG diagnostics that benchmark/README.md shows per cell.

    python benchmark/p_diagnostics.py --from-csv benchmark/results/plateau/scalars \
        --env-id local/halfcheetah/medium-v0 --algo td3bc

Reads the per-run CSVs of `report.py --export-csv`. For each arm and each window of online steps (default 3k-5k,
8k-12k and 16k-20k): the mean over the arm's runs of each run's mean in the window of samg/p_mean (the batch's mean p),
samg/p_active_frac (the share of the batch with p > 0), samg/p_q50 (its median p), samg/p_auroc (how well p ranks
offline pairs above random actions) and samg/qoff_values - samg/qbar_values (the frozen offline critic's value of the
next pairs minus the online target critic's). "-" where the arm's runs did not log it (p_q50 and AUROC only where p
comes from the C-VAE; AUROC only with a reservoir).
"""
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import tyro

from report import check_out, fail, method_rank, print_and_write, runs_from_csv

COLUMNS = (("p_mean", "samg/p_mean", "{:.3f}"), ("share with p > 0", "samg/p_active_frac", "{:.2f}"),
           ("median p", "samg/p_q50", "{:.2f}"), ("AUROC", "samg/p_auroc", "{:.3f}"), ("Q_off - Qbar", None, "{:.1f}"))


@dataclass
class Args:
    from_csv: List[str]
    """report.py --export-csv folders"""
    env_id: str
    """the cell's dataset id"""
    algo: str = "td3bc"
    """the cell's offline algorithm"""
    windows: List[str] = field(default_factory=lambda: ["3000-5000", "8000-12000", "16000-20000"])
    """windows of online steps, FIRST-LAST (both included)"""
    out: Optional[str] = None
    """write the table here as markdown (default: print it only)"""


def window_mean(scalars: dict, tag: Optional[str], low: int, high: int) -> float:
    """The run's mean of `tag` over logged steps in [low, high] (tag None: Q_off - Qbar); NaN where not logged."""
    if tag is None:
        if "samg/qoff_values" not in scalars or "samg/qbar_values" not in scalars:
            return np.nan
        (steps, qoff), (steps_bar, qbar) = scalars["samg/qoff_values"], scalars["samg/qbar_values"]
        common, at_off, at_bar = np.intersect1d(steps, steps_bar, return_indices=True)
        steps, values = common, qoff[at_off] - qbar[at_bar]
    elif tag in scalars:
        steps, values = scalars[tag]
    else:
        return np.nan
    inside = (steps >= low) & (steps <= high)
    return float(values[inside].mean()) if inside.any() else np.nan


def main(args: Args):
    check_out(args.out)
    try:
        windows = [tuple(int(x) for x in window.split("-")) for window in args.windows]
    except ValueError:
        fail(f"--windows takes FIRST-LAST step ranges, e.g. 3000-5000; got {' '.join(args.windows)}")
    runs = [run for run in runs_from_csv(args.from_csv)
            if run["meta"]["env_id"] == args.env_id and run["meta"]["algo"] == args.algo]
    if not runs:
        fail(f"no run of {args.env_id} with {args.algo} in {' '.join(args.from_csv)}")
    methods = sorted({run["meta"]["method"] for run in runs}, key=method_rank)
    names = " / ".join(f"{low // 1000}k-{high // 1000}k" for low, high in windows)
    lines = [f"Per arm, the mean over its runs of each run's mean at steps {names}:", "",
             "| arm | runs | " + " | ".join(name for name, _, _ in COLUMNS) + " |",
             "| --- | --- |" + " --- |" * len(COLUMNS)]
    for method in methods:
        arm = [run["scalars"] for run in runs if run["meta"]["method"] == method]
        cells = []
        for _, tag, form in COLUMNS:
            values = [np.nanmean([window_mean(s, tag, low, high) for s in arm]) if any(
                np.isfinite(window_mean(s, tag, low, high)) for s in arm) else np.nan for low, high in windows]
            cells.append("-" if all(np.isnan(values)) else " / ".join(
                "-" if np.isnan(v) else form.format(v) for v in values))
        lines.append(f"| {method} | {len(arm)} | " + " | ".join(cells) + " |")
    print_and_write("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main(tyro.cli(Args))
