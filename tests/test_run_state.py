"""run_state.py: the run's counters and random streams a checkpoint keeps."""

from __future__ import annotations

import math
import random

import numpy as np

from run_state import RunState, actor_streams, race_fields, restore_actor_streams


def test_a_checkpoints_run_state_round_trips_and_older_checkpoints_still_load():
    run = RunState(step=1200, episode=30, best_race_time=41.5, race_times=[44.0, 41.5], time_step_timeouts=7)
    again = RunState.from_checkpoint({**run.checkpoint_fields(), "extra": 1})
    assert again.checkpoint_fields() == run.checkpoint_fields()
    old = RunState.from_checkpoint({"step": 10, "episode": 1, "best_interval_reward": -math.inf})
    assert old.race_times == [] and old.best_race_time is None and old.time_step_timeouts == 0


def test_race_fields_count_every_finish_and_time_only_the_reliable_ones():
    run = RunState(best_race_time=41.5, race_times=[44.0, 41.5], unreliable_finishes=1, time_step_timeouts=7)
    assert race_fields(run) == {
        "finishes": 3,
        "unreliable_finishes": 1,
        "best_race_time": 41.5,
        "median_race_time": 42.75,
        "time_step_timeouts_total": 7,
    }
    assert race_fields(RunState())["median_race_time"] is None


def test_the_acting_sides_random_streams_come_back_as_they_were_saved():
    class Agent:
        streams = {"epsilon": 1}

        def acting_streams(self):
            return dict(self.streams)

        def load_acting_streams(self, streams):
            self.streams = streams

    actor = type("Actor", (), {"agent": Agent()})()
    saved = actor_streams(actor)
    drawn = (random.random(), np.random.rand())
    actor.agent.streams = {"epsilon": 2}
    restore_actor_streams(saved, actor)
    assert (random.random(), np.random.rand()) == drawn and actor.agent.streams == {"epsilon": 1}
    restore_actor_streams({**saved, "actor_rng": None}, actor)  # an older checkpoint: the agent's stand
    assert actor.agent.streams == {"epsilon": 1}
