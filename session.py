"""The lifecycle of a training run besides its environment: it opens (config and runtime, run folder, learner
inline (learner.py) or in a process beside the actor (beside.py), resume), hands steps and episodes on
(holding back the ones a game's checks may still condemn), checkpoints, evaluates, handles red flags
(health.py), ends and closes. Its console is console.py, its counters and random streams run_state.py,
its command line cli.py.

The single-PC loop (env_tm.py) and the scale-out trainer (distributed.py) each drive one Session, so both
resume, checkpoint, log and raise red flags the same way. Nothing here steps an environment. At ~780 lines
it is one concept, a run's life from open to close, whose steps share the run's state.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from beside import EpisodeStart, Step, make_driver
from checkpoints import CheckpointStore, move_aside
from cli import EXIT_INTERRUPTED, EXIT_OK, default_run_name
from console import (
    EPISODE_LINE_SECONDS,
    Progress,
    StepLatency,
    StopRequest,
    duration,
    plural,
    pretraining_status,
    status_fields,
    summary_rows,
)
from diagnose import DIAG_MIN_LEARN_STEPS
from environment import environment_class, evaluate
from health import (
    FATAL_FLAGS,
    GAME_FLAGS,
    EpisodeResult,
    HealthMonitor,
    RedFlag,
    stale_share,
)
from learner import LearnerSpec, all_cores_but_one, stream_seeds
from rainbow import resolve_device, unused_gpu_notice
from run_log import METRICS_FILE, RunLog, read_jsonl, truncate_after_step
from run_state import RunState, actor_streams, race_fields, restore_actor_streams
from tm_config import Config, ConfigError, Runtime, describe_departures, epsilon_at, unpinned_keys


class RedFlagStopError(RuntimeError):
    """A fatal red flag under --on-red-flag stop (or rollback with nothing left to roll back to)."""


class TrainingStoppedError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite learn steps); one line saying why."""


def last_recorded_runtime(run_dir: Path) -> Runtime | None:
    """The runtime of the run's last sitting, from its start record (None: none recorded, or no run)."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return None
    starts = [r for r in read_jsonl(path) if r.get("kind") == "run" and r.get("event") == "start"]
    recorded = [r["runtime"] for r in starts if isinstance(r.get("runtime"), dict)]
    return Runtime.from_dict(recorded[-1]) if recorded else None


@dataclass
class TrainResult:
    exit_code: int
    run_dir: Path
    config: Config


def learner_threads(runtime: Runtime, env_name: str) -> int | None:
    """torch CPU threads of the learner: --threads, else all cores but one when the game needs a core, else
    the driver's default (beside the actor: all cores but one, the one left being the actor's)."""
    if runtime.threads:
        return runtime.threads
    environment = environment_class(env_name)
    if environment is not None and environment.real_time:
        return all_cores_but_one()
    return None


class Session:
    """A run besides its environment (module docstring). `learner_mode` is "inline" or "beside"; None: the
    runtime's (--learner, or the run's recorded one when it resumes)."""

    def __init__(self, args: argparse.Namespace, env_name: str, learner_mode: str | None = None) -> None:
        """Open the run, step by step: its folder and seeds, its learner (resumed or fresh), its counters,
        its log and console, then say what it is; and start the bookkeeping of this sitting."""
        self.args = args
        requested = Config().with_assignments(args.overrides)
        self.device = resolve_device(args.device)
        diagnosing = getattr(args, "diagnose", None) is not None
        self._choose_run_folder(requested, env_name, diagnosing)
        notes = self._move_aside_unless_resuming(requested, diagnosing)
        self._choose_runtime(learner_mode)
        learner_mode = self.runtime.learner
        threads = self._seed(env_name)
        info = self._open_learner(requested, learner_mode, threads, notes)
        self._check_disk_room(info)
        try:
            notes += self._resume_runtime(info)
        except BaseException:  # a checkpoint's runtime this version refuses: no learner process left behind
            self.learner.close()
            raise
        notes += self._restore_run(info)
        self._check_steps_to_train(diagnosing)
        self._open_log_and_console(env_name)
        self._announce(env_name, learner_mode, threads, notes)
        self._start_bookkeeping(info["reward_range"], info["learn_steps"])

    def _choose_run_folder(self, requested: Config, env_name: str, diagnosing: bool) -> None:
        args = self.args
        self.run_name = args.run_name or default_run_name(env_name, args.seed, args.overrides, diagnosing)
        self.run_dir = Path(args.checkpoint_root or requested.checkpoint_dir) / self.run_name
        self.store = CheckpointStore(self.run_dir, requested.keep_last_n_checkpoints)

    def _choose_runtime(self, learner_mode: str | None) -> None:
        """How this sitting runs (tm_config.Runtime): the command line's, or when the run resumes its last
        sitting's (its start record: the learner's mode and threads are needed before its checkpoint is
        read), with what the command line gives again. The caller's `learner_mode` overrides both."""
        self.runtime, self.runtime_notes = self.requested_runtime, []
        # Only a run with a checkpoint to resume keeps its sittings' runtime: a run that starts afresh (its
        # folder holds no checkpoint) is driven as this command line says.
        resumable = self.resume and next(self.store.candidates(), None) is not None
        recorded = last_recorded_runtime(self.run_dir) if resumable else None
        if recorded is not None:
            self.runtime, self.runtime_notes = self.requested_runtime.resumed(recorded, self.runtime_given)
        if learner_mode is not None:
            self.runtime = dataclasses.replace(self.runtime, learner=learner_mode)

    def _resume_runtime(self, info: dict[str, Any]) -> list[str]:
        """The resumed checkpoint's runtime, with what the command line gives again (the learner runs in the
        mode and threads it was opened with); returns one line per knob the command line changes."""
        opened_with = {"learner": self.runtime.learner, "threads": self.runtime.threads}
        if info["run"] is None:  # no good checkpoint after all: a fresh run, as the command line says
            self.runtime = dataclasses.replace(self.requested_runtime, **opened_with)
            return []
        saved = info["run"].get("runtime")
        if saved is None:
            return self.runtime_notes
        runtime, notes = self.requested_runtime.resumed(Runtime.from_dict(saved), self.runtime_given)
        self.runtime = dataclasses.replace(runtime, **opened_with)
        return notes

    @property
    def requested_runtime(self) -> Runtime:
        return Runtime.from_dict(vars(self.args))  # the command line's: its run options, the rest default

    @property
    def runtime_given(self) -> set[str]:
        """The runtime knobs given on the command line (cli.parse_args records them; all, without it)."""
        return set(getattr(self.args, "runtime_given", Runtime.GIVEN_BY))

    def _seed(self, env_name: str) -> int | None:
        """Seed the acting side's streams; returns the learner's threads (its driver sets them on opening)."""
        args = self.args
        random.seed(args.seed)
        np.random.seed(args.seed % 2**32)
        torch.manual_seed(args.seed)
        threads = learner_threads(
            self.runtime, env_name
        )  # the driver gives each process its threads when it opens
        return threads

    def _move_aside_unless_resuming(self, requested: Config, diagnosing: bool) -> list[str]:
        """Resume (the checkpoint's config, plus explicit --set changes) or start fresh; returns the notes to
        show."""
        args = self.args
        resume = requested.resume_from_checkpoint if args.resume is None else args.resume
        self.resume = resume and requested.checkpoint and not diagnosing  # a diagnosis judges a fresh start
        notes: list[str] = []
        if not self.resume:
            moved = move_aside(self.run_dir)
            if moved is not None:
                why = "a diagnosis starts from scratch" if diagnosing else "--fresh"
                notes.append(f"{why}: the previous contents of {self.run_dir} were moved to {moved}")
        return notes

    def _open_learner(
        self, requested: Config, learner_mode: str, threads: int | None, notes: list[str]
    ) -> dict[str, Any]:
        """Start the learner (it loads the checkpoint when resuming); the run's config from here on."""
        args = self.args
        spec = LearnerSpec(
            config=requested.to_dict(),
            overrides=list(args.overrides),
            run_dir=str(self.run_dir),
            resume=bool(self.resume),
            require_checkpoint=bool(args.resume),
            seed=args.seed,
            device=str(self.device),
            threads=threads,
            demo_root=str(getattr(args, "demo_root", "demos")),
        )
        self.learner = make_driver(learner_mode, spec)
        try:
            info = self.learner.open()
        except BaseException:
            self.learner.close()
            raise
        self.actor = self.learner.actor
        # The run's settings from here on: the checkpoint's config when resumed, with the --set changes.
        self.config = Config.from_dict(info["config"])
        self.store.keep_last = self.config.keep_last_n_checkpoints
        notes += info["notes"]
        return info

    def _check_disk_room(self, info: dict[str, Any]) -> None:
        config = self.config
        if config.checkpoint:
            # latest, its previous generation, best, the periodic ones kept and the one being written: ask
            # for room for all of them before training, rather than fail a save hours later.
            needed = (config.keep_last_n_checkpoints + 4) * (info["replay_bytes"] + 50 * 2**20)
            try:
                self.store.check_writable(needed_bytes=needed)
            except BaseException:
                self.learner.close()
                raise

    def _restore_run(self, info: dict[str, Any]) -> list[str]:
        """The run's counters and the acting side's streams: the checkpoint's when resumed, else new ones."""
        self.run = RunState()
        if info["run"] is None:
            return []
        self.run = RunState.from_checkpoint(info["run"])
        restore_actor_streams(info["run"], self.actor)
        dropped = truncate_after_step(self.run_dir / METRICS_FILE, self.run.step)
        return [
            f"resumed {self.run_name} from {Path(info['path']).name}: step {self.run.step:,}, "
            f"{self.run.episode:,} episodes done"
            + (f" ({dropped} log records after that step dropped)" if dropped else "")
        ]

    def _check_steps_to_train(self, diagnosing: bool) -> None:
        args, config = self.args, self.config
        self.total_steps = args.steps if args.steps is not None else config.training_steps
        shortest_diagnosis = DIAG_MIN_LEARN_STEPS + config.batch_size
        if diagnosing and self.total_steps < shortest_diagnosis:
            self.learner.close()
            raise ConfigError(
                f"--diagnose {self.total_steps} is too short: the go/no-go criteria need at least "
                f"{shortest_diagnosis:,} steps ({DIAG_MIN_LEARN_STEPS:,} learn steps)"
            )
        if self.run.step >= self.total_steps:
            self.learner.close()
            raise ConfigError(
                f"--steps {self.total_steps:,} is not beyond step {self.run.step:,}, where {self.run_name} "
                "stands: nothing to train (give a larger --steps to continue it, or --fresh to start over)"
            )

    def _open_log_and_console(self, env_name: str) -> None:
        args, config = self.args, self.config
        self.log = RunLog(self.run_dir)
        self.progress = Progress(self.total_steps)
        self.progress.restart_rate(self.run.step)
        if not args.no_wandb:
            project = args.wandb_project or config.wandb_project
            departures, entity = config.departures(), getattr(args, "wandb_entity", None)
            self.run.wandb_run_id = self.log.start_wandb(
                project, self.run_name, self.run.wandb_run_id, config.to_dict(), departures,
                unpinned_keys(config), job_type=env_name, entity=entity,
            )  # fmt: skip

    def _announce(self, env_name: str, learner_mode: str, threads: int | None, notes: list[str]) -> None:
        """What the run is, on the console and in its start record."""
        config = self.config
        unpinned = unpinned_keys(config)
        for note in notes:
            self.progress.message(note)
        where, learner_threads_used = self.learner.placement()
        where += f" ({plural(learner_threads_used, 'CPU thread')})"
        self.progress.message(
            f"run {self.run_name} on {env_name}, device {self.device.type}, {where}; checkpoints in "
            f"{self.run_dir}"
        )
        gpu_notice = unused_gpu_notice()
        if gpu_notice is not None:
            self.progress.message(gpu_notice)
        departures = describe_departures(config)
        self.progress.message(
            "departures from the known-good config: " + ("; ".join(departures) if departures else "none")
        )
        if unpinned:
            self.progress.message(
                f"UNPINNED run: it departs from the sacred {', '.join(unpinned)} of the known-good config "
                "(allowed by --unpin-*); it is marked unpinned in its metrics, W&B and checkpoints"
            )
        self.progress.message(self.log.wandb_note)
        self.log.write(
            "run", self.run.step, event="start", env=env_name, device=self.device.type, learner=learner_mode,
            departures=config.departures(), unpinned=unpinned, runtime=self.runtime.to_dict(),
        )  # fmt: skip

    def _start_bookkeeping(self, reward_range: Any, learn_steps: int) -> None:
        """This sitting's bookkeeping: the health monitor, the save and rollback counts, the learner's pace,
        the episode's policy ages, the status line's returns and the steps held for a verdict."""
        self.reward_range = reward_range
        self.learner_steps_at_open = learn_steps
        self.opened = (time.perf_counter(), self.run.step, self.run.episode)  # for the final summary
        self.monitor = self.new_monitor()
        self.failed_saves = 0
        self.rollbacks = 0
        self.last_metrics: dict[str, float] = {}
        self.episode_lag_max = self.lag_max = 0  # learn steps the actor ran ahead of the learner, at most
        self.episode_wait = self.total_wait = 0.0  # seconds the actor waited for the learner
        # This episode's, one per action: how many learn steps the acting weights were behind inline's.
        self.policy_ages: list[int] = []
        self.recent_returns: collections.deque[float] = collections.deque(maxlen=10)
        self.last_episode_line, self.unshown_episodes = -math.inf, 0
        # Steps an environment's checks may still condemn (TrackManiaEnv.verdict_steps; 0: none) wait here,
        # in order with the episode starts between them, before they are handed to the learner.
        self.verdict_steps = 0
        self.quarantine: collections.deque[EpisodeStart | Step] = collections.deque()
        self.quarantined_steps = 0

    # --- health ----------------------------------------------------------------------------------------
    def new_monitor(self) -> HealthMonitor:
        monitor = HealthMonitor(self.config)
        if self.reward_range is not None:  # a resumed or rolled-back run already knows its reward range
            for reward in self.reward_range:
                monitor.observe_reward(reward)
        return monitor

    def start_episode(self, frames: np.ndarray, car: np.ndarray) -> None:
        self._hold(EpisodeStart(np.array(frames, copy=True), np.array(car, copy=True)))

    def store_step(
        self,
        action: int,
        reward: float,
        terminated: bool,
        truncated: bool,
        frames: np.ndarray,
        car: np.ndarray,
    ) -> list[RedFlag]:
        """Hand one environment step to the learner (once the environment's checks can no longer condemn
        it) and count it; returns the red flags it raised."""
        self._hold(
            Step(action, reward, bool(terminated), bool(truncated), np.array(frames[-1], copy=True),
                 np.array(car, copy=True))
        )  # fmt: skip
        self.run.step += 1
        self.monitor.observe_reward(reward)
        return self.monitor.observe_frames(frames, self.run.step, self.run.episode, speed=float(car[0]))

    def _hold(self, item: EpisodeStart | Step) -> None:
        if not self.verdict_steps:  # nothing can condemn a step: straight to the learner
            self._hand_over(item)
            return
        self.quarantine.append(item)
        self.quarantined_steps += isinstance(item, Step)
        while self.quarantined_steps > self.verdict_steps:
            item = self.quarantine.popleft()
            self.quarantined_steps -= isinstance(item, Step)
            self._hand_over(item)

    def _hand_over(self, item: EpisodeStart | Step) -> None:
        match item:
            case EpisodeStart(frames, car):
                self.learner.start_episode(frames, car)
            case Step(action, reward, terminated, truncated, frame, car):
                self.learner.add(action, reward, terminated, truncated, frame, car)

    def release_quarantine(self) -> None:
        """Hand every held step to the learner (the run ends well: nothing condemned them)."""
        while self.quarantine:
            self._hand_over(self.quarantine.popleft())
        self.quarantined_steps = 0

    def drop_quarantine(self, condemned: int) -> int:
        """Forget the newest `condemned` held steps (a check condemned them: a lie's first steps) and hand the
        older ones to the learner; the step count goes back by as many as were dropped (returned)."""
        kept, dropped = list(self.quarantine), 0
        while kept and dropped < condemned:
            dropped += isinstance(kept.pop(), Step)
        while kept and isinstance(kept[-1], EpisodeStart):  # an episode whose steps were all dropped
            kept.pop()
        self.quarantine = collections.deque(kept)
        self.release_quarantine()
        self.run.step -= dropped
        return dropped

    def refresh_actor(self) -> None:
        """Give the actor the learner's newest weights, if there are new ones, and note how old the weights
        it is about to act with are (in learn steps behind inline's)."""
        self.learner.refresh_actor()
        self.policy_ages.append(self.learner.policy_age)

    def keep_pace(self, max_lag: int) -> float:
        """Wait while the learner is more than `max_lag` learn steps behind; the lag and the wait are
        measured for the episode record and the final summary. Returns the seconds waited."""
        waited = self.learner.keep_pace(max_lag)
        lag = self.learner.lag
        self.episode_wait += waited
        self.total_wait += waited
        self.episode_lag_max = max(self.episode_lag_max, lag)
        self.lag_max = max(self.lag_max, lag)
        return waited

    def pace_summary(self) -> str | None:
        return self.learner.pace_summary(self.lag_max, self.total_wait)

    def pretrain(self, stop: StopRequest) -> None:
        """`demo_pretrain_steps` learn steps on the demonstrations alone, before the first environment step
        (a resumed run has done them already; one stopped by Ctrl+C does the rest when it resumes)."""
        total = self.config.demo_pretrain_steps if self.config.demos else 0
        done = lambda: int(self.last_metrics.get("learn_step", 0))  # noqa: E731
        if not total or self.run.step or self.learner_steps_at_open >= total:
            return
        self.progress.message(f"pretraining: {total:,} learn steps on the demonstrations alone")
        started, first = time.perf_counter(), done()
        while done() < total and not stop.requested:
            flags = self.absorb(self.learner.learn())
            if flags:
                self.handle(flags)
            self.learner.check_alive()
            elapsed = time.perf_counter() - started
            self.progress.show(0, pretraining_status(done(), total, first, elapsed))
            self.learner.pause_while_learning()
        if stop.requested:
            self.progress.message(f"pretraining stopped at {done():,} of {total:,} learn steps (on request)")
            return
        self.progress.message(f"pretraining done in {duration(time.perf_counter() - started)}")

    def learn(self) -> list[RedFlag]:
        """Inline: one learn step if due. Beside: what the learner did meanwhile. Logged and checked."""
        return self.absorb(self.learner.learn())

    def absorb(self, all_metrics: list[dict[str, float]]) -> list[RedFlag]:
        """Log and check the learn steps the learner reports (every `log_every_steps`th is recorded)."""
        flags: list[RedFlag] = []
        config = self.config
        for metrics in all_metrics:
            step = int(metrics["env_step"])
            self.last_metrics = metrics
            if metrics["skipped"]:
                self.log.write("event", step, level="warning", name="nonfinite_step_skipped")
            if metrics["consecutive_skipped"] >= config.max_consecutive_nonfinite_steps:
                raise TrainingStoppedError(
                    f"{int(metrics['consecutive_skipped'])} learn steps in a row had a non-finite loss or "
                    f"gradient (all skipped, weights untouched); last checkpoint: {self.store.latest_path}"
                )
            if "weights_finite" in metrics:
                rate = self.progress.rate(self.run.step)
                self.log.write(
                    "step", step, steps_per_second=rate, time_step_timeouts=self.run.time_step_timeouts,
                    learner_lag=self.learner.lag, max_abs_reward=self.monitor.max_abs_reward,
                    min_reward=self.monitor.min_reward, **metrics,
                )  # fmt: skip
            flags += self.monitor.observe_learn_step(metrics, step, self.run.episode)
            flags += self.monitor.observe_sources(metrics, step, self.run.episode)
        return flags

    def end_episode(self, result: EpisodeResult, *, real_time: bool = False, **extra: Any) -> list[RedFlag]:
        """Log a finished episode with its race result and check it; returns red flags.

        Without the environment's race time the steps are the clock (a simulator's steps are exactly
        `time_step_duration` apart). A finish in an episode with time-step timeouts has an unreliable race
        time: it counts as a finish, not as a time. `extra`: more fields for the episode's record."""
        reward, length, terminated, seconds = result.reward, result.length, result.terminated, result.seconds
        finished, progress, timeouts = result.finished, result.progress, result.timeouts
        race_time = result.race_time
        telemetry_fps, telemetry_wait_share = result.telemetry_fps, result.telemetry_wait_share
        run, config = self.run, self.config
        ages, self.policy_ages = self.policy_ages, []
        run.episode += 1
        run.interval_rewards.append(reward)
        if not finished:
            race_time = None
        elif race_time is None:
            race_time = length * config.time_step_duration
        reliable = race_time is not None and timeouts == 0
        if reliable:
            run.race_times.append(race_time)
            run.interval_race_times.append(race_time)
            run.best_race_time = (
                race_time if run.best_race_time is None else min(run.best_race_time, race_time)
            )
        elif race_time is not None:
            run.unreliable_finishes += 1
        self.log.write(
            "episode", run.step, episode=run.episode, reward=reward, length=length,
            terminated=bool(terminated),
            finished=bool(finished), race_time=race_time,
            race_time_reliable=reliable if race_time is not None else None, best_race_time=run.best_race_time,
            median_race_time=float(np.median(run.race_times)) if run.race_times else None,
            finish_rate=run.finishes / run.episode, progress=progress,
            telemetry_fps=telemetry_fps, telemetry_wait_share=telemetry_wait_share,
            epsilon=self.actor.epsilon,  # the one the episode's last action was chosen with, as used
            time_step_timeouts=timeouts, time_step_timeouts_total=run.time_step_timeouts,
            seconds=seconds, q_mean=self.last_metrics.get("q_mean"),
            q_greedy=self.last_metrics.get("q_greedy"),
            loss=self.last_metrics.get("loss"), learner_lag=self.learner.lag,
            learner_lag_max=self.episode_lag_max, learner_wait_ms=round(1000 * self.episode_wait, 1),
            policy_age_max=max(ages, default=0), policy_age_mean=float(np.mean(ages)) if ages else 0.0,
            policy_stale_share=stale_share(ages), **extra,
        )  # fmt: skip
        self.episode_lag_max, self.episode_wait = 0, 0.0
        self.recent_returns.append(reward)
        self.episode_line(reward, length, race_time, reliable)
        clocked = dataclasses.replace(result, race_time=race_time)  # the race time as judged above
        flags = self.monitor.observe_episode(clocked, epsilon_at(run.step, config), run.step, run.episode)
        if real_time:
            flags += self.monitor.observe_policy_ages(ages, run.step, run.episode)
        return flags

    # --- evaluation ---------------------------------------------------------------------------------------
    def evaluate_if_due(self, env: Any, final: bool = False) -> None:
        """--eval-every: at step 0, at the first episode end past every multiple, and at the end of the run
        (`final`), the agent drives held-out tracks greedily (environment.evaluate); logged and shown."""
        every, run = self.runtime.eval_every, self.run
        if not every or run.last_eval_step == run.step:
            return
        due = run.last_eval_step is None or run.step // every > run.last_eval_step // every
        if not (due or final):
            return
        flags = self.absorb(self.learner.sync())  # the newest weights, for the policy as of this step
        if flags and self.handle(flags):
            return  # rolled back: this step's policy is gone; the evaluation comes when it is due again
        episodes = self.runtime.eval_episodes
        self.progress.message(f"evaluating at step {run.step:,}: {plural(episodes, 'greedy episode')}")
        result = evaluate(self.actor.agent, env, self.config, episodes)
        self.progress.restart_rate(run.step)  # the evaluation's minutes are not training's pace
        run.last_eval_step = run.step
        record = result.record()
        self.log.write("eval", run.step, **record)
        self.progress.message(
            f"evaluation at step {run.step:,}: return {record['return_mean']:.1f} "
            f"+- {record['return_std']:.1f} (min {record['return_min']:.1f}, max {record['return_max']:.1f}) "
            f"over {plural(len(result.returns), 'held-out episode')}, {result.seconds:.0f} s"
        )

    # --- checkpoints ------------------------------------------------------------------------------------
    def checkpoint_due(self) -> bool:
        return self.run.episode % self.config.checkpoint_frequency == 0

    def _checkpoint_run(self) -> dict[str, Any]:
        # Held steps are not in the learner's replay yet: the checkpoint's step count is the replay's.
        return {
            **self.run.checkpoint_fields(),
            "step": self.run.step - self.quarantined_steps,
            # epsilon is restored from the step; kept for people reading a checkpoint.
            "epsilon": epsilon_at(self.run.step, self.config),
            **actor_streams(self.actor),
            "runtime": self.runtime.to_dict(),
        }

    def _is_best(self) -> bool:
        """`best.pt` follows the best race time once the car finishes, the best mean reward before."""
        run = self.run
        if run.best_race_time is not None:
            if not run.interval_race_times:
                return False
            return min(run.interval_race_times) <= run.best_race_time
        interval_mean = float(np.mean(run.interval_rewards)) if run.interval_rewards else -math.inf
        if interval_mean > run.best_interval_reward:
            run.best_interval_reward = interval_mean
            return True
        return False

    def save(self, is_periodic: bool, catch_up: bool = True) -> str:
        """Write a checkpoint and wait until it is written. A failed write is reported
        and training goes on; 3 in a row stop it. A run on its way out (Ctrl+C, an error) saves without
        `catch_up`: the learner's state as it is, the replay with every step; the learn steps still due
        are done first when it resumes, and the replay ratio holds."""
        if not self.config.checkpoint:
            return "checkpoints are off (checkpoint=False)"
        is_best = self._is_best() if is_periodic else False
        if is_periodic:
            self.run.interval_rewards.clear()
            self.run.interval_race_times.clear()
        run = self._checkpoint_run()
        if not catch_up and self.learner.lag > 0:
            self.progress.message(
                f"saving without waiting for the learner ({self.learner.lag:,} learn steps behind: "
                "it does them first when the run resumes)"
            )
        return self._saved(*self.learner.save(run, is_periodic, is_best, catch_up))

    def _saved(self, ok: bool, text: str) -> str:
        if ok:
            self.failed_saves = 0
            return f"saved {text}"
        self.failed_saves += 1
        message = f"{text}; the previous one is intact"
        self.progress.message(message)
        self.log.write("event", self.run.step, level="warning", name="checkpoint_failed", message=message)
        if self.failed_saves >= self.runtime.max_failed_saves:
            raise TrainingStoppedError(
                f"{self.failed_saves} checkpoints in a row could not be written to {self.run_dir}: {text}"
            )
        return f"checkpoint failed, the last good one is {self.store.latest_path}"

    def finish(self, env: Any, stopped: bool) -> TrainResult:
        """The end of a run that was not stopped by a fault: the last red flags, the final evaluation and
        the exit save; `stopped`: on request (Ctrl+C), then a resumable stop."""
        self.release_quarantine()  # the run ends well: nothing condemned the latest steps
        if not stopped:
            # The last learn steps' red flags are handled before the end; a rollback here leaves steps to do.
            flags = self.absorb(self.learner.sync())
            if flags and self.handle(flags):
                saved = self.save(is_periodic=False)
                left = self.total_steps - self.run.step
                self.progress.message(
                    f"rolled back at the end of the run: {saved}; run the same command again for the "
                    f"{left:,} steps left"
                )
                self.log.write("run", self.run.step, event="interrupted")
                return TrainResult(EXIT_INTERRUPTED, self.run_dir, self.config)
            self.evaluate_if_due(env, final=True)
        saved = self.save(is_periodic=False, catch_up=not stopped)
        run = self.run
        if stopped:
            self.progress.message(f"stopped at step {run.step:,} (on request): {saved}; run again to resume")
            self.log.write("run", run.step, event="interrupted")
            return TrainResult(EXIT_INTERRUPTED, self.run_dir, self.config)
        self.progress.message(f"done: {run.step:,} steps, {plural(run.episode, 'episode')}; {saved}")
        self.log.write("run", run.step, event="finished", episodes=run.episode, **race_fields(run))
        return TrainResult(EXIT_OK, self.run_dir, self.config)

    def report_fault(self, error: Exception) -> None:
        """A fault ends the run (the game, an observation, a run that cannot go on): what was held back and
        can be trusted is stored, a checkpoint saved if one can be, and the fault said and recorded."""
        # Every exit that can save saves first. A fault seen over several steps (a frozen stream) condemns
        # its first ones, still held back; the bad transition itself was never returned by the environment.
        if isinstance(error, TrainingStoppedError):
            self.release_quarantine()
        else:
            dropped = self.drop_quarantine(getattr(error, "condemned_steps", 0))
            if dropped:
                self.progress.message(f"the last {plural(dropped, 'step')} before the fault were not stored")
        saved = self.save_before_exit()
        kind = type(error).__name__
        why = {
            "GameNotRespondingError": "the game stopped answering",
            "TelemetryError": "the game's telemetry made no sense",
            "TrackManiaSetupError": "TrackMania is not set up for this run",
            "ObservationError": "the environment gave an unusable observation",
            "TrainingStoppedError": "training cannot go on",
        }.get(kind, f"stopped ({kind})")
        self.progress.message(f"{why} at step {self.run.step:,}: {saved}")
        self.log.write("run", self.run.step, event="error", error=kind, message=str(error))

    def save_before_exit(self) -> str:
        """A checkpoint on the way out of an error, if one can be written (it never raises)."""
        try:
            return self.save(is_periodic=False, catch_up=False)
        except Exception as error:  # the learner died, or checkpoints kept failing: the last good one stands
            return (
                f"no checkpoint could be written ({' '.join(str(error).split())[:160]}); the last good one "
                "stands"
            )

    # --- red flags ----------------------------------------------------------------------------------------
    def roll_back(self, flag: RedFlag) -> None:
        """Restore the checkpoint before the flag (an older one at each further rollback)."""
        most = self.runtime.max_rollbacks
        if self.rollbacks >= most:
            raise RedFlagStopError(
                f"stopped on red flag {flag.name} at step {flag.step:,} ({most} rollbacks already): "
                f"{flag.message}"
            )
        before_flag = self.store.periodic(before_step=flag.step) if self.config.checkpoint else []
        older_first = list(reversed(before_flag))[self.rollbacks :]
        seed = self.args.seed + 7919 * (self.rollbacks + 1)
        restored = self.learner.roll_back(older_first, seed) if older_first else None
        if restored is None:
            raise RedFlagStopError(
                f"stopped on red flag {flag.name} at step {flag.step:,} (no checkpoint to roll back to): "
                f"{flag.message}"
            )
        self.rollbacks += 1
        wandb_run_id = self.run.wandb_run_id
        self.run = RunState.from_checkpoint(restored["run"])
        self.run.wandb_run_id = wandb_run_id
        restore_actor_streams(restored["run"], self.actor)
        # The checkpoint carries its random streams: restored, they would draw the same epsilon, noise and
        # taus that led to the failure, so the acting side gets new ones (the learner reseeds its own).
        self.actor.agent.reseed(stream_seeds(seed)[0])
        self.reward_range = restored["reward_range"]
        self.monitor = self.new_monitor()
        self.policy_ages = []  # the rolled-back episode's actions are not an episode's
        self.quarantine.clear()  # steps after the restored checkpoint
        self.quarantined_steps = 0
        self.progress.restart_rate(self.run.step)
        self.log.truncate_after_step(self.run.step)
        self.log.write(
            "event", self.run.step, level="rollback", name=flag.name, from_step=flag.step,
            rollbacks=self.rollbacks,
        )  # fmt: skip
        self.progress.message(
            f"rolled back to {Path(restored['path']).name} (step {self.run.step:,}, episode "
            f"{self.run.episode:,}); rollback {self.rollbacks} of at most {self.runtime.max_rollbacks}"
        )

    def handle(self, flags: list[RedFlag]) -> bool:
        """Report red flags; returns True when the run was rolled back to a checkpoint."""
        rolled_back = False
        for flag in flags:
            self.progress.message(f"RED FLAG {flag.name}: {flag.message}")
            self.log.write("event", flag.step, **flag.as_event())
            self.log.alert(f"red flag: {flag.name}", flag.message)
            stops = flag.name in FATAL_FLAGS or flag.name in GAME_FLAGS
            if rolled_back or not stops or self.runtime.on_red_flag == "warn":
                continue
            if self.runtime.on_red_flag == "stop":
                latest = self.store.latest_path
                kept = (
                    f"last good checkpoint: {latest}" if latest.exists() else "no checkpoint was written yet"
                )
                raise RedFlagStopError(
                    f"stopped on red flag {flag.name} at step {flag.step:,} (--on-red-flag stop): "
                    f"{flag.message}; {kept}"
                )
            if flag.name in GAME_FLAGS:
                continue  # the game's fault: restoring the agent's checkpoint would not change it
            self.roll_back(flag)
            rolled_back = True
        return rolled_back

    # --- the terminal -------------------------------------------------------------------------------------
    def status(self, current: float | str) -> None:
        """The status line, its fields by importance: at 80 columns it keeps the step, rate, ETA, episode
        and the mean return of the last 10 episodes. `current`: the episode's return so far, or a text
        (the scale-out trainer's workers and backlog)."""
        run, epsilon = self.run, epsilon_at(self.run.step, self.config)
        fields = status_fields(run, self.recent_returns, self.last_metrics, epsilon, current)
        learner_field = self.learner.status_field()
        if learner_field is not None:
            fields.append((5, learner_field))
        self.progress.show(run.step, fields)

    def episode_line(self, reward: float, length: int, race_time: float | None, reliable: bool) -> None:
        """A permanent line per finished episode, at most one every EPISODE_LINE_SECONDS (short episodes
        are then reported together): its return and length, the mean of the last 10, its race."""
        self.unshown_episodes += 1
        now = time.perf_counter()
        if now - self.last_episode_line < EPISODE_LINE_SECONDS:
            return
        self.last_episode_line = now
        episode, count = self.run.episode, self.unshown_episodes
        self.unshown_episodes = 0
        head = f"episode {episode:,}" if count == 1 else f"episodes {episode - count + 1:,}-{episode:,}"
        text = (
            f"{head}: return {reward:.1f} in {length:,} steps | mean of the last {len(self.recent_returns)} "
            f"{np.mean(self.recent_returns):.1f}"
        )
        if race_time is not None:
            text += f" | finished in {race_time:.2f} s" + ("" if reliable else " (timeouts: unreliable)")
        self.progress.message(text)

    def summary_rows(self, latency: StepLatency | None = None) -> list[tuple[str, str]]:
        """The run's final summary as (label, text) rows (console.summary_rows)."""
        run, epsilon = self.run, self.actor.epsilon
        return summary_rows(
            run, self.opened, self.total_steps, self.recent_returns, self.last_metrics, epsilon, latency,
            self.pace_summary(),
        )  # fmt: skip

    def close(self) -> None:
        try:
            self.learner.close()
        finally:
            commands = self.log.close()
            if commands:  # W&B offline: each sitting is a folder; uploaded in order, they make one run
                self.progress.message(
                    "to upload this run to W&B (after `wandb login`), run in order:\n"
                    + "\n".join(f"  {command}" for command in commands)
                )
