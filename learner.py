"""The learning engine: the agent and its replay memory, fed transitions, learning at the pinned ratio.

One engine, driven three ways:
- beside (`python env_tm.py`, the default): the engine runs in a process of its own beside the actor, which
  only acts; beside.py holds everything that exists for that process (its messages, its liveness rules, the
  weights mailbox, its server loop and the actor's driver).
- inline (`--learner inline`): the same engine in the actor's process, one learn step after each
  environment step, as the reference ran: the exact reproduction of a recorded run (`InlineDriver`, here).
- the scale-out trainer (distributed.py), inline, fed with the workers' episodes.

The roles, by name:
- `LearningEngine`: an agent and its replay memory; it keeps the pinned schedule: learn step k runs only once
  k + batch_size - 1 environment steps are stored (it never learns ahead of the data, and learns one step per
  stored step); the agent makes a hard target copy every 1500 applied learn steps; PER priorities are written
  back by the learn step itself.
- `CheckpointedEngine`: the engine with its run folder: opened new or from the newest good checkpoint, saved
  there (a checkpoint is written only when the engine has caught up with every transition handed to it
  before the request, so the agent, optimizer, replay and step counters in it are of one moment) and rolled
  back from there.
- `ActingPolicy`: what the actor acts with (the engine's own agent inline, a copy of its weights beside).
- `LearnerDriver`: the one interface through which a run (session.py) drives its learner, whichever the
  mode; `InlineDriver` here and `beside.BesideDriver` implement it, so the run never asks which it has.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

import demos
from checkpoints import CheckpointError, CheckpointStore, describe_write_error
from rainbow import RainbowAgent, resolve_device
from replay import DemoReplay, PrioritizedReplay
from tm_config import Config, ConfigError, unpinned_keys

# Config keys that fix the shapes of the networks and the replay memory: a checkpoint made with other
# values cannot be loaded into this run.
SHAPE_KEYS = (
    "img_x", "img_y", "conv_input", "input_car_dim", "previous_actions", "car_feature_hidden_dim",
    "conv_hidden_image_variable", "hidden_dim", "conv_channels_1", "conv_channels_2", "cosine_dim",
    "use_dueling", "max_buffer_size", "demos",
)  # fmt: skip


def stream_seeds(seed: int) -> tuple[int, int]:
    """Independent seeds for the agent and the replay memory (the same int would give equal streams)."""
    agent_seed, replay_seed = np.random.SeedSequence(seed).generate_state(2)
    return int(agent_seed), int(replay_seed)


def weights_finite(agent: RainbowAgent) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in agent.online.parameters())


# --- the engine ----------------------------------------------------------------------------------------
class LearningEngine:
    """An agent and its replay memory; one learn step per stored environment step once a batch is stored
    (after `demo_pretrain_steps` on the demonstrations alone, when there are demonstrations)."""

    def __init__(
        self,
        config: Config,
        seed: int,
        device: torch.device,
        demo_episodes: list[Any] | None = None,
        demo_capacity: int | None = None,
    ) -> None:
        agent_seed, replay_seed = stream_seeds(seed)
        self.config = config
        self.replay = build_replay(config, replay_seed, demo_episodes, demo_capacity)
        self.own = self.replay.own if isinstance(self.replay, DemoReplay) else self.replay
        self.agent = RainbowAgent(config, self.replay, device=device, seed=agent_seed)
        self.pretrain_steps = config.demo_pretrain_steps if isinstance(self.replay, DemoReplay) else 0

    @property
    def learn_target(self) -> int:
        """Learn steps due: the pretraining ones, then one per stored environment step from the
        batch_size-th on."""
        return self.pretrain_steps + max(0, self.replay.transitions_added - self.config.batch_size + 1)

    @property
    def behind(self) -> bool:
        return self.agent.learn_steps < self.learn_target

    def learn(self) -> dict[str, float]:
        """One learn step; its metrics name the environment step it belongs to (learn step k: step
        k + batch_size - 1, where the inline loop runs it)."""
        metrics = self.agent.train()
        metrics["env_step"] = max(
            0, self.agent.learn_steps - self.pretrain_steps + self.config.batch_size - 1
        )
        metrics["consecutive_skipped"] = self.agent.consecutive_skipped_steps
        if self.agent.learn_steps % self.config.log_every_steps == 0:
            metrics["weights_finite"] = float(weights_finite(self.agent))
        return metrics

    def reward_range(self) -> tuple[float, float] | None:
        """The smallest and largest reward of the agent's own transitions (a resumed run's health monitor
        starts from them)."""
        if not len(self.own):
            return None
        return float(np.nanmin(self.own.rewards)), float(np.nanmax(self.own.rewards))

    def checkpoint_state(self, run: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint: the actor's `run` counters and random streams, this engine's agent and replay.
        The replay's arrays are views: serialise the dict before the next transition is stored."""
        return {
            "config": self.config.to_dict(),
            "departures": self.config.departures(),
            "unpinned": unpinned_keys(self.config),
            **run,
            "beta": self.replay.beta,  # restored from the replay; kept for people reading a checkpoint
            "agent": self.agent.state_dict(),
            "replay": self.replay.state_dict(),
        }

    def restore(self, state: dict[str, Any], path: Path) -> dict[str, Any]:
        """Load a checkpoint's agent and replay; returns its run part. Anything that does not fit is a
        CheckpointError naming the file."""
        try:
            self.agent.load_state_dict(state["agent"])
            self.replay.load_state_dict(state["replay"])
            self.replay.check_consistency()
            for group in self.agent.optimizer.param_groups:  # the optimizer state carries its saved lr
                group["lr"] = self.config.learning_rate
            run = {key: value for key, value in state.items() if key not in ("agent", "replay", "config")}
            for key in ("step", "episode", "best_interval_reward"):
                run[key] = float(run[key]) if key == "best_interval_reward" else int(run[key])
        except (KeyError, RuntimeError, ValueError, TypeError) as error:
            text = str(error).strip()
            first_line = text.splitlines()[0][:200] if text else type(error).__name__
            raise CheckpointError(f"checkpoint {path} cannot be restored: {first_line}") from None
        return run


def build_replay(
    config: Config, seed: int, demo_episodes: list[Any] | None = None, demo_capacity: int | None = None
) -> PrioritizedReplay | DemoReplay:
    """The pinned replay memory; with `config.demos`, beside a demonstration part holding `demo_episodes`
    (a new run) or sized `demo_capacity` (a resumed one, whose checkpoint holds the demonstrations)."""
    own = PrioritizedReplay.from_config(config, seed=seed)
    if not config.demos:
        return own
    if demo_episodes is not None:
        transitions = demos.transitions_of(demo_episodes)
        # Room for every transition and its episode's reset frames, so that nothing is ever evicted.
        demo_capacity = transitions + len(demo_episodes) * config.conv_input
    if demo_capacity is None:
        raise ValueError("a demonstration part needs its episodes or its size")
    part = PrioritizedReplay.from_config(
        config, seed=seed + 1, capacity=demo_capacity, priority_bonus=config.demo_priority_bonus
    )
    if demo_episodes is not None:
        demos.fill(part, demo_episodes, config)
        if len(part) != transitions:
            raise demos.DemoError(f"{transitions - len(part)} demonstration transitions did not fit")
    return DemoReplay(own, part, seed=seed + 2)


def resume_config(state: dict[str, Any], overrides: list[str], path: Path) -> Config:
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


@dataclass
class LearnerSpec:
    """What a learner needs to open its run; plain values, so that it crosses a process boundary."""

    config: dict[str, Any]  # the requested config (the pin plus --set)
    overrides: list[str]
    run_dir: str
    resume: bool  # look for a checkpoint
    require_checkpoint: bool  # --resume: no checkpoint is an error
    seed: int
    device: str
    # torch CPU threads of the learner (None: its driver's default: beside the actor all cores but one, inline
    # torch's)
    threads: int | None = None
    demo_root: str = "demos"  # where the demonstration sets of config.demos are
    # Linux's kernel kills the learner with its actor; a test turns that off to prove that the learner's own
    # checks (the ones macOS and Windows rely on besides the Job Object) get it out in time as well.
    death_signal: bool = True


def all_cores_but_one() -> int:
    """A learner's CPU threads when something else needs a core (the game, or the actor beside it)."""
    # bench/BENCHMARKS.md: with a busy core (the game), 2 threads on 2 cores made act+learn 1.7x slower.
    return max(1, (os.cpu_count() or 2) - 1)


class CheckpointedEngine:
    """A run's engine with its run folder: opened new or from the newest good checkpoint, saved there and
    rolled back from there. Both drivers hold one: inline in the actor's process, beside in the learner's."""

    def __init__(self, spec: LearnerSpec) -> None:
        self.spec = spec
        # How many checkpoints to keep is the run's config's, known once it is opened (a resumed run keeps
        # its checkpoint's, like every other setting not given with --set).
        requested = Config.from_dict(spec.config)
        self.store = CheckpointStore(Path(spec.run_dir), requested.keep_last_n_checkpoints)
        self.engine: LearningEngine | None = None

    def open(self) -> dict[str, Any]:
        spec = self.spec
        device = resolve_device(spec.device)
        requested = Config.from_dict(spec.config)
        notes: list[str] = []
        run: dict[str, Any] | None = None
        path = None
        if spec.resume:
            self.store.remove_temporaries()

            def build(state: dict[str, Any], path: Path) -> tuple[LearningEngine, dict[str, Any]]:
                config = resume_config(state, spec.overrides, path)
                size = state.get("replay", {}).get("demos", {}).get("capacity") if config.demos else None
                engine = LearningEngine(config, spec.seed, device, demo_capacity=size)
                return engine, engine.restore(state, path)

            loaded = self.store.load_newest_good(build)
            if loaded is not None:
                (self.engine, run), path = loaded.value, loaded.path
                notes += [f"skipped: {line}" for line in loaded.skipped]
                if loaded.skipped:
                    notes.append(f"falling back to the newest good checkpoint: {path.name}")
            elif spec.require_checkpoint:
                raise CheckpointError(
                    f"--resume: no checkpoint in {self.store.run_dir} (drop --resume to start fresh)"
                )
            else:
                notes.append(f"no checkpoint in {self.store.run_dir}: starting fresh")
        if self.engine is None:
            episodes = None
            if requested.demos:
                episodes = demos.load_sets(Path(spec.demo_root), requested, notes.append)
                count, bonus = demos.transitions_of(episodes), requested.demo_priority_bonus
                notes.append(
                    f"demonstrations: {len(episodes)} episodes, {count:,} transitions from {requested.demos} "
                    f"(never evicted; DQfD bonus {bonus:g}, margin {requested.demo_margin:g} x "
                    f"{requested.demo_margin_weight:g})"
                )
            self.engine = LearningEngine(requested, spec.seed, device, demo_episodes=episodes)
        self.store.keep_last = self.engine.config.keep_last_n_checkpoints
        return {
            "config": self.engine.config.to_dict(),
            "run": run,
            "path": str(path) if path is not None else None,
            "notes": notes,
            "reward_range": self.engine.reward_range(),
            "transitions": self.engine.replay.transitions_added,
            "learn_steps": self.engine.agent.learn_steps,
            "replay_bytes": self.engine.replay.nbytes,
        }

    def save(self, run: dict[str, Any], periodic: bool, is_best: bool) -> tuple[bool, str]:
        """Write a checkpoint; (True, path) or (False, the cause in one line)."""
        state = self.engine.checkpoint_state(run)
        try:
            if periodic:
                self.store.save(state, int(run["episode"]), int(run["step"]), is_best)
                path = self.store.latest_path
            else:
                path = self.store.save_latest_only(state)
        except OSError as error:
            cause = describe_write_error(error, self.store.run_dir)
            return False, f"checkpoint at step {int(run['step']):,} failed: {cause}"
        return True, str(path)

    def roll_back(self, paths: list[Path], seed: int) -> dict[str, Any] | None:
        """Restore the newest of `paths` that loads (None if none does), then draw fresh random streams:
        restored, they would replay the draws that led to the failure."""
        engine = self.engine
        try:
            loaded = self.store.load_newest_good(engine.restore, paths)
        except CheckpointError:  # none of them restores
            loaded = None
        if loaded is None:
            return None
        agent_seed, replay_seed = stream_seeds(seed)
        engine.replay.reseed(replay_seed)
        engine.agent.reseed(agent_seed)
        return {
            "run": loaded.value,
            "path": str(loaded.path),
            "reward_range": engine.reward_range(),
            "transitions": engine.replay.transitions_added,
            "learn_steps": engine.agent.learn_steps,
        }


# --- acting -------------------------------------------------------------------------------------------------
class ActingPolicy:
    """The acting side of a run: epsilon-greedy at the global step, fresh noise from the acting stream at
    every action, BatchNorm in eval mode (RainbowAgent.act). Inline it wraps the engine's own agent; for an
    engine that lives elsewhere (a process beside this one, or a scale-out trainer) an agent of its own,
    made from the same seed, into which the engine's weights are copied when they arrive. Either way it
    draws only from the acting streams, never from the learning one."""

    def __init__(self, agent: RainbowAgent) -> None:
        self.agent = agent

    @classmethod
    def new(cls, config: Config, seed: int, device: str | torch.device = "cpu") -> ActingPolicy:
        return cls(RainbowAgent(config, replay=None, device=device, seed=stream_seeds(seed)[0]))

    @property
    def epsilon(self) -> float:
        return self.agent.epsilon

    def act(self, frames: np.ndarray, car: np.ndarray, step: int) -> int:
        return self.agent.act(frames, car, step)


# --- the two ways a single PC drives the engine --------------------------------------------------------
@runtime_checkable
class LearnerDriver(Protocol):
    """What a run (session.py) asks of its learner, whichever way it runs: hand over each environment step,
    collect the metrics of the learn steps done, keep pace, save and roll back. Each answer that differs by
    mode is the driver's, so that the run never asks which driver it has."""

    actor: ActingPolicy  # what the run acts with (set by open)

    def open(self) -> dict[str, Any]:
        """Open the run's engine (new or resumed): its config, run counters, notes and sizes."""

    def close(self) -> None:
        """Let go of the engine (beside: stop its process); always safe to call."""

    def placement(self) -> tuple[str, int]:
        """Where the engine learns and with how many CPU threads, for the run's first lines."""

    def start_episode(self, frames: np.ndarray, car: np.ndarray) -> None:
        """Hand over the reset observation of a new episode."""

    def add(
        self,
        action: int,
        reward: float,
        terminated: bool,
        truncated: bool,
        frame: np.ndarray,
        car: np.ndarray,
    ) -> None:
        """Hand over one environment step."""

    def learn(self) -> list[dict[str, float]]:
        """The metrics of the learn steps done since the last call (inline: the one now due, if any)."""

    def sync(self, give_up: Callable[[], bool] | None = None) -> list[dict[str, float]]:
        """Learn every step due (until `give_up()`), then the newest weights for the actor; the metrics."""

    def pause_while_learning(self) -> None:
        """A loop that only waits for learn steps (pretraining) calls this between its polls."""

    @property
    def lag(self) -> int:
        """Learn steps due for the steps handed over but not run yet."""

    @property
    def policy_age(self) -> int:
        """How many learn steps older than inline's the weights the actor acts with are."""

    def keep_pace(self, limit: int) -> float:
        """Wait while the engine is more than `limit` learn steps behind; the seconds waited."""

    def refresh_actor(self) -> bool:
        """Give the actor the engine's newest weights if there are new ones; whether it got them."""

    def check_alive(self) -> None:
        """Raise beside.LearnerDiedError if the engine can no longer learn (its process died)."""

    def save(
        self, run: dict[str, Any], periodic: bool, is_best: bool, catch_up: bool = True
    ) -> tuple[bool, str]:
        """A checkpoint with the run's counters, after catching up unless told not to (the run is leaving)."""

    def roll_back(self, paths: list[Path], seed: int) -> dict[str, Any] | None:
        """Restore the newest good of `paths` (None: none is), with fresh learning streams."""

    def status_field(self) -> str | None:
        """What the status line shows of the learner (None: nothing)."""

    def pace_summary(self, lag_max: int, waited: float) -> str | None:
        """The final summary's line about the learner's pace (None: nothing to say)."""


class InlineDriver:
    """The engine in this process: one learn step right after each environment step (exact, sequential)."""

    def __init__(self, spec: LearnerSpec) -> None:
        self.spec = spec
        self.checkpointed = CheckpointedEngine(spec)

    def open(self) -> dict[str, Any]:
        spec = self.spec
        if spec.threads is not None and resolve_device(spec.device).type == "cpu":
            torch.set_num_threads(spec.threads)
        info = self.checkpointed.open()
        self.actor = ActingPolicy(self.engine.agent)
        return info

    def close(self) -> None:
        pass

    @property
    def engine(self) -> LearningEngine:
        """The engine itself (it is in this process: the scale-out trainer feeds it directly)."""
        return self.checkpointed.engine

    def placement(self) -> tuple[str, int]:
        return "learner inline", torch.get_num_threads()

    def start_episode(self, frames: np.ndarray, car: np.ndarray) -> None:
        self.engine.replay.start_episode(frames, car)

    def add(
        self,
        action: int,
        reward: float,
        terminated: bool,
        truncated: bool,
        frame: np.ndarray,
        car: np.ndarray,
    ) -> None:
        self.engine.replay.add(action, reward, terminated, truncated, frame, car)

    def learn(self) -> list[dict[str, float]]:
        """The pinned sequence: after each stored step, one learn step if one is due."""
        return [self.engine.learn()] if self.engine.behind else []

    def sync(self, give_up: Callable[[], bool] | None = None) -> list[dict[str, float]]:
        metrics = []  # inline it is at most one learn step: nothing to give up
        while self.engine.behind:
            metrics.append(self.engine.learn())
        return metrics

    def pause_while_learning(self) -> None:
        pass  # learn() did the learn step

    @property
    def lag(self) -> int:
        return 0

    @property
    def policy_age(self) -> int:
        return 0  # the actor is the engine's own agent, caught up after every step

    def keep_pace(self, limit: int) -> float:
        return 0.0  # always caught up

    def refresh_actor(self) -> bool:
        return False

    def check_alive(self) -> None:
        pass

    def save(
        self, run: dict[str, Any], periodic: bool, is_best: bool, catch_up: bool = True
    ) -> tuple[bool, str]:
        return self.checkpointed.save(run, periodic, is_best)  # inline, the engine is always caught up

    def roll_back(self, paths: list[Path], seed: int) -> dict[str, Any] | None:
        return self.checkpointed.roll_back(paths, seed)

    def status_field(self) -> str | None:
        return None  # never behind

    def pace_summary(self, lag_max: int, waited: float) -> str | None:
        return None
