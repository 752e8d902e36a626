"""demos.py: the action mapping, the player's timing, the files and their damage, the scripted driver."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import small_config

import demos
from demos import ACTION_TABLE, DemoEpisode, DemoError, DemoWriter, nearest_action, player_actions
from replay import PrioritizedReplay


def test_nearest_action_maps_every_table_row_to_itself_and_inputs_to_the_closest_row():
    for index, vector in enumerate(ACTION_TABLE):
        assert nearest_action(vector) == index, f"table row {index} must map to itself"
    assert nearest_action([0.9, 0.0, -0.85]) == 3, "nearly gas + full left"
    assert nearest_action([0.1, 0.0, 0.25]) == 8, "a light right touch is slight right"
    assert nearest_action([0.0, 1.0, 0.05]) == 2, "brake"
    assert nearest_action([0.6, 0.0, 0.1]) == 1, "more gas than anything else: gas"
    assert nearest_action([0.0, 0.0, 0.0]) == 0, "nothing pressed: coast"
    for bad in ([np.nan, 0, 0], [1, 0], [[1, 0, 0]] * 2):
        with pytest.raises(DemoError, match=r"a player's input is a finite \[gas, brake, steer\]"):
            nearest_action(bad)


def test_the_players_action_of_step_t_is_the_input_the_car_reports_two_observations_later():
    # Inputs at observations 0..5 (the reset one and after each of 5 steps), each a distinct table row.
    rows = [0, 1, 3, 4, 5, 6]
    inputs = ACTION_TABLE[rows]
    # rtgym applies the action of step t during step t + 1, which ends at observation t + 2.
    assert player_actions(inputs, 5).tolist() == [3, 4, 5, 6, 6], "shifted by two, the last one held"
    assert player_actions(inputs, 5, delay=0).tolist() == rows[:5]
    with pytest.raises(DemoError, match="6 inputs for 4 steps"):
        player_actions(inputs, 4)


def episode(steps: int, seed: int = 0, finished: bool = True) -> DemoEpisode:
    rng = np.random.default_rng(seed)
    return DemoEpisode(
        frames=rng.integers(0, 256, (4 + steps, 64, 64), dtype=np.uint8),
        car=np.column_stack(
            [np.arange(steps + 1) * 10.0, np.ones(steps + 1), np.full(steps + 1, 3000.0)]
        ).astype(np.float32),
        inputs=ACTION_TABLE[rng.integers(0, 11, steps)],
        actions=rng.integers(0, 11, steps).astype(np.uint8),
        rewards=rng.random(steps).astype(np.float32),
        terminated=finished,
        truncated=not finished,
        finished=finished,
        info={"environment": "embedded", "race_time": steps * 0.05 if finished else None, "track_seed": seed},
    )


def test_episodes_round_trip_through_their_files_and_manifest(tmp_path):
    writer = DemoWriter(tmp_path / "laps", "embedded", "scripted")
    written = [episode(30, seed=1), episode(12, seed=2, finished=False)]
    for item in written:
        writer.write(item)
    manifest = json.loads((tmp_path / "laps" / "manifest.json").read_text())
    assert [e["file"] for e in manifest["episodes"]] == ["episode-0001.npz", "episode-0002.npz"]
    first = manifest["episodes"][0]
    assert first["steps"] == 30 and first["finished"] is True and first["race_time"] == pytest.approx(1.5)
    assert first["driver"] == "scripted" and first["environment"] == "embedded" and first["track_seed"] == 1
    assert first["return"] == pytest.approx(float(written[0].rewards.sum()))
    loaded = demos.load_sets(tmp_path, small_config(demos="laps"), report=pytest.fail)
    for original, again in zip(written, loaded, strict=True):
        for key, value in original.arrays().items():
            assert np.array_equal(again.arrays()[key], value), f"{key} changed on the way through the file"
    # A second recording session appends to the set; another environment is refused.
    DemoWriter(tmp_path / "laps", "embedded", "human").write(episode(5, seed=3))
    assert len(demos.read_manifest(tmp_path / "laps")["episodes"]) == 3
    with pytest.raises(DemoError, match="holds demonstrations of embedded, not trackmania"):
        DemoWriter(tmp_path / "laps", "trackmania", "player")


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "swap"])
def test_a_damaged_file_is_reported_and_skipped_never_used(tmp_path, damage):
    writer = DemoWriter(tmp_path / "laps", "embedded", "scripted")
    for seed in range(3):
        writer.write(episode(20, seed=seed))
    target = tmp_path / "laps" / "episode-0002.npz"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:200])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete":
        target.unlink()
    else:  # another valid file under this name: the checksum still tells
        target.write_bytes((tmp_path / "laps" / "episode-0003.npz").read_bytes())
    reports: list[str] = []
    loaded = demos.load_sets(tmp_path, small_config(demos="laps"), report=reports.append)
    assert len(loaded) == 2 and [e.info["track_seed"] for e in loaded] == [0, 2]
    assert len(reports) == 1 and "episode-0002.npz" in reports[0] and "\n" not in reports[0]
    assert reports[0].startswith("demonstration skipped: ")


def test_missing_or_empty_sets_are_one_line_errors(tmp_path):
    with pytest.raises(DemoError, match=r"no demonstrations at .*nowhere \(no manifest.json\): record some"):
        demos.load_sets(tmp_path, small_config(demos="nowhere"), report=print)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    with pytest.raises(DemoError, match="manifest.json cannot be read"):
        demos.load_sets(tmp_path, small_config(demos="broken"), report=print)
    DemoWriter(tmp_path / "gone", "embedded", "scripted").write(episode(5))
    (tmp_path / "gone" / "episode-0001.npz").unlink()
    with pytest.raises(DemoError, match="no usable demonstration episode in gone"):
        demos.load_sets(tmp_path, small_config(demos="gone"), report=lambda line: None)


def test_state_rows_put_the_previous_actions_before_the_state_never_the_next_one():
    item = episode(4, seed=5)
    a = item.actions
    rows = demos.state_rows(item, small_config(previous_actions=2))
    assert rows.shape == (5, 9)
    zero = np.zeros(3, np.float32)
    expected = [
        (zero, zero),
        (zero, ACTION_TABLE[a[0]]),
        (ACTION_TABLE[a[0]], ACTION_TABLE[a[1]]),
        (ACTION_TABLE[a[1]], ACTION_TABLE[a[2]]),
        (ACTION_TABLE[a[2]], ACTION_TABLE[a[3]]),
    ]
    for k, (older, newest) in enumerate(expected):
        assert np.array_equal(rows[k, 3:6], older) and np.array_equal(rows[k, 6:], newest), f"observation {k}"
    assert np.array_equal(demos.state_rows(item, small_config(previous_actions=1))[:, 3:], rows[:, 6:])
    assert np.array_equal(demos.state_rows(item, small_config())[:, :3], item.car)


def test_fill_stores_each_episode_as_the_loop_would(tmp_path):
    config = small_config()
    items = [episode(6, seed=1, finished=True), episode(4, seed=2, finished=False)]
    replay = PrioritizedReplay(20, stack=4, alpha=0.0)
    demos.fill(replay, items, config)
    stored = replay.transitions(np.arange(10))
    assert stored["action"].tolist() == [*items[0].actions, *items[1].actions]
    assert stored["reward"].tolist() == pytest.approx([*items[0].rewards, *items[1].rewards])
    assert stored["terminated"].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert stored["truncated"].tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 0, 1], "an unfinished episode was cut off"
    assert np.array_equal(stored["frames"][0], items[0].frames[:4])
    assert np.array_equal(stored["next_frames"][5, -1], items[0].frames[4 + 5])


def test_the_scripted_driver_follows_the_track_and_makes_progress():
    from embedded_track import make_embedded_track

    config = small_config(ep_max_length=300)
    env = make_embedded_track(config, seed=demos.RECORD_SEED_BASE)
    driver = demos.ScriptedDriver()
    try:
        env.reset(seed=demos.RECORD_SEED_BASE)
        total, tiles, steps = 0.0, 0, 0
        over = False
        while not over:
            action = driver.act(env)
            assert 0 <= action < 11
            _, reward, terminated, truncated, info = env.step(ACTION_TABLE[action].copy())
            total, tiles, steps = total + reward, info["tiles_visited"], steps + 1
            over = terminated or truncated
    finally:
        env.close()
    # 300 steps (15 s) at its modest pace: it stays on the road and keeps visiting new tiles.
    assert steps == 300 and tiles > 60 and total > 150, (steps, tiles, total)


def test_the_keyboard_driver_maps_the_arrow_keys_to_the_action_table(monkeypatch):
    import os

    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    import pygame

    pressed: set[int] = set()

    class Keys:
        def __getitem__(self, key: int) -> bool:
            return key in pressed

    monkeypatch.setattr(pygame.key, "get_pressed", lambda: Keys())
    import embedded_track

    def dummy_window(size, caption):  # a test has no screen: SDL's dummy display, which open_window refuses
        pygame.display.init()
        return pygame.display.set_mode(size)

    monkeypatch.setattr(embedded_track, "open_window", dummy_window)
    driver = demos.KeyboardDriver(period=0.0)
    try:
        cases = [
            (set(), 0),
            ({pygame.K_UP}, 1),
            ({pygame.K_DOWN}, 2),
            ({pygame.K_UP, pygame.K_LEFT}, 3),
            ({pygame.K_w, pygame.K_d}, 4),
            ({pygame.K_LEFT}, 5),
            ({pygame.K_RIGHT}, 6),
        ]
        for keys, action in cases:
            pressed.clear()
            pressed.update(keys)
            assert nearest_action(driver.inputs()) == action, f"keys {keys} -> action {action}"
        pygame.event.post(pygame.event.Event(pygame.QUIT))
        driver.inputs()
        assert driver.quit_requested, "closing the window stops the recording"
    finally:
        driver.close()
    assert os.environ["SDL_VIDEODRIVER"] == "dummy"
