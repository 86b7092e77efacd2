"""Data-parallel training with torchrun on the CPU (gloo), two processes on this machine."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

CONFIG = """\
data: {level: char, val_fraction: 0.1}
model: {cell: lstm, impl: torch, embedding_size: 8, hidden_size: 16, device: cpu}
train: {batch_size: 4, seq_len: 8, lr: 0.01, schedule: constant, eval_interval: 5, log_interval: 5, seed: 7}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"the cat {i % 7} sat on the mat {i % 5}\n" for i in range(60)), encoding="utf-8")
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    return tmp_path, corpus, config


@pytest.fixture(scope="module")
def two_process_run(setup):
    """10 steps on two processes: shared by the tests below, since each torchrun start costs seconds."""
    tmp, corpus, config = setup
    result = charlm(["--config", str(config), "--corpus", str(corpus), "--out", str(tmp / "two"),
                     "--max-steps", "10"], tmp, nproc=2)
    assert result.returncode == 0, result.stderr
    return tmp / "two"


def charlm(args, cwd, nproc=1, env=None, timeout=240):
    cmd = [sys.executable, "-m", "charlm", "train", *args, "--quiet"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "charlm", "train", *args, "--quiet"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "CHARLM_DIST_TIMEOUT": "60", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def weights(run: Path, which: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run / which / "model.safetensors"))


def assert_close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=0, msg=k)


def test_two_processes_give_the_weights_of_one_with_the_same_global_batch(setup, two_process_run):
    tmp, corpus, config = setup
    one = charlm(["--config", str(config), "--corpus", str(corpus), "--max-steps", "10", "--out", str(tmp / "one")], tmp)
    assert one.returncode == 0, one.stderr
    assert_close(weights(tmp / "one"), weights(two_process_run))
    # only rank 0 wrote the log: one start line, not two
    log = (two_process_run / "metrics.jsonl").read_text().splitlines()
    assert sum('"event": "start"' in line for line in log) == 1


def test_an_uneven_share_of_fresh_rows_gives_the_weights_of_one_process(setup):
    """Catches: fresh rows that had to be a multiple of the processes (the default 2 refused --nproc 4, the
    README's two machines of two), or an uneven share averaged as if even: a rank with more rows than another
    must count them against the global batch, so that two processes still equal one."""
    tmp, corpus, config = setup
    args = ["--config", str(config), "--corpus", str(corpus), "--max-steps", "6", "--set", "train.fresh_streams=3"]
    two = charlm([*args, "--out", str(tmp / "fresh3-two")], tmp, nproc=2)
    assert two.returncode == 0, two.stderr
    one = charlm([*args, "--out", str(tmp / "fresh3-one")], tmp)
    assert one.returncode == 0, one.stderr
    assert_close(weights(tmp / "fresh3-one"), weights(tmp / "fresh3-two"))
    losses = [[json.loads(line)["train_loss"] for line in (tmp / name / "metrics.jsonl").read_text().splitlines()
               if '"train_loss"' in line] for name in ("fresh3-one", "fresh3-two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # the global batch's mean, logged by rank 0


def test_a_two_process_run_resumes_to_the_same_weights(setup, two_process_run):
    tmp, corpus, config = setup
    first = charlm(["--config", str(config), "--corpus", str(corpus), "--out", str(tmp / "split"),
                    "--max-steps", "5"], tmp, nproc=2)
    assert first.returncode == 0, first.stderr
    second = charlm(["--resume", str(tmp / "split"), "--max-steps", "10"], tmp, nproc=2)
    assert second.returncode == 0, second.stderr
    assert_close(weights(two_process_run), weights(tmp / "split"))


def test_with_dropout_each_rank_draws_its_own_masks_and_a_resume_is_exact(setup):
    """Catches: every rank seeded alike, so stream i of each rank drew the mask of stream i of the others (the
    docs had said each rank draws its own); and, once they differ, a resume that gave every rank rank 0's
    saved generator, which would make the resumed run leave the uninterrupted one."""
    tmp, corpus, config = setup
    args = ["--config", str(config), "--corpus", str(corpus), "--set", "model.dropout=0.3"]
    whole = charlm([*args, "--out", str(tmp / "drop10"), "--max-steps", "10"], tmp, nproc=2)
    assert whole.returncode == 0, whole.stderr
    first = charlm([*args, "--out", str(tmp / "drop5"), "--max-steps", "5"], tmp, nproc=2)
    assert first.returncode == 0, first.stderr
    state = torch.load(tmp / "drop5" / "last" / "trainer.pt", weights_only=True)
    ranks = state["rng_ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["cpu"], ranks[1]["cpu"])
    assert torch.equal(ranks[0]["cpu"], state["rng_cpu"])
    second = charlm(["--resume", str(tmp / "drop5"), "--max-steps", "10"], tmp, nproc=2)
    assert second.returncode == 0, second.stderr
    assert_close(weights(tmp / "drop10"), weights(tmp / "drop5"))


@pytest.mark.parametrize("tie", ["true", "false"])
def test_an_adaptive_softmax_trains_when_a_rank_has_no_target_in_a_tail_cluster(tmp_path, tie):
    """Catches: a tail cluster with no target in a rank's window skipped, so its projection got no gradient
    on that rank and DistributedDataParallel's reduction fell out of step (gloo aborted the job: the shipped
    word config under --nproc 2 crashed). Rank 0 reads the first half of the text, only head words; rank 1
    the second, only rare ones."""
    words = [f"w{i}" for i in range(40)]
    head = "".join("a b c a b c\n" for _ in range(80))
    rare = "".join(" ".join(words[(i * 3 + k) % 40] for k in range(6)) + "\n" for i in range(80))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(head + rare, encoding="utf-8")
    config = tmp_path / "adaptive.yaml"
    config.write_text(f"""\
data: {{level: word, val_fraction: 0.0}}
model: {{cell: gru, impl: torch, embedding_size: 16, hidden_size: 16, device: cpu, softmax: adaptive,
         adaptive_cutoffs: "6,20", tie_weights: {tie}}}
train: {{batch_size: 2, seq_len: 8, lr: 0.01, schedule: constant, log_interval: 5, seed: 7}}
""", encoding="utf-8")
    two = charlm(["--config", str(config), "--corpus", str(corpus), "--out", str(tmp_path / "two"),
                  "--max-steps", "6"], tmp_path, nproc=2)
    assert two.returncode == 0, two.stderr
    one = charlm(["--config", str(config), "--corpus", str(corpus), "--out", str(tmp_path / "one"),
                  "--max-steps", "6"], tmp_path)
    assert one.returncode == 0, one.stderr
    assert_close(weights(tmp_path / "one"), weights(tmp_path / "two"))


def test_a_rank_that_fails_ends_the_whole_job(setup):
    tmp, corpus, config = setup
    hook = tmp / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""
        import os
        if os.environ.get("RANK") == "1":
            import charlm.train
            def broken(*args, **kwargs):
                raise RuntimeError("injected failure on rank 1")
            charlm.train.evaluate = broken
    """))
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    result = charlm(["--config", str(config), "--corpus", str(corpus), "--out", str(tmp / "failing"),
                     "--max-steps", "12"], tmp, nproc=2, env=env, timeout=180)
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stderr


def test_batch_not_divisible_by_processes_is_refused(setup):
    tmp, corpus, config = setup
    result = charlm(["--config", str(config), "--corpus", str(corpus), "--out", str(tmp / "odd"),
                     "--set", "train.batch_size=3", "--max-steps", "2"], tmp, nproc=2)
    assert result.returncode != 0
    assert "multiple of the number of processes" in result.stderr


def train_nproc(args, cwd, nproc=2, env=None):
    """`charlm train --nproc N`, which starts torchrun itself."""
    env = {**os.environ, "CHARLM_DIST_TIMEOUT": "60", **(env or {})}
    env.pop("OMP_NUM_THREADS", None)
    return subprocess.run([sys.executable, "-m", "charlm", "train", *args, "--quiet", "--nproc", str(nproc)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("case", ["missing corpus", "bad value", "batch"])
def test_nproc_refuses_a_bad_input_in_one_line_before_starting_the_workers(setup, case):
    tmp, corpus, config = setup
    args = {"missing corpus": ["--corpus", str(tmp / "nowhere.txt")],
            "bad value": ["--corpus", str(corpus), "--set", "model.cell=bogus"],
            "batch": ["--corpus", str(corpus), "--set", "train.batch_size=3"]}[case]
    result = train_nproc(["--config", str(config), "--out", str(tmp / "refused"), *args], tmp)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("charlm: error:"), result.stderr
    assert not (tmp / "refused").exists()


def test_nproc_reports_a_worker_s_bad_input_once_with_its_exit_code(setup):
    """A corpus too short for the batch is found by the workers: their line, once, and exit 2, without
    torchrun's log lines, its traceback or its banner about OMP_NUM_THREADS."""
    tmp, corpus, config = setup
    short = tmp / "short.txt"
    short.write_text("a cat.\nsat.\n", encoding="utf-8")
    result = train_nproc(["--config", str(config), "--corpus", str(short), "--out", str(tmp / "short")], tmp)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("charlm: error: corpus is too short"), result.stderr


def test_nproc_names_the_worker_that_failed_first_when_it_died_without_a_word(setup):
    """Rank 1 dies by os._exit(3); rank 0 then reports the broken connection. torchrun's report is held
    back, but which worker failed first, and how, is said."""
    tmp, corpus, config = setup
    hook = tmp / "silent-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""
        import os
        if os.environ.get("RANK") == "1":
            import charlm.train
            charlm.train.evaluate = lambda *args, **kwargs: os._exit(3)
    """))
    env = {**os.environ, "CHARLM_DIST_TIMEOUT": "60",
           "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "charlm", "train", "--config", str(config), "--corpus",
                             str(corpus), "--out", str(tmp / "silent"), "--max-steps", "12", "--quiet",
                             "--nproc", "2"], cwd=tmp, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    # torchrun names the worker it saw fail first. Rank 0 fails a moment after rank 1 (the broken connection),
    # and once in a while on a loaded machine it has died too (SIGABRT as gloo's threads go down) before
    # torchrun looks: then torchrun, and so charlm, names rank 0 and its signal (seen once in a full run)
    named = re.search(r"the worker of local rank (\d) (failed first, with exit code (\d+)|was killed by signal 6)$",
                      result.stderr, re.M)
    assert named, result.stderr
    rank, code = named.group(1), named.group(3)
    assert (rank, code) == ("1", "3") or (rank == "0" and code is None), result.stderr
    # torchrun's own report is held back (what the dying rank 0 prints of itself is not)
    assert "ChildFailedError" not in result.stderr and "torch/distributed/run.py" not in result.stderr


@pytest.mark.parametrize("signum, code, name", [(2, 130, "SIGINT"), (15, 143, "SIGTERM")])
def test_nproc_stopped_by_a_signal_saves_and_says_so(setup, signum, code, name):
    """Ctrl-C reaches the whole process group (launcher, torchrun, workers); a SIGTERM may reach the
    launcher alone, which passes it on. Either way the workers save last/ and their line gets through."""
    import signal as signals
    import time

    tmp, corpus, config = setup
    out = tmp / f"stopped-{signum}"
    env = {**os.environ, "CHARLM_DIST_TIMEOUT": "60"}
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.Popen([sys.executable, "-m", "charlm", "train", "--config", str(config), "--corpus",
                             str(corpus), "--out", str(out), "--max-time", "120", "--quiet", "--nproc", "2",
                             "--set", "train.log_interval=1"], cwd=tmp, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.2)
        time.sleep(2.0)  # well into training
        if signum == 2:
            os.killpg(proc.pid, signals.SIGINT)
        else:
            proc.send_signal(signals.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signals.SIGKILL)
    assert proc.returncode == code, stderr
    assert f"interrupted by {name}" in stderr and "saved" in stderr, stderr
    assert "Traceback" not in stderr
    step = int(stderr.split(" at step ")[1].split(";")[0])
    saved = json.loads((out / "last" / "manifest.json").read_text(encoding="utf-8"))
    assert saved["step"] == step


def _relay(chunks):
    """What relay_worker_stderr shows and returns for these chunks of the workers' stderr."""
    import io
    import threading

    from charlm import launch

    read, write = os.pipe()

    def feed():
        for chunk in chunks:
            os.write(write, chunk)
        os.close(write)

    shown = io.BytesIO()
    wrapper = io.TextIOWrapper(shown)
    feeder = threading.Thread(target=feed)
    feeder.start()
    with os.fdopen(read, "rb") as stream, pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "stderr", wrapper)
        result = launch.relay_worker_stderr(stream)
    feeder.join()
    value = shown.getvalue()
    wrapper.detach()
    return value, result


def test_the_relay_shows_bar_frames_at_once_and_error_lines_once_and_holds_torchrun_s_report():
    failed = (b"E1202 05:51:14.327000 17218 torch/distributed/elastic/multiprocessing/api.py:1002] "
              b"failed (exitcode: 2) local_rank: 0 (pid: 17223) of binary: python\n")
    shown, (code, said, held) = _relay([
        b"\rtraining  40%|####", b"charlm: error: corpus is too short\n",  # a frame, then a line
        b"charlm: error: corpus is too short\n",                           # the other rank's, the same
        b"Exception in thread X:\nTraceback (most recent call last):\n  a worker's own\n",
        failed, b"Traceback (most recent call last):\n  torchrun's\n", b"exitcode  : 2\n"])
    assert shown == (b"\rtraining  40%|####charlm: error: corpus is too short\n"
                     b"Exception in thread X:\nTraceback (most recent call last):\n  a worker's own\n")
    assert code == 2 and said
    assert held[0] == failed and b"torchrun's" in b"".join(held)
    # the frame and the line in one read: the line is still found, counted and shown once
    shown, (_, said, _) = _relay([b"\rtraining  40%|####charlm: error: X\n", b"charlm: error: X\n"])
    assert shown == b"\rtraining  40%|####charlm: error: X\n" and said


def test_the_torchrun_command_drops_nproc_in_both_spellings_and_keeps_every_other_argument(monkeypatch):
    """Catches: run_torchrun passing '--nproc=N' (or the value after '--nproc') on to the workers, where each
    worker would start a torchrun of its own, or dropping an argument that follows it."""
    import sys

    from charlm import launch

    started = []

    class FakePopen:
        def __init__(self, cmd, **kwargs):
            started.append(cmd)
            self.returncode, self.stderr = 0, None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def send_signal(self, sig):
            pass

        def wait(self):
            return 0

    monkeypatch.setattr(launch.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(launch, "relay_worker_stderr", lambda stream, signalled=None: (None, False, []))
    argv = ["train", "--nproc", "2", "--corpus", "c.txt", "--nproc=2", "--set", "train.lr=0.1", "-q", "--json"]
    assert launch.run_torchrun(argv, 2) == 0
    (cmd,) = started
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[5:] == ["-m", "charlm", "train", "--corpus", "c.txt", "--set", "train.lr=0.1", "-q", "--json"]


class _FakeTorchrun:
    """subprocess.Popen standing in for torchrun: ends with `returncode`; records the signals passed on.
    `on_start` runs inside the constructor (before run_torchrun holds the process)."""

    def __init__(self, returncode, on_start=None):
        self.returncode_at_end, self.on_start, self.sent = returncode, on_start, []

    def __call__(self, cmd, **kwargs):
        self.returncode, self.stderr, self.env = None, None, kwargs.get("env")
        if self.on_start:
            self.on_start()
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def send_signal(self, sig):
        self.sent.append(sig)

    def wait(self):
        self.returncode = self.returncode_at_end
        return self.returncode


def _run_fake_torchrun(monkeypatch, returncode, relayed=(None, False, []), during_relay=None, on_start=None):
    from charlm import launch

    fake = _FakeTorchrun(returncode, on_start)
    monkeypatch.setattr(launch.subprocess, "Popen", fake)

    def relay(stream, signalled=None):
        if during_relay:
            during_relay()
        return relayed
    monkeypatch.setattr(launch, "relay_worker_stderr", relay)
    return launch.run_torchrun(["train", "--corpus", "c.txt", "--nproc", "2"], 2), fake


# Kills launch.py:86 (torchrun's held-back report no longer shown when no worker said what went wrong).
def test_a_failure_no_worker_explained_shows_torchrun_s_own_report(monkeypatch, capsys):
    code, _ = _run_fake_torchrun(monkeypatch, 1, (None, False, [b"torchrun: rendezvous failed\n"]))
    assert code == 1 and "torchrun: rendezvous failed" in capsys.readouterr().err


# Kills launch.py:96 (`EXIT_FAILURE if code < 0` dropped: torchrun killed by a signal gave a negative exit code).
def test_torchrun_killed_by_a_signal_exits_1_not_a_negative_code(monkeypatch):
    code, _ = _run_fake_torchrun(monkeypatch, -9)
    assert code == 1


# Kills launch.py:92 (a worker killed by a signal described as "failed first, with exit code -9").
def test_a_worker_killed_by_a_signal_is_named_with_the_signal(monkeypatch, capsys):
    held = [b"E1202 05:51:14.327000 17218 torch/distributed/elastic/multiprocessing/api.py:1002] "
            b"failed (exitcode: -9) local_rank: 1 (pid: 17223) of binary: python\n"]
    code, _ = _run_fake_torchrun(monkeypatch, 1, (-9, True, held))
    assert code == 1
    assert "charlm: error: torchrun: the worker of local rank 1 was killed by signal 9" in capsys.readouterr().err


# Kills launch.py:67 (`signum not in stopped` dropped: a second Ctrl-C passed on again, which makes torchrun
# kill the workers while they save).
def test_a_second_signal_is_not_passed_on_to_torchrun_again(monkeypatch):
    def two_ctrl_c():
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
    code, fake = _run_fake_torchrun(monkeypatch, 1, during_relay=two_ctrl_c)
    assert fake.sent == [signal.SIGINT] and code == 130


# Kills launch.py:76 (a signal that came before torchrun was started never passed on to it).
def test_a_signal_before_torchrun_started_is_passed_on_once_it_has(monkeypatch):
    code, fake = _run_fake_torchrun(monkeypatch, 1, on_start=lambda: signal.raise_signal(signal.SIGTERM))
    assert fake.sent == [signal.SIGTERM] and code == 143


# Kills launch.py:115 (`worker_code or int(...)` -> the last exit code torchrun printed, not the first failure's).
def test_the_relay_keeps_the_exit_code_of_the_first_failure():
    first = (b"E1202 05:51:14.327000 17218 torch/distributed/elastic/multiprocessing/api.py:1002] "
             b"failed (exitcode: 3) local_rank: 1 (pid: 17223) of binary: python\n")
    _, (code, _, _) = _relay([b"charlm: error: rank 0 lost its peer\n", first,
                              b"Traceback (most recent call last):\n  torchrun's\n",
                              b"  exitcode  : 3\n", b"  exitcode  : 1\n"])
    assert code == 3


# Kills launch.py:27 (the --val file no longer checked before the workers start).
def test_check_before_launch_refuses_a_missing_validation_file(tmp_path):
    from charlm.config import load_config
    from charlm.errors import UsageError
    from charlm.launch import check_before_launch

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat.\n" * 20, encoding="utf-8")
    with pytest.raises(UsageError, match="file not found: .*nowhere.txt"):
        check_before_launch(load_config(None, ["train.batch_size=4"], {}), corpus, tmp_path / "nowhere.txt", 2,
                            tmp_path / "run")


# Kills launch.py:32 (`resume is None` dropped: `--resume runs/corpus --corpus corpus.txt --nproc 2` refused as
# "already holds a run", since the default --out of that corpus is the run being resumed).
def test_check_before_launch_lets_a_resume_continue_the_corpus_s_default_run(tmp_path, monkeypatch):
    from charlm.config import load_config
    from charlm.launch import check_before_launch

    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat.\n" * 20, encoding="utf-8")
    run = tmp_path / "runs" / "corpus"
    (run / "last").mkdir(parents=True)  # the run started earlier with the default --out
    check_before_launch(load_config(None, ["train.batch_size=4"], {}), corpus, None, 2, None, resume=run)


# Kills launch.py's SIG_DFL after a signal: in charlm's own process, a second Ctrl-C while the launcher exits
# raised in the restored handler (a traceback or a second line) instead of ending the process.
@pytest.mark.parametrize("own_process", [True, False])
def test_after_a_signal_the_launcher_lets_a_second_one_end_its_own_process(monkeypatch, own_process):
    from charlm import launch

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    fake = _FakeTorchrun(130, None)
    monkeypatch.setattr(launch.subprocess, "Popen", fake)
    monkeypatch.setattr(launch, "relay_worker_stderr",
                        lambda stream, signalled=None: (signal.raise_signal(signal.SIGINT), (None, False, []))[1])
    try:
        code = launch.run_torchrun(["train", "--corpus", "c.txt", "--nproc", "2"], 2, own_process=own_process)
        after = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
    assert code == 130 and fake.sent == [signal.SIGINT]
    assert after == ((signal.SIG_DFL, signal.SIG_DFL) if own_process else before)


# Kills train.py's saved loss_sum (the ranks' mean of the losses since the last metrics line): with rank 0's
# own sum saved and restored on every rank, the first train_loss line after a resume counted rank 0's half
# of the batch only for the steps before the stop.
def test_a_two_process_run_stopped_between_two_log_lines_resumes_to_the_same_train_losses(setup, two_process_run):
    tmp, corpus, config = setup
    first = charlm(["--config", str(config), "--corpus", str(corpus), "--out", str(tmp / "mid"),
                    "--max-steps", "3"], tmp, nproc=2)  # log_interval 5: stopped inside the first interval
    assert first.returncode == 0, first.stderr
    second = charlm(["--resume", str(tmp / "mid"), "--max-steps", "10"], tmp, nproc=2)
    assert second.returncode == 0, second.stderr

    def train_losses(run):
        records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return [(r["step"], r["train_loss"]) for r in records if r.get("train_loss") is not None and "event" not in r]

    whole, resumed = train_losses(two_process_run), train_losses(tmp / "mid")
    assert [s for s, _ in resumed] == [s for s, _ in whole] == [5, 10]
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in whole], rel=1e-5)


# Kills launch.py's CHARLM_COLUMNS and runtime.bar_width: rank 0's bar, drawn into a pipe, had no width to read
# (tqdm drew it 97 wide on an 80-column terminal, and each redraw left a line behind).
def test_the_workers_bar_takes_the_launchers_terminal_width(monkeypatch):
    from charlm import launch, runtime

    class Terminal:
        def isatty(self):
            return True

        def fileno(self):
            raise OSError("not a real terminal")

        def write(self, text):
            return len(text)

        def flush(self):
            pass

    fake = _FakeTorchrun(0, None)
    monkeypatch.setattr(launch.subprocess, "Popen", fake)
    monkeypatch.setattr(launch, "relay_worker_stderr", lambda stream, signalled=None: (None, False, []))
    monkeypatch.setattr(launch.sys, "stderr", Terminal())
    monkeypatch.setenv("COLUMNS", "80")
    assert launch.run_torchrun(["train", "--corpus", "c.txt", "--nproc", "2"], 2) == 0
    assert fake.env["CHARLM_STDERR_IS_TERMINAL"] == "1" and fake.env["CHARLM_COLUMNS"] == "80"
    monkeypatch.setenv("CHARLM_COLUMNS", "80")
    assert runtime.bar_width() == {"ncols": 79}  # as the worker draws it
    monkeypatch.delenv("CHARLM_COLUMNS")
    assert runtime.bar_width() == {"dynamic_ncols": True}  # one process: the stream's own width


PATIENT = """
import os, sys, time
from datetime import timedelta
import torch
from charlm.runtime import Distributed

rank, patient = int(sys.argv[1]), sys.argv[2] == "patient"
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()  # both imported: the 1 s timeout starts together
torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=1))
dist = Distributed(rank, 2, rank)
group = dist.patient_group() if patient else None
if rank == 0:
    time.sleep(3)  # the first process of the machine, tokenizing a large corpus
try:
    dist.barrier(group)
    print("passed")
except RuntimeError:
    print("timed out")
"""


# Kills runtime.Distributed.patient_group (and train.py's wait on it): the other ranks waited for the tokenizer
# under CHARLM_DIST_TIMEOUT, so a corpus that took longer to tokenize could never start under --nproc.
@pytest.mark.parametrize("mode, expected", [("patient", "passed"), ("plain", "timed out")])
def test_the_wait_for_the_tokenizer_outlasts_the_collective_timeout(tmp_path, mode, expected):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "patient.py"
    script.write_text(PATIENT, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), mode, port], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
             for rank in (0, 1)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=120)[0].strip().splitlines() for p in procs]
    assert [o[-1] if o else "" for o in outs] == [expected, expected]  # the plain barrier: the timeout is real


def _processes_naming(marker: str) -> list[int]:
    """The processes whose command line names `marker` (a test's own run folder), this one left out."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                line = fh.read()
        except OSError:
            continue
        if int(pid) != os.getpid() and marker.encode() in line and b"charlm" in line:
            found.append(int(pid))
    return found


# Kills launch.py's SIGHUP handler (left to its default, SIGHUP ended the launcher alone: torchrun and the
# workers, in a session of their own, trained on and held the run's lock), its relay's writes to a terminal
# that is gone (EIO ended the relay, and the workers then failed on a closed pipe), and train.py's SIGHUP in
# _Signals (a run of one process died at once, unsaved; the workers died when torchrun passed SIGHUP on).
@pytest.mark.skipif(not os.path.isdir("/proc") or not hasattr(signal, "SIGHUP"), reason="Linux: a pty and /proc")
@pytest.mark.parametrize("nproc", [1, 2])
def test_a_closed_terminal_stops_the_run_at_a_clean_point_saves_it_and_lets_go_of_it(setup, nproc):
    """The command runs in a terminal of its own (a pty, its controlling terminal, as a shell's job has);
    closing the pty's master is what closing a terminal window does: the kernel sends SIGHUP, and every
    write to the terminal fails with EIO from then on, the stop's own line included."""
    import fcntl
    import termios
    import time

    tmp, corpus, config = setup
    out = tmp / f"hung-up-{nproc}"
    master, terminal = os.openpty()

    def own_terminal():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    env = {**os.environ, "CHARLM_DIST_TIMEOUT": "60"}
    env.pop("OMP_NUM_THREADS", None)
    args = ["--config", str(config), "--corpus", str(corpus), "--out", str(out), "--max-time", "120", "--quiet",
            "--set", "train.log_interval=1", "--set", "train.eval_interval=0"]  # no save but the stop's
    proc = subprocess.Popen([sys.executable, "-m", "charlm", "train", *args,
                             *(["--nproc", str(nproc)] if nproc > 1 else [])],
                            cwd=tmp, env=env, stdin=terminal, stdout=terminal, stderr=terminal,
                            preexec_fn=own_terminal)
    os.close(terminal)
    try:
        metrics, deadline = out / "metrics.jsonl", time.time() + 90
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("train_loss") >= 3):
            time.sleep(0.2)
        os.close(master)  # the terminal is closed
        master = None
        code = proc.wait(timeout=120)
        time.sleep(0.5)  # torchrun reaps its workers before it exits; a moment for /proc to catch up
        left = _processes_naming(str(out))
    finally:
        if master is not None:
            os.close(master)
        for pid in _processes_naming(str(out)):  # the old code's: torchrun and the workers, still training
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    assert code == 129, code
    assert left == []
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the run's lock is free
    finally:
        os.close(fd)
    saved = json.loads((out / "last" / "manifest.json").read_text(encoding="utf-8"))
    state = torch.load(out / "last" / "trainer.pt", weights_only=True)
    assert saved["step"] >= 3 and state["progress"]["step"] == saved["step"]


# Kills launch.py's write_stderr (a write to stderr that failed, EIO from a terminal that hung up, ended the relay:
# torchrun's pipe was closed, and a worker that wrote its stop line then failed on it).
def test_the_relay_reads_the_workers_lines_to_their_end_when_the_terminal_is_gone(monkeypatch):
    import io
    import threading

    from charlm import launch

    master, terminal = os.openpty()
    os.close(master)  # hung up: a write to `terminal` fails with EIO
    dead = io.TextIOWrapper(io.FileIO(terminal, "w"))
    read, write = os.pipe()
    lines = [b"charlm: error: interrupted by SIGHUP at step 7; saved run/last\n"] + [b"x" * 99 + b"\n"] * 2000

    def feed():  # 200 kB: more than a pipe holds, so a relay that stopped reading would leave this blocked
        for line in lines:
            os.write(write, line)
        os.close(write)

    feeder = threading.Thread(target=feed)
    feeder.start()
    monkeypatch.setattr(sys, "stderr", dead)
    with os.fdopen(read, "rb") as stream:
        _, said, _ = launch.relay_worker_stderr(stream)
    feeder.join(timeout=10)
    assert said and not feeder.is_alive()
    dead.write("after the relay\n")
    dead.flush()  # the descriptor now goes to /dev/null: nothing fails at exit either
    monkeypatch.undo()
    dead.close()


# The start of a rank-0 hook that sends Ctrl-C to the launcher: it reaches the launcher alone (torchrun, the
# launcher's child, has a session of its own), which passes it on to torchrun and torchrun to the workers;
# `interrupt_launcher(loop)` waits until this rank's trainer has it.
INTERRUPT_LAUNCHER = """
import os, signal, time

def interrupt_launcher(loop):
    with open(f"/proc/{os.getppid()}/stat") as fh:
        launcher = int(fh.read().rsplit(")", 1)[1].split()[1])
    os.kill(launcher, signal.SIGINT)
    deadline = time.time() + 60
    while loop.signals.received is None and time.time() < deadline:
        time.sleep(0.05)
"""

FINAL_SIGINT = INTERRUPT_LAUNCHER + """
if os.environ.get("RANK") == "0":
    import charlm.train
    original = charlm.train._Loop._final_check

    def final_check(self):  # Ctrl-C as the final validation starts
        interrupt_launcher(self)
        return original(self)

    charlm.train._Loop._final_check = final_check
"""


def nproc_with_hook(setup, name: str, hook_source: str, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`charlm train --nproc 2` of 6 steps with no periodic check into tmp/name, `hook_source` loaded by every
    process (sitecustomize)."""
    tmp, corpus, config = setup
    hook = tmp / f"{name}-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(hook_source, encoding="utf-8")
    out = tmp / name
    env = {**os.environ, "CHARLM_DIST_TIMEOUT": "60",
           "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    env.pop("OMP_NUM_THREADS", None)
    result = subprocess.run([sys.executable, "-m", "charlm", "train", "--config", str(config), "--corpus",
                             str(corpus), "--out", str(out), "--max-steps", "6", "--quiet", "--nproc", "2",
                             "--set", "train.eval_interval=0", *args],
                            cwd=tmp, env=env, capture_output=True, text=True, timeout=240)
    return result, out


# Kills train.py's _AgreedStop (the final validation under --nproc was not cut short by a signal: it ran to its
# end, the workers exited 0 as if nothing had happened, and the launcher exited 130 with nothing on stderr).
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="the hook finds the launcher through /proc")
def test_nproc_interrupted_during_the_final_validation_saves_and_says_so_as_one_process_does(setup):
    tmp = setup[0]
    result, out = nproc_with_hook(setup, "final-sigint", FINAL_SIGINT,
                                  "--set", "train.eval_batch_size=1")  # rank 1 reads none
    assert result.returncode == 130, result.stderr
    assert result.stderr.startswith("charlm: error: interrupted by SIGINT during the final validation at step 6; "
                                    f"saved {out / 'last'}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert json.loads((out / "last" / "manifest.json").read_text(encoding="utf-8"))["step"] == 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert not any(r.get("event") == "end" or "val_loss" in r for r in records)  # the run is not done
    resumed = charlm(["--resume", str(out), "--json"], tmp)  # nothing left to train: the final validation
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["steps"] == 6 and json.loads(resumed.stdout)["val_loss"] is not None


RECOVER_FAILS = """
import os
if os.environ.get("RANK") == "0":
    import charlm.checkpoint

    def recover(run_dir):
        raise PermissionError(13, "Permission denied", str(run_dir) + "/last.old")

    charlm.checkpoint.recover = recover
"""


# Kills the `except Exception` of runtime.Distributed.together: a failure that is not one of charlm's errors
# (an OSError in rank 0's recovery of the run folder) ended rank 0 alone, and rank 1 failed in the collective
# with gloo's "Connection closed by peer", a line that could reach the user first.
def test_a_failure_of_rank_0_alone_that_is_not_a_bad_input_is_every_rank_s_too(setup):
    tmp, corpus, config = setup
    hook = tmp / "recover-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(RECOVER_FAILS, encoding="utf-8")
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    result = charlm(["--config", str(config), "--corpus", str(corpus), "--out", str(tmp / "recover-fails"),
                     "--max-steps", "2"], tmp, nproc=2, env=env)
    assert result.returncode != 0
    errors = sorted(re.findall(r"charlm: [^\n]*", result.stderr))  # rank 0 adds --debug's hint: its traceback
    assert len(errors) == 2 and errors[1] == errors[0] + " (run with --debug for the traceback)", result.stderr
    assert errors[0].startswith("charlm: error: PermissionError: [Errno 13] Permission denied"), result.stderr
    assert "Connection closed" not in result.stderr, result.stderr
    launched = train_nproc(["--config", str(config), "--corpus", str(corpus), "--out", str(tmp / "recover-fails-2"),
                            "--max-steps", "2"], tmp, env=env)  # the launcher shows the one failure once
    assert launched.returncode == 1, launched.stderr
    lines = launched.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("charlm: error: PermissionError: [Errno 13]"), launched.stderr
    assert lines[1].startswith("charlm: error: torchrun: the worker of local rank"), launched.stderr


FINAL_SAVE_SIGINT = INTERRUPT_LAUNCHER + """
if os.environ.get("RANK") == "0":
    import charlm.train
    original = charlm.train._Loop._save

    def save(self, name, *args, **kwargs):
        # Ctrl-C as the run's end saves its first checkpoint (eval_interval 0: there is no other save)
        if not getattr(self, "_hooked", False):
            self._hooked = True
            interrupt_launcher(self)
        return original(self, name, *args, **kwargs)

    charlm.train._Loop._save = save
"""


# Kills launch.ended_since: a signal while the workers saved the end of a complete run (the saves go on, and
# the workers exit 0) left torchrun's exit code non-zero, and the launcher exited 130 with nothing on stderr.
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="the hook finds the launcher through /proc")
def test_nproc_signalled_during_the_final_saves_ends_done_as_one_process_does(setup):
    result, out = nproc_with_hook(setup, "final-save", FINAL_SAVE_SIGINT, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 6 and "charlm: error" not in result.stderr, result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert records[-1]["event"] == "end"
    for name in ("best", "last"):
        assert json.loads((out / name / "manifest.json").read_text(encoding="utf-8"))["step"] == 6


# Kills runtime.Distributed.together (and its uses in train.py): a bad input that only rank 0 (the run folder)
# or only the first process of a machine (the token cache) finds ended that process alone; the others, waiting
# for it in a collective, failed with gloo's "Connection closed by peer", a line that could reach the user
# first (and with its exit code 1), or hung until torchrun killed them 30 s later. Also cli._err's one write:
# printed in two, the ranks' lines were now and then glued into one on the pipe they share.
@pytest.mark.parametrize("case", ["out", "cache"])
def test_a_bad_input_found_by_rank_0_alone_is_every_rank_s_error(setup, case):
    tmp, corpus, config = setup
    a_file = tmp / "a-file"
    a_file.write_text("not a folder\n", encoding="utf-8")
    args, line = {"out": (["--out", str(a_file / "run")], "charlm: error: cannot write to run folder"),
                  "cache": (["--out", str(tmp / "cacheless"), "--cache-dir", str(a_file / "cache")],
                            "charlm: error: cannot create the token cache folder")}[case]
    result = charlm(["--config", str(config), "--corpus", str(corpus), "--max-steps", "2", *args], tmp, nproc=2)
    errors = re.findall(r"charlm: [^\n]*", result.stderr)
    assert len(errors) == 2 and errors[0] == errors[1] and errors[0].startswith(line), result.stderr
    assert "Connection closed" not in result.stderr and "forcefully" not in result.stderr, result.stderr
    if case == "cache":  # under the launcher: its one line, exit 2; the run folder rank 0 had made is gone
        launched = train_nproc(["--config", str(config), "--corpus", str(corpus), *args], tmp)
        assert launched.returncode == 2, launched.stderr
        assert launched.stderr.strip().splitlines() == [errors[0]], launched.stderr
        assert not (tmp / "cacheless").exists()


# Kills launch.py's check_writable: an --out that cannot be written reached the workers, where rank 0 alone finds it.
def test_check_before_launch_tries_a_real_write_of_the_run_folder_and_leaves_nothing(tmp_path):
    from charlm.config import load_config
    from charlm.errors import UsageError
    from charlm.launch import check_before_launch

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat.\n" * 20, encoding="utf-8")
    cfg = load_config(None, ["train.batch_size=4"], {})
    (tmp_path / "a-file").write_text("x", encoding="utf-8")  # refused by a real write, also as root
    with pytest.raises(UsageError, match="cannot write to run folder .*a-file/run .*Not a directory"):
        check_before_launch(cfg, corpus, None, 2, tmp_path / "a-file" / "run")
    check_before_launch(cfg, corpus, None, 2, tmp_path / "new" / "deeper" / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "corpus.txt"]  # no folder, no probe left
