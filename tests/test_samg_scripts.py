"""The online scripts as a user runs them: fine-tuning end to end from a real (tiny) checkpoint, without the offline
dataset, reproducibly, each run in a directory of its own, Q_off (and with --no-adaptive the C-VAE) frozen, and
one-sentence errors for the inputs a user can get wrong.

Speed: the checkpoints are pretrained once per session (conftest's tiny_checkpoints); the finished runs that several
tests inspect are made once per module, all at once; the refusals run as one table in one process (conftest's
run_cases); the tests that look inside a run call the script's main() in this process. Nothing waits a number of
seconds: a signal is sent once the run has printed the line that says where it is."""
import concurrent.futures
import math
import os
import re
import signal
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, load_script

ENV_ID = "local/hopper/medium-v0"
SCRIPTS = {"samg_sac.py": "cql", "samg_td3.py": "td3bc", "samg_awac.py": "awac", "samg_iql.py": "iql"}
# the shortest run that crosses every phase: 60 steps of the pretrained policy alone, then 60 with updates; evaluations
# at 0, 60 and 120; the metrics logged at the last step; then model.pt
SHORT = ["--env-id", ENV_ID, "--total-timesteps", 120, "--learning-starts", 60, "--eval-freq", 60,
         "--eval-episodes", 1]


def scalars(run_dir) -> dict:
    """{tag: [(step, value), ...]} of the TensorBoard log in run_dir."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def no_store(tmp_path) -> dict:
    """Environment overrides under which the offline dataset cannot be read: the Minari store does not exist."""
    return {"MINARI_DATASETS_PATH": str(tmp_path / "no-store")}


def command(script, *args, inject: str = "") -> list:
    """`python script args`; with `inject`, that Python runs first in the same process (to announce a moment)."""
    if not inject:
        return [sys.executable, str(ROOT / script), *map(str, args)]
    return [sys.executable, "-c", f"import runpy, sys\n{inject}\nsys.argv = {[str(ROOT / script), *map(str, args)]!r}\n"
                                  f"runpy.run_path(sys.argv[0], run_name='__main__')"]


def start(script, *args, cwd, env, inject: str = "") -> subprocess.Popen:
    process = subprocess.Popen(command(script, *args, inject=inject), cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even from a batch job
    guard = threading.Timer(600, process.kill)  # against a hang, never a wait; it does not hold pytest at its exit
    guard.daemon = True
    guard.start()
    return process


def read_until(process: subprocess.Popen, fragment: str) -> str:
    """The run's output up to and including the first line holding `fragment`: the run is past that point."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if fragment in line:
            return "".join(lines)
    raise AssertionError(f"the run ended without printing {fragment!r}: {''.join(lines)}{process.stderr.read()[-3000:]}"
                         )


def one_sentence(result, *fragments) -> str:
    """The run refused: a non-zero exit, no traceback, and stderr ends with one `error: ` line holding `fragments`."""
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and all(fragment in message for fragment in fragments), message
    return message


# --- finished runs: each script once, samg_td3.py twice at the same moment; several tests inspect them ---
@pytest.fixture(scope="module")
def finished(tiny_checkpoints, tmp_path_factory):
    """Each script fine-tunes its checkpoint for SHORT with --save-model, the offline dataset out of reach; samg_td3.py
    twice, started at the same moment with the same seed and flags into the same --run-dir; once that pair has named
    its directories, the other three start at once.
    Returns {script: [(CompletedProcess, the run directory its "saved" line names), ...]}."""
    out = tmp_path_factory.mktemp("finished")
    env = dict(tiny_checkpoints.env, **no_store(out))
    runs = [("samg_td3.py", out / "td3-pair"), ("samg_td3.py", out / "td3-pair")] + [
        (script, out / script) for script in SCRIPTS if script != "samg_td3.py"]
    processes, printed = [], []
    for script, run_dir in runs:
        processes.append(start(script, *SHORT, "--save-model", "--run-dir", run_dir, cwd=tiny_checkpoints.base,
                               env=env))
        if len(processes) == 2:  # the pair is past the naming of its run directories before the others start
            printed = [read_until(process, "the offline policy scores") for process in processes]
    results = {}
    for (script, run_dir), process, before in zip(runs, processes, printed + [""] * len(runs)):
        # not communicate(): it would skip what read_until's reading ahead has buffered (the whole rest of a run
        # that finished meanwhile); stderr is drained beside stdout, so a full pipe cannot stall the run
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            stderr = pool.submit(process.stderr.read)
            stdout, stderr = process.stdout.read(), stderr.result()
        process.wait()
        result = subprocess.CompletedProcess(process.args, process.returncode, before + stdout, stderr)
        saved = [line.removeprefix("saved ") for line in result.stdout.splitlines() if line.startswith("saved ")]
        results.setdefault(script, []).append((result, Path(saved[0]).parent if saved else None))
    assert not (out / "no-store").exists()
    return results


@pytest.mark.parametrize("script", SCRIPTS)
def test_fine_tuning_evaluates_updates_logs_and_saves_a_model_that_loads_like_the_checkpoint(finished,
                                                                                            tiny_checkpoints, script):
    result, run_dir = finished[script][0]
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "the offline policy scores" in result.stdout and f"saved {run_dir / 'model.pt'}" in result.stdout
    assert result.stdout.strip().splitlines()[-1].endswith("after 120 steps"), result.stdout
    logged = scalars(run_dir)
    assert [step for step, _ in logged["eval/normalized_score"]] == [0, 60, 120]
    assert [step for step, _ in logged["samg/p_mean"]] == [120]  # updated from step 61, logged at the last step
    for tag in ["losses/qf_loss", "losses/qf_values", "losses/actor_loss", "samg/cvae_loss", "samg/p_active_frac",
                "samg/target_shift", "samg/qoff_values", "samg/qbar_values", "samg/qoff_above_frac", "samg/p_q10",
                "samg/p_q50", "samg/p_q90", "samg/p_auroc", "charts/episodic_return", "charts/SPS", "eval/return"]:
        assert tag in logged, f"{tag} missing"
    assert all(math.isfinite(value) for _, value in logged["losses/qf_loss"] + logged["losses/actor_loss"])
    assert all(0.0 <= value <= 1.0 for _, value in logged["samg/p_mean"] + logged["samg/p_auroc"])

    (events,) = run_dir.glob("events.out.tfevents.*")
    assert sorted(os.listdir(run_dir)) == sorted(["model.pt", events.name])  # no model.pt.tmp left
    model = torch.load(run_dir / "model.pt", weights_only=True)
    offline = torch.load(tiny_checkpoints.checkpoint(SCRIPTS[script]), weights_only=True)
    assert model["format"] == "samg-offline-1" and model["algo"] == SCRIPTS[script] and model["online_steps"] == 120
    assert set(offline) <= set(model) and model["online_args"]["total_timesteps"] == 120
    networks = ["actor", "critic", "cvae"] + ["value"] * (script == "samg_iql.py")
    for network in networks:  # all were trained online (the C-VAE: adaptive by default)
        assert model[network].keys() == offline[network].keys(), network
        assert any(not torch.equal(model[network][k], offline[network][k]) for k in offline[network]), network


def test_two_runs_started_at_the_same_moment_get_a_directory_each_with_its_own_model_and_log(finished):
    (first, first_dir), (second, second_dir) = finished["samg_td3.py"]
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first_dir != second_dir and first_dir.parent == second_dir.parent
    assert sorted(first_dir.parent.iterdir()) == sorted([first_dir, second_dir])
    for run_dir in (first_dir, second_dir):
        assert torch.load(run_dir / "model.pt", weights_only=True)["online_steps"] == 120
        assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    # the name ends in the second the run started; two runs of one second: the later takes the suffix -2
    (stem, suffix), (other_stem, other_suffix) = sorted(
        re.fullmatch(r"(.+__\d+)(-\d+)?", d.name).groups(default="") for d in (first_dir, second_dir))
    assert (suffix, other_suffix) == ("", "-2" if stem == other_stem else "")


def test_the_same_seed_gives_bit_identical_models_and_logs_on_cpu(finished):
    (_, first_dir), (_, second_dir) = finished["samg_td3.py"]
    assert first_dir != second_dir  # two runs, not one read twice
    first, second = (torch.load(d / "model.pt", weights_only=True) for d in (first_dir, second_dir))
    for network in ["actor", "critic", "cvae"]:
        assert all(torch.equal(first[network][k], second[network][k]) for k in first[network]), network
    first_log, second_log = scalars(first_dir), scalars(second_dir)
    first_log.pop("charts/SPS"), second_log.pop("charts/SPS")  # the machine's speed
    assert first_log == second_log


def test_online_fine_tuning_never_reads_the_offline_dataset(finished):
    """The runs above had MINARI_DATASETS_PATH pointing at a store that does not exist."""
    assert all(result.returncode == 0 for runs in finished.values() for result, _ in runs)


# --- inside a run: main() in this process, with Run.finish catching main's variables ---
MODULES = {}


def script_module(script: str):
    if script not in MODULES:
        MODULES[script] = load_script(script.removesuffix(".py"))
    return MODULES[script]


def fine_tune_in_process(script: str, checkpoint, run_dir, **flags) -> dict:
    """The script's main() on a short run (no subprocess); returns main's local variables as Run.finish saw them."""
    module = script_module(script)
    args = module.Args(**{**dict(env_id=ENV_ID, checkpoint=str(checkpoint), total_timesteps=150, learning_starts=50,
                                 eval_freq=10**6, eval_episodes=1, run_dir=str(run_dir), cuda=False), **flags})
    seen, finish = {}, module.Run.finish
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def finish_and_see(self, *args, **kwargs):
        seen.update(sys._getframe(1).f_locals, run=self)
        return finish(self, *args, **kwargs)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(module.Run, "finish", finish_and_see)
            module.main(args)
    finally:
        for number, handler in handlers.items():  # Run.finish ignores Ctrl-C from then on: not in pytest
            signal.signal(number, handler)
    return seen


def offline_value(script: str) -> tuple:
    """The name of Q_off in main(), and its key in the checkpoint: IQL's SAMG guides with a frozen V_off."""
    return ("value_offline", "value") if script == "samg_iql.py" else ("q_offline", "critic")


def same(module: torch.nn.Module, state: dict) -> bool:
    return module.state_dict().keys() == state.keys() and all(torch.equal(w, state[k])
                                                               for k, w in module.state_dict().items())


def initial_reference(script: str, checkpoint: dict) -> torch.Tensor:
    """p's reference as the run starts: the reservoir ranked by the checkpoint's C-VAE."""
    module = script_module(script)
    cvae = module.CVAE(*(checkpoint[key] for key in ("obs_dim", "act_dim", "latent_dim", "hidden_dims")))
    cvae.load_state_dict(checkpoint["cvae"])
    return module.Coefficient(module.Args(), cvae, checkpoint["cvae_calibration"], torch.device("cpu")).reference


FROZEN = {  # flags: which of Q_off (V_off for IQL), the C-VAE and p's reference stay bit-identical to the start
    "defaults (Q_off frozen, the C-VAE adaptive)": ({}, {"q_off": True, "cvae": False, "reference": False}),
    "--no-adaptive": ({"adaptive": False}, {"q_off": True, "cvae": True, "reference": True}),
    "--qoff-refresh-every 150": ({"qoff_refresh_every": 150}, {"q_off": False, "cvae": False, "reference": False}),
}


@pytest.mark.parametrize("case", FROZEN)
@pytest.mark.parametrize("script", SCRIPTS)
def test_q_off_and_a_static_cvae_stay_bit_identical_to_the_checkpoint_through_a_run(tiny_checkpoints, tmp_path,
                                                                                     script, case):
    flags, unchanged = FROZEN[case]
    path = tiny_checkpoints.checkpoint(SCRIPTS[script])
    seen = fine_tune_in_process(script, path, tmp_path, **flags)
    checkpoint = torch.load(path, weights_only=True)
    name, key = offline_value(script)
    assert seen["global_step"] == 150 and seen["num_updates"] == 100
    assert same(seen[name], checkpoint[key]) == unchanged["q_off"]
    assert same(seen["cvae"], checkpoint["cvae"]) == unchanged["cvae"]
    assert torch.equal(seen["coefficient"].reference, initial_reference(script, checkpoint)) == unchanged["reference"]
    if flags.get("qoff_refresh_every"):  # refreshed at step 150, the last: Q_off is the online network there
        assert same(seen[name], seen[key].state_dict())


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_same_seed_gives_bit_identical_networks_in_every_script(tiny_checkpoints, tmp_path, script):
    path = tiny_checkpoints.checkpoint(SCRIPTS[script])
    first, second = (fine_tune_in_process(script, path, tmp_path / str(i), total_timesteps=80, learning_starts=40)
                     for i in range(2))
    networks = ["actor", "critic", "cvae"] + ["value"] * (script == "samg_iql.py")
    for network in networks:
        assert same(first[network], second[network].state_dict()), network
    assert not same(first["critic"], torch.load(path, weights_only=True)["critic"])


def without_reservoir(tiny_checkpoints, tmp_path):
    """The cql checkpoint as written before checkpoints carried a reservoir of offline pairs."""
    checkpoint = torch.load(tiny_checkpoints.checkpoint("cql"), weights_only=True)
    checkpoint["cvae_calibration"] = {"neg_elbo_quantiles": checkpoint["cvae_calibration"]["neg_elbo_quantiles"]}
    torch.save(checkpoint, tmp_path / "no-reservoir.pt")
    return tmp_path / "no-reservoir.pt"


def test_a_checkpoint_without_a_reservoir_runs_with_a_static_cvae_ranking_against_its_quantiles(tiny_checkpoints,
                                                                                                 tmp_path):
    path = without_reservoir(tiny_checkpoints, tmp_path)
    seen = fine_tune_in_process("samg_sac.py", path, tmp_path / "runs", adaptive=False)
    quantiles = torch.load(path, weights_only=True)["cvae_calibration"]["neg_elbo_quantiles"]
    assert seen["global_step"] == 150 and torch.equal(seen["coefficient"].reference, quantiles)


def test_runs_made_in_the_same_second_get_the_suffixes_2_and_3(tiny_checkpoints, tmp_path, monkeypatch):
    module = script_module("samg_td3.py")
    checkpoint = torch.load(tiny_checkpoints.checkpoint("td3bc"), weights_only=True)
    monkeypatch.setattr(module, "time", types.SimpleNamespace(time=lambda: 1_800_000_000.0))  # one second for all
    args = module.Args(env_id=ENV_ID, run_dir=str(tmp_path))
    runs = [module.Run(args, checkpoint, "c.pt") for _ in range(3)]
    for run in runs:
        run.writer.close()
    names = [os.path.basename(run.dir) for run in runs]
    script_name = os.path.basename(sys.argv[0]).removesuffix(".py")  # this process's: pytest's
    base = f"local-hopper-medium-v0__{script_name}__cvae-next-adaptive__1__1800000000"
    assert names == [base, f"{base}-2", f"{base}-3"] and sorted(os.listdir(tmp_path)) == sorted(names)


# --- signals, errors and diverged losses of a real run ---
ANNOUNCE_EVALUATION = """
import gymnasium
_make = gymnasium.make
def make(*args, **kwargs):  # prints a line as the first evaluation episode (seed 10,001) begins
    env = _make(*args, **kwargs)
    reset = env.reset
    def announcing_reset(*, seed=None, options=None):
        if seed == 10_001:
            print("an evaluation begins", flush=True)
        return reset(seed=seed, options=options)
    env.reset = announcing_reset
    return env
gymnasium.make = make
"""


def test_ctrl_c_during_the_first_evaluation_exits_130_with_one_line_and_saves_the_model(tiny_checkpoints, tmp_path):
    run_dir = tmp_path / "runs"
    process = start("samg_td3.py", "--env-id", ENV_ID, "--eval-episodes", 10_000, "--save-model", "--run-dir", run_dir,
                    cwd=tiny_checkpoints.base, env=dict(tiny_checkpoints.env, **no_store(tmp_path)),
                    inject=ANNOUNCE_EVALUATION)
    before = read_until(process, "an evaluation begins")  # the step-0 evaluation of 10,000 episodes is under way
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate()
    stdout = before + stdout
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert "the offline policy scores" not in stdout  # the evaluation was cut short
    assert [line for line in stdout.splitlines() if line.startswith("stopped")] == [
        "stopped at step 0: interrupted (SIGINT); keeping the logs and the model"], stdout
    (run,) = os.listdir(run_dir)
    assert torch.load(run_dir / run / "model.pt", weights_only=True)["online_steps"] == 0


def test_losses_that_turn_nan_stop_the_run_at_the_next_log_step_with_one_line_and_keep_the_model(tiny_checkpoints,
                                                                                               tmp_path):
    run_dir = tmp_path / "runs"  # 990 steps without updates, then 10 with a critic learning rate of 1e30
    result = subprocess.run(command("samg_td3.py", "--env-id", ENV_ID, "--total-timesteps", 1500, "--learning-starts",
                                    990, "--eval-freq", 10**6, "--eval-episodes", 1, "--critic-lr", 1e30,
                                    "--save-model", "--run-dir", run_dir),
                            cwd=tiny_checkpoints.base, env=dict(tiny_checkpoints.env, **no_store(tmp_path)),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    stopped = [line for line in result.stdout.splitlines() if line.startswith("stopped")]
    assert len(stopped) == 1 and stopped[0].startswith("stopped at step 1000: losses/qf_loss is nan: "), stopped
    assert stopped[0].endswith("the training diverged (a learning rate too large?); keeping the logs and the model")
    assert "normalized score: offline" not in result.stdout
    (run,) = os.listdir(run_dir)
    assert torch.load(run_dir / run / "model.pt", weights_only=True)["online_steps"] == 1000


def test_a_run_dir_with_a_byte_that_is_not_utf8_is_one_sentence(tiny_checkpoints, tmp_path):
    run_dir = os.fsencode(tmp_path) + b"/runs-\xff"
    result = subprocess.run([*command("samg_td3.py", *SHORT), b"--run-dir", run_dir], cwd=tiny_checkpoints.base,
                            env=dict(tiny_checkpoints.env, **no_store(tmp_path)), capture_output=True, timeout=600)
    result.stderr = result.stderr.decode(errors="replace")
    one_sentence(result, "cannot write a run directory in", "choose another --run-dir")
    assert b"saved" not in result.stdout


# --- refusals: each case is a command and the sentence it must print; all of them run in one process ---
FLAG_CASES = {  # id: (script, flags, the sentence holds)
    "batch size 0": ("samg_sac.py", ["--batch-size", 0], "--batch-size is 0 but must be positive"),
    "eval freq 0": ("samg_sac.py", ["--eval-freq", 0], "--eval-freq is 0 but must be positive"),
    "policy freq 0": ("samg_td3.py", ["--policy-freq", 0], "--policy-freq is 0 but must be positive"),
    "negative refresh": ("samg_awac.py", ["--qoff-refresh-every", -1], "--qoff-refresh-every is -1 but must be zero"),
    "negative steps": ("samg_sac.py", ["--total-timesteps", -10], "--total-timesteps is -10 but must be positive"),
    "negative learning starts": ("samg_td3.py", ["--learning-starts", -1], "--learning-starts is -1 but must be zero"),
    "negative seed": ("samg_td3.py", ["--seed", -1], "--seed is -1 but must be in [0, 2**31)"),
    "no eval episodes": ("samg_awac.py", ["--eval-episodes", 0], "--eval-episodes is 0 but must be positive"),
    "nan gamma": ("samg_sac.py", ["--gamma", "nan"], "--gamma is nan but must be in [0, 1]"),
    "tau above 1": ("samg_iql.py", ["--tau", 1.5], "--tau is 1.5 but must be in [0, 1]"),
    "infinite learning rate": ("samg_td3.py", ["--critic-lr", "inf"], "--critic-lr is inf but must be positive"),
    "zero alpha lr": ("samg_sac.py", ["--alpha-lr", 0], "--alpha-lr is 0.0 but must be positive"),
    "even p above 1": ("samg_iql.py", ["--coef-mode", "even", "--even-p", 1.5],
                       "--even-p is 1.5 but must be in [0, 1]"),
    "threshold below 0": ("samg_sac.py", ["--p-threshold", -0.1], "--p-threshold is -0.1 but must be in [0, 1]"),
    "threshold above 1": ("samg_sac.py", ["--p-threshold", 1.5], "--p-threshold is 1.5 but must be in [0, 1]"),
    "mastered quantile 0": ("samg_td3.py", ["--mastered-quantile", 0],
                            "--mastered-quantile is 0.0 but must be in (0, 1]"),
    "learning starts after the end": ("samg_sac.py", ["--total-timesteps", 400, "--learning-starts", 500],
                                      "--learning-starts is 500 but must be below --total-timesteps"),
    "offline data ratio 1": ("samg_td3.py", ["--offline-data-ratio", 1],
                             "--offline-data-ratio is 1.0 but must be in [0, 1)"),
    "awac lambda 0": ("samg_awac.py", ["--awac-lambda", 0], "--awac-lambda is 0.0 but must be positive"),
    "iql expectile 1": ("samg_iql.py", ["--iql-expectile", 1], "--iql-expectile is 1.0 but must be strictly between"),
    "iql beta 0": ("samg_iql.py", ["--iql-beta", 0], "--iql-beta is 0.0 but must be positive"),
    "a replay buffer beyond the memory": ("samg_td3.py", ["--total-timesteps", 10**12],
                                          "--total-timesteps 1000000000000 needs a replay buffer of"),
}


def damaged(checkpoint: dict, **changes) -> dict:
    """A copy of `checkpoint` with keys replaced (None: removed); `calibration_KEY` changes cvae_calibration[KEY]."""
    checkpoint, calibration = dict(checkpoint), dict(checkpoint["cvae_calibration"])
    for key, value in changes.items():
        place = calibration if key.startswith("calibration_") else checkpoint
        key = key.removeprefix("calibration_")
        place.pop(key) if value is None else place.__setitem__(key, value)
    return dict(checkpoint, cvae_calibration=calibration)


def nan_weights(checkpoint: dict, network: str) -> dict:
    return {network: {k: torch.full_like(v, float("nan")) for k, v in checkpoint[network].items()}}


NO_RESERVOIR = dict(calibration_reservoir_obs=None, calibration_reservoir_actions=None)
CHECKPOINT_CASES = {  # id: (changes to the cql checkpoint, extra flags, the sentence holds, script bug or None)
    "obs_dim missing": (dict(obs_dim=None), [], ["bad or missing obs_dim (it must be a positive integer"], None),
    "hidden_dims other than the weights'": (dict(hidden_dims=[64, 64]), [], ["does not fit its stated sizes"], None),
    "obs_mean of another size": (dict(obs_mean=torch.zeros(3)), [], ["bad or missing obs_std", "obs_mean"], None),
    "obs_std zero": (dict(obs_std=torch.zeros(11)), [], ["bad or missing obs_std (it must be obs_dim positive"], None),
    "action_low of another size": (dict(action_low=torch.zeros(2)), [], ["bad or missing action_low"], None),
    "reference scores equal": (dict(ref_min_score=3234.3, ref_max_score=3234.3), [],
                               ["bad or missing ref_min_score (it must be a number, other than ref_max_score)"], None),
    "reward_scale infinite": (dict(reward_scale=float("inf")), [], ["bad or missing reward_scale"], None),
    "actor a list": (dict(actor=[1.0, 2.0]), [], ["has a bad or missing", "actor"], None),
    "critic a list": (dict(critic=[1.0, 2.0]), [], ["has a bad or missing critic (it must be a state dict"], None),
    "cvae a list": (dict(cvae=[1.0, 2.0]), [], ["has a bad or missing", "cvae"], None),
    "actor weights nan": ("actor", [], ["the actor in", "has weights that are not finite"], None),
    "critic weights nan": ("critic", [], ["bad or missing critic"], None),
    "quantiles missing": (dict(calibration_neg_elbo_quantiles=None), [], ["bad or missing cvae_calibration"], None),
    "quantiles 2-d": (dict(calibration_neg_elbo_quantiles=torch.zeros(4, 2)), [], ["bad or missing cvae_calibration"],
                      None),
    "quantiles empty, no reservoir, static C-VAE": (
        dict(calibration_neg_elbo_quantiles=torch.zeros(0), **NO_RESERVOIR), ["--no-adaptive"], ["cvae_calibration"],
        None),
    "quantiles unsorted, no reservoir, static C-VAE": (
        dict(calibration_neg_elbo_quantiles=torch.linspace(1, 0, 11), **NO_RESERVOIR), ["--no-adaptive"],
        ["cvae_calibration"], None),
    "reservoir a list": (dict(calibration_reservoir_obs=[[1.0]]), [], ["bad or missing cvae_calibration"], None),
    "no reservoir for an adaptive C-VAE": (NO_RESERVOIR, [], ["has no reservoir of offline pairs",
                                                              "pass --no-adaptive"], None),
    "log_alpha of three numbers": (dict(log_alpha=torch.zeros(3)), [],
                                   ["bad or missing log_alpha (it must be a number"], None),
    "an unknown environment option": (dict(gym_kwargs={"no_such_option": 1}), [],
                                      ["cannot make the environment Hopper-v5 of", "no_such_option"], None),
    "an environment of other spaces": (dict(gym_id="Walker2d-v5"), [],
                                       ["Walker2d-v5 now has other spaces than", "pretrain again"], None),
    "another format": (dict(format="something-else"), [], ["is not a checkpoint of pretrain_offline.py"], None),
}
OTHER_CASES = {  # id: (script, flags, the sentence holds); {name} is a path the fixture makes
    "no checkpoint: sac": ("samg_sac.py", ["--seed", 77],
                           "`python pretrain_offline.py --env-id local/hopper/medium-v0 --algo cql --seed 77`"),
    "no checkpoint: td3": ("samg_td3.py", ["--seed", 77], "--algo td3bc --seed 77`"),
    "no checkpoint: awac": ("samg_awac.py", ["--seed", 77], "--algo awac --seed 77`"),
    "no checkpoint: iql": ("samg_iql.py", ["--seed", 77], "--algo iql --seed 77`"),
    "a checkpoint of another algorithm": ("samg_sac.py", ["--checkpoint", "{td3bc}"],
                                          "was pretrained with --algo td3bc but this script needs cql"),
    "not a checkpoint at all": ("samg_awac.py", ["--checkpoint", "{garbage}"], "is not a readable checkpoint"),
    "a run dir below a file": ("samg_td3.py", ["--run-dir", "{blocked}/runs"], "cannot write a run directory in"),
    "offline data ratio without the dataset": ("samg_td3.py", ["--offline-data-ratio", 0.5],
                                               "--offline-data-ratio reads the checkpoint's dataset"),
}


@pytest.fixture(scope="module")
def refusals(tiny_checkpoints, script_cases, tmp_path_factory):
    """Every FLAG_CASES, CHECKPOINT_CASES and OTHER_CASES command, all run in one process with the offline dataset
    out of reach, each with a --run-dir of its own: {id: (result, that run dir)}."""
    folder = tmp_path_factory.mktemp("refusals")
    cql = torch.load(tiny_checkpoints.checkpoint("cql"), weights_only=True)
    (folder / "garbage.pt").write_bytes(b"not a checkpoint")
    (folder / "blocked").write_text("a file in the way")
    places = dict(td3bc=tiny_checkpoints.checkpoint("td3bc"), garbage=folder / "garbage.pt", blocked=folder / "blocked")
    commands = {case: (script, flags) for case, (script, flags, _) in FLAG_CASES.items()}
    for case, (changes, flags, _, _) in CHECKPOINT_CASES.items():
        path = folder / f"checkpoint-{len(commands)}.pt"
        torch.save(damaged(cql, **(nan_weights(cql, changes) if isinstance(changes, str) else changes)), path)
        commands[case] = ("samg_sac.py", ["--checkpoint", path, *flags])
    for case, (script, flags, _) in OTHER_CASES.items():
        commands[case] = (script, [str(flag).format(**places) for flag in flags])
    run_dirs = {case: folder / "runs" / str(number) for number, case in enumerate(commands)}
    results = script_cases([(script, ["--env-id", ENV_ID, "--total-timesteps", 60, "--learning-starts", 30,
                                      "--eval-episodes", 1, "--run-dir", run_dirs[case], *flags])
                            for case, (script, flags) in commands.items()],  # were one accepted: a short run
                           cwd=tiny_checkpoints.base, env=no_store(folder))
    return {case: (result, run_dirs[case]) for case, result in zip(commands, results)}


def bug(reason):
    return pytest.mark.xfail(strict=True, reason=f"script bug: {reason}") if reason else ()


@pytest.mark.parametrize("case", FLAG_CASES)
def test_a_flag_out_of_its_range_is_one_sentence_naming_it_and_writes_nothing(refusals, case):
    result, run_dir = refusals[case]
    one_sentence(result, FLAG_CASES[case][2])
    assert not run_dir.exists()


@pytest.mark.parametrize("case", [pytest.param(case, marks=bug(v[3])) for case, v in CHECKPOINT_CASES.items()])
def test_a_damaged_checkpoint_is_one_sentence_naming_what_is_wrong_and_writes_nothing(refusals, case):
    result, run_dir = refusals[case]
    one_sentence(result, *CHECKPOINT_CASES[case][2])
    assert not run_dir.exists()


@pytest.mark.parametrize("case", OTHER_CASES)
def test_a_missing_or_wrong_checkpoint_or_dataset_or_place_is_one_sentence(refusals, case):
    result, run_dir = refusals[case]
    one_sentence(result, OTHER_CASES[case][2])
    assert not run_dir.exists()
