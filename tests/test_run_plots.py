"""run_plots.py: the comparison's figure draws every run, with markers where a line would draw nothing, and
the race panel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from run_logs import (
    RACE_FINISHED,
    RACE_TIMES,
    healthy_episodes,
    race_episodes,
    read_png_size,
    write_run,
)

import compare_runs
import run_plots
from run_checks import DEFAULT_ENVELOPE
from run_records import load_run


def test_plot_against_steps(tmp_path: Path) -> None:
    run = load_run(str(write_run(tmp_path / "r", healthy_episodes(400))))
    out = compare_runs.plot_runs([run], DEFAULT_ENVELOPE, tmp_path / "steps.png", x_axis="step")
    assert read_png_size(out) == (1700, 900)


@pytest.mark.parametrize("x_axis", ["episode", "step"])
def test_race_panel_draws_finished_times_and_best_so_far(tmp_path: Path, x_axis: str) -> None:
    racer = load_run(str(write_run(tmp_path / "racer", race_episodes(RACE_FINISHED, RACE_TIMES))))
    old = load_run(str(write_run(tmp_path / "old", healthy_episodes(10))))
    never = load_run(str(write_run(tmp_path / "never", race_episodes([False] * 4, {}))))
    figure = run_plots.build_figure([racer, old, never], DEFAULT_ENVELOPE, x_axis=x_axis)
    race = figure.axes[5]
    assert race.get_title().startswith("race time of finished episodes")
    assert "never finished: never" in race.get_title() and "no race data: old" in race.get_title()
    dots, best = race.lines[0], race.lines[1]
    scale = 1 if x_axis == "episode" else 252
    assert list(dots.get_xdata()) == [scale * e for e in (2, 4, 5, 8, 10)]
    assert list(dots.get_ydata()) == [50.0, 48.5, 49.0, 47.25, 48.0] and dots.get_linestyle() == "None"
    assert list(best.get_ydata()) == [50.0, 48.5, 48.5, 47.25, 47.25]
    assert best.get_drawstyle() == "steps-post" and best.get_color() == dots.get_color()
    assert race.get_xlabel() == ("episode" if x_axis == "episode" else "environment step")


# --- plots -----------------------------------------------------------------------------------------
def run_line(ax: Any, label: str) -> Any:
    return next(line for line in ax.lines if line.get_label() == label)


def test_short_and_gappy_series_are_drawn_with_markers(tmp_path: Path) -> None:
    single = load_run(str(write_run(tmp_path / "single", healthy_episodes(1))))
    long = load_run(str(write_run(tmp_path / "long", healthy_episodes(400))))
    gappy = load_run(str(write_run(tmp_path / "gappy", healthy_episodes(400))))
    gappy.step[:] = np.nan  # no steps: the gaps cannot be interpolated, the points stay isolated
    gappy.q_mean[np.arange(400) % 3 != 0] = np.nan  # 134 points, no two of them neighbours
    figure = run_plots.build_figure([single, long, gappy], DEFAULT_ENVELOPE)
    reward, q = figure.axes[0], figure.axes[1]
    assert run_line(reward, "single").get_marker() == "o"
    assert len(run_line(reward, "single").get_xdata()) == 1
    assert run_line(reward, "long").get_marker() == "None"
    assert run_line(reward, "gappy").get_marker() == "None"  # its rewards are complete
    assert run_line(q, "gappy").get_marker() == "o"

    assert run_plots.needs_markers(np.ones(1, dtype=bool))
    assert run_plots.needs_markers(np.ones(49, dtype=bool))
    assert not run_plots.needs_markers(np.ones(50, dtype=bool))
    assert run_plots.needs_markers(np.arange(300) % 2 == 0)  # 150 points, none next to another
    assert not run_plots.needs_markers(np.arange(300) % 3 != 0)  # pairs of neighbours
