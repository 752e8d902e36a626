"""session.py: which checkpoint is best, the run state a checkpoint keeps, how long things take."""

from __future__ import annotations

import math

import pytest

from session import RunState, Session, duration


class BestOnly(Session):
    """A Session reduced to the run state `_is_best` reads."""

    def __init__(self) -> None:  # noqa: D107 - no run folder, no learner: only the decision
        self.run = RunState()


def test_best_follows_the_mean_reward_until_the_first_finish_then_the_race_time():
    session = BestOnly()
    run = session.run
    run.interval_rewards = [10.0, 20.0]
    assert session._is_best() and run.best_interval_reward == 15.0
    run.interval_rewards = [12.0]
    assert not session._is_best(), "a lower mean reward is not best"
    run.interval_rewards, run.interval_race_times, run.best_race_time = [5.0], [42.0], 42.0
    assert session._is_best(), "the first finish is best, whatever its reward"
    run.interval_rewards, run.interval_race_times = [900.0], []
    assert not session._is_best(), "after a finish, reward alone never makes a best"
    run.interval_race_times, run.best_race_time = [40.5, 41.0], 40.5
    assert session._is_best(), "a faster lap is best"
    run.interval_race_times = [41.0]
    assert not session._is_best(), "a slower lap is not"


def test_a_checkpoints_run_state_round_trips_and_older_checkpoints_still_load():
    run = RunState(step=1200, episode=30, best_race_time=41.5, race_times=[44.0, 41.5], time_step_timeouts=7)
    again = RunState.from_checkpoint({**run.checkpoint_fields(), "extra": 1})
    assert again.checkpoint_fields() == run.checkpoint_fields()
    old = RunState.from_checkpoint({"step": 10, "episode": 1, "best_interval_reward": -math.inf})
    assert old.race_times == [] and old.best_race_time is None and old.time_step_timeouts == 0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(45, "45 s"), (600, "10 min"), (5400, "1 h 30 min"), (7260, "2 h 01 min"), (math.inf, "?"), (-1, "?")],
)
def test_duration_reads_like_a_person_would_say_it(seconds, text):
    assert duration(seconds) == text
