"""Learning curves of several runs side by side: steps to a mean evaluation return of 400 and 700, the
final return, and one PNG with a line per run and the mean of each group.

    python bench/compare_curves.py --run pin=checkpoints/curve-pin-s0 --run pin=checkpoints/curve-pin-s1 \
        --run demos=checkpoints/curve-demos-s0 --png bench/curves_demos.png --json bench/results/demos.json

Runs are `env_tm.py` runs with `--eval-every` (their `eval` records: the greedy policy, noise off, on the
held-out tracks). `--run LABEL=DIR` is repeatable; runs with the same label are one group (seeds). The
figures use every evaluation up to `--steps` (default: the shortest run's last evaluation), so groups are
compared over the same budget. "Steps to 400" is the first evaluation whose mean reached 400; "final" is
the mean of the last `--final-evals` evaluations within the budget (one evaluation is noisy).

A run's folder holds its checkpoints and does not outlive the machine it ran on; `--keep DIR` writes each
run's start, event and evaluation records to `DIR/<run name>.jsonl` (a few kB), and `--run LABEL=FILE.jsonl`
reads such a kept file, so finished curves can be committed and compared with runs of a later sitting:

    python bench/compare_curves.py --run pin=bench/curves/curve-pin-s0.jsonl \
        --run pin=checkpoints/curve-pin-s1
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import write_json  # noqa: E402

from run_log import METRICS_FILE, read_jsonl  # noqa: E402

THRESHOLDS = (400.0, 700.0)
EVAL_EVERY = 10_000  # the curves' --eval-every: the plot's grid and the table's rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run", action="append", required=True, metavar="LABEL=DIR", help="a run folder or a kept .jsonl"
    )
    parser.add_argument("--steps", type=int, default=None, help="the budget (default: the shortest run's)")
    parser.add_argument("--final-evals", type=int, default=3, help="evaluations averaged for 'final'")
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--title", default="Greedy evaluation on 5 held-out tracks (embedded track)")
    parser.add_argument("--reference", type=float, default=None, help="a horizontal line (e.g. the demos')")
    parser.add_argument("--reference-label", default="reference")
    parser.add_argument(
        "--table", action="store_true", help="also print every evaluation as a markdown table"
    )
    parser.add_argument("--keep", type=Path, default=None, help="write each run's records to DIR/<run>.jsonl")
    return parser.parse_args()


KEPT_KINDS = ("run", "event", "eval")  # departures (start record), red flags and rollbacks, the curve


def load(spec: str) -> tuple[str, Path, list[dict[str, Any]]]:
    label, sep, folder = spec.partition("=")
    if not sep or not label or not folder:
        raise SystemExit(f"error: --run {spec!r} is not LABEL=DIR")
    kept = folder.endswith(".jsonl")
    path = Path(folder) if kept else Path(folder) / METRICS_FILE
    if not path.is_file():
        raise SystemExit(f"error: no {path.name} in {path.parent}")
    records = [r for r in read_jsonl(path) if r["kind"] in KEPT_KINDS]
    evals = [r for r in records if r["kind"] == "eval"]
    if not evals:
        raise SystemExit(f"error: {path} has no eval records (train with --eval-every)")
    return marked(label, records), path.with_suffix("") if kept else Path(folder), records


def marked(label: str, records: list[dict[str, Any]]) -> str:
    """The label, marked "(unpinned: ...)" when the run departed from a sacred schedule (issue 25: the
    curves of sections 6-10 ran with a shortened epsilon schedule and were labelled "pin")."""
    unpinned = sorted({key for r in records if r.get("event") == "start" for key in r.get("unpinned") or []})
    return f"{label} (unpinned: {', '.join(unpinned)})" if unpinned else label


def keep(records: list[dict[str, Any]], name: str, folder: Path) -> Path:
    path = folder / f"{name}.jsonl"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    except OSError as error:
        raise SystemExit(f"error: cannot keep the curve in {path}: {error.strerror or error}") from None
    return path


def steps_to(evals: list[dict[str, Any]], threshold: float) -> int | None:
    return next((int(r["step"]) for r in evals if r["return_mean"] >= threshold), None)


def within_budget(evals: list[dict[str, Any]], budget: int, folder: Path) -> list[dict[str, Any]]:
    within = [r for r in evals if r["step"] <= budget]
    if not within:
        raise SystemExit(f"error: {folder.name} has no evaluation within the budget of {budget:,} steps")
    return within


def summarize(evals: list[dict[str, Any]], final_evals: int) -> dict[str, Any]:
    finals = [r["return_mean"] for r in evals[-final_evals:]]
    return {
        **{f"steps_to_{int(t)}": steps_to(evals, t) for t in THRESHOLDS},
        "final": float(np.mean(finals)),
        "best": float(max(r["return_mean"] for r in evals)),
        "last_step": int(evals[-1]["step"]),
        "evaluations": len(evals),
    }


def fmt_steps(value: int | None) -> str:
    return "not reached" if value is None else f"{value:,}"


def main() -> int:
    args = parse_args()
    loaded = [load(spec) for spec in args.run]
    if args.keep:
        for _, folder, records in loaded:
            print(f"kept: {keep(records, folder.name, args.keep)}")
    runs = [(label, folder, [r for r in records if r["kind"] == "eval"]) for label, folder, records in loaded]
    budget = args.steps or min(int(evals[-1]["step"]) for _, _, evals in runs)
    runs = [(label, folder, within_budget(evals, budget, folder)) for label, folder, evals in runs]
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    print(f"budget: {budget:,} steps; 'final' = mean of the last {args.final_evals} evaluations within it\n")
    print(f"{'run':<34} {'steps to 400':>13} {'steps to 700':>13} {'final':>8} {'best':>8}")
    for label, folder, evals in runs:
        figures = summarize(evals, args.final_evals)
        groups[label].append({"run": folder.name, **figures})
        print(
            f"{label + ': ' + folder.name:<34} {fmt_steps(figures['steps_to_400']):>13} "
            f"{fmt_steps(figures['steps_to_700']):>13} {figures['final']:>8.1f} {figures['best']:>8.1f}"
        )
    print(
        f"\n{'group':<20} {'runs':>4} {'steps to 400 (each)':>24} {'steps to 700 (each)':>24} "
        f"{'final mean':>11}"
    )
    summary = {}
    for label, members in groups.items():
        finals = [m["final"] for m in members]
        summary[label] = {"runs": members, "final_mean": float(np.mean(finals))}
        to_400 = ", ".join(fmt_steps(m["steps_to_400"]) for m in members)
        to_700 = ", ".join(fmt_steps(m["steps_to_700"]) for m in members)
        print(f"{label:<20} {len(members):>4} {to_400:>24} {to_700:>24} {np.mean(finals):>11.1f}")
    if args.table:
        print("\n" + markdown_table(runs))
    if args.png:
        plot(runs, budget, args)
        print(f"\ncurves: {args.png}")
    write_json(
        args.json, {"budget": budget, "groups": summary, "args": {k: str(v) for k, v in vars(args).items()}}
    )
    return 0


def markdown_table(runs: list[tuple[str, Path, list[dict[str, Any]]]]) -> str:
    """One row per EVAL_EVERY steps (an evaluation runs at the first episode end after its step is due), one
    column per run: mean +- std over the tracks."""
    cells: dict[int, dict[int, str]] = defaultdict(dict)
    for column, (_, _, evals) in enumerate(runs):
        for r in evals:
            cells[r["step"] // EVAL_EVERY * EVAL_EVERY][column] = (
                f"{r['return_mean']:.1f} ± {r.get('return_std', 0.0):.0f}"
            )
    header = ["step (due)"] + [f"{label}: {folder.name}" for label, folder, _ in runs]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for step in sorted(cells):
        row = [f"{step:,}"] + [cells[step].get(column, "") for column in range(len(runs))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(runs: list[tuple[str, Path, list[dict[str, Any]]]], budget: int, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = list(dict.fromkeys(label for label, _, _ in runs))
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    for index, label in enumerate(labels):
        colour = colours[index % len(colours)]
        members = [evals for name, _, evals in runs if name == label]
        grid = np.arange(0, budget + 1, EVAL_EVERY)
        curves = []
        for evals in members:
            steps = np.array([r["step"] for r in evals])
            means = np.array([r["return_mean"] for r in evals])
            ax.plot(steps, means, "-", color=colour, alpha=0.35, lw=1)
            curves.append(np.interp(grid, steps, means, right=np.nan))
        stacked = np.vstack(curves)
        present = (~np.isnan(stacked)).sum(axis=0)  # grid points past a run's last evaluation are NaN
        mean = np.where(present > 0, np.nansum(stacked, axis=0) / np.maximum(present, 1), np.nan)
        ax.plot(grid, mean, "o-", color=colour, lw=2, ms=3, label=f"{label} (mean of {len(members)})")
    for threshold in THRESHOLDS:
        ax.axhline(threshold, color="k", ls=":", lw=0.8)
    if args.reference is not None:
        ax.axhline(
            args.reference,
            color="tab:red",
            ls="--",
            lw=1,
            label=f"{args.reference_label} ({args.reference:.0f})",
        )
    ax.set_xlim(0, budget * 1.02)
    ax.set_xlabel("environment steps (50 ms each)")
    ax.set_ylabel("mean greedy return, 5 held-out tracks")
    ax.set_title(args.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
