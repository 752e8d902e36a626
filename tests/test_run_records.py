"""run_records.py: runs are read and normalised to per-episode series (keys detected, step records filling
what episodes lack, race results, the config a run used)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from run_logs import (
    healthy_episodes,
    race_episodes,
    write_run,
)

import compare_runs
import run_records
from run_records import config_from_records, load_run
from tm_config import Config


def test_step_records_fill_what_episode_records_lack(tmp_path: Path) -> None:
    episodes = {"episode": np.arange(1, 11), "step": 100 * np.arange(1, 11), "reward": np.ones(10)}
    steps = [
        {"kind": "step", "step": s, "q_mean": s / 100.0, "loss": 2.0, "epsilon": 0.9} for s in (150, 550, 950)
    ]
    run = load_run(str(write_run(tmp_path / "per-step", episodes, steps=steps)))
    assert np.isnan(run.q_mean[0])  # before the first step record: not extrapolated
    assert run.q_mean[1] == pytest.approx(2.0) and run.q_mean[8] == pytest.approx(9.0)
    assert np.isnan(run.q_mean[9])


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("ent/proj/abc123", "ent/proj/abc123"),
        ("wandb:ent/proj/abc123", "ent/proj/abc123"),
        ("ent/proj/runs/abc123", "ent/proj/abc123"),
        ("https://wandb.ai/ent/my-proj/runs/abc123?nw=1", "ent/my-proj/abc123"),
        ("checkpoints/run", None),
        ("a/b/c/d", None),
    ],
)
def test_parse_wandb_path(spec: str, expected: str | None) -> None:
    assert run_records.parse_wandb_path(spec) == expected


def test_detect_keys_maps_common_names() -> None:
    keys = run_records.detect_keys(
        [
            "_step",
            "_runtime",
            "episode/episode",
            "episode/reward",
            "episode/q_mean",
            "step/loss",
            "step/epsilon",
        ]
    )
    assert keys == {
        "episode": "episode/episode",
        "step": "_step",
        "reward": "episode/reward",
        "q_mean": "episode/q_mean",
        "loss": "step/loss",
        "epsilon": "step/epsilon",
    }
    loose = run_records.detect_keys(["train/avg_reward_per_episode", "charts/q_value_greedy", "losses/iqn"])
    assert loose["reward"] == "train/avg_reward_per_episode" and loose["q_mean"] == "charts/q_value_greedy"
    assert loose["loss"] is None and loose["episode"] is None


def test_a_recorded_key_without_its_value_is_still_reported(tmp_path: Path) -> None:
    run = load_run(str(write_run(tmp_path / "r", healthy_episodes(30), unpinned=["learning_rate"])))
    assert run_records.unpinned_line(run) == (
        "UNPINNED r: departs from the sacred learning_rate (0.0001, pinned 0.0001)"
    )  # the config says pinned but the run says unpinned: the record wins, and the value is shown as is
    run.unpinned = {"learning_rate": None}
    assert run_records.unpinned_line(run).endswith("learning_rate (value not recorded, pinned 0.0001)")


def test_race_results_over_the_episodes_that_record_them(tmp_path: Path) -> None:
    finished: list[bool | None] = [None] * 6 + [True, False, True, False]  # a run upgraded mid-way
    run = load_run(str(write_run(tmp_path / "mixed", race_episodes(finished, {7: 61.5, 9: 60.25}))))
    summary = run_records.race_summary(run)
    assert summary is not None and (summary.episodes, summary.finished, summary.best) == (4, 2, 60.25)
    assert summary.median == pytest.approx(60.875) and summary.best_episode == 9
    assert compare_runs.race_table([run])[-1] == (
        "  mixed: 4 of 10 episodes record `finished` (the others predate it); its finish rate is over those"
    )


def test_a_race_time_without_a_finish_is_not_a_race(tmp_path: Path) -> None:
    episodes = race_episodes([True, False, True], {1: 55.0, 3: 52.0})
    episodes["race_time"][1] = 40.0  # a stray value on an unfinished episode must not become the best
    run = load_run(str(write_run(tmp_path / "stray", episodes)))
    assert np.isnan(run.race_time[1]) and run.race_time[2] == 52.0
    assert run_records.race_summary(run).best == 52.0


def test_config_from_records_applies_departures() -> None:
    records = [{"kind": "run", "departures": {"epsilon_decay_to": {"pinned": 2_500_000, "used": 1000}}}]
    assert config_from_records(records).epsilon_decay_to == 1000
    assert config_from_records([]) == Config()
    assert config_from_records([{"kind": "run", "departures": {"nope": {"used": 1}}}]) == Config()
