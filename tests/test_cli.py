"""cli.py: the command line (options, usage errors, --help, --show-config) and the exit codes, all answered
without importing torch."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT

import cli
import env_tm
from tm_config import Config


def test_help_lists_every_option():
    result = subprocess.run(
        [sys.executable, str(ROOT / "env_tm.py"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for option in ["--env", "--steps", "--device", "--seed", "--run-name", "--resume", "--fresh", "--set"]:
        assert option in result.stdout
    assert "--no-wandb" in result.stdout


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--eval-every", "-5"], "--eval-every must be >= 0"),
        (["--eval-every", "10", "--eval-episodes", "0"], "--eval-episodes must be >= 1"),
    ],
)
def test_bad_evaluation_options_fail_with_one_line(option, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(option)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--record-demos", "../x"], "--record-demos '../x' contains"),
        (["--record-demos", "ok", "--demos", "a"], "--record-demos records on this PC only"),
        (["--pretrain-steps", "5"], "--pretrain-steps learns from demonstrations: give them with --demos"),
        (["--record-demos", "ok", "--demo-episodes", "0"], "--demo-episodes must be >= 1"),
    ],
)
def test_bad_demonstration_options_are_usage_errors(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(arguments)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../tests", "contains '/'"),
        ("..", "points outside"),
        ("a/b", "contains '/'"),
        ("a\\b", "contains '\\\\'"),
        ("", "is empty"),
        ("   ", "is empty"),
        ("con", "is a device name Windows reserves"),
        ("NUL.txt", "is a device name Windows reserves"),
        ("run.", "ends with a dot or a space"),
        ("run ", "ends with a dot or a space"),
        ("what?", "contains '?'"),
    ],
)
def test_a_run_name_must_be_one_plain_folder_name(name, problem, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--run-name", name, "--checkpoint-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"--run-name {name!r} {problem}" in err
    assert not any(tmp_path.iterdir()), "nothing was created or moved"


def test_help_is_fast_explains_resuming_and_shows_each_default_once():
    import importlib.util

    modules = "('torch', 'gymnasium', 'wandb')"
    code = f"import sys, env_tm; print(sorted(m for m in {modules} if m in sys.modules))"
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.stdout.strip() == "[]", "importing env_tm must not import torch: --help answers at once"
    help_text = subprocess.run(
        [sys.executable, str(ROOT / "env_tm.py"), "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert time.perf_counter() - started < 30 and importlib.util.find_spec("torch") is not None
    flat = " ".join(help_text.split())
    assert "(default: None)" not in flat and "(default: True)" not in flat
    assert "default 10,000,000" in flat or "10,000,000" in flat, "the real step default is shown"
    assert "resumes from its newest good checkpoint" in flat and "seeds the agent" in flat
    assert "examples:" in help_text and "--diagnose" in help_text
    assert flat.count("(default: auto)") <= 1


@pytest.mark.parametrize(
    ("text", "steps"), [("60000", 60000), ("60_000", 60000), ("60,000", 60000), ("1e6", 10**6)]
)
def test_steps_are_read_as_people_write_them(text, steps):
    assert cli.parse_args(["--steps", text]).steps == steps
    assert cli.parse_args(["--eval-every", text]).eval_every == steps


@pytest.mark.parametrize(
    ("text", "message"),
    [("1.5", "'1.5' is not a whole number of steps"), ("ten", "'ten' is not a number of steps (e.g. 60000")],
)
def test_a_step_count_that_is_not_one_is_refused_in_one_line(text, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(["--steps", text])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_show_config_lists_every_key_marks_departures_and_sacred_keys(capsys):
    assert env_tm.main(["--show-config", "--set", "n_step=3"]) == cli.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + len(Config().to_dict())
    n_step = next(line for line in lines if line.split()[1:2] == ["n_step"])
    assert n_step.startswith("* ") and n_step.split()[2] == "3" and "(known-good 1)" in n_step
    target = next(line for line in lines if "target_network_update_frequency" in line)
    assert target.startswith("  ") and "sacred: --unpin-target-update to change" in target


def test_config_mistakes_are_refused_at_once_without_importing_torch(tmp_path):
    """A bad --set, a repeated one and a --diagnose too short to judge: one line each, before the learner
    (or even torch) starts, so the answer comes in a fraction of a second."""
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import env_tm;"
        "codes = [env_tm.main(a.split()) for a in sys.argv[2:]];"
        "print(codes, 'torch' in sys.modules)"
    )
    cases = ["--set batchsize=64", "--set n_step=3 --set n_step=2", "--diagnose 300"]
    result = subprocess.run(
        [sys.executable, "-c", script, str(ROOT), *cases], capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "[1, 1, 1] False", result.stdout + result.stderr
    errors = result.stderr.strip().splitlines()
    assert errors == [
        "error: unknown config key 'batchsize' (did you mean 'batch_size'? `python env_tm.py --show-config` "
        "lists every key)",
        "error: --set n_step is given twice (3, then 2): give it once",
        "error: --diagnose 300 is too short: the go/no-go criteria need at least 1,032 steps "
        "(1,000 learn steps)",
    ]


def test_show_config_into_a_closed_pipe_ends_quietly():
    """`python env_tm.py --show-config | head -2`: the reader leaves early; no error about a disk write."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "env_tm.py"), "--show-config"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    process.stdout.close()  # as `head` does once it has its lines: here before the first one
    assert process.wait(timeout=60) == 0
    assert process.stderr.read() == b""


def test_importing_cli_imports_no_torch():
    """env_tm.py, distributed.py and every refusal read the exit codes and options here: no torch."""
    code = "import sys, cli; print(sorted(m for m in ('torch', 'gymnasium', 'wandb') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_the_exit_codes_are_the_documented_ones():
    codes = [
        cli.EXIT_OK,
        cli.EXIT_ERROR,
        cli.EXIT_GAME,
        cli.EXIT_RED_FLAG,
        cli.EXIT_NO_GO,
        cli.EXIT_INTERRUPTED,
    ]
    assert codes == [0, 1, 3, 4, 5, 130]


def test_the_default_run_name_names_the_departures():
    assert cli.default_run_name("embedded", 0, [], False) == "embedded-seed0"
    assert cli.default_run_name("embedded", 3, ["n_step=3", "batch_size=64"], False) == (
        "embedded-seed3-batch_size=64+n_step=3"
    )
    assert cli.default_run_name("trackmania", 0, [], True) == "trackmania-diagnose-seed0"
    long = cli.default_run_name("embedded", 0, [f"key{k}=value{k}" for k in range(20)], False)
    assert len(long) < 80 and cli.run_name_problem(long) is None, "long departures are shortened, stay valid"
    assert cli.run_name_problem(cli.default_run_name("embedded", 0, ["demos=a,b", "x=1.5."], False)) is None
