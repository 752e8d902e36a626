"""diagnose.py: the go/no-go says GO on a healthy diagnostic run and NO-GO, for the right reasons, on a
diverging one; its flag criteria call the live monitor's rules (red_flags.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
from test_health import CONFIG, metrics

from diagnose import Criterion, diagnose, flags_in_records, format_table, verdict
from tm_config import epsilon_at


# --- diagnose: go / no-go --------------------------------------------------------------------------
def diagnostic_records(steps: int = 5000, diverge: bool = False) -> list[dict[str, Any]]:
    """Records shaped like env_tm.py's JSONL for a diagnostic run (step records every 100 learn steps)."""
    records: list[dict[str, Any]] = [{"kind": "run", "step": 0, "event": "start", "departures": {}}]
    rng = np.random.default_rng(1)
    first_learn = CONFIG.batch_size  # learning starts once a batch is stored
    for learn_step in range(100, steps + 1, 100):
        step = learn_step + first_learn
        progress = learn_step / steps
        q = 2.0 * progress + 0.1 * rng.normal()
        loss = 5.0 - progress + 0.2 * rng.normal()
        if diverge and progress > 0.5:
            q = -1000.0 * (progress - 0.5) * 2
            loss = 3.0 + 12.0 * (progress - 0.5) * 2
        epsilon = epsilon_at(step - 1, CONFIG)  # the loop records the epsilon of step - 1's action
        values = metrics(learn_step, loss=loss, q_mean=q, q_min=q - 2, q_max=q + 2, epsilon=epsilon)
        values["learn_step"] = learn_step
        records.append({"kind": "step", "step": step, **values, "max_abs_reward": 1.0})
        if learn_step % 500 == 0:
            episode = {"episode": learn_step // 500, "reward": 150.0, "length": 500, "terminated": False}
            episode.update(epsilon=epsilon, beta=1.0, seconds=25.0, q_mean=q, loss=loss)
            records.append({"kind": "episode", "step": step, **episode})
    if diverge:
        records[-10]["loss"] = "nan"  # run_log writes NaN as a string
        records.append(
            {"kind": "event", "step": steps, "level": "red_flag", "name": "q_negative", "message": "..."}
        )
    records.append({"kind": "run", "step": steps, "event": "finished"})
    return records


def failed(criteria: list[Criterion]) -> set[str]:
    return {c.name for c in criteria if not c.passed}


def test_diagnose_says_go_on_a_healthy_run() -> None:
    criteria = diagnose(diagnostic_records(), CONFIG)
    assert failed(criteria) == set(), format_table(criteria)
    assert verdict(criteria)
    table = format_table(criteria, width=500)
    assert table.splitlines()[-1] == f"GO: all {len(criteria)} criteria passed"
    assert all(line.startswith("PASS") for line in table.splitlines()[1:-1])


def test_the_diagnose_table_fits_an_80_column_terminal_keeping_every_word() -> None:
    criteria = diagnose(diagnostic_records(diverge=True), CONFIG)
    wide, narrow = format_table(criteria, width=500), format_table(criteria, width=80)
    assert max(len(line) for line in wide.splitlines()) > 80  # the table as it was: ~150 columns
    assert all(len(line) <= 80 for line in narrow.splitlines())
    assert narrow.split() == [w for line in narrow.splitlines() for w in line.split()]
    for c in criteria:  # every verdict, name, measure and requirement is still there, in words
        words = " ".join(narrow.split())
        assert f"{'PASS' if c.passed else 'FAIL'} {c.name} {' '.join(c.measured.split())}" in words
        assert f"requires: {' '.join(c.requirement.split())}" in words
    assert " ".join(narrow.split()).endswith(" ".join(wide.splitlines()[-1].split()))


def test_diagnose_says_no_go_on_a_diverging_run() -> None:
    criteria = diagnose(diagnostic_records(diverge=True), CONFIG)
    assert not verdict(criteria)
    # The loss grows 3 -> 15 but never 10x, and loss_spike is not judged before episode 500 (the live rule).
    assert failed(criteria) == {
        "loss_finite",
        "q_not_negative",
        "q_within_return_bound",
        "no_fatal_red_flags",
    }, format_table(criteria)
    by_name = {c.name: c for c in criteria}
    assert "-1000" in by_name["q_not_negative"].measured
    assert "max |Q| 1002 " in by_name["q_within_return_bound"].measured  # q_min = q - 2
    assert "bound 333.3" in by_name["q_within_return_bound"].measured
    assert "q_negative" in by_name["no_fatal_red_flags"].measured
    table = format_table(criteria, width=80).splitlines()
    last = " ".join(table[next(i for i, line in enumerate(table) if line.startswith("NO-GO")) :])
    assert last.startswith("NO-GO: 4 of ") and "q_not_negative" in last


def test_diagnose_catches_the_silent_failures() -> None:
    records = diagnostic_records()
    for r in records:
        if r["kind"] == "step":
            r["grad_norm"] = 0.0  # seed 003: computed, never recorded
            r["q_mean"], r["q_std"] = 0.0, 0.0  # seed 003: zero-initialised head
            r["epsilon"] = 0.5  # an epsilon not on the pinned schedule
            r["learning_rate"] = 5e-5 if r["step"] > 3000 else 1e-4  # a scheduler
    records.append({"kind": "event", "step": 4000, "level": "red_flag", "name": "observations_frozen"})
    assert failed(diagnose(records, CONFIG)) == {
        "grad_norm_nonzero",
        "q_changes",
        "epsilon_on_schedule",
        "learning_rate_constant",
        "observations_not_frozen",
        "no_fatal_red_flags",
    }


def test_diagnose_without_learning_is_no_go() -> None:
    records = [{"kind": "run", "step": 0, "event": "start", "departures": {}}]
    names = failed(diagnose(records, CONFIG))
    assert {"learning_happened", "loss_finite", "grad_norm_nonzero", "q_changes"} <= names


def test_diagnose_bounds_q_by_episode_rewards_without_max_abs_reward() -> None:
    records = diagnostic_records()
    for r in records:
        r.pop("max_abs_reward", None)
    by_name = {c.name: c for c in diagnose(records, CONFIG)}
    assert by_name["q_within_return_bound"].passed
    assert "max|r| 150: the largest |episode reward|" in by_name["q_within_return_bound"].measured


def test_a_fatal_flag_in_the_recorded_series_fails_the_diagnosis_without_its_event() -> None:
    records = diagnostic_records()
    step_records = [r for r in records if r["kind"] == "step"]
    step_records[20]["grad_norm"] = 5000.0  # > 10x the clip norm 100: grad_norm_exploding
    by_name = {c.name: c for c in diagnose(records, CONFIG)}
    assert not by_name["grad_norm_bounded"].passed
    assert not by_name["no_fatal_red_flags"].passed
    assert by_name["no_fatal_red_flags"].measured == "raised: grad_norm_exploding"
    assert flags_in_records(records, CONFIG) == {"grad_norm_exploding": step_records[20]["step"]}
