"""The learner beside the actor against the inline loop: how long the game waits per step, and the rates.

    python bench/bench_beside.py --json bench/results/beside.json
    python bench/bench_beside.py --cases embedded --steps 2000 --hog off

Each case is one `env_tm.py` run, end to end, with the pinned config except a greedy actor (epsilon held at
0.01: `--unpin-epsilon`, so that every step runs the network, as late in training), `--no-wandb`, a fresh
run folder:
- `embedded`: the embedded track (CarRacing at 20 Hz simulated, no pacing: the actor runs as fast as it can);
- `trackmania`: tmrl's real interface and rtgym's real 20 Hz timing against the fake game of
  tests/fake_game.py (the car driving along a 100 m track), so time-step timeouts are rtgym's own;
- `trackmania-apart`: the same with the fake game's telemetry server in a process of its own, as the real
  game is (in `trackmania` its 200 frames per second are sent by a thread of the agent's process);
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
    parser.add_argument("--cases", default="embedded,trackmania", help="embedded,trackmania,trackmania-apart")
    parser.add_argument("--steps", type=int, default=3000, help="env steps per embedded run (default 3000)")
    parser.add_argument(
        "--tm-steps", type=int, default=2000, help="env steps per TrackMania run (default 2000)"
    )
    parser.add_argument("--learners", default="inline,beside")
    parser.add_argument("--hog", choices=["off", "on", "both"], default="both")
    parser.add_argument("--threads", type=int, default=1, help="the learner's CPU threads (default 1)")
    parser.add_argument(
        "--thread-or-process",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="instead: act every 2 ms for SECONDS beside a learner in a thread, in a process, and alone",
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--max-load", type=float, default=None)
    parser.add_argument("--wait", type=float, default=600.0)
    return parser.parse_args()


def run_case(
    env: str, learner: str, hog: bool, steps: int, folder: Path, threads: int, extra: list[str] | None = None
) -> dict[str, Any]:
    run_dir = folder / f"{env}-{learner}-{'hog' if hog else 'idle'}"
    common = ["--steps", str(steps), "--checkpoint-root", str(run_dir.parent), "--run-name", run_dir.name]
    # One learner thread in both modes (beside takes all cores but one by default: 1 on 2 cores); two
    # OpenMP threads on 2 cores beside a busy one stall for up to a second (BENCHMARKS.md).
    common += [
        "--no-wandb",
        "--fresh",
        "--learner",
        learner,
        "--threads",
        str(threads),
        *GREEDY,
        *(extra or []),
    ]
    if env == "embedded":
        command = [sys.executable, str(ROOT / "env_tm.py"), "--env", "embedded", *common]
        environment = None
    else:
        home = folder / "home"
        if not home.exists():
            sys.path.insert(0, str(ROOT / "tests"))
            from fake_openplanet import write_tmrl_data

            write_tmrl_data(home)
        game = {"drive": 20.0, "game_process": env == "trackmania-apart"}
        command = [sys.executable, str(ROOT / "tests" / "fake_game.py"), json.dumps(game), "--"]
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
    if args.thread_or_process:
        rows = [act_latency_beside(kind, args.thread_or_process) for kind in ("none", "thread", "process")]
        print_table(
            "Acting beside a learner that learns as fast as it can",
            rows,
            [("kind", "learner", "s"), ("act_ms_median", "act median ms", ".2f"),
             ("act_ms_p99", "act p99 ms", ".2f"), ("learn_steps_per_s", "learn steps/s", ".1f")],
        )  # fmt: skip
        finish({"thread_or_process": rows}, load, args.json)
        return
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


# --- thread or process: the measurement behind the choice ---------------------------------------------------
def act_latency_beside(kind: str, seconds: float, seed: int = 0) -> dict[str, Any]:
    """Act (pinned network, greedy) every 2 ms while a learner learns beside it as fast as it can: in a
    thread of this process ("thread"), in its own process ("process"), or not at all ("none")."""
    import queue
    import threading

    import numpy as np
    import torch

    from beside import BesideDriver, EpisodeStart, LearnerProcess, Step
    from learner import ActingPolicy, LearnerSpec
    from tm_config import Config

    torch.set_num_threads(1)
    config = Config(epsilon_start=0.01, epsilon_end=0.01)
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (4, 64, 64), dtype=np.uint8)
    car = np.array([120.0, 3.0, 6000.0], np.float32)
    spec = LearnerSpec(
        config.to_dict(),
        [],
        tempfile.mkdtemp(prefix="bench-learner-"),
        resume=False,
        require_checkpoint=False,
        seed=seed,
        device="cpu",
        threads=1,
    )
    actor, stop, learned, feed = ActingPolicy.new(config, seed), threading.Event(), [0], None
    if kind == "thread":
        commands: queue.Queue = queue.Queue()
        server = LearnerProcess(spec, lambda reply: None)
        server.open()

        def serve_in_thread() -> None:
            while not stop.is_set():
                try:
                    while True:
                        server.handle(commands.get_nowait())
                except queue.Empty:
                    pass
                if server.work():
                    learned[0] = server.engine.agent.learn_steps
                else:
                    time.sleep(0.001)

        worker = threading.Thread(target=serve_in_thread, daemon=True)
        worker.start()
        feed = commands.put
    elif kind == "process":
        beside = BesideDriver(spec)
        beside.open()

        def feed(message: EpisodeStart | Step) -> None:
            if isinstance(message, Step):
                m = message
                beside.add(m.action, m.reward, m.terminated, m.truncated, m.frame, m.car)
            else:
                beside.start_episode(message.frames, message.car)

    if feed is not None:  # enough data that the learner never runs dry: 5000 steps, learned as fast as it can
        feed(EpisodeStart(frames, car))
        for t in range(5000):
            feed(Step(int(rng.integers(11)), 0.1, False, t == 4999, frames[-1], car))
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        began = time.perf_counter()
        actor.act(frames, car, 10**6)
        times.append(time.perf_counter() - began)
        time.sleep(0.002)
    elapsed = time.perf_counter() - start
    if kind == "process":
        learned[0] = int(beside.learned.value)
        beside.close()
    stop.set()
    ms = np.asarray(times) * 1000
    return {
        "kind": kind,
        "act_ms_median": float(np.median(ms)),
        "act_ms_p99": float(np.percentile(ms, 99)),
        "learn_steps_per_s": learned[0] / elapsed,
    }


if __name__ == "__main__":
    main()
