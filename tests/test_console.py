"""console.py: the status line, the texts it is made of, Ctrl+C and the game's wait for the agent."""

from __future__ import annotations

import math

import pytest

import console
from console import duration


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (45, "45 s"),
        (600, "10 min"),
        (5400, "1 h 30 min"),
        (7260, "2 h 01 min"),
        (40_000, "11 h"),
        (math.inf, "?"),
        (-1, "?"),
    ],
)
def test_duration_reads_like_a_person_would_say_it(seconds, text):
    assert duration(seconds) == text


def test_fit_fields_drops_the_least_important_first_and_keeps_the_first_whole():
    fields = [(0, "aaaa"), (2, "bb"), (1, "cccc"), (2, "dd")]
    assert console.fit_fields(fields, 100) == "aaaa | bb | cccc | dd"
    assert (
        console.fit_fields(fields, 16) == "aaaa | bb | cccc"
    )  # the later of the two least important goes first
    assert console.fit_fields(fields, 11) == "aaaa | cccc"
    assert console.fit_fields(fields, 2) == "aaaa"  # the most important field is never cut


def test_pretraining_shows_its_rate_and_time_left_once_measured():
    assert console.pretraining_status(10, 2_000, 0, 1.0) == [(0, "pretraining 10/2,000 learn steps (0%)")]
    fields = console.pretraining_status(500, 2_000, 100, 10.0)  # 400 learn steps in 10 s: 40/s, 1,500 left
    assert fields == [
        (0, "pretraining 500/2,000 learn steps (25%)"),
        (1, "40.0 learn steps/s"),
        (1, "ETA 38 s"),
    ]


def test_step_latency_counts_overruns_and_reports_percentiles():
    latency = console.StepLatency(time_step=0.05, window=100)
    assert latency.summary() == "no steps yet" and latency.take_episode() == {}
    for ms in range(1, 101):  # 1..100 ms: 50 of them over the 50 ms time step
        latency.add(ms / 1000)
    assert (latency.calls, latency.overruns, latency.slowest) == (100, 50, 0.1)
    assert latency.summary() == (
        "agent time per step median 50.50 ms, p99 99.01 ms, max 100.0 ms over 100 steps; "
        "50 over the 50 ms time step"
    )
    assert latency.take_episode() == {
        "agent_ms_median": 50.5,
        "agent_ms_p99": 99.01,
        "agent_ms_max": 100.0,
        "time_step_overruns": 50,
    }
    latency.add(0.001)  # the window keeps the newest 100 and the episode restarted; the counts keep all
    assert latency.calls == 101 and len(latency.recent) == 100 and latency.recent[0] == 0.002
    assert latency.take_episode()["time_step_overruns"] == 0
    assert "percentiles of the last 100" in latency.summary() and "50 over the 50 ms" in latency.summary()


def test_the_status_line_measures_its_rate_over_a_window_and_fits_the_terminal(monkeypatch, capsys):
    clock = {"now": 1000.0}
    monkeypatch.setattr(console.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(
        console.shutil, "get_terminal_size", lambda fallback: __import__("os").terminal_size((60, 20))
    )
    progress = console.Progress(total_steps=10_000)
    progress.interactive = True
    assert progress.rate(0) is None, "no rate before it is measured"
    progress.show(1, "ep 1", force=True)
    assert "-- steps/s" in capsys.readouterr().out
    for second in range(1, 41):  # 20 steps/s for 40 s, with a 3 s pause (a reset) in the middle
        clock["now"] = 1000.0 + second + (3 if second > 20 else 0)
        progress.rate(20 * second)
    rate = progress.rate(800)
    assert rate == pytest.approx(20 * 30 / 30, rel=0.15), "over the last 30 s, not since the start"
    progress.show(800, "ep 9 | R 1.0", force=True)
    line = capsys.readouterr().out.split("\r")[-1]
    assert len(line) == 59 and "ETA" in line, "sized to the terminal, with an ETA"


def test_counts_are_said_in_words_that_agree_with_them():
    assert [console.plural(n, "episode") for n in (0, 1, 2)] == ["0 episodes", "1 episode", "2 episodes"]
    assert console.plural(1, "finish") == "1 finish" and console.plural(3, "finish") == "3 finishes"
    assert (
        console.plural(1, "CPU thread") == "1 CPU thread" and console.plural(1_234, "step") == "1,234 steps"
    )
