"""The embedded track must look, to the agent, exactly like tmrl's TM20FULL environment through rtgym."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.envs.box2d.car_racing import CarRacing

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import embedded_track as et  # noqa: E402
from embedded_track import EmbeddedTrackEnv, make_embedded_track  # noqa: E402
from tm_config import ACTIONS, Config  # noqa: E402

VECTORS = {name: np.array(vector, dtype=np.float32) for name, vector in ACTIONS}
GAS, BRAKE, COAST = VECTORS["gas"], VECTORS["brake"], VECTORS["coast"]
SEED = 7


@pytest.fixture
def env() -> Iterator[EmbeddedTrackEnv]:
    environment = EmbeddedTrackEnv(seed=SEED)
    yield environment
    environment.close()


def drive(env: EmbeddedTrackEnv, actions: list[np.ndarray]) -> list[tuple]:
    """Step through `actions`; returns the (obs, reward, terminated, truncated, info) of each step."""
    return [env.step(action) for action in actions]


# --- interface --------------------------------------------------------------------------------------------
def test_observation_tuple_layout_shapes_and_dtypes_are_tmrl_and_rtgym_ones(env: EmbeddedTrackEnv) -> None:
    expected = [((1,), np.float32)] * 3 + [((4, 64, 64), np.uint8)] + [((3,), np.float32)] * 2
    obs, info = env.reset()
    assert isinstance(obs, tuple) and isinstance(info, dict)
    for _ in range(3):
        assert [(o.shape, o.dtype) for o in obs] == expected
        assert env.observation_space.contains(obs)
        obs, reward, terminated, truncated, info = env.step(GAS)
        assert type(reward) is float and type(terminated) is bool and type(truncated) is bool
        assert set(info) == {"simulated_time", "tiles_visited", "progress", "finished"}
        assert info["progress"] == info["tiles_visited"] and info["finished"] is False


def test_spaces_mirror_tmrl_bounds_with_uint8_images(env: EmbeddedTrackEnv) -> None:
    speed, gear, rpm, images, act1, act2 = env.observation_space.spaces
    assert (speed.low[0], speed.high[0], gear.low[0], gear.high[0]) == (0.0, 1000.0, 0.0, 6.0)
    assert rpm.low[0] == 0.0 and rpm.high[0] == np.inf
    assert all(box.dtype == np.float32 for box in (speed, gear, rpm, act1, act2))
    assert images == spaces.Box(0, 255, (4, 64, 64), np.uint8)
    assert env.action_space == spaces.Box(-1.0, 1.0, (3,), np.float32)
    assert act1 == act2 == env.action_space


def test_images_are_uint8_and_change_while_driving(env: EmbeddedTrackEnv) -> None:
    obs, _ = env.reset()
    first = obs[3][-1].copy()
    obs = drive(env, [GAS] * 20)[-1][0]
    images = obs[3]
    assert images.dtype == np.uint8 and images.min() >= 0 and images.max() <= 255
    assert images.max() > images.min()  # a picture, not a blank
    assert not np.array_equal(images[-1], first)


def test_reset_fills_the_history_with_copies_and_each_step_shifts_it_by_one(env: EmbeddedTrackEnv) -> None:
    obs, _ = env.reset()
    assert all(np.array_equal(obs[3][i], obs[3][0]) for i in range(4))
    previous = obs[3]
    for obs, *_ in drive(env, [GAS] * 6):
        assert np.array_equal(obs[3][:3], previous[1:])
        previous = obs[3]
    assert not np.array_equal(previous[3], previous[0])


def test_every_reset_starts_a_fresh_history_of_its_own_first_frame() -> None:
    """Issue 25: a reset that kept the previous episode's frames would show them in the first stacks."""
    env, fresh = EmbeddedTrackEnv(seed=SEED), EmbeddedTrackEnv()
    env.reset()
    driven = drive(env, [GAS] * 12)[-1][0][3]
    images = env.reset(seed=SEED + 1)[0][3]
    assert all(np.array_equal(images[i], images[0]) for i in range(4)), "not 4 copies of the reset frame"
    assert not any(np.array_equal(images[0], frame) for frame in driven), "a frame of the last episode"
    assert np.array_equal(images, fresh.reset(seed=SEED + 1)[0][3]), "not the reset of a fresh track"


def test_each_seed_resets_to_its_own_track() -> None:
    """Issue 25: training episodes must not all drive the same track; a seed picks its track, every time."""
    env = EmbeddedTrackEnv()
    tracks = {}
    for seed in (SEED, SEED + 1, SEED + 2, SEED):
        env.reset(seed=seed)
        tracks.setdefault(seed, []).append(np.array(env.car_racing.track, dtype=np.float64))
    assert np.array_equal(*tracks[SEED]), "the same seed must give the same track"
    shapes = [tracks[s][0] for s in (SEED, SEED + 1, SEED + 2)]
    assert not any(
        a.shape == b.shape and np.array_equal(a, b) for i, a in enumerate(shapes) for b in shapes[i + 1 :]
    ), "different seeds gave the same track"


def test_observations_are_fresh_arrays_the_caller_may_keep_or_modify(env: EmbeddedTrackEnv) -> None:
    obs, _ = env.reset()
    kept = [o.copy() for o in obs]
    action = GAS.copy()
    (first, *_), _ = drive(env, [action] * 2)
    action[:] = 0.5  # the caller's action array is not the one stored in the action buffer
    assert all(np.array_equal(a, b) for a, b in zip(obs, kept, strict=True))  # later steps left it alone
    history = first[3].copy()
    for array in first:
        array[...] = 0  # the caller scribbles on what it was given...
    later, *_ = env.step(BRAKE)
    assert np.array_equal(later[3][:2], history[2:])  # ...and the environment's history is untouched
    assert np.array_equal(later[4], GAS) and np.array_equal(env.reset()[0][4], np.zeros(3))


def test_action_buffer_follows_rtgym_oldest_first_and_default_zeros_at_reset(env: EmbeddedTrackEnv) -> None:
    obs, _ = env.reset()
    assert np.array_equal(obs[4], np.zeros(3)) and np.array_equal(obs[5], np.zeros(3))
    a, b, c = VECTORS["gas_full_left"], VECTORS["slight_right"], VECTORS["brake"]
    (o1, *_), (o2, *_), (o3, *_) = drive(env, [a, b, c])
    assert np.array_equal(o1[4], np.zeros(3)) and np.array_equal(o1[5], a)
    assert np.array_equal(o2[4], a) and np.array_equal(o2[5], b)
    assert np.array_equal(o3[4], b) and np.array_equal(o3[5], c)
    obs, _ = env.reset()  # rtgym's reset_act_buf: the buffer starts over from the default action
    assert not obs[4].any() and not obs[5].any()


def test_delayed_actions_take_effect_one_step_later_as_in_rtgym() -> None:
    delayed, immediate = EmbeddedTrackEnv(seed=SEED), EmbeddedTrackEnv(seed=SEED, delayed_actions=False)
    delayed.reset()
    immediate.reset()
    (d1, *_), (d2, *_) = drive(delayed, [GAS, GAS])
    (i1, *_), _ = drive(immediate, [GAS, GAS])
    assert d1[0][0] < 0.5  # the first step simulates the default action: the car stays put
    assert d2[0][0] > 1.0 and i1[0][0] > 1.0


# --- car floats -----------------------------------------------------------------------------------------
def test_speed_rises_under_gas_and_falls_under_brake(env: EmbeddedTrackEnv) -> None:
    env.reset()
    speeds = [obs[0][0] for obs, *_ in drive(env, [GAS] * 20)]
    assert speeds[0] < 0.5 and speeds[5] < speeds[10] < speeds[19]
    assert speeds[19] > 60.0  # km/h after a second of full gas: TrackMania-like scale
    braking = [obs[0][0] for obs, *_ in drive(env, [BRAKE] * 8)]
    assert braking[-1] < braking[1] < speeds[-1]  # braking[0] still shows the last gas step (delay)


def test_speed_gear_and_rpm_helpers_at_hand_computed_points() -> None:
    assert et.speed_kmh(3.0, 4.0) == pytest.approx(18.0)
    assert et.speed_kmh(-3.0, -4.0) == pytest.approx(18.0)
    assert et.speed_kmh(1000.0, 0.0) == 1000.0  # clipped to tmrl's bound
    gears = {0.0: 0, 0.99: 0, 1.0: 1, 59.9: 1, 60.0: 2, 109.9: 2, 110.0: 3, 160.0: 4, 259.9: 5, 260.0: 6}
    assert {speed: et.gear_for_speed(speed) for speed in gears} == gears
    assert et.gear_for_speed(999.0) == 6
    # rpm = |omega| * 60 / (2 pi) * ratio, within [1000, 11000]
    assert et.engine_rpm(50.0, 1) == pytest.approx(50.0 * 9.5492966 * 11.8)  # 5634.1
    assert et.engine_rpm(-50.0, 1) == pytest.approx(5634.085, abs=0.01)
    assert et.engine_rpm(150.0, 4) == pytest.approx(10170.0, abs=0.1)
    assert et.engine_rpm(100.0, 0) == 1000.0  # neutral idles
    assert et.engine_rpm(1.0, 1) == 1000.0  # idle floor
    assert et.engine_rpm(1000.0, 6) == 11000.0  # cap


def test_observed_gear_and_rpm_follow_the_formulas(env: EmbeddedTrackEnv) -> None:
    obs, _ = env.reset()
    assert (obs[1][0], obs[2][0]) == (0.0, 1000.0)  # standing start: neutral, idle
    gears = set()
    for action in [GAS] * 30 + [COAST] * 5:
        obs, *_ = env.step(action)
        car = env.car_racing.car
        speed = et.speed_kmh(*car.hull.linearVelocity.tuple)
        gear = et.gear_for_speed(speed)
        omega = (abs(car.wheels[2].omega) + abs(car.wheels[3].omega)) / 2
        assert obs[0][0] == np.float32(speed) and obs[1][0] == gear
        assert obs[2][0] == np.float32(et.engine_rpm(omega, gear))
        gears.add(gear)
    assert {1, 2, 3} <= gears


# --- actions ----------------------------------------------------------------------------------------------
def test_the_11_actions_map_to_car_racing_steer_gas_brake() -> None:
    expected = {  # CarRacing [steer, gas, brake]; steer +1 is full right in both conventions
        "coast": (0.0, 0.0, 0.0),
        "gas": (0.0, 1.0, 0.0),
        "brake": (0.0, 0.0, 1.0),
        "gas_full_left": (-1.0, 1.0, 0.0),
        "gas_full_right": (1.0, 1.0, 0.0),
        "full_left": (-1.0, 0.0, 0.0),
        "full_right": (1.0, 0.0, 0.0),
        "slight_left": (-0.3, 0.0, 0.0),
        "slight_right": (0.3, 0.0, 0.0),
        "gas_brake_left": (-1.0, 1.0, 1.0),
        "gas_brake_right": (1.0, 1.0, 1.0),
    }
    assert [name for name, _ in ACTIONS] == list(expected)
    for name, vector in VECTORS.items():
        mapped = et.to_car_racing_action(vector)
        assert mapped.shape == (3,)
        assert np.array_equal(mapped.astype(np.float32), np.array(expected[name], np.float32)), name


def test_positive_steer_turns_right() -> None:
    turns = {}
    for name in ("gas_full_left", "gas_full_right"):
        env = EmbeddedTrackEnv(seed=SEED, delayed_actions=False)
        env.reset()
        start = env.car_racing.car.hull.angle
        drive(env, [VECTORS[name]] * 15)
        turns[name] = env.car_racing.car.hull.angle - start  # Box2D angles grow counter-clockwise
    assert turns["gas_full_left"] > 0.1 and turns["gas_full_right"] < -0.1


def test_actions_are_clipped_and_nan_or_wrong_shape_is_refused(env: EmbeddedTrackEnv) -> None:
    assert np.array_equal(et.to_car_racing_action([5.0, -3.0, 2.0]), [1.0, 1.0, 0.0])
    assert np.array_equal(et.to_car_racing_action([-0.5, 0.7, -1.5]), np.array([-1, 0, 0.7], np.float32))
    env.reset()
    obs, *_ = env.step(np.array([5.0, -3.0, 2.0]))
    assert np.array_equal(obs[5], [1.0, -1.0, 1.0]) and obs[5].dtype == np.float32
    assert env.observation_space.contains(obs)
    for bad in ([np.nan, 0.0, 0.0], [1.0, 0.0, np.inf], [1.0, 0.0], np.zeros((1, 3))):
        with pytest.raises(ValueError):
            et.to_car_racing_action(bad)
        with pytest.raises(ValueError):
            env.step(np.array(bad))
    obs, *_ = env.step(COAST)  # a refused action leaves the episode usable and unchanged
    assert np.array_equal(obs[4], [1.0, -1.0, 1.0])


# --- time, determinism, episode end -----------------------------------------------------------------------
def test_each_step_is_50_ms_of_simulated_time(env: EmbeddedTrackEnv) -> None:
    assert et.SECONDS_PER_STEP == 0.05 and et.ticks_per_step(0.05) == Fraction(5, 2)
    assert [et.ticks_for_step(k) for k in range(6)] == [2, 3, 2, 3, 2, 3]
    env.reset()
    start = env.car_racing.t
    for k in range(1, 21):
        *_, info = env.step(GAS)
        elapsed = env.car_racing.t - start
        assert abs(elapsed - 0.05 * k) <= 0.01 + 1e-9  # 40 or 60 ms alone...
        if k % 2 == 0:
            assert elapsed == pytest.approx(0.05 * k, abs=1e-9)  # ...exactly 100 ms per pair
        assert info["simulated_time"] == pytest.approx(elapsed, abs=1e-9)


def test_same_seed_and_actions_give_identical_episodes() -> None:
    rng = np.random.default_rng(0)
    actions = [VECTORS[ACTIONS[i][0]] for i in rng.integers(len(ACTIONS), size=25)]
    runs = []
    for _ in range(2):
        env = EmbeddedTrackEnv()
        first = env.reset(seed=SEED)[0]
        steps = drive(env, actions)
        second = env.reset()[0]  # unseeded: continues the seeded generator
        runs.append((first, [(s[0], s[1]) for s in steps], second))
    (first_a, steps_a, second_a), (first_b, steps_b, second_b) = runs
    assert all(np.array_equal(x, y) for x, y in zip(first_a, first_b, strict=True))
    for (obs_a, reward_a), (obs_b, reward_b) in zip(steps_a, steps_b, strict=True):
        assert reward_a == reward_b
        assert all(np.array_equal(x, y) for x, y in zip(obs_a, obs_b, strict=True))
    assert np.array_equal(second_a[3], second_b[3])
    assert not np.array_equal(second_a[3], first_a[3])  # a new track, not a replay of the first


def test_make_embedded_track_seeds_the_first_reset_and_follows_the_config() -> None:
    config = Config().with_overrides(ep_max_length=7)
    env = make_embedded_track(config, seed=SEED)
    assert env.ep_max_length == 7 and env.observation_space[3].shape == (config.conv_input, 64, 64)
    assert env.ticks_per_step == Fraction(5, 2)
    reference = EmbeddedTrackEnv()
    assert np.array_equal(env.reset()[0][3], reference.reset(seed=SEED)[0][3])


def test_truncation_at_ep_max_length_is_not_termination() -> None:
    env = EmbeddedTrackEnv(ep_max_length=5, seed=SEED)
    env.reset()
    ends = [(terminated, truncated) for _, _, terminated, truncated, _ in drive(env, [GAS] * 5)]
    assert ends == [(False, False)] * 4 + [(False, True)]
    with pytest.raises(RuntimeError, match="reset"):
        env.step(GAS)
    env.reset()
    assert env.step(GAS)[3] is False


def test_termination_inside_the_action_repeat_stops_it_and_still_renders(
    env: EmbeddedTrackEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.reset()
    real_step = env.car_racing.step

    def off_the_playfield(action: np.ndarray) -> tuple:
        state, _, _, truncated, info = real_step(action)
        return state, -100.0, True, truncated, info

    monkeypatch.setattr(env.car_racing, "step", off_the_playfield)
    obs, reward, terminated, truncated, info = env.step(GAS)
    assert (reward, terminated, truncated) == (-100.0, True, False)
    assert info["simulated_time"] == pytest.approx(0.02)  # one tick of the two, then stop
    assert env.observation_space.contains(obs)
    # The tick that ended the episode was not meant to be rendered; its frame must be there all the same.
    assert np.array_equal(obs[3][-1], et.preprocess_frame(env.car_racing._render("state_pixels")))
    with pytest.raises(RuntimeError):
        env.step(GAS)


def test_rewards_are_car_racing_rewards_summed_over_the_ticks(env: EmbeddedTrackEnv) -> None:
    env.reset()
    # CarRacing: -0.1 per tick (2, then 3 ticks) + 1000/len(track) per new tile; the tiles under the car
    # at reset are paid in the first step.
    (_, r1, *_, info1), (_, r2, *_, info2), (_, r3, *_, info3) = drive(env, [COAST, GAS, GAS])
    per_tile = 1000.0 / len(env.car_racing.track)
    assert info1["tiles_visited"] > 0
    assert r1 == pytest.approx(-0.2 + per_tile * info1["tiles_visited"])
    assert r2 == pytest.approx(-0.3 + per_tile * (info2["tiles_visited"] - info1["tiles_visited"]))
    assert r3 == pytest.approx(-0.2 + per_tile * (info3["tiles_visited"] - info2["tiles_visited"]))


def test_frames_are_pixel_identical_to_stock_car_racing() -> None:
    """The faster renderer (culling, skipped in-between frames) must not change a pixel or the physics."""
    stock, env = CarRacing(continuous=True), EmbeddedTrackEnv(delayed_actions=False)
    frame, _ = stock.reset(seed=SEED)
    obs, _ = env.reset(seed=SEED)
    assert np.array_equal(obs[3][-1], et.preprocess_frame(frame))
    rng = np.random.default_rng(1)
    for k in range(30):  # 1.5 s: through CarRacing's zoom-in animation and after it
        action = np.array([rng.uniform(0, 1), rng.uniform(0, 0.2), rng.uniform(-1, 1)], np.float32)
        reward = 0.0
        for _ in range(et.ticks_for_step(k)):
            frame, tick_reward, *_ = stock.step(et.to_car_racing_action(action))
            reward += tick_reward
        obs, env_reward, *_ = env.step(action)
        assert np.array_equal(env.car_racing.state, frame), f"frame of step {k}"
        assert env_reward == reward and obs[0][0] == np.float32(
            3.6 * math.hypot(*stock.car.hull.linearVelocity.tuple)
        )
    stock.close()
    env.close()


def test_preprocess_frame_crops_the_indicator_bar() -> None:
    frame = np.zeros((96, 96, 3), np.uint8)
    frame[84:] = 255  # the indicator bar only
    frame[:, :6] = 255  # and the side columns that are cropped to keep the region square
    frame[:, 90:] = 255
    out = et.preprocess_frame(frame)
    assert out.shape == (64, 64) and out.dtype == np.uint8 and not out.any()
    frame[:84, 6:90] = (255, 0, 0)
    assert (et.preprocess_frame(frame) == 76).all()  # cv2's RGB -> gray weight of red: 0.299
