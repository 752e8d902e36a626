"""Where a run's metrics go: a local JSONL file in the run folder, and Weights & Biases.

The JSONL file is the run's own record (compare_runs.py reads it); W&B is a mirror for dashboards.
W&B runs offline when no API key is configured, and a W&B failure never stops training: it is reported
once and the run continues with the JSONL file alone.

Each JSONL line is one record: {"kind": "step" | "episode" | "event" | "run", "step": global step, ...}.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so a bad value is recorded rather than lost."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete records of a metrics file (a half-written last line from a crash is ignored)."""
    records = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def truncate_after_step(path: Path, step: int) -> int:
    """On resume or rollback, drop records written after the checkpoint's step (that work is redone).
    Events (red flags, rollbacks) are kept whatever their step: they are the run's history."""
    if not path.exists():
        return 0
    records = read_jsonl(path)
    kept = [r for r in records if r.get("step", 0) <= step or r.get("kind") == "event"]
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "w", encoding="utf-8") as file:
        for record in kept:
            file.write(json.dumps(record) + "\n")
    os.replace(temp, path)
    return len(records) - len(kept)


def wandb_logged_in() -> bool:
    """True when W&B credentials exist: WANDB_API_KEY, or the netrc entry that `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    base = os.environ.get("WANDB_BASE_URL", "")
    host = re.sub(r"^https?://", "", base).split("/")[0].split(":")[0]
    home = Path.home()
    paths = [Path(os.environ["NETRC"])] if os.environ.get("NETRC") else [home / ".netrc", home / "_netrc"]
    for path in paths:  # _netrc is the Windows spelling
        try:
            machines = netrc.netrc(str(path)).hosts
        except (OSError, netrc.NetrcParseError):
            continue
        if any("wandb" in machine or (host and machine == host) for machine in machines):
            return True
    return False


def wandb_grouping(departures: dict[str, Any], unpinned: list[str] | None) -> tuple[str, list[str]]:
    """The W&B group and tags of a run from its departures (Config.departures(): key -> pinned and used
    values): runs of one departure (all their seeds) share a group, the known-good config's is
    `known-good`; a tag per departure and `unpinned`, to filter across groups."""
    if not departures:
        return "known-good", ["known-good"]
    used = {
        key: value.get("used", value) if isinstance(value, dict) else value
        for key, value in departures.items()
    }
    parts = sorted(f"{key}={value}" for key, value in used.items())
    group = "+".join(parts)
    if len(group) > 120:  # W&B caps a group name at 128 characters
        group = f"{group[:100]}+{len(parts)} departures"
    return group, [*(part[:64] for part in parts), *(["unpinned"] if unpinned else [])]


def offline_sittings(run_dir: Path, run_id: str) -> list[Path]:
    """The offline W&B folders of one run, oldest first: W&B starts one per sitting (each resume)."""
    return sorted(Path(run_dir).glob(f"wandb/offline-run-*-{run_id}"))


def sync_commands(run_dir: Path, run_id: str) -> list[str]:
    """The commands that upload an offline run whole: its sittings in order, each after the first with
    `--append` (without it, W&B replaces the run's history with the sitting synced last)."""
    return [
        f'wandb sync {"--append " if index else ""}"{folder}"'
        for index, folder in enumerate(offline_sittings(run_dir, run_id))
    ]


class RunLog:
    """Writes every record to the JSONL file and, when enabled, to W&B."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self.wandb_run: Any = None
        self.wandb_note = "W&B disabled"
        self._wandb_step = 0
        self._wandb_resumed_at = 0  # the W&B run's step when this process resumed it
        self.offline = False

    # W&B ------------------------------------------------------------------------------------------
    def start_wandb(
        self,
        project: str,
        run_name: str,
        run_id: str | None,
        config: dict[str, Any],
        departures: dict[str, Any],
        unpinned: list[str] | None = None,
        job_type: str | None = None,
        entity: str | None = None,
    ) -> str | None:
        """Start (or resume) the W&B run, grouped by its departures (`wandb_grouping`) with the environment
        as its job type; returns its id, or None if W&B is unavailable."""
        try:
            import wandb
        except ImportError:
            self.wandb_note = "W&B not installed: metrics go to the JSONL file only"
            return None
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
        offline = mode in ("offline", "dryrun")
        group, tags = wandb_grouping(departures, unpinned)
        try:
            self.wandb_run = wandb.init(
                project=project,
                entity=entity,
                name=run_name,
                id=run_id,
                resume="allow",
                mode=mode,
                dir=str(self.path.parent),
                group=group,
                job_type=job_type,
                tags=tags,
                config={**config, "departures_from_known_good": departures, "unpinned": list(unpinned or [])},
                settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as error:  # unreachable server, bad key, broken install: never fatal
            self.wandb_note = f"W&B unavailable ({type(error).__name__}: {str(error)[:120]}); JSONL only"
            self.wandb_run = None
            return None
        if offline:
            why = (
                f"WANDB_MODE={mode}" if os.environ.get("WANDB_MODE") else "no WANDB_API_KEY or `wandb login`"
            )
            where = Path(self.wandb_run.dir).parent
            self.wandb_note = (
                f"W&B offline ({why}): files in {where}; the commands that upload it are printed at the end"
            )
            self.offline = True
        else:
            self.wandb_note = f"W&B online: {self.wandb_run.url}"
        self._wandb_resumed_at = self._wandb_step = int(getattr(self.wandb_run, "step", 0) or 0)
        return self.wandb_run.id

    def _to_wandb(self, record: dict[str, Any]) -> None:
        if self.wandb_run is None:
            return
        kind = record["kind"]
        payload = {f"{kind}/{k}": v for k, v in record.items() if k not in ("kind", "time")}
        # W&B takes only increasing steps. A resumed run redoes the steps after its checkpoint, which W&B
        # has already: it keeps their first version. A learner beside the actor reports its learn steps a
        # little after the actor's own records: they go in at the newest step, their own in `<kind>/step`.
        if int(record["step"]) < self._wandb_resumed_at:
            return
        self._wandb_step = max(self._wandb_step, int(record["step"]))
        try:
            self.wandb_run.log(payload, step=self._wandb_step)
            if kind == "event" and record.get("level") == "red_flag":
                self.wandb_run.summary[f"red_flag/{record.get('name', 'unknown')}"] = record.get(
                    "message", ""
                )
        except Exception as error:
            self.wandb_note = f"W&B stopped logging ({type(error).__name__}); JSONL only"
            self.wandb_run = None

    def truncate_after_step(self, step: int) -> int:
        """`truncate_after_step` on this log's own file, which it holds open for appending."""
        self._file.close()
        dropped = truncate_after_step(self.path, step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        return dropped

    def alert(self, title: str, text: str) -> None:
        """A W&B alert (email/Slack when the user set them up); silently nothing when offline."""
        if self.wandb_run is None:
            return
        with contextlib.suppress(Exception):  # offline runs cannot send alerts; the JSONL has the event
            self.wandb_run.alert(title=title, text=text)

    # records --------------------------------------------------------------------------------------
    def write(self, kind: str, step: int, **values: Any) -> None:
        record = {"kind": kind, "step": step, "time": round(time.time(), 3)}
        record.update({key: _clean(value) for key, value in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._to_wandb(record)

    def close(self) -> list[str]:
        """Close the JSONL and the W&B run; for an offline run, the commands that upload it whole."""
        self._file.close()
        commands: list[str] = []
        if self.wandb_run is not None:
            run_id = self.wandb_run.id
            with contextlib.suppress(Exception):  # a failing upload must not fail the run's end
                self.wandb_run.finish()
            self.wandb_run = None
            if self.offline:
                commands = sync_commands(self.path.parent, run_id)
        return commands
