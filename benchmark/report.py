"""The benchmark's results: per-cell tables, cross-task statistics (rliable) and plots, from the online runs' logs.

    python benchmark/report.py --runs-dir runs/quick                      # writes runs/quick/report/
    python benchmark/report.py --runs-dir runs/quick --export-csv         # ... and runs/quick/report/scalars/
    python benchmark/report.py --from-csv runs/quick/report/scalars --out-dir /tmp/rebuilt   # no logs needed
    python benchmark/report.py --runs-dir runs/locomotion-cpu --env-ids local/hopper/medium-v0 \
        local/hopper/medium-replay-v0                                     # one environment's runs only

Every online run that benchmark/run_suite.py starts has its own directory holding the TensorBoard events (in the
subdirectory the script names), a `suite.json` that says what the run is (env id, algo, method, flags, seed,
checkpoint seed, online steps) and, once the run exited cleanly, a `DONE` file. A cell is one (env id, algo,
method); a task is one (env id, algo). The report (in `--out-dir`, by default `{runs_dir}/report`) holds:

- `results.md`: per cell, the offline score (the evaluation at online step 0), the final online score (the mean
  of the last `--final-evals` evaluations of a run), the fine-tuning dip (the lowest evaluation after step 0
  within the first `--dip-fraction` of the online steps) and the mean of every evaluation after the run's
  warm-up (`learning_starts` in suite.json), each with a 95% percentile bootstrap interval. The unit of evidence
  is the independent checkpoint: a cell whose runs fine-tuned several checkpoints (`checkpoint_seed`) is the mean
  over checkpoints of each one's mean over seeds, its interval from resampling the checkpoints and then the seeds
  within each; a cell with one checkpoint is the mean over its seeds, resampled. With several checkpoints, each
  arm is also set against none, offline-0.5 and even / even-static in the same cell (the shipped default also
  against its frozen variant, samg-static), paired by checkpoint (the difference's interval from the same nested
  resampling of both). "Pooled across cells": each of these comparisons over the checkpoints of every cell where
  both arms ran (one paired difference per checkpoint: its mean over seeds of the arm minus the reference's), with
  how many point each way, their mean, the exact two-sided sign-flip (permutation) p of the mean (all 2^n sign
  patterns up to n = 20, a seeded Monte-Carlo above) and the exact two-sided sign test. Across tasks, with
  rliable: the interquartile mean (IQM) of the final scores per method with stratified bootstrap 95% intervals,
  and the probability of improvement of every SAMG method (name `samg...`) over each baseline (none,
  offline-0.5, even, random), with its interval; with several checkpoints everywhere, over checkpoints (each
  one's mean over its seeds). Only methods that have runs in every task enter these; the report names the ones
  left out.
- `curves_{env}__{algo}.png`: per task a 2x2 figure (2x3 where runs logged samg/p_q50 and samg/p_auroc), one line
  per method: the normalized score, and the SAMG
  diagnostics samg/p_mean, samg/p_active_frac and Q_off - Qbar (samg/qoff_values - samg/qbar_values); each line
  is the mean over seeds with a 95% percentile bootstrap band, at the steps every seed logged.
- with `--export-csv`, `scalars/{run id}.csv` (a `step` column and one column per logged scalar of EXPORT_TAGS,
  empty where the scalar was not logged at that step) and `scalars/{run id}.json` (the run's suite.json), from
  which `--from-csv` rebuilds the same report without the TensorBoard logs. Several `--from-csv` folders (say one
  per environment) make one report over all their runs; `--env-ids` keeps the runs of the env ids given.

What a percentile interval over 3 checkpoints can and cannot show: the checkpoints can be resampled in only 10
distinct ways (multisets of 3 of 3), and each draw of one checkpoint three times has probability 1/27, above
2.5%, so, the seeds' spread aside, the 95% interval of a paired difference runs from the lowest checkpoint's
difference to the highest. An interval that excludes 0 is then close to "all three checkpoints point the same
way", which happens by chance in 2 of the 8 sign patterns when there is no difference: it can show that the
checkpoints agree in sign, not an error rate near the nominal 5%, nor a difference that one checkpoint reverses.
The smallest exact two-sided sign-flip p is 0.25 with 3 checkpoints, 0.0039 with 9: per-cell `higher` / `lower`
labels are first readings, and a claim across cells rests on the pooled tests. results.md says this in its header
for the number of checkpoints it has.

The bootstrap is seeded (`--seed`), so the same runs give the same report. All scores are D4RL-normalized
(`eval/normalized_score`, x100).
"""
import csv
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import tyro

SCORE_TAG = "eval/normalized_score"
# the scalars a CSV export keeps (those a run logged), in column order
EXPORT_TAGS = (
    "eval/normalized_score", "eval/return", "eval/success", "charts/episodic_return", "losses/qf_loss",
    "losses/qf_values", "losses/actor_loss", "losses/alpha", "losses/value_loss", "samg/p_mean", "samg/p_active_frac",
    "samg/qoff_values", "samg/qbar_values", "samg/qoff_above_frac", "samg/intrinsic", "samg/target_shift",
    "samg/cvae_loss",
    "samg/p_q10", "samg/p_q50", "samg/p_q90", "samg/p_auroc",
)
METHOD_ORDER = ["samg", "samg-next", "samg-sample", "samg-both", "samg-static", "samg-static-sample",
                "samg-static-deterministic", "samg-refresh-only",
                "samg-cvae-only", "samg-outgrown", "samg-linear", "even", "even-static", "even-0.05-static", "random",
                "random-static", "offline-0.5", "none"]
BASELINES = ("none", "offline-0.5", "even", "even-static", "even-0.05-static", "random", "random-static")
# what each arm is set against per cell, at the checkpoint level: the two plain baselines, the constant p under
# the same setting (does p's conditioning matter?) and, for the shipped default only, its frozen variant (does the
# adaptive C-VAE help?)
REFERENCES = {"none": "none", "offline-0.5": "offline-0.5", "even": "even", "even-static": "even-static",
              "even-0.05-static": "even-0.05-static", "samg-static": "samg-static"}
SAMG_DEFAULTS = ("samg", "samg-next")  # the method the verdict lines speak for: the first one present
# the pooled sign-flip test enumerates every sign pattern up to this many checkpoints, and draws this many above
EXACT_SIGN_FLIP_MAX = 20
SIGN_FLIP_DRAWS = 100_000
Scalars = Dict[str, Tuple[np.ndarray, np.ndarray]]  # tag -> (steps, values)


@dataclass
class Args:
    runs_dir: str = "runs"
    """searched recursively for run directories with a `suite.json`"""
    out_dir: Optional[str] = None
    """where results.md, the PNG figures and the CSV export go (default: {runs_dir}/report)"""
    from_csv: Optional[List[str]] = None
    """build the report from folders written by --export-csv (one or several, e.g. one per environment) instead
    of the TensorBoard logs under --runs-dir"""
    env_ids: Optional[List[str]] = None
    """report only the runs of these env ids, e.g. one environment's datasets (default: every run found)"""
    export_csv: bool = False
    """also write each run's scalars and suite.json into {out_dir}/scalars/"""
    final_evals: int = 1
    """the final online score of a run is the mean of its last this many evaluations"""
    dip_fraction: float = 0.1
    """the dip is the lowest evaluation after step 0 within this fraction of the online steps"""
    reps: int = 2000
    """bootstrap resamples of every interval"""
    seed: int = 0
    """seed of the bootstrap"""
    include_unfinished: bool = False
    """also use runs without a `DONE` file (still running or failed)"""
    plots: bool = True
    """draw the per-task figures (--no-plots for a table across environments whose own reports have them)"""


def fail(message: str):
    raise SystemExit(f"error: {message}")


def write_staged(path: Path, data: bytes):
    """Writes `path` whole or not at all: into a temporary file beside it, then renamed over it."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def check_out(out: Optional[str]):
    """One sentence, before any work, when --out's folder does not exist."""
    if out and not Path(out).resolve().parent.is_dir():
        fail(f"--out {out}: its folder does not exist; make it first or write elsewhere")


def print_and_write(text: str, out: Optional[str]):
    """Prints a markdown table and, with --out, writes it there whole (staged)."""
    print(text, end="")
    if out:
        write_staged(Path(out), text.encode())
        print(f"wrote {out}")


# --- reading the runs: from the TensorBoard logs, or from a CSV export ---
def read_scalars(run_dir: Path, tags=EXPORT_TAGS) -> Scalars:
    """Steps and values of each of `tags` that any event file under `run_dir` holds (the scripts log into a
    subdirectory named after the run), sorted by step; a step logged twice keeps its latest value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events: Dict[str, list] = {}
    for event_file in sorted(Path(run_dir).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(event_file), size_guidance={"scalars": 0, "histograms": 1, "tensors": 1})
        accumulator.Reload()
        for tag in set(tags) & set(accumulator.Tags().get("scalars", [])):
            events.setdefault(tag, []).extend(accumulator.Scalars(tag))
    scalars = {}
    for tag in [tag for tag in tags if tag in events]:
        by_step = {event.step: event.value for event in sorted(events[tag], key=lambda e: e.wall_time)}
        steps = np.array(sorted(by_step), dtype=np.int64)
        scalars[tag] = (steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return scalars


def runs_from_logs(runs_dir: str, include_unfinished: bool = False) -> List[dict]:
    """{id, meta, scalars} of every run under `runs_dir` that the suite described in a `suite.json`; the id is the
    run directory's path below `runs_dir`, with `__` for the separators."""
    runs = []
    meta_paths = sorted(Path(runs_dir).rglob("suite.json"))
    for count, meta_path in enumerate(meta_paths, 1):
        if not (include_unfinished or (meta_path.parent / "DONE").exists()):
            continue
        relative = meta_path.parent.relative_to(runs_dir).parts or (meta_path.parent.resolve().name,)
        runs.append({"id": "__".join(relative), "meta": json.loads(meta_path.read_text()),
                     "scalars": read_scalars(meta_path.parent)})
        if count % 25 == 0:
            print(f"read {count}/{len(meta_paths)} runs", flush=True)
    return runs


def export_csv(run: dict, directory: Path):
    """`{id}.csv` (step, then one column per scalar; empty where not logged) and `{id}.json` (its suite.json)."""
    tags = [tag for tag in EXPORT_TAGS if tag in run["scalars"]]
    columns = {tag: dict(zip(steps.tolist(), values.tolist())) for tag, (steps, values) in run["scalars"].items()}
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["step", *tags])
    for step in sorted({step for tag in tags for step in columns[tag]}):
        writer.writerow([step, *(repr(columns[tag][step]) if step in columns[tag] else "" for tag in tags)])
    write_staged(directory / f"{run['id']}.csv", text.getvalue().encode())
    write_staged(directory / f"{run['id']}.json", (json.dumps(run["meta"], indent=1) + "\n").encode())


def runs_from_csv(directories: List[str]) -> List[dict]:
    """The runs of --export-csv folders: each `{id}.csv` with its `{id}.json`."""
    runs = []
    for csv_path in sorted(path for directory in directories for path in Path(directory).glob("*.csv")):
        meta_path = csv_path.with_suffix(".json")
        if not meta_path.exists():
            fail(f"{csv_path} has no {meta_path.name} beside it; export again with --export-csv")
        with open(csv_path, newline="") as file:
            rows = list(csv.reader(file))
        header, rows = rows[0], rows[1:]
        scalars = {}
        for column, tag in enumerate(header[1:], 1):
            pairs = [(int(row[0]), float(row[column])) for row in rows if row[column] != ""]
            scalars[tag] = (np.array([s for s, _ in pairs], dtype=np.int64), np.array([v for _, v in pairs]))
        runs.append({"id": csv_path.stem, "meta": json.loads(meta_path.read_text()), "scalars": scalars})
    ids = [run["id"] for run in runs]
    if len(set(ids)) < len(ids):
        twice = sorted({run_id for run_id in ids if ids.count(run_id) > 1})
        fail(f"run {twice[0]} is in more than one --from-csv folder; give each exported run once")
    return runs


# --- per run and per cell ---
def run_scores(steps: np.ndarray, values: np.ndarray, total_steps: int, final_evals: int = 1,
               dip_fraction: float = 0.1, warmup: int = 0) -> Dict[str, float]:
    """Offline score (the evaluation at step 0), final score (mean of the last `final_evals` evaluations after
    step 0), dip (lowest evaluation in 0 < step <= dip_fraction * total_steps) and during (mean of every
    evaluation after the `warmup` steps: what fine-tuning costs while it runs) of one run; NaN where the log has
    no such evaluation."""
    steps, values = np.asarray(steps), np.asarray(values, dtype=np.float64)
    offline = values[steps == 0]
    online = values[steps > 0]
    early = values[(steps > 0) & (steps <= dip_fraction * total_steps)]
    after_warmup = values[steps > max(warmup, 0)]
    return {
        "offline": float(offline[-1]) if offline.size else math.nan,
        "final": float(online[-final_evals:].mean()) if online.size else math.nan,
        "dip": float(early.min()) if early.size else math.nan,
        "during": float(after_warmup.mean()) if after_warmup.size else math.nan,
    }


def scored_runs(runs: List[dict], final_evals: int, dip_fraction: float) -> List[dict]:
    """Per run with an evaluation curve: its cell, method, seed, checkpoint_seed and run_scores."""
    per_run = []
    for run in runs:
        steps, values = run["scalars"][SCORE_TAG]
        total_steps = run["meta"].get("total_timesteps") or int(steps.max())
        scores = run_scores(steps, values, total_steps, final_evals, dip_fraction,
                            run["meta"].get("learning_starts") or 0)
        per_run.append({**{k: run["meta"][k] for k in ("env_id", "algo", "method", "seed")},
                        "checkpoint_seed": run["meta"].get("checkpoint_seed", 1), **scores})
    return per_run


def bootstrap_mean_ci(values, reps: int, seed: int) -> Tuple[float, float, float]:
    """Mean of the finite values and its 95% percentile bootstrap interval (values resampled with replacement,
    `reps` times, by numpy's default_rng(seed)); NaNs when there are no finite values."""
    values = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan, math.nan
    means = values[np.random.default_rng(seed).integers(0, values.size, (reps, values.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), float(low), float(high)


def by_checkpoint(runs: List[dict], key: str) -> Dict[int, np.ndarray]:
    """The finite values of `key` of the runs, grouped by the checkpoint they fine-tuned (checkpoint_seed)."""
    groups: Dict[int, list] = {}
    for run in runs:
        if math.isfinite(run[key]):
            groups.setdefault(run.get("checkpoint_seed", 1), []).append(run[key])
    return {checkpoint: np.asarray(values) for checkpoint, values in sorted(groups.items())}


def nested_resamples(arms: List[List[np.ndarray]], reps: int, seed: int) -> np.ndarray:
    """The checkpoint-level bootstrap. `arms` holds, per arm, one array of seed scores per checkpoint, the same
    checkpoints in the same order for every arm. Each of `reps` resamples draws the checkpoints with replacement
    (the same draw for every arm: they fine-tune the same checkpoints), then, within each drawn checkpoint and for
    each arm in turn, that arm's seeds with replacement; its statistic is the mean over the drawn checkpoints of
    the mean of the drawn seeds. Returns an (arms, reps) array. Draws: numpy's default_rng(seed), per resample
    first the checkpoint indices, then the seed indices checkpoint by checkpoint, arm by arm."""
    rng = np.random.default_rng(seed)
    count = len(arms[0])
    out = np.empty((len(arms), reps))
    for rep in range(reps):
        picks = rng.integers(0, count, count)
        sums = np.zeros(len(arms))
        for checkpoint in picks:
            for arm, groups in enumerate(arms):
                seeds = groups[checkpoint]
                sums[arm] += seeds[rng.integers(0, seeds.size, seeds.size)].mean()
        out[:, rep] = sums / count
    return out


def checkpoint_mean_ci(groups: Dict[int, np.ndarray], reps: int, seed: int) -> Tuple[float, float, float]:
    """Mean over checkpoints of each checkpoint's mean over seeds, with the 95% percentile interval of the
    checkpoint-level bootstrap (nested_resamples); NaNs without values."""
    if not groups:
        return math.nan, math.nan, math.nan
    arrays = list(groups.values())
    low, high = np.percentile(nested_resamples([arrays], reps, seed)[0], [2.5, 97.5])
    return float(np.mean([values.mean() for values in arrays])), float(low), float(high)


def paired_difference_ci(x: Dict[int, np.ndarray], y: Dict[int, np.ndarray], reps: int,
                         seed: int) -> Tuple[float, float, float, int]:
    """X - Y over the checkpoints both fine-tuned: the difference of checkpoint-level means and its 95% percentile
    interval, both arms resampled with the same checkpoints (nested_resamples); and how many checkpoints."""
    shared = [checkpoint for checkpoint in x if checkpoint in y]
    if not shared:
        return math.nan, math.nan, math.nan, 0
    xs, ys = [x[c] for c in shared], [y[c] for c in shared]
    resampled = nested_resamples([xs, ys], reps, seed)
    low, high = np.percentile(resampled[0] - resampled[1], [2.5, 97.5])
    point = np.mean([v.mean() for v in xs]) - np.mean([v.mean() for v in ys])
    return float(point), float(low), float(high), len(shared)


def method_rank(method: str) -> Tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


SCORE_KEYS = ("offline", "final", "dip", "during")


def cell_rows(per_run: List[dict], reps: int, seed: int) -> List[dict]:
    """One row per (env id, algo, method): seeds, checkpoints and (mean, low, high) of each of SCORE_KEYS. A cell
    whose runs fine-tuned several checkpoints is estimated at the checkpoint level (checkpoint_mean_ci), one with a
    single checkpoint over its online seeds (bootstrap_mean_ci)."""
    groups: Dict[Tuple[str, str, str], List[dict]] = {}
    for run in per_run:
        groups.setdefault((run["env_id"], run["algo"], run["method"]), []).append(run)
    rows = []
    for (env_id, algo, method), runs in sorted(groups.items(), key=lambda kv: (*kv[0][:2], method_rank(kv[0][2]))):
        checkpoints = sorted({run.get("checkpoint_seed", 1) for run in runs})
        row = {"env_id": env_id, "algo": algo, "method": method, "seeds": sorted(run["seed"] for run in runs),
               "checkpoints": checkpoints}
        for key in SCORE_KEYS:
            row[key] = (checkpoint_mean_ci(by_checkpoint(runs, key), reps, seed) if len(checkpoints) > 1
                        else bootstrap_mean_ci([run[key] for run in runs], reps, seed))
        rows.append(row)
    return rows


COMPARED_KEYS = ("final", "dip", "during")


def runs_by_cell(per_run: List[dict]) -> Dict[Tuple[str, str], Dict[str, List[dict]]]:
    """(env id, algo) -> method -> its runs, cells in sorted order."""
    cells: Dict[Tuple[str, str], Dict[str, List[dict]]] = {}
    for run in per_run:
        cells.setdefault((run["env_id"], run["algo"]), {}).setdefault(run["method"], []).append(run)
    return dict(sorted(cells.items()))


def compared_pairs(methods) -> List[Tuple[str, str]]:
    """The (arm, reference) pairs a cell with these methods is compared on: every arm but the two plain baselines
    against each of REFERENCES present; the constant-p references (even...) for the SAMG arms only, `samg-static`
    for the shipped default (SAMG_DEFAULTS) only."""
    pairs = []
    for method in sorted(methods, key=method_rank):
        if method in ("none", "offline-0.5"):
            continue
        for reference in REFERENCES:
            if reference == method or reference not in methods:
                continue
            if reference.startswith("even") and not method.startswith("samg"):
                continue
            if reference == "samg-static" and method not in SAMG_DEFAULTS:
                continue
            pairs.append((method, reference))
    return pairs


def comparisons(per_run: List[dict], reps: int, seed: int) -> List[dict]:
    """Per task, every arm against each reference it shares checkpoints with (compared_pairs): the paired
    checkpoint-level difference (paired_difference_ci) of the final score, the dip and the mean after warm-up."""
    out = []
    for (env_id, algo), methods in runs_by_cell(per_run).items():
        for method, reference in compared_pairs(methods):
            row = {"env_id": env_id, "algo": algo, "method": method, "reference": reference}
            for key in COMPARED_KEYS:
                *row[key], row["checkpoints"] = paired_difference_ci(
                    by_checkpoint(methods[method], key), by_checkpoint(methods[reference], key), reps, seed)
                row[key] = tuple(row[key])
            out.append(row)
    return out


# --- pooled across cells: exact tests over the checkpoint-level paired differences ---
def checkpoint_differences(x: Dict[int, np.ndarray], y: Dict[int, np.ndarray]) -> List[float]:
    """Per checkpoint both arms fine-tuned, in x's checkpoint order: x's mean over its seeds minus y's."""
    return [float(x[checkpoint].mean() - y[checkpoint].mean()) for checkpoint in x if checkpoint in y]


def sign_counts(differences) -> Tuple[int, int, int]:
    """How many differences are negative, positive and exactly zero."""
    values = np.asarray(differences, dtype=np.float64)
    return int((values < 0).sum()), int((values > 0).sum()), int((values == 0).sum())


def sign_flip_sums(magnitudes) -> np.ndarray:
    """The sum of +-magnitude over all 2^n sign patterns (built by doubling: each magnitude added, then
    subtracted, to every sum so far)."""
    sums = np.zeros(1)
    for magnitude in magnitudes:
        sums = np.concatenate([sums + magnitude, sums - magnitude])
    return sums


def sign_flip_p(differences, seed: int = 0, draws: int = SIGN_FLIP_DRAWS) -> float:
    """Two-sided sign-flip (permutation) p-value of the mean of paired differences: under "no difference" each
    difference is as likely negative as positive, so p is the share of the 2^n sign patterns whose |sum| is at
    least the observed |sum| (equal within 1e-9 counts as at least). Exact, by enumeration, for n <=
    EXACT_SIGN_FLIP_MAX; above, `draws` random patterns from numpy's default_rng(seed), p = (1 + hits) /
    (1 + draws). NaN without differences."""
    values = np.asarray(differences, dtype=np.float64)
    if values.size == 0:
        return math.nan
    magnitudes = np.abs(values)
    threshold = abs(values.sum()) - 1e-9 * max(1.0, magnitudes.sum())
    if values.size <= EXACT_SIGN_FLIP_MAX:
        return float(np.mean(np.abs(sign_flip_sums(magnitudes)) >= threshold))
    rng, hits = np.random.default_rng(seed), 0
    for start in range(0, draws, 10_000):
        signs = rng.choice([-1.0, 1.0], size=(min(10_000, draws - start), values.size))
        hits += int((np.abs(signs @ magnitudes) >= threshold).sum())
    return (1 + hits) / (1 + draws)


def sign_test_p(negative: int, positive: int) -> float:
    """Exact two-sided sign test: 2 P(B <= min(negative, positive)), B ~ Binomial(negative + positive, 1/2), at
    most 1 (ties are left out before: they say neither way); 1.0 without a signed difference."""
    count = negative + positive
    tail = sum(math.comb(count, k) for k in range(min(negative, positive) + 1))
    return min(1.0, 2.0 * tail / 2 ** count)


def pooled_test(differences, seed: int = 0) -> dict:
    """n, how many differences are negative / positive / zero, their mean, the sign-flip and the sign-test p."""
    negative, positive, zero = sign_counts(differences)
    return {"n": len(differences), "negative": negative, "positive": positive, "zero": zero,
            "mean": float(np.mean(differences)) if len(differences) else math.nan,
            "sign_flip_p": sign_flip_p(differences, seed), "sign_test_p": sign_test_p(negative, positive)}


def pooled_comparisons(per_run: List[dict], seed: int = 0) -> List[dict]:
    """Every (arm, reference) pair that some cell compares (compared_pairs), pooled over all the cells where both
    ran: per score of COMPARED_KEYS, the checkpoint-level differences (checkpoint_differences) of every such cell
    together, tested by pooled_test; `cells` counts the cells that contributed to the final score."""
    pooled: Dict[Tuple[str, str], dict] = {}
    for methods in runs_by_cell(per_run).values():
        for method, reference in compared_pairs(methods):
            entry = pooled.setdefault((method, reference), {"cells": 0, **{key: [] for key in COMPARED_KEYS}})
            for key in COMPARED_KEYS:
                differences = checkpoint_differences(by_checkpoint(methods[method], key),
                                                     by_checkpoint(methods[reference], key))
                entry[key] += differences
                entry["cells"] += int(key == "final" and bool(differences))
    order = sorted(pooled, key=lambda pair: (method_rank(pair[0]), list(REFERENCES).index(pair[1])))
    return [{"method": method, "reference": reference, "cells": pooled[(method, reference)]["cells"],
             **{key: pooled_test(pooled[(method, reference)][key], seed) for key in COMPARED_KEYS}}
            for method, reference in order]


# --- across tasks, with rliable ---
def seeded_interval_estimates(scores, func: Callable, reps: int, seed: int) -> Tuple[float, float, float]:
    """rliable's stratified bootstrap of `func` on one method's scores (a runs x tasks matrix, or a tuple of them):
    (point estimate, low, high) of the 95% percentile interval. rliable draws its resamples from NumPy's global
    generator, so it is seeded here (and restored after): the same scores give the same interval."""
    from rliable import library

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        points, intervals = library.get_interval_estimates({"x": scores}, func, reps=reps)
    finally:
        np.random.set_state(state)
    return float(points["x"][0]), float(intervals["x"][0, 0]), float(intervals["x"][1, 0])


def iqm(scores: np.ndarray) -> np.ndarray:
    from rliable import metrics

    return np.array([metrics.aggregate_iqm(scores)])


def improvement(scores_x: np.ndarray, scores_y: np.ndarray) -> np.ndarray:
    """rliable.metrics.probability_of_improvement (per task the share of run pairs with x > y, ties one half,
    0.5 where both columns are equal; averaged over tasks), counted with array operations: rliable's version
    calls scipy's Mann-Whitney test per task and resample, ~100x slower (a test checks they agree)."""
    wins = (scores_x[:, None, :] > scores_y[None, :, :]).mean(axis=(0, 1))
    ties = (scores_x[:, None, :] == scores_y[None, :, :]).mean(axis=(0, 1))
    same = np.array([np.array_equal(scores_x[:, task], scores_y[:, task]) for task in range(scores_x.shape[1])])
    return np.array([np.where(same, 0.5, wins + 0.5 * ties).mean()])


def aggregate(per_run: List[dict], reps: int, seed: int) -> dict:
    """IQM of the final scores per method and P(SAMG method > baseline), over the tasks (env id, algo).
    Methods without a finite final score in some task are left out (named in `left_out` with the tasks they lack);
    a method's runs x tasks matrix has as many runs as its task with fewest, keeping the lowest seeds. Where every
    (method, task) fine-tuned several checkpoints, the unit is the checkpoint: a run of the matrix is one
    checkpoint's mean final score over its online seeds (`unit` says which)."""
    finals: Dict[str, Dict[Tuple[str, str], List[Tuple[int, float]]]] = {}
    checkpoints: Dict[Tuple[str, str, str], Dict[int, List[float]]] = {}
    for run in per_run:
        if math.isfinite(run["final"]):
            finals.setdefault(run["method"], {}).setdefault((run["env_id"], run["algo"]), []).append(
                (run["seed"], run["final"]))
            checkpoints.setdefault((run["method"], run["env_id"], run["algo"]), {}).setdefault(
                run.get("checkpoint_seed", 1), []).append(run["final"])
    unit = "checkpoints" if checkpoints and all(len(c) > 1 for c in checkpoints.values()) else "runs"
    if unit == "checkpoints":
        finals = {}
        for (method, env_id, algo), groups in checkpoints.items():
            finals.setdefault(method, {})[(env_id, algo)] = [(c, float(np.mean(v))) for c, v in groups.items()]
    tasks = sorted({(run["env_id"], run["algo"]) for run in per_run})
    methods = sorted(finals, key=method_rank)
    left_out = {m: [t for t in tasks if t not in finals[m]] for m in methods if len(finals[m]) < len(tasks)}
    matrices, trimmed = {}, {}
    for method in [m for m in methods if m not in left_out]:
        runs = min(len(finals[method][task]) for task in tasks)
        trimmed[method] = sum(len(finals[method][task]) - runs for task in tasks)
        matrices[method] = np.array([[score for _, score in sorted(finals[method][task])[:runs]] for task in tasks]).T
    iqms = {method: seeded_interval_estimates(scores, iqm, reps, seed) for method, scores in matrices.items()}
    pairs = [(x, y) for x in matrices if x.startswith("samg") for y in BASELINES if y in matrices]
    improvements = {(x, y): seeded_interval_estimates((matrices[x], matrices[y]), improvement, reps, seed)
                    for x, y in pairs}
    return {"tasks": tasks, "matrices": matrices, "trimmed": trimmed, "left_out": left_out, "iqm": iqms,
            "improvement": improvements, "unit": unit}


def verdicts(agg: dict) -> List[str]:
    """Per baseline: did the SAMG default beat it (P(improvement) interval above 0.5), lose, or neither."""
    default = next((m for m in SAMG_DEFAULTS if m in agg["matrices"]), None)
    if default is None:
        return ["No SAMG default (`samg` or `samg-next`) has runs in every task, so there is no verdict."]
    lines = []
    for (x, y), (point, low, high) in agg["improvement"].items():
        if x != default:
            continue
        if low > 0.5:
            outcome = "beat"
        elif high < 0.5:
            outcome = "lost to"
        else:
            outcome = "was not distinguishable from"
        lines.append(f"- `{default}` {outcome} `{y}`: P({default} > {y}) = {point:.2f} [{low:.2f}, {high:.2f}] "
                     f"over {len(agg['tasks'])} task(s).")
    return lines or [f"No baseline ({', '.join(BASELINES)}) has runs in every task, so there is no verdict."]


# --- the markdown ---
def format_ci(estimate: Tuple[float, float, float], digits: int = 1) -> str:
    mean, low, high = estimate
    if not math.isfinite(mean):
        return "n/a"
    if low == high == mean:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def verdict_word(estimate: Tuple[float, float, float], lower_is_better: bool = False) -> str:
    """`higher` / `lower` when the difference's interval excludes 0, else `~` (not distinguishable)."""
    _, low, high = estimate
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0.0 <= high:
        return "~"
    return "higher" if low > 0.0 else "lower"


def format_p(p: float) -> str:
    """A p-value: two decimals, two significant digits below 0.1 (0.055, 0.0039); n/a for NaN."""
    if not math.isfinite(p):
        return "n/a"
    return f"{p:.2f}" if p >= 0.1 else f"{p:.2g}"


def distinct_resamples(units: int) -> int:
    """How many different resamples (multisets) drawing `units` of `units` with replacement can give."""
    return math.comb(2 * units - 1, units)


def smallest_sign_flip_p(units: int) -> float:
    """The smallest two-sided sign-flip p that `units` nonzero differences can reach: 2 patterns of 2^units."""
    return min(1.0, 2.0 / 2 ** units)


def interval_note(units: int) -> str:
    """What a percentile interval over `units` checkpoints can and cannot show, for the results' header."""
    note = (f"What an interval over {units} checkpoints can show: resampling {units} checkpoints has only "
            f"{distinct_resamples(units)} distinct outcomes")
    if units ** -units > 0.025:  # a draw of one checkpoint `units` times is more likely than the 2.5% tail
        note += (f", and each that draws one checkpoint {units} times has probability 1/{units ** units}, above "
                 "2.5%, so (the seeds' spread aside) the 95% interval of a paired difference runs from the lowest "
                 f"checkpoint's difference to the highest: an interval that excludes 0 is close to \"all {units} "
                 "checkpoints point the same way\", which with no true difference happens by chance in 2 of "
                 f"the {2 ** units} sign patterns ({smallest_sign_flip_p(units):.0%}). It can show that the "
                 "checkpoints agree in sign; it cannot keep the rate of false `higher` / `lower` near 5%, nor show "
                 "a difference that one checkpoint reverses")
    return (note + f". The smallest exact two-sided sign-flip p that {units} checkpoints can reach is "
            f"{format_p(smallest_sign_flip_p(units))} (with 9: {format_p(smallest_sign_flip_p(9))}). The per-cell "
            "`higher` / `lower` labels are first readings; the pooled tests across cells are where a claim stands.")


def seeds_column(row: dict) -> str:
    """How many runs; with several checkpoints, also how many checkpoints (the unit of the interval)."""
    if len(row.get("checkpoints", [1])) > 1:
        return f"{len(row['seeds'])} ({len(row['checkpoints'])} ckpt)"
    return str(len(row["seeds"]))


SCORE_NAMES = {"final": "final", "dip": "dip", "during": "mean after warm-up"}


def pooled_lines(pooled: List[dict]) -> List[str]:
    """The markdown section of pooled_comparisons: one row per (arm, reference, score)."""
    lines = ["", "## Pooled across cells (paired by checkpoint)", "",
             "Each checkpoint's difference is the arm's mean over its seeds minus the reference's, in its own cell; "
             "the differences of every cell where both arms ran are pooled (`cells`; `ckpt` = n). below / above / "
             "tied: on how many checkpoints the arm was below, above or equal to the reference (a dip below is a "
             "deeper one). sign-flip p: exact two-sided permutation p of the mean difference (all 2^n sign "
             f"patterns; above {EXACT_SIGN_FLIP_MAX} checkpoints {SIGN_FLIP_DRAWS:,} seeded random ones); sign-test "
             "p: exact two-sided binomial p of below against above (ties left out). The smallest p that n "
             "checkpoints can reach is 2 / 2^n (0.25 with 3, 0.0039 with 9). One p per row, not corrected for the "
             "number of rows.", "",
             "| arm | reference | score | cells | ckpt | below / above / tied | mean difference | sign-flip p | "
             "sign-test p |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in pooled:
        for key in COMPARED_KEYS:
            test = row[key]
            mean = f"{test['mean']:.1f}" if math.isfinite(test["mean"]) else "n/a"
            lines.append(f"| {row['method']} | {row['reference']} | {SCORE_NAMES[key]} | {row['cells']} | "
                         f"{test['n']} | {test['negative']} / {test['positive']} / {test['zero']} | {mean} | "
                         f"{format_p(test['sign_flip_p'])} | {format_p(test['sign_test_p'])} |")
    return lines


def markdown_body(rows: List[dict], agg: dict, methods_flags: Dict[str, list], dip_fraction: float,
                  compared: Optional[List[dict]] = None, pooled: Optional[List[dict]] = None) -> str:
    lines = ["## Per cell", "",
             f"| env | algo | method | seeds | offline | final online | dip (first {dip_fraction:.0%}) | "
             "mean after warm-up |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['env_id']} | {row['algo']} | {row['method']} | {seeds_column(row)} | "
                     f"{format_ci(row['offline'])} | {format_ci(row['final'])} | {format_ci(row['dip'])} | "
                     f"{format_ci(row['during'])} |")
    if compared:
        lines += ["", "## Per cell, each arm against a reference (paired, checkpoint level)", "",
                  "Difference arm - reference of the checkpoint-level means, with the 95% interval of the "
                  "checkpoint-level bootstrap (both arms resampled with the same checkpoints). `higher` / `lower`: "
                  "the interval excludes 0; `~`: it does not. A higher dip is a shallower one.", "",
                  "| env | algo | arm | reference | ckpt | final | dip | mean after warm-up |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in compared:
            cells = " | ".join(f"{format_ci(row[key])} {verdict_word(row[key])}" for key in ("final", "dip", "during"))
            lines.append(f"| {row['env_id']} | {row['algo']} | {row['method']} | {row['reference']} | "
                         f"{row['checkpoints']} | {cells} |")
    if pooled:
        lines += pooled_lines(pooled)
    tasks = ", ".join(f"{env_id} {algo}" for env_id, algo in agg["tasks"])
    lines += ["", "## Across tasks", "", f"{len(agg['tasks'])} task(s): {tasks}."]
    for method, missing in agg["left_out"].items():
        lines.append(f"- left out: `{method}`, no finished run in "
                     + ", ".join(f"{env_id} {algo}" for env_id, algo in missing) + ".")
    for method, count in agg["trimmed"].items():
        if count:
            lines.append(f"- `{method}`: {count} run(s) beyond its task with fewest runs not used (lowest seeds "
                         "kept), since rliable needs as many runs in every task.")
    per_task = "checkpoints per task" if agg.get("unit") == "checkpoints" else "runs per task"
    lines += ["", f"| method | {per_task} | IQM of final scores |", "| --- | --- | --- |"]
    for method, estimate in agg["iqm"].items():
        lines.append(f"| {method} | {agg['matrices'][method].shape[0]} | {format_ci(estimate)} |")
    lines += ["", "| SAMG method | baseline | P(improvement) |", "| --- | --- | --- |"]
    for (x, y), estimate in agg["improvement"].items():
        lines.append(f"| {x} | {y} | {format_ci(estimate, 2)} |")
    lines += ["", "## Verdict", "", *verdicts(agg), "", "## Methods", ""]
    for method in sorted(methods_flags, key=method_rank):
        lines.append(f"- `{method}`: `{' '.join(methods_flags[method]) or '(defaults)'}`")
    return "\n".join(lines) + "\n"


# --- plots ---
def mean_band(curves: List[Tuple[np.ndarray, np.ndarray]], reps: int, seed: int):
    """Steps every curve logged; the mean over curves there and its 95% percentile bootstrap band."""
    common = curves[0][0]
    for steps, _ in curves[1:]:
        common = np.intersect1d(common, steps)
    stacked = np.stack([values[np.searchsorted(steps, common)] for steps, values in curves])
    resampled = stacked[np.random.default_rng(seed).integers(0, len(curves), (reps, len(curves)))].mean(axis=1)
    low, high = np.percentile(resampled, [2.5, 97.5], axis=0)
    return common, stacked.mean(axis=0), low, high


def gap_curve(scalars: Scalars) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Q_off - Qbar at the steps where both were logged."""
    if "samg/qoff_values" not in scalars or "samg/qbar_values" not in scalars:
        return None
    (off_steps, off), (bar_steps, bar) = scalars["samg/qoff_values"], scalars["samg/qbar_values"]
    steps = np.intersect1d(off_steps, bar_steps)
    return steps, off[np.searchsorted(off_steps, steps)] - bar[np.searchsorted(bar_steps, steps)]


PANELS = (("normalized score", lambda s: s.get(SCORE_TAG)), ("samg/p_mean", lambda s: s.get("samg/p_mean")),
          ("samg/p_active_frac", lambda s: s.get("samg/p_active_frac")), ("Q_off - Qbar (next pairs)", gap_curve))
# drawn too (a 2x3 figure) when some run logged them: p's median, and whether p still separates offline pairs from
# the batch's states with random actions
EXTRA_PANELS = (("samg/p_q50 (median p of the batch)", lambda s: s.get("samg/p_q50")),
                ("samg/p_auroc (offline vs random actions)", lambda s: s.get("samg/p_auroc")))


def plot_tasks(runs: List[dict], out_dir: Path, reps: int, seed: int) -> List[Path]:
    """Per task a 2x2 PNG (score and the three diagnostics; 2x3 with p's median and AUROC where logged), one line
    per method with a 95% bootstrap band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({run["meta"]["method"] for run in runs}, key=method_rank)  # one colour per method throughout
    paths = []
    for env_id, algo in sorted({(run["meta"]["env_id"], run["meta"]["algo"]) for run in runs}):
        task_runs = [run for run in runs if (run["meta"]["env_id"], run["meta"]["algo"]) == (env_id, algo)]
        extra = any(extract(run["scalars"]) is not None for _, extract in EXTRA_PANELS for run in task_runs)
        panels = PANELS[:2] + EXTRA_PANELS[:1] + PANELS[2:] + EXTRA_PANELS[1:] if extra else PANELS
        fig, axes = plt.subplots(2, 3 if extra else 2, figsize=(16 if extra else 11, 7.5), sharex=True)
        for ax, (title, extract) in zip(axes.flat, panels):
            for index, method in enumerate(methods):
                curves = [c for run in task_runs if run["meta"]["method"] == method
                          for c in [extract(run["scalars"])] if c is not None and len(c[0])]
                if not curves:
                    continue
                steps, mean, low, high = mean_band(curves, reps, seed)
                ax.plot(steps, mean, color=f"C{index}", label=f"{method} (n={len(curves)})")
                ax.fill_between(steps, low, high, color=f"C{index}", alpha=0.2, linewidth=0)
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0, 0].legend(fontsize=7)
        for ax in axes[1]:
            ax.set_xlabel("online environment steps")
        fig.suptitle(f"{env_id}, {algo}: mean over seeds, 95% bootstrap band")
        fig.tight_layout()
        path = out_dir / f"curves_{env_id.replace('/', '-')}__{algo}.png"
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        write_staged(path, buffer.getvalue())
        paths.append(path)
    return paths


# --- the report ---
def check_args(args: Args) -> Path:
    """Refuses bad numbers and an unusable output place before any work; returns the output directory."""
    if args.final_evals < 1 or args.reps < 1:
        fail("--final-evals and --reps must be at least 1")
    if not 0.0 < args.dip_fraction <= 1.0:
        fail("--dip-fraction must be in (0, 1]")
    try:
        from rliable import library, metrics  # noqa: F401
    except Exception as error:  # its bootstrap package, arch 7, fails with a TypeError under pandas 3
        fail(f"the cross-task statistics need rliable, which does not import ({type(error).__name__}: {error}); "
             "pip install -r requirements.txt (it needs pandas < 3)")
    for directory in args.from_csv or []:
        if not Path(directory).is_dir():
            fail(f"--from-csv {directory} is not a directory; give the scalars/ folder that --export-csv wrote")
    out_dir = Path(args.out_dir if args.out_dir is not None else os.path.join(args.runs_dir, "report"))
    for place in (out_dir, out_dir / "scalars") if args.export_csv else (out_dir,):
        try:
            place.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            fail(f"cannot write into --out-dir {out_dir} ({error.strerror}); choose another --out-dir")
    return out_dir


def build_report(args: Args) -> Tuple[str, List[Path]]:
    """Reads every run, writes results.md, the figures (and the CSV export) into the output directory; returns
    the markdown after its header (the part that depends only on the runs) and the PNG paths."""
    out_dir = check_args(args)
    if args.from_csv:
        runs = runs_from_csv(args.from_csv)
        source = "the CSV export in " + ", ".join(f"`{directory}`" for directory in args.from_csv)
    else:
        runs, source = runs_from_logs(args.runs_dir, args.include_unfinished), f"the logs under `{args.runs_dir}`"
    if not runs:
        fail(f"no finished runs in {' '.join(args.from_csv or [args.runs_dir])} (a `suite.json` next to a `DONE` "
             "file, or CSVs from --export-csv); run benchmark/run_suite.py first, or pass --include-unfinished")
    if args.env_ids:
        found = sorted({run["meta"]["env_id"] for run in runs})
        runs = [run for run in runs if run["meta"]["env_id"] in args.env_ids]
        if not runs:
            fail(f"no run of --env-ids {' '.join(args.env_ids)}; the runs found are of {', '.join(found)}")
    used = [run for run in runs if SCORE_TAG in run["scalars"]]
    for run in runs:
        if SCORE_TAG not in run["scalars"]:
            print(f"warning: run {run['id']} has no {SCORE_TAG}; left out")
    per_run = scored_runs(used, args.final_evals, args.dip_fraction)
    if not used:
        fail(f"no run has {SCORE_TAG}; are these the online scripts' logs?")
    if args.export_csv:
        for run in used:
            export_csv(run, out_dir / "scalars")
    methods_flags = {run["meta"]["method"]: run["meta"].get("flags", []) for run in used}
    agg = aggregate(per_run, args.reps, args.seed)
    rows = cell_rows(per_run, args.reps, args.seed)
    several = any(len(row["checkpoints"]) > 1 for row in rows)
    compared = comparisons(per_run, args.reps, args.seed) if several else None
    pooled = pooled_comparisons(per_run, args.seed) if several else None
    body = markdown_body(rows, agg, methods_flags, args.dip_fraction, compared, pooled)
    header = (
        f"# Results\n\nFrom {len(per_run)} runs in {source}. D4RL-normalized scores (x100). Per cell: mean "
        f"[95% percentile bootstrap interval, {args.reps} resamples, seed {args.seed}; its unit is said below]. "
        f"offline = evaluation at online step 0; final online = mean of the last {args.final_evals} evaluation(s); "
        f"dip = lowest evaluation after step 0 within the first {args.dip_fraction:.0%} of online steps; mean "
        "after warm-up = mean of every evaluation after the run's --learning-starts (what fine-tuning costs while "
        "it runs). Across tasks (rliable): IQM of the final scores and P(improvement) with stratified bootstrap "
        f"95% intervals ({args.reps} resamples); P(X > Y) counts ties as one half. An interval that is one value is "
        "shown as that value. The unit of an interval: where a cell's runs fine-tuned several checkpoints "
        "(checkpoint_seed in the runs' suite.json; `ckpt` in the seeds column), the checkpoint (checkpoints "
        "resampled, then the online seeds within each) and, across tasks, one checkpoint's mean over its seeds; "
        "where one checkpoint serves every online seed, the online seeds from that one start."
    )
    units = [row["checkpoints"] for row in compared or [] if row["checkpoints"] > 1]
    header += (" " + interval_note(min(units)) if units else "") + "\n\n"
    write_staged(out_dir / "results.md", (header + body).encode())
    return body, plot_tasks(used, out_dir, args.reps, args.seed) if args.plots else []


if __name__ == "__main__":
    args = tyro.cli(Args)
    body, pngs = build_report(args)
    print(body)
    out_dir = Path(args.out_dir if args.out_dir is not None else os.path.join(args.runs_dir, "report"))
    print(f"wrote {out_dir / 'results.md'} and {len(pngs)} PNG file(s)"
          + (f"; the per-run scalars in {out_dir / 'scalars'}" if args.export_csv else ""))
