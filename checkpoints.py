"""Checkpoints of a run: atomic writes, rotation, two `latest` generations, `best`, and loading with fallback.

A run folder `checkpoints/<run-name>/` holds
    ckpt_ep<episode>_step<step>.pt    the last `keep_last_n_checkpoints` periodic checkpoints
    latest.pt                         the newest checkpoint: periodic (a hard link to the periodic file where
                                      the filesystem allows, else a copy) or out of schedule (Ctrl+C, errors)
    latest.previous.pt                the previous `latest.pt` (the generation before it), so that one damaged
                                      file never costs the whole run, even before the first periodic one
    best.pt                           the checkpoint after the best checkpoint interval so far (highest mean
                                      episode reward over the episodes since the previous checkpoint)
    *.tmp                             only while a write is under way (an interrupted write leaves an orphan,
                                      which the next start removes)

Every file is written to a temporary name, flushed to disk, then renamed over its final name, so a crash
or a kill in the middle of a write never leaves a broken checkpoint under a final name. A new `latest.pt`
is written completely first; only then does the current `latest.pt` become `latest.previous.pt` (a new hard
link, or a copy, renamed into place: its content is never written through, as it may share its data with a
periodic file), and only then is the new file renamed over `latest.pt`. So at every moment `latest.pt` is
a complete checkpoint (the old or the new one), and `latest.previous.pt` a complete older one (or, after
a kill between the two renames, the same one).

Resuming tries `latest.pt`, then `latest.previous.pt`, then the periodic checkpoints newest first (each file
once, even under two names). A `latest.pt` that could not be used is not kept as the previous generation.

A fresh start never mixes into an old run's folder: `move_aside` renames it (<name>.replaced-<time>).

A checkpoint is one `torch.save` dict of tensors and plain Python values (numpy arrays are stored as
tensors), so it loads with `weights_only=True`: loading never runs code from the file.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
CHECKPOINT_PATTERN = re.compile(r"^ckpt_ep(\d+)_step(\d+)\.pt$")
LATEST_NAME = "latest.pt"
PREVIOUS_NAME = "latest.previous.pt"  # the generation of latest.pt before the current one
BEST_NAME = "best.pt"
STAGING_NAME = "latest.next.pt.tmp"  # a complete new latest.pt, waiting for the rotation
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
FOLDER_OPTION = "--checkpoint-root"  # where the advice sends the user for another checkpoint folder
# Windows: a path beyond MAX_PATH (Python maps this winerror to ENOENT, not ENAMETOOLONG).
ERROR_FILENAME_EXCED_RANGE = 206


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming the file."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    path: Path
    state: dict[str, Any]
    skipped: tuple[str, ...]  # one line per newer checkpoint that could not be used
    value: Any = None  # what the caller's `use` made of the state (e.g. a restored agent)


def to_storable(value: Any) -> Any:
    """numpy arrays -> tensors (marked), recursively, so the dict loads with weights_only=True."""
    if isinstance(value, np.ndarray):
        return {"__numpy__": torch.from_numpy(np.ascontiguousarray(value))}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: to_storable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_storable(item) for item in value)
    return value


def from_storable(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__numpy__"}:
            return value["__numpy__"].numpy()
        return {key: from_storable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(from_storable(item) for item in value)
    return value


def errno_name(error: OSError) -> str:
    """`ENOSPC` for errno 28; the number itself when the platform has no name for it."""
    if error.errno is None:
        return type(error).__name__
    return errno.errorcode.get(error.errno, f"errno {error.errno}")


def os_message(error: OSError) -> str:
    """The operating system's own text for the error, without Python's `[Errno N] ...: 'path'` framing."""
    if error.strerror:
        return error.strerror
    if error.errno is not None:
        return os.strerror(error.errno)
    return str(error) or type(error).__name__


def describe_write_error(error: OSError, folder: Path) -> str:
    """One line: why writing a checkpoint into `folder` failed (the OS's own words and the errno name) and
    what to do about it."""
    code = error.errno
    cause = f"({os_message(error)}, {errno_name(error)})"
    elsewhere = f"choose another checkpoint folder ({FOLDER_OPTION})"
    if code == errno.ENOSPC:
        return f"the drive holding {folder} is full {cause}; free disk space or {elsewhere}"
    if code is not None and code == getattr(errno, "EDQUOT", None):  # no EDQUOT on Windows
        return f"the disk quota for {folder} is used up {cause}; free disk space or {elsewhere}"
    if code in (errno.EACCES, errno.EPERM):
        return (
            f"this user cannot write to {folder} {cause}; check the folder's permissions (it may belong to "
            "another user) or, on Windows, whether another program such as an antivirus or a sync client "
            "has a checkpoint file locked"
        )
    if code == errno.EROFS:
        return f"the folder {folder} or its drive is read-only {cause}; make it writable or {elsewhere}"
    if code == errno.ENAMETOOLONG or getattr(error, "winerror", None) == ERROR_FILENAME_EXCED_RANGE:
        return (
            f"a file path under {folder} is too long for the file system {cause}; use a shorter path "
            f"(a shorter --run-name, or {FOLDER_OPTION} closer to the drive's root)"
        )
    if code == errno.ENOTDIR:
        return (
            f"part of the path {folder} is a file, not a folder {cause}; move that file away or {elsewhere}"
        )
    return f"writing to {folder} failed {cause}"


def atomic_torch_save(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` so that `path` is always either the old file or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable on POSIX (the folder entry itself); Windows has no folder handles for this."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _link_or_copy(source: Path, destination: Path) -> None:
    """Point `destination` at `source`'s content atomically: a hard link if possible, else a copy. The
    content is never written through `destination`: its old directory entry is replaced, not its data."""
    temp = destination.with_name(destination.name + ".link.tmp")
    temp.unlink(missing_ok=True)
    try:
        os.link(source, temp)
    except OSError:  # e.g. FAT32 or a network share without hard links
        shutil.copyfile(source, temp)
        with open(temp, "rb+") as file:
            os.fsync(file.fileno())
    os.replace(temp, destination)
    _fsync_folder(destination.parent)


def _file_id(path: Path) -> tuple[Any, ...] | None:
    """What identifies the file's data (device, inode), so that two hard links count once; None if missing.
    Without inode numbers (some network or FAT drives report 0) every name counts as its own file."""
    try:
        status = path.stat()
    except OSError:
        return None
    if not status.st_ino:
        return ("name", str(path))
    return (status.st_dev, status.st_ino)


def describe_file(path: Path) -> str:
    """What a checkpoint file is, from its name: `the latest checkpoint`, `the periodic checkpoint of ...`."""
    match = CHECKPOINT_PATTERN.match(path.name)
    if match:
        return f"the periodic checkpoint of episode {int(match.group(1)):,} (step {int(match.group(2)):,})"
    return {
        LATEST_NAME: "the latest checkpoint",
        PREVIOUS_NAME: "the previous generation of latest.pt",
        BEST_NAME: "the best checkpoint",
    }.get(path.name, "the file")


class CheckpointStore:
    """The checkpoints of one run folder."""

    def __init__(self, run_dir: Path, keep_last: int) -> None:
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last
        # The latest.pt that load_newest_good could not use: never kept as the previous generation.
        self._unusable_latest: tuple[Any, ...] | None = None

    @property
    def latest_path(self) -> Path:
        return self.run_dir / LATEST_NAME

    @property
    def previous_path(self) -> Path:
        return self.run_dir / PREVIOUS_NAME

    @property
    def best_path(self) -> Path:
        return self.run_dir / BEST_NAME

    def periodic(self, before_step: int | None = None) -> list[Path]:
        """Periodic checkpoints, oldest first (ordered by step); only those of steps before `before_step`
        when it is given."""
        found = []
        for path in self.run_dir.glob("ckpt_ep*_step*.pt"):
            match = CHECKPOINT_PATTERN.match(path.name)
            if match and (before_step is None or int(match.group(2)) < before_step):
                found.append((int(match.group(2)), int(match.group(1)), path))
        return [path for _, _, path in sorted(found)]

    def remove_temporaries(self) -> list[Path]:
        """Orphans of writes that were interrupted (by a crash or a kill). One that cannot be removed (a
        read-only folder, a file locked by another program) is left: it is never read, and a folder that
        cannot be written is reported by `check_writable`."""
        removed = []
        for path in sorted(self.run_dir.glob("*.tmp")):
            try:
                path.unlink(missing_ok=True)
            except OSError:
                continue
            removed.append(path)
        return removed

    def check_writable(self, needed_bytes: int) -> None:
        """Fail before training, with one line naming the folder and the cause, if checkpoints could not be
        written (the probe is written the way checkpoints are: a temporary file in the run folder)."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            handle, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=self.run_dir)
            try:
                with os.fdopen(handle, "wb") as file:
                    file.write(b"ok")
            finally:
                Path(probe).unlink(missing_ok=True)
        except OSError as error:
            reason = describe_write_error(error, self.run_dir)
            raise CheckpointError(f"checkpoint folder {self.run_dir} is not writable: {reason}") from None
        free = shutil.disk_usage(self.run_dir).free
        if free < needed_bytes:
            raise CheckpointError(
                f"not enough free disk space for checkpoints in {self.run_dir}: {free / 2**30:.2f} GiB free, "
                f"{needed_bytes / 2**30:.2f} GiB needed (free disk space, choose another checkpoint folder "
                f"with {FOLDER_OPTION}, or --set max_buffer_size=...)"
            )

    def _keep_previous_generation(self) -> None:
        """Make the current latest.pt the previous generation, before a new latest.pt replaces it. A new name
        for the same data (or a copy), renamed over latest.previous.pt: latest.pt itself stays in place."""
        latest = _file_id(self.latest_path)
        if latest is None or latest == self._unusable_latest or latest == _file_id(self.previous_path):
            return
        _link_or_copy(self.latest_path, self.previous_path)

    def save(self, state: dict[str, Any], episode: int, step: int, is_best: bool) -> Path:
        """Write a periodic checkpoint, keep the current latest as the previous generation, repoint latest
        (and best), and drop the oldest periodic checkpoints beyond `keep_last`."""
        path = self.run_dir / f"ckpt_ep{episode:07d}_step{step:010d}.pt"
        atomic_torch_save({"format_version": FORMAT_VERSION, **to_storable(state)}, path)
        self._keep_previous_generation()
        _link_or_copy(path, self.latest_path)
        self._unusable_latest = None
        if is_best:
            _link_or_copy(path, self.best_path)
        for old in self.periodic()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def save_latest_only(self, state: dict[str, Any]) -> Path:
        """An out-of-schedule checkpoint (Ctrl+C, a game that stopped answering): latest only, keeping the
        current latest as the previous generation."""
        staging = self.run_dir / STAGING_NAME
        atomic_torch_save({"format_version": FORMAT_VERSION, **to_storable(state)}, staging)
        try:
            self._keep_previous_generation()
            os.replace(staging, self.latest_path)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
        self._unusable_latest = None
        _fsync_folder(self.run_dir)
        return self.latest_path

    def candidates(self) -> Iterator[Path]:
        """Where to resume from, best first: latest, the previous generation, then periodic checkpoints newest
        first; each file once (a hard link of an earlier candidate is skipped). A previous generation that is
        a periodic file is tried under the periodic file's name, in its place."""
        periodic = list(reversed(self.periodic()))
        periodic_ids = {_file_id(path) for path in periodic}
        seen: set[tuple[Any, ...]] = set()
        for path in (self.latest_path, self.previous_path, *periodic):
            file_id = _file_id(path)
            if file_id is None or file_id in seen:
                continue
            if path == self.previous_path and file_id in periodic_ids:
                continue
            seen.add(file_id)
            yield path

    def load_newest_good(
        self,
        use: Callable[[dict[str, Any], Path], Any] | None = None,
        candidates: Iterable[Path] | None = None,
    ) -> LoadedCheckpoint | None:
        """The newest of `candidates` (default: `self.candidates()`) that loads and that `use(state, path)`
        accepts (it raises CheckpointError otherwise); each one skipped on the way is reported."""
        skipped = []
        for path in self.candidates() if candidates is None else candidates:
            try:
                state = load_checkpoint(path)
                value = use(state, path) if use is not None else None
            except CheckpointError as error:
                skipped.append(str(error))
                if path == self.latest_path:
                    self._unusable_latest = _file_id(path)
                continue
            return LoadedCheckpoint(path, state, tuple(skipped), value)
        if skipped:
            raise CheckpointError(
                f"no usable checkpoint in {self.run_dir} ({len(skipped)} tried): "
                + "; ".join(skipped)
                + " (use --fresh to start over)"
            )
        return None


def exception_name(error: BaseException) -> str:
    """`RuntimeError`, `pickle.UnpicklingError`, `struct.error`: the class, with its module unless builtin."""
    cls = type(error)
    module = cls.__module__.lstrip("_")
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _unreadable(path: Path, error: BaseException) -> CheckpointError:
    """One line for a file torch.load refused: what the file is, what is wrong, the exception's class (its
    text is torch's, often several sentences: never quoted)."""
    what, kind = describe_file(path), exception_name(error)
    if isinstance(error, OSError):
        return CheckpointError(f"checkpoint {path} cannot be read: {os_message(error)} ({errno_name(error)})")
    try:
        with open(path, "rb") as file:
            start = file.read(len(ZIP_MAGIC))
    except OSError:
        start = ZIP_MAGIC
    if not start:
        return CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt): {what} is empty ({kind})"
        )
    if start != ZIP_MAGIC:
        return CheckpointError(
            f"checkpoint {path} is unreadable (corrupt or not a checkpoint): {what} is not a torch "
            f"checkpoint archive ({kind})"
        )
    if isinstance(error, pickle.UnpicklingError):
        return CheckpointError(
            f"checkpoint {path} is unreadable (corrupt or not a rainbow-tm checkpoint): {what} holds objects "
            f"that safe loading refuses ({kind})"
        )
    return CheckpointError(
        f"checkpoint {path} is unreadable (truncated or corrupt): loading {what} raised {kind}"
    )


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint; a truncated, corrupt or foreign file raises CheckpointError naming it."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a damaged file; all mean "unusable"
        raise _unreadable(Path(path), error) from None
    if not isinstance(raw, dict) or "format_version" not in raw:
        raise CheckpointError(f"checkpoint {path} is not a rainbow-tm checkpoint")
    if raw["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {raw['format_version']}, this rainbow-tm reads version "
            f"{FORMAT_VERSION}"
        )
    return from_storable({key: value for key, value in raw.items() if key != "format_version"})


def move_aside(run_dir: Path) -> Path | None:
    """A fresh start never mixes a new run into an old run's folder: the old one is renamed, not deleted."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    target = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    suffix = 1
    while target.exists():
        target = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}")
        suffix += 1
    run_dir.rename(target)
    return target
