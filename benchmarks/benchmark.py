"""Benchmarks of ppo_continuous.py: throughput, and learning quality across envs and seeds.

    pip install -r benchmarks/requirements.txt
    python benchmarks/benchmark.py throughput --short     # 50k steps per run, a few minutes
    python benchmarks/benchmark.py throughput --steps 1000000
    python benchmarks/benchmark.py returns --seeds 1 2 3    # the five MuJoCo envs, 1M steps each

throughput: runs one after the other on this machine (never side by side, so they do not share the cores):
  ours-default    python ppo_continuous.py with its defaults
  ours-reference  ppo_continuous.py forced into the usual reference configuration
  ours-2-ranks    the default command as 2 data-parallel ranks: torchrun --standalone --nproc-per-node=2
  ours-cuda       the default command with --cuda (on a machine with a GPU only, and then by default)
  sb3-reference   SB3 PPO in that configuration (1 env, 2048-step rollouts, minibatch 64, 10 epochs,
                  64-64 tanh nets, observation + reward normalization, same γ, λ, ε, lr schedule)
  raw-env         gym.make(env) stepped with random actions: the ceiling
and writes benchmarks/results/throughput.csv and throughput.md (`--out` renames them).

returns: trains the default command for every env x seed, at most two processes at a time, evaluates
each final checkpoint (10 deterministic episodes), and writes benchmarks/results/returns_curves.csv
(every training episode), returns.md (final = mean raw return of the last 10 training episodes, and
the evaluation; mean ± std over seeds) and returns.png (mean learning curve with a ±std band);
`--ranks 2` trains each run as 2 torchrun ranks (one run at a time), `--out` renames those files.

pool: pools final tables (`--tables returns finalE1b`: their <name>_curves.csv and <name>.md) into one table per
env: mean ± std over every seed, a 95 % percentile-bootstrap interval of the mean (10,000 resamples within each
env, seeded), the interquartile mean and the worst seed; writes <out>.md and <out>.png.

scaling: the default command as 1, 2, 4, 8 and 16 torchrun ranks (`--ranks`) in turn, the same steps on each rank
(`--steps-per-rank`, 100,000), and writes benchmarks/results/scaling.md and scaling.csv: steps/s, the speed-up over
one process and the efficiency (speed-up ÷ ranks), with rank 0's rollout and update seconds.

exchange: times the one all-reduce that data-parallel training makes per Adam step (the gradient of the
default HalfCheetah networks) between `--ranks` gloo ranks under torchrun, idle and with a matrix
product of about the cost of one minibatch between exchanges; writes benchmarks/results/exchange.md (`--out`).

noise: what the policy's remaining noise costs at the end of training: evaluates saved checkpoints (`--checkpoints`,
globs) for `--episodes` episodes each (10), sampling actions with σ scaled by each of `--scales` (0: the mean
action), and writes <out>.md (per env, mean ± std over checkpoints, for each scale).
"""

import argparse
import csv
import glob
import os
import platform
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
REFERENCE = ["--num-envs", "1", "--num-steps", "2048", "--num-minibatches", "32", "--update-epochs", "10",
             "--critic-width", "64"]  # SB3's MlpPolicy: 64-64 actor and critic


def machine() -> str:
    """The CPU model and core count (per-seed returns are reproducible only on the same CPU type), and any GPU."""
    import torch

    models = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    cpu = f"{models[0] if models else platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{cpu}, {' + '.join(gpus) if gpus else 'no GPU'}, torch {torch.__version__}"


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def run_ours(name: str, env_id: str, steps: int, extra: list[str], ranks: int = 1) -> dict:
    """Train in a subprocess; rollout/update seconds come from the run's (rank 0's) TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp_name = f"bench-{name}-{int(time.time())}"
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    command = [sys.executable, *launcher, os.path.join(ROOT, "ppo_continuous.py"), "--env-id", env_id,
               "--total-timesteps", str(steps), "--exp-name", exp_name, "--eval-episodes", "0", "--no-save-model",
               *extra]
    subprocess.run(command, cwd=RESULTS, check=True, stdout=subprocess.DEVNULL)
    run_dir = glob.glob(os.path.join(RESULTS, "runs", f"*{exp_name}*"))[0]
    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    total = lambda tag: sum(event.value for event in accumulator.Scalars(tag))  # noqa: E731
    last = accumulator.Scalars("charts/SPS")[-1]  # measured over the training loop, like SB3's learn() below
    shown = ["torchrun", *launcher[2:]] if ranks > 1 else ["python"]
    return {"run": name, "command": " ".join([*shown, "ppo_continuous.py", *command[2 + len(launcher) :]]),
            "steps": last.step,
            "wall_s": last.step / last.value, "rollout_s": total("charts/rollout_seconds"),
            "update_s": total("charts/update_seconds")}


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
    )
    timer = PhaseTimer()
    start = time.perf_counter()
    model.learn(total_timesteps=steps, callback=timer)
    wall = time.perf_counter() - start
    version = __import__("stable_baselines3").__version__
    return {"run": "sb3-reference", "command": f"SB3 {version} PPO, torch threads {threads}",
            "steps": model.num_timesteps, "wall_s": wall, "rollout_s": timer.rollout_s,
            "update_s": wall - timer.rollout_s}


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
            "rollout_s": wall, "update_s": 0.0}


def train_and_evaluate(env_id: str, seed: int, steps: int, extra: list[str], ranks: int) -> dict:
    """One returns-mode run: train with the script's defaults (plus `extra`, on `ranks` torchrun ranks), then
    evaluate its checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp_name = f"returns-{time.time_ns()}"
    script = os.path.join(ROOT, "ppo_continuous.py")
    train_command = ["--env-id", env_id, "--seed", str(seed), "--total-timesteps", str(steps), "--eval-episodes", "0",
                     *extra]
    start = time.perf_counter()
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    subprocess.run([sys.executable, *launcher, script, *train_command, "--exp-name", exp_name], cwd=RESULTS,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    run_dir = glob.glob(os.path.join(RESULTS, "runs", f"{env_id}__{exp_name}__{seed}__*"))[0]
    evaluation = subprocess.run([sys.executable, script, "--eval-checkpoint", os.path.join(run_dir, "checkpoint.pt"),
                                 "--eval-episodes", "10"], cwd=RESULTS, check=True, capture_output=True, text=True)
    evaluation = evaluation.stdout
    eval_mean = float(re.search(r"return (-?[\d.]+) ±", evaluation).group(1))
    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    episodes = [(event.step, event.value) for event in accumulator.Scalars("charts/episodic_return")]
    final = float(np.mean([value for _, value in episodes[-10:]]))
    sps = accumulator.Scalars("charts/SPS")[-1].value
    print(f"{env_id} seed {seed}: final {final:.1f}, eval {eval_mean:.1f}, {sps:,.0f} steps/s, {wall:.0f} s",
          flush=True)
    return {"env": env_id, "seed": seed, "final": final, "eval": eval_mean, "wall_s": wall, "sps": sps,
            "episodes": episodes, "command": " ".join(["torchrun", *launcher[2:]] if ranks > 1 else ["python"])
            + " ppo_continuous.py " + " ".join(train_command)}


def returns_mode(args) -> None:
    jobs = [(env_id, seed) for env_id in args.envs for seed in args.seeds]
    with ThreadPoolExecutor(max_workers=max(1, 2 // args.ranks)) as pool:  # two processes at a time: one per core
        runs = list(pool.map(lambda job: train_and_evaluate(*job, args.steps, args.extra, args.ranks), jobs))

    with open(os.path.join(RESULTS, f"{args.out}_curves.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["env", "seed", "step", "episodic_return"])
        for run in runs:
            writer.writerows([run["env"], run["seed"], step, value] for step, value in run["episodes"])

    with open(os.path.join(RESULTS, f"{args.out}.md"), "w") as f:
        f.write(f"{args.steps:,} steps, seeds {' '.join(map(str, args.seeds))}, {args.ranks} rank(s) per run, "
                f"{max(1, 2 // args.ranks)} run(s) at a time on {machine()}; "
                f"`{' '.join(['python', *sys.argv])}`\n\n")
        f.write("| env | final (last 10 episodes) | per seed | evaluation (10 episodes, mean action) | steps/s "
                "| wall-clock per run |\n|---|---:|---|---:|---:|---:|\n")
        for env_id in args.envs:
            env_runs = [run for run in runs if run["env"] == env_id]
            final, evaluation = [run["final"] for run in env_runs], [run["eval"] for run in env_runs]
            per_seed = " / ".join(f"{value:,.0f}" for value in final)
            f.write(f"| {env_id} | {np.mean(final):,.0f} ± {np.std(final):,.0f} | {per_seed} "
                    f"| {np.mean(evaluation):,.0f} ± {np.std(evaluation):,.0f} "
                    f"| {np.mean([run['sps'] for run in env_runs]):,.0f} "
                    f"| {np.mean([run['wall_s'] for run in env_runs]) / 60:.1f} min |\n")
        f.write("\nPer run (final / evaluation): " + "; ".join(
            f"{run['env']} seed {run['seed']}: {run['final']:,.0f} / {run['eval']:,.0f}" for run in runs) + "\n")

    plot_curves(runs, args.envs, args.steps, os.path.join(RESULTS, f"{args.out}.png"))


def plot_curves(runs: list[dict], envs: list[str], steps: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 3.5), squeeze=False)
    grid = np.linspace(0, steps, 101)[1:]
    for axis, env_id in zip(axes[0], envs):
        # each seed's mean of its last 10 episodes, on a common step grid; then mean and std across seeds
        curves = []
        for run in (run for run in runs if run["env"] == env_id):
            run_steps, values = np.array(run["episodes"]).T
            last10 = np.array([values[max(0, i - 9) : i + 1].mean() for i in range(len(values))])
            curves.append(np.interp(grid, run_steps, last10))
        curves = np.array(curves)
        mean, std = curves.mean(0), curves.std(0)
        axis.plot(grid, mean)
        axis.fill_between(grid, mean - std, mean + std, alpha=0.3)
        axis.set(title=f"{env_id} ({len(curves)} seeds)", xlabel="environment steps", ylabel="episodic return")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def pool_mode(args) -> None:
    """Every final table named, pooled: per env, the final returns of all their seeds. A table named as
    name:Env-v4,Other-v4 gives only those envs' runs (the others ran under defaults that have since changed)."""
    runs, sources = {}, []
    for spec in args.tables:
        table, _, only = spec.partition(":")
        text = open(os.path.join(RESULTS, f"{table}.md")).read()
        sources.append(f"- `{table}`{f' ({only} only)' if only else ''}: {text.splitlines()[0]}")
        per_run = re.findall(r"(\S+) seed (\d+): [-\d,]+ / ([-\d,]+)", text)
        evaluations = {(env, int(seed)): float(value.replace(",", "")) for env, seed, value in per_run}
        with open(os.path.join(RESULTS, f"{table}_curves.csv")) as f:
            for row in csv.DictReader(f):
                if only and row["env"] not in only.split(","):
                    continue
                key = (row["env"], int(row["seed"]))
                assert key not in runs or runs[key]["table"] == table, f"seed {key} is in two tables"
                run = runs.setdefault(key, {"env": key[0], "seed": key[1], "table": table, "episodes": [],
                                            "eval": evaluations[key]})
                run["episodes"].append((float(row["step"]), float(row["episodic_return"])))
    for run in runs.values():
        run["final"] = float(np.mean([value for _, value in run["episodes"][-10:]]))
    envs = list(dict.fromkeys(run["env"] for run in runs.values()))
    with open(os.path.join(RESULTS, f"{args.out}.md"), "w") as f:
        f.write(f"Every final table of these defaults, pooled: `{' '.join(['python', *sys.argv])}`\n\n"
                + "\n".join(sources) + "\n\n| env | seeds | final: mean ± std | 95 % bootstrap interval of the mean "
                "| IQM | worst seed | evaluation: mean ± std |\n|---|---|---:|---:|---:|---:|---:|\n")
        for env_id in envs:
            env_runs = sorted((run for run in runs.values() if run["env"] == env_id), key=lambda run: run["seed"])
            final = np.array([run["final"] for run in env_runs])
            rng = np.random.default_rng(0)  # seeded per env: an env's interval does not depend on the others
            means = rng.choice(final, size=(10_000, len(final))).mean(1)  # resample the seeds, with replacement
            low, high = np.percentile(means, [2.5, 97.5])
            ordered = np.sort(final)
            quarter = len(final) // 4  # the interquartile mean: the middle half of the seeds
            iqm = ordered[quarter : len(final) - quarter].mean()
            worst = min(env_runs, key=lambda run: run["final"])
            evaluation = [run["eval"] for run in env_runs]
            f.write(f"| {env_id} | {', '.join(str(run['seed']) for run in env_runs)} | {final.mean():,.0f} ± "
                    f"{final.std():,.0f} | {low:,.0f} – {high:,.0f} | {iqm:,.0f} | {worst['final']:,.0f} "
                    f"(seed {worst['seed']}) | {np.mean(evaluation):,.0f} ± {np.std(evaluation):,.0f} |\n")
        per_run = [f"{r['env']} seed {r['seed']}: {r['final']:,.0f} / {r['eval']:,.0f}" for r in runs.values()]
        f.write("\nPer run (final / evaluation): " + "; ".join(per_run) + "\n")
    plot_curves(list(runs.values()), envs, args.steps, os.path.join(RESULTS, f"{args.out}.png"))
    print(open(os.path.join(RESULTS, f"{args.out}.md")).read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    throughput = modes.add_parser("throughput", help="steps per second: ours, SB3, raw env")
    throughput.add_argument("--env-id", default="HalfCheetah-v4")
    throughput.add_argument("--steps", type=int, default=1_000_000, help="environment steps per run")
    throughput.add_argument("--short", action="store_true", help="50k steps per run")
    throughput.add_argument("--sb3-threads", type=int, default=1, help="torch threads for SB3")
    throughput.add_argument("--out", default="throughput", help="results file names: <out>.md, <out>.csv")
    runs = ["ours-default", "ours-2-ranks", "ours-reference", "sb3-reference", "raw-env"]
    throughput.add_argument("--only", nargs="*", default=runs + ["ours-cuda"] * has_gpu(), help=" ".join(runs)
                            + " ours-cuda (default: all that this machine can run)")
    returns = modes.add_parser("returns", help="learning curves and final returns over envs x seeds")
    mujoco_five = ["HalfCheetah-v4", "Hopper-v4", "Walker2d-v4", "Ant-v4", "Humanoid-v4"]
    returns.add_argument("--envs", nargs="+", default=mujoco_five)
    returns.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    returns.add_argument("--steps", type=int, default=1_000_000)
    returns.add_argument("--ranks", type=int, default=1, help="train each run as this many torchrun ranks")
    returns.add_argument("--out", default="returns", help="results file names: <out>.md, <out>.png, <out>_curves.csv")
    returns.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further ppo_continuous.py options")
    pool = modes.add_parser("pool", help="pool final tables: mean ± std, bootstrap interval, IQM, worst seed")
    pool.add_argument("--tables", nargs="+", required=True,
                      help="result names (<name>.md and <name>_curves.csv); name:Env-v4,... takes only those envs")
    pool.add_argument("--steps", type=int, default=1_000_000)
    pool.add_argument("--out", default="pooled")
    noise = modes.add_parser("noise", help="checkpoints' returns with the policy's σ scaled")
    noise.add_argument("--checkpoints", nargs="+", required=True, help="checkpoint.pt paths or globs")
    noise.add_argument("--scales", nargs="+", type=float, default=[1.0, 0.5, 0.25, 0.0])
    noise.add_argument("--episodes", type=int, default=10)
    noise.add_argument("--out", default="noise")
    exchange = modes.add_parser("exchange", help="time of one gradient all-reduce between torchrun ranks")
    exchange.add_argument("--ranks", type=int, default=2)
    exchange.add_argument("--out", default="exchange", help="results file name: <out>.md")
    scaling = modes.add_parser("scaling", help="steps/s of the default command on 1, 2, 4, ... torchrun ranks")
    scaling.add_argument("--env-id", default="HalfCheetah-v4")
    scaling.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    scaling.add_argument("--steps-per-rank", type=int, default=100_000, help="the same work per rank")
    scaling.add_argument("--out", default="scaling", help="results file names: <out>.md, <out>.csv")
    args = parser.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    if args.mode == "returns":
        returns_mode(args)
    elif args.mode == "pool":
        pool_mode(args)
    elif args.mode == "exchange":
        exchange_mode(args)
    elif args.mode == "scaling":
        scaling_mode(args)
    elif args.mode == "noise":
        noise_mode(args)
    else:
        throughput_mode(args)


def noise_mode(args) -> None:
    """Evaluation returns of trained policies whose σ is scaled: how much the noise left at 1M steps costs."""
    import torch

    sys.path.insert(0, ROOT)
    from ppo_continuous import evaluate, load_checkpoint, load_policy

    torch.set_num_threads(1)
    paths = sorted(path for pattern in args.checkpoints for path in glob.glob(pattern))
    if not paths or min(args.scales) < 0:
        sys.exit(f"error: no checkpoint matches {args.checkpoints}" if not paths else "error: --scales must be >= 0")
    returns = {}  # (env, scale) -> one mean return per checkpoint
    for path in paths:
        checkpoint = load_checkpoint(path)  # checked, and older ones given what their missing settings meant
        saved = checkpoint["args"]
        for scale in args.scales:
            agent, obs_rms = load_policy(checkpoint, saved["env_id"], torch.device("cpu"))
            agent.actor_logstd.data += np.log(scale) if scale > 0 else 0.0
            episode_returns = evaluate(agent, obs_rms, saved["env_id"], episodes=args.episodes, seed=saved["seed"],
                                       clip_obs=saved["clip_obs"], rescale_actions=saved["rescale_actions"],
                                       stochastic=scale > 0)
            returns.setdefault((saved["env_id"], scale), []).append(np.mean(episode_returns))
            print(f"{path} σ x {scale}: {np.mean(episode_returns):,.0f}", flush=True)
    envs = list(dict.fromkeys(env for env, _ in returns))
    with open(os.path.join(RESULTS, f"{args.out}.md"), "w") as f:
        f.write(f"`{' '.join(['python', *sys.argv])}` on {machine()}: {len(paths)} checkpoints, {args.episodes} "
                f"episodes each, actions sampled with σ scaled (0: the mean action); mean ± std over checkpoints\n\n"
                f"| env | checkpoints | " + " | ".join(f"σ x {scale}" for scale in args.scales) + " |\n|---|---:|"
                + "---:|" * len(args.scales) + "\n")
        for env_id in envs:
            cells = [f"{np.mean(returns[env_id, s]):,.0f} ± {np.std(returns[env_id, s]):,.0f}" for s in args.scales]
            f.write(f"| {env_id} | {len(returns[env_id, args.scales[0]])} | " + " | ".join(cells) + " |\n")
    print(open(os.path.join(RESULTS, f"{args.out}.md")).read())


def exchange_mode(args) -> None:
    if "RANK" not in os.environ:  # start this mode again, as torchrun's ranks
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}",
                        os.path.abspath(__file__), "exchange", "--ranks", str(args.ranks), "--out", args.out],
                       check=True)
        print(open(os.path.join(RESULTS, f"{args.out}.md")).read())
        return
    import torch
    import torch.distributed as dist

    sys.path.insert(0, ROOT)
    from ppo_continuous import Agent

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    gradient = torch.cat([p.detach().reshape(-1) for p in Agent(17, 6).parameters()])  # HalfCheetah: 17 obs, 6 actions
    work = torch.randn(256, 256)
    timings = {}
    for name, products in (("idle", 0), ("with compute between", 20)):
        seconds = 0.0
        for step in range(600):
            for _ in range(products):
                work @ work
            start = time.perf_counter()
            dist.all_reduce(gradient)
            seconds += (time.perf_counter() - start) if step >= 100 else 0.0  # the first 100: warm-up
        timings[name] = seconds / 500
    if dist.get_rank() == 0:
        with open(os.path.join(RESULTS, f"{args.out}.md"), "w") as f:
            f.write(f"One all-reduce of {gradient.numel():,} float32 (the default HalfCheetah networks' gradient) "
                    f"between {args.ranks} gloo ranks on {machine()}; "
                    f"`python benchmarks/benchmark.py exchange --ranks {args.ranks}`: "
                    + ", ".join(f"{name} {seconds * 1e6:,.0f} µs" for name, seconds in timings.items()) + "\n")
    dist.destroy_process_group()


def write_csv(out: str, fields: list[str], rows: list[dict]) -> None:
    """<out>.csv in the results folder: a header, then each row's `fields`."""
    with open(os.path.join(RESULTS, f"{out}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: row[k] for k in fields} for row in rows)


def caption(what: str) -> str:
    """A table's first line: what ran, on which machine, by which command."""
    return f"{what}, {machine()}, Python {platform.python_version()}; `{' '.join(['python', *sys.argv])}`\n\n"


def scaling_mode(args) -> None:
    """The default command on each number of ranks in turn, the same steps per rank: steps/s, and the efficiency
    steps/s ÷ (ranks × one process's steps/s): 1 is perfect scaling."""
    rows = []
    for ranks in args.ranks:
        rows.append(run_ours(f"ours-{ranks}-ranks", args.env_id, ranks * args.steps_per_rank, [], ranks=ranks))
        rows[-1]["ranks"], rows[-1]["sps"] = ranks, rows[-1]["steps"] / rows[-1]["wall_s"]
        print(f"{ranks:>3} rank(s): {rows[-1]['sps']:8,.0f} steps/s  ({rows[-1]['wall_s']:.1f} s)", flush=True)
    one = next((row["sps"] for row in rows if row["ranks"] == 1), None)  # no 1 in --ranks: no ratios
    for row in rows:
        row["speedup"] = row["sps"] / one if one else float("nan")
        row["efficiency"] = row["speedup"] / row["ranks"]

    write_csv(args.out, ["ranks", "steps", "wall_s", "sps", "speedup", "efficiency", "rollout_s", "update_s",
                         "command"], rows)
    with open(os.path.join(RESULTS, f"{args.out}.md"), "w") as f:
        f.write(caption(f"{args.env_id}, {args.steps_per_rank:,} steps per rank"))
        f.write("| ranks | steps/s | × one process | efficiency | wall-clock s | rollout s | update s |\n"
                "|---:|---:|---:|---:|---:|---:|---:|\n")
        for row in rows:
            f.write(f"| {row['ranks']} | {row['sps']:,.0f} | {row['speedup']:.2f} | {row['efficiency']:.0%} "
                    f"| {row['wall_s']:.1f} | {row['rollout_s']:.1f} | {row['update_s']:.1f} |\n")


def throughput_mode(args) -> None:
    steps = 50_000 if args.short else args.steps
    rows = []
    for name in args.only:
        if name == "ours-default":
            rows.append(run_ours(name, args.env_id, steps, []))
        elif name == "ours-cuda":
            rows.append(run_ours(name, args.env_id, steps, ["--cuda"]))
        elif name == "ours-2-ranks":
            rows.append(run_ours(name, args.env_id, steps, [], ranks=2))
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
    pairs = [("ours-default", "sb3-reference"), ("ours-reference", "sb3-reference"), ("ours-default", "raw-env"),
             ("ours-2-ranks", "ours-default"), ("ours-cuda", "ours-default")]
    for ours, theirs in pairs:
        if ours in by_name and theirs in by_name:
            ratios.append(f"{ours} / {theirs}: {by_name[ours]['sps'] / by_name[theirs]['sps']:.2f}x")
    print("\n".join(ratios))

    write_csv(args.out, ["run", "steps", "wall_s", "sps", "rollout_s", "update_s", "command"], rows)
    with open(os.path.join(RESULTS, f"{args.out}.md"), "w") as f:
        f.write(caption(f"{args.env_id}, {steps:,} steps per run"))
        f.write("| run | steps/s | wall-clock s | rollout s | update s |\n|---|---:|---:|---:|---:|\n")
        for row in rows:
            f.write(f"| {row['run']} | {row['sps']:,.0f} | {row['wall_s']:.1f} | {row['rollout_s']:.1f} "
                    f"| {row['update_s']:.1f} |\n")
        f.write("\n" + "; ".join(ratios) + "\n")


if __name__ == "__main__":
    main()
