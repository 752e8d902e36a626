"""A fake TrackMania for the tests: every part of the game that tmrl touches, and no part of tmrl.

- `FakeOpenPlanet`: a loopback TCP server speaking the protocol of the OpenPlanet plugin "TMRL Grab Data".
  Like the plugin, it serves one client at a time and, while one is connected, sends a frame of 11
  little-endian float32 (speed, distance, x, y, z, steer, gas, brake, finished, gear, rpm) once per "game
  frame", whether or not the client reads; when the client leaves, it listens again. It can produce the
  faults of a real setup: frozen (connection kept, nothing sent: a hung game), `crash()` (the game process
  dies: connection reset, nobody listening), `slip()` (one byte lost or added once: a misaligned stream),
  `extra_floats` (a plugin of another version sending 12 floats), NaN or any other value through
  `set_state`, and `spawn` (where a respawn puts the car: far from the reward trajectory on a wrong map).
  And the plausible lies: `stick(finished=1.0)` (a field no respawn clears: a stuck finish flag),
  `repeat_frame()` (the plugin repeats one frame while the car drives on), `teleport(dx, seconds)` (the
  position jumps forward for a while), `pause()` (the game stops: the car, its telemetry and, with
  `FakeScreen.frozen`, its picture), and `frame_interval` (0.1: a plugin sending at 10 Hz).
- `slow_agent_steps`: an agent that thinks longer than a time-step between steps (rtgym times out).
- `FakeScreen`: the game window as tmrl's `WindowInterface` sees it; `screenshot()` returns BGRA uint8
  (height, width, 4) like the Windows capture, a picture that changes at every capture unless frozen.
- `ControlRecorder`: the keyboard, the mouse and (through a fake `vgamepad` module) the virtual gamepad;
  it records what tmrl sends, and pressing "respawn" puts the fake car back at the start.
- `write_tmrl_data`: a TmrlData folder (config.json with tmrl's documented defaults, reward trajectory).
- `install_fake_game`: points tmrl's module attributes at the fakes (tmrl must be imported first).
- `block_internet`: any connection beyond loopback raises.
- `SPAWN`: where the fault scenarios' map starts, as far from the origin as real maps are.
"""

from __future__ import annotations

import functools
import json
import pickle
import socket
import struct
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tm_game

FRAME = struct.Struct("<11f")
FIELDS = ("speed", "distance", "x", "y", "z", "steer", "gas", "brake", "finished", "gear", "rpm")
GAMEPAD_A = 0x1000  # the buttons tmrl presses (XUSB codes): A closes the finish pop-up, B respawns
GAMEPAD_B = 0x2000
# Where the fault scenarios' map starts (and their reward trajectory): real TrackMania coordinates are
# hundreds of metres from the origin, which is what makes every misaligned reading of a frame implausible.
SPAWN = (500.0, 9.0, 300.0)


class FakeOpenPlanet:
    """The telemetry server of the "TMRL Grab Data" plugin, on 127.0.0.1 and a free port."""

    def __init__(
        self,
        frame_interval: float = 0.005,
        *,
        spawn: tuple[float, float, float] = (0.0, 0.0, 0.0),
        extra_floats: tuple[float, ...] = (),
        **state: float,
    ) -> None:
        self.frame_interval = frame_interval  # 200 "game frames" per second
        self.spawn = spawn  # where a respawn puts the car (the start of the map that is loaded)
        # Floats sent after the 11 fields: a plugin of another version with more fields per frame.
        self.extra_floats = tuple(float(value) for value in extra_floats)
        self.state = dict.fromkeys(FIELDS, 0.0)
        self.set_state(gear=1.0, rpm=1000.0, **state)
        self.connections = 0
        self.frames_sent = 0
        self._lock = threading.Lock()
        self._slip: str | None = None
        self._sending = threading.Event()
        self._sending.set()
        self._closed = threading.Event()
        self._crashed = threading.Event()
        self._drive: tuple[float, float] | None = None  # (m/s, finish line along x) while the car drives
        self.stuck: dict[str, float] = {}  # fields sent as these values whatever the car does
        self.repeating: bytes | None = None  # a frame sent again and again instead of the live one
        self._teleport: tuple[float, float] | None = None  # (metres along x, until when)
        self.paused = False
        # After a respawn the game holds the car through its start countdown (tmrl waits 1.4-1.5 s for it).
        self.countdown = 1.3
        self._held_until = 0.0
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)  # lets close() stop the accept loop
        self.port: int = self._server.getsockname()[1]
        threading.Thread(target=self._serve, name="fake openplanet", daemon=True).start()

    def set_state(self, **fields: float) -> None:
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise KeyError(f"the plugin sends no {sorted(unknown)}")
        self.state.update({name: float(value) for name, value in fields.items()})

    def respawn(self) -> None:
        """What the game does when tmrl presses "respawn": the car is back, still, at the start (not in a
        paused game: nothing moves there)."""
        if self.paused:
            return
        x, y, z = self.spawn
        self.set_state(speed=0.0, distance=0.0, x=x, y=y, z=z, finished=0.0)
        self._held_until = time.monotonic() + self.countdown

    def drive(self, speed_mps: float, finish_x: float) -> None:
        """Physics along the straight trajectory: from each respawn the car runs along x at `speed_mps` and
        reports `finished` once past `finish_x` (where it stops), as a player holding the gas would."""
        self._drive = (float(speed_mps), float(finish_x))

    def stop_driving(self) -> None:
        self._drive = None

    def stick(self, **fields: float) -> None:
        """Send these values in every frame from now on, whatever the car does (a stuck field)."""
        self.stuck.update({name: float(value) for name, value in fields.items()})

    def repeat_frame(self) -> None:
        """The plugin repeats the frame it sends now, bit for bit, while the car drives on."""
        self.repeating = self.frame()

    def teleport(self, metres: float, seconds: float) -> None:
        """The position reads `metres` farther along x for `seconds`, then true again."""
        self._teleport = (float(metres), time.monotonic() + seconds)

    def pause(self) -> None:
        """The game pauses: the car stops where it is and the plugin keeps sending its frozen state."""
        self.paused = True

    def _advance(self, seconds: float) -> None:
        if (
            self._drive is None
            or self.state["finished"]
            or self.paused
            or time.monotonic() < self._held_until
        ):
            return
        speed, finish_x = self._drive
        step = speed * seconds
        self.state.update(
            x=self.state["x"] + step, distance=self.state["distance"] + step, speed=speed * 3.6, gear=3.0,
            rpm=6000.0, gas=1.0,
        )  # fmt: skip
        if self.state["x"] >= finish_x:
            self.state.update(finished=1.0, speed=0.0, gas=0.0)

    def freeze(self) -> None:
        self._sending.clear()

    def slip(self, kind: str = "drop") -> None:
        """Misalign the stream once: the next frame loses its first byte ("drop") or gets one more ("insert").

        Every frame after it is read across two of the plugin's frames, as after a lost or doubled byte.
        """
        if kind not in ("drop", "insert"):
            raise ValueError(f"a slip is 'drop' or 'insert', not {kind!r}")
        self._slip = kind

    def crash(self) -> None:
        """The game process dies: the connection is reset (not closed cleanly) and nothing listens anymore."""
        self._crashed.set()

    def frame(self) -> bytes:
        state = {**self.state, **self.stuck}
        if self._teleport is not None and time.monotonic() < self._teleport[1]:
            state["x"] += self._teleport[0]
        values = (*(state[name] for name in FIELDS), *self.extra_floats)
        return struct.pack(f"<{len(values)}f", *values)

    def close(self) -> None:
        self._closed.set()
        self._server.close()

    def _next_bytes(self) -> bytes:
        data = self.repeating if self.repeating is not None else self.frame()
        slip, self._slip = self._slip, None
        if slip == "drop":
            return data[1:]
        if slip == "insert":
            return b"\x00" + data
        return data

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            self.connections += 1
            last_advance = time.monotonic()
            with client:
                while not self._closed.is_set():
                    if self._crashed.is_set():
                        # A zero linger time makes close() send a reset, as when the OS reaps a dead process.
                        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        break
                    now = time.monotonic()
                    # The physics runs on the wall clock, as the game's does, however late this thread is.
                    elapsed, last_advance = now - last_advance, now
                    if self._sending.is_set():
                        self._advance(elapsed)
                        try:
                            client.sendall(self._next_bytes())
                            self.frames_sent += 1
                        except OSError:  # the client left: listen again, as the plugin does
                            break
                    time.sleep(self.frame_interval)
            if self._crashed.is_set():
                self.close()
                return


def slow_agent_steps(env: Any, steps: int, think_s: float, action: Any = (0.0, 0.0, 0.0)) -> list[tuple]:
    """Step `env` like an agent that needs `think_s` seconds per decision (longer than a time-step, rtgym
    then reports the step as timed out); returns what each step() returned."""
    results = []
    for _ in range(steps):
        time.sleep(think_s)
        results.append(env.step(list(action)))
    return results


class FakeScreen:
    """The game window; `window_interface_class()` gives the class that replaces tmrl's WindowInterface."""

    def __init__(self, follow: Any = None) -> None:
        # With `follow` (a function giving the car's true x in metres) the scenery moves with the car, as the
        # game's camera does, and only a small clock in a corner changes while the car stands still;
        # without it the whole picture moves at every capture.
        self.follow = follow
        self.frozen = False  # the same picture at every capture
        self.delay = 0.0  # seconds each capture takes (a PC too slow for 20 Hz)
        self.error: str | None = None  # the window is gone: captures raise like tmrl's Windows capture
        self.captures = 0
        self.window_names: list[str] = []
        self.resizes: list[tuple[int, int, int, int]] = []
        self.size = (0, 0)  # (width, height), set by move_and_resize
        self._last: np.ndarray | None = None  # the latest capture: a frozen screen returns it again

    def window_interface_class(self, default_width: int, default_height: int) -> type:
        screen = self

        class FakeWindowInterface:
            def __init__(self, window_name: str) -> None:
                screen.window_names.append(window_name)

            def move_and_resize(
                self, x: int = 1, y: int = 0, w: int = default_width, h: int = default_height
            ):
                screen.resizes.append((x, y, w, h))
                screen.size = (w, h)

            def screenshot(self) -> np.ndarray:
                return screen.capture()

        return FakeWindowInterface

    def capture(self) -> np.ndarray:
        if self.error is not None:
            raise AssertionError(self.error)
        if self.delay:
            time.sleep(self.delay)
        if self.frozen and self._last is not None and self._last.shape[:2] == self.size[::-1]:
            return self._last.copy()
        self.captures += 1
        width, height = self.size
        # Diagonal stripes that move at every capture (or with the car), so every downscaled grayscale frame
        # differs; with `follow`, a 16x16 clock in the corner ticks at every capture.
        shift = self.captures * 16 if self.follow is None else int(self.follow() * 16)
        stripes = (np.add.outer(np.arange(height), np.arange(width)) * 4 + shift) % 256
        if self.follow is not None:
            stripes[:16, :16] = (self.captures * 37) % 256
        image = np.empty((height, width, 4), dtype=np.uint8)
        image[..., 0] = stripes  # B
        image[..., 1] = 255 - stripes  # G
        image[..., 2] = stripes // 2  # R
        image[..., 3] = 255  # A
        self._last = image
        return image


class ControlRecorder:
    """The keyboard, mouse and virtual gamepad, recording every control tmrl sends as a tuple in `events`."""

    def __init__(self, on_respawn: Any = None) -> None:
        self.events: list[tuple] = []
        self.on_respawn = on_respawn

    def _respawn(self) -> None:
        if self.on_respawn is not None:
            self.on_respawn()

    # tmrl.custom.tm.utils.control_keyboard
    def apply_control(self, action: list[str], window_id: Any = None) -> None:
        self.events.append(("keys", sorted(action)))

    def keyres(self) -> None:
        self.events.append(("respawn key",))
        self._respawn()

    # tmrl.custom.tm.utils.control_mouse
    def mouse_close_finish_pop_up_tm20(self, small_window: bool = False) -> None:
        self.events.append(("click pop-up",))

    def vgamepad_module(self) -> types.ModuleType:
        """A stand-in for the `vgamepad` package, whose VX360Gamepad records into this recorder."""
        recorder = self

        class VX360Gamepad:
            def right_trigger_float(self, value_float: float) -> None:
                recorder.events.append(("right_trigger_float", float(value_float)))

            def left_trigger_float(self, value_float: float) -> None:
                recorder.events.append(("left_trigger_float", float(value_float)))

            def left_joystick_float(self, x_value_float: float, y_value_float: float) -> None:
                recorder.events.append(("left_joystick_float", float(x_value_float), float(y_value_float)))

            def press_button(self, button: int) -> None:
                recorder.events.append(("press_button", int(button)))
                if button == GAMEPAD_B:
                    recorder._respawn()

            def release_button(self, button: int) -> None:
                recorder.events.append(("release_button", int(button)))

            def reset(self) -> None:
                recorder.events.append(("reset",))

            def update(self) -> None:
                pass

        module = types.ModuleType("vgamepad")
        module.VX360Gamepad = VX360Gamepad
        return module


# tmrl's documented config.json (its reference guide) for the screenshot environment, with local-only
# networking and placeholder credentials.
TMRL_CONFIG: dict[str, Any] = {
    "RUN_NAME": "rainbow_tm_test",
    "RESET_TRAINING": False,
    "BUFFERS_MAXLEN": 500000,
    "RW_MAX_SAMPLES_PER_EPISODE": 1000,
    "CUDA_TRAINING": False,
    "CUDA_INFERENCE": False,
    "VIRTUAL_GAMEPAD": True,
    "LOCALHOST_WORKER": True,
    "LOCALHOST_TRAINER": True,
    "PUBLIC_IP_SERVER": "127.0.0.1",
    "PASSWORD": "not-a-secret",
    "TLS": False,
    "TLS_HOSTNAME": "default",
    "TLS_CREDENTIALS_DIRECTORY": "",
    "NB_WORKERS": -1,
    "WANDB_PROJECT": "tmrl",
    "WANDB_ENTITY": "tmrl",
    "WANDB_KEY": "tmrl-public-key",
    "PORT": 55555,
    "LOCAL_PORT_SERVER": 55556,
    "LOCAL_PORT_TRAINER": 55557,
    "LOCAL_PORT_WORKER": 55558,
    "BUFFER_SIZE": 536870912,
    "HEADER_SIZE": 12,
    "MAX_EPOCHS": 10000,
    "ROUNDS_PER_EPOCH": 100,
    "TRAINING_STEPS_PER_ROUND": 200,
    "MAX_TRAINING_STEPS_PER_ENVIRONMENT_STEP": 4.0,
    "ENVIRONMENT_STEPS_BEFORE_TRAINING": 1000,
    "UPDATE_MODEL_INTERVAL": 200,
    "UPDATE_BUFFER_INTERVAL": 200,
    "SAVE_MODEL_EVERY": 0,
    "MEMORY_SIZE": 1000000,
    "BATCH_SIZE": 256,
    "ALG": {
        "ALGORITHM": "SAC",
        "LEARN_ENTROPY_COEF": False,
        "LR_ACTOR": 0.00001,
        "LR_CRITIC": 0.00005,
        "LR_ENTROPY": 0.0003,
        "GAMMA": 0.995,
        "POLYAK": 0.995,
        "TARGET_ENTROPY": -0.5,
        "ALPHA": 0.01,
        "REDQ_N": 10,
        "REDQ_M": 2,
        "REDQ_Q_UPDATES_PER_POLICY_UPDATE": 20,
        "OPTIMIZER_ACTOR": "adam",
        "OPTIMIZER_CRITIC": "adam",
        "BETAS_ACTOR": [0.997, 0.997],
        "BETAS_CRITIC": [0.997, 0.997],
        "L2_ACTOR": 0.0,
        "L2_CRITIC": 0.0,
    },
    "ENV": {
        "RTGYM_INTERFACE": "TM20FULL",
        "WINDOW_WIDTH": 256,
        "WINDOW_HEIGHT": 128,
        "IMG_WIDTH": 64,
        "IMG_HEIGHT": 64,
        "IMG_GRAYSCALE": True,
        "SLEEP_TIME_AT_RESET": 1.5,
        "IMG_HIST_LEN": 4,
        "RTGYM_CONFIG": {
            "time_step_duration": 0.05,
            "start_obs_capture": 0.04,
            "time_step_timeout_factor": 1.0,
            "act_buf_len": 2,
            "benchmark": False,
            "wait_on_done": True,
            "ep_max_length": 1000,
            "interface_kwargs": {"save_replays": False},
        },
        "REWARD_CONFIG": dict(tm_game.REWARD_CONFIG),  # tmrl's documented defaults, as pinned
    },
    "__VERSION__": "0.6.0",
}


def reward_trajectory(
    length_m: float = 100.0, start: tuple[float, float, float] = (0.0, 0.0, 0.0)
) -> np.ndarray:
    """A straight track along x from `start`, as `python -m tmrl --record-reward` stores it: one point
    every 0.1 m."""
    points = np.zeros((int(round(length_m * 10)) + 1, 3))
    points[:, 0] = np.linspace(0.0, length_m, len(points))
    return points + np.asarray(start, dtype=np.float64)


def write_tmrl_data(
    home: Path,
    changes: dict[str, Any] | None = None,
    remove: tuple[str, ...] = (),
    reward: bool = True,
    trajectory_start: tuple[float, float, float] = (0.0, 0.0, 0.0),
    trajectory: np.ndarray | None = None,
) -> Path:
    """Create `home`/TmrlData as `python -m tmrl --install` would; `changes`/`remove` use dotted keys;
    `trajectory` replaces the straight 100 m reward trajectory."""
    values = json.loads(json.dumps(TMRL_CONFIG))
    for dotted, value in (changes or {}).items():
        *parents, last = dotted.split(".")
        tree = values
        for part in parents:
            tree = tree[part]
        tree[last] = value
    for dotted in remove:
        *parents, last = dotted.split(".")
        tree = values
        for part in parents:
            tree = tree[part]
        del tree[last]
    folder = home / "TmrlData"
    for sub in ("checkpoints", "config", "dataset", "reward", "weights"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "config" / "config.json").write_text(json.dumps(values, indent=2), encoding="utf-8")
    if reward:
        with (folder / "reward" / "reward.pkl").open("wb") as file:
            points = reward_trajectory(start=trajectory_start) if trajectory is None else trajectory
            pickle.dump(points, file)
    return folder


def install_fake_game(
    monkeypatch: pytest.MonkeyPatch, port: int, screen: FakeScreen, recorder: ControlRecorder
) -> None:
    """Point tmrl's TrackMania interface at the fakes; only the game is replaced, tmrl's code runs as is."""
    import tmrl.config.config_constants as cfg
    from tmrl.custom.tm import tm_gym_interfaces
    from tmrl.custom.tm.utils.tools import TM2020OpenPlanetClient

    window_class = screen.window_interface_class(cfg.WINDOW_WIDTH, cfg.WINDOW_HEIGHT)
    monkeypatch.setattr(tm_gym_interfaces, "WindowInterface", window_class)
    # tmrl's real client, connecting to the fake plugin's port instead of 9000.
    client = functools.partial(TM2020OpenPlanetClient, port=port)
    monkeypatch.setattr(tm_gym_interfaces, "TM2020OpenPlanetClient", client)
    monkeypatch.setattr(tm_gym_interfaces, "apply_control", recorder.apply_control)
    monkeypatch.setattr(tm_gym_interfaces, "keyres", recorder.keyres)
    monkeypatch.setattr(
        tm_gym_interfaces, "mouse_close_finish_pop_up_tm20", recorder.mouse_close_finish_pop_up_tm20
    )
    monkeypatch.setitem(sys.modules, "vgamepad", recorder.vgamepad_module())


_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def block_internet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every connection or name lookup beyond loopback raise, so a test cannot download anything."""

    def guarded(method: Any) -> Any:
        @functools.wraps(method)
        def connect(sock: socket.socket, address: Any, *args: Any) -> Any:
            if isinstance(address, tuple) and address[0] not in _LOOPBACK:
                raise OSError(f"tests must not use the network (tried {address})")
            return method(sock, address, *args)

        return connect

    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in _LOOPBACK and host is not None:
            raise OSError(f"tests must not use the network (tried to resolve {host})")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded(socket.socket.connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(socket.socket.connect_ex))
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
