"""benchmark/: the suite's plan, skipping and scheduling; the report's arithmetic and plots; the AUROC of ood.py."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT


def load(name: str):
    """Imports benchmark/{name}.py (the folder is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmark" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


suite = load("run_suite")
report = load("report")


@pytest.fixture
def quick_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    preset, _, _ = suite.resolve(suite.Args(preset="quick"))
    return suite.plan("quick", preset, str(tmp_path / "runs"), str(tmp_path / "checkpoints"))


# --- run_suite.py ---
def test_quick_preset_plans_one_dataset_then_18_pretraining_then_36_online_runs(quick_plan):
    stages = [run.stage for run in quick_plan]
    assert stages == ["dataset"] + ["pretrain"] * 18 + ["online"] * 36  # 2 datasets x 3 algos x 3 seeds (x 2 modes)
    position = {run.id: i for i, run in enumerate(quick_plan)}
    for run in quick_plan:
        assert all(position[dep] < position[run.id] for dep in run.deps), f"{run.id} comes before what it needs"
    dataset = quick_plan[0].command
    assert dataset[1].endswith("make_dataset.py")
    assert dataset[2:7] == ["--gym-id", "Pendulum-v1", "--qualities", "medium", "medium-replay"]


def test_every_online_run_loads_the_checkpoint_its_pretraining_run_writes(quick_plan, tmp_path):
    outputs = {run.id: run.outputs[0] for run in quick_plan if run.stage == "pretrain"}
    online = [run for run in quick_plan if run.stage == "online"]
    scripts = {run.command[1].split("/")[-1] for run in online}
    assert scripts == {"samg_sac.py", "samg_td3.py", "samg_awac.py"}
    for run in online:
        command = run.command
        assert Path(command[command.index("--checkpoint") + 1]) == outputs[run.deps[0]]
        assert Path(command[command.index("--run-dir") + 1]) == run.run_dir == tmp_path / "runs" / run.id
        assert command[command.index("--total-timesteps") + 1] == "15000"
        assert command[command.index("--qoff-refresh-every") + 1] == "3000"
        assert command[command.index("--seed") + 1] == str(run.meta["seed"])
        mode = command[command.index("--coef-mode") + 1]
        assert mode == run.meta["coef_mode"] and run.meta["method"] in ("cvae", "none")
        assert ("--no-adaptive" in command) == (mode == "none")  # p = 0 runs once, without the adaptive update
    pretrain = next(run for run in quick_plan if run.stage == "pretrain")
    assert {"--total-steps", "--cvae-steps", "--checkpoint-dir", "--algo", "--env-id"} <= set(pretrain.command)
    assert pretrain.deps == ["dataset__pendulum"]


def test_paper_preset_covers_9_d4rl_datasets_x_3_algos_x_7_methods_x_5_seeds_without_a_dataset_stage():
    preset, runs_dir, checkpoint_dir = suite.resolve(suite.Args(preset="paper"))
    runs = suite.plan("paper", preset, runs_dir, checkpoint_dir)
    assert (runs_dir, checkpoint_dir) == ("runs/paper", "checkpoints/paper")
    assert sum(run.stage == "pretrain" for run in runs) == 9 * 3 * 5
    assert sum(run.stage == "online" for run in runs) == 9 * 3 * 7 * 5  # cvae, even, random x 2 variants + none
    assert not any(run.stage == "dataset" for run in runs)
    assert {run.meta["method"] for run in runs if run.stage == "online"} == {
        "cvae", "cvae-static", "even", "even-static", "random", "random-static", "none"}
    pretrain = next(run for run in runs if run.stage == "pretrain")
    assert pretrain.command[pretrain.command.index("--total-steps") + 1] == "1000000"


def test_flags_override_the_preset():
    preset, _, _ = suite.resolve(suite.Args(preset="paper", env_ids=("hopper-medium-v2",), algos=("td3bc",),
                                            coef_modes=("cvae", "random"), variants=("static",), seeds=(7,),
                                            online_steps=1234))
    runs = suite.plan("paper", preset, "r", "c")
    online = [run for run in runs if run.stage == "online"]
    assert [run.id for run in online] == ["hopper-medium-v2__td3bc__cvae-static__7",
                                          "hopper-medium-v2__td3bc__random-static__7"]
    assert all("--no-adaptive" in run.command and "1234" in run.command for run in online)


def test_print_commands_lists_only_runs_whose_results_are_missing(tmp_path):
    env = {"MINARI_DATASETS_PATH": str(tmp_path / "minari"), "PATH": "/usr/bin:/bin"}
    args = [sys.executable, str(ROOT / "benchmark" / "run_suite.py"), "--preset", "quick", "--print-commands",
            "--runs-dir", str(tmp_path / "runs"), "--checkpoint-dir", str(tmp_path / "ck")]

    def lines():
        result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()

    first = lines()
    assert len(first) == 1 + 18 + 36
    assert first[0].startswith("python make_dataset.py --gym-id Pendulum-v1")
    assert first[1].startswith("python pretrain_offline.py --env-id local/pendulum/medium-v0 --algo cql --seed 1")
    assert "--coef-mode cvae" in first[19] and first[19].endswith("/DONE")
    # fake results: both datasets, one checkpoint, one finished online run
    for quality in ("medium", "medium-replay"):
        (tmp_path / "minari" / "local" / "pendulum" / f"{quality}-v0" / "data").mkdir(parents=True)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "local-pendulum-medium-v0__cql__1.pt").write_bytes(b"")
    (tmp_path / "runs" / "local-pendulum-medium-v0__cql__cvae__1").mkdir(parents=True)
    (tmp_path / "runs" / "local-pendulum-medium-v0__cql__cvae__1" / "DONE").write_text("")
    second = lines()
    assert len(second) == 55 - 3
    assert not any("make_dataset.py" in line or "medium-v0 --algo cql --seed 1 " in line for line in second)
    assert any("medium-replay-v0 --algo cql --seed 1 " in line for line in second)
    assert not any("local-pendulum-medium-v0__cql__cvae__1 " in line for line in second)


def test_a_missing_dataset_is_not_remade_when_every_run_that_needs_it_is_done(quick_plan):
    for run in quick_plan:
        if run.stage == "pretrain":
            run.outputs[0].parent.mkdir(parents=True, exist_ok=True)
            run.outputs[0].write_bytes(b"")
    todo = suite.runs_to_do(quick_plan)
    assert [run.stage for run in todo] == ["online"] * 36


def fake_run(tmp_path, run_id, stage, code, deps=(), online=False):
    """A run whose command is a tiny python program; its output is `{run_id}.out` (or DONE for online runs)."""
    out = tmp_path / f"{run_id}.out"
    run_dir = tmp_path / "runs" / run_id if online else None
    program = f"import pathlib; pathlib.Path({str(out)!r}).write_text('x'); {code}"
    return suite.Run(run_id, stage, ["python", "-c", program], list(deps),
                     [run_dir / "DONE"] if online else [out], run_dir, {"id": run_id})


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


# --- report.py ---
def write_scores(run_dir: Path, scores: dict, meta: dict, done: bool = True):
    """A run as the suite leaves it: suite.json, DONE, and the script's events in a subdirectory."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir.mkdir(parents=True)
    (run_dir / "suite.json").write_text(json.dumps(meta))
    writer = SummaryWriter(str(run_dir / "env__samg__1__0"))
    for step, value in scores.items():
        writer.add_scalar("eval/normalized_score", value, step)
    writer.close()
    if done:
        (run_dir / "DONE").write_text("")


def test_run_scores_take_step_0_the_last_evaluations_and_the_minimum_of_the_first_tenth():
    steps = np.array([0, 50, 100, 150, 500, 1000])
    values = np.array([40.0, 30.0, 20.0, 10.0, 60.0, 80.0])
    assert report.run_scores(steps, values, total_steps=1000) == {"offline": 40.0, "final": 80.0, "dip": 20.0}
    assert report.run_scores(steps, values, total_steps=1000, final_evals=2)["final"] == 70.0
    assert report.run_scores(steps, values, total_steps=1500)["dip"] == 10.0  # the window grows to 150
    assert np.isnan(report.run_scores(np.array([0, 500]), np.array([1.0, 2.0]), total_steps=1000)["dip"])


def test_mean_std_is_the_sample_std_over_seeds():
    assert report.mean_std([1.0, 2.0, 3.0, 4.0]) == (2.5, pytest.approx(np.sqrt(5.0 / 3.0)))
    mean, std = report.mean_std([7.0])
    assert mean == 7.0 and np.isnan(std)


def test_report_on_synthetic_logs_gives_exact_means_stds_dips_and_a_png(tmp_path):
    runs = tmp_path / "runs"
    base = {"env_id": "local/pendulum/medium-v0", "algo": "cql", "total_timesteps": 1000}
    # cvae: offline 50 each seed; dips 40, 42, 44 (at step 100); finals 90, 92, 94
    for seed, shift in zip((1, 2, 3), (0.0, 2.0, 4.0)):
        scores = {0: 50.0, 50: 45.0 + shift, 100: 40.0 + shift, 200: 30.0, 500: 70.0, 1000: 90.0 + shift}
        write_scores(runs / f"cvae{seed}", scores, {**base, "method": "cvae", "seed": seed})
    # none: offline 50, dip 10 and 20 (the step-200 evaluation lies outside the first 10%), finals 60, 80
    for seed, (dip, final) in zip((1, 2), ((10.0, 60.0), (20.0, 80.0))):
        scores = {0: 50.0, 100: dip, 200: 0.0, 1000: final}
        write_scores(runs / f"none{seed}", scores, {**base, "method": "none", "seed": seed})
    write_scores(runs / "unfinished", {0: 0.0, 1000: 0.0}, {**base, "method": "none", "seed": 3}, done=False)

    table, pngs = report.build_report(report.Args(runs_dir=str(runs), out_dir=str(tmp_path / "out")))
    rows = report.summarize([
        {**meta, **report.run_scores(*report.read_scalar(run_dir), meta["total_timesteps"])}
        for meta, run_dir in report.find_runs(str(runs))])
    cvae, none = rows
    assert (cvae["method"], cvae["seeds"], none["method"], none["seeds"]) == ("cvae", [1, 2, 3], "none", [1, 2])
    assert (cvae["offline"], cvae["offline_std"]) == (50.0, 0.0)
    assert (cvae["final"], cvae["final_std"]) == (92.0, 2.0)
    assert (cvae["dip"], cvae["dip_std"]) == (42.0, 2.0)
    assert (none["final"], none["final_std"]) == (70.0, pytest.approx(np.sqrt(200.0)))
    assert (none["dip"], none["dip_std"]) == (15.0, pytest.approx(np.sqrt(50.0)))
    assert "| cql | SAMG (C-VAE p, adaptive) | 3 | 50.0 ± 0.0 | 92.0 ± 2.0 | 42.0 ± 2.0 |" in table
    assert "| no guidance (p = 0) | 2 | 50.0 ± 0.0 | 70.0 ± 14.1 | 15.0 ± 7.1 |" in table
    assert (tmp_path / "out" / "results.md").read_text().endswith(table)
    assert [p.name for p in pngs] == ["curves_local-pendulum-medium-v0__cql.png"]
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_says_what_to_do_when_no_run_has_finished(tmp_path):
    with pytest.raises(SystemExit, match="no finished runs"):
        report.build_report(report.Args(runs_dir=str(tmp_path), out_dir=str(tmp_path / "out")))


# --- ood.py ---
@pytest.fixture(scope="module")
def ood():
    return load("ood")


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
                      obs_std=torch.as_tensor(obs_std), args={"cvae_lr": 1e-3})
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
