"""Vocabulary and the character / word tokenizers.

Every line of text becomes its tokens followed by `<eos>`. `<eos>` is also the
start symbol: a model reads `<eos>` first, so the first token of a text is
predicted from the state after `<eos>` (training, sampling and scoring alike).
Anything outside the vocabulary becomes `<unk>` and is counted.

Text is normalised to Unicode NFC before it is split, the same way at train,
sample and score time, so "é" typed as one code point or as "e" + accent is the
same token.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

from .errors import UsageError

UNK = "<unk>"
EOS = "<eos>"
SPECIALS = (UNK, EOS)
UNK_ID, EOS_ID = 0, 1
VOCAB_FORMAT = 1

# CJK ideographs, kana, hangul and CJK punctuation: each such character is a word of its own.
# U+3000, the ideographic space, is white space: it separates words and is never one.
_CJK = ("\u2e80-\u2fff\u3001-\u303f\u3040-\u30ff\u3100-\u312f\u3190-\u31ff\u3400-\u4dbf"
        "\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\U00020000-\U0002fa1f")
# A literal <unk> in a corpus (WikiText writes them) stays one token; then a CJK
# character; then a word (letters and digits, with inner apostrophes: "don't");
# then any other single non-space character (punctuation, symbols, emoji).
_WORD_RE = re.compile(rf"<unk>|[{_CJK}]|[^\W{_CJK}]+(?:['’][^\W{_CJK}]+)*|[^\s{_CJK}]")
# A line end or a token of _WORD_RE: the tokens of many lines in one pass (Tokenizer.iter_split_lines). No
# token holds white space, so the line ends cut the matches just where a call per line would.
_LINE_END_OR_WORD_RE = re.compile(r"\n|" + _WORD_RE.pattern)
_NO_SPACE_BEFORE = set(".,;:!?)]}%’”»…")
_NO_SPACE_AFTER = set("([{¿¡“‘«")
# Straight quotes do not say whether they open or close: the count in the line so far does (Tokenizer.join).
# A ' between two words is taken as a quote by that count too, so an elision ("o' the") may read "o 'the".
_STRAIGHT_QUOTES = ("\"", "'")
_JOINERS = ("-", "/")          # between two words or numbers: no space (well-known, 2024-01-05, and/or)
_CURRENCY = set("$£€¥#")        # before a number: no space ($3.14, #1)
_IS_CJK = re.compile(rf"^[{_CJK}]$")
_HAS_CJK_RUN = re.compile(rf"[{_CJK}]{{4}}")  # four CJK characters in a row: more than a word, as a rule


def unsegmented_cjk(tokens: list[str]) -> bool:
    """Whether most words of a `space`-split vocabulary are runs of CJK text: Chinese (or Japanese) written
    without spaces, where `space` makes a whole clause one word."""
    words = [t for t in tokens if not t.startswith("<")]
    return bool(words) and sum(bool(_HAS_CJK_RUN.search(t)) for t in words) > len(words) / 2
# Full-width and CJK punctuation (，。：！？、「」《》) carries its own spacing: no space on either side. (Not
# the ideographic zero, iteration marks or Hangzhou numerals of the same block: they are letters and digits.)
_IS_WIDE_PUNCT = re.compile("^[\u3001-\u3004\u3008-\u3020\u3030\u303d-\u303f"
                            "\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]$")
# Narrow punctuation that Chinese text also uses: quotes, the dash of "——", the ellipsis of "……" and the dot
# of transliterated names; next to a CJK token it takes no space, as it would in the text.
_CJK_COMPANIONS = set("“”‘’—…·")
_SPACE = re.compile(r"\s")
# A long line is split into pieces of about this many characters, cut just after
# a white-space character: no token contains white space, so the tokens are the
# same, and the list of token strings alive at once stays small (a 50 MB line
# would otherwise become tens of millions of strings in one list).
PIECE_CHARS = 1 << 20


def _pieces(line: str, size: int = PIECE_CHARS) -> Iterable[str]:
    start, n = 0, len(line)
    while start < n:
        if n - start <= size:
            yield line[start:] if start else line
            return
        space = _SPACE.search(line, start + size)
        if space is None:
            yield line[start:]
            return
        yield line[start:space.end()]
        start = space.end()


def normalize(text: str, lowercase: bool = False) -> str:
    """NFC, then lowercase if asked. Lowercasing can undo NFC ("T" + U+0308, which has no composed capital,
    lowers to "t" + U+0308, which NFC composes to U+1E97), so the lowered text is composed again: normalising
    twice then gives what once does, and every path reads a text to the same tokens."""
    text = unicodedata.normalize("NFC", text)
    return unicodedata.normalize("NFC", text.lower()) if lowercase else text


def _spaced(before: str | None, prev: str, tok: str, after: str | None = None) -> bool:
    """Whether word-level text puts a space between the tokens `prev` and `tok` (`before` precedes `prev`,
    `after` follows `tok`; straight quotes are Tokenizer.join's). Each rule leaves out only a space that
    `split` does not need: CJK characters and punctuation are tokens of their own whatever follows them, so
    `split(join(t)) == t` holds."""
    if tok[0] in _NO_SPACE_BEFORE or prev[-1] in _NO_SPACE_AFTER:
        return False
    if (tok in _JOINERS and prev[-1].isalnum() and after is not None and after[0].isalnum()) or (
            prev in _JOINERS and before is not None and before[-1].isalnum() and tok[0].isalnum()):
        return False
    if prev in _CURRENCY and tok[0].isdigit():
        return False
    cjk_prev, cjk_tok = bool(_IS_CJK.match(prev)), bool(_IS_CJK.match(tok))
    if (cjk_prev and cjk_tok) or _IS_WIDE_PUNCT.match(prev) or _IS_WIDE_PUNCT.match(tok):
        return False
    if (cjk_prev and tok in _CJK_COMPANIONS) or (cjk_tok and prev in _CJK_COMPANIONS) or prev == tok == "—":
        return False
    # inside a number: a decimal point (3.14), a time's colons (10:30, 1:05:22), a thousands comma (1,000 and
    # 12,345,678; not a list 1, 2, 3, nor "In 1999, 100 people")
    if before is not None and prev in ".:," and before.isdigit() and tok.isdigit():
        if prev == ".":
            return False
        if prev == ":":
            return not (len(before) <= 2 and len(tok) == 2)
        return not (len(before) <= 3 and before[0] != "0" and len(tok) == 3)
    return True


def normalises_across(a: str, b: str, lowercase: bool = False) -> bool:
    """Whether normalising a + b gives other text than normalising each (NFC composing a letter with the mark
    after it, or Hangul jamo; lowercasing, a capital sigma written final or not by what follows it): a cut, or
    a space, between the two changes the tokens."""
    return normalize(a + b, lowercase) != normalize(a, lowercase) + normalize(b, lowercase)


def _opens(quote: str, prev: str | None, after: str | None, seen: int) -> bool:
    """Whether a straight quote between the tokens `prev` and `after` opens (no space after it) rather than
    closes (no space before it), `seen` of the same quote having come before it in the line: where the count
    is even, unless nothing follows it; a ' also where a word follows it but none precedes it (and the
    reverse: it closes)."""
    if after is None:
        return False
    word_before, word_after = prev is not None and prev[-1].isalnum(), after[0].isalnum()
    return seen % 2 == 0 if quote == '"' or word_before == word_after else word_after


@dataclass
class Tokenizer:
    """Splits a line of text into token strings and joins tokens back into text."""

    level: str = "char"
    lowercase: bool = False
    word_split: str = "punct"

    def split(self, line: str) -> list[str]:
        """Tokens of one line (no `<eos>`); the line must not contain a newline."""
        return list(self.iter_split(line))

    def iter_split(self, line: str) -> Iterator[str]:
        """The tokens of `split`, produced piece by piece so that a huge line needs little memory."""
        line = normalize(line, self.lowercase)
        if self.level == "char":
            return iter(line)  # the characters themselves, without a generator between
        return self._iter_words(line)

    def _iter_words(self, line: str) -> Iterator[str]:
        for piece in _pieces(line):
            yield from (piece.split() if self.word_split == "space" else _WORD_RE.findall(piece))

    def iter_split_lines(self, text: str, eos: bool = False) -> Iterator[list[str]]:
        """Word level: the tokens of a text of many lines, those of `split` for each line in turn, and with `eos`
        an `<eos>` after each line that a '\\n' ends (a last line without one gets none), in lists of about
        PIECE_CHARS characters' worth. One pass over the whole text instead of a call per line, which cost
        most of the time on short lines (docs/benchmarks-history.md, "Word-level tokenizing")."""
        if self.level != "word":
            raise ValueError("iter_split_lines splits words; a character line is its own tokens")
        # normalising the whole text gives what normalising each line does: nothing joins across a '\n'
        text = normalize(text, self.lowercase)
        for piece in _pieces(text, PIECE_CHARS):  # cut just after white space: no token, no '\n' cut in two
            if self.word_split == "space":
                # a literal <eos> word is the line end it names (README), so a line end may be written as one
                yield (piece.replace("\n", f" {EOS} ") if eos else piece).split()
            elif eos:
                yield [EOS if tok == "\n" else tok for tok in _LINE_END_OR_WORD_RE.findall(piece)]
            else:
                yield _WORD_RE.findall(piece)

    def join(self, tokens: Iterable[str], context: Sequence[str] = ()) -> str:
        """Text from tokens, such that `split(join(t)) == t` for tokens that `split` produces. `context`: the
        tokens of the line written just before these (a prime's); the text then continues it, beginning with
        the space that joins the two, if any, and spaced as if it had been joined with them (10 + :30)."""
        tokens = list(tokens)
        if self.level == "char":
            return "".join(tokens)
        if self.word_split == "space":
            return (" " if context and tokens else "") + " ".join(tokens)
        out: list[str] = []
        before, prev = ([None, None] + list(context[-2:]))[-2:]
        seen = {q: sum(1 for t in context if t == q) for q in _STRAIGHT_QUOTES}  # straight quotes so far
        # whether prev is a straight quote that opens (the context's last token: as the first token decides)
        opened = prev in _STRAIGHT_QUOTES and _opens(prev, before, tokens[0] if tokens else None, seen[prev] - 1)
        for i, tok in enumerate(tokens):
            after = tokens[i + 1] if i + 1 < len(tokens) else None
            if tok in _STRAIGHT_QUOTES:
                opens = _opens(tok, prev, after, seen[tok])
                seen[tok] += 1
                space = prev is not None and not opened and opens and prev[-1] not in _NO_SPACE_AFTER \
                    and not _IS_WIDE_PUNCT.match(prev)
            else:
                opens = False
                space = prev is not None and not opened and _spaced(before, prev, tok, after)
            if not space and prev is not None and normalises_across(prev[-1], tok[0]):
                space = True  # か + U+3099 would be read back as が: one token, not two
            if space:
                out.append(" ")
            out.append(tok)
            opened, before, prev = opens, prev, tok
        return "".join(out)

    def lines(self, text: str) -> list[str]:
        """Lines of a text: split at '\\n', a trailing '\\r' removed, no empty last line after a final newline."""
        parts = text.split("\n")
        if parts and parts[-1] == "":
            parts.pop()
        return [p[:-1] if p.endswith("\r") else p for p in parts]

    def to_dict(self) -> dict:
        return {"level": self.level, "lowercase": self.lowercase, "word_split": self.word_split}

    def describe(self) -> dict:
        """How to split text as `split` does without charlm: normalise (NFC; if asked, then lowercase and NFC
        again), then take every match of `pattern` (None: each character at char level, white-space split at
        `space`)."""
        pattern = _WORD_RE.pattern if self.level == "word" and self.word_split == "punct" else None
        return {**self.to_dict(), "normalization": "NFC", "pattern": pattern, "pattern_syntax": "python-re"}


@dataclass
class Vocabulary:
    """Token strings <-> integer ids. Ids 0 and 1 are always `<unk>` and `<eos>`."""

    tokens: list[str] = field(default_factory=lambda: list(SPECIALS))

    def __post_init__(self) -> None:
        if tuple(self.tokens[:2]) != SPECIALS:
            raise UsageError("vocabulary: the first two tokens must be <unk> and <eos>")
        self.index = {tok: i for i, tok in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise UsageError("vocabulary: a token appears twice")

    def __len__(self) -> int:
        return len(self.tokens)

    def id(self, token: str) -> int:
        return self.index.get(token, UNK_ID)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        return list(map(self.index.get, tokens, repeat(UNK_ID)))  # index.get(t, UNK_ID) for each t

    def decode(self, ids: Iterable[int]) -> list[str]:
        return list(map(self.tokens.__getitem__, ids))

    @classmethod
    def build(cls, counts: Counter, min_freq: int = 1, max_size: int | None = None) -> "Vocabulary":
        """Most frequent first (ties in code-point order of the token), cut by min_freq and max_size.

        The order depends only on the counts, so a streaming count and an
        in-memory count of the same text give the same vocabulary.
        """
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        kept = [tok for tok, n in ranked if n >= min_freq and tok not in SPECIALS]
        if max_size is not None:
            kept = kept[: max(0, max_size - len(SPECIALS))]
        return cls(list(SPECIALS) + kept)


@dataclass
class Encoded:
    """A text turned into ids: every line's tokens then `<eos>`, and how many were `<unk>`."""

    ids: list[int]
    unk_count: int
    lines: int


class TextCodec:
    """A Tokenizer and a Vocabulary together: the one way text becomes ids and back."""

    def __init__(self, tokenizer: Tokenizer, vocab: Vocabulary):
        self.tokenizer = tokenizer
        self.vocab = vocab

    def encode_line(self, line: str) -> list[int]:
        return self.vocab.encode(self.tokenizer.iter_split(line))

    def encode_text(self, text: str) -> Encoded:
        ids: list[int] = []
        lines = self.tokenizer.lines(text)
        for line in lines:
            ids.extend(self.encode_line(line))
            ids.append(EOS_ID)
        return Encoded(ids, sum(1 for i in ids if i == UNK_ID), len(lines))

    def decode(self, ids: Iterable[int], context: Sequence[str] = ()) -> str:
        """Text of ids; `<eos>` becomes a newline. `context`: the tokens written before them on their first
        line (Tokenizer.join)."""
        out, line = [], []
        for i in ids:
            if i == EOS_ID:
                out.append(self.tokenizer.join(line, context) + "\n")
                line, context = [], ()
            else:
                line.append(self.vocab.tokens[i])
        out.append(self.tokenizer.join(line, context))
        return "".join(out)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    def to_json(self) -> str:
        payload = {"format": VOCAB_FORMAT, "tokenizer": self.tokenizer.to_dict(), "tokens": self.vocab.tokens}
        return json.dumps(payload, ensure_ascii=False, indent=0)

    @classmethod
    def load(cls, path: Path) -> "TextCodec":
        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"vocabulary file not found: {path}") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"vocabulary file {path} is not valid JSON: {exc}") from None
        if not isinstance(payload, dict) or payload.get("format") != VOCAB_FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else None
            raise UsageError(f"vocabulary file {path} has format {found!r}; this charlm reads format {VOCAB_FORMAT}")
        tok = payload.get("tokenizer", {})
        tokens = payload.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise UsageError(f"vocabulary file {path}: 'tokens' must be a list of strings")
        try:
            tokenizer = Tokenizer(level=tok["level"], lowercase=tok["lowercase"], word_split=tok["word_split"])
        except (KeyError, TypeError):
            raise UsageError(f"vocabulary file {path}: 'tokenizer' must give level, lowercase, word_split") from None
        if (tokenizer.level not in ("char", "word") or tokenizer.word_split not in ("punct", "space")
                or not isinstance(tok["lowercase"], bool)):  # "false" in quotes is no false: not read as true
            raise UsageError(f"vocabulary file {path}: unknown tokenizer settings {tok}")
        return cls(tokenizer, Vocabulary(tokens))


def count_tokens(tokenizer: Tokenizer, text: str) -> Counter:
    """Token frequencies of a text, `<eos>` not included; line ends ('\n', '\r') are never tokens."""
    counts: Counter = Counter()
    if tokenizer.level == "char":
        counts.update(normalize(text, tokenizer.lowercase))
        counts.pop("\n", None)
        counts.pop("\r", None)
        return counts
    for line in tokenizer.lines(text):
        counts.update(tokenizer.iter_split(line))
    return counts
