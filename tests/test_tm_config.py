"""tm_config.py: validated overrides, one-line errors naming the key, departures, round trips.
(The pinned values themselves are guarded in test_config_guard.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from tm_config import (
    ACTIONS,
    NUMBER_OF_ACTIONS,
    Config,
    ConfigError,
    Runtime,
    clip_action,
    describe_departures,
)


def test_assignments_are_converted_to_each_fields_type():
    config = Config().with_assignments(
        [
            "batch_size=64",
            "learning_rate=3e-4",
            "use_dueling=false",
            "wandb_project=mine",
            "epsilon_cutoff=30_000_000",
        ]
    )
    assert config.batch_size == 64 and isinstance(config.batch_size, int)
    assert config.learning_rate == 3e-4 and config.use_dueling is False and config.wandb_project == "mine"
    assert config.epsilon_cutoff == 30_000_000


def test_an_int_given_for_a_float_field_becomes_that_float():
    config = Config().with_overrides(gradient_clip_norm=50)
    assert config.gradient_clip_norm == 50.0 and isinstance(config.gradient_clip_norm, float)


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("foo=1", "unknown config key 'foo'"),
        ("tau=0.002", "unknown config key 'tau'"),
        ("batch_size", "override 'batch_size' is not of the form key=value"),
        ("=3", "override '=3' is not of the form key=value"),
        ("batch_size=3.5", "batch_size='3.5' has the wrong type: expected int"),
        ("use_dueling=maybe", "use_dueling='maybe' has the wrong type: expected bool"),
        ("learning_rate=fast", "learning_rate='fast' has the wrong type: expected float"),
        ("learning_rate=inf", "learning_rate=inf must be a finite number"),
        ("discount_factor=1", "discount_factor=1.0 is out of range: must be in [0, 1)"),
        ("learning_rate=0", "learning_rate=0.0 is out of range: must be in (0, 1)"),
        ("alpha=1.5", "alpha=1.5 is out of range: must be in [0, 1]"),
        ("batch_size=0", "batch_size=0 is out of range: must be >= 1"),
        ("img_x=96", "img_x=96 is out of range: must be 64"),
        ("batch_size=200000", "batch_size=200000 must not exceed max_buffer_size=100000"),
        ("epsilon_end=0.9", None),
        ("epsilon_decay_to=30000000", "epsilon_decay_to=30000000 must not exceed epsilon_cutoff=25000000"),
    ],
)
def test_bad_overrides_are_one_line_naming_the_key(assignment, message):
    if message is None:  # a legal departure: allowed, then recorded
        assert Config().with_assignments([assignment]).departures()
        return
    with pytest.raises(ConfigError) as error:
        Config().with_assignments([assignment])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_python_overrides_are_type_checked_too():
    with pytest.raises(ConfigError, match="batch_size=True has the wrong type: expected int"):
        Config().with_overrides(batch_size=True)
    with pytest.raises(ConfigError, match="use_dueling=1 has the wrong type: expected bool"):
        Config().with_overrides(use_dueling=1)


def test_departures_list_exactly_the_changed_keys():
    config = Config().with_assignments(["batch_size=64", "discount_factor=0.99"])
    assert config.departures() == {
        "batch_size": {"pinned": 32, "used": 64},
        "discount_factor": {"pinned": 0.997, "used": 0.99},
    }
    assert describe_departures(config) == [
        "batch_size: 64 (known-good 32)",
        "discount_factor: 0.99 (known-good 0.997)",
    ]
    assert describe_departures(Config()) == []


def test_round_trip_through_a_dict_and_unknown_keys_in_it():
    config = Config().with_assignments(["hidden_dim=64"])
    assert Config.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown config key 'old_key'"):
        Config.from_dict({**config.to_dict(), "old_key": 1})


def test_the_action_table_has_eleven_clipped_gas_brake_steer_vectors():
    assert NUMBER_OF_ACTIONS == Config().output_dim == 11
    names = [name for name, _ in ACTIONS]
    assert len(set(names)) == 11
    for _, (gas, brake, steer) in ACTIONS:
        assert gas in (0.0, 1.0) and brake in (0.0, 1.0) and -1.0 <= steer <= 1.0


def test_clip_action_clips_range_and_refuses_broken_actions():
    clipped = clip_action([2.0, -3.0, 0.5])
    assert clipped.dtype == np.float32 and clipped.tolist() == [1.0, -1.0, 0.5]
    with pytest.raises(ValueError, match="shape"):
        clip_action([1.0, 0.0])
    for broken in ([np.nan, 0.0, 0.0], [0.0, 0.0, np.inf]):
        with pytest.raises(ValueError, match="must be finite"):
            clip_action(broken)


def test_runtime_knobs_are_checked_and_round_trip_through_a_checkpoint():
    runtime = Runtime(learner="inline", threads=2, on_red_flag="rollback", eval_every=1000, eval_episodes=3)
    assert Runtime.from_dict({**runtime.to_dict(), "from_a_newer_version": 1}) == runtime
    assert Runtime.from_dict({"on_red_flag": "stop"}) == Runtime(on_red_flag="stop"), "older: defaults"
    bad_values = (
        {"learner": "beneath"}, {"on_red_flag": "ignore"}, {"eval_episodes": 0}, {"threads": 0},
        {"game_step_timeout_s": 0}, {"game_reset_timeout_s": float("nan")},
        {"broadcast_every_learn_steps": 0},
    )  # fmt: skip
    for bad in bad_values:
        with pytest.raises(ConfigError):
            Runtime(**bad)


def test_a_resumed_runtime_keeps_the_recorded_knobs_except_those_given_again():
    recorded = Runtime(learner="inline", on_red_flag="stop", eval_every=500)
    command_line = Runtime(on_red_flag="rollback", eval_every=500)  # --on-red-flag and --eval-every given
    runtime, notes = command_line.resumed(recorded, {"on_red_flag", "eval_every"})
    assert runtime == Runtime(learner="inline", on_red_flag="rollback", eval_every=500)
    assert notes == [
        "--on-red-flag rollback given: the run had stop (kept from its checkpoint when not given)"
    ]
    assert command_line.resumed(recorded, set()) == (recorded, [])
