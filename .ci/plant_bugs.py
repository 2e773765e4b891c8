"""Plant each bug kind in a scratch copy of the repository and check that the test named beside it fails.

    python .ci/plant_bugs.py            # all kinds, a few minutes
    python .ci/plant_bugs.py 5 R1       # the kinds whose labels start so

Not part of CI: run it after changing a test or the code a test guards. Kinds 1-6 are issue #9's,
R1-R14 issue #10's (by item number), K, L, E and W issue #11's, D issue #12's (data parallel), F a formula's.
"""

import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (label, text in ppo_continuous.py, what replaces it, pytest -k expression of the tests that must fail)
KINDS = [
    ("1 final obs stored raw",
     'rollout["final_obs"][step, done] = normalize_obs(final_obs, obs_rms, clip_obs)',
     'rollout["final_obs"][step, done] = final_obs',
     "test_rollout_normalizes_with_frozen_statistics_including_the_final_obs"),
    ("2a statistics never move",
     'obs_rms.update(rollout.pop("next_raw_obs").reshape(-1, obs_dim))', 'rollout.pop("next_raw_obs")',
     "test_statistics_absorb_every_step_after_each_rollout"),
    ("2b statistics move within a rollout",
     '            done = terminations | truncations\n',
     '            done = terminations | truncations\n            obs_rms.update(raw_obs)\n',
     "test_rollout_normalizes_with_frozen_statistics_including_the_final_obs"),
    ("3 evaluation updates the statistics",
     "        while not done:\n", "        while not done:\n            obs_rms.update(obs[None])\n",
     "test_evaluation_only_reads_the_statistics"),
    ("4 advantages normalized without --norm-adv", "if args.norm_adv:", "if True:",
     "test_advantages_reach_the_loss_normalized_only_with_norm_adv"),
    ("5 old log-probs not shuffled with the batch",
     "shuffled = {name: x[permutation] for name, x in batch.items()}",
     'shuffled = {name: x if name == "logprobs" else x[permutation] for name, x in batch.items()}',
     "test_first_minibatch_scores_pi_old_and_v_old_of_its_own_samples"),
    ("6 no gradient-norm clipping",
     "            nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)\n", "",
     "test_gradient_norm_is_clipped_before_every_adam_step"),
    ("K target-kl decided on the last minibatch", "epoch_kl = mean_over_ranks(kls.mean()).item()",
     "epoch_kl = mean_over_ranks(kls[-1]).item()", "test_target_kl_ends_the_update"),
    ("L1 adaptive step size not capped by the schedule", "return min(1.0, lr_scale * 1.5)",
     "return lr_scale * 1.5", "test_lr_kl_target"),
    ("L2 adaptive step size forgotten on resume", 'checkpoint["iteration"] + 1, checkpoint["lr_scale"]',
     'checkpoint["iteration"] + 1, 1.0', "test_lr_kl_target"),
    ("D1 gradients not averaged across ranks", "average_gradients(parameters)  # III", "pass  # III",
     "test_two_ranks_train_one_policy"),
    ("D2 gradients summed, not averaged", "        tensor /= dist.get_world_size()\n", "",
     "test_ranks_combine_their_shares"),
    ("D3 one rank's KL decides", "epoch_kl = mean_over_ranks(kls.mean()).item()",
     "epoch_kl = kls.mean().item()", "test_two_ranks_train_one_policy"),
    ("D4 statistics merge one rank's batch",
     "in all_ranks((batch.mean(axis=0), batch.var(axis=0), batch.shape[0])):",
     "in [(batch.mean(axis=0), batch.var(axis=0), batch.shape[0])]:", "test_ranks_combine or test_two_ranks_train"),
    ("D5 advantages normalized by one rank's share", 'mean, std = mean_and_std(mb["advantages"])',
     'mean, std = mb["advantages"].mean(), mb["advantages"].std()', "test_two_ranks_train_one_policy"),
    ("D6 global step counts one rank", "global_step += batch_size * world_size", "global_step += batch_size",
     "test_two_ranks_train_one_policy"),
    ("D7 each rank honours its own signal", "max(all_ranks(self.received[0] if self.received else 0))",
     "(self.received[0] if self.received else 0)", "test_stop_signal_stops_every_rank"),
    ("D8 ranks' envs seeded alike", "seed=args.seed + rank * args.num_envs + global_step",
     "seed=args.seed + global_step", "test_two_ranks_train_one_policy"),
    ("D9 ranks start from their own weights", "            dist.broadcast(parameter.data, src=0)\n",
     "            pass\n", "test_two_ranks_train_one_policy"),
    ("D10 resumed ranks restart their optimizer", '    optimizer.load_state_dict(checkpoint["optimizer"])\n',
     '    optimizer.load_state_dict(checkpoint["optimizer"]) if rank == 0 else None\n',
     "test_two_rank_checkpoint_resumes"),
    ("D11 an error on rank 0 strands the others", "self.dir = on_rank_0(make_run_dir, args, run_dir)",
     "self.dir = all_ranks(make_run_dir(args, run_dir) if rank == 0 else None)[0]",
     "test_an_error_on_rank_0_stops_every_rank"),
    ("M1 old checkpoints refused",
     'checkpoint["args"] = {"lr_kl_target": None, "anneal_ent_coef": False, "critic_width": 64} | checkpoint["args"]',
     "pass",
     "test_checkpoint_from_before_torchrun"),
    ("M2 old checkpoints resume with a decaying c2", '"anneal_ent_coef": False,', '"anneal_ent_coef": True,',
     "test_checkpoint_from_before_torchrun"),
    ("F explained variance inverted", "1 - var_errors / var_returns", "var_errors / var_returns",
     "test_logged_explained_variance"),
    ("R14 time left miscounted", "round((total_steps - global_step) / max(sps, 1))", "round(global_step / max(sps, 1))",
     "test_progress_line_shows_the_time_left"),
    ("R1 SIGTERM not handled", "SIGNALS = (signal.SIGINT, signal.SIGTERM)", "SIGNALS = (signal.SIGINT,)",
     "test_stop_signal_saves_checkpoint"),
    ("R2 runs share a directory", "os.makedirs(candidate, exist_ok=run_dir is not None)",
     "os.makedirs(candidate, exist_ok=True)", "test_runs_started_in_the_same_second_get_their_own_directories"),
    ("R3 a typed default is ignored", 'given = {name.removeprefix("no_") for name in given} & set(ARG_NAMES)',
     "given = {name for name in ARG_NAMES if getattr(args, name) != getattr(Args(), name)}",
     "test_an_option_typed_with_its_default_value_counts or default_total_timesteps"),
    ("R5 resume forgets runtime settings", "changed = given & (RUNTIME_SETTINGS | {\"total_timesteps\"})",
     "changed = RUNTIME_SETTINGS | ({\"total_timesteps\"} & given)",
     "test_resume_keeps_the_checkpoint_runtime_settings_unless_given"),
    ("R6 resume purges the checkpoint's step", "purge_step=global_step + 1 if run_dir else None",
     "purge_step=global_step if run_dir else None", "test_extending_a_finished_run"),
    ("R7 non-finite statistics saved",
     "guarded = [list(stats.values()), obs_rms.mean, obs_rms.var, reward_scaler.return_rms.var]",
     "guarded = [list(stats.values())]", "test_non_finite_statistics_never_reach_a_checkpoint"),
    ("R8 stray temporary file", '        if os.path.isfile(path + ".tmp"):\n            os.remove(path + ".tmp")\n', "",
     "test_disk_full"),
    ("R9 negative --vf-coef accepted", '(("vf_coef", "ent_coef"), lambda v: 0 <= v < np.inf',
     '(("ent_coef",), lambda v: 0 <= v < np.inf', "test_every_numeric_option_is_checked_against_its_domain"),
    ("E1 entropy weight never decays", "args.ent_coef * (remaining if args.anneal_ent_coef else 1.0)",
     "args.ent_coef", "test_entropy_weight_decays_linearly_to_zero_only_with_anneal_ent_coef"),
    ("E2 entropy weight decays on the step-size clock",
     "args.ent_coef * (remaining if args.anneal_ent_coef else 1.0)",
     'args.ent_coef * optimizer.param_groups[0]["lr"] / args.learning_rate',
     "test_entropy_weight_decays_linearly_to_zero_only_with_anneal_ent_coef"),
    ("R10 env errors as tracebacks", "    except Exception as error:  # unknown ids, missing packages",
     "    except gym.error.Error as error:  # unknown ids, missing packages",
     "test_any_failure_to_make_the_environment_is_one_line"),
    ("R11 render_mode always passed",
     'env = make_env(env_id, render_mode="rgb_array") if video_dir else make_env(env_id)',
     'env = make_env(env_id, render_mode="rgb_array" if video_dir else None)',
     "test_env_without_render_mode_argument"),
    ("W1 critic width ignored in training", "Agent(obs_dim, action_dim, args.init_logstd, args.critic_width)",
     "Agent(obs_dim, action_dim, args.init_logstd)", "test_critic_width"),
    ("W2 critic width widens the actor too", "self.actor_mean = self.mlp(obs_dim, action_dim, out_gain=0.01)",
     "self.actor_mean = self.mlp(obs_dim, action_dim, out_gain=0.01, width=critic_width)", "test_critic_width"),
    ("W3 critic width forgotten by a checkpoint",
     'Agent(obs_dim, action_dim, critic_width=checkpoint["args"]["critic_width"])', "Agent(obs_dim, action_dim)",
     "test_critic_width"),
    ("W4 zero critic width accepted", '"torch_threads",\n      "critic_width"),', '"torch_threads"),',
     "test_every_numeric_option_is_checked_against_its_domain"),
]


def main() -> None:
    labels = sys.argv[1:]
    for label, text, replacement, tests in KINDS:
        if labels and not any(label.startswith(prefix) for prefix in labels):
            continue
        scratch = os.path.join(tempfile.gettempdir(), "plant_bugs", label.split()[0])
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(ROOT, scratch, ignore=shutil.ignore_patterns(".git", "runs", "benchmarks", "__pycache__"))
        path = os.path.join(scratch, "ppo_continuous.py")
        code = open(path).read()
        assert code.count(text) == 1, f"{label}: the text to replace occurs {code.count(text)} times"
        open(path, "w").write(code.replace(text, replacement))
        result = subprocess.run([sys.executable, "-m", "pytest", "test_ppo.py", "-q", "-x", "-k", tests, "-p",
                                 "no:cacheprovider"], cwd=scratch, capture_output=True, text=True)
        verdict = "CAUGHT" if result.returncode == 1 else "MISSED"
        print(f"{verdict}  {label:45s} by {tests}: {result.stdout.strip().splitlines()[-1]}", flush=True)


if __name__ == "__main__":
    main()
