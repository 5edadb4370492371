"""IQL: pretraining with `--algo iql` and samg_iql.py, whose SAMG guidance mixes the state values V and V_off.

The IQL block (StateValue, expectile_loss, advantage_weighted_regression) is byte-identical in pretrain_offline.py
and samg_iql.py (test_shared_blocks.py), so its functions are taken from samg_iql.py.
"""
import copy
import os
import shutil

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import load_script, make_tiny_dataset, run_script
from test_samg_target import TargetProbe

ENV_ID = "local/hopper/medium-v0"
QUICK = ["--env-id", ENV_ID, "--eval-episodes", "1"]
OBS_DIM, ACT_DIM, HIDDEN = 5, 2, [32, 32]
GAMMA = 0.9


@pytest.fixture(scope="module")
def iql():
    return load_script("samg_iql")


@pytest.fixture(scope="module")
def po():
    return load_script("pretrain_offline")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory holding an iql checkpoint pretrained on a tiny dataset, which is then deleted: every online run
    below happens without the offline data."""
    base = tmp_path_factory.mktemp("iql")
    store, workdir = base / "offline-store", base / "work"
    workdir.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(store))
        make_tiny_dataset(ENV_ID)
    result = run_script("pretrain_offline.py", "--env-id", ENV_ID, "--algo", "iql", "--total-steps", 200,
                        "--cvae-steps", 200, "--eval-freq", 200, "--eval-episodes", 1, "--hidden-dims", 64, 64,
                        cwd=workdir, env_overrides={"MINARI_DATASETS_PATH": str(store)})
    assert result.returncode == 0, result.stderr
    shutil.rmtree(store)
    return workdir


def checkpoint_path(workdir):
    return workdir / "checkpoints" / f"{ENV_ID.replace('/', '-')}__iql__1.pt"


def scalars(run_dir) -> dict:
    """{tag: [(step, value), ...]} from the single run under run_dir."""
    (run,) = os.listdir(run_dir)
    events = EventAccumulator(os.path.join(run_dir, run), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# --- the online target: y = r + gamma (1 - d) [(1 - p) V(s') + p V_off(s')] ---
def fixed_batch(size=32):
    generator = torch.Generator().manual_seed(0)
    obs, next_obs = torch.randn(size, OBS_DIM, generator=generator), torch.randn(size, OBS_DIM, generator=generator)
    actions = torch.rand(size, ACT_DIM, generator=generator) * 2 - 1
    rewards = torch.randn(size, generator=generator)
    dones = (torch.rand(size, generator=generator) < 0.3).float()
    return obs, actions, rewards, next_obs, dones


def target_parts(iql, familiar_everywhere=True, **args):
    """Actor, V and V_off (different random weights), the Coefficient and the Args of samg_iql.Args(**args). With
    `familiar_everywhere` the C-VAE's encoder mean is 0 for every pair, so the latent estimator's p is exactly 1."""
    torch.manual_seed(1)
    actor = iql.GaussianActor(OBS_DIM, ACT_DIM, HIDDEN)
    value, value_offline = iql.StateValue(OBS_DIM, HIDDEN), iql.StateValue(OBS_DIM, HIDDEN)
    cvae = iql.CVAE(OBS_DIM, ACT_DIM, 2 * ACT_DIM, HIDDEN)
    if familiar_everywhere:
        with torch.no_grad():
            cvae.encoder[-1].weight.zero_()
            cvae.encoder[-1].bias.zero_()
    args = iql.Args(gamma=GAMMA, **args)
    coefficient = iql.Coefficient(args, cvae, {"neg_elbo_quantiles": torch.arange(10.0)}, torch.device("cpu"))
    return actor, value, value_offline, coefficient, args


def target(iql, actor, value, value_offline, coefficient, args, batch, diagnose=True):
    """The target update_critic regresses the critics to (read back by a TargetProbe critic), p and the metrics."""
    probe = TargetProbe(len(batch[2]))
    with torch.enable_grad():  # the critic step, inside tests that compute their references without gradients
        _, metrics, _, p = iql.update_critic(batch, actor, probe, value, value_offline, coefficient,
                                             torch.optim.SGD(probe.parameters(), lr=0.0), args, diagnose)
    return probe.target(), p, metrics


@torch.no_grad()
def test_iql_target_with_p_zero_is_r_plus_gamma_v_of_the_next_state(iql):
    actor, value, value_offline, coefficient, args = target_parts(iql, coef_mode="none")
    batch = fixed_batch()
    obs, _, rewards, next_obs, dones = batch
    y, p, metrics = target(iql, actor, value, value_offline, coefficient, args, batch)
    assert torch.equal(p, torch.zeros(32))
    torch.testing.assert_close(y, rewards + GAMMA * (1.0 - dones) * value(next_obs))
    assert not torch.allclose(y, rewards + GAMMA * (1.0 - dones) * value(obs))  # V at s', not at s
    assert torch.equal(y[dones == 1], rewards[dones == 1])  # a termination stops bootstrapping
    assert metrics[4].item() == pytest.approx(value(next_obs).mean().item())  # samg/qbar_values = mean V(s')
    assert metrics[3].item() == pytest.approx(value_offline(next_obs).mean().item())  # samg/qoff_values: V_off(s')
    assert metrics[2].item() == 0.0  # samg/target_shift: p = 0 moves no target


class Raises(torch.nn.Module):
    """A V_off that must not be evaluated."""

    def forward(self, obs):
        raise AssertionError("V_off was evaluated")


def test_iql_none_mode_never_evaluates_v_off_unless_diagnose_asks_for_the_metrics(iql):
    actor, value, _, coefficient, args = target_parts(iql, coef_mode="none")
    batch = fixed_batch()
    y, p, metrics = target(iql, actor, value, Raises(), coefficient, args, batch, diagnose=False)
    assert metrics is None and torch.equal(p, torch.zeros(32))
    with torch.no_grad():
        torch.testing.assert_close(y, batch[2] + GAMMA * (1.0 - batch[4]) * value(batch[3]))
    with pytest.raises(AssertionError, match="V_off was evaluated"):  # samg/qoff_values needs V_off(s')
        target(iql, actor, value, Raises(), coefficient, args, batch, diagnose=True)


@pytest.mark.parametrize("p_at", ["sample", "next"])
@torch.no_grad()
def test_iql_target_with_p_one_uses_only_the_offline_value(iql, p_at):
    actor, value, value_offline, coefficient, args = target_parts(iql, coef_mode="cvae", p_estimator="latent",
                                                                  p_at=p_at)
    batch = fixed_batch()
    _, _, rewards, next_obs, dones = batch
    y, p, _ = target(iql, actor, value, value_offline, coefficient, args, batch)
    torch.testing.assert_close(p, torch.ones(32))
    torch.testing.assert_close(y, rewards + GAMMA * (1.0 - dones) * value_offline(next_obs))
    assert not torch.allclose(value(next_obs), value_offline(next_obs))  # so the test tells the two apart


@torch.no_grad()
def test_iql_target_between_is_the_convex_mix_of_the_two_values(iql):
    actor, value, value_offline, coefficient, args = target_parts(iql, coef_mode="even")  # --p-at next
    batch = fixed_batch()
    _, _, rewards, next_obs, dones = batch
    torch.manual_seed(7)
    y, p, metrics = target(iql, actor, value, value_offline, coefficient, args, batch)
    after = torch.rand(())
    torch.manual_seed(7)
    assert torch.rand(()) == after  # a constant p needs no a' ~ pi(s'): nothing was drawn
    assert torch.equal(p, torch.full((32,), 0.5))
    v, v_off = value(next_obs), value_offline(next_obs)
    torch.testing.assert_close(y, rewards + GAMMA * (1.0 - dones) * (0.5 * v + 0.5 * v_off))
    shift = GAMMA * (1.0 - dones) * 0.5 * (v_off - v)  # samg/target_shift: y(p) - y(p = 0), averaged
    assert metrics[2].item() == pytest.approx(shift.mean().item())
    assert metrics[2].item() != pytest.approx((GAMMA * 0.5 * (v_off - v)).mean().item())  # terminals add nothing

    actor, value, value_offline, coefficient, args = target_parts(iql, coef_mode="random")
    y, p, _ = target(iql, actor, value, value_offline, coefficient, args, batch)
    assert 0.0 < p.min() and p.max() < 1.0 and p.std() > 0.1
    torch.testing.assert_close(y, rewards + GAMMA * (1.0 - dones) * ((1 - p) * v + p * v_off))


@pytest.mark.parametrize("p_at", ["sample", "next"])
@torch.no_grad()
def test_p_at_next_is_taken_at_the_next_state_and_an_action_the_policy_samples_there(iql, p_at):
    """IQL's target has no next action; --p-at next evaluates the C-VAE at (s', a' ~ pi(s')) [our choice], and only
    then is a' drawn (--p-at sample leaves the random stream alone)."""
    actor, value, value_offline, coefficient, args = target_parts(iql, familiar_everywhere=False, coef_mode="cvae",
                                                                  p_estimator="latent", p_threshold=0.0, p_at=p_at)
    batch = fixed_batch()
    obs, actions, rewards, next_obs, dones = batch
    torch.manual_seed(7)
    y, p, _ = target(iql, actor, value, value_offline, coefficient, args, batch)
    after = torch.rand(())
    torch.manual_seed(7)
    sampled_next_actions = actor.act(next_obs, deterministic=False)
    assert (torch.rand(()) == after) == (p_at == "next")
    p_sample = iql.p_latent(coefficient.cvae, obs, actions)
    p_next = iql.p_latent(coefficient.cvae, next_obs, sampled_next_actions)
    assert not torch.allclose(p_sample, p_next)
    assert not torch.allclose(p_next, iql.p_latent(coefficient.cvae, next_obs, actor.act(next_obs,
                                                                                         deterministic=True)))
    expected = {"sample": p_sample, "next": p_next}[p_at]
    torch.testing.assert_close(p, expected)
    assert 0.0 < p.min() and p.max() < 1.0
    v, v_off = value(next_obs), value_offline(next_obs)
    torch.testing.assert_close(y, rewards + GAMMA * (1.0 - dones) * ((1 - expected) * v + expected * v_off))


def test_expectile_loss_weights_positive_errors_by_the_expectile_and_negative_by_its_complement(iql):
    difference = torch.tensor([2.0, -1.0, 0.5, -3.0])
    expected = (0.7 * 4.0 + 0.3 * 1.0 + 0.7 * 0.25 + 0.3 * 9.0) / 4  # = 1.49375
    assert iql.expectile_loss(difference, 0.7).item() == pytest.approx(expected)
    assert iql.expectile_loss(difference, 0.5).item() == pytest.approx(0.5 * (4.0 + 1.0 + 0.25 + 9.0) / 4)


def test_advantage_weights_are_exp_beta_a_clipped_at_the_maximum(iql):
    actor = iql.GaussianActor(OBS_DIM, ACT_DIM, HIDDEN)
    obs, actions = fixed_batch(3)[:2]
    advantage = torch.tensor([0.0, 0.1, 5.0])  # weights 1, e^0.3, e^15 -> clipped to 100
    log_prob = actor.log_prob(obs, actions)
    expected = -(torch.tensor([1.0, torch.e ** 0.3, 100.0]) * log_prob).mean()
    loss = iql.advantage_weighted_regression(actor, obs, actions, advantage, 3.0, 100.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_offline_iql_update_computes_its_losses_from_the_values_before_its_steps(po):
    """V regresses to the target critics' expectile, the critics to r + gamma V(s') and the actor is weighted by
    exp(beta (Q - V)), all from V before its own step (IQL's and CORL's order); computed here by hand."""
    args = po.Args(algo="iql", hidden_dims=(32, 32), batch_size=32, actor_lr=3e-4, latent_dim=4, iql_expectile=0.8,
                   iql_beta=2.0)
    torch.manual_seed(0)
    nets, opts = po.build_learner(args, OBS_DIM, ACT_DIM, torch.device("cpu"))
    batch = fixed_batch()
    obs, actions, rewards, next_obs, dones = batch
    before = copy.deepcopy(nets)
    with torch.no_grad():
        advantage = before["critic_target"](obs, actions).min(0).values - before["value"](obs)
        value_loss = (torch.where(advantage < 0, 0.2, 0.8) * advantage.pow(2)).mean()
        td_target = rewards + args.gamma * (1.0 - dones) * before["value"](next_obs)
        qf_loss = (before["critic"](obs, actions) - td_target).pow(2).mean(1).mean()  # mean over critics
        weights = torch.exp(2.0 * advantage).clamp(max=100.0)
        actor_loss = -(weights * before["actor"].log_prob(obs, actions)).mean()
    metrics = po.iql_update(1, batch, nets, opts, args)
    assert metrics["losses/value_loss"].item() == pytest.approx(value_loss.item(), rel=1e-5)
    assert metrics["losses/qf_loss"].item() == pytest.approx(qf_loss.item(), rel=1e-5)
    assert metrics["losses/actor_loss"].item() == pytest.approx(actor_loss.item(), rel=1e-5)
    with torch.no_grad():  # every network took its step, so "before" mattered
        assert not torch.allclose(nets["value"](next_obs), before["value"](next_obs))
        assert not torch.allclose(nets["critic"](obs, actions), before["critic"](obs, actions))
        assert not torch.allclose(nets["actor"].log_prob(obs, actions), before["actor"].log_prob(obs, actions))


# --- pretraining and fine-tuning, as a user runs them ---
def test_pretraining_iql_writes_a_checkpoint_with_a_value_network_loadable_weights_only(workdir, iql, po):
    checkpoint = torch.load(checkpoint_path(workdir), weights_only=True)
    assert checkpoint["algo"] == "iql" and set(po.CHECKPOINT_KEYS) <= set(checkpoint)
    assert (checkpoint["args"]["iql_expectile"], checkpoint["args"]["iql_beta"]) == (0.7, 3.0)  # locomotion values
    value = iql.StateValue(checkpoint["obs_dim"], checkpoint["hidden_dims"])
    value.load_state_dict(checkpoint["value"])
    actor = iql.GaussianActor(checkpoint["obs_dim"], checkpoint["act_dim"], checkpoint["hidden_dims"])
    actor.load_state_dict(checkpoint["actor"])
    assert not list(checkpoint_path(workdir).parent.glob("*.tmp-*"))  # the atomic write left no temporary file
    logged = scalars(workdir / "runs")
    assert [step for step, _ in logged["losses/value_loss"]] == [200]
    assert all(torch.isfinite(torch.tensor(value)) for tag in ["losses/value_loss", "losses/qf_loss",
                                                                "losses/actor_loss"] for _, value in logged[tag])


def test_pretraining_iql_on_antmaze_defaults_to_expectile_0_9_and_beta_10(tmp_path):
    from test_pretrain import make_tiny_antmaze_dataset

    store = tmp_path / "store"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(store))
        make_tiny_antmaze_dataset("D4RL/antmaze/umaze-v1")
    result = run_script("pretrain_offline.py", "--env-id", "antmaze-umaze-v2", "--algo", "iql", "--total-steps", 2,
                        "--cvae-steps", 2, "--eval-freq", 2, "--eval-episodes", 1, "--hidden-dims", 16, 16,
                        "--batch-size", 16, cwd=tmp_path, env_overrides={"MINARI_DATASETS_PATH": str(store)})
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = torch.load(tmp_path / "checkpoints" / "antmaze-umaze-v2__iql__1.pt", weights_only=True)
    assert (checkpoint["args"]["iql_expectile"], checkpoint["args"]["iql_beta"]) == (0.9, 10.0)


def test_samg_iql_fine_tunes_past_learning_starts_without_the_dataset_and_saves_a_reloadable_model(workdir, tmp_path):
    deleted_store = workdir.parent / "offline-store"
    assert not deleted_store.exists()
    result = run_script("samg_iql.py", *QUICK, "--total-timesteps", 60, "--learning-starts", 20, "--eval-freq", 30,
                        "--qoff-refresh-every", 40, "--save-model", "--run-dir", tmp_path,
                        cwd=workdir, env_overrides={"MINARI_DATASETS_PATH": str(deleted_store)})
    assert result.returncode == 0, result.stderr
    logged = scalars(tmp_path)
    assert [step for step, _ in logged["eval/normalized_score"]] == [0, 30, 60]
    for tag in ["losses/qf_loss", "losses/qf_values", "losses/value_loss", "losses/actor_loss", "samg/p_mean",
                "samg/p_active_frac", "samg/target_shift", "samg/cvae_loss", "samg/qoff_values", "samg/qbar_values",
                "samg/qoff_above_frac", "samg/p_q50", "samg/p_auroc"]:
        assert [step for step, _ in logged[tag]] == [60], tag  # logged every 1000 steps and at the last
        assert all(torch.isfinite(torch.tensor(value)) for _, value in logged[tag]), tag
    assert all(0.0 <= value <= 1.0 for _, value in logged["samg/p_mean"] + logged["samg/p_active_frac"])
    for tag in ["charts/episodic_return", "charts/SPS", "eval/return"]:
        assert tag in logged, f"{tag} missing"
    # V_off was refreshed from V at step 40; V moved on in the 20 updates since
    assert logged["samg/qbar_values"] != logged["samg/qoff_values"]

    (run,) = os.listdir(tmp_path)
    assert "__cvae-next-adaptive-refresh40__" in run
    model = torch.load(tmp_path / run / "model.pt", weights_only=True)
    offline = torch.load(checkpoint_path(workdir), weights_only=True)
    assert model["algo"] == "iql" and model["online_steps"] == 60 and set(offline) <= set(model)
    for network in ["actor", "critic", "value", "cvae"]:  # all four were trained online
        assert any(not torch.equal(model[network][k], offline[network][k]) for k in offline[network]), network
    result = run_script("samg_iql.py", *QUICK, "--checkpoint", tmp_path / run / "model.pt", "--total-timesteps", 2,
                        "--learning-starts", 1, "--run-dir", tmp_path / "reloaded", cwd=workdir)
    assert result.returncode == 0, result.stderr  # the saved model fine-tunes like a checkpoint


@pytest.fixture(scope="module")
def seeded_runs(workdir, tmp_path_factory):
    """Two runs with the same seed. Metrics are logged (averaged) every 1000 steps and at the last step, so step
    1001 logs the one update after V_off was refreshed from V at step 1000; updates start after step 990."""
    runs = []
    for attempt in range(2):
        run_dir = tmp_path_factory.mktemp(f"seeded{attempt}")
        result = run_script("samg_iql.py", *QUICK, "--total-timesteps", 1001, "--learning-starts", 990,
                            "--eval-freq", 5000, "--qoff-refresh-every", 1000, "--run-dir", run_dir, cwd=workdir)
        assert result.returncode == 0, result.stderr
        runs.append(scalars(run_dir))
    return runs


def test_samg_iql_same_seed_gives_identical_losses_on_cpu(seeded_runs):
    first, second = seeded_runs
    for tag in ["losses/qf_loss", "losses/value_loss", "losses/actor_loss", "samg/p_mean", "samg/cvae_loss",
                "samg/target_shift", "eval/return", "charts/episodic_return"]:
        assert first[tag] == second[tag], tag
    assert [step for step, _ in first["losses/value_loss"]] == [1000, 1001]
    assert first["losses/value_loss"][0][1] != first["losses/value_loss"][1][1]


def test_the_refresh_copies_the_online_value_into_v_off(seeded_runs):
    logged = {tag: dict(values) for tag, values in seeded_runs[0].items()}
    v, v_off = logged["samg/qbar_values"], logged["samg/qoff_values"]
    assert v[1000] != v_off[1000]  # updates 991-1000: V learning, V_off still the offline value
    assert v[1001] == v_off[1001]  # the update at 1001: V_off is the V that update reads
    assert logged["samg/p_mean"][1001] > 0 and logged["samg/target_shift"][1001] == 0.0  # so p moved no target


# --- bad input: one sentence, a non-zero exit status, no traceback, nothing written ---
def assert_one_sentence_error(result, *fragments):
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and all(fragment in message for fragment in fragments), message


FLAG_CASES = [
    ("samg_iql.py", ["--iql-beta", 0], "--iql-beta is 0.0 but must be positive"),
    ("samg_iql.py", ["--iql-max-weight", -1], "--iql-max-weight is -1.0 but must be positive"),
    ("samg_iql.py", ["--iql-expectile", 1], "--iql-expectile is 1.0 but must be strictly between 0 and 1"),
    ("samg_iql.py", ["--batch-size", 0], "--batch-size is 0 but must be positive"),
    ("pretrain_offline.py", ["--iql-expectile", 0], "--iql-expectile is 0.0 but must be strictly between 0 and 1"),
]


@pytest.mark.parametrize("script, flags, message", FLAG_CASES)
def test_numeric_flag_out_of_range_is_one_sentence_naming_the_flag(workdir, tmp_path, script, flags, message):
    base = QUICK if script == "samg_iql.py" else ["--env-id", ENV_ID, "--algo", "iql", "--checkpoint-dir",
                                                   tmp_path / "checkpoints"]
    result = run_script(script, *base, *flags, "--run-dir", tmp_path / "runs", cwd=workdir)
    assert_one_sentence_error(result, message)
    assert not any(path.is_file() for path in tmp_path.rglob("*"))


def iql_args_without(*keys):
    def edit(checkpoint):
        return {key: value for key, value in checkpoint["args"].items() if key not in keys}
    return edit


CHECKPOINT_CASES = [  # (key, new value or a function of the checkpoint (None removes the key), the message)
    ("algo", "td3bc", ["was pretrained with --algo td3bc but this script needs iql", "--algo iql"]),
    ("value", None, ["has a bad or missing value", "(iql)"]),
    ("value", lambda checkpoint: {name: weight[:1] for name, weight in checkpoint["value"].items()},
     ["the value in", "does not fit its stated sizes"]),
    ("args", iql_args_without("iql_expectile"), ["records no iql_expectile; pass --iql-expectile"]),
]


@pytest.mark.parametrize("key, value, fragments", CHECKPOINT_CASES, ids=[" ".join(c[2]) for c in CHECKPOINT_CASES])
def test_wrong_or_damaged_checkpoint_is_one_sentence_naming_it(workdir, tmp_path, key, value, fragments):
    checkpoint = torch.load(checkpoint_path(workdir), weights_only=True)
    checkpoint[key] = value(checkpoint) if callable(value) else value
    torch.save({k: v for k, v in checkpoint.items() if v is not None}, tmp_path / "edited.pt")
    result = run_script("samg_iql.py", *QUICK, "--checkpoint", tmp_path / "edited.pt", "--run-dir", tmp_path / "runs",
                        cwd=workdir)
    assert_one_sentence_error(result, *fragments)


def test_missing_checkpoint_prints_the_iql_pretrain_command_that_makes_it(tmp_path):
    result = run_script("samg_iql.py", "--env-id", "hopper-medium-v2", "--seed", 3, cwd=tmp_path)
    assert_one_sentence_error(result, "`python pretrain_offline.py --env-id hopper-medium-v2 --algo iql --seed 3`")
