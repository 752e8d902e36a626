"""checkpoints.py: atomic writes, rotation, latest/best, and loading damaged or foreign files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import checkpoints
from checkpoints import CheckpointError, CheckpointStore, load_checkpoint


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


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_checkpoint_is_named_in_one_line(tmp_path, damage):
    store = CheckpointStore(tmp_path, keep_last=3)
    path = store.save(state(10), episode=1, step=10, is_best=False)
    data = path.read_bytes()
    broken = {"truncate": data[: len(data) // 2], "garbage": b"\x00\xff" * 500, "empty": b""}[damage]
    path.write_bytes(broken)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and "unreadable (truncated or corrupt)" in message and "\n" not in message


def test_foreign_or_newer_version_file_is_refused(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="is not a rainbow-tm checkpoint"):
        load_checkpoint(foreign)
    future = tmp_path / "future.pt"
    torch.save({"format_version": 99, "step": 1}, future)
    with pytest.raises(CheckpointError, match="format version 99, this rainbow-tm reads version 1"):
        load_checkpoint(future)


def test_resume_falls_back_to_the_newest_good_checkpoint_and_says_why(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    for episode in (1, 2, 3):
        store.save(state(episode * 10), episode=episode, step=episode * 10, is_best=False)
    store.latest_path.write_bytes(b"corrupt")
    newest = store.periodic()[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    loaded = store.load_newest_good()
    assert loaded.state["step"] == 20 and loaded.path.name == "ckpt_ep0000002_step0000000020.pt"
    assert len(loaded.skipped) == 2
    assert "latest.pt" in loaded.skipped[0] and "ckpt_ep0000003" in loaded.skipped[1]


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
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .* \(use --fresh to start over\)"):
        store.load_newest_good()


def test_unwritable_folder_and_full_disk_are_reported_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError, match="is not writable"):
        CheckpointStore(blocker / "run", keep_last=3).check_writable(needed_bytes=1)
    store = CheckpointStore(tmp_path / "run", keep_last=3)
    store.check_writable(needed_bytes=1)
    with pytest.raises(CheckpointError, match=r"not enough free disk space .* GiB free"):
        store.check_writable(needed_bytes=2**60)


def test_orphan_temporaries_are_removed(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    (tmp_path / "latest.pt.abc.tmp").write_bytes(b"partial")
    assert [p.name for p in store.remove_temporaries()] == ["latest.pt.abc.tmp"]
    assert not list(tmp_path.glob("*.tmp"))
