"""The benchmark: tokens per second of every cell x implementation, measured the same way.

For each cell (rnn, gru, lstm) and implementation (custom, torch, or
reference: the custom model running the step functions of cells.py under
autograd, as before the fast path existed) a full language model is built by
`model.build_model` and fed random tokens:

- training: forward, cross-entropy, backward, gradient clipping and an AdamW
  step on windows of (B, T) tokens, the state carried (detached) from window
  to window, the loss taken through the model's `targets` as in `train.py`;
- inference: forward without gradients over windows of (B, T) tokens;
- sampling: one token at a time for B streams with `stepper.Stepper`, the
  fused step `charlm sample` uses, the next input being the most likely token.

Every model is warmed up first. The timed rounds are interleaved (round 1 of
every model, then round 2 of every model, ...) so that a burst of load from
another process hits all of them alike; the reported figure is the median of
the rounds, and a ratio to torch the median of the per-round ratios.
`generate_speed` and `score_speed` add two end-to-end figures: generating N
tokens with `sample.generate` (batch 1) and scoring N lines with
`score.score_sentences`, batched against one at a time.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import native, products
from .config import ModelConfig
from .errors import RunFailure, UsageError
from .model import RNNLM, build_model, count_parameters, detach_state
from .runtime import resolve_device
from .sample import generate
from .score import score_sentences
from .stepper import Stepper
from .tokenizer import EOS_ID, TextCodec, Tokenizer, Vocabulary

CELLS = ("rnn", "gru", "lstm")
IMPLS = ("custom", "torch", "reference")  # reference: the custom cells' step functions under autograd
MEMORY_MEASURE = {
    "cpu": "peak live tensor bytes during one training step, above those live before it "
           "(torch.profiler per-operator memory accounting)",
    "cuda": "torch.cuda.max_memory_allocated during one training step, above the bytes allocated before it",
}


@dataclass
class BenchSettings:
    cells: tuple[str, ...] = CELLS
    impls: tuple[str, ...] = ("custom", "torch")
    hidden_size: int = 256
    embedding_size: int = 64
    layers: int = 1
    batch_size: int = 32
    seq_len: int = 64
    vocab_size: int = 65
    seconds: float = 3.0          # timed seconds per model and measurement, split over the rounds
    rounds: int = 5
    warmup_seconds: float = 0.5   # per model and measurement (at most `seconds`), at least two calls
    device: str = "cpu"
    threads: int = 0              # CPU threads for torch; 0 keeps torch's default
    seed: int = 0

    def check(self) -> None:
        for cell in self.cells:
            if cell not in CELLS:
                raise UsageError(f"unknown cell '{cell}': choose among {', '.join(CELLS)}")
        for impl in self.impls:
            if impl not in IMPLS:
                raise UsageError(f"unknown impl '{impl}': choose among {', '.join(IMPLS)}")
        if not self.cells or not self.impls:
            raise UsageError("give at least one cell and one impl")
        for name in ("hidden_size", "embedding_size", "layers", "batch_size", "seq_len", "rounds"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.vocab_size < 3:
            raise UsageError(f"--vocab-size must be at least 3 (<unk>, <eos> and a token), got {self.vocab_size}")
        if self.threads < 0:
            raise UsageError(f"--threads must be >= 0 (0: torch's default), got {self.threads}")
        if not self.seconds > 0:
            raise UsageError(f"--seconds must be > 0, got {self.seconds}")


@dataclass
class BenchResult:
    cell: str
    impl: str
    device: str
    hidden_size: int
    embedding_size: int
    layers: int
    batch_size: int
    seq_len: int
    vocab_size: int
    parameters: int
    threads: int
    products: str  # products.backend(): "onednn" where the custom cells send their larger float32 CPU products
    # native.status() for this cell: "on" where the custom cells' kernels of native.c run (whole time loops,
    # or per step and why), else why not; both "-" for torch's modules, which use neither, and on CUDA
    native: str
    train_tokens_per_s: float
    infer_tokens_per_s: float
    sample_tokens_per_s: float
    peak_memory_bytes: int | None
    memory_measure: str
    # this impl's tokens/s divided by torch's for the same cell, the median of the per-round
    # ratios (None when torch was not measured)
    train_ratio: float | None = None
    infer_ratio: float | None = None
    sample_ratio: float | None = None
    # the per-round figures behind each median, to show the spread
    train_rounds: list[float] = field(default_factory=list)
    infer_rounds: list[float] = field(default_factory=list)
    sample_rounds: list[float] = field(default_factory=list)


def _build(cell: str, impl: str, s: BenchSettings, device: torch.device) -> RNNLM:
    """The model of `model.build_model`; impl 'reference' is 'custom' running cells.py's step functions."""
    cfg = ModelConfig(cell=cell, impl="torch" if impl == "torch" else "custom", layers=s.layers,
                      embedding_size=s.embedding_size, hidden_size=s.hidden_size, dropout=0.0, device=str(device))
    torch.manual_seed(s.seed)
    model = build_model(cfg, s.vocab_size).to(device)
    if impl == "reference":
        model.rnn.fast = False
    return model


class _Subject:
    """One model under test with its optimizer, data and carried states."""

    def __init__(self, cell: str, impl: str, s: BenchSettings, device: torch.device):
        self.cell, self.impl, self.s, self.device = cell, impl, s, device
        self.model = _build(cell, impl, s, device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, fused=True)  # as train.py
        g = torch.Generator().manual_seed(s.seed)
        # a few distinct windows, so that no cache sees the same input twice in a row
        self.windows = torch.randint(0, s.vocab_size, (4, s.batch_size, s.seq_len + 1), generator=g).to(device)
        self.index = 0
        self.train_state = self.infer_state = None
        self.stepper: Stepper | None = None  # made at the first sampling step; it copies the weights it reads
        self.token = torch.full((s.batch_size,), EOS_ID, dtype=torch.long, device=device)

    def _window(self) -> torch.Tensor:
        self.index = (self.index + 1) % self.windows.shape[0]
        return self.windows[self.index]

    def train_step(self) -> int:
        self.model.train()
        w = self._window()
        x, y = w[:, :-1], w[:, 1:]
        nll, state = self.model(x, detach_state(self.train_state), targets=y)  # the loss as train.py takes it
        loss = nll.float().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.train_state = detach_state(state)
        return y.numel()

    @torch.no_grad()
    def infer_step(self) -> int:
        self.model.eval()
        x = self._window()[:, :-1]
        _, self.infer_state = self.model(x, self.infer_state)
        return x.numel()

    @torch.no_grad()
    def sample_step(self) -> int:
        """One token for each of B streams the way `charlm sample` steps: `stepper.Stepper` (full softmax)."""
        if self.stepper is None:
            self.model.eval()
            self.stepper = Stepper(self.model, self.model.init_state(self.s.batch_size, self.device))
            self.logits = torch.zeros(self.s.batch_size, self.s.vocab_size, device=self.device)
        self.stepper.step(self.token, self.logits)
        self.token = self.logits.argmax(dim=-1)
        return self.token.numel()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _timed(subject: _Subject, step: Callable[[], int], seconds: float, min_calls: int = 1) -> float:
    """Tokens per second of `step` called repeatedly for about `seconds` (at least `min_calls` times)."""
    subject.sync()
    tokens, calls, start = 0, 0, time.perf_counter()
    while True:
        tokens += step()
        calls += 1
        if calls % 8 == 0 or calls >= min_calls:  # synchronising every call would slow CUDA down
            subject.sync()
            elapsed = time.perf_counter() - start
            if calls >= min_calls and elapsed >= seconds:
                return tokens / elapsed


@contextmanager
def _native_stderr_silenced():
    """Discard what native code writes to stderr meanwhile: the profiler's library announces its start and
    stop, and torch warns about memory allocated before profiling, on every measurement."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 to redirect
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_training_memory(subject: _Subject) -> int:
    """Peak bytes allocated by one training step above what was live before it (see MEMORY_MEASURE)."""
    if subject.device.type == "cuda":
        torch.cuda.synchronize(subject.device)
        before = torch.cuda.memory_allocated(subject.device)
        torch.cuda.reset_peak_memory_stats(subject.device)
        subject.train_step()
        torch.cuda.synchronize(subject.device)
        return int(torch.cuda.max_memory_allocated(subject.device) - before)
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        subject.train_step()
    # Each operator's own allocations minus its own frees, in the order the operators started:
    # the running sum is the tensor memory live at that point, its maximum the peak.
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return int(peak)


def _setup(s: BenchSettings) -> torch.device:
    s.check()
    if s.threads:
        torch.set_num_threads(s.threads)
    return resolve_device(s.device)


def run_bench(s: BenchSettings, progress: Callable[[str], None] | None = None) -> list[BenchResult]:
    """Measure every cell x impl of the settings; the results come in the order cells x impls."""
    device = _setup(s)
    say = progress or (lambda message: None)
    subjects = [_Subject(cell, impl, s, device) for cell in s.cells for impl in s.impls]
    per_round = s.seconds / s.rounds
    steps = {"train": lambda x: x.train_step, "infer": lambda x: x.infer_step, "sample": lambda x: x.sample_step}
    rounds: dict[tuple[int, str], list[float]] = {}
    for what, pick in steps.items():
        for i, x in enumerate(subjects):
            say(f"warm-up {what} {x.cell}/{x.impl}")
            _timed(x, pick(x), min(s.warmup_seconds, s.seconds), min_calls=2)
        for r in range(s.rounds):
            say(f"{what} round {r + 1}/{s.rounds}")
            order = subjects if r % 2 == 0 else subjects[::-1]  # alternate who goes first
            for x in order:
                rounds.setdefault((subjects.index(x), what), []).append(_timed(x, pick(x), per_round))
    results = []
    for i, x in enumerate(subjects):
        say(f"memory {x.cell}/{x.impl}")
        peak = peak_training_memory(x)
        med = {what: statistics.median(rounds[(i, what)]) for what in steps}
        results.append(BenchResult(
            x.cell, x.impl, str(device), s.hidden_size, s.embedding_size, s.layers, s.batch_size, s.seq_len,
            s.vocab_size, count_parameters(x.model), torch.get_num_threads(),
            # both describe the custom cells' CPU path; torch's modules and CUDA use neither
            *((products.backend(), native.status(s.seq_len, (s.batch_size, s.hidden_size) if x.cell == "lstm"
                                                 else None))
              if device.type == "cpu" and x.impl == "custom" else ("-", "-")),
            med["train"], med["infer"],
            med["sample"], peak, MEMORY_MEASURE[device.type], train_rounds=rounds[(i, "train")],
            infer_rounds=rounds[(i, "infer")], sample_rounds=rounds[(i, "sample")]))
    _add_ratios(results)
    return results


def _add_ratios(results: list[BenchResult]) -> None:
    """Each impl against torch for the same cell: the median over rounds of the ratio within a round.

    The two ran one after the other in every round, so a burst of load from another process
    mostly hits both; the per-round ratio cancels it where the ratio of medians would not.
    """
    torch_rows = {r.cell: r for r in results if r.impl == "torch"}
    for r in results:
        ref = torch_rows.get(r.cell)
        if ref is None:
            continue
        for what in ("train", "infer", "sample"):
            mine, theirs = getattr(r, f"{what}_rounds"), getattr(ref, f"{what}_rounds")
            setattr(r, f"{what}_ratio", statistics.median(a / b for a, b in zip(mine, theirs)))


# ---------------------------------------------------------------- end-to-end figures
@dataclass
class GenerateSpeed:
    cell: str
    impl: str
    hidden_size: int
    layers: int
    vocab_size: int
    tokens: int
    seconds: float            # median over the rounds
    tokens_per_s: float
    rounds: list[float] = field(default_factory=list)


@dataclass
class ScoreSpeed:
    cell: str
    impl: str
    hidden_size: int
    layers: int
    vocab_size: int
    lines: int
    tokens: int               # tokens scored, the closing <eos> of each line included
    batch_size: int
    batched_seconds: float
    single_seconds: float
    batched_lines_per_s: float
    single_lines_per_s: float
    speedup: float            # batched lines per second / one-at-a-time lines per second


def synthetic_codec(vocab_size: int) -> TextCodec:
    """A codec of `vocab_size` ids with made-up tokens: characters up to 96 ids, else words 'w2', 'w3', ..."""
    if vocab_size <= 96:
        chars = [chr(33 + i) for i in range(vocab_size - 2)]  # printable ASCII from '!'
        return TextCodec(Tokenizer("char"), Vocabulary(["<unk>", "<eos>"] + chars))
    return TextCodec(Tokenizer("word", word_split="space"),
                     Vocabulary(["<unk>", "<eos>"] + [f"w{i}" for i in range(2, vocab_size)]))


def synthetic_lines(codec: TextCodec, count: int, min_tokens: int = 10, max_tokens: int = 80,
                    seed: int = 0) -> list[str]:
    """`count` lines of random known tokens, of random lengths in [min_tokens, max_tokens]."""
    rng = random.Random(seed)
    tokens = codec.vocab.tokens[2:]
    return [codec.tokenizer.join(rng.choices(tokens, k=rng.randint(min_tokens, max_tokens))) for _ in range(count)]


def _extras_model(cell: str, impl: str, s: BenchSettings, device: torch.device) -> RNNLM:
    model = _build(cell, impl, s, device).eval()
    with torch.no_grad():
        # An untrained model would draw <eos> about once in V tokens and stop early; this keeps it
        # going for the full length without changing the work done per token.
        model.decoder.bias[EOS_ID] = -30.0
    return model


def generate_speed(cell: str, impl: str, s: BenchSettings, tokens: int = 10_000) -> GenerateSpeed:
    """Seconds to generate `tokens` tokens with `sample.generate` (batch 1, temperature 1), median of rounds."""
    device = _setup(s)
    model = _extras_model(cell, impl, s, device)
    codec = synthetic_codec(s.vocab_size)
    generate(model, codec, max_length=min(tokens, 200), seed=s.seed, device=device)  # warm-up
    times = []
    for r in range(s.rounds):
        start = time.perf_counter()
        out = generate(model, codec, max_length=tokens, seed=s.seed + r, device=device)
        times.append(time.perf_counter() - start)
        if len(out[0].tokens) != tokens:
            raise RunFailure(f"generation stopped after {len(out[0].tokens)} of {tokens} tokens")
    seconds = statistics.median(times)
    return GenerateSpeed(cell, impl, s.hidden_size, s.layers, s.vocab_size, tokens, seconds, tokens / seconds, times)


def score_speed(cell: str, impl: str, s: BenchSettings, lines: int = 10_000, batch_size: int = 128) -> ScoreSpeed:
    """Lines per second of `score.score_sentences` with `batch_size` lines together against one at a time."""
    device = _setup(s)
    model = _extras_model(cell, impl, s, device)
    codec = synthetic_codec(s.vocab_size)
    text = synthetic_lines(codec, lines, seed=s.seed)
    score_sentences(model, codec, text[:batch_size], batch_size, device)  # warm-up
    score_sentences(model, codec, text[:16], 1, device)
    start = time.perf_counter()
    batched = score_sentences(model, codec, text, batch_size, device)
    batched_seconds = time.perf_counter() - start
    start = time.perf_counter()
    single = score_sentences(model, codec, text, 1, device)
    single_seconds = time.perf_counter() - start
    worst = max(abs(a.logprob - b.logprob) for a, b in zip(batched, single))
    if not worst < 1e-2 * max(1.0, max(abs(a.logprob) for a in single)):
        raise RunFailure(f"batched and single scores differ by {worst}")
    n_tokens = sum(len(r.tokens) for r in batched)
    return ScoreSpeed(cell, impl, s.hidden_size, s.layers, s.vocab_size, lines, n_tokens, batch_size,
                      batched_seconds, single_seconds, lines / batched_seconds, lines / single_seconds,
                      single_seconds / batched_seconds)


def parse_list(text: str, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    """'rnn,gru' -> ('rnn', 'gru'), refusing names outside `allowed`."""
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    for item in items:
        if item not in allowed:
            raise UsageError(f"{option}: unknown '{item}', choose among {', '.join(allowed)}")
    if not items:
        raise UsageError(f"{option}: give at least one of {', '.join(allowed)}")
    return items
