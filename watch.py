"""Watch a checkpoint drive: `python env_tm.py --watch [CHECKPOINT]`.

The greedy policy of a checkpoint (no epsilon, NoisyNet's noise off: the mean weights, as an evaluation
drives) drives `--eval-episodes` episodes on the held-out tracks, learning nothing and writing nothing
into the run folder; each episode's return is printed. On the embedded track the drive is shown in a
window at the game's pace (20 steps a second), or written to an animated file with `--record-video
PATH` (.gif or .mp4: for a machine without a display); on TrackMania the game itself is the display.

CHECKPOINT is a checkpoint file, or a run folder (its best.pt, else its newest good checkpoint); without
it, the run folder the same command would train in (`--run-name`, or the default name).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

import environment
from checkpoints import BEST_NAME, CheckpointError, CheckpointStore, load_checkpoint
from console import plural
from rainbow import RainbowAgent, resolve_device
from tm_config import Config

VIDEO_SUFFIXES = (".gif", ".mp4")
VIDEO_SIZE = (300, 200)  # the embedded track's 600 x 400 view, halved: a 1,000-step GIF stays ~10 MB


class WatchError(RuntimeError):
    """What keeps a checkpoint from being watched, in one line."""


def find_checkpoint(path: Path) -> Path:
    """A checkpoint file as given, or the one a run folder offers: best.pt, else its newest good one."""
    if not path.exists():
        raise WatchError(f"--watch: {path} does not exist (give a checkpoint file or a run folder)")
    if path.is_file():
        return path
    if (path / BEST_NAME).is_file():
        return path / BEST_NAME
    loaded = CheckpointStore(path, keep_last=1).load_newest_good()
    if loaded is None:
        raise WatchError(f"--watch: no checkpoint in {path} (train first, or give a checkpoint file)")
    return loaded.path


def load_agent(path: Path, device: str) -> tuple[RainbowAgent, Config, dict[str, Any]]:
    """The checkpoint's online net, in an agent built from the checkpoint's own config."""
    state = load_checkpoint(path)
    try:
        config = Config.from_dict(state["config"])
        agent = RainbowAgent(config, replay=None, device=resolve_device(device))
        agent.online.load_state_dict(state["agent"]["online"])
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise CheckpointError(f"checkpoint {path} cannot be watched: {first}") from None
    return agent, config, state


class Window:
    """The drive in a window at the game's pace; closing the window stops the watch."""

    def __init__(self, time_step: float) -> None:
        import pygame

        from embedded_track import NoDisplayError, open_window

        try:
            self.screen = open_window((600, 400), "rainbow-tm: watching a checkpoint drive")
        except NoDisplayError as error:
            raise WatchError(
                f"{error}: write the drive to a file with --record-video drive.gif (or .mp4)"
            ) from None
        self.pygame, self.time_step, self.last = pygame, time_step, time.perf_counter()
        self.closed = False

    def show(self, rgb: np.ndarray) -> None:
        pygame = self.pygame
        for event in pygame.event.get():
            if event.type == pygame.QUIT:
                self.closed = True
        pygame.surfarray.blit_array(self.screen, np.ascontiguousarray(rgb.swapaxes(0, 1)))
        pygame.display.flip()
        wait = self.time_step - (time.perf_counter() - self.last)
        if wait > 0:
            time.sleep(wait)
        self.last = time.perf_counter()

    def close(self) -> None:
        self.pygame.display.quit()


class VideoFile:
    """Frames into an animated GIF (Pillow) or an MP4 (OpenCV), at the game's 20 frames a second."""

    def __init__(self, path: Path, time_step: float) -> None:
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            raise WatchError(f"--record-video {path}: use a .gif or .mp4 file name")
        if not path.parent.exists():
            raise WatchError(f"--record-video {path}: the folder {path.parent} does not exist")
        self.path, self.time_step = path, time_step
        self.frames: list[Any] = []
        self.writer: Any = None
        self.count = 0
        self.closed = False

    def show(self, rgb: np.ndarray) -> None:
        import cv2

        small = cv2.resize(rgb, VIDEO_SIZE, interpolation=cv2.INTER_AREA)
        self.count += 1
        if self.path.suffix.lower() == ".gif":
            from PIL import Image

            self.frames.append(Image.fromarray(small).quantize(colors=64))
            return
        if self.writer is None:
            fourcc = cv2.VideoWriter_fourcc(*"mp4v")
            self.writer = cv2.VideoWriter(str(self.path), fourcc, 1 / self.time_step, VIDEO_SIZE)
            if not self.writer.isOpened():
                raise WatchError(f"--record-video {self.path}: OpenCV cannot write MP4 here: use a .gif name")
        self.writer.write(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
        elif self.frames:
            duration_ms = round(1000 * self.time_step)
            self.frames[0].save(
                self.path, save_all=True, append_images=self.frames[1:], duration=duration_ms, loop=0
            )


def watch(args: argparse.Namespace, env_name: str, run_dir: Path) -> int:
    """Drive the checkpoint's greedy policy; returns the exit code (0)."""
    path = find_checkpoint(Path(args.watch) if args.watch else run_dir)
    agent, config, state = load_agent(path, args.device)
    on_screen = environment.environment_class(env_name).on_screen
    if args.record_video and on_screen:
        raise WatchError(
            "--record-video records the embedded track: TrackMania is on your screen (record it there)"
        )
    step = int(state.get("step", 0))
    print(
        f"watching {path} (step {step:,}, {state.get('episode', 0):,} episodes) drive "
        f"{args.eval_episodes} held-out track{'' if args.eval_episodes == 1 else 's'} greedily on {env_name}",
        flush=True,
    )
    env = environment.build_environment(env_name, config, args.seed)
    display = None
    try:
        if not on_screen:
            display = (
                VideoFile(Path(args.record_video), config.time_step_duration)
                if args.record_video
                else (Window(config.time_step_duration))
            )

        def after_step() -> bool:
            if display is not None:
                display.show(env.unwrapped.view())
                return not display.closed
            return True

        def after_episode(index: int, total: float, length: int) -> None:
            print(f"episode {index + 1}: return {total:.1f} in {length} steps", flush=True)

        # The evaluation itself: the returns printed are the ones an evaluation of these weights records.
        result = environment.evaluate(agent, env, config, args.eval_episodes, after_step, after_episode)
    finally:
        if display is not None:
            display.close()
        env.close()
    if result.returns:
        mean = np.mean(result.returns)
        print(f"mean return {mean:.1f} over {plural(len(result.returns), 'episode')}", flush=True)
    if args.record_video:
        print(f"the drive is in {args.record_video} ({display.count:,} frames)", flush=True)
    return 0
