"""The comparison's picture (matplotlib, imported only when drawing): each run's curves over the envelope's
bands, the greedy evaluations with their spread and the reference's, and the race times, in one PNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import red_flags
from run_checks import METRICS, TITLES, band_tolerance, envelope_band, rolling_mean
from run_records import EVAL_ROW_EVERY, THRESHOLDS, RunSeries, UsageError

DEFAULT_PLOT_NAME = "comparison.png"


# A series this short, or without two finite points in a row, is drawn with markers: a line through a
# single point (or through points isolated between NaNs) draws nothing.
MARKERS_BELOW_POINTS = 50


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
            band = envelope_band(spec) if isinstance(spec, dict) else None
            if band is None:
                continue
            lo, hi = phase["episodes"]
            tol = band_tolerance(metric, band)
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
            "q_values": red_flags.Q_NEGATIVE_THRESHOLD,
            "loss": red_flags.LOSS_SPIKE_THRESHOLD,
            "epsilon": red_flags.EARLY_EXPLOITATION_EPSILON,
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
