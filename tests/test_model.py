"""The model factory: shapes, custom == torch, step == forward, tied weights, exact stream likelihood."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from charlm.config import ModelConfig
from charlm.data import eval_streams
from charlm.model import adaptive_cutoffs, build_model, count_parameters, detach_state, stream_nll

CELLS = ["rnn", "gru", "lstm"]


def model_config(**kw) -> ModelConfig:
    base = dict(embedding_size=6, hidden_size=8, layers=2, device="cpu", gru_form="torch")
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("impl", ["torch", "custom"])
@pytest.mark.parametrize("cell", CELLS)
def test_forward_shapes(cell, impl):
    model = build_model(model_config(cell=cell, impl=impl), vocab_size=11)
    tokens = torch.randint(0, 11, (3, 5))
    logits, state = model(tokens)
    assert logits.shape == (3, 5, 11)
    states = state if isinstance(state, tuple) else (state,)
    assert len(states) == (2 if cell == "lstm" else 1)
    assert all(s.shape == (2, 3, 8) for s in states)


@pytest.mark.parametrize("cell", CELLS)
def test_custom_and_torch_models_agree_with_the_same_weights(cell):
    torch.manual_seed(0)
    ref = build_model(model_config(cell=cell, impl="torch"), 9)
    custom = build_model(model_config(cell=cell, impl="custom"), 9)
    assert set(ref.state_dict()) == set(custom.state_dict())
    custom.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, 9, (4, 7))
    torch.testing.assert_close(custom(tokens)[0], ref(tokens)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "custom"])
@pytest.mark.parametrize("cell", CELLS)
def test_step_by_step_equals_one_forward_pass(cell, impl):
    torch.manual_seed(1)
    model = build_model(model_config(cell=cell, impl=impl), 7).eval()
    tokens = torch.randint(0, 7, (2, 6))
    full, full_state = model(tokens)
    state = model.init_state(2)
    steps = []
    for t in range(tokens.shape[1]):
        logits, state = model.step(tokens[:, t], state)
        steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-6, rtol=1e-6)
    for a, b in zip(state if isinstance(state, tuple) else (state,),
                    full_state if isinstance(full_state, tuple) else (full_state,)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_tied_weights_share_one_parameter_counted_once():
    tied = build_model(model_config(embedding_size=8, tie_weights=True), 13)
    untied = build_model(model_config(embedding_size=8), 13)
    assert tied.decoder.weight is tied.encoder.weight
    assert count_parameters(untied) - count_parameters(tied) == 13 * 8
    # a gradient step moves both ends together
    loss = tied(torch.tensor([[1, 2, 3]]))[0].sum()
    loss.backward()
    with torch.no_grad():
        tied.encoder.weight -= 0.1 * tied.encoder.weight.grad
    assert torch.equal(tied.decoder.weight, tied.encoder.weight)


def test_rnn_nonlinearity_reaches_torch_and_custom_modules():
    torch_relu = build_model(model_config(cell="rnn", impl="torch", nonlinearity="relu"), 5)
    custom_relu = build_model(model_config(cell="rnn", impl="custom", nonlinearity="relu"), 5)
    assert torch_relu.rnn.nonlinearity == "relu"
    assert custom_relu.rnn.nonlinearity == "relu"


def test_detach_state_keeps_values():
    h = torch.randn(2, 3, 4, requires_grad=True) * 2
    c = torch.randn(2, 3, 4)
    detached = detach_state((h, c))
    assert not detached[0].requires_grad and torch.equal(detached[0], h.detach())
    assert detach_state(None) is None


@pytest.mark.parametrize("window", [1, 3, 256])
def test_stream_nll_is_the_exact_likelihood_whatever_the_window(window):
    torch.manual_seed(2)
    model = build_model(model_config(cell="lstm"), 6)
    ids = torch.randint(0, 6, (30,))
    rows, mask = eval_streams(ids, 1)
    total, count = stream_nll(model, rows, mask, window=window)
    logits, _ = model.eval()(ids[None, :-1])
    expected = nn.functional.cross_entropy(logits[0].double(), ids[1:], reduction="sum").item()
    assert count == 29
    assert math.isclose(total, expected, rel_tol=1e-6)


@pytest.mark.parametrize("positions, shape", [
    (4 * 3, (4, 3)),  # 4 rows of 3 steps: windows shrink
    (2, (2, 1)),      # not even one step of all 4 rows: 2 rows at a time
    (0.9, (1, 1)),    # less than one position: one row, one step at a time
])
@pytest.mark.parametrize("cell", CELLS)
def test_stream_nll_holds_at_most_its_budget_of_scores_and_gives_the_same_likelihood(monkeypatch, cell, positions,
                                                                                       shape):
    """Catches: every stream's whole window of scores held at once (streams x 256 x vocabulary), which made
    `charlm eval --streams 1000` ask for 3.5 G scores at a vocabulary of 13,777; and rows read in groups
    without a fresh state each, or with a group's targets left out."""
    torch.manual_seed(4)
    model = build_model(model_config(cell=cell, impl="custom"), 11).eval()
    width = model.position_width
    budget = int(positions * width)
    rows, mask = eval_streams(torch.randint(0, 11, (39,)), 4)  # 38 targets in 4 rows of 10 (the last padded)
    expected = stream_nll(model, rows, mask)
    seen = []
    forward = type(model).forward

    def counting(self, tokens, state=None, targets=None):
        seen.append(tuple(tokens.shape))
        return forward(self, tokens, state, targets)

    monkeypatch.setattr(type(model), "forward", counting)
    total, count = stream_nll(model, rows, mask, budget=budget)
    assert count == expected[1] == 38
    assert math.isclose(total, expected[0], rel_tol=1e-6)
    assert seen[0] == shape
    assert all(r * t * width <= max(budget, width) for r, t in seen)
    assert sum(r * t for r, t in seen) == 4 * 10


@pytest.mark.parametrize("cell, gates", [("rnn", 1), ("gru", 3), ("lstm", 4)])
def test_a_window_counts_the_gates_and_states_of_a_position_not_only_its_scores(cell, gates):
    """Catches: stream_nll sizing its windows by the scores alone: at character level a position's gates are
    the larger part (`eval --streams 8000` of a GRU 256 over 66 characters took 10.1 GB against a budget of
    512 MiB)."""
    model = build_model(model_config(cell=cell, embedding_size=64, hidden_size=256), 66)
    assert model.position_width == (gates + 1) * 256 + 256
    words = build_model(model_config(cell=cell, embedding_size=64, hidden_size=256), 13_777)
    assert words.position_width == 256 + 2 * 13_777


def test_the_output_width_is_the_vocabulary_or_an_adaptive_softmaxs_head():
    assert build_model(model_config(), 13).output_width == 13
    for tied in (False, True):
        model = build_model(model_config(softmax="adaptive", adaptive_cutoffs="5,9", embedding_size=16,
                                         hidden_size=16, tie_weights=tied), 13)
        assert model.output_width == 5 + 2


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
@pytest.mark.parametrize("impl", ["torch", "custom"])
@pytest.mark.parametrize("cell", CELLS)
def test_the_loss_with_targets_is_the_log_softmax_of_the_logits_and_has_its_gradient(cell, impl, softmax):
    # forward(..., targets) takes the loss in the custom layers' time-major order, a path of its own
    torch.manual_seed(2)
    model = build_model(model_config(cell=cell, impl=impl, softmax=softmax, adaptive_cutoffs="6",
                                     embedding_size=8, tie_weights=softmax == "adaptive"), 13)
    tokens, targets = torch.randint(0, 13, (2, 3, 40))  # 120 tokens: the custom model's looked-up projection
    if impl == "custom":  # (B, T, H), a view of (T, B, H); nn.RNN's layout is its own (on the CPU, oneDNN's)
        assert model.rnn(model.encoder(tokens))[0].transpose(0, 1).is_contiguous()
    nll, _ = model(tokens, targets=targets)
    assert nll.shape == (3, 40)
    (nll * torch.linspace(0.5, 1.5, 120).view(3, 40)).sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = -model(tokens)[0].log_softmax(-1).gather(2, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(nll, expected, atol=1e-5, rtol=1e-5)
    (expected * torch.linspace(0.5, 1.5, 120).view(3, 40)).sum().backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-5)


def test_stream_nll_scores_without_dropout_counts_only_real_targets_and_restores_training_mode():
    torch.manual_seed(2)
    model = build_model(ModelConfig(cell="lstm", embedding_size=4, hidden_size=5, dropout=0.5, device="cpu"), 6)
    model.train()  # as during training, where the periodic validation calls it
    ids = torch.randint(0, 6, (30,))
    total, count = stream_nll(model, *eval_streams(ids, 1))
    assert model.training
    with torch.no_grad():
        logits, _ = model.eval()(ids[None, :-1])
    expected = torch.nn.functional.cross_entropy(logits[0].double(), ids[1:], reduction="sum").item()
    assert math.isclose(total, expected, rel_tol=1e-6)
    _, count4 = stream_nll(model, *eval_streams(ids, 4))  # 29 targets in 4 rows: the last row is padded
    assert count == count4 == 29


def test_a_one_layer_model_with_dropout_builds_without_torchs_warning():
    """Catches: dropout passed between the layers of a one-layer torch stack (model.py:42): nn.LSTM warns that
    it has no effect, on every run of a one-layer config with model.dropout."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build_model(ModelConfig(cell="lstm", impl="torch", layers=1, embedding_size=4, hidden_size=5,
                                        dropout=0.3, device="cpu"), 6)
        model.train()
        model(torch.tensor([[1, 2, 3]]))


def test_a_cutoff_that_would_leave_a_one_token_cluster_is_dropped():
    """Catches: `c < vocab_size - 1` written `c < vocab_size` (model.py:158), which made a tail cluster of one
    token (the README: cutoffs 'from vocabulary size - 1 up ... are dropped')."""
    cfg = ModelConfig(softmax="adaptive", adaptive_cutoffs="4,9,12", device="cpu")
    assert adaptive_cutoffs(cfg, 10) == [4]
    assert adaptive_cutoffs(cfg, 11) == [4, 9]


def test_stream_nll_leaves_a_model_in_evaluation_mode_as_it_found_it():
    """Catches: stream_nll ending with model.train() instead of restoring the mode it found (model.py:320): a
    model evaluated by `charlm eval` or score code came back in training mode, its dropout switched on."""
    model = build_model(ModelConfig(cell="gru", embedding_size=4, hidden_size=5, dropout=0.5, device="cpu"), 6)
    model.eval()
    stream_nll(model, *eval_streams(torch.randint(0, 6, (20,)), 2))
    assert not model.training


def test_stream_nll_leaves_the_padding_of_the_last_row_out_of_the_total():
    """Catches: the mask not applied to the summed loss (model.py:317): only the count was masked, so the
    padded end of the last row added its loss to the total (the count test alone does not see it)."""
    torch.manual_seed(2)
    model = build_model(ModelConfig(cell="lstm", embedding_size=4, hidden_size=5, device="cpu"), 6).eval()
    ids = torch.randint(0, 6, (30,))
    rows, mask = eval_streams(ids, 4)  # 29 targets in 4 rows of 8: the last row has 3 padded places
    assert not mask[-1].all()
    total, count = stream_nll(model, rows, mask)
    other = rows.clone()
    other[~mask & (torch.arange(rows.shape[1]) > 0)] = 3  # change what the padded places hold
    assert stream_nll(model, other, mask) == pytest.approx((total, count), rel=1e-9)
    with torch.no_grad():
        logits, _ = model(rows[:, :-1])
    nll = nn.functional.cross_entropy(logits.double().reshape(-1, 6), rows[:, 1:].reshape(-1), reduction="none")
    assert math.isclose(total, float((nll.view(rows.shape[0], -1) * mask[:, 1:]).sum()), rel_tol=1e-6)
