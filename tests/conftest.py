"""Fixtures shared by the tests: a temporary Minari store with tiny datasets made here, and a script runner.

Nothing is downloaded: every dataset is written with minari.create_dataset_from_buffers and read back through
the scripts' real loading code.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

# The tests' networks are tiny: one thread in this process, as every script run below gets (OMP_NUM_THREADS=1).
# With more, a core busy with other work stalls every op (a 32x32 C-VAE step took 0.2 s instead of 2 ms).
torch.set_num_threads(1)
# ... and in every process the tests start (the scripts, run_cases, and pytest-xdist's workers, which inherit it), so
# that two workers on two cores never oversubscribe them.
os.environ["OMP_NUM_THREADS"] = "1"
# Nothing is downloaded: a test that reaches Minari's download (a dataset found nowhere) gets huggingface_hub's
# immediate offline refusal instead of a name lookup retried with back-off for ~25 s (CI has no network), and a machine
# with a network never fetches a real dataset.
os.environ["HF_HUB_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parents[1]
HOPPER_REF = (-20.272305, 3234.3)  # D4RL's reference scores for hopper


def state_to_action(obs: np.ndarray, act_dim: int) -> np.ndarray:
    """A fixed deterministic function of the state, so dataset actions are fully predictable from states."""
    weights = np.random.default_rng(123).normal(size=(obs.shape[-1], act_dim)) / np.sqrt(obs.shape[-1])
    return np.tanh(2.0 * obs @ weights).astype(np.float32)


def load_script(name: str, folder: str = ""):
    """Imports the project's script {folder}/{name}.py as a module (the scripts are files, not a package), registered
    in sys.modules (as `name`, or `{folder}_{name}`) so that tyro and dataclasses find it."""
    module_name = f"{folder}_{name}" if folder else name
    spec = importlib.util.spec_from_file_location(module_name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def make_tiny_dataset(dataset_id: str, gym_id: str = "Hopper-v5", steps: int = 2000, max_episode_steps: int = 100,
                      seed: int = 0, noise: float = 0.1, ref_scores=HOPPER_REF):
    """Writes a small dataset with `steps` transitions into the current MINARI_DATASETS_PATH."""
    import minari
    from minari.data_collector import EpisodeBuffer

    env = gym.make(gym_id, max_episode_steps=max_episode_steps)
    rng = np.random.default_rng(seed)
    act_dim = env.action_space.shape[0]
    buffers, total, episode = [], 0, 0
    while total < steps:
        obs, _ = env.reset(seed=seed * 10_000 + episode)
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        while True:
            action = state_to_action(obs, act_dim)
            action = np.clip(action + noise * rng.standard_normal(act_dim), -1, 1).astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            truncated = truncated or total + len(actions) + 1 >= steps
            observations.append(obs), actions.append(action), rewards.append(reward)
            terminations.append(terminated), truncations.append(truncated)
            if terminated or truncated:
                break
        buffers.append(EpisodeBuffer(observations=np.asarray(observations), actions=np.asarray(actions),
                                     rewards=np.asarray(rewards), terminations=np.asarray(terminations),
                                     truncations=np.asarray(truncations)))
        total += len(actions)
        episode += 1
    kwargs = {} if ref_scores is None else dict(ref_min_score=ref_scores[0], ref_max_score=ref_scores[1])
    return minari.create_dataset_from_buffers(dataset_id, buffers, env=env.spec, algorithm_name="tests", **kwargs)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder `build(folder)` fills, made once for the whole test session and returned as this process's own copy.
    Under pytest-xdist each worker is its own process with its own session fixtures: the first worker to get here
    builds the folder under a file lock in the directory all workers' temporary directories share, the others wait for
    it, and each copies it, so that no worker sees what another one's tests write. Without workers it is built here."""
    own = tmp_path_factory.mktemp(name)
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        build(own)
        return own
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / f"shared-{name}"  # this run's: pytest-N/, beside popen-gw0/ ...
    with FileLock(f"{shared}.lock"):
        if not (shared / ".built").exists():
            shutil.rmtree(shared, ignore_errors=True)  # a worker that failed half-way
            shared.mkdir()
            build(shared)
            (shared / ".built").touch()
    shutil.copytree(shared, own, symlinks=True, dirs_exist_ok=True)
    (own / ".built").unlink()
    return own


@pytest.fixture(scope="session")
def minari_store(tmp_path_factory):
    """One temporary Minari store for the session, holding a tiny `local/hopper/medium-v0`."""
    path = tmp_path_factory.mktemp("minari")
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    make_tiny_dataset("local/hopper/medium-v0")
    yield path
    if old is None:
        os.environ.pop("MINARI_DATASETS_PATH", None)
    else:
        os.environ["MINARI_DATASETS_PATH"] = old


def run_script(script: str, *args, cwd, env_overrides=None, timeout=600) -> subprocess.CompletedProcess:
    """Runs one of the project's scripts as a user would, in `cwd`, on the CPU with one thread per op."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.update(env_overrides or {})
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --- many runs of the scripts in one process, and one set of tiny checkpoints per session ---
CASE_RUNNER = r'''
import contextlib, io, json, os, runpy, sys, traceback
cases, prelude = json.load(sys.stdin)
exec(prelude)
results = []
for script, argv, env in cases:
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    sys.argv, out, err, status = [script, *argv], io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as stop:
            status = stop.code
        except BaseException:
            traceback.print_exc()
            status = 1
        if isinstance(status, str):  # what the interpreter does with SystemExit("error: ...")
            print(status, file=sys.stderr)
            status = 1
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.update({key: value})
    results.append([status or 0, out.getvalue(), err.getvalue()])
json.dump(results, sys.__stdout__)
'''


def run_cases(cases, *, cwd, env=None, prelude: str = "", timeout=600) -> list:
    """Runs many commands `(script, args)` or `(script, args, env_overrides)` one after the other in ONE Python
    process (each as `python script args` would: the script run as __main__, its SystemExit turned into the exit
    status and the message it prints), so that a table of refusals pays Python's and torch's start-up once. Returns
    a CompletedProcess per command. `prelude` is Python run once first (to patch a library)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    commands = [[str(ROOT / case[0]), [str(a) for a in case[1]], dict(case[2]) if len(case) > 2 else {}]
                for case in cases]
    process = subprocess.run([sys.executable, "-c", CASE_RUNNER], input=json.dumps([commands, prelude]), cwd=cwd,
                             env=env, capture_output=True, text=True, timeout=timeout)
    assert process.returncode == 0, process.stderr[-3000:]
    return [subprocess.CompletedProcess([case[0], *case[1]], status, out, err)
            for case, (status, out, err) in zip(cases, json.loads(process.stdout))]


@pytest.fixture(scope="session")
def script_cases():
    """run_cases: a table of commands run in one process."""
    return run_cases


TINY_ID = "local/hopper/medium-v0"
TINY_PRETRAIN = ["--total-steps", 40, "--cvae-steps", 40, "--eval-freq", 40, "--eval-episodes", 1, "--hidden-dims",
                 16, 16]


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """A folder holding a 400-step `local/hopper/medium-v0` in its own Minari store and a tiny checkpoint of it (16x16
    networks, 40 steps, seed 1) per offline algorithm, pretrained once for the session (once for all workers: see
    built_once). `env` runs a script against that store; `checkpoint(algo)` is a checkpoint's path. Tests copy a checkpoint before changing it."""
    algos = ("cql", "td3bc", "awac", "iql")

    def build(folder):
        env = dict(os.environ, MINARI_DATASETS_PATH=str(folder / "store"), CUDA_VISIBLE_DEVICES="",
                   OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MINARI_DATASETS_PATH", env["MINARI_DATASETS_PATH"])
            make_tiny_dataset(TINY_ID, steps=400)
        results = run_cases([("pretrain_offline.py", ["--env-id", TINY_ID, "--algo", algo, *TINY_PRETRAIN])
                             for algo in algos], cwd=folder, env=env)
        for algo, result in zip(algos, results):
            assert result.returncode == 0, (algo, result.stderr[-3000:])

    base = built_once(tmp_path_factory, "tiny-checkpoints", build)
    env = dict(os.environ, MINARI_DATASETS_PATH=str(base / "store"), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    return types.SimpleNamespace(
        base=base, env=env, store=base / "store", dataset_id=TINY_ID,
        checkpoint=lambda algo: base / "checkpoints" / f"{TINY_ID.replace('/', '-')}__{algo}__1.pt")
