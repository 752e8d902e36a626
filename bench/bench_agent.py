"""Agent benchmarks (BENCHMARKS.md items 1 and 2): act latency, act + learn, learn steps/s, profile.

    python bench/bench_agent.py                          # CPU or CUDA (auto), the pinned config
    python bench/bench_agent.py --baseline-rev 28cc7d4   # also the rainbow.py/replay.py of a git revision
    python bench/bench_agent.py --profile --thread-sweep 1,2 --bf16-steps 200 --json bench/results/agent.json

Subjects, measured in the same run with interleaved repetitions (see common.py):
- rainbow:  rainbow.RainbowAgent as the training loop uses it (pinned config, replay capacity 100k);
- naive:    bench/naive_iqn.py, the same network and loss written plainly (the baseline of every ratio);
- baseline: rainbow.py + replay.py as of `--baseline-rev` (e.g. the commit before an optimisation).

Acting runs with epsilon 0 (global step past `epsilon_cutoff`), so the network runs on every call: one
observation, `n_tau_action` quantiles, NoisyNet noise on, BatchNorm in eval mode, as in training. Before
anything is timed, every subject's loss is checked against rainbow's from the same weights, batch and seed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from naive_iqn import NaiveAgent  # noqa: E402

import rainbow  # noqa: E402
import replay as replay_module  # noqa: E402
from tm_config import Config  # noqa: E402

ACT_GOAL_P99_MS = 0.5
ACT_LEARN_GOAL_P99_MS = 12.5
LEARN_GOAL_STEPS_PER_S = 90.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    common.add_common_arguments(parser)
    parser.add_argument(
        "--act-rounds", type=int, default=100, help="rounds of --act-inner actions per subject"
    )
    parser.add_argument("--act-inner", type=int, default=30, help="consecutive actions per subject and round")
    parser.add_argument(
        "--learn-reps", type=int, default=300, help="learn steps (and act + learn) per subject"
    )
    parser.add_argument("--fill", type=int, default=5000, help="transitions stored before measuring")
    parser.add_argument("--baseline-rev", default=None, help="git revision whose rainbow.py/replay.py to add")
    parser.add_argument("--no-naive", action="store_true", help="leave out the naive baseline")
    parser.add_argument(
        "--check-steps", type=int, default=20, help="learn steps of the loss equivalence check"
    )
    parser.add_argument(
        "--profile", action="store_true", help="torch.profiler and section times of learn steps"
    )
    parser.add_argument("--profile-steps", type=int, default=50)
    parser.add_argument(
        "--thread-sweep",
        default=None,
        metavar="N,M",
        help="CPU: also time rainbow at these intra-op thread counts",
    )
    parser.add_argument(
        "--bf16-steps",
        type=int,
        default=0,
        help="measure bf16 autocast: loss drift vs fp32 over this many learn steps from one start, and speed",
    )
    parser.add_argument(
        "--compile-steps",
        type=int,
        default=0,
        help="measure torch.compile (inductor) on both networks against eager, this many learn steps each",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# --- subjects --------------------------------------------------------------------------------------
@dataclass
class Subject:
    name: str
    agent: Any
    act: Callable[[], int]  # one action with the network running (epsilon 0)
    learn: Callable[[], Any]  # one learn step


def load_revision(rev: str) -> tuple[ModuleType, ModuleType]:
    """rainbow.py and replay.py as of git revision `rev`, imported as separate modules."""
    folder = Path(tempfile.mkdtemp(prefix="rainbow-baseline-"))
    modules = []
    for name in ("rainbow", "replay"):
        text = subprocess.run(
            ["git", "-C", str(common.ROOT), "show", f"{rev}:{name}.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        path = folder / f"baseline_{name}.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location(f"baseline_{name}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    return modules[0], modules[1]


def make_replay(module: ModuleType, config: Config, fill: int, seed: int, prioritized: bool = True) -> Any:
    memory = module.PrioritizedReplay.from_config(
        config.with_overrides(use_prioritized_replay=prioritized), seed
    )
    common.fill_replay(memory, fill, seed=seed)
    return memory


def build_subjects(
    config: Config,
    device: torch.device,
    args: argparse.Namespace,
    baseline: tuple[ModuleType, ModuleType] | None,
) -> list[Subject]:
    frames, car = common.random_observation(args.seed)
    step = config.epsilon_cutoff  # epsilon 0 from here on: every act runs the network
    subjects = []
    agent = rainbow.RainbowAgent(
        config, make_replay(replay_module, config, args.fill, args.seed), device, args.seed
    )
    subjects.append(Subject("rainbow", agent, lambda: agent.act(frames, car, step), agent.train))
    if not args.no_naive:
        naive = NaiveAgent(
            config, make_replay(replay_module, config, args.fill, args.seed), device, args.seed
        )
        subjects.append(Subject("naive", naive, lambda: naive.greedy_action(frames, car), naive.train))
    if baseline is not None:
        old_rainbow, old_replay = baseline
        old = old_rainbow.RainbowAgent(
            config, make_replay(old_replay, config, args.fill, args.seed), device, args.seed
        )
        subjects.append(
            Subject(f"baseline@{args.baseline_rev}", old, lambda: old.act(frames, car, step), old.train)
        )
    return subjects


# --- equivalence -----------------------------------------------------------------------------------
def check_equivalence(
    config: Config,
    device: torch.device,
    baseline: tuple[ModuleType, ModuleType] | None,
    steps: int,
    fill: int,
) -> list[dict[str, Any]]:
    """Loss of each subject vs rainbow's, from the same weights, replay contents and torch seed."""
    reference = rainbow.RainbowAgent(config, make_replay(replay_module, config, fill, 1), device, seed=1)
    start = copy.deepcopy(reference.state_dict())
    others: dict[str, Any] = {
        "naive": NaiveAgent(config, make_replay(replay_module, config, fill, 1), device, seed=1),
    }
    if baseline is not None:
        others["baseline"] = baseline[0].RainbowAgent(
            config, make_replay(baseline[1], config, fill, 1), device, 1
        )
    for other in others.values():
        other.online.load_state_dict(start["online"])
        other.target.load_state_dict(start["target"])
    losses: dict[str, list[float]] = {"rainbow": [], **{name: [] for name in others}}
    for i in range(steps):
        for name, agent in [("rainbow", reference), *others.items()]:
            torch.manual_seed(10_000 + i)
            losses[name].append(float(agent.train()["loss"]))
    rows = []
    ref = np.asarray(losses["rainbow"])
    for name in others:
        rel = np.abs(np.asarray(losses[name]) - ref) / np.abs(ref)
        rows.append(
            {
                "subject": name,
                "step0_rel_diff": float(rel[0]),
                "max_rel_diff": float(rel.max()),
                "steps": steps,
            }
        )
    return rows


# --- measurements ----------------------------------------------------------------------------------
def bench_act(
    subjects: list[Subject], device: torch.device, rounds: int, inner: int
) -> dict[str, np.ndarray]:
    return common.interleave({s.name: s.act for s in subjects}, rounds, device, warmup=3, inner=inner)


def bench_act_learn(
    subjects: list[Subject], device: torch.device, reps: int, seed: int = 0
) -> dict[str, dict[str, np.ndarray]]:
    """The training loop's agent work: one action, then one learn step; `reps` interleaved iterations per
    subject. Returns per subject the seconds of the whole iteration, of its action (which follows a learn
    step, as in training) and of its learn step."""
    parts = ("act + learn", "act", "learn")
    samples: dict[str, dict[str, list[float]]] = {s.name: {k: [] for k in parts} for s in subjects}
    for subject in subjects:  # warm-up
        for _ in range(3):
            subject.act()
            subject.learn()
    order = list(subjects)
    shuffler = random.Random(seed)
    for _ in range(reps):
        shuffler.shuffle(order)
        for subject in order:
            common.synchronize(device)
            start = time.perf_counter()
            subject.act()
            common.synchronize(device)
            acted = time.perf_counter()
            subject.learn()
            common.synchronize(device)
            end = time.perf_counter()
            record = samples[subject.name]
            record["act + learn"].append(end - start)
            record["act"].append(acted - start)
            record["learn"].append(end - acted)
    return {name: {k: np.asarray(v) for k, v in record.items()} for name, record in samples.items()}


def rows_with_ratio(
    samples: dict[str, np.ndarray], baseline: str, extra: Callable[[np.ndarray], dict] | None = None
) -> list[dict]:
    base = np.median(samples[baseline]) if baseline in samples else float("nan")
    rows = []
    for name, seconds in samples.items():
        row = {
            "subject": name,
            **common.summarize(seconds),
            "ratio": common.ratio(float(np.median(seconds)), base),
        }
        if extra is not None:
            row.update(extra(seconds))
        rows.append(row)
    return rows


# --- profile ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def sections(agent: Any, device: torch.device) -> Iterator[dict[str, list[float]]]:
    """Wall time per learn step of each part of agent.train(), by wrapping what it calls (no edits)."""
    per_step: dict[str, float] = {}
    collected: dict[str, list[float]] = {}

    def timed(name: str | Callable[[], str], fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            common.synchronize(device)
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                common.synchronize(device)
                key = name() if callable(name) else name
                per_step[key] = per_step.get(key, 0.0) + time.perf_counter() - start

        return wrapper

    def online_name() -> str:
        return (
            "online forward (learn, train mode)" if agent.online.training else "online forward (Double-DQN)"
        )

    patches: list[tuple[Any, str, Any]] = [
        (agent.replay, "sample", timed("replay.sample", agent.replay.sample)),
        (
            agent.replay,
            "update_priorities",
            timed("replay.update_priorities", agent.replay.update_priorities),
        ),
        (agent.online, "forward", timed(online_name, agent.online.forward)),
        (agent.target, "forward", timed("target forward", agent.target.forward)),
        (agent.online, "reset_noise", timed("reset_noise (online + target)", agent.online.reset_noise)),
        (agent.target, "reset_noise", timed("reset_noise (online + target)", agent.target.reset_noise)),
        (agent.optimizer, "step", timed("optimizer step", agent.optimizer.step)),
        (torch.nn.utils, "clip_grad_norm_", timed("clip_grad_norm_", torch.nn.utils.clip_grad_norm_)),
        (torch.Tensor, "backward", timed("backward", torch.Tensor.backward)),
    ]
    saved = [(target, attr, target.__dict__.get(attr, None)) for target, attr, _ in patches]
    for target, attr, wrapper in patches:
        setattr(target, attr, wrapper)
    train = agent.train

    def train_timed() -> Any:
        per_step.clear()
        common.synchronize(device)
        start = time.perf_counter()
        result = train()
        common.synchronize(device)
        total = time.perf_counter() - start
        per_step["other (loss, metrics, host sync, glue)"] = total - sum(per_step.values())
        per_step["train() total"] = total
        for key, value in per_step.items():
            collected.setdefault(key, []).append(value)
        return result

    try:
        agent.train = train_timed
        yield collected
    finally:
        del agent.train
        for target, attr, original in saved:
            if original is None:
                delattr(target, attr)
            else:
                setattr(target, attr, original)


OP_GROUPS = {
    "convolution (fwd + bwd)": ("conv",),
    "matmul (linear fwd + bwd)": ("addmm", "aten::mm", "bmm", "matmul", "linear"),
    "batch norm (fwd + bwd)": ("batch_norm",),
    "optimizer (AdamW kernels)": ("adam", "_foreach", "lerp", "addcdiv", "addcmul"),
    "copies and dtype casts": ("copy_", "_to_copy", "aten::to", "contiguous", "clone"),
}


def profile_learn(agent: Any, device: torch.device, steps: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        agent.train()
    with sections(agent, device) as collected:
        for _ in range(steps):
            agent.train()
    section_rows = [
        {
            "section": key,
            "median_ms": float(np.median(v) * 1e3),
            "share": float(np.median(v) / np.median(collected["train() total"])),
        }
        for key, v in collected.items()
    ]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            agent.train()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0 or device.type == "cuda"]
    total_self = sum(e.self_cpu_time_total for e in events)
    groups = dict.fromkeys([*OP_GROUPS, "everything else"], 0.0)
    for event in events:
        name = event.key.lower()
        group = next(
            (g for g, keys in OP_GROUPS.items() if any(k.lower() in name for k in keys)), "everything else"
        )
        groups[group] += event.self_cpu_time_total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:20]
    return {
        "sections": section_rows,
        "op_groups": [
            {
                "group": g,
                "self_cpu_ms_per_step": t / 1e3 / steps,
                "share": t / total_self if total_self else 0.0,
            }
            for g, t in groups.items()
        ],
        "top_ops": [
            {
                "op": e.key,
                "calls_per_step": e.count / steps,
                "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                "share": e.self_cpu_time_total / total_self if total_self else 0.0,
            }
            for e in top
        ],
        "ops_per_step": sum(e.count for e in events) / steps,
    }


# --- thread sweep ----------------------------------------------------------------------------------
def thread_sweep(
    subject: Subject, device: torch.device, counts: list[int], reps: int, inner: int
) -> list[dict]:
    original = torch.get_num_threads()
    act: dict[int, list[float]] = {n: [] for n in counts}
    step: dict[int, list[float]] = {n: [] for n in counts}
    try:
        for _ in range(reps):
            for n in counts:
                torch.set_num_threads(n)
                subject.act()
                for _ in range(inner):
                    act[n].append(common.time_once(subject.act, device))
                step[n].append(common.time_once(lambda: (subject.act(), subject.learn()), device))
    finally:
        torch.set_num_threads(original)
    base_act, base_step = np.median(act[counts[0]]), np.median(step[counts[0]])
    rows = []
    for n in counts:
        a, s = common.summarize(np.asarray(act[n])), common.summarize(np.asarray(step[n]))
        rows.append(
            {
                "threads": n,
                "act_median_ms": a["median_ms"],
                "act_p99_ms": a["p99_ms"],
                "act_ratio": a["median_ms"] / (base_act * 1e3),
                "act_learn_median_ms": s["median_ms"],
                "act_learn_p99_ms": s["p99_ms"],
                "act_learn_ratio": s["median_ms"] / (base_step * 1e3),
            }
        )
    return rows


# --- bf16 ------------------------------------------------------------------------------------------
def relative_drift(losses: list[float], reference: list[float]) -> dict[str, float]:
    """|loss - reference| / |reference|, step by step: its median, p95 and max."""
    drift = np.abs(np.asarray(losses) - np.asarray(reference)) / np.abs(np.asarray(reference))
    return {
        "median": float(np.median(drift)),
        "p95": float(np.percentile(drift, 95)),
        "max": float(drift.max()),
    }


def bf16_check(config: Config, device: torch.device, steps: int, fill: int) -> dict[str, Any]:
    """fp32 vs bf16-autocast learn steps from the same start on the same batches (uniform sampling, so the
    batches cannot diverge with the priorities): per-step loss drift and the time per step.

    The naive agent (plain AdamW) runs alongside as an fp32 reference drift: how far two fp32
    implementations that differ only in rounding (fused vs for-loop AdamW) drift over the same steps."""
    agents = {
        name: rainbow.RainbowAgent(
            config, make_replay(replay_module, config, fill, 2, prioritized=False), device, 2
        )
        for name in ("fp32", "bf16")
    }
    naive = NaiveAgent(config, make_replay(replay_module, config, fill, 2, prioritized=False), device, 2)
    naive.online.load_state_dict(agents["fp32"].online.state_dict())
    naive.target.load_state_dict(agents["fp32"].target.state_dict())
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    losses: dict[str, list[float]] = {"fp32": [], "bf16": [], "naive": []}
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for i in range(steps):
        for name in ("fp32", "bf16", "naive"):
            torch.manual_seed(20_000 + i)
            common.synchronize(device)
            start = time.perf_counter()
            if name == "bf16":
                with autocast:
                    loss = agents[name].train()["loss"]
            elif name == "naive":
                loss = naive.train()["loss"]
            else:
                loss = agents[name].train()["loss"]
            common.synchronize(device)
            if name in times:
                times[name].append(time.perf_counter() - start)
            losses[name].append(float(loss))
    return {
        "steps": steps,
        "bf16_rel_loss_drift": relative_drift(losses["bf16"], losses["fp32"]),
        "fp32_reference_drift": relative_drift(losses["naive"], losses["fp32"]),
        "fp32_step_ms": float(np.median(times["fp32"]) * 1e3),
        "bf16_step_ms": float(np.median(times["bf16"]) * 1e3),
        "bf16_speed_ratio": float(np.median(times["bf16"]) / np.median(times["fp32"])),
    }


# --- torch.compile ---------------------------------------------------------------------------------
def compile_check(
    config: Config, device: torch.device, steps: int, fill: int, mode: str | None = None
) -> dict[str, Any]:
    """Eager vs torch.compile'd online and target networks (inductor, static shapes; `mode` is
    torch.compile's, e.g. "reduce-overhead" for CUDA graphs), from the same start on the same batches
    (uniform sampling), interleaved step by step: time per learn step and per action after compilation,
    the compile time, and the loss difference (compiled kernels round differently)."""
    agents = {
        name: rainbow.RainbowAgent(
            config, make_replay(replay_module, config, fill, 3, prioritized=False), device, 3
        )
        for name in ("eager", "compiled")
    }
    compiled = agents["compiled"]
    for network in (compiled.online, compiled.target):
        network.forward = torch.compile(network.forward, dynamic=False, mode=mode)
    frames = np.random.default_rng(3).integers(0, 256, (config.conv_input, 64, 64), dtype=np.uint8)
    car = np.array([120.0, 3.0, 6000.0], np.float32)
    compile_s = 0.0
    for name, agent in agents.items():  # both alike, so that their replays draw the same batches after
        start = time.perf_counter()
        for _ in range(3):  # the train-mode, eval-mode and target graphs, and their backward
            torch.manual_seed(30_000)
            agent.train()
            agent.greedy_action(frames, car)
        if name == "compiled":
            compile_s = time.perf_counter() - start
    agents["eager"].load_state_dict(compiled.state_dict())
    losses: dict[str, list[float]] = {"eager": [], "compiled": []}
    learn_s: dict[str, list[float]] = {"eager": [], "compiled": []}
    act_s: dict[str, list[float]] = {"eager": [], "compiled": []}
    for i in range(steps):
        for name in random.sample(list(agents), len(agents)):
            agent = agents[name]
            torch.manual_seed(30_001 + i)
            common.synchronize(device)
            begin = time.perf_counter()
            losses[name].append(float(agent.train()["loss"]))
            common.synchronize(device)
            learn_s[name].append(time.perf_counter() - begin)
            begin = time.perf_counter()
            agent.greedy_action(frames, car)
            act_s[name].append(time.perf_counter() - begin)
    return {
        "steps": steps,
        "compile_s": compile_s,
        "rel_loss_diff": relative_drift(losses["compiled"], losses["eager"]),
        **{f"{name}_learn_ms": float(np.median(learn_s[name]) * 1e3) for name in agents},
        **{f"{name}_act_ms": float(np.median(act_s[name]) * 1e3) for name in agents},
        "learn_ratio": float(np.median(learn_s["compiled"]) / np.median(learn_s["eager"])),
        "act_ratio": float(np.median(act_s["compiled"]) / np.median(act_s["eager"])),
    }


# --- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    common.set_threads(args.threads)
    torch.manual_seed(args.seed)
    config = Config()
    baseline = load_revision(args.baseline_rev) if args.baseline_rev else None
    load = common.wait_for_quiet(args.max_load, args.wait)
    info = common.machine_info(device)
    common.print_machine(info)
    results: dict[str, Any] = {"machine": info, "config": "pinned (tm_config.Config())", "args": vars(args)}

    equivalence = check_equivalence(config, device, baseline, args.check_steps, fill=2000)
    common.print_table(
        f"Loss vs rainbow from the same weights, batches and seed ({args.check_steps} learn steps)",
        equivalence,
        [
            ("subject", "subject", ""),
            ("step0_rel_diff", "step-0 rel diff", ".1e"),
            ("max_rel_diff", "max rel diff", ".1e"),
        ],
    )
    results["equivalence"] = equivalence

    subjects = build_subjects(config, device, args, baseline)
    baseline_name = "naive" if not args.no_naive else subjects[0].name
    timing_columns = [
        ("subject", "subject", ""),
        ("median_ms", "median ms", ".3f"),
        ("p99_ms", "p99 ms", ".3f"),
        ("min_ms", "min ms", ".3f"),
        ("n", "n", "d"),
        ("ratio", f"x {baseline_name}", ".3f"),
    ]

    act = bench_act(subjects, device, args.act_rounds, args.act_inner)
    rows = rows_with_ratio(
        act, baseline_name, lambda s: {"goal_met": bool(np.percentile(s, 99) * 1e3 <= ACT_GOAL_P99_MS)}
    )
    common.print_table(
        f"1a. One greedy action (n_tau_action={config.n_tau_action}, noise on, eval BatchNorm) — "
        f"goal p99 <= {ACT_GOAL_P99_MS} ms",
        rows,
        [*timing_columns, ("goal_met", "goal met", "")],
    )
    results["act"] = rows

    step_s = config.time_step_duration

    def overruns(s: np.ndarray) -> dict[str, Any]:
        return {
            "overrun_fraction": float((s > step_s).mean()),
            "goal_met": bool(np.percentile(s, 99) * 1e3 <= ACT_LEARN_GOAL_P99_MS),
        }

    loop = bench_act_learn(subjects, device, args.learn_reps, args.seed)
    rows = rows_with_ratio(
        {name: parts["act + learn"] for name, parts in loop.items()}, baseline_name, overruns
    )
    common.print_table(
        f"1b. Act + one learn step (batch {config.batch_size}) — goal p99 <= {ACT_LEARN_GOAL_P99_MS} ms; "
        f"overrun = iteration > {step_s * 1e3:.0f} ms",
        rows,
        [*timing_columns, ("overrun_fraction", "overruns", ".1%"), ("goal_met", "goal met", "")],
    )
    results["act_learn"] = rows

    rows = rows_with_ratio(
        {name: parts["act"] for name, parts in loop.items()},
        baseline_name,
        lambda s: {"goal_met": bool(np.percentile(s, 99) * 1e3 <= ACT_GOAL_P99_MS)},
    )
    common.print_table(
        "1c. The action of those iterations (right after a learn step, cold caches, as in training)",
        rows,
        [*timing_columns, ("goal_met", "goal met", "")],
    )
    results["act_after_learn"] = rows

    learn = {name: parts["learn"] for name, parts in loop.items()}
    rows = rows_with_ratio(
        learn,
        baseline_name,
        lambda s: {
            "steps_per_s": 1.0 / float(np.median(s)),
            "goal_met": bool(1.0 / np.median(s) >= LEARN_GOAL_STEPS_PER_S),
        },
    )
    common.print_table(
        f"2. Learn steps (batch {config.batch_size}) — goal >= {LEARN_GOAL_STEPS_PER_S:.0f} steps/s",
        rows,
        [*timing_columns, ("steps_per_s", "steps/s", ".1f"), ("goal_met", "goal met", "")],
    )
    results["learn"] = rows

    if args.thread_sweep and device.type == "cpu":
        counts = [int(x) for x in args.thread_sweep.split(",")]
        rows = thread_sweep(subjects[0], device, counts, max(20, args.learn_reps // 5), args.act_inner)
        common.print_table(
            f"Thread sweep (rainbow; ratios vs {counts[0]} thread(s))",
            rows,
            [
                ("threads", "threads", "d"),
                ("act_median_ms", "act median", ".3f"),
                ("act_p99_ms", "act p99", ".3f"),
                ("act_ratio", "act x", ".3f"),
                ("act_learn_median_ms", "act+learn median", ".2f"),
                ("act_learn_p99_ms", "act+learn p99", ".2f"),
                ("act_learn_ratio", "act+learn x", ".3f"),
            ],
        )
        results["thread_sweep"] = rows

    if args.profile:
        profiled = profile_learn(subjects[0].agent, device, args.profile_steps)
        common.print_table(
            "Where a rainbow learn step goes (wall time per section, median over steps)",
            profiled["sections"],
            [("section", "section", ""), ("median_ms", "ms", ".3f"), ("share", "share", ".1%")],
        )
        common.print_table(
            f"torch.profiler op groups (self CPU time; {profiled['ops_per_step']:.0f} ops per learn step)",
            profiled["op_groups"],
            [("group", "group", ""), ("self_cpu_ms_per_step", "ms/step", ".3f"), ("share", "share", ".1%")],
        )
        common.print_table(
            "Top ops by self CPU time",
            profiled["top_ops"][:12],
            [
                ("op", "op", ""),
                ("calls_per_step", "calls/step", ".1f"),
                ("self_cpu_ms_per_step", "ms/step", ".3f"),
                ("share", "share", ".1%"),
            ],
        )
        results["profile"] = profiled

    if args.bf16_steps > 0:
        bf16 = bf16_check(config, device, args.bf16_steps, fill=2000)
        drift, reference = bf16["bf16_rel_loss_drift"], bf16["fp32_reference_drift"]
        print(
            f"\nbf16 autocast over {bf16['steps']} learn steps from the same start (same batches): "
            f"relative loss drift vs fp32 median {drift['median']:.2e}, p95 {drift['p95']:.2e}, "
            f"max {drift['max']:.2e} (fp32 reference drift, fused vs plain AdamW: median "
            f"{reference['median']:.2e}, max {reference['max']:.2e}); step {bf16['bf16_step_ms']:.2f} ms "
            f"vs fp32 {bf16['fp32_step_ms']:.2f} ms (x{bf16['bf16_speed_ratio']:.3f})"
        )
        results["bf16"] = bf16

    if args.compile_steps > 0:
        check = compile_check(config, device, args.compile_steps, fill=2000)
        print(
            f"\ntorch.compile over {check['steps']} learn steps (compiled in {check['compile_s']:.0f} s): "
            f"learn {check['compiled_learn_ms']:.2f} ms vs eager {check['eager_learn_ms']:.2f} ms "
            f"(x{check['learn_ratio']:.3f}); act {check['compiled_act_ms']:.3f} ms vs eager "
            f"{check['eager_act_ms']:.3f} ms (x{check['act_ratio']:.3f}); relative loss difference median "
            f"{check['rel_loss_diff']['median']:.1e}, max {check['rel_loss_diff']['max']:.1e}"
        )
        results["compile"] = check

    common.finish(results, load, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
