"""Demonstrations: the player's own laps, recorded, stored, checked and turned into replay transitions.

    python env_tm.py --record-demos my-laps                      # TrackMania: you drive, the program records
    python env_tm.py --env embedded --record-demos keys            # the embedded track, keyboard, in a window
    python env_tm.py --env embedded --record-demos auto --driver scripted --demo-episodes 20
    python env_tm.py --demos my-laps                               # train with them (a recorded departure)

A set of demonstrations is a folder `demos/<name>/`: one compressed file per finished episode
(`episode-0001.npz`: the frames stored once, uint8, as in the replay memory; the raw car floats of every
observation; the player's [gas, brake, steer] inputs; the discrete action of each step; the rewards and how
the episode ended) and `manifest.json` (environment, map or track seed, steps, return, finished, race time,
who drove, and each file's SHA-256). Every episode is written, then the manifest, each atomically, as soon as
the episode ends: Ctrl+C keeps every finished episode. Loading checks each file against its manifest entry
and its own shapes; a damaged or missing file is reported in one line and skipped, never used.

Actions. The agent picks one of the 11 actions of the table; a player's inputs are mapped to the nearest one
(`nearest_action`, one tested function). On the embedded track the player's (or the scripted driver's)
action goes through env.step like the agent's, so a demonstration step is exactly an agent step. On
TrackMania the program does not drive (it sends no control at all): the player's inputs come from the car's
telemetry, read as each observation is captured. rtgym applies an agent's action during the step after the
one it was chosen in, so the action of transition t is the input the car reports at observation t + 2
(`player_actions`), the last known one where the episode ended first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tm_config import ACTIONS, Config, demo_names, folder_name_problem

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ACTION_TABLE = np.array([vector for _, vector in ACTIONS], dtype=np.float32)  # (11, 3) [gas, brake, steer]
RECORD_SEED_BASE = (
    3_000_000_000  # tracks of recorded episodes: neither training (< 4e9) nor evaluation (4e9+)
)


class DemoError(ValueError):
    """Demonstrations that cannot be recorded or used; the message is one line."""


def nearest_action(inputs: Any) -> int:
    """The row of the action table nearest to a [gas, brake, steer] input (Euclidean; the first on a tie)."""
    vector = np.asarray(inputs, dtype=np.float32).reshape(-1)
    if vector.shape != (3,) or not np.isfinite(vector).all():
        raise DemoError(f"a player's input is a finite [gas, brake, steer], got {vector.tolist()}")
    return int(np.argmin(((ACTION_TABLE - vector) ** 2).sum(axis=1)))


def player_actions(inputs: np.ndarray, steps: int, delay: int = 2) -> np.ndarray:
    """The discrete action of each of `steps` transitions from the inputs the car reported at each of the
    steps + 1 observations: transition t's action is what the car did at observation t + delay (module
    docstring), the last reported input where the episode ended first."""
    inputs = np.asarray(inputs, dtype=np.float32).reshape(-1, 3)
    if len(inputs) != steps + 1:
        raise DemoError(f"{len(inputs)} inputs for {steps} steps (expected one per observation, {steps + 1})")
    positions = np.minimum(np.arange(steps) + delay, steps)
    return np.array([nearest_action(inputs[p]) for p in positions], dtype=np.uint8)


# --- files ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DemoEpisode:
    """One recorded episode: frames (stack + steps, 64, 64) uint8, car (steps + 1, 3), inputs (steps, 3),
    actions (steps,), rewards (steps,), and how it ended."""

    frames: np.ndarray
    car: np.ndarray
    inputs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: bool
    truncated: bool
    finished: bool
    info: dict[str, Any]

    @property
    def steps(self) -> int:
        return len(self.actions)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "format": np.array(FORMAT_VERSION),
            "frames": self.frames,
            "car": self.car,
            "inputs": self.inputs,
            "actions": self.actions,
            "rewards": self.rewards,
            "ends": np.array([self.terminated, self.truncated, self.finished]),
        }


def _write_atomically(path: Path, data: bytes) -> None:
    handle, temp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


class DemoWriter:
    """Writes one set of demonstrations, episode by episode (each file, then the manifest, atomically)."""

    def __init__(self, folder: Path, environment: str, driver: str) -> None:
        self.folder = Path(folder)
        problem = folder_name_problem(self.folder.name)
        if problem is not None:
            raise DemoError(f"demonstration set name {self.folder.name!r} {problem}")
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = self.folder / MANIFEST
        if manifest.exists():
            self.manifest = read_manifest(self.folder)
            if self.manifest["environment"] != environment:
                raise DemoError(
                    f"{self.folder} holds demonstrations of {self.manifest['environment']}, not "
                    f"{environment}: record into another name"
                )
        else:
            self.manifest = {"format": FORMAT_VERSION, "environment": environment, "episodes": []}
        self.driver = driver

    def write(self, episode: DemoEpisode) -> Path:
        number = len(self.manifest["episodes"]) + 1
        path = self.folder / f"episode-{number:04d}.npz"
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **episode.arrays())
        data = buffer.getvalue()
        _write_atomically(path, data)
        self.manifest["episodes"].append(
            {
                "file": path.name,
                "sha256": hashlib.sha256(data).hexdigest(),
                "steps": episode.steps,
                "return": float(episode.rewards.sum()),
                "finished": bool(episode.finished),
                "race_time": episode.info.get("race_time"),
                "driver": self.driver,
                "recorded_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                **{k: v for k, v in episode.info.items() if k != "race_time"},
            }
        )
        _write_atomically(
            self.folder / MANIFEST, (json.dumps(self.manifest, indent=2) + "\n").encode("utf-8")
        )
        return path


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DemoError(
            f"no demonstrations at {folder} (no {MANIFEST}): record some with --record-demos"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DemoError(f"{path} cannot be read ({type(error).__name__}: {error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("episodes"), list):
        raise DemoError(f"{path} is not a demonstration manifest")
    if manifest.get("format") != FORMAT_VERSION:
        raise DemoError(
            f"{path} has format {manifest.get('format')!r}, this rainbow-tm reads {FORMAT_VERSION}"
        )
    return manifest


def load_episode(folder: Path, entry: dict[str, Any], stack: int) -> DemoEpisode:
    """One episode file, checked against its manifest entry; DemoError (one line) if it is damaged."""
    path = Path(folder) / str(entry.get("file", ""))
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DemoError(f"{path} cannot be read ({error.strerror or error})") from None
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise DemoError(f"{path} is damaged (its checksum differs from the manifest's)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            values = {
                key: arrays[key]
                for key in ("format", "frames", "car", "inputs", "actions", "rewards", "ends")
            }
    except Exception as error:  # a damaged archive raises many kinds
        raise DemoError(f"{path} is damaged ({type(error).__name__})") from None
    steps = len(values["actions"])
    expected = {
        "frames": ((stack + steps, 64, 64), np.uint8),
        "car": ((steps + 1, 3), np.float32),
        "inputs": ((steps, 3), np.float32),
        "actions": ((steps,), np.uint8),
        "rewards": ((steps,), np.float32),
        "ends": ((3,), np.bool_),
    }
    for key, (shape, dtype) in expected.items():
        value = values[key]
        if value.shape != shape or value.dtype != dtype:
            raise DemoError(
                f"{path} is damaged ({key} is {value.dtype}{value.shape}, expected {np.dtype(dtype)}{shape})"
            )
    if int(values["format"]) != FORMAT_VERSION or steps < 1 or steps != entry.get("steps"):
        raise DemoError(f"{path} does not match its manifest entry ({steps} steps)")
    if int(values["actions"].max()) >= len(ACTION_TABLE) or not np.isfinite(values["rewards"]).all():
        raise DemoError(f"{path} is damaged (an action outside the table or a non-finite reward)")
    if not np.isfinite(values["car"]).all():
        raise DemoError(f"{path} is damaged (non-finite car floats)")
    terminated, truncated, finished = (bool(v) for v in values["ends"])
    info = {k: v for k, v in entry.items() if k not in ("file", "sha256")}
    return DemoEpisode(
        values["frames"], values["car"], values["inputs"], values["actions"], values["rewards"],
        terminated, truncated, finished, info,
    )  # fmt: skip


def load_sets(root: Path, config: Config, report: Callable[[str], None]) -> list[DemoEpisode]:
    """Every usable episode of the sets named by `config.demos` under `root`; damaged ones are reported
    through `report` and skipped. DemoError if a set is missing or no episode at all can be used."""
    episodes: list[DemoEpisode] = []
    for name in demo_names(config.demos):
        folder = Path(root) / name
        manifest = read_manifest(folder)
        for entry in manifest["episodes"]:
            try:
                episodes.append(load_episode(folder, entry, config.conv_input))
            except DemoError as error:
                report(f"demonstration skipped: {error}")
    if not episodes:
        raise DemoError(
            f"no usable demonstration episode in {', '.join(demo_names(config.demos))} under {root}"
        )
    return episodes


def state_rows(episode: DemoEpisode, config: Config) -> np.ndarray:
    """The state floats of each of the episode's observations: the car floats, then with
    `previous_actions` P the last P actions taken before it (coast, all zeros, before the first)."""
    rows = [episode.car]
    if config.previous_actions:
        vectors = np.concatenate([np.zeros((2, 3), np.float32), ACTION_TABLE[episode.actions]])
        # observation k follows actions 0 .. k-1: its newest is vectors[k + 1], its older vectors[k]
        older, newest = vectors[: episode.steps + 1], vectors[1 : episode.steps + 2]
        rows += [older, newest] if config.previous_actions == 2 else [newest]
    return np.concatenate(rows, axis=1).astype(np.float32)


def transitions_of(episodes: list[DemoEpisode]) -> int:
    return sum(episode.steps for episode in episodes)


def fill(replay: Any, episodes: list[DemoEpisode], config: Config) -> None:
    """Feed the episodes into a replay memory through its public start_episode/add, as the loop does."""
    stack = config.conv_input
    for episode in episodes:
        rows = state_rows(episode, config)
        replay.start_episode(episode.frames[:stack], rows[0])
        for t in range(episode.steps):
            last = t == episode.steps - 1
            replay.add(
                int(episode.actions[t]), float(episode.rewards[t]), last and episode.terminated,
                last and not episode.terminated, episode.frames[stack + t], rows[t + 1],
            )  # fmt: skip


# --- the scripted driver of the embedded track ----------------------------------------------------------
class ScriptedDriver:
    """A simple controller for the embedded track: it steers toward the track's centre line a few tiles ahead
    (from CarRacing's own track geometry), holds a modest speed, and drives through the 11 discrete actions.
    It finishes laps slowly on purpose: demonstrations to learn from, and to beat."""

    def __init__(self, target_kmh: float = 75.0, lookahead: int = 5) -> None:
        self.target_kmh, self.lookahead = target_kmh, lookahead

    def inputs(self, env: Any) -> np.ndarray:
        race = env.unwrapped.car_racing if hasattr(env.unwrapped, "car_racing") else env.car_racing
        car, track = race.car, race.track
        x, y = car.hull.position
        points = np.array([(tx, ty) for _, _, tx, ty in track])
        nearest = int(np.argmin(((points - (x, y)) ** 2).sum(axis=1)))
        tx, ty = points[(nearest + self.lookahead) % len(points)]
        angle = car.hull.angle
        heading = np.array([-math.sin(angle), math.cos(angle)])
        to_target = np.array([tx - x, ty - y])
        to_target /= np.linalg.norm(to_target) + 1e-9
        cross = heading[0] * to_target[1] - heading[1] * to_target[0]  # > 0: the target is to the left
        error = math.atan2(cross, float(heading @ to_target))
        steer = -float(np.clip(error * 3.0, -1.0, 1.0))  # steer -1 is full left
        speed = 3.6 * float(np.hypot(*car.hull.linearVelocity))
        gas = 1.0 if speed < self.target_kmh and abs(error) < 0.6 else 0.0
        brake = 1.0 if speed > self.target_kmh + 25 else 0.0
        return np.array([gas, brake, steer], np.float32)

    def act(self, env: Any) -> int:
        return nearest_action(self.inputs(env))


class KeyboardDriver:
    """The player on the embedded track: the picture in a window, the arrow keys (or W A S D) as the pads,
    paced at the game's 20 Hz. Closing the window stops the recording like Ctrl+C."""

    SCALE = 6  # CarRacing's 96x96 picture, shown 576x576

    def __init__(self, period: float = 0.05) -> None:
        import pygame

        from embedded_track import NoDisplayError, open_window

        self.pygame = pygame
        caption = "rainbow-tm: recording (arrow keys or W A S D; close the window to stop)"
        try:
            self.screen = open_window((96 * self.SCALE, 96 * self.SCALE), caption)
        except NoDisplayError as error:
            raise DemoError(
                f"{error}: a human driver needs a window (--driver scripted drives without)"
            ) from None
        self.period, self.next_tick = period, time.perf_counter()
        self.quit_requested = False

    def inputs(self) -> np.ndarray:
        pygame = self.pygame
        for event in pygame.event.get():
            if event.type == pygame.QUIT:
                self.quit_requested = True
        keys = pygame.key.get_pressed()
        gas = keys[pygame.K_UP] or keys[pygame.K_w]
        brake = keys[pygame.K_DOWN] or keys[pygame.K_s]
        steer = (
            -1.0
            if keys[pygame.K_LEFT] or keys[pygame.K_a]
            else 1.0
            if keys[pygame.K_RIGHT] or keys[pygame.K_d]
            else 0.0
        )
        return np.array([float(gas), float(brake), steer], np.float32)

    def show(self, env: Any) -> None:
        rgb = env.car_racing.state
        if rgb is not None:
            surface = self.pygame.surfarray.make_surface(np.transpose(rgb, (1, 0, 2)))
            self.screen.blit(self.pygame.transform.scale(surface, self.screen.get_size()), (0, 0))
            self.pygame.display.flip()

    def act(self, env: Any) -> int:
        self.show(env)
        self.next_tick += self.period  # the game's pace: a human needs real time
        delay = self.next_tick - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        else:
            self.next_tick = time.perf_counter()
        return nearest_action(self.inputs())

    def close(self) -> None:
        self.pygame.display.quit()
