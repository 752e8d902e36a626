"""What every part of the TrackMania path shares: its errors and how they travel, the game settings pinned
for tmrl that more than one part reads, and the advice messages end with.

- the errors: `TrackManiaError` and its three kinds (set-up, a game that stopped answering, implausible
  telemetry), every message one line (`one_line_message`);
- `InterfaceErrors`: where the checks that run inside rtgym's worker thread (the telemetry guard of
  tm_telemetry.py, tmrl's interface wrapped by trackmania.py) leave their error for the calling thread, which
  raises it (trackmania.py's watchdog);
- the game window's size and tmrl's reward settings: tm_setup.py pins them in config.json, the telemetry
  guard and the env read them;
- `GAME_CHECKS` and `INSTALL_HINT`: what to check or install, ending the set-up's and the watchdog's
  messages alike.

The lowest of the TrackMania modules: tm_game < tm_telemetry < tm_setup < trackmania (tm_logs stands apart).
Nothing here imports tmrl.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import threading
from collections.abc import Iterator

# --- pinned environment settings (tmrl's defaults for its screenshot pipeline) --------------------------
WINDOW_WIDTH = 256  # tmrl resizes the game window to 256x128 before capturing it
WINDOW_HEIGHT = 128
REWARD_CONFIG = {
    "END_OF_TRACK": 100.0,
    "CONSTANT_PENALTY": 0.0,
    "CHECK_FORWARD": 500,
    "CHECK_BACKWARD": 10,
    "FAILURE_COUNTDOWN": 10,
    "MIN_STEPS": 70,
    "MAX_STRAY": 100.0,
}

GAME_CHECKS = (
    "check that TrackMania is running with a map loaded, that its window is visible, not minimised and in "
    f"windowed mode (tmrl resizes it to {WINDOW_WIDTH}x{WINDOW_HEIGHT}), and that the OpenPlanet plugin "
    "'TMRL Grab Data' is loaded "
    "(F3 > Developer > (Re)load plugin > TMRL Grab Data)"
)
INSTALL_HINT = (
    "on the Windows PC with TrackMania run `pip install tmrl==0.7.1` then `python -m tmrl --install`, "
    "and load the OpenPlanet plugin 'TMRL Grab Data'"
)


class TrackManiaError(RuntimeError):
    """Base of the errors below; every message is one line. `condemned_steps`: how many of the steps
    already returned were part of the fault (a frozen stream is seen only after a few of them)."""

    condemned_steps = 0


class TrackManiaSetupError(TrackManiaError):
    """tmrl, TmrlData or config.json is missing or does not match rainbow-tm's pinned settings."""


class GameNotRespondingError(TrackManiaError):
    """The game, its window or the OpenPlanet plugin stopped answering."""


class TelemetryError(TrackManiaError):
    """The plugin's telemetry is implausible: a plugin of another version, or a misaligned data stream."""


def one_line_message(text: str) -> str:
    return " ".join(str(text).split())


def installed_tmrl_version() -> str:
    try:
        return "tmrl " + importlib.metadata.version("tmrl")
    except importlib.metadata.PackageNotFoundError:
        return "the installed tmrl"


class InterfaceErrors:
    """The first exception raised by tmrl's interface inside rtgym's worker thread, or None.

    Our own checks in that thread (telemetry, map) record their error here without raising it there: the
    calling thread raises it (trackmania.py's `_bounded_call`), so rtgym's thread neither dies nor hangs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.first: tuple[str, BaseException] | None = None

    def record(self, where: str, error: BaseException) -> None:
        with self._lock:
            if self.first is None:
                self.first = (where, error)

    @contextlib.contextmanager
    def recording(self, where: str) -> Iterator[None]:
        try:
            yield
        except BaseException as error:
            self.record(where, error)
            raise
