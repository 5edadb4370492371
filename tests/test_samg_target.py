"""SAMG's Bellman target and its coefficient p(s, a), on hand-made inputs with exact expected numbers.

The SAMG target block is byte-identical in the four online scripts (test_shared_blocks.py), so its functions are
taken from samg_sac.py; each script's own target (sac_target, td3_target, awac_target) is checked separately
(iql_target in test_iql.py).
"""
import math

import pytest
import torch

from conftest import load_script

OBS_DIM, ACT_DIM, HIDDEN = 5, 2, [32, 32]


@pytest.fixture(scope="module")
def sac():
    return load_script("samg_sac")


@pytest.fixture(scope="module")
def td3():
    return load_script("samg_td3")


@pytest.fixture(scope="module")
def awac():
    return load_script("samg_awac")


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


def guidance(module, cvae=None, quantiles=None, **args):
    """The Guidance of an online script with these Args fields, ranked against `quantiles` (no reservoir)."""
    calibration = {"neg_elbo_quantiles": torch.arange(10.0) if quantiles is None else quantiles}
    return module.Guidance(module.Args(**args), cvae, calibration, torch.device("cpu"))


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
    guide = guidance(sac, cvae, coef_mode=coef_mode, p_estimator="latent", p_threshold=0.0, p_at="sample")
    with torch.no_grad():
        torch.manual_seed(7)
        target, p, metrics = sac.sac_target(data, actor, critic_target, q_offline, guide, log_alpha, 0.9,
                                            diagnose=True)
        torch.manual_seed(7)  # the same a' ~ pi(s')
        expected = sac_reference(sac, data, actor, critic_target if coef_mode == "none" else q_offline,
                                 log_alpha, 0.9)
    assert torch.all(p == (0.0 if coef_mode == "none" else 1.0))
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-5)
    assert (metrics[2] == 0) == (coef_mode == "none")  # samg/intrinsic


@pytest.mark.parametrize("coef_mode", ["none", "cvae"])
def test_td3_target_is_the_smoothed_clipped_double_q_target_of_the_chosen_critic(td3, coef_mode):
    data = batch()
    torch.manual_seed(1)
    actor_target = td3.DeterministicActor(OBS_DIM, ACT_DIM, HIDDEN)
    critic_target, q_offline, cvae = critics(td3, 2), critics(td3, 3), certain_cvae(td3)
    args = td3.Args(coef_mode=coef_mode, p_estimator="latent", p_threshold=0.0, gamma=0.9)
    guide = td3.Guidance(args, cvae, {"neg_elbo_quantiles": torch.arange(10.0)}, torch.device("cpu"))
    obs, actions, rewards, next_obs, dones = data
    with torch.no_grad():
        torch.manual_seed(7)
        target, p, _ = td3.td3_target(data, actor_target, critic_target, q_offline, guide, args, diagnose=False)
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
    guide = guidance(awac, cvae, coef_mode=coef_mode, p_estimator="latent", p_threshold=0.0)
    obs, actions, rewards, next_obs, dones = data
    with torch.no_grad():
        torch.manual_seed(7)
        target, p, _ = awac.awac_target(data, actor, critic_target, q_offline, guide, 0.9, diagnose=False)
        torch.manual_seed(7)
        next_actions = actor.act(next_obs, deterministic=False)
        chosen = critic_target if coef_mode == "none" else q_offline
        expected = rewards + 0.9 * (1 - dones) * chosen(next_obs, next_actions).min(0).values
    assert torch.all(p == (0.0 if coef_mode == "none" else 1.0))
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("even_p", [0.5, 0.05])
def test_sac_target_at_a_constant_p_mixes_both_soft_targets_in_that_proportion(sac, even_p):
    data = batch()
    torch.manual_seed(1)
    actor = sac.TanhGaussianActor(OBS_DIM, ACT_DIM, HIDDEN)
    critic_target, q_offline = critics(sac, 2), critics(sac, 3)
    log_alpha = torch.tensor(-1.0)
    with torch.no_grad():
        targets = {}
        for coef_mode in ("even", "none"):
            torch.manual_seed(7)
            targets[coef_mode], _, _ = sac.sac_target(data, actor, critic_target, q_offline,
                                                      guidance(sac, coef_mode=coef_mode, even_p=even_p), log_alpha,
                                                      0.99, diagnose=False)
        torch.manual_seed(7)
        offline = sac_reference(sac, data, actor, q_offline, log_alpha, 0.99)
    expected = (1 - even_p) * targets["none"] + even_p * offline
    torch.testing.assert_close(targets["even"], expected, rtol=1e-6, atol=1e-5)


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


def test_even_mode_gives_one_half_to_every_sample_unless_told_another_constant(sac):
    p = sac.samg_coefficient("even", "latent", 0.9, None, None, torch.zeros(7, OBS_DIM), torch.zeros(7, ACT_DIM))
    assert p.tolist() == [0.5] * 7
    p = sac.samg_coefficient("even", "latent", 0.9, None, None, torch.zeros(7, OBS_DIM), torch.zeros(7, ACT_DIM),
                             even_p=0.05)  # below the threshold too: even is unthresholded
    torch.testing.assert_close(p, torch.full((7,), 0.05))


@pytest.mark.parametrize("script", ["sac", "td3", "awac", "iql"])
def test_run_names_say_a_constant_p_other_than_the_papers_one_half(script):
    module = load_script(f"samg_{script}")
    assert module.method_name(module.Args(coef_mode="even", adaptive=False)) == "even-static"
    assert module.method_name(module.Args(coef_mode="even", even_p=0.05, adaptive=False)) == "even0.05-static"
    assert module.method_name(module.Args(coef_mode="cvae", even_p=0.05)) == "cvae-next-adaptive"


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
    data, critic_target = batch(4), critics(sac, 0)
    next_actions = torch.zeros(4, ACT_DIM)
    with torch.no_grad():  # q_offline=None: evaluating it would fail
        target, p, metrics = sac.samg_target(data, next_actions, 0.0, critic_target, None,
                                             guidance(sac, coef_mode="none"), 0.9, diagnose=False)
        expected = data[2] + 0.9 * (1 - data[4]) * critic_target(data[3], next_actions).min(0).values
    assert torch.equal(target, expected) and p.tolist() == [0.0] * 4 and metrics is None


# --- where p is evaluated (--p-at), the fade, and the re-ranked reference ---
def elbo_is_squared_action_cvae(module):
    """mu = 0, sigma = 1 (no KL) and a decoder that outputs 0: the negative ELBO of (s, a) is |a|^2."""
    cvae = certain_cvae(module)
    with torch.no_grad():
        cvae.decoder[-2].weight.zero_()
        cvae.decoder[-2].bias.zero_()
    return cvae


@pytest.mark.parametrize("p_at, expected_p", [("sample", [1.0, 0.5]), ("next", [0.5, 1.0]), ("both", [0.5, 0.5])])
def test_p_at_picks_the_pair_and_the_target_mixes_with_it(sac, p_at, expected_p):
    # against offline negative ELBOs 0..9, |a|^2 = 0 gives p = 1 and |a|^2 = 4.5 gives p = 0.5
    obs, next_obs = torch.randn(2, OBS_DIM), torch.randn(2, OBS_DIM)
    actions, next_actions = torch.tensor([[0.0, 0.0], [1.5, 1.5]]), torch.tensor([[1.5, 1.5], [0.0, 0.0]])
    data = (obs, actions, torch.tensor([1.0, -2.0]), next_obs, torch.tensor([0.0, 0.0]))
    critic_target, q_offline = critics(sac, 2), critics(sac, 3)
    guide = guidance(sac, elbo_is_squared_action_cvae(sac), p_at=p_at, p_estimator="elbo", p_threshold=0.0)
    with torch.no_grad():
        target, p, metrics = sac.samg_target(data, next_actions, 0.0, critic_target, q_offline, guide, 0.9, True)
        qbar = critic_target(next_obs, next_actions).min(0).values.tolist()
        qoff = q_offline(next_obs, next_actions).min(0).values.tolist()
    assert p.tolist() == expected_p
    by_hand = [r + 0.9 * ((1 - w) * b + w * o) for r, w, b, o in zip([1.0, -2.0], expected_p, qbar, qoff)]
    assert target.tolist() == pytest.approx(by_hand, abs=1e-5)
    assert metrics.tolist() == pytest.approx([sum(expected_p) / 2, 1.0,
                                              sum(0.9 * w * (o - b) for w, b, o in zip(expected_p, qbar, qoff)) / 2,
                                              sum(qoff) / 2, sum(qbar) / 2, sum(o > b for b, o in zip(qbar, qoff)) / 2],
                                             abs=1e-5)


def test_even_and_random_p_do_not_depend_on_p_at(sac):
    data, next_actions = batch(8), torch.zeros(8, ACT_DIM)
    for p_at in ("sample", "next", "both"):
        p = guidance(sac, coef_mode="even", p_at=p_at).p(data, next_actions, None, None)
        assert p.tolist() == [0.5] * 8


def test_outgrown_fade_zeroes_p_where_the_online_critic_exceeds_q_off_by_more_than_its_recent_td_error(sac):
    guide = guidance(sac, coef_mode="even", p_fade="outgrown")
    data, next_actions = batch(3), torch.zeros(3, ACT_DIM)
    qbar, qoff = torch.tensor([10.0, 10.0, 10.0]), torch.tensor([9.5, 8.0, 12.0])
    assert guide.p(data, next_actions, qbar, qoff).tolist() == [0.5, 0.5, 0.5]  # no TD error seen yet: no fade
    guide.observe(torch.tensor([1.0, 1.0]))  # the first observation sets the running mean
    assert guide.p(data, next_actions, qbar, qoff).tolist() == [0.5, 0.0, 0.5]  # gaps 0.5, 2, -2 against 1
    guide.observe(torch.tensor([3.0]))
    assert guide.recent_td_error.item() == pytest.approx(1.02)


def test_linear_fade_scales_p_by_the_factor_the_loop_sets(sac):
    guide = guidance(sac, coef_mode="even", p_fade="linear")
    guide.scale.fill_(0.25)
    assert guide.p(batch(2), torch.zeros(2, ACT_DIM), None, None).tolist() == [0.125, 0.125]


def test_recalibration_keeps_p_uniform_on_the_offline_reservoir_as_the_cvae_learns(sac):
    torch.manual_seed(0)
    reservoir_obs = torch.randn(500, OBS_DIM)
    reservoir_actions = torch.tanh(reservoir_obs @ torch.randn(OBS_DIM, ACT_DIM))  # learnable: a function of s
    cvae = sac.CVAE(OBS_DIM, ACT_DIM, 2 * ACT_DIM, HIDDEN)
    calibration = {"neg_elbo_quantiles": torch.arange(10.0), "reservoir_obs": reservoir_obs,
                   "reservoir_actions": reservoir_actions}
    guide = sac.Guidance(sac.Args(p_estimator="elbo"), cvae, calibration, torch.device("cpu"))
    uniform = torch.arange(500, 0, -1) / 500  # each reservoir pair's share of pairs at least as unusual

    def reservoir_p():
        with torch.no_grad():
            return sac.p_elbo(cvae, guide.neg_elbo_reference, reservoir_obs, reservoir_actions).sort(descending=True)

    torch.testing.assert_close(reservoir_p().values, uniform)
    optimizer = torch.optim.Adam(cvae.parameters(), lr=3e-3)
    for _ in range(300):  # the C-VAE learns (here on the reservoir itself, the worst case for a frozen reference)
        loss = sac.cvae_loss(cvae, reservoir_obs, reservoir_actions)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    stale = reservoir_p().values
    assert stale.mean() > 0.9 and 0.0 <= stale.min() and stale.max() <= 1.0  # a frozen reference inflates p
    guide.recalibrate()
    torch.testing.assert_close(reservoir_p().values, uniform)


def test_offline_data_ratio_draws_that_share_of_each_batch_from_the_offline_data(sac):
    online, offline = (sac.ReplayBuffer(10, OBS_DIM, ACT_DIM, torch.device("cpu")) for _ in range(2))
    for replay, reward in ((online, 1.0), (offline, 2.0)):
        for _ in range(10):
            replay.add(torch.zeros(OBS_DIM).numpy(), [0.0, 0.0], reward, torch.zeros(OBS_DIM).numpy(), False)
    for ratio, expected_offline in ((0.5, 128), (0.25, 64), (0.1, 26)):
        rewards = sac.sample_batch(online, offline, 256, ratio)[2]
        assert rewards.shape == (256,) and int((rewards == 2.0).sum()) == expected_offline
    assert (sac.sample_batch(online, None, 256, 0.0)[2] == 1.0).all()


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
    lerps, over three updates with guidance (p from the same C-VAE at the same pairs)."""
    import copy

    data = batch(size=64, seed=3)
    torch.manual_seed(0)
    actor = sac.TanhGaussianActor(OBS_DIM, ACT_DIM, HIDDEN)
    critic = sac.CriticEnsemble(OBS_DIM, ACT_DIM, HIDDEN, 2)
    q_offline = critics(sac, seed=5).requires_grad_(False)
    cvae = sac.CVAE(OBS_DIM, ACT_DIM, 2 * ACT_DIM, HIDDEN)
    guide = guidance(sac, cvae, quantiles=torch.linspace(0.0, 20.0, 101), p_threshold=0.1)
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
                metrics, _, _, p = sac.update_critic(data, a, c, c_target, q_offline, guide, log_alpha, optimizers[1],
                                                     0.99, diagnose=False)
                qf_loss = metrics[0]
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
                    p = sac.samg_coefficient("cvae", "elbo", 0.1, cvae, guide.neg_elbo_reference, next_obs,
                                             next_actions)
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
    assert 0.0 < fast[3].mean() < 1.0  # guidance was mixed in, not all or nothing
    for x, y in zip(fast, plain, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fast[4], actor.trunk[0].weight)  # it did learn


# --- TD3's --p-next-action, and samg/p_auroc ---
@pytest.mark.parametrize("p_next_action", ["smoothed", "deterministic"])
def test_td3_p_next_action_takes_p_at_the_smoothed_or_the_target_policys_own_action(td3, p_next_action):
    data = batch()
    torch.manual_seed(1)
    actor_target = td3.DeterministicActor(OBS_DIM, ACT_DIM, HIDDEN)
    critic_target, q_offline = critics(td3, 2), critics(td3, 3)
    cvae = td3.CVAE(OBS_DIM, ACT_DIM, 2 * ACT_DIM, HIDDEN)  # untrained: p_vae differs from pair to pair
    args = td3.Args(coef_mode="cvae", p_estimator="latent", p_threshold=0.0, gamma=0.9, p_at="next",
                    p_next_action=p_next_action)
    guide = td3.Guidance(args, cvae, {"neg_elbo_quantiles": torch.arange(10.0)}, torch.device("cpu"))
    obs, actions, rewards, next_obs, dones = data
    with torch.no_grad():
        torch.manual_seed(7)
        target, p, _ = td3.td3_target(data, actor_target, critic_target, q_offline, guide, args, diagnose=False)
        torch.manual_seed(7)
        noise = (torch.randn_like(actions) * 0.2).clamp(-0.5, 0.5)
        smoothed = (actor_target(next_obs) + noise).clamp(-1.0, 1.0)
        p_pair = smoothed if p_next_action == "smoothed" else actor_target(next_obs)
        expected_p = td3.p_latent(cvae, next_obs, p_pair)
        # Q values are taken at the smoothed action either way
        expected = rewards + 0.9 * (1 - dones) * torch.lerp(critic_target(next_obs, smoothed).min(0).values,
                                                             q_offline(next_obs, smoothed).min(0).values, expected_p)
    torch.testing.assert_close(p, expected_p)
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-5)
    other = td3.p_latent(cvae, next_obs, actor_target(next_obs) if p_next_action == "smoothed" else smoothed)
    assert not torch.allclose(p, other)  # the choice matters


def reservoir_guidance(module, estimator):
    """A Guidance whose C-VAE has learned a reservoir of offline pairs whose actions are a function of s."""
    torch.manual_seed(0)
    reservoir_obs = torch.randn(400, OBS_DIM)
    reservoir_actions = torch.tanh(reservoir_obs @ torch.randn(OBS_DIM, ACT_DIM))
    cvae = module.CVAE(OBS_DIM, ACT_DIM, 2 * ACT_DIM, HIDDEN)
    optimizer = torch.optim.Adam(cvae.parameters(), lr=3e-3)
    for _ in range(300):
        loss = module.cvae_loss(cvae, reservoir_obs, reservoir_actions)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    calibration = {"neg_elbo_quantiles": torch.arange(10.0), "reservoir_obs": reservoir_obs,
                   "reservoir_actions": reservoir_actions}
    return module.Guidance(module.Args(p_estimator=estimator), cvae, calibration, torch.device("cpu"))


@pytest.mark.parametrize("estimator", ["elbo", "latent"])
def test_separation_is_the_auroc_of_p_vae_on_offline_pairs_against_random_actions(sac, estimator):
    guide = reservoir_guidance(sac, estimator)
    obs = torch.randn(128, OBS_DIM)
    torch.manual_seed(5)
    auroc = sac.p_separation(guide, obs)
    after = torch.rand(())
    torch.manual_seed(5)
    assert torch.rand(()) == after  # separation drew nothing from training's random stream
    # the same random actions (its own generator, seeded 0), scored with the estimator and a plain double loop
    random_actions = torch.rand(128, ACT_DIM, generator=torch.Generator().manual_seed(0)) * 2.0 - 1.0
    with torch.no_grad():
        if estimator == "latent":
            familiar = sac.p_latent(guide.cvae, *guide.reservoir)
            novel = sac.p_latent(guide.cvae, obs, random_actions)
        else:
            familiar = sac.p_elbo(guide.cvae, guide.neg_elbo_reference, *guide.reservoir)
            novel = sac.p_elbo(guide.cvae, guide.neg_elbo_reference, obs, random_actions)
    wins = sum(1.0 if f > n else 0.5 if f == n else 0.0 for f in familiar.tolist() for n in novel.tolist())
    assert auroc.item() == pytest.approx(wins / (len(familiar) * len(novel)), abs=1e-6)
    assert auroc.item() > 0.6  # a C-VAE that learned the offline pairs ranks them above random actions


def test_separation_is_one_half_when_p_cannot_tell_and_nan_without_a_reservoir(sac):
    guide = reservoir_guidance(sac, "latent")
    guide.cvae = certain_cvae(sac)  # p_vae = 1 for every pair: all ties
    assert sac.p_separation(guide, torch.randn(64, OBS_DIM)).item() == 0.5
    assert math.isnan(sac.p_separation(guidance(sac, certain_cvae(sac)), torch.randn(8, OBS_DIM)).item())
