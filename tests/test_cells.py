"""The hand-written cells: against torch.nn, against gradcheck, against the equations and the course values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from charlm.cells import CustomRNN, gru_cell, gru_cell_torch_form, lstm_cell, rnn_cell

# (cell, options for CustomRNN, the torch module that computes the same thing)
VARIANTS = {
    "rnn_tanh": ("rnn", {"nonlinearity": "tanh"}, lambda e, h, l: nn.RNN(e, h, l, nonlinearity="tanh", batch_first=True)),
    "rnn_relu": ("rnn", {"nonlinearity": "relu"}, lambda e, h, l: nn.RNN(e, h, l, nonlinearity="relu", batch_first=True)),
    "gru": ("gru", {"gru_form": "torch"}, lambda e, h, l: nn.GRU(e, h, l, batch_first=True)),
    "lstm": ("lstm", {}, lambda e, h, l: nn.LSTM(e, h, l, batch_first=True)),
}


def _random_state(cell: str, layers: int, batch: int, hidden: int, generator: torch.Generator):
    h = torch.randn(layers, batch, hidden, generator=generator)
    if cell == "lstm":
        return h, torch.randn(layers, batch, hidden, generator=generator)
    return h


def _flat(state):
    return list(state) if isinstance(state, tuple) else [state]


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_custom_cell_matches_torch_outputs_states_and_gradients(variant, layers):
    cell, options, make_torch = VARIANTS[variant]
    E, H, B, T = 5, 7, 3, 6
    g = torch.Generator().manual_seed(10 * list(VARIANTS).index(variant) + layers)
    torch.manual_seed(layers)  # the modules' initial weights
    reference = make_torch(E, H, layers)
    custom = CustomRNN(cell, E, H, layers, **options)
    custom.load_state_dict(reference.state_dict())  # same names and shapes: loads unchanged

    x = torch.randn(B, T, E, generator=g)
    state = _random_state(cell, layers, B, H, g)
    out_weight = torch.randn(B, T, H, generator=g)
    state_weights = [torch.randn(s.shape, generator=g) for s in _flat(state)]

    results = []
    for module in (reference, custom):
        xi = x.clone().requires_grad_(True)
        si = tuple(s.clone().requires_grad_(True) for s in _flat(state))
        out, final = module(xi, si if cell == "lstm" else si[0])
        # A loss that reaches every output and every final state, with unequal weights.
        loss = (out * out_weight).sum() + sum((f * w).sum() for f, w in zip(_flat(final), state_weights))
        loss.backward()
        grads = {name: p.grad.clone() for name, p in module.named_parameters()}
        results.append((out.detach(), [f.detach() for f in _flat(final)], xi.grad, [s.grad for s in si], grads))

    (out_t, final_t, gx_t, gs_t, gp_t), (out_c, final_c, gx_c, gs_c, gp_c) = results
    assert out_c.shape == (B, T, H)
    torch.testing.assert_close(out_c, out_t, atol=1e-5, rtol=1e-5)
    for a, b in zip(final_c, final_t):
        assert a.shape == (layers, B, H)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_c, gx_t, atol=1e-5, rtol=1e-5)
    for a, b in zip(gs_c, gs_t):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert set(gp_c) == set(gp_t) and len(gp_c) == 4 * layers
    for name in gp_t:
        torch.testing.assert_close(gp_c[name], gp_t[name], atol=1e-5, rtol=1e-5, msg=name)


def test_custom_rnn_starts_from_zeros_without_a_state():
    custom = CustomRNN("lstm", 3, 4, 2)
    x = torch.randn(2, 5, 3)
    zeros = torch.zeros(2, 2, 4)
    out_none, (h1, c1) = custom(x)
    out_zero, (h2, c2) = custom(x, (zeros, zeros.clone()))
    assert torch.equal(out_none, out_zero) and torch.equal(h1, h2) and torch.equal(c1, c2)


def test_custom_rnn_applies_dropout_between_layers_only_in_training():
    custom = CustomRNN("gru", 3, 4, 2, dropout=0.5)
    plain = CustomRNN("gru", 3, 4, 2)
    plain.load_state_dict(custom.state_dict())
    x = torch.randn(2, 5, 3)
    custom.eval()
    assert torch.equal(custom(x)[0], plain(x)[0])
    custom.train()
    torch.manual_seed(0)
    assert not torch.allclose(custom(x)[0], plain(x)[0])


def test_classic_gru_differs_from_the_torch_form():
    classic = CustomRNN("gru", 3, 4, 1, gru_form="classic")
    torch_form = CustomRNN("gru", 3, 4, 1, gru_form="torch")
    torch_form.load_state_dict(classic.state_dict())
    x = torch.randn(2, 5, 3)
    assert not torch.allclose(classic(x)[0], torch_form(x)[0], atol=1e-3)


# ---------------------------------------------------------------- gradcheck (float64)
def _dd(*shape, g):
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_cell_passes_gradcheck(nonlinearity):
    g = torch.Generator().manual_seed(1)
    B, H = 3, 4
    inputs = (_dd(B, H, g=g), _dd(B, H, g=g), _dd(H, H, g=g), _dd(H, g=g))
    assert torch.autograd.gradcheck(lambda *a: rnn_cell(*a, nonlinearity=nonlinearity), inputs)


@pytest.mark.parametrize("cell", [gru_cell, gru_cell_torch_form])
def test_gru_cells_pass_gradcheck(cell):
    g = torch.Generator().manual_seed(2)
    B, H = 3, 4
    inputs = (_dd(B, 3 * H, g=g), _dd(B, H, g=g), _dd(3 * H, H, g=g), _dd(3 * H, g=g))
    assert torch.autograd.gradcheck(cell, inputs)


def test_lstm_cell_passes_gradcheck():
    g = torch.Generator().manual_seed(3)
    B, H = 3, 4
    inputs = (_dd(B, 4 * H, g=g), _dd(B, H, g=g), _dd(B, H, g=g), _dd(4 * H, H, g=g), _dd(4 * H, g=g))
    assert torch.autograd.gradcheck(lstm_cell, inputs)


@pytest.mark.parametrize("cell,options", [("rnn", {}), ("gru", {"gru_form": "classic"}),
                                          ("gru", {"gru_form": "torch"}), ("lstm", {})])
def test_small_custom_rnn_passes_gradcheck(cell, options):
    """Gradients of a 2-layer stack with respect to input, initial state and every weight."""
    torch.manual_seed(4)
    E, H, B, T, L = 2, 3, 2, 3, 2
    module = CustomRNN(cell, E, H, L, **options).double()
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in module.parameters())
    g = torch.Generator().manual_seed(5)
    x = _dd(B, T, E, g=g)
    h0 = _dd(L, B, H, g=g)
    c0 = _dd(L, B, H, g=g)

    def run(x, h0, c0, *weights):
        state = (h0, c0) if cell == "lstm" else h0
        out, final = torch.func.functional_call(module, dict(zip(names, weights)), (x, state))
        finals = final if isinstance(final, tuple) else (final,)
        return (out, *finals)

    assert torch.autograd.gradcheck(run, (x, h0, c0, *params))


# ---------------------------------------------------------------- the equations by hand
def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_classic_gru_follows_its_equations():
    """u = σ(W_u [h, x] + b_u), r = σ(W_r [h, x] + b_r), c~ = tanh(W_c [r*h, x] + b_c), h' = u c~ + (1-u) h."""
    rng = np.random.default_rng(7)
    B, E, H = 2, 3, 2
    x = rng.normal(size=(B, E))
    h = rng.normal(size=(B, H))
    # textbook weights acting on the concatenation [h, x], one matrix per gate
    W_r, W_u, W_c = (rng.normal(size=(H, H + E)) for _ in range(3))
    b_r, b_u, b_c = (rng.normal(size=H) for _ in range(3))

    hx = np.concatenate([h, x], axis=1)
    r = _sigmoid(hx @ W_r.T + b_r)
    u = _sigmoid(hx @ W_u.T + b_u)
    c_tilde = np.tanh(np.concatenate([r * h, x], axis=1) @ W_c.T + b_c)
    expected = u * c_tilde + (1 - u) * h

    # the same weights in torch's layout: W_ih (3H, E), W_hh (3H, H), gates r, z(=u), n(=c~)
    w_ih = np.concatenate([W[:, H:] for W in (W_r, W_u, W_c)])
    w_hh = np.concatenate([W[:, :H] for W in (W_r, W_u, W_c)])
    b_ih = np.concatenate([b_r, b_u, b_c])
    b_hh = np.zeros(3 * H)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    x_proj = t(x) @ t(w_ih).T + t(b_ih)
    got = gru_cell(x_proj, t(h), t(w_hh), t(b_hh))
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)


def test_plain_rnn_cell_reproduces_the_course_reference_values():
    np.random.seed(1)
    xt = np.random.randn(3, 10)
    a_prev = np.random.randn(5, 10)
    Waa = np.random.randn(5, 5)
    Wax = np.random.randn(5, 3)
    Wya = np.random.randn(2, 5)
    ba = np.random.randn(5, 1)
    by = np.random.randn(2, 1)

    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    # the course is column-major (features, batch); charlm is batch-major (batch, features)
    x_proj = t(xt).T @ t(Wax).T + t(ba[:, 0])   # W_ax x<t> + b_a
    a_next = rnn_cell(x_proj, t(a_prev).T, t(Waa), torch.zeros(5, dtype=torch.float64)).T  # (5, 10)
    y = torch.softmax(t(Wya) @ a_next + t(by), dim=0)  # softmax over the 2 outputs, per column

    expected_a4 = [0.59584544, 0.18141802, 0.61311866, 0.99808218, 0.85016201,
                   0.99980978, -0.18887155, 0.99815551, 0.6531151, 0.82872037]
    expected_y1 = [0.9888161, 0.01682021, 0.21140899, 0.36817467, 0.98988387,
                   0.88945212, 0.36920224, 0.9966312, 0.9982559, 0.17746526]
    assert a_next.shape == (5, 10) and y.shape == (2, 10)
    np.testing.assert_allclose(a_next[4].numpy(), expected_a4, rtol=0, atol=1e-6)
    np.testing.assert_allclose(y[1].numpy(), expected_y1, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "lstm", "gru_torch_form"])
def test_each_step_function_equals_torchs_cell_on_the_same_weights(cell):
    """The readable step functions on their own (the layers' fast paths are compared with them elsewhere, so
    a mistake made in both, such as two LSTM gates swapped, would pass there but not here)."""
    E, H, B = 3, 4, 2
    torch.manual_seed(3)
    reference = {"rnn_tanh": nn.RNNCell(E, H, nonlinearity="tanh"), "rnn_relu": nn.RNNCell(E, H, nonlinearity="relu"),
                 "lstm": nn.LSTMCell(E, H), "gru_torch_form": nn.GRUCell(E, H)}[cell].double()
    x, h, c = (torch.randn(B, n, dtype=torch.float64) for n in (E, H, H))
    x_proj = x @ reference.weight_ih.t() + reference.bias_ih
    args = (reference.weight_hh, reference.bias_hh)
    with torch.no_grad():
        if cell == "lstm":
            got, expected = lstm_cell(x_proj, h, c, *args), reference(x, (h, c))
        elif cell == "gru_torch_form":
            got, expected = (gru_cell_torch_form(x_proj, h, *args),), (reference(x, h),)
        else:
            got, expected = (rnn_cell(x_proj, h, *args, nonlinearity=reference.nonlinearity),), (reference(x, h),)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_the_step_function_layers_drop_between_layers_only_in_training(cell):
    """Catches: CustomRNN(fast=False), which RNNLM.step and the export run, dropped between its layers in
    evaluation too (only the fast path was tested), so sampling and exports of a 2-layer model were random."""
    from charlm.cells import CustomRNN

    torch.manual_seed(0)
    custom = CustomRNN(cell, 3, 4, 2, dropout=0.5, fast=False)
    plain = CustomRNN(cell, 3, 4, 2, fast=False)
    plain.load_state_dict(custom.state_dict())
    x = torch.randn(2, 5, 3)
    custom.eval()
    torch.testing.assert_close(custom(x)[0], plain(x)[0], atol=0, rtol=0)
    custom.train()
    assert not torch.allclose(custom(x)[0], plain(x)[0])


def test_custom_rnn_initialises_like_torch():
    """Catches: the initial bound 1/H instead of 1/sqrt(H) (cells.py:136): a custom model started with weights
    four times smaller than torch's at H = 16, so custom and torch runs of one config trained differently."""
    torch.manual_seed(0)
    custom = CustomRNN("lstm", 3, 16, 2)
    bound = 1 / math.sqrt(16)
    values = torch.cat([p.detach().flatten() for p in custom.parameters()])
    assert values.abs().max() <= bound
    assert values.abs().max() > 0.9 * bound  # thousands of uniform draws: the largest is near the bound
    reference = nn.LSTM(3, 16, 2, batch_first=True)
    assert {n: p.shape for n, p in custom.named_parameters()} == {n: p.shape for n, p in reference.named_parameters()}


def test_an_unknown_cell_is_refused_by_name():
    """Catches: the unknown-cell check removed (cells.py:118): a KeyError ('transformer') instead of a
    ValueError naming the cell."""
    with pytest.raises(ValueError, match="unknown cell 'transformer'"):
        CustomRNN("transformer", 3, 4)
