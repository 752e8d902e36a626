"""Run health: live red flags while training, and a go/no-go verdict on a short diagnostic run.

Two tools, both pure Python/numpy (no torch, no model), fed only with numbers the loop already has:

- `HealthMonitor` watches the stream the loop produces (every reward, every observation, every learn
  step's metrics, every finished episode) and returns `RedFlag`s. A flag fires once when its condition
  first becomes true, then stays quiet until the condition has been clear for a while (it re-arms), so a
  diverging run prints one line per problem, not one per step.
- `diagnose(records, config)` reads a finished run's JSONL records (see run_log.py) and answers "is this
  run healthy enough to launch the long one?" as a table of criteria, in the spirit of seed 001's
  "success criteria before 50K" table, adapted to a 5,000-step diagnostic run.

The thresholds are module constants below, each citing the seed it comes from:
seed 004 (the known-good config and its red flags), seed 003 (grad norm never recorded, zero-initialised
output layer), seed 001 (Q-values implying impossible returns), seed 000 (a bounded head trained on
unbounded targets, whose outputs froze at the bound).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tm_config import Config, ConfigError, epsilon_at

# --- thresholds ------------------------------------------------------------------------------------
# Seed 004, "Red Flags (Stop and Debug)": Q-values go negative below -10. That rule assumes TrackMania's
# rewards, which are never negative (tmrl's constant penalty is 0); where a step can cost reward (the
# embedded track pays -0.25 per step), an honest Q can sit far below -10, so the floor moves down by the
# most negative return possible: q_floor = -10 + min(0, min reward) / (1 - gamma).
Q_NEGATIVE_THRESHOLD = -10.0
# Seed 004: loss spikes above 10 after episode 500. One learn step's loss is one batch of 32 and can
# spike alone in a healthy run, so the monitor compares the MEDIAN of the last 100 learn steps: it
# fires only when most of the last 100 steps were above 10 (a mean would let one 1000 through).
LOSS_SPIKE_THRESHOLD = 10.0
LOSS_SPIKE_AFTER_EPISODE = 500
LOSS_SMOOTHING_STEPS = 100
# Seed 004: epsilon reaches < 0.5 before episode 10,000.
EARLY_EXPLOITATION_EPSILON = 0.5
EARLY_EXPLOITATION_BEFORE_EPISODE = 10_000
# Seed 004: episode rewards decrease over 500+ episodes. The test (see `reward_trend`): over the last
# 500 episodes, the least-squares slope has t <= -4 AND the mean of the window's last 100 episodes is
# below the mean of its first 100. t <= -4 (not the textbook -2) because the test runs after every
# episode on overlapping windows and rewards are autocorrelated: a laxer bar fires on healthy plateaus.
REWARD_DECLINE_WINDOW = 500
REWARD_DECLINE_EDGE = 100
REWARD_DECLINE_T = -4.0
# Seed 003: grad norm showed 0.000 for a whole run because it was never recorded. A real gradient is
# never exactly 0.0, so 100 exact zeros in a row mean no gradient flows or the norm is not recorded.
GRAD_ZERO_STEPS = 100
# The recorded norm is the pre-clip one: 10x the clip norm means the updates are being cut hard.
GRAD_EXPLODING_FACTOR = 10.0
# Seeds 003 and 000: a zero-initialised or saturated head gives the same Q for every input. With noisy
# layers and fresh batches, q_std == 0 or an exactly repeated q_mean for 100 learn steps is a dead head.
HEAD_FROZEN_STEPS = 100
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

# --- go/no-go criteria of a diagnostic run (default 5,000 environment steps) -----------------------
DIAG_MIN_LEARN_STEPS = 1_000  # a 5,000-step run makes ~4,968 learn steps (learning starts at 32 stored)
DIAG_MIN_STEP_RECORDS = 5
DIAG_MAX_SKIPPED_STEPS = 10  # the loop itself stops at 100 in a row (max_consecutive_nonfinite_steps)
DIAG_LOSS_GROWTH_FACTOR = 10.0  # last-window mean loss may not exceed 10x the first-window mean
DIAG_EPSILON_TOLERANCE = 1e-6


def stale_share(ages: Sequence[int]) -> float:
    """The share of actions chosen with weights over STALE_POLICY_LEARN_STEPS learn steps old."""
    return sum(age > STALE_POLICY_LEARN_STEPS for age in ages) / len(ages) if ages else 0.0


def q_floor(min_reward: float, config: Config) -> float:
    """The lowest mean Q that is not a red flag, given the most negative reward seen."""
    return Q_NEGATIVE_THRESHOLD + min(0.0, min_reward) / (1.0 - config.discount_factor)


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


def config_from_records(records: Iterable[dict[str, Any]]) -> Config:
    """The config a run used: the known-good one plus the departures of its first "run" record."""
    for record in records:
        if record.get("kind") != "run" or not isinstance(record.get("departures"), dict):
            continue
        known = {f.name for f in dataclasses.fields(Config)}
        overrides = {
            key: value["used"]
            for key, value in record["departures"].items()
            if key in known and isinstance(value, dict) and "used" in value
        }
        try:
            return Config().with_overrides(**overrides)
        except ConfigError:  # written by another version of the config: judge it by the pinned one
            return Config()
    return Config()


# --- reward trend ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RewardTrend:
    slope: float  # least-squares reward change per episode
    t_stat: float  # slope / its standard error
    head_mean: float  # mean of the first `edge` episodes
    tail_mean: float  # mean of the last `edge` episodes
    episodes: int

    @property
    def declining(self) -> bool:
        return self.t_stat <= REWARD_DECLINE_T and self.tail_mean < self.head_mean


def reward_trend(rewards: Sequence[float], edge: int = REWARD_DECLINE_EDGE) -> RewardTrend:
    """Least-squares trend of a reward series (non-finite values dropped). `edge` episodes at each end
    give the head/tail means (at most a fifth of the series each, so short series still compare ends)."""
    y = np.asarray([r for r in rewards if math.isfinite(r)], dtype=np.float64)
    n = len(y)
    if n < 3:
        return RewardTrend(0.0, 0.0, math.nan, math.nan, n)
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    sxx = float(x @ x)
    yc = y - y.mean()
    slope = float(x @ yc) / sxx
    residual = yc - slope * x
    variance = float(residual @ residual) / (n - 2)
    standard_error = math.sqrt(variance / sxx)
    if standard_error > 0:
        t_stat = slope / standard_error
    else:  # an exactly straight line: its direction is certain
        t_stat = math.copysign(math.inf, slope) if slope else 0.0
    k = max(1, min(edge, n // 5))
    return RewardTrend(slope, t_stat, float(y[:k].mean()), float(y[-k:].mean()), n)


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


def _g(value: float | None) -> str:
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
        self._zero_grads = 0
        self._same_q = 0
        self._last_q_mean: float | None = None
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
                f"non-finite learn step at step {step} (loss={_g(loss)}, grad_norm={_g(grad)}"
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
        self._zero_grads = self._zero_grads + 1 if grad is None or grad == 0.0 else 0
        zeros = self._zero_grads
        check(
            "grad_norm_zero",
            zeros >= self.grad_zero_steps,
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
        check(
            "grad_norm_exploding",
            grad is not None and grad > grad_limit,
            lambda: RedFlag(
                "grad_norm_exploding",
                f"pre-clip gradient norm {_g(grad)} > {grad_limit:g} ({GRAD_EXPLODING_FACTOR:g}x the clip "
                f"norm {cfg.gradient_clip_norm:g}) at step {step}: updates are being cut hard, the loss "
                "surface is blowing up",
                grad,
                step,
                episode,
                grad_limit,
            ),
        )

        # q_negative: the seed's first red flag (its floor moved by negative rewards, see q_floor)
        floor = q_floor(self.min_reward, cfg)
        check(
            "q_negative",
            q_mean is not None and q_mean < floor,
            lambda: RedFlag(
                "q_negative",
                f"mean Q {_g(q_mean)} < {floor:g} at step {step} (episode {episode}): "
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
        extremes = [abs(v) for v in (q_min, q_max) if v is not None]
        q_extreme = max(extremes) if extremes else (abs(q_mean) if q_mean is not None else None)
        check(
            "q_out_of_bounds",
            self.max_abs_reward > 0 and q_extreme is not None and q_extreme > bound,
            lambda: RedFlag(
                "q_out_of_bounds",
                f"|Q| {_g(q_extreme)} > {bound:.4g} = max|r| {self.max_abs_reward:.4g} / (1 - gamma "
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
        window_full = len(self._losses) == LOSS_SMOOTHING_STEPS
        late = episode >= LOSS_SPIKE_AFTER_EPISODE
        smoothed = statistics.median(self._losses) if window_full and late else None
        check(
            "loss_spike",
            smoothed is not None and smoothed > LOSS_SPIKE_THRESHOLD,
            lambda: RedFlag(
                "loss_spike",
                f"median loss over the last {LOSS_SMOOTHING_STEPS} learn steps {_g(smoothed)} > "
                f"{LOSS_SPIKE_THRESHOLD:g} after episode {LOSS_SPIKE_AFTER_EPISODE} (episode {episode}, "
                f"step {step}): the seed 004 red flag of a diverging run",
                smoothed,
                step,
                episode,
                LOSS_SPIKE_THRESHOLD,
            ),
        )

        # head_frozen: Q does not move with the inputs or over time (seeds 003, 000)
        same = (q_std is not None and q_std == 0.0) or (
            q_mean is not None and self._last_q_mean is not None and q_mean == self._last_q_mean
        )
        self._same_q = self._same_q + 1 if same else 0
        self._last_q_mean = q_mean
        same_q = self._same_q
        check(
            "head_frozen",
            same_q >= self.head_frozen_steps,
            lambda: RedFlag(
                "head_frozen",
                f"Q outputs unchanged for {same_q} learn steps in a row (q_std={_g(q_std)}, "
                f"q_mean={_g(q_mean)}) at step {step}: a dead head (zero-initialised output layer, seed "
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

        flag = self._update(
            "early_exploitation",
            epsilon < EARLY_EXPLOITATION_EPSILON and episode < EARLY_EXPLOITATION_BEFORE_EPISODE,
            lambda: RedFlag(
                "early_exploitation",
                f"epsilon {epsilon:.3f} < {EARLY_EXPLOITATION_EPSILON:g} at episode {episode:,} (step "
                f"{step:,}), before episode {EARLY_EXPLOITATION_BEFORE_EPISODE:,}: exploiting before "
                f"exploring (seed 004 red flag); episodes average {average_length:.0f} steps",
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
        trend = reward_trend(self._rewards) if len(self._rewards) == REWARD_DECLINE_WINDOW else None
        flag = self._update(
            "reward_decline",
            trend is not None and trend.declining,
            lambda: RedFlag(
                "reward_decline",
                f"episode reward declining over the last {REWARD_DECLINE_WINDOW} episodes (to episode "
                f"{episode:,}): slope {trend.slope:.3g}/episode (t={trend.t_stat:.1f} <= "
                f"{REWARD_DECLINE_T:g}), mean of the last {REWARD_DECLINE_EDGE} {trend.tail_mean:.4g} < "
                f"first {REWARD_DECLINE_EDGE} {trend.head_mean:.4g} (seed 004 red flag)",
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
        trend = reward_trend(self._own_returns, edge=DEMO_WINDOW_EPISODES // 5) if full else None
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


# --- go / no-go ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Criterion:
    name: str
    passed: bool
    measured: str
    requirement: str


def _values(records: Iterable[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) of every record holding `key` (non-finite values kept)."""
    out = []
    for record in records:
        value = to_float(record.get(key))
        if value is not None:
            out.append((int(to_float(record.get("step")) or 0), value))
    return out


def _all_finite(pairs: list[tuple[int, float]], what: str) -> tuple[bool, str]:
    """(passed, measured) for "every recorded value is finite"; nothing recorded fails."""
    bad = [(s, v) for s, v in pairs if not math.isfinite(v)]
    if not pairs:
        return False, f"no {what} recorded"
    if bad:
        return False, f"{len(bad)} of {len(pairs)} non-finite, first {bad[0][1]} at step {bad[0][0]:,}"
    return True, f"all {len(pairs)} finite"


def diagnose(records: list[dict[str, Any]], config: Config) -> list[Criterion]:
    """Go/no-go criteria for a diagnostic run from its JSONL records (as `run_log.read_jsonl` returns
    them). Missing evidence fails a criterion: a run that measured nothing is no reason to go on."""
    steps = [r for r in records if r.get("kind") == "step"]
    episodes = [r for r in records if r.get("kind") == "episode"]
    events = [r for r in records if r.get("kind") == "event"]
    criteria: list[Criterion] = []

    def add(name: str, passed: bool, measured: str, requirement: str) -> None:
        criteria.append(Criterion(name, bool(passed), measured, requirement))

    # learning happened
    learn_steps = max((int(v) for _, v in _values(steps, "learn_step") if math.isfinite(v)), default=0)
    add(
        "learning_happened",
        learn_steps >= DIAG_MIN_LEARN_STEPS and len(steps) >= DIAG_MIN_STEP_RECORDS,
        f"{learn_steps:,} learn steps, {len(steps)} step records",
        f">= {DIAG_MIN_LEARN_STEPS:,} learn steps and >= {DIAG_MIN_STEP_RECORDS} step records",
    )

    # loss finite everywhere
    add(
        "loss_finite",
        *_all_finite(_values(steps, "loss") + _values(episodes, "loss"), "loss"),
        "every loss finite",
    )

    # few skipped (non-finite) learn steps
    skipped_total = max((v for _, v in _values(steps, "skipped_total") if math.isfinite(v)), default=0.0)
    skipped_events = sum(1 for e in events if e.get("name") == "nonfinite_step_skipped")
    skipped = int(max(skipped_total, skipped_events))
    add(
        "few_nonfinite_steps",
        skipped <= DIAG_MAX_SKIPPED_STEPS,
        f"{skipped} learn steps skipped (NaN/inf loss or gradients)",
        f"<= {DIAG_MAX_SKIPPED_STEPS} skipped",
    )

    # grad norm recorded, non-zero, bounded
    grads = [(s, v) for s, v in _values(steps, "grad_norm") if math.isfinite(v)]
    zeros = sum(1 for _, v in grads if v == 0.0)
    if not steps:
        measured = "no step records"
    elif not grads:
        measured = f"not recorded in any of {len(steps)} step records (seed 003)"
    else:
        measured = f"min {min(v for _, v in grads):.4g}, {zeros} of {len(grads)} exactly 0"
    add(
        "grad_norm_nonzero", bool(grads) and zeros == 0, measured, "recorded in step records, never exactly 0"
    )
    grad_limit = GRAD_EXPLODING_FACTOR * config.gradient_clip_norm
    grad_max = max((v for _, v in grads), default=None)
    add(
        "grad_norm_bounded",
        grad_max is not None and grad_max <= grad_limit,
        "no grad norm recorded" if grad_max is None else f"max {grad_max:.4g} (pre-clip)",
        f"<= {grad_limit:g} ({GRAD_EXPLODING_FACTOR:g}x the clip norm {config.gradient_clip_norm:g})",
    )

    # Q finite, not negative, within the return bound
    q_means = _values(steps, "q_mean") + _values(episodes, "q_mean")
    q_all = q_means + _values(steps, "q_min") + _values(steps, "q_max")
    add("q_finite", *_all_finite(q_all, "Q"), "q_mean, q_min, q_max finite in every record")
    finite_q_means = [(s, v) for s, v in q_means if math.isfinite(v)]
    lowest = min(finite_q_means, key=lambda sv: sv[1], default=None)
    min_rewards = [v for _, v in _values(steps, "min_reward") if math.isfinite(v)]
    floor = q_floor(min(min_rewards, default=0.0), config)
    add(
        "q_not_negative",
        lowest is not None and lowest[1] >= floor,
        "no Q recorded" if lowest is None else f"lowest mean Q {lowest[1]:.4g} at step {lowest[0]:,}",
        f"mean Q >= {floor:g} (seed 004: -10, lowered by negative rewards)",
    )
    recorded_bound = [v for _, v in _values(steps, "max_abs_reward") if math.isfinite(v)]
    episode_rewards = [abs(v) for _, v in _values(episodes, "reward") if math.isfinite(v)]
    if recorded_bound:
        max_abs_reward, source = max(recorded_bound), "recorded by the loop"
    else:
        # Without per-step rewards, the largest |episode reward| stands in for max|r|: at least as large
        # for rewards of one sign, so the bound is loose (no false alarm) yet still catches seed 001's 2.4M.
        max_abs_reward, source = max(episode_rewards, default=0.0), "the largest |episode reward|"
    extremes = [abs(v) for _, v in _values(steps, "q_min") + _values(steps, "q_max") + q_means]
    extremes = [v for v in extremes if math.isfinite(v)]
    bound = max_abs_reward / (1.0 - config.discount_factor)
    requirement = f"|Q| <= max|r| / (1 - gamma {config.discount_factor:g}): no return can be larger"
    if max_abs_reward <= 0:
        add("q_within_return_bound", True, "not checkable: no non-zero reward recorded", requirement)
    else:
        q_abs = max(extremes, default=None)
        add(
            "q_within_return_bound",
            q_abs is not None and q_abs <= bound,
            ("no Q recorded" if q_abs is None else f"max |Q| {q_abs:.4g}")
            + f" vs bound {bound:.4g} (max|r| {max_abs_reward:.4g}: {source})",
            requirement,
        )

    # Q outputs change (the head is alive)
    q_std_last = next((to_float(r.get("q_std")) for r in reversed(steps) if "q_std" in r), None)
    distinct_q = len({v for _, v in _values(steps, "q_mean")})
    alive = distinct_q > 1 and (q_std_last is None or (math.isfinite(q_std_last) and q_std_last > 0))
    add(
        "q_changes",
        alive,
        f"last q_std {_g(q_std_last)}, {distinct_q} distinct q_mean values in {len(steps)} step records",
        "q_std > 0 at the end and q_mean not constant (a dead head: seeds 003, 000)",
    )

    # loss not exploding
    finite_losses = [v for _, v in _values(steps, "loss") if math.isfinite(v)]
    if finite_losses:
        k = max(1, len(finite_losses) // 5)
        first, last = float(np.mean(finite_losses[:k])), float(np.mean(finite_losses[-k:]))
        ok = last <= LOSS_SPIKE_THRESHOLD and (first <= 0 or last <= DIAG_LOSS_GROWTH_FACTOR * first)
        measured = f"first-window mean {first:.4g}, last-window mean {last:.4g} ({k} records each)"
    else:
        ok, measured = False, "no finite loss in step records"
    add(
        "loss_not_exploding",
        ok,
        measured,
        f"last-window mean <= {LOSS_SPIKE_THRESHOLD:g} and <= {DIAG_LOSS_GROWTH_FACTOR:g}x the first",
    )

    # target Q finite
    targets = _values(steps, "target_q_mean") + _values(steps, "target_q_max")
    add("target_q_finite", *_all_finite(targets, "target Q"), "target_q_mean, target_q_max finite everywhere")

    # constant learning rate (seed 004: a scheduler starved the failed run)
    rates = {v for _, v in _values(steps, "learning_rate")}
    add(
        "learning_rate_constant",
        rates == {config.learning_rate},
        "no learning rate recorded" if not rates else "values " + ", ".join(f"{v:g}" for v in sorted(rates)),
        f"always {config.learning_rate:g} (no scheduler)",
    )

    # epsilon on the pinned step schedule. The loop records the epsilon of the action taken at step - 1
    # (the record is written after the step counter moved on), so either step matches.
    def on_schedule(step: int, value: float) -> bool:
        expected = (epsilon_at(step, config), epsilon_at(max(step - 1, 0), config))
        return min(abs(value - e) for e in expected) <= DIAG_EPSILON_TOLERANCE  # False for NaN

    eps = _values(steps, "epsilon") + _values(episodes, "epsilon")
    off = [(s, v) for s, v in eps if not on_schedule(s, v)]
    if off:
        s, v = off[0]
        measured = (
            f"{len(off)} of {len(eps)} off, first {v:.6g} at step {s:,} "
            f"(schedule {epsilon_at(s, config):.6g})"
        )
    else:
        measured = f"all {len(eps)} on schedule" if eps else "no epsilon recorded"
    add(
        "epsilon_on_schedule",
        bool(eps) and not off,
        measured,
        f"epsilon == linear schedule of the global step (+-{DIAG_EPSILON_TOLERANCE:g})",
    )

    # red flags recorded by the loop
    flags = [e for e in events if e.get("level") == "red_flag"]
    frozen = [e for e in flags if e.get("name") == "observations_frozen"]
    add(
        "observations_not_frozen",
        not frozen,
        f"frozen at step {int(to_float(frozen[0].get('step')) or 0):,}"
        if frozen
        else "no frozen-frame event",
        "no observations_frozen red flag",
    )
    fatal = sorted({str(e.get("name")) for e in flags if e.get("name") in FATAL_FLAGS})
    add(
        "no_fatal_red_flags",
        not fatal,
        ("raised: " + ", ".join(fatal)) if fatal else f"{len(flags)} red flags, none fatal",
        "no fatal red-flag event (health.FATAL_FLAGS)",
    )
    return criteria


def verdict(criteria: Sequence[Criterion]) -> bool:
    """GO only when every criterion passed."""
    return bool(criteria) and all(c.passed for c in criteria)


def format_table(criteria: Sequence[Criterion], width: int | None = None) -> str:
    """An aligned PASS/FAIL table, then a GO / NO-GO line. Wider than the terminal (`width`, default its
    own), each criterion takes two wrapped lines instead: the verdict, name and measure, then what it
    requires, indented."""
    import shutil
    import textwrap

    width = width or shutil.get_terminal_size((120, 24)).columns
    header = ("", "criterion", "measured", "requirement")
    rows = [("PASS" if c.passed else "FAIL", c.name, c.measured, c.requirement) for c in criteria]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3]
        for row in [header, *rows]
    ]
    if max(len(line) for line in lines) > width:
        lines = []
        for status, name, measured, requirement in rows:
            lines += textwrap.wrap(f"{status}  {name}  {measured}", width, subsequent_indent="      ")
            lines += textwrap.wrap(f"requires: {requirement}", width, initial_indent="      ",
                                   subsequent_indent="      ")  # fmt: skip
    failed = [c.name for c in criteria if not c.passed]
    if verdict(criteria):
        lines.append(f"GO: all {len(criteria)} criteria passed")
    else:
        no_go = f"NO-GO: {len(failed)} of {len(criteria)} criteria failed: " + ", ".join(failed)
        lines += textwrap.wrap(no_go, width, subsequent_indent="  ")
    return "\n".join(lines)
