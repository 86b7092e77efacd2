"""One-token steps for generation, written with as few tensor operations as the equations allow.

`RNNLM.step` runs the model's modules for one token: embedding, dropout, the
cell, dropout, decoder, with their Python and dispatch overhead, about thirty
small eager operations. At hidden 256 the arithmetic of a step takes a few
microseconds and the overhead the rest. `Stepper` takes the same weights and
moves everything that does not depend on the state out of the loop:

- the first layer's input projection for every token of the vocabulary, one
  V x G*H table (W_ih e + b_ih, with b_hh folded in where it simply adds), so
  a step starts with a row lookup instead of an embedding and a product;
- transposed, contiguous copies of the recurrent and decoder weights;

and writes each cell with fused operations (`addmm`, `addcmul`, `lerp`). It
computes the same function as `RNNLM.step` (tests/test_stepper.py compares
them for every cell, implementation, GRU form and depth). It holds copies of
the weights: build it after training, not before.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .model import RNNLM, State


class _Layer:
    """One layer's weights, as the step uses them, and the buffers its operations write into."""

    def __init__(self, **tensors: Tensor):
        self.__dict__.update(tensors)


class Stepper:
    """Stepper(model, state).step(tokens (B,), out (B, V)) writes the next logits into `out`.

    The batch size is that of `state`. Every intermediate has a buffer made once,
    and the gate slices are views made once, so a step allocates nothing.
    """

    def __init__(self, model: RNNLM, state: State):
        if model.adaptive:
            raise ValueError("Stepper needs a full softmax decoder")
        cfg = model.cfg
        relu = cfg.cell == "rnn" and cfg.nonlinearity == "relu"
        # nn.GRU always computes torch's form; the custom GRU computes the one its config names.
        classic = cfg.cell == "gru" and cfg.impl == "custom" and cfg.gru_form == "classic"
        H = cfg.hidden_size
        if cfg.cell == "lstm":
            h0, c0 = (s.detach() for s in state)
        else:
            h0, c0 = state.detach(), None
        B = h0.shape[1]
        rnn = model.rnn
        self.layers: list[_Layer] = []
        with torch.no_grad():
            for k in range(cfg.layers):
                w_ih, w_hh, b_ih, b_hh = (getattr(rnn, f"{name}_l{k}").detach()
                                          for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
                # b_hh adds to the input side, except in torch's GRU form, where r multiplies W_hn h + b_hn
                torch_gru = cfg.cell == "gru" and not classic
                b_in = b_ih if torch_gru else b_ih + b_hh
                x = h0.new_empty(B, w_ih.shape[0])
                layer = _Layer(x=x, h=h0[k].clone())
                if k == 0:
                    layer.table = torch.addmm(b_in, model.encoder.weight.detach(), w_ih.t())  # (V, G*H)
                else:
                    layer.w_ih, layer.b_in = w_ih.t().contiguous(), b_in
                if classic:  # Γr is applied to h before its product with W_c: two recurrent products
                    layer.w_ru, layer.w_c = w_hh[:2 * H].t().contiguous(), w_hh[2 * H:].t().contiguous()
                    layer.ru, layer.rh, layer.c_tilde = h0.new_empty(B, 2 * H), h0.new_empty(B, H), h0.new_empty(B, H)
                    layer.x_ru, layer.x_c = x[:, :2 * H], x[:, 2 * H:]
                    layer.r, layer.u = layer.ru[:, :H], layer.ru[:, H:]
                    layer.run = self._gru_classic
                elif torch_gru:
                    layer.w_hh, layer.b_hh = w_hh.t().contiguous(), b_hh.clone()
                    layer.gh, layer.rz, layer.n = h0.new_empty(B, 3 * H), h0.new_empty(B, 2 * H), h0.new_empty(B, H)
                    layer.x_rz, layer.x_n = x[:, :2 * H], x[:, 2 * H:]
                    layer.gh_rz, layer.gh_n = layer.gh[:, :2 * H], layer.gh[:, 2 * H:]
                    layer.r, layer.z = layer.rz[:, :H], layer.rz[:, H:]
                    layer.run = self._gru_torch
                elif cfg.cell == "lstm":
                    layer.w_hh, layer.c = w_hh.t().contiguous(), c0[k].clone()
                    layer.gates, layer.sig = h0.new_empty(B, 4 * H), h0.new_empty(B, 4 * H)
                    layer.c_tilde, layer.tanh_c = h0.new_empty(B, H), h0.new_empty(B, H)
                    layer.g = layer.gates[:, 2 * H:3 * H]
                    layer.i, layer.f, layer.o = layer.sig[:, :H], layer.sig[:, H:2 * H], layer.sig[:, 3 * H:]
                    layer.run = self._lstm
                else:
                    layer.w_hh, layer.pre = w_hh.t().contiguous(), h0.new_empty(B, H)
                    layer.relu = relu
                    layer.run = self._rnn
                self.layers.append(layer)
            self.w_out = model.decoder.weight.detach().t().contiguous()  # (H, V)
            self.b_out = model.decoder.bias.detach().clone()

    def step(self, tokens: Tensor, out: Tensor) -> None:
        """Call under torch.no_grad(): reads one token per stream, writes the logits that follow it."""
        first = self.layers[0]
        torch.index_select(first.table, 0, tokens, out=first.x)  # W_ih e<t> + b for every gate (B, G*H)
        below = first.run(first)
        for layer in self.layers[1:]:
            torch.addmm(layer.b_in, below, layer.w_ih, out=layer.x)
            below = layer.run(layer)
        torch.addmm(self.b_out, below, self.w_out, out=out)

    @staticmethod
    def _rnn(ly: _Layer) -> Tensor:
        torch.addmm(ly.x, ly.h, ly.w_hh, out=ly.pre)   # W_ax x<t> + W_aa a<t-1> + b
        return torch.clamp(ly.pre, min=0.0, out=ly.h) if ly.relu else torch.tanh(ly.pre, out=ly.h)

    @staticmethod
    def _lstm(ly: _Layer) -> Tensor:
        torch.addmm(ly.x, ly.h, ly.w_hh, out=ly.gates)  # i, f, g, o
        torch.sigmoid(ly.gates, out=ly.sig)             # Γu, Γf, (unused), Γo
        torch.tanh(ly.g, out=ly.c_tilde)                # c~<t>
        ly.c.mul_(ly.f).addcmul_(ly.i, ly.c_tilde)      # c<t> = Γf c<t-1> + Γu c~<t>
        torch.tanh(ly.c, out=ly.tanh_c)
        return torch.mul(ly.o, ly.tanh_c, out=ly.h)     # a<t> = Γo tanh(c<t>)

    @staticmethod
    def _gru_classic(ly: _Layer) -> Tensor:
        torch.addmm(ly.x_ru, ly.h, ly.w_ru, out=ly.ru).sigmoid_()    # Γr, Γu
        torch.mul(ly.r, ly.h, out=ly.rh)                              # Γr * h<t-1>
        torch.addmm(ly.x_c, ly.rh, ly.w_c, out=ly.c_tilde).tanh_()   # c~<t>
        return torch.lerp(ly.h, ly.c_tilde, ly.u, out=ly.h)          # Γu c~<t> + (1 - Γu) h<t-1>

    @staticmethod
    def _gru_torch(ly: _Layer) -> Tensor:
        torch.addmm(ly.b_hh, ly.h, ly.w_hh, out=ly.gh)               # W_hh h<t-1> + b_hh
        torch.add(ly.x_rz, ly.gh_rz, out=ly.rz).sigmoid_()            # r, z
        torch.addcmul(ly.x_n, ly.r, ly.gh_n, out=ly.n).tanh_()        # n<t>
        return torch.lerp(ly.n, ly.h, ly.z, out=ly.h)                # (1 - z) n<t> + z h<t-1>
