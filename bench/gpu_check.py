"""The GPU check (issue 26): one script, under 8 minutes on one GPU, for BENCHMARKS.md's GPU section.

    python bench/gpu_check.py --json bench/results/gpu.json
    python bench/gpu_check.py --device cpu --quick      # a dry run of every part on a machine without a GPU

What it measures, with the pinned network at batch 32 (replay filled with 5,000 synthetic steps):
1. learn steps/s on the CPU (all cores but one) and on the GPU, eager, in the same run: the ratio is
   the figure (goal: >= 10x on one data-centre GPU);
2. on the GPU, torch.compile (inductor) and torch.compile's "reduce-overhead" mode (CUDA graphs): the
   time per learn step against eager from the same start on the same batches, and how far the losses
   drift (compiled kernels round differently); a mode that fails is reported in one line, not fatal;
3. the peak GPU memory of the eager learner;
4. a 3,000-step run of `env_tm.py` on the embedded track, the learner beside the actor on the GPU, the
   actor on the CPU: the actor's time per step (median, p99: what the game waits for) and the learner's
   lag at episode ends.
Without CUDA it says so in one line and exits 2 (`--device cpu` runs every part on the CPU instead).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench_agent import compile_check, make_replay  # noqa: E402
from bench_beside import run_case  # noqa: E402

import replay as replay_module  # noqa: E402
from rainbow import RainbowAgent  # noqa: E402
from tm_config import Config  # noqa: E402

GOAL_RATIO = 10.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", default="cuda", help="the device checked: cuda (default), or cpu for a dry run"
    )
    parser.add_argument("--quick", action="store_true", help="few steps of everything (a dry run)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (part 2)")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args()


def learn_rate(device: torch.device, config: Config, steps: int, warmup: int) -> dict[str, Any]:
    """Eager learn steps/s from a replay of 5,000 steps; on CUDA also the peak memory."""
    agent = RainbowAgent(config, make_replay(replay_module, config, 5_000, seed=0), device, seed=0)
    for _ in range(warmup):
        agent.train()
    common.synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    losses = [agent.train()["loss"] for _ in range(steps)]  # .cpu() inside: one sync per step, as in training
    common.synchronize(device)
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "device": str(device),
        "steps": steps,
        "learn_steps_per_s": steps / seconds,
        "ms_per_step": 1e3 * seconds / steps,
        "finite": bool(np.isfinite(losses).all()),
    }
    if device.type == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def compiled(device: torch.device, config: Config, steps: int, mode: str | None) -> dict[str, Any]:
    try:
        return {"mode": mode or "default", **compile_check(config, device, steps, 5_000, mode=mode)}
    except Exception as error:  # a torch/driver combination without a working compiler: say so, go on
        return {
            "mode": mode or "default",
            "error": " ".join(str(error).split())[:300] or type(error).__name__,
        }


def beside_run(device: torch.device, steps: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        row = run_case("embedded", "beside", False, steps, folder, threads=1, extra=["--device", device.type])
        if "error" in row:
            return row
        records = [json.loads(line) for line in (folder / "embedded-beside-idle" / "metrics.jsonl").open()]
        lags = [r["learner_lag_max"] for r in records if r["kind"] == "episode" and "learner_lag_max" in r]
        row["learner_lag_max"] = max(lags, default=None)
        row["learner_lag_median_of_episodes"] = float(np.median(lags)) if lags else None
        return row
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        build = f"torch {torch.__version__}, " + (
            "a CUDA build" if torch.version.cuda else "a CPU-only build"
        )
        print(f"no CUDA device here ({build}): run this on a machine with an NVIDIA GPU, or --device cpu")
        return 2
    device = torch.device(args.device)
    started, load_at_start = time.perf_counter(), common.load_average()
    config = Config()
    quick = args.quick
    info = common.machine_info(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU (dry run on the CPU)"
    print(f"GPU check on {name}; torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)

    print("1. learn steps/s, eager (the CPU with all cores but one, then the device) ...", flush=True)
    # All cores but one, as a learner beside its actor takes by default (and two OpenMP threads on two
    # cores beside a busy one stall for up to a second: BENCHMARKS.md).
    torch.set_num_threads(max(1, (info["cores"] or 2) - 1))
    cpu = learn_rate(torch.device("cpu"), config, steps=10 if quick else 100, warmup=3 if quick else 10)
    gpu = learn_rate(device, config, steps=20 if quick else 1_000, warmup=5 if quick else 50)
    ratio = gpu["learn_steps_per_s"] / cpu["learn_steps_per_s"]
    common.print_table(
        "Learn steps/s, pinned network, batch 32, eager",
        [cpu, gpu],
        [("device", "device", "s"), ("learn_steps_per_s", "learn steps/s", ".1f"),
         ("ms_per_step", "ms/step", ".2f"), ("peak_memory_mib", "peak MiB", ".0f"), ("finite", "finite", "")],
    )  # fmt: skip
    print(f"device / CPU: {ratio:.1f}x (goal >= {GOAL_RATIO:g}x)", flush=True)

    compile_rows: list[dict[str, Any]] = []
    if not args.no_compile:
        print("\n2. torch.compile against eager on the device ...", flush=True)
        modes = [None, "reduce-overhead"] if device.type == "cuda" else [None]
        compile_rows = [compiled(device, config, 10 if quick else 300, mode) for mode in modes]
        for row in compile_rows:
            if "error" in row:
                print(f"  {row['mode']}: failed: {row['error']}", flush=True)
            else:
                drift = row["rel_loss_diff"]
                print(
                    f"  {row['mode']}: learn {row['compiled_learn_ms']:.2f} ms vs eager "
                    f"{row['eager_learn_ms']:.2f} ms "
                    f"({row['learn_ratio']:.2f}x the time), act {row['act_ratio']:.2f}x; compiled in "
                    f"{row['compile_s']:.0f} s; loss drift {drift}",
                    flush=True,
                )

    print(
        f"\n3. {300 if quick else 3_000:,}-step beside run on the embedded track, the learner on "
        f"{device.type} ..."
    )
    run = beside_run(device, 300 if quick else 3_000)
    if "error" in run:
        print(f"  the run failed: {run['error'][-500:]}")
    elif run["learner_lag_max"] is None:
        print(f"  no episode ended; actor's time per step p99 {run['agent_ms_p99']:.2f} ms")
    else:
        print(
            f"  actor's time per step: median {run['agent_ms_median']:.2f} ms, "
            f"p99 {run['agent_ms_p99']:.2f} ms; "
            f"learner lag at episode ends: max {run['learner_lag_max']}, median "
            f"{run['learner_lag_median_of_episodes']}; {run['env_steps_per_s']:.1f} env steps/s",
            flush=True,
        )
    total = time.perf_counter() - started
    print(f"\nthe check took {total / 60:.1f} min")
    results = {"device_name": name, "cpu": cpu, "device": gpu, "ratio": ratio, "compile": compile_rows,
               "beside_run": run, "seconds": total, "machine": info}  # fmt: skip
    common.finish(results, load_at_start, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
