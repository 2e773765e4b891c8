"""Checks of ppo_continuous.py, in two parts:
1. the math against numbers worked out by hand (marked `math`: `pytest test_ppo.py -m math`, a few seconds):
   ratio clipping (test_ratio_clipping_matches_hand_calculation: r_t(θ), L^CLIP and its gradient), L^VF, the Gaussian
   policy, advantages (test_advantages_*: Â_t by GAE), normalization, and each math piece copied out alone;
2. whole runs, in the order of the script's regions: 2a what the training loop feeds the math, 2b the lifecycle
   (validation, checkpoints, resume, signals, reliability), 2c data parallel under torchrun.
A test added for a bug says which bug in its docstring or comment.

Run with:  pytest test_ppo.py
"""

import contextlib
import glob
import inspect
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.distributed as dist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.optim.optimizer import register_optimizer_step_pre_hook

import ppo_continuous
from ppo_continuous import (
    Agent,
    Args,
    RewardScaler,
    RunningMeanStd,
    advantages_now,
    checked_spaces,
    collect_rollout,
    compute_gae,
    evaluate,
    load_checkpoint,
    load_policy,
    make_env,
    make_run_dir,
    make_vector_env,
    normalize_obs,
    ppo_loss,
    progress_line,
    resume_args,
    save_checkpoint,
    train,
    training_state,
    validate,
)

SCRIPT = str(Path(__file__).with_name("ppo_continuous.py"))


def f64(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ==== 1. The math, by hand ==============================================================================


# ---- r_t(θ) and L^CLIP -----------------------------------------------------------------------------
def policy_only_loss(ratio: float, advantage: float, clip_coef: float = 0.2):
    """ppo_loss with the value and entropy terms off, for one sample; returns (loss, d loss/d log π_θ, stats)."""
    new_logprob = torch.tensor([math.log(ratio)], dtype=torch.float64, requires_grad=True)
    zero = f64(0.0)
    loss, stats = ppo_loss(
        new_logprob=new_logprob, old_logprob=zero, advantages=f64(advantage), new_value=zero, old_value=zero,
        returns=zero, entropy=zero, clip_coef=clip_coef, vf_coef=0.0, ent_coef=0.0, clip_vloss=False,
    )
    loss.backward()
    return loss.item(), new_logprob.grad.item(), stats


@pytest.mark.math
@pytest.mark.parametrize(
    "ratio, advantage, expected_loss, expected_grad",
    [
        # A>0, r=1.5 > 1+ε: min(1.5*2, 1.2*2) = min(3.0, 2.4) = 2.4, clipped -> loss -2.4, gradient 0
        pytest.param(1.5, 2.0, -2.4, 0.0, id="A>0, r>1+eps: clipped, no gradient"),
        # A<0, r=0.5 < 1-ε: min(0.5*-1, 0.8*-1) = min(-0.5, -0.8) = -0.8, clipped -> loss 0.8, gradient 0
        pytest.param(0.5, -1.0, 0.8, 0.0, id="A<0, r<1-eps: clipped, no gradient"),
        # A>0, r=0.5 < 1-ε: min(0.5*2, 0.8*2) = min(1.0, 1.6) = 1.0, the unclipped term -> loss -1.0;
        # d(-r A)/d log π = -r A (since dr/d log π = r) = -0.5*2 = -1.0
        pytest.param(0.5, 2.0, -1.0, -1.0, id="A>0, r<1-eps: unclipped, gradient"),
        # A<0, r=1.5 > 1+ε: min(1.5*-1, 1.2*-1) = min(-1.5, -1.2) = -1.5, unclipped -> loss 1.5; grad -r A = 1.5
        pytest.param(1.5, -1.0, 1.5, 1.5, id="A<0, r>1+eps: unclipped, gradient"),
        # r=1.1 inside [0.8, 1.2], A=3: min(3.3, 3.3) = 3.3 -> loss -3.3; grad -r A = -3.3
        pytest.param(1.1, 3.0, -3.3, -3.3, id="r inside the range: unclipped, gradient"),
    ],
)
def test_ratio_clipping_matches_hand_calculation(ratio, advantage, expected_loss, expected_grad):
    loss, grad, _ = policy_only_loss(ratio, advantage)
    assert loss == pytest.approx(expected_loss, abs=1e-12)
    assert grad == pytest.approx(expected_grad, abs=1e-12)


@pytest.mark.math
def test_clip_fraction_and_approx_kl():
    # r = 1.5: |r-1| = 0.5 > 0.2 so clip fraction 1; KL estimate (r-1) - ln r = 0.5 - 0.4054651 = 0.0945349
    _, _, stats = policy_only_loss(1.5, 1.0)
    assert stats["clip_fraction"].item() == 1.0
    assert stats["approx_kl"].item() == pytest.approx(0.0945349, abs=1e-7)
    # r = 1.1: inside the range, clip fraction 0; KL estimate 0.1 - ln 1.1 = 0.1 - 0.0953102 = 0.0046898
    _, _, stats = policy_only_loss(1.1, 1.0)
    assert stats["clip_fraction"].item() == 0.0
    assert stats["approx_kl"].item() == pytest.approx(0.0046898, abs=1e-7)

@pytest.mark.math
def test_ratio_is_the_exponent_of_the_difference_of_log_probs():
    """Bug caught: log r_t = log π_θ + log π_old instead of the difference, hidden where log π_old = 0 as in the
    other loss tests. log π_old = -2, Â = 2, ε = 0.2:
    log π_θ = -2: r = 1, loss = -min(1*2, 1*2) = -2.0 (a sum would give r = e^-4 = 0.0183, loss -0.0366);
    log π_θ = -2 + ln 1.5: r = 1.5, loss = -min(3.0, 2.4) = -2.4, KL estimate 0.5 - ln 1.5 = 0.0945349."""
    zero = f64(0.0)
    for log_ratio, expected_loss, expected_kl in ((0.0, -2.0, 0.0), (math.log(1.5), -2.4, 0.0945349)):
        loss, stats = ppo_loss(f64(-2.0 + log_ratio), f64(-2.0), f64(2.0), zero, zero, zero, zero,
                               clip_coef=0.2, vf_coef=0.0, ent_coef=0.0, clip_vloss=False)
        assert loss.item() == pytest.approx(expected_loss, abs=1e-12)
        assert stats["approx_kl"].item() == pytest.approx(expected_kl, abs=1e-7)


@pytest.mark.math
@pytest.mark.parametrize("ratio, expected", [pytest.param(1.25, 0.0, id="r = 1+eps: not clipped"),
                                             pytest.param(0.75, 0.0, id="r = 1-eps: not clipped"),
                                             pytest.param(1.5, 1.0, id="r past 1+eps: clipped"),
                                             pytest.param(0.5, 1.0, id="r below 1-eps: clipped")])
def test_clip_fraction_counts_the_ratios_past_either_end_of_the_clip_range(ratio, expected):
    """Bugs caught: a ratio exactly at 1 ± ε counted as clipped (clamp leaves it as it is), or only ratios above 1 + ε
    counted. ε = 0.25: 1.25 and 0.75 are exact in binary (exp(ln 1.25) == 1.25), |r - 1| = 0.25 is not > 0.25: 0;
    |1.5 - 1| = |0.5 - 1| = 0.5 > 0.25: 1."""
    _, _, stats = policy_only_loss(ratio, 1.0, clip_coef=0.25)
    assert stats["clip_fraction"].item() == expected


@pytest.mark.math
def test_total_loss_combines_terms():
    # r=1 (same log-probs), A=[1, 3] -> L^CLIP = mean(1, 3) = 2; V=[0, 1], R=[1, 3] -> L^VF = ½ mean(1, 4) = 1.25;
    # entropy 2.0. loss = -2 + 0.5*1.25 - 0.01*2.0 = -2 + 0.625 - 0.02 = -1.395
    loss, stats = ppo_loss(
        new_logprob=f64(0, 0), old_logprob=f64(0, 0), advantages=f64(1, 3),
        new_value=f64(0, 1), old_value=f64(0, 1), returns=f64(1, 3), entropy=f64(2.0),
        clip_coef=0.2, vf_coef=0.5, ent_coef=0.01, clip_vloss=False,
    )
    assert loss.item() == pytest.approx(-1.395)
    assert stats["policy_loss"].item() == pytest.approx(-2.0)
    assert stats["value_loss"].item() == pytest.approx(1.25)
    assert stats["entropy"].item() == pytest.approx(2.0)


# ---- L^VF with and without clipping -------------------------------------------------------------------
@pytest.mark.math
@pytest.mark.parametrize(
    "new_value, old_value, target, clip_vloss, expected",
    [
        # unclipped: ½ (2-3)² = 0.5
        pytest.param(2.0, 1.0, 3.0, False, 0.5, id="unclipped"),
        # clipped V = 1 + clamp(2-1, -0.2, 0.2) = 1.2; max((2-3)², (1.2-3)²) = max(1, 3.24) = 3.24; ½ -> 1.62
        pytest.param(2.0, 1.0, 3.0, True, 1.62, id="clipped V further from R: the clipped error"),
        # target 0: max((2-0)², (1.2-0)²) = max(4, 1.44) = 4; ½ -> 2.0 (clipping never lowers the loss)
        pytest.param(2.0, 1.0, 0.0, True, 2.0, id="clipped V nearer R: the unclipped error"),
        # inside the range: V=1.1, clipped V=1.1, ½ (1.1-2)² = ½ 0.81 = 0.405
        pytest.param(1.1, 1.0, 2.0, True, 0.405, id="inside the range"),
    ],
)
def test_value_loss(new_value, old_value, target, clip_vloss, expected):
    _, stats = ppo_loss(
        new_logprob=f64(0.0), old_logprob=f64(0.0), advantages=f64(0.0),
        new_value=f64(new_value), old_value=f64(old_value), returns=f64(target), entropy=f64(0.0),
        clip_coef=0.2, vf_coef=0.5, ent_coef=0.0, clip_vloss=clip_vloss,
    )
    assert stats["value_loss"].item() == pytest.approx(expected)

@pytest.mark.math
@pytest.mark.parametrize(
    "new_value, old_value, target, expected",
    [
        # V fell below V_old - ε: clipped V = 1 + clamp(0 - 1, -0.2, 0.2) = 0.8; max((0+1)², (0.8+1)²)
        # = max(1, 3.24) = 3.24; ½ -> 1.62
        pytest.param(0.0, 1.0, -1.0, 1.62, id="V below V_old - eps: clipped from below"),
        # inside the range, target below: clipped V = V = 1.1; ½ (1.1 - 0)² = ½ 1.21 = 0.605
        pytest.param(1.1, 1.0, 0.0, 0.605, id="inside the range, target below V"),
    ],
)
def test_value_clipping_from_below(new_value, old_value, target, expected):
    """Bugs caught: the clip range of V - V_old without its lower bound, the clamp applied to V + V_old, or its
    lower bound +ε: the cases above only move V upwards from V_old."""
    _, stats = ppo_loss(
        new_logprob=f64(0.0), old_logprob=f64(0.0), advantages=f64(0.0),
        new_value=f64(new_value), old_value=f64(old_value), returns=f64(target), entropy=f64(0.0),
        clip_coef=0.2, vf_coef=0.5, ent_coef=0.0, clip_vloss=True,
    )
    assert stats["value_loss"].item() == pytest.approx(expected)


# ---- The diagonal Gaussian policy ------------------------------------------------------------------------
def agent_with(mean_bias, log_std) -> Agent:
    """A 3-observation agent with μ_θ(s) = mean_bias for every s (zero last-layer weights) and log σ = log_std."""
    agent = Agent(obs_dim=3, action_dim=len(log_std)).double()
    with torch.no_grad():
        agent.actor_mean[-1].weight.zero_()
        agent.actor_mean[-1].bias.copy_(f64(*mean_bias))
        agent.actor_logstd.copy_(f64(*log_std))
    return agent


@pytest.mark.math
def test_gaussian_log_prob_closed_form():
    # a=(0.5, -1), μ=(0, 0), σ=(1, 2); ½ log 2π = 0.9189385
    # dim 1: -½ (0.5/1)² - log 1 - 0.9189385 = -0.125 - 0 - 0.9189385 = -1.0439385
    # dim 2: -½ (-1/2)² - log 2 - 0.9189385 = -0.125 - 0.6931472 - 0.9189385 = -1.7370857
    # sum: -2.7810242
    agent = agent_with(mean_bias=(0.0, 0.0), log_std=(0.0, math.log(2.0)))
    log_prob = agent.log_prob(torch.ones(1, 3, dtype=torch.float64), f64(0.5, -1.0)[None])
    assert log_prob.item() == pytest.approx(-2.7810242, abs=1e-7)


@pytest.mark.math
def test_gaussian_entropy_closed_form():
    # σ=(1, 2): Σ [log σ_i + ½ log(2πe)] = 0 + 0.6931472 + 2 * 1.4189385 = 3.5310242
    assert agent_with((0.0, 0.0), (0.0, math.log(2.0))).entropy().item() == pytest.approx(3.5310242, abs=1e-7)


@pytest.mark.math
def test_act_is_mean_plus_sigma_times_noise():
    # μ=(1, -1), σ=(e^0, e^ln 3)=(1, 3), ε=(0.5, -2): a = μ + σ ε = (1 + 0.5, -1 - 6) = (1.5, -7); ε=0 gives μ
    agent = agent_with(mean_bias=(1.0, -1.0), log_std=(0.0, math.log(3.0)))
    obs = torch.ones(1, 3, dtype=torch.float64)
    assert agent.act(obs, f64(0.5, -2.0))[0].tolist() == pytest.approx([1.5, -7.0])
    assert agent.act(obs, f64(0.0, 0.0))[0].tolist() == pytest.approx([1.0, -1.0])

@pytest.mark.math
def test_agent_layers_widths_and_orthogonal_initialization():
    """Bugs caught: a width, a gain or a bias of the initialization changed, or a tanh on the output. Both networks
    are in -> 64 -> 64 -> out with tanh between (the critic --critic-width wide). orthogonal_(W, g) makes the rows (or,
    for a tall W, the columns) of W orthogonal with norm g: first layer (64 x 3): W^T W = g² I_3 = 2 I_3 (g = √2);
    second (64 x 64): W W^T = 2 I_64; the actor's last (2 x 64): W W^T = 0.01² I_2 = 1e-4 I_2; the critic's last
    (1 x 64): W W^T = 1² = 1. Every bias is 0."""
    torch.manual_seed(0)
    agent = Agent(obs_dim=3, action_dim=2)

    def linears(net):
        return [layer for layer in net if isinstance(layer, torch.nn.Linear)]

    for net, out_dim, out_gain in ((agent.actor_mean, 2, 0.01), (agent.critic, 1, 1.0)):
        first, second, last = linears(net)
        assert [type(layer) for layer in net] == [torch.nn.Linear, torch.nn.Tanh] * 2 + [torch.nn.Linear]
        assert [tuple(layer.weight.shape) for layer in (first, second, last)] == [(64, 3), (64, 64), (out_dim, 64)]
        with torch.no_grad():
            torch.testing.assert_close(first.weight.T @ first.weight, 2 * torch.eye(3), rtol=0, atol=1e-5)
            torch.testing.assert_close(second.weight @ second.weight.T, 2 * torch.eye(64), rtol=0, atol=1e-5)
            torch.testing.assert_close(last.weight @ last.weight.T, out_gain**2 * torch.eye(out_dim), rtol=0,
                                       atol=1e-6)
            for layer in (first, second, last):
                assert (layer.bias == 0).all()
    narrow = Agent(obs_dim=3, action_dim=2, critic_width=16)  # the critic alone follows critic_width
    assert [tuple(layer.weight.shape) for layer in linears(narrow.critic)] == [(16, 3), (16, 16), (1, 16)]
    assert [tuple(layer.weight.shape) for layer in linears(narrow.actor_mean)] == [(64, 3), (64, 64), (2, 64)]


@pytest.mark.math
def test_log_prob_sums_over_the_action_dimensions_of_any_batch_shape():
    """Bug caught: the sum taken over axis 1 instead of the last axis, which only a 2-D batch hides. The sample of
    test_gaussian_log_prob_closed_form (a = (0.5, -1), μ = 0, σ = (1, 2): log π = -2.7810242) scored alone (1-D) and
    as a (T, N) = (2, 4) rollout: one log π per sample, each -2.7810242."""
    agent = agent_with(mean_bias=(0.0, 0.0), log_std=(0.0, math.log(2.0)))
    single = agent.log_prob(torch.ones(3, dtype=torch.float64), f64(0.5, -1.0))
    assert single.shape == () and single.item() == pytest.approx(-2.7810242, abs=1e-7)
    rollout = agent.log_prob(torch.ones(2, 4, 3, dtype=torch.float64), f64(0.5, -1.0).expand(2, 4, 2))
    torch.testing.assert_close(rollout, torch.full((2, 4), -2.7810242, dtype=torch.float64), rtol=0, atol=1e-7)


# ---- Â_t by GAE -----------------------------------------------------------------------------------------
# One env, 3 steps, γ=0.9, λ=0.8 (γλ = 0.72), r=(1, 2, 3), V(s_t)=(0.5, 1.0, 1.5), V(s_3)=2.0 after the rollout
# δ_0 = 1 + 0.9*1.0 - 0.5 = 1.4     δ_1 = 2 + 0.9*1.5 - 1.0 = 2.35     δ_2 = 3 + 0.9*2.0 - 1.5 = 3.3
GAMMA, LAMBDA = 0.9, 0.8
REWARDS = [1.0, 2.0, 3.0]
VALUES = [0.5, 1.0, 1.5]
NEXT_VALUE = 2.0
NO_END = [0.0, 0.0, 0.0]


def gae(terminations=NO_END, dones=NO_END, final_values=NO_END, gae_lambda=LAMBDA):
    def column(values):  # (T,) -> (T, 1): one env
        return f64(*values)[:, None]

    advantages, returns = compute_gae(column(REWARDS), column(VALUES), f64(NEXT_VALUE), column(final_values),
                                      column(terminations), column(dones), GAMMA, gae_lambda)
    return advantages.squeeze(-1).tolist(), returns.squeeze(-1).tolist()


@pytest.mark.math
def test_advantages_match_hand_calculation_gae():
    # Â_2 = 3.3;  Â_1 = 2.35 + 0.72*3.3 = 4.726;  Â_0 = 1.4 + 0.72*4.726 = 4.80272
    # R = Â + V = (5.30272, 5.726, 4.8)
    advantages, returns = gae()
    assert advantages == pytest.approx([4.80272, 4.726, 3.3])
    assert returns == pytest.approx([5.30272, 5.726, 4.8])


@pytest.mark.math
def test_advantages_termination_stops_bootstrap_and_carry():
    # terminated at t=1: V(final obs) must be ignored (99 proves it), δ_1 = 2 - 1.0 = 1.0;
    # Â_1 = δ_1 (no carry from t=2)
    # Â_2 = 3.3;  Â_0 = 1.4 + 0.72*1.0 = 2.12
    advantages, _ = gae(terminations=[0, 1, 0], dones=[0, 1, 0], final_values=[0, 99.0, 0])
    assert advantages == pytest.approx([2.12, 1.0, 3.3])


@pytest.mark.math
def test_advantages_truncation_bootstraps_from_final_observation():
    # time limit at t=1: bootstrap from V(final obs) = 4.0, not from V(s_2) = 1.5 of the reset state; no carry from t=2
    # δ_1 = 2 + 0.9*4.0 - 1.0 = 4.6 = Â_1;  Â_2 = 3.3;  Â_0 = 1.4 + 0.72*4.6 = 4.712
    advantages, _ = gae(terminations=[0, 0, 0], dones=[0, 1, 0], final_values=[0, 4.0, 0])
    assert advantages == pytest.approx([4.712, 4.6, 3.3])


@pytest.mark.math
def test_advantages_of_two_envs_are_independent():
    # env 0 is the plain example, env 1 the terminated one: each column matches its single-env answer
    def pair(first, second):  # two (T,) columns -> (T, 2): two envs
        return torch.stack([f64(*first), f64(*second)], dim=1)

    advantages, _ = compute_gae(
        pair(REWARDS, REWARDS), pair(VALUES, VALUES), f64(NEXT_VALUE, NEXT_VALUE),
        pair(NO_END, [0, 99.0, 0]), pair(NO_END, [0, 1, 0]), pair(NO_END, [0, 1, 0]), GAMMA, LAMBDA,
    )
    assert advantages[:, 0].tolist() == pytest.approx([4.80272, 4.726, 3.3])
    assert advantages[:, 1].tolist() == pytest.approx([2.12, 1.0, 3.3])


@pytest.mark.math
def test_advantages_lambda_zero_is_td_error():
    # λ=0: Â_t = δ_t = (1.4, 2.35, 3.3)
    advantages, _ = gae(gae_lambda=0.0)
    assert advantages == pytest.approx([1.4, 2.35, 3.3])


@pytest.mark.math
def test_advantages_lambda_one_is_discounted_return_minus_value():
    # λ=1, bootstrapping the last step with V=2.0: G_2 = 3 + 0.9*2.0 = 4.8; G_1 = 2 + 0.9*4.8 = 6.32;
    # G_0 = 1 + 0.9*6.32 = 6.688.  Â = G - V = (6.188, 5.32, 3.3)
    advantages, returns = gae(gae_lambda=1.0)
    assert advantages == pytest.approx([6.188, 5.32, 3.3])
    assert returns == pytest.approx([6.688, 6.32, 4.8])

@pytest.mark.math
def test_advantages_of_a_one_step_rollout():
    """Bug caught: the running Â shaped after rewards[1], which a one-step rollout (--num-steps 1) lacks. T = 1, one
    env, γ = 0.9, λ = 0.8: r = 1, V(s_0) = 0.5, V(s_1) = 2.0: Â_0 = δ_0 = 1 + 0.9*2.0 - 0.5 = 2.3; R_0 = 2.3 + 0.5
    = 2.8."""
    zero = f64(0.0)[:, None]
    advantages, returns = compute_gae(f64(1.0)[:, None], f64(0.5)[:, None], f64(2.0), zero, zero, zero, GAMMA, LAMBDA)
    assert advantages.item() == pytest.approx(2.3) and returns.item() == pytest.approx(2.8)


# ---- Normalization shared by all sub-environments ----------------------------------------------------
@pytest.mark.math
def test_running_stats_over_env_batches_equal_pooled_stats():
    rng = np.random.default_rng(0)
    steps = [rng.normal(3.0, 2.0, size=(4, 5)) for _ in range(50)]  # 50 steps of 4 envs, 5-dim observations
    rms = RunningMeanStd((5,))
    for batch in steps:
        rms.update(batch)
    pooled = np.concatenate(steps)
    # the 1e-4 prior count shifts the result by about 1e-4/200 relative
    np.testing.assert_allclose(rms.mean, pooled.mean(0), rtol=1e-5)
    np.testing.assert_allclose(rms.var, pooled.var(0), rtol=1e-5)
    assert rms.count == pytest.approx(200)


@pytest.mark.math
def test_normalize_obs_uses_stats_and_clips():
    rms = RunningMeanStd((2,))
    rms.mean, rms.var = np.array([1.0, 0.0]), np.array([4.0, 1e-6])
    # (3-1)/sqrt(4) = 1.0;  (1-0)/sqrt(1e-6 + 1e-8) = 995 -> clipped to 10
    np.testing.assert_allclose(normalize_obs(np.array([[3.0, 1.0]]), rms, clip=10.0), [[1.0, 10.0]], rtol=1e-6)


@pytest.mark.math
def test_reward_scaler_shares_one_return_statistic():
    # 2 envs, γ=0.5, one rollout of 2 steps. Step 1: G = (1, 2). Step 2: G = 0.5*(1, 2) + (3, 4) = (3.5, 5).
    # Pooled over both envs and steps: mean (1+2+3.5+5)/4 = 2.875,
    # var ((1.875)² + (0.875)² + (0.625)² + (2.125)²)/4 = (3.515625+0.765625+0.390625+4.515625)/4 = 2.296875
    # so every reward of the rollout is divided by sqrt(2.296875) = 1.515544: (3, 4) -> (1.979487, 2.639316)
    scaler = RewardScaler(num_envs=2, gamma=0.5, clip=10.0)
    scaled = scaler(np.array([[1.0, 2.0], [3.0, 4.0]]), np.zeros((2, 2), bool))
    assert scaler.return_rms.var == pytest.approx(2.296875, rel=1e-4)
    np.testing.assert_allclose(scaled, [[0.659829, 1.319658], [1.979487, 2.639316]], rtol=1e-4)


@pytest.mark.math
def test_reward_scaler_restarts_return_at_episode_end():
    # γ=0.5. Step 1: G = (1, 2), env 0's episode ends there. Step 2: G = (0 + 3, 0.5*2 + 4) = (3, 5);
    # the statistics saw (1, 2, 3, 5), not the (1, 2, 3.5, 5) of the test above.
    scaler = RewardScaler(num_envs=2, gamma=0.5, clip=10.0)
    scaler(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[True, False], [False, False]]))
    assert scaler.return_rms.mean == pytest.approx(11 / 4, rel=1e-4)
    np.testing.assert_allclose(scaler.returns, [3.0, 5.0])  # carried into the next rollout


@pytest.mark.math
def test_reward_scaler_clips():
    # returns (100, 0) -> mean 50, var 2500, std 50: reward 100 scales to 2, clipped to 1.5
    scaler = RewardScaler(num_envs=2, gamma=0.99, clip=1.5)
    np.testing.assert_allclose(scaler(np.array([[100.0, 0.0]]), np.zeros((1, 2), bool)), [[1.5, 0.0]], rtol=1e-4)


@pytest.mark.math
def test_statistics_merge_rule_by_hand():
    """Chan's rule from the prior (mean 0, var 1, count 1e-4) with the batch [2, 4] (mean 3, var 1, count 2):
    delta = 3, total = 2.0001, mean = 3 * 2 / 2.0001 = 2.99985; squares = 1*1e-4 + 1*2 + 9 * 1e-4 * 2 / 2.0001
    = 0.0001 + 2 + 0.00089996 = 2.00099996, var = 2.00099996 / 2.0001 = 1.00045. Then [6] (mean 6, var 0, count 1):
    delta = 6 - 2.99985 = 3.00015, total 3.0001, mean = 2.99985 + 3.00015 / 3.0001 = 2.99985 + 1.00002 = 3.99987;
    var = (1.00045 * 2.0001 + 0 + 3.00015² * 2.0001 / 3.0001) / 3.0001 = (2.00100 + 18.00270 / 3.0001) / 3.0001
    = (2.00100 + 6.00070) / 3.0001 = 2.66714."""
    statistics = RunningMeanStd()
    statistics.update(np.array([2.0, 4.0]))
    assert (statistics.mean, statistics.var, statistics.count) == pytest.approx((2.99985, 1.00045, 2.0001), rel=1e-5)
    statistics.update(np.array([6.0]))
    # without the prior: [2, 4, 6] has mean 4 and variance 8/3 = 2.6667; the prior moves both in the 4th digit
    assert (statistics.mean, statistics.var, statistics.count) == pytest.approx((3.99987, 2.66714, 3.0001), rel=1e-5)


@pytest.mark.math
def test_reward_scaler_carries_each_return_across_rollouts_and_restarts_it_at_a_time_limit():
    """Bugs caught: G reset at every rollout, or kept over a truncation. γ=0.5, one env. Rollout 1: r = 1, 1 ->
    G = 1, 1.5. Rollout 2: r = 2 with a time-limit end (done, not terminated) -> G = 0.5 * 1.5 + 2 = 2.75, then
    r = 4 -> G = 4 (restarted). The statistics saw 1, 1.5, 2.75, 4: mean 9.25 / 4 = 2.3125."""
    scaler = RewardScaler(num_envs=1, gamma=0.5, clip=10.0)
    scaler(np.array([[1.0], [1.0]]), np.array([[False], [False]]))
    scaler(np.array([[2.0], [4.0]]), np.array([[True], [False]]))
    assert scaler.return_rms.mean == pytest.approx(9.25 / 4.0001, rel=1e-6)
    assert scaler.returns.tolist() == [4.0]

@pytest.mark.math
def test_normalize_obs_clips_from_below_and_keeps_a_constant_dimension_finite():
    """Bugs caught: the lower clip bound dropped, or the 1e-8 subtracted from the variance instead of added (NaN
    where a dimension never varies, as Ant's contact forces often do).
    Part 1: mean (1, 0), var (4, 1e-6): (-5 - 1)/sqrt(4) = -3.0; (-1 - 0)/sqrt(1e-6 + 1e-8) = -995.0 -> -10.
    Part 2: 20,000 zeros merged into the prior (mean 0, var 1, count 1e-4): delta = 0, so
    var = 1 * 1e-4 / 20000.0001 = 4.99999975e-9 < 1e-8. Then 1e-4 / sqrt(4.99999975e-9 + 1e-8)
    = 1e-4 / 1.2247449e-4 = 0.8164966, and 0 stays 0 (sqrt(var - 1e-8) would be NaN)."""
    rms = RunningMeanStd((2,))
    rms.mean, rms.var = np.array([1.0, 0.0]), np.array([4.0, 1e-6])
    np.testing.assert_allclose(normalize_obs(np.array([[-5.0, -1.0]]), rms, clip=10.0), [[-3.0, -10.0]], rtol=1e-6)
    constant = RunningMeanStd((1,))
    constant.update(np.zeros((20_000, 1)))
    assert constant.var[0] == pytest.approx(4.99999975e-9, rel=1e-6)
    np.testing.assert_allclose(normalize_obs(np.array([[0.0], [1e-4]]), constant, clip=10.0), [[0.0], [0.8164966]],
                               rtol=1e-6)


@pytest.mark.math
def test_reward_scaler_clips_negative_rewards_too():
    """Bug caught: the lower clip bound dropped. The mirror of test_reward_scaler_clips: returns (-100, 0) -> mean
    -50, var 2500, std 50: reward -100 scales to -2, clipped to -1.5."""
    scaler = RewardScaler(num_envs=2, gamma=0.99, clip=1.5)
    np.testing.assert_allclose(scaler(np.array([[-100.0, 0.0]]), np.zeros((1, 2), bool)), [[-1.5, 0.0]], rtol=1e-4)


@pytest.mark.math
def test_reward_scaler_stays_finite_through_a_reward_free_stretch():
    """Bug caught: the 1e-8 subtracted from the return variance instead of added. 100 steps of 200 envs, all rewards
    0: every G is 0, so 20,000 zeros merge into the prior (mean 0, var 1, count 1e-4): var = 1e-4 / 20000.0001
    = 4.99999975e-9 < 1e-8. The scaled rewards are 0 / sqrt(1.5e-8) = 0, not the NaN of 0 / sqrt(-5e-9)."""
    scaler = RewardScaler(num_envs=200, gamma=0.99, clip=10.0)
    scaled = scaler(np.zeros((100, 200)), np.zeros((100, 200), bool))
    assert scaler.return_rms.var == pytest.approx(4.99999975e-9, rel=1e-6)
    assert np.isfinite(scaled).all() and (scaled == 0).all()


@pytest.mark.math
def test_reward_scaler_accumulates_returns_in_float64_whatever_the_rewards_dtype():
    """Bug caught: the returns buffer taking the rewards' dtype, which truncates G for integer rewards (and rounds it
    for float32 ones). γ = 0.5, one env, integer rewards 1, 1: G = 1, then 0.5 * 1 + 1 = 1.5. The statistics see
    (1, 1.5): batch mean 1.25, merged with the prior count 1e-4: mean = 1.25 * 2 / 2.0001 = 1.2499375 (an integer
    buffer would store 1.5 as 1: mean 0.99995)."""
    scaler = RewardScaler(num_envs=1, gamma=0.5, clip=10.0)
    scaler(np.array([[1], [1]]), np.zeros((2, 1), bool))
    assert scaler.return_rms.mean == pytest.approx(1.2499375, rel=1e-7)
    assert scaler.returns.tolist() == [1.5]


@pytest.mark.math
def test_policy_shapes_with_several_action_dimensions():
    """Bug caught: log σ shared by all action dimensions, or log π summed over the wrong axis. 5 observations,
    3 actions, a batch of 4: one log σ per dimension, one log π and one value per sample."""
    agent = Agent(obs_dim=5, action_dim=3)
    obs, noise = torch.randn(4, 5), torch.randn(4, 3)
    assert tuple(agent.actor_logstd.shape) == (3,) and agent.actor_logstd.tolist() == [-1.0] * 3
    assert tuple(agent.act(obs, noise).shape) == (4, 3)
    assert tuple(agent.log_prob(obs, noise).shape) == (4,) and tuple(agent.value(obs).shape) == (4,)
    assert agent.entropy().shape == ()
    # dimensions are independent: log π of (a_1, a_2, a_3) is the sum of three one-dimensional log-densities
    with torch.no_grad():
        agent.actor_logstd.copy_(torch.tensor([0.0, -1.0, 1.0]))
    actions = agent.act(obs, noise)
    mean = agent.actor_mean(obs)
    by_dimension = torch.distributions.Normal(mean, agent.actor_logstd.exp()).log_prob(actions).sum(-1)
    torch.testing.assert_close(agent.log_prob(obs, actions), by_dimension)

# ---- The update: K epochs of minibatch Adam on a hand-made batch -----------------------------------------
def small_update(monkeypatch, reported=None, samples=8, **options):
    """ppo_update on a hand-made batch of `samples` samples (3 observations, 1 action) with the given Args options;
    `reported(k)`, if given, sets the stats the k-th ppo_loss call returns (k = 1, 2, ...). Returns ppo_update's
    result and the keyword coefficients and inputs of every ppo_loss call."""
    torch.manual_seed(0)
    agent = Agent(obs_dim=3, action_dim=1)
    obs, actions = torch.randn(samples, 3), torch.randn(samples, 1)
    with torch.no_grad():
        batch = {"obs": obs, "actions": actions, "logprobs": agent.log_prob(obs, actions),
                 "values": agent.value(obs), "advantages": torch.randn(samples), "returns": torch.randn(samples)}
    batch |= options.pop("batch", {})
    calls = []

    def recording_loss(*inputs, **coefficients):
        loss, stats = ppo_loss(*inputs, **coefficients)
        calls.append((coefficients, [x.detach().clone() for x in inputs]))
        if reported is not None:
            stats = {name: torch.tensor(float(value)) for name, value in zip(stats, reported(len(calls)))}
        return loss, stats

    monkeypatch.setattr(ppo_continuous, "ppo_loss", recording_loss)
    args = Args(**{"target_kl": None, **options})
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)
    return ppo_continuous.ppo_update(agent, optimizer, batch, {}, args, 0.0), calls


@pytest.mark.math
def test_update_statistics_are_the_mean_over_every_minibatch_of_every_epoch(monkeypatch):
    """Bugs caught: the logged means taken over the last epoch only, over the statistics instead of the minibatches,
    or the names read off a second minibatch that a one-minibatch update does not have. The k-th minibatch reports
    (policy_loss, value_loss, entropy, approx_kl, clip_fraction) = (k, 10k, 100k, 0, 1000k). 2 epochs x 2
    minibatches, k = 1..4: means (2.5, 25, 250, 0, 2500), not the last epoch's (3.5, 35, 350, 0, 3500).
    1 epoch x 1 minibatch: k = 1 alone."""
    def reported(k):
        return (k, 10 * k, 100 * k, 0, 1000 * k)

    (stats, epochs_run, epoch_kl), _ = small_update(monkeypatch, reported, num_minibatches=2, update_epochs=2)
    assert list(stats) == ["policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction"]
    assert list(stats.values()) == pytest.approx([2.5, 25, 250, 0, 2500])
    assert (epochs_run, epoch_kl) == (2, 0.0)
    (stats, epochs_run, _), _ = small_update(monkeypatch, reported, num_minibatches=1, update_epochs=1)
    assert list(stats.values()) == pytest.approx([1, 10, 100, 0, 1000]) and epochs_run == 1


@pytest.mark.math
def test_every_minibatch_row_holds_one_samples_own_columns(monkeypatch):
    """Bug caught: one column (Â_t, R_t or V_old) gathered in batch order while the others are shuffled, pairing a
    sample's log π_old with another's advantage. The hand-made batch ties each column to log π_old (distinct values
    -3, -2.71, ..., -1): Â = 2 log π_old, R = 3 log π_old, V_old = 4 log π_old, so every row of every minibatch keeps
    these ratios, and the shuffle does move the rows."""
    logprobs = torch.linspace(-3.0, -1.0, 8)
    batch = {"logprobs": logprobs, "advantages": 2 * logprobs, "returns": 3 * logprobs, "values": 4 * logprobs}
    _, calls = small_update(monkeypatch, batch=batch, num_minibatches=2, update_epochs=2)
    for _, (_, old_logprob, advantages, _, old_value, returns, _) in calls:
        torch.testing.assert_close(advantages, 2 * old_logprob, rtol=0, atol=0)
        torch.testing.assert_close(returns, 3 * old_logprob, rtol=0, atol=0)
        torch.testing.assert_close(old_value, 4 * old_logprob, rtol=0, atol=0)
    assert not torch.equal(torch.cat([inputs[1] for _, inputs in calls[:2]]), logprobs)


@pytest.mark.math
def test_update_hands_clip_vloss_to_the_loss(monkeypatch):
    """Bug caught: --clip-vloss not handed to ppo_loss (None, which reads as off). Every minibatch of a --clip-vloss
    update computes the clipped value loss; without it, none does."""
    for clip_vloss in (True, False):
        _, calls = small_update(monkeypatch, num_minibatches=2, update_epochs=2, clip_vloss=clip_vloss)
        assert [coefficients["clip_vloss"] for coefficients, _ in calls] == [clip_vloss] * 4


@pytest.mark.math
def test_norm_adv_stays_bounded_when_the_advantages_barely_differ(monkeypatch):
    """Bug caught: the 1e-8 of the advantage normalization subtracted from the std instead of added. One minibatch
    of two advantages 0 and 2e-8 (float64): mean 1e-8, Bessel-corrected std sqrt(2 * (1e-8)² / 1) = √2 * 1e-8.
    Normalized: ±1e-8 / (√2 * 1e-8 + 1e-8) = ±1 / (√2 + 1) = ±(√2 - 1) = ±0.41421356 (subtracting gives
    ±1 / (√2 - 1) = ±2.41421356)."""
    batch = {"advantages": torch.tensor([0.0, 2e-8], dtype=torch.float64)}
    _, calls = small_update(monkeypatch, samples=2, batch=batch, num_minibatches=1, update_epochs=1, norm_adv=True)
    advantages = calls[0][1][2]
    torch.testing.assert_close(advantages.sort().values, f64(-(math.sqrt(2) - 1), math.sqrt(2) - 1), rtol=1e-9,
                               atol=0)


@pytest.mark.math
def test_target_kl_stops_only_an_epoch_whose_kl_exceeds_it(monkeypatch):
    """Bug caught: the update stopped by an epoch whose mean KL equals --target-kl. Every minibatch reports KL 0.25
    (exact in binary), so each epoch's mean is 0.25: against a target of 0.25 all 3 epochs run; against 0.125 the
    first epoch exceeds it and ends the update."""
    def reported(k):
        return (0, 0, 0, 0.25, 0)

    for target_kl, expected_epochs in ((0.25, 3), (0.125, 1)):
        (_, epochs_run, epoch_kl), _ = small_update(monkeypatch, reported, num_minibatches=2, update_epochs=3,
                                                    target_kl=target_kl)
        assert (epochs_run, epoch_kl) == (expected_epochs, 0.25)


@pytest.mark.math
@pytest.mark.parametrize(
    "lr_scale, epoch_kl, lr_kl_target, expected",
    [
        # KL exactly 2 x target (0.5 = 2 x 0.25, exact in binary): not above it, the factor is kept
        pytest.param(1.0, 0.5, 0.25, 1.0, id="KL at 2x target: kept"),
        # KL 2.5 x target: above 2x, divided: 1 / 1.5 = 0.6666667
        pytest.param(1.0, 0.025, 0.01, 1 / 1.5, id="KL at 2.5x target: divided by 1.5"),
        # KL 1.5 x target: inside the band (a rule that forgot the 2x would divide): kept
        pytest.param(1.0, 0.015, 0.01, 1.0, id="KL at 1.5x target: kept"),
        # KL exactly target / 2 (0.125 = 0.25 / 2): not below it, kept (lr_scale 0.5, so x1.5 would show: 0.75)
        pytest.param(0.5, 0.125, 0.25, 0.5, id="KL at target/2: kept"),
        # KL 0.4 x target: below 1/2, multiplied: 0.5 x 1.5 = 0.75 (x2.5 would give 1.25, capped to 1)
        pytest.param(0.5, 0.004, 0.01, 0.75, id="KL at 0.4x target: multiplied by 1.5"),
        # 0.8 x 1.5 = 1.2, capped by the schedule: 1.0
        pytest.param(0.8, 0.001, 0.01, 1.0, id="multiplied, capped at 1"),
        # no target: the factor never moves
        pytest.param(0.5, 0.05, None, 0.5, id="no target: kept"),
    ],
)
def test_adapted_lr_scale_by_hand(lr_scale, epoch_kl, lr_kl_target, expected):
    """Bugs caught: the bounds 2x and 1/2 of the target moved or made inclusive, or the factor 1.5 of the increase
    changed (the whole-run test only increases from 2/3, where the cap hides it)."""
    assert ppo_continuous.adapted_lr_scale(lr_scale, epoch_kl, lr_kl_target) == pytest.approx(expected, rel=1e-12)


def test_agent_defaults_are_the_command_lines():
    """Agent's defaults are literals, so that it copies alone; this keeps them in step with Args."""
    defaults = {name: p.default for name, p in inspect.signature(Agent.__init__).parameters.items()}
    for name in ("init_logstd", "actor_width", "critic_width"):
        assert defaults[name] == getattr(Args, name), name


def copied_alone(*pieces) -> dict:
    """The pieces' source, taken alone, run in a namespace holding only torch, nn, np and Tensor."""
    namespace = {"torch": torch, "nn": torch.nn, "np": np, "Tensor": torch.Tensor}
    for piece in pieces:
        exec(inspect.cleandoc("\n" + inspect.getsource(piece)) if inspect.isfunction(piece) else
             inspect.getsource(piece), namespace)
    return namespace


@pytest.mark.math
def test_math_pieces_copy_alone():
    """Agent, the statistics' merge rule, compute_gae and ppo_loss each run from their own source alone."""
    copied = copied_alone(ppo_continuous.Agent, RunningMeanStd.merge, compute_gae, ppo_loss)
    torch.manual_seed(0)
    agent = copied["Agent"](obs_dim=3, action_dim=2)
    torch.manual_seed(0)
    original = Agent(obs_dim=3, action_dim=2)
    obs, noise = torch.randn(5, 3), torch.randn(5, 2)
    for method in ("act", "log_prob"):
        torch.testing.assert_close(getattr(agent, method)(obs, noise), getattr(original, method)(obs, noise))
    torch.testing.assert_close(agent.value(obs), original.value(obs))

    class Statistics:  # what merge needs of its owner
        mean, var, count = 0.0, 1.0, 1e-4

    statistics = Statistics()
    copied["merge"](statistics, 3.0, 1.0, 2)  # the batch [2, 4] of the merge test above
    assert (statistics.mean, statistics.var) == pytest.approx((2.99985, 1.00045), rel=1e-5)
    column = lambda *values: f64(*values)[:, None]  # noqa: E731
    advantages, _ = copied["compute_gae"](column(*REWARDS), column(*VALUES), f64(NEXT_VALUE), column(*NO_END),
                                          column(*NO_END), column(*NO_END), GAMMA, LAMBDA)
    assert advantages.squeeze(-1).tolist() == pytest.approx([4.80272, 4.726, 3.3])  # the GAE hand calculation
    zero = f64(0.0)
    loss, _ = copied["ppo_loss"](f64(math.log(1.5)), zero, f64(2.0), zero, zero, zero, zero, clip_coef=0.2,
                                 vf_coef=0.0, ent_coef=0.0, clip_vloss=False)
    assert loss.item() == pytest.approx(-2.4)  # the first ratio clipping case


# ==== 2a. Whole runs: what the training loop feeds the math =============================================
SMALL = dict(num_envs=2, num_steps=128, num_minibatches=4, update_epochs=2, target_kl=None)  # every epoch runs


def scalars(run_dir: str, tag: str) -> list[float]:
    """A tag's values in step order over all the run's event files. A resumed session writes a file of its own; in
    one process within one second its name can sort before the first session's (the writer counter goes from 9 to
    10), and the accumulator's default purge would then drop the later steps as orphaned."""
    accumulator = EventAccumulator(run_dir, purge_orphaned_data=False)
    accumulator.Reload()
    return [event.value for event in sorted(accumulator.Scalars(tag), key=lambda event: event.step)]


@pytest.mark.parametrize("env_id, total_timesteps", [("Pendulum-v1", 1024), ("HalfCheetah-v4", 2048)])
def test_smoke_training_writes_tensorboard_logs(tmp_path, monkeypatch, env_id, total_timesteps):
    monkeypatch.chdir(tmp_path)
    run_dir, _ = train(Args(env_id=env_id, total_timesteps=total_timesteps, **SMALL))
    assert glob.glob(f"{run_dir}/events.out.tfevents.*")
    # Pendulum (200 steps) and HalfCheetah (1000 steps) episodes end by time limit within these runs
    returns = scalars(run_dir, "charts/episodic_return")
    assert returns and all(np.isfinite(returns))
    assert len(scalars(run_dir, "losses/approx_kl")) == total_timesteps // (SMALL["num_envs"] * SMALL["num_steps"])


def test_training_feeds_gae_the_time_limit_end(tmp_path, monkeypatch):
    """Pendulum ends only by its 200-step time limit: the rollout must mark step 199 done but not
    terminated, and hand GAE V(final observation) there, not V of the reset state stored next."""
    monkeypatch.chdir(tmp_path)
    seen = []

    def recording_gae(rewards, values, next_value, final_values, terminations, dones, gamma, gae_lambda):
        seen.append((values.clone(), final_values.clone(), terminations.clone(), dones.clone()))
        return compute_gae(rewards, values, next_value, final_values, terminations, dones, gamma, gae_lambda)

    monkeypatch.setattr(ppo_continuous, "compute_gae", recording_gae)
    train(Args(env_id="Pendulum-v1", total_timesteps=256, num_envs=1, num_steps=256, num_minibatches=4,
               update_epochs=1, eval_episodes=0, save_model=False))
    values, final_values, terminations, dones = seen[0]
    assert dones[:, 0].nonzero().flatten().tolist() == [199]
    assert terminations.sum() == 0
    assert final_values[199, 0] != values[200, 0]


def test_rescaled_actions_map_minus_one_to_one_onto_the_bounds():
    """Bugs caught: the rescaling skipped, or applied to a space already [-1, 1] (whose runs must stay bit for bit
    those without it). Pendulum's torque bound is ±2: a = 0.5 reaches the env as 2 x 0.5 = 1.0 and a = -1 as -2, so
    one step from the same reset lands where the bare env's torques 1.0 and -2.0 do. MountainCarContinuous is
    already [-1, 1] and gets no wrapper."""
    rescaled, bare = make_env("Pendulum-v1", True), make_env("Pendulum-v1", False)
    assert (rescaled.action_space.low, rescaled.action_space.high) == (-1, 1)
    assert (bare.action_space.low, bare.action_space.high) == (-2, 2)
    for action, torque in ((0.5, 1.0), (-1.0, -2.0)):
        rescaled.reset(seed=0), bare.reset(seed=0)
        obs = rescaled.step(np.array([action], np.float32))[0]
        np.testing.assert_array_equal(obs, bare.step(np.array([torque], np.float32))[0])
    assert type(make_env("MountainCarContinuous-v0", True)) is type(make_env("MountainCarContinuous-v0", False))


class PinnedTorquePendulum(gym.ActionWrapper):
    """Pendulum with a second action dimension pinned at 0.5 (low == high), which the env ignores."""

    def __init__(self):
        super().__init__(gym.make("Pendulum-v1"))
        self.action_space = gym.spaces.Box(np.array([-2, 0.5], np.float32), np.array([2, 0.5], np.float32))

    def action(self, action):
        return action[:1]


def test_a_zero_width_action_dimension_is_refused_before_any_work_under_rescale_actions(tmp_path):
    """Bug caught: RescaleAction maps [-1, 1] onto low == high by dividing by zero and sends NaN to the env, silently;
    or the refusal comes only from the vector env's workers. One line, exit 1, before the first rollout; the same env
    trains with --no-rescale-actions."""
    gym.register("PinnedTorquePendulum-v0", entry_point=PinnedTorquePendulum, max_episode_steps=50)
    with pytest.raises(SystemExit, match=r"PinnedTorquePendulum-v0 has actions with low == high \(dimensions \[1\]\)"):
        checked_spaces("PinnedTorquePendulum-v0", True)
    assert checked_spaces("PinnedTorquePendulum-v0", False)[1].shape == (2,)
    code = ("import gymnasium as gym, ppo_continuous, test_ppo; gym.register('PinnedTorquePendulum-v0', entry_point="
            "test_ppo.PinnedTorquePendulum, max_episode_steps=50); ppo_continuous.main()")
    command = [sys.executable, "-c", code, "--env-id", "PinnedTorquePendulum-v0",
               "--vector-mode", "async", "--num-envs", "2", "--num-steps", "64", "--total-timesteps", "128",
               "--eval-episodes", "0", "--no-save-model"]
    env = {**os.environ, "PYTHONPATH": with_repo_on_path()}
    refused = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr  # gymnasium's checker warns first
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: PinnedTorquePendulum-v0 has actions with low == high (dimensions [1]): --rescale-actions cannot map "
        "[-1, 1] onto them; train with --no-rescale-actions") and not os.path.exists(tmp_path / "runs")
    trained = subprocess.run(command + ["--no-rescale-actions"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300, env=env)
    assert trained.returncode == 0, trained.stderr


@pytest.mark.parametrize("rescale", [True, False])
def test_rescale_actions_reaches_every_env_the_policy_acts_in(tmp_path, monkeypatch, rescale):
    """Bugs caught: the rollout's envs, the final evaluation's or --eval-checkpoint's built without the run's
    setting (a policy trained in [-1, 1] would then act at half of Pendulum's torque, or one trained in ±2 at
    twice it). checked_spaces' probe is built with it too, so that what make_env refuses is refused first."""
    monkeypatch.chdir(tmp_path)
    made = []
    real_make_env = ppo_continuous.make_env
    monkeypatch.setattr(ppo_continuous, "make_env", lambda env_id, rescale_actions, **kwargs:
                        made.append(rescale_actions) or real_make_env(env_id, rescale_actions, **kwargs))
    run_dir, _ = train(Args(env_id="Pendulum-v1", total_timesteps=256, eval_episodes=1, rescale_actions=rescale,
                            **SMALL))
    assert made == [rescale] * 4  # the probe, the 2 rollout envs, the evaluation's
    made.clear()
    monkeypatch.setenv("MUJOCO_GL", "egl")  # main() sets it for its process: put it back afterwards
    monkeypatch.setattr(sys, "argv", ["ppo_continuous.py", "--eval-checkpoint", f"{run_dir}/checkpoint.pt",
                                      "--eval-episodes", "1"])
    ppo_continuous.main()
    assert made == [rescale] * 2  # load_policy's probe, the evaluation's


def test_rollout_stores_the_sampled_action_and_the_env_gets_it_clipped(tmp_path, monkeypatch):
    """The policy acts in [-1, 1] (Pendulum's ±2 torque is rescaled behind the vector env); with σ = e ≈ 2.7 many
    samples fall outside it. The envs must receive clip(a_t), while the batch scored for log π_old holds the
    unclipped a_t, in step order."""
    monkeypatch.chdir(tmp_path)
    sent, scored = [], []
    make_envs = ppo_continuous.make_vector_env

    def recording_envs(*args):
        envs = make_envs(*args)
        step = envs.step
        envs.step = lambda actions: (sent.append(actions.copy()), step(actions))[1]
        return envs

    log_prob = Agent.log_prob

    def recording_log_prob(agent, obs, actions):
        scored.append(actions.clone())
        return log_prob(agent, obs, actions)

    monkeypatch.setattr(ppo_continuous, "make_vector_env", recording_envs)
    monkeypatch.setattr(Agent, "log_prob", recording_log_prob)
    train(Args(env_id="Pendulum-v1", total_timesteps=256, init_logstd=1.0, eval_episodes=0, save_model=False, **SMALL))
    stored = scored[0].cpu().numpy()  # the first call scores the whole rollout, (T*N, action_dim) in step order
    sent = np.concatenate(sent)
    assert (np.abs(stored) > 1).mean() > 0.2  # the case this test is about does occur
    np.testing.assert_array_equal(sent, np.clip(stored, -1.0, 1.0))


def test_recompute_advantages_runs_gae_every_epoch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(ppo_continuous, "compute_gae", lambda *a: calls.append(1) or compute_gae(*a))
    train(Args(env_id="Pendulum-v1", total_timesteps=512, recompute_advantages=True, eval_episodes=0, **SMALL))
    assert len(calls) == 2 * SMALL["update_epochs"]  # 2 iterations x 2 epochs

def test_recompute_advantages_feeds_each_epoch_the_recomputed_estimates(tmp_path, monkeypatch):
    """Bug caught: with --recompute-advantages, epoch 2 handed the loss the rollout's first V_old, Â_t or R_t instead
    of those the critic gives after epoch 1. One iteration of 256 samples, 2 epochs of 4 minibatches: compute_gae
    runs twice; epoch 2's minibatches hold exactly the second run's Â_t and R_t, and V_old = R_t - Â_t of the same
    sample."""
    monkeypatch.chdir(tmp_path)
    losses, estimates = record_loss_inputs(monkeypatch)
    train(Args(env_id="Pendulum-v1", total_timesteps=256, recompute_advantages=True, eval_episodes=0,
               save_model=False, **SMALL))
    assert len(estimates) == 2 and len(losses) == 8
    (first_advantages, _), (advantages, returns) = estimates
    assert not torch.equal(first_advantages, advantages)  # the critic moved: a stale Â_t would show
    epoch_2 = [torch.cat([inputs[i] for inputs in losses[4:]]) for i in (2, 4, 5)]  # Â_t, V_old, R_t
    torch.testing.assert_close(epoch_2[0].sort().values, advantages.flatten().sort().values, rtol=0, atol=0)
    torch.testing.assert_close(epoch_2[2].sort().values, returns.flatten().sort().values, rtol=0, atol=0)
    torch.testing.assert_close(epoch_2[1], epoch_2[2] - epoch_2[0], rtol=0, atol=1e-5)


def test_same_seed_gives_same_learning_curve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, first_eval = train(Args(env_id="Pendulum-v1", total_timesteps=1024, exp_name="a", eval_episodes=1, **SMALL))
    second, second_eval = train(Args(env_id="Pendulum-v1", total_timesteps=1024, exp_name="b", eval_episodes=1,
                                     **SMALL))
    assert first_eval == second_eval
    for tag in ("charts/episodic_return", "losses/value_loss", "losses/approx_kl"):
        assert scalars(first, tag) == scalars(second, tag)


def with_repo_on_path() -> str:
    """PYTHONPATH for a subprocess that imports ppo_continuous: this repository, then what was there (a machine may
    hold packages there)."""
    return os.pathsep.join(filter(None, [str(Path(SCRIPT).parent), os.environ.get("PYTHONPATH")]))


def cpu_seconds(pid: int) -> float:
    """CPU time used so far by pid and all its descendants (0 once they are gone)."""
    total, tree = 0.0, [pid]
    while tree:
        current = tree.pop()
        with contextlib.suppress(OSError, IndexError):
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        tree += children(current)
    return total


def wait_until(condition, process: subprocess.Popen, what: str, stalled_after: float = 120.0) -> None:
    """Poll until condition() holds. A deadline on wall time fails on a busy machine; this one fails only when the
    process tree has used no CPU for stalled_after seconds (a hang) or the process has ended."""
    last_cpu, last_progress = -1.0, time.time()
    while not condition():
        assert process.poll() is None, f"the process ended (rc {process.returncode}) before {what}"
        cpu = cpu_seconds(process.pid)
        if cpu > last_cpu + 0.01:
            last_cpu, last_progress = cpu, time.time()
        assert time.time() - last_progress < stalled_after, f"no progress towards {what} for {stalled_after:.0f} s"
        time.sleep(0.2)


def run_script(*cli_args: str, **options) -> subprocess.CompletedProcess:
    """The script with these options, to its end; the timeout only guards against a hang, not a slow machine."""
    return subprocess.run([sys.executable, SCRIPT, *cli_args], capture_output=True, text=True, timeout=900, **options)


@pytest.mark.parametrize(
    "cli_args, message",
    [
        (["--env-id", "CartPole-v1"], "CartPole-v1 actions must be a flat (1-D) Box, got Discrete(2)"),
        (["--env-id", "NoSuchEnv-v0"], "cannot make environment 'NoSuchEnv-v0'"),
        (["--num-minibatches", "7"], "not divisible by --num-minibatches 7"),
        (["--total-timesteps", "100"], "less than one rollout"),
        (["--num-envs", "0"], "--num-envs must be positive"),
        (["--gamma", "1.5"], "--gamma must be in [0, 1]"),
    ],
)
def test_bad_input_exits_with_one_line_message(cli_args, message):
    result = run_script(*cli_args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# ---- What the loop feeds the math ---------------------------------------------------------------------
class RecordingEnvs:
    """Wraps a vector env's step() to keep every raw observation, reward, end and infos["final_obs"] it returns."""

    def __init__(self, envs):
        self.envs, self.step_obs, self.final_obs, self.rewards = envs, [], [], []
        self.terminations, self.truncations = [], []
        step = envs.step

        def recording_step(actions):
            result = step(actions)
            self.step_obs.append(result[0].copy())
            self.rewards.append(result[1].copy())
            self.terminations.append(result[2].copy())
            self.truncations.append(result[3].copy())
            self.final_obs.append({i: o.copy() for i, o in enumerate(result[4].get("final_obs", [])) if o is not None})
            return result

        envs.step = recording_step


def test_rollout_normalizes_with_frozen_statistics_including_the_final_obs():
    """Bugs caught: the final observation that bootstraps a time-limit end stored raw; the statistics moving
    inside a rollout. Statistics far from Pendulum's (mean 0.5, std 2 / 0.5 / 3) make both visible."""
    envs = make_vector_env("Pendulum-v1", 1, "sync", False)
    recording = RecordingEnvs(envs)
    obs_rms = RunningMeanStd((3,))
    obs_rms.mean, obs_rms.var = np.array([0.5, -0.5, 1.0]), np.array([4.0, 0.25, 9.0])
    before = (obs_rms.mean.tolist(), obs_rms.var.tolist(), obs_rms.count)
    raw_obs, _ = envs.reset(seed=0)
    first_obs = raw_obs.copy()
    episodes = {"return": np.zeros(1), "length": np.zeros(1, int)}
    rollout, _, ended = collect_rollout(envs, Agent(3, 1), obs_rms, raw_obs, episodes, 256, 10.0, torch.device("cpu"))
    envs.close()
    assert (obs_rms.mean.tolist(), obs_rms.var.tolist(), obs_rms.count) == before
    # every stored s_t is the raw observation the policy was given, normalized with the statistics of before
    raw_inputs = np.concatenate([first_obs[None], np.stack(recording.step_obs[:-1])])  # s_0 .. s_255, (256, 1, 3)
    np.testing.assert_allclose(rollout["obs"], normalize_obs(raw_inputs, obs_rms, 10.0), rtol=1e-6, atol=1e-6)
    # Pendulum's 200-step time limit ends the episode at step 199; its final obs is stored normalized
    assert rollout["dones"][:, 0].nonzero()[0].tolist() == [199] and [e[0] for e in ended] == [199]
    raw_final = recording.final_obs[199][0]
    np.testing.assert_allclose(rollout["final_obs"][199, 0], normalize_obs(raw_final, obs_rms, 10.0), rtol=1e-6)
    assert not np.allclose(rollout["final_obs"][199, 0], raw_final, atol=0.1)  # raw and normalized differ here

class Countdown(gym.Env):
    """A test env that ends on its own: an episode lasts a length drawn at reset (2-11 steps) unless the 8-step time
    limit it is registered with cuts it first, so sub-envs end on different steps, by termination or by truncation.
    Observation (steps left, steps taken); a step's reward is its number in the episode (1, 2, ...)."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.left, self.taken = int(self.np_random.integers(2, 12)), 0
        return np.array([self.left, self.taken], np.float64), {}

    def step(self, action):
        self.left, self.taken = self.left - 1, self.taken + 1
        return np.array([self.left, self.taken], np.float64), float(self.taken), self.left == 0, False, {}


gym.register("Countdown-v0", entry_point=Countdown, max_episode_steps=8)


def test_episodes_that_end_on_different_steps_are_each_logged_and_restarted_alone():
    """Bugs caught: an end taken from truncations alone (terminations ignored), episodes logged only on a step where
    every env ends (done.all()), every env's running sums logged or restarted when one env ends, or a return carried
    in from the rollout before lost. Three Countdown envs for 40 steps; env 0 carries a return of 100 over 3 steps
    from the rollout before. Each logged (step, return, length) is recomputed here from the envs' own rewards and
    ends: env 0's first episode, of k steps, is logged as 100 + 1 + ... + k over 3 + k steps."""
    envs = make_vector_env("Countdown-v0", 3, "sync", False)
    recording = RecordingEnvs(envs)
    raw_obs, _ = envs.reset(seed=0)
    episodes = {"return": np.array([100.0, 0.0, 0.0]), "length": np.array([3, 0, 0])}
    rollout, _, ended = collect_rollout(envs, Agent(2, 1), RunningMeanStd((2,)), raw_obs, episodes, 40, 10.0,
                                        torch.device("cpu"))
    envs.close()
    terminations, truncations = np.stack(recording.terminations), np.stack(recording.truncations)
    dones = terminations | truncations
    assert (terminations & ~truncations).any() and (truncations & ~terminations).any()  # both kinds of end occur
    assert (dones.any(1) & ~dones.all(1)).any()  # some steps end one env and not the others
    np.testing.assert_array_equal(rollout["terminations"], terminations)
    np.testing.assert_array_equal(rollout["dones"], dones)
    expected, returns, lengths = [], np.array([100.0, 0.0, 0.0]), np.array([3, 0, 0])
    for step, rewards in enumerate(recording.rewards):
        returns, lengths = returns + rewards, lengths + 1
        expected += [(step, returns[env], lengths[env]) for env in dones[step].nonzero()[0]]
        returns[dones[step]], lengths[dones[step]] = 0.0, 0
    assert ended == expected
    assert episodes["return"].tolist() == returns.tolist() and episodes["length"].tolist() == lengths.tolist()


def test_training_feeds_gae_the_scaled_rewards_the_ends_and_the_values_of_its_own_rollout(tmp_path, monkeypatch):
    """Bugs caught: GAE fed the raw rewards (the scaler's result not kept), the reward scaler clipping with
    --clip-obs or the rollout clipping observations with --clip-reward, γ and λ swapped, V(s_T) taken of the last
    stored state instead of the state after the rollout, or V(final obs) of the state an episode ended from. One
    iteration of three Countdown envs x 32 steps, γ = 0.9, λ = 0.5, --clip-obs 5, --clip-reward 0.5: GAE must get
    the envs' rewards scaled as a fresh RewardScaler scales them over the same ends, those ends, and the critic's
    values of the rollout's stored, next and final states. The first rollout sees the prior statistics (mean 0,
    var 1), so the steps left (up to 11) are clipped at 5 and no lower."""
    monkeypatch.chdir(tmp_path)
    recordings, seen, gae_inputs = [], [], []
    monkeypatch.setattr(ppo_continuous, "make_vector_env",
                        lambda *a: recordings.append(RecordingEnvs(make_vector_env(*a))) or recordings[-1].envs)

    def recording_advantages(agent, rollout, gamma, gae_lambda):
        with torch.no_grad():
            seen.append((rollout, {name: agent.value(rollout[name]) for name in ("obs", "next_obs", "final_obs")}))
        return advantages_now(agent, rollout, gamma, gae_lambda)

    monkeypatch.setattr(ppo_continuous, "advantages_now", recording_advantages)
    monkeypatch.setattr(ppo_continuous, "compute_gae", lambda *a: gae_inputs.append(a) or compute_gae(*a))
    train(Args(env_id="Countdown-v0", total_timesteps=96, num_envs=3, num_steps=32, num_minibatches=2,
               update_epochs=1, gamma=0.9, gae_lambda=0.5, clip_obs=5.0, clip_reward=0.5, eval_episodes=0,
               save_model=False))
    (rollout, critic), = seen
    rewards, values, next_value, final_values, terminations, dones, gamma, gae_lambda = gae_inputs[0]
    recording = recordings[0]
    ended = np.stack(recording.terminations), np.stack(recording.truncations)
    scaled = RewardScaler(3, 0.9, 0.5)(np.stack(recording.rewards), ended[0] | ended[1])
    assert np.abs(scaled).max() == 0.5  # the reward clip is reached
    np.testing.assert_allclose(rewards.numpy(), scaled, rtol=1e-6)
    np.testing.assert_array_equal(terminations.numpy(), ended[0])
    np.testing.assert_array_equal(dones.numpy(), ended[0] | ended[1])
    assert (gamma, gae_lambda) == (0.9, 0.5)
    assert rollout["obs"].max().item() == 5.0
    for name, given in (("obs", values), ("next_obs", next_value), ("final_obs", final_values)):
        torch.testing.assert_close(given, critic[name], rtol=0, atol=0)


def test_the_policy_acts_on_each_stored_state_with_fresh_noise_for_every_step_and_env():
    """Bugs caught: one ε reused for every step or env, or the policy given the raw observation while the normalized
    one is stored (log π_old is computed later from the stored one). Each stored action must be μ(stored s_t) + σ ε
    with the ε drawn for that step and env: the rollout's draw is replayed from the same seed. Statistics far from
    Pendulum's and a last layer scaled up make μ differ between raw and normalized states."""
    envs = make_vector_env("Pendulum-v1", 2, "sync", False)
    obs_rms = RunningMeanStd((3,))
    obs_rms.mean, obs_rms.var = np.array([0.5, -0.5, 1.0]), np.array([4.0, 0.25, 9.0])
    agent = Agent(3, 1, init_logstd=0.0)
    with torch.no_grad():
        agent.actor_mean[-1].weight.mul_(100.0)
    raw_obs, _ = envs.reset(seed=0)
    episodes = {"return": np.zeros(2), "length": np.zeros(2, int)}
    torch.manual_seed(7)
    rollout, _, _ = collect_rollout(envs, agent, obs_rms, raw_obs, episodes, 16, 10.0, torch.device("cpu"))
    envs.close()
    torch.manual_seed(7)
    noise = torch.randn(16, 2, 1)
    with torch.no_grad():
        expected = agent.act(torch.as_tensor(rollout["obs"]), noise)
    torch.testing.assert_close(torch.as_tensor(rollout["actions"]), expected)


def test_statistics_absorb_every_step_after_each_rollout(tmp_path, monkeypatch):
    """Bug caught: the observation statistics never updated. After 2 rollouts of 2 envs x 128 steps they hold
    exactly the 512 observations the envs returned (count 512 + the 1e-4 prior)."""
    monkeypatch.chdir(tmp_path)
    recordings = []
    monkeypatch.setattr(ppo_continuous, "make_vector_env",
                        lambda *a: recordings.append(RecordingEnvs(make_vector_env(*a))) or recordings[-1].envs)
    run_dir, _ = train(Args(env_id="Pendulum-v1", total_timesteps=512, eval_episodes=0, **SMALL))
    statistics = load_checkpoint(f"{run_dir}/checkpoint.pt")["obs_rms"]
    seen = np.concatenate(recordings[0].step_obs)  # (512, 3)
    assert statistics["count"] == pytest.approx(512 + 1e-4)
    np.testing.assert_allclose(statistics["mean"].numpy(), seen.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(statistics["var"].numpy(), seen.var(0), rtol=1e-4)


def test_evaluation_only_reads_the_statistics():
    """Bug caught: evaluation updating the observation statistics."""
    obs_rms = RunningMeanStd((3,))
    obs_rms.mean, obs_rms.var, obs_rms.count = np.array([0.1, 0.2, 0.3]), np.array([1.0, 2.0, 3.0]), 50.0
    evaluate(Agent(3, 1), obs_rms, "Pendulum-v1", episodes=1, seed=0, clip_obs=10.0, rescale_actions=False)
    assert obs_rms.mean.tolist() == [0.1, 0.2, 0.3] and obs_rms.var.tolist() == [1.0, 2.0, 3.0] and obs_rms.count == 50


def record_loss_inputs(monkeypatch) -> tuple[list, list]:
    """Every ppo_loss call's keyword-free inputs, and every compute_gae result, in order."""
    losses, estimates = [], []

    def recording_loss(*inputs, **coefficients):
        losses.append([x.detach().clone() for x in inputs])
        return ppo_loss(*inputs, **coefficients)

    def recording_gae(*inputs):
        estimates.append(compute_gae(*inputs))
        return estimates[-1]

    monkeypatch.setattr(ppo_continuous, "ppo_loss", recording_loss)
    monkeypatch.setattr(ppo_continuous, "compute_gae", recording_gae)
    return losses, estimates


@pytest.mark.parametrize("norm_adv", [False, True])
def test_advantages_reach_the_loss_normalized_only_with_norm_adv(tmp_path, monkeypatch, norm_adv):
    """Bug caught: advantages normalized although --norm-adv is off (or not normalized when it is on)."""
    monkeypatch.chdir(tmp_path)
    losses, estimates = record_loss_inputs(monkeypatch)
    train(Args(env_id="Pendulum-v1", total_timesteps=256, eval_episodes=0, save_model=False, norm_adv=norm_adv,
               **{**SMALL, "update_epochs": 1}))
    minibatch_advantages = [inputs[2] for inputs in losses]  # 4 minibatches of 64
    if norm_adv:
        for advantages in minibatch_advantages:  # mean 0, std 1 within each minibatch
            assert advantages.mean().item() == pytest.approx(0.0, abs=1e-5)
            assert advantages.std().item() == pytest.approx(1.0, abs=1e-4)
    else:  # the GAE estimates themselves, shuffled: the same 256 numbers
        gae_advantages = estimates[0][0].flatten().sort().values
        torch.testing.assert_close(torch.cat(minibatch_advantages).sort().values, gae_advantages, rtol=0, atol=0)
        assert abs(gae_advantages.std().item() - 1) > 0.1  # not unit-scaled by chance, so normalizing would show


def test_first_minibatch_scores_pi_old_and_v_old_of_its_own_samples(tmp_path, monkeypatch):
    """Bug caught: log π_old (or V_old) not shuffled with the rest of the batch. Before the first Adam step
    π_θ = π_old and V_φ = V_old, so on the first minibatch r_t(θ) = 1 and V = V_old, sample by sample."""
    monkeypatch.chdir(tmp_path)
    losses, _ = record_loss_inputs(monkeypatch)
    train(Args(env_id="Pendulum-v1", total_timesteps=256, eval_episodes=0, save_model=False, **SMALL))
    new_logprob, old_logprob, _, new_value, old_value, _, _ = losses[0]
    assert old_logprob.std() > 0.1 and old_value.std() > 1e-3  # a misalignment would show
    torch.testing.assert_close(new_logprob, old_logprob, rtol=0, atol=1e-5)
    torch.testing.assert_close(new_value, old_value, rtol=0, atol=1e-5)


def test_gradient_norm_is_clipped_before_every_adam_step(tmp_path, monkeypatch):
    """Bug caught: gradient-norm clipping removed. With --max-grad-norm 0.001 every step's global norm is 0.001."""
    monkeypatch.chdir(tmp_path)
    norms = []

    def record_norm(optimizer, args, kwargs):
        gradients = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gradients])).item())

    handle = register_optimizer_step_pre_hook(record_norm)
    try:
        train(Args(env_id="Pendulum-v1", total_timesteps=256, eval_episodes=0, save_model=False, max_grad_norm=1e-3,
                   **SMALL))
    finally:
        handle.remove()
    assert len(norms) == 2 * 4  # epochs x minibatches
    assert norms == pytest.approx([1e-3] * len(norms), rel=1e-3)


def report_kls(monkeypatch, kls: list[float]) -> None:
    """Make the k-th ppo_loss call report kls[k] as its approximate KL (the loss itself is untouched)."""
    reported = iter(kls)

    def loss_with_set_kl(*inputs, **coefficients):
        loss, stats = ppo_loss(*inputs, **coefficients)
        return loss, {**stats, "approx_kl": torch.tensor(next(reported))}

    monkeypatch.setattr(ppo_continuous, "ppo_loss", loss_with_set_kl)


@pytest.mark.parametrize(
    "reported_kls",
    [pytest.param([0.0, 0.0, 0.0, 0.05] + [0.03] * 4, id="not the last minibatch's: epoch 1 ends on 0.05"),
     pytest.param([0.0] * 4 + [0.03] * 4, id="not the mean since the update began: 0.015 after epoch 2")],
)
def test_target_kl_ends_the_update_after_the_first_epoch_whose_mean_kl_exceeds_it(tmp_path, monkeypatch, reported_kls):
    """Bugs caught: the stop read on the last minibatch's KL, or on the mean of every minibatch since the update began,
    instead of the epoch's own mean. The approximate KL reported per minibatch is set, against a target of 0.02:
    epoch 1 (0, 0, 0, 0.05): mean 0.0125, or (0, 0, 0, 0): mean 0; epoch 2 (0.03 x 4): mean 0.03 > 0.02, so both
    updates stop after epoch 2. A last-minibatch rule would stop the first after epoch 1 (0.05); a mean since the
    start would not stop the second after epoch 2 ((0 x 4 + 0.03 x 4) / 8 = 0.015)."""
    monkeypatch.chdir(tmp_path)
    report_kls(monkeypatch, reported_kls + [0.03] * 100)
    run_dir, _ = train(Args(env_id="Pendulum-v1", total_timesteps=256, eval_episodes=0, save_model=False,
                            **{**SMALL, "update_epochs": 5, "target_kl": 0.02}))
    assert scalars(run_dir, "charts/epochs_run") == [2]


def test_lr_kl_target_divides_or_multiplies_the_step_size_by_1_5_and_the_schedule_caps_it(tmp_path, monkeypatch):
    """Each update's KL (its last epoch's mean) is set to 0.05, 0.001, 0.001, 0.05, 0.01 against --lr-kl-target 0.01:
    above 2 x 0.01 the factor is divided by 1.5, below 0.01 / 2 multiplied by 1.5 but never past 1, in between kept.
    Factors used by iterations 1-6: 1, 1/1.5, 1 (2/3 x 1.5), 1 (capped), 1/1.5, 1/1.5; the schedule anneals from 1
    by 1/6 per iteration, so the step sizes are 2e-3 x (1, 5/6 / 1.5, 4/6, 3/6, 2/6 / 1.5, 1/6 / 1.5)."""
    monkeypatch.chdir(tmp_path)
    update_kls = [0.05, 0.001, 0.001, 0.05, 0.01, 0.01, 0.01]
    minibatches_per_update = SMALL["update_epochs"] * SMALL["num_minibatches"]
    report_kls(monkeypatch, [kl for kl in update_kls for _ in range(minibatches_per_update)])
    run_dir, _ = train(Args(env_id="Pendulum-v1", total_timesteps=6 * 256, eval_episodes=0, learning_rate=2e-3,
                            lr_kl_target=0.01, **SMALL))
    expected = [2e-3 * x for x in (1, 5 / 6 / 1.5, 4 / 6, 3 / 6, 2 / 6 / 1.5, 1 / 6 / 1.5)]
    assert scalars(run_dir, "charts/learning_rate") == pytest.approx(expected, rel=1e-6)
    path = os.path.join(run_dir, "checkpoint.pt")
    checkpoint = load_checkpoint(path)
    assert checkpoint["lr_scale"] == pytest.approx(1 / 1.5)
    # resumed to 7 iterations, iteration 7 goes on with the saved factor: 2e-3 x (1 - 6/7) / 1.5
    resumed = resume_args(Args(resume=path, total_timesteps=7 * 256), checkpoint, {"resume", "total_timesteps"})
    train(resumed, checkpoint, run_dir)
    assert scalars(run_dir, "charts/learning_rate")[-1] == pytest.approx(2e-3 / 7 / 1.5, rel=1e-6)


@pytest.mark.parametrize("anneal", [True, False])
def test_entropy_weight_decays_linearly_to_zero_only_with_anneal_ent_coef(tmp_path, monkeypatch, anneal):
    """Bug caught: c2 left constant (or decayed although --no-anneal-ent-coef), or following the step size's schedule
    (here the opposite setting) instead of its own. 4 iterations of c2 = 0.01: iteration k of K = 4 uses
    0.01 x (1 - (k-1)/4) = 0.01, 0.0075, 0.005, 0.0025, in every minibatch of its update (2 epochs x 4)."""
    monkeypatch.chdir(tmp_path)
    used = []
    monkeypatch.setattr(ppo_continuous, "ppo_loss", lambda *inputs, **coefficients:
                        used.append(coefficients["ent_coef"]) or ppo_loss(*inputs, **coefficients))
    train(Args(env_id="Pendulum-v1", total_timesteps=4 * 256, eval_episodes=0, save_model=False, ent_coef=0.01,
               anneal_ent_coef=anneal, anneal_lr=not anneal, **SMALL))
    per_update = [0.01, 0.0075, 0.005, 0.0025] if anneal else [0.01] * 4
    assert used == pytest.approx([c for c in per_update for _ in range(8)], rel=1e-12)


def test_logged_explained_variance_is_one_minus_unexplained_over_total(tmp_path, monkeypatch):
    """explained variance = 1 - Var(R - V) / Var(R), and R - V = Â, so 1 - Var(Â) / Var(R) of the update's batch."""
    monkeypatch.chdir(tmp_path)
    _, estimates = record_loss_inputs(monkeypatch)
    run_dir, _ = train(Args(env_id="Pendulum-v1", total_timesteps=256, eval_episodes=0, **SMALL))
    advantages, returns = estimates[0]
    expected = 1 - advantages.var().item() / returns.var().item()
    assert scalars(run_dir, "losses/explained_variance") == pytest.approx([expected], rel=1e-5)


def test_default_device_is_the_cpu_even_with_a_gpu_visible(monkeypatch):
    """Bug caught: the default picking a visible GPU, which is slower for these networks (issue #13)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert ppo_continuous.pick_device(Args().cuda) == torch.device("cpu")
    assert ppo_continuous.pick_device(True) == torch.device("cuda", 3)  # --cuda: the GPU of this torchrun rank


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (issue #13's check on a GPU machine)")
def test_cuda_run_samples_fresh_noise_and_its_checkpoint_evaluates_and_resumes_on_either_device(tmp_path, monkeypatch):
    """Bugs caught: a CUDA tensor handed to NumPy, the same noise drawn every step, a checkpoint that only a GPU can
    read or resume, --eval-checkpoint ignoring --cuda, and a CPU run starting CUDA (as saving every GPU's RNG did)."""
    monkeypatch.chdir(tmp_path)
    noise, log_prob = [], Agent.log_prob

    def recording_log_prob(agent, obs, actions):
        if not noise:  # the first call scores the first rollout with π_old, which acted: ε_t = (a_t - μ(s_t)) / σ
            noise.append(((actions - agent.actor_mean(obs)) / agent.actor_logstd.exp()).detach().cpu())
        return log_prob(agent, obs, actions)

    monkeypatch.setattr(Agent, "log_prob", recording_log_prob)
    run_dir, eval_returns = train(Args(env_id="Pendulum-v1", total_timesteps=512, cuda=True, eval_episodes=2, **SMALL))
    # 256 draws of ε ~ N(0, 1), not one draw repeated: standard errors 1/sqrt(256) = 0.0625 for the mean and
    # 1/sqrt(2 x 256) = 0.044 for the std; 5 of them allow 0.31 and 0.22
    assert abs(noise[0].mean().item()) < 0.31 and noise[0].std().item() == pytest.approx(1.0, abs=0.22)
    checkpoint_path = f"{run_dir}/checkpoint.pt"
    on_gpu = run_script("--eval-checkpoint", checkpoint_path, "--eval-episodes", "2", "--cuda")
    assert on_gpu.returncode == 0, on_gpu.stderr
    # the same device and kernels: the very returns of the in-memory evaluation
    assert f"return {np.mean(eval_returns):.1f} ± {np.std(eval_returns):.1f} over 2 episodes" in on_gpu.stdout
    # across devices float32 results differ in the last bits (other kernels, other summation order): 1e-5 absolute
    checkpoint = load_checkpoint(checkpoint_path)
    obs = torch.randn(64, 3)
    cpu_agent, _ = load_policy(checkpoint, "Pendulum-v1", torch.device("cpu"))
    gpu_agent, _ = load_policy(checkpoint, "Pendulum-v1", torch.device("cuda"))
    torch.testing.assert_close(gpu_agent.actor_mean(obs.cuda()).cpu(), cpu_agent.actor_mean(obs), atol=1e-5, rtol=0)
    resumed = run_script("--resume", checkpoint_path, "--total-timesteps", "1024", "--no-cuda", "--eval-episodes", "0")
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(checkpoint_path)["cuda_rng"] == []  # saved by the CPU run
    cpu_run = subprocess.run([sys.executable, "-c", "import torch, ppo_continuous as p; p.train(p.Args("
                              "env_id='Pendulum-v1', total_timesteps=256, num_envs=2, num_steps=128, eval_episodes=0));"
                              "print(torch.cuda.is_initialized())"], capture_output=True, text=True,
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": with_repo_on_path()})
    assert cpu_run.returncode == 0, cpu_run.stderr
    assert cpu_run.stdout.split()[-1] == "False"


def test_progress_line_shows_the_time_left():
    # 4,000 steps left at 100 steps/s = 40 s -> "0:40"; 130,000 left at 1,000 steps/s = 130 s -> "2:10"
    assert progress_line(1_000, 5_000, 100, deque([1.0, 3.0])) == (
        "step     1,000/5,000 | 100 SPS | 0:40 left | return 2.0 over last 2 episodes")
    assert "| 2:10 left | return none yet" in progress_line(20_000, 150_000, 1_000, deque())


def test_gae_is_fed_the_state_after_the_rollout_normalized_with_the_rollouts_statistics(tmp_path, monkeypatch):
    """Bugs caught: V(s_T) taken of the rollout's last stored state instead of the one after it, of the raw state, or
    of s_T normalized with the statistics that already absorbed the rollout. Over two iterations, next_obs must be the
    envs' last returned observation normalized with the statistics the rollout itself used."""
    monkeypatch.chdir(tmp_path)
    recordings, used_statistics, fed = [], [], []
    monkeypatch.setattr(ppo_continuous, "make_vector_env",
                        lambda *a: recordings.append(RecordingEnvs(make_vector_env(*a))) or recordings[-1].envs)

    def recording_rollout(envs, agent, obs_rms, *rest):
        used_statistics.append((obs_rms.mean.copy(), obs_rms.var.copy()))
        return collect_rollout(envs, agent, obs_rms, *rest)

    def recording_advantages(agent, rollout, *rest):
        fed.append(rollout["next_obs"].clone())
        return advantages_now(agent, rollout, *rest)

    monkeypatch.setattr(ppo_continuous, "collect_rollout", recording_rollout)
    monkeypatch.setattr(ppo_continuous, "advantages_now", recording_advantages)
    train(Args(env_id="Pendulum-v1", total_timesteps=512, eval_episodes=0, save_model=False, **SMALL))
    statistics = RunningMeanStd((3,))
    for iteration, ((mean, var), next_obs) in enumerate(zip(used_statistics, fed[:: SMALL["update_epochs"]])):
        statistics.mean, statistics.var = mean, var
        last_raw = recordings[0].step_obs[(iteration + 1) * SMALL["num_steps"] - 1]  # s_T of this rollout, raw
        expected = normalize_obs(last_raw, statistics, 10.0)
        np.testing.assert_allclose(next_obs.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(used_statistics[1][0], 0)  # the second rollout's statistics moved: the check has teeth


def test_training_restarts_the_scaled_return_at_time_limits_and_carries_it_across_rollouts(tmp_path, monkeypatch):
    """Bugs caught: the reward scaler told only of terminations (Pendulum never terminates, it is cut at 200
    steps), or handed a fresh G each rollout. One env, 2 rollouts of 128 steps: the scaler sees the time-limit end
    at step 199, which falls in the second rollout (its step 71), and keeps one G across both calls."""
    monkeypatch.chdir(tmp_path)
    calls, scale = [], RewardScaler.__call__

    def recording_call(scaler, rewards, dones):
        calls.append((id(scaler), dones.copy(), scaler.returns.copy()))
        return scale(scaler, rewards, dones)

    monkeypatch.setattr(RewardScaler, "__call__", recording_call)
    train(Args(env_id="Pendulum-v1", total_timesteps=256, eval_episodes=0, save_model=False,
               **{**SMALL, "num_envs": 1, "num_minibatches": 2}))
    (first_id, first_dones, first_g), (second_id, second_dones, second_g) = calls
    assert first_id == second_id and not first_dones.any() and second_dones[:, 0].nonzero()[0].tolist() == [71]
    assert first_g.tolist() == [0.0] and second_g[0] != 0.0  # the second rollout starts from the first one's G


class RecordingAgent(Agent):
    """An Agent that registers itself, so a test can reach the live parameters that train() optimizes."""

    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingAgent.made.append(self)


def test_each_adam_step_uses_the_gradient_of_its_own_minibatch_alone(tmp_path, monkeypatch):
    """Bug caught: gradients accumulating across minibatches (no zero_grad) or epochs. The gradient each Adam step
    applies equals the gradient of that minibatch's loss alone, taken from the graph before backward() (clipping is
    set out of reach)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ppo_continuous, "Agent", RecordingAgent)
    expected, applied = [], []

    def loss_and_its_gradient(*inputs, **coefficients):
        loss, stats = ppo_loss(*inputs, **coefficients)
        parameters = list(RecordingAgent.made[-1].parameters())
        expected.append(torch.autograd.grad(loss, parameters, retain_graph=True))
        return loss, stats

    def record_gradient(optimizer, args, kwargs):
        applied.append([p.grad.clone() for group in optimizer.param_groups for p in group["params"]])

    monkeypatch.setattr(ppo_continuous, "ppo_loss", loss_and_its_gradient)
    handle = register_optimizer_step_pre_hook(record_gradient)
    try:
        train(Args(env_id="Pendulum-v1", total_timesteps=256, eval_episodes=0, save_model=False, max_grad_norm=1e9,
                   **SMALL))
    finally:
        handle.remove()
    assert len(applied) == len(expected) == 2 * 4  # epochs x minibatches
    for step_gradients, loss_gradients in zip(applied, expected):
        for gradient, alone in zip(step_gradients, loss_gradients):
            torch.testing.assert_close(gradient, alone)


def test_each_epoch_reshuffles_the_whole_batch(tmp_path, monkeypatch):
    """Bugs caught: one shuffle reused by every epoch, samples drawn with replacement, or a minibatch left out.
    Each epoch's four minibatches hold every sample of the batch once (the multiset of log π_old is the batch's),
    and epoch 2 orders them differently from epoch 1."""
    monkeypatch.chdir(tmp_path)
    losses, _ = record_loss_inputs(monkeypatch)
    train(Args(env_id="Pendulum-v1", total_timesteps=256, eval_episodes=0, save_model=False, **SMALL))
    epochs = [torch.cat([inputs[1] for inputs in losses[epoch * 4 : epoch * 4 + 4]]) for epoch in (0, 1)]
    for epoch in epochs:
        assert len(epoch) == 256
        torch.testing.assert_close(epoch.sort().values, epochs[0].sort().values, rtol=0, atol=0)
    assert len(epochs[0].unique()) > 250  # distinct samples, so a sample drawn twice would show
    assert not torch.equal(epochs[0], epochs[1])


def test_each_logged_episode_is_that_episodes_own_return_and_length(tmp_path, monkeypatch):
    """Bugs caught: an episode logged with the running sums after they were reset (0), with the next episode's
    first reward in it, with a length off by one, or at the wrong step. Two Pendulum envs, 512 steps each: both
    episodes of each env end at steps 200 and 400 of that env, that is at global steps 400 and 800."""
    monkeypatch.chdir(tmp_path)
    recordings = []
    monkeypatch.setattr(ppo_continuous, "make_vector_env",
                        lambda *a: recordings.append(RecordingEnvs(make_vector_env(*a))) or recordings[-1].envs)
    run_dir, _ = train(Args(env_id="Pendulum-v1", total_timesteps=1024, eval_episodes=0, save_model=False, **SMALL))
    rewards = np.stack(recordings[0].rewards)  # (512, 2)
    episode_sums = [rewards[start:start + 200, env].sum() for start in (0, 200) for env in (0, 1)]
    accumulator = EventAccumulator(run_dir)
    accumulator.Reload()
    logged = accumulator.Scalars("charts/episodic_return")
    assert [event.step for event in logged] == [400, 400, 800, 800]
    np.testing.assert_allclose([event.value for event in logged], episode_sums, rtol=1e-5)
    assert [event.value for event in accumulator.Scalars("charts/episodic_length")] == [200] * 4


def test_evaluation_takes_the_mean_action_unless_asked_to_sample(pendulum_run, tmp_path, monkeypatch):
    """Bug caught: evaluation sampling actions by default (after training or with --eval-checkpoint), so that a
    checkpoint's return is noisy and lower than its policy's. The noise handed to Agent.act is 0 in every step,
    and not with --eval-stochastic."""
    monkeypatch.chdir(tmp_path)
    noises, act = [], Agent.act
    monkeypatch.setattr(Agent, "act", lambda agent, obs, noise: noises.append(noise.clone()) or act(agent, obs, noise))
    monkeypatch.setattr(ppo_continuous, "evaluate", lambda *a, **k: (noises.clear(), evaluate(*a, **k))[1])
    train(Args(env_id="Pendulum-v1", total_timesteps=256, eval_episodes=1, save_model=False, **SMALL))
    assert len(noises) == 200 and all(not noise.any() for noise in noises)
    monkeypatch.setenv("MUJOCO_GL", "egl")  # main() sets it for its process: put it back afterwards
    for sampled in (False, True):
        noises.clear()
        monkeypatch.setattr(sys, "argv", ["ppo_continuous.py", "--eval-checkpoint", f"{pendulum_run[0]}/checkpoint.pt",
                                          "--eval-episodes", "1", *(["--eval-stochastic"] if sampled else [])])
        ppo_continuous.main()
        assert len(noises) == 200 and all(noise.any() == sampled for noise in noises)


@pytest.mark.parametrize(
    "name, value",
    [("gamma", 0.0), ("gamma", 1.0), ("gae_lambda", 0.0), ("gae_lambda", 1.0), ("ent_coef", 0.0), ("vf_coef", 0.0),
     ("seed", 0), ("seed", 2**32 - 1), ("init_logstd", -20.0), ("init_logstd", 20.0), ("checkpoint_every", 0),
     ("eval_episodes", 0), ("target_kl", None), ("lr_kl_target", None), ("total_timesteps", 2048),
     ("learning_rate", 1e-12), ("exp_name", "a.b-c_d")],
)
def test_the_edges_of_every_option_domain_are_accepted(name, value):
    """Bug caught: a domain closed where it should be open (γ = 0 or 1 refused, c2 = 0 refused, the last seed, one
    rollout of training). Each value is valid and must pass validation."""
    validate(Args(**{name: value}))


def test_steps_per_second_and_time_left_after_a_resume(tmp_path, monkeypatch, capsys):
    """Bug caught: a resumed run counting the steps of earlier sessions in its speed (and so its time left). The
    script's clock is replaced by one that advances 1 s per reading, so a fresh run's first iteration and a resumed
    run's first iteration take the same time, and must show the same steps/s: 256 steps over the same readings."""
    monkeypatch.chdir(tmp_path)
    clock = iter(range(1_000_000, 2_000_000))
    monkeypatch.setattr(ppo_continuous, "time", type("Clock", (), {"time": staticmethod(lambda: next(clock))}))
    args = Args(env_id="Pendulum-v1", total_timesteps=512, eval_episodes=0, **SMALL)
    run_dir, _ = train(args)
    fresh_sps = scalars(run_dir, "charts/SPS")[0]
    capsys.readouterr()
    checkpoint = load_checkpoint(f"{run_dir}/checkpoint.pt")
    extended = resume_args(Args(resume="x", total_timesteps=1024), checkpoint, {"resume", "total_timesteps"})
    train(extended, checkpoint, run_dir)
    resumed_sps = scalars(run_dir, "charts/SPS")[2]
    assert resumed_sps == fresh_sps > 0
    # the first line of the resumed session: step 768 of 1,024, 256 steps left at fresh_sps steps/s
    minutes, seconds = divmod(round(256 / fresh_sps), 60)
    assert f"step       768/1,024 | {int(fresh_sps)} SPS | {minutes}:{seconds:02d} left" in capsys.readouterr().out


def test_a_resumed_run_continues_the_random_state_it_was_saved_with(tmp_path, monkeypatch):
    """Bug caught: a resumed run drawing its noise and shuffles from a freshly seeded generator (a repeat of the first
    session's draws) instead of where the checkpoint left off. With every epoch run (no KL stop), each iteration
    draws the same amount, so the state at the start of iteration 3 is the same straight through and resumed."""
    monkeypatch.chdir(tmp_path)
    states = []
    monkeypatch.setattr(ppo_continuous, "collect_rollout",
                        lambda *a: states.append(torch.get_rng_state()) or collect_rollout(*a))
    run_dir, _ = train(Args(env_id="Pendulum-v1", total_timesteps=4 * 256, checkpoint_every=2, eval_episodes=0,
                            **SMALL))
    straight = states[:]
    # the same run stopped after 2 iterations (its schedule planned for 2), then extended to 4
    run_dir, _ = train(Args(env_id="Pendulum-v1", total_timesteps=2 * 256, eval_episodes=0, exp_name="half", **SMALL))
    halfway = load_checkpoint(f"{run_dir}/checkpoint.pt")
    states.clear()
    resumed = resume_args(Args(resume="x", total_timesteps=4 * 256), halfway, {"resume", "total_timesteps"})
    train(resumed, halfway, run_dir)
    assert len(states) == 2 and torch.equal(states[0], straight[2]) and torch.equal(states[1], straight[3])
    assert not torch.equal(straight[0], straight[2])  # the state does move from iteration to iteration

def test_lr_kl_target_follows_the_last_epochs_mean_kl_not_the_whole_updates(tmp_path, monkeypatch):
    """Bug caught: the step size adapted to the mean KL of the whole update instead of its last epoch's. One update
    of 2 epochs x 4 minibatches reports KL 0 in epoch 1 and 0.03 in epoch 2, against --lr-kl-target 0.01: the last
    epoch's 0.03 > 2 x 0.01 divides the factor by 1.5; the update's mean (0 x 4 + 0.03 x 4) / 8 = 0.015 lies
    inside [0.005, 0.02] and would keep it at 1."""
    monkeypatch.chdir(tmp_path)
    report_kls(monkeypatch, [0.0] * 4 + [0.03] * 4)
    run_dir, _ = train(Args(env_id="Pendulum-v1", total_timesteps=256, eval_episodes=0, lr_kl_target=0.01, **SMALL))
    assert load_checkpoint(f"{run_dir}/checkpoint.pt")["lr_scale"] == pytest.approx(1 / 1.5)


def test_a_resumed_run_starts_its_episodes_from_seeds_of_its_own(tmp_path, monkeypatch):
    """Bug caught: a resumed session resetting its envs with the first session's seed, which replays the first
    session's initial states. Seed 3: the fresh run resets with 3 (its envs 3, 4); resumed at step 512 it resets with
    3 + 512 = 515."""
    monkeypatch.chdir(tmp_path)
    seeds = []

    def recording_envs(*args):
        envs = make_vector_env(*args)
        reset = envs.reset
        envs.reset = lambda **kwargs: seeds.append(kwargs.get("seed")) or reset(**kwargs)
        return envs

    monkeypatch.setattr(ppo_continuous, "make_vector_env", recording_envs)
    run_dir, _ = train(Args(env_id="Pendulum-v1", total_timesteps=512, seed=3, eval_episodes=0, **SMALL))
    checkpoint = load_checkpoint(f"{run_dir}/checkpoint.pt")
    train(resume_args(Args(resume="x", total_timesteps=768), checkpoint, {"resume", "total_timesteps"}), checkpoint,
          run_dir)
    assert seeds == [3, 515]


# ==== 2b. Whole runs: the lifecycle (checkpoints, evaluation, resume, signals, reliability) ===========
# ---- Checkpoints, evaluation, resume, interruption ----------------------------------------------------
@pytest.fixture(scope="module")
def pendulum_run(tmp_path_factory):
    """A finished 2-iteration Pendulum run: (run directory, returns of its final evaluation)."""
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("pendulum"))
    try:
        run_dir, eval_returns = train(Args(env_id="Pendulum-v1", total_timesteps=512, eval_episodes=2, **SMALL))
        return os.path.abspath(run_dir), eval_returns
    finally:
        os.chdir(cwd)


def test_checkpoint_round_trip_restores_everything(tmp_path):
    agent = Agent(obs_dim=3, action_dim=2)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3)
    agent.value(torch.ones(4, 3)).sum().backward()
    optimizer.step()  # gives Adam moment estimates to restore
    obs_rms, scaler = RunningMeanStd((3,)), RewardScaler(2, 0.99, 10.0)
    obs_rms.update(np.arange(12.0).reshape(4, 3))
    scaler(np.array([[1.0, -2.0]]), np.zeros((1, 2), bool))
    path = str(tmp_path / "checkpoint.pt")
    state = training_state(Args(), agent, optimizer, obs_rms, scaler, global_step=4096, lr_scale=1.0)
    save_checkpoint(path, state)
    assert not os.path.exists(path + ".tmp")  # written aside, then renamed into place

    loaded = load_checkpoint(path)
    fresh_agent = Agent(obs_dim=3, action_dim=2)
    fresh_agent.load_state_dict(loaded["agent"])
    fresh_optimizer = torch.optim.Adam(fresh_agent.parameters(), lr=1e-3)
    fresh_optimizer.load_state_dict(loaded["optimizer"])
    for p, q in zip(agent.parameters(), fresh_agent.parameters()):
        assert torch.equal(p, q)
    for state, fresh_state in zip(optimizer.state.values(), fresh_optimizer.state.values()):
        assert all(torch.equal(state[k], fresh_state[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    fresh_rms, fresh_return_rms = RunningMeanStd((3,)), RunningMeanStd()
    fresh_rms.load_state_dict(loaded["obs_rms"])
    fresh_return_rms.load_state_dict(loaded["return_rms"])
    np.testing.assert_array_equal(fresh_rms.mean, obs_rms.mean)
    np.testing.assert_array_equal(fresh_rms.var, obs_rms.var)
    assert fresh_rms.count == obs_rms.count
    assert fresh_return_rms.var == scaler.return_rms.var
    # 4,096 steps of 8 envs x 256 steps: 2 iterations
    assert (loaded["global_step"], loaded["iteration"], loaded["args"]["env_id"]) == (4096, 2, "HalfCheetah-v4")


def test_evaluating_checkpoint_reproduces_in_memory_evaluation(pendulum_run):
    run_dir, eval_returns = pendulum_run
    # the checkpoint (weights + frozen normalization) gives exactly the returns the trained agent got
    result = run_script("--eval-checkpoint", f"{run_dir}/checkpoint.pt", "--eval-episodes", "2")
    assert f"return {np.mean(eval_returns):.1f} ± {np.std(eval_returns):.1f} over 2 episodes" in result.stdout
    # and the end-of-training evaluation is logged
    assert scalars(run_dir, "eval/mean_return") == pytest.approx([np.mean(eval_returns)])


def test_network_widths_shape_their_own_network_and_their_checkpoint_evaluates_and_resumes(tmp_path, monkeypatch):
    """Bugs caught: --actor-width or --critic-width ignored by the training run, one applied to the other network, or
    forgotten when a checkpoint is evaluated or resumed (its weights would not fit 64-wide networks)."""
    monkeypatch.chdir(tmp_path)
    run_dir, _ = train(Args(env_id="Pendulum-v1", total_timesteps=256, actor_width=8, critic_width=16, eval_episodes=0,
                            **SMALL))
    weights = load_checkpoint(f"{run_dir}/checkpoint.pt")["agent"]
    assert [tuple(weights[f"critic.{i}.weight"].shape) for i in (0, 2, 4)] == [(16, 3), (16, 16), (1, 16)]
    assert [tuple(weights[f"actor_mean.{i}.weight"].shape) for i in (0, 2, 4)] == [(8, 3), (8, 8), (1, 8)]
    result = run_script("--eval-checkpoint", f"{run_dir}/checkpoint.pt", "--eval-episodes", "1")
    assert result.returncode == 0 and "over 1 episodes" in result.stdout, result.stderr
    result = run_script("--resume", f"{run_dir}/checkpoint.pt", "--total-timesteps", "512")
    assert result.returncode == 0, result.stderr


def test_resume_continues_schedule_and_statistics(tmp_path, monkeypatch):
    """4 iterations straight vs 2 + resumed 2. The parameters cannot match: the environments' inner state
    (MuJoCo/physics state, episode step counters, the envs' RNGs) is not in the checkpoint, so the resumed
    run starts fresh episodes and sees other data. What must match is the strongest thing that holds:
    step counter, iteration, learning-rate schedule, Adam's step count, and how many samples the
    normalization statistics have absorbed."""
    monkeypatch.chdir(tmp_path)
    saved = {}

    def save_and_keep_copy(path, state):
        save_checkpoint(path, state)
        saved[state["iteration"]] = str(shutil.copy(path, tmp_path / f"iteration{state['iteration']}.pt"))

    monkeypatch.setattr(ppo_continuous, "save_checkpoint", save_and_keep_copy)
    args = Args(env_id="Pendulum-v1", total_timesteps=4 * 256, checkpoint_every=2, eval_episodes=0, **SMALL)
    run_dir, _ = train(args)
    straight, halfway = load_checkpoint(saved[4]), load_checkpoint(saved[2])
    assert halfway["global_step"] == 512

    resumed_args = resume_args(Args(resume=saved[2], eval_episodes=0), halfway, given={"resume", "eval_episodes"})
    train(resumed_args, halfway, run_dir)
    resumed = load_checkpoint(f"{run_dir}/checkpoint.pt")
    position = lambda c: (c["global_step"], c["iteration"])  # noqa: E731
    assert position(resumed) == position(straight) == (1024, 4)
    lr = lambda c: c["optimizer"]["param_groups"][0]["lr"]  # noqa: E731
    # iteration 4 of 4 anneals to lr * (1 - 3/4)
    assert lr(resumed) == lr(straight) == pytest.approx(args.learning_rate * (1 - 3 / 4))
    adam_steps = lambda c: c["optimizer"]["state"][0]["step"].item()  # noqa: E731
    assert adam_steps(resumed) == adam_steps(straight) == 4 * 2 * 4  # iterations * epochs * minibatches
    assert resumed["obs_rms"]["count"] == pytest.approx(straight["obs_rms"]["count"])
    assert resumed["return_rms"]["count"] == pytest.approx(straight["return_rms"]["count"])
    assert not torch.equal(resumed["agent"]["actor_logstd"], halfway["agent"]["actor_logstd"])  # it did train on


def test_resume_rejects_other_env_id(pendulum_run):
    result = run_script("--resume", f"{pendulum_run[0]}/checkpoint.pt", "--env-id", "MountainCarContinuous-v0")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--env-id MountainCarContinuous-v0 differs from the checkpoint's Pendulum-v1" in result.stderr

def test_adam_steps_with_eps_1e_5(pendulum_run):
    """Bug caught: Adam's ε left at torch's 1e-8 (PPO's reference implementations use 1e-5, which damps the first
    steps of parameters with tiny second moments, such as log σ)."""
    assert load_checkpoint(f"{pendulum_run[0]}/checkpoint.pt")["optimizer"]["param_groups"][0]["eps"] == 1e-5


def test_bad_checkpoints_exit_with_one_line_message(pendulum_run, tmp_path):
    good = Path(pendulum_run[0]) / "checkpoint.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    cases = [
        (["--eval-checkpoint", str(tmp_path / "missing.pt")], "does not exist"),
        (["--eval-checkpoint", str(truncated)], "is not a readable checkpoint"),
        (["--resume", str(text)], "is not a readable checkpoint"),
        (["--eval-checkpoint", str(foreign)], "is not a ppo_continuous/1 checkpoint"),
        # Pendulum has 3 observations; MountainCarContinuous has 2
        (["--eval-checkpoint", str(good), "--env-id", "MountainCarContinuous-v0"],
         "trained with 3 observations and 1 actions"),
    ]
    for cli_args, message in cases:
        result = run_script(*cli_args)
        assert result.returncode != 0, cli_args
        assert message in result.stderr, (cli_args, result.stderr)
        assert "Traceback" not in result.stderr


def process_group_members(pgid: int) -> list[int]:
    members = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(Path(stat).parent.name))
    return members


@pytest.mark.parametrize(
    "signum, whole_group, save",
    [
        pytest.param(signal.SIGINT, True, [], id="Ctrl-C: SIGINT to the whole process group"),
        pytest.param(signal.SIGTERM, True, [], id="scancel, systemd: SIGTERM to every process of the job"),
        pytest.param(signal.SIGTERM, False, [], id="kill <pid>, Kubernetes: SIGTERM to the main process"),
        pytest.param(signal.SIGTERM, False, ["--no-save-model"], id="--no-save-model: a stopped run is still saved"),
    ],
)
def test_stop_signal_saves_checkpoint_and_leaves_no_workers(tmp_path, signum, whole_group, save):
    """Bugs caught: SIGTERM ending the run at once (no checkpoint, BrokenPipe tracebacks from the async workers); a
    stopped run left unsaved because --no-save-model was given (it is about the end of training, not a stop)."""
    process = subprocess.Popen(
        [sys.executable, SCRIPT, "--env-id", "Pendulum-v1", "--vector-mode", "async", "--num-envs", "2",
         "--num-steps", "64", "--num-minibatches", "2", "--update-epochs", "1", "--total-timesteps", "100000000",
         "--checkpoint-every", "1", *save],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    wait_until(lambda: glob.glob(f"{tmp_path}/runs/*/checkpoint.pt"), process, "the first iteration's checkpoint")
    assert len(process_group_members(process.pid)) >= 3  # the script and its two workers
    if whole_group:
        os.killpg(process.pid, signum)
    else:
        os.kill(process.pid, signum)
    stdout, stderr = process.communicate(timeout=900)
    assert process.returncode == 128 + signum, stderr
    assert f"stopped by {signal.Signals(signum).name}" in stdout and "checkpoint of step" in stdout
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr
    checkpoint = load_checkpoint(glob.glob(f"{tmp_path}/runs/*/checkpoint.pt")[0])
    assert checkpoint["global_step"] == checkpoint["iteration"] * 2 * 64 > 0
    time.sleep(0.5)
    assert process_group_members(process.pid) == []


class BrokenAfter100Steps(gym.Wrapper):
    """Pendulum whose rewards turn to NaN (or observations to +inf) after 100 steps, to trip the guards."""

    def __init__(self, broken="reward"):
        super().__init__(gym.make("Pendulum-v1"))
        self.broken, self.steps = broken, 0

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        if self.steps > 100:
            obs, reward = (np.full(3, np.inf), reward) if self.broken == "observations" else (obs, float("nan"))
        return obs, reward, terminated, truncated, info


def test_non_finite_loss_stops_with_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    gym.register("NaNPendulum-v0", entry_point=BrokenAfter100Steps)
    with pytest.raises(SystemExit, match="non-finite at iteration 1 \\(step 256\\); no checkpoint was written"):
        train(Args(env_id="NaNPendulum-v0", total_timesteps=1024, **SMALL))


def test_capture_video_records_evaluation(tmp_path):
    # A 20-step HalfCheetah keeps software rendering short.
    code = (
        "import sys, gymnasium as gym, ppo_continuous as p\n"
        "gym.register('ShortCheetah-v0', entry_point='gymnasium.envs.mujoco.half_cheetah_v4:HalfCheetahEnv',"
        " max_episode_steps=20)\n"
        "p.train(p.Args(env_id='ShortCheetah-v0', total_timesteps=256, num_envs=2, num_steps=128, num_minibatches=4,"
        " update_epochs=1, eval_episodes=2, capture_video=True))\n"
    )
    env = {**os.environ, "PYTHONPATH": with_repo_on_path()}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(glob.glob(f"{tmp_path}/runs/*/videos/eval-episode-*.mp4")) == 2


def test_capture_video_without_renderer_fails_before_training():
    pytest.importorskip("moviepy")
    if subprocess.run([sys.executable, "-c", "import pygame"], capture_output=True).returncode == 0:
        pytest.skip("pygame is installed, so Pendulum can render here")
    result = run_script("--env-id", "Pendulum-v1", "--capture-video")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--capture-video cannot render Pendulum-v1" in result.stderr


# ---- Reliability: signals, run directories, options as typed, resume, non-finite values, the disk -------------
def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    """Bug caught: two runs of a sweep sharing one directory (checkpoints overwritten, curves mixed)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)
    args = Args(env_id="Pendulum-v1")
    first, second, third = (make_run_dir(args, None) for _ in range(3))
    assert first == "runs/Pendulum-v1__ppo_continuous__1__1700000000"
    assert (second, third) == (f"{first}__2", f"{first}__3") and all(os.path.isdir(d) for d in (first, second, third))


def test_two_processes_started_together_write_two_runs(tmp_path):
    command = [sys.executable, SCRIPT, "--env-id", "Pendulum-v1", "--total-timesteps", "256", "--num-envs", "2",
               "--num-steps", "128", "--update-epochs", "1", "--eval-episodes", "0"]
    processes = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for _ in range(2)]
    assert [process.wait(timeout=900) for process in processes] == [0, 0]
    assert len(glob.glob(f"{tmp_path}/runs/*/checkpoint.pt")) == 2


def copy_of_run(pendulum_run, tmp_path) -> str:
    """The fixture's run copied under tmp_path/runs/, where a resume started in tmp_path writes."""
    run_dir = Path(pendulum_run[0])
    shutil.copytree(run_dir, tmp_path / "runs" / run_dir.name)
    return str(tmp_path / "runs" / run_dir.name / "checkpoint.pt")


@pytest.mark.parametrize(
    "cli_args, message",
    [  # each value typed is the default's, yet differs from the Pendulum checkpoint's
        (["--resume", "CK", "--env-id", "HalfCheetah-v4"], "--env-id HalfCheetah-v4 differs from the checkpoint's"),
        (["--resume", "CK", "--num-envs", "8"], "--num-envs 8 differs from the checkpoint's 2"),
        (["--eval-checkpoint", "CK", "--env-id", "HalfCheetah-v4"], "HalfCheetah-v4 has 17 and 6"),
    ],
)
def test_an_option_typed_with_its_default_value_counts(pendulum_run, cli_args, message):
    """Bug caught: options detected as 'differs from the default', so a typed default was silently ignored."""
    result = run_script(*[f"{pendulum_run[0]}/checkpoint.pt" if arg == "CK" else arg for arg in cli_args])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert message in result.stderr


def test_resume_with_default_total_timesteps_typed_extends_to_it(pendulum_run, tmp_path):
    """--total-timesteps 1000000 (the default) typed on resume of a 512-step run: it trains towards 1M."""
    checkpoint = copy_of_run(pendulum_run, tmp_path)
    process = subprocess.Popen([sys.executable, SCRIPT, "--resume", checkpoint, "--total-timesteps", "1000000"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_line = process.stdout.readline()
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=900)
    assert "/999,936 |" in first_line and "left | return" in first_line  # whole 256-sample rollouts; ETA shown
    assert process.returncode == 128 + signal.SIGTERM
    assert load_checkpoint(checkpoint)["args"]["total_timesteps"] == 1_000_000


def test_extending_a_finished_run_continues_schedule_and_keeps_its_logs(pendulum_run, tmp_path, monkeypatch):
    """A 2-iteration run extended to 4: the learning rate follows lr·(1 - (iteration-1)/4), the schedule of a run
    planned for 4 from the start; the TensorBoard points at the checkpoint's own step (512) stay, once."""
    checkpoint_path = copy_of_run(pendulum_run, tmp_path)
    monkeypatch.chdir(tmp_path)
    checkpoint = load_checkpoint(checkpoint_path)
    args = resume_args(Args(resume=checkpoint_path, total_timesteps=1024, eval_episodes=0), checkpoint,
                       given={"resume", "total_timesteps", "eval_episodes"})
    run_dir, _ = train(args, checkpoint, os.path.dirname(checkpoint_path))
    extended = load_checkpoint(f"{run_dir}/checkpoint.pt")
    assert (extended["global_step"], extended["iteration"], extended["args"]["total_timesteps"]) == (1024, 4, 1024)
    lr = Args().learning_rate  # iterations 1-2 planned over 2, then 3-4 over 4: lr, lr/2, then lr·2/4, lr·1/4
    assert scalars(run_dir, "charts/learning_rate") == pytest.approx([lr, lr / 2, lr / 2, lr / 4])
    steps = [event.step for event in EventAccumulator(run_dir).Reload().Scalars("losses/approx_kl")]
    assert steps == [256, 512, 768, 1024]


def test_resume_keeps_the_checkpoint_runtime_settings_unless_given(pendulum_run):
    """Bug caught: a resumed run forgetting --checkpoint-every (and so losing everything at the next kill)."""
    checkpoint = load_checkpoint(f"{pendulum_run[0]}/checkpoint.pt")
    checkpoint["args"] = {**checkpoint["args"], "checkpoint_every": 1, "torch_threads": 2, "total_timesteps": 1024}
    kept = resume_args(Args(resume="ck"), checkpoint, given={"resume"})
    assert (kept.checkpoint_every, kept.torch_threads, kept.resume) == (1, 2, "ck")
    given = resume_args(Args(resume="ck", checkpoint_every=3), checkpoint, given={"resume", "checkpoint_every"})
    assert (given.checkpoint_every, given.torch_threads) == (3, 2)
    with pytest.raises(SystemExit, match="--total-timesteps 256 is below the checkpoint's step 512"):
        resume_args(Args(resume="ck", total_timesteps=256), checkpoint, given={"resume", "total_timesteps"})


def test_non_finite_statistics_never_reach_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # +inf observations: the loss stays finite (normalized inputs are clipped), the observation statistics do not
    gym.register("InfinitePendulum-v0", entry_point=BrokenAfter100Steps, kwargs={"broken": "observations"})
    with pytest.raises(SystemExit, match="statistics became non-finite at iteration 1 .*no checkpoint was written"):
        train(Args(env_id="InfinitePendulum-v0", total_timesteps=1024, checkpoint_every=1, **SMALL))
    assert glob.glob("runs/*/checkpoint.pt*") == []


def test_non_finite_checkpoint_and_returns_are_refused(pendulum_run, tmp_path):
    checkpoint = load_checkpoint(f"{pendulum_run[0]}/checkpoint.pt")
    checkpoint["obs_rms"]["var"] = torch.full((3,), float("nan"), dtype=torch.float64)
    torch.save(checkpoint, tmp_path / "nan.pt")
    with pytest.raises(SystemExit, match="holds non-finite values in obs_rms.var"):
        load_checkpoint(str(tmp_path / "nan.pt"))
    gym.register("NaNRewardPendulum-v0", entry_point=BrokenAfter100Steps)
    with pytest.raises(SystemExit, match="gave non-finite returns"):
        evaluate(Agent(3, 1), RunningMeanStd((3,)), "NaNRewardPendulum-v0", episodes=1, seed=0, clip_obs=10.0,
                 rescale_actions=False)


def test_unwritable_runs_directory_is_one_line(tmp_path):
    (tmp_path / "runs").write_text("a file where the run directories should go")
    result = subprocess.run([sys.executable, SCRIPT, "--env-id", "Pendulum-v1", "--num-envs", "2", "--num-steps", "128",
                             "--total-timesteps", "256"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: cannot create run directory runs/Pendulum-v1__ppo_continuous__1__" in result.stderr
    assert ": Not a directory" in result.stderr


def test_disk_full_while_writing_keeps_last_checkpoint_and_no_temporary_file(pendulum_run, tmp_path):
    """A file-size limit below a checkpoint's ~130 kB makes the write fail midway, as a full disk does."""
    checkpoint = copy_of_run(pendulum_run, tmp_path)
    good = Path(checkpoint).read_bytes()

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))

    result = subprocess.run([sys.executable, SCRIPT, "--resume", checkpoint, "--total-timesteps", "1024"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=900, preexec_fn=limit_file_size)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"error: cannot write checkpoint {checkpoint}: File too large; the last good checkpoint is" in result.stderr
    assert Path(checkpoint).read_bytes() == good and not os.path.exists(checkpoint + ".tmp")


@pytest.mark.parametrize(
    "name, value",
    [("vf_coef", -0.5), ("ent_coef", -0.01), ("learning_rate", float("nan")), ("learning_rate", float("inf")),
     ("clip_coef", 0.0), ("max_grad_norm", float("inf")), ("gamma", float("nan")), ("gae_lambda", -0.1),
     ("target_kl", float("nan")), ("target_kl", 0.0), ("init_logstd", float("nan")), ("clip_obs", -1.0),
     ("clip_reward", float("inf")), ("seed", -1), ("seed", 2**32), ("torch_threads", 0), ("update_epochs", 0),
     ("num_steps", -5), ("critic_width", 0), ("actor_width", 0), ("checkpoint_every", -1), ("eval_episodes", -1),
     ("total_timesteps", 0)],
)
def test_every_numeric_option_is_checked_against_its_domain(name, value):
    with pytest.raises(SystemExit, match=f"^error: --{name.replace('_', '-')} must .*, got {value}$"):
        validate(Args(**{name: value}))


def test_domain_errors_on_the_command_line_are_one_line():
    result = run_script("--vf-coef", "-1")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: --vf-coef must be finite and not negative, got -1.0"


class RaisingEnv(gym.Env):
    def __init__(self):
        raise RuntimeError("the simulator licence has expired\nsecond line")


def test_any_failure_to_make_the_environment_is_one_line():
    """Bug caught: an id the error message itself offers (HalfCheetah-v2) ending in an ImportError traceback."""
    result = run_script("--env-id", "HalfCheetah-v2")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: cannot make environment 'HalfCheetah-v2'" in result.stderr
    gym.register("Raising-v0", entry_point=RaisingEnv)
    with pytest.raises(SystemExit, match="^error: cannot make environment 'Raising-v0': RuntimeError: the simulator "
                                         "licence has expired$"):
        checked_spaces("Raising-v0", True)


class NoRenderModePendulum(gym.Wrapper):
    def __init__(self):  # takes no render_mode
        super().__init__(gym.make("Pendulum-v1"))


def test_env_without_render_mode_argument_trains_and_evaluates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    gym.register("NoRenderMode-v0", entry_point=NoRenderModePendulum, max_episode_steps=50)
    _, returns = train(Args(env_id="NoRenderMode-v0", total_timesteps=256, eval_episodes=2, **SMALL))
    assert len(returns) == 2


def test_checkpoint_missing_a_field_is_one_line(pendulum_run, tmp_path):
    checkpoint = load_checkpoint(f"{pendulum_run[0]}/checkpoint.pt")
    del checkpoint["optimizer"], checkpoint["obs_rms"]["count"], checkpoint["args"]["gamma"]
    torch.save(checkpoint, tmp_path / "partial.pt")
    with pytest.raises(SystemExit, match="partial.pt is an incomplete checkpoint: it lacks optimizer, obs_rms.count, "
                                         "args.gamma$"):
        load_checkpoint(str(tmp_path / "partial.pt"))
    checkpoint = load_checkpoint(f"{pendulum_run[0]}/checkpoint.pt")
    checkpoint["agent"]["critic.0.weight"] = torch.zeros(64, 5)  # a tensor of the wrong shape
    with pytest.raises(SystemExit, match="^error: the checkpoint's weights do not fit the network: RuntimeError: "):
        load_policy(checkpoint, "Pendulum-v1", torch.device("cpu"))


def test_checkpoint_from_before_torchrun_and_lr_kl_target_loads_and_resumes(tmp_path, monkeypatch):
    """Bug caught: checkpoints written before the world_size, lr_scale, --lr-kl-target, --anneal-ent-coef and
    width fields existed being refused as incomplete, resumed with a decaying c2, or given today's widths. They mean
    one process, no adaptive step size, a constant c2 and 64-wide networks."""
    monkeypatch.chdir(tmp_path)
    run_dir, _ = train(Args(env_id="Pendulum-v1", total_timesteps=256, eval_episodes=0, **SMALL))
    path = f"{run_dir}/checkpoint.pt"
    checkpoint = load_checkpoint(path)
    del checkpoint["world_size"], checkpoint["lr_scale"], checkpoint["args"]["lr_kl_target"]
    names = ("anneal_ent_coef", "actor_width", "critic_width", "rescale_actions")
    for name in names:
        del checkpoint["args"][name]
    torch.save(checkpoint, path)
    loaded = load_checkpoint(path)
    assert (loaded["world_size"], loaded["lr_scale"], loaded["args"]["lr_kl_target"]) == (1, 1.0, None)
    assert [loaded["args"][name] for name in names] == [False, 64, 64, False]
    result = run_script("--resume", path, "--total-timesteps", str(checkpoint["global_step"] + 512))
    assert result.returncode == 0, result.stderr


class ImageObservationPendulum(gym.ObservationWrapper):
    def __init__(self, shape=(3, 1)):
        super().__init__(gym.make("Pendulum-v1"))
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape)

    def observation(self, obs):
        return obs.reshape(self.observation_space.shape)


class MatrixActionPendulum(gym.ActionWrapper):
    def __init__(self):
        super().__init__(gym.make("Pendulum-v1"))
        self.action_space = gym.spaces.Box(-2.0, 2.0, (1, 1))

    def action(self, action):
        return action.reshape(1)


def test_only_flat_box_spaces_are_accepted():
    gym.register("ImagePendulum-v0", entry_point=ImageObservationPendulum)
    gym.register("MatrixActionPendulum-v0", entry_point=MatrixActionPendulum)
    with pytest.raises(SystemExit, match=r"ImagePendulum-v0 observations must be a flat \(1-D\) Box, got Box"):
        checked_spaces("ImagePendulum-v0", True)
    with pytest.raises(SystemExit, match=r"MatrixActionPendulum-v0 actions must be a flat \(1-D\) Box, got Box"):
        checked_spaces("MatrixActionPendulum-v0", True)


def test_first_screen_shows_each_warning_once_and_the_time_left(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "--env-id", "HalfCheetah-v4", "--num-envs", "4", "--num-steps",
                             "64", "--total-timesteps", "256", "--eval-episodes", "0"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("settotalmass") == 1  # MuJoCo says it once per sub-environment
    assert result.stderr.count("is out of date") == 1  # gymnasium says it once per make
    assert "0:00 left | return" in result.stdout


def test_a_bad_mujoco_gl_matters_only_where_rendering_is_asked_for(pendulum_run, tmp_path):
    """Bug caught: MuJoCo rejecting MUJOCO_GL at import, which broke every command (a traceback) though only
    rendering reads it. Training MuJoCo and Pendulum and evaluating a checkpoint work; --capture-video says why not."""
    for backend in ("nonsense_backend", "osmesa"):
        env = {**os.environ, "MUJOCO_GL": backend}
        for cli_args in (["--env-id", "HalfCheetah-v4", "--num-envs", "2", "--num-steps", "64", "--total-timesteps",
                          "128", "--eval-episodes", "1", "--no-save-model"],
                         ["--eval-checkpoint", f"{pendulum_run[0]}/checkpoint.pt", "--eval-episodes", "1"]):
            result = run_script(*cli_args, cwd=tmp_path, env=env)
            assert result.returncode == 0 and "Traceback" not in result.stderr, (backend, result.stderr[-2000:])
    result = run_script("--env-id", "HalfCheetah-v4", "--capture-video", cwd=tmp_path,
                        env={**os.environ, "MUJOCO_GL": "nonsense_backend"})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: --capture-video cannot render HalfCheetah-v4" in result.stderr


def test_resuming_an_older_copy_goes_on_in_a_new_run_and_leaves_the_newer_one_alone(tmp_path):
    """Bug caught: a copy of an early checkpoint, resumed, overwriting its run's newer checkpoint.pt and purging the
    TensorBoard points logged after the copy's step. The copy goes on in a new run directory and says so."""
    common = ["--env-id", "Pendulum-v1", "--num-envs", "2", "--num-steps", "128", "--eval-episodes", "0"]
    assert run_script(*common, "--total-timesteps", "256", cwd=tmp_path).returncode == 0
    [run_dir] = glob.glob(f"{tmp_path}/runs/*")
    early = shutil.copy(f"{run_dir}/checkpoint.pt", tmp_path / "early.pt")  # step 256
    resumed = run_script("--resume", f"{run_dir}/checkpoint.pt", "--total-timesteps", "1024", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    newer = Path(run_dir, "checkpoint.pt").read_bytes()
    points = scalars(run_dir, "losses/approx_kl")
    assert len(points) == 4
    copy = run_script("--resume", str(early), "--total-timesteps", "512", cwd=tmp_path)
    assert copy.returncode == 0, copy.stderr
    assert "early.pt is not a run's own checkpoint.pt: training goes on in runs/" in copy.stdout
    assert Path(run_dir, "checkpoint.pt").read_bytes() == newer and scalars(run_dir, "losses/approx_kl") == points
    [new_dir] = set(glob.glob(f"{tmp_path}/runs/*")) - {run_dir}
    assert load_checkpoint(f"{new_dir}/checkpoint.pt")["global_step"] == 512


def test_a_resume_never_writes_where_the_checkpoint_file_says(pendulum_run, tmp_path):
    """Bug caught: the run directory stored in a checkpoint (which people download and share) trusted, so resuming
    one that names an absolute path or runs/../../x wrote outside runs/. A checkpoint from before this fix carries
    such a field; a resume writes in the folder of the path given."""
    checkpoint_path = copy_of_run(pendulum_run, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    del checkpoint["sha256"]
    for planted in (str(elsewhere), "runs/../../x"):
        torch.save({**checkpoint, "run_dir": planted}, checkpoint_path)
        result = run_script("--resume", checkpoint_path, "--total-timesteps", "768", "--eval-episodes", "0",
                            cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert load_checkpoint(checkpoint_path)["global_step"] == 768
    assert not elsewhere.exists() and not (tmp_path.parent / "x").exists()


@pytest.mark.parametrize("name", ["../../../escaped", "a/b", "..", ".", "", "back\\slash"])
def test_exp_name_is_a_name_not_a_path(tmp_path, name):
    """Bug caught: --exp-name ../../../escaped putting the run outside runs/."""
    result = run_script("--env-id", "Pendulum-v1", "--exp-name", name, "--total-timesteps", "256", "--num-envs", "2",
                        "--num-steps", "128", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: --exp-name must be a name, not a path (no / or \\, "
                                                  f"not . or ..): {name!r}"]
    assert not (tmp_path / "runs").exists()


def test_every_tensor_of_a_checkpoint_is_checked_for_finite_values(pendulum_run, tmp_path):
    """Bug caught: an inf in Adam's moments (or the return statistics) resuming silently, freezing a weight and
    reaching the next checkpoint. The file is edited as a user's tool would, without the checksum."""
    for part, edit in (("optimizer.state.0.exp_avg_sq", lambda c: c["optimizer"]["state"][0]["exp_avg_sq"]),
                       ("return_rms.var", lambda c: c["return_rms"]["var"])):
        checkpoint = load_checkpoint(f"{pendulum_run[0]}/checkpoint.pt")
        edit(checkpoint).view(-1)[0] = float("inf")
        torch.save(checkpoint, tmp_path / "inf.pt")
        with pytest.raises(SystemExit, match=f"inf.pt holds non-finite values in {part}$"):
            load_checkpoint(str(tmp_path / "inf.pt"))


def test_a_corrupted_checkpoint_is_refused_by_its_checksum(tmp_path):
    """Bug caught: bit flips in a checkpoint's tensor data loading silently as finite garbage (a weight of 2.7e37).
    One bit of the log σ's bytes (-1.0 is 00 00 80 bf in float32) is flipped in the file itself; and a tensor is
    changed with the saved checksum kept."""
    agent = Agent(obs_dim=3, action_dim=2)
    optimizer = torch.optim.Adam(agent.parameters())
    state = training_state(Args(), agent, optimizer, RunningMeanStd((3,)), RewardScaler(2, 0.99, 10.0), 4096, 1.0)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(str(path), state)
    assert load_checkpoint(str(path))["global_step"] == 4096
    data = bytearray(path.read_bytes())
    where = data.find(bytes.fromhex("000080bf000080bf"))
    assert where > 0
    data[where + 3] ^= 0x01  # bf80 0000 -> be80 0000: -1.0 becomes -0.25, finite and wrong
    path.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="checkpoint.pt (is corrupted: its contents do not match the checksum saved"
                                         " with them|is not a readable checkpoint)"):
        load_checkpoint(str(path))
    save_checkpoint(str(path), state)
    raw = torch.load(path, weights_only=True)
    raw["agent"]["critic.0.bias"][0] = 2.7e37  # finite: only the checksum tells
    torch.save(raw, path)
    with pytest.raises(SystemExit, match="is corrupted: its contents do not match the checksum saved with them"):
        load_checkpoint(str(path))


def test_resuming_a_finished_run_without_a_new_end_says_nothing_is_left(pendulum_run, tmp_path):
    """Bug caught: a finished run resumed without a larger --total-timesteps re-saving and re-evaluating silently."""
    checkpoint = copy_of_run(pendulum_run, tmp_path)
    before = Path(checkpoint).read_bytes()
    result = run_script("--resume", checkpoint, cwd=tmp_path)
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [
        "error: the checkpoint has trained all 512 steps of its run: nothing is left to train (give a larger "
        "--total-timesteps to go on)"]
    assert Path(checkpoint).read_bytes() == before and "evaluation" not in result.stdout


# ==== 2c. Data parallel: two ranks under torchrun, gloo on loopback ======================================
# Each run below starts `torchrun --nproc-per-node 2` on one of the two functions that follow (rank_spy, rank_math),
# imported from this file. rank_spy runs main() while it watches the live agent and statistics handed to
# collect_rollout, the env steps taken, the random state, and every Adam step's gradient norm, and saves what each
# rank saw. It reports an approximate KL of 0 on rank 0 and 1 on rank 1: their mean, 0.5, is over the default
# --target-kl 0.02, so every update stops after its first epoch, on both ranks; one rank's KL alone would split them.
def rank_spy() -> None:
    seen = {"env_steps": 0, "first_obs": None, "grad_norms": []}
    collect_rollout, reward_scaler, loss = ppo_continuous.collect_rollout, RewardScaler, ppo_continuous.ppo_loss

    def spy_loss(new_logprob, old_logprob, advantages, *rest, **coefficients):
        seen.setdefault("first_advantages", advantages.clone())
        total, stats = loss(new_logprob, old_logprob, advantages, *rest, **coefficients)
        return total, {**stats, "approx_kl": torch.tensor(float(os.environ["RANK"]))}  # made up: rank 0 0, rank 1 1

    def spy_rollout(envs, agent, obs_rms, raw_obs, *rest):
        seen.update(agent=agent, obs_rms=obs_rms)
        seen.setdefault("first_rng_state", torch.get_rng_state())  # what this rank's noise and shuffles draw from
        seen["first_obs"] = raw_obs.copy() if seen["first_obs"] is None else seen["first_obs"]
        seen["env_steps"] += rest[1] * envs.num_envs  # num_steps x num_envs
        return collect_rollout(envs, agent, obs_rms, raw_obs, *rest)

    def spy_scaler(*args):
        seen["reward_scaler"] = reward_scaler(*args)
        return seen["reward_scaler"]

    def record_norm(optimizer, args, kwargs):  # after averaging and clipping, before the step
        norms = [torch.linalg.vector_norm(p.grad) for group in optimizer.param_groups for p in group["params"]]
        seen["grad_norms"].append(torch.linalg.vector_norm(torch.stack(norms)).item())

    def spy_train(*args):  # a rank leaves by os._exit after train(): save what it saw before that
        try:
            return train(*args)
        finally:
            if "agent" in seen:  # training began
                torch.save({"agent": seen["agent"].state_dict(), "obs_rms": seen["obs_rms"].state_dict(),
                            "return_rms": seen["reward_scaler"].return_rms.state_dict(),
                            "env_steps": seen["env_steps"], "first_obs": torch.tensor(seen["first_obs"]),
                            "first_advantages": seen["first_advantages"], "first_rng_state": seen["first_rng_state"],
                            "grad_norms": seen["grad_norms"]}, f"rank{os.environ['RANK']}.pt")

    ppo_continuous.collect_rollout, ppo_continuous.RewardScaler, ppo_continuous.ppo_loss = (spy_rollout, spy_scaler,
                                                                                            spy_loss)
    ppo_continuous.train = spy_train
    register_optimizer_step_pre_hook(record_norm)
    sys.argv = [ppo_continuous.__file__] + sys.argv[1:]
    ppo_continuous.main()


def rank_math() -> None:
    """Each rank holds its half of a batch: rank 0 [1, 2], rank 1 [3, 5]; what the exchanges make of them."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mean, std = ppo_continuous.mean_and_std(torch.tensor([[1.0, 2.0], [3.0, 5.0]][rank]))
    parameter = torch.nn.Parameter(torch.zeros(2))
    parameter.grad = torch.tensor([[1.0, -2.0], [3.0, 4.0]][rank])
    ppo_continuous.average_gradients([parameter])
    statistics = RunningMeanStd()
    statistics.update(np.array([[1.0, 2.0], [3.0, 5.0]][rank]))
    kl = ppo_continuous.mean_over_ranks(torch.tensor([0.01, 0.03][rank])).item()
    results = dict(mean=mean.item(), std=std.item(), grad=parameter.grad.tolist(), kl=kl,
                   gathered=ppo_continuous.all_ranks(rank * 10),
                   statistics=[statistics.mean.item(), statistics.var.item(), statistics.count])
    Path(f"math{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


TWO_RANK_RUN = ["--env-id", "Pendulum-v1", "--num-envs", "2", "--num-steps", "64", "--num-minibatches", "2",
                "--update-epochs", "3", "--norm-adv", "--lr-kl-target", "0.01", "--eval-episodes", "1",
                "--max-grad-norm", "0.001"]


def torchrun(tmp_path, rank_function, *cli_args: str) -> subprocess.Popen:
    """torchrun with 2 ranks, each running rank_function of this file, in its own process group."""
    (tmp_path / "ranks.py").write_text(f"import test_ppo\ntest_ppo.{rank_function.__name__}()\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "ranks.py",
               *cli_args]
    env = {**os.environ, "PYTHONPATH": with_repo_on_path()}
    return subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)


def children(parent: int) -> list[int]:
    """The child processes of parent (torchrun starts its ranks in sessions of their own)."""
    pids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if int(Path(stat).read_text().rsplit(")", 1)[1].split()[1]) == parent:
                pids.append(int(Path(stat).parent.name))
    return pids


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    """Wait for a torchrun; whatever happens (a hang: no CPU used for 120 s), leave none of its processes behind."""
    try:
        output = {}
        with contextlib.ExitStack() as stack:  # read the pipes in the background, so that they never fill
            for name, pipe in (("stdout", process.stdout), ("stderr", process.stderr)):
                thread = threading.Thread(target=lambda n=name, p=pipe: output.__setitem__(n, p.read()), daemon=True)
                thread.start()
                stack.callback(thread.join, 30)
            wait_until(lambda: process.poll() is not None, process, "the end of the run")
        stdout, stderr = output.get("stdout", ""), output.get("stderr", "")
    finally:
        for pid in [*children(process.pid), process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def assert_ranks_hold_one_policy(tmp_path) -> list[dict]:
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for name in ranks[0]["agent"]:
        assert torch.equal(ranks[0]["agent"][name], ranks[1]["agent"][name]), name
    for part in ("obs_rms", "return_rms"):
        for key in ("mean", "var", "count"):
            assert torch.equal(torch.as_tensor(ranks[0][part][key]), torch.as_tensor(ranks[1][part][key])), part
    assert not torch.equal(ranks[0]["first_obs"], ranks[1]["first_obs"])  # the ranks' envs are seeded apart
    return ranks


def test_ranks_combine_their_shares_as_one_batch_by_hand(tmp_path):
    """Bugs caught: advantages normalized by one rank's minibatch share, gradients summed instead of averaged,
    one rank's KL deciding the stop, statistics merging one rank's batch. Rank 0 holds [1, 2], rank 1 [3, 5]."""
    result = finish(torchrun(tmp_path, rank_math))
    assert result.returncode == 0, result.stderr
    rank0, rank1 = (json.loads((tmp_path / f"math{rank}.json").read_text()) for rank in (0, 1))
    assert rank0 == rank1
    # mean of [1, 2, 3, 5] = 11/4 = 2.75; squared deviations 3.0625 + 0.5625 + 0.0625 + 5.0625 = 8.75;
    # std = sqrt(8.75 / (4-1)) = sqrt(2.9167)
    assert rank0["mean"] == 2.75 and rank0["std"] == pytest.approx(math.sqrt(8.75 / 3), rel=1e-6)
    assert rank0["grad"] == [2.0, 1.0]  # ([1, -2] + [3, 4]) / 2
    assert rank0["kl"] == pytest.approx(0.02)  # (0.01 + 0.03) / 2
    assert rank0["gathered"] == [0, 10]
    # all four samples merged into the prior (mean 0, var 1, count 1e-4): mean 11/4.0001, var ≈ 8.75/4 = 2.1875
    assert rank0["statistics"][0] == pytest.approx(11 / 4.0001, rel=1e-9)
    assert rank0["statistics"][1] == pytest.approx(2.1875, rel=1e-3) and rank0["statistics"][2] == 4.0001


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ranks")
    result = finish(torchrun(tmp_path, rank_spy, *TWO_RANK_RUN, "--total-timesteps", "512"))  # 2 x 2 ranks x 2 x 64
    assert result.returncode == 0, result.stderr
    return tmp_path, result


def test_two_ranks_train_one_policy_and_count_every_step(two_rank_run):
    """Bugs caught: gradients, the KL that ends the epochs, or the normalization statistics not combined across ranks
    (the replicas drift apart); advantages normalized by one rank's share of the minibatch; the global step counting
    one rank's steps."""
    tmp_path, result = two_rank_run
    ranks = assert_ranks_hold_one_policy(tmp_path)
    # --norm-adv: the first minibatch (two shares of 64) has mean 0 and std 1 as a whole, not share by share
    shares = [rank["first_advantages"] for rank in ranks]
    whole = torch.cat(shares)
    assert abs(whole.mean().item()) < 1e-6 and whole.std().item() == pytest.approx(1.0, abs=1e-5)
    assert min(abs(share.mean().item()) for share in shares) > 1e-3
    checkpoint_path = glob.glob(f"{tmp_path}/runs/*/checkpoint.pt")[0]
    checkpoint = load_checkpoint(checkpoint_path)
    assert [rank["env_steps"] for rank in ranks] == [256, 256]
    assert checkpoint["global_step"] == 512 and checkpoint["iteration"] == 2 and checkpoint["world_size"] == 2
    # the statistics absorbed both ranks' 256 steps: count = 1e-4 (prior) + 512
    assert checkpoint["obs_rms"]["count"] == ranks[0]["obs_rms"]["count"] == pytest.approx(512 + 1e-4)
    assert torch.equal(checkpoint["agent"]["actor_logstd"], ranks[0]["agent"]["actor_logstd"])
    assert scalars(os.path.dirname(checkpoint_path), "charts/epochs_run") == [1, 1]  # of 3: KL 0.5 ends each update
    assert result.stdout.count("evaluation:") == 1 and result.stdout.count("checkpoint of step 512") == 1  # rank 0
    assert len(glob.glob(f"{tmp_path}/runs/*")) == 1
    # every rank draws its own noise and shuffles (rank r seeds with seed + r)
    assert not torch.equal(ranks[0]["first_rng_state"], ranks[1]["first_rng_state"])
    # the mean gradient is clipped, not each rank's share before averaging: with --max-grad-norm 0.001 binding,
    # every step's norm is 0.001 on both ranks (the mean of two clipped gradients in different directions is shorter)
    for rank in ranks:
        assert len(rank["grad_norms"]) == 2 * 2 and rank["grad_norms"] == pytest.approx([1e-3] * 4, rel=1e-4)


def test_two_rank_checkpoint_resumes_with_two_ranks_only(two_rank_run, tmp_path):
    """Bugs caught: a resumed rank restarting from its own state, a resumed rank 1 replaying the first session's
    random draws or initial states (reseeded without the step it resumes at), or a checkpoint resumed by another
    number of ranks (its iterations and learning-rate schedule assume the batch of 2 ranks)."""
    shutil.copytree(two_rank_run[0] / "runs", tmp_path / "runs")
    checkpoint_path = glob.glob(f"{tmp_path}/runs/*/checkpoint.pt")[0]
    result = finish(torchrun(tmp_path, rank_spy, "--resume", checkpoint_path, "--total-timesteps", "1024"))
    assert result.returncode == 0, result.stderr
    resumed, first_session = assert_ranks_hold_one_policy(tmp_path)[1], torch.load(two_rank_run[0] / "rank1.pt")
    # rank 1 (not restored: the checkpoint holds rank 0's generator) draws from seed 1 + rank 1 + step 512 = 514
    assert torch.equal(resumed["first_rng_state"], torch.Generator().manual_seed(514).get_state())
    assert not torch.equal(resumed["first_obs"], first_session["first_obs"])
    assert load_checkpoint(checkpoint_path)["global_step"] == 1024
    alone = run_script("--resume", checkpoint_path, "--total-timesteps", "2048")
    assert alone.returncode == 1 and alone.stderr.strip().splitlines() == [
        "error: the checkpoint was trained by 2 ranks; resume it with as many (torchrun --nproc-per-node), not 1"]


def test_an_error_on_rank_0_stops_every_rank_with_its_line(tmp_path):
    """Bug caught: rank 0 exiting on an error only it meets (here: no run directory, as `runs` is a file) while the
    other ranks wait for it in the next exchange and die of a lost connection, or hang."""
    (tmp_path / "runs").write_text("")
    result = finish(torchrun(tmp_path, rank_spy, *TWO_RANK_RUN, "--total-timesteps", "512"))
    assert result.returncode != 0
    assert result.stderr.count("error: cannot create run directory runs/Pendulum-v1__") == 2  # each rank's line
    assert "Connection closed" not in result.stderr and "[rank" not in result.stderr  # no rank's traceback


def rank_pid(launcher: int, rank: int) -> int:
    for pid in children(launcher):
        with contextlib.suppress(OSError):
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    raise AssertionError(f"no process of rank {rank}")


@pytest.mark.parametrize("signum, to", [(signal.SIGINT, "group"), (signal.SIGTERM, "rank 1")])
def test_stop_signal_stops_every_rank_with_one_checkpoint(tmp_path, signum, to):
    """Bug caught: each rank honouring a signal on its own, so a rank that saw it leaves while the other waits in
    the next exchange, or every rank writing the checkpoint. Ctrl-C reaches torchrun and both ranks; a signal sent
    to one rank (kill <pid>) must stop the other too."""
    process = torchrun(tmp_path, rank_spy, *TWO_RANK_RUN, "--total-timesteps", "100000000", "--checkpoint-every", "1")
    wait_until(lambda: glob.glob(f"{tmp_path}/runs/*/checkpoint.pt"), process, "the first iteration's checkpoint")
    if to == "group":
        os.killpg(process.pid, signum)
    else:
        os.kill(rank_pid(process.pid, 1), signum)
    result = finish(process)
    assert result.stdout.count(f"stopped by {signal.Signals(signum).name}") == 1, result.stderr  # printed by rank 0
    assert result.stdout.count("checkpoint of step") == 1 and "[rank" not in result.stderr
    checkpoint = load_checkpoint(glob.glob(f"{tmp_path}/runs/*/checkpoint.pt")[0])
    assert checkpoint["global_step"] == checkpoint["iteration"] * 2 * 2 * 64 > 0
    assert_ranks_hold_one_policy(tmp_path)


def test_a_killed_rank_leaves_the_other_with_one_line(tmp_path):
    """Bug caught: when one rank dies (SIGKILL, out of memory), the other ending in a gloo traceback from the exchange
    it was waiting in. It ends with one line that says what happened and where to look."""
    process = torchrun(tmp_path, rank_spy, *TWO_RANK_RUN, "--total-timesteps", "100000000", "--checkpoint-every", "1")
    wait_until(lambda: glob.glob(f"{tmp_path}/runs/*/checkpoint.pt"), process, "the first iteration's checkpoint")
    os.kill(rank_pid(process.pid, 1), signal.SIGKILL)
    result = finish(process)
    assert result.returncode != 0
    assert "error: rank 0 lost its connection to another rank, which stopped or died" in result.stderr
    assert "[rank0]" not in result.stderr  # no line of a rank's traceback


@pytest.mark.parametrize("ranked", [True, False])
def test_a_rank_leaving_on_an_error_outlives_the_launchers_sigterm(tmp_path, ranked):
    """Bug caught (seen under load in the test above): the rank whose peer died gave SIGTERM its default action back
    while it unwound, and torchrun's SIGTERM to the survivors then killed it before it printed its line. Under
    torchrun a rank leaving on an error keeps deferring the signals until it exits; one process still gets the
    default handlers back (the signal stops it: -15), as code that calls train() in-process expects."""
    group = f"dist.init_process_group('gloo', init_method='file://{tmp_path}/store', rank=0, world_size=1)"
    code = "\n".join(["import os, signal, torch.distributed as dist", "from ppo_continuous import StopSignals",
                       group if ranked else "", "try:", "    with StopSignals():",
                       "        raise RuntimeError('Connection closed by peer')", "except RuntimeError:", "    pass",
                       "os.kill(os.getpid(), signal.SIGTERM)", "print('survived', flush=True)"])
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": with_repo_on_path()})
    assert (result.returncode, result.stdout) == ((0, "survived\n") if ranked else (-signal.SIGTERM, "")), result.stderr
