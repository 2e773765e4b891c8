"""Proximal Policy Optimization (Schulman et al. 2017) for continuous actions, in one file.

    python ppo_continuous.py --env-id HalfCheetah-v4
    torchrun --standalone --nproc-per-node=2 ppo_continuous.py --total-timesteps 2000000   # 2 data-parallel ranks

The file, in order:
  I    the algorithm in lecture order, train() last:   for each iteration of train():
         run π_old in N envs for T steps, store (s_t, a_t, r_t)   collect_rollout: a_t = μ_θ(s_t) + σ ε_t
         Â_t, R_t = GAE(γ, λ) from V(s_t), by δ_t                 compute_gae
         K epochs of minibatches: -L^CLIP + c1 L^VF - c2 S        ppo_update: one Adam step per ppo_loss
  II   around it: validation, guards, logging, stop signals, evaluation, checkpoints, resume
  III  data parallel under torchrun: each call into it from part I does nothing in one process; then main()
"""

import contextlib
import dataclasses
import hashlib
import io
import itertools
import os
import random
import signal
import sys
import time
import warnings
from collections import deque
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import tyro
from gymnasium.vector import AutoresetMode
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter


@dataclasses.dataclass
class Args:  # each comment is the option's --help text
    env_id: str = "HalfCheetah-v4"  # gymnasium id of an environment with flat Box observations and actions
    total_timesteps: int = 1_000_000  # environment steps to train for, summed over all sub-environments and ranks
    seed: int = 1  # seed for torch, numpy, random and the environments
    exp_name: str = "ppo_continuous"  # name of the experiment, part of the run directory name (not a path)
    cuda: bool = False  # train on the GPU (off by default: these small networks run faster on one CPU core)
    torch_threads: int = 1  # CPU threads for torch; small MLPs run fastest on one
    num_envs: int = 8  # sub-environments stepped together (on each torchrun rank); the policy sees them as one batch
    vector_mode: Literal["sync", "async"] = "sync"  # step the sub-environments in this process, or one subprocess each
    num_steps: int = 256  # steps per sub-environment in each rollout (samples per rollout = num_envs * num_steps)

    learning_rate: float = 2e-3  # Adam step size at the start of training
    anneal_lr: bool = True  # decay the learning rate linearly to zero at --total-timesteps
    gamma: float = 0.99  # discount factor γ
    gae_lambda: float = 0.92  # GAE λ: 0 gives the one-step TD error, 1 the Monte-Carlo return minus V
    num_minibatches: int = 4  # minibatches per rollout (4 of 512 samples: few, large Adam steps are fast on a CPU)
    update_epochs: int = 15  # passes K over each rollout (15: the tight clip range leaves room for more passes)
    norm_adv: bool = False  # normalize advantages within each minibatch
    clip_coef: float = 0.1  # clip range ε of the ratio r_t(θ) (0.1: at this step size 0.2 lets the policy overshoot)
    clip_vloss: bool = False  # also clip the value prediction to ±ε around the old value
    ent_coef: float = 1e-4  # weight c2 of the entropy bonus S (small: Adam moves log σ at full step once S dominates)
    anneal_ent_coef: bool = True  # decay c2 linearly to zero at --total-timesteps: explore early, act surely late
    vf_coef: float = 0.25  # weight c1 of the value loss L^VF
    max_grad_norm: float = 0.5  # clip the global gradient norm to this
    init_logstd: float = -1.0  # initial log σ of the Gaussian policy (-1: σ ≈ 0.37)
    rescale_actions: bool = True  # the policy acts in [-1, 1], mapped onto bounded actions: σ is a share of the range
    actor_width: int = 64  # units in each of the actor's two hidden layers
    critic_width: int = 64  # units in each of the critic's two hidden layers
    recompute_advantages: bool = False  # recompute Â_t and R_t with the current critic before every epoch
    target_kl: float | None = 0.02  # end an update's epochs once an epoch's mean approximate KL exceeds this
    lr_kl_target: float | None = None  # adapt the step size to the update's KL: /1.5 above 2x this, x1.5 below 1/2
    clip_obs: float = 10.0  # clip normalized observations to ±this
    clip_reward: float = 10.0  # clip scaled rewards to ±this
    save_model: bool = True  # write runs/<run>/checkpoint.pt at the end of training (always on SIGINT or SIGTERM)
    checkpoint_every: int = 0  # also write the checkpoint every this many iterations (0: only at the end)
    resume: str | None = None  # continue training from this checkpoint, with its saved settings
    eval_checkpoint: str | None = None  # evaluate this checkpoint instead of training; print mean ± std of raw returns
    eval_episodes: int = 10  # episodes evaluated after training or by --eval-checkpoint (0: none after training)
    eval_stochastic: bool = False  # evaluate by sampling actions instead of taking the mean action
    capture_video: bool = False  # record the evaluation episodes to runs/<run>/videos/ (headless MuJoCo: MUJOCO_GL=egl)


# ==== I. The algorithm ===========================================================================


# ---- Environments: N copies stepped as one batch ------------------------------------------------
# Autoreset: gymnasium 1.x resets an ended sub-environment on the NEXT_STEP (a fake transition
# that ignores the action and pays 0, to mask out of GAE and the loss) or on the SAME_STEP (the
# ending step returns the reset observation, the true last one in infos["final_obs"]). SAME_STEP
# keeps every stored transition real, the final observation a time-limit cut bootstraps from at
# hand. Gymnasium's NormalizeObservation refuses SAME_STEP, so normalization below is ours.
def make_env(env_id: str, rescale_actions: bool, **kwargs) -> gym.Env:
    """gym.make, with any failure to build the environment reported in one line. rescale_actions: the env takes
    actions in [-1, 1], mapped affinely onto its bounds (spaces already [-1, 1], or unbounded, are left alone)."""
    try:
        env = gym.make(env_id, **kwargs)
        space = env.action_space
        bounded = isinstance(space, gym.spaces.Box) and np.isfinite(space.low).all() and np.isfinite(space.high).all()
        if rescale_actions and bounded and not ((space.low == -1).all() and (space.high == 1).all()):
            pinned = np.flatnonzero(space.low == space.high)  # [-1, 1] cannot map onto a point: the wrapper sends NaN
            if pinned.size:
                raise SystemExit(f"error: {env_id} has actions with low == high (dimensions {pinned.tolist()}): "
                                 "--rescale-actions cannot map [-1, 1] onto them; train with --no-rescale-actions")
            one = np.ones_like(space.high)  # in the space's dtype: a float64 bound would draw a warning
            env = gym.wrappers.RescaleAction(env, -one, one)
        return env
    except Exception as error:  # unknown ids, missing packages, broken constructors: many types
        raise SystemExit(f"error: cannot make environment {env_id!r}: {one_line(error)}")


def checked_spaces(env_id: str, rescale_actions: bool) -> tuple[gym.spaces.Box, gym.spaces.Box]:
    """Observation and action spaces of env_id, or exit with one line if PPO cannot use them."""
    probe = make_env(env_id, rescale_actions)  # built as training builds it: its errors come before any work
    probe.close()
    for name, space in (("observations", probe.observation_space), ("actions", probe.action_space)):
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            raise SystemExit(f"error: {env_id} {name} must be a flat (1-D) Box, got {space}")
    return probe.observation_space, probe.action_space


def make_vector_env(env_id: str, num_envs: int, vector_mode: str, rescale_actions: bool) -> gym.vector.VectorEnv:
    vector_class = gym.vector.SyncVectorEnv if vector_mode == "sync" else gym.vector.AsyncVectorEnv
    thunks = [lambda: make_env(env_id, rescale_actions)] * num_envs
    # copy=False: step() returns the envs' own buffer, which the rollout copies at once
    return vector_class(thunks, autoreset_mode=AutoresetMode.SAME_STEP, copy=False)


# ---- Normalization: one set of running statistics shared by all sub-environments ----------------
# The statistics are merged once per rollout, after it: every state of a batch is normalized alike,
# and a step costs a subtraction and a division, not an update (the first rollout sees the prior,
# mean 0 and variance 1: only clipped).
class RunningMeanStd:
    """Mean and variance of everything seen so far, merged batch by batch."""

    def __init__(self, shape=()):
        self.mean, self.var = np.zeros(shape), np.ones(shape)
        self.count = 1e-4  # a tiny prior count: the first merge is defined

    def update(self, batch: np.ndarray) -> None:
        # III: under torchrun every rank's batch, in rank order: all ranks hold the same statistics
        for moments in all_ranks((batch.mean(axis=0), batch.var(axis=0), batch.shape[0])):
            self.merge(*moments)

    def merge(self, batch_mean, batch_var, batch_count) -> None:
        """Chan et al.'s parallel rule: mean and variance of all seen, with this batch added."""
        delta = batch_mean - self.mean
        total = self.count + batch_count
        self.mean = self.mean + delta * batch_count / total
        squares = self.var * self.count + batch_var * batch_count
        self.var = (squares + delta**2 * self.count * batch_count / total) / total
        self.count = total

    def state_dict(self) -> dict:
        mean, var = torch.tensor(self.mean), torch.tensor(self.var)
        return {"mean": mean, "var": var, "count": float(self.count)}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var = state["mean"].numpy().copy(), state["var"].numpy().copy()
        self.count = state["count"]


def normalize_obs(obs: np.ndarray, obs_rms: RunningMeanStd, clip: float) -> np.ndarray:
    return np.clip((obs - obs_rms.mean) / np.sqrt(obs_rms.var + 1e-8), -clip, clip)


class RewardScaler:
    """r_t / std of the return G_t = γ G_{t-1} + r_t (no mean shift); G restarts at each end."""

    def __init__(self, num_envs: int, gamma: float, clip: float):
        self.return_rms = RunningMeanStd()
        self.returns = np.zeros(num_envs)  # G of each sub-environment, carried across rollouts
        self.gamma, self.clip = gamma, clip

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        """Scale a (T, N) rollout of rewards, after adding its returns G_t to the statistics."""
        returns = np.empty_like(rewards, dtype=np.float64)
        for t in range(len(rewards)):
            self.returns = self.returns * self.gamma + rewards[t]
            returns[t] = self.returns
            self.returns[dones[t]] = 0.0
        self.return_rms.update(returns.reshape(-1))
        return np.clip(rewards / np.sqrt(self.return_rms.var + 1e-8), -self.clip, self.clip)


# ---- Actor-critic: π_θ(a|s) = N(μ_θ(s), diag σ²) and V_φ(s) -------------------------------------
class Agent(nn.Module):
    """The actor-critic in one piece: act, score an action, entropy, value."""

    def __init__(self, obs_dim: int, action_dim: int, init_logstd=-1.0,
                 actor_width=64, critic_width=64):
        super().__init__()
        self.critic = self.mlp(obs_dim, 1, out_gain=1.0, width=critic_width)
        # μ starts near 0: σ, not chance weights, drives early exploration
        self.actor_mean = self.mlp(obs_dim, action_dim, out_gain=0.01, width=actor_width)
        # log σ, a parameter of its own, not a function of s
        self.actor_logstd = nn.Parameter(torch.full((action_dim,), float(init_logstd)))

    @staticmethod
    def mlp(in_dim: int, out_dim: int, out_gain: float, width=64) -> nn.Sequential:
        """in → width → width → out, tanh between; orthogonal weights (gain √2, out_gain last)."""
        layers = []
        hidden = np.sqrt(2)  # the tanh layers' gain
        shapes = ((in_dim, width, hidden), (width, width, hidden), (width, out_dim, out_gain))
        for n_in, n_out, gain in shapes:
            layers += [nn.Linear(n_in, n_out), nn.Tanh()]
            nn.init.orthogonal_(layers[-2].weight, gain)
            nn.init.constant_(layers[-2].bias, 0.0)
        return nn.Sequential(*layers[:-1])

    def act(self, obs: Tensor, noise: Tensor) -> Tensor:
        """A sample from π_θ(·|s) given standard normal noise ε (zeros give the mean action)."""
        return self.actor_mean(obs) + self.actor_logstd.exp() * noise  # a_t = μ_θ(s_t) + σ ε_t

    def log_prob(self, obs: Tensor, actions: Tensor) -> Tensor:
        """log π_θ(a|s) of a diagonal Gaussian: Σ_i [-(a_i-μ_i)²/(2σ_i²) - log σ_i - ½ log 2π]."""
        mean, log_std = self.actor_mean(obs), self.actor_logstd
        z = (actions - mean) / log_std.exp()
        return (-0.5 * z**2 - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)

    def entropy(self) -> Tensor:
        """Entropy of a diagonal Gaussian: Σ_i [log σ_i + ½ log(2πe)], the same for every state."""
        return (self.actor_logstd + 0.5 * np.log(2 * np.pi * np.e)).sum(-1)

    def value(self, obs: Tensor) -> Tensor:
        return self.critic(obs).squeeze(-1)


# ---- Rollout: act with π_old for T steps in N envs, store (s_t, a_t, r_t) -----------------------
def collect_rollout(envs, agent: Agent, obs_rms: RunningMeanStd, raw_obs: np.ndarray,
                    running_episodes: dict, num_steps: int, clip_obs: float,
                    device: torch.device) -> tuple[dict, np.ndarray, list]:
    """Step the envs num_steps times with the current policy (the statistics are only read); return
    the (T, N, ...) rollout, the raw observation to go on from, and the episodes that ended as
    (step, raw return, length). running_episodes holds each env's unfinished return and length."""
    action_space = envs.single_action_space
    T, N, obs_dim = num_steps, *raw_obs.shape  # the rollout's shape, as in compute_gae
    rollout = {"obs": np.zeros((T, N, obs_dim), np.float32),  # normalized s_t, as the policy saw it
               "next_raw_obs": np.zeros((T, N, obs_dim)),  # raw s_{t+1}, for the statistics
               "final_obs": np.zeros((T, N, obs_dim), np.float32),  # normalized s_{t+1} at an end
               "actions": np.zeros((T, N, *action_space.shape), np.float32),
               "rewards": np.zeros((T, N)),  # raw r_t
               "terminations": np.zeros((T, N), bool), "dones": np.zeros((T, N), bool)}
    finished = []
    with torch.inference_mode():  # no gradients while acting
        noise = torch.randn((T, N, *action_space.shape), device=device)  # all ε_t drawn at once
        for step in range(num_steps):
            rollout["obs"][step] = normalize_obs(raw_obs, obs_rms, clip_obs)
            obs = torch.as_tensor(rollout["obs"][step], device=device)
            action = agent.act(obs, noise[step]).cpu().numpy()
            rollout["actions"][step] = action  # the raw sample: its log-prob is what r_t needs
            env_action = np.clip(action, action_space.low, action_space.high)  # only the env clips
            raw_obs, rewards, terminations, truncations, infos = envs.step(env_action)
            done = terminations | truncations
            rollout["next_raw_obs"][step], rollout["rewards"][step] = raw_obs, rewards
            rollout["terminations"][step], rollout["dones"][step] = terminations, done
            running_episodes["return"] += rewards
            running_episodes["length"] += 1
            if done.any():  # a time-limit cut bootstraps from V(final obs), normalized like any s_t
                final_obs = np.stack(infos["final_obs"][done])
                rollout["final_obs"][step, done] = normalize_obs(final_obs, obs_rms, clip_obs)
                ended = zip(running_episodes["return"][done], running_episodes["length"][done])
                finished += [(step, episode_return, length) for episode_return, length in ended]
                running_episodes["return"][done], running_episodes["length"][done] = 0.0, 0
    return rollout, raw_obs, finished


# ---- Advantages Â_t by GAE(γ, λ), from the TD errors δ_t -----------------------------------------
def compute_gae(rewards, values, next_value, final_values, terminations, dones,
                gamma: float, gae_lambda: float):
    """Advantage estimates Â_t and value targets R_t = Â_t + V(s_t) for a (T, N) rollout.

    rewards r_t (scaled), values V(s_t), terminations and dones (terminated or truncated): (T, N);
    next_value = V(s_T) of the state after the rollout is (N,); final_values[t] = V(final obs) is
    read only where done_t: after an end, the next stored state is the reset one, not where it led.
        V(s_{t+1}) = final_values[t] if done_t else values[t+1]
        δ_t = r_t + γ (1 - terminated_t) V(s_{t+1}) - V(s_t)    a time-limit cut still bootstraps
        Â_t = δ_t + γλ (1 - done_t) Â_{t+1}                      no credit flows across an end
    """
    following = torch.cat([values[1:], next_value[None]])
    next_values = torch.where(dones.bool(), final_values, following)
    deltas = rewards + gamma * (1.0 - terminations) * next_values - values  # all δ_t at once
    decay = gamma * gae_lambda * (1.0 - dones)  # γλ, or 0 across an episode end
    advantages = torch.zeros_like(rewards)
    advantage = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):  # only the recursion runs step by step
        advantage = deltas[t] + decay[t] * advantage
        advantages[t] = advantage
    return advantages, advantages + values


def advantages_now(agent: Agent, rollout: dict, gamma: float, gae_lambda: float) -> dict:
    """V(s_t), Â_t and R_t of a (T, N) rollout, with the critic as it is now."""
    with torch.no_grad():
        values = agent.value(rollout["obs"])
        next_value = agent.value(rollout["next_obs"])
        final_values = agent.value(rollout["final_obs"])
        advantages, returns = compute_gae(rollout["rewards"], values, next_value, final_values,
                                          rollout["terminations"], rollout["dones"],
                                          gamma, gae_lambda)
    return {"values": values, "advantages": advantages, "returns": returns}


# ---- Loss: -L^CLIP + c1 L^VF - c2 S, from the ratio r_t(θ) --------------------------------------
def ppo_loss(new_logprob, old_logprob, advantages, new_value, old_value, returns, entropy,
             *, clip_coef: float, vf_coef: float, ent_coef: float, clip_vloss: bool):
    """The PPO objective as a loss to minimise, and its parts for logging (ε = clip_coef,
    c1 = vf_coef, c2 = ent_coef).
    r_t(θ) = π_θ(a_t|s_t) / π_old(a_t|s_t)
    L^CLIP = E[min(r_t Â_t, clip(r_t, 1-ε, 1+ε) Â_t)]   a pessimistic bound: no gain from r past 1±ε
    L^VF   = E[½ (V(s_t) - R_t)²]                       optionally the max with V clipped to V_old±ε
    S      = E[entropy of π_θ(·|s_t)]
    """
    log_ratio = new_logprob - old_logprob
    ratio = log_ratio.exp()
    clipped_ratio = ratio.clamp(1 - clip_coef, 1 + clip_coef)
    policy_loss = -torch.min(ratio * advantages, clipped_ratio * advantages).mean()
    value_error = (new_value - returns) ** 2
    if clip_vloss:
        clipped_value = old_value + (new_value - old_value).clamp(-clip_coef, clip_coef)
        value_error = torch.max(value_error, (clipped_value - returns) ** 2)
    value_loss = 0.5 * value_error.mean()
    entropy = entropy.mean()
    loss = policy_loss + vf_coef * value_loss - ent_coef * entropy
    with torch.no_grad():
        # approx KL: E[(r-1) - log r], an unbiased, never-negative estimate of KL(π_old || π_θ)
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clip_fraction = ((ratio - 1).abs() > clip_coef).float().mean()
    return loss, dict(policy_loss=policy_loss.detach(), value_loss=value_loss.detach(),
                      entropy=entropy.detach(), approx_kl=approx_kl, clip_fraction=clip_fraction)


# ---- Update: K epochs of minibatch Adam on the loss ---------------------------------------------
def ppo_update(agent: Agent, optimizer, batch: dict, rollout: dict, args: Args, ent_coef: float):
    """K epochs over the (T·N) batch, reshuffled each epoch, one Adam step per minibatch; they end
    early once an epoch's mean approximate KL exceeds --target-kl. Returns the update's mean stats
    (over its minibatches and the ranks), the epochs run and the last epoch's mean KL."""
    parameters = list(agent.parameters())
    batch_size = len(batch["obs"])
    minibatch_size = batch_size // args.num_minibatches
    update_stats, epochs_run, epoch_kl = [], 0, 0.0
    for epoch in range(args.update_epochs):
        if args.recompute_advantages and epoch > 0:
            batch = batch | flat(advantages_now(agent, rollout, args.gamma, args.gae_lambda))
        permutation = torch.randperm(batch_size, device=batch["obs"].device)
        shuffled = {name: x[permutation] for name, x in batch.items()}  # one gather per epoch
        epoch_stats = []
        for start in range(0, batch_size, minibatch_size):
            mb = {name: x[start : start + minibatch_size] for name, x in shuffled.items()}  # views
            if args.norm_adv:
                mean, std = mean_and_std(mb["advantages"])  # III: over all ranks' shares
                mb["advantages"] = (mb["advantages"] - mean) / (std + 1e-8)
            new_logprob = agent.log_prob(mb["obs"], mb["actions"])  # log π_θ(a_t|s_t)
            new_value = agent.value(mb["obs"])  # V_φ(s_t)
            loss, stats = ppo_loss(new_logprob, mb["logprobs"], mb["advantages"], new_value,
                                   mb["values"], mb["returns"], agent.entropy(),
                                   clip_coef=args.clip_coef, vf_coef=args.vf_coef,
                                   ent_coef=ent_coef, clip_vloss=args.clip_vloss)
            optimizer.zero_grad()
            loss.backward()
            average_gradients(parameters)  # III: the mean over ranks
            nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)
            optimizer.step()
            epoch_stats.append(stats)
        update_stats += epoch_stats
        epochs_run += 1
        # the epoch's mean, not one minibatch's; over all ranks: all stop after the same epoch
        kls = torch.stack([stats["approx_kl"] for stats in epoch_stats])
        epoch_kl = mean_over_ranks(kls.mean()).item()
        if args.target_kl is not None and epoch_kl > args.target_kl:
            break
    table = torch.stack([torch.stack(list(stats.values())) for stats in update_stats])
    means = mean_over_ranks(table.mean(0)).tolist()
    return dict(zip(update_stats[0], means)), epochs_run, epoch_kl


def flat(columns: dict) -> dict:
    """(T, N) tensors as the (T·N) columns of a batch."""
    return {name: x.reshape(-1) for name, x in columns.items()}


def adapted_lr_scale(lr_scale: float, epoch_kl: float, lr_kl_target: float | None) -> float:
    """--lr-kl-target: the step size's factor follows the update's KL, never past the schedule."""
    if lr_kl_target is not None and epoch_kl > 2 * lr_kl_target:
        return lr_scale / 1.5
    if lr_kl_target is not None and epoch_kl < lr_kl_target / 2:
        return min(1.0, lr_scale * 1.5)
    return lr_scale


# ---- Training loop: rollout → Â_t → K epochs of minibatch Adam, repeated ------------------------
def train(args: Args, checkpoint: dict | None = None, run_dir: str | None = None):
    """Train, afresh or on from a checkpoint (in run_dir: see resume_dir); return the run
    directory and the final evaluation's raw returns."""
    validate(args)
    rank, world_size = rank_and_world_size()
    batch_size = args.num_envs * args.num_steps  # samples per rollout on each rank
    num_iterations = args.total_timesteps // (batch_size * world_size)
    if args.capture_video:
        check_rendering(args.env_id)
    for seed in (random.seed, np.random.seed, torch.manual_seed):
        seed(args.seed + rank)  # ranks draw apart; rank 0 draws what one process would
    torch.set_num_threads(args.torch_threads)
    device = pick_device(args.cuda)
    obs_dim, action_dim = (space.shape[0] for space in checked_spaces(args.env_id, args.rescale_actions))
    agent = Agent(obs_dim, action_dim, args.init_logstd, args.actor_width,
                  args.critic_width).to(device)
    obs_rms = RunningMeanStd((obs_dim,))
    if checkpoint is not None:
        agent, obs_rms = load_policy(checkpoint, args.env_id, device)
    broadcast_from_rank_0(agent)  # III: every rank starts from rank 0's weights
    # fused: one kernel for the whole Adam step, not several per tensor (~20% faster on a CPU)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    reward_scaler = RewardScaler(args.num_envs, args.gamma, args.clip_reward)
    global_step, start_iteration, lr_scale = restore_training_state(checkpoint, optimizer,
                                                                    reward_scaler, args.seed)
    running_episodes = {"return": np.zeros(args.num_envs), "length": np.zeros(args.num_envs, int)}

    envs_args = (make_vector_env, args.env_id, args.num_envs, args.vector_mode, args.rescale_actions)
    with (Run(args, run_dir, global_step, num_iterations) as run, StopSignals() as stop,
          contextlib.closing(stop.shielded(*envs_args)) as envs):
        # a resumed run starts fresh episodes (env state is not saved), seeded apart
        raw_obs, _ = envs.reset(seed=args.seed + rank * args.num_envs + global_step)
        for iteration in range(start_iteration, num_iterations + 1):
            remaining = 1.0 - (iteration - 1.0) / num_iterations  # the share of training ahead
            lr = lr_scale * args.learning_rate * (remaining if args.anneal_lr else 1.0)
            optimizer.param_groups[0]["lr"] = lr
            ent_coef = args.ent_coef * (remaining if args.anneal_ent_coef else 1.0)
            rollout_start = time.time()
            rollout, raw_obs, finished = collect_rollout(envs, agent, obs_rms, raw_obs,
                                                         running_episodes, args.num_steps,
                                                         args.clip_obs, device)
            global_step += batch_size * world_size

            # -- Â_t and R_t by GAE, and log π_old(a_t|s_t) of the whole batch at once -------------
            update_start = time.time()
            next_obs = normalize_obs(raw_obs, obs_rms, args.clip_obs)  # s_T, normalized like s_t
            obs_rms.update(rollout.pop("next_raw_obs").reshape(-1, obs_dim))  # between rollouts
            rollout["rewards"] = reward_scaler(rollout["rewards"], rollout["dones"])  # r_t / std(G)
            rollout = {name: torch.as_tensor(x, dtype=torch.float32, device=device)
                       for name, x in {**rollout, "next_obs": next_obs}.items()}
            batch = {"obs": rollout["obs"].reshape(-1, obs_dim),
                     "actions": rollout["actions"].reshape(-1, action_dim)}
            with torch.no_grad():  # π_old is the policy that acted
                batch["logprobs"] = agent.log_prob(batch["obs"], batch["actions"])
            batch |= flat(advantages_now(agent, rollout, args.gamma, args.gae_lambda))

            # -- K epochs of minibatch Adam on -L^CLIP + c1 L^VF - c2 S ----------------------------
            stats, epochs, last_kl = ppo_update(agent, optimizer, batch, rollout, args, ent_coef)
            lr_scale = adapted_lr_scale(lr_scale, last_kl, args.lr_kl_target)

            # -- Around: guard, log, checkpoint, stop (part II) ------------------------------------
            run.check_finite(global_step, stats, obs_rms, reward_scaler, agent)
            run.log_iteration(global_step, finished, batch, stats, lr=lr, epochs_run=epochs,
                              timings=(rollout_start, update_start))
            if args.checkpoint_every and iteration % args.checkpoint_every == 0:
                run.save(agent, optimizer, obs_rms, reward_scaler, global_step, lr_scale)
            if stop.agreed():  # honoured between iterations: what is saved is consistent
                break
        if stop.agreed() or args.save_model:  # a stopped run is saved even with --no-save-model
            run.save(agent, optimizer, obs_rms, reward_scaler, global_step, lr_scale, say=True)
        stop.exit_if_stopped()  # else restore the handlers: a signal in evaluation stops at once
        eval_returns = run.final_evaluation(agent, obs_rms, global_step)
    return run.dir, eval_returns


# ==== II. Around the algorithm: validation, guards, logging, signals, evaluation, checkpoints =====
RULES = [  # the domain of every numeric option (a comparison with NaN is False, so NaN fails every rule)
    (("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "torch_threads",
      "actor_width", "critic_width"), lambda v: v > 0, "must be positive"),
    (("learning_rate", "clip_coef", "max_grad_norm", "clip_obs", "clip_reward", "target_kl", "lr_kl_target"),
     lambda v: v is None or 0 < v < np.inf, "must be positive and finite"),
    (("vf_coef", "ent_coef"), lambda v: 0 <= v < np.inf, "must be finite and not negative"),
    (("gamma", "gae_lambda"), lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    (("checkpoint_every", "eval_episodes"), lambda v: v >= 0, "must not be negative"),
    (("seed",), lambda v: 0 <= v < 2**32, "must be in [0, 2**32)"),
    (("init_logstd",), lambda v: -20 <= v <= 20, "must be in [-20, 20]"),
]


def one_line(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).partition(chr(10))[0]}"


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def validate(args: Args) -> None:
    """Reject an option outside its domain, or inconsistent options, in one line before anything is built."""
    for names, rule, requirement in RULES:
        for name in (name for name in names if not rule(getattr(args, name))):
            raise SystemExit(f"error: {flag(name)} {requirement}, got {getattr(args, name)}")
    if args.exp_name in ("", ".", "..") or any(separator in args.exp_name for separator in "/\\"):
        raise SystemExit(f"error: --exp-name must be a name, not a path (no / or \\, not . or ..): {args.exp_name!r}")
    batch_size, world_size = args.num_envs * args.num_steps, rank_and_world_size()[1]
    if batch_size % args.num_minibatches:
        raise SystemExit(f"error: samples per rollout ({args.num_envs} envs x {args.num_steps} steps = {batch_size}) "
                         f"is not divisible by --num-minibatches {args.num_minibatches}")
    if args.seed + world_size > 2**32:  # rank r seeds with seed + r
        raise SystemExit(f"error: --seed {args.seed} leaves no seed for rank {world_size - 1}: must be below "
                         f"{2**32 - world_size + 1} with {world_size} ranks")
    if args.total_timesteps < batch_size * world_size:
        raise SystemExit(f"error: --total-timesteps {args.total_timesteps} is less than one rollout "
                         f"({batch_size * world_size}: {world_size} rank(s) x {batch_size})")


def progress_line(global_step: int, total_steps: int, sps: int, recent_returns: deque) -> str:
    minutes, seconds = divmod(round((total_steps - global_step) / max(sps, 1)), 60)
    recent = f"{np.mean(recent_returns):.1f} over last {len(recent_returns)} episodes" if recent_returns else "none yet"
    return f"step {global_step:>9,}/{total_steps:,} | {sps:,} SPS | {minutes}:{seconds:02d} left | return {recent}"


def make_run_dir(args: Args, run_dir: str | None = None) -> str:
    """run_dir (a resumed run's), or a new runs/<env>__<exp-name>__<seed>__<unix time>[__2, __3, ...]: creating a
    directory is atomic, so runs started in the same second never share one."""
    base = run_dir or f"runs/{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    for candidate in itertools.chain([base], (f"{base}__{n}" for n in itertools.count(2))):
        try:
            os.makedirs(candidate, exist_ok=run_dir is not None)
            return candidate
        except FileExistsError:
            continue
        except OSError as error:
            raise SystemExit(f"error: cannot create run directory {candidate}: {error.strerror or error}")


class Run:
    """What a run writes: its directory, its checkpoint, and rank 0's TensorBoard events and progress lines."""

    def __init__(self, args: Args, run_dir: str | None, global_step: int, num_iterations: int):
        self.args, (rank, self.world_size) = args, rank_and_world_size()
        self.is_rank_0, self.writer, self.recent_returns = rank == 0, None, deque(maxlen=10)
        self.dir = on_rank_0(make_run_dir, args, run_dir)
        self.checkpoint_path = os.path.join(self.dir, "checkpoint.pt")
        self.total_steps = num_iterations * args.num_envs * args.num_steps * self.world_size
        self.start_step, self.start_time, self.last_print = global_step, time.time(), 0.0
        if self.is_rank_0:  # purge_step: what an earlier session logged after the step resumed from goes
            if global_step and not run_dir:
                print(f"{args.resume} is not a run's own checkpoint.pt: training goes on in {self.dir}", flush=True)
            self.writer = SummaryWriter(self.dir, purge_step=global_step + 1 if run_dir else None)
            table = "\n".join(f"|{name}|{value}|" for name, value in vars(args).items())
            self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}", global_step)

    def __enter__(self):
        return self

    def __exit__(self, exception_type, *exception) -> None:
        if self.writer is not None:
            self.writer.close()
            if exception_type is None:
                print("TensorBoard: tensorboard --logdir runs", flush=True)

    def last_checkpoint_note(self) -> str:
        path = self.checkpoint_path
        return f"the last good checkpoint is {path}" if os.path.exists(path) else "no checkpoint was written"

    def check_finite(self, global_step: int, stats: dict, obs_rms, reward_scaler, agent) -> None:
        """Stop before a non-finite value reaches a checkpoint (stats are means over ranks: all ranks agree)."""
        guarded = [list(stats.values()), obs_rms.mean, obs_rms.var, reward_scaler.return_rms.var]
        if not (all(np.isfinite(x).all() for x in guarded) and all(p.isfinite().all() for p in agent.parameters())):
            iteration = global_step // (self.args.num_envs * self.args.num_steps * self.world_size)
            raise SystemExit(f"error: loss, parameters or statistics became non-finite at iteration {iteration} "
                             f"(step {global_step}); {self.last_checkpoint_note()}")

    def log_iteration(self, global_step: int, finished: list, batch: dict, stats: dict, *, lr: float,
                      epochs_run: int, timings: tuple[float, float]) -> None:
        """Every rank's finished episodes (a collective), the update's stats and timings; a line every 10 s."""
        finished = sorted(sum(all_ranks(finished), []), key=lambda episode: episode[0])  # by step
        (rollout_start, update_start), now = timings, time.time()
        sps = int((global_step - self.start_step) / (now - self.start_time))
        if not self.is_rank_0:
            return
        steps_per_env_step = self.args.num_envs * self.world_size
        for step, episode_return, episode_length in finished:
            episode_end = global_step - (self.args.num_steps - step - 1) * steps_per_env_step
            self.writer.add_scalar("charts/episodic_return", episode_return, episode_end)
            self.writer.add_scalar("charts/episodic_length", episode_length, episode_end)
            self.recent_returns.append(episode_return)
        var_returns, var_errors = batch["returns"].var().item(), (batch["returns"] - batch["values"]).var().item()
        scalars = {f"losses/{name}": value for name, value in stats.items()} | {
            "losses/explained_variance": 1 - var_errors / var_returns if var_returns else float("nan"),
            "charts/learning_rate": lr, "charts/epochs_run": epochs_run, "charts/SPS": sps,
            "charts/rollout_seconds": update_start - rollout_start, "charts/update_seconds": now - update_start}
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step)
        if now - self.last_print > 10 or global_step >= self.total_steps:
            self.last_print = now
            print(progress_line(global_step, self.total_steps, sps, self.recent_returns), flush=True)

    def save(self, agent, optimizer, obs_rms, reward_scaler, global_step: int, lr_scale: float, say=False) -> None:
        state = training_state(self.args, agent, optimizer, obs_rms, reward_scaler, global_step, lr_scale)
        on_rank_0(save_checkpoint, self.checkpoint_path, state)
        if say and self.is_rank_0:
            print(f"checkpoint of step {global_step:,} saved to {self.checkpoint_path}", flush=True)

    def final_evaluation(self, agent: "Agent", obs_rms: RunningMeanStd, global_step: int) -> list[float]:
        """--eval-episodes episodes with the mean action (sampled with --eval-stochastic), on rank 0 alone."""
        if not (self.args.eval_episodes and self.is_rank_0):
            return []
        video_dir = os.path.join(self.dir, "videos") if self.args.capture_video else None
        returns = evaluate(agent, obs_rms, self.args.env_id, episodes=self.args.eval_episodes, seed=self.args.seed,
                           clip_obs=self.args.clip_obs, rescale_actions=self.args.rescale_actions,
                           stochastic=self.args.eval_stochastic, video_dir=video_dir)
        self.writer.add_scalar("eval/mean_return", np.mean(returns), global_step)
        self.writer.add_scalar("eval/std_return", np.std(returns), global_step)
        print(f"evaluation: return {np.mean(returns):.1f} ± {np.std(returns):.1f} over {len(returns)} episodes")
        return returns


class StopSignals:
    """SIGINT and SIGTERM, honoured between iterations rather than at once, so that what is saved is consistent."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.received, self.signal = [], 0  # signal: the one every rank agreed to stop on (0: none yet)
        handler = lambda signum, _: self.received.append(signum)  # noqa: E731
        self.default_handlers = {signum: signal.signal(signum, handler) for signum in self.SIGNALS}
        return self

    def __exit__(self, error_type=None, *_) -> None:
        if error_type is not None and dist.is_initialized():
            return  # III: on its way out; the launcher's SIGTERM to the survivors must not cut the line that says why
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
        for signum, handler in self.default_handlers.items():
            signal.signal(signum, handler)

    def shielded(self, function, *args):
        """function(*args) with the signals blocked, so that the subprocesses it starts (async workers) ignore them;
        POSIX (Linux, macOS), as are the MuJoCo setups README covers."""
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        try:
            return function(*args)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)

    def agreed(self) -> bool:
        """Whether any rank got a signal (a collective: every rank stops after the same iteration)."""
        self.signal = self.signal or max(all_ranks(self.received[0] if self.received else 0))
        return self.signal != 0

    def exit_if_stopped(self) -> None:
        """Exit as a shell reports a process that the signal stopped (128 + its number); else, training over, give
        the signals back their default handlers."""
        self.__exit__()
        if self.signal:
            if rank_and_world_size()[0] == 0:
                print(f"stopped by {signal.Signals(self.signal).name}", flush=True)
            raise SystemExit(128 + self.signal)


def check_rendering(env_id: str) -> None:
    """Exit with one line, before any training, if --capture-video could not record env_id."""
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless MuJoCo; read when its renderer is created
    try:
        import moviepy  # noqa: F401  (gymnasium's RecordVideo writes through it)
        env = gym.make(env_id, render_mode="rgb_array")
        env.reset(seed=0)
        if env.render() is None:
            raise ValueError("render() returned no frame")
        env.close()
    except Exception as error:  # each rendering backend fails in its own way
        raise SystemExit(f"error: --capture-video cannot render {env_id} ({one_line(error)}); install moviepy, and "
                         "for headless MuJoCo MUJOCO_GL=egl (apt install libegl1) or osmesa (apt install libosmesa6)")


def evaluate(agent: Agent, obs_rms: RunningMeanStd, env_id: str, *, episodes: int, seed: int, clip_obs: float,
             rescale_actions: bool, stochastic: bool = False, video_dir: str | None = None) -> list[float]:
    """Raw returns of `episodes` episodes in a fresh env; the statistics are only read, never updated."""
    render = {"render_mode": "rgb_array"} if video_dir else {}  # not every env takes one
    env = make_env(env_id, rescale_actions, **render)
    if video_dir:
        env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda _: True, name_prefix="eval")
    device = next(agent.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)  # its own RNG: evaluating never shifts training's
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed if episode == 0 else None)
        done, episode_return = False, 0.0
        while not done:
            with torch.inference_mode():
                policy_obs = torch.tensor(normalize_obs(obs[None], obs_rms, clip_obs), dtype=torch.float32).to(device)
                noise = torch.randn(agent.actor_logstd.shape, generator=generator, device=device)
                action = agent.act(policy_obs, noise if stochastic else torch.zeros_like(noise))[0].cpu().numpy()
            obs, reward, terminated, truncated, _ = env.step(action.clip(env.action_space.low, env.action_space.high))
            episode_return += float(reward)
            done = terminated or truncated
        returns.append(episode_return)
    env.close()
    if not np.isfinite(returns).all():
        raise SystemExit(f"error: evaluation on {env_id} gave non-finite returns {returns}")
    return returns


# ---- Checkpoints: everything needed to evaluate or continue a run, and how it comes back ---------------------
CHECKPOINT_FORMAT = "ppo_continuous/1"
ARG_NAMES = [field.name for field in dataclasses.fields(Args)]
CHECKPOINT_FIELDS = ("format", "args", "obs_dim", "action_dim", "agent", "optimizer", "obs_rms", "return_rms",
                     "global_step", "iteration", "world_size", "lr_scale", "torch_rng", "cuda_rng")
# Settings that may be given again when a run is resumed: they change how it runs, not what it learns.
RUNTIME_SETTINGS = {"cuda", "torch_threads", "vector_mode", "save_model", "checkpoint_every", "resume",
                    "eval_checkpoint", "eval_episodes", "eval_stochastic", "capture_video"}


def training_state(args, agent, optimizer, obs_rms, reward_scaler, global_step: int, lr_scale: float) -> dict:
    device, world_size = agent.actor_logstd.device, rank_and_world_size()[1]
    return {"format": CHECKPOINT_FORMAT, "args": vars(args), "obs_dim": agent.actor_mean[0].in_features,
            "action_dim": agent.actor_logstd.shape[0], "agent": agent.state_dict(),
            "optimizer": optimizer.state_dict(), "obs_rms": obs_rms.state_dict(),
            "return_rms": reward_scaler.return_rms.state_dict(), "global_step": global_step,
            "iteration": global_step // (args.num_envs * args.num_steps * world_size),
            "world_size": world_size, "lr_scale": lr_scale,  # ranks that trained it; the KL-adapted step size factor
            # torch's generators are the only ones the loop draws from (each environment carries its own);
            # only the GPU in use is asked: asking for all of them would start CUDA in a CPU run
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []}


def restore_training_state(checkpoint: dict | None, optimizer, reward_scaler, seed: int) -> tuple[int, int, float]:
    """training_state's inverse for what the policy does not hold (Adam's moments, the return statistics, the random
    state); returns the step, the next iteration and the step-size factor (a fresh run: 0, 1, 1.0)."""
    if checkpoint is None:
        return 0, 1, 1.0
    rank, world_size = rank_and_world_size()
    if checkpoint["world_size"] != world_size:
        raise SystemExit(f"error: the checkpoint was trained by {checkpoint['world_size']} ranks; resume it with "
                         f"as many (torchrun --nproc-per-node), not {world_size}")
    optimizer.load_state_dict(checkpoint["optimizer"])
    reward_scaler.return_rms.load_state_dict(checkpoint["return_rms"])
    device = optimizer.param_groups[0]["params"][0].device
    if rank == 0:  # the checkpoint holds rank 0's generators; the other ranks draw anew, seeded apart
        torch.set_rng_state(checkpoint["torch_rng"])
        if device.type == "cuda" and checkpoint["cuda_rng"]:
            torch.cuda.set_rng_state(checkpoint["cuda_rng"][0], device)
    else:
        torch.manual_seed(seed + rank + checkpoint["global_step"])
    return checkpoint["global_step"], checkpoint["iteration"] + 1, checkpoint["lr_scale"]


def leaves(value, name: str = "") -> list[tuple[str, object]]:
    """(name, value) of every tensor and plain value in a nested checkpoint, in order, named like obs_rms.var."""
    if not isinstance(value, (dict, list, tuple)):
        return [(name, value)]
    items = value.items() if isinstance(value, dict) else enumerate(value)
    return [leaf for key, item in items for leaf in leaves(item, f"{name}.{key}" if name else str(key))]


def content_digest(state: dict) -> str:
    """SHA-256 of a checkpoint's contents: every tensor's bytes and every other value's repr, with their names."""
    digest = hashlib.sha256()
    for name, value in leaves(state):
        is_tensor = isinstance(value, Tensor)
        digest.update(f"{name}={value.dtype}{list(value.shape) if is_tensor else ''}:".encode() if is_tensor
                      else f"{name}={value!r};".encode())
        if is_tensor:
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: str, state: dict) -> None:
    """Write to a temporary file, then rename: a crash or a full disk mid-write never harms the last checkpoint."""
    buffer = io.BytesIO()
    torch.save(state | {"sha256": content_digest(state)}, buffer)  # in memory first: a failed write is an OSError
    try:
        with open(path + ".tmp", "wb") as file:
            file.write(buffer.getbuffer())
            os.fsync(file.fileno())
        os.replace(path + ".tmp", path)
    except OSError as error:
        if os.path.isfile(path + ".tmp"):
            os.remove(path + ".tmp")
        kept = f"the last good checkpoint is {path}" if os.path.exists(path) else "no checkpoint was written"
        raise SystemExit(f"error: cannot write checkpoint {path}: {error.strerror or error}; {kept}")


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} does not exist")
    try:
        # weights_only: tensors and plain Python values only, so a checkpoint cannot run code when loaded
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch reports truncated or foreign files with many exception types
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(error).__name__})")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"error: {path} is not a {CHECKPOINT_FORMAT} checkpoint")
    if "sha256" in checkpoint and checkpoint.pop("sha256") != content_digest(checkpoint):  # older ones carry none
        raise SystemExit(f"error: {path} is corrupted: its contents do not match the checksum saved with them")
    # what checkpoints written before these fields existed mean: one process, no adaptive step size, a constant c2,
    # 64-wide networks and actions in the env's own bounds
    checkpoint = {"world_size": 1, "lr_scale": 1.0} | checkpoint
    if isinstance(checkpoint.get("args"), dict):
        earlier = {"lr_kl_target": None, "anneal_ent_coef": False, "actor_width": 64, "critic_width": 64,
                   "rescale_actions": False}
        checkpoint["args"] = earlier | checkpoint["args"]
    missing = [name for name in CHECKPOINT_FIELDS if name not in checkpoint]
    missing += [f"{part}.{key}" for part in ("obs_rms", "return_rms") for key in ("mean", "var", "count")
                if part in checkpoint and key not in checkpoint[part]]
    missing += [f"args.{name}" for name in ARG_NAMES if name not in checkpoint.get("args", {})]
    if missing:
        raise SystemExit(f"error: {path} is an incomplete checkpoint: it lacks {', '.join(missing)}")
    numbers = [(name, torch.as_tensor(value)) for name, value in leaves(checkpoint) if name.split(".")[0] != "args"
               and isinstance(value, (Tensor, float))]
    if non_finite := [name for name, value in numbers if value.is_floating_point() and not value.isfinite().all()]:
        raise SystemExit(f"error: {path} holds non-finite values in {', '.join(non_finite)}")
    return checkpoint


def load_policy(checkpoint: dict, env_id: str, device: torch.device) -> tuple[Agent, RunningMeanStd]:
    """The saved actor-critic and its observation statistics, after checking that they fit env_id."""
    obs_dim, action_dim = (space.shape[0] for space in checked_spaces(env_id, checkpoint["args"]["rescale_actions"]))
    if (obs_dim, action_dim) != (checkpoint["obs_dim"], checkpoint["action_dim"]):
        raise SystemExit(f"error: checkpoint was trained with {checkpoint['obs_dim']} observations and "
                         f"{checkpoint['action_dim']} actions, but {env_id} has {obs_dim} and {action_dim}")
    widths = {name: checkpoint["args"][name] for name in ("actor_width", "critic_width")}
    agent = Agent(obs_dim, action_dim, **widths).to(device)
    try:
        agent.load_state_dict(checkpoint["agent"])
    except RuntimeError as error:  # missing, unexpected or misshapen weights
        raise SystemExit(f"error: the checkpoint's weights do not fit the network: {one_line(error)}")
    obs_rms = RunningMeanStd((obs_dim,))
    obs_rms.load_state_dict(checkpoint["obs_rms"])
    return agent, obs_rms


def resume_args(args: Args, checkpoint: dict, given: set[str]) -> Args:
    """The checkpoint's settings, but the runtime ones and --total-timesteps as given; other given ones must agree."""
    saved = {name: checkpoint["args"][name] for name in ARG_NAMES}
    for name in sorted(given - RUNTIME_SETTINGS - {"total_timesteps"}):
        if getattr(args, name) != saved[name]:
            raise SystemExit(f"error: --resume continues a run with its saved settings, but {flag(name)} "
                             f"{getattr(args, name)} differs from the checkpoint's {saved[name]}")
    if "total_timesteps" in given and args.total_timesteps < checkpoint["global_step"]:
        raise SystemExit(f"error: --total-timesteps {args.total_timesteps} is below the checkpoint's step "
                         f"{checkpoint['global_step']}")
    changed = given & (RUNTIME_SETTINGS | {"total_timesteps"})
    resumed = Args(**{**saved, **{name: getattr(args, name) for name in changed}, "resume": args.resume})
    if checkpoint["iteration"] >= resumed.total_timesteps // (resumed.num_envs * resumed.num_steps
                                                               * checkpoint["world_size"]):
        raise SystemExit(f"error: the checkpoint has trained all {resumed.total_timesteps:,} steps of its run: nothing "
                         "is left to train (give a larger --total-timesteps to go on)")
    return resumed


def resume_dir(path: str) -> str | None:
    """Where a resumed run writes: the folder of the run's own checkpoint.pt, from the path given, never from the
    file; any other file (a copy, another name) goes on in a new run directory, so it never overwrites newer work."""
    return (os.path.dirname(path) or ".") if os.path.basename(path) == "checkpoint.pt" else None


def evaluate_checkpoint(args: Args, given: set[str]) -> None:
    """--eval-checkpoint: the saved policy and statistics on a fresh env of the checkpoint's id (or the given one)."""
    validate(args)
    if args.eval_episodes < 1:
        raise SystemExit("error: --eval-episodes must be at least 1 with --eval-checkpoint")
    checkpoint = load_checkpoint(args.eval_checkpoint)
    env_id = args.env_id if "env_id" in given else checkpoint["args"]["env_id"]
    agent, obs_rms = load_policy(checkpoint, env_id, pick_device(args.cuda))
    if args.capture_video:
        check_rendering(env_id)
    video_dir = os.path.join(os.path.dirname(args.eval_checkpoint), "videos") if args.capture_video else None
    returns = evaluate(agent, obs_rms, env_id, episodes=args.eval_episodes, seed=args.seed, video_dir=video_dir,
                       clip_obs=checkpoint["args"]["clip_obs"], rescale_actions=checkpoint["args"]["rescale_actions"],
                       stochastic=args.eval_stochastic)
    print(f"{env_id}: return {np.mean(returns):.1f} ± {np.std(returns):.1f} over {len(returns)} episodes "
          f"({'sampled' if args.eval_stochastic else 'mean'} actions)")


def pick_device(cuda: bool) -> torch.device:
    """The GPU of this rank on its node (torchrun's LOCAL_RANK; 0 without it), or the CPU."""
    if cuda and torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"error: --cuda: local rank {local_rank} has no GPU of its own, this node shows "
                             f"{torch.cuda.device_count()}: start at most that many ranks per node")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def show_repeated_warnings_once() -> None:
    """Every sub-environment repeats the same notices (a deprecated id, MuJoCo model warnings): show each once."""
    seen, show = set(), warnings.showwarning  # by text: filter changes reset Python's own "once"
    warnings.showwarning = lambda message, *rest: str(message) in seen or seen.add(str(message)) or show(message, *rest)
    try:
        import mujoco
    except Exception:  # not installed, or a rendering setup it rejects (a bad MUJOCO_GL): no MuJoCo notices then
        return
    mujoco.set_mju_user_warning(lambda text: text in seen or seen.add(text) or print("WARNING:", text, file=sys.stderr))


# ==== III. Data parallel: under torchrun, N ranks train one policy ===============================
# Each rank steps its own envs and computes gradients on its share of every minibatch. Ranks start from rank 0's
# weights and then exchange, every step, what keeps them equal: the mean gradient (all-reduced by hand before
# clipping, so no DistributedDataParallel wrapper whose .module would skip it), the KL that ends the epochs, the
# batches' normalization moments, and the stop signal. Without torchrun none of them communicates.
def all_ranks(value) -> list:
    """value from every rank, in rank order (without torchrun, [value])."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def mean_over_ranks(tensor: Tensor) -> Tensor:
    """The mean over ranks, in place."""
    if dist.is_initialized():
        dist.all_reduce(tensor)  # a sum: gloo has no average
        tensor /= dist.get_world_size()
    return tensor


def average_gradients(parameters: list[Tensor]) -> None:
    """Every rank's gradient becomes the mean over ranks: the whole minibatch's, as the ranks' shares are equal."""
    if dist.is_initialized():
        flat = mean_over_ranks(torch.cat([p.grad.reshape(-1) for p in parameters]))  # one exchange for all tensors
        for p, grad in zip(parameters, flat.split([p.numel() for p in parameters])):
            p.grad.copy_(grad.view_as(p))


def mean_and_std(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (Bessel-corrected) standard deviation of x over the samples of all ranks."""
    if not dist.is_initialized():
        return x.mean(), x.std()
    mean, count = mean_over_ranks(x.mean()), x.numel() * dist.get_world_size()
    return mean, (mean_over_ranks(((x - mean) ** 2).mean()) * count / (count - 1)).sqrt()


def broadcast_from_rank_0(module: nn.Module) -> None:
    if dist.is_initialized():
        for parameter in module.parameters():
            dist.broadcast(parameter.data, src=0)


def start_ranks(device: torch.device) -> None:
    """Join the other ranks when torchrun started this process (it sets WORLD_SIZE, RANK, LOCAL_RANK)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


@contextlib.contextmanager
def leaving_cleanly_as_a_rank():
    """Under torchrun, the block, then the end of this rank with the exit status the block gave, without Python's
    teardown: gloo's worker threads can still be releasing the last exchange's tensors, and a tensor released while
    the interpreter finalizes aborts the rank ("terminate called without an active exception"). A rank whose peer
    died leaves with one line."""
    if not dist.is_initialized():
        yield
        return
    status = 0
    try:
        yield
    except SystemExit as stop:  # an error line, or 128 + a signal's number
        status = stop.code
    except (RuntimeError, dist.DistError) as error:  # an exchange whose peer is gone: a rank died or was killed
        if not isinstance(error, dist.DistError) and "Connection" not in str(error):
            raise
        status = (f"error: rank {dist.get_rank()} lost its connection to another rank, which stopped or died "
                  f"(its own output says why): {one_line(error)}")
    dist.destroy_process_group()
    if isinstance(status, str):
        print(status, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if isinstance(status, str) else status or 0)


def rank_and_world_size() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def on_rank_0(function, *args):
    """function(*args) run by rank 0 alone, its result shared with every rank; if it exits with an error (a full
    disk, say), every rank exits with it instead of waiting for rank 0 in the next exchange."""
    outcome = None
    if rank_and_world_size()[0] == 0:
        try:
            outcome = function(*args)
        except SystemExit as error:
            outcome = error
    outcome = all_ranks(outcome)[0]
    if isinstance(outcome, SystemExit):
        raise outcome
    return outcome


def main() -> None:
    args = tyro.cli(Args)
    # What the user typed counts, even a default typed out (--env-id HalfCheetah-v4 against a Pendulum checkpoint).
    given = {token[2:].split("=")[0].replace("-", "_") for token in sys.argv[1:] if token.startswith("--")}
    given = {name.removeprefix("no_") for name in given} & set(ARG_NAMES)  # --no-cuda sets cuda
    checkpoint = load_checkpoint(args.resume) if args.resume and not args.eval_checkpoint else None
    args = resume_args(args, checkpoint, given) if checkpoint else args
    if not args.capture_video:  # nothing renders: a MUJOCO_GL that MuJoCo rejects at import must not matter
        os.environ["MUJOCO_GL"] = "disable"
    show_repeated_warnings_once()
    if args.eval_checkpoint:
        return evaluate_checkpoint(args, given)
    start_ranks(pick_device(args.cuda))
    with leaving_cleanly_as_a_rank():  # III; alone, nothing
        train(args, checkpoint, resume_dir(args.resume) if checkpoint else None)


if __name__ == "__main__":
    main()
