"""Generation: stops where it should, never says <unk>, is reproducible, and samples what `score` predicts."""

from __future__ import annotations

import collections
import itertools
import math

import pytest
import torch

from charlm import sample as sample_module
from charlm import stepper as stepper_module
from charlm.config import MAX_SEED
from charlm.errors import UsageError
from charlm.sample import MIN_TEMPERATURE, check_options, generate, iter_samples, next_token_distribution
from charlm.score import score_sentences
from charlm.tokenizer import EOS, EOS_ID, UNK, UNK_ID, TextCodec, Tokenizer, Vocabulary
from conftest import char_codec, random_model


def unk_loving_model(cell: str = "lstm"):
    """A model for which <unk> is by far the likeliest next token everywhere."""
    model = random_model(cell, vocab_size=5)
    with torch.no_grad():
        model.decoder.bias[UNK_ID] += 8.0
    return model


# ---------------------------------------------------------------- sampling frequencies
def test_sampling_frequencies_match_score_probabilities():
    """Counts of every string up to length 2 (and of 'longer') against the probabilities `score` gives.

    Each count is binomial; a |z| above 6 in any of the 14 categories has
    probability < 14 * 2e-9, and the Pearson statistic bound below fails by
    chance with probability about 1e-6.
    """
    model = random_model("gru", vocab_size=4)
    codec = char_codec("ab")
    n = 50000
    samples = generate(model, codec, max_length=3, temperature=1.0, num_samples=n, seed=123, allow_unk=True)
    counts = collections.Counter(
        tuple(s.tokens[:-1]) if s.stopped_at == "eos" else "longer" for s in samples)

    symbols = {"a": "a", "b": "b", UNK: "x"}  # x is outside the vocabulary: the codec reads it as <unk>
    strings = [s for k in range(3) for s in itertools.product(list(symbols), repeat=k)]
    scores = score_sentences(model, codec, ["".join(symbols[t] for t in s) for s in strings])
    probs = {s: math.exp(r.logprob) for s, r in zip(strings, scores)}
    probs["longer"] = 1.0 - math.fsum(probs.values())
    assert min(probs.values()) > 0.001  # every category expects 50+ draws: the normal bound holds
    assert sum(counts.values()) == n and set(counts) <= set(probs)

    chi2 = 0.0
    for key, p in probs.items():
        expected = n * p
        z = (counts[key] - expected) / math.sqrt(expected * (1 - p))
        assert abs(z) < 6, (key, counts[key], expected)
        chi2 += (counts[key] - expected) ** 2 / expected
    # Wilson-Hilferty: the chi-square quantile for k degrees of freedom at tail 1e-6 (normal 4.75).
    k = len(probs) - 1
    bound = k * (1 - 2 / (9 * k) + 4.75 * math.sqrt(2 / (9 * k))) ** 3
    assert chi2 < bound


def test_sample_logprob_is_the_score_of_the_sample():
    model = random_model("lstm", vocab_size=4)
    codec = char_codec("ab")
    samples = generate(model, codec, max_length=20, num_samples=20, seed=5)
    finished = [s for s in samples if s.stopped_at == "eos"]
    assert finished
    scores = score_sentences(model, codec, [s.generated for s in finished])
    for s, r in zip(finished, scores):
        assert s.logprob == pytest.approx(r.logprob, abs=1e-5)


@pytest.mark.parametrize("top_k", [0, 3])  # 0: the fast path (Gumbel noise), 3 of 4 tokens: the general path
def test_a_sample_longer_than_a_block_keeps_every_token_and_its_logprob(top_k):
    """Tokens are kept a block of 64 steps at a time: a 150-token sample crosses two block boundaries."""
    model = random_model("gru", vocab_size=4)
    with torch.no_grad():
        model.decoder.bias[EOS_ID] -= 30.0  # never stops early: every sample runs to max_length
    codec = char_codec("ab")
    samples = generate(model, codec, max_length=150, num_samples=3, seed=11, top_k=top_k)
    for s in samples:
        assert s.stopped_at == "max_length" and len(s.tokens) == 150 and len(s.generated) == 150
        # ln P(generated) = ln P(generated + <eos>) - ln P(<eos> | generated), both from `score`
        (r,) = score_sentences(model, codec, [s.generated])
        assert r.tokens[:-1] == s.tokens
        assert s.logprob == pytest.approx(r.logprob - r.token_logprobs[-1], abs=1e-4)


@pytest.mark.parametrize("top_k", [0, 3])
def test_many_samples_are_drawn_group_by_group(monkeypatch, top_k):
    """Memory is bounded by the group, not by --num-samples: with groups of 4, ten samples come in three
    groups, the first of which is exactly what asking for four samples gives."""
    monkeypatch.setattr(sample_module, "GROUP", 4)
    model = random_model("lstm", vocab_size=4)
    codec = char_codec("ab")
    drawn = []
    original = sample_module._group
    monkeypatch.setattr(sample_module, "_group", lambda *a, **k: drawn.append(a[5]) or original(*a, **k))
    stream = iter_samples(model, codec, max_length=30, num_samples=10, seed=3, top_k=top_k)
    first = next(stream)
    assert drawn == [4]  # lazily: only the first group has been drawn so far
    ten = [first, *stream]
    assert drawn == [4, 4, 2] and len(ten) == 10
    assert [s.tokens for s in ten[:4]] == [s.tokens for s in generate(model, codec, max_length=30, num_samples=4,
                                                                       seed=3, top_k=top_k)]
    again = generate(model, codec, max_length=30, num_samples=10, seed=3, top_k=top_k)
    assert [s.tokens for s in again] == [s.tokens for s in ten]
    assert len({tuple(s.tokens) for s in ten}) > 1
    for s in ten:
        assert UNK not in s.tokens and (s.stopped_at == "max_length") == (s.tokens[-1] != EOS)


# ---------------------------------------------------------------- stopping and <unk>
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_samples_stop_at_eos_or_at_max_length(cell):
    model = random_model(cell, vocab_size=4)
    samples = generate(model, char_codec("ab"), max_length=6, num_samples=200, seed=0, allow_unk=True)
    reasons = collections.Counter(s.stopped_at for s in samples)
    assert reasons["eos"] > 0 and reasons["max_length"] > 0
    for s in samples:
        if s.stopped_at == "eos":
            assert s.tokens[-1] == EOS and EOS not in s.tokens[:-1] and len(s.tokens) <= 6
        else:
            assert len(s.tokens) == 6 and EOS not in s.tokens
        assert "\n" not in s.generated


def test_unk_is_never_sampled_unless_allowed():
    model = unk_loving_model()
    codec = char_codec("abc")
    samples = generate(model, codec, max_length=30, num_samples=50, seed=0)
    assert all(UNK not in s.tokens and UNK not in s.generated for s in samples)
    assert sum(len(s.tokens) for s in samples) > 50  # something was generated
    allowed = generate(model, codec, max_length=30, num_samples=50, seed=0, allow_unk=True)
    assert sum(s.tokens.count(UNK) for s in allowed) > 100  # the model does want to say <unk>


def test_greedy_never_picks_unk_either():
    model = unk_loving_model()
    (s,) = generate(model, char_codec("abc"), max_length=30, temperature=0.0)
    assert UNK not in s.tokens


def test_the_same_seed_gives_the_same_samples():
    model = random_model("lstm", vocab_size=4)
    codec = char_codec("ab")
    a = generate(model, codec, max_length=40, num_samples=8, seed=42)
    b = generate(model, codec, max_length=40, num_samples=8, seed=42)
    c = generate(model, codec, max_length=40, num_samples=8, seed=43)
    assert [s.tokens for s in a] == [s.tokens for s in b]
    assert [s.logprob for s in a] == [s.logprob for s in b]
    assert [s.tokens for s in a] != [s.tokens for s in c]


def test_a_seed_does_not_touch_the_global_generator():
    model = random_model("lstm", vocab_size=4)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    generate(model, char_codec("ab"), max_length=10, num_samples=4, seed=1)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------- temperature 0, top-k, top-p
def greedy_path(model, max_length: int) -> list[int]:
    """The argmax path computed step by step, <unk> excluded."""
    ids, state = [], None
    token = torch.tensor([EOS_ID])
    with torch.no_grad():
        for _ in range(max_length):
            logits, state = model.step(token, state)
            logits[:, UNK_ID] = -math.inf
            token = logits.argmax(dim=-1)
            ids.append(int(token))
            if ids[-1] == EOS_ID:
                break
    return ids


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_temperature_zero_follows_the_argmax_path(seed):
    model = random_model("lstm", vocab_size=6, seed=seed)
    codec = char_codec("abcd")
    expected = codec.vocab.decode(greedy_path(model, 25))
    samples = generate(model, codec, max_length=25, temperature=0.0, num_samples=3, seed=seed)
    assert all(s.tokens == expected for s in samples)


def test_top_k_one_is_greedy():
    model = random_model("gru", vocab_size=6, seed=3)
    codec = char_codec("abcd")
    greedy = generate(model, codec, max_length=25, temperature=0.0)[0].tokens
    top1 = generate(model, codec, max_length=25, temperature=1.0, top_k=1, num_samples=4, seed=9)
    assert all(s.tokens == greedy for s in top1)


def test_top_k_keeps_the_k_likeliest_tokens():
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0, -1.0]])
    probs = next_token_distribution(logits, 1.0, 2, 1.0, allow_unk=True)
    assert (probs[0] > 0).tolist() == [False, False, True, True, False]
    expected = torch.softmax(torch.tensor([3.0, 2.0]), dim=0)
    torch.testing.assert_close(probs[0, [2, 3]], expected)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs_in = torch.tensor([[0.0, 0.5, 0.3, 0.15, 0.05]])
    logits = probs_in.clamp_min(1e-30).log()
    # 0.5 alone is not 0.6; 0.5 + 0.3 reaches it: two tokens kept, renormalised
    probs = next_token_distribution(logits, 1.0, 0, 0.6, allow_unk=True)
    torch.testing.assert_close(probs[0], torch.tensor([0.0, 0.625, 0.375, 0.0, 0.0]))
    probs = next_token_distribution(logits, 1.0, 0, 0.5, allow_unk=True)
    torch.testing.assert_close(probs[0], torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[0.0, 0.0, 1.0, 2.0]])
    cold = next_token_distribution(logits, 0.5, 0, 1.0, allow_unk=True)
    warm = next_token_distribution(logits, 2.0, 0, 1.0, allow_unk=True)
    torch.testing.assert_close(cold, torch.softmax(logits * 2, dim=-1))
    assert cold[0, 3] > torch.softmax(logits, -1)[0, 3] > warm[0, 3]


def test_unk_is_masked_in_the_distribution():
    probs = next_token_distribution(torch.tensor([[5.0, 0.0, 0.0]]), 1.0, 0, 1.0, allow_unk=False)
    assert probs[0, UNK_ID] == 0 and probs.sum().item() == pytest.approx(1.0)


# ---------------------------------------------------------------- prime and options
def test_prime_is_kept_in_front_of_the_generated_text():
    model = random_model("lstm", vocab_size=4)
    codec = char_codec("ab")
    (s,) = generate(model, codec, prime="abz", max_length=5, seed=0)
    assert s.text == "abz" + s.generated  # as typed: the unknown z is not shown as <unk>
    assert s.prime_unk == 1


@pytest.mark.parametrize("prime, first, text", [
    ("the cat", "sat", "the cat sat"),        # words: a space
    ("the cat", ".", "the cat."),             # no space before a full stop
    ("the cat ", "sat", "the cat sat"),       # the typed space is kept, not doubled
    ("The CAT", "sat", "The CAT sat"),        # the prime as typed, though the model reads it lowercased
    ("春眠", "不", "春眠不"),                  # no space between CJK characters
    ("the cat\n", "sat", "the cat\nsat"),     # a new line after the prime
    ("the cat\r", "sat", "the cat sat"),         # a final CR ends the line for the tokenizer: not shown
    ("at 10:", "30", "at 10:30"),             # a number cut by the prime's end stays one (it read "10: 30")
    ("costs $3.", "14", "costs $3.14"),       # (it read "$3. 14")
    ("in 1999,", "100", "in 1999, 100"),      # not a thousands comma
    # a quote typed closing, which the count in the line would open: a space keeps the tokens apart (the
    # join alone gave "dogs'bone", read back as one word)
    ("the dogs'", "bone", "the dogs' bone"),
    ("five o'", "clock", "five o' clock"),
    ("say '", "tis", "say 'tis"),             # typed opening: the count agrees, no space
    ("か", "\u3099", "か \u3099"),             # a mark NFC would compose with the prime's last letter
])
def test_a_word_level_prime_joins_its_continuation_as_the_tokenizer_joins_words(prime, first, text):
    vocab = Vocabulary([UNK, EOS, "the", "cat", "sat", ".", "春", "眠", "不", "30", "14", "100", "bone", "clock",
                        "tis", "\u3099"])
    codec = TextCodec(Tokenizer("word", lowercase=True), vocab)
    model = random_model("gru", vocab_size=len(vocab))
    with torch.no_grad():  # the continuation is `first` alone: then <eos>
        model.decoder.weight.zero_()
        model.decoder.bias.fill_(-50.0)
        model.decoder.bias[vocab.id(first)] = 50.0
    (s,) = generate(model, codec, prime=prime, max_length=1, temperature=0.0)
    assert s.tokens == [first] and s.text == text and s.generated == first


def test_prime_conditions_the_continuation_like_the_score():
    """ln P(generated + <eos> | <eos> prime) is the score of prime + generated minus the prime's own part."""
    model = random_model("lstm", vocab_size=4)
    codec = char_codec("ab")
    samples = [s for s in generate(model, codec, prime="ab", max_length=20, num_samples=20, seed=2)
               if s.stopped_at == "eos"]
    assert samples
    (whole_scores) = score_sentences(model, codec, ["ab" + s.generated for s in samples])
    for s, r in zip(samples, whole_scores):
        assert s.logprob == pytest.approx(math.fsum(r.token_logprobs[2:]), abs=1e-5)


@pytest.mark.parametrize("options", [
    dict(max_length=0), dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
    dict(num_samples=0), dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature=1e-40),
    dict(seed=-1), dict(seed=2**63), dict(seed=10**20),  # torch's generator would wrap -1, overflow at 2^64
])
def test_bad_sampling_options_are_usage_errors(options):
    values = dict(max_length=10, temperature=1.0, top_k=0, top_p=1.0, num_samples=1)
    values.update(options)
    with pytest.raises(UsageError):
        check_options(**values)


@pytest.mark.parametrize("prime, ids", [("ab\n", [2, 3, EOS_ID]), ("ab\nba", [2, 3, EOS_ID, 3, 2])])
def test_a_prime_with_line_ends_conditions_on_their_eos(prime, ids):
    # Each line end of the prime is read as <eos>, after the <eos> that starts every sequence.
    model, codec = random_model("lstm", vocab_size=4), char_codec("ab")
    samples = generate(model, codec, prime=prime, max_length=1, num_samples=20, seed=0, allow_unk=True)
    with torch.no_grad():
        logits, _ = model(torch.tensor([[EOS_ID] + ids]))
    logp = torch.log_softmax(logits[0, -1].double(), dim=-1)
    for s in samples:
        (token,) = codec.vocab.encode(s.tokens)
        assert s.logprob == pytest.approx(float(logp[token]), abs=1e-5)


@pytest.mark.parametrize("options", [dict(top_k=3), dict(top_p=0.9)])
def test_greedy_with_top_k_or_top_p_never_picks_unk(options):
    (s,) = generate(unk_loving_model(), char_codec("abc"), max_length=30, temperature=0.0, **options)
    assert s.tokens and UNK not in s.tokens


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.95)], ids=["top-k", "top-p"])
def test_truncated_sampling_stops_each_sample_at_its_own_eos_or_at_max_length(top_k, top_p):
    """Catches: the general sampler (top-k, nucleus, adaptive softmax) stopping every stream when the first one
    drew <eos> (done.any() for done.all()): the others came back short, marked max_length."""
    from charlm.sample import generate
    from conftest import char_codec, random_model

    model = random_model("gru", vocab_size=4)
    samples = generate(model, char_codec("ab"), max_length=6, num_samples=100, seed=0, top_k=top_k, top_p=top_p)
    reasons = [s.stopped_at for s in samples]
    assert "eos" in reasons and "max_length" in reasons
    for s in samples:
        if s.stopped_at == "eos":
            assert s.tokens[-1] == EOS and EOS not in s.tokens[:-1] and len(s.tokens) <= 6
        else:
            assert len(s.tokens) == 6 and EOS not in s.tokens


def test_the_edges_of_the_seed_and_temperature_ranges_are_accepted():
    """Catches: `seed <= MAX_SEED` written `< MAX_SEED` and `MIN_TEMPERATURE <= temperature` written `<`
    (sample.py:50, :41): the documented largest seed (2^63 - 1) and the smallest temperature were refused."""
    check_options(10, 1.0, 0, 1.0, 1, seed=MAX_SEED)
    check_options(10, 1.0, 0, 1.0, 1, seed=0)
    check_options(10, MIN_TEMPERATURE, 0, 1.0, 1)


def test_samples_without_a_seed_differ_from_call_to_call():
    """Catches: the generator seeded with a constant when no --seed is given (sample.py:110): every unseeded
    `charlm sample` printed the same text."""
    model = random_model("lstm", vocab_size=4)
    with torch.no_grad():
        model.decoder.bias[EOS_ID] -= 5.0  # long samples: two equal draws are practically impossible
    codec = char_codec("ab")
    first = generate(model, codec, max_length=40, num_samples=4)
    second = generate(model, codec, max_length=40, num_samples=4)
    assert [s.tokens for s in first] != [s.tokens for s in second]


def test_a_single_sample_stops_stepping_at_its_eos(monkeypatch):
    """Catches: the one-stream test of the fast sampler never stopping at <eos> (sample.py:207): the output
    was trimmed right, but `charlm sample` ran the model for all --max-length steps after the sample ended
    (counted through Stepper.step, not timed)."""
    model = random_model("gru", vocab_size=4)
    with torch.no_grad():
        model.decoder.weight.zero_()
        model.decoder.bias.fill_(-30.0)
        model.decoder.bias[EOS_ID] = 30.0  # <eos> first, whatever the state
    steps = []
    real_step = stepper_module.Stepper.step
    monkeypatch.setattr(stepper_module.Stepper, "step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    (s,) = generate(model, char_codec("ab"), max_length=200, seed=0)
    assert s.stopped_at == "eos" and s.tokens == ["<eos>"]
    assert len(steps) == 0


@pytest.mark.parametrize("cell, options", [("lstm", {}), ("gru", {"top_k": 2})])
def test_a_long_prime_is_read_once_in_windows_whatever_the_number_of_samples(monkeypatch, cell, options):
    """Catches: the prime read by every sample at once, (samples x prime length) tokens in one call: a
    5,000-character prime with 256 samples took 5.4 GB (300 MB for one sample). It is read once, at most 256
    tokens a call, and each sample goes on from its state as if it had read the prime itself."""
    model, codec = random_model(cell, vocab_size=4), char_codec("ab")
    prime = "ab" * 300 + "a"
    expected = generate(model, codec, prime=prime, max_length=4, num_samples=3, seed=5, **options)
    forward, seen = type(model).forward, []

    def counting(self, tokens, state=None, targets=None):
        seen.append(tuple(tokens.shape))
        return forward(self, tokens, state, targets)

    monkeypatch.setattr(type(model), "forward", counting)
    got = generate(model, codec, prime=prime, max_length=4, num_samples=3, seed=5, **options)
    reads = [shape for shape in seen if shape[1] > 1]  # the steps of sampling read one token each
    assert reads == [(1, 256), (1, 256), (1, 90)]  # <eos> and the 601 characters of the prime
    assert [g.tokens for g in got] == [e.tokens for e in expected]
    for s in got:  # each sample's log-probability given the prime, by one pass over prime and sample together
        ids = codec.vocab.encode(s.tokens)
        with torch.no_grad():
            logits, _ = model(torch.tensor([[EOS_ID] + codec.encode_line(prime) + ids[:-1]]))
        logp = torch.log_softmax(logits[0, -len(ids):].double(), -1)
        assert s.logprob == pytest.approx(float(logp.gather(1, torch.tensor(ids)[:, None]).sum()), abs=1e-5)
