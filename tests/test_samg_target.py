"""SAMG's Bellman target and its coefficient p(s, a), on hand-made inputs with exact expected numbers.

The SAMG target block is byte-identical in the three online scripts (test_shared_blocks.py), so its functions are
taken from samg_sac.py; each script's own target (sac_target, td3_target, awac_target) is checked separately.
"""
import importlib.util
import math
import sys

import pytest
import torch

from conftest import ROOT

OBS_DIM, ACT_DIM, HIDDEN = 5, 2, [32, 32]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sac():
    return load("samg_sac")


@pytest.fixture(scope="module")
def td3():
    return load("samg_td3")


@pytest.fixture(scope="module")
def awac():
    return load("samg_awac")


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


def critics(module, seed):
    torch.manual_seed(seed)
    return module.CriticEnsemble(OBS_DIM, ACT_DIM, HIDDEN, 2)


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


# --- each script's own target: p = 0 is the base algorithm, p = 1 only Q_off ---
def sac_reference(sac, data, actor, value_critic, log_alpha, gamma):
    obs, actions, rewards, next_obs, dones = data
    next_actions, next_log_prob, _ = actor(next_obs)
    soft_value = value_critic(next_obs, next_actions).min(0).values - log_alpha.exp() * next_log_prob
    return rewards + gamma * (1 - dones) * soft_value


@pytest.mark.parametrize("coef_mode", ["none", "cvae"])
def test_sac_target_is_the_soft_target_of_the_target_critic_at_p0_and_of_q_offline_at_p1(sac, coef_mode):
    data = batch()
    torch.manual_seed(1)
    actor = sac.TanhGaussianActor(OBS_DIM, ACT_DIM, HIDDEN)
    critic_target, q_offline, cvae = critics(sac, 2), critics(sac, 3), certain_cvae(sac)
    log_alpha = torch.tensor(-1.5)
    args = sac.Args(coef_mode=coef_mode, p_estimator="latent", p_threshold=0.0, gamma=0.9)
    with torch.no_grad():
        torch.manual_seed(7)
        target, p, intrinsic = sac.sac_target(data, actor, critic_target, q_offline, cvae, None,
                                              log_alpha, args)
        torch.manual_seed(7)  # the same a' ~ pi(s')
        expected = sac_reference(sac, data, actor, critic_target if coef_mode == "none" else q_offline,
                                 log_alpha, 0.9)
    assert torch.all(p == (0.0 if coef_mode == "none" else 1.0))
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-5)
    assert (intrinsic == 0).all() == (coef_mode == "none")


@pytest.mark.parametrize("coef_mode", ["none", "cvae"])
def test_td3_target_is_the_smoothed_clipped_double_q_target_of_the_chosen_critic(td3, coef_mode):
    data = batch()
    torch.manual_seed(1)
    actor_target = td3.DeterministicActor(OBS_DIM, ACT_DIM, HIDDEN)
    critic_target, q_offline, cvae = critics(td3, 2), critics(td3, 3), certain_cvae(td3)
    args = td3.Args(coef_mode=coef_mode, p_estimator="latent", p_threshold=0.0, gamma=0.9)
    obs, actions, rewards, next_obs, dones = data
    with torch.no_grad():
        torch.manual_seed(7)
        target, p, _ = td3.td3_target(data, actor_target, critic_target, q_offline, cvae, None, args)
        torch.manual_seed(7)  # the same smoothing noise
        noise = (torch.randn_like(actions) * 0.2).clamp(-0.5, 0.5)
        next_actions = (actor_target(next_obs) + noise).clamp(-1.0, 1.0)
        chosen = critic_target if coef_mode == "none" else q_offline
        expected = rewards + 0.9 * (1 - dones) * chosen(next_obs, next_actions).min(0).values
    assert torch.all(p == (0.0 if coef_mode == "none" else 1.0))
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("coef_mode", ["none", "cvae"])
def test_awac_target_uses_a_policy_sample_and_the_chosen_critic_without_entropy(awac, coef_mode):
    data = batch()
    torch.manual_seed(1)
    actor = awac.GaussianActor(OBS_DIM, ACT_DIM, HIDDEN)
    critic_target, q_offline, cvae = critics(awac, 2), critics(awac, 3), certain_cvae(awac)
    args = awac.Args(coef_mode=coef_mode, p_estimator="latent", p_threshold=0.0, gamma=0.9)
    obs, actions, rewards, next_obs, dones = data
    with torch.no_grad():
        torch.manual_seed(7)
        target, p, _ = awac.awac_target(data, actor, critic_target, q_offline, cvae, None, args)
        torch.manual_seed(7)
        next_actions = actor.act(next_obs, deterministic=False)
        chosen = critic_target if coef_mode == "none" else q_offline
        expected = rewards + 0.9 * (1 - dones) * chosen(next_obs, next_actions).min(0).values
    assert torch.all(p == (0.0 if coef_mode == "none" else 1.0))
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-5)


def test_sac_target_at_p_one_half_is_the_average_of_both_soft_targets(sac):
    data = batch()
    torch.manual_seed(1)
    actor = sac.TanhGaussianActor(OBS_DIM, ACT_DIM, HIDDEN)
    critic_target, q_offline = critics(sac, 2), critics(sac, 3)
    log_alpha = torch.tensor(-1.0)
    with torch.no_grad():
        targets = {}
        for coef_mode in ("even", "none"):
            torch.manual_seed(7)
            targets[coef_mode], _, _ = sac.sac_target(data, actor, critic_target, q_offline, None, None, log_alpha,
                                                      sac.Args(coef_mode=coef_mode))
        torch.manual_seed(7)
        offline = sac_reference(sac, data, actor, q_offline, log_alpha, 0.99)
    torch.testing.assert_close(targets["even"], 0.5 * (targets["none"] + offline), rtol=1e-6, atol=1e-5)


# --- p(s, a) ---
@pytest.mark.parametrize("estimator", ["latent", "elbo"])
def test_p_lies_in_the_unit_interval_and_is_zero_below_the_threshold(sac, estimator):
    torch.manual_seed(0)
    cvae = sac.CVAE(OBS_DIM, ACT_DIM, 2 * ACT_DIM, HIDDEN)
    obs, actions = torch.randn(2000, OBS_DIM) * 3, torch.rand(2000, ACT_DIM) * 2 - 1
    quantiles = torch.linspace(0.0, 3.0, 1001)
    with torch.no_grad():
        p_vae = sac.p_latent(cvae, obs, actions) if estimator == "latent" else sac.p_elbo(cvae, quantiles, obs, actions)
        threshold = float(p_vae.median())
        p = sac.samg_coefficient("cvae", estimator, threshold, cvae, quantiles, obs, actions)
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
    cvae = certain_cvae(sac)  # mu = 0, sigma = 1: the KL term is 0
    with torch.no_grad():
        cvae.decoder[-2].weight.zero_()
        cvae.decoder[-2].bias.zero_()  # decodes to tanh(0) = 0, so the negative ELBO is |a|^2
        quantiles = torch.arange(10.0)  # offline negative ELBOs 0, 1, ..., 9
        actions = torch.tensor([[0.0, 0.0], [1.5, 1.5], [10.0, 0.0]])  # |a|^2 = 0, 4.5, 100
        p = sac.p_elbo(cvae, quantiles, torch.zeros(3, OBS_DIM), actions)
    assert p.tolist() == [1.0, 0.5, 0.0]


def test_even_mode_gives_one_half_to_every_sample(sac):
    p = sac.samg_coefficient("even", "latent", 0.9, None, None, torch.zeros(7, OBS_DIM), torch.zeros(7, ACT_DIM))
    assert p.tolist() == [0.5] * 7


def test_random_mode_draws_p_uniformly_per_sample_and_follows_the_seed(sac):
    def draw():
        return sac.samg_coefficient("random", "latent", 0.9, None, None, torch.zeros(20000, OBS_DIM), None)

    torch.manual_seed(3)
    p = draw()
    torch.manual_seed(3)
    assert torch.equal(p, draw())
    assert 0.0 <= float(p.min()) and float(p.max()) < 1.0
    assert abs(float(p.mean()) - 0.5) < 0.01 and abs(float((p < 0.2).float().mean()) - 0.2) < 0.01  # no threshold


def test_none_mode_gives_zero_and_never_evaluates_the_offline_critic(sac):
    p = sac.samg_coefficient("none", "latent", 0.2, None, None, torch.zeros(4, OBS_DIM), None)
    assert p.tolist() == [0.0] * 4
    critic_target = critics(sac, 0)
    next_obs, next_actions = torch.randn(4, OBS_DIM), torch.zeros(4, ACT_DIM)
    with torch.no_grad():
        target_value, offline_value = sac.next_values(critic_target, None, next_obs, next_actions, "none")
        assert torch.equal(target_value, critic_target(next_obs, next_actions).min(0).values)
    assert offline_value is target_value


# --- the adaptive half and the critic ensemble ---
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


def test_more_critics_than_the_checkpoint_repeat_its_members_in_turn(sac):
    checkpoint = {"critic": critics(sac, 0).state_dict(), "obs_dim": OBS_DIM, "act_dim": ACT_DIM,
                  "hidden_dims": HIDDEN}
    critic, critic_target, q_offline = sac.build_critics(checkpoint, 3, "test.pt", torch.device("cpu"))
    obs, actions = torch.randn(6, OBS_DIM), torch.zeros(6, ACT_DIM)
    with torch.no_grad():
        q = critic(obs, actions)
        assert q.shape == (3, 6) and torch.equal(q[2], q[0]) and not torch.equal(q[1], q[0])
        assert torch.equal(q_offline(obs, actions), q) and torch.equal(critic_target(obs, actions), q)
    assert not any(w.requires_grad for w in [*critic_target.parameters(), *q_offline.parameters()])


def test_replay_buffer_returns_what_was_stored_with_terminated_as_done(sac):
    replay = sac.ReplayBuffer(4, OBS_DIM, ACT_DIM, torch.device("cpu"))
    replay.add(torch.ones(OBS_DIM).numpy(), [0.5, -0.5], 2.0, torch.full((OBS_DIM,), 3.0).numpy(), True)
    obs, actions, rewards, next_obs, dones = replay.sample(3)
    assert obs.tolist() == [[1.0] * OBS_DIM] * 3 and actions.tolist() == [[0.5, -0.5]] * 3
    assert rewards.tolist() == [2.0] * 3 and next_obs.tolist() == [[3.0] * OBS_DIM] * 3 and dones.tolist() == [1.0] * 3
