"""compare_runs.py: synthetic runs in our JSONL format (and a mocked W&B run) through the CLI's main()."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from run_logs import (
    FAILED_DEPARTURES,
    RACE_FINISHED,
    RACE_TIMES,
    by_name,
    failed_episodes,
    healthy_episodes,
    race_episodes,
    read_png_size,
    write_run,
)

import compare_runs
import run_plots
import run_records
from compare_runs import main
from run_checks import DEFAULT_ENVELOPE, FAIL, NO_DATA, PASS, check_run
from run_records import load_run


@pytest.fixture
def no_plot(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """For tests about the report: skip drawing (about 1 s a plot); the PNG has tests of its own."""
    drawn: list[Path] = []

    def record(runs: Any, envelope: Any, out: Path, x_axis: str = "episode", **options: Any) -> Path:
        drawn.append(out)
        return out

    monkeypatch.setattr(compare_runs, "plot_runs", record)
    return drawn


def test_a_run_inside_the_envelope_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_plot: list[Path]
) -> None:
    run = write_run(tmp_path / "healthy", healthy_episodes())
    checks = check_run(load_run(str(run)), DEFAULT_ENVELOPE)
    assert [c for c in checks if c.status != PASS] == []
    assert len(checks) >= 20
    out = tmp_path / "healthy.png"
    assert main([str(run), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "healthy: PASS" in text and "none: every run uses the known-good values" in text
    assert no_plot == [out] and f"Plot: {out}" in text


def test_the_seeds_failed_run_fails_for_the_right_reasons(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_plot: list[Path]
) -> None:
    run = write_run(tmp_path / "soft-updates", failed_episodes(), FAILED_DEPARTURES)
    status = by_name(check_run(load_run(str(run / "metrics.jsonl")), DEFAULT_ENVELOPE))
    whole = "whole run"
    assert status[(whole, "q_negative")] == FAIL
    assert status[(whole, "loss_spike")] == FAIL
    assert status[(whole, "early_exploitation")] == FAIL
    assert status[(whole, "reward_decline")] == FAIL
    assert status[("episodes 0-500", "q_values_min")] == FAIL  # went negative before episode 500
    assert status[("episodes 0-500", "q_values_trend")] == FAIL  # 10 -> -100 over episodes 400-500
    assert status[("episodes 500-1500", "q_values_level")] == FAIL
    assert status[("episodes 500-1500", "epsilon_level")] == FAIL
    assert status[("episodes 1500-2500", "q_values_level")] == NO_DATA  # the run ended at episode 700
    assert status[("episodes 0-500", "loss_level")] == PASS  # the early loss looked fine

    assert main([str(run), "--out", str(tmp_path / "failed.png")]) == 1
    text = capsys.readouterr().out
    assert "soft-updates: FAIL" in text
    for reason in ("q_negative (whole run)", "loss_spike (whole run)", "early_exploitation (whole run)"):
        assert reason in text
    assert "at episode" in text  # the evidence: where the flag first tripped


def test_healthy_vs_failed_prints_departures_and_draws_one_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    healthy = write_run(tmp_path / "healthy", healthy_episodes())
    failed = write_run(tmp_path / "soft-updates", failed_episodes(), FAILED_DEPARTURES)
    out = tmp_path / "plots" / "comparison.png"
    assert main([str(healthy), str(failed), "--out", str(out)]) == 1
    text = capsys.readouterr().out
    table = text[text.index("Config departures") : text.index("Envelope")]
    row = next(line for line in table.splitlines() if line.strip().startswith("learning_rate"))
    assert row.split()[1:] == ["0.0001", "0.0001", "0.001"]  # known-good, healthy, soft-updates
    assert "healthy: PASS" in text and "soft-updates: FAIL" in text
    width, height = read_png_size(out)
    assert (width, height) == (1700, 900)
    assert out.stat().st_size > 20_000  # curves and bands, not a blank canvas


def test_different_lengths_and_a_missing_metric(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    long = write_run(tmp_path / "long", healthy_episodes(2500))
    short_episodes = healthy_episodes(300, seed=1)
    short = write_run(tmp_path / "short", {k: v for k, v in short_episodes.items() if k != "loss"})
    out = tmp_path / "mixed.png"
    # 13 of the short run's 22 checks have no data: no check failed, but that is not a pass either
    assert main([str(long), str(short), "--out", str(out)]) == compare_runs.EXIT_NO_VERDICT == 3
    text = capsys.readouterr().out
    assert "NO DATA" in text and "no loss data" in text
    assert "  long: PASS (22 pass, 0 fail, 0 no data)\n" in text
    assert "  short: NO VERDICT (9 pass, 0 fail, 13 no data): too little data to judge\n" in text
    status = by_name(check_run(load_run(str(short)), DEFAULT_ENVELOPE))
    assert status[("episodes 0-500", "loss_level")] == NO_DATA
    assert status[("whole run", "loss_spike")] == NO_DATA
    assert status[("whole run", "reward_decline")] == NO_DATA  # 300 episodes < the 500-episode window
    assert status[("episodes 0-500", "q_values_level")] == PASS
    assert read_png_size(out)[0] > 0


# --- usage errors ----------------------------------------------------------------------------------
def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path / "r", healthy_episodes(50))
    assert main([]) == 2
    assert main([str(run), "--x", "time"]) == 2
    assert main([str(run), "--envelope", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}", encoding="utf-8")
    assert main([str(run), "--envelope", str(tmp_path / "bad.json")]) == 2


def test_envelope_from_a_file(tmp_path: Path, no_plot: list[Path]) -> None:
    envelope = json.loads(json.dumps(DEFAULT_ENVELOPE))
    envelope["phases"] = envelope["phases"][:1]
    path = tmp_path / "envelope.json"
    path.write_text(json.dumps(envelope), encoding="utf-8")
    run = write_run(tmp_path / "r", healthy_episodes(600))
    assert main([str(run), "--envelope", str(path), "--out", str(tmp_path / "e.png")]) == 0


def test_a_missing_run_is_one_line_and_the_others_still_compare(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_plot: list[Path]
) -> None:
    run = write_run(tmp_path / "r", healthy_episodes(600))
    missing = tmp_path / "nothing" / "metrics.jsonl"
    assert main([str(run), str(missing), "--out", str(tmp_path / "m.png")]) == 1
    text = capsys.readouterr().out
    assert f"error: {missing}: not found" in text and "r: PASS" in text


# --- W&B -------------------------------------------------------------------------------------------
class FakeRun:
    """The slice of wandb.apis.public.Run that compare_runs uses: config, name, id, scan_history, history."""

    def __init__(self, rows: list[dict[str, Any]], config: dict[str, Any]) -> None:
        self._rows = rows
        self.config = config
        self.name = "c643zifs-name"
        self.id = "c643zifs"

    def scan_history(self, keys: list[str] | None = None, page_size: int = 1000, **_: Any):
        return iter([dict(row) for row in self._rows])

    def history(self, samples: int = 500, keys: list[str] | None = None, pandas: bool = True, **_: Any):
        return [dict(row) for row in self._rows][:samples]


class FakeApi:
    calls: list[str] = []

    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    def run(self, path: str) -> FakeRun:
        FakeApi.calls.append(path)
        rows: list[dict[str, Any]] = []
        for episode in range(1, 601):  # the seed's code logged once per episode, W&B adds _step etc.
            rows.append(
                {
                    "_step": 2 * episode,
                    "_runtime": 1.0 * episode,
                    "Episode": episode,
                    "Episode Reward": 20.0 + 0.05 * episode,
                    "Mean Q": 0.03 * episode,
                    "Epsilon": 1.0 - 0.0001 * episode,
                    "Learning Rate": 1e-4,
                }
            )
            rows.append({"_step": 2 * episode + 1, "Loss": 5.0 - 0.004 * episode})  # logged separately
        config = {"learning_rate": {"value": 0.0001, "desc": None}, "batch_size": 32, "_wandb": {"x": 1}}
        return FakeRun(rows, config)


@pytest.fixture
def online_wandb(monkeypatch: pytest.MonkeyPatch) -> type[FakeApi]:
    import wandb

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # fake: the Api is mocked, nothing goes out
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(wandb, "Api", FakeApi)
    FakeApi.calls = []
    return FakeApi


def test_wandb_run_is_read_and_normalised(online_wandb: type[FakeApi]) -> None:
    run = load_run("my-entity/rainbow-tm/c643zifs")
    assert online_wandb.calls == ["my-entity/rainbow-tm/c643zifs"]
    assert run.label == "c643zifs-name" and run.source == "wandb:my-entity/rainbow-tm/c643zifs"
    assert run.episodes == 600 and run.episode[0] == 1 and run.episode[-1] == 600
    assert run.reward[0] == pytest.approx(20.05) and run.q_mean[99] == pytest.approx(3.0)
    assert run.epsilon[-1] == pytest.approx(0.94)
    # loss rows carry no episode: interpolated at each episode's _step from the neighbouring loss rows
    assert run.loss[9] == pytest.approx(5.0 - 0.004 * 9.5)
    assert run.config == {"learning_rate": 0.0001, "batch_size": 32}
    assert run.red_flags is None


def test_wandb_and_jsonl_runs_compare_together(
    online_wandb: type[FakeApi], tmp_path: Path, capsys: pytest.CaptureFixture[str], no_plot: list[Path]
) -> None:
    ours = write_run(tmp_path / "ours", healthy_episodes(600), {"batch_size": {"pinned": 32, "used": 64}})
    url = "https://wandb.ai/my-entity/rainbow-tm/runs/c643zifs?workspace=user"
    code = main([str(ours), url, "--out", str(tmp_path / "w.png")])
    text = capsys.readouterr().out
    assert online_wandb.calls == ["my-entity/rainbow-tm/c643zifs"]
    row = next(line for line in text.splitlines() if line.strip().startswith("batch_size"))
    assert row.split()[1:] == ["32", "64", "32"]
    assert "c643zifs-name: PASS (17 pass, 0 fail, 4 no data)" in text and code == 0


def test_a_wandb_run_alone_is_compared(
    online_wandb: type[FakeApi], capsys: pytest.CaptureFixture[str], no_plot: list[Path]
) -> None:
    # it records only some config keys: the others have nothing to be compared with (this used to crash)
    assert main(["my-entity/rainbow-tm/c643zifs"]) == 0
    text = capsys.readouterr().out
    assert "none: every run uses the known-good values" in text and "UNPINNED" not in text
    assert "  c643zifs-name  no race data (its episodes do not record `finished`)" in text


def test_offline_wandb_is_one_line_and_never_calls_the_api(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_plot: list[Path]
) -> None:
    import wandb

    def no_network(*_: Any, **__: Any) -> None:
        raise AssertionError("wandb.Api() must not be called when W&B is offline")

    monkeypatch.setattr(wandb, "Api", no_network)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(run_records.RunLoadError, match=r"W&B is offline .*wandb login"):
        load_run("my-entity/rainbow-tm/c643zifs")

    monkeypatch.setenv("WANDB_MODE", "offline")
    ours = write_run(tmp_path / "ours", healthy_episodes(600))
    assert main([str(ours), "my-entity/rainbow-tm/c643zifs", "--out", str(tmp_path / "o.png")]) == 1
    text = capsys.readouterr().out
    errors = [line for line in text.splitlines() if "c643zifs: W&B is offline" in line]
    assert len(errors) == 2  # listed with the runs, and again under the summary
    assert "WANDB_MODE=offline" in errors[0] and "ours: PASS" in text


def test_wandb_errors_are_one_line(online_wandb: type[FakeApi], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: FakeApi, path: str) -> FakeRun:
        raise ValueError("Could not find run <Run my-entity/rainbow-tm/nope>\nsecond line")

    monkeypatch.setattr(FakeApi, "run", broken)
    with pytest.raises(run_records.RunLoadError) as error:
        load_run("my-entity/rainbow-tm/nope")
    assert "\n" not in str(error.value) and "ValueError: Could not find run" in str(error.value)


# --- unpinned runs ---------------------------------------------------------------------------------
FAST_LR = {"learning_rate": {"pinned": 0.0001, "used": 0.0003}}


def test_a_recorded_unpinned_run_is_reported_and_marked_in_the_legend(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_plot: list[Path]
) -> None:
    fast = write_run(tmp_path / "fast-lr", healthy_episodes(600), FAST_LR, unpinned=["learning_rate"])
    pinned = write_run(tmp_path / "pinned", healthy_episodes(600), unpinned=[])
    assert load_run(str(fast)).unpinned == {"learning_rate": 0.0003}
    assert load_run(str(pinned)).unpinned == {}
    main([str(fast), str(pinned), "--out", str(tmp_path / "u.png")])
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if "UNPINNED" in line] == [
        "UNPINNED fast-lr: departs from the sacred learning_rate (0.0003, pinned 0.0001)"
    ]
    figure = run_plots.build_figure([load_run(str(fast)), load_run(str(pinned))], DEFAULT_ENVELOPE)
    for ax in figure.axes:  # every legend: the metric panels' and the race panel's
        legend = ax.get_legend()
        texts = [t.get_text() for t in legend.get_texts()] if legend else []
        assert "fast-lr" not in texts
        if "pinned" in texts:
            assert "fast-lr (unpinned)" in texts and "pinned (unpinned)" not in texts
    assert "fast-lr (unpinned) vs pinned against" in figure.get_suptitle()


def test_an_older_run_without_the_record_is_caught_by_its_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_plot: list[Path]
) -> None:
    departures = {
        "target_network_update_frequency": {"pinned": 1500, "used": 500},
        "epsilon_decay_to": {"pinned": 2_500_000, "used": 250_000},
        "batch_size": {"pinned": 32, "used": 64},  # not sacred: a departure, not an unpinned run
    }
    old = write_run(tmp_path / "old", healthy_episodes(600), departures)  # no "unpinned" key at all
    batch = write_run(tmp_path / "batch", healthy_episodes(600), {"batch_size": {"pinned": 32, "used": 64}})
    assert load_run(str(old)).unpinned == {
        "target_network_update_frequency": 500,
        "epsilon_decay_to": 250_000,
    }
    assert load_run(str(batch)).unpinned == {}
    main([str(old), str(batch), "--out", str(tmp_path / "o.png")])
    lines = [line for line in capsys.readouterr().out.splitlines() if "UNPINNED" in line]
    assert lines == [
        "UNPINNED old: departs from the sacred target_network_update_frequency (500, pinned 1500), "
        "epsilon_decay_to (250000, pinned 2500000)"
    ]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"learning_rate": 0.0003, "unpinned": ["learning_rate"]}, {"learning_rate": 0.0003}),
        ({"learning_rate": {"value": 0.0003, "desc": None}}, {"learning_rate": 0.0003}),  # no record
        ({"target_network_update_frequency": 500}, {"target_network_update_frequency": 500}),
        ({"target_network_update_frequency": 1500.0, "unpinned": []}, {}),  # a float for the int: same value
        (
            {"learning_rate": 0.0001, "epsilon_end": 0.05, "epsilon_cutoff": 10},
            {"epsilon_end": 0.05, "epsilon_cutoff": 10},
        ),
    ],
)
def test_wandb_runs_are_caught_too(
    online_wandb: type[FakeApi],
    monkeypatch: pytest.MonkeyPatch,
    config: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    original = FakeApi.run

    def with_config(self: FakeApi, path: str) -> FakeRun:
        run = original(self, path)
        run.config = {**run.config, **config}
        return run

    monkeypatch.setattr(FakeApi, "run", with_config)
    run = load_run("my-entity/rainbow-tm/c643zifs")
    assert run.unpinned == expected
    assert "unpinned" not in run.config  # a record about the config, not a config key to compare


# --- race results ----------------------------------------------------------------------------------
def test_race_results_table(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_plot: list[Path]) -> None:
    racer = write_run(tmp_path / "racer", race_episodes(RACE_FINISHED, RACE_TIMES))
    never = write_run(tmp_path / "never", race_episodes([False] * 4, {}))
    old = write_run(tmp_path / "old", healthy_episodes(10))  # episodes without `finished`
    summary = run_records.race_summary(load_run(str(racer)))
    assert summary == run_records.RaceSummary(
        episodes=10, finished=5, best=47.25, best_episode=8, best_step=2016, median=48.5
    )
    assert summary.rate == 0.5
    assert run_records.race_summary(load_run(str(old))) is None

    main([str(racer), str(never), str(old), "--out", str(tmp_path / "r.png")])
    text = capsys.readouterr().out
    table = text[text.index("Race results") : text.index("Envelope")].splitlines()
    assert table[1].split() == ["run", "episodes", "finished", "finish", "rate", "best", "time", "best", "at",
                                "median", "time"]  # fmt: skip
    rows = {line.split()[0]: line for line in table[2:] if line.strip()}
    assert rows["racer"].split() == ["racer", "10", "5", "50.0%", "47.250", "episode", "8", "(step", "2,016)",
                                     "48.500"]  # fmt: skip
    assert rows["never"].split() == ["never", "4", "0", "0.0%", "-", "-", "-"]
    assert rows["old"].split(maxsplit=1)[1] == "no race data (its episodes do not record `finished`)"
    assert "%" not in rows["old"]  # never 0%


def test_wandb_race_columns(online_wandb: type[FakeApi], monkeypatch: pytest.MonkeyPatch) -> None:
    original = FakeApi.run

    def with_races(self: FakeApi, path: str) -> FakeRun:
        run = original(self, path)
        for row in run._rows:
            if "Episode" in row:  # our W&B mirror of the JSONL: episode/finished, episode/race_time
                row["episode/finished"] = row["Episode"] % 3 == 0
                if row["Episode"] % 3 == 0:
                    row["episode/race_time"] = 100.0 - row["Episode"] / 10
        return run

    monkeypatch.setattr(FakeApi, "run", with_races)
    summary = run_records.race_summary(load_run("my-entity/rainbow-tm/c643zifs"))
    assert summary == run_records.RaceSummary(
        episodes=600, finished=200, best=40.0, best_episode=600, best_step=1200, median=pytest.approx(69.85)
    )
    assert run_records.detect_race_keys(["_step", "Episode", "Loss"]) == {
        "finished": None,
        "race_time": None,
    }


def test_no_data_never_reads_as_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_plot: list[Path]
) -> None:
    empty = write_run(tmp_path / "empty", {"episode": np.arange(0)})
    assert main([str(empty), "--out", str(tmp_path / "e.png")]) == 3
    summary = capsys.readouterr().out.split("Summary:\n")[1].splitlines()
    assert summary[0] == "  empty: NO VERDICT (2 pass, 0 fail, 20 no data): too little data to judge"
    assert "PASS" not in summary[0].split("(")[0]

    healthy = write_run(tmp_path / "healthy", healthy_episodes(600))
    failed = write_run(tmp_path / "failed", failed_episodes(), FAILED_DEPARTURES)
    assert main([str(healthy), str(empty), "--out", str(tmp_path / "e.png")]) == 3
    assert main([str(failed), str(empty), "--out", str(tmp_path / "e.png")]) == 1  # a FAIL outranks it
    assert main([str(empty), str(tmp_path / "missing"), "--out", str(tmp_path / "e.png")]) == 1
    assert main([str(healthy), "--out", str(tmp_path / "e.png")]) == 0


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "exit codes: 0 every run PASSes; 1 a run FAILs or could not be read; 3 none failed" in text
    assert "NO VERDICT" in text and "2 usage errors" in text
    assert "default: comparison.png in the first run's folder" in text
    assert "exit code: 0 when every run has the verdict pass" in " ".join(
        compare_runs.__doc__.lower().split()
    )


def test_the_plot_goes_into_the_first_runs_folder_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    first = write_run(tmp_path / "runs" / "first", healthy_episodes(60))
    second = write_run(tmp_path / "runs" / "second", healthy_episodes(60, seed=1))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    main([str(first), str(second)])
    assert f"Plot: {first / 'comparison.png'}\n" in capsys.readouterr().out
    assert read_png_size(first / "comparison.png") == (1700, 900)
    assert not (elsewhere / "comparison.png").exists() and not (second / "comparison.png").exists()


def test_default_plot_path_for_a_file_and_for_a_wandb_first_run(
    online_wandb: type[FakeApi],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_plot: list[Path],
) -> None:
    ours = write_run(tmp_path / "ours", healthy_episodes(60))
    monkeypatch.chdir(tmp_path)
    main([str(ours / "metrics.jsonl")])
    main(["my-entity/rainbow-tm/c643zifs", str(ours)])
    assert no_plot == [ours / "comparison.png", Path("comparison.png")]
    assert capsys.readouterr().out.rstrip().endswith("Plot: comparison.png")


def test_out_creates_folders_and_names_a_png(tmp_path: Path, no_plot: list[Path]) -> None:
    run = write_run(tmp_path / "r", healthy_episodes(60))
    main([str(run), "--out", str(tmp_path / "a" / "b" / "cmp")])
    assert no_plot == [tmp_path / "a" / "b" / "cmp.png"]  # savefig would add .png itself: say so


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (".", "is a folder; give a file name"),
        ("a-file/plot.png", "a-file is a file, not a folder"),
        ("plot.xyz", "'.xyz' is not a picture type matplotlib writes"),
    ],
)
def test_a_bad_out_path_is_one_line_and_exit_2_before_anything_is_read(
    online_wandb: type[FakeApi],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    out: str,
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("x", encoding="utf-8")
    assert main(["my-entity/rainbow-tm/c643zifs", "--out", out]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: --out ") and captured.err.count("\n") == 1
    assert message in captured.err and "Traceback" not in captured.err
    assert online_wandb.calls == [] and captured.out == ""  # nothing was downloaded, nothing printed


def test_a_plot_that_cannot_be_written_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(runs: Any, envelope: Any, out: Path, x_axis: str = "episode", **options: Any) -> Path:
        raise PermissionError(13, "Permission denied", str(out))

    monkeypatch.setattr(compare_runs, "plot_runs", refuse)
    run = write_run(tmp_path / "r", healthy_episodes(600))
    assert main([str(run)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"error: cannot write the plot (PermissionError: [Errno 13] Permission denied: "
        f"'{run / 'comparison.png'}'); give another --out PATH\n"
    )
    assert "r: PASS" in captured.out and "Plot:" not in captured.out


def test_the_default_plot_is_git_ignored() -> None:
    ignored = (Path(__file__).resolve().parent.parent / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert "comparison.png" in ignored


# --- greedy evaluations: the learning curves (what bench/compare_curves.py did) ----------------------
def write_curve(folder: Path, evals: list[tuple[int, float]], env: str = "embedded", **extra: Any) -> Path:
    """A run with a start record, one episode and eval records (mean, and a spread over the tracks)."""
    folder.mkdir(parents=True)
    records = [
        {"kind": "run", "step": 0, "time": 0.0, "event": "start", "env": env, "departures": {}, **extra}
    ]
    records.append({"kind": "episode", "step": 5, "time": 0.0, "episode": 1, "reward": 1.0})
    records += [
        {"kind": "eval", "step": s, "time": 0.0, "return_mean": r, "return_std": 10.0} for s, r in evals
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_curves_give_steps_to_400_and_700_and_the_final_mean_within_the_shortest_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_plot: list[Path]
) -> None:
    k = 10_000
    fast = write_curve(tmp_path / "fast", [(0, -240), (k, 420), (2 * k, 380), (3 * k, 710), (4 * k, 690)])
    slow = write_curve(tmp_path / "slow", [(0, -240), (k, -200), (2 * k, 100), (3 * k, 450)])
    late = write_curve(tmp_path / "late", [(0, -240), (k, -210), (2 * k, 405), (3 * k, 520), (4 * k, 800)])
    out = tmp_path / "curves.json"
    main([f"a={fast}", f"b={slow}", f"a={late}", "--json", str(out), "--reference", "none"])
    text = capsys.readouterr().out
    assert "within 30,000 steps" in text, "the budget is the shortest run's last evaluation"
    groups = json.loads(out.read_text())["groups"]
    a, b = groups["a"]["runs"], groups["b"]["runs"]
    assert [(m["steps_to_400"], m["steps_to_700"]) for m in a] == [(10_000, 30_000), (20_000, None)]
    assert (b[0]["steps_to_400"], b[0]["steps_to_700"]) == (30_000, None)
    assert a[0]["final"] == pytest.approx((420 + 380 + 710) / 3)  # the last 3 within the budget: not 40k
    assert a[1]["final"] == pytest.approx((-210 + 405 + 520) / 3)
    assert groups["a"]["final_mean"] == pytest.approx((a[0]["final"] + a[1]["final"]) / 2)
    table = text[text.index("Greedy evaluations") :].splitlines()
    row = next(line for line in table if line.strip().startswith("b: slow"))
    assert row.split()[-5:] == ["30,000", "not", "reached", "116.7", "450.0"]
    group_row = next(line for line in table if line.strip().startswith("a ") and "2" in line)
    assert "10,000, 20,000" in group_row


def test_the_kept_curve_files_compare_with_their_names_counts_and_a_drawn_evaluation_panel(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Issue 27: on the repository's kept curves the tool once said "0 episodes, 0 steps", drew five
    empty panels and labelled both runs `curves`."""
    root = Path(compare_runs.__file__).resolve().parent / "bench" / "curves"
    specs = [str(root / f"curve-pin-s{seed}.jsonl") for seed in (0, 1)]
    main([*specs, "--out", str(tmp_path / "kept.png")])
    text = capsys.readouterr().out
    assert "curve-pin-s0: " in text and "curve-pin-s1: " in text and "curves#2" not in text
    assert "(0 episodes, 100,000 steps, 11 evaluations; embedded)" in text
    assert "70,315" in text and "622.2" in text  # steps to 400 and the best, as BENCHMARKS section 9 says
    runs = [load_run(spec) for spec in specs]
    figure = run_plots.build_figure(runs, DEFAULT_ENVELOPE, "step")
    assert len(figure.axes) == 1, "no episode records: the evaluation panel alone, not empty ones"
    labels = [line.get_label() for line in figure.axes[0].lines]
    assert "curve-pin-s0 (unpinned)" in labels and "curve-pin-s1 (unpinned)" in labels
    assert all(len(line.get_xdata()) == 11 for line in figure.axes[0].lines[:2])
    assert read_png_size(tmp_path / "kept.png") == (1100, 600)


def test_embedded_runs_are_drawn_against_steps_with_the_embedded_reference_not_the_envelope(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_curve(tmp_path / "mine", [(0, -240), (10_000, -100), (20_000, 300)])
    assert main([str(run), "--out", str(tmp_path / "m.png")]) in (0, 3)
    text = capsys.readouterr().out
    assert "the envelope's phases are TrackMania's, not checked" in text
    runs = [load_run(str(run))]
    reference = compare_runs.reference_runs(None, runs)
    assert [r.label for r in reference] == ["curve-pin-s0", "curve-pin-s1"]
    figure = run_plots.build_figure(runs, DEFAULT_ENVELOPE, "step", reference=reference, budget=20_000)
    evaluation = figure.axes[4]
    labels = [line.get_label() for line in evaluation.lines]
    assert "reference: curve-pin-s0 (unpinned)" in labels and "mine" in labels
    assert all(ax.get_xlabel() == "environment step" for ax in figure.axes[:4])
    legends = [
        t.get_text() for ax in figure.axes for t in (ax.get_legend().get_texts() if ax.get_legend() else [])
    ]
    assert not any(text.startswith("envelope") for text in legends), "no TrackMania envelope for it"
    assert "embedded track: the TrackMania envelope does not apply" in figure._suptitle.get_text()
    trackmania = load_run(str(write_run(tmp_path / "tm", healthy_episodes(60))))
    assert compare_runs.reference_runs(None, [trackmania]) == [], "TrackMania's reference is the envelope"


def test_the_step_count_is_the_newest_record_not_the_last_episode_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_plot: list[Path]
) -> None:
    run = write_run(tmp_path / "r", healthy_episodes(3), steps=[{"step": 3_636, "learn_step": 3_605}])
    main([str(run)])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  r: "))
    assert "(3 episodes, 3,636 steps, 3,605 learn steps, 0 evaluations; trackmania)" in line


def test_a_kept_curve_gives_the_same_figures_as_its_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_plot: list[Path]
) -> None:
    k = 10_000
    run = write_curve(tmp_path / "curve-pin-s0", [(0, -240), (k, 420), (2 * k, 710), (3 * k, 650)])
    kept = tmp_path / "kept"
    main([f"pin={run}", "--keep", str(kept), "--json", str(tmp_path / "a.json")])
    records = [json.loads(line) for line in (kept / "curve-pin-s0.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["run"] + ["eval"] * 4, "the start and evaluation records only"
    main([f"pin={kept / 'curve-pin-s0.jsonl'}", "--json", str(tmp_path / "b.json")])
    from_folder, from_kept = (json.loads((tmp_path / n).read_text())["groups"] for n in ("a.json", "b.json"))
    assert (
        from_kept["pin"]["runs"][0]["steps_to_700"] == from_folder["pin"]["runs"][0]["steps_to_700"] == 2 * k
    )
    assert from_kept["pin"]["final_mean"] == from_folder["pin"]["final_mean"]


def test_the_markdown_table_has_a_row_per_evaluation_and_a_column_per_run_within_the_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_plot: list[Path]
) -> None:
    a = write_curve(tmp_path / "a", [(0, -240), (10_000, 420.25), (20_412, 710), (30_000, 800)])
    b = write_curve(tmp_path / "b", [(0, -240), (10_000, -200)])
    main([f"x={a}", f"y={b}", "--steps", "25000", "--table", "--reference", "none"])
    text = capsys.readouterr().out
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0] == "| step (due) | x: a | y: b |"
    assert table[2:] == ["| 0 | -240.0 ± 10 | -240.0 ± 10 |", "| 10,000 | 420.2 ± 10 | -200.0 ± 10 |",
                         "| 20,000 | 710.0 ± 10 |  |"]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["a=", "RUN"], "a=: not LABEL=RUN"),
        (["a=nowhere.jsonl"], "nowhere.jsonl: not found"),
        (["RUN", "--hline", "lots=driver"], "--hline 'lots=driver' is not VALUE=LABEL"),
        (["RUN", "--final-evals", "0"], "--final-evals must be >= 1"),
        (["RUN", "--reference", "gone.jsonl"], "--reference gone.jsonl: not found"),
        (["RUN", "--keep", "FILE"], "cannot write"),
    ],
)
def test_bad_curve_options_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_plot: list[Path], argv: list[str], message: str
) -> None:
    run = write_curve(tmp_path / "run", [(0, -240), (10_000, 420)])
    (tmp_path / "file").write_text("a file, not a folder")
    places = {"RUN": str(run), "FILE": str(tmp_path / "file")}
    code = main([places.get(a, a) for a in argv])
    captured = capsys.readouterr()
    said = [line for line in (captured.out + captured.err).splitlines() if message in line]
    assert code in (1, 2) and said, captured.out + captured.err
