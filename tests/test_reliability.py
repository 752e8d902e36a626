"""Reliability as a user meets it: kills mid-run and mid-write, damaged checkpoints, NaNs, a dead game."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from test_env_tm import FAST, child_env

import checkpoints
import env_tm
import environment
from checkpoints import load_checkpoint
from replay import PrioritizedReplay
from run_log import read_jsonl
from tm_config import Config
from tm_game import GameNotRespondingError

EPISODE = 20  # steps per (truncated) episode; one checkpoint per episode
# test_env_tm's small network, with a bigger replay memory: ~18 MB per checkpoint, so that writes last
# long enough to be hit by a kill.
CRASH_SETTINGS = [
    *(s for s in FAST if not s.startswith(("max_buffer_size", "ep_max_length", "log_every_steps"))),
    "max_buffer_size=4096",
    f"ep_max_length={EPISODE}",
    "log_every_steps=5",
]


def run_args(root: Path, steps: int, *extra: str, settings: list[str] = CRASH_SETTINGS) -> list[str]:
    args = ["--env", "embedded", "--steps", str(steps), "--checkpoint-root", str(root), "--run-name", "r"]
    # In-process tests patch this process: the learner must be in it (the crash tests choose beside).
    learner = [] if "--learner" in extra else ["--learner", "inline"]
    args += ["--device", "cpu", "--no-wandb", *learner, *extra]
    for assignment in settings:
        args += ["--set", assignment]
    return args


def latest_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return max((r["step"] for r in read_jsonl(path)), default=0) if path.exists() else 0


def run_starts(run_dir: Path) -> int:
    """How many processes have started training in this run folder (one "start" record each)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for r in read_jsonl(path) if r["kind"] == "run" and r.get("event") == "start")


@pytest.mark.parametrize("learner", ["beside"])  # the default; inline resumes are covered by the tests below
def test_twenty_sigkills_including_mid_write_lose_at_most_one_interval(tmp_path, learner):
    run_dir = tmp_path / "r"
    chooser = random.Random(1234)
    previous_checkpoint_step = 0
    writes_hit = 0
    for cycle in range(20):
        process = subprocess.Popen(
            # No --resume: the pinned config resumes by itself when a checkpoint exists, and the first
            # cycles (or a kill during the very first write) have none yet.
            [sys.executable, str(ROOT / "env_tm.py"), *run_args(tmp_path, 10**6, "--learner", learner)],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # Half the kills land while a checkpoint file is being written, half at a random moment of
        # training: a random step 1-3 checkpoint intervals past the last checkpoint, counted in logged steps
        # rather than seconds, so that a slow machine still makes progress (checkpoints are written inside
        # the loop, so a step logged past an episode end means that episode's checkpoint is complete).
        during_write = cycle % 2 == 0
        kill_at_step = previous_checkpoint_step + chooser.randint(EPISODE + 1, 3 * EPISODE)
        started = False
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            started = started or run_starts(run_dir) > cycle  # this process has resumed and is training
            if started:
                if during_write and list(run_dir.glob("*.tmp")):
                    writes_hit += 1
                    break
                if not during_write and latest_logged_step(run_dir) >= kill_at_step:
                    break
            time.sleep(0.001 if during_write else 0.02)
        assert process.poll() is None, f"cycle {cycle}: the run ended by itself:\n{process.stdout.read()}"
        process.kill()
        output = process.communicate()[0]

        resumed = f"from latest.pt: step {previous_checkpoint_step:,},"
        assert previous_checkpoint_step == 0 or resumed in output, f"cycle {cycle}:\n{output}"
        assert "skipped:" not in output, f"cycle {cycle}: a checkpoint was damaged by the kill:\n{output}"
        # A kill during the very first write leaves no checkpoint at all: the run restarts from step 0.
        latest = run_dir / "latest.pt"
        checkpoint = load_checkpoint(latest) if latest.exists() else {"step": 0}
        assert checkpoint["step"] >= previous_checkpoint_step, "the step counter went backwards"
        lost = latest_logged_step(run_dir) - checkpoint["step"]
        assert lost <= EPISODE, f"cycle {cycle}: {lost} steps of work lost, more than one checkpoint interval"
        previous_checkpoint_step = checkpoint["step"]

    print(f"{writes_hit} of 10 write-timed kills landed during a checkpoint write")
    assert writes_hit >= 3, f"only {writes_hit} kills landed during a checkpoint write"
    assert previous_checkpoint_step >= 10 * EPISODE
    # The replay memory that comes back is consistent, and matches the step count.
    final = load_checkpoint(run_dir / "latest.pt")
    config = Config.from_dict(final["config"])
    replay = PrioritizedReplay.from_config(config, seed=0)
    replay.load_state_dict(final["replay"])
    replay.check_consistency()
    assert len(replay) == min(final["step"], config.max_buffer_size)
    assert final["episode"] == final["step"] // EPISODE


def train_briefly(tmp_path: Path, steps: int = 3 * EPISODE) -> Path:
    assert env_tm.main(run_args(tmp_path, steps, "--fresh")) == env_tm.EXIT_OK
    return tmp_path / "r"


def test_corrupt_latest_checkpoint_falls_back_to_the_newest_good_one(tmp_path, capsys):
    run_dir = train_briefly(tmp_path)
    latest = run_dir / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # a truncated file, as a full disk would leave
    capsys.readouterr()
    assert env_tm.main(run_args(tmp_path, 4 * EPISODE, "--resume")) == env_tm.EXIT_OK
    out = capsys.readouterr().out
    assert f"skipped: checkpoint {latest} is unreadable (truncated or corrupt)" in out
    assert "falling back to the newest good checkpoint: ckpt_ep0000003_step0000000060.pt" in out
    assert load_checkpoint(latest)["step"] == 4 * EPISODE


def test_checkpoint_of_an_incompatible_config_is_refused_in_one_line(tmp_path, capsys):
    train_briefly(tmp_path)
    capsys.readouterr()
    settings = [s for s in CRASH_SETTINGS if not s.startswith("hidden_dim")] + ["hidden_dim=16"]
    code = env_tm.main(run_args(tmp_path, 4 * EPISODE, "--resume", settings=settings))
    err = capsys.readouterr().err.strip()
    assert code == env_tm.EXIT_ERROR and "\n" not in err
    assert "incompatible config: hidden_dim=8 (run: 16)" in err and "(use --fresh to start over)" in err


def test_resuming_with_other_previous_actions_is_refused_in_one_line(tmp_path, capsys):
    train_briefly(tmp_path)
    capsys.readouterr()
    settings = [*CRASH_SETTINGS, "previous_actions=2"]
    code = env_tm.main(run_args(tmp_path, 4 * EPISODE, "--resume", settings=settings))
    err = capsys.readouterr().err.strip()
    assert code == env_tm.EXIT_ERROR and "\n" not in err
    assert "incompatible config: previous_actions=0 (run: 2)" in err


def test_unwritable_checkpoint_folder_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    code = env_tm.main(run_args(blocker, 10, "--fresh"))
    err = capsys.readouterr().err.strip()
    assert code == env_tm.EXIT_ERROR and "\n" not in err
    assert err.startswith("error: checkpoint folder") and "is not writable" in err


def test_full_disk_fails_before_training(tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("checkpoints.shutil.disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    code = env_tm.main(run_args(tmp_path, 10, "--fresh"))
    err = capsys.readouterr().err.strip()
    assert code == env_tm.EXIT_ERROR and "not enough free disk space" in err and "\n" not in err
    assert not list((tmp_path / "r").glob("*.pt")), "nothing was trained or written"


class NaNRewards:
    """The embedded track, but every reward is NaN (a broken reward function)."""

    def __init__(self, env):
        self.env = env

    def reset(self, **kwargs):
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, _, terminated, truncated, info = self.env.step(action)
        return obs, float("nan"), terminated, truncated, info

    def close(self):
        self.env.close()


def test_a_non_finite_reward_from_the_environment_is_named(tmp_path, capsys, monkeypatch):
    real_build = environment.build_environment
    monkeypatch.setattr(environment, "build_environment", lambda *a: NaNRewards(real_build(*a)))
    code = env_tm.main(run_args(tmp_path, 50, "--fresh"))
    err = capsys.readouterr().err.strip()
    assert code == env_tm.EXIT_ERROR
    assert err == "error: the environment returned a non-finite reward (nan) at step 0"


def test_consecutive_non_finite_learn_steps_stop_the_run_with_a_clear_message(tmp_path, capsys, monkeypatch):
    real_sample = PrioritizedReplay.sample

    def poisoned_sample(self, batch_size):  # every batch carries a NaN: every learn step is non-finite
        batch = real_sample(self, batch_size)
        batch["reward"][0] = np.nan
        return batch

    monkeypatch.setattr(PrioritizedReplay, "sample", poisoned_sample)
    settings = CRASH_SETTINGS + ["max_consecutive_nonfinite_steps=5"]
    code = env_tm.main(run_args(tmp_path, 200, "--fresh", settings=settings))
    err = capsys.readouterr().err.strip()
    assert code == env_tm.EXIT_ERROR and "\n" not in err
    assert "5 learn steps in a row had a non-finite loss or gradient" in err
    events = [r for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if r["kind"] == "event"]
    skipped = [e for e in events if e["level"] == "warning"]
    assert [e["name"] for e in skipped] == ["nonfinite_step_skipped"] * 5
    assert skipped[0]["step"] == 4, "the first learn step (4 transitions stored) was already skipped"
    flags = [e for e in events if e["level"] == "red_flag"]
    assert [f["name"] for f in flags] == ["nonfinite_loss"], "the health monitor flags it once, not 5 times"


class DyingGame:
    """An env whose game stops answering after a few steps, as trackmania.TrackManiaEnv reports it."""

    def __init__(self, env, steps_before_death: int):
        self.env, self.remaining = env, steps_before_death

    def reset(self, **kwargs):
        return self.env.reset(**kwargs)

    def step(self, action):
        self.remaining -= 1
        if self.remaining < 0:
            raise GameNotRespondingError(
                "the game did not answer step() within 10 s: check that TrackMania is running, its window "
                "is visible and the OpenPlanet plugin 'TMRL Grab Data' is loaded"
            )
        return self.env.step(action)

    def close(self):
        self.env.close()


def test_a_game_that_stops_answering_ends_with_advice_after_saving(tmp_path, capsys, monkeypatch):
    real_build = environment.build_environment
    monkeypatch.setattr(environment, "build_environment", lambda *a: DyingGame(real_build(*a), 30))
    code = env_tm.main(run_args(tmp_path, 200, "--fresh"))
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == env_tm.EXIT_GAME and "\n" not in err
    assert "OpenPlanet plugin 'TMRL Grab Data'" in err
    saved = load_checkpoint(tmp_path / "r" / "latest.pt")
    assert saved["step"] == 30, "the work up to the failure was saved"
    assert f"the game stopped answering at step 30: saved {tmp_path / 'r' / 'latest.pt'}" in captured.out


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_nonpositive_steps_is_a_usage_error(steps, capsys):
    with pytest.raises(SystemExit) as exit_info:
        env_tm.parse_args(["--steps", steps])
    assert exit_info.value.code == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_wrong_observation_from_the_env_is_named(tmp_path, capsys, monkeypatch):
    class SmallFrames:
        def __init__(self, env):
            self.env = env

        def reset(self, **kwargs):
            obs, info = self.env.reset(**kwargs)
            return (*obs[:3], np.asarray(obs[3])[:1], *obs[4:]), info

        def close(self):
            self.env.close()

    real_build = environment.build_environment
    monkeypatch.setattr(environment, "build_environment", lambda *a: SmallFrames(real_build(*a)))
    code = env_tm.main(run_args(tmp_path, 10, "--fresh"))
    err = capsys.readouterr().err.strip()
    assert code == env_tm.EXIT_ERROR
    assert err == "error: observation images have shape (1, 64, 64), expected (4, 64, 64)"


def test_a_failed_checkpoint_write_is_reported_and_training_goes_on(tmp_path, capsys, monkeypatch):
    real_save = checkpoints.atomic_torch_save
    calls = {"n": 0}

    def flaky_save(state, path):
        calls["n"] += 1
        if calls["n"] == 2:  # the second periodic checkpoint hits a full disk
            raise OSError(28, "No space left on device")
        real_save(state, path)

    monkeypatch.setattr(checkpoints, "atomic_torch_save", flaky_save)
    assert env_tm.main(run_args(tmp_path, 4 * EPISODE, "--fresh")) == env_tm.EXIT_OK
    out = capsys.readouterr().out
    assert (
        f"checkpoint at step 40 failed: the drive holding {tmp_path / 'r'} is full (No space left on device, "
        "ENOSPC); free disk space or choose another checkpoint folder (--checkpoint-root); the previous one "
        "is intact"
    ) in out
    events = [r for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if r.get("name") == "checkpoint_failed"]
    assert [e["step"] for e in events] == [40]
    assert load_checkpoint(tmp_path / "r" / "latest.pt")["step"] == 4 * EPISODE


def test_checkpoints_that_keep_failing_stop_the_run_in_one_line(tmp_path, capsys, monkeypatch):
    def full_disk(state, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "atomic_torch_save", full_disk)
    code = env_tm.main(run_args(tmp_path, 10 * EPISODE, "--fresh"))
    err = capsys.readouterr().err.strip()
    assert code == env_tm.EXIT_ERROR and "\n" not in err
    assert "3 checkpoints in a row could not be written" in err and "No space left on device" in err


def test_a_checkpoint_that_reads_but_cannot_be_restored_falls_back(tmp_path, capsys):
    run_dir = train_briefly(tmp_path)
    state = load_checkpoint(run_dir / "latest.pt")
    state["replay"]["tree"] = np.full_like(state["replay"]["tree"], 7.0)  # a sum tree that does not add up
    stored = {"format_version": checkpoints.FORMAT_VERSION, **checkpoints.to_storable(state)}
    checkpoints.atomic_torch_save(stored, run_dir / "latest.pt")
    capsys.readouterr()
    assert env_tm.main(run_args(tmp_path, 4 * EPISODE)) == env_tm.EXIT_OK
    out = capsys.readouterr().out
    assert f"skipped: checkpoint {run_dir / 'latest.pt'} cannot be restored" in out
    assert "falling back to the newest good checkpoint: ckpt_ep0000003_step0000000060.pt" in out


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signal delivery to a child process")
@pytest.mark.parametrize("learner", ["beside", "inline"])
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])  # Ctrl+C; `kill` or a shutdown
def test_a_stop_request_ends_at_a_step_boundary_and_saves(tmp_path, signal_name, learner):
    import signal

    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "env_tm.py"),
            *run_args(tmp_path, 10**6, "--fresh", "--learner", learner),
        ],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal gives a program
    )
    deadline = time.monotonic() + 120
    while latest_logged_step(tmp_path / "r") < 2 * EPISODE and time.monotonic() < deadline:
        time.sleep(0.05)
    if signal_name == "SIGINT":  # Ctrl+C on a terminal reaches every process of the group, learner too
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == env_tm.EXIT_INTERRUPTED, output
    assert "Traceback" not in output
    stopped = [line for line in output.splitlines() if line.startswith("stopped at step")]
    assert len(stopped) == 1 and "(on request): saved" in stopped[0], output
    step = int(stopped[0].split()[3].rstrip(":").replace(",", ""))
    saved = load_checkpoint(tmp_path / "r" / "latest.pt")
    assert saved["step"] == step
    replay = PrioritizedReplay.from_config(Config.from_dict(saved["config"]), seed=0)
    replay.load_state_dict(saved["replay"])
    replay.check_consistency()


@pytest.mark.skipif(sys.platform != "linux", reason="finds the learner through /proc")
def test_a_learner_that_dies_stops_the_run_in_one_line_within_seconds(tmp_path):
    import signal

    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "env_tm.py"),
            *run_args(tmp_path, 10**6, "--fresh", "--learner", "beside"),
        ],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while latest_logged_step(tmp_path / "r") < 2 * EPISODE and time.monotonic() < deadline:
        time.sleep(0.05)
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    learner = next(int(pid) for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text())
    os.kill(learner, signal.SIGKILL)
    killed = time.monotonic()
    out, err = process.communicate(timeout=60)
    assert time.monotonic() - killed < 10, "detected within seconds"
    assert process.returncode == env_tm.EXIT_ERROR
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "the learner process stopped (exit code -9)" in lines[0], err
    assert "frozen policy" in lines[0] and "Traceback" not in out + err
    # The death is on record for whoever reads the run's metrics (issue 24).
    last = read_jsonl(tmp_path / "r" / "metrics.jsonl")[-1]
    assert last["kind"] == "run" and last["event"] == "error" and last["error"] == "LearnerDiedError"
    assert "the learner process stopped (exit code -9)" in last["message"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signal delivery to a child process")
def test_ctrl_c_while_starting_is_one_line(tmp_path):
    import signal

    process = subprocess.Popen(
        [sys.executable, str(ROOT / "env_tm.py"), *run_args(tmp_path, 10**6, "--fresh")],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # Ctrl+C as a terminal delivers it, whatever launched the tests: a shell's background job starts
        # with SIGINT ignored, and Python then installs no KeyboardInterrupt for it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(0.3)  # importing torch and the training modules
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == env_tm.EXIT_INTERRUPTED, out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted (Ctrl+C): stopped at once."), err
    assert "Traceback" not in out + err


def test_a_second_ctrl_c_while_shutting_down_ends_without_a_traceback(tmp_path):
    """Issue 27: a second Ctrl+C while the run shuts down (waiting for its learner to stop, after "saved")
    printed a traceback from learner.py. Here the wait raises KeyboardInterrupt, as that Ctrl+C does."""
    script = (
        "import runpy, sys; import beside\n"
        "real_close = beside.BesideDriver.close\n"
        "def interrupted(self):\n"
        "    def join(timeout=None):\n"
        "        raise KeyboardInterrupt\n"
        "    self.process.join, wait = join, self.process.join\n"
        "    try:\n"
        "        real_close(self)\n"
        "    finally:\n"
        "        self.process.join = wait\n"
        "beside.BesideDriver.close = interrupted\n"
        f"sys.argv = ['env_tm.py', *{run_args(tmp_path, 45, '--fresh', '--learner', 'beside')!r}]\n"
        "runpy.run_path('env_tm.py', run_name='__main__')\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script], env=child_env(), capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert child.returncode == env_tm.EXIT_INTERRUPTED, child.stdout[-2000:] + child.stderr[-2000:]
    assert "done: 45 steps" in child.stdout and "saved" in child.stdout  # the run had saved, then Ctrl+C
    lines = [line for line in child.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted (Ctrl+C): stopped at once."), child.stderr
    assert "Traceback" not in child.stdout + child.stderr
