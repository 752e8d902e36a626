"""tm_telemetry.py: the plausibility rules of one telemetry frame and of an episode's frames, and the guard
that applies them, in this process with a fake clock (the guard inside tmrl's real interface, fed by the fake
plugin, is exercised by test_trackmania.py's child processes).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_openplanet import SPAWN

import tm_game
import tm_telemetry
from tm_game import TelemetryError, TrackManiaSetupError

# The one-line advice that ends every TelemetryError, as the README's troubleshooting quotes it.
TELEMETRY_ADVICE = (
    "; the plugin 'TMRL Grab Data' is probably of another version than tmrl 0.7.1, or its data stream is "
    "misaligned: "
    r"copy %USERPROFILE%\TmrlData\resources\Plugins\TMRL_GrabData.op (from `python -m tmrl --install`) into "
    r"%USERPROFILE%\OpenplanetNext\Plugins, reload it (F3 > Developer > (Re)load plugin > TMRL Grab Data) "
    "and restart the program"
)
TELEMETRY_PREFIX = "implausible telemetry from the OpenPlanet plugin: "


# --- one frame, then the frames of an episode --------------------------------------------------------------
GOOD_FRAME = (123.4, 56.7, *SPAWN, -0.25, 1.0, 0.0, 0.0, 3.0, 7000.0)


def _frame(**changes: float) -> tuple[float, ...]:
    values = dict(zip(tm_telemetry.TELEMETRY_FIELDS, GOOD_FRAME, strict=True))
    values.update(changes)
    return tuple(values.values())


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"speed": float("nan")}, "speed = nan (not a finite number)"),
        ({"rpm": float("inf")}, "rpm = inf (not a finite number)"),
        ({"speed": 1234.5}, "speed = 1234.5 km/h (beyond 1100 km/h; the game's top speed is 1000 km/h)"),
        ({"speed": -1200.0}, "speed = -1200 km/h (beyond 1100 km/h; the game's top speed is 1000 km/h)"),
        ({"steer": 1.5}, "steer = 1.5 (outside -1..1)"),
        ({"gas": -0.5}, "gas = -0.5 (outside 0..1)"),
        ({"brake": 0.5}, "brake = 0.5 (the plugin sends exactly 0 or 1)"),
        ({"finished": 3.0}, "finished = 3 (the plugin sends exactly 0 or 1)"),
        ({"gear": 2.5}, "gear = 2.5 (the game's gears are whole numbers 0..7)"),
        ({"gear": 8.0}, "gear = 8 (the game's gears are whole numbers 0..7)"),
        ({"rpm": -1.0}, "rpm = -1 (outside 0..20000)"),
        ({"rpm": 25000.0}, "rpm = 25000 (outside 0..20000)"),
    ],
)
def test_implausible_telemetry_fields_are_named_with_their_value(changes: dict, expected: str) -> None:
    assert tm_telemetry.field_problem(_frame(**changes)) == expected


def test_plausible_telemetry_passes() -> None:
    assert tm_telemetry.field_problem(GOOD_FRAME) is None
    # Reversing (negative speed along the car), top speed, idle, the last gear, a finish: all real.
    for changes in ({"speed": -40.0}, {"speed": 1000.0}, {"rpm": 0.0, "gear": 0.0}, {"gear": 7.0}):
        assert tm_telemetry.field_problem(_frame(**changes)) is None, changes
    assert tm_telemetry.field_problem(_frame(finished=1.0, brake=1.0, steer=1.0, gas=0.0)) is None
    assert "a frame of 12 values instead of 11" in tm_telemetry.field_problem((*GOOD_FRAME, 0.0))


def test_a_teleport_within_an_episode_is_caught_but_not_a_respawn_at_reset() -> None:
    errors = tm_game.InterfaceErrors()
    guard = tm_telemetry.TelemetryGuard(errors, trajectory_start=np.array(SPAWN))
    guard.new_episode()
    assert guard.filter(GOOD_FRAME) == GOOD_FRAME
    guard.check_spawn()  # the car starts on the trajectory
    time.sleep(0.05)
    moved = _frame(x=SPAWN[0] + 10.0, distance=66.7)  # 10 m in 50 ms: 720 km/h, possible
    assert guard.filter(moved) == moved
    guard.new_episode()  # a respawn: the car may reappear anywhere (a checkpoint, the start)
    far = _frame(x=SPAWN[0] + 3000.0, distance=0.0)
    assert guard.filter(far) == far
    assert errors.first is None
    jumped = _frame(x=SPAWN[0] + 6000.0, distance=0.0)  # 3 km within the same episode
    replaced = guard.filter(jumped)
    where, error = errors.first
    assert where == "reading the telemetry" and isinstance(error, TelemetryError)
    assert re.fullmatch(
        re.escape(TELEMETRY_PREFIX)
        + r"the position \(x, y, z\) jumped 3000 m in 0\.\d{3} s \(at most \d+ m at 1000 km/h\)"
        + re.escape(TELEMETRY_ADVICE),
        str(error),
    ), str(error)
    # tmrl never sees the bad frame: it gets the last good one, still, with released controls, not finished.
    assert replaced == (0.0, 0.0, SPAWN[0] + 3000.0, *SPAWN[1:], 0.0, 0.0, 0.0, 0.0, 3.0, 7000.0)
    assert guard.latest == replaced
    # From then on every frame is replaced, good or not: the env is unusable.
    assert guard.filter(GOOD_FRAME) == replaced


def test_a_distance_jump_is_caught() -> None:
    errors = tm_game.InterfaceErrors()
    guard = tm_telemetry.TelemetryGuard(errors)
    guard.filter(GOOD_FRAME)
    guard.filter(_frame(distance=GOOD_FRAME[1] + 5000.0))
    assert "distance jumped 5000 m in" in str(errors.first[1])


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _driving_guard(track_length_m: float = 100.0, progress: float = float("nan")) -> tuple[Any, Any, Clock]:
    """A guard at the start of an episode, its clock, and a car at 72 km/h (20 m/s) along x from SPAWN."""
    errors, clock = tm_game.InterfaceErrors(), Clock()
    guard = tm_telemetry.TelemetryGuard(errors, track_length_m=track_length_m, clock=clock)
    guard.track_progress = lambda: progress
    guard.new_episode()
    return guard, errors, clock


def _drive(guard: Any, clock: Clock, steps: int, x0: float = SPAWN[0], **changes: float) -> float:
    """`steps` frames 50 ms apart of a car at 20 m/s along x; returns the last x."""
    x = x0
    for _ in range(steps):
        clock.now += 0.05
        x += 1.0
        guard.filter(_frame(speed=72.0, x=x, distance=x - SPAWN[0], **changes))
    return x


def _inconsistency(errors: Any) -> str:
    where, error = errors.first
    assert where == "checking the telemetry" and isinstance(error, TelemetryError)
    message = str(error)
    assert message.startswith("inconsistent telemetry from the OpenPlanet plugin: ")
    assert message.endswith("run again (it resumes from the checkpoint saved now)") and "\n" not in message
    return message


def test_a_car_driving_as_its_speed_says_passes_every_consistency_check() -> None:
    guard, errors, clock = _driving_guard(progress=0.99)
    guard.filter(_frame(speed=0.0, x=SPAWN[0], distance=0.0))
    _drive(guard, clock, 60)  # 3 s at 72 km/h, windows included
    assert errors.first is None
    # A finish at the end of the track, after 3 s: a race, timed by the clock from the first frame.
    clock.now += 0.05
    guard.filter(_frame(speed=72.0, x=SPAWN[0] + 61.0, distance=61.0, finished=1.0))
    assert errors.first is None and guard.race_time == pytest.approx(3.05)
    assert guard.annotate({})["race_time"] == pytest.approx(3.05)


@pytest.mark.parametrize(
    ("lie", "expected"),
    [
        # The car jumps 95 m ahead at 72 km/h (reach 18.5 m per 50 ms step).
        ({"x": 95.0}, r"the position \(x, y, z\) moved 9\d(\.\d+)? m in 0\.05 s while the speed never "
                      r"exceeded 72 km/h \(at most 18\.5 m\)"),
        # The distance counter runs 60 m ahead of the car.
        ({"distance": 60.0}, r"distance grew 6\d(\.\d+)? m in 0\.05 s while the speed never exceeded 72"),
    ],
)  # fmt: skip
def test_a_move_the_reported_speed_cannot_make_is_refused(lie: dict, expected: str) -> None:
    guard, errors, clock = _driving_guard()
    x = _drive(guard, clock, 10)
    clock.now += 0.05
    frame = _frame(
        speed=72.0, x=x + 1.0 + lie.get("x", 0.0), distance=x + 1.0 - SPAWN[0] + lie.get("distance", 0.0)
    )
    assert guard.filter(frame) != frame  # never handed to tmrl
    assert re.search(expected, _inconsistency(errors)), str(errors.first[1])


def test_speed_zero_while_the_position_moves_is_refused_over_a_window() -> None:
    guard, errors, clock = _driving_guard()
    guard.filter(_frame(speed=0.0, x=SPAWN[0], distance=0.0))
    x = SPAWN[0]
    for _ in range(30):  # 1.5 s at 0 km/h while the position advances 1.9 m per step (within the slack)
        clock.now += 0.05
        x += 1.9
        guard.filter(_frame(speed=0.0, x=x, distance=x - SPAWN[0]))
        if errors.first is not None:
            break
    assert "while the speed never exceeded 0 km/h" in _inconsistency(errors)


def test_a_position_that_stands_still_at_speed_is_a_frozen_stream_and_condemns_its_frames() -> None:
    guard, errors, clock = _driving_guard()
    x = _drive(guard, clock, 10)
    repeated = _frame(speed=72.0, x=x, distance=x - SPAWN[0])
    count = 0
    while count < 20:
        count += 1
        clock.now += 0.05
        guard.filter(repeated)
        if errors.first is not None:
            break
    message = _inconsistency(errors)
    assert (
        "the position (x, y, z) has not changed for 0.4" in message
        and "72 km/h (a frozen telemetry" in message
    )
    assert count == 9 and errors.first[1].condemned_steps == 8  # 8 repeats were returned, the 9th was not
    # A car standing still (0 km/h) may repeat its position as long as it likes.
    guard, errors, clock = _driving_guard()
    for _ in range(100):
        clock.now += 0.05
        guard.filter(_frame(speed=0.0, distance=0.0))
    assert errors.first is None


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("first_frame", "the finish flag is 1 in the first frame after the respawn (a stuck finish flag)"),
        ("twice", "the finish flag stayed 1 for two frames in a row (a stuck finish flag)"),
        ("too_fast", "a finish 0.25 s after the start, faster than the track (100 m) can be driven at 1000"),
        ("too_short", "a finish after the car drove 16 m of the track's 100 m (at least 50% for a real one)"),
        ("too_early", "a finish with the car 45% along the reward trajectory (at least 80% for a real one"),
    ],
)  # fmt: skip
def test_a_finish_that_cannot_be_real_is_refused_as_it_comes(setup: str, expected: str) -> None:
    guard, errors, clock = _driving_guard(progress=0.45 if setup == "too_early" else 0.95)
    if setup == "first_frame":
        guard.filter(_frame(speed=0.0, x=SPAWN[0], distance=0.0, finished=1.0))
    else:
        guard.filter(_frame(speed=0.0, x=SPAWN[0], distance=0.0))
        steps = {"too_fast": 4, "too_short": 15}.get(setup, 60)
        x = _drive(guard, clock, steps)
        clock.now += 0.05
        finish = _frame(speed=72.0, x=x + 1.0, distance=x + 1.0 - SPAWN[0], finished=1.0)
        assert guard.filter(finish) == finish or setup != "twice"
        if setup == "twice":
            assert errors.first is None
            clock.now += 0.05
            guard.filter(finish)
    message = _inconsistency(errors)
    assert expected in message, message
    assert guard.latest[8] == 0.0 and guard.race_time is None  # tmrl never saw "finished": no +100, no race


# --- the map: the car's spawn against the reward trajectory's start ---------------------------------------
def test_a_spawn_far_from_the_trajectory_is_a_wrong_map(tmp_path: Path) -> None:
    errors = tm_game.InterfaceErrors()
    path = tmp_path / "reward.pkl"
    guard = tm_telemetry.TelemetryGuard(
        errors, trajectory_start=np.array((0.0, 9.0, 0.0)), trajectory_path=path
    )
    guard.new_episode()
    guard.filter(_frame(x=300.0, y=9.0, z=400.0))
    guard.check_spawn()
    where, error = errors.first
    assert where == "checking the map" and isinstance(error, TrackManiaSetupError)
    assert str(error) == (
        f"the car starts 500.0 m from the start of the reward trajectory {path}, farther than MAX_STRAY "
        "(100 m): the map in the game is not the one the trajectory was recorded on, and no step would pay "
        "any reward. Load that map (tmrl's default trajectory is for the map tmrl-test: copy "
        r"%USERPROFILE%\TmrlData\resources\tmrl-test.Map.Gbx into %USERPROFILE%\Documents\Trackmania\Maps"
        r"\My Maps, then Create > Map Editor > Edit a Map > tmrl-test and the green flag), or record a "
        "trajectory on this map with `python -m tmrl --record-reward`"
    )


def test_only_the_first_reset_is_compared_with_the_trajectory() -> None:
    # tmrl's respawn may put the car back at a checkpoint rather than the start: later resets are not checked.
    errors = tm_game.InterfaceErrors()
    guard = tm_telemetry.TelemetryGuard(errors, trajectory_start=np.array(SPAWN))
    guard.new_episode()
    guard.filter(GOOD_FRAME)
    guard.check_spawn()
    guard.new_episode()
    guard.filter(_frame(x=SPAWN[0] + 900.0))
    guard.check_spawn()
    assert errors.first is None
