"""Sentence scores and corpus evaluation.

A sentence's score is log P(tokens + `<eos>` | `<eos>`): the model starts from
a zero state, reads `<eos>` (the start symbol), and the log-probability of each
next token is summed, the closing `<eos>` included. Sentences are scored many
at a time: padded to the longest in a batch, the padding masked out (the
network is causal, so padding after a sentence cannot change its score).
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from typing import Iterable, Iterator
from pathlib import Path

import torch

from .errors import UsageError
from .data import encode_pieces, eval_streams, read_pieces
from .model import RNNLM, map_state, perplexity, stream_nll
from .tokenizer import EOS, EOS_ID, UNK, UNK_ID, TextCodec

LN10 = math.log(10.0)
LN2 = math.log(2.0)


@dataclass
class SentenceScore:
    text: str
    tokens: list[str]             # the tokens scored, "<eos>" last
    token_logprobs: list[float]   # natural log-probability of each, given the ones before it
    logprob: float                # their sum: ln P(sentence + <eos>)
    log10prob: float
    oov: int                      # tokens outside the vocabulary (scored as <unk>)
    perplexity: float             # exp(-logprob / tokens)
    perplexity_no_oov: float      # the same over in-vocabulary tokens only (KenLM's "excluding OOVs")
    bits_per_token: float


# Logits a scoring pass holds at once (2^24 floats, 64 MiB): a batch reads its rows in windows of time steps
# no larger than that allows, so that a long line, or a large vocabulary, does not hold (lines x length x
# vocabulary) of them (one line of 100,000 words over 13,777 took 4.6 GB, 349 MB in windows: docs/benchmarks.md)
LOGIT_BUDGET = 1 << 24


@torch.no_grad()
def score_sentences(model: RNNLM, codec: TextCodec, sentences: list[str], batch_size: int = 128,
                    device: torch.device | str = "cpu", window: int = 256) -> list[SentenceScore]:
    """Score each sentence (one line of text) from a fresh start-of-sequence state. A batch is read in windows
    of at most `window` time steps (fewer for a large vocabulary: LOGIT_BUDGET), the state carried from one
    to the next, so that memory does not grow with a line's length; the scores do not depend on it."""
    model.eval()
    encoded = [codec.encode_line(s) for s in sentences]
    order = sorted(range(len(sentences)), key=lambda i: len(encoded[i]))  # similar lengths batch together
    logps: list[list[float]] = [[] for _ in sentences]
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        longest = max(len(encoded[i]) for i in batch) + 1
        # each row: <eos>, the line's tokens, <eos> to the common length; the inputs are a row but its last
        # token, the targets the row but its first (the closing <eos> and the padding)
        flat = []
        for i in batch:
            flat.append(EOS_ID)
            flat += encoded[i]
            flat += [EOS_ID] * (longest - len(encoded[i]))
        # through an int64 array: 0.16 ms for 128 rows of 48 against 1.1 ms for torch.tensor of the rows
        rows = torch.frombuffer(array("q", flat), dtype=torch.int64).view(len(batch), longest + 1)
        for i, lp in zip(batch, _batch_logprobs(model, rows, [len(encoded[i]) + 1 for i in batch], device, window)):
            logps[i] = lp
    results = []
    for text, ids, lp in zip(sentences, encoded, logps):
        total = math.fsum(lp)
        tokens = codec.vocab.decode(ids) + [EOS]
        known = _known_logprobs(lp, tokens)
        n = len(lp)
        results.append(SentenceScore(
            text, tokens, lp, total, total / LN10, ids.count(UNK_ID), perplexity(-total / n),
            perplexity(-math.fsum(known) / len(known)), -total / n / LN2))
    return results


def _batch_logprobs(model: RNNLM, rows: torch.Tensor, lengths: list[int], device, window: int) -> list[list[float]]:
    """The log-probabilities of the first lengths[r] targets of each row of `rows` (B, L + 1), whose lengths
    do not decrease: read window by window, a row whose targets all lie behind leaves the batch (and its
    state) so that a long line does not carry its short neighbours' padding along."""
    steps = max(1, min(window, LOGIT_BUDGET // (rows.shape[0] * model.output_width)))
    out: list[list[float]] = [[] for _ in lengths]
    first, state = 0, None
    for begin in range(0, rows.shape[1] - 1, steps):
        gone = first
        while lengths[gone] <= begin:
            gone += 1
        if gone > first and state is not None:
            state = map_state(state, lambda s: s[:, gone - first:].contiguous())  # the rows still reading
        first = gone
        end = min(begin + steps, rows.shape[1] - 1)
        nll, state = model(rows[first:, begin:end].to(device), state, targets=rows[first:, begin + 1:end + 1].to(device))
        for r, row in enumerate((-nll).double().cpu().tolist(), start=first):
            out[r] += row[:max(0, lengths[r] - begin)]
    return out


@dataclass
class ScoreTotals:
    """The sentences of one `score` call together, as KenLM's query ends: totals and both perplexities."""
    logprob: float
    log10prob: float
    tokens: int
    oov: int
    perplexity: float
    perplexity_no_oov: float


class ExactSum:
    """math.fsum of the values added so far, held as a few partial sums instead of the values (Shewchuk's
    algorithm, the one fsum runs: the partials do not overlap and add up to the exact sum, so fsum of them is
    fsum of the values). A value that is not finite is kept once, as fsum would see it."""

    def __init__(self) -> None:
        self.partials: list[float] = []
        self.special: dict[str, float] = {}  # inf, -inf, nan: each at most once

    def add(self, x: float) -> None:
        if not math.isfinite(x):
            self.special[repr(x)] = x
            return
        i = 0
        for y in self.partials:
            if abs(x) < abs(y):
                x, y = y, x
            hi = x + y
            lo = y - (hi - x)
            if lo:
                self.partials[i] = lo
                i += 1
            x = hi
        self.partials[i:] = [x]

    def value(self) -> float:
        return math.fsum(self.partials + list(self.special.values()))


class RunningTotals:
    """The totals of sentences scored a batch at a time (`score` of a large file prints each batch's lines as it
    goes): a few numbers, however many sentences, not their results."""

    def __init__(self) -> None:
        self.logprob = ExactSum()    # the sentences' ln P
        self.known = ExactSum()      # each sentence's sum over its tokens inside the vocabulary
        self.sentences = self.tokens = self.known_tokens = self.oov = 0

    def add(self, results: Iterable[SentenceScore]) -> RunningTotals:
        for r in results:
            known = _known_logprobs(r.token_logprobs, r.tokens)
            self.logprob.add(r.logprob)
            self.known.add(r.logprob if known is r.token_logprobs else math.fsum(known))
            self.sentences += 1
            self.tokens += len(r.token_logprobs)
            self.known_tokens += len(known)
            self.oov += r.oov
        return self

    def totals(self) -> ScoreTotals:
        total = self.logprob.value()
        return ScoreTotals(total, total / LN10, self.tokens, self.oov, perplexity(-total / self.tokens),
                           perplexity(-self.known.value() / self.known_tokens))


def score_totals(results: list[SentenceScore]) -> ScoreTotals:
    """Totals of one or more sentences' scores."""
    return RunningTotals().add(results).totals()


# `score` of a file or standard input scores its lines this many at a time, or fewer where they hold more than
# SCORE_CHUNK_CHARS characters: it prints a batch's results before it reads on (one million lines held 2.6 GB
# of results and printed the first after 47 s). The lines of a batch are sorted by length to fill the batches.
SCORE_CHUNK_LINES = 8192
SCORE_CHUNK_CHARS = 1 << 20


def line_chunks(pieces: Iterable[str], each_piece: bool = False) -> Iterator[list[str]]:
    """The lines of the text that `pieces` hold (read_pieces), split as Tokenizer.lines splits the whole text, in
    lists of at most SCORE_CHUNK_LINES lines or about SCORE_CHUNK_CHARS characters. `each_piece`: a list as soon
    as a piece ends one or more lines (a terminal, whose lines are scored as they are typed)."""
    chunk: list[str] = []
    size = 0
    part: list[str] = []  # a line begun but not ended yet, in pieces (a long line comes in many)
    for piece in pieces:
        lines = piece.split("\n")
        if len(lines) == 1:
            part.append(piece)
            continue
        if part:
            lines[0] = "".join(part) + lines[0]
        tail = lines.pop()
        part = [tail] if tail else []
        for line in lines:
            chunk.append(line[:-1] if line.endswith("\r") else line)
            size += len(line)
            if len(chunk) >= SCORE_CHUNK_LINES or size >= SCORE_CHUNK_CHARS:
                yield chunk
                chunk, size = [], 0
        if each_piece and chunk:
            yield chunk
            chunk, size = [], 0
    if part:
        line = "".join(part)
        chunk.append(line[:-1] if line.endswith("\r") else line)
    if chunk:
        yield chunk


def _known_logprobs(logprobs: list[float], tokens: list[str]) -> list[float]:
    """The log-probabilities of the tokens inside the vocabulary: never empty, the closing <eos> always is."""
    return [lp for lp, tok in zip(logprobs, tokens) if tok != UNK] if UNK in tokens else logprobs


@dataclass
class CorpusEval:
    file: str
    loss: float              # nats per token
    perplexity: float
    bits_per_token: float
    bits_per_char: float
    tokens: int
    characters: int
    lines: int
    oov: int
    streams: int             # the streams read side by side (at most --streams; fewer for a short file)
    exact: bool              # one stream: the exact likelihood of the file


def evaluate_file(model: RNNLM, codec: TextCodec, path: Path, streams: int = 1, encoding: str = "utf-8",
                  errors: str = "strict", device: torch.device | str = "cpu") -> CorpusEval:
    """The whole file as one stream, `<eos>` first, the state carried across lines (as in validation). The text is
    read piece by piece: memory holds its ids (a byte a character at character level), not the text."""
    text = encode_pieces(codec, read_pieces(path, encoding, errors, codec.tokenizer.level))
    if text.ids.numel() < 2:
        raise UsageError(f"{'standard input' if str(path) == '-' else path} holds no text to evaluate")
    rows, mask = eval_streams(text.ids, streams)  # stream_nll widens each window of the compact ids
    total, count = stream_nll(model, rows, mask, device=device)
    loss = total / count
    return CorpusEval(str(path), loss, perplexity(loss), loss / LN2, total / max(text.chars, 1) / LN2,
                      count, text.chars, text.lines, text.unk, rows.shape[0], rows.shape[0] == 1)
