"""The embedded default environment: gymnasium's CarRacing behind tmrl's TrackMania interface.

No machine of this project has TrackMania, so the agent trains and is tested on this stand-in, which
speaks exactly the interface of tmrl 0.7.1's "TM20FULL" environment as wrapped by rtgym 0.16.

Observation (a tuple, in this order, as rtgym builds it: interface observation + action buffer):
    speed  (1,) float32  km/h, in [0, 1000]
    gear   (1,) float32  0..6
    rpm    (1,) float32  engine rpm, in [RPM_IDLE, RPM_MAX]
    images (4, 64, 64) uint8  grayscale history, oldest frame first, newest last
    act1   (3,) float32  the older of the last two actions passed to step()
    act2   (3,) float32  the action passed to the latest step()
Action: float32 (3,) = [gas, brake, steer] in [-1, 1], steer -1 = full left (tm_config.ACTIONS).

rtgym conventions kept here:
- The action buffer holds the last two actions, oldest first; reset() fills it with the default action
  (zeros), so the reset observation ends with (zeros, zeros).
- rtgym is real time: step(a_t) returns the observation captured while a_{t-1} was being applied, and a_t
  is applied from then on (during the next 50 ms). With `delayed_actions=True` (the default) this
  environment does the same, so act1 is the action whose effect the returned frame shows and act2 is the
  action about to be applied, and the reward returned by step(a_t) was earned under a_{t-1}. The first
  step after reset() simulates the default action (zeros), as rtgym does. `delayed_actions=False` gives
  plain gymnasium semantics: step(a_t) applies a_t and returns its result.
- truncated = (steps since reset >= ep_max_length) and not terminated; stepping a finished episode
  raises RuntimeError ("Call reset before step"), as rtgym does.
- tmrl declares the image Box as float32 although it ships uint8 frames; here the Box is uint8 so that
  `observation_space.contains(obs)` holds. Every other Box mirrors tmrl's bounds with dtype float32.

Pace: TrackMania runs at 20 Hz, CarRacing simulates 1/50 s per tick, so one agent step is 2.5 ticks.
Agent step k (counted from reset) runs ticks(k) = floor(2.5 (k+1)) - floor(2.5 k) ticks: 2, 3, 2, 3, ...
exactly 100 ms per two steps, 50 ms per step on average. A tick that terminates CarRacing ends the repeat.
Only the last tick of a repeat is rendered: rendering has no effect on the physics, and the frames in
between would be thrown away.

Car floats (CarRacing has no gearbox or engine, so gear and rpm are synthetic but coupled to the physics):
    speed = 3.6 * |hull linear velocity|, clipped to [0, 1000]. One Box2D unit is taken as one metre:
            the hull is 5 units long and the car 2.4 wide, like a real car, and full gas peaks near 340 km/h,
            the scale of a TrackMania car.
    gear  = number of thresholds in GEAR_UPSHIFT_KMH = (1, 60, 110, 160, 210, 260) that speed has
            reached: 0 below 1 km/h (stopped/neutral), 6 from 260 km/h.
    rpm   = clip(|omega_rear| * 60 / (2 pi) * GEAR_RATIOS[gear], RPM_IDLE, RPM_MAX), where omega_rear is
            the mean angular velocity (rad/s) of the two driven rear wheels (car.wheels[2] and [3]) and
            GEAR_RATIOS = (0, 11.8, 8.9, 7.7, 7.1, 6.7, 5.6) (overall ratio, gear 0 = neutral: idling).
            CarRacing's driven wheels spin well past rolling speed under gas (about 2.7x at 60 km/h,
            1.1x at 300 km/h), so the ratios are calibrated on full-gas runs: full throttle reaches about
            10,000 rpm at each upshift speed (and at 330 km/h in 6th), then drops on the upshift, the
            saw-tooth of TrackMania's rev counter; coasting (no slip) reads lower, braking to a stop idles.

Images: CarRacing's 96x96 RGB frame, minus its bottom 12-row indicator bar (speed, ABS, steering and
gyro bars, plus the score text: our car floats already carry the speed, and the score is the reward,
which must not leak into the pixels) and 6 columns each side, so the kept 84x84 square around the car
shrinks to 64x64 (cv2 INTER_AREA) without distortion, then cv2 RGB -> gray, as tmrl does on the game.
reset() fills the history with 4 copies of the first frame, as tmrl does.

Determinism: the same seed and the same action sequence give identical observations and rewards.
reset(seed=None) after a seeded reset continues CarRacing's seeded generator, so a run that seeds only
its first reset still sees the same sequence of tracks. `make_embedded_track(config, seed)` applies
`seed` at the first reset when that reset is not given one.
"""

from __future__ import annotations

import bisect
import math
from fractions import Fraction
from typing import Any

import cv2
import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.envs.box2d import car_racing
from numpy.typing import ArrayLike

from tm_config import Config, clip_action

SECONDS_PER_STEP = 0.05  # TrackMania's 20 Hz
IMAGE_SIZE = 64
HISTORY_LENGTH = 4
KMH_PER_UNIT_PER_SECOND = 3.6  # one Box2D unit is one metre
MAX_SPEED_KMH = 1000.0  # tmrl's speed bound
GEAR_UPSHIFT_KMH = (1.0, 60.0, 110.0, 160.0, 210.0, 260.0)
GEAR_RATIOS = (0.0, 11.8, 8.9, 7.7, 7.1, 6.7, 5.6)
RPM_IDLE = 1000.0
RPM_MAX = 11000.0
DEFAULT_ACTION = np.zeros(3, dtype=np.float32)  # rtgym's default action, applied at reset
DEFAULT_ACTION.flags.writeable = False  # shared by every episode

_FPS = car_racing.FPS  # physics ticks per simulated second (50)
_HUD_ROWS = 12  # CarRacing's indicator bar: 5/40 of the frame height
_CROP_COLUMNS = 6  # each side, so that the kept region is square
_RADIANS_PER_SECOND_TO_RPM = 60.0 / (2.0 * math.pi)


# --- pure helpers (also used by the tests) ---------------------------------------------------------------
def speed_kmh(velocity_x: float, velocity_y: float) -> float:
    """The hull's speed in km/h, clipped to tmrl's [0, 1000]."""
    return min(KMH_PER_UNIT_PER_SECOND * math.hypot(velocity_x, velocity_y), MAX_SPEED_KMH)


def gear_for_speed(speed: float) -> int:
    """0 (stopped/neutral) below 1 km/h, then one gear more at each threshold of GEAR_UPSHIFT_KMH."""
    return bisect.bisect_right(GEAR_UPSHIFT_KMH, speed)


def engine_rpm(rear_wheel_omega: float, gear: int) -> float:
    """Engine rpm from the driven wheels' angular velocity (rad/s) through the gear's overall ratio."""
    rpm = abs(rear_wheel_omega) * _RADIANS_PER_SECOND_TO_RPM * GEAR_RATIOS[gear]
    return min(max(rpm, RPM_IDLE), RPM_MAX)


def ticks_per_step(seconds_per_step: float) -> Fraction:
    """Physics ticks per agent step as an exact fraction (5/2 at 50 ms), so the pace never drifts."""
    return Fraction(seconds_per_step).limit_denominator(1000) * _FPS


def ticks_for_step(step_index: int, per_step: Fraction = Fraction(5, 2)) -> int:
    """Physics ticks of agent step `step_index` (from 0): floor(per_step * (k + 1)) - floor(per_step * k)."""
    p, q = per_step.numerator, per_step.denominator
    return (p * (step_index + 1)) // q - (p * step_index) // q


def to_car_racing_action(action: ArrayLike) -> np.ndarray:
    """tmrl [gas, brake, steer] -> CarRacing [steer, gas, brake] (float64), after `clip_action`.

    Both steer conventions agree (+1 = full right: CarRacing negates it into the Box2D wheel joint), so
    steer passes through; a negative gas or brake means "not pressed" (0), as tmrl's keyboard mode reads
    `gas > 0` and `brake > 0`.
    """
    gas, brake, steer = clip_action(action).astype(np.float64)
    return np.array([steer, max(gas, 0.0), max(brake, 0.0)])


def preprocess_frame(rgb: np.ndarray) -> np.ndarray:
    """CarRacing's (96, 96, 3) RGB frame -> (64, 64) grayscale uint8, indicator bar cropped off."""
    height, width = rgb.shape[:2]
    kept = rgb[: height - _HUD_ROWS, _CROP_COLUMNS : width - _CROP_COLUMNS]
    gray = cv2.cvtColor(np.ascontiguousarray(kept), cv2.COLOR_RGB2GRAY)  # gray first: resize 1 channel
    return cv2.resize(gray, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA)


# --- CarRacing, rendered faster ------------------------------------------------------------------------
# The grass patches CarRacing draws every frame (a fixed 20x20 grid), built once.
_G = car_racing.GRASS_DIM
_GRASS_POLYGONS = [
    [(_G * x + _G, _G * y), (_G * x, _G * y), (_G * x, _G * y + _G), (_G * x + _G, _G * y + _G)]
    for x in range(-20, 20, 2)
    for y in range(-20, 20, 2)
]
_GRASS_VERTICES = np.array(_GRASS_POLYGONS, dtype=np.float64)


def _maybe_visible(vertices: np.ndarray, zoom: float, translation: Any, angle: float) -> np.ndarray:
    """Which (n, k, 2) polygons CarRacing's own screen-box test could keep, with one pixel to spare.

    Rendering is ~95% of CarRacing's cost, and most of it is transforming ~800 polygons one Python vertex
    at a time only to discard 90% of them. This does the same transform vectorised; the survivors still
    go through CarRacing's exact test and drawing, so the pixels cannot change.
    """
    cos, sin = math.cos(angle), math.sin(angle)
    x = (vertices[..., 0] * cos - vertices[..., 1] * sin) * zoom + translation[0]
    y = (vertices[..., 0] * sin + vertices[..., 1] * cos) * zoom + translation[1]
    margin = car_racing.MAX_SHAPE_DIM + 1.0
    inside = (
        (x >= -margin)
        & (x <= car_racing.WINDOW_W + margin)
        & (y >= -margin)
        & (y <= car_racing.WINDOW_H + margin)
    )
    return inside.any(axis=1)


class _FastCarRacing(car_racing.CarRacing):
    """CarRacing with the same physics and pixels, minus wasted rendering work (checked by the tests)."""

    def __init__(self) -> None:
        super().__init__(continuous=True)
        self.skip_state_render = False  # set for the ticks whose frame nobody will look at
        self._road_vertices: np.ndarray | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> Any:
        self._road_vertices = None  # a new track
        return super().reset(seed=seed, options=options)

    def _render(self, mode: str) -> Any:
        if self.skip_state_render and mode == "state_pixels":
            return None
        return super()._render(mode)

    def _render_road(self, zoom: float, translation: Any, angle: float) -> None:
        # Same polygons, colours, order and per-polygon calls as CarRacing._render_road: only the
        # polygons that cannot be on screen are skipped before their costly per-vertex transform.
        if self._road_vertices is None:
            if any(len(polygon) != 4 for polygon, _ in self.road_poly):  # not the layout we know
                super()._render_road(zoom, translation, angle)
                return
            self._road_vertices = np.array([polygon for polygon, _ in self.road_poly], dtype=np.float64)
        bound = car_racing.PLAYFIELD
        field = [(bound, bound), (bound, -bound), (-bound, -bound), (-bound, bound)]
        self._draw_colored_polygon(self.surf, field, self.bg_color, zoom, translation, angle, clip=False)
        for i in np.flatnonzero(_maybe_visible(_GRASS_VERTICES, zoom, translation, angle)):
            self._draw_colored_polygon(
                self.surf, _GRASS_POLYGONS[i], self.grass_color, zoom, translation, angle
            )
        for i in np.flatnonzero(_maybe_visible(self._road_vertices, zoom, translation, angle)):
            polygon, color = self.road_poly[i]
            polygon = [(p[0], p[1]) for p in polygon]
            self._draw_colored_polygon(self.surf, polygon, [int(c) for c in color], zoom, translation, angle)


# --- the environment -------------------------------------------------------------------------------------
def _car_floats_space() -> tuple[spaces.Box, spaces.Box, spaces.Box]:
    return (
        spaces.Box(low=0.0, high=MAX_SPEED_KMH, shape=(1,), dtype=np.float32),
        spaces.Box(low=0.0, high=6.0, shape=(1,), dtype=np.float32),
        spaces.Box(low=0.0, high=np.inf, shape=(1,), dtype=np.float32),
    )


class EmbeddedTrackEnv(gymnasium.Env):
    """CarRacing-v3 at TrackMania's 20 Hz with tmrl's TM20FULL observation and action (module docstring)."""

    metadata = {"render_modes": []}
    real_time = False  # a simulator: it waits for the agent, so the actor may wait for the learner
    player_drives = False  # only through the program (a keyboard or scripted driver's actions)
    on_screen = False  # shown only when asked: watch.py draws its frames in a window or a video
    thread_log = None  # no threads of a library to route

    def __init__(
        self,
        ep_max_length: int = Config.ep_max_length,
        seed: int | None = None,
        history_length: int = HISTORY_LENGTH,
        seconds_per_step: float = SECONDS_PER_STEP,
        delayed_actions: bool = True,
    ) -> None:
        if ep_max_length < 1:
            raise ValueError(f"ep_max_length={ep_max_length} must be >= 1")
        if history_length < 1:
            raise ValueError(f"history_length={history_length} must be >= 1")
        self.ticks_per_step = ticks_per_step(seconds_per_step)
        if self.ticks_per_step < 1:
            raise ValueError(f"seconds_per_step={seconds_per_step} is shorter than one physics tick")
        self.ep_max_length = ep_max_length
        self.history_length = history_length
        self.delayed_actions = delayed_actions
        self._first_seed = seed

        # The class directly rather than gymnasium.make("CarRacing-v3"): make() would add a TimeLimit at
        # 1000 ticks (we truncate in agent steps) and checker wrappers that cost time on every tick, and
        # the subclass is what lets us render only the frames we use.
        self.car_racing = _FastCarRacing()

        act = spaces.Box(low=-1.0, high=1.0, shape=(3,), dtype=np.float32)
        images = spaces.Box(low=0, high=255, shape=(history_length, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        self.action_space = act
        self.observation_space = spaces.Tuple((*_car_floats_space(), images, act, act))

        self._images: np.ndarray | None = None
        self._act_buf: tuple[np.ndarray, np.ndarray] = (DEFAULT_ACTION, DEFAULT_ACTION)
        self._pending = DEFAULT_ACTION  # the action applied during the next step (delayed mode)
        self._steps = 0  # agent steps since reset
        self._ticks = 0  # physics ticks since reset
        self._running = False
        self._has_reset = False

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[tuple, dict]:
        if seed is None and not self._has_reset:
            seed = self._first_seed
        super().reset(seed=seed)
        self._has_reset = True
        rgb, _ = self.car_racing.reset(seed=seed, options=options)
        frame = preprocess_frame(rgb)
        self._images = np.repeat(frame[np.newaxis], self.history_length, axis=0)
        self._act_buf = (DEFAULT_ACTION, DEFAULT_ACTION)
        self._pending = DEFAULT_ACTION
        self._steps = 0
        self._ticks = 0
        self._running = True
        return self._observation(), self._info()

    def step(self, action: ArrayLike) -> tuple[tuple, float, bool, bool, dict]:
        if not self._running:
            raise RuntimeError(
                "The episode is terminated or truncated (or never started). Call reset before step."
            )
        clipped = clip_action(action)  # validates before anything moves
        if self.delayed_actions:  # rtgym: this step shows the previous action, `clipped` comes next
            applied, self._pending = self._pending, clipped
        else:
            applied = clipped

        reward, terminated = self._advance(
            to_car_racing_action(applied), ticks_for_step(self._steps, self.ticks_per_step)
        )
        self._steps += 1
        self._act_buf = (self._act_buf[1], clipped)
        truncated = not terminated and self._steps >= self.ep_max_length
        self._running = not (terminated or truncated)
        return self._observation(), reward, terminated, truncated, self._info()

    def view(self) -> np.ndarray:
        """The track as a person sees it: CarRacing's full 600 x 400 RGB view of the current state."""
        return self.car_racing._render("rgb_array")

    def close(self) -> None:
        self.car_racing.close()

    # ------------------------------------------------------------------------------------------------------
    def _advance(self, car_action: np.ndarray, ticks: int) -> tuple[float, bool]:
        """Run `ticks` physics ticks under one action; render the last one; push its frame in the history."""
        env = self.car_racing
        reward, terminated = 0.0, False
        for tick in range(ticks):
            env.skip_state_render = tick < ticks - 1
            _, tick_reward, terminated, _, _ = env.step(car_action)
            self._ticks += 1
            reward += tick_reward
            if terminated:
                break
        env.skip_state_render = False
        rgb = env.state if env.state is not None else env._render("state_pixels")  # ended mid-repeat

        self._images[:-1] = self._images[1:]  # numpy buffers overlapping slices
        self._images[-1] = preprocess_frame(rgb)
        return float(reward), bool(terminated)

    def _observation(self) -> tuple:
        car = self.car_racing.car
        velocity = car.hull.linearVelocity
        speed = speed_kmh(velocity[0], velocity[1])
        gear = gear_for_speed(speed)
        omega = 0.5 * (abs(car.wheels[2].omega) + abs(car.wheels[3].omega))  # rear-wheel drive
        return (
            np.array([speed], dtype=np.float32),
            np.array([gear], dtype=np.float32),
            np.array([engine_rpm(omega, gear)], dtype=np.float32),
            # Copies (16 KB, ~2 us): the caller may keep or modify what it gets, our history stays ours.
            self._images.copy(),
            self._act_buf[0].copy(),
            self._act_buf[1].copy(),
        )

    def _info(self) -> dict:
        # Seconds simulated since reset (CarRacing's own clock `t` also counts the one tick of its reset).
        # finished: the lap is complete (CarRacing's own condition); progress: road tiles visited.
        race = self.car_racing
        tiles = race.tile_visited_count
        finished = bool(getattr(race, "new_lap", False) or (race.track and tiles >= len(race.track)))
        return {
            "simulated_time": self._ticks / _FPS,
            "tiles_visited": tiles,
            "progress": tiles,
            "finished": finished,
        }


def make_embedded_track(config: Config, seed: int | None = None) -> EmbeddedTrackEnv:
    """The embedded track for `config`; `seed` seeds the first reset (later resets continue from it)."""
    return EmbeddedTrackEnv(
        ep_max_length=config.ep_max_length,
        seed=seed,
        history_length=config.conv_input,
        seconds_per_step=config.time_step_duration,
    )


class NoDisplayError(RuntimeError):
    """No window can be shown on this machine (a server, an SSH session)."""


def open_window(size: tuple[int, int], caption: str) -> Any:
    """A pygame window of `size`, or NoDisplayError: SDL quietly draws into an invisible "offscreen" or
    "dummy" display when the machine has none, where a person would wait for a window that never comes."""
    import os

    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    import pygame

    try:
        pygame.display.init()
        driver = pygame.display.get_driver()
        if driver in ("offscreen", "dummy"):
            raise NoDisplayError(f"no display here (SDL video driver {driver!r})")
        screen = pygame.display.set_mode(size)
    except pygame.error as error:
        raise NoDisplayError(f"no window can be opened here ({' '.join(str(error).split())})") from None
    pygame.display.set_caption(caption)
    return screen
