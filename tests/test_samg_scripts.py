"""The online scripts as a user runs them: fine-tuning end to end from a real (tiny) checkpoint, without the offline
dataset, reproducibly, and with one-sentence errors for the inputs a user can get wrong."""
import os
import shutil

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, make_tiny_dataset, run_script

ENV_ID = "local/hopper/medium-v0"
SCRIPTS = {"samg_sac.py": "cql", "samg_td3.py": "td3bc", "samg_awac.py": "awac"}
QUICK = ["--env-id", ENV_ID, "--eval-episodes", "1"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory holding a cql, a td3bc and an awac checkpoint pretrained on a tiny dataset, which is then
    deleted: every online run below happens without the offline data."""
    base = tmp_path_factory.mktemp("samg")
    store, workdir = base / "offline-store", base / "work"
    workdir.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(store))
        make_tiny_dataset(ENV_ID)
    for algo in SCRIPTS.values():
        result = run_script("pretrain_offline.py", "--env-id", ENV_ID, "--algo", algo, "--total-steps", 50,
                            "--cvae-steps", 200, "--eval-freq", 100, "--eval-episodes", 1, cwd=workdir,
                            env_overrides={"MINARI_DATASETS_PATH": str(store)})
        assert result.returncode == 0, result.stderr
    shutil.rmtree(store)
    return workdir


def scalars(run_dir) -> dict:
    """{tag: [(step, value), ...]} from the single run under run_dir."""
    (run,) = os.listdir(run_dir)
    events = EventAccumulator(os.path.join(run_dir, run), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def checkpoint_path(workdir, algo):
    return workdir / "checkpoints" / f"{ENV_ID.replace('/', '-')}__{algo}__1.pt"


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_fine_tunes_past_learning_starts_evaluates_logs_and_saves_a_reloadable_model(workdir, tmp_path, script):
    result = run_script(script, *QUICK, "--total-timesteps", 400, "--learning-starts", 100, "--eval-freq", 200,
                        "--log-freq", 100, "--save-model", "--run-dir", tmp_path, cwd=workdir)
    assert result.returncode == 0, result.stderr
    logged = scalars(tmp_path)
    assert [step for step, _ in logged["eval/normalized_score"]] == [0, 200, 400]
    assert [step for step, _ in logged["samg/p_mean"]] == [200, 300, 400]  # updates start after step 100
    assert all(0.0 <= value <= 1.0 for _, value in logged["samg/p_mean"] + logged["samg/p_active_frac"])
    for tag in ["losses/qf_loss", "losses/actor_loss", "losses/qf_values", "samg/intrinsic", "samg/cvae_loss",
                "samg/qoff_values", "samg/qbar_values", "samg/qoff_above_frac", "charts/episodic_return",
                "charts/SPS", "eval/return", "samg/p_q10", "samg/p_q50", "samg/p_q90", "samg/p_auroc"]:
        assert tag in logged, f"{tag} missing"
    assert all(torch.isfinite(torch.tensor(value)) for _, value in logged["losses/qf_loss"])
    assert all(0.0 <= value <= 1.0 for _, value in logged["samg/p_auroc"])

    (run,) = os.listdir(tmp_path)
    model = torch.load(tmp_path / run / "model.pt", weights_only=True)
    offline = torch.load(checkpoint_path(workdir, SCRIPTS[script]), weights_only=True)
    assert model["format"] == "samg-offline-1" and model["algo"] == SCRIPTS[script] and model["online_steps"] == 400
    assert set(offline) <= set(model)
    for network in ["actor", "critic", "cvae"]:  # all three were trained online
        assert any(not torch.equal(model[network][k], offline[network][k]) for k in offline[network]), network


def test_online_fine_tuning_runs_with_the_offline_dataset_deleted(workdir, tmp_path):
    deleted_store = workdir.parent / "offline-store"  # where the checkpoints' dataset was, removed after pretraining
    assert not deleted_store.exists()
    result = run_script("samg_td3.py", *QUICK, "--total-timesteps", 150, "--learning-starts", 50, "--eval-freq", 100,
                        "--run-dir", tmp_path / "runs", cwd=workdir,
                        env_overrides={"MINARI_DATASETS_PATH": str(deleted_store)})
    assert result.returncode == 0, result.stderr
    assert [step for step, _ in scalars(tmp_path / "runs")["eval/normalized_score"]] == [0, 100, 150]


@pytest.mark.parametrize("script", SCRIPTS)
def test_same_seed_gives_identical_losses_on_cpu(workdir, tmp_path, script):
    runs = []
    for attempt in range(2):
        run_dir = tmp_path / f"run{attempt}"
        result = run_script(script, *QUICK, "--total-timesteps", 160, "--learning-starts", 100, "--eval-freq", 1000,
                            "--log-freq", 20, "--run-dir", run_dir, cwd=workdir)
        assert result.returncode == 0, result.stderr
        runs.append(scalars(run_dir))
    for tag in ["losses/qf_loss", "losses/actor_loss", "samg/p_mean", "samg/cvae_loss", "charts/episodic_return"]:
        assert runs[0][tag] == runs[1][tag], tag
    assert len({value for _, value in runs[0]["losses/qf_loss"]}) == 3  # three different averages, not a constant


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_checkpoint_prints_the_pretrain_command_that_makes_it(tmp_path, script):
    result = run_script(script, "--env-id", "hopper-medium-v2", "--seed", 3, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"`python pretrain_offline.py --env-id hopper-medium-v2 --algo {SCRIPTS[script]} --seed 3`" in result.stderr


def assert_one_sentence_error(result, *fragments):
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and all(fragment in message for fragment in fragments), message


def test_checkpoint_of_another_algorithm_is_refused_naming_both(workdir):
    result = run_script("samg_sac.py", *QUICK, "--checkpoint", checkpoint_path(workdir, "td3bc"), cwd=workdir)
    assert_one_sentence_error(result, "td3bc checkpoint", "needs cql")


def test_file_of_another_format_is_refused_naming_the_format(workdir, tmp_path):
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    result = run_script("samg_awac.py", *QUICK, "--checkpoint", tmp_path / "other.pt", cwd=workdir)
    assert_one_sentence_error(result, "'something-else'", "samg-offline-1")


def test_checkpoint_whose_weights_do_not_fit_its_stated_sizes_is_refused(workdir, tmp_path):
    checkpoint = torch.load(checkpoint_path(workdir, "cql"), weights_only=True)
    checkpoint["hidden_dims"] = [64, 64]
    torch.save(checkpoint, tmp_path / "resized.pt")
    result = run_script("samg_sac.py", *QUICK, "--checkpoint", tmp_path / "resized.pt", cwd=workdir)
    assert_one_sentence_error(result, "does not fit")


def test_environment_with_other_spaces_than_the_checkpoint_is_refused(workdir):
    result = run_script("samg_td3.py", *QUICK, "--gym-id", "Walker2d-v5", cwd=workdir)
    assert_one_sentence_error(result, "Walker2d-v5", "17-d observations", "Hopper-v5")


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_threshold_outside_the_unit_interval_is_refused(workdir, threshold):
    result = run_script("samg_sac.py", *QUICK, "--p-threshold", threshold, cwd=workdir)
    assert_one_sentence_error(result, "--p-threshold", "[0, 1]")


# --- bad input: each case is a command and the sentence it must print; nothing is run or written ---
FLAG_CASES = [
    ("samg_sac.py", ["--batch-size", 0], "--batch-size is 0 but must be positive"),
    ("samg_sac.py", ["--eval-freq", 0], "--eval-freq is 0 but must be positive"),
    ("samg_td3.py", ["--log-freq", 0], "--log-freq is 0 but must be positive"),
    ("samg_td3.py", ["--policy-freq", 0], "--policy-freq is 0 but must be positive"),
    ("samg_awac.py", ["--cvae-update-every", 0], "--cvae-update-every is 0 but must be positive"),
    ("samg_awac.py", ["--qoff-refresh-every", 0], "--qoff-refresh-every is 0 but must be positive"),
    ("samg_sac.py", ["--total-timesteps", -10], "--total-timesteps is -10 but must be positive"),
    ("samg_sac.py", ["--num-critics", -1], "--num-critics is -1 but must be positive"),
    ("samg_td3.py", ["--seed", -1], "--seed is -1 but must be zero or more"),
    ("samg_td3.py", ["--utd", 0], "--utd is 0 but must be positive"),
    ("samg_awac.py", ["--eval-episodes", 0], "--eval-episodes is 0 but must be positive"),
    ("samg_sac.py", ["--gamma", "nan"], "--gamma is nan but must be in [0, 1]"),
    ("samg_iql.py", ["--coef-mode", "even", "--even-p", 1.5], "--even-p is 1.5 but must be in [0, 1]"),
    ("samg_sac.py", ["--total-timesteps", 400, "--learning-starts", 500], "must be below --total-timesteps (400)"),
    ("samg_td3.py", ["--offline-data-ratio", 1], "--offline-data-ratio is 1 but must be below 1"),
    ("samg_awac.py", ["--awac-lambda", 0], "--awac-lambda is 0.0 but must be positive"),
]


@pytest.mark.parametrize("script, flags, message", FLAG_CASES)
def test_numeric_flag_out_of_range_is_one_sentence_naming_the_flag(workdir, tmp_path, script, flags, message):
    result = run_script(script, *QUICK, *flags, "--run-dir", tmp_path / "runs", cwd=workdir)
    assert_one_sentence_error(result, message)
    assert not (tmp_path / "runs").exists() or not os.listdir(tmp_path / "runs")


def test_run_dir_blocked_by_a_file_is_refused_before_any_work(workdir, tmp_path):
    (tmp_path / "blocked").write_text("a file in the way")
    result = run_script("samg_td3.py", *QUICK, "--run-dir", tmp_path / "blocked" / "runs", cwd=workdir)
    assert_one_sentence_error(result, "cannot write to", "--run-dir")


def test_offline_data_ratio_without_the_dataset_is_one_sentence(workdir, tmp_path):
    result = run_script("samg_td3.py", *QUICK, "--offline-data-ratio", 0.5, "--run-dir", tmp_path, cwd=workdir,
                        env_overrides={"MINARI_DATASETS_PATH": str(tmp_path / "empty-store")})
    assert_one_sentence_error(result, "--offline-data-ratio", ENV_ID, "not in the Minari store")


def damaged(checkpoint: dict, key: str, value):
    checkpoint = dict(checkpoint)
    if key == "neg_elbo_quantiles":
        checkpoint["cvae_calibration"] = {k: v for k, v in checkpoint["cvae_calibration"].items() if k != key}
        if value is not None:
            checkpoint["cvae_calibration"][key] = value
    else:
        checkpoint[key] = value
    return checkpoint


CHECKPOINT_CASES = [
    ("obs_mean", torch.zeros(3), "bad obs_mean (shape (3,) where (11,) is needed)"),
    ("obs_std", torch.zeros(11), "bad obs_std (values that are not finite and positive)"),
    ("action_low", torch.zeros(2), "bad action_low (shape (2,) where (3,) is needed)"),
    ("neg_elbo_quantiles", None, "bad cvae_calibration (no neg_elbo_quantiles)"),
    ("neg_elbo_quantiles", torch.zeros(4, 2), "bad neg_elbo_quantiles (not a sorted 1-d list"),
    ("neg_elbo_quantiles", torch.zeros(0), "bad neg_elbo_quantiles (not a sorted 1-d list"),
    ("log_alpha", torch.zeros(3), "bad log_alpha (not a single number)"),
    ("ref_max_score", -20.272305, "bad ref_max_score (equal to ref_min_score"),
    ("reward_scale", float("inf"), "bad reward_scale (values that are not finite)"),
    ("gym_kwargs", {"no_such_option": 1}, "cannot make the environment Hopper-v5"),
]


@pytest.mark.parametrize("key, value, message", CHECKPOINT_CASES)
def test_damaged_checkpoint_field_is_one_sentence_naming_it(workdir, tmp_path, key, value, message):
    checkpoint = torch.load(checkpoint_path(workdir, "cql"), weights_only=True)
    if key == "ref_max_score":
        checkpoint["ref_min_score"] = value
    torch.save(damaged(checkpoint, key, value), tmp_path / "damaged.pt")
    result = run_script("samg_sac.py", *QUICK, "--checkpoint", tmp_path / "damaged.pt", "--run-dir", tmp_path / "runs",
                        cwd=workdir)
    assert_one_sentence_error(result, message)


def test_ctrl_c_during_the_first_evaluation_exits_130_with_one_line_and_saves_the_model(workdir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "runs"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "samg_td3.py"), *QUICK, "--eval-episodes", "10000", "--save-model",
         "--run-dir", str(run_dir)], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not list(run_dir.glob("*/events.out.tfevents.*")):
        time.sleep(0.2)
    time.sleep(3.0)  # the step-0 evaluation of 10,000 episodes is under way
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted at step 0" in stdout
    (run,) = os.listdir(run_dir)
    assert torch.load(run_dir / run / "model.pt", weights_only=True)["online_steps"] == 0
