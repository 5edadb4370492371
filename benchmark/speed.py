"""How fast the scripts are, in two modes.

`--mode update` (the default): updates per second of the scripts' own update code, side by side in one process,
against a straightforward PyTorch SAC update (two separate nn.Sequential critics, default Adam): the reference
every ratio is taken against.

    python benchmark/speed.py                          # every device present (CPU, and CUDA where there is one)
    python benchmark/speed.py --devices cpu --seconds 3 --rounds 5 --threads 2   # on an otherwise idle machine
    python benchmark/speed.py --devices cpu --no-online --pretrain-baseline /tmp/old.py   # pretraining, before/after

`--mode loop`: what a user waits for. Each online script runs as a whole process on Hopper-v5 (environment steps,
replay, updates, one evaluation episode at the end) from a checkpoint made for the purpose, in turns over
`--rounds` rounds, optionally beside CleanRL's `sac_continuous_action.py` doing the same steps and updates
(`--cleanrl PATH`, a copy of that file from github.com/vwxyzjn/cleanrl); the table gives the median wall and CPU
time of each and the ratios.

    python benchmark/speed.py --mode loop --loop-steps 8000 --rounds 3 --cleanrl ~/cleanrl/cleanrl/sac_continuous_action.py

Measured: samg_sac / samg_td3 / samg_awac / samg_iql, one full update (critic, adaptive C-VAE step, actor, targets) with
--coef-mode cvae (adaptive, the default) and --coef-mode none (no Q_off, no C-VAE work), sampled from the
scripts' own replay buffer; and one pretraining step per offline algorithm (its update plus the C-VAE step).
Candidates take turns for `--rounds` rounds of `--seconds` each, so a machine shared with other work slows them
alike; the table gives the median over rounds. Networks are random: speed does not depend on the weights.
"""
import importlib.util
import itertools
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    mode: Literal["update", "loop"] = "update"
    """update: updates per second of the update code, in one process; loop: whole runs of the online scripts"""
    devices: Tuple[str, ...] = ()
    """devices to measure on (default: cpu, and cuda when available)"""
    seconds: float = 2.0
    """length of one timed window per candidate and round"""
    rounds: int = 5
    """rounds; candidates take turns within each round"""
    threads: int = 1
    """torch CPU threads (0: torch's default); one by default, because on a machine shared with other work a
    busy core stalls every multi-threaded op and the numbers become noise"""
    obs_dim: int = 11
    """observation size (11: hopper)"""
    act_dim: int = 3
    """action size (3: hopper)"""
    batch_size: int = 256
    """minibatch size"""
    hidden: int = 256
    """width of the two hidden layers"""
    pretrain: bool = True
    """also measure pretraining steps (each offline algorithm's update plus the C-VAE step)"""
    pretrain_baseline: Optional[str] = None
    """also measure the pretraining steps of this older pretrain_offline.py, side by side (before/after a change:
    `git show HEAD:pretrain_offline.py > /tmp/old.py`)"""
    online: bool = True
    """measure the online scripts' updates (--no-online: pretraining only)"""
    breakdown: bool = True
    """also measure samg_sac.py in cvae mode without the adaptive C-VAE step, and with it every 2nd update"""
    loop_steps: int = 8000
    """--mode loop: environment steps per run; the last loop_steps - loop_warmup of them each do one update"""
    loop_warmup: int = 3000
    """--mode loop: --learning-starts of every run"""
    loop_scripts: Tuple[str, ...] = ("samg_sac", "samg_td3", "samg_awac")
    """--mode loop: the online scripts to run, each with --coef-mode cvae (the default) and --coef-mode none"""
    loop_baseline: Optional[str] = None
    """--mode loop: a checkout of an older version of this project (e.g. `git worktree add /tmp/old HEAD~3`); its
    online scripts run beside these, in the same turns, labelled (baseline)"""
    cleanrl: Optional[str] = None
    """--mode loop: path of CleanRL's sac_continuous_action.py, run beside the scripts as the yardstick (its
    networks are 256x256 whatever --hidden says)"""


BREAKDOWN = {"--coef-mode cvae --no-adaptive": dict(coef_mode="cvae", adaptive=False),
             "--coef-mode even (Q_off, no C-VAE)": dict(coef_mode="even")}


def load_script(name: str, path: Optional[str] = None):
    """Imports a script as a module; its `if __name__ == "__main__":` part does not run."""
    spec = importlib.util.spec_from_file_location(name, path or ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # torch.compile and dataclasses look modules up by name
    spec.loader.exec_module(module)
    return module


# --- the reference: SAC as one would first write it in PyTorch ---
class PlainActor(nn.Module):
    def __init__(self, obs_dim, act_dim, hidden):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mean, self.log_std = nn.Linear(hidden, act_dim), nn.Linear(hidden, act_dim)

    def forward(self, obs):
        hidden = self.trunk(obs)
        mean, log_std = self.mean(hidden), self.log_std(hidden).clamp(-5.0, 2.0)
        normal = torch.distributions.Normal(mean, log_std.exp())
        pre_tanh = normal.rsample()
        action = torch.tanh(pre_tanh)
        log_prob = (normal.log_prob(pre_tanh) - torch.log(1.0 - action.pow(2) + 1e-6)).sum(-1)
        return action, log_prob


def plain_sac_step(a: Args, device):
    obs_dim, act_dim, hidden = a.obs_dim, a.act_dim, a.hidden

    def critic():
        return nn.Sequential(nn.Linear(obs_dim + act_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                             nn.Linear(hidden, 1)).to(device)

    qf1, qf2, qf1_target, qf2_target = critic(), critic(), critic(), critic()
    qf1_target.load_state_dict(qf1.state_dict())
    qf2_target.load_state_dict(qf2.state_dict())
    actor = PlainActor(obs_dim, act_dim, hidden).to(device)
    q_optimizer = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=3e-4)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=3e-4)
    log_alpha = torch.zeros(1, requires_grad=True, device=device)
    alpha_optimizer = torch.optim.Adam([log_alpha], lr=3e-4)
    size = 100_000
    data = {"obs": torch.randn(size, obs_dim, device=device),
            "actions": torch.rand(size, act_dim, device=device) * 2 - 1, "rewards": torch.randn(size, device=device),
            "next_obs": torch.randn(size, obs_dim, device=device), "dones": torch.zeros(size, device=device)}

    def step():
        index = torch.randint(size, (a.batch_size,), device=device)
        obs, actions, rewards, next_obs, dones = (data[k][index] for k in data)
        alpha = log_alpha.exp().item()
        with torch.no_grad():
            next_actions, next_log_prob = actor(next_obs)
            next_input = torch.cat([next_obs, next_actions], 1)
            min_next = torch.min(qf1_target(next_input), qf2_target(next_input)).view(-1) - alpha * next_log_prob
            target = rewards + 0.99 * (1 - dones) * min_next
        data_input = torch.cat([obs, actions], 1)
        qf_loss = F.mse_loss(qf1(data_input).view(-1), target) + F.mse_loss(qf2(data_input).view(-1), target)
        q_optimizer.zero_grad()
        qf_loss.backward()
        q_optimizer.step()
        new_actions, log_prob = actor(obs)
        policy_input = torch.cat([obs, new_actions], 1)
        actor_loss = (alpha * log_prob - torch.min(qf1(policy_input), qf2(policy_input)).view(-1)).mean()
        actor_optimizer.zero_grad()
        actor_loss.backward()
        actor_optimizer.step()
        with torch.no_grad():
            _, log_prob = actor(obs)
        alpha_loss = (-log_alpha.exp() * (log_prob + (-act_dim))).mean()
        alpha_optimizer.zero_grad()
        alpha_loss.backward()
        alpha_optimizer.step()
        for param, target_param in zip(list(qf1.parameters()) + list(qf2.parameters()),
                                       list(qf1_target.parameters()) + list(qf2_target.parameters())):
            target_param.data.copy_(0.005 * param.data + 0.995 * target_param.data)

    return step


# --- the scripts' own updates, called as their training loops call them ---
def online_parts(module, a: Args, device, flags: dict):
    """What every online script builds: args, critics (the online one copied into its target and Q_off), C-VAE and
    its coefficient, replay buffer."""
    args = module.Args(batch_size=a.batch_size, **flags)
    hidden_dims = [a.hidden, a.hidden]
    critic, critic_target, q_offline = (module.CriticEnsemble(a.obs_dim, a.act_dim, hidden_dims, 2).to(device)
                                        for _ in range(3))
    critic_target.load_state_dict(critic.state_dict())
    q_offline.load_state_dict(critic.state_dict())
    critic_target.requires_grad_(False), q_offline.requires_grad_(False)
    cvae = module.CVAE(a.obs_dim, a.act_dim, 2 * a.act_dim, hidden_dims).to(device)
    calibration = {"neg_elbo_quantiles": torch.linspace(0.0, 10.0, 1001), "reservoir_obs": torch.randn(2048, a.obs_dim),
                   "reservoir_actions": torch.rand(2048, a.act_dim) * 2 - 1}
    guidance = module.Coefficient(args, cvae, calibration, device)
    replay = module.ReplayBuffer(100_000, a.obs_dim, a.act_dim, device)
    replay.rows.normal_()
    replay.rows[:, -1] = 0.0
    replay.size = len(replay.rows)
    adam = lambda params, lr: torch.optim.Adam(params, lr=lr, fused=True)  # noqa: E731, as the scripts make them
    parts = dict(args=args, critic=critic, critic_target=critic_target, q_offline=q_offline, cvae=cvae,
                 guidance=guidance, replay=replay, critic_optimizer=adam(critic.parameters(), args.critic_lr),
                 cvae_optimizer=adam(cvae.parameters(), args.cvae_lr), adam=adam, hidden_dims=hidden_dims,
                 metrics=MetricSums(), learn_cvae=args.adaptive and args.coef_mode == "cvae",
                 counter=itertools.count())
    return parts


class MetricSums:
    """Sums the metric tensors on their device, as the scripts' Run.add does between log steps."""

    def __init__(self):
        self.sums = {}

    def add(self, name: str, values):
        if values is not None:
            self.sums[name] = values + self.sums.get(name, 0)


def cvae_step(module, p, batch, td_error, num_updates):
    args = p["args"]
    if p["learn_cvae"]:
        p["metrics"].add("cvae", module.update_cvae_on_mastered(p["cvae"], p["cvae_optimizer"], batch[0], batch[1],
                                                                td_error, args.mastered_quantile))
        if (num_updates + 1) % 50 == 0:
            p["guidance"].rerank()


def samg_sac_step(module, a: Args, device, flags: dict):
    p = online_parts(module, a, device, flags)
    args = p["args"]
    actor = module.TanhGaussianActor(a.obs_dim, a.act_dim, p["hidden_dims"]).to(device)
    log_alpha = torch.tensor(0.0, device=device, requires_grad=True)
    actor_optimizer, alpha_optimizer = p["adam"](actor.parameters(), args.actor_lr), p["adam"]([log_alpha], 3e-4)
    target_params, online_params = list(p["critic_target"].parameters()), list(p["critic"].parameters())

    def step():
        num_updates = next(p["counter"])
        batch = p["replay"].sample(args.batch_size)
        metrics, samg, td_error, _ = module.update_critic(batch, actor, p["critic"], p["critic_target"],
                                                          p["q_offline"], log_alpha, p["guidance"],
                                                          p["critic_optimizer"], args, False)
        p["metrics"].add("critic", metrics)
        p["metrics"].add("samg", samg)
        cvae_step(module, p, batch, td_error, num_updates)
        p["metrics"].add("actor", module.update_actor(batch[0], actor, p["critic"], log_alpha, actor_optimizer,
                                                      alpha_optimizer, -float(a.act_dim)))
        module.soft_update(target_params, online_params, args.tau)

    return step


def samg_td3_step(module, a: Args, device, flags: dict):
    p = online_parts(module, a, device, flags)
    args = p["args"]
    actor = module.DeterministicActor(a.obs_dim, a.act_dim, p["hidden_dims"]).to(device)
    actor_target = module.DeterministicActor(a.obs_dim, a.act_dim, p["hidden_dims"]).to(device).requires_grad_(False)
    actor_optimizer = p["adam"](actor.parameters(), args.actor_lr)
    target_params = [*p["critic_target"].parameters(), *actor_target.parameters()]
    online_params = [*p["critic"].parameters(), *actor.parameters()]

    def step():
        num_updates = next(p["counter"])
        batch = p["replay"].sample(args.batch_size)
        metrics, samg, td_error, _ = module.update_critic(batch, actor_target, p["critic"], p["critic_target"],
                                                          p["q_offline"], p["guidance"], p["critic_optimizer"], args,
                                                          False)
        p["metrics"].add("critic", metrics)
        p["metrics"].add("samg", samg)
        cvae_step(module, p, batch, td_error, num_updates)
        if num_updates % args.policy_freq == 0:
            p["metrics"].add("actor", module.update_actor(batch[0], actor, p["critic"], actor_optimizer))
            module.soft_update(target_params, online_params, args.tau)

    return step


def samg_awac_step(module, a: Args, device, flags: dict):
    p = online_parts(module, a, device, flags)
    args = p["args"]
    actor = module.GaussianActor(a.obs_dim, a.act_dim, p["hidden_dims"]).to(device)
    actor_optimizer = p["adam"](actor.parameters(), args.actor_lr)
    target_params, online_params = list(p["critic_target"].parameters()), list(p["critic"].parameters())

    def step():
        num_updates = next(p["counter"])
        batch = p["replay"].sample(args.batch_size)
        metrics, samg, td_error, _ = module.update_critic(batch, actor, p["critic"], p["critic_target"],
                                                          p["q_offline"], p["guidance"], p["critic_optimizer"], args,
                                                          False)
        p["metrics"].add("critic", metrics)
        p["metrics"].add("samg", samg)
        cvae_step(module, p, batch, td_error, num_updates)
        p["metrics"].add("actor", module.update_actor(batch[0], batch[1], actor, p["critic"], actor_optimizer, 1.0,
                                                      args.awac_max_weight))
        module.soft_update(target_params, online_params, args.tau)

    return step


def samg_iql_step(module, a: Args, device, flags: dict):
    p = online_parts(module, a, device, flags)
    args = p["args"]
    actor = module.GaussianActor(a.obs_dim, a.act_dim, p["hidden_dims"]).to(device)
    value = module.StateValue(a.obs_dim, p["hidden_dims"]).to(device)
    value_offline = module.StateValue(a.obs_dim, p["hidden_dims"]).to(device).requires_grad_(False)
    actor_optimizer, value_optimizer = p["adam"](actor.parameters(), args.actor_lr), p["adam"](value.parameters(),
                                                                                               args.critic_lr)
    target_params, online_params = list(p["critic_target"].parameters()), list(p["critic"].parameters())

    def step():
        num_updates = next(p["counter"])
        batch = p["replay"].sample(args.batch_size)
        metrics, samg, td_error, _ = module.update_critic(batch, actor, p["critic"], value, value_offline,
                                                          p["guidance"], p["critic_optimizer"], args, False)
        p["metrics"].add("critic", metrics)
        p["metrics"].add("samg", samg)
        cvae_step(module, p, batch, td_error, num_updates)
        value_loss, advantage = module.update_value(batch[0], batch[1], p["critic_target"], value, value_optimizer,
                                                    0.7)
        p["metrics"].add("value", value_loss)
        p["metrics"].add("actor", module.update_actor(batch[0], batch[1], advantage, actor, actor_optimizer, 3.0,
                                                      args.iql_max_weight))
        module.soft_update(target_params, online_params, args.tau)

    return step


def behaviour_sac_step(module, a: Args, device):
    """make_dataset.py's behaviour agent: its SAC update (critic, actor and entropy, soft update) on its own buffer."""
    hidden_dims = [a.hidden, a.hidden]
    actor = module.TanhGaussianActor(a.obs_dim, a.act_dim, hidden_dims).to(device)
    critic = module.CriticEnsemble(a.obs_dim, a.act_dim, hidden_dims, 2).to(device)
    critic_target = module.CriticEnsemble(a.obs_dim, a.act_dim, hidden_dims, 2).to(device).requires_grad_(False)
    log_alpha = torch.tensor(0.0, device=device, requires_grad=True)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=3e-4, fused=True)  # as the script makes them
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=3e-4, fused=True)
    alpha_optimizer = torch.optim.Adam([log_alpha], lr=3e-4, fused=True)
    target_params, online_params = list(critic_target.parameters()), list(critic.parameters())
    buffer = module.TransitionStore(100_000, a.obs_dim, a.act_dim, device)
    for tensor in (buffer.observations, buffer.next_observations, buffer.actions, buffer.rewards):
        tensor.normal_()
    buffer.size = 100_000

    def step():
        batch = buffer.sample(a.batch_size)
        module.update_critic(batch, actor, critic, critic_target, log_alpha, critic_optimizer, 0.99)
        module.update_actor(batch[0], actor, critic, log_alpha, actor_optimizer, alpha_optimizer, -float(a.act_dim))
        module.soft_update(target_params, online_params, 0.005)

    return step


def pretrain_step(module, a: Args, device, algo: str):
    """One offline step of pretrain_offline.py: the algorithm's update and the C-VAE step, as its loop runs them.
    `module` may also be an older pretrain_offline.py (without build_learner), to compare before and after."""
    args = module.Args(algo=algo, batch_size=a.batch_size, hidden_dims=(a.hidden, a.hidden))
    args.actor_lr, args.cql_alpha, args.awac_lambda = (1e-4 if algo == "cql" else 3e-4), 5.0, 1.0
    args.latent_dim = 2 * a.act_dim
    args.iql_expectile, args.iql_beta = 0.7, 3.0
    if hasattr(module, "build_learner"):
        nets, opts = module.build_learner(args, a.obs_dim, a.act_dim, device)
    else:
        hidden = [a.hidden, a.hidden]
        actor = module.ACTORS[algo](a.obs_dim, a.act_dim, hidden).to(device)
        critic = module.CriticEnsemble(a.obs_dim, a.act_dim, hidden, args.num_critics).to(device)
        nets = {"actor": actor, "critic": critic, "cvae": module.CVAE(a.obs_dim, a.act_dim, 2 * a.act_dim,
                                                                      hidden).to(device),
                "critic_target": module.CriticEnsemble(a.obs_dim, a.act_dim, hidden, args.num_critics).to(device)}
        opts = {"actor": torch.optim.Adam(actor.parameters(), lr=args.actor_lr),
                "critic": torch.optim.Adam(critic.parameters(), lr=args.critic_lr),
                "cvae": torch.optim.Adam(nets["cvae"].parameters(), lr=args.cvae_lr)}
        if algo == "cql":
            nets["log_alpha"] = torch.zeros(1, device=device, requires_grad=True)
            nets["target_entropy"] = -float(a.act_dim)
            opts["alpha"] = torch.optim.Adam([nets["log_alpha"]], lr=args.critic_lr)
        if algo == "td3bc":
            nets["actor_target"] = module.DeterministicActor(a.obs_dim, a.act_dim, hidden).to(device)
    size = 100_000
    data = (torch.randn(size, a.obs_dim, device=device), torch.rand(size, a.act_dim, device=device) * 2 - 1,
            torch.randn(size, device=device), torch.randn(size, a.obs_dim, device=device),
            torch.zeros(size, device=device))
    counter = itertools.count(1)

    def step():
        index = torch.randint(size, (a.batch_size,), device=device)
        batch = tuple(x[index] for x in data)
        module.UPDATES[algo](next(counter), batch, nets, opts, args)
        loss = module.cvae_loss(nets["cvae"], batch[0], batch[1])
        opts["cvae"].zero_grad()
        loss.backward()
        opts["cvae"].step()

    return step


def updates_per_second(step, seconds: float, device) -> float:
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start, count = time.perf_counter(), 0
    while True:
        step()
        count += 1
        if count % 5 == 0:
            synchronize()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return count / elapsed


def measure(a: Args, device: torch.device):
    torch.manual_seed(0)
    candidates = {"plain PyTorch SAC (reference)": plain_sac_step(a, device)}
    scripts = {"samg_sac": samg_sac_step, "samg_td3": samg_td3_step, "samg_awac": samg_awac_step,
               "samg_iql": samg_iql_step} if a.online else {}
    variants = {"--coef-mode cvae": dict(coef_mode="cvae"), "--coef-mode none": dict(coef_mode="none")}
    for name, make_step in scripts.items():
        module = load_script(name)
        for flags, overrides in variants.items():
            candidates[f"{name}.py {flags}"] = make_step(module, a, device, overrides)
        if name == "samg_sac":  # the behaviour agent does SAC's update with no guidance: the same work as none
            candidates["make_dataset.py behaviour SAC"] = behaviour_sac_step(load_script("make_dataset"), a, device)
            for flags, overrides in BREAKDOWN.items() if a.breakdown else ():  # where cvae mode's extra time goes
                candidates[f"{name}.py {flags}"] = make_step(module, a, device, overrides)
    if a.pretrain:
        versions = {"pretrain_offline.py": load_script("pretrain_offline")}
        if a.pretrain_baseline:
            baseline = load_script("pretrain_offline_baseline", a.pretrain_baseline)
            versions[f"{a.pretrain_baseline} (baseline)"] = baseline
        for algo in ("cql", "td3bc", "awac", "iql"):
            for label, module in versions.items():
                if algo not in module.UPDATES:  # an older pretrain_offline.py without this algorithm
                    continue
                candidates[f"{label} --algo {algo} (+ C-VAE step)"] = pretrain_step(module, a, device, algo)
    for step in candidates.values():  # warm-up: allocator, caches, CUDA kernels
        for _ in range(10):
            step()
    rates = {name: [] for name in candidates}
    for round_index in range(a.rounds):
        for name, step in candidates.items():
            rates[name].append(updates_per_second(step, a.seconds, device))
        print(f"round {round_index + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    return {name: statistics.median(values) for name, values in rates.items()}


# --- --mode loop: whole processes ---
LOOP_ALGOS = {"samg_sac": "cql", "samg_td3": "td3bc", "samg_awac": "awac", "samg_iql": "iql"}


def quiet_run(command, env: dict, cwd: str):
    """Runs a command to its end; returns (wall seconds, CPU seconds of it and its children). Its stderr goes to a
    file (a pipe read only at the end could fill up and stall the run) and is shown if it fails."""
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        exit_code = process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        if exit_code != 0:
            stderr.seek(0)
            sys.exit(f"this run failed (exit {exit_code}): {shlex.join(command)}\n"
                     f"{stderr.read().decode(errors='replace')[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def loop_commands(a: Args, work: str, env: dict):
    """Makes a small Hopper-v5 dataset and a checkpoint per algorithm (the weights do not matter for speed), then
    returns the commands to time: name -> argv."""
    python = sys.executable
    quiet_run([python, str(ROOT / "make_dataset.py"), "--gym-id", "Hopper-v5", "--qualities", "random",
               "--transitions", "3000", "--expert-return", "3234.3"], env, work)
    commands = {}
    for script in a.loop_scripts:
        algo = LOOP_ALGOS[script]
        quiet_run([python, str(ROOT / "pretrain_offline.py"), "--env-id", "local/hopper/random-v0", "--algo", algo,
                   "--total-steps", "10", "--cvae-steps", "10", "--eval-freq", "10", "--eval-episodes", "1",
                   "--hidden-dims", str(a.hidden), str(a.hidden), "--batch-size", str(a.batch_size),
                   "--checkpoint-dir", os.path.join(work, "checkpoints"), "--no-cuda"], env, work)
        checkpoint = os.path.join(work, "checkpoints", f"local-hopper-random-v0__{algo}__1.pt")
        base = [python, str(ROOT / f"{script}.py"), "--checkpoint", checkpoint, "--total-timesteps", str(a.loop_steps),
                "--learning-starts", str(a.loop_warmup), "--batch-size", str(a.batch_size), "--eval-freq",
                str(10 * a.loop_steps), "--eval-episodes", "1", "--run-dir", os.path.join(work, "runs"), "--no-cuda"]
        commands[f"{script}.py (default: cvae, adaptive)"] = base
        commands[f"{script}.py --coef-mode none"] = [*base, "--coef-mode", "none"]
        if a.loop_baseline:
            baseline_root = os.path.abspath(os.path.expanduser(a.loop_baseline))
            old = [base[0], os.path.join(baseline_root, f"{script}.py"), *base[2:]]
            commands[f"{script}.py (default) (baseline)"] = old
            commands[f"{script}.py --coef-mode none (baseline)"] = [*old, "--coef-mode", "none"]
    if a.cleanrl:
        commands["CleanRL sac_continuous_action.py"] = [
            python, os.path.abspath(os.path.expanduser(a.cleanrl)), "--env-id", "Hopper-v5", "--total-timesteps",
            str(a.loop_steps), "--learning-starts", str(a.loop_warmup), "--batch-size", str(a.batch_size),
            "--no-cuda"]
    return commands


def measure_loops(a: Args):
    if a.loop_warmup >= a.loop_steps:
        sys.exit(f"--loop-warmup is {a.loop_warmup} but must be below --loop-steps {a.loop_steps}")
    if a.loop_baseline and not all(os.path.isfile(os.path.join(os.path.expanduser(a.loop_baseline), f"{script}.py"))
                                   for script in a.loop_scripts):
        sys.exit(f"--loop-baseline {a.loop_baseline} lacks one of {', '.join(a.loop_scripts)}; give a checkout of "
                 "this project")
    if a.cleanrl and not os.path.isfile(os.path.expanduser(a.cleanrl)):
        sys.exit(f"--cleanrl {a.cleanrl} is not a file; give the path of CleanRL's sac_continuous_action.py")
    with tempfile.TemporaryDirectory(prefix="samg-speed-") as work:
        threads = str(a.threads) if a.threads else str(os.cpu_count())
        env = dict(os.environ, MINARI_DATASETS_PATH=os.path.join(work, "datasets"), OMP_NUM_THREADS=threads,
                   MKL_NUM_THREADS=threads, PYTHONWARNINGS="ignore")
        if a.cleanrl:  # CleanRL's script imports cleanrl_utils from its repository's root (or from beside it)
            folder = os.path.dirname(os.path.abspath(os.path.expanduser(a.cleanrl)))
            env["PYTHONPATH"] = os.pathsep.join([folder, os.path.dirname(folder), env.get("PYTHONPATH", "")])
        commands = loop_commands(a, work, env)
        times = {name: [] for name in commands}
        for round_index in range(a.rounds):  # in turns, so a drifting machine slows every command alike
            for name, command in commands.items():
                times[name].append(quiet_run(command, env, work))
            print(f"round {round_index + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    return times, threads


def print_loops(a: Args, times: dict, threads: str):
    updates = a.loop_steps - a.loop_warmup
    print(f"Hopper-v5, {a.loop_steps} environment steps with {updates} updates, batch {a.batch_size}, hidden "
          f"{a.hidden}x{a.hidden}, {threads} thread(s) per process, median of {a.rounds} runs each, in turns\n")
    yardstick = "CleanRL sac_continuous_action.py"
    wall = {name: statistics.median(w for w, _ in runs) for name, runs in times.items()}
    cpu = {name: statistics.median(c for _, c in runs) for name, runs in times.items()}
    header = "| run | wall s | CPU s |" + (" speed vs CleanRL (wall) | (CPU) |" if yardstick in times else "")
    print(header)
    print("| --- | ---: | ---: |" + (" ---: | ---: |" if yardstick in times else ""))
    for name in times:
        row = f"| {name} | {wall[name]:.1f} | {cpu[name]:.1f} |"
        if yardstick in times:
            row += f" {wall[yardstick] / wall[name]:.2f}x | {cpu[yardstick] / cpu[name]:.2f}x |"
        print(row)
    print()


if __name__ == "__main__":
    a = tyro.cli(Args)
    if a.mode == "loop":
        print_loops(a, *measure_loops(a))
        sys.exit(0)
    if a.threads:
        torch.set_num_threads(a.threads)
    devices = a.devices or (("cpu", "cuda") if torch.cuda.is_available() else ("cpu",))
    print(f"batch {a.batch_size}, hidden {a.hidden}x{a.hidden}, obs {a.obs_dim}, actions {a.act_dim}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, median of {a.rounds} rounds x "
          f"{a.seconds:g} s\n")
    for device_name in devices:
        device = torch.device(device_name)
        rates = measure(a, device)
        reference = rates["plain PyTorch SAC (reference)"]
        title = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"| update ({title}) | updates/s | vs plain SAC |\n| --- | ---: | ---: |")
        for name, rate in rates.items():
            print(f"| {name} | {rate:.1f} | {rate / reference:.2f}x |")
        print()
