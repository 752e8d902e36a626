"""The catalogue of known-bad edits: bugs that must never land, each with the tests that must catch it.

Every entry is a small text patch of the product code (`edits`: (file, text to find, replacement); the text
must occur exactly once, so an edit that no longer matches the code is reported as STALE, never silently
skipped), the tests expected to fail on the patched tree, and why the bug matters (the seed or reference
evidence). `python tests/mutations/run.py` applies each one to a copy of the tree and reports who killed it;
`tests/test_mutations.py` runs the whole catalogue in CI and fails if any edit survives.

To add an edit: append a `Mutation` below with the smallest patch that reproduces the bug, list the tests
that should kill it (as pytest node ids, the fewer and faster the better), and run
`python tests/mutations/run.py --only <name>`: it must say KILLED. If it says SURVIVED, the suite has a
hole: write the test that catches it, then list it here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    name: str
    why: str
    edits: tuple[tuple[str, str, str], ...]  # (file, find, replace), applied in order
    tests: tuple[str, ...]


GUARD = "tests/test_config_guard.py"
RAINBOW = "tests/test_rainbow.py"
REPLAY = "tests/test_replay.py"
LOOP = "tests/test_env_tm.py"
DEMOS = "tests/test_demos.py"
N_STEP = f"{REPLAY}::test_n_step_returns_match_a_hand_computed_sum_across_episode_ends"
PREVIOUS_ACTIONS = (
    f"{LOOP}::test_previous_actions_in_a_state_are_the_ones_before_it_never_the_one_about_to_be_chosen"
)
LEARNER = "tests/test_learner.py"
BESIDE = "tests/test_beside.py"
TM = "tests/test_trackmania.py"
LEARNER_SCHEDULE = f"{LEARNER}::test_the_engine_learns_one_step_per_stored_step_and_never_ahead"
LEARNER_BESIDE = f"{BESIDE}::test_a_learner_beside_the_actor_keeps_the_schedule_and_shares_its_weights"

LOOP_STORES = f"{LOOP}::test_the_loop_stores_every_transition_as_the_environment_gave_it"
LOOP_EPSILON = f"{LOOP}::test_the_loop_acts_with_the_epsilon_of_the_global_step_and_logs_the_one_used"
IQN_GRADIENT = f"{RAINBOW}::test_train_weights_the_quantile_loss_by_the_online_taus_and_the_is_weights"
GRAD_NORM = f"{RAINBOW}::test_train_records_the_pre_clip_gradient_norm_and_sends_td_errors_as_priorities"
BN_MODES = f"{RAINBOW}::test_batchnorm_mode_of_every_forward_pass"
HARD_COPY = f"{GUARD}::test_target_network_changes_only_by_hard_copy_every_1500_learn_steps"
PINNED = f"{GUARD}::test_pinned_value_unchanged"
CODE_SCAN = f"{GUARD}::test_no_code_path_for_soft_updates_schedulers_or_episode_epsilon"


CATALOGUE: tuple[Mutation, ...] = (
    # --- the six that passed the whole suite in the review (issue 12) -----------------------------------
    Mutation(
        "eps_from_episode_count",
        "seed 004: episode-based epsilon left ~150k steps of exploration instead of ~1.25M",
        (("env_tm.py", "actor.act(frames, car, run.step)", "actor.act(frames, car, run.episode)"),),
        (LOOP_EPSILON,),
    ),
    Mutation(
        "quantile_weight_from_target_taus",
        "IQN: the asymmetric weight |tau - 1{u<0}| must use the online quantile fractions, or the net "
        "learns the wrong quantiles",
        (
            (
                "rainbow.py",
                "quantile_huber_loss(taken, taus, target_quantiles",
                "quantile_huber_loss(taken, target_taus, target_quantiles",
            ),
        ),
        (IQN_GRADIENT,),
    ),
    Mutation(
        "truncation_stored_as_terminal",
        "original-code.md defect 5: a time-limit cut stored as terminal zeroes the value of good states",
        (
            (
                "session.py",
                "Step(action, reward, bool(terminated), bool(truncated),",
                "Step(action, reward, bool(terminated or truncated), bool(truncated),",
            ),
        ),
        (LOOP_STORES,),
    ),
    Mutation(
        "actions_stored_one_step_late",
        "the action of step t stored with step t+1's reward: every Q(s, a) learns another action's return",
        (
            (
                "env_tm.py",
                "            action = actor.act(frames, car, run.step)\n",
                '            late, action = locals().get("action", 0), actor.act(frames, car, run.step)\n',
            ),
            (
                "env_tm.py",
                "session.store_step(action, reward,",
                "session.store_step(late, reward,",
            ),
        ),
        (LOOP_STORES,),
    ),
    Mutation(
        "argmax_with_batchnorm_in_train_mode",
        "original-code.md defect 3: batch statistics of the next states leak into the target's argmax",
        (
            (
                "rainbow.py",
                "            self._online_mode(training=False)\n            action_taus",
                "            self._online_mode(training=True)\n            action_taus",
            ),
        ),
        (BN_MODES,),
    ),
    Mutation(
        "hard_copy_without_batchnorm_buffers",
        "a target that keeps stale BatchNorm statistics is not the online net it was copied from",
        (
            (
                "rainbow.py",
                "self.target.load_state_dict(self.online.state_dict())",
                "self.target.load_state_dict({k: v for k, v in self.online.state_dict().items() if 'running' not in k and 'num_batches' not in k}, strict=False)",
            ),
        ),
        (f"{RAINBOW}::test_the_hard_copy_includes_batchnorm_statistics", HARD_COPY),
    ),
    # --- the four the guard caught in the review ----------------------------------------------------------
    Mutation(
        "target_copy_every_1000",
        "seed 004: the hard copy every 1500 learn steps is sacred",
        (
            (
                "tm_config.py",
                "target_network_update_frequency: int = 1500",
                "target_network_update_frequency: int = 1000",
            ),
        ),
        (PINNED,),
    ),
    Mutation(
        "soft_target_update",
        "seed 004: soft updates tau=0.002 every step drove Q from 10 to -40,000",
        (
            (
                "rainbow.py",
                "            if self.applied_steps % cfg.target_network_update_frequency == 0:\n                self.update_target_network()\n",
                "            self.update_target_network()\n",
            ),
            (
                "rainbow.py",
                "        self.target.load_state_dict(self.online.state_dict())\n",
                "        for target_p, online_p in zip(self.target.parameters(), self.online.parameters()):\n            target_p.data.mul_(0.998).add_(0.002 * online_p.data)\n",
            ),
        ),
        (HARD_COPY,),
    ),
    Mutation(
        "step_lr_scheduler",
        "seed 004: a decaying learning rate could not pull diverging Q back",
        (
            (
                "rainbow.py",
                "        self.reseed(seed)\n        self.learn_steps = 0",
                "        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=100, gamma=0.5)\n        self.reseed(seed)\n        self.learn_steps = 0",
            ),
            (
                "rainbow.py",
                "            self.optimizer.step()\n",
                "            self.optimizer.step()\n            self.scheduler.step()\n",
            ),
        ),
        (CODE_SCAN, HARD_COPY),
    ),
    Mutation(
        "learning_rate_3e-4",
        "seed 004: the constant learning rate 1e-4 is sacred",
        (("tm_config.py", "learning_rate: float = 0.0001", "learning_rate: float = 0.0003"),),
        (PINNED,),
    ),
    # --- noise ------------------------------------------------------------------------------------------
    Mutation(
        "noise_reset_is_a_noop",
        "original-code.md defect 1: the reset reached no layer, so one noise draw was kept for the whole run",
        (
            (
                "rainbow.py",
                "        for buffer in (self.epsilon_in, self.epsilon_out):",
                "        for buffer in ():",
            ),
        ),
        (f"{RAINBOW}::test_noise_changes_between_resets_and_is_off_when_disabled",),
    ),
    Mutation(
        "online_noise_never_resampled",
        "NoisyNet explores only if the online noise is redrawn at every learn step",
        (
            (
                "rainbow.py",
                "        self.online.reset_noise(self.learn_generator)\n        taus = ",
                "        taus = ",
            ),
        ),
        (f"{RAINBOW}::test_every_learn_step_resamples_online_noise_and_target_noise",),
    ),
    Mutation(
        "target_noise_never_resampled",
        "original-code.md defect 1: every hard copy gave the target the same frozen noise",
        (
            (
                "rainbow.py",
                "        self.target.reset_noise(self.learn_generator)\n        if target_taus is None:",
                "        if target_taus is None:",
            ),
        ),
        (f"{RAINBOW}::test_every_learn_step_resamples_online_noise_and_target_noise",),
    ),
    # --- the seeds' bugs ----------------------------------------------------------------------------------
    Mutation(
        "tanh_bounded_q_head",
        "seed 000: a tanh-bounded head trained on unbounded targets saturated at its bound",
        (
            (
                "rainbow.py",
                "        return value + advantage - advantage.mean(dim=-1, keepdim=True)",
                "        return torch.tanh(value + advantage - advantage.mean(dim=-1, keepdim=True))",
            ),
        ),
        (f"{RAINBOW}::test_network_shapes_and_unbounded_dueling_head",),
    ),
    Mutation(
        "zero_initialised_output_layer",
        "seed 003: a zero-initialised output layer is a dead head that cannot tell actions apart",
        (
            (
                "rainbow.py",
                "            self.value_out = NoisyLinear(hidden, 1, std)\n",
                "            self.value_out = NoisyLinear(hidden, 1, std)\n        nn.init.zeros_(self.advantage_out.weight_mu)\n        nn.init.zeros_(self.advantage_out.bias_mu)\n",
            ),
        ),
        (f"{RAINBOW}::test_no_output_layer_is_initialised_to_zero",),
    ),
    Mutation(
        "grad_norm_never_recorded",
        "seed 003: the gradient norm read 0.000 for a whole run because it was computed and discarded",
        (
            (
                "rainbow.py",
                "        grad_norm = torch.nn.utils.clip_grad_norm_(self.online.parameters(), cfg.gradient_clip_norm)",
                "        torch.nn.utils.clip_grad_norm_(self.online.parameters(), cfg.gradient_clip_norm)\n        grad_norm = torch.zeros((), device=self.device)",
            ),
        ),
        (GRAD_NORM,),
    ),
    Mutation(
        "importance_weights_dropped",
        "PER without importance weights biases every update toward high-priority samples",
        (("rainbow.py", 'weighted = batch["weights"] * per_sample', "weighted = per_sample"),),
        (IQN_GRADIENT,),
    ),
    Mutation(
        "priorities_never_updated",
        "PER that never learns priorities samples by insertion order only",
        (
            (
                "rainbow.py",
                '            self.replay.update_priorities(batch_np["indices"], td_error_np)\n',
                "",
            ),
        ),
        (GRAD_NORM,),
    ),
    Mutation(
        "alpha_applied_twice",
        "priorities raised to alpha twice flatten prioritisation (p^(alpha^2))",
        (
            (
                "replay.py",
                "self.tree.update(indices[live] % self.capacity, raw**self.alpha)",
                "self.tree.update(indices[live] % self.capacity, (raw**self.alpha) ** self.alpha)",
            ),
        ),
        (REPLAY,),
    ),
    Mutation(
        "gamma_applied_twice",
        "seed 001: a return discounted wrongly implies impossible values; gamma^2 shortens every horizon",
        (
            (
                "rainbow.py",
                'batch["reward"].unsqueeze(1) + batch["discount"].unsqueeze(1) * next_value',
                'batch["reward"].unsqueeze(1) + cfg.discount_factor * batch["discount"].unsqueeze(1) * next_value',
            ),
        ),
        (f"{RAINBOW}::test_double_dqn_target_uses_the_online_argmax_and_the_target_value",),
    ),
    Mutation(
        "gradients_flow_into_the_target",
        "TD targets are constants: a gradient through them chases a moving target (seed 004's failure mode)",
        (
            ("rainbow.py", "    @torch.no_grad()\n    def td_targets(", "    def td_targets("),
            ("rainbow.py", "        self.target.requires_grad_(False)\n", ""),
        ),
        (f"{RAINBOW}::test_no_gradient_ever_reaches_the_target_net",),
    ),
    # --- small truths of the same review ------------------------------------------------------------------
    Mutation(
        "weight_decay_default_moved",
        "original-code.md: the reference's AdamW ran with weight decay 0.01 on every parameter",
        (("tm_config.py", "weight_decay: float = 0.01", "weight_decay: float = 0.0"),),
        (PINNED,),
    ),
    Mutation(
        "optimizer_ignores_weight_decay",
        "a torch default standing in for a pinned value moves when torch does",
        (("rainbow.py", 'options = {"lr": lr, "weight_decay": weight_decay}', 'options = {"lr": lr}'),),
        (f"{RAINBOW}::test_adamw_weight_decay_is_the_pinned_value_on_every_parameter",),
    ),
    Mutation(
        "skipped_step_moves_the_target_clock",
        "a skipped (non-finite) learn step changed nothing: the hard copy must stay every 1500 applied steps",
        (
            (
                "rainbow.py",
                "            self.skipped_steps += 1\n",
                "            self.skipped_steps += 1\n            self.applied_steps += 1\n",
            ),
        ),
        (f"{RAINBOW}::test_a_skipped_learn_step_moves_neither_the_target_clock_nor_beta",),
    ),
    Mutation(
        "skipped_step_moves_beta",
        "beta anneals per learn step applied, not per batch drawn",
        (
            (
                "rainbow.py",
                "            self.skipped_steps += 1\n",
                "            self.skipped_steps += 1\n            self.replay.advance_beta()\n",
            ),
        ),
        (f"{RAINBOW}::test_a_skipped_learn_step_moves_neither_the_target_clock_nor_beta",),
    ),
    Mutation(
        "rollback_repeats_the_same_draws",
        "a rollback that restores torch's generator redraws the noise and taus that led to the failure",
        (
            (
                "session.py",
                "        self.actor.agent.reseed(stream_seeds(seed)[0])\n",
                "",
            ),
            (
                "learner.py",
                "        engine.agent.reseed(agent_seed)\n",
                "",
            ),
        ),
        (f"{LOOP}::test_a_rollback_draws_fresh_noise_and_quantile_fractions",),
    ),
    Mutation(
        "sacred_override_accepted_silently",
        "seed 004: a sacred invariant may be departed from only knowingly, with its own flag",
        (("env_tm.py", "        check_sacred_assignments(args.overrides, unpin_flags(args))\n", ""),),
        (f"{GUARD}::test_a_sacred_key_is_refused_on_the_command_line_without_its_own_flag",),
    ),
    Mutation(
        "unpinned_run_not_marked_in_checkpoints",
        "an unpinned run must say so wherever it is recorded",
        (("learner.py", '            "unpinned": unpinned_keys(self.config),\n', ""),),
        (f"{GUARD}::test_an_unpinned_run_is_marked_in_its_metrics_and_checkpoint",),
    ),
    # --- learning beside acting (issue 15) ----------------------------------------------------------------
    Mutation(
        "learner_runs_ahead_of_the_data",
        "the pinned replay ratio: a learner one step ahead samples a replay the env has not filled yet",
        (
            (
                "learner.py",
                "return self.pretrain_steps + max(0, self.replay.transitions_added - self.config.batch_size + 1)",
                "return self.pretrain_steps + max(0, self.replay.transitions_added - self.config.batch_size + 2)",
            ),
        ),
        (LEARNER_SCHEDULE, LOOP_STORES),
    ),
    Mutation(
        "actor_never_waits_for_a_lagging_learner",
        "without the bound the replay ratio drifts as far as the learner falls behind",
        (
            (
                "beside.py",
                "        while self.lag > limit:\n            self._drain(timeout=0.002)\n",
                "        if True:\n            self._drain(timeout=0.002)\n",
            ),
        ),
        (LEARNER_BESIDE,),
    ),
    Mutation(
        "lag_undercounted",
        "an actor that misjudges how far behind the learner is lets the replay ratio drift",
        (
            (
                "beside.py",
                "return self.pretrain + max(0, self.sent - self.batch_size + 1)",
                "return self.pretrain + max(0, self.sent - self.batch_size - 99)",
            ),
        ),
        (LEARNER_BESIDE,),
    ),
    Mutation(
        "actor_acts_with_frozen_weights",
        "an actor that never takes the learner's weights drives a frozen policy while the learner learns",
        (
            (
                "beside.py",
                "            self.actor_learn_step = self.mailbox.read_into(self.actor)\n",
                "            pass\n",
            ),
        ),
        (LEARNER_BESIDE,),
    ),
    Mutation(
        "target_copied_when_weights_are_published",
        "the hard copy is every 1500 learn steps, whatever the actor's refresh does",
        (
            (
                "beside.py",
                "            self.publish()\n        if self.learned is not None:  # after the weights",
                "            self.publish()\n            engine.agent.update_target_network()\n"
                "        if self.learned is not None:  # after the weights",
            ),
        ),
        (f"{BESIDE}::test_the_hard_copy_stays_at_every_1500_learn_steps_through_the_learner_process",),
    ),
    Mutation(
        "checkpoint_before_the_learner_caught_up",
        "a checkpoint whose replay holds steps its learner never learned from is not of one moment",
        (
            (
                "beside.py",
                "                if message.catch_up:  # else the run is leaving",
                "                if False:  # else the run is leaving",
            ),
        ),
        (f"{BESIDE}::test_a_checkpoint_holds_the_learner_caught_up_with_every_step_before_it",),
    ),
    # --- n-step returns and previous actions (issue 16) ---------------------------------------------------
    Mutation(
        "n_step_bootstraps_after_termination",
        "a window that ends in a termination must not bootstrap: the episode has no future",
        (
            (
                "replay.py",
                "discount = np.where(self.terminated[last], 0.0, self.discount_factor**count)",
                "discount = np.where(self.terminated[slots], 0.0, self.discount_factor**count)",
            ),
        ),
        (N_STEP,),
    ),
    Mutation(
        "n_step_discount_ignores_a_short_window",
        "a window cut short by the episode's end bootstraps with gamma^m, not gamma^n",
        (
            (
                "replay.py",
                "discount = np.where(self.terminated[last], 0.0, self.discount_factor**count)",
                "discount = np.where(self.terminated[last], 0.0, self.discount_factor**self.n_step)",
            ),
        ),
        (N_STEP,),
    ),
    Mutation(
        "n_step_window_crosses_into_the_next_episode",
        "rewards of the next episode are not this episode's return",
        (
            (
                "replay.py",
                "inside = (window < self._next_transition) & ~ended_before",
                "inside = window < self._next_transition",
            ),
        ),
        (N_STEP,),
    ),
    Mutation(
        "n_step_rewards_undiscounted",
        "seed 001: rewards summed without discounting imply impossible returns",
        (
            (
                "replay.py",
                "returns = (np.where(inside, self.rewards[window_slots], 0.0) * gammas).sum(axis=1)",
                "returns = np.where(inside, self.rewards[window_slots], 0.0).sum(axis=1)",
            ),
        ),
        (N_STEP,),
    ),
    Mutation(
        "previous_action_is_the_older_one",
        "the state must carry the newest action (the one the car applies next), not the one before it",
        (
            (
                "environment.py",
                "car = np.concatenate([car, *actions[2 - config.previous_actions :]])",
                "car = np.concatenate([car, *actions[: config.previous_actions]])",
            ),
        ),
        (PREVIOUS_ACTIONS,),
    ),
    Mutation(
        "demo_state_holds_the_next_action",
        "a demonstration's state must never hold the action about to be chosen (it would leak the label)",
        (
            (
                "demos.py",
                "older, newest = vectors[: episode.steps + 1], vectors[1 : episode.steps + 2]",
                "older, newest = vectors[1 : episode.steps + 2], vectors[2 : episode.steps + 3]",
            ),
        ),
        (f"{DEMOS}::test_state_rows_put_the_previous_actions_before_the_state_never_the_next_one",),
    ),
    # --- demonstrations (issue 17) --------------------------------------------------------------------------
    Mutation(
        "weights_normalised_across_the_mixed_batch",
        "seed 002: a statistic over the mixed expert + agent batch suppressed the agent's own data",
        (
            (
                "replay.py",
                "        for source in (is_demo, ~is_demo):  # normalised within each source (class docstring)\n            if source.any():\n                weights[source] /= weights[source].max()\n",
                "        weights /= weights.max()\n",
            ),
        ),
        (f"{REPLAY}::test_importance_weights_are_normalised_within_each_source",),
    ),
    Mutation(
        "batchnorm_over_the_mixed_batch",
        "seed 002: BatchNorm statistics of the mixed batch let the demonstrations set the agent's scale",
        (("rainbow.py", "if demo is None or bool(demo.all()) or not bool(demo.any()):", "if True:"),),
        (f"{RAINBOW}::test_batchnorm_statistics_of_a_mixed_batch_are_computed_within_each_source",),
    ),
    Mutation(
        "margin_loss_on_the_agents_own_transitions",
        "the large margin teaches the expert's action: applied to the agent's data it imitates the agent",
        (
            (
                "rainbow.py",
                "return ((q + margins).max(dim=1).values - expert)[demo].mean()",
                "return ((q + margins).max(dim=1).values - expert).mean()",
            ),
        ),
        (f"{RAINBOW}::test_the_margin_loss_applies_to_demonstrations_only_and_matches_its_definition",),
    ),
    Mutation(
        "no_demonstration_bonus",
        "DQfD: without the bonus the demonstrations are drawn as any old transition and fade from the batches",
        (("learner.py", "priority_bonus=config.demo_priority_bonus", "priority_bonus=0.0"),),
        (f"{LEARNER}::test_demonstrations_sit_beside_the_agents_data_with_their_bonus_and_never_leave",),
    ),
    Mutation(
        "pretraining_counted_as_env_steps_learned",
        "pretraining must come on top of the one learn step per environment step, not instead of it",
        (
            (
                "learner.py",
                "return self.pretrain_steps + max(0, self.replay.transitions_added - self.config.batch_size + 1)",
                "return max(0, self.replay.transitions_added - self.config.batch_size + 1)",
            ),
        ),
        (f"{LEARNER}::test_demonstrations_sit_beside_the_agents_data_with_their_bonus_and_never_leave",),
    ),
    Mutation(
        "player_action_taken_at_the_wrong_moment",
        "rtgym applies an action a step late: a player's input must be matched to the step it drives",
        (
            (
                "demos.py",
                "positions = np.minimum(np.arange(steps) + delay, steps)",
                "positions = np.arange(steps)",
            ),
        ),
        (f"{DEMOS}::test_the_players_action_of_step_t_is_the_input_the_car_reports_two_observations_later",),
    ),
    Mutation(
        "rollback_to_a_checkpoint_written_after_the_flag",
        "beside, a flag can arrive after a later checkpoint: restoring it would restore the failure",
        (("session.py", "self.store.periodic(before_step=flag.step)", "self.store.periodic()"),),
        (f"{LOOP}::test_a_rollback_never_returns_to_a_checkpoint_written_after_the_flagged_step",),
    ),
    Mutation(
        "n_step_return_across_a_resumed_cut",
        "a run stopped mid-episode: the next episode's rewards must not leak into the cut one's n-step returns",
        (("replay.py", "            self.truncated[last] = True", "            pass"),),
        (f"{REPLAY}::test_an_episode_cut_off_by_a_stop_ends_before_the_next_one_starts",),
    ),
    Mutation(
        "actor_waits_forever_for_a_dead_learner",
        "a learner killed while the actor waits for it must stop the run, never hang it",
        (("beside.py", "if self.lag > limit and not self.process.is_alive():", "if False:"),),
        (f"{BESIDE}::test_an_actor_waiting_for_a_learner_that_died_is_told_within_seconds",),
    ),
    Mutation(
        "ctrl_c_ignored_during_pretraining",
        "Ctrl+C must stop a long pretraining and save it, not run on until a second Ctrl+C loses it all",
        (("session.py", "while done() < total and not stop.requested:", "while done() < total:"),),
        (f"{LOOP}::test_ctrl_c_during_pretraining_stops_it_saves_and_the_resumed_run_finishes_it",),
    ),
    Mutation(
        "lag_not_reset_by_a_rollback",
        "after a rollback the actor's lag must count from the restored learner, or keep_pace stops bounding it",
        (
            (
                "beside.py",
                "        if self.learned is not None:  # before the reply",
                "        if False:  # before the reply",
            ),
        ),
        (f"{BESIDE}::test_a_rollback_beside_restores_the_learner_the_actor_and_the_lag_together",),
    ),
    Mutation(
        "ctrl_c_waits_for_the_learner_to_catch_up",
        "Ctrl+C at an episode end must not wait for up to learner_max_lag learn steps before saving",
        (("beside.py", "            if give_up is not None and give_up():", "            if False:"),),
        (f"{BESIDE}::test_ctrl_c_during_a_catch_up_stops_the_wait_and_a_later_sync_completes_it",),
    ),
    Mutation(
        "exit_save_queued_behind_a_full_catch_up",
        "a sync answered only after a whole catch-up holds up the exit save that Ctrl+C asked for",
        (
            (
                "beside.py",
                "                self.pending_syncs.append(message.request)\n",
                "                self.catch_up()\n                self.pending_syncs.append(message.request)\n",
            ),
        ),
        (f"{BESIDE}::test_ctrl_c_during_a_catch_up_stops_the_wait_and_a_later_sync_completes_it",),
    ),
    Mutation(
        "simulator_runs_a_whole_episode_ahead",
        "unbounded, the embedded track's episodes are driven by a policy ~950 learn steps stale, not inline's",
        (
            (
                "env_tm.py",
                "max_lag = config.learner_max_lag if real_time else config.simulator_max_lag",
                "max_lag = config.learner_max_lag",
            ),
        ),
        (f"{LOOP}::test_a_simulator_waits_for_the_learner_within_its_small_bound",),
    ),
    # --- issue 25: the actor loop as a whole and the two processes' random streams ------------------------
    Mutation(
        "loop_stops_copying_weights_mid_episode",
        "issue 25: the actor then drives each episode with the weights of the last episode-end sync",
        (("env_tm.py", "            session.refresh_actor()\n", ""),),
        (f"{LOOP}::test_mid_episode_weights_are_never_more_than_the_simulators_bound_old",),
    ),
    Mutation(
        "loop_acts_on_the_reset_car_floats",
        "issue 25: the agent acts on speed 0, the reset gear and rpm all episode while the replay stores the "
        "true ones",
        (
            (
                "env_tm.py",
                "            frames, car = next_frames, next_car\n",
                "            frames = next_frames\n",
            ),
        ),
        (f"{LOOP}::test_act_receives_exactly_the_observation_the_environment_just_returned",),
    ),
    Mutation(
        "embedded_history_kept_across_resets",
        "issue 25: frames of the previous episode in the first stacks of the next",
        (
            (
                "embedded_track.py",
                "        self._images = np.repeat(frame[np.newaxis], self.history_length, axis=0)\n",
                "        self._images = (\n"
                "            np.repeat(frame[np.newaxis], self.history_length, axis=0)\n"
                "            if self._images is None\n"
                "            else np.concatenate([self._images[1:], frame[np.newaxis]])\n"
                "        )\n",
            ),
        ),
        ("tests/test_embedded_track.py::test_every_reset_starts_a_fresh_history_of_its_own_first_frame",),
    ),
    Mutation(
        "embedded_track_same_track_every_episode",
        "issue 25: every training episode on one track: the agent learns a track, not to drive",
        (
            (
                "embedded_track.py",
                "        rgb, _ = self.car_racing.reset(seed=seed, options=options)",
                "        rgb, _ = self.car_racing.reset(seed=self._first_seed, options=options)",
            ),
        ),
        ("tests/test_embedded_track.py::test_each_seed_resets_to_its_own_track",),
    ),
    Mutation(
        "training_resets_repeat_one_seed",
        "issue 25: the loop asks for the same track every episode (or for a held-out one)",
        (
            (
                "env_tm.py",
                "        return environment.training_seed(args.seed, session.run.episode)",
                "        return environment.training_seed(args.seed, 0)",
            ),
        ),
        (f"{LOOP}::test_training_episodes_use_distinct_tracks_never_the_evaluation_ones",),
    ),
    Mutation(
        "demo_bonus_on_the_agents_own_part",
        "issue 25 / seed 002: the agent's own transitions drawn with the demonstrations' DQfD bonus",
        (
            (
                "learner.py",
                "    own = PrioritizedReplay.from_config(config, seed=seed)\n",
                "    own = PrioritizedReplay.from_config(\n"
                "        config, seed=seed, priority_bonus=config.demo_priority_bonus if config.demos else 0.0\n"
                "    )\n",
            ),
        ),
        (f"{LEARNER}::test_demonstrations_sit_beside_the_agents_data_with_their_bonus_and_never_leave",),
    ),
    Mutation(
        "actor_and_learner_share_a_stream",
        "issue 25: the actor's acting draws repeat the learner's learn-step draws (one seed, one stream)",
        (
            (
                "rainbow.py",
                "        self.act_generator.manual_seed(act)",
                "        self.act_generator.manual_seed(learn)",
            ),
        ),
        (f"{LOOP}::test_the_actor_and_the_learner_draw_from_independent_streams",),
    ),
    Mutation(
        "weights_announced_before_they_are_published",
        "issue 25: an actor that sees a learn step done may still read the weights of the step before it",
        (
            (
                "beside.py",
                "        if self.learned is not None:  # after the weights: an actor that sees this step can also "
                "read them\n            self.learned.value = engine.agent.learn_steps\n",
                "",
            ),
            (
                "beside.py",
                "        metrics = engine.learn()\n",
                "        metrics = engine.learn()\n        if self.learned is not None:\n"
                "            self.learned.value = engine.agent.learn_steps\n",
            ),
        ),
        (f"{BESIDE}::test_the_learner_announces_a_learn_step_only_once_its_weights_are_published",),
    ),
    Mutation(
        "actor_saves_the_cuda_random_state",
        "issue 26: the CPU actor created a CUDA context at its first checkpoint to save CUDA's random state",
        (
            (
                "run_state.py",
                '        "actor_rng": actor.agent.acting_streams(),',
                '        "actor_rng": {**actor.agent.acting_streams(), "cuda": __import__("torch").cuda.'
                'get_rng_state_all() if __import__("torch").cuda.is_available() else None},',
            ),
        ),
        (f"{LOOP}::test_the_actor_never_initialises_cuda",),
    ),
    Mutation(
        "trackmania_waits_for_the_learner_mid_race",
        "issue 25: a game that is not marked real-time makes the car wait for learn steps mid-episode",
        (("trackmania.py", "    real_time = True\n", "    real_time = False\n"),),
        ("tests/test_trackmania.py::test_the_game_is_real_time_and_the_embedded_track_is_not",),
    ),
    Mutation(
        "finish_flag_stuck_from_the_respawn_is_a_race",
        "issue 24: a finish flag stuck at 1 paid +100 every episode with race time 0.05 s and chose best.pt",
        (
            (
                "tm_telemetry.py",
                '            if finished:\n                return "the finish flag is 1 in the first frame',
                '            if False:\n                return "the finish flag is 1 in the first frame',
            ),
        ),
        ("tests/test_tm_telemetry.py::test_a_finish_that_cannot_be_real_is_refused_as_it_comes",),
    ),
    Mutation(
        "finish_before_the_car_covered_the_track",
        "issue 24: a finish flag that comes mid-track (stuck late in a lap) counted as a race",
        (("tm_telemetry.py", "            if along < FINISH_MIN_PROGRESS:", "            if along < 0.0:"),),
        ("tests/test_tm_telemetry.py::test_a_finish_that_cannot_be_real_is_refused_as_it_comes",),
    ),
    Mutation(
        "moves_checked_against_top_speed_only",
        "issue 24: a 95 m teleport for a few frames paid +9.5: only the 1000 km/h bound was checked",
        (
            (
                "tm_telemetry.py",
                "        problem = _speed_problem(frame, previous, elapsed, max(abs(frame[0]), abs(previous[0])))",
                "        problem = None",
            ),
        ),
        ("tests/test_tm_telemetry.py::test_a_move_the_reported_speed_cannot_make_is_refused",),
    ),
    Mutation(
        "frozen_position_at_speed_is_accepted",
        "issue 24: the plugin repeating one frame while the car drove trained 2,400 frozen transitions",
        (
            (
                "tm_telemetry.py",
                "            if now - still_since >= STILL_POSITION_S:",
                "            if False:",
            ),
        ),
        (
            "tests/test_tm_telemetry.py::test_a_position_that_stands_still_at_speed_is_a_frozen_stream_and_condemns_its_frames",
        ),
    ),
    Mutation(
        "race_time_from_the_step_count",
        "issue 24: steps x 50 ms shrank a loaded PC's 8.58 s finish to 'best 2.55 s'",
        (
            (
                "session.py",
                "        elif race_time is None:\n            race_time = length * config.time_step_duration",
                "        else:\n            race_time = length * config.time_step_duration",
            ),
        ),
        (
            "tests/test_session.py::test_a_finish_takes_its_race_time_from_the_clock_and_one_with_timeouts_never_sets_the_best",
        ),
    ),
    Mutation(
        "a_race_with_timeouts_sets_the_best",
        "issue 24: an episode with time-step timeouts has no reliable race time: it must never choose best.pt",
        (
            (
                "session.py",
                "        reliable = race_time is not None and timeouts == 0",
                "        reliable = race_time is not None",
            ),
        ),
        (
            "tests/test_session.py::test_a_finish_takes_its_race_time_from_the_clock_and_one_with_timeouts_never_sets_the_best",
        ),
    ),
    Mutation(
        "a_lies_first_steps_reach_the_learner",
        "issue 24: the steps a frozen stream took to be seen were trained on before the error",
        (
            (
                "session.py",
                "        if not self.verdict_steps:  # nothing can condemn a step",
                "        if True:  # nothing can condemn a step",
            ),
        ),
        (
            "tests/test_session.py::test_held_steps_reach_the_learner_in_order_once_old_enough_or_when_the_run_ends_well",
        ),
    ),
    Mutation(
        "stale_observations_once_per_run",
        "issue 24: a 10 Hz plugin made every episode 40-78% stale and the flag was shown once per run",
        (("health.py", "STALE_REPEAT_SECONDS = 60.0", "STALE_REPEAT_SECONDS = 1e12"),),
        (
            "tests/test_health.py::test_stale_observations_shows_every_stale_episode_at_most_once_a_minute_and_names_the_measured_cause",
        ),
    ),
    Mutation(
        "pause_counted_within_one_episode",
        "issue 24: tmrl ends a frozen episode after 81 steps, so a per-episode count never reached a paused game",
        (
            (
                "trackmania.py",
                "        self._identical_frames = 0\n        previous = self._previous_frame\n",
                "        self._identical_frames = 0\n        previous = self._previous_frame = None\n",
            ),
        ),
        (f"{TM}::test_a_game_paused_at_the_start_is_caught_across_episodes_within_ten_seconds",),
    ),
    Mutation(
        "learner_death_not_on_record",
        "issue 24: a learner killed mid-episode left no error record in metrics.jsonl",
        (
            (
                "env_tm.py",
                '        log.write("run", session.run.step, event="error", error=type(error).__name__, message=str(error))\n        raise\n',
                "        raise\n",
            ),
        ),
        ("tests/test_reliability.py::test_a_learner_that_dies_stops_the_run_in_one_line_within_seconds",),
    ),
    Mutation(
        "learner_never_checks_its_actor_while_catching_up",
        "issue 26: a catch-up of up to learner_max_lag learn steps ran without looking at the actor (macOS, Windows)",
        (("beside.py", "        self.check_actor()\n", ""),),
        (
            "tests/test_beside.py::test_a_learner_without_the_death_signal_ends_within_2_s_of_its_actors_kill[catching_up]",
        ),
    ),
    Mutation(
        "learner_waits_for_the_weights_lock_for_ever",
        "issue 26: an actor killed holding the weights' lock wedged the learner's next publish for ever",
        (
            (
                "beside.py",
                "        while not self.lock.acquire(timeout=PEER_CHECK_SECONDS):\n",
                "        while not self.lock.acquire():\n",
            ),
        ),
        (
            "tests/test_beside.py::test_a_learner_without_the_death_signal_ends_within_2_s_of_its_actors_kill[on_the_lock]",
        ),
    ),
    Mutation(
        "learner_keeps_a_writing_end_of_the_command_pipe",
        "issue 26: a command cut by the actor's death left the learner reading the rest for ever",
        (("beside.py", "    commands._writer.close()  # only", "    pass  # only"),),
        (
            "tests/test_beside.py::test_a_learner_without_the_death_signal_ends_within_2_s_of_its_actors_kill[torn_message]",
        ),
    ),
    Mutation(
        "learner_flushes_its_replies_into_a_pipe_nobody_reads",
        "issue 26: on exit the learner blocked for ever flushing replies into a full pipe (Windows' holds ~8 KiB)",
        (
            (
                "beside.py",
                "for anything\n        replies.cancel_join_thread()\n",
                "for anything\n        pass\n",
            ),
        ),
        (
            "tests/test_beside.py::test_a_learner_without_the_death_signal_ends_within_2_s_of_its_actors_kill[full_pipe]",
        ),
    ),
    Mutation(
        "trainer_checkpoints_before_catching_up",
        "issue 26: the scale-out trainer's periodic checkpoint held none of the episode's due learn steps",
        (("distributed.py", "                flags += session.absorb(session.learner.sync())\n", ""),),
        ("tests/test_distributed.py::test_the_trainers_periodic_checkpoints_hold_a_caught_up_moment",),
    ),
    Mutation(
        "workers_sharing_a_seed_go_unnoticed",
        "issue 26: two workers started with one seed explore alike (identical episodes on the embedded track)",
        (("distributed.py", '            tag["seed"] = self.seed\n', "            pass\n"),),
        ("tests/test_distributed.py::test_two_workers_with_one_seed_are_warned_about_once",),
    ),
    Mutation(
        "a_cuda_checkpoint_cannot_resume_on_a_cpu",
        "issue 26: CUDA stream states (16 bytes) were set into CPU generators: no GPU run resumed on a CPU",
        (
            (
                "rainbow.py",
                "    except RuntimeError:\n        generator.manual_seed(",
                "    except KeyError:\n        generator.manual_seed(",
            ),
        ),
        (
            f"{RAINBOW}::test_a_checkpoint_from_the_other_kind_of_device_restores_with_its_streams_reseeded_alike",
        ),
    ),
    Mutation(
        "windows_falls_back_to_carracing_without_asking",
        "issue 27: a TrackMania user whose game did not answer trained on the embedded track for days unawares",
        (("environment.py", '    if platform.system() == "Windows":\n', "    if False:\n"),),
        ("tests/test_environment.py::test_on_windows_auto_asks_before_falling_back",),
    ),
    Mutation(
        "set_up_check_passes_another_map",
        "issue 27: --check-trackmania must name a map that is not the reward trajectory's",
        (("tm_setup.py", '        if away > REWARD_CONFIG["MAX_STRAY"]:\n', "        if False:\n"),),
        ("tests/test_tm_setup.py::test_the_set_up_check_names_each_fault_and_what_to_do",),
    ),
    Mutation(
        "greedy_drive_with_the_noise_on",
        "issue 27: evaluations and a watched checkpoint must drive the greedy policy (the mean weights)",
        (("environment.py", "    agent.online.set_noise(False)\n", ""),),
        (
            "tests/test_watch.py::test_a_watched_checkpoint_drives_the_held_out_tracks_as_its_evaluation_would_into_a_gif",
        ),
    ),
    Mutation(
        "kept_curves_labelled_by_their_folder",
        "issue 27: every kept curve file was labelled `curves` (its folder), two of them `curves#2`",
        (("run_records.py", "    if file.name == METRICS_FILE:\n", "    if True:\n"),),
        (
            "tests/test_compare_runs.py::test_the_kept_curve_files_compare_with_their_names_counts_and_a_drawn_evaluation_panel",
        ),
    ),
    Mutation(
        "embedded_runs_judged_by_the_trackmania_envelope",
        "issue 27: embedded-track runs were judged and drawn against TrackMania's per-episode envelope",
        (("run_records.py", '        return self.env != "embedded"\n', "        return True\n"),),
        (
            "tests/test_compare_runs.py::test_embedded_runs_are_drawn_against_steps_with_the_embedded_reference_not_the_envelope",
        ),
    ),
    Mutation(
        "final_return_read_past_the_budget",
        "a curve comparison must compare arms over the same budget of steps",
        (
            (
                "compare_runs.py",
                '        within = [e for e in run.evals if e["step"] <= budget]\n',
                "        within = list(run.evals)\n",
            ),
        ),
        (
            "tests/test_compare_runs.py::test_curves_give_steps_to_400_and_700_and_the_final_mean_within_the_shortest_budget",
        ),
    ),
    Mutation(
        "live_loss_spike_on_a_shorter_window",
        "issue 28: the live flag, the go/no-go and the comparison judged loss_spike on three windows",
        (
            (
                "health.py",
                "        self._losses: deque[float] = deque(maxlen=LOSS_SMOOTHING_STEPS)\n",
                "        self._losses: deque[float] = deque(maxlen=10)\n",
            ),
        ),
        ("tests/test_red_flags.py::test_the_monitor_the_diagnosis_and_the_comparison_agree[loss_spike]",),
    ),
    Mutation(
        "diagnosis_loss_on_a_last_window_mean",
        "issue 28: the go/no-go failed a last-window mean above 10 that the live loss_spike never flags",
        (
            (
                "diagnose.py",
                "        ok = spike is None and (first <= 0",
                "        ok = last <= LOSS_SPIKE_THRESHOLD and (first <= 0",
            ),
        ),
        ("tests/test_red_flags.py::test_the_monitor_the_diagnosis_and_the_comparison_agree[loss_burst]",),
    ),
    Mutation(
        "comparison_q_negative_at_the_bare_seed_floor",
        "issue 28: the comparison flagged Q below -10 where negative rewards lower the live floor",
        (
            (
                "run_checks.py",
                "    lows = run.min_reward if run.min_reward is not None else np.zeros(len(q))\n",
                "    lows = np.zeros(len(q))\n",
            ),
        ),
        (
            "tests/test_red_flags.py::test_the_monitor_the_diagnosis_and_the_comparison_agree[negative_rewards]",
        ),
    ),
    Mutation(
        "loss_spike_at_the_threshold",
        "seed 004: a loss spike is a median ABOVE 10, not at it",
        (
            (
                "red_flags.py",
                "median > LOSS_SPIKE_THRESHOLD)",
                "median >= LOSS_SPIKE_THRESHOLD)",
            ),
        ),
        ("tests/test_red_flags.py::test_loss_spike_is_the_median_of_the_last_100_after_episode_500",),
    ),
    Mutation(
        "comparison_q_negative_on_the_greedy_q",
        "issue 28: the comparison judged q_negative on the greedy Q (max over actions), the monitor on the mean",
        (
            (
                "run_checks.py",
                "    q = run.q_monitored if run.q_monitored is not None else run.q_mean",
                "    q = run.q_mean",
            ),
        ),
        ("tests/test_red_flags.py::test_the_monitor_the_diagnosis_and_the_comparison_agree[q_negative]",),
    ),
    Mutation(
        "fresh_run_driven_by_an_unsaved_sittings_knobs",
        "issue 28 review: a run with no checkpoint took --on-red-flag and the rest from an earlier sitting's "
        "start record, so a fresh start was silently driven by options nobody gave it",
        (
            (
                "session.py",
                "        resumable = self.resume and next(self.store.candidates(), None) is not None",
                "        resumable = self.resume",
            ),
            (
                "session.py",
                '        if info["run"] is None:  # no good checkpoint after all: a fresh run, as the command line says\n'
                "            self.runtime = dataclasses.replace(self.requested_runtime, **opened_with)\n"
                "            return []\n",
                "",
            ),
        ),
        (f"{LOOP}::test_a_run_with_no_checkpoint_to_resume_takes_the_command_lines_runtime",),
    ),
)
