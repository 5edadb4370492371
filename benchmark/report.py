"""The benchmark's results table and learning curves, read from the TensorBoard logs of the online runs.

    python benchmark/report.py --runs-dir runs/quick

Every online run that benchmark/run_suite.py starts has its own directory holding the TensorBoard events (in the
subdirectory the script names), a `suite.json` that says what the run is (env id, algo, method, seed, online
steps) and, once the run exited cleanly, a `DONE` file. This script groups the finished runs by (env id, algo,
method) and writes:

- `results.md`: per group, mean +- std over seeds of the offline score (the evaluation at online step 0), the
  final online score (the mean of the last `--final-evals` evaluations of each run, by default just the last
  one) and the fine-tuning dip (the lowest evaluation after step 0 within the first 10% of online steps);
  std is the sample standard deviation (ddof = 1), so it needs two seeds;
- `curves_{env}__{algo}.png`: one line per method (mean over seeds), with a band of +- one std.

All scores are D4RL-normalized (`eval/normalized_score`, x100).
"""
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import tyro

SCORE_TAG = "eval/normalized_score"
METHOD_ORDER = ["cvae", "cvae-static", "even", "even-static", "random", "random-static", "none"]
METHOD_LABELS = {
    "cvae": "SAMG (C-VAE p, adaptive)",
    "cvae-static": "SAMG (C-VAE p, static)",
    "even": "even p = 0.5 (adaptive)",
    "even-static": "even p = 0.5 (static)",
    "random": "random p (adaptive)",
    "random-static": "random p (static)",
    "none": "no guidance (p = 0)",
}


@dataclass
class Args:
    runs_dir: str = "runs"
    """searched recursively for run directories with a `suite.json`"""
    out_dir: str = "benchmark/results"
    """where `results.md` and the PNG curves are written"""
    final_evals: int = 1
    """the final online score of a run is the mean of its last this many evaluations"""
    dip_fraction: float = 0.1
    """the dip is the lowest evaluation after step 0 within this fraction of the online steps"""
    include_unfinished: bool = False
    """also use runs without a `DONE` file (still running or failed)"""


# --- reading the runs ---
def find_runs(runs_dir: str, include_unfinished: bool = False) -> List[Tuple[dict, Path]]:
    """(metadata, run directory) of every run under `runs_dir` that the suite described in a `suite.json`."""
    runs = []
    for meta_path in sorted(Path(runs_dir).rglob("suite.json")):
        if include_unfinished or (meta_path.parent / "DONE").exists():
            runs.append((json.loads(meta_path.read_text()), meta_path.parent))
    return runs


def read_scalar(run_dir: Path, tag: str = SCORE_TAG) -> Tuple[np.ndarray, np.ndarray]:
    """Steps and values of one scalar from every event file under `run_dir` (the scripts log into a
    subdirectory named after the run), sorted by step; a step logged twice keeps its latest value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = []
    for event_file in sorted(Path(run_dir).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            events += accumulator.Scalars(tag)
    by_step = {}
    for event in sorted(events, key=lambda e: e.wall_time):
        by_step[event.step] = event.value
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


# --- the table's arithmetic ---
def run_scores(steps: np.ndarray, values: np.ndarray, total_steps: int, final_evals: int = 1,
               dip_fraction: float = 0.1) -> Dict[str, float]:
    """Offline score (the evaluation at step 0), final score (mean of the last `final_evals` evaluations after
    step 0) and dip (lowest evaluation in 0 < step <= dip_fraction * total_steps) of one run; NaN where the
    log has no such evaluation."""
    steps, values = np.asarray(steps), np.asarray(values, dtype=np.float64)
    offline = values[steps == 0]
    online = values[steps > 0]
    early = values[(steps > 0) & (steps <= dip_fraction * total_steps)]
    return {
        "offline": float(offline[-1]) if offline.size else math.nan,
        "final": float(online[-final_evals:].mean()) if online.size else math.nan,
        "dip": float(early.min()) if early.size else math.nan,
    }


def mean_std(values) -> Tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1) of the finite values; std is NaN below two values."""
    values = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else math.nan


def method_rank(method: str) -> Tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def summarize(per_run: List[dict]) -> List[dict]:
    """Rows of the table, one per (env id, algo, method): seeds and mean/std of offline, final and dip.
    `per_run` holds dicts with env_id, algo, method, seed and the keys of run_scores."""
    groups: Dict[Tuple[str, str, str], List[dict]] = {}
    for run in per_run:
        groups.setdefault((run["env_id"], run["algo"], run["method"]), []).append(run)
    rows = []
    for (env_id, algo, method), runs in sorted(groups.items(), key=lambda kv: (*kv[0][:2], method_rank(kv[0][2]))):
        row = {"env_id": env_id, "algo": algo, "method": method, "seeds": sorted(run["seed"] for run in runs)}
        for key in ("offline", "final", "dip"):
            row[key], row[f"{key}_std"] = mean_std([run[key] for run in runs])
        rows.append(row)
    return rows


def format_score(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.1f}" if not math.isfinite(std) else f"{mean:.1f} ± {std:.1f}"


def markdown_table(rows: List[dict], dip_fraction: float = 0.1) -> str:
    lines = [
        f"| env | algo | method | seeds | offline | final online | dip (first {dip_fraction:.0%}) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['env_id']} | {row['algo']} | {METHOD_LABELS.get(row['method'], row['method'])} | "
            f"{len(row['seeds'])} | {format_score(row['offline'], row['offline_std'])} | "
            f"{format_score(row['final'], row['final_std'])} | {format_score(row['dip'], row['dip_std'])} |"
        )
    return "\n".join(lines) + "\n"


# --- learning curves ---
def mean_curve(curves: List[Tuple[np.ndarray, np.ndarray]]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and sample std over seeds at the evaluation steps that every seed logged (std 0 for one seed)."""
    common = curves[0][0]
    for steps, _ in curves[1:]:
        common = np.intersect1d(common, steps)
    stacked = np.stack([values[np.searchsorted(steps, common)] for steps, values in curves])
    std = stacked.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(common))
    return common, stacked.mean(axis=0), std


def plot_curves(curves: Dict[Tuple[str, str, str], List[Tuple[np.ndarray, np.ndarray]]], out_dir: Path) -> List[Path]:
    """One PNG per (env id, algo), one line per method, a band of +- one std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for env_id, algo in sorted({(env_id, algo) for env_id, algo, _ in curves}):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        methods = sorted((m for e, a, m in curves if (e, a) == (env_id, algo)), key=method_rank)
        for method in methods:
            seed_curves = [c for c in curves[(env_id, algo, method)] if len(c[0])]
            if not seed_curves:
                continue
            steps, mean, std = mean_curve(seed_curves)
            line, = ax.plot(steps, mean, label=f"{METHOD_LABELS.get(method, method)} (n={len(seed_curves)})")
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(f"{env_id}, {algo}")
        ax.set_xlabel("online environment steps")
        ax.set_ylabel("normalized score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"curves_{env_id.replace('/', '-')}__{algo}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def build_report(args: Args) -> Tuple[str, List[Path]]:
    """Reads every run, writes results.md and the curves into args.out_dir; returns the table and PNG paths."""
    runs = find_runs(args.runs_dir, args.include_unfinished)
    if not runs:
        raise SystemExit(f"error: no finished runs (a `suite.json` next to a `DONE` file) under {args.runs_dir}; "
                         "run benchmark/run_suite.py first, or pass --include-unfinished")
    per_run, curves = [], {}
    for meta, run_dir in runs:
        steps, values = read_scalar(run_dir)
        if steps.size == 0:
            print(f"warning: {run_dir} has no {SCORE_TAG}; left out")
            continue
        total_steps = meta.get("total_timesteps") or int(steps.max())
        scores = run_scores(steps, values, total_steps, args.final_evals, args.dip_fraction)
        per_run.append({**{k: meta[k] for k in ("env_id", "algo", "method", "seed")}, **scores})
        curves.setdefault((meta["env_id"], meta["algo"], meta["method"]), []).append((steps, values))
    table = markdown_table(summarize(per_run), args.dip_fraction)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Results\n\nFrom {len(per_run)} runs under `{args.runs_dir}`. D4RL-normalized scores (x100), mean ± sample "
        f"std over seeds. offline = evaluation at online step 0; final online = mean of the last {args.final_evals} "
        f"evaluation(s); dip = lowest evaluation after step 0 within the first {args.dip_fraction:.0%} of online "
        "steps.\n\n"
    )
    (out_dir / "results.md").write_text(header + table)
    return table, plot_curves(curves, out_dir)


if __name__ == "__main__":
    args = tyro.cli(Args)
    table, pngs = build_report(args)
    print(table)
    print(f"wrote {os.path.join(args.out_dir, 'results.md')} and {len(pngs)} PNG file(s)")
