"""The learning engine: the agent and its replay memory, fed transitions, learning at the pinned ratio.

One engine, driven three ways:
- beside (`python env_tm.py`, the default): the engine runs in a process of its own, spawned (so it works
  on Windows), at a lower OS priority than the actor. The actor only acts, steps the environment and hands
  each transition over through a queue; it copies the learner's weights every `actor_refresh_learn_steps`
  learn steps from shared memory, with the learn step they come from, so that the loop knows how many
  learn steps older than inline's its policy is (`policy_age`). The learner announces a learn step only
  after publishing its weights: in lockstep (`simulator_max_lag=0`, weights after every step) the actor
  then acts exactly as inline does, bit for bit. The actor draws only from the agent's acting streams and
  the learner only from its learning one (rainbow.py: one seed, independent streams).
- inline (`--learner inline`): the same engine in the actor's process, one learn step after each
  environment step, as the reference ran: the exact reproduction of a recorded run.
- the scale-out trainer (distributed.py), inline, fed with the workers' episodes.

Whoever drives it, `LearnerServer` keeps the pinned schedule: learn step k runs only once k + batch_size - 1
environment steps are stored (it never learns ahead of the data, and learns one step per stored step);
the agent makes a hard target copy every 1500 applied learn steps; PER priorities are written back by the
learn step itself; and a checkpoint is written only when the learner has caught up with every transition
handed to it before the request, so the agent, optimizer, replay and step counters in it are of one moment.

Messages to the server, in order (a queue in the beside mode, direct calls inline):
    ("episode", frames, car)                                   the reset observation of a new episode
    ("step", action, reward, terminated, truncated, frame, car)  one environment step
    ("save", id, run, periodic, is_best, catch_up)              a checkpoint with `run`'s counters, after the
                                                                learner caught up (unless the run is leaving)
    ("rollback", id, paths, seed)                               restore the newest good of `paths`
    ("sync", id)                                                learn until caught up, then answer
    ("stop",)
Replies: ("opened", info), ("metrics", metrics), ("saved", id, ok, text), ("rolled_back", id, info | None),
("synced", id), ("error", kind, message).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import platform
import queue
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
LEARNER_LOG = "learner.log"  # in the run folder: the traceback of a learner process that failed
START_TIMEOUT = 180.0  # seconds for a spawned learner to import torch and open (or resume) its run
ALIVE_CHECK_SECONDS = 0.5  # how often the actor checks that the learner process still runs
PEER_CHECK_SECONDS = 0.2  # how often a wait or a learning learner checks that the other process still runs


class PeerGoneError(Exception):
    """The process on the other side (the actor, seen from the learner, or the reverse) has died."""


class LearnerDiedError(RuntimeError):
    """The learner process stopped or failed; the message is one line."""


def stream_seeds(seed: int) -> tuple[int, int]:
    """Independent seeds for the agent and the replay memory (the same int would give equal streams)."""
    agent_seed, replay_seed = np.random.SeedSequence(seed).generate_state(2)
    return int(agent_seed), int(replay_seed)


def weights_finite(agent: RainbowAgent) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in agent.online.parameters())


# --- the engine ----------------------------------------------------------------------------------------
class Learner:
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
        """A checkpoint: the actor's `run` counters and random streams, this learner's agent and replay.
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
    threads: int | None = None  # torch CPU threads of the learner (None: torch's default)
    demo_root: str = "demos"  # where the demonstration sets of config.demos are
    # Linux's kernel kills the learner with its actor; a test turns that off to prove that the learner's own
    # checks (the ones macOS and Windows rely on besides the Job Object) get it out in time as well.
    death_signal: bool = True


class LearnerServer:
    """Opens a run's learner (new or resumed) and serves the messages of the module docstring."""

    def __init__(self, spec: LearnerSpec, reply: Callable[[tuple], None]) -> None:
        self.spec = spec
        self.reply = reply
        # How many checkpoints to keep is the run's config's, known once it is opened (a resumed run keeps
        # its checkpoint's, like every other setting not given with --set).
        requested = Config.from_dict(spec.config)
        self.store = CheckpointStore(Path(spec.run_dir), requested.keep_last_n_checkpoints)
        self.learner: Learner | None = None
        self.publish: Callable[[], None] | None = None  # set by the beside mode: share the weights
        self.learned: Any = None  # the beside mode's shared counter of learn steps, updated before replies
        # Beside, a sync is answered by the serve loop once the learner has caught up, so that commands sent
        # after it (an exit save that must not wait) are served between learn steps. None: at once.
        self.pending_syncs: list[int] | None = None
        self.actor_alive: Callable[[], bool] | None = None  # beside: whether the actor process still runs
        self.last_actor_check = 0.0

    # opening -------------------------------------------------------------------------------------------
    def open(self) -> dict[str, Any]:
        spec = self.spec
        device = resolve_device(spec.device)
        requested = Config.from_dict(spec.config)
        notes: list[str] = []
        run: dict[str, Any] | None = None
        path = None
        if spec.resume:
            self.store.remove_temporaries()

            def build(state: dict[str, Any], path: Path) -> tuple[Learner, dict[str, Any]]:
                config = resume_config(state, spec.overrides, path)
                size = state.get("replay", {}).get("demos", {}).get("capacity") if config.demos else None
                learner = Learner(config, spec.seed, device, demo_capacity=size)
                return learner, learner.restore(state, path)

            loaded = self.store.load_newest_good(build)
            if loaded is not None:
                (self.learner, run), path = loaded.value, loaded.path
                notes += [f"skipped: {line}" for line in loaded.skipped]
                if loaded.skipped:
                    notes.append(f"falling back to the newest good checkpoint: {path.name}")
            elif spec.require_checkpoint:
                raise CheckpointError(
                    f"--resume: no checkpoint in {self.store.run_dir} (drop --resume to start fresh)"
                )
            else:
                notes.append(f"no checkpoint in {self.store.run_dir}: starting fresh")
        if self.learner is None:
            episodes = None
            if requested.demos:
                episodes = demos.load_sets(Path(spec.demo_root), requested, notes.append)
                count, bonus = demos.transitions_of(episodes), requested.demo_priority_bonus
                notes.append(
                    f"demonstrations: {len(episodes)} episodes, {count:,} transitions from {requested.demos} "
                    f"(never evicted; DQfD bonus {bonus:g}, margin {requested.demo_margin:g} x "
                    f"{requested.demo_margin_weight:g})"
                )
            self.learner = Learner(requested, spec.seed, device, demo_episodes=episodes)
        self.store.keep_last = self.learner.config.keep_last_n_checkpoints
        return {
            "config": self.learner.config.to_dict(),
            "run": run,
            "path": str(path) if path is not None else None,
            "notes": notes,
            "reward_range": self.learner.reward_range(),
            "transitions": self.learner.replay.transitions_added,
            "learn_steps": self.learner.agent.learn_steps,
            "replay_bytes": self.learner.replay.nbytes,
        }

    # serving ---------------------------------------------------------------------------------------------
    def handle(self, message: tuple) -> bool:
        """Serve one message; returns False on "stop"."""
        kind = message[0]
        learner = self.learner
        if kind == "step":
            learner.replay.add(*message[1:])
        elif kind == "episode":
            learner.replay.start_episode(*message[1:])
        elif kind == "save":
            _, request, run, periodic, is_best, catch_up = message
            if catch_up:  # else the run is leaving: the due learn steps are done when it resumes
                self.catch_up()
            self.reply(("saved", request, *self.save(run, periodic, is_best)))
        elif kind == "rollback":
            _, request, paths, seed = message
            self.reply(("rolled_back", request, self.roll_back([Path(p) for p in paths], seed)))
        elif kind == "sync":
            if self.pending_syncs is not None:
                self.pending_syncs.append(message[1])
            else:
                self.catch_up()
                self.answer_syncs([message[1]])
        elif kind == "stop":
            return False
        else:
            raise ValueError(f"unknown learner message {kind!r}")
        return True

    def answer_syncs(self, requests: list[int]) -> None:
        """Tell the actor it has caught up, with the weights of this very moment (it then acts or is
        evaluated with them)."""
        if requests and self.publish is not None:
            self.publish()
        for request in requests:
            self.reply(("synced", request))
        requests.clear()

    def check_actor(self) -> None:
        """Raise PeerGoneError if the actor has died (looked at every PEER_CHECK_SECONDS, also in a
        catch-up of thousands of learn steps: nothing will ask this learner for anything any more)."""
        if self.actor_alive is None:
            return
        now = time.monotonic()
        if now - self.last_actor_check < PEER_CHECK_SECONDS:
            return
        self.last_actor_check = now
        if not self.actor_alive():
            raise PeerGoneError

    def work(self) -> bool:
        """One learn step if one is due (its metrics are replied); returns whether it learned."""
        if not self.learner.behind:
            return False
        self.check_actor()
        metrics = self.learner.learn()
        refresh_every = self.learner.config.actor_refresh_learn_steps  # the run's, resumed or not
        if self.publish is not None and self.learner.agent.learn_steps % refresh_every == 0:
            self.publish()
        if self.learned is not None:  # after the weights: an actor that sees this step can also read them
            self.learned.value = self.learner.agent.learn_steps
        self.reply(("metrics", metrics))
        return True

    def catch_up(self) -> None:
        while self.work():
            pass

    def save(self, run: dict[str, Any], periodic: bool, is_best: bool) -> tuple[bool, str]:
        """Write a checkpoint; (True, path) or (False, the cause in one line)."""
        state = self.learner.checkpoint_state(run)
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
        learner = self.learner
        try:
            loaded = self.store.load_newest_good(learner.restore, paths)
        except CheckpointError:  # none of them restores
            loaded = None
        if loaded is None:
            return None
        agent_seed, replay_seed = stream_seeds(seed)
        learner.replay.reseed(replay_seed)
        learner.agent.reseed(agent_seed)
        if self.learned is not None:  # before the reply: the actor's lag counts from the restored step
            self.learned.value = learner.agent.learn_steps
        if self.publish is not None:
            self.publish()
        return {
            "run": loaded.value,
            "path": str(loaded.path),
            "reward_range": learner.reward_range(),
            "transitions": learner.replay.transitions_added,
            "learn_steps": learner.agent.learn_steps,
        }


# --- acting -------------------------------------------------------------------------------------------------
class Actor:
    """The acting side of a run: epsilon-greedy at the global step, fresh noise from the acting stream at
    every action, BatchNorm in eval mode (RainbowAgent.act). Inline it wraps the learner's own agent; for a
    learner that lives elsewhere (a process beside this one, or a scale-out trainer) an agent of its own,
    made from the same seed, into which the learner's weights are copied when they arrive. Either way it
    draws only from the acting streams, never from the learning one."""

    def __init__(self, agent: RainbowAgent) -> None:
        self.agent = agent

    @classmethod
    def new(cls, config: Config, seed: int, device: str | torch.device = "cpu") -> Actor:
        return cls(RainbowAgent(config, replay=None, device=device, seed=stream_seeds(seed)[0]))

    @property
    def epsilon(self) -> float:
        return self.agent.epsilon

    def act(self, frames: np.ndarray, car: np.ndarray, step: int) -> int:
        return self.agent.act(frames, car, step)


# --- the two ways a single PC drives the engine --------------------------------------------------------
class InlineLearner:
    """The engine in this process: one learn step right after each environment step (exact, sequential)."""

    mode = "inline"

    def __init__(self, spec: LearnerSpec) -> None:
        self.spec = spec
        self.replies: list[tuple] = []
        self.server = LearnerServer(spec, self.replies.append)

    def open(self) -> dict[str, Any]:
        info = self.server.open()
        self.actor = Actor(self.server.learner.agent)
        return info

    @property
    def learner(self) -> Learner:
        return self.server.learner

    @property
    def lag(self) -> int:
        return 0

    @property
    def policy_age(self) -> int:
        return 0  # the actor is the learner's own agent, caught up after every step

    def start_episode(self, frames: np.ndarray, car: np.ndarray) -> None:
        self.server.handle(("episode", frames, car))

    def add(self, *transition: Any) -> None:
        self.server.handle(("step", *transition))

    def learn(self) -> list[dict[str, float]]:
        """The pinned sequence: after each stored step, one learn step if one is due."""
        self.server.work()
        return self.take_metrics()

    def take_metrics(self) -> list[dict[str, float]]:
        metrics = [reply[1] for reply in self.replies if reply[0] == "metrics"]
        self.replies.clear()
        return metrics

    def keep_pace(self, limit: int) -> float:
        return 0.0  # always caught up

    def sync(self, give_up: Callable[[], bool] | None = None) -> list[dict[str, float]]:
        self.server.catch_up()  # inline it is at most one learn step: nothing to give up
        return self.take_metrics()

    def save(
        self, run: dict[str, Any], periodic: bool, is_best: bool, catch_up: bool = True
    ) -> tuple[bool, str]:
        return self.server.save(run, periodic, is_best)  # inline, the learner is always caught up

    def roll_back(self, paths: list[Path], seed: int) -> dict[str, Any] | None:
        return self.server.roll_back(paths, seed)

    def refresh_actor(self) -> bool:
        return False

    def check_alive(self) -> None:
        pass

    def close(self) -> None:
        pass


class WeightsMailbox:
    """The online net's weights in shared memory, written by the learner, read by the actor; a version
    number says when new ones are there, the learn step they come from is written with them, and a lock
    keeps a copy from reading half-written weights."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        version: Any,
        lock: Any,
        learn_step: Any,
        peer_alive: Callable[[], bool] = lambda: True,
    ) -> None:
        self.tensors, self.version, self.lock, self.learn_step = tensors, version, lock, learn_step
        self.peer_alive = peer_alive  # a process killed while holding the lock never releases it
        self._copies: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # per net: (to, from) pairs

    def _pairs(self, net: torch.nn.Module, outgoing: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (destination, source) tensors of a copy, found once per net: a state_dict's tensors share the
        net's storage, so copying them is loading the weights, without load_state_dict's per-call walk."""
        key = id(net) * 2 + outgoing
        if key not in self._copies:
            state = net.state_dict()
            self._copies[key] = [
                (self.tensors[name], state[name]) if outgoing else (state[name], self.tensors[name])
                for name in self.tensors
            ]
        return self._copies[key]

    @classmethod
    def of(
        cls, agent: RainbowAgent, version: Any, lock: Any, learn_step: Any, peer_alive: Callable[[], bool]
    ) -> WeightsMailbox:
        tensors = {
            k: v.detach().to("cpu", copy=True).share_memory_() for k, v in agent.online.state_dict().items()
        }
        learn_step.value = agent.learn_steps
        return cls(tensors, version, lock, learn_step, peer_alive)

    @contextlib.contextmanager
    def _locked(self) -> Any:
        """The lock, waited for in short slices: PeerGoneError if the other side dies meanwhile (it may have
        died holding it, and then nobody ever releases it)."""
        while not self.lock.acquire(timeout=PEER_CHECK_SECONDS):
            if not self.peer_alive():
                raise PeerGoneError
        try:
            yield
        finally:
            self.lock.release()

    def write(self, agent: RainbowAgent) -> None:
        pairs = self._pairs(agent.online, outgoing=True)
        with self._locked(), torch.no_grad():
            for destination, source in pairs:
                destination.copy_(source)
            self.learn_step.value = agent.learn_steps
            self.version.value += 1

    def read_into(self, actor: Actor) -> int:
        """Copy the weights into the actor's net; returns the learn step they come from."""
        pairs = self._pairs(actor.agent.online, outgoing=False)
        with self._locked(), torch.no_grad():
            for destination, source in pairs:
                destination.copy_(source)
            return int(self.learn_step.value)


def lower_priority() -> None:
    """Run this process below the actor's priority (never fatal: a scheduling hint, not a requirement)."""
    with contextlib.suppress(Exception):
        if platform.system() == "Windows":
            below_normal = 0x4000  # BELOW_NORMAL_PRIORITY_CLASS
            kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
            kernel32.SetPriorityClass(kernel32.GetCurrentProcess(), below_normal)
        else:
            os.nice(5)


def die_with_parent() -> None:
    """On Linux the kernel kills this process the moment the actor dies (a killed actor never leaves a
    learner writing into its run folder). On Windows the actor's Job Object does (`bind_to_actor`);
    everywhere the serving loop's own checks notice within PEER_CHECK_SECONDS as well."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# Windows: a Job Object that kills its processes when its last handle closes. The actor holds the only
# handle, so when the actor ends in any way (the console closed, Task Manager's End task, a crash, a
# logoff) Windows closes it and kills the learner with it.
JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x2000
EXTENDED_LIMIT_INFORMATION = 9  # JobObjectExtendedLimitInformation


class _BasicLimits(ctypes.Structure):
    _fields_ = [
        ("PerProcessUserTimeLimit", ctypes.c_int64),
        ("PerJobUserTimeLimit", ctypes.c_int64),
        ("LimitFlags", ctypes.c_uint32),
        ("MinimumWorkingSetSize", ctypes.c_size_t),
        ("MaximumWorkingSetSize", ctypes.c_size_t),
        ("ActiveProcessLimit", ctypes.c_uint32),
        ("Affinity", ctypes.c_size_t),
        ("PriorityClass", ctypes.c_uint32),
        ("SchedulingClass", ctypes.c_uint32),
    ]


class _IoCounters(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "ReadOperationCount", "WriteOperationCount", "OtherOperationCount",
            "ReadTransferCount", "WriteTransferCount", "OtherTransferCount",
        )
    ]  # fmt: skip


class JobLimits(ctypes.Structure):
    """JOBOBJECT_EXTENDED_LIMIT_INFORMATION (144 bytes on 64-bit Windows)."""

    _fields_ = [
        ("BasicLimitInformation", _BasicLimits),
        ("IoInfo", _IoCounters),
        ("ProcessMemoryLimit", ctypes.c_size_t),
        ("JobMemoryLimit", ctypes.c_size_t),
        ("PeakProcessMemoryUsed", ctypes.c_size_t),
        ("PeakJobMemoryUsed", ctypes.c_size_t),
    ]


def _kernel32() -> Any:
    """kernel32 with the signatures of the calls below (handles are pointers: an unset restype would cut
    them to 32 bits on 64-bit Windows)."""
    kernel32 = ctypes.WinDLL("kernel32")  # type: ignore[attr-defined]
    handle, flag = ctypes.c_void_p, ctypes.c_int
    kernel32.CreateJobObjectW.restype, kernel32.CreateJobObjectW.argtypes = handle, (handle, ctypes.c_wchar_p)
    kernel32.SetInformationJobObject.restype = flag
    kernel32.SetInformationJobObject.argtypes = (handle, ctypes.c_int, handle, ctypes.c_uint32)
    kernel32.AssignProcessToJobObject.restype = flag
    kernel32.AssignProcessToJobObject.argtypes = (handle, handle)
    kernel32.CloseHandle.restype, kernel32.CloseHandle.argtypes = flag, (handle,)
    kernel32.GetLastError.restype = ctypes.c_uint32
    return kernel32


def bind_to_actor(process_handle: int, kernel32: Any = None) -> tuple[int | None, str | None]:
    """Put the learner process (its Windows handle) in a kill-on-close Job Object whose one handle this
    process keeps open: (the job's handle, None), or (None, why not) where Windows refuses; the serving
    loop's own checks still end the learner then, only later. `kernel32` is for tests."""
    kernel32 = kernel32 or _kernel32()
    job = kernel32.CreateJobObjectW(None, None)
    if not job:
        return None, f"CreateJobObjectW failed (Windows error {kernel32.GetLastError()})"
    limits = JobLimits()
    limits.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
    calls = (
        (
            "SetInformationJobObject",
            lambda: kernel32.SetInformationJobObject(
                job, EXTENDED_LIMIT_INFORMATION, ctypes.addressof(limits), ctypes.sizeof(limits)
            ),
        ),
        ("AssignProcessToJobObject", lambda: kernel32.AssignProcessToJobObject(job, process_handle)),
    )
    for name, call in calls:
        if not call():
            error = kernel32.GetLastError()
            kernel32.CloseHandle(job)
            return None, f"{name} failed (Windows error {error})"
    return job, None


def serve(
    spec: LearnerSpec, commands: Any, replies: Any, learned: Any, version: Any, lock: Any, weights_step: Any
) -> None:
    """The learner process: open, then ingest transitions and learn until told to stop or the actor dies.

    The actor's death ends it within PEER_CHECK_SECONDS in every state: learning (checked between learn
    steps, catch-ups included), idle (between 0.1 s waits for data), on the weights' lock (waited for in
    slices), and mid-message (this process holds no writing end of the command pipe, so a message cut by
    the actor's death ends in EOF, not a wait for ever). It then leaves without flushing its replies into
    a pipe nobody reads (Windows' holds ~8 KiB: the flush would block for ever)."""
    import multiprocessing

    for name in ("SIGINT", "SIGTERM", "SIGBREAK"):  # Ctrl+C and kills are the actor's to handle: it saves
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    if spec.death_signal:
        die_with_parent()
    lower_priority()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    commands._writer.close()  # only the actor writes commands: its death is then an EOF here
    parent = multiprocessing.parent_process()

    def actor_alive() -> bool:
        return parent is None or parent.is_alive()

    server = LearnerServer(spec, replies.put)
    server.actor_alive = actor_alive
    try:
        info = server.open()
        mailbox = WeightsMailbox.of(server.learner.agent, version, lock, weights_step, actor_alive)
        server.publish = lambda: mailbox.write(server.learner.agent)
        server.learned = learned
        server.pending_syncs = []
        learned.value = server.learner.agent.learn_steps
        replies.put(("opened", {**info, "weights": mailbox.tensors}))
        while True:
            try:  # everything that has arrived, in order
                while True:
                    if not server.handle(commands.get_nowait()):
                        return
            except queue.Empty:
                pass
            if server.work():
                continue
            server.answer_syncs(server.pending_syncs)  # caught up with everything before them
            try:  # nothing to learn: wait for data
                message = commands.get(timeout=0.1)
            except queue.Empty:
                if not actor_alive():
                    raise PeerGoneError from None
                continue
            if not server.handle(message):
                return
    except (PeerGoneError, EOFError, BrokenPipeError):  # the actor is gone: nothing will ask for anything
        replies.cancel_join_thread()
    except BaseException as error:  # report in one line; the traceback goes to the run folder's log
        if not actor_alive():  # an error while the actor died (a broken pipe): nobody to report to
            replies.cancel_join_thread()
            return
        # An expected refusal (missing demonstrations, a bad checkpoint or config) is its one line: no
        # traceback, and no run folder made only to hold one.
        if not isinstance(error, (CheckpointError, ConfigError, demos.DemoError)):
            log = Path(spec.run_dir) / LEARNER_LOG
            with contextlib.suppress(OSError):
                log.parent.mkdir(parents=True, exist_ok=True)
                with log.open("a", encoding="utf-8") as file:
                    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                    file.write(f"{stamp} learner failed\n{traceback.format_exc()}\n")
        text = " ".join(str(error).split()) or type(error).__name__
        replies.put(("error", type(error).__name__, text))
        time.sleep(0.5)  # let the queue's feeder thread deliver the reply before the process ends
        replies.cancel_join_thread()  # and never block the exit on it: an actor that reads has it by now


class BesideLearner:
    """The engine in a process beside the actor (module docstring). Transitions go over a queue, metrics and
    answers come back over another, the weights through a shared `WeightsMailbox`."""

    mode = "beside"

    def __init__(self, spec: LearnerSpec) -> None:
        import torch.multiprocessing as torch_mp

        self.spec = spec
        context = torch_mp.get_context("spawn")  # Windows has no fork; spawn everywhere keeps one behaviour
        self.commands, self.replies = context.Queue(), context.Queue()
        self.learned = context.Value("q", 0, lock=False)
        self.version = context.Value("q", 0, lock=False)
        self.weights_step = context.Value("q", 0, lock=False)  # the learn step of the published weights
        self.lock = context.Lock()
        self.process = context.Process(
            target=serve,
            args=(
                spec,
                self.commands,
                self.replies,
                self.learned,
                self.version,
                self.lock,
                self.weights_step,
            ),
            name="rainbow-tm learner",
            daemon=True,
        )
        self.sent = 0  # environment steps handed over
        self.metrics: list[dict[str, float]] = []
        self.answers: dict[int, tuple] = {}
        self.requests = itertools.count(1)
        self.seen_version = -1
        self.actor_learn_step = 0  # the learn step of the weights the actor drives with
        self.last_alive_check = 0.0
        self.job: int | None = None  # Windows: the Job Object that ends the learner with this process
        self.closed = False

    def open(self) -> dict[str, Any]:
        self.process.start()
        # Only the learner writes replies: with this process's copy of the pipe's writing end closed, a
        # reply cut by the learner's death is an EOF here, not a wait for ever.
        self.replies._writer.close()
        problem = None
        if sys.platform == "win32":
            self.job, problem = bind_to_actor(self.process.sentinel)  # the sentinel is its process handle
        reply = self._wait(lambda: self._answer_kind("opened"), START_TIMEOUT, "waiting for it to start")
        info = reply[1]
        if problem is not None:
            info["notes"].append(
                f"the learner could not be tied to this process's lifetime ({problem}): if this window is "
                "killed, the learner notices and ends itself within a second"
            )
        config = Config.from_dict(info["config"])
        self.batch_size = config.batch_size
        self.pretrain = config.demo_pretrain_steps if config.demos else 0
        self.sent = info["transitions"]
        self.mailbox = WeightsMailbox(
            info.pop("weights"), self.version, self.lock, self.weights_step, self.process.is_alive
        )
        self.actor = Actor.new(config, self.spec.seed, device="cpu")
        self.refresh_actor(force=True)
        return info

    # handing over ----------------------------------------------------------------------------------------
    def start_episode(self, frames: np.ndarray, car: np.ndarray) -> None:
        self.commands.put(("episode", frames, car))

    def add(self, *transition: Any) -> None:
        self.commands.put(("step", *transition))
        self.sent += 1

    @property
    def due(self) -> int:
        """Learn steps due for the transitions handed over so far (what inline would have run)."""
        return self.pretrain + max(0, self.sent - self.batch_size + 1)

    @property
    def lag(self) -> int:
        """Learn steps due for the transitions handed over but not run yet."""
        return self.due - int(self.learned.value)

    @property
    def policy_age(self) -> int:
        """How many learn steps older than inline's the weights the actor drives with are."""
        return max(0, self.due - self.actor_learn_step)

    def learn(self) -> list[dict[str, float]]:
        """Nothing to do here but collect what the learner did meanwhile."""
        self._drain()
        return self.take_metrics()

    def take_metrics(self) -> list[dict[str, float]]:
        metrics, self.metrics = self.metrics, []
        return metrics

    def keep_pace(self, limit: int) -> float:
        """Wait while the learner is more than `limit` learn steps behind; returns the seconds waited."""
        if self.lag <= limit:
            return 0.0
        start = time.perf_counter()
        while self.lag > limit:
            self._drain(timeout=0.002)
            if self.lag > limit and not self.process.is_alive():
                self._drain()
                raise self._died("waiting for it to catch up")
        return time.perf_counter() - start

    def refresh_actor(self, force: bool = False) -> bool:
        """Copy the learner's newest weights into the actor when there are new ones."""
        version = int(self.version.value)
        if version == self.seen_version and not force:
            return False
        try:
            self.actor_learn_step = self.mailbox.read_into(self.actor)
        except PeerGoneError:
            raise self._died("copying its weights") from None
        self.seen_version = version
        return True

    # requests ---------------------------------------------------------------------------------------------
    def sync(self, give_up: Callable[[], bool] | None = None) -> list[dict[str, float]]:
        """Wait until the learner has caught up (or `give_up()` says to stop waiting: Ctrl+C), then take
        its newest weights and the metrics of every learn step so far."""
        request = next(self.requests)
        self.commands.put(("sync", request))
        self._wait(lambda: self.answers.pop(request, None), None, "waiting for it to catch up", give_up)
        self.refresh_actor()
        return self.take_metrics()

    def save(
        self, run: dict[str, Any], periodic: bool, is_best: bool, catch_up: bool = True
    ) -> tuple[bool, str]:
        request = next(self.requests)
        self.commands.put(("save", request, run, periodic, is_best, catch_up))
        answer = self._wait(lambda: self.answers.pop(request, None), None, "waiting for a checkpoint")
        return answer[2], answer[3]

    def roll_back(self, paths: list[Path], seed: int) -> dict[str, Any] | None:
        request = next(self.requests)
        self.commands.put(("rollback", request, [str(p) for p in paths], seed))
        answer = self._wait(lambda: self.answers.pop(request, None), None, "waiting for a rollback")
        self.metrics.clear()  # learn steps before the rollback: their history was undone
        info = answer[2]
        if info is not None:
            self.sent = info["transitions"]
            self.refresh_actor(force=True)
        return info

    # the process ------------------------------------------------------------------------------------------
    def check_alive(self) -> None:
        now = time.monotonic()
        if now - self.last_alive_check < ALIVE_CHECK_SECONDS:
            return
        self.last_alive_check = now
        self._drain()
        if not self.process.is_alive():
            raise self._died("acting")

    def close(self) -> None:
        """Ask the learner to stop and wait for it; whatever interrupts the wait (a second Ctrl+C), the
        learner is killed and the queues let go, so this process can always exit."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.process.is_alive():
                with contextlib.suppress(Exception):
                    self.commands.put(("stop",))
                self.process.join(timeout=30)
        finally:
            if self.process.is_alive():
                self.process.kill()  # it ignores SIGTERM (the actor handles Ctrl+C and kills): SIGKILL
                self.process.join(timeout=5)
            for channel in (self.commands, self.replies):
                with contextlib.suppress(Exception):
                    channel.cancel_join_thread()
                    channel.close()

    def _died(self, what: str) -> LearnerDiedError:
        return LearnerDiedError(
            f"the learner process stopped (exit code {self.process.exitcode}) while the actor was {what}: "
            "the actor stops rather than drive on with a frozen policy; the last checkpoint stands "
            f"(details, if any, in {Path(self.spec.run_dir) / LEARNER_LOG})"
        )

    def _answer_kind(self, kind: str) -> tuple | None:
        return self.answers.pop(kind, None)

    def _drain(self, timeout: float | None = None) -> None:
        """Take every reply that has arrived (waiting up to `timeout` for the first)."""
        while True:
            try:
                reply = self.replies.get(timeout=timeout) if timeout else self.replies.get_nowait()
            except (queue.Empty, EOFError, OSError):  # EOF (a broken pipe on Windows): the learner has
                return  # ended, and the callers then say so
            timeout = None
            kind = reply[0]
            if kind == "metrics":
                self.metrics.append(reply[1])
            elif kind in ("saved", "rolled_back", "synced"):
                self.answers[reply[1]] = reply
            elif kind == "opened":
                self.answers["opened"] = reply
            elif kind == "error":
                raise _learner_error(reply[1], reply[2], Path(self.spec.run_dir))

    def _wait(
        self,
        answer: Callable[[], tuple | None],
        timeout: float | None,
        what: str,
        give_up: Callable[[], bool] | None = None,
    ) -> tuple | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._drain(timeout=0.05)
            found = answer()
            if found is not None:
                return found
            if give_up is not None and give_up():
                return None
            if not self.process.is_alive():
                self._drain()
                found = answer()
                if found is not None:
                    return found
                raise self._died(what)
            if deadline is not None and time.monotonic() > deadline:
                raise LearnerDiedError(
                    f"the learner process did not answer within {timeout:g} s while {what}"
                )


def _learner_error(kind: str, message: str, run_dir: Path) -> Exception:
    """The learner's exception, re-raised in the actor as the class the caller knows how to report."""
    if kind == "CheckpointError":
        return CheckpointError(message)
    if kind == "ConfigError":
        return ConfigError(message)
    if kind == "DemoError":
        return demos.DemoError(message)
    return LearnerDiedError(
        f"the learner process failed ({kind}: {message}); the last checkpoint stands (traceback in "
        f"{run_dir / LEARNER_LOG})"
    )


def make_learner(mode: str, spec: LearnerSpec) -> InlineLearner | BesideLearner:
    if mode == "inline":
        return InlineLearner(spec)
    if mode == "beside":
        return BesideLearner(spec)
    raise ValueError(f"unknown learner mode {mode!r}: use beside or inline")
