"""The mutation catalogue in CI: every known-bad edit of tests/mutations/catalogue.py must be killed.

`python tests/mutations/run.py` runs the same thing by hand and prints the table (README: "No silent
breakage")."""

from __future__ import annotations

import sys
from pathlib import Path

MUTATIONS = Path(__file__).resolve().parent / "mutations"
sys.path.insert(0, str(MUTATIONS))

from catalogue import CATALOGUE  # noqa: E402
from run import ROOT, run_catalogue, table  # noqa: E402


def test_the_catalogue_is_well_formed_and_matches_the_code():
    """Fast: names unique, every edit applies exactly once to today's code, every listed test exists."""
    names = [m.name for m in CATALOGUE]
    assert len(names) == len(set(names)), "edit names must be unique"
    assert len(CATALOGUE) >= 20, "the issue asks for at least 20 known-bad edits"
    for mutation in CATALOGUE:
        assert mutation.tests and mutation.edits and mutation.why, f"{mutation.name} is incomplete"
        for file, find, replace in mutation.edits:
            count = (ROOT / file).read_text(encoding="utf-8").count(find)
            assert count == 1, (
                f"{mutation.name}: its text occurs {count} times in {file}, not once (stale edit)"
            )
            assert find != replace, f"{mutation.name}: an edit that changes nothing"
        for test in mutation.tests:
            file, _, name = test.partition("::")
            name = name.split("[", 1)[0]  # one case of a parametrized test: its function
            source = (ROOT / file).read_text(encoding="utf-8")
            assert not name or f"def {name}(" in source, f"{mutation.name}: no test {test}"
            assert "test_mutations" not in file, "the catalogue must not run itself"


def test_every_known_bad_edit_is_killed():
    outcomes = run_catalogue(jobs=2, progress=False)
    report = table(outcomes)
    print(report)
    survivors = [o.name for o in outcomes if not o.killed]
    assert not survivors, f"known-bad edits not killed: {survivors}\n{report}"
