"""TrackMania 2020 through tmrl, as a validated Gymnasium env bounded by watchdogs.

The game runs on Windows with the OpenPlanet plugin "TMRL Grab Data". tmrl's `TM2020Interface` grabs the
game window, reads the car's telemetry from the plugin over TCP, computes the reward from a recorded
trajectory and drives with a virtual gamepad; rtgym paces it at a fixed 20 Hz in a worker thread.
`make_trackmania_env` builds it, once the set-up is checked; what this module adds around tmrl, and why:
- the rtgym configuration (20 Hz, frame stack, action buffer, episode length) is built from our pinned
  `Config`, never taken from config.json.
- rtgym runs tmrl in a worker thread: an exception there makes reset()/step() hang forever (Linux) or
  silently repeat the last observation (Windows). `TrackManiaEnv` records those exceptions, bounds every
  call with a watchdog and notices a frozen picture, a paused game and a frozen telemetry stream, and raises
  `GameNotRespondingError` saying what to check.
- tmrl's interface is wrapped so that every telemetry frame passes through tm_telemetry.py's guard and
  every capture's size is checked.
- rtgym's "Time-step timed out" warnings (the PC could not keep 20 Hz) are counted per env and never
  printed (the training loop reports the count).

The top of the TrackMania modules (tm_game < tm_telemetry < tm_setup < trackmania): it imports the others,
none imports it: tm_game.py (the errors and what all parts share), tm_telemetry.py (the telemetry guard),
tm_setup.py (the set-up checks, `--check-trackmania`). tm_logs.py stands apart (the training loop imports it):
it routes tmrl's and rtgym's thread errors and logs to a file.
tmrl is a Windows-only dependency: it is imported lazily, inside functions, never at module import.
"""

from __future__ import annotations

import logging
import math
import platform
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import gymnasium
import numpy as np

from tm_config import Config, Runtime, clip_action
from tm_game import (
    GAME_CHECKS,
    REWARD_CONFIG,
    GameNotRespondingError,
    InterfaceErrors,
    TrackManiaError,
    TrackManiaSetupError,
    one_line_message,
)
from tm_setup import (
    check_tmrl_setup,
    import_tmrl_module,
    load_reward_trajectory,
    mentions_vigem,
    probe_openplanet,
    reward_trajectory_path,
    tmrl_data_folder,
    trajectory_length_m,
    vigem_error,
)
from tm_telemetry import (
    TELEMETRY_INFO_KEY,
    TOP_SPEED_M_S,
    WAITED_INFO_KEY,
    CheckedClient,
    TelemetryGuard,
    inconsistent_telemetry_error,
)

logger = logging.getLogger(__name__)

# --- pinned rtgym settings (tmrl's defaults for its screenshot pipeline) --------------------------------
ACT_BUF_LEN = 2  # the observation ends with the last two actions (the real-time delay makes them state)
# Observations are captured this long before the end of each time-step: late enough to be fresh, early
# enough for the screenshot and its resize (about 10 ms) to finish inside the step (0.04 s at 20 Hz).
OBS_CAPTURE_MARGIN = 0.01
# A time-step may overrun by at most this many time-steps before rtgym drops it and warns "timed out".
TIME_STEP_TIMEOUT_FACTOR = 1.0

# --- watchdog defaults ---------------------------------------------------------------------------------
# The step and reset timeouts are runtime knobs: tm_config.Runtime (game_step_timeout_s, _reset_timeout_s).
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


# --- building the env -----------------------------------------------------------------------------------
def _rtgym_id() -> str:
    # The implementation tmrl itself picks (config_constants.RTGYM_VERSION): one thread per time-step on
    # Windows, where tmrl's pipeline is proven with it; one persistent worker thread elsewhere.
    return "real-time-gym-v1" if platform.system() == "Windows" else "real-time-gym-ts-v1"


def _import_tmrl_interfaces() -> Any:
    return import_tmrl_module("tmrl.custom.tm.tm_gym_interfaces")


class _CheckedWindow:
    """tmrl's WindowInterface, with the size of every capture compared with the first one's: tmrl sizes the
    window once, when it starts, and a window resized later (maximised, dragged) would be squeezed into the
    64x64 frames as another picture, silently. (The first capture's size is the reference rather than
    WINDOW_WIDTH x WINDOW_HEIGHT, which Windows' display scaling may turn into other pixel counts.)"""

    def __init__(self, window: Any, errors: InterfaceErrors) -> None:
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
    telemetry passes through a `TelemetryGuard`."""

    class GuardedTM2020Interface(base):
        def __init__(
            self,
            *args: Any,
            errors: InterfaceErrors,
            telemetry: TelemetryGuard | None = None,
            **kwargs: Any,
        ) -> None:
            self._errors = errors
            self._telemetry = telemetry if telemetry is not None else TelemetryGuard(errors)
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
                None if value is None else CheckedClient(value, self._telemetry)
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
    step_timeout: float = Runtime.game_step_timeout_s,
    reset_timeout: float = Runtime.game_reset_timeout_s,
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

    errors = InterfaceErrors()
    telemetry = TelemetryGuard(
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
    if mentions_vigem(error):  # vgamepad could not reach its driver: the game is not to blame
        failure: TrackManiaError = vigem_error(f"tmrl failed while {where}: {type(error).__name__}: {error}")
    else:
        message = one_line_message(
            f"tmrl failed while {where} ({type(error).__name__}: {error}) during {what}"
        )
        failure = GameNotRespondingError(f"{message}: {GAME_CHECKS}")
    failure.__cause__ = error
    return failure


def _bounded_call(fn: Callable[[], Any], *, timeout: float, errors: InterfaceErrors | None, what: str) -> Any:
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
                f"TrackMania did not answer within {timeout:g} s during {what}: {GAME_CHECKS}"
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
    on_screen = True  # the game shows itself: a watcher looks at its window, nothing is drawn for it
    thread_log = "trackmania.log"  # in the run folder: tmrl's and rtgym's threads report there (tm_logs)

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
        errors: InterfaceErrors | None = None,
        step_timeout: float = Runtime.game_step_timeout_s,
        reset_timeout: float = Runtime.game_reset_timeout_s,
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
        frame = info.pop(TELEMETRY_INFO_KEY, None)
        self._episode_waits.append(float(info.pop(WAITED_INFO_KEY, 0.0)))
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
                    f"reports speed {speed:.1f} km/h (a frozen capture or a paused game): {GAME_CHECKS}"
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
                inconsistent_telemetry_error(
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
                    f"or its window is minimised or covered: {GAME_CHECKS}"
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
