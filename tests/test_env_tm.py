"""env_tm.py end to end on the embedded track: train, kill, resume; plus its bad-input paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST_ASSIGNMENTS, ROOT

import cli
import env_tm
import environment
import rainbow
from checkpoints import load_checkpoint
from rainbow import ACTION_VECTORS
from run_log import METRICS_FILE as METRICS
from run_log import read_jsonl
from tm_config import Config, epsilon_at

FAST = FAST_ASSIGNMENTS


def command(root: Path, steps: int, *extra: str) -> list[str]:
    args = [sys.executable, str(ROOT / "env_tm.py"), "--env", "embedded", "--steps", str(steps)]
    args += ["--checkpoint-root", str(root), "--run-name", "e2e", "--device", "cpu", *extra]
    for assignment in FAST:
        args += ["--set", assignment]
    return args


def child_env() -> dict[str, str]:
    # No credentials at all: W&B must choose offline by itself (and never reach the network).
    env = dict(os.environ, WANDB_SILENT="true", PYTHONUNBUFFERED="1", NETRC=os.devnull)
    env.pop("WANDB_API_KEY", None)
    env.pop("WANDB_MODE", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def episodes_logged(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(1 for record in read_jsonl(path) if record["kind"] == "episode")


def test_train_kill_resume_keeps_step_continuity_rotation_and_metrics(tmp_path):
    run_dir = tmp_path / "e2e"
    metrics = run_dir / "metrics.jsonl"
    first = subprocess.Popen(
        command(tmp_path, 400, "--fresh", "--no-wandb"),
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 240
    while episodes_logged(metrics) < 5 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, f"training ended before it could be killed:\n{first.stdout.read()}"
    first.kill()  # SIGKILL on POSIX, TerminateProcess on Windows: no chance to clean up
    first_output = first.communicate()[0]
    assert "departures from the known-good config: " in first_output and "ep_max_length: 40" in first_output

    periodic = sorted(run_dir.glob("ckpt_ep*_step*.pt"))
    assert 1 <= len(periodic) <= 3, f"keep the last 3 checkpoints, found {[p.name for p in periodic]}"
    killed_at = load_checkpoint(run_dir / "latest.pt")
    assert killed_at["step"] % 40 == 0 and killed_at["episode"] == killed_at["step"] // 40
    assert killed_at["step"] >= 120

    second = subprocess.run(
        command(tmp_path, 400, "--resume", "--no-wandb"),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    resumed = f"from latest.pt: step {killed_at['step']:,}, {killed_at['episode']:,} episodes done"
    assert resumed in second.stdout

    final = load_checkpoint(run_dir / "latest.pt")
    assert final["step"] == 400 and final["episode"] == 10
    assert final["agent"]["learn_steps"] == 400 - 4 + 1, "one learn step per env step once a batch is stored"
    assert len(sorted(run_dir.glob("ckpt_ep*_step*.pt"))) == 3
    assert [p.name for p in sorted(run_dir.glob("ckpt_ep*_step*.pt"))] == [
        "ckpt_ep0000008_step0000000320.pt",
        "ckpt_ep0000009_step0000000360.pt",
        "ckpt_ep0000010_step0000000400.pt",
    ]
    assert (run_dir / "best.pt").exists()
    assert not list(run_dir.glob("*.tmp"))

    records = read_jsonl(metrics)
    episodes = [r for r in records if r["kind"] == "episode"]
    assert [r["episode"] for r in episodes] == list(range(1, 11)), "each episode logged exactly once"
    assert [r["step"] for r in episodes] == [40 * i for i in range(1, 11)]
    steps = [r for r in records if r["kind"] == "step"]
    assert steps and all(np.isfinite(r["loss"]) and r["learning_rate"] == 0.0001 for r in steps)
    assert [r["step"] for r in steps] == sorted({r["step"] for r in steps}), "no step logged twice"
    epsilons = [r["epsilon"] for r in episodes]
    assert epsilons == sorted(epsilons, reverse=True) and epsilons[0] < 1.0
    starts = [r for r in records if r["kind"] == "run" and r["event"] == "start"]
    assert [r["step"] for r in starts] == [0, killed_at["step"]]


def test_offline_wandb_run_is_resumed_with_the_same_id(tmp_path):
    first = subprocess.run(
        command(tmp_path, 40, "--fresh"), env=child_env(), capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert "W&B offline (no WANDB_API_KEY or `wandb login`)" in first.stdout and "wandb sync" in first.stdout
    run_id = load_checkpoint(tmp_path / "e2e" / "latest.pt")["wandb_run_id"]
    assert run_id
    offline_runs = list((tmp_path / "e2e" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline_runs, "W&B wrote its offline files in the run folder"

    second = subprocess.run(
        command(tmp_path, 80, "--resume"), env=child_env(), capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert load_checkpoint(tmp_path / "e2e" / "latest.pt")["wandb_run_id"] == run_id
    # An offline run keeps config and history in its .wandb record log (uploaded by `wandb sync`).
    records = [
        p.read_bytes() for p in (tmp_path / "e2e" / "wandb").glob(f"offline-run-*-{run_id}/run-*.wandb")
    ]
    assert len(records) == 2 and all(
        b"departures_from_known_good" in r and b"episode/reward" in r for r in records
    )
    # Grouped by departure: the group names them all, a tag each; the environment is the job type.
    group = ("+".join(sorted(FAST))[:100] + f"+{len(FAST)} departures").encode()  # W&B caps a group at 128
    assert all(group in r and b"embedded" in r and b"ep_max_length=40" in r for r in records)
    # Each sitting is an offline folder: uploaded in order, the later ones appended, they make one run.
    sittings = sorted((tmp_path / "e2e" / "wandb").glob(f"offline-run-*-{run_id}"))
    printed = second.stdout.split("to upload this run to W&B (after `wandb login`), run in order:\n")[1]
    assert printed.splitlines()[:2] == [
        f'  wandb sync "{sittings[0]}"',
        f'  wandb sync --append "{sittings[1]}"',
    ]


# --- bad input: one line each --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("foo=1", "unknown config key 'foo'"),
        ("batch_size=many", "batch_size='many' has the wrong type: expected int"),
        ("discount_factor=1.0", "discount_factor=1.0 is out of range"),
        ("batch_size=1000", "batch_size=1000 must not exceed max_buffer_size=512"),
    ],
)
def test_bad_overrides_fail_with_one_line(tmp_path, capsys, assignment, message):
    code = env_tm.main(
        ["--env", "embedded", "--steps", "10", "--checkpoint-root", str(tmp_path), "--no-wandb"]
        + sum((["--set", a] for a in ["max_buffer_size=512", assignment]), [])
    )
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_ERROR
    assert err.startswith("error: ") and message in err and "\n" not in err


def observation(images: np.ndarray) -> tuple:
    one = np.array([1.0], np.float32)
    zeros = np.zeros(3, np.float32)
    return (one * 120, one * 3, one * 5000, images, zeros, zeros)


def test_split_observation_takes_speed_gear_rpm_and_frames():
    frames, car = environment.split_observation(observation(np.full((4, 64, 64), 7, np.uint8)), Config())
    assert frames.shape == (4, 64, 64) and frames.dtype == np.uint8 and frames[0, 0, 0] == 7
    assert car.tolist() == [120.0, 3.0, 5000.0] and car.dtype == np.float32


@pytest.mark.parametrize(
    ("obs", "message"),
    [
        (observation(np.zeros((1, 64, 64), np.uint8)), "images have shape (1, 64, 64), expected (4, 64, 64)"),
        (observation(np.zeros((4, 96, 96, 3), np.uint8)), "expected (4, 64, 64)"),
        (observation(np.zeros((4, 64, 64), np.uint8))[:4], "6-part TM20FULL tuple, got a tuple of length 4"),
        (np.zeros(10), "6-part TM20FULL tuple"),
    ],
)
def test_wrong_observation_shape_is_named_in_one_line(obs, message):
    with pytest.raises(environment.ObservationError, match=None) as error:
        environment.split_observation(obs, Config())
    assert message in str(error.value) and "\n" not in str(error.value)


def test_non_finite_car_floats_are_rejected():
    obs = list(observation(np.zeros((4, 64, 64), np.uint8)))
    obs[0] = np.array([np.nan], np.float32)
    with pytest.raises(environment.ObservationError, match="not finite"):
        environment.split_observation(tuple(obs), Config())


def test_metrics_records_are_valid_json_lines(tmp_path):
    code = env_tm.main(
        [
            "--env",
            "embedded",
            "--steps",
            "50",
            "--checkpoint-root",
            str(tmp_path),
            "--run-name",
            "j",
            "--no-wandb",
        ]
        + sum((["--set", a] for a in FAST), [])
    )
    assert code == cli.EXIT_OK
    lines = (tmp_path / "j" / "metrics.jsonl").read_text().splitlines()
    kinds = [json.loads(line)["kind"] for line in lines]
    assert kinds[0] == "run" and kinds[-1] == "run" and "episode" in kinds and "step" in kinds


def test_the_loop_counts_a_slow_learn_step_as_the_games_wait(tmp_path, capsys, monkeypatch):
    """A learn step slower than the time step is an overrun of the next step, not of the next episode's."""
    original, slow_after_step = rainbow.RainbowAgent.train, {}
    batch = Config().with_assignments(FAST).batch_size

    def train(self):
        step = self.learn_steps + batch  # one learn step per env step once a batch is stored
        if step in (batch + 2, 40, 55):  # 40 ends the first episode (ep_max_length 40): the game resets
            slow_after_step[step] = True
            time.sleep(0.25)
        return original(self)

    monkeypatch.setattr(rainbow.RainbowAgent, "train", train)
    args = ["--env", "embedded", "--steps", "80", "--checkpoint-root", str(tmp_path), "--run-name", "t"]
    args += ["--no-wandb", "--learner", "inline", "--set", "time_step_duration=0.2"]
    args += sum((["--set", a] for a in FAST), [])
    assert env_tm.main(args) == cli.EXIT_OK
    episodes = [r for r in read_jsonl(tmp_path / "t" / METRICS) if r["kind"] == "episode"]
    ends = {r["step"] for r in episodes}
    assert sorted(slow_after_step) == [batch + 2, 40, 55] and 40 in ends and 55 not in ends
    overruns = [r["time_step_overruns"] for r in episodes]
    expected = sum(step not in ends and step < 80 for step in slow_after_step)
    assert sum(overruns) == expected == 2  # the wait after step 40 is the reset's, not a time step's
    assert all(r["agent_ms_max"] >= r["agent_ms_p99"] >= r["agent_ms_median"] > 0 for r in episodes)
    assert episodes[0]["agent_ms_max"] >= 250 and episodes[1]["agent_ms_max"] >= 250
    assert "2 over the 200 ms time step" in capsys.readouterr().out


# --- run health: red flags, --on-red-flag, --diagnose ----------------------------------------------------
def craft_metrics(monkeypatch, rewrite):
    """Wrap RainbowAgent.train so that `rewrite(metrics, learn_step)` can fake a diverging run."""
    original = rainbow.RainbowAgent.train

    def train(self):
        metrics = original(self)
        rewrite(metrics, self.learn_steps)
        return metrics

    monkeypatch.setattr(rainbow.RainbowAgent, "train", train)


def health_args(tmp_path: Path, steps: int, *extra: str) -> list[str]:
    args = ["--env", "embedded", "--steps", str(steps), "--checkpoint-root", str(tmp_path), "--run-name", "h"]
    learner = [] if "--learner" in extra else ["--learner", "inline"]  # the tests patch this process
    args += ["--no-wandb", "--fresh", *learner, *extra]
    return args + sum((["--set", a] for a in FAST), [])


def collapse_q_after(step: int):
    # Far below any floor the embedded track's negative rewards allow (-10 + min reward / (1 - gamma)).
    def rewrite(metrics, learn_step):
        if learn_step >= step:
            metrics["q_mean"] = -1e6 - (learn_step - step)

    return rewrite


def test_red_flag_is_reported_with_its_evidence_and_training_goes_on_by_default(
    tmp_path, capsys, monkeypatch
):
    craft_metrics(monkeypatch, collapse_q_after(100))
    assert env_tm.main(health_args(tmp_path, 160)) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert out.count("RED FLAG q_negative") == 1, "a flag is raised once, not every step"
    flags = [r for r in read_jsonl(tmp_path / "h" / "metrics.jsonl") if r.get("level") == "red_flag"]
    assert [(f["name"], f["value"]) for f in flags if f["name"] == "q_negative"] == [("q_negative", -1e6)]
    assert flags[0]["step"] == 100 + 3, "the flag carries the env step of the learn step that raised it"


def test_on_red_flag_stop_ends_the_run_and_keeps_the_good_checkpoint(tmp_path, capsys, monkeypatch):
    craft_metrics(monkeypatch, collapse_q_after(150))
    code = env_tm.main(health_args(tmp_path, 400, "--on-red-flag", "stop"))
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_RED_FLAG and "\n" not in err
    assert "stopped on red flag q_negative at step 153 (--on-red-flag stop)" in err
    assert load_checkpoint(tmp_path / "h" / "latest.pt")["step"] == 120, "the checkpoint before the flag"


def test_on_red_flag_rollback_restores_the_last_checkpoint_and_continues(tmp_path, capsys, monkeypatch):
    poisoned = {"left": 1}

    def rewrite(metrics, learn_step):
        if learn_step == 150 and poisoned["left"]:
            poisoned["left"] -= 1
            metrics["loss"] = float("nan")
            metrics["grad_norm"] = 1e9  # an exploding gradient: fatal

    craft_metrics(monkeypatch, rewrite)
    assert env_tm.main(health_args(tmp_path, 240, "--on-red-flag", "rollback")) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "RED FLAG grad_norm_exploding" in out
    assert (
        "rolled back to ckpt_ep0000003_step0000000120.pt (step 120, episode 3); rollback 1 of at most 3"
        in out
    )
    records = read_jsonl(tmp_path / "h" / "metrics.jsonl")
    rollbacks = [r for r in records if r.get("level") == "rollback"]
    assert [(r["step"], r["from_step"]) for r in rollbacks] == [(120, 153)]
    episodes = [r["episode"] for r in records if r["kind"] == "episode"]
    assert episodes == list(range(1, 7)), "episodes after the checkpoint were redone, not double counted"
    assert load_checkpoint(tmp_path / "h" / "latest.pt")["step"] == 240


def test_a_rollback_never_returns_to_a_checkpoint_written_after_the_flagged_step(
    tmp_path, capsys, monkeypatch
):
    """Beside the actor, a learn step's flag can arrive after a checkpoint of later steps was written. Faked
    here: the flag raised at learn step 150 reports env step 119, before the checkpoint of step 120. The
    rollback must go to the checkpoint of step 80, the newest one from before the failure."""
    import learner

    poisoned, original = {"left": 1}, learner.LearningEngine.learn

    def learn(self):
        metrics = original(self)
        if self.agent.learn_steps == 150 and poisoned["left"]:
            poisoned["left"] -= 1
            metrics["grad_norm"] = 1e9  # an exploding gradient: fatal
            metrics["env_step"] = 119  # reported late: as if learnt before the checkpoint of step 120
        return metrics

    monkeypatch.setattr(learner.LearningEngine, "learn", learn)
    assert env_tm.main(health_args(tmp_path, 200, "--on-red-flag", "rollback")) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "rolled back to ckpt_ep0000002_step0000000080.pt (step 80, episode 2)" in out, out


def test_ctrl_c_during_pretraining_stops_it_saves_and_the_resumed_run_finishes_it(
    tmp_path, capsys, monkeypatch
):
    root = tmp_path / "demos"
    record = ["--env", "embedded", "--record-demos", "auto", "--driver", "scripted", "--demo-episodes", "1"]
    assert env_tm.main([*record, "--demo-root", str(root), "--set", "ep_max_length=30"]) == cli.EXIT_OK
    original = rainbow.RainbowAgent.train

    def train(self):  # Ctrl+C arrives during the 5th pretraining step
        if self.learn_steps == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(rainbow.RainbowAgent, "train", train)
    args = ["--env", "embedded", "--steps", "40", "--checkpoint-root", str(tmp_path), "--run-name", "p"]
    args += ["--no-wandb", "--learner", "inline", "--demos", "auto", "--pretrain-steps", "30"]
    args += ["--demo-root", str(root), *sum((["--set", a] for a in FAST), [])]
    assert env_tm.main(args) == cli.EXIT_INTERRUPTED
    out = capsys.readouterr().out
    assert "pretraining stopped at 5 of 30 learn steps (on request)" in out, out
    assert "stopped at step 0 (on request): saved" in out and "evaluation" not in out
    assert load_checkpoint(tmp_path / "p" / "latest.pt")["agent"]["learn_steps"] == 5
    monkeypatch.setattr(rainbow.RainbowAgent, "train", original)
    assert env_tm.main(args) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "pretraining done" in out
    assert load_checkpoint(tmp_path / "p" / "latest.pt")["agent"]["learn_steps"] == 30 + 40 - 4 + 1


def test_diagnose_says_no_go_on_a_diverging_run(tmp_path, capsys, monkeypatch):
    def rewrite(metrics, learn_step):
        if learn_step > 400:
            metrics["q_mean"] = -1e5 * (learn_step - 400)
            metrics["q_min"] = metrics["q_mean"] - 1
            metrics["loss"] = metrics["loss"] + (learn_step - 400) / 10.0

    craft_metrics(monkeypatch, rewrite)
    code = env_tm.main(health_args(tmp_path, 50, "--diagnose", "1004"))  # --diagnose N sets the steps
    out = capsys.readouterr().out
    assert code == cli.EXIT_NO_GO
    assert "NO-GO" in out
    failed = {line.split()[1] for line in out.splitlines() if line.startswith("FAIL")}
    assert {"q_not_negative", "loss_not_exploding"} <= failed, out


def test_diagnose_refuses_a_run_too_short_to_judge(tmp_path, capsys):
    code = env_tm.main(health_args(tmp_path, 50, "--diagnose", "200"))
    err = capsys.readouterr().err
    assert code == cli.EXIT_ERROR and "--diagnose 200 is too short" in err


# --- resume semantics ------------------------------------------------------------------------------
def run_quietly(tmp_path: Path, steps: int, *extra: str, sets: list[str] = FAST) -> int:
    args = ["--env", "embedded", "--steps", str(steps), "--checkpoint-root", str(tmp_path), "--run-name", "q"]
    learner = [] if "--learner" in extra else ["--learner", "inline"]
    return env_tm.main(args + ["--no-wandb", *learner, *extra] + sum((["--set", a] for a in sets), []))


def test_a_simulator_waits_for_the_learner_within_its_small_bound(tmp_path):
    """The embedded track can wait: beside, the actor never runs more than simulator_max_lag learn steps
    ahead (with the game's bound it drove whole episodes with the policy of their first step). The pinned
    network learns several times slower than the track runs; episodes of 150 steps."""
    args = ["--env", "embedded", "--steps", "330", "--checkpoint-root", str(tmp_path), "--run-name", "q"]
    args += ["--no-wandb", "--learner", "beside", "--threads", "1"]
    args += ["--set", "max_buffer_size=1024", "--set", "ep_max_length=150", "--set", "log_every_steps=10"]
    assert env_tm.main(args) == cli.EXIT_OK
    episodes = [r for r in read_jsonl(tmp_path / "q" / METRICS) if r["kind"] == "episode"]
    assert len(episodes) == 2 and all(r["learner_lag_max"] <= 4 for r in episodes), (
        "the actor ran ahead of the learner: " + str([r["learner_lag_max"] for r in episodes])
    )
    assert all(r["learner_wait_ms"] > 0 for r in episodes), "the actor must have waited for the learner"
    # That wait is the simulator's choice, reported on its own: the agent's time per step is acting alone.
    assert all(r["agent_ms_median"] < 10 for r in episodes), [r["agent_ms_median"] for r in episodes]


def test_fresh_moves_an_old_run_aside_instead_of_mixing_into_it(tmp_path, capsys):
    assert run_quietly(tmp_path, 80, "--fresh") == cli.EXIT_OK
    assert run_quietly(tmp_path, 40, "--fresh") == cli.EXIT_OK
    out = capsys.readouterr().out
    assert f"--fresh: the previous contents of {tmp_path / 'q'} were moved to" in out
    old = [p for p in tmp_path.iterdir() if p.name.startswith("q.replaced-")]
    assert len(old) == 1 and (old[0] / "ckpt_ep0000002_step0000000080.pt").exists()
    assert [p.name for p in sorted((tmp_path / "q").glob("ckpt_*.pt"))] == [
        "ckpt_ep0000001_step0000000040.pt"
    ]
    episodes = [r["episode"] for r in read_jsonl(tmp_path / "q" / METRICS) if r["kind"] == "episode"]
    assert episodes == [1]


def test_resume_keeps_the_checkpoints_config_and_applies_only_explicit_changes(tmp_path, capsys):
    first = [*FAST, "target_network_update_frequency=500"]
    assert run_quietly(tmp_path, 40, "--fresh", "--unpin-target-update", sets=first) == cli.EXIT_OK
    # Resumed without the first run's --set, with a new learning rate (sacred: its flag is needed again).
    assert run_quietly(tmp_path, 80, "--unpin-learning-rate", sets=["learning_rate=0.0003"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "resumed q from latest.pt: step 40, 1 episodes done" in out
    assert "target_network_update_frequency: 500 (known-good 1500)" in out.split("resumed q")[1]
    state = load_checkpoint(tmp_path / "q" / "latest.pt")
    assert state["config"]["target_network_update_frequency"] == 500
    assert state["config"]["learning_rate"] == 0.0003
    assert {g["lr"] for g in state["agent"]["optimizer"]["param_groups"]} == {0.0003}, "the optimizer follows"


def test_explicit_resume_without_a_checkpoint_is_an_error(tmp_path, capsys):
    assert run_quietly(tmp_path, 10, "--resume") == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert err == f"error: --resume: no checkpoint in {tmp_path / 'q'} (drop --resume to start fresh)"


# --- evaluation: the greedy policy on held-out tracks ----------------------------------------------------
class ScriptedTrack:
    """The TM20FULL interface with a fixed reward per step and a fixed episode length; it records the seeds
    it was reset with and whether the agent's noise was on at each step."""

    def __init__(self, agent, length: int, reward: float) -> None:
        self.agent, self.length, self.reward = agent, length, reward
        self.seeds: list[int | None] = []
        self.noise_on_at_step: list[bool] = []
        self.actions: list[np.ndarray] = []

    def reset(self, *, seed=None, options=None):
        self.seeds.append(seed)
        self.steps = 0
        return observation(np.full((4, 64, 64), 50, np.uint8)), {}

    def step(self, action):
        self.noise_on_at_step.append(any(layer.noise_enabled for layer in self.agent.online.noisy_layers()))
        self.actions.append(np.asarray(action))
        self.steps += 1
        done = self.steps >= self.length
        return observation(np.full((4, 64, 64), 50, np.uint8)), self.reward, False, done, {}


def test_evaluation_drives_greedily_on_held_out_tracks_and_leaves_training_untouched():
    from conftest import small_config

    from rainbow import RainbowAgent

    config = small_config()
    agent = RainbowAgent(config, replay=None, seed=3)
    rng_before = agent.rng.bit_generator.state
    track = ScriptedTrack(agent, length=7, reward=0.5)
    result = environment.evaluate(agent, track, config, episodes=3)
    assert result.returns == [3.5, 3.5, 3.5] and result.lengths == [7, 7, 7]
    held_out = [environment.EVAL_SEED_BASE + k for k in range(3)]
    assert track.seeds == environment.evaluation_seeds(3) == held_out
    # Held out: no training episode of --seed 0..3998 draws these tracks.
    assert environment.EVAL_SEED_BASE > 3998 * 1_000_003 + 1_000_000
    assert not any(track.noise_on_at_step), "evaluation must use the mean weights (noise off)"
    assert all(layer.noise_enabled for layer in agent.online.noisy_layers()), "noise back on for training"
    assert agent.rng.bit_generator.state == rng_before, "evaluation drew from the epsilon stream"
    assert agent.learn_steps == 0
    record = result.record()
    assert record["return_mean"] == 3.5 and record["return_std"] == 0.0 and record["episodes"] == 3


def test_eval_every_logs_at_start_at_episode_ends_past_each_boundary_and_at_the_end(tmp_path):
    args = health_args(tmp_path, 70, "--eval-every", "30", "--eval-episodes", "2")
    assert env_tm.main(args) == cli.EXIT_OK
    metrics = read_jsonl(tmp_path / "h" / METRICS)
    evals = [r for r in metrics if r["kind"] == "eval"]
    # ep_max_length 40: training episodes end at steps 40 and 80; the run ends at 70.
    assert [r["step"] for r in evals] == [0, 40, 70]
    assert all(r["episodes"] == 2 and r["length_mean"] <= 40 for r in evals)
    assert all(r["return_min"] <= r["return_mean"] <= r["return_max"] for r in evals)
    assert [r["step"] for r in metrics if r["kind"] == "episode"] == [40], "eval episodes are not training"
    # Resumed: the evaluation at step 70 is remembered, the next is due past step 90 (at the end, 100).
    resumed = [a for a in args if a != "--fresh"]
    resumed[resumed.index("70")] = "100"
    assert env_tm.main(resumed) == cli.EXIT_OK
    evals = [r for r in read_jsonl(tmp_path / "h" / METRICS) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 40, 70, 100]


# --- the loop's bookkeeping, step by step ----------------------------------------------------------------
class ScriptedTM20:
    """The TM20FULL interface as rtgym gives it (act1/act2 = the last two actions sent, zeros at reset),
    with a scripted course: episodes of fixed lengths ending by termination or truncation, rewards that
    name their step, frames and car floats that name the observation they belong to."""

    def __init__(self, episodes: list[tuple[int, str]], real_time: bool = False) -> None:
        self.episodes = episodes  # (length, "terminated" | "truncated"), repeated in turn
        self.real_time = real_time  # True: the loop treats it as the game (it never waits mid-episode)
        self.seeds: list[int | None] = []  # the seed of every reset, in order
        self.returned: list[tuple] = []  # every observation handed out, in order
        self.observations = 0  # observations handed out so far: each gets the next id
        self.episode = -1
        self.actions: list[int] = []  # every action index received, in order
        self.rewards: list[float] = []
        self.ends: list[tuple[bool, bool]] = []
        self.obs_ids: list[int] = []  # the newest frame's id of every observation, in order

    @staticmethod
    def frame(obs_id: int) -> np.ndarray:
        frame = np.zeros((64, 64), np.uint8)
        frame[0, 0], frame[0, 1] = obs_id % 256, obs_id // 256
        return frame

    @staticmethod
    def frame_id(frame: np.ndarray) -> int:
        return int(frame[0, 0]) + 256 * int(frame[0, 1])

    def _observation(self) -> tuple:
        obs_id = self.observations
        self.observations += 1
        self.obs_ids.append(obs_id)
        if self.steps == 0:
            self.stack = [self.frame(obs_id)] * 4
        else:
            self.stack = self.stack[1:] + [self.frame(obs_id)]
        car = [np.array([v], np.float32) for v in (float(obs_id), 1.0 + obs_id % 5, 1000.0 + obs_id)]
        obs = (*car, np.stack(self.stack), self.act_buf[0].copy(), self.act_buf[1].copy())
        self.returned.append(tuple(np.array(part, copy=True) for part in obs))
        return obs

    def reset(self, *, seed=None, options=None):
        self.seeds.append(seed)
        self.episode += 1
        self.length, self.end = self.episodes[self.episode % len(self.episodes)]
        self.steps = 0
        self.act_buf = (np.zeros(3, np.float32), np.zeros(3, np.float32))
        return self._observation(), {}

    def step(self, action):
        vector = np.asarray(action, np.float32)
        self.actions.append(int(np.flatnonzero(np.all(vector == ACTION_VECTORS, axis=1))[0]))
        self.act_buf = (self.act_buf[1], vector.copy())
        self.steps += 1
        over = self.steps >= self.length
        terminated, truncated = over and self.end == "terminated", over and self.end == "truncated"
        reward = 0.5 + 0.01 * len(self.rewards)  # names its global step
        self.rewards.append(reward)
        self.ends.append((terminated, truncated))
        return self._observation(), reward, terminated, truncated, {"finished": terminated}

    def close(self):
        pass


def run_scripted(
    tmp_path,
    monkeypatch,
    learner: str,
    steps: int = 45,
    sets: tuple[str, ...] = (),
    script: ScriptedTM20 | None = None,
    extra: tuple[str, ...] = (),
    seen: list | None = None,
) -> tuple[ScriptedTM20, list, Config]:
    """Train on `script` (by default short episodes ending both ways); `used` gets (step, epsilon) of every
    act() and `seen`, when given, a copy of the (frames, car) act() was given."""
    if script is None:
        script = ScriptedTM20([(5, "terminated"), (7, "truncated"), (3, "terminated"), (6, "truncated")])
    monkeypatch.setattr(environment, "build_environment", lambda name, config, seed, runtime=None: script)
    used: list[tuple[int, float]] = []
    original_act = rainbow.RainbowAgent.act

    def act(self, frames, car, step):
        if seen is not None:
            seen.append((np.array(frames, copy=True), np.array(car, copy=True)))
        action = original_act(self, frames, car, step)
        used.append((step, self.epsilon))
        return action

    monkeypatch.setattr(rainbow.RainbowAgent, "act", act)
    args = ["--env", "embedded", "--steps", str(steps), "--checkpoint-root", str(tmp_path), "--run-name", "s"]
    args += ["--no-wandb", "--learner", learner, "--unpin-epsilon", "--set", "epsilon_decay_to=40", *extra]
    args += sum((["--set", a] for a in [*FAST, *sets]), [])
    assert env_tm.main(args) == cli.EXIT_OK
    config = Config().with_assignments([*FAST, "epsilon_decay_to=40", *sets])
    return script, used, config


@pytest.mark.parametrize("learner", ["inline", "beside"])
def test_the_loop_stores_every_transition_as_the_environment_gave_it(tmp_path, monkeypatch, learner):
    """Each stored (frames, action, reward, next frames, terminated, truncated) is the env's, step for step,
    across episode ends by termination and by truncation, and the replay holds exactly the steps taken."""
    from replay import PrioritizedReplay

    script, _, config = run_scripted(tmp_path, monkeypatch, learner)
    state = load_checkpoint(tmp_path / "s" / "latest.pt")
    replay = PrioritizedReplay.from_config(Config.from_dict(state["config"]), seed=0)
    replay.load_state_dict(state["replay"])
    steps = len(script.actions)
    assert steps == 45 == state["step"] and replay.transitions_added == steps, "one transition per env step"
    stored = replay.transitions(np.arange(steps))
    # Observation ids: each episode starts with a reset observation, then one per step.
    before, after, position = [], [], 0
    for t in range(steps):
        if t == 0 or any(script.ends[t - 1]):
            position += 1 if t else 0  # skip to the reset observation that follows an episode end
        before.append(script.obs_ids[position])
        after.append(script.obs_ids[position + 1])
        position += 1
    for t in range(steps):
        newest = ScriptedTM20.frame_id(stored["frames"][t, -1])
        assert newest == before[t], f"step {t}: stored state is observation {newest}, not {before[t]}"
        assert ScriptedTM20.frame_id(stored["next_frames"][t, -1]) == after[t], f"step {t}: wrong next state"
        assert stored["car"][t, 0] == before[t] and stored["next_car"][t, 0] == after[t], (
            f"step {t}: car floats"
        )
        assert stored["action"][t] == script.actions[t], (
            f"step {t}: stored action {stored['action'][t]} is not the action taken, {script.actions[t]}"
        )
        assert stored["reward"][t] == pytest.approx(script.rewards[t]), (
            f"step {t}: stored another step's reward"
        )
        terminated, truncated = script.ends[t]
        assert (bool(stored["terminated"][t]), bool(stored["truncated"][t])) == (terminated, truncated), (
            f"step {t}: stored terminated/truncated {stored['terminated'][t]}, {stored['truncated'][t]}, "
            f"the env said {terminated}, {truncated} (a truncation is never terminal)"
        )
        # Within an episode the stack is the four newest observations, oldest first, reset frame repeated.
        ids = [ScriptedTM20.frame_id(f) for f in stored["frames"][t]]
        assert ids == sorted(ids) and ids[-1] == before[t]
    assert state["agent"]["learn_steps"] == steps - config.batch_size + 1, "one learn step per env step"


@pytest.mark.parametrize("learner", ["inline", "beside"])
def test_the_loop_acts_with_the_epsilon_of_the_global_step_and_logs_the_one_used(
    tmp_path, monkeypatch, learner
):
    script, used, config = run_scripted(tmp_path, monkeypatch, learner)
    assert [step for step, _ in used] == list(range(len(script.actions))), (
        "act() must receive the global environment step, one per step (seed 004: step-based epsilon)"
    )
    for step, epsilon in used:
        assert epsilon == epsilon_at(step, config), f"step {step}: acted with epsilon {epsilon}"
    episodes = [r for r in read_jsonl(tmp_path / "s" / METRICS) if r["kind"] == "episode"]
    ends = [t for t, end in enumerate(script.ends) if any(end)]
    assert [r["step"] for r in episodes] == [t + 1 for t in ends], "one episode record per episode end"
    for record, last in zip(episodes, ends, strict=True):
        assert record["epsilon"] == dict(used)[last], (
            "an episode record must carry the epsilon its last action was chosen with, as used"
        )
    lengths = [r["length"] for r in episodes]
    assert lengths == [5, 7, 3, 6, 5, 7, 3, 6], f"episode lengths {lengths} are not the script's"


# --- the actor loop as a whole (issue 25) ------------------------------------------------------------------
def acted_observations(script: ScriptedTM20) -> list[tuple]:
    """The observations the loop must act on: every one the script returned, except those that ended an
    episode (the next act is on the reset observation) and the very last one."""
    ended = [False]  # the first observation is a reset's
    for terminated, truncated in script.ends:
        ended.append(terminated or truncated)
        if terminated or truncated:
            ended.append(False)  # the reset observation that follows
    return [obs for obs, last in zip(script.returned, ended, strict=True) if not last][: len(script.actions)]


@pytest.mark.parametrize("learner", ["inline", "beside"])
def test_act_receives_exactly_the_observation_the_environment_just_returned(tmp_path, monkeypatch, learner):
    """Every step the agent acts on the frames and the car floats of the observation just returned: never
    the reset observation's speed, gear and rpm for a whole episode, never last step's frames."""
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    script, _, _ = run_scripted(tmp_path, monkeypatch, learner, seen=seen)
    expected = acted_observations(script)
    assert len(seen) == len(expected) == len(script.actions) == 45
    for t, ((frames, car), obs) in enumerate(zip(seen, expected, strict=True)):
        assert np.array_equal(frames, obs[3]), f"step {t}: act() got other frames than the observation's"
        assert car.tolist() == [float(obs[0][0]), float(obs[1][0]), float(obs[2][0])], (
            f"step {t}: act() got car floats {car.tolist()}, the observation has "
            f"{[float(obs[k][0]) for k in range(3)]}"
        )


def episode_records(tmp_path: Path) -> list[dict]:
    return [r for r in read_jsonl(tmp_path / "s" / METRICS) if r["kind"] == "episode"]


def capture_learner(monkeypatch) -> list:
    """The learner driver the run opens, for a test to read the actor's state as the loop leaves it."""
    from beside import BesideDriver
    from learner import InlineDriver

    opened: list = []
    for cls in (InlineDriver, BesideDriver):

        def open_and_keep(self, original=cls.open):
            opened.append(self)
            return original(self)

        monkeypatch.setattr(cls, "open", open_and_keep)
    return opened


@pytest.mark.parametrize("learner", ["inline", "beside"])
def test_mid_episode_weights_are_never_more_than_the_simulators_bound_old(tmp_path, monkeypatch, learner):
    """On a simulator the actor drives with weights at most actor_refresh_learn_steps + simulator_max_lag
    learn steps behind inline's, mid-episode too (not those of the last episode end); inline, 0. The age
    is read from the learner driver at every act (the learn step its copied weights came from) and must be
    what the episode records report."""
    opened = capture_learner(monkeypatch)
    ages: list[int] = []
    original_act = rainbow.RainbowAgent.act

    def act(self, frames, car, step):
        ages.append(opened[0].policy_age)
        return original_act(self, frames, car, step)

    monkeypatch.setattr(rainbow.RainbowAgent, "act", act)
    script = ScriptedTM20([(90, "truncated")])
    run_scripted(tmp_path, monkeypatch, learner, steps=270, script=script)
    config = Config()
    bound = config.actor_refresh_learn_steps + config.simulator_max_lag
    records = episode_records(tmp_path)
    assert len(records) == 3 and len(ages) == 270
    per_episode = [max(ages[90 * k : 90 * (k + 1)]) for k in range(3)]
    assert [r["policy_age_max"] for r in records] == per_episode, "the records must report the ages"
    if learner == "inline":
        assert per_episode == [0, 0, 0], (
            "inline acts with the learner's own agent, caught up after every step"
        )
    else:
        assert max(ages) <= bound, f"mid-episode weights up to {max(ages)} learn steps old, bound {bound}"
    assert not any(r["policy_stale_share"] for r in records)


def test_on_a_real_time_game_the_weights_age_is_bounded_reported_and_flagged(tmp_path, monkeypatch, capsys):
    """A game cannot wait: the actor runs up to learner_max_lag steps ahead and never waits mid-episode;
    the age of its weights is in every episode record, and stale_policy says so when most of an episode
    was driven with old weights (here: weights refreshed only every 40 learn steps, flag at 10)."""
    import health

    monkeypatch.setattr(health, "STALE_POLICY_LEARN_STEPS", 10)
    script = ScriptedTM20([(120, "truncated")], real_time=True)
    sets = ("actor_refresh_learn_steps=40", "learner_max_lag=60")
    run_scripted(tmp_path, monkeypatch, "beside", steps=240, script=script, sets=sets)
    records = episode_records(tmp_path)
    assert len(records) == 2
    assert all(10 < r["policy_age_max"] <= 60 + 40 for r in records), [r["policy_age_max"] for r in records]
    assert all(r["policy_stale_share"] > 0.5 for r in records)
    out = capsys.readouterr().out
    assert "RED FLAG stale_policy:" in out and "learn on the GPU (--device cuda)" in out
    flags = [r for r in read_jsonl(tmp_path / "s" / METRICS) if r.get("name") == "stale_policy"]
    assert flags and flags[0]["level"] == "red_flag"


def test_a_simulator_never_raises_stale_policy(tmp_path, monkeypatch, capsys):
    import health

    monkeypatch.setattr(health, "STALE_POLICY_LEARN_STEPS", 10)
    script = ScriptedTM20([(120, "truncated")])
    run_scripted(
        tmp_path, monkeypatch, "beside", steps=240, script=script, sets=("actor_refresh_learn_steps=40",)
    )
    assert "stale_policy" not in capsys.readouterr().out, "a simulator waits: its weights are never that old"


def test_training_episodes_use_distinct_tracks_never_the_evaluation_ones(tmp_path, monkeypatch):
    """Each training episode resets with a seed of its own, distinct across episodes and across run seeds,
    and never one of the held-out evaluation tracks."""
    training: list[set[int]] = []
    for seed in (0, 1):
        script = ScriptedTM20([(5, "terminated")])
        extra = ("--seed", str(seed), "--eval-every", "20", "--eval-episodes", "2")
        run_scripted(tmp_path / str(seed), monkeypatch, "inline", steps=45, script=script, extra=extra)
        held_out = set(environment.evaluation_seeds(2))
        train = [s for s in script.seeds if s not in held_out]
        assert len(train) == 10, f"9 episodes and the one cut at the end, got resets {script.seeds}"
        assert len(set(train)) == len(train), f"training tracks repeat: {train}"
        assert all(s is not None and s < environment.EVAL_SEED_BASE for s in train)
        assert [s for s in script.seeds if s in held_out] == sorted(held_out) * 4, (
            "evaluations at 0, 20, 40, 45"
        )
        training.append(set(train))
    assert not training[0] & training[1], "two run seeds drove the same training tracks"


def test_in_lockstep_the_learner_beside_the_actor_acts_and_learns_exactly_as_inline(tmp_path, monkeypatch):
    """simulator_max_lag=0 and weights after every learn step: the actor beside its learner then acts on
    the weights inline would, with the same acting streams, so the two modes take the same actions and
    end with the same weights, bit for bit. Any other difference between the modes breaks this."""
    runs = {}
    for learner in ("inline", "beside"):
        script = ScriptedTM20([(30, "truncated"), (17, "terminated")])
        sets = ("simulator_max_lag=0", "actor_refresh_learn_steps=1")
        run_scripted(tmp_path / learner, monkeypatch, learner, steps=150, script=script, sets=sets)
        runs[learner] = (script.actions, load_checkpoint(tmp_path / learner / "s" / "latest.pt"))
    (inline_actions, inline), (beside_actions, beside) = runs["inline"], runs["beside"]
    assert inline_actions == beside_actions, "the two modes chose other actions from the same start"
    assert inline["agent"]["learn_steps"] == beside["agent"]["learn_steps"] == 150 - 4 + 1
    for name, value in inline["agent"]["online"].items():
        assert torch.equal(beside["agent"]["online"][name], value), f"{name}: the modes learnt apart"
    assert np.array_equal(inline["replay"]["tree"], beside["replay"]["tree"]), "other priorities"


def test_the_actor_never_initialises_cuda(tmp_path, monkeypatch):
    """The actor (this process) acts on the CPU: saving its random streams with every checkpoint must not
    create a CUDA context (GPU memory for nothing; an error on a GPU in exclusive-process mode)."""

    def poisoned() -> None:
        raise AssertionError("the actor initialised CUDA")

    monkeypatch.setattr(torch.cuda, "_lazy_init", poisoned)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a PC with a GPU
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: poisoned())
    run_scripted(tmp_path, monkeypatch, "beside", extra=("--device", "cpu"))
    state = load_checkpoint(tmp_path / "s" / "latest.pt")
    assert state["episode"] >= 5 and "act_generator" in state["actor_rng"]


def test_the_actor_and_the_learner_draw_from_independent_streams(tmp_path):
    """The same seed gives the actor and the learner the same initial weights but never the same draws:
    none of the actor's first 1,000 acting noise values is one of the learner's learn-step noise values
    (a shared torch seed made the first ones equal, and ~4% repeat later)."""
    from conftest import fill_replay, small_config

    from learner import ActingPolicy, LearningEngine

    config = small_config(max_buffer_size=512)
    learner = LearningEngine(config, seed=5, device=torch.device("cpu"))
    actor = ActingPolicy.new(config, seed=5)
    for name, value in learner.agent.online.state_dict().items():
        assert torch.equal(actor.agent.online.state_dict()[name], value), f"{name}: other initial weights"
    fill_replay(learner.replay, 200)
    frames, car = np.zeros((4, 64, 64), np.uint8), np.zeros(3, np.float32)

    def noise(agent) -> np.ndarray:
        return np.concatenate([layer.epsilon_in.numpy().copy() for layer in agent.online.noisy_layers()])

    acting = []
    while sum(map(len, acting)) < 1000:
        actor.act(frames, car, step=10**8)  # epsilon 0: a greedy action, noise and taus drawn
        acting.append(noise(actor.agent))
    learning = []
    for _ in range(len(acting)):
        learner.learn()
        learning.append(noise(learner.agent))
    shared = np.intersect1d(np.concatenate(acting)[:1000], np.concatenate(learning))
    assert shared.size == 0, f"{shared.size} acting noise values are also learning draws"


def test_a_rollback_draws_fresh_noise_and_quantile_fractions(tmp_path, capsys, monkeypatch):
    """Restoring a checkpoint restores torch's generator too: without a new seed, the run after a rollback
    would redraw exactly the noise and taus that led to the failure."""
    poisoned = {"left": 1}
    draws: dict[str, list] = {"first": [], "after": []}
    original = rainbow.RainbowAgent.train

    def train(self):
        metrics = original(self)
        if self.learn_steps == 150 and poisoned["left"]:
            poisoned["left"] -= 1
            metrics["grad_norm"] = 1e9  # fatal: roll back to the checkpoint at step 120
        noise = self.online.advantage_out.epsilon_out.clone()
        draws["after" if not poisoned["left"] else "first"].append((self.learn_steps, noise))
        return metrics

    monkeypatch.setattr(rainbow.RainbowAgent, "train", train)
    assert env_tm.main(health_args(tmp_path, 200, "--on-red-flag", "rollback", "--learner", "inline")) == 0
    assert "rolled back to ckpt_ep0000003_step0000000120.pt" in capsys.readouterr().out
    first = dict((step, noise) for step, noise in draws["first"])
    redone = [(step, noise) for step, noise in draws["after"] if step in first]
    assert len(redone) >= 20, "learn steps after step 120 are redone after the rollback"
    assert not any(torch.equal(noise, first[step]) for step, noise in redone), (
        "after a rollback the learn steps redraw the same noise as before it (restored torch generator)"
    )


@pytest.mark.parametrize(("previous", "learner"), [(1, "inline"), (2, "beside")])
def test_previous_actions_in_a_state_are_the_ones_before_it_never_the_one_about_to_be_chosen(
    tmp_path, monkeypatch, previous, learner
):
    """With previous_actions P the state at step t carries a_(t-P) .. a_(t-1) (oldest first; coast, all
    zeros, before the episode's first action), and the stored next state a_(t-P+1) .. a_t."""
    from replay import PrioritizedReplay

    script, _, config = run_scripted(tmp_path, monkeypatch, learner, sets=(f"previous_actions={previous}",))
    state = load_checkpoint(tmp_path / "s" / "latest.pt")
    assert state["config"]["previous_actions"] == previous
    replay = PrioritizedReplay.from_config(Config.from_dict(state["config"]), seed=0)
    replay.load_state_dict(state["replay"])
    stored = replay.transitions(np.arange(len(script.actions)))
    start = 0  # the episode's first step
    for t, action in enumerate(script.actions):
        history = [script.actions[k] if k >= start else None for k in range(t - previous, t)]
        vectors = [ACTION_VECTORS[a] if a is not None else np.zeros(3, np.float32) for a in history]
        assert np.array_equal(stored["car"][t, 3:], np.concatenate(vectors)), (
            f"step {t}: the state's previous actions are not a_(t-{previous}) .. a_(t-1)"
        )
        following = [*vectors[1:], ACTION_VECTORS[action]]
        assert np.array_equal(stored["next_car"][t, 3:], np.concatenate(following)), (
            f"step {t}: the next state must end with the action just taken, a_t"
        )
        if any(script.ends[t]):
            start = t + 1


# --- demonstrations -----------------------------------------------------------------------------------------
def test_record_scripted_demonstrations_then_train_with_them_pretrained_and_resume(tmp_path, capsys):
    root = tmp_path / "demos"
    record = ["--env", "embedded", "--record-demos", "auto", "--driver", "scripted", "--demo-episodes", "2"]
    assert env_tm.main([*record, "--demo-root", str(root), "--set", "ep_max_length=30"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "2 episodes recorded into" in out and "episode 2: 30 steps" in out
    manifest = json.loads((root / "auto" / "manifest.json").read_text())
    assert [e["steps"] for e in manifest["episodes"]] == [30, 30] and manifest["environment"] == "embedded"
    assert all(e["driver"] == "scripted" for e in manifest["episodes"])

    train = ["--env", "embedded", "--steps", "60", "--checkpoint-root", str(tmp_path), "--run-name", "d"]
    train += ["--no-wandb", "--learner", "inline", "--demos", "auto", "--pretrain-steps", "20"]
    train += ["--demo-root", str(root), *sum((["--set", a] for a in FAST), [])]
    assert env_tm.main(train) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "demonstrations: 2 episodes, 60 transitions from auto" in out
    assert "pretraining: 20 learn steps on the demonstrations alone" in out and "demos: 'auto'" in out
    state = load_checkpoint(tmp_path / "d" / "latest.pt")
    assert state["config"]["demos"] == "auto" and state["departures"]["demos"]["used"] == "auto"
    assert state["replay"]["kind"] == "with_demonstrations"
    assert state["replay"]["demos"]["next_transition"] == 60, "the demonstrations, whole, in the checkpoint"
    assert state["agent"]["learn_steps"] == 20 + 60 - 4 + 1, "pretraining, then one learn step per env step"
    steps = [r for r in read_jsonl(tmp_path / "d" / METRICS) if r["kind"] == "step"]
    assert steps and all(
        {"demo_share", "agent_td_error", "demo_q", "demo_loss_share"} <= r.keys() for r in steps
    )

    # Resumed: the demonstrations come from the checkpoint (the files may be gone), unchanged.
    for path in (root / "auto").iterdir():
        path.unlink()
    resumed = [a if a != "60" else "90" for a in train]
    assert env_tm.main(resumed) == cli.EXIT_OK
    again = load_checkpoint(tmp_path / "d" / "latest.pt")
    assert np.array_equal(again["replay"]["demos"]["frames"], state["replay"]["demos"]["frames"])
    assert again["agent"]["learn_steps"] == 20 + 90 - 4 + 1, "no second pretraining on a resumed run"
    other = [a if a != "auto" else "other" for a in resumed]
    assert env_tm.main(other) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert "incompatible config: demos='auto' (run: 'other')" in err and "\n" not in err


@pytest.mark.parametrize("learner", ["inline", "beside"])
def test_training_with_missing_demonstrations_is_one_line(tmp_path, capsys, learner):
    root = tmp_path / "runs"
    args = ["--env", "embedded", "--steps", "20", "--checkpoint-root", str(root), "--no-wandb"]
    args += ["--learner", learner, "--demos", "nowhere", "--demo-root", str(tmp_path / "demos")]
    assert env_tm.main(args) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert "no demonstrations at" in err and "record some with --record-demos" in err and "\n" not in err
    # A refused start leaves nothing behind: no run folder holding only a learner.log
    assert not root.exists() or not any(root.rglob("*")), sorted(root.rglob("*"))


# --- the first hour: run names, departures, --help, the status line, --steps ----------------------------


def test_a_run_with_departures_never_continues_the_plain_run(tmp_path, capsys):
    from cli import default_run_name

    base = ["--env", "embedded", "--steps", "40", "--checkpoint-root", str(tmp_path), "--no-wandb"]
    base += ["--learner", "inline", *sum((["--set", a] for a in FAST), [])]
    assert env_tm.main(base) == cli.EXIT_OK
    assert env_tm.main([*base, "--set", "discount_factor=0.99"]) == cli.EXIT_OK
    plain = tmp_path / default_run_name("embedded", 0, FAST, False)
    experiment = tmp_path / default_run_name("embedded", 0, [*FAST, "discount_factor=0.99"], False)
    assert plain != experiment and sorted(tmp_path.iterdir()) == sorted([plain, experiment])
    assert f"no checkpoint in {experiment}: starting fresh" in capsys.readouterr().out
    assert load_checkpoint(plain / "latest.pt")["config"]["discount_factor"] == 0.997, "left alone"
    assert load_checkpoint(experiment / "latest.pt")["config"]["discount_factor"] == 0.99


def test_steps_below_where_the_run_stands_is_said_in_one_line(tmp_path, capsys):
    assert run_quietly(tmp_path, 40, "--fresh") == cli.EXIT_OK
    capsys.readouterr()
    assert run_quietly(tmp_path, 20) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert "--steps 20 is not beyond step 40, where q stands: nothing to train" in err and "\n" not in err


def test_the_run_ends_with_an_evaluation_even_between_boundaries(tmp_path, capsys):
    # ep_max_length 40: episodes end at 40 and 80; 80 is past 50, the end (90) is not past 100, yet it is
    # evaluated: "at the end of the run" means at the end of the run.
    assert env_tm.main(health_args(tmp_path, 90, "--eval-every", "50", "--eval-episodes", "1")) == cli.EXIT_OK
    evals = [r["step"] for r in read_jsonl(tmp_path / "h" / METRICS) if r["kind"] == "eval"]
    assert evals == [0, 80, 90]
    out = capsys.readouterr().out
    assert "1 greedy episode" in out and "1 greedy episodes" not in out


def test_a_resumed_run_keeps_its_checkpoints_settings_not_the_defaults(tmp_path, capsys):
    """Issue 26: keep_last_n_checkpoints and actor_refresh_learn_steps came from the command line's defaults
    on resume, so README's disk-saving advice silently reverted; the checkpoint's config is the one place."""
    import session as session_module

    sets = [*FAST, "keep_last_n_checkpoints=1", "actor_refresh_learn_steps=7"]
    assert run_quietly(tmp_path, 80, sets=sets) == cli.EXIT_OK  # 2 episodes of 40 steps
    run_dir = tmp_path / "q"
    seen = {}
    real_init = session_module.Session.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen.update(keep=self.store.keep_last, refresh=self.config.actor_refresh_learn_steps)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(session_module.Session, "__init__", spy)
        assert run_quietly(tmp_path, 200) == cli.EXIT_OK  # resumed without those --set
    assert "resumed q from" in capsys.readouterr().out
    assert seen == {"keep": 1, "refresh": 7}
    assert len(list(run_dir.glob("ckpt_ep*_step*.pt"))) == 1, sorted(p.name for p in run_dir.iterdir())


def test_a_resumed_run_keeps_its_runtime_knobs_and_announces_one_given_again(tmp_path, capsys):
    """Issue 28: --learner, --on-red-flag, --eval-every and --eval-episodes are recorded in the start record
    and every checkpoint; a resumed run keeps them unless given again, and says so in one line."""
    base = ["--env", "embedded", "--checkpoint-root", str(tmp_path), "--run-name", "k", "--no-wandb"]
    base += sum((["--set", a] for a in FAST), [])
    knobs = ["--learner", "inline", "--on-red-flag", "stop", "--eval-every", "50", "--eval-episodes", "1"]
    assert env_tm.main([*base, "--steps", "40", *knobs]) == cli.EXIT_OK
    assert env_tm.main([*base, "--steps", "80"]) == cli.EXIT_OK  # none of them given again
    out = capsys.readouterr().out
    assert "given: the run had" not in out and "learner inline" in out.split("resumed k from")[1]
    records = read_jsonl(tmp_path / "k" / METRICS)
    starts = [r for r in records if r["kind"] == "run" and r["event"] == "start"]
    assert starts[1]["runtime"] == starts[0]["runtime"] and starts[1]["learner"] == "inline"
    assert starts[0]["runtime"]["on_red_flag"] == "stop" and starts[0]["runtime"]["eval_every"] == 50
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 40, 80], "every 50 steps, resumed too"
    assert load_checkpoint(tmp_path / "k" / "latest.pt")["runtime"] == starts[0]["runtime"]

    assert env_tm.main([*base, "--steps", "120", "--on-red-flag", "rollback"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "--on-red-flag rollback given: the run had stop (kept from its checkpoint when not given)" in out
    start = [r for r in read_jsonl(tmp_path / "k" / METRICS) if r.get("event") == "start"][-1]
    assert start["runtime"] == {**starts[0]["runtime"], "on_red_flag": "rollback"}


def test_a_run_with_no_checkpoint_to_resume_takes_the_command_lines_runtime(tmp_path, capsys):
    """A sitting that recorded its knobs but never saved (checkpoints off) leaves nothing to resume: the next
    sitting starts afresh, driven as its own command line says, not by that sitting's start record."""
    base = ["--env", "embedded", "--checkpoint-root", str(tmp_path), "--run-name", "k", "--no-wandb"]
    base += sum((["--set", a] for a in FAST), []) + ["--learner", "inline"]
    unsaved = ["--set", "checkpoint=false", "--on-red-flag", "stop", "--eval-episodes", "2"]
    assert env_tm.main([*base, "--steps", "40", *unsaved]) == cli.EXIT_OK
    assert not list((tmp_path / "k").glob("*.pt"))
    assert env_tm.main([*base, "--steps", "40"]) == cli.EXIT_OK
    assert "given: the run had" not in capsys.readouterr().out
    start = [r for r in read_jsonl(tmp_path / "k" / METRICS) if r.get("event") == "start"][-1]
    assert (start["runtime"]["on_red_flag"], start["runtime"]["eval_episodes"]) == ("warn", 5)


def test_a_run_ends_with_a_short_summary_table_of_what_it_did(tmp_path, capsys):
    assert env_tm.main(health_args(tmp_path, 80)) == cli.EXIT_OK
    out = capsys.readouterr().out.splitlines()
    start = out.index("summary of run h")
    rows = out[start + 1 :]
    labels = [row.split()[0] for row in rows]
    assert labels == ["steps", "returns", "learning", "races", "game's"], rows
    assert all(row.startswith("  ") for row in rows)
    column = rows[0].index("80 this sitting")
    assert all(row[column - 2 : column] == "  " and row[column] != " " for row in rows), "one aligned column"
    assert "80 this sitting (2 episodes) in " in rows[0] and rows[0].endswith("; 80 of 80 in all")
    returns = [r["reward"] for r in read_jsonl(tmp_path / "h" / METRICS) if r["kind"] == "episode"]
    assert f"mean of the last 2 episodes {np.mean(returns):.1f}" in rows[1]
    assert f"{80 - Config().with_assignments(FAST).batch_size + 1} learn steps; last loss" in rows[2]
    assert rows[3].endswith("no finish in 2 episodes")
    assert "agent time per step median" in rows[4] and "over 80 steps" in rows[4]


def test_wandb_groups_runs_by_their_departures_and_tags_each_one():
    from run_log import wandb_grouping

    assert wandb_grouping({}, []) == ("known-good", ["known-good"])
    departures = {
        "n_step": {"pinned": 1, "used": 3},
        "epsilon_decay_to": {"pinned": 2_500_000, "used": 30_000},
    }
    assert wandb_grouping(departures, ["epsilon_decay_to"]) == (
        "epsilon_decay_to=30000+n_step=3",
        ["epsilon_decay_to=30000", "n_step=3", "unpinned"],
    )
