"""Recording demonstrations: `python env_tm.py --record-demos NAME` drives episodes (the player on TrackMania,
the keyboard or a scripted driver on the embedded track) and writes them as a demonstration set (demos.py)
instead of training.

It sits above the environments (environment.py) and demos.py, which the learner imports: demos.py reads and
writes the files, this module drives the episodes that fill them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

import demos
import environment
from cli import EXIT_INTERRUPTED, EXIT_OK
from console import StopRequest
from tm_config import Config


def record_demos(args: argparse.Namespace) -> int:
    """Record demonstration episodes (demos.py) until --demo-episodes or Ctrl+C; finished ones are kept."""
    config = Config().with_assignments(args.overrides)
    env_name = environment.choose_environment(args.env, config)
    raw = config.with_overrides(previous_actions=0)  # files keep the raw car floats; actions come apart
    player_drives = environment.environment_class(env_name).player_drives
    driver = "player" if player_drives else args.driver
    writer = demos.DemoWriter(Path(args.demo_root) / args.record_demos, env_name, driver)
    env = environment.build_environment(env_name, config, args.seed)
    keyboard = demos.KeyboardDriver() if driver == "human" else None
    scripted = demos.ScriptedDriver() if driver == "scripted" else None
    stop = StopRequest("stopping: the episode being driven is dropped, every finished one is kept")
    stop.install()
    recorded, start = 0, len(writer.manifest["episodes"])
    print(
        f"recording {driver} demonstrations on {env_name} into {writer.folder} "
        + (f"({args.demo_episodes} episodes)" if args.demo_episodes else "(Ctrl+C stops)")
        + ("; drive now: the program sends no control" if player_drives else ""),
        flush=True,
    )
    try:
        while not stop.requested and (args.demo_episodes is None or recorded < args.demo_episodes):
            seed = demos.RECORD_SEED_BASE + start + recorded
            obs, _ = env.reset(seed=seed)
            frames, car = environment.split_observation(obs, raw)
            stack, cars, inputs, actions, rewards = list(frames), [car], [], [], []
            telemetry = [player_inputs(env)] if player_drives else None
            over = terminated = False
            info: dict[str, Any] = {}
            while not over and not stop.requested:
                if keyboard is not None and keyboard.quit_requested:
                    stop.requested = True  # the window was closed
                    break
                if player_drives:
                    obs, reward, terminated, truncated, info = env.step(None)  # the player drives
                    telemetry.append(player_inputs(env))
                else:
                    action = keyboard.act(env) if keyboard else scripted.act(env)
                    vector = demos.ACTION_TABLE[action]
                    obs, reward, terminated, truncated, info = env.step(vector.copy())
                    actions.append(action)
                    inputs.append(vector)
                frames, car = environment.split_observation(obs, raw)
                stack.append(frames[-1])
                cars.append(car)
                rewards.append(environment.checked_reward(reward, len(rewards)))
                over = bool(terminated or truncated)
            if not over:
                break  # stopped mid-episode: it is dropped
            steps = len(rewards)
            if telemetry is not None:
                inputs = telemetry[1:]
                actions = list(demos.player_actions(np.asarray(telemetry), steps))
            finished = bool(info.get("finished", False))
            race_time = steps * config.time_step_duration if finished else None
            place = {"map": "TrackMania (the map loaded)"} if player_drives else {"track_seed": seed}
            episode = demos.DemoEpisode(
                np.asarray(stack, np.uint8), np.asarray(cars, np.float32), np.asarray(inputs, np.float32),
                np.asarray(actions, np.uint8), np.asarray(rewards, np.float32), bool(terminated),
                not bool(terminated), finished, {"environment": env_name, "race_time": race_time, **place},
            )  # fmt: skip
            path = writer.write(episode)
            recorded += 1
            print(
                f"episode {start + recorded}: {steps} steps, return {sum(rewards):.1f}"
                + (f", finished in {race_time:.2f} s" if finished else "")
                + f" -> {path}",
                flush=True,
            )
    finally:
        stop.uninstall()
        env.close()
        if keyboard is not None:
            keyboard.close()
    print(
        f"{recorded} episodes recorded into {writer.folder} ({len(writer.manifest['episodes'])} in all)",
        flush=True,
    )
    return EXIT_INTERRUPTED if stop.requested else EXIT_OK


def player_inputs(env: Any) -> list[float]:
    """The player's [gas, brake, steer] as the car reports it (the plugin's telemetry)."""
    telemetry = env.last_telemetry
    return [telemetry["gas"], telemetry["brake"], telemetry["steer"]]
