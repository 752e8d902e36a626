"""Training-loop benchmarks (BENCHMARKS.md item 5): the embedded track alone, the training loop's parts, and
optionally env_tm.py end to end.

    python bench/bench_loop.py                          # env alone + instrumented loop, pinned config
    python bench/bench_loop.py --baseline-rev 28cc7d4   # also the loop with an older rainbow.py/replay.py
    python bench/bench_loop.py --e2e-steps 300,1300 --json bench/results/loop.json

Env alone: the embedded track (CarRacing at 20 Hz) stepped with random actions from the 11-action table,
resets timed apart. The loop: the same components and order as env_tm.py's training loop (act, env.step,
split_observation, replay.add, one learn step once a batch is stored; reset at the end of an episode),
each timed, without the run's logging, health monitor and checkpoints. Acting starts at global step
`epsilon_decay_to` (epsilon 0.01, the long-run regime: the network runs on 99% of the steps). With
--baseline-rev, loops with the current and the older agent alternate in blocks. --e2e-steps N1,N2 runs
`env_tm.py --env embedded` twice in a subprocess (no W&B, no checkpoints, a temporary run folder) and
reports the marginal rate (N2 - N1) / (t2 - t1), which leaves out start-up and shut-down.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench_agent import load_revision  # noqa: E402

import rainbow  # noqa: E402
import replay as replay_module  # noqa: E402
from embedded_track import make_embedded_track  # noqa: E402
from environment import split_observation  # noqa: E402
from rainbow import ACTION_VECTORS  # noqa: E402
from tm_config import Config  # noqa: E402

SECTIONS = ("act", "env.step", "split_observation", "replay.add", "learn", "episode reset")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    common.add_common_arguments(parser)
    parser.add_argument("--env-steps", type=int, default=1000, help="steps of the env-alone measurement")
    parser.add_argument("--loop-steps", type=int, default=1000, help="measured loop iterations per subject")
    parser.add_argument("--warmup", type=int, default=50, help="loop iterations left out of the statistics")
    parser.add_argument("--block", type=int, default=50, help="iterations per block when subjects alternate")
    parser.add_argument("--baseline-rev", default=None, help="git revision whose rainbow.py/replay.py to add")
    parser.add_argument("--e2e-steps", default=None, metavar="N1,N2", help="also run env_tm.py end to end")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# --- env alone -------------------------------------------------------------------------------------
def bench_env(config: Config, steps: int, seed: int) -> dict[str, Any]:
    env = make_embedded_track(config, seed=seed)
    rng = np.random.default_rng(seed)
    step_times, reset_times = [], []
    try:
        start = time.perf_counter()
        env.reset(seed=seed)
        reset_times.append(time.perf_counter() - start)
        for _ in range(steps):
            action = ACTION_VECTORS[int(rng.integers(len(ACTION_VECTORS)))].copy()
            start = time.perf_counter()
            _, _, terminated, truncated, _ = env.step(action)
            step_times.append(time.perf_counter() - start)
            if terminated or truncated:
                start = time.perf_counter()
                env.reset()
                reset_times.append(time.perf_counter() - start)
    finally:
        env.close()
    total = sum(step_times) + sum(reset_times)
    return {
        "steps": steps,
        "steps_per_s": steps / total,
        "step": common.summarize(np.asarray(step_times)),
        "resets": len(reset_times),
        "reset_median_ms": float(np.median(reset_times) * 1e3),
        "real_time_factor": steps / total * config.time_step_duration,
    }


# --- the loop --------------------------------------------------------------------------------------
class LoopRunner:
    """env_tm.py's training loop for one agent implementation, resumable block by block."""

    def __init__(
        self,
        name: str,
        agent_module: ModuleType,
        replay_mod: ModuleType,
        config: Config,
        device: torch.device,
        seed: int,
    ) -> None:
        self.name, self.config, self.device = name, config, device
        self.env = make_embedded_track(config, seed=seed)
        self.replay = replay_mod.PrioritizedReplay.from_config(config, seed=seed)
        self.agent = agent_module.RainbowAgent(config, self.replay, device, seed)
        self.step = config.epsilon_decay_to  # epsilon 0.01 from here on
        self.episode = 0
        self.seed = seed
        self.times: dict[str, list[float]] = {key: [] for key in (*SECTIONS, "iteration")}
        self.learned: list[bool] = []
        self.reset_times: list[float] = []  # the "episode reset" times of iterations that ended an episode
        obs, _ = self.env.reset(seed=seed)
        self.frames, self.car = split_observation(obs, config)
        self.replay.start_episode(self.frames, self.car)

    def run(self, iterations: int) -> None:
        config, sync = self.config, (lambda: common.synchronize(self.device))
        for _ in range(iterations):
            spent = dict.fromkeys(SECTIONS, 0.0)
            t0 = time.perf_counter()
            action = self.agent.act(self.frames, self.car, self.step)
            sync()
            t1 = time.perf_counter()
            obs, reward, terminated, truncated, _ = self.env.step(ACTION_VECTORS[action].copy())
            t2 = time.perf_counter()
            next_frames, next_car = split_observation(obs, config)
            t3 = time.perf_counter()
            self.replay.add(
                action, float(reward), bool(terminated), bool(truncated), next_frames[-1], next_car
            )
            t4 = time.perf_counter()
            spent.update(
                {"act": t1 - t0, "env.step": t2 - t1, "split_observation": t3 - t2, "replay.add": t4 - t3}
            )
            self.step += 1
            self.frames, self.car = next_frames, next_car
            learned = len(self.replay) >= config.batch_size
            if learned:
                self.agent.train()
                sync()
            t5 = time.perf_counter()
            spent["learn"] = t5 - t4
            if terminated or truncated:
                self.episode += 1
                obs, _ = self.env.reset(seed=self.seed + self.episode)
                self.frames, self.car = split_observation(obs, config)
                self.replay.start_episode(self.frames, self.car)
            t6 = time.perf_counter()
            spent["episode reset"] = t6 - t5
            if terminated or truncated:
                self.reset_times.append(t6 - t5)
            for key, value in spent.items():
                self.times[key].append(value)
            self.times["iteration"].append(t6 - t0)
            self.learned.append(learned)

    def summary(self, warmup: int) -> dict[str, Any]:
        iteration = np.asarray(self.times["iteration"][warmup:])
        total = iteration.sum()
        rows = []
        for key in (*SECTIONS, "iteration"):
            values = np.asarray(self.times[key][warmup:])
            row = {"section": key, "share": float(values.sum() / total)}
            if key == "episode reset":  # per reset, not per iteration
                values = np.asarray(self.reset_times)
            row.update(common.summarize(values) if values.size else {"n": 0})
            rows.append(row)
        step_s = self.config.time_step_duration
        return {
            "subject": self.name,
            "iterations": int(iteration.size),
            "steps_per_s": float(iteration.size / total),
            "overrun_fraction": float((iteration > step_s).mean()),
            "episodes": self.episode,
            "learn_fraction": float(np.mean(self.learned[warmup:])),
            "sections": rows,
        }

    def close(self) -> None:
        self.env.close()


# --- end to end ------------------------------------------------------------------------------------
def run_e2e(steps: list[int], device: str, seed: int) -> dict[str, Any]:
    walls = []
    with tempfile.TemporaryDirectory(prefix="rainbow-bench-") as root:
        for n in steps:
            command = [
                sys.executable,
                str(common.ROOT / "env_tm.py"),
                "--env",
                "embedded",
                "--steps",
                str(n),
                "--no-wandb",
                "--fresh",
                "--device",
                device,
                "--seed",
                str(seed),
                "--checkpoint-root",
                root,
                "--run-name",
                f"bench-{n}",
                "--set",
                "checkpoint=false",
            ]
            start = time.perf_counter()
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                cwd=common.ROOT,
                env={**os.environ, "WANDB_MODE": "disabled"},
            )
            wall = time.perf_counter() - start
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                return {"error": f"env_tm.py --steps {n} exited {done.returncode}: {' | '.join(tail)}"}
            walls.append(wall)
    marginal = (steps[-1] - steps[0]) / (walls[-1] - walls[0]) if len(steps) > 1 else steps[0] / walls[0]
    return {"steps": steps, "wall_seconds": walls, "marginal_steps_per_s": marginal}


# --- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    common.set_threads(args.threads)
    torch.manual_seed(args.seed)
    config = Config()
    load = common.wait_for_quiet(args.max_load, args.wait)
    info = common.machine_info(device)
    common.print_machine(info)
    results: dict[str, Any] = {"machine": info, "args": vars(args)}

    env = bench_env(config, args.env_steps, args.seed)
    results["env"] = env
    print(
        f"\n5a. Embedded track alone: {env['steps_per_s']:.1f} env steps/s "
        f"(x{env['real_time_factor']:.2f} TrackMania's 20 Hz); step median {env['step']['median_ms']:.2f} "
        f"ms, p99 {env['step']['p99_ms']:.2f} ms; {env['resets']} resets, "
        f"median {env['reset_median_ms']:.1f} ms"
    )

    runners = [LoopRunner("rainbow", rainbow, replay_module, config, device, args.seed)]
    if args.baseline_rev:
        old_rainbow, old_replay = load_revision(args.baseline_rev)
        runners.append(
            LoopRunner(f"baseline@{args.baseline_rev}", old_rainbow, old_replay, config, device, args.seed)
        )
    try:
        for runner in runners:
            runner.run(args.warmup)
        order = list(runners)
        shuffler = random.Random(args.seed)
        for done in range(0, args.loop_steps, args.block):
            shuffler.shuffle(order)
            for runner in order:
                runner.run(min(args.block, args.loop_steps - done))
        summaries = [runner.summary(args.warmup) for runner in runners]
    finally:
        for runner in runners:
            runner.close()
    results["loop"] = summaries
    base = summaries[-1]["steps_per_s"] if len(summaries) > 1 else None
    for summary in summaries:
        ratio = f", x{summary['steps_per_s'] / base:.3f} the baseline's rate" if base else ""
        common.print_table(
            f"5b. Training loop, {summary['subject']}: {summary['steps_per_s']:.1f} steps/s{ratio} over "
            f"{summary['iterations']} iterations ({summary['learn_fraction']:.0%} with a learn step, "
            f"{summary['episodes']} episodes); overruns (> {config.time_step_duration * 1e3:.0f} ms) "
            f"{summary['overrun_fraction']:.1%}",
            summary["sections"],
            [
                ("section", "section", ""),
                ("median_ms", "median ms", ".3f"),
                ("p99_ms", "p99 ms", ".3f"),
                ("mean_ms", "mean ms", ".3f"),
                ("share", "share of time", ".1%"),
            ],
        )
    loop_rate = summaries[0]["steps_per_s"]
    print(
        f"\n  env alone {env['steps_per_s']:.1f} steps/s vs loop {loop_rate:.1f} steps/s: "
        "the loop is bound by "
        + max(
            (
                (row["section"], row["share"])
                for row in summaries[0]["sections"]
                if row["section"] != "iteration"
            ),
            key=lambda item: item[1],
        )[0]
    )

    if args.e2e_steps:
        steps = [int(x) for x in args.e2e_steps.split(",")]
        e2e = run_e2e(steps, device.type, args.seed)
        results["e2e"] = e2e
        if "error" in e2e:
            print(f"\n5c. env_tm.py end to end: {e2e['error']}")
        else:
            walls = ", ".join(
                f"{n} steps {w:.1f} s" for n, w in zip(e2e["steps"], e2e["wall_seconds"], strict=True)
            )
            print(f"\n5c. env_tm.py end to end ({walls}): {e2e['marginal_steps_per_s']:.1f} steps/s marginal")

    common.finish(results, load, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
