"""Compare training runs with each other and with the reference that fits their environment: the envelope
of W&B run c643zifs for TrackMania runs, the known-good network's kept curves for embedded-track runs.

    python compare_runs.py checkpoints/try1 checkpoints/try2
    python compare_runs.py checkpoints/try1/metrics.jsonl my-entity/rainbow-tm/c643zifs --out cmp.png
    python compare_runs.py checkpoints/try1 --envelope reference/c643zifs-envelope.json --x step
    python compare_runs.py "pin=bench/curves/curve-pin-s0.jsonl" "pin=bench/curves/curve-pin-s1.jsonl" \
        "n_step 3=bench/curves/curve-ns3-s0.jsonl" "n_step 3=bench/curves/curve-ns3-s1.jsonl" --table

A RUN is one of our run folders (holding metrics.jsonl), a metrics.jsonl file, or a W&B run path
`entity/project/run_id` (also `wandb:entity/project/run_id` or a wandb.ai run URL), read with
`wandb.Api()` when W&B credentials are configured. A run that cannot be read gets a one-line error and
the others are still compared.

Every run becomes per-episode series (episode, steps, reward, Q mean, loss, epsilon, and the race: finished
or not, race time). The script prints
- a line `UNPINNED <run>: departs from the sacred <key> (<used>, pinned <known-good>)` for every run
  allowed to depart from one of the three sacred invariants (tm_config.SACRED_FLAGS): from the `unpinned`
  list the run recorded, and from its config's own departures (older JSONL files and W&B runs);
- the config departures between the runs;
- the race results: episodes, finished episodes, finish rate, best (and where) and median race time; a
  run whose episodes never recorded `finished` says "no race data" (not 0%);
- each TrackMania run (or run of unknown environment) against the envelope phase by phase, and every
  run against the seed's four red flags, with a verdict per run: PASS when at least one check passed,
  none failed and NO DATA is not the majority of the checks; FAIL when any check failed; otherwise NO
  VERDICT (too little data to judge: never a pass);
- the greedy evaluations (eval records, `env_tm.py --eval-every`): steps to a mean return of 400 and 700,
  the final and the best return within a budget of steps, per run and per group (runs given as
  `LABEL=RUN` with one label: seeds of one arm); `--keep DIR` writes a run's start, event and eval records
  to DIR/<run>.jsonl, a kept curve that compares like its folder;
and draws the curves (over the envelope's bands where it applies), the evaluations with their spread and
the reference's, plus the race times, in a PNG: `--out PATH`, by default `comparison.png` in the first
run's folder (the current folder when that run is a W&B run).

Exit code: 0 when every run has the verdict PASS, 1 when a run FAILs or could not be read, 3 when none
failed but a run had too little data to judge (NO VERDICT), 2 on usage errors (bad arguments, unreadable
envelope file, a PNG path that cannot be written).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import health
from run_log import METRICS_FILE, read_jsonl, wandb_logged_in
from tm_config import SACRED_FLAGS, Config, ConfigError, unpinned_keys

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_VERDICT = 0, 1, 2, 3
EXIT_CODES_HELP = (
    "exit codes: 0 every run PASSes; 1 a run FAILs or could not be read; 3 none failed but a run had too "
    "little data to judge (NO VERDICT: no check passed, or NO DATA is the majority of its checks); 2 usage "
    "errors (bad arguments, unreadable envelope, a PNG path that cannot be written)"
)
DEFAULT_PLOT_NAME = "comparison.png"

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
# Per-episode losses are single learn steps: the loss_spike red flag uses a 10-episode mean.
LOSS_SPIKE_EPISODES = 10
# reward_decline slides health.reward_trend's 500-episode window along the run in 50-episode strides.
REWARD_DECLINE_STRIDE = 50

# envelope metric -> our series name, and the plot's panel titles
METRICS = {"episode_reward": "reward", "q_values": "q_mean", "loss": "loss", "epsilon": "epsilon"}
TITLES = {"episode_reward": "episode reward", "q_values": "Q mean", "loss": "loss", "epsilon": "epsilon"}
SERIES = ("reward", "q_mean", "loss", "epsilon")
RACE_SERIES = ("finished", "race_time")

# A series this short, or without two finite points in a row, is drawn with markers: a line through a
# single point (or through points isolated between NaNs) draws nothing.
MARKERS_BELOW_POINTS = 50


class RunLoadError(Exception):
    """A run that cannot be read; the message is one line saying why and how to fix it."""


class UsageError(Exception):
    """A bad command line or envelope file (exit code 2)."""


# --- normalised runs -------------------------------------------------------------------------------
@dataclass
class RunSeries:
    """One run as per-episode arrays (NaN where a metric has no value for an episode)."""

    label: str
    source: str
    episode: np.ndarray
    step: np.ndarray
    reward: np.ndarray
    q_mean: np.ndarray
    loss: np.ndarray
    epsilon: np.ndarray
    finished: np.ndarray  # 1.0 crossed the finish line, 0.0 did not, NaN not recorded (older runs)
    race_time: np.ndarray  # seconds, only where finished == 1.0 (NaN elsewhere)
    nonfinite: dict[str, int] = field(default_factory=dict)  # NaN/inf values recorded, per metric
    config: dict[str, Any] = field(default_factory=dict)
    red_flags: list[str] | None = None  # red-flag events of our JSONL runs; None when not available
    # sacred key -> the value the run used (None when only its name was recorded); empty when pinned
    unpinned: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None  # our run's folder (the default home of the PNG); None for W&B runs
    evals: list[dict[str, float]] = field(default_factory=list)  # greedy evaluations (--eval-every), by step
    env: str | None = None  # "embedded" or "trackmania" as the run recorded it; None when unknown (W&B)
    last_step: int = 0  # the newest step of any record (episodes end before it; a run stops mid-episode)
    learn_steps: int | None = None  # the newest learn step recorded; None when not recorded
    group: str | None = None  # LABEL= on the command line: runs sharing one are seeds of one group
    records: list[dict[str, Any]] = field(default_factory=list)  # its start, event and eval records (--keep)

    @property
    def envelope_applies(self) -> bool:
        """The envelope is TrackMania's reference, per episode: not a yardstick for the embedded track."""
        return self.env != "embedded"

    def metric(self, name: str) -> np.ndarray:
        return getattr(self, name)

    @property
    def episodes(self) -> int:
        return len(self.episode)

    @property
    def plot_label(self) -> str:
        """The label in the PNG's legends: an unpinned run must not pass for a known-good one there."""
        return f"{self.label} (unpinned)" if self.unpinned else self.label


def _norm(key: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", key.lower()).strip("_")


# Column names seen in W&B runs (ours mirror the JSONL as "episode/reward", "step/loss", ...), normalised
# by _norm, in order of preference; then a loose match on the name's words.
KEY_CANDIDATES: dict[str, tuple[str, ...]] = {
    "episode": ("episode", "episode_episode", "episodes", "episode_number", "episode_num", "episode_idx",
                "episode_index", "episode_count", "num_episodes", "train_episode", "ep"),
    "step": ("global_step", "env_step", "env_steps", "total_steps", "total_step", "timesteps", "timestep",
             "steps", "step"),
    "reward": ("episode_reward", "reward", "episode_return", "ep_reward", "ep_return", "total_reward",
               "episode_total_reward", "train_episode_reward", "train_reward", "episodic_return",
               "charts_episodic_return", "return", "rewards"),
    "q_mean": ("q_mean", "episode_q_mean", "mean_q", "q_value", "q_values", "avg_q", "average_q",
               "mean_q_value", "avg_q_value", "mean_greedy_q", "greedy_q", "step_q_mean", "train_q_mean",
               "q"),
    "loss": ("loss", "episode_loss", "step_loss", "train_loss", "mean_loss", "avg_loss", "td_loss",
             "losses_td_loss", "iqn_loss"),
    "epsilon": ("epsilon", "episode_epsilon", "step_epsilon", "train_epsilon", "exploration_rate",
                "exploration_epsilon", "charts_epsilon", "eps"),
}  # fmt: skip
# The race columns (our W&B runs log them as "episode/finished" and "episode/race_time"), normalised.
RACE_KEY_CANDIDATES: dict[str, tuple[str, ...]] = {
    "finished": ("finished", "episode_finished", "race_finished"),
    "race_time": ("race_time", "episode_race_time", "race_time_s", "finish_time"),
}
_LOOSE_EXCLUDE = {"min", "max", "std", "target", "best", "component", "components", "actor", "critic"}


def _loose_match(canonical: str, words: list[str]) -> bool:
    if _LOOSE_EXCLUDE.intersection(words):
        return False
    if canonical == "reward":
        return ("reward" in words or "return" in words) and "step" not in words
    if canonical == "q_mean":
        return "q" in words and "loss" not in words
    if canonical == "loss":
        return "loss" in words
    if canonical == "epsilon":
        return "epsilon" in words
    return False


def detect_keys(keys: Iterable[str]) -> dict[str, str | None]:
    """Map our series names (and 'episode', 'step') to the columns of a foreign run."""
    by_norm: dict[str, str] = {}
    for key in sorted(keys):
        by_norm.setdefault(_norm(key), key)
    chosen: dict[str, str | None] = {}
    for canonical, candidates in KEY_CANDIDATES.items():
        taken = set(chosen.values())
        found = next((by_norm[c] for c in candidates if c in by_norm and by_norm[c] not in taken), None)
        if found is None and canonical not in ("episode", "step"):
            found = next(
                (
                    raw
                    for norm, raw in sorted(by_norm.items())
                    if raw not in taken
                    and not raw.startswith("_")
                    and _loose_match(canonical, norm.split("_"))
                ),
                None,
            )
        chosen[canonical] = found
    return chosen


def detect_race_keys(keys: Iterable[str]) -> dict[str, str | None]:
    """Map 'finished' and 'race_time' to the columns of a foreign run (exact names only: a loose match
    could take any time column for a race time)."""
    by_norm: dict[str, str] = {}
    for key in sorted(keys):
        by_norm.setdefault(_norm(key), key)
    return {
        canonical: next((by_norm[c] for c in candidates if c in by_norm), None)
        for canonical, candidates in RACE_KEY_CANDIDATES.items()
    }


def _flag(value: Any) -> bool | None:
    """A recorded `finished` as a bool; None when missing or unreadable (never read as "not finished")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    number = health.to_float(value)
    if number is None or not math.isfinite(number):
        return None
    return number != 0


def race_columns(
    groups: dict[float, list[dict[str, Any]]], order: list[float], keys: dict[str, str | None]
) -> dict[str, np.ndarray]:
    """Per-episode `finished` (1/0, NaN where not recorded) and `race_time` (only for finished episodes)."""
    finished_key, time_key = keys.get("finished"), keys.get("race_time")
    finished, race_time = [], []
    for episode in order:
        rows = groups[episode]
        flags = [f for row in rows if (f := _flag(row.get(finished_key))) is not None] if finished_key else []
        done = (1.0 if any(flags) else 0.0) if flags else math.nan
        times = (
            [t for row in rows if (t := health.to_float(row.get(time_key))) is not None] if time_key else []
        )
        times = [t for t in times if math.isfinite(t) and t > 0]
        finished.append(done)
        race_time.append(times[-1] if done == 1.0 and times else math.nan)
    return {
        "finished": np.asarray(finished, dtype=np.float64),
        "race_time": np.asarray(race_time, dtype=np.float64),
    }


def _mean_finite(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def episode_series(rows: Sequence[dict[str, Any]], keys: dict[str, str | None]) -> dict[str, Any]:
    """Per-episode arrays from rows logged per episode or per step.

    Episodes are the distinct values of the episode column when there is one (several rows of one
    episode: the reward is the episode's last value, a running total; Q, loss and epsilon are averaged),
    else the rows that carry a reward, numbered 1, 2, ... A metric missing from an episode's rows is
    interpolated by step from the rows that have it (never extrapolated past them). The race columns
    (keys 'finished' and 'race_time', when given) are never interpolated: a race is the episode's own.
    """
    get = {name: keys.get(name) for name in ("episode", "step", *SERIES)}
    nonfinite = dict.fromkeys(SERIES, 0)
    for row in rows:
        for name in SERIES:
            value = health.to_float(row.get(get[name])) if get[name] else None
            if value is not None and not math.isfinite(value):
                nonfinite[name] += 1

    def value(row: dict[str, Any], name: str) -> float | None:
        key = get[name]
        return health.to_float(row.get(key)) if key else None

    groups: dict[float, list[dict[str, Any]]] = {}
    if get["episode"]:
        for row in rows:
            episode = value(row, "episode")
            if episode is not None and math.isfinite(episode):
                groups.setdefault(episode, []).append(row)
    elif get["reward"]:
        ordinal = 0
        for row in rows:
            if value(row, "reward") is not None:
                ordinal += 1
                groups[float(ordinal)] = [row]

    order = sorted(groups)
    out: dict[str, Any] = {"episode": np.asarray(order, dtype=np.float64), "nonfinite": nonfinite}
    steps = []
    for episode in order:
        found = [v for row in groups[episode] if (v := value(row, "step")) is not None and math.isfinite(v)]
        steps.append(max(found) if found else math.nan)
    out["step"] = np.asarray(steps, dtype=np.float64)
    for name in SERIES:
        column = []
        for episode in order:
            found = [v for row in groups[episode] if (v := value(row, name)) is not None]
            if not found:
                column.append(math.nan)
            elif name == "reward":
                column.append(found[-1] if math.isfinite(found[-1]) else math.nan)
            else:
                column.append(_mean_finite(found))
        values = np.asarray(column, dtype=np.float64)
        # Interpolate what the episode rows lack from every row with this metric and a step.
        source = sorted(
            (s, v)
            for row in rows
            if (s := value(row, "step")) is not None
            and (v := value(row, name)) is not None
            and math.isfinite(s)
            and math.isfinite(v)
        )
        holes = np.isnan(values) & np.isfinite(out["step"])
        if source and holes.any() and name != "reward":
            xs, ys = np.asarray(source).T
            inside = holes & (out["step"] >= xs[0]) & (out["step"] <= xs[-1])
            values[inside] = np.interp(out["step"][inside], xs, ys)
        out[name] = values
    out.update(race_columns(groups, order, keys))
    return out


def _label_for(file: Path) -> str:
    """A run's name: its folder's for a run's own metrics.jsonl (resolved, so the current folder has one
    too); a kept curve file's own name otherwise (bench/curves/curve-pin-s0.jsonl: curve-pin-s0)."""
    if file.name == METRICS_FILE:
        return file.resolve().parent.name or file.stem
    return file.stem


def load_jsonl_run(path: Path) -> RunSeries:
    """One of our runs: a folder holding metrics.jsonl, or the file itself."""
    file = path / METRICS_FILE if path.is_dir() else path
    if not file.is_file():
        raise RunLoadError(f"{path}: no {METRICS_FILE} in this folder")
    try:
        records = read_jsonl(file)
    except (OSError, UnicodeDecodeError) as error:
        raise RunLoadError(f"{file}: cannot be read ({type(error).__name__}: {error})") from None
    rows = []
    for record in records:
        kind = record.get("kind")
        if kind in ("episode", "step") and record.get("q_greedy") is not None:
            # The reference logged the mean greedy Q (max over actions); ours records both.
            record = {**record, "q_mean": record["q_greedy"]}
        if kind == "episode":
            rows.append({k: record.get(k) for k in ("step", "episode", *SERIES, *RACE_SERIES)})
        elif kind == "step":  # no episode key: these only fill what episode records lack
            rows.append({k: record.get(k) for k in ("step", "q_mean", "loss", "epsilon")})
    identity: dict[str, str | None] = {name: name for name in ("episode", "step", *SERIES, *RACE_SERIES)}
    series = episode_series(rows, identity)
    config = health.config_from_records(records).to_dict()
    flags = [str(r.get("name")) for r in records if r.get("kind") == "event" and r.get("level") == "red_flag"]
    # Every session of the run (a resume may add a departure) says what it used and what it unpinned.
    used, recorded = dict(config), []
    for record in records:
        if record.get("kind") != "run":
            continue
        departures = record.get("departures")
        if isinstance(departures, dict):
            used.update({k: d["used"] for k, d in departures.items() if isinstance(d, dict) and "used" in d})
        if isinstance(record.get("unpinned"), list):
            recorded += [key for key in record["unpinned"] if key not in recorded]
    steps = [s for r in records if (s := health.to_float(r.get("step"))) is not None and math.isfinite(s)]
    learned = [
        v for r in records if (v := health.to_float(r.get("learn_step"))) is not None and math.isfinite(v)
    ]
    starts = [r for r in records if r.get("kind") == "run" and r.get("event") == "start"]
    return RunSeries(
        _label_for(file),
        str(file),
        **series,
        config=config,
        red_flags=flags,
        unpinned=find_unpinned(recorded, used),
        folder=file.parent,
        evals=evaluations_of(records),
        env=next((str(r["env"]) for r in starts if r.get("env")), None),
        last_step=int(max(steps, default=0)),
        learn_steps=int(max(learned)) if learned else None,
        records=[r for r in records if r.get("kind") in KEPT_KINDS],
    )


# --- greedy evaluations: the learning curve --------------------------------------------------------
THRESHOLDS = (400.0, 700.0)  # the returns whose first step a learning curve is judged by
KEPT_KINDS = ("run", "event", "eval")  # what --keep writes: the start record, red flags, the curve
EVAL_ROW_EVERY = 10_000  # the curves' --eval-every when the runs' own cannot be seen (one evaluation)
# The embedded-track reference: the known-good network's kept curves (2 seeds; epsilon decay to 30k steps,
# unpinned: the pinned schedule shows nothing in 100k steps). Drawn for embedded-track runs.
EMBEDDED_REFERENCE = tuple(
    Path(__file__).resolve().parent / "bench" / "curves" / f"curve-pin-s{seed}.jsonl" for seed in (0, 1)
)


def evaluations_of(records: Iterable[dict[str, Any]]) -> list[dict[str, float]]:
    """The eval records (the greedy policy on the held-out tracks), by step, the last one of a step kept."""
    by_step: dict[int, dict[str, float]] = {}
    for record in records:
        mean = health.to_float(record.get("return_mean")) if record.get("kind") == "eval" else None
        if mean is None or not math.isfinite(mean):
            continue
        values = {key: health.to_float(record.get(key)) for key in ("return_std", "return_min", "return_max")}
        by_step[int(record["step"])] = {
            "step": int(record["step"]),
            "mean": mean,
            **{key[7:]: value for key, value in values.items() if value is not None and math.isfinite(value)},
        }
    return [by_step[step] for step in sorted(by_step)]


def steps_to(evals: Sequence[dict[str, float]], threshold: float) -> int | None:
    """The first evaluated step whose mean return reached `threshold`."""
    return next((int(e["step"]) for e in evals if e["mean"] >= threshold), None)


def curve_summary(evals: Sequence[dict[str, float]], final_evals: int) -> dict[str, Any]:
    """Steps to each threshold, the final return (the mean of the last `final_evals` evaluations: one is
    noisy) and the best."""
    return {
        **{f"steps_to_{int(t)}": steps_to(evals, t) for t in THRESHOLDS},
        "final": float(np.mean([e["mean"] for e in evals[-final_evals:]])),
        "best": float(max(e["mean"] for e in evals)),
        "last_step": int(evals[-1]["step"]),
        "evaluations": len(evals),
    }


def _steps_text(value: int | None) -> str:
    return "not reached" if value is None else f"{value:,}"


def evaluation_budget(runs: Sequence[RunSeries], steps: int | None) -> int | None:
    """The steps the curves are compared over: `--steps`, else the shortest evaluated run's last one."""
    evaluated = [run for run in runs if run.evals]
    if not evaluated:
        return None
    return steps if steps is not None else min(run.evals[-1]["step"] for run in evaluated)


def evaluation_table(runs: Sequence[RunSeries], budget: int, final_evals: int) -> tuple[list[str], dict]:
    """Per run and per group (runs sharing a LABEL=): steps to 400 and 700, final and best, within the
    budget; the lines to print and the figures (for --json)."""
    width = max([36, *(len(run.plot_label) + 1 for run in runs)])
    lines = [
        f"Greedy evaluations (held-out tracks) within {budget:,} steps; final = mean of the last "
        f"{final_evals} evaluations:",
        f"  {'run':<{width}} {'steps to 400':>13} {'steps to 700':>13} {'final':>8} {'best':>8}",
    ]
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        within = [e for e in run.evals if e["step"] <= budget]
        if not within:
            why = "no evaluation in the budget" if run.evals else "no evaluation (train with --eval-every)"
            lines.append(f"  {run.plot_label:<{width}} {why}")
            continue
        figures = curve_summary(within, final_evals)
        groups.setdefault(run.group or run.label, []).append({"run": run.label, **figures})
        lines.append(
            f"  {run.plot_label:<{width}} {_steps_text(figures['steps_to_400']):>13} "
            f"{_steps_text(figures['steps_to_700']):>13} {figures['final']:>8.1f} {figures['best']:>8.1f}"
        )
    if any(len(members) > 1 for members in groups.values()):
        lines.append(f"  {'group':<24} {'runs':>4} {'steps to 400 (each)':>24} {'final, mean (each)':>30}")
        for label, members in groups.items():
            finals = [m["final"] for m in members]
            each = ", ".join(_steps_text(m["steps_to_400"]) for m in members)
            final_each = ", ".join(f"{f:.0f}" for f in finals)
            lines.append(
                f"  {label:<24} {len(members):>4} {each:>24} {f'{np.mean(finals):.1f} ({final_each})':>30}"
            )
    summary = {
        label: {"runs": members, "final_mean": float(np.mean([m["final"] for m in members]))}
        for label, members in groups.items()
    }
    return lines, summary


def evaluation_cadence(runs: Sequence[RunSeries]) -> int:
    """The runs' --eval-every, as their evaluations show it: the median gap between two, to the thousand
    (an evaluation runs at the first episode end after its step is due, a little after it)."""
    gaps = [b["step"] - a["step"] for run in runs for a, b in zip(run.evals, run.evals[1:], strict=False)]
    if not gaps:
        return EVAL_ROW_EVERY
    return max(1_000, int(round(float(np.median(gaps)) / 1_000)) * 1_000)


def markdown_table(runs: Sequence[RunSeries], budget: int) -> str:
    """Every evaluation within the budget, one row per due step (the runs' evaluation cadence: an
    evaluation runs at the first episode end after its step is due), one column per run: mean +- std over
    the held-out tracks."""
    cells: dict[int, dict[int, str]] = {}
    evaluated = [run for run in runs if run.evals]
    cadence = evaluation_cadence(evaluated)
    for column, run in enumerate(evaluated):
        for e in (e for e in run.evals if e["step"] <= budget):
            row = int(e["step"]) // cadence * cadence
            cells.setdefault(row, {})[column] = f"{e['mean']:.1f} ± {e.get('std', 0.0):.0f}"
    header = ["step (due)"] + [run.plot_label for run in evaluated]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for step in sorted(cells):
        row = [f"{step:,}"] + [cells[step].get(column, "") for column in range(len(evaluated))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def keep_curve(run: RunSeries, folder: Path) -> Path:
    """Write a run's start, event and eval records to FOLDER/<run>.jsonl (a few kB that outlive the run's
    folder and compare like it); UsageError in one line when the folder cannot take it."""
    path = folder / f"{_label_for(Path(run.source))}.jsonl"  # the run's own name, never its LABEL=
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in run.records), encoding="utf-8")
    except OSError as error:
        raise UsageError(f"--keep {folder}: cannot write {path.name} ({error.strerror or error})") from None
    return path


# --- unpinned runs ---------------------------------------------------------------------------------
def sacred_departures(values: dict[str, Any]) -> list[str]:
    """The sacred keys (tm_config.SACRED_FLAGS) whose values in a run's config depart from the pin."""
    sacred = {key: values[key] for key in SACRED_FLAGS if key in values}
    try:
        return unpinned_keys(Config().with_overrides(**sacred))
    except (ConfigError, TypeError, ValueError):
        # values this Config refuses (another version's, a W&B float for an int key): one by one instead
        pinned = Config().to_dict()
        return [key for key, value in sacred.items() if not _same(value, pinned[key])]


def find_unpinned(recorded: Any, values: dict[str, Any]) -> dict[str, Any]:
    """{sacred key: value used (None when not recorded)} of an unpinned run; empty for a pinned one.

    The keys the run recorded as unpinned, plus any sacred departure its config shows: runs older than
    the `unpinned` record, and foreign W&B runs, are caught by their config alone.
    """
    keys = [str(key) for key in recorded] if isinstance(recorded, (list, tuple)) else []
    keys += [key for key in sacred_departures(values) if key not in keys]
    return {key: values.get(key) for key in keys}


def unpinned_line(run: RunSeries) -> str:
    """`UNPINNED <label>: departs from the sacred <key> (<used>, pinned <known-good>)[, ...]`."""
    pinned = Config().to_dict()
    parts = []
    for key, used in run.unpinned.items():
        value = "value not recorded" if used is None else repr(used)
        parts.append(f"{key} ({value}, pinned {repr(pinned[key]) if key in pinned else '?'})")
    return f"UNPINNED {run.label}: departs from the sacred {', '.join(parts)}"


# --- W&B -------------------------------------------------------------------------------------------
WANDB_PATH = re.compile(r"^(?:wandb:)?([\w.\-]+)/([\w.\-]+)/(?:runs/)?([\w\-]+)$")
WANDB_URL = re.compile(r"^https?://[^/]*wandb[^/]*/([\w.\-]+)/([\w.\-]+)/runs/([\w\-]+)")


def parse_wandb_path(spec: str) -> str | None:
    """entity/project/run_id for a W&B run reference, else None."""
    match = WANDB_URL.match(spec) or WANDB_PATH.match(spec)
    return "/".join(match.groups()) if match else None


def wandb_offline_reason() -> str | None:
    """Why W&B cannot be read without prompting, or None when credentials are configured. Only the
    presence of a key is looked at: an interactive login prompt must never block this script."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return f"WANDB_MODE={mode}; unset it (and set WANDB_API_KEY or run `wandb login`) to read W&B runs"
    if wandb_logged_in():
        return None
    return "no WANDB_API_KEY and no `wandb login`; set WANDB_API_KEY or run `wandb login`, then retry"


def _plain_config(config: Any) -> dict[str, Any]:
    """run.config as {key: value}: some API versions wrap values as {"value": ..., "desc": ...}."""
    try:
        items = dict(config).items()
    except (TypeError, ValueError):
        return {}
    out = {}
    for key, value in items:
        if str(key).startswith("_") or key == "departures_from_known_good":
            continue
        if isinstance(value, dict) and "value" in value and set(value) <= {"value", "desc"}:
            value = value["value"]
        out[str(key)] = value
    return out


def load_wandb_run(path: str) -> RunSeries:
    """A W&B run's history through the public API (network); one-line RunLoadError when impossible."""
    reason = wandb_offline_reason()
    if reason:
        raise RunLoadError(f"{path}: W&B is offline ({reason})")
    try:
        import wandb
    except ImportError:
        raise RunLoadError(f"{path}: W&B is not installed (pip install wandb)") from None
    try:
        run = wandb.Api(timeout=30).run(path)
        try:
            rows = [dict(row) for row in run.scan_history(page_size=1000)]
        except AttributeError:  # an API without scan_history
            rows = [dict(row) for row in run.history(samples=1_000_000, pandas=False)]
        config = _plain_config(getattr(run, "config", {}) or {})
        label = str(getattr(run, "name", None) or getattr(run, "id", None) or path.rsplit("/", 1)[-1])
    except Exception as error:  # network, permissions, missing run: one line, the others still compare
        first_line = (str(error).strip().splitlines() or [""])[0][:160]
        raise RunLoadError(
            f"{path}: cannot read the W&B run ({type(error).__name__}: {first_line})"
        ) from None
    all_keys = {key for row in rows for key in row}
    series = episode_series(rows, {**detect_keys(all_keys), **detect_race_keys(all_keys)})
    recorded = config.pop("unpinned", None)  # run_log records it in the config: not a config key
    return RunSeries(
        label,
        f"wandb:{path}",
        **series,
        config=config,
        red_flags=None,
        unpinned=find_unpinned(recorded, config),
    )


def load_run(spec: str) -> RunSeries:
    """A run folder, a metrics.jsonl file or a W&B run path, each optionally as LABEL=RUN (runs sharing a
    label are one group: seeds of one arm); RunLoadError (one line) otherwise."""
    label, sep, rest = spec.partition("=")
    # A label names; it is never a path or a URL (a W&B URL's query has "=" in it: `?workspace=user`).
    if sep and not Path(spec).exists() and not any(c in label for c in "/\\:?"):
        if not label or not rest:
            raise RunLoadError(f"{spec}: not LABEL=RUN (a label, then a run folder, file or W&B path)")
        run = load_run(rest)
        run.group = label
        run.label = f"{label}: {run.label}"
        return run
    path = Path(spec)
    if path.exists():
        return load_jsonl_run(path)
    wandb_path = parse_wandb_path(spec)
    if wandb_path and not spec.endswith(".jsonl"):
        return load_wandb_run(wandb_path)
    raise RunLoadError(
        f"{spec}: not found (expected a run folder, a {METRICS_FILE} file or entity/project/run_id)"
    )


# --- config departures -----------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def config_table(runs: Sequence[RunSeries]) -> list[str]:
    """Lines of a table of the config keys whose values differ between the runs or from the pin."""
    pinned = Config().to_dict()
    labels = ["known-good", *(run.label for run in runs)]
    rows: list[list[str]] = []
    only_one: dict[str, list[str]] = {}
    for key in sorted(set(pinned).union(*(run.config for run in runs))):
        values = [pinned.get(key, None)] + [run.config.get(key, None) for run in runs]
        has = [key in pinned] + [key in run.config for run in runs]
        present = [v for v, recorded in zip(values, has, strict=True) if recorded]
        if len(present) < 2:  # nothing to compare it with (a W&B run records only some keys)
            owner = next((run.label for run in runs if key in run.config), None)
            if owner is not None:
                only_one.setdefault(owner, []).append(key)
            continue
        if all(_same(present[0], v) for v in present[1:]):
            continue
        cells = [repr(v) if recorded else "-" for v, recorded in zip(values, has, strict=True)]
        rows.append([key, *cells])
    lines = ["Config departures (keys whose values differ between the runs or from the known-good config):"]
    if rows:
        header = ["key", *labels]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            lines.append(
                "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            )
    else:
        lines.append("  none: every run uses the known-good values")
    for owner, keys in only_one.items():
        shown = ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
        lines.append(f"  recorded only by {owner}: {shown}")
    return lines


# --- race results ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RaceSummary:
    """What a TrackMania player asks of a run: how often it finishes, and how fast."""

    episodes: int  # episodes that recorded `finished`
    finished: int
    best: float | None = None  # race time in seconds, None when no episode finished
    best_episode: int | None = None
    best_step: int | None = None
    median: float | None = None

    @property
    def rate(self) -> float:
        return self.finished / self.episodes if self.episodes else 0.0


def race_summary(run: RunSeries) -> RaceSummary | None:
    """The run's race results; None when none of its episodes recorded `finished` (no race data)."""
    recorded = np.isfinite(run.finished)
    if not recorded.any():
        return None
    done = recorded & (run.finished == 1.0)
    timed = done & np.isfinite(run.race_time)
    summary = RaceSummary(episodes=int(recorded.sum()), finished=int(done.sum()))
    if not timed.any():
        return summary
    times = np.where(timed, run.race_time, np.inf)
    i = int(np.argmin(times))  # the first episode with the best time
    step = run.step[i]
    return RaceSummary(
        episodes=summary.episodes,
        finished=summary.finished,
        best=float(times[i]),
        best_episode=int(run.episode[i]),
        best_step=int(step) if math.isfinite(step) else None,
        median=float(np.median(run.race_time[timed])),
    )


def race_table(runs: Sequence[RunSeries]) -> list[str]:
    """Lines of the race results table: episodes, finished, finish rate, best (where) and median time."""
    lines = ["Race results (finished: crossed the finish line; race times in seconds, lower is better):"]
    header = ["run", "episodes", "finished", "finish rate", "best time", "best at", "median time"]
    rows: list[list[str]] = []
    notes: list[str] = []
    for run in runs:
        race = race_summary(run)
        if race is None:
            rows.append([run.label, "no race data (its episodes do not record `finished`)"])
            continue
        where = "-"
        if race.best_episode is not None:
            where = f"episode {race.best_episode:,}"
            where += f" (step {race.best_step:,})" if race.best_step is not None else ""
        rows.append(
            [
                run.label,
                f"{race.episodes:,}",
                f"{race.finished:,}",
                f"{100 * race.rate:.1f}%",
                f"{race.best:.3f}" if race.best is not None else "-",
                where,
                f"{race.median:.3f}" if race.median is not None else "-",
            ]
        )
        if race.episodes < run.episodes:
            notes.append(
                f"  {run.label}: {race.episodes:,} of {run.episodes:,} episodes record `finished` (the "
                "others predate it); its finish rate is over those"
            )
    full = [row for row in rows if len(row) == len(header)]
    widths = [max(len(r[i]) for r in [header, *full]) for i in range(len(header))]
    label_width = max(len(r[0]) for r in [header, *rows])
    widths[0] = label_width
    for row in [header, *rows]:
        if len(row) != len(header):  # "no race data" spans the numeric columns
            lines.append(f"  {row[0].ljust(label_width)}  {row[1]}")
            continue
        cells = [row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:5], widths[1:5], strict=True))]
        cells += [row[5].ljust(widths[5]), row[6].rjust(widths[6])]
        lines.append(("  " + "  ".join(cells)).rstrip())
    return lines + notes


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


def _band(spec: dict[str, Any]) -> tuple[float, float] | None:
    if "from" in spec and "to" in spec:
        return min(spec["from"], spec["to"]), max(spec["from"], spec["to"])
    if "low" in spec or "high" in spec:
        return spec.get("low", -math.inf), spec.get("high", math.inf)
    if "around" in spec:
        return spec["around"], spec["around"]
    return None


def _tolerance(metric: str, band: tuple[float, float]) -> float:
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
        band = _band(spec) if isinstance(spec, dict) else None
        if band is None:
            continue
        tol = _tolerance(metric, band)
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


def red_flag_checks(run: RunSeries) -> list[Check]:
    """The envelope's four red flags over the whole run, with health.py's thresholds."""
    scope, checks = "whole run", []
    episodes = run.episode

    q = run.q_mean
    expected = f"mean Q >= {health.Q_NEGATIVE_THRESHOLD:g} at every episode"
    if not np.isfinite(q).any():
        checks.append(Check(scope, "q_negative", NO_DATA, "no Q data", expected))
    else:
        i = int(np.nanargmin(q))
        below = np.flatnonzero(q < health.Q_NEGATIVE_THRESHOLD)
        if below.size:
            first = int(episodes[below[0]])
            measured = f"{q[below[0]]:.4g} at episode {first:,} (lowest {q[i]:.4g})"
            checks.append(Check(scope, "q_negative", FAIL, measured, expected))
        else:
            measured = f"lowest {q[i]:.4g} at episode {int(episodes[i]):,}"
            checks.append(Check(scope, "q_negative", PASS, measured, expected))

    after = health.LOSS_SPIKE_AFTER_EPISODE
    expected = (
        f"{LOSS_SPIKE_EPISODES}-episode mean loss <= {health.LOSS_SPIKE_THRESHOLD:g} after episode {after}"
    )
    late = episodes >= after
    smooth = rolling_mean(run.loss, LOSS_SPIKE_EPISODES)
    if not np.isfinite(run.loss[late]).any():
        why = "no loss data" if not np.isfinite(run.loss).any() else f"no loss data after episode {after}"
        checks.append(Check(scope, "loss_spike", NO_DATA, why, expected))
    else:
        over = np.flatnonzero(late & (smooth > health.LOSS_SPIKE_THRESHOLD))
        peak = float(np.nanmax(smooth[late]))
        if over.size:
            measured = f"{smooth[over[0]]:.4g} at episode {int(episodes[over[0]]):,} (peak {peak:.4g})"
            checks.append(Check(scope, "loss_spike", FAIL, measured, expected))
        else:
            checks.append(Check(scope, "loss_spike", PASS, f"peak {peak:.4g}", expected))

    window = health.REWARD_DECLINE_WINDOW
    expected = f"no {window}-episode window with t <= {health.REWARD_DECLINE_T:g} and last 100 < first 100"
    have = np.isfinite(run.reward)
    rewards, reward_episodes = run.reward[have], episodes[have]
    if len(rewards) < window:
        checks.append(
            Check(scope, "reward_decline", NO_DATA, f"{len(rewards)} episodes (< {window})", expected)
        )
    else:
        ends = list(range(window, len(rewards) + 1, REWARD_DECLINE_STRIDE))
        if ends[-1] != len(rewards):
            ends.append(len(rewards))
        hit = None
        for end in ends:
            trend = health.reward_trend(rewards[end - window : end])
            if trend.declining:
                hit = (end, trend)
                break
        if hit:
            end, trend = hit
            measured = (
                f"episodes {int(reward_episodes[end - window]):,}-{int(reward_episodes[end - 1]):,}: "
                f"slope {trend.slope:.3g}/ep (t={trend.t_stat:.1f}), "
                f"first-100 mean {trend.head_mean:.4g} -> last-100 {trend.tail_mean:.4g}"
            )
            checks.append(Check(scope, "reward_decline", FAIL, measured, expected))
        else:
            checks.append(
                Check(scope, "reward_decline", PASS, f"{len(ends)} windows, none declining", expected)
            )

    eps = run.epsilon
    limit, before = health.EARLY_EXPLOITATION_EPSILON, health.EARLY_EXPLOITATION_BEFORE_EPISODE
    expected = f"epsilon >= {limit:g} before episode {before:,}"
    if not np.isfinite(eps).any():
        checks.append(Check(scope, "early_exploitation", NO_DATA, "no epsilon data", expected))
    else:
        low = np.flatnonzero((eps < limit) & (episodes < before))
        if low.size:
            measured = f"{eps[low[0]]:.3g} at episode {int(episodes[low[0]]):,}"
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


# --- plot ------------------------------------------------------------------------------------------
def _plot_window(n: int) -> int:
    return max(1, min(50, n // 40))


def needs_markers(ok: np.ndarray) -> bool:
    """Whether a series (its mask of finite points) must be drawn with markers to be seen: it is short,
    or no two of its finite points are neighbours (a line needs two points to draw anything)."""
    if int(ok.sum()) < MARKERS_BELOW_POINTS:
        return True
    edges = np.flatnonzero(np.diff(np.concatenate([[0], ok.astype(np.int8), [0]])))
    longest = int((edges[1::2] - edges[::2]).max()) if edges.size else 0
    return longest < 2


def _draw_races(ax: Any, runs: Sequence[RunSeries], x_axis: str) -> None:
    """Race times of finished episodes (dots) and each run's best so far (line), in the run's colour."""
    no_data, never = [], []
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        if not np.isfinite(run.finished).any():
            no_data.append(run.label)
            continue
        x = run.episode if x_axis == "episode" else run.step
        ok = (run.finished == 1.0) & np.isfinite(run.race_time) & np.isfinite(x)
        if not ok.any():
            never.append(run.label)
            continue
        order = np.argsort(x[ok], kind="stable")
        xs, times = x[ok][order], run.race_time[ok][order]
        ax.plot(xs, times, ls="none", marker="o", ms=3.5, alpha=0.55, color=color, label=run.plot_label)
        ax.plot(xs, np.minimum.accumulate(times), color=color, lw=1.6, drawstyle="steps-post")
    if ax.lines:
        ax.plot([], [], color="gray", lw=1.6, label="best so far")
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no finished episode to show", ha="center", va="center", transform=ax.transAxes)
    title = "race time of finished episodes, s (lower is better)"
    for what, names in (("never finished", never), ("no race data", no_data)):
        if names:  # by name while a panel's title holds them, else how many
            listed = ", ".join(names)
            title += f"  |  {what}: " + (listed if len(listed) <= 40 else f"{len(names)} runs")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("episode" if x_axis == "episode" else "environment step")
    ax.grid(alpha=0.3)


def _draw_evaluations(
    ax: Any,
    runs: Sequence[RunSeries],
    reference: Sequence[RunSeries] = (),
    budget: int | None = None,
    hlines: Sequence[tuple[float, str]] = (),
) -> None:
    """The greedy evaluations against steps: each run's mean return with its spread over the held-out
    tracks (mean +- std), the mean of each group of seeds, the reference's curves, the thresholds."""
    colors: dict[str, str] = {}
    for run in runs:
        key = run.group or run.label
        colors.setdefault(key, f"C{len(colors) % 10}")
    grid_step = EVAL_ROW_EVERY
    groups: dict[str, list[RunSeries]] = {}
    missing = []
    for run in runs:
        evals = [e for e in run.evals if budget is None or e["step"] <= budget]
        if not evals:
            missing.append(run.label)
            continue
        groups.setdefault(run.group or run.label, []).append(run)
        color = colors[run.group or run.label]
        x = np.array([e["step"] for e in evals], dtype=float)
        y = np.array([e["mean"] for e in evals])
        spread = np.array([e.get("std", 0.0) for e in evals])
        grouped = run.group is not None and sum((r.group == run.group) for r in runs) > 1
        ax.plot(x, y, "o-", ms=3, lw=0.9 if grouped else 1.6, alpha=0.45 if grouped else 1.0, color=color,
                label=None if grouped else run.plot_label)  # fmt: skip
        ax.fill_between(x, y - spread, y + spread, color=color, alpha=0.08 if grouped else 0.15, lw=0)
    for label, members in groups.items():
        if len(members) < 2:
            continue
        end = max(m.evals[-1]["step"] for m in members) if budget is None else budget
        grid = np.arange(0, end + 1, grid_step, dtype=float)
        curves = []
        for member in members:
            xs = np.array([e["step"] for e in member.evals], dtype=float)
            ys = np.array([e["mean"] for e in member.evals])
            curves.append(np.interp(grid, xs, ys, left=np.nan, right=np.nan))
        stacked = np.vstack(curves)
        present = np.isfinite(stacked).sum(axis=0)
        mean = np.where(present > 0, np.nansum(stacked, axis=0) / np.maximum(present, 1), np.nan)
        unpinned = " (unpinned)" if any(m.unpinned for m in members) else ""
        ax.plot(grid, mean, lw=2.4, color=colors[label], label=f"{label}{unpinned}: mean of {len(members)}")
    for index, ref in enumerate(r for r in reference if r.evals):
        x = [e["step"] for e in ref.evals if budget is None or e["step"] <= budget]
        y = [e["mean"] for e in ref.evals if budget is None or e["step"] <= budget]
        label = f"reference: {ref.plot_label}" if index < 4 else None
        ax.plot(x, y, ls="--", lw=1.1, color="gray", alpha=0.8, label=label)
    for threshold in THRESHOLDS:
        ax.axhline(threshold, color="k", ls=":", lw=0.7)
    for value, label in hlines:
        ax.axhline(value, color="tab:red", ls="--", lw=1, label=f"{label} ({value:g})")
    title = "greedy evaluation: mean return, held-out tracks (+- std)"
    if missing:
        title += "  |  no evaluations: " + ", ".join(missing)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("environment step")
    ax.grid(alpha=0.3)
    if any(not line.get_label().startswith("_") for line in ax.lines):
        ax.legend(fontsize=8, loc="best")
    if budget is not None:
        ax.set_xlim(0, budget * 1.02)


def _names(runs: Sequence[RunSeries], limit: int = 140) -> str:
    """The runs' names for a title: each group once, each ungrouped run by its label, within `limit`."""
    names = list(dict.fromkeys(run.group or run.plot_label for run in runs))
    text = " vs ".join(names)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def build_figure(
    runs: Sequence[RunSeries],
    envelope: dict[str, Any],
    x_axis: str = "episode",
    reference: Sequence[RunSeries] = (),
    budget: int | None = None,
    hlines: Sequence[tuple[float, str]] = (),
    title: str | None = None,
) -> Any:
    """The comparison figure: one panel per episode metric (each run's smoothed curve over the envelope's
    per-phase bands where the envelope applies), the greedy evaluations and the race times. Runs with no
    episode records (kept curve files) get the evaluation panel alone."""
    from matplotlib.figure import Figure  # no pyplot: no display, no global state

    has_episodes = any(run.episodes for run in runs)
    if not has_episodes:
        figure = Figure(figsize=(11, 6), dpi=100)
        figure.subplots_adjust(left=0.07, right=0.98, bottom=0.09, top=0.88)
        _draw_evaluations(figure.add_subplot(1, 1, 1), runs, reference, budget, hlines)
        figure.suptitle(title or _names(runs), fontsize=11)
        return figure
    figure = Figure(figsize=(17, 9), dpi=100)
    # fixed margins: a constrained layout would double the drawing time for the same picture
    figure.subplots_adjust(left=0.04, right=0.99, bottom=0.06, top=0.915, wspace=0.17, hspace=0.3)
    grid = figure.add_gridspec(2, 3)
    axes = [figure.add_subplot(grid[0, 0]), figure.add_subplot(grid[0, 1]), figure.add_subplot(grid[0, 2])]
    axes.append(figure.add_subplot(grid[1, 0]))
    colors = [f"C{i}" for i in range(10)]
    drawn = any(run.envelope_applies for run in runs) and x_axis == "episode"
    phases = envelope.get("phases", []) if drawn else []
    for ax, (metric, series_name) in zip(axes, METRICS.items(), strict=True):
        missing = []
        envelope_peak = 0.0
        for k, phase in enumerate(phases):
            spec = phase.get(metric)
            band = _band(spec) if isinstance(spec, dict) else None
            if band is None:
                continue
            lo, hi = phase["episodes"]
            tol = _tolerance(metric, band)
            low, high = band
            envelope_peak = max([envelope_peak, *(abs(v) for v in band if math.isfinite(v))])
            first = k == 0
            band_label = f"envelope ({envelope.get('run', 'reference')})" if first else None
            tolerance_label = "tolerance" if first else None
            ax.fill_between(
                [lo, hi], low - tol, high + tol, color="green", alpha=0.08, lw=0, label=tolerance_label
            )
            ax.fill_between([lo, hi], low, high, color="green", alpha=0.22, lw=0, label=band_label)
            if "from" in spec and "to" in spec:
                ax.plot([lo, hi], [spec["from"], spec["to"]], color="green", ls="--", lw=1)
            if "min_allowed" in spec:
                ax.hlines(spec["min_allowed"], lo, hi, color="darkred", ls=":", lw=1)
        data_peak = 0.0
        for i, run in enumerate(runs):
            y = run.metric(series_name)
            x = run.episode if x_axis == "episode" else run.step
            ok = np.isfinite(y) & np.isfinite(x)
            if not ok.any():
                missing.append(run.label)
                continue
            smooth = rolling_mean(y[ok], _plot_window(int(ok.sum())))
            style = {"marker": "o", "ms": 3.5} if needs_markers(ok) else {}
            ax.plot(x[ok], smooth, color=colors[i % 10], lw=1.4, label=run.plot_label, **style)
            data_peak = max(data_peak, float(np.nanmax(np.abs(smooth))))
        thresholds = {
            "q_values": health.Q_NEGATIVE_THRESHOLD,
            "loss": health.LOSS_SPIKE_THRESHOLD,
            "epsilon": health.EARLY_EXPLOITATION_EPSILON,
        }
        if metric in thresholds:
            ax.axhline(thresholds[metric], color="red", ls=":", lw=1, label="red-flag threshold")
        if envelope_peak and data_peak > 20 * envelope_peak:  # a diverged run would flatten the envelope
            ax.set_yscale("symlog", linthresh=max(envelope_peak, 1.0))
        panel = TITLES[metric] + (" (symlog)" if ax.get_yscale() == "symlog" else "")
        if missing:
            panel += "  |  no data: " + ", ".join(missing)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("episode" if x_axis == "episode" else "environment step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    _draw_evaluations(figure.add_subplot(grid[1, 1]), runs, reference, budget, hlines)
    _draw_races(figure.add_subplot(grid[1, 2]), runs, x_axis)
    if title is None:
        against = (
            f"against the {envelope.get('run', 'reference')} envelope"
            if drawn
            else "(the TrackMania envelope is per episode: not drawn against steps)"
            if any(run.envelope_applies for run in runs)
            else "(embedded track: the TrackMania envelope does not apply)"
        )
        title = f"{_names(runs)} {against}"
    figure.suptitle(title, fontsize=11)
    return figure


def plot_runs(
    runs: Sequence[RunSeries], envelope: dict[str, Any], out: Path, x_axis: str = "episode", **options: Any
) -> Path:
    """Draw build_figure's picture into `out` (its folder is created); OSError/ValueError when it cannot."""
    figure = build_figure(runs, envelope, x_axis, **options)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    return out


def plot_path(out: str | None, runs: Sequence[RunSeries]) -> Path:
    """Where the PNG goes: `--out` when given, else comparison.png in the first run's folder (the current
    folder when that run is a W&B run). UsageError, one line, for a path that cannot be a picture file."""
    if out is None:
        folder = runs[0].folder if runs and runs[0].folder is not None else Path()
        return folder / DEFAULT_PLOT_NAME
    path = Path(out)
    if path.is_dir():
        raise UsageError(f"--out {out}: is a folder; give a file name, e.g. {path / DEFAULT_PLOT_NAME}")
    if not path.suffix:  # savefig would add ".png" itself, and we would print the wrong name
        path = path.with_name(path.name + ".png")
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise UsageError(f"--out {out}: {path.suffix!r} is not a picture type matplotlib writes (use .png)")
    for parent in (path.parent, *path.parent.parents):
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"--out {out}: {parent} is a file, not a folder")
    return path


def reference_runs(specs: list[str] | None, runs: Sequence[RunSeries]) -> list[RunSeries]:
    """The reference curves: `--reference` runs, or for embedded-track runs the known-good network's kept
    curves; none with `--reference none`, or when the runs are TrackMania's (their reference is the
    envelope). UsageError in one line for a reference that cannot be read."""
    if specs is None:
        if not runs or any(run.env != "embedded" for run in runs):
            return []
        compared = {Path(run.source).resolve() for run in runs}
        specs = [
            str(path) for path in EMBEDDED_REFERENCE if path.is_file() and path.resolve() not in compared
        ]
    if specs == ["none"]:
        return []
    references = []
    for spec in specs:
        try:
            references.append(load_run(spec))
        except RunLoadError as error:
            raise UsageError(f"--reference {error}") from None
    return references


# --- command line ----------------------------------------------------------------------------------
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None: those options say in words what they default to."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare runs with each other and with the c643zifs reference envelope: unpinned runs, "
        "config departures, race results (finish rate, race times) and a PASS / FAIL / NO VERDICT verdict "
        "per run (NO DATA is never a pass).",
        epilog=EXIT_CODES_HELP,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run folder, metrics.jsonl or kept .jsonl file, or W&B entity/project/run_id; LABEL=RUN names "
        "it, and runs sharing a LABEL are one group (seeds of one arm: a mean curve, a group line)",
    )
    parser.add_argument(
        "--envelope",
        default=None,
        help=f"envelope JSON (default: the built-in copy of {SHARED_ENVELOPE.name})",
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="PATH",
        help=f"PNG to write, its folders created (default: {DEFAULT_PLOT_NAME} in the first run's folder; "
        "in the current folder when that run is a W&B run)",
    )
    parser.add_argument(
        "--x",
        choices=["episode", "step"],
        default=None,
        help="x axis of the episode panels (default: episode where the TrackMania envelope applies, "
        "else step)",
    )
    curves = parser.add_argument_group("greedy evaluations (runs trained with --eval-every)")
    curves.add_argument(
        "--steps", type=int, default=None, help="compare the curves over this many steps (default: the "
        "shortest evaluated run's last evaluation)"
    )  # fmt: skip
    curves.add_argument("--final-evals", type=int, default=3, help="evaluations averaged into 'final'")
    curves.add_argument(
        "--table", action="store_true", help="also print every evaluation as a markdown table"
    )
    curves.add_argument(
        "--keep", default=None, metavar="DIR", help="write each run's start, event and eval records to "
        "DIR/<run>.jsonl: a few kB that compare like the run folder and outlive it"
    )  # fmt: skip
    curves.add_argument(
        "--reference", action="append", default=None, metavar="RUN", help="the reference curve(s) drawn "
        "beside the runs (default for embedded-track runs: the known-good network's kept curves, "
        "bench/curves/curve-pin-s0/s1.jsonl); --reference none draws none"
    )  # fmt: skip
    curves.add_argument(
        "--hline", action="append", default=[], metavar="VALUE=LABEL", help="a horizontal line on the "
        "evaluation panel, e.g. 462='scripted driver'"
    )  # fmt: skip
    curves.add_argument("--title", default=None, help="the figure's title")
    curves.add_argument("--json", default=None, metavar="PATH", help="write the evaluation figures here")
    args = parser.parse_args(argv)
    if args.final_evals < 1:
        parser.error(f"--final-evals must be >= 1, got {args.final_evals}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    lines = []
    for spec in args.hline:
        value, sep, label = spec.partition("=")
        try:
            lines.append((float(value), label.strip() or "reference"))
        except ValueError:
            parser.error(f"--hline {spec!r} is not VALUE=LABEL (e.g. 462=scripted driver)")
    args.hline = lines
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # argparse has printed the usage error
        return EXIT_USAGE if exit_.code else EXIT_OK
    try:
        envelope = load_envelope(args.envelope)
        if args.out is not None:  # before any run is read: a W&B download is not wasted on a bad path
            plot_path(args.out, [])
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE

    runs: list[RunSeries] = []
    errors: list[str] = []
    for spec in args.runs:
        try:
            runs.append(load_run(spec))
        except RunLoadError as error:
            errors.append(str(error))
    seen: dict[str, int] = {}
    for run in runs:  # two runs with the same folder name need distinct labels
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label}#{seen[run.label]}"

    print("Runs:")
    for run in runs:
        counts = [
            f"{run.episodes:,} episodes",
            f"{max(run.last_step, int(np.nanmax(run.step)) if np.isfinite(run.step).any() else 0):,} steps",
        ]
        if run.learn_steps is not None:
            counts.append(f"{run.learn_steps:,} learn steps")
        counts.append(f"{len(run.evals):,} evaluations")
        where = f"; {run.env}" if run.env else ""
        print(f"  {run.label}: {run.source} ({', '.join(counts)}{where})")
    for error in errors:
        print(f"  error: {error}")
    if not runs:
        print("nothing to compare: no run could be read")
        return EXIT_FAILED
    for run in runs:
        if run.unpinned:
            print(unpinned_line(run))

    print()
    print("\n".join(config_table(runs)))
    print()
    print("\n".join(race_table(runs)))
    print()
    print(
        f"Envelope {envelope.get('run', '?')} (weak evidence: a check fails only on a clear contradiction; "
        f"levels on a {SMOOTH_EPISODES}-episode mean):"
    )
    summary, verdicts = [], set()
    for run in runs:
        checks = check_run(run, envelope)
        print("\n".join(format_checks(run, checks)))
        if not run.envelope_applies:
            print(
                "  (embedded track: the envelope's phases are TrackMania's, not checked; the red flags are)"
            )
        print()
        verdicts.add(run_verdict(checks))
        summary.append("  " + verdict_line(run, checks))
    print("Summary:")
    print("\n".join(summary))
    for error in errors:
        print(f"  not compared: {error}")

    budget = evaluation_budget(runs, args.steps)
    if budget is not None:
        lines, figures = evaluation_table(runs, budget, args.final_evals)
        print()
        print("\n".join(lines))
        if args.table:
            print()
            print(markdown_table(runs, budget))
        if args.json:
            try:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps({"budget": budget, "groups": figures}, indent=2) + "\n")
            except OSError as error:
                print(f"error: --json {args.json}: {error.strerror or error}", file=sys.stderr)
                return EXIT_USAGE
    try:
        if args.keep:
            for run in runs:
                if run.records:
                    print(f"kept: {keep_curve(run, Path(args.keep))}")
        reference = reference_runs(args.reference, runs)
        x_axis = args.x or ("episode" if any(run.envelope_applies for run in runs) else "step")
        options = dict(reference=reference, budget=budget, hlines=args.hline, title=args.title)
        out = plot_runs(runs, envelope, plot_path(args.out, runs), x_axis, **options)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError) as error:  # no permission, full disk, a name the OS refuses
        first_line = (str(error).strip().splitlines() or [""])[0][:160]
        print(
            f"error: cannot write the plot ({type(error).__name__}: {first_line}); give another --out PATH",
            file=sys.stderr,
        )
        return EXIT_USAGE
    print(f"Plot: {out}")
    if FAIL in verdicts or errors:
        return EXIT_FAILED
    return EXIT_NO_VERDICT if NO_VERDICT in verdicts else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
