"""Device choice, seeding and CPU threads: a leaf module that everything may import."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import select
import shutil
import sys
from contextlib import contextmanager
from datetime import timedelta
from functools import cache
from pathlib import Path

import torch

from .errors import EXIT_FAILURE, CharlmError, UsageError, to_devnull


def file_sha256(path) -> str:
    """SHA-256 of a file, read 1 MiB at a time (a corpus's cache key, a checkpoint file's check)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def terminal_columns(stream) -> int:
    """The width of the terminal that `stream` shows on (COLUMNS, else 80, where it cannot be read)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return shutil.get_terminal_size().columns


def bar_width() -> dict:
    """tqdm's width settings: the launcher's terminal width for a worker of `charlm train --nproc`, whose
    stderr is a pipe (tqdm would draw it 100 wide and leave a stale line at each redraw), else the stream's
    own width, followed as it changes."""
    columns = os.environ.get("CHARLM_COLUMNS", "")
    # one column short of the width, as tqdm takes a terminal's (a full-width line wraps on some terminals)
    return {"ncols": int(columns) - 1} if columns.isdigit() and int(columns) > 1 else {"dynamic_ncols": True}


class LogStream:
    """The stream a run writes its progress to, whose failed writes do not end the run. Where a write fails
    (`charlm train ... 2>&1 | head` once head has read its lines: EPIPE; a terminal that hung up: EIO; a log
    on a full disk), the stream's descriptor goes to /dev/null and the run trains on, saves and exits as it
    would have: before, the write's error ended the run with exit 1, no message and nothing saved."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._guarded(self._stream.write, text, default=len(text))

    def flush(self) -> None:
        self._guarded(self._stream.flush)

    def _guarded(self, call, *args, default=None):
        try:
            return call(*args)
        except (OSError, ValueError):  # ValueError: a stream that was closed
            try:
                to_devnull(self._stream.fileno())
            except (OSError, ValueError, AttributeError):  # not a descriptor (a test's buffer): writes are dropped
                self._stream = open(os.devnull, "w", encoding="utf-8")
            return default

    def __getattr__(self, name):  # isatty, fileno, encoding... as the stream's
        return getattr(self._stream, name)


def silence_dead_outputs() -> None:
    """After a hang-up: stdout and stderr whose terminal (or pipe's reader) is gone go to /dev/null. poll()
    tells without writing (POLLERR or POLLHUP), so a SIGHUP sent by hand to a live terminal keeps its lines."""
    poll = getattr(select, "poll", None)
    if poll is None:  # Windows: no SIGHUP either
        return
    for fd in (1, 2):
        try:
            poller = poll()
            poller.register(fd, select.POLLOUT)
            gone = any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
            if gone:
                to_devnull(fd)
        except (OSError, ValueError):
            pass


def is_terminal(stream) -> bool:
    """Whether `stream` shows on a terminal: its own isatty(), or, for a worker of `charlm train --nproc`
    whose stderr is a pipe to the launcher, the launcher's word that its stderr is one."""
    if getattr(stream, "isatty", lambda: False)():
        return True
    return stream is sys.stderr and os.environ.get("CHARLM_STDERR_IS_TERMINAL") == "1"


def resolve_device(name: str) -> torch.device:
    """Map `auto | cpu | cuda | cuda:N` to a torch.device, refusing CUDA where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    cuda = re.fullmatch(r"cuda(?::(0|[1-9][0-9]*))?", name)  # ASCII digits, no leading zero, as torch reads them
    if cuda is None:  # torch.device would raise a RuntimeError for 'cudax' or 'cuda:abc'
        raise UsageError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UsageError(f"device '{name}' was asked for but this machine has no CUDA GPU; use --device cpu")
    count = torch.cuda.device_count()
    if cuda.group(1) is not None and int(cuda.group(1)) >= count:
        raise UsageError(f"device '{name}' was asked for but this machine has {count} CUDA GPU"
                         f"{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed every generator charlm draws from (only torch's: no random, no numpy)."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


class Distributed:
    """Where this process stands in a torchrun job: rank, world size, and the collectives charlm needs.

    Outside torchrun (no WORLD_SIZE > 1 in the environment) it is a single
    process and every method is a cheap no-op.
    """

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self, group=None) -> None:
        if self.enabled:
            torch.distributed.barrier(group=group)

    def patient_group(self):
        """A gloo group of every rank whose collectives wait as long as they must (a week): for the wait on
        the first process of each machine while it tokenizes the corpus, which for a large one takes longer
        than CHARLM_DIST_TIMEOUT (that timeout is meant for a rank that is stuck). Every rank makes it at
        once, before the wait: made during it, its own set-up would wait under the short timeout."""
        if not self.enabled:
            return None
        return torch.distributed.new_group(backend="gloo", timeout=timedelta(days=7))

    @contextmanager
    def together(self, group=None):
        """A block that some ranks do alone (rank 0 makes and locks the run folder, the first process of each
        machine tokenizes), left by every rank together: a CharlmError raised in it on any rank is raised on
        every rank (the lowest rank's, where several failed). The others would otherwise wait for it in their
        next collective and fail there with a broken connection (gloo's line reaching the user before
        charlm's) or hang until torchrun kills them; now each says the same line, which the launcher shows
        once, with its exit code."""
        error, said = None, None
        try:
            yield
        except CharlmError as exc:
            if not self.enabled:
                raise
            error, said = exc, (exc.message, exc.exit_code)
        except Exception as exc:  # a failure (a folder that cannot be read): the others say it as the CLI would
            if not self.enabled:
                raise
            text = str(exc).strip().splitlines()
            error, said = exc, (f"{type(exc).__name__}: {text[0] if text else ''}", EXIT_FAILURE)
        if not self.enabled:
            return
        errors = [None] * self.world
        torch.distributed.all_gather_object(errors, said, group=group)
        first = next((rank for rank, found in enumerate(errors) if found is not None), None)
        if first == self.rank:
            raise error
        if first is not None:
            raise CharlmError(*errors[first])

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks, in float64."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t.tolist()

    def gather_objects(self, value) -> list:
        """Every rank's `value`, in rank order (charlm's own values: the generators' states)."""
        if not self.enabled:
            return [value]
        values = [None] * self.world
        torch.distributed.all_gather_object(values, value)
        return values

    def gather_batch(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's share of a (L, B/W, H) state along the batch dimension."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=1)

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """Join the torchrun job if there is one (gloo on the CPU, NCCL and gloo on CUDA) and pick this rank's device."""
    world = world_size()
    if world <= 1:
        return Distributed(), resolve_device(device_name)
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    # on CUDA the gradients go through NCCL, and the small CPU tensors of Distributed.sum / gather_objects / together
    # (the stop flags, the clock, the losses) through gloo: NCCL takes no CPU tensor. Not yet run on GPUs (no
    # session has had two).
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=float(os.environ.get("CHARLM_DIST_TIMEOUT", "300")))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=timeout)
    return Distributed(rank, world, local), device


def keep_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Let glibc's malloc keep freed blocks below `limit_bytes` for reuse instead of handing them back.

    By default glibc serves a large request with a fresh mmap and unmaps it when
    freed, so every training step page-faults its big buffers (activations, the
    logits and their gradients) in again: 160,000 faults a step for a 30,000-word
    vocabulary, about 40% of the step's time on a 2-core CPU. With this setting
    the process keeps its peak memory mapped (as jemalloc or tcmalloc would) and
    reuses it. Returns False where there is no glibc (macOS, Windows, musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, limit_bytes)) and bool(mallopt(m_trim_threshold, limit_bytes))


@cache
def cpuinfo() -> str:
    """/proc/cpuinfo's text (Linux), read once; "" where there is none."""
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def amd_avx512() -> bool:
    """An AMD processor with AVX-512 (Zen 4 and 5), where MKL, which picks its kernels by the vendor, keeps
    to its AVX2 ones; Linux only, False where /proc/cpuinfo cannot tell."""
    info = cpuinfo()
    return "AuthenticAMD" in info and " avx512f" in info


def cpu_family() -> int | None:
    """The processor's family from /proc/cpuinfo (AMD: 25 for Zen 3 and 4, 26 for Zen 5); None where unknown."""
    found = re.search(r"^cpu family\s*:\s*(\d+)\s*$", cpuinfo(), re.MULTILINE)
    return int(found.group(1)) if found else None


def world_size() -> int:
    """The number of processes of this torchrun job (WORLD_SIZE), 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


@cache
def intel_cpu() -> bool:
    """Whether this is an Intel processor: /proc/cpuinfo's vendor on Linux, else platform's words.

    ATen draws a CPU Bernoulli mask (dropout's) with MKL's vectorised generator on Intel processors only;
    on others it draws one value at a time (cells.dropout). Only speed depends on the answer, and without
    /proc/cpuinfo it can miss an Intel processor (macOS names one 'i386')."""
    info = cpuinfo()
    return "GenuineIntel" in info if info else "intel" in platform.processor().lower()
