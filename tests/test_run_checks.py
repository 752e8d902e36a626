"""run_checks.py: the envelope's phases and the red flags judge a run, and the verdict never reads NO DATA as
a pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from run_logs import (
    by_name,
    healthy_episodes,
    write_run,
)

import compare_runs
import run_checks
from run_checks import DEFAULT_ENVELOPE, FAIL, NO_DATA, NO_VERDICT, PASS, check_run
from run_records import load_run


# --- the envelope ----------------------------------------------------------------------------------
def test_default_envelope_is_the_shared_reference() -> None:
    kept = run_checks.SHARED_ENVELOPE  # the repository's copy of shared/reference/c643zifs-envelope.json
    assert kept.is_file() and json.loads(kept.read_text(encoding="utf-8")) == DEFAULT_ENVELOPE
    shared = Path(compare_runs.__file__).resolve().parent.parent / "shared" / "reference" / kept.name
    if shared.is_file():  # beside the shared folder too: the copy has not drifted from it
        assert json.loads(shared.read_text(encoding="utf-8")) == DEFAULT_ENVELOPE


def test_nan_values_in_a_run_are_reported_not_crashed_on(tmp_path: Path) -> None:
    episodes = healthy_episodes(600)
    episodes["loss"][550] = np.nan
    episodes["q_mean"][560] = -np.inf
    status = by_name(check_run(load_run(str(write_run(tmp_path / "nan", episodes))), DEFAULT_ENVELOPE))
    assert status[("whole run", "metrics_finite")] == FAIL


def test_a_run_without_episodes_is_all_no_data(tmp_path: Path) -> None:
    run = load_run(str(write_run(tmp_path / "empty", {"episode": np.arange(0)})))
    statuses = {c.status for c in check_run(run, DEFAULT_ENVELOPE) if c.name != "metrics_finite"}
    assert run.episodes == 0 and statuses <= {NO_DATA, PASS}
    assert {c.status for c in check_run(run, DEFAULT_ENVELOPE) if c.scope != "whole run"} == {NO_DATA}


def test_recorded_fatal_red_flags_fail_the_run(tmp_path: Path) -> None:
    events = [
        {"kind": "event", "step": 9, "level": "red_flag", "name": "observations_frozen", "message": "x"}
    ]
    run = load_run(str(write_run(tmp_path / "frozen", healthy_episodes(100), events=events)))
    checks = {c.name: c for c in check_run(run, DEFAULT_ENVELOPE)}
    assert checks["recorded_red_flags"].status == FAIL
    assert "observations_frozen" in checks["recorded_red_flags"].measured


# --- verdicts --------------------------------------------------------------------------------------
def checks_of(passed: int, failed: int, no_data: int) -> list[run_checks.Check]:
    statuses = [PASS] * passed + [FAIL] * failed + [NO_DATA] * no_data
    return [run_checks.Check("whole run", f"c{i}", status, "", "") for i, status in enumerate(statuses)]


@pytest.mark.parametrize(
    ("counts", "verdict"),
    [
        ((2, 0, 20), NO_VERDICT),  # the user's report: read as PASS before
        ((0, 0, 22), NO_VERDICT),
        ((0, 0, 0), NO_VERDICT),
        ((9, 0, 13), NO_VERDICT),
        ((11, 0, 11), PASS),  # half: not the majority
        ((18, 0, 4), PASS),
        ((1, 0, 0), PASS),
        ((2, 1, 20), FAIL),
        ((0, 1, 0), FAIL),
    ],
)
def test_run_verdict(counts: tuple[int, int, int], verdict: str) -> None:
    assert run_checks.run_verdict(checks_of(*counts)) == verdict
