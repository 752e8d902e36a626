"""tm_logs.py: tmrl's and rtgym's thread errors and logs go to the run's log file, never to the terminal."""

from __future__ import annotations

import logging
import re
import sys
import threading
from pathlib import Path

import pytest

import tm_logs


def test_thread_errors_go_to_the_log_file_not_the_terminal(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    log_path = tmp_path / "run" / "trackmania.log"
    default_hook = threading.excepthook
    uninstall = tm_logs.route_thread_errors(log_path)
    try:

        def client_thread() -> None:
            raise AssertionError("OpenPlanet stopped sending data since more than 10.0s.")

        thread = threading.Thread(target=client_thread, name="tmrl client")
        thread.start()
        thread.join()
    finally:
        uninstall()
    assert capfd.readouterr() == ("", "")
    text = log_path.read_text(encoding="utf-8")
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ERROR \[tmrl client\] ", text), text
    assert "uncaught exception in thread 'tmrl client'" in text
    assert "Traceback (most recent call last)" in text and "in client_thread" in text
    assert "AssertionError: OpenPlanet stopped sending data since more than 10.0s." in text
    assert threading.excepthook is default_hook  # uninstalled


def test_tmrl_and_rtgym_info_logs_go_to_the_file_when_they_would_reach_the_terminal(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    root = logging.getLogger()
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(logging.Formatter("%(name)s %(message)s"))
    old_level = root.level
    root.addHandler(terminal)
    root.setLevel(logging.DEBUG)
    log_path = tmp_path / "trackmania.log"
    tmrl_file = str(Path(importlib.util.find_spec("tmrl").origin).parent / "networking.py")
    # tmrl logs on the root logger (logging.info): its records are known by their file.
    tmrl_record = logging.LogRecord("root", logging.INFO, tmrl_file, 1, "tmrl says hello", None, None)
    try:
        uninstall = tm_logs.route_thread_errors(log_path)
        try:
            logging.getLogger("rtgym").info("rtgym info")
            logging.getLogger("rtgym").warning("rtgym warning")  # WARNING and above stay on the terminal
            root.handle(tmrl_record)
            logging.getLogger("the.app").info("our own info")  # not tmrl's: untouched
        finally:
            uninstall()
        logging.getLogger("rtgym").info("rtgym after uninstall")
    finally:
        root.removeHandler(terminal)
        root.setLevel(old_level)
    terminal_text = capfd.readouterr().err
    assert terminal_text.splitlines() == [
        "rtgym rtgym warning",
        "the.app our own info",
        "rtgym rtgym after uninstall",
    ]
    text = log_path.read_text(encoding="utf-8")
    assert "INFO [MainThread] rtgym: rtgym info" in text and "tmrl says hello" in text
    assert "warning" not in text and "our own" not in text


def test_nothing_is_logged_to_the_file_when_it_would_not_reach_the_terminal(tmp_path: Path) -> None:
    log_path = tmp_path / "trackmania.log"
    uninstall = tm_logs.route_thread_errors(log_path)
    try:
        logging.getLogger("rtgym").info("below the root's WARNING level: never printed anyway")
    finally:
        uninstall()
    assert not log_path.exists() or "never printed" not in log_path.read_text(encoding="utf-8")
