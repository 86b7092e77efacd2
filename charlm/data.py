"""From a corpus file to token streams and windows of truncated BPTT.

A corpus becomes one stream of ids: `<eos>` first (the start symbol), then
each line's tokens followed by `<eos>`. For training the stream is cut into
`batch_size` parallel streams, one row each, and read in windows of `seq_len`:

    stream  e a b c e d e f g e h i ...        (e = <eos>)
    batchify(B=2):   row 0: e a b c e d        row 1: e f g e h i
    window t:  inputs  rows[:, t*T : t*T+T]
               targets rows[:, t*T+1 : t*T+T+1]

The hidden state at the end of one window starts the next (detached), so
every stream is read as one long text.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .config import DataConfig
from .errors import UsageError
from .tokenizer import EOS_ID, UNK_ID, TextCodec, Tokenizer, Vocabulary, count_tokens, normalize


def read_text(path: Path, encoding: str = "utf-8", errors: str = "strict") -> str:
    """Read a whole text file; a decoding error names the byte offset and how to proceed."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"file not found: {path}")
    if path.is_dir():
        raise UsageError(f"{path} is a folder, not a text file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    return decode(raw, str(path), encoding, errors)


def decode(raw: bytes, name: str, encoding: str = "utf-8", errors: str = "strict") -> str:
    """Bytes to text; a binary file or an undecodable byte gets a message naming it and what to do."""
    if b"\x00" in raw[:65536] and not encoding.lower().replace("_", "-").startswith(("utf-16", "utf-32")):
        raise UsageError(f"{name} looks like a binary file (it holds NUL bytes), not text")
    try:
        return raw.decode(encoding, errors=errors)
    except LookupError:
        raise UsageError(f"unknown text encoding '{encoding}' (try utf-8, latin-1, cp1252, utf-16)") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{name} is not valid {encoding}: byte offset {exc.start} ({raw[exc.start:exc.start + 1]!r}); "
                         f"pass --encoding to name its encoding or --errors replace to substitute bad bytes") from None


def encode(codec: TextCodec, text: str) -> Tensor:
    """All of a text as one int64 id stream, `<eos>` first and after every line.

    Memory stays a small multiple of the text: the ids are written into one
    preallocated buffer, never gathered into a Python list of token strings.
    """
    if codec.tokenizer.level == "char":
        return _encode_chars(codec, text)
    ids = array("q", [EOS_ID])
    index = codec.vocab.index
    for line in codec.tokenizer.lines(text):
        ids.extend(index.get(tok, UNK_ID) for tok in codec.tokenizer.iter_split(line))
        ids.append(EOS_ID)
    return torch.frombuffer(ids, dtype=torch.int64)  # shares the array's memory (and keeps it alive)


# Characters converted to ids at a time: bounds the temporary tensors of `_encode_chars`.
CHAR_CHUNK = 1 << 20


def _encode_chars(codec: TextCodec, text: str) -> Tensor:
    """Character level, vectorised: each code point looked up in a table instead of a Python loop.

    Gives exactly what `TextCodec.encode_text` gives, `<eos>` first (tested), at C speed.
    """
    text = normalize(text, codec.tokenizer.lowercase).replace("\r\n", "\n")
    if text.endswith("\r"):  # a last line ending in "\r" without "\n": `Tokenizer.lines` drops the "\r"
        text = text[:-1] + "\n"
    if text and not text.endswith("\n"):
        text += "\n"
    # table[code point] = id; the last entry (<unk>) catches every code point above the vocabulary's.
    singles = {ord(tok): i for i, tok in enumerate(codec.vocab.tokens) if len(tok) == 1}
    top = max([ord("\n"), *singles]) + 1
    table = torch.full((top + 1,), UNK_ID, dtype=torch.int64)
    if singles:
        table[torch.tensor(list(singles))] = torch.tensor(list(singles.values()))
    table[ord("\n")] = EOS_ID
    ids = torch.empty(len(text) + 1, dtype=torch.int64)
    ids[0] = EOS_ID
    for start in range(0, len(text), CHAR_CHUNK):
        piece = text[start:start + CHAR_CHUNK]
        points = torch.frombuffer(bytearray(piece.encode("utf-32-le")), dtype=torch.int32).clamp_(max=top)
        torch.index_select(table, 0, points, out=ids[1 + start:1 + start + len(piece)])
    return ids


@dataclass
class Splits:
    codec: TextCodec
    train: Tensor          # (N,) int64, <eos> first
    val: Tensor | None     # (M,) int64, <eos> first; None without validation
    train_chars: int
    val_chars: int


def split_text(text: str, fraction: float) -> tuple[str, str]:
    """The last `fraction` of the characters as validation, cut at a line boundary."""
    if fraction <= 0:
        return text, ""
    cut = int(len(text) * (1 - fraction))
    newline = text.find("\n", cut)
    if newline < 0 or newline + 1 >= len(text):
        newline = text.rfind("\n", 0, cut)
    if newline < 0:
        return text, ""
    return text[: newline + 1], text[newline + 1:]


def build_codec(cfg: DataConfig, train_text: str) -> TextCodec:
    tokenizer = Tokenizer(cfg.level, cfg.lowercase, cfg.word_split)
    vocab = Vocabulary.build(count_tokens(tokenizer, train_text), cfg.min_freq, cfg.max_size)
    return TextCodec(tokenizer, vocab)


def char_count(text: str) -> int:
    """Characters of a text as the model sees them: every line's characters plus one for its end."""
    text = text.replace("\r\n", "\n")
    return len(text) + (0 if not text or text.endswith("\n") else 1)


def prepare(cfg: DataConfig, corpus: Path, val: Path | None = None, codec: TextCodec | None = None,
            check_codec: bool = False) -> Splits:
    """Read the corpus (and validation file), build the vocabulary from the training split, encode both.

    With `codec`, encode with it instead; with `check_codec` too (a resumed run), first check that it
    is the vocabulary this corpus and these settings build, so that a mismatch is never silent.
    """
    text = read_text(corpus, cfg.encoding, cfg.errors)
    if not text or text.isspace():  # (isspace, not strip: no copy of a large text)
        raise UsageError(f"corpus {corpus} is empty (or white space only): nothing to learn from")
    if val is not None:
        train_text, val_text = text, read_text(val, cfg.encoding, cfg.errors)
    else:
        train_text, val_text = split_text(text, cfg.val_fraction)
    if codec is not None and check_codec:
        _check_vocabulary(codec, build_codec(cfg, train_text), corpus)
    codec = codec or build_codec(cfg, train_text)
    train_ids = encode(codec, train_text)
    val_ids = encode(codec, val_text) if val_text and not val_text.isspace() else None
    return Splits(codec, train_ids, val_ids, char_count(train_text), char_count(val_text))


def _check_vocabulary(saved: TextCodec, fresh: TextCodec, corpus: Path) -> None:
    if saved.tokenizer.to_dict() == fresh.tokenizer.to_dict() and saved.vocab.tokens == fresh.vocab.tokens:
        return
    a, b = saved.vocab.tokens, fresh.vocab.tokens
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    raise UsageError(f"the run's vocabulary does not match the tokenization of {corpus}: {len(a)} tokens saved, "
                     f"{len(b)} built from the corpus, first difference at id {first}; the run's vocab.json "
                     f"belongs to another corpus or other data settings")


def batchify(ids: Tensor, batch_size: int) -> Tensor:
    """(N,) -> (B, N // B): B parallel streams, the tail that does not fill a row dropped."""
    per_row = ids.numel() // batch_size
    return ids[: per_row * batch_size].view(batch_size, per_row)


def check_trainable(ids: Tensor, batch_size: int, seq_len: int, name: str = "corpus") -> None:
    per_row = ids.numel() // batch_size
    if per_row < seq_len + 1:
        need = batch_size * (seq_len + 1)
        raise UsageError(f"{name} is too short: {ids.numel():,} tokens, and batch_size {batch_size} x "
                         f"(seq_len {seq_len} + 1) needs {need:,}; use a longer corpus or smaller "
                         f"--set train.batch_size / train.seq_len")


def windows_per_epoch(rows: Tensor, seq_len: int) -> int:
    return math.ceil((rows.shape[1] - 1) / seq_len)


def window(rows: Tensor, index: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """Inputs and targets (B, T) of window `index`; the last window of an epoch may be shorter."""
    start = index * seq_len
    end = min(start + seq_len, rows.shape[1] - 1)
    return rows[:, start:end], rows[:, start + 1:end + 1]


def eval_streams(ids: Tensor, streams: int) -> tuple[Tensor, Tensor]:
    """Cut a stream into `streams` rows that cover every token: (rows (S, L), mask (S, L) of real targets).

    Row s continues where row s-1 ends (its first token is row s-1's last), so
    every token after the first is a target exactly once. With one row, the
    state runs through the whole text: the exact corpus likelihood.
    """
    n_targets = ids.numel() - 1
    streams = max(1, min(streams, n_targets))
    per_row = math.ceil(n_targets / streams)
    rows = torch.full((streams, per_row + 1), EOS_ID, dtype=ids.dtype)
    mask = torch.zeros(streams, per_row + 1, dtype=torch.bool)
    for s in range(streams):
        start = s * per_row
        piece = ids[start: min(start + per_row + 1, ids.numel())]
        rows[s, : piece.numel()] = piece
        mask[s, 1: piece.numel()] = True
    return rows, mask
