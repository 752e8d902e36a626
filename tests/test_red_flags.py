"""red_flags.py: each shared rule trips exactly at its threshold on hand-computed series, and the live
monitor, the go/no-go diagnosis and the comparison agree about recorded runs (one that trips each flag,
and runs that the old, separate definitions judged differently)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import red_flags
from diagnose import diagnose, flags_in_records
from health import EpisodeResult, HealthMonitor
from run_checks import FAIL, red_flag_checks
from run_log import read_jsonl
from run_records import load_run
from tm_config import Config

CONFIG = Config()
LIMIT = red_flags.GRAD_EXPLODING_FACTOR * CONFIG.gradient_clip_norm  # 1000 with the pinned clip norm 100


# --- each rule at its boundary ---------------------------------------------------------------------
def test_q_negative_trips_below_the_floor_that_negative_rewards_lower() -> None:
    assert not red_flags.q_negative(-10.0, 0.0, CONFIG).tripped
    assert red_flags.q_negative(-10.001, 0.0, CONFIG).tripped
    assert red_flags.q_negative(-10.001, 5.0, CONFIG).tripped, "positive rewards never raise the floor"
    floor = -10.0 - 0.25 / (1 - CONFIG.discount_factor)  # -93.33: the embedded track's -0.25 per step
    assert red_flags.q_floor(-0.25, CONFIG) == pytest.approx(floor)
    assert not red_flags.q_negative(-50.0, -0.25, CONFIG).tripped
    assert red_flags.q_negative(floor - 0.01, -0.25, CONFIG).tripped
    assert red_flags.q_negative(None, 0.0, CONFIG) is None
    assert not red_flags.q_negative(math.nan, 0.0, CONFIG).tripped


def test_q_out_of_bounds_trips_beyond_the_largest_discounted_return() -> None:
    bound = 1.0 / (1 - CONFIG.discount_factor)  # 333.3 for rewards within +-1
    assert not red_flags.q_out_of_bounds(bound, 1.0, CONFIG).tripped
    assert red_flags.q_out_of_bounds(bound + 0.01, 1.0, CONFIG).tripped
    assert red_flags.q_out_of_bounds(1e9, 0.0, CONFIG) is None, "no reward seen yet: nothing bounds Q"
    assert red_flags.q_extreme(5.0, -400.0, 20.0) == 400.0
    assert red_flags.q_extreme(-7.0, None, None) == 7.0
    assert red_flags.q_extreme(None, None, None) is None


def test_grad_norm_exploding_trips_above_ten_times_the_clip_norm() -> None:
    assert not red_flags.grad_norm_exploding(LIMIT, CONFIG).tripped
    assert red_flags.grad_norm_exploding(LIMIT + 0.1, CONFIG).tripped
    assert red_flags.grad_norm_exploding(None, CONFIG) is None


def test_grad_norm_zero_counts_zeros_and_missing_values_in_a_row() -> None:
    steps = red_flags.GRAD_ZERO_STEPS
    assert not red_flags.grad_norm_zero([3.0] + [0.0] * (steps - 1)).tripped
    assert red_flags.grad_norm_zero([3.0] + [0.0] * steps).tripped
    assert red_flags.grad_norm_zero([None, 0.0] * (steps // 2)).tripped, "not recorded counts as zero"
    assert not red_flags.grad_norm_zero([0.0] * steps + [1e-9]).tripped, "a tiny real gradient breaks it"
    scan = red_flags.scan_grad_norm_zero([1.0] + [0.0] * steps)
    assert [i for i, r in enumerate(scan) if r.tripped] == [steps]


def test_head_frozen_counts_zero_spread_or_a_repeated_mean_in_a_row() -> None:
    steps = red_flags.HEAD_FROZEN_STEPS
    spread, means = [1.0] + [0.0] * (steps - 1), [float(i) for i in range(steps)]
    assert not red_flags.head_frozen(spread, means).tripped
    assert red_flags.head_frozen([*spread, 0.0], [*means, 99.0]).tripped
    repeated = [1.0] * (steps + 1)
    assert red_flags.head_frozen([0.5] * (steps + 1), [2.0, *repeated[1:]]).tripped is False
    assert red_flags.head_frozen([0.5] * (steps + 1), [0.0, *repeated[1:]]).value == steps - 1
    assert red_flags.head_frozen([0.5] * (steps + 2), [0.0, *repeated]).tripped
    assert not red_flags.head_frozen([0.5] * (steps + 1), [math.nan] * (steps + 1)).tripped, "NaN != NaN"


def test_loss_spike_is_the_median_of_the_last_100_after_episode_500() -> None:
    window, after = red_flags.LOSS_SMOOTHING_STEPS, red_flags.LOSS_SPIKE_AFTER_EPISODE
    assert red_flags.loss_spike([50.0] * (window - 1), after) is None, "the window is not full yet"
    assert red_flags.loss_spike([50.0] * window, after - 1) is None, "not judged before episode 500"
    assert not red_flags.loss_spike([10.0] * window, after).tripped
    assert red_flags.loss_spike([10.01] * window, after).tripped
    # a median, not a mean: 49 huge losses among 100 do not trip it, 51 do
    assert not red_flags.loss_spike([1.0] * 51 + [1000.0] * 49, after).tripped
    assert red_flags.loss_spike([1.0] * 49 + [1000.0] * 51, after).tripped
    assert red_flags.loss_spike([20.0] * window + [math.nan] * 5, after).value == 20.0, "NaN losses skipped"
    scan = red_flags.scan_loss_spike([20.0] * 120, list(range(after - 110, after + 10)))
    assert [r is not None for r in scan].index(True) == 110 and scan[110].value == 20.0


def test_early_exploitation_below_half_before_episode_10000() -> None:
    before = red_flags.EARLY_EXPLOITATION_BEFORE_EPISODE
    assert not red_flags.early_exploitation(0.5, 1).tripped
    assert red_flags.early_exploitation(0.499, before - 1).tripped
    assert red_flags.early_exploitation(0.01, before) is None


def test_reward_decline_judges_the_last_500_rewards() -> None:
    window = red_flags.REWARD_DECLINE_WINDOW
    falling = list(np.linspace(100, 0, window))
    assert red_flags.reward_decline(falling[1:]) is None, "499 rewards: too few"
    assert red_flags.reward_decline(falling).tripped
    assert red_flags.reward_decline([*falling, math.nan]).tripped, "non-finite rewards are dropped"
    assert not red_flags.reward_decline(list(np.linspace(0, 100, window))).tripped
    scan = red_flags.scan_reward_decline([50.0] * 200 + falling)
    assert red_flags.first_trip(scan)[0] > 200 + window // 2, "the flat start hides the decline a while"


def test_reward_trend_statistics() -> None:
    falling = red_flags.reward_trend(list(np.linspace(100, 0, 500)))
    assert falling.declining and falling.slope == pytest.approx(-100 / 499) and falling.t_stat < -1e6
    assert not red_flags.reward_trend(list(np.linspace(0, 100, 500))).declining
    assert not red_flags.reward_trend([1.0, 2.0]).declining  # too short to say anything


# --- the three readers agree on recorded runs ------------------------------------------------------
EPISODES = 620  # past episode 500 (loss_spike) and 500 rewards (reward_decline)
SHARED_FLAGS = {
    "q_negative", "q_out_of_bounds", "grad_norm_zero", "grad_norm_exploding", "loss_spike", "head_frozen",
    "early_exploitation", "reward_decline",
}  # fmt: skip
COMPARED_FLAGS = {"q_negative", "loss_spike", "reward_decline", "early_exploitation"}  # the envelope's four
# The diagnosis's criteria that judge exactly one shared flag.
CRITERIA = {
    "q_not_negative": "q_negative",
    "q_within_return_bound": "q_out_of_bounds",
    "grad_norm_bounded": "grad_norm_exploding",
    "loss_not_exploding": "loss_spike",
}


def healthy_series(seed: int = 0) -> dict[str, np.ndarray]:
    """One learn step per episode: Q slowly rising, loss ~2, grad norm ~3, rewards rising, epsilon 0.9."""
    rng = np.random.default_rng(seed)
    n = np.arange(EPISODES, dtype=np.float64)
    q = 5.0 + 0.01 * n + rng.normal(0, 0.1, EPISODES)
    return {
        "reward": 20.0 + 0.05 * n + rng.normal(0, 5, EPISODES),
        "epsilon": np.full(EPISODES, 0.9),
        "loss": 2.0 + rng.normal(0, 0.2, EPISODES),
        "grad_norm": 3.0 + rng.random(EPISODES),
        "q_mean": q,
        "q_min": q - 2.0,
        "q_max": q + 2.0,
        "q_std": np.full(EPISODES, 1.5),
        "min_reward": np.zeros(EPISODES),
    }


def run_of(kind: str) -> dict[str, np.ndarray]:
    """A recorded run that trips one flag (or, for the last three, that the old definitions misjudged)."""
    s = healthy_series()
    late = slice(300, 450)
    sinking = -20.0 - 0.01 * np.arange(150)  # moving (a constant Q would be a frozen head)
    if kind == "q_negative":
        s["q_mean"][late], s["q_min"][late], s["q_max"][late] = sinking, sinking - 2, sinking + 2
    elif kind == "q_out_of_bounds":
        s["q_max"][late] = 400.0  # > 1 / (1 - 0.997)
    elif kind == "grad_norm_zero":
        s["grad_norm"][late] = 0.0
    elif kind == "grad_norm_exploding":
        s["grad_norm"][310] = LIMIT + 1.0
    elif kind == "loss_spike":
        s["loss"][450:] = 20.0  # the median passes 10 at learn step 500, judged from episode 500 on
    elif kind == "head_frozen":
        s["q_std"][late] = 0.0
    elif kind == "early_exploitation":
        s["epsilon"][200:] = 0.4
    elif kind == "reward_decline":
        s["reward"] = 200.0 - 0.3 * np.arange(EPISODES) + np.random.default_rng(1).normal(0, 5, EPISODES)
    elif kind == "loss_burst":  # 30 huge losses at the end: a 10-episode or last-window mean saw a spike
        s["loss"][-30:] = 50.0
    elif kind == "negative_rewards":  # -0.25 a step: Q at -20 is honest (floor -93), the old -10 flagged it
        s["min_reward"][:] = -0.25
        s["q_mean"][late], s["q_min"][late], s["q_max"][late] = sinking, sinking - 2, sinking + 2
    elif kind != "healthy":
        raise ValueError(kind)
    return s


LEARN_KEYS = ("loss", "grad_norm", "q_mean", "q_min", "q_max", "q_std")
RUNS = sorted(SHARED_FLAGS) + ["healthy", "loss_burst", "negative_rewards"]


def number(value: float) -> Any:
    return float(value) if math.isfinite(value) else str(float(value))  # run_log writes NaN as "nan"


def write_records(folder: Path, s: dict[str, np.ndarray]) -> Path:
    """metrics.jsonl as the loop writes it, with a step record at every learn step (one per episode)."""
    records: list[dict[str, Any]] = [{"kind": "run", "step": 0, "event": "start", "env": "trackmania"}]
    for i in range(EPISODES):
        step = 10 * (i + 1)
        learn = {key: number(s[key][i]) for key in LEARN_KEYS}
        greedy = number(s["q_mean"][i] + 25.0)  # max over actions: the envelope's Q, never below -10 here
        records.append(
            {"kind": "step", "step": step, "learn_step": i + 1, **learn, "skipped": 0.0, "q_greedy": greedy,
             "learning_rate": CONFIG.learning_rate, "min_reward": number(s["min_reward"][i]),
             "max_abs_reward": 1.0}
        )  # fmt: skip
        records.append(
            {"kind": "episode", "step": step, "episode": i + 1, "reward": number(s["reward"][i]),
             "length": 10, "epsilon": number(s["epsilon"][i]), "q_mean": learn["q_mean"], "q_greedy": greedy,
             "loss": learn["loss"]}
        )  # fmt: skip
    folder.mkdir(parents=True)
    path = folder / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def live_flags(s: dict[str, np.ndarray]) -> set[str]:
    """The flags the live monitor raises, fed the same series step by step as the loop feeds it."""
    monitor = HealthMonitor(CONFIG)
    monitor.observe_reward(1.0)
    for i in range(EPISODES):
        step = 10 * (i + 1)
        monitor.observe_reward(float(s["min_reward"][i]))
        metrics = {key: float(s[key][i]) for key in LEARN_KEYS} | {"skipped": 0.0}
        monitor.observe_learn_step(metrics, step, episode=i)  # i episodes complete during episode i + 1
        monitor.observe_episode(EpisodeResult(float(s["reward"][i]), 10), float(s["epsilon"][i]), step, i + 1)
    return {flag.name for flag in monitor.history} & SHARED_FLAGS


@pytest.mark.parametrize("kind", RUNS)
def test_the_monitor_the_diagnosis_and_the_comparison_agree(kind: str, tmp_path: Path) -> None:
    series = run_of(kind)
    path = write_records(tmp_path / kind, series)
    records = read_jsonl(path)
    live = live_flags(series)
    expected = {kind} & SHARED_FLAGS
    assert live == expected, "the run trips exactly its own flag live"

    assert set(flags_in_records(records, CONFIG)) == live
    failed = {c.name for c in diagnose(records, CONFIG) if not c.passed}
    assert {flag for criterion, flag in CRITERIA.items() if criterion in failed} == live & set(
        CRITERIA.values()
    )

    checks = red_flag_checks(load_run(str(path)))
    assert {c.name for c in checks if c.status == FAIL} & COMPARED_FLAGS == live & COMPARED_FLAGS
