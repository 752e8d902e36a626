"""beside.py: the learner in a process beside the actor: its typed messages, its server, the actor's driver,
the liveness rules, the weights mailbox, and that both drivers are the one interface a run drives."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import signal
import sys
import threading
import time
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_config
from test_learner import GPU, SCHEDULE_WHY, hand_over, needs_gpu, spec_for, steps

import beside
from beside import (
    BesideDriver,
    EpisodeStart,
    LearnerDiedError,
    LearnerProcess,
    Metrics,
    Save,
    Saved,
    Step,
)
from checkpoints import CheckpointError, load_checkpoint
from learner import InlineDriver, LearnerDriver

ROOT = Path(__file__).resolve().parents[1]


def as_command(message: tuple) -> EpisodeStart | Step:
    """A (kind, payload) of test_learner's `steps` as the actor's driver sends it."""
    kind, *payload = message
    return EpisodeStart(*payload) if kind == "episode" else Step(*payload)


def commands(rng: np.random.Generator, count: int, episode_length: int = 25):
    return (as_command(message) for message in steps(rng, count, episode_length))


@pytest.fixture
def beside_driver(tmp_path):
    config = small_config(actor_refresh_learn_steps=2)
    learner = BesideDriver(spec_for(tmp_path, config))
    yield learner, config
    learner.close()


# --- the messages ------------------------------------------------------------------------------------------
def message_types() -> list[type]:
    return [*typing.get_args(beside.Command), *typing.get_args(beside.Reply)]


def test_every_message_is_a_frozen_dataclass_named_in_the_protocol():
    defined = [
        value
        for value in vars(beside).values()
        if isinstance(value, type) and value.__module__ == "beside" and dataclasses.is_dataclass(value)
    ]
    assert sorted(t.__name__ for t in defined) == sorted(t.__name__ for t in message_types()), (
        "every message class is a Command or a Reply"
    )
    for kind in defined:
        assert kind.__dataclass_params__.frozen, f"{kind.__name__} must be frozen"


def echo(commands_queue, replies_queue) -> None:
    """A spawned process that sends back whatever it receives, until None."""
    while (message := commands_queue.get()) is not None:
        replies_queue.put(message)


def test_every_message_crosses_a_spawned_process_and_back_unchanged():
    import torch.multiprocessing as torch_mp

    rng = np.random.default_rng(0)
    frames, frame, car = rng.integers(0, 256, (4, 64, 64), np.uint8), np.ones((64, 64), np.uint8), np.ones(3)
    samples = [
        EpisodeStart(frames, car),
        Step(3, 0.5, False, True, frame, car),
        Save(1, {"step": 7, "episode": 1}, True, False, True),
        beside.RollBack(2, ["a.pt", "b.pt"], 11),
        beside.Sync(3),
        beside.Stop(),
        beside.Opened({"config": {}, "notes": ["n"]}),
        Metrics({"loss": 0.25, "learn_step": 4.0}),
        Saved(1, True, "latest.pt"),
        beside.RolledBack(2, None),
        beside.Synced(3),
        beside.Failed("ValueError", "one line"),
    ]
    assert sorted(type(s).__name__ for s in samples) == sorted(t.__name__ for t in message_types()), (
        "a sample of every message type"
    )
    context = torch_mp.get_context("spawn")
    there, back = context.Queue(), context.Queue()
    child = context.Process(target=echo, args=(there, back), daemon=True)
    child.start()
    try:
        for sample in samples:
            there.put(sample)
            returned = back.get(timeout=60)
            assert type(returned) is type(sample)
            for field in dataclasses.fields(sample):
                ours, theirs = getattr(sample, field.name), getattr(returned, field.name)
                if isinstance(ours, np.ndarray):
                    np.testing.assert_array_equal(theirs, ours)
                else:
                    assert theirs == ours, f"{type(sample).__name__}.{field.name}"
        there.put(None)
        child.join(30)
    finally:
        if child.is_alive():
            child.kill()


def test_the_learner_process_rejects_an_unknown_message_in_one_clear_line(tmp_path, beside_driver):
    server = LearnerProcess(spec_for(tmp_path, small_config()), lambda reply: None)
    server.open()
    with pytest.raises(TypeError, match=r"the learner process got an unknown message: \('step', 1\)"):
        server.handle(("step", 1))  # the old string-dispatched tuples are not messages
    driver, _ = beside_driver
    driver.open()
    driver.commands.put(("sync", 1))
    with pytest.raises(
        LearnerDiedError, match=r"failed \(TypeError: the learner process got an unknown message"
    ):
        driver.sync()


# --- one interface for both drivers -------------------------------------------------------------------------
DRIVER_MEMBERS = {  # what a run asks of its learner (learner.LearnerDriver), whichever the mode
    "actor", "open", "close", "placement", "start_episode", "add", "learn", "sync", "pause_while_learning",
    "lag", "policy_age", "keep_pace", "refresh_actor", "check_alive", "save", "roll_back", "status_field",
    "pace_summary",
}  # fmt: skip


def test_both_drivers_are_the_one_interface_a_run_drives(tmp_path, beside_driver):
    declared = {name for name in vars(LearnerDriver) if not name.startswith("_")}
    declared |= set(LearnerDriver.__annotations__)
    assert declared == DRIVER_MEMBERS
    for driver_class in (InlineDriver, BesideDriver):
        for name in DRIVER_MEMBERS - {"actor"}:
            ours, theirs = getattr(LearnerDriver, name), getattr(driver_class, name, None)
            assert theirs is not None, f"{driver_class.__name__} has no {name}"
            if callable(ours):
                wanted = [(p.name, p.default) for p in inspect.signature(ours).parameters.values()]
                found = [(p.name, p.default) for p in inspect.signature(theirs).parameters.values()]
                assert found[: len(wanted)] == wanted, (
                    f"{driver_class.__name__}.{name}{inspect.signature(theirs)}"
                )
                assert all(
                    p.default is not p.empty
                    for p in list(inspect.signature(theirs).parameters.values())[len(wanted) :]
                )
    inline = InlineDriver(spec_for(tmp_path / "inline", small_config()))
    inline.open()
    driver, _ = beside_driver
    driver.open()
    assert isinstance(inline, LearnerDriver) and isinstance(driver, LearnerDriver)


def test_the_run_never_asks_which_driver_it_has():
    """session.py drives its learner through LearnerDriver alone: no comparison with a mode's name, no
    `.mode`; only beside.make_driver reads `--learner`."""
    tree = ast.parse((ROOT / "session.py").read_text(encoding="utf-8"))
    modes = {"beside", "inline"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(isinstance(o, ast.Constant) and o.value in modes for o in operands):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.Attribute) and node.attr == "mode":
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.MatchValue) and getattr(node.value, "value", None) in modes:
            found.append(f"line {node.lineno}: case {ast.unparse(node.value)}")
    assert not found, found


# --- the learner process ------------------------------------------------------------------------------------
def test_the_learner_announces_a_learn_step_only_once_its_weights_are_published(tmp_path):
    """An actor that sees learn step k done (the shared counter) and copies the weights must get step k's
    when k is a publishing step: in lockstep it then acts exactly as inline (issue 25)."""
    config = small_config(actor_refresh_learn_steps=3)
    server = LearnerProcess(spec_for(tmp_path, config), lambda reply: None)
    server.open()
    published: list[int] = []
    announced: list[tuple[int, int | None]] = []

    class Counter:
        def __setattr__(self, name, value):
            announced.append((value, published[-1] if published else None))

    server.publish = lambda: published.append(server.engine.agent.learn_steps)
    server.learned = Counter()
    for message in commands(np.random.default_rng(3), 40):
        server.handle(message)
        server.work()
    assert len(announced) == 40 - config.batch_size + 1
    for step, newest_published in announced:
        if step % 3 == 0:
            assert newest_published == step, f"learn step {step} announced before its weights were published"


def test_the_hard_copy_stays_at_every_1500_learn_steps_through_the_learner_process(tmp_path):
    config = small_config()
    assert config.target_network_update_frequency == 1500
    server = LearnerProcess(spec_for(tmp_path, config), lambda reply: None)
    server.open()
    published = []
    server.publish = lambda: published.append(server.engine.agent.learn_steps)
    agent = server.engine.agent
    copies = []
    previous = [p.detach().clone() for p in agent.target.parameters()]
    for message in commands(np.random.default_rng(1), 1540, episode_length=100):
        server.handle(message)
        if server.work():
            current = [p.detach() for p in agent.target.parameters()]
            if any(not torch.equal(a, b) for a, b in zip(previous, current, strict=True)):
                copies.append(agent.learn_steps)
                previous = [p.clone() for p in current]
    assert copies == [1500], f"the target changed at learn steps {copies}, not only at 1500 (seed 004)"
    k = config.actor_refresh_learn_steps
    assert published == list(range(k, agent.learn_steps + 1, k)), "the actor's weights every K learn steps"


def test_a_checkpoint_holds_the_learner_caught_up_with_every_step_before_it(tmp_path):
    config = small_config()
    replies: list[tuple] = []
    server = LearnerProcess(spec_for(tmp_path, config), replies.append)
    server.open()
    for message in commands(np.random.default_rng(2), 75):
        server.handle(message)  # nothing learned yet: the steps arrived faster than the learner
    assert server.engine.agent.learn_steps == 0
    run = {"step": 75, "episode": 3, "best_interval_reward": 0.0, "python_rng": None, "numpy_rng": None}
    server.handle(Save(7, run, periodic=False, is_best=False, catch_up=True))
    assert replies[-1].request == 7 and replies[-1].ok
    state = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert (
        state["agent"]["learn_steps"] == 75 - config.batch_size + 1 == state["step"] - config.batch_size + 1
    ), "a checkpoint's learner must have caught up with the steps it holds"
    assert state["replay"]["next_transition"] == 75


def test_an_exit_save_does_not_wait_and_the_resumed_learner_learns_the_due_steps_first(tmp_path):
    config = small_config()
    replies: list[tuple] = []
    server = LearnerProcess(spec_for(tmp_path, config), replies.append)
    server.open()
    for message in commands(np.random.default_rng(2), 75):
        server.handle(message)
    run = {"step": 75, "episode": 3, "best_interval_reward": 0.0, "python_rng": None, "numpy_rng": None}
    server.handle(
        Save(8, run, periodic=False, is_best=False, catch_up=False)
    )  # Ctrl+C: save now, learn later
    assert replies[-1].request == 8 and replies[-1].ok
    state = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert state["agent"]["learn_steps"] == 0 and state["replay"]["next_transition"] == 75
    resumed = LearnerProcess(spec_for(tmp_path, config, resume=True, require_checkpoint=True), replies.append)
    info = resumed.open()
    assert info["run"]["step"] == 75
    due = 75 - config.batch_size + 1
    owed = resumed.engine.learn_target - resumed.engine.agent.learn_steps
    assert owed == due, "the resumed learner owes exactly the learn steps the exit skipped"
    resumed.catch_up()
    assert resumed.engine.agent.learn_steps == due and not resumed.engine.behind


# --- the actor's driver -------------------------------------------------------------------------------------
def test_a_learner_beside_the_actor_keeps_the_schedule_and_shares_its_weights(beside_driver, tmp_path):
    learner, config = beside_driver
    info = learner.open()
    assert info["run"] is None and learner.process.is_alive()
    rng = np.random.default_rng(3)
    hand_over(learner, steps(rng, 300))
    assert learner.lag > 8, "300 steps handed over at once: the learner is behind"
    waited = learner.keep_pace(8)
    assert learner.lag <= 8 and waited > 0, "keep_pace must wait until the learner is within the bound"
    learner.sync()
    assert learner.lag == 0 and int(learner.learned.value) == 300 - config.batch_size + 1, SCHEDULE_WHY
    metrics = learner.learn()  # the metrics of every learn step come back, in order
    learner.refresh_actor()  # whether or not a copy was due, the actor must now hold the newest weights
    ok, path = learner.save({"step": 300, "episode": 12, "best_interval_reward": 0.0}, False, False)
    assert ok and path.endswith("latest.pt")
    state = load_checkpoint(Path(path))
    assert state["agent"]["learn_steps"] == 300 - config.batch_size + 1
    for name, value in learner.actor.agent.online.state_dict().items():
        torch.testing.assert_close(
            value,
            torch.as_tensor(state["agent"]["online"][name]),
            msg=f"the actor's {name} is not the learner's",
        )
    assert all(m["env_step"] == m["learn_step"] + config.batch_size - 1 for m in metrics)


def test_a_rollback_beside_restores_the_learner_the_actor_and_the_lag_together(beside_driver):
    learner, config = beside_driver
    learner.open()
    rng = np.random.default_rng(5)
    messages = list(steps(rng, 160, episode_length=20))

    hand_over(learner, messages[:84])  # 80 steps in 4 whole episodes of 20
    learner.sync()
    ok, path = learner.save({"step": 80, "episode": 4, "best_interval_reward": 0.0}, True, False)
    periodic = sorted(Path(path).parent.glob("ckpt_ep*_step*.pt"))
    assert ok and [p.name for p in periodic] == ["ckpt_ep0000004_step0000000080.pt"]
    path = str(periodic[0])
    saved = load_checkpoint(periodic[0])
    hand_over(learner, messages[84:])
    learner.sync()
    assert int(learner.learned.value) == 160 - config.batch_size + 1
    info = learner.roll_back([Path(path)], seed=11)
    assert info is not None and info["run"]["step"] == 80
    assert info["transitions"] == 80 and info["learn_steps"] == 80 - config.batch_size + 1
    assert learner.lag == 0, "after a rollback the lag counts from the restored learner, never negative"
    for name, value in learner.actor.agent.online.state_dict().items():
        if "noise" in name or "epsilon" in name:
            continue  # a rollback draws fresh noise on purpose
        torch.testing.assert_close(
            value,
            torch.as_tensor(saved["agent"]["online"][name]),
            msg=f"the actor's {name} was not rolled back",
        )
    hand_over(learner, steps(np.random.default_rng(6), 20, episode_length=20))
    learner.sync()
    assert int(learner.learned.value) == 100 - config.batch_size + 1, SCHEDULE_WHY


def test_ctrl_c_during_a_catch_up_stops_the_wait_and_a_later_sync_completes_it(beside_driver):
    """At an episode end the actor waits for the learner to catch up; Ctrl+C must end that wait at once (the
    exit save does not wait either), and the learn steps stay due: a later sync still runs every one."""
    learner, config = beside_driver
    learner.open()
    rng = np.random.default_rng(8)
    hand_over(learner, steps(rng, 600))
    started = time.monotonic()
    learner.sync(give_up=lambda: True)
    assert time.monotonic() - started < 2 and learner.lag > 0, "the wait did not end on request"
    # The exit save that follows is served between learn steps, not after the whole catch-up.
    ok, path = learner.save({"step": 600, "episode": 24, "best_interval_reward": 0.0}, False, False, False)
    saved = load_checkpoint(Path(path))
    assert ok and saved["agent"]["learn_steps"] < 600 - config.batch_size + 1, (
        "the exit save waited for the catch-up the actor had stopped waiting for"
    )
    assert saved["replay"]["next_transition"] == 600, "every step handed over is in the exit save"
    learner.sync()
    assert learner.lag == 0 and int(learner.learned.value) == 600 - config.batch_size + 1, SCHEDULE_WHY


def test_a_learner_process_that_dies_is_reported_in_one_line_within_seconds(beside_driver):
    learner, _ = beside_driver
    learner.open()
    os.kill(learner.process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    with pytest.raises(LearnerDiedError) as error:
        while time.monotonic() < deadline:
            learner.check_alive()
            time.sleep(0.05)
    message = str(error.value)
    assert "the learner process stopped (exit code -9)" in message and "\n" not in message
    assert "frozen policy" in message and "last checkpoint stands" in message


def test_an_actor_waiting_for_a_learner_that_died_is_told_within_seconds(beside_driver):
    """The learner killed (OOM killer, Task Manager) while the actor waits for it to catch up: keep_pace must
    notice the dead process, never wait forever for a counter that no longer moves."""
    learner, _ = beside_driver
    learner.open()
    os.kill(learner.process.pid, signal.SIGKILL)
    learner.process.join(5)
    rng = np.random.default_rng(4)
    hand_over(learner, steps(rng, 200))
    raised: list[BaseException] = []

    def wait() -> None:
        try:
            learner.keep_pace(8)
        except BaseException as error:  # noqa: BLE001 - whatever it is, the test reports it
            raised.append(error)

    waiting = threading.Thread(target=wait, daemon=True)  # a hang fails the test instead of hanging it
    waiting.start()
    waiting.join(10)
    assert not waiting.is_alive(), "keep_pace still waits for a learner that died 10 s ago"
    assert len(raised) == 1 and isinstance(raised[0], LearnerDiedError), raised
    assert "while the actor was waiting for it to catch up" in str(raised[0])


def test_a_learner_that_cannot_open_its_run_says_why_in_the_actor(tmp_path):
    config = small_config()
    learner = BesideDriver(spec_for(tmp_path, config, resume=True, require_checkpoint=True))
    try:
        with pytest.raises(
            CheckpointError, match=r"--resume: no checkpoint in .* \(drop --resume to start fresh\)"
        ):
            learner.open()
    finally:
        learner.close()
    assert not learner.process.is_alive()


def test_beside_and_inline_learn_the_same_weights_from_the_same_steps(tmp_path):
    """The learner in its own process is the inline engine: handed the same steps in the same order (one at a
    time, each learnt before the next), it ends with the same weights, bit for bit."""
    config = small_config()
    rng_steps = list(steps(np.random.default_rng(12), 60, episode_length=20))
    inline = InlineDriver(spec_for(tmp_path / "inline", config))
    inline.open()
    beside = BesideDriver(spec_for(tmp_path / "beside", config))
    try:
        beside.open()
        for message in rng_steps:
            for learner in (inline, beside):
                if message[0] == "episode":
                    learner.start_episode(*message[1:])
                else:
                    learner.add(*message[1:])
                    learner.learn()
            if message[0] == "step":
                beside.sync()
        assert inline.engine.agent.learn_steps == 60 - config.batch_size + 1 == int(beside.learned.value)
        for name, value in inline.engine.agent.online.state_dict().items():
            torch.testing.assert_close(
                beside.actor.agent.online.state_dict()[name], value, rtol=0, atol=0,
                msg=f"{name}: the learner beside the actor learnt something else from the same steps",
            )  # fmt: skip
    finally:
        beside.close()


@pytest.mark.skipif(sys.platform != "linux", reason="the kernel's parent-death signal is Linux's")
def test_a_killed_actor_takes_its_learner_with_it(tmp_path):
    import subprocess

    script = (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from beside import BesideDriver; from learner import LearnerSpec; from conftest import small_config;"
        "c = small_config();"
        "l = BesideDriver(LearnerSpec(c.to_dict(), [], sys.argv[2], False, False, 0, 'cpu', 1));"
        "l.open(); print(l.process.pid, flush=True); time.sleep(60)"
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{root / 'tests'}")
    actor = subprocess.Popen(
        [sys.executable, "-c", script, str(root), str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    learner_pid = int(actor.stdout.readline())
    actor.kill()
    actor.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(learner_pid, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{learner_pid}/stat") as stat:
            if stat.read().split()[2] == "Z":  # a zombie: dead, waiting for init to reap it
                return
        time.sleep(0.05)
    pytest.fail("the learner process outlived its actor by 10 s")


def seconds_until_gone(pid: int, limit: float) -> float | None:
    """Seconds until process `pid` has ended (a zombie counts: dead, waiting to be reaped), None if it
    still runs after `limit`."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return time.monotonic() - start
        except FileNotFoundError:
            return time.monotonic() - start
        time.sleep(0.02)
    return None


@pytest.mark.skipif(sys.platform != "linux", reason="the states are made with Linux's pipe-size control")
@pytest.mark.parametrize("state", ["learning", "catching_up", "on_the_lock", "full_pipe", "torn_message"])
def test_a_learner_without_the_death_signal_ends_within_2_s_of_its_actors_kill(tmp_path, state):
    """Issue 26: the learner's own checks end it in every state once its actor is SIGKILLed (the Linux
    death signal off, as on macOS; a 4 KiB reply pipe, smaller than Windows' 8 KiB)."""
    import subprocess

    script = Path(__file__).resolve().parent / "killable_actor.py"
    actor = subprocess.Popen(
        [sys.executable, str(script), state, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True
    )
    try:
        line = actor.stdout.readline()
        assert line, f"the actor script failed to reach {state} (exit code {actor.wait()})"
        learner_pid, learned = (int(field) for field in line.split())
        assert seconds_until_gone(learner_pid, 0) is None, f"the learner had already ended in {state}"
        actor.kill()
        actor.wait()
        took = seconds_until_gone(learner_pid, 10)
    finally:
        if actor.poll() is None:
            actor.kill()
    if took is None:
        os.kill(learner_pid, signal.SIGKILL)
    assert took is not None and took < 2.0, (
        f"{state} ({learned} learn steps done): the learner outlived its actor by "
        f"{'over 10 s' if took is None else f'{took:.2f} s'}"
    )


class FakeKernel32:
    """kernel32's Job Object calls as Windows answers them, recorded; `fail` names a call that fails."""

    def __init__(self, fail: str | None = None) -> None:
        self.fail, self.calls = fail, []

    def _answer(self, name: str, *args: object, ok: object = 1) -> object:
        self.calls.append((name, *args))
        return 0 if name == self.fail else ok

    def CreateJobObjectW(self, attributes, name):  # noqa: N802 (Windows' names)
        return self._answer("CreateJobObjectW", attributes, name, ok=0x1F0)

    def SetInformationJobObject(self, job, info_class, address, size):  # noqa: N802
        from beside import JobLimits

        flags = JobLimits.from_address(address).BasicLimitInformation.LimitFlags
        return self._answer("SetInformationJobObject", job, info_class, flags, size)

    def AssignProcessToJobObject(self, job, process):  # noqa: N802
        return self._answer("AssignProcessToJobObject", job, process)

    def CloseHandle(self, handle):  # noqa: N802
        return self._answer("CloseHandle", handle)

    def GetLastError(self):  # noqa: N802
        return 5  # ERROR_ACCESS_DENIED


def test_on_windows_the_learner_is_put_in_a_job_that_kills_it_when_the_actor_ends():
    """Issue 26: the Job Object path, against a fake kernel32 (the real one is Windows'; README says how to
    check it there by hand)."""
    import ctypes

    from beside import JobLimits, bind_to_actor

    kernel32 = FakeKernel32()
    job, problem = bind_to_actor(0xABC, kernel32)
    assert (job, problem) == (0x1F0, None)
    assert kernel32.calls == [
        ("CreateJobObjectW", None, None),
        # JobObjectExtendedLimitInformation (9), JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE, the structure's size
        ("SetInformationJobObject", 0x1F0, 9, 0x2000, ctypes.sizeof(JobLimits)),
        ("AssignProcessToJobObject", 0x1F0, 0xABC),
    ]  # the job's handle stays open: it closes, and the learner dies, when the actor's process ends
    if ctypes.sizeof(ctypes.c_void_p) == 8:
        assert ctypes.sizeof(JobLimits) == 144  # JOBOBJECT_EXTENDED_LIMIT_INFORMATION on 64-bit Windows

    create, inform, assign = "CreateJobObjectW", "SetInformationJobObject", "AssignProcessToJobObject"
    for failing, expected_calls in (
        (create, [create]),
        (inform, [create, inform, "CloseHandle"]),
        (assign, [create, inform, assign, "CloseHandle"]),
    ):
        kernel32 = FakeKernel32(fail=failing)
        assert bind_to_actor(0xABC, kernel32) == (None, f"{failing} failed (Windows error 5)")
        assert [call[0] for call in kernel32.calls] == expected_calls  # no job handle leaks


def test_an_actor_waiting_for_the_weights_lock_of_a_dead_learner_stops_in_one_line(tmp_path):
    """A learner killed while it held the weights' lock never releases it: the actor's copy stops waiting
    once the learner is gone, with the learner's death as the error, instead of blocking for ever."""
    beside = BesideDriver(spec_for(tmp_path, small_config()))
    try:
        beside.open()
        beside.lock.acquire()  # as the learner holds it while it publishes
        beside.process.kill()
        beside.process.join(timeout=10)
        beside.version.value += 1
        start = time.monotonic()
        with pytest.raises(
            LearnerDiedError, match=r"stopped \(exit code -9\) while the actor was copying its weights"
        ):
            beside.refresh_actor()
        assert time.monotonic() - start < 1.0
    finally:
        beside.close()


# --- the learner on the GPU (run where CUDA is; skipped elsewhere) ---------------------------------------
@needs_gpu
def test_on_the_gpu_the_learners_weights_reach_the_cpu_actor(tmp_path):
    config = small_config()
    beside = BesideDriver(spec_for(tmp_path, config, device=GPU))
    try:
        beside.open()
        assert next(beside.actor.agent.online.parameters()).device.type == "cpu"
        for message in steps(np.random.default_rng(4), 120):
            (beside.start_episode if message[0] == "episode" else beside.add)(*message[1:])
        beside.sync()
        assert int(beside.learned.value) == 120 - config.batch_size + 1
        run = {"step": 120, "episode": 5, "best_interval_reward": 0.0, "python_rng": None, "numpy_rng": None}
        assert beside.save(run, periodic=False, is_best=False)[0]
    finally:
        beside.close()
    learned = load_checkpoint(tmp_path / "run" / "latest.pt")["agent"]["online"]
    for name, value in beside.actor.agent.online.state_dict().items():
        torch.testing.assert_close(value, learned[name], rtol=0, atol=0, msg=name)
