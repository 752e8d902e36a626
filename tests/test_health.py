"""health.py: every red flag fires on a crafted stream (once, with its evidence) and never on a healthy
run (the diagnosis is tests/test_diagnose.py, the shared rules tests/test_red_flags.py)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import health
import red_flags
from health import EpisodeResult, HealthMonitor, RedFlag
from run_log import RunLog, read_jsonl
from tm_config import Config, epsilon_at

CONFIG = Config()


def observe_episode(monitor, reward, length, epsilon, step, episode, **fields):
    """HealthMonitor.observe_episode of an episode given by its figures (health.EpisodeResult's fields)."""
    return monitor.observe_episode(EpisodeResult(reward, length, **fields), epsilon, step, episode)


def metrics(i: int = 0, **overrides: Any) -> dict[str, Any]:
    """One healthy learn step's metrics (the keys RainbowAgent.train() returns), varying with i."""
    wobble = math.sin(0.7 * i)
    values = {
        "loss": 4.0 + 0.5 * wobble,
        "grad_norm": 3.0 + wobble,
        "q_mean": 5.0 + 0.01 * i + 0.1 * wobble,
        "q_min": 1.0 + 0.01 * i,
        "q_max": 9.0 + 0.01 * i,
        "q_std": 1.5,
        "target_q_mean": 5.0 + 0.01 * i,
        "target_q_max": 9.5 + 0.01 * i,
        "td_error_mean": 1.0,
        "td_error_max": 3.0,
        "max_priority": 3.0,
        "beta": 1.0,
        "epsilon": 0.99,
        "learning_rate": 1e-4,
        "learn_step": i + 1,
        "skipped": 0.0,
        "skipped_total": 0,
    }
    values.update(overrides)
    return values


def feed(
    monitor: HealthMonitor, stream: list[dict[str, Any]], episode: int = 1, start: int = 0
) -> list[RedFlag]:
    fired: list[RedFlag] = []
    for i, m in enumerate(stream):
        fired += monitor.observe_learn_step(m, step=start + i, episode=episode)
    return fired


def run_healthy(
    reward_shape: str, seed: int, episodes: int = 1100, learn_steps_per_episode: int = 12
) -> HealthMonitor:
    """A healthy run end to end: Q rising 0 -> 20, loss 6 -> 3 with noise, grad norm 1-5, epsilon on the
    pinned schedule, per-step rewards around +1 whose episode totals are noisy and flat or rising."""
    rng = np.random.default_rng(seed)
    monitor = HealthMonitor(CONFIG)
    pool = rng.integers(0, 256, (7, 4, 64, 64), dtype=np.uint8)  # successive frames always differ
    total = episodes * learn_steps_per_episode
    noise = rng.normal(0.0, 1.0, (total, 3))
    step = 0
    for episode in range(episodes):
        target = 10.0 + (10.0 * episode / episodes if reward_shape == "rising" else 0.0)
        episode_reward = 0.0
        for _ in range(learn_steps_per_episode):
            reward = target / learn_steps_per_episode + 0.3 * noise[step, 0]
            episode_reward += reward
            monitor.observe_reward(reward)
            assert monitor.observe_frames(pool[step % 7], step, episode) == []
            progress = step / total
            q_mean = 20.0 * progress + 0.3 * noise[step, 1]
            m = metrics(
                step,
                loss=max(0.1, 6.0 - 3.0 * progress + 0.8 * noise[step, 2]),
                grad_norm=float(np.clip(3.0 + noise[step, 1], 1.0, 5.0)),
                q_mean=q_mean,
                q_min=q_mean - 3.0,
                q_max=q_mean + 3.0,
                epsilon=epsilon_at(step, CONFIG),
            )
            assert monitor.observe_learn_step(m, step, episode) == [], monitor.history
            step += 1
        flags = observe_episode(
            monitor, episode_reward, learn_steps_per_episode, epsilon_at(step, CONFIG), step, episode + 1
        )
        assert flags == [], flags
    return monitor


# --- healthy runs raise nothing --------------------------------------------------------------------
@pytest.mark.parametrize(("reward_shape", "seed"), [("flat", 0), ("flat", 1), ("flat", 2), ("rising", 3)])
def test_a_healthy_run_raises_no_flag(reward_shape: str, seed: int) -> None:
    monitor = run_healthy(reward_shape, seed)
    assert monitor.history == []
    assert monitor.active == {}
    assert monitor.max_abs_reward > 0  # observe_reward tracked the rewards


# --- each flag: fires on its stream, once, with the evidence ---------------------------------------
def only(fired: list[RedFlag], name: str) -> RedFlag:
    assert [f.name for f in fired] == [name], [f.message for f in fired]
    return fired[0]


def test_nonfinite_loss_fires_once_then_rearms() -> None:
    monitor = HealthMonitor(CONFIG)
    stream = [metrics(i) for i in range(10)] + [metrics(i, loss=math.nan, skipped=1.0) for i in range(10, 15)]
    flag = only(feed(monitor, stream, episode=3, start=100), "nonfinite_loss")
    assert (flag.step, flag.episode) == (110, 3)
    assert "loss=nan" in flag.message and "skipped" in flag.message
    assert "nonfinite_loss" in monitor.active
    # 100 clean learn steps re-arm it; the next bad step fires again
    assert feed(monitor, [metrics(i) for i in range(100)], start=200) == []
    assert "nonfinite_loss" not in monitor.active
    again = only(feed(monitor, [metrics(0, loss=math.inf)], start=400), "nonfinite_loss")
    assert again.step == 400 and "loss=inf" in again.message
    assert [f.name for f in monitor.history] == ["nonfinite_loss", "nonfinite_loss"]


def test_nonfinite_loss_fires_on_a_skipped_step_with_a_finite_loss() -> None:
    flag = only(feed(HealthMonitor(CONFIG), [metrics(0, skipped=1.0, grad_norm=math.nan)]), "nonfinite_loss")
    assert "grad_norm=nan" in flag.message


def test_nonfinite_weights() -> None:
    monitor = HealthMonitor(CONFIG)
    assert feed(monitor, [metrics(i, weights_finite=1) for i in range(5)]) == []
    flag = only(feed(monitor, [metrics(5, weights_finite=0)] * 3, start=5), "nonfinite_weights")
    assert flag.step == 5 and "weights_finite=0" in flag.message


def test_grad_norm_zero_after_100_exact_zeros() -> None:
    monitor = HealthMonitor(CONFIG)
    assert feed(monitor, [metrics(i, grad_norm=0.0) for i in range(99)]) == []
    flag = only(
        feed(monitor, [metrics(i, grad_norm=0.0) for i in range(99, 300)], start=99), "grad_norm_zero"
    )
    assert flag.step == 99 and "exactly 0 for 100 learn steps" in flag.message and "seed 003" in flag.message


def test_grad_norm_never_recorded_is_flagged_as_such() -> None:
    stream = [{k: v for k, v in metrics(i).items() if k != "grad_norm"} for i in range(120)]
    flag = only(feed(HealthMonitor(CONFIG), stream), "grad_norm_zero")
    assert "not recorded" in flag.message


def test_grad_norm_small_but_nonzero_is_healthy() -> None:
    assert feed(HealthMonitor(CONFIG), [metrics(i, grad_norm=1e-6) for i in range(300)]) == []


def test_grad_norm_exploding_above_ten_times_the_clip() -> None:
    monitor = HealthMonitor(CONFIG)
    assert feed(monitor, [metrics(0, grad_norm=999.0)]) == []  # clipped hard, but within 10x of 100
    flag = only(
        feed(monitor, [metrics(i, grad_norm=5000.0) for i in range(20)], start=7), "grad_norm_exploding"
    )
    assert flag.value == 5000 and flag.threshold == 1000 and flag.step == 7
    assert "5000" in flag.message and "1000" in flag.message


def test_q_negative() -> None:
    monitor = HealthMonitor(CONFIG)
    assert feed(monitor, [metrics(0, q_mean=-9.9)]) == []
    flag = only(
        feed(monitor, [metrics(i, q_mean=-12.5) for i in range(50)], episode=42, start=1), "q_negative"
    )
    assert (flag.step, flag.episode, flag.value) == (1, 42, -12.5)
    assert "-12.5" in flag.message and "-10" in flag.message


def test_q_out_of_bounds_needs_a_reward_and_uses_the_largest() -> None:
    monitor = HealthMonitor(CONFIG)
    big_q = [metrics(i, q_max=500.0) for i in range(10)]
    assert feed(monitor, big_q) == []  # no reward seen yet: no bound to compare with
    for reward in (0.5, -1.0, 0.2):
        monitor.observe_reward(reward)
    assert monitor.max_abs_reward == 1.0
    flag = only(feed(monitor, big_q, start=10), "q_out_of_bounds")
    assert flag.value == 500.0 and flag.threshold == pytest.approx(1.0 / (1 - 0.997))
    assert "no discounted return can be that large" in flag.message and "333" in flag.message


def test_q_out_of_bounds_with_a_given_reward_bound() -> None:
    monitor = HealthMonitor(CONFIG, max_abs_reward=10.0)
    monitor.observe_reward(1000.0)  # a given bound is not widened by what is observed
    assert feed(monitor, [metrics(0, q_min=-3000.0)]) == []  # 3000 < 10 / 0.003 = 3333
    assert only(feed(monitor, [metrics(1, q_min=-4000.0)]), "q_out_of_bounds").value == 4000.0


def test_loss_spike_only_after_episode_500_and_not_on_one_spike() -> None:
    assert feed(HealthMonitor(CONFIG), [metrics(i, loss=12.0) for i in range(200)], episode=499) == []
    monitor = HealthMonitor(CONFIG)
    one_spike = [metrics(i, loss=1000.0 if i == 150 else 3.0) for i in range(300)]
    assert feed(monitor, one_spike, episode=800) == []
    rising = [metrics(i, loss=3.0) for i in range(100)] + [metrics(i, loss=15.0) for i in range(100, 400)]
    flag = only(feed(monitor, rising, episode=600, start=1000), "loss_spike")
    assert flag.episode == 600 and flag.value == 15.0
    assert 1000 + 150 <= flag.step <= 1000 + 160  # once more than half of the last 100 steps are above 10
    assert "median loss over the last 100 learn steps" in flag.message and "after episode 500" in flag.message


def test_head_frozen_zero_initialised_output() -> None:
    dead = [metrics(i, q_mean=0.0, q_min=0.0, q_max=0.0, q_std=0.0) for i in range(250)]
    flag = only(feed(HealthMonitor(CONFIG), dead, start=10), "head_frozen")
    assert flag.step == 10 + 99 and "q_std=0" in flag.message and "seed 003" in flag.message


def test_head_frozen_saturated_output_with_some_spread() -> None:
    saturated = [metrics(i, q_mean=0.9, q_std=0.2) for i in range(150)]  # seed 000: pinned at the bound
    flag = only(feed(HealthMonitor(CONFIG), saturated), "head_frozen")
    assert "q_mean=0.9" in flag.message


def test_observations_frozen() -> None:
    monitor = HealthMonitor(CONFIG)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 64, 64), dtype=np.uint8)
    fired = []
    for step in range(250):
        fired += monitor.observe_frames(frames, step, episode=5)  # the same buffer, unchanged
    flag = only(fired, "observations_frozen")
    assert (flag.step, flag.episode) == (100, 5)
    assert "byte-identical for 100 consecutive steps" in flag.message
    # the buffer is reused by the caller: a change in place counts as a new frame and clears the flag
    frames[-1, 0, 0] ^= 1
    assert monitor.observe_frames(frames, 250, 5) == []
    assert "observations_frozen" not in monitor.active
    fired = []
    for step in range(251, 400):
        fired += monitor.observe_frames(frames, step, episode=6)
    assert only(fired, "observations_frozen").step == 350


def test_early_exploitation() -> None:
    monitor = HealthMonitor(CONFIG)
    assert observe_episode(monitor, 10.0, 100, 0.9, step=10_000, episode=100) == []
    flag = only(observe_episode(monitor, 10.0, 100, 0.45, step=20_000, episode=101), "early_exploitation")
    assert (flag.step, flag.episode) == (20_000, 101)
    assert "0.450" in flag.message and "10,000" in flag.message and "average 198 steps" in flag.message
    assert observe_episode(monitor, 10.0, 100, 0.44, step=20_100, episode=102) == []  # once
    late = HealthMonitor(CONFIG)
    assert observe_episode(late, 10.0, 100, 0.3, step=2_000_000, episode=10_001) == []


def test_reward_decline_fires_once_and_not_on_a_flat_run() -> None:
    rng = np.random.default_rng(0)
    monitor = HealthMonitor(CONFIG)
    fired = []
    for episode in range(1, 701):
        reward = (100.0 if episode <= 200 else 100.0 - 0.15 * (episode - 200)) + rng.normal(0, 15)
        fired += observe_episode(monitor, reward, 200, 0.9, step=200 * episode, episode=episode)
    flag = only(fired, "reward_decline")
    assert 500 <= flag.episode <= 700 and flag.value < 0
    assert "last 500 episodes" in flag.message and "t=" in flag.message and "< first 100" in flag.message
    flat = HealthMonitor(CONFIG)
    for episode in range(1, 3001):
        assert observe_episode(flat, 50 + rng.normal(0, 20), 200, 0.9, 200 * episode, episode) == []


def test_red_flag_event_round_trips_through_the_run_log(tmp_path: Path) -> None:
    monitor = HealthMonitor(CONFIG)
    flag = only(feed(monitor, [metrics(0, loss=math.nan, skipped=1.0)]), "nonfinite_loss")
    log = RunLog(tmp_path)
    log.write("event", flag.step, **flag.as_event())
    log.close()
    (record,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert record["kind"] == "event" and record["level"] == "red_flag" and record["name"] == "nonfinite_loss"
    assert record["value"] == "nan" and record["message"] == flag.message


def test_flags_fire_once_each_in_a_mixed_divergence() -> None:
    monitor = HealthMonitor(CONFIG)
    monitor.observe_reward(1.0)
    stream = [metrics(i, q_mean=-50.0 * i, q_min=-60.0 * i, q_max=0.0, loss=20.0) for i in range(400)]
    fired = feed(monitor, stream, episode=700)
    assert Counter(f.name for f in fired) == {"q_negative": 1, "q_out_of_bounds": 1, "loss_spike": 1}


def test_a_car_standing_still_does_not_count_as_frozen_observations() -> None:
    monitor = HealthMonitor(Config())
    still = np.full((4, 64, 64), 90, np.uint8)
    fired = [f for step in range(300) for f in monitor.observe_frames(still, step, 0, speed=0.0)]
    assert fired == [], "same picture while stopped is normal"
    moving = [f for step in range(300, 450) for f in monitor.observe_frames(still, step, 0, speed=80.0)]
    assert [f.name for f in moving] == ["observations_frozen"], "same picture at 80 km/h is a frozen game"


def test_q_floor_moves_down_with_negative_rewards_only() -> None:
    config = Config()
    assert red_flags.q_floor(0.0, config) == -10.0
    assert red_flags.q_floor(5.0, config) == -10.0, "TrackMania's non-negative rewards keep the seed's -10"
    assert red_flags.q_floor(-0.25, config) == pytest.approx(-10.0 - 0.25 / 0.003)
    monitor = HealthMonitor(config)
    monitor.observe_reward(-0.25)
    base = {"loss": 1.0, "grad_norm": 1.0, "q_std": 1.0, "q_min": -60.0, "q_max": 0.0, "skipped": 0.0}
    assert not [
        f for f in monitor.observe_learn_step({**base, "q_mean": -50.0}, 1, 0) if f.name == "q_negative"
    ]
    fired = monitor.observe_learn_step({**base, "q_mean": -200.0}, 2, 0)
    assert "q_negative" in [f.name for f in fired]


# --- demonstrations and the game's own red flags (issues 13 and 17) --------------------------------------
def test_demo_dominance_fires_when_demos_carry_the_loss_and_own_returns_stall() -> None:
    from health import DEMO_WINDOW_EPISODES

    monitor = HealthMonitor(Config())
    fired: list[RedFlag] = []
    for step in range(50):
        fired += monitor.observe_sources({"demo_loss_share": 0.8, "agent_q": 1.0, "demo_q": 1.2}, step, 0)
    for episode in range(1, DEMO_WINDOW_EPISODES + 1):  # flat, noisy own returns
        fired += observe_episode(monitor, 100.0 + (episode % 3), 500, 0.9, 500 * episode, episode)
    flag = only(fired, "demo_dominance")
    assert "80% of the loss" in flag.message and "seed 002" in flag.message
    rising = HealthMonitor(Config())
    for step in range(50):
        rising.observe_sources({"demo_loss_share": 0.8, "agent_q": 1.0, "demo_q": 1.2}, step, 0)
    flags = []
    for episode in range(1, DEMO_WINDOW_EPISODES + 1):  # the agent's own returns climb: not dominance
        flags += observe_episode(rising, 10.0 * episode, 500, 0.9, 500 * episode, episode)
    assert not [f for f in flags if f.name == "demo_dominance"]


def test_agent_q_below_demo_needs_a_wide_and_lasting_gap() -> None:
    from health import DEMO_Q_STEPS

    monitor = HealthMonitor(Config())
    early = []
    for step in range(DEMO_Q_STEPS):  # the agent's random early play is worth less: not a flag
        early += monitor.observe_sources({"demo_loss_share": 0.3, "agent_q": 0.7, "demo_q": 1.7}, step, 0)
    assert not early
    fired = []
    for step in range(DEMO_Q_STEPS, 3 * DEMO_Q_STEPS):
        fired += monitor.observe_sources({"demo_loss_share": 0.3, "agent_q": -5.0, "demo_q": 3.0}, step, 0)
    flag = only(fired, "agent_q_below_demo")
    assert "far below the demonstrations'" in flag.message


def test_race_flags_no_progress_implausible_finish_and_stale_observations() -> None:
    monitor = HealthMonitor(Config(no_progress_streak=3))
    fired = []
    for episode in range(1, 4):
        fired += observe_episode(monitor, 0.0, 81, 0.9, 81 * episode, episode, progress=0)
    assert only(fired, "no_progress").value == 3.0
    fired = observe_episode(
        monitor, 100.0, 2, 0.9, 300, 4, finished=True, race_time=0.1, min_finish_seconds=0.36
    )
    assert (
        "finished in 0.10 s, faster than the track can be driven" in only(fired, "implausible_finish").message
    )
    fired = observe_episode(monitor, 5.0, 100, 0.9, 400, 5, progress=50, timeouts=11)
    assert "11 of episode 5's 100 time steps timed out" in only(fired, "stale_observations").message
    race = {"finished": True, "race_time": 5.0, "min_finish_seconds": 0.36}
    quiet = observe_episode(monitor, 5.0, 100, 0.9, 500, 6, progress=50, timeouts=10, **race)
    assert not quiet, "10% is the limit, 5 s is a plausible finish, progress was made"


def test_stale_observations_shows_every_stale_episode_at_most_once_a_minute_and_names_the_measured_cause():
    clock = [0.0]
    monitor = HealthMonitor(Config(), clock=lambda: clock[0])
    shown = []
    for episode in range(1, 13):  # one stale episode every 20 s, the agent too slow
        clock[0] = 20.0 * episode
        fired = observe_episode(monitor, 5.0, 100, 0.9, 100 * episode, episode, progress=50, timeouts=30)
        shown += [(episode, flag) for flag in fired if flag.name == "stale_observations"]
    assert [episode for episode, _ in shown] == [1, 4, 7, 10]  # 0, 60, 120, 180 s later: never more often
    assert "the cause is the agent (it took longer than a time step" in shown[0][1].message
    assert "the game's telemetry kept up" in shown[0][1].message
    # The plugin delivered 10 frames/s and the agent waited for them most of the episode: the game's fault.
    clock[0] += 61.0
    fired = observe_episode(
        monitor, 5.0, 100, 0.9, 2000, 13, progress=50, timeouts=60,
        telemetry_fps=10.2, telemetry_wait_share=0.45,
    )  # fmt: skip
    message = only(fired, "stale_observations").message
    assert "60 of episode 13's 100 time steps timed out (60% > 10%)" in message
    assert "the cause is the game: its telemetry came at ~10 frames/s" in message
    assert (
        "the agent waited for it 45% of the episode" in message and "raise the game's frame rate" in message
    )


def test_sustained_staleness_fires_after_five_mostly_stale_episodes_and_is_a_game_flag():
    monitor = HealthMonitor(Config(), clock=lambda: 0.0)
    names = []
    for episode, timeouts in enumerate([60, 70, 20, 80, 90, 60, 70], start=1):
        fired = observe_episode(
            monitor, 5.0, 100, 0.9, 100 * episode, episode, progress=50, timeouts=timeouts
        )
        names.append([flag.name for flag in fired if flag.name == "stale_observations_sustained"])
    # The mean of the last 5 shares: 0.64 at episode 5 (first full window), fired once, not again while on.
    assert names == [[], [], [], [], ["stale_observations_sustained"], [], []]
    flag = monitor.active["stale_observations_sustained"]
    assert flag.value == pytest.approx(0.64) and "of the last 5 episodes timed out" in flag.message
    assert {"implausible_finish", "stale_observations_sustained"} == health.GAME_FLAGS
    assert not health.GAME_FLAGS & health.FATAL_FLAGS  # stop stops on them; rollback never rolls back
    quiet = HealthMonitor(Config(), clock=lambda: 0.0)
    for episode in range(1, 10):  # 40% of every episode: stale, but not most of the data
        fired = observe_episode(quiet, 5.0, 100, 0.9, 100 * episode, episode, progress=50, timeouts=40)
        assert all(flag.name != "stale_observations_sustained" for flag in fired)
