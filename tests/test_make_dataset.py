"""make_dataset.py: D4RL-style datasets from tiny budgets, the import of D4RL files, and one-sentence errors.

Every test writes into its own temporary Minari store and runs the script as a user would.
"""
import copy
import os
import re
import signal
import subprocess
import sys

import gymnasium as gym
import h5py
import minari
import numpy as np
import pytest

from conftest import HOPPER_REF, ROOT, load_script, make_tiny_dataset, run_script

import torch

TINY_SAC = ["--total-timesteps", 300, "--learning-starts", 100, "--eval-episodes", 1, "--hidden-dims", 32, 32,
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


def store_contents(store):
    """Every file of the store with its size and modification time: equal before and after means untouched."""
    return sorted((str(path.relative_to(store)), path.stat().st_size, path.stat().st_mtime_ns)
                  for path in store.rglob("*") if path.is_file()) if store.exists() else []


def hidden_entries(store):
    return [path.name for path in store.iterdir() if path.name.startswith(".")]


def buffers_of(dataset_id):
    return [minari.data_collector.EpisodeBuffer(observations=episode.observations, actions=episode.actions,
                                                rewards=episode.rewards, terminations=episode.terminations,
                                                truncations=episode.truncations)
            for episode in episodes_of(dataset_id)]


def test_an_interrupted_write_changes_nothing_in_the_store(store):
    make_dataset = load_script("make_dataset")
    make_tiny_dataset("local/hopper/medium-v0", steps=50)
    before = store_contents(store)

    class InterruptedAfterOneEpisode(list):
        def __iter__(self):
            yield self[0]
            raise KeyboardInterrupt

    episodes = buffers_of("local/hopper/medium-v0")
    datasets = {"local/hopper/random-v0": episodes, "local/hopper/medium-v0": InterruptedAfterOneEpisode(episodes)}
    with pytest.raises(KeyboardInterrupt):
        make_dataset.write_datasets(store, datasets, dict.fromkeys(datasets, ("tests", "interrupted")),
                                    gym.spec("Hopper-v5"), *HOPPER_REF)
    # all or nothing: random-v0 was complete but is not written, medium-v0 is the old one
    assert store_contents(store) == before and hidden_entries(store) == []
    assert minari.load_dataset("local/hopper/medium-v0").total_steps == 50
    assert os.environ["MINARI_DATASETS_PATH"] == str(store)


def test_ctrl_c_during_the_swap_takes_effect_only_once_the_new_dataset_is_in_place(store, monkeypatch):
    make_dataset = load_script("make_dataset")
    make_tiny_dataset("local/hopper/medium-v0", steps=50)
    new_episodes = buffers_of("local/hopper/medium-v0")[:1]
    real_rename = os.rename

    def rename_then_ctrl_c(source, target):
        real_rename(source, target)
        # arrives between the old dataset leaving and the new one arriving; raise_signal delivers it to this
        # thread at once (os.kill may hand it to another thread, and so arrive only after the swap)
        signal.raise_signal(signal.SIGINT)

    # Ctrl-C raises KeyboardInterrupt, as in a terminal, also where the test runner was started with SIGINT ignored
    # (a background job of a non-interactive shell)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
            patched.setattr(os, "rename", rename_then_ctrl_c)
            make_dataset.write_datasets(store, {"local/hopper/medium-v0": new_episodes}, {
                "local/hopper/medium-v0": ("tests", "new")}, gym.spec("Hopper-v5"), *HOPPER_REF)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert minari.load_dataset("local/hopper/medium-v0").total_steps == len(new_episodes[0].rewards) < 50
    assert hidden_entries(store) == []


def test_a_failed_swap_puts_the_replaced_dataset_back(store, monkeypatch, capsys):
    make_dataset = load_script("make_dataset")
    make_tiny_dataset("local/hopper/medium-v0", steps=50)
    before = store_contents(store)
    real_rename, calls = os.rename, []

    def second_rename_fails(source, target):
        calls.append(source)
        if len(calls) == 2:  # old -> backup worked; new -> place fails
            raise OSError(28, "No space left on device")
        real_rename(source, target)

    new_episodes = buffers_of("local/hopper/medium-v0")[:1]
    with monkeypatch.context() as patched, pytest.raises(SystemExit, match="the datasets there were kept as they were"):
        patched.setattr(os, "rename", second_rename_fails)
        make_dataset.write_datasets(store, {"local/hopper/medium-v0": new_episodes},
                                    {"local/hopper/medium-v0": ("tests", "new")}, gym.spec("Hopper-v5"), *HOPPER_REF)
    assert len(calls) == 3  # the third puts the old dataset back
    assert store_contents(store) == before and hidden_entries(store) == []
    assert minari.load_dataset("local/hopper/medium-v0").total_steps == 50


def test_a_run_killed_in_the_middle_of_a_swap_is_undone_by_the_next_run(store, tmp_path):
    make_tiny_dataset("local/hopper/medium-v0", steps=50)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    writer = f"{dead.pid}@{load_script('make_dataset').HOST}"  # a run of this host whose process is gone
    staging = store / f".make_dataset-{writer}"
    # the state a SIGKILL leaves after the old dataset moved out and before the new one moved in
    (staging / "old" / "local" / "hopper").mkdir(parents=True)
    os.rename(store / "local" / "hopper" / "medium-v0", staging / "old" / "local" / "hopper" / "medium-v0")
    (staging / "new" / "local" / "hopper" / "medium-v0").mkdir(parents=True)
    (staging / "swap").write_text("local/hopper/medium-v0")
    result = run_script("make_dataset.py", "--env-id", "hopper-medium-v2", cwd=tmp_path)
    assert f"restored local/hopper/medium-v0, which a killed make_dataset.py run (process {writer})" in result.stdout
    assert "local/hopper/medium-v0 already exists" in result.stderr  # and then it refuses to replace it
    assert minari.load_dataset("local/hopper/medium-v0").total_steps == 50
    assert hidden_entries(store) == []


def test_a_bad_d4rl_file_with_overwrite_leaves_the_existing_dataset_intact(store, tmp_path):
    write_d4rl_file(tmp_path / "hopper_random-v2.hdf5", with_next_observations=True)
    assert run_script("make_dataset.py", "--from-d4rl", tmp_path / "hopper_random-v2.hdf5", cwd=tmp_path).returncode == 0
    before = store_contents(store)
    write_d4rl_file(tmp_path / "hopper_random-v2.hdf5", with_next_observations=True,
                    rewards=np.array([b"1.0"] * 24))
    result = run_script("make_dataset.py", "--from-d4rl", tmp_path / "hopper_random-v2.hdf5", "--overwrite",
                        cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "holds rewards of type |S3 where D4RL has numbers" in result.stderr
    assert store_contents(store) == before
    assert minari.load_dataset("d4rl/hopper/random-v2").total_steps == 24


def test_ctrl_c_while_collecting_exits_130_with_one_line_and_leaves_the_store_as_it_was(store, tmp_path):
    make_tiny_dataset("local/pendulum/random-v0", gym_id="Pendulum-v1", steps=50, ref_scores=(-1000.0, 0.0))
    before = store_contents(store)
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "make_dataset.py"), "--gym-id", "Pendulum-v1", "--qualities", "random",
         "--expert-return", "0", "--transitions", "2000000", "--ref-episodes", "1", "--overwrite"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a user's terminal starts it
    assert "making random" in process.stdout.readline()
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["interrupted; nothing half-written was left behind"]
    assert store_contents(store) == before and hidden_entries(store) == []


BAD_INPUT = {  # case: (arguments, what the one sentence says); {d4rl} is the file the case writes, {file} a plain file
    "unknown env": (["--env-id", "moon-medium-v2"], "make_dataset.py cannot make 'moon-medium-v2'"),
    "unknown version": (["--env-id", "hopper-medium-v9"],
                        "hopper-medium-v9 has an unknown version; hopper datasets are named -v2"),
    "antmaze": (["--env-id", "antmaze-umaze-v2"], "antmaze-umaze-v2 cannot be generated here"),
    "adroit": (["--env-id", "pen-human-v1"], "use Minari's hosted port D4RL/pen/human-v2"),
    "unknown quality": (["--gym-id", "Pendulum-v1", "--qualities", "great"], "unknown quality 'great'"),
    "unknown gym id": (["--gym-id", "Moon-v0"], "'Moon-v0' is not a Gymnasium environment"),
    "env and gym id disagree": (["--env-id", "hopper-medium-v2", "--gym-id", "Walker2d-v5"],
                                "--env-id hopper-medium-v2 means Hopper-v5, not --gym-id Walker2d-v5"),
    "discrete actions": (["--gym-id", "CartPole-v1"], "CartPole-v1 has Discrete actions"),
    "existing dataset": (["--env-id", "hopper-medium-v2"], "local/hopper/medium-v0 already exists"),
    "random without an expert reference": (["--gym-id", "Pendulum-v1", "--qualities", "random", "--transitions", 5000],
                                           "pass --expert-return R"),
    "batch size 0": (["--env-id", "hopper-medium-v2", "--batch-size", 0], "--batch-size is 0 but must be positive"),
    "negative budget": (["--env-id", "hopper-medium-v2", "--total-timesteps", -10], "--total-timesteps is -10 but"),
    "zero transitions": (["--env-id", "hopper-random-v2", "--transitions", 0], "--transitions is 0 but must be"),
    "zero hidden size": (["--env-id", "hopper-medium-v2", "--hidden-dims", 0, 64], "must be positive (each value)"),
    "zero eval frequency": (["--env-id", "hopper-medium-v2", "--eval-freq", 0], "--eval-freq is 0 but must be"),
    "zero eval episodes": (["--env-id", "hopper-medium-v2", "--eval-episodes", 0], "--eval-episodes is 0 but"),
    "zero reference episodes": (["--gym-id", "Pendulum-v1", "--ref-episodes", 0], "--ref-episodes is 0 but"),
    "zero learning rate": (["--env-id", "hopper-medium-v2", "--critic-lr", 0], "--critic-lr is 0.0 but must be"),
    "negative actor learning rate": (["--env-id", "hopper-medium-v2", "--actor-lr", -1], "--actor-lr is -1.0 but"),
    "gamma above 1": (["--env-id", "hopper-medium-v2", "--gamma", 1.5], "--gamma is 1.5 but must be in [0, 1]"),
    "tau nan": (["--env-id", "hopper-medium-v2", "--tau", "nan"], "--tau is nan but must be in [0, 1]"),
    "negative seed": (["--env-id", "hopper-medium-v2", "--seed", -1], "--seed is -1 but must be zero or more"),
    "negative warm-up": (["--env-id", "hopper-medium-v2", "--learning-starts", -1], "--learning-starts is -1 but"),
    "infinite expert return": (["--gym-id", "Pendulum-v1", "--expert-return", "inf"], "--expert-return is inf but"),
    "blocked run dir": (["--env-id", "hopper-medium-replay-v2", "--run-dir", "{file}"], "choose another place with --run-dir"),
    "blocked store": (["--env-id", "hopper-medium-v2"], "choose another place with MINARI_DATASETS_PATH"),
    "d4rl missing file": (["--from-d4rl", "missing_medium-v2.hdf5"], "missing_medium-v2.hdf5 does not exist"),
    "d4rl not hdf5": (["--from-d4rl", "{file}", "--env-id", "hopper-medium-v2"], "is not an HDF5 file"),
    "d4rl missing keys": (["--from-d4rl", "{d4rl}"], "lacks timeouts"),
    "d4rl mismatched lengths": (["--from-d4rl", "{d4rl}"], "holds 24 observations but 23 rewards"),
    "d4rl wrong shape": (["--from-d4rl", "{d4rl}"], "observations of shape (17,) but Hopper-v5 has (11,)"),
    "d4rl byte-string rewards": (["--from-d4rl", "{d4rl}"], "holds rewards of type |S3 where D4RL has numbers"),
    "d4rl nan observations": (["--from-d4rl", "{d4rl}"], "holds non-finite observations (nan or inf)"),
    "d4rl terminals not 0 or 1": (["--from-d4rl", "{d4rl}"], "holds terminals other than 0 and 1"),
    "d4rl unnamed file": (["--from-d4rl", "{unnamed}"], "cannot tell which D4RL dataset"),
}
D4RL_OVERRIDES = {
    "d4rl missing keys": dict(timeouts=None),
    "d4rl mismatched lengths": dict(rewards=np.zeros(23, np.float32)),
    "d4rl byte-string rewards": dict(rewards=np.array([b"1.0"] * 24)),
    "d4rl nan observations": dict(observations=np.full((24, 11), np.nan, np.float32)),
    "d4rl terminals not 0 or 1": dict(terminals=np.full(24, 2.0)),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_fails_before_any_work_with_one_sentence_and_leaves_the_store_as_it_was(case, store, tmp_path):
    args, expected = BAD_INPUT[case]
    d4rl_file, plain_file = tmp_path / "hopper_medium-v2.hdf5", tmp_path / "plain_file"
    plain_file.write_text("a file in the way")
    write_d4rl_file(d4rl_file, with_next_observations=False, obs_dim=17 if case == "d4rl wrong shape" else 11,
                    **D4RL_OVERRIDES.get(case, {}))
    write_d4rl_file(tmp_path / "data.hdf5", with_next_observations=True)
    make_tiny_dataset("local/hopper/medium-v0", steps=50)
    before = store_contents(store)
    args = [str(arg).format(d4rl=d4rl_file, file=plain_file, unnamed=tmp_path / "data.hdf5") for arg in args]
    env = {"MINARI_DATASETS_PATH": str(plain_file)} if case == "blocked store" else {}
    result = run_script("make_dataset.py", *args, cwd=tmp_path, env_overrides=env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and expected in last_line, result.stderr
    assert last_line.count(". ") == 0  # one sentence
    assert not re.search(r"^step \d+/", result.stdout, re.M)  # refused before any training or collection
    assert store_contents(store) == before and hidden_entries(store) == []
    assert not (tmp_path / "runs").exists()


def test_the_fast_sac_update_computes_what_a_plain_sac_update_computes():
    """Batched critics, fused Adam, an actor loss whose backward stops at the actor and a fused soft update are faster
    ways to compute the same step as textbook SAC (Adam, autograd through everything, a loop of lerps)."""
    make_dataset = load_script("make_dataset")
    torch.manual_seed(0)
    obs_dim, act_dim, batch_size = 5, 2, 32
    actor = make_dataset.TanhGaussianActor(obs_dim, act_dim, (16, 16))
    critic = make_dataset.CriticEnsemble(obs_dim, act_dim, (16, 16), num_critics=2)
    batch = (torch.randn(batch_size, obs_dim), torch.rand(batch_size, act_dim) * 2 - 1, torch.randn(batch_size),
             torch.randn(batch_size, obs_dim), (torch.rand(batch_size) < 0.2).float())
    results = []
    for fast in (True, False):
        torch.manual_seed(1)
        a, c = copy.deepcopy(actor), copy.deepcopy(critic)
        c_target = copy.deepcopy(c).requires_grad_(False)
        log_alpha = torch.tensor(0.1, requires_grad=True)
        optimizers = [torch.optim.Adam(params, lr=1e-3, fused=fast) for params in (a.parameters(), c.parameters(),
                                                                                    [log_alpha])]
        for _ in range(3):
            if fast:
                qf_loss = make_dataset.update_critic(batch, a, c, c_target, log_alpha, optimizers[1], 0.99)
                actor_loss, alpha = make_dataset.update_actor(batch[0], a, c, log_alpha, optimizers[0], optimizers[2],
                                                              -float(act_dim))
                make_dataset.soft_update(list(c_target.parameters()), list(c.parameters()), 0.005)
            else:
                obs, actions, rewards, next_obs, terminations = batch
                with torch.no_grad():
                    next_actions, next_log_prob, _ = a(next_obs)
                    q1, q2 = c_target(next_obs, next_actions)
                    target = rewards + 0.99 * (1 - terminations) * (torch.min(q1, q2) - log_alpha.exp() * next_log_prob)
                q1, q2 = c(obs, actions)
                qf1_loss, qf2_loss = F_mse(q1, target), F_mse(q2, target)
                optimizers[1].zero_grad()
                (qf1_loss + qf2_loss).backward()
                optimizers[1].step()
                qf_loss = (qf1_loss + qf2_loss).detach() / 2
                new_actions, log_prob, _ = a(obs)
                alpha = log_alpha.exp().detach()
                q1, q2 = c(obs, new_actions)
                actor_loss = (alpha * log_prob - torch.min(q1, q2)).mean()
                optimizers[0].zero_grad()
                actor_loss.backward()
                optimizers[0].step()
                optimizers[2].zero_grad()
                (-(log_alpha * (log_prob.detach() - act_dim)).mean()).backward()
                optimizers[2].step()
                with torch.no_grad():
                    for target_param, param in zip(c_target.parameters(), c.parameters()):
                        target_param.copy_(0.995 * target_param + 0.005 * param)
        assert not any(p.requires_grad for p in c_target.parameters())  # no graph grows through the soft update
        results.append([float(qf_loss), float(actor_loss.detach()), float(alpha),
                        *[p.detach().clone() for p in [*a.parameters(), *c.parameters(), *c_target.parameters()]]])
    fast, plain = results
    for x, y in zip(fast, plain):
        torch.testing.assert_close(torch.as_tensor(x), torch.as_tensor(y), rtol=1e-5, atol=1e-6)
    assert fast[0] > 0 and not torch.equal(fast[3], actor.trunk[0].weight.detach())  # it did learn


def F_mse(q, target):
    return (q - target).pow(2).mean()
