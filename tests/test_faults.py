"""Faults a real run meets, as tables: the command, the one sentence it must end with, and the data that must be
intact afterwards. Ids typed by hand, numbers that escaped, damaged data, signals (SIGTERM from a scheduler, a second
one right after, one before the run starts), a full disk (an OSError(ENOSPC) injected at the write, or a place
reported full), two writers of one result, and leftovers of killed runs.

Speed: the store and the checkpoint are the session's (conftest's tiny_checkpoints); a table of refusals runs in one
process (conftest's run_cases). Nothing waits a number of seconds: a signal is sent once the run has printed where it
is, or the run sends it to itself at a chosen moment."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import h5py
import pytest
import torch

from conftest import ROOT, TINY_PRETRAIN, load_script, make_tiny_dataset

ENV_ID = "local/hopper/medium-v0"
TINY = ["--algo", "td3bc", *TINY_PRETRAIN]
ONLINE = ["--env-id", ENV_ID, "--total-timesteps", 60, "--learning-starts", 30, "--eval-freq", 60,
          "--eval-episodes", 1]


@pytest.fixture(scope="module")
def lab(tiny_checkpoints, tmp_path_factory):
    """The session's Minari store and td3bc checkpoint, and a folder of this module's own to run the scripts in, so
    that what they write (checkpoints, runs) never lands beside the session's checkpoints."""
    base = tmp_path_factory.mktemp("faults")
    return types.SimpleNamespace(base=base, env=tiny_checkpoints.env, store=tiny_checkpoints.store,
                                 checkpoint=tiny_checkpoints.checkpoint("td3bc"))


def command(script, *args, inject=None) -> list:
    """The script as a user runs it; `inject` is Python run first in the same process (to make a write fail)."""
    if inject is None:
        return [sys.executable, str(ROOT / script), *map(str, args)]
    return [sys.executable, "-c", f"import runpy, sys\n{inject}\nsys.argv = {[script, *map(str, args)]!r}\n"
                                  f"runpy.run_path({str(ROOT / script)!r}, run_name='__main__')"]


def run(lab, script, *args, inject=None) -> subprocess.CompletedProcess:
    return subprocess.run(command(script, *args, inject=inject), cwd=lab.base, env=lab.env, capture_output=True,
                          text=True, timeout=600)


def one_sentence(result, *fragments) -> str:
    assert result.returncode not in (0, None) and "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and all(f in message for f in fragments), message
    return message


def snapshot(folder):
    """Every file below `folder` with its size and modification time: equal before and after means untouched."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in folder.rglob("*") if p.is_file())


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid  # a process id that no longer runs


# --- ids typed by hand: checked for their form before any path is built; "damaged" only of a real dataset ---
ID_CASES = {
    "./local/hopper/medium-v0": "is a path, not a dataset id",
    "../../../../../../etc": "is a path, not a dataset id",
    "/etc/passwd-v0": "is a path, not a dataset id",
    "local/hopper": "is a namespace of the Minari store, not a dataset; name one of its datasets: local/hopper/",
    "local/hopper/mediun-v0": "no local dataset local/hopper/mediun-v0",
    "local/hopper/empty-v0": "no local dataset local/hopper/empty-v0",  # a folder without Minari's metadata
    "local hopper": "unknown --env-id",
}
NO_NETWORK = """
import socket, sys
def refuse(*args, **kwargs):
    print("the network was asked for", file=sys.stderr)
    raise OSError("no network in this test")
socket.socket.connect = socket.getaddrinfo = socket.create_connection = refuse
"""


@pytest.fixture(scope="module")
def id_refusals(lab, script_cases):
    """Each ID_CASES id given to pretrain_offline.py, all in one process without a network: ({id: result}, whether
    the store was left as it was)."""
    (lab.store / "local" / "hopper" / "empty-v0").mkdir(exist_ok=True)
    before = snapshot(lab.store)
    results = script_cases([("pretrain_offline.py", ["--env-id", env_id, "--seed", 7, *TINY]) for env_id in ID_CASES],
                           cwd=lab.base, env=lab.env, prelude=NO_NETWORK)
    return dict(zip(ID_CASES, results)), snapshot(lab.store) == before


@pytest.mark.parametrize("env_id", ID_CASES)
def test_an_id_of_the_wrong_form_is_one_sentence_that_never_calls_a_healthy_folder_damaged(id_refusals, env_id):
    results, store_untouched = id_refusals
    sentence = one_sentence(results[env_id], ID_CASES[env_id])
    assert "delete" not in sentence and "damaged" not in sentence
    assert "the network was asked for" not in results[env_id].stderr  # a local id is never downloaded
    assert store_untouched


def test_a_trailing_slash_from_tab_completion_names_the_same_dataset(lab):
    result = run(lab, "pretrain_offline.py", "--env-id", ENV_ID + "/", "--seed", 2, *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (lab.base / "checkpoints" / "local-hopper-medium-v0__td3bc__2.pt").exists()


# --- numbers that escaped: the seed, threads ---
NUMBER_CASES = {  # id: (script, arguments, the sentence holds)
    "seed 2**32, pretraining": ("pretrain_offline.py", ["--env-id", ENV_ID, *TINY, "--seed", 2**32],
                                "--seed is 4294967296 but must be below 2**31"),
    "seed 2**32, make_dataset": ("make_dataset.py", ["--gym-id", "Pendulum-v1", "--qualities", "random",
                                                     "--expert-return", "-150", "--seed", 2**32],
                                 "--seed is 4294967296 but must be below 2**31"),
    "seed 2**32, online": ("samg_td3.py", [*ONLINE, "--seed", 2**32], "--seed is 4294967296 but must be in [0, 2**31)"),
    "negative threads, online": ("samg_td3.py", [*ONLINE, "--threads", -1], "--threads is -1 but must be from 0"),
    "more threads than cores, online": ("samg_td3.py", [*ONLINE, "--threads", os.cpu_count() + 1],
                                        f"--threads is {os.cpu_count() + 1} but must be from 0 to the "
                                        f"{os.cpu_count()} cores of this machine"),
}


@pytest.fixture(scope="module")
def number_refusals(lab, script_cases):
    results = script_cases([(script, args) for script, args, _ in NUMBER_CASES.values()], cwd=lab.base, env=lab.env)
    return dict(zip(NUMBER_CASES, results))


@pytest.mark.parametrize("case", NUMBER_CASES)
def test_a_seed_or_thread_count_out_of_range_is_one_sentence_in_every_script(number_refusals, case):
    one_sentence(number_refusals[case], NUMBER_CASES[case][2])


# --- damaged data: one sentence before any training, and no checkpoint that the online scripts would refuse ---
def copy_dataset(store, name, edit):
    """A copy of the tiny dataset as local/hopper/{name}-v0, changed by `edit(folder)`."""
    import shutil

    source, target = store / "local" / "hopper" / "medium-v0", store / "local" / "hopper" / f"{name}-v0"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    metadata = json.loads((target / "data" / "metadata.json").read_text())
    metadata["dataset_id"] = f"local/hopper/{name}-v0"
    (target / "data" / "metadata.json").write_text(json.dumps(metadata))
    edit(target / "data")
    return f"local/hopper/{name}-v0"


def edit_metadata(**changes):
    def edit(folder):
        metadata = json.loads((folder / "metadata.json").read_text())
        for key, value in changes.items():
            if key == "env_id":
                for spec_key in [k for k in ("env_spec", "eval_env_spec") if k in metadata]:
                    spec = json.loads(metadata[spec_key])
                    spec["id"] = value
                    metadata[spec_key] = json.dumps(spec)
            else:
                metadata[key] = value
        (folder / "metadata.json").write_text(json.dumps(metadata))
    return edit


def unreadable_metadata(folder):
    (folder / "metadata.json").write_text("{not json")


def edit_episode(key, change):
    def edit(folder):
        with h5py.File(folder / "main_data.hdf5", "r+") as file:
            values = change(file["episode_0"][key][()])
            del file["episode_0"][key]
            file["episode_0"].create_dataset(key, data=values)
    return edit


def huge_reward(rewards):
    rewards[0] = 3e38
    return rewards


DATA_CASES = {  # name: (the change, the sentence holds)
    "broken": (unreadable_metadata, ("is unreadable",)),
    "string-score": (edit_metadata(ref_min_score="low"), ("reference scores 'low' and 3234.3, not two different",)),
    "nan-score": (edit_metadata(ref_min_score=float("nan")), ("not two different finite numbers",)),
    "equal-scores": (edit_metadata(ref_min_score=3234.3), ("not two different finite numbers",)),
    "no-env": (edit_metadata(env_id="NoSuchEnv-v0"), ("records no usable environment",)),
    "short-actions": (edit_episode("actions", lambda a: a[:-3]), ("actions", "re-create it")),
    "huge-rewards": (edit_episode("rewards", huge_reward), ("rewards as large as 3e+38",)),
}


@pytest.fixture(scope="module")
def data_refusals(lab, script_cases):
    """Pretraining on each DATA_CASES copy of the dataset, all in one process: {name: (dataset id, result)}."""
    ids = {name: copy_dataset(lab.store, name, edit) for name, (edit, _) in DATA_CASES.items()}
    results = script_cases([("pretrain_offline.py", ["--env-id", dataset_id, *TINY]) for dataset_id in ids.values()],
                           cwd=lab.base, env=lab.env)
    return {name: (ids[name], result) for name, result in zip(ids, results)}


@pytest.mark.parametrize("name", DATA_CASES)
def test_damaged_data_is_one_sentence_before_training_and_writes_no_checkpoint(lab, data_refusals, name):
    dataset_id, result = data_refusals[name]
    one_sentence(result, dataset_id, *DATA_CASES[name][1])
    assert not (lab.base / "checkpoints" / f"{dataset_id.replace('/', '-')}__td3bc__1.pt").exists()


def test_pretraining_that_diverges_writes_no_checkpoint(lab):
    inject = ("import torch.optim\n_step = torch.optim.Adam.step\n"
              "def step(self, *a, **k):\n    out = _step(self, *a, **k)\n"
              "    [p.data.fill_(float('nan')) for g in self.param_groups for p in g['params']]\n    return out\n"
              "torch.optim.Adam.step = step\n")
    result = run(lab, "pretrain_offline.py", "--env-id", ENV_ID, "--seed", 5, *TINY, inject=inject)
    one_sentence(result, "training diverged", "no checkpoint was written")
    assert not (lab.base / "checkpoints" / "local-hopper-medium-v0__td3bc__5.pt").exists()


# --- signals: SIGTERM and SIGHUP are Ctrl-C; the first stops the run, the ones after it are ignored ---
def fine_tuning(lab, run_dir, *flags, inject=None) -> subprocess.Popen:
    """A long fine-tuning run with --save-model (it only ends by a signal)."""
    process = subprocess.Popen(command("samg_td3.py", "--env-id", ENV_ID, "--checkpoint", lab.checkpoint,
                                       "--total-timesteps", 100_000, "--learning-starts", 50, "--eval-freq", 10**6,
                                       "--eval-episodes", 1, "--save-model", "--run-dir", run_dir, *flags,
                                       inject=inject),
                               cwd=lab.base, env=lab.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even from a batch job
    guard = threading.Timer(600, process.kill)  # against a hang, never a wait; it does not hold pytest at its exit
    guard.daemon = True
    guard.start()
    return process


SIGNAL_CASES = {  # case: the signals sent 1 ms apart once the loop runs (Ctrl-C alone: test_samg_scripts.py)
    "SIGTERM, then SIGTERM 1 ms later, during the final save": (signal.SIGTERM, signal.SIGTERM),
    "SIGHUP, then Ctrl-C 1 ms later": (signal.SIGHUP, signal.SIGINT),
}


@pytest.mark.parametrize("case", SIGNAL_CASES)
def test_signals_during_fine_tuning_stop_it_once_save_the_model_and_exit_128_plus_the_first(lab, tmp_path, case):
    first, *others = SIGNAL_CASES[case]
    run_dir = tmp_path / "runs"
    process = fine_tuning(lab, run_dir)
    printed = []
    for line in process.stdout:  # the step-0 evaluation is over and the loop runs
        printed.append(line)
        if "the offline policy scores" in line:
            break
    process.send_signal(first)
    for other in others:
        time.sleep(0.001)  # the next signal 1 ms after: as the first one's stop and save are under way
        process.send_signal(other)
    stdout, stderr = process.communicate()
    stdout = "".join(printed) + stdout
    assert process.returncode == 128 + first, stderr[-3000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    (stopped,) = [line for line in stdout.splitlines() if line.startswith("stopped")]
    step = int(stopped.split()[3].rstrip(":"))
    assert stopped == (f"stopped at step {step}: interrupted ({signal.Signals(first).name}); keeping the logs and "
                       "the model")
    (run_name,) = os.listdir(run_dir)
    assert f"saved {run_dir / run_name / 'model.pt'}" in stdout
    assert torch.load(run_dir / run_name / "model.pt", weights_only=True)["online_steps"] == step
    assert not list((run_dir / run_name).glob("*.tmp"))


SIGTERM_ITSELF = "import os, signal\nterm = lambda: os.kill(os.getpid(), signal.SIGTERM)\n"


def test_a_signal_before_the_run_starts_is_one_line_and_exit_143_without_a_run_directory(lab, tmp_path):
    inject = SIGTERM_ITSELF + ("import torch\n_load = torch.load\n"  # as the checkpoint is being read
                               "def load(*a, **k):\n    term()\n    return _load(*a, **k)\ntorch.load = load\n")
    result = run(lab, "samg_td3.py", *ONLINE, "--checkpoint", lab.checkpoint, "--save-model",
                 "--run-dir", tmp_path / "runs", inject=inject)
    assert result.returncode == 143 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == ["interrupted (SIGTERM) before the run started"]
    assert not (tmp_path / "runs").exists()


def test_a_signal_as_the_finished_run_begins_to_save_still_saves_the_model(lab, tmp_path):
    inject = SIGTERM_ITSELF + (  # after the last log line (charts/SPS), as Run.finish is called
        "import sys\nfrom torch.utils.tensorboard import SummaryWriter\n_add_scalar = SummaryWriter.add_scalar\n"
        "def tracer(frame, event, arg):\n"
        "    if event == 'call' and frame.f_code.co_name == 'finish':\n        sys.settrace(None)\n        term()\n"
        "def add_scalar(self, tag, *a, **k):\n"
        "    if tag == 'charts/SPS':\n        sys.settrace(tracer)\n"
        "    return _add_scalar(self, tag, *a, **k)\n"
        "SummaryWriter.add_scalar = add_scalar\n")
    result = run(lab, "samg_td3.py", *ONLINE, "--checkpoint", lab.checkpoint, "--save-model",
                 "--run-dir", tmp_path / "runs", inject=inject)
    assert "Traceback" not in result.stderr and "before the run started" not in result.stderr, result.stderr[-3000:]
    (run_name,) = os.listdir(tmp_path / "runs")
    assert torch.load(tmp_path / "runs" / run_name / "model.pt", weights_only=True)["online_steps"] == 60


def test_sigterm_during_pretraining_is_one_line_exit_143_and_no_checkpoint(lab):
    inject = SIGTERM_ITSELF + (  # in the 5th update
        "import torch.optim\n_step, calls = torch.optim.Adam.step, []\n"
        "def step(self, *a, **k):\n    calls.append(1)\n    if len(calls) == 5:\n        term()\n"
        "    return _step(self, *a, **k)\ntorch.optim.Adam.step = step\n")
    result = run(lab, "pretrain_offline.py", "--env-id", ENV_ID, "--seed", 9, *TINY, inject=inject)
    assert result.returncode == 143 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "interrupted at step" in result.stderr and "no checkpoint written" in result.stderr
    assert not (lab.base / "checkpoints" / "local-hopper-medium-v0__td3bc__9.pt").exists()


# --- leftovers of killed runs (named {pid}@{host}): removed by the next run that finds them, a live writer's kept ---
def test_leftovers_of_killed_runs_are_removed_by_the_next_run_that_finds_them(lab):
    host = load_script("pretrain_offline").HOST
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(lab.store))
        make_tiny_dataset("local/hopper/expert-v0", steps=200, seed=3)
    checkpoints = lab.base / "checkpoints"
    checkpoints.mkdir(exist_ok=True)
    killed = [checkpoints / f"local-hopper-medium-v0__td3bc__3.pt.tmp-{dead_pid()}@{host}",
              lab.store / f".combine-{dead_pid()}@{host}-abc"]
    alive = checkpoints / f"local-hopper-medium-v0__td3bc__4.pt.tmp-{os.getpid()}@{host}"  # a writer at work
    killed[0].write_bytes(b"half a checkpoint"), killed[1].mkdir(), alive.write_bytes(b"being written")
    try:  # pretraining on a combined dataset stages both a combine in the store and a checkpoint
        result = run(lab, "pretrain_offline.py", "--env-id", "hopper-medium-expert-v2", *TINY)
        assert result.returncode == 0, result.stderr[-2000:]
        assert not any(path.exists() for path in killed) and alive.exists()
    finally:
        alive.unlink()
    assert [p.name for p in lab.store.iterdir() if p.name.startswith(".")] == []
    assert (lab.store / "local" / "hopper" / "medium-expert-v0" / "data" / "metadata.json").exists()
    assert (checkpoints / "hopper-medium-expert-v2__td3bc__1.pt").exists()


# --- a full disk: one sentence, nothing lost, the store intact ---
def fail_writes_under(folder_part: str) -> str:
    """Python that makes torch.save fail with ENOSPC for paths containing `folder_part`, as a full disk does."""
    return ("import errno, torch\n_save = torch.save\n"
            "def save(obj, f, *a, **k):\n"
            f"    if {folder_part!r} in str(f):\n"
            "        raise OSError(errno.ENOSPC, 'No space left on device', str(f))\n"
            "    return _save(obj, f, *a, **k)\n"
            "torch.save = save\n")


def test_a_full_checkpoint_dir_at_the_end_of_pretraining_keeps_the_networks_elsewhere_and_says_where(lab):
    result = run(lab, "pretrain_offline.py", "--env-id", ENV_ID, "--seed", 6, *TINY,
                 inject=fail_writes_under("checkpoints"))
    message = one_sentence(result, "No space left on device", "the trained networks are saved as")
    rescued = message.split("saved as ")[1].split(" instead")[0]
    assert torch.load(rescued, weights_only=True)["algo"] == "td3bc"
    assert not list((lab.base / "checkpoints").glob("*.tmp-*"))
    os.remove(rescued)


def test_a_full_run_dir_at_the_end_of_fine_tuning_keeps_the_model_elsewhere_and_says_where(lab, tmp_path):
    result = run(lab, "samg_td3.py", *ONLINE, "--checkpoint", lab.checkpoint, "--save-model",
                 "--run-dir", tmp_path / "r", inject=fail_writes_under(str(tmp_path / "r")))
    message = one_sentence(result, "could not write", "No space left on device", "the trained networks are saved as")
    rescued = message.split("saved as ")[1].split(" instead")[0]
    assert torch.load(rescued, weights_only=True)["online_steps"] == 60
    (run_name,) = os.listdir(tmp_path / "r")
    assert "model.pt" not in os.listdir(tmp_path / "r" / run_name) and not list((tmp_path / "r").rglob("*.tmp"))
    os.remove(rescued)


def test_a_place_without_room_for_the_checkpoint_is_refused_before_pretraining(lab):
    small = ("import shutil, collections\n"
             "shutil.disk_usage = lambda p: collections.namedtuple('u', 'total used free')(10**9, 10**9, 2**20)\n")
    result = run(lab, "pretrain_offline.py", "--env-id", ENV_ID, "--seed", 8, *TINY, inject=small)
    one_sentence(result, "has 1 MiB free but this run writes about", "--checkpoint-dir")
    assert not (lab.base / "checkpoints" / "local-hopper-medium-v0__td3bc__8.pt").exists()
    assert "step 1/" not in result.stdout and "step 40/" not in result.stdout  # refused before training


def test_a_store_that_fills_while_datasets_are_written_is_left_as_it_was(lab):
    before = snapshot(lab.store)
    full = ("import errno\nfrom minari.dataset._storages.hdf5_storage import HDF5Storage\n"  # as the episodes go in
            "def update(self, *a, **k):\n    raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "HDF5Storage.update_episodes = update\n")
    result = run(lab, "make_dataset.py", "--env-id", "hopper-random-v2", "--transitions", 50, "--overwrite",
                 inject=full)
    one_sentence(result, "No space left on device", "the store was left as it was")
    assert snapshot(lab.store) == before and [p.name for p in lab.store.iterdir() if p.name.startswith(".")] == []


# --- two writers: the refusal holds at the final move; the later result is kept aside and named ---
def test_a_checkpoint_written_meanwhile_by_another_run_is_not_replaced(tmp_path):
    po = load_script("pretrain_offline")
    path = str(tmp_path / "c.pt")
    po.save_checkpoint({"run": "A"}, path)
    with pytest.raises(SystemExit, match="was written by another run while this one worked") as refusal:
        po.save_checkpoint({"run": "B"}, path)
    aside = str(refusal.value).split("kept as ")[1].split(" (move")[0]
    assert torch.load(path, weights_only=True) == {"run": "A"} and torch.load(aside, weights_only=True) == {"run": "B"}
    po.save_checkpoint({"run": "C"}, path, replace=True)  # --overwrite replaces
    assert torch.load(path, weights_only=True) == {"run": "C"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["c.pt", os.path.basename(aside)])


def test_a_dataset_written_meanwhile_by_another_run_is_not_replaced(tmp_path, monkeypatch):
    import minari

    md = load_script("make_dataset")
    store = tmp_path / "store"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(store))
    make_tiny_dataset("local/hopper/random-v0", steps=100)  # the other run's result, there before ours moves in
    before = snapshot(store)
    episodes = md.to_episodes(md.d4rl_transitions({
        "observations": torch.zeros(20, 11).numpy(), "actions": torch.zeros(20, 3).numpy(),
        "rewards": torch.ones(20).numpy(), "terminals": torch.zeros(20).numpy(),
        "timeouts": torch.tensor([0.0] * 19 + [1.0]).numpy()}))
    with pytest.raises(SystemExit, match="was written by another run while this one worked") as refusal:
        md.write_datasets(store, {"local/hopper/random-v0": episodes}, {"local/hopper/random-v0": ("x", "y")},
                          __import__("gymnasium").spec("Hopper-v5"), 0.0, 1.0, overwrite=False)
    assert [e for e in snapshot(store) if e[0].startswith("local")] == [e for e in before if e[0].startswith("local")]
    kept = Path(str(refusal.value).split("kept in ")[1].split(" (move")[0])
    assert (kept / "local" / "hopper" / "random-v0" / "data" / "metadata.json").exists()
    assert minari.load_dataset("local/hopper/random-v0").total_steps == 100  # the other run's data
