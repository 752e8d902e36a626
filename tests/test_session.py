"""session.py: which checkpoint is best, the steps held for a verdict, race times, the status line; each on a
Session opened as a run opens it (the embedded track's name, inline, the suite's small network)."""

from __future__ import annotations

import pytest
from conftest import FAST_ASSIGNMENTS

import cli
from console import Progress, race_summary
from health import EpisodeResult
from run_state import RunState
from session import Session


@pytest.fixture
def open_session(tmp_path):
    """Opens Sessions as a run does (each in its own run folder) and closes them after the test; the parts
    a test replaces (the learner, the log) are put back first."""
    opened: list[tuple[Session, object, object]] = []

    def open_one() -> Session:
        args = ["--checkpoint-root", str(tmp_path), "--run-name", f"s{len(opened)}", "--no-wandb"]
        args += ["--device", "cpu", "--learner", "inline", *sum((["--set", a] for a in FAST_ASSIGNMENTS), [])]
        session = Session(cli.parse_args(args), "embedded", "inline")
        opened.append((session, session.learner, session.log))
        return session

    yield open_one
    for session, learner, log in opened:
        session.learner, session.log = learner, log
        session.close()


def test_best_follows_the_mean_reward_until_the_first_finish_then_the_race_time(open_session):
    session = open_session()
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

    def status_field(self) -> str | None:
        return f"lag {self.lag}" if self.beside else None


def held_session(open_session, verdict_steps: int) -> Session:
    session = open_session()
    session.learner, session.verdict_steps = Recorder(), verdict_steps  # the hand-over alone
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


def test_without_checks_every_step_reaches_the_learner_at_once(open_session):
    session = held_session(open_session, 0)
    drive(session, [2, 1])
    assert session.learner.calls == [("episode", 0), ("step", 1), ("step", 2), ("episode", 1), ("step", 3)]
    assert session.run.step == 3 and not session.quarantine


def test_held_steps_reach_the_learner_in_order_once_old_enough_or_when_the_run_ends_well(open_session):
    session = held_session(open_session, 2)
    drive(session, [3, 2])
    # 5 steps taken, the newest 2 (and the episode start before them) still held.
    assert session.learner.calls == [("episode", 0), ("step", 1), ("step", 2), ("step", 3)]
    assert session.quarantined_steps == 2 and session.run.step == 5
    session.release_quarantine()
    assert session.learner.calls[4:] == [("episode", 1), ("step", 4), ("step", 5)] and not session.quarantine


def test_a_condemned_lie_is_dropped_with_its_episode_start_and_the_older_held_steps_are_kept(open_session):
    session = held_session(open_session, 4)
    drive(session, [3, 2])  # held: steps 2 and 3, the episode start, steps 4 and 5
    assert session.drop_quarantine(2) == 2  # steps 4 and 5 were the lie
    assert session.learner.calls == [("episode", 0), ("step", 1), ("step", 2), ("step", 3)]
    assert session.run.step == 3 and session.quarantined_steps == 0
    session = held_session(open_session, 4)
    drive(session, [3, 2])
    assert session.drop_quarantine(0) == 0  # a fault caught in the step it began: all held steps are true
    assert [c for c in session.learner.calls if c[0] == "step"] == [("step", n) for n in range(1, 6)]
    session = held_session(open_session, 4)
    drive(session, [3, 2])
    assert session.drop_quarantine(50) == 4  # a longer lie than was held: every held step goes
    assert session.run.step == 1 and session.learner.calls == [("episode", 0), ("step", 1)]


def test_a_checkpoint_counts_only_the_steps_handed_to_the_learner(open_session):
    session = held_session(open_session, 2)
    drive(session, [5])
    assert session._checkpoint_run()["step"] == 3 and session.run.step == 5


# --- race times: the clock's, and only reliable ones choose best.pt ----------------------------------------
class Log:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def write(self, kind, step, **fields) -> None:
        self.records.append({"kind": kind, "step": step, **fields})


def race_session(open_session) -> Session:
    session = held_session(open_session, 0)
    session.log, session.progress = Log(), Progress(total_steps=1000)
    return session


def test_a_finish_takes_its_race_time_from_the_clock_and_one_with_timeouts_never_sets_the_best(open_session):
    session = race_session(open_session)
    session.end_episode(EpisodeResult(100.0, 60, True, 4.0, finished=True, race_time=3.2, timeouts=0))
    record = session.log.records[-1]
    assert record["race_time"] == 3.2 and record["race_time_reliable"] is True  # not 60 x 0.05 = 3.0
    session.end_episode(
        EpisodeResult(100.0, 30, True, 2.0, finished=True, race_time=1.9, timeouts=4)
    )  # a loaded PC
    record = session.log.records[-1]
    assert record["race_time"] == 1.9 and record["race_time_reliable"] is False
    run = session.run
    assert run.best_race_time == 3.2 and run.race_times == [3.2] and run.interval_race_times == [3.2]
    assert run.finishes == 2 and record["finish_rate"] == 1.0 and record["best_race_time"] == 3.2
    assert "2 finishes in 2 episodes (100.0%), best 3.20 s" in race_summary(session.run)
    assert "(1 with time-step timeouts: no reliable race time)" in race_summary(session.run)
    session.end_episode(EpisodeResult(5.0, 40, False, 2.0, finished=False, race_time=None))
    assert (
        session.log.records[-1]["race_time"] is None and session.log.records[-1]["race_time_reliable"] is None
    )
    # A simulator has no clock of its own: its steps are exactly one time step apart.
    session.end_episode(EpisodeResult(100.0, 50, True, 0.5, finished=True))
    assert session.log.records[-1]["race_time"] == pytest.approx(2.5) and run.best_race_time == 2.5
    again = RunState.from_checkpoint(run.checkpoint_fields())
    assert again.unreliable_finishes == 1 and again.finishes == 3


# --- what a person sees on the terminal (issue 27) ----------------------------------------------------------
def status_line(open_session, monkeypatch, capsys, columns: int, beside: bool = True) -> str:
    import os

    import console

    session = race_session(open_session)  # opened first: its command line is parsed at the real width
    monkeypatch.setattr(console.shutil, "get_terminal_size", lambda fallback: os.terminal_size((columns, 24)))
    clock = {"now": 1000.0}
    monkeypatch.setattr(console.time, "perf_counter", lambda: clock["now"])
    session.progress = Progress(total_steps=10_000_000)
    session.progress.interactive = True
    session.progress.restart_rate(1_234_480)
    session.learner.beside = beside
    session.recent_returns.extend([-35.2, 40.0, 12.5])
    session.run.step, session.run.episode, session.run.best_race_time = 1_234_567, 1_233, 48.25
    session.run.time_step_timeouts, session.last_metrics = 1_234, {"loss": 0.2345, "q_mean": 12.3456}
    for second in range(1, 11):  # 10 s at 8.7 steps/s: a rate and an ETA (280 h) to show
        clock["now"] = 1000.0 + second
        session.progress.rate(1_234_480 + int(8.7 * second))
    capsys.readouterr()
    session.status(-139.25)
    return capsys.readouterr().out.split("\r")[-1].rstrip()


FIELDS = ["step 1,234,567/10M (12.3%)", "ETA ", "steps/s", "ep 1,234", "R10 5.8", "R -139.2",
          "best 48.25 s", "timeouts 1,234", "eps ", "loss 0.234", "Q 12.3", "lag 0"]  # fmt: skip


@pytest.mark.parametrize("columns", [80, 120, 200])
def test_the_status_line_fits_the_terminal_by_leaving_out_whole_fields(
    open_session, monkeypatch, capsys, columns
):
    line = status_line(open_session, monkeypatch, capsys, columns)
    assert len(line) <= columns - 1, line
    pieces = line.split(" | ")

    # Every piece is one whole field, in order; nothing is cut mid-field.
    def field_of(piece: str) -> int:
        if piece.endswith(" steps/s"):
            return FIELDS.index("steps/s")
        return next(i for i, field in enumerate(FIELDS) if piece.startswith(field))

    positions = [field_of(piece) for piece in pieces]
    assert positions == sorted(positions), line
    # 80 columns keep the step, the ETA, the rate, the episode and the mean return of the last 10.
    assert positions[:5] == [0, 1, 2, 3, 4], line
    if columns == 200:
        assert len(pieces) == len(FIELDS), line


def test_each_finished_episode_gets_a_line_with_the_mean_of_the_last_ten(open_session, monkeypatch, capsys):
    import session as session_module

    clock = {"now": 1000.0}
    monkeypatch.setattr(session_module.time, "perf_counter", lambda: clock["now"])
    session = race_session(open_session)
    session.progress = Progress(total_steps=100_000)
    capsys.readouterr()
    for episode in range(12):
        clock["now"] += 5.0  # long episodes: one line each
        session.end_episode(EpisodeResult(float(episode), 1000, False, 5.0))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("episode")]
    assert len(lines) == 12
    assert lines[-1] == "episode 12: return 11.0 in 1,000 steps | mean of the last 10 6.5"
    clock["now"] += 3.0
    session.end_episode(EpisodeResult(100.0, 60, True, 3.0, finished=True, race_time=3.21, timeouts=2))
    assert capsys.readouterr().out.strip().endswith("| finished in 3.21 s (timeouts: unreliable)")
    for _ in range(5):  # 5 short episodes within a second: one line for them all
        clock["now"] += 0.2
        session.end_episode(EpisodeResult(1.0, 20, False, 0.2))
    clock["now"] += 2.0
    session.end_episode(EpisodeResult(2.0, 20, False, 0.2))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("episode")]
    assert lines == ["episodes 14-19: return 2.0 in 20 steps | mean of the last 10 13.7"], lines
