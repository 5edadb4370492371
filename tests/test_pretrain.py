"""pretrain_offline.py: dataset resolution, the three offline algorithms, the C-VAE and the checkpoint contract."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, make_tiny_dataset, run_script

sys.path.insert(0, str(ROOT))
import pretrain_offline as po  # noqa: E402  (module-level code only defines; the run sits under __main__)

TINY = ["--total-steps", 200, "--cvae-steps", 200, "--eval-freq", 100, "--eval-episodes", 2,
        "--hidden-dims", 64, 64, "--batch-size", 64]


@pytest.fixture(scope="module")
def checkpoints(minari_store, tmp_path_factory):
    """One tiny pretraining run per algorithm on the session's local/hopper/medium-v0, via its D4RL-style name."""
    cwd = tmp_path_factory.mktemp("pretrain")
    results = {}
    for algo in ["cql", "td3bc", "awac"]:
        result = run_script("pretrain_offline.py", "--env-id", "hopper-medium-v2", "--algo", algo, *TINY, cwd=cwd)
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
    assert ("log_alpha" in checkpoint) == (algo == "cql")
    assert not list(path.parent.glob("*.tmp-*"))  # the atomic write left no temporary file


@pytest.mark.parametrize("algo", ["cql", "td3bc", "awac"])
def test_the_loaded_actor_reproduces_the_in_run_evaluation(checkpoints, algo):
    path, _ = checkpoints[algo]
    checkpoint = po.load_checkpoint(str(path), algo)
    actor = po.ACTORS[algo](checkpoint["obs_dim"], checkpoint["act_dim"], checkpoint["hidden_dims"])
    po.load_weights(actor, checkpoint["actor"], "actor", str(path))
    actor.eval()
    seed = checkpoint["args"]["seed"]
    env = po.make_env(checkpoint["gym_id"], checkpoint["gym_kwargs"], seed)
    returns, _, _ = po.evaluate(actor, env, checkpoint["obs_mean"].numpy(), checkpoint["obs_std"].numpy(),
                                checkpoint["args"]["eval_episodes"], seed + 10_000, torch.device("cpu"))
    score = po.normalized_score(returns, checkpoint["ref_min_score"], checkpoint["ref_max_score"]).mean()
    assert score == pytest.approx(checkpoint["offline_normalized_score"], abs=1e-6)


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


def test_with_no_dataset_anywhere_the_error_names_the_three_ways_to_get_it(tmp_path):
    result = run_script("pretrain_offline.py", "--env-id", "hopper-medium-v2", cwd=tmp_path,
                        env_overrides={"MINARI_DATASETS_PATH": str(tmp_path / "empty")})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "--from-d4rl" in message and "download mujoco/hopper/medium-v0" in message
    assert "python make_dataset.py --env-id hopper-medium-v2" in message
    assert not (tmp_path / "checkpoints").exists()


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
    assert not (tmp_path / "checkpoints").exists()


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


def test_ctrl_c_leaves_no_checkpoint_and_exits_non_zero(minari_store, tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    process = subprocess.Popen([sys.executable, str(ROOT / "pretrain_offline.py"), "--env-id", "hopper-medium-v2",
                                "--algo", "td3bc", "--total-steps", "1000000", "--hidden-dims", "64", "64"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # a CI runner may start us with SIGINT ignored; a user's terminal never does
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("runs/*/events*")):
        time.sleep(0.5)  # training has started once the TensorBoard file exists
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0 and "Traceback" not in stderr and "interrupted at step" in stderr
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    greater = (positive[:, None] > negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(greater + 0.5 * ties)


def test_the_cvae_gives_dataset_actions_higher_p_than_random_actions(minari_store, tmp_path):
    """Dataset actions are a fixed function of the state (plus small noise): the default estimator must separate
    them from uniform random actions at the same states."""
    result = run_script("pretrain_offline.py", "--env-id", "local/hopper/medium-v0", "--algo", "td3bc",
                        "--total-steps", 1, "--cvae-steps", 3000, "--eval-episodes", 1, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = po.load_checkpoint(str(tmp_path / "checkpoints" / "local-hopper-medium-v0__td3bc__1.pt"), "td3bc")
    cvae = po.CVAE(checkpoint["obs_dim"], checkpoint["act_dim"], checkpoint["latent_dim"], checkpoint["hidden_dims"])
    po.load_weights(cvae, checkpoint["cvae"], "cvae", "checkpoint")
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
    checkpoint = po.load_checkpoint(str(tmp_path / "checkpoints" / "antmaze-umaze-v2__awac__1.pt"), "awac")
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
