"""Proximal Policy Optimization (Schulman et al. 2017) for continuous actions, in one file.

    python ppo_continuous.py --env-id HalfCheetah-v4

Read top to bottom: arguments, environments, normalization, actor-critic, GAE (Â_t),
the clipped loss (L^CLIP, L^VF, S), then the training loop that ties them together.
"""

import os
import random
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from gymnasium.vector import AutoresetMode
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    env_id: str = "HalfCheetah-v4"
    """gymnasium id of an environment with a Box action space"""
    total_timesteps: int = 1_000_000
    """environment steps to train for, summed over all sub-environments"""
    seed: int = 1
    """seed for torch, numpy, random and the environments"""
    exp_name: str = "ppo_continuous"
    """name of the experiment, part of the run directory name"""
    cuda: bool = True
    """use the GPU when one is available (falls back to the CPU otherwise)"""
    torch_deterministic: bool = True
    """make cuDNN deterministic so a seed reproduces a run"""
    torch_threads: int = 1
    """CPU threads for torch; small MLPs run fastest on one"""

    num_envs: int = 8
    """sub-environments stepped together; the policy sees them as one batch"""
    vector_mode: Literal["sync", "async"] = "sync"
    """sync steps the sub-environments in this process, async in one subprocess each"""
    num_steps: int = 256
    """steps per sub-environment in each rollout (samples per rollout = num_envs * num_steps)"""

    learning_rate: float = 2e-3
    """Adam step size at the start of training"""
    anneal_lr: bool = True
    """decay the learning rate linearly to zero over training"""
    gamma: float = 0.99
    """discount factor γ"""
    gae_lambda: float = 0.95
    """GAE λ: 0 gives the one-step TD error, 1 the Monte-Carlo return minus V"""
    num_minibatches: int = 4
    """minibatches each rollout is split into (4 of 512 samples: few, large Adam steps are fast on a CPU)"""
    update_epochs: int = 15
    """passes over each rollout (15: the tight clip range below leaves room for more passes)"""
    norm_adv: bool = False
    """normalize advantages within each minibatch"""
    clip_coef: float = 0.1
    """clip range ε of the probability ratio r_t(θ) (0.1: at this step size 0.2 lets the policy overshoot)"""
    clip_vloss: bool = False
    """also clip the value prediction to ±ε around the old value"""
    ent_coef: float = 0.0
    """weight of the entropy bonus S"""
    vf_coef: float = 0.25
    """weight of the value loss L^VF"""
    max_grad_norm: float = 0.5
    """clip the global gradient norm to this"""
    init_logstd: float = -1.0
    """initial log σ of the Gaussian policy (-1: σ ≈ 0.37)"""
    recompute_advantages: bool = False
    """recompute Â_t and R_t with the current critic before every epoch, not only the first"""
    target_kl: float | None = None
    """stop the epochs of an update early once the approximate KL exceeds this"""

    clip_obs: float = 10.0
    """clip normalized observations to ±this"""
    clip_reward: float = 10.0
    """clip scaled rewards to ±this"""

    save_model: bool = True
    """write runs/<run>/checkpoint.pt at the end of training (and on Ctrl-C)"""
    checkpoint_every: int = 0
    """also write the checkpoint every this many iterations (0: only at the end)"""
    resume: str | None = None
    """continue training from this checkpoint, with its saved settings, in its run directory"""
    eval_checkpoint: str | None = None
    """evaluate this checkpoint instead of training, and print mean ± std of the raw returns"""
    eval_episodes: int = 10
    """episodes in the evaluation after training or of --eval-checkpoint (0: none after training)"""
    eval_stochastic: bool = False
    """evaluate by sampling actions instead of taking the mean action"""
    capture_video: bool = False
    """record the evaluation episodes to runs/<run>/videos/ (MuJoCo headless needs MUJOCO_GL=egl or osmesa)"""


def validate(args: Args) -> None:
    """Reject inconsistent arguments with a one-line message before anything is built."""
    for name in ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "torch_threads"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("checkpoint_every", "eval_episodes"):
        if getattr(args, name) < 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    for name in ("learning_rate", "clip_coef", "max_grad_norm", "clip_obs", "clip_reward"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("gamma", "gae_lambda"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    batch_size = args.num_envs * args.num_steps
    if batch_size % args.num_minibatches:
        raise SystemExit(
            f"error: samples per rollout ({args.num_envs} envs x {args.num_steps} steps = {batch_size}) "
            f"is not divisible by --num-minibatches {args.num_minibatches}"
        )
    if args.target_kl is not None and not args.target_kl > 0:
        raise SystemExit(f"error: --target-kl must be positive, got {args.target_kl}")
    if args.total_timesteps < batch_size:
        raise SystemExit(f"error: --total-timesteps {args.total_timesteps} is less than one rollout ({batch_size} samples)")


# ---- Environments: N copies stepped as one batch -------------------------------------------------
# Autoreset mode. Gymnasium 1.x resets a finished sub-environment either on the NEXT_STEP (the step
# after the end returns the reset observation, ignores the action and pays reward 0: a fake transition
# that would have to be masked out of GAE and the loss) or on the SAME_STEP (the ending step returns
# the reset observation and puts the true last observation in infos["final_obs"]). We use SAME_STEP:
# every stored transition is real, and the final observation we need to bootstrap a time-limit
# truncation is right there. Gymnasium's own NormalizeObservation refuses SAME_STEP (and would not
# normalize infos["final_obs"]), so normalization below is ours and applied to both.


def checked_spaces(env_id: str) -> tuple[gym.spaces.Box, gym.spaces.Box]:
    """Observation and action spaces of env_id, or exit with one line if this PPO cannot train on it."""
    try:
        probe = gym.make(env_id)
    except gym.error.Error as error:
        raise SystemExit(f"error: cannot make environment {env_id!r}: {error}")
    observation_space, action_space = probe.observation_space, probe.action_space
    probe.close()
    if not isinstance(action_space, gym.spaces.Box):
        raise SystemExit(f"error: {env_id} has a {type(action_space).__name__} action space; this PPO needs a continuous (Box) one")
    if not isinstance(observation_space, gym.spaces.Box) or len(observation_space.shape) != 1:
        raise SystemExit(f"error: {env_id} observations must be a flat Box, got {observation_space}")
    return observation_space, action_space


def make_vector_env(env_id: str, num_envs: int, vector_mode: str) -> gym.vector.VectorEnv:
    vector_class = gym.vector.SyncVectorEnv if vector_mode == "sync" else gym.vector.AsyncVectorEnv
    # copy=False: step() returns the envs' own observation buffer, which the rollout copies into its storage at once
    return vector_class([lambda: gym.make(env_id) for _ in range(num_envs)], autoreset_mode=AutoresetMode.SAME_STEP, copy=False)


# ---- Normalization: one set of running statistics shared by all sub-environments -------------------
# The statistics are merged once per rollout, after it: every state of a batch is normalized alike, and a
# step costs one subtraction and one division instead of a statistics update (the first rollout sees
# the prior, mean 0 and variance 1, so its observations are only clipped).
class RunningMeanStd:
    """Mean and variance of everything seen so far, merged batch by batch (Chan et al.'s parallel rule)."""

    def __init__(self, shape=()):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = 1e-4  # a tiny prior count keeps the first merge well defined

    def update(self, batch: np.ndarray) -> None:
        batch_mean, batch_var, batch_count = batch.mean(axis=0), batch.var(axis=0), batch.shape[0]
        delta = batch_mean - self.mean
        total = self.count + batch_count
        self.mean = self.mean + delta * batch_count / total
        self.var = (self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total) / total
        self.count = total

    def state_dict(self) -> dict:
        return {"mean": torch.tensor(self.mean), "var": torch.tensor(self.var), "count": float(self.count)}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"].numpy().copy(), state["var"].numpy().copy(), state["count"]


def normalize_obs(obs: np.ndarray, obs_rms: RunningMeanStd, clip: float) -> np.ndarray:
    return np.clip((obs - obs_rms.mean) / np.sqrt(obs_rms.var + 1e-8), -clip, clip)


def policy_input(raw_obs: np.ndarray, obs_rms: RunningMeanStd, clip: float, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(normalize_obs(raw_obs, obs_rms, clip), dtype=torch.float32, device=device)


class RewardScaler:
    """Divide rewards by the running std of the discounted return G_t = γ G_{t-1} + r_t (no mean shift,
    so the sign of every reward is kept). G restarts when an episode ends, by termination or time limit."""

    def __init__(self, num_envs: int, gamma: float, clip: float):
        self.return_rms = RunningMeanStd()
        self.returns = np.zeros(num_envs)
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


# ---- Actor-critic: π_θ(a|s) = N(μ_θ(s), diag σ²) and V_φ(s) ------------------------------------------
def layer_init(layer: nn.Linear, gain: float = np.sqrt(2), bias: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.constant_(layer.bias, bias)
    return layer


class Agent(nn.Module):
    def __init__(self, obs_dim: int, action_dim: int, init_logstd: float = 0.0):
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 1), gain=1.0),
        )  # fmt: skip
        # A small gain on the last layer starts μ near 0, so early actions are driven by σ, not by chance weights.
        self.actor_mean = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, action_dim), gain=0.01),
        )  # fmt: skip
        # log σ is a free parameter, not a function of the state.
        self.actor_logstd = nn.Parameter(torch.full((action_dim,), float(init_logstd)))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)


def gaussian_log_prob(actions: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log π(a|s) of a diagonal Gaussian: Σ_i [-(a_i-μ_i)²/(2σ_i²) - log σ_i - ½ log 2π]."""
    return (-0.5 * ((actions - mean) / log_std.exp()) ** 2 - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)


def gaussian_entropy(log_std: torch.Tensor) -> torch.Tensor:
    """Entropy of a diagonal Gaussian: Σ_i [log σ_i + ½ log(2πe)], the same for every state here."""
    return (log_std + 0.5 * np.log(2 * np.pi * np.e)).sum(-1)


# ---- Advantages Â_t by GAE(γ, λ) ---------------------------------------------------------------------
def compute_gae(rewards, values, next_value, final_values, terminations, dones, gamma: float, gae_lambda: float):
    """Generalized advantage estimates and value targets for a (T, N) rollout.

    values[t] = V(s_t) of the stored states, next_value = V(s_T) of the state after the rollout, and
    final_values[t] = V(final observation) where an episode ended at t (ignored elsewhere): after an
    end, the next stored state is the reset one, which is not where the transition led.
        V(s_{t+1}) = final_values[t] if done_t else values[t+1]
        δ_t = r_t + γ (1 - terminated_t) V(s_{t+1}) - V(s_t)    a time-limit cut still bootstraps
        Â_t = δ_t + γλ (1 - done_t) Â_{t+1}                      no credit flows across an episode end
    Returns (Â, Â + V), the advantages and the value targets R_t.
    """
    next_values = torch.where(dones.bool(), final_values, torch.cat([values[1:], next_value[None]]))
    deltas = rewards + gamma * (1.0 - terminations) * next_values - values  # all δ_t at once
    carry = gamma * gae_lambda * (1.0 - dones)
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):  # only the recursion runs step by step
        next_advantage = deltas[t] + carry[t] * next_advantage
        advantages[t] = next_advantage
    return advantages, advantages + values


# ---- Loss: -L^CLIP + c1 L^VF - c2 S ------------------------------------------------------------------
def ppo_loss(
    new_logprob, old_logprob, advantages, new_value, old_value, returns, entropy,
    clip_coef: float, vf_coef: float, ent_coef: float, clip_vloss: bool,
):  # fmt: skip
    """The PPO objective as a loss to minimise, and its parts for logging.

    r_t(θ) = π_θ(a_t|s_t) / π_old(a_t|s_t)
    L^CLIP = E[min(r_t Â_t, clip(r_t, 1-ε, 1+ε) Â_t)]      a pessimistic bound: no gain from moving r past 1±ε
    L^VF   = E[½ (V(s_t) - R_t)²]                          optionally the max with V clipped to V_old ± ε
    S      = E[entropy of π_θ(·|s_t)]
    """
    log_ratio = new_logprob - old_logprob
    ratio = log_ratio.exp()
    policy_loss = -torch.min(ratio * advantages, ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages).mean()

    value_error = (new_value - returns) ** 2
    if clip_vloss:
        clipped_value = old_value + (new_value - old_value).clamp(-clip_coef, clip_coef)
        value_error = torch.max(value_error, (clipped_value - returns) ** 2)
    value_loss = 0.5 * value_error.mean()

    entropy = entropy.mean()
    loss = policy_loss + vf_coef * value_loss - ent_coef * entropy
    with torch.no_grad():
        stats = {
            "policy_loss": policy_loss,
            "value_loss": value_loss,
            "entropy": entropy,
            # E[(r-1) - log r]: an unbiased, never-negative estimate of KL(π_old || π_θ)
            "approx_kl": ((ratio - 1) - log_ratio).mean(),
            "clip_fraction": ((ratio - 1).abs() > clip_coef).float().mean(),
        }
    return loss, stats


# ---- Evaluation: the mean action μ_θ(s) under frozen normalization, raw returns -----------------------
def check_rendering(env_id: str) -> None:
    """Exit with one line, before any training, if --capture-video could not record env_id."""
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless MuJoCo; read when its renderer is created
    try:
        import moviepy  # noqa: F401  (gymnasium's RecordVideo writes through it)

        env = gym.make(env_id, render_mode="rgb_array")
        env.reset(seed=0)
        frame = env.render()
        env.close()
    except Exception as error:  # each rendering backend fails in its own way
        raise SystemExit(
            f"error: --capture-video cannot render {env_id} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            "install moviepy, and for headless MuJoCo set MUJOCO_GL=egl (apt install libegl1) or MUJOCO_GL=osmesa (apt install libosmesa6)"
        )
    if frame is None:
        raise SystemExit(f"error: --capture-video: {env_id} returned no frame from render()")


def evaluate(agent: Agent, obs_rms: RunningMeanStd, env_id: str, episodes: int, seed: int, clip_obs: float,
             stochastic: bool = False, video_dir: str | None = None) -> list[float]:  # fmt: skip
    """Raw returns of `episodes` episodes in a fresh env; the statistics are only read, never updated."""
    env = gym.make(env_id, render_mode="rgb_array" if video_dir else None)
    if video_dir:
        env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda _: True, name_prefix="eval")
    device = next(agent.parameters()).device
    noise = torch.Generator(device=device).manual_seed(seed)  # its own RNG: evaluating never shifts training's
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed if episode == 0 else None)
        done, episode_return = False, 0.0
        while not done:
            with torch.inference_mode():
                action = agent.actor_mean(policy_input(obs[None], obs_rms, clip_obs, device))
                if stochastic:
                    action += agent.actor_logstd.exp() * torch.randn(action.shape, generator=noise, device=device)
            obs, reward, terminated, truncated, _ = env.step(np.clip(action[0].cpu().numpy(), env.action_space.low, env.action_space.high))
            episode_return += float(reward)
            done = terminated or truncated
        returns.append(episode_return)
    env.close()
    return returns


# ---- Checkpoints: everything needed to evaluate or continue a run ------------------------------------
CHECKPOINT_FORMAT = "ppo_continuous/1"
# Settings that may differ when a run is resumed: they change how it runs, not what it learns.
RUNTIME_SETTINGS = {"cuda", "torch_threads", "vector_mode", "save_model", "checkpoint_every", "resume",
                    "eval_checkpoint", "eval_episodes", "eval_stochastic", "capture_video"}  # fmt: skip


def training_state(args, run_dir, agent, optimizer, obs_rms, reward_scaler, global_step, iteration) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "args": vars(args),
        "run_dir": run_dir,
        "obs_dim": agent.actor_mean[0].in_features,
        "action_dim": agent.actor_logstd.shape[0],
        "agent": agent.state_dict(),
        "optimizer": optimizer.state_dict(),
        "obs_rms": obs_rms.state_dict(),
        "return_rms": reward_scaler.return_rms.state_dict(),
        "global_step": global_step,
        "iteration": iteration,
        # torch's generator is the only one the loop draws from; each environment carries its own
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def save_checkpoint(path: str, state: dict) -> None:
    """Write to a temporary file, then rename: a crash mid-write never leaves a corrupt checkpoint."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


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
    return checkpoint


def check_shapes(checkpoint: dict, env_id: str) -> tuple[gym.spaces.Box, gym.spaces.Box]:
    observation_space, action_space = checked_spaces(env_id)
    if (observation_space.shape[0], action_space.shape[0]) != (checkpoint["obs_dim"], checkpoint["action_dim"]):
        raise SystemExit(
            f"error: checkpoint was trained with {checkpoint['obs_dim']} observations and {checkpoint['action_dim']} actions, "
            f"but {env_id} has {observation_space.shape[0]} and {action_space.shape[0]}"
        )
    return observation_space, action_space


def cli_overrides(args: Args) -> dict:
    """Settings whose value differs from the default, i.e. those the user chose."""
    defaults = vars(Args())
    return {name: value for name, value in vars(args).items() if value != defaults[name]}


def resume_args(args: Args, checkpoint: dict) -> Args:
    """The checkpoint's settings, plus the runtime settings given now; any other conflict is an error."""
    saved = checkpoint["args"]
    for name, value in cli_overrides(args).items():
        if name not in RUNTIME_SETTINGS and value != saved[name]:
            raise SystemExit(
                f"error: --resume continues a run with its saved settings, but --{name.replace('_', '-')} {value} "
                f"differs from the checkpoint's {saved[name]}"
            )
    return Args(**{**saved, **{name: getattr(args, name) for name in RUNTIME_SETTINGS}})


# ---- Training loop ---------------------------------------------------------------------------------
def train(args: Args, checkpoint: dict | None = None) -> tuple[str, list[float]]:
    """Train (from scratch, or on from a checkpoint), log to runs/<run>/; return the run directory and
    the raw returns of the final evaluation."""
    validate(args)
    batch_size = args.num_envs * args.num_steps
    minibatch_size = batch_size // args.num_minibatches
    num_iterations = args.total_timesteps // batch_size
    if args.capture_video:
        check_rendering(args.env_id)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")

    observation_space, action_space = checked_spaces(args.env_id) if checkpoint is None else check_shapes(checkpoint, args.env_id)
    obs_dim, action_dim = observation_space.shape[0], action_space.shape[0]

    agent = Agent(obs_dim, action_dim, args.init_logstd).to(device)
    parameters = list(agent.parameters())
    # fused: one kernel for the whole Adam step instead of several per tensor (~20% faster update on a CPU)
    optimizer = torch.optim.Adam(parameters, lr=args.learning_rate, eps=1e-5, fused=True)
    obs_rms = RunningMeanStd((obs_dim,))
    reward_scaler = RewardScaler(args.num_envs, args.gamma, args.clip_reward)
    global_step, start_iteration = 0, 1
    if checkpoint is None:
        run_dir = os.path.join("runs", f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}")
    else:
        run_dir = checkpoint["run_dir"]
        agent.load_state_dict(checkpoint["agent"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        obs_rms.load_state_dict(checkpoint["obs_rms"])
        reward_scaler.return_rms.load_state_dict(checkpoint["return_rms"])
        global_step, start_iteration = checkpoint["global_step"], checkpoint["iteration"] + 1
        torch.set_rng_state(checkpoint["torch_rng"])
        if device.type == "cuda" and checkpoint["cuda_rng"]:
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    # purge_step drops events a previous session logged after the checkpoint was taken
    writer = SummaryWriter(run_dir, purge_step=global_step if checkpoint else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    def save(iteration: int) -> None:
        save_checkpoint(checkpoint_path, training_state(args, run_dir, agent, optimizer, obs_rms, reward_scaler, global_step, iteration))

    # Rollout storage, (T, N, ...), in NumPy next to the envs: one copy to the training device per rollout.
    obs_np = np.zeros((args.num_steps, args.num_envs, obs_dim), np.float32)  # normalized s_t, as the policy saw it
    raw_obs_np = np.zeros((args.num_steps, args.num_envs, obs_dim))  # raw s_{t+1}, for the statistics
    actions_np = np.zeros((args.num_steps, args.num_envs, action_dim), np.float32)
    final_obs_np = np.zeros((args.num_steps, args.num_envs, obs_dim), np.float32)  # s_{t+1} where an episode ended
    rewards_np = np.zeros((args.num_steps, args.num_envs))  # raw r_t, scaled after the rollout
    terminations_np = np.zeros((args.num_steps, args.num_envs), bool)
    dones_np = np.zeros((args.num_steps, args.num_envs), bool)
    # Raw (unscaled) return and length of each env's running episode, and the last 10 finished returns.
    episode_return, episode_length = np.zeros(args.num_envs), np.zeros(args.num_envs, int)
    recent_returns = deque(maxlen=10)

    # Async workers inherit an ignored SIGINT, so Ctrl-C reaches only this process, which stops cleanly.
    stop_requested = []
    default_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
    envs = None
    try:
        envs = make_vector_env(args.env_id, args.num_envs, args.vector_mode)
        signal.signal(signal.SIGINT, lambda signum, frame: stop_requested.append(signum))
        # A resumed run starts fresh episodes (the environments' inner state is not in the checkpoint),
        # seeded apart from the first session's so it does not replay the same starts.
        raw_obs, _ = envs.reset(seed=args.seed + global_step)
        start_step, start_time, last_print = global_step, time.time(), 0.0
        iteration = start_iteration - 1
        for iteration in range(start_iteration, num_iterations + 1):
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - (iteration - 1.0) / num_iterations)
            rollout_start = time.time()

            # -- Rollout: act with π_old, store (s_t, a_t, r_t) ---------------------------------------------
            with torch.inference_mode():  # no gradients while acting
                # a_t = μ(s_t) + σ ε_t, ε_t ~ N(0, I): all of the rollout's σ ε_t drawn at once
                noise = torch.randn((args.num_steps, args.num_envs, action_dim), device=device)
                exploration = (agent.actor_logstd.exp() * noise).cpu().numpy()
                for step in range(args.num_steps):
                    global_step += args.num_envs
                    obs_np[step] = normalize_obs(raw_obs, obs_rms, args.clip_obs)
                    action = agent.actor_mean(torch.as_tensor(obs_np[step], device=device)).cpu().numpy() + exploration[step]
                    actions_np[step] = action  # the raw sample: its log-prob is what the ratio needs

                    env_action = np.clip(action, action_space.low, action_space.high)  # only the env sees the clip
                    raw_obs, rewards_np[step], terminations, truncations, infos = envs.step(env_action)
                    raw_obs_np[step] = raw_obs
                    done = terminations | truncations
                    terminations_np[step], dones_np[step] = terminations, done
                    episode_return += rewards_np[step]
                    episode_length += 1

                    # A time-limit cut bootstraps from V(final obs); the final obs is in infos, normalized like any other.
                    if done.any():
                        final_obs_np[step, done] = normalize_obs(np.stack(infos["final_obs"][done]), obs_rms, args.clip_obs)
                        for ep_return, ep_length in zip(episode_return[done], episode_length[done]):
                            writer.add_scalar("charts/episodic_return", ep_return, global_step)
                            writer.add_scalar("charts/episodic_length", ep_length, global_step)
                            recent_returns.append(ep_return)
                        episode_return[done], episode_length[done] = 0.0, 0

            # -- Update: several epochs of minibatch Adam on -L^CLIP + c1 L^VF - c2 S ----------------------
            update_start = time.time()
            next_obs = policy_input(raw_obs, obs_rms, args.clip_obs, device)  # s_T, normalized like the rollout
            obs_rms.update(raw_obs_np.reshape(-1, obs_dim))  # the statistics move between rollouts, never within one
            rewards_t = torch.as_tensor(reward_scaler(rewards_np, dones_np), dtype=torch.float32, device=device)
            obs_buf, final_obs_buf, actions_buf = (torch.as_tensor(x, device=device) for x in (obs_np, final_obs_np, actions_np))
            terminations_t, dones_t = (torch.as_tensor(x, dtype=torch.float32, device=device) for x in (terminations_np, dones_np))
            b_obs = obs_buf.reshape(-1, obs_dim)
            b_actions = actions_buf.reshape(-1, action_dim)
            with torch.no_grad():  # π_old is the policy that acted: score all its actions in one batch
                b_logprobs = gaussian_log_prob(b_actions, agent.actor_mean(b_obs), agent.actor_logstd)
            epoch_stats = []
            for epoch in range(args.update_epochs):
                if epoch == 0 or args.recompute_advantages:
                    # -- Advantages Â_t and value targets R_t by GAE, with the critic as it is now -----------
                    with torch.no_grad():
                        values = agent.value(obs_buf)
                        advantages, returns = compute_gae(
                            rewards_t, values, agent.value(next_obs), agent.value(final_obs_buf),
                            terminations_t, dones_t, args.gamma, args.gae_lambda,
                        )  # fmt: skip
                    b_values, b_advantages, b_returns = values.reshape(-1), advantages.reshape(-1), returns.reshape(-1)
                # Shuffle the batch once per epoch; the minibatches are then consecutive slices (views, no copies).
                permutation = torch.randperm(batch_size, device=device)
                s_obs, s_actions, s_logprobs, s_advantages, s_values, s_returns = (
                    x[permutation] for x in (b_obs, b_actions, b_logprobs, b_advantages, b_values, b_returns)
                )
                for start in range(0, batch_size, minibatch_size):
                    mb = slice(start, start + minibatch_size)
                    mb_advantages = s_advantages[mb]
                    if args.norm_adv:
                        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
                    loss, stats = ppo_loss(
                        gaussian_log_prob(s_actions[mb], agent.actor_mean(s_obs[mb]), agent.actor_logstd), s_logprobs[mb], mb_advantages,
                        agent.value(s_obs[mb]), s_values[mb], s_returns[mb], gaussian_entropy(agent.actor_logstd),
                        args.clip_coef, args.vf_coef, args.ent_coef, args.clip_vloss,
                    )  # fmt: skip
                    optimizer.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)
                    optimizer.step()
                    epoch_stats.append(torch.stack(list(stats.values())))
                # Decided on the epoch's mean KL, not one minibatch's: a single noisy minibatch does not end the update.
                if args.target_kl is not None:
                    if torch.stack(epoch_stats[-args.num_minibatches :])[:, 3].mean().item() > args.target_kl:
                        break

            # -- Guard, log, checkpoint --------------------------------------------------------------------
            mean_stats = torch.stack(epoch_stats).mean(0).tolist()
            if not (np.isfinite(mean_stats).all() and all(p.isfinite().all() for p in parameters)):
                kept = f"the last good checkpoint is {checkpoint_path}" if os.path.exists(checkpoint_path) else "no checkpoint was written"
                raise SystemExit(f"error: loss or parameters became non-finite at iteration {iteration} (step {global_step}); {kept}")
            now = time.time()
            for name, value in zip(stats.keys(), mean_stats):
                writer.add_scalar(f"losses/{name}", value, global_step)
            var_returns = b_returns.var().item()
            explained_variance = float("nan") if var_returns == 0 else 1 - (b_returns - b_values).var().item() / var_returns
            writer.add_scalar("losses/explained_variance", explained_variance, global_step)
            writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
            writer.add_scalar("charts/epochs_run", epoch + 1, global_step)
            sps = int((global_step - start_step) / (now - start_time))
            writer.add_scalar("charts/SPS", sps, global_step)
            writer.add_scalar("charts/rollout_seconds", update_start - rollout_start, global_step)
            writer.add_scalar("charts/update_seconds", now - update_start, global_step)
            if now - last_print > 10 or iteration == num_iterations:
                last_print = now
                recent_text = f"{np.mean(recent_returns):.1f} over last {len(recent_returns)} episodes" if recent_returns else "no episode finished yet"
                print(f"step {global_step:>9,}/{args.total_timesteps:,} | {sps:,} SPS | return {recent_text}", flush=True)
            if args.checkpoint_every and iteration % args.checkpoint_every == 0:
                save(iteration)
            if stop_requested:  # Ctrl-C is honoured between iterations, so the checkpoint is a consistent state
                break

        signal.signal(signal.SIGINT, default_sigint)  # training is over: Ctrl-C from here on stops at once
        if stop_requested:
            save(iteration)
            print(f"interrupted: checkpoint of step {global_step:,} saved to {checkpoint_path}", flush=True)
            raise SystemExit(130)
        if args.save_model:
            save(iteration)
            print(f"checkpoint saved to {checkpoint_path}")
        eval_returns = []
        if args.eval_episodes:
            video_dir = os.path.join(run_dir, "videos") if args.capture_video else None
            eval_returns = evaluate(agent, obs_rms, args.env_id, args.eval_episodes, args.seed, args.clip_obs, args.eval_stochastic, video_dir)
            writer.add_scalar("eval/mean_return", np.mean(eval_returns), global_step)
            writer.add_scalar("eval/std_return", np.std(eval_returns), global_step)
            print(f"evaluation: return {np.mean(eval_returns):.1f} ± {np.std(eval_returns):.1f} over {len(eval_returns)} episodes")
    finally:
        signal.signal(signal.SIGINT, default_sigint)
        if envs is not None:
            envs.close()
        writer.close()
    return run_dir, eval_returns


def evaluate_checkpoint(args: Args) -> list[float]:
    """--eval-checkpoint: the saved policy and frozen normalization on a fresh env of the checkpoint's id
    (or of --env-id, when given)."""
    checkpoint = load_checkpoint(args.eval_checkpoint)
    env_id = cli_overrides(args).get("env_id", checkpoint["args"]["env_id"])
    check_shapes(checkpoint, env_id)
    agent = Agent(checkpoint["obs_dim"], checkpoint["action_dim"])
    agent.load_state_dict(checkpoint["agent"])
    obs_rms = RunningMeanStd((checkpoint["obs_dim"],))
    obs_rms.load_state_dict(checkpoint["obs_rms"])
    if args.capture_video:
        check_rendering(env_id)
    video_dir = os.path.join(checkpoint["run_dir"], "videos") if args.capture_video else None
    returns = evaluate(agent, obs_rms, env_id, args.eval_episodes, args.seed, checkpoint["args"]["clip_obs"], args.eval_stochastic, video_dir)
    mode = "sampled" if args.eval_stochastic else "mean"
    print(f"{env_id}: return {np.mean(returns):.1f} ± {np.std(returns):.1f} over {len(returns)} episodes ({mode} actions)")
    return returns


def main() -> None:
    args = tyro.cli(Args)
    if args.eval_checkpoint:
        if args.eval_episodes < 1:
            raise SystemExit("error: --eval-episodes must be at least 1 with --eval-checkpoint")
        evaluate_checkpoint(args)
        return
    if args.resume:
        checkpoint = load_checkpoint(args.resume)
        train(resume_args(args, checkpoint), checkpoint)
    else:
        train(args)
    print("TensorBoard: tensorboard --logdir runs")


if __name__ == "__main__":
    main()
