"""Replay benchmarks (BENCHMARKS.md items 3 and 4): memory per transition and RSS at full capacity, and
prioritized sample(32) + update_priorities(32) against torchrl and a naive numpy sampler.

    python bench/bench_replay.py                                    # memory + PER (torchrl if importable)
    .venv-bench/bin/python bench/bench_replay.py --json bench/results/replay.json   # with torchrl

Memory: the pinned replay (capacity 100k) is filled through its public API until every slot of its frame
ring has been written, then the process RSS is read, before and after building the pinned agent and
running a few learn steps on it (the training process's footprint). The float32 baseline stores obs and
next obs as float32 stacks: 2 * (4 * 64 * 64 * 4) bytes plus the scalars.

PER: the same 100k transitions with random priorities. Every case does one sample of 32 (with frame stacks
where the case has frames) and one priority update of those 32, interleaved round by round:
- rainbow:          PrioritizedReplay.sample(32) + update_priorities(32), frames included;
- torchrl + frames: torchrl's PrioritizedReplayBuffer (C++ sum tree) over the same per-transition fields,
                    plus the same frame-stack gather from the same uint8 frame ring (equal work);
- torchrl (no frames): the PER machinery alone;
- naive numpy:      np.random.choice(p=priorities/sum) (O(N) per sample) + the same frame gather;
- baseline@REV:     with --baseline-rev, the PrioritizedReplay of that git revision, same contents.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from replay import PrioritizedReplay  # noqa: E402
from tm_config import Config  # noqa: E402

BYTES_GOAL = 4.5 * 1024
RSS_GOAL = 1 << 30
BATCH = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    common.add_common_arguments(parser)
    parser.add_argument("--reps", type=int, default=500, help="interleaved rounds of the PER cases")
    parser.add_argument("--inner", type=int, default=10, help="consecutive calls per case and round")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-per", action="store_true")
    parser.add_argument("--no-torchrl", action="store_true", help="leave torchrl out even if importable")
    parser.add_argument(
        "--learn-steps", type=int, default=20, help="learn steps before the final RSS reading"
    )
    parser.add_argument("--baseline-rev", default=None, help="git revision whose replay.py to add as a case")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# --- memory ----------------------------------------------------------------------------------------
def float32_baseline_bytes(config: Config) -> dict[str, int]:
    """Bytes per transition of a replay storing obs and next obs as float32 stacks, plus the scalars."""
    stack = config.conv_input * config.img_y * config.img_x * 4
    scalars = {
        "car + next car (float32)": 2 * config.input_car_dim * 4,
        "action (int64)": 8,
        "reward (float32)": 4,
        "terminated + truncated (bool)": 2,
        "priority (float64 sum-tree leaf + internal node)": 16,
    }
    return {"obs + next obs (float32)": 2 * stack, **scalars}


def fill_to_wrap(replay: PrioritizedReplay, seed: int, episode_length: int) -> float:
    """Add transitions until every frame slot has been written and the memory is full; returns seconds."""
    start = time.perf_counter()
    needed = max(replay.capacity, replay.frame_capacity) + 2 * episode_length
    common.fill_replay(replay, needed, seed=seed, episode_length=episode_length)
    assert len(replay) == replay.capacity and replay._next_frame >= replay.frame_capacity
    return time.perf_counter() - start


def measure_memory(config: Config, device: torch.device, learn_steps: int, seed: int) -> tuple[dict, Any]:
    import rainbow

    gc.collect()
    rss_start, _ = common.rss_bytes()
    replay = PrioritizedReplay.from_config(config, seed=seed)
    rss_empty, _ = common.rss_bytes()
    seconds = fill_to_wrap(replay, seed, config.ep_max_length)
    gc.collect()
    rss_full, _ = common.rss_bytes()
    agent = rainbow.RainbowAgent(config, replay, device, seed)
    frames, car = common.random_observation(seed)
    for _ in range(learn_steps):
        agent.act(frames, car, config.epsilon_cutoff)
        agent.train()
    gc.collect()
    rss_training, peak = common.rss_bytes()
    baseline = float32_baseline_bytes(config)
    per_transition = replay.bytes_per_transition()
    result = {
        "capacity": replay.capacity,
        "frame_capacity": replay.frame_capacity,
        "replay_nbytes": replay.nbytes,
        "bytes_per_transition": per_transition,
        "float32_baseline_bytes_per_transition": sum(baseline.values()),
        "float32_baseline_parts": baseline,
        "ratio_vs_float32": per_transition / sum(baseline.values()),
        "bytes_goal_met": per_transition <= BYTES_GOAL,
        "fill_seconds": seconds,
        "rss_after_imports": rss_start,
        "rss_empty_replay": rss_empty,
        "rss_full_replay": rss_full,
        "rss_full_replay_and_agent_after_learning": rss_training,
        "peak_rss": peak,
        "rss_goal_met": rss_training <= RSS_GOAL and peak <= RSS_GOAL,
    }
    del agent
    gc.collect()
    return result, replay


# --- PER -------------------------------------------------------------------------------------------
class NaiveNumpyPER:
    """Proportional PER the straightforward way: priorities in one array, np.random.choice per sample."""

    def __init__(self, capacity: int, alpha: float, beta: float, epsilon: float, seed: int) -> None:
        self.priorities = np.zeros(capacity)
        self.alpha, self.beta, self.epsilon = alpha, beta, epsilon
        self.rng = np.random.default_rng(seed)

    def sample(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        probabilities = self.priorities / self.priorities.sum()
        indices = self.rng.choice(len(self.priorities), size=batch, p=probabilities)
        weights = (len(self.priorities) * probabilities[indices]) ** -self.beta
        return indices, weights / weights.max()

    def update(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        self.priorities[indices] = (np.abs(td_errors) + self.epsilon) ** self.alpha


def gather_frames(replay: PrioritizedReplay, slots: np.ndarray) -> dict[str, np.ndarray]:
    """The frame-stack and car gather PrioritizedReplay.sample does, for the other samplers' indices."""
    window = replay.frame_index[slots][:, None] + np.arange(1 - replay.stack, 1)
    stack_frames = window % replay.frame_capacity
    next_stack_frames = (window + 1) % replay.frame_capacity
    return {
        "frames": replay.frames[stack_frames],
        "next_frames": replay.frames[next_stack_frames],
        "car": replay.car[stack_frames[:, -1]],
        "next_car": replay.car[next_stack_frames[:, -1]],
    }


def make_torchrl(replay: PrioritizedReplay, config: Config, priorities: np.ndarray) -> tuple[Any, str]:
    """torchrl's PrioritizedReplayBuffer over the replay's per-transition fields, with the same priorities."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchrl
            from tensordict import TensorDict
            from torchrl.data import LazyTensorStorage, PrioritizedReplayBuffer
            from torchrl.data.replay_buffers.samplers import PrioritizedSampler
    except Exception as error:  # noqa: BLE001 - any import failure means "not available here"
        return None, f"torchrl not importable: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
    n = replay.capacity
    buffer = PrioritizedReplayBuffer(
        alpha=config.alpha,
        beta=config.beta,
        eps=config.priority_epsilon,
        storage=LazyTensorStorage(n),
        batch_size=BATCH,
    )
    if not isinstance(buffer._sampler, PrioritizedSampler):  # pragma: no cover - torchrl API drift
        return None, "torchrl's PrioritizedReplayBuffer has no PrioritizedSampler"
    buffer.extend(
        TensorDict(
            {
                "slot": torch.arange(n),
                "action": torch.as_tensor(replay.actions),
                "reward": torch.as_tensor(replay.rewards),
                "terminated": torch.as_tensor(replay.terminated),
            },
            batch_size=[n],
        )
    )
    # torchrl stores priority ** alpha itself: hand it the raw priorities our tree's leaves came from.
    buffer.update_priority(torch.arange(n), torch.as_tensor(priorities, dtype=torch.float32))
    return buffer, f"torchrl {torchrl.__version__}, {type(buffer._sampler._sum_tree).__name__}"


def measure_per(replay: PrioritizedReplay, config: Config, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cpu")  # the replay is host memory; torchrl's tree is on the CPU here too
    rng = np.random.default_rng(args.seed)
    n = replay.capacity
    raw = rng.gamma(1.0, 1.0, n)  # |td| + epsilon, a long-tailed spread like real TD errors
    live = np.arange(replay._oldest_transition, replay._next_transition)
    replay.update_priorities(live, raw[live % n] - config.priority_epsilon)
    td_errors = rng.gamma(1.0, 1.0, (1024, BATCH))
    counter = iter(range(10**12))

    def next_td() -> np.ndarray:
        return td_errors[next(counter) % len(td_errors)]

    def rainbow_case() -> None:
        batch = replay.sample(BATCH)
        replay.update_priorities(batch["indices"], next_td())

    naive = NaiveNumpyPER(n, config.alpha, config.beta, config.priority_epsilon, args.seed)
    naive.priorities[:] = raw**config.alpha

    def naive_case() -> None:
        slots, weights = naive.sample(BATCH)
        gather_frames(replay, slots)
        naive.update(slots, next_td())

    cases = {"rainbow": rainbow_case, "naive numpy O(N)": naive_case}
    identical_to_baseline = None
    if args.baseline_rev:
        from bench_agent import load_revision

        old = load_revision(args.baseline_rev)[1].PrioritizedReplay.from_config(config, seed=args.seed)
        old.load_state_dict(replay.state_dict())  # the same contents, priorities and sampling stream
        # Same state in, same batches and trees out: the optimisations changed speed, not results.
        same = True
        for _ in range(20):
            ours, theirs = replay.sample(BATCH), old.sample(BATCH)
            same &= all(np.array_equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours)
            td = next_td()
            replay.update_priorities(ours["indices"], td)
            old.update_priorities(theirs["indices"], td)
            same &= bool(np.array_equal(replay.tree.nodes, old.tree.nodes))
        identical_to_baseline = bool(same)

        def baseline_case() -> None:
            batch = old.sample(BATCH)
            old.update_priorities(batch["indices"], next_td())

        cases[f"baseline@{args.baseline_rev}"] = baseline_case
    torchrl_note = "left out (--no-torchrl)"
    if not args.no_torchrl:
        buffer, torchrl_note = make_torchrl(replay, config, raw)
        if buffer is not None:

            def torchrl_case() -> None:
                sample, info = buffer.sample(return_info=True)
                gather_frames(replay, sample["slot"].numpy())
                buffer.update_priority(info["index"], torch.as_tensor(next_td(), dtype=torch.float32))

            def torchrl_bare_case() -> None:
                _, info = buffer.sample(return_info=True)
                buffer.update_priority(info["index"], torch.as_tensor(next_td(), dtype=torch.float32))

            cases["torchrl + frames"] = torchrl_case
            cases["torchrl (no frames)"] = torchrl_bare_case
    samples = common.interleave(cases, args.reps, device, warmup=20, inner=args.inner, seed=args.seed)

    # rainbow's two halves apart, for the record
    parts: dict[str, list[float]] = {"sample(32)": [], "update_priorities(32)": []}
    for _ in range(args.reps * args.inner // 4):
        start = time.perf_counter()
        batch = replay.sample(BATCH)
        middle = time.perf_counter()
        replay.update_priorities(batch["indices"], next_td())
        parts["sample(32)"].append(middle - start)
        parts["update_priorities(32)"].append(time.perf_counter() - middle)
    reference = "torchrl + frames" if "torchrl + frames" in samples else "naive numpy O(N)"
    base = float(np.median(samples[reference]))
    rows = [
        {"case": name, **common.summarize(s), "ratio": float(np.median(s)) / base}
        for name, s in samples.items()
    ]
    return {
        "reference": reference,
        "torchrl": torchrl_note,
        "rows": rows,
        "rainbow_parts": [
            {"case": f"rainbow {k}", **common.summarize(np.asarray(v))} for k, v in parts.items()
        ],
        "goal_met": float(np.median(samples["rainbow"])) <= base if reference.startswith("torchrl") else None,
        "identical_to_baseline": identical_to_baseline,
    }


# --- main ------------------------------------------------------------------------------------------
def mib(value: float) -> str:
    return f"{value / 2**20:.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    common.set_threads(args.threads)
    config = Config()
    load = common.wait_for_quiet(args.max_load, args.wait)
    info = common.machine_info(device)
    common.print_machine(info)
    results: dict[str, Any] = {"machine": info, "args": vars(args)}

    if args.skip_memory:
        replay = PrioritizedReplay.from_config(config, seed=args.seed)
        fill_to_wrap(replay, args.seed, config.ep_max_length)
    else:
        memory, replay = measure_memory(config, device, args.learn_steps, args.seed)
        results["memory"] = memory
        baseline = memory["float32_baseline_bytes_per_transition"]
        print(
            f"\n3. Replay memory at capacity {memory['capacity']:,} (frame ring "
            f"{memory['frame_capacity']:,}; filled through add() in {memory['fill_seconds']:.1f} s until "
            "every frame slot was written)"
        )
        print(
            f"  bytes per transition        {memory['bytes_per_transition']:10.1f}  "
            f"(goal <= {BYTES_GOAL:.0f}: {'met' if memory['bytes_goal_met'] else 'NOT met'})"
        )
        print(
            f"  float32 obs + next obs      {baseline:10.1f}  "
            f"(= {' + '.join(str(v) for v in memory['float32_baseline_parts'].values())}); "
            f"ratio {memory['ratio_vs_float32']:.4f} (x{1 / memory['ratio_vs_float32']:.1f} smaller)"
        )
        print(f"  replay arrays               {mib(memory['replay_nbytes']):>10}")
        training = memory["rss_full_replay_and_agent_after_learning"]
        print(
            f"  RSS after imports {mib(memory['rss_after_imports'])}, empty replay "
            f"{mib(memory['rss_empty_replay'])}, full replay {mib(memory['rss_full_replay'])}, "
            f"+ pinned agent after {args.learn_steps} learn steps {mib(training)}, "
            f"peak {mib(memory['peak_rss'])} (goal <= 1 GiB: "
            f"{'met' if memory['rss_goal_met'] else 'NOT met'})"
        )

    if not args.skip_per:
        per = measure_per(replay, config, args)
        results["per"] = per
        print(f"\n  torchrl: {per['torchrl']}")
        common.print_table(
            f"4. PER sample({BATCH}) + update_priorities({BATCH}) at capacity {replay.capacity:,} "
            f"(ratios vs {per['reference']})",
            per["rows"] + per["rainbow_parts"],
            [
                ("case", "case", ""),
                ("median_ms", "median ms", ".3f"),
                ("p99_ms", "p99 ms", ".3f"),
                ("min_ms", "min ms", ".3f"),
                ("n", "n", "d"),
                ("ratio", f"x {per['reference']}", ".3f"),
            ],
        )
        if per["goal_met"] is not None:
            print(f"  goal (no slower than torchrl): {'met' if per['goal_met'] else 'NOT met'}")
        if per["identical_to_baseline"] is not None:
            print(
                f"  20 samples + priority updates from the same state as baseline@{args.baseline_rev}: "
                + ("identical batches and sum trees" if per["identical_to_baseline"] else "DIFFERENT results")
            )

    common.finish(results, load, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
