"""Shared test helpers: a small network config and a replay memory filled with synthetic driving."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The suite's networks are tiny: one thread avoids oversubscribing a shared 2-core machine.
torch.set_num_threads(1)

# Tests never talk to W&B's servers.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from replay import PrioritizedReplay  # noqa: E402
from tm_config import Config  # noqa: E402

# Only sizes shrink, so the pinned schedules (target copy every 1500, lr 1e-4, epsilon) stay as pinned.
SMALL_NETWORK = {
    "conv_channels_1": 4,
    "conv_channels_2": 4,
    "car_feature_hidden_dim": 16,
    "cosine_dim": 8,
    "hidden_dim": 8,
    "batch_size": 4,
    "max_buffer_size": 256,
}


# The same small network as `--set` assignments, with short episodes and frequent logs and checkpoints,
# for tests that run env_tm.py end to end.
FAST_ASSIGNMENTS = [f"{key}={value}" for key, value in SMALL_NETWORK.items() if key != "max_buffer_size"] + [
    "max_buffer_size=512",
    "ep_max_length=40",
    "checkpoint_frequency=1",
    "log_every_steps=10",
]


def small_config(**overrides: object) -> Config:
    return Config().with_overrides(**{**SMALL_NETWORK, **overrides})


def fill_replay(replay: PrioritizedReplay, transitions: int, seed: int = 0, episode_length: int = 50) -> None:
    """Synthetic episodes: random frames, rising speed, reward = speed / 100."""
    rng = np.random.default_rng(seed)
    replay.start_episode(rng.integers(0, 256, (4, 64, 64), dtype=np.uint8), np.zeros(3, np.float32))
    for t in range(transitions):
        step_in_episode = t % episode_length
        car = np.array([10.0 * step_in_episode, 1 + step_in_episode % 5, 2000.0], np.float32)
        ends = step_in_episode == episode_length - 1
        replay.add(
            action=int(rng.integers(11)),
            reward=float(car[0] / 100.0),
            terminated=bool(ends and t % 2 == 0),
            truncated=bool(ends and t % 2 == 1),
            next_frame=rng.integers(0, 256, (64, 64), dtype=np.uint8),
            next_car=car,
        )
        if ends:
            replay.start_episode(rng.integers(0, 256, (4, 64, 64), dtype=np.uint8), np.zeros(3, np.float32))


@pytest.fixture
def config() -> Config:
    return small_config()


@pytest.fixture
def replay(config: Config) -> PrioritizedReplay:
    memory = PrioritizedReplay.from_config(config, seed=0)
    fill_replay(memory, 200)
    return memory
