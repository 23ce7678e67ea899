"""run_folder.py: a training run never touches another run's files, rotates only its own
checkpoints, and keeps log.txt whole across kills."""
import json

import pytest
import torch

from training import run_folder
from checkpoints.io import load_checkpoint_file, save_checkpoint_file
from common.errors import UserError
from training.run_folder import RunFolder


def ckpt(epoch):
    return {"model": {"w": torch.full((2,), float(epoch))}, "optimizer": {}, "epoch": epoch}


def foreign(folder, *names):
    for name in names:
        save_checkpoint_file({"model": {"w": torch.zeros(1)}, "epoch": 0}, folder / name)


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_rotation_keeps_the_newest_own_checkpoints_only(tmp_path):
    foreign(tmp_path, "checkpoint-0.pth")      # older than where this run starts: left alone
    run = RunFolder(str(tmp_path))
    run.check(start_epoch=1)
    run.prepare()
    for epoch in range(1, 5):
        run.save(ckpt(epoch), f"checkpoint-{epoch}.pth")
        run.rotate(2)
    assert names(tmp_path) == ["checkpoint-0.pth", "checkpoint-3.pth", "checkpoint-4.pth"]
    run.rotate(0)                               # 0 keeps everything
    assert len(names(tmp_path)) == 3


@pytest.mark.parametrize("existing", [["checkpoint-7.pth"], ["checkpoint-best.pth"], ["log.txt"]])
def test_a_fresh_run_refuses_a_folder_with_files_it_would_overwrite(tmp_path, existing):
    for name in existing:
        if name.endswith(".pth"):
            foreign(tmp_path, name)
        else:
            (tmp_path / name).write_text("{}\n")
    before = {n: (tmp_path / n).read_bytes() for n in names(tmp_path)}
    with pytest.raises(UserError, match=f"already holds {existing[0]} from another run"):
        RunFolder(str(tmp_path)).check(start_epoch=0)
    assert {n: (tmp_path / n).read_bytes() for n in names(tmp_path)} == before


def test_resume_owns_its_lineage_and_restores_the_log(tmp_path):
    run = RunFolder(str(tmp_path))
    run.check(0)
    run.prepare()
    for epoch in range(3):
        run.log({"epoch": epoch, "train_loss": 1.0 / (epoch + 1)})
        if epoch == 1:
            run.save(ckpt(epoch), "checkpoint-best.pth")
        run.save(ckpt(epoch), f"checkpoint-{epoch}.pth")
        if epoch < 1:
            run.flush_log()        # a kill after checkpoint-1 / -2 but before their log lines
    (tmp_path / "log.txt").write_text((tmp_path / "log.txt").read_text() + '{"epoch": 3, "partial')
    path = str(tmp_path / "checkpoint-2.pth")
    resumed = RunFolder(str(tmp_path), load_checkpoint_file(path), path)
    assert resumed.id == run.id
    resumed.check(start_epoch=3)
    resumed.prepare()
    lines = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1, 2]


def test_resume_from_an_older_checkpoint_would_overwrite_newer_ones(tmp_path):
    run = RunFolder(str(tmp_path))
    run.check(0)
    for epoch in range(3):
        run.save(ckpt(epoch), f"checkpoint-{epoch}.pth")
    path = str(tmp_path / "checkpoint-0.pth")
    with pytest.raises(UserError, match="checkpoint-1.pth, checkpoint-2.pth"):
        RunFolder(str(tmp_path), load_checkpoint_file(path), path).check(start_epoch=1)


def test_best_written_just_before_a_kill_is_recognised_as_ours(tmp_path):
    run = RunFolder(str(tmp_path))
    run.check(0)
    run.save(ckpt(0), "checkpoint-0.pth")
    run.save(ckpt(1), "checkpoint-best.pth")   # killed before checkpoint-1.pth
    path = str(tmp_path / "checkpoint-0.pth")
    RunFolder(str(tmp_path), load_checkpoint_file(path), path).check(start_epoch=1)


def test_a_run_killed_in_its_first_epoch_is_restarted_with_auto_resume(tmp_path):
    run = RunFolder(str(tmp_path))
    run.check(0)
    run.save(ckpt(0), "checkpoint-best.pth")   # killed before checkpoint-0.pth
    RunFolder(str(tmp_path), restart=True).check(start_epoch=0)
    with pytest.raises(UserError, match="already holds checkpoint-best.pth"):
        RunFolder(str(tmp_path), restart=False).check(start_epoch=0)   # --auto_resume false
    foreign(tmp_path, "checkpoint-best-ema.pth")                       # not ours: no run record
    with pytest.raises(UserError, match="already holds checkpoint-best-ema.pth"):
        RunFolder(str(tmp_path), restart=True).check(start_epoch=0)


def test_legacy_checkpoint_in_its_folder_owns_its_files(tmp_path):
    foreign(tmp_path, "checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-best.pth")
    (tmp_path / "log.txt").write_text("{}\n")
    path = str(tmp_path / "checkpoint-1.pth")
    legacy = {"model": {}, "optimizer": {}, "epoch": 1}
    run = RunFolder(str(tmp_path), legacy, path)
    run.check(start_epoch=2)
    assert run.owned >= {"checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-best.pth", "log.txt"}


def test_prepare_removes_only_our_orphan_temp_files(tmp_path):
    ours = [".tmp-checkpoint-3.pth-abc123xy", ".tmp-checkpoint-best.pth-k2_9zz01", ".tmp-a1b2c3d4.pth"]
    theirs = [".tmp-notes.txt", "tmp-checkpoint-3.pth-abc", "data.pth"]
    for name in ours + theirs:
        (tmp_path / name).write_bytes(b"x" * 100)
    RunFolder(str(tmp_path)).prepare()
    assert names(tmp_path) == sorted(theirs)


def test_output_dir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        RunFolder(str(path)).check(0)


def test_list_epoch_checkpoints_ignores_other_names(tmp_path):
    for name in ("checkpoint-2.pth", "checkpoint-10.pth", "checkpoint-best.pth", "checkpoint-x.pth"):
        (tmp_path / name).write_bytes(b"")
    assert [e for e, _ in run_folder.list_epoch_checkpoints(str(tmp_path))] == [2, 10]
