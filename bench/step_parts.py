"""Where the game's wait goes, step by step: the actor's parts timed in one TrackMania run on the fake game.

    python bench/step_parts.py --steps 1000 --json bench/results/step-parts.json
    python bench/step_parts.py --frame-interval 0.02 --game-process

One `env_tm.py` run against tests/fake_game.py (tmrl's real interface, rtgym's real 20 Hz), the learner
beside, a greedy actor (epsilon 0.01), as bench/bench_beside.py runs it. The run's own step latency (the
agent's time between two env.step calls) is recorded per step, and the parts of the actor's loop are timed
around their calls: the weight refresh, the learner's liveness check, storing the step (which includes the
hand-over of the transition, also shown alone), the collection of the learner's metrics, the wait for a
learner that fell behind, the status line. Whatever the parts leave of a step is the action itself (the
network's forward pass) and the loop's own glue. The table lists each part's median and p99 over the steps,
and the slowest 2% of steps with the parts that were over 0.3 ms in them. Not a test: a measurement for
BENCHMARKS.md ("Learning beside acting").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, finish, wait_for_quiet  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))

PARTS = {  # label: (module, class, method)
    "refresh": ("beside", "BesideDriver", "refresh_actor"),
    "alive": ("beside", "BesideDriver", "check_alive"),
    "hand_over": ("beside", "BesideDriver", "add"),
    "store_step": ("session", "Session", "store_step"),
    "metrics": ("session", "Session", "learn"),
    "keep_pace": ("session", "Session", "keep_pace"),
    "status": ("session", "Session", "status"),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--frame-interval", type=float, default=0.005, help="seconds between plugin frames")
    parser.add_argument("--game-process", action="store_true", help="the fake game in a process of its own")
    parser.add_argument("--json", default=None)
    parser.add_argument("--max-load", type=float, default=None)
    parser.add_argument("--wait", type=float, default=600.0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    load = wait_for_quiet(args.max_load, args.wait)
    import importlib

    import fake_game
    from fake_openplanet import write_tmrl_data

    import console

    step_ms: list[float] = []
    parts: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))

    def timed(label: str, real: Any) -> Any:
        def call(*positional: Any, **named: Any) -> Any:
            start = time.perf_counter()
            try:
                return real(*positional, **named)
            finally:
                parts[label][len(step_ms)] += (time.perf_counter() - start) * 1000

        return call

    for label, (module, owner, method) in PARTS.items():
        cls = getattr(importlib.import_module(module), owner)
        setattr(cls, method, timed(label, getattr(cls, method)))
    real_add = console.StepLatency.add

    def add(self: Any, seconds: float) -> None:
        step_ms.append(seconds * 1000)
        real_add(self, seconds)

    console.StepLatency.add = add
    folder = Path(tempfile.mkdtemp(prefix="step-parts-"))
    write_tmrl_data(folder / "home")
    os.environ["HOME"] = os.environ["USERPROFILE"] = str(folder / "home")
    game = {"drive": 20.0, "frame_interval": args.frame_interval, "game_process": args.game_process}
    run = ["--env", "trackmania", "--steps", str(args.steps), "--checkpoint-root", str(folder)]
    run += ["--run-name", "parts", "--no-wandb", "--fresh", "--learner", "beside", "--threads", "1"]
    run += ["--unpin-epsilon", "--set", "epsilon_start=0.01", "--set", "epsilon_end=0.01"]
    sys.argv = ["fake_game.py", json.dumps(game), "--", *run]
    code = fake_game.main()
    if code != 0:
        raise SystemExit(f"the run failed with exit code {code}")
    steps = np.asarray(step_ms)
    # step k's parts: those timed after step k-1's latency was recorded and before step k's (key k)
    rows = []
    for label in PARTS:
        values = np.array([parts[label].get(k, 0.0) for k in range(len(steps))])
        rows.append(
            {"part": label, "median_ms": float(np.median(values)), "p99_ms": float(np.percentile(values, 99)),
             "max_ms": float(values.max())}
        )  # fmt: skip
    cut = np.percentile(steps, 98)
    slowest = [
        {"step": int(k), "ms": round(float(steps[k]), 2),
         "parts_over_0.3ms": {label: round(parts[label][k], 2) for label in PARTS
                               if parts[label].get(k, 0.0) > 0.3}}
        for k in np.nonzero(steps >= cut)[0]
    ]  # fmt: skip
    summary = {
        "steps": len(steps),
        "step_ms_median": float(np.median(steps)),
        "step_ms_p99": float(np.percentile(steps, 99)),
        "slowest_2pct_without_any_part_over_0.3ms": sum(not s["parts_over_0.3ms"] for s in slowest),
        "slowest_2pct": len(slowest),
    }
    median, p99 = summary["step_ms_median"], summary["step_ms_p99"]
    print(f"\nthe game's wait: median {median:.2f} ms, p99 {p99:.2f} ms")
    print(f"{'part':12s} {'median ms':>10s} {'p99 ms':>8s} {'max ms':>8s}")
    for row in rows:
        print(f"{row['part']:12s} {row['median_ms']:10.3f} {row['p99_ms']:8.3f} {row['max_ms']:8.2f}")
    print(
        f"slowest 2% of steps: {summary['slowest_2pct']}, of which "
        f"{summary['slowest_2pct_without_any_part_over_0.3ms']} had no timed part over 0.3 ms (the time was "
        "in the action itself)"
    )
    finish({"summary": summary, "parts": rows, "slowest": slowest, "args": vars(args)}, load, args.json)
    sys.stdout.flush()
    os._exit(0)  # tmrl's client thread and rtgym's worker never end by themselves


if __name__ == "__main__":
    main()
