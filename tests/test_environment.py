"""environment.py: which environment a run gets. On Windows a game that does not answer never turns into
an embedded-track run without the user's yes."""

from __future__ import annotations

import re

import pytest

import environment
from tm_config import Config, Runtime
from tm_game import TrackManiaSetupError

REASON = "nothing answers on 127.0.0.1:9000 (the OpenPlanet plugin 'TMRL Grab Data')"


@pytest.fixture
def no_game(monkeypatch):
    monkeypatch.setattr(environment, "check_tmrl_available", lambda config: REASON)


def on(monkeypatch, system: str) -> None:
    monkeypatch.setattr(environment.platform, "system", lambda: system)


def test_elsewhere_than_windows_auto_falls_back_to_the_embedded_track_saying_why(
    no_game, monkeypatch, capsys
):
    on(monkeypatch, "Linux")
    assert (
        environment.choose_environment("auto", Config(), ask=lambda question: pytest.fail("asked"))
        == "embedded"
    )
    assert (
        capsys.readouterr().out == f"TrackMania not used: {REASON}. Training on the embedded track instead.\n"
    )


@pytest.mark.parametrize("answer, chosen", [("y", "embedded"), ("YES ", "embedded"), ("", None), ("n", None)])
def test_on_windows_auto_asks_before_falling_back(no_game, monkeypatch, answer, chosen):
    on(monkeypatch, "Windows")
    questions = []

    def ask(question: str) -> str:
        questions.append(question)
        return answer

    if chosen is None:
        with pytest.raises(
            TrackManiaSetupError, match="not started: TrackMania does not answer; `--env embedded`"
        ):
            environment.choose_environment("auto", Config(), ask=ask)
    else:
        assert environment.choose_environment("auto", Config(), ask=ask) == chosen
    assert len(questions) == 1 and REASON in questions[0] and questions[0].endswith("instead? [y/N] ")


def test_on_windows_without_a_terminal_auto_stops_in_one_line(no_game, monkeypatch):
    on(monkeypatch, "Windows")
    monkeypatch.setattr(environment.sys, "stdin", None)  # pythonw, a scheduled task: nobody to ask
    with pytest.raises(TrackManiaSetupError) as error:
        environment.choose_environment("auto", Config())
    assert "\n" not in str(error.value) and REASON in str(error.value)
    assert "--check-trackmania" in str(error.value)


def test_on_windows_a_closed_input_counts_as_no(no_game, monkeypatch):
    on(monkeypatch, "Windows")

    def closed(question: str) -> str:
        raise EOFError

    with pytest.raises(TrackManiaSetupError, match="not started"):
        environment.choose_environment("auto", Config(), ask=closed)


def test_an_explicit_choice_never_asks(no_game, monkeypatch):
    on(monkeypatch, "Windows")
    never = lambda question: pytest.fail("asked")  # noqa: E731
    assert environment.choose_environment("embedded", Config(), ask=never) == "embedded"
    with pytest.raises(TrackManiaSetupError, match=re.escape(f"--env trackmania: {REASON}")):
        environment.choose_environment("trackmania", Config(), ask=never)


def test_what_an_environment_is_is_known_before_one_is_built():
    """The game runs on without the agent and a person can drive it; the embedded track waits and only the
    program drives it; a run without an environment (the scale-out trainer) has none."""
    from embedded_track import EmbeddedTrackEnv
    from trackmania import TrackManiaEnv

    assert environment.environment_class("trackmania") is TrackManiaEnv
    assert environment.environment_class("embedded") is EmbeddedTrackEnv
    assert (TrackManiaEnv.real_time, TrackManiaEnv.player_drives) == (True, True)
    assert (EmbeddedTrackEnv.real_time, EmbeddedTrackEnv.player_drives) == (False, False)
    # The game shows itself and its library's threads log to the run's trackmania.log; the embedded track
    # is drawn only when watched and has no threads to route.
    assert (TrackManiaEnv.on_screen, TrackManiaEnv.thread_log) == (True, "trackmania.log")
    assert (EmbeddedTrackEnv.on_screen, EmbeddedTrackEnv.thread_log) == (False, None)
    assert environment.environment_class("trainer") is None


def test_the_game_is_built_with_the_runtimes_watchdog_timeouts(monkeypatch):
    """The step and reset timeouts are runtime knobs (tm_config.Runtime): the game gets the run's values."""
    built = {}
    monkeypatch.setattr(environment, "make_trackmania_env", lambda config, **options: built.update(options))
    environment.build_environment("trackmania", Config(), 0, Runtime(game_step_timeout_s=2.5))
    assert built == {"step_timeout": 2.5, "reset_timeout": Runtime.game_reset_timeout_s}
    environment.build_environment("trackmania", Config(), 0)
    assert built == {"step_timeout": 10.0, "reset_timeout": 60.0}
