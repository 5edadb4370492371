"""benchmark/: the suite's plan, skipping, scheduling and job-array stages; dataset preparation; the report's
arithmetic and plots; the AUROC of ood.py."""
import json
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, load_script, make_tiny_dataset, run_script


suite = load_script("run_suite", "benchmark")
report = load_script("report", "benchmark")


@pytest.fixture
def quick_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    preset, _, _ = suite.resolve(suite.Args(preset="quick"))
    return suite.plan("quick", preset, str(tmp_path / "runs"), str(tmp_path / "checkpoints"))


QUICK_ALGOS = len(suite.PRESETS["quick"].algos)  # every algorithm of ALGOS


# --- run_suite.py ---
def test_quick_preset_plans_one_dataset_then_2_pretraining_and_40_online_runs_per_algo(quick_plan):
    stages = [run.stage for run in quick_plan]
    # 2 datasets x algos x 1 checkpoint; 2 datasets x algos x 4 methods x 5 seeds
    assert stages == ["dataset"] + ["pretrain"] * 2 * QUICK_ALGOS + ["online"] * 40 * QUICK_ALGOS
    position = {run.id: i for i, run in enumerate(quick_plan)}
    for run in quick_plan:
        assert all(position[dep] < position[run.id] for dep in run.deps), f"{run.id} comes before what it needs"
    dataset = quick_plan[0].command
    assert dataset[1].endswith("make_dataset.py")
    assert dataset[2:7] == ["--gym-id", "Pendulum-v1", "--qualities", "medium", "medium-replay"]
    online = [run for run in quick_plan if run.stage == "online"]
    assert {run.meta["method"] for run in online} == {"none", "samg-next", "samg-sample", "offline-0.5"}
    assert {run.meta["seed"] for run in online} == {1, 2, 3, 4, 5}


def contains(command, flags) -> bool:
    """Whether `flags` appear in `command` as one consecutive run."""
    flags = list(flags)
    return any(command[i:i + len(flags)] == flags for i in range(len(command)))


def test_every_online_run_loads_the_checkpoint_its_pretraining_run_writes(quick_plan, tmp_path):
    outputs = {run.id: run.outputs[0] for run in quick_plan if run.stage == "pretrain"}
    online = [run for run in quick_plan if run.stage == "online"]
    scripts = {run.command[1].split("/")[-1] for run in online}
    assert scripts == set(suite.ONLINE_SCRIPTS.values()) >= {"samg_sac.py", "samg_td3.py", "samg_awac.py"}
    for run in online:
        command = run.command
        assert Path(command[command.index("--checkpoint") + 1]) == outputs[run.deps[0]]
        assert run.deps[0].endswith("__1") and run.meta["checkpoint_seed"] == 1  # one checkpoint serves all seeds
        assert Path(command[command.index("--run-dir") + 1]) == run.run_dir == tmp_path / "runs" / run.id
        assert command[command.index("--total-timesteps") + 1] == "10000"
        refreshes = "--qoff-refresh-every" in suite.METHODS[run.meta["method"]]
        assert ("--qoff-refresh-every" in command) == refreshes  # Q_off is frozen unless the method replaces it
        if refreshes:  # the preset's period in place of the method's 50000
            assert command[command.index("--qoff-refresh-every") + 1] == "2000"
        assert command[command.index("--seed") + 1] == str(run.meta["seed"])
        assert contains(command, run.meta["flags"]) and run.meta["flags"][:2] == ["--coef-mode",
                                                                               suite.METHODS[run.meta["method"]][1]]
    offline_half = next(run for run in online if run.meta["method"] == "offline-0.5").command
    assert contains(offline_half, ["--coef-mode", "none", "--offline-data-ratio", "0.5"])
    pretrain = next(run for run in quick_plan if run.stage == "pretrain")
    assert {"--total-steps", "--cvae-steps", "--checkpoint-dir", "--algo", "--env-id"} <= set(pretrain.command)
    assert pretrain.deps == ["dataset__pendulum"]


def test_paper_preset_prepares_each_of_9_d4rl_datasets_once_then_pretrains_every_algo_x_5_seeds_x_6_methods():
    preset, runs_dir, checkpoint_dir = suite.resolve(suite.Args(preset="paper"))
    runs = suite.plan("paper", preset, runs_dir, checkpoint_dir)
    assert (runs_dir, checkpoint_dir) == ("runs/paper", "checkpoints/paper")
    algos = len(suite.ALGOS)
    assert [run.stage for run in runs] == (["dataset"] * 9 + ["pretrain"] * 9 * algos * 5  # a checkpoint per seed
                                           + ["online"] * 9 * algos * 6 * 5)
    datasets = {run.id: run for run in runs if run.stage == "dataset"}
    assert [run.command[2:] for run in datasets.values()] == [["--env-id", env_id] for env_id in preset.env_ids]
    assert all(run.command[1].endswith("prepare_dataset.py") for run in datasets.values())  # one run per dataset
    for run in datasets.values():
        assert run.outputs == [run.done_file] == [Path("runs/paper/datasets") / f"{run.command[-1]}.done"]
        assert suite.shell_line(run).endswith(f"&& touch runs/paper/datasets/{run.command[-1]}.done")
    # medium-expert downloads Minari's medium set too: it waits for the medium run instead of racing it
    assert datasets["dataset__hopper-medium-expert-v2"].deps == ["dataset__hopper-medium-v2"]
    assert sum(bool(run.deps) for run in datasets.values()) == 3
    for run in runs:
        if run.stage == "pretrain":  # its dataset is ready before it starts: it never downloads or combines
            env_id = run.command[run.command.index("--env-id") + 1]
            assert run.deps == [f"dataset__{env_id}"] and datasets[run.deps[0]].command[-1] == env_id
    assert {run.meta["method"] for run in runs if run.stage == "online"} == {
        "samg", "samg-static", "even", "random", "none", "offline-0.5"}
    assert all(run.meta["checkpoint_seed"] == run.meta["seed"] for run in runs if run.stage == "online")
    pretrain = next(run for run in runs if run.stage == "pretrain")
    assert pretrain.command[pretrain.command.index("--total-steps") + 1] == "1000000"


def test_flags_override_the_preset():
    preset, _, _ = suite.resolve(suite.Args(preset="paper", env_ids=("hopper-medium-v2",), algos=("td3bc",),
                                            methods=("samg-static", "random-static"), seeds=(7,),
                                            online_steps=1234))
    runs = suite.plan("paper", preset, "r", "c")
    online = [run for run in runs if run.stage == "online"]
    assert [run.id for run in online] == ["hopper-medium-v2__td3bc__samg-static__7",
                                          "hopper-medium-v2__td3bc__random-static__7"]
    assert all("--no-adaptive" in run.command and "1234" in run.command for run in online)
    with pytest.raises(SystemExit, match="unknown method cvae"):
        suite.resolve(suite.Args(preset="quick", methods=("cvae",)))


def test_pretrain_seeds_n_maps_online_seed_k_to_checkpoint_k_minus_1_mod_n_plus_1():
    preset, _, _ = suite.resolve(suite.Args(preset="quick", env_ids=("local/pendulum/medium-v0",), algos=("cql",),
                                            methods=("none",), seeds=(1, 2, 3, 4, 5), pretrain_seeds=2))
    runs = suite.plan("quick", preset, "r", "c")
    assert [run.id for run in runs if run.stage == "pretrain"] == [
        "local-pendulum-medium-v0__cql__1", "local-pendulum-medium-v0__cql__2"]
    online = [run for run in runs if run.stage == "online"]
    assert [(run.meta["seed"], run.meta["checkpoint_seed"]) for run in online] == [(1, 1), (2, 2), (3, 1), (4, 2),
                                                                                   (5, 1)]
    for run in online:
        checkpoint = run.command[run.command.index("--checkpoint") + 1]
        assert checkpoint == str(Path("c") / f"local-pendulum-medium-v0__cql__{run.meta['checkpoint_seed']}.pt")
        assert run.deps == [f"local-pendulum-medium-v0__cql__{run.meta['checkpoint_seed']}"]


def test_print_commands_lists_only_runs_whose_results_are_missing(tmp_path):
    env = {"MINARI_DATASETS_PATH": str(tmp_path / "minari"), "PATH": "/usr/bin:/bin"}
    args = [sys.executable, str(ROOT / "benchmark" / "run_suite.py"), "--preset", "quick", "--print-commands",
            "--runs-dir", str(tmp_path / "runs"), "--checkpoint-dir", str(tmp_path / "ck")]

    def lines():
        result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()

    first = lines()
    assert len(first) == 1 + 2 * QUICK_ALGOS + 40 * QUICK_ALGOS
    assert first[0].startswith("python make_dataset.py --gym-id Pendulum-v1")
    assert first[1].startswith("python pretrain_offline.py --env-id local/pendulum/medium-v0 --algo cql --seed 1")
    first_online = first[1 + 2 * QUICK_ALGOS]
    assert "local-pendulum-medium-v0__cql__none__1" in first_online and "--coef-mode none" in first_online
    assert first_online.endswith("/DONE")
    # fake results: both datasets, one checkpoint, one finished online run
    for quality in ("medium", "medium-replay"):
        (tmp_path / "minari" / "local" / "pendulum" / f"{quality}-v0" / "data").mkdir(parents=True)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "local-pendulum-medium-v0__cql__1.pt").write_bytes(b"")
    (tmp_path / "runs" / "local-pendulum-medium-v0__cql__none__1").mkdir(parents=True)
    (tmp_path / "runs" / "local-pendulum-medium-v0__cql__none__1" / "DONE").write_text("")
    second = lines()
    assert len(second) == len(first) - 3
    assert not any("make_dataset.py" in line or "medium-v0 --algo cql --seed 1 " in line for line in second)
    assert any("medium-replay-v0 --algo cql --seed 1 " in line for line in second)
    assert not any("local-pendulum-medium-v0__cql__none__1 " in line for line in second)


def test_a_missing_dataset_is_not_remade_when_every_run_that_needs_it_is_done(quick_plan):
    for run in quick_plan:
        if run.stage == "pretrain":
            run.outputs[0].parent.mkdir(parents=True, exist_ok=True)
            run.outputs[0].write_bytes(b"")
    todo = suite.runs_to_do(quick_plan)
    assert [run.stage for run in todo] == ["online"] * 40 * QUICK_ALGOS


def fake_run(tmp_path, run_id, stage, code, deps=(), online=False):
    """A run whose command is a tiny python program; its output is `{run_id}.out` (or DONE for online runs)."""
    out = tmp_path / f"{run_id}.out"
    run_dir = tmp_path / "runs" / run_id if online else None
    program = f"import pathlib; pathlib.Path({str(out)!r}).write_text('x'); {code}"
    return suite.Run(run_id, stage, ["python", "-c", program], list(deps),
                     [run_dir / "DONE"] if online else [out], run_dir, {"id": run_id},
                     done_file=run_dir / "DONE" if online else None)


def test_execute_skips_finished_runs_and_continues_past_a_failure(tmp_path, capsys):
    done_already = fake_run(tmp_path, "a", "pretrain", "raise SystemExit(5)")  # would fail if it ran
    (tmp_path / "a.out").write_text("from an earlier suite")
    fails = fake_run(tmp_path, "b", "pretrain", "raise SystemExit(3)")
    needs_failed = fake_run(tmp_path, "c", "online", "", deps=["b"], online=True)
    works = fake_run(tmp_path, "d", "online", "print('hello')", deps=["a"], online=True)
    no_output = suite.Run("e", "pretrain", ["python", "-c", "pass"], [], [tmp_path / "e.out"])
    failures = suite.execute([done_already, fails, needs_failed, works, no_output], workers=2, threads=1,
                             log_dir=tmp_path / "logs")
    assert (tmp_path / "a.out").read_text() == "from an earlier suite"
    assert sorted((run.id, reason) for run, reason in failures) == [
        ("b", "exit status 3"), ("c", "not started: b failed"), ("e", f"exit 0 but {tmp_path / 'e.out'} is missing")]
    assert (tmp_path / "runs" / "d" / "DONE").exists() and not (tmp_path / "runs" / "c").exists()
    assert json.loads((tmp_path / "runs" / "d" / "suite.json").read_text()) == {"id": "d"}
    assert "hello" in (tmp_path / "logs" / "d.log").read_text()
    assert "4 runs to do, 1 already done" in capsys.readouterr().out


def test_locomotion_cpu_preset_makes_3_envs_data_then_pretrains_once_per_dataset_and_algo():
    preset, _, _ = suite.resolve(suite.Args(preset="locomotion-cpu"))
    runs = suite.plan("locomotion-cpu", preset, "r", "c")
    stages = [run.stage for run in runs]
    # 3 envs x 2 qualities x 3 algos x 1 checkpoint; x 3 methods x 5 seeds
    assert stages == ["dataset"] * 3 + ["pretrain"] * 18 + ["online"] * 270
    assert [run.command[2:7] for run in runs[:3]] == [["--gym-id", gym_id, "--qualities", "medium-replay", "medium"]
                                                      for gym_id in ("Hopper-v5", "HalfCheetah-v5", "Walker2d-v5")]
    assert all(contains(run.command, ["--total-timesteps", "150000"]) for run in runs[:3])
    assert all(contains(run.command, ["--hidden-dims", "256", "256"]) for run in runs if run.stage != "online")
    online = [run for run in runs if run.stage == "online"]
    assert {run.meta["method"] for run in online} == {"none", "samg", "offline-0.5"}
    assert {run.meta["algo"] for run in online} == {"td3bc", "awac", "iql"}
    assert all(run.meta["checkpoint_seed"] == 1 and run.meta["total_timesteps"] == 12_000 for run in online)
    assert all(contains(run.command, ["--learning-starts", "2000"]) for run in online)


def test_flags_added_on_the_command_line_reach_every_run_of_their_stage_after_the_presets_own():
    preset, _, _ = suite.resolve(suite.Args(preset="quick", dataset_args="--track",
                                            pretrain_args="--track --wandb-project-name 'samg paper'",
                                            online_args="--no-cuda --qoff-refresh-every 777"))
    for run in suite.plan("quick", preset, "r", "c"):
        added = {"dataset": ["--track"], "pretrain": ["--track", "--wandb-project-name", "samg paper"],
                 "online": ["--no-cuda", "--qoff-refresh-every", "777"]}[run.stage]
        assert run.command[-len(added):] == added, run.id
    online = next(run for run in suite.plan("quick", preset, "r", "c")
                  if run.stage == "online" and run.meta["method"] == "samg-next").command
    refresh = [online[i + 1] for i, part in enumerate(online) if part == "--qoff-refresh-every"]
    assert refresh == ["2000", "777"]  # the preset's, then the one added, which the script's parser keeps
    with pytest.raises(SystemExit, match="--online-args '--seed \"1' is not a shell line"):
        suite.resolve(suite.Args(preset="quick", online_args='--seed "1'))


def run_suite_main(monkeypatch, *arguments):
    """run_suite.py as the shell runs it, in this process, with every run it would start recorded instead of started.
    Returns the exit status (or message) and the commands, `python` as in the plan."""
    started = []

    def record(command, env):
        started.append(["python" if part == sys.executable else part for part in command])
        return 0

    monkeypatch.setattr(subprocess, "call", record)
    monkeypatch.setattr(sys, "argv", ["run_suite.py", *map(str, arguments)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "benchmark" / "run_suite.py"), run_name="__main__")
    return exit_info.value.code, started


@pytest.fixture
def quick_cli(tmp_path, monkeypatch):
    """The quick preset's command line in a temporary store and output place, without $SLURM_ARRAY_TASK_ID."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    return ["--preset", "quick", "--runs-dir", tmp_path / "runs", "--checkpoint-dir", tmp_path / "checkpoints"]


def make_quick_datasets(tmp_path):
    for quality in ("medium", "medium-replay"):
        (tmp_path / "minari" / "local" / "pendulum" / f"{quality}-v0" / "data").mkdir(parents=True)


def test_index_n_of_a_stage_runs_the_command_that_print_commands_lists_at_line_n(quick_cli, tmp_path, monkeypatch,
                                                                                   capsys):
    for stage in ("dataset", "pretrain", "online"):
        if stage == "pretrain":
            make_quick_datasets(tmp_path)
        if stage == "online":  # every checkpoint exists; their pretraining runs are done
            (tmp_path / "checkpoints").mkdir()
            for algo in suite.ALGOS:
                for dataset in ("medium", "medium-replay"):
                    (tmp_path / "checkpoints" / f"local-pendulum-{dataset}-v0__{algo}__1.pt").write_bytes(b"")
        capsys.readouterr()
        assert run_suite_main(monkeypatch, *quick_cli, "--stage", stage, "--print-commands") == (0, [])
        lines = capsys.readouterr().out.splitlines()
        assert run_suite_main(monkeypatch, *quick_cli, "--stage", stage, "--count") == (0, [])
        count = int(capsys.readouterr().out)
        assert count == len(lines) == {"dataset": 1, "pretrain": 2 * QUICK_ALGOS, "online": 40 * QUICK_ALGOS}[stage]
        for index in sorted({0, count // 2, count - 1}):
            status, started = run_suite_main(monkeypatch, *quick_cli, "--stage", stage, "--index", index)
            assert len(started) == 1, (stage, index)
            command = shlex.join(started[0])
            if stage == "online":  # the line also writes suite.json before and DONE after
                assert f" && {command} && touch " in lines[index]
            else:
                assert lines[index] == command
            assert status == (0 if stage == "online" else 1)  # nothing was made: only the online DONE is written
    online_dir = tmp_path / "runs" / "local-pendulum-medium-v0__cql__none__1"
    assert (online_dir / "DONE").exists() and json.loads((online_dir / "suite.json").read_text())["seed"] == 1


def test_the_index_defaults_to_slurm_array_task_id_and_a_finished_run_is_skipped(quick_cli, tmp_path, monkeypatch,
                                                                                  quick_plan):
    make_quick_datasets(tmp_path)
    pretrain = [run for run in quick_plan if run.stage == "pretrain"]  # the same plan: same store and directories
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_suite_main(monkeypatch, *quick_cli, "--stage", "pretrain")[1] == [pretrain[3].command]
    assert run_suite_main(monkeypatch, *quick_cli, "--stage", "pretrain", "--index", 1)[1] == [pretrain[1].command]
    pretrain[3].outputs[0].parent.mkdir(parents=True)
    pretrain[3].outputs[0].write_bytes(b"")  # its checkpoint: run 3 is done, so a re-submitted task does nothing
    assert run_suite_main(monkeypatch, *quick_cli, "--stage", "pretrain") == (0, [])


def test_a_missing_or_out_of_range_index_and_a_run_whose_inputs_are_not_done_are_one_sentence_errors(
        quick_cli, tmp_path, monkeypatch):
    status = run_suite_main(monkeypatch, *quick_cli, "--stage", "online")[0]
    assert status == (f"error: --stage online needs --index N or $SLURM_ARRAY_TASK_ID to say which run; the online "
                      f"stage of the quick preset has {40 * QUICK_ALGOS} runs (indices 0 to {40 * QUICK_ALGOS - 1})")
    count = 2 * QUICK_ALGOS
    for index in (count, -1):
        assert run_suite_main(monkeypatch, *quick_cli, "--stage", "pretrain", "--index", index)[0] == (
            f"error: index {index} is out of range; the pretrain stage of the quick preset has {count} runs "
            f"(indices 0 to {count - 1})")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert run_suite_main(monkeypatch, *quick_cli, "--stage", "dataset")[0] == (
        "error: index 1 is out of range; the dataset stage of the quick preset has 1 run (index 0)")
    status, started = run_suite_main(monkeypatch, *quick_cli, "--stage", "pretrain", "--index", 0)  # no dataset yet
    assert started == [] and status.startswith("error: local-pendulum-medium-v0__cql__1 needs dataset__pendulum (in "
                                               "the dataset stage), which is not done;")
    assert run_suite_main(monkeypatch, *quick_cli, "--count")[0].startswith("error: --index and --count")
    result = subprocess.run([sys.executable, str(ROOT / "benchmark" / "run_suite.py"), *map(str, quick_cli),
                             "--stage", "pretrain", "--index", "99"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: index 99 is out of range; the pretrain stage of the quick "
                                                  f"preset has {count} runs (indices 0 to {count - 1})"]


# --- prepare_dataset.py ---
def test_prepare_dataset_resolves_combines_and_loads_a_local_dataset_and_refuses_an_unknown_id(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    make_tiny_dataset("local/hopper/medium-v0", steps=120, seed=1)
    make_tiny_dataset("local/hopper/expert-v0", steps=80, seed=2)
    result = run_script("benchmark/prepare_dataset.py", "--env-id", "hopper-medium-expert-v2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "hopper-medium-expert-v2 -> local/hopper/medium-expert-v0" in result.stdout
    assert "200 transitions, obs dim 11, action dim 3, env Hopper-v5" in result.stdout
    assert (tmp_path / "minari" / "local" / "hopper" / "medium-expert-v0" / "data").is_dir()  # combined once, here
    assert not list(tmp_path.glob("runs*")) and not list(tmp_path.glob("checkpoints*"))  # nothing trained
    result = run_script("benchmark/prepare_dataset.py", "--env-id", "hopper-mediocre-v2", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: unknown --env-id 'hopper-mediocre-v2'; use a Minari dataset id")


# --- speed.py ---
def test_speed_benchmark_times_every_update_against_the_plain_sac_reference(tmp_path):
    result = run_script("benchmark/speed.py", "--devices", "cpu", "--seconds", 0.05, "--rounds", 1, "--hidden", 16,
                        "--batch-size", 16, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "updates/s" not in line
            and not line.startswith("| ---")]
    assert rows[0].startswith("| plain PyTorch SAC (reference) |") and rows[0].endswith("| 1.00x |")
    for script in ["samg_sac.py", "samg_td3.py", "samg_awac.py", "samg_iql.py"]:
        for coef_mode in ["cvae", "none"]:
            assert any(row.startswith(f"| {script} --coef-mode {coef_mode} |") for row in rows)
    assert any(row.startswith("| make_dataset.py behaviour SAC |") for row in rows)
    assert sum("pretrain_offline.py --algo" in row for row in rows) == 4
    for row in rows:  # every candidate ran and got a positive rate
        assert float(row.split("|")[2]) > 0, row


def test_speed_loop_mode_refuses_a_warm_up_as_long_as_the_run_and_a_baseline_that_is_no_checkout(tmp_path):
    # the loop timing itself is a measurement (benchmark/speed.py --mode loop), not a test: only its checks here
    bad = run_script("benchmark/speed.py", "--mode", "loop", "--loop-steps", 100, "--loop-warmup", 200, cwd=tmp_path)
    assert bad.returncode != 0 and "--loop-warmup is 200 but must be below --loop-steps 100" in bad.stderr
    no_baseline = run_script("benchmark/speed.py", "--mode", "loop", "--loop-baseline", tmp_path, cwd=tmp_path)
    assert no_baseline.returncode != 0 and "give a checkout of this project" in no_baseline.stderr


# --- report.py ---
def write_run(run_dir: Path, meta: dict, scalars: dict, done: bool = True):
    """A run as the suite leaves it: suite.json, DONE, and the script's events ({tag: {step: value}}) in a
    subdirectory."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir.mkdir(parents=True)
    (run_dir / "suite.json").write_text(json.dumps(meta))
    writer = SummaryWriter(str(run_dir / "env__samg__1__0"))
    for tag, values in scalars.items():
        for step, value in values.items():
            writer.add_scalar(tag, value, step)
    writer.close()
    if done:
        (run_dir / "DONE").write_text("")


def scored(env_id, algo, method, finals):
    """Per-run rows as build_report makes them, one per seed, with the given final scores."""
    return [{"env_id": env_id, "algo": algo, "method": method, "seed": seed, "offline": 0.0, "final": final,
             "dip": 0.0} for seed, final in enumerate(finals, 1)]


def test_run_scores_take_step_0_the_last_evaluations_and_the_minimum_of_the_first_tenth():
    steps = np.array([0, 50, 100, 150, 500, 1000])
    values = np.array([40.0, 30.0, 20.0, 10.0, 60.0, 80.0])
    assert report.run_scores(steps, values, total_steps=1000) == {"offline": 40.0, "final": 80.0, "dip": 20.0,
                                                                  "during": np.mean([30, 20, 10, 60, 80])}
    assert report.run_scores(steps, values, total_steps=1000, warmup=100)["during"] == np.mean([10, 60, 80])
    assert report.run_scores(steps, values, total_steps=1000, final_evals=2)["final"] == 70.0
    assert report.run_scores(steps, values, total_steps=1500)["dip"] == 10.0  # the window grows to 150
    assert np.isnan(report.run_scores(np.array([0, 500]), np.array([1.0, 2.0]), total_steps=1000)["dip"])


def test_bootstrap_interval_of_two_seeds_spans_exactly_their_scores_and_matches_a_direct_resampling():
    # resampling two values gives means a, (a+b)/2, b with probabilities 1/4, 1/2, 1/4: the 2.5% and 97.5%
    # percentiles are a and b
    assert report.bootstrap_mean_ci([10.0, 20.0], reps=4000, seed=3) == (15.0, 10.0, 20.0)
    values = np.array([3.0, 9.0, 4.0, 20.0, 7.0])
    indices = np.random.default_rng(11).integers(0, 5, (500, 5))
    low, high = np.percentile(values[indices].mean(axis=1), [2.5, 97.5])
    assert report.bootstrap_mean_ci([*values, float("nan")], reps=500, seed=11) == (8.6, low, high)
    assert 3.0 <= low < 8.6 < high <= 20.0
    assert report.bootstrap_mean_ci([5.0, 5.0, 5.0], reps=100, seed=0) == (5.0, 5.0, 5.0)
    assert all(np.isnan(report.bootstrap_mean_ci([float("nan")], reps=100, seed=0)))


def test_iqm_is_the_mean_of_the_middle_half_of_all_runs_and_tasks_and_its_interval_shrinks_with_more_runs():
    task_a, task_b = [100.0, 3.0, 8.0, 6.0], [-50.0, 5.0, 4.0, 7.0]
    per_run = scored("e1", "cql", "samg", task_a) + scored("e2", "cql", "samg", task_b)
    point, low, high = report.aggregate(per_run, reps=300, seed=0)["iqm"]["samg"]
    assert point == pytest.approx(np.mean([4.0, 5.0, 6.0, 7.0]))  # sorted: -50 3 | 4 5 6 7 | 8 100
    assert low <= point <= high and high - low > 0
    more = scored("e1", "cql", "samg", task_a * 4) + scored("e2", "cql", "samg", task_b * 4)
    point_more, low_more, high_more = report.aggregate(more, reps=300, seed=0)["iqm"]["samg"]
    assert point_more == pytest.approx(point) and high_more - low_more < high - low


def test_probability_of_improvement_counts_pairwise_wins_with_ties_as_one_half_averaged_over_tasks():
    per_run = (scored("e1", "cql", "samg", [1.0, 2.0, 3.0]) + scored("e1", "cql", "none", [2.0, 2.0, 0.0])
               + scored("e2", "cql", "samg", [5.0, 5.0, 5.0]) + scored("e2", "cql", "none", [1.0, 9.0, 5.0]))
    # e1: 1 beats 0; 2 ties 2 twice and beats 0; 3 beats all three: 6 of 9. e2: 3 wins, 3 ties: 4.5 of 9.
    point, low, high = report.aggregate(per_run, reps=200, seed=0)["improvement"][("samg", "none")]
    assert point == pytest.approx((6 / 9 + 4.5 / 9) / 2)
    assert 0.0 <= low <= point <= high <= 1.0


def test_the_array_count_of_improvement_equals_rliables_mann_whitney_version_ties_and_equal_columns_included():
    from rliable import metrics

    rng = np.random.default_rng(0)
    for runs_x, runs_y in ((5, 5), (3, 7), (1, 4)):
        x, y = rng.integers(0, 4, (runs_x, 3)).astype(float), rng.integers(0, 4, (runs_y, 3)).astype(float)
        assert report.improvement(x, y)[0] == pytest.approx(metrics.probability_of_improvement(x, y), abs=1e-12)
    same = np.array([[1.0, 2.0], [3.0, 2.0]])
    assert report.improvement(same, same)[0] == metrics.probability_of_improvement(same, same) == 0.5


def test_verdicts_say_beat_lost_or_not_distinguishable_from_the_interval_of_p_improvement():
    per_run = []
    for env_id in ("e1", "e2"):
        per_run += scored(env_id, "td3bc", "samg-next", [50.0, 51.0, 52.0, 53.0, 54.0])
        per_run += scored(env_id, "td3bc", "none", [10.0, 11.0, 12.0, 13.0, 14.0])
        per_run += scored(env_id, "td3bc", "offline-0.5", [90.0, 91.0, 92.0, 93.0, 94.0])
        per_run += scored(env_id, "td3bc", "even", [50.0, 51.0, 52.0, 53.0, 54.0])
    per_run += scored("e1", "td3bc", "random", [0.0] * 5)  # only in one task: left out of the aggregate
    agg = report.aggregate(per_run, reps=200, seed=0)
    assert agg["left_out"] == {"random": [("e2", "td3bc")]} and "random" not in agg["iqm"]
    assert agg["improvement"][("samg-next", "none")] == (1.0, 1.0, 1.0)
    assert agg["improvement"][("samg-next", "offline-0.5")] == (0.0, 0.0, 0.0)
    assert report.verdicts(agg) == [
        "- `samg-next` beat `none`: P(samg-next > none) = 1.00 [1.00, 1.00] over 2 task(s).",
        "- `samg-next` lost to `offline-0.5`: P(samg-next > offline-0.5) = 0.00 [0.00, 0.00] over 2 task(s).",
        "- `samg-next` was not distinguishable from `even`: P(samg-next > even) = 0.50 "
        f"[{agg['improvement'][('samg-next', 'even')][1]:.2f}, {agg['improvement'][('samg-next', 'even')][2]:.2f}] "
        "over 2 task(s).",
    ]
    low, high = agg["improvement"][("samg-next", "even")][1:]
    assert low < 0.5 < high


def test_aggregate_is_reproducible_and_leaves_numpys_global_generator_alone():
    per_run = scored("e1", "cql", "samg", [1.0, 4.0, 2.0]) + scored("e1", "cql", "none", [3.0, 0.0, 2.5])
    np.random.seed(123)
    first = report.aggregate(per_run, reps=100, seed=5)
    draw = np.random.rand()
    np.random.seed(123)
    assert np.random.rand() == draw
    second = report.aggregate(per_run, reps=100, seed=5)
    assert (first["iqm"], first["improvement"]) == (second["iqm"], second["improvement"])
    assert report.aggregate(per_run, reps=100, seed=6)["iqm"]["samg"][1:] != first["iqm"]["samg"][1:]


@pytest.fixture
def synthetic_runs(tmp_path):
    """Two methods on one task, with the SAMG diagnostics logged every 100 steps; one unfinished run."""
    runs = tmp_path / "runs"
    base = {"env_id": "local/pendulum/medium-v0", "algo": "cql", "total_timesteps": 1000, "checkpoint_seed": 1}

    def diagnostics(p):
        return {"samg/p_mean": {s: p for s in range(0, 1001, 100)},
                "samg/p_active_frac": {s: p / 2 for s in range(0, 1001, 100)},
                "samg/qoff_values": {s: -10.0 for s in range(0, 1001, 100)},
                "samg/qbar_values": {s: -10.0 - s / 100 for s in range(0, 1001, 100)},
                "losses/qf_loss": {s: 1.5 for s in range(100, 1001, 100)}}

    # samg: offline 50 each seed; dips 40, 42, 44 (at step 100); finals 90, 92, 94
    for seed, shift in zip((1, 2, 3), (0.0, 2.0, 4.0)):
        scores = {0: 50.0, 50: 45.0 + shift, 100: 40.0 + shift, 200: 30.0, 500: 70.0, 1000: 90.0 + shift}
        write_run(runs / f"samg{seed}", {**base, "method": "samg", "flags": ["--coef-mode", "cvae"], "seed": seed},
                  {"eval/normalized_score": scores, **diagnostics(0.5)})
    # none: offline 50, dip 10 and 20 (the step-200 evaluation lies outside the first 10%), finals 60, 80
    for seed, (dip, final) in zip((1, 2), ((10.0, 60.0), (20.0, 80.0))):
        scores = {0: 50.0, 100: dip, 200: 0.0, 1000: final}
        write_run(runs / f"none{seed}", {**base, "method": "none", "flags": ["--coef-mode", "none"], "seed": seed},
                  {"eval/normalized_score": scores, **diagnostics(0.0)})
    write_run(runs / "unfinished", {**base, "method": "none", "seed": 3}, {"eval/normalized_score": {0: 0.0}},
              done=False)
    return runs


def test_report_on_synthetic_logs_gives_means_with_bootstrap_intervals_and_a_2x2_png_under_the_runs_dir(
        synthetic_runs):
    body, pngs = report.build_report(report.Args(runs_dir=str(synthetic_runs), reps=2000))
    out = synthetic_runs / "report"  # the default output place
    assert "| local/pendulum/medium-v0 | cql | samg | 3 | 50.0 | 92.0 [90.0, 94.0] | 42.0 [40.0, 44.0] |" in body
    assert "| local/pendulum/medium-v0 | cql | none | 2 | 50.0 | 70.0 [60.0, 80.0] | 15.0 [10.0, 20.0] |" in body
    assert "| samg | 3 | 92.0 [90.0, 94.0] |" in body  # one task: the IQM of 3 runs is their middle one's
    assert "| samg | none | 1.00 |" in body and "- `samg` beat `none`" in body
    assert "- `samg`: `--coef-mode cvae`" in body
    assert (out / "results.md").read_text().endswith(body)
    assert "From 5 runs" in (out / "results.md").read_text()  # the unfinished run is left out
    assert [p.name for p in pngs] == ["curves_local-pendulum-medium-v0__cql.png"] and pngs[0].parent == out
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "scalars").exists()


def test_csv_export_rebuilds_the_same_report_without_the_logs(synthetic_runs, tmp_path):
    body, pngs = report.build_report(report.Args(runs_dir=str(synthetic_runs), export_csv=True, reps=200))
    scalars = synthetic_runs / "report" / "scalars"
    assert sorted(p.name for p in scalars.iterdir()) == sorted(
        f"{name}.{ext}" for name in ("none1", "none2", "samg1", "samg2", "samg3") for ext in ("csv", "json"))
    lines = (scalars / "samg1.csv").read_text().splitlines()
    assert lines[0] == ("step,eval/normalized_score,losses/qf_loss,samg/p_mean,samg/p_active_frac,"
                        "samg/qoff_values,samg/qbar_values")
    assert lines[1] == "0,50.0,,0.5,0.25,-10.0,-10.0" and lines[2].startswith("50,45.0,,,")
    assert json.loads((scalars / "samg1.json").read_text())["method"] == "samg"
    rebuilt, rebuilt_pngs = report.build_report(report.Args(runs_dir=str(tmp_path / "elsewhere"),
                                                            from_csv=[str(scalars)],
                                                            out_dir=str(tmp_path / "rebuilt"), reps=200))
    assert rebuilt == body
    assert [p.read_bytes() for p in rebuilt_pngs] == [p.read_bytes() for p in pngs]
    assert (tmp_path / "rebuilt" / "results.md").read_text().endswith(body)


def test_several_csv_folders_make_one_report_and_env_ids_keep_only_their_runs(synthetic_runs, tmp_path):
    report.build_report(report.Args(runs_dir=str(synthetic_runs), out_dir=str(tmp_path / "pendulum"),
                                    export_csv=True, reps=50))
    other = tmp_path / "hopper"  # the same runs under another env id and run ids, as a second environment's export
    other.mkdir()
    for meta_path in (tmp_path / "pendulum" / "scalars").glob("*.json"):
        meta = {**json.loads(meta_path.read_text()), "env_id": "local/hopper/medium-v0"}
        (other / f"hopper-{meta_path.stem}.json").write_text(json.dumps(meta))
        (other / f"hopper-{meta_path.stem}.csv").write_text(meta_path.with_suffix(".csv").read_text())
    folders = [str(tmp_path / "pendulum" / "scalars"), str(other)]
    both, pngs = report.build_report(report.Args(from_csv=folders, out_dir=str(tmp_path / "both"), reps=50,
                                                 plots=False))
    assert pngs == [] and sorted(p.name for p in (tmp_path / "both").iterdir()) == ["results.md"]
    assert "| local/pendulum/medium-v0 | cql | samg | 3 |" in both
    assert "| local/hopper/medium-v0 | cql | samg | 3 |" in both
    assert "over 2 task(s)" in both
    hopper, _ = report.build_report(report.Args(from_csv=folders, env_ids=["local/hopper/medium-v0"],
                                                out_dir=str(tmp_path / "one"), reps=50))
    assert "| local/hopper/medium-v0 | cql | samg | 3 |" in hopper and "pendulum" not in hopper
    with pytest.raises(SystemExit, match="no run of --env-ids local/walker2d/medium-v0; the runs found are of "
                                         "local/hopper/medium-v0, local/pendulum/medium-v0"):
        report.build_report(report.Args(from_csv=folders, env_ids=["local/walker2d/medium-v0"],
                                        out_dir=str(tmp_path / "none"), reps=50))
    with pytest.raises(SystemExit, match="in more than one --from-csv folder"):
        report.build_report(report.Args(from_csv=[str(other), str(other)], out_dir=str(tmp_path / "twice")))


def test_gap_curve_is_qoff_minus_qbar_at_the_steps_both_were_logged():
    scalars = {"samg/qoff_values": (np.array([0, 100, 200]), np.array([-5.0, -6.0, -7.0])),
               "samg/qbar_values": (np.array([100, 200, 300]), np.array([-8.0, -6.5, 0.0]))}
    steps, gap = report.gap_curve(scalars)
    assert steps.tolist() == [100, 200] and gap.tolist() == [2.0, -0.5]
    assert report.gap_curve({"samg/qoff_values": scalars["samg/qoff_values"]}) is None


def test_report_says_what_to_do_when_no_run_has_finished_or_the_output_place_is_blocked(tmp_path):
    with pytest.raises(SystemExit, match="no finished runs"):
        report.build_report(report.Args(runs_dir=str(tmp_path), out_dir=str(tmp_path / "out")))
    (tmp_path / "blocked").write_text("a file in the way")
    with pytest.raises(SystemExit, match="cannot write into --out-dir"):
        report.build_report(report.Args(runs_dir=str(tmp_path), out_dir=str(tmp_path / "blocked" / "report")))
    with pytest.raises(SystemExit, match="--dip-fraction"):
        report.build_report(report.Args(runs_dir=str(tmp_path), dip_fraction=0.0))


# --- ood.py ---
@pytest.fixture(scope="module")
def ood():
    return load_script("ood", "benchmark")


def test_auroc_is_1_for_perfect_separation_0_5_for_identical_scores_and_averages_ties(ood):
    assert ood.auroc([0.9, 0.8, 0.7], [0.1, 0.2, 0.3]) == 1.0
    assert ood.auroc([0.1, 0.2], [0.9, 0.8]) == 0.0
    assert ood.auroc([0.5, 0.5, 0.5], [0.5, 0.5]) == 0.5
    assert ood.auroc([1.0, 2.0], [1.0, 0.0]) == 3.5 / 4  # one tie among four pairs counts one half
    assert list(ood.average_ranks(np.array([3.0, 1.0, 3.0, 2.0]))) == [3.5, 1.0, 3.5, 2.0]


def test_both_estimators_rank_dataset_actions_above_random_ones_on_a_trained_cvae(ood, minari_store, tmp_path):
    po = ood.po
    data = po.load_dataset("local/hopper/medium-v0")
    obs_mean, obs_std = data["observations"].mean(0), data["observations"].std(0) + 1e-3
    checkpoint = {key: None for key in po.CHECKPOINT_KEYS}
    checkpoint.update(format=po.CHECKPOINT_FORMAT, algo="td3bc", dataset_id="local/hopper/medium-v0", obs_dim=11,
                      act_dim=3, latent_dim=6, hidden_dims=[64, 64], obs_mean=torch.as_tensor(obs_mean),
                      obs_std=torch.as_tensor(obs_std), args={"cvae_lr": 1e-3}, gym_id="Hopper-v5", gym_kwargs={},
                      action_low=-torch.ones(3), action_high=torch.ones(3), reward_scale=1.0, reward_bias=0.0,
                      ref_min_score=0.0, ref_max_score=100.0)
    obs = torch.as_tensor((data["observations"] - obs_mean) / obs_std, dtype=torch.float32)
    torch.manual_seed(0)
    cvae, calibration = ood.train_cvae(checkpoint, obs, torch.as_tensor(data["actions"]), steps=400)
    checkpoint.update(cvae=cvae.state_dict(), cvae_calibration=calibration)
    path = tmp_path / "fake.pt"
    torch.save(checkpoint, path)
    results, source = ood.measure(path, ood.Args(num_pairs=1000))
    assert source == "1000 training pairs of the checkpoint's C-VAE"
    for estimator in ("latent", "elbo"):
        assert results[estimator]["auroc_random"] > 0.6, (estimator, results[estimator])
    table = ood.markdown([(path, source, results)], p_threshold=0.2)
    assert table.count("| fake.pt |") == 2 and "| latent |" in table and "| elbo |" in table


# --- the checkpoint as the unit ---
def test_checkpoint_level_interval_of_two_checkpoints_spans_their_means_whatever_their_seeds_say():
    # seeds agree within each checkpoint: resampling the two checkpoints gives a, (a+b)/2, b with probabilities
    # 1/4, 1/2, 1/4, so the 2.5% and 97.5% percentiles are exactly a and b
    groups = {1: np.array([10.0, 10.0, 10.0]), 2: np.array([30.0, 30.0, 30.0])}
    assert report.checkpoint_mean_ci(groups, reps=4000, seed=1) == (20.0, 10.0, 30.0)
    # the same six runs pooled as seeds of one start give a much narrower interval
    _, low, high = report.bootstrap_mean_ci([10.0] * 3 + [30.0] * 3, reps=4000, seed=1)
    assert 10.0 < low and high < 30.0


def independent_nested_bootstrap(groups, reps, seed):
    """The checkpoint-level bootstrap written out plainly, in the draw order report.nested_resamples documents."""
    rng = np.random.default_rng(seed)
    statistics = []
    for _ in range(reps):
        picks = rng.integers(0, len(groups), len(groups))
        means = []
        for pick in picks:
            seeds = groups[pick]
            drawn = [seeds[i] for i in rng.integers(0, len(seeds), len(seeds))]
            means.append(sum(drawn) / len(drawn))
        statistics.append(sum(means) / len(means))
    return statistics


def test_checkpoint_level_interval_matches_an_independent_resampling_of_checkpoints_then_seeds():
    groups = [[12.0, 30.0, 18.0], [40.0, 44.0], [5.0, 9.0, 1.0, 7.0]]
    statistics = independent_nested_bootstrap(groups, reps=700, seed=4)
    low, high = np.percentile(statistics, [2.5, 97.5])
    point = np.mean([np.mean(g) for g in groups])
    result = report.checkpoint_mean_ci({c: np.array(g) for c, g in enumerate(groups, 1)}, reps=700, seed=4)
    assert result == pytest.approx((point, low, high), abs=1e-9)


def test_paired_difference_resamples_both_arms_with_the_same_checkpoints():
    # arm x is arm y + 5 on every checkpoint; checkpoints differ by 40: paired, the difference is exactly 5
    x = {1: np.array([15.0, 15.0]), 2: np.array([55.0, 55.0]), 3: np.array([35.0, 35.0])}
    y = {1: np.array([10.0, 10.0]), 2: np.array([50.0, 50.0]), 3: np.array([30.0, 30.0])}
    assert report.paired_difference_ci(x, y, reps=500, seed=0) == (5.0, 5.0, 5.0, 3)
    # only the checkpoints both arms fine-tuned count
    assert report.paired_difference_ci(x, {2: y[2]}, reps=100, seed=0) == (5.0, 5.0, 5.0, 1)
    assert all(np.isnan(report.paired_difference_ci(x, {9: y[1]}, reps=100, seed=0)[:3]))


def checkpoint_runs(method, finals_by_checkpoint, env_id="e1", dips=None):
    """Per-run rows as build_report makes them: seed k fine-tunes checkpoint ((k - 1) % 3) + 1."""
    rows = []
    for checkpoint, finals in finals_by_checkpoint.items():
        for index, final in enumerate(finals):
            rows.append({"env_id": env_id, "algo": "td3bc", "method": method, "seed": checkpoint + 3 * index,
                         "checkpoint_seed": checkpoint, "offline": 40.0, "final": final,
                         "dip": final / 2 if dips is None else dips, "during": final - 1.0})
    return rows


def test_cells_comparisons_and_the_aggregate_treat_the_checkpoint_as_the_unit():
    samg = {1: [60.0, 62.0, 61.0], 2: [20.0, 21.0, 22.0], 3: [40.0, 40.0, 43.0]}
    none = {c: [v - 10.0 for v in values] for c, values in samg.items()}
    per_run = []
    for env_id in ("e1", "e2"):
        per_run += checkpoint_runs("samg-static", samg, env_id) + checkpoint_runs("none", none, env_id)
    rows = report.cell_rows(per_run, reps=500, seed=0)
    row = next(r for r in rows if r["env_id"] == "e1" and r["method"] == "samg-static")
    assert row["checkpoints"] == [1, 2, 3] and len(row["seeds"]) == 9
    groups = [samg[c] for c in (1, 2, 3)]
    expected = np.percentile(independent_nested_bootstrap(groups, reps=500, seed=0), [2.5, 97.5])
    assert row["final"] == pytest.approx((np.mean([np.mean(g) for g in groups]), *expected), abs=1e-9)
    compared = report.comparisons(per_run, reps=300, seed=0)
    assert {(c["env_id"], c["method"], c["reference"]) for c in compared} == {("e1", "samg-static", "none"),
                                                                             ("e2", "samg-static", "none")}
    final_low = compared[0]["final"][1]
    assert compared[0]["final"][0] == pytest.approx(10.0) and final_low > 0.0 and compared[0]["checkpoints"] == 3
    agg = report.aggregate(per_run, reps=200, seed=0)
    assert agg["unit"] == "checkpoints" and agg["matrices"]["samg-static"].shape == (3, 2)  # checkpoints x tasks
    assert sorted(agg["matrices"]["samg-static"][:, 0]) == pytest.approx([21.0, 41.0, 61.0])
    body = report.markdown_body(rows, agg, {"samg-static": [], "none": []}, 0.3, compared)
    assert "| e1 | td3bc | samg-static | 9 (3 ckpt) |" in body
    assert "| method | checkpoints per task | IQM of final scores |" in body
    assert "| e1 | td3bc | samg-static | none | 3 | 10.0 [" in body and "] higher |" in body
    # one checkpoint per cell: intervals over seeds, as before
    single = scored("e1", "td3bc", "samg", [1.0, 2.0, 3.0]) + scored("e1", "td3bc", "none", [1.0, 2.0, 3.0])
    assert report.aggregate(single, reps=50, seed=0)["unit"] == "runs"


def test_frozen_dip_preset_pretrains_three_checkpoints_per_cell_and_fine_tunes_each_with_three_seeds():
    preset, _, _ = suite.resolve(suite.Args(preset="frozen-dip"))
    runs = suite.plan("frozen-dip", preset, "r", "c")
    stages = [run.stage for run in runs]
    assert stages == ["dataset"] * 3 + ["pretrain"] * 9 + ["online"] * (3 * 6 * 9)
    assert all(contains(run.command, ["--qualities", "medium"]) and "medium-replay" not in run.command
               for run in runs[:3])
    online = [run for run in runs if run.stage == "online"]
    assert {run.meta["method"] for run in online} == {"none", "offline-0.5", "samg", "samg-static",
                                                      "samg-static-sample", "even-static"}
    for run in online:
        assert run.meta["checkpoint_seed"] == (run.meta["seed"] - 1) % 3 + 1
        assert run.command[run.command.index("--checkpoint") + 1].endswith(f"__{run.meta['checkpoint_seed']}.pt")
        assert run.meta["learning_starts"] == 2000 and run.meta["total_timesteps"] == 20_000
        # the then default `samg` replaced Q_off every 50k steps: never within 20k
        assert "--qoff-refresh-every" not in run.command or run.command[run.command.index("--qoff-refresh-every") + 1] == "50000"
    static = next(run for run in online if run.meta["method"] == "samg-static-sample")
    assert contains(static.command, ["--no-adaptive", "--p-at", "sample"])
    # the matched constant: even's p at frozen SAMG's mean p, added with --methods
    preset, _, _ = suite.resolve(suite.Args(preset="frozen-dip", methods=("even-0.05-static",)))
    matched = [run for run in suite.plan("frozen-dip", preset, "r", "c") if run.stage == "online"]
    assert len(matched) == 3 * 9 and all(contains(run.command, ["--coef-mode", "even", "--even-p", "0.05",
                                                                "--no-adaptive"]) for run in matched)


@pytest.mark.parametrize("method", sorted(suite.METHODS))
def test_every_method_is_flags_that_the_online_scripts_it_names_accept(method):
    import tyro

    flags = list(suite.METHODS[method])
    for algo, script in suite.ONLINE_SCRIPTS.items():
        module = load_script(script[: -len(".py")])
        args = tyro.cli(module.Args, args=flags)
        assert args.coef_mode == flags[flags.index("--coef-mode") + 1]
        assert args.adaptive == ("--no-adaptive" not in flags)
        assert (args.qoff_refresh_every > 0) == ("--qoff-refresh-every" in flags)  # Q_off frozen unless asked


def test_a_method_whose_flag_was_retired_is_refused_naming_the_flag():
    with pytest.raises(SystemExit, match="samg-both needs --p-at both, which was retired"):
        suite.resolve(suite.Args(preset="quick", methods=("samg-both",)))


# --- eval_checkpoint.py: many episodes per checkpoint, paired ---
@pytest.mark.parametrize("algo", ["cql", "td3bc", "awac", "iql"])
def test_eval_checkpoint_replays_pretrainings_own_last_evaluation(tiny_checkpoints, algo):
    # pretraining's last evaluation (1 episode from environment seed 1 + 10000) is the checkpoint's recorded score:
    # the loaded actor must act exactly as the trained one did
    evaluator = load_script("eval_checkpoint", "benchmark")
    checkpoint = evaluator.load(str(tiny_checkpoints.checkpoint(algo)))
    scores = evaluator.episode_scores(checkpoint, 2, 10_001)
    assert scores.shape == (2,)
    assert scores[0] == pytest.approx(checkpoint["offline_normalized_score"], abs=1e-6)


def test_eval_checkpoint_pairs_episodes_and_refuses_a_missing_output_folder(tiny_checkpoints, tmp_path):
    path = tiny_checkpoints.checkpoint("td3bc")
    done = run_script("benchmark/eval_checkpoint.py", path, path, "--episodes", 3, "--out", tmp_path / "eval.md",
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = [line for line in (tmp_path / "eval.md").read_text().splitlines() if line.startswith(f"| {path} |")]
    assert len(rows) == 2 and rows[1].endswith("| +0.0 [+0.0, +0.0] |")  # the same policy on the same starts
    refused = run_script("benchmark/eval_checkpoint.py", path, "--out", tmp_path / "no" / "eval.md", cwd=tmp_path)
    assert refused.returncode != 0 and "its folder does not exist" in refused.stderr + refused.stdout
    assert not (tmp_path / "no").exists()
    other = tmp_path / "other.pt"  # another environment: refused before any episode, nothing written
    checkpoint = torch.load(path, weights_only=True)
    torch.save({**checkpoint, "gym_id": "Walker2d-v5"}, other)
    refused = run_script("benchmark/eval_checkpoint.py", path, other, "--out", tmp_path / "mixed.md", cwd=tmp_path)
    assert refused.returncode != 0 and "different environments" in refused.stderr
    assert not (tmp_path / "mixed.md").exists()
