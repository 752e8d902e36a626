"""Checkpoints of a run: atomic writes, rotation, `latest` and `best`, and loading with fallback.

A run folder `checkpoints/<run-name>/` holds
    ckpt_ep<episode>_step<step>.pt    the last `keep_last_n_checkpoints` periodic checkpoints
    latest.pt                         the newest checkpoint (a hard link where the filesystem allows)
    best.pt                           the checkpoint after the best checkpoint interval so far (highest mean
                                      episode reward over the episodes since the previous checkpoint)
Every file is written to a temporary name, flushed to disk, then renamed over its final name, so a crash
or a kill in the middle of a write never leaves a broken `latest.pt`: at worst an orphan `*.tmp`, which
the next start removes.

A checkpoint is one `torch.save` dict of tensors and plain Python values (numpy arrays are stored as
tensors), so it loads with `weights_only=True`: loading never runs code from the file.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
CHECKPOINT_PATTERN = re.compile(r"^ckpt_ep(\d+)_step(\d+)\.pt$")


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
    """Point `destination` at `source`'s content atomically: a hard link if possible, else a copy."""
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


class CheckpointStore:
    """The checkpoints of one run folder."""

    def __init__(self, run_dir: Path, keep_last: int) -> None:
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last

    @property
    def latest_path(self) -> Path:
        return self.run_dir / "latest.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"

    def periodic(self) -> list[Path]:
        """Periodic checkpoints, oldest first (ordered by step)."""
        found = []
        for path in self.run_dir.glob("ckpt_ep*_step*.pt"):
            match = CHECKPOINT_PATTERN.match(path.name)
            if match:
                found.append((int(match.group(2)), int(match.group(1)), path))
        return [path for _, _, path in sorted(found)]

    def remove_temporaries(self) -> list[Path]:
        """Orphans of writes that were interrupted (by a crash or a kill)."""
        orphans = list(self.run_dir.glob("*.tmp"))
        for path in orphans:
            path.unlink(missing_ok=True)
        return orphans

    def check_writable(self, needed_bytes: int) -> None:
        """Fail before training, with one line, if checkpoints could not be written."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write-probe.tmp"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as error:
            raise CheckpointError(
                f"checkpoint folder {self.run_dir} is not writable: {error.strerror}"
            ) from None
        free = shutil.disk_usage(self.run_dir).free
        if free < needed_bytes:
            raise CheckpointError(
                f"not enough free disk space for checkpoints in {self.run_dir}: {free / 2**30:.2f} GiB free, "
                f"{needed_bytes / 2**30:.2f} GiB needed (free space or use --run-name elsewhere / --set "
                "max_buffer_size=...)"
            )

    def save(self, state: dict[str, Any], episode: int, step: int, is_best: bool) -> Path:
        """Write a periodic checkpoint, repoint latest (and best), and drop the oldest beyond `keep_last`."""
        path = self.run_dir / f"ckpt_ep{episode:07d}_step{step:010d}.pt"
        atomic_torch_save({"format_version": FORMAT_VERSION, **to_storable(state)}, path)
        _link_or_copy(path, self.latest_path)
        if is_best:
            _link_or_copy(path, self.best_path)
        for old in self.periodic()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def save_latest_only(self, state: dict[str, Any]) -> Path:
        """An out-of-schedule checkpoint (Ctrl+C, a game that stopped answering): latest only."""
        atomic_torch_save({"format_version": FORMAT_VERSION, **to_storable(state)}, self.latest_path)
        return self.latest_path

    def candidates(self) -> Iterator[Path]:
        """Where to resume from, best first: latest, then periodic checkpoints newest first."""
        if self.latest_path.exists():
            yield self.latest_path
        yield from reversed(self.periodic())

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
                continue
            return LoadedCheckpoint(path, state, tuple(skipped), value)
        if skipped:
            raise CheckpointError(
                f"no usable checkpoint in {self.run_dir}: "
                + "; ".join(skipped)
                + " (use --fresh to start over)"
            )
        return None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint; a truncated, corrupt or foreign file raises CheckpointError naming it."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a damaged file; all mean "unusable"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt): {reason[:160]}"
        ) from None
    if not isinstance(raw, dict) or "format_version" not in raw:
        raise CheckpointError(f"checkpoint {path} is not a rainbow-tm checkpoint")
    if raw["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {raw['format_version']}, this rainbow-tm reads version "
            f"{FORMAT_VERSION}"
        )
    return from_storable({key: value for key, value in raw.items() if key != "format_version"})
