"""The live run-health monitor: the red flags raised while training, each once, as the loop goes.

`HealthMonitor` watches the stream the loop produces (every reward, every observation, every learn step's
metrics, every finished episode) and returns `RedFlag`s. A flag fires once when its condition first
becomes true, then stays quiet until the condition has been clear for a while (it re-arms), so a diverging
run prints one line per problem, not one per step. Pure Python/numpy (no torch, no model).

The rules the records can re-judge (q_negative, q_out_of_bounds, grad_norm_zero, grad_norm_exploding,
loss_spike, head_frozen, early_exploitation, reward_decline) live in red_flags.py, shared with the
go/no-go diagnosis (diagnose.py) and the comparison (run_checks.py); the monitor calls them on its rolling
series. The flags only the live stream can judge (frozen frames, stale policies, the game's timeouts and
finishes, demonstrations, non-finite steps) are defined here, with their thresholds below.

One concept at ~700 lines: the live monitor and the flags only it can judge, which share its rolling state.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import red_flags
from red_flags import (
    EARLY_EXPLOITATION_BEFORE_EPISODE,
    EARLY_EXPLOITATION_EPSILON,
    GRAD_EXPLODING_FACTOR,
    GRAD_ZERO_STEPS,
    HEAD_FROZEN_STEPS,
    LOSS_SMOOTHING_STEPS,
    LOSS_SPIKE_AFTER_EPISODE,
    LOSS_SPIKE_THRESHOLD,
    REWARD_DECLINE_EDGE,
    REWARD_DECLINE_T,
    REWARD_DECLINE_WINDOW,
)
from tm_config import Config

# --- thresholds of the live-only flags (the shared ones are in red_flags.py) ------------------
# The game stopped sending frames (paused, minimised, disconnected): the newest frame repeats
# byte for byte. 100 steps is 5 s of play at 20 Hz. A car standing still may legitimately show the same
# picture, so frames only count while the car reports a speed above MOVING_SPEED (km/h).
FROZEN_FRAME_STEPS = 100
MOVING_SPEED = 1.0
# Issue 25: on a real-time game the actor cannot wait for a learner slower than the game; it drives with
# the newest weights it has, up to learner_max_lag learn steps behind inline's. stale_policy (advisory)
# fires when more than STALE_POLICY_SHARE of an episode's actions used weights over
# STALE_POLICY_LEARN_STEPS learn steps old (100: 5 s of play at 20 Hz): its data then comes from an older
# policy than the known-good run's.
STALE_POLICY_LEARN_STEPS = 100
STALE_POLICY_SHARE = 0.5
# A fired flag re-arms once its condition has been clear this many observations in a row: without it, a
# value hovering around a threshold would print a flag every other step.
CLEAR_AFTER_LEARN_STEPS = 100
CLEAR_AFTER_EPISODES = 50
# Seed 002, demonstrations: the expert's data dominated the loss and the agent's own play stopped
# improving (it imitated and never improved). demo_dominance fires when, over the last
# DEMO_WINDOW_EPISODES episodes, the demonstrations carried more than DEMO_DOMINANCE_SHARE of the loss on
# average and the agent's own returns did not rise (least-squares slope <= 0).
DEMO_DOMINANCE_SHARE = 0.5
DEMO_WINDOW_EPISODES = 100
# agent_q_below_demo: the agent's greedy Q on its own states far below the demonstrations' (the net values
# only what the expert does). Early on the agent's own states are worse than the expert's and their Q
# rightly lower, so the gap must be wide and lasting: mean over DEMO_Q_STEPS learn steps below
# demo Q - max(DEMO_Q_GAP, |demo Q|).
DEMO_Q_STEPS = 1000
DEMO_Q_GAP = 2.0

# Flags that mean "do not launch the long run". early_exploitation and reward_decline need thousands of
# episodes to mean anything; nonfinite_loss is counted by its own criterion (a few skipped steps are
# survivable: the agent drops their gradients).
FATAL_FLAGS = frozenset(
    {
        "nonfinite_weights",
        "grad_norm_zero",
        "grad_norm_exploding",
        "q_negative",
        "q_out_of_bounds",
        "loss_spike",
        "head_frozen",
        "observations_frozen",
    }
)

# The game's faults: fatal under `--on-red-flag stop` (the run stops: it would train on a lie), but never
# rolled back under `rollback` (restoring the agent's checkpoint does not change the game).
GAME_FLAGS = frozenset({"implausible_finish", "stale_observations_sustained"})
# stale_observations is shown for every episode over `timeout_share_flag`, at most once per
# STALE_REPEAT_SECONDS; stale_observations_sustained fires when the last STALE_SUSTAINED_EPISODES episodes
# averaged more than STALE_SUSTAINED_SHARE of timed-out steps.
STALE_REPEAT_SECONDS = 60.0
STALE_SUSTAINED_EPISODES = 5
STALE_SUSTAINED_SHARE = 0.5
# Above this share of an episode spent waiting for the plugin's frames, the game (its frame rate) is the
# cause of the timeouts rather than the agent.
PLUGIN_BOUND_WAIT_SHARE = 0.2


def stale_share(ages: Sequence[int]) -> float:
    """The share of actions chosen with weights over STALE_POLICY_LEARN_STEPS learn steps old."""
    return sum(age > STALE_POLICY_LEARN_STEPS for age in ages) / len(ages) if ages else 0.0


def to_float(value: Any) -> float | None:
    """A record's number as a float; None when missing. run_log writes NaN/inf as the strings "nan",
    "inf", "-inf", which come back as the non-finite floats they were."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    try:  # numpy scalars and the like
        return float(value)
    except (TypeError, ValueError):
        return None


# --- live red flags --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RedFlag:
    name: str  # stable id, e.g. "q_negative"
    message: str  # one line for a human, with the evidence
    value: float | None  # the measured value that tripped it
    step: int  # global environment step
    episode: int  # completed episodes at that time
    threshold: float | None

    def as_event(self) -> dict[str, Any]:
        """Fields for `RunLog.write("event", flag.step, **flag.as_event())`."""
        return {
            "level": "red_flag",
            "name": self.name,
            "message": self.message,
            "value": self.value,
            "threshold": self.threshold,
            "episode": self.episode,
        }


def figure(value: float | None) -> str:
    """A measured value as red-flag messages and the go/no-go table print it."""
    return "missing" if value is None else f"{value:.4g}"


@dataclass(frozen=True)
class EpisodeResult:
    """A finished episode as its environment reported it, for the session's record and the monitor's checks.

    `race_time` is the environment's clock from the start to the finish (TrackMania; None: the steps are the
    clock), `progress` how far the car got (trajectory points on TrackMania, tiles on the embedded track; None
    when the env does not say), `min_finish_seconds` the fastest the track can be driven, `timeouts` its
    timed-out time steps, `telemetry_fps` and `telemetry_wait_share` how fast the game delivered its
    telemetry."""

    reward: float
    length: int
    terminated: bool = False
    seconds: float = 0.0
    finished: bool = False
    race_time: float | None = None
    min_finish_seconds: float | None = None
    progress: float | None = None
    timeouts: int = 0
    telemetry_fps: float | None = None
    telemetry_wait_share: float | None = None


class HealthMonitor:
    """Watches a training run as it goes; each observe_* returns the flags that fired just now.

    `episode` arguments are the loop's completed-episode count. `active` holds the flags currently
    raised (by name); `history` every flag ever raised, in order.
    """

    def __init__(
        self,
        config: Config,
        *,
        max_abs_reward: float | None = None,
        frozen_frame_steps: int = FROZEN_FRAME_STEPS,
        grad_zero_steps: int = GRAD_ZERO_STEPS,
        head_frozen_steps: int = HEAD_FROZEN_STEPS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.reward_bound_given = max_abs_reward is not None
        self.max_abs_reward = abs(max_abs_reward) if max_abs_reward is not None else 0.0
        self.min_reward = 0.0  # the most negative reward seen (0 until one is): moves the q_negative floor
        self.frozen_frame_steps = frozen_frame_steps
        self.grad_zero_steps = grad_zero_steps
        self.head_frozen_steps = head_frozen_steps
        self.active: dict[str, RedFlag] = {}
        self.history: list[RedFlag] = []
        self._clear_streak: dict[str, int] = {}
        self._last_frame: np.ndarray | None = None
        self._same_frames = 0
        # The rolling series the shared rules (red_flags.py) are judged on, as long as they look back.
        self._grads: deque[float | None] = deque(maxlen=grad_zero_steps)
        self._q_stds: deque[float | None] = deque(maxlen=head_frozen_steps + 1)
        self._q_means: deque[float | None] = deque(maxlen=head_frozen_steps + 1)
        self._losses: deque[float] = deque(maxlen=LOSS_SMOOTHING_STEPS)
        self._rewards: deque[float] = deque(maxlen=REWARD_DECLINE_WINDOW)
        self._no_progress = 0  # episodes in a row without progress along the track
        self._demo_share: deque[float] = deque(maxlen=DEMO_Q_STEPS)  # the demonstrations' share of the loss
        self._agent_q: deque[float] = deque(maxlen=DEMO_Q_STEPS)
        self._demo_q: deque[float] = deque(maxlen=DEMO_Q_STEPS)
        self._episode_demo_share: deque[float] = deque(maxlen=DEMO_WINDOW_EPISODES)
        self._own_returns: deque[float] = deque(maxlen=DEMO_WINDOW_EPISODES)
        self._skipped = 0
        self._clock = clock
        self._stale_shown_at: float | None = None
        self._stale_shares: deque[float] = deque(maxlen=STALE_SUSTAINED_EPISODES)

    # the fire-once / re-arm rule ----------------------------------------------------------------
    def _update(
        self, name: str, firing: bool, make: Callable[[], RedFlag], clear_after: int
    ) -> RedFlag | None:
        if firing:
            self._clear_streak[name] = 0
            if name in self.active:
                return None
            flag = make()
            self.active[name] = flag
            self.history.append(flag)
            return flag
        if name in self.active:
            streak = self._clear_streak.get(name, 0) + 1
            if streak >= clear_after:
                del self.active[name]
                streak = 0
            self._clear_streak[name] = streak
        return None

    # observations ---------------------------------------------------------------------------------
    def observe_reward(self, reward: float) -> None:
        """Every environment step: track the reward range (it bounds what Q can be)."""
        if reward < self.min_reward and math.isfinite(reward):
            self.min_reward = reward
        if not self.reward_bound_given:
            magnitude = abs(reward)
            if magnitude > self.max_abs_reward and math.isfinite(magnitude):
                self.max_abs_reward = magnitude

    def observe_frames(
        self, frames: np.ndarray, step: int, episode: int, speed: float | None = None
    ) -> list[RedFlag]:
        """Every environment step: frames (4,64,64) uint8, newest last, and the car's speed if known."""
        newest = frames[-1]
        moving = speed is None or speed > MOVING_SPEED
        if moving and self._last_frame is not None and np.array_equal(newest, self._last_frame):
            self._same_frames += 1
        else:
            self._same_frames = 0
            self._last_frame = np.array(newest, copy=True)  # the caller may reuse its buffer
        n = self._same_frames

        def make() -> RedFlag:
            return RedFlag(
                "observations_frozen",
                f"observations frozen: the newest frame has been byte-identical for {n} consecutive steps "
                f"(since step {step - n}): the game has likely stopped sending frames "
                "(paused, minimised or disconnected)",
                float(n),
                step,
                episode,
                float(self.frozen_frame_steps),
            )

        flag = self._update("observations_frozen", n >= self.frozen_frame_steps, make, clear_after=1)
        return [flag] if flag else []

    def observe_policy_ages(self, ages: Sequence[int], step: int, episode: int) -> list[RedFlag]:
        """Every finished episode of a real-time game: the age in learn steps of the weights each action
        was chosen with (0: as fresh as inline)."""
        share = stale_share(ages)

        def make() -> RedFlag:
            return RedFlag(
                "stale_policy",
                f"{share:.0%} of episode {episode:,}'s actions used weights over {STALE_POLICY_LEARN_STEPS} "
                f"learn steps old (at most {max(ages):,}): the learner is slower than the game, so the agent "
                "drives an older policy than inline's; learn on the GPU (--device cuda), close other "
                "programs, or give the game fewer CPU threads",
                share,
                step,
                episode,
                STALE_POLICY_SHARE,
            )

        flag = self._update("stale_policy", share > STALE_POLICY_SHARE, make, CLEAR_AFTER_EPISODES)
        return [flag] if flag else []

    def observe_learn_step(self, metrics: dict[str, Any], step: int, episode: int) -> list[RedFlag]:
        """Every learn step, with the dict `RainbowAgent.train()` returned, plus 'weights_finite' (0/1)
        whenever the loop has checked the weights."""
        fired: list[RedFlag] = []
        clear = CLEAR_AFTER_LEARN_STEPS
        cfg = self.config

        def check(name: str, firing: bool, make: Callable[[], RedFlag], clear_after: int = clear) -> None:
            flag = self._update(name, firing, make, clear_after)
            if flag is not None:
                fired.append(flag)

        loss = to_float(metrics.get("loss"))
        grad = to_float(metrics.get("grad_norm"))
        q_mean = to_float(metrics.get("q_mean"))
        q_min, q_max = to_float(metrics.get("q_min")), to_float(metrics.get("q_max"))
        q_std = to_float(metrics.get("q_std"))
        skipped = bool(metrics.get("skipped"))

        # nonfinite_loss: the agent dropped this step's gradients (loss or gradient NaN/inf)
        loss_bad = loss is not None and not math.isfinite(loss)
        if loss_bad or skipped:
            self._skipped += 1
        check(
            "nonfinite_loss",
            loss_bad or skipped,
            lambda: RedFlag(
                "nonfinite_loss",
                f"non-finite learn step at step {step} (loss={figure(loss)}, grad_norm={figure(grad)}"
                f"{', skipped' if skipped else ''}): its gradients were dropped; "
                f"{self._skipped} such steps so far",
                loss,
                step,
                episode,
                None,
            ),
        )

        # nonfinite_weights: the loop adds weights_finite (0/1) every so often
        weights_finite = metrics.get("weights_finite")
        weights_bad = weights_finite is not None and not bool(weights_finite)
        check(
            "nonfinite_weights",
            weights_bad,
            lambda: RedFlag(
                "nonfinite_weights",
                f"network weights contain NaN/inf at step {step} (weights_finite=0): the model is "
                "corrupted; stop and resume from the last good checkpoint",
                0.0,
                step,
                episode,
                None,
            ),
        )

        # grad_norm_zero: exactly 0.0 (or missing) for N learn steps in a row (seed 003)
        self._grads.append(grad)
        reading = red_flags.grad_norm_zero(self._grads, self.grad_zero_steps)
        zeros = int(reading.value) if reading else 0
        check(
            "grad_norm_zero",
            reading is not None and reading.tripped,
            lambda: RedFlag(
                "grad_norm_zero",
                f"gradient norm {'not recorded' if grad is None else 'exactly 0'} for {zeros} learn steps "
                f"in a row (up to step {step}): no gradient is flowing, or the norm is computed and "
                "discarded (seed 003 showed 0.000 for a whole run for that reason)",
                grad,
                step,
                episode,
                0.0,
            ),
        )

        # grad_norm_exploding: the recorded norm is the pre-clip one
        grad_limit = GRAD_EXPLODING_FACTOR * cfg.gradient_clip_norm
        reading = red_flags.grad_norm_exploding(grad, cfg)
        check(
            "grad_norm_exploding",
            reading is not None and reading.tripped,
            lambda: RedFlag(
                "grad_norm_exploding",
                f"pre-clip gradient norm {figure(grad)} > {grad_limit:g} ({GRAD_EXPLODING_FACTOR:g}x the "
                f"clip norm {cfg.gradient_clip_norm:g}) at step {step}: updates are being cut hard, the loss "
                "surface is blowing up",
                grad,
                step,
                episode,
                grad_limit,
            ),
        )

        # q_negative: the seed's first red flag (its floor moved by negative rewards, see q_floor)
        floor = red_flags.q_floor(self.min_reward, cfg)
        reading = red_flags.q_negative(q_mean, self.min_reward, cfg)
        check(
            "q_negative",
            reading is not None and reading.tripped,
            lambda: RedFlag(
                "q_negative",
                f"mean Q {figure(q_mean)} < {floor:g} at step {step} (episode {episode}): "
                "Q-values are collapsing (seed 004 red flag; its failed soft-update run went to -40,000)",
                q_mean,
                step,
                episode,
                floor,
            ),
        )

        # q_out_of_bounds: |Q| beyond what any discounted return could be
        gamma = cfg.discount_factor
        bound = self.max_abs_reward / (1.0 - gamma)
        q_extreme = red_flags.q_extreme(q_mean, q_min, q_max)
        reading = red_flags.q_out_of_bounds(q_extreme, self.max_abs_reward, cfg)
        check(
            "q_out_of_bounds",
            reading is not None and reading.tripped,
            lambda: RedFlag(
                "q_out_of_bounds",
                f"|Q| {figure(q_extreme)} > {bound:.4g} = max|r| {self.max_abs_reward:.4g} / (1 - gamma "
                f"{gamma:g}) at step {step}: no discounted return can be that large, so the values are "
                "diverging (seed 001: Q implied returns of 2.4M on a -50..200 reward scale)",
                q_extreme,
                step,
                episode,
                bound,
            ),
        )

        # loss_spike: the median of the last 100 learn steps, only after episode 500 (seed 004)
        if loss is not None and math.isfinite(loss):
            self._losses.append(loss)
        spike = red_flags.loss_spike(self._losses, episode)
        smoothed = spike.value if spike else None
        check(
            "loss_spike",
            spike is not None and spike.tripped,
            lambda: RedFlag(
                "loss_spike",
                f"median loss over the last {LOSS_SMOOTHING_STEPS} learn steps {figure(smoothed)} > "
                f"{LOSS_SPIKE_THRESHOLD:g} after episode {LOSS_SPIKE_AFTER_EPISODE} "
                f"(episode {episode}, step {step}): the seed 004 red flag of a diverging run",
                smoothed,
                step,
                episode,
                LOSS_SPIKE_THRESHOLD,
            ),
        )

        # head_frozen: Q does not move with the inputs or over time (seeds 003, 000)
        self._q_stds.append(q_std)
        self._q_means.append(q_mean)
        frozen = red_flags.head_frozen(self._q_stds, self._q_means, self.head_frozen_steps)
        same_q = int(frozen.value) if frozen else 0
        check(
            "head_frozen",
            frozen is not None and frozen.tripped,
            lambda: RedFlag(
                "head_frozen",
                f"Q outputs unchanged for {same_q} learn steps in a row (q_std={figure(q_std)}, "
                f"q_mean={figure(q_mean)}) at step {step}: a dead head (zero-initialised output layer, seed "
                "003) or a saturated one (bounded output trained on unbounded targets, seed 000)",
                q_std,
                step,
                episode,
                0.0,
            ),
        )
        return fired

    def observe_episode(
        self, result: EpisodeResult, epsilon: float, step: int, episode: int
    ) -> list[RedFlag]:
        """Every finished episode (`episode` counts it), acted with `epsilon` up to `step`."""
        reward, length, finished, race_time = result.reward, result.length, result.finished, result.race_time
        min_finish_seconds, progress, timeouts = result.min_finish_seconds, result.progress, result.timeouts
        telemetry_fps, telemetry_wait_share = result.telemetry_fps, result.telemetry_wait_share
        fired: list[RedFlag] = []
        average_length = step / episode if episode else float(length)
        fired += self._observe_demonstrations(reward, step, episode)
        fired += self._observe_race(
            length, step, episode, finished, race_time, min_finish_seconds, progress, timeouts,
            telemetry_fps, telemetry_wait_share,
        )  # fmt: skip

        exploiting = red_flags.early_exploitation(epsilon, episode)
        flag = self._update(
            "early_exploitation",
            exploiting is not None and exploiting.tripped,
            lambda: RedFlag(
                "early_exploitation",
                f"epsilon {epsilon:.3f} < {EARLY_EXPLOITATION_EPSILON:g} at episode {episode:,} "
                f"(step {step:,}), before episode {EARLY_EXPLOITATION_BEFORE_EPISODE:,}: exploiting "
                f"before exploring (seed 004 red flag); episodes average {average_length:.0f} steps",
                epsilon,
                step,
                episode,
                EARLY_EXPLOITATION_EPSILON,
            ),
            CLEAR_AFTER_EPISODES,
        )
        if flag:
            fired.append(flag)

        if math.isfinite(reward):
            self._rewards.append(reward)
        trend = red_flags.reward_decline(self._rewards)
        edge = REWARD_DECLINE_EDGE
        flag = self._update(
            "reward_decline",
            trend is not None and trend.declining,
            lambda: RedFlag(
                "reward_decline",
                f"episode reward declining over the last {REWARD_DECLINE_WINDOW} episodes (to "
                f"episode {episode:,}): slope {trend.slope:.3g}/episode (t={trend.t_stat:.1f} <= "
                f"{REWARD_DECLINE_T:g}), mean of the last {edge} {trend.tail_mean:.4g} < "
                f"first {edge} {trend.head_mean:.4g} (seed 004 red flag)",
                trend.slope,
                step,
                episode,
                REWARD_DECLINE_T,
            ),
            CLEAR_AFTER_EPISODES,
        )
        if flag:
            fired.append(flag)
        return fired

    def observe_sources(self, metrics: dict[str, Any], step: int, episode: int) -> list[RedFlag]:
        """A learn step's per-source metrics (demonstrations beside the agent's data); returns red flags."""
        if "demo_loss_share" not in metrics:
            return []
        share = to_float(metrics.get("demo_loss_share"))
        agent_q, demo_q = to_float(metrics.get("agent_q")), to_float(metrics.get("demo_q"))
        if share is not None and math.isfinite(share):
            self._demo_share.append(share)
        if agent_q is not None and demo_q is not None and math.isfinite(agent_q) and math.isfinite(demo_q):
            self._agent_q.append(agent_q)
            self._demo_q.append(demo_q)
        full = len(self._agent_q) == DEMO_Q_STEPS
        agent_mean = float(np.mean(self._agent_q)) if full else math.nan
        demo_mean = float(np.mean(self._demo_q)) if full else math.nan
        below = full and agent_mean < demo_mean - max(DEMO_Q_GAP, abs(demo_mean))
        flag = self._update(
            "agent_q_below_demo",
            below,
            lambda: RedFlag(
                "agent_q_below_demo",
                f"the agent's greedy Q on its own states ({agent_mean:.3g}) is far below the demonstrations' "
                f"({demo_mean:.3g}) over the last {DEMO_Q_STEPS} learn steps (step {step:,}): the net values "
                "only what the demonstrations do (seed 002); lower demo_margin_weight or use fewer demos",
                agent_mean,
                step,
                episode,
                demo_mean,
            ),
            CLEAR_AFTER_LEARN_STEPS,
        )
        return [flag] if flag else []

    def _observe_demonstrations(self, reward: float, step: int, episode: int) -> list[RedFlag]:
        if not self._demo_share:
            return []
        self._episode_demo_share.append(float(np.mean(self._demo_share)))
        if math.isfinite(reward):
            self._own_returns.append(reward)
        full = len(self._own_returns) == DEMO_WINDOW_EPISODES
        share = float(np.mean(self._episode_demo_share))
        trend = red_flags.reward_trend(self._own_returns, edge=DEMO_WINDOW_EPISODES // 5) if full else None
        flag = self._update(
            "demo_dominance",
            trend is not None and share > DEMO_DOMINANCE_SHARE and trend.slope <= 0,
            lambda: RedFlag(
                "demo_dominance",
                f"the demonstrations carry {100 * share:.0f}% of the loss while the agent's own returns have "
                f"not risen over its last {DEMO_WINDOW_EPISODES} episodes (slope {trend.slope:.3g}/episode, "
                f"to episode {episode:,}): imitating, not improving (seed 002); lower demo_margin_weight or "
                "demo_priority_bonus",
                share,
                step,
                episode,
                DEMO_DOMINANCE_SHARE,
            ),
            CLEAR_AFTER_EPISODES,
        )
        return [flag] if flag else []

    def _observe_race(
        self,
        length: int,
        step: int,
        episode: int,
        finished: bool,
        race_time: float | None,
        min_finish_seconds: float | None,
        progress: float | None,
        timeouts: int,
        telemetry_fps: float | None = None,
        telemetry_wait_share: float | None = None,
    ) -> list[RedFlag]:
        """The red flags of a game that trains on nonsense: no progress, impossible finishes, stale data."""
        fired: list[RedFlag] = []
        config = self.config
        # no_progress: episode after episode the car gets nowhere (on TrackMania, a reward trajectory of
        # another map pays nothing: every episode ends by the failure countdown with zero reward).
        stalled = progress is not None and progress <= 0 and not finished
        self._no_progress = self._no_progress + 1 if stalled else 0
        count = self._no_progress
        flag = self._update(
            "no_progress",
            count >= config.no_progress_streak,
            lambda: RedFlag(
                "no_progress",
                f"{count} episodes in a row made no progress along the track (to episode {episode:,}, step "
                f"{step:,}): on TrackMania, is the map loaded the one the reward trajectory was recorded on? "
                "(README: Troubleshooting)",
                float(count),
                step,
                episode,
                float(config.no_progress_streak),
            ),
            1,
        )
        if flag:
            fired.append(flag)
        # implausible_finish: a finish faster than the track can be driven at top speed (a misaligned or
        # foreign telemetry stream reports "finished" at random).
        impossible = (
            finished
            and race_time is not None
            and min_finish_seconds is not None
            and math.isfinite(min_finish_seconds)
            and race_time < min_finish_seconds
        )
        flag = self._update(
            "implausible_finish",
            impossible,
            lambda: RedFlag(
                "implausible_finish",
                f"episode {episode:,} finished in {race_time:.2f} s, faster than the track can be driven at "
                f"top speed ({min_finish_seconds:.2f} s): the telemetry's finish flag is wrong (plugin "
                "version, misaligned stream) or the trajectory is not this map's",
                race_time,
                step,
                episode,
                min_finish_seconds,
            ),
            1,
        )
        if flag:
            fired.append(flag)
        # stale_observations: too many of the episode's time steps timed out (the observation was stale,
        # the car drove on the previous action). Shown for every such episode, at most once a minute.
        share = timeouts / length if length else 0.0
        cause = _stale_cause(telemetry_fps, telemetry_wait_share)
        now = self._clock()
        recent = self._stale_shown_at is not None and now - self._stale_shown_at < STALE_REPEAT_SECONDS
        if share > config.timeout_share_flag and not recent:
            self._stale_shown_at = now
            flag = RedFlag(
                "stale_observations",
                f"{timeouts} of episode {episode:,}'s {length} time steps timed out ({100 * share:.0f}% > "
                f"{100 * config.timeout_share_flag:.0f}%): their observations were stale and are in the "
                f"replay; {cause}",
                share,
                step,
                episode,
                config.timeout_share_flag,
            )
            self.history.append(flag)
            fired.append(flag)
        self._stale_shares.append(share)
        sustained = sum(self._stale_shares) / len(self._stale_shares)
        flag = self._update(
            "stale_observations_sustained",
            len(self._stale_shares) == STALE_SUSTAINED_EPISODES and sustained > STALE_SUSTAINED_SHARE,
            lambda: RedFlag(
                "stale_observations_sustained",
                f"{100 * sustained:.0f}% of the time steps of the last {STALE_SUSTAINED_EPISODES} episodes "
                f"timed out (to episode {episode:,}, step {step:,}): most of what the agent learns from is "
                f"stale; {cause}",
                sustained,
                step,
                episode,
                STALE_SUSTAINED_SHARE,
            ),
            STALE_SUSTAINED_EPISODES,
        )
        if flag:
            fired.append(flag)
        return fired


def _stale_cause(telemetry_fps: float | None, telemetry_wait_share: float | None) -> str:
    """What made an episode's steps late, as measured, and what to do about it."""
    if telemetry_wait_share is not None and telemetry_wait_share > PLUGIN_BOUND_WAIT_SHARE:
        rate = f"~{telemetry_fps:.0f} frames/s" if telemetry_fps is not None else "too few frames"
        return (
            f"the cause is the game: its telemetry came at {rate} (the plugin sends one frame per game "
            f"frame; the agent waited for it {100 * telemetry_wait_share:.0f}% of the episode), slower than "
            "the agent's 20 steps/s: raise the game's frame rate (lower its graphics, no frame cap below "
            "30 fps, keep its window visible)"
        )
    return (
        "the cause is the agent (it took longer than a time step between observations; the game's telemetry "
        "kept up): give the learner fewer --threads, use the GPU, keep the learner beside the actor (the "
        "default), close other programs"
    )
