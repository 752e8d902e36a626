"""tm_setup.py: the TrackMania set-up checked before tmrl is imported (TmrlData, config.json, the reward
trajectory, the virtual gamepad, the OpenPlanet plugin) and `--check-trackmania`'s report, against the fake
plugin of fake_openplanet.py. Nothing here imports tmrl, and no test needs the game.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_openplanet import SPAWN, FakeOpenPlanet, write_tmrl_data

import tm_setup
import trackmania
from tm_config import Config
from tm_game import GameNotRespondingError, TrackManiaSetupError


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
    reason = tm_setup.check_tmrl_available(allow_non_windows=True, **kwargs)
    assert reason is not None
    assert "\n" not in reason
    return reason


# --- setup checks: no tmrl import, no game --------------------------------------------------------------
@pytest.mark.skipif(sys.platform == "win32", reason="the Windows requirement only shows elsewhere")
def test_other_systems_are_refused_without_the_test_override(home: Path) -> None:
    write_tmrl_data(home)
    reason = tm_setup.check_tmrl_available()
    assert reason is not None and "needs Windows" in reason and "\n" not in reason


def test_tmrl_not_installed(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tm_setup, "find_spec", lambda name: None)
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
    monkeypatch.setattr(tm_setup, "OPENPLANET_PORT", port)
    reason = _reason()
    assert f"nothing answers on 127.0.0.1:{port}" in reason and "TMRL Grab Data" in reason
    with pytest.raises(GameNotRespondingError, match="nothing answers"):
        trackmania.make_trackmania_env(Config(), allow_non_windows=True)


def test_a_silent_program_on_the_plugin_port(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tmrl_data(home)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        monkeypatch.setattr(tm_setup, "OPENPLANET_PORT", silent.getsockname()[1])
        assert "sent no TrackMania telemetry" in _reason()


def test_available_when_the_plugin_answers(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tmrl_data(home)
    game = FakeOpenPlanet()
    try:
        monkeypatch.setattr(tm_setup, "OPENPLANET_PORT", game.port)
        assert tm_setup.check_tmrl_available(allow_non_windows=True) is None
        assert game.connections == 1
    finally:
        game.close()


# --- python env_tm.py --check-trackmania: every step of the set-up, one line each ---------------------
def report(**options: Any) -> dict[str, tm_setup.SetupCheck]:
    checks = tm_setup.setup_report(allow_non_windows=True, listen_seconds=0.3, **options)
    assert all("\n" not in check.line() for check in checks)
    return {check.name: check for check in checks}


def passed(checks: dict[str, tm_setup.SetupCheck]) -> dict[str, bool | None]:
    return {name: check.passed for name, check in checks.items()}


def test_the_set_up_check_passes_every_step_against_a_healthy_fake_game(home, monkeypatch):
    write_tmrl_data(home)
    game = FakeOpenPlanet(x=3.0)
    try:
        monkeypatch.setattr(tm_setup, "OPENPLANET_PORT", game.port)
        checks = report()
    finally:
        game.close()
    assert passed(checks) == {
        "Windows": True, "tmrl": True, "TmrlData": True, "config.json": True, "reward trajectory": True,
        "virtual gamepad": None, "OpenPlanet plugin": True, "telemetry": True, "map": True,
    }  # fmt: skip
    assert "frames in 0.3 s, all plausible" in checks["telemetry"].detail
    assert "the car is 0.0 m from the reward trajectory" in checks["map"].detail  # x=3 lies on it
    assert checks["reward trajectory"].detail.endswith("100 m")


@pytest.mark.parametrize(
    "fault, failing, words",
    [
        ("no TmrlData", "TmrlData", "no TmrlData folder at"),
        ("a key missing", "config.json", "has no ENV.RTGYM_INTERFACE"),
        ("a pinned value changed", "config.json", "ENV.IMG_HIST_LEN is 5 but rainbow-tm needs 4"),
        ("no reward trajectory", "reward trajectory", "no reward trajectory at"),
        ("no game", "OpenPlanet plugin", "nothing answers on 127.0.0.1"),
        ("a silent program", "OpenPlanet plugin", "sent no TrackMania telemetry"),
        ("garbage telemetry", "telemetry", "speed = nan (not a finite number)"),
        ("another map", "map", "is 400.0 m from every point of the reward trajectory"),
    ],
)
def test_the_set_up_check_names_each_fault_and_what_to_do(home, monkeypatch, fault, failing, words):
    if fault != "no TmrlData":
        write_tmrl_data(
            home,
            changes={"ENV.IMG_HIST_LEN": 5} if fault == "a pinned value changed" else None,
            remove=("ENV.RTGYM_INTERFACE",) if fault == "a key missing" else (),
            reward=fault != "no reward trajectory",
        )
    game = silent = None
    try:
        if fault == "a silent program":
            silent = socket.create_server(("127.0.0.1", 0))
            port = silent.getsockname()[1]
        elif fault == "no game":
            port = _free_port()
        else:
            game = FakeOpenPlanet(speed=float("nan")) if fault == "garbage telemetry" else FakeOpenPlanet()
            if fault == "another map":
                game.set_state(x=50.0, y=400.0)  # beside the 100 m straight, 400 m off
            port = game.port
        monkeypatch.setattr(tm_setup, "OPENPLANET_PORT", port)
        checks = report()
    finally:
        for thing in (game, silent):
            if thing is not None:
                thing.close()
    failed = [name for name, check in checks.items() if check.passed is False]
    assert failed == [failing], checks
    assert words in checks[failing].detail
    for name, check in checks.items():  # what depends on the failed step is skipped, and says why
        if check.passed is None and name != "virtual gamepad":
            assert "not checked: it needs" in check.detail


def test_check_trackmania_on_the_command_line_prints_one_line_per_step_and_exits_3_until_ready(
    home, monkeypatch, capsys
):
    import env_tm

    write_tmrl_data(home)
    game = FakeOpenPlanet()
    try:
        monkeypatch.setattr(tm_setup, "OPENPLANET_PORT", game.port)
        args = env_tm.parse_args(["--check-trackmania"])
        assert env_tm.check_trackmania(args, allow_non_windows=True, listen_seconds=0.3) == 0
        out = capsys.readouterr().out.splitlines()
        assert len(out) == 10 and out[-1] == "TrackMania is ready: `python env_tm.py` trains on it"
        game.set_state(speed=float("inf"))
        assert env_tm.check_trackmania(args, allow_non_windows=True, listen_seconds=0.3) == 3
    finally:
        game.close()
    out = capsys.readouterr().out.splitlines()
    assert out[7].startswith("FAIL telemetry: implausible telemetry from the OpenPlanet plugin: speed = inf")
    assert out[-1] == "TrackMania is not ready: fix telemetry (in this order), then check again"
    if sys.platform != "win32":  # for real (no allow_non_windows): the system is named first, in one line
        assert env_tm.main(["--check-trackmania"]) == 3
        assert capsys.readouterr().out.splitlines()[0].startswith("FAIL Windows: TrackMania needs Windows")


# --- the reward trajectory and the virtual gamepad -----------------------------------------------------
def test_reward_trajectories_that_pay_for_nothing_are_refused(tmp_path: Path) -> None:
    from fake_openplanet import reward_trajectory

    assert tm_setup.trajectory_problem(reward_trajectory(100.0)) is None
    same = np.zeros((1000, 3))
    assert tm_setup.trajectory_problem(same) == (
        "is 0.0 m long (1,000 points), shorter than any track (at least 50 m): the car would finish it, or "
        "stray from it, at once"
    )
    assert "is 2.0 m long (21 points)" in tm_setup.trajectory_problem(reward_trajectory(2.0))
    stalled = np.repeat(reward_trajectory(100.0), 2, axis=0)  # every point twice: half the steps are 0 m
    assert tm_setup.trajectory_problem(stalled) == (
        "has 1,001 of its 2,001 steps shorter than 1 cm (tmrl records one point every 10 cm): points that do "
        "not advance pay for progress never made"
    )
    home = tmp_path / "home"
    write_tmrl_data(home, trajectory=reward_trajectory(2.0))
    path = home / "TmrlData" / "reward" / "reward.pkl"
    with pytest.raises(TrackManiaSetupError) as caught:
        tm_setup.load_reward_trajectory(home / "TmrlData")
    assert str(caught.value).startswith(f"the reward trajectory {path} is 2.0 m long (21 points)")
    assert str(caught.value).endswith("`python -m tmrl --record-reward` (or run `python -m tmrl --install`)")


def test_track_length_and_fastest_possible_finish(home: Path) -> None:
    folder = write_tmrl_data(home, trajectory_start=SPAWN)
    points = tm_setup.load_reward_trajectory(folder)
    assert points.shape == (1001, 3) and points[0].tolist() == list(SPAWN)
    assert tm_setup.trajectory_length_m(points) == pytest.approx(100.0)
    # A bent trajectory: its length is the sum of the segments, not the distance between its ends.
    assert tm_setup.trajectory_length_m(np.array([[0, 0, 0], [3, 4, 0], [3, 4, 12]])) == pytest.approx(17.0)


VIGEM_MESSAGE = (
    "the virtual gamepad driver ViGEmBus is missing or not running (importing vgamepad raised Exception: "
    "VIGEM_ERROR_BUS_NOT_FOUND), so tmrl could not move the car: install it (`pip install --force-reinstall "
    "--no-deps vgamepad` and accept the driver installer it starts, as `pip install tmrl` did, or "
    "ViGEmBus_Setup from https://github.com/ViGEm/ViGEmBus/releases), then restart Windows"
)


def test_a_missing_vigembus_driver_is_named_on_windows(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tmrl_data(home)
    # vgamepad connects to the driver while it is imported, and raises VIGEM_ERROR_BUS_NOT_FOUND without it.
    fake_packages = tmp_path / "site"
    (fake_packages / "vgamepad").mkdir(parents=True)
    (fake_packages / "vgamepad" / "__init__.py").write_text(
        'raise Exception("VIGEM_ERROR_BUS_NOT_FOUND")\n', encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(fake_packages))
    monkeypatch.delitem(sys.modules, "vgamepad", raising=False)
    monkeypatch.setattr(tm_setup.platform, "system", lambda: "Windows")
    with pytest.raises(TrackManiaSetupError) as caught:
        tm_setup.check_tmrl_setup()
    assert str(caught.value) == VIGEM_MESSAGE
    assert tm_setup.check_tmrl_available() == VIGEM_MESSAGE
    # Elsewhere the gamepad is not used, so not imported.
    monkeypatch.setattr(tm_setup.platform, "system", lambda: "Linux")
    tm_setup.check_tmrl_setup(allow_non_windows=True)
