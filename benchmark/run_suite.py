"""The benchmark suite: datasets, offline pretraining and online fine-tuning for env ids x algos x methods x seeds.

    python benchmark/run_suite.py --preset quick --workers 2      # under an hour on 2 CPU cores
    python benchmark/run_suite.py --preset paper --print-commands # one shell line per run, for a cluster launcher
    python benchmark/report.py --runs-dir runs/quick               # the table and the curves

A run is one process, in one of three stages. The dataset stage: `make_dataset.py` for the `local/...` datasets of
one env, and `benchmark/prepare_dataset.py` for each dataset given by a D4RL-style name or a Minari id (it resolves,
downloads and combines the data with pretrain_offline.py's own code, so that pretraining runs started together find
it ready and never download or combine at the same time). The pretrain stage: `pretrain_offline.py` for each env id
x algo x pretraining seed. The online stage: one of `samg_sac.py` / `samg_td3.py` / `samg_awac.py` / `samg_iql.py`
for each of those checkpoints x method x online seed. A method is a named set of online flags (METHODS):
`samg-adaptive` is the shipped default (Q_off frozen, the C-VAE adaptive), `samg-static` SAMG with Q_off and the C-VAE
frozen, `samg` the earlier default (Q_off also replaced every 50k steps), `none` plain fine-tuning with online data
only (p = 0), `offline-0.5` plain fine-tuning that keeps the offline data (half of every batch), and the rest SAMG's
variants and ablations. With `--pretrain-seeds 1`,
one checkpoint per (dataset, algo) serves every online seed: what is compared is the online phase from one start.

Presets: `quick` (Pendulum, local data, measured on 2 CPU cores), `paper` (the D4RL locomotion names at the
published budgets, for a cluster) and `locomotion-cpu` (Hopper, HalfCheetah and Walker2d from locally made medium
and medium-replay data, budgets reduced to about 2.5 h per environment on 2 cores, measured on Hopper) and
`frozen-dip` (SAMG with its offline critic frozen, from 3 independent checkpoints per cell, in the cells where plain
fine-tuning dips). PRESETS
says what each runs.

Runs whose results exist are skipped, so an interrupted suite is resumed by starting it again: a `local/...`
dataset is done when its Minari directory exists, a prepared dataset when `{runs_dir}/datasets/{dataset}.done`
exists, a pretraining run when its checkpoint exists (the script writes it only at the end), an online run when
its directory `{runs_dir}/{run id}` holds a `DONE` file. The `.done` and `DONE` files are written after the script
exits with status 0. The online run's directory is the script's `--run-dir`, so it also holds the run's TensorBoard
log (in a subdirectory named after the run), next to a `suite.json` saying what the run is, by which
benchmark/report.py groups the runs. Each run's output goes to `{runs_dir}/logs/{run id}.log`.

On a cluster, each stage is one job array and each array task one run:

    python benchmark/run_suite.py --preset paper --stage pretrain --count                   # the array's size
    python benchmark/run_suite.py --preset paper --stage pretrain --print-commands          # line N is run N
    python benchmark/run_suite.py --preset paper --stage pretrain --index 7                 # run 7 only
    python benchmark/run_suite.py --preset paper --stage online --online-args="--no-cuda"   # N = $SLURM_ARRAY_TASK_ID

`--stage S --index N` runs the N-th run (from 0) of stage S, in the order of `--print-commands --stage S`; N defaults
to `$SLURM_ARRAY_TASK_ID`. The indices cover every run of the stage, done or not, so they never shift: a run that is
done (or that nothing still to do needs) is skipped, which makes re-submitting an array safe, and a run whose
inputs are not done yet stops with an error that names them. Its output goes to stdout (SLURM's output file).
`benchmark/paper.sbatch` submits the paper preset as three arrays chained with `--dependency=afterok`.
`--dataset-args`, `--pretrain-args` and `--online-args` add flags to every run of a stage (make_dataset.py,
pretrain_offline.py and the online scripts), after the preset's own, e.g. `--online-args="--no-cuda
--eval-episodes 10"`; write them with `=`, as their values start with `--`.

The suite gives each run `--threads` OMP/MKL threads (default 1); a cluster launcher running the printed lines
should set OMP_NUM_THREADS itself.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple

import tyro

ROOT = Path(__file__).resolve().parents[1]
ALGOS = ("cql", "td3bc", "awac", "iql")
# method name -> the online scripts' flags that make it (anything not given is the script's default). The names are
# those of the committed results in benchmark/results, whose JSONs record the flags they ran with; since Q_off became
# frozen by default, the methods that replaced it every 50k steps (the earlier default) say so, so that each name
# still reproduces its results. A preset's `qoff_refresh_every` replaces that period.
METHODS = {
    "samg-adaptive": ("--coef-mode", "cvae"),  # the shipped default: Q_off frozen, the C-VAE adaptive
    "samg-static": ("--coef-mode", "cvae", "--no-adaptive"),  # Q_off and the C-VAE frozen
    "samg-static-sample": ("--coef-mode", "cvae", "--no-adaptive", "--p-at", "sample"),
    # the earlier default: adaptive C-VAE and Q_off replaced by the online critic every 50k steps
    "samg": ("--coef-mode", "cvae", "--qoff-refresh-every", "50000"),
    "samg-sample": ("--coef-mode", "cvae", "--p-at", "sample", "--qoff-refresh-every", "50000"),
    "samg-next": ("--coef-mode", "cvae", "--p-at", "next", "--qoff-refresh-every", "50000"),
    "samg-refresh-only": ("--coef-mode", "cvae", "--no-adaptive", "--qoff-refresh-every", "50000"),
    "samg-cvae-only": ("--coef-mode", "cvae"),  # the same flags as samg-adaptive, under its results' name
    "even": ("--coef-mode", "even", "--qoff-refresh-every", "50000"),
    "even-static": ("--coef-mode", "even", "--no-adaptive"),
    # the same amount of guidance as frozen SAMG in the frozen-dip cells (its mean p there is 0.02-0.08), unconditioned
    "even-0.05-static": ("--coef-mode", "even", "--even-p", "0.05", "--no-adaptive"),
    "random": ("--coef-mode", "random", "--qoff-refresh-every", "50000"),
    "random-static": ("--coef-mode", "random", "--no-adaptive"),
    "none": ("--coef-mode", "none"),
    "offline-0.5": ("--coef-mode", "none", "--offline-data-ratio", "0.5"),
}
# methods of committed results whose flags were retired with the question they answered (README, "Retired flags")
RETIRED_METHODS = {"samg-both": "--p-at both", "samg-outgrown": "--p-fade outgrown", "samg-linear": "--p-fade linear",
                   "samg-static-deterministic": "--p-next-action deterministic"}
ONLINE_SCRIPTS = {"cql": "samg_sac.py", "td3bc": "samg_td3.py", "awac": "samg_awac.py", "iql": "samg_iql.py"}
# Gymnasium ids of the environments whose datasets make_dataset.py generates (`local/{env}/{quality}-v0`)
LOCAL_GYM_IDS = {
    "pendulum": "Pendulum-v1",
    "invertedpendulum": "InvertedPendulum-v5",
    "inverteddoublependulum": "InvertedDoublePendulum-v5",
    "hopper": "Hopper-v5",
    "halfcheetah": "HalfCheetah-v5",
    "walker2d": "Walker2d-v5",
    "ant": "Ant-v5",
}


@dataclass(frozen=True)
class Preset:
    """What a suite runs; a field left at None is not passed, so the script's own default applies."""

    env_ids: Tuple[str, ...]
    algos: Tuple[str, ...] = ALGOS
    methods: Tuple[str, ...] = ("samg", "samg-static", "even", "random", "none", "offline-0.5")
    seeds: Tuple[int, ...] = (1, 2, 3, 4, 5)
    pretrain_seeds: Optional[int] = None
    """checkpoints per (dataset, algo); None: one per online seed (online seed k fine-tunes checkpoint k)"""
    dataset_args: Tuple[str, ...] = ()
    """extra make_dataset.py flags (prepare_dataset.py, for the datasets that are not `local/...`, takes none)"""
    pretrain_args: Tuple[str, ...] = ()
    """extra pretrain_offline.py flags (the online scripts take network sizes from the checkpoint)"""
    online_args: Tuple[str, ...] = ()
    """extra flags of the online scripts"""
    qoff_refresh_every: Optional[int] = None
    """the period of the methods that replace Q_off (METHODS' --qoff-refresh-every 50000); None keeps 50000"""
    # budgets: pretrain_offline.py --total-steps, --cvae-steps, --eval-freq; the online scripts'
    # --total-timesteps, --learning-starts, --eval-freq; --eval-episodes of both
    offline_steps: Optional[int] = None
    cvae_steps: Optional[int] = None
    offline_eval_freq: Optional[int] = None
    online_steps: Optional[int] = None
    learning_starts: Optional[int] = None
    online_eval_freq: Optional[int] = None
    eval_episodes: Optional[int] = None


PRESETS: Dict[str, Preset] = {
    # Pendulum-v1 (200-step episodes) from locally generated medium and medium-replay data, 64x64 networks, one
    # checkpoint per (dataset, algo) and 5 online seeds: SAMG (the earlier default, Q_off refreshed) with p at each
    # pair, plain fine-tuning with and without the offline data. With cql, td3bc and awac: 1 dataset run, 6
    # pretraining runs, 120 online runs of 10k steps (about 0.5 CPU-min each; results/quick also has samg-both, p at
    # both pairs, since retired); iql (in ALGOS) adds 2 pretraining and 40 online runs. Q_off is refreshed every 2000
    # steps, 5 times per run, as 50k does in a 250k-step run.
    "quick": Preset(
        env_ids=("local/pendulum/medium-v0", "local/pendulum/medium-replay-v0"),
        methods=("none", "samg-next", "samg-sample", "offline-0.5"), seeds=(1, 2, 3, 4, 5),
        pretrain_seeds=1,
        dataset_args=("--total-timesteps", "15000", "--learning-starts", "1000", "--eval-freq", "500",
                      "--eval-episodes", "5", "--transitions", "50000", "--hidden-dims", "64", "64"),
        pretrain_args=("--hidden-dims", "64", "64"), offline_steps=10_000, cvae_steps=10_000,
        offline_eval_freq=5_000, online_steps=10_000, learning_starts=500, online_eval_freq=500, eval_episodes=5,
        qoff_refresh_every=2000,
    ),
    # The D4RL locomotion tasks at the published budgets: 1M offline steps, 250k online steps, 5 seeds, every
    # method; the scripts' defaults otherwise. The dataset stage prepares each of the 9 datasets once
    # (prepare_dataset.py): medium is downloaded from Minari, medium-expert combined from Minari's medium and expert,
    # and medium-replay, which Minari does not host, must be imported first (make_dataset.py --from-d4rl).
    "paper": Preset(
        env_ids=tuple(f"{env}-{quality}-v2" for env in ("hopper", "halfcheetah", "walker2d")
                      for quality in ("medium", "medium-replay", "medium-expert")),
        offline_steps=1_000_000, online_steps=250_000,
    ),
    # SAMG with its offline critic really frozen, from independent checkpoints, in the cells where plain fine-tuning
    # dips (TD3+BC on the medium data of Hopper, HalfCheetah and Walker2d; benchmark/results/frozen-dip/stages.md).
    # Data and pretraining as locomotion-cpu's, but 3 checkpoints per cell, each fine-tuned by 3 online seeds (online
    # seed k by checkpoint ((k - 1) % 3) + 1). Arms: the two baselines, the then default `samg` (adaptive C-VAE; its
    # --qoff-refresh-every 50000 never comes within 20k steps, so its Q_off stays the offline critic too, as in
    # today's default samg-adaptive), the static SAMG (C-VAE and Q_off frozen) with p at the next pair and at the
    # sample, and p = 0.5 frozen. 20k online steps (18k updates): plain fine-tuning's dip on HalfCheetah lasted 3k-8k
    # steps in locomotion-cpu. Evaluations every 1k steps. The pilot's samg-static-deterministic (TD3: p at
    # pi_target(s') rather than the smoothed a') needed --p-next-action, retired since.
    "frozen-dip": Preset(
        env_ids=tuple(f"local/{env}/medium-v0" for env in ("halfcheetah", "hopper", "walker2d")),
        algos=("td3bc",), methods=("none", "offline-0.5", "samg", "samg-static", "samg-static-sample", "even-static"),
        seeds=tuple(range(1, 10)), pretrain_seeds=3,
        dataset_args=("--total-timesteps", "150000", "--transitions", "200000", "--hidden-dims", "256", "256",
                      "--eval-episodes", "5"),
        pretrain_args=("--hidden-dims", "256", "256"), offline_steps=30_000, cvae_steps=10_000,
        offline_eval_freq=10_000, online_steps=20_000, learning_starts=2_000, online_eval_freq=1_000,
        eval_episodes=5,
    ),
    # The frozen-dip question again from offline agents trained to their plateau (benchmark/results/plateau): TD3+BC
    # on HalfCheetah medium (the data of frozen-dip) pretrained for 300k steps (about a point below what 1M steps give:
    # the pretraining curve and checkpoint_eval.md in benchmark/results/plateau); 3 checkpoints x 3 online
    # seeds, 20k online steps as in frozen-dip. Arms: the two baselines, the shipped default (Q_off frozen, adaptive
    # C-VAE), the fully frozen variant and the matched constant (even's p at frozen SAMG's mean p; add others with
    # --methods).
    "plateau": Preset(
        env_ids=("local/halfcheetah/medium-v0",), algos=("td3bc",),
        methods=("none", "offline-0.5", "samg-adaptive", "samg-static", "even-0.05-static"),
        seeds=tuple(range(1, 10)), pretrain_seeds=3,
        dataset_args=("--total-timesteps", "150000", "--transitions", "200000", "--hidden-dims", "256", "256",
                      "--eval-episodes", "5"),
        pretrain_args=("--hidden-dims", "256", "256"), offline_steps=300_000, cvae_steps=10_000,
        offline_eval_freq=50_000, online_steps=20_000, learning_starts=2_000, online_eval_freq=1_000,
        eval_episodes=5,
    ),
    # Hopper-v5, HalfCheetah-v5 and Walker2d-v5 from medium-replay and medium data made here by make_dataset.py
    # (SAC behaviour agent 256x256 for at most 150k steps, 200k transitions per medium set). Budgets chosen by
    # measurement on Hopper (benchmark/results/locomotion-cpu/stages.md) so that one environment takes about 2.5 h
    # with --workers 2 on 2 cores: 256x256 networks (what the behaviour agent needs) pretrained for 30k steps (the
    # offline policies then score well above random), one checkpoint per (dataset, algo) serving 5 online seeds,
    # 12k online steps of which the first 2k are warm-up (10k updates), evaluations every 1k steps, Q_off refreshed
    # every 2400 steps (5 times per run, as the default 50k does in 250k). Per environment: 1 dataset run (15-16 min;
    # 33 min on Walker2d, whose agent never reached the medium return), 6 pretraining runs (5-7 min each), 90 online
    # runs (2-4 min each, 1 h 56 min - 2 h 08 min in all). Left out by cost, added with
    # --algos and --methods: cql (30k pretraining steps take about an hour per dataset at 8 updates/s) and the
    # even / random ablations.
    "locomotion-cpu": Preset(
        env_ids=tuple(f"local/{env}/{quality}-v0" for env in ("hopper", "halfcheetah", "walker2d")
                      for quality in ("medium-replay", "medium")),
        algos=("td3bc", "awac", "iql"), methods=("none", "samg", "offline-0.5"),
        seeds=(1, 2, 3, 4, 5), pretrain_seeds=1,
        dataset_args=("--total-timesteps", "150000", "--transitions", "200000", "--hidden-dims", "256", "256",
                      "--eval-episodes", "5"),
        pretrain_args=("--hidden-dims", "256", "256"), offline_steps=30_000, cvae_steps=10_000,
        offline_eval_freq=10_000, online_steps=12_000, learning_starts=2_000, online_eval_freq=1_000,
        eval_episodes=5, qoff_refresh_every=2400,
    ),
}


@dataclass
class Args:
    preset: Literal["quick", "paper", "locomotion-cpu", "frozen-dip", "plateau"] = "quick"
    """which suite to run; the flags below override its parts"""
    env_ids: Optional[Tuple[str, ...]] = None
    """dataset ids / D4RL-style names (default: the preset's); `local/...` ids are generated when missing"""
    algos: Optional[Tuple[Literal["cql", "td3bc", "awac", "iql"], ...]] = None
    """offline algorithms, each fine-tuned by its script (cql: samg_sac.py, td3bc: samg_td3.py, awac: samg_awac.py,
    iql: samg_iql.py)"""
    methods: Optional[Tuple[str, ...]] = None
    """online methods, names from METHODS (samg, samg-static, none, offline-0.5, even, random, ...)"""
    seeds: Optional[Tuple[int, ...]] = None
    """online seeds"""
    pretrain_seeds: Optional[int] = None
    """checkpoints per (dataset, algo), seeds 1..N, online seed k using checkpoint ((k - 1) % N) + 1"""
    offline_steps: Optional[int] = None
    """pretrain_offline.py --total-steps"""
    cvae_steps: Optional[int] = None
    """pretrain_offline.py --cvae-steps"""
    online_steps: Optional[int] = None
    """--total-timesteps of the online runs"""
    learning_starts: Optional[int] = None
    """--learning-starts of the online runs"""
    online_eval_freq: Optional[int] = None
    """--eval-freq of the online runs (the dip needs evaluations within the first 10% of the steps)"""
    eval_episodes: Optional[int] = None
    """--eval-episodes of pretraining and online runs"""
    dataset_args: str = ""
    """flags added to every make_dataset.py run, as one shell line given with `=` (see --online-args)"""
    pretrain_args: str = ""
    """flags added to every pretraining run, as one shell line given with `=` (see --online-args)"""
    online_args: str = ""
    """flags added to every online run, as one shell line given with `=`, e.g. --online-args="--no-cuda --eval-episodes 10";
    they come after the preset's flags, so they also override them"""
    workers: int = 2
    """runs at the same time"""
    threads: int = 1
    """OMP/MKL threads per run (workers x threads should not exceed the CPU cores)"""
    runs_dir: Optional[str] = None
    """online runs and logs go here (default: runs/{preset})"""
    checkpoint_dir: Optional[str] = None
    """checkpoints go here (default: checkpoints/{preset})"""
    print_commands: bool = False
    """print one shell line per run still to do, in dependency order, and exit; with --stage, one line per run of the
    stage, line N (from 0) for --index N, with the runs there is nothing to do for commented out (`# skip: ...`)"""
    dry_run: bool = False
    """list every run (with --stage, the stage's, in index order), `todo` or `skip` (its result exists, or nothing
    still to do needs it), and exit"""
    stage: Optional[Literal["dataset", "pretrain", "online"]] = None
    """run one run of this stage, the one --index names; with --print-commands, --count or --dry-run, list only
    this stage"""
    index: Optional[int] = None
    """with --stage: which run of the stage, from 0 (default: $SLURM_ARRAY_TASK_ID)"""
    count: bool = False
    """with --stage: print how many runs the stage has (the size of its job array) and exit"""


@dataclass
class Run:
    """One process of the suite: its command, the runs it needs first, and how to tell it is done."""

    id: str
    stage: Literal["dataset", "pretrain", "online"]
    command: List[str]
    deps: List[str]
    outputs: List[Path]
    """all must exist for the run to count as done"""
    run_dir: Optional[Path] = None
    meta: dict = field(default_factory=dict)
    done_file: Optional[Path] = None
    """written by the suite when the script exits with status 0, for a script whose own result cannot tell (an online
    run's directory exists from its start; a prepared dataset may lie in any of several places of the store)"""

    def is_done(self) -> bool:
        return all(path.exists() for path in self.outputs)


def safe_name(env_id: str) -> str:
    return env_id.replace("/", "-")


def minari_root() -> Path:
    """Where Minari keeps datasets (its own rule: $MINARI_DATASETS_PATH, else ~/.minari/datasets)."""
    return Path(os.environ.get("MINARI_DATASETS_PATH") or Path.home() / ".minari" / "datasets")


def script(name: str) -> str:
    """Path of a project script as the user would type it from the current directory."""
    path = ROOT / name
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)


def flags(**values) -> List[str]:
    """`--name value` for each value that is set; None leaves the script's default."""
    out = []
    for name, value in values.items():
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


# --- the command builders: the only place that knows the scripts' flags ---
def dataset_command(env: str, qualities: List[str], preset: Preset) -> List[str]:
    return ["python", script("make_dataset.py"), "--gym-id", LOCAL_GYM_IDS[env], "--qualities", *qualities,
            *preset.dataset_args]


def pretrain_command(env_id: str, algo: str, seed: int, preset: Preset, checkpoint_dir: str) -> List[str]:
    return ["python", script("pretrain_offline.py"), "--env-id", env_id, "--algo", algo, "--seed", str(seed),
            *flags(total_steps=preset.offline_steps, cvae_steps=preset.cvae_steps,
                   eval_freq=preset.offline_eval_freq, eval_episodes=preset.eval_episodes),
            "--checkpoint-dir", checkpoint_dir, *preset.pretrain_args]


def prepare_command(env_id: str) -> List[str]:
    return ["python", script("benchmark/prepare_dataset.py"), "--env-id", env_id]


def online_command(env_id: str, algo: str, method: str, seed: int, checkpoint: Path, run_dir: Path,
                   preset: Preset) -> List[str]:
    return ["python", script(ONLINE_SCRIPTS[algo]), "--env-id", env_id, "--checkpoint", str(checkpoint),
            "--seed", str(seed), *method_flags(method, preset),
            *flags(total_timesteps=preset.online_steps, learning_starts=preset.learning_starts,
                   eval_freq=preset.online_eval_freq, eval_episodes=preset.eval_episodes),
            "--run-dir", str(run_dir), *preset.online_args]


def method_flags(method: str, preset: Preset) -> List[str]:
    """METHODS[method], with the preset's period for the methods that replace Q_off."""
    flags_ = list(METHODS[method])
    if "--qoff-refresh-every" in flags_ and preset.qoff_refresh_every:
        flags_[flags_.index("--qoff-refresh-every") + 1] = str(preset.qoff_refresh_every)
    return flags_


def local_dataset(env_id: str) -> Optional[Tuple[str, str]]:
    """(env, quality) of a `local/{env}/{quality}-v0` id that make_dataset.py can generate, else None."""
    parts = env_id.split("/")
    if len(parts) == 3 and parts[0] == "local" and parts[1] in LOCAL_GYM_IDS and parts[2].endswith("-v0"):
        return parts[1], parts[2][: -len("-v0")]
    return None


def plan(preset_name: str, preset: Preset, runs_dir: str, checkpoint_dir: str) -> List[Run]:
    """Every run of the suite, in dependency order: datasets, then pretraining, then online runs."""
    runs: List[Run] = []
    qualities: Dict[str, List[str]] = {}
    for env_id in preset.env_ids:
        if (parsed := local_dataset(env_id)) is not None:
            qualities.setdefault(parsed[0], [])
            if parsed[1] not in qualities[parsed[0]]:
                qualities[parsed[0]].append(parsed[1])
    for env, env_qualities in qualities.items():
        outputs = [minari_root() / "local" / env / f"{quality}-v0" / "data" for quality in env_qualities]
        runs.append(Run(f"dataset__{env}", "dataset", dataset_command(env, env_qualities, preset), [], outputs))
    # every other dataset (a D4RL-style name or a Minari id) is resolved, downloaded or combined by its own run here,
    # so that the pretraining runs that need it, started together, never download or combine at the same time
    prepared = [env_id for env_id in preset.env_ids if local_dataset(env_id) is None]
    for env_id in prepared:
        # medium-expert may download or read the very medium set that medium's run downloads: after it, not beside it
        medium = env_id.replace("medium-expert", "medium")
        deps = [f"dataset__{safe_name(medium)}"] if medium != env_id and medium in prepared else []
        done_file = Path(runs_dir) / "datasets" / f"{safe_name(env_id)}.done"
        runs.append(Run(f"dataset__{safe_name(env_id)}", "dataset", prepare_command(env_id), deps, [done_file],
                        done_file=done_file))

    pretrain_seeds = list(range(1, preset.pretrain_seeds + 1)) if preset.pretrain_seeds else list(preset.seeds)

    def checkpoint_seed(online_seed: int) -> int:
        return online_seed if not preset.pretrain_seeds else (online_seed - 1) % preset.pretrain_seeds + 1

    for env_id in preset.env_ids:
        parsed = local_dataset(env_id)
        dataset_deps = [f"dataset__{parsed[0]}" if parsed else f"dataset__{safe_name(env_id)}"]
        for algo in preset.algos:
            for seed in pretrain_seeds:
                checkpoint = Path(checkpoint_dir) / f"{safe_name(env_id)}__{algo}__{seed}.pt"
                runs.append(Run(f"{safe_name(env_id)}__{algo}__{seed}", "pretrain",
                                pretrain_command(env_id, algo, seed, preset, checkpoint_dir), dataset_deps,
                                [checkpoint]))

    for seed in preset.seeds:  # seed by seed, so that an unfinished suite still covers every cell evenly
        for env_id in preset.env_ids:
            for algo in preset.algos:
                for method in preset.methods:
                    run_id = f"{safe_name(env_id)}__{algo}__{method}__{seed}"
                    run_dir = Path(runs_dir) / run_id
                    pretrain_id = f"{safe_name(env_id)}__{algo}__{checkpoint_seed(seed)}"
                    checkpoint = Path(checkpoint_dir) / f"{pretrain_id}.pt"
                    command = online_command(env_id, algo, method, seed, checkpoint, run_dir, preset)
                    meta = {"suite": preset_name, "env_id": env_id, "algo": algo, "method": method,
                            "flags": method_flags(method, preset), "seed": seed,
                            "checkpoint_seed": checkpoint_seed(seed),
                            "offline_steps": preset.offline_steps, "total_timesteps": preset.online_steps,
                            "learning_starts": preset.learning_starts, "checkpoint": str(checkpoint)}
                    runs.append(Run(run_id, "online", command, [pretrain_id], [run_dir / "DONE"], run_dir, meta,
                                    done_file=run_dir / "DONE"))
    return runs


def shell_line(run: Run) -> str:
    """The run as one shell line; a run with a done file writes it after a clean exit, an online run also writes its
    suite.json first."""
    line = shlex.join(run.command)
    if run.done_file is None:
        return line
    before = f"mkdir -p {shlex.quote(str(run.done_file.parent))} && "
    if run.stage == "online":
        meta_path = shlex.quote(str(run.run_dir / "suite.json"))
        before += f"printf '%s\\n' {shlex.quote(json.dumps(run.meta))} > {meta_path} && "
    return f"{before}{line} && touch {shlex.quote(str(run.done_file))}"


# --- running the suite ---
def prepare_online_dir(run: Run):
    """A fresh start: an earlier, unfinished attempt's logs are removed; suite.json says what the run is."""
    if run.run_dir.exists():
        shutil.rmtree(run.run_dir)
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "suite.json").write_text(json.dumps(run.meta, indent=1) + "\n")


def run_environment(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")


def argv(run: Run) -> List[str]:
    """The command as it is started: `python` is this interpreter."""
    return [sys.executable if part == "python" else part for part in run.command]


def finish(run: Run, elapsed: float) -> Optional[str]:
    """After an exit with status 0: writes the run's done file, if it has one; returns why the run is not done
    (an output is missing), else None."""
    if run.done_file is not None:
        run.done_file.parent.mkdir(parents=True, exist_ok=True)
        run.done_file.write_text(f"exit 0 after {elapsed:.0f} s\n")
    missing = [path for path in run.outputs if not path.exists()]
    return f"exit 0 but {missing[0]} is missing" if missing else None


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def runs_to_do(runs: List[Run]) -> List[Run]:
    """The runs whose results are missing, less datasets that no unfinished pretraining run needs."""
    todo = [run for run in runs if not run.is_done()]
    needed = {dep for run in todo for dep in run.deps}
    return [run for run in todo if run.stage != "dataset" or run.id in needed]


def eta(pending: List[Run], running: dict, durations: Dict[str, List[float]], workers: int) -> str:
    """Time left: the mean duration so far of each stage (of all runs for a stage not seen yet), over workers."""
    observed = [d for stage_durations in durations.values() for d in stage_durations]
    if not observed:
        return "ETA after the first run"

    def mean(stage: str) -> float:
        known = durations.get(stage, observed)
        return sum(known) / len(known)

    left = sum(mean(run.stage) for run in pending)
    left += sum(max(mean(run.stage) - (time.time() - started), 0.0) for run, _, started, _ in running.values())
    return f"ETA {format_duration(left / workers)}"


def execute(runs: List[Run], workers: int, threads: int, log_dir: Path) -> List[Tuple[Run, str]]:
    """Runs every run still to do, at most `workers` at a time, each once the runs it needs have succeeded.
    Returns the runs that failed or could not start, with the reason."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = run_environment(threads)
    pending = runs_to_do(runs)
    state = {run.id: "done" for run in runs}
    state.update({run.id: "todo" for run in pending})
    total, finished, failures = len(pending), 0, []
    durations: Dict[str, List[float]] = {}
    running: Dict[str, tuple] = {}  # run id -> (run, process, start time, log file)
    print(f"{total} runs to do, {len(runs) - total} already done; {workers} workers x {threads} thread(s); "
          f"logs in {log_dir}", flush=True)

    def start(run: Run):
        if run.stage == "online":
            prepare_online_dir(run)
        log = open(log_dir / f"{run.id}.log", "w")
        log.write(shlex.join(run.command) + "\n\n")
        log.flush()
        running[run.id] = (run, subprocess.Popen(argv(run), stdout=log, stderr=subprocess.STDOUT, env=env),
                           time.time(), log)
        state[run.id] = "running"
        print(f"[{finished}/{total}] start  {run.stage:8s} {run.id}", flush=True)

    try:
        while pending or running:
            for run in list(pending):
                failed_deps = [dep for dep in run.deps if state[dep] == "failed"]
                if failed_deps:
                    pending.remove(run)
                    state[run.id], finished = "failed", finished + 1
                    failures.append((run, f"not started: {failed_deps[0]} failed"))
                elif len(running) < workers and all(state[dep] == "done" for dep in run.deps):
                    pending.remove(run)
                    start(run)
            time.sleep(0.2)
            for run_id, (run, process, started, log) in list(running.items()):
                if process.poll() is None:
                    continue
                log.close()
                del running[run_id]
                finished += 1
                elapsed = time.time() - started
                reason = f"exit status {process.returncode}" if process.returncode else finish(run, elapsed)
                if reason is None:
                    state[run_id] = "done"
                    durations.setdefault(run.stage, []).append(elapsed)
                    print(f"[{finished}/{total}] done   {run.stage:8s} {run_id} in {format_duration(elapsed)} | "
                          f"{eta(pending, running, durations, workers)}", flush=True)
                else:
                    state[run_id] = "failed"
                    failures.append((run, reason))
                    print(f"[{finished}/{total}] FAILED {run.stage:8s} {run_id} ({reason}); "
                          f"see {log_dir / f'{run_id}.log'}", flush=True)
    except KeyboardInterrupt:
        for run, process, _, log in running.values():
            process.terminate()
            process.wait()
            log.close()
        raise SystemExit("interrupted; start the same command again to resume (finished runs are skipped)")
    return failures


# --- one run of one stage, for job arrays ---
def stage_runs(runs: List[Run], stage: str) -> List[Run]:
    """Every run of the stage, done or not, in plan order: --index N is the N-th, so indices never shift."""
    return [run for run in runs if run.stage == stage]


def runs_in_words(count: int) -> str:
    return "no runs" if count == 0 else "1 run (index 0)" if count == 1 else f"{count} runs (indices 0 to {count - 1})"


def stage_index(index: Optional[int], stage: str, preset_name: str, count: int) -> int:
    """--index, else $SLURM_ARRAY_TASK_ID, checked against the stage's number of runs."""
    where = f"the {stage} stage of the {preset_name} preset has {runs_in_words(count)}"
    if index is None:
        task_id = os.environ.get("SLURM_ARRAY_TASK_ID")
        if task_id is None:
            raise SystemExit(f"error: --stage {stage} needs --index N or $SLURM_ARRAY_TASK_ID to say which run; "
                             f"{where}")
        if not task_id.strip().isdigit():
            raise SystemExit(f"error: $SLURM_ARRAY_TASK_ID is {task_id!r}, not a run index; {where}")
        index = int(task_id)
    if not 0 <= index < count:
        raise SystemExit(f"error: index {index} is out of range; {where}")
    return index


def run_one(run: Run, runs: List[Run], threads: int) -> int:
    """Runs one run in the foreground, its output on stdout, unless there is nothing to do for it; returns the exit
    status. A run whose inputs are not done yet is refused (its array was started before the one it needs ended)."""
    if run.id not in {todo.id for todo in runs_to_do(runs)}:
        print(f"{run.id}: nothing to do (its result exists, or nothing still to do needs it)")
        return 0
    by_id = {other.id: other for other in runs}
    missing = [dep for dep in run.deps if not by_id[dep].is_done()]
    if missing:
        raise SystemExit(f"error: {run.id} needs {missing[0]} (in the {by_id[missing[0]].stage} stage), which is not "
                         "done; run that stage first, or chain the arrays with sbatch --dependency=afterok:JOB_ID")
    if run.stage == "online":
        prepare_online_dir(run)
    print(f"{run.stage} {run.id}: {shlex.join(run.command)}", flush=True)
    started = time.time()
    try:
        status = subprocess.call(argv(run), env=run_environment(threads))
    except KeyboardInterrupt:
        raise SystemExit(f"interrupted; {run.id} is not done, and the same command starts it again")
    if status != 0:
        print(f"{run.id} failed (exit status {status})", file=sys.stderr)
        return status
    reason = finish(run, time.time() - started)
    if reason is not None:
        print(f"{run.id} failed ({reason})", file=sys.stderr)
        return 1
    print(f"{run.id} done in {format_duration(time.time() - started)}")
    return 0


def resolve(args: Args) -> Tuple[Preset, str, str]:
    """The preset with the command-line overrides applied, and the output directories."""
    preset = PRESETS[args.preset]
    overrides = {name: getattr(args, name) for name in ("env_ids", "algos", "methods", "seeds", "pretrain_seeds",
                                                        "offline_steps", "cvae_steps", "online_steps",
                                                        "learning_starts", "online_eval_freq", "eval_episodes")}
    preset = replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    added = {}
    for name in ("dataset_args", "pretrain_args", "online_args"):
        try:
            added[name] = getattr(preset, name) + tuple(shlex.split(getattr(args, name)))
        except ValueError as exc:
            raise SystemExit(f"error: --{name.replace('_', '-')} {getattr(args, name)!r} is not a shell line ({exc})")
    preset = replace(preset, **added)
    if not (preset.env_ids and preset.algos and preset.methods and preset.seeds):
        raise SystemExit("error: --env-ids, --algos, --methods and --seeds must not be empty")
    unknown = [method for method in preset.methods if method not in METHODS]
    if unknown and unknown[0] in RETIRED_METHODS:
        raise SystemExit(f"error: method {unknown[0]} needs {RETIRED_METHODS[unknown[0]]}, which was retired with the "
                         "question it answered (its results stay in benchmark/results); choose another method")
    if unknown:
        raise SystemExit(f"error: unknown method {unknown[0]}; choose from {', '.join(METHODS)}")
    if preset.pretrain_seeds is not None and preset.pretrain_seeds < 1:
        raise SystemExit("error: --pretrain-seeds must be at least 1")
    if args.workers < 1 or args.threads < 1:
        raise SystemExit("error: --workers and --threads must be at least 1")
    if args.stage is None and (args.index is not None or args.count):
        raise SystemExit("error: --index and --count pick or count the runs of one stage; add --stage "
                         "{dataset,pretrain,online}")
    for env_id in preset.env_ids:
        if env_id.startswith("local/") and local_dataset(env_id) is None:
            raise SystemExit(f"error: {env_id} is not a dataset make_dataset.py can generate; use "
                             f"local/{{env}}/{{quality}}-v0 with env in {', '.join(LOCAL_GYM_IDS)}")
    runs_dir = args.runs_dir or os.path.join("runs", args.preset)
    checkpoint_dir = args.checkpoint_dir or os.path.join("checkpoints", args.preset)
    return preset, runs_dir, checkpoint_dir


if __name__ == "__main__":
    args = tyro.cli(Args)
    preset, runs_dir, checkpoint_dir = resolve(args)
    runs = plan(args.preset, preset, runs_dir, checkpoint_dir)
    todo = {run.id for run in runs_to_do(runs)}
    listed = stage_runs(runs, args.stage) if args.stage else runs
    if args.count:
        print(len(listed))
        raise SystemExit(0)
    if args.print_commands and args.stage:
        print(f"# the {args.stage} stage of the {args.preset} preset: {runs_in_words(len(listed))}, line N for "
              f"--index N; {sum(run.id not in todo for run in listed)} with nothing to do, shown as `# skip:`",
              file=sys.stderr)
        print("\n".join(shell_line(run) if run.id in todo else f"# skip: {shell_line(run)}" for run in listed))
        raise SystemExit(0)
    if args.print_commands:
        print(f"# {len(todo)} runs to do ({len(runs) - len(todo)} done or not needed); each line comes after the "
              "lines it needs", file=sys.stderr)
        print("\n".join(shell_line(run) for run in runs if run.id in todo))
        raise SystemExit(0)
    if args.dry_run:
        for run in listed:
            print(f"{'todo' if run.id in todo else 'skip':4s}  {run.stage:8s}  {shlex.join(run.command)}")
        raise SystemExit(0)
    if args.stage:
        index = stage_index(args.index, args.stage, args.preset, len(listed))
        raise SystemExit(run_one(listed[index], runs, args.threads))
    started = time.time()
    failures = execute(runs, args.workers, args.threads, Path(runs_dir) / "logs")
    print(f"suite finished in {format_duration(time.time() - started)}")
    if failures:
        print(f"{len(failures)} run(s) failed:")
        for run, reason in failures:
            print(f"  {run.id}: {reason}; log: {Path(runs_dir) / 'logs' / f'{run.id}.log'}")
        raise SystemExit(1)
    print(f"all runs done; the report: python {script('benchmark/report.py')} --runs-dir {runs_dir}")
