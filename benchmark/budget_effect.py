"""Does an arm's effect change with how long the offline agent was pretrained? Two exported cells of one dataset and
algorithm (`report.py --export-csv` folders), pretrained for a short and a long budget, e.g. frozen-dip's 30k-step and
plateau's 300k-step TD3+BC checkpoints on HalfCheetah medium:

    python benchmark/budget_effect.py --short benchmark/results/frozen-dip/scalars \
        --long benchmark/results/plateau/scalars --env-id local/halfcheetah/medium-v0 --algo td3bc \
        --rename samg=samg-adaptive --out benchmark/results/plateau/budget_effect.md

Per arm and budget, each checkpoint's paired difference to the reference arm (its mean over the online seeds minus the
reference's mean over the same checkpoint's seeds, as report.py pairs them). The change with the budget is the mean
difference at the long budget minus the mean at the short one, tested by an exact two-sample permutation test over
the checkpoints: every way to split the pooled checkpoint differences into groups of the two sizes, p = the share of
splits whose |difference of means| reaches the observed one. The checkpoints of the two budgets are independent (not
paired), so with 3 and 3 checkpoints there are 20 splits and the smallest p is 2/20 = 0.1: this test can say that the
two budgets' effects differ only when they differ a lot and consistently. Beside it, both budgets' checkpoints pooled
(how many point each way, report.py's exact sign-flip p): whether the arm differs from the reference at either budget.
"""
import itertools
import math
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import tyro

from report import (by_checkpoint, check_out, checkpoint_differences, fail, pooled_test, print_and_write, runs_from_csv,
                    scored_runs)

SCORES = {"final": "final", "dip": "dip", "during": "mean after warm-up"}


@dataclass
class Args:
    short: str
    """report.py --export-csv folder of the short pretraining budget"""
    long: str
    """report.py --export-csv folder of the long pretraining budget"""
    env_id: str
    """the cell's dataset id (both folders may hold other cells; only this one is read)"""
    algo: str = "td3bc"
    """the cell's offline algorithm"""
    reference: str = "none"
    """the arm every other arm is compared with, at each budget"""
    rename: List[str] = field(default_factory=list)
    """OLD=NEW: a method name of the short folder read as NEW (e.g. samg=samg-adaptive: frozen-dip's default, whose
    50k-step Q_off refresh never came in its 20k steps, is the run today's default makes)"""
    final_evals: int = 3
    """the final score: mean of this many last evaluations (as report.py)"""
    dip_fraction: float = 0.3
    """the dip: lowest evaluation within this share of the online steps (as report.py)"""
    out: Optional[str] = None
    """write the table here as markdown (default: print it only)"""


def permutation_p(x, y) -> float:
    """Exact two-sided two-sample permutation p of mean(x) - mean(y): the share of the ways to choose len(x) of the
    pooled values as `x` whose |difference of means| is at least the observed one (within 1e-9); NaN when a group is
    empty."""
    pooled, n = np.concatenate([np.asarray(x, float), np.asarray(y, float)]), len(x)
    if n == 0 or len(y) == 0:
        return math.nan
    observed, total, hits = abs(np.mean(x) - np.mean(y)), pooled.sum(), 0
    splits = list(itertools.combinations(range(len(pooled)), n))
    for chosen in splits:
        first = pooled[list(chosen)].sum()
        hits += abs(first / n - (total - first) / len(y)) >= observed - 1e-9 * max(1.0, np.abs(pooled).max())
    return hits / len(splits)


def cell(folder: str, args: Args, rename: dict) -> dict:
    """The cell's scored runs by method (renamed), each grouped by checkpoint per score."""
    runs = [run for run in runs_from_csv([folder])
            if run["meta"]["env_id"] == args.env_id and run["meta"]["algo"] == args.algo]
    if not runs:
        fail(f"{folder} holds no run of {args.env_id} with {args.algo}; export the cell with report.py --export-csv")
    methods = {}
    for run in scored_runs(runs, args.final_evals, args.dip_fraction):
        methods.setdefault(rename.get(run["method"], run["method"]), []).append(run)
    if args.reference not in methods:
        fail(f"{folder} has no run of the reference arm {args.reference} in this cell; pass another --reference")
    return methods


def main(args: Args):
    check_out(args.out)
    rename = dict(pair.split("=", 1) for pair in args.rename if "=" in pair)
    if len(rename) != len(args.rename):
        fail("--rename takes OLD=NEW pairs, e.g. --rename samg=samg-adaptive")
    short, long = cell(args.short, args, rename), cell(args.long, args, rename)
    lines = [f"Each arm minus `{args.reference}`, per checkpoint (mean over its online seeds), at the short and the "
             "long pretraining budget; change = long - short, with the exact two-sample permutation p over the "
             "checkpoints (independent checkpoints; with 3 and 3 the smallest p is 0.1). Offline score: "
             "the evaluation at online step 0.", "",
             "Both budgets pooled: the checkpoints of both, below / above the reference, and the exact sign-flip p "
             "of their mean difference (smallest with 6 checkpoints: 0.031).", "",
             "| arm | score | short: ckpt, mean difference (each checkpoint) | long: ckpt, mean difference (each "
             "checkpoint) | change | permutation p | both: below / above, sign-flip p |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    offline = {name: np.mean([v.mean() for v in by_checkpoint(methods[args.reference], "offline").values()])
               for name, methods in (("short", short), ("long", long))}
    for method in [m for m in long if m in short and m != args.reference]:
        for key, name in SCORES.items():
            d_short = checkpoint_differences(by_checkpoint(short[method], key), by_checkpoint(short[args.reference], key))
            d_long = checkpoint_differences(by_checkpoint(long[method], key), by_checkpoint(long[args.reference], key))
            if not d_short or not d_long:
                continue
            each = lambda d: f"{len(d)}, {np.mean(d):+.1f} ({', '.join(f'{v:+.1f}' for v in d)})"
            both = pooled_test(d_short + d_long)
            lines.append(f"| {method} | {name} | {each(d_short)} | {each(d_long)} | "
                         f"{np.mean(d_long) - np.mean(d_short):+.1f} | {permutation_p(d_long, d_short):.2f} | "
                         f"{both['negative']} / {both['positive']}, {both['sign_flip_p']:.3f} |")
    lines += ["", f"Offline scores (mean over checkpoints): short {offline['short']:.1f}, long {offline['long']:.1f}."]
    print_and_write("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main(tyro.cli(Args))
