"""bench/compare_curves.py: the figures that learning-curve comparisons report (steps to 400 and 700)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import compare_curves  # noqa: E402


def write_run(folder: Path, evals: list[tuple[int, float]]) -> Path:
    folder.mkdir(parents=True)
    records = [{"kind": "episode", "step": 5, "time": 0.0, "reward": 1.0}]
    records += [{"kind": "eval", "step": s, "time": 0.0, "return_mean": r} for s, r in evals]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def compare(monkeypatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["compare_curves.py", *argv])
    return compare_curves.main()


def test_steps_to_each_threshold_and_the_final_mean_within_the_shortest_budget(tmp_path, monkeypatch, capsys):
    k = 10_000
    fast = write_run(tmp_path / "fast", [(0, -240), (k, 420), (2 * k, 380), (3 * k, 710), (4 * k, 690)])
    slow = write_run(tmp_path / "slow", [(0, -240), (k, -200), (2 * k, 100), (3 * k, 450)])
    late = write_run(tmp_path / "late", [(0, -240), (k, -210), (2 * k, 405), (3 * k, 520), (4 * k, 800)])
    out = tmp_path / "out"
    code = compare(
        monkeypatch,
        *("--run", f"a={fast}", "--run", f"b={slow}", "--run", f"a={late}"),
        *("--png", str(out / "curves.png"), "--json", str(out / "curves.json")),
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "budget: 30,000 steps" in text, "the budget is the shortest run's last evaluation"
    result = json.loads((out / "curves.json").read_text())
    a, b = result["groups"]["a"]["runs"], result["groups"]["b"]["runs"]
    assert [(m["steps_to_400"], m["steps_to_700"]) for m in a] == [(10_000, 30_000), (20_000, None)]
    assert (b[0]["steps_to_400"], b[0]["steps_to_700"]) == (30_000, None)
    # 'final' is the mean of the last 3 evaluations within the budget: 40k is beyond it
    assert a[0]["final"] == pytest.approx((420 + 380 + 710) / 3)
    assert a[1]["final"] == pytest.approx((-210 + 405 + 520) / 3)
    assert result["groups"]["a"]["final_mean"] == pytest.approx((a[0]["final"] + a[1]["final"]) / 2)
    assert "not reached" in text
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-equals-sign", "is not LABEL=DIR"),
        ("a=", "is not LABEL=DIR"),
        ("a={missing}", "no metrics.jsonl in"),
        ("a={empty}", "has no eval records (train with --eval-every)"),
    ],
)
def test_bad_runs_are_one_line_errors(tmp_path, monkeypatch, spec, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text(json.dumps({"kind": "episode", "step": 1, "time": 0.0}) + "\n")
    spec = spec.format(missing=tmp_path / "nowhere", empty=empty)
    with pytest.raises(SystemExit) as error:
        compare(monkeypatch, "--run", spec)
    assert str(error.value).startswith("error: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_kept_curve_gives_the_same_figures_as_its_run_folder(tmp_path, monkeypatch):
    k = 10_000
    run = write_run(tmp_path / "curve-pin-s0", [(0, -240), (k, 420), (2 * k, 710), (3 * k, 650)])
    with (run / "metrics.jsonl").open("a") as log:
        log.write(
            json.dumps({"kind": "run", "step": 0, "time": 0.0, "event": "start", "departures": {}}) + "\n"
        )
    kept = tmp_path / "kept"
    assert (
        compare(monkeypatch, "--run", f"pin={run}", "--keep", str(kept), "--json", str(tmp_path / "a.json"))
        == 0
    )
    records = [json.loads(line) for line in (kept / "curve-pin-s0.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["eval"] * 4 + ["run"], "only the start and evaluation records"
    assert (
        compare(
            monkeypatch, "--run", f"pin={kept / 'curve-pin-s0.jsonl'}", "--json", str(tmp_path / "b.json")
        )
        == 0
    )
    from_folder, from_kept = (json.loads((tmp_path / n).read_text())["groups"] for n in ("a.json", "b.json"))
    assert from_kept == from_folder
    assert from_kept["pin"]["runs"][0]["run"] == "curve-pin-s0"
    assert from_kept["pin"]["runs"][0]["steps_to_700"] == 2 * k


def test_a_missing_kept_curve_is_a_one_line_error(tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as error:
        compare(monkeypatch, "--run", f"pin={tmp_path / 'gone.jsonl'}")
    assert str(error.value) == f"error: no gone.jsonl in {tmp_path}"


def test_the_table_has_a_row_per_evaluation_and_a_column_per_run(tmp_path, monkeypatch, capsys):
    a = write_run(tmp_path / "a", [(0, -240), (10_000, 420.25), (20_412, 710)])
    b = write_run(tmp_path / "b", [(0, -240), (10_000, -200)])
    assert compare(monkeypatch, "--run", f"x={a}", "--run", f"y={b}", "--steps", "30000", "--table") == 0
    table = capsys.readouterr().out.split("\n\n")[-1].strip().splitlines()
    assert table[0] == "| step (due) | x: a | y: b |"
    assert table[2:] == [
        "| 0 | -240.0 ± 0 | -240.0 ± 0 |",
        "| 10,000 | 420.2 ± 0 | -200.0 ± 0 |",
        "| 20,000 | 710.0 ± 0 |  |",
    ]


def test_keeping_into_a_file_is_a_one_line_error(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", [(0, -240), (10_000, 420)])
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(SystemExit) as error:
        compare(monkeypatch, "--run", f"pin={run}", "--keep", str(tmp_path / "taken"))
    assert str(error.value).startswith(
        f"error: cannot keep the curve in {tmp_path / 'taken' / 'run.jsonl'}: "
    )
    assert "\n" not in str(error.value)


def test_evaluations_past_the_budget_are_left_out_of_the_table_and_a_budget_before_any_is_an_error(
    tmp_path, monkeypatch, capsys
):
    run = write_run(tmp_path / "run", [(0, -240), (10_000, 420), (20_000, 710)])
    assert compare(monkeypatch, "--run", f"pin={run}", "--steps", "15000", "--table") == 0
    table = capsys.readouterr().out.split("\n\n")[-1].strip().splitlines()
    assert table[2:] == ["| 0 | -240.0 ± 0 |", "| 10,000 | 420.0 ± 0 |"]
    with pytest.raises(SystemExit) as error:
        compare(monkeypatch, "--run", f"pin={run}", "--steps", "-1")
    assert str(error.value) == "error: run has no evaluation within the budget of -1 steps"


def test_a_run_off_the_sacred_schedule_is_labelled_unpinned(tmp_path, monkeypatch, capsys):
    """Issue 25: the curves of BENCHMARKS sections 6-10 ran with a shortened epsilon schedule; a label
    such as "pin" must not hide that."""
    run = write_run(tmp_path / "short-eps", [(0, -240), (10_000, 100)])
    start = {"kind": "run", "step": 0, "time": 0.0, "event": "start", "unpinned": ["epsilon_decay_to"]}
    metrics = run / "metrics.jsonl"
    metrics.write_text(json.dumps(start) + "\n" + metrics.read_text())
    pinned = write_run(tmp_path / "as-pinned", [(0, -240), (10_000, 90)])
    assert compare(monkeypatch, "--run", f"pin={run}", "--run", f"other={pinned}") == 0
    out = capsys.readouterr().out
    assert "pin (unpinned: epsilon_decay_to): short-eps" in out
    assert "other: as-pinned" in out and "other (unpinned" not in out
