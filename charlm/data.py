"""From a corpus file to token streams and windows of truncated BPTT.

A corpus becomes one stream of ids: `<eos>` first (the start symbol), then
each line's tokens followed by `<eos>`. For training the stream is cut into
`batch_size` parallel streams, one row each, and read in windows of `seq_len`:

    stream  e a b c e d f e g h i e ...        (e = <eos>)
    batchify(B=2):   row 0: e a b c e d        row 1: f e g h i e
    window t:  inputs  rows[:, t*T : t*T+T]
               targets rows[:, t*T+1 : t*T+T+1]

The hidden state at the end of one window starts the next (detached), so
every stream is read as one long text. Only row 0 starts where sampling and
scoring start, at an `<eos>` from a zero state; `fresh_windows` adds rows
that do, at random lines, so that the model learns how a line begins.

Corpora may be larger than memory: the text is read in blocks (bounded
memory, however long a line), the vocabulary counted in one streaming pass,
and the ids written once to a token file in a cache folder keyed by the
corpus's SHA-256 and the tokenizer settings. Training reads that file through
a memory map, in the smallest integer type that holds the vocabulary; the
position of every `<eos>`, recorded beside it while tokenizing, tells where
the fresh rows may start without reading the whole file again.
"""

from __future__ import annotations

import codecs
from array import array
import hashlib
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import unicodedata
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import torch
from torch import Tensor

from .config import DataConfig
from .errors import EncodingMismatch, RunFailure, UsageError
from .runs import is_run_dir
from .runtime import file_sha256, is_terminal
from .tokenizer import (EOS_ID, UNK_ID, SPECIALS, TextCodec, Tokenizer, Vocabulary, count_tokens, normalises_across,
                        normalize)

BLOCK_BYTES = 8 << 20   # read the corpus 8 MiB at a time (characters) ...
WORD_BLOCK_BYTES = 1 << 20  # ... or 1 MiB (words: a token as a Python string costs ~50 bytes while it is counted)
# Characters held back at most while the text read so far has no safe place to end. A full block has more
# characters than this, so only a whole block without one (nothing but combining marks) is passed on uncut.
MAX_CARRY = 1 << 20
HEAD_BYTES = 65536  # what read_pieces reads first, to refuse a binary stream before reading on
CACHE_FORMAT = 6  # 2: U+3000 is white space at word level (it was a token); 3: a UTF-8 mark is not text;
#                 4: a block of a long line no longer ends where NFC or lowercasing joins across the cut;
#                 5: lowercased text is composed again (tokenizer.normalize), at character level too; meta.json
#                    holds the token files' SHA-256; 6: starts.bin holds the position of every <eos> of train.bin


# ---------------------------------------------------------------- reading text
def _codec_name(encoding: str) -> str | None:
    """Python's own name for an encoding (utf16, U16 and UTF_16 are all 'utf-16'); None if unknown."""
    try:
        info = codecs.lookup(encoding)
    except LookupError:
        return None
    return info.name if getattr(info, "_is_text_encoding", True) else None  # not hex, base64, zlib...


def unknown_encoding(encoding: str) -> UsageError:
    return UsageError(f"unknown text encoding '{encoding}' (try utf-8, latin-1, cp1252, utf-16)")


def _is_wide(encoding: str) -> bool:
    """UTF-16 or UTF-32 under any of Python's names for them (utf16, U32, UTF_16LE...)."""
    return (_codec_name(encoding) or "").startswith(("utf-16", "utf-32"))


def _wide_codec(path: Path, encoding: str) -> tuple[str, int] | None:
    """For a UTF-16 or UTF-32 file: its codec with the byte order spelled out (from the encoding's name,
    else from the file's byte-order mark, else little-endian, as `bytes.decode` reads one without a mark),
    and the length of the mark at the file's start (0 if none); None for any other encoding. Python's
    incremental decoders need the order named: without it they refuse a file without a mark, and read a
    part that starts after the mark in the machine's order."""
    if not _is_wide(encoding):
        return None
    with open(path, "rb") as fh:
        return _wide_codec_of(fh.read(4), encoding)


def _wide_codec_of(head: bytes, encoding: str) -> tuple[str, int] | None:
    """_wide_codec for a file whose first bytes are `head`."""
    name = _codec_name(encoding) or ""
    if not name.startswith(("utf-16", "utf-32")):
        return None
    if not name.endswith(("-le", "-be")):
        name += "-be" if head.startswith("\ufeff".encode(name + "-be")) else "-le"
    mark = "\ufeff".encode(name)
    return name, len(mark) if head.startswith(mark) else 0


def empty_corpus(corpus: Path) -> UsageError:
    return UsageError(f"corpus {corpus} is empty (or white space only): nothing to learn from")


def _existing_file(path: Path) -> Path:
    path = Path(path)
    if str(path) == "-":
        raise UsageError("- names standard input, which a corpus cannot be read from: a corpus is read more than "
                         "once (hashed, split, tokenized), so save it to a file first")
    if not path.exists():
        raise UsageError(f"file not found: {path}")
    if path.is_dir():
        raise UsageError(f"{path} is a folder, not a text file" +
                         (f": it holds a run, which --resume {path} continues" if is_run_dir(path) else ""))
    return path


def check_text_file(path: Path, encoding: str = "utf-8") -> Path:
    """A readable regular file that does not look binary, or a UsageError that says what is wrong. A corpus
    is read more than once (hashed, split, tokenized), which a pipe cannot give: one is refused here."""
    path = _existing_file(path)
    if not path.is_file():
        raise UsageError(f"{path} is not a regular file (a pipe or a device): a corpus is read more than once, "
                         f"so save it to a file first")
    if _codec_name(encoding) is None:  # unknown, or not a text encoding (hex, base64, zlib...)
        raise unknown_encoding(encoding)
    try:
        with open(path, "rb") as fh:
            head = fh.read(65536)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if _looks_wide_or_binary(head, encoding):
        raise _binary_error(path, head[:4])
    return path


def is_blank(path: Path, encoding: str, limit: int) -> bool:
    """Whether a file of at most `limit` bytes holds white space only, read as tokenizing reads it (UTF-16's
    spaces are not blank bytes; a byte-order mark is not text). A larger file: False, and tokenizing finds out."""
    if path.stat().st_size > limit:
        return False
    return not any(piece.strip() for piece in iter_text(path, encoding=encoding, errors="replace"))


def _decode_error(name, offset: int, byte: bytes, encoding: str, head: bytes = b"",
                  around: bytes = b"", read_before: bool = False) -> UsageError:
    """The message for an undecodable byte. `head` (the file's first bytes) and `around` (the bytes about the
    bad one) may show what went wrong: a damaged UTF-8 file, or a file in another encoding. `read_before`:
    letters outside ASCII were read in `encoding` before the bad byte."""
    where = f"{name} is not valid {encoding}: byte offset {offset} ({byte!r})"
    if _utf8_mark(encoding) and _mostly_utf8(around):
        return UsageError(f"{where}; the text about it is UTF-8, so the file is damaged, cut off mid-character "
                          f"or mixes encodings there: --errors replace substitutes the bad bytes")
    if _utf8_mark(encoding) and read_before:  # cp1252 would misread the UTF-8 letters before it
        return UsageError(f"{where}; the text before it has letters in UTF-8, so the file mixes encodings: "
                          f"--errors replace substitutes the bad bytes (naming another encoding would misread "
                          f"those letters)")
    other = _reads_as(head if not head.isascii() else around, encoding)
    hint = (f"it reads as {other}: pass --encoding {other}" if other else
            "pass --encoding to name its encoding (cp1252 for Western European text saved on Windows, gb18030 "
            "for simplified Chinese, big5 for traditional, shift_jis or euc_jp for Japanese, euc_kr for Korean)")
    if other and other != "cp1252":  # a multi-byte encoding: replacing its bytes would leave little of the text
        return EncodingMismatch(f"{where}; {hint}", where, other)
    if other:
        return EncodingMismatch(f"{where}; {hint}, or --errors replace to substitute bad bytes", where, other)
    return UsageError(f"{where}; {hint}, or --errors replace to substitute bad bytes")


def _file_decode_error(path: Path, at: int, encoding: str) -> UsageError:
    """_decode_error for the byte at offset `at` of a file, read again with the bytes about it."""
    with open(path, "rb") as fh:
        head = fh.read(65536)
        fh.seek(max(at - 32768, 0))
        around = fh.read(65536)
    byte = around[min(at, 32768):min(at, 32768) + 1]
    return _decode_error(path, at, byte, encoding, head, around, _non_ascii_before(path, at))


def _non_ascii_before(path: Path, at: int) -> bool:
    """Whether bytes [0, at) of a file hold any byte outside ASCII (a UTF-8 byte-order mark aside): read without
    error, they are then letters of the encoding the file was read in, which naming another would misread."""
    with open(path, "rb") as fh:
        if fh.read(3) == codecs.BOM_UTF8:
            at -= 3
        else:
            fh.seek(0)
        while at > 0:
            block = fh.read(min(at, 1 << 20))
            if not block:
                return False
            if not block.isascii():
                return True
            at -= len(block)
    return False


def _mostly_utf8(data: bytes) -> bool:
    """Bytes whose characters outside ASCII are nearly all well-formed UTF-8 (a few bad bytes among them). In
    another encoding few are: a GB18030 pair is a valid UTF-8 sequence about one time in seven."""
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    good = sum(ord(c) > 127 for c in text) - bad
    return good >= 8 and good >= 4 * bad


def _reads_as(sample: bytes, encoding: str) -> str | None:
    """An encoding that a file's bytes read as, if they decode in it (and not in `encoding`) and the text looks
    like what it is used for. A hint, not a promise: the legacy encodings decode much besides their own text,
    so each is named only where its text shows a trait, and they are tried from the pickiest (UTF-8, where a
    byte outside ASCII fails by chance; EUC-KR, mostly Hangul, and much of it the syllables Korean uses most;
    EUC-JP, a fifth kana; GB18030, nearly all of GB2312's characters; Shift JIS, a fifth kana; cp1252, where
    the bytes outside ASCII stand alone, as accented letters do). Big5 shows none of these and is not named."""
    if not sample or sample.isascii():
        return None
    for other in ("utf-8", "euc_kr", "euc_jp", "gb18030", "shift_jis", "cp1252"):
        if _codec_name(encoding) == _codec_name(other):
            continue
        try:
            text = codecs.getincrementaldecoder(other)().decode(sample, final=False)
        except UnicodeDecodeError:
            continue
        wide = [c for c in text if ord(c) > 127]
        if other == "euc_kr":
            hangul = [c for c in wide if "\uac00" <= c <= "\ud7a3"]
            fits = len(hangul) >= 0.5 * len(wide) and sum(c in _COMMON_HANGUL for c in hangul) >= 0.35 * len(hangul)
        elif other in ("euc_jp", "shift_jis"):
            fits = sum("\u3040" <= c <= "\u30ff" for c in wide) >= 0.2 * len(wide)
        elif other == "gb18030":
            fits = sum(_in_gb2312(c) for c in wide) >= 0.9 * len(wide)
        elif other == "cp1252":
            runs = [len(run) for run in re.findall(rb"[\x80-\xff]+", sample)]
            fits = sum(runs) <= 1.5 * len(runs)
        else:
            fits = True
        if fits:
            return other
    return None


# Syllables that Korean text uses most (particles, endings, common roots): half or more of its Hangul in every
# sentence tried, short ones too. GB2312's byte pairs decode in EUC-KR as Hangul as well, but as syllables
# Korean seldom writes (今天天气很好 reads as 쏟莖莖폭붤봤): at most a fifth of them in the Chinese lines tried.
_COMMON_HANGUL = frozenset(
    "가각감개거것게결경계고공과관구국그기까께나날내너네녕는늘니다대더데도동되된될두들등때라러려로록를르른리마만말면명"
    "머먹며모무문물미민밥발방번보본부분비사산상생서선성세소수스습시식신실씨아안않알았야어었없업에엔여연영예오올와요우운원월위"
    "유은을음의이인일입있자작잘장저적전정제조좀좋주중지진집차처체초치터통트파표피하학한할함합해했행현형호화회후히")


def _in_gb2312(char: str) -> bool:
    try:
        char.encode("gb2312")
    except UnicodeEncodeError:
        return False
    return True


def _utf8_mark(encoding: str) -> bool:
    """UTF-8 under any name, utf-8-sig included: a byte-order mark at the file's start is not text (Windows
    Notepad writes one; it would become a token of the vocabulary and an <unk> when scoring)."""
    return _codec_name(encoding) in ("utf-8", "utf-8-sig")


def _wide_hint(head: bytes) -> str:
    """For a file read as something else that starts with a UTF-16 or UTF-32 byte-order mark: the hint."""
    for name, mark in (("utf-32", codecs.BOM_UTF32_LE), ("utf-32", codecs.BOM_UTF32_BE),
                       ("utf-16", codecs.BOM_UTF16_LE), ("utf-16", codecs.BOM_UTF16_BE)):
        if head.startswith(mark):
            return f"{name.upper()} text (it starts with a {name.upper()} byte-order mark): pass --encoding {name}"
    return ""


def _looks_wide_or_binary(head: bytes, encoding: str) -> bool:
    """Not text in `encoding`: NUL bytes (a binary file, or UTF-16 read as something else), or, read as
    UTF-8, a UTF-16 or UTF-32 byte-order mark (Chinese text in UTF-16 may hold no NUL byte at all)."""
    if _is_wide(encoding):
        return False
    return b"\x00" in head or (_utf8_mark(encoding) and bool(_wide_hint(head[:4])))


def _binary_error(name, head: bytes) -> UsageError:
    hint = _wide_hint(head)
    if hint:
        return UsageError(f"{name} looks like {hint}")
    return UsageError(f"{name} looks like a binary file (it holds NUL bytes), not text")


def read_text(path: Path, encoding: str = "utf-8", errors: str = "strict") -> str:
    """Read a whole (small) text file, or standard input ('-'): read_pieces joined."""
    return "".join(read_pieces(path, encoding, errors))


def read_pieces(path: Path, encoding: str = "utf-8", errors: str = "strict", level: str = "char",
                interactive: bool = False) -> Iterator[str]:
    """The text of a file, or of standard input ('-'), in pieces that end at safe places, as iter_text gives a
    corpus's: memory holds a block at a time, however large the file. It is opened and read once, so a pipe
    (`--file <(...)`, /dev/stdin) is read as a file is. A head of NUL bytes is refused before the rest is read
    (/dev/zero); an undecodable byte names its offset and what to do. A piece is what one read gives (up to a
    block): a slow pipe's lines are passed on as they come. `interactive` (a terminal): the first piece too,
    a line as it is typed, without waiting for the 64 KiB that the binary check reads of any other input."""
    stdin = str(path) == "-"
    name = "standard input" if stdin else str(path)
    path = path if stdin else _existing_file(path)
    if _codec_name(encoding) is None:  # unknown, or not a text encoding (hex, base64, zlib...)
        raise unknown_encoding(encoding)
    try:
        with nullcontext(sys.stdin.buffer) if stdin else open(path, "rb") as fh:
            yield from _stream_pieces(fh, name, encoding, errors, level, interactive)
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror or exc}") from None


def _stream_pieces(fh: BinaryIO, name: str, encoding: str, errors: str, level: str,
                   interactive: bool) -> Iterator[str]:
    # the head whole (a binary stream is refused on 64 KiB), except from a terminal; then what a read gives, not
    # a full block: a pipe's lines are scored as they come, and a file's blocks are full anyway
    head = fh.read1(HEAD_BYTES) if interactive else fh.read(HEAD_BYTES)
    read = fh.read1
    if _looks_wide_or_binary(head, encoding):
        raise _binary_error(name, head[:4])
    codec, skip = encoding, 0
    wide = _wide_codec_of(head, encoding)
    if wide:  # the byte order named, the byte-order mark skipped
        codec, skip = wide
    elif _utf8_mark(encoding) and head.startswith(codecs.BOM_UTF8):  # a mark is not text
        codec, skip = "utf-8", len(codecs.BOM_UTF8)
    decoder = codecs.getincrementaldecoder(codec)(errors=errors)
    block_size = BLOCK_BYTES if level == "char" else WORD_BLOCK_BYTES
    block, offset, final = head[skip:], skip, not head  # offset: where `block` starts in the file
    seen, non_ascii = b"", False             # the 64 KiB read before `block`; whether any text decoded from the
    carry = ""                               # bytes before it was not ASCII
    while True:
        held = decoder.getstate()[0]  # bytes of the last block kept back (a character cut in two)
        pending = len(held)
        try:
            text = carry + decoder.decode(block, final=final)
        except UnicodeDecodeError as exc:
            at = offset - pending + exc.start
            near = seen + block
            if len(block) - (at - offset) < 32768:  # the bytes after the bad one, for the message
                near += read(32768)
            near_start = offset - len(seen)
            around = near[max(at - 32768 - near_start, 0):at + 32768 - near_start]
            before = non_ascii or not block[:max(at - offset, 0)].isascii()
            raise _decode_error(name, at, near[at - near_start:at - near_start + 1], encoding, head, around,
                                before) from None
        except UnicodeError as exc:  # not tied to a byte
            raise UsageError(f"{name} is not valid {encoding}: {exc}") from None
        if final:
            if text:
                yield text
            return
        piece, carry = _safe_split(text, level, len(carry))
        if piece:
            yield piece
        # the bytes decoded: a character cut at the block's end is not read yet, and may be the bad byte
        kept = len(decoder.getstate()[0])
        non_ascii = non_ascii or not (held + block[:len(block) - kept]).isascii()
        seen = block[-65536:] if len(block) >= 65536 else (seen + block)[-65536:]
        offset += len(block)
        block = read(block_size)
        final = not block


def _safe_split(text: str, level: str, scanned: int) -> tuple[str, str]:
    """`text` as the piece that may be passed on now (_safe_cut) and the rest, kept for the next block."""
    cut = _safe_cut(text, level, scanned)
    return text[:cut], text[cut:]


def _safe_cut(text: str, level: str, scanned: int = 0) -> int:
    """Where a block of text may end without splitting a token, a CRLF or an NFC sequence. `text[:scanned]` is
    what the last call kept back: no line end and, at word level, no white space to cut at, so only the rest
    is searched (a word of 40 MB without white space was searched again with each new block: 56 s)."""
    nl = text.rfind("\n", scanned)
    if nl >= 0:
        return nl + 1
    if level == "word":  # a word never spans white space; without any, wait for more text
        for i in range(len(text) - 1, scanned - 1, -1):
            if text[i].isspace() and text[i] != "\r":
                return i + 1
        return 0
    i = len(text) - 1
    while i > 0 and (_is_mark(text[i]) or text[i] == "\r" or _composes(text, i)):
        i -= 1
    if i <= 0:  # no safe place yet (or no text): wait for more text, up to a bound
        return 0 if len(text) < MAX_CARRY else len(text)
    return i


def _is_mark(c: str) -> bool:
    """A character that attaches to the one before it: a combining mark, or one whose canonical
    decomposition starts with one (U+0F73 TIBETAN VOWEL SIGN II has class 0 but decomposes into marks)."""
    return unicodedata.combining(c) != 0 or unicodedata.combining(unicodedata.normalize("NFD", c)[0]) != 0


def _composes(text: str, i: int) -> bool:
    """The text before text[i] and the text from it do not normalise apart, although text[i] is no mark:
    NFC joins Hangul jamo (L + V, then the syllable + T) and some vowel signs, and lowercasing (data.lowercase)
    writes a capital sigma as final or not by what follows it. A cut before text[i] would change the tokens."""
    a, b = text[max(i - 8, 0):i], text[i:i + 8]
    return normalises_across(a, b) or normalises_across(a, b, True)


def iter_text(path: Path, start: int = 0, end: int | None = None, encoding: str = "utf-8",
              errors: str = "strict", level: str = "char", progress=None) -> Iterator[str]:
    """Text of bytes [start, end) of a file, in pieces that end at safe places (bounded memory).

    Errors name the encoding as given, whatever codec reads the part."""
    codec = encoding
    wide = _wide_codec(path, encoding)
    if wide:  # UTF-16 / UTF-32: decoded with the byte order named, the byte-order mark skipped if any
        codec, mark = wide
        start = start or mark
    elif _utf8_mark(codec):  # a mark belongs to the file's start only: a U+FEFF that begins a later part is text
        codec = "utf-8"
        if start == 0:
            with open(path, "rb") as fh:
                start = len(codecs.BOM_UTF8) if fh.read(3) == codecs.BOM_UTF8 else 0
    if _codec_name(codec) is None:  # unknown, or not a text encoding (hex, base64, zlib...)
        raise unknown_encoding(encoding)
    decoder = codecs.getincrementaldecoder(codec)(errors=errors)
    carry = ""
    with open(path, "rb") as fh:
        fh.seek(start)
        offset = start
        remaining = None if end is None else end - start
        block_size = BLOCK_BYTES if level == "char" else min(BLOCK_BYTES, WORD_BLOCK_BYTES)
        while True:
            size = block_size if remaining is None else min(block_size, remaining)
            block = fh.read(size) if size > 0 else b""
            final = not block
            pending = len(decoder.getstate()[0])  # bytes of the last block kept back (a character cut in two)
            try:
                text = carry + decoder.decode(block, final=final)
            except UnicodeDecodeError as exc:
                raise _file_decode_error(path, offset - pending + exc.start, encoding) from None
            except UnicodeError as exc:  # not tied to a byte
                raise UsageError(f"{path} is not valid {encoding}: {exc}") from None
            if progress is not None:
                progress(len(block))
            offset += len(block)
            if remaining is not None:
                remaining -= len(block)
            if final:
                if text:
                    yield text
                return
            piece, carry = _safe_split(text, level, len(carry))
            if piece:
                yield piece


def split_point(path: Path, fraction: float, encoding: str = "utf-8") -> int:
    """Byte offset where the validation part (the last `fraction`) starts, at a line boundary; the file's size
    when none is cut (a fraction of 0, or no line end after the cut).

    In UTF-16 and UTF-32 a line ends with a 2- or 4-byte newline, found only at offsets that are whole
    code units from the start of the file.
    """
    size = path.stat().st_size
    if fraction <= 0 or size == 0:
        return size
    wide = _wide_codec(path, encoding)
    newline = "\n".encode(wide[0]) if wide else b"\n"
    unit = len(newline)
    with open(path, "rb") as fh:
        cut = max(int(size * (1 - fraction)) - unit, 0)  # from the unit before: a cut at a line start stays there
        cut -= cut % unit
        fh.seek(cut)
        while True:
            block = fh.read(1 << 16)  # a whole number of units: no aligned newline spans two blocks
            if not block:
                return size
            nl = block.find(newline)
            while nl >= 0 and nl % unit:
                nl = block.find(newline, nl + 1)
            if nl >= 0:
                return cut + nl + unit
            cut += len(block)


# ---------------------------------------------------------------- encoding
def storage_dtype(vocab_size: int) -> torch.dtype:
    """The smallest integer type that holds every id."""
    if vocab_size <= 256:
        return torch.uint8
    if vocab_size <= 65536:
        return torch.uint16
    return torch.int32


class StreamEncoder:
    """Turns pieces of text into ids, keeping what must carry across pieces (a line cut short)."""

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.dtype = storage_dtype(len(codec.vocab))
        self.tokens = 0
        self.unk = 0
        self.chars = 0
        self.ends_line = True
        self.nonblank = False   # seen anything but white space
        self._pending_cr = False
        if codec.tokenizer.level == "char":
            singles = {ord(t): i for i, t in enumerate(codec.vocab.tokens) if len(t) == 1 and t not in SPECIALS}
            top = max(max(singles, default=0), ord("\n")) + 1
            table = torch.full((top + 1,), UNK_ID, dtype=torch.int32)  # last slot: any code point beyond
            for point, i in singles.items():
                table[point] = i
            table[ord("\n")] = EOS_ID
            self._table, self._top = table, top
            # ASCII text skips decoding entirely: bytes.translate maps each byte to its id at memcpy speed.
            ascii_ids = [int(table[min(b, top)]) for b in range(128)] + [UNK_ID] * 128
            self._ascii = bytes(ascii_ids) if self.dtype == torch.uint8 else None

    def encode(self, text: str) -> Tensor:
        """Ids of a piece of text: '\\n' (or '\\r\\n') ends a line and becomes `<eos>`."""
        if self._pending_cr:
            text = "\r" + text
            self._pending_cr = False
        if text.endswith("\r"):
            text, self._pending_cr = text[:-1], True
        text = normalize(text, self.codec.tokenizer.lowercase).replace("\r\n", "\n")
        if not text:
            return torch.zeros(0, dtype=self.dtype)
        self.chars += len(text)
        self.ends_line = text.endswith("\n")
        self.nonblank = self.nonblank or not text.isspace()
        if self.codec.tokenizer.level == "char":
            if self._ascii is not None and text.isascii():
                ids = torch.frombuffer(bytearray(text.encode("ascii").translate(self._ascii)), dtype=torch.uint8)
            else:
                points = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)
                ids = self._table.index_select(0, points.clamp_(max=self._top))
        else:
            out = array("i")  # 4 bytes an id, not a Python int object each
            # each '\n' an <eos>; the last line, if cut short, gets its <eos> later
            for tokens in self.codec.tokenizer.iter_split_lines(text, eos=True):
                out.extend(array("i", self.codec.vocab.encode(tokens)))  # from a list: faster than from `map`
            ids = torch.frombuffer(out, dtype=torch.int32) if out else torch.zeros(0, dtype=torch.int32)
        self.tokens += ids.numel()
        self.unk += int((ids == UNK_ID).sum())
        return ids.to(self.dtype)

    def finish(self) -> Tensor:
        """The final `<eos>` of a text that does not end with a newline."""
        if self._pending_cr or (self.chars and not self.ends_line):
            # a final '\r' ends a line too, as in Tokenizer.lines ("a\n\r" is two lines)
            self._pending_cr = False
            self.ends_line = True
            self.tokens += 1
            self.chars += 1
            return torch.tensor([EOS_ID], dtype=self.dtype)
        return torch.zeros(0, dtype=self.dtype)


def encode(codec: TextCodec, text: str, compact: bool = False) -> Tensor:
    """All of a text (in memory) as one id stream, `<eos>` first and after every line: int64, or with
    `compact` in the smallest type that holds the vocabulary (one byte a character at character level, where
    int64 takes eight: `eval` of a 200 MB file held 5.9 GB)."""
    enc = StreamEncoder(codec)
    body = enc.encode(text) if text else torch.zeros(0, dtype=enc.dtype)
    dtype = enc.dtype if compact else torch.int64
    return torch.cat([torch.tensor([EOS_ID], dtype=dtype), body.to(dtype), enc.finish().to(dtype)])


_ARRAY_TYPES = {torch.uint8: "B", torch.uint16: "H", torch.int32: "i"}  # array codes of storage_dtype's types


@dataclass
class EncodedText:
    ids: Tensor      # `<eos>` first and after every line, in the vocabulary's smallest type (as encode's compact)
    chars: int       # as char_count counts them
    lines: int
    unk: int


def encode_pieces(codec: TextCodec, pieces: Iterable[str]) -> EncodedText:
    """The text of `pieces` (read_pieces) as encode(..., compact=True) gives it whole, built piece by piece:
    memory holds the ids (a byte a character at character level) and one piece, never the text, which as a
    Python string and its normalised copy took about 12 bytes a character in `eval`."""
    enc = StreamEncoder(codec)
    ids = array(_ARRAY_TYPES[enc.dtype])
    lines = 0

    def put(part: Tensor) -> None:
        nonlocal lines
        if part.numel():
            start = len(ids)
            ids.frombytes(bytes(part.numel() * ids.itemsize))  # grows in place; the view below is gone before
            torch.frombuffer(ids, dtype=enc.dtype)[start:].copy_(part)  # the next growth, which it would forbid
            lines += int((part == EOS_ID).sum())
    put(torch.tensor([EOS_ID], dtype=enc.dtype))
    for piece in pieces:
        put(enc.encode(piece))
    put(enc.finish())
    return EncodedText(torch.frombuffer(ids, dtype=enc.dtype), enc.chars, lines - 1, enc.unk)


def char_count(text: str, lowercase: bool = False) -> int:
    """Characters of a text as the model sees them (NFC, as training counts them, so that a decomposed
    é is one character, not two): every line's characters plus one for its end."""
    text = normalize(text, lowercase).replace("\r\n", "\n")
    if text.endswith("\r"):  # a final '\r' ends the last line, as Tokenizer.lines and the encoder read it
        text = text[:-1] + "\n"
    return len(text) + (0 if not text or text.endswith("\n") else 1)


def count_vocabulary(path: Path, cfg: DataConfig, start: int, end: int, progress=None) -> Counter:
    """Token frequencies of bytes [start, end) of a file, in one streaming pass."""
    tokenizer = Tokenizer(cfg.level, cfg.lowercase, cfg.word_split)
    counts: Counter = Counter()
    dense = torch.zeros(0, dtype=torch.int64)
    for piece in iter_text(path, start, end, cfg.encoding, cfg.errors, cfg.level, progress):
        piece = normalize(piece, cfg.lowercase)
        if cfg.level == "char":
            if piece.isascii():
                found = torch.bincount(torch.frombuffer(bytearray(piece.encode("ascii")), dtype=torch.uint8))
            else:
                found = torch.bincount(torch.frombuffer(bytearray(piece.encode("utf-32-le")), dtype=torch.int32))
            if found.numel() > dense.numel():
                dense = torch.cat([dense, torch.zeros(found.numel() - dense.numel(), dtype=torch.int64)])
            dense[: found.numel()] += found
        else:
            for tokens in tokenizer.iter_split_lines(piece):
                counts.update(tokens)
    if cfg.level == "char":
        nonzero = torch.nonzero(dense).flatten().tolist()
        counts.update({chr(p): int(dense[p]) for p in nonzero})
        for ch in ("\n", "\r"):
            counts.pop(ch, None)
    return counts


def build_vocabulary(counts: Counter, cfg: DataConfig) -> TextCodec:
    tokenizer = Tokenizer(cfg.level, cfg.lowercase, cfg.word_split)
    return TextCodec(tokenizer, Vocabulary.build(counts, cfg.min_freq, cfg.max_size))


def build_codec(cfg: DataConfig, train_text: str) -> TextCodec:
    """The vocabulary of an in-memory text (the same as a streaming count of the same text)."""
    return build_vocabulary(count_tokens(Tokenizer(cfg.level, cfg.lowercase, cfg.word_split), train_text), cfg)


def encode_to_file(path: Path, cfg: DataConfig, codec: TextCodec, start: int, end: int, out: BinaryIO,
                   progress=None, starts: BinaryIO | None = None) -> StreamEncoder:
    """Stream-encode bytes [start, end) of a file into `out` (raw ids), `<eos>` first; and into `starts`, if
    given, the position in `out` of every `<eos>`, in order, as int64 (how many ids there will be, and so the
    smallest type that holds a position, is known only at the end: `_narrow` copies them into it)."""
    enc = StreamEncoder(codec)
    written = 0  # ids in `out` so far

    def put(ids: Tensor) -> None:
        nonlocal written
        out.write(_to_bytes(ids))
        if starts is not None:
            starts.write(_to_bytes((ids == EOS_ID).nonzero().flatten() + written))
        written += ids.numel()

    put(torch.tensor([EOS_ID], dtype=enc.dtype))
    for piece in iter_text(path, start, end, cfg.encoding, cfg.errors, cfg.level, progress):
        put(enc.encode(piece))
    put(enc.finish())
    return enc


def position_dtype(count: int) -> torch.dtype:
    """The smallest type of `line_starts` that holds every position of a stream of `count` ids."""
    return torch.int32 if count - 1 < 2 ** 31 else torch.int64


def _narrow(wide: Path, out: BinaryIO, dtype: torch.dtype) -> None:
    """Copy a file of int64 positions into `out` as `dtype` (which holds them all), 2**20 at a time."""
    with open(wide, "rb") as fh:
        while block := fh.read(8 << 20):
            out.write(_to_bytes(torch.frombuffer(bytearray(block), dtype=torch.int64).to(dtype)))


def _to_bytes(t: Tensor) -> bytearray:
    """Raw bytes of a tensor without numpy: copy it into a tensor that views a bytearray."""
    buf = bytearray(t.numel() * t.element_size())
    if buf:
        torch.frombuffer(buf, dtype=t.dtype).copy_(t.reshape(-1))
    return buf


def map_tokens(path: Path, dtype: torch.dtype, count: int) -> Tensor:
    """A token file as a read-only-by-convention tensor backed by a memory map."""
    if count == 0:
        return torch.zeros(0, dtype=dtype)
    return torch.from_file(str(path), shared=False, size=count, dtype=dtype)


@dataclass
class Splits:
    codec: TextCodec
    train: Tensor          # (N,) ids in the storage dtype (memory-mapped), <eos> first
    val: Tensor | None     # (M,) likewise; None without validation
    train_chars: int
    val_chars: int
    corpus_sha256: str
    cache: Path | None = None
    val_sha256: str | None = None  # the --val file's; None where the validation part is cut from the corpus
    val_unk: int = 0               # validation tokens outside the vocabulary, read as <unk>
    starts: Tensor | None = None   # (lines,) the position of every <eos> of train, in order (memory-mapped)


def _cache_write_failure(folder: Path, exc: OSError) -> RunFailure:
    return RunFailure(f"could not write token files in {folder} ({exc.strerror or exc}); free some space or "
                      f"pass --cache-dir DIR")


def _sync(out: BinaryIO) -> None:
    """A token file on the disk before meta.json, which marks its entry done, is renamed in."""
    out.flush()
    os.fsync(out.fileno())


_BUILDS: dict[Path, int] = {}  # cache entries this process is writing: the descriptor of its lock on each


def _lock_build(tmp: Path) -> None:
    """Hold a lock on the folder a cache entry is written in, while it is written: `_clear_stale` of another
    process (of any PID namespace, or host on a shared file system) then leaves it alone."""
    try:
        import fcntl

        fd = os.open(tmp, os.O_RDONLY)
    except (ImportError, OSError):  # no flock (Windows): stale folders are then never cleared
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        return
    _BUILDS[tmp] = fd


def _unlock_build(tmp: Path) -> None:
    fd = _BUILDS.pop(tmp, None)
    if fd is not None:
        os.close(fd)


def _clear_stale(folder: Path) -> None:
    """Remove the folders that a process killed while it wrote this cache entry left: those whose lock
    (`_lock_build`) nobody holds. Where the lock cannot be taken or tested, nothing is removed."""
    try:
        import fcntl
    except ImportError:
        return
    for stray in folder.glob(".tmp-*"):
        try:
            fd = os.open(stray, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a build in progress (or a file system without locks)
            os.close(fd)
            continue
        try:
            shutil.rmtree(stray, ignore_errors=True)
        finally:
            os.close(fd)


def _discard(tmp: Path) -> None:
    """Remove a cache entry's unfinished files, and the entry's folder if nothing else is in it (another
    process writing the same entry keeps it: rmdir refuses a folder that is not empty)."""
    shutil.rmtree(tmp, ignore_errors=True)
    _unlock_build(tmp)
    try:
        tmp.parent.rmdir()
    except OSError:
        pass


def _cache_key(cfg: DataConfig, corpus_digest: str, val_digest: str | None, codec: TextCodec | None) -> str:
    settings = {"format": CACHE_FORMAT, "corpus": corpus_digest, "val": val_digest, "level": cfg.level,
                "lowercase": cfg.lowercase, "word_split": cfg.word_split, "min_freq": cfg.min_freq,
                "max_size": cfg.max_size, "val_fraction": None if val_digest else cfg.val_fraction,
                "encoding": cfg.encoding, "errors": cfg.errors,
                "vocab": hashlib.sha256(codec.to_json().encode()).hexdigest() if codec else None}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def prepare(cfg: DataConfig, corpus: Path, val: Path | None = None, codec: TextCodec | None = None,
            cache_dir: Path | None = None, show_progress: bool = False, corpus_sha256: str | None = None) -> Splits:
    """Tokenize a corpus (and validation file) into token files, or reuse them; map them into memory.

    The vocabulary comes from the training split only, unless `codec` is given
    (a resumed run keeps its own). Token files live in `cache_dir` (default:
    $CHARLM_CACHE_DIR, else `.charlm-cache` in the working folder) under a key of the corpus's SHA-256
    and every setting that changes the ids.
    """
    corpus = check_text_file(corpus, cfg.encoding)
    if val is not None:
        val = check_text_file(val, cfg.encoding)
    digest = corpus_sha256 or file_sha256(corpus)  # a caller that already hashed the corpus passes it
    val_digest = file_sha256(val) if val is not None else None
    if cache_dir is None:
        cache_dir = os.environ.get("CHARLM_CACHE_DIR") or ".charlm-cache"
    folder = Path(cache_dir) / _cache_key(cfg, digest, val_digest, codec)
    meta_path = folder / "meta.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            for name in ("train", "val", "starts"):  # token files changed underneath would train on other text
                if file_sha256(folder / f"{name}.bin") != meta[f"{name}_sha256"]:
                    raise ValueError(f"{name}.bin does not match its SHA-256")
            cached = TextCodec.load(folder / "vocab.json")
            dtype = getattr(torch, meta["dtype"])
            return Splits(cached, map_tokens(folder / "train.bin", dtype, meta["train_tokens"]),
                          map_tokens(folder / "val.bin", dtype, meta["val_tokens"]) if meta["val_tokens"] else None,
                          meta["train_chars"], meta["val_chars"], digest, folder, val_digest, meta["val_unk"],
                          map_tokens(folder / "starts.bin", getattr(torch, meta["starts_dtype"]),
                                     meta["train_lines"]))
        except (OSError, ValueError, KeyError, UsageError, RuntimeError):
            pass  # a damaged cache entry is rebuilt below
    size = corpus.stat().st_size
    cut = size if val is not None else split_point(corpus, cfg.val_fraction, cfg.encoding)
    total = size + (val.stat().st_size if val is not None else 0)
    bar = _progress_bar(total * (2 if codec is None else 1), show_progress)
    tmp = folder / f".tmp-{socket.gethostname()}-{os.getpid()}"  # the host too: one name per writer
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _clear_stale(folder)
    except OSError as exc:
        bar.close()
        raise UsageError(f"cannot create the token cache folder {folder.parent} ({exc.strerror or exc}): "
                         f"pass --cache-dir DIR or set CHARLM_CACHE_DIR to a writable folder") from None
    try:
        if codec is None:
            codec = build_vocabulary(count_vocabulary(corpus, cfg, 0, cut, bar.update), cfg)
        tmp.mkdir(parents=True, exist_ok=True)
        _lock_build(tmp)
        with open(tmp / "train.bin", "wb") as out, open(tmp / "starts.int64", "wb") as wide:
            train_enc = encode_to_file(corpus, cfg, codec, 0, cut, out, bar.update, starts=wide)
            _sync(out)
        train_lines = (tmp / "starts.int64").stat().st_size // 8
        starts_dtype = position_dtype(train_enc.tokens + 1)
        with open(tmp / "starts.bin", "wb") as out:
            _narrow(tmp / "starts.int64", out, starts_dtype)
            _sync(out)
        (tmp / "starts.int64").unlink()
        with open(tmp / "val.bin", "wb") as out:
            if val is not None:
                try:
                    val_enc = encode_to_file(val, cfg, codec, 0, None, out, bar.update)
                except EncodingMismatch as exc:  # "pass --encoding X" would move the error onto the corpus
                    raise UsageError(f"{exc.where}; it reads as {exc.reads_as}, but --encoding ({cfg.encoding}) is "
                                     f"the encoding of the corpus and of --val alike: save {val} in {cfg.encoding}, "
                                     f"as {corpus} is, or pass --encoding {exc.reads_as} if {corpus} reads so too "
                                     f"(plain ASCII does)") from None
            else:
                val_enc = encode_to_file(corpus, cfg, codec, cut, size, out, bar.update)
            _sync(out)
    except OSError as exc:  # a full disk or a folder that vanished: nothing half-written stays behind
        _discard(tmp)
        raise _cache_write_failure(folder, exc) from None
    except BaseException:
        _discard(tmp)
        raise
    finally:
        bar.close()
    if not _has_text(train_enc):
        _discard(tmp)
        raise empty_corpus(corpus)
    if val is not None and not _has_text(val_enc):
        _discard(tmp)
        raise UsageError(f"validation file {val} is empty (or white space only): nothing to validate on")
    val_tokens = val_enc.tokens + 1 if val_enc.chars and val_enc.tokens else 0
    meta = {"format": CACHE_FORMAT, "dtype": str(train_enc.dtype).replace("torch.", ""),
            "train_tokens": train_enc.tokens + 1, "val_tokens": val_tokens,
            "train_chars": train_enc.chars, "val_chars": val_enc.chars, "train_unk": train_enc.unk,
            "val_unk": val_enc.unk, "corpus_sha256": digest,
            "starts_dtype": str(starts_dtype).replace("torch.", ""), "train_lines": train_lines}
    try:
        # checked when the entry is used again (a file damaged or changed since is rebuilt, not trained on)
        for name in ("train", "val", "starts"):
            meta[f"{name}_sha256"] = file_sha256(tmp / f"{name}.bin")
        (tmp / "vocab.json").write_text(codec.to_json(), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        # meta.json last: it marks the entry done
        for name in ("train.bin", "val.bin", "starts.bin", "vocab.json", "meta.json"):
            os.replace(tmp / name, folder / name)
        tmp.rmdir()
        _unlock_build(tmp)
    except OSError as exc:  # a disk that filled up at the last moment: as above, nothing half-written stays
        _discard(tmp)
        raise _cache_write_failure(folder, exc) from None
    dtype = train_enc.dtype
    return Splits(codec, map_tokens(folder / "train.bin", dtype, meta["train_tokens"]),
                  map_tokens(folder / "val.bin", dtype, val_tokens) if val_tokens else None,
                  train_enc.chars, val_enc.chars, digest, folder, val_digest, val_enc.unk,
                  map_tokens(folder / "starts.bin", starts_dtype, train_lines))


def check_vocabulary(saved: TextCodec, fresh: TextCodec, corpus: Path) -> None:
    """A resumed run's vocabulary must be the one its corpus and data settings build: never a silent mismatch."""
    if saved.tokenizer.to_dict() == fresh.tokenizer.to_dict() and saved.vocab.tokens == fresh.vocab.tokens:
        return
    a, b = saved.vocab.tokens, fresh.vocab.tokens
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    raise UsageError(f"the run's vocabulary does not match the tokenization of {corpus}: {len(a)} tokens saved, "
                     f"{len(b)} built from the corpus, first difference at id {first}; the run's vocab.json "
                     f"belongs to another corpus or other data settings")


def _has_text(enc: StreamEncoder) -> bool:
    return enc.tokens > 0 and enc.nonblank


def _progress_bar(total: int, show: bool):
    from tqdm import tqdm
    import sys
    return tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", leave=False, file=sys.stderr,
                disable=not (show and is_terminal(sys.stderr)))


# ---------------------------------------------------------------- batches and windows
def batchify(ids: Tensor, batch_size: int) -> Tensor:
    """(N,) -> (B, N // B): B parallel streams, the tail that does not fill a row dropped (a view)."""
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
    """Inputs and targets (B, T) as int64 of window `index`; the last window of an epoch may be shorter."""
    start = index * seq_len
    end = min(start + seq_len, rows.shape[1] - 1)
    return rows[:, start:end].long(), rows[:, start + 1:end + 1].long()


def line_starts(ids: Tensor, seq_len: int, known: Tensor | None = None) -> Tensor:
    """Positions of the `<eos>` tokens that a line follows and a whole window of `seq_len` (with its targets)
    can start at: (lines,), int32 where the positions fit (4 bytes a line).

    `known`, the position of every `<eos>` of `ids` in order (`Splits.starts`, which the token cache
    recorded while it tokenized), gives the answer without reading `ids`: its first part, a view found by a
    binary search. Without it `ids` is read a part at a time, which on a memory-mapped token file brings
    all of the file into the process's memory (1 GB for a 1 GB character corpus)."""
    last = ids.numel() - seq_len - 1
    if known is not None:
        return known[: int(torch.searchsorted(known, torch.tensor([last], dtype=known.dtype), right=True))]
    kind = position_dtype(last + 1)
    parts = [((ids[start:min(start + (1 << 24), last + 1)] == EOS_ID).nonzero().flatten() + start).to(kind)
             for start in range(0, last + 1, 1 << 24)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=kind)


def fresh_windows(ids: Tensor, starts: Tensor, count: int, seq_len: int, seed: int,
                  step: int) -> tuple[Tensor, Tensor]:
    """`count` windows (inputs, targets: (count, seq_len) int64) that each begin at an `<eos>`, the start of a
    line, as sampling and scoring begin; the model reads them from a zero state. Every line is as likely
    (`starts` from `line_starts`, for windows of at least `seq_len`); the draw depends on `seed` and `step`
    alone, so a resumed run draws the same lines, and so do all processes under torchrun. A text with no
    line end to start at gives windows at random positions."""
    draw = random.Random(f"fresh/{seed}/{step}")
    if len(starts):
        chosen = [int(starts[draw.randrange(len(starts))]) for _ in range(count)]
    else:
        chosen = [draw.randint(0, ids.numel() - seq_len - 1) for _ in range(count)]
    x = torch.stack([ids[s:s + seq_len] for s in chosen]).long()
    y = torch.stack([ids[s + 1:s + seq_len + 1] for s in chosen]).long()
    return x, y


def eval_streams(ids: Tensor, streams: int) -> tuple[Tensor, Tensor]:
    """Cut a stream into at most `streams` rows that cover every token: (rows (S, L), mask (S, L) of the real
    targets).

    Row s continues where row s-1 ends (its first token is row s-1's last), so
    every token after the first is a target exactly once. With one row, the
    state runs through the whole text: the exact corpus likelihood.
    """
    n_targets = ids.numel() - 1
    per_row = max(1, math.ceil(n_targets / max(1, streams)))
    streams = max(1, math.ceil(n_targets / per_row))  # no row left without a target (10 targets in 7 rows of 2: 5 rows)
    if streams == 1 and n_targets >= 1:  # the stream itself, not a copy of it
        mask = torch.ones(1, ids.numel(), dtype=torch.bool)
        mask[0, 0] = False
        return ids.view(1, -1), mask
    rows = torch.full((streams, per_row + 1), EOS_ID, dtype=ids.dtype)
    mask = torch.zeros(streams, per_row + 1, dtype=torch.bool)
    for s in range(streams):
        start = s * per_row
        piece = ids[start: min(start + per_row + 1, ids.numel())]
        rows[s, : piece.numel()] = piece
        mask[s, 1: piece.numel()] = True
    return rows, mask


def split_text(text: str, fraction: float) -> tuple[str, str]:
    """In memory, what `split_point` does on a file: the last `fraction` (of the UTF-8 bytes) as validation."""
    raw = text.encode("utf-8")
    if fraction <= 0 or not raw:
        return text, ""
    cut = max(int(len(raw) * (1 - fraction)) - 1, 0)
    nl = raw.find(b"\n", cut)
    if nl < 0:
        return text, ""
    return raw[: nl + 1].decode("utf-8"), raw[nl + 1:].decode("utf-8")
