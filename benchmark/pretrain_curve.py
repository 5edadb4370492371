"""A pretraining run's evaluation curve as a CSV (and a PNG): one row per evaluation, step and normalized score.

    python benchmark/pretrain_curve.py --run-dir runs/local-halfcheetah-medium-v0__pretrain_td3bc__1__1796... \
        --out benchmark/results/plateau/pretrain_curve.csv

It reads the TensorBoard log that pretrain_offline.py writes (`eval/normalized_score`, `eval/return`), so it can be
run while the pretraining is still going: the CSV then ends at the last evaluation so far. The plateau is read off
the curve as the first evaluation within `--within` points of the best one so far.
"""
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402  (read_scalars)


@dataclass
class Args:
    run_dir: str
    """the pretraining run's TensorBoard directory (or a folder above it)"""
    out: str
    """the CSV to write (a PNG of the curve is written beside it)"""
    within: float = 1.0
    """the plateau: the first evaluation within this many points of the best"""


def main(args: Args):
    scalars = report.read_scalars(Path(args.run_dir), tags=("eval/normalized_score", "eval/return"))
    if "eval/normalized_score" not in scalars:
        raise SystemExit(f"error: no eval/normalized_score under {args.run_dir}; give a pretraining run's log folder")
    steps, scores = scalars["eval/normalized_score"]
    returns = dict(zip(*scalars.get("eval/return", ((), ()))))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["step", "normalized_score", "return"])
        for step, score in zip(steps, scores):
            writer.writerow([int(step), f"{score:.2f}", f"{returns.get(step, float('nan')):.1f}"])
    best = scores.max()
    plateau = int(steps[(scores >= best - args.within).argmax()])
    print(f"{len(steps)} evaluations to step {int(steps[-1])}; best {best:.1f} at step {int(steps[scores.argmax()])}; "
          f"first within {args.within:g} of it at step {plateau}; written to {out}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, scores, marker="o")
    ax.set_xlabel("pretraining step")
    ax.set_ylabel("normalized score")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main(tyro.cli(Args))
