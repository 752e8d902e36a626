"""checkpoints.py: atomic writes, rotation, latest/best, and loading damaged or foreign files."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoints
from checkpoints import CheckpointError, CheckpointStore, describe_write_error, load_checkpoint


def state(step: int) -> dict:
    return {
        "step": step,
        "weights": torch.full((3,), float(step)),
        "replay": {"frames": np.full((2, 4, 4), step % 256, np.uint8), "rng": {"state": 2**70 + step}},
        "rewards": [1.5, np.float32(2.0)],
    }


def test_round_trip_restores_numpy_arrays_and_tensors(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    path = store.save(state(7), episode=1, step=7, is_best=False)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7
    assert isinstance(loaded["replay"]["frames"], np.ndarray) and loaded["replay"]["frames"].dtype == np.uint8
    assert np.all(loaded["replay"]["frames"] == 7)
    assert torch.equal(loaded["weights"], torch.full((3,), 7.0))
    assert loaded["replay"]["rng"]["state"] == 2**70 + 7
    assert loaded["rewards"] == [1.5, 2.0]


def test_rotation_keeps_the_last_n_plus_latest_and_best(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    for episode in range(1, 7):
        store.save(state(episode * 10), episode=episode, step=episode * 10, is_best=episode == 2)
    assert [p.name for p in store.periodic()] == [
        "ckpt_ep0000004_step0000000040.pt",
        "ckpt_ep0000005_step0000000050.pt",
        "ckpt_ep0000006_step0000000060.pt",
    ]
    assert load_checkpoint(store.latest_path)["step"] == 60
    assert load_checkpoint(store.best_path)["step"] == 20, "best survives the rotation of its periodic file"


def test_a_write_that_dies_midway_leaves_the_previous_latest_intact(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, keep_last=3)
    store.save(state(10), episode=1, step=10, is_best=False)

    def dying_save(obj, file):
        file.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", dying_save)
    with pytest.raises(OSError, match="No space left"):
        store.save(state(20), episode=2, step=20, is_best=False)
    monkeypatch.undo()
    assert load_checkpoint(store.latest_path)["step"] == 10
    assert [p.name for p in store.periodic()] == ["ckpt_ep0000001_step0000000010.pt"]
    assert not list(tmp_path.glob("*.tmp")), "the temporary file of the failed write is removed"


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("truncate", "is unreadable (truncated or corrupt): loading {what} raised RuntimeError"),
        ("garbage", "is unreadable (corrupt or not a checkpoint): {what} is not a torch checkpoint archive "
         "(pickle.UnpicklingError)"),
        ("empty", "is unreadable (truncated or corrupt): {what} is empty (EOFError)"),
    ],
)  # fmt: skip
def test_damaged_checkpoint_is_named_in_one_line(tmp_path, damage, expected):
    store = CheckpointStore(tmp_path, keep_last=3)
    path = store.save(state(10), episode=1, step=10, is_best=False)
    data = path.read_bytes()
    broken = {"truncate": data[: len(data) // 2], "garbage": b"\x00\xff" * 500, "empty": b""}[damage]
    path.write_bytes(broken)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    what = "the periodic checkpoint of episode 1 (step 10)"
    assert str(error.value) == f"checkpoint {path} " + expected.format(what=what)


def test_a_truncated_file_is_one_full_sentence_without_torch_text(tmp_path):
    """torch's own message (several sentences, `... If you are seeing this error, there ...`) is never
    quoted: the line says what the file is, what is wrong with it and the exception's class."""
    latest = tmp_path / "latest.pt"
    torch.save({"format_version": 1, "weights": torch.zeros(1000)}, latest)
    latest.write_bytes(latest.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(latest)
    assert str(error.value) == (
        f"checkpoint {latest} is unreadable (truncated or corrupt): loading the latest checkpoint raised "
        "RuntimeError"
    )


def test_a_file_that_cannot_be_opened_names_the_os_cause(tmp_path):
    folder = tmp_path / "latest.pt"
    folder.mkdir()  # opening a folder fails like an unreadable file does
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(folder)
    message = str(error.value)
    assert message.startswith(f"checkpoint {folder} cannot be read: ") and "\n" not in message
    if sys.platform != "win32":
        assert message == f"checkpoint {folder} cannot be read: {os.strerror(errno.EISDIR)} (EISDIR)"


def test_foreign_or_newer_version_file_is_refused(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="is not a rainbow-tm checkpoint"):
        load_checkpoint(foreign)
    future = tmp_path / "future.pt"
    torch.save({"format_version": 99, "step": 1}, future)
    with pytest.raises(CheckpointError, match="format version 99, this rainbow-tm reads version 1"):
        load_checkpoint(future)


def replace_with(path: Path, data: bytes) -> None:
    """Damage one name only: a new file (writing into `path` would also damage its hard links)."""
    path.unlink()
    path.write_bytes(data)


def test_resume_falls_back_to_the_newest_good_checkpoint_and_says_why(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    for episode in (1, 2, 3):
        store.save(state(episode * 10), episode=episode, step=episode * 10, is_best=False)
    replace_with(store.latest_path, b"corrupt")
    newest = store.periodic()[-1]
    replace_with(newest, newest.read_bytes()[:100])
    loaded = store.load_newest_good()
    assert loaded.state["step"] == 20 and loaded.path.name == "ckpt_ep0000002_step0000000020.pt"
    assert loaded.skipped == (
        f"checkpoint {store.latest_path} is unreadable (corrupt or not a checkpoint): the latest checkpoint "
        "is not a torch checkpoint archive (pickle.UnpicklingError)",
        f"checkpoint {newest} is unreadable (truncated or corrupt): loading the periodic checkpoint of "
        "episode 3 (step 30) raised RuntimeError",
    ), "latest.previous.pt is ckpt_ep2 (a hard link): tried once, under the periodic name"


def test_validation_failure_also_falls_back(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    store.save(state(10), episode=1, step=10, is_best=False)
    store.save(state(20), episode=2, step=20, is_best=False)

    def reject_step_20(loaded_state, path):
        if loaded_state["step"] == 20:
            raise CheckpointError(f"checkpoint {path} was made with an incompatible config: hidden_dim=64")

    loaded = store.load_newest_good(reject_step_20)
    assert loaded.state["step"] == 10
    assert all("incompatible config" in line for line in loaded.skipped)


def test_no_usable_checkpoint_is_one_clear_error(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    assert store.load_newest_good() is None, "an empty folder means a fresh start"
    (tmp_path / "latest.pt").write_bytes(b"junk")
    (tmp_path / "latest.previous.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as error:
        store.load_newest_good()
    assert str(error.value) == (
        f"no usable checkpoint in {tmp_path} (2 tried): checkpoint {tmp_path / 'latest.pt'} is unreadable "
        "(corrupt or not a checkpoint): the latest checkpoint is not a torch checkpoint archive "
        f"(struct.error); checkpoint {tmp_path / 'latest.previous.pt'} is unreadable (truncated or "
        "corrupt): the previous generation of latest.pt is empty (EOFError) (use --fresh to start over)"
    )


def test_unwritable_folder_and_full_disk_are_reported_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    run = blocker / "run"
    with pytest.raises(CheckpointError) as error:
        CheckpointStore(run, keep_last=3).check_writable(needed_bytes=1)
    message = str(error.value)
    assert message.startswith(f"checkpoint folder {run} is not writable: ") and "\n" not in message
    if sys.platform != "win32":
        assert message.endswith(
            f"part of the path {run} is a file, not a folder ({os.strerror(errno.ENOTDIR)}, ENOTDIR); move "
            "that file away or choose another checkpoint folder (--checkpoint-root)"
        )
    store = CheckpointStore(tmp_path / "run", keep_last=3)
    store.check_writable(needed_bytes=1)
    assert not list((tmp_path / "run").iterdir()), "the probe leaves nothing behind"
    with pytest.raises(CheckpointError, match=r"not enough free disk space .* GiB free"):
        store.check_writable(needed_bytes=2**60)


READ_ONLY_ADVICE = "make it writable or choose another checkpoint folder (--checkpoint-root)"
PERMISSION_ADVICE = (
    "check the folder's permissions (it may belong to another user) or, on Windows, whether another "
    "program such as an antivirus or a sync client has a checkpoint file locked"
)


@pytest.mark.skipif(sys.platform == "win32", reason="Windows ignores a folder's read-only mode bits")
def test_an_existing_read_only_run_folder_is_one_line_naming_folder_and_cause(tmp_path):
    """chmod 555: a real permission error (skipped as root, which ignores permissions; the test below
    covers the same message everywhere)."""
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        try:
            (run / "root-ignores-permissions").touch()
        except PermissionError:
            pass
        else:
            pytest.skip("this user (root) ignores folder permissions")
        with pytest.raises(CheckpointError) as error:
            CheckpointStore(run, keep_last=3).check_writable(needed_bytes=1)
    finally:
        run.chmod(0o755)
    assert str(error.value) == (
        f"checkpoint folder {run} is not writable: this user cannot write to {run} "
        f"({os.strerror(errno.EACCES)}, EACCES); {PERMISSION_ADVICE}"
    )


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.EROFS, "the folder {run} or its drive is read-only ({text}, EROFS); " + READ_ONLY_ADVICE),
        (errno.EACCES, "this user cannot write to {run} ({text}, EACCES); " + PERMISSION_ADVICE),
    ],
)
def test_check_writable_names_the_cause_for_an_existing_run_folder(tmp_path, monkeypatch, code, expected):
    """Runs everywhere (root ignores chmod): the probe write fails as on a read-only folder or drive."""
    run = tmp_path / "run"
    run.mkdir()

    def refuse(prefix, suffix, dir):
        raise OSError(code, os.strerror(code), os.path.join(dir, prefix + "x" + suffix))

    monkeypatch.setattr(checkpoints.tempfile, "mkstemp", refuse)
    with pytest.raises(CheckpointError) as error:
        CheckpointStore(run, keep_last=3).check_writable(needed_bytes=1)
    message = str(error.value)
    assert message == f"checkpoint folder {run} is not writable: " + expected.format(
        run=run, text=os.strerror(code)
    )
    assert "[Errno" not in message


FOLDER = Path("checkpoints") / "my-run"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ENOSPC", "the drive holding {folder} is full ({text}, ENOSPC); free disk space or choose another "
         "checkpoint folder (--checkpoint-root)"),
        pytest.param(
            "EDQUOT", "the disk quota for {folder} is used up ({text}, EDQUOT); free disk space or choose "
            "another checkpoint folder (--checkpoint-root)",
            marks=pytest.mark.skipif(not hasattr(errno, "EDQUOT"), reason="no EDQUOT on this platform"),
        ),
        ("EACCES", "this user cannot write to {folder} ({text}, EACCES); " + PERMISSION_ADVICE),
        ("EPERM", "this user cannot write to {folder} ({text}, EPERM); " + PERMISSION_ADVICE),
        ("EROFS", "the folder {folder} or its drive is read-only ({text}, EROFS); " + READ_ONLY_ADVICE),
        ("ENAMETOOLONG", "a file path under {folder} is too long for the file system ({text}, ENAMETOOLONG); "
         "use a shorter path (a shorter --run-name, or --checkpoint-root closer to the drive's root)"),
        ("EIO", "writing to {folder} failed ({text}, EIO)"),
    ],
)  # fmt: skip
def test_describe_write_error_names_the_cause_and_the_fitting_advice(name, expected):
    code = getattr(errno, name)
    message = describe_write_error(OSError(code, os.strerror(code)), FOLDER)
    assert message == expected.format(folder=FOLDER, text=os.strerror(code))
    assert "\n" not in message and "[Errno" not in message
    if name not in ("ENOSPC", "EDQUOT"):
        assert "free disk space" not in message, "disk space is the wrong advice for this cause"


def test_describe_write_error_without_an_errno_still_says_something():
    assert describe_write_error(OSError("the share went away"), FOLDER) == (
        f"writing to {FOLDER} failed (the share went away, OSError)"
    )
    locked = PermissionError(errno.EACCES, "The process cannot access the file because it is being used")
    assert describe_write_error(locked, FOLDER) == (
        f"this user cannot write to {FOLDER} (The process cannot access the file because it is being used, "
        f"EACCES); {PERMISSION_ADVICE}"
    ), "the OS's own words (Windows: a sharing violation) with the errno name"


def test_orphan_temporaries_are_removed(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    names = ["latest.next.pt.tmp", "latest.pt.abc.tmp", "latest.previous.pt.link.tmp"]
    for name in names:
        (tmp_path / name).write_bytes(b"partial")
    assert [p.name for p in store.remove_temporaries()] == sorted(names)
    assert not list(tmp_path.glob("*.tmp"))


def test_latest_generations_rotate_and_are_tried_once_each(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    assert list(store.candidates()) == []
    store.save_latest_only(state(1))  # a Ctrl+C in the first 10 episodes: no periodic checkpoint yet
    assert not store.previous_path.exists()
    store.save_latest_only(state(2))
    assert [load_checkpoint(p)["step"] for p in (store.latest_path, store.previous_path)] == [2, 1]
    assert [p.name for p in store.candidates()] == ["latest.pt", "latest.previous.pt"]

    store.save(state(10), episode=1, step=10, is_best=True)
    assert [load_checkpoint(p)["step"] for p in (store.latest_path, store.previous_path)] == [10, 2]
    assert [p.name for p in store.candidates()] == ["latest.pt", "latest.previous.pt"], (
        "latest.pt is a hard link of the periodic file: that file is tried once, as latest.pt"
    )
    store.save(state(20), episode=2, step=20, is_best=False)
    assert [load_checkpoint(p)["step"] for p in (store.latest_path, store.previous_path)] == [20, 10]
    assert [p.name for p in store.candidates()] == ["latest.pt", "ckpt_ep0000001_step0000000010.pt"], (
        "the previous generation is the periodic file of episode 1: tried once, under its periodic name"
    )
    store.save_latest_only(state(25))
    store.save_latest_only(state(27))
    assert [p.name for p in store.candidates()] == [
        "latest.pt",
        "latest.previous.pt",
        "ckpt_ep0000002_step0000000020.pt",
        "ckpt_ep0000001_step0000000010.pt",
    ]
    assert [load_checkpoint(p)["step"] for p in store.candidates()] == [27, 25, 20, 10]
    store.save(state(30), episode=3, step=30, is_best=False)
    assert [p.name for p in store.periodic()] == [
        "ckpt_ep0000002_step0000000020.pt",
        "ckpt_ep0000003_step0000000030.pt",
    ]
    assert load_checkpoint(store.best_path)["step"] == 10, "no rotation ever wrote through a hard link"
    assert load_checkpoint(store.previous_path)["step"] == 27
    assert not list(tmp_path.glob("*.tmp"))


def test_without_hard_links_the_generations_are_copies(tmp_path, monkeypatch):
    def no_links(source, destination):
        raise OSError(errno.EPERM, "hard links are not supported on this drive")

    monkeypatch.setattr(checkpoints.os, "link", no_links)
    store = CheckpointStore(tmp_path, keep_last=2)
    store.save(state(10), episode=1, step=10, is_best=False)
    store.save_latest_only(state(15))
    store.save(state(20), episode=2, step=20, is_best=False)
    assert [load_checkpoint(p)["step"] for p in store.candidates()] == [20, 15, 20, 10]


def test_a_truncated_latest_without_periodic_checkpoints_falls_back_to_the_previous_generation(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    store.save_latest_only(state(5))
    store.save_latest_only(state(9))
    latest = store.latest_path
    latest.write_bytes(latest.read_bytes()[:1000])  # a truncated file
    resumed = CheckpointStore(tmp_path, keep_last=3)  # the next start
    loaded = resumed.load_newest_good()
    assert loaded.path == resumed.previous_path and loaded.state["step"] == 5
    assert loaded.skipped == (
        f"checkpoint {latest} is unreadable (truncated or corrupt): loading the latest checkpoint raised "
        "RuntimeError",
    )
    resumed.save_latest_only(state(12))
    assert load_checkpoint(resumed.latest_path)["step"] == 12
    assert load_checkpoint(resumed.previous_path)["step"] == 5, (
        "the damaged latest.pt never replaces the good previous generation"
    )
    resumed.save_latest_only(state(14))
    assert [load_checkpoint(p)["step"] for p in resumed.candidates()] == [14, 12]


class Killed(BaseException):
    """The process dies at this step (like a kill, nothing after it runs)."""


FILESYSTEM_STEPS = [
    (checkpoints.torch, "save"),
    (checkpoints.os, "fsync"),
    (checkpoints.os, "replace"),
    (checkpoints.os, "link"),
    (checkpoints.shutil, "copyfile"),
]


def die_at_step(monkeypatch, at: int) -> list[str]:
    """The `at`-th write, flush, rename, link or copy raises Killed (a torch.save after half a file);
    returns the names of the steps taken."""
    steps: list[str] = []

    def counted(name, real):
        def step(*args, **kwargs):
            steps.append(name)
            if len(steps) == at:
                if name == "save":
                    args[1].write(b"half a checkpoint")
                raise Killed(name)
            return real(*args, **kwargs)

        return step

    for owner, name in FILESYSTEM_STEPS:
        monkeypatch.setattr(owner, name, counted(name, getattr(owner, name)))
    return steps


@pytest.mark.parametrize("hard_links", [True, False], ids=["hard-links", "copies"])
@pytest.mark.parametrize("operation", ["save_latest_only", "save"])
def test_a_kill_at_any_step_of_a_save_leaves_loadable_generations(
    tmp_path, monkeypatch, operation, hard_links
):
    at = 0
    while True:
        at += 1
        folder = tmp_path / f"killed-at-{at}"
        store = CheckpointStore(folder, keep_last=1)
        if operation == "save":  # keep_last=1: the previous generation outlives its periodic file
            store.save(state(10), episode=1, step=10, is_best=False)
            store.save(state(20), episode=2, step=20, is_best=True)
        else:  # the first episodes of a run: no periodic checkpoint
            store.save_latest_only(state(10))
            store.save_latest_only(state(20))
        with monkeypatch.context() as patch:
            if not hard_links:
                patch.setattr(checkpoints.os, "link", lambda source, destination: os_error(errno.EXDEV))
            steps = die_at_step(patch, at)
            try:
                if operation == "save":
                    store.save(state(30), episode=3, step=30, is_best=True)
                else:
                    store.save_latest_only(state(30))
                completed = True
            except Killed:
                completed = False

        restarted = CheckpointStore(folder, keep_last=1)  # the next start
        restarted.remove_temporaries()
        assert not list(folder.glob("*.tmp")), f"killed at step {at} ({steps[-1]})"
        latest = load_checkpoint(restarted.latest_path)["step"]
        previous = load_checkpoint(restarted.previous_path)["step"]
        assert (latest, previous) in {(20, 10), (20, 20), (30, 20)}, f"killed at step {at} ({steps[-1]})"
        loaded = restarted.load_newest_good()
        assert loaded.skipped == () and loaded.path == restarted.latest_path, "nothing half-written anywhere"
        for path in restarted.candidates():
            load_checkpoint(path)  # every name that is tried holds a complete checkpoint
        if operation == "save":
            assert load_checkpoint(restarted.best_path)["step"] in (20, 30)
        if completed:
            assert (latest, previous) == (30, 20)
            break
        restarted.save_latest_only(state(40))  # and the run goes on
        assert load_checkpoint(restarted.latest_path)["step"] == 40
    if os.name == "posix":  # the order of operations (Windows has no folder fsync)
        assert steps == ROTATION_STEPS[operation, hard_links]
    assert at == len(steps) + 1, "a kill was tried at each step"


WRITE = ["save", "fsync", "replace", "fsync"]  # temporary file, flushed, renamed, folder entry flushed
NEW_NAME = {True: ["link", "replace", "fsync"], False: ["link", "copyfile", "fsync", "replace", "fsync"]}
ROTATION_STEPS = {  # a new generation is complete on disk before latest.pt becomes the previous one
    ("save_latest_only", links): WRITE + NEW_NAME[links] + ["replace", "fsync"] for links in (True, False)
} | {  # periodic file, latest.pt -> latest.previous.pt, periodic -> latest.pt, periodic -> best.pt
    ("save", links): WRITE + 3 * NEW_NAME[links] for links in (True, False)
}


def os_error(code: int) -> None:
    raise OSError(code, os.strerror(code))


def test_a_fresh_start_moves_an_old_run_folder_aside_never_deletes_it(tmp_path):
    from checkpoints import move_aside

    run_dir = tmp_path / "run"
    assert move_aside(run_dir) is None, "no folder: nothing to move"
    run_dir.mkdir()
    assert move_aside(run_dir) is None and run_dir.exists(), "an empty folder is used as it is"
    (run_dir / "latest.pt").write_bytes(b"old")
    first = move_aside(run_dir)
    run_dir.mkdir()
    (run_dir / "latest.pt").write_bytes(b"newer")
    second = move_aside(run_dir)
    assert not run_dir.exists() and first != second and first.name.startswith("run.replaced-")
    assert (first / "latest.pt").read_bytes() == b"old" and (second / "latest.pt").read_bytes() == b"newer"
