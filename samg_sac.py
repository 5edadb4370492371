"""SAMG online fine-tuning of a CQL checkpoint with SAC, using only online data.

    python pretrain_offline.py --env-id hopper-medium-v2 --algo cql
    python samg_sac.py --env-id hopper-medium-v2

SAMG (Zhang et al., arXiv:2410.18626) keeps the pretrained offline critic Q_off frozen and mixes it into the online
Bellman target through a coefficient p(s, a) in [0, 1] from a conditional VAE of the offline (s, a) pairs:

    y = r + gamma (1 - done) [(1 - p) Qbar(s', a') + p Q_off(s', a') - alpha log pi(a'|s')]   (update_critic)

p is a rank [our choice]: the share of the offline pairs the C-VAE finds less familiar, so a pair like the median
offline pair gets about 0.5 and one more familiar than all of them 1. Below --p-threshold (0.2: the least familiar fifth
of the offline pairs too) p is 0 and the target is the plain SAC target. The defaults are the paper's SAMG as its
abstract describes it: Q_off is frozen for the whole run, and p adapts: the C-VAE keeps learning on the half of each
batch the online critic fits best ("mastered"). Where the paper is silent the defaults are ours, marked [our choice],
e.g. p is taken at the next pair (s', a'), whose Q_off value enters the target. --no-adaptive freezes the C-VAE too;
--coef-mode even / random / none are the paper's ablations and plain fine-tuning. The replay buffer holds online data
only; of the offline data the checkpoint carries a sample of 2048 (s, a) pairs, used only to rank p against. The dataset
itself is never read, except by --offline-data-ratio (the baseline that keeps it).
"""
import contextlib
import dataclasses
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Literal, Optional
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
OFFLINE_ALGO = "cql"  # the `pretrain_offline.py --algo` whose checkpoint this script fine-tunes


# --- shared: online arguments ---
@dataclass
class OnlineArgs:
    env_id: str = "hopper-medium-v2"
    """the dataset id the checkpoint was pretrained on (it names the default checkpoint)"""
    seed: int = 1
    """seed of the experiment; also picks the checkpoint"""
    checkpoint: Optional[str] = None
    """the offline checkpoint; None: checkpoints/{env_id with / as -}__{algo}__{seed}.pt"""
    total_timesteps: int = 250_000
    """online environment steps"""
    learning_starts: int = 5000
    """steps collected with the pretrained policy before the first update"""
    batch_size: int = 256
    """minibatch size"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target network smoothing coefficient"""
    critic_lr: float = 3e-4
    """critic learning rate"""
    actor_lr: float = 3e-4
    """actor learning rate"""
    coef_mode: Literal["cvae", "even", "random", "none"] = "cvae"
    """p: cvae (SAMG), even (p = --even-p), random (p ~ U(0, 1)), none (p = 0: plain fine-tuning)"""
    even_p: float = 0.5
    """even: the constant p (0.5 is the paper's ablation)"""
    p_at: Literal["sample", "next"] = "next"
    """the pair p is taken at: next (s', a'), whose Q_off value enters the target [our choice], or sample (s, a)"""
    p_estimator: Literal["elbo", "latent"] = "elbo"
    """p_vae from the C-VAE: elbo (its rank among offline pairs) [our choice], or latent (encoder tail mass)"""
    p_threshold: float = 0.2
    """p = p_vae if p_vae >= p_threshold else 0: pairs unlike the offline data get no offline guidance"""
    adaptive: bool = True
    """the C-VAE keeps learning on mastered online pairs, so p grows where the agent has learned (no: frozen)"""
    mastered_quantile: float = 0.5
    """adaptive: share of each batch, lowest |TD error| first, that counts as mastered"""
    cvae_lr: float = 1e-3
    """adaptive: C-VAE learning rate"""
    qoff_refresh_every: int = 0
    """copy the online critic into Q_off every this many steps (0: never, Q_off stays frozen) [a reviewer's reading]"""
    offline_data_ratio: float = 0.0
    """share of every batch drawn from the checkpoint's dataset (0: SAMG; 0.5: the baseline that keeps the data)"""
    eval_freq: int = 5000
    """evaluate the deterministic policy at step 0 and every this many steps"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    save_model: bool = False
    """write {run_dir}/{run_name}/model.pt, which loads like the offline checkpoint"""
    run_dir: str = "runs"
    """each run writes its TensorBoard log (and model.pt) to a new directory {run_dir}/{run_name}"""
    compile: bool = False
    """wrap the updates in torch.compile (on CUDA with CUDA graphs)"""
    cuda: bool = True
    """use CUDA when it is available"""
    threads: int = 0
    """CPU threads of torch (0: one per core); 1 when other runs share the cores"""
# --- end shared ---


@dataclass
class Args(OnlineArgs):
    alpha_lr: float = 3e-4
    """entropy temperature learning rate (alpha starts from the checkpoint's and keeps auto-tuning)"""


# --- shared: environment ---
def flatten_obs(obs):
    """Dict observations (antmaze) become [observation, achieved_goal, desired_goal]; the ant's own position
    is in achieved_goal, so leaving it out would blind the policy."""
    if isinstance(obs, dict):
        return np.concatenate([obs["observation"], obs["achieved_goal"], obs["desired_goal"]], axis=-1)
    return obs


def make_env(gym_id: str, gym_kwargs: dict, seed: int, render_mode: Optional[str] = None):
    if gym_id not in gym.registry:
        import gymnasium_robotics  # registers AntMaze and Adroit, which only these tasks need

        gym.register_envs(gymnasium_robotics)
    env = gym.make(gym_id, render_mode=render_mode, **gym_kwargs)
    env.action_space.seed(seed)
    return env


def to_env_action(action: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The networks act in [-1, 1]; the environment gets [low, high]."""
    return low + (np.clip(action, -1.0, 1.0) + 1.0) * 0.5 * (high - low)
# --- end shared ---


# --- shared: networks ---
def mlp(dims, output_activation: Optional[nn.Module] = None) -> nn.Sequential:
    """Linear layers with ReLUs between them (in place: one activation buffer less per layer)."""
    layers = [layer for d_in, d_out in zip(dims[:-1], dims[1:]) for layer in (nn.Linear(d_in, d_out), nn.ReLU(True))]
    return nn.Sequential(*layers[:-1], *([output_activation] if output_activation is not None else []))


class VectorizedLinear(nn.Module):
    """`n` independent linear layers as one batched matmul: [n, batch, in] -> [n, batch, out]."""

    def __init__(self, in_features: int, out_features: int, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features))
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default initialisation, member by member
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.shape[-1] == 1:  # one output: a matrix-vector product per member (batched GEMM is slow here)
            return torch.stack([torch.addmv(b[0], m, w[:, 0]) for b, m, w in zip(self.bias, x, self.weight)])[..., None]
        return torch.baddbmm(self.bias, x, self.weight)


class CriticEnsemble(nn.Module):
    """N Q-functions evaluated in one call: forward(obs [B, o], action [B, a]) -> Q values [N, B]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims, num_critics: int):
        super().__init__()
        dims = [obs_dim + act_dim, *hidden_dims]
        layers = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [VectorizedLinear(d_in, d_out, num_critics), nn.ReLU(inplace=True)]
        layers.append(VectorizedLinear(dims[-1], 1, num_critics))
        self.net = nn.Sequential(*layers)
        self.num_critics = num_critics

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, action], dim=-1).unsqueeze(0).expand(self.num_critics, -1, -1)
        return self.net(x).squeeze(-1)
# --- end shared ---


# --- shared: tanh-Gaussian actor ---
class TanhGaussianActor(nn.Module):
    """SAC/CQL policy: a ~ tanh(N(mean(s), std(s))), log-std clamped to [-5, 2]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims):
        super().__init__()
        self.trunk = mlp([obs_dim, *hidden_dims], output_activation=nn.ReLU(inplace=True))
        self.mean = nn.Linear(hidden_dims[-1], act_dim)
        self.log_std = nn.Linear(hidden_dims[-1], act_dim)

    def forward(self, obs: torch.Tensor, samples_per_state: int = 1):
        """Returns a reparameterised sample, its log-probability and the deterministic action tanh(mean); with
        samples_per_state n, n samples per state in a row (s1 n times, then s2, ...) from one network pass each."""
        hidden = self.trunk(obs)
        mean, log_std = self.mean(hidden), self.log_std(hidden).clamp(-5.0, 2.0)
        if samples_per_state > 1:
            mean, log_std = (x.repeat_interleave(samples_per_state, 0) for x in (mean, log_std))
        noise = torch.randn_like(mean)
        pre_tanh = mean + log_std.exp() * noise
        action = torch.tanh(pre_tanh)
        gaussian_log_prob = -0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
        # log(1 - tanh(u)^2) written stably: 2 * (log 2 - u - softplus(-2u))
        squash_correction = 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))
        log_prob = (gaussian_log_prob - squash_correction).sum(-1)
        return action, log_prob, torch.tanh(mean)

    def act(self, obs: torch.Tensor, deterministic: bool) -> torch.Tensor:
        action, _, mean_action = self(obs)
        return mean_action if deterministic else action
# --- end shared ---


# --- shared: C-VAE and p(s,a) ---
class CVAE(nn.Module):
    """Conditional VAE of actions given states: encoder (s, a) -> N(mu, sigma) in R^d, decoder (s, z) -> a."""

    def __init__(self, obs_dim: int, act_dim: int, latent_dim: int, hidden_dims):
        super().__init__()
        self.encoder = mlp([obs_dim + act_dim, *hidden_dims, 2 * latent_dim])
        self.decoder = mlp([obs_dim + latent_dim, *hidden_dims, act_dim], output_activation=nn.Tanh())

    def encode(self, obs: torch.Tensor, action: torch.Tensor):
        mu, log_std = self.encoder(torch.cat([obs, action], dim=-1)).chunk(2, dim=-1)
        return mu, log_std.clamp(-4.0, 15.0)

    def decode(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([obs, z], dim=-1))


def cvae_loss(cvae: CVAE, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Training loss: MSE reconstruction + 0.5 * KL(N(mu, sigma) || N(0, I)), both averaged over elements."""
    mu, log_std = cvae.encode(obs, action)
    recon = cvae.decode(obs, mu + log_std.exp() * torch.randn_like(mu))
    kl = 0.5 * (mu.pow(2) + (2 * log_std).exp() - 1.0 - 2 * log_std).mean()
    return F.mse_loss(recon, action) + 0.5 * kl


def unfamiliarity(cvae: CVAE, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Per-sample negative ELBO, deterministic (decoded at z = mu), summed squared error + KL: low = familiar. A
    score to rank pairs by, not the training loss (cvae_loss averages over elements and halves the KL)."""
    mu, log_std = cvae.encode(obs, action)
    recon_error = (cvae.decode(obs, mu) - action).pow(2).sum(-1)
    kl = 0.5 * (mu.pow(2) + (2 * log_std).exp() - 1.0 - 2 * log_std).sum(-1)
    return recon_error + kl


def p_latent(cvae: CVAE, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Each latent dimension j is an independent Gaussian; q_j = 2 (1 - Phi(|mu_j|)) is the prior's two-sided
    tail mass beyond the encoder mean, and p is their average (linear weighting)."""
    mu, _ = cvae.encode(obs, action)
    return torch.erfc(mu.abs() / math.sqrt(2.0)).mean(-1)


def p_elbo(cvae: CVAE, reference: torch.Tensor, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """p as a rank: the share of offline pairs whose unfamiliarity is at least that of (s, a). 1 for a pair more
    familiar than all of them, 0 for one stranger than all; over offline pairs p is uniform on [0, 1], whatever the
    scale of the scores. `reference` holds the sorted scores of offline pairs (or quantiles of them)."""
    below = torch.searchsorted(reference, unfamiliarity(cvae, obs, action).contiguous())
    return 1.0 - below.to(obs.dtype) / reference.numel()
# --- end shared ---


# --- shared: SAMG target ---
class Coefficient:
    """p(s, a) of --coef-mode. With cvae, p_vae from the C-VAE (--p-estimator), hard-thresholded at --p-threshold.
    The elbo estimate ranks a pair among the checkpoint's reservoir of offline pairs, scored by the current C-VAE
    (`rerank` after it learns), so p keeps meaning "as familiar as that share of the offline data". The reservoir
    only ranks; nothing trains on it."""

    def __init__(self, args, cvae: CVAE, calibration: dict, device: torch.device):
        self.mode, self.estimator, self.threshold, self.even_p, self.cvae = (
            args.coef_mode, args.p_estimator, args.p_threshold, args.even_p, cvae)
        # an older checkpoint has no reservoir: quantiles fixed at pretraining (only a static C-VAE may use them)
        self.reference, self.reservoir = calibration["neg_elbo_quantiles"].to(device), None
        if "reservoir_obs" in calibration:
            self.reservoir = (calibration["reservoir_obs"].to(device), calibration["reservoir_actions"].to(device))
            self.reference = torch.empty(len(self.reservoir[0]), device=device)
            self.rerank()

    @torch.no_grad()
    def rerank(self):
        if self.reservoir is not None:  # without one, the fixed quantiles stay (a static C-VAE only)
            self.reference.copy_(unfamiliarity(self.cvae, *self.reservoir).sort().values)

    def p_vae(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        if self.estimator == "latent":
            return p_latent(self.cvae, obs, actions)
        return p_elbo(self.cvae, self.reference, obs, actions)

    def __call__(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return obs.new_zeros(obs.shape[0])
        if self.mode == "even":
            return obs.new_full((obs.shape[0],), self.even_p)
        if self.mode == "random":
            return torch.rand(obs.shape[0], device=obs.device)
        p_vae = self.p_vae(obs, actions)
        return torch.where(p_vae >= self.threshold, p_vae, 0.0)  # unfamiliar pairs get no guidance


def guided_target(reward, done, gamma: float, next_value, next_value_offline, p):
    """y = r + gamma (1 - done) [(1 - p) next_value + p next_value_offline]; p = 0 is the base algorithm's target."""
    return reward + gamma * (1.0 - done) * torch.lerp(next_value, next_value_offline, p)


def update_cvae_on_mastered(cvae: CVAE, cvae_optimizer, obs, actions, td_error, mastered_quantile: float):
    """Adaptive p: one ELBO step of the C-VAE on the batch's pairs that the online critic fits best ("mastered"), so
    p grows where the agent has learned. A fixed-size top-k keeps it free of host synchronisation."""
    mastered = td_error.topk(max(1, int(mastered_quantile * td_error.numel())), largest=False).indices
    loss = cvae_loss(cvae, obs[mastered], actions[mastered])
    cvae_optimizer.zero_grad()
    loss.backward()
    cvae_optimizer.step()
    return loss.detach().reshape(1)
# --- end shared ---


# --- shared: replay ---
class ReplayBuffer:
    """Transitions preallocated on the training device; one row holds [s, a, r, s', done]."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device):
        self.rows = torch.zeros(capacity, 2 * obs_dim + act_dim + 2, device=device)
        self.widths = (obs_dim, act_dim, 1, obs_dim, 1)
        self.size, self.position = 0, 0

    def add(self, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray, done: bool):
        row = np.concatenate([obs, action, [reward], next_obs, [float(done)]]).astype(np.float32)
        self.rows[self.position] = torch.from_numpy(row)
        self.position = (self.position + 1) % len(self.rows)
        self.size = min(self.size + 1, len(self.rows))

    def sample(self, batch_size: int, offline: Optional["ReplayBuffer"] = None, offline_ratio: float = 0.0):
        """(obs, actions, rewards, next_obs, dones), drawn uniformly with replacement; with an `offline` buffer,
        `offline_ratio` of the batch comes from it (symmetric sampling, as RLPD does)."""
        num_offline = round(offline_ratio * batch_size) if offline is not None else 0
        rows = self.rows[torch.randint(self.size, (batch_size - num_offline,), device=self.rows.device)]
        if num_offline:
            rows = torch.cat([rows, offline.rows[torch.randint(offline.size, (num_offline,), device=rows.device)]])
        obs, actions, rewards, next_obs, dones = rows.split(self.widths, dim=-1)
        return obs, actions, rewards.squeeze(-1), next_obs, dones.squeeze(-1)


def observation_normalizer(checkpoint: dict):
    """flatten_obs, then the offline dataset's mean and std from the checkpoint: the networks' input scale."""
    mean, std = np.asarray(checkpoint["obs_mean"]), np.asarray(checkpoint["obs_std"])
    return lambda obs: ((flatten_obs(obs) - mean) / std).astype(np.float32)


@torch.no_grad()
def soft_update(target_params: list, online_params: list, tau: float):
    torch._foreach_lerp_(target_params, online_params, tau)
# --- end shared ---


def update_critic(batch, actor, critic, critic_target, q_offline, log_alpha, coefficient: Coefficient,
                  critic_optimizer, args: Args, diagnose: bool):
    """SAC's critic step on the SAMG target; the entropy bonus is in both next values, so the mix leaves it whole.
    Returns the losses, the SAMG_METRICS (None when nothing asks for them), each sample's |TD error| and p."""
    obs, actions, rewards, next_obs, dones = batch
    with torch.no_grad():
        next_actions, next_log_prob, _ = actor(next_obs)
        bonus = -log_alpha.exp() * next_log_prob
        next_value = critic_target(next_obs, next_actions).min(0).values
        guided, metrics = args.coef_mode != "none", None
        next_value_offline = q_offline(next_obs, next_actions).min(0).values if guided or diagnose else next_value
        p = coefficient(next_obs, next_actions) if args.p_at == "next" else coefficient(obs, actions)
        target = guided_target(rewards, dones, args.gamma, next_value + bonus, next_value_offline + bonus, p)
        if guided or diagnose:
            metrics = samg_metrics(p, dones, args.gamma, next_value, next_value_offline)
    q_values = critic(obs, actions)
    qf_loss = (q_values - target).pow(2).mean(1).sum()  # each critic's own MSE
    critic_optimizer.zero_grad()
    qf_loss.backward()
    critic_optimizer.step()
    q_values = q_values.detach()
    losses = torch.stack([qf_loss.detach() / critic.num_critics, q_values.mean()])
    return losses, metrics, (q_values - target).abs().mean(0), p


CRITIC_METRICS, ACTOR_METRICS = ("losses/qf_loss", "losses/qf_values"), ("losses/actor_loss", "losses/alpha")


def update_actor(obs, actor, critic, log_alpha, actor_optimizer, alpha_optimizer, target_entropy: float):
    """SAC's actor loss on the min over critics, then one step of automatic entropy tuning."""
    actions, log_prob, _ = actor(obs)
    alpha = log_alpha.exp().detach()
    actor_loss = (alpha * log_prob - critic(obs, actions).min(0).values).mean()
    actor_optimizer.zero_grad()
    actor_loss.backward(inputs=list(actor.parameters()))  # dQ/da only: no gradient into the critic's weights
    actor_optimizer.step()
    alpha_loss = -(log_alpha.exp() * (log_prob.detach() + target_entropy)).mean()
    alpha_optimizer.zero_grad()
    alpha_loss.backward()
    alpha_optimizer.step()
    return torch.stack([actor_loss.detach(), alpha])


def main(args: Args):
    checkpoint, path = read_checkpoint(args, OFFLINE_ALGO)
    env = make_checked_env(checkpoint, args.seed, path)
    eval_env = make_checked_env(checkpoint, args.seed + 10_000, path)  # evaluations start from other seeds
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    obs_dim, act_dim, hidden = checkpoint["obs_dim"], checkpoint["act_dim"], checkpoint["hidden_dims"]
    actor = load_weights(TanhGaussianActor(obs_dim, act_dim, hidden), checkpoint, "actor", path, device)
    # the online critic and its target start from the offline critic; Q_off is a copy of it, frozen
    num_critics = len(checkpoint["critic"]["net.0.weight"])
    critic, critic_target, q_offline = (load_weights(CriticEnsemble(obs_dim, act_dim, hidden, num_critics), checkpoint,
                                                     "critic", path, device) for _ in range(3))
    cvae = load_weights(CVAE(obs_dim, act_dim, checkpoint["latent_dim"], hidden), checkpoint, "cvae", path, device)
    coefficient = Coefficient(args, cvae, checkpoint["cvae_calibration"], device)
    log_alpha = torch.tensor(float(checkpoint["log_alpha"]), device=device, requires_grad=True)
    target_entropy = -float(act_dim)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_lr, fused=True)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.actor_lr, fused=True)
    alpha_optimizer = torch.optim.Adam([log_alpha], lr=args.alpha_lr, fused=True)
    cvae_optimizer = torch.optim.Adam(cvae.parameters(), lr=args.cvae_lr, fused=True)
    critic_update, actor_update, cvae_update = compiled(args, update_critic, update_actor, update_cvae_on_mastered)
    target_params, online_params = list(critic_target.requires_grad_(False).parameters()), list(critic.parameters())
    q_offline.requires_grad_(False)
    learn_cvae = args.adaptive and args.coef_mode == "cvae"  # the C-VAE only gives p in cvae mode
    refresh_q_offline = args.qoff_refresh_every > 0 and args.coef_mode != "none"

    replay = ReplayBuffer(args.total_timesteps, obs_dim, act_dim, device)
    offline = offline_replay(checkpoint, device) if args.offline_data_ratio > 0 else None
    normalize = observation_normalizer(checkpoint)
    low, high = env.action_space.low, env.action_space.high
    run, global_step, num_updates = Run(args, checkpoint, path), 0, 0
    try:
        run.evaluate(actor, eval_env, device, step=0)
        obs = normalize(env.reset(seed=args.seed)[0])
        for global_step in range(1, args.total_timesteps + 1):
            with torch.no_grad():  # the pretrained policy explores from the first step on
                action = actor.act(torch.as_tensor(obs, device=device)[None], deterministic=False)[0].cpu().numpy()
            raw_next_obs, reward, terminated, truncated, info = env.step(to_env_action(action, low, high))
            next_obs = normalize(raw_next_obs)
            # the training reward is transformed as the offline data was; a time limit never stops bootstrapping
            replay.add(obs, action, reward * checkpoint["reward_scale"] + checkpoint["reward_bias"], next_obs,
                       terminated)
            run.step(float(reward), info, terminated or truncated, global_step)
            obs = normalize(env.reset()[0]) if terminated or truncated else next_obs
            log_step = global_step % 1000 == 0 or global_step == args.total_timesteps

            if global_step > args.learning_starts:
                batch = replay.sample(args.batch_size, offline, args.offline_data_ratio)
                losses, samg, td_error, p = critic_update(batch, actor, critic, critic_target, q_offline, log_alpha,
                                                          coefficient, critic_optimizer, args, diagnose=log_step)
                run.add(CRITIC_METRICS, losses)
                run.add(SAMG_METRICS, samg)
                if learn_cvae:
                    run.add(("samg/cvae_loss",), cvae_update(cvae, cvae_optimizer, batch[0], batch[1], td_error,
                                                             args.mastered_quantile))
                    if (num_updates + 1) % 50 == 0:  # re-rank p's reference by the moved C-VAE [our choice]
                        coefficient.rerank()
                run.add(ACTOR_METRICS, actor_update(batch[0], actor, critic, log_alpha, actor_optimizer,
                                                    alpha_optimizer, target_entropy))
                soft_update(target_params, online_params, args.tau)
                num_updates += 1
                if log_step and args.coef_mode != "none":
                    run.log_p(coefficient, p, batch[0], global_step)
            if refresh_q_offline and global_step % args.qoff_refresh_every == 0:
                q_offline.load_state_dict(critic.state_dict())
            if global_step % args.eval_freq == 0 or global_step == args.total_timesteps:
                run.evaluate(actor, eval_env, device, global_step)
            if log_step:
                run.log(global_step)
        hold_signals()  # the run is done: from here on no signal may cut the saving short
    except (KeyboardInterrupt, OSError, FloatingPointError) as stop:  # a signal, a full disk, diverged losses
        run.stopped(stop, global_step)
    run.finish(global_step, dict(actor=actor, critic=critic, cvae=cvae), env, eval_env,
               log_alpha=log_alpha.detach().cpu())


# ======================================================================================================================
# The algorithm ends here. Below: checks of the flags, reading and checking the checkpoint (its weights go into the
# classes above unchanged) and the environment, the offline data of --offline-data-ratio (the only part below that
# changes what is learned, and only with that flag), evaluation, the run's directory, logs, interrupts and model.pt.
# ======================================================================================================================


# --- shared: online run ---
def fail(message: str):
    """Stops the script with one sentence for the user and a non-zero exit status, without a traceback."""
    raise SystemExit(f"error: {message}")


SAMG_METRICS = ("samg/p_mean", "samg/p_active_frac", "samg/target_shift", "samg/qoff_values", "samg/qbar_values",
                "samg/qoff_above_frac")


def samg_metrics(p, done, gamma: float, next_value, next_value_offline) -> torch.Tensor:
    """The SAMG_METRICS of a batch; target_shift is how far p moved the targets: gamma (1 - d) p (Q_off - Qbar)."""
    shift = gamma * (1.0 - done) * p * (next_value_offline - next_value)
    return torch.stack([p.mean(), (p > 0).float().mean(), shift.mean(), next_value_offline.mean(), next_value.mean(),
                        (next_value_offline > next_value).float().mean()])


FLAG_RANGES = (  # the numeric flags of the four online scripts (a flag a script lacks is skipped) and their ranges
    ("positive", lambda v: v > 0, ("total_timesteps", "batch_size", "critic_lr", "actor_lr", "cvae_lr", "eval_freq",
                                   "eval_episodes", "policy_freq", "alpha_lr", "awac_lambda", "awac_max_weight",
                                   "iql_beta", "iql_max_weight")),
    ("zero or more", lambda v: v >= 0, ("learning_starts", "qoff_refresh_every", "exploration_noise", "policy_noise")),
    ("in [0, 1]", lambda v: 0 <= v <= 1, ("gamma", "tau", "even_p", "p_threshold")),
    ("in (0, 1]", lambda v: 0 < v <= 1, ("mastered_quantile",)), ("in [0, 1)", lambda v: 0 <= v < 1,
                                                                   ("offline_data_ratio",)),
    ("strictly between 0 and 1", lambda v: 0 < v < 1, ("iql_expectile",)),
    ("in [0, 2**31)", lambda v: 0 <= v < 2**31, ("seed",)),
    (f"from 0 to the {os.cpu_count()} cores of this machine", lambda v: 0 <= v <= (os.cpu_count() or 1), ("threads",)),
)


def check_flags(args):
    for what, allowed, fields in FLAG_RANGES:
        for field, value in ((f, getattr(args, f)) for f in fields if getattr(args, f, None) is not None):
            if not (math.isfinite(value) and allowed(value)):
                fail(f"--{field.replace('_', '-')} is {value} but must be {what}")
    if args.learning_starts >= args.total_timesteps:
        fail(f"--learning-starts is {args.learning_starts} but must be below --total-timesteps, or nothing is learned")


def numbers(value, *shape) -> bool:
    """Whether `value` holds finite numbers of this shape (-1: any size)."""
    value = torch.as_tensor(value, dtype=torch.float32) if isinstance(value, (int, float, list, torch.Tensor)) else None
    return (value is not None and value.dim() == len(shape) and bool(torch.isfinite(value).all())
            and all(s in (-1, n) for s, n in zip(shape, value.shape)))


CHECKPOINT_FIELDS = (  # (key, test of the checkpoint c, what the key must be), in this order
    ("obs_dim", lambda c: all(isinstance(c[k], int) and c[k] > 0 for k in ("obs_dim", "act_dim", "latent_dim")),
     "a positive integer, as act_dim and latent_dim"),
    ("hidden_dims", lambda c: c["hidden_dims"] and all(isinstance(h, int) and h > 0 for h in c["hidden_dims"]),
     "a list of positive integers"),
    ("obs_std", lambda c: numbers(c["obs_mean"], c["obs_dim"]) and numbers(c["obs_std"], c["obs_dim"])
     and min(c["obs_std"]) > 0, "obs_dim positive numbers, beside obs_mean's finite ones"),
    ("action_low", lambda c: numbers(c["action_low"], c["act_dim"]) and numbers(c["action_high"], c["act_dim"])
     and all(lo < hi for lo, hi in zip(c["action_low"], c["action_high"])), "act_dim numbers below action_high"),
    ("ref_min_score", lambda c: c["ref_min_score"] != c["ref_max_score"] and numbers(c["ref_min_score"])
     and numbers(c["ref_max_score"]), "a number, other than ref_max_score"),
    ("reward_scale", lambda c: numbers(c["reward_scale"]) and numbers(c["reward_bias"]), "a finite number"),
    ("critic", lambda c: all(isinstance(c[k], dict) for k in ("actor", "critic", "cvae", "cvae_calibration"))
     and numbers(c["critic"]["net.0.weight"], -1, -1, -1), "a state dict, as actor, cvae and cvae_calibration"),
    ("cvae_calibration", lambda c: numbers(c["cvae_calibration"]["neg_elbo_quantiles"], -1)
     and len(c["cvae_calibration"]["neg_elbo_quantiles"]) > 1  # sorted: p is a rank among them
     and bool((c["cvae_calibration"]["neg_elbo_quantiles"].diff() >= 0).all()) and (
        "reservoir_obs" not in c["cvae_calibration"]
        or numbers(c["cvae_calibration"]["reservoir_obs"], -1, c["obs_dim"])
        and numbers(c["cvae_calibration"]["reservoir_actions"], -1, c["act_dim"])), "quantiles and offline pairs"),
    ("log_alpha", lambda c: c["algo"] != "cql" or numbers(torch.as_tensor(c["log_alpha"]).reshape(-1), 1),
     "a number (cql)"),
    ("value", lambda c: c["algo"] != "iql" or isinstance(c["value"], dict), "a state dict (iql)"),
)


def read_checkpoint(args, algo: str):
    """Checks the flags, then loads the offline checkpoint (weights_only) and checks what the script needs of it."""
    check_flags(args)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    path = args.checkpoint or os.path.join("checkpoints", f"{args.env_id.replace('/', '-')}__{algo}__{args.seed}.pt")
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}; make it with "
             f"`python pretrain_offline.py --env-id {args.env_id} --algo {algo} --seed {args.seed}`")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        fail(f"{path} is not a readable checkpoint ({type(exc).__name__}); write it again with pretrain_offline.py")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != "samg-offline-1":
        fail(f"{path} is not a checkpoint of pretrain_offline.py (format samg-offline-1); write it again with that")
    if checkpoint.get("algo") != algo:
        fail(f"{path} was pretrained with --algo {checkpoint.get('algo')} but this script needs {algo}; pretrain with "
             f"`python pretrain_offline.py --env-id {args.env_id} --algo {algo} --seed {args.seed}`")
    for key, test, what in CHECKPOINT_FIELDS:
        with contextlib.suppress(Exception):  # a missing key, a list where a dict belongs: not passed
            if test(checkpoint):
                continue
        fail(f"{path} has a bad or missing {key} (it must be {what}); write it again with pretrain_offline.py")
    buffer_bytes, memory = 4 * args.total_timesteps * (2 * checkpoint["obs_dim"] + checkpoint["act_dim"] + 2), (
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if buffer_bytes > memory:  # the replay buffer holds every online step
        fail(f"--total-timesteps {args.total_timesteps} needs a replay buffer of {buffer_bytes / 2**30:.3g} GiB, more "
             f"than the {memory / 2**30:.0f} GiB of this machine")
    if args.coef_mode == "cvae" and args.adaptive and "reservoir_obs" not in checkpoint["cvae_calibration"]:
        fail(f"{path} has no reservoir of offline pairs to rank an adaptive C-VAE's p against; pass --no-adaptive "
             "or pretrain again")
    recorded = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else {}
    for field in (f for f in ("awac_lambda", "iql_expectile", "iql_beta") if getattr(args, f, 0) is None):
        setattr(args, field, recorded.get(field))  # by default the value it was pretrained with
        if not isinstance(getattr(args, field), (int, float)):
            fail(f"{path} records no {field}; pass --{field.replace('_', '-')}")
    check_flags(args)
    return checkpoint, path


def load_weights(module: nn.Module, checkpoint: dict, key: str, path: str, device: torch.device) -> nn.Module:
    """load_state_dict of checkpoint[key]; weights of other sizes or not finite are refused in one sentence."""
    try:
        module.load_state_dict(checkpoint[key])
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        fail(f"the {key} in {path} does not fit its stated sizes ({str(exc).strip().splitlines()[-1].strip()})")
    if not all(torch.isfinite(value).all() for value in module.state_dict().values()):
        fail(f"the {key} in {path} has weights that are not finite (its training diverged); pretrain it again")
    return module.to(device)


def make_checked_env(checkpoint: dict, seed: int, path: str):
    """The checkpoint's environment, which must have the spaces the checkpoint was trained for."""
    try:
        env = make_env(checkpoint["gym_id"], checkpoint["gym_kwargs"], seed)
    except Exception as exc:
        fail(f"cannot make the environment {checkpoint['gym_id']} of {path} ({exc}); install what it needs")
    obs_dim, space = flatten_obs(env.observation_space.sample()).shape[-1], env.action_space
    if (obs_dim, space.shape) != (checkpoint["obs_dim"], (checkpoint["act_dim"],)) or not (
            np.allclose(space.low, checkpoint["action_low"]) and np.allclose(space.high, checkpoint["action_high"])):
        fail(f"{checkpoint['gym_id']} now has other spaces than {path} was trained on; pretrain again")
    return env


def offline_replay(checkpoint: dict, device: torch.device) -> ReplayBuffer:
    """--offline-data-ratio: the checkpoint's dataset with the checkpoint's transforms (states normalised, actions in
    [-1, 1], training rewards). The only place an online script reads the offline dataset."""
    try:
        import minari

        episodes = list(minari.load_dataset(checkpoint["dataset_id"]).iterate_episodes())
        obs = [flatten_obs(e.observations) for e in episodes]
        s, a, r, s2, d = (np.concatenate(part).astype(np.float32) for part in (
            [o[:-1] for o in obs], [e.actions for e in episodes], [e.rewards for e in episodes], [o[1:] for o in obs],
            [e.terminations for e in episodes]))
        if s.shape[1:] != (checkpoint["obs_dim"],) or a.shape[1:] != (checkpoint["act_dim"],):
            raise ValueError("other sizes than the checkpoint's")
    except Exception as exc:
        fail(f"--offline-data-ratio reads the checkpoint's dataset {checkpoint['dataset_id']}, which could not be read "
             f"({type(exc).__name__}: {exc}); make or import it again, or leave out --offline-data-ratio")
    mean, std, low, high = (np.asarray(checkpoint[k]) for k in ("obs_mean", "obs_std", "action_low", "action_high"))
    replay = ReplayBuffer(len(s), checkpoint["obs_dim"], checkpoint["act_dim"], device)
    replay.rows.copy_(torch.as_tensor(np.concatenate([
        (s - mean) / std, np.clip(2.0 * (a - low) / (high - low) - 1.0, -1, 1),
        r[:, None] * checkpoint["reward_scale"] + checkpoint["reward_bias"], (s2 - mean) / std, d[:, None]], axis=1),
        dtype=torch.float32))
    replay.size = len(s)
    return replay


def compiled(args, *update_functions):
    """--compile wraps the update functions in torch.compile (on CUDA capturing CUDA graphs)."""
    mode = "reduce-overhead" if torch.cuda.is_available() and args.cuda else None
    return tuple(torch.compile(f, mode=mode) for f in update_functions) if args.compile else update_functions


def method_name(args) -> str:
    """What the run does, for its name: e.g. cvae-next-adaptive, even0.05-static, none, none-offline0.5."""
    mode = args.coef_mode + (f"{args.even_p:g}" if args.coef_mode == "even" and args.even_p != 0.5 else "")
    name = "none" if args.coef_mode == "none" else "-".join(
        [mode] + [args.p_at] * (args.coef_mode == "cvae") + ["adaptive" if args.adaptive else "static"]
        + [f"refresh{args.qoff_refresh_every}"] * (args.qoff_refresh_every > 0))
    return name + (f"-offline{args.offline_data_ratio:g}" if args.offline_data_ratio > 0 else "")


class Run:
    """The run's own directory {run_dir}/{run_name}, made by this run alone, with its TensorBoard log (the
    hyperparameters as a table): metrics, episodes, evaluations and progress lines; and model.pt at the end."""

    def __init__(self, args, checkpoint: dict, path: str):
        self.args, self.checkpoint, self.status, self.score, self.offline_score = args, checkpoint, 0, math.nan, None
        self.name = (f"{args.env_id.replace('/', '-')}__{os.path.basename(sys.argv[0]).removesuffix('.py')}__"
                     f"{method_name(args)}__{args.seed}__{int(time.time())}")
        self.dir, hyperparameters = os.path.join(args.run_dir, self.name), {**vars(args), "checkpoint_path": path}
        try:
            for attempt in range(2, 1 << 30):  # a directory of its own, even beside a run started in the same second
                with contextlib.suppress(FileExistsError):
                    os.makedirs(self.dir)
                    break
                self.dir = os.path.join(args.run_dir, f"{self.name}-{attempt}")
            self.writer = SummaryWriter(self.dir)
            self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
                f"|{k}|{v}|" for k, v in hyperparameters.items()))
            self.writer.flush()
        except (OSError, UnicodeError) as exc:
            fail(f"cannot write a run directory in {args.run_dir} ({getattr(exc, 'strerror', '') or exc}); choose "
                 "another --run-dir")
        self.sums, self.episode, self.successes, self.last = {}, [0.0, 0, 0.0], [], (time.time(), 0)

    def step(self, reward: float, info: dict, episode_over: bool, step: int):
        """Online episodes: return, length and, on goal tasks, success and regret (mean of 1 - success so far)."""
        self.episode = [self.episode[0] + reward, self.episode[1] + 1, max(self.episode[2], info.get("success", 0.0))]
        if episode_over:
            self.successes += [self.episode[2]] if "success" in info else []
            for name, value in zip(("charts/episodic_return", "charts/episodic_length", "charts/success",
                                    "charts/regret"), (*self.episode, 1.0 - np.mean(self.successes or [np.nan]))):
                if name.startswith("charts/episodic") or "success" in info:
                    self.writer.add_scalar(name, value, step)
            self.episode = [0.0, 0, 0.0]

    def add(self, names: tuple, values: Optional[torch.Tensor]):
        """Sums metric tensors where they live; they are read once per log step, the only host synchronisation."""
        if values is not None:
            total, count = self.sums.get(names, (0, 0))
            self.sums[names] = (values + total, count + 1)

    def log(self, step: int):
        """Writes the averaged metrics and the steps per second and prints where the run stands; a loss that is no
        longer finite stops the run."""
        for names, (total, count) in self.sums.items():
            for name, value in zip(names, (total / count).tolist()):
                self.writer.add_scalar(name, value, step)
                if not math.isfinite(value) and name.startswith("losses/"):
                    raise FloatingPointError(f"{name} is {value}: the training diverged (a learning rate too large?)")
        (last_time, last_step), self.sums = self.last, {}
        sps, self.last = (step - last_step) / max(time.time() - last_time, 1e-9), (time.time(), step)
        self.writer.add_scalar("charts/SPS", int(sps), step)
        eta = time.strftime("%H:%M:%S", time.gmtime((self.args.total_timesteps - step) / max(sps, 1e-9)))
        print(f"step {step}/{self.args.total_timesteps}  SPS {sps:.0f}  ETA {eta}  last eval score {self.score:.1f}",
              flush=True)

    def evaluate(self, actor: nn.Module, eval_env: gym.Env, device: torch.device, step: int):
        c = self.checkpoint
        returns, _, successes = evaluate(actor, eval_env, np.asarray(c["obs_mean"]), np.asarray(c["obs_std"]),
                                         self.args.eval_episodes, self.args.seed + 10_000, device)
        self.score = float(normalized_score(returns, c["ref_min_score"], c["ref_max_score"]).mean())
        self.writer.add_scalar("eval/return", returns.mean(), step)
        self.writer.add_scalar("eval/normalized_score", self.score, step)
        if isinstance(eval_env.observation_space, gym.spaces.Dict):
            self.writer.add_scalar("eval/success", successes.mean(), step)
        if self.offline_score is None:
            self.offline_score = self.score
            print(f"{self.name}: the offline policy scores {self.score:.1f}", flush=True)

    @torch.no_grad()
    def log_p(self, coefficient: Coefficient, p: torch.Tensor, obs: torch.Tensor, step: int):
        """The batch's p: its 10/50/90% quantiles and, in cvae mode, samg/p_auroc: how well p_vae still ranks the
        reservoir's offline pairs above the batch's states with random actions (1: always, 0.5: chance)."""
        quantiles = torch.quantile(p.float(), torch.tensor([0.1, 0.5, 0.9], device=p.device)).tolist()
        for name, value in zip(("samg/p_q10", "samg/p_q50", "samg/p_q90"), quantiles):
            self.writer.add_scalar(name, value, step)
        if coefficient.mode == "cvae" and coefficient.reservoir is not None:
            self.probe = getattr(self, "probe", None) or torch.Generator(obs.device).manual_seed(0)  # not training's
            novel = coefficient.p_vae(obs, torch.rand(obs.shape[0], coefficient.reservoir[1].shape[1],
                                                      device=obs.device, generator=self.probe) * 2.0 - 1.0)
            familiar = coefficient.p_vae(*coefficient.reservoir)[:, None]
            auroc = (familiar > novel).float().mean() + 0.5 * (familiar == novel).float().mean()
            self.writer.add_scalar("samg/p_auroc", auroc.item(), step)

    def stopped(self, stop: BaseException, step: int):
        """One line for a run stopped by a signal, a failed write (a full disk) or losses that diverged."""
        if isinstance(stop, KeyboardInterrupt):
            reason, self.status = f"interrupted ({signal.Signals(STOPPED_BY[0]).name})", 128 + STOPPED_BY[0]
        else:
            reason, self.status = str(stop) if isinstance(stop, FloatingPointError) else (
                f"could not write {stop.filename or 'the run log'} ({stop.strerror or stop})"), 1
        keeping = "the logs and the model" if self.args.save_model else "the logs"
        print(f"stopped at step {step}: {reason}; keeping {keeping}", flush=True)

    def finish(self, step: int, networks: dict, *envs, **tensors):
        """With --save-model, model.pt: the checkpoint's keys with the fine-tuned networks in place of the offline
        ones. Then closes everything and exits with the run's status."""
        hold_signals()
        if self.args.save_model:
            save_model(dict(self.checkpoint, online_steps=step, online_normalized_score=self.score,
                            online_args=dataclasses.asdict(self.args), **tensors, **{
                                key: {name: w.detach().cpu() for name, w in network.state_dict().items()}
                                for key, network in networks.items()}), os.path.join(self.dir, "model.pt"))
        for resource in (*envs, self.writer):
            with contextlib.suppress(OSError):
                resource.close()
        if self.status:
            raise SystemExit(self.status)
        print(f"normalized score: offline {self.offline_score:.1f} -> online {self.score:.1f} after {step} steps")


def save_model(payload: dict, path: str):
    """Written beside `path` and moved into place, so no half-written model.pt is ever left; where the run dir cannot
    take it (a full disk), into the temporary directory instead, said in one sentence."""
    reason = None
    for place in (path, os.path.join(tempfile.gettempdir(), f"rescued-{os.getpid()}-model.pt")):
        try:
            torch.save(payload, f"{place}.tmp")
            os.replace(f"{place}.tmp", place)
        except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
            reason = reason or getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]
            with contextlib.suppress(OSError):
                os.remove(f"{place}.tmp")
            continue
        if place == path:
            return print(f"saved {place}", flush=True)
        fail(f"could not write {path} ({reason}); the trained networks are saved as {place} instead")
    fail(f"could not write {path} nor in {tempfile.gettempdir()} ({reason}); the trained networks are lost")


STOP_SIGNALS, STOPPED_BY = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP), [signal.SIGINT]


def stop_as_on_ctrl_c(number, frame):
    """Ctrl-C, SIGTERM (a scheduler's limit, kill) and SIGHUP stop a run alike, the exit status 128 + the signal. The
    signals after the first are ignored, so that they cannot cut the saving short."""
    STOPPED_BY[0] = number
    hold_signals()
    raise KeyboardInterrupt


def hold_signals():
    """Ctrl-C, SIGTERM and SIGHUP are ignored from here on: the run has stopped or finished and saves what it has.
    The handler does nothing rather than SIG_IGN: a signal caught just as the handlers change would then raise
    OSError("Signal 2 ignored due to race condition") wherever the run is."""
    for number in STOP_SIGNALS:
        signal.signal(number, lambda *_: None)


def run_main(main, args_type):
    """main(args) with the signals handled: one stops the loop, which saves what it has (Run.stopped), or, before the
    loop, ends the script with one line. A full disk in the log's writer thread is said by the loop's next write."""
    for number in STOP_SIGNALS:
        signal.signal(number, stop_as_on_ctrl_c)
    threading.excepthook = lambda hook: None if issubclass(hook.exc_type, OSError) else threading.__excepthook__(hook)
    try:
        main(tyro.cli(args_type, description=sys.modules["__main__"].__doc__))
    except KeyboardInterrupt:
        print(f"interrupted ({signal.Signals(STOPPED_BY[0]).name}) before the run started", file=sys.stderr)
        raise SystemExit(128 + STOPPED_BY[0])
# --- end shared ---


# --- shared: evaluation ---
@torch.no_grad()
def evaluate(actor: nn.Module, env: gym.Env, obs_mean: np.ndarray, obs_std: np.ndarray, episodes: int, seed: int,
             device: torch.device):
    """Deterministic episodes; returns raw returns, lengths and success flags (goal tasks report `success`)."""
    returns, lengths, successes = np.zeros(episodes), np.zeros(episodes, dtype=np.int64), np.zeros(episodes)
    low, high = env.action_space.low, env.action_space.high
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done = False
        while not done:
            obs_t = torch.as_tensor((flatten_obs(obs) - obs_mean) / obs_std, dtype=torch.float32, device=device)
            action = actor.act(obs_t.unsqueeze(0), deterministic=True)[0].cpu().numpy()
            obs, reward, terminated, truncated, info = env.step(to_env_action(action, low, high))
            returns[episode] += float(reward)
            lengths[episode] += 1
            successes[episode] = max(successes[episode], float(info.get("success", 0.0)))
            done = terminated or truncated
    return returns, lengths, successes


def normalized_score(returns, ref_min_score: float, ref_max_score: float):
    """D4RL's normalized score, x100: 0 = random policy, 100 = expert."""
    return 100.0 * (np.asarray(returns) - ref_min_score) / (ref_max_score - ref_min_score)
# --- end shared ---


if __name__ == "__main__":
    run_main(main, Args)
