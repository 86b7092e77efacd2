"""Sentence scores and corpus evaluation.

A sentence's score is log P(tokens + `<eos>` | `<eos>`): the model starts from
a zero state, reads `<eos>` (the start symbol), and the log-probability of each
next token is summed, the closing `<eos>` included. Sentences are scored many
at a time: padded to the longest in a batch, the padding masked out (the
network is causal, so padding after a sentence cannot change its score).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UsageError
from .data import char_count, encode, eval_streams, read_text
from .model import RNNLM, stream_nll
from .tokenizer import EOS, EOS_ID, UNK_ID, TextCodec

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


@torch.no_grad()
def score_sentences(model: RNNLM, codec: TextCodec, sentences: list[str], batch_size: int = 128,
                    device: torch.device | str = "cpu") -> list[SentenceScore]:
    """Score each sentence (one line of text) from a fresh start-of-sequence state."""
    model.eval()
    encoded = [codec.encode_line(s) for s in sentences]
    order = sorted(range(len(sentences)), key=lambda i: len(encoded[i]))  # similar lengths batch together
    logps: list[list[float]] = [[] for _ in sentences]
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        sizes = [len(encoded[i]) for i in batch]
        lengths = torch.tensor(sizes)
        longest = max(sizes) + 1
        # targets: each line's tokens, then <eos> (the padding too); inputs: <eos>, then the targets but the last
        targets = torch.full((len(batch), longest), EOS_ID, dtype=torch.long)
        targets[torch.arange(longest) < lengths[:, None]] = torch.tensor(
            [t for i in batch for t in encoded[i]], dtype=torch.long)  # row by row, as the mask's order
        inputs = torch.full_like(targets, EOS_ID)
        inputs[:, 1:] = targets[:, :-1]
        nll, _ = model(inputs.to(device), targets=targets.to(device))
        scored = torch.arange(longest) <= lengths[:, None]  # each line's targets with its closing <eos>
        flat = (-nll).double().cpu()[scored].tolist()
        offset = 0
        for i, size in zip(batch, sizes):
            logps[i] = flat[offset: offset + size + 1]
            offset += size + 1
    results = []
    for text, ids, lp in zip(sentences, encoded, logps):
        tokens = codec.vocab.decode(ids) + [EOS]
        total = math.fsum(lp)
        oov = sum(1 for i in ids if i == UNK_ID)
        known = [x for x, i in zip(lp, ids + [EOS_ID]) if i != UNK_ID]
        n = len(lp)
        results.append(SentenceScore(
            text, tokens, lp, total, total / LN10, oov, math.exp(-total / n),
            math.exp(-math.fsum(known) / len(known)) if known else math.nan, -total / n / LN2))
    return results


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


def evaluate_file(model: RNNLM, codec: TextCodec, path: Path, streams: int = 1, encoding: str = "utf-8",
                  errors: str = "strict", device: torch.device | str = "cpu") -> CorpusEval:
    """The whole file as one stream, `<eos>` first, the state carried across lines (as in validation)."""
    text = read_text(path, encoding, errors)
    ids = encode(codec, text)
    if ids.numel() < 2:
        raise UsageError(f"{path} holds no text to evaluate")
    rows, mask = eval_streams(ids, streams)
    total, count = stream_nll(model, rows, mask, device=device)
    chars = char_count(text, codec.tokenizer.lowercase)
    loss = total / count
    return CorpusEval(str(path), loss, math.exp(min(loss, 700)), loss / LN2, total / max(chars, 1) / LN2,
                      count, chars, len(codec.tokenizer.lines(text)), int((ids == UNK_ID).sum()))
