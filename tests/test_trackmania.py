"""trackmania.py: tmrl's real TM2020Interface under rtgym's real clock, with only the game faked.

tmrl reads ~/TmrlData/config/config.json when it is imported, so every test that imports tmrl runs in a
child process (this file, run as a script) whose HOME points at a prepared TmrlData folder; the test
process itself never imports tmrl. Nothing may touch the internet: children block every non-loopback
connection. The set-up checks (test_tm_setup.py), the telemetry guard's rules (test_tm_telemetry.py) and the
log routing (test_tm_logs.py) are tested in process in their own files.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
if str(REPO) not in sys.path:  # this file also runs as a child script
    sys.path.insert(0, str(REPO))

from fake_game import run_on_fake_game  # noqa: E402
from fake_openplanet import (  # noqa: E402
    GAMEPAD_A,
    GAMEPAD_B,
    SPAWN,
    ControlRecorder,
    FakeOpenPlanet,
    FakeScreen,
    block_internet,
    install_fake_game,
    slow_agent_steps,
    write_tmrl_data,
)
from test_tm_telemetry import TELEMETRY_ADVICE, TELEMETRY_PREFIX  # noqa: E402

import tm_logs  # noqa: E402
import tm_setup  # noqa: E402
import trackmania  # noqa: E402
from run_log import read_jsonl  # noqa: E402
from tm_config import Config  # noqa: E402
from tm_game import GameNotRespondingError, TrackManiaError, TrackManiaSetupError  # noqa: E402

RESULT_PREFIX = "CHILD RESULT "
USERS_WANDB_KEY = "the-users-own-wandb-key"
GAME_CHECKS = (
    "check that TrackMania is running with a map loaded, that its window is visible, not minimised and in "
    "windowed mode (tmrl resizes it to 256x128), and that the OpenPlanet plugin 'TMRL Grab Data' is loaded "
    "(F3 > Developer > (Re)load plugin > TMRL Grab Data)"
)


def test_importing_the_modules_imports_neither_tmrl_nor_rtgym() -> None:
    code = "import sys, trackmania, tm_logs; print(sorted({'tmrl', 'rtgym'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- the env's settings and its checks, in process -------------------------------------------------------
def test_clip_action() -> None:
    clipped = trackmania.clip_action([2.0, -3.0, 0.5])
    assert clipped.dtype == np.float32 and clipped.tolist() == [1.0, -1.0, 0.5]
    with pytest.raises(ValueError, match="shape"):
        trackmania.clip_action([1.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        trackmania.clip_action([np.nan, 0.0, 0.0])


def test_an_unexpected_observation_layout_is_refused() -> None:
    good = [np.zeros(1, np.float32)] * 3 + [np.zeros((4, 64, 64), np.uint8)] + [np.zeros(3, np.float32)] * 2
    trackmania._check_layout(tuple(good), (4, 64, 64))
    float_images = (*good[:3], good[3].astype(np.float32), *good[4:])
    with pytest.raises(TrackManiaSetupError, match="laid out as"):
        trackmania._check_layout(float_images, (4, 64, 64))
    with pytest.raises(TrackManiaSetupError, match="laid out as"):
        trackmania._check_layout(tuple(good[:5]), (4, 64, 64))


def test_rtgym_config_comes_from_our_settings() -> None:
    config = Config(ep_max_length=321)
    rtgym_config = trackmania.build_rtgym_config(config, interface=object, interface_kwargs={"k": 1})
    assert rtgym_config["interface"] is object and rtgym_config["interface_kwargs"] == {"k": 1}
    assert rtgym_config["time_step_duration"] == 0.05  # 20 Hz
    assert rtgym_config["start_obs_capture"] == 0.04
    assert rtgym_config["time_step_timeout_factor"] == 1.0
    assert rtgym_config["ep_max_length"] == 321
    assert rtgym_config["act_in_obs"] is True and rtgym_config["act_buf_len"] == 2
    assert rtgym_config["wait_on_done"] is True and rtgym_config["reset_act_buf"] is True
    assert rtgym_config["benchmark"] is False


# --- time-step timeouts, ViGEmBus failing inside tmrl ----------------------------------------------------
class _EnvOfThread:
    """Stands for a TrackManiaEnv whose rtgym worker is `thread`."""

    def __init__(self, thread: threading.Thread) -> None:
        self.thread = thread
        self.timeouts = 0

    def _note_timeout_from(self, thread: threading.Thread) -> None:
        self.timeouts += thread is self.thread


def test_counted_timeouts_are_never_shown_nor_raised(capfd: pytest.CaptureFixture[str]) -> None:
    counting = trackmania._CountingWarnings(warnings)
    env, other_env = _EnvOfThread(threading.current_thread()), _EnvOfThread(threading.Thread())
    counting.envs.add(env)  # type: ignore[arg-type]
    counting.envs.add(other_env)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as `python -W error`: would raise in rtgym's worker thread
        counting.warn("Time-step timed out. Elapsed since last time-step: 0.1")
        counting.warn("Time-step timed out. Elapsed since last time-step: 0.2")
        with pytest.raises(UserWarning, match="something else"):  # other warnings keep their filters
            counting.warn("something else")
    assert (env.timeouts, other_env.timeouts) == (2, 0)  # counted for the env whose thread timed out
    assert capfd.readouterr() == ("", "")


def test_vigembus_failing_inside_tmrl_is_not_blamed_on_the_game() -> None:
    # VX360Gamepad() asserts this when the driver is installed but the bus does not accept the device.
    error = AssertionError("The virtual device could not connect to ViGEmBus.")
    failure = trackmania._interface_failure(("resetting the race", error), "reset")
    assert isinstance(failure, TrackManiaSetupError)
    assert str(failure).startswith(
        "the virtual gamepad driver ViGEmBus is missing or not running (tmrl failed while resetting the "
        "race: AssertionError: The virtual device could not connect to ViGEmBus.), so tmrl could not move "
        "the car"
    )
    other = trackmania._interface_failure(("capturing an observation", ValueError("boom")), "step")
    assert isinstance(other, GameNotRespondingError)


# --- the env, in child processes -------------------------------------------------------------------------
def _run_child(
    tmp_path: Path,
    scenario: str,
    trajectory_start: tuple[float, float, float] = (0.0, 0.0, 0.0),
    **params: Any,
) -> dict[str, Any]:
    home = tmp_path / "home"
    write_tmrl_data(home, trajectory_start=trajectory_start)
    env = {
        **os.environ,
        "HOME": str(home),
        "USERPROFILE": str(home),
        "WANDB_API_KEY": USERS_WANDB_KEY,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]),
    }
    child = subprocess.run(
        [sys.executable, __file__, scenario, json.dumps(params)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    results = [line for line in child.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    assert child.returncode == 0 and results, (
        f"child {scenario} failed:\n{child.stdout[-2000:]}{child.stderr[-4000:]}"
    )
    result = json.loads(results[-1][len(RESULT_PREFIX) :])
    result["stderr"] = child.stderr
    result["other_stdout"] = [
        line for line in child.stdout.splitlines() if not line.startswith(RESULT_PREFIX)
    ]
    return result


@pytest.mark.parametrize("rtgym_id", ["real-time-gym-ts-v1", "real-time-gym-v1"])
def test_driving_through_tmrl_and_rtgym(tmp_path: Path, rtgym_id: str) -> None:
    result = _run_child(tmp_path, "drive", rtgym_id=rtgym_id)
    assert (
        result["env_class"]
        == {"real-time-gym-ts-v1": "RealTimeEnvTS", "real-time-gym-v1": "RealTimeEnv"}[rtgym_id]
    )
    # The observation layout the agent relies on, straight from tmrl's interface through rtgym.
    assert result["reset_layout"] == [
        [[1], "float32"],
        [[1], "float32"],
        [[1], "float32"],
        [[4, 64, 64], "uint8"],
        [[3], "float32"],
        [[3], "float32"],
    ]
    assert result["step_layout"] == result["reset_layout"]
    assert result["reset_actions"] == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert result["in_observation_space"] is True
    assert result["car"] == pytest.approx([45.0, 3.0, 6000.0])  # speed, gear, rpm as the plugin sent them
    # rtgym runs with our settings, and its clock holds 20 Hz: steps cannot come faster than 50 ms.
    assert result["rtgym"] == {
        "time_step_duration": 0.05,
        "start_obs_capture": 0.04,
        "time_step_timeout_factor": 1.0,
        "ep_max_length": 24,
        "act_buf_len": 2,
        "act_in_obs": True,
        "wait_on_done": True,
        "reset_act_buf": True,
        "benchmark": False,
    }
    assert 10 * 0.05 * 0.95 <= result["ten_steps_s"] < 10 * 0.05 * 4
    # tmrl resized the (fake) TrackMania window to the pinned 256x128.
    assert result["window_names"] == ["Trackmania"] and result["resizes"] == [[1, 0, 256, 128]]
    # Out-of-range actions are clipped before they reach tmrl: keys pressed for gas, brake, full left.
    assert result["action_in_obs"] == [0.699999988079071, 1.0, -1.0]
    assert ["keys", ["b", "f", "l"]] in result["events_after_clip"]
    # A capture slower than the time-step makes rtgym warn, and each warning is counted, never printed.
    assert result["timeouts_before_slow"] <= 5  # a loaded 2-core CI machine may miss a step or two
    assert result["timeouts_after_slow"] - result["timeouts_before_slow"] >= 4
    assert result["stderr"] == "" and result["other_stdout"] == []
    # Truncated (not terminated) at Config.ep_max_length, then tmrl respawned the car (wait_on_done).
    assert result["truncated_at"] == 24 and result["terminated"] is False
    assert ["respawn key"] in result["events_after_end"]
    # Importing tmrl left the process as it was: no W&B key swap, no stdout logging handler.
    assert result["wandb_key"] == USERS_WANDB_KEY
    assert result["root_handlers_added"] == []


def test_gamepad_controls_reward_and_finish(tmp_path: Path) -> None:
    result = _run_child(tmp_path, "gamepad_reward")
    # Reset respawns with the gamepad's B button.
    assert ["press_button", GAMEPAD_B] in result["events_at_reset"]
    # [2, -3, 0.5] reaches tmrl's (asserting) gamepad code as full gas, no brake, half right.
    assert ["right_trigger_float", 1.0] in result["events_after_clip"]
    assert ["left_trigger_float", 0.0] in result["events_after_clip"]
    assert ["left_joystick_float", 0.5, 0.0] in result["events_after_clip"]
    # 2 m along the recorded trajectory (a point every 0.1 m) pays 20 points / 100.
    assert result["reward_for_2m"] == pytest.approx(0.2, abs=1e-6)
    # The plugin's "finished" flag ends the episode with END_OF_TRACK = 100 (plus the last step's progress).
    assert result["terminated"] is True and result["truncated"] is False
    assert 100.0 <= result["finish_reward"] <= 102.0
    # Its race time is the wall clock's from the first frame: ~0.25 s + 98 m at 40 m/s, whatever the steps.
    assert 2.4 <= result["race_time"] <= 4.0
    assert result["pace_keys"] == ["telemetry_fps", "telemetry_wait_share"]
    # Then tmrl released the controls, respawned (B) and closed the finish pop-up (A).
    assert ["press_button", GAMEPAD_B] in result["events_after_finish"]
    assert ["press_button", GAMEPAD_A] in result["events_after_finish"]
    assert ["right_trigger_float", 0.0] in result["events_after_finish"]
    assert result["finished_after_respawn"] == 0.0
    # info["finished"] comes from each step's own frame; last_telemetry holds that frame by name.
    assert result["finished_flags"] == [False] * len(result["finished_flags"][:-1]) + [True]
    finish = result["telemetry_at_finish"]
    assert finish["finished"] == 1.0 and finish["speed"] == 0.0 and finish["gas"] == 0.0
    assert 100.0 <= finish["x"] <= 101.0 and finish["distance"] == pytest.approx(finish["x"] - 2.0 + 2.0)
    assert result["reset_info"] == {"finished": False}
    # The trajectory is 100 m: even at 1000 km/h it takes 0.36 s.
    assert result["track_length_m"] == pytest.approx(100.0)
    assert result["min_finish_seconds"] == pytest.approx(0.36)
    assert result["step_after_end"] == "RuntimeError"  # rtgym's "call reset", passed through unchanged
    # Closing mid-episode releases the pedals (a held virtual trigger would keep the car going).
    # (rtgym may still be applying the last step's gas when close() starts: what counts is the final state.)
    triggers = [e for e in result["events_at_close"] if e[0] in ("right_trigger_float", "left_trigger_float")]
    last = {name: value for name, value in triggers}
    assert last == {"right_trigger_float": 0.0, "left_trigger_float": 0.0}, result["events_at_close"]
    assert ["press_button", GAMEPAD_B] in result["events_at_close"]


def test_watchdog_when_the_game_stops_sending(tmp_path: Path) -> None:
    result = _run_child(tmp_path, "hang")
    assert result["error"] == "GameNotRespondingError"
    assert result["message"] == f"TrackMania did not answer within 1 s during step: {GAME_CHECKS}"
    assert 0.9 <= result["failing_step_s"] < 3.0
    assert result["next_step_s"] < 0.5 and "failed earlier" in result["next_message"]
    assert "restart the program" in result["next_message"]


@pytest.mark.parametrize("rtgym_id", ["real-time-gym-ts-v1", "real-time-gym-v1"])
def test_an_error_inside_tmrl_fails_fast(tmp_path: Path, rtgym_id: str) -> None:
    # rtgym alone would hang (ts) or repeat the last observation forever (v1, used on Windows).
    result = _run_child(tmp_path, "window_lost", rtgym_id=rtgym_id)
    assert result["error"] == "GameNotRespondingError"
    assert "AssertionError: Could not find a window named Trackmania." in result["message"]
    assert result["steps_until_error"] <= 3
    assert result["failing_step_s"] < 2.0  # long before the 10 s step timeout


def test_watchdog_when_the_picture_freezes(tmp_path: Path) -> None:
    result = _run_child(tmp_path, "frozen")
    assert result["errors_while_still"] == 0  # a still car may well show a still picture
    assert result["error"] == "GameNotRespondingError"
    assert "picture has not changed for 5 steps" in result["message"]
    assert 5 <= result["steps_until_error"] <= 8


# The car as the fake game reports it in the fault scenarios: still at SPAWN, first gear, 1000 rpm.
TRUE_CAR = [0.0, 1.0, 1000.0]
TRUE_TELEMETRY = {
    "speed": 0.0,
    "distance": 0.0,
    "x": SPAWN[0],
    "y": SPAWN[1],
    "z": SPAWN[2],
    "steer": 0.0,
    "gas": 0.0,
    "brake": 0.0,
    "finished": 0.0,
    "gear": 1.0,
    "rpm": 1000.0,
}
# What tmrl's client decodes when the 12-float frames of another plugin are read 11 floats at a time: the
# first implausible field for each of the 11 misalignments (which one is read depends on timing).
TWELVE_FLOAT_DETAILS = [
    "gear = 1000 (the game's gears are whole numbers 0..7)",
    "finished = 1000 (the plugin sends exactly 0 or 1)",
    "brake = 1000 (the plugin sends exactly 0 or 1)",
    "gas = 1000 (outside 0..1)",
    "steer = 1000 (outside -1..1)",
    "steer = 1500 (outside -1..1)",
    "brake = 500 (the plugin sends exactly 0 or 1)",
    "gas = 500 (outside 0..1)",
    "steer = 500 (outside -1..1)",
    "steer = 9 (outside -1..1)",
    "speed = 1500 km/h (beyond 1100 km/h; the game's top speed is 1000 km/h)",
]


@pytest.mark.parametrize(
    ("fault", "rtgym_id", "detail"),
    [
        ("nan", "real-time-gym-ts-v1", "speed = nan (not a finite number)"),
        # One byte lost: every float is read across two, the gear first shows it.
        ("drop", "real-time-gym-v1", "gear = 5.83155e-39 (the game's gears are whole numbers 0..7)"),
        ("insert", "real-time-gym-ts-v1", "rpm = 1.66155e+35 (outside 0..20000)"),
        # Another plugin's 12 floats: caught at the first misaligned read (often the reset's).
        ("12_floats", "real-time-gym-v1", None),
        ("12_floats", "real-time-gym-ts-v1", None),
        ("teleport", "real-time-gym-ts-v1", None),
    ],
)
def test_bad_telemetry_raises_one_line_and_is_never_returned(
    tmp_path: Path, fault: str, rtgym_id: str, detail: str | None
) -> None:
    result = _run_child(tmp_path, "telemetry_fault", trajectory_start=SPAWN, fault=fault, rtgym_id=rtgym_id)
    assert result["error"] == "TelemetryError", result
    message = result["message"]
    if detail is not None:
        assert message == TELEMETRY_PREFIX + detail + TELEMETRY_ADVICE
    elif fault == "12_floats":
        assert message in [TELEMETRY_PREFIX + d + TELEMETRY_ADVICE for d in TWELVE_FLOAT_DETAILS], message
    else:
        assert re.fullmatch(
            re.escape(TELEMETRY_PREFIX)
            + r"the position \(x, y, z\) jumped 5000 m in 0\.\d{3} s \(at most \d+ m at 1000 km/h\)"
            + re.escape(TELEMETRY_ADVICE),
            message,
        ), message
    assert result["steps_until_error"] <= 3  # the step that would have returned the bad frame, or the next
    # Every observation returned, and every frame in last_telemetry, is the real car: none of the garbage.
    assert fault == "12_floats" or len(result["returned"]) >= 4  # the reset and 3 steps before the fault
    assert all(car == TRUE_CAR for car in result["returned"]), result["returned"]
    assert all(frame == TRUE_TELEMETRY for frame in result["telemetry"])
    # The env is unusable afterwards, and says why.
    assert result["next_message"] == (
        f"TelemetryError: the TrackMania env failed earlier; fix that, then restart the program: {message}"
    )
    assert result["stderr"] == "" and result["other_stdout"] == []  # nothing else reached the terminal


WRONG_MAP_MESSAGE = (
    "the car starts 400.0 m from the start of the reward trajectory {path}, farther than MAX_STRAY (100 m): "
    "the map in the game is not the one the trajectory was recorded on, and no step would pay any reward. "
    "Load that map (tmrl's default trajectory is for the map tmrl-test: copy "
    r"%USERPROFILE%\TmrlData\resources\tmrl-test.Map.Gbx into %USERPROFILE%\Documents\Trackmania\Maps"
    r"\My Maps, then Create > Map Editor > Edit a Map > tmrl-test and the green flag), or record a "
    "trajectory on this map with `python -m tmrl --record-reward`"
)


def test_a_reward_trajectory_of_another_map_is_refused_at_the_first_reset(tmp_path: Path) -> None:
    result = _run_child(tmp_path, "wrong_map", trajectory_start=SPAWN)
    path = tmp_path / "home" / "TmrlData" / "reward" / "reward.pkl"
    assert result["error"] == "TrackManiaSetupError"
    assert result["message"] == WRONG_MAP_MESSAGE.format(path=path)
    assert result["reset_returned"] is False and result["last_telemetry"] is None  # no observation returned
    assert result["next_message"].startswith("TrackManiaSetupError: the TrackMania env failed earlier")
    assert result["stderr"] == "" and result["other_stdout"] == []


@pytest.mark.parametrize("rtgym_id", ["real-time-gym-ts-v1", "real-time-gym-v1"])
def test_a_slow_agent_times_out_silently_and_is_counted(tmp_path: Path, rtgym_id: str) -> None:
    result = _run_child(tmp_path, "slow_agent", rtgym_id=rtgym_id)
    assert result["slow_steps"] == 6  # -W error did not turn a timeout into an exception in rtgym's thread
    # Each of the 6 late steps is one timeout (a loaded 2-core CI machine may miss one more step).
    assert 6 <= result["timeouts_after"] - result["timeouts_before"] <= 7
    assert result["finished_infos"] == [False] * 6
    # Not one line on the terminal: the training loop reports the count itself.
    assert result["stderr"] == "" and result["other_stdout"] == []


def test_a_dying_game_leaves_one_line_and_its_tracebacks_in_the_log(tmp_path: Path) -> None:
    result = _run_child(tmp_path, "game_dies", rtgym_id="real-time-gym-v1")
    assert result["error"] == "GameNotRespondingError"
    assert result["message"] == f"TrackMania did not answer within 1 s during step: {GAME_CHECKS}"
    # No thread traceback reached the terminal...
    assert result["stderr"] == "" and result["other_stdout"] == []
    # ...they are in the run's log, timestamped: tmrl's client thread, then rtgym's worker giving up.
    log = result["log"]
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ERROR \[", log, re.MULTILINE), log
    assert "ConnectionResetError" in log
    assert "AssertionError: OpenPlanet stopped sending data since more than 10.0s." in log
    assert log.count("Traceback (most recent call last)") >= 2


# --- child side: these run in a fresh process with HOME at the prepared TmrlData -------------------------
def _layout(obs: tuple) -> list:
    return [[list(part.shape), str(part.dtype)] for part in obs]


def _fake_game(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeOpenPlanet, FakeScreen, ControlRecorder]:
    block_internet(monkeypatch)
    game = FakeOpenPlanet()
    monkeypatch.setattr(tm_setup, "OPENPLANET_PORT", game.port)
    return game, FakeScreen(follow=lambda: game.state["x"]), ControlRecorder(on_respawn=game.respawn)


def _events_since(recorder: ControlRecorder, start: int) -> list:
    return [list(event) for event in recorder.events[start:]]


def _step_until_error(env: Any, limit: int) -> dict[str, Any]:
    for steps in range(1, limit + 1):
        started = time.perf_counter()
        try:
            env.step([0.0, 0.0, 0.0])
        except GameNotRespondingError as error:
            return {
                "error": type(error).__name__,
                "message": str(error),
                "steps_until_error": steps,
                "failing_step_s": time.perf_counter() - started,
            }
    return {"error": None}


def child_drive(monkeypatch: pytest.MonkeyPatch, rtgym_id: str) -> dict[str, Any]:
    import logging

    root_handlers = list(logging.getLogger().handlers)
    game, screen, recorder = _fake_game(monkeypatch)
    monkeypatch.setattr(trackmania, "_rtgym_id", lambda: rtgym_id)
    env = trackmania.make_trackmania_env(Config(ep_max_length=24), allow_non_windows=True)
    install_fake_game(monkeypatch, game.port, screen, recorder)
    result: dict[str, Any] = {
        "wandb_key": os.environ.get("WANDB_API_KEY"),
        "root_handlers_added": [
            type(h).__name__ for h in logging.getLogger().handlers if h not in root_handlers
        ],
        "env_class": type(env.unwrapped).__name__,
        "rtgym": {
            key: getattr(env.unwrapped, key)
            for key in (
                "time_step_duration",
                "start_obs_capture",
                "time_step_timeout_factor",
                "ep_max_length",
                "act_buf_len",
                "act_in_obs",
                "wait_on_done",
                "reset_act_buf",
                "benchmark",
            )
        },
    }
    obs, _ = env.reset()
    result["reset_layout"] = _layout(obs)
    result["reset_actions"] = [obs[4].tolist(), obs[5].tolist()]
    game.drive(12.5, 1000.0)  # 45 km/h along x, third gear, 6000 rpm: a car that moves as it says
    started = time.perf_counter()
    for _ in range(10):
        obs, *_ = env.step([1.0, 0.0, 0.0])
    result["ten_steps_s"] = time.perf_counter() - started
    result["step_layout"] = _layout(obs)
    result["in_observation_space"] = bool(env.observation_space.contains(obs))
    result["car"] = [float(obs[0][0]), float(obs[1][0]), float(obs[2][0])]
    result["window_names"], result["resizes"] = screen.window_names, screen.resizes

    mark = len(recorder.events)
    obs, *_ = env.step([0.7, 2.0, -9.0])
    result["action_in_obs"] = obs[5].tolist()
    env.step([0.0, 0.0, 0.0])  # the previous action has been sent once this step is under way
    result["events_after_clip"] = _events_since(recorder, mark)

    result["timeouts_before_slow"] = env.time_step_timeouts
    screen.delay = 0.15  # three time-steps' worth of capture
    for _ in range(5):
        env.step([0.0, 0.0, 0.0])
    screen.delay = 0.0
    env.step([0.0, 0.0, 0.0])
    result["timeouts_after_slow"] = env.time_step_timeouts

    steps, mark = 18, len(recorder.events)
    terminated = truncated = False
    while not (terminated or truncated):
        _, _, terminated, truncated, _ = env.step([0.0, 0.0, 0.0])
        steps += 1
    result["truncated_at"], result["terminated"] = steps, terminated
    result["events_after_end"] = _events_since(recorder, mark)
    return result


def child_gamepad_reward(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    game, screen, recorder = _fake_game(monkeypatch)
    env = trackmania.make_trackmania_env(Config(), gamepad=True, allow_non_windows=True)
    install_fake_game(monkeypatch, game.port, screen, recorder)
    _, reset_info = env.reset()
    result: dict[str, Any] = {
        "events_at_reset": _events_since(recorder, 0),
        "reset_info": reset_info,
        "track_length_m": env.track_length_m,
        "min_finish_seconds": env.min_finish_seconds,
    }

    mark = len(recorder.events)
    env.step([2.0, -3.0, 0.5])
    env.step([0.0, 0.0, 0.0])
    result["events_after_clip"] = _events_since(recorder, mark)

    game.set_state(x=2.0, distance=2.0, speed=30.0)
    result["reward_for_2m"] = float(sum(env.step([1.0, 0.0, 0.0])[1] for _ in range(5)))

    game.drive(40.0, 100.0)  # the rest of the 100 m track at 144 km/h: ~2.5 s, then the finish line
    mark = len(recorder.events)
    finished_flags = []
    for _ in range(100):
        _, reward, terminated, truncated, info = env.step([1.0, 0.0, 0.0])
        finished_flags.append(info["finished"])
        if terminated or truncated:
            break
    result.update(terminated=terminated, truncated=truncated, finish_reward=float(reward))
    result["race_time"] = info.get("race_time")
    result["pace_keys"] = sorted(key for key in info if key.startswith("telemetry_"))
    result.update(finished_flags=finished_flags, telemetry_at_finish=env.last_telemetry)
    result["events_after_finish"] = _events_since(recorder, mark)
    result["finished_after_respawn"] = game.state["finished"]
    try:
        env.step([0.0, 0.0, 0.0])
        result["step_after_end"] = None
    except Exception as error:
        result["step_after_end"] = type(error).__name__

    env.reset()
    env.step([1.0, 0.0, 0.0])
    env.step([1.0, 0.0, 0.0])
    mark = len(recorder.events)
    env.close()
    result["events_at_close"] = _events_since(recorder, mark)
    return result


def child_hang(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    game, screen, recorder = _fake_game(monkeypatch)
    env = trackmania.make_trackmania_env(Config(), step_timeout=1.0, allow_non_windows=True)
    install_fake_game(monkeypatch, game.port, screen, recorder)
    env.reset()
    env.step([0.0, 0.0, 0.0])
    game.freeze()
    result = _step_until_error(env, limit=5)
    started = time.perf_counter()
    try:
        env.step([0.0, 0.0, 0.0])
    except GameNotRespondingError as error:
        result["next_message"] = str(error)
    result["next_step_s"] = time.perf_counter() - started
    return result


def child_window_lost(monkeypatch: pytest.MonkeyPatch, rtgym_id: str) -> dict[str, Any]:
    game, screen, recorder = _fake_game(monkeypatch)
    monkeypatch.setattr(trackmania, "_rtgym_id", lambda: rtgym_id)
    env = trackmania.make_trackmania_env(Config(), allow_non_windows=True)
    install_fake_game(monkeypatch, game.port, screen, recorder)
    env.reset()
    env.step([0.0, 0.0, 0.0])
    screen.error = "Could not find a window named Trackmania."  # tmrl's own assertion text
    return _step_until_error(env, limit=10)


def child_frozen(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    game, screen, recorder = _fake_game(monkeypatch)
    env = trackmania.make_trackmania_env(Config(), max_identical_frames=5, allow_non_windows=True)
    install_fake_game(monkeypatch, game.port, screen, recorder)
    env.reset()
    screen.frozen = True
    still = _step_until_error(env, limit=10)
    game.drive(60.0 / 3.6, 1000.0)  # the car drives on at 60 km/h behind the frozen picture
    return {**_step_until_error(env, limit=12), "errors_while_still": 0 if still["error"] is None else 1}


def _drive_until_error(env: Any, game: FakeOpenPlanet, limit: int) -> dict[str, Any]:
    """Step until a TrackManiaError; record what every returned observation said about the car."""
    returned: list[list[float]] = []
    telemetry: list[dict] = []
    for steps in range(1, limit + 1):
        try:
            obs, _, _, _, _ = env.step([0.0, 0.0, 0.0])
        except TrackManiaError as error:
            return {
                "error": type(error).__name__,
                "message": str(error),
                "steps_until_error": steps,
                "returned": returned,
                "telemetry": telemetry,
                "next_message": _next_call_message(env),
            }
        returned.append([float(obs[0][0]), float(obs[1][0]), float(obs[2][0])])
        telemetry.append(env.last_telemetry)
    return {"error": None, "returned": returned, "telemetry": telemetry}


def _next_call_message(env: Any) -> str | None:
    try:
        env.step([0.0, 0.0, 0.0])
    except TrackManiaError as error:
        return f"{type(error).__name__}: {error}"
    return None


def child_telemetry_fault(monkeypatch: pytest.MonkeyPatch, fault: str, rtgym_id: str) -> dict[str, Any]:
    """A game whose telemetry goes wrong after a few good steps (or from the start: another plugin)."""
    block_internet(monkeypatch)
    game = FakeOpenPlanet(spawn=SPAWN, extra_floats=(1500.0,) if fault == "12_floats" else ())
    monkeypatch.setattr(tm_setup, "OPENPLANET_PORT", game.port)
    monkeypatch.setattr(trackmania, "_rtgym_id", lambda: rtgym_id)
    screen, recorder = FakeScreen(follow=lambda: game.state["x"]), ControlRecorder(on_respawn=game.respawn)
    env = trackmania.make_trackmania_env(Config(), step_timeout=5.0, allow_non_windows=True)
    install_fake_game(monkeypatch, game.port, screen, recorder)
    result: dict[str, Any] = {"returned": [], "telemetry": []}
    try:
        obs, _ = env.reset()
    except TrackManiaError as error:  # a plugin of another version may be caught at the very first frame
        return {
            **result,
            "error": type(error).__name__,
            "message": str(error),
            "steps_until_error": 0,
            "next_message": _next_call_message(env),
        }
    result["returned"].append([float(obs[0][0]), float(obs[1][0]), float(obs[2][0])])
    result["telemetry"].append(env.last_telemetry)
    if fault != "12_floats":
        good = _drive_until_error(env, game, limit=3)
        assert good["error"] is None, good
        result["returned"] += good["returned"]
        result["telemetry"] += good["telemetry"]
        if fault == "nan":
            game.set_state(speed=float("nan"))
        elif fault == "teleport":
            game.set_state(x=SPAWN[0] + 5000.0)
        else:
            game.slip(fault)
    outcome = _drive_until_error(env, game, limit=20)
    return {
        **outcome,
        "returned": result["returned"] + outcome["returned"],
        "telemetry": result["telemetry"] + outcome["telemetry"],
    }


def child_wrong_map(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    block_internet(monkeypatch)
    game = FakeOpenPlanet(spawn=(SPAWN[0], SPAWN[1], SPAWN[2] + 400.0))  # another map's start
    monkeypatch.setattr(tm_setup, "OPENPLANET_PORT", game.port)
    screen, recorder = FakeScreen(follow=lambda: game.state["x"]), ControlRecorder(on_respawn=game.respawn)
    env = trackmania.make_trackmania_env(Config(), allow_non_windows=True)
    install_fake_game(monkeypatch, game.port, screen, recorder)
    result: dict[str, Any] = {"reset_returned": False}
    try:
        env.reset()
        result["reset_returned"] = True
    except TrackManiaError as error:
        result.update(error=type(error).__name__, message=str(error))
    try:
        env.reset()
    except TrackManiaError as error:
        result["next_message"] = f"{type(error).__name__}: {error}"
    result["last_telemetry"] = env.last_telemetry
    return result


def child_slow_agent(monkeypatch: pytest.MonkeyPatch, rtgym_id: str) -> dict[str, Any]:
    game, screen, recorder = _fake_game(monkeypatch)
    monkeypatch.setattr(trackmania, "_rtgym_id", lambda: rtgym_id)
    env = trackmania.make_trackmania_env(Config(), allow_non_windows=True)
    install_fake_game(monkeypatch, game.port, screen, recorder)
    # As `python -W error`: a warning raised in rtgym's worker thread would kill it.
    warnings.simplefilter("error")
    env.reset()
    for _ in range(3):
        env.step([0.0, 0.0, 0.0])
    before = env.time_step_timeouts
    slow = slow_agent_steps(env, steps=6, think_s=0.15)  # three time-steps' worth of thinking per step
    env.step([0.0, 0.0, 0.0])
    return {
        "timeouts_before": before,
        "timeouts_after": env.time_step_timeouts,
        "slow_steps": len(slow),
        "finished_infos": [info["finished"] for *_, info in slow],
    }


def child_game_dies(monkeypatch: pytest.MonkeyPatch, rtgym_id: str) -> dict[str, Any]:
    log_path = Path.cwd() / "run" / "trackmania.log"
    tm_logs.route_thread_errors(log_path)  # as the training loop does, with its run folder's log
    game, screen, recorder = _fake_game(monkeypatch)
    monkeypatch.setattr(trackmania, "_rtgym_id", lambda: rtgym_id)
    env = trackmania.make_trackmania_env(Config(), step_timeout=1.0, allow_non_windows=True)
    install_fake_game(monkeypatch, game.port, screen, recorder)
    env.reset()
    env.step([0.0, 0.0, 0.0])
    game.crash()
    result = _step_until_error(env, limit=5)
    # tmrl's client thread dies at once (connection reset); rtgym's thread, still waiting in tmrl's
    # retrieve_data, gives up after tmrl's 10 s: wait for both tracebacks.
    deadline = time.monotonic() + 30.0
    text = ""
    while time.monotonic() < deadline:
        text = log_path.read_text(encoding="utf-8") if log_path.exists() else ""
        if "OpenPlanet stopped sending data" in text and "ConnectionResetError" in text:
            break
        time.sleep(0.2)
    result["log"] = text
    return result


# --- the training loop against the fake game: every fault ends in one line, saved, resumable --------------
def run_loop(tmp_path: Path, options: dict[str, Any], steps: int, *extra: str) -> subprocess.CompletedProcess:
    """env_tm.py on the fake game (tests/fake_game.py): tmrl's real interface, rtgym's real 20 Hz."""
    if not (tmp_path / "home").exists():
        write_tmrl_data(tmp_path / "home")
    return run_on_fake_game(tmp_path, options, steps, *extra)


def stored_transitions(run_dir: Path) -> dict[str, np.ndarray]:
    from checkpoints import load_checkpoint
    from replay import PrioritizedReplay

    state = load_checkpoint(run_dir / "latest.pt")
    replay = PrioritizedReplay.from_config(Config.from_dict(state["config"]), seed=0)
    replay.load_state_dict(state["replay"])
    replay.check_consistency()
    return {"step": state["step"], **replay.transitions(np.arange(replay.transitions_added))}


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("nan", "implausible telemetry from the OpenPlanet plugin: speed = nan (not a finite number)"),
        # tmrl's client reads 44 of every 48 bytes: which field turns to nonsense first depends on timing.
        ("12_floats", "implausible telemetry from the OpenPlanet plugin: "),
        ("slip", "implausible telemetry from the OpenPlanet plugin: "),
        ("freeze", "TrackMania did not answer within 2 s during step"),
        # tmrl's client thread dies with the connection; the watchdog answers before tmrl's own 10 s.
        ("crash", "TrackMania did not answer within 2 s during step"),
    ],
)
def test_a_game_fault_ends_the_run_in_one_line_after_saving_and_it_resumes(tmp_path, fault, message):
    result = run_loop(tmp_path, {"drive": 20, "fault": fault, "fault_at": 30}, 400)
    error_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(error_lines) == 1 and error_lines[0].startswith("error: ") and message in error_lines[0], (
        f"one line, no traceback: {result.stderr[-3000:]}"
    )
    assert "Traceback" not in result.stdout + result.stderr
    run_dir = tmp_path / "runs" / "tm"
    stored = stored_transitions(run_dir)
    # The fault starts as step 30 starts: its frame is the first bad one, or (on a loaded machine, the
    # fake plugin's thread late) still a true one, and a game that goes silent may still deliver the
    # frame it had sent before. A fault caught as it comes condemns none of the steps held back.
    assert 29 <= stored["step"] <= (31 if fault in ("freeze", "crash") else 30), (
        "the steps before the fault were saved, the faulty one was not stored"
    )
    assert (
        len(stored["reward"]) == stored["step"]
        and np.isfinite(stored["car"]).all()
        and np.isfinite(stored["next_car"]).all()
    )
    assert (stored["reward"] < 100).all(), "no finish bonus paid by garbage telemetry reached the replay"
    assert (stored["next_car"][:, 0] <= 1000).all(), "no impossible speed reached the replay"
    assert f"at step {stored['step']}: saved {run_dir / 'latest.pt'}" in result.stdout
    if fault == "crash":  # tmrl's thread traceback went to the run folder's log, not to the terminal
        assert "Traceback" in (run_dir / "trackmania.log").read_text()
    again = run_loop(tmp_path, {"drive": 20}, 50)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"resumed tm from latest.pt: step {stored['step']}" in again.stdout


def test_a_trajectory_of_another_map_is_named_at_the_first_reset(tmp_path):
    result = run_loop(tmp_path, {"drive": 0, "spawn": [500.0, 0.0, 0.0]}, 100)
    assert result.returncode == 3
    err = result.stderr.strip()
    assert "\n" not in err and "the car starts 500.0 m from the start of the reward trajectory" in err
    assert "farther than MAX_STRAY (100 m)" in err and "python -m tmrl --record-reward" in err


def test_race_results_and_finishes_that_cannot_be_real(tmp_path):
    # The car drives the 100 m track at 40 m/s (~50 steps): every episode finishes, with its race time.
    result = run_loop(tmp_path, {"drive": 40}, 160)
    assert result.returncode == 0, result.stderr[-2000:]
    episodes = [r for r in read_jsonl(tmp_path / "runs" / "tm" / "metrics.jsonl") if r["kind"] == "episode"]
    # The race time is the clock's, from the first frame to the finish: ~1.3 s of countdown is not part
    # of it, the 100 m at 40 m/s (2.5 s) are, however many steps they took.
    assert len(episodes) >= 2 and all(
        r["finished"] and r["race_time_reliable"] is (r["time_step_timeouts"] == 0) for r in episodes
    )
    assert all(2.0 <= r["race_time"] <= 3.5 for r in episodes), [r["race_time"] for r in episodes]
    reliable = [r["race_time"] for r in episodes if r["race_time_reliable"]]
    assert episodes[-1]["best_race_time"] == (min(reliable) if reliable else None)
    assert episodes[-1]["finish_rate"] == 1.0
    assert re.search(r"^  races +\d+ finishes in \d+ episodes \(100\.0%\), best ", result.stdout, re.M), (
        result.stdout[-1500:]
    )
    # A plausible-looking "finished" right after the start: faster than the track can be driven, refused
    # as it comes (never a race, never stored).
    result = run_loop(tmp_path, {"drive": 1, "fault": "finish_now", "fault_at": 3}, 20, "--fresh")
    line = _one_error_line(result)
    assert INCONSISTENT + "a finish 0." in line and "faster than the track (100 m) can be driven" in line
    assert not any(r["finished"] for r in _episodes(tmp_path))


def test_episodes_that_get_nowhere_raise_no_progress(tmp_path):
    result = run_loop(tmp_path, {"drive": 0}, 200, "--set", "no_progress_streak=2")
    assert "RED FLAG no_progress: 2 episodes in a row made no progress along the track" in result.stdout, (
        result.stdout[-3000:]
    )


def test_an_agent_too_slow_for_20_hz_counts_its_timeouts_quietly_and_raises_stale_observations(tmp_path):
    result = run_loop(tmp_path, {"drive": 20, "slow_learn": 0.08}, 120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Time-step timed out" not in result.stdout + result.stderr, "rtgym's warning must not be printed"
    episodes = [r for r in read_jsonl(tmp_path / "runs" / "tm" / "metrics.jsonl") if r["kind"] == "episode"]
    total = sum(r["time_step_timeouts"] for r in episodes)
    assert total > 10 and episodes[-1]["time_step_timeouts_total"] >= total
    assert "RED FLAG stale_observations" in result.stdout
    assert re.search(r"time-step timeouts: \d+ over the run", result.stdout)
    # Resumed, the count goes on from the checkpoint's.
    first_total = episodes[-1]["time_step_timeouts_total"]
    again = run_loop(tmp_path, {"drive": 20}, 160)
    resumed = [r for r in read_jsonl(tmp_path / "runs" / "tm" / "metrics.jsonl") if r["kind"] == "episode"]
    assert resumed[-1]["time_step_timeouts_total"] >= first_total - 20 and again.returncode == 0


def test_recording_demonstrations_takes_the_players_inputs_from_the_telemetry_and_sends_no_control(tmp_path):
    """The player drives (the fake car runs the track with the gas held); the program only watches."""
    home = tmp_path / "home"
    write_tmrl_data(home)
    env = {**os.environ, "HOME": str(home), "USERPROFILE": str(home)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS)])
    args = [
        sys.executable,
        str(TESTS / "fake_game.py"),
        json.dumps({"drive": 20}),
        "--",
        "--env",
        "trackmania",
    ]
    args += ["--record-demos", "laps", "--demo-episodes", "2", "--demo-root", str(tmp_path / "demos")]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "the program sends no control" in result.stdout and "2 episodes recorded into" in result.stdout
    fake = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("FAKE_GAME "))[10:])
    assert fake["controls_pressed"] == 0, "the program must not drive while the player records"
    import demos

    manifest = demos.read_manifest(tmp_path / "demos" / "laps")
    assert manifest["environment"] == "trackmania" and len(manifest["episodes"]) == 2
    assert all(e["finished"] and e["driver"] == "player" for e in manifest["episodes"])
    episodes = demos.load_sets(tmp_path / "demos", Config(demos="laps"), report=pytest.fail)
    for episode in episodes:
        # The car holds the gas to the line, then stops: the last observation reports it released.
        assert np.allclose(episode.inputs[:-1, 0], 1.0) and episode.inputs[-1, 0] == 0.0, "the reported gas"
        assert (episode.actions[:-2] == 1).all(), "the nearest action to full gas, straight: gas"
        assert (episode.actions[-2:] == 0).all(), "the inputs two observations later: released, coast"
        assert episode.rewards[-1] >= 100.0, "the finish bonus of the player's lap"


if __name__ == "__main__":
    scenario, params = sys.argv[1], json.loads(sys.argv[2])
    try:
        child_result = globals()[f"child_{scenario}"](pytest.MonkeyPatch(), **params)
        print(RESULT_PREFIX + json.dumps(child_result), flush=True)
        exit_code = 0
    except BaseException:
        traceback.print_exc()
        exit_code = 1
    sys.stderr.flush()
    # rtgym's env joins its worker thread when collected, and tmrl's client thread never ends: leave now.
    os._exit(exit_code)


def test_the_game_is_real_time_and_the_embedded_track_is_not():
    """The loop reads `real_time` to choose its bound (issue 25): the game never waits for the learner
    mid-episode (learner_max_lag), the simulator does (simulator_max_lag). A TrackMania env that lost the
    flag would make the car wait for learn steps in the middle of a race."""
    from embedded_track import EmbeddedTrackEnv

    assert trackmania.TrackManiaEnv.real_time is True
    assert EmbeddedTrackEnv.real_time is False


# --- plausible lies (issue 24): every value plausible, the whole impossible ------------------------------
INCONSISTENT = "inconsistent telemetry from the OpenPlanet plugin: "


def _episodes(tmp_path: Path) -> list[dict]:
    return [r for r in read_jsonl(tmp_path / "runs" / "tm" / "metrics.jsonl") if r["kind"] == "episode"]


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("fault", "messages"),
    [
        # The plugin repeats one frame while the car and the picture go on: the position stands still at
        # 72 km/h, or the telemetry repeats under a moving picture; whichever is seen first.
        ("telemetry_frozen", [INCONSISTENT + "the position (x, y, z) has not changed for",
                              INCONSISTENT + "the telemetry repeated one frame bit for bit"]),
        # The game pauses while the car drives: its telemetry and its picture stop.
        ("pause", [INCONSISTENT + "the position (x, y, z) has not changed for",
                   "the game picture has not changed for 8 steps while the car reports speed 72.0 km/h"]),
        # 95 m forward for 0.3 s at 72 km/h: 18 m is the most one step can cover.
        ("teleport", [INCONSISTENT + "the position (x, y, z) moved 9"]),
        ("resize", ["the game window is now 1280x720 pixels, not the 256x128 tmrl sized it to at the start"]),
    ],
)  # fmt: skip
def test_plausible_lies_end_the_run_in_one_line_and_none_of_their_steps_is_stored(tmp_path, fault, messages):
    result = run_loop(tmp_path, {"drive": 20, "fault": fault, "fault_at": 40}, 400)
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    line = _one_error_line(result)
    assert any(message in line for message in messages), line
    run_dir = tmp_path / "runs" / "tm"
    stored = stored_transitions(run_dir)
    # The lie begins as step 40 starts (a frozen stream first repeats step 40's true frame, at 41). The
    # check needs a few steps to see a frozen stream, and the latest steps wait that long before they
    # reach the learner: none of the lie's is stored.
    assert 30 <= stored["step"] <= 40, stored["step"]
    assert len(stored["reward"]) == stored["step"]
    # At 20 m/s every true step moves the car along the trajectory and pays for it: a frozen one pays 0.
    assert (stored["reward"] > 0.0).all(), stored["reward"]
    assert f"saved {run_dir / 'latest.pt'}" in result.stdout
    assert f"at step {stored['step']}:" in result.stdout
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert records[-1]["kind"] == "run" and records[-1]["event"] == "error"
    assert records[-1]["error"] in ("TelemetryError", "GameNotRespondingError", "TrackManiaSetupError")


def test_a_stuck_finish_flag_is_never_a_race_nor_best_pt(tmp_path):
    # 40 m/s: the 100 m track takes ~2.5 s. Two real finishes, then the finish flag sticks at 1 in the
    # third episode, 10 steps (~10 m) after its start.
    options = {"drive": 40, "fault": "finish_stuck", "fault_at": 10, "fault_episode": 3}
    result = run_loop(tmp_path, options, 400)
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    line = _one_error_line(result)
    assert INCONSISTENT + "a finish after the car drove" in line, line
    episodes = _episodes(tmp_path)
    assert len(episodes) == 2 and all(r["finished"] for r in episodes)
    assert all(2.0 <= r["race_time"] <= 3.5 for r in episodes)  # the clock's: ~95 m at 40 m/s
    reliable = [r["race_time"] for r in episodes if r["race_time_reliable"]]  # no time-step timeouts
    stored = stored_transitions(tmp_path / "runs" / "tm")
    assert int((stored["reward"] >= 100).sum()) == 2  # the real finishes' bonus, no other
    from checkpoints import load_checkpoint

    best = load_checkpoint(tmp_path / "runs" / "tm" / "best.pt")
    assert best["best_race_time"] == (min(reliable) if reliable else None)
    assert best["step"] <= episodes[-1]["step"]


def test_a_finish_flag_stuck_from_the_respawn_is_refused_at_the_reset(tmp_path):
    # The car stands still and the flag sticks: the next respawn's first frame already says "finished".
    result = run_loop(tmp_path, {"drive": 0, "fault": "finish_stuck", "fault_at": 1}, 400)
    assert result.returncode == 3, result.stderr[-2000:]
    line = _one_error_line(result)
    assert INCONSISTENT in line and ("a finish" in line or "stuck finish flag" in line), line
    assert not any(r["finished"] for r in _episodes(tmp_path))


def test_a_game_paused_at_the_start_is_caught_across_episodes_within_ten_seconds(tmp_path):
    # Still at the start, then paused: no speed, no telemetry change, the same picture; tmrl ends each
    # episode after 81 steps and its respawn changes nothing.
    started = time.monotonic()
    result = run_loop(tmp_path, {"drive": 0, "fault": "pause", "fault_at": 3}, 400)
    assert result.returncode == 3, result.stderr[-2000:]
    line = _one_error_line(result)
    pattern = (
        r"the game picture has not changed for 1\d\.\d s \(\d+ steps, [1-9] respawns?\): the game is paused"
    )
    assert re.search(pattern + ", or its window is minimised or covered", line), line
    assert time.monotonic() - started < 60
    assert "the game stopped answering at step" in result.stdout and "saved" in result.stdout


def test_a_plugin_at_10_hz_is_named_as_the_cause_and_sustained_staleness_stops_the_run(tmp_path):
    result = run_loop(tmp_path, {"drive": 20, "frame_interval": 0.1}, 400, "--on-red-flag", "stop")
    flags = [line for line in result.stdout.splitlines() if "RED FLAG stale_observations:" in line]
    assert len(flags) == 1, result.stdout[-3000:]  # every stale episode, at most once a minute
    assert re.search(r"the cause is the game: its telemetry came at ~(9|10|11) frames/s", flags[0]), flags[0]
    assert result.returncode == 4, result.stdout[-2000:] + result.stderr[-2000:]
    line = _one_error_line(result)
    assert "stopped on red flag stale_observations_sustained" in line and "--on-red-flag stop" in line
    episodes = _episodes(tmp_path)
    assert len(episodes) >= 5 and all(r["telemetry_wait_share"] > 0.2 for r in episodes)
    assert all(9 <= r["telemetry_fps"] <= 11 for r in episodes), [r["telemetry_fps"] for r in episodes]
    records = read_jsonl(tmp_path / "runs" / "tm" / "metrics.jsonl")
    assert records[-1]["event"] == "error" and records[-1]["error"] == "RedFlagStopError"


@pytest.mark.parametrize(
    ("points", "message"),
    [
        (np.zeros((1000, 3)), "is 0.0 m long (1,000 points), shorter than any track (at least 50 m)"),
        ("2m", "is 2.0 m long (21 points), shorter than any track (at least 50 m)"),
    ],
)
def test_a_reward_trajectory_that_pays_for_nothing_is_refused_before_training(tmp_path, points, message):
    from fake_openplanet import reward_trajectory

    trajectory = reward_trajectory(2.0) if isinstance(points, str) else points
    write_tmrl_data(tmp_path / "home", trajectory=trajectory)
    result = run_loop(tmp_path, {"drive": 20}, 100)
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    line = _one_error_line(result)
    path = tmp_path / "home" / "TmrlData" / "reward" / "reward.pkl"
    assert f"the reward trajectory {path} {message}" in line
    assert not (tmp_path / "runs" / "tm" / "latest.pt").exists()  # nothing trained, nothing saved
