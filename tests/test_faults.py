"""Faults a real run meets, as a table: the command, the one sentence it must end with, and the data that must be
intact afterwards. Ids typed by hand, SIGTERM from a scheduler, a full disk (an OSError(ENOSPC) injected at the
write, or a place reported full), two writers of one result, and damaged data or checkpoints."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch

from conftest import ROOT, load_script, make_tiny_dataset

ENV_ID = "local/hopper/medium-v0"
TINY = ["--total-steps", 40, "--cvae-steps", 40, "--eval-freq", 40, "--eval-episodes", 1, "--hidden-dims", 16, 16]
ONLINE = ["--total-timesteps", 60, "--learning-starts", 30, "--eval-freq", 60, "--eval-episodes", 1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A Minari store with a tiny dataset and a td3bc checkpoint of it, and the environment to run scripts in."""
    base = tmp_path_factory.mktemp("faults")
    env = dict(os.environ, MINARI_DATASETS_PATH=str(base / "store"), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", env["MINARI_DATASETS_PATH"])
        make_tiny_dataset(ENV_ID, steps=400)
    result = run(base, env, "pretrain_offline.py", "--env-id", ENV_ID, "--algo", "td3bc", *TINY)
    assert result.returncode == 0, result.stderr
    return base, env


def run(cwd, env, script, *args, inject=None, timeout=600):
    """The script as a user runs it; `inject` is Python run first in the same process (to make a write fail)."""
    if inject is None:
        command = [sys.executable, str(ROOT / script), *map(str, args)]
    else:
        code = (f"import runpy, sys\n{inject}\nsys.argv = {[script, *map(str, args)]!r}\n"
                f"runpy.run_path({str(ROOT / script)!r}, run_name='__main__')")
        command = [sys.executable, "-c", code]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def one_sentence(result, *fragments):
    assert result.returncode not in (0, None) and "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and all(f in message for f in fragments), message
    return message


def snapshot(folder):
    """Every file below `folder` with its size and modification time: equal before and after means untouched."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in folder.rglob("*") if p.is_file())


def checkpoint_of(base):
    return base / "checkpoints" / "local-hopper-medium-v0__td3bc__1.pt"


# --- ids typed by hand: checked for their form before any path is built; "damaged" only of a real dataset ---
ID_CASES = [
    ("./local/hopper/medium-v0", "is a path, not a dataset id"),
    ("../../../../../../etc", "is a path, not a dataset id"),
    ("/etc/passwd-v0", "is a path, not a dataset id"),
    ("local/hopper", "is a namespace of the Minari store, not a dataset; name one of its datasets: local/hopper/medium-v0"),
    ("local/hopper/mediun-v0", "no local dataset local/hopper/mediun-v0"),
    ("local/hopper/empty-v0", "no local dataset local/hopper/empty-v0"),  # a folder without Minari's metadata
    ("local hopper", "unknown --env-id"),
]


@pytest.mark.parametrize("env_id, message", ID_CASES)
def test_an_id_of_the_wrong_form_is_one_sentence_that_never_calls_a_healthy_folder_damaged(lab, env_id, message):
    base, env = lab
    (base / "store" / "local" / "hopper" / "empty-v0").mkdir(exist_ok=True)
    before = snapshot(base / "store")
    start = time.time()
    result = run(base, env, "pretrain_offline.py", "--env-id", env_id, "--algo", "td3bc", "--seed", 7, *TINY)
    sentence = one_sentence(result, message)
    assert "delete" not in sentence and "damaged" not in sentence
    assert time.time() - start < 60  # a local id is never downloaded: no retries
    assert snapshot(base / "store") == before


def test_a_trailing_slash_from_tab_completion_names_the_same_dataset(lab):
    base, env = lab
    result = run(base, env, "pretrain_offline.py", "--env-id", ENV_ID + "/", "--algo", "td3bc", "--seed", 2, *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (base / "checkpoints" / "local-hopper-medium-v0__td3bc__2.pt").exists()


def test_a_dataset_whose_metadata_cannot_be_read_is_called_damaged(lab):
    base, env = lab
    folder = base / "store" / "local" / "hopper" / "broken-v0" / "data"
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text("{not json")
    result = run(base, env, "pretrain_offline.py", "--env-id", "local/hopper/broken-v0", "--algo", "td3bc", *TINY)
    one_sentence(result, "local/hopper/broken-v0", "is unreadable")


# --- numbers that escaped: the seed, threads ---
SEED_CASES = [
    ("pretrain_offline.py", ["--env-id", ENV_ID, "--algo", "td3bc", *TINY]),
    ("make_dataset.py", ["--gym-id", "Pendulum-v1", "--qualities", "random", "--expert-return", "-150"]),
    ("samg_td3.py", ["--env-id", ENV_ID, *ONLINE]),  # the check is in the block every online script shares
]


@pytest.mark.parametrize("script, args", SEED_CASES)
def test_a_seed_of_2_to_the_32_is_one_sentence_in_every_script(lab, script, args):
    base, env = lab
    one_sentence(run(base, env, script, *args, "--seed", 2**32), "--seed is 4294967296 but must be below 2**31")


def test_negative_threads_are_one_sentence(lab):
    base, env = lab
    one_sentence(run(base, env, "samg_td3.py", "--env-id", ENV_ID, *ONLINE, "--threads", -1), "--threads is -1")


# --- damaged data: one sentence before any training, and no checkpoint that the online scripts would refuse ---
def copy_dataset(base, env, name, edit):
    """A copy of the tiny dataset as local/hopper/{name}-v0, changed by `edit(folder)`."""
    import shutil

    source, target = base / "store" / "local" / "hopper" / "medium-v0", base / "store" / "local" / "hopper" / f"{name}-v0"
    if target.exists():
        shutil.rmtree(target)
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


DATA_CASES = [
    ("string-score", edit_metadata(ref_min_score="low"), ("reference scores 'low' and 3234.3, not two different",)),
    ("nan-score", edit_metadata(ref_min_score=float("nan")), ("not two different finite numbers",)),
    ("equal-scores", edit_metadata(ref_min_score=3234.3), ("not two different finite numbers",)),
    ("no-env", edit_metadata(env_id="NoSuchEnv-v0"), ("records no usable environment",)),
    ("short-actions", edit_episode("actions", lambda a: a[:-3]), ("actions", "re-create it")),
    ("huge-rewards", edit_episode("rewards", huge_reward), ("rewards as large as 3e+38",)),
]


@pytest.mark.parametrize("name, edit, fragments", DATA_CASES)
def test_damaged_data_is_one_sentence_before_training_and_writes_no_checkpoint(lab, name, edit, fragments):
    base, env = lab
    dataset_id = copy_dataset(base, env, name, edit)
    result = run(base, env, "pretrain_offline.py", "--env-id", dataset_id, "--algo", "td3bc", *TINY)
    one_sentence(result, dataset_id, *fragments)
    assert not (base / "checkpoints" / f"{dataset_id.replace('/', '-')}__td3bc__1.pt").exists()


def test_a_checkpoint_with_nan_weights_is_refused_by_the_online_scripts(lab, tmp_path):
    base, env = lab
    checkpoint = torch.load(checkpoint_of(base), weights_only=True)
    checkpoint["critic"] = {k: torch.full_like(v, float("nan")) for k, v in checkpoint["critic"].items()}
    torch.save(checkpoint, tmp_path / "nan.pt")
    result = run(base, env, "samg_td3.py", "--env-id", ENV_ID, "--checkpoint", tmp_path / "nan.pt", *ONLINE)
    one_sentence(result, "the critic in", "not finite")


def test_pretraining_that_diverges_writes_no_checkpoint(lab):
    base, env = lab
    inject = ("import torch.optim\n_step = torch.optim.Adam.step\n"
              "def step(self, *a, **k):\n    out = _step(self, *a, **k)\n"
              "    [p.data.fill_(float('nan')) for g in self.param_groups for p in g['params']]\n    return out\n"
              "torch.optim.Adam.step = step\n")
    result = run(base, env, "pretrain_offline.py", "--env-id", ENV_ID, "--algo", "td3bc", "--seed", 5, *TINY,
                 inject=inject)
    one_sentence(result, "training diverged", "no checkpoint was written")
    assert not (base / "checkpoints" / "local-hopper-medium-v0__td3bc__5.pt").exists()


# --- SIGTERM and SIGHUP are Ctrl-C: one line, the same saving, exit 128 + signal ---
def start(base, env, script, *args):
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=base, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_during_fine_tuning_saves_the_model_and_exits_128_plus_the_signal(lab, tmp_path,
                                                                                            signal_number):
    base, env = lab
    run_dir = tmp_path / "runs"
    process = start(base, env, "samg_td3.py", "--env-id", ENV_ID, "--eval-episodes", 10000, "--save-model",
                    "--run-dir", run_dir)
    deadline = time.time() + 120
    while time.time() < deadline and not list(run_dir.glob("*/events.out.tfevents.*")):
        time.sleep(0.2)
    time.sleep(4.0)  # the step-0 evaluation of 10,000 episodes is under way
    process.send_signal(signal_number)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal_number, stderr
    assert "Traceback" not in stderr, stderr
    assert f"interrupted at step 0 ({signal.Signals(signal_number).name}); keeping the logs and the model" in stdout, (
        stdout, stderr)
    (run_name,) = os.listdir(run_dir)
    assert torch.load(run_dir / run_name / "model.pt", weights_only=True)["online_steps"] == 0


def test_sigterm_during_pretraining_is_one_line_exit_143_and_no_checkpoint(lab):
    base, env = lab
    process = start(base, env, "pretrain_offline.py", "--env-id", ENV_ID, "--algo", "td3bc", "--seed", 9,
                    "--total-steps", 10**6, "--eval-freq", 10**6, "--hidden-dims", 16, 16)
    deadline = time.time() + 120
    while time.time() < deadline and not list((base / "runs").glob("*td3bc__9__*/events.out.tfevents.*")):
        time.sleep(0.2)
    time.sleep(4.0)  # training is under way
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and "Traceback" not in stderr, stderr
    assert "interrupted at step" in stderr and "no checkpoint written" in stderr
    assert not (base / "checkpoints" / "local-hopper-medium-v0__td3bc__9.pt").exists()


def test_staging_left_by_killed_runs_is_removed_by_the_next_run_that_finds_it(lab):
    base, env = lab
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that no longer runs
    checkpoints = base / "checkpoints"
    (checkpoints / f"local-hopper-medium-v0__td3bc__3.pt.tmp-{dead.pid}").write_bytes(b"half a checkpoint")
    alive = checkpoints / f"local-hopper-medium-v0__td3bc__4.pt.tmp-{os.getpid()}"  # a writer at work
    alive.write_bytes(b"being written")
    result = run(base, env, "pretrain_offline.py", "--env-id", ENV_ID, "--algo", "td3bc", "--seed", 3, *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in checkpoints.glob("*.tmp-*")) == [alive.name]
    alive.unlink()


def test_a_killed_combine_is_cleared_by_the_next_combine(lab):
    base, env = lab
    store = base / "store"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(store))
        make_tiny_dataset("local/hopper/expert-v0", steps=200, seed=3)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (store / f".combine-{dead.pid}-abc").mkdir()
    result = run(base, env, "pretrain_offline.py", "--env-id", "hopper-medium-expert-v2", "--algo", "td3bc", *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [p.name for p in store.iterdir() if p.name.startswith(".")] == []
    assert (store / "local" / "hopper" / "medium-expert-v0" / "data" / "metadata.json").exists()


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
    base, env = lab
    result = run(base, env, "pretrain_offline.py", "--env-id", ENV_ID, "--algo", "td3bc", "--seed", 6, *TINY,
                 inject=fail_writes_under("checkpoints"))
    message = one_sentence(result, "No space left on device", "the trained networks are saved as")
    rescued = message.split("saved as ")[1].split(" instead")[0]
    assert torch.load(rescued, weights_only=True)["algo"] == "td3bc"
    assert not list((base / "checkpoints").glob("*.tmp-*"))
    os.remove(rescued)


def test_a_full_run_dir_at_the_end_of_fine_tuning_keeps_the_model_elsewhere(lab, tmp_path):
    base, env = lab
    result = run(base, env, "samg_td3.py", "--env-id", ENV_ID, *ONLINE, "--save-model", "--run-dir", tmp_path / "r",
                 inject=fail_writes_under(str(tmp_path / "r")))
    message = one_sentence(result, "No space left on device", "saved as")
    rescued = message.split("saved as ")[1].split(" instead")[0]
    assert torch.load(rescued, weights_only=True)["online_steps"] == 60
    os.remove(rescued)


def test_a_place_without_room_for_the_result_is_refused_before_any_work(lab, tmp_path):
    base, env = lab
    small = ("import shutil, collections\n_usage = shutil.disk_usage\n"
             "shutil.disk_usage = lambda p: collections.namedtuple('u', 'total used free')(10**9, 10**9, 2**20)\n")
    result = run(base, env, "pretrain_offline.py", "--env-id", ENV_ID, "--algo", "td3bc", "--seed", 8, *TINY,
                 inject=small)
    one_sentence(result, "has 1 MiB free but this run writes about", "--checkpoint-dir")
    assert not (base / "checkpoints" / "local-hopper-medium-v0__td3bc__8.pt").exists()
    assert "step 1/" not in result.stdout and "step 40/" not in result.stdout  # refused before training
    result = run(base, env, "samg_td3.py", "--env-id", ENV_ID, *ONLINE, "--run-dir", tmp_path / "r", inject=small)
    one_sentence(result, "has 1 MiB free", "--run-dir")


def test_a_store_that_fills_while_datasets_are_written_is_left_as_it_was(lab, tmp_path):
    base, env = lab
    store = base / "store"
    before = snapshot(store)
    full = ("import errno, minari\n"
            "def create(*a, **k):\n    raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "minari.create_dataset_from_buffers = create\n")
    result = run(base, env, "make_dataset.py", "--env-id", "hopper-random-v2", "--transitions", 50,
                 "--overwrite", inject=full)
    one_sentence(result, "No space left on device", "the store was left as it was")
    assert snapshot(store) == before and [p.name for p in store.iterdir() if p.name.startswith(".")] == []


# --- two writers: the refusal holds at the final move; the later result is kept aside and named ---
def test_a_checkpoint_written_meanwhile_by_another_run_is_not_replaced(lab, tmp_path):
    base, _ = lab
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


def test_a_dataset_written_meanwhile_by_another_run_is_not_replaced(lab, tmp_path, monkeypatch):
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
