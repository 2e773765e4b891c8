"""Throughput of ppo_continuous.py against Stable-Baselines3 PPO and a raw environment loop.

    pip install -r benchmarks/requirements.txt
    python benchmarks/benchmark.py --short           # 50k steps each, a few minutes
    python benchmarks/benchmark.py                   # 1M steps each

Runs one after the other on this machine (never side by side, so they do not share the cores):
  ours-default    python ppo_continuous.py with its defaults
  ours-reference  ppo_continuous.py forced into the usual reference configuration
  sb3-reference   SB3 PPO in that configuration (1 env, 2048-step rollouts, minibatch 64, 10 epochs,
                  64-64 tanh nets, observation + reward normalization, same γ, λ, ε, lr schedule)
  raw-env         gym.make(env) stepped with random actions: the ceiling
and writes benchmarks/results/throughput.csv and throughput.md.
"""

import argparse
import csv
import glob
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
REFERENCE = ["--num-envs", "1", "--num-steps", "2048", "--num-minibatches", "32", "--update-epochs", "10"]


def run_ours(name: str, env_id: str, steps: int, extra: list[str]) -> dict:
    """Train in a subprocess; rollout/update seconds come from the run's TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp_name = f"bench-{name}-{int(time.time())}"
    command = [sys.executable, os.path.join(ROOT, "ppo_continuous.py"), "--env-id", env_id, "--total-timesteps", str(steps),
               "--exp-name", exp_name, "--eval-episodes", "0", "--no-save-model", *extra]  # fmt: skip
    subprocess.run(command, cwd=RESULTS, check=True, stdout=subprocess.DEVNULL)
    accumulator = EventAccumulator(glob.glob(os.path.join(RESULTS, "runs", f"*{exp_name}*"))[0], size_guidance={"scalars": 0})
    accumulator.Reload()
    total = lambda tag: sum(event.value for event in accumulator.Scalars(tag))  # noqa: E731
    last = accumulator.Scalars("charts/SPS")[-1]  # measured over the training loop, like SB3's learn() below
    return {"run": name, "command": " ".join(["python ppo_continuous.py", *command[2:]]), "steps": last.step, "wall_s": last.step / last.value,
            "rollout_s": total("charts/rollout_seconds"), "update_s": total("charts/update_seconds")}  # fmt: skip


def run_sb3(env_id: str, steps: int, threads: int) -> dict:
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    class PhaseTimer(BaseCallback):
        """Time spent collecting rollouts; the rest of learn() is the update."""

        def __init__(self):
            super().__init__()
            self.rollout_s = 0.0

        def _on_rollout_start(self):
            self.started = time.perf_counter()

        def _on_rollout_end(self):
            self.rollout_s += time.perf_counter() - self.started

        def _on_step(self):
            return True

    torch.set_num_threads(threads)
    envs = VecNormalize(make_vec_env(env_id, n_envs=1, seed=1), gamma=0.99, clip_obs=10.0, clip_reward=10.0)
    model = PPO(
        "MlpPolicy", envs, n_steps=2048, batch_size=64, n_epochs=10, learning_rate=lambda remaining: 3e-4 * remaining,
        gamma=0.99, gae_lambda=0.95, clip_range=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5,
        policy_kwargs=dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), activation_fn=torch.nn.Tanh), device="cpu", seed=1,
    )  # fmt: skip
    timer = PhaseTimer()
    start = time.perf_counter()
    model.learn(total_timesteps=steps, callback=timer)
    wall = time.perf_counter() - start
    return {"run": "sb3-reference", "command": f"SB3 {__import__('stable_baselines3').__version__} PPO, torch threads {threads}",
            "steps": model.num_timesteps, "wall_s": wall, "rollout_s": timer.rollout_s, "update_s": wall - timer.rollout_s}  # fmt: skip


def run_raw_env(env_id: str, steps: int) -> dict:
    import gymnasium as gym

    env = gym.make(env_id)
    env.reset(seed=1)
    env.action_space.seed(1)
    start = time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    wall = time.perf_counter() - start
    return {"run": "raw-env", "command": f"gym.make('{env_id}') with random actions", "steps": steps, "wall_s": wall,
            "rollout_s": wall, "update_s": 0.0}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="HalfCheetah-v4")
    parser.add_argument("--steps", type=int, default=1_000_000, help="environment steps per run")
    parser.add_argument("--short", action="store_true", help="50k steps per run")
    parser.add_argument("--sb3-threads", type=int, default=1, help="torch threads for SB3")
    parser.add_argument("--only", nargs="*", default=["ours-default", "ours-reference", "sb3-reference", "raw-env"])
    args = parser.parse_args()
    steps = 50_000 if args.short else args.steps
    os.makedirs(RESULTS, exist_ok=True)

    rows = []
    for name in args.only:
        if name == "ours-default":
            rows.append(run_ours(name, args.env_id, steps, []))
        elif name == "ours-reference":
            rows.append(run_ours(name, args.env_id, steps, REFERENCE))
        elif name == "sb3-reference":
            rows.append(run_sb3(args.env_id, steps, args.sb3_threads))
        elif name == "raw-env":
            rows.append(run_raw_env(args.env_id, steps))
        rows[-1]["sps"] = rows[-1]["steps"] / rows[-1]["wall_s"]
        print(f"{rows[-1]['run']:>15}: {rows[-1]['sps']:8,.0f} steps/s  ({rows[-1]['wall_s']:.1f} s)", flush=True)

    by_name = {row["run"]: row for row in rows}
    ratios = []
    for ours, theirs in [("ours-default", "sb3-reference"), ("ours-reference", "sb3-reference"), ("ours-default", "raw-env")]:
        if ours in by_name and theirs in by_name:
            ratios.append(f"{ours} / {theirs}: {by_name[ours]['sps'] / by_name[theirs]['sps']:.2f}x")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print("\n".join(ratios))

    fields = ["run", "steps", "wall_s", "sps", "rollout_s", "update_s", "command"]
    with open(os.path.join(RESULTS, "throughput.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: row[k] for k in fields} for row in rows)
    with open(os.path.join(RESULTS, "throughput.md"), "w") as f:
        f.write(f"{args.env_id}, {steps:,} steps per run, {machine}; `{' '.join(['python', *sys.argv])}`\n\n")
        f.write("| run | steps/s | wall-clock s | rollout s | update s |\n|---|---:|---:|---:|---:|\n")
        for row in rows:
            f.write(f"| {row['run']} | {row['sps']:,.0f} | {row['wall_s']:.1f} | {row['rollout_s']:.1f} | {row['update_s']:.1f} |\n")
        f.write("\n" + "; ".join(ratios) + "\n")


if __name__ == "__main__":
    main()
