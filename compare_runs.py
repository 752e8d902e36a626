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
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from run_checks import (
    FAIL,
    NO_VERDICT,
    SHARED_ENVELOPE,
    SMOOTH_EPISODES,
    check_run,
    format_checks,
    load_envelope,
    run_verdict,
    verdict_line,
)
from run_plots import DEFAULT_PLOT_NAME, plot_path, plot_runs
from run_records import (
    EMBEDDED_REFERENCE,
    RunLoadError,
    RunSeries,
    UsageError,
    curve_summary,
    evaluation_budget,
    evaluation_cadence,
    keep_curve,
    load_run,
    race_summary,
    same_value,
    unpinned_line,
)
from tm_config import Config

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_VERDICT = 0, 1, 2, 3


EXIT_CODES_HELP = (
    "exit codes: 0 every run PASSes; 1 a run FAILs or could not be read; 3 none failed but a run had too "
    "little data to judge (NO VERDICT: no check passed, or NO DATA is the majority of its checks); 2 usage "
    "errors (bad arguments, unreadable envelope, a PNG path that cannot be written)"
)


def _steps_text(value: int | None) -> str:
    return "not reached" if value is None else f"{value:,}"


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
        if all(same_value(present[0], v) for v in present[1:]):
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
