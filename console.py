"""The console of a run: the status line (Progress) and the texts it is made of, the final summary's
table, Ctrl+C (StopRequest) and the game's wait for the agent at each step (StepLatency).

Shared by the single-PC loop (env_tm.py), the scale-out roles (distributed.py), the session and --watch; it
imports no torch.
"""

from __future__ import annotations

import collections
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np


def fmt(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def duration(seconds: float) -> str:
    """A rough human duration: 45 s, 12 min, 3 h 05 min."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    hours, minutes = divmod(int(seconds // 60), 60)
    return f"{hours} h" if hours >= 10 else f"{hours} h {minutes:02d} min"


def pretraining_status(done: int, total: int, first: int, elapsed: float) -> list[tuple[int, str]]:
    """The status line's fields while pretraining: learn steps done, their rate and the time left (once
    a few seconds are measured; `first` is where this sitting started)."""
    fields = [(0, f"pretraining {done:,}/{total:,} learn steps ({100 * done / total:.0f}%)")]
    if elapsed >= Progress.RATE_SETTLE and done > first:
        rate = (done - first) / elapsed
        fields += [(1, f"{rate:.1f} learn steps/s"), (1, f"ETA {duration((total - done) / rate)}")]
    return fields


def table(title: str, rows: Sequence[tuple[str, str]]) -> str:
    """A short two-column table: the title, then one indented `label  text` line per row."""
    width = max((len(label) for label, _ in rows), default=0)
    return "\n".join([title, *(f"  {label.ljust(width)}  {text}" for label, text in rows)])


def plural(count: int, noun: str) -> str:
    """`1 episode`, `2 episodes`, `3 finishes`."""
    return f"{count:,} {noun}{'' if count == 1 else 'es' if noun.endswith(('s', 'sh', 'ch', 'x')) else 's'}"


def compact(count: int) -> str:
    """A round count in few characters (10M, 60k), any other one in full (1,234,567)."""
    for size, suffix in ((1_000_000, "M"), (1_000, "k")):
        if count >= size and count % size == 0:
            return f"{count // size:,}{suffix}"
    return f"{count:,}"


def fit_fields(fields: Sequence[tuple[int, str]], width: int) -> str:
    """The fields joined by " | ", leaving out the least important (highest priority number, the later of
    equals) until the line fits `width`; the most important one alone is kept whatever its length."""
    kept = list(fields)
    while len(kept) > 1 and len(" | ".join(text for _, text in kept)) > width:
        worst = max(range(len(kept)), key=lambda i: (kept[i][0], i))
        del kept[worst]
    return " | ".join(text for _, text in kept)


# One line per finished episode, at most one per this many seconds (short episodes then share a line).
EPISODE_LINE_SECONDS = 2.0


# --- the status line --------------------------------------------------------------------------------------
class Progress:
    """A live status line: rewritten in place on a terminal (sized to it), one line every 30 s otherwise.
    Steps/s is measured over the last `RATE_WINDOW` seconds, so it neither starts at a meaningless first
    figure nor drops at every episode reset; the ETA comes from it."""

    RATE_WINDOW = 30.0
    RATE_SETTLE = 3.0  # seconds of measurement before a rate is shown

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.interactive = sys.stdout.isatty()
        self.interval = 1.0 if self.interactive else 30.0
        self.last_print = 0.0
        self.restart_rate(0)

    def restart_rate(self, step: int) -> None:
        """Measure steps/s from here (after a resume or a rollback the step count jumps)."""
        self.samples: collections.deque[tuple[float, int]] = collections.deque([(time.perf_counter(), step)])

    def rate(self, step: int) -> float | None:
        """Steps per second over the last RATE_WINDOW seconds; None until RATE_SETTLE seconds are measured."""
        now = time.perf_counter()
        if now - self.samples[-1][0] >= 0.5:
            self.samples.append((now, step))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.RATE_WINDOW:
            self.samples.popleft()
        start_time, start_step = self.samples[0]
        if now - start_time < self.RATE_SETTLE:
            return None
        return (step - start_step) / (now - start_time)

    def show(self, step: int, fields: str | Sequence[tuple[int, str]], force: bool = False) -> None:
        """The status line: progress, rate and ETA, then `fields` ((priority, text) pairs, 0 the most
        important, or one text). On a terminal the line fits its width: the least important fields are
        left out whole, never cut mid-field."""
        now = time.perf_counter()
        if not force and now - self.last_print < self.interval:
            return
        self.last_print = now
        rate = self.rate(step)
        parts = [(0, f"step {step:,}/{compact(self.total_steps)} ({100 * step / self.total_steps:.1f}%)")]
        if rate:
            parts.append((1, f"ETA {duration((self.total_steps - step) / rate)}"))
        parts.append((1, "-- steps/s" if rate is None else f"{rate:.1f} steps/s"))
        parts += [(2, fields)] if isinstance(fields, str) else list(fields)
        if self.interactive:
            width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
            line = fit_fields(parts, width)
            print("\r" + line[:width].ljust(width), end="", flush=True)
        else:
            print(fit_fields(parts, sys.maxsize), flush=True)  # a log file: every field

    def message(self, text: str) -> None:
        """A permanent line (an event), not overwritten by the status line."""
        print(("\n" if self.interactive else "") + text, flush=True)


# --- stopping ---------------------------------------------------------------------------------------------
class StopRequest:
    """Ctrl+C (or a termination request: `kill`, a shutdown, Ctrl+Break on Windows) asks the loop to stop
    at the end of the current step, never in the middle of a replay or optimizer update, which a
    checkpoint would then capture half-done. A second request aborts at once."""

    SIGNALS = tuple(
        getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGBREAK") if hasattr(signal, name)
    )

    def __init__(
        self, notice: str = "stopping after this step (Ctrl+C again to abort without saving)"
    ) -> None:
        self.requested = False
        self.notice = notice
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\n" + self.notice, flush=True)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)

    def uninstall(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()


# --- the game's view of the agent ------------------------------------------------------------------------
class StepLatency:
    """How long the game waits for the agent at each step: the share of the 50 ms time step the agent uses.

    On TrackMania a step slower than the time step is a time-step overrun: the car drives on the previous
    action meanwhile. It counts everything between two `env.step` calls: acting, handing the transition to
    the learner (or learning, inline), and any wait for a learner that fell behind.
    """

    def __init__(self, time_step: float, window: int = 100_000) -> None:
        self.time_step = time_step
        self.recent: collections.deque[float] = collections.deque(maxlen=window)
        self.episode: list[float] = []
        self.calls = 0
        self.overruns = 0  # steps slower than the whole time step
        self.slowest = 0.0

    def add(self, seconds: float) -> None:
        self.recent.append(seconds)
        self.episode.append(seconds)
        self.calls += 1
        self.overruns += seconds > self.time_step
        self.slowest = max(self.slowest, seconds)

    def take_episode(self) -> dict[str, Any]:
        """The episode's figures for its JSONL record; starts the next episode's."""
        if not self.episode:
            return {}
        seconds, self.episode = np.asarray(self.episode), []
        median, p99 = np.percentile(seconds * 1000, [50, 99])
        return {
            "agent_ms_median": round(float(median), 3),
            "agent_ms_p99": round(float(p99), 3),
            "agent_ms_max": round(float(seconds.max() * 1000), 3),
            "time_step_overruns": int((seconds > self.time_step).sum()),
        }

    def summary(self) -> str:
        if not self.calls:
            return "no steps yet"
        median, p99 = np.percentile(np.asarray(self.recent) * 1000, [50, 99])
        window = "" if self.calls == len(self.recent) else f" (percentiles of the last {len(self.recent):,})"
        return (
            f"agent time per step median {median:.2f} ms, p99 {p99:.2f} ms, max {self.slowest * 1000:.1f} ms "
            f"over {self.calls:,} steps{window}; "
            f"{self.overruns:,} over the {self.time_step * 1000:.0f} ms time step"
        )


# --- the texts of a run's status line and final summary ---------------------------------------------------
def status_fields(
    run: Any,
    recent_returns: Sequence[float],
    last_metrics: dict[str, float],
    epsilon: float,
    current: float | str,
) -> list[tuple[int, str]]:
    """The status line's fields of a run (run_state.RunState) by importance (Progress.show): the episode,
    the mean return of the last 10, `current` (the episode's return so far, or a text), the race, the
    timeouts, epsilon, the last loss and Q."""
    last = last_metrics
    fields = [(0, f"ep {run.episode + 1:,}")]
    if recent_returns:
        fields.append((1, f"R10 {np.mean(recent_returns):.1f}"))
    fields.append((2, current if isinstance(current, str) else f"R {current:.1f}"))
    if run.best_race_time is not None:
        fields.append((2, f"best {run.best_race_time:.2f} s"))
    if run.time_step_timeouts:
        fields.append((3, f"timeouts {run.time_step_timeouts:,}"))
    fields.append((3, f"eps {epsilon:.3f}"))
    fields += [(4, f"loss {fmt(last.get('loss'))}"), (4, f"Q {fmt(last.get('q_mean'))}")]
    return fields


def summary_rows(
    run: Any,
    opened: tuple[float, int, int],
    total_steps: int,
    recent_returns: Sequence[float],
    last_metrics: dict[str, float],
    epsilon: float,
    latency: StepLatency | None,
    pace: str | None,
) -> list[tuple[str, str]]:
    """A run's final summary as (label, text) rows: what this sitting did (`opened`: its start time, step
    and episode), the returns, the learning, the races, the game's wait and the learner's `pace`."""
    started, step0, episode0 = opened
    seconds = time.perf_counter() - started
    steps, episodes = run.step - step0, run.episode - episode0
    rate = steps / max(seconds, 1e-9)
    rows = [
        (
            "steps",
            f"{steps:,} this sitting ({plural(episodes, 'episode')}) in {duration(seconds)}, "
            f"{rate:.1f} steps/s; {run.step:,} of {total_steps:,} in all",
        )
    ]
    if recent_returns:
        text = f"mean of the last {len(recent_returns)} episodes {np.mean(recent_returns):.1f}"
        if math.isfinite(run.best_interval_reward):
            text += f"; best mean {run.best_interval_reward:.1f}"
        rows.append(("returns", text))
    if last_metrics:
        metrics, nan = last_metrics, math.nan
        rows.append(
            (
                "learning",
                f"{int(metrics.get('learn_step', 0)):,} learn steps; last loss "
                f"{metrics.get('loss', nan):.3g}, Q {metrics.get('q_mean', nan):.3g}; "
                f"epsilon {epsilon:.3f}",
            )
        )
    races = race_summary(run)
    if races:
        rows.append(("races", races.removeprefix("race results: ")))
    if latency is not None and latency.calls:
        rows.append(("game's wait", latency.summary()))
    if pace:
        rows.append(("learner", pace))
    if run.time_step_timeouts:
        rows.append(
            (
                "timeouts",
                f"time-step timeouts: {run.time_step_timeouts:,} over the run (each is a stale "
                "observation: see README, Troubleshooting)",
            )
        )
    return rows


def race_summary(run: Any) -> str | None:
    """The race results of a run (run_state.RunState) in one line; None before its first episode."""
    if not run.episode:
        return None
    if not run.finishes:
        return f"race results: no finish in {plural(run.episode, 'episode')}"
    text = (
        f"race results: {plural(run.finishes, 'finish')} in {plural(run.episode, 'episode')} "
        f"({100 * run.finishes / run.episode:.1f}%)"
    )
    if run.race_times:
        text += f", best {run.best_race_time:.2f} s, median {float(np.median(run.race_times)):.2f} s"
    if run.unreliable_finishes:
        text += f" ({run.unreliable_finishes:,} with time-step timeouts: no reliable race time)"
    return text
