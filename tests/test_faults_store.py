"""Faults of the places that several runs share (a Minari store, a checkpoint dir), as tables.

Staged writes are named by their writer, {pid}@{host}: a run removes only the leftovers of this host's writers that no
longer run, or those untouched for a week whatever their host, so a store shared by several nodes keeps another node's
live write (simulated here by names of another host whose pid is dead here). A writer whose staging another process
removed says so in one sentence. Once a run stops, or once it begins its final writes, a second signal cannot cut them
short nor print a traceback. A Minari store path that cannot be a folder is one sentence in both scripts."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch

from conftest import ROOT, load_script, make_tiny_dataset

po = load_script("pretrain_offline")
md = load_script("make_dataset")

ENV_ID = "local/hopper/medium-v0"
TINY = ["--env-id", ENV_ID, "--algo", "td3bc", "--total-steps", 40, "--cvae-steps", 40, "--eval-freq", 40,
        "--eval-episodes", 1, "--hidden-dims", 16, 16]
RANDOM = ["--env-id", "hopper-random-v2", "--transitions", 60, "--overwrite"]
WEEK = 7 * 86_400


def this_host() -> str:
    """The host in a staged write's name: the machine's name, filename-safe, and its PID namespace unless that is the
    machine's own (0xEFFFFFFC on every Linux machine), as a container may share the machine's name."""
    namespace = os.stat("/proc/self/ns/pid").st_ino if os.path.exists("/proc/self/ns/pid") else 0xEFFFFFFC
    return re.sub(r"[^A-Za-z0-9.-]", "_", os.uname().nodename) + ("" if namespace == 0xEFFFFFFC else f"+pid{namespace}")


HOST, PID = this_host(), os.getpid()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A Minari store with a tiny dataset, and the environment to run the scripts in."""
    base = tmp_path_factory.mktemp("store_faults")
    env = dict(os.environ, MINARI_DATASETS_PATH=str(base / "store"), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", env["MINARI_DATASETS_PATH"])
        make_tiny_dataset(ENV_ID, steps=400)
    return base, env


def command(script, *args, inject=None):
    """The script as a user runs it; `inject` is Python run first in the same process (a fault at a chosen moment)."""
    if inject is None:
        return [sys.executable, str(ROOT / script), *map(str, args)]
    code = (f"import runpy, sys\n{inject}\nsys.argv = {[script, *map(str, args)]!r}\n"
            f"runpy.run_path({str(ROOT / script)!r}, run_name='__main__')")
    return [sys.executable, "-c", code]


def run(cwd, env, script, *args, inject=None):
    return subprocess.run(command(script, *args, inject=inject), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def one_sentence(result, *fragments):
    assert result.returncode not in (0, None) and "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and all(f in message for f in fragments), message
    return message


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid  # a process id that no longer runs on this host


# --- staging names its host: only this host's dead writers, or week-old leftovers of any host, are removed ---
LEFTOVERS = {  # case: (writer tag of the staged name, age in seconds, removed by a run that finds it)
    "another host, its pid dead here (the live write of another node)": ("{dead}@node-7.example", 0, False),
    "another host, its pid alive here": ("{live}@node-7.example", 0, False),
    "this host in another PID namespace, its pid dead here": ("{dead}@{host}+pid77", 0, False),
    "this host, its pid dead (a killed run)": ("{dead}@{host}", 0, True),
    "this host, its pid alive (a run at work)": ("{live}@{host}", 0, False),
    "another host, a week and a day old": ("{dead}@node-7.example", WEEK + 86_400, True),
    "another host, six days old": ("{dead}@node-7.example", WEEK - 86_400, False),
    "no host (an older version), its pid dead here": ("{dead}", 0, False),
    "no host (an older version), a week and a day old": ("{dead}", WEEK + 86_400, True),
}


def staged_checkpoint(folder: Path, tag: str) -> Path:
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / f"local-hopper-medium-v0__td3bc__1.pt.tmp-{tag}").write_bytes(b"half a checkpoint")
    return folder / "checkpoints" / f"local-hopper-medium-v0__td3bc__1.pt.tmp-{tag}"


def staged_folder(name: str):
    def stage(folder: Path, tag: str) -> Path:
        (folder / name.format(tag) / "new" / "local").mkdir(parents=True)
        return folder / name.format(tag)
    return stage


KINDS = {  # kind: (what a writer stages, the cleaning a run does where it finds it)
    "pretraining's checkpoint": (staged_checkpoint,
                                 lambda folder: po.remove_dead_leftovers(str(folder / "checkpoints"),
                                                                         po.STAGED_CHECKPOINT)),
    "pretraining's medium-expert combine": (staged_folder(".combine-{}-k3j_x9q2"),
                                            lambda folder: po.remove_dead_leftovers(str(folder), po.STAGED_COMBINE)),
    "make_dataset's datasets": (staged_folder(".make_dataset-{}"), lambda folder: md.recover_killed_writes(folder)),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", LEFTOVERS)
def test_only_this_hosts_dead_writers_and_week_old_leftovers_are_removed(tmp_path, kind, case):
    tag, age, removed = LEFTOVERS[case]
    stage, clean = KINDS[kind]
    path = stage(tmp_path, tag.format(dead=dead_pid(), live=os.getppid(), host=HOST))
    os.utime(path, (time.time() - age, time.time() - age))
    clean(tmp_path)
    assert path.exists() != removed


def staged_name_of_checkpoint(tmp_path, monkeypatch):
    names, save = [], torch.save
    monkeypatch.setattr(po.torch, "save", lambda obj, f, *a, **k: names.append(Path(f).name) or save(obj, f, *a, **k))
    po.save_checkpoint({"run": "A"}, str(tmp_path / "c.pt"))
    return names[0], f"c.pt.tmp-{PID}@{HOST}"


def staged_name_of_combine(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    make_tiny_dataset("local/hopper/medium-v0", steps=20, seed=1)
    make_tiny_dataset("local/hopper/expert-v0", steps=20, seed=2)
    names, real_mkdtemp = [], po.tempfile.mkdtemp

    def mkdtemp(**kwargs):
        names.append(Path(real_mkdtemp(**kwargs)).name)
        return str(tmp_path / names[-1])
    monkeypatch.setattr(po.tempfile, "mkdtemp", mkdtemp)
    assert po.resolve_dataset("hopper-medium-expert-v2", download=False) == "local/hopper/medium-expert-v0"
    return names[0][:-len("-abcdefgh")], f".combine-{PID}@{HOST}"  # tempfile's 8 random characters cut off


def staged_name_of_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    names, stage = [], md.stage_dataset
    monkeypatch.setattr(md, "stage_dataset", lambda folder, *a: names.append(folder.parent.name) or stage(folder, *a))
    episodes = md.to_episodes(md.d4rl_transitions({
        "observations": np.zeros((20, 11), np.float32), "actions": np.zeros((20, 3), np.float32),
        "rewards": np.ones(20, np.float32), "terminals": np.zeros(20), "timeouts": np.array([0.0] * 19 + [1.0])}))
    md.write_datasets(tmp_path, {"local/hopper/random-v0": episodes}, {"local/hopper/random-v0": ("x", "y")},
                      gym.spec("Hopper-v5"), 0.0, 1.0)
    return names[0], f".make_dataset-{PID}@{HOST}"


@pytest.mark.parametrize("staged_name", [staged_name_of_checkpoint, staged_name_of_combine, staged_name_of_datasets],
                         ids=["checkpoint", "combine", "make_dataset"])
def test_every_staged_write_is_named_by_its_writers_pid_and_host(tmp_path, monkeypatch, staged_name):
    name, expected = staged_name(tmp_path, monkeypatch)
    assert name == expected
    assert [p.name for p in tmp_path.rglob("*") if p.name.startswith(".") or ".tmp-" in p.name] == []  # none left


SHARED_PLACES = {  # script: (its arguments, the folder where it cleans, a staged name in it, a file or a folder)
    "pretrain_offline.py": (TINY, "checkpoints", "local-hopper-medium-v0__td3bc__1.pt.tmp-{}", "file"),
    "make_dataset.py": (RANDOM, "store", ".make_dataset-{}", "folder"),
}


@pytest.mark.parametrize("script", SHARED_PLACES)
def test_a_run_on_a_shared_place_keeps_another_nodes_write_and_removes_this_hosts_dead_and_week_old_ones(
        lab, tmp_path, script):
    base, env = lab
    args, folder, name, form = SHARED_PLACES[script]
    folder = base / "store" if folder == "store" else tmp_path / folder
    leftovers = {"another node's live write": f"{dead_pid()}@node-7.example",
                 "this host's killed run": f"{dead_pid()}@{HOST}",
                 "a week-old one of another node": f"{dead_pid()}@node-8.example"}
    paths = {what: folder / name.format(tag) for what, tag in leftovers.items()}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half") if form == "file" else (path / "new" / "local").mkdir(parents=True)
    os.utime(paths["a week-old one of another node"], (time.time() - WEEK - 60,) * 2)
    result = run(tmp_path, env, script, *args)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert {what: path.exists() for what, path in paths.items()} == {
        "another node's live write": True, "this host's killed run": False, "a week-old one of another node": False}
    shutil.rmtree(paths["another node's live write"]) if form == "folder" else None


# --- a writer whose staging another process removed says what happened, not "free some space" ---
def checkpoint_whose_staged_copy_is_removed(lab, tmp_path, monkeypatch):
    save = torch.save

    def save_then_lose(obj, f, *a, **k):
        save(obj, f, *a, **k)
        if Path(f).parent.name == "checkpoints":
            os.remove(f)  # as another job sharing the directory would
    monkeypatch.setattr(po.torch, "save", save_then_lose)
    path = tmp_path / "checkpoints" / "c.pt"
    with pytest.raises(SystemExit) as stop:
        po.save_or_rescue({"run": "A"}, str(path), False, [str(tmp_path / "runs")])
    message = str(stop.value)
    rescued = message.split("saved as ")[1].split(" instead")[0]
    assert torch.load(rescued, weights_only=True) == {"run": "A"} and not path.exists()
    assert message.endswith(f"move it to {path}")
    return message


def datasets_whose_staging_is_removed_while_hdf5_writes(lab, tmp_path, monkeypatch):
    base, env = lab
    before = sorted(p.relative_to(base / "store") for p in (base / "store").rglob("*"))
    inject = ("import os, shutil\nfrom pathlib import Path\n"
              "from minari.dataset._storages.hdf5_storage import HDF5Storage\n_update = HDF5Storage.update_episodes\n"
              "def update(self, *a, **k):\n"
              "    shutil.rmtree(Path(os.environ['MINARI_DATASETS_PATH']).parent)  # by another process\n"
              "    return _update(self, *a, **k)\nHDF5Storage.update_episodes = update\n")
    result = run(tmp_path, env, "make_dataset.py", *RANDOM, "--seed", 5, inject=inject)
    assert sorted(p.relative_to(base / "store") for p in (base / "store").rglob("*")) == before
    return one_sentence(result, "run again")


def datasets_whose_staging_is_removed_before_the_swap(lab, tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as stop:
        md.swap_in(tmp_path, tmp_path / f".make_dataset-{PID}@{HOST}", ["local/hopper/random-v0"])
    assert list(tmp_path.iterdir()) == []
    return str(stop.value)


@pytest.mark.parametrize("case", [checkpoint_whose_staged_copy_is_removed,
                                  datasets_whose_staging_is_removed_while_hdf5_writes,
                                  datasets_whose_staging_is_removed_before_the_swap],
                         ids=["checkpoint", "datasets, while HDF5 writes", "datasets, before the swap"])
def test_a_writer_whose_staging_another_process_removed_says_so_in_one_sentence(lab, tmp_path, monkeypatch, case):
    message = case(lab, tmp_path, monkeypatch)
    assert "another process removed" in message and "sharing this" in message, message
    assert "free some space" not in message and "once there is room" not in message, message


# --- a second signal cannot cut a stop or the final write short, and never prints a traceback ---
TERM = "import os, signal\ndef term():\n    os.kill(os.getpid(), signal.SIGTERM)\n"
AT_SAVE = ("import torch\n_save = torch.save\ndef save(obj, f, *a, **k):\n"
           "    if '.pt.tmp-' in str(f):\n        term(); term()\n    return _save(obj, f, *a, **k)\ntorch.save = save\n")
IN_TRAINING = ("import torch.optim\n_step, calls = torch.optim.Adam.step, []\ndef step(self, *a, **k):\n"
               "    calls.append(1)\n    if len(calls) == 5:\n        term()\n    return _step(self, *a, **k)\n"
               "torch.optim.Adam.step = step\n")
AT_LOG_CLOSE = ("from torch.utils.tensorboard import SummaryWriter\n_close = SummaryWriter.close\n"
                "def close(self):\n    term()\n    return _close(self)\nSummaryWriter.close = close\n")
AT_EXIT = "import atexit\natexit.register(term)\n"  # registered first, so it runs last, as the interpreter ends
AT_DATASET_WRITE = ("import minari\n_create = minari.create_dataset_from_buffers\n"
                    "def create(*a, **k):\n    term(); term()\n    return _create(*a, **k)\n"
                    "minari.create_dataset_from_buffers = create\n")
IN_COLLECTION = ("from gymnasium.wrappers import TimeLimit\n_step, calls = TimeLimit.step, []\n"
                 "def step(self, *a):\n    calls.append(1)\n    if len(calls) == 20:\n        term()\n"
                 "    return _step(self, *a)\nTimeLimit.step = step\n")
SIGNALS = {  # case: (script, arguments, signals sent where, exit status, last line of stderr, result written)
    "pretraining: two SIGTERMs as its checkpoint is written": (
        "pretrain_offline.py", TINY, AT_SAVE, 0, None, True),
    "pretraining: a SIGTERM in training, a second as the stop closes the run log": (
        "pretrain_offline.py", TINY, IN_TRAINING + AT_LOG_CLOSE, 143, "no checkpoint written", False),
    "pretraining: a SIGTERM in training, a second as the interpreter exits": (
        "pretrain_offline.py", TINY, IN_TRAINING + AT_EXIT, 143, "no checkpoint written", False),
    "pretraining: a SIGTERM as the interpreter exits after the checkpoint is written": (
        "pretrain_offline.py", TINY, AT_EXIT, 0, None, True),
    "make_dataset: two SIGTERMs as the datasets are written": (
        "make_dataset.py", RANDOM, AT_DATASET_WRITE, 0, None, True),
    "make_dataset: a SIGTERM while collecting, a second as the interpreter exits": (
        "make_dataset.py", RANDOM, IN_COLLECTION + AT_EXIT, 143, "interrupted (SIGTERM); nothing half-written", False),
}


@pytest.mark.parametrize("case", SIGNALS)
def test_a_second_signal_cannot_cut_a_stop_or_the_final_write_short(lab, tmp_path, case):
    script, args, inject, status, last_line, written = SIGNALS[case]
    base, env = lab
    if script == "make_dataset.py":  # the dataset this run would write is not there before it
        shutil.rmtree(base / "store" / "local" / "hopper" / "random-v0", ignore_errors=True)
    result = run(tmp_path, env, script, *args, inject=TERM + inject)
    assert result.returncode == status and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last_line is None or last_line in result.stderr.strip().splitlines()[-1], result.stderr[-3000:]
    if script == "pretrain_offline.py":
        checkpoint = tmp_path / "checkpoints" / "local-hopper-medium-v0__td3bc__1.pt"
        assert checkpoint.exists() == written
        assert not written or torch.load(checkpoint, weights_only=True)["algo"] == "td3bc"
    else:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MINARI_DATASETS_PATH", str(base / "store"))
            assert ("local/hopper/random-v0" in minari.list_local_datasets()) == written
            assert not written or minari.load_dataset("local/hopper/random-v0").total_steps == 60
    assert [p.name for p in (base / "store").iterdir() if p.name.startswith(".")] == []


SLOW_SAVE = ("import sys, time, torch\n_save = torch.save\ndef save(obj, f, *a, **k):\n"
             "    if '.pt.tmp-' in str(f):\n        print('saving', flush=True)\n        time.sleep(0.3)\n"
             "    return _save(obj, f, *a, **k)\ntorch.save = save\n")
MOMENTS = {  # moment: (what the run prints just before it, what makes it)
    "as the last progress line is printed (before the C-VAE's calibration and the save)": ("step 40/40", None),
    "inside the checkpoint's write": ("saving", SLOW_SAVE),
}


@pytest.mark.parametrize("moment, repetition", [("inside the checkpoint's write", 0), ("inside the checkpoint's write", 1),
                                                ("inside the checkpoint's write", 2), (next(iter(MOMENTS)), 0)])
def test_two_sigterms_a_millisecond_apart_at_the_final_save_leave_a_checkpoint_or_one_line_never_a_traceback(
        lab, tmp_path, moment, repetition):
    base, env = lab
    marker, inject = MOMENTS[moment]
    process = subprocess.Popen(command("pretrain_offline.py", *TINY, "--seed", 30 + repetition, inject=inject),
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # what the run prints right before its final writes
        if line.startswith(marker):
            break
    process.send_signal(signal.SIGTERM)
    time.sleep(0.001)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    checkpoint = tmp_path / "checkpoints" / f"local-hopper-medium-v0__td3bc__{30 + repetition}.pt"
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    if process.returncode == 0:
        assert torch.load(checkpoint, weights_only=True)["algo"] == "td3bc"
    else:
        assert process.returncode == 143 and not checkpoint.exists(), stderr[-3000:]
        assert len([line for line in stderr.strip().splitlines() if "interrupted" in line]) == 1, stderr[-3000:]
    assert not list((tmp_path / "checkpoints").glob("*.tmp-*"))


# --- MINARI_DATASETS_PATH that cannot be a folder: one sentence in both scripts, as make_dataset.py says it ---
STORE_PATHS = {  # case: how the path is made
    "a regular file": lambda path: path.write_text("not a folder"),
    "a symlink loop": lambda path: (path.symlink_to(path.with_name("other")),
                                    path.with_name("other").symlink_to(path)),
    "a dangling symlink": lambda path: path.symlink_to(path.with_name("missing") / "store"),
}


@pytest.mark.parametrize("case, script, args", [
    ("a regular file", "pretrain_offline.py", ["--env-id", "hopper-medium-v2"]),
    ("a symlink loop", "pretrain_offline.py", ["--env-id", "hopper-medium-v2"]),
    ("a dangling symlink", "pretrain_offline.py", ["--env-id", "hopper-medium-v2"]),
    ("a regular file", "pretrain_offline.py", ["--env-id", "local/hopper"]),  # a namespace: listed before resolving
    ("a symlink loop", "make_dataset.py", RANDOM),
])
def test_a_minari_store_path_that_cannot_be_a_folder_is_one_sentence(lab, tmp_path, case, script, args):
    base, env = lab
    STORE_PATHS[case](tmp_path / "store")
    result = run(tmp_path, dict(env, MINARI_DATASETS_PATH=str(tmp_path / "store")), script, *args)
    one_sentence(result, f"cannot write to {tmp_path / 'store'}", "choose another place with MINARI_DATASETS_PATH")
