"""Offline checkpoints scored on many episodes, the same episodes for each: how far apart are two pretraining budgets?

    python benchmark/eval_checkpoint.py checkpoints/plateau/local-halfcheetah-medium-v0__td3bc__1.pt \
        checkpoints/plateau-1m/local-halfcheetah-medium-v0__td3bc__1.pt --episodes 50 --out eval.md

Pretraining's own evaluations use 5-10 episodes, so one of them can sit a point or two off the agent's mean. Here each
checkpoint's actor (deterministic, as pretrain_offline.py evaluates it) plays `--episodes` episodes started from the
environment seeds `--seed`, `--seed` + 1, ...; every checkpoint plays the same starts, so the difference of each later
checkpoint to the first is paired episode by episode. The table gives the normalized score (mean and its 95%
percentile bootstrap interval over episodes) and the paired difference to the first checkpoint. It measures the
policy's noise over starting states only: nothing about other pretraining seeds.
"""
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_offline import ACTORS, evaluate, make_env, normalized_score  # noqa: E402
from report import bootstrap_mean_ci, check_out, fail, write_staged  # noqa: E402


@dataclass
class Args:
    checkpoints: tyro.conf.Positional[List[str]]
    """pretrain_offline.py checkpoints of one environment; the first is the reference of the differences"""
    episodes: int = 50
    """episodes per checkpoint"""
    seed: int = 1000
    """environment seed of the first episode (pretraining evaluates from its run's seed; 1000 keeps these apart)"""
    reps: int = 2000
    """bootstrap resamples"""
    out: Optional[str] = None
    """also write the table here (markdown)"""


def load(path: str) -> dict:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        ACTORS[checkpoint["algo"]](checkpoint["obs_dim"], checkpoint["act_dim"], checkpoint["hidden_dims"]) \
            .load_state_dict(checkpoint["actor"])
        return checkpoint
    except Exception as exc:
        fail(f"{path} is not a checkpoint of pretrain_offline.py ({type(exc).__name__}: {exc}); give checkpoints it wrote")


def episode_scores(checkpoint: dict, episodes: int, seed: int) -> np.ndarray:
    """The checkpoint's normalized score in each episode (its actor deterministic, episode i from seed + i)."""
    actor = ACTORS[checkpoint["algo"]](checkpoint["obs_dim"], checkpoint["act_dim"], checkpoint["hidden_dims"])
    actor.load_state_dict(checkpoint["actor"])
    env = make_env(checkpoint["gym_id"], checkpoint["gym_kwargs"], seed)
    with torch.no_grad():
        returns, _, _ = evaluate(actor.eval(), env, np.asarray(checkpoint["obs_mean"]),
                                 np.asarray(checkpoint["obs_std"]), episodes, seed, torch.device("cpu"))
    env.close()
    return normalized_score(returns, checkpoint["ref_min_score"], checkpoint["ref_max_score"])


def main(args: Args) -> None:
    if args.episodes < 2 or args.reps < 1:
        fail("--episodes must be at least 2 and --reps at least 1")
    check_out(args.out)
    checkpoints = [load(path) for path in args.checkpoints]  # every input checked before the long part
    if len({(c["gym_id"], str(c["gym_kwargs"])) for c in checkpoints}) > 1:
        fail("the checkpoints are of different environments; give checkpoints of one environment")
    torch.set_num_threads(1)
    lines = [f"{args.episodes} episodes per checkpoint from environment seeds {args.seed}-{args.seed + args.episodes - 1}"
             " (the same for each); normalized score, mean [95% bootstrap interval over episodes]", "",
             "| checkpoint | pretraining steps | pretraining's own last evaluation | score | minus the first (paired) |",
             "| --- | --- | --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    first = None
    for path, checkpoint in zip(args.checkpoints, checkpoints):
        scores = episode_scores(checkpoint, args.episodes, args.seed)
        mean, low, high = bootstrap_mean_ci(scores, args.reps, 0)
        if first is None:
            first, difference = scores, ""
        else:
            d, d_low, d_high = bootstrap_mean_ci(scores - first, args.reps, 0)
            difference = f"{d:+.1f} [{d_low:+.1f}, {d_high:+.1f}]"
        lines.append(f"| {path} | {checkpoint.get('args', {}).get('total_steps', '?')} | "
                     f"{checkpoint.get('offline_normalized_score', float('nan')):.1f} | "
                     f"{mean:.1f} [{low:.1f}, {high:.1f}] | {difference} |")
        print(lines[-1], flush=True)
    if args.out:
        write_staged(Path(args.out), ("\n".join(lines) + "\n").encode())
        print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except KeyboardInterrupt:
        sys.exit("stopped; nothing written")
