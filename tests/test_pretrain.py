"""pretrain_offline.py: dataset resolution, the four offline algorithms (CQL, TD3+BC, AWAC, IQL), the C-VAE and the
checkpoint contract."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, make_tiny_dataset, run_cases, run_script

sys.path.insert(0, str(ROOT))
import pretrain_offline as po  # noqa: E402  (module-level code only defines; the run sits under __main__)

TINY = ["--total-steps", 200, "--cvae-steps", 200, "--eval-freq", 100, "--eval-episodes", 2,
        "--hidden-dims", 64, 64, "--batch-size", 64]


@pytest.fixture(scope="module")
def checkpoints(minari_store, tmp_path_factory):
    """One tiny pretraining run per algorithm on the session's local/hopper/medium-v0, via its D4RL-style name."""
    cwd = tmp_path_factory.mktemp("pretrain")
    results = {}
    algos = ["cql", "td3bc", "awac"]  # the three runs one after the other in one process (conftest's run_cases)
    for algo, result in zip(algos, run_cases([("pretrain_offline.py", ["--env-id", "hopper-medium-v2", "--algo", algo,
                                                                       *TINY]) for algo in algos], cwd=cwd)):
        assert result.returncode == 0, result.stderr[-2000:]
        results[algo] = (cwd / "checkpoints" / f"hopper-medium-v2__{algo}__1.pt", result.stdout)
    return results


@pytest.mark.parametrize("algo", ["cql", "td3bc", "awac"])
def test_each_algorithm_writes_a_checkpoint_with_every_contract_key_loadable_weights_only(checkpoints, algo):
    path, stdout = checkpoints[algo]
    checkpoint = torch.load(path, weights_only=True)
    assert set(po.CHECKPOINT_KEYS) <= set(checkpoint)
    assert checkpoint["format"] == "samg-offline-1" and checkpoint["algo"] == algo
    assert checkpoint["env_id"] == "hopper-medium-v2" and checkpoint["dataset_id"] == "local/hopper/medium-v0"
    assert "hopper-medium-v2 -> local/hopper/medium-v0" in stdout  # the resolved id is printed
    assert checkpoint["gym_id"] == "Hopper-v5" and checkpoint["gym_kwargs"]["max_episode_steps"] == 100
    assert (checkpoint["obs_dim"], checkpoint["act_dim"], checkpoint["latent_dim"]) == (11, 3, 6)
    assert checkpoint["ref_min_score"] == pytest.approx(-20.272305) and checkpoint["ref_max_score"] == 3234.3
    assert torch.all(checkpoint["obs_std"] > 1e-3)
    quantiles = checkpoint["cvae_calibration"]["neg_elbo_quantiles"]
    assert quantiles.shape == (1001,) and torch.all(quantiles[1:] >= quantiles[:-1])
    assert checkpoint["cvae_calibration"]["reservoir_obs"].shape == (2000, 11)  # all 2000 pairs (fewer than 2048)
    assert checkpoint["cvae_calibration"]["reservoir_actions"].shape == (2000, 3)
    data = po.load_dataset("local/hopper/medium-v0")  # the reservoir is the dataset, normalised as in training
    obs_mean, obs_std = checkpoint["obs_mean"].numpy(), checkpoint["obs_std"].numpy()
    normalised = torch.as_tensor((data["observations"] - obs_mean) / obs_std)
    pairs = torch.cat([normalised, torch.as_tensor(data["actions"])], 1)
    reservoir = torch.cat([checkpoint["cvae_calibration"]["reservoir_obs"],
                           checkpoint["cvae_calibration"]["reservoir_actions"]], 1)
    assert torch.cdist(reservoir.double(), pairs.double()).min(1).values.max() < 1e-5
    assert ("log_alpha" in checkpoint) == (algo == "cql")
    assert not list(path.parent.glob("*.tmp-*"))  # the atomic write left no temporary file


@pytest.mark.parametrize("algo", ["cql", "td3bc", "awac"])
def test_the_loaded_actor_reproduces_the_in_run_evaluation(checkpoints, algo):
    path, _ = checkpoints[algo]
    checkpoint = torch.load(path, weights_only=True)  # as the online scripts read it
    actor = po.ACTORS[algo](checkpoint["obs_dim"], checkpoint["act_dim"], checkpoint["hidden_dims"])
    actor.load_state_dict(checkpoint["actor"])
    actor.eval()
    seed = checkpoint["args"]["seed"]
    env = po.make_env(checkpoint["gym_id"], checkpoint["gym_kwargs"], seed)
    returns, _, _ = po.evaluate(actor, env, checkpoint["obs_mean"].numpy(), checkpoint["obs_std"].numpy(),
                                checkpoint["args"]["eval_episodes"], seed + 10_000, torch.device("cpu"))
    score = po.normalized_score(returns, checkpoint["ref_min_score"], checkpoint["ref_max_score"]).mean()
    assert score == pytest.approx(checkpoint["offline_normalized_score"], abs=1e-6)


def test_the_calibration_reservoir_holds_distinct_rows_of_the_normalised_dataset(minari_store):
    data = po.load_dataset("local/hopper/medium-v0")
    obs = (data["observations"] - data["observations"].mean(0)) / (data["observations"].std(0) + 1e-3)
    obs, actions = torch.as_tensor(obs), torch.as_tensor(data["actions"])  # bounds are [-1, 1]: unchanged
    torch.manual_seed(0)
    cvae = po.CVAE(11, 3, 6, [32, 32])
    calibration = po.calibrate_cvae(cvae, obs, actions, reservoir_size=500)
    reservoir_obs, reservoir_actions = calibration["reservoir_obs"], calibration["reservoir_actions"]
    assert reservoir_obs.shape == (500, 11) and reservoir_actions.shape == (500, 3)
    assert reservoir_obs.dtype == reservoir_actions.dtype == torch.float32
    rows = [torch.nonzero((obs == row).all(1)).flatten() for row in reservoir_obs]  # each is a dataset row ...
    assert all(len(match) == 1 for match in rows)
    rows = torch.cat(rows)
    assert len(set(rows.tolist())) == 500  # ... drawn without replacement
    assert torch.equal(actions[rows], reservoir_actions)  # with its own action
    assert rows.float().std() > 300  # spread over the dataset, not its first rows


def test_the_same_seed_reproduces_the_same_checkpoint_on_cpu(checkpoints, tmp_path):
    result = run_script("pretrain_offline.py", "--env-id", "hopper-medium-v2", "--algo", "td3bc", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    first = torch.load(checkpoints["td3bc"][0], weights_only=True)
    second = torch.load(tmp_path / "checkpoints" / "hopper-medium-v2__td3bc__1.pt", weights_only=True)
    for part in ["actor", "critic", "cvae"]:
        for name, tensor in first[part].items():
            assert torch.equal(tensor, second[part][name]), f"{part}.{name} differs between two seeded runs"


def test_a_d4rl_style_name_finds_the_local_dataset_and_prefers_an_imported_d4rl_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    make_tiny_dataset("local/walker2d/medium-v0", gym_id="Walker2d-v5", steps=50)
    assert po.resolve_dataset("walker2d-medium-v2", download=False) == "local/walker2d/medium-v0"
    make_tiny_dataset("d4rl/walker2d/medium-v2", gym_id="Walker2d-v5", steps=50)
    assert po.resolve_dataset("walker2d-medium-v2", download=False) == "d4rl/walker2d/medium-v2"
    assert po.resolve_dataset("local/walker2d/medium-v0", download=False) == "local/walker2d/medium-v0"


def test_medium_expert_is_combined_from_local_medium_and_expert(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    make_tiny_dataset("local/walker2d/medium-v0", gym_id="Walker2d-v5", steps=40, seed=1)
    make_tiny_dataset("local/walker2d/expert-v0", gym_id="Walker2d-v5", steps=60, seed=2)
    dataset_id = po.resolve_dataset("walker2d-medium-expert-v2", download=False)
    assert dataset_id == "local/walker2d/medium-expert-v0"
    assert len(po.load_dataset(dataset_id)["rewards"]) == 100


def test_the_combined_medium_expert_keeps_the_reference_scores_of_its_parts(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    make_tiny_dataset("local/walker2d/medium-v0", gym_id="Walker2d-v5", steps=40, seed=1, ref_scores=(1.5, 4500.0))
    make_tiny_dataset("local/walker2d/expert-v0", gym_id="Walker2d-v5", steps=60, seed=2, ref_scores=(1.5, 4500.0))
    data = po.load_dataset(po.resolve_dataset("walker2d-medium-expert-v2", download=False))
    assert (data["ref_min_score"], data["ref_max_score"]) == (1.5, 4500.0)


def combine_interrupted_after_the_first_part(signal_name: str):
    """Runs the medium-expert combine in a child process that is stopped (Ctrl-C or SIGKILL) right after the first
    part was copied into the new set: the moment that left a truncated dataset before."""
    code = f"""
import os, signal, sys
from minari.dataset.minari_storage import MinariStorage
sys.path.insert(0, {str(ROOT)!r})
import pretrain_offline as po
sys.excepthook = po.exit_quietly_on_interrupt
copy, calls = MinariStorage.update_from_storage, []
def copy_then_stop(self, storage):
    copy(self, storage)
    calls.append(1)
    if len(calls) == 1:
        os.kill(os.getpid(), signal.{signal_name})
        raise KeyboardInterrupt  # SIGINT arrives here; SIGKILL never returns
MinariStorage.update_from_storage = copy_then_stop
po.resolve_dataset("walker2d-medium-expert-v2", download=False)
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGKILL"])
def test_an_interrupted_combine_leaves_the_store_as_it_was_and_the_next_run_combines_everything(
        tmp_path, monkeypatch, signal_name):
    import minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    make_tiny_dataset("local/walker2d/medium-v0", gym_id="Walker2d-v5", steps=40, seed=1)
    make_tiny_dataset("local/walker2d/expert-v0", gym_id="Walker2d-v5", steps=60, seed=2)
    result = combine_interrupted_after_the_first_part(signal_name)
    assert result.returncode == (130 if signal_name == "SIGINT" else -9), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "local/walker2d/medium-expert-v0" not in minari.list_local_datasets()
    assert not (tmp_path / "local/walker2d/medium-expert-v0").exists()  # nothing a later run could pick up
    dataset_id = po.resolve_dataset("walker2d-medium-expert-v2", download=False)  # the next run
    assert len(po.load_dataset(dataset_id)["rewards"]) == 100  # all of medium (40) and expert (60)


def test_with_no_dataset_anywhere_the_error_names_the_three_ways_to_get_it(tmp_path):
    result = run_script("pretrain_offline.py", "--env-id", "hopper-medium-v2", cwd=tmp_path,
                        env_overrides={"MINARI_DATASETS_PATH": str(tmp_path / "empty")})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "--from-d4rl" in message and "download mujoco/hopper/medium-v0" in message
    assert "python make_dataset.py --env-id hopper-medium-v2" in message
    assert not list(tmp_path.rglob("*.pt"))


@pytest.mark.parametrize("env_id", ["hopper-mediocre-v2", "cartpole-medium-v0", "hopper"])
def test_an_unknown_env_id_lists_the_accepted_forms(tmp_path, env_id):
    result = run_script("pretrain_offline.py", "--env-id", env_id, cwd=tmp_path,
                        env_overrides={"MINARI_DATASETS_PATH": str(tmp_path)})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"unknown --env-id '{env_id}'" in result.stderr and "mujoco/hopper/medium-v0" in result.stderr


def test_an_unknown_algorithm_is_refused(tmp_path):
    result = run_script("pretrain_offline.py", "--env-id", "hopper-medium-v2", "--algo", "bcq", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr and "bcq" in result.stderr


def test_a_dataset_with_nan_values_is_refused(tmp_path):
    store = tmp_path / "store"
    backup = dict(os.environ)
    try:
        os.environ["MINARI_DATASETS_PATH"] = str(store)
        make_tiny_dataset("local/hopper/medium-v0", steps=30)
    finally:
        os.environ.clear()
        os.environ.update(backup)
    import h5py  # corrupt one reward in place, as a broken conversion might

    with h5py.File(store / "local/hopper/medium-v0/data/main_data.hdf5", "r+") as file:
        file["episode_0/rewards"][3] = np.nan
    result = run_script("pretrain_offline.py", "--env-id", "hopper-medium-v2", *TINY, cwd=tmp_path,
                        env_overrides={"MINARI_DATASETS_PATH": str(store)})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "NaN or inf values in its rewards" in result.stderr
    assert not list(tmp_path.rglob("*.pt"))


def test_an_empty_dataset_is_refused(tmp_path):
    import gymnasium as gym
    import minari

    store = tmp_path / "store"
    backup = dict(os.environ)
    try:
        os.environ["MINARI_DATASETS_PATH"] = str(store)
        minari.create_dataset_from_buffers("local/hopper/medium-v0", [], env=gym.make("Hopper-v5").spec)
    finally:
        os.environ.clear()
        os.environ.update(backup)
    result = run_script("pretrain_offline.py", "--env-id", "hopper-medium-v2", *TINY, cwd=tmp_path,
                        env_overrides={"MINARI_DATASETS_PATH": str(store)})
    assert result.returncode != 0 and "Traceback" not in result.stderr and "holds no transitions" in result.stderr


def test_ctrl_c_in_training_leaves_no_checkpoint_and_exits_130(minari_store, tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    announce = ("import torch.optim\n_step, calls = torch.optim.Adam.step, []\n"  # training is under way
                "def step(self, *a, **k):\n    calls.append(1)\n"
                "    if len(calls) == 100:\n        print('training', flush=True)\n    return _step(self, *a, **k)\n"
                "torch.optim.Adam.step = step\n")
    argv = ["pretrain_offline.py", "--env-id", "hopper-medium-v2", "--algo", "td3bc", "--total-steps", "1000000",
            "--hidden-dims", "64", "64"]
    code = (f"import runpy, sys\n{announce}sys.argv = {argv!r}\n"
            f"runpy.run_path({str(ROOT / argv[0])!r}, run_name='__main__')")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               # a CI runner may start us with SIGINT ignored; a user's terminal never does
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in process.stdout:
        if line.startswith("training"):
            break
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr and "interrupted at step" in stderr
    assert not list(tmp_path.glob("checkpoints/*.pt"))  # at most the training state (--save-every), no checkpoint


def test_a_stopped_run_resumed_and_extended_learns_exactly_what_an_uninterrupted_run_learns(minari_store, tmp_path):
    flags = ["--env-id", "hopper-medium-v2", "--algo", "cql", "--seed", 3, *TINY, "--cvae-steps", 100, "--save-every", 80]
    (tmp_path / "whole").mkdir()
    uninterrupted = run_script("pretrain_offline.py", *flags, cwd=tmp_path / "whole")  # 200 steps
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    (tmp_path / "parts").mkdir()
    short = [*flags, "--total-steps", 120]
    stop_at_100 = ("import os, signal, runpy, sys\nimport pretrain_offline as po\n_update = po.Progress.update\n"
                   "def update(self, step, *a, **k):\n    if step == 100:\n        os.kill(os.getpid(), signal.SIGTERM)\n"
                   "    return _update(self, step, *a, **k)\npo.Progress.update = update\n"
                   f"sys.argv = ['pretrain_offline.py', *{list(map(str, short))!r}]\n"
                   "po.handle_interrupts()\npo.main(po.tyro.cli(po.Args))\n")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    stopped = subprocess.run([sys.executable, "-c", stop_at_100], cwd=tmp_path / "parts", env=env, capture_output=True,
                             text=True, timeout=600)
    checkpoint = tmp_path / "parts" / "checkpoints" / "hopper-medium-v2__cql__3.pt"
    state = checkpoint.with_name(checkpoint.name + ".state")
    assert stopped.returncode == 143 and "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
    assert f"--resume continues from step 80 ({os.path.join('checkpoints', state.name)})" in stopped.stderr
    assert state.exists() and not checkpoint.exists()
    other = run_script("pretrain_offline.py", *short, "--resume", "--batch-size", 32, cwd=tmp_path / "parts")
    assert other.returncode == 1 and "another --batch-size; resume with the flags" in other.stderr
    resumed = run_script("pretrain_offline.py", *short, "--resume", cwd=tmp_path / "parts")  # steps 81-120
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr[-2000:]
    assert checkpoint.exists() and torch.load(state, weights_only=True)["step"] == 120
    extended = run_script("pretrain_offline.py", *flags, "--resume", "--overwrite", cwd=tmp_path / "parts")  # to 200
    assert extended.returncode == 0, extended.stderr[-2000:]
    assert len(os.listdir(tmp_path / "parts" / "runs")) == 1  # one run, one log folder
    whole, parts = (torch.load(folder / "checkpoints" / checkpoint.name, weights_only=True)
                    for folder in (tmp_path / "whole", tmp_path / "parts"))
    for key in ("actor", "critic", "cvae", "cvae_calibration"):
        assert whole[key].keys() == parts[key].keys()
        assert all(torch.equal(whole[key][name], parts[key][name]) for name in whole[key]), key
    assert torch.equal(whole["log_alpha"], parts["log_alpha"])
    assert whole["offline_normalized_score"] == parts["offline_normalized_score"]


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    greater = (positive[:, None] > negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(greater + 0.5 * ties)


def test_the_cvae_gives_dataset_actions_higher_p_than_random_actions(minari_store, tmp_path):
    """Dataset actions are a fixed function of the state (plus small noise): the default estimator must separate
    them from uniform random actions at the same states."""
    result = run_script("pretrain_offline.py", "--env-id", "local/hopper/medium-v0", "--algo", "td3bc",
                        "--total-steps", 1, "--cvae-steps", 3000, "--eval-episodes", 1, "--hidden-dims", 64, 64,
                        cwd=tmp_path)  # 64x64: AUROC elbo 0.999, latent 0.995
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = torch.load(tmp_path / "checkpoints" / "local-hopper-medium-v0__td3bc__1.pt", weights_only=True)
    cvae = po.CVAE(checkpoint["obs_dim"], checkpoint["act_dim"], checkpoint["latent_dim"], checkpoint["hidden_dims"])
    cvae.load_state_dict(checkpoint["cvae"])
    data = po.load_dataset("local/hopper/medium-v0")
    obs = torch.as_tensor((data["observations"] - checkpoint["obs_mean"].numpy()) / checkpoint["obs_std"].numpy())
    actions = torch.as_tensor(data["actions"])
    random_actions = torch.empty_like(actions).uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    quantiles = checkpoint["cvae_calibration"]["neg_elbo_quantiles"]
    with torch.no_grad():
        p_elbo = po.p_elbo(cvae, quantiles, obs, actions), po.p_elbo(cvae, quantiles, obs, random_actions)
        p_latent = po.p_latent(cvae, obs, actions), po.p_latent(cvae, obs, random_actions)
    for p_data, p_random in [p_elbo, p_latent]:
        assert torch.all((p_data >= 0) & (p_data <= 1)) and torch.all((p_random >= 0) & (p_random <= 1))
    assert auroc(p_elbo[0].numpy(), p_elbo[1].numpy()) > 0.9
    print("AUROC elbo", auroc(p_elbo[0].numpy(), p_elbo[1].numpy()), "latent",
          auroc(p_latent[0].numpy(), p_latent[1].numpy()))


def make_tiny_antmaze_dataset(dataset_id: str, steps: int = 120):
    """Dict observations, as in Minari's D4RL antmaze ports, on gymnasium-robotics' AntMaze_UMaze."""
    import gymnasium as gym
    import gymnasium_robotics
    import minari
    from minari.data_collector import EpisodeBuffer

    gym.register_envs(gymnasium_robotics)
    env = gym.make("AntMaze_UMaze-v5", max_episode_steps=60, continuing_task=True)
    buffers = []
    for episode in range(steps // 60):
        obs, _ = env.reset(seed=episode)
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        for t in range(60):
            action = env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs), actions.append(action), rewards.append(reward)
            terminations.append(terminated), truncations.append(truncated or t == 59)
        stacked = {key: np.asarray([o[key] for o in observations]) for key in observations[0]}
        buffers.append(EpisodeBuffer(observations=stacked, actions=np.asarray(actions), rewards=np.asarray(rewards),
                                     terminations=np.asarray(terminations), truncations=np.asarray(truncations)))
    minari.create_dataset_from_buffers(dataset_id, buffers, env=env.spec, algorithm_name="tests",
                                       ref_min_score=0.0, ref_max_score=1.0)
    return env.observation_space


def test_antmaze_names_resolve_to_the_d4rl_port_with_flattened_goals_and_shifted_rewards(tmp_path):
    store = tmp_path / "store"
    backup = dict(os.environ)
    try:
        os.environ["MINARI_DATASETS_PATH"] = str(store)
        space = make_tiny_antmaze_dataset("D4RL/antmaze/umaze-v1")
    finally:
        os.environ.clear()
        os.environ.update(backup)
    result = run_script("pretrain_offline.py", "--env-id", "antmaze-umaze-v2", "--algo", "awac", *TINY, cwd=tmp_path,
                        env_overrides={"MINARI_DATASETS_PATH": str(store)})
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = torch.load(tmp_path / "checkpoints" / "antmaze-umaze-v2__awac__1.pt", weights_only=True)
    assert checkpoint["dataset_id"] == "D4RL/antmaze/umaze-v1" and checkpoint["gym_id"] == "AntMaze_UMaze-v5"
    flat_dim = sum(space[key].shape[0] for key in ["observation", "achieved_goal", "desired_goal"])
    assert checkpoint["obs_dim"] == flat_dim  # the ant's own position (achieved_goal) is kept
    assert (checkpoint["reward_scale"], checkpoint["reward_bias"]) == (1.0, -1.0)
    assert checkpoint["args"]["awac_lambda"] == 0.1 and checkpoint["args"]["cql_alpha"] == 10.0
    assert checkpoint["gym_kwargs"]["continuing_task"] is True
    os.environ["MINARI_DATASETS_PATH"] = str(store)
    try:
        import minari

        episode = next(minari.load_dataset("D4RL/antmaze/umaze-v1").iterate_episodes())
        flat = po.load_dataset("D4RL/antmaze/umaze-v1")["observations"][0]
    finally:
        os.environ.clear()
        os.environ.update(backup)
    parts = [episode.observations[key][0] for key in ["observation", "achieved_goal", "desired_goal"]]
    np.testing.assert_allclose(flat, np.concatenate(parts).astype(np.float32))


# --- mistakes a user can make: each case is a command and the sentence it must print (one line, no traceback,
# non-zero exit, and no checkpoint or TensorBoard run written) ---
def store_with(tmp_path, *dataset_ids):
    """A fresh Minari store holding tiny hopper datasets under the given ids."""
    store = tmp_path / "store"
    backup = dict(os.environ)
    try:
        os.environ["MINARI_DATASETS_PATH"] = str(store)
        store.mkdir()
        for dataset_id in dataset_ids:
            make_tiny_dataset(dataset_id, steps=30)
    finally:
        os.environ.clear()
        os.environ.update(backup)
    return store


def damaged_metadata(tmp_path):
    store = store_with(tmp_path, "local/hopper/medium-v0")
    (store / "local/hopper/medium-v0/data/metadata.json").write_text("{")
    return store


def damaged_data(tmp_path):
    store = store_with(tmp_path, "local/hopper/medium-v0")
    (store / "local/hopper/medium-v0/data/main_data.hdf5").write_bytes(b"not an hdf5 file")
    return store


def discrete_actions(tmp_path):
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    store = tmp_path / "store"
    backup = dict(os.environ)
    try:
        os.environ["MINARI_DATASETS_PATH"] = str(store)
        env = gym.make("CartPole-v1")
        obs, _ = env.reset(seed=0)
        observations, actions = [obs], []
        for _ in range(10):
            actions.append(env.action_space.sample())
            observations.append(env.step(actions[-1])[0])
        buffer = EpisodeBuffer(observations=np.asarray(observations), actions=np.asarray(actions),
                               rewards=np.ones(10), terminations=np.zeros(10, bool),
                               truncations=np.eye(10, dtype=bool)[-1])
        minari.create_dataset_from_buffers("local/cartpole/medium-v0", [buffer], env=env.spec)
    finally:
        os.environ.clear()
        os.environ.update(backup)
    return store


def blocked(name):
    def setup(tmp_path):
        (tmp_path / name).write_text("a file in the way")
        return store_with(tmp_path, "local/hopper/medium-v0")
    return setup


def existing_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "hopper-medium-v2__cql__1.pt").write_bytes(b"an earlier run's checkpoint")
    return store_with(tmp_path, "local/hopper/medium-v0")


BAD_INPUT = [  # (arguments, set-up of the Minari store, what the message must say, what it must not say)
    (["--batch-size", 0], None, "--batch-size is 0 but must be positive", None),
    (["--hidden-dims", 0, 64], None, "--hidden-dims is (0, 64) but must be positive (each value)", None),
    (["--num-critics", -1], None, "--num-critics is -1 but must be positive", None),
    (["--total-steps", -10], None, "--total-steps is -10 but must be positive", None),
    (["--cvae-steps", -1], None, "--cvae-steps is -1 but must be zero or more", None),
    (["--seed", -1], None, "--seed is -1 but must be zero or more", None),
    (["--gamma", 1.5], None, "--gamma is 1.5 but must be in [0, 1]", None),
    (["--tau", "nan"], None, "--tau is nan but must be in [0, 1]", None),
    (["--critic-lr", 0], None, "--critic-lr is 0.0 but must be positive", None),
    (["--actor-lr", -1e-4], None, "--actor-lr is -0.0001 but must be positive", None),
    (["--eval-freq", 0], None, "--eval-freq is 0 but must be positive", None),
    (["--eval-episodes", 0], None, "--eval-episodes is 0 but must be positive", None),
    (["--policy-freq", 0, "--algo", "td3bc"], None, "--policy-freq is 0 but must be positive", None),
    (["--cql-n-actions", 0], None, "--cql-n-actions is 0 but must be positive", None),
    (["--awac-lambda", 0, "--algo", "awac"], None, "--awac-lambda is 0.0 but must be positive", None),
    (["--latent-dim", 0], None, "--latent-dim is 0 but must be positive", None),
    (["--env-id", "hopper-medium-v9"], None, "hopper datasets are named -v2 (hopper-medium-v2)", None),
    (["--env-id", "pendulum-medium-v2"], None, "pendulum datasets are named -v0 (pendulum-medium-v0)", None),
    (["--env-id", "pen-human-v2"], None, "pen datasets are named -v1 (pen-human-v1)", None),
    (["--env-id", "pendulum-medium-v0"], store_with, "generate it with `python make_dataset.py --env-id "
                                                     "pendulum-medium-v0`", "--from-d4rl"),
    (["--env-id", "antmaze-umaze-v2"], store_with, "Minari can download D4RL/antmaze/umaze-v1", "make_dataset"),
    (["--env-id", "hopper-medium-v2"], damaged_metadata, "the local dataset local/hopper/medium-v0 in",
     "download failed"),
    (["--env-id", "hopper-medium-v2"], damaged_data, "the local dataset local/hopper/medium-v0 is unreadable",
     "download failed"),
    (["--env-id", "local/cartpole/medium-v0"], discrete_actions, "has Discrete actions, but these algorithms need "
                                                                 "continuous (Box) actions", None),
    (["--checkpoint-dir", "blocked"], blocked("blocked"), "choose another place with --checkpoint-dir", None),
    (["--run-dir", "blocked"], blocked("blocked"), "choose another place with --run-dir", None),
    ([], existing_checkpoint, "checkpoints/hopper-medium-v2__cql__1.pt exists; pass --overwrite to replace it", None),
]


@pytest.mark.parametrize("arguments, setup, message, forbidden", BAD_INPUT,
                         ids=[" ".join(map(str, [*case[0], *([case[1].__name__] if case[1] else [])]))
                              for case in BAD_INPUT])
def test_bad_input_fails_with_one_sentence_before_any_work(minari_store, tmp_path, arguments, setup, message,
                                                           forbidden):
    store = setup(tmp_path) if setup else minari_store
    if "--env-id" not in arguments:
        arguments = ["--env-id", "hopper-medium-v2", *arguments]
    result = run_script("pretrain_offline.py", *TINY, *arguments, cwd=tmp_path, timeout=120,
                        env_overrides={"MINARI_DATASETS_PATH": str(store)})
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert message in last_line, last_line
    assert forbidden is None or forbidden not in last_line, last_line
    if setup is not existing_checkpoint:
        assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("events.out.tfevents*"))
    else:  # the earlier checkpoint is untouched
        assert (tmp_path / "checkpoints" / "hopper-medium-v2__cql__1.pt").read_bytes() == b"an earlier run's checkpoint"


def test_ctrl_c_while_loading_the_dataset_is_one_line_and_exit_130(minari_store, tmp_path):
    code = ("import runpy, sys, minari\n"
            "def interrupted(*args, **kwargs):\n    raise KeyboardInterrupt\n"
            "minari.load_dataset = interrupted\n"
            f"sys.argv = ['pretrain_offline.py', '--env-id', 'hopper-medium-v2']\n"
            f"runpy.run_path({str(ROOT / 'pretrain_offline.py')!r}, run_name='__main__')\n")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 130 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["interrupted; nothing half-written was left behind"]


def test_a_d4rl_name_that_resolves_to_a_re_collection_or_a_local_set_warns_that_scores_are_not_comparable():
    assert "not comparable with D4RL tables" in po.comparability_warning("hopper-medium-v2", "mujoco/hopper/medium-v0")
    assert "not comparable with D4RL tables" in po.comparability_warning("hopper-medium-v2", "local/hopper/medium-v0")
    assert po.comparability_warning("hopper-medium-v2", "d4rl/hopper/medium-v2") is None
    assert po.comparability_warning("pendulum-medium-v0", "local/pendulum/medium-v0") is None  # no D4RL table


# --- the fast updates compute what the straightforward ones computed (issue 9) ---
# The reference: the update math as first written (separate actor and critic calls, actor losses backpropagating
# through the critic's own weights, plain Adam, a per-parameter target update).
def old_soft_update(target, source, tau):
    with torch.no_grad():
        for target_param, param in zip(target.parameters(), source.parameters()):
            target_param.lerp_(param, tau)


def old_cql(step, batch, nets, opts, args):
    obs, actions, rewards, next_obs, dones = batch
    actor, critic, log_alpha = nets["actor"], nets["critic"], nets["log_alpha"]
    batch_size, act_dim, n = obs.shape[0], actions.shape[1], args.cql_n_actions
    with torch.no_grad():
        next_actions, _, _ = actor(next_obs)
        td_target = rewards + args.gamma * (1.0 - dones) * nets["critic_target"](next_obs, next_actions).min(0).values
        repeated_obs, repeated_next_obs = obs.repeat_interleave(n, 0), next_obs.repeat_interleave(n, 0)
        policy_actions, policy_log_prob, _ = actor(repeated_obs)
        next_policy_actions, next_policy_log_prob, _ = actor(repeated_next_obs)
        random_actions = torch.empty_like(policy_actions).uniform_(-1.0, 1.0)
        log_density = torch.stack([torch.full_like(policy_log_prob, -act_dim * np.log(2.0)), policy_log_prob,
                                   next_policy_log_prob]).view(3, batch_size, n)
    q_data = critic(obs, actions)
    sampled_q = critic(repeated_obs.repeat(3, 1), torch.cat([random_actions, policy_actions, next_policy_actions]))
    sampled_q = (sampled_q.view(-1, 3, batch_size, n) - log_density).permute(0, 2, 1, 3).flatten(2)
    logsumexp_q = torch.logsumexp(sampled_q / args.cql_temperature, dim=-1) * args.cql_temperature
    td_loss = (q_data - td_target).pow(2).mean(1).sum()
    conservative_loss = args.cql_alpha * (logsumexp_q - q_data).mean(1).sum()
    opts["critic"].zero_grad()
    (td_loss + conservative_loss).backward()
    opts["critic"].step()
    new_actions, log_prob, _ = actor(obs)
    alpha = log_alpha.exp().detach()
    actor_loss = (alpha * log_prob - critic(obs, new_actions).min(0).values).mean()
    opts["actor"].zero_grad()
    actor_loss.backward()
    opts["actor"].step()
    alpha_loss = -(log_alpha * (log_prob.detach() + nets["target_entropy"])).mean()
    opts["alpha"].zero_grad()
    alpha_loss.backward()
    opts["alpha"].step()
    old_soft_update(nets["critic_target"], critic, args.tau)
    return {"losses/qf_loss": td_loss / 2, "losses/cql_loss": conservative_loss / 2, "losses/actor_loss": actor_loss,
            "losses/alpha": alpha, "losses/qf_values": q_data.mean()}


def old_td3bc(step, batch, nets, opts, args):
    obs, actions, rewards, next_obs, dones = batch
    actor, critic = nets["actor"], nets["critic"]
    with torch.no_grad():
        noise = (torch.randn_like(actions) * args.policy_noise).clamp(-args.noise_clip, args.noise_clip)
        next_actions = (nets["actor_target"](next_obs) + noise).clamp(-1.0, 1.0)
        td_target = rewards + args.gamma * (1.0 - dones) * nets["critic_target"](next_obs, next_actions).min(0).values
    q_data = critic(obs, actions)
    td_loss = (q_data - td_target).pow(2).mean(1).sum()
    opts["critic"].zero_grad()
    td_loss.backward()
    opts["critic"].step()
    metrics = {"losses/qf_loss": td_loss / 2, "losses/qf_values": q_data.mean()}
    if step % args.policy_freq == 0:
        policy_actions = actor(obs)
        q_policy = critic(obs, policy_actions)[0]
        actor_loss = -args.td3bc_alpha / q_policy.abs().mean().detach() * q_policy.mean() + \
            torch.nn.functional.mse_loss(policy_actions, actions)
        opts["actor"].zero_grad()
        actor_loss.backward()
        opts["actor"].step()
        old_soft_update(nets["actor_target"], actor, args.tau)
        old_soft_update(nets["critic_target"], critic, args.tau)
        metrics["losses/actor_loss"] = actor_loss
    return metrics


def old_awac(step, batch, nets, opts, args):
    obs, actions, rewards, next_obs, dones = batch
    actor, critic = nets["actor"], nets["critic"]
    with torch.no_grad():
        next_actions = actor.act(next_obs, deterministic=False)
        td_target = rewards + args.gamma * (1.0 - dones) * nets["critic_target"](next_obs, next_actions).min(0).values
    q_data = critic(obs, actions)
    td_loss = (q_data - td_target).pow(2).mean(1).sum()
    opts["critic"].zero_grad()
    td_loss.backward()
    opts["critic"].step()
    with torch.no_grad():
        value = critic(obs, actor.act(obs, deterministic=False)).min(0).values
        weights = torch.exp((q_data.detach().min(0).values - value) / args.awac_lambda).clamp(max=args.awac_max_weight)
    actor_loss = -(actor.log_prob(obs, actions) * weights).mean()
    opts["actor"].zero_grad()
    actor_loss.backward()
    opts["actor"].step()
    old_soft_update(nets["critic_target"], critic, args.tau)
    return {"losses/qf_loss": td_loss / 2, "losses/actor_loss": actor_loss, "losses/qf_values": q_data.mean()}


OLD_UPDATES = {"cql": old_cql, "td3bc": old_td3bc, "awac": old_awac}


@pytest.mark.parametrize("algo", ["cql", "td3bc", "awac"])
def test_the_fast_update_gives_the_old_updates_losses_and_parameters_with_the_same_seed(algo):
    """Sizes are multiples of 16, so one randn over concatenated inputs draws the same numbers as separate calls."""
    import copy

    args = po.Args(algo=algo, hidden_dims=(32, 32), batch_size=64, actor_lr=3e-4, cql_alpha=5.0, awac_lambda=1.0,
                   latent_dim=6)
    torch.manual_seed(0)
    nets, opts = po.build_learner(args, 11, 3, torch.device("cpu"))
    old_nets = copy.deepcopy(nets)
    old_opts = {name: torch.optim.Adam(old_nets[name].parameters(), lr=opts[name].param_groups[0]["lr"])
                for name in ["actor", "critic", "cvae"]}
    if algo == "cql":
        old_opts["alpha"] = torch.optim.Adam([old_nets["log_alpha"]], lr=args.critic_lr)
    generator = torch.Generator().manual_seed(1)
    batch = (torch.randn(64, 11, generator=generator), torch.rand(64, 3, generator=generator) * 2 - 1,
             torch.randn(64, generator=generator), torch.randn(64, 11, generator=generator),
             (torch.rand(64, generator=generator) < 0.1).float())
    for step in (1, 2, 3):  # step 2: td3bc's delayed actor update
        torch.manual_seed(100 + step)
        new_metrics = po.UPDATES[algo](step, batch, nets, opts, args)
        torch.manual_seed(100 + step)
        old_metrics = OLD_UPDATES[algo](step, batch, old_nets, old_opts, args)
        assert new_metrics.keys() == old_metrics.keys()
        for name, value in old_metrics.items():
            assert new_metrics[name].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), name
    for part in ["actor", "critic", "critic_target", *(["actor_target"] if algo == "td3bc" else [])]:
        for (name, new), old in zip(nets[part].named_parameters(), old_nets[part].parameters()):
            torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-6, msg=f"{part}.{name}")
