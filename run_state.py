"""The run's counters and random streams: RunState (steps, episodes, races, timeouts, evaluations, across
resumes) and the acting side's random streams, both kept in every checkpoint beside the learner's agent and
replay."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class RunState:
    """The actor's counters, kept in every checkpoint beside the learner's agent and replay."""

    step: int = 0  # global environment steps, across resumes
    episode: int = 0  # completed episodes, across resumes
    best_interval_reward: float = -math.inf
    best_race_time: float | None = None  # the fastest reliable finish so far (seconds), None before one
    race_times: list[float] = field(default_factory=list)  # every reliable finish's time, for the median
    # Finishes whose race time is not to be trusted (time-step timeouts in the episode): they count as
    # finishes, never as times (never the best, never best.pt).
    unreliable_finishes: int = 0
    time_step_timeouts: int = 0  # rtgym's timed-out time steps, across resumes
    wandb_run_id: str | None = None
    last_eval_step: int | None = None  # None: never evaluated
    interval_rewards: list[float] = field(default_factory=list)  # since the last periodic checkpoint
    interval_race_times: list[float] = field(default_factory=list)

    KEPT = ("step", "episode", "best_interval_reward", "best_race_time", "race_times", "time_step_timeouts",
            "wandb_run_id", "last_eval_step", "unreliable_finishes")  # fmt: skip

    @classmethod
    def from_checkpoint(cls, run: dict[str, Any]) -> RunState:
        values = {key: run[key] for key in cls.KEPT if key in run}  # older checkpoints lack the newer keys
        values["race_times"] = [float(t) for t in values.get("race_times", [])]
        return cls(**values)

    def checkpoint_fields(self) -> dict[str, Any]:
        values = asdict(self)
        return {key: values[key] for key in self.KEPT}

    @property
    def finishes(self) -> int:
        return len(self.race_times) + self.unreliable_finishes


def actor_streams(actor: Any) -> dict[str, Any]:
    """The random streams of the acting side, saved with each checkpoint."""
    return {
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
        "actor_rng": actor.agent.acting_streams(),
    }


def restore_actor_streams(run: dict[str, Any], actor: Any) -> None:
    random.setstate(run["python_rng"])
    np.random.set_state(run["numpy_rng"])
    streams = run.get("actor_rng")
    if streams is None:  # a checkpoint from before the learner moved beside the actor: the agent's are it
        return
    actor.agent.load_acting_streams(streams)


def race_fields(run: RunState) -> dict[str, Any]:
    """The run's race counts for its closing record."""
    return {
        "finishes": run.finishes,
        "unreliable_finishes": run.unreliable_finishes,
        "best_race_time": run.best_race_time,
        "median_race_time": float(np.median(run.race_times)) if run.race_times else None,
        "time_step_timeouts_total": run.time_step_timeouts,
    }
