"""The runs compare_runs.py reads, normalised: our JSONL run logs (a run folder or its metrics.jsonl, a kept
curve file) and W&B runs become a `RunSeries` of per-episode arrays (episode, steps, reward, Q mean, loss,
epsilon, the race), with the run's config, unpinned sacred keys, red-flag events, greedy evaluations and
the most negative reward it recorded. Also the evaluations' figures (steps to 400 / 700, final, best) and
the race summary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import health
from run_log import METRICS_FILE, read_jsonl, wandb_logged_in
from tm_config import SACRED_FLAGS, Config, ConfigError, unpinned_keys

SERIES = ("reward", "q_mean", "loss", "epsilon")


RACE_SERIES = ("finished", "race_time")


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
    # per episode, the most negative reward recorded by then (0 before one is): moves q_negative's floor;
    # None when the run did not record it (W&B runs)
    min_reward: np.ndarray | None = None
    # per episode, the mean Q the live monitor judged (the record's q_mean) where `q_mean` above is the
    # greedy Q the reference logged; None when they are the same series (no q_greedy recorded, W&B runs)
    q_monitored: np.ndarray | None = None
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


def config_from_records(records: Iterable[dict[str, Any]]) -> Config:
    """The config a run used: the known-good one plus the departures of its first "run" record."""
    for record in records:
        if record.get("kind") != "run" or not isinstance(record.get("departures"), dict):
            continue
        known = {f.name for f in dataclasses.fields(Config)}
        overrides = {
            key: value["used"]
            for key, value in record["departures"].items()
            if key in known and isinstance(value, dict) and "used" in value
        }
        try:
            return Config().with_overrides(**overrides)
        except ConfigError:  # written by another version of the config: judge it by the pinned one
            return Config()
    return Config()


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
    config = config_from_records(records).to_dict()
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
    q_monitored = None
    if any(r.get("q_greedy") is not None for r in records if r.get("kind") in ("episode", "step")):
        monitored: dict[float, float] = {}
        for r in records:
            if r.get("kind") == "episode" and (e := health.to_float(r.get("episode"))) is not None:
                q = health.to_float(r.get("q_mean"))
                monitored[e] = math.nan if q is None else q
        q_monitored = np.asarray([monitored.get(e, math.nan) for e in series["episode"]], dtype=np.float64)
    lows = sorted(
        (s, v)
        for r in records
        if r.get("kind") == "step"
        and (s := health.to_float(r.get("step"))) is not None
        and (v := health.to_float(r.get("min_reward"))) is not None
        and math.isfinite(s)
        and math.isfinite(v)
    )
    min_reward = np.zeros(len(series["step"]))
    if lows:  # each episode sees the step records at or before its last step
        at, low = np.asarray(lows).T
        running = np.minimum(0.0, np.minimum.accumulate(low))
        seen = np.searchsorted(at, series["step"], side="right")
        ok = (seen > 0) & np.isfinite(series["step"])
        min_reward[ok] = running[seen[ok] - 1]
    return RunSeries(
        _label_for(file),
        str(file),
        **series,
        config=config,
        red_flags=flags,
        min_reward=min_reward,
        q_monitored=q_monitored,
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


def evaluation_budget(runs: Sequence[RunSeries], steps: int | None) -> int | None:
    """The steps the curves are compared over: `--steps`, else the shortest evaluated run's last one."""
    evaluated = [run for run in runs if run.evals]
    if not evaluated:
        return None
    return steps if steps is not None else min(run.evals[-1]["step"] for run in evaluated)


def evaluation_cadence(runs: Sequence[RunSeries]) -> int:
    """The runs' --eval-every, as their evaluations show it: the median gap between two, to the thousand
    (an evaluation runs at the first episode end after its step is due, a little after it)."""
    gaps = [b["step"] - a["step"] for run in runs for a, b in zip(run.evals, run.evals[1:], strict=False)]
    if not gaps:
        return EVAL_ROW_EVERY
    return max(1_000, int(round(float(np.median(gaps)) / 1_000)) * 1_000)


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
        return [key for key, value in sacred.items() if not same_value(value, pinned[key])]


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
def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


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
