"""The training loop: truncated BPTT with clipping, a learning-rate schedule,
validation, checkpoints, exact resume, clean stops, and data parallelism.

`train()` returns a `TrainResult`. It writes only to `log_stream` (stderr by
default): the progress bar and log lines, which `cli` may silence, and one-line
notes (`charlm: note: ...`) on what the user should know of a run that goes on
(no validation part, a corpus read with --errors replace, a diverged model,
what a resume changes), which stay.

Under torchrun (WORLD_SIZE > 1) every rank runs this same loop on its share
of the parallel streams (rank r takes rows r*B/W .. (r+1)*B/W of the batch),
DistributedDataParallel averages the gradients, so the global batch is the
batch of one process. Validation sums are all-reduced; only rank 0 writes
checkpoints, logs and the progress bar. Every decision that could differ
between ranks (a signal arrived, the time budget ran out) is taken on the
summed flags of all ranks, so they always stop at the same step.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NoReturn

import torch
from torch import nn
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import SAVED_BEFORE, Config, dump_yaml, is_resolved_config, unread_settings
from .data import (Splits, batchify, check_text_file, check_trainable, check_vocabulary, eval_streams,
                   fresh_windows, line_starts, prepare, split_point, window, windows_per_epoch)
from .errors import (SIGHUP, STOP_SIGNALS, Interrupted, RunFailure, StopSignal, UsageError, caught_signals,
                     is_out_of_memory, signal_exit_code)
from .model import (EvaluationStopped, RNNLM, adaptive_cutoffs, build_model, check_new_model, count_parameters,
                    detach_state, map_state, perplexity, stream_nll)
from .runs import CHECKPOINT_NAMES, METRICS_FILE, check_room_for_a_new_run, read_metrics, run_folder_of
from .runtime import (Distributed, LogStream, bar_width, file_sha256, init_distributed, is_terminal,
                      seed_everything, silence_dead_outputs)
from .tokenizer import unsegmented_cjk

TRAINER_FORMAT = 1
LN2 = math.log(2.0)
# Fields that may change when a run is resumed; any other difference is refused.
RESUMABLE_CHANGES = {"train.max_steps", "train.max_epochs", "train.max_time", "train.log_interval",
                     "train.eval_interval", "train.eval_tokens", "train.eval_batch_size", "model.device"}


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    epochs: float
    train_loss: float | None          # the last step's loss; None when this call ran no step
    val_loss: float | None
    best_val_loss: float | None       # the loss that chose best/, measured on the first best_val_tokens
    val_bits_per_char: float | None
    val_perplexity: float | None
    tokens_per_second: float
    elapsed: float
    parameters: int
    stopped_by: str
    best_val_tokens: int | None = None  # the slice (first N tokens of the split) of best_val_loss; None: all


UNKNOWN_MEASURE = -1
VAL_UNK_NOTE = 0.5  # a validation text with more of its tokens outside the vocabulary than this gets a note
FINAL_NOTE_TOKENS = 1_000_000  # a final validation over more tokens is announced (25 s for the default model, Zen 4)
BIG_VOCABULARY = 200_000  # a vocabulary larger than this gets a note on what it costs


@dataclass
class Progress:
    """Everything about where training is, saved in the trainer state for an exact resume."""

    step: int = 0
    epoch: int = 0
    window: int = 0
    elapsed: float = 0.0
    tokens: int = 0
    best_val_loss: float = math.inf
    # what measured best_val_loss: the first N validation tokens (train.eval_tokens), None for the whole
    # split; UNKNOWN_MEASURE until the first check (and in a trainer state saved before this was kept,
    # until a resume works it out)
    best_val_tokens: int | None = UNKNOWN_MEASURE
    # and on which text, read how: the --val file's digest and train.eval_batch_size (None in a trainer state
    # saved before this was kept: taken as this run's)
    best_val_text: str | None = None
    plateau_best: float = math.inf    # best of the periodic evaluations only: the plateau schedule's reference
    plateau_scale: float = 1.0
    plateau_bad: int = 0
    log_loss_sum: float = 0.0         # training losses since the last metrics line, so that a
    log_loss_count: int = 0           # resumed run writes the same means as an uninterrupted one
    # the latest periodic validation (step, loss), and the final one at the end of the run: a run stopped
    # after either, before its end record, does not measure and log that validation again when it resumes
    checked_step: int = -1
    checked_loss: float | None = None
    final_step: int = -1
    final_loss: float | None = None


def learning_rate(cfg: Config, p: Progress, fraction_done: float) -> float:
    """Linear warm-up, then constant, cosine or linear decay (over the run's budget) or the plateau-cut rate."""
    t = cfg.train
    lr = t.lr * p.plateau_scale
    if t.warmup_steps and p.step < t.warmup_steps:
        return lr * (p.step + 1) / t.warmup_steps
    if t.schedule in ("cosine", "linear"):
        span = 1.0 - (t.warmup_steps / t.max_steps if t.max_steps else 0.0)
        done = fraction_done - (1.0 - span)
        # 0 -> 1 over the run: with max_steps over the steps after warm-up; over a time or epoch budget the
        # warm-up's share is not known in advance, so the decay starts a little below lr (1 % for the char config)
        q = min(max(done / span if span > 0 else 1.0, 0.0), 1.0)
        left = 0.5 * (1 + math.cos(math.pi * q)) if t.schedule == "cosine" else 1.0 - q
        return t.lr * (t.final_lr_fraction + (1 - t.final_lr_fraction) * left)
    return lr


def epoch_limit(cfg: Config) -> float | None:
    """max_epochs, or 1 when no limit at all is set."""
    t = cfg.train
    return t.max_epochs if t.max_epochs else (None if (t.max_steps or t.max_time) else 1.0)


def fraction_done(cfg: Config, p: Progress, windows: int) -> float:
    """How much of the budget is used: the largest fraction among the limits that are set."""
    t = cfg.train
    parts = []
    if t.max_steps:
        parts.append(p.step / t.max_steps)
    if t.max_time:
        parts.append(p.elapsed / t.max_time)
    epochs = epoch_limit(cfg)
    if epochs:
        parts.append((p.epoch + p.window / windows) / epochs)
    return max(parts) if parts else 0.0


def reads_a_slice(ids: torch.Tensor | None, max_tokens: int | None) -> bool:
    """Whether `evaluate` with `max_tokens` reads less than the whole of `ids`."""
    return ids is not None and max_tokens is not None and ids.numel() > max_tokens + 1


def evaluate(model: RNNLM, ids: torch.Tensor, streams: int, device, max_tokens: int | None = None,
             dist: Distributed | None = None, should_stop: Callable[[], bool] | None = None) -> float:
    """Mean negative log-likelihood (nats per token) of a stream, `<eos>` first.

    Under torchrun the streams are shared out between ranks and the sums all-reduced. `should_stop` can cut
    it short (EvaluationStopped); under torchrun on every rank at the same window, when any rank's says yes.
    """
    if reads_a_slice(ids, max_tokens):
        ids = ids[: max_tokens + 1]
    rows, mask = eval_streams(ids, streams)
    total, count = 0.0, 0
    if dist is None or not dist.enabled:
        total, count = stream_nll(model, rows, mask, device=device, should_stop=should_stop)
    else:
        mine = list(range(dist.rank, rows.shape[0], dist.world))
        agreed = _AgreedStop(dist, should_stop) if should_stop is not None else None
        if mine:
            total, count = stream_nll(model, rows[mine], mask[mine], device=device,
                                      should_stop=agreed.reading if agreed else None)
        if agreed:
            agreed.drain()
        total, count = dist.sum([total, float(count)])
    return total / max(count, 1)


class _AgreedStop:
    """`should_stop` for an evaluation shared out between ranks: each asks before each of its windows, and
    the ranks sum their flags, so that all stop at the same check. A rank's share may take fewer windows
    than another's (or none): once it has read it, it keeps answering the others' checks (`drain`) until
    no rank reads any more, so that every check is met by every rank."""

    def __init__(self, dist: Distributed, should_stop: Callable[[], bool]):
        self.dist, self.should_stop = dist, should_stop

    def _check(self, reading: bool) -> tuple[bool, float]:
        stops, readers = self.dist.sum([float(self.should_stop()), float(reading)])
        return stops > 0, readers

    def reading(self) -> bool:
        return self._check(True)[0]

    def drain(self) -> None:
        while True:
            stop, readers = self._check(False)
            if stop:
                raise EvaluationStopped
            if not readers:
                return


class _Signals:
    """Turns the first SIGINT / SIGTERM / SIGHUP into a flag the loop checks; later ones wait for the save.

    SIGHUP (the terminal was closed) stops the run as SIGTERM does, unless it is ignored (nohup), and first
    sends stdout and stderr to /dev/null where their terminal is gone: a write there would fail with EIO
    and end the run before it saves."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def _handler(self, signum, frame):
        if signum == SIGHUP:
            silence_dead_outputs()
        if self.received is None:
            self.received = signum

    @contextmanager
    def installed(self):
        try:
            for sig in caught_signals():  # not a SIGHUP under nohup
                self._old[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
        try:
            yield self
        finally:
            for sig, old in self._old.items():
                signal.signal(sig, old)


def _differences(old: Config, new: Config) -> list[tuple[str, object, object]]:
    """('section.field', old value, new value) for each field the two configs hold differently."""
    a, b = old.to_dict(), new.to_dict()
    return [(f"{s}.{k}", a[s][k], b[s][k]) for s in a for k in a[s] if a[s][k] != b[s][k]]


def _conflicts(old: Config, new: Config) -> list[tuple[str, object]]:
    """(key, old value) of each difference a resume may not make."""
    return [(key, a) for key, a, _ in _differences(old, new) if key not in RESUMABLE_CHANGES]


def _changes(old: Config, new: Config) -> list[str]:
    """What `new` changes of `old`, as 'train.max_time 20 -> null'."""
    def shown(value) -> str:
        return "null" if value is None else "true" if value is True else "false" if value is False else str(value)
    return [f"{key} {shown(a)} -> {shown(b)}" for key, a, b in _differences(old, new)]


def _make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    params = list(model.parameters())
    # fused: the whole update of each parameter in one pass over its values, on the CPU as on CUDA. On the
    # AMD Zen 4 host of 2026-12-06 it ran AdamW's step 3x faster than foreach (one multi-tensor operation per
    # update rule): 1.4 against 4.8 ms for the word config's weights; training steps 1.04x (char config)
    # and 1.06x (word config) faster. The values agree to float32 rounding (docs/benchmarks.md).
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, fused=True)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, betas=(0.9, t.beta2), weight_decay=t.weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=t.lr, betas=(0.9, t.beta2), weight_decay=t.weight_decay, fused=True)


def new_run_dir(out: Path | None, corpus: Path) -> Path:
    """--out, else runs/<the corpus's name>."""
    return Path(out) if out is not None else Path("runs") / Path(corpus).stem


def check_new_run_dir(run_dir: Path) -> None:
    """What a new run's folder must not be, checked without writing anything (so by every process, and by
    `--nproc` before its workers start): a checkpoint folder or a folder inside one, a file, a folder that
    already holds a run (best/ or last/, or one of them caught mid-swap as .old) or the files a run writes
    beside them (a user's own config.yaml, say), a folder of runs or a folder inside a run."""
    ckpt.check_new_run_folder(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file, not a folder: name a folder for the run")
    if any((run_dir / name).exists() for name in ("last", "best", "last.old", "best.old")):
        raise UsageError(f"run folder {run_dir} already holds a run: continue it with --resume {run_dir} "
                         f"or choose another --out")
    taken = [name for name in (ckpt.CONFIG_FILE, ckpt.VOCAB_FILE, METRICS_FILE) if (run_dir / name).exists()]
    if taken and not _started_here_before(run_dir):  # `--out .` where the user keeps a config.yaml of their own
        them = "it" if len(taken) == 1 else "them"
        raise UsageError(f"run folder {run_dir} already holds {', '.join(taken)}, which a new run would "
                         f"replace: choose another --out (a folder of its own), or move {them} away")
    check_room_for_a_new_run(run_dir)


def _started_here_before(run_dir: Path) -> bool:
    """Whether the folder's files are a run's: a metrics.jsonl with a start record, or an empty one (a run
    writes it first, before its config.yaml and vocab.json) beside no config.yaml or a whole resolved one.
    Such a run stopped before its first checkpoint, and a new run replaces its files; a folder of the user's
    own files is left alone."""
    try:
        if read_metrics(run_dir).start is not None:
            return True
        empty = (run_dir / METRICS_FILE).stat().st_size == 0
    except (OSError, UsageError):  # no metrics.jsonl
        return False
    return empty and is_resolved_config(run_dir / ckpt.CONFIG_FILE)


def check_writable(run_dir: Path, keep: bool = True) -> None:
    """Fail before training, not at the first checkpoint, when the run folder cannot be written. `keep=False`
    (`--nproc`, before its workers start) removes the folders that the check made, leaving nothing behind."""
    probe = run_dir / f".write-test-{os.getpid()}"
    made = [] if keep else [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"charlm write test\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise UsageError(f"cannot write to run folder {run_dir} ({ckpt.reason(exc)}): choose another --out "
                         f"or fix its permissions") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
        for folder in made:  # the deepest first; one that another process has filled meanwhile stays
            try:
                folder.rmdir()
            except OSError:
                pass


def lock_run_folder(run_dir: Path, held: list[int]) -> None:
    """Hold an advisory lock on the run folder while this process trains it (its descriptor is appended to
    `held`; closing it, or the process ending in any way, lets go): a second `charlm train` into the same
    folder, a `--resume` while the run still trains say, would write the same checkpoints and metrics as
    the first, and each would replace what the other saved. The folder itself is locked, so no file is
    left behind. Where the system has no flock (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        return
    try:
        fd = os.open(run_dir, os.O_RDONLY)
    except OSError:  # the folder cannot be opened: the checks that follow say why
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"run folder {run_dir} is being trained by another charlm process right now: wait for it "
                         f"to end (or stop it: Ctrl-C saves its last checkpoint), then continue with --resume "
                         f"{run_dir}") from None
    except OSError:  # a file system without locks: train as before
        os.close(fd)
        return
    held.append(fd)


def check_run_folder_free(run_dir: Path) -> None:
    """lock_run_folder's refusal without keeping the lock, for `--nproc` before its workers start."""
    if run_dir.is_dir():
        held: list[int] = []
        lock_run_folder(run_dir, held)
        for fd in held:
            os.close(fd)


def _check_space(run_dir: Path, model: nn.Module) -> None:
    """Refuse to start when the disk cannot hold the checkpoints this run will write.

    A checkpoint holds the weights and, in last/, the optimizer state (up to two
    more copies for Adam); while one is swapped in, the new and the old copy of
    last/ and best/ exist at once: about eight copies of the weights in all. The
    old copies a resumed run finds in place already take their room on the disk,
    so only the rest is asked for (never less than the four new copies).
    """
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    held = sum(_bytes_in(run_dir / name) for name in ("last", "best"))
    need = max(8 * weights - held, 4 * weights) + (1 << 20)
    try:
        free = shutil.disk_usage(run_dir).free
    except OSError:
        return  # cannot tell: the checkpoint writes will report a full disk themselves
    if free < need:
        raise RunFailure(f"not enough disk space in {run_dir}: {free / 2**20:,.1f} MiB free, the checkpoints of "
                         f"this model need about {need / 2**20:,.1f} MiB more; free some space or choose another --out")


def _bytes_in(folder: Path) -> int:
    """The size of the plain files directly inside a checkpoint folder (0 if it is none): a link is not followed,
    since what it points at is not freed when the checkpoint is replaced."""
    if folder.is_symlink():
        return 0
    try:
        with os.scandir(folder) as entries:
            return sum(e.stat(follow_symlinks=False).st_size for e in entries if e.is_file(follow_symlinks=False))
    except OSError:
        return 0


class _Log:
    """metrics.jsonl, one JSON object per line; on resume, lines after the checkpoint's step are dropped."""

    def __init__(self, path: Path | None, resume_step: int | None):
        self.path, self.fh = path, None  # no path: a rank other than 0 logs nothing
        if path is None:
            return
        if resume_step is not None and path.exists():
            # read a line at a time and written as it is read: a long run's log (100,000 lines for 2,000,000
            # steps logged every 20) is never held whole
            with open(path, encoding="utf-8", errors="replace") as old:
                ckpt.atomic_write_text(path, (ln + "\n" for line in old for ln in line.splitlines()
                                              if _logged_by_then(ln, resume_step)))
        elif resume_step is None:
            path.write_text("", encoding="utf-8")
        self.fh = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.fh is not None:
            self.fh.write(json.dumps(record) + "\n")
            self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


def _logged_by_then(line: str, step: int) -> bool:
    """Whether a line of metrics.jsonl stays when a run resumes from `step`: a record of that step or before, and
    not the end or failure of the run that stopped (a partial last line, written when the process was killed,
    is dropped; so is a record whose step is no number, as a hand-edited line's may be: it cannot be placed
    before or after `step`, and comparing it failed the resume with a TypeError)."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    if not isinstance(record, dict) or record.get("event") in ("end", "failed"):
        return False
    at = record.get("step", 0)  # a record without a step (an event) stays
    return isinstance(at, (int, float)) and not isinstance(at, bool) and at <= step


class _NonFinite(Exception):
    pass


def _resume_state(resume: Path, cfg: Config):
    if not resume.is_dir():
        raise UsageError(f"--resume: run folder not found: {resume}")
    saved = ckpt.load_checkpoint(resume, "last")
    conflicts = _conflicts(saved.cfg, cfg)
    if conflicts:
        # a field added since (SAVED_BEFORE) that the run holds at its old value: a config file without it gets
        # the new default, which the user did not choose
        hint = "".join(f"; the run trains with {key} {value} (as runs saved before the field existed do): add "
                       f"--set {key}={value}" for key, value in conflicts
                       if SAVED_BEFORE.get(tuple(key.split("."))) == value)
        raise UsageError(f"--resume {resume}: the config differs from the checkpoint in "
                         f"{', '.join(key for key, _ in conflicts)}; only the limits, the intervals, the device and "
                         f"the evaluation settings (train.eval_tokens, train.eval_batch_size) may change{hint}")
    state = saved.trainer_state()
    if not isinstance(state, dict) or state.get("format") != TRAINER_FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        if found is None:
            raise UsageError(f"--resume {resume}: {saved.folder / ckpt.TRAINER_FILE} is not a charlm trainer state "
                             f"(it names no format)")
        raise UsageError(f"--resume {resume}: trainer state format {found!r}; this charlm reads format {TRAINER_FORMAT}")
    return saved, state


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _note_replaced(splits: Splits, read: str, encoding: str, log_stream) -> None:
    """Say how much of a corpus read with --errors replace is U+FFFD. A file in another encoding loses more than
    its bad bytes: many byte pairs of GB18030 or Shift JIS are valid UTF-8 and read as wrong letters."""
    replaced = torch.tensor(["\ufffd" in tok for tok in splits.codec.vocab.tokens])  # (V,) by token id
    if not replaced.any():
        return
    count = 0
    for ids in (splits.train, splits.val):
        for start in range(0, 0 if ids is None else len(ids), 1 << 24):  # a part at a time: bounded memory
            count += int(replaced[ids[start:start + (1 << 24)].long()].sum())
    if not count:
        return
    tokens = "1 token" if count == 1 else f"{count:,} tokens"
    print(f"charlm: note: {tokens} of {read} hold{'s' if count == 1 else ''} U+FFFD, put by --errors replace for "
          f"bytes that are not {encoding}; if the text reads as nonsense, name its encoding with --encoding",
          file=log_stream)


def train(cfg: Config, corpus: Path | None, out: Path | None = None, val: Path | None = None,
          resume: Path | None = None, show_progress: bool = True, log_stream=None,
          cache_dir: Path | None = None, note_changes: str | None = None) -> TrainResult:
    """Train a model on `corpus` into the run folder `out` (or continue the run `resume`). `note_changes`
    names where a resume's config came from (`--config FILE`): a note then says what it changes of the
    run's, once the resume has passed its checks."""
    log_stream = LogStream(log_stream or sys.stderr)  # a progress line that cannot be written does not end the run
    dist, device = init_distributed(cfg.model.device)
    created: list[Path] = []  # the run folder, if this call made it
    locks: list[int] = []  # rank 0's lock on the run folder (lock_run_folder)
    try:
        result = _train(cfg, corpus, out, val, resume, show_progress and dist.is_main, log_stream, cache_dir,
                        dist, device, created, note_changes, locks)
        # Leave together: a rank that tore down its process group while rank 0 was still writing the
        # last checkpoint aborted now and then in gloo's teardown (SIGABRT, a failed job). Only on
        # success: after a failure the other ranks may be inside a collective that this would not match.
        dist.barrier()
        return result
    except BaseException as exc:
        for folder in created:  # a run that failed before writing anything leaves no empty folder behind
            try:
                folder.rmdir()  # only if empty: a started run keeps its metrics and checkpoints
            except OSError:
                pass
        if isinstance(exc, StopSignal) and _nothing_saved(created, out, corpus, resume):
            # a Ctrl-C while the corpus is read: the loop, which saves first, had not begun
            raise Interrupted(f"interrupted by {signal.Signals(exc.signum).name} before the run's first step: "
                              f"nothing was saved (run the command again)", signal_exit_code(exc.signum)) from None
        raise
    finally:
        for fd in locks:
            os.close(fd)
        dist.close()


def _nothing_saved(created: list[Path], out: Path | None, corpus: Path | None, resume: Path | None) -> bool:
    """Whether a new run that stopped holds no checkpoint (a resume always had one)."""
    if resume is not None or (not created and corpus is None):
        return False
    run_dir = created[0] if created else new_run_dir(out, corpus)
    return not any((run_dir / name).exists() for name in CHECKPOINT_NAMES)


def _open_resume(cfg: Config, resume: Path, out: Path | None, corpus: Path | None, val: Path | None,
                 dist: Distributed, locks: list[int]):
    """The run folder, last/ and its trainer state that --resume names, checked against this call's config;
    the corpus and --val default to the run's own. Returns (run folder, last/, state, corpus, val)."""
    # runs/x/last continues runs/x (from last/, as always), not a new run inside it; best/ or a *.old
    # folder is refused, since the resume would not start from the checkpoint it names
    resume = run_folder_of(Path(resume), "--resume", names=("last",))
    if out is not None and Path(out).absolute() != resume.absolute():
        raise UsageError(f"--resume continues {resume} in its own folder, and --out names another ({out}): "
                         f"drop --out (to branch the run, copy its folder and resume the copy)")
    with dist.together():  # the others wait for rank 0's lock, and fail with its error
        if dist.is_main:
            lock_run_folder(resume, locks)  # before recover(), which may move a checkpoint that the other saves
            ckpt.recover(resume)
    saved, trainer_state = _resume_state(resume, cfg)
    if corpus is None:
        corpus = Path(trainer_state["corpus"])
        if not corpus.exists():
            raise UsageError(f"--resume {resume}: the run's corpus {corpus} is not found; "
                             f"pass --corpus PATH to the same text")
    corpus = Path(corpus)
    if val is None and trainer_state.get("val"):
        val = Path(trainer_state["val"])
    return resume, saved, trainer_state, corpus, val


def _read_corpus(cfg: Config, corpus: Path, val: Path | None, resume: Path | None, saved, trainer_state,
                 cache_dir: Path | None, show_progress: bool, dist: Distributed) -> Splits:
    """The corpus (and --val) as token ids, checked to be the run's text on a resume and long enough to train on.
    The first process of each machine tokenizes (or finds the cache); the others then read its token files."""
    if cache_dir is None and trainer_state is not None and trainer_state.get("cache_dir"):
        if Path(trainer_state["cache_dir"]).is_dir():  # the run's own cache, not a second copy in the default one
            cache_dir = Path(trainer_state["cache_dir"])
    digest = file_sha256(check_text_file(corpus, cfg.data.encoding))  # once: also the token cache's key
    if trainer_state is not None and digest != trainer_state["corpus_sha256"]:
        raise UsageError(f"--resume {resume}: corpus {corpus} is not the text this run was trained on "
                         f"(SHA-256 differs); resume with the original corpus")
    if (val is not None and trainer_state is not None and not trainer_state.get("val")
            and split_point(corpus, cfg.data.val_fraction, cfg.data.encoding) < corpus.stat().st_size):
        # the run's validation part is cut from its corpus: with --val all of the corpus would become training
        # text, another stream (and, as often as not, another vocabulary) than the one the run trained on
        raise UsageError(f"--resume {resume}: this run cuts its validation text from the corpus (data.val_fraction "
                         f"{cfg.data.val_fraction:g}), and --val would make all of the corpus training text; resume "
                         f"without --val (`charlm eval {resume} --file {val}` measures the model on that file)")
    splits = None
    patient = dist.patient_group()  # the others wait for the tokenizer as long as it takes
    with dist.together(patient):  # and fail with its error (a token cache that cannot be written)
        if dist.local_rank == 0:
            splits = prepare(cfg.data, corpus, val, cache_dir=cache_dir, show_progress=show_progress,
                             corpus_sha256=digest)
    if dist.local_rank != 0:
        splits = prepare(cfg.data, corpus, val, cache_dir=cache_dir, corpus_sha256=digest)
    if saved is not None:  # the run's vocabulary must be the one this corpus builds
        check_vocabulary(saved.codec, splits.codec, corpus)
    check_trainable(splits.train, cfg.train.batch_size, cfg.train.seq_len)
    return splits


def _note_unread(cfg: Config, vocab_size: int, log_stream) -> None:
    """A note on the settings that this run never reads: the user may believe that they changed something.
    Said when a run starts (a resume may not change any of them)."""
    unread = unread_settings(cfg)
    if unread:
        listed = "; ".join(f"{section}.{name} (for {readers})" for section, name, readers in unread)
        print(f"charlm: note: {'this setting has' if len(unread) == 1 else 'these settings have'} no effect on "
              f"this run: {listed}", file=log_stream)
    if cfg.model.softmax == "adaptive" and not adaptive_cutoffs(cfg.model, vocab_size):
        print(f"charlm: note: model.softmax adaptive has no cluster at a vocabulary of {vocab_size:,} (no "
              f"model.adaptive_cutoffs '{cfg.model.adaptive_cutoffs}' lies below {vocab_size - 1:,}): this run "
              f"has a full softmax; set cutoffs inside the vocabulary to split it", file=log_stream)


def _note_data(cfg: Config, splits: Splits, corpus: Path, val: Path | None, log_stream) -> None:
    """Notes on text that trains, but not as the user may expect."""
    if splits.val is None and val is None and cfg.data.val_fraction > 0:
        print(f"charlm: note: {corpus} has no line end in its last {cfg.data.val_fraction * 100:g}% to cut a validation "
              f"part at (data.val_fraction); "
              f"training without validation: pass --val FILE to have one", file=log_stream)
    vocab_size, m = len(splits.codec.vocab), cfg.model
    if vocab_size > BIG_VOCABULARY and cfg.data.max_size is None:
        per_token = m.embedding_size + 1 + (0 if m.tie_weights else m.hidden_size)  # an embedding, a bias, an output row
        print(f"charlm: note: the vocabulary holds {vocab_size:,} tokens: its embedding and output layer take "
              f"{vocab_size * per_token / 1e6:,.1f}M parameters or so, and every step "
              f"scores them all; data.max_size (e.g. 50000) or data.min_freq keeps the frequent ones, the others "
              f"becoming <unk>", file=log_stream)
    if len(splits.codec.vocab) <= 2:  # <eos> and <unk>: every token of the text is <unk>
        d = cfg.data
        cause = (f"data.max_size {d.max_size}: raise it" if d.max_size is not None and d.max_size <= 2
                 else f"data.min_freq {d.min_freq}: lower it")
        print(f"charlm: note: the vocabulary holds only <eos> and <unk> ({cause}); the model can learn nothing "
              f"but where lines end", file=log_stream)
    if cfg.data.level == "word" and cfg.data.word_split == "space" and unsegmented_cjk(splits.codec.vocab.tokens):
        print("charlm: note: most words of the vocabulary are runs of Chinese (or Japanese) characters: data."
              "word_split space splits at spaces only, and charlm does not segment such text, so a whole clause "
              "is one word; segment the corpus first, or use word_split punct (each character a word) or data."
              "level char", file=log_stream)
    if (val is not None and splits.val is not None and len(splits.codec.vocab) > 2  # not a vocabulary cut short
            and splits.val_unk > VAL_UNK_NOTE * (len(splits.val) - 1)):  # <eos> first, not read
        print(f"charlm: note: {splits.val_unk / (len(splits.val) - 1):.0%} of the validation text's tokens are not in "
              f"the training text's vocabulary and are read as <unk>: its loss says little about the model; is "
              f"--val {val} text of the same kind as {corpus}?", file=log_stream)
    if val is not None and _same_file(Path(val), Path(corpus)):
        print(f"charlm: note: --val {val} is the corpus itself: validation then measures text the model trains "
              f"on, not how it does on new text", file=log_stream)
    if cfg.data.errors == "replace":
        _note_replaced(splits, f"{corpus} and {val}" if val else str(corpus), cfg.data.encoding, log_stream)


def _train(cfg, corpus, out, val, resume, show_progress, log_stream, cache_dir, dist, device,
           created: list[Path], note_changes: str | None, locks: list[int]) -> TrainResult:
    if cfg.train.precision == "bf16" and device.type != "cuda":  # checked once `auto` is resolved: no silent fp32
        raise UsageError(f"train.precision bf16 is for CUDA, and this run is on {device.type}: use fp32 "
                         f"(bf16 training on a CPU was measured less accurate: docs/benchmarks.md)")
    saved, trainer_state = None, None
    if resume is not None:
        resume, saved, trainer_state, corpus, val = _open_resume(cfg, resume, out, corpus, val, dist, locks)
        out = resume
    if corpus is None:
        raise UsageError("no corpus: pass --corpus PATH")
    run_dir = new_run_dir(out, corpus)
    if resume is None:
        check_text_file(Path(corpus), cfg.data.encoding)  # first: a mistyped corpus is not "a run is there"
        check_new_run_dir(run_dir)
    t = cfg.train
    # alike on every rank: refused before rank 0 makes the run folder
    if t.batch_size % dist.world:
        raise UsageError(f"train.batch_size {t.batch_size} must be a multiple of the number of processes "
                         f"({dist.world}): each takes an equal share of the parallel streams")
    with dist.together():  # only rank 0 writes the run folder: the others fail with its error, not later
        if dist.is_main:
            try:  # made here, not only missing a moment ago: a run refused by another's lock removes no folder
                run_dir.mkdir(parents=True)
                created.append(run_dir)
            except OSError:  # there already, or cannot be made: check_writable says why
                pass
            check_writable(run_dir)
            if resume is None:
                lock_run_folder(run_dir, locks)
                ckpt.recover(run_dir)
    seed_everything(t.seed)

    splits = _read_corpus(cfg, Path(corpus), Path(val) if val else None, resume, saved, trainer_state, cache_dir,
                          show_progress, dist)
    if dist.is_main:
        _note_data(cfg, splits, corpus, val, log_stream)
        if saved is None:
            _note_unread(cfg, len(splits.codec.vocab), log_stream)
    share = t.batch_size // dist.world
    rows = batchify(splits.train, t.batch_size)[dist.rank * share:(dist.rank + 1) * share]  # (B/W, N // B)
    n_windows = windows_per_epoch(rows, t.seq_len)

    model, net, optimizer, p, hidden = _build(cfg, splits, saved, trainer_state, resume, run_dir,
                                              slice(dist.rank * share, (dist.rank + 1) * share), device, dist)
    if dist.is_main and resume is None:
        # first: a run stopped before its start record is still a run's folder, not a user's (_started_here_before)
        (run_dir / METRICS_FILE).write_text("", encoding="utf-8")
    if dist.is_main:  # on --resume too: the limits, intervals or device it changed are the run's now
        ckpt.atomic_write_text(run_dir / ckpt.CONFIG_FILE, dump_yaml(cfg))
    if trainer_state is None and dist.is_main:
        ckpt.atomic_write_text(run_dir / ckpt.VOCAB_FILE, splits.codec.to_json())
    changes = _changes(saved.cfg, cfg) if saved is not None and note_changes else []
    if changes and dist.is_main:  # a config file on a resume brings its own limits: say what they replace
        print(f"charlm: note: this resume (with {note_changes}) changes the run's {', '.join(changes)}",
              file=log_stream)
    if saved is not None and dist.is_main:
        _note_schedule_moved(saved.cfg, cfg, p, n_windows, log_stream)

    try:
        return _Loop(cfg, run_dir, corpus, val, splits, rows, n_windows, model, net, optimizer, p, hidden, device,
                     saved is not None, show_progress, log_stream, dist).run()
    except OSError as exc:  # the metrics log or the run folder's files (checkpoints report their own)
        where = exc.filename or run_dir
        raise RunFailure(f"could not write {where} ({ckpt.reason(exc)}); the last checkpoint in {run_dir} is "
                         f"intact: make room (or fix the folder) and continue with --resume {run_dir}") from None


def _build(cfg: Config, splits: Splits, saved, trainer_state, resume: Path | None, run_dir: Path, rank_rows: slice,
           device, dist: Distributed):
    """The model (wrapped for DDP as `net` under torchrun), its optimizer, the progress and this rank's hidden
    state (`rank_rows` of the batch): new, or as last/ saved them; first, that the disk can hold the model's
    checkpoints. Returns (model, net, optimizer, progress, hidden)."""
    vocab_size = len(splits.codec.vocab)
    if saved is None:
        check_new_model(cfg.model, vocab_size)
    model = build_model(cfg.model, vocab_size).to(device)
    p, hidden = Progress(), None
    if saved is not None:
        ckpt.load_weights(model, saved.tensors, saved.folder)
    net = model
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = _make_optimizer(cfg, model)
    with dist.together():
        if dist.is_main:
            _check_space(run_dir, model)
    if trainer_state is None:
        _seed_by_rank(dist, device)
    else:
        p, hidden = _restore(resume, trainer_state, optimizer, device, rank_rows, dist)
        if p.best_val_tokens == UNKNOWN_MEASURE:  # saved before it was kept: last/'s config says what it was
            before = saved.cfg.train.eval_tokens
            p.best_val_tokens = before if reads_a_slice(splits.val, before) else None
    return model, net, optimizer, p, hidden


def _note_schedule_moved(before: Config, now: Config, p: Progress, n_windows: int, log_stream) -> None:
    """A decay over the budget (cosine, linear) spans the resume's limits: say so when new limits move the
    learning rate from where the run had taken it (more steps after a finished run start high again)."""
    if now.train.schedule not in ("cosine", "linear"):
        return
    then = learning_rate(before, p, fraction_done(before, p, n_windows))
    lr = learning_rate(now, p, fraction_done(now, p, n_windows))
    if abs(lr - then) > 0.01 * max(lr, then):
        print(f"charlm: note: the {now.train.schedule} learning-rate schedule spans the new limits: it goes on at "
              f"{lr:.3g} where the run had reached {then:.3g}", file=log_stream)


def _seed_by_rank(dist: Distributed, device) -> None:
    """Under torchrun, a generator of its own for each rank, drawn once the model is built alike everywhere:
    with the one seed all ranks drew the same dropout masks, stream i of each rank the mask of stream i of
    the others. One process is left as it is."""
    if not dist.enabled:
        return
    base = int(torch.randint(2 ** 62, (1,)).item())  # the same on every rank: their generators agree until here
    torch.manual_seed(base + dist.rank)
    if device.type == "cuda":
        torch.cuda.manual_seed(base + dist.rank)


def _restore(resume: Path, state: dict, optimizer: torch.optim.Optimizer, device, rows: slice,
             dist: Distributed | None = None):
    """Optimizer, progress, this rank's hidden state and RNG from a trainer state; one that does not fit is refused."""
    try:
        saved = state["optimizer"]
        for group in saved["param_groups"]:
            # this version's choice of update (a run saved before 2026-12-06 asked for foreach, which agrees
            # with fused to float32 rounding), set before loading so that the state is placed for it; a group
            # that is no mapping is left for load_state_dict to refuse
            if isinstance(group, dict):
                group.update(fused=optimizer.defaults.get("fused"), foreach=optimizer.defaults.get("foreach"))
        optimizer.load_state_dict(saved)
        p = Progress(**state["progress"])
        hidden = map_state(state.get("hidden"), lambda s: s[:, rows].to(device))
        ranks = state.get("rng_ranks")  # every rank's generators, saved by a torchrun job
        world, rank = (dist.world, dist.rank) if dist is not None else (1, 0)
        rng_cpu, rng_cuda = ((ranks[rank]["cpu"], ranks[rank]["cuda"]) if ranks and len(ranks) == world
                             else (state["rng_cpu"], state.get("rng_cuda")))
        torch.set_rng_state(rng_cpu)
        if device.type == "cuda" and rng_cuda is not None:
            torch.cuda.set_rng_state(rng_cuda, device)
        if world > 1 and not (ranks and len(ranks) == world):  # saved by another number of processes
            _seed_by_rank(dist, device)
        elif world > 1 and device.type == "cuda" and rng_cuda is None:  # saved on the CPU: a CUDA generator
            torch.cuda.manual_seed(int(torch.randint(2 ** 62, (1,)).item()))  # from this rank's own CPU one
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise UsageError(f"--resume {resume}: the trainer state in last/{ckpt.TRAINER_FILE} does not fit this "
                         f"run ({type(exc).__name__}: {ckpt.reason(exc)})") from None
    return p, hidden


def _slice_words(tokens: int | None) -> str:
    """What a check with Progress.best_val_tokens = `tokens` read, in words."""
    return "the whole split" if tokens is None else f"the first {tokens:,} validation tokens"


class _Loop:
    """One call's training, from the state `_train` built (a new run or a resumed one) to its TrainResult.

    `run()` is the loop: each pass agrees on whether to stop, takes one step (`_step`), and now and then
    logs (`_log_training`) or validates (`_periodic_check`); at the end `_final_check` measures the model
    and `_result` reports. The checkpoints (`_save`), the choice of best/ (`_after_validation`) and a clean
    stop on a signal (`_interrupted`) are methods of their own.
    """

    def __init__(self, cfg: Config, run_dir: Path, corpus: Path, val, splits: Splits, rows: torch.Tensor,
                 n_windows: int, model: RNNLM, net: nn.Module, optimizer: torch.optim.Optimizer, p: Progress,
                 hidden, device, resumed: bool, show_progress: bool, log_stream, dist: Distributed):
        self.cfg, self.t = cfg, cfg.train
        self.run_dir, self.corpus, self.val = run_dir, corpus, val
        self.splits, self.rows, self.n_windows = splits, rows, n_windows  # rows: this rank's (B/W, N // B) streams
        self.model, self.net, self.optimizer = model, net, optimizer
        self.p, self.hidden = p, hidden
        # the lines that fresh rows (train.fresh_streams) may start at, for windows of seq_len; a rank takes
        # every world-th of a step's fresh rows, so shares may differ by one (the loss is weighted for it)
        self.line_starts = line_starts(splits.train, self.t.seq_len, splits.starts) if self.t.fresh_streams else None
        self.global_rows = self.t.batch_size + self.t.fresh_streams  # a step's rows over all processes
        self.device, self.dist, self.resumed = device, dist, resumed
        self.show_progress, self.log_stream = show_progress, log_stream
        self.interactive = show_progress and is_terminal(log_stream)
        self.n_params = count_parameters(model)
        self.start_tokens, self.start_elapsed = p.tokens, p.elapsed
        self.clock = 0.0                # perf_counter() when the loop starts: elapsed = start_elapsed + now - clock
        self.bar = None                 # the progress bar, made when the loop starts
        self.window_start, self.window_tokens = 0.0, 0  # the tokens a second since the last log line
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.t.precision == "bf16" else nullcontext()
        self.signals = _Signals()
        self.last_loss = math.nan       # the last step's loss (all ranks' mean once the loop ends)
        # The periodic checks, and the loss that chooses best/ at the end, read the first eval_tokens of the
        # split where that is shorter than the split (`sliced`), else all of it; `measuring` says which, as
        # Progress.best_val_tokens does.
        self.sliced = reads_a_slice(splits.val, self.t.eval_tokens)
        self.measuring = self.t.eval_tokens if self.sliced else None
        # what the checks read, and how: the --val file's digest (prepare hashed it; a part cut from the corpus
        # is the same text on every resume, whose corpus is checked) and the streams (another --val or
        # train.eval_batch_size on a resume)
        self.reading = None if splits.val is None else f"{splits.val_sha256 or 'corpus'}/{self.t.eval_batch_size}"
        if p.best_val_text is None:  # a new run, or a trainer state saved before this was kept
            p.best_val_text = self.reading
        if (p.best_val_text, p.best_val_tokens) != (self.reading, self.measuring):
            # a resume that reads another text, or another part of it: the saved checks do not stand for this
            # run's (a check leaves best_val_text and best_val_tokens as what it measured)
            p.checked_step, p.checked_loss, p.final_step, p.final_loss = -1, None, -1, None
        self.log = _Log(run_dir / METRICS_FILE if dist.is_main else None, p.step if resumed else None)

    def run(self) -> TrainResult:
        p, t = self.p, self.t
        if not self.resumed:
            self.log.write({"event": "start", "step": 0, "parameters": self.n_params,
                            "vocab_size": len(self.splits.codec.vocab), "train_tokens": self.splits.train.numel(),
                            "device": str(self.device), "processes": self.dist.world})
        else:
            self.log.write({"event": "resume", "step": p.step, "device": str(self.device)})
        self._note_best_replaced()
        self.bar = tqdm(total=t.max_steps, initial=p.step, unit="step", file=self.log_stream, **bar_width(),
                        disable=not self.interactive, leave=True)
        self.net.train()
        stopped_by, final_val = None, None
        self.window_start, self.window_tokens = time.perf_counter(), 0
        self.clock = time.perf_counter()
        try:
            with self.signals.installed():
                while True:
                    stop_signal = self._agreed_signal()
                    stopped_by = self._limit_reached()
                    if stopped_by or stop_signal:
                        break
                    lr, grad_norm = self._step()
                    self.bar.update(1)
                    if p.step % t.log_interval == 0:
                        self._log_training(lr, grad_norm)
                    if t.eval_interval and p.step % t.eval_interval == 0:
                        self._periodic_check()
                if stop_signal:  # as agreed above; a signal that came later is left for the next command
                    self.signals.received = stop_signal
                    self._interrupted()
                self.last_loss = self.dist.sum([self.last_loss])[0] / self.dist.world
                final_val = self._final_check()
        except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(exc):
                raise
            raise self._fail(p.step + 1, "out of memory; use a smaller train.batch_size or train.seq_len "
                                            "(or model.hidden_size)") from None
        finally:
            self.bar.close()
            self.log.close()
        return self._result(final_val, stopped_by or "done")

    def _agreed_signal(self) -> int | None:
        """The signal that stops this pass, if any. Under torchrun all ranks agree on the clock of rank 0 and
        on any signal: every rank decides on the sums, never on its own flag, since a signal that reaches one
        rank just after them would stop it a step before the others, left waiting in a collective."""
        stop_signal, p, dist = self.signals.received, self.p, self.dist
        if dist.enabled:
            *counts, elapsed = dist.sum([*(float(stop_signal == sig) for sig in STOP_SIGNALS),
                                         p.elapsed if dist.is_main else 0.0])
            p.elapsed = elapsed
            # SIGINT before SIGTERM before SIGHUP, where the ranks received different ones
            stop_signal = next((sig for sig, count in zip(STOP_SIGNALS, counts) if count), None)
        return stop_signal

    def _limit_reached(self) -> str | None:
        """The limit (as TrainResult.stopped_by names it) that the run has reached, if any."""
        t, p = self.t, self.p
        if t.max_steps and p.step >= t.max_steps:
            return "max_steps"
        if t.max_time and p.elapsed >= t.max_time:
            return "max_time"
        epochs = epoch_limit(self.cfg)
        if epochs and p.epoch + p.window / self.n_windows >= epochs - 1e-12:
            return "max_epochs"
        return None

    def _step(self) -> tuple[float, torch.Tensor]:
        """One window of every stream: forward, backward, clipping, the update. Returns (lr, grad_norm)."""
        t, p, dist = self.t, self.p, self.dist
        x, y = window(self.rows, p.window, t.seq_len)
        streams = x.shape[0]
        hidden = self.hidden = detach_state(self.hidden)
        if t.fresh_streams:  # rows that begin at a line from a zero state, after the streams (B/W + k_r, T)
            fresh_x, fresh_y = fresh_windows(self.splits.train, self.line_starts, t.fresh_streams, x.shape[1],
                                             t.seed, p.step)
            x = torch.cat([x, fresh_x[dist.rank::dist.world]])
            y = torch.cat([y, fresh_y[dist.rank::dist.world]])
            rows = x.shape[0] - streams
            hidden = map_state(hidden, lambda s: torch.cat([s, s.new_zeros(s.shape[0], rows, *s.shape[2:])], 1))
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        try:
            with self.autocast:
                nll, hidden = self.net(x, hidden, targets=y)
                # the mean over the global batch's rows (streams and fresh rows): DDP averages the ranks'
                # gradients, so each rank's sum counts against a W-th of them (its mean where shares are equal)
                loss = nll.float().sum() / (self.global_rows * y.shape[1] / dist.world)
            self.hidden = map_state(hidden, lambda s: s[:, :streams])  # the streams' state goes on; fresh rows end
            if not torch.isfinite(loss):
                raise _NonFinite("loss")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), t.clip if t.clip > 0 else math.inf)
            if not torch.isfinite(grad_norm):
                raise _NonFinite("gradient")
        except _NonFinite as exc:
            raise self._fail(p.step + 1, f"the {exc.args[0]} is NaN or infinite (try a lower train.lr "
                                            f"or train.clip)") from None
        lr = learning_rate(self.cfg, p, fraction_done(self.cfg, p, self.n_windows))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # an update beyond the float range (a huge train.lr) makes weights infinite: the next loss,
        # validation or save stops the run with a message naming the step
        self.optimizer.step()
        p.step += 1
        p.window += 1
        if p.window >= self.n_windows:  # a new epoch reads the streams from their start, from a zero state
            p.window, p.epoch, self.hidden = 0, p.epoch + 1, None
        p.tokens += self.global_rows * y.shape[1]
        self.window_tokens += self.global_rows * y.shape[1]
        self.last_loss = loss.item()
        p.log_loss_sum += self.last_loss
        p.log_loss_count += 1
        p.elapsed = self.start_elapsed + time.perf_counter() - self.clock
        return lr, grad_norm

    def _log_training(self, lr: float, grad_norm: torch.Tensor) -> None:
        """A metrics line with the mean training loss since the last one (over the global batch), the
        progress bar's figures, or a plain line where the output is not a terminal."""
        p = self.p
        now = time.perf_counter()
        tps = self.window_tokens / max(now - self.window_start, 1e-9)
        loss_sum, loss_count = self.dist.sum([p.log_loss_sum, float(p.log_loss_count)])
        mean = loss_sum / loss_count
        self.log.write({"step": p.step, "epoch": self._epoch(4), "elapsed": round(p.elapsed, 3),
                        "train_loss": mean, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_second": tps})
        rate = f"bpc={mean / LN2:.3f}" if self.cfg.data.level == "char" else f"ppl={math.exp(min(mean, 50)):.1f}"
        self.bar.set_postfix_str(f"loss={mean:.3f} {rate} tok/s={tps:,.0f} lr={lr:.2e}")
        if self.show_progress and not self.interactive:
            print(f"step {p.step} loss {mean:.4f} {rate} tok/s {tps:,.0f} lr {lr:.3g} elapsed {p.elapsed:.0f}s",
                  file=self.log_stream, flush=True)
        self.window_start, self.window_tokens = now, 0
        p.log_loss_sum, p.log_loss_count = 0.0, 0

    def _periodic_check(self) -> None:
        """A validation every train.eval_interval steps (on the eval_tokens slice where that is shorter), and
        the checkpoints after it; its time counts in the elapsed time."""
        p = self.p
        val_loss = self._validate(self.t.eval_tokens)
        p.checked_step, p.checked_loss = p.step, val_loss
        if val_loss is not None and self.show_progress and not self.interactive:
            scope = f" (on {_slice_words(self.measuring)})" if self.sliced else ""
            print(f"step {p.step} val_loss {val_loss:.4f}{scope}", file=self.log_stream, flush=True)
        self._after_validation(val_loss, periodic=True, on_slice=self.sliced)
        p.elapsed = self.start_elapsed + time.perf_counter() - self.clock

    def _final_check(self) -> float | None:
        """The validation loss on the whole split at the end of the run, and the last checkpoints. A periodic
        check at this very step has measured (and logged, and saved) what the final one would measure again:
        the whole split when no eval_tokens slice is shorter, else the slice."""
        p = self.p
        if p.final_step == p.step:  # measured, logged and saved before the resume that finds it here
            return p.final_loss
        at_end = p.checked_loss if p.checked_step == p.step else None
        if at_end is not None and not self.sliced:
            p.final_step, p.final_loss = p.step, at_end
            self._save("last", at_end)  # as after a final validation: the elapsed time now includes the check's
            return at_end
        if self.show_progress and self.splits.val is not None and len(self.splits.val) > FINAL_NOTE_TOKENS:
            print(f"charlm: note: the final validation reads the whole split, {len(self.splits.val) - 1:,} tokens in "
                  f"{self.t.eval_batch_size} stream{'s' if self.t.eval_batch_size > 1 else ''}, after the time "
                  f"budget, and may take minutes; a smaller data.val_fraction or --val file shortens it",
                  file=self.log_stream, flush=True)
        final_val = self._validate(None, final=True)
        select = final_val if not self.sliced else (
            at_end if at_end is not None else self._validate(self.t.eval_tokens, final=True))
        p.final_step, p.final_loss = p.step, final_val  # saved in last/'s trainer state by what follows
        self._after_validation(final_val, periodic=False, select=select)
        return final_val

    def _validate(self, limit: int | None, final: bool = False) -> float | None:
        """Periodic validations run to the end (a resumed run must see the same ones); the final ones,
        over the whole split and possibly long, stop at a signal: a resumed run simply repeats them."""
        if self.splits.val is None:
            return None
        try:
            return evaluate(self.model, self.splits.val, self.t.eval_batch_size, self.device, limit, self.dist,
                            should_stop=(lambda: self.signals.received is not None) if final else None)
        except EvaluationStopped:
            # all ranks stopped at the same window (_AgreedStop); the signal may have reached some only
            self.signals.received = self._agreed_signal()
            self._interrupted("during the final validation ")

    def _after_validation(self, val_loss: float | None, periodic: bool, select: float | None = None,
                          on_slice: bool = False) -> None:
        """Log a validation, choose best/ and drive the plateau schedule, then save. `select` (default: val_loss)
        decides the best checkpoint; it is measured like the periodic evaluations (`measuring`) so that like is
        compared with like. A best/ chosen on another measure (train.eval_tokens, another --val or
        train.eval_batch_size on a resume) cannot be compared with it: the first check chooses afresh."""
        p, t = self.p, self.t
        select = val_loss if select is None else select
        improved = select is not None and math.isfinite(select) and (
            select < p.best_val_loss or p.best_val_tokens != self.measuring or p.best_val_text != self.reading)
        if val_loss is not None:
            self.log.write({"step": p.step, "epoch": self._epoch(4), "elapsed": round(p.elapsed, 3),
                            "val_loss": val_loss, "val_ppl": perplexity(val_loss),
                            "val_bpc": self._bits_per_char(val_loss), "val_slice": on_slice,
                            "val_tokens": self.measuring if on_slice else None})
            if not math.isfinite(val_loss):  # finite weights, but a broken model: do not save it
                raise self._fail(p.step, "the validation loss is NaN or infinite (try a lower train.lr or "
                                            "train.clip)")
            if improved:
                p.best_val_loss, p.best_val_tokens, p.best_val_text = select, self.measuring, self.reading
            # Only the periodic evaluations drive the plateau schedule: the extra one at the end of a
            # run must not change what a resumed run does (resume is exact).
            if periodic and t.schedule == "plateau":
                if val_loss < p.plateau_best:
                    p.plateau_best, p.plateau_bad = val_loss, 0
                else:
                    p.plateau_bad += 1
                    if p.plateau_bad > t.plateau_patience:
                        p.plateau_scale *= t.plateau_factor
                        p.plateau_bad = 0
        if improved or self.splits.val is None:
            self._save("best", val_loss, on_slice)
        self._save("last", val_loss, on_slice)

    def _save(self, name: str, val_loss: float | None, on_slice: bool = False) -> None:
        p, dist, device = self.p, self.dist, self.device
        bad = next((n for n, w in self.model.named_parameters() if not torch.isfinite(w).all()), None)
        if bad is not None:  # never save non-finite weights over a good checkpoint
            raise self._fail(p.step, f"weight {bad} became NaN or infinite (try a lower train.lr or train.clip)")
        last = name == "last"
        # cloned: in one process the streams' state is a view of the (L, B + k, H) state of the last window
        full_hidden = map_state(self.hidden, lambda s: dist.gather_batch(s.detach()).cpu().clone()) if last else None
        rng_ranks = dist.gather_objects(
            {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        ) if last and dist.enabled else None
        # the training losses since the last metrics line are each rank's own: saved as the ranks' mean, which
        # every rank restores, so that the first line after a resume (on any number of processes) has the
        # global mean an uninterrupted run logs (rank 0's alone gave that line rank 0's half of the batch)
        loss_sum = dist.sum([p.log_loss_sum])[0] / dist.world if last and dist.enabled else p.log_loss_sum
        if not dist.is_main:
            return
        if not self.run_dir.is_dir():  # removed while the run trained: a save would make a folder of two
            raise RunFailure(f"run folder {self.run_dir} was removed while the run trained (at step {p.step}); "
                             f"nothing more is saved")  # checkpoints, without config, vocabulary or metrics
        info = {"step": p.step, "epoch": self._epoch(), "val_loss": val_loss,
                "val_slice": val_loss is not None and on_slice, "elapsed": p.elapsed, "parameters": self.n_params}
        state = None
        if last:
            state = {"format": TRAINER_FORMAT, "progress": {**asdict(p), "log_loss_sum": loss_sum},
                     "optimizer": self.optimizer.state_dict(),
                     "hidden": full_hidden, "rng_cpu": torch.get_rng_state(), "rng_ranks": rng_ranks,
                     "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                     # absolute, so that a resume from another working folder finds them
                     "corpus": str(Path(self.corpus).absolute()),
                     "val": str(Path(self.val).absolute()) if self.val else None,
                     "corpus_sha256": self.splits.corpus_sha256,
                     # the token cache's folder, which a resume without --cache-dir reads again
                     "cache_dir": str(self.splits.cache.parent.absolute()) if self.splits.cache else None}
        ckpt.save_checkpoint(self.run_dir, name, self.model, self.cfg, self.splits.codec, state, info)

    def _interrupted(self, where: str = "") -> NoReturn:
        self._save("last", None)
        received = self.signals.received
        raise Interrupted(f"interrupted by {signal.Signals(received).name} {where}at step {self.p.step}; saved "
                          f"{self.run_dir / 'last'} (continue with --resume {self.run_dir})",
                          signal_exit_code(received))

    def _fail(self, step: int, what: str) -> RunFailure:
        """The error that stops the run, recorded in metrics.jsonl first (so that `runs` and `info` can tell a
        failed run from one still going; a resume drops the record)."""
        last = self.run_dir / "last"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was saved"
        self.log.write({"event": "failed", "step": step, "error": what})
        return RunFailure(f"training stopped at step {step}: {what}; {kept}")

    def _note_best_replaced(self) -> None:
        p = self.p
        if not (self.resumed and math.isfinite(p.best_val_loss) and self.dist.is_main):
            return
        if p.best_val_tokens != self.measuring:
            print(f"charlm: note: best/ was chosen on {_slice_words(p.best_val_tokens)} and this run's checks read "
                  f"{_slice_words(self.measuring)}: the next check replaces it", file=self.log_stream)
        elif p.best_val_text != self.reading:
            print("charlm: note: best/ was chosen on other validation text (or another train.eval_batch_size) than "
                  "this run's checks read: the next check replaces it", file=self.log_stream)

    def _epoch(self, digits: int | None = None) -> float:
        """Epochs done, with the fraction of the current one."""
        done = self.p.epoch + self.p.window / self.n_windows
        return done if digits is None else round(done, digits)

    def _bits_per_char(self, loss: float) -> float:
        # nats per token -> bits per character of the validation text (the same at char level)
        return loss * (self.splits.val.numel() - 1) / max(self.splits.val_chars, 1) / LN2

    def _result(self, final_val: float | None, stopped_by: str) -> TrainResult:
        """The run's figures; rank 0 also appends them to metrics.jsonl and notes a diverged model."""
        p = self.p
        trained = max(p.elapsed - self.start_elapsed, 1e-9)
        best = p.best_val_loss if math.isfinite(p.best_val_loss) else None
        train_loss = self.last_loss if math.isfinite(self.last_loss) else None  # a resume with no step left runs none
        result = TrainResult(str(self.run_dir), p.step, self._epoch(), train_loss, final_val, best,
                             self._bits_per_char(final_val) if final_val is not None else None,
                             perplexity(final_val) if final_val is not None else None,
                             (p.tokens - self.start_tokens) / trained, p.elapsed, self.n_params, stopped_by,
                             p.best_val_tokens if best is not None else None)
        if not self.dist.is_main:
            return result
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"event": "end", **asdict(result)}) + "\n")
        vocab_size = len(self.splits.codec.vocab)
        uniform = math.log(vocab_size)  # the loss of a model that gives every token alike
        if final_val is not None and final_val > uniform + 1 and train_loss is not None and train_loss > uniform + 1:
            print(f"charlm: note: the validation loss {final_val:.4g} is more than a nat above {uniform:.4f} (ln "
                  f"{vocab_size}), the loss of giving every token the same probability: the model has diverged; "
                  f"try a lower train.lr (or train.clip)", file=self.log_stream)
        return result
