"""Thread errors and tmrl's and rtgym's logging, away from the terminal: `route_thread_errors`.

tmrl and rtgym run in threads of their own: when the game dies, tmrl's telemetry client and rtgym's worker
die with tracebacks that Python prints on the terminal, over the training loop's status line, while the env
raises its own one-line error in the calling thread (trackmania.py); and their `logging` records below
WARNING reach whatever terminal handler the application has. The training loop calls `route_thread_errors`
with its run folder's trackmania.log: all of that goes there instead.

Imports no other module of rainbow-tm, nor tmrl (its folder is located without importing it).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

_ROUTED_PACKAGES = ("tmrl", "rtgym")


class _QuietFileHandler(logging.FileHandler):
    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        pass  # a log file that cannot be written must not print its own traceback to the terminal either


@functools.cache
def _routed_package_dirs() -> tuple[str, ...]:
    # tmrl logs through the root logger (logging.info(...)), so its records are told by their file.
    # find_spec on a top-level package locates it without importing it.
    folders = []
    for name in _ROUTED_PACKAGES:
        spec = find_spec(name)
        for folder in (spec.submodule_search_locations or []) if spec is not None else []:
            folders.append(os.path.normcase(os.path.join(os.path.abspath(folder), "")))
    return tuple(folders)


def _from_routed_package(record: logging.LogRecord) -> bool:
    if record.name.split(".")[0] in _ROUTED_PACKAGES:
        return True
    path = os.path.normcase(os.path.abspath(record.pathname or ""))
    return any(path.startswith(folder) for folder in _routed_package_dirs())


def _writes_to_terminal(handler: logging.Handler) -> bool:
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return False
    stream = handler.stream
    if any(stream is std for std in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)):
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _reaches_terminal(logger: logging.Logger, level: int) -> bool:
    """Whether a record of `level` created on `logger` would be printed by a terminal handler."""
    current: logging.Logger | None = logger
    while current is not None:
        if any(_writes_to_terminal(h) and level >= h.level for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False  # logging's last-resort handler prints WARNING and above only


class _RouteBelowWarning(logging.Filter):
    """On a logger: tmrl/rtgym records below WARNING that would reach the terminal go to the file instead."""

    def __init__(self, logger: logging.Logger, handler: logging.Handler) -> None:
        super().__init__()
        self._logger = logger
        self._handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or not _from_routed_package(record):
            return True
        if not _reaches_terminal(self._logger, record.levelno):
            return True
        self._handler.handle(record)
        return False


def route_thread_errors(log_path: Path) -> Callable[[], None]:
    """Send what tmrl's and rtgym's threads would print to the terminal to `log_path`; returns `uninstall`.

    - uncaught exceptions of threads other than the main one (threading.excepthook: tmrl's telemetry client
      when the plugin stops, rtgym's worker when tmrl raises in it) are appended to the file with a
      timestamp, the thread's name and the full traceback, and nothing is written to the terminal (the env
      raises its own one-line error in the calling thread);
    - tmrl's and rtgym's `logging` records below WARNING that would be printed on the terminal go to the file
      instead (WARNING and above are left alone). Call it after the application configured its logging.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = _QuietFileHandler(log_path, encoding="utf-8", delay=True)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s [%(threadName)s] %(name)s: %(message)s")
    )
    previous_hook = threading.excepthook

    def excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:  # as the default hook: a thread may end itself this way
            return
        name = args.thread.name if args.thread is not None else "an unknown thread"
        record = logging.LogRecord(
            "trackmania.threads",
            logging.ERROR,
            __file__,
            0,
            "uncaught exception in thread %r",
            (name,),
            (args.exc_type, args.exc_value, args.exc_traceback),
        )
        handler.handle(record)

    threading.excepthook = excepthook
    filtered = [logging.getLogger(), *(logging.getLogger(name) for name in _ROUTED_PACKAGES)]
    filters = [(logger, _RouteBelowWarning(logger, handler)) for logger in filtered]
    for logger, log_filter in filters:
        logger.addFilter(log_filter)

    def uninstall() -> None:
        if threading.excepthook is excepthook:
            threading.excepthook = previous_hook
        for logger, log_filter in filters:
            logger.removeFilter(log_filter)
        handler.close()

    return uninstall
