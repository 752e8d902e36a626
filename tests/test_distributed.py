"""distributed.py: the relay password and TLS checks, what travels between the roles, the trainer's replay
(episodes of different workers never share a frame stack), and a server, a trainer and two workers on
loopback, one of them killed and replaced."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_ASSIGNMENTS, ROOT
from fake_openplanet import write_tmrl_data

import distributed
import env_tm
import session
from checkpoints import CheckpointStore, load_checkpoint
from rainbow import ACTION_VECTORS, RainbowAgent
from run_log import METRICS_FILE, read_jsonl
from tm_config import Config, epsilon_at

FAST = FAST_ASSIGNMENTS
FAST_SETS = sum((["--set", assignment] for assignment in FAST), [])
USERS_WANDB_KEY = "0123456789abcdef" * 2 + "fakewandbkey"  # never sent anywhere: W&B is offline


# --- the relay password and TLS ----------------------------------------------------------------------
def test_the_server_generates_a_strong_password_once_and_says_where_never_what(tmp_path, capsys):
    path = tmp_path / "secret" / "relay-password.txt"
    password, created = distributed.relay_password(path, create=True)
    assert created and len(password) >= 40 and path.read_text().strip() == password
    if os.name == "posix":
        assert path.stat().st_mode & 0o077 == 0, "readable by others"
    again, created_again = distributed.relay_password(path, create=True)
    assert again == password and not created_again
    args = env_tm.parse_args(["--role", "trainer", "--password-file", str(path)])
    connection, note = distributed.connection_from_args(args, "trainer")
    assert connection.password == password
    assert str(path) in note and password not in note and password not in repr(connection)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (distributed.TMRL_PLACEHOLDER_PASSWORD, "tmrl's placeholder password"),
        ("hunter2", "too weak"),
    ],
)
def test_placeholder_and_weak_passwords_are_refused_in_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "pw.txt"
    path.write_text(content + "\n")
    code = env_tm.main(["--role", "server", "--password-file", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == env_tm.EXIT_ERROR and err.startswith("error: ") and "\n" not in err
    assert message in err and str(path) in err and content not in err


def test_a_trainer_without_the_password_file_is_told_to_copy_it(tmp_path, capsys):
    path = tmp_path / "missing.txt"
    code = env_tm.main(["--role", "trainer", "--password-file", str(path), "--no-wandb"])
    err = capsys.readouterr().err.strip()
    assert code == env_tm.EXIT_ERROR and "\n" not in err
    assert f"no relay password file at {path}" in err and "copy the file the server created" in err
    assert not path.exists(), "only the server creates the password"


def test_tls_without_the_certificate_files_names_what_is_missing(tmp_path, capsys):
    path = tmp_path / "pw.txt"
    distributed.relay_password(path, create=True)
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "certificate.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    args = ["--password-file", str(path), "--tls", "--tls-dir", str(keys)]
    assert env_tm.main(["--role", "server", *args]) == env_tm.EXIT_ERROR
    err = capsys.readouterr().err
    assert f"key.pem missing in {keys}" in err and "--make-tls-credentials" in err
    worker_args = env_tm.parse_args(["--role", "worker", *args])
    connection, note = distributed.connection_from_args(worker_args, "worker")  # workers need no key
    assert connection.security == "TLS" and connection.keys_dir == str(keys) and "TLS" in note


# --- what travels -------------------------------------------------------------------------------------------
def test_every_action_vector_maps_back_to_its_index_and_nothing_else_does():
    assert [distributed.action_index(vector) for vector in ACTION_VECTORS] == list(range(len(ACTION_VECTORS)))
    assert distributed.action_index([0.5, 0.0, 0.0]) is None
    assert distributed.action_index([1.0, 0.0]) is None
    assert distributed.action_index(None) is None


def tm20full(frames: np.ndarray, speed: float) -> tuple:
    zeros = np.zeros(3, np.float32)
    one = np.ones(1, np.float32)
    return (one * speed, one * 2, one * 4000, frames, zeros, zeros)


def worker_episode(compressor, worker_level: int, episode: int, length: int, action_rows, end: str) -> list:
    """An episode as a worker's compressor emits it: frame pixels are worker_level + the step number."""
    compressor.start_episode(episode)
    stack = np.stack([np.full((64, 64), worker_level, np.uint8)] * 4)
    samples = [compressor(None, tm20full(stack, 0.0), 0.0, False, False, {})]
    for t in range(1, length + 1):
        stack = np.concatenate([stack[1:], np.full((1, 64, 64), worker_level + t, np.uint8)])
        terminated = end == "terminated" and t == length
        truncated = end == "truncated" and t == length
        act = ACTION_VECTORS[action_rows[(t - 1) % len(action_rows)]].copy()
        samples.append(compressor(act, tm20full(stack, 10.0 * t), 1.0, terminated, truncated, {"x": 1}))
    return samples


@pytest.fixture
def trainer_session(tmp_path):
    args = env_tm.parse_args(
        ["--role", "trainer", "--no-wandb", "--checkpoint-root", str(tmp_path), "--run-name", "t", *FAST_SETS]
    )
    trainer = session.Session(args, "trainer", "inline")
    yield trainer
    trainer.close()


def test_compressed_episodes_keep_the_first_stack_and_only_the_newest_frame_after():
    compressor = distributed.EpisodeCompressor("A", Config())
    samples = worker_episode(compressor, 10, episode=3, length=5, action_rows=[1], end="terminated")
    first_car, first_frames = samples[0][1]
    assert first_frames.shape == (4, 64, 64) and samples[0][5] == {
        "worker": "A",
        "episode": 3,
        "first": True,
        "seed": None,
    }
    for t, (_, (car, frames), reward, _, _, tag) in enumerate(samples[1:], start=1):
        assert frames.shape == (1, 64, 64) and frames[0, 0, 0] == 10 + t and car[0] == 10.0 * t
        assert tag == {"worker": "A", "episode": 3, "first": False} and reward == 1.0
    assert samples[-1][3] is True and first_car.dtype == np.float32


def test_the_trainer_stores_each_workers_episode_whole_so_stacks_never_mix(trainer_session):
    session = trainer_session
    a = distributed.EpisodeCompressor("A", session.config)
    b = distributed.EpisodeCompressor("B", session.config)
    # As the relay delivers them: whole episodes of two workers, concatenated; the last one cut off
    # without a flag (its final transition must be stored as truncated, never as terminal).
    received = (
        worker_episode(a, 10, 0, 30, [1, 3], "terminated")
        + worker_episode(b, 100, 0, 25, [4, 2], "truncated")
        + worker_episode(a, 50, 1, 20, [0], "none")
    )
    episodes = distributed.split_episodes(received)
    assert [len(e) for e in episodes] == [31, 26, 21]
    remote = distributed.RemoteEpisodes(session)
    for episode in episodes:
        assert remote.ingest(episode)[0]
    replay = session.learner.engine.replay
    assert session.run.step == 75 and len(replay) == 75 and session.run.episode == 3
    assert remote.steps_by_worker == {"A": 50, "B": 25} and remote.rejected == 0
    assert replay.actions[:4].tolist() == [1, 3, 1, 3] and replay.actions[30:32].tolist() == [4, 2]
    assert replay.terminated[:75].sum() == 1 and replay.terminated[29]
    assert replay.truncated[54] and replay.truncated[74] and not replay.terminated[74]
    replay.check_consistency()
    for _ in range(50):
        batch = replay.sample(32)
        for key in ("frames", "next_frames"):
            for stack in batch[key][:, :, 0, 0].astype(int):  # pixels 10-40, 100-125, 50-70 per episode
                owners = {0 if v < 50 else 1 if v < 100 else 2 for v in stack}
                assert len(owners) == 1, f"a stack mixes episodes: {stack}"
    records = read_jsonl(session.run_dir / METRICS_FILE)
    assert [r["worker"] for r in records if r["kind"] == "episode"] == ["A", "B", "A"]


def test_the_trainers_periodic_checkpoints_hold_a_caught_up_moment(trainer_session):
    """Issue 26: each periodic checkpoint is written after every due learn step ran (before, it held none
    of the episode's 197 due learn steps in a probe): the agent, the replay and the counters of one moment."""
    session = trainer_session
    remote = distributed.RemoteEpisodes(session)
    a = distributed.EpisodeCompressor("A", session.config, seed=1)
    batch = session.config.batch_size
    for episode in range(3):  # checkpoint_frequency=1: one checkpoint per episode
        flags = remote.take(worker_episode(a, 10, episode, 30, [1, 3], "truncated"))
        assert flags == []
        state = load_checkpoint(session.store.latest_path)
        step = 30 * (episode + 1)
        assert state["step"] == step and len(session.store.periodic()) >= 1
        assert state["agent"]["learn_steps"] == step - batch + 1, "a checkpoint before the learner caught up"


def test_two_workers_with_one_seed_are_warned_about_once(trainer_session):
    session = trainer_session
    remote = distributed.RemoteEpisodes(session)
    a, b, c = (
        distributed.EpisodeCompressor(n, session.config, seed=s) for n, s in (("A", 7), ("B", 7), ("C", 8))
    )
    for episode in range(2):
        for compressor in (a, b, c):
            assert remote.take(worker_episode(compressor, 10, episode, 10, [1], "terminated")) == []
    warnings = [
        r for r in read_jsonl(session.run_dir / METRICS_FILE) if r.get("name") == "workers_share_a_seed"
    ]
    assert len(warnings) == 1, warnings
    assert "workers A and B run with the same seed 7" in warnings[0]["message"]
    assert "--seed" in warnings[0]["message"] and remote.seed_of == {"A": 7, "B": 7, "C": 8}


def test_an_episode_with_an_unknown_action_is_rejected_whole_and_logged(trainer_session):
    session = trainer_session
    compressor = distributed.EpisodeCompressor("X", session.config)
    episode = worker_episode(compressor, 10, 0, 10, [1], "terminated")
    act, obs, reward, terminated, truncated, tag = episode[5]
    episode[5] = (np.array([0.3, 0.0, 0.0], np.float32), obs, reward, terminated, truncated, tag)
    remote = distributed.RemoteEpisodes(session)
    assert remote.ingest(episode) == (False, [])
    assert remote.rejected == 1 and len(session.learner.engine.replay) == 0 and session.run.step == 0
    events = [r for r in read_jsonl(session.run_dir / METRICS_FILE) if r["kind"] == "event"]
    assert events[-1]["name"] == "episode_rejected" and "not in the action table" in events[-1]["message"]


def test_the_worker_takes_the_trainers_weights_and_global_step(tmp_path):
    config = Config().with_assignments(FAST)
    trainer = RainbowAgent(config, replay=None, seed=1)
    actor = distributed.RainbowActor(None, None, config=config, seed=2, device="cpu")
    assert actor.checksum() != pytest.approx(
        float(sum(p.detach().double().sum() for p in trainer.online.parameters()))
    )
    step = config.epsilon_cutoff + 5  # epsilon 0 from here: every action is the network's
    state = {
        "online": trainer.online.state_dict(),
        "step": step,
        "learn_steps": 77,
        "pause": True,
        "done": False,
    }
    distributed.Broadcast(state).save(tmp_path / "w.tmod")
    assert actor.load(tmp_path / "w.tmod", "cpu") is actor
    for name, value in trainer.online.state_dict().items():
        assert np.array_equal(actor.agent.online.state_dict()[name].numpy(), value.numpy()), name
    assert (actor.trainer_step, actor.learn_steps, actor.pause, actor.done) == (step, 77, True, False)
    frames = np.zeros((4, 64, 64), np.uint8)
    obs = tm20full(frames, 50.0)
    before = actor.agent.rng.bit_generator.state
    vector = actor.act_(obs)
    assert distributed.action_index(vector) is not None and vector.dtype == np.float32
    assert actor.global_step == step + 1 and actor.agent.epsilon == 0.0
    assert actor.agent.rng.bit_generator.state != before  # the epsilon draw, as in the single-PC loop
    actor.trainer_step = 0
    actor.act_(obs)
    assert actor.agent.epsilon == epsilon_at(1, config)
    assert actor.latency.calls == 2 and 0 < actor.latency.slowest < 5  # every action is timed


# --- a server, a trainer and two workers on loopback --------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_loopback_server_trainer_and_two_workers_one_killed_and_restarted(tmp_path):
    home = tmp_path / "home"
    write_tmrl_data(home)
    port = free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = []

    def role(log_name: str, *extra: str) -> tuple[subprocess.Popen, Path]:
        log_path = logs / f"{log_name}.log"
        args = [sys.executable, str(ROOT / "env_tm.py"), "--port", str(port)]
        args += ["--password-file", str(tmp_path / "pw.txt"), *extra]
        env = dict(os.environ, HOME=str(home), USERPROFILE=str(home), OMP_NUM_THREADS="1")
        env.update(PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_API_KEY=USERS_WANDB_KEY)
        with open(log_path, "w") as log:
            # Its own process group: a worker is killed with its networking process, as a crash would.
            process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        processes.append(process)
        return process, log_path

    worker = ["--role", "worker", "--env", "embedded", *FAST_SETS]
    try:
        server, server_log = role("server", "--role", "server")
        wait_for(lambda: "relay listening" in server_log.read_text(), 60, "the relay")
        trainer, trainer_log = role(
            "trainer", "--role", "trainer", "--steps", "600", "--no-wandb", "--checkpoint-root",
            str(tmp_path / "runs"), "--run-name", "t", *FAST_SETS,
        )  # fmt: skip
        first_b, first_b_log = role("B-first", *worker, "--worker-name", "B", "--seed", "2")
        wait_for(lambda: "episode 2 sent" in first_b_log.read_text(), 120, "worker B's first episodes")
        os.killpg(first_b.pid, signal.SIGKILL)  # B crashes, with its networking process
        first_b.wait(10)
        killed_at = time.time()
        worker_a, log_a = role("A", *worker, "--worker-name", "A", "--seed", "1")
        worker_b, log_b = role("B", *worker, "--worker-name", "B", "--seed", "3")  # B restarted
        assert trainer.wait(300) == 0, trainer_log.read_text()[-2000:]
        assert worker_a.wait(60) == 0, log_a.read_text()[-2000:]
        assert worker_b.wait(60) == 0, log_b.read_text()[-2000:]
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)

    records = read_jsonl(tmp_path / "runs" / "t" / METRICS_FILE)
    finished = [r for r in records if r["kind"] == "run" and r.get("event") == "finished"][-1]
    by_worker = finished["steps_by_worker"]
    assert set(by_worker) == {"A", "B"} and all(steps > 0 for steps in by_worker.values())
    assert finished["step"] >= 600 and sum(by_worker.values()) == finished["step"]
    assert finished["rejected_episodes"] == 0
    # Checkpoints as on one PC: periodic ones every episode here, and the last state at the end.
    store = CheckpointStore(tmp_path / "runs" / "t", Config().keep_last_n_checkpoints)
    assert store.periodic()
    last = load_checkpoint(store.latest_path)
    assert last["step"] == finished["step"] and last["agent"]["learn_steps"] == finished["learn_steps"]
    episodes_of_b = [r["time"] for r in records if r["kind"] == "episode" and r["worker"] == "B"]
    assert min(episodes_of_b) < killed_at < max(episodes_of_b), "B's episodes from before and after the kill"
    # The replay ratio: one learn step per env step once a batch is stored, never ahead of the data.
    assert finished["replay_ratio"] == pytest.approx(1.0, abs=0.1)
    # Mid-run, data arrives an episode at a time: the learner is never ahead of it, and the workers pause
    # before it falls further behind than one episode plus the two in flight per worker.
    for record in (r for r in records if r["kind"] == "step"):
        backlog = record["step"] - 4 + 1 - record["learn_step"]
        assert 0 <= backlog <= 40 * (1 + 2 * 2), record
    # Weights flowed back: each worker's network changed between the first and the last weights.
    for log in (log_a, log_b):
        lines = log.read_text().splitlines()
        checksums = [line.rsplit("checksum ", 1)[1] for line in lines if "checksum" in line]
        assert len(checksums) >= 2 and checksums[0] != checksums[-1], log.read_text()[-1500:]
        assert "the trainer finished" in log.read_text()
    # Nothing printed the password, the user's W&B key or the one in tmrl's config.json.
    password = (tmp_path / "pw.txt").read_text().strip()
    tmrl_key = json.loads((home / "TmrlData" / "config" / "config.json").read_text())["WANDB_KEY"]
    for log in logs.iterdir():
        text = log.read_text()
        assert password not in text and USERS_WANDB_KEY not in text and tmrl_key not in text, log.name
    assert "relay stopped" in server_log.read_text()


def test_the_relay_over_tls_passes_on_what_the_password_holder_sends_and_nothing_from_strangers(tmp_path):
    from tlspyo import Endpoint

    home = tmp_path / "home"
    home.mkdir()
    keys = tmp_path / "keys"
    distributed.make_tls_credentials(keys, "default")
    assert (keys / "key.pem").stat().st_mode & 0o077 == 0 or os.name != "posix"
    port = free_port()
    password_file = tmp_path / "pw.txt"
    write_tmrl_data(home)
    args = [sys.executable, str(ROOT / "env_tm.py"), "--role", "server", "--port", str(port)]
    args += ["--password-file", str(password_file), "--tls", "--tls-dir", str(keys)]
    env = dict(os.environ, HOME=str(home), USERPROFILE=str(home), PYTHONUNBUFFERED="1")
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    endpoints = []

    def endpoint(group: str, password: str, security: str | None) -> Endpoint:
        made = Endpoint(
            ip_server="127.0.0.1", port=port, password=password, groups=group, local_com_port=free_port(),
            header_size=distributed.HEADER_SIZE, security=security, keys_dir=str(keys), hostname="default",
        )  # fmt: skip
        endpoints.append(made)
        return made

    try:
        wait_for(lambda: "relay listening on port" in log_path.read_text(), 60, "the relay")
        password = password_file.read_text().strip()
        trainer = endpoint("trainers", password, "TLS")
        trainer.notify(groups={"trainers": -1})
        endpoint("workers", "a-wrong-password-of-some-length", "TLS").produce("stranger", "trainers")
        endpoint("workers", password, None).produce("no TLS", "trainers")  # right password, in clear
        endpoint("workers", password, "TLS").produce("friend", "trainers")
        received: list = []
        deadline = time.monotonic() + 30
        while "friend" not in received and time.monotonic() < deadline:
            received += trainer.receive_all(blocking=False)
            trainer.notify(groups={"trainers": -1})
            time.sleep(0.2)
        time.sleep(3)  # time for anything else to arrive
        received += trainer.receive_all(blocking=False)
        assert received == ["friend"]
        assert "relay listening on port" in log_path.read_text() and "(TLS)" in log_path.read_text()
        assert password not in log_path.read_text()
    finally:
        for made in endpoints:
            made.stop()
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0


def test_a_trainer_with_demonstrations_keeps_them_apart_from_the_workers_episodes(tmp_path):
    from test_demos import episode

    from demos import DemoWriter

    writer = DemoWriter(tmp_path / "demos" / "laps", "embedded", "scripted")
    writer.write(episode(25, seed=1))
    args = env_tm.parse_args(
        ["--role", "trainer", "--no-wandb", "--checkpoint-root", str(tmp_path), "--run-name", "t", *FAST_SETS,
         "--demos", "laps", "--demo-root", str(tmp_path / "demos")]
    )  # fmt: skip
    trainer = session.Session(args, "trainer", "inline")
    try:
        replay = trainer.learner.engine.replay
        remote = distributed.RemoteEpisodes(trainer)
        compressor = distributed.EpisodeCompressor("A", trainer.config)
        stored, _ = remote.ingest(
            worker_episode(compressor, 10, episode=0, length=12, action_rows=[1], end="terminated")
        )
        assert stored and replay.transitions_added == 12 and trainer.run.step == 12, (
            "the worker's steps: its own"
        )
        assert len(replay.demos) == 25, "the demonstrations stay apart, untouched by the workers' data"
    finally:
        trainer.close()


def test_a_worker_with_other_state_floats_is_rejected_whole(trainer_session):
    other = Config().with_assignments([*FAST, "previous_actions=2"])
    compressor = distributed.EpisodeCompressor("B", other)
    samples = worker_episode(compressor, 10, episode=0, length=5, action_rows=[1], end="terminated")
    remote = distributed.RemoteEpisodes(trainer_session)
    stored, _ = remote.ingest(samples)
    assert not stored and remote.rejected == 1 and trainer_session.run.step == 0


def test_workers_started_alike_get_distinct_seeds_from_their_names():
    import env_tm

    names = [f"gamepc-{n}" for n in range(200)]
    seeds = [distributed.worker_seed(name) for name in names]
    assert len(set(seeds)) >= 195 and all(0 <= seed < 3_999 for seed in seeds)  # crc32: rare collisions only
    assert distributed.worker_seed("gamepc-1") == distributed.worker_seed("gamepc-1")  # stable across starts
    assert not env_tm.parse_args(["--role", "worker"]).seed_given
    given = env_tm.parse_args(["--role", "worker", "--seed", "5"])
    assert given.seed_given and given.seed == 5
    assert env_tm.parse_args([]).seed == 0  # a single PC's default is unchanged
