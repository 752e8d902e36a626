"""Scale out on one machine: a relay, a trainer and 1, 2, 4 workers on the embedded track.

    python bench/bench_distributed.py --workers 1,2,4 --seconds 150 --json bench/results/distributed.json

For each worker count it starts `env_tm.py --role server`, `--role trainer` and the workers as separate
processes (as on separate machines, over loopback), waits until the trainer has learned for a while, and
then measures over `--seconds`: environment steps received per second, learn steps per second, how long
the workers waited for the trainer, the steps the workers collected per second over their whole runs (and
each one's rate while driving, not waiting), and the CPU time each process used (from /proc: Linux only, nan
elsewhere). It also reports how long the game waits for the agent at each step over each process's whole
run (`StepLatency`, printed by the single-PC loop and by each worker when they stop): in the loop that is
acting plus one learn step, on a worker the policy's `act_` alone, and a wait longer than the 50 ms time
step is an overrun on TrackMania. For the workers it also takes the episodes from each one's second on
(its first is driven before the trainer has data, so nothing learns beside it). The baseline, run in the
same invocation, is the single-PC loop (`env_tm.py --env embedded`) over the same window. Config: the
pinned one with checkpoints off (a 100k replay would be written every 10 episodes).

tmrl reads ~/TmrlData/config/config.json when imported; `--tmrl-home` points the roles at a home folder
that has one (default: yours).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

ROOT = common.ROOT
WINDOWS = os.name == "nt"
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--seconds", type=float, default=150.0, help="measurement window per case")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of learning before measuring")
    parser.add_argument("--tmrl-home", default=str(Path.home()), help="a home folder holding TmrlData")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the trainer and the loop")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config departures"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the single-PC loop")
    parser.add_argument("--json", default=None, metavar="PATH")
    parser.add_argument("--max-load", type=float, default=None, help="wait for the 1-minute load to drop")
    parser.add_argument("--wait", type=float, default=600.0)
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children that have exited (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
    return (utime + stime + cutime + cstime) / TICKS_PER_SECOND


def family(pid: int) -> list[int]:
    """A process and its descendants (tlspyo runs each role's networking in a child process)."""
    found, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        children = Path(f"/proc/{parent}/task/{parent}/children")
        if children.exists():
            kids = [int(x) for x in children.read_text().split()]
            found += kids
            frontier += kids
    return found


def family_cpu(pid: int) -> float:
    return sum(cpu_seconds(p) for p in family(pid))


def step_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == "step":
            records.append(record)
    return records


LATENCY = re.compile(
    r"agent time per step median ([\d.]+) ms, p99 ([\d.]+) ms, max ([\d.]+) ms over ([\d,]+) steps.*?; "
    r"([\d,]+) over the"
)


def step_latency(log: str) -> dict[str, float]:
    """The last `StepLatency.summary()` line of a log: how long the game waited for the agent per step."""
    found = LATENCY.findall(log)
    if not found:
        return {}
    median, p99, slowest, steps, overruns = found[-1]
    steps_n, overruns_n = int(steps.replace(",", "")), int(overruns.replace(",", ""))
    return {
        "median_ms": float(median),
        "p99_ms": float(p99),
        "max_ms": float(slowest),
        "steps": steps_n,
        "overrun_share": overruns_n / steps_n if steps_n else float("nan"),
    }


EPISODE_LATENCY = re.compile(
    r"episode (\d+) sent \((\d+) steps.*?act p99 ([\d.]+) ms, (\d+) over the time step"
)


def worker_latency_while_learning(log: str) -> dict[str, float]:
    """A worker's act time from its second episode on: its first one is driven before the trainer has any
    data, so nothing learns beside it. Per-episode p99s (their worst) and overruns, from the episode lines."""
    rows = EPISODE_LATENCY.findall(log)
    later = [(int(n), int(steps), float(p99), int(over)) for n, steps, p99, over in rows if int(n) >= 2]
    if not later:
        return {}
    return {
        "episodes": len(later),
        "steps": sum(row[1] for row in later),
        "worst_episode_p99_ms": max(row[2] for row in later),
        "overruns": sum(row[3] for row in later),
    }


def kill_group(process: subprocess.Popen) -> None:
    if WINDOWS:
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
    else:
        os.killpg(process.pid, signal.SIGKILL)


class Processes:
    def __init__(self, folder: Path, home: str) -> None:
        self.folder, self.home = folder, home
        self.running: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}  # time.monotonic() at start and at exit, per role
        self.ended: dict[str, float] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        env = dict(
            os.environ, HOME=self.home, USERPROFILE=self.home, PYTHONUNBUFFERED="1", WANDB_MODE="offline"
        )
        log = open(self.folder / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        command = [sys.executable, str(ROOT / "env_tm.py"), *args]
        # A process group of its own, so a role can be stopped (and killed) with its networking child.
        group: dict[str, Any] = {"start_new_session": True}
        if WINDOWS:
            group = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, **group)
        self.running[name] = process
        self.started[name] = time.monotonic()
        return process

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def stop(self, names: list[str], timeout: float = 90.0) -> None:
        for name in names:
            if self.running[name].poll() is None:  # the roles stop cleanly on SIGTERM / Ctrl+Break
                self.running[name].send_signal(signal.CTRL_BREAK_EVENT if WINDOWS else signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name in names:
            try:
                self.running[name].wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill_group(self.running[name])
                self.running[name].wait()
            self.ended[name] = time.monotonic()

    def kill_all(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                kill_group(process)


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"error: timed out waiting for {what}")
        time.sleep(0.5)


def window_rates(records: list[dict[str, Any]], start: float, end: float) -> dict[str, float]:
    inside = [r for r in records if start <= r["time"] <= end]
    if len(inside) < 2:
        return {"env_steps_per_s": float("nan"), "learn_steps_per_s": float("nan"), "records": len(inside)}
    first, last = inside[0], inside[-1]
    seconds = last["time"] - first["time"]
    return {
        "env_steps_per_s": (last["step"] - first["step"]) / seconds,
        "learn_steps_per_s": (last["learn_step"] - first["learn_step"]) / seconds,
        "seconds": seconds,
        "records": len(inside),
    }


def bench_workers(workers: int, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    port = free_port()
    runs = folder / "runs"
    sets = sum((["--set", a] for a in ["checkpoint=false", "log_every_steps=50", *args.overrides]), [])
    common_args = ["--port", str(port), "--password-file", str(folder / "pw.txt")]
    threads = ["--threads", str(args.threads)] if args.threads else []
    processes = Processes(folder, args.tmrl_home)
    try:
        processes.start("server", "--role", "server", *common_args)
        wait_until(lambda: "relay listening" in processes.log("server"), 60, "the relay")
        run_name = f"trainer-{workers}"
        processes.start(
            "trainer", "--role", "trainer", *common_args, "--steps", str(10**9), "--no-wandb",
            "--checkpoint-root", str(runs), "--run-name", run_name, "--fresh", *threads, *sets,
        )  # fmt: skip
        names = [f"worker{i}" for i in range(workers)]
        for i, name in enumerate(names):
            processes.start(
                name, "--role", "worker", *common_args, "--env", "embedded", "--seed", str(i + 1),
                "--worker-name", name, "--threads", "1", *sets,
            )  # fmt: skip
        metrics = runs / run_name / "metrics.jsonl"
        wait_until(lambda: len(step_records(metrics)) >= 1, 900, "the trainer's first learn steps")
        time.sleep(args.warmup)
        pids = {name: process.pid for name, process in processes.running.items()}
        cpu_start = {name: family_cpu(pid) for name, pid in pids.items()}
        start = time.time()
        time.sleep(args.seconds)
        end = time.time()
        cpu = {name: (family_cpu(pid) - cpu_start[name]) / (end - start) for name, pid in pids.items()}
        processes.stop(["trainer"])
        processes.stop(names)
        processes.stop(["server"])
    finally:
        processes.kill_all()
    rates = window_rates(step_records(metrics), start, end)
    waited, sent, lived = [], [], []
    for name in names:
        match = re.search(r"(\d+) steps sent, \d+ weight updates, ([\d.]+) s waiting", processes.log(name))
        sent.append(int(match.group(1)) if match else float("nan"))  # no summary line: no figure
        waited.append(float(match.group(2)) if match else float("nan"))
        lived.append(processes.ended[name] - processes.started[name])
    return {
        "workers": workers,
        **rates,
        # Over each worker's whole run (start-up and the episode it finishes after the stop included):
        # the steps it collected, and its rate while driving rather than waiting for the trainer.
        "collected_steps_per_s": sum(n / t for n, t in zip(sent, lived, strict=True)),
        "driving_steps_per_s": [n / (t - w) for n, t, w in zip(sent, lived, waited, strict=True)],
        "worker_steps_sent": sent,
        "worker_seconds_alive": lived,
        "cpu_cores_used": cpu,
        "worker_seconds_waiting": waited,
        "step_latency": {name: step_latency(processes.log(name)) for name in names},
        "act_while_learning": {name: worker_latency_while_learning(processes.log(name)) for name in names},
    }


def bench_single(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    runs = folder / "runs"
    sets = sum((["--set", a] for a in ["checkpoint=false", "log_every_steps=50", *args.overrides]), [])
    threads = ["--threads", str(args.threads)] if args.threads else []
    processes = Processes(folder, args.tmrl_home)
    try:
        process = processes.start(
            "single", "--env", "embedded", "--steps", str(10**9), "--no-wandb",
            "--checkpoint-root", str(runs), "--run-name", "single", "--fresh", *threads, *sets,
        )  # fmt: skip
        metrics = runs / "single" / "metrics.jsonl"
        wait_until(lambda: len(step_records(metrics)) >= 1, 600, "the first learn steps")
        time.sleep(args.warmup)
        cpu_start = family_cpu(process.pid)
        start = time.time()
        time.sleep(args.seconds)
        end = time.time()
        cpu = (family_cpu(process.pid) - cpu_start) / (end - start)
        processes.stop(["single"])
    finally:
        processes.kill_all()
    return {
        "workers": 0,
        **window_rates(step_records(metrics), start, end),
        "cpu_cores_used": {"single": cpu},
        "step_latency": {"single": step_latency(processes.log("single"))},
    }


def main() -> int:
    args = parse_args()
    load = common.wait_for_quiet(args.max_load, args.wait)
    info = common.machine_info(common.pick_device("cpu"))
    common.print_machine(info)
    counts = [int(x) for x in args.workers.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as temp:
        folder = Path(temp)
        if not args.no_baseline:
            print("single-PC loop ...", flush=True)
            results.append(bench_single(args, folder))
        for count in counts:
            print(f"relay + trainer + {count} worker(s) ...", flush=True)
            results.append(bench_workers(count, args, folder))
    baseline = results[0]["learn_steps_per_s"] if not args.no_baseline else float("nan")
    rows = []
    for result in results:
        cpu = result["cpu_cores_used"]
        workers_cpu = sum(v for k, v in cpu.items() if k.startswith("worker"))
        latencies = [v for v in result["step_latency"].values() if v]
        rows.append(
            {
                "case": "single PC loop" if result["workers"] == 0 else f"{result['workers']} worker(s)",
                "env": result["env_steps_per_s"],
                "collected": result.get("collected_steps_per_s"),
                "driving": (
                    sum(result["driving_steps_per_s"]) / len(result["driving_steps_per_s"])
                    if result.get("driving_steps_per_s")
                    else None
                ),
                "learn": result["learn_steps_per_s"],
                "ratio": common.ratio(result["learn_steps_per_s"], baseline),
                "trainer_cpu": cpu.get("trainer", cpu.get("single")),
                "workers_cpu": workers_cpu if result["workers"] else None,
                "server_cpu": cpu.get("server"),
                "wait_p99": max((v["p99_ms"] for v in latencies), default=None),
                "learning_p99": max(
                    (v["worst_episode_p99_ms"] for v in result.get("act_while_learning", {}).values() if v),
                    default=None,
                ),
                "overruns": (
                    sum(v["overrun_share"] * v["steps"] for v in latencies)
                    / sum(v["steps"] for v in latencies)
                    if latencies
                    else None
                ),
                "waiting": (
                    sum(result["worker_seconds_waiting"]) / len(result["worker_seconds_waiting"])
                    if result.get("worker_seconds_waiting")
                    else None
                ),
            }
        )
    common.print_table(
        f"env steps received and learn steps per second over {args.seconds:.0f} s (CPU in cores used)",
        rows,
        [
            ("case", "case", ""),
            ("env", "env steps/s", ".1f"),
            ("collected", "collected/s (whole run)", ".1f"),
            ("driving", "per worker while driving", ".1f"),
            ("learn", "learn steps/s", ".1f"),
            ("ratio", "learn x single", ".2f"),
            ("trainer_cpu", "trainer CPU", ".2f"),
            ("workers_cpu", "workers CPU", ".2f"),
            ("server_cpu", "relay CPU", ".2f"),
            ("wait_p99", "game waits p99 ms", ".2f"),
            ("learning_p99", "worst episode p99 ms, episodes 2+", ".2f"),
            ("overruns", "steps > 50 ms", ".2%"),
            ("waiting", "s waiting per worker (whole run)", ".0f"),
        ],
    )
    common.finish({"machine": info, "args": vars(args), "results": results}, load, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
