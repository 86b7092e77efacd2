"""Faults injected into training: kill -9, SIGINT / SIGTERM, NaN, a full disk, an unwritable folder,
out of memory. Afterwards the newest complete checkpoint loads and training resumes.

The signal and kill tests run `charlm train` as a child process on a tiny model.
"""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from charlm import checkpoint as ckpt
from charlm import train as train_mod
from charlm.checkpoint import load_checkpoint, recover
from charlm.model import RNNLM
from helpers_reliability import (ROOT, assert_one_line_error, child_env, cli, one_thread, sha256,  # noqa: F401
                                 train_run, write_config, write_corpus)


def start_training(tmp_path, *args, preexec_fn=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "charlm", "train", "-q", *map(str, args)], cwd=ROOT,
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec_fn)


def wait_for(condition, proc, timeout=90.0, poll=0.0005):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training ended early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for training")
        time.sleep(poll)


def stray_files(run):
    return sorted(p.name for p in run.iterdir() if p.name.startswith(".") or p.name.endswith(".old"))


def snapshot(folder):
    return {p.name: sha256(p) for p in sorted(folder.iterdir())}


def saved_step(run) -> int:
    return load_checkpoint(run, "last").manifest["step"]


def step_on_disk(run) -> int:
    """The step in last/manifest.json while a trainer may be swapping the folder (-1 if caught mid-swap)."""
    try:
        return json.loads((run / "last" / "manifest.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


# ---------------------------------------------------------------- kill -9
def test_kill_9_while_saving_never_loses_the_newest_complete_checkpoint(tmp_path):
    """Killed three times: while a checkpoint is written, while it is swapped in, at a random moment.
    Each time the newest complete checkpoint loads, and the next run resumes from it."""
    corpus = write_corpus(tmp_path, lines=600)
    config = write_config(tmp_path, model__hidden_size=48, train__eval_interval=1, train__eval_tokens=64,
                          train__log_interval=1, train__max_steps=100_000)
    run = tmp_path / "run"
    rng = random.Random(4)
    step, caught = 0, []
    for round_ in range(3):
        args = ("--config", config, "--corpus", corpus, "--out", run) if round_ == 0 else ("--resume", run)
        proc = start_training(tmp_path, *args)
        if round_ == 0:    # while a new checkpoint folder is being written
            wait_for(lambda: (run / "last").exists() and any(run.glob(".tmp-*")), proc, poll=0.001)
        elif round_ == 1:  # while the new folder is swapped in: old one renamed aside, new one not yet in place
            wait_for(lambda: any(run.glob("*.old")), proc, poll=0.0005)
        else:              # some random moment after the first save of this run
            wait_for(lambda: step_on_disk(run) > step, proc, poll=0.01)
            time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        caught.append(stray_files(run))
        # what a later start sees: the newest complete checkpoint, never an older one
        recover(run)
        assert stray_files(run) == []
        saved = load_checkpoint(run, "last")
        saved.trainer_state()
        assert saved.manifest["step"] >= step
        step = saved.manifest["step"]
    print("left behind by each kill:", caught)
    assert any(caught), "no kill landed in the middle of a save: the test did not test it"
    result = cli("train", "--resume", run, "--max-steps", step + 3, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == step + 3
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # all whole lines
    assert sum(1 for r in lines if r.get("event") == "resume") == 3


# ---------------------------------------------------------------- SIGINT / SIGTERM
@pytest.mark.parametrize("signum,code,name", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM"),
                                               (getattr(signal, "SIGHUP", None), 129, "SIGHUP")])
def test_signal_during_training_saves_a_checkpoint_and_exits_130_or_143(tmp_path, signum, code, name):
    """No periodic save (eval_interval 0): the checkpoint can only come from the signal handler.

    A second signal follows the first at once, while the checkpoint is being written. SIGHUP (a closed
    terminal; here sent by hand, the stderr pipe still read) stops the run as SIGTERM does, exit 129.
    """
    if signum is None:
        pytest.skip("no SIGHUP on this system")
    corpus = write_corpus(tmp_path, lines=600)
    config = write_config(tmp_path, train__eval_interval=0, train__log_interval=1, train__max_steps=100_000)
    run = tmp_path / "run"
    proc = start_training(tmp_path, "--config", config, "--corpus", corpus, "--out", run)
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("train_loss") >= 3, proc)
    proc.send_signal(signum)
    wait_for(lambda: any(run.glob(".tmp-last-*")) or (run / "last").exists(), proc, poll=0.0001)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    line = assert_one_line_error(subprocess.CompletedProcess([], code, "", stderr), code, name, "--resume")
    step = saved_step(run)
    assert f"at step {step};" in line and step >= 3
    assert stray_files(run) == []
    assert load_checkpoint(run, "last").trainer_state()["progress"]["step"] == step
    result = cli("train", "--resume", run, "--max-steps", step + 2, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == step + 2


def test_a_run_folder_that_another_process_trains_is_refused_and_its_checkpoints_kept(tmp_path):
    """Catches: `charlm train --resume RUN` while RUN still trains in another process: both wrote last/, best/
    and metrics.jsonl, each replacing what the other saved, and both exited 0 (two end records, the first
    run's lines after the fork gone)."""
    corpus = write_corpus(tmp_path, lines=600)
    config = write_config(tmp_path, train__eval_interval=2, train__log_interval=1, train__max_steps=100_000)
    run = tmp_path / "run"
    proc = start_training(tmp_path, "--config", config, "--corpus", corpus, "--out", run)
    try:
        wait_for(lambda: (run / "last").exists(), proc)
        before = (run / "metrics.jsonl").read_text()
        resumed = cli("train", "--resume", run, "--max-time", 2)  # bounded, were it to train
        assert_one_line_error(resumed, 2, f"run folder {run} is being trained by another charlm process right now",
                              f"--resume {run}")
        again = cli("train", "--config", config, "--corpus", corpus, "--out", run)  # a fresh run into it
        assert again.exit_code == 2 and "already holds a run" in again.stderr
        assert (run / "metrics.jsonl").read_text().startswith(before)  # nothing of it rewritten
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
    step = saved_step(run)  # the first process saved last at its own step, and let go of the folder on exit
    result = cli("train", "--resume", run, "--max-steps", step + 1, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == step + 1


def test_a_folder_locked_by_a_trainer_is_refused_before_the_processes_of_nproc_start(tmp_path):
    """The lock as --nproc checks it before launching torchrun (the workers would each fail alone)."""
    from charlm.launch import check_before_launch
    from charlm.train import lock_run_folder

    run = train_run(tmp_path)
    held: list[int] = []
    lock_run_folder(run, held)
    try:
        cfg = load_config_for(run)
        with pytest.raises(train_mod.UsageError, match="is being trained by another charlm process"):
            check_before_launch(cfg, None, None, 2, resume=run / "last")
    finally:
        for fd in held:
            os.close(fd)
    check_before_launch(load_config_for(run), None, None, 2, resume=run)  # free again: no error


def test_a_fresh_run_into_a_folder_another_trainer_holds_is_refused_and_leaves_it(tmp_path):
    """Catches: a new run into a folder that another trainer holds before its first checkpoint (still empty, or
    holding only its metrics) training beside it; and the refused run removing that folder as one it made."""
    from charlm.train import lock_run_folder

    run = tmp_path / "new"
    run.mkdir()
    held: list[int] = []
    lock_run_folder(run, held)
    try:
        result = cli("train", "--config", write_config(tmp_path), "--corpus", write_corpus(tmp_path), "--out", run)
        assert_one_line_error(result, 2, f"run folder {run} is being trained by another charlm process right now")
        assert run.is_dir() and list(run.iterdir()) == []
    finally:
        for fd in held:
            os.close(fd)


def load_config_for(run):
    from charlm.config import load_config

    return load_config(base=run / "last" / "config.yaml")


def test_a_signal_during_the_final_validation_stops_it_saves_last_and_a_resume_finishes(tmp_path, monkeypatch):
    """The final validation reads the whole split and may be long: a signal stops it at the next window.

    SIGINT is raised in-process as the final validation begins (eval_interval 0: it is the only one).
    """
    from charlm.config import load_config
    from charlm.errors import Interrupted

    corpus = write_corpus(tmp_path, lines=300)
    config = write_config(tmp_path, train__eval_interval=0, train__max_steps=6, data__val_fraction=0.2)
    run = tmp_path / "run"
    original = train_mod.stream_nll
    asked = []

    def interrupting(*args, **kwargs):
        asked.append(kwargs.get("should_stop"))
        signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_mod, "stream_nll", interrupting)
    with pytest.raises(Interrupted) as info:
        train_mod.train(load_config(config), corpus, run, show_progress=False)
    assert info.value.exit_code == 130
    assert "during the final validation at step 6" in str(info.value) and len(asked) == 1
    assert load_checkpoint(run, "last").trainer_state()["progress"]["step"] == 6
    monkeypatch.undo()
    result = cli("train", "--resume", run, "--json")  # nothing left to train: the final validation again
    assert result.exit_code == 0, result.stderr
    done = json.loads(result.stdout)
    assert done["steps"] == 6 and done["val_loss"] is not None


def _catches_sigterm(pid: int) -> bool:
    """Whether a process has its own SIGTERM handler (charlm's main installs one, Python's start-up does not)."""
    try:
        status = open(f"/proc/{pid}/status").read()
    except OSError:
        time.sleep(1.0)  # no /proc: give the start-up a second
        return True
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.mark.parametrize("signum,code,message", [(signal.SIGINT, 130, "interrupted"),
                                                 (signal.SIGTERM, 143, "terminated")])
def test_signal_before_training_starts_is_130_or_143_without_traceback(tmp_path, signum, code, message):
    """While torch loads: nothing to save, but still the exit code and one line."""
    corpus = write_corpus(tmp_path, lines=600)
    proc = start_training(tmp_path, "--config", write_config(tmp_path), "--corpus", corpus, "--out", tmp_path / "r")
    wait_for(lambda: _catches_sigterm(proc.pid), proc, poll=0.001)  # charlm's handlers are in place
    proc.send_signal(signum)  # while the command imports torch and reads the corpus
    _, stderr = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("training finished before the signal arrived")
    assert_one_line_error(subprocess.CompletedProcess([], proc.returncode, "", stderr), code, message)


# ---------------------------------------------------------------- NaN
def test_forced_nan_stops_with_exit_1_at_that_step_and_keeps_the_last_good_checkpoint(tmp_path):
    """A huge learning rate (Adam, lr 1e36, no clipping): weights of order 1e36 after each step, and the
    loss overflows to NaN at step 3. A checkpoint is saved after every step until then."""
    corpus = write_corpus(tmp_path)
    config = write_config(tmp_path, train__lr=1e36, train__clip=0.0, train__eval_interval=1, train__max_steps=50)
    run = tmp_path / "run"
    result = cli("train", "--config", config, "--corpus", corpus, "--out", run, "-q")
    line = assert_one_line_error(result, 1, "NaN or infinite", "train.lr", str(run / "last"))
    failed_at = int(line.split("at step ")[1].split(":")[0])
    assert failed_at > 1
    saved = load_checkpoint(run, "last")  # loads, so its weights are finite (load refuses NaN)
    assert saved.manifest["step"] == failed_at - 1
    assert load_checkpoint(run, "best").manifest["step"] <= failed_at - 1
    assert stray_files(run) == []


@pytest.mark.parametrize("fields,fragment", [
    (dict(model__cell="rnn", model__nonlinearity="relu", train__optimizer="sgd", train__lr=1e6,
          train__clip=0.0), "validation loss is NaN"),
    # the fused AdamW update does not overflow on its own: the weights become infinite, and the evaluation says so
    (dict(train__lr=1e38, train__clip=0.0), "validation loss is NaN or infinite"),
])
def test_other_numeric_blow_ups_are_exit_1_naming_the_step(tmp_path, fields, fragment):
    """An exploding ReLU RNN whose training loss is still finite, and an lr beyond float32 in Adam's update."""
    config = write_config(tmp_path, train__eval_interval=1, **fields)
    run = tmp_path / "run"
    result = cli("train", "--config", config, "--corpus", write_corpus(tmp_path), "--out", run, "-q")
    assert_one_line_error(result, 1, fragment, "at step 1", "train.lr", "no checkpoint was saved")
    assert not (run / "last").exists() and stray_files(run) == []


def test_weights_that_become_non_finite_are_never_saved(tmp_path, monkeypatch):
    """Loss and gradient finite, but the update overflows a weight: the save refuses, naming the step."""
    real = train_mod._make_optimizer

    def make_optimizer(cfg, model):
        optimizer = real(cfg, model)
        step = optimizer.step
        count = {"n": 0}

        def poisoned_step(*args, **kwargs):
            out = step(*args, **kwargs)
            count["n"] += 1
            if count["n"] == 3:
                with torch.no_grad():
                    model.decoder.weight[0, 0] = float("inf")
            return out
        optimizer.step = poisoned_step
        return optimizer
    monkeypatch.setattr(train_mod, "_make_optimizer", make_optimizer)
    corpus = write_corpus(tmp_path)
    run = tmp_path / "run"
    result = cli("train", "--config", write_config(tmp_path, train__eval_interval=1), "--corpus", corpus,
                 "--out", run, "-q")
    assert_one_line_error(result, 1, "at step 3", "decoder.weight", "NaN or infinite")
    assert saved_step(run) == 2 and load_checkpoint(run, "best").manifest["step"] == 2


# ---------------------------------------------------------------- a full disk, an unwritable folder
def _limit_file_size(limit):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_disk_full_while_training_is_exit_1_with_the_previous_checkpoint_intact(tmp_path):
    """RLIMIT_FSIZE smaller than model.safetensors: the first checkpoint of the resumed run cannot be written."""
    corpus = write_corpus(tmp_path)
    run = train_run(tmp_path, corpus=corpus, model__hidden_size=64, train__max_steps=4)
    before = {name: snapshot(run / name) for name in ("last", "best")}
    assert (run / "last" / "model.safetensors").stat().st_size > 40_000
    proc = start_training(tmp_path, "--resume", run, "--max-steps", "12", preexec_fn=_limit_file_size(20_000))
    _, stderr = proc.communicate(timeout=120)
    line = assert_one_line_error(subprocess.CompletedProcess([], proc.returncode, "", stderr), 1,
                                 "could not write checkpoint", "File too large", "previous checkpoint is intact")
    assert "--resume" in line
    assert {name: snapshot(run / name) for name in ("last", "best")} == before
    assert stray_files(run) == []
    result = cli("train", "--resume", run, "--max-steps", "6", "--json")  # room again: it continues
    assert result.exit_code == 0, result.stderr


def test_disk_full_at_a_later_checkpoint_keeps_the_earlier_one(tmp_path, monkeypatch):
    """The third safetensors write of a run fails with ENOSPC after writing part of the file."""
    real, calls = ckpt.save_file, {"n": 0}

    def save_file(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:
            with open(path, "wb") as fh:
                fh.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)
    monkeypatch.setattr(ckpt, "save_file", save_file)
    corpus = write_corpus(tmp_path)
    run = tmp_path / "run"
    # eval_interval 4: step 4 saves best (call 1) and last (call 2); step 8 saves best (call 3): fails
    result = cli("train", "--config", write_config(tmp_path), "--corpus", corpus, "--out", run, "-q")
    assert_one_line_error(result, 1, "No space left on device", "previous checkpoint is intact")
    assert saved_step(run) == 4 and load_checkpoint(run, "best").manifest["step"] == 4
    assert stray_files(run) == []


def test_metrics_write_failure_is_exit_1_naming_the_file(tmp_path, monkeypatch):
    def write(self, record):
        if record.get("step", 0) >= 6:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        self.fh.write(json.dumps(record) + "\n")
    monkeypatch.setattr(train_mod._Log, "write", write)
    run = tmp_path / "run"
    result = cli("train", "--config", write_config(tmp_path), "--corpus", write_corpus(tmp_path), "--out", run,
                 "-q")
    assert_one_line_error(result, 1, "metrics.jsonl", "No space left on device", "--resume")
    assert saved_step(run) == 4


def test_unwritable_run_folder_is_detected_before_training(tmp_path):
    corpus = write_corpus(tmp_path)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    result = cli("train", "--config", write_config(tmp_path), "--corpus", corpus, "--out", not_a_folder / "run")
    assert_one_line_error(result, 2, "cannot write to run folder", "--out")
    # a file-size limit of 0 bytes: not even the write probe fits (works when the tests run as root)
    proc = start_training(tmp_path, "--config", write_config(tmp_path), "--corpus", corpus, "--out",
                          tmp_path / "run", preexec_fn=_limit_file_size(0))
    _, stderr = proc.communicate(timeout=120)
    assert_one_line_error(subprocess.CompletedProcess([], proc.returncode, "", stderr), 2,
                          "cannot write to run folder", "File too large")
    assert not (tmp_path / "run").exists()  # no probe left, nothing trained, the folder it made removed


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a read-only mode")
def test_read_only_run_folder_is_detected_before_training(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        result = cli("train", "--config", write_config(tmp_path), "--corpus", write_corpus(tmp_path), "--out",
                     folder / "run")
        assert_one_line_error(result, 2, "cannot write to run folder", "Permission denied")
    finally:
        folder.chmod(0o700)


def test_too_little_free_space_is_detected_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 5000))
    run = tmp_path / "run"
    result = cli("train", "--config", write_config(tmp_path), "--corpus", write_corpus(tmp_path), "--out", run,
                 "-q")
    assert_one_line_error(result, 1, "not enough disk space", "MiB free")
    assert not (run / "metrics.jsonl").exists() and not (run / "last").exists()


# ---------------------------------------------------------------- out of memory
CPU_ALLOCATOR_FAILURE = ("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 102399999998976 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                   RuntimeError(CPU_ALLOCATOR_FAILURE)], ids=["cuda", "cpu"])
def test_out_of_memory_during_training_is_exit_1_with_a_suggestion(tmp_path, monkeypatch, error):
    real, calls = RNNLM.forward, {"n": 0}

    def forward(self, tokens, state=None, targets=None):
        if self.training:
            calls["n"] += 1
            if calls["n"] == 6:
                raise error
        return real(self, tokens, state, targets)
    monkeypatch.setattr(RNNLM, "forward", forward)
    run = tmp_path / "run"
    result = cli("train", "--config", write_config(tmp_path), "--corpus", write_corpus(tmp_path), "--out", run,
                 "-q")
    assert_one_line_error(result, 1, "out of memory", "at step 6", "train.batch_size", "train.seq_len",
                          str(run / "last"))
    assert saved_step(run) == 4


def test_out_of_memory_while_sampling_is_exit_1_with_a_suggestion(tmp_path, monkeypatch):
    run = train_run(tmp_path)

    def forward(self, tokens, state=None, targets=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(RNNLM, "forward", forward)
    # one sample of the default length and no --prime: only --max-length can go lower
    assert_one_line_error(cli("sample", run), 1, "out of memory: use a smaller --max-length")
    line = assert_one_line_error(cli("sample", run, "--num-samples", 300, "--prime", "ab", "--max-length", 1), 1,
                                 "out of memory: use a smaller --num-samples or a shorter --prime")
    assert "--max-length" not in line


def test_out_of_memory_advice_names_what_the_command_running_can_change(tmp_path, monkeypatch):
    """Catches: `eval` and `score` told to use a smaller train.batch_size, which they do not read (one message
    for every command), or a smaller --batch-size that is already 1."""
    run = train_run(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("a line of text\n", encoding="utf-8")

    def forward(self, tokens, state=None, targets=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(RNNLM, "forward", forward)
    assert_one_line_error(cli("eval", run, "--file", text, "--streams", 2), 1, "out of memory: use a smaller "
                          "--streams")
    assert_one_line_error(cli("score", run, "hello", "--batch-size", 2), 1, "out of memory: use a smaller "
                          "--batch-size")
    for args in (("eval", run, "--file", text), ("score", run, "hello", "--batch-size", 1)):  # nothing left to lower
        line = assert_one_line_error(cli(*args), 1, "out of memory: the model does not fit in this machine")
        assert "train." not in line and "--" not in line


def test_a_model_too_large_for_the_cpus_memory_is_exit_1_out_of_memory(tmp_path, monkeypatch):
    """Outside the training loop (building the model, scoring) the CPU allocator's RuntimeError is still
    said as out of memory, not as torch's enforce-fail text."""
    run = train_run(tmp_path)

    def forward(self, tokens, state=None, targets=None):
        raise RuntimeError(CPU_ALLOCATOR_FAILURE)
    monkeypatch.setattr(RNNLM, "forward", forward)
    result = cli("score", run, "hello")
    assert_one_line_error(result, 1, "out of memory", "--batch-size")
    assert "enforce fail" not in result.stderr


def test_out_of_memory_is_recognised_in_every_form_the_docstring_names():
    """Catches: is_out_of_memory missing one of its forms (the system's ENOMEM 'Cannot allocate memory', a
    torch OutOfMemoryError whose text lacks the words, Windows' 'not enough memory', MemoryError), so that
    failure would be reported as a bug ('... run with --debug') instead of with the batch-size advice."""
    import errno
    import os

    import torch

    from charlm.errors import is_out_of_memory

    for exc in (MemoryError(), torch.OutOfMemoryError("Tried to allocate 2.00 GiB"),
                OSError(errno.ENOMEM, os.strerror(errno.ENOMEM)),
                RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory"),
                RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"),
                RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")):
        assert is_out_of_memory(exc), exc
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


# Kills errors.caught_signals's SIG_IGN test (cli's, launch's and _Signals's handlers): under nohup (SIGHUP
# ignored) charlm's handler replaced the ignore, and a run meant to outlive its terminal stopped with it.
@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this system")
def test_under_nohup_sighup_stays_ignored():
    code = ("import signal; signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
            "from charlm import errors, train\n"
            "print(signal.SIGHUP in errors.caught_signals())\n"
            "with train._Signals().installed():\n"
            "    print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN)\n"
            "signal.signal(signal.SIGHUP, signal.SIG_DFL)\n"
            "print(signal.SIGHUP in errors.caught_signals())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env=child_env())
    assert out.stdout.split() == ["False", "True", "True"], out.stderr


def test_a_second_signal_does_not_replace_the_one_being_handled():
    """Catches: _Signals letting a later SIGTERM overwrite the SIGINT that is already stopping the run (the
    exit code and the message would then name the wrong signal)."""
    import signal

    from charlm.train import _Signals

    s = _Signals()
    s._handler(signal.SIGINT, None)
    s._handler(signal.SIGTERM, None)
    assert s.received == signal.SIGINT


def test_a_resume_counts_the_checkpoints_it_will_replace_as_room_already_taken(tmp_path, monkeypatch):
    """Catches: the space check asking a resumed run for room for eight copies of the weights, as a new run,
    though last/ and best/ already hold the four old ones that the new copies replace: a run that had trained
    on a nearly full disk could not go on, though its saves would fit."""
    run = tmp_path / "run"
    assert cli("train", "--config", write_config(tmp_path), "--corpus", write_corpus(tmp_path), "--out", run,
               "-q").exit_code == 0
    weights = sum(t.numel() * t.element_size() for t in load_checkpoint(run / "last").tensors.values())
    free = 6 * weights + (1 << 20)  # room for the four new copies of a resume, not for the eight of a new run
    monkeypatch.setattr(train_mod.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, free))
    fresh = cli("train", "--config", write_config(tmp_path), "--corpus", write_corpus(tmp_path), "--out",
                tmp_path / "other", "-q")
    assert_one_line_error(fresh, 1, "not enough disk space", "MiB free")
    resumed = cli("train", "--resume", run, "--max-steps", 16, "--json")
    assert resumed.exit_code == 0, resumed.stderr
    assert saved_step(run) == 16
