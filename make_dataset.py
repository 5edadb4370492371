"""D4RL-style offline datasets for any Gymnasium env, written in Minari format; import of original D4RL files.

    python make_dataset.py --env-id hopper-medium-replay-v2
    python make_dataset.py --gym-id Pendulum-v1 --qualities random medium medium-replay --total-timesteps 20000
    python make_dataset.py --from-d4rl hopper_medium-v2.hdf5

The recipe is D4RL's (Fu et al. 2020): one SAC behaviour agent is trained online. `random` is a uniform random
policy; `medium` is the agent's snapshot when its evaluation return first reaches a third of the way from the random
to the expert reference return; `medium-replay` is every transition of its replay buffer up to that snapshot;
`expert` is the fully trained agent; `medium-expert` is medium followed by expert. Each dataset is written as
`local/{env}/{quality}-v0` (imports: `d4rl/{env}/{quality}-v2`) with reference scores in its metadata, so
`minari.get_normalized_score` and the pretraining and online scripts report D4RL-normalized scores.
"""
import contextlib
import copy
import errno
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
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple
import gymnasium as gym
import h5py
import minari
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from minari.data_collector import EpisodeBuffer
from minari.namespace import create_namespace, list_local_namespaces
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    env_id: Optional[str] = None
    """D4RL-style name of the dataset to make (`hopper-medium-replay-v2`, `pendulum-medium-v0`) or to import"""
    gym_id: Optional[str] = None
    """any Gymnasium id with Box spaces (`Hopper-v5`, `Pendulum-v1`), instead of --env-id"""
    qualities: Tuple[str, ...] = ()
    """qualities to write (default: the one in --env-id, else random medium medium-replay)"""
    transitions: int = 1_000_000
    """transitions in random, medium and expert (medium-expert holds both; medium-replay what the buffer held)"""
    total_timesteps: int = 1_000_000
    """environment steps of the SAC behaviour agent (at most; it stops at the medium snapshot if nothing needs more)"""
    medium_return: Optional[float] = None
    """evaluation return that makes the medium snapshot (default: a third of the way from random to expert reference)"""
    expert_return: Optional[float] = None
    """expert reference return of an env without D4RL scores (default: the trained agent's measured return)"""
    from_d4rl: Optional[str] = None
    """import this original D4RL hdf5 file as d4rl/{env}/{quality}-v2 instead of making data"""
    overwrite: bool = False
    """replace datasets that already exist"""
    seed: int = 1
    """seed of the agent, the environments and the data collection"""
    learning_starts: int = 5000
    """SAC steps with uniform random actions and no updates"""
    eval_freq: int = 5000
    """evaluate the SAC agent (and keep a snapshot) every this many steps"""
    eval_episodes: int = 10
    """deterministic episodes per evaluation"""
    ref_episodes: int = 100
    """episodes that measure the random and expert reference returns where D4RL has none"""
    collect_deterministic: bool = False
    """collect medium and expert data with the mean action instead of sampling from the policy"""
    hidden_dims: Tuple[int, ...] = (256, 256)
    """hidden layer sizes of the SAC actor and critics"""
    batch_size: int = 256
    """SAC minibatch size"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target network smoothing coefficient"""
    critic_lr: float = 3e-4
    """learning rate of the critics"""
    actor_lr: float = 3e-4
    """learning rate of the actor"""
    alpha_lr: float = 3e-4
    """learning rate of the entropy temperature"""
    log_freq: int = 1000
    """write the SAC losses to TensorBoard every this many steps"""
    exp_name: str = "make_dataset"
    """the name of this experiment, part of the run name"""
    run_dir: str = "runs"
    """TensorBoard logs of the behaviour agent go to {run_dir}/{run_name}"""
    cuda: bool = True
    """train on CUDA when it is available"""
    threads: int = 0
    """CPU threads of torch's operations (0: torch's default, one per core); 1 when other runs share the cores"""


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


# --- the SAC behaviour agent (Haarnoja et al. 2018) ---
def update_critic(batch, actor, critic, critic_target, log_alpha, critic_optimizer, gamma: float) -> torch.Tensor:
    """Twin-critic soft Bellman backup; returns the mean over critics of each critic's MSE (CleanRL's qf_loss)."""
    obs, actions, rewards, next_obs, terminations = batch
    with torch.no_grad():
        next_actions, next_log_prob, _ = actor(next_obs)
        next_q = critic_target(next_obs, next_actions).min(0).values - log_alpha.exp() * next_log_prob
        target = rewards + gamma * (1.0 - terminations) * next_q
    qf_losses = (critic(obs, actions) - target).pow(2).mean(1)
    critic_optimizer.zero_grad(set_to_none=True)
    qf_losses.sum().backward()  # the sum gives each critic the gradient of its own MSE
    critic_optimizer.step()
    return qf_losses.detach().mean()


@torch.no_grad()
def soft_update(target_params: list, online_params: list, tau: float):
    torch._foreach_lerp_(target_params, online_params, tau)


def update_actor(obs, actor, critic, log_alpha, actor_optimizer, alpha_optimizer, target_entropy: float):
    """Reparameterised actor step on the min over critics, then one step of automatic entropy tuning."""
    actions, log_prob, _ = actor(obs)
    alpha = log_alpha.exp().detach()
    actor_loss = (alpha * log_prob - critic(obs, actions).min(0).values).mean()
    actor_optimizer.zero_grad(set_to_none=True)
    actor_loss.backward(inputs=list(actor.parameters()))  # dQ/da only: no gradient into the critic's weights
    actor_optimizer.step()
    alpha_loss = -(log_alpha * (log_prob.detach() + target_entropy)).mean()
    alpha_optimizer.zero_grad(set_to_none=True)
    alpha_loss.backward()
    alpha_optimizer.step()
    return torch.stack([actor_loss.detach(), alpha])


LOSS_NAMES = ("losses/qf_loss", "losses/actor_loss", "losses/alpha")


def train_behaviour_agent(args: Args, env: gym.Env, eval_env: gym.Env, stop_return: Optional[float],
                          writer: SummaryWriter, device: torch.device):
    """Online SAC on `env`, logged to `writer`. Every --eval-freq steps and at the end, the deterministic policy
    is evaluated and a snapshot (step, mean return, actor weights) kept. Stops at the first evaluation reaching
    `stop_return` (None: runs the whole budget). Returns the final actor, the replay buffer and the snapshots."""
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    actor = TanhGaussianActor(obs_dim, act_dim, args.hidden_dims).to(device)
    critic = CriticEnsemble(obs_dim, act_dim, args.hidden_dims, num_critics=2).to(device)
    critic_target = copy.deepcopy(critic).requires_grad_(False)
    target_params, online_params = list(critic_target.parameters()), list(critic.parameters())
    log_alpha = torch.zeros((), device=device, requires_grad=True)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.actor_lr, fused=True)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_lr, fused=True)
    alpha_optimizer = torch.optim.Adam([log_alpha], lr=args.alpha_lr, fused=True)
    warmup = UniformRandomPolicy(act_dim, args.seed)
    replay = TransitionStore(args.total_timesteps, obs_dim, act_dim, device)
    snapshots, recent_returns, episode_return = [], deque(maxlen=10), 0.0
    loss_sums, num_updates = torch.zeros(len(LOSS_NAMES), device=device), 0  # read only at log steps
    progress = Progress(args.total_timesteps)

    obs, _ = env.reset(seed=args.seed)
    for step in range(1, args.total_timesteps + 1):
        action = act_numpy(warmup if step <= args.learning_starts else actor, obs, False, device)
        next_obs, reward, terminated, truncated, _ = env.step(to_env_action(action, low, high))
        replay.add(obs, action, reward, next_obs, terminated, truncated)
        episode_return += float(reward)
        obs = next_obs
        if terminated or truncated:
            recent_returns.append(episode_return)
            writer.add_scalar("charts/episodic_return", episode_return, step)
            obs, episode_return = env.reset()[0], 0.0

        if step > args.learning_starts:
            batch = replay.sample(args.batch_size)
            loss_sums[0] += update_critic(batch, actor, critic, critic_target, log_alpha, critic_optimizer, args.gamma)
            loss_sums[1:] += update_actor(batch[0], actor, critic, log_alpha, actor_optimizer, alpha_optimizer,
                                          -float(act_dim))
            soft_update(target_params, online_params, args.tau)
            num_updates += 1
        if num_updates and (step % args.log_freq == 0 or step == args.total_timesteps):
            for name, value in zip(LOSS_NAMES, (loss_sums / num_updates).tolist()):
                writer.add_scalar(name, value, step)
            loss_sums.zero_()
            num_updates = 0

        training = f"episode return {np.mean(recent_returns):.1f}" if recent_returns else ""
        evaluated = stop = False
        if step % args.eval_freq == 0 or step == args.total_timesteps:
            returns, _, _ = evaluate(actor, eval_env, 0.0, 1.0, args.eval_episodes, args.seed + 10_000, device)
            writer.add_scalar("eval/return", returns.mean(), step)
            weights = {key: value.detach().clone() for key, value in actor.state_dict().items()}
            snapshots.append((step, float(returns.mean()), weights))
            evaluated = True
            training = f"{training}  eval return {returns.mean():.1f}".strip()
            stop = stop_return is not None and returns.mean() >= stop_return
        sps = progress.update(step, f"[sac] {training}", force=evaluated)
        if sps is not None:
            writer.add_scalar("charts/SPS", sps, step)
        if stop:
            print(f"[sac] reached the medium return {stop_return:.1f} at step {step}; nothing needs more training")
            break
    writer.close()
    return actor, replay, snapshots


def medium_snapshot(snapshots, medium_return: float):
    """The first snapshot whose evaluation return reaches `medium_return`; if none does, the best one (warned)."""
    for snapshot in snapshots:
        if snapshot[1] >= medium_return:
            return snapshot
    best = max(snapshots, key=lambda snapshot: snapshot[1])
    print(f"warning: no evaluation reached the medium return {medium_return:.1f}; medium uses the best snapshot "
          f"(step {best[0]}, return {best[1]:.1f}); raise --total-timesteps or lower --medium-return for D4RL's medium")
    return best


class UniformRandomPolicy:
    """D4RL's random policy: actions uniform over the action space (in the networks' [-1, 1] scale)."""

    def __init__(self, act_dim: int, seed: int):
        self.act_dim = act_dim
        self.generator = torch.Generator().manual_seed(seed)

    def act(self, obs: torch.Tensor, deterministic: bool) -> torch.Tensor:
        return torch.rand(obs.shape[0], self.act_dim, generator=self.generator).to(obs.device) * 2.0 - 1.0


class TransitionStore:
    """Preallocated transitions in the order they happened, as tensors on `device`: the SAC replay buffer (sampled
    where it lives, with no copy through numpy), and every collected dataset. Actions are kept in the networks'
    [-1, 1] scale; `arrays` hands them out in the environment's scale."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device = torch.device("cpu")):
        self.observations = torch.zeros(capacity, obs_dim, device=device)
        self.next_observations = torch.zeros(capacity, obs_dim, device=device)
        self.actions = torch.zeros(capacity, act_dim, device=device)
        self.rewards = torch.zeros(capacity, device=device)
        self.terminations = torch.zeros(capacity, device=device)  # 1.0 / 0.0, as the Bellman target uses it
        self.truncations = torch.zeros(capacity, dtype=torch.bool, device=device)
        self.size = 0

    def add(self, obs, action, reward, next_obs, terminated, truncated):
        i = self.size
        self.observations[i], self.actions[i] = torch.from_numpy(obs), torch.from_numpy(action)
        self.next_observations[i] = torch.from_numpy(next_obs)
        self.rewards[i], self.terminations[i], self.truncations[i] = float(reward), float(terminated), truncated
        self.size += 1

    def sample(self, batch_size: int):
        idx = torch.randint(0, self.size, (batch_size,), device=self.rewards.device)
        return (self.observations[idx], self.actions[idx], self.rewards[idx], self.next_observations[idx],
                self.terminations[idx])

    def arrays(self, end: int, low: np.ndarray, high: np.ndarray) -> Dict[str, np.ndarray]:
        def host(x):
            return x[:end].cpu().numpy()

        return dict(observations=host(self.observations), next_observations=host(self.next_observations),
                    actions=to_env_action(host(self.actions), low, high).astype(np.float32),
                    rewards=host(self.rewards), terminations=host(self.terminations).astype(bool),
                    truncations=host(self.truncations))


def act_numpy(policy, obs: np.ndarray, deterministic: bool, device: torch.device) -> np.ndarray:
    with torch.no_grad():
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device).unsqueeze(0)
        return policy.act(obs_t, deterministic)[0].cpu().numpy()


def collect(env: gym.Env, policy, transitions: int, deterministic: bool, seed: int, label: str,
            device: torch.device) -> Dict[str, np.ndarray]:
    """Runs `policy` for exactly `transitions` steps, resetting at episode ends (D4RL's collection)."""
    low, high = env.action_space.low, env.action_space.high
    store = TransitionStore(transitions, env.observation_space.shape[0], env.action_space.shape[0])
    progress = Progress(transitions)
    obs, _ = env.reset(seed=seed)
    for step in range(1, transitions + 1):
        action = act_numpy(policy, obs, deterministic, device)
        next_obs, reward, terminated, truncated, _ = env.step(to_env_action(action, low, high))
        store.add(obs, action, reward, next_obs, terminated, truncated)
        obs = next_obs if not (terminated or truncated) else env.reset()[0]
        progress.update(step, f"collecting {label}")
    return store.arrays(store.size, low, high)


def to_episodes(data: Dict[str, np.ndarray]) -> List[EpisodeBuffer]:
    """Splits transitions into Minari episodes at terminations and truncations; an episode that the data cuts off
    ends truncated. Inside an episode the observation after step t is observations[t + 1]; after its last step it
    is that step's next_observations."""
    ends = data["terminations"] | data["truncations"]
    truncations = data["truncations"].copy()
    if len(ends) and not ends[-1]:
        ends[-1] = truncations[-1] = True
    episodes, start = [], 0
    for end in np.flatnonzero(ends) + 1:
        observations = np.concatenate([data["observations"][start:end], data["next_observations"][end - 1:end]])
        episodes.append(EpisodeBuffer(observations=observations, actions=data["actions"][start:end],
                                      rewards=data["rewards"][start:end],
                                      terminations=data["terminations"][start:end],
                                      truncations=truncations[start:end]))
        start = end
    return episodes


def main(args: Args):
    start_time = time.time()
    store = check_args_and_store(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    datasets: Dict[str, List[EpisodeBuffer]] = {}  # dataset id -> episodes, in the order they are written
    descriptions: Dict[str, Tuple[str, str]] = {}  # dataset id -> (algorithm name, description)

    if args.from_d4rl is not None:
        gym_id, ref_min, ref_max = import_d4rl(args, datasets, descriptions)
    else:
        env_name, gym_id, qualities = resolve_request(args)
        check_free([f"local/{env_name}/{quality}-v0" for quality in qualities], args.overwrite)
        env = make_checked_env(gym_id, args.seed)
        check_reference_scores(gym_id, env_name, qualities, args.expert_return)
        check_room_for_datasets(store, env, qualities, args)
        needs_agent = any(quality != "random" for quality in qualities)
        if needs_agent:  # the behaviour agent's TensorBoard log, opened before any work so that it cannot fail after
            check_writable(args.run_dir, "--run-dir")
            run_name = f"{gym_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
            writer = open_run_log(args, run_name, vars(args))
        act_dim = env.action_space.shape[0]
        ids = ", ".join(f"local/{env_name}/{quality}-v0" for quality in qualities)
        print(f"making {', '.join(qualities)} for {gym_id} as {ids} on {device}")
        _, ref_min, ref_max = GYM_ENVS.get(env_name, (gym_id, None, None))
        if ref_min is None:
            # [our choice] envs without D4RL scores: the uniform random policy's measured mean return is the
            # reference minimum, and the trained agent's measured return (or --expert-return) the maximum.
            random_returns, _, _ = evaluate(UniformRandomPolicy(act_dim, args.seed + 1), make_checked_env(gym_id, 0),
                                            0.0, 1.0, args.ref_episodes, args.seed + 20_000, device)
            ref_min = float(random_returns.mean())
            print(f"random policy: mean return {ref_min:.1f} over {args.ref_episodes} episodes (reference minimum)")
            ref_max = args.expert_return
        medium_return = args.medium_return
        if medium_return is None and ref_max is not None:
            medium_return = ref_min + (ref_max - ref_min) / 3.0
        needs_expert = "expert" in qualities or "medium-expert" in qualities or ref_max is None

        if needs_agent:
            eval_env = make_checked_env(gym_id, args.seed + 10_000)
            print(f"[sac] training the behaviour agent, logging to {os.path.join(args.run_dir, run_name)}", flush=True)
            actor, replay, snapshots = train_behaviour_agent(args, make_checked_env(gym_id, args.seed), eval_env,
                                                             None if needs_expert else medium_return, writer, device)
            final_step, final_return, _ = snapshots[-1]
            if ref_max is None:
                expert_returns, _, _ = evaluate(actor, eval_env, 0.0, 1.0, args.ref_episodes, args.seed + 30_000,
                                                device)
                ref_max = float(expert_returns.mean())
                print(f"trained agent: mean return {ref_max:.1f} over {args.ref_episodes} episodes (reference maximum)")
                if ref_max <= ref_min:
                    print("warning: the trained agent is no better than the random policy, so normalized scores mean "
                          "nothing; raise --total-timesteps or pass --expert-return")
            if medium_return is None:
                medium_return = ref_min + (ref_max - ref_min) / 3.0
            medium_step, medium_eval, medium_weights = medium_snapshot(snapshots, medium_return)
            print(f"behaviour agent: medium snapshot at step {medium_step} (eval return {medium_eval:.1f}, normalized "
                  f"{normalized_score(medium_eval, ref_min, ref_max):.1f}); last evaluation at step {final_step}: "
                  f"return {final_return:.1f} (normalized {normalized_score(final_return, ref_min, ref_max):.1f})")
            medium_actor = copy.deepcopy(actor)
            medium_actor.load_state_dict(medium_weights)
        low, high = env.action_space.low, env.action_space.high

        collected = {}
        for quality in ("random", "medium", "expert"):
            if quality in qualities or (quality != "random" and "medium-expert" in qualities):
                if quality == "random":
                    policy, deterministic = UniformRandomPolicy(act_dim, args.seed + 2), False
                    source = "uniform random actions"
                elif quality == "medium":
                    policy, deterministic = medium_actor, args.collect_deterministic
                    source = f"the SAC snapshot at step {medium_step} (evaluation return {medium_eval:.1f})"
                else:
                    policy, deterministic = actor, args.collect_deterministic
                    source = f"the SAC agent after {final_step} steps (evaluation return {final_return:.1f})"
                seed = args.seed + 100 * (1 + ("random", "medium", "expert").index(quality))
                data = collect(make_checked_env(gym_id, seed), policy, args.transitions, deterministic, seed,
                               quality, device)
                collected[quality] = (to_episodes(data), source)
        if "medium-replay" in qualities:
            collected["medium-replay"] = (to_episodes(replay.arrays(medium_step, low, high)),
                                          f"every transition of the SAC replay buffer up to step {medium_step}")
        if "medium-expert" in qualities:
            collected["medium-expert"] = (collected["medium"][0] + collected["expert"][0],
                                          f"medium ({collected['medium'][1]}) followed by expert "
                                          f"({collected['expert'][1]})")
        for quality in qualities:
            dataset_id = f"local/{env_name}/{quality}-v0"
            episodes, source = collected[quality]
            datasets[dataset_id] = episodes
            algorithm = "uniform random policy" if quality == "random" else "SAC (make_dataset.py)"
            descriptions[dataset_id] = (algorithm, f"D4RL-style {env_name} {quality} data on {gym_id}: {source}; "
                                                   f"made by make_dataset.py with seed {args.seed}")

    ignore_stop_signals()  # the data is collected: from here on no signal (nor a second one) cuts its writing short
    # the registered spec: env.spec would carry make_env's render_mode=None into the dataset's kwargs
    write_datasets(store, datasets, descriptions, gym.spec(gym_id), ref_min, ref_max, args.overwrite)
    print(f"\nreference scores: min {ref_min:.2f}, max {ref_max:.2f}; done in {duration(time.time() - start_time)}")
    print(summary_table(datasets, ref_min, ref_max))


# ======================================================================================================================
# The recipe ends here. Nothing below changes what is collected: the checks of flags and names, reading original
# D4RL files, writing into the Minari store, run logs, progress and interrupts.
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


def check_args_and_store(args: Args) -> Path:
    """Checks the flags and the Minari store before any work (and clears what a killed run left there)."""
    check_numbers(args, positive=("transitions", "total_timesteps", "eval_freq", "eval_episodes", "ref_episodes",
                                  "hidden_dims", "batch_size", "critic_lr", "actor_lr", "alpha_lr", "log_freq"),
                  non_negative=("seed", "learning_starts"), unit_interval=("gamma", "tau"))
    for field in ("medium_return", "expert_return"):
        if getattr(args, field) is not None and not math.isfinite(getattr(args, field)):
            fail(f"{flag(field)} is {getattr(args, field)} but must be a finite return")
    use_threads(args.threads)
    store = minari_store()
    check_writable(str(store), "MINARI_DATASETS_PATH")
    recover_killed_writes(store)
    return store


D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")


D4RL_LOCOMOTION = tuple(name for name, (_, ref_min, _) in GYM_ENVS.items() if ref_min is not None)


STAGING = re.compile(r"\.make_dataset-(?P<pid>\d+)(@(?P<host>.+))?")  # hidden folders of the store where runs build
REMOVED = ("another process removed {} while this run wrote into it (another job sharing this store, a cleanup?); the "
           "store was left as it was: run again")


def env_name_of(gym_id: str) -> str:
    """`Hopper-v5` -> `hopper` (its name in GYM_ENVS); other ids lower-cased without version and punctuation."""
    for name, (table_id, _, _) in GYM_ENVS.items():
        if table_id == gym_id:
            return name
    return re.sub(r"[^a-z0-9]", "", re.sub(r"-v\d+$", "", gym_id.split("/")[-1]).lower())


def resolve_request(args: Args) -> Tuple[str, str, List[str]]:
    """--env-id / --gym-id / --qualities -> (env name, Gymnasium id, qualities), with one-sentence errors."""
    qualities = list(args.qualities)
    if args.env_id is not None:
        parsed = parse_d4rl_name(args.env_id)
        if parsed is not None and parsed[0] not in GYM_ENVS:
            # antmaze and adroit data come from D4RL's planners and human demonstrations, not from a SAC agent
            port = f"D4RL/antmaze/{parsed[1]}-v1" if parsed[0] == "antmaze" else f"D4RL/{parsed[0]}/{parsed[1]}-v2"
            fail(f"{args.env_id} cannot be generated here (D4RL made it with planners or human demonstrations); "
                 f"use Minari's hosted port {port}, which `python pretrain_offline.py --env-id {args.env_id}` "
                 f"downloads, or `minari download {port}`")
        if parsed is None:
            fail(f"make_dataset.py cannot make {args.env_id!r}; name it {{env}}-{{quality}}-v{{k}} with env in "
                 f"{', '.join(GYM_ENVS)} and quality in {', '.join(QUALITIES)}, or pass --gym-id")
        if version_error(args.env_id):
            fail(version_error(args.env_id))
        env_name, quality = parsed
        gym_id = GYM_ENVS[env_name][0]
        if args.gym_id is not None and args.gym_id != gym_id:
            fail(f"--env-id {args.env_id} means {gym_id}, not --gym-id {args.gym_id}; pass only one of them")
        qualities = [quality, *qualities]
    elif args.gym_id is not None:
        gym_id, env_name = args.gym_id, env_name_of(args.gym_id)
        qualities = qualities or ["random", "medium", "medium-replay"]
    else:
        fail("say what to make: --env-id hopper-medium-v2, --gym-id Hopper-v5 --qualities ..., or --from-d4rl FILE")
    unknown = [quality for quality in qualities if quality not in QUALITIES]
    if unknown:
        fail(f"unknown quality {unknown[0]!r}; choose from {', '.join(QUALITIES)}")
    return env_name, gym_id, [quality for quality in QUALITIES if quality in qualities]


def make_checked_env(gym_id: str, seed: int) -> gym.Env:
    """make_env, with one-sentence errors for unknown ids and for spaces this script cannot handle."""
    try:
        env = make_env(gym_id, {}, seed)
    except gym.error.Error as exc:
        fail(f"{gym_id!r} is not a Gymnasium environment here ({type(exc).__name__}); pass an id such as Hopper-v5")
    for what, space in (("actions", env.action_space), ("observations", env.observation_space)):
        if not (isinstance(space, gym.spaces.Box) and len(space.shape) == 1):
            fail(f"{gym_id} has {type(space).__name__} {what} of shape {space.shape}; make_dataset.py trains a SAC "
                 f"agent, which needs continuous (Box) actions and flat Box observations")
    return env


def minari_store() -> Path:
    """The Minari store's folder, as minari finds it, without minari's makedirs (a traceback on a blocked place)."""
    return Path(os.environ.get("MINARI_DATASETS_PATH") or os.path.join(os.path.expanduser("~"), ".minari", "datasets"))


def check_free(dataset_ids: List[str], overwrite: bool):
    """Refuses to replace an existing dataset unless --overwrite, before any time is spent."""
    for dataset_id in dataset_ids:
        if (minari_store() / dataset_id).exists() and not overwrite:
            fail(f"{dataset_id} already exists in {minari_store()}; pass --overwrite to replace it")


def check_room_for_datasets(store: Path, env: gym.Env, qualities: List[str], args: Args):
    """Before any training or collection: room in the store for the datasets asked for (--transitions steps each,
    medium-replay at most --total-timesteps), twice over for HDF5's overhead and the staged copy."""
    row = 4 * (flatten_obs(env.observation_space.sample()).size + env.action_space.shape[0] + 3)
    steps = sum(args.total_timesteps if quality == "medium-replay" else args.transitions for quality in qualities)
    steps += args.transitions if "medium-expert" in qualities else 0  # medium and expert both go in
    check_writable(str(store), "MINARI_DATASETS_PATH", 2 * row * steps)


def check_reference_scores(gym_id: str, env_name: str, qualities: List[str], expert_return: Optional[float]):
    """Every dataset stores reference scores; an env without D4RL's needs the trained agent's return or
    --expert-return, so a run that trains no agent must be given it before anything is collected."""
    if GYM_ENVS.get(env_name, (None, None))[1] is None and expert_return is None and qualities == ["random"]:
        fail(f"{gym_id} has no D4RL reference scores and random data trains no agent whose return could serve as the "
             f"expert reference; pass --expert-return R (a trained agent's return) or add a quality such as medium")


def import_d4rl(args: Args, datasets: dict, descriptions: dict):
    """--from-d4rl: the original file's transitions as d4rl/{env}/{quality}-v2; returns its gym id and D4RL's
    reference scores."""
    env_name, quality = d4rl_name_of(args.from_d4rl, args.env_id)
    gym_id, ref_min, ref_max = GYM_ENVS[env_name]
    dataset_id = f"d4rl/{env_name}/{quality}-v2"
    check_free([dataset_id], args.overwrite)
    raw = read_d4rl_file(args.from_d4rl)
    env = make_checked_env(gym_id, args.seed)
    for key, space in (("observations", env.observation_space), ("actions", env.action_space)):
        if raw[key].ndim != 2 or raw[key].shape[1] != space.shape[0]:
            fail(f"{args.from_d4rl} has {key} of shape {raw[key].shape[1:]} but {gym_id} has {space.shape}; "
                 f"this file cannot be used on {gym_id}")
    datasets[dataset_id] = to_episodes(d4rl_transitions(raw))
    descriptions[dataset_id] = ("D4RL", f"D4RL's {env_name}-{quality}-v2 data imported from "
                                        f"{os.path.basename(args.from_d4rl)}; D4RL's reference scores")
    print(f"importing {args.from_d4rl} as {dataset_id} ({len(raw['rewards'])} transitions in the file)")
    return gym_id, ref_min, ref_max


# --- original D4RL files ---
def d4rl_name_of(path: str, env_id: Optional[str]) -> Tuple[str, str]:
    """(env, quality) from --env-id or from D4RL's file name (`hopper_medium_replay-v2.hdf5`)."""
    if not os.path.isfile(path):
        fail(f"{path} does not exist; pass the path of an original D4RL .hdf5 file")
    name = env_id or re.sub(r"\.(hdf5|h5)$", "", os.path.basename(path)).replace("_", "-")
    parsed = parse_d4rl_name(name)
    if parsed is None or parsed[0] not in D4RL_LOCOMOTION:
        fail(f"cannot tell which D4RL dataset {path} holds; pass --env-id {{env}}-{{quality}}-v2 with env in "
             f"{', '.join(D4RL_LOCOMOTION)} and quality in {', '.join(QUALITIES)}")
    return parsed


def read_d4rl_file(path: str) -> Dict[str, np.ndarray]:
    """The flat arrays of an original D4RL hdf5 file, read whole and checked (keys, numeric types, one row per
    transition, finite values, 0/1 flags) before anything in the store is touched."""
    try:
        file = h5py.File(path, "r")
    except OSError:
        fail(f"{path} is not an HDF5 file; pass an original D4RL .hdf5 file")
    with file:
        missing = [key for key in D4RL_KEYS if not isinstance(file.get(key), h5py.Dataset)]
        if missing:
            fail(f"{path} lacks {', '.join(missing)}; a D4RL file holds {', '.join(D4RL_KEYS)}")
        keys = D4RL_KEYS + (("next_observations",) if isinstance(file.get("next_observations"), h5py.Dataset) else ())
        try:
            raw = {key: np.asarray(file[key][()]) for key in keys}
        except (OSError, TypeError, ValueError) as exc:
            fail(f"{path} cannot be read ({type(exc).__name__}); pass an intact original D4RL .hdf5 file")
    for key, value in raw.items():
        if not (np.issubdtype(value.dtype, np.number) or value.dtype == bool):
            fail(f"{path} holds {key} of type {value.dtype} where D4RL has numbers; pass an original D4RL .hdf5 file")
    size = len(raw["observations"]) if raw["observations"].ndim == 2 else 0
    for key, value in raw.items():
        if value.ndim == 0 or len(value) != size:
            fail(f"{path} holds {size} observations but {value.size if value.ndim == 0 else len(value)} {key}; "
                 f"every array of a D4RL file has one row per transition")
    if size == 0:
        fail(f"{path} holds no transitions; pass a D4RL file with data in it")
    for key in ("rewards", "terminals", "timeouts"):
        if raw[key].size != size:
            fail(f"{path} holds {key} of shape {raw[key].shape}; D4RL has one value per transition")
        raw[key] = raw[key].reshape(size)
    for key, value in raw.items():
        if key in ("terminals", "timeouts") and not np.isin(value, (0, 1)).all():
            fail(f"{path} holds {key} other than 0 and 1; pass an original D4RL .hdf5 file")
        if not np.isfinite(value).all():
            fail(f"{path} holds non-finite {key} (nan or inf); pass an intact original D4RL .hdf5 file")
    return raw


def d4rl_transitions(raw: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """D4RL's arrays as our transitions. Episodes end at terminals or timeouts. With next_observations everything is
    kept. Without it the observation after an episode's last step is unknown: a terminal step keeps its own
    observation as the next one (a terminal is never bootstrapped from), and the last step of an episode that timed
    out or that the file cuts off is dropped, as D4RL's own loaders do, so the step before it ends truncated."""
    terminals, timeouts = raw["terminals"].astype(bool), raw["timeouts"].astype(bool)
    data = dict(observations=raw["observations"], actions=raw["actions"], rewards=raw["rewards"],
                terminations=terminals, truncations=timeouts)
    if "next_observations" in raw:
        return dict(data, next_observations=raw["next_observations"])
    observations = raw["observations"]
    next_observations = np.concatenate([observations[1:], observations[-1:]])
    next_observations[terminals] = observations[terminals]
    ends = terminals | timeouts
    ends[-1] = True
    dropped = ends & ~terminals
    before = np.flatnonzero(dropped) - 1
    before = before[(before >= 0) & ~ends[np.maximum(before, 0)]]  # only when it is in the same episode
    truncations = timeouts.copy()
    truncations[before] = True
    data = dict(data, truncations=truncations, next_observations=next_observations)
    return {key: value[~dropped] for key, value in data.items()}


# --- writing into the Minari store: build everything aside, then swap it in at once ---
# A run builds its datasets in {store}/.make_dataset-{WRITER}/new. The swap moves each dataset it replaces to .../old
# and the new one into place, and `swap` lists the ids while it runs: a run killed outright (SIGKILL, power loss) in
# the middle leaves that list, and the next run of its host (or any, a week later) puts the old datasets back.
@contextlib.contextmanager
def interrupts_held():
    """Ctrl-C (SIGINT), SIGTERM and SIGHUP during the block are remembered and take effect when it is done. (Handlers, not
    pthread_sigmask: a signal blocked in this thread would be handed to another one, e.g. TensorBoard's writer.)"""
    received = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in received:
            signal.raise_signal(signum)


def roll_back(store: Path, staging: Path, dataset_ids: List[str]):
    """Undoes a swap that did not finish: every replaced dataset goes back, every new one goes away."""
    for dataset_id in dataset_ids:
        target, backup = store / dataset_id, staging / "old" / dataset_id
        if backup.exists():
            if target.exists():
                shutil.rmtree(target)  # the replacement had moved in
            os.rename(backup, target)
        elif target.exists() and not (staging / "new" / dataset_id).exists():
            shutil.rmtree(target)  # moved in where no dataset was before


def recover_killed_writes(store: Path):
    """Cleans up after runs that were killed outright while writing: datasets they were replacing are restored."""
    for staging in sorted(store.glob(".make_dataset-*")):
        if not (match := STAGING.fullmatch(staging.name)) or not left_by_dead_writer(str(staging), match):
            continue  # another run at work (here or on another node sharing this store)
        swap = staging / "swap"
        with interrupts_held():
            if swap.exists():
                dataset_ids = swap.read_text().split()
                try:
                    roll_back(store, staging, dataset_ids)
                except OSError as exc:
                    fail(f"a killed make_dataset.py run left {', '.join(dataset_ids)} half-replaced and they could "
                         f"not be restored ({exc.strerror}); move the folders under {staging / 'old'} back by hand")
                swap.unlink()
                print(f"restored {', '.join(dataset_ids)}, which a killed make_dataset.py run (process "
                      f"{staging.name.partition('-')[2]}) was replacing", flush=True)
        shutil.rmtree(staging, ignore_errors=True)


def stage_dataset(folder: Path, dataset_id: str, episodes: List[EpisodeBuffer], env_spec, ref_min: float,
                  ref_max: float, algorithm_name: str, description: str):
    """minari.create_dataset_from_buffers into `folder` instead of the store."""
    saved_root, saved_stderr = os.environ.get("MINARI_DATASETS_PATH"), os.dup(2)
    # a failed write (a full disk) makes every h5py object of the file print a traceback as it is freed, hundreds:
    # while HDF5 writes, stderr goes nowhere, and the failure is reported once, by the caller
    sys.stderr.flush()
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        os.environ["MINARI_DATASETS_PATH"] = str(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Minari asks for an author, e-mail and code link that we cannot know
            minari.create_dataset_from_buffers(dataset_id, episodes, env=env_spec, eval_env=env_spec,
                                               algorithm_name=algorithm_name, description=description,
                                               ref_min_score=float(ref_min), ref_max_score=float(ref_max))
    finally:
        sys.stderr.flush()
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        os.environ.pop("MINARI_DATASETS_PATH", None)
        if saved_root is not None:
            os.environ["MINARI_DATASETS_PATH"] = saved_root


def swap_in(store: Path, staging: Path, dataset_ids: List[str], overwrite: bool = True):
    """Moves the staged datasets into the store, replacing the old ones only with --overwrite, all or none, with
    Ctrl-C held back. Without --overwrite a dataset that another run wrote meanwhile is never replaced: a folder is
    not renamed over a non-empty one, so the refusal holds at the rename itself; this run's datasets are kept aside."""
    with interrupts_held():
        try:
            (staging / "swap").write_text("\n".join(dataset_ids))
            for dataset_id in dataset_ids:
                target, backup = store / dataset_id, staging / "old" / dataset_id
                if target.exists() and not overwrite:
                    raise FileExistsError(errno.EEXIST, "written by another run meanwhile", str(target))
                if target.exists():
                    backup.parent.mkdir(parents=True, exist_ok=True)
                    os.rename(target, backup)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.rename(staging / "new" / dataset_id, target)
        except OSError as exc:
            roll_back(store, staging, dataset_ids)  # should this fail too, `swap` stays for the next run
            (staging / "swap").unlink(missing_ok=True)
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and not overwrite:
                kept = store / f".kept-{os.getpid()}"
                os.rename(staging / "new", kept)
                fail(f"{exc.filename} was written by another run while this one worked, so nothing was replaced; this "
                     f"run's datasets are kept in {kept} (move them into the store by hand to use them)")
            removed = isinstance(exc, FileNotFoundError) and str(staging) in str(exc.filename)
            fail(REMOVED.format(staging) if removed else f"could not move the new datasets into {store} "
                 f"({exc.strerror or type(exc).__name__}); the datasets there were kept as they were")
        (staging / "swap").unlink()  # done: from here on the backups are garbage
    for namespace in sorted({dataset_id.rsplit("/", 1)[0] for dataset_id in dataset_ids}):
        if namespace not in list_local_namespaces():
            with contextlib.suppress(ValueError):  # created meanwhile by another process
                create_namespace(namespace)


def abandon(message: str):
    """fail() after a failed HDF5 write: h5py's objects for the broken file crash the interpreter's teardown (a
    segmentation fault after pages of tracebacks), so the process ends here without one, after its one sentence."""
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(1)


def write_datasets(store: Path, datasets: Dict[str, List[EpisodeBuffer]], descriptions: Dict[str, Tuple[str, str]],
                   env_spec, ref_min: float, ref_max: float, overwrite: bool = True):
    """Builds every dataset aside, then swaps them all in: a failed or interrupted run changes nothing in the
    store, and a dataset being overwritten stays intact until its replacement is complete."""
    staging = store / f".make_dataset-{WRITER}"
    size = sum(array.nbytes for episodes in datasets.values() for episode in episodes
               for array in (episode.observations, episode.actions, episode.rewards))
    check_writable(str(store), "MINARI_DATASETS_PATH", 2 * size + (16 << 20))  # HDF5's overhead: under 2x
    try:
        try:
            for dataset_id, episodes in datasets.items():
                print(f"writing {dataset_id} ({len(episodes)} episodes)", flush=True)
                stage_dataset(staging / "new", dataset_id, episodes, env_spec, ref_min, ref_max,
                              *descriptions[dataset_id])
        except Exception as exc:  # h5py reports a full disk as an OSError, a ValueError or a RuntimeError
            reason = "No space left on device" if "errno = 28" in str(exc) else (
                getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0][:200])
            removed = isinstance(exc, FileNotFoundError)  # a folder of this run's staging is gone
            shutil.rmtree(staging, ignore_errors=True)
            abandon(REMOVED.format(staging) if removed else f"could not write the datasets into {staging} ({reason}); "
                    "the store was left as it was: free some space and run again")
        swap_in(store, staging, list(datasets), overwrite)
    finally:
        if not (staging / "swap").exists():  # else a failed roll-back left the old datasets there
            shutil.rmtree(staging, ignore_errors=True)


def summary_table(datasets: Dict[str, List[EpisodeBuffer]], ref_min: float, ref_max: float) -> str:
    lines = [f"| {'dataset':<32} | episodes | transitions | mean return | normalized score |",
             f"| {'-' * 32} | -------- | ----------- | ----------- | ---------------- |"]
    for dataset_id, episodes in datasets.items():
        returns = np.array([float(np.sum(episode.rewards)) for episode in episodes])
        transitions = sum(len(episode.rewards) for episode in episodes)
        score = normalized_score(returns.mean(), ref_min, ref_max)
        lines.append(f"| {dataset_id:<32} | {len(episodes):>8} | {transitions:>11} | {returns.mean():>11.1f} | "
                     f"{score:>16.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    handle_interrupts()
    main(tyro.cli(Args))
