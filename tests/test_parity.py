"""bench/parity.py: the figures of the parity harness (area under the curve, IQM, paired bootstrap
interval) and its command line, without training (the harness's runs are measured in BENCHMARKS.md)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import parity  # noqa: E402


def test_auc_is_the_trapezoid_area_per_step_with_the_last_value_held_to_the_budget():
    result = parity.Result("a", 0, [(0, -60.0), (1000, 40.0), (2000, 140.0)])
    # (1000 * (-60 + 40) / 2 + 1000 * (40 + 140) / 2 + 1000 * 140) / 3000
    assert result.auc(3000) == pytest.approx((-10_000 + 90_000 + 140_000) / 3000)
    assert result.auc(2000) == pytest.approx((-10_000 + 90_000) / 2000)
    assert result.final(2000) == pytest.approx(90.0) and result.final(1000) == pytest.approx(-10.0)


def test_iqm_drops_the_outer_quarters():
    assert parity.iqm(np.array([1.0, 2.0, 3.0, 4.0, 1000.0, -1000.0, 5.0, 6.0])) == pytest.approx(3.5)
    assert parity.iqm(np.array([7.0])) == 7.0


def test_the_bootstrap_interval_covers_a_zero_difference_and_excludes_a_clear_one():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 10, 10)
    low, high = parity.bootstrap_interval(noise - noise.mean())
    assert low < 0 < high
    low, high = parity.bootstrap_interval(noise - noise.mean() - 50)
    assert high < 0 and low > -70


def test_arms_are_compared_seed_by_seed_against_the_first(tmp_path):
    """Kept records of two arms: the summary pairs their seeds and flags the difference it shows."""
    for seed in range(6):
        for label, offset in (("good", 0.0), ("bad", -80.0)):
            evals = [(0, -60.0), (1000, 20.0 + 5 * seed + offset), (2000, 60.0 + 3 * seed + offset)]
            records = [{"kind": "eval", "step": s, "return_mean": r} for s, r in evals]
            records.append({"kind": "episode", "step": 300, "reward": 10.0 + offset})
            path = tmp_path / f"{label}-s{seed}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
    results = parity.load_kept(tmp_path, ["good", "bad"])
    summary = parity.summarise(results, ["good", "bad"], 2000)
    bad = summary["arms"]["bad"]
    assert bad["seeds"] == list(range(6))
    assert bad["final"]["difference"]["mean"] == pytest.approx(-80.0)
    assert bad["final"]["difference"]["excludes_zero"]
    assert bad["auc"]["difference"]["mean"] == pytest.approx(-60.0)  # (-40,000 - 80,000) / 2,000: 0 at step 0
    assert bad["train"]["difference"]["mean"] == pytest.approx(-80.0)
    text = parity.table(summary)
    assert "| bad | 6 |" in text and "-80.0 [" in text and "*" in text


def test_bad_command_lines_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parity.main(["--seeds", "1", "--arm", "a=", "--arm", "b="])
    assert "--seeds must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="is not LABEL=ARGS"):
        parity.main(["--arm", "no-equals-sign", "--arm", "b="])
    with pytest.raises(SystemExit, match="no env_tm.py in"):
        parity.main(["--arm", f"a@{tmp_path}=--learner inline", "--arm", "b="])
    with pytest.raises(SystemExit, match="no <label>-s<seed>.jsonl files"):
        parity.main(["--from-kept", str(tmp_path)])


def test_the_harness_departs_only_where_recorded_and_says_so():
    """The harness's runs must be marked unpinned (its schedules are faster than the pin's)."""
    harness = " ".join(parity.HARNESS)
    for flag in ("--unpin-epsilon", "--unpin-learning-rate", "--unpin-target-update"):
        assert flag in harness
    command = parity.command(parity.Arm("x", ["--learner", "beside"]), 3, parity.parse_args(["--arm", "x="]))
    assert command[-2:] == ["--learner", "beside"] and "--seed" in command and "3" in command


def test_a_run_that_fails_stops_the_harness_in_one_line_naming_its_log(tmp_path, capsys):
    args = ["--seeds", "2", "--steps", "1000", "--root", str(tmp_path), "--arm", "bad=--set nonsense_key=1"]
    with pytest.raises(SystemExit, match=r"bad-s\d exited with \d: .*nonsense_key.* \(log: "):
        parity.main(args)
