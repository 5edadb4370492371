"""How well each p(s, a) estimator tells offline actions from out-of-distribution ones, as AUROC.

    python benchmark/ood.py --checkpoints checkpoints/quick               # writes runs/ood/ood.md

For each checkpoint, offline (s, a) pairs from its dataset are scored by both estimators of the online scripts:
`latent` (mean over latent dimensions of the prior's two-sided tail mass beyond the encoder mean) and `elbo`
(share of offline samples whose negative ELBO is at least that of (s, a)). The same states are scored with
two kinds of actions that SAMG should not trust: uniform random actions in [-1, 1] and the dataset action
plus N(0, 0.3) noise, clipped to [-1, 1]. AUROC is the probability that an offline pair gets a higher p than
an out-of-distribution pair (ties count one half): 1.0 separates them perfectly, 0.5 is chance.

Pretraining keeps no held-out split, so by default the offline pairs are pairs the checkpoint's C-VAE was
trained on. `--retrain-cvae-steps N` measures on truly held-out pairs instead: a fresh C-VAE (same architecture,
loss and calibration as pretrain_offline.py) is trained for N steps on all but `--holdout-fraction` of the
transitions, and the held-out rest is scored.
"""
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import pretrain_offline as po  # noqa: E402  (the C-VAE, p estimators, checkpoint and dataset loading)

ESTIMATORS = ("latent", "elbo")


@dataclass
class Args:
    checkpoints: Tuple[str, ...] = ("checkpoints",)
    """checkpoint files, or directories whose *.pt files are all measured"""
    num_pairs: int = 10_000
    """offline (s, a) pairs scored per checkpoint (sampled without replacement)"""
    noise_std: float = 0.3
    """std of the Gaussian noise added to dataset actions (actions live in [-1, 1])"""
    p_threshold: float = 0.2
    """also reports the share of pairs with p >= this threshold (the online scripts' --p-threshold)"""
    retrain_cvae_steps: int = 0
    """0: the checkpoint's C-VAE on pairs it was trained on; N > 0: a fresh C-VAE trained N steps, on held-out pairs"""
    holdout_fraction: float = 0.1
    """share of the transitions held out when --retrain-cvae-steps > 0"""
    seed: int = 0
    """seed of the pair sampling, the random actions, the noise and the retraining"""
    out: str = "runs/ood/ood.md"
    """where the markdown tables are written (the committed benchmark/results/ only when given here)"""


# --- AUROC ---
def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing the average of their ranks."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def auroc(positive, negative) -> float:
    """P(a positive scores higher than a negative) + 0.5 P(tie), from the Mann-Whitney rank-sum statistic."""
    positive, negative = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    n_pos, n_neg = len(positive), len(negative)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("auroc needs at least one positive and one negative score")
    rank_sum = average_ranks(np.concatenate([positive, negative]))[:n_pos].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# --- scoring ---
def checkpoint_paths(entries: Tuple[str, ...]) -> List[Path]:
    paths = []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            paths += sorted(path.glob("*.pt"))
        elif path.is_file():
            paths.append(path)
        else:
            raise SystemExit(f"error: {entry} is neither a checkpoint file nor a directory")
    if not paths:
        raise SystemExit(f"error: no checkpoints (*.pt) in {', '.join(entries)}; run pretrain_offline.py first")
    return paths


def train_cvae(checkpoint: dict, obs: torch.Tensor, actions: torch.Tensor, steps: int, batch_size: int = 256):
    """A fresh C-VAE trained like pretrain_offline.py trains it, with its calibration."""
    cvae = po.CVAE(checkpoint["obs_dim"], checkpoint["act_dim"], checkpoint["latent_dim"], checkpoint["hidden_dims"])
    lr = checkpoint["args"].get("cvae_lr", 1e-3)
    optimizer = torch.optim.Adam(cvae.parameters(), lr=lr)
    for _ in range(steps):
        index = torch.randint(0, obs.shape[0], (batch_size,))
        loss = po.cvae_loss(cvae, obs[index], actions[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return cvae, po.calibrate_cvae(cvae, obs, actions)


@torch.no_grad()
def p_values(cvae, calibration: dict, estimator: str, obs: torch.Tensor, actions: torch.Tensor) -> np.ndarray:
    scores = []
    for chunk in torch.arange(obs.shape[0]).split(8192):
        if estimator == "latent":
            scores.append(po.p_latent(cvae, obs[chunk], actions[chunk]))
        else:
            scores.append(po.p_elbo(cvae, calibration["neg_elbo_quantiles"], obs[chunk], actions[chunk]))
    return torch.cat(scores).numpy()


def measure(path: Path, args: Args) -> Tuple[Dict[str, dict], str]:
    """Per estimator: AUROC against random and perturbed actions, mean p and the share above the threshold."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        checkpoint = None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != po.CHECKPOINT_FORMAT:
        po.fail(f"{path} is not a readable checkpoint of pretrain_offline.py; write it again")
    data = po.load_dataset(checkpoint["dataset_id"])
    low, high = data["action_low"], data["action_high"]
    obs = torch.as_tensor((data["observations"] - checkpoint["obs_mean"].numpy()) / checkpoint["obs_std"].numpy(),
                          dtype=torch.float32)
    actions = torch.as_tensor(np.clip(2.0 * (data["actions"] - low) / (high - low) - 1.0, -1.0, 1.0),
                              dtype=torch.float32)
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    permutation = torch.randperm(obs.shape[0], generator=generator)
    if args.retrain_cvae_steps > 0:
        held_out = max(1, int(args.holdout_fraction * obs.shape[0]))
        train_index, eval_index = permutation[held_out:], permutation[:held_out]
        cvae, calibration = train_cvae(checkpoint, obs[train_index], actions[train_index], args.retrain_cvae_steps)
        source = f"held-out pairs, C-VAE retrained for {args.retrain_cvae_steps} steps"
    else:
        eval_index = permutation
        cvae = po.CVAE(checkpoint["obs_dim"], checkpoint["act_dim"], checkpoint["latent_dim"],
                       checkpoint["hidden_dims"])
        cvae.load_state_dict(checkpoint["cvae"])
        calibration = checkpoint["cvae_calibration"]
        source = "training pairs of the checkpoint's C-VAE"
    cvae.eval()
    eval_index = eval_index[: args.num_pairs]
    states, data_actions = obs[eval_index], actions[eval_index]
    random_actions = torch.rand(data_actions.shape, generator=generator) * 2.0 - 1.0
    perturbed = (data_actions + args.noise_std * torch.randn(data_actions.shape, generator=generator)).clamp(-1.0, 1.0)
    results = {}
    for estimator in ESTIMATORS:
        p_data, p_random, p_perturbed = (p_values(cvae, calibration, estimator, states, a)
                                         for a in (data_actions, random_actions, perturbed))
        results[estimator] = {
            "auroc_random": auroc(p_data, p_random), "auroc_perturbed": auroc(p_data, p_perturbed),
            "mean_p": (p_data.mean(), p_random.mean(), p_perturbed.mean()),
            "active": tuple(float((p >= args.p_threshold).mean()) for p in (p_data, p_random, p_perturbed)),
        }
    return results, f"{len(eval_index)} {source}"


def markdown(all_results: List[Tuple[Path, str, Dict[str, dict]]], p_threshold: float) -> str:
    lines = [
        f"| checkpoint | offline pairs | estimator | AUROC vs random a | AUROC vs a + noise | mean p (data / random / "
        f"noisy) | share p >= {p_threshold} (data / random / noisy) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for path, source, results in all_results:
        for estimator, r in results.items():
            lines.append(f"| {path.name} | {source} | {estimator} | {r['auroc_random']:.3f} | "
                         f"{r['auroc_perturbed']:.3f} | {' / '.join(f'{v:.2f}' for v in r['mean_p'])} | "
                         f"{' / '.join(f'{v:.2f}' for v in r['active'])} |")
    lines += ["", "| estimator | mean AUROC vs random a | mean AUROC vs a + noise | checkpoints |",
              "| --- | --- | --- | --- |"]
    for estimator in ESTIMATORS:
        rows = [results[estimator] for _, _, results in all_results]
        lines.append(f"| {estimator} | {np.mean([r['auroc_random'] for r in rows]):.3f} | "
                     f"{np.mean([r['auroc_perturbed'] for r in rows]):.3f} | {len(rows)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.num_pairs < 1 or not 0.0 < args.holdout_fraction < 1.0 or args.retrain_cvae_steps < 0:
        raise SystemExit("error: --num-pairs must be positive, --holdout-fraction in (0, 1), "
                         "--retrain-cvae-steps not negative")
    all_results = []
    for path in checkpoint_paths(args.checkpoints):
        print(f"measuring {path}", flush=True)
        results, source = measure(path, args)
        all_results.append((path, source, results))
    table = markdown(all_results, args.p_threshold)
    best = max(ESTIMATORS, key=lambda e: np.mean([r[e]["auroc_random"] + r[e]["auroc_perturbed"]
                                                 for _, _, r in all_results]))
    summary = (f"\nHigher mean AUROC (random and noisy actions together): `{best}`. Offline pairs are "
               + ("held out from a retrained C-VAE." if args.retrain_cvae_steps else
                  "pairs the checkpoint's C-VAE was trained on (pretraining keeps no held-out split).") + "\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# AUROC of the p(s, a) estimators\n\n{table}{summary}")
    print(table + summary + f"written to {out}")
