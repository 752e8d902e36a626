"""The TrackMania set-up, checked before tmrl is imported: `check_tmrl_setup` (raises at the first problem,
before building the env), `setup_report` (`python env_tm.py --check-trackmania`: every step, one line each)
and `check_tmrl_available` (whether `--env auto` can pick the game).

tmrl reads ~/TmrlData/config/config.json as soon as it is imported, and downloads its resources from the
internet when that folder is missing. We check the folder and every value of config.json that matters
BEFORE importing tmrl, so a wrong setup ends in one readable line instead of a download or a KeyError. Here:
- TmrlData and config.json: every key tmrl reads, and the values pinned to rainbow-tm's settings;
- the reward trajectory tmrl pays along (without it tmrl silently uses a dummy that never pays);
- the virtual gamepad's driver ViGEmBus (Windows), and its error (`vigem_error`, `mentions_vigem`: the env
  names the driver too when tmrl's gamepad fails mid-run);
- the OpenPlanet plugin's address and frame layout, and `listen_to_plugin`, which reads its frames (the
  report checks them with tm_telemetry.py's plausibility rules, and the car's place against the trajectory);
- `import_tmrl_module`, which imports tmrl once the set-up is known good, undoing its side effects.

Third of the TrackMania modules (tm_game < tm_telemetry < tm_setup < trackmania): imports tm_config,
tm_game and tm_telemetry. tmrl is a Windows-only dependency: it is imported lazily, inside functions, never
at module import.

Windows setup (from tmrl's install guide):
  1. install TrackMania 2020 and Openplanet (it needs the Visual C++ runtime);
  2. `pip install tmrl` (accept the virtual gamepad driver it installs), then `python -m tmrl --install`;
  3. check that `OpenplanetNext/Plugins` holds `TMRL_GrabData.op` (else copy `TmrlData/resources/Plugins`);
  4. start a map, press F3, Developer > (Re)load plugin > TMRL Grab Data, F3 again; game in windowed mode.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import pickle
import platform
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from tm_config import Config
from tm_game import (
    GAME_CHECKS,
    INSTALL_HINT,
    REWARD_CONFIG,
    WINDOW_HEIGHT,
    WINDOW_WIDTH,
    GameNotRespondingError,
    TrackManiaError,
    TrackManiaSetupError,
    installed_tmrl_version,
    one_line_message,
)
from tm_telemetry import (
    TELEMETRY_FIELDS,
    field_problem,
    implausible_telemetry_error,
    jump_problem,
    wrong_map_error,
)

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

# --- what rainbow-tm pins in tmrl's config.json and reward trajectory -----------------------------------
SLEEP_TIME_AT_RESET = 1.5  # seconds tmrl waits after a respawn, for the start countdown
MIN_TMRL_CONFIG_VERSION = (0, 6, 0)  # tmrl refuses older config.json files
# The reward trajectory tmrl pays along: `python -m tmrl --record-reward` resamples a driven lap to one point
# every 0.1 m, so a real one is long and its points advance. Shorter than MIN_TRAJECTORY_M, or with more than
# MAX_STILL_POINTS_SHARE of its steps shorter than STILL_POINT_M, it pays for nothing the car does.
MIN_TRAJECTORY_M = 50.0
STILL_POINT_M = 0.01
MAX_STILL_POINTS_SHARE = 0.01


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
        raise TrackManiaSetupError(one_line_message(f"cannot read {path}: {error}")) from error
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
        message = one_line_message(f"cannot read the reward trajectory {path} ({error}): {record}")
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


def vigem_error(detail: str) -> TrackManiaSetupError:
    return TrackManiaSetupError(
        one_line_message(
            f"the virtual gamepad driver ViGEmBus is missing or not running ({detail}), so tmrl could not "
            f"move the car: {_VIGEM_FIX}"
        )
    )


def mentions_vigem(error: BaseException) -> bool:
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
        raise vigem_error(f"importing vgamepad raised {type(error).__name__}: {error}") from error


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
        raise TrackManiaSetupError(f"tmrl is not installed: {INSTALL_HINT}")
    return installed_tmrl_version()


def _require_tmrl_data() -> Path:
    folder = tmrl_data_folder()
    if not folder.is_dir():
        # Importing tmrl now would make it download its resources: tell the user to do it knowingly.
        raise TrackManiaSetupError(f"no TmrlData folder at {folder}: {INSTALL_HINT}")
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
                f"nothing answers on {address} (the OpenPlanet plugin 'TMRL Grab Data'): {GAME_CHECKS}"
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
        return one_line_message(str(error))
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
        problem = field_problem(frame)
        if problem is None and previous is not None:
            problem = jump_problem(frame, previous[1], arrived - previous[0])
        if problem is not None:
            raise implausible_telemetry_error(problem)
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
            checks.append(SetupCheck(name, False, one_line_message(str(error))))

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
            raise wrong_map_error(away, REWARD_CONFIG["MAX_STRAY"], path, anywhere=True)
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


# --- importing tmrl, once the set-up is known good --------------------------------------------------------
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
            one_line_message(f"importing tmrl failed ({type(error).__name__}: {error}); {INSTALL_HINT}")
        ) from error
    finally:
        root_logger.removeHandler(guard)
        if wandb_key is None:
            os.environ.pop("WANDB_API_KEY", None)
        else:
            os.environ["WANDB_API_KEY"] = wandb_key
