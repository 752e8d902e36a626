"""The pinned known-good configuration of rainbow-tm (seed 004, commit fdf25b5, W&B run c643zifs).

Every knob of the agent, the replay memory, the training loop and the environments lives here, in one
readable place: `Config` for what a run learns (the defaults ARE the known-good run;
`tests/test_config_guard.py` fails if one drifts), `Runtime` for how it is driven (the learner's mode and
threads, the red-flag policy, evaluation cadence, the save and rollback limits).

Three invariants are structural, not merely values:
- the target network is updated by a hard copy every `target_network_update_frequency` learn steps:
  there is no `tau` field and no soft-update path anywhere;
- the learning rate is constant: there is no scheduler field and no scheduler path anywhere;
- epsilon is a pure function of the global environment step (`epsilon_at` below): nothing episode-based.

A run departs from the pin only through `Config.with_overrides(...)` (the CLI's `--set key=value` goes
through it), which validates each value and is listed as a "departure from the known-good config"
wherever the run is recorded.

This module imports nothing of ours (numpy only): every other module may import it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

# The 11 discrete actions, as tmrl [gas, brake, steer] vectors (steer -1 is full left).
# Shared by the agent (index -> vector) and both environments: this is the one place they are defined.
ACTIONS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("coast", (0.0, 0.0, 0.0)),
    ("gas", (1.0, 0.0, 0.0)),
    ("brake", (0.0, 1.0, 0.0)),
    ("gas_full_left", (1.0, 0.0, -1.0)),
    ("gas_full_right", (1.0, 0.0, 1.0)),
    ("full_left", (0.0, 0.0, -1.0)),
    ("full_right", (0.0, 0.0, 1.0)),
    ("slight_left", (0.0, 0.0, -0.3)),
    ("slight_right", (0.0, 0.0, 0.3)),
    ("gas_brake_left", (1.0, 1.0, -1.0)),
    ("gas_brake_right", (1.0, 1.0, 1.0)),
)
NUMBER_OF_ACTIONS = len(ACTIONS)


def clip_action(action: Any) -> np.ndarray:
    """[gas, brake, steer] as float32 (3,) clipped into [-1, 1], as both environments take it.

    Out-of-range values are clipped (the game's inputs saturate, and tmrl's gamepad code asserts the
    range); a wrong shape, NaN or inf means the caller is broken, and clipping would hide it.
    """
    array = np.asarray(action, dtype=np.float32)
    if array.shape != (3,):
        raise ValueError(f"an action is [gas, brake, steer], shape (3,); got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"an action must be finite, got {array.tolist()}")
    return np.clip(array, -1.0, 1.0)


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message is one line naming the key."""


@dataclass(frozen=True)
class Config:
    # GENERAL
    training_steps: int = 10_000_000
    # Hard copy of the online net into the target net every this many learn steps (seed 004: never soft).
    target_network_update_frequency: int = 1500

    # ALGORITHM FEATURES (each is read by the code: see rainbow.py and replay.py)
    use_dueling: bool = True
    use_prioritized_replay: bool = True
    use_doubleDQN: bool = True  # noqa: N815 - the seed's spelling, kept so configs compare by name

    # NETWORK ARCHITECTURE
    img_x: int = 64
    img_y: int = 64
    conv_input: int = 4  # stacked frames
    input_car_dim: int = 3  # speed, gear, rpm
    # The last actions as inputs beside the car floats (0: the pin, as the reference: no action history).
    # rtgym applies an action during the step after the one it was chosen in, so the newest action is what
    # the car does next; 1 feeds it, 2 the two newest, as [gas, brake, steer] vectors (oldest first).
    previous_actions: int = 0
    car_feature_hidden_dim: int = 256
    conv_hidden_image_variable: int = 4  # side of the last conv feature map (64 -> 32 -> 16 -> 8 -> 4)
    hidden_dim: int = 128
    noisy_std: float = 0.5
    conv_channels_1: int = 8
    conv_channels_2: int = 16
    # Fixed scales dividing the raw car floats (tmrl units) so that each lands roughly in [0, 1]:
    # speed in km/h (TrackMania tops out near 1000), gear 0..6, engine rpm up to ~11,000.
    speed_scale: float = 1000.0
    gear_scale: float = 6.0
    rpm_scale: float = 10_000.0

    # CHECKPOINT SETTINGS (frequency in episodes)
    checkpoint: bool = True
    checkpoint_dir: str = "checkpoints"
    checkpoint_frequency: int = 10
    keep_last_n_checkpoints: int = 3
    resume_from_checkpoint: bool = True

    # IQN
    n_tau_train: int = 8
    n_tau_action: int = 8
    cosine_dim: int = 64
    huber_kappa: float = 1.0

    # OPTIMISATION (AdamW, constant learning rate: there is no scheduler)
    learning_rate: float = 0.0001
    # AdamW's decoupled weight decay on every parameter. The reference built AdamW(params, lr) and so ran
    # with torch's default, 0.01: pinned here explicitly so that a torch default can never move it.
    weight_decay: float = 0.01
    gradient_clip_norm: float = 100.0
    batch_size: int = 32
    discount_factor: float = 0.997
    # Steps of reward in each learning target before bootstrapping (1: the pinned 1-step target). An n-step
    # target sums gamma^k r over up to n steps of the same episode, then bootstraps with gamma^m.
    n_step: int = 1

    # REPLAY MEMORY (training starts as soon as `batch_size` transitions are stored, as in the seed)
    max_buffer_size: int = 100_000
    alpha: float = 0.6
    beta: float = 0.4
    beta_increment: float = 0.001  # per learn step; reaches 1.0 after 600 learn steps (kept as pinned)
    priority_epsilon: float = 1e-6  # keeps every stored transition drawable
    # Learn steps in a row whose loss or gradients are NaN/inf (each is skipped) before the run stops.
    max_consecutive_nonfinite_steps: int = 100

    # EXPLORATION: linear in the global step, 1.0 -> 0.01 by step 2.5M, 0.01 until 25M, 0 after
    epsilon_start: float = 1.0
    epsilon_end: float = 0.01
    epsilon_decay_to: int = 2_500_000
    epsilon_cutoff: int = 25_000_000

    # ENVIRONMENT (TrackMania runs at 20 Hz; the embedded track keeps the same pace)
    time_step_duration: float = 0.05
    ep_max_length: int = 1000  # agent steps before an episode is truncated (not terminal)

    # LEARNING BESIDE ACTING (beside.py): the actor copies the learner's weights every this many learn
    # steps. Mid-episode it never waits for the learner unless it is `learner_max_lag` steps ahead (a
    # real-time game cannot pause); the learner catches up at each episode's end, while the car respawns.
    # A simulator that can wait (the embedded track) waits whenever the learner is `simulator_max_lag`
    # steps behind: unpaced it runs ~4x faster than the learner, and with the game's bound every episode
    # would be driven by the policy of its first step (measured: ~950 learn steps stale), not by one a few
    # learn steps old as inline or in the 20 Hz game. Either way the replay ratio stays one learn step per
    # environment step.
    actor_refresh_learn_steps: int = 4
    learner_max_lag: int = 1000
    simulator_max_lag: int = 4

    # DEMONSTRATIONS (demos.py, replay.DemoReplay; none in the pin): the recorded demos/<name>/ folders to
    # learn from beside the agent's own data (comma-separated), learn steps on them alone before the first
    # environment step, DQfD's priority bonus of a demonstration, its large margin and that loss's weight.
    demos: str = ""
    demo_pretrain_steps: int = 0
    demo_priority_bonus: float = 1.0
    demo_margin: float = 0.8
    demo_margin_weight: float = 1.0

    # RUN HEALTH (health.py): red flags for a game that trains on nonsense
    timeout_share_flag: float = 0.1  # share of an episode's time steps that timed out (stale observations)
    no_progress_streak: int = 20  # episodes in a row that get nowhere along the track

    # LOGGING
    wandb_project: str = "rainbow-tm"
    log_every_steps: int = 100

    # ------------------------------------------------------------------------------------------------
    @property
    def output_dim(self) -> int:
        return NUMBER_OF_ACTIONS

    @property
    def state_floats(self) -> int:
        """The floats of a state beside its frames: speed, gear, rpm, then 3 per previous action."""
        return self.input_car_dim + 3 * self.previous_actions

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = _FIELD_TYPES[field.name]
            _check_type(field.name, value, expected)
            if expected is float:  # an int given for a float field is stored as the float it means
                object.__setattr__(self, field.name, float(value))
        for key, (check, requirement) in _RANGES.items():
            if not check(getattr(self, key)):
                raise ConfigError(f"{key}={getattr(self, key)!r} is out of range: must be {requirement}")
        for message, holds in _relations(self):
            if not holds:
                raise ConfigError(message)

    def with_overrides(self, **overrides: Any) -> Config:
        """A copy with `overrides` applied; an unknown key, wrong type or bad range raises ConfigError."""
        for key in overrides:
            if key not in _FIELD_TYPES:
                raise ConfigError(unknown_key_message(key))
        return dataclasses.replace(self, **overrides)

    def with_assignments(self, assignments: list[str]) -> Config:
        """Apply CLI-style `key=value` strings, converting each value to the field's type."""
        overrides: dict[str, Any] = {}
        given: dict[str, str] = {}
        for assignment in assignments:
            key, sep, text = assignment.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"override {assignment!r} is not of the form key=value")
            if key not in _FIELD_TYPES:
                raise ConfigError(unknown_key_message(key))
            if key in given:
                raise ConfigError(
                    f"--set {key} is given twice ({given[key]}, then {text.strip()}): give it once"
                )
            given[key] = text.strip()
            overrides[key] = _parse_value(key, text.strip(), _FIELD_TYPES[key])
        return self.with_overrides(**overrides)

    def departures(self) -> dict[str, dict[str, Any]]:
        """The fields where this config differs from the pinned known-good one: {key: {pinned, used}}."""
        pinned = Config()
        return {
            field.name: {"pinned": getattr(pinned, field.name), "used": getattr(self, field.name)}
            for field in dataclasses.fields(self)
            if getattr(self, field.name) != getattr(pinned, field.name)
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Rebuild a config saved by `to_dict` (checkpoints); unknown keys raise ConfigError."""
        return cls().with_overrides(**values)


@dataclass(frozen=True)
class Runtime:
    """How a run is driven, beside what it learns (Config): the command line's run options and the limits of
    the run's lifecycle. None of them changes what the agent learns from a given step, so they are no
    departure from the known-good config; each run records them in its start record and in every
    checkpoint, and a resumed run keeps its checkpoint's unless one is given again on the command line
    (session.py announces each such change in one line)."""

    learner: str = "beside"  # --learner: "beside" (a process beside the actor) or "inline"
    threads: int | None = None  # --threads of the learner (None: session.learner_threads chooses)
    on_red_flag: str = "warn"  # --on-red-flag: "warn", "stop" or "rollback"
    eval_every: int = 0  # --eval-every: greedy evaluations every this many steps (0: none)
    eval_episodes: int = 5  # --eval-episodes per evaluation
    # Checkpoint writes in a row that may fail (disk full, file locked) before the run stops.
    max_failed_saves: int = 3
    # --on-red-flag rollback: then the run stops, as a failure that keeps coming back is real.
    max_rollbacks: int = 3
    # TrackMania's watchdogs: a step normally takes 0.05 s (~0.6 s when the episode ends), a reset waits for
    # the respawn countdown and may first connect to the game; a call that takes longer is a game that stopped
    # answering (GameNotRespondingError, with a save).
    game_step_timeout_s: float = 10.0
    game_reset_timeout_s: float = 60.0
    # The scale-out trainer (distributed.py) sends its weights (~1.5 MB) to the workers every this many learn
    # steps: a few broadcasts per second at most.
    broadcast_every_learn_steps: int = 100

    CHOICES = {"learner": ("beside", "inline"), "on_red_flag": ("warn", "stop", "rollback")}
    GIVEN_BY = {"learner": "--learner", "threads": "--threads", "on_red_flag": "--on-red-flag",
                "eval_every": "--eval-every", "eval_episodes": "--eval-episodes"}  # fmt: skip

    def __post_init__(self) -> None:
        for key, choices in self.CHOICES.items():
            if getattr(self, key) not in choices:
                raise ConfigError(f"{key}={getattr(self, key)!r} must be one of {', '.join(choices)}")
        minimums = {
            "threads": 1, "eval_every": 0, "eval_episodes": 1, "max_failed_saves": 1, "max_rollbacks": 0
        }  # fmt: skip
        minimums["broadcast_every_learn_steps"] = 1
        for key, least in minimums.items():
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < least):
                raise ConfigError(f"{key}={value!r} must be a whole number >= {least}")
        for key in ("game_step_timeout_s", "game_reset_timeout_s"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{key}={value!r} must be a number of seconds > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Runtime:
        """Rebuild runtime knobs saved by `to_dict`; a key this version does not know is ignored (a newer
        checkpoint), a missing one takes its default (an older one)."""
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    def resumed(self, recorded: Runtime, given: set[str]) -> tuple[Runtime, list[str]]:
        """The recorded knobs, with those `given` on the command line taken from this one; returns the
        runtime and one line per recorded knob the command line changes."""
        changes = {key: getattr(self, key) for key in given}
        notes = [
            f"{self.GIVEN_BY.get(key, key)} {value} given: the run had {getattr(recorded, key)} "
            "(kept from its checkpoint when not given)"
            for key, value in changes.items()
            if value != getattr(recorded, key)
        ]
        return dataclasses.replace(recorded, **changes), notes


def epsilon_at(step: int, config: Config) -> float:
    """Exploration rate at a global environment step: linear from epsilon_start at step 0 to epsilon_end
    at `epsilon_decay_to`, held until `epsilon_cutoff`, 0 after. It depends on the step and nothing else."""
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if step >= config.epsilon_cutoff:
        return 0.0
    if step >= config.epsilon_decay_to:
        return config.epsilon_end
    fraction = step / config.epsilon_decay_to
    return config.epsilon_start + fraction * (config.epsilon_end - config.epsilon_start)


# The three sacred invariants of seed 004, by the config keys that hold them. A run may depart from one
# only when its command line also carries the flag named here; it is then marked "unpinned" wherever it is
# recorded (terminal, JSONL, W&B config and tags, checkpoints, compare_runs.py).
SACRED_FLAGS: dict[str, str] = {
    "target_network_update_frequency": "--unpin-target-update",
    "learning_rate": "--unpin-learning-rate",
    "epsilon_start": "--unpin-epsilon",
    "epsilon_end": "--unpin-epsilon",
    "epsilon_decay_to": "--unpin-epsilon",
    "epsilon_cutoff": "--unpin-epsilon",
}
SACRED_WHY: dict[str, str] = {
    "--unpin-target-update": "the hard target copy every 1500 learn steps (seed 004: soft updates drove Q "
    "to -40,000)",
    "--unpin-learning-rate": "the constant learning rate 1e-4 (seed 004: a decayed rate could not pull "
    "diverging Q back)",
    "--unpin-epsilon": "the step-based epsilon schedule 1.0 -> 0.01 over 2.5M steps (seed 004: faster "
    "decay left ~150k steps of exploration)",
}


def unknown_key_message(key: str) -> str:
    """One line for a key Config does not have, naming the closest known one when there is one."""
    import difflib

    close = difflib.get_close_matches(key, list(_FIELD_TYPES), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown config key {key!r} ({hint}`python env_tm.py --show-config` lists every key)"


def check_sacred_assignments(assignments: list[str], unpin_flags: set[str]) -> None:
    """Refuse (ConfigError, one line) a `key=value` assignment to a sacred key whose unpin flag is absent."""
    for assignment in assignments:
        key = assignment.partition("=")[0].strip()
        flag = SACRED_FLAGS.get(key)
        if flag is not None and flag not in unpin_flags:
            raise ConfigError(
                f"--set {assignment.strip()} departs from a sacred invariant, {SACRED_WHY[flag]}: add "
                f"{flag} to run it anyway (the run is then marked unpinned)"
            )


def unpinned_keys(config: Config) -> list[str]:
    """The sacred keys this config departs from (empty for a pinned run)."""
    return [key for key in config.departures() if key in SACRED_FLAGS]


def describe_departures(config: Config) -> list[str]:
    """One human-readable line per departure from the known-good config."""
    return [f"{key}: {d['used']!r} (known-good {d['pinned']!r})" for key, d in config.departures().items()]


# --- validation ------------------------------------------------------------------------------------
_FIELD_TYPES: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}
_FIELD_TYPES = {
    name: {"int": int, "float": float, "bool": bool, "str": str}[str(t)] for name, t in _FIELD_TYPES.items()
}


def _check_type(key: str, value: Any, expected: type) -> None:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {expected.__name__}")
    if expected is float and not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be a finite number")


def _parse_value(key: str, text: str, expected: type) -> Any:
    try:
        if expected is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if expected is int:
            return int(text.replace("_", ""))
        if expected is float:
            return float(text.replace("_", ""))
        return text
    except ValueError:
        raise ConfigError(f"{key}={text!r} has the wrong type: expected {expected.__name__}") from None


# Names Windows reserves for devices, whatever the extension (con, con.txt, nul, com1, ...).
_WINDOWS_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³])(\..*)?$", re.IGNORECASE)
_FORBIDDEN_NAME_CHARACTERS = set('<>:"/\\|?*')


def folder_name_problem(name: str) -> str | None:
    """Why `name` cannot be one plain folder name, valid on Windows too (a run or a demonstration set)."""
    if not name.strip():
        return "is empty"
    if name in (".", ".."):
        return "points outside its folder"
    bad = sorted({c for c in name if c in _FORBIDDEN_NAME_CHARACTERS or ord(c) < 32})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        forbidden = "".join(sorted(_FORBIDDEN_NAME_CHARACTERS))
        return f"contains {shown}: it must be one folder name, without path separators or {forbidden}"
    if name != name.rstrip(" ."):
        return "ends with a dot or a space, which Windows drops from folder names"
    if _WINDOWS_RESERVED.match(name):
        return "is a device name Windows reserves (con, prn, aux, nul, com1-9, lpt1-9)"
    if len(name) > 120:
        return f"is {len(name)} characters long (at most 120, so that paths stay short)"
    return None


def demo_names(demos: str) -> list[str]:
    """The demonstration sets of the `demos` config value ("" -> none)."""
    return [name.strip() for name in demos.split(",")] if demos.strip() else []


def _positive(value: float) -> bool:
    return value > 0


def _unit(value: float) -> bool:
    return 0.0 <= value <= 1.0


_RANGES: dict[str, tuple[Any, str]] = {
    "training_steps": (_positive, "> 0"),
    "target_network_update_frequency": (_positive, ">= 1"),
    "img_x": (lambda v: v == 64, "64 (the network's conv stack is built for 64x64 frames)"),
    "img_y": (lambda v: v == 64, "64 (the network's conv stack is built for 64x64 frames)"),
    "conv_input": (_positive, ">= 1"),
    "input_car_dim": (lambda v: v == 3, "3 (speed, gear, rpm)"),
    "previous_actions": (lambda v: v in (0, 1, 2), "0, 1 or 2 (tmrl's observation holds the last two)"),
    "car_feature_hidden_dim": (_positive, ">= 1"),
    "conv_hidden_image_variable": (lambda v: v == 4, "4 (64 halved by four stride-2 convs)"),
    "hidden_dim": (_positive, ">= 1"),
    "noisy_std": (lambda v: v >= 0, ">= 0"),
    "conv_channels_1": (_positive, ">= 1"),
    "conv_channels_2": (_positive, ">= 1"),
    "speed_scale": (_positive, "> 0"),
    "gear_scale": (_positive, "> 0"),
    "rpm_scale": (_positive, "> 0"),
    "checkpoint_frequency": (_positive, ">= 1 episode"),
    "keep_last_n_checkpoints": (_positive, ">= 1"),
    "n_tau_train": (_positive, ">= 1"),
    "n_tau_action": (_positive, ">= 1"),
    "cosine_dim": (_positive, ">= 1"),
    "huber_kappa": (_positive, "> 0"),
    "learning_rate": (lambda v: 0 < v < 1, "in (0, 1)"),
    "weight_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "gradient_clip_norm": (_positive, "> 0"),
    "batch_size": (_positive, ">= 1"),
    "discount_factor": (lambda v: 0 <= v < 1, "in [0, 1) (gamma >= 1 makes returns unbounded)"),
    "n_step": (lambda v: 1 <= v <= 100, "in [1, 100] steps"),
    "max_buffer_size": (_positive, ">= 1"),
    "alpha": (_unit, "in [0, 1]"),
    "beta": (_unit, "in [0, 1]"),
    "beta_increment": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "priority_epsilon": (_positive, "> 0"),
    "max_consecutive_nonfinite_steps": (_positive, ">= 1"),
    "epsilon_start": (_unit, "in [0, 1]"),
    "epsilon_end": (_unit, "in [0, 1]"),
    "epsilon_decay_to": (_positive, ">= 1 step"),
    "epsilon_cutoff": (_positive, ">= 1 step"),
    "time_step_duration": (_positive, "> 0 seconds"),
    "ep_max_length": (_positive, ">= 1 step"),
    "log_every_steps": (_positive, ">= 1"),
    "actor_refresh_learn_steps": (_positive, ">= 1 learn step"),
    "learner_max_lag": (_positive, ">= 1 step"),
    "simulator_max_lag": (lambda v: v >= 0, ">= 0 steps (0: lockstep, the actor waits for every learn step)"),
    "timeout_share_flag": (_unit, "in [0, 1]"),
    "demos": (
        lambda v: all(folder_name_problem(n) is None for n in demo_names(v)),
        "comma-separated folder names",
    ),
    "demo_pretrain_steps": (lambda v: v >= 0, ">= 0 learn steps"),
    "demo_priority_bonus": (lambda v: v >= 0, ">= 0"),
    "demo_margin": (lambda v: v >= 0, ">= 0"),
    "demo_margin_weight": (lambda v: v >= 0, ">= 0"),
    "no_progress_streak": (_positive, ">= 1"),
    "wandb_project": (lambda v: bool(v.strip()), "a non-empty name"),
    "checkpoint_dir": (lambda v: bool(v.strip()), "a non-empty path"),
}


def _relations(c: Config) -> list[tuple[str, bool]]:
    return [
        (
            f"batch_size={c.batch_size} must not exceed max_buffer_size={c.max_buffer_size}",
            c.batch_size <= c.max_buffer_size,
        ),
        (
            f"epsilon_end={c.epsilon_end} must not exceed epsilon_start={c.epsilon_start}",
            c.epsilon_end <= c.epsilon_start,
        ),
        (
            f"epsilon_decay_to={c.epsilon_decay_to} must not exceed epsilon_cutoff={c.epsilon_cutoff}",
            c.epsilon_decay_to <= c.epsilon_cutoff,
        ),
    ]
