"""watch.py through `env_tm.py --watch`: a checkpoint drives greedily, shown in a window or written to a
playable file, learning and writing nothing; and every bad input in one line."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_ASSIGNMENTS

import env_tm
import environment
import watch

EPISODE = 40  # FAST_ASSIGNMENTS' ep_max_length


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A small run of 80 steps (two episodes): its best.pt, latest.pt and periodic checkpoints."""
    root = tmp_path_factory.mktemp("watch")
    args = ["--env", "embedded", "--steps", "80", "--checkpoint-root", str(root), "--run-name", "w"]
    args += ["--learner", "inline", "--no-wandb", "--device", "cpu", "--threads", "1"]
    for assignment in FAST_ASSIGNMENTS:
        args += ["--set", assignment]
    assert env_tm.main(args) == 0
    return root / "w"


def watch_args(*extra: str) -> list[str]:
    return ["--env", "embedded", "--device", "cpu", "--eval-episodes", "2", *extra]


def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_a_watched_checkpoint_drives_the_held_out_tracks_as_its_evaluation_would_into_a_gif(
    run_dir, tmp_path, capsys, monkeypatch
):
    before = files_of(run_dir)
    video = tmp_path / "drive.gif"
    noise_states = []
    greedy = watch.RainbowAgent.greedy_action

    def spy(self, frames, car, generator=None):  # the policy as called: noise off, the evaluation's stream
        noise_states.extend(m.noise_enabled for m in self.online.modules() if hasattr(m, "noise_enabled"))
        return greedy(self, frames, car, generator)

    monkeypatch.setattr(watch.RainbowAgent, "greedy_action", spy)
    assert env_tm.main(watch_args("--watch", str(run_dir), "--record-video", str(video))) == 0
    assert noise_states and not any(noise_states), "the greedy policy drives with NoisyNet's noise off"
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert f"watching {run_dir / 'best.pt'}" in out
    printed = [
        float(line.split("return ")[1].split()[0]) for line in out.splitlines() if line.startswith("episode")
    ]
    assert len(printed) == 2
    # The same returns as the evaluation of the same weights on the same held-out tracks.
    agent, config, _ = watch.load_agent(run_dir / "best.pt", "cpu")
    env = environment.build_environment("embedded", config, 0)
    try:
        expected = environment.evaluate(agent, env, config, 2).returns
    finally:
        env.close()
    assert printed == pytest.approx([round(r, 1) for r in expected], abs=0.051)
    from PIL import Image

    with Image.open(video) as gif:
        assert gif.format == "GIF" and gif.size == watch.VIDEO_SIZE
        durations = []
        for index in range(gif.n_frames):  # Pillow merges repeated frames into longer ones
            gif.seek(index)
            durations.append(gif.info["duration"])
        assert sum(durations) == 2 * EPISODE * 50, "one 50 ms frame per step of both episodes"
        gif.seek(gif.n_frames // 2)
        colours = {tuple(pixel) for pixel in np.asarray(gif.convert("RGB")).reshape(-1, 3)[::97]}
        assert len(colours) > 3, "a picture, not a blank"
    assert f"the drive is in {video} ({2 * EPISODE} frames)" in out
    assert files_of(run_dir) == before, "watching writes nothing into the run folder"


def test_a_watch_into_an_mp4_is_playable(run_dir, tmp_path):
    import cv2

    video = tmp_path / "drive.mp4"
    latest = run_dir / "latest.pt"
    assert (
        env_tm.main(watch_args("--watch", str(latest), "--record-video", str(video), "--eval-episodes", "1"))
        == 0
    )
    capture = cv2.VideoCapture(str(video))
    try:
        assert capture.isOpened()
        frames = 0
        while capture.read()[0]:
            frames += 1
        assert frames == EPISODE and capture.get(cv2.CAP_PROP_FPS) == pytest.approx(20.0)
    finally:
        capture.release()


def test_without_a_display_the_window_is_refused_in_one_line_naming_record_video(
    run_dir, monkeypatch, capsys
):
    import pygame

    pygame.display.quit()
    monkeypatch.setenv("SDL_VIDEODRIVER", "offscreen")
    assert env_tm.main(watch_args("--watch", str(run_dir))) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: no display here") and "--record-video drive.gif" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--watch", "nowhere/at/all"], "--watch: nowhere/at/all does not exist"),
        (["--watch", "EMPTY"], "no checkpoint in"),
        (["--watch", "CORRUPT"], "is unreadable"),
        (["--watch", "RUN", "--record-video", "drive.avi"], "use a .gif or .mp4 file name"),
        (["--watch", "RUN", "--record-video", "no/such/folder/drive.gif"], "does not exist"),
    ],
)
def test_bad_watch_inputs_are_one_line_each(run_dir, tmp_path, capsys, extra, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    places = {"EMPTY": tmp_path / "empty", "CORRUPT": tmp_path / "corrupt.pt", "RUN": run_dir}
    extra = [str(places.get(value, value)) for value in extra]
    assert env_tm.main(watch_args(*extra)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err, err


def test_record_video_without_watch_is_refused_at_parse_time(capsys):
    with pytest.raises(SystemExit) as exit_info:
        env_tm.parse_args(["--record-video", "drive.gif"])
    assert exit_info.value.code == 2
    assert "--record-video records a checkpoint driving: give --watch too" in capsys.readouterr().err


def test_the_window_shows_every_step_and_closing_it_stops_the_drive(run_dir, monkeypatch):
    """The window path, on SDL's dummy display (a test has no screen): frames of 600 x 400 reach it, one
    per step, and a QUIT event (the window closed) ends the drive at once."""
    import pygame

    import embedded_track

    def dummy_window(size, caption):
        pygame.display.quit()
        monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
        pygame.display.init()
        return pygame.display.set_mode(size)

    monkeypatch.setattr(embedded_track, "open_window", dummy_window)
    shown = []
    original = watch.Window.show

    def counting_show(self, rgb):
        shown.append(rgb.shape)
        if len(shown) == 10:
            pygame.event.post(pygame.event.Event(pygame.QUIT))
        self.time_step = 0.0  # no pacing in a test
        original(self, rgb)

    monkeypatch.setattr(watch.Window, "show", counting_show)
    args = env_tm.parse_args(watch_args("--watch", str(run_dir)))
    assert watch.watch(args, "embedded", run_dir) == 0
    assert shown == [(400, 600, 3)] * 10, "the drive ends on the frame the window was closed at"
    assert sys.modules["pygame"].display.get_init() is False


def test_on_trackmania_a_watched_checkpoint_drives_the_game(tmp_path):
    """Through tmrl's real interface against the fake game: a checkpoint of a TrackMania run drives one
    episode greedily, prints its return, and the run folder is left as it was."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fake_game import run_on_fake_game
    from fake_openplanet import write_tmrl_data

    write_tmrl_data(tmp_path / "home")
    short = ("--set", "ep_max_length=30")
    trained = run_on_fake_game(tmp_path, {"drive": 10.0}, 60, *short)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    run_dir = tmp_path / "runs" / "tm"
    before = files_of(run_dir)
    watched = run_on_fake_game(tmp_path, {"drive": 10.0}, 60, "--watch", str(run_dir), "--eval-episodes", "1")
    assert watched.returncode == 0, watched.stdout[-2000:] + watched.stderr[-2000:]
    assert f"watching {run_dir / 'best.pt'}" in watched.stdout and "greedily on trackmania" in watched.stdout
    assert "episode 1: return " in watched.stdout and "in 30 steps" in watched.stdout
    assert files_of(run_dir) == before
    refused = run_on_fake_game(tmp_path, {}, 60, "--watch", str(run_dir), "--record-video", "x.gif")
    assert refused.returncode == 1 and "--record-video records the embedded track" in refused.stderr
