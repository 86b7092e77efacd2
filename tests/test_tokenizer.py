"""Tokenizer and Vocabulary: round trips, Unicode, <unk> / <eos>, limits, JSON."""

from __future__ import annotations

import json
import random
import unicodedata
from collections import Counter

import pytest

from charlm import tokenizer as tokenizer_module
from charlm.errors import UsageError
from charlm.tokenizer import (EOS, EOS_ID, PIECE_CHARS, UNK, UNK_ID, TextCodec, Tokenizer, Vocabulary,
                              count_tokens, normalize)

MIXED = "Hello, world! 你好，世界。 Emoji 😀👍🏽 and café.\n北京欢迎你 🐍\nlast line"


def codec_for(text: str, level: str = "char", **kw) -> TextCodec:
    tokenizer = Tokenizer(level, **kw)
    return TextCodec(tokenizer, Vocabulary.build(count_tokens(tokenizer, text)))


# ---------------------------------------------------------------- round trips
def test_char_round_trip_keeps_cjk_and_emoji():
    codec = codec_for(MIXED)
    encoded = codec.encode_text(MIXED)
    assert encoded.unk_count == 0
    assert encoded.lines == 3
    assert codec.decode(encoded.ids) == MIXED + "\n"  # every line ends with <eos>, decoded as '\n'


def test_char_level_splits_astral_emoji_into_one_token_each():
    tokens = Tokenizer("char").split("a😀🐍b")
    assert tokens == ["a", "😀", "🐍", "b"]


def test_word_round_trip_keeps_cjk_and_emoji():
    # Word level joins tokens with the usual spacing, so the text is written that way
    # (adjacent emoji would come back separated by a space).
    text = "Hello, world! 你好，世界。Emoji 😀 and café.\n北京欢迎你 🐍\nlast line"
    codec = codec_for(text, "word")
    encoded = codec.encode_text(text)
    assert encoded.unk_count == 0
    assert codec.decode(encoded.ids) == text + "\n"


@pytest.mark.parametrize("text", [
    "Hello, world! don't stop.",
    "I love 北京.",
    "(quoted) \"x\" 3.14 <unk> café",
    "東京は日本の首都です。",
    "emoji 😀 inside 👍🏽 text!",
    "他说：“今天很好。”我同意——‘好’的意思……列夫·托尔斯泰",
    "价格是 5.5 元，10:30 到，共 1,000 人，编号 1, 2, 3; in 2019. 5 more",
])
def test_word_split_of_join_gives_the_tokens_back(text):
    tok = Tokenizer("word")
    tokens = tok.split(text)
    assert tok.split(tok.join(tokens)) == tokens


def test_word_level_join_writes_chinese_punctuation_without_spaces():
    """Full-width punctuation takes no space on either side, and quotes, dashes, ellipses and the name dot
    none next to a CJK character; a Latin word or a number keeps its spaces (the style of mixed text)."""
    tok = Tokenizer("word")
    for text in ["他说：“今天很好。”我同意。", "‘好’的意思", "他——我……", "列夫·托尔斯泰",
                 "会说 English，因为 App 好用", "我有 65 本书", "Hello, world! 你好，世界。Emoji"]:
        assert tok.join(tok.split(text)) == text
    # the ideographic zero and the iteration marks are no punctuation: a Latin word beside them keeps its space
    assert tok.join(tok.split("〇 and 々 English")) == "〇 and 々 English"
    # the same narrow punctuation keeps English spacing when no CJK character is next to it
    assert tok.join(tok.split("he said “hi” — and ‘yes’ (ok)")) == "he said “hi” — and ‘yes’ (ok)"


def test_word_level_join_keeps_numbers_whole():
    """A decimal point, a time's colon and a thousands comma between digits take no space; a list does."""
    tok = Tokenizer("word")
    assert tok.split("3.14") == ["3", ".", "14"]  # split apart, joined back whole
    for text in ["pi is 3.14 or so", "at 10:30 sharp", "1,000 or 12,345,678 people", "items 1, 2, 3",
                 "In 1999, 100 people", "Chapter 3: 100 ways", "at 1:05:22"]:
        assert tok.join(tok.split(text)) == text


def test_word_level_makes_each_cjk_character_a_token():
    tok = Tokenizer("word")
    assert tok.split("我爱北京天安门") == ["我", "爱", "北", "京", "天", "安", "门"]
    assert tok.split("I love 北京, ok?") == ["I", "love", "北", "京", ",", "ok", "?"]


def test_the_ideographic_space_separates_words_and_is_never_a_token():
    for split in ("punct", "space"):
        tok = Tokenizer("word", word_split=split)
        tokens = tok.split("你好\u3000世界\u3000ok")
        assert "\u3000" not in tokens and tokens[-1] == "ok", split
        assert tok.split(tok.join(tokens)) == tokens
    assert Tokenizer("word").split("你好\u3000世界") == ["你", "好", "世", "界"]
    assert Tokenizer("char").split("你\u3000好") == ["你", "\u3000", "好"]  # characters are all kept


def test_word_level_splits_punctuation_but_keeps_inner_apostrophes():
    assert Tokenizer("word").split("Don't, (stop)!") == ["Don't", ",", "(", "stop", ")", "!"]


def test_word_level_keeps_a_literal_unk_as_one_token_mapped_to_unk_id():
    codec = codec_for("a <unk> b", "word")
    assert codec.tokenizer.split("a <unk> b") == ["a", UNK, "b"]
    assert codec.encode_line("a <unk> b") == [codec.vocab.id("a"), UNK_ID, codec.vocab.id("b")]
    assert codec.vocab.tokens.count(UNK) == 1


def test_space_split_reads_a_literal_eos_word_as_the_line_end_it_names():
    """As the README says: with word_split: space a literal <eos> is the end-of-line token, in the vocabulary
    count, the encoder of train and eval, and score alike (with punct it is three tokens: <, eos, >)."""
    codec = codec_for("a <eos> b\nb a\n", "word", word_split="space")
    assert codec.vocab.tokens.count(EOS) == 1
    assert codec.encode_line("a <eos> b") == [codec.vocab.id("a"), EOS_ID, codec.vocab.id("b")]
    assert codec_for("a <eos> b", "word").tokenizer.split("a <eos> b") == ["a", "<", "eos", ">", "b"]


def test_space_split_splits_on_white_space_only():
    tok = Tokenizer("word", word_split="space")
    assert tok.split("a,b  c. 北京") == ["a,b", "c.", "北京"]
    assert tok.join(["a,b", "c."]) == "a,b c."


def test_lowercase_option_lowercases_before_splitting():
    tok = Tokenizer("word", lowercase=True)
    assert tok.split("The CAT") == ["the", "cat"]


# ---------------------------------------------------------------- Unicode normalisation
@pytest.mark.parametrize("text, lowered", [
    ("T\u0308est", "\u1e97est"),            # no composed capital T with diaeresis; its small letter is U+1E97
    ("\u0399\u0308\u0301", "\u0390"),       # capital iota, diaeresis, acute: lowered and composed to U+0390
    ("Caf\u00c9", "caf\u00e9"),
])
def test_lowercasing_is_normalised_again_so_that_normalising_twice_gives_what_once_does(text, lowered):
    """Catches: NFC before lowering only, so that the lowered text was not NFC ("t" + U+0308) and the paths
    that normalise twice (the streaming vocabulary count, train's and eval's encoder) read other tokens than
    those that normalise once (score, sample's prime): the same line scored 6 tokens, 3 of them <unk>, and
    evaluated as 4 known ones."""
    once = normalize(text, lowercase=True)
    assert once == lowered and normalize(once, lowercase=True) == once
    tok = Tokenizer("word", lowercase=True, word_split="space")
    assert tok.split(text) == tok.split(once) == [lowered]


def test_nfc_makes_composed_and_decomposed_accents_the_same_token():
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert composed != decomposed and normalize(decomposed) == composed
    for level in ("char", "word"):
        codec = codec_for(composed, level)
        assert codec.encode_line(decomposed) == codec.encode_line(composed)
        assert UNK_ID not in codec.encode_line(decomposed)


@pytest.mark.parametrize("lowercase", [False, True])
def test_char_encode_line_gives_the_ids_of_the_split_tokens(lowercase):
    # Vocabulary.encode maps the tokenizer's iterator (a character line's own) through the dict: the ids
    # of the tokens that split gives, one by one
    codec = codec_for("Hello 你好 caf\u00e9 😀", lowercase=lowercase)
    lines = ["", "Hello", "HELLO 你好 😀", "cafe\u0301 CAF\u00c9", "unseen: Zß🐍\t", "<unk>", MIXED.split("\n")[0]]
    for line in lines:
        ids = codec.encode_line(line)
        assert ids == [codec.vocab.id(t) for t in codec.tokenizer.split(line)]
        assert all(isinstance(i, int) for i in ids)
    assert codec.encode_line("Z")[0] == UNK_ID
    assert (codec.encode_line("H") == codec.encode_line("h")) == lowercase


def test_vocabulary_is_built_from_nfc_text():
    counts = count_tokens(Tokenizer("char"), "e\u0301e\u0301")
    assert counts == Counter({"\u00e9": 2})
    assert all(unicodedata.is_normalized("NFC", t) for t in counts)


# ---------------------------------------------------------------- <unk> and <eos>
def test_specials_have_fixed_ids():
    vocab = Vocabulary.build(Counter("abc"))
    assert vocab.tokens[:2] == [UNK, EOS]
    assert (vocab.id(UNK), vocab.id(EOS)) == (UNK_ID, EOS_ID) == (0, 1)


def test_unknown_input_maps_to_unk_and_is_counted():
    codec = codec_for("abc")
    encoded = codec.encode_text("abz\nyy\n")
    a, b = codec.vocab.id("a"), codec.vocab.id("b")
    assert encoded.ids == [a, b, UNK_ID, EOS_ID, UNK_ID, UNK_ID, EOS_ID]
    assert encoded.unk_count == 3
    assert encoded.lines == 2


def test_unknown_words_map_to_unk_at_word_level():
    codec = codec_for("the cat", "word")
    encoded = codec.encode_text("the dog 狗")
    assert encoded.ids == [codec.vocab.id("the"), UNK_ID, UNK_ID, EOS_ID]
    assert encoded.unk_count == 2


def test_every_line_ends_with_eos_whatever_the_line_endings():
    codec = codec_for("ab")
    for text in ("a\nb\n", "a\nb", "a\r\nb\r\n", "a\r\nb"):
        assert codec.encode_text(text).ids == [codec.vocab.id("a"), EOS_ID, codec.vocab.id("b"), EOS_ID]


def test_empty_lines_are_just_eos():
    codec = codec_for("a")
    assert codec.encode_text("\n\na\n").ids == [EOS_ID, EOS_ID, codec.vocab.id("a"), EOS_ID]
    assert codec.encode_text("").ids == []


def test_decode_turns_eos_into_newlines():
    codec = codec_for("ab")
    a, b = codec.vocab.id("a"), codec.vocab.id("b")
    assert codec.decode([a, EOS_ID, b]) == "a\nb"
    assert codec.decode([a, UNK_ID]) == "a" + UNK


# ---------------------------------------------------------------- vocabulary limits
def test_vocabulary_orders_by_frequency_then_first_appearance():
    vocab = Vocabulary.build(Counter("cbbaaa" + "d"))  # a:3 b:2 c:1 d:1, c before d
    assert vocab.tokens == [UNK, EOS, "a", "b", "c", "d"]


def test_min_freq_drops_rare_tokens():
    vocab = Vocabulary.build(Counter("aaabbc"), min_freq=2)
    assert vocab.tokens == [UNK, EOS, "a", "b"]
    assert vocab.id("c") == UNK_ID


def test_max_size_counts_the_specials():
    vocab = Vocabulary.build(Counter("aaaabbbccd"), max_size=4)
    assert len(vocab) == 4
    assert vocab.tokens == [UNK, EOS, "a", "b"]


def test_max_size_and_min_freq_together():
    vocab = Vocabulary.build(Counter("aaaabbbccd"), min_freq=2, max_size=10)
    assert vocab.tokens == [UNK, EOS, "a", "b", "c"]


def test_specials_in_the_counts_are_not_added_twice():
    vocab = Vocabulary.build(Counter({UNK: 9, EOS: 9, "x": 1}))
    assert vocab.tokens == [UNK, EOS, "x"]


def test_vocabulary_refuses_missing_specials_or_duplicates():
    with pytest.raises(UsageError):
        Vocabulary(["a", UNK, EOS])
    with pytest.raises(UsageError):
        Vocabulary([UNK, EOS, "a", "a"])


def test_count_tokens_at_char_level_ignores_line_ends():
    counts = count_tokens(Tokenizer("char"), "ab\r\nb\n")
    assert counts == Counter({"a": 1, "b": 2})


# ---------------------------------------------------------------- JSON
def test_vocab_json_round_trip(tmp_path):
    codec = codec_for(MIXED, "word", lowercase=True)
    path = tmp_path / "vocab.json"
    codec.save(path)
    loaded = TextCodec.load(path)
    assert loaded.vocab.tokens == codec.vocab.tokens
    assert loaded.tokenizer == codec.tokenizer
    assert loaded.encode_text(MIXED).ids == codec.encode_text(MIXED).ids
    assert "你" in path.read_text(encoding="utf-8")  # stored as text, not \\u escapes


def test_vocab_json_with_another_format_is_refused(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"format": 99, "tokens": [UNK, EOS]}), encoding="utf-8")
    with pytest.raises(UsageError, match="format"):
        TextCodec.load(path)


@pytest.mark.parametrize("content", ["not json", json.dumps({"format": 1, "tokens": "abc",
                                                             "tokenizer": {"level": "char"}}),
                                     json.dumps({"format": 1, "tokens": [UNK, EOS],
                                                 "tokenizer": {"level": "bytes", "lowercase": False,
                                                               "word_split": "punct"}})])
def test_broken_vocab_json_is_a_usage_error(tmp_path, content):
    path = tmp_path / "vocab.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UsageError) as info:
        TextCodec.load(path)
    assert info.value.exit_code == 2


def test_missing_vocab_json_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        TextCodec.load(tmp_path / "nope.json")


def test_word_level_join_puts_no_space_after_an_opening_bracket_or_quote():
    """Catches: the _NO_SPACE_AFTER rule dropped: '( quoted)'; split(join(t)) == t still held."""
    tok = Tokenizer("word")
    assert tok.join(["(", "quoted", ")", "and", "[", "x", "]"]) == "(quoted) and [x]"
    assert tok.join(["¿", "Qué", "?"]) == "¿Qué?"
    assert tok.join(["«", "oui", "»"]) == "«oui»"
    assert tok.join(["“", "hi", "”"]) == "“hi”"


def test_word_split_keeps_inner_apostrophes_both_straight_and_curly_and_splits_hyphens_and_decimal_points():
    """Catches: the curly apostrophe ’ dropped from the word pattern (don’t -> don ’ t), and '-' or '.' let into
    words (well-known, 3.14 as one token each)."""
    tok = Tokenizer("word")
    assert tok.split("don't don’t rock’n’roll") == ["don't", "don’t", "rock’n’roll"]
    assert tok.split("well-known 3.14 e-mail") == ["well", "-", "known", "3", ".", "14", "e", "-", "mail"]
    assert tok.split("’tis 'quoted'") == ["’", "tis", "'", "quoted", "'"]  # joins only between letters


def test_lowercase_lowers_without_case_folding():
    """Catches: normalize using str.casefold, which turns ß into ss (and so changes a word's characters and a
    character model's text length), where the option promises lowercasing."""
    assert Tokenizer("word", lowercase=True).split("Straße STRASSE") == ["straße", "strasse"]
    assert Tokenizer("char", lowercase=True).split("ẞß") == ["ß", "ß"]


@pytest.mark.parametrize("tokenizer, tokens", [
    ({"level": "word", "lowercase": False, "word_split": "regex"}, [UNK, EOS, "a"]),
    ({"level": "char", "lowercase": False, "word_split": "punct"}, [UNK, EOS, 5]),
    # a hand-edited "false" in quotes was read as true (bool of a non-empty string): every text lowercased
    ({"level": "char", "lowercase": "false", "word_split": "punct"}, [UNK, EOS, "a"]),
], ids=["unknown-word-split", "token-not-a-string", "lowercase-not-a-bool"])
def test_a_vocab_json_with_an_unknown_word_split_or_a_token_that_is_not_a_string_is_refused(tmp_path, tokenizer,
                                                                                           tokens):
    """Catches: TextCodec.load no longer checking word_split (an unknown one silently split with the punct
    pattern) or the tokens' type (an int token loaded, to fail later in decode or join)."""
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"format": 1, "tokenizer": tokenizer, "tokens": tokens}), encoding="utf-8")
    with pytest.raises(UsageError) as info:
        TextCodec.load(path)
    assert info.value.exit_code == 2


# Kills tokenizer.py:57 (the piece cut searched for any character instead of white space, splitting a word).
@pytest.mark.parametrize("word_split", ["punct", "space"])
def test_a_line_longer_than_a_piece_gives_the_same_words(word_split):
    n = PIECE_CHARS // 8 + 100  # 8 characters a word: a piece boundary falls on the first letter of a word
    line = "abcdefg " * n
    assert Tokenizer("word", word_split=word_split).split(line) == ["abcdefg"] * n


# Kills tokenizer.py:155 (sort key `(-count, token)` -> `-count`: ties kept in first-appearance order).
def test_vocabulary_ties_are_ordered_by_code_point_not_by_first_appearance():
    vocab = Vocabulary.build(Counter("bbaa" + "dc"))  # b, a seen first; d before c
    assert vocab.tokens == [UNK, EOS, "a", "b", "c", "d"]


# Kills tokenizer.py:236 (char-level count_tokens ignoring `lowercase`: upper-case letters in the vocabulary).
def test_char_level_counts_lowercase_the_text_when_asked():
    assert count_tokens(Tokenizer("char", lowercase=True), "AbA\nB\n") == Counter({"a": 2, "b": 2})


@pytest.mark.parametrize("split", ["punct", "space"])
def test_join_with_a_context_continues_it_as_one_join_of_both(split):
    """join(tail, context=head) is how join(head + tail) ends: the joining space, numbers cut between the two
    written as one, straight quotes counted over both (a sample's continuation of its prime, shown as typed)."""
    tokenizer = Tokenizer("word", word_split=split)
    lines = ["the train leaves at 10:30 and costs $3.14 , or 1,000 yen .", "a b", "in 1999, 100 people",
             'he said "well-known" and \'tis o\' the night']
    pool = ["a", "word", "3", "14", '"', "'", "-", "/", "$", ".", ",", ":", "(", "“", "”", "中", "，", "—",
            "1999", "か", "\u3099"]  # a kana and the sound mark that NFC composes with it
    rng = random.Random(0)
    cases = [tokenizer.split(line) for line in lines] + [rng.choices(pool, k=rng.randint(2, 8)) for _ in range(3000)]
    for tokens in cases:
        whole = tokenizer.join(tokens)
        assert tokenizer.split(whole) == tokens or split == "space"
        for cut in range(1, len(tokens)):
            head, tail = tokens[:cut], tokens[cut:]
            end = tokenizer.join(tail, context=head)
            assert whole.endswith(end) and (end.startswith(" ") or not whole[:-len(end)].endswith(" ")), \
                (tokens, cut)
    assert Tokenizer("char").join(list("bc"), context=["a"]) == "bc"


def test_word_level_join_writes_hyphens_slashes_currency_and_straight_quotes_as_text_does():
    """Catches: 'well - known', 'and / or', '$ 3.14', an opening ' glued to the word before it ("or' x'") and
    a straight " spaced on both sides; the spacing is a guess from the tokens, and split(join(t)) == t."""
    tok = Tokenizer("word")
    for text in ["A well-known e-mail costs $3.14 and/or 'elsewhere' today.", 'he said "hello there" and left',
                 "and 'tis o' the night", "between 1999-2000, call 555-1234 or #1", '("hi")', "it's done",
                 'say "" ok']:
        tokens = tok.split(text)
        assert tok.join(tokens) == text and tok.split(tok.join(tokens)) == tokens
    assert tok.join(tok.split("x - 5")) == "x-5"  # a spaced hyphen between words reads as a hyphen
    assert tok.join(tok.split("and - y")) == "and-y"


# ---------------------------------------------------------------- many lines in one pass
# White space of every kind inside lines (U+3000, U+2028, NEL and U+001F, which str.split cuts at too, a tab),
# CRLF, a lone CR, empty and blank lines, a literal <unk> and <eos>, apostrophes, CJK, an accent and Hangul jamo
# that NFC composes, capital sigmas and a dotted capital I that lowercasing changes, no final newline.
MANY_LINES = ("Hello, world!\r\nÉte\u0301 don't ’tis\n\n中文。 a\u3000b\u2028c\x85d\x1fe\tf\n <unk> <eos> a<eos>b\r"
              "x\rΟΔΟΣ ΣΑΣ İstanbul\n\u1100\u1161\u11a8 e\u0301\r\n\n  \t \nlast")
# what random texts are drawn from: the characters above, and words that split differently by mode
LINE_ALPHABET = ["a", "b", "Σ", "İ", "e", "\u0301", "\u0308", "T", "é", "\u1100", "\u1161", "\u11a8", "中", "。",
                 "'", "’", ",", "_", "1", "😀", " ", " ", "\u3000", "\u2028", "\x85", "\x1f", "\t", "\n", "\n",
                 "\r", "<unk>", "<eos>", "don't", "<"]


def random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(LINE_ALPHABET, k=rng.randint(0, 60))) for _ in range(count)]


def split_each_line(tok: Tokenizer, text: str, eos: bool) -> list[str]:
    """What iter_split_lines gives, the plain way: `split` of each line, and `<eos>` for each '\n'."""
    out: list[str] = []
    for i, line in enumerate(text.split("\n")):
        if eos and i:
            out.append(EOS)
        out += tok.split(line)
    return out


@pytest.mark.parametrize("eos", [False, True])
@pytest.mark.parametrize("lowercase", [False, True])
@pytest.mark.parametrize("word_split", ["punct", "space"])
def test_splitting_many_lines_at_once_gives_the_tokens_of_each_line_and_its_eos(monkeypatch, word_split, lowercase,
                                                                                  eos):
    """Catches a line end dropped or doubled, a piece cut inside a word, a text not normalised, a literal <eos>
    read as a line end where it is not one (punct) or the reverse (space)."""
    tok = Tokenizer("word", lowercase=lowercase, word_split=word_split)
    texts = [MANY_LINES, MANY_LINES * 3, "", "\n", "\n\n", "a\n", "\na"] + random_texts(300)
    for piece_chars in (1, 2, 5, 16, PIECE_CHARS):  # the pieces that a long text is split in, cut everywhere
        monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", piece_chars)
        for text in texts:
            got = [t for tokens in tok.iter_split_lines(text, eos) for t in tokens]
            assert got == split_each_line(tok, text, eos), (piece_chars, text)


@pytest.mark.parametrize("word_split", ["punct", "space"])
def test_splitting_many_lines_at_once_holds_a_piece_of_tokens_at_a_time(monkeypatch, word_split):
    monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", 12)
    lists = list(Tokenizer("word", word_split=word_split).iter_split_lines("ab cd\n" * 100, eos=True))
    assert sum(map(len, lists)) == 300 and max(map(len, lists)) <= 8  # 12 characters and a word


def test_splitting_many_lines_at_once_is_for_words_only():
    with pytest.raises(ValueError):
        next(Tokenizer("char").iter_split_lines("ab\n"))
