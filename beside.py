"""The learner beside the actor: everything that exists only for the engine's own process, top to bottom.

`python env_tm.py` runs the learning engine (learner.py) in a process of its own, spawned (so it works on
Windows), at a lower OS priority than the actor. The actor only acts, steps the environment and hands each
transition over through a queue; it copies the engine's weights every `actor_refresh_learn_steps` learn
steps from shared memory (the `WeightsMailbox`), with the learn step they come from, so that the loop knows
how many learn steps older than inline's its policy is (`policy_age`). The learner announces a learn step
only after publishing its weights: in lockstep (`simulator_max_lag=0`, weights after every step) the actor
then acts exactly as inline does, bit for bit. The actor draws only from the agent's acting streams and the
learner only from its learning one (rainbow.py: one seed, independent streams).

In reading order:
1. the messages: small frozen dataclasses, the actor's commands (`EpisodeStart`, `Step`, `Save`, `RollBack`,
   `Sync`, `Stop`) over one queue and the learner's replies (`Opened`, `Metrics`, `Saved`, `RolledBack`,
   `Synced`, `Failed`) over another, each handled by a `match` on its type;
2. the liveness rules: either process notices the other's death within PEER_CHECK_SECONDS (the actor's
   checks every ALIVE_CHECK_SECONDS), and the operating system ends the learner with its actor where it can
   (Linux's parent-death signal, a Windows Job Object);
3. the weights mailbox: the online net's weights in shared memory, versioned and locked;
4. the learner process: `LearnerProcess` serves the commands in order between learn steps, `serve` is the
   process's main loop;
5. the actor's side: `BesideDriver`, the `learner.LearnerDriver` that a run drives.
One concept, kept whole (about 800 lines, most of them the liveness rules): both ends of every message and
every rule about the other process's death read in one file.
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import demos
from checkpoints import CheckpointError
from learner import (
    ActingPolicy,
    CheckpointedEngine,
    InlineDriver,
    LearnerDriver,
    LearnerSpec,
    LearningEngine,
    all_cores_but_one,
)
from rainbow import RainbowAgent
from tm_config import Config, ConfigError

LEARNER_LOG = "learner.log"  # in the run folder: the traceback of a learner process that failed
START_TIMEOUT = 180.0  # seconds for a spawned learner to import torch and open (or resume) its run
ALIVE_CHECK_SECONDS = 0.5  # how often the actor checks that the learner process still runs
PEER_CHECK_SECONDS = 0.2  # how often a wait or a learning learner checks that the other process still runs


class PeerGoneError(Exception):
    """The process on the other side (the actor, seen from the learner, or the reverse) has died."""


class LearnerDiedError(RuntimeError):
    """The learner process stopped or failed; the message is one line."""


# --- 1. the messages --------------------------------------------------------------------------------------
# From the actor, in the order it sends them; `request` numbers the ones that are answered.
@dataclass(frozen=True)
class EpisodeStart:
    """The reset observation of a new episode."""

    frames: np.ndarray
    car: np.ndarray


@dataclass(frozen=True)
class Step:
    """One environment step: the transition and the newest frame and car floats of the next observation."""

    action: int
    reward: float
    terminated: bool
    truncated: bool
    frame: np.ndarray
    car: np.ndarray


@dataclass(frozen=True)
class Save:
    """A checkpoint with `run`'s counters, after the learner caught up (unless `catch_up` is off: the run is
    leaving, and the due learn steps are done when it resumes)."""

    request: int
    run: dict[str, Any]
    periodic: bool
    is_best: bool
    catch_up: bool


@dataclass(frozen=True)
class RollBack:
    """Restore the newest good of `paths`, then draw fresh learning streams from `seed`."""

    request: int
    paths: list[str]
    seed: int


@dataclass(frozen=True)
class Sync:
    """Learn until caught up with every step sent before, then answer."""

    request: int


@dataclass(frozen=True)
class Stop:
    """End the learner process."""


# From the learner.
@dataclass(frozen=True)
class Opened:
    """The run is open: CheckpointedEngine.open's info, with the mailbox's shared tensors."""

    info: dict[str, Any]


@dataclass(frozen=True)
class Metrics:
    """One learn step's metrics, in learn-step order."""

    metrics: dict[str, float]


@dataclass(frozen=True)
class Saved:
    request: int
    ok: bool
    text: str  # the checkpoint's path, or why it failed (one line)


@dataclass(frozen=True)
class RolledBack:
    request: int
    info: dict[str, Any] | None  # None: no checkpoint restored


@dataclass(frozen=True)
class Synced:
    request: int


@dataclass(frozen=True)
class Failed:
    """The learner process failed: the exception's class name and its message in one line."""

    kind: str
    message: str


Command = EpisodeStart | Step | Save | RollBack | Sync | Stop
Reply = Opened | Metrics | Saved | RolledBack | Synced | Failed


# --- 2. the liveness rules ------------------------------------------------------------------------------
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


# --- 3. the weights mailbox ------------------------------------------------------------------------------
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

    def read_into(self, actor: ActingPolicy) -> int:
        """Copy the weights into the actor's net; returns the learn step they come from."""
        pairs = self._pairs(actor.agent.online, outgoing=False)
        with self._locked(), torch.no_grad():
            for destination, source in pairs:
                destination.copy_(source)
            return int(self.learn_step.value)


# --- 4. the learner process ---------------------------------------------------------------------------------
class LearnerProcess:
    """The learner process's server: opens the run's engine (new or resumed), then serves the actor's
    commands in order and learns whatever is due between them. `reply` sends a reply to the actor."""

    def __init__(
        self,
        spec: LearnerSpec,
        reply: Callable[[Reply], None],
        actor_alive: Callable[[], bool] | None = None,  # None: no actor to watch (a test)
    ) -> None:
        self.checkpointed = CheckpointedEngine(spec)
        self.reply = reply
        self.actor_alive = actor_alive
        self.last_actor_check = 0.0
        self.publish: Callable[[], None] | None = None  # share the weights (serve sets it: the mailbox)
        self.learned: Any = None  # the shared counter of learn steps, updated before replies (serve sets it)
        # A sync is answered by the serve loop once the learner has caught up, so that commands sent after
        # it (an exit save that must not wait) are served between learn steps.
        self.pending_syncs: list[int] = []

    @property
    def engine(self) -> LearningEngine:
        return self.checkpointed.engine

    def open(self) -> dict[str, Any]:
        return self.checkpointed.open()

    def handle(self, message: Command) -> bool:
        """Serve one command; returns False on Stop."""
        engine = self.engine
        match message:
            case Step():
                engine.replay.add(
                    message.action, message.reward, message.terminated, message.truncated, message.frame,
                    message.car,
                )  # fmt: skip
            case EpisodeStart():
                engine.replay.start_episode(message.frames, message.car)
            case Save():
                if message.catch_up:  # else the run is leaving: the due learn steps are done when it resumes
                    self.catch_up()
                ok, text = self.checkpointed.save(message.run, message.periodic, message.is_best)
                self.reply(Saved(message.request, ok, text))
            case RollBack():
                info = self.roll_back([Path(p) for p in message.paths], message.seed)
                self.reply(RolledBack(message.request, info))
            case Sync():
                self.pending_syncs.append(message.request)
            case Stop():
                return False
            case _:
                raise TypeError(f"the learner process got an unknown message: {message!r:.200}")
        return True

    def roll_back(self, paths: list[Path], seed: int) -> dict[str, Any] | None:
        info = self.checkpointed.roll_back(paths, seed)
        if info is None:
            return None
        if self.learned is not None:  # before the reply: the actor's lag counts from the restored step
            self.learned.value = self.engine.agent.learn_steps
        if self.publish is not None:
            self.publish()
        return info

    def answer_syncs(self) -> None:
        """Tell the actor it has caught up, with the weights of this very moment (it then acts or is
        evaluated with them)."""
        if self.pending_syncs and self.publish is not None:
            self.publish()
        for request in self.pending_syncs:
            self.reply(Synced(request))
        self.pending_syncs.clear()

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
        engine = self.engine
        if not engine.behind:
            return False
        self.check_actor()
        metrics = engine.learn()
        refresh_every = engine.config.actor_refresh_learn_steps  # the run's, resumed or not
        if self.publish is not None and engine.agent.learn_steps % refresh_every == 0:
            self.publish()
        if self.learned is not None:  # after the weights: an actor that sees this step can also read them
            self.learned.value = engine.agent.learn_steps
        self.reply(Metrics(metrics))
        return True

    def catch_up(self) -> None:
        while self.work():
            pass


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

    server = LearnerProcess(spec, replies.put, actor_alive)
    try:
        info = server.open()
        mailbox = WeightsMailbox.of(server.engine.agent, version, lock, weights_step, actor_alive)
        server.publish = lambda: mailbox.write(server.engine.agent)
        server.learned = learned
        learned.value = server.engine.agent.learn_steps
        replies.put(Opened({**info, "weights": mailbox.tensors}))
        while True:
            try:  # everything that has arrived, in order
                while True:
                    if not server.handle(commands.get_nowait()):
                        return
            except queue.Empty:
                pass
            if server.work():
                continue
            server.answer_syncs()  # caught up with everything before them
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
        replies.put(Failed(type(error).__name__, text))
        time.sleep(0.5)  # let the queue's feeder thread deliver the reply before the process ends
        replies.cancel_join_thread()  # and never block the exit on it: an actor that reads has it by now


# --- 5. the actor's side -----------------------------------------------------------------------------------
class BesideDriver:
    """The `learner.LearnerDriver` of an engine in a process beside the actor (module docstring). Commands go
    over one queue, metrics and answers come back over another, the weights through a `WeightsMailbox`."""

    def __init__(self, spec: LearnerSpec) -> None:
        import torch.multiprocessing as torch_mp

        # The learner's threads: all cores but one unless given, the one left being the actor's.
        self.spec = spec = replace(spec, threads=spec.threads or all_cores_but_one())
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
        self.answers: dict[int, Saved | RolledBack | Synced] = {}  # by request
        self.opened: Opened | None = None
        self.requests = itertools.count(1)
        self.seen_version = -1
        self.actor_learn_step = 0  # the learn step of the weights the actor drives with
        self.last_alive_check = 0.0
        self.job: int | None = None  # Windows: the Job Object that ends the learner with this process
        self.closed = False

    def open(self) -> dict[str, Any]:
        torch.set_num_threads(1)  # the actor: one action at a time, the other cores are the learner's
        self.process.start()
        # Only the learner writes replies: with this process's copy of the pipe's writing end closed, a
        # reply cut by the learner's death is an EOF here, not a wait for ever.
        self.replies._writer.close()
        problem = None
        if sys.platform == "win32":
            self.job, problem = bind_to_actor(self.process.sentinel)  # the sentinel is its process handle
        reply = self._wait(lambda: self.opened, START_TIMEOUT, "waiting for it to start")
        info = reply.info
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
        self.actor = ActingPolicy.new(config, self.spec.seed, device="cpu")
        self.refresh_actor(force=True)
        return info

    def placement(self) -> tuple[str, int]:
        return "learner beside the actor", self.spec.threads

    # handing over ----------------------------------------------------------------------------------------
    def start_episode(self, frames: np.ndarray, car: np.ndarray) -> None:
        self.commands.put(EpisodeStart(frames, car))

    def add(
        self,
        action: int,
        reward: float,
        terminated: bool,
        truncated: bool,
        frame: np.ndarray,
        car: np.ndarray,
    ) -> None:
        self.commands.put(Step(action, reward, terminated, truncated, frame, car))
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

    def pause_while_learning(self) -> None:
        time.sleep(0.05)  # the learner learns in its own process: let it

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
        self.commands.put(Sync(request))
        self._wait(lambda: self.answers.pop(request, None), None, "waiting for it to catch up", give_up)
        self.refresh_actor()
        return self.take_metrics()

    def save(
        self, run: dict[str, Any], periodic: bool, is_best: bool, catch_up: bool = True
    ) -> tuple[bool, str]:
        request = next(self.requests)
        self.commands.put(Save(request, run, periodic, is_best, catch_up))
        answer = self._wait(lambda: self.answers.pop(request, None), None, "waiting for a checkpoint")
        return answer.ok, answer.text

    def roll_back(self, paths: list[Path], seed: int) -> dict[str, Any] | None:
        request = next(self.requests)
        self.commands.put(RollBack(request, [str(p) for p in paths], seed))
        answer = self._wait(lambda: self.answers.pop(request, None), None, "waiting for a rollback")
        self.metrics.clear()  # learn steps before the rollback: their history was undone
        info = answer.info
        if info is not None:
            self.sent = info["transitions"]
            self.refresh_actor(force=True)
        return info

    # what the run shows of it ---------------------------------------------------------------------------
    def status_field(self) -> str | None:
        return f"lag {self.lag}"

    def pace_summary(self, lag_max: int, waited: float) -> str | None:
        return (
            f"learner beside the actor: at most {lag_max:,} learn steps behind mid-episode, "
            f"{waited:.1f} s of waiting for it mid-episode"
        )

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
                    self.commands.put(Stop())
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

    def _drain(self, timeout: float | None = None) -> None:
        """Take every reply that has arrived (waiting up to `timeout` for the first)."""
        while True:
            try:
                reply = self.replies.get(timeout=timeout) if timeout else self.replies.get_nowait()
            except (queue.Empty, EOFError, OSError):  # EOF (a broken pipe on Windows): the learner has
                return  # ended, and the callers then say so
            timeout = None
            match reply:
                case Metrics():
                    self.metrics.append(reply.metrics)
                case Saved() | RolledBack() | Synced():
                    self.answers[reply.request] = reply
                case Opened():
                    self.opened = reply
                case Failed():
                    raise _learner_error(reply.kind, reply.message, Path(self.spec.run_dir))
                case _:
                    raise TypeError(f"an unknown reply from the learner process: {reply!r:.200}")

    def _wait(
        self,
        answer: Callable[[], Reply | None],
        timeout: float | None,
        what: str,
        give_up: Callable[[], bool] | None = None,
    ) -> Any:
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


def make_driver(mode: str, spec: LearnerSpec) -> LearnerDriver:
    """The driver of `--learner MODE` (the one place that reads the mode's name)."""
    if mode == "inline":
        return InlineDriver(spec)
    if mode == "beside":
        return BesideDriver(spec)
    raise ValueError(f"unknown learner mode {mode!r}: use beside or inline")
