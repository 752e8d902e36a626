"""Run logs for the tests of compare_runs.py and its parts: metrics.jsonl files as env_tm.py writes them (a
healthy run inside the c643zifs envelope, the seed's failed run, race results)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np

import run_checks
from run_checks import DEFAULT_ENVELOPE
from tm_config import Config, epsilon_at

CONFIG = Config()


FAILED_RUN = DEFAULT_ENVELOPE["failed_run"]["trajectory"]


def piecewise(episode: np.ndarray, segments: list[tuple[float, float, float, float]]) -> np.ndarray:
    """Linear pieces (episode_from, episode_to, value_from, value_to), held at the ends."""
    xs = [segments[0][0]] + [s[1] for s in segments]
    ys = [segments[0][2]] + [s[3] for s in segments]
    return np.interp(episode, xs, ys)


def write_run(
    folder: Path,
    episodes: dict[str, np.ndarray],
    departures: dict[str, Any] | None = None,
    steps: list[dict[str, Any]] | None = None,
    events: list[dict[str, Any]] | None = None,
    unpinned: list[str] | None = None,
    env: str = "trackmania",
) -> Path:
    """A metrics.jsonl as env_tm.py writes it: run, episode, step and event records; NaN as "nan". A None
    episode value leaves the key out of that record (race_time is only written for finished episodes);
    `unpinned` goes into the start record as env_tm.py writes it (older runs have no such key). A
    TrackMania run by default: the envelope's phases are checked for TrackMania runs only."""

    def clean(value: Any) -> Any:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        if isinstance(value, (float, np.floating)):
            return float(value) if math.isfinite(value) else str(float(value))
        if isinstance(value, np.integer):
            return int(value)
        return value

    folder.mkdir(parents=True, exist_ok=True)
    start = {"kind": "run", "step": 0, "event": "start", "env": env, "departures": departures or {}}
    if unpinned is not None:
        start["unpinned"] = unpinned
    records: list[dict[str, Any]] = [start]
    for i in range(len(episodes["episode"])):
        record = {"kind": "episode", "length": 250, "terminated": True, "beta": 1.0, "seconds": 12.5}
        record.update({key: clean(values[i]) for key, values in episodes.items() if values[i] is not None})
        records.append(record)
    records += steps or []
    records += events or []
    with open(folder / "metrics.jsonl", "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")
    return folder


def healthy_episodes(n: int = 2500, seed: int = 0) -> dict[str, np.ndarray]:
    """Inside the c643zifs envelope: 252-step episodes put the pinned step schedule's epsilon at 0.95,
    0.85, 0.75 at episodes 500, 1500, 2500, as the seed reports."""
    rng = np.random.default_rng(seed)
    episode = np.arange(1, n + 1)
    step = 252 * episode
    q = piecewise(episode, [(0, 500, 0, 20), (500, 1500, 20, 40), (1500, 2500, 40, 50)]) + rng.normal(0, 1, n)
    loss = piecewise(episode, [(0, 500, 6, 3), (500, 1500, 2, 1.5), (1500, 2500, 1.2, 1.0)])
    reward = piecewise(episode, [(0, 500, 10, 40), (500, 1500, 50, 100), (1500, 2500, 100, 140)])
    return {
        "episode": episode,
        "step": step,
        "reward": reward + rng.normal(0, 10, n),
        "q_mean": q,
        "loss": loss + rng.normal(0, 0.3, n),
        "epsilon": np.array([epsilon_at(int(s) - 1, CONFIG) for s in step]),
    }


def failed_episodes(seed: int = 0) -> dict[str, np.ndarray]:
    """The seed's failed run (soft updates + cosine scheduler): envelope.failed_run.trajectory for Q and
    loss, epsilon 0.9 -> 0.01 over 1000 episodes, rewards falling apart after Q collapses."""
    rng = np.random.default_rng(seed)
    episode = np.arange(1, 701)
    q = piecewise(episode, [(*t["episodes"], *t["q"]) for t in FAILED_RUN])
    loss = piecewise(episode, [(*t["episodes"], *t["loss"]) for t in FAILED_RUN])
    reward = piecewise(episode, [(0, 400, 10, 60), (400, 700, 60, 5)])
    return {
        "episode": episode,
        "step": 150 * episode,
        "reward": reward + rng.normal(0, 8, 700),
        "q_mean": q,
        "loss": loss + rng.normal(0, 0.2, 700),
        "epsilon": np.maximum(0.01, 0.9 - 0.89 * episode / 1000),
    }


FAILED_DEPARTURES = {"learning_rate": {"pinned": 0.0001, "used": 0.001}}


def by_name(checks: list[run_checks.Check]) -> dict[tuple[str, str], str]:
    return {(c.scope, c.name): c.status for c in checks}


def race_episodes(finished: list[bool | None], times: dict[int, float], n_steps: int = 252) -> dict[str, Any]:
    """Episodes 1..n with the healthy curves plus the race fields as env_tm.py writes them: `finished`
    (None: not recorded), and `race_time` only on finished episodes (episode number -> seconds)."""
    episodes: dict[str, Any] = {k: v[: len(finished)] for k, v in healthy_episodes(len(finished)).items()}
    episodes["step"] = n_steps * episodes["episode"]
    episodes["finished"] = np.array(finished, dtype=object)
    episodes["race_time"] = np.array([times.get(i + 1) for i in range(len(finished))], dtype=object)
    return episodes


# 10 episodes, 5 finished; the best time (47.25 s) comes at episode 8, step 8 * 252 = 2,016
RACE_FINISHED = [False, True, False, True, True, False, False, True, False, True]


RACE_TIMES = {2: 50.0, 4: 48.5, 5: 49.0, 8: 47.25, 10: 48.0}


def read_png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height
