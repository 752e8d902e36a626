"""tm_game.py: the TrackMania errors, and how an error raised in rtgym's worker thread reaches the caller."""

from __future__ import annotations

import threading

import pytest

from tm_game import (
    GameNotRespondingError,
    InterfaceErrors,
    TelemetryError,
    TrackManiaError,
    TrackManiaSetupError,
    one_line_message,
)


def test_every_kind_of_trackmania_error_is_one_and_condemns_no_step_unless_told() -> None:
    for kind in (TrackManiaSetupError, GameNotRespondingError, TelemetryError):
        error = kind("x")
        assert isinstance(error, TrackManiaError) and isinstance(error, RuntimeError)
        assert error.condemned_steps == 0
    assert one_line_message("tmrl failed\n  Traceback:\tline 1 \n") == "tmrl failed Traceback: line 1"


def test_the_first_error_of_the_worker_thread_is_kept_and_still_raised_there() -> None:
    errors = InterfaceErrors()
    assert errors.first is None
    first, second = ValueError("first"), KeyError("second")

    def worker() -> None:
        with pytest.raises(ValueError), errors.recording("capturing an observation"):
            raise first

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    errors.record("checking the telemetry", second)  # a later error does not hide the cause
    assert errors.first == ("capturing an observation", first)
