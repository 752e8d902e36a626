"""Apply each known-bad edit of the catalogue to a copy of the tree, run its tests, report who killed it.

    python tests/mutations/run.py                 # every edit; a table at the end; exit 1 if one survives
    python tests/mutations/run.py --only eps_from_episode_count --only gamma_applied_twice
    python tests/mutations/run.py --jobs 2        # edits in parallel (one pytest process each)
    python tests/mutations/run.py --list          # the catalogue: names, files, why

An edit is KILLED when its targeted tests fail on the edited copy (pytest exit code 1): the table names the
failing test(s). It SURVIVED when they all pass: the suite would let that bug land. An edit whose `find` text
no longer occurs exactly once in its file is STALE (the code moved on: update the edit), and an edit that
breaks collection (exit code 2-5) or hangs is an ERROR or a TIMEOUT: neither counts as killed, because a
known-bad edit must be a running program whose behaviour a test catches. Before any edit, the targeted
tests run once on an unedited copy: they must pass there, or a "kill" would mean nothing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from catalogue import CATALOGUE, Mutation  # noqa: E402

IGNORED = shutil.ignore_patterns(
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "wandb",
    "results",
    "*.png",
    "*.pt",
)
TIMEOUT_SECONDS = 600


@dataclass
class Outcome:
    name: str
    status: str  # KILLED, SURVIVED, STALE, ERROR, TIMEOUT
    detail: str  # the killing tests, or why it is not a kill
    seconds: float

    @property
    def killed(self) -> bool:
        return self.status == "KILLED"


def copy_tree(destination: Path) -> Path:
    """The repository's files (no caches, runs, checkpoints or pictures) under `destination`/tree."""
    tree = destination / "tree"
    shutil.copytree(ROOT, tree, ignore=IGNORED)
    checkpoints = tree / "checkpoints"
    for item in checkpoints.iterdir() if checkpoints.is_dir() else []:
        if item.name != "README.md":
            shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink()
    return tree


def apply(mutation: Mutation, tree: Path) -> str | None:
    """Edit the copy; returns why an edit cannot be applied, or None."""
    for file, find, replace in mutation.edits:
        path = tree / file
        if not path.is_file():
            return f"{file} does not exist"
        text = path.read_text(encoding="utf-8")
        count = text.count(find)
        if count != 1:
            return (
                f"the text to replace occurs {count} times in {file} (expected once): {find.strip()[:60]!r}"
            )
        path.write_text(text.replace(find, replace), encoding="utf-8")
    return None


def run_pytest(tree: Path, tests: list[str], report: Path) -> tuple[int | None, list[str], str]:
    """Run `tests` in `tree`; (exit code or None on timeout, failing test ids, the output's tail)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("PYTEST_ADDOPTS", None)
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
    try:
        result = subprocess.run(
            command + tests, cwd=tree, env=env, capture_output=True, text=True, timeout=TIMEOUT_SECONDS
        )
    except subprocess.TimeoutExpired:
        return None, [], ""
    failed = []
    if report.is_file():
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}")
    tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
    return result.returncode, failed, tail


def run_one(mutation: Mutation, workspace: Path) -> Outcome:
    start = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix=f"{mutation.name}-", dir=workspace))
    try:
        tree = copy_tree(folder)
        problem = apply(mutation, tree)
        if problem is not None:
            return Outcome(mutation.name, "STALE", problem, time.perf_counter() - start)
        code, failed, tail = run_pytest(tree, list(mutation.tests), folder / "report.xml")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    seconds = time.perf_counter() - start
    if code is None:
        return Outcome(mutation.name, "TIMEOUT", f"tests ran over {TIMEOUT_SECONDS} s", seconds)
    if code == 1 and failed:
        return Outcome(mutation.name, "KILLED", ", ".join(failed), seconds)
    if code == 0:
        return Outcome(mutation.name, "SURVIVED", "all targeted tests passed", seconds)
    last = tail.splitlines()[-1] if tail else ""
    return Outcome(mutation.name, "ERROR", f"pytest exit code {code}: {last}", seconds)


def baseline(mutations: list[Mutation], workspace: Path) -> str | None:
    """The targeted tests on an unedited copy; returns the failure, or None when they all pass."""
    tests = sorted({test for mutation in mutations for test in mutation.tests})
    folder = Path(tempfile.mkdtemp(prefix="baseline-", dir=workspace))
    try:
        code, failed, tail = run_pytest(copy_tree(folder), tests, folder / "report.xml")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if code == 0:
        return None
    return f"exit code {code}; failed: {', '.join(failed) or '-'}\n{tail}"


def table(outcomes: list[Outcome]) -> str:
    rows = [("edit", "result", "seconds", "killed by")]
    rows += [(o.name, o.status, f"{o.seconds:.0f}", o.detail) for o in outcomes]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for number, row in enumerate(rows):
        lines.append(
            "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3]
        )
        if number == 0:
            lines.append("-" * (sum(widths) + 6 + len("killed by")))
    killed = sum(o.killed for o in outcomes)
    lines.append(f"{killed} of {len(outcomes)} known-bad edits killed")
    return "\n".join(lines)


def run_catalogue(names: list[str] | None = None, jobs: int = 1, progress: bool = True) -> list[Outcome]:
    """Run the catalogue (or the named edits); the unedited baseline first."""
    chosen = [m for m in CATALOGUE if not names or m.name in names]
    unknown = sorted(set(names or []) - {m.name for m in CATALOGUE})
    if unknown:
        raise SystemExit(f"error: no edit named {', '.join(unknown)} in the catalogue (see --list)")
    with tempfile.TemporaryDirectory(prefix="rainbow-tm-mutations-") as workspace:
        failure = baseline(chosen, Path(workspace))
        if failure is not None:
            raise SystemExit(
                f"error: the targeted tests fail on the unedited tree, so no kill would count: {failure}"
            )
        outcomes: list[Outcome] = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = {pool.submit(run_one, m, Path(workspace)): m for m in chosen}
            for future in concurrent.futures.as_completed(futures):
                outcome = future.result()
                outcomes.append(outcome)
                if progress:
                    done = f"[{len(outcomes)}/{len(chosen)}]"
                    print(f"{done} {outcome.name}: {outcome.status} ({outcome.seconds:.0f} s)", flush=True)
    order = {m.name: i for i, m in enumerate(chosen)}
    return sorted(outcomes, key=lambda o: order[o.name])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", action="append", default=None, metavar="NAME", help="run this edit (repeatable)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="edits run in parallel (default 1)")
    parser.add_argument("--list", action="store_true", help="list the catalogue and exit")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.list:
        for mutation in CATALOGUE:
            files = ", ".join(sorted({file for file, _, _ in mutation.edits}))
            print(f"{mutation.name:40s} {files:22s} {mutation.why}")
        return 0
    outcomes = run_catalogue(args.only, args.jobs)
    print(table(outcomes))
    return 0 if all(o.killed for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
