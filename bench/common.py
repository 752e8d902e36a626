"""Shared helpers of the benchmark scripts: devices, interleaved timing, statistics, machine facts, output.

Timings on a shared machine are noisy, so every figure is a ratio against a baseline measured in the same
run: `interleave` runs one repetition of every case in turn (in a shuffled order each round), so a burst of
load from another process hits all cases alike. On CUDA every repetition is bracketed by synchronisations.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rainbow import resolve_device  # noqa: E402


# --- devices ---------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    """`auto`, `cpu` or `cuda`, as the training script resolves it; a bad choice exits with one line."""
    try:
        return resolve_device(name)
    except (RuntimeError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_threads(threads: int | None, interop: int | None = None) -> None:
    """torch intra-op threads (None: leave torch's default) and, once per process, interop threads."""
    if threads is not None:
        torch.set_num_threads(threads)
    if interop is not None:
        torch.set_num_interop_threads(interop)


# --- load ------------------------------------------------------------------------------------------
def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def wait_for_quiet(max_load: float | None, timeout: float, poll: float = 5.0) -> tuple[float, float, float]:
    """Wait (up to `timeout` s) until the 1-minute load average is below `max_load`; returns the load seen.

    Benchmarks on a shared machine should start when other work has calmed down; the wait gives up
    silently after the timeout (the load is reported with the figures either way).
    """
    deadline = time.monotonic() + timeout
    load = load_average()
    if max_load is None:
        return load
    while load[0] > max_load and time.monotonic() < deadline:
        print(f"  waiting for load < {max_load} (now {load[0]:.2f})", flush=True)
        time.sleep(poll)
        load = load_average()
    return load


# --- timing ----------------------------------------------------------------------------------------
def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds taken by fn(), synchronising CUDA before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleave(
    cases: dict[str, Callable[[], Any]],
    repetitions: int,
    device: torch.device,
    warmup: int = 3,
    inner: int = 1,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Per-call seconds of every case: `repetitions` rounds, each running every case `inner` times in a row
    (one sample per call), in a freshly shuffled case order each round."""
    order = list(cases)
    for _ in range(warmup):
        for name in order:
            cases[name]()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in order}
    shuffler = random.Random(seed)
    for _ in range(repetitions):
        shuffler.shuffle(order)
        for name in order:
            for _ in range(inner):
                samples[name].append(time_once(cases[name], device))
    return {name: np.asarray(values) for name, values in samples.items()}


def summarize(seconds: np.ndarray) -> dict[str, float]:
    """Median, p99, mean, min (in milliseconds) and the sample count."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "n": int(ms.size),
    }


def ratio(candidate: float, baseline: float) -> float:
    return candidate / baseline if baseline > 0 else float("nan")


def median(values: list[float]) -> float:
    return float(statistics.median(values))


# --- memory ----------------------------------------------------------------------------------------
def rss_bytes() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process in bytes, from /proc (psutil if /proc is missing)."""
    status = Path("/proc/self/status")
    if status.exists():
        fields = {}
        for line in status.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
        return fields["VmRSS"], fields["VmHWM"]
    import psutil  # pragma: no cover - non-Linux

    info = psutil.Process().memory_info()
    return int(info.rss), int(getattr(info, "peak_wset", info.rss))


# --- machine facts ---------------------------------------------------------------------------------
def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_flags(wanted: tuple[str, ...] = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")) -> list[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return []
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [flag for flag in wanted if flag in flags]
    return []


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": device.type,
        "git": git_revision(),
        "load_average_start": list(load_average()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_machine(info: dict[str, Any]) -> None:
    load = info.get("load_average_start", [])
    print(
        f"{info['date']} | {info['cpu']} ({info['cores']} cores; {' '.join(info['cpu_flags'])}) | "
        f"torch {info['torch']} | device {info['device']}{' ' + info['gpu'] if 'gpu' in info else ''} | "
        f"threads {info['torch_threads']}/{info['torch_interop_threads']} | git {info['git']} | "
        f"load {' '.join(f'{x:.2f}' for x in load)}"
    )


# --- output ----------------------------------------------------------------------------------------
def print_table(title: str, rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """rows of dicts; columns are (key, header, format spec). Missing values print as '-'."""
    print(f"\n{title}")
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            if value is None:
                line.append("-")
            elif isinstance(value, str) or not spec:
                line.append(str(value))
            else:
                line.append(format(value, spec))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for i, line in enumerate(cells):
        print(
            "  "
            + "  ".join(
                c.rjust(w) if i and j else c.ljust(w)
                for j, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    print(f"\nwrote {target}")


def add_common_arguments(parser: Any) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's own choice)"
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--max-load",
        type=float,
        default=None,
        help="wait until the 1-minute load average is below this before measuring (gives up after --wait)",
    )
    parser.add_argument("--wait", type=float, default=600.0, help="longest wait for --max-load, seconds")


# --- synthetic data --------------------------------------------------------------------------------
def fill_replay(replay: Any, transitions: int, seed: int = 0, episode_length: int = 1000) -> None:
    """Feed `transitions` steps of synthetic episodes (random frames from a pool, rising speed) through
    the replay's public `start_episode`/`add`, as the training loop does."""
    rng = np.random.default_rng(seed)
    shape = replay.frame_shape
    pool = rng.integers(0, 256, (256, *shape), dtype=np.uint8)
    stack = replay.stack

    def reset() -> None:
        start = int(rng.integers(0, len(pool) - stack))
        replay.start_episode(pool[start : start + stack], np.zeros(replay.car_dim, np.float32))

    reset()
    for t in range(transitions):
        step_in_episode = t % episode_length
        car = np.array([10.0 * (step_in_episode % 30), 1 + step_in_episode % 5, 2000.0], np.float32)
        ends = step_in_episode == episode_length - 1
        replay.add(int(rng.integers(11)), float(car[0] / 100.0), False, ends, pool[t % len(pool)], car)
        if ends:
            reset()


def random_observation(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (4, 64, 64), dtype=np.uint8)
    return frames, np.array([120.0, 3.0, 6500.0], np.float32)


def finish(results: dict[str, Any], load_at_start: Sequence[float], json_path: str | None) -> None:
    """Every script's last words: the load at start and end (how noisy the run was), then the JSON file."""
    results["load_average_end"] = list(load_average())
    print(
        f"\nload average at start {' '.join(f'{x:.2f}' for x in load_at_start)}, at end "
        f"{' '.join(f'{x:.2f}' for x in results['load_average_end'])}"
    )
    write_json(json_path, results)
