"""Hand-written RNN, GRU and LSTM cells, and the stacked layer that runs them.

Each cell is a function of one time step, one line per equation. Shapes:
B batch, H hidden; `x_proj` is the input already multiplied by the input
weights, `W_ih x<t> + b_ih` of shape (B, G*H) with G gates. The layer computes
that product for every time step at once before the loop (one large matrix
product instead of T small ones), which changes nothing in the equations.

These step functions are the reference. `CustomRNN` runs by default the fast
form of the same equations in `cells_fast.py` (a whole layer's time loop as an
autograd Function with a hand-written backward pass), tested against them;
`CustomRNN(..., fast=False)` runs the step functions here under autograd.

Parameters follow torch's names, shapes and gate order (`weight_ih_l{k}`,
`weight_hh_l{k}`, `bias_ih_l{k}`, `bias_hh_l{k}`; LSTM gates i, f, g, o; GRU
r, z, n), so a state_dict moves between `CustomRNN` and nn.RNN / nn.GRU /
nn.LSTM unchanged. Notation in the comments: a<t> hidden state, c<t> LSTM
memory cell, Γ gates, c~ candidate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import cells_fast
from .runtime import intel_cpu

GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout, as nn.functional.dropout: in training each value is kept with probability 1 - p
    and scaled by 1 / (1 - p), else zeroed.

    On a CPU that is not Intel's, torch draws the Bernoulli mask one value at a time (ATen takes MKL's
    vectorised generator on Intel processors only): on the AMD Zen 4 host of 2026-12-06 a (20, 35, 256)
    mask took 2.1 ms, a uniform draw 0.5 ms. There the mask is a uniform draw u kept where u >= p,
    which happens with the same probability 1 - p.
    """
    if not training or p == 0:
        return x
    if not uniform_masks(x):
        return nn.functional.dropout(x, p, training=True)
    keep = torch.rand_like(x).ge_(p).mul_(1.0 / (1.0 - p))
    return x * keep


def uniform_masks(x: Tensor) -> bool:
    """Whether `dropout` draws x's mask from uniform numbers: float32 or float64 on a CPU that is not Intel's
    (bfloat16's and float16's uniform draws are too coarse near 1 to keep each value with probability 1 - p)."""
    return x.device.type == "cpu" and not intel_cpu() and x.dtype in (torch.float32, torch.float64)


def rnn_cell(x_proj: Tensor, a_prev: Tensor, w_hh: Tensor, b_hh: Tensor, nonlinearity: str = "tanh") -> Tensor:
    """Plain RNN: a<t> = tanh(W_aa a<t-1> + W_ax x<t> + b_a), with W_ax x<t> + b_ih in x_proj."""
    pre = x_proj + a_prev @ w_hh.t() + b_hh  # W_ax x<t> + W_aa a<t-1> + b_a
    return torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)


def lstm_cell(x_proj: Tensor, a_prev: Tensor, c_prev: Tensor, w_hh: Tensor, b_hh: Tensor) -> tuple[Tensor, Tensor]:
    """LSTM; x_proj holds W_i x<t> + b for the four gates in torch's order i, f, g, o."""
    gates = x_proj + a_prev @ w_hh.t() + b_hh  # W [a<t-1>, x<t>] + b for all gates, (B, 4H)
    i, f, g, o = gates.chunk(4, dim=1)
    gamma_u = torch.sigmoid(i)                 # update (input) gate  Γu = σ(W_u [a<t-1>, x<t>] + b_u)
    gamma_f = torch.sigmoid(f)                 # forget gate          Γf = σ(W_f [a<t-1>, x<t>] + b_f)
    c_tilde = torch.tanh(g)                    # candidate            c~<t> = tanh(W_c [a<t-1>, x<t>] + b_c)
    gamma_o = torch.sigmoid(o)                 # output gate          Γo = σ(W_o [a<t-1>, x<t>] + b_o)
    c = gamma_u * c_tilde + gamma_f * c_prev   # c<t> = Γu * c~<t> + Γf * c<t-1>
    a = gamma_o * torch.tanh(c)                # a<t> = Γo * tanh(c<t>)
    return a, c


def gru_cell(x_proj: Tensor, h_prev: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
    """GRU, the classic form; x_proj holds W_i x<t> + b for the gates in torch's order r, z, n.

    The update gate is torch's z, the candidate uses the reset hidden state
    inside the product, and the new state mixes u * c~ + (1 - u) * h<t-1>.
    """
    hidden = h_prev.shape[1]
    x_r, x_u, x_c = x_proj.chunk(3, dim=1)
    w_r, w_u, w_c = w_hh.split(hidden, dim=0)
    b_r, b_u, b_c = b_hh.split(hidden, dim=0)
    gamma_r = torch.sigmoid(x_r + h_prev @ w_r.t() + b_r)              # reset gate  Γr = σ(W_r [h<t-1>, x<t>] + b_r)
    gamma_u = torch.sigmoid(x_u + h_prev @ w_u.t() + b_u)              # update gate Γu = σ(W_u [h<t-1>, x<t>] + b_u)
    c_tilde = torch.tanh(x_c + (gamma_r * h_prev) @ w_c.t() + b_c)     # c~<t> = tanh(W_c [Γr * h<t-1>, x<t>] + b_c)
    return gamma_u * c_tilde + (1 - gamma_u) * h_prev                  # h<t> = Γu * c~<t> + (1 - Γu) * h<t-1>


def gru_cell_torch_form(x_proj: Tensor, h_prev: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
    """GRU as nn.GRU computes it: r multiplies (W_hn h + b_hn), and z keeps the old state."""
    x_r, x_z, x_n = x_proj.chunk(3, dim=1)
    h_r, h_z, h_n = (h_prev @ w_hh.t() + b_hh).chunk(3, dim=1)
    r = torch.sigmoid(x_r + h_r)   # r<t> = σ(W_ir x<t> + b_ir + W_hr h<t-1> + b_hr)
    z = torch.sigmoid(x_z + h_z)   # z<t> = σ(W_iz x<t> + b_iz + W_hz h<t-1> + b_hz)
    n = torch.tanh(x_n + r * h_n)  # n<t> = tanh(W_in x<t> + b_in + r<t> * (W_hn h<t-1> + b_hn))
    return (1 - z) * n + z * h_prev  # h<t> = (1 - z<t>) * n<t> + z<t> * h<t-1>


class CustomRNN(nn.Module):
    """A stack of hand-written cells with the interface of nn.RNN / nn.GRU / nn.LSTM (batch_first=True).

    forward(x (B, T, E), state) -> (output (B, T, H), state), where state is
    h (L, B, H), or (h, c) for the LSTM, or None for zeros.

    `fast=True` (the default) runs each layer as one autograd Function of
    cells_fast.py; `fast=False` runs the step functions of this file, every
    operation recorded by autograd: slower, the equations in plain sight.
    Dropout between layers is applied outside the Functions, on a layer's output.
    """

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0, nonlinearity: str = "tanh", gru_form: str = "classic", fast: bool = True,
                 weight_drop: float = 0.0):
        super().__init__()
        if cell not in GATES:
            raise ValueError(f"unknown cell {cell!r}")
        self.cell, self.input_size, self.hidden_size = cell, input_size, hidden_size
        self.num_layers, self.dropout = num_layers, dropout
        self.nonlinearity, self.gru_form = nonlinearity, gru_form
        self.fast = fast
        self.weight_drop = weight_drop
        gates = GATES[cell] * hidden_size
        for k in range(num_layers):
            in_size = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(gates, in_size)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(gates, hidden_size)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(gates)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(gates)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's initialisation: every weight uniform in (-1/sqrt(H), 1/sqrt(H))."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def layer_params(self, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """A layer's weights; in training with weight_drop, W_hh with a fresh DropConnect mask (one per call,
        so the same dropped weights serve every time step of the window)."""
        w_hh = getattr(self, f"weight_hh_l{k}")
        if self.weight_drop > 0 and self.training:
            w_hh = dropout(w_hh, self.weight_drop, True)
        return (getattr(self, f"weight_ih_l{k}"), w_hh, getattr(self, f"bias_ih_l{k}"), getattr(self, f"bias_hh_l{k}"))

    def _initial(self, state, batch: int, like: Tensor) -> tuple[Tensor, Tensor | None]:
        """(h0, c0) from `state` (c0 None but for the LSTM); zeros like `like`'s dtype and device for None."""
        if state is None:
            zeros = like.new_zeros(self.num_layers, batch, self.hidden_size)
            state = (zeros, zeros.clone()) if self.cell == "lstm" else zeros
        return state if self.cell == "lstm" else (state, None)

    def forward(self, x: Tensor, state=None):
        B, T, _ = x.shape
        h0, c0 = self._initial(state, B, x)
        if self.fast:
            return self._forward_fast(x, h0, c0)
        h_last, c_last = [], []
        layer_input = x
        for k in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = self.layer_params(k)
            if k > 0 and self.dropout > 0 and self.training:
                layer_input = dropout(layer_input, self.dropout, True)
            x_proj = torch.addmm(b_ih, layer_input.reshape(B * T, -1), w_ih.t()).view(B, T, -1)  # (B, T, G*H)
            h = h0[k]
            c = c0[k] if c0 is not None else None
            outputs = []
            for t in range(T):
                if self.cell == "lstm":
                    h, c = lstm_cell(x_proj[:, t], h, c, w_hh, b_hh)
                elif self.cell == "gru":
                    step = gru_cell if self.gru_form == "classic" else gru_cell_torch_form
                    h = step(x_proj[:, t], h, w_hh, b_hh)
                else:
                    h = rnn_cell(x_proj[:, t], h, w_hh, b_hh, self.nonlinearity)
                outputs.append(h)
            layer_input = torch.stack(outputs, dim=1)  # (B, T, H)
            h_last.append(h)
            c_last.append(c)
        h_n = torch.stack(h_last)  # (L, B, H)
        if self.cell == "lstm":
            return layer_input, (h_n, torch.stack(c_last))
        return layer_input, h_n

    def forward_tokens(self, tokens: Tensor, embedding: Tensor, state=None):
        """forward(embedding[tokens], state) for tokens (B, T), computed without the embeddings: the first
        layer's input projection W_ih e + b is worked out once for each of the V rows of `embedding` and
        looked up for every token. Same values (up to float32 rounding) and the same gradients, for the
        embedding too; it pays where a window holds more tokens than the vocabulary has rows (a character
        model), since the window's (B*T, E) x (E, G) product and its two backward products become a
        (V, E) x (E, G) product, a gather and a scatter. The fast path only (model.RNNLM decides)."""
        h0, c0 = self._initial(state, tokens.shape[0], embedding)
        return self._forward_fast(tokens, h0, c0, embedding)

    def _forward_fast(self, x: Tensor, h0: Tensor, c0: Tensor | None, embedding: Tensor | None = None):
        """The same layers with cells_fast's Functions, time-major inside: (T, B, ...) buffers. With
        `embedding`, x holds token ids (see forward_tokens)."""
        if torch.is_autocast_enabled(h0.device.type):
            # The Functions compute in their inputs' dtype; autocast would hand them bfloat16
            # projections next to float32 weights. The recurrence runs in float32, as the step
            # functions' element-wise operations do under autocast.
            with torch.autocast(h0.device.type, enabled=False):
                return self._forward_fast(x if embedding is not None else x.float(), h0.float(),
                                          None if c0 is None else c0.float(),
                                          None if embedding is None else embedding.float())
        h_last, c_last = [], []
        layer_input = x.transpose(0, 1).contiguous()  # (T, B, E), or token ids (T, B)
        for k in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = self.layer_params(k)
            if k > 0 and self.dropout > 0 and self.training:
                layer_input = dropout(layer_input, self.dropout, True)
            torch_form = self.cell == "gru" and self.gru_form != "classic"
            # torch's GRU form: r multiplies W_hn h + b_hn, so b_hh does not simply add to b_ih
            bias = b_ih if torch_form else b_ih + b_hh
            if k == 0 and embedding is not None:
                w_ih, bias = nn.functional.linear(embedding, w_ih, bias), None  # (V, G): W_ih e + b for each row e
            if torch_form:
                hs = cells_fast.gru_torch_layer(layer_input, w_ih, bias, h0[k], w_hh, b_hh)
            elif self.cell == "gru":
                hs = cells_fast.gru_layer(layer_input, w_ih, bias, h0[k], w_hh)
            elif self.cell == "lstm":
                hs, c = cells_fast.lstm_layer(layer_input, w_ih, bias, h0[k], c0[k], w_hh)
                c_last.append(c)
            else:
                hs = cells_fast.rnn_layer(layer_input, w_ih, bias, h0[k], w_hh, self.nonlinearity == "relu")
            h_last.append(hs[-1])
            layer_input = hs  # (T, B, H)
        output = layer_input.transpose(0, 1)  # (B, T, H)
        h_n = torch.stack(h_last)  # (L, B, H)
        if self.cell == "lstm":
            return output, (h_n, torch.stack(c_last))
        return output, h_n

    def extra_repr(self) -> str:
        return (f"{self.cell}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"dropout={self.dropout}, weight_drop={self.weight_drop}, batch_first=True")
