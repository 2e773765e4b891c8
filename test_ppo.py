"""Checks of ppo_continuous.py against numbers worked out by hand.

Run with:  pytest test_ppo.py
"""

import glob
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ppo_continuous
from ppo_continuous import (
    Agent,
    Args,
    RewardScaler,
    RunningMeanStd,
    compute_gae,
    evaluate_checkpoint,
    gaussian_entropy,
    gaussian_log_prob,
    load_checkpoint,
    normalize_obs,
    ppo_loss,
    resume_args,
    save_checkpoint,
    train,
    training_state,
)

SCRIPT = str(Path(__file__).with_name("ppo_continuous.py"))


# ---- r_t(θ) and L^CLIP -----------------------------------------------------------------------------
def policy_only_loss(ratio: float, advantage: float, clip_coef: float = 0.2):
    """ppo_loss with the value and entropy terms switched off, for one sample; returns (loss, d loss/d log π_θ, stats)."""
    new_logprob = torch.tensor([math.log(ratio)], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    loss, stats = ppo_loss(
        new_logprob, zero, torch.tensor([advantage], dtype=torch.float64), zero, zero, zero, zero,
        clip_coef=clip_coef, vf_coef=0.0, ent_coef=0.0, clip_vloss=False,
    )  # fmt: skip
    loss.backward()
    return loss.item(), new_logprob.grad.item(), stats


@pytest.mark.parametrize(
    "ratio, advantage, expected_loss, expected_grad",
    [
        # A>0, r=1.5 > 1+ε: min(1.5*2, 1.2*2) = min(3.0, 2.4) = 2.4, clipped -> loss -2.4, gradient 0
        (1.5, 2.0, -2.4, 0.0),
        # A<0, r=0.5 < 1-ε: min(0.5*-1, 0.8*-1) = min(-0.5, -0.8) = -0.8, clipped -> loss 0.8, gradient 0
        (0.5, -1.0, 0.8, 0.0),
        # A>0, r=0.5 < 1-ε: min(0.5*2, 0.8*2) = min(1.0, 1.6) = 1.0, the unclipped term -> loss -1.0;
        # d(-r A)/d log π = -r A (since dr/d log π = r) = -0.5*2 = -1.0
        (0.5, 2.0, -1.0, -1.0),
        # A<0, r=1.5 > 1+ε: min(1.5*-1, 1.2*-1) = min(-1.5, -1.2) = -1.5, unclipped -> loss 1.5; grad -r A = 1.5
        (1.5, -1.0, 1.5, 1.5),
        # r=1.1 inside [0.8, 1.2], A=3: min(3.3, 3.3) = 3.3 -> loss -3.3; grad -r A = -3.3
        (1.1, 3.0, -3.3, -3.3),
    ],
)
def test_clipped_surrogate_matches_hand_values(ratio, advantage, expected_loss, expected_grad):
    loss, grad, _ = policy_only_loss(ratio, advantage)
    assert loss == pytest.approx(expected_loss, abs=1e-12)
    assert grad == pytest.approx(expected_grad, abs=1e-12)


def test_clip_fraction_and_approx_kl():
    # r = 1.5: |r-1| = 0.5 > 0.2 so clip fraction 1; KL estimate (r-1) - ln r = 0.5 - 0.4054651 = 0.0945349
    _, _, stats = policy_only_loss(1.5, 1.0)
    assert stats["clip_fraction"].item() == 1.0
    assert stats["approx_kl"].item() == pytest.approx(0.0945349, abs=1e-7)
    # r = 1.1: inside the range, clip fraction 0; KL estimate 0.1 - ln 1.1 = 0.1 - 0.0953102 = 0.0046898
    _, _, stats = policy_only_loss(1.1, 1.0)
    assert stats["clip_fraction"].item() == 0.0
    assert stats["approx_kl"].item() == pytest.approx(0.0046898, abs=1e-7)


def test_total_loss_combines_terms():
    # r=1 (same log-probs), A=[1, 3] -> L^CLIP = mean(1, 3) = 2; V=[0, 1], R=[1, 3] -> L^VF = ½ mean(1, 4) = 1.25;
    # entropy 2.0. loss = -2 + 0.5*1.25 - 0.01*2.0 = -2 + 0.625 - 0.02 = -1.395
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    loss, stats = ppo_loss(t(0.0, 0.0), t(0.0, 0.0), t(1.0, 3.0), t(0.0, 1.0), t(0.0, 1.0), t(1.0, 3.0), t(2.0),
                           clip_coef=0.2, vf_coef=0.5, ent_coef=0.01, clip_vloss=False)  # fmt: skip
    assert loss.item() == pytest.approx(-1.395)
    assert stats["policy_loss"].item() == pytest.approx(-2.0)
    assert stats["value_loss"].item() == pytest.approx(1.25)
    assert stats["entropy"].item() == pytest.approx(2.0)


# ---- L^VF with and without clipping -------------------------------------------------------------------
@pytest.mark.parametrize(
    "new_value, old_value, target, clip_vloss, expected",
    [
        # unclipped: ½ (2-3)² = 0.5
        (2.0, 1.0, 3.0, False, 0.5),
        # clipped V = 1 + clamp(2-1, -0.2, 0.2) = 1.2; max((2-3)², (1.2-3)²) = max(1, 3.24) = 3.24; ½ -> 1.62
        (2.0, 1.0, 3.0, True, 1.62),
        # target 0: max((2-0)², (1.2-0)²) = max(4, 1.44) = 4; ½ -> 2.0 (clipping never lowers the loss)
        (2.0, 1.0, 0.0, True, 2.0),
        # inside the range: V=1.1, clipped V=1.1, ½ (1.1-2)² = ½ 0.81 = 0.405
        (1.1, 1.0, 2.0, True, 0.405),
    ],
)
def test_value_loss(new_value, old_value, target, clip_vloss, expected):
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    _, stats = ppo_loss(t(0.0), t(0.0), t(0.0), t(new_value), t(old_value), t(target), t(0.0),
                        clip_coef=0.2, vf_coef=0.5, ent_coef=0.0, clip_vloss=clip_vloss)  # fmt: skip
    assert stats["value_loss"].item() == pytest.approx(expected)


# ---- The diagonal Gaussian policy ------------------------------------------------------------------------
def test_gaussian_log_prob_closed_form():
    # a=(0.5, -1), μ=(0, 0), σ=(1, 2); ½ log 2π = 0.9189385
    # dim 1: -½ (0.5/1)² - log 1 - 0.9189385 = -0.125 - 0 - 0.9189385 = -1.0439385
    # dim 2: -½ (-1/2)² - log 2 - 0.9189385 = -0.125 - 0.6931472 - 0.9189385 = -1.7370857
    # sum: -2.7810242
    log_std = torch.tensor([0.0, math.log(2.0)], dtype=torch.float64)
    actions = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    mean = torch.zeros(1, 2, dtype=torch.float64)
    assert gaussian_log_prob(actions, mean, log_std).item() == pytest.approx(-2.7810242, abs=1e-7)


def test_gaussian_entropy_closed_form():
    # σ=(1, 2): Σ [log σ_i + ½ log(2πe)] = 0 + 0.6931472 + 2 * 1.4189385 = 3.5310242
    log_std = torch.tensor([0.0, math.log(2.0)], dtype=torch.float64)
    assert gaussian_entropy(log_std).item() == pytest.approx(3.5310242, abs=1e-7)


# ---- Â_t by GAE -----------------------------------------------------------------------------------------
# One env, 3 steps, γ=0.9, λ=0.8 (γλ = 0.72), r=(1, 2, 3), V(s_t)=(0.5, 1.0, 1.5), V(s_3)=2.0 after the rollout
# δ_0 = 1 + 0.9*1.0 - 0.5 = 1.4     δ_1 = 2 + 0.9*1.5 - 1.0 = 2.35     δ_2 = 3 + 0.9*2.0 - 1.5 = 3.3
GAMMA, LAMBDA = 0.9, 0.8
REWARDS = [1.0, 2.0, 3.0]
VALUES = [0.5, 1.0, 1.5]
NEXT_VALUE = 2.0
NO_END = [0.0, 0.0, 0.0]


def gae(terminations=NO_END, dones=NO_END, final_values=NO_END, gae_lambda=LAMBDA):
    col = lambda x: torch.tensor(x, dtype=torch.float64).reshape(len(x), 1)  # noqa: E731  (T,) -> (T, 1)
    advantages, returns = compute_gae(col(REWARDS), col(VALUES), torch.tensor([NEXT_VALUE], dtype=torch.float64),
                                      col(final_values), col(terminations), col(dones), GAMMA, gae_lambda)  # fmt: skip
    return advantages.squeeze(-1).tolist(), returns.squeeze(-1).tolist()


def test_gae_by_hand():
    # Â_2 = 3.3;  Â_1 = 2.35 + 0.72*3.3 = 4.726;  Â_0 = 1.4 + 0.72*4.726 = 4.80272
    # R = Â + V = (5.30272, 5.726, 4.8)
    advantages, returns = gae()
    assert advantages == pytest.approx([4.80272, 4.726, 3.3])
    assert returns == pytest.approx([5.30272, 5.726, 4.8])


def test_gae_termination_stops_bootstrap_and_carry():
    # terminated at t=1: V(final obs) must be ignored (99 proves it), δ_1 = 2 - 1.0 = 1.0; Â_1 = δ_1 (no carry from t=2)
    # Â_2 = 3.3;  Â_0 = 1.4 + 0.72*1.0 = 2.12
    advantages, _ = gae(terminations=[0, 1, 0], dones=[0, 1, 0], final_values=[0, 99.0, 0])
    assert advantages == pytest.approx([2.12, 1.0, 3.3])


def test_gae_truncation_bootstraps_from_final_observation():
    # time limit at t=1: bootstrap from V(final obs) = 4.0, not from V(s_2) = 1.5 of the reset state; no carry from t=2
    # δ_1 = 2 + 0.9*4.0 - 1.0 = 4.6 = Â_1;  Â_2 = 3.3;  Â_0 = 1.4 + 0.72*4.6 = 4.712
    advantages, _ = gae(terminations=[0, 0, 0], dones=[0, 1, 0], final_values=[0, 4.0, 0])
    assert advantages == pytest.approx([4.712, 4.6, 3.3])


def test_gae_two_envs_are_independent():
    # env 0 is the plain example, env 1 the terminated one: each column matches its single-env answer
    pair = lambda a, b: torch.tensor([a, b], dtype=torch.float64).T  # noqa: E731  (T, 2)
    advantages, _ = compute_gae(
        pair(REWARDS, REWARDS), pair(VALUES, VALUES), torch.tensor([NEXT_VALUE, NEXT_VALUE], dtype=torch.float64),
        pair(NO_END, [0, 99.0, 0]), pair(NO_END, [0, 1, 0]), pair(NO_END, [0, 1, 0]), GAMMA, LAMBDA,
    )  # fmt: skip
    assert advantages[:, 0].tolist() == pytest.approx([4.80272, 4.726, 3.3])
    assert advantages[:, 1].tolist() == pytest.approx([2.12, 1.0, 3.3])


def test_gae_lambda_zero_is_td_error():
    # λ=0: Â_t = δ_t = (1.4, 2.35, 3.3)
    advantages, _ = gae(gae_lambda=0.0)
    assert advantages == pytest.approx([1.4, 2.35, 3.3])


def test_gae_lambda_one_is_discounted_return_minus_value():
    # λ=1, bootstrapping the last step with V=2.0: G_2 = 3 + 0.9*2.0 = 4.8; G_1 = 2 + 0.9*4.8 = 6.32;
    # G_0 = 1 + 0.9*6.32 = 6.688.  Â = G - V = (6.188, 5.32, 3.3)
    advantages, returns = gae(gae_lambda=1.0)
    assert advantages == pytest.approx([6.188, 5.32, 3.3])
    assert returns == pytest.approx([6.688, 6.32, 4.8])


# ---- Normalization shared by all sub-environments ----------------------------------------------------
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


def test_normalize_obs_uses_stats_and_clips():
    rms = RunningMeanStd((2,))
    rms.mean, rms.var = np.array([1.0, 0.0]), np.array([4.0, 1e-6])
    # (3-1)/sqrt(4) = 1.0;  (1-0)/sqrt(1e-6 + 1e-8) = 995 -> clipped to 10
    np.testing.assert_allclose(normalize_obs(np.array([[3.0, 1.0]]), rms, clip=10.0), [[1.0, 10.0]], rtol=1e-6)


def test_reward_scaler_shares_one_return_statistic():
    # 2 envs, γ=0.5, one rollout of 2 steps. Step 1: G = (1, 2). Step 2: G = 0.5*(1, 2) + (3, 4) = (3.5, 5).
    # Pooled over both envs and steps: mean (1+2+3.5+5)/4 = 2.875,
    # var ((1.875)² + (0.875)² + (0.625)² + (2.125)²)/4 = (3.515625+0.765625+0.390625+4.515625)/4 = 2.296875
    # so every reward of the rollout is divided by sqrt(2.296875) = 1.515544: (3, 4) -> (1.979487, 2.639316)
    scaler = RewardScaler(num_envs=2, gamma=0.5, clip=10.0)
    scaled = scaler(np.array([[1.0, 2.0], [3.0, 4.0]]), np.zeros((2, 2), bool))
    assert scaler.return_rms.var == pytest.approx(2.296875, rel=1e-4)
    np.testing.assert_allclose(scaled, [[0.659829, 1.319658], [1.979487, 2.639316]], rtol=1e-4)


def test_reward_scaler_restarts_return_at_episode_end():
    # γ=0.5. Step 1: G = (1, 2), env 0's episode ends there. Step 2: G = (0 + 3, 0.5*2 + 4) = (3, 5);
    # the statistics saw (1, 2, 3, 5), not the (1, 2, 3.5, 5) of the test above.
    scaler = RewardScaler(num_envs=2, gamma=0.5, clip=10.0)
    scaler(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[True, False], [False, False]]))
    assert scaler.return_rms.mean == pytest.approx(11 / 4, rel=1e-4)
    np.testing.assert_allclose(scaler.returns, [3.0, 5.0])  # carried into the next rollout


def test_reward_scaler_clips():
    # returns (100, 0) -> mean 50, var 2500, std 50: reward 100 scales to 2, clipped to 1.5
    scaler = RewardScaler(num_envs=2, gamma=0.99, clip=1.5)
    np.testing.assert_allclose(scaler(np.array([[100.0, 0.0]]), np.zeros((1, 2), bool)), [[1.5, 0.0]], rtol=1e-4)


# ---- Whole runs ------------------------------------------------------------------------------------
SMALL = dict(num_envs=2, num_steps=128, num_minibatches=4, update_epochs=2)


def scalars(run_dir: str, tag: str) -> list[float]:
    accumulator = EventAccumulator(run_dir)
    accumulator.Reload()
    return [event.value for event in accumulator.Scalars(tag)]


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
               update_epochs=1, eval_episodes=0, save_model=False))  # fmt: skip
    values, final_values, terminations, dones = seen[0]
    assert dones[:, 0].nonzero().flatten().tolist() == [199]
    assert terminations.sum() == 0
    assert final_values[199, 0] != values[200, 0]


def test_rollout_stores_the_sampled_action_and_the_env_gets_it_clipped(tmp_path, monkeypatch):
    """Pendulum's torque bound is ±2; with σ = e ≈ 2.7 many samples fall outside it. The env must receive
    clip(a_t), while the batch scored for log π_old holds the unclipped a_t, in step order."""
    monkeypatch.chdir(tmp_path)
    sent, scored = [], []
    make_envs = ppo_continuous.make_vector_env

    def recording_envs(*args):
        envs = make_envs(*args)
        step = envs.step
        envs.step = lambda actions: (sent.append(actions.copy()), step(actions))[1]
        return envs

    def recording_log_prob(actions, mean, log_std):
        scored.append(actions.clone())
        return gaussian_log_prob(actions, mean, log_std)

    monkeypatch.setattr(ppo_continuous, "make_vector_env", recording_envs)
    monkeypatch.setattr(ppo_continuous, "gaussian_log_prob", recording_log_prob)
    train(Args(env_id="Pendulum-v1", total_timesteps=256, init_logstd=1.0, eval_episodes=0, save_model=False, **SMALL))
    stored = scored[0].numpy()  # the first call scores the whole rollout, (T*N, action_dim) in step order
    sent = np.concatenate(sent)
    assert (np.abs(stored) > 2).mean() > 0.2  # the case this test is about does occur
    np.testing.assert_array_equal(sent, np.clip(stored, -2.0, 2.0))


def test_recompute_advantages_runs_gae_every_epoch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(ppo_continuous, "compute_gae", lambda *a: calls.append(1) or compute_gae(*a))
    train(Args(env_id="Pendulum-v1", total_timesteps=512, recompute_advantages=True, eval_episodes=0, **SMALL))
    assert len(calls) == 2 * SMALL["update_epochs"]  # 2 iterations x 2 epochs


def test_same_seed_gives_same_learning_curve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, first_eval = train(Args(env_id="Pendulum-v1", total_timesteps=1024, exp_name="a", eval_episodes=1, **SMALL))
    second, second_eval = train(Args(env_id="Pendulum-v1", total_timesteps=1024, exp_name="b", eval_episodes=1, **SMALL))
    assert first_eval == second_eval
    for tag in ("charts/episodic_return", "losses/value_loss", "losses/approx_kl"):
        assert scalars(first, tag) == scalars(second, tag)


def run_script(*cli_args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *cli_args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "cli_args, message",
    [
        (["--env-id", "CartPole-v1"], "Discrete action space"),
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
    save_checkpoint(path, training_state(Args(), "runs/x", agent, optimizer, obs_rms, scaler, global_step=64, iteration=3))
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
    assert (loaded["global_step"], loaded["iteration"], loaded["args"]["env_id"]) == (64, 3, "HalfCheetah-v4")


def test_evaluating_checkpoint_reproduces_in_memory_evaluation(pendulum_run):
    run_dir, eval_returns = pendulum_run
    # the checkpoint (weights + frozen normalization) gives exactly the returns the trained agent got
    returns = evaluate_checkpoint(Args(eval_checkpoint=f"{run_dir}/checkpoint.pt", eval_episodes=2))
    assert returns == eval_returns
    # and the end-of-training evaluation is logged
    assert scalars(run_dir, "eval/mean_return") == pytest.approx([np.mean(eval_returns)])


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
    train(args)
    straight, halfway = load_checkpoint(saved[4]), load_checkpoint(saved[2])
    assert halfway["global_step"] == 512

    train(resume_args(Args(resume=saved[2], eval_episodes=0), halfway), halfway)
    resumed = load_checkpoint(f"{halfway['run_dir']}/checkpoint.pt")
    assert (resumed["global_step"], resumed["iteration"]) == (straight["global_step"], straight["iteration"]) == (1024, 4)
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
        (["--eval-checkpoint", str(good), "--env-id", "MountainCarContinuous-v0"], "trained with 3 observations and 1 actions"),
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


def test_sigint_saves_checkpoint_and_leaves_no_workers(tmp_path):
    # async mode: two worker processes; Ctrl-C in a terminal signals the whole process group, so do the same
    process = subprocess.Popen(
        [sys.executable, SCRIPT, "--env-id", "Pendulum-v1", "--vector-mode", "async", "--num-envs", "2",
         "--num-steps", "64", "--num-minibatches", "2", "--update-epochs", "1", "--total-timesteps", "100000000"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 60
    while not glob.glob(f"{tmp_path}/runs/*/events.out.tfevents.*") and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # a few iterations in
    assert len(process_group_members(process.pid)) >= 3  # the script and its two workers
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted: checkpoint of step" in stdout
    checkpoint = load_checkpoint(glob.glob(f"{tmp_path}/runs/*/checkpoint.pt")[0])
    assert checkpoint["global_step"] == checkpoint["iteration"] * 2 * 64 > 0
    time.sleep(0.5)
    assert process_group_members(process.pid) == []


class NaNAfterFirstSteps(gym.Wrapper):
    """Pendulum whose rewards turn to NaN after 100 steps, to trip the guard."""

    def __init__(self):
        super().__init__(gym.make("Pendulum-v1"))
        self.steps = 0

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        return obs, (float("nan") if self.steps > 100 else reward), terminated, truncated, info


def test_non_finite_loss_stops_with_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    gym.register("NaNPendulum-v0", entry_point=NaNAfterFirstSteps)
    with pytest.raises(SystemExit, match="non-finite at iteration 1 \\(step 256\\); no checkpoint was written"):
        train(Args(env_id="NaNPendulum-v0", total_timesteps=1024, **SMALL))


def test_capture_video_records_evaluation(tmp_path):
    # A 20-step HalfCheetah keeps software rendering short.
    code = (
        "import sys, gymnasium as gym, ppo_continuous as p\n"
        "gym.register('ShortCheetah-v0', entry_point='gymnasium.envs.mujoco.half_cheetah_v4:HalfCheetahEnv', max_episode_steps=20)\n"
        "p.train(p.Args(env_id='ShortCheetah-v0', total_timesteps=256, num_envs=2, num_steps=128, num_minibatches=4,"
        " update_epochs=1, eval_episodes=2, capture_video=True))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(SCRIPT).parent)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(glob.glob(f"{tmp_path}/runs/*/videos/eval-episode-*.mp4")) == 2


def test_capture_video_without_renderer_fails_before_training():
    pytest.importorskip("moviepy")
    if subprocess.run([sys.executable, "-c", "import pygame"], capture_output=True).returncode == 0:
        pytest.skip("pygame is installed, so Pendulum can render here")
    result = run_script("--env-id", "Pendulum-v1", "--capture-video")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--capture-video cannot render Pendulum-v1" in result.stderr
