"""SAMG's Bellman target and its coefficient p(s, a), on hand-made inputs with exact expected numbers.

The SAMG target block (Coefficient, guided_target) and samg_metrics (with the logging) are byte-identical in the four
online scripts (test_shared_blocks.py), so their functions are taken from samg_sac.py; each script's own target,
computed inside its update_critic, is checked separately (IQL's also in test_iql.py). update_critic does not return its
target: a stand-in online critic (TargetProbe) whose Q is 0 reads it back from the gradient of the critic loss.
"""
import functools
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import load_script

OBS_DIM, ACT_DIM, HIDDEN = 5, 2, [32, 32]
SCRIPTS = ["sac", "td3", "awac", "iql"]


@functools.cache
def script(name):
    return load_script(f"samg_{name}")


@pytest.fixture(scope="module")
def sac():
    return script("sac")


@pytest.fixture(scope="module")
def td3():
    return script("td3")


@pytest.fixture(scope="module")
def awac():
    return script("awac")


def batch(size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    obs, next_obs = torch.randn(size, OBS_DIM, generator=generator), torch.randn(size, OBS_DIM, generator=generator)
    actions = torch.rand(size, ACT_DIM, generator=generator) * 2 - 1
    rewards = torch.randn(size, generator=generator)
    dones = (torch.rand(size, generator=generator) < 0.3).float()
    return obs, actions, rewards, next_obs, dones


def certain_cvae(module):
    """A C-VAE whose encoder mean is 0 everywhere: the latent estimator then gives p_vae = 1 exactly."""
    cvae = module.CVAE(OBS_DIM, ACT_DIM, 2 * ACT_DIM, HIDDEN)
    with torch.no_grad():
        cvae.encoder[-1].weight.zero_()
        cvae.encoder[-1].bias.zero_()
    return cvae


def elbo_is_squared_action_cvae(module):
    """mu = 0, sigma = 1 (no KL) and a decoder that outputs 0: the unfamiliarity of (s, a) is |a|^2."""
    cvae = certain_cvae(module)
    with torch.no_grad():
        cvae.decoder[-2].weight.zero_()
        cvae.decoder[-2].bias.zero_()
    return cvae


def coefficient(module, cvae=None, quantiles=None, **args):
    """The Coefficient of an online script with these Args fields, ranked against `quantiles` (no reservoir)."""
    calibration = {"neg_elbo_quantiles": torch.arange(10.0) if quantiles is None else quantiles}
    return module.Coefficient(module.Args(**args), cvae, calibration, torch.device("cpu"))


def critics(module, seed):
    torch.manual_seed(seed)
    return module.CriticEnsemble(OBS_DIM, ACT_DIM, HIDDEN, 2)


class TargetProbe(torch.nn.Module):
    """A stand-in online critic with one member whose Q is 0 for every sample: the critic loss is then mean(y^2), and
    the gradient on Q, -2 y / B, gives back (exactly, B being a power of two) the target y update_critic regressed to.
    Its optimizer has learning rate 0, so nothing moves."""

    num_critics = 1

    def __init__(self, size: int):
        super().__init__()
        self.q = torch.nn.Parameter(torch.zeros(1, size))

    def forward(self, obs, actions):
        return self.q

    def target(self) -> torch.Tensor:
        return -self.q.grad[0] * (self.q.shape[1] / 2)


class Raises(torch.nn.Module):
    """An offline critic (or V_off) that must not be evaluated."""

    def forward(self, *inputs):
        raise AssertionError("the offline critic was evaluated")


def nets(module, seed=1):
    """The networks update_critic reads besides the online critic: the (target) actor, the target critic and Q_off
    (IQL: V and V_off), each with different random weights, and SAC's log alpha."""
    torch.manual_seed(seed)
    name = module.__name__
    if name == "samg_iql":
        return dict(actor=module.GaussianActor(OBS_DIM, ACT_DIM, HIDDEN), next_value=module.StateValue(OBS_DIM, HIDDEN),
                    offline=module.StateValue(OBS_DIM, HIDDEN))
    actor = (module.TanhGaussianActor if name == "samg_sac" else module.DeterministicActor if name == "samg_td3"
             else module.GaussianActor)(OBS_DIM, ACT_DIM, HIDDEN)
    return dict(actor=actor, next_value=critics(module, seed + 1), offline=critics(module, seed + 2),
                log_alpha=torch.tensor(-1.5))


def critic_update(module, data, parts, coef, args, diagnose=False, seed=7):
    """update_critic of the script with a TargetProbe as the online critic, after torch.manual_seed(seed) (so that
    two calls draw the same a'); returns the target, p, the SAMG metrics and the losses."""
    probe = TargetProbe(len(data[2]))
    optimizer = torch.optim.SGD(probe.parameters(), lr=0.0)
    actor, next_value, offline = parts["actor"], parts["next_value"], parts["offline"]
    torch.manual_seed(seed)
    if module.__name__ == "samg_sac":
        losses, metrics, td_error, p = module.update_critic(data, actor, probe, next_value, offline, parts["log_alpha"],
                                                            coef, optimizer, args, diagnose)
    else:  # td3: the actor is the target actor; iql: next_value and offline are V and V_off
        losses, metrics, td_error, p = module.update_critic(data, actor, probe, next_value, offline, coef, optimizer,
                                                            args, diagnose)
    target = probe.target()
    assert torch.equal(td_error, target.abs()) and losses[1].item() == 0.0  # the probe's Q is 0
    return target, p, metrics, losses


# --- guided_target: y = r + gamma (1 - d) lerp(Qbar, Q_off, p) ---
REWARD, DONE = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.0, 1.0, 0.0])
NEXT_TARGET, NEXT_OFFLINE = torch.tensor([10.0, 10.0, 4.0]), torch.tensor([20.0, 20.0, -4.0])


def test_guided_target_with_p_zero_is_the_plain_bellman_target(sac):
    y = sac.guided_target(REWARD, DONE, 0.5, NEXT_TARGET, NEXT_OFFLINE, torch.zeros(3))
    assert y.tolist() == [6.0, 2.0, 1.0]


def test_guided_target_with_p_one_uses_only_the_offline_critic(sac):
    y = sac.guided_target(REWARD, DONE, 0.5, NEXT_TARGET, NEXT_OFFLINE, torch.ones(3))
    assert y.tolist() == [11.0, 2.0, -3.0]


def test_guided_target_between_zero_and_one_is_the_convex_mix(sac):
    y = sac.guided_target(REWARD, DONE, 0.5, NEXT_TARGET, NEXT_OFFLINE, torch.tensor([0.25, 0.5, 0.75]))
    # 1 + 0.5 * (0.75 * 10 + 0.25 * 20); terminal: reward only; -1 + 0.5 * (0.25 * 4 + 0.75 * -4)
    assert y.tolist() == [7.25, 2.0, -2.0]


# --- samg_metrics ---
def test_samg_metrics_target_shift_is_the_mean_of_target_at_p_minus_target_at_p_zero(sac):
    """Computed here by hand, sample by sample, from the target's definition; a terminal sample with p > 0 and
    Q_off != Qbar must add nothing to the shift."""
    gamma, p = 0.9, [0.0, 0.25, 0.5, 1.0, 1.0]
    reward, done = [1.0, -2.0, 0.5, 3.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]
    qbar, qoff = [10.0, 4.0, 7.0, -3.0, 2.0], [30.0, 8.0, -9.0, 5.0, 1.0]

    def target(r, d, b, o, w):
        return r + gamma * (1 - d) * ((1 - w) * b + w * o)

    shifts = [target(*x, w) - target(*x, 0.0) for *x, w in zip(reward, done, qbar, qoff, p)]
    assert shifts[2] == 0.0
    metrics = sac.samg_metrics(*map(torch.tensor, (p, done)), gamma, *map(torch.tensor, (qbar, qoff)))
    assert sac.SAMG_METRICS == ("samg/p_mean", "samg/p_active_frac", "samg/target_shift", "samg/qoff_values",
                                "samg/qbar_values", "samg/qoff_above_frac")
    assert metrics.tolist() == pytest.approx([sum(p) / 5, 4 / 5, sum(shifts) / 5, sum(qoff) / 5, sum(qbar) / 5,
                                              3 / 5], abs=1e-6)
    assert metrics[2].item() != pytest.approx(sum(gamma * w * (o - b) for w, b, o in zip(p, qbar, qoff)) / 5)


@pytest.mark.parametrize("name", SCRIPTS)
def test_target_shift_of_each_update_is_the_mean_difference_between_its_guided_and_plain_targets(name):
    """Through each script's own update_critic (SAC's entropy bonus, TD3's smoothing, IQL's V), at a constant p."""
    module, data = script(name), batch()
    parts, runs = nets(module), {}
    for mode in ("even", "none"):
        args = module.Args(coef_mode=mode, even_p=0.3, gamma=0.9)
        runs[mode] = critic_update(module, data, parts, coefficient(module, coef_mode=mode, even_p=0.3), args,
                                   diagnose=True)
    (guided, guided_p, metrics, _), (plain, plain_p, _, _) = runs["even"], runs["none"]
    assert torch.all(guided_p == 0.3) and torch.all(plain_p == 0.0)
    shift = metrics[2]
    assert shift.abs() > 1e-3  # the guidance moved the targets
    torch.testing.assert_close(shift, (guided - plain).mean(), rtol=1e-5, atol=1e-6)


# --- each script's own target: p = 0 is the base algorithm, p = 1 only Q_off ---
def sac_reference(data, actor, value_critic, log_alpha, gamma):
    obs, actions, rewards, next_obs, dones = data
    next_actions, next_log_prob, _ = actor(next_obs)
    soft_value = value_critic(next_obs, next_actions).min(0).values - log_alpha.exp() * next_log_prob
    return rewards + gamma * (1 - dones) * soft_value


@pytest.mark.parametrize("coef_mode", ["none", "cvae"])
def test_sac_target_is_the_soft_target_of_the_target_critic_at_p0_and_of_q_offline_at_p1(sac, coef_mode):
    data, parts = batch(), nets(sac)
    args = sac.Args(coef_mode=coef_mode, p_estimator="latent", p_threshold=0.0, p_at="sample", gamma=0.9)
    coef = sac.Coefficient(args, certain_cvae(sac), {"neg_elbo_quantiles": torch.arange(10.0)}, torch.device("cpu"))
    target, p, metrics, _ = critic_update(sac, data, parts, coef, args, diagnose=True)
    with torch.no_grad():
        torch.manual_seed(7)  # the same a' ~ pi(s')
        expected = sac_reference(data, parts["actor"], parts["next_value" if coef_mode == "none" else "offline"],
                                 parts["log_alpha"], 0.9)
    assert torch.all(p == (0.0 if coef_mode == "none" else 1.0))
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-5)
    assert (metrics[2] == 0) == (coef_mode == "none")  # samg/target_shift


@pytest.mark.parametrize("policy_noise", [0.2, 5.0])
@pytest.mark.parametrize("coef_mode", ["none", "cvae"])
def test_td3_target_is_the_smoothed_clipped_double_q_target_of_the_chosen_critic(td3, coef_mode, policy_noise):
    """Target policy smoothing: noise of std --policy-noise clipped at +-0.5, the action then clipped to [-1, 1]."""
    data, parts = batch(), nets(td3)
    args = td3.Args(coef_mode=coef_mode, p_estimator="latent", p_threshold=0.0, gamma=0.9, policy_noise=policy_noise)
    coef = td3.Coefficient(args, certain_cvae(td3), {"neg_elbo_quantiles": torch.arange(10.0)}, torch.device("cpu"))
    obs, actions, rewards, next_obs, dones = data
    target, p, _, _ = critic_update(td3, data, parts, coef, args)
    with torch.no_grad():
        torch.manual_seed(7)  # the same smoothing noise
        noise = (torch.randn_like(actions) * policy_noise).clamp(-0.5, 0.5)
        next_actions = (parts["actor"](next_obs) + noise).clamp(-1.0, 1.0)
        chosen = parts["next_value" if coef_mode == "none" else "offline"]
        expected = rewards + 0.9 * (1 - dones) * chosen(next_obs, next_actions).min(0).values
    assert torch.all(p == (0.0 if coef_mode == "none" else 1.0))
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("coef_mode", ["none", "cvae"])
def test_awac_target_uses_a_policy_sample_and_the_chosen_critic_without_entropy(awac, coef_mode):
    data, parts = batch(), nets(awac)
    args = awac.Args(coef_mode=coef_mode, p_estimator="latent", p_threshold=0.0, gamma=0.9)
    coef = awac.Coefficient(args, certain_cvae(awac), {"neg_elbo_quantiles": torch.arange(10.0)}, torch.device("cpu"))
    obs, actions, rewards, next_obs, dones = data
    target, p, _, _ = critic_update(awac, data, parts, coef, args)
    with torch.no_grad():
        torch.manual_seed(7)
        next_actions = parts["actor"].act(next_obs, deterministic=False)
        chosen = parts["next_value" if coef_mode == "none" else "offline"]
        expected = rewards + 0.9 * (1 - dones) * chosen(next_obs, next_actions).min(0).values
    assert torch.all(p == (0.0 if coef_mode == "none" else 1.0))
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("even_p", [0.5, 0.05])
def test_sac_target_at_a_constant_p_mixes_both_soft_targets_in_that_proportion(sac, even_p):
    data, parts = batch(), nets(sac)
    parts["log_alpha"] = torch.tensor(-1.0)
    targets = {}
    for coef_mode in ("even", "none"):
        args = sac.Args(coef_mode=coef_mode, even_p=even_p)
        targets[coef_mode] = critic_update(sac, data, parts, coefficient(sac, coef_mode=coef_mode, even_p=even_p),
                                           args)[0]
    with torch.no_grad():
        torch.manual_seed(7)
        offline = sac_reference(data, parts["actor"], parts["offline"], parts["log_alpha"], 0.99)
    expected = (1 - even_p) * targets["none"] + even_p * offline
    torch.testing.assert_close(targets["even"], expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", ["sac", "td3", "awac"])
def test_none_mode_gives_p_zero_the_plain_target_and_never_evaluates_the_offline_critic(name):
    module, data = script(name), batch(8)
    parts = nets(module)
    args = module.Args(coef_mode="none", gamma=0.9)
    plain, p, metrics, _ = critic_update(module, data, parts, coefficient(module, coef_mode="none"), args)
    parts_off = dict(parts, offline=Raises())
    target, p_off, metrics_off, _ = critic_update(module, data, parts_off, coefficient(module, coef_mode="none"), args)
    assert torch.equal(target, plain) and p_off.tolist() == [0.0] * 8 and metrics is None and metrics_off is None
    swapped = critic_update(module, data, dict(parts, next_value=parts["offline"]),
                            coefficient(module, coef_mode="none"), args)[0]
    assert not torch.allclose(swapped, plain)  # the next values do come from the target critic
    with pytest.raises(AssertionError, match="offline critic was evaluated"):  # diagnose asks for Q_off's values
        critic_update(module, data, parts_off, coefficient(module, coef_mode="none"), args, diagnose=True)


# --- p(s, a): Coefficient ---
@pytest.mark.parametrize("estimator", ["latent", "elbo"])
def test_p_lies_in_the_unit_interval_and_is_zero_below_the_threshold(sac, estimator):
    torch.manual_seed(0)
    cvae = sac.CVAE(OBS_DIM, ACT_DIM, 2 * ACT_DIM, HIDDEN)
    obs, actions = torch.randn(2000, OBS_DIM) * 3, torch.rand(2000, ACT_DIM) * 2 - 1
    quantiles = torch.linspace(0.0, 3.0, 1001)
    with torch.no_grad():
        p_vae = sac.p_latent(cvae, obs, actions) if estimator == "latent" else sac.p_elbo(cvae, quantiles, obs, actions)
        threshold = float(p_vae.median())
        coef = coefficient(sac, cvae, quantiles, coef_mode="cvae", p_estimator=estimator, p_threshold=threshold)
        assert torch.equal(coef.p_vae(obs, actions), p_vae)  # p_vae is p before the threshold
        p = coef(obs, actions)
    assert 0.0 <= float(p.min()) and float(p.max()) <= 1.0
    below = p_vae < threshold
    assert 500 < int(below.sum()) < 1500  # both sides of the threshold are exercised
    assert torch.all(p[below] == 0.0)
    assert torch.equal(p[~below], p_vae[~below])


def test_latent_estimator_averages_the_two_sided_prior_tail_mass_beyond_the_encoder_mean(sac):
    cvae = certain_cvae(sac)
    with torch.no_grad():
        cvae.encoder[-1].bias[: 2 * ACT_DIM] = torch.tensor([0.0, 1.959964, 1.0, -1.0])  # the means
        p = sac.p_latent(cvae, torch.zeros(1, OBS_DIM), torch.zeros(1, ACT_DIM))
    expected = (1.0 + 0.05 + 2 * math.erfc(1.0 / math.sqrt(2.0))) / 4  # 1 - Phi tails: 1, 0.05, 0.3173, 0.3173
    assert p.item() == pytest.approx(expected, abs=1e-6)


def test_elbo_estimator_is_the_share_of_offline_pairs_at_least_as_unusual(sac):
    cvae = elbo_is_squared_action_cvae(sac)  # mu = 0, sigma = 1: the KL term is 0; decodes to 0
    with torch.no_grad():
        quantiles = torch.arange(10.0)  # offline unfamiliarity scores 0, 1, ..., 9
        actions = torch.tensor([[0.0, 0.0], [1.5, 1.5], [10.0, 0.0]])  # |a|^2 = 0, 4.5, 100
        assert sac.unfamiliarity(cvae, torch.zeros(3, OBS_DIM), actions).tolist() == [0.0, 4.5, 100.0]
        p = sac.p_elbo(cvae, quantiles, torch.zeros(3, OBS_DIM), actions)
    assert p.tolist() == [1.0, 0.5, 0.0]


def test_even_mode_gives_one_half_to_every_sample_unless_told_another_constant(sac):
    p = coefficient(sac, coef_mode="even", p_threshold=0.9)(torch.zeros(7, OBS_DIM), torch.zeros(7, ACT_DIM))
    assert p.tolist() == [0.5] * 7
    p = coefficient(sac, coef_mode="even", even_p=0.05, p_threshold=0.9)(torch.zeros(7, OBS_DIM),
                                                                        torch.zeros(7, ACT_DIM))
    torch.testing.assert_close(p, torch.full((7,), 0.05))  # below the threshold too: even is unthresholded


def test_random_mode_draws_p_uniformly_per_sample_and_follows_the_seed(sac):
    coef = coefficient(sac, coef_mode="random", p_threshold=0.9)

    def draw():
        return coef(torch.zeros(20000, OBS_DIM), None)

    torch.manual_seed(3)
    p = draw()
    torch.manual_seed(3)
    assert torch.equal(p, draw())
    assert 0.0 <= float(p.min()) and float(p.max()) < 1.0
    assert abs(float(p.mean()) - 0.5) < 0.01 and abs(float((p < 0.2).float().mean()) - 0.2) < 0.01  # no threshold


def test_none_mode_coefficient_is_zero_without_a_cvae(sac):
    p = coefficient(sac, coef_mode="none")(torch.zeros(4, OBS_DIM), None)
    assert p.tolist() == [0.0] * 4


@pytest.mark.parametrize("script_name", SCRIPTS)
def test_run_names_say_the_mode_a_constant_p_other_than_one_half_and_a_refreshed_q_off(script_name):
    module = script(script_name)
    assert module.method_name(module.Args(coef_mode="even", adaptive=False)) == "even-static"
    assert module.method_name(module.Args(coef_mode="even", even_p=0.05, adaptive=False)) == "even0.05-static"
    assert module.method_name(module.Args(coef_mode="cvae", even_p=0.05)) == "cvae-next-adaptive"
    assert module.method_name(module.Args(p_at="sample", qoff_refresh_every=300)) == "cvae-sample-adaptive-refresh300"
    assert module.method_name(module.Args(coef_mode="none", qoff_refresh_every=300)) == "none"
    assert module.method_name(module.Args(coef_mode="none", offline_data_ratio=0.5)) == "none-offline0.5"


# --- where p is taken (--p-at) ---
def fixed_actor(next_actions):
    """A target actor whose action is `next_actions` at every batch of states (with --policy-noise 0)."""
    return lambda obs: next_actions.clone()


@pytest.mark.parametrize("p_at, expected_p", [("sample", [1.0, 0.5]), ("next", [0.5, 1.0])])
def test_p_at_picks_the_pair_and_the_target_mixes_with_it(td3, p_at, expected_p):
    # unfamiliarity |a|^2 against offline scores 0, 0.25, ..., 2.25: |a|^2 = 0 gives p = 1, |a|^2 = 1.125 p = 0.5
    obs, next_obs = torch.randn(2, OBS_DIM), torch.randn(2, OBS_DIM)
    actions, next_actions = torch.tensor([[0.0, 0.0], [0.75, 0.75]]), torch.tensor([[0.75, 0.75], [0.0, 0.0]])
    data = (obs, actions, torch.tensor([1.0, -2.0]), next_obs, torch.tensor([0.0, 0.0]))
    parts = dict(actor=fixed_actor(next_actions), next_value=critics(td3, 2), offline=critics(td3, 3))
    args = td3.Args(p_at=p_at, p_estimator="elbo", p_threshold=0.0, gamma=0.9, policy_noise=0.0)
    coef = td3.Coefficient(args, elbo_is_squared_action_cvae(td3), {"neg_elbo_quantiles": torch.arange(10.0) / 4},
                           torch.device("cpu"))
    target, p, metrics, _ = critic_update(td3, data, parts, coef, args, diagnose=True)
    with torch.no_grad():
        qbar = parts["next_value"](next_obs, next_actions).min(0).values.tolist()
        qoff = parts["offline"](next_obs, next_actions).min(0).values.tolist()
    assert p.tolist() == expected_p
    by_hand = [r + 0.9 * ((1 - w) * b + w * o) for r, w, b, o in zip([1.0, -2.0], expected_p, qbar, qoff)]
    assert target.tolist() == pytest.approx(by_hand, abs=1e-5)
    assert metrics.tolist() == pytest.approx([sum(expected_p) / 2, 1.0,
                                              sum(0.9 * w * (o - b) for w, b, o in zip(expected_p, qbar, qoff)) / 2,
                                              sum(qoff) / 2, sum(qbar) / 2, sum(o > b for b, o in zip(qbar, qoff)) / 2],
                                             abs=1e-5)


@pytest.mark.parametrize("mode", ["even", "random"])
def test_even_and_random_p_do_not_depend_on_p_at(td3, mode):
    data, parts, ps = batch(8), nets(td3), []
    for p_at in ("sample", "next"):
        args = td3.Args(coef_mode=mode, p_at=p_at)
        ps.append(critic_update(td3, data, parts, coefficient(td3, coef_mode=mode), args)[1])
    assert torch.equal(ps[0], ps[1])
    assert ps[0].tolist() == [0.5] * 8 if mode == "even" else ps[0].std() > 0.1


def test_td3_p_at_next_is_taken_at_the_smoothed_action_the_target_q_values_are_taken_at(td3):
    data, parts = batch(), nets(td3)
    cvae = td3.CVAE(OBS_DIM, ACT_DIM, 2 * ACT_DIM, HIDDEN)  # untrained: p_vae differs from pair to pair
    args = td3.Args(coef_mode="cvae", p_estimator="latent", p_threshold=0.0, gamma=0.9, p_at="next")
    coef = td3.Coefficient(args, cvae, {"neg_elbo_quantiles": torch.arange(10.0)}, torch.device("cpu"))
    obs, actions, rewards, next_obs, dones = data
    actor_target, critic_target, q_offline = parts["actor"], parts["next_value"], parts["offline"]
    target, p, _, _ = critic_update(td3, data, parts, coef, args)
    with torch.no_grad():
        torch.manual_seed(7)
        noise = (torch.randn_like(actions) * 0.2).clamp(-0.5, 0.5)
        smoothed = (actor_target(next_obs) + noise).clamp(-1.0, 1.0)
        expected_p = td3.p_latent(cvae, next_obs, smoothed)
        expected = rewards + 0.9 * (1 - dones) * torch.lerp(critic_target(next_obs, smoothed).min(0).values,
                                                             q_offline(next_obs, smoothed).min(0).values, expected_p)
        unsmoothed_p = td3.p_latent(cvae, next_obs, actor_target(next_obs))
    torch.testing.assert_close(p, expected_p)
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-5)
    assert not torch.allclose(p, unsmoothed_p)  # the pair matters


# --- the reference p_elbo ranks against, re-ranked as the C-VAE learns ---
def reservoir_calibration(seed=0, size=500):
    torch.manual_seed(seed)
    reservoir_obs = torch.randn(size, OBS_DIM)
    reservoir_actions = torch.tanh(reservoir_obs @ torch.randn(OBS_DIM, ACT_DIM))  # learnable: a function of s
    return {"neg_elbo_quantiles": torch.arange(10.0), "reservoir_obs": reservoir_obs,
            "reservoir_actions": reservoir_actions}


def test_rerank_after_cvae_steps_moves_the_reference_so_p_stays_uniform_on_the_offline_reservoir(sac):
    calibration = reservoir_calibration()
    reservoir = calibration["reservoir_obs"], calibration["reservoir_actions"]
    cvae = sac.CVAE(OBS_DIM, ACT_DIM, 2 * ACT_DIM, HIDDEN)
    coef = sac.Coefficient(sac.Args(p_estimator="elbo"), cvae, calibration, torch.device("cpu"))
    uniform = torch.arange(500, 0, -1) / 500  # each reservoir pair's share of pairs at least as unusual

    def reservoir_p():
        with torch.no_grad():
            return coef.p_vae(*reservoir).sort(descending=True).values

    with torch.no_grad():  # ranked against the reservoir under the C-VAE it was given, not the checkpoint's quantiles
        torch.testing.assert_close(coef.reference, sac.unfamiliarity(cvae, *reservoir).sort().values)
    torch.testing.assert_close(reservoir_p(), uniform)
    before, address = coef.reference.clone(), coef.reference.data_ptr()
    optimizer = torch.optim.Adam(cvae.parameters(), lr=3e-3)
    for _ in range(300):  # the adaptive step, here on the reservoir itself (the worst case for a frozen reference)
        sac.update_cvae_on_mastered(cvae, optimizer, *reservoir, torch.zeros(500), 1.0)
    assert torch.equal(coef.reference, before)  # the C-VAE's steps alone leave the reference as it was
    stale = reservoir_p()
    assert stale.mean() > 0.9 and 0.0 <= stale.min() and stale.max() <= 1.0  # a frozen reference inflates p
    coef.rerank()
    assert not torch.allclose(coef.reference, before)
    with torch.no_grad():
        torch.testing.assert_close(coef.reference, sac.unfamiliarity(cvae, *reservoir).sort().values)
    assert coef.reference.data_ptr() == address  # in place: a compiled update (CUDA graph) sees the new values
    torch.testing.assert_close(reservoir_p(), uniform)


def test_without_rerank_a_static_cvae_keeps_p_fixed_and_without_a_reservoir_p_ranks_against_the_quantiles(sac):
    """What --no-adaptive relies on: nothing but rerank moves the reference, so a C-VAE that does not learn gives each
    pair the same p for the whole run; an older checkpoint (no reservoir) ranks against its stored quantiles."""
    cvae, data = elbo_is_squared_action_cvae(sac), batch(16)
    quantiles = torch.linspace(0.0, 2.0, 101)
    coef = coefficient(sac, cvae, quantiles, p_estimator="elbo", p_threshold=0.0, adaptive=False)
    assert coef.reservoir is None and torch.equal(coef.reference, quantiles)
    with torch.no_grad():
        first = coef(data[0], data[1])
        torch.testing.assert_close(first, sac.p_elbo(cvae, quantiles, data[0], data[1]))
        assert torch.equal(coef(data[0], data[1]), first)
    coef = sac.Coefficient(sac.Args(adaptive=False), cvae, reservoir_calibration(), torch.device("cpu"))
    reference = coef.reference.clone()
    with torch.no_grad():
        first = coef(data[0], data[1])
        for _ in range(3):
            assert torch.equal(coef(data[0], data[1]), first) and torch.equal(coef.reference, reference)
        coef.rerank()  # the C-VAE did not move: re-ranking changes nothing either
    assert torch.equal(coef.reference, reference)


# --- replay ---
def test_offline_data_ratio_draws_that_share_of_each_batch_from_the_offline_data(sac):
    online, offline = (sac.ReplayBuffer(10, OBS_DIM, ACT_DIM, torch.device("cpu")) for _ in range(2))
    for replay, reward in ((online, 1.0), (offline, 2.0)):
        for _ in range(10):
            replay.add(torch.zeros(OBS_DIM).numpy(), [0.0, 0.0], reward, torch.zeros(OBS_DIM).numpy(), False)
    for ratio, expected_offline in ((0.5, 128), (0.25, 64), (0.1, 26)):
        rewards = online.sample(256, offline, ratio)[2]
        assert rewards.shape == (256,) and int((rewards == 2.0).sum()) == expected_offline
    assert (online.sample(256)[2] == 1.0).all() and (online.sample(256, None, 0.5)[2] == 1.0).all()


def test_replay_buffer_returns_what_was_stored_with_terminated_as_done(sac):
    replay = sac.ReplayBuffer(4, OBS_DIM, ACT_DIM, torch.device("cpu"))
    replay.add(torch.ones(OBS_DIM).numpy(), [0.5, -0.5], 2.0, torch.full((OBS_DIM,), 3.0).numpy(), True)
    obs, actions, rewards, next_obs, dones = replay.sample(3)
    assert obs.tolist() == [[1.0] * OBS_DIM] * 3 and actions.tolist() == [[0.5, -0.5]] * 3
    assert rewards.tolist() == [2.0] * 3 and next_obs.tolist() == [[3.0] * OBS_DIM] * 3 and dones.tolist() == [1.0] * 3


# --- the adaptive half ---
def test_cvae_learns_only_on_the_mastered_lowest_td_error_fraction(sac):
    torch.manual_seed(0)
    obs, actions = torch.randn(8, OBS_DIM), torch.rand(8, ACT_DIM) * 2 - 1
    td_error = torch.tensor([5.0, 0.1, 3.0, 0.2, 9.0, 0.3, 7.0, 0.4])  # mastered at 0.5: rows 1, 3, 5, 7
    cvae = sac.CVAE(OBS_DIM, ACT_DIM, 2 * ACT_DIM, HIDDEN)
    reference = sac.CVAE(OBS_DIM, ACT_DIM, 2 * ACT_DIM, HIDDEN)
    reference.load_state_dict(cvae.state_dict())
    torch.manual_seed(1)
    loss = sac.update_cvae_on_mastered(cvae, torch.optim.SGD(cvae.parameters(), lr=0.1), obs, actions, td_error, 0.5)
    torch.manual_seed(1)
    mastered = torch.tensor([1, 3, 5, 7])
    expected = sac.cvae_loss(reference, obs[mastered], actions[mastered])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not torch.equal(cvae.encoder[0].weight, reference.encoder[0].weight)  # it took a step


# --- the fast update computes what a textbook update computes ---
class PlainCritic(torch.nn.Module):
    """One Q-function as one would first write it: nn.Linear layers with out-of-place ReLUs."""

    def __init__(self, ensemble, member: int):
        super().__init__()
        linears = [layer for layer in ensemble.net if hasattr(layer, "weight")]
        self.layers = torch.nn.ModuleList()
        for layer in linears:
            with torch.random.fork_rng():  # its initialisation must not move the seeded stream both updates draw from
                linear = torch.nn.Linear(*layer.weight.shape[1:])
            with torch.no_grad():
                linear.weight.copy_(layer.weight[member].T)
                linear.bias.copy_(layer.bias[member, 0])
            self.layers.append(linear)

    def forward(self, obs, action):
        x = torch.cat([obs, action], -1)
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else torch.relu(layer(x))
        return x.squeeze(-1)


def test_the_fast_sac_update_computes_what_a_textbook_sac_update_with_the_guided_target_computes(sac):
    """Batched critics with in-place ReLUs and a matrix-vector last layer, fused Adam, an actor loss whose backward
    stops at the actor and a fused soft update: the same numbers as separate critics, plain autograd and a loop of
    lerps, over three updates with guidance (p from the same C-VAE at the same pairs, thresholded by hand)."""
    import copy

    data = batch(size=64, seed=3)
    torch.manual_seed(0)
    actor = sac.TanhGaussianActor(OBS_DIM, ACT_DIM, HIDDEN)
    critic = sac.CriticEnsemble(OBS_DIM, ACT_DIM, HIDDEN, 2)
    q_offline = critics(sac, seed=5).requires_grad_(False)
    cvae = sac.CVAE(OBS_DIM, ACT_DIM, 2 * ACT_DIM, HIDDEN)
    quantiles = torch.linspace(0.0, 20.0, 101)
    args = sac.Args(p_threshold=0.95)  # cvae mode, elbo estimator, p at the next pair, gamma 0.99
    coef = coefficient(sac, cvae, quantiles, p_threshold=0.95)
    results = []
    for fast in (True, False):
        torch.manual_seed(1)
        a, c = copy.deepcopy(actor), copy.deepcopy(critic)
        c_target = copy.deepcopy(c).requires_grad_(False)
        log_alpha = torch.tensor(-1.0, requires_grad=True)
        optimizers = [torch.optim.Adam(params, lr=1e-3, fused=fast) for params in (a.parameters(), c.parameters(),
                                                                                    [log_alpha])]
        plain = [PlainCritic(c, member) for member in range(2)]
        plain_optimizer = torch.optim.Adam([p for q in plain for p in q.parameters()], lr=1e-3)
        for _ in range(3):
            if fast:
                losses, _, _, p = sac.update_critic(data, a, c, c_target, q_offline, log_alpha, coef, optimizers[1],
                                                    args, diagnose=False)
                qf_loss = losses[0]
                actor_loss = sac.update_actor(data[0], a, c, log_alpha, optimizers[0], optimizers[2], -ACT_DIM)[0]
                sac.soft_update(list(c_target.parameters()), list(c.parameters()), 0.005)
                parameters = [*c.parameters(), *c_target.parameters()]
            else:
                obs, actions, rewards, next_obs, dones = data
                with torch.no_grad():
                    next_actions, next_log_prob, _ = a(next_obs)
                    bonus = -log_alpha.exp() * next_log_prob
                    q_target = torch.min(*[PlainCritic(c_target, m)(next_obs, next_actions) for m in range(2)])
                    q_off = torch.min(*[PlainCritic(q_offline, m)(next_obs, next_actions) for m in range(2)])
                    p_vae = sac.p_elbo(cvae, quantiles, next_obs, next_actions)
                    p = torch.where(p_vae >= 0.95, p_vae, torch.zeros_like(p_vae))
                    target = rewards + 0.99 * (1 - dones) * ((1 - p) * (q_target + bonus) + p * (q_off + bonus))
                losses = [(q(obs, actions) - target).pow(2).mean() for q in plain]
                plain_optimizer.zero_grad()
                sum(losses).backward()
                plain_optimizer.step()
                qf_loss = sum(losses).detach() / 2
                new_actions, log_prob, _ = a(obs)
                q_new = torch.min(*[q(obs, new_actions) for q in plain])
                actor_loss = (log_alpha.exp().detach() * log_prob - q_new).mean()
                optimizers[0].zero_grad()
                actor_loss.backward()
                optimizers[0].step()
                optimizers[2].zero_grad()
                (-(log_alpha.exp() * (log_prob.detach() - ACT_DIM)).mean()).backward()
                optimizers[2].step()
                with torch.no_grad():  # the ensemble's target, moved by hand from the plain critics' weights
                    for layer, *members in zip([l for l in c_target.net if hasattr(l, "weight")],
                                               *[q.layers for q in plain]):
                        for m, linear in enumerate(members):
                            layer.weight[m].copy_(0.995 * layer.weight[m] + 0.005 * linear.weight.T)
                            layer.bias[m, 0].copy_(0.995 * layer.bias[m, 0] + 0.005 * linear.bias)
                parameters = [torch.stack([q.layers[i].weight.T for q in plain]) if j % 2 == 0 else
                              torch.stack([q.layers[i].bias[None] for q in plain])
                              for i in range(len(plain[0].layers)) for j in range(2)] + list(c_target.parameters())
        results.append([qf_loss.detach(), actor_loss.detach(), log_alpha.detach().clone(), p,
                        *[x.detach().clone() for x in [*a.parameters(), *parameters]]])
    fast, plain = results
    assert (fast[3] > 0.95).any() and (fast[3] == 0).any()  # guidance was mixed in, and thresholded elsewhere
    for x, y in zip(fast, plain, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fast[4], actor.trunk[0].weight)  # it did learn


# --- samg/p_auroc (Run.log_p) ---
class Scalars:
    """A stand-in for the run's SummaryWriter."""

    def __init__(self):
        self.logged = {}

    def add_scalar(self, name, value, step):
        self.logged[name] = value


def log_p(module, coef, p, obs):
    """Run.log_p on a stand-in run; returns what it logged."""
    run = SimpleNamespace(writer=Scalars())
    module.Run.log_p(run, coef, p, obs, 1000)
    return run.writer.logged


def reservoir_coefficient(module, estimator):
    """A Coefficient whose C-VAE has learned a reservoir of offline pairs whose actions are a function of s."""
    calibration = reservoir_calibration(size=400)
    reservoir = calibration["reservoir_obs"], calibration["reservoir_actions"]
    cvae = module.CVAE(OBS_DIM, ACT_DIM, 2 * ACT_DIM, HIDDEN)
    optimizer = torch.optim.Adam(cvae.parameters(), lr=3e-3)
    for _ in range(300):
        loss = module.cvae_loss(cvae, *reservoir)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return module.Coefficient(module.Args(p_estimator=estimator), cvae, calibration, torch.device("cpu"))


@pytest.mark.parametrize("estimator", ["elbo", "latent"])
def test_p_auroc_is_the_auroc_of_p_vae_on_offline_pairs_against_random_actions(sac, estimator):
    coef = reservoir_coefficient(sac, estimator)
    obs, p = torch.randn(128, OBS_DIM), torch.linspace(0.0, 1.0, 128)
    torch.manual_seed(5)
    logged = log_p(sac, coef, p, obs)
    after = torch.rand(())
    torch.manual_seed(5)
    assert torch.rand(()) == after  # the probe drew nothing from training's random stream
    assert [logged[f"samg/p_q{q}"] for q in (10, 50, 90)] == pytest.approx([0.1, 0.5, 0.9], abs=1e-6)
    # the same random actions (its own generator, seeded 0), scored with the estimator and a plain double loop
    random_actions = torch.rand(128, ACT_DIM, generator=torch.Generator().manual_seed(0)) * 2.0 - 1.0
    with torch.no_grad():
        if estimator == "latent":
            familiar = sac.p_latent(coef.cvae, *coef.reservoir)
            novel = sac.p_latent(coef.cvae, obs, random_actions)
        else:
            familiar = sac.p_elbo(coef.cvae, coef.reference, *coef.reservoir)
            novel = sac.p_elbo(coef.cvae, coef.reference, obs, random_actions)
    wins = sum(1.0 if f > n else 0.5 if f == n else 0.0 for f in familiar.tolist() for n in novel.tolist())
    assert logged["samg/p_auroc"] == pytest.approx(wins / (len(familiar) * len(novel)), abs=1e-6)
    assert logged["samg/p_auroc"] > 0.6  # a C-VAE that learned the offline pairs ranks them above random actions


def test_p_auroc_is_one_half_when_p_cannot_tell_and_absent_without_a_reservoir_or_outside_cvae_mode(sac):
    coef = reservoir_coefficient(sac, "latent")
    coef.cvae = certain_cvae(sac)  # p_vae = 1 for every pair: all ties
    p, obs = torch.rand(64), torch.randn(64, OBS_DIM)
    assert log_p(sac, coef, p, obs)["samg/p_auroc"] == 0.5
    logged = log_p(sac, coefficient(sac, certain_cvae(sac)), p, obs)  # an older checkpoint: no reservoir
    assert "samg/p_auroc" not in logged and "samg/p_q50" in logged
    coef.mode = "even"
    assert "samg/p_auroc" not in log_p(sac, coef, p, obs)
