"""Stepper, the fused one-token path of plain sampling, against the model's own forward pass."""

from __future__ import annotations

import collections
import math

import pytest
import torch

from charlm.config import ModelConfig
from charlm.model import build_model
from charlm.sample import _gumbel_noise, generate
from charlm.score import score_sentences
from charlm.stepper import Stepper
from charlm.tokenizer import UNK_ID
from conftest import char_codec

CASES = [("rnn", "torch", "classic", "tanh"), ("rnn", "custom", "classic", "relu"),
         ("lstm", "torch", "classic", "tanh"), ("lstm", "custom", "classic", "tanh"),
         ("gru", "torch", "classic", "tanh"),  # nn.GRU computes torch's form whatever gru_form says
         ("gru", "custom", "classic", "tanh"), ("gru", "custom", "torch", "tanh")]


def spread_model(cell, impl, gru_form, nonlinearity, layers, vocab=11, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(cell=cell, impl=impl, layers=layers, embedding_size=8, hidden_size=16,
                      gru_form=gru_form, nonlinearity=nonlinearity)
    model = build_model(cfg, vocab).eval()
    with torch.no_grad():
        for p in model.parameters():  # biases and weights far from zero, so every term counts
            p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("cell,impl,gru_form,nonlinearity", CASES)
def test_stepper_logits_equal_the_forward_pass(cell, impl, gru_form, nonlinearity, layers):
    model = spread_model(cell, impl, gru_form, nonlinearity, layers)
    tokens = torch.randint(0, 11, (3, 8))
    with torch.no_grad():
        full, _ = model(tokens)
        _, state = model(tokens[:, :1])  # the stepper starts from the state after the first token
        stepper = Stepper(model, state)
        out = torch.empty(3, 11)
        steps = [full[:, 0]]
        for t in range(1, tokens.shape[1]):
            stepper.step(tokens[:, t], out)
            steps.append(out.clone())
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_gumbel_noise_masks_unk_and_is_zero_at_temperature_zero():
    g = torch.Generator().manual_seed(0)
    noise = _gumbel_noise(5, 2, 7, 1.0, allow_unk=False, generator=g)
    assert noise.shape == (5, 2, 7) and noise.dtype == torch.float32
    assert torch.isneginf(noise[:, :, UNK_ID]).all() and torch.isfinite(noise[:, :, 1:]).all()
    greedy = _gumbel_noise(3, 1, 4, 0.0, allow_unk=True, generator=g)
    assert torch.equal(greedy, torch.zeros(3, 1, 4))


@pytest.mark.parametrize("cell,impl,gru_form", [("lstm", "custom", "classic"), ("gru", "custom", "classic"),
                                                ("rnn", "torch", "classic")])
def test_fast_sampling_frequencies_match_the_scores(cell, impl, gru_form):
    """First two tokens of 40,000 samples (at temperature 0.7) against the probabilities the scores imply.

    P(first = a, second = b) is the score of the two-token prefix; at temperature T the sampler
    draws from softmax(logits / T), so the expected frequencies are those of the model with its
    decoder scaled by 1 / T. |z| < 6 per category fails by chance with probability < 1e-7.
    """
    model = spread_model(cell, impl, gru_form, "tanh", layers=2, vocab=4)
    codec = char_codec("ab")
    temperature, n = 0.7, 40000
    samples = generate(model, codec, max_length=2, temperature=temperature, num_samples=n, seed=7)
    counts = collections.Counter(tuple(s.tokens) for s in samples)

    cooled = spread_model(cell, impl, gru_form, "tanh", layers=2, vocab=4)
    with torch.no_grad():
        cooled.decoder.weight /= temperature
        cooled.decoder.bias /= temperature
        cooled.decoder.bias[UNK_ID] = -math.inf  # the sampler never draws <unk>
    tokens = ["a", "b", "<eos>"]
    probs = {}
    for first in tokens:
        if first == "<eos>":
            text = ""
            (r,) = score_sentences(cooled, codec, [text])
            probs[("<eos>",)] = math.exp(r.logprob)
            continue
        for second in ["a", "b"]:  # two tokens with no <eos>: P(first second ...) by its prefix score
            with torch.no_grad():
                ids = torch.tensor([[1, codec.vocab.id(first), codec.vocab.id(second)]])
                logp = torch.log_softmax(cooled(ids)[0], dim=-1)[0]
            probs[(first, second)] = math.exp(float(logp[0, ids[0, 1]] + logp[1, ids[0, 2]]))
        (r,) = score_sentences(cooled, codec, [first])
        probs[(first, "<eos>")] = math.exp(r.logprob)
    assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-5)
    assert sum(counts.values()) == n and set(counts) <= set(probs)
    for key, p in probs.items():
        z = (counts[key] - n * p) / math.sqrt(n * p * (1 - p))
        assert abs(z) < 6, (key, counts[key], n * p)


# Kills stepper.py:65 / :84 (the state's h / c rows used without .clone(): stepping overwrote the caller's state).
@pytest.mark.parametrize("cell,impl,gru_form", [("lstm", "torch", "classic"), ("gru", "custom", "classic"),
                                                ("rnn", "torch", "classic")])
def test_the_stepper_leaves_the_state_it_starts_from_untouched(cell, impl, gru_form):
    model = spread_model(cell, impl, gru_form, "tanh", layers=2)
    with torch.no_grad():
        _, state = model(torch.randint(0, 11, (3, 4)))
        before = tuple(s.clone() for s in state) if isinstance(state, tuple) else state.clone()
        stepper = Stepper(model, state)
        out = torch.empty(3, 11)
        for t in range(3):
            stepper.step(torch.tensor([t, t + 1, t + 2]), out)
    if isinstance(state, tuple):
        assert all(torch.equal(a, b) for a, b in zip(state, before))
    else:
        assert torch.equal(state, before)
