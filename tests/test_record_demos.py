"""record_demos.py: driving episodes into a demonstration set instead of training."""

from __future__ import annotations

import json

import cli
from record_demos import player_inputs, record_demos


def test_a_scripted_driver_records_whole_episodes_into_a_set(tmp_path, capsys):
    root = tmp_path / "demos"
    args = ["--env", "embedded", "--record-demos", "auto", "--driver", "scripted", "--demo-episodes", "2"]
    args += ["--demo-root", str(root), "--set", "ep_max_length=20"]
    assert record_demos(cli.parse_args(args)) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "recording scripted demonstrations on embedded" in out and "episode 2: 20 steps" in out
    manifest = json.loads((root / "auto" / "manifest.json").read_text())
    assert [e["steps"] for e in manifest["episodes"]] == [20, 20] and manifest["environment"] == "embedded"
    assert record_demos(cli.parse_args(args)) == cli.EXIT_OK  # a second sitting adds to the set
    assert "2 episodes recorded into" in capsys.readouterr().out
    assert len(json.loads((root / "auto" / "manifest.json").read_text())["episodes"]) == 4


def test_the_players_inputs_are_read_from_the_cars_telemetry():
    env = type("Env", (), {"last_telemetry": {"gas": 1.0, "brake": 0.0, "steer": -0.5, "speed": 30.0}})()
    assert player_inputs(env) == [1.0, 0.0, -0.5]
