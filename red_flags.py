"""The red-flag rules that are judged in more than one place, each defined once, as a pure function.

The live monitor (health.HealthMonitor) calls them on its rolling series at every learn step or episode;
the go/no-go diagnosis (diagnose.py) and the comparison of finished runs (run_checks.py) call the same
functions on the series a run recorded. A rule returns a `Reading` (the figure it compares, the threshold,
whether it tripped) or None when the series is too short to judge; `scan_*` apply a windowed rule at
every point of a recorded series, exactly as the live monitor applies it at every learn step or episode
(the live behaviour is the reference), so a run's flag, its go/no-go and its comparison agree.

Offline, "the series" is what the run recorded: every learn step live, but a step record only every
`log_every_steps` learn steps, and an episode record per episode (its loss and Q are the last learn step's).
On a series recorded at every learn step the three readers see exactly what the monitor saw.

Flags the records cannot re-judge (frozen frames, stale policies, the game's timeouts, demonstrations,
non-finite steps) are judged only live, with their thresholds in health.py.

The thresholds are module constants below, each citing the seed it comes from: seed 004 (the known-good
config and its red flags), seed 003 (grad norm never recorded, zero-initialised output layer), seed 001
(Q-values implying impossible returns), seed 000 (a bounded head trained on unbounded targets).
They are the rules' definitions, not knobs (tm_config.Config and Runtime hold those): a run that moved one
would raise flags that its go/no-go and every comparison of it, which read these constants, would not.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tm_config import Config

# --- thresholds ------------------------------------------------------------------------------------
# Seed 004, "Red Flags (Stop and Debug)": Q-values go negative below -10. That rule assumes TrackMania's
# rewards, which are never negative (tmrl's constant penalty is 0); where a step can cost reward (the
# embedded track pays -0.25 per step), an honest Q can sit far below -10, so the floor moves down by the
# most negative return possible: q_floor = -10 + min(0, min reward) / (1 - gamma).
Q_NEGATIVE_THRESHOLD = -10.0
# Seed 004: loss spikes above 10 after episode 500. One learn step's loss is one batch of 32 and can
# spike alone in a healthy run, so the rule compares the MEDIAN of the last 100 losses: it fires only
# when most of the last 100 were above 10 (a mean would let one 1000 through).
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


@dataclass(frozen=True)
class Reading:
    """What a rule measured at one point of a series."""

    value: float  # the figure the rule compares (a median, a streak length, an epsilon, ...)
    threshold: float
    tripped: bool


def first_trip(readings: Sequence[Any]) -> tuple[int, Any] | None:
    """The index and reading of the first point where a rule tripped; None when it never did."""
    return next(((i, r) for i, r in enumerate(readings) if r is not None and r.tripped), None)


# --- Q ---------------------------------------------------------------------------------------------
def q_floor(min_reward: float, config: Config) -> float:
    """The lowest mean Q that is not a red flag, given the most negative reward seen."""
    return Q_NEGATIVE_THRESHOLD + min(0.0, min_reward) / (1.0 - config.discount_factor)


def q_negative(q_mean: float | None, min_reward: float, config: Config) -> Reading | None:
    """q_negative, at one learn step: mean Q below the floor (seed 004's -10, lowered by the most negative
    reward seen so far, see q_floor). Point rule: offline it is judged at every recorded Q."""
    if q_mean is None:
        return None
    floor = q_floor(min_reward, config)
    return Reading(q_mean, floor, q_mean < floor)  # NaN never trips (nonfinite_loss and q_finite do)


def q_extreme(q_mean: float | None, q_min: float | None, q_max: float | None) -> float | None:
    """The largest |Q| a learn step reports: of q_min and q_max, or |q_mean| without them."""
    extremes = [abs(v) for v in (q_min, q_max) if v is not None]
    return max(extremes) if extremes else (abs(q_mean) if q_mean is not None else None)


def q_out_of_bounds(extreme: float | None, max_abs_reward: float, config: Config) -> Reading | None:
    """q_out_of_bounds, at one learn step: |Q| beyond max|r| / (1 - gamma), more than any discounted
    return can be (seed 001). Not judged before a non-zero reward was seen. Point rule."""
    if extreme is None or max_abs_reward <= 0:
        return None
    bound = max_abs_reward / (1.0 - config.discount_factor)
    return Reading(extreme, bound, extreme > bound)


def head_frozen(
    q_stds: Sequence[float | None], q_means: Sequence[float | None], steps: int = HEAD_FROZEN_STEPS
) -> Reading | None:
    """head_frozen, at the newest of a series of learn steps: for `steps` learn steps in a row, q_std was
    exactly 0 or q_mean repeated the previous step's exactly (a dead or saturated head, seeds 003, 000).
    `q_stds` and `q_means` are aligned, newest last; the streak is counted back from the newest."""
    streak = 0
    for i in range(len(q_means) - 1, -1, -1):
        q_std, q_mean = q_stds[i], q_means[i]
        previous = q_means[i - 1] if i > 0 else None
        if (q_std is not None and q_std == 0.0) or (
            q_mean is not None and previous is not None and q_mean == previous
        ):
            streak += 1
        else:
            break
    return Reading(float(streak), float(steps), streak >= steps)


def scan_head_frozen(
    q_stds: Sequence[float | None], q_means: Sequence[float | None], steps: int = HEAD_FROZEN_STEPS
) -> list[Reading | None]:
    """head_frozen at every point of a recorded series (each point sees the `steps` + 1 before it)."""
    return [head_frozen(q_stds[max(0, i - steps) : i + 1], q_means[max(0, i - steps) : i + 1], steps)
            for i in range(len(q_means))]  # fmt: skip


# --- gradients -------------------------------------------------------------------------------------
def grad_norm_zero(grads: Sequence[float | None], steps: int = GRAD_ZERO_STEPS) -> Reading | None:
    """grad_norm_zero, at the newest of a series of learn steps: the gradient norm exactly 0.0 or not
    recorded (None) for `steps` learn steps in a row, counted back from the newest (seed 003)."""
    streak = 0
    for grad in reversed(grads):
        if grad is not None and grad != 0.0:
            break
        streak += 1
    return Reading(float(streak), float(steps), streak >= steps)


def scan_grad_norm_zero(grads: Sequence[float | None], steps: int = GRAD_ZERO_STEPS) -> list[Reading | None]:
    """grad_norm_zero at every point of a recorded series."""
    return [grad_norm_zero(grads[max(0, i + 1 - steps) : i + 1], steps) for i in range(len(grads))]


def grad_norm_exploding(grad: float | None, config: Config) -> Reading | None:
    """grad_norm_exploding, at one learn step: the pre-clip norm above GRAD_EXPLODING_FACTOR x the clip
    norm (updates cut hard). Point rule."""
    if grad is None:
        return None
    limit = GRAD_EXPLODING_FACTOR * config.gradient_clip_norm
    return Reading(grad, limit, grad > limit)


# --- loss ------------------------------------------------------------------------------------------
def loss_spike(losses: Sequence[float], episode: int) -> Reading | None:
    """loss_spike, at the newest of a series of losses: the median of the last LOSS_SMOOTHING_STEPS
    finite losses above LOSS_SPIKE_THRESHOLD, once `episode` (the episodes completed when the newest loss
    was measured) has reached LOSS_SPIKE_AFTER_EPISODE (seed 004). Not judged before the window is full.

    Live, the series is every learn step's loss. Offline it is the recorded one (step records, or the
    per-episode loss, see the module docstring), judged at every point by `scan_loss_spike`: the go/no-go
    used to test only a last-window mean, the comparison a 10-episode mean, and they could disagree."""
    if episode < LOSS_SPIKE_AFTER_EPISODE:
        return None
    window = [v for v in losses if math.isfinite(v)][-LOSS_SMOOTHING_STEPS:]
    if len(window) < LOSS_SMOOTHING_STEPS:
        return None
    median = float(statistics.median(window))
    return Reading(median, LOSS_SPIKE_THRESHOLD, median > LOSS_SPIKE_THRESHOLD)


def scan_loss_spike(losses: Sequence[float], episodes: Sequence[int]) -> list[Reading | None]:
    """loss_spike at every point of a recorded series; `episodes[i]`: episodes completed at loss i."""
    finite: list[float] = []
    readings: list[Reading | None] = []
    for loss, episode in zip(losses, episodes, strict=True):
        if math.isfinite(loss):
            finite.append(loss)
        readings.append(loss_spike(finite[-LOSS_SMOOTHING_STEPS:], episode))
    return readings


# --- epsilon ---------------------------------------------------------------------------------------
def early_exploitation(epsilon: float, episode: int) -> Reading | None:
    """early_exploitation, at one finished episode (`episode` counts it): epsilon below 0.5 before episode
    10,000 (seed 004: exploiting before exploring). Point rule."""
    if episode >= EARLY_EXPLOITATION_BEFORE_EPISODE:
        return None
    return Reading(epsilon, EARLY_EXPLOITATION_EPSILON, epsilon < EARLY_EXPLOITATION_EPSILON)


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

    @property
    def tripped(self) -> bool:  # reward_decline's reading: see `first_trip`
        return self.declining


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


def reward_decline(rewards: Sequence[float]) -> RewardTrend | None:
    """reward_decline, at the newest of a series of episode rewards: the trend of the last
    REWARD_DECLINE_WINDOW finite rewards (it trips when `.declining`); None before the window is full."""
    window = [r for r in rewards if math.isfinite(r)][-REWARD_DECLINE_WINDOW:]
    return reward_trend(window) if len(window) == REWARD_DECLINE_WINDOW else None


def scan_reward_decline(rewards: Sequence[float]) -> list[RewardTrend | None]:
    """reward_decline after every episode of a recorded series, as the live monitor judges it (the
    comparison used to slide the window in 50-episode strides and could miss what the monitor flagged)."""
    finite: list[float] = []
    trends: list[RewardTrend | None] = []
    for reward in rewards:
        if math.isfinite(reward):
            finite.append(reward)
        trends.append(reward_decline(finite[-REWARD_DECLINE_WINDOW:]))
    return trends
