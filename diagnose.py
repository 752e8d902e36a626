"""The go/no-go verdict on a short diagnostic run (`python env_tm.py --diagnose`), from its JSONL records.

`diagnose(records, config)` reads a finished run's records (see run_log.py) and answers "is this run
healthy enough to launch the long one?" as a table of criteria, in the spirit of seed 001's "success
criteria before 50K" table, adapted to a 5,000-step diagnostic run. The criteria that judge a red flag
(loss_not_exploding, q_not_negative, q_within_return_bound, grad_norm_bounded, and no_fatal_red_flags for
the rest) call the live monitor's own rules (red_flags.py) on the recorded series, so the go/no-go and the
flags the run raised agree; the other criteria ask for evidence (learning happened, values recorded and
finite, the schedules as pinned).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import red_flags
from health import FATAL_FLAGS, figure, to_float
from red_flags import (
    GRAD_EXPLODING_FACTOR,
    LOSS_SMOOTHING_STEPS,
    LOSS_SPIKE_AFTER_EPISODE,
    LOSS_SPIKE_THRESHOLD,
)
from tm_config import Config, epsilon_at

# --- go/no-go criteria of a diagnostic run (default 5,000 environment steps) -----------------------
DIAG_MIN_LEARN_STEPS = 1_000  # a 5,000-step run makes ~4,968 learn steps (learning starts at 32 stored)
DIAG_MIN_STEP_RECORDS = 5
DIAG_MAX_SKIPPED_STEPS = 10  # the loop itself stops at 100 in a row (max_consecutive_nonfinite_steps)
DIAG_LOSS_GROWTH_FACTOR = 10.0  # last-window mean loss may not exceed 10x the first-window mean
DIAG_EPSILON_TOLERANCE = 1e-6


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


@dataclass(frozen=True)
class LearnPoint:
    """One recorded learn step (a step record) and what the monitor knew when it judged it."""

    step: int
    episode: int  # episodes completed before it (the newest episode record above it in the file)
    loss: float | None
    grad_norm: float | None
    q_mean: float | None
    q_min: float | None
    q_max: float | None
    q_std: float | None
    min_reward: float  # the most negative reward seen so far (0 until one is recorded)
    max_abs_reward: float | None  # the largest |reward| seen so far; None when the run did not record it


def learn_series(records: Sequence[dict[str, Any]]) -> list[LearnPoint]:
    """The learn-step series a run recorded, in file order, as the live monitor saw it at each point."""
    points, episode, min_reward, max_abs_reward = [], 0, 0.0, None
    for record in records:
        if record.get("kind") == "episode":
            episode = int(to_float(record.get("episode")) or episode + 1)
        if record.get("kind") != "step":
            continue
        low, high = to_float(record.get("min_reward")), to_float(record.get("max_abs_reward"))
        if low is not None and math.isfinite(low):
            min_reward = min(min_reward, low)
        if high is not None and math.isfinite(high):
            max_abs_reward = high if max_abs_reward is None else max(max_abs_reward, high)
        points.append(
            LearnPoint(
                int(to_float(record.get("step")) or 0),
                episode,
                *(
                    to_float(record.get(key))
                    for key in ("loss", "grad_norm", "q_mean", "q_min", "q_max", "q_std")
                ),
                min_reward,
                max_abs_reward,
            )
        )
    return points


def flags_in_records(records: Sequence[dict[str, Any]], config: Config) -> dict[str, int]:
    """The shared red flags (red_flags.py) the recorded series trips, each with the step it first tripped
    at: the rules the live monitor applies at every learn step and episode, applied at every record."""
    points = learn_series(records)
    episodes = [r for r in records if r.get("kind") == "episode"]
    steps = [p.step for p in points]
    found: dict[str, int] = {}

    def note(name: str, readings: Sequence[Any], at: Sequence[int]) -> None:
        hit = red_flags.first_trip(readings)
        if hit is not None:
            found[name] = at[hit[0]]

    note("q_negative", [red_flags.q_negative(p.q_mean, p.min_reward, config) for p in points], steps)
    note(
        "q_out_of_bounds",
        [
            red_flags.q_out_of_bounds(
                red_flags.q_extreme(p.q_mean, p.q_min, p.q_max), p.max_abs_reward or 0.0, config
            )
            for p in points
        ],
        steps,
    )
    note("grad_norm_zero", red_flags.scan_grad_norm_zero([p.grad_norm for p in points]), steps)
    note("grad_norm_exploding", [red_flags.grad_norm_exploding(p.grad_norm, config) for p in points], steps)
    losses = [p.loss if p.loss is not None else math.nan for p in points]
    note("loss_spike", red_flags.scan_loss_spike(losses, [p.episode for p in points]), steps)
    note(
        "head_frozen",
        red_flags.scan_head_frozen([p.q_std for p in points], [p.q_mean for p in points]),
        steps,
    )
    episode_steps = [int(to_float(r.get("step")) or 0) for r in episodes]
    exploiting = [
        red_flags.early_exploitation(eps, int(to_float(r.get("episode")) or 0))
        if (eps := to_float(r.get("epsilon"))) is not None
        else None
        for r in episodes
    ]
    note("early_exploitation", exploiting, episode_steps)
    rewards = [v if (v := to_float(r.get("reward"))) is not None else math.nan for r in episodes]
    note("reward_decline", red_flags.scan_reward_decline(rewards), episode_steps)
    return found


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
    exploding = any(r.tripped for _, v in grads if (r := red_flags.grad_norm_exploding(v, config)))
    add(
        "grad_norm_bounded",
        grad_max is not None and not exploding,
        "no grad norm recorded" if grad_max is None else f"max {grad_max:.4g} (pre-clip)",
        f"<= {grad_limit:g} ({GRAD_EXPLODING_FACTOR:g}x the clip norm {config.gradient_clip_norm:g})",
    )

    # Q finite, not negative, within the return bound
    q_means = _values(steps, "q_mean") + _values(episodes, "q_mean")
    q_all = q_means + _values(steps, "q_min") + _values(steps, "q_max")
    add("q_finite", *_all_finite(q_all, "Q"), "q_mean, q_min, q_max finite in every record")
    finite_q_means = [(s, v) for s, v in q_means if math.isfinite(v)]
    lowest = min(finite_q_means, key=lambda sv: sv[1], default=None)
    # q_negative at every recorded Q (step and episode records, in file order), against the floor of the
    # most negative reward recorded so far, as the live monitor judged it.
    min_reward, negative = 0.0, False
    for record in records:
        if record.get("kind") not in ("step", "episode"):
            continue
        low = to_float(record.get("min_reward")) if record.get("kind") == "step" else None
        if low is not None and math.isfinite(low):
            min_reward = min(min_reward, low)
        reading = red_flags.q_negative(to_float(record.get("q_mean")), min_reward, config)
        negative = negative or bool(reading and reading.tripped)
    floor = red_flags.q_floor(min_reward, config)
    add(
        "q_not_negative",
        lowest is not None and not negative,
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
    # q_out_of_bounds at every step record against the bound the loop knew then (or the stand-in), and at
    # every episode record's Q against the run's bound.
    beyond = False
    for p in learn_series(records):
        known = p.max_abs_reward if recorded_bound else max_abs_reward
        extreme = red_flags.q_extreme(p.q_mean, p.q_min, p.q_max)
        reading = red_flags.q_out_of_bounds(extreme, known or 0.0, config)  # None known: not judged yet
        beyond = beyond or bool(reading and reading.tripped)
    for _, v in _values(episodes, "q_mean"):
        reading = red_flags.q_out_of_bounds(abs(v), max_abs_reward, config)
        beyond = beyond or bool(reading and reading.tripped)
    if max_abs_reward <= 0:
        add("q_within_return_bound", True, "not checkable: no non-zero reward recorded", requirement)
    else:
        q_abs = max(extremes, default=None)
        add(
            "q_within_return_bound",
            q_abs is not None and not beyond,
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
        f"last q_std {figure(q_std_last)}, {distinct_q} distinct q_mean values in {len(steps)} step records",
        "q_std > 0 at the end and q_mean not constant (a dead head: seeds 003, 000)",
    )

    # loss not exploding: no loss_spike (the live rule, at every step record) and no 10x growth
    finite_losses = [v for _, v in _values(steps, "loss") if math.isfinite(v)]
    points = learn_series(records)
    spike = red_flags.first_trip(
        red_flags.scan_loss_spike(
            [p.loss if p.loss is not None else math.nan for p in points], [p.episode for p in points]
        )
    )
    if finite_losses:
        k = max(1, len(finite_losses) // 5)
        first, last = float(np.mean(finite_losses[:k])), float(np.mean(finite_losses[-k:]))
        ok = spike is None and (first <= 0 or last <= DIAG_LOSS_GROWTH_FACTOR * first)
        measured = f"first-window mean {first:.4g}, last-window mean {last:.4g} ({k} records each)"
        if spike is not None:
            at, reading = spike
            measured += f"; loss_spike: median {reading.value:.4g} at step {points[at].step:,}"
    else:
        ok, measured = False, "no finite loss in step records"
    add(
        "loss_not_exploding",
        ok,
        measured,
        f"median of the last {LOSS_SMOOTHING_STEPS} losses <= {LOSS_SPIKE_THRESHOLD:g} after episode "
        f"{LOSS_SPIKE_AFTER_EPISODE} (loss_spike) and last-window mean <= {DIAG_LOSS_GROWTH_FACTOR:g}x the "
        "first",
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
    # Fatal flags the loop raised, and those the shared rules find in the recorded series (the same rules:
    # they agree where every learn step was recorded; the events cover the steps between records).
    raised = {str(e.get("name")) for e in flags} | set(flags_in_records(records, config))
    fatal = sorted(name for name in raised if name in FATAL_FLAGS)
    add(
        "no_fatal_red_flags",
        not fatal,
        ("raised: " + ", ".join(fatal)) if fatal else f"{len(flags)} red flags, none fatal",
        "no fatal red flag (health.FATAL_FLAGS) raised or in the recorded series",
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
