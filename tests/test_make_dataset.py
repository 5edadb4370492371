"""make_dataset.py: D4RL-style datasets from tiny budgets, the import of D4RL files, and one-sentence errors.

Every test writes into its own temporary Minari store and runs the script as a user would.
"""
import importlib.util
import os
import re

import gymnasium as gym
import h5py
import minari
import numpy as np
import pytest

from conftest import HOPPER_REF, ROOT, make_tiny_dataset, run_script

TINY_SAC = ["--sac-steps", 300, "--learning-starts", 100, "--eval-episodes", 1, "--hidden-dims", 32, 32,
            "--batch-size", 64]
# (length, how it ends) of the episodes in the synthetic D4RL files; a 1-step episode ending in a timeout included
D4RL_EPISODES = [(5, "terminal"), (7, "timeout"), (1, "terminal"), (1, "timeout"), (4, "timeout"), (6, "timeout")]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh, empty Minari store for one test (the script's subprocess inherits it)."""
    path = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(path))
    return path


def episodes_of(dataset_id):
    return list(minari.load_dataset(dataset_id).iterate_episodes())


def reference_scores(dataset_id):
    metadata = minari.load_dataset(dataset_id).storage.metadata
    return metadata["ref_min_score"], metadata["ref_max_score"]


def assert_split_at_episode_ends(episodes):
    """Every episode ends at its first and only termination or truncation."""
    for episode in episodes:
        ends = episode.terminations | episode.truncations
        assert not ends[:-1].any() and ends[-1]
        assert len(episode.observations) == len(episode.actions) + 1


def write_d4rl_file(path, with_next_observations: bool, obs_dim: int = 11, act_dim: int = 3, **overrides):
    """A small file in D4RL's format (hopper-sized), with the episodes of D4RL_EPISODES."""
    rng = np.random.default_rng(0)
    size = sum(length for length, _ in D4RL_EPISODES)
    observations = rng.normal(size=(size, obs_dim)).astype(np.float32)
    next_observations = np.concatenate([observations[1:], rng.normal(size=(1, obs_dim)).astype(np.float32)])
    terminals, timeouts = np.zeros(size, bool), np.zeros(size, bool)
    end = 0
    for length, kind in D4RL_EPISODES:
        end += length
        (terminals if kind == "terminal" else timeouts)[end - 1] = True
        next_observations[end - 1] = rng.normal(size=obs_dim)  # what the env showed, not the next episode's start
    arrays = dict(observations=observations, actions=rng.uniform(-1, 1, (size, act_dim)).astype(np.float32),
                  rewards=rng.normal(size=size).astype(np.float32), terminals=terminals, timeouts=timeouts)
    if with_next_observations:
        arrays["next_observations"] = next_observations
    arrays.update(overrides)
    with h5py.File(path, "w") as file:
        for key, value in arrays.items():
            if value is not None:
                file[key] = value
    return arrays


def flat(episodes):
    """Episodes back to D4RL's flat arrays."""
    return dict(observations=np.concatenate([episode.observations[:-1] for episode in episodes]),
                next_observations=np.concatenate([episode.observations[1:] for episode in episodes]),
                actions=np.concatenate([episode.actions for episode in episodes]),
                rewards=np.concatenate([episode.rewards for episode in episodes]),
                terminals=np.concatenate([episode.terminations for episode in episodes]),
                timeouts=np.concatenate([episode.truncations for episode in episodes]))


def test_pendulum_run_writes_every_quality_with_the_requested_sizes_and_measured_reference_scores(store, tmp_path):
    qualities = ["random", "medium", "medium-replay", "expert", "medium-expert"]
    result = run_script("make_dataset.py", "--gym-id", "Pendulum-v1", "--qualities", *qualities, *TINY_SAC,
                        "--eval-freq", 250, "--transitions", 500, "--ref-episodes", 2, "--medium-return", -1e9,
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sizes = {"random": 500, "medium": 500, "medium-replay": 250, "expert": 500, "medium-expert": 1000}
    episodes = {quality: episodes_of(f"local/pendulum/{quality}-v0") for quality in qualities}
    for quality, size in sizes.items():
        assert sum(len(episode.rewards) for episode in episodes[quality]) == size
        assert_split_at_episode_ends(episodes[quality])
    # Pendulum never terminates: 200-step episodes end truncated, and the last one is cut off by the size
    assert [len(episode.rewards) for episode in episodes["random"]] == [200, 200, 100]
    assert [len(episode.rewards) for episode in episodes["medium-replay"]] == [200, 50]
    assert not any(episode.terminations.any() for episode in episodes["expert"])
    # the reference scores are the measured random and trained-agent returns, the same in every dataset
    ref_min, ref_max = reference_scores("local/pendulum/random-v0")
    assert {reference_scores(f"local/pendulum/{quality}-v0") for quality in qualities} == {(ref_min, ref_max)}
    assert f"mean return {ref_min:.1f} over 2 episodes (reference minimum)" in result.stdout
    assert f"mean return {ref_max:.1f} over 2 episodes (reference maximum)" in result.stdout
    assert -16.3 * 200 < ref_min < 0
    dataset = minari.load_dataset("local/pendulum/medium-v0")
    assert dataset.spec.env_spec.id == "Pendulum-v1" and dataset.spec.env_spec.kwargs == gym.spec("Pendulum-v1").kwargs
    np.testing.assert_allclose(minari.get_normalized_score(dataset, np.array([ref_min, ref_max])), [0.0, 1.0])
    # medium-replay is the start of training: its first episode begins at the training env's seeded reset
    first_obs, _ = gym.make("Pendulum-v1").reset(seed=1)
    np.testing.assert_array_equal(episodes["medium-replay"][0].observations[0], first_obs.astype(np.float32))
    # medium-expert is medium followed by expert
    combined = episodes["medium"] + episodes["expert"]
    assert len(episodes["medium-expert"]) == len(combined)
    for mixed, original in zip(episodes["medium-expert"], combined):
        np.testing.assert_array_equal(mixed.observations, original.observations)
    # actions are stored in the environment's scale, [-2, 2] for Pendulum, and span more than [-1, 1]
    random_actions = np.concatenate([episode.actions for episode in episodes["random"]])
    assert random_actions.min() >= -2.0 and random_actions.max() <= 2.0 and np.abs(random_actions).max() > 1.0
    for quality in qualities:
        assert f"local/pendulum/{quality}-v0" in result.stdout.split("normalized score")[-1]


def test_hopper_datasets_split_at_terminations_and_carry_d4rl_reference_scores(store, tmp_path):
    result = run_script("make_dataset.py", "--env-id", "hopper-medium-replay-v2", "--qualities", "random", "medium",
                        *TINY_SAC, "--eval-freq", 150, "--transitions", 400, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # the default medium return is a third of the way from D4RL's random to its expert score
    medium_return = HOPPER_REF[0] + (HOPPER_REF[1] - HOPPER_REF[0]) / 3
    assert f"no evaluation reached the medium return {medium_return:.1f}" in result.stdout
    snapshot_step = int(re.search(r"medium snapshot at step (\d+)", result.stdout)[1])
    assert snapshot_step in (150, 300)
    for quality, size in {"random": 400, "medium": 400, "medium-replay": snapshot_step}.items():
        episodes = episodes_of(f"local/hopper/{quality}-v0")
        assert reference_scores(f"local/hopper/{quality}-v0") == HOPPER_REF
        assert sum(len(episode.rewards) for episode in episodes) == size
        assert_split_at_episode_ends(episodes)
        # an untrained hopper falls within a few dozen steps: every episode but the cut-off last one terminates
        assert all(episode.terminations[-1] for episode in episodes[:-1]) and len(episodes) >= 5
        assert episodes[-1].truncations[-1]
    first_obs, _ = gym.make("Hopper-v5").reset(seed=1)
    np.testing.assert_array_equal(episodes[0].observations[0], first_obs.astype(np.float32))


def test_training_stops_at_the_medium_snapshot_when_no_expert_is_needed(store, tmp_path):
    result = run_script("make_dataset.py", "--env-id", "pendulum-medium-replay-v0", "--expert-return", -150,
                        "--medium-return", -1e9, *TINY_SAC, "--eval-freq", 120, "--ref-episodes", 2, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "reached the medium return -1000000000.0 at step 120" in result.stdout
    episodes = episodes_of("local/pendulum/medium-replay-v0")
    assert [len(episode.rewards) for episode in episodes] == [120]
    assert reference_scores("local/pendulum/medium-replay-v0")[1] == -150.0
    assert not (store / "local" / "pendulum" / "medium-v0").exists()


def test_d4rl_file_with_next_observations_round_trips_exactly(store, tmp_path):
    arrays = write_d4rl_file(tmp_path / "hopper_medium-v2.hdf5", with_next_observations=True)
    result = run_script("make_dataset.py", "--from-d4rl", tmp_path / "hopper_medium-v2.hdf5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert reference_scores("d4rl/hopper/medium-v2") == HOPPER_REF
    episodes = episodes_of("d4rl/hopper/medium-v2")
    assert [len(episode.rewards) for episode in episodes] == [length for length, _ in D4RL_EPISODES]
    for key, value in flat(episodes).items():
        assert value.dtype == arrays[key].dtype and np.array_equal(value, arrays[key]), key


def test_d4rl_file_without_next_observations_drops_the_last_step_of_timed_out_episodes(store, tmp_path):
    arrays = write_d4rl_file(tmp_path / "data.hdf5", with_next_observations=False)
    result = run_script("make_dataset.py", "--from-d4rl", tmp_path / "data.hdf5", "--env-id", "hopper-expert-v2",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    episodes = episodes_of("d4rl/hopper/expert-v2")
    # terminal episodes keep every step; timed-out ones lose their last; the 1-step timed-out episode vanishes
    assert [len(episode.rewards) for episode in episodes] == [5, 6, 1, 3, 5]
    assert [bool(episode.terminations[-1]) for episode in episodes] == [True, False, True, False, False]
    assert [bool(episode.truncations[-1]) for episode in episodes] == [False, True, False, True, True]
    kept = np.ones(len(arrays["rewards"]), bool)
    kept[np.flatnonzero(arrays["timeouts"])] = False
    imported = flat(episodes)
    np.testing.assert_array_equal(imported["observations"], arrays["observations"][kept])
    np.testing.assert_array_equal(imported["actions"], arrays["actions"][kept])
    np.testing.assert_array_equal(imported["rewards"], arrays["rewards"][kept])
    # a terminal step's next observation is unknown in such a file: its own observation is repeated
    np.testing.assert_array_equal(episodes[0].observations[-1], episodes[0].observations[-2])


def test_overwrite_replaces_an_existing_dataset_and_is_required_to(store, tmp_path):
    write_d4rl_file(tmp_path / "hopper_random-v2.hdf5", with_next_observations=True)
    first = run_script("make_dataset.py", "--from-d4rl", tmp_path / "hopper_random-v2.hdf5", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    write_d4rl_file(tmp_path / "hopper_random-v2.hdf5", with_next_observations=False)
    refused = run_script("make_dataset.py", "--from-d4rl", tmp_path / "hopper_random-v2.hdf5", cwd=tmp_path)
    assert refused.returncode != 0 and "d4rl/hopper/random-v2 already exists" in refused.stderr
    assert minari.load_dataset("d4rl/hopper/random-v2").total_steps == 24
    replaced = run_script("make_dataset.py", "--from-d4rl", tmp_path / "hopper_random-v2.hdf5", "--overwrite",
                          cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert minari.load_dataset("d4rl/hopper/random-v2").total_steps == 24 - 4
    assert [path.name for path in store.iterdir() if path.name.startswith(".")] == []


def test_an_interrupted_write_leaves_no_half_written_dataset_and_keeps_the_one_it_replaces(store):
    spec = importlib.util.spec_from_file_location("make_dataset", ROOT / "make_dataset.py")
    make_dataset = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_dataset)
    make_tiny_dataset("local/hopper/medium-v0", steps=50)
    episode = episodes_of("local/hopper/medium-v0")[0]
    buffer = minari.data_collector.EpisodeBuffer(
        observations=episode.observations, actions=episode.actions, rewards=episode.rewards,
        terminations=episode.terminations, truncations=episode.truncations)

    def interrupted_after_one_episode():
        yield buffer
        raise KeyboardInterrupt

    for dataset_id in ["local/hopper/random-v0", "local/hopper/medium-v0"]:
        with pytest.raises(KeyboardInterrupt):
            make_dataset.write_dataset(dataset_id, interrupted_after_one_episode(), gym.spec("Hopper-v5"),
                                       *HOPPER_REF, "tests", "interrupted")
    assert not (store / "local" / "hopper" / "random-v0").exists()
    assert minari.load_dataset("local/hopper/medium-v0").total_steps == 50
    assert [path.name for path in store.iterdir() if path.name.startswith(".")] == []
    assert os.environ["MINARI_DATASETS_PATH"] == str(store)


@pytest.mark.parametrize("case", ["unknown env", "unknown quality", "unknown gym id", "existing dataset",
                                  "d4rl missing keys", "d4rl mismatched lengths", "d4rl wrong shape",
                                  "d4rl unnamed file"])
def test_bad_input_fails_with_one_sentence_and_no_traceback(case, store, tmp_path):
    d4rl_file = tmp_path / "hopper_medium-v2.hdf5"
    args, expected = {
        "unknown env": (["--env-id", "moon-medium-v2"], "make_dataset.py cannot make 'moon-medium-v2'"),
        "unknown quality": (["--gym-id", "Pendulum-v1", "--qualities", "great"], "unknown quality 'great'"),
        "unknown gym id": (["--gym-id", "Moon-v0"], "'Moon-v0' is not a Gymnasium environment"),
        "existing dataset": (["--env-id", "hopper-medium-v2"], "local/hopper/medium-v0 already exists"),
        "d4rl missing keys": (["--from-d4rl", d4rl_file], "lacks timeouts"),
        "d4rl mismatched lengths": (["--from-d4rl", d4rl_file], "holds 24 observations but 23 rewards"),
        "d4rl wrong shape": (["--from-d4rl", d4rl_file], "observations of shape (17,) but Hopper-v5 has (11,)"),
        "d4rl unnamed file": (["--from-d4rl", tmp_path / "data.hdf5"], "cannot tell which D4RL dataset"),
    }[case]
    if case == "existing dataset":
        make_tiny_dataset("local/hopper/medium-v0", steps=50)
    if case == "d4rl missing keys":
        write_d4rl_file(d4rl_file, with_next_observations=False, timeouts=None)
    if case == "d4rl mismatched lengths":
        write_d4rl_file(d4rl_file, with_next_observations=False, rewards=np.zeros(23, np.float32))
    if case == "d4rl wrong shape":
        write_d4rl_file(d4rl_file, with_next_observations=False, obs_dim=17)
    if case == "d4rl unnamed file":
        write_d4rl_file(tmp_path / "data.hdf5", with_next_observations=True)
    result = run_script("make_dataset.py", *args, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and expected in last_line, result.stderr
    assert last_line.count(". ") == 0  # one sentence
    if case == "existing dataset":
        assert minari.load_dataset("local/hopper/medium-v0").total_steps == 50
    else:
        assert list(store.glob("**/data")) == []
