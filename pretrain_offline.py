"""Offline pretraining for SAMG: CQL, TD3+BC, AWAC or IQL, plus the conditional VAE that SAMG's p(s, a) needs.

    python pretrain_offline.py --env-id hopper-medium-v2 --algo cql

Writes `checkpoints/{env}__{algo}__{seed}.pt`, the file that samg_sac.py / samg_td3.py / samg_awac.py /
samg_iql.py load.
The online scripts never read the dataset: everything they need (networks, C-VAE, its calibration, state
statistics, reward transform, reference scores) is in that checkpoint.
"""
import contextlib
import json
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
from typing import Literal, Optional, Tuple
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    env_id: str = "hopper-medium-v2"
    """Minari dataset id (`mujoco/hopper/medium-v0`) or D4RL-style name (`hopper-medium-v2`, `antmaze-umaze-v2`)"""
    algo: Literal["cql", "td3bc", "awac", "iql"] = "cql"
    """offline algorithm: cql (for samg_sac.py), td3bc (for samg_td3.py), awac (for samg_awac.py), iql (for
    samg_iql.py)"""
    seed: int = 1
    """seed of the experiment (also names the checkpoint)"""
    total_steps: int = 1_000_000
    """gradient steps of the offline algorithm"""
    cvae_steps: int = 100_000
    """gradient steps of the C-VAE (trained in the same run, on the same batches)"""
    batch_size: int = 256
    """minibatch size"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target network smoothing coefficient"""
    hidden_dims: Tuple[int, ...] = (256, 256)
    """hidden layer sizes of actor, critics and C-VAE"""
    num_critics: int = 2
    """number of Q-functions in the critic ensemble"""
    critic_lr: float = 3e-4
    """critic learning rate"""
    actor_lr: Optional[float] = None
    """actor learning rate (default: 1e-4 for cql, 3e-4 otherwise)"""
    cql_alpha: Optional[float] = None
    """CQL regulariser weight (default: 5.0, 10.0 for antmaze)"""
    cql_n_actions: int = 10
    """actions sampled per state (random, policy at s, policy at s') for CQL's logsumexp"""
    cql_temperature: float = 1.0
    """CQL logsumexp temperature"""
    td3bc_alpha: float = 2.5
    """TD3+BC: weight of the Q term against behaviour cloning"""
    policy_noise: float = 0.2
    """TD3+BC: target policy smoothing noise"""
    noise_clip: float = 0.5
    """TD3+BC: clip of the smoothing noise"""
    policy_freq: int = 2
    """TD3+BC: actor and target updates every this many critic updates"""
    awac_lambda: Optional[float] = None
    """AWAC temperature lambda in exp(A / lambda) (default: 1.0, 0.1 for antmaze and adroit)"""
    awac_max_weight: float = 100.0
    """AWAC: clip of the advantage weights"""
    iql_expectile: Optional[float] = None
    """IQL: expectile of Q that V regresses to (default: 0.7, 0.9 for antmaze); the value network uses --critic-lr"""
    iql_beta: Optional[float] = None
    """IQL: inverse temperature beta in exp(beta (Q - V)) (default: 3.0, 10.0 for antmaze)"""
    iql_max_weight: float = 100.0
    """IQL: clip of the advantage weights"""
    cvae_lr: float = 1e-3
    """C-VAE learning rate"""
    latent_dim: Optional[int] = None
    """C-VAE latent size (default: 2 x action dimension)"""
    eval_freq: int = 10_000
    """evaluate the deterministic policy every this many steps"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    checkpoint_dir: str = "checkpoints"
    """where the checkpoint is written"""
    overwrite: bool = False
    """replace an existing checkpoint of the same env, algo and seed (without it, such a run is refused)"""
    save_every: int = 10_000
    """write the training state to {checkpoint}.state every this many steps and at the end (0: never): a stopped run
    continues from it with --resume, a finished one trains further with a larger --total-steps [our choice]"""
    resume: bool = False
    """continue from {checkpoint}.state, with the flags the run was started with (--total-steps may differ); it
    learns exactly what an uninterrupted run learns"""
    run_dir: str = "runs"
    """TensorBoard logs go to {run_dir}/{run_name}"""
    exp_name: str = "pretrain"
    """name of this experiment (part of the run name)"""
    cuda: bool = True
    """use CUDA when it is available"""
    threads: int = 0
    """CPU threads of torch's operations (0: torch's default, one per core); 1 when other runs share the cores"""
    torch_deterministic: bool = True
    """sets torch.backends.cudnn.deterministic"""


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


# --- shared: deterministic actor ---
class DeterministicActor(nn.Module):
    """TD3/TD3+BC policy: a = tanh(f(s)). It has one action per state; exploration noise is added by the caller."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims):
        super().__init__()
        self.net = mlp([obs_dim, *hidden_dims, act_dim], output_activation=nn.Tanh())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)

    def act(self, obs: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """The same action either way (the interface evaluate() shares with the stochastic actors)."""
        return self(obs)
# --- end shared ---


# --- shared: Gaussian actor ---
class GaussianActor(nn.Module):
    """AWAC policy: N(tanh(f(s)), std) with a state-independent log-std clamped to [-5, 2]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims):
        super().__init__()
        self.net = mlp([obs_dim, *hidden_dims, act_dim], output_activation=nn.Tanh())
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def log_prob(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        mean, log_std = self.net(obs), self.log_std.clamp(-5.0, 2.0)
        return (-0.5 * ((action - mean) / log_std.exp()).pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def act(self, obs: torch.Tensor, deterministic: bool) -> torch.Tensor:
        mean = self.net(obs)
        if deterministic:
            return mean
        return (mean + self.log_std.clamp(-5.0, 2.0).exp() * torch.randn_like(mean)).clamp(-1.0, 1.0)
# --- end shared ---


# --- shared: IQL value and losses ---
class StateValue(nn.Module):
    """IQL's state value: V(obs [B, o]) -> [B]."""

    def __init__(self, obs_dim: int, hidden_dims):
        super().__init__()
        self.net = mlp([obs_dim, *hidden_dims, 1])

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


def expectile_loss(difference: torch.Tensor, expectile: float) -> torch.Tensor:
    """IQL's asymmetric squared loss on u = Q(s, a) - V(s): weight `expectile` where u >= 0 and 1 - `expectile`
    where u < 0, so that V learns an upper expectile of Q over the data's actions (a soft max) rather than its mean."""
    weight = (expectile - (difference < 0).to(difference.dtype)).abs()
    return (weight * difference.pow(2)).mean()


def advantage_weighted_regression(actor: nn.Module, obs, actions, advantage, beta: float, max_weight: float):
    """IQL's actor loss: -log pi(a|s) of the batch's own actions, weighted by exp(beta A) clipped at max_weight."""
    weights = torch.exp(beta * advantage).clamp(max=max_weight)
    return -(weights * actor.log_prob(obs, actions)).mean()

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


# --- the offline algorithms: one update function each, on a batch of tensors ---
# Written for speed without changing what is computed: one critic call per loss, one actor pass per state for all
# the samples the update needs, actor losses whose backward stops at the actor (no wasted gradient for the critics'
# weights), fused Adam, targets moved with one fused lerp, and no host sync (.item()) inside an update.
def soft_update(target: nn.Module, source: nn.Module, tau: float):
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


def cql_update(step, batch, nets, opts, args):
    """Conservative Q-learning (SAC-based): TD loss + cql_alpha * (logsumexp_a Q(s, a) - Q(s, a_data))."""
    obs, actions, rewards, next_obs, dones = batch
    actor, critic, critic_target, log_alpha = nets["actor"], nets["critic"], nets["critic_target"], nets["log_alpha"]
    batch_size, act_dim, n = obs.shape[0], actions.shape[1], args.cql_n_actions
    with torch.no_grad():
        next_actions = actor(next_obs)[0]  # a' ~ pi(s') for the backup
        # n samples of pi at s and at s' for the logsumexp, from one pass of the actor per state
        policy_actions, policy_log_prob, _ = actor(torch.cat([obs, next_obs]), samples_per_state=n)
        repeated_obs = obs.repeat_interleave(n, 0)
        target_q = critic_target(next_obs, next_actions).min(0).values  # no entropy term in the offline backup
        td_target = rewards + args.gamma * (1.0 - dones) * target_q
        random_actions = torch.empty_like(policy_actions[: batch_size * n]).uniform_(-1.0, 1.0)
        # importance weights: uniform density on [-1, 1]^A, and the policy's own density for its samples
        log_density = torch.cat([torch.full((batch_size * n,), -act_dim * math.log(2.0), device=obs.device),
                                 policy_log_prob]).view(3, batch_size, n)
    # one critic call: the data actions and the 3 n sampled actions of every state
    q_all = critic(torch.cat([obs, repeated_obs.repeat(3, 1)]), torch.cat([actions, random_actions, policy_actions]))
    q_data, sampled_q = q_all[:, :batch_size], q_all[:, batch_size:]
    sampled_q = (sampled_q.view(-1, 3, batch_size, n) - log_density).permute(0, 2, 1, 3).flatten(2)
    logsumexp_q = torch.logsumexp(sampled_q / args.cql_temperature, dim=-1) * args.cql_temperature
    td_loss = (q_data - td_target).pow(2).mean(1).sum()  # each critic's own MSE
    conservative_loss = args.cql_alpha * (logsumexp_q - q_data).mean(1).sum()
    opts["critic"].zero_grad()
    (td_loss + conservative_loss).backward()
    opts["critic"].step()

    new_actions, log_prob, _ = actor(obs)
    alpha = log_alpha.exp().detach()
    actor_loss = (alpha * log_prob - critic(obs, new_actions).min(0).values).mean()
    opts["actor"].zero_grad()
    actor_loss.backward(inputs=list(actor.parameters()))  # dQ/da only: no gradient into the critic's weights
    opts["actor"].step()
    alpha_loss = -(log_alpha * (log_prob.detach() + nets["target_entropy"])).mean()
    opts["alpha"].zero_grad()
    alpha_loss.backward()
    opts["alpha"].step()
    soft_update(critic_target, critic, args.tau)
    num_critics = q_data.shape[0]  # losses are logged as the mean over critics, as CleanRL logs them
    return {"losses/qf_loss": td_loss.detach() / num_critics,
            "losses/cql_loss": conservative_loss.detach() / num_critics, "losses/actor_loss": actor_loss.detach(),
            "losses/alpha": alpha, "losses/qf_values": q_data.detach().mean()}


def td3bc_update(step, batch, nets, opts, args):
    """TD3+BC: TD3's critic; actor maximises lambda * Q(s, pi(s)) - (pi(s) - a)^2 with lambda = alpha / mean|Q|."""
    obs, actions, rewards, next_obs, dones = batch
    actor, critic = nets["actor"], nets["critic"]
    with torch.no_grad():
        noise = (torch.randn_like(actions) * args.policy_noise).clamp(-args.noise_clip, args.noise_clip)
        next_actions = (nets["actor_target"](next_obs) + noise).clamp(-1.0, 1.0)
        target_q = nets["critic_target"](next_obs, next_actions).min(0).values
        td_target = rewards + args.gamma * (1.0 - dones) * target_q
    q_data = critic(obs, actions)
    td_loss = (q_data - td_target).pow(2).mean(1).sum()  # each critic's own MSE
    opts["critic"].zero_grad()
    td_loss.backward()
    opts["critic"].step()
    metrics = {"losses/qf_loss": td_loss.detach() / q_data.shape[0], "losses/qf_values": q_data.detach().mean()}
    if step % args.policy_freq == 0:
        policy_actions = actor(obs)
        q_policy = critic(obs, policy_actions)[0]
        lmbda = args.td3bc_alpha / q_policy.abs().mean().detach()
        actor_loss = -lmbda * q_policy.mean() + F.mse_loss(policy_actions, actions)
        opts["actor"].zero_grad()
        actor_loss.backward(inputs=list(actor.parameters()))  # no gradient into the critic's weights
        opts["actor"].step()
        soft_update(nets["actor_target"], actor, args.tau)
        soft_update(nets["critic_target"], critic, args.tau)
        metrics["losses/actor_loss"] = actor_loss.detach()
    return metrics


def awac_update(step, batch, nets, opts, args):
    """AWAC: SAC-style critic with a' ~ pi(s'); actor = regression on dataset actions weighted by exp(A / lambda)."""
    obs, actions, rewards, next_obs, dones = batch
    actor, critic = nets["actor"], nets["critic"]
    batch_size = obs.shape[0]
    with torch.no_grad():  # one actor call: a' ~ pi(s') for the backup and a ~ pi(s) for the advantage's baseline
        sampled = actor.act(torch.cat([next_obs, obs]), deterministic=False)
        next_actions, policy_actions = sampled[:batch_size], sampled[batch_size:]
        target_q = nets["critic_target"](next_obs, next_actions).min(0).values
        td_target = rewards + args.gamma * (1.0 - dones) * target_q
    q_data = critic(obs, actions)
    td_loss = (q_data - td_target).pow(2).mean(1).sum()  # each critic's own MSE
    opts["critic"].zero_grad()
    td_loss.backward()
    opts["critic"].step()
    with torch.no_grad():
        value = critic(obs, policy_actions).min(0).values
        advantage = q_data.detach().min(0).values - value
        weights = torch.exp(advantage / args.awac_lambda).clamp(max=args.awac_max_weight)
    actor_loss = -(actor.log_prob(obs, actions) * weights).mean()
    opts["actor"].zero_grad()
    actor_loss.backward()
    opts["actor"].step()
    soft_update(nets["critic_target"], critic, args.tau)
    return {"losses/qf_loss": td_loss.detach() / q_data.shape[0], "losses/actor_loss": actor_loss.detach(),
            "losses/qf_values": q_data.detach().mean()}


def iql_update(step, batch, nets, opts, args):
    """IQL: V regresses to an upper expectile of the target critics' Q at the data's actions; the critics regress
    to r + gamma V(s'); the actor to the data's actions weighted by exp(beta (Q - V)). No action outside the data
    is ever evaluated."""
    obs, actions, rewards, next_obs, dones = batch
    actor, critic, value = nets["actor"], nets["critic"], nets["value"]
    with torch.no_grad():
        target_q = nets["critic_target"](obs, actions).min(0).values
        td_target = rewards + args.gamma * (1.0 - dones) * value(next_obs)
    advantage = target_q - value(obs)
    value_loss = expectile_loss(advantage, args.iql_expectile)
    opts["value"].zero_grad()
    value_loss.backward()
    opts["value"].step()
    q_data = critic(obs, actions)
    td_loss = (q_data - td_target).pow(2).mean(1).sum()  # each critic's own MSE
    opts["critic"].zero_grad()
    td_loss.backward()
    opts["critic"].step()
    actor_loss = advantage_weighted_regression(actor, obs, actions, advantage.detach(), args.iql_beta,
                                               args.iql_max_weight)
    opts["actor"].zero_grad()
    actor_loss.backward()
    opts["actor"].step()
    soft_update(nets["critic_target"], critic, args.tau)
    return {"losses/qf_loss": td_loss.detach() / q_data.shape[0], "losses/value_loss": value_loss.detach(),
            "losses/actor_loss": actor_loss.detach(), "losses/qf_values": q_data.detach().mean()}


def cvae_update(cvae: nn.Module, optimizer: torch.optim.Optimizer, obs: torch.Tensor, actions: torch.Tensor):
    loss = cvae_loss(cvae, obs, actions)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


ACTORS = {"cql": TanhGaussianActor, "td3bc": DeterministicActor, "awac": GaussianActor, "iql": GaussianActor}


UPDATES = {"cql": cql_update, "td3bc": td3bc_update, "awac": awac_update, "iql": iql_update}


def build_learner(args: Args, obs_dim: int, act_dim: int, device: torch.device):
    """The networks (actor, critics, their targets, the C-VAE) and their fused Adam optimizers."""
    hidden = list(args.hidden_dims)
    adam = lambda params, lr: torch.optim.Adam(params, lr=lr, fused=True)  # noqa: E731  (one kernel per step)
    actor = ACTORS[args.algo](obs_dim, act_dim, hidden).to(device)
    critic = CriticEnsemble(obs_dim, act_dim, hidden, args.num_critics).to(device)
    nets = {"actor": actor, "critic": critic, "cvae": CVAE(obs_dim, act_dim, args.latent_dim, hidden).to(device),
            "critic_target": CriticEnsemble(obs_dim, act_dim, hidden, args.num_critics).to(device)}
    nets["critic_target"].load_state_dict(critic.state_dict())
    opts = {"actor": adam(actor.parameters(), args.actor_lr), "critic": adam(critic.parameters(), args.critic_lr),
            "cvae": adam(nets["cvae"].parameters(), args.cvae_lr)}
    if args.algo == "cql":
        nets["log_alpha"] = torch.zeros(1, device=device, requires_grad=True)
        nets["target_entropy"] = -float(act_dim)
        opts["alpha"] = adam([nets["log_alpha"]], args.critic_lr)
    if args.algo == "td3bc":
        nets["actor_target"] = DeterministicActor(obs_dim, act_dim, hidden).to(device)
        nets["actor_target"].load_state_dict(actor.state_dict())
    if args.algo == "iql":  # the state value V(s), learnt at the critics' learning rate as in IQL and CORL
        nets["value"] = StateValue(obs_dim, hidden).to(device)
        opts["value"] = adam(nets["value"].parameters(), args.critic_lr)
    return nets, opts


@torch.no_grad()
def calibrate_cvae(cvae: CVAE, obs: torch.Tensor, actions: torch.Tensor, max_samples: int = 100_000,
                   reservoir_size: int = 2048) -> dict:
    """What the elbo estimator needs: 1001 quantiles of the offline negative ELBO (sorted), and a reservoir of
    offline pairs (normalised as the networks see them) that the online scripts re-rank against after C-VAE updates;
    the reservoir never trains anything."""
    index = torch.randperm(obs.shape[0], device=obs.device)[:max_samples]
    scores = torch.cat([unfamiliarity(cvae, obs[chunk], actions[chunk]) for chunk in index.split(8192)])
    quantiles = torch.quantile(scores, torch.linspace(0, 1, 1001, device=scores.device))
    reservoir = torch.randperm(obs.shape[0], device=obs.device)[:reservoir_size]
    return {"neg_elbo_quantiles": quantiles.cpu().contiguous(),
            "reservoir_obs": obs[reservoir].float().cpu().contiguous(),
            "reservoir_actions": actions[reservoir].float().cpu().contiguous()}


def main(args: Args):
    dataset_id, data, checkpoint_path = check_args_and_read_dataset(args)
    goal_task, dexterous_task = data["gym_id"].startswith("AntMaze"), data["gym_id"].startswith("Adroit")
    args.actor_lr = args.actor_lr if args.actor_lr is not None else (1e-4 if args.algo == "cql" else 3e-4)
    args.cql_alpha = args.cql_alpha if args.cql_alpha is not None else (10.0 if goal_task else 5.0)
    args.awac_lambda = args.awac_lambda if args.awac_lambda is not None else (
        0.1 if goal_task or dexterous_task else 1.0)
    # IQL: CORL's values for locomotion and antmaze [our choice of CORL's values]
    args.iql_expectile = args.iql_expectile if args.iql_expectile is not None else (0.9 if goal_task else 0.7)
    args.iql_beta = args.iql_beta if args.iql_beta is not None else (10.0 if goal_task else 3.0)
    obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
    args.latent_dim = args.latent_dim or 2 * act_dim
    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}_{args.algo}__{args.seed}__{int(time.time())}"

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    eval_env = make_env(data["gym_id"], data["gym_kwargs"], args.seed)
    env_obs_dim = flatten_obs(eval_env.reset(seed=args.seed)[0]).shape[-1]
    if env_obs_dim != obs_dim or eval_env.action_space.shape != (act_dim,):
        fail(f"dataset {dataset_id} has {obs_dim}-dim states and {act_dim}-dim actions but {data['gym_id']} has "
             f"{env_obs_dim} and {eval_env.action_space.shape}; the dataset records the wrong environment")

    # states normalised with the dataset statistics; actions mapped to [-1, 1]; antmaze rewards shifted by -1
    obs_mean = data["observations"].mean(0)
    obs_std = data["observations"].std(0) + 1e-3
    reward_scale, reward_bias = 1.0, (-1.0 if goal_task else 0.0)
    low, high = data["action_low"], data["action_high"]
    to_tensor = lambda x: torch.as_tensor(x, dtype=torch.float32, device=device)  # noqa: E731
    obs_t = to_tensor((data["observations"] - obs_mean) / obs_std)
    next_obs_t = to_tensor((data["next_observations"] - obs_mean) / obs_std)
    actions_t = to_tensor(np.clip(2.0 * (data["actions"] - low) / (high - low) - 1.0, -1.0, 1.0))
    rewards_t = to_tensor(data["rewards"] * reward_scale + reward_bias)
    dones_t = to_tensor(data["terminals"])
    num_transitions = obs_t.shape[0]
    print(f"{num_transitions} transitions, obs dim {obs_dim}, action dim {act_dim}, env {data['gym_id']}")

    nets, opts = build_learner(args, obs_dim, act_dim, device)
    actor, cvae = nets["actor"], nets["cvae"]
    check_room_for_checkpoint(args, nets, obs_dim, act_dim)

    state_path, start, score = f"{checkpoint_path}.state", 0, float("nan")
    if args.resume:  # the networks, optimizers and random stream as they were after step `start`
        start, run_name, score = resume_training(state_path, args, nets, opts)
    writer = open_run_log(args, run_name, {**vars(args), "dataset_id": dataset_id, "gym_id": data["gym_id"]})

    def run_evaluation(step: int) -> float:
        returns, _, successes = evaluate(actor, eval_env, obs_mean, obs_std, args.eval_episodes, args.seed + 10_000,
                                         device)
        score = float(normalized_score(returns, data["ref_min_score"], data["ref_max_score"]).mean())
        writer.add_scalar("eval/return", returns.mean(), step)
        writer.add_scalar("eval/normalized_score", score, step)
        if goal_task:
            writer.add_scalar("eval/success", successes.mean(), step)
        return score

    total_steps = max(args.total_steps, args.cvae_steps)
    progress, start_time, step, saved = Progress(total_steps), time.time(), start, start if args.resume else None
    progress.last_step = start
    try:
        for step in range(start + 1, total_steps + 1):
            index = torch.randint(0, num_transitions, (args.batch_size,), device=device)
            batch = (obs_t[index], actions_t[index], rewards_t[index], next_obs_t[index], dones_t[index])
            metrics = UPDATES[args.algo](step, batch, nets, opts, args) if step <= args.total_steps else {}
            if step <= args.cvae_steps:
                metrics["samg/cvae_loss"] = cvae_update(cvae, opts["cvae"], batch[0], batch[1])
            if step % 1000 == 0 or step == total_steps:  # the only host syncs: logging steps
                for name, value in metrics.items():
                    writer.add_scalar(name, value.item(), step)
                writer.add_scalar("charts/SPS", (step - start) / (time.time() - start_time), step)
            if step % args.eval_freq == 0:
                score = run_evaluation(step)
            if args.save_every and (step % args.save_every == 0 or step == total_steps):
                state = training_state(args, nets, opts, step, run_name, score)
                saved = step if save_training_state(state, state_path) else saved
            progress.update(step, "" if math.isnan(score) else f"eval normalized score {score:.1f}")
        if step % args.eval_freq:  # the last step's own evaluation, after its state: a longer run would not make it
            score = run_evaluation(step)  # (and CQL's evaluation draws from the random stream)
    except KeyboardInterrupt:
        writer.close()
        resume = f"; --resume continues from step {saved} ({state_path})" if saved is not None else ""
        print(f"interrupted at step {step}: no checkpoint written (only a finished run writes one){resume}; the "
              f"TensorBoard log so far is in {os.path.join(args.run_dir, run_name)}", file=sys.stderr, flush=True)
        raise SystemExit(interrupted_status())
    except OSError as exc:  # the run log's disk filled up
        fail(f"stopped at step {step}: could not write {exc.filename or 'the run log'} ({exc.strerror or exc}); no "
             f"checkpoint written: free some space in {args.run_dir} or choose another --run-dir")

    ignore_stop_signals()  # the run is done: from here on no signal (nor a second one) cuts its checkpoint short
    calibration = calibrate_cvae(cvae, obs_t, actions_t)  # what p is ranked against online
    write_checkpoint(checkpoint_path, args, dataset_id, data, nets, calibration, score,
                     dict(obs_mean=obs_mean, obs_std=obs_std, reward_scale=reward_scale, reward_bias=reward_bias))
    writer.close()
    print(f"offline normalized score {score:.1f}; checkpoint written to {checkpoint_path}")


# ======================================================================================================================
# The algorithm ends here. Nothing below changes what is learned: the checks of flags and paths, dataset names and
# their resolution, reading the dataset, the checkpoint file, run logs, progress and interrupts.
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
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_as_on_ctrl_c(number, frame):
    """SIGTERM (a scheduler's time limit, kill, timeout, a container stop) and SIGHUP stop a run as Ctrl-C does."""
    STOPPED_BY[0] = number
    ignore_stop_signals()  # the signals after it (a second Ctrl-C, a job manager's to each process) cannot cut it short
    raise KeyboardInterrupt


def ignore_stop_signals():  # from here on: once a run stops, or once it begins its final writes
    for number in STOP_SIGNALS:  # a handler that does nothing, not SIG_IGN: a signal caught as the handlers change
        signal.signal(number, lambda *_: None)  # would then raise OSError("... ignored due to race condition")


def handle_interrupts():
    """Ctrl-C, SIGTERM and SIGHUP: the same saving where a script saves on Ctrl-C, one line, exit 128 + signal."""
    sys.excepthook = exit_quietly_on_interrupt
    for number in STOP_SIGNALS:  # Ctrl-C too, unless it is ignored from the start (a background job)
        if number != signal.SIGINT or signal.getsignal(number) is signal.default_int_handler:
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


HOST = re.sub(r"[^A-Za-z0-9.-]", "_", os.uname().nodename)  # and its PID namespace unless the machine's (0xEFFFFFFC)
with contextlib.suppress(OSError):
    HOST += "" if os.stat("/proc/self/ns/pid").st_ino == 0xEFFFFFFC else f"+pid{os.stat('/proc/self/ns/pid').st_ino}"
WRITER = f"{os.getpid()}@{HOST}"  # names staged writes: several nodes may share a place, and a pid means one on a host


def left_by_dead_writer(path: str, match: re.Match) -> bool:
    """Whether `path`, staged by the writer its name's `match` reads (groups `pid`, `host`), was left by a killed run:
    a process of this host that no longer runs or, whatever its host (none: an older version's), a week ago."""
    try:
        abandoned = time.time() - os.lstat(path).st_mtime > 7 * 86_400  # [our choice]: a staged write lasts minutes
        if abandoned or match["host"] != HOST:  # another host's process ids mean nothing here
            return abandoned
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # gone meanwhile; another user's process (PermissionError)
        return False
    return int(match["pid"]) == os.getpid()  # our own pid: a leftover from an earlier life of it (before a reboot)


def open_run_log(args, run_name: str, settings: dict) -> SummaryWriter:
    """TensorBoard log in {run_dir}/{run_name}, the hyperparameters as a table."""
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


# --- shared: dataset names ---
# D4RL-style env name -> (Gymnasium id, D4RL reference random score, D4RL reference expert score).
# Scores are D4RL's (Fu et al. 2020, d4rl/infos.py); None: measured by make_dataset.py.
GYM_ENVS = {
    "hopper": ("Hopper-v5", -20.272305, 3234.3),
    "halfcheetah": ("HalfCheetah-v5", -280.178953, 12135.0),
    "walker2d": ("Walker2d-v5", 1.629008, 4592.3),
    "ant": ("Ant-v5", -325.6, 3879.7),
    "pendulum": ("Pendulum-v1", None, None),
    "invertedpendulum": ("InvertedPendulum-v5", None, None),
    "inverteddoublependulum": ("InvertedDoublePendulum-v5", None, None),
}
QUALITIES = ("random", "medium", "medium-replay", "medium-expert", "expert")
ANTMAZE_TASKS = ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse")
ADROIT_ENVS = ("pen", "door", "hammer", "relocate")
ADROIT_QUALITIES = ("human", "cloned", "expert")
D4RL_NAME = re.compile(r"^(?P<env>[a-z0-9]+)-(?P<quality>[a-z-]+)-v(?P<version>\d+)$")


def parse_d4rl_name(name: str):
    """`hopper-medium-replay-v2` -> ("hopper", "medium-replay"); None when `name` is not D4RL-style."""
    match = D4RL_NAME.match(name)
    if match is None:
        return None
    env, quality = match["env"], match["quality"]
    if env == "antmaze" and quality in ANTMAZE_TASKS:
        return env, quality
    if env in ADROIT_ENVS and quality in ADROIT_QUALITIES:
        return env, quality
    if env in GYM_ENVS and quality in QUALITIES:
        return env, quality
    return None


def d4rl_version(env: str) -> int:
    """The version a D4RL-style name carries: v2 for D4RL's gym locomotion and antmaze (as in D4RL), v1 for adroit
    (D4RL's adroit names), v0 for the envs that only make_dataset.py makes (no D4RL dataset exists)."""
    if env in ADROIT_ENVS:
        return 1
    if env == "antmaze" or GYM_ENVS[env][1] is not None:
        return 2
    return 0


def version_error(name: str) -> Optional[str]:
    """One sentence when a D4RL-style `name` carries another version than its env's (`hopper-medium-v9`), else None."""
    parsed = parse_d4rl_name(name)
    if parsed is None or int(D4RL_NAME.match(name)["version"]) == d4rl_version(parsed[0]):
        return None
    env, quality = parsed
    version = d4rl_version(env)
    return f"{name} has an unknown version; {env} datasets are named -v{version} ({env}-{quality}-v{version})"


LOCAL_ONLY_ENVS = tuple(env for env, (_, ref_min, _) in GYM_ENVS.items() if ref_min is None)
# --- end shared ---


# --- dataset resolution: --env-id -> a local Minari dataset id ---
ACCEPTED_IDS = (
    "a Minari dataset id such as mujoco/hopper/medium-v0, or a D4RL-style name {env}-{quality}-v2 with env in "
    f"{', '.join(env for env in GYM_ENVS if env not in LOCAL_ONLY_ENVS)} ({{env}}-{{quality}}-v0 for "
    f"{', '.join(LOCAL_ONLY_ENVS)}) and quality in {', '.join(QUALITIES)}, or "
    f"antmaze-{{{','.join(ANTMAZE_TASKS)}}}-v2, or {{{','.join(ADROIT_ENVS)}}}-{{{','.join(ADROIT_QUALITIES)}}}-v1"
)


def dataset_store() -> str:
    """The Minari store's folder, made if missing as Minari makes it; a path that cannot be a folder (a file, a
    symlink loop) or be made is one sentence, as make_dataset.py says it, instead of Minari's traceback."""
    store = os.environ.get("MINARI_DATASETS_PATH") or os.path.join(os.path.expanduser("~"), ".minari", "datasets")
    try:
        os.makedirs(store, exist_ok=True)
    except OSError as exc:
        fail(f"cannot write to {store} ({exc.strerror or type(exc).__name__}); choose another place with "
             "MINARI_DATASETS_PATH")
    return store


def local_datasets() -> dict:
    """Minari's local datasets {id: metadata}; a folder Minari cannot read is an error, not a missing dataset."""
    import warnings

    import minari

    dataset_store()  # a store that cannot be a folder: one sentence
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Misconfigured dataset": reported below, for the ids we need
        return minari.list_local_datasets()


MINARI_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*-v\d+")


def checked_id(env_id: str) -> str:
    """--env-id checked for its form before any path is built from it. A trailing slash (what tab completion
    gives) is dropped; a path (./, .., /...), a namespace of the store, or anything else that is not
    `namespace/name-vN` or a D4RL-style name is one sentence."""
    env_id = env_id.rstrip("/")
    parts = env_id.split("/")
    if "/" not in env_id:
        return env_id  # a D4RL-style name, checked by parse_d4rl_name
    if env_id.startswith(("/", "~")) or any(part in ("", ".", "..") for part in parts):
        fail(f"--env-id {env_id!r} is a path, not a dataset id; give the id, the path below the Minari store, "
             "such as local/pendulum/medium-v0")
    if not MINARI_ID.fullmatch(env_id):
        inside = sorted(dataset_id for dataset_id in local_datasets() if dataset_id.startswith(env_id + "/"))
        if inside:
            fail(f"--env-id {env_id} is a namespace of the Minari store, not a dataset; name one of its datasets: "
                 + ", ".join(inside))
        fail(f"--env-id {env_id!r} is not a dataset id; ids read namespace/name-vN, such as mujoco/hopper/medium-v0")
    return env_id


def present(dataset_id: str, local: dict) -> bool:
    """True when `dataset_id` is a readable local dataset. A folder of that name holding Minari's metadata that
    Minari cannot read stops the run as damaged; a folder without it is no dataset, and counts as missing."""
    if dataset_id in local:
        return True
    path = os.path.join(dataset_store(), dataset_id)
    if os.path.isfile(os.path.join(path, "data", "metadata.json")):
        fail(f"the local dataset {dataset_id} in {path} is unreadable (damaged or half-written metadata); delete that "
             "folder and make, import or download it again")
    return False


def hosted_equivalents(env: str, quality: str) -> list:
    """Minari's hosted ports of a D4RL name (two ids when medium-expert must be combined); [] when none exists."""
    if env == "antmaze":
        return [f"D4RL/antmaze/{quality}-v1"]
    if env in ADROIT_ENVS:
        return [f"D4RL/{env}/{quality}-v2"]
    if env in ("hopper", "halfcheetah", "walker2d", "ant") and quality in ("medium", "expert"):
        return [f"mujoco/{env}/{quality}-v0"]
    if env in ("hopper", "halfcheetah", "walker2d", "ant") and quality == "medium-expert":
        return [f"mujoco/{env}/medium-v0", f"mujoco/{env}/expert-v0"]
    return []


def with_medium_expert_pair(dataset_id: str, quality: str) -> list:
    """Candidate id lists for one source: the id itself, and for medium-expert also its medium + expert parts."""
    candidates = [[dataset_id]]
    if quality == "medium-expert":
        candidates.append([dataset_id.replace("medium-expert", part) for part in ("medium", "expert")])
    return candidates


def remove_dead_leftovers(directory: str, pattern: re.Pattern):
    """Removes what killed runs left in `directory`: the files and folders whose name `pattern` matches and that
    left_by_dead_writer finds abandoned."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        match, path = pattern.fullmatch(name), os.path.join(directory, name)
        if match and left_by_dead_writer(path, match):
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile by another run
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


STAGED_COMBINE = re.compile(r"\.combine-(?P<pid>\d+)(@(?P<host>.+))?-[^-]+")  # combine's staging, by WRITER


def dataset_bytes(dataset_id: str) -> int:
    """Size on disk of a local dataset's folder."""
    folder = os.path.join(dataset_store(), dataset_id)
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def combine(dataset_ids: list, local: dict) -> str:
    """One id is returned as it is; a medium + expert pair becomes (once) the medium-expert id beside them.
    The combined set is built in a hidden folder of the store (Minari lists no hidden folder), checked (every step
    of both parts, their reference scores), and only then renamed into place: an error or Ctrl-C at any moment
    leaves the store as it was, and no later run can find a half-written set."""
    import shutil

    import minari

    if len(dataset_ids) == 1:
        return dataset_ids[0]
    new_id = dataset_ids[0].replace("/medium-v", "/medium-expert-v")
    expected_steps = sum(local[i]["total_steps"] for i in dataset_ids)
    if present(new_id, local):
        if local[new_id].get("combined_datasets") and local[new_id]["total_steps"] != expected_steps:
            fail(f"{new_id} holds {local[new_id]['total_steps']} steps, not the {expected_steps} of "
                 f"{' + '.join(dataset_ids)} (an interrupted combine by an older version); delete "
                 f"{os.path.join(dataset_store(), new_id)} and run again")
        return new_id
    store = dataset_store()
    check_writable(store, "MINARI_DATASETS_PATH", 2 * sum(dataset_bytes(i) for i in dataset_ids))
    remove_dead_leftovers(store, STAGED_COMBINE)
    scores = {(local[i].get("ref_min_score"), local[i].get("ref_max_score")) for i in dataset_ids}
    if len(scores) > 1:
        fail(f"{' and '.join(dataset_ids)} have different reference scores {sorted(scores, key=str)}; "
             f"make {new_id} directly")
    ref_min, ref_max = scores.pop()
    print(f"combining {' + '.join(dataset_ids)} into {new_id}")
    staging = tempfile.mkdtemp(prefix=f".combine-{WRITER}-", dir=store)
    previous_store = os.environ.get("MINARI_DATASETS_PATH")
    try:
        parts = [minari.load_dataset(i) for i in dataset_ids]
        os.environ["MINARI_DATASETS_PATH"] = staging  # Minari writes the new set where this points
        os.makedirs(os.path.join(staging, os.path.dirname(new_id)))
        combined = minari.combine_datasets(parts, new_id)
        if ref_min is not None and ref_max is not None:
            combined.storage.update_metadata({"ref_min_score": ref_min, "ref_max_score": ref_max})
        written = sum(len(episode.rewards) for episode in minari.load_dataset(new_id).iterate_episodes())
        if written != expected_steps:
            raise RuntimeError(f"{written} steps were written instead of {expected_steps}")
        target = os.path.join(store, new_id)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(os.path.join(staging, new_id), target)
    except Exception as exc:
        fail(f"could not combine {' + '.join(dataset_ids)} into {new_id} ({exc}); make {new_id} directly")
    finally:
        if previous_store is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous_store
        shutil.rmtree(staging, ignore_errors=True)
    return new_id


def ways_to_get(env_id: str, env: str, hosted: list) -> str:
    """The ways that can produce this dataset: only those that exist for it."""
    download = f"connect to the internet so Minari can download {' and '.join(hosted)}"
    if env in LOCAL_ONLY_ENVS:
        return f"generate it with `python make_dataset.py --env-id {env_id}`"
    if env == "antmaze" or env in ADROIT_ENVS:
        return download
    return (f"import the original D4RL file with `python make_dataset.py --from-d4rl FILE.hdf5 --env-id {env_id}`, "
            + (f"{download}, " if hosted else "(Minari hosts no port of this dataset) ")
            + f"or generate it offline with `python make_dataset.py --env-id {env_id}`")


def resolve_dataset(env_id: str, download: bool) -> str:
    """Maps --env-id to a local Minari dataset id, in the spec's order: imported D4RL file, hosted port already
    downloaded, locally generated dataset, and finally a download of the hosted port."""
    import minari

    env_id = checked_id(env_id)
    local = local_datasets()
    if "/" in env_id:  # a Minari id, taken as it is
        if present(env_id, local):
            return env_id
        if env_id.startswith("local/"):  # made here, never downloaded
            namesakes = sorted(i for i in local if i.startswith(env_id.rsplit("/", 1)[0] + "/"))
            fail(f"no local dataset {env_id} in {dataset_store()}; local datasets are made here by make_dataset.py, "
                 "never downloaded" + (f" (this store holds {', '.join(namesakes)})" if namesakes else ""))
        hosted, ways = [env_id], f"connect to the internet so Minari can download {env_id}, or check the id"
    else:
        parsed = parse_d4rl_name(env_id)
        if parsed is None:
            fail(f"unknown --env-id {env_id!r}; use {ACCEPTED_IDS}")
        if version_error(env_id):
            fail(version_error(env_id))
        env, quality = parsed
        hosted = hosted_equivalents(env, quality)
        sources = [*with_medium_expert_pair(f"d4rl/{env}/{quality}-v2", quality), hosted,
                   *with_medium_expert_pair(f"local/{env}/{quality}-v0", quality)]
        for ids in sources:
            if ids and all(present(i, local) for i in ids):
                return combine(ids, local)
        ways = ways_to_get(env_id, env, hosted)
    if download and hosted:
        check_writable(dataset_store(), "MINARI_DATASETS_PATH")
        try:
            for dataset_id in hosted:
                if dataset_id not in local:
                    print(f"downloading {dataset_id} from Minari's hub")
                    minari.download_dataset(dataset_id)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "huggingface_hub" in reason:  # Minari >= 0.5 downloads through its optional `hf` extra
                ways = "install Minari's download support with `pip install \"minari[hf]\"` and run again, or " + ways
            fail(f"no local dataset for {env_id} and the download failed ({reason}); {ways}")
        return combine(hosted, local_datasets())
    fail(f"no local dataset for {env_id} in {dataset_store()}; {ways}")


def comparability_warning(env_id: str, dataset_id: str) -> Optional[str]:
    """D4RL-style names that resolve to anything but D4RL's own data give scores that D4RL tables do not hold."""
    parsed = parse_d4rl_name(env_id)
    if parsed is None or parsed[0] in LOCAL_ONLY_ENVS:
        return None
    if dataset_id.startswith("mujoco/"):
        origin = "Minari's re-collection on the Gymnasium v5 environment"
    elif dataset_id.startswith("local/"):
        origin = "a dataset made locally by make_dataset.py"
    else:
        return None
    return (f"warning: {env_id} resolved to {dataset_id}, {origin}; its scores are not comparable with D4RL tables "
            "(import the original file with make_dataset.py --from-d4rl for that)")


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


def load_dataset(dataset_id: str) -> dict:
    """The dataset's transitions (read_transitions) and the facts the checkpoint records (environment, action
    bounds, reference scores)."""
    data, dataset = read_transitions(dataset_id)
    space = dataset.spec.action_space
    try:  # the evaluation environment the dataset records (Minari falls back to the collection environment)
        recovered = dataset.recover_environment(eval_env=True)
        env_spec = recovered.spec
        recovered.close()
        gym_kwargs = json.loads(json.dumps(dict(env_spec.kwargs), default=str))
        gym_kwargs.pop("render_mode", None)  # chosen by each script, not part of the task
        if env_spec.max_episode_steps is not None:
            gym_kwargs["max_episode_steps"] = env_spec.max_episode_steps
        make_env(env_spec.id, gym_kwargs, 0).close()  # the environment every evaluation makes
    except Exception as exc:
        fail(f"dataset {dataset_id} records no usable environment ({type(exc).__name__}: {str(exc).strip()[:200]}); "
             "install the package that registers it, or re-create the dataset with its Gymnasium env")
    metadata = dataset.storage.metadata
    ref_scores = (metadata.get("ref_min_score"), metadata.get("ref_max_score"))
    if None in ref_scores:
        print(f"warning: {dataset_id} has no reference scores; normalized_score will be 100 x return / 100")
        ref_scores = (0.0, 100.0)
    try:
        ref_scores = (float(ref_scores[0]), float(ref_scores[1]))
    except (TypeError, ValueError):
        ref_scores = (math.nan, math.nan)
    if not (math.isfinite(ref_scores[0]) and math.isfinite(ref_scores[1]) and ref_scores[0] != ref_scores[1]):
        fail(f"dataset {dataset_id} has reference scores {metadata.get('ref_min_score')!r} and "
             f"{metadata.get('ref_max_score')!r}, not two different finite numbers, so no score can be normalized; "
             "set ref_min_score and ref_max_score in its metadata, or re-create it")
    return dict(data, dataset_id=dataset_id, gym_id=env_spec.id, gym_kwargs=gym_kwargs,
                action_low=np.asarray(space.low, dtype=np.float32),
                action_high=np.asarray(space.high, dtype=np.float32),
                ref_min_score=float(ref_scores[0]), ref_max_score=float(ref_scores[1]))


def check_expectile(expectile: Optional[float]):
    """0.5 makes V the mean of Q over the data's actions and values towards 1 its maximum; at 0 or 1 one side of
    the loss vanishes and V drifts without bound."""
    if expectile is not None and not 0.0 < expectile < 1.0:
        fail(f"--iql-expectile is {expectile} but must be strictly between 0 and 1")


def check_room_for_checkpoint(args: Args, nets: dict, obs_dim: int, act_dim: int):
    """The checkpoint's size is known once the networks exist: the room for it (twice, for the staged copy) is
    checked before training, not found missing after it."""
    networks = [net for net in nets.values() if isinstance(net, nn.Module)]
    size = checkpoint_bytes(networks, extra_values=2048 * (obs_dim + act_dim) + 1001 + 4 * obs_dim)
    check_writable(args.checkpoint_dir, "--checkpoint-dir", 2 * size)


def check_args_and_read_dataset(args: Args):
    """Checks the flags and the output places before any work, then resolves --env-id to a local dataset and
    reads it; returns the dataset id, its transitions and facts (load_dataset) and the checkpoint's path."""
    check_numbers(args, positive=("total_steps", "batch_size", "hidden_dims", "num_critics", "critic_lr", "actor_lr",
                                  "cql_n_actions", "cql_temperature", "policy_freq", "awac_lambda", "awac_max_weight",
                                  "iql_beta", "iql_max_weight", "cvae_lr", "latent_dim", "eval_freq", "eval_episodes"),
                  non_negative=("seed", "cvae_steps", "save_every", "cql_alpha", "td3bc_alpha", "policy_noise", "noise_clip"),
                  unit_interval=("gamma", "tau"))
    check_expectile(args.iql_expectile)
    use_threads(args.threads)
    args.env_id = checked_id(args.env_id)
    checkpoint_path = os.path.join(args.checkpoint_dir, f"{args.env_id.replace('/', '-')}__{args.algo}__{args.seed}.pt")
    if os.path.exists(checkpoint_path) and not args.overwrite:
        fail(f"{checkpoint_path} exists; pass --overwrite to replace it, or choose another --checkpoint-dir or --seed")
    check_writable(args.checkpoint_dir, "--checkpoint-dir")
    check_writable(args.run_dir, "--run-dir")
    dataset_id = resolve_dataset(args.env_id, download=True)
    print(f"dataset: {args.env_id} -> {dataset_id}")
    if comparability_warning(args.env_id, dataset_id):
        print(comparability_warning(args.env_id, dataset_id))
    data = load_dataset(dataset_id)
    return dataset_id, data, checkpoint_path


# The checkpoint file: staged, moved into place without replacing another run's, rescued where the disk is full.
CHECKPOINT_FORMAT = "samg-offline-1"
CHECKPOINT_KEYS = (
    "format", "algo", "env_id", "dataset_id", "gym_id", "gym_kwargs", "obs_dim", "act_dim", "action_low",
    "action_high", "obs_mean", "obs_std", "reward_scale", "reward_bias", "ref_min_score", "ref_max_score",
    "hidden_dims", "latent_dim", "actor", "critic", "cvae", "cvae_calibration", "offline_normalized_score", "args",
)


STAGED_CHECKPOINT = re.compile(r".+\.tmp-(?P<pid>\d+)(@(?P<host>.+))?")  # save_checkpoint's staging, by WRITER


def save_checkpoint(payload: dict, path: str, replace: bool = False):
    """Writes to a temporary file beside `path` and moves it into place in one step, so an interrupted run never
    leaves half a file (and the temporary files of killed writers are removed here). Without `replace` the move
    refuses a file that appeared meanwhile (a hard link does not replace): of two runs writing one checkpoint, the
    second is refused with one sentence and its file is kept aside, named in the sentence."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    remove_dead_leftovers(os.path.dirname(path) or ".", STAGED_CHECKPOINT)
    tmp_path = f"{path}.tmp-{WRITER}"
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
        with contextlib.suppress(FileNotFoundError):
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
        removed = isinstance(exc, FileNotFoundError) and exc.filename == f"{path}.tmp-{WRITER}"
        if removed:  # by hand, or by a job that shares this directory (no version's cleaning removes a live write)
            reason = f"another process removed its staged copy {exc.filename}, perhaps a job sharing this directory"
    for directory in dict.fromkeys(rescue_dirs):
        rescue = os.path.abspath(os.path.join(directory, f"rescued-{os.getpid()}-{os.path.basename(path)}"))
        try:
            save_checkpoint(payload, rescue, replace=True)
        except (OSError, RuntimeError):
            continue
        fail(f"could not write {path} ({reason}); the trained networks are saved as {rescue} instead: move it to "
             f"{path}" + ("" if removed else " once there is room"))
    fail(f"could not write {path} ({reason}) nor into any of {', '.join(rescue_dirs)}; the trained networks are "
         "lost: free some space and run again")


def checkpoint_bytes(networks, extra_values: int = 0) -> int:
    """About how large a checkpoint of these networks (and `extra_values` other numbers) is on disk: 4 bytes a
    float32 value, and room for the pickled structure."""
    values = sum(p.numel() for network in networks for p in network.state_dict().values()) + extra_values
    return 4 * values + (1 << 20)



def plain_args(args: Args) -> dict:
    """The flags as weights_only loading reads them back (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()}


def write_checkpoint(path: str, args: Args, dataset_id: str, data: dict, nets: dict, calibration: dict,
                     score: float, transforms: dict):
    """The checkpoint the online scripts load (CHECKPOINT_KEYS), with the transforms applied to the data."""
    obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
    actor, critic, cvae = nets["actor"], nets["critic"], nets["cvae"]
    obs_mean, obs_std = transforms["obs_mean"], transforms["obs_std"]
    reward_scale, reward_bias = transforms["reward_scale"], transforms["reward_bias"]
    low, high = data["action_low"], data["action_high"]
    checkpoint = {
        "format": CHECKPOINT_FORMAT, "algo": args.algo, "env_id": args.env_id, "dataset_id": dataset_id,
        "gym_id": data["gym_id"], "gym_kwargs": data["gym_kwargs"], "obs_dim": obs_dim, "act_dim": act_dim,
        "action_low": torch.as_tensor(low), "action_high": torch.as_tensor(high),
        "obs_mean": torch.as_tensor(obs_mean), "obs_std": torch.as_tensor(obs_std),
        "reward_scale": reward_scale, "reward_bias": reward_bias,
        "ref_min_score": data["ref_min_score"], "ref_max_score": data["ref_max_score"],
        "hidden_dims": list(args.hidden_dims), "latent_dim": args.latent_dim,
        "actor": {k: v.cpu() for k, v in actor.state_dict().items()},
        "critic": {k: v.cpu() for k, v in critic.state_dict().items()},
        "cvae": {k: v.cpu() for k, v in cvae.state_dict().items()},
        "cvae_calibration": calibration,
        "offline_normalized_score": score,
        "args": plain_args(args),
    }
    if args.algo == "cql":
        checkpoint["log_alpha"] = nets["log_alpha"].detach().cpu()
    if args.algo == "iql":
        checkpoint["value"] = {k: v.cpu() for k, v in nets["value"].state_dict().items()}
    diverged = [key for key in ("actor", "critic", "cvae", "value") if key in checkpoint
                and not all(torch.isfinite(value).all() for value in checkpoint[key].values())]
    if diverged:
        fail(f"training diverged: the {' and '.join(diverged)} weights are not finite (nan or inf), so no checkpoint "
             f"was written; check the dataset's rewards (largest |r| {np.abs(data['rewards']).max():.3g}) and the "
             "learning rates")
    save_or_rescue(checkpoint, path, args.overwrite, [args.run_dir, os.path.expanduser("~"), tempfile.gettempdir()])


# The training state of --save-every and --resume: what the loop needs to continue exactly where it stopped.
NOT_LEARNED = ("total_steps", "save_every", "resume", "overwrite", "checkpoint_dir", "run_dir", "exp_name",
               "threads")  # may differ on resume (evaluation may not: it draws from the random stream)


def training_state(args: Args, nets: dict, opts: dict, step: int, run_name: str, score: float) -> dict:
    return {"step": step, "run_name": run_name, "score": score, "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "args": plain_args(args), "nets": {k: v.state_dict() if isinstance(v, nn.Module) else v
                                               for k, v in nets.items()},
            "opts": {k: opt.state_dict() for k, opt in opts.items()}}


def save_training_state(state: dict, path: str) -> bool:
    """Staged as a checkpoint is; a failed write (a full disk) is one line and training goes on without it."""
    try:
        return save_checkpoint(state, path, replace=True) or True
    except (OSError, RuntimeError) as exc:
        print(f"could not write {path} ({getattr(exc, 'strerror', None) or exc}); training goes on", file=sys.stderr)
        return False


def resume_training(path: str, args: Args, nets: dict, opts: dict):
    """Loads the state into the networks, optimizers and random stream; returns its step, the run's name (its log
    continues in the same folder) and the last evaluation's score."""
    if not os.path.isfile(path):
        fail(f"no training state at {path} to resume from; run without --resume, or with the --checkpoint-dir, "
             "--env-id, --algo and --seed of the stopped run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        ours = plain_args(args)
        changed = [flag(k) for k in sorted(set(ours) | set(state["args"]))
                   if k not in NOT_LEARNED and ours.get(k) != state["args"].get(k)]
    except Exception as exc:
        fail(f"{path} is not a readable training state ({type(exc).__name__}); run without --resume")
    if changed:
        fail(f"{path} was trained with another {', '.join(changed)}; resume with the flags the run was started with")
    if state["step"] > max(args.total_steps, args.cvae_steps):
        fail(f"{path} is at step {state['step']}, beyond --total-steps {args.total_steps}; raise --total-steps")
    for key, value in ((k, v) for k, v in state["nets"].items() if isinstance(nets[k], (nn.Module, torch.Tensor))):
        nets[key].load_state_dict(value) if isinstance(nets[key], nn.Module) else nets[key].data.copy_(value)
    for key, value in state["opts"].items():
        opts[key].load_state_dict(value)
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    print(f"resuming {state['run_name']} after step {state['step']}")
    return state["step"], state["run_name"], state["score"]


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
    handle_interrupts()
    main(tyro.cli(Args))
