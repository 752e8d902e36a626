"""The learning curve of a run on the embedded track, against a random policy on the same held-out tracks.

The run itself is an ordinary training run with evaluation switched on, for example (BENCHMARKS.md, 6):

    python env_tm.py --env embedded --steps 150000 --run-name curve-seed0 --no-wandb \
        --eval-every 10000 --eval-episodes 5 --set epsilon_decay_to=30000
    python bench/learning_curve.py --run-dir checkpoints/curve-seed0 --png bench/learning_curve.png

This script reads the run's metrics.jsonl (its `eval` records: the greedy policy, noise off, on the
held-out tracks `environment.evaluation_seeds`), drives a uniformly random policy over the same 11 actions on
the same tracks with the run's config, prints both, and draws the curve: evaluation returns (mean, and
min-max over the episodes), the training episodes' returns, the random policy and the goal.
It works on a run that is still going: the curve then ends at its newest evaluation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import write_json  # noqa: E402

from environment import drive_episodes, evaluation_seeds  # noqa: E402
from rainbow import ACTION_VECTORS  # noqa: E402
from run_log import METRICS_FILE, read_jsonl  # noqa: E402
from tm_config import Config  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a run folder with metrics.jsonl")
    parser.add_argument("--png", type=Path, default=None, help="write the curve here")
    parser.add_argument("--goal", type=float, default=400.0, help="the goal line (mean evaluation return)")
    parser.add_argument("--goal-steps", type=int, default=150_000, help="the goal's step budget")
    parser.add_argument("--random-episodes", type=int, default=None, help="default: as per evaluation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random policy's action draws")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args()


def run_config(records: list[dict[str, Any]]) -> Config:
    """The run's config: the pinned one plus the departures its start record lists."""
    starts = [r for r in records if r["kind"] == "run" and r.get("event") == "start"]
    if not starts:
        raise SystemExit("error: the metrics file has no start record (is this a run folder of env_tm.py?)")
    departures = starts[-1].get("departures", {})
    return Config().with_overrides(**{key: value["used"] for key, value in departures.items()})


def random_policy_returns(config: Config, episodes: int, seed: int) -> tuple[list[float], list[int]]:
    from embedded_track import make_embedded_track

    env = make_embedded_track(config)
    rng = np.random.default_rng(seed)
    try:
        result = drive_episodes(
            env,
            config,
            evaluation_seeds(episodes),
            lambda frames, car: int(rng.integers(len(ACTION_VECTORS))),
        )
    finally:
        env.close()
    return result.returns, result.lengths


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window:
        return np.full(len(values), np.nan)
    means = np.convolve(values, np.ones(window) / window, mode="valid")
    return np.concatenate([np.full(window - 1, np.nan), means])


def plot(
    evals: list[dict[str, Any]],
    episodes: list[dict[str, Any]],
    random_mean: float,
    config: Config,
    goal: float,
    goal_steps: int,
    path: Path,
    title: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    if episodes:
        steps = np.array([r["step"] for r in episodes])
        rewards = np.array([r["reward"] for r in episodes], dtype=float)
        label = "training episodes (epsilon-greedy)"
        ax.scatter(steps, rewards, s=6, color="tab:gray", alpha=0.35, label=label)
        ax.plot(steps, rolling_mean(rewards, 10), color="tab:gray", lw=1, label="training, mean of 10")
    if evals:
        steps = np.array([r["step"] for r in evals])
        means = np.array([r["return_mean"] for r in evals])
        ax.fill_between(
            steps,
            [r["return_min"] for r in evals],
            [r["return_max"] for r in evals],
            color="tab:blue",
            alpha=0.15,
            label="evaluation min-max",
        )
        label = f"evaluation mean ({evals[-1]['episodes']} held-out tracks)"
        ax.plot(steps, means, "o-", color="tab:blue", label=label)
    ax.axhline(random_mean, color="tab:red", ls="--", lw=1, label=f"random policy ({random_mean:.1f})")
    ax.axhline(goal, color="tab:green", ls=":", lw=1.2, label=f"goal {goal:g} within {goal_steps:,} steps")
    last_step = max([r["step"] for r in evals + episodes], default=0)
    x_max = max(goal_steps, last_step) * 1.02
    ax.set_xlim(0, x_max)
    if config.epsilon_decay_to <= x_max:
        ax.axvline(config.epsilon_decay_to, color="k", ls=":", lw=0.8)
        ax.text(config.epsilon_decay_to, ax.get_ylim()[0], " epsilon at its floor", fontsize=8, va="bottom")
    ax.set_xlabel("agent steps (50 ms each)")
    ax.set_ylabel("episode return")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    args = parse_args()
    metrics = args.run_dir / METRICS_FILE
    if not metrics.exists():
        raise SystemExit(f"error: no {METRICS_FILE} in {args.run_dir}")
    records = read_jsonl(metrics)
    config = run_config(records)
    evals = [r for r in records if r["kind"] == "eval"]
    episodes = [r for r in records if r["kind"] == "episode"]
    if not evals:
        raise SystemExit(f"error: {metrics} has no eval records: train with --eval-every STEPS")
    n_random = args.random_episodes or int(evals[-1]["episodes"])
    random_returns, random_lengths = random_policy_returns(config, n_random, args.seed)
    random_mean = float(np.mean(random_returns))

    print(f"run {args.run_dir} | departures: {config.departures() or 'none'}")
    print(f"\n{'step':>8} {'eval mean':>10} {'std':>7} {'min':>8} {'max':>8} {'length':>7}")
    for r in evals:
        print(
            f"{r['step']:>8,} {r['return_mean']:>10.1f} {r['return_std']:>7.1f} {r['return_min']:>8.1f} "
            f"{r['return_max']:>8.1f} {r['length_mean']:>7.0f}"
        )
    print(
        f"\nrandom policy on the same {n_random} tracks: mean {random_mean:.1f} "
        f"(min {min(random_returns):.1f}, max {max(random_returns):.1f}, "
        f"length {np.mean(random_lengths):.0f})"
    )
    last_step = max([r["step"] for r in evals + episodes], default=0)
    in_budget = [r for r in evals if r["step"] <= args.goal_steps]
    best = max(in_budget, key=lambda r: r["return_mean"]) if in_budget else None
    reached = next((r for r in in_budget if r["return_mean"] >= args.goal), None)
    if best is not None:
        print(
            f"best evaluation within {args.goal_steps:,} steps: {best['return_mean']:.1f} at {best['step']:,}"
        )
    print(
        f"goal (mean >= {args.goal:g} within {args.goal_steps:,} steps): "
        + (f"reached at step {reached['step']:,}" if reached else "not reached")
        + f"; the run has {last_step:,} steps so far"
    )
    if reached is not None:
        # Reaching the goal once is not the same as holding it: say how often the later evaluations did.
        since = [r for r in evals if r["step"] >= reached["step"]]
        holding = sum(r["return_mean"] >= args.goal for r in since)
        last_three = [r["return_mean"] for r in evals[-3:]]
        print(
            f"evaluations from then on at or above the goal: {holding} of {len(since)}; "
            f"lowest {min(r['return_mean'] for r in since):.1f}; "
            f"mean of the last three {np.mean(last_three):.1f}"
        )
    if args.png:
        title = (
            f"{args.run_dir.name}: Rainbow-IQN on the embedded track (pinned config; "
            f"epsilon_decay_to={config.epsilon_decay_to:,})"
        )
        plot(evals, episodes, random_mean, config, args.goal, args.goal_steps, args.png, title)
        print(f"curve: {args.png}")
    if args.json:
        write_json(
            args.json,
            {
                "evals": evals,
                "random_returns": random_returns,
                "random_mean": random_mean,
                "goal": args.goal,
                "goal_steps": args.goal_steps,
                "reached_step": reached["step"] if reached else None,
                "departures": config.departures(),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
