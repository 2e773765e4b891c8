"""Plant each bug kind in a scratch copy of the repository and check that the test named beside it fails.

    python .ci/plant_bugs.py            # all kinds, a few minutes
    python .ci/plant_bugs.py 5 R1       # the kinds whose labels start so

Not part of CI: run it after changing a test or the code a test guards. Kinds 1-6 are issue #9's,
R1-R14 issue #10's (by item number), K, L, E and W issue #11's, D issue #12's (data parallel), F a formula's,
T issue #23's (properties of the loop and the update), C issue #24's (reliability).
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
    # issue #23: properties of the loop and the update, and the held-out areas
    ("T1 s_T normalized after the statistics moved",
     "            next_obs = normalize_obs(raw_obs, obs_rms, args.clip_obs)  # s_T, normalized like s_t\n"
     '            obs_rms.update(rollout.pop("next_raw_obs").reshape(-1, obs_dim))  # between rollouts\n',
     '            obs_rms.update(rollout.pop("next_raw_obs").reshape(-1, obs_dim))  # between rollouts\n'
     "            next_obs = normalize_obs(raw_obs, obs_rms, args.clip_obs)  # s_T, normalized like s_t\n",
     "test_gae_is_fed_the_state_after_the_rollout"),
    ("T2 s_T taken as the last stored state", "next_obs = normalize_obs(raw_obs, obs_rms, args.clip_obs)",
     'next_obs = rollout["obs"][-1]', "test_gae_is_fed_the_state_after_the_rollout"),
    ("T3 reward scaler told of terminations only", 'reward_scaler(rollout["rewards"], rollout["dones"])',
     'reward_scaler(rollout["rewards"], rollout["terminations"])', "test_training_restarts_the_scaled_return"),
    ("T4 return restarted every rollout", "        returns = np.empty_like(rewards, dtype=np.float64)\n",
     "        returns = np.empty_like(rewards, dtype=np.float64)\n        self.returns = 0 * self.returns\n",
     "test_reward_scaler_carries or test_training_restarts_the_scaled_return"),
    ("T5 gradients accumulate across minibatches", "            optimizer.zero_grad()\n", "",
     "test_each_adam_step_uses_the_gradient_of_its_own_minibatch_alone"),
    ("T6 no reshuffle between epochs", "permutation = torch.randperm(batch_size,",
     "permutation = torch.arange(batch_size,", "test_each_epoch_reshuffles_the_whole_batch"),
    ("T7 minibatches drawn with replacement", "permutation = torch.randperm(batch_size,",
     "permutation = torch.randint(batch_size, (batch_size,),", "test_each_epoch_reshuffles_the_whole_batch"),
    ("T8 KL stop averages every minibatch so far", 'for stats in epoch_stats])\n',
     'for stats in update_stats + epoch_stats])\n', "test_target_kl_ends_the_update"),
    ("T9 clipped before averaging over ranks",
     "            average_gradients(parameters)  # III: the mean over ranks\n"
     "            nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)\n",
     "            nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)\n"
     "            average_gradients(parameters)  # III: the mean over ranks\n",
     "test_two_ranks_train_one_policy"),
    ("T10 ranks seeded alike", "seed(args.seed + rank)", "seed(args.seed)", "test_two_ranks_train_one_policy"),
    ("T11 resumed run reseeds", '        torch.set_rng_state(checkpoint["torch_rng"])\n', "        pass\n",
     "test_a_resumed_run_continues_the_random_state"),
    ("T12 final evaluation samples", "stochastic=self.args.eval_stochastic", "stochastic=True",
     "test_evaluation_takes_the_mean_action"),
    ("T13 --eval-checkpoint samples", "clip_obs=checkpoint[\"args\"][\"clip_obs\"], stochastic=args.eval_stochastic",
     "clip_obs=checkpoint[\"args\"][\"clip_obs\"], stochastic=True", "test_evaluation_takes_the_mean_action"),
    ("T14 a stop with --no-save-model is not saved", "if stop.agreed() or args.save_model:", "if args.save_model:",
     "test_stop_signal_saves_checkpoint_and_leaves_no_workers"),
    ("T15 an episode's length off by one", "(step, episode_return, length) for",
     "(step, episode_return, length - 1) for",
     "test_each_logged_episode_is_that_episodes_own_return_and_length"),
    ("T16 an episode logged one step late", "(self.args.num_steps - step - 1) * steps_per_env_step",
     "(self.args.num_steps - step - 2) * steps_per_env_step", "test_each_logged_episode"),
    ("T17 one log sigma for every action dimension", "torch.full((action_dim,), float(init_logstd))",
     "torch.full((1,), float(init_logstd))", "test_policy_shapes_with_several_action_dimensions"),
    ("T18 gamma 0 refused", "lambda v: 0 <= v <= 1,", "lambda v: 0 < v <= 1,", "test_the_edges_of_every_option_domain"),
    ("T19 steps/s counts earlier sessions", "self.start_step, self.start_time, self.last_print = global_step,",
     "self.start_step, self.start_time, self.last_print = 0,", "test_steps_per_second_and_time_left_after_a_resume"),
    # issue #24: reliability
    ("C1 a bad MUJOCO_GL breaks training", '        os.environ["MUJOCO_GL"] = "disable"\n', "        pass\n",
     "test_a_bad_mujoco_gl_matters_only"),
    ("C2 resuming a copy writes in its run", 'if os.path.basename(path) == "checkpoint.pt" else None',
     'if True else None', "test_resuming_an_older_copy"),
    ("C3 the file's run directory trusted", "train(args, checkpoint, resume_dir(args.resume) if checkpoint else None)",
     'train(args, checkpoint, checkpoint.get("run_dir") or resume_dir(args.resume) if checkpoint else 0)',
     "test_a_resume_never_writes_where_the_checkpoint_file_says"),
    ("C4 --exp-name may be a path", 'if args.exp_name in ("", ".", "..") or', "if False and",
     "test_exp_name_is_a_name"),
    ("C5 only the weights checked for finite values", 'name.split(".")[0] != "args"',
     'name.split(".")[0] == "agent"', "test_every_tensor_of_a_checkpoint_is_checked"),
    ("C6 the checksum not compared", 'checkpoint.pop("sha256") != content_digest(checkpoint)',
     'checkpoint.pop("sha256") is None', "test_a_corrupted_checkpoint_is_refused"),
    ("C7 a finished run resumes silently", 'if checkpoint["iteration"] >= resumed.total_timesteps',
     'if False and checkpoint["iteration"] >= resumed.total_timesteps', "test_resuming_a_finished_run"),
    ("C8 a lost rank ends in a traceback", "except (RuntimeError, dist.DistError) as error:",
     "except ImportError as error:", "test_a_killed_rank_leaves_the_other_with_one_line"),
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
