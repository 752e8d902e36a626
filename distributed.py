"""Scale out: several game PCs feeding one learner, through tmrl's own networking.

    python env_tm.py --role server                        # the relay: the machine the others reach
    python env_tm.py --role trainer --server-ip HOST      # learns (the GPU machine), checkpoints, W&B
    python env_tm.py --role worker --server-ip HOST       # one per game (TrackMania, or the embedded track)

tmrl is the engine: its `Server` (a tlspyo relay), its `TrainerInterface` and its `RolloutWorker` move the
samples and the weights. What is ours:

- The worker's policy is `RainbowActor`, a tmrl `ActorModule` around our agent: it acts as the single-PC
  loop does (epsilon from the global step the trainer reports plus the worker's steps since, noise redrawn
  every step as a learn step would), and it turns the action index into tmrl's [gas, brake, steer].
- A worker sends one whole episode per message (`EpisodeCompressor`: the first sample carries the four
  frames of the reset, the others only the newest frame), and the trainer puts one episode at a time into
  the PER replay, so frames of two workers never meet in one stack. tmrl's own memory (uniform sampling,
  no priorities) is not used: the trainer samples with our priorities and writes them back after each step.
- The replay ratio stays the pinned one learn step per environment step across all workers. The learner is
  throttled: it never learns ahead of the data received. The workers are throttled too, at episode ends
  only (a real-time game cannot pause mid-episode): while the trainer is more than one episode behind, the
  weights it broadcasts say `pause` and the workers wait before their next episode.
- Security: the relay listens on the network. It refuses tmrl's placeholder password and weak ones, makes
  a random one on its first run (stored in a file the user copies to the other machines), supports TLS
  with the user's certificate, and never prints or logs the password.

One concept at ~700 lines: the relay, the trainer and the workers share one wire format, one password rule
and one broadcast, read in one file.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import multiprocessing
import os
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cli import EXIT_INTERRUPTED, EXIT_OK
from console import StepLatency, StopRequest
from environment import build_environment, checked_reward, choose_environment, split_observation
from health import FATAL_FLAGS, EpisodeResult
from learner import ActingPolicy
from rainbow import ACTION_VECTORS, resolve_device
from session import Session, TrainResult
from tm_config import Config
from tm_game import TrackManiaSetupError
from tm_setup import import_tmrl_module, load_tmrl_config, tmrl_data_folder

DEFAULT_PORT = 55555  # tmrl's default relay port
HEADER_SIZE = 12  # tlspyo message header; every role must use the same
TMRL_PLACEHOLDER_PASSWORD = "==>TMRL@UseASecurePasswordHere!<=="  # tmrl's config.json default
MIN_PASSWORD_LENGTH = 16
POLL_SECONDS = 0.02


class NetworkSetupError(RuntimeError):
    """A role cannot start (password, TLS files, TmrlData, address); the message is one line."""


def default_password_file() -> Path:
    return Path.home() / ".rainbow-tm" / "relay-password.txt"


# --- security ----------------------------------------------------------------------------------------
def relay_password(path: Path, create: bool) -> tuple[str, bool]:
    """The relay password from `path`, and whether it was just created (the server creates it on its first
    run; a trainer or worker needs a copy of the server's file)."""
    if not path.exists():
        if not create:
            raise NetworkSetupError(
                f"no relay password file at {path}: copy the file the server created (its path is printed "
                "when the server starts) to this path, or give its location with --password-file"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        password = secrets.token_urlsafe(32)
        # Created readable by the owner only (the mode is ignored on Windows, where the home folder is
        # private to the user already).
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(password + "\n")
        return password, True
    try:
        password = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise NetworkSetupError(f"cannot read the relay password file {path}: {error}") from None
    check_password(password, path)
    return password, False


def check_password(password: str, source: Path | str) -> None:
    """Refuse tmrl's placeholder and passwords a stranger could guess (the relay unpickles what it gets)."""
    if password == TMRL_PLACEHOLDER_PASSWORD:
        raise NetworkSetupError(
            f"{source} holds tmrl's placeholder password, which anyone can look up: delete the file, start "
            "the server to generate a random one"
        )
    if len(password) < MIN_PASSWORD_LENGTH or password.isspace():
        raise NetworkSetupError(
            f"the relay password in {source} is too weak (fewer than {MIN_PASSWORD_LENGTH} characters): "
            "delete the file and start the server to generate a random one"
        )


@dataclass(frozen=True)
class Connection:
    """How every role reaches the relay. `security` is tlspyo's: None (TCP, password only) or "TLS"."""

    server_ip: str
    port: int
    password: str
    security: str | None
    keys_dir: str | None
    hostname: str

    def endpoint_arguments(self) -> dict[str, Any]:
        """The arguments tmrl's TrainerInterface and RolloutWorker share for reaching the relay."""
        return {
            "server_ip": self.server_ip,
            "server_port": self.port,
            "password": self.password,
            "header_size": HEADER_SIZE,
            "security": self.security,
            "keys_dir": self.keys_dir,
            "hostname": self.hostname,
        }

    def __repr__(self) -> str:  # never print the password, not even in a traceback
        return f"Connection({self.server_ip}:{self.port}, security={self.security or 'TCP'})"


def connection_from_args(args: argparse.Namespace, role: str) -> tuple[Connection, str]:
    """The connection settings of `role`, and a line for the user about the password and TLS."""
    path = Path(args.password_file) if args.password_file else default_password_file()
    password, created = relay_password(path, create=role == "server")
    note = (
        f"generated a random relay password in {path}: copy this file to the trainer and worker machines "
        "(same path, or --password-file)"
        if created
        else f"relay password read from {path}"
    )
    security, keys_dir = None, None
    if args.tls:
        keys_dir = Path(args.tls_dir) if args.tls_dir else None
        folder = keys_dir or _tlspyo_default_keys_folder()
        needed = ["certificate.pem"] + (["key.pem"] if role == "server" else [])
        missing = [name for name in needed if not (folder / name).is_file()]
        if missing:
            raise NetworkSetupError(
                f"--tls: {', '.join(missing)} missing in {folder}: make a key and certificate on the server "
                "with `python env_tm.py --make-tls-credentials --tls-dir FOLDER`, copy certificate.pem "
                "(never key.pem) to the other machines, and point --tls-dir at it"
            )
        security = "TLS"
        note += f"; TLS with the certificate in {folder}"
    else:
        note += "; no TLS (the password is sent in clear: use --tls beyond a private network)"
    keys = str(keys_dir) if keys_dir else None
    return Connection(args.server_ip, args.port, password, security, keys, args.tls_hostname), note


def make_tls_credentials(folder: Path, hostname: str) -> tuple[Path, Path]:
    """A private key and a self-signed certificate for `hostname`, as tlspyo reads them (key.pem and
    certificate.pem). tlspyo's own generator (`python -m tlspyo --generate`) fails with pyOpenSSL >= 24,
    whose X509 lost `add_extensions`; this uses `cryptography`, which pyOpenSSL is built on."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key_path, certificate_path = folder / "key.pem", folder / "certificate.pem"
    existing = [path for path in (key_path, certificate_path) if path.exists()]
    if existing:
        raise NetworkSetupError(f"{existing[0]} exists already: delete it to make new credentials")
    folder.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=5 * 365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(key_bytes)
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, certificate_path


def _tlspyo_default_keys_folder() -> Path:
    from tlspyo.credentials import DEFAULT_KEYS_FOLDER

    return Path(DEFAULT_KEYS_FOLDER)


def free_local_port() -> int:
    """A free port for tlspyo's loopback link between a role and its networking process, so several roles
    can run on one machine (tmrl's config.json has one fixed port per role)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def import_tmrl_networking() -> Any:
    """tmrl.networking, once TmrlData/config/config.json is known to exist (tmrl reads it on import, and
    without it downloads its resources)."""
    folder = tmrl_data_folder()
    if not folder.is_dir():
        raise NetworkSetupError(
            f"no TmrlData folder at {folder}: tmrl needs it even on a trainer or relay machine; run "
            "`python -m tmrl --install` once (or copy the folder from a game PC)"
        )
    try:
        load_tmrl_config(folder)
        return import_tmrl_module("tmrl.networking")
    except TrackManiaSetupError as error:
        raise NetworkSetupError(str(error)) from None


def stop_endpoint(owner: Any, attribute: str, timeout: float = 15.0) -> None:
    """Stop the tlspyo endpoint or relay that tmrl keeps in a private attribute: its networking process and
    reader thread would otherwise keep our process alive after the role has finished."""
    endpoint = getattr(owner, attribute, None)
    if endpoint is None:
        return
    stopper = threading.Thread(target=endpoint.stop, daemon=True)
    stopper.start()
    stopper.join(timeout)
    if stopper.is_alive():  # the networking process is stuck: end it rather than hang
        for child in multiprocessing.active_children():
            child.terminate()


# --- what travels: actions, episodes, weights ---------------------------------------------------------
def action_index(action: Any) -> int | None:
    """The row of the action table a worker applied, or None for anything else."""
    vector = np.asarray(action, dtype=np.float32).reshape(-1)
    if vector.shape != (3,):
        return None
    matches = np.flatnonzero(np.all(np.abs(ACTION_VECTORS - vector) < 1e-6, axis=1))
    return int(matches[0]) if len(matches) else None


class EpisodeCompressor:
    """tmrl's `sample_compressor` on the worker: what is sent per step. The first sample of an episode (the
    reset) carries the four stacked frames, the others only the newest one (4 KiB a step instead of 16),
    with the car floats and which worker and episode it belongs to."""

    def __init__(self, worker: str, config: Config, seed: int | None = None) -> None:
        self.worker, self.config, self.seed = worker, config, seed
        self.episode = 0
        self.first = True

    def start_episode(self, episode: int) -> None:
        self.episode, self.first = episode, True

    def __call__(
        self, act: Any, obs: Any, rew: float, terminated: bool, truncated: bool, info: dict
    ) -> tuple:
        frames, car = split_observation(obs, self.config)
        first, self.first = self.first, False
        images = frames if first else frames[-1:]
        tag = {"worker": self.worker, "episode": self.episode, "first": first}
        if first:  # the trainer warns about two workers with one seed
            tag["seed"] = self.seed
        return act, (car, np.ascontiguousarray(images)), float(rew), bool(terminated), bool(truncated), tag


def split_episodes(samples: list[tuple]) -> list[list[tuple]]:
    """Samples received (whole episodes from several workers, concatenated) -> one list per episode."""
    episodes: dict[tuple[str, int], list[tuple]] = {}
    for sample in samples:
        tag = sample[5] if len(sample) == 6 and isinstance(sample[5], dict) else {}
        key = (str(tag.get("worker")), int(tag.get("episode", -1)))
        if tag.get("first"):
            episodes[key] = []
        episodes.setdefault(key, []).append(sample)
    return list(episodes.values())


@dataclass
class Broadcast:
    """What the trainer sends the workers with the weights: tmrl calls `save` and ships the file."""

    state: dict[str, Any]

    def save(self, path: Any) -> None:
        torch.save(self.state, path)


class RainbowActor:
    """The worker's policy for tmrl's RolloutWorker: our agent, acting as in the single-PC loop."""

    def __init__(
        self, observation_space: Any, action_space: Any, config: Config, seed: int, device: str
    ) -> None:
        self.observation_space, self.action_space = observation_space, action_space
        self.config = config
        # acts exactly as the single-PC actor beside its learner
        self.actor = ActingPolicy.new(config, seed, device)
        self.agent = self.actor.agent
        self.trainer_step: int | None = None  # the global step of the last weights received
        self.learn_steps = 0
        self.pause = False
        self.done = False
        self.steps_since_weights = 0
        self.weights_received = 0
        self.latency = StepLatency(config.time_step_duration)

    @property
    def global_step(self) -> int:
        return (self.trainer_step or 0) + self.steps_since_weights

    def act_(self, obs: Any, test: bool = False) -> np.ndarray:
        start = time.perf_counter()
        frames, car = split_observation(obs, self.config)
        if test:
            index = self.agent.greedy_action(frames, car)
        else:
            index = self.actor.act(frames, car, self.global_step)
            self.steps_since_weights += 1
        action = ACTION_VECTORS[index].copy()
        self.latency.add(time.perf_counter() - start)
        return action

    act = act_

    def to_device(self, device: Any) -> RainbowActor:
        return self

    def save(self, path: Any) -> None:  # tmrl's interface; the trainer's Broadcast is what is saved
        raise NotImplementedError("workers do not send weights")

    def load(self, path: Any, device: Any) -> RainbowActor:
        state = torch.load(path, map_location=self.agent.device, weights_only=True)
        self.agent.online.load_state_dict(state["online"])
        self.trainer_step = int(state["step"])
        self.learn_steps = int(state["learn_steps"])
        self.pause, self.done = bool(state["pause"]), bool(state["done"])
        self.steps_since_weights = 0
        self.weights_received += 1
        return self

    def checksum(self) -> float:
        return float(sum(p.detach().double().sum() for p in self.agent.online.parameters()))


# --- roles ---------------------------------------------------------------------------------------------
def run_server(args: argparse.Namespace) -> int:
    connection, note = connection_from_args(args, "server")
    networking = import_tmrl_networking()
    print(note, flush=True)
    stop = StopRequest("stopping the relay")
    stop.install()
    server = networking.Server(
        port=connection.port,
        password=connection.password,
        local_port=free_local_port(),
        header_size=HEADER_SIZE,
        security=connection.security,
        keys_dir=connection.keys_dir,
        max_workers=args.max_workers,
    )
    print(
        f"relay listening on port {connection.port} ({connection.security or 'TCP'}); open this TCP port "
        "in the firewall for the trainer and worker machines; Ctrl+C stops it",
        flush=True,
    )
    try:
        while not stop.requested:
            time.sleep(0.2)
    finally:
        stop.uninstall()
        stop_endpoint(server, "_Server__relay")
    print("relay stopped", flush=True)
    return EXIT_OK


def worker_seed(name: str) -> int:
    """A worker's default seed, from its name: two workers started alike (no --seed) still explore and, on
    the embedded track, drive different tracks. Below 3,999, where training track seeds stay distinct."""
    return zlib.crc32(name.encode("utf-8")) % 3_999


def run_worker(args: argparse.Namespace) -> int:
    config = Config().with_assignments(args.overrides)
    connection, note = connection_from_args(args, "worker")
    networking = import_tmrl_networking()
    env_name = choose_environment(args.env, config)
    name = args.worker_name or f"{socket.gethostname()}-{os.getpid()}"
    device = resolve_device(args.device)
    if device.type == "cpu":  # one action at a time: more threads only take cores from the game
        torch.set_num_threads(args.threads or 1)
    seed = args.seed if getattr(args, "seed_given", True) else worker_seed(name)
    compressor = EpisodeCompressor(name, config, seed)
    weights_dir = Path(tempfile.mkdtemp(prefix="rainbow-tm-worker-"))
    print(f"worker {name} on {env_name}, seed {seed}; {note}", flush=True)
    worker = networking.RolloutWorker(
        env_cls=functools.partial(build_environment, env_name, config, seed),
        actor_module_cls=functools.partial(RainbowActor, config=config, seed=seed, device=str(device)),
        sample_compressor=compressor,
        device=str(device),
        max_samples_per_episode=config.ep_max_length,
        model_path=str(weights_dir / "weights.tmod"),
        model_history=0,
        local_port=free_local_port(),
        **connection.endpoint_arguments(),
    )
    stop = StopRequest("stopping after this episode (Ctrl+C again to stop at once)")
    stop.install()
    episodes, steps, waited = 0, 0, 0.0

    def receive_weights(wait_while: Any) -> None:
        """Take the newest weights; keep polling while `wait_while()` holds (never mid-episode)."""
        nonlocal waited
        start, last_note = time.perf_counter(), time.perf_counter()
        before = worker.actor.weights_received
        worker.update_actor_weights(verbose=False, blocking=False)
        while wait_while() and not worker.actor.done and not stop.requested:
            time.sleep(POLL_SECONDS)
            worker.update_actor_weights(verbose=False, blocking=False)
            if time.perf_counter() - last_note > 30:
                print(
                    f"worker {name}: nothing from the trainer via {connection.server_ip}:{connection.port} "
                    "yet: is it running, and do this machine's password file and --tls settings match the "
                    "server's? (a wrong password is dropped silently by the relay)",
                    flush=True,
                )
                last_note = time.perf_counter()
        waited += time.perf_counter() - start
        if worker.actor.weights_received > before:
            print(
                f"worker {name}: weights of learn step {worker.actor.learn_steps:,} (global step "
                f"{worker.actor.trainer_step:,}), checksum {worker.actor.checksum():.6f}",
                flush=True,
            )

    try:
        receive_weights(lambda: worker.actor.trainer_step is None)  # epsilon needs the global step
        while not stop.requested and not worker.actor.done:
            compressor.start_episode(episodes)
            worker.collect_train_episode(config.ep_max_length)
            episode_return, length = worker.buffer.stat_train_return, worker.buffer.stat_train_steps
            latency = worker.actor.latency.take_episode()
            episode_latency = (
                f"p99 {latency['agent_ms_p99']:.2f} ms, {latency['time_step_overruns']} over the time step"
                if latency
                else "not timed"
            )
            worker.send_and_clear_buffer()
            episodes += 1
            steps += length
            print(
                f"worker {name}: episode {episodes} sent ({length} steps, return {episode_return:.1f}, "
                f"global step ~{worker.actor.global_step:,}); act {episode_latency}",
                flush=True,
            )
            receive_weights(lambda: worker.actor.pause)
    finally:
        stop.uninstall()
        with contextlib.suppress(Exception):
            worker.env.close()
        stop_endpoint(worker, "_RolloutWorker__endpoint")
        shutil.rmtree(weights_dir, ignore_errors=True)
    reason = "the trainer finished" if worker.actor.done else "stopped on request"
    print(
        f"worker {name}: {reason}; {episodes} episodes, {steps} steps sent, {worker.actor.weights_received} "
        f"weight updates, {waited:.1f} s waiting for the trainer; {worker.actor.latency.summary()}",
        flush=True,
    )
    return EXIT_OK if worker.actor.done or not stop.requested else EXIT_INTERRUPTED


class RemoteEpisodes:
    """The trainer's side of the samples: whole episodes into the replay, one at a time."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.rejected = 0
        self.discarded_after_end = 0
        self.steps_by_worker: dict[str, int] = {}
        self.seed_of: dict[str, int] = {}

    def take(self, samples: list[tuple]) -> list:
        """Store what the relay delivered (whole episodes, concatenated); a periodic checkpoint when an
        episode makes one due, after learning every due step first, so that it holds the agent, optimizer,
        replay and counters of one caught-up moment, as on one PC. Returns the red flags raised."""
        session, flags = self.session, []
        for episode in split_episodes(samples):
            stored, episode_flags = self.ingest(episode)
            flags += episode_flags
            if stored and session.checkpoint_due():
                flags += session.absorb(session.learner.sync())
                if not any(flag.name in FATAL_FLAGS for flag in flags):  # never a failure's checkpoint
                    session.save(is_periodic=True)
        return flags

    def note_seed(self, worker: str, seed: Any) -> None:
        """Warn once when a new worker runs with another worker's seed: the two draw the same exploration
        (on the embedded track, the same tracks: identical episodes from identical weights)."""
        if seed is None or worker in self.seed_of:
            return
        twins = sorted(name for name, other in self.seed_of.items() if other == seed)
        self.seed_of[worker] = int(seed)
        if twins:
            message = (
                f"workers {', '.join(twins)} and {worker} run with the same seed {seed}: they explore alike "
                "and send near-identical episodes; give each its own --seed, or none (a worker then takes "
                "one from its name)"
            )
            self.session.progress.message(message)
            self.session.log.write(
                "event", self.session.run.step, level="warning", name="workers_share_a_seed", message=message
            )

    def check(self, episode: list[tuple]) -> str | None:
        """Why an episode cannot be stored, or None."""
        config = self.session.config
        first = episode[0]
        if not (len(first) == 6 and isinstance(first[5], dict) and first[5].get("first")):
            return "it does not start with a reset sample"
        car, frames = first[1]
        if np.shape(frames) != (config.conv_input, config.img_y, config.img_x):
            return f"its first frames have shape {np.shape(frames)}"
        cars = [car] + [sample[1][0] for sample in episode[1:]]
        if any(np.shape(c) != (config.state_floats,) for c in cars):
            return (
                f"its state floats are not {config.state_floats} (a worker with another previous_actions "
                "than the trainer's)"
            )
        for sample in episode[1:]:
            if action_index(sample[0]) is None:
                return f"action {np.asarray(sample[0]).tolist()} is not in the action table"
            if np.shape(sample[1][1]) != (1, config.img_y, config.img_x):
                return f"a frame has shape {np.shape(sample[1][1])}"
        return None

    def ingest(self, episode: list[tuple]) -> tuple[bool, list]:
        """Store one episode; returns whether it was stored, and the red flags raised on the way."""
        session = self.session
        worker = str(episode[0][5].get("worker"))
        if session.run.step >= session.total_steps:
            self.discarded_after_end += len(episode) - 1
            return False, []
        problem = self.check(episode) if len(episode) > 1 else "it has no step"
        if problem is not None:
            self.rejected += 1
            message = f"episode from worker {worker} rejected: {problem}"
            session.progress.message(message)
            session.log.write(
                "event", session.run.step, level="warning", name="episode_rejected", message=message
            )
            return False, []
        self.note_seed(worker, episode[0][5].get("seed"))
        car, frames = episode[0][1]
        session.start_episode(np.asarray(frames, dtype=np.uint8), np.asarray(car, dtype=np.float32))
        stack = np.array(frames, dtype=np.uint8)
        flags, total, terminated = [], 0.0, False
        for position, (act, (car, image), reward, terminated, truncated, _) in enumerate(
            episode[1:], start=1
        ):
            last = position == len(episode) - 1
            truncated = bool(truncated) or (last and not terminated)  # a cut-off episode is not terminal
            reward = checked_reward(reward, session.run.step)
            frame = np.asarray(image, dtype=np.uint8)[-1]
            stack = np.concatenate([stack[1:], frame[None]])
            car = np.asarray(car, dtype=np.float32)
            flags += session.store_step(action_index(act), reward, bool(terminated), truncated, stack, car)
            total += reward
        length = len(episode) - 1
        self.steps_by_worker[worker] = self.steps_by_worker.get(worker, 0) + length
        flags += session.end_episode(EpisodeResult(total, length, bool(terminated), 0.0), worker=worker)
        return True, flags


def run_trainer(args: argparse.Namespace) -> TrainResult:
    if args.eval_every:
        raise NetworkSetupError("--eval-every runs on a single PC: evaluate a trainer's checkpoints there")
    connection, note = connection_from_args(args, "trainer")
    networking = import_tmrl_networking()
    session = Session(args, "trainer", "inline")  # the workers are its actors: it only learns
    session.progress.message(note)
    config, progress, log = session.config, session.progress, session.log
    engine = session.learner.engine  # inline: the engine itself, in this process
    agent = engine.agent
    interface = networking.TrainerInterface(
        local_com_port=free_local_port(),
        model_path=str(session.run_dir / "broadcast.tmod"),
        **connection.endpoint_arguments(),
    )
    remote = RemoteEpisodes(session)
    max_backlog = config.ep_max_length  # the workers pause while the learner is more than an episode behind

    def learn_target() -> int:  # as on one PC: one learn step per env step once a batch is stored
        return engine.learn_target

    def backlog() -> int:
        return learn_target() - agent.learn_steps

    def broadcast(done: bool = False) -> None:
        state = {
            "online": {k: v.detach().cpu() for k, v in agent.online.state_dict().items()},
            "step": session.run.step,
            "learn_steps": agent.learn_steps,
            "pause": backlog() > max_backlog,
            "done": done,
        }
        interface.broadcast_model(Broadcast(state))

    stop = StopRequest()
    stop.install()
    progress.message(
        f"trainer connected to the relay at {connection.server_ip}:{connection.port}; waiting for workers"
    )
    try:
        broadcast()
        last_broadcast_step, was_paused = agent.learn_steps, False
        while not stop.requested:
            flags = remote.take(interface.retrieve_buffer().memory)
            if agent.learn_steps < learn_target():
                flags += session.learn()
            if flags and session.handle(flags):
                last_broadcast_step = -1  # rolled back: tell the workers at once
            caught_up = agent.learn_steps >= learn_target()
            paused = backlog() > max_backlog
            if (
                agent.learn_steps - last_broadcast_step >= session.runtime.broadcast_every_learn_steps
                or paused != was_paused
                or (caught_up and agent.learn_steps != last_broadcast_step)
            ):
                broadcast()
                last_broadcast_step, was_paused = agent.learn_steps, paused
            session.status(f"workers {len(remote.steps_by_worker)} | backlog {backlog()}")
            if session.run.step >= session.total_steps and caught_up:
                break
            if caught_up:
                time.sleep(POLL_SECONDS)
        broadcast(done=not stop.requested)
        saved = session.save(is_periodic=False)
        run = session.run
        ratio = agent.learn_steps / max(1, learn_target())
        summary = dict(
            episodes=run.episode,
            learn_steps=agent.learn_steps,
            replay_ratio=ratio,
            steps_by_worker=remote.steps_by_worker,
            rejected_episodes=remote.rejected,
            discarded_steps=remote.discarded_after_end,
        )
        if stop.requested:
            progress.message(f"trainer stopped at step {run.step:,} (on request): {saved}")
            log.write("run", run.step, event="interrupted", **summary)
            return TrainResult(EXIT_INTERRUPTED, session.run_dir, config)
        progress.message(
            f"trainer done: {run.step:,} steps from {len(remote.steps_by_worker)} workers, "
            f"{agent.learn_steps:,} learn steps (ratio {ratio:.3f}); {saved}"
        )
        log.write("run", run.step, event="finished", **summary)
        return TrainResult(EXIT_OK, session.run_dir, config)
    finally:
        stop.uninstall()
        session.close()
        stop_endpoint(interface, "_TrainerInterface__endpoint")


def run_role(args: argparse.Namespace) -> int:
    """Entry point of `env_tm.py --role server|trainer|worker` and `--make-tls-credentials`."""
    if args.make_tls_credentials:
        folder = Path(args.tls_dir) if args.tls_dir else _tlspyo_default_keys_folder()
        key, certificate = make_tls_credentials(folder, args.tls_hostname)
        print(
            f"made {key} (keep it on the server only) and {certificate} for the name {args.tls_hostname!r}; "
            f"copy {certificate.name} to the trainer and worker machines and run every role with --tls "
            f"--tls-dir <its folder>",
            flush=True,
        )
        return EXIT_OK
    if args.role == "server":
        return run_server(args)
    if args.role == "worker":
        return run_worker(args)
    return run_trainer(args).exit_code


if __name__ == "__main__":
    sys.exit("run the roles through env_tm.py: python env_tm.py --role server|trainer|worker")
