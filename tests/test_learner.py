"""learner.py: the pinned schedule through the engine, inline and in its own process, and its failures."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_config

from checkpoints import CheckpointError, load_checkpoint
from learner import (
    BesideLearner,
    InlineLearner,
    LearnerDiedError,
    LearnerServer,
    LearnerSpec,
)
from tm_config import Config

SCHEDULE_WHY = "the pinned replay ratio: one learn step per stored environment step, never ahead of the data"


def spec_for(tmp_path: Path, config: Config, **changes: object) -> LearnerSpec:
    values = dict(
        config=config.to_dict(),
        overrides=[],
        run_dir=str(tmp_path / "run"),
        resume=False,
        require_checkpoint=False,
        seed=0,
        device="cpu",
        threads=1,
    )
    values.update(changes)
    return LearnerSpec(**values)


def frames_and_car(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 256, (4, 64, 64), dtype=np.uint8), rng.random(3).astype(np.float32) * 100


def steps(rng: np.random.Generator, count: int, episode_length: int = 25):
    """(message kind, payload) of `count` environment steps in episodes of `episode_length`."""
    for t in range(count):
        if t % episode_length == 0:
            yield ("episode", *frames_and_car(rng))
        frame = rng.integers(0, 256, (64, 64), dtype=np.uint8)
        ends = (t + 1) % episode_length == 0
        yield (
            "step",
            int(rng.integers(11)),
            float(rng.random()),
            False,
            ends,
            frame,
            rng.random(3).astype(np.float32),
        )


def test_the_server_learns_one_step_per_stored_step_and_never_ahead(tmp_path):
    config = small_config()
    replies: list[tuple] = []
    server = LearnerServer(spec_for(tmp_path, config), replies.append)
    server.open()
    learner = server.learner
    stored = 0
    rng = np.random.default_rng(0)
    for message in steps(rng, 120):
        server.handle(message)
        if message[0] != "step":
            continue
        stored += 1
        server.work()
        assert learner.agent.learn_steps == max(0, stored - config.batch_size + 1), SCHEDULE_WHY
        assert not server.work(), f"learned ahead of the data at stored step {stored}: {SCHEDULE_WHY}"
    # Steps that arrive in bulk (the beside mode) are learned one per step as well, and no more.
    for message in steps(rng, 60):
        server.handle(message)
    server.catch_up()
    assert learner.agent.learn_steps == 180 - config.batch_size + 1, SCHEDULE_WHY
    metrics = [reply[1] for reply in replies if reply[0] == "metrics"]
    assert [m["learn_step"] for m in metrics] == list(range(1, 180 - config.batch_size + 2))
    assert [m["env_step"] for m in metrics] == [
        k + config.batch_size - 1 for k in range(1, len(metrics) + 1)
    ], "each learn step names the environment step it belongs to (where the inline loop runs it)"


def test_the_learner_announces_a_learn_step_only_once_its_weights_are_published(tmp_path):
    """An actor that sees learn step k done (the shared counter) and copies the weights must get step k's
    when k is a publishing step: in lockstep it then acts exactly as inline (issue 25)."""
    config = small_config(actor_refresh_learn_steps=3)
    server = LearnerServer(spec_for(tmp_path, config), lambda reply: None)
    server.open()
    published: list[int] = []
    announced: list[tuple[int, int | None]] = []

    class Counter:
        def __setattr__(self, name, value):
            announced.append((value, published[-1] if published else None))

    server.publish = lambda: published.append(server.learner.agent.learn_steps)
    server.learned = Counter()
    for message in steps(np.random.default_rng(3), 40):
        server.handle(message)
        server.work()
    assert len(announced) == 40 - config.batch_size + 1
    for step, newest_published in announced:
        if step % 3 == 0:
            assert newest_published == step, f"learn step {step} announced before its weights were published"


def test_the_hard_copy_stays_at_every_1500_learn_steps_through_the_server(tmp_path):
    config = small_config()
    assert config.target_network_update_frequency == 1500
    server = LearnerServer(spec_for(tmp_path, config), lambda reply: None)
    server.open()
    published = []
    server.publish = lambda: published.append(server.learner.agent.learn_steps)
    agent = server.learner.agent
    copies = []
    previous = [p.detach().clone() for p in agent.target.parameters()]
    for message in steps(np.random.default_rng(1), 1540, episode_length=100):
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
    server = LearnerServer(spec_for(tmp_path, config), replies.append)
    server.open()
    for message in steps(np.random.default_rng(2), 75):
        server.handle(message)  # nothing learned yet: the steps arrived faster than the learner
    assert server.learner.agent.learn_steps == 0
    run = {"step": 75, "episode": 3, "best_interval_reward": 0.0, "python_rng": None, "numpy_rng": None}
    server.handle(("save", 7, run, False, False, True))
    assert replies[-1][:3] == ("saved", 7, True)
    state = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert (
        state["agent"]["learn_steps"] == 75 - config.batch_size + 1 == state["step"] - config.batch_size + 1
    ), "a checkpoint's learner must have caught up with the steps it holds"
    assert state["replay"]["next_transition"] == 75


def test_an_exit_save_does_not_wait_and_the_resumed_learner_learns_the_due_steps_first(tmp_path):
    config = small_config()
    replies: list[tuple] = []
    server = LearnerServer(spec_for(tmp_path, config), replies.append)
    server.open()
    for message in steps(np.random.default_rng(2), 75):
        server.handle(message)
    run = {"step": 75, "episode": 3, "best_interval_reward": 0.0, "python_rng": None, "numpy_rng": None}
    server.handle(("save", 8, run, False, False, False))  # Ctrl+C: save now, learn later
    assert replies[-1][:3] == ("saved", 8, True)
    state = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert state["agent"]["learn_steps"] == 0 and state["replay"]["next_transition"] == 75
    resumed = LearnerServer(spec_for(tmp_path, config, resume=True, require_checkpoint=True), replies.append)
    info = resumed.open()
    assert info["run"]["step"] == 75
    due = 75 - config.batch_size + 1
    owed = resumed.learner.learn_target - resumed.learner.agent.learn_steps
    assert owed == due, "the resumed learner owes exactly the learn steps the exit skipped"
    resumed.catch_up()
    assert resumed.learner.agent.learn_steps == due and not resumed.learner.behind


def hand_over(learner, messages) -> None:
    """Give the learner each (kind, payload) of `steps` as the actor's loop would."""
    for message in messages:
        if message[0] == "episode":
            learner.start_episode(*message[1:])
        else:
            learner.add(*message[1:])


@pytest.fixture
def beside(tmp_path):
    config = small_config(actor_refresh_learn_steps=2)
    learner = BesideLearner(spec_for(tmp_path, config))
    yield learner, config
    learner.close()


def test_a_learner_beside_the_actor_keeps_the_schedule_and_shares_its_weights(beside, tmp_path):
    learner, config = beside
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


def test_a_rollback_beside_restores_the_learner_the_actor_and_the_lag_together(beside):
    learner, config = beside
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


def test_ctrl_c_during_a_catch_up_stops_the_wait_and_a_later_sync_completes_it(beside):
    """At an episode end the actor waits for the learner to catch up; Ctrl+C must end that wait at once (the
    exit save does not wait either), and the learn steps stay due: a later sync still runs every one."""
    learner, config = beside
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


def test_a_learner_process_that_dies_is_reported_in_one_line_within_seconds(beside):
    learner, _ = beside
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


def test_an_actor_waiting_for_a_learner_that_died_is_told_within_seconds(beside):
    """The learner killed (OOM killer, Task Manager) while the actor waits for it to catch up: keep_pace must
    notice the dead process, never wait forever for a counter that no longer moves."""
    learner, _ = beside
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
    learner = BesideLearner(spec_for(tmp_path, config, resume=True, require_checkpoint=True))
    try:
        with pytest.raises(
            CheckpointError, match=r"--resume: no checkpoint in .* \(drop --resume to start fresh\)"
        ):
            learner.open()
    finally:
        learner.close()
    assert not learner.process.is_alive()


def test_the_inline_learner_is_the_same_engine_without_a_process(tmp_path):
    config = small_config()
    learner = InlineLearner(spec_for(tmp_path, config))
    learner.open()
    assert learner.actor.agent is learner.learner.agent, "inline, the actor is the learner's own agent"
    for message in steps(np.random.default_rng(4), 40):
        if message[0] == "episode":
            learner.start_episode(*message[1:])
        else:
            learner.add(*message[1:])
            learner.learn()
    assert learner.lag == 0 and learner.learner.agent.learn_steps == 40 - config.batch_size + 1


def test_beside_and_inline_learn_the_same_weights_from_the_same_steps(tmp_path):
    """The learner in its own process is the inline engine: handed the same steps in the same order (one at a
    time, each learnt before the next), it ends with the same weights, bit for bit."""
    config = small_config()
    rng_steps = list(steps(np.random.default_rng(12), 60, episode_length=20))
    inline = InlineLearner(spec_for(tmp_path / "inline", config))
    inline.open()
    beside = BesideLearner(spec_for(tmp_path / "beside", config))
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
        assert inline.learner.agent.learn_steps == 60 - config.batch_size + 1 == int(beside.learned.value)
        for name, value in inline.learner.agent.online.state_dict().items():
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
        "from learner import BesideLearner, LearnerSpec; from conftest import small_config;"
        "c = small_config();"
        "l = BesideLearner(LearnerSpec(c.to_dict(), [], sys.argv[2], False, False, 0, 'cpu', 1));"
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
        from learner import JobLimits

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

    from learner import JobLimits, bind_to_actor

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
    beside = BesideLearner(spec_for(tmp_path, small_config()))
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


def test_demonstrations_sit_beside_the_agents_data_with_their_bonus_and_never_leave(tmp_path):
    """A learner with demonstrations: a part of its own, filled once, drawn with DQfD's bonus; pretraining
    steps first, then one learn step per environment step as ever."""
    from test_demos import episode

    from demos import DemoWriter

    writer = DemoWriter(tmp_path / "demos" / "laps", "embedded", "scripted")
    for seed in range(2):
        writer.write(episode(30, seed=seed))
    config = small_config(demos="laps", demo_pretrain_steps=10, max_buffer_size=64)
    replies: list[tuple] = []
    server = LearnerServer(spec_for(tmp_path, config, demo_root=str(tmp_path / "demos")), replies.append)
    info = server.open()
    assert "demonstrations: 2 episodes, 60 transitions from laps" in " ".join(info["notes"])
    learner = server.learner
    replay = learner.replay
    assert replay.demos.priority_epsilon == pytest.approx(
        config.priority_epsilon + config.demo_priority_bonus
    ), "a demonstration's priority carries the DQfD bonus"
    assert replay.own.priority_epsilon == config.priority_epsilon, (
        "the agent's own transitions must not get the demonstrations' bonus (issue 25)"
    )
    assert learner.learn_target == 10, "pretraining steps are due before any environment step"
    server.catch_up()
    assert learner.agent.learn_steps == 10
    pretraining = [reply[1] for reply in replies if reply[0] == "metrics"]
    assert all(m["demo_share"] == 1.0 for m in pretraining), "pretraining draws demonstrations only"
    for message in steps(np.random.default_rng(5), 300):  # the agent's 64-slot ring wraps many times
        server.handle(message)
        server.work()
    assert learner.agent.learn_steps == 10 + 300 - config.batch_size + 1, SCHEDULE_WHY
    assert len(replay.demos) == 60 and len(replay) == 64, "demonstrations are never evicted"
    replay.check_consistency()
    later = [reply[1] for reply in replies if reply[0] == "metrics"][10:]
    assert 0 < np.mean([m["demo_share"] for m in later]) < 1, "both sources are drawn"
    newest = replay.own.transitions_added - 1
    replay.own.update_priorities(np.array([newest]), np.array([0.5]))
    leaf = replay.own.tree.leaf_priorities[newest % replay.own.capacity]
    assert leaf == pytest.approx((0.5 + config.priority_epsilon) ** config.alpha), "own priority: no bonus"


# --- the learner on the GPU (run where CUDA is; skipped elsewhere) ---------------------------------------
GPU = os.environ.get("RAINBOW_TM_TEST_GPU", "cuda")  # "cpu" runs these against the CPU, to check the tests
needs_gpu = pytest.mark.skipif(
    GPU == "cuda" and not torch.cuda.is_available(),
    reason="no CUDA device here (bench/gpu_check.py on a GPU)",
)


def draw_noise_on_the_cpu(agent, seed: int) -> None:
    """Make an agent's noise and quantile fractions come from one CPU stream, whatever its device: CPU and
    CUDA generators give different numbers from one seed, and the comparison is of the arithmetic."""
    generator = torch.Generator().manual_seed(seed)

    def noise(net, _generator=None):
        for module in net.modules():
            if hasattr(module, "epsilon_in"):
                for buffer in (module.epsilon_in, module.epsilon_out):
                    x = torch.randn(buffer.shape, generator=generator)
                    buffer.copy_(torch.copysign(x.abs().sqrt(), x))

    for net in (agent.online, agent.target):
        net.reset_noise = lambda _generator=None, net=net: noise(net)
    agent._quantile_fractions = lambda rows, count: torch.rand(rows, count, generator=generator).to(
        agent.device
    )


@needs_gpu
def test_on_the_gpu_learn_steps_agree_with_the_cpus_from_the_same_state():
    """20 learn steps from the same weights, batches and draws: the losses agree within 2% and the weights
    within 1e-3 (cuDNN's TF32 convolutions round differently from the CPU's float32)."""
    from conftest import fill_replay

    from rainbow import RainbowAgent
    from replay import PrioritizedReplay

    config = small_config()
    agents = []
    for device in ("cpu", GPU):
        replay = PrioritizedReplay.from_config(config, seed=0)
        fill_replay(replay, 200, seed=0)
        agents.append(RainbowAgent(config, replay, device=device, seed=0))
        draw_noise_on_the_cpu(agents[-1], seed=1)
    cpu, gpu = agents
    gpu.online.load_state_dict(cpu.online.state_dict())
    gpu.target.load_state_dict(cpu.target.state_dict())
    for step in range(20):
        cpu_loss, gpu_loss = cpu.train()["loss"], gpu.train()["loss"]
        assert gpu_loss == pytest.approx(cpu_loss, rel=0.02, abs=1e-4), f"learn step {step}"
    for name, value in cpu.online.state_dict().items():
        torch.testing.assert_close(gpu.online.state_dict()[name].cpu(), value, rtol=1e-2, atol=1e-3, msg=name)


@needs_gpu
def test_on_the_gpu_the_learners_weights_reach_the_cpu_actor(tmp_path):
    config = small_config()
    beside = BesideLearner(spec_for(tmp_path, config, device=GPU))
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


@needs_gpu
def test_a_checkpoint_made_on_the_gpu_resumes_on_the_cpu_and_back(tmp_path):
    config = small_config()
    rng = np.random.default_rng(5)
    run = {"step": 0, "episode": 0, "best_interval_reward": 0.0, "python_rng": None, "numpy_rng": None}
    for round_, device in enumerate((GPU, "cpu", GPU)):
        learner = InlineLearner(spec_for(tmp_path, config, device=device, resume=round_ > 0))
        info = learner.open()
        assert (info["run"] or {}).get("step", 0) == run["step"], f"round {round_} on {device}"
        assert learner.learner.agent.learn_steps == max(0, run["step"] - config.batch_size + 1)
        for message in steps(rng, 50):
            if message[0] == "episode":
                learner.start_episode(*message[1:])
            else:
                learner.add(*message[1:])
                assert all(np.isfinite(m["loss"]) for m in learner.learn())
        run = {**run, "step": run["step"] + 50, "episode": run["episode"] + 2}
        assert learner.save(run, periodic=False, is_best=False)[0]
