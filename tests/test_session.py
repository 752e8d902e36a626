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


# --- the quarantine of steps a game's checks may still condemn (issue 24) ----------------------------------
class Recorder:
    """The learner side of a Session: it records what was handed over, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.lag = 0

    def start_episode(self, frames, car) -> None:
        self.calls.append(("episode", int(car[0])))

    def add(self, action, reward, terminated, truncated, frame, car) -> None:
        self.calls.append(("step", int(action)))


def held_session(verdict_steps: int) -> Session:
    import collections

    from health import HealthMonitor
    from tm_config import Config

    session = Session.__new__(Session)  # no run folder, no process: the hand-over alone
    session.run, session.learner, session.monitor = RunState(), Recorder(), HealthMonitor(Config())
    session.verdict_steps, session.quarantine, session.quarantined_steps = (
        verdict_steps,
        collections.deque(),
        0,
    )
    return session


def drive(session: Session, episodes: list[int]) -> None:
    """Episodes of the given lengths; step actions count up from 1 across the run."""
    import numpy as np

    action = 0
    for number, length in enumerate(episodes):
        session.start_episode(np.zeros((4, 64, 64), np.uint8), np.array([number, 0.0, 0.0], np.float32))
        for _ in range(length):
            action += 1
            session.store_step(
                action, 0.1, False, False, np.zeros((4, 64, 64), np.uint8), np.zeros(3, np.float32)
            )


def test_without_checks_every_step_reaches_the_learner_at_once():
    session = held_session(0)
    drive(session, [2, 1])
    assert session.learner.calls == [("episode", 0), ("step", 1), ("step", 2), ("episode", 1), ("step", 3)]
    assert session.run.step == 3 and not session.quarantine


def test_held_steps_reach_the_learner_in_order_once_old_enough_or_when_the_run_ends_well():
    session = held_session(2)
    drive(session, [3, 2])
    # 5 steps taken, the newest 2 (and the episode start before them) still held.
    assert session.learner.calls == [("episode", 0), ("step", 1), ("step", 2), ("step", 3)]
    assert session.quarantined_steps == 2 and session.run.step == 5
    session.release_quarantine()
    assert session.learner.calls[4:] == [("episode", 1), ("step", 4), ("step", 5)] and not session.quarantine


def test_a_condemned_lie_is_dropped_with_its_episode_start_and_the_older_held_steps_are_kept():
    session = held_session(4)
    drive(session, [3, 2])  # held: steps 2 and 3, the episode start, steps 4 and 5
    assert session.drop_quarantine(2) == 2  # steps 4 and 5 were the lie
    assert session.learner.calls == [("episode", 0), ("step", 1), ("step", 2), ("step", 3)]
    assert session.run.step == 3 and session.quarantined_steps == 0
    session = held_session(4)
    drive(session, [3, 2])
    assert session.drop_quarantine(0) == 0  # a fault caught in the step it began: all held steps are true
    assert [c for c in session.learner.calls if c[0] == "step"] == [("step", n) for n in range(1, 6)]
    session = held_session(4)
    drive(session, [3, 2])
    assert session.drop_quarantine(50) == 4  # a longer lie than was held: every held step goes
    assert session.run.step == 1 and session.learner.calls == [("episode", 0), ("step", 1)]


def test_a_checkpoint_counts_only_the_steps_handed_to_the_learner():
    session = held_session(2)
    drive(session, [5])
    session.actor = type("A", (), {"agent": type("G", (), {"acting_streams": lambda self: {}})()})()
    session.config = __import__("tm_config").Config()
    assert session._checkpoint_run()["step"] == 3 and session.run.step == 5


# --- race times: the clock's, and only reliable ones choose best.pt ----------------------------------------
class Log:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def write(self, kind, step, **fields) -> None:
        self.records.append({"kind": kind, "step": step, **fields})


def race_session() -> Session:
    from tm_config import Config

    session = held_session(0)
    session.config, session.log, session.policy_ages = Config(), Log(), []
    session.actor = type("A", (), {"epsilon": 0.5})()
    session.last_metrics, session.episode_lag_max, session.episode_wait = {}, 0, 0.0
    return session


def test_a_finish_takes_its_race_time_from_the_clock_and_one_with_timeouts_never_sets_the_best():
    session = race_session()
    session.end_episode(100.0, 60, True, 4.0, finished=True, race_time=3.2, timeouts=0)
    record = session.log.records[-1]
    assert record["race_time"] == 3.2 and record["race_time_reliable"] is True  # not 60 x 0.05 = 3.0
    session.end_episode(100.0, 30, True, 2.0, finished=True, race_time=1.9, timeouts=4)  # a loaded PC
    record = session.log.records[-1]
    assert record["race_time"] == 1.9 and record["race_time_reliable"] is False
    run = session.run
    assert run.best_race_time == 3.2 and run.race_times == [3.2] and run.interval_race_times == [3.2]
    assert run.finishes == 2 and record["finish_rate"] == 1.0 and record["best_race_time"] == 3.2
    assert "2 finishes in 2 episodes (100.0%), best 3.20 s" in session.race_summary()
    assert "(1 with time-step timeouts: no reliable race time)" in session.race_summary()
    session.end_episode(5.0, 40, False, 2.0, finished=False, race_time=None)
    assert (
        session.log.records[-1]["race_time"] is None and session.log.records[-1]["race_time_reliable"] is None
    )
    # A simulator has no clock of its own: its steps are exactly one time step apart.
    session.end_episode(100.0, 50, True, 0.5, finished=True)
    assert session.log.records[-1]["race_time"] == pytest.approx(2.5) and run.best_race_time == 2.5
    again = RunState.from_checkpoint(run.checkpoint_fields())
    assert again.unreliable_finishes == 1 and again.finishes == 3
