"""The telemetry guard: every frame tmrl reads from the OpenPlanet plugin, checked before tmrl uses it.

A plugin of another version or a misaligned stream gives garbage observations and episodes that "finish" in a
few steps; a plugin that stops updating, a stuck finish flag or a teleport give frames whose every value is
plausible but which cannot all be true. Either would train the agent on lies, silently. Here:
- the plausibility rules of one frame (`field_problem`: finite, within the game's physical limits) and of
  two frames of one episode (`jump_problem`: no teleport at top speed), with the constants they use; the
  set-up report (tm_setup.py) applies them to the frames it listens to;
- the consistency rules of an episode (`_speed_problem`, `_stands_still_at_speed`, the finish's rules);
- `TelemetryGuard`, which applies all of them inside rtgym's worker thread, replaces a bad frame by the
  last good one and records a `TelemetryError` for the calling thread, and compares the car's spawn with
  the reward trajectory's start at the first reset (a trajectory recorded on another map would pay no
  reward, forever and silently: `wrong_map_error`);
- `CheckedClient`, tmrl's telemetry client with every frame passed through the guard (trackmania.py
  plugs it into tmrl's interface);
- the errors the rules end in (`implausible_telemetry_error`, `inconsistent_telemetry_error`,
  `wrong_map_error`), and the `info` keys under which the guard hands each step's frame and wait to the env
  (`TELEMETRY_INFO_KEY`, `WAITED_INFO_KEY`).

Second of the TrackMania modules (tm_game < tm_telemetry < tm_setup < trackmania): imports tm_game only;
nothing here imports tmrl.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tm_game import (
    REWARD_CONFIG,
    InterfaceErrors,
    TelemetryError,
    TrackManiaError,
    TrackManiaSetupError,
    installed_tmrl_version,
    one_line_message,
)

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


def implausible_telemetry_error(detail: str) -> TelemetryError:
    return TelemetryError(
        one_line_message(
            f"implausible telemetry from the OpenPlanet plugin: {detail}; the plugin 'TMRL Grab Data' is "
            f"probably of another version than {installed_tmrl_version()}, or its data stream is "
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


def field_problem(frame: tuple[float, ...]) -> str | None:
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


def jump_problem(frame: tuple[float, ...], previous: tuple[float, ...], elapsed: float) -> str | None:
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


TELEMETRY_INFO_KEY = "_trackmania_telemetry"  # carries the step's frame from the interface to the env
WAITED_INFO_KEY = "_trackmania_waited"  # seconds tmrl waited for that frame to arrive from the plugin


def inconsistent_telemetry_error(detail: str) -> TelemetryError:
    return TelemetryError(
        one_line_message(
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


class TelemetryGuard:
    """Checks every frame tmrl retrieves from the plugin, inside rtgym's worker thread, without raising there.

    A bad frame is recorded in `errors` (the calling thread raises it) and replaced by the last good one, so
    tmrl computes nothing from garbage (a garbage "finished" would pay +100 and respawn the car). After the
    first error every frame is replaced: the env is unusable from then on. Checked: each value alone
    (`field_problem`), each frame against the previous one of its episode (no teleport at top speed, no
    move the reported speed cannot make), every CONSISTENCY_WINDOW_S of an episode (the same, and a position
    that stays put while the car reports driving), and each finish (an edge after a real run: not in the
    episode's first frame, not twice in a row, not before the car drove FINISH_MIN_TRACK_SHARE of the track,
    not faster than the track can be driven). The first reset's frame is compared with the reward
    trajectory's start (a trajectory recorded on another map). A finish's race time is the wall-clock time
    from the episode's first frame to the finish frame.
    """

    def __init__(
        self,
        errors: InterfaceErrors,
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
            problem = field_problem(frame)
            if problem is None and self._previous is not None:  # garbage: kilometres between two frames
                problem = jump_problem(frame, self._previous[0], now - self._previous[1])
            if problem is not None:
                self._fail("reading the telemetry", implausible_telemetry_error(problem))
            else:
                problem = self._episode_problem(frame, now)
                if problem is not None:
                    error = inconsistent_telemetry_error(problem)
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
            self._fail("checking the map", wrong_map_error(away, self._max_stray, self._trajectory_path))

    def annotate(self, info: Any) -> dict:
        info = dict(info or {})
        if self.latest is not None:
            info[TELEMETRY_INFO_KEY] = dict(zip(TELEMETRY_FIELDS, self.latest, strict=True))
            info[WAITED_INFO_KEY] = self.latest_waited
        if self.race_time is not None:
            info["race_time"] = self.race_time
        return info


def wrong_map_error(
    away: float, max_stray: float, path: Path | None, anywhere: bool = False
) -> TrackManiaSetupError:
    """`anywhere`: `away` is the distance to the trajectory's nearest point (the car may be mid-track),
    else to its start (the car just respawned)."""
    trajectory = f"the reward trajectory {path}" if path is not None else "the reward trajectory"
    where = "is {:.1f} m from every point of" if anywhere else "starts {:.1f} m from the start of"
    return TrackManiaSetupError(
        one_line_message(
            f"the car {where.format(away)} {trajectory}, farther than MAX_STRAY "
            f"({max_stray:g} m): the map in the game is not the one the trajectory was recorded on, and "
            "no step would pay any reward. Load that map (tmrl's default trajectory is for the map "
            r"tmrl-test: copy %USERPROFILE%\TmrlData\resources\tmrl-test.Map.Gbx into "
            r"%USERPROFILE%\Documents\Trackmania\Maps\My Maps, then Create > Map Editor > Edit a Map > "
            "tmrl-test and the green flag), or record a trajectory on this map with "
            "`python -m tmrl --record-reward`"
        )
    )


class CheckedClient:
    """tmrl's TM2020OpenPlanetClient, with every retrieve_data() result passed through the telemetry guard."""

    def __init__(self, client: Any, guard: TelemetryGuard) -> None:
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
