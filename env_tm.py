"""rainbow-tm: train the Rainbow-IQN agent on TrackMania 2020 (through tmrl) or on the embedded track.

    python env_tm.py                          # TrackMania if the game answers, else the embedded track
    python env_tm.py --env embedded --steps 200000 --run-name try1
    python env_tm.py --set batch_size=64      # a departure from the known-good config, recorded as such
    python env_tm.py --help

The loop, as pinned by the known-good run (seed 004): one environment step, then one learn step once a
batch is stored; the target net is a hard copy of the online net every 1500 learn steps; epsilon is a
function of the global step, which (like the episode count) carries across resumes.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from checkpoints import CheckpointError, CheckpointStore, LoadedCheckpoint
from health import DIAG_MIN_LEARN_STEPS, FATAL_FLAGS, HealthMonitor, RedFlag, diagnose, format_table, verdict
from rainbow import ACTION_VECTORS, RainbowAgent, epsilon_at, resolve_device
from replay import PrioritizedReplay
from run_log import METRICS_FILE, RunLog, read_jsonl, truncate_after_step
from tm_config import Config, ConfigError, check_sacred_assignments, describe_departures, unpinned_keys
from trackmania import (  # imports tmrl lazily (Windows-only): importing this module costs nothing
    GameNotRespondingError,
    TrackManiaSetupError,
    check_tmrl_available,
    make_trackmania_env,
)

# Config keys that fix the shapes of the networks and the replay memory: a checkpoint made with other
# values cannot be loaded into this run.
SHAPE_KEYS = (
    "img_x", "img_y", "conv_input", "input_car_dim", "car_feature_hidden_dim", "conv_hidden_image_variable",
    "hidden_dim", "conv_channels_1", "conv_channels_2", "cosine_dim", "use_dueling", "max_buffer_size",
)  # fmt: skip
EXIT_OK, EXIT_ERROR, EXIT_GAME, EXIT_RED_FLAG, EXIT_NO_GO, EXIT_INTERRUPTED = 0, 1, 3, 4, 5, 130
MAX_FAILED_SAVES = 3  # checkpoint writes in a row that may fail (disk full, file locked) before stopping
MAX_ROLLBACKS = 3  # --on-red-flag rollback: then the run stops, as a failure that keeps coming back is real
DIAGNOSE_DEFAULT_STEPS = 5_000
# Evaluation tracks: seeds no training episode draws (training seeds are seed * 1_000_003 + episode, below
# this for --seed < 3,999), the same list for every evaluation so the points of a curve are comparable.
EVAL_SEED_BASE = 4_000_000_000


class ObservationError(ValueError):
    """An observation that does not have the TM20FULL layout; one line naming the problem."""


class RedFlagStopError(RuntimeError):
    """A fatal red flag under --on-red-flag stop (or rollback with nothing left to roll back to)."""


class TrainingStoppedError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite learn steps); one line saying why."""


# --- command line ----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train the Rainbow-IQN agent on TrackMania 2020 (tmrl) or on the embedded track.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--env",
        choices=["auto", "trackmania", "embedded"],
        default="auto",
        help="auto: TrackMania when tmrl is installed and the game answers, else the embedded track",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="train until this global step (default: config)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: all cores but one on TrackMania, which needs a core for the "
        "game; torch's default on the embedded track)",
    )
    parser.add_argument(
        "--run-name", default=None, help="checkpoints/<run-name>/ (default: <env>-seed<seed>)"
    )
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume", dest="resume", action="store_true", default=None, help="resume if possible"
    )
    resume.add_argument("--fresh", dest="resume", action="store_false", help="ignore existing checkpoints")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (repeatable); logged as a departure from the known-good config",
    )
    unpin = parser.add_argument_group(
        "unpinning (the three sacred invariants of the known-good run; README: The known-good config)"
    )
    unpin.add_argument(
        "--unpin-target-update",
        action="store_true",
        help="allow --set target_network_update_frequency=...; the run is marked unpinned",
    )
    unpin.add_argument(
        "--unpin-learning-rate", action="store_true", help="allow --set learning_rate=...; marked unpinned"
    )
    unpin.add_argument(
        "--unpin-epsilon",
        action="store_true",
        help="allow --set of epsilon_start, epsilon_end, epsilon_decay_to, epsilon_cutoff; marked unpinned",
    )
    parser.add_argument("--no-wandb", action="store_true", help="log to the local JSONL file only")
    parser.add_argument(
        "--on-red-flag",
        choices=["warn", "stop", "rollback"],
        default="warn",
        help="on a fatal red flag (diverging Q, NaN, dead gradients, frozen game): report it, stop the run, "
        "or restore the last checkpoint taken before it and continue",
    )
    parser.add_argument(
        "--diagnose",
        type=int,
        nargs="?",
        const=DIAGNOSE_DEFAULT_STEPS,
        default=None,
        metavar="N",
        help=f"go/no-go: train N steps from scratch (default {DIAGNOSE_DEFAULT_STEPS:,}), print a table of "
        "health criteria and exit non-zero on a no-go",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=0,
        metavar="STEPS",
        help="every STEPS global steps (at the next episode end, and at step 0 and the end of the run), "
        "drive --eval-episodes episodes greedily (no epsilon, no noise, nothing stored or learned) on "
        "held-out tracks and log their returns; 0: never",
    )
    parser.add_argument("--eval-episodes", type=int, default=5, help="episodes per evaluation")
    parser.add_argument(
        "--learner",
        choices=["beside", "inline"],
        default="inline",
        help="beside: learn in a process beside the actor, so the game never waits for a learn step; "
        "inline: act and learn in turn in one process (exact reproduction of a recorded run)",
    )
    parser.add_argument("--wandb-project", default=None, help="W&B project (default: config wandb_project)")
    scale = parser.add_argument_group(
        "scale out (several game PCs, one learner; see README: Running across machines)"
    )
    scale.add_argument(
        "--role",
        choices=["single", "server", "trainer", "worker"],
        default="single",
        help="single: everything in this process; server: tmrl's relay; trainer: learns from the workers' "
        "episodes; worker: drives one game (--env) and sends its episodes",
    )
    scale.add_argument(
        "--server-ip", default="127.0.0.1", help="address of the machine running --role server"
    )
    scale.add_argument(
        "--port", type=int, default=55555, help="the relay's TCP port (open it in the firewall)"
    )
    scale.add_argument(
        "--password-file",
        default=None,
        help="the relay password (default ~/.rainbow-tm/relay-password.txt; the server creates it on its "
        "first run, copy it to the other machines)",
    )
    scale.add_argument("--tls", action="store_true", help="encrypt the relay's traffic with TLS")
    scale.add_argument(
        "--tls-dir",
        default=None,
        help="folder with certificate.pem (and key.pem on the server); default: tlspyo's credentials folder",
    )
    scale.add_argument("--tls-hostname", default="default", help="the name in the TLS certificate")
    scale.add_argument(
        "--make-tls-credentials",
        action="store_true",
        help="write key.pem and a self-signed certificate.pem for --tls-hostname into --tls-dir, then exit",
    )
    scale.add_argument("--max-workers", type=int, default=None, help="server: refuse workers beyond this")
    scale.add_argument("--worker-name", default=None, help="worker: its name in logs (default host-pid)")
    parser.add_argument("--checkpoint-root", default=None, help="folder of run folders (default: config)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be a TCP port (1-65535), got {args.port}")
    if args.role != "single" and args.diagnose is not None:
        parser.error("--diagnose runs on a single PC (--role single)")
    if args.eval_every < 0:
        parser.error(f"--eval-every must be >= 0 (0: no evaluation), got {args.eval_every}")
    if args.eval_episodes < 1:
        parser.error(f"--eval-episodes must be >= 1, got {args.eval_episodes}")
    return args


# --- environments ----------------------------------------------------------------------------------
def choose_environment(choice: str, config: Config) -> str:
    """`trackmania` or `embedded`. `auto` falls back to the embedded track and says why in one line."""
    if choice == "embedded":
        return "embedded"
    reason = check_tmrl_available(config)
    if reason is None:
        return "trackmania"
    if choice == "trackmania":
        raise TrackManiaSetupError(f"--env trackmania: {reason}")
    print(f"TrackMania not used: {reason}. Training on the embedded track instead.", flush=True)
    return "embedded"


def build_environment(name: str, config: Config, seed: int) -> Any:
    if name == "trackmania":
        return make_trackmania_env(config)
    from embedded_track import make_embedded_track  # imports gymnasium's Box2D only when used

    return make_embedded_track(config, seed=seed)


def split_observation(obs: Any, config: Config) -> tuple[np.ndarray, np.ndarray]:
    """TM20FULL tuple (speed, gear, rpm, images, act1, act2) -> (frames uint8 (4,64,64), car float32 (3,)).
    The agent uses speed, gear, rpm and the images; the action history is not an input (as pinned)."""
    if not isinstance(obs, (tuple, list)) or len(obs) != 6:
        kind = f"{type(obs).__name__} of length {len(obs)}" if hasattr(obs, "__len__") else type(obs).__name__
        raise ObservationError(f"observation must be the 6-part TM20FULL tuple, got a {kind}")
    speed, gear, rpm, images = obs[0], obs[1], obs[2], obs[3]
    frames = np.asarray(images)
    expected = (config.conv_input, config.img_y, config.img_x)
    if frames.shape != expected:
        raise ObservationError(f"observation images have shape {frames.shape}, expected {expected}")
    if frames.dtype != np.uint8:  # a float image in [0, 1] would silently turn black if converted
        raise ObservationError(f"observation images are {frames.dtype}, expected uint8 grayscale (0-255)")
    car = np.array([np.ravel(speed)[0], np.ravel(gear)[0], np.ravel(rpm)[0]], dtype=np.float32)
    if not np.isfinite(car).all():
        raise ObservationError(f"observation speed/gear/rpm are not finite: {car.tolist()}")
    return frames, car


def checked_reward(reward: Any, step: int) -> float:
    value = float(reward)
    if not math.isfinite(value):
        # Stored, it would be drawn at max priority forever and poison every batch it lands in.
        raise ObservationError(f"the environment returned a non-finite reward ({value}) at step {step:,}")
    return value


# --- progress on the terminal ----------------------------------------------------------------------
class Progress:
    """A live status line: rewritten in place on a terminal, one line every 30 s otherwise."""

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.interactive = sys.stdout.isatty()
        self.interval = 1.0 if self.interactive else 30.0
        self.last_print = 0.0
        self.restart_rate(0)

    def restart_rate(self, step: int) -> None:
        """Measure steps/s from here (after a resume or a rollback the step count jumps)."""
        self.window_start = (time.perf_counter(), step)
        self.steps_per_second = 0.0

    def rate(self, step: int) -> float:
        now = time.perf_counter()
        start_time, start_step = self.window_start
        if now - start_time >= 2.0:
            self.steps_per_second = (step - start_step) / (now - start_time)
            self.window_start = (now, step)
        return self.steps_per_second

    def show(self, step: int, text: str, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last_print < self.interval:
            return
        self.last_print = now
        line = f"step {step:,}/{self.total_steps:,} ({100 * step / self.total_steps:.1f}%) | {text}"
        if self.interactive:
            print("\r" + line[:150].ljust(150), end="", flush=True)
        else:
            print(line, flush=True)

    def message(self, text: str) -> None:
        """A permanent line (an event), not overwritten by the status line."""
        print(("\n" if self.interactive else "") + text, flush=True)


# --- evaluation ----------------------------------------------------------------------------------
@dataclass
class Evaluation:
    returns: list[float]
    lengths: list[int]
    seconds: float

    def record(self) -> dict[str, float]:
        returns = np.asarray(self.returns)
        return {
            "return_mean": float(returns.mean()),
            "return_std": float(returns.std()),
            "return_min": float(returns.min()),
            "return_max": float(returns.max()),
            "length_mean": float(np.mean(self.lengths)),
            "episodes": len(self.returns),
            "seconds": self.seconds,
        }


def evaluation_seeds(episodes: int) -> list[int]:
    return [EVAL_SEED_BASE + k for k in range(episodes)]


def drive_episodes(
    env: Any, config: Config, seeds: list[int], policy: Callable[[np.ndarray, np.ndarray], int]
) -> Evaluation:
    """One episode per track seed, actions from `policy(frames, car)`; nothing is stored or learned."""
    start = time.perf_counter()
    returns, lengths = [], []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        total, length, over = 0.0, 0, False
        while not over:
            frames, car = split_observation(obs, config)
            obs, reward, terminated, truncated, _ = env.step(ACTION_VECTORS[policy(frames, car)].copy())
            total += checked_reward(reward, length)
            length += 1
            over = bool(terminated or truncated)
        returns.append(total)
        lengths.append(length)
    return Evaluation(returns, lengths, time.perf_counter() - start)


def evaluate(agent: RainbowAgent, env: Any, config: Config, episodes: int) -> Evaluation:
    """The greedy policy (no epsilon, noise off: the mean weights) on the held-out tracks. The agent's
    epsilon stream is untouched, so training goes on as it would have."""
    agent.online.set_noise(False)
    try:
        return drive_episodes(env, config, evaluation_seeds(episodes), agent.greedy_action)
    finally:
        agent.online.set_noise(True)


# --- run state and checkpoints -------------------------------------------------------------------
@dataclass
class RunState:
    step: int = 0  # global environment steps, across resumes
    episode: int = 0  # completed episodes, across resumes
    best_interval_reward: float = -math.inf
    interval_rewards: list[float] = field(default_factory=list)
    wandb_run_id: str | None = None
    last_eval_step: int | None = None  # None: never evaluated


def collect_state(agent: RainbowAgent, replay: PrioritizedReplay, run: RunState, config: Config) -> dict:
    return {
        "config": config.to_dict(),
        "departures": config.departures(),
        "unpinned": unpinned_keys(config),
        "step": run.step,
        "episode": run.episode,
        # epsilon and beta are restored from the step and the replay memory; kept here for people reading
        # a checkpoint (and the original's checkpoints carried them).
        "epsilon": epsilon_at(run.step, config),
        "beta": replay.beta,
        "best_interval_reward": run.best_interval_reward,
        "wandb_run_id": run.wandb_run_id,
        "last_eval_step": run.last_eval_step,
        "agent": agent.state_dict(),
        "replay": replay.state_dict(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
    }


def resume_config(state: dict, overrides: list[str], path: Path) -> Config:
    """A resumed run keeps its checkpoint's config; only explicit --set values change it, and never a
    value that fixes the shape of the networks or the replay memory."""
    try:
        saved = Config.from_dict(state["config"])
    except (ConfigError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {path} has an unusable config: {error}") from None
    config = saved.with_assignments(overrides)
    mismatched = [k for k in SHAPE_KEYS if getattr(saved, k) != getattr(config, k)]
    if mismatched:
        details = ", ".join(f"{k}={getattr(saved, k)!r} (run: {getattr(config, k)!r})" for k in mismatched)
        raise CheckpointError(f"checkpoint {path} was made with an incompatible config: {details}")
    return config


def restore(state: dict, agent: RainbowAgent, replay: PrioritizedReplay, path: Path) -> RunState:
    """Load a checkpoint into `agent` and `replay`; anything that does not fit is a CheckpointError."""
    try:
        agent.load_state_dict(state["agent"])
        replay.load_state_dict(state["replay"])
        replay.check_consistency()
        for group in agent.optimizer.param_groups:  # the optimizer state carries the lr it was saved with
            group["lr"] = agent.config.learning_rate
        run = RunState(
            step=int(state["step"]),
            episode=int(state["episode"]),
            best_interval_reward=float(state["best_interval_reward"]),
            wandb_run_id=state.get("wandb_run_id"),
            last_eval_step=state.get("last_eval_step"),
        )
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path} cannot be restored: {first_line}") from None
    return run


@dataclass
class Learner:
    config: Config
    agent: RainbowAgent
    replay: PrioritizedReplay
    run: RunState


def stream_seeds(seed: int) -> tuple[int, int]:
    """Independent seeds for the agent and the replay memory (the same int would give equal streams)."""
    agent_seed, replay_seed = np.random.SeedSequence(seed).generate_state(2)
    return int(agent_seed), int(replay_seed)


def new_learner(config: Config, seed: int, device: torch.device) -> Learner:
    agent_seed, replay_seed = stream_seeds(seed)
    replay = PrioritizedReplay.from_config(config, seed=replay_seed)
    return Learner(config, RainbowAgent(config, replay, device=device, seed=agent_seed), replay, RunState())


def resume_learner(
    store: CheckpointStore, overrides: list[str], seed: int, device: torch.device
) -> LoadedCheckpoint | None:
    """The newest checkpoint that loads and restores; its `value` is the restored Learner."""

    def build(state: dict, path: Path) -> Learner:
        learner = new_learner(resume_config(state, overrides, path), seed, device)
        learner.run = restore(state, learner.agent, learner.replay, path)
        return learner

    return store.load_newest_good(build)


def move_aside(run_dir: Path) -> Path | None:
    """--fresh never mixes a new run into an old run's folder: the old one is renamed, not deleted."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    target = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    suffix = 1
    while target.exists():
        target = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}")
        suffix += 1
    run_dir.rename(target)
    return target


def weights_finite(agent: RainbowAgent) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in agent.online.parameters())


def fmt(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


class StopRequest:
    """Ctrl+C (or a termination request: `kill`, a shutdown, Ctrl+Break on Windows) asks the loop to stop
    at the end of the current step, never in the middle of a replay or optimizer update, which a
    checkpoint would then capture half-done. A second request aborts at once."""

    SIGNALS = tuple(
        getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGBREAK") if hasattr(signal, name)
    )

    def __init__(
        self, notice: str = "stopping after this step (Ctrl+C again to abort without saving)"
    ) -> None:
        self.requested = False
        self.notice = notice
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\n" + self.notice, flush=True)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)

    def uninstall(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()


# --- training --------------------------------------------------------------------------------------
class StepLatency:
    """How long the game waits for the agent at each step: the share of the 50 ms time step the agent uses.

    On TrackMania a step slower than the time step is a time-step overrun: the car drives on the previous
    action meanwhile. The single-PC loop counts acting, storing and learning (everything between two
    `env.step` calls); a distributed worker counts acting only, as it learns elsewhere.
    """

    def __init__(self, time_step: float, window: int = 100_000) -> None:
        self.time_step = time_step
        self.recent: collections.deque[float] = collections.deque(maxlen=window)
        self.episode: list[float] = []
        self.calls = 0
        self.overruns = 0  # steps slower than the whole time step
        self.slowest = 0.0

    def add(self, seconds: float) -> None:
        self.recent.append(seconds)
        self.episode.append(seconds)
        self.calls += 1
        self.overruns += seconds > self.time_step
        self.slowest = max(self.slowest, seconds)

    def take_episode(self) -> dict[str, Any]:
        """The episode's figures for its JSONL record; starts the next episode's."""
        if not self.episode:
            return {}
        seconds, self.episode = np.asarray(self.episode), []
        median, p99 = np.percentile(seconds * 1000, [50, 99])
        return {
            "agent_ms_median": round(float(median), 3),
            "agent_ms_p99": round(float(p99), 3),
            "agent_ms_max": round(float(seconds.max() * 1000), 3),
            "time_step_overruns": int((seconds > self.time_step).sum()),
        }

    def summary(self) -> str:
        if not self.calls:
            return "no steps yet"
        median, p99 = np.percentile(np.asarray(self.recent) * 1000, [50, 99])
        window = "" if self.calls == len(self.recent) else f" (percentiles of the last {len(self.recent):,})"
        return (
            f"agent time per step median {median:.2f} ms, p99 {p99:.2f} ms, max {self.slowest * 1000:.1f} ms "
            f"over {self.calls:,} steps{window}; "
            f"{self.overruns:,} over the {self.time_step * 1000:.0f} ms time step"
        )


@dataclass
class TrainResult:
    exit_code: int
    run_dir: Path
    config: Config


class Session:
    """Everything a training run holds besides its environment: the learner (agent, replay, run state),
    checkpoints, the metrics log, the health monitor and the status line. The single-PC loop (`train`)
    and the scale-out trainer (`distributed.py`) each drive one, so both checkpoint, log and raise red
    flags the same way."""

    def __init__(self, args: argparse.Namespace, env_name: str) -> None:
        self.args = args
        requested = Config().with_assignments(args.overrides)
        self.device = resolve_device(args.device)
        # bench/BENCHMARKS.md: with a busy core (the game), 2 threads on 2 cores made act+learn 1.7x slower.
        threads = args.threads or (max(1, (os.cpu_count() or 2) - 1) if env_name == "trackmania" else None)
        if threads is not None and self.device.type == "cpu":
            torch.set_num_threads(threads)
        diagnosing = getattr(args, "diagnose", None) is not None
        self.run_name = args.run_name or f"{env_name}{'-diagnose' if diagnosing else ''}-seed{args.seed}"
        self.run_dir = Path(args.checkpoint_root or requested.checkpoint_dir) / self.run_name
        self.store = CheckpointStore(self.run_dir, requested.keep_last_n_checkpoints)
        random.seed(args.seed)
        np.random.seed(args.seed % 2**32)
        torch.manual_seed(args.seed)

        # Resume (the checkpoint's config, plus explicit --set changes) or start fresh.
        resume = requested.resume_from_checkpoint if args.resume is None else args.resume
        resume = resume and requested.checkpoint and not diagnosing  # a diagnosis judges a fresh start
        notes: list[str] = []
        learner = None
        if resume:
            self.store.remove_temporaries()
            loaded = resume_learner(self.store, args.overrides, args.seed, self.device)
            if loaded is not None:
                learner, path = loaded.value, loaded.path
                notes += [f"skipped: {line}" for line in loaded.skipped]
                if loaded.skipped:
                    notes.append(f"falling back to the newest good checkpoint: {path.name}")
                dropped = truncate_after_step(self.run_dir / METRICS_FILE, learner.run.step)
                notes.append(
                    f"resumed {self.run_name} from {path.name}: step {learner.run.step:,}, "
                    f"episode {learner.run.episode:,}"
                    + (f" ({dropped} log records after that step dropped)" if dropped else "")
                )
            elif args.resume:
                raise CheckpointError(
                    f"--resume: no checkpoint in {self.run_dir} (drop --resume to start fresh)"
                )
            else:
                notes.append(f"no checkpoint in {self.run_dir}: starting fresh")
        else:
            moved = move_aside(self.run_dir)
            if moved is not None:
                notes.append(f"--fresh: the previous contents of {self.run_dir} were moved to {moved}")
        if learner is None:
            learner = new_learner(requested, args.seed, self.device)
        self.config, self.agent, self.replay = learner.config, learner.agent, learner.replay
        self.run = learner.run
        config = self.config
        self.total_steps = args.steps if args.steps is not None else config.training_steps
        shortest_diagnosis = DIAG_MIN_LEARN_STEPS + config.batch_size
        if diagnosing and self.total_steps < shortest_diagnosis:
            raise ConfigError(
                f"--diagnose {self.total_steps} is too short: the go/no-go criteria need at least "
                f"{shortest_diagnosis:,} steps ({DIAG_MIN_LEARN_STEPS:,} learn steps)"
            )
        if config.checkpoint:
            # Two checkpoints may briefly coexist with the files kept: ask for room for the rotation first.
            needed = (config.keep_last_n_checkpoints + 2) * (self.replay.nbytes + 50 * 2**20)
            self.store.check_writable(needed_bytes=needed)
        self.log = RunLog(self.run_dir)
        self.progress = Progress(self.total_steps)
        self.progress.restart_rate(self.run.step)
        unpinned = unpinned_keys(config)
        if not args.no_wandb:
            project = args.wandb_project or config.wandb_project
            self.run.wandb_run_id = self.log.start_wandb(
                project, self.run_name, self.run.wandb_run_id, config.to_dict(), config.departures(), unpinned
            )
        for note in notes:
            self.progress.message(note)
        self.progress.message(
            f"run {self.run_name} on {env_name}, device {self.device.type} ({torch.get_num_threads()} CPU "
            f"threads); checkpoints in {self.run_dir}"
        )
        departures = describe_departures(config)
        self.progress.message(
            "departures from the known-good config: " + ("; ".join(departures) if departures else "none")
        )
        if unpinned:
            self.progress.message(
                f"UNPINNED run: it departs from the sacred {', '.join(unpinned)} of the known-good config "
                "(allowed by --unpin-*); it is marked unpinned in its metrics, W&B and checkpoints"
            )
        self.progress.message(self.log.wandb_note)
        self.log.write(
            "run", self.run.step, event="start", env=env_name, device=self.device.type,
            departures=config.departures(), unpinned=unpinned,
        )  # fmt: skip
        self.monitor = self.new_monitor()
        self.failed_saves = 0
        self.rollbacks = 0
        self.last_metrics: dict[str, float] = {}

    def new_monitor(self) -> HealthMonitor:
        monitor = HealthMonitor(self.config)
        if len(self.replay):  # a resumed or rolled-back run already knows its reward range
            monitor.observe_reward(float(np.nanmax(self.replay.rewards)))
            monitor.observe_reward(float(np.nanmin(self.replay.rewards)))
        return monitor

    def save(self, is_periodic: bool) -> str:
        """Write a checkpoint; a failed write is reported and training goes on (3 in a row stop it)."""
        config, run, store = self.config, self.run, self.store
        if not config.checkpoint:
            return "checkpoints are off (checkpoint=False)"
        state = collect_state(self.agent, self.replay, run, config)
        try:
            if is_periodic:
                interval_mean = float(np.mean(run.interval_rewards)) if run.interval_rewards else -math.inf
                is_best = interval_mean > run.best_interval_reward
                if is_best:
                    state["best_interval_reward"] = interval_mean
                store.save(state, run.episode, run.step, is_best)
                if is_best:
                    run.best_interval_reward = interval_mean
                run.interval_rewards.clear()
            else:
                store.save_latest_only(state)
        except OSError as error:
            self.failed_saves += 1
            reason = error.strerror or str(error)
            message = f"checkpoint at step {run.step:,} failed ({reason}); the previous one is intact"
            self.progress.message(message)
            self.log.write("event", run.step, level="warning", name="checkpoint_failed", message=message)
            if self.failed_saves >= MAX_FAILED_SAVES:
                raise TrainingStoppedError(
                    f"{self.failed_saves} checkpoints in a row could not be written to {self.run_dir} "
                    f"({error.strerror or error}): free disk space, then resume"
                ) from None
            return f"checkpoint failed, the last good one is {store.latest_path}"
        self.failed_saves = 0
        return f"saved {store.latest_path}"

    def roll_back(self, flag: RedFlag) -> None:
        """Restore the checkpoint before the flag (an older one at each further rollback)."""
        if self.rollbacks >= MAX_ROLLBACKS:
            raise RedFlagStopError(
                f"stopped on red flag {flag.name} at step {flag.step:,} ({MAX_ROLLBACKS} rollbacks already): "
                f"{flag.message}"
            )
        older_first = (
            list(reversed(self.store.periodic()))[self.rollbacks :] if self.config.checkpoint else []
        )
        try:
            loaded = self.store.load_newest_good(
                lambda state, path: restore(state, self.agent, self.replay, path), older_first
            )
        except CheckpointError:  # none of them restores
            loaded = None
        if loaded is None:
            raise RedFlagStopError(
                f"stopped on red flag {flag.name} at step {flag.step:,} (no checkpoint to roll back to): "
                f"{flag.message}"
            )
        path, restored = loaded.path, loaded.value
        self.rollbacks += 1
        restored.wandb_run_id = self.run.wandb_run_id
        self.run = restored
        # The checkpoint carries its random streams: replaying them would replay the same failure.
        agent_seed, replay_seed = stream_seeds(self.args.seed + 7919 * self.rollbacks)
        self.agent.rng = np.random.default_rng(agent_seed)
        self.replay.reseed(replay_seed)
        torch.manual_seed(agent_seed)  # new noise and taus: restored, torch's stream would draw the same ones
        self.agent.online.reset_noise()
        self.agent.target.reset_noise()
        self.monitor = self.new_monitor()
        self.progress.restart_rate(self.run.step)
        self.log.truncate_after_step(self.run.step)
        self.log.write(
            "event", self.run.step, level="rollback", name=flag.name, from_step=flag.step,
            rollbacks=self.rollbacks,
        )  # fmt: skip
        self.progress.message(
            f"rolled back to {path.name} (step {self.run.step:,}, episode {self.run.episode:,}); "
            f"rollback {self.rollbacks} of at most {MAX_ROLLBACKS}"
        )

    def handle(self, flags: list[RedFlag]) -> bool:
        """Report red flags; returns True when the run was rolled back to a checkpoint."""
        rolled_back = False
        for flag in flags:
            self.progress.message(f"RED FLAG {flag.name}: {flag.message}")
            self.log.write("event", flag.step, **flag.as_event())
            self.log.alert(f"red flag: {flag.name}", flag.message)
            if rolled_back or flag.name not in FATAL_FLAGS or self.args.on_red_flag == "warn":
                continue
            if self.args.on_red_flag == "stop":
                raise RedFlagStopError(
                    f"stopped on red flag {flag.name} at step {flag.step:,} (--on-red-flag stop): "
                    f"{flag.message}; last good checkpoint: {self.store.latest_path}"
                )
            self.roll_back(flag)
            rolled_back = True
        return rolled_back

    def observe_transition(
        self, reward: float, next_frames: np.ndarray, next_car: np.ndarray
    ) -> list[RedFlag]:
        self.monitor.observe_reward(reward)
        return self.monitor.observe_frames(
            next_frames, self.run.step, self.run.episode, speed=float(next_car[0])
        )

    def learn(self, time_step_timeouts: int = 0) -> list[RedFlag]:
        """One learn step (once a batch is stored), logged every `log_every_steps`; returns red flags."""
        config, agent, run = self.config, self.agent, self.run
        if len(self.replay) < config.batch_size:
            return []
        metrics = self.last_metrics = agent.train()
        if metrics["skipped"]:
            self.log.write("event", run.step, level="warning", name="nonfinite_step_skipped")
        if agent.consecutive_skipped_steps >= config.max_consecutive_nonfinite_steps:
            raise TrainingStoppedError(
                f"{agent.consecutive_skipped_steps} learn steps in a row had a non-finite loss or "
                f"gradient (all skipped, weights untouched); last checkpoint: {self.store.latest_path}"
            )
        if agent.learn_steps % config.log_every_steps == 0:
            metrics["weights_finite"] = float(weights_finite(agent))
            self.log.write(
                "step",
                run.step,
                steps_per_second=self.progress.rate(run.step),
                time_step_timeouts=time_step_timeouts,
                max_abs_reward=self.monitor.max_abs_reward,
                min_reward=self.monitor.min_reward,
                **metrics,
            )
        flags = self.monitor.observe_learn_step(metrics, run.step, run.episode)
        metrics.pop("weights_finite", None)
        return flags

    def end_episode(
        self, reward: float, length: int, terminated: bool, seconds: float, **extra: Any
    ) -> list[RedFlag]:
        run = self.run
        run.episode += 1
        last_epsilon = self.agent.epsilon  # the one the episode's last action was chosen with, as used
        run.interval_rewards.append(reward)
        self.log.write(
            "episode",
            run.step,
            episode=run.episode,
            reward=reward,
            length=length,
            terminated=bool(terminated),
            epsilon=last_epsilon,
            beta=self.replay.beta,
            seconds=seconds,
            q_mean=self.last_metrics.get("q_mean"),
            q_greedy=self.last_metrics.get("q_greedy"),
            loss=self.last_metrics.get("loss"),
            **extra,
        )
        return self.monitor.observe_episode(
            reward, length, epsilon_at(run.step, self.config), run.step, run.episode
        )

    def checkpoint_due(self) -> bool:
        return self.run.episode % self.config.checkpoint_frequency == 0

    def status(self, text: str) -> None:
        last = self.last_metrics
        self.progress.show(
            self.run.step,
            f"{self.progress.rate(self.run.step):.1f} steps/s | {text} | "
            f"eps {epsilon_at(self.run.step, self.config):.3f} | loss {fmt(last.get('loss'))} | "
            f"Q {fmt(last.get('q_mean'))}",
        )

    def close(self) -> None:
        self.log.close()


def train(args: argparse.Namespace) -> TrainResult:
    env_name = choose_environment(args.env, Config().with_assignments(args.overrides))
    session = Session(args, env_name)
    config, agent, replay, progress, log = (
        session.config, session.agent, session.replay, session.progress, session.log
    )  # fmt: skip
    env = build_environment(env_name, config, args.seed)

    def env_seed() -> int:
        return args.seed * 1_000_003 + session.run.episode  # distinct tracks per (seed, episode) pair

    def evaluate_if_due() -> None:
        every, run = args.eval_every, session.run
        if not every or (run.last_eval_step is not None and run.step // every <= run.last_eval_step // every):
            return
        progress.message(f"evaluating at step {run.step:,}: {args.eval_episodes} greedy episodes")
        result = evaluate(agent, env, config, args.eval_episodes)
        run.last_eval_step = run.step
        record = result.record()
        log.write("eval", run.step, **record)
        progress.message(
            f"evaluation at step {run.step:,}: return {record['return_mean']:.1f} "
            f"+- {record['return_std']:.1f} (min {record['return_min']:.1f}, max {record['return_max']:.1f}) "
            f"over {len(result.returns)} held-out episodes, {result.seconds:.0f} s"
        )

    step_latency = StepLatency(config.time_step_duration)
    stop = StopRequest()
    stop.install()
    try:
        evaluate_if_due()
        episode_reward, episode_length, episode_start = 0.0, 0, time.perf_counter()
        obs, _ = env.reset(seed=env_seed())
        frames, car = split_observation(obs, config)
        replay.start_episode(frames, car)
        observed = time.perf_counter()  # the game waits for us from here until the next env.step
        while session.run.step < session.total_steps and not stop.requested:
            run = session.run
            action = agent.act(frames, car, run.step)
            step_latency.add(time.perf_counter() - observed)
            obs, reward, terminated, truncated, _ = env.step(ACTION_VECTORS[action].copy())
            observed = time.perf_counter()
            next_frames, next_car = split_observation(obs, config)
            reward = checked_reward(reward, run.step)
            replay.add(action, reward, bool(terminated), bool(truncated), next_frames[-1], next_car)
            run.step += 1
            episode_reward += reward
            episode_length += 1
            frames, car = next_frames, next_car
            timeouts = getattr(env, "time_step_timeouts", 0)  # TrackMania only: the PC missed 20 Hz
            flags = session.observe_transition(reward, next_frames, next_car)
            flags += session.learn(timeouts)
            session.status(
                f"ep {run.episode + 1} | R {episode_reward:.1f}"
                + (f" | timeouts {timeouts}" if timeouts else "")
            )
            episode_over = terminated or truncated
            if episode_over:
                flags += session.end_episode(
                    episode_reward, episode_length, bool(terminated), time.perf_counter() - episode_start,
                    **step_latency.take_episode(),
                )  # fmt: skip
            rolled_back = session.handle(flags) if flags else False
            if episode_over and not rolled_back and session.checkpoint_due():
                session.save(is_periodic=True)
            if episode_over or rolled_back:
                evaluate_if_due()
                episode_reward, episode_length, episode_start = 0.0, 0, time.perf_counter()
                obs, _ = env.reset(seed=env_seed())
                frames, car = split_observation(obs, config)
                replay.start_episode(frames, car)
                step_latency.take_episode()  # a rolled-back episode's steps are not an episode's
                observed = time.perf_counter()
        if not stop.requested:
            evaluate_if_due()
        saved = session.save(is_periodic=False)
        run = session.run
        if stop.requested:
            progress.message(f"stopped at step {run.step:,} (on request): {saved}; run again to resume")
            log.write("run", run.step, event="interrupted")
            return TrainResult(EXIT_INTERRUPTED, session.run_dir, config)
        progress.message(f"done: {run.step:,} steps, {run.episode:,} episodes; {saved}")
        log.write("run", run.step, event="finished", episodes=run.episode)
        return TrainResult(EXIT_OK, session.run_dir, config)
    except GameNotRespondingError:
        saved = session.save(is_periodic=False)
        progress.message(f"the game stopped answering at step {session.run.step:,}: {saved}")
        log.write("run", session.run.step, event="game_not_responding")
        raise
    except KeyboardInterrupt:  # the second Ctrl+C: no save, the state may be mid-update
        progress.message(
            f"aborted at step {session.run.step:,} without saving; the last checkpoint is "
            f"{session.store.latest_path}"
        )
        log.write("run", session.run.step, event="aborted")
        return TrainResult(EXIT_INTERRUPTED, session.run_dir, config)
    finally:
        if step_latency.calls:  # however the run ended: a game-side view of its health
            progress.message(step_latency.summary())
        stop.uninstall()
        session.close()
        env.close()


def report_diagnosis(result: TrainResult) -> int:
    """The go/no-go table of a finished diagnostic run; non-zero exit on a no-go."""
    criteria = diagnose(read_jsonl(result.run_dir / METRICS_FILE), result.config)
    print(format_table(criteria), flush=True)
    return EXIT_OK if verdict(criteria) else EXIT_NO_GO


def unpin_flags(args: argparse.Namespace) -> set[str]:
    """The --unpin-* flags given on the command line."""
    given = {
        "--unpin-target-update": args.unpin_target_update,
        "--unpin-learning-rate": args.unpin_learning_rate,
        "--unpin-epsilon": args.unpin_epsilon,
    }
    return {flag for flag, present in given.items() if present}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.diagnose is not None:
        args.steps = args.diagnose
    try:
        check_sacred_assignments(args.overrides, unpin_flags(args))
        if args.role != "single" or args.make_tls_credentials:
            import distributed  # imports tmrl's networking only when a role needs it

            try:
                return distributed.run_role(args)
            except distributed.NetworkSetupError as error:
                print(f"error: {error}", file=sys.stderr)
                return EXIT_ERROR
        result = train(args)
        if args.diagnose is not None and result.exit_code == EXIT_OK:
            return report_diagnosis(result)
        return result.exit_code
    except (ConfigError, CheckpointError, ObservationError, TrainingStoppedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except RedFlagStopError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_RED_FLAG
    except (TrackManiaSetupError, GameNotRespondingError) as error:
        # A missing game, plugin or TmrlData, or a game that stopped answering: the message says what to do.
        print(f"error: {error}", file=sys.stderr)
        return EXIT_GAME
    except OSError as error:  # e.g. the checkpoint folder vanished or a file is locked by another program
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    # Run as the module `env_tm`, not `__main__`: distributed.py imports env_tm, and two copies of this
    # file would make two copies of its classes (an error raised by one would not be caught by the other).
    import env_tm

    sys.exit(env_tm.main())
