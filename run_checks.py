"""The checks of a run, for compare_runs.py: the c643zifs envelope phase by phase (TrackMania runs), the
seed's red flags over the whole run, and the per-run verdict (PASS / FAIL / NO VERDICT).

The red flags are the live monitor's own rules (red_flags.py) applied at every episode of the run's
per-episode series, so the comparison flags what the monitor flagged (on the series it recorded).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import health
import red_flags
from run_records import RunSeries, UsageError
from tm_config import Config, ConfigError

# The reference envelope, typed out from shared/reference/c643zifs-envelope.json (reference data, kept
# here so the script works from any checkout); `--envelope PATH` reads another one.
DEFAULT_ENVELOPE: dict[str, Any] = {
    "run": "c643zifs",
    "source": "seed 004_*.txt, sections 'Expected Training Performance', 'Monitoring Checklist', 'Red Flags'",
    "x_axis": "episode",
    "phases": [
        {
            "episodes": [0, 500],
            "q_values": {"from": 0, "to": 20, "min_allowed": 0},
            "loss": {"from": 6, "to": 3},
            "epsilon": {"from": 1.0, "to": 0.95},
            "episode_reward": {"low": 0, "high": 50},
        },
        {
            "episodes": [500, 1500],
            "q_values": {"from": 20, "to": 40},
            "loss": {"low": 1, "high": 2},
            "epsilon": {"from": 0.95, "to": 0.85},
            "episode_reward": {"low": 50, "high": 100, "trend": "rising"},
        },
        {
            "episodes": [1500, 2500],
            "q_values": {"from": 40, "to": 50},
            "loss": {"around": 1.0},
            "epsilon": {"from": 0.85, "to": 0.75},
            "episode_reward": {"low": 100, "high": 150},
        },
    ],
    "red_flags": [
        {"id": "q_negative", "rule": "mean Q-value below -10 at any time"},
        {"id": "loss_spike", "rule": "loss above 10 after episode 500"},
        {"id": "reward_decline", "rule": "episode reward trending down over 500 or more episodes"},
        {"id": "early_exploitation", "rule": "epsilon below 0.5 before episode 10000"},
    ],
    "failed_run": {
        "config": "soft target update tau=0.002 every step; CosineAnnealingLR 1e-3 -> 5e-5 over 5000 "
        "episodes; epsilon 0.9 -> 0.01 over 1000 episodes",
        "trajectory": [
            {"episodes": [0, 200], "q": [0, 5], "loss": [6, 4]},
            {"episodes": [200, 400], "q": [5, 10], "loss": [4, 3]},
            {"episodes": [400, 500], "q": [10, -100], "loss": [3, 6]},
            {"episodes": [500, 600], "q": [-100, -1000], "loss": [6, 15]},
            {"episodes": [600, 700], "q": [-1000, -40000], "loss": [15, 30]},
        ],
    },
    "caveat": "Figures are as the seed reports them; its epsilon numbers contradict the original code (which "
    "reached epsilon 0.2 near 200k steps). Use them as an envelope, not ground truth.",
}


# The reference data as the project received it (shared/reference), kept in the repository.
SHARED_ENVELOPE = Path(__file__).resolve().parent / "reference" / "c643zifs-envelope.json"


# --- tolerances ------------------------------------------------------------------------------------
# The envelope is weak evidence (its own caveat: the seed's figures were never verified, and its epsilon
# numbers contradict the code), and it was measured on TrackMania: a check FAILS only on a clear
# contradiction, never on a near miss.
# Single episodes are far noisier than the envelope's phase descriptions: levels are judged on a trailing
# 25-episode mean, and a phase with fewer than 20 episodes of a metric is NO DATA.
SMOOTH_EPISODES = 25


MIN_PHASE_EPISODES = 20


# A band [low, high] is widened on each side by max(absolute, relative x the band's largest magnitude).
TOLERANCES: dict[str, tuple[float, float]] = {
    "q_values": (10.0, 0.25),  # Q [0, 20] -> [-10, 30]; [40, 50] -> [27.5, 62.5]
    "loss": (1.0, 0.5),  # loss [3, 6] -> [0, 9]; [1, 2] -> [0, 3]; ~1 -> [0, 2]
    "epsilon": (0.1, 0.0),  # the seed's epsilon figures are its weakest: +-0.1
    "episode_reward": (25.0, 0.5),  # reward [50, 100] -> [0, 150]: tracks and reward shaping differ
}


# "min_allowed" (no negative Q in episodes 0-500): the smoothed Q may dip to min_allowed - 5, half way
# to the -10 red flag, since a freshly initialised net starts near but not exactly at 0.
Q_MIN_TOLERANCE = 5.0


# envelope metric -> our series name, and the plot's panel titles
METRICS = {"episode_reward": "reward", "q_values": "q_mean", "loss": "loss", "epsilon": "epsilon"}


TITLES = {"episode_reward": "episode reward", "q_values": "Q mean", "loss": "loss", "epsilon": "epsilon"}


# --- checks ----------------------------------------------------------------------------------------
PASS, FAIL, NO_DATA = "PASS", "FAIL", "NO DATA"


@dataclass(frozen=True)
class Check:
    scope: str  # "episodes 0-500" or "whole run"
    name: str
    status: str  # PASS, FAIL or NO DATA
    measured: str
    expected: str


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` entries, NaN entries skipped; NaN where all are NaN."""
    finite = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    index = np.arange(1, len(values) + 1)
    start = np.maximum(index - window, 0)
    count = counts[index] - counts[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (sums[index] - sums[start]) / np.maximum(count, 1), np.nan)


def envelope_band(spec: dict[str, Any]) -> tuple[float, float] | None:
    if "from" in spec and "to" in spec:
        return min(spec["from"], spec["to"]), max(spec["from"], spec["to"])
    if "low" in spec or "high" in spec:
        return spec.get("low", -math.inf), spec.get("high", math.inf)
    if "around" in spec:
        return spec["around"], spec["around"]
    return None


def band_tolerance(metric: str, band: tuple[float, float]) -> float:
    absolute, relative = TOLERANCES.get(metric, (0.0, 0.0))
    magnitude = max(abs(v) for v in band if math.isfinite(v)) if any(map(math.isfinite, band)) else 0.0
    return max(absolute, relative * magnitude)


def _describe(spec: dict[str, Any], tol: float) -> str:
    if "from" in spec and "to" in spec:
        text = f"{spec['from']:g} -> {spec['to']:g}"
    elif "around" in spec:
        text = f"~{spec['around']:g}"
    else:
        text = f"[{spec.get('low', -math.inf):g}, {spec.get('high', math.inf):g}]"
    return f"{text} +-{tol:.3g}"


def _fitted_change(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares change of y across the span of x."""
    if len(x) < 3 or np.ptp(x) == 0:
        return 0.0
    slope = np.polyfit(x, y, 1)[0]
    return float(slope * np.ptp(x))


def phase_checks(run: RunSeries, phase: dict[str, Any]) -> list[Check]:
    lo, hi = phase["episodes"]
    scope = f"episodes {lo}-{hi}"
    in_phase = (run.episode >= lo) & (run.episode < hi)
    checks: list[Check] = []
    for metric, series_name in METRICS.items():
        spec = phase.get(metric)
        band = envelope_band(spec) if isinstance(spec, dict) else None
        if band is None:
            continue
        tol = band_tolerance(metric, band)
        raw = run.metric(series_name)
        smooth = rolling_mean(raw, SMOOTH_EPISODES)[in_phase]
        have = np.isfinite(raw[in_phase])
        name = metric  # checks are named in the envelope's words: q_values_level, loss_trend, ...
        enough = int(have.sum()) >= MIN_PHASE_EPISODES
        no_data = f"{int(have.sum())} episodes with {TITLES[metric]} in this phase (< {MIN_PHASE_EPISODES})"

        # level: where the smoothed metric sits in the phase
        expected = _describe(spec, tol)
        if not enough:
            checks.append(Check(scope, f"{name}_level", NO_DATA, no_data, expected))
        else:
            median = float(np.nanmedian(smooth))
            ok = band[0] - tol <= median <= band[1] + tol
            checks.append(
                Check(scope, f"{name}_level", PASS if ok else FAIL, f"median {median:.4g}", expected)
            )

        # trend: only where the envelope expects a change larger than the tolerance, or says "rising"
        direction = 0.0
        if "from" in spec and "to" in spec and abs(spec["to"] - spec["from"]) > tol:
            direction = math.copysign(1.0, spec["to"] - spec["from"])
        if spec.get("trend") == "rising":
            direction = 1.0
        if direction:
            word = "rising" if direction > 0 else "falling"
            expected = (
                f"{word}: change over the phase {'>=' if direction > 0 else '<='} {-direction * tol:+.3g}"
            )
            if not enough:
                checks.append(Check(scope, f"{name}_trend", NO_DATA, no_data, expected))
            else:
                change = _fitted_change(run.episode[in_phase][have], raw[in_phase][have])
                ok = direction * change >= -tol
                checks.append(
                    Check(
                        scope, f"{name}_trend", PASS if ok else FAIL, f"fitted change {change:+.4g}", expected
                    )
                )

        # floor: "min_allowed" (no negative Q early on)
        if "min_allowed" in spec:
            floor = spec["min_allowed"] - Q_MIN_TOLERANCE
            expected = f"{SMOOTH_EPISODES}-episode mean >= {floor:g} (min_allowed {spec['min_allowed']:g})"
            if not enough:
                checks.append(Check(scope, f"{name}_min", NO_DATA, no_data, expected))
            else:
                i = int(np.nanargmin(smooth))
                lowest, at = float(smooth[i]), int(run.episode[in_phase][i])
                checks.append(
                    Check(
                        scope,
                        f"{name}_min",
                        PASS if lowest >= floor else FAIL,
                        f"min {lowest:.4g} at episode {at:,}",
                        expected,
                    )
                )
    return checks


def _run_config(run: RunSeries) -> Config:
    """The run's config as far as this Config accepts it (the pinned one otherwise): the rules' gamma and
    clip norm."""
    known = {f.name for f in dataclasses.fields(Config)}
    try:
        return Config().with_overrides(**{k: v for k, v in run.config.items() if k in known})
    except (ConfigError, TypeError, ValueError):
        return Config()


def red_flag_checks(run: RunSeries) -> list[Check]:
    """The envelope's four red flags over the whole run: the live monitor's own rules (red_flags.py) at
    every episode of the run's per-episode series, with the live windows (the last 100 losses, the last
    500 rewards). The series are what the run recorded per episode: its Q and loss are the last learn
    step's before the episode ended (q_negative judges the mean Q, as the monitor does, not the greedy Q
    the envelope's phases compare)."""
    scope, checks = "whole run", []
    episodes = run.episode
    config = _run_config(run)

    q = run.q_monitored if run.q_monitored is not None else run.q_mean  # the Q the live monitor judged
    lows = run.min_reward if run.min_reward is not None else np.zeros(len(q))
    floor = red_flags.q_floor(float(np.min(lows, initial=0.0)), config)
    expected = f"mean Q >= {floor:g} at every episode"
    if not np.isfinite(q).any():
        checks.append(Check(scope, "q_negative", NO_DATA, "no Q data", expected))
    else:
        i = int(np.nanargmin(q))
        readings = [
            red_flags.q_negative(float(v), float(low), config) if math.isfinite(v) else None
            for v, low in zip(q, lows, strict=True)
        ]
        hit = red_flags.first_trip(readings)
        if hit:
            first = hit[0]
            measured = f"{q[first]:.4g} at episode {int(episodes[first]):,} (lowest {q[i]:.4g})"
            checks.append(Check(scope, "q_negative", FAIL, measured, expected))
        else:
            measured = f"lowest {q[i]:.4g} at episode {int(episodes[i]):,}"
            checks.append(Check(scope, "q_negative", PASS, measured, expected))

    after, window = red_flags.LOSS_SPIKE_AFTER_EPISODE, red_flags.LOSS_SMOOTHING_STEPS
    expected = (
        f"median of the last {window} losses <= {red_flags.LOSS_SPIKE_THRESHOLD:g} after episode {after}"
    )
    # An episode's loss was measured before the episode ended: episode - 1 were complete then.
    readings = red_flags.scan_loss_spike(list(run.loss), [int(e) - 1 for e in episodes])
    medians = [r.value for r in readings if r is not None]
    if not medians:
        losses = int(np.isfinite(run.loss).sum())
        why = (
            "no loss data"
            if not losses
            else f"{losses:,} losses, none after episode {after} with {window} before"
        )
        checks.append(Check(scope, "loss_spike", NO_DATA, why, expected))
    else:
        hit, peak = red_flags.first_trip(readings), max(medians)
        if hit:
            first, reading = hit
            measured = f"{reading.value:.4g} at episode {int(episodes[first]):,} (peak {peak:.4g})"
            checks.append(Check(scope, "loss_spike", FAIL, measured, expected))
        else:
            checks.append(Check(scope, "loss_spike", PASS, f"peak {peak:.4g}", expected))

    window = red_flags.REWARD_DECLINE_WINDOW
    expected = f"no {window}-episode window with t <= {red_flags.REWARD_DECLINE_T:g} and last 100 < first 100"
    trends = red_flags.scan_reward_decline(list(run.reward))
    judged = sum(trend is not None for trend in trends)
    if not judged:
        have = int(np.isfinite(run.reward).sum())
        checks.append(Check(scope, "reward_decline", NO_DATA, f"{have} episodes (< {window})", expected))
    else:
        hit = red_flags.first_trip(trends)
        if hit:
            end, trend = hit
            inside = np.flatnonzero(np.isfinite(run.reward[: end + 1]))[-window:]
            measured = (
                f"episodes {int(episodes[inside[0]]):,}-{int(episodes[inside[-1]]):,}: "
                f"slope {trend.slope:.3g}/ep (t={trend.t_stat:.1f}), "
                f"first-100 mean {trend.head_mean:.4g} -> last-100 {trend.tail_mean:.4g}"
            )
            checks.append(Check(scope, "reward_decline", FAIL, measured, expected))
        else:
            checks.append(Check(scope, "reward_decline", PASS, f"{judged} windows, none declining", expected))

    eps = run.epsilon
    limit, before = red_flags.EARLY_EXPLOITATION_EPSILON, red_flags.EARLY_EXPLOITATION_BEFORE_EPISODE
    expected = f"epsilon >= {limit:g} before episode {before:,}"
    if not np.isfinite(eps).any():
        checks.append(Check(scope, "early_exploitation", NO_DATA, "no epsilon data", expected))
    else:
        readings = [
            red_flags.early_exploitation(float(e), int(episode)) if math.isfinite(e) else None
            for e, episode in zip(eps, episodes, strict=True)
        ]
        hit = red_flags.first_trip(readings)
        if hit:
            first = hit[0]
            measured = f"{eps[first]:.3g} at episode {int(episodes[first]):,}"
            checks.append(Check(scope, "early_exploitation", FAIL, measured, expected))
        else:
            checks.append(Check(scope, "early_exploitation", PASS, f"lowest {np.nanmin(eps):.3g}", expected))

    bad = {name: count for name, count in run.nonfinite.items() if count}
    measured = ", ".join(f"{count} {name}" for name, count in bad.items()) if bad else "none"
    checks.append(Check(scope, "metrics_finite", FAIL if bad else PASS, f"non-finite: {measured}", "none"))

    if run.red_flags is not None:
        fatal = sorted({name for name in run.red_flags if name in health.FATAL_FLAGS})
        measured = ("raised: " + ", ".join(fatal)) if fatal else f"{len(run.red_flags)} recorded, none fatal"
        checks.append(
            Check(scope, "recorded_red_flags", FAIL if fatal else PASS, measured, "no fatal red flag")
        )
    return checks


def check_run(run: RunSeries, envelope: dict[str, Any]) -> list[Check]:
    """The envelope's phases (TrackMania runs and runs of unknown environment) and the seed's red flags."""
    checks = []
    for phase in envelope.get("phases", []) if run.envelope_applies else []:
        checks += phase_checks(run, phase)
    return checks + red_flag_checks(run)


def format_checks(run: RunSeries, checks: Sequence[Check]) -> list[str]:
    header = ("scope", "check", "status", "measured", "expected")
    rows = [(c.scope, c.name, c.status, c.measured, c.expected) for c in checks]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = [f"{run.label}  ({run.source}; {run.episodes:,} episodes)"]
    for row in [header, *rows]:
        lines.append(
            "  " + "  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
        )
    return lines


NO_VERDICT = "NO VERDICT"


def run_verdict(checks: Sequence[Check]) -> str:
    """FAIL when any check failed; PASS only when at least one passed and NO DATA is not the majority
    (NO DATA is never a pass: a run that was barely measured has not shown it is healthy); else NO VERDICT."""
    counts = {s: sum(c.status == s for c in checks) for s in (PASS, FAIL, NO_DATA)}
    if counts[FAIL]:
        return FAIL
    if counts[PASS] and 2 * counts[NO_DATA] <= len(checks):
        return PASS
    return NO_VERDICT


def verdict_line(run: RunSeries, checks: Sequence[Check]) -> str:
    """`<label>: PASS|FAIL|NO VERDICT (n pass, k fail, m no data)[: why]` for the summary."""
    counts = {s: sum(c.status == s for c in checks) for s in (PASS, FAIL, NO_DATA)}
    verdict = run_verdict(checks)
    line = f"{run.label}: {verdict} ({counts[PASS]} pass, {counts[FAIL]} fail, {counts[NO_DATA]} no data)"
    if verdict == FAIL:
        return line + ": " + "; ".join(f"{c.name} ({c.scope})" for c in checks if c.status == FAIL)
    if verdict == NO_VERDICT:
        return line + ": too little data to judge"
    return line


def load_envelope(path: str | None) -> dict[str, Any]:
    if path is None:
        return DEFAULT_ENVELOPE
    file = Path(path)
    try:
        envelope = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(
            f"--envelope {file}: no such file (the reference copy is {SHARED_ENVELOPE})"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"--envelope {file}: not a readable JSON file ({error})") from None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("phases"), list):
        raise UsageError(f"--envelope {file}: no 'phases' list (see {SHARED_ENVELOPE} for the format)")
    return envelope
