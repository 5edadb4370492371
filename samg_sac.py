"""SAMG online fine-tuning of a CQL checkpoint with SAC, using only online data.

    python pretrain_offline.py --env-id hopper-medium-v2 --algo cql
    python samg_sac.py --env-id hopper-medium-v2

The critic's Bellman target mixes the online target critic with the frozen offline critic Q_off through a
state-action coefficient p(s, a) from the offline C-VAE (`samg_coefficient`, `guided_target`, called in
`sac_target`). The offline dataset is never read: everything comes from the checkpoint.
"""
import contextlib
import dataclasses
import importlib.util
import math
import os
import random
import re
import shutil
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
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    env_id: str = "hopper-medium-v2"
    """the dataset id the checkpoint was pretrained on (it names the default checkpoint)"""
    seed: int = 1
    """seed of the experiment; also picks the checkpoint"""
    checkpoint: Optional[str] = None
    """offline checkpoint (default: checkpoints/{env_id, / as -}__{algo}__{seed}.pt)"""
    gym_id: Optional[str] = None
    """Gymnasium id to fine-tune on instead of the checkpoint's own (its spaces must match the checkpoint)"""
    total_timesteps: int = 250_000
    """online environment steps"""
    learning_starts: int = 5000
    """steps collected with the pretrained policy before the first update"""
    utd: int = 1
    """updates per environment step (update-to-data ratio)"""
    batch_size: int = 256
    """minibatch size"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target network smoothing coefficient"""
    num_critics: Optional[int] = None
    """Q-functions in the ensemble (default: the checkpoint's; extra members repeat the checkpoint's in turn)"""
    critic_lr: float = 3e-4
    """critic learning rate"""
    actor_lr: float = 3e-4
    """actor learning rate"""
    coef_mode: Literal["cvae", "even", "random", "none"] = "cvae"
    """p: cvae (SAMG), even (p = --even-p), random (p ~ U(0, 1)), none (p = 0: plain fine-tuning)"""
    even_p: float = 0.5
    """even: the constant p (0.5: the paper's ablation; SAMG's mean p: the same amount of guidance, unconditioned)"""
    p_at: Literal["sample", "next", "both"] = "next"
    """the pair p is evaluated at: sample (s, a) as the paper's text indexes it, next (s', a') whose Q_off value
    enters the target, or both (their product) [our choice of default, by benchmark/results: see README]"""
    p_estimator: Literal["latent", "elbo"] = "elbo"
    """p_vae from the C-VAE: elbo (rank among offline negative ELBOs; the default, by benchmark/ood.py) or latent"""
    p_threshold: float = 0.2
    """p = p_vae if p_vae >= p_threshold else 0: pairs unlike the offline data get no offline guidance"""
    p_fade: Literal["none", "outgrown", "linear"] = "none"
    """lower p where the agent has outgrown Q_off: outgrown (p = 0 where Qbar(s', a') exceeds Q_off(s', a') by more
    than the recent mean |TD error|), linear (p x max(0, 1 - step / --p-fade-steps)) [our choice]"""
    p_fade_steps: int = 100_000
    """linear fade: environment steps after which p is 0"""
    adaptive: bool = True
    """the adaptive update: both halves below (no: the C-VAE, its reference and Q_off stay frozen)"""
    cvae_learning: bool = True
    """adaptive half (a): the C-VAE learns on mastered samples, and the elbo reference is re-ranked as it learns"""
    qoff_refresh: bool = True
    """adaptive half (b): copy the online critic into Q_off every --qoff-refresh-every steps"""
    mastered_quantile: float = 0.5
    """share of each batch, lowest |TD error| first, that counts as mastered"""
    cvae_update_every: int = 1
    """adaptive: one C-VAE step on the mastered samples every this many updates"""
    cvae_lr: float = 1e-3
    """adaptive: C-VAE learning rate"""
    recalibrate_every: int = 50
    """adaptive: re-rank the elbo reference (the checkpoint's offline reservoir) every this many C-VAE steps"""
    qoff_refresh_every: int = 50_000
    """adaptive: copy the online critic into Q_off every this many environment steps"""
    offline_data_ratio: float = 0.0
    """share of every batch drawn from the checkpoint's offline dataset (0: SAMG's 100% online data; 0.5: the
    baseline that keeps the data, as RLPD's symmetric sampling); only this flag ever reads offline data online"""
    eval_freq: int = 5000
    """evaluate the deterministic policy at step 0 and every this many steps"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    log_freq: int = 1000
    """losses are averaged over, and written every, this many steps"""
    save_model: bool = False
    """write {run_dir}/{run_name}/model.pt, reloadable like the offline checkpoint"""
    capture_video: bool = False
    """record the first episode of every evaluation to videos/{run_name}"""
    track: bool = False
    """log to Weights and Biases too"""
    wandb_project_name: str = "samg"
    """the wandb project"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    run_dir: str = "runs"
    """TensorBoard logs and saved models go to {run_dir}/{run_name}"""
    compile: bool = False
    """wrap the update functions in torch.compile"""
    cudagraphs: bool = False
    """on CUDA, compile the updates with CUDA graphs (torch.compile mode reduce-overhead)"""
    cuda: bool = True
    """use CUDA when it is available"""
    threads: int = 0
    """CPU threads of torch's operations (0: torch's default, one per core); 1 when other runs share the cores"""
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
    layers = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.ReLU(inplace=True))  # in place: one fresh activation buffer less per layer
    if output_activation is not None:
        layers.append(output_activation)
    return nn.Sequential(*layers)


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


def negative_elbo(cvae: CVAE, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Per-sample negative ELBO, deterministic (decoded at z = mu): squared error + KL. Low = familiar."""
    mu, log_std = cvae.encode(obs, action)
    recon_error = (cvae.decode(obs, mu) - action).pow(2).sum(-1)
    kl = 0.5 * (mu.pow(2) + (2 * log_std).exp() - 1.0 - 2 * log_std).sum(-1)
    return recon_error + kl


def p_latent(cvae: CVAE, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Each latent dimension j is an independent Gaussian; q_j = 2 (1 - Phi(|mu_j|)) is the prior's two-sided
    tail mass beyond the encoder mean, and p is their average (linear weighting)."""
    mu, _ = cvae.encode(obs, action)
    return torch.erfc(mu.abs() / math.sqrt(2.0)).mean(-1)


def p_elbo(cvae: CVAE, neg_elbo_quantiles: torch.Tensor, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Share of offline samples whose negative ELBO is at least that of (s, a), from stored sorted quantiles."""
    below = torch.searchsorted(neg_elbo_quantiles, negative_elbo(cvae, obs, action).contiguous())
    return 1.0 - below.to(obs.dtype) / neg_elbo_quantiles.numel()
# --- end shared ---


# --- shared: SAMG target ---
def samg_coefficient(coef_mode: str, p_estimator: str, p_threshold: float, cvae: CVAE,
                     neg_elbo_reference: torch.Tensor, obs: torch.Tensor, actions: torch.Tensor,
                     even_p: float = 0.5) -> torch.Tensor:
    """p(s, a) in [0, 1]: how far a Bellman target trusts the frozen offline critic, from the pair (s, a)."""
    batch = obs.shape[0]
    if coef_mode == "none":
        return obs.new_zeros(batch)
    if coef_mode == "even":
        return obs.new_full((batch,), even_p)
    if coef_mode == "random":
        return torch.rand(batch, device=obs.device)
    if p_estimator == "latent":
        p_vae = p_latent(cvae, obs, actions)
    else:
        p_vae = p_elbo(cvae, neg_elbo_reference, obs, actions)
    return torch.where(p_vae >= p_threshold, p_vae, 0.0)  # hard threshold: unfamiliar pairs get no guidance


class Guidance:
    """What p needs beyond the batch: the C-VAE, the sorted negative ELBOs its elbo estimate is ranked against, and
    the state of the fade. The reference is re-ranked on the checkpoint's reservoir of offline pairs whenever the
    C-VAE learns, so a pair's p keeps meaning "as familiar as that share of the offline data" (the reservoir is
    never used to train anything)."""

    def __init__(self, args, cvae: CVAE, calibration: dict, device: torch.device):
        self.coef_mode, self.p_estimator, self.p_threshold = args.coef_mode, args.p_estimator, args.p_threshold
        self.even_p = args.even_p
        self.p_at, self.p_fade, self.p_fade_steps = args.p_at, args.p_fade, args.p_fade_steps
        self.cvae, self.reservoir = cvae, None
        if "reservoir_obs" in calibration:
            self.reservoir = (calibration["reservoir_obs"].to(device), calibration["reservoir_actions"].to(device))
            self.neg_elbo_reference = torch.empty(len(self.reservoir[0]), device=device)
            self.recalibrate()
        else:  # an older checkpoint: the fixed offline calibration
            self.neg_elbo_reference = calibration["neg_elbo_quantiles"].to(device)
        self.recent_td_error = torch.full((), math.inf, device=device)  # running mean |TD error|; inf: none yet
        self.scale = torch.ones((), device=device)  # the linear fade's factor (advance)
        self.probe = torch.Generator(device=device).manual_seed(0)  # p_separation's actions, apart from training's

    @torch.no_grad()
    def recalibrate(self):
        if self.reservoir is not None:
            self.neg_elbo_reference.copy_(negative_elbo(self.cvae, *self.reservoir).sort().values)

    @torch.no_grad()
    def observe(self, td_error: torch.Tensor):
        mean = td_error.mean()
        self.recent_td_error.copy_(torch.where(self.recent_td_error.isinf(), mean,
                                               self.recent_td_error.lerp(mean, 0.01)))

    def advance(self, step: int):
        """--p-fade linear: p's factor falls from 1 at step 0 to 0 after --p-fade-steps steps."""
        if self.p_fade == "linear":
            self.scale.fill_(max(0.0, 1.0 - step / self.p_fade_steps))

    def p(self, batch, next_actions, next_value_target, next_value_offline) -> torch.Tensor:
        """p of each sample at the pair --p-at names (even, random and none do not depend on it), then faded.
        `next_actions` are the actions at s' that p is taken at (see samg_target)."""
        obs, actions, _, next_obs, _ = batch

        def at(o, a):
            return samg_coefficient(self.coef_mode, self.p_estimator, self.p_threshold, self.cvae,
                                    self.neg_elbo_reference, o, a, self.even_p)

        if self.coef_mode != "cvae" or self.p_at == "sample":
            p = at(obs, actions)
        elif self.p_at == "next":
            p = at(next_obs, next_actions)
        else:
            p = at(obs, actions) * at(next_obs, next_actions)
        if self.p_fade == "outgrown":  # the online critic has left Q_off behind by more than its own error
            p = torch.where(next_value_target - next_value_offline > self.recent_td_error, 0.0, p)
        elif self.p_fade == "linear":
            p = p * self.scale
        return p


def guided_target(reward, done, gamma: float, next_value_target, next_value_offline, p):
    """y = r + gamma (1 - done) [(1 - p) Qbar(s', a') + p Q_off(s', a')]; p = 0 is the base algorithm's target."""
    return reward + gamma * (1.0 - done) * torch.lerp(next_value_target, next_value_offline, p)


SAMG_METRICS = ("samg/p_mean", "samg/p_active_frac", "samg/intrinsic", "samg/qoff_values", "samg/qbar_values",
                "samg/qoff_above_frac")


def samg_target(batch, next_actions, next_bonus, critic_target: nn.Module, q_offline: nn.Module,
                guidance: Guidance, gamma: float, diagnose: bool, p_actions: Optional[torch.Tensor] = None):
    """The SAMG target from a' (and the base algorithm's bonus at s', e.g. SAC's entropy, kept whole by the mix).
    p at the next pair is taken at `p_actions` when given (TD3's --p-next-action deterministic), else at a'.
    Returns the target, p and the SAMG_METRICS; with coef-mode none Q_off is evaluated only when `diagnose`
    asks for the metrics (p = 0 makes it irrelevant to the target), and the metrics are None otherwise."""
    _, _, rewards, next_obs, dones = batch
    next_value_target = critic_target(next_obs, next_actions).min(0).values
    if guidance.coef_mode == "none" and not diagnose:
        p, next_value = torch.zeros_like(rewards), next_value_target + next_bonus
        return guided_target(rewards, dones, gamma, next_value, next_value, p), p, None
    next_value_offline = q_offline(next_obs, next_actions).min(0).values
    p = guidance.p(batch, next_actions if p_actions is None else p_actions, next_value_target, next_value_offline)
    target = guided_target(rewards, dones, gamma, next_value_target + next_bonus, next_value_offline + next_bonus, p)
    intrinsic = gamma * p * (next_value_offline - next_value_target)
    metrics = torch.stack([p.mean(), (p > 0).float().mean(), intrinsic.mean(), next_value_offline.mean(),
                           next_value_target.mean(), (next_value_offline > next_value_target).float().mean()])
    return target, p, metrics


def update_cvae_on_mastered(cvae: CVAE, cvae_optimizer, obs, actions, td_error, mastered_quantile: float):
    """Adaptive p: the C-VAE keeps learning on the pairs the online critic fits best ("mastered"), so p grows
    where the agent has learned. A fixed-size top-k keeps the update free of host synchronisation."""
    mastered = td_error.topk(max(1, int(mastered_quantile * td_error.numel())), largest=False).indices
    loss = cvae_loss(cvae, obs[mastered], actions[mastered])
    cvae_optimizer.zero_grad()
    loss.backward()
    cvae_optimizer.step()
    return loss.detach().reshape(1)
# --- end shared ---


# --- shared: critics, replay and the critic step ---
def build_critics(checkpoint: dict, num_critics: Optional[int], path: str, device: torch.device):
    """Online critic, its target and the frozen offline critic Q_off (the same module type), all loaded from the
    checkpoint; with more members than the checkpoint has, the checkpoint's members are repeated in turn."""
    state = checkpoint["critic"]
    num_critics = num_critics or next(iter(state.values())).shape[0]
    state = {name: weight[torch.arange(num_critics) % weight.shape[0]] for name, weight in state.items()}
    obs_dim, act_dim, hidden_dims = checkpoint["obs_dim"], checkpoint["act_dim"], checkpoint["hidden_dims"]
    critic, critic_target, q_offline = (
        load_weights(CriticEnsemble(obs_dim, act_dim, hidden_dims, num_critics), state, "critic", path).to(device)
        for _ in range(3)
    )
    return critic, critic_target.requires_grad_(False), q_offline.requires_grad_(False)


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

    def sample(self, batch_size: int):
        """(obs, actions, rewards, next_obs, dones), drawn uniformly with replacement."""
        index = torch.randint(self.size, (batch_size,), device=self.rows.device)
        obs, actions, rewards, next_obs, dones = self.rows[index].split(self.widths, dim=-1)
        return obs, actions, rewards.squeeze(-1), next_obs, dones.squeeze(-1)


def sample_batch(replay: ReplayBuffer, offline: Optional[ReplayBuffer], batch_size: int, offline_ratio: float):
    """The online replay's batch; with --offline-data-ratio, that share of it comes from the offline data instead
    (symmetric sampling, as RLPD does)."""
    if offline is None:
        return replay.sample(batch_size)
    num_offline = round(offline_ratio * batch_size)
    return tuple(torch.cat(parts) for parts in zip(replay.sample(batch_size - num_offline),
                                                   offline.sample(num_offline)))


CRITIC_METRICS = ("losses/qf_loss", "losses/qf_values")


def critic_step(critic: CriticEnsemble, critic_optimizer, obs, actions, target):
    """One step on the members' summed MSE. Returns the CRITIC_METRICS as one device tensor (read only at log
    steps; the loss is the mean over members, as CleanRL logs it) and each sample's |TD error| (mean over
    members) for the adaptive C-VAE."""
    q_values = critic(obs, actions)
    qf_loss = (q_values - target).pow(2).mean(1).sum()
    critic_optimizer.zero_grad()
    qf_loss.backward()
    critic_optimizer.step()
    q_values = q_values.detach()
    metrics = torch.stack([qf_loss.detach() / critic.num_critics, q_values.mean()])
    return metrics, (q_values - target).abs().mean(0)


@torch.no_grad()
def soft_update(target_params: list, online_params: list, tau: float):
    torch._foreach_lerp_(target_params, online_params, tau)
# --- end shared ---


def sac_target(batch, actor: TanhGaussianActor, critic_target: CriticEnsemble, q_offline: CriticEnsemble,
               guidance: Guidance, log_alpha: torch.Tensor, gamma: float, diagnose: bool):
    """SAC's soft target with SAMG's mix; the entropy bonus is in both next values, so the mix leaves it whole."""
    next_actions, next_log_prob, _ = actor(batch[3])
    return samg_target(batch, next_actions, -log_alpha.exp() * next_log_prob, critic_target, q_offline, guidance,
                       gamma, diagnose)


def update_critic(batch, actor, critic, critic_target, q_offline, guidance, log_alpha, critic_optimizer, gamma: float,
                  diagnose: bool):
    with torch.no_grad():
        target, p, samg_metrics = sac_target(batch, actor, critic_target, q_offline, guidance, log_alpha, gamma,
                                             diagnose)
    metrics, td_error = critic_step(critic, critic_optimizer, batch[0], batch[1], target)
    guidance.observe(td_error)
    return metrics, samg_metrics, td_error, p


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


ACTOR_METRICS = ("losses/actor_loss", "losses/alpha")


def main(args: Args):
    checkpoint, checkpoint_path = read_checked_checkpoint(args)
    env = make_checked_env(checkpoint, args.gym_id or checkpoint["gym_id"], args.seed, checkpoint_path)
    run_name, writer, eval_env = start_run(args, checkpoint, checkpoint_path)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    obs_dim, act_dim, hidden_dims = checkpoint["obs_dim"], checkpoint["act_dim"], checkpoint["hidden_dims"]
    actor = load_weights(TanhGaussianActor(obs_dim, act_dim, hidden_dims), checkpoint["actor"], "actor",
                         checkpoint_path).to(device)
    critic, critic_target, q_offline = build_critics(checkpoint, args.num_critics, checkpoint_path, device)
    cvae = load_weights(CVAE(obs_dim, act_dim, checkpoint["latent_dim"], hidden_dims), checkpoint["cvae"], "C-VAE",
                        checkpoint_path).to(device)
    guidance = Guidance(args, cvae, checkpoint["cvae_calibration"], device)
    log_alpha = torch.tensor(float(checkpoint["log_alpha"]), device=device, requires_grad=True)
    target_entropy = -float(act_dim)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_lr, fused=True)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.actor_lr, fused=True)
    alpha_optimizer = torch.optim.Adam([log_alpha], lr=args.alpha_lr, fused=True)
    cvae_optimizer = torch.optim.Adam(cvae.parameters(), lr=args.cvae_lr, fused=True)
    critic_update, actor_update, cvae_update = compiled(args, update_critic, update_actor, update_cvae_on_mastered)
    target_params, online_params = list(critic_target.parameters()), list(critic.parameters())

    replay = ReplayBuffer(args.total_timesteps, obs_dim, act_dim, device)
    offline = offline_replay(args, checkpoint, device)
    normalize = observation_normalizer(checkpoint)
    low, high = env.action_space.low, env.action_space.high
    episodes = EpisodeLog(writer, isinstance(env.observation_space, gym.spaces.Dict))
    critic_metrics, actor_metrics = MetricMeans(CRITIC_METRICS), MetricMeans(ACTOR_METRICS)
    samg_metrics, cvae_metrics = MetricMeans(SAMG_METRICS), MetricMeans(("samg/cvae_loss",))
    learn_cvae = args.adaptive and args.cvae_learning and args.coef_mode == "cvae"  # the C-VAE only gives p in cvae
    refresh_q_offline = args.adaptive and args.qoff_refresh and args.coef_mode != "none"

    progress, global_step, num_updates, score, status = Progress(args.total_timesteps), 0, 0, float("nan"), 0
    try:
        score = offline_score = log_evaluation(writer, actor, eval_env, checkpoint, args, device, step=0)
        print(f"{run_name}: the offline policy scores {score:.1f}", flush=True)
        obs = normalize(env.reset(seed=args.seed)[0])
        for global_step in range(1, args.total_timesteps + 1):
            with torch.no_grad():  # the pretrained policy explores from the first step on
                action = actor.act(torch.as_tensor(obs, device=device)[None], deterministic=False)[0].cpu().numpy()
            raw_next_obs, reward, terminated, truncated, info = env.step(to_env_action(action, low, high))
            next_obs = normalize(raw_next_obs)
            # done = terminated only: a time limit never stops bootstrapping
            training_reward = reward * checkpoint["reward_scale"] + checkpoint["reward_bias"]
            replay.add(obs, action, training_reward, next_obs, terminated)
            episodes.step(reward, info, terminated or truncated, global_step)
            obs = normalize(env.reset()[0]) if terminated or truncated else next_obs
            log_step = global_step % args.log_freq == 0 or global_step == args.total_timesteps

            if global_step > args.learning_starts:
                guidance.advance(global_step)
                for _ in range(args.utd):
                    batch = sample_batch(replay, offline, args.batch_size, args.offline_data_ratio)
                    metrics, samg, td_error, p = critic_update(batch, actor, critic, critic_target, q_offline,
                                                               guidance, log_alpha, critic_optimizer, args.gamma,
                                                               diagnose=log_step)
                    critic_metrics.add(metrics)
                    samg_metrics.add(samg)
                    if learn_cvae and num_updates % args.cvae_update_every == 0:
                        cvae_metrics.add(cvae_update(cvae, cvae_optimizer, batch[0], batch[1], td_error,
                                                     args.mastered_quantile))
                        if (num_updates // args.cvae_update_every + 1) % args.recalibrate_every == 0:
                            guidance.recalibrate()
                    actor_metrics.add(actor_update(batch[0], actor, critic, log_alpha, actor_optimizer,
                                                   alpha_optimizer, target_entropy))
                    soft_update(target_params, online_params, args.tau)
                    num_updates += 1
                if log_step and args.coef_mode != "none":
                    log_p(writer, guidance, p, batch[0], global_step)
            if refresh_q_offline and global_step % args.qoff_refresh_every == 0:
                q_offline.load_state_dict(critic.state_dict())

            if global_step % args.eval_freq == 0 or global_step == args.total_timesteps:
                score = log_evaluation(writer, actor, eval_env, checkpoint, args, device, global_step)
            if log_step:
                log_progress(writer, (critic_metrics, actor_metrics, samg_metrics, cvae_metrics), global_step,
                             progress, score)
    except (KeyboardInterrupt, OSError) as exc:  # Ctrl-C, SIGTERM, SIGHUP; or a disk that filled up
        status = stopped_early(exc, global_step, args.save_model)
    if args.save_model:
        save_model(args, run_name, checkpoint, global_step, score, dict(actor=actor, critic=critic, cvae=cvae),
                   log_alpha=log_alpha.detach().cpu())
    close_all(env, eval_env, writer)
    if status:
        raise SystemExit(status)
    print(f"normalized score: offline {offline_score:.1f} -> online {score:.1f} after {global_step} steps")


# ======================================================================================================================
# The algorithm ends here. Nothing below changes what is learned: the checks of flags and checkpoints, the checkpoint
# and model files, the offline dataset (read only for --offline-data-ratio), run logs, progress and interrupts.
# ======================================================================================================================


# --- shared: checks, logs and progress ---
def fail(message: str):
    """Stops the script with one sentence for the user and a non-zero exit status, without a traceback."""
    raise SystemExit(f"error: {message}")


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def use_threads(threads: int):
    """--threads: 0 keeps torch's default (one thread per core; with another busy process on a small machine every
    operation then waits for a core to be free); otherwise exactly that many."""
    if threads < 0:
        fail(f"--threads is {threads} but must be 0 (torch's default) or more")
    if threads:
        torch.set_num_threads(threads)


def check_numbers(args, positive=(), non_negative=(), unit_interval=()):
    """Numeric flags are checked where they enter, before any work: one sentence names the flag and its range. A
    seed must also be below 2**31, so that it and the seeds derived from it (seed + 30,000) suit NumPy and Gymnasium."""
    if "seed" in non_negative and getattr(args, "seed", 0) >= 2**31:
        fail(f"--seed is {args.seed} but must be below 2**31 ({2**31})")
    rules = ((positive, lambda v: v > 0, "positive"), (non_negative, lambda v: v >= 0, "zero or more"),
             (unit_interval, lambda v: 0 <= v <= 1, "in [0, 1]"))
    for fields, allowed, what in rules:
        for field in fields:
            value = getattr(args, field)
            values = list(value) if isinstance(value, (tuple, list)) else [value]
            if value is not None and not (values and all(math.isfinite(v) and allowed(v) for v in values)):
                fail(f"{flag(field)} is {value} but must be {what}" + (" (each value)" if len(values) > 1 else ""))


def check_writable(directory: str, flag_name: str, needed_bytes: int = 1 << 20):
    """Finds out before any training or collection whether outputs can be written to `directory` (made if missing):
    a megabyte is written and flushed to disk, and `needed_bytes` must be free there, so that a read-only, blocked or
    full place costs a one-line error instead of the finished work."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory) as probe:
            probe.write(bytes(1 << 20))
            probe.flush()
            os.fsync(probe.fileno())
        free = shutil.disk_usage(directory).free
    except OSError as exc:
        fail(f"cannot write to {directory} ({exc.strerror or type(exc).__name__}); choose another place with {flag_name}")
    if free < needed_bytes:
        fail(f"{directory} has {free / 2**20:.0f} MiB free but this run writes about {needed_bytes / 2**20:.0f} MiB "
             f"there; free some space or choose another place with {flag_name}")


STOPPED_BY = [signal.SIGINT]  # the signal that stops the run; the exit status is 128 + its number (130, 143, 129)


def stop_as_on_ctrl_c(number, frame):
    """SIGTERM (a scheduler's time limit, kill, timeout, a container stop) and SIGHUP stop a run as Ctrl-C does."""
    STOPPED_BY[0] = number
    raise KeyboardInterrupt


def handle_interrupts():
    """Ctrl-C, SIGTERM and SIGHUP: the same saving where a script saves on Ctrl-C, one line, exit 128 + signal."""
    sys.excepthook = exit_quietly_on_interrupt
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, stop_as_on_ctrl_c)
    # the run log's writer thread: its OSError (a full disk) reaches the main thread at its next write, which says it
    threading.excepthook = lambda hook: None if issubclass(hook.exc_type, OSError) else threading.__excepthook__(hook)


def interrupted_status() -> int:
    return 128 + STOPPED_BY[0]


def exit_quietly_on_interrupt(exc_type, exc, traceback):
    """sys.excepthook: an interrupt anywhere ends with one line and exit status 128 + signal, not a traceback."""
    if issubclass(exc_type, KeyboardInterrupt):
        by = "" if STOPPED_BY[0] == signal.SIGINT else f" ({signal.Signals(STOPPED_BY[0]).name})"
        print(f"interrupted{by}; nothing half-written was left behind", file=sys.stderr, flush=True)
        raise SystemExit(interrupted_status())
    sys.__excepthook__(exc_type, exc, traceback)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()  # our own pid: a leftover from an earlier life of it (before a reboot)


def remove_dead_leftovers(directory: str, pattern: re.Pattern):
    """Removes what killed runs left in `directory`: the files and folders whose name `pattern` matches with the
    group `pid` of a process that no longer runs (a write staged under the writer's process id)."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        match = pattern.fullmatch(name)
        if match and not process_alive(int(match["pid"])):
            path = os.path.join(directory, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def open_run_log(args, run_name: str, settings: dict) -> SummaryWriter:
    """TensorBoard log in {run_dir}/{run_name} (and Weights and Biases with --track), hyperparameters as a table."""
    if args.track:
        try:
            import wandb
        except ImportError:
            fail("--track needs wandb; install it with `pip install wandb` or leave out --track")
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=settings, name=run_name, save_code=True)
    writer = SummaryWriter(os.path.join(args.run_dir, run_name))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in settings.items()))
    return writer


def duration(seconds: float) -> str:
    """h:mm:ss, with days in front when it is that long ("2d 03:04:05")."""
    seconds = int(seconds) if math.isfinite(seconds) else 0
    days, seconds = divmod(seconds, 86_400)
    clock = time.strftime("%H:%M:%S", time.gmtime(seconds))
    return f"{days}d {clock}" if days else clock


class Progress:
    """One progress line, `step 500/3000  SPS 120  ETA 00:00:20  ...`, at most every `every` seconds (or when
    forced). SPS is the rate since the previous line, not since the start, which a fast warm-up would inflate."""

    def __init__(self, total: int, every: float = 10.0):
        self.total, self.every = total, every
        self.last_time, self.last_step = time.time(), 0

    def update(self, step: int, extra: str = "", force: bool = False) -> Optional[float]:
        """Prints if it is time and returns the recent steps per second, else returns None."""
        now = time.time()
        if not (force or step == self.total or now - self.last_time >= self.every):
            return None
        sps = (step - self.last_step) / max(now - self.last_time, 1e-9)
        eta = duration((self.total - step) / sps) if sps > 0 else "?"
        print(f"step {step}/{self.total}  SPS {sps:.0f}  ETA {eta}" + (f"  {extra}" if extra else ""), flush=True)
        self.last_time, self.last_step = now, step
        return sps
# --- end shared ---


# --- shared: checkpoint I/O ---
CHECKPOINT_FORMAT = "samg-offline-1"
CHECKPOINT_KEYS = (
    "format", "algo", "env_id", "dataset_id", "gym_id", "gym_kwargs", "obs_dim", "act_dim", "action_low",
    "action_high", "obs_mean", "obs_std", "reward_scale", "reward_bias", "ref_min_score", "ref_max_score",
    "hidden_dims", "latent_dim", "actor", "critic", "cvae", "cvae_calibration", "offline_normalized_score", "args",
)


STAGED_CHECKPOINT = re.compile(r".+\.tmp-(?P<pid>\d+)")  # save_checkpoint's temporary files, by writer


def save_checkpoint(payload: dict, path: str, replace: bool = False):
    """Writes to a temporary file beside `path` and moves it into place in one step, so an interrupted run never
    leaves half a file (and the temporary files of killed writers are removed here). Without `replace` the move
    refuses a file that appeared meanwhile (a hard link does not replace): of two runs writing one checkpoint, the
    second is refused with one sentence and its file is kept aside, named in the sentence."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    remove_dead_leftovers(os.path.dirname(path) or ".", STAGED_CHECKPOINT)
    tmp_path = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(payload, tmp_path)
        if replace:
            os.replace(tmp_path, path)
        elif not move_unless_there(tmp_path, path):
            aside = f"{path[:-len('.pt')] if path.endswith('.pt') else path}.kept-{os.getpid()}.pt"
            os.replace(tmp_path, aside)
            fail(f"{path} was written by another run while this one worked; this run's result is kept as {aside} "
                 "(move it over the other to use it)")
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def move_unless_there(source: str, target: str) -> bool:
    """Puts `source` at `target` unless a file is there, in one step (a hard link never replaces); False if one is."""
    try:
        os.link(source, target)
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: there the check and the move are two steps
        if os.path.exists(target):
            return False
        os.replace(source, target)
    return True


def save_or_rescue(payload: dict, path: str, replace: bool, rescue_dirs) -> str:
    """save_checkpoint; where that fails (a full disk, a place gone read-only), the payload goes to the first of
    `rescue_dirs` that takes it and the run stops with one sentence saying where, so finished work is never lost."""
    try:
        save_checkpoint(payload, path, replace)
        return path
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
        with contextlib.suppress(OSError):
            if shutil.disk_usage(os.path.dirname(path) or ".").free < 1 << 20:
                reason = "No space left on device"
    for directory in dict.fromkeys(rescue_dirs):
        rescue = os.path.abspath(os.path.join(directory, f"rescued-{os.getpid()}-{os.path.basename(path)}"))
        try:
            save_checkpoint(payload, rescue, replace=True)
        except (OSError, RuntimeError):
            continue
        fail(f"could not write {path} ({reason}); the trained networks are saved as {rescue} instead: move it to "
             f"{path} once there is room")
    fail(f"could not write {path} ({reason}) nor into any of {', '.join(rescue_dirs)}; the trained networks are "
         "lost: free some space and run again")


def checkpoint_bytes(networks, extra_values: int = 0) -> int:
    """About how large a checkpoint of these networks (and `extra_values` other numbers) is on disk: 4 bytes a
    float32 value, and room for the pickled structure."""
    values = sum(p.numel() for network in networks for p in network.state_dict().values()) + extra_values
    return 4 * values + (1 << 20)


def read_checkpoint(path: str, algo: str) -> dict:
    """Loads a checkpoint with weights_only=True and checks its format and algorithm."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        fail(f"{path} is not a readable checkpoint ({type(exc).__name__}); run pretrain_offline.py again to rewrite it")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        fail(f"{path} has format {found!r}, not {CHECKPOINT_FORMAT!r}; rewrite it with pretrain_offline.py")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        fail(f"{path} lacks {', '.join(missing)}; rewrite it with pretrain_offline.py")
    if checkpoint["algo"] != algo:
        fail(f"{path} holds a {checkpoint['algo']} checkpoint but this script needs {algo}; "
             f"pretrain with `python pretrain_offline.py --algo {algo} --env-id {checkpoint['env_id']}`")
    check_checkpoint_fields(checkpoint, path)
    return checkpoint


# the numeric fields besides the weights: (field, shape, rule); a shape names sizes the checkpoint states, or sizes
# bound where first seen (the quantiles' and the reservoir's lengths); "one" is a single number
CHECKPOINT_NUMBERS = (
    ("obs_mean", ("obs_dim",), "finite"), ("obs_std", ("obs_dim",), "positive"), ("action_low", ("act_dim",), "finite"),
    ("action_high", ("act_dim",), "finite"), ("reward_scale", (), "finite"), ("reward_bias", (), "finite"),
    ("ref_min_score", (), "finite"), ("ref_max_score", (), "finite"), ("log_alpha", "one", "finite"),
    ("neg_elbo_quantiles", ("quantiles",), "sorted"), ("reservoir_obs", ("reservoir", "obs_dim"), "finite"),
    ("reservoir_actions", ("reservoir", "act_dim"), "finite"),
)


def check_checkpoint_fields(checkpoint: dict, path: str):
    """Every field besides the weights is checked for type, shape and finiteness (CHECKPOINT_NUMBERS), so a damaged
    or hand-edited checkpoint is one sentence here instead of a traceback or silent nan later."""
    def bad(key: str, what: str):
        fail(f"{path} has a bad {key} ({what}); rewrite it with pretrain_offline.py")

    for key in ("obs_dim", "act_dim", "latent_dim"):
        if not isinstance(checkpoint[key], int) or checkpoint[key] <= 0:
            bad(key, f"{checkpoint[key]!r} is not a positive integer")
    hidden = checkpoint["hidden_dims"]
    if not (isinstance(hidden, (list, tuple)) and hidden and all(isinstance(h, int) and h > 0 for h in hidden)):
        bad("hidden_dims", f"{hidden!r} is not a list of positive integers")
    if not isinstance(checkpoint["gym_id"], str) or not isinstance(checkpoint["gym_kwargs"], dict):
        bad("gym_id or gym_kwargs", "not a string and a dict")
    calibration = checkpoint["cvae_calibration"]
    if not isinstance(calibration, dict) or "neg_elbo_quantiles" not in calibration:
        bad("cvae_calibration", "no neg_elbo_quantiles")
    fields, sizes = {**calibration, **checkpoint}, dict(checkpoint)
    for key, shape, rule in CHECKPOINT_NUMBERS:
        if key not in fields and (key == "log_alpha" or "reservoir_obs" not in calibration):
            continue  # log_alpha: cql only; the reservoir: checkpoints written since it was added
        try:
            value = torch.as_tensor(fields.get(key), dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            bad(key, "not numbers")
        if shape == "one" and value.numel() != 1:
            bad(key, "not a single number")
        needed = tuple(sizes.setdefault(size, got) for size, got in zip(shape, value.shape)) if shape != "one" else ()
        if shape != "one" and (value.dim() != len(shape) or tuple(value.shape) != needed):
            bad(key, "not a sorted 1-d list of at least two values" if rule == "sorted" else
                f"shape {tuple(value.shape)} where {tuple(sizes.get(size, '?') for size in shape)} is needed")
        if not torch.isfinite(value).all() or (rule == "positive" and not (value > 0).all()):
            bad(key, "values that are not finite" + (" and positive" if rule == "positive" else ""))
        if rule == "sorted" and (value.numel() < 2 or not (value[1:] >= value[:-1]).all()):
            bad(key, "not a sorted 1-d list of at least two values")
    if not (torch.as_tensor(checkpoint["action_low"]) < torch.as_tensor(checkpoint["action_high"])).all():
        bad("action_low", "not below action_high everywhere")
    if checkpoint["ref_min_score"] == checkpoint["ref_max_score"]:
        bad("ref_max_score", "equal to ref_min_score, so no score can be normalized")
    if sizes.get("reservoir", 2) < 2:
        bad("reservoir_obs", "fewer than two pairs")


def load_weights(module: nn.Module, state_dict: dict, what: str, path: str) -> nn.Module:
    """load_state_dict with a one-sentence error when the shapes in the checkpoint differ from the network's;
    returns the module."""
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1].strip()
        fail(f"the {what} in {path} does not fit the sizes the checkpoint states ({reason}); rewrite it with "
             "pretrain_offline.py")
    if not all(torch.isfinite(value).all() for value in module.state_dict().values()):
        fail(f"the {what} in {path} has weights that are not finite (nan or inf: its training diverged); pretrain "
             "it again, on data whose rewards are of a sane size")
    return module
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


# --- shared: offline transitions ---
def read_transitions(dataset_id: str):
    """Reads every episode of a local Minari dataset into transitions (s, a, r, s', terminated), checked finite;
    returns them and the open dataset."""
    import minari

    parts = {"observations": [], "actions": [], "rewards": [], "next_observations": [], "terminals": []}
    try:
        dataset = minari.load_dataset(dataset_id)
        space = dataset.spec.action_space
        if not isinstance(space, gym.spaces.Box):
            fail(f"dataset {dataset_id} has {type(space).__name__} actions, but these algorithms need continuous "
                 "(Box) actions; use a dataset of a continuous-control environment")
        for episode in dataset.iterate_episodes():
            observations = flatten_obs(episode.observations)
            counts = (len(observations) - 1, len(episode.actions), len(episode.rewards), len(episode.terminations))
            if len(set(counts)) > 1:
                fail(f"dataset {dataset_id} has an episode of {counts[0] + 1} observations, {counts[1]} actions, "
                     f"{counts[2]} rewards and {counts[3]} terminations (one more observation than each is needed); "
                     "re-create it")
            parts["observations"].append(observations[:-1])
            parts["next_observations"].append(observations[1:])
            parts["actions"].append(episode.actions)
            parts["rewards"].append(episode.rewards)
            parts["terminals"].append(episode.terminations)  # truncations never stop bootstrapping
    except Exception as exc:
        fail(f"the local dataset {dataset_id} is unreadable ({type(exc).__name__}: {str(exc).strip()[:200]}); delete "
             "it from the Minari store and make, import or download it again")
    if sum(len(r) for r in parts["rewards"]) == 0:
        fail(f"dataset {dataset_id} holds no transitions; re-create it with make_dataset.py")
    data = {key: np.concatenate(value).astype(np.float32) for key, value in parts.items()}
    for key, value in data.items():
        if not np.isfinite(value).all():
            fail(f"dataset {dataset_id} has NaN or inf values in its {key}; clean or re-create it")
    if np.abs(data["rewards"]).max() > MAX_REWARD:
        fail(f"dataset {dataset_id} has rewards as large as {np.abs(data['rewards']).max():.3g}; values reach "
             f"r / (1 - gamma) and overflow float32 training above {MAX_REWARD:g}, so rescale its rewards")
    return data, dataset


MAX_REWARD = 1e6  # [our choice] |r| above this is refused: Q ~ r / (1 - gamma) and its square must stay in float32
# --- end shared ---


# --- shared: online setup ---
EVAL_SEED_OFFSET = 10_000  # evaluation episodes start from other seeds than training


def check_args_and_read_checkpoint(args, algo: str):
    """Checks the arguments and the output place, then loads the offline checkpoint and checks its fields."""
    check_numbers(args, positive=("total_timesteps", "utd", "batch_size", "critic_lr", "actor_lr", "cvae_lr",
                                  "cvae_update_every", "recalibrate_every", "qoff_refresh_every", "p_fade_steps",
                                  "eval_freq", "eval_episodes", "log_freq", "num_critics"),
                  non_negative=("seed", "learning_starts"),
                  unit_interval=("gamma", "tau", "p_threshold", "even_p", "mastered_quantile",
                                 "offline_data_ratio"))
    if args.mastered_quantile == 0.0:
        fail("--mastered-quantile is 0 but must be in (0, 1]: the C-VAE needs at least one mastered sample")
    if args.offline_data_ratio == 1.0:
        fail("--offline-data-ratio is 1 but must be below 1: some of every batch has to be online data")
    if args.learning_starts >= args.total_timesteps:
        fail(f"--learning-starts is {args.learning_starts} but must be below --total-timesteps "
             f"({args.total_timesteps}), or no update would happen")
    use_threads(args.threads)
    if args.capture_video and importlib.util.find_spec("moviepy") is None:
        fail("--capture-video needs moviepy; install it with `pip install moviepy` or leave out --capture-video")
    path = args.checkpoint or os.path.join("checkpoints", f"{args.env_id.replace('/', '-')}__{algo}__{args.seed}.pt")
    if not os.path.exists(path):
        fail(f"no checkpoint at {path}; make it with "
             f"`python pretrain_offline.py --env-id {args.env_id} --algo {algo} --seed {args.seed}`")
    # the run log needs a few MiB; --save-model's model.pt is about the checkpoint's size
    check_writable(args.run_dir, "--run-dir", (16 << 20) + (2 * os.path.getsize(path) if args.save_model else 0))
    return read_checkpoint(path, algo), path


def make_checked_env(checkpoint: dict, gym_id: str, seed: int, path: str, render_mode: Optional[str] = None):
    """The online environment must have the observation and action spaces the checkpoint was trained for. Another
    --gym-id than the checkpoint's gets that env's own registered settings, not the checkpoint's gym_kwargs."""
    gym_kwargs = checkpoint["gym_kwargs"] if gym_id == checkpoint["gym_id"] else {}
    try:
        env = make_env(gym_id, gym_kwargs, seed, render_mode)
    except (gym.error.Error, TypeError, ValueError) as exc:
        fail(f"cannot make the environment {gym_id} with {gym_kwargs} ({exc}); check --gym-id and the checkpoint")
    obs_dim, action_space = flatten_obs(env.observation_space.sample()).shape[-1], env.action_space
    if obs_dim != checkpoint["obs_dim"] or action_space.shape != (checkpoint["act_dim"],):
        fail(f"{gym_id} has {obs_dim}-d observations and {action_space.shape} actions but {path} was trained on "
             f"{checkpoint['obs_dim']} and ({checkpoint['act_dim']},); fine-tune on {checkpoint['gym_id']}")
    if not (np.allclose(action_space.low, np.asarray(checkpoint["action_low"], dtype=np.float32))
            and np.allclose(action_space.high, np.asarray(checkpoint["action_high"], dtype=np.float32))):
        fail(f"{gym_id} has other action bounds than {path} was trained with; fine-tune on {checkpoint['gym_id']}")
    return env


def method_name(args) -> str:
    """What the run does, for its name: e.g. cvae-next-adaptive, even-static, none, none-offline0.5."""
    if args.coef_mode == "none":
        name = "none"
    else:
        mode = args.coef_mode + (f"{args.even_p:g}" if args.coef_mode == "even" and args.even_p != 0.5 else "")
        name = "-".join([mode] + ([args.p_at] if args.coef_mode == "cvae" else [])
                        + ["adaptive" if args.adaptive else "static"]
                        + ([f"fade-{args.p_fade}"] if args.p_fade != "none" else []))
    return name + (f"-offline{args.offline_data_ratio:g}" if args.offline_data_ratio > 0 else "")


def start_run(args, checkpoint: dict, path: str):
    """Seeds everything, names the run after the method, opens its log with the hyperparameters; returns the run's
    name, its log and a separately seeded environment for the deterministic evaluations (recorded with
    --capture-video)."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{method_name(args)}__{args.seed}__{int(time.time())}"
    settings = {**vars(args), "checkpoint_path": path, "offline_algo": checkpoint["algo"],
                "dataset_id": checkpoint["dataset_id"], "gym_id": args.gym_id or checkpoint["gym_id"],
                "offline_normalized_score": checkpoint["offline_normalized_score"]}
    writer = open_run_log(args, run_name, settings)
    eval_env = make_checked_env(checkpoint, args.gym_id or checkpoint["gym_id"], args.seed + EVAL_SEED_OFFSET, path,
                                render_mode="rgb_array" if args.capture_video else None)
    if args.capture_video:
        eval_env = gym.wrappers.RecordVideo(eval_env, f"videos/{run_name}",
                                            episode_trigger=lambda e: e % args.eval_episodes == 0)
    return run_name, writer, eval_env


def log_evaluation(writer: SummaryWriter, actor: nn.Module, eval_env: gym.Env, checkpoint: dict, args,
                   device: torch.device, step: int) -> float:
    obs_mean, obs_std = np.asarray(checkpoint["obs_mean"]), np.asarray(checkpoint["obs_std"])
    returns, _, successes = evaluate(actor, eval_env, obs_mean, obs_std, args.eval_episodes,
                                     args.seed + EVAL_SEED_OFFSET, device)
    score = float(normalized_score(returns, checkpoint["ref_min_score"], checkpoint["ref_max_score"]).mean())
    writer.add_scalar("eval/return", returns.mean(), step)
    writer.add_scalar("eval/normalized_score", score, step)
    if isinstance(eval_env.observation_space, gym.spaces.Dict):
        writer.add_scalar("eval/success", successes.mean(), step)
    return score


def observation_normalizer(checkpoint: dict):
    """flatten_obs, then the offline dataset's mean and std from the checkpoint."""
    mean, std = np.asarray(checkpoint["obs_mean"]), np.asarray(checkpoint["obs_std"])
    return lambda obs: ((flatten_obs(obs) - mean) / std).astype(np.float32)


class EpisodeLog:
    """Online episodes: return, length and, on goal tasks, success and regret (mean of 1 - success so far)."""

    def __init__(self, writer: SummaryWriter, goal_task: bool):
        self.writer, self.goal_task, self.successes = writer, goal_task, []
        self.episode_return, self.length, self.success = 0.0, 0, 0.0

    def step(self, reward: float, info: dict, episode_over: bool, global_step: int):
        self.episode_return, self.length = self.episode_return + float(reward), self.length + 1
        self.success = max(self.success, float(info.get("success", 0.0)))
        if episode_over:
            self.writer.add_scalar("charts/episodic_return", self.episode_return, global_step)
            self.writer.add_scalar("charts/episodic_length", self.length, global_step)
            if self.goal_task:
                self.successes.append(self.success)
                self.writer.add_scalar("charts/success", self.success, global_step)
                self.writer.add_scalar("charts/regret", 1.0 - float(np.mean(self.successes)), global_step)
            self.episode_return, self.length, self.success = 0.0, 0, 0.0


def log_progress(writer: SummaryWriter, metric_means, global_step: int, progress: Progress, score: float):
    """Writes the averaged losses and the recent SPS, and prints where the run stands."""
    for metrics in metric_means:
        metrics.write(writer, global_step)
    sps = progress.update(global_step, f"last eval score {score:.1f}", force=True)
    writer.add_scalar("charts/SPS", int(sps), global_step)


def offline_replay(args, checkpoint: dict, device: torch.device) -> Optional[ReplayBuffer]:
    """With --offline-data-ratio > 0, the checkpoint's dataset with the checkpoint's transforms (normalised states,
    actions in [-1, 1], training rewards); otherwise None, and the dataset is never opened."""
    if args.offline_data_ratio == 0.0:
        return None
    import minari

    if checkpoint["dataset_id"] not in minari.list_local_datasets():
        fail(f"--offline-data-ratio reads the checkpoint's dataset {checkpoint['dataset_id']}, which is not in the "
             "Minari store; make or import it again, or leave out --offline-data-ratio")
    data, _ = read_transitions(checkpoint["dataset_id"])
    mean, std = np.asarray(checkpoint["obs_mean"]), np.asarray(checkpoint["obs_std"])
    low, high = np.asarray(checkpoint["action_low"]), np.asarray(checkpoint["action_high"])
    if data["observations"].shape[1] != checkpoint["obs_dim"] or data["actions"].shape[1] != checkpoint["act_dim"]:
        fail(f"dataset {checkpoint['dataset_id']} does not have the checkpoint's observation and action sizes; "
             "leave out --offline-data-ratio or pretrain again on it")
    columns = [(data["observations"] - mean) / std, np.clip(2.0 * (data["actions"] - low) / (high - low) - 1.0, -1, 1),
               data["rewards"][:, None] * checkpoint["reward_scale"] + checkpoint["reward_bias"],
               (data["next_observations"] - mean) / std, data["terminals"][:, None]]
    rows = torch.as_tensor(np.concatenate(columns, axis=1), dtype=torch.float32, device=device)
    replay = ReplayBuffer(len(rows), checkpoint["obs_dim"], checkpoint["act_dim"], device)
    replay.rows.copy_(rows)
    replay.size = len(rows)
    print(f"--offline-data-ratio {args.offline_data_ratio}: {len(rows)} offline transitions from "
          f"{checkpoint['dataset_id']}", flush=True)
    return replay


def compiled(args, *update_functions):
    """--compile wraps the update functions in torch.compile; --cudagraphs (CUDA only) also captures CUDA graphs."""
    if not (args.compile or args.cudagraphs):
        return update_functions
    return tuple(torch.compile(f, mode="reduce-overhead" if args.cudagraphs else None) for f in update_functions)


def save_model(args, run_name: str, checkpoint: dict, step: int, score: float, networks: dict, **tensors):
    """Writes the fine-tuned networks under the checkpoint's keys and format, so the file loads like a checkpoint;
    where the run dir cannot take it, into the home or the temporary directory (save_or_rescue)."""
    payload = dict(checkpoint, online_steps=step, online_normalized_score=score, online_args=dataclasses.asdict(args),
                   **tensors)
    for key, network in networks.items():
        payload[key] = {name: tensor.detach().cpu() for name, tensor in network.state_dict().items()}
    path = os.path.join(args.run_dir, run_name, "model.pt")
    save_or_rescue(payload, path, True, [os.path.expanduser("~"), tempfile.gettempdir()])
    print(f"saved {path}")


def stopped_early(exc: BaseException, step: int, saving: bool) -> int:
    """One line for a run stopped by an interrupt or by a write that failed (the run log on a full disk); returns
    its exit status: 128 + the signal, or 1."""
    keeping = " and the model" if saving else ""
    if isinstance(exc, KeyboardInterrupt):
        print(f"interrupted at step {step} ({signal.Signals(STOPPED_BY[0]).name}); keeping the logs{keeping}",
              flush=True)
        return interrupted_status()
    print(f"stopped at step {step}: could not write {exc.filename or 'the run log'} ({exc.strerror or exc}); "
          f"keeping what was written{keeping}", flush=True)
    return 1


def close_all(*resources):
    """Closes the environments and the run log; a log that cannot be flushed any more (a full disk) was reported."""
    for resource in resources:
        with contextlib.suppress(OSError):
            resource.close()


class MetricMeans:
    """Sums metric tensors where they live and reads them once per log step, the only host synchronisation."""

    def __init__(self, names):
        self.names, self.total, self.count = names, None, 0

    def add(self, values: Optional[torch.Tensor]):
        if values is not None:
            self.total = values.clone() if self.total is None else self.total + values
            self.count += 1

    def write(self, writer: SummaryWriter, step: int):
        if self.count:
            for name, value in zip(self.names, (self.total / self.count).tolist()):
                writer.add_scalar(name, value, step)
        self.total, self.count = None, 0


@torch.no_grad()
def p_separation(guidance: Guidance, obs: torch.Tensor) -> torch.Tensor:
    """Whether p still tells offline pairs from novel ones: the AUROC of p_vae (before the threshold) on the
    reservoir's offline pairs against `obs` with uniform random actions (1: always ranked apart, 0.5: no
    better than chance). Logged as samg/p_auroc; NaN without a reservoir (an older checkpoint)."""
    if guidance.reservoir is None:
        return torch.full((), math.nan)

    def p_vae(o, a):
        if guidance.p_estimator == "latent":
            return p_latent(guidance.cvae, o, a)
        return p_elbo(guidance.cvae, guidance.neg_elbo_reference, o, a)

    random_actions = torch.rand(obs.shape[0], guidance.reservoir[1].shape[1], device=obs.device,
                                generator=guidance.probe) * 2.0 - 1.0
    familiar, novel = p_vae(*guidance.reservoir), p_vae(obs, random_actions)
    above = (familiar[:, None] > novel[None, :]).float().mean()
    return (above + 0.5 * (familiar[:, None] == novel[None, :]).float().mean()).cpu()


def log_p(writer: SummaryWriter, guidance: Guidance, p: torch.Tensor, obs: torch.Tensor, step: int):
    """At log steps: the last batch's p as a histogram and its 10/50/90% quantiles, and with coef-mode cvae
    samg/p_auroc (p_separation at the batch's states)."""
    writer.add_histogram("samg/p", p, step)
    quantiles = torch.quantile(p.float(), torch.tensor([0.1, 0.5, 0.9], device=p.device)).tolist()
    for name, value in zip(("samg/p_q10", "samg/p_q50", "samg/p_q90"), quantiles):
        writer.add_scalar(name, value, step)
    if guidance.coef_mode == "cvae":
        writer.add_scalar("samg/p_auroc", p_separation(guidance, obs).item(), step)
# --- end shared ---


def read_checked_checkpoint(args: Args):
    """This script's own flags and checkpoint fields, after the checks every online script makes."""
    check_numbers(args, positive=("alpha_lr",))
    checkpoint, checkpoint_path = check_args_and_read_checkpoint(args, OFFLINE_ALGO)
    if "log_alpha" not in checkpoint:
        fail(f"{checkpoint_path} lacks log_alpha, which every cql checkpoint has; rewrite it with pretrain_offline.py")
    return checkpoint, checkpoint_path


if __name__ == "__main__":
    handle_interrupts()
    main(tyro.cli(Args))
