"""An actor process for test_beside's kill tests: it opens a learner beside itself with the kernel's
death signal off, brings the learner into one state, prints the learner's pid and waits to be killed.

    python tests/killable_actor.py STATE RUN_DIR

STATE: learning (a long backlog being learnt), catching_up (a checkpoint request that first learns a
backlog), on_the_lock (the weights' lock held by this process), full_pipe (idle, with replies this
process never reads filling a 4 KiB pipe), torn_message (half a command written, the rest never comes).
"""

from __future__ import annotations

import fcntl
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from conftest import small_config  # noqa: E402

from beside import BesideDriver, Save  # noqa: E402
from learner import LearnerSpec  # noqa: E402

F_SETPIPE_SZ = 1031  # Linux: a pipe as small as Windows' (~8 KiB) or smaller


def hand_over(learner: BesideDriver, count: int) -> None:
    rng = np.random.default_rng(0)
    for t in range(count):
        if t % 50 == 0:
            learner.start_episode(rng.integers(0, 256, (4, 64, 64), dtype=np.uint8), np.zeros(3, np.float32))
        frame = rng.integers(0, 256, (64, 64), dtype=np.uint8)
        learner.add(int(rng.integers(11)), 0.1, False, (t + 1) % 50 == 0, frame, np.ones(3, np.float32))


def handed_over(learner: BesideDriver) -> bool:
    """Every command written and read by the learner (its pipe empty, nothing left to write)."""
    return not learner.commands._buffer and not learner.commands._reader.poll()


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            sys.exit(f"the learner never got to {what}")
        time.sleep(0.01)


def main(state: str, run_dir: str) -> None:
    spec = LearnerSpec(small_config().to_dict(), [], run_dir, False, False, 0, "cpu", 1, death_signal=False)
    learner = BesideDriver(spec)
    learner.open()
    fcntl.fcntl(learner.replies._reader.fileno(), F_SETPIPE_SZ, 4096)
    learned = learner.learned
    if state == "learning":
        hand_over(learner, 20_000)
        wait_for(lambda: learned.value > 200, "learning")
    elif state == "catching_up":
        hand_over(learner, 20_000)
        learner.commands.put(Save(1, {"step": 20_000, "episode": 400}, False, False, True))
        wait_for(lambda: handed_over(learner) and learned.value > 200, "its catch-up")
    elif state == "on_the_lock":
        learner.lock.acquire()  # this process dies holding it
        hand_over(learner, 2_000)
        before = -1
        while learned.value != before:  # the learner stops at its next publish: blocked on the lock
            before = learned.value
            time.sleep(0.5)
    elif state == "full_pipe":
        hand_over(learner, 500)
        wait_for(lambda: learned.value == learner.due and handed_over(learner), "the end of its backlog")
        time.sleep(0.3)  # its feeder thread now blocks on the full pipe; its main thread waits for data
    elif state == "torn_message":
        wait_for(lambda: handed_over(learner), "an empty pipe")
        os.write(learner.commands._writer.fileno(), struct.pack("!i", 1_000_000) + b"half a message")
        time.sleep(0.3)  # the learner now reads a message whose rest never comes
    else:
        sys.exit(f"unknown state {state!r}")
    print(learner.process.pid, learned.value, flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
