"""run_log.py: the JSONL record, truncation on resume, and W&B failures that never stop training."""

from __future__ import annotations

import json

import pytest

import run_log
from run_log import RunLog, read_jsonl, truncate_after_step


def test_records_are_one_json_object_per_line_with_non_finite_values_kept(tmp_path):
    log = RunLog(tmp_path)
    log.write("step", 10, loss=float("nan"), q_mean=1.5)
    log.write("episode", 20, reward=float("-inf"), episode=1)
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert (
        first["kind"] == "step" and first["step"] == 10 and first["loss"] == "nan" and first["q_mean"] == 1.5
    )
    assert second["reward"] == "-inf" and second["episode"] == 1


def test_a_half_written_last_line_is_ignored(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "step", "step": 1}\n{"kind": "step", "st')
    assert read_jsonl(path) == [{"kind": "step", "step": 1}]


def test_truncate_after_step_drops_work_that_is_being_redone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"kind": "step", "step": s}) + "\n" for s in (10, 20, 30, 40)))
    with open(path, "a") as file:
        file.write(
            json.dumps({"kind": "event", "step": 35, "level": "red_flag", "name": "q_negative"}) + "\n"
        )
    assert truncate_after_step(path, 20) == 2
    assert [(r["kind"], r["step"]) for r in read_jsonl(path)] == [("step", 10), ("step", 20), ("event", 35)]
    assert truncate_after_step(tmp_path / "missing.jsonl", 5) == 0


class FakeWandb:
    """Mimics the parts of the wandb module RunLog uses: init() -> run with log/summary/finish/dir/id."""

    class Settings:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    def __init__(self, fail_init=False, fail_log=False):
        self.fail_init, self.fail_log, self.logged, self.init_kwargs = fail_init, fail_log, [], None

    def init(self, **kwargs):
        if self.fail_init:
            raise ConnectionError("api.wandb.ai unreachable")
        self.init_kwargs = kwargs
        outer = self

        class Run:
            id = kwargs.get("id") or "abc123"
            dir = str(kwargs["dir"]) + "/wandb/offline-run-x/files"
            url = "https://wandb.ai/x"
            summary: dict = {}

            def log(self, payload, step):
                if outer.fail_log:
                    raise OSError("disk full")
                outer.logged.append((step, payload))

            def finish(self):
                pass

        return Run()


def test_wandb_offline_without_api_key_and_same_id_on_resume(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    log = RunLog(tmp_path)
    run_id = log.start_wandb(
        "proj", "run", "resume-me", {"lr": 1e-4}, {"batch_size": {"pinned": 32, "used": 64}}
    )
    assert run_id == "resume-me"
    assert fake.init_kwargs["mode"] == "offline" and fake.init_kwargs["resume"] == "allow"
    assert fake.init_kwargs["config"]["departures_from_known_good"] == {
        "batch_size": {"pinned": 32, "used": 64}
    }
    assert (
        "W&B offline (no WANDB_API_KEY or `wandb login`)" in log.wandb_note
        and "the commands that upload it are printed at the end" in log.wandb_note
    )
    log.write("episode", 40, reward=3.0)
    log.write("event", 41, level="red_flag", name="q_negative", message="Q -12 < -10")
    assert fake.logged[0] == (40, {"episode/step": 40, "episode/reward": 3.0})
    log.close()


@pytest.mark.parametrize("failure", ["init", "log"])
def test_wandb_failure_is_reported_once_and_jsonl_continues(tmp_path, monkeypatch, failure):
    fake = FakeWandb(fail_init=failure == "init", fail_log=failure == "log")
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    log = RunLog(tmp_path)
    log.start_wandb("proj", "run", None, {}, {})
    log.write("step", 1, loss=1.0)
    log.write("step", 2, loss=0.5)
    log.close()
    assert "JSONL only" in log.wandb_note
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_log_truncation_keeps_writing_to_the_same_file(tmp_path):
    log = RunLog(tmp_path)
    for step in (10, 20, 30):
        log.write("step", step)
    assert log.truncate_after_step(15) == 2
    log.write("event", 15, level="rollback")
    log.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [10, 15]


def test_wandb_login_through_netrc_counts_as_logged_in(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert run_log.wandb_logged_in()
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    assert not run_log.wandb_logged_in()


def test_metrics_file_name_is_stable():
    assert run_log.METRICS_FILE == "metrics.jsonl"


def test_wandb_steps_only_increase_and_redone_steps_keep_their_first_version(tmp_path, monkeypatch):
    """A learner beside the actor logs learn steps a little behind the actor's records; a resumed run
    redoes steps W&B already has. W&B refuses (and prints a warning for) any step below its newest."""
    logged: list[tuple[int, dict]] = []

    class Run:
        step, id, dir, url = 500, "abc", str(tmp_path), "https://example.invalid/run"
        summary: dict = {}

        def log(self, payload, step):
            assert step >= (logged[-1][0] if logged else 0), "W&B would drop this record with a warning"
            logged.append((step, payload))

    import wandb

    monkeypatch.setattr(wandb, "init", lambda **kwargs: Run())
    monkeypatch.setenv("WANDB_MODE", "online")
    log = RunLog(tmp_path)
    log.start_wandb("p", "r", "abc", {}, {})
    log.write("step", 400)  # redone after a resume from step 400: W&B has it already
    log.write("episode", 600)
    log.write("step", 590)  # a learn step reported after the actor's episode record
    log.write("episode", 700)
    log.close()
    assert [(step, payload.get("step/step", payload.get("episode/step"))) for step, payload in logged] == [
        (600, 600),
        (600, 590),
        (700, 700),
    ]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [400, 600, 590, 700], (
        "JSONL keeps all"
    )
