"""env_tm.py against the fake game, in this process: tmrl's real interface and rtgym's real timing, with the
game, its window and its controls replaced by the fakes of fake_openplanet.py.

    HOME=<folder with TmrlData> python tests/fake_game.py '{"drive": 20}' -- --steps 400 --run-name x ...

HOME (and USERPROFILE) must hold a TmrlData folder (fake_openplanet.write_tmrl_data). The JSON picks the game:
    drive          the car's speed in m/s along the straight 100 m trajectory (0: it stands still)
    spawn          [x, y, z] where a respawn puts the car (far from the trajectory: the wrong map)
    fault          null, "nan", "slip", "12_floats", "freeze", "crash" or "finish_now" (garbage, a dead
                   game), or the plausible lies: "finish_stuck" (the finish flag stays 1),
                   "telemetry_frozen" (the plugin repeats one frame while the car and the picture go on),
                   "pause" (the game pauses: car, telemetry and picture stop), "teleport" (95 m forward for
                   0.3 s), "resize" (the window becomes 1280x720), at env step `fault_at`
    fault_episode  count `fault_at` from the start of this episode (1: the first) instead of the run's
    frame_interval seconds between the plugin's frames (default 0.005; 0.1 is a plugin sending at 10 Hz)
    slow_learn     seconds each learn step sleeps (inline learner): an agent too slow for 20 Hz
    step_timeout   seconds before a silent game is reported (the watchdog; default 2 here)
    game_process   true: the telemetry server runs in a process of its own, as the real game does, so its
                   200 frames per second cost this process only their reception (no faults then)
The exit code is env_tm.main's. Tests and benchmarks run it as a child process (`run_on_fake_game`).
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from fake_openplanet import ControlRecorder, FakeOpenPlanet, FakeScreen, install_fake_game  # noqa: E402

import env_tm  # noqa: E402
import environment  # noqa: E402
import tm_game  # noqa: E402
import tm_setup  # noqa: E402
import trackmania  # noqa: E402

TRACK_LENGTH = 100.0  # write_tmrl_data's trajectory: 100 m along x
# A small network, a small replay, a checkpoint at every episode: runs that take seconds.
SMALL_RUN = [
    "conv_channels_1=4", "conv_channels_2=4", "car_feature_hidden_dim=16", "cosine_dim=8", "hidden_dim=8",
    "batch_size=4", "max_buffer_size=512", "checkpoint_frequency=1", "log_every_steps=10",
]  # fmt: skip


def run_on_fake_game(
    folder: Path, options: dict[str, Any], steps: int, *extra: str, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`env_tm.py --env trackmania` on the fake game `options` pick, in a child process, with SMALL_RUN and
    the learner inline: HOME is `folder`/home (it must hold TmrlData), the run is `folder`/runs/tm."""
    home = folder / "home"
    env = {**os.environ, "HOME": str(home), "USERPROFILE": str(home), "WANDB_MODE": "offline"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE)])
    args = [sys.executable, str(HERE / "fake_game.py"), json.dumps(options), "--", "--env", "trackmania"]
    args += ["--steps", str(steps), "--checkpoint-root", str(folder / "runs"), "--run-name", "tm"]
    args += ["--no-wandb", "--learner", "inline", *extra, *sum((["--set", s] for s in SMALL_RUN), [])]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=folder)


def main() -> int:
    options = json.loads(sys.argv[1])
    argv = sys.argv[sys.argv.index("--") + 1 :]
    patch = pytest.MonkeyPatch()
    spawn = tuple(options.get("spawn", (0.0, 0.0, 0.0)))
    frame_interval, drive = float(options.get("frame_interval", 0.005)), float(options.get("drive", 0.0))
    if options.get("game_process"):
        if options.get("fault"):
            raise ValueError("faults need the game in this process (leave game_process out)")
        game = GameInAnotherProcess(spawn, frame_interval, drive)
    else:
        game = FakeOpenPlanet(spawn=spawn, frame_interval=frame_interval)
        if drive:
            game.drive(drive, TRACK_LENGTH)
    # The camera follows the car's true position (a game in another process: the picture moves anyway).
    follow = None if options.get("game_process") else (lambda: game.state["x"])
    screen, recorder = FakeScreen(follow=follow), ControlRecorder(on_respawn=game.respawn)
    patch.setattr(tm_setup, "OPENPLANET_PORT", game.port)
    fault, fault_at = options.get("fault"), int(options.get("fault_at", 10**9))
    faults = {"game": game, "screen": screen}
    timing: dict[str, float] = {}  # when the fault started and the env raised (bench/fault_detection.py)
    real_make = trackmania.make_trackmania_env

    def make(config, **kwargs):
        # The fake game answers in milliseconds: a short step watchdog, whatever the run's runtime gives.
        kwargs["step_timeout"] = float(options.get("step_timeout", 2.0))
        env = real_make(config, allow_non_windows=True, **kwargs)
        install_fake_game(patch, game.port, screen, recorder)
        real_step, real_reset, steps, episodes = env.step, env.reset, [0], [0]
        fault_episode = options.get("fault_episode")  # counts steps from that episode's start

        def timed(call, *args, **kwargs):
            """`call`, noting when (and at which step and episode) the env first raised."""
            try:
                return call(*args, **kwargs)
            except tm_game.TrackManiaError:
                if "error_time" not in timing:
                    timing.update(error_step=steps[0], error_episode=episodes[0], error_time=time.monotonic())
                raise

        def reset(**kwargs):
            episodes[0] += 1
            if fault_episode is not None:
                steps[0] = 0
            return timed(real_reset, **kwargs)

        def step(action):
            steps[0] += 1
            if steps[0] == fault_at and (fault_episode is None or episodes[0] == fault_episode):
                start_fault(faults, fault)
                timing.update(fault_step=steps[0], fault_time=time.monotonic(), fault_episode=episodes[0])
            return timed(real_step, action)

        env.step, env.reset = step, reset
        return env

    patch.setattr(environment, "make_trackmania_env", make)
    patch.setattr(
        environment,
        "check_tmrl_available",
        functools.partial(tm_setup.check_tmrl_available, allow_non_windows=True),
    )
    if options.get("slow_learn"):
        import rainbow

        real_train, pause = rainbow.RainbowAgent.train, float(options["slow_learn"])

        def slow_train(self):
            time.sleep(pause)
            return real_train(self)

        patch.setattr(rainbow.RainbowAgent, "train", slow_train)
    try:
        return env_tm.main(argv)
    finally:
        game.close()
        pressed = [event for event in recorder.events if event[0] == "keys" and event[1]]
        detection = {}
        if "fault_time" in timing and "error_time" in timing:
            detection = {
                "detected_after_s": round(timing["error_time"] - timing["fault_time"], 3),
                "detected_after_episodes": timing["error_episode"] - timing["fault_episode"],
            }
        summary = {"controls_pressed": len(pressed), "events": len(recorder.events), **detection}
        print("FAKE_GAME " + json.dumps(summary))


class GameInAnotherProcess:
    """FakeOpenPlanet in a spawned process: this one knows its port and can press "respawn", no more."""

    def __init__(self, spawn: tuple, frame_interval: float, drive: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._commands, theirs = context.Pipe()
        self._process = context.Process(
            target=serve_game, args=(theirs, spawn, frame_interval, drive), name="fake game", daemon=True
        )
        self._process.start()
        if not self._commands.poll(60):
            raise RuntimeError("the fake game's process did not start within 60 s")
        self.port: int = self._commands.recv()

    def respawn(self) -> None:
        self._commands.send("respawn")

    def close(self) -> None:
        self._commands.send("close")
        self._process.join(5)


def serve_game(commands: Any, spawn: tuple, frame_interval: float, drive: float) -> None:
    game = FakeOpenPlanet(spawn=spawn, frame_interval=frame_interval)
    if drive:
        game.drive(drive, TRACK_LENGTH)
    commands.send(game.port)
    while True:
        try:
            command = commands.recv()
        except EOFError:  # the agent's process is gone
            break
        if command != "respawn":
            break
        game.respawn()
    game.close()


def start_fault(faults: dict[str, Any], fault: str | None) -> None:
    game, screen = faults["game"], faults["screen"]
    if fault == "nan":
        game.stop_driving()  # the physics would overwrite the speed at the next frame
        game.set_state(speed=float("nan"))
    elif fault == "slip":
        game.slip("drop")
    elif fault == "12_floats":
        game.extra_floats = (1.0,)
    elif fault == "freeze":
        game.freeze()
    elif fault == "crash":
        game.crash()
    elif fault == "finish_now":  # a plausible frame that says "finished" a moment after the start
        game.set_state(finished=1.0)
    elif fault == "finish_stuck":  # no respawn clears it
        game.stick(finished=1.0)
    elif fault == "telemetry_frozen":
        game.repeat_frame()
    elif fault == "pause":
        game.pause()
        screen.frozen = True
    elif fault == "teleport":
        game.teleport(95.0, seconds=0.3)
    elif fault == "resize":
        screen.size = (1280, 720)
    elif fault is not None:
        raise ValueError(f"unknown fault {fault!r}")


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # tmrl's client thread and rtgym's worker never end by themselves
