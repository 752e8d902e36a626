"""The environment side of a run: choosing and building one, and reading what it gives.

Both environments (TrackMania through tmrl, and the embedded track) speak tmrl's TM20FULL interface:
observations (speed, gear, rpm, images uint8 (4, 64, 64), act1, act2) and [gas, brake, steer] actions.
`split_observation` turns an observation into what the agent uses and rejects anything else in one line;
`drive_episodes` / `evaluate` drive the greedy policy on held-out tracks without storing or learning.

Used by the single-PC loop (env_tm.py) and by the scale-out worker (distributed.py).
"""

from __future__ import annotations

import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rainbow import ACTION_VECTORS, RainbowAgent
from tm_config import Config, Runtime
from tm_game import TrackManiaSetupError
from tm_setup import check_tmrl_available
from trackmania import (
    TrackManiaEnv,
    make_trackmania_env,
)  # imports tmrl lazily (Windows-only): importing it costs nothing

# Evaluation tracks: seeds no training episode draws (training seeds are seed * 1_000_003 + episode, below
# this for --seed < 3,999), the same list for every evaluation so the points of a curve are comparable.
EVAL_SEED_BASE = 4_000_000_000
TRAIN_SEED_STRIDE = 1_000_003  # training tracks of --seed s: s * stride + episode


class ObservationError(ValueError):
    """An observation that does not have the TM20FULL layout; one line naming the problem."""


def choose_environment(choice: str, config: Config, ask: Callable[[str], str] | None = None) -> str:
    """`trackmania` or `embedded`. `auto` falls back to the embedded track and says why in one line; on
    Windows, where the users' game is, only after a yes to a question (`ask`, default: `input` on a
    terminal), never silently: a TrackMania user whose game did not answer must not train on CarRacing for
    a week. Without a terminal to ask on, it stops in one line instead."""
    if choice == "embedded":
        return "embedded"
    reason = check_tmrl_available(config)
    if reason is None:
        return "trackmania"
    if choice == "trackmania":
        raise TrackManiaSetupError(f"--env trackmania: {reason}")
    if platform.system() == "Windows":
        if ask is None and sys.stdin is not None and sys.stdin.isatty():
            ask = input
        options = (
            "`--env embedded` trains on it without asking; `--check-trackmania` checks the game's set-up"
        )
        if ask is None:
            raise TrackManiaSetupError(f"TrackMania does not answer ({reason}); {options}")
        try:
            answer = ask(
                f"TrackMania does not answer: {reason}\n"
                "Train on the embedded track (CarRacing) instead? [y/N] "
            )
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            raise TrackManiaSetupError(f"not started: TrackMania does not answer; {options}")
    print(f"TrackMania not used: {reason}. Training on the embedded track instead.", flush=True)
    return "embedded"


def environment_class(name: str) -> type | None:
    """The class `build_environment(name, ...)` builds: what such an environment is (`real_time`,
    `player_drives`, `on_screen`, `thread_log`), known before one is built (a run's threads, who drives a
    recording, what a watcher sees, where the game's threads log). None for a run without an environment of
    its own (the scale-out trainer)."""
    if name == "trackmania":
        return TrackManiaEnv
    if name == "embedded":
        from embedded_track import EmbeddedTrackEnv  # gymnasium's Box2D loads when a track is made

        return EmbeddedTrackEnv
    return None


def build_environment(name: str, config: Config, seed: int, runtime: Runtime | None = None) -> Any:
    """The environment `name` for `config`; `runtime` has the game's watchdog timeouts (default: Runtime)."""
    if name == "trackmania":
        runtime = runtime or Runtime()
        return make_trackmania_env(
            config, step_timeout=runtime.game_step_timeout_s, reset_timeout=runtime.game_reset_timeout_s
        )
    from embedded_track import make_embedded_track  # imports gymnasium's Box2D only when used

    return make_embedded_track(config, seed=seed)


def split_observation(obs: Any, config: Config) -> tuple[np.ndarray, np.ndarray]:
    """TM20FULL tuple (speed, gear, rpm, images, act1, act2) -> (frames uint8 (4,64,64), state floats).

    The state floats are speed, gear and rpm, then with `previous_actions` P > 0 the last P actions sent,
    oldest first, as tmrl's act1 (the older) and act2 (the newest: the action passed to the step that
    returned this observation, which the car applies during the next step). The pin (P = 0) drops them."""
    if not isinstance(obs, (tuple, list)) or len(obs) != 6:
        kind = f"{type(obs).__name__} of length {len(obs)}" if hasattr(obs, "__len__") else type(obs).__name__
        raise ObservationError(f"observation must be the 6-part TM20FULL tuple, got a {kind}")
    speed, gear, rpm, images = obs[0], obs[1], obs[2], obs[3]
    frames = np.asarray(images)
    expected = (config.conv_input, config.img_y, config.img_x)
    if frames.shape != expected:
        raise ObservationError(f"observation images have shape {frames.shape}, expected {expected}")
    if frames.dtype != np.uint8:  # a float image in [0, 1] would silently turn black if converted
        raise ObservationError(f"observation images are {frames.dtype}, expected uint8 grayscale (0-255)")
    car = np.array([np.ravel(speed)[0], np.ravel(gear)[0], np.ravel(rpm)[0]], dtype=np.float32)
    if not np.isfinite(car).all():
        raise ObservationError(f"observation speed/gear/rpm are not finite: {car.tolist()}")
    if config.previous_actions:
        actions = [np.asarray(part, dtype=np.float32).reshape(-1) for part in obs[4:6]]
        if any(a.shape != (3,) or not np.isfinite(a).all() for a in actions):
            raise ObservationError("observation act1/act2 must be finite [gas, brake, steer] vectors")
        car = np.concatenate([car, *actions[2 - config.previous_actions :]])
    return frames, car


def checked_reward(reward: Any, step: int) -> float:
    value = float(reward)
    if not math.isfinite(value):
        # Stored, it would be drawn at max priority forever and poison every batch it lands in.
        raise ObservationError(f"the environment returned a non-finite reward ({value}) at step {step:,}")
    return value


# --- evaluation ----------------------------------------------------------------------------------
@dataclass
class Evaluation:
    returns: list[float]
    lengths: list[int]
    seconds: float

    def record(self) -> dict[str, float]:
        returns = np.asarray(self.returns)
        return {
            "return_mean": float(returns.mean()),
            "return_std": float(returns.std()),
            "return_min": float(returns.min()),
            "return_max": float(returns.max()),
            "length_mean": float(np.mean(self.lengths)),
            "episodes": len(self.returns),
            "seconds": self.seconds,
        }


def training_seed(run_seed: int, episode: int) -> int:
    """The track of a training episode: distinct for every (--seed, episode) pair of seeds 0..3998 and the
    first million episodes, and always below EVAL_SEED_BASE, so never one of the held-out tracks."""
    return (run_seed * TRAIN_SEED_STRIDE + episode) % EVAL_SEED_BASE


def evaluation_seeds(episodes: int) -> list[int]:
    return [EVAL_SEED_BASE + k for k in range(episodes)]


def drive_episodes(
    env: Any,
    config: Config,
    seeds: list[int],
    policy: Callable[[np.ndarray, np.ndarray], int],
    after_step: Callable[[], bool] | None = None,
    after_episode: Callable[[int, float, int], None] | None = None,
) -> Evaluation:
    """One episode per track seed, actions from `policy(frames, car)`; nothing is stored or learned.
    `after_step()` (a display) may stop the drive by returning False; `after_episode(index, return,
    length)` hears of each episode as it ends."""
    start = time.perf_counter()
    returns, lengths = [], []
    for index, seed in enumerate(seeds):
        obs, _ = env.reset(seed=seed)
        total, length, over = 0.0, 0, False
        while not over:
            frames, car = split_observation(obs, config)
            obs, reward, terminated, truncated, _ = env.step(ACTION_VECTORS[policy(frames, car)].copy())
            total += checked_reward(reward, length)
            length += 1
            over = bool(terminated or truncated)
            if after_step is not None and not after_step():
                return Evaluation(returns, lengths, time.perf_counter() - start)
        returns.append(total)
        lengths.append(length)
        if after_episode is not None:
            after_episode(index, total, length)
    return Evaluation(returns, lengths, time.perf_counter() - start)


def evaluate(
    agent: RainbowAgent,
    env: Any,
    config: Config,
    episodes: int,
    after_step: Callable[[], bool] | None = None,
    after_episode: Callable[[int, float, int], None] | None = None,
) -> Evaluation:
    """The greedy policy (no epsilon, noise off: the mean weights) on the held-out tracks. Its quantile
    fractions come from a stream of its own, so the agent's streams are untouched (training goes on as it
    would have) and the same weights always score the same. `after_step`/`after_episode`: drive_episodes'
    (a watched drive's display and printout)."""
    agent.online.set_noise(False)
    generator = torch.Generator(device=agent.device).manual_seed(EVAL_SEED_BASE)
    try:
        return drive_episodes(
            env,
            config,
            evaluation_seeds(episodes),
            lambda f, c: agent.greedy_action(f, c, generator),
            after_step,
            after_episode,
        )
    finally:
        agent.online.set_noise(True)
