"""D4RL-style offline datasets for any Gymnasium env, written in Minari format; import of original D4RL files.

    python make_dataset.py --env-id hopper-medium-replay-v2
    python make_dataset.py --gym-id Pendulum-v1 --qualities random medium medium-replay --sac-steps 20000
    python make_dataset.py --from-d4rl hopper_medium-v2.hdf5

The recipe is D4RL's (Fu et al. 2020): one SAC behaviour agent is trained online. `random` is a uniform random
policy; `medium` is the agent's snapshot when its evaluation return first reaches a third of the way from the random
to the expert reference return; `medium-replay` is every transition of its replay buffer up to that snapshot;
`expert` is the fully trained agent; `medium-expert` is medium followed by expert. Each dataset is written as
`local/{env}/{quality}-v0` (imports: `d4rl/{env}/{quality}-v2`) with reference scores in its metadata, so
`minari.get_normalized_score` and the pretraining and online scripts report D4RL-normalized scores.
"""
import copy
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections import deque
from dataclasses import dataclass
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
from minari.storage.datasets_root_dir import get_dataset_path
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
    sac_steps: int = 1_000_000
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
    lr: float = 3e-4
    """learning rate of actor, critics and entropy temperature"""
    cuda: bool = True
    """train on CUDA when it is available"""


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


ACCEPTED_IDS = (
    "a Minari dataset id such as mujoco/hopper/medium-v0, or a D4RL-style name {env}-{quality}-v{k} with env in "
    f"{', '.join(GYM_ENVS)} and quality in {', '.join(QUALITIES)}, or antmaze-{{{','.join(ANTMAZE_TASKS)}}}-v2, "
    f"or {{{','.join(ADROIT_ENVS)}}}-{{{','.join(ADROIT_QUALITIES)}}}-v1"
)
# --- end shared ---


# --- shared: environment ---
def fail(message: str):
    """Stops the script with one sentence for the user and a non-zero exit status, without a traceback."""
    raise SystemExit(f"error: {message}")


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


# --- shared: checks, logs and progress ---
def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def check_numbers(args, positive=(), non_negative=(), unit_interval=()):
    """Numeric flags are checked where they enter, before any work: one sentence names the flag and its range."""
    rules = ((positive, lambda v: v > 0, "positive"), (non_negative, lambda v: v >= 0, "zero or more"),
             (unit_interval, lambda v: 0 <= v <= 1, "in [0, 1]"))
    for fields, allowed, what in rules:
        for field in fields:
            value = getattr(args, field)
            values = list(value) if isinstance(value, (tuple, list)) else [value]
            if value is not None and not (values and all(math.isfinite(v) and allowed(v) for v in values)):
                fail(f"{flag(field)} is {value} but must be {what}" + (" (each value)" if len(values) > 1 else ""))


def check_writable(directory: str, flag_name: str):
    """Finds out before any training or collection whether outputs can be written to `directory` (made if missing),
    so that a read-only or blocked place costs a one-line error instead of the finished work."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        fail(f"cannot write to {directory} ({exc.strerror or type(exc).__name__}); choose another place with {flag_name}")


def exit_quietly_on_interrupt(exc_type, exc, traceback):
    """sys.excepthook: Ctrl-C anywhere ends with one line and exit status 130 instead of a traceback."""
    if issubclass(exc_type, KeyboardInterrupt):
        print("interrupted; nothing half-written was left behind", file=sys.stderr, flush=True)
        raise SystemExit(130)
    sys.__excepthook__(exc_type, exc, traceback)


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


# --- shared: networks ---
def mlp(dims, output_activation: Optional[nn.Module] = None) -> nn.Sequential:
    layers = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
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
        return torch.baddbmm(self.bias, x, self.weight)


class CriticEnsemble(nn.Module):
    """N Q-functions evaluated in one call: forward(obs [B, o], action [B, a]) -> Q values [N, B]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims, num_critics: int):
        super().__init__()
        dims = [obs_dim + act_dim, *hidden_dims]
        layers = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [VectorizedLinear(d_in, d_out, num_critics), nn.ReLU()]
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
        self.trunk = mlp([obs_dim, *hidden_dims], output_activation=nn.ReLU())
        self.mean = nn.Linear(hidden_dims[-1], act_dim)
        self.log_std = nn.Linear(hidden_dims[-1], act_dim)

    def forward(self, obs: torch.Tensor):
        """Returns a reparameterised sample, its log-probability and the deterministic action tanh(mean)."""
        hidden = self.trunk(obs)
        mean, log_std = self.mean(hidden), self.log_std(hidden).clamp(-5.0, 2.0)
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


D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
D4RL_LOCOMOTION = tuple(name for name, (_, ref_min, _) in GYM_ENVS.items() if ref_min is not None)


class Progress:
    """Prints `[label] done/total, rate, ETA` at most every `every` seconds (and when forced)."""

    def __init__(self, label: str, total: int, every: float = 10.0):
        self.label, self.total, self.every = label, total, every
        self.last, self.last_done = time.time(), 0

    def update(self, done: int, extra: str = "", force: bool = False):
        now = time.time()
        if not force and (done == self.last_done or (now - self.last < self.every and done < self.total)):
            return
        rate = (done - self.last_done) / max(now - self.last, 1e-9)  # recent rate: warm-up phases run faster
        eta = (self.total - done) / max(rate, 1e-9)
        self.last, self.last_done = now, done
        print(f"[{self.label}] {done}/{self.total}  {rate:.0f}/s  ETA {format_seconds(eta)}  {extra}".rstrip(),
              flush=True)


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


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
        if parsed is None or parsed[0] not in GYM_ENVS:
            fail(f"make_dataset.py cannot make {args.env_id!r}; name it {{env}}-{{quality}}-v{{k}} with env in "
                 f"{', '.join(GYM_ENVS)} and quality in {', '.join(QUALITIES)}, or pass --gym-id")
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
    if min(args.transitions, args.sac_steps, args.eval_freq, args.eval_episodes, args.ref_episodes) < 1:
        fail("--transitions, --sac-steps, --eval-freq, --eval-episodes and --ref-episodes must be at least 1")
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
    obs_space, act_space = env.observation_space, env.action_space
    if not (isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) == 1
            and isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1):
        fail(f"{gym_id} has {obs_space} observations and {act_space} actions; make_dataset.py needs flat Box spaces")
    return env


def check_free(dataset_ids: List[str], overwrite: bool):
    """Refuses to replace an existing dataset unless --overwrite, before any time is spent."""
    for dataset_id in dataset_ids:
        if get_dataset_path(dataset_id).exists() and not overwrite:
            fail(f"{dataset_id} already exists in {get_dataset_path()}; pass --overwrite to replace it")


class UniformRandomPolicy:
    """D4RL's random policy: actions uniform over the action space (in the networks' [-1, 1] scale)."""

    def __init__(self, act_dim: int, seed: int):
        self.act_dim = act_dim
        self.generator = torch.Generator().manual_seed(seed)

    def act(self, obs: torch.Tensor, deterministic: bool) -> torch.Tensor:
        return torch.rand(obs.shape[0], self.act_dim, generator=self.generator).to(obs.device) * 2.0 - 1.0


class TransitionStore:
    """Preallocated transitions in the order they happened: the SAC replay buffer, and every collected dataset.
    Actions are kept in the networks' [-1, 1] scale; `arrays` hands them out in the environment's scale."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int):
        self.observations = np.zeros((capacity, obs_dim), np.float32)
        self.next_observations = np.zeros((capacity, obs_dim), np.float32)
        self.actions = np.zeros((capacity, act_dim), np.float32)
        self.rewards = np.zeros(capacity, np.float32)
        self.terminations = np.zeros(capacity, bool)
        self.truncations = np.zeros(capacity, bool)
        self.size = 0

    def add(self, obs, action, reward, next_obs, terminated, truncated):
        i = self.size
        self.observations[i], self.actions[i], self.rewards[i] = obs, action, reward
        self.next_observations[i], self.terminations[i], self.truncations[i] = next_obs, terminated, truncated
        self.size += 1

    def sample(self, batch_size: int, device: torch.device):
        idx = np.random.randint(0, self.size, batch_size)
        arrays = (self.observations, self.actions, self.rewards, self.next_observations, self.terminations)
        return tuple(torch.as_tensor(x[idx], dtype=torch.float32, device=device) for x in arrays)

    def arrays(self, end: int, low: np.ndarray, high: np.ndarray) -> Dict[str, np.ndarray]:
        return dict(observations=self.observations[:end], next_observations=self.next_observations[:end],
                    actions=to_env_action(self.actions[:end], low, high).astype(np.float32),
                    rewards=self.rewards[:end], terminations=self.terminations[:end],
                    truncations=self.truncations[:end])


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


def act_numpy(policy, obs: np.ndarray, deterministic: bool, device: torch.device) -> np.ndarray:
    with torch.no_grad():
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device).unsqueeze(0)
        return policy.act(obs_t, deterministic)[0].cpu().numpy()


def collect(env: gym.Env, policy, transitions: int, deterministic: bool, seed: int, label: str,
            device: torch.device) -> Dict[str, np.ndarray]:
    """Runs `policy` for exactly `transitions` steps, resetting at episode ends (D4RL's collection)."""
    low, high = env.action_space.low, env.action_space.high
    store = TransitionStore(transitions, env.observation_space.shape[0], env.action_space.shape[0])
    progress = Progress(label, transitions)
    obs, _ = env.reset(seed=seed)
    for step in range(1, transitions + 1):
        action = act_numpy(policy, obs, deterministic, device)
        next_obs, reward, terminated, truncated, _ = env.step(to_env_action(action, low, high))
        store.add(obs, action, reward, next_obs, terminated, truncated)
        obs = next_obs if not (terminated or truncated) else env.reset()[0]
        progress.update(step)
    return store.arrays(store.size, low, high)


def sac_update(batch, actor, critic, critic_target, log_alpha, optimizers, gamma: float, target_entropy: float):
    """One SAC step (Haarnoja et al. 2018): twin-critic soft Bellman backup, reparameterised actor, and automatic
    entropy tuning towards `target_entropy`."""
    obs, actions, rewards, next_obs, terminations = batch
    actor_optimizer, critic_optimizer, alpha_optimizer = optimizers
    alpha = log_alpha.exp().detach()
    with torch.no_grad():
        next_actions, next_log_prob, _ = actor(next_obs)
        next_q = critic_target(next_obs, next_actions).min(0).values - alpha * next_log_prob
        target = rewards + gamma * (1.0 - terminations) * next_q
    critic_loss = (critic(obs, actions) - target).pow(2).mean(1).sum()
    critic_optimizer.zero_grad(set_to_none=True)
    critic_loss.backward()
    critic_optimizer.step()

    new_actions, log_prob, _ = actor(obs)
    actor_loss = (alpha * log_prob - critic(obs, new_actions).min(0).values).mean()
    actor_optimizer.zero_grad(set_to_none=True)
    actor_loss.backward()
    actor_optimizer.step()

    alpha_loss = -(log_alpha * (log_prob.detach() + target_entropy)).mean()
    alpha_optimizer.zero_grad(set_to_none=True)
    alpha_loss.backward()
    alpha_optimizer.step()


def train_behaviour_agent(args: Args, env: gym.Env, eval_env: gym.Env, stop_return: Optional[float],
                          device: torch.device):
    """Online SAC on `env`. Every --eval-freq steps and at the end, the deterministic policy is evaluated and a
    snapshot (step, mean return, actor weights) kept. Stops at the first evaluation reaching `stop_return`
    (None: runs the whole budget). Returns the final actor, the replay buffer and the snapshots."""
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    actor = TanhGaussianActor(obs_dim, act_dim, args.hidden_dims).to(device)
    critic = CriticEnsemble(obs_dim, act_dim, args.hidden_dims, num_critics=2).to(device)
    critic_target = copy.deepcopy(critic).requires_grad_(False)
    log_alpha = torch.zeros(1, device=device, requires_grad=True)
    optimizers = (torch.optim.Adam(actor.parameters(), lr=args.lr), torch.optim.Adam(critic.parameters(), lr=args.lr),
                  torch.optim.Adam([log_alpha], lr=args.lr))
    warmup = UniformRandomPolicy(act_dim, args.seed)
    replay = TransitionStore(args.sac_steps, obs_dim, act_dim)
    snapshots, recent_returns, episode_return = [], deque(maxlen=10), 0.0
    progress = Progress("sac", args.sac_steps)

    obs, _ = env.reset(seed=args.seed)
    for step in range(1, args.sac_steps + 1):
        action = act_numpy(warmup if step <= args.learning_starts else actor, obs, False, device)
        next_obs, reward, terminated, truncated, _ = env.step(to_env_action(action, low, high))
        replay.add(obs, action, reward, next_obs, terminated, truncated)
        episode_return += float(reward)
        obs = next_obs
        if terminated or truncated:
            recent_returns.append(episode_return)
            obs, episode_return = env.reset()[0], 0.0

        if step > args.learning_starts:
            sac_update(replay.sample(args.batch_size, device), actor, critic, critic_target, log_alpha, optimizers,
                       args.gamma, -float(act_dim))
            with torch.no_grad():
                for target_param, param in zip(critic_target.parameters(), critic.parameters()):
                    target_param.lerp_(param, args.tau)

        training = f"episode return {np.mean(recent_returns):.1f}" if recent_returns else ""
        if step % args.eval_freq == 0 or step == args.sac_steps:
            returns, _, _ = evaluate(actor, eval_env, 0.0, 1.0, args.eval_episodes, args.seed + 10_000, device)
            weights = {key: value.detach().clone() for key, value in actor.state_dict().items()}
            snapshots.append((step, float(returns.mean()), weights))
            progress.update(step, f"{training}  eval return {returns.mean():.1f}", force=True)
            if stop_return is not None and returns.mean() >= stop_return:
                print(f"[sac] reached the medium return {stop_return:.1f} at step {step}; nothing needs more training")
                break
        progress.update(step, training)
    return actor, replay, snapshots


def medium_snapshot(snapshots, medium_return: float):
    """The first snapshot whose evaluation return reaches `medium_return`; if none does, the best one (warned)."""
    for snapshot in snapshots:
        if snapshot[1] >= medium_return:
            return snapshot
    best = max(snapshots, key=lambda snapshot: snapshot[1])
    print(f"warning: no evaluation reached the medium return {medium_return:.1f}; medium uses the best snapshot "
          f"(step {best[0]}, return {best[1]:.1f}); raise --sac-steps or lower --medium-return for D4RL's medium")
    return best


def d4rl_name_of(path: str, env_id: Optional[str]) -> Tuple[str, str]:
    """(env, quality) from --env-id or from D4RL's file name (`hopper_medium_replay-v2.hdf5`)."""
    name = env_id or re.sub(r"\.(hdf5|h5)$", "", os.path.basename(path)).replace("_", "-")
    parsed = parse_d4rl_name(name)
    if parsed is None or parsed[0] not in D4RL_LOCOMOTION:
        fail(f"cannot tell which D4RL dataset {path} holds; pass --env-id {{env}}-{{quality}}-v2 with env in "
             f"{', '.join(D4RL_LOCOMOTION)} and quality in {', '.join(QUALITIES)}")
    return parsed


def read_d4rl_file(path: str) -> Dict[str, np.ndarray]:
    """The flat arrays of an original D4RL hdf5 file, checked for the keys and lengths D4RL's format has."""
    if not os.path.isfile(path):
        fail(f"{path} does not exist; pass the path of an original D4RL .hdf5 file")
    try:
        file = h5py.File(path, "r")
    except OSError:
        fail(f"{path} is not an HDF5 file; pass an original D4RL .hdf5 file")
    with file:
        missing = [key for key in D4RL_KEYS if key not in file]
        if missing:
            fail(f"{path} lacks {', '.join(missing)}; a D4RL file holds {', '.join(D4RL_KEYS)}")
        keys = D4RL_KEYS + (("next_observations",) if "next_observations" in file else ())
        raw = {key: np.asarray(file[key][()]) for key in keys}
    size = len(raw["observations"]) if raw["observations"].ndim == 2 else 0
    for key, value in raw.items():
        if value.ndim == 0 or len(value) != size:
            fail(f"{path} holds {size} observations but {value.size if value.ndim == 0 else len(value)} {key}; "
                 f"every array of a D4RL file has one row per transition")
    if size == 0:
        fail(f"{path} holds no transitions; pass a D4RL file with data in it")
    for key in ("rewards", "terminals", "timeouts"):
        raw[key] = raw[key].reshape(size)
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


def write_dataset(dataset_id: str, episodes: List[EpisodeBuffer], env_spec, ref_min: float, ref_max: float,
                  algorithm_name: str, description: str):
    """Writes with minari.create_dataset_from_buffers into a hidden staging folder of the Minari store and moves
    the finished dataset into place with one rename: an interrupted or failed run leaves nothing half-written,
    and a dataset being overwritten stays intact until its replacement is complete."""
    root = get_dataset_path()
    staging = root / f".make_dataset-{os.getpid()}"
    saved_root = os.environ.get("MINARI_DATASETS_PATH")
    try:
        os.environ["MINARI_DATASETS_PATH"] = str(staging / "new")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Minari asks for an author, e-mail and code link that we cannot know
            minari.create_dataset_from_buffers(dataset_id, episodes, env=env_spec, eval_env=env_spec,
                                               algorithm_name=algorithm_name, description=description,
                                               ref_min_score=float(ref_min), ref_max_score=float(ref_max))
        target = root / dataset_id
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            os.rename(target, staging / "old")
        os.rename(staging / "new" / dataset_id, target)
    finally:
        os.environ.pop("MINARI_DATASETS_PATH", None)
        if saved_root is not None:
            os.environ["MINARI_DATASETS_PATH"] = saved_root
        shutil.rmtree(staging, ignore_errors=True)
    namespace = dataset_id.rsplit("/", 1)[0]
    if namespace not in list_local_namespaces():
        try:
            create_namespace(namespace)
        except ValueError:  # created meanwhile by another process
            pass


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
    args = tyro.cli(Args)
    start_time = time.time()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    datasets: Dict[str, List[EpisodeBuffer]] = {}  # dataset id -> episodes, in the order they are written
    descriptions: Dict[str, Tuple[str, str]] = {}  # dataset id -> (algorithm name, description)

    if args.from_d4rl is not None:
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
    else:
        env_name, gym_id, qualities = resolve_request(args)
        check_free([f"local/{env_name}/{quality}-v0" for quality in qualities], args.overwrite)
        env = make_checked_env(gym_id, args.seed)
        act_dim = env.action_space.shape[0]
        print(f"making {', '.join(qualities)} for {gym_id} as local/{env_name}/{{quality}}-v0 on {device}")
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
        needs_agent = any(quality != "random" for quality in qualities)
        needs_expert = "expert" in qualities or "medium-expert" in qualities or ref_max is None

        if needs_agent:
            eval_env = make_checked_env(gym_id, args.seed + 10_000)
            actor, replay, snapshots = train_behaviour_agent(args, make_checked_env(gym_id, args.seed), eval_env,
                                                             None if needs_expert else medium_return, device)
            final_step, final_return, _ = snapshots[-1]
            if ref_max is None:
                expert_returns, _, _ = evaluate(actor, eval_env, 0.0, 1.0, args.ref_episodes, args.seed + 30_000,
                                                device)
                ref_max = float(expert_returns.mean())
                print(f"trained agent: mean return {ref_max:.1f} over {args.ref_episodes} episodes (reference maximum)")
                if ref_max <= ref_min:
                    print("warning: the trained agent is no better than the random policy, so normalized scores mean "
                          "nothing; raise --sac-steps or pass --expert-return")
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

    for dataset_id, episodes in datasets.items():
        print(f"writing {dataset_id} ({len(episodes)} episodes)", flush=True)
        # the registered spec: env.spec would carry make_env's render_mode=None into the dataset's kwargs
        write_dataset(dataset_id, episodes, gym.spec(gym_id), ref_min, ref_max, *descriptions[dataset_id])
    elapsed = format_seconds(time.time() - start_time)
    print(f"\nreference scores: min {ref_min:.2f}, max {ref_max:.2f}; done in {elapsed}")
    print(summary_table(datasets, ref_min, ref_max))
