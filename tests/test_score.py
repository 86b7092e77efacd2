"""Sentence scores and corpus evaluation: exact probabilities under the <eos>-start convention."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from charlm.config import ModelConfig
from charlm.data import char_count
from charlm.errors import UsageError
from charlm.model import build_model
from charlm.score import evaluate_file, score_sentences, score_totals
from charlm.tokenizer import EOS_ID, UNK_ID, TextCodec, Tokenizer, Vocabulary, count_tokens
from conftest import char_codec, random_model


def prefix_logprobs(model, prefixes: list[list[int]]) -> torch.Tensor:
    """ln P(prefix) of equal-length id sequences that do not end the text: the model read from <eos>."""
    ids = torch.tensor(prefixes, dtype=torch.long)  # (N, n)
    inputs = torch.cat([torch.full((len(prefixes), 1), EOS_ID), ids[:, :-1]], dim=1)
    with torch.no_grad():
        logits, _ = model(inputs)
    logp = torch.log_softmax(logits.double(), dim=-1).gather(2, ids.unsqueeze(2)).squeeze(2)
    return logp.sum(dim=1)


@pytest.mark.parametrize("impl", ["torch", "custom"])
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_score_probabilities_sum_to_one(cell, impl):
    """Over the vocabulary <unk>, <eos>, a, b: every string of length <= L, plus P(length > L), sums to 1.

    A text can hold <unk> too, so the strings run over a, b and x, a character
    outside the vocabulary that the codec reads as <unk>.
    """
    L = 5
    model = random_model(cell, impl)
    with torch.no_grad():
        model.decoder.bias[EOS_ID] -= 1.0  # longer strings, so that P(length > L) is not negligible
    codec = char_codec("ab")
    assert codec.encode_line("x") == [UNK_ID]
    strings = ["".join(s) for n in range(L + 1) for s in itertools.product("abx", repeat=n)]
    scores = score_sentences(model, codec, strings, batch_size=50)
    assert [s.text for s in scores] == strings
    p_stopped = math.fsum(math.exp(s.logprob) for s in scores)
    # P(length > L): the first L + 1 tokens are all a, b or <unk>, whatever follows.
    longer = [list(p) for p in itertools.product([UNK_ID, 2, 3], repeat=L + 1)]
    p_longer = float(prefix_logprobs(model, longer).exp().sum())
    assert 0.01 < p_longer < 0.99 and 0.01 < p_stopped < 0.99  # both parts matter
    assert p_stopped + p_longer == pytest.approx(1.0, abs=1e-5)


def test_score_is_the_sum_of_next_token_log_probabilities_from_eos():
    model = random_model()
    codec = char_codec("ab")
    (result,) = score_sentences(model, codec, ["abba"])
    ids = [2, 3, 3, 2]
    with torch.no_grad():
        logits, _ = model(torch.tensor([[EOS_ID] + ids]))
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    expected = [float(logp[t, tok]) for t, tok in enumerate(ids + [EOS_ID])]
    assert result.tokens == ["a", "b", "b", "a", "<eos>"]
    assert result.token_logprobs == pytest.approx(expected, abs=1e-6)
    assert result.logprob == pytest.approx(sum(expected), abs=1e-6)


def test_empty_sentence_is_the_probability_of_eos_after_eos():
    model = random_model()
    (result,) = score_sentences(model, char_codec("ab"), [""])
    with torch.no_grad():
        logits, _ = model(torch.tensor([[EOS_ID]]))
    assert result.tokens == ["<eos>"]
    assert result.logprob == pytest.approx(float(torch.log_softmax(logits[0, 0].double(), -1)[EOS_ID]), abs=1e-6)


def test_batch_size_and_padding_do_not_change_scores():
    model = random_model(cell="gru", impl="custom")
    codec = char_codec("ab")
    sentences = ["", "a", "abbab", "bbbbbbbbba", "xa", "ab"]
    one_at_a_time = [score_sentences(model, codec, [s])[0].logprob for s in sentences]
    for batch_size in (1, 2, 128):
        together = [r.logprob for r in score_sentences(model, codec, sentences, batch_size=batch_size)]
        assert together == pytest.approx(one_at_a_time, abs=1e-5)


@pytest.mark.parametrize("impl", ["torch", "custom"])
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_a_batch_read_in_windows_with_finished_rows_leaving_scores_as_in_one_piece(cell, impl):
    """Catches: a long line's scores or its short neighbours' changing when a batch is read a few time steps
    at a time (the state carried across windows, the rows whose line has ended dropped from it)."""
    model = random_model(cell, impl)
    codec = char_codec("ab")
    sentences = ["", "a", "ab", "abbab", "ba" * 9, "bab" * 15, "xab" * 40]
    whole = [r.token_logprobs for r in score_sentences(model, codec, sentences)]
    assert max(len(lp) for lp in whole) == 121
    for window in (1, 2, 7):
        windowed = score_sentences(model, codec, sentences, window=window)
        for got, expected in zip(windowed, whole):
            assert len(got.token_logprobs) == len(expected)
            assert got.token_logprobs == pytest.approx(expected, abs=1e-5)


def _count_calls(monkeypatch, model) -> list[tuple[int, int]]:
    """The (rows, steps) of every call of the model's forward from now on."""
    seen, forward = [], type(model).forward

    def counting(self, tokens, state=None, targets=None):
        seen.append(tuple(tokens.shape))
        return forward(self, tokens, state, targets)
    monkeypatch.setattr(type(model), "forward", counting)
    return seen


def test_a_large_vocabulary_reads_a_batch_in_windows_within_the_logit_budget(monkeypatch):
    """Catches: logits of (lines x longest line x vocabulary) held at once, which took 4.6 GB for one line of
    100,000 words: each call of the model sees at most LOGIT_BUDGET of them."""
    from charlm import score as score_module

    model = random_model(cell="gru", impl="custom")
    codec = char_codec("ab")
    sentences = ["ab" * 30, "b" * 5, "a"]
    expected = [r.logprob for r in score_sentences(model, codec, sentences)]
    monkeypatch.setattr(score_module, "LOGIT_BUDGET", 3 * model.vocab_size * 4)  # 4 steps of 3 rows
    seen = _count_calls(monkeypatch, model)
    got = [r.logprob for r in score_sentences(model, codec, sentences)]
    assert got == pytest.approx(expected, abs=1e-5)
    assert seen[0] == (3, 4) and all(rows * steps <= 12 for rows, steps in seen)
    assert (1, 4) in seen and sum(steps for _, steps in seen) == 61  # the long line alone after its neighbours end


@pytest.mark.parametrize("tied", [False, True])
def test_an_adaptive_softmax_model_is_windowed_by_its_head_not_its_vocabulary(monkeypatch, tied):
    """Catches: the logit budget counted over the whole vocabulary for a model that holds only its head's
    scores (frequent tokens and one per cluster) at every position: windows of one step, a model call each."""
    from charlm import score as score_module

    cfg = ModelConfig(cell="gru", impl="custom", softmax="adaptive", adaptive_cutoffs="10,30", embedding_size=16,
                      hidden_size=16, tie_weights=tied)
    torch.manual_seed(0)
    model = build_model(cfg, 100)
    tokens = ["<unk>", "<eos>"] + [chr(ord("A") + i) for i in range(58)] + [chr(0x4E00 + i) for i in range(40)]
    codec = TextCodec(Tokenizer("char"), Vocabulary(tokens))
    sentences = ["ABC" * 10, "一丁七" * 6, "A"]
    expected = [r.token_logprobs for r in score_sentences(model, codec, sentences)]
    monkeypatch.setattr(score_module, "LOGIT_BUDGET", 3 * 12 * 4)  # 3 rows x (10 + 2 clusters) x 4 steps
    seen = _count_calls(monkeypatch, model)
    got = [r.token_logprobs for r in score_sentences(model, codec, sentences)]
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-5)
    assert seen[0] == (3, 4)


def test_score_fields_are_consistent():
    model = random_model()
    (r,) = score_sentences(model, char_codec("ab"), ["abzz"])
    assert r.oov == 2 and len(r.tokens) == 5 and r.tokens.count("<unk>") == 2
    assert r.log10prob == pytest.approx(r.logprob / math.log(10))
    assert r.perplexity == pytest.approx(math.exp(-r.logprob / 5))
    assert r.bits_per_token == pytest.approx(-r.logprob / 5 / math.log(2))
    known = [lp for lp, t in zip(r.token_logprobs, r.tokens) if t != "<unk>"]
    assert r.perplexity_no_oov == pytest.approx(math.exp(-sum(known) / 3))


def test_a_diverged_model_scores_with_a_capped_perplexity_not_an_error():
    """A model whose loss blew up (logits of 1e9) gives losses past float64's e ** 709.78: the perplexity
    is capped at e ** 700, as in training and `charlm eval`, instead of raising OverflowError."""
    model = random_model()
    with torch.no_grad():
        model.decoder.weight.mul_(1e9)
    (r,) = score_sentences(model, char_codec("ab"), ["abba"])
    assert -r.logprob / len(r.tokens) > 710
    assert r.perplexity == r.perplexity_no_oov == math.exp(700)


def test_decomposed_accents_score_like_composed_ones():
    codec = char_codec("ab\u00e9")
    model = random_model(vocab_size=len(codec.vocab))
    composed, decomposed = score_sentences(model, codec, ["ab\u00e9a", "abe\u0301a"])
    assert decomposed.oov == 0
    assert decomposed.token_logprobs == composed.token_logprobs


def test_word_level_scores_words_with_unk_counted():
    tokenizer = Tokenizer("word")
    codec = TextCodec(tokenizer, Vocabulary.build(count_tokens(tokenizer, "the cat sat 猫")))
    model = random_model(vocab_size=len(codec.vocab))
    (r,) = score_sentences(model, codec, ["the dog sat 猫。"])
    assert r.tokens == ["the", "<unk>", "sat", "猫", "<unk>", "<eos>"]
    assert r.oov == 2


# ---------------------------------------------------------------- corpus evaluation
def test_evaluating_a_one_line_file_gives_that_sentence_score(tmp_path):
    model = random_model()
    codec = char_codec("ab")
    path = tmp_path / "one.txt"
    path.write_text("abab\n", encoding="utf-8")
    result = evaluate_file(model, codec, path)
    (sentence,) = score_sentences(model, codec, ["abab"])
    assert result.tokens == 5 and result.lines == 1 and result.characters == 5
    assert -result.loss * result.tokens == pytest.approx(sentence.logprob, abs=1e-5)
    assert result.bits_per_char == pytest.approx(result.loss / math.log(2))  # char level: a token is a char


def test_evaluation_carries_the_state_across_lines(tmp_path):
    model = random_model()
    codec = char_codec("ab")
    path = tmp_path / "two.txt"
    path.write_text("ab\nba\n", encoding="utf-8")
    ids = [EOS_ID, 2, 3, EOS_ID, 3, 2, EOS_ID]
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    nll = torch.nn.functional.cross_entropy(logits[0].double(), torch.tensor(ids[1:]), reduction="sum").item()
    result = evaluate_file(model, codec, path)
    assert result.tokens == 6 and result.lines == 2 and result.oov == 0
    assert result.loss == pytest.approx(nll / 6, abs=1e-6)
    assert result.perplexity == pytest.approx(math.exp(nll / 6), rel=1e-6)
    # two sentences scored separately restart from <eos> with a zero state: a different number
    separate = sum(r.logprob for r in score_sentences(model, codec, ["ab", "ba"]))
    assert abs(-separate - nll) > 1e-4


def test_evaluating_an_empty_file_is_a_usage_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("", encoding="utf-8")
    with pytest.raises(UsageError, match="no text"):
        evaluate_file(random_model(), char_codec("ab"), path)


def test_a_batch_of_empty_lines_scores_as_one_empty_line_without_warnings():
    # every line empty: the batch is one step long, its targets a strided view; the adaptive softmax's
    # bucketize warned about that before the adaptive softmax made them contiguous
    from charlm.config import ModelConfig
    from charlm.model import build_model

    tokenizer = Tokenizer("word")
    codec = TextCodec(tokenizer, Vocabulary.build(count_tokens(tokenizer, "a b c d e f g h i j k l")))
    torch.manual_seed(0)
    model = build_model(ModelConfig(cell="lstm", impl="torch", embedding_size=8, hidden_size=8, device="cpu",
                                    softmax="adaptive", adaptive_cutoffs="4,8", tie_weights=True), len(codec.vocab))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        together = score_sentences(model, codec, ["", "", ""])
    (alone,) = score_sentences(model, codec, [""])
    assert [r.tokens for r in together] == [["<eos>"]] * 3
    assert all(abs(r.logprob - alone.logprob) < 1e-6 for r in together) and alone.logprob < 0


def test_evaluating_in_streams_restarts_the_state_at_each_row(tmp_path):
    """Catches: evaluate_file ignored --streams (always one row): the figure it printed was not the one asked for."""
    from charlm.data import encode, eval_streams
    from charlm.model import stream_nll
    from charlm.score import evaluate_file
    from conftest import char_codec, random_model

    model = random_model()
    codec = char_codec("ab")
    path = tmp_path / "text.txt"
    text = "abba\nbab\naab\nbbbab\nab\n"
    path.write_text(text, encoding="utf-8")
    one = evaluate_file(model, codec, path)
    three = evaluate_file(model, codec, path, streams=3)
    total, count = stream_nll(model, *eval_streams(encode(codec, text), 3))
    assert three.tokens == one.tokens == count == 22
    assert three.loss == pytest.approx(total / count, rel=1e-6)
    assert abs(three.loss - one.loss) > 1e-4  # rows 2 and 3 start from a zero state, not the carried one


def test_evaluation_counts_a_last_line_without_a_newline(tmp_path):
    """Catches: CorpusEval.lines counted as newlines (score.py:126): a file whose last line has no line end
    was reported one line short ('1 line' for two)."""
    path = tmp_path / "two.txt"
    path.write_text("ab\nba", encoding="utf-8")
    result = evaluate_file(random_model(), char_codec("ab"), path)
    assert result.lines == 2 and result.tokens == 6


def test_score_totals_add_up_the_oov_of_every_sentence():
    """Catches: the totals' OOV taken as the largest of the sentences' (score.py:92), not their sum."""
    results = score_sentences(random_model(), char_codec("ab"), ["az", "zb", "ab"])
    assert [r.oov for r in results] == [1, 1, 0]
    totals = score_totals(results)
    assert totals.oov == 2 and totals.tokens == 9
    assert totals.logprob == pytest.approx(math.fsum(r.logprob for r in results))


def test_bits_per_char_of_a_lowercasing_run_count_the_lowercased_characters(tmp_path):
    """Catches: evaluate_file counting characters without the run's lowercasing (score.py:123): 'İ' is two
    characters once lowercased (i + U+0307), as training counts them, so eval's bits/char disagreed."""
    codec = TextCodec(Tokenizer("char", lowercase=True), Vocabulary(["<unk>", "<eos>", "i", "\u0307", "x"]))
    path = tmp_path / "upper.txt"
    path.write_text("\u0130x\n", encoding="utf-8")
    model = random_model(vocab_size=len(codec.vocab))
    result = evaluate_file(model, codec, path)
    assert result.characters == char_count("\u0130x\n", True) == 4
    assert result.oov == 0 and result.tokens == 4
    assert result.bits_per_char == pytest.approx(result.loss * result.tokens / 4 / math.log(2))


def test_scoring_a_model_left_in_training_mode_uses_no_dropout():
    """Catches: score_sentences not putting the model in evaluation mode (score.py:45): a model with dropout
    straight from training gave random scores."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(cell="lstm", embedding_size=8, hidden_size=16, dropout=0.5, device="cpu"), 4)
    sentences = ["abba", "ba", ""]
    model.train()
    first = [r.logprob for r in score_sentences(model, char_codec("ab"), sentences)]
    model.train()
    second = [r.logprob for r in score_sentences(model, char_codec("ab"), sentences)]
    model.eval()
    expected = [r.logprob for r in score_sentences(model, char_codec("ab"), sentences)]
    assert first == second == expected
