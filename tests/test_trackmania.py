"""The TrackMania path: tmrl's real TM2020Interface under rtgym's real clock, with only the game faked.

tmrl reads ~/TmrlData/config/config.json when it is imported, so every test that imports tmrl runs in a
child process (this file, run as a script) whose HOME points at a prepared TmrlData folder; the test
process itself never imports tmrl. The setup checks run before tmrl is imported, so they are tested here
directly. Nothing may touch the internet: children block every non-loopback connection.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
if str(REPO) not in sys.path:  # this file also runs as a child script
    sys.path.insert(0, str(REPO))

from fake_openplanet import (  # noqa: E402
    GAMEPAD_A,
    GAMEPAD_B,
    ControlRecorder,
    FakeOpenPlanet,
    FakeScreen,
    block_internet,
    install_fake_game,
    write_tmrl_data,
)

import trackmania  # noqa: E402
from tm_config import Config  # noqa: E402
from trackmania import GameNotRespondingError, TrackManiaSetupError  # noqa: E402

RESULT_PREFIX = "CHILD RESULT "
USERS_WANDB_KEY = "the-users-own-wandb-key"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty home folder, as Path.home() sees it on Linux (HOME) and on Windows (USERPROFILE)."""
    folder = tmp_path / "home"
    folder.mkdir()
    monkeypatch.setenv("HOME", str(folder))
    monkeypatch.setenv("USERPROFILE", str(folder))
    return folder


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reason(**kwargs: Any) -> str:
    reason = trackmania.check_tmrl_available(allow_non_windows=True, **kwargs)
    assert reason is not None
    assert "\n" not in reason
    return reason


# --- setup checks: no tmrl import, no game --------------------------------------------------------------
def test_importing_the_module_imports_neither_tmrl_nor_rtgym() -> None:
    code = "import sys, trackmania; print(sorted({'tmrl', 'rtgym'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(sys.platform == "win32", reason="the Windows requirement only shows elsewhere")
def test_other_systems_are_refused_without_the_test_override(home: Path) -> None:
    write_tmrl_data(home)
    reason = trackmania.check_tmrl_available()
    assert reason is not None and "needs Windows" in reason and "\n" not in reason


def test_tmrl_not_installed(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trackmania, "find_spec", lambda name: None)
    assert "tmrl is not installed" in _reason()
    assert "pip install tmrl" in _reason()


def test_missing_tmrl_data_is_one_line_and_nothing_is_downloaded(home: Path) -> None:
    tmrl_was_imported = "tmrl" in sys.modules
    reason = _reason()
    assert f"no TmrlData folder at {home / 'TmrlData'}" in reason
    assert "python -m tmrl --install" in reason and "TMRL Grab Data" in reason
    with pytest.raises(TrackManiaSetupError, match="no TmrlData folder"):
        trackmania.make_trackmania_env(Config(), allow_non_windows=True)
    # tmrl downloads its resources when imported without TmrlData: it must not have been imported.
    assert ("tmrl" in sys.modules) == tmrl_was_imported
    assert not (home / "TmrlData").exists()


@pytest.mark.parametrize(
    ("changes", "remove", "config", "expected"),
    [
        ({"ENV.IMG_HIST_LEN": 1}, (), Config(), "ENV.IMG_HIST_LEN is 1 but rainbow-tm needs 4"),
        ({}, (), Config(conv_input=2), "ENV.IMG_HIST_LEN is 4 but rainbow-tm needs 2"),
        ({"ENV.RTGYM_INTERFACE": "TM20LIDAR"}, (), Config(), 'ENV.RTGYM_INTERFACE is "TM20LIDAR"'),
        ({"ENV.WINDOW_WIDTH": 958}, (), Config(), "ENV.WINDOW_WIDTH is 958 but rainbow-tm needs 256"),
        ({"ENV.SLEEP_TIME_AT_RESET": 0.0}, (), Config(), "ENV.SLEEP_TIME_AT_RESET is 0.0"),
        ({"ENV.REWARD_CONFIG.END_OF_TRACK": 10.0}, (), Config(), "ENV.REWARD_CONFIG.END_OF_TRACK is 10.0"),
        ({"ALG.ALGORITHM": "REDQSAC"}, (), Config(), 'ALG.ALGORITHM is "REDQSAC" but rainbow-tm needs "SAC"'),
        (
            {},
            ("ENV.IMG_GRAYSCALE",),
            Config(),
            "ENV.IMG_GRAYSCALE is missing (so tmrl uses false) but rainbow-tm needs true",
        ),
        ({}, ("WANDB_KEY",), Config(), "has no WANDB_KEY (tmrl needs it)"),
        ({}, ("ENV.RTGYM_CONFIG.act_buf_len",), Config(), "has no ENV.RTGYM_CONFIG.act_buf_len"),
        ({"__VERSION__": "0.5.3"}, (), Config(), "has __VERSION__ '0.5.3', older than tmrl's 0.6.0"),
    ],
)
def test_config_json_that_does_not_match_the_pin_is_named_in_one_line(
    home: Path, changes: dict, remove: tuple, config: Config, expected: str
) -> None:
    write_tmrl_data(home, changes=changes, remove=remove)
    reason = _reason(config=config)
    assert expected in reason
    assert str(home / "TmrlData" / "config" / "config.json") in reason
    with pytest.raises(TrackManiaSetupError, match="config.json"):
        trackmania.make_trackmania_env(config, allow_non_windows=True)


def test_config_json_that_is_not_json(home: Path) -> None:
    folder = write_tmrl_data(home)
    (folder / "config" / "config.json").write_text('{"RUN_NAME": "x",,}', encoding="utf-8")
    assert "is not valid JSON (line 1" in _reason()


def test_missing_reward_trajectory_is_reported(home: Path) -> None:
    # tmrl would silently use a dummy trajectory that never pays any reward.
    write_tmrl_data(home, reward=False)
    assert "no reward trajectory" in _reason() and "python -m tmrl --record-reward" in _reason()


def test_no_game_listening(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tmrl_data(home)
    port = _free_port()
    monkeypatch.setattr(trackmania, "OPENPLANET_PORT", port)
    reason = _reason()
    assert f"nothing answers on 127.0.0.1:{port}" in reason and "TMRL Grab Data" in reason
    with pytest.raises(GameNotRespondingError, match="nothing answers"):
        trackmania.make_trackmania_env(Config(), allow_non_windows=True)


def test_a_silent_program_on_the_plugin_port(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tmrl_data(home)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        monkeypatch.setattr(trackmania, "OPENPLANET_PORT", silent.getsockname()[1])
        assert "sent no TrackMania telemetry" in _reason()


def test_available_when_the_plugin_answers(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tmrl_data(home)
    game = FakeOpenPlanet()
    try:
        monkeypatch.setattr(trackmania, "OPENPLANET_PORT", game.port)
        assert trackmania.check_tmrl_available(allow_non_windows=True) is None
        assert game.connections == 1
    finally:
        game.close()


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


# --- the env, in child processes -------------------------------------------------------------------------
def _run_child(tmp_path: Path, scenario: str, **params: Any) -> dict[str, Any]:
    home = tmp_path / "home"
    write_tmrl_data(home)
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
    assert result["car"] == [42.5, 3.0, 7000.0]  # speed, gear, rpm as the plugin sent them
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
    # A capture slower than the time-step makes rtgym warn, and each warning is counted.
    assert result["timeouts_before_slow"] <= 5  # a loaded 2-core CI machine may miss a step or two
    assert result["timeouts_after_slow"] - result["timeouts_before_slow"] >= 4
    assert "Time-step timed out" in result["stderr"]  # still shown, not swallowed
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
    # The plugin's "finished" flag ends the episode with END_OF_TRACK = 100.
    assert result["terminated"] is True and result["truncated"] is False
    assert result["finish_reward"] == pytest.approx(100.0, abs=1e-4)
    # Then tmrl released the controls, respawned (B) and closed the finish pop-up (A).
    assert ["press_button", GAMEPAD_B] in result["events_after_finish"]
    assert ["press_button", GAMEPAD_A] in result["events_after_finish"]
    assert ["right_trigger_float", 0.0] in result["events_after_finish"]
    assert result["finished_after_respawn"] == 0.0
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
    assert "did not answer within 1 s during step" in result["message"]
    assert "TMRL Grab Data" in result["message"] and "\n" not in result["message"]
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


# --- child side: these run in a fresh process with HOME at the prepared TmrlData -------------------------
def _layout(obs: tuple) -> list:
    return [[list(part.shape), str(part.dtype)] for part in obs]


def _fake_game(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeOpenPlanet, FakeScreen, ControlRecorder]:
    block_internet(monkeypatch)
    game = FakeOpenPlanet()
    monkeypatch.setattr(trackmania, "OPENPLANET_PORT", game.port)
    return game, FakeScreen(), ControlRecorder(on_respawn=game.respawn)


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
    game.set_state(speed=42.5, gear=3, rpm=7000)
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
    env.reset()
    result: dict[str, Any] = {"events_at_reset": _events_since(recorder, 0)}

    mark = len(recorder.events)
    env.step([2.0, -3.0, 0.5])
    env.step([0.0, 0.0, 0.0])
    result["events_after_clip"] = _events_since(recorder, mark)

    game.set_state(x=2.0, speed=30.0)
    result["reward_for_2m"] = float(sum(env.step([1.0, 0.0, 0.0])[1] for _ in range(5)))

    game.set_state(finished=1.0)
    mark = len(recorder.events)
    for _ in range(5):
        _, reward, terminated, truncated, _ = env.step([1.0, 0.0, 0.0])
        if terminated or truncated:
            break
    result.update(terminated=terminated, truncated=truncated, finish_reward=float(reward))
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
    game.set_state(speed=60.0)
    return {**_step_until_error(env, limit=12), "errors_while_still": 0 if still["error"] is None else 1}


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
