"""The learner beside the actor against the inline loop: how long the game waits per step, and the rates.

    python bench/bench_beside.py --json bench/results/beside.json
    python bench/bench_beside.py --cases embedded --steps 2000 --hog off

Each case is one `env_tm.py` run, end to end, with the pinned config except a greedy actor (epsilon held at
0.01: `--unpin-epsilon`, so that every step runs the network, as late in training), `--no-wandb`, a fresh
run folder:
- `embedded`: the embedded track (CarRacing at 20 Hz simulated, no pacing: the actor runs as fast as it can);
- `trackmania`: tmrl's real interface and rtgym's real 20 Hz timing against the fake game of
  tests/fake_game.py (the car driving along a 100 m track), so time-step timeouts are rtgym's own;
each with `--learner inline` and `--learner beside`, and each with and without a CPU hog: a process spinning
on one core, as the game itself does on a single PC.

From each run it reads what the run itself reports: the agent's time per step (between two env.step calls,
what the game waits for), rtgym's time-step timeouts, and its env and learn steps per second (steps over the
training loop's wall time, from the run's start and end records).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ROOT, finish, print_table, wait_for_quiet  # noqa: E402

GREEDY = ["--unpin-epsilon", "--set", "epsilon_start=0.01", "--set", "epsilon_end=0.01"]
LATENCY = re.compile(
    r"agent time per step median ([\d.]+) ms, p99 ([\d.]+) ms, max ([\d.]+) ms over ([\d,]+) steps.*?"
    r"([\d,]+) over the"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="embedded,trackmania", help="embedded, trackmania or both")
    parser.add_argument("--steps", type=int, default=3000, help="env steps per embedded run (default 3000)")
    parser.add_argument(
        "--tm-steps", type=int, default=2000, help="env steps per TrackMania run (default 2000)"
    )
    parser.add_argument("--learners", default="inline,beside")
    parser.add_argument("--hog", choices=["off", "on", "both"], default="both")
    parser.add_argument("--threads", type=int, default=1, help="the learner's CPU threads (default 1)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--max-load", type=float, default=None)
    parser.add_argument("--wait", type=float, default=600.0)
    return parser.parse_args()


def run_case(env: str, learner: str, hog: bool, steps: int, folder: Path, threads: int) -> dict[str, Any]:
    run_dir = folder / f"{env}-{learner}-{'hog' if hog else 'idle'}"
    common = ["--steps", str(steps), "--checkpoint-root", str(run_dir.parent), "--run-name", run_dir.name]
    # One learner thread in both modes (beside takes all cores but one by default: 1 on 2 cores); two
    # OpenMP threads on 2 cores beside a busy one stall for up to a second (BENCHMARKS.md).
    common += ["--no-wandb", "--fresh", "--learner", learner, "--threads", str(threads), *GREEDY]
    if env == "embedded":
        command = [sys.executable, str(ROOT / "env_tm.py"), "--env", "embedded", *common]
        environment = None
    else:
        home = folder / "home"
        if not home.exists():
            sys.path.insert(0, str(ROOT / "tests"))
            from fake_openplanet import write_tmrl_data

            write_tmrl_data(home)
        command = [sys.executable, str(ROOT / "tests" / "fake_game.py"), json.dumps({"drive": 20.0}), "--"]
        command += ["--env", "trackmania", *common]
        environment = dict(os.environ, HOME=str(home), USERPROFILE=str(home))
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if hog else None
    started = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=3600)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    wall = time.perf_counter() - started
    if result.returncode != 0:
        return {"env": env, "learner": learner, "hog": hog, "error": (result.stdout + result.stderr)[-1500:]}
    match = LATENCY.search(result.stdout)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r.get("event") == "start")
    end = next(r for r in records if r.get("event") == "finished")
    loop_seconds = end["time"] - start["time"]
    batch = 32
    timeouts = end.get("time_step_timeouts_total", 0)
    return {
        "env": env,
        "learner": learner,
        "hog": hog,
        "steps": steps,
        "agent_ms_median": float(match.group(1)),
        "agent_ms_p99": float(match.group(2)),
        "agent_ms_max": float(match.group(3)),
        "over_50ms": int(match.group(5).replace(",", "")),
        "timeouts": int(timeouts),
        "env_steps_per_s": steps / loop_seconds,
        "learn_steps_per_s": (steps - batch + 1) / loop_seconds,
        "loop_seconds": loop_seconds,
        "wall_seconds": wall,
    }


def main() -> None:
    args = parse_args()
    load = wait_for_quiet(args.max_load, args.wait)
    hogs = {"off": [False], "on": [True], "both": [False, True]}[args.hog]
    rows = []
    folder = Path(tempfile.mkdtemp(prefix="bench-beside-"))
    try:
        for env in args.cases.split(","):
            steps = args.steps if env == "embedded" else args.tm_steps
            for hog in hogs:
                for learner in args.learners.split(","):
                    print(f"running {env} {learner} {'with' if hog else 'without'} a CPU hog ...", flush=True)
                    rows.append(run_case(env, learner, hog, steps, folder, args.threads))
                    rows[-1]["hog_text"] = "yes" if hog else "no"
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    good = [r for r in rows if "error" not in r]
    print_table(
        "The game's wait per step (agent time between env.step calls), and the rates",
        good,
        [
            ("env", "env", "s"),
            ("learner", "learner", "s"),
            ("hog_text", "CPU hog", "s"),
            ("agent_ms_median", "median ms", ".2f"),
            ("agent_ms_p99", "p99 ms", ".2f"),
            ("agent_ms_max", "max ms", ".1f"),
            ("over_50ms", "> 50 ms", "d"),
            ("timeouts", "timeouts", "d"),
            ("env_steps_per_s", "env steps/s", ".1f"),
            ("learn_steps_per_s", "learn steps/s", ".1f"),
        ],
    )
    finish({"cases": rows, "args": vars(args)}, load, args.json)


if __name__ == "__main__":
    main()
