"""Learning parity over many seeds: N seeds of two or more arms on the embedded track, a small network and
short runs, each arm's area under its evaluation curve and final return, and every arm's paired difference
against the first with a bootstrap 95% interval.

    python bench/parity.py --seeds 10 --jobs 2 \
        --arm "inline=--learner inline" --arm "beside=--learner beside" \
        --arm "stale=--learner beside --set simulator_max_lag=100000 --set actor_refresh_learn_steps=100000" \
        --keep bench/parity --png bench/parity.png

An arm is `LABEL=ARGS`: env_tm.py arguments added to the harness's own (below), or `LABEL@DIR=ARGS` to run
env_tm.py from another checkout of this repository (bisecting across commits: `git worktree add DIR REV`).
Each seed is one run of each arm with the same `--seed`, so arms are compared seed by seed (paired). Runs
go to `--root` (default checkpoints/parity); `--keep DIR` copies each run's start, evaluation and episode
records to DIR/<label>-s<seed>.jsonl, and `--from-kept DIR` reports from such files without running.

The harness (recorded departures, chosen so that a run learns something clear in a few minutes on one
CPU core: from about -60 at step 0 to 100-250 by 8,000 steps on the held-out tracks) is HARNESS below:
a network with 8/16 conv channels and 64 hidden units, batch 16, 3-step returns, gamma 0.99, learning rate
5e-4, a hard target copy every 300 learn steps, epsilon 1 -> 0.01 over 2,000 steps, 300-step episodes.
It departs from the sacred three (`--unpin-*`), so it measures how the modes compare, not what the pinned
network reaches; BENCHMARKS.md (section 11) has the pinned network's curves beside it.

Figures per run: `auc`, the mean evaluation return over the run (trapezoids between evaluations,
divided by the steps: the area under the curve per step); `final`, the mean of the last two
evaluations; `train`, the mean return of the training episodes. Per arm: the mean, the interquartile mean
(IQM: the mean of the middle half of the seeds, robust to one runaway seed) and the paired difference
against the first arm with a 95% percentile-bootstrap interval over seeds (10,000 resamples): an interval
that excludes 0 is a difference these seeds show; one that includes 0 is not.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from run_log import METRICS_FILE, read_jsonl  # noqa: E402

HARNESS = [
    "--env", "embedded", "--no-wandb", "--threads", "1", "--device", "cpu", "--fresh",
    "--unpin-epsilon", "--unpin-learning-rate", "--unpin-target-update",
    "--set", "conv_channels_1=8", "--set", "conv_channels_2=16", "--set", "car_feature_hidden_dim=32",
    "--set", "hidden_dim=64", "--set", "cosine_dim=32", "--set", "batch_size=16", "--set", "n_step=3",
    "--set", "discount_factor=0.99", "--set", "learning_rate=0.0005",
    "--set", "target_network_update_frequency=300", "--set", "epsilon_decay_to=2000",
    "--set", "ep_max_length=300", "--set", "max_buffer_size=20000", "--set", "checkpoint_frequency=1000",
]  # fmt: skip
KEPT_KINDS = ("run", "eval", "episode")
BOOTSTRAP_RESAMPLES = 10_000


@dataclass
class Arm:
    label: str
    args: list[str]
    code: Path = ROOT  # the checkout whose env_tm.py runs this arm


@dataclass
class Result:
    arm: str
    seed: int
    evals: list[tuple[int, float]]  # (step, mean greedy return on the held-out tracks)
    train_returns: list[float] = field(default_factory=list)

    def auc(self, budget: int) -> float:
        """Mean evaluation return per step up to `budget` (trapezoids; the last value held to the budget)."""
        points = [(s, r) for s, r in self.evals if s <= budget]
        if not points:
            return math.nan
        area = sum((s1 - s0) * (r0 + r1) / 2 for (s0, r0), (s1, r1) in zip(points, points[1:], strict=False))
        area += (budget - points[-1][0]) * points[-1][1]
        return area / budget if budget > points[0][0] else points[0][1]

    def final(self, budget: int) -> float:
        returns = [r for s, r in self.evals if s <= budget][-2:]
        return float(np.mean(returns)) if returns else math.nan

    def train(self) -> float:
        return float(np.mean(self.train_returns)) if self.train_returns else math.nan


def parse_arm(spec: str) -> Arm:
    head, sep, args = spec.partition("=")
    label, _, code = head.partition("@")
    if not sep or not label.strip():
        raise SystemExit(f"error: --arm {spec!r} is not LABEL=ARGS (or LABEL@DIR=ARGS)")
    folder = Path(code).resolve() if code else ROOT
    if not (folder / "env_tm.py").is_file():
        raise SystemExit(f"error: --arm {label}: no env_tm.py in {folder}")
    return Arm(label.strip(), shlex.split(args), folder)


def run_name(label: str, seed: int) -> str:
    return f"{label}-s{seed}"


def command(arm: Arm, seed: int, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, str(arm.code / "env_tm.py"), *HARNESS,
        "--steps", str(args.steps), "--eval-every", str(args.eval_every),
        "--eval-episodes", str(args.eval_episodes), "--seed", str(seed),
        "--checkpoint-root", str(args.root), "--run-name", run_name(arm.label, seed), *arm.args,
    ]  # fmt: skip


def records_to_result(label: str, seed: int, records: list[dict[str, Any]]) -> Result:
    evals = [(int(r["step"]), float(r["return_mean"])) for r in records if r["kind"] == "eval"]
    train = [float(r["reward"]) for r in records if r["kind"] == "episode"]
    return Result(label, seed, evals, train)


def run_one(arm: Arm, seed: int, args: argparse.Namespace) -> Result:
    """Train one arm on one seed (its output goes to the run folder's parity.log); its kept records."""
    folder = args.root / run_name(arm.label, seed)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder.parent / f"{run_name(arm.label, seed)}.log"
    with open(log, "w", encoding="utf-8") as out:
        code = subprocess.call(command(arm, seed, args), stdout=out, stderr=subprocess.STDOUT, cwd=arm.code)
    if code != 0:
        last = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
        raise SystemExit(f"error: {run_name(arm.label, seed)} exited with {code}: {last[0]} (log: {log})")
    records = [r for r in read_jsonl(folder / METRICS_FILE) if r["kind"] in KEPT_KINDS]
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        with open(args.keep / f"{run_name(arm.label, seed)}.jsonl", "w", encoding="utf-8") as file:
            for record in records:
                file.write(json.dumps(record) + "\n")
    return records_to_result(arm.label, seed, records)


def run_all(arms: list[Arm], seeds: list[int], args: argparse.Namespace) -> list[Result]:
    """Every (seed, arm) pair, seeds outermost so that a cut-short sitting still has whole pairs."""
    jobs = [(arm, seed) for seed in seeds for arm in arms]
    results, started = [], time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, arm, seed, args): (arm, seed) for arm, seed in jobs}
        for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
            arm, seed = futures[future]
            result = future.result()
            results.append(result)
            elapsed = time.monotonic() - started
            left = elapsed / done * (len(jobs) - done)
            print(
                f"[{done}/{len(jobs)}] {run_name(arm.label, seed)}: auc {result.auc(args.steps):.1f}, final "
                f"{result.final(args.steps):.1f} | {elapsed / 60:.1f} min, about {left / 60:.0f} min left",
                flush=True,
            )
    return results


def load_kept(folder: Path, arms: list[str] | None) -> list[Result]:
    if not folder.is_dir():
        raise SystemExit(f"error: --from-kept {folder}: no such folder")
    results = []
    for path in sorted(folder.glob("*-s*.jsonl")):
        label, _, seed = path.stem.rpartition("-s")
        if not seed.isdigit() or (arms and label not in arms):
            continue
        results.append(records_to_result(label, int(seed), read_jsonl(path)))
    if not results:
        raise SystemExit(f"error: no <label>-s<seed>.jsonl files in {folder}")
    return results


# --- statistics ---------------------------------------------------------------------------------------------
def iqm(values: np.ndarray) -> float:
    """Interquartile mean: the mean of the middle 50% (the 25% trimmed mean)."""
    values = np.sort(np.asarray(values, dtype=float))
    cut = int(math.floor(len(values) * 0.25))
    middle = values[cut : len(values) - cut] if len(values) - 2 * cut > 0 else values
    return float(middle.mean())


def bootstrap_interval(
    differences: np.ndarray, statistic: Any = np.mean, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of `statistic` over the paired differences (seeds resampled)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(differences), size=(resamples, len(differences)))
    stats = np.array([statistic(differences[row]) for row in draws])
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(low), float(high)


def summarise(results: list[Result], arm_order: list[str], budget: int) -> dict[str, Any]:
    """Per arm and figure: mean, IQM, and the paired difference against the first arm with its interval."""
    by_arm: dict[str, dict[int, Result]] = {}
    for result in results:
        by_arm.setdefault(result.arm, {})[result.seed] = result
    base = arm_order[0]
    figures = {"auc": lambda r: r.auc(budget), "final": lambda r: r.final(budget), "train": Result.train}
    summary: dict[str, Any] = {"budget": budget, "baseline": base, "arms": {}}
    for label in arm_order:
        runs = by_arm.get(label, {})
        entry: dict[str, Any] = {"seeds": sorted(runs)}
        for name, figure in figures.items():
            values = np.array([figure(runs[s]) for s in sorted(runs)])
            entry[name] = {"mean": float(values.mean()), "iqm": iqm(values), "values": values.tolist()}
            if label != base:
                paired = sorted(set(runs) & set(by_arm.get(base, {})))
                if len(paired) >= 2:
                    diff = np.array([figure(runs[s]) - figure(by_arm[base][s]) for s in paired])
                    low, high = bootstrap_interval(diff)
                    entry[name]["difference"] = {
                        "pairs": len(paired), "mean": float(diff.mean()), "iqm": iqm(diff),
                        "ci95": [low, high], "excludes_zero": bool(low > 0 or high < 0),
                    }  # fmt: skip
        summary["arms"][label] = entry
    return summary


def table(summary: dict[str, Any]) -> str:
    base = summary["baseline"]
    lines = [
        f"| arm | seeds | auc mean (IQM) | final mean (IQM) | train mean | auc - {base} [95% CI] | "
        f"final - {base} [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, entry in summary["arms"].items():
        cells = [label, str(len(entry["seeds"]))]
        for name in ("auc", "final"):
            cells.append(f"{entry[name]['mean']:.1f} ({entry[name]['iqm']:.1f})")
        cells.append(f"{entry['train']['mean']:.1f}")
        for name in ("auc", "final"):
            diff = entry[name].get("difference")
            if diff is None:
                cells.append("baseline" if label == base else "-")
            else:
                low, high = diff["ci95"]
                mark = " *" if diff["excludes_zero"] else ""
                cells.append(f"{diff['mean']:+.1f} [{low:+.1f}, {high:+.1f}]{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("(* the interval excludes 0: a difference these seeds show)")
    return "\n".join(lines)


def plot(
    results: list[Result], arm_order: list[str], budget: int, path: Path, title: str = "Parity harness"
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for label in arm_order:
        runs = [r for r in results if r.arm == label]
        steps = sorted({s for r in runs for s, _ in r.evals if s <= budget})
        grid = np.array([[np.interp(s, *zip(*r.evals, strict=True)) for s in steps] for r in runs])
        mean = grid.mean(axis=0)
        line = axis.plot(steps, mean, label=f"{label} ({len(runs)} seeds)")[0]
        axis.fill_between(steps, grid.min(axis=0), grid.max(axis=0), color=line.get_color(), alpha=0.15)
    axis.set_xlabel("environment step")
    axis.set_ylabel("greedy return, held-out tracks")
    axis.set_title(f"{title}: mean over seeds (band: min to max)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", action="append", default=[], metavar="LABEL=ARGS", help="repeatable")
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 (default 10)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=8_000, help="environment steps per run (default 8,000)")
    parser.add_argument("--eval-every", type=int, default=1_000)
    parser.add_argument("--eval-episodes", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (a beside run uses 2 cores)")
    parser.add_argument("--root", type=Path, default=ROOT / "checkpoints" / "parity")
    parser.add_argument("--keep", type=Path, default=None, help="copy each run's records to DIR")
    parser.add_argument("--from-kept", type=Path, default=None, help="report from kept records, run nothing")
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument("--title", default="Parity harness", help="the plot's title (what the runs are)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be >= 2 (a paired interval needs at least two seeds)")
    if args.steps < args.eval_every:
        parser.error("--steps must cover at least one --eval-every")
    if not args.arm and args.from_kept is None:  # one arm: more seeds for a comparison --from-kept makes
        parser.error("give at least one --arm (or --from-kept DIR)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    arms = [parse_arm(spec) for spec in args.arm]
    if len({arm.label for arm in arms}) != len(arms):
        raise SystemExit("error: two --arm share a label")
    if args.from_kept is not None:
        results = load_kept(args.from_kept, [arm.label for arm in arms] or None)
        order = [arm.label for arm in arms] or sorted({r.arm for r in results})
    else:
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        print(f"harness: {shlex.join(HARNESS)}")
        print(f"{len(arms)} arms x {len(seeds)} seeds, {args.steps:,} steps each, {args.jobs} at a time")
        results = run_all(arms, seeds, args)
        order = [arm.label for arm in arms]
    summary = summarise(results, order, args.steps)
    print(table(summary))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    if args.png is not None:
        plot(results, order, args.steps, args.png, args.title)
        print(f"plot: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
