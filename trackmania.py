"""TrackMania 2020 through tmrl, as a validated Gymnasium env bounded by watchdogs.

The game runs on Windows with the OpenPlanet plugin "TMRL Grab Data". tmrl's `TM2020Interface` grabs the
game window, reads the car's telemetry from the plugin over TCP, computes the reward from a recorded
trajectory and drives with a virtual gamepad; rtgym paces it at a fixed 20 Hz in a worker thread.

What this module adds around tmrl, and why:
- tmrl reads ~/TmrlData/config/config.json as soon as it is imported, and downloads its resources from the
  internet when that folder is missing. We check the folder and every value of config.json that matters
  BEFORE importing tmrl, so a wrong setup ends in one readable line instead of a download or a KeyError.
- the rtgym configuration (20 Hz, frame stack, action buffer, episode length) is built from our pinned
  `Config`, never taken from config.json.
- rtgym runs tmrl in a worker thread: an exception there makes reset()/step() hang forever (Linux) or
  silently repeat the last observation (Windows). `TrackManiaEnv` records those exceptions, bounds every
  call with a watchdog and notices a frozen picture, and raises `GameNotRespondingError` saying what to check.
- every telemetry frame tmrl reads from the plugin is checked (finite, within the game's physical limits,
  no teleport within an episode): a plugin of another version or a misaligned stream would otherwise give
  garbage observations and episodes that "finish" in a few steps, silently; `TelemetryError` says so.
- the car's spawn is compared with the reward trajectory's start at the first reset: a trajectory recorded
  on another map would otherwise pay no reward, forever and silently.
- rtgym's "Time-step timed out" warnings (the PC could not keep 20 Hz) are counted per env and never
  printed (the training loop reports the count); `route_thread_errors` sends the tracebacks of tmrl's and
  rtgym's threads to a log file instead of the terminal.

tmrl is a Windows-only dependency: it is imported lazily, inside functions, never at module import.

Windows setup (from tmrl's install guide):
  1. install TrackMania 2020 and Openplanet (it needs the Visual C++ runtime);
  2. `pip install tmrl` (accept the virtual gamepad driver it installs), then `python -m tmrl --install`;
  3. check that `OpenplanetNext/Plugins` holds `TMRL_GrabData.op` (else copy `TmrlData/resources/Plugins`);
  4. start a map, press F3, Developer > (Re)load plugin > TMRL Grab Data, F3 again; game in windowed mode.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import json
import logging
import math
import os
import pickle
import platform
import socket
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np

from tm_config import Config, clip_action

logger = logging.getLogger(__name__)

# --- the OpenPlanet plugin's protocol ------------------------------------------------------------------
# The "TMRL Grab Data" plugin listens here (tmrl's TM2020OpenPlanetClient connects to the same address)
# and, once a client is connected, sends one frame per game frame:
# speed, distance, x, y, z, steer, gas, brake, finished, gear, rpm as little-endian float32.
OPENPLANET_HOST = "127.0.0.1"
OPENPLANET_PORT = 9000
OPENPLANET_FRAME = struct.Struct("<11f")
# The plugin serves one client at a time and only notices that our probe left when its next write fails;
# this gives it time to listen again before tmrl's own client connects.
PLUGIN_RELISTEN_DELAY = 0.25

# --- pinned environment settings (tmrl's defaults for its screenshot pipeline) --------------------------
WINDOW_WIDTH = 256  # tmrl resizes the game window to 256x128 before capturing it
WINDOW_HEIGHT = 128
ACT_BUF_LEN = 2  # the observation ends with the last two actions (the real-time delay makes them state)
# Observations are captured this long before the end of each time-step: late enough to be fresh, early
# enough for the screenshot and its resize (about 10 ms) to finish inside the step (0.04 s at 20 Hz).
OBS_CAPTURE_MARGIN = 0.01
# A time-step may overrun by at most this many time-steps before rtgym drops it and warns "timed out".
TIME_STEP_TIMEOUT_FACTOR = 1.0
SLEEP_TIME_AT_RESET = 1.5  # seconds tmrl waits after a respawn, for the start countdown
REWARD_CONFIG = {
    "END_OF_TRACK": 100.0,
    "CONSTANT_PENALTY": 0.0,
    "CHECK_FORWARD": 500,
    "CHECK_BACKWARD": 10,
    "FAILURE_COUNTDOWN": 10,
    "MIN_STEPS": 70,
    "MAX_STRAY": 100.0,
}
MIN_TMRL_CONFIG_VERSION = (0, 6, 0)  # tmrl refuses older config.json files

# --- telemetry sanity ------------------------------------------------------------------------------------
# The plugin's fields, in the order it sends them (TMRL Grab Data: CSmScriptPlayer's Speed, Distance,
# Position, InputSteer, InputGasPedal, InputIsBraking, the finish UI sequence, EngineCurGear, EngineRpm).
TELEMETRY_FIELDS = ("speed", "distance", "x", "y", "z", "steer", "gas", "brake", "finished", "gear", "rpm")
# TrackMania 2020 caps every car at 1000 km/h (the speedometer stops at 999).
TOP_SPEED_KMH = 1000.0
TOP_SPEED_M_S = TOP_SPEED_KMH / 3.6
# 10% above the cap: values a little past it (rounding, a bump) are real, while the garbage of a misaligned
# stream is orders of magnitude off. The bound is on |speed|: the plugin sends the script API's Speed as is,
# and nothing documents that it stays positive while the car rolls backwards (brake held at a standstill
# reverses); refusing negative values could end a good run the first time the agent reverses.
MAX_ABS_SPEED_KMH = 1.1 * TOP_SPEED_KMH
# The stadium car's engine revs up to about 11,000 rpm; 20,000 leaves room for the other cars.
MAX_RPM = 20_000.0
# EngineCurGear is a whole number (the stadium car shifts through 1..5, 0 when standing or reversing);
# 7 leaves room for the other cars.
MAX_GEAR = 7
# The game clamps its inputs (steer in [-1, 1], gas in [0, 1]); this only absorbs float rounding. Brake and
# finished are booleans that the plugin writes as exactly 0.0 or 1.0.
INPUT_TOLERANCE = 1e-3
# Between two frames of one episode the car cannot move farther than the top speed allows in the wall-clock
# time between them. A frame may be a few game frames old when read (a 30 fps game, a busy client thread),
# hence FRAME_AGE_SLACK seconds added to the elapsed time, and the whole bound is doubled: real driving never
# comes near it (14 m per 20 Hz step at top speed, against ~170 m allowed), a misaligned stream's positions
# jump by kilometres. Only a respawn teleports the car, and it happens at reset, which is never compared.
JUMP_MARGIN = 2.0
FRAME_AGE_SLACK = 0.25
# --- telemetry consistency: frames whose every value is plausible but which cannot all be true --------------
# Between two frames of an episode, and over any CONSISTENCY_WINDOW_S of it, the car covers at most
# SPEED_MARGIN times the distance its largest reported speed allows in the elapsed time (plus the frames'
# possible age on both ends), plus POSITION_SLACK_M for the physics' jitter. This is what a frozen speed with
# a moving car, a teleport of a few frames, or a distance counter that runs ahead of the car breaks.
SPEED_MARGIN = 1.5
POSITION_SLACK_M = 2.0
CONSISTENCY_WINDOW_S = 1.0
# A car reporting more than this (km/h) moves: its position cannot stay bit for bit the same for
# STILL_POSITION_S (a frozen telemetry stream repeats one frame while the car drives on; tmrl's client
# returns only frames newer than the last, so a real stream never repeats one while the car moves). Short
# enough to beat tmrl's failure countdown, which ends an episode 10 steps (0.5 s) after progress stops.
MOVING_KMH = 5.0
STILL_POSITION_S = 0.4
# A real finish comes after the car drove at least this share of the reward trajectory's length (shortcuts
# and another racing line shorten a lap, never by half), and is an edge: never in an episode's first frame
# (right after the respawn) and never two frames in a row.
FINISH_MIN_TRACK_SHARE = 0.5
# ... and with tmrl's reward function at least this far along the trajectory (the recorded lap ends at the
# finish line; the index it last matched is at most one step behind the car).
FINISH_MIN_PROGRESS = 0.8
# The reward trajectory tmrl pays along: `python -m tmrl --record-reward` resamples a driven lap to one point
# every 0.1 m, so a real one is long and its points advance. Shorter than MIN_TRAJECTORY_M, or with more than
# MAX_STILL_POINTS_SHARE of its steps shorter than STILL_POINT_M, it pays for nothing the car does.
MIN_TRAJECTORY_M = 50.0
STILL_POINT_M = 0.01
MAX_STILL_POINTS_SHARE = 0.01

# --- watchdog defaults ---------------------------------------------------------------------------------
DEFAULT_STEP_TIMEOUT = 10.0  # seconds; a step normally takes 0.05 s, or ~0.6 s when the episode ends
DEFAULT_RESET_TIMEOUT = 60.0  # seconds; a reset waits SLEEP_TIME_AT_RESET and may first connect to the game
# The picture must change from one step to the next while the car reports more than MOVING_SPEED km/h
# (the camera follows it: 0.14 m per step at 10 km/h); 8 unchanged steps (0.4 s at 20 Hz) is a frozen capture.
DEFAULT_MAX_IDENTICAL_FRAMES = 8
MOVING_SPEED = 10.0
# At any speed, a picture unchanged for PAUSE_SECONDS of steps is a paused (or minimised) game: counted
# across episodes, since tmrl ends a frozen episode after 81 steps and its respawn changes nothing on screen.
PAUSE_SECONDS = 10.0
# The telemetry repeating one frame bit for bit while the picture moves (more than PICTURE_MOTION_SHARE of
# its pixels change by more than PICTURE_MOTION_LEVELS at every step, as when the camera follows a car) for
# FROZEN_TELEMETRY_STEPS steps: the plugin stopped updating while the game goes on. A still car's picture
# changes in a few pixels at most (the race clock), so it never counts.
FROZEN_TELEMETRY_STEPS = 8
PICTURE_MOTION_LEVELS = 2
PICTURE_MOTION_SHARE = 0.25
# When a step's telemetry took longer than this to arrive, the plugin (one frame per game frame) was slower
# than the agent: a stale step is then the game's fault, not the agent's.
PLUGIN_WAIT_S = 0.005
_POLL_INTERVAL = 0.1  # how often a waiting call checks whether tmrl's worker thread has failed
_TIMEOUT_WARNING_PREFIX = "Time-step timed out"

_GAME_CHECKS = (
    "check that TrackMania is running with a map loaded, that its window is visible, not minimised and in "
    f"windowed mode (tmrl resizes it to {WINDOW_WIDTH}x{WINDOW_HEIGHT}), and that the OpenPlanet plugin "
    "'TMRL Grab Data' is loaded "
    "(F3 > Developer > (Re)load plugin > TMRL Grab Data)"
)
_INSTALL_HINT = (
    "on the Windows PC with TrackMania run `pip install tmrl==0.7.1` then `python -m tmrl --install`, "
    "and load the OpenPlanet plugin 'TMRL Grab Data'"
)


class TrackManiaError(RuntimeError):
    """Base of the errors below; every message is one line. `condemned_steps`: how many of the steps
    already returned were part of the fault (a frozen stream is seen only after a few of them)."""

    condemned_steps = 0


class TrackManiaSetupError(TrackManiaError):
    """tmrl, TmrlData or config.json is missing or does not match rainbow-tm's pinned settings."""


class GameNotRespondingError(TrackManiaError):
    """The game, its window or the OpenPlanet plugin stopped answering."""


class TelemetryError(TrackManiaError):
    """The plugin's telemetry is implausible: a plugin of another version, or a misaligned data stream."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# --- setup checks (no tmrl import) ----------------------------------------------------------------------
def tmrl_data_folder() -> Path:
    """Where tmrl keeps its data: it uses `Path.home()` too (HOME, or USERPROFILE on Windows)."""
    return Path.home() / "TmrlData"


# Keys tmrl reads from config.json while it is imported (tmrl/config/config_constants.py and
# config_objects.py) or when it builds its interface (the reward settings): a missing one would be a
# KeyError in the middle of the import, or in rtgym's worker thread.
# fmt: off
_TMRL_IMPORT_KEYS = (
    "__VERSION__", "RUN_NAME", "BUFFERS_MAXLEN", "RW_MAX_SAMPLES_PER_EPISODE", "CUDA_TRAINING",
    "CUDA_INFERENCE", "VIRTUAL_GAMEPAD", "LOCALHOST_WORKER", "LOCALHOST_TRAINER", "PUBLIC_IP_SERVER",
    "SAVE_MODEL_EVERY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_KEY", "PORT", "LOCAL_PORT_SERVER",
    "LOCAL_PORT_TRAINER", "LOCAL_PORT_WORKER", "PASSWORD", "TLS", "TLS_CREDENTIALS_DIRECTORY",
    "TLS_HOSTNAME", "NB_WORKERS", "BUFFER_SIZE", "HEADER_SIZE", "MEMORY_SIZE", "BATCH_SIZE", "MAX_EPOCHS",
    "ROUNDS_PER_EPOCH", "TRAINING_STEPS_PER_ROUND", "UPDATE_MODEL_INTERVAL", "UPDATE_BUFFER_INTERVAL",
    "MAX_TRAINING_STEPS_PER_ENVIRONMENT_STEP", "ENVIRONMENT_STEPS_BEFORE_TRAINING", "ALG.ALGORITHM",
    "ALG.LR_ACTOR", "ALG.LR_CRITIC", "ALG.LR_ENTROPY", "ALG.GAMMA", "ALG.POLYAK", "ALG.LEARN_ENTROPY_COEF",
    "ALG.TARGET_ENTROPY", "ALG.ALPHA", "ALG.OPTIMIZER_ACTOR", "ALG.OPTIMIZER_CRITIC", "ENV.RTGYM_INTERFACE",
    "ENV.WINDOW_WIDTH", "ENV.WINDOW_HEIGHT", "ENV.SLEEP_TIME_AT_RESET", "ENV.IMG_HIST_LEN",
    "ENV.RTGYM_CONFIG.act_buf_len",
    *(f"ENV.REWARD_CONFIG.{key}" for key in REWARD_CONFIG),
)
# fmt: on

# Keys tmrl reads only when present, with the default it uses otherwise.
_TMRL_OPTIONAL_DEFAULTS = {"ENV.IMG_GRAYSCALE": False, "ENV.IMG_WIDTH": 64, "ENV.IMG_HEIGHT": 64}


def _pinned_tmrl_values(config: Config) -> list[tuple[str, Any, str]]:
    """(key, value rainbow-tm needs, why) for the config.json values that must agree with our settings.

    The window size, the pause after a respawn and the reward settings are read by tmrl while it runs, so
    they decide what the agent sees and earns. The image settings are not used by our env (we pass our
    own), but tmrl's own tools (`python -m tmrl --check-environment`, `--record-reward`) read them: keeping
    them equal means the setup the user checks with tmrl is the one the agent gets.
    """
    env_reason = "so that tmrl's --check-environment shows what the agent sees"
    reward_reason = "tmrl computes the reward with it"
    return [
        ("ALG.ALGORITHM", "SAC", "tmrl refuses to import with anything else for screenshots"),
        ("ENV.RTGYM_INTERFACE", "TM20FULL", "the agent drives from screenshots, not LIDAR"),
        ("ENV.WINDOW_WIDTH", WINDOW_WIDTH, "tmrl resizes the game window to it"),
        ("ENV.WINDOW_HEIGHT", WINDOW_HEIGHT, "tmrl resizes the game window to it"),
        ("ENV.IMG_WIDTH", config.img_x, env_reason),
        ("ENV.IMG_HEIGHT", config.img_y, env_reason),
        ("ENV.IMG_GRAYSCALE", True, env_reason),
        ("ENV.IMG_HIST_LEN", config.conv_input, env_reason),
        ("ENV.SLEEP_TIME_AT_RESET", SLEEP_TIME_AT_RESET, "tmrl waits this long after each respawn"),
        *((f"ENV.REWARD_CONFIG.{key}", value, reward_reason) for key, value in REWARD_CONFIG.items()),
    ]


_MISSING = object()


def _lookup(tree: Any, dotted_key: str) -> Any:
    for part in dotted_key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def _same_value(actual: Any, expected: Any) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool):
        return actual is expected
    if isinstance(expected, int | float):
        return isinstance(actual, int | float) and math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-12)
    return actual == expected


def _parse_version(text: Any) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in str(text).split("."))
    except ValueError:
        return None


def validate_tmrl_config(values: dict[str, Any], config: Config, path: Path | str = "config.json") -> None:
    """Raise TrackManiaSetupError (one line naming the key) unless tmrl's config.json suits rainbow-tm."""
    regenerate = "delete the TmrlData folder and run `python -m tmrl --install` to regenerate it"
    if not isinstance(values, dict):
        raise TrackManiaSetupError(f"{path} does not hold a JSON object: {regenerate}")
    for key in _TMRL_IMPORT_KEYS:
        if _lookup(values, key) is _MISSING:
            raise TrackManiaSetupError(f"{path} has no {key} (tmrl needs it): {regenerate}")
    version = _parse_version(values["__VERSION__"])
    if version is None or version < MIN_TMRL_CONFIG_VERSION:
        minimum = ".".join(map(str, MIN_TMRL_CONFIG_VERSION))
        raise TrackManiaSetupError(
            f"{path} has __VERSION__ {values['__VERSION__']!r}, older than tmrl's {minimum}: {regenerate}"
        )
    for key, expected, why in _pinned_tmrl_values(config):
        actual = _lookup(values, key)
        if actual is _MISSING:  # only optional keys can be missing here: the required ones were checked
            actual = _TMRL_OPTIONAL_DEFAULTS[key]
            shown = f"missing (so tmrl uses {json.dumps(actual)})"
        else:
            shown = json.dumps(actual)
        if not _same_value(actual, expected):
            raise TrackManiaSetupError(
                f"{path}: {key} is {shown} but rainbow-tm needs {json.dumps(expected)} ({why}); edit it"
            )


def load_tmrl_config(folder: Path) -> dict[str, Any]:
    """Read TmrlData/config/config.json ourselves (json + pathlib), so that tmrl is not imported for it."""
    path = folder / "config" / "config.json"
    if not path.is_file():
        raise TrackManiaSetupError(
            f"{path} is missing: delete the TmrlData folder, then `python -m tmrl --install` regenerates it"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise TrackManiaSetupError(_one_line(f"cannot read {path}: {error}")) from error
    except json.JSONDecodeError as error:
        raise TrackManiaSetupError(
            f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
            "fix it or regenerate it with `python -m tmrl --install` after deleting TmrlData"
        ) from error


def reward_trajectory_path(folder: Path) -> Path:
    """Where tmrl reads the reward trajectory (config_constants.REWARD_PATH)."""
    return folder / "reward" / "reward.pkl"


def load_reward_trajectory(folder: Path) -> np.ndarray:
    """The reward trajectory tmrl will use, (N >= 2, 3) float64 points; TrackManiaSetupError if unusable."""
    # Without this file tmrl silently falls back to a dummy trajectory that never pays any reward.
    path = reward_trajectory_path(folder)
    record = (
        "record one on your track with `python -m tmrl --record-reward` (or run `python -m tmrl --install`)"
    )
    if not path.is_file():
        raise TrackManiaSetupError(f"no reward trajectory at {path}: {record}")
    try:
        with path.open("rb") as file:
            points = np.asarray(pickle.load(file), dtype=np.float64)
    except Exception as error:  # a damaged pickle can raise nearly anything
        message = _one_line(f"cannot read the reward trajectory {path} ({error}): {record}")
        raise TrackManiaSetupError(message) from error
    if points.ndim != 2 or points.shape[1] != 3 or len(points) < 2:
        raise TrackManiaSetupError(
            f"the reward trajectory {path} holds an array of shape {points.shape}, not (N >= 2, 3): {record}"
        )
    if not np.isfinite(points).all():
        raise TrackManiaSetupError(f"the reward trajectory {path} holds non-finite points: {record}")
    problem = trajectory_problem(points)
    if problem is not None:
        raise TrackManiaSetupError(f"the reward trajectory {path} {problem}: {record}")
    return points


def _segment_lengths(points: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.diff(points, axis=0), axis=1)


def trajectory_problem(points: np.ndarray) -> str | None:
    """Why a trajectory of (N, 3) finite points cannot pay for driving a track, or None."""
    steps = _segment_lengths(points)
    length = float(steps.sum())
    if length < MIN_TRAJECTORY_M:
        return (
            f"is {length:.1f} m long ({len(points):,} points), shorter than any track "
            f"(at least {MIN_TRAJECTORY_M:g} m): the car would finish it, or stray from it, at once"
        )
    still = int((steps < STILL_POINT_M).sum())
    if still > MAX_STILL_POINTS_SHARE * len(steps):
        return (
            f"has {still:,} of its {len(steps):,} steps shorter than {100 * STILL_POINT_M:g} cm "
            f"(tmrl records one point every 10 cm): points that do not advance pay for progress never made"
        )
    return None


def trajectory_length_m(points: np.ndarray) -> float:
    """Length of a trajectory: the sum of its segments (tmrl records a point every 0.1 m driven)."""
    return float(_segment_lengths(points).sum())


_VIGEM_FIX = (
    "install it (`pip install --force-reinstall --no-deps vgamepad` and accept the driver installer it "
    "starts, as `pip install tmrl` did, or ViGEmBus_Setup from https://github.com/ViGEm/ViGEmBus/releases), "
    "then restart Windows"
)


def _vigem_error(detail: str) -> TrackManiaSetupError:
    return TrackManiaSetupError(
        _one_line(
            f"the virtual gamepad driver ViGEmBus is missing or not running ({detail}), so tmrl could not "
            f"move the car: {_VIGEM_FIX}"
        )
    )


def _mentions_vigem(error: BaseException) -> bool:
    # vgamepad raises Exception("VIGEM_ERROR_BUS_NOT_FOUND") (and other VIGEM_ERROR_* names) when it cannot
    # reach the driver, and AssertionError("The virtual device could not connect to ViGEmBus.").
    return "vigem" in f"{type(error).__name__} {error}".lower()


def _check_virtual_gamepad() -> None:
    """Import vgamepad as tmrl will: it connects to the ViGEmBus driver while being imported."""
    if find_spec("vgamepad") is None:
        raise TrackManiaSetupError(
            "vgamepad (tmrl's virtual gamepad) is not installed: run `pip install tmrl`"
        )
    try:
        importlib.import_module("vgamepad")
    except Exception as error:  # VIGEM_ERROR_* as a bare Exception, or OSError when its DLL cannot load
        raise _vigem_error(f"importing vgamepad raised {type(error).__name__}: {error}") from error


def _require_windows(allow_non_windows: bool) -> str:
    system = platform.system()
    if system != "Windows" and not allow_non_windows:
        raise TrackManiaSetupError(
            f"TrackMania needs Windows (the game, OpenPlanet, tmrl's window capture and virtual gamepad); "
            f"this is {system or 'an unknown system'}"
        )
    return system


def _require_tmrl() -> str:
    if find_spec("tmrl") is None:
        raise TrackManiaSetupError(f"tmrl is not installed: {_INSTALL_HINT}")
    return _installed_tmrl_version()


def _require_tmrl_data() -> Path:
    folder = tmrl_data_folder()
    if not folder.is_dir():
        # Importing tmrl now would make it download its resources: tell the user to do it knowingly.
        raise TrackManiaSetupError(f"no TmrlData folder at {folder}: {_INSTALL_HINT}")
    return folder


def _check_tmrl_config(config: Config) -> Path:
    path = tmrl_data_folder() / "config" / "config.json"
    validate_tmrl_config(load_tmrl_config(tmrl_data_folder()), config, path)
    return path


def check_tmrl_setup(config: Config | None = None, *, allow_non_windows: bool = False) -> None:
    """Everything that can be checked without tmrl or the game; raises TrackManiaSetupError (one line).
    The same steps as `setup_report`, stopping at the first that fails."""
    config = config or Config()
    system = _require_windows(allow_non_windows)
    _require_tmrl()
    folder = _require_tmrl_data()
    _check_tmrl_config(config)
    load_reward_trajectory(folder)
    if system == "Windows":
        _check_virtual_gamepad()


def listen_to_plugin(seconds: float, enough: int | None = None) -> list[tuple[float, tuple[float, ...]]]:
    """(arrival time, frame) of every telemetry frame the plugin sends in `seconds`, or of its first
    `enough`; GameNotRespondingError (one line) when nothing answers, or nothing comes."""
    address = f"{OPENPLANET_HOST}:{OPENPLANET_PORT}"
    frames: list[tuple[float, tuple[float, ...]]] = []
    connected, failure = False, None
    try:
        with socket.create_connection((OPENPLANET_HOST, OPENPLANET_PORT), timeout=seconds) as sock:
            connected = True
            end, received = time.monotonic() + seconds, b""
            while time.monotonic() < end and (enough is None or len(frames) < enough):
                sock.settimeout(max(end - time.monotonic(), 1e-3))
                chunk = sock.recv(65536)
                if not chunk:
                    failure = "connection closed"
                    break
                received += chunk
                now = time.monotonic()
                while len(received) >= OPENPLANET_FRAME.size:
                    frames.append((now, OPENPLANET_FRAME.unpack(received[: OPENPLANET_FRAME.size])))
                    received = received[OPENPLANET_FRAME.size :]
    except OSError as error:  # refused, timed out (TimeoutError is an OSError) or reset
        if not connected:
            raise GameNotRespondingError(
                f"nothing answers on {address} (the OpenPlanet plugin 'TMRL Grab Data'): {_GAME_CHECKS}"
            ) from error
        failure = type(error).__name__  # once connected, the end of the window (a timeout) or a reset
    time.sleep(PLUGIN_RELISTEN_DELAY)
    if not frames:
        raise GameNotRespondingError(
            f"something listens on {address} but sent no TrackMania telemetry within {seconds:g} s "
            f"({failure or 'TimeoutError'}): load a map so the plugin sends data, and make sure no other "
            f"program uses port {OPENPLANET_PORT}"
        )
    return frames


def probe_openplanet(timeout: float = 1.0) -> None:
    """Connect to the plugin and read one telemetry frame; raise GameNotRespondingError if that fails."""
    listen_to_plugin(timeout, enough=1)


def check_tmrl_available(config: Config | None = None, *, allow_non_windows: bool = False) -> str | None:
    """None if TrackMania can be used now, else the reason in one line (tmrl, TmrlData, config, game).

    Nothing is downloaded and rtgym is not started; tmrl is not even imported. The last check opens a short
    TCP connection to the OpenPlanet plugin, so the game must be running with a map loaded.
    """
    try:
        check_tmrl_setup(config, allow_non_windows=allow_non_windows)
        probe_openplanet()
    except TrackManiaError as error:
        return _one_line(str(error))
    return None


@dataclass(frozen=True)
class SetupCheck:
    """One line of `--check-trackmania`: what was checked, whether it passed, what was seen or what to do."""

    name: str
    passed: bool | None  # None: skipped, because a check it needs failed (or not on this system)
    detail: str

    def line(self) -> str:
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[self.passed]
        return f"{mark} {self.name}: {self.detail}"


def _telemetry_verdict(frames: list[tuple[float, tuple[float, ...]]], seconds: float) -> str:
    """What the frames say (rate, speed, position), or TelemetryError naming the first impossible one."""
    previous = None
    for arrived, frame in frames:
        problem = _field_problem(frame)
        if problem is None and previous is not None:
            problem = _jump_problem(frame, previous[1], arrived - previous[0])
        if problem is not None:
            raise _telemetry_error(problem)
        previous = (arrived, frame)
    last = dict(zip(TELEMETRY_FIELDS, frames[-1][1], strict=True))
    return (
        f"{len(frames):,} frames in {seconds:g} s, all plausible; speed {last['speed']:.0f} km/h, gear "
        f"{last['gear']:.0f}, position ({last['x']:.1f}, {last['y']:.1f}, {last['z']:.1f})"
    )


def setup_report(
    config: Config | None = None, *, allow_non_windows: bool = False, listen_seconds: float = 1.0
) -> list[SetupCheck]:
    """Every step of the TrackMania set-up, checked without training (`python env_tm.py
    --check-trackmania`): one SetupCheck each, in the order a user fixes them. tmrl is not imported,
    nothing is downloaded; the game must run with a map loaded for the last three."""
    config = config or Config()
    checks: list[SetupCheck] = []

    class NotHereError(Exception):  # a check that does not apply on this system
        pass

    def check(name: str, needs: tuple[str, ...], test: Callable[[], str]) -> None:
        failed = [c.name for c in checks if c.name in needs and c.passed is not True]
        if failed:
            checks.append(SetupCheck(name, None, f"not checked: it needs {', '.join(failed)}"))
            return
        try:
            checks.append(SetupCheck(name, True, test()))
        except NotHereError as skipped:
            checks.append(SetupCheck(name, None, str(skipped)))
        except TrackManiaError as error:
            checks.append(SetupCheck(name, False, _one_line(str(error))))

    system = platform.system() or "an unknown system"

    def windows() -> str:
        return _require_windows(allow_non_windows) or system

    def tmrl_data() -> str:
        return str(_require_tmrl_data())

    def tmrl_config() -> str:
        path = _check_tmrl_config(config)
        return f"{path}: every key tmrl reads is there, and the pinned ones have rainbow-tm's values"

    trajectory: list[np.ndarray] = []

    def reward_trajectory() -> str:
        trajectory.append(load_reward_trajectory(tmrl_data_folder()))
        points = trajectory[0]
        return f"{len(points):,} points, {trajectory_length_m(points):,.0f} m"

    def gamepad() -> str:
        if system != "Windows":
            raise NotHereError(f"not checked on {system} (the virtual gamepad driver is Windows')")
        _check_virtual_gamepad()
        return "vgamepad reaches the ViGEmBus driver"

    heard: list[list[tuple[float, tuple[float, ...]]]] = []

    def plugin() -> str:
        heard.append(listen_to_plugin(listen_seconds))
        return f"the plugin answers on {OPENPLANET_HOST}:{OPENPLANET_PORT}"

    def telemetry() -> str:
        return _telemetry_verdict(heard[0], listen_seconds)

    def map_matches() -> str:
        position = heard[0][-1][1][2:5]
        away = float(np.min(np.linalg.norm(trajectory[0] - np.asarray(position), axis=1)))
        if away > REWARD_CONFIG["MAX_STRAY"]:
            path = reward_trajectory_path(tmrl_data_folder())
            raise _wrong_map_error(away, REWARD_CONFIG["MAX_STRAY"], path, anywhere=True)
        return (
            f"the car is {away:.1f} m from the reward trajectory (at most {REWARD_CONFIG['MAX_STRAY']:g} m)"
        )

    check("Windows", (), windows)
    check("tmrl", (), _require_tmrl)
    check("TmrlData", (), tmrl_data)
    check("config.json", ("TmrlData",), tmrl_config)
    check("reward trajectory", ("TmrlData",), reward_trajectory)
    check("virtual gamepad", ("tmrl",), gamepad)
    check("OpenPlanet plugin", (), plugin)
    check("telemetry", ("OpenPlanet plugin",), telemetry)
    check("map", ("telemetry", "reward trajectory"), map_matches)
    return checks


# --- building the env -----------------------------------------------------------------------------------
def _rtgym_id() -> str:
    # The implementation tmrl itself picks (config_constants.RTGYM_VERSION): one thread per time-step on
    # Windows, where tmrl's pipeline is proven with it; one persistent worker thread elsewhere.
    return "real-time-gym-v1" if platform.system() == "Windows" else "real-time-gym-ts-v1"


def import_tmrl_module(name: str) -> Any:
    """Import a tmrl module, undoing tmrl's import-time side effects on our process. TmrlData must exist
    (check it first): without it, tmrl downloads its resources while being imported."""
    # tmrl exports config.json's WANDB_KEY (by default the key of tmrl's public W&B project) into the
    # environment when imported, which would send our W&B runs there.
    wandb_key = os.environ.get("WANDB_API_KEY")
    # tmrl calls logging.basicConfig(stdout, INFO) when imported; basicConfig does nothing while the root
    # logger has a handler, so a temporary one keeps the application's logging as it was.
    root_logger = logging.getLogger()
    guard = logging.NullHandler()
    root_logger.addHandler(guard)
    try:
        return importlib.import_module(name)
    except Exception as error:
        raise TrackManiaSetupError(
            _one_line(f"importing tmrl failed ({type(error).__name__}: {error}); {_INSTALL_HINT}")
        ) from error
    finally:
        root_logger.removeHandler(guard)
        if wandb_key is None:
            os.environ.pop("WANDB_API_KEY", None)
        else:
            os.environ["WANDB_API_KEY"] = wandb_key


def _import_tmrl_interfaces() -> Any:
    return import_tmrl_module("tmrl.custom.tm.tm_gym_interfaces")


class _InterfaceErrors:
    """The first exception raised by tmrl's interface inside rtgym's worker thread, or None.

    Our own checks in that thread (telemetry, map) record their error here without raising it there: the
    calling thread raises it (see `_bounded_call`), so rtgym's thread neither dies nor hangs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.first: tuple[str, BaseException] | None = None

    def record(self, where: str, error: BaseException) -> None:
        with self._lock:
            if self.first is None:
                self.first = (where, error)

    @contextlib.contextmanager
    def recording(self, where: str) -> Iterator[None]:
        try:
            yield
        except BaseException as error:
            self.record(where, error)
            raise


def _installed_tmrl_version() -> str:
    try:
        return "tmrl " + importlib.metadata.version("tmrl")
    except importlib.metadata.PackageNotFoundError:
        return "the installed tmrl"


def _telemetry_error(detail: str) -> TelemetryError:
    return TelemetryError(
        _one_line(
            f"implausible telemetry from the OpenPlanet plugin: {detail}; the plugin 'TMRL Grab Data' is "
            f"probably of another version than {_installed_tmrl_version()}, or its data stream is "
            "misaligned: copy "
            r"%USERPROFILE%\TmrlData\resources\Plugins\TMRL_GrabData.op (from `python -m tmrl --install`) "
            r"into %USERPROFILE%\OpenplanetNext\Plugins, reload it (F3 > Developer > (Re)load plugin > "
            "TMRL Grab Data) and restart the program"
        )
    )


def _show(value: float) -> str:
    return f"{value:.6g}"


def _outside(low: float, high: float, value: float) -> bool:
    return not low - INPUT_TOLERANCE <= value <= high + INPUT_TOLERANCE


def _field_problem(frame: tuple[float, ...]) -> str | None:
    """Why one telemetry frame cannot come from the game, or None."""
    if len(frame) != len(TELEMETRY_FIELDS):
        return f"a frame of {len(frame)} values instead of {len(TELEMETRY_FIELDS)}"
    values = dict(zip(TELEMETRY_FIELDS, frame, strict=True))
    for name, value in values.items():
        if not math.isfinite(value):
            return f"{name} = {value} (not a finite number)"
    speed = values["speed"]
    if abs(speed) > MAX_ABS_SPEED_KMH:
        return (
            f"speed = {_show(speed)} km/h (beyond {MAX_ABS_SPEED_KMH:g} km/h; the game's top speed is "
            f"{TOP_SPEED_KMH:g} km/h)"
        )
    if _outside(-1.0, 1.0, values["steer"]):
        return f"steer = {_show(values['steer'])} (outside -1..1)"
    if _outside(0.0, 1.0, values["gas"]):
        return f"gas = {_show(values['gas'])} (outside 0..1)"
    for name in ("brake", "finished"):
        if values[name] not in (0.0, 1.0):
            return f"{name} = {_show(values[name])} (the plugin sends exactly 0 or 1)"
    gear = values["gear"]
    if gear != int(gear) or not 0 <= gear <= MAX_GEAR:
        return f"gear = {_show(gear)} (the game's gears are whole numbers 0..{MAX_GEAR})"
    if not 0.0 <= values["rpm"] <= MAX_RPM:
        return f"rpm = {_show(values['rpm'])} (outside 0..{MAX_RPM:g})"
    return None


def _jump_problem(frame: tuple[float, ...], previous: tuple[float, ...], elapsed: float) -> str | None:
    """Why `frame` cannot follow `previous` (same episode, `elapsed` wall-clock seconds later), or None."""
    reach = JUMP_MARGIN * TOP_SPEED_M_S * (max(elapsed, 0.0) + FRAME_AGE_SLACK)
    moved = math.dist(frame[2:5], previous[2:5])
    if moved > reach:
        return (
            f"the position (x, y, z) jumped {_show(moved)} m in {elapsed:.3f} s (at most {reach:.0f} m at "
            f"{TOP_SPEED_KMH:g} km/h)"
        )
    driven = abs(frame[1] - previous[1])
    if driven > reach:
        return (
            f"distance jumped {_show(driven)} m in {elapsed:.3f} s (at most {reach:.0f} m at "
            f"{TOP_SPEED_KMH:g} km/h)"
        )
    return None


_TELEMETRY_INFO_KEY = "_trackmania_telemetry"  # carries the step's frame from the interface to the env
_WAITED_INFO_KEY = "_trackmania_waited"  # seconds tmrl waited for that frame to arrive from the plugin


def _inconsistent_telemetry_error(detail: str) -> TelemetryError:
    return TelemetryError(
        _one_line(
            f"inconsistent telemetry from the OpenPlanet plugin: {detail}; every value is plausible but "
            "together they cannot be true (a paused game, a plugin that stopped updating or repeats a frame, "
            "a stuck finish flag): unpause the game, reload the plugin (F3 > Developer > (Re)load plugin > "
            "TMRL Grab Data) and run again (it resumes from the checkpoint saved now)"
        )
    )


def _reach(speed_kmh: float, elapsed: float) -> float:
    """How far (m) a car whose speed never exceeded `speed_kmh` can get in `elapsed` s between two frames."""
    seconds = max(elapsed, 0.0) + 2 * FRAME_AGE_SLACK  # either frame may be that much older than read
    return SPEED_MARGIN * abs(speed_kmh) / 3.6 * seconds + POSITION_SLACK_M


def _speed_problem(
    frame: tuple[float, ...], since: tuple[float, ...], elapsed: float, top_kmh: float
) -> str | None:
    """Why the car cannot have gone from `since` to `frame` in `elapsed` s at speeds up to `top_kmh`."""
    reach = _reach(top_kmh, elapsed)
    moved, driven = math.dist(frame[2:5], since[2:5]), abs(frame[1] - since[1])
    for what, metres in (("the position (x, y, z) moved", moved), ("distance grew", driven)):
        if metres > reach:
            return (
                f"{what} {_show(metres)} m in {elapsed:.2f} s while the speed never exceeded "
                f"{_show(top_kmh)} km/h (at most {reach:.1f} m)"
            )
    return None


def _stands_still_at_speed(frame: tuple[float, ...], previous: tuple[float, ...]) -> bool:
    """The same position, bit for bit, in two frames whose speeds both say the car drives."""
    return min(abs(frame[0]), abs(previous[0])) > MOVING_KMH and frame[2:5] == previous[2:5]


class _TelemetryGuard:
    """Checks every frame tmrl retrieves from the plugin, inside rtgym's worker thread, without raising there.

    A bad frame is recorded in `errors` (the calling thread raises it) and replaced by the last good one, so
    tmrl computes nothing from garbage (a garbage "finished" would pay +100 and respawn the car). After the
    first error every frame is replaced: the env is unusable from then on. Checked: each value alone
    (`_field_problem`), each frame against the previous one of its episode (no teleport at top speed, no
    move the reported speed cannot make), every CONSISTENCY_WINDOW_S of an episode (the same, and a position
    that stays put while the car reports driving), and each finish (an edge after a real run: not in the
    episode's first frame, not twice in a row, not before the car drove FINISH_MIN_TRACK_SHARE of the track,
    not faster than the track can be driven). The first reset's frame is compared with the reward
    trajectory's start (a trajectory recorded on another map). A finish's race time is the wall-clock time
    from the episode's first frame to the finish frame.
    """

    def __init__(
        self,
        errors: _InterfaceErrors,
        *,
        trajectory_start: np.ndarray | None = None,
        trajectory_path: Path | None = None,
        max_stray: float = REWARD_CONFIG["MAX_STRAY"],
        track_length_m: float = math.nan,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._errors = errors
        self._clock = clock
        self._trajectory_start = trajectory_start
        self._trajectory_path = trajectory_path
        self._max_stray = max_stray
        self._track_length_m = float(track_length_m)
        self._failed = False
        self._spawn_checked = False
        self._last_good: tuple[float, ...] = (0.0,) * len(TELEMETRY_FIELDS)
        self.latest: tuple[float, ...] | None = None  # the frame tmrl got last
        self.latest_waited = 0.0  # seconds tmrl's client waited for it
        self.race_time: float | None = None  # the latest frame's finish, timed
        # How far along the reward trajectory (0..1) tmrl's reward function last placed the car; set by the
        # interface, whose reward function it is.
        self.track_progress: Callable[[], float] = lambda: math.nan
        self.new_episode()

    def new_episode(self) -> None:
        """A respawn comes: the next frame may be anywhere, so it is not compared with the previous one."""
        self._previous: tuple[tuple[float, ...], float] | None = None  # (frame, time) in this episode
        self._start: tuple[tuple[float, ...], float] | None = None  # the episode's first frame
        self._window: tuple[tuple[float, ...], float, float] | None = None  # (frame, time, top speed)
        self._still_since: float | None = None  # since when the position repeats while the car drives
        self._still_frames = 0  # frames accepted since then: each repeated the one before
        self.race_time = None

    def _fail(self, where: str, error: TrackManiaError) -> None:
        self._failed = True
        self._errors.record(where, error)

    def filter(self, data: Any, waited: float = 0.0) -> tuple[float, ...]:
        now = self._clock()
        self.latest_waited = waited
        self.race_time = None
        if not self._failed:
            frame = tuple(float(value) for value in data)
            problem = _field_problem(frame)
            if problem is None and self._previous is not None:  # garbage: kilometres between two frames
                problem = _jump_problem(frame, self._previous[0], now - self._previous[1])
            if problem is not None:
                self._fail("reading the telemetry", _telemetry_error(problem))
            else:
                problem = self._episode_problem(frame, now)
                if problem is not None:
                    error = _inconsistent_telemetry_error(problem)
                    error.condemned_steps = self._still_frames  # 0 unless a repeated position was seen
                    self._fail("checking the telemetry", error)
                else:
                    self._accept(frame, now)
        if self._failed:
            # Still, released controls and not finished: nothing for tmrl to act on.
            frame = (0.0, *self._last_good[1:5], 0.0, 0.0, 0.0, 0.0, *self._last_good[9:])
        self.latest = frame
        return frame

    def _episode_problem(self, frame: tuple[float, ...], now: float) -> str | None:
        """Why `frame` cannot follow this episode's earlier frames, or None."""
        finished = frame[8] == 1.0
        if self._previous is None:  # the episode's first frame: right after the respawn
            if finished:
                return "the finish flag is 1 in the first frame after the respawn (a stuck finish flag)"
            return None
        previous, then = self._previous
        elapsed = now - then
        problem = _speed_problem(frame, previous, elapsed, max(abs(frame[0]), abs(previous[0])))
        if problem is not None:
            return problem
        window, window_time, top_kmh = self._window  # type: ignore[misc]  # set with _previous
        top_kmh = max(top_kmh, abs(frame[0]))
        if now - window_time >= CONSISTENCY_WINDOW_S:
            problem = _speed_problem(frame, window, now - window_time, top_kmh)
            if problem is not None:
                return problem
        if _stands_still_at_speed(frame, previous):
            still_since = self._still_since if self._still_since is not None else then
            if now - still_since >= STILL_POSITION_S:
                return (
                    f"the position (x, y, z) has not changed for {now - still_since:.2f} s while the speed "
                    f"is {_show(abs(frame[0]))} km/h (a frozen telemetry stream)"
                )
        if finished:
            start, start_time = self._start  # type: ignore[misc]  # set with _previous
            race_time, driven = now - start_time, frame[1] - start[1]
            if previous[8] == 1.0:
                return "the finish flag stayed 1 for two frames in a row (a stuck finish flag)"
            if math.isfinite(self._track_length_m):
                fastest = self._track_length_m / TOP_SPEED_M_S
                if race_time < fastest:
                    return (
                        f"a finish {race_time:.2f} s after the start, faster than the track "
                        f"({self._track_length_m:.0f} m) can be driven at {TOP_SPEED_KMH:g} km/h "
                        f"({fastest:.2f} s)"
                    )
                if driven < FINISH_MIN_TRACK_SHARE * self._track_length_m:
                    return (
                        f"a finish after the car drove {_show(driven)} m of the track's "
                        f"{self._track_length_m:.0f} m (at least {100 * FINISH_MIN_TRACK_SHARE:.0f}% for a "
                        "real one)"
                    )
            along = self.track_progress()
            if along < FINISH_MIN_PROGRESS:  # False for NaN: no reward function to ask
                return (
                    f"a finish with the car {100 * along:.0f}% along the reward trajectory (at least "
                    f"{100 * FINISH_MIN_PROGRESS:.0f}% for a real one: the recorded lap ends at the finish "
                    "line)"
                )
        return None

    def _accept(self, frame: tuple[float, ...], now: float) -> None:
        previous = self._previous
        if previous is None:
            self._start = (frame, now)
            self._window = (frame, now, abs(frame[0]))
        else:
            window, window_time, top_kmh = self._window  # type: ignore[misc]
            if now - window_time >= CONSISTENCY_WINDOW_S:
                self._window = (frame, now, abs(frame[0]))
            else:
                self._window = (window, window_time, max(top_kmh, abs(frame[0])))
            if _stands_still_at_speed(frame, previous[0]):
                self._still_since = self._still_since if self._still_since is not None else previous[1]
                self._still_frames += 1
            else:
                self._still_since, self._still_frames = None, 0
            if frame[8] == 1.0:
                self.race_time = now - self._start[1]  # type: ignore[index]
        self._previous = (frame, now)
        self._last_good = frame

    def check_spawn(self) -> None:
        """At the first reset: the car must start near the trajectory's first point, or it is another map."""
        if self._spawn_checked or self._failed or self.latest is None or self._trajectory_start is None:
            return
        self._spawn_checked = True
        away = math.dist(self.latest[2:5], self._trajectory_start)
        if away > self._max_stray:
            self._fail("checking the map", _wrong_map_error(away, self._max_stray, self._trajectory_path))

    def annotate(self, info: Any) -> dict:
        info = dict(info or {})
        if self.latest is not None:
            info[_TELEMETRY_INFO_KEY] = dict(zip(TELEMETRY_FIELDS, self.latest, strict=True))
            info[_WAITED_INFO_KEY] = self.latest_waited
        if self.race_time is not None:
            info["race_time"] = self.race_time
        return info


def _wrong_map_error(
    away: float, max_stray: float, path: Path | None, anywhere: bool = False
) -> TrackManiaSetupError:
    """`anywhere`: `away` is the distance to the trajectory's nearest point (the car may be mid-track),
    else to its start (the car just respawned)."""
    trajectory = f"the reward trajectory {path}" if path is not None else "the reward trajectory"
    where = "is {:.1f} m from every point of" if anywhere else "starts {:.1f} m from the start of"
    return TrackManiaSetupError(
        _one_line(
            f"the car {where.format(away)} {trajectory}, farther than MAX_STRAY "
            f"({max_stray:g} m): the map in the game is not the one the trajectory was recorded on, and "
            "no step would pay any reward. Load that map (tmrl's default trajectory is for the map "
            r"tmrl-test: copy %USERPROFILE%\TmrlData\resources\tmrl-test.Map.Gbx into "
            r"%USERPROFILE%\Documents\Trackmania\Maps\My Maps, then Create > Map Editor > Edit a Map > "
            "tmrl-test and the green flag), or record a trajectory on this map with "
            "`python -m tmrl --record-reward`"
        )
    )


class _CheckedClient:
    """tmrl's TM2020OpenPlanetClient, with every retrieve_data() result passed through the telemetry guard."""

    def __init__(self, client: Any, guard: _TelemetryGuard) -> None:
        self._client = client
        self._guard = guard

    def retrieve_data(self, *args: Any, **kwargs: Any) -> tuple[float, ...]:
        # tmrl's client blocks until a frame newer than the last one it returned has arrived: the wait is
        # how much slower than the agent the plugin (one frame per game frame) sends.
        started = time.monotonic()
        data = self._client.retrieve_data(*args, **kwargs)
        return self._guard.filter(data, waited=time.monotonic() - started)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class _CheckedWindow:
    """tmrl's WindowInterface, with the size of every capture compared with the first one's: tmrl sizes the
    window once, when it starts, and a window resized later (maximised, dragged) would be squeezed into the
    64x64 frames as another picture, silently. (The first capture's size is the reference rather than
    WINDOW_WIDTH x WINDOW_HEIGHT, which Windows' display scaling may turn into other pixel counts.)"""

    def __init__(self, window: Any, errors: _InterfaceErrors) -> None:
        self._window = window
        self._errors = errors
        self.size: tuple[int, int] | None = None  # (width, height) of the first capture

    def screenshot(self, *args: Any, **kwargs: Any) -> Any:
        image = self._window.screenshot(*args, **kwargs)
        height, width = (int(n) for n in np.shape(image)[:2])
        if self.size is None:
            self.size = (width, height)
        elif (width, height) != self.size:
            self._errors.record(
                "capturing the game window",
                TrackManiaSetupError(
                    f"the game window is now {width}x{height} pixels, not the {self.size[0]}x{self.size[1]} "
                    "tmrl sized it to at the start: every frame would be another picture squeezed into the "
                    "agent's 64x64; do not resize or maximise the game window while training, and run again "
                    "(it resumes from the checkpoint saved now)"
                ),
            )
        return image

    def __getattr__(self, name: str) -> Any:
        return getattr(self._window, name)


def _guarded_interface(base: type) -> type:
    """tmrl's interface class, unchanged except that its exceptions are also recorded in `errors` and its
    telemetry passes through a `_TelemetryGuard`."""

    class GuardedTM2020Interface(base):
        def __init__(
            self,
            *args: Any,
            errors: _InterfaceErrors,
            telemetry: _TelemetryGuard | None = None,
            **kwargs: Any,
        ) -> None:
            self._errors = errors
            self._telemetry = telemetry if telemetry is not None else _TelemetryGuard(errors)
            self._telemetry.track_progress = self._trajectory_share
            with errors.recording("creating the interface"):
                super().__init__(*args, **kwargs)

        def _trajectory_share(self) -> float:
            reward = self.__dict__.get("reward_function")  # tmrl creates it when it first resets
            points = int(getattr(reward, "datalen", 0))
            return float(reward.cur_idx) / (points - 1) if points >= 2 else math.nan

        # tmrl creates its telemetry client when it first resets (initialize_common); whatever it assigns
        # to `self.client` is wrapped, so every frame it reads is checked.
        @property
        def client(self) -> Any:
            return self.__dict__.get("_checked_client")

        @client.setter
        def client(self, value: Any) -> None:
            self.__dict__["_checked_client"] = (
                None if value is None else _CheckedClient(value, self._telemetry)
            )

        # The same for the window tmrl captures (initialize_common): every capture's size is checked.
        @property
        def window_interface(self) -> Any:
            return self.__dict__.get("_checked_window")

        @window_interface.setter
        def window_interface(self, value: Any) -> None:
            self.__dict__["_checked_window"] = None if value is None else _CheckedWindow(value, self._errors)

        def reset(self, seed: Any = None, options: Any = None) -> Any:
            self._telemetry.new_episode()
            with self._errors.recording("resetting the race"):
                obs, info = super().reset(seed=seed, options=options)
            self._telemetry.check_spawn()
            return obs, self._telemetry.annotate(info)

        def send_control(self, control: Any) -> None:
            with self._errors.recording("sending controls"):
                super().send_control(control)

        def get_obs_rew_terminated_info(self) -> Any:
            with self._errors.recording("capturing an observation"):
                obs, reward, terminated, info = super().get_obs_rew_terminated_info()
            info = self._telemetry.annotate(info)
            # How far along the reward trajectory the car is this episode (points of 10 cm passed).
            info["progress"] = int(getattr(self.reward_function, "cur_idx", 0))
            return obs, reward, terminated, info

        def wait(self) -> None:
            self._telemetry.new_episode()  # tmrl respawns the car here
            with self._errors.recording("respawning at the end of the episode"):
                super().wait()

    return GuardedTM2020Interface


def build_rtgym_config(config: Config, interface: Any, interface_kwargs: dict[str, Any]) -> dict[str, Any]:
    """rtgym's configuration from our pinned settings (config.json's RTGYM_CONFIG is ignored on purpose)."""
    from rtgym import DEFAULT_CONFIG_DICT

    rtgym_config = dict(DEFAULT_CONFIG_DICT)
    rtgym_config.update(
        interface=interface,
        interface_args=(),
        interface_kwargs=interface_kwargs,
        # 20 Hz: the pace the agent was trained at (and the embedded track keeps).
        time_step_duration=config.time_step_duration,
        start_obs_capture=round(max(config.time_step_duration - OBS_CAPTURE_MARGIN, 0.0), 6),
        time_step_timeout_factor=TIME_STEP_TIMEOUT_FACTOR,
        # rtgym truncates (not terminates) after this many steps.
        ep_max_length=config.ep_max_length,
        act_in_obs=True,
        act_buf_len=ACT_BUF_LEN,
        # Each episode starts from an all-zero action history, as rtgym requires when wait() is used.
        reset_act_buf=True,
        last_act_on_reset=False,
        benchmark=False,
        # At the end of an episode tmrl releases the controls and respawns the car, and rtgym pauses its
        # clock so that the pause until the next reset() is not reported as a timed-out step.
        wait_on_done=True,
    )
    return rtgym_config


def make_trackmania_env(
    config: Config,
    *,
    gamepad: bool | None = None,
    allow_non_windows: bool = False,
    step_timeout: float = DEFAULT_STEP_TIMEOUT,
    reset_timeout: float = DEFAULT_RESET_TIMEOUT,
    max_identical_frames: int = DEFAULT_MAX_IDENTICAL_FRAMES,
) -> TrackManiaEnv:
    """The TrackMania env: observations (speed, gear, rpm, images uint8 (4, 64, 64), act1, act2).

    Checks the setup and the game first (TrackManiaSetupError / GameNotRespondingError, one line), then
    builds tmrl's TM2020Interface under rtgym from our pinned settings. `gamepad` defaults to the virtual
    gamepad on Windows (analog steering) and to the keyboard elsewhere.
    """
    check_tmrl_setup(config, allow_non_windows=allow_non_windows)
    probe_openplanet()
    if gamepad is None:
        gamepad = platform.system() == "Windows"
    folder = tmrl_data_folder()
    trajectory = load_reward_trajectory(folder)  # the file tmrl reads (config_constants.REWARD_PATH)
    tm_gym_interfaces = _import_tmrl_interfaces()
    import rtgym  # noqa: F401 - registers rtgym's env ids with gymnasium

    errors = _InterfaceErrors()
    telemetry = _TelemetryGuard(
        errors,
        trajectory_start=trajectory[0],
        trajectory_path=reward_trajectory_path(folder),
        max_stray=REWARD_CONFIG["MAX_STRAY"],
        track_length_m=trajectory_length_m(trajectory),
    )
    interface_kwargs = {
        "img_hist_len": config.conv_input,
        "gamepad": gamepad,
        "save_replays": False,
        "grayscale": True,
        "resize_to": (config.img_x, config.img_y),  # cv2 order: (width, height)
        "errors": errors,
        "telemetry": telemetry,
    }
    rtgym_config = build_rtgym_config(
        config, _guarded_interface(tm_gym_interfaces.TM2020Interface), interface_kwargs
    )
    env = _bounded_call(
        lambda: gymnasium.make(_rtgym_id(), config=rtgym_config, disable_env_checker=True),
        timeout=reset_timeout,
        errors=errors,
        what="creating the environment",
    )
    return TrackManiaEnv(
        env,
        errors=errors,
        step_timeout=step_timeout,
        reset_timeout=reset_timeout,
        max_identical_frames=max_identical_frames,
        track_length_m=trajectory_length_m(trajectory),
    )


# --- watchdog -------------------------------------------------------------------------------------------
def _interface_failure(first: tuple[str, BaseException], what: str) -> TrackManiaError:
    where, error = first
    if isinstance(error, TrackManiaError):  # our own checks in rtgym's thread: already one clear line
        return error
    if _mentions_vigem(error):  # vgamepad could not reach its driver: the game is not to blame
        failure: TrackManiaError = _vigem_error(f"tmrl failed while {where}: {type(error).__name__}: {error}")
    else:
        message = _one_line(f"tmrl failed while {where} ({type(error).__name__}: {error}) during {what}")
        failure = GameNotRespondingError(f"{message}: {_GAME_CHECKS}")
    failure.__cause__ = error
    return failure


def _bounded_call(
    fn: Callable[[], Any], *, timeout: float, errors: _InterfaceErrors | None, what: str
) -> Any:
    """Run fn() in a daemon thread and wait at most `timeout` s, failing early if tmrl's thread failed.

    rtgym waits without a timeout for its worker thread, so a failure there would otherwise block forever.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as error:
            outcome["error"] = error

    worker = threading.Thread(target=run, name=f"trackmania {what}", daemon=True)
    worker.start()
    deadline = time.monotonic() + timeout
    while True:
        worker.join(min(_POLL_INTERVAL, max(deadline - time.monotonic(), 0.0)))
        if not worker.is_alive():
            break
        if errors is not None and errors.first is not None:
            raise _interface_failure(errors.first, what)
        if time.monotonic() >= deadline:
            raise GameNotRespondingError(
                f"TrackMania did not answer within {timeout:g} s during {what}: {_GAME_CHECKS}"
            )
    # With rtgym's per-step threads (Windows) a failed capture is not an exception: the next step() just
    # returns the previous observation again.
    if errors is not None and errors.first is not None:
        raise _interface_failure(errors.first, what)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# rtgym envs whose worker thread may be stuck: kept alive here because rtgym's __del__ joins that thread
# and would block whoever drops the last reference.
_ABANDONED_ENVS: list[gymnasium.Env] = []


class _CountingWarnings:
    """Stands in for the `warnings` module inside rtgym's env module, to count timed-out time-steps.

    rtgym reports them only through warnings.warn() from its worker thread, and what happens to a warning
    depends on process-wide filters (shown once, ignored, or raised by -W error), so we count at the call.
    A timeout is counted for the env it belongs to and goes no further, whatever the filters: printed for
    every late step it would bury the terminal (the training loop reports the count), and raised by a
    -W error filter it would kill rtgym's worker thread. This object only replaces `warnings` inside rtgym's
    env module, so only rtgym's own timeouts are concerned (also those of an env already abandoned after a
    failure). Every other warning is delegated to the real module unchanged.
    """

    def __init__(self, real: Any) -> None:
        self._real = real
        self.envs: weakref.WeakSet[TrackManiaEnv] = weakref.WeakSet()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def warn(
        self, message: Any, category: Any = None, stacklevel: int = 1, *args: Any, **kwargs: Any
    ) -> None:
        if str(message).startswith(_TIMEOUT_WARNING_PREFIX):
            thread = threading.current_thread()
            for env in list(self.envs):
                env._note_timeout_from(thread)
            return
        # One more stack level, so that the warning still points at rtgym's line, not at this one.
        self._real.warn(message, category, stacklevel + 1, *args, **kwargs)


def _timeout_counting() -> _CountingWarnings:
    from rtgym.envs import real_time_env

    if not isinstance(real_time_env.warnings, _CountingWarnings):
        real_time_env.warnings = _CountingWarnings(real_time_env.warnings)
    return real_time_env.warnings


class TrackManiaEnv(gymnasium.Wrapper):
    """rtgym's TrackMania env with clipped actions, bounded calls and frozen-picture detection.

    - step() clips the action into [-1, 1] (float32 (3,)) before it reaches tmrl;
    - reset() and step() fail with GameNotRespondingError after `reset_timeout` / `step_timeout` seconds,
      or as soon as tmrl raised in rtgym's worker thread; the env is unusable afterwards;
    - `max_identical_frames` consecutive steps with an unchanged newest frame while the car reports a
      speed above MOVING_SPEED, or a picture unchanged for `pause_seconds` at any speed and across
      episodes, raise GameNotRespondingError (a hidden, minimised or paused game);
    - telemetry that repeats one frame bit for bit for FROZEN_TELEMETRY_STEPS steps while the picture moves
      raises TelemetryError (the plugin stopped updating);
    - the last step of an episode has "telemetry_fps" in its info: the rate at which the plugin delivered
      frames when the agent had to wait for them (None when it never had to: the plugin kept up), and
      "telemetry_wait_share", the share of the episode spent waiting for the plugin;
    - a finish's info has "race_time": wall-clock seconds from the episode's first frame to the finish frame;
    - `time_step_timeouts` counts rtgym's "Time-step timed out" warnings for this env (the PC could not
      keep the pace); they are never printed;
    - every telemetry frame is checked: an implausible one raises TelemetryError and is never returned;
      at the first reset a car far from the reward trajectory's start raises TrackManiaSetupError;
    - each step's info has "finished" (bool, the plugin's finish flag for that step's frame) and
      `last_telemetry` holds the newest returned frame's 11 values by name (TELEMETRY_FIELDS);
    - `track_length_m` is the reward trajectory's length and `min_finish_seconds` the time the track takes
      at the game's top speed: a finish in less is not a real one;
    - `verdict_steps`: the steps it may still condemn (see the property);
    - `real_time` is True: the game runs on whether the agent is ready or not, so the actor never waits
      for the learner mid-episode (learner_max_lag bounds how far it runs ahead).
    """

    real_time = True
    player_drives = True  # a person can drive the game: recording reads their inputs, sending no control

    @property
    def verdict_steps(self) -> int:
        """How many of the latest steps a check may still condemn (the frozen picture and telemetry need
        a few steps to see): the training loop hands a step to the learner only once it is this old, so
        that none of a lie's steps reaches the replay."""
        return max(self.max_identical_frames, FROZEN_TELEMETRY_STEPS) + 2

    def __init__(
        self,
        env: gymnasium.Env,
        *,
        errors: _InterfaceErrors | None = None,
        step_timeout: float = DEFAULT_STEP_TIMEOUT,
        reset_timeout: float = DEFAULT_RESET_TIMEOUT,
        max_identical_frames: int = DEFAULT_MAX_IDENTICAL_FRAMES,
        track_length_m: float = math.nan,
        pause_seconds: float = PAUSE_SECONDS,
    ) -> None:
        super().__init__(env)
        if step_timeout <= 0 or reset_timeout <= 0 or max_identical_frames < 1 or pause_seconds <= 0:
            raise ValueError(
                "step_timeout, reset_timeout and pause_seconds must be > 0, max_identical_frames >= 1"
            )
        self.step_timeout = step_timeout
        self.reset_timeout = reset_timeout
        self.max_identical_frames = max_identical_frames
        self.pause_seconds = pause_seconds
        self._picture_since = time.monotonic()  # when the picture last changed (across episodes)
        self._picture_steps = 0  # steps and resets since then
        self._picture_resets = 0
        self._previous_telemetry: dict[str, float] | None = None
        self._frozen_telemetry = 0  # steps in a row with repeated telemetry and a moving picture
        self._episode_waits: list[float] = []  # per frame: seconds tmrl waited for the plugin
        self._episode_started = time.monotonic()
        self.track_length_m = float(track_length_m)
        self.min_finish_seconds = self.track_length_m / TOP_SPEED_M_S
        self.last_telemetry: dict[str, float] | None = None
        self._errors = errors
        self._failure: TrackManiaError | None = None
        self._previous_frame: np.ndarray | None = None
        self._identical_frames = 0
        self._timeouts = 0
        self._controls_held = False  # an episode is running: controls may be pressed in the game
        # rtgym declares the images as float boxes; they are uint8 frames.
        spaces = list(env.observation_space.spaces)
        spaces[3] = gymnasium.spaces.Box(0, 255, spaces[3].shape, np.uint8)
        self.observation_space = gymnasium.spaces.Tuple(spaces)
        _timeout_counting().envs.add(self)

    @property
    def time_step_timeouts(self) -> int:
        """How many of this env's time-steps rtgym reported as timed out."""
        return self._timeouts

    def _note_timeout_from(self, thread: threading.Thread) -> None:
        # rtgym keeps its current worker thread in `_at_thread`: that tells which env the warning is about.
        if getattr(self.env.unwrapped, "_at_thread", None) is thread:
            self._timeouts += 1

    def _bounded(self, what: str, fn: Callable[[], Any], timeout: float) -> Any:
        if self._failure is not None:
            # tmrl's telemetry client cannot be closed and keeps the plugin's only connection: a new env in
            # this process would not get any data, hence "restart".
            raise type(self._failure)(
                f"the TrackMania env failed earlier; fix that, then restart the program: {self._failure}"
            )
        try:
            return _bounded_call(fn, timeout=timeout, errors=self._errors, what=what)
        except TrackManiaError as failure:
            self._fail(failure)
            raise

    def _fail(self, failure: TrackManiaError) -> None:
        self._failure = failure
        _ABANDONED_ENVS.append(self.env)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        obs, info = self._bounded(
            "reset", lambda: self.env.reset(seed=seed, options=options), self.reset_timeout
        )
        _check_layout(obs, self.observation_space.spaces[3].shape)
        self._identical_frames = 0
        previous = self._previous_frame
        self._watch_pause(previous is not None and np.array_equal(obs[3][-1], previous), reset=True)
        self._previous_frame = obs[3][-1]
        self._episode_waits = []  # (the frozen-telemetry count goes on: a respawn does not unfreeze it)
        self._episode_started = time.monotonic()
        self._controls_held = True
        info = self._take_telemetry(info)
        self._previous_telemetry = self.last_telemetry
        return obs, info

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict]:
        # None sends no control at all: the player drives (recording demonstrations, demos.py).
        clipped = None if action is None else clip_action(action)
        obs, reward, terminated, truncated, info = self._bounded(
            "step", lambda: self.env.step(clipped), self.step_timeout
        )
        # At the end of an episode rtgym already called tmrl's wait(), which released the controls.
        self._controls_held = not (terminated or truncated)
        info = self._take_telemetry(info)
        self._watch_frames(obs)
        if terminated or truncated:
            info.update(self._plugin_pace())
        return obs, reward, terminated, truncated, info

    def _take_telemetry(self, info: Any) -> dict:
        """Move the frame the interface attached to this observation into `last_telemetry`."""
        info = dict(info or {})
        frame = info.pop(_TELEMETRY_INFO_KEY, None)
        self._episode_waits.append(float(info.pop(_WAITED_INFO_KEY, 0.0)))
        if frame is not None:
            self.last_telemetry = frame
        info["finished"] = bool(frame is not None and frame["finished"])
        return info

    def _plugin_pace(self) -> dict[str, float | None]:
        """How fast the plugin delivered this episode's frames, when the agent had to wait for them."""
        waits = self._episode_waits
        seconds = max(time.monotonic() - self._episode_started, 1e-9)
        waited = [w for w in waits if w > PLUGIN_WAIT_S]
        # Waiting for each frame, the agent got one per plugin frame: frames per second of waiting and acting.
        fps = len(waits) / seconds if len(waited) > len(waits) / 2 else None
        return {"telemetry_fps": fps, "telemetry_wait_share": min(sum(waited) / seconds, 1.0)}

    def _stop(self, failure: TrackManiaError, condemned_steps: int = 0) -> None:
        """Fail with `failure`; `condemned_steps` of the steps returned before this one were part of it."""
        failure.condemned_steps = max(condemned_steps, 0)
        self._fail(failure)
        raise failure

    def _watch_frames(self, obs: Any) -> None:
        frame, speed = obs[3][-1], float(obs[0][0])
        previous = self._previous_frame
        same = previous is not None and np.array_equal(frame, previous)
        self._identical_frames = self._identical_frames + 1 if same and speed > MOVING_SPEED else 0
        if self._identical_frames >= self.max_identical_frames:
            self._stop(
                GameNotRespondingError(
                    f"the game picture has not changed for {self._identical_frames} steps while the car "
                    f"reports speed {speed:.1f} km/h (a frozen capture or a paused game): {_GAME_CHECKS}"
                ),
                self._identical_frames - 1,
            )
        self._watch_pause(same, reset=False)
        telemetry, repeated = self.last_telemetry, self._previous_telemetry
        moving_picture = previous is not None and not same and _picture_moves(previous, frame)
        repeats = telemetry is not None and telemetry == repeated and moving_picture
        self._frozen_telemetry = self._frozen_telemetry + 1 if repeats else 0
        if self._frozen_telemetry >= FROZEN_TELEMETRY_STEPS:
            self._stop(
                _inconsistent_telemetry_error(
                    f"the telemetry repeated one frame bit for bit for {self._frozen_telemetry} steps while "
                    "the game picture moved at every one (the plugin stopped updating)"
                ),
                self._frozen_telemetry - 1,
            )
        self._previous_frame, self._previous_telemetry = frame, telemetry

    def _watch_pause(self, same: bool, reset: bool) -> None:
        """A picture that stays the same (`same`: as the previous step's), at any speed and across
        episodes, for `pause_seconds`."""
        now = time.monotonic()
        if not same:
            self._picture_since, self._picture_steps, self._picture_resets = now, 0, 0
            return
        self._picture_steps += not reset
        self._picture_resets += reset
        if now - self._picture_since >= self.pause_seconds:
            self._stop(
                GameNotRespondingError(
                    f"the game picture has not changed for {now - self._picture_since:.1f} s "
                    f"({self._picture_steps} steps, {self._picture_resets} respawns): the game is paused, "
                    f"or its window is minimised or covered: {_GAME_CHECKS}"
                ),
                self._picture_steps - (not reset),
            )

    def close(self) -> None:
        # wait() releases the controls (a held virtual pedal would keep the car going) and respawns it.
        if self._failure is None and self._controls_held:
            self._controls_held = False
            try:
                self._bounded("close", self.env.unwrapped.wait, self.step_timeout)
            except GameNotRespondingError as failure:
                logger.warning("could not release the TrackMania controls on close: %s", failure)
        super().close()


def _picture_moves(before: np.ndarray, after: np.ndarray) -> bool:
    """Whether most of the picture changed, as when the camera follows a moving car (not just a clock)."""
    changed = np.abs(after.astype(np.int16) - before.astype(np.int16)) > PICTURE_MOTION_LEVELS
    return bool(changed.mean() > PICTURE_MOTION_SHARE)


def _check_layout(obs: Any, image_shape: tuple[int, ...]) -> None:
    """The agent relies on (speed (1,), gear (1,), rpm (1,), images uint8, act1 (3,), act2 (3,))."""
    expected = [((1,), "float32")] * 3 + [(image_shape, "uint8")] + [((3,), "float32")] * ACT_BUF_LEN
    actual = [
        (getattr(part, "shape", None), str(getattr(part, "dtype", type(part).__name__))) for part in obs
    ]
    if actual != expected:
        raise TrackManiaSetupError(
            f"tmrl/rtgym returned observations laid out as {actual}, not {expected} (speed, gear, rpm, "
            "images, act1, act2): install the tmrl and rtgym versions of the requirements"
        )


# --- thread errors and tmrl/rtgym logging, away from the terminal ---------------------------------------
_ROUTED_PACKAGES = ("tmrl", "rtgym")


class _QuietFileHandler(logging.FileHandler):
    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        pass  # a log file that cannot be written must not print its own traceback to the terminal either


@functools.cache
def _routed_package_dirs() -> tuple[str, ...]:
    # tmrl logs through the root logger (logging.info(...)), so its records are told by their file.
    # find_spec on a top-level package locates it without importing it.
    folders = []
    for name in _ROUTED_PACKAGES:
        spec = find_spec(name)
        for folder in (spec.submodule_search_locations or []) if spec is not None else []:
            folders.append(os.path.normcase(os.path.join(os.path.abspath(folder), "")))
    return tuple(folders)


def _from_routed_package(record: logging.LogRecord) -> bool:
    if record.name.split(".")[0] in _ROUTED_PACKAGES:
        return True
    path = os.path.normcase(os.path.abspath(record.pathname or ""))
    return any(path.startswith(folder) for folder in _routed_package_dirs())


def _writes_to_terminal(handler: logging.Handler) -> bool:
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return False
    stream = handler.stream
    if any(stream is std for std in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)):
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _reaches_terminal(logger: logging.Logger, level: int) -> bool:
    """Whether a record of `level` created on `logger` would be printed by a terminal handler."""
    current: logging.Logger | None = logger
    while current is not None:
        if any(_writes_to_terminal(h) and level >= h.level for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False  # logging's last-resort handler prints WARNING and above only


class _RouteBelowWarning(logging.Filter):
    """On a logger: tmrl/rtgym records below WARNING that would reach the terminal go to the file instead."""

    def __init__(self, logger: logging.Logger, handler: logging.Handler) -> None:
        super().__init__()
        self._logger = logger
        self._handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or not _from_routed_package(record):
            return True
        if not _reaches_terminal(self._logger, record.levelno):
            return True
        self._handler.handle(record)
        return False


def route_thread_errors(log_path: Path) -> Callable[[], None]:
    """Send what tmrl's and rtgym's threads would print to the terminal to `log_path`; returns `uninstall`.

    - uncaught exceptions of threads other than the main one (threading.excepthook: tmrl's telemetry client
      when the plugin stops, rtgym's worker when tmrl raises in it) are appended to the file with a
      timestamp, the thread's name and the full traceback, and nothing is written to the terminal (the env
      raises its own one-line error in the calling thread);
    - tmrl's and rtgym's `logging` records below WARNING that would be printed on the terminal go to the file
      instead (WARNING and above are left alone). Call it after the application configured its logging.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = _QuietFileHandler(log_path, encoding="utf-8", delay=True)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s [%(threadName)s] %(name)s: %(message)s")
    )
    previous_hook = threading.excepthook

    def excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:  # as the default hook: a thread may end itself this way
            return
        name = args.thread.name if args.thread is not None else "an unknown thread"
        record = logging.LogRecord(
            "trackmania.threads",
            logging.ERROR,
            __file__,
            0,
            "uncaught exception in thread %r",
            (name,),
            (args.exc_type, args.exc_value, args.exc_traceback),
        )
        handler.handle(record)

    threading.excepthook = excepthook
    filtered = [logging.getLogger(), *(logging.getLogger(name) for name in _ROUTED_PACKAGES)]
    filters = [(logger, _RouteBelowWarning(logger, handler)) for logger in filtered]
    for logger, log_filter in filters:
        logger.addFilter(log_filter)

    def uninstall() -> None:
        if threading.excepthook is excepthook:
            threading.excepthook = previous_hook
        for logger, log_filter in filters:
            logger.removeFilter(log_filter)
        handler.close()

    return uninstall
