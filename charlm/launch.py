"""`charlm train --nproc N`: data-parallel training in N processes on this machine, through torchrun.

The launcher checks what it can once (the config, the files, the batch's split) before any worker
starts, then runs `torchrun --standalone -m charlm train ...` and stands between the workers' stderr
and the user's: the workers' lines pass through as they come, torchrun's own report of a failure does
not, and the exit code is the workers' (2 for a bad input, 129 / 130 / 143 after a signal), not torchrun's 1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from .config import Config
from .data import check_text_file, empty_corpus, is_blank
from .errors import EXIT_FAILURE, UsageError, caught_signals, signal_exit_code, to_devnull
from .runs import METRICS_FILE, run_folder_of
from .runtime import terminal_columns
from .train import check_new_run_dir, check_run_folder_free, check_writable, new_run_dir


def check_before_launch(cfg: Config, corpus: Path | None, val: Path | None, nproc: int,
                        out: Path | None = None, resume: Path | None = None) -> Path | None:
    """What would fail in every worker, or in rank 0 alone while the others wait for it (a run folder that
    cannot be written: a real write, whose probe and folders are removed again), found once, before torchrun
    starts. Returns the run folder (None where the workers will say why there is none)."""
    run_dir = None
    for path in (corpus, val):
        if path is not None:
            check_text_file(path, cfg.data.encoding)
    if corpus is not None and is_blank(corpus, cfg.data.encoding, limit=1 << 20):
        raise empty_corpus(corpus)
    if resume is None and corpus is not None:
        run_dir = new_run_dir(out, corpus)
        check_new_run_dir(run_dir)
        check_run_folder_free(run_dir)
        check_writable(run_dir, keep=False)
    if resume is not None:
        run_dir = run_folder_of(Path(resume), "--resume", names=("last",))
        check_run_folder_free(run_dir)
        if run_dir.is_dir():  # a missing one: the workers say so
            check_writable(run_dir, keep=False)
    if cfg.train.batch_size % nproc:
        raise UsageError(f"train.batch_size {cfg.train.batch_size} must be a multiple of --nproc {nproc}: "
                         f"each process takes an equal share of the parallel streams")
    return run_dir


def run_torchrun(argv: list[str], nproc: int, own_process: bool = False, run_dir: Path | None = None) -> int:
    """`charlm train --nproc N ARGS` as `torchrun --standalone --nproc_per_node N -m charlm train ARGS`;
    `argv` is the command line after the program name. Returns the exit code. In charlm's own process
    (`own_process`), once a signal has been passed on and the workers are done, a later one ends the process
    at once, as in a run of one process; a caller's process gets its handlers back. A signal that came while
    the workers finished their run (its final saves, which a signal does not cut short) leaves torchrun's exit
    code non-zero: `run_dir`'s end record, written since the launch, tells that the run is done (exit 0, as
    one process exits)."""
    launched = time.time()
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        args.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "charlm", *args]
    debug = "--debug" in args  # everything torchrun prints, its report included
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, set here so that it does not announce it
    if sys.stderr.isatty() and not debug:  # the workers' stderr is a pipe to this process: rank 0 still
        env["CHARLM_STDERR_IS_TERMINAL"] = "1"  # draws its bar, as wide as this terminal (a pipe has no width)
        env["CHARLM_COLUMNS"] = str(terminal_columns(sys.stderr))
    stopped: list[int] = []
    running: list[subprocess.Popen] = []

    def on_signal(signum, frame):
        # torchrun runs in a session of its own, so Ctrl-C, or the SIGHUP of a terminal that was closed,
        # reaches this process alone: it is passed on once, torchrun passes it to the workers, they save
        # and stop, and this process keeps relaying their lines (to /dev/null once the terminal is gone)
        # until they are done. Left to its default, SIGHUP ended this process alone, and the workers
        # trained on, holding the run's lock.
        if signum not in stopped and running:
            running[0].send_signal(signum)
        stopped.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in caught_signals()}  # not a SIGHUP under nohup
    try:
        with subprocess.Popen(cmd, stderr=None if debug else subprocess.PIPE, env=env,
                              start_new_session=True) as proc:
            running.append(proc)
            for sig in dict.fromkeys(stopped):  # what came before there was anyone to pass it to
                proc.send_signal(sig)
            worker_code, said, held = (None, False, []) if debug else \
                relay_worker_stderr(proc.stderr, signalled=lambda: bool(stopped))
            proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if stopped and own_process else handler)
    if stopped and proc.returncode:
        return 0 if run_dir is not None and ended_since(run_dir, launched) else signal_exit_code(stopped[0])
    if proc.returncode and not said:  # no worker explained the failure: show torchrun's own report
        write_stderr(b"".join(held))
    elif proc.returncode and worker_code != 2:  # not a bad input: say which worker failed first, and how
        first = re.search(rb"exitcode: (-?\d+)\) local_rank: (\d+)", b"".join(held))
        if first:
            code, rank = int(first.group(1)), int(first.group(2))
            how = f"was killed by signal {-code}" if code < 0 else f"failed first, with exit code {code}"
            write_stderr(f"charlm: error: torchrun: the worker of local rank {rank} {how}\n".encode())
    code = worker_code if proc.returncode and said and worker_code and worker_code > 0 else proc.returncode
    return EXIT_FAILURE if code < 0 else code  # torchrun killed by a signal


def ended_since(run_dir: Path, since: float) -> bool:
    """Whether the run's metrics log ends with its end record, written after `since` (a time.time())."""
    log = Path(run_dir) / METRICS_FILE
    try:
        if log.stat().st_mtime < since:
            return False
        with open(log, "rb") as fh:
            fh.seek(max(fh.seek(0, os.SEEK_END) - 65536, 0))
            last = fh.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
        return json.loads(last).get("event") == "end"
    except (OSError, ValueError, AttributeError):  # no log, a line cut short, a record that is not an object
        return False


def write_stderr(data: bytes) -> None:
    """Write to stderr at once. Where that fails (EIO from a terminal that hung up, EPIPE from a reader that
    went away), stderr goes to /dev/null: the workers' lines are still read and dropped, so that no worker
    blocks on a full pipe, or fails on a closed one, while it saves."""
    out = sys.stderr.buffer
    try:
        out.write(data)
        out.flush()
    except OSError:
        try:
            to_devnull(out.fileno())
        except (OSError, ValueError):  # not a descriptor (a test's buffer)
            pass


def relay_worker_stderr(stream, signalled=lambda: False) -> tuple[int | None, bool, list[bytes]]:
    """Copy the workers' stderr through as it comes, holding back torchrun's own log lines and its report
    of a failure (or of the signal it was given, when `signalled()`), and passing each `charlm: ...` line
    once. Returns the exit code of a failed worker that torchrun reported, whether a worker wrote an
    error line, and the lines held back."""
    own = re.compile(rb"^[WEI]\d{4} .*torch/distributed/")
    code = re.compile(rb"exitcode\s*:?\s*(-?\d+)")
    seen, held, pending = set(), [], b""
    failed = quiet = after_cr = said = False
    worker_code = None

    def relay(line: bytes) -> None:
        nonlocal failed, quiet, worker_code, said
        found = code.search(line)
        if own.match(line) or quiet:
            if found:
                worker_code = worker_code or int(found.group(1))
            failed = failed or (own.match(line) is not None and b"failed" in line)
            held.append(line)
            return
        if (failed or signalled()) and line.startswith(b"Traceback (most recent call last)"):
            quiet = True  # torchrun's own traceback and report, after its "failed" line or a signal
            held.append(line)
            return
        if line.startswith(b"charlm: "):  # a worker's error, note or stop: each once
            # (a failure that rank 0 alone met is every rank's, Distributed.together; only the rank that met it
            # has the traceback that --debug would show, and says so)
            key = line.strip().removesuffix(b" (run with --debug for the traceback)")
            if key in seen:
                return
            seen.add(key)
            said = said or line.startswith(b"charlm: error:")
        write_stderr(line)

    # A progress bar's frame has no end of its own: a line written after it starts on the same line.
    glued = re.compile(rb"(?<=.)(?=charlm: |[WEI]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ torch/distributed/)")

    for chunk in iter(lambda: os.read(stream.fileno(), 1 << 16), b""):
        pending += chunk
        *lines, pending = re.split(rb"(?<=[\n\r])", pending)  # progress bars end their frames with \r
        for line in lines:
            for part in glued.split(line):
                relay(part)
        after_cr = lines[-1].endswith(b"\r") if lines else after_cr
        if pending and after_cr:  # a progress bar's frame, written without an end: show it now
            for part in glued.split(pending):
                relay(part)
            pending = b""
    for part in glued.split(pending) if pending else ():
        relay(part)
    return worker_code, said, held
