"""What makes a checkpoint durable (fsync before the rename that publishes it), and a
resume after a crash that left only last.old.

Each test names the mutant it kills (file:line as of the mutation audit of 2026-12-07)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from charlm import checkpoint
from charlm.errors import StopSignal
from conftest import char_codec, random_model
from charlm.config import Config
from helpers_reliability import cli, one_thread, train_run  # noqa: F401

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")


def _record_syncs(monkeypatch) -> list[tuple]:
    """('fsync', path) for every os.fsync and ('rename', src, dst) for every os.rename / os.replace, in order
    (real paths, so that a symbolic link in the temporary folder's path does not matter)."""
    events: list[tuple] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst, *args, **kwargs):
        events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
        return real_rename(src, dst, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    return events


# Kills checkpoint.py:136 (the loop that fsyncs each file of the new checkpoint dropped) and checkpoint.py:141
# (`fsync_dir(tmp)` dropped): the rename could then reach the disk before the files' contents, and a power cut
# would leave last/ with a manifest over empty or partial files, the previous checkpoint already gone.
def test_every_file_and_the_folder_of_a_checkpoint_are_synced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    run = Path(os.path.realpath(tmp_path)) / "run"
    run.mkdir()
    model, codec = random_model(vocab_size=5), char_codec("abc")
    checkpoint.save_checkpoint(run, "last", model, Config(), codec, {"format": 1, "step": 1}, {"step": 1})
    events = _record_syncs(monkeypatch)
    final = checkpoint.save_checkpoint(run, "last", model, Config(), codec, {"format": 1, "step": 2}, {"step": 2})
    publish = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(final))
    tmp = Path(events[publish][1])
    synced_before = {e[1] for e in events[:publish] if e[0] == "fsync"}
    names = sorted(p.name for p in final.iterdir())
    assert names == sorted([checkpoint.MODEL_FILE, checkpoint.CONFIG_FILE, checkpoint.VOCAB_FILE,
                            checkpoint.TRAINER_FILE, checkpoint.MANIFEST_FILE])
    for name in names:
        assert str(tmp / name) in synced_before, (name, events)
    assert str(tmp) in synced_before, events
    assert ("fsync", str(run)) in events[publish + 1:]  # and the rename itself is made durable


# Kills checkpoint.py:77 (`os.fsync` of the temporary file dropped in atomic_write_text): config.yaml and
# metrics.jsonl rewritten on a resume could be renamed over the old file while their bytes are not on disk.
def test_an_atomic_text_write_syncs_the_new_file_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    folder = Path(os.path.realpath(tmp_path))
    path = folder / "config.yaml"
    path.write_text("old\n", encoding="utf-8")
    events = _record_syncs(monkeypatch)
    checkpoint.atomic_write_text(path, "new\n")
    assert path.read_text(encoding="utf-8") == "new\n"
    (publish,) = [i for i, e in enumerate(events) if e[0] == "rename"]
    assert events[publish][2] == str(path)
    assert ("fsync", events[publish][1]) in events[:publish], events
    assert ("fsync", str(folder)) in events[publish + 1:], events



@pytest.mark.parametrize("text", ["new\n", iter(["a line\n", "another\n"])], ids=["text", "pieces"])
def test_an_atomic_text_write_has_its_bytes_in_the_file_when_it_syncs_it(tmp_path, monkeypatch, text):
    """Catches: os.fsync before the file object's flush. The text still sat in Python's buffer, so the fsync
    made an empty file durable; the close flushed it later, but a power cut after the rename could leave
    config.yaml or a rewritten metrics.jsonl empty."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n", encoding="utf-8")
    sizes = []
    real_fsync = os.fsync

    def fsync(fd):
        sizes.append(os.fstat(fd).st_size)
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    checkpoint.atomic_write_text(path, text)
    written = path.stat().st_size
    assert written > 0 and sizes[0] == written, sizes


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), StopSignal(signal.SIGINT)], ids=["KeyboardInterrupt", "StopSignal"])
def test_an_atomic_text_write_stopped_by_ctrl_c_leaves_the_old_file_and_no_temporary_one(tmp_path, stop):
    """Catches: only an Exception cleaned up after. A resume rewrites metrics.jsonl from a generator that reads
    the old file; a Ctrl-C while it runs raises StopSignal (the command line's handler) or KeyboardInterrupt,
    neither of them an Exception, and the .metrics.jsonl.tmp-PID file stayed beside the old log."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n", encoding="utf-8")

    def lines():
        yield "kept\n"
        raise stop
    with pytest.raises(type(stop)):
        checkpoint.atomic_write_text(path, lines())
    assert path.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]

# Kills checkpoint.py:221 (find_checkpoint's "last" order ("last", "last.old") -> ("last",)): after a crash
# between the two renames of a save, only last.old holds the newest checkpoint; `train --resume` (which reads
# the run's config from it before recovering the folder) was refused as "holds no checkpoint".
def test_a_resume_after_a_crash_that_left_only_last_old_goes_on_from_it(tmp_path):
    run = train_run(tmp_path, train__max_steps=4)
    os.rename(run / "last", run / "last.old")
    result = cli("train", "--resume", run, "--max-steps", "6", "-q")
    assert result.exit_code == 0, result.stderr
    state = torch.load(run / "last" / "trainer.pt", weights_only=True)
    assert state["progress"]["step"] == 6 and not (run / "last.old").exists()
