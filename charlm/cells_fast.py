"""The fast form of the custom cells: one layer's whole time loop as a torch.autograd.Function.

`cells.py` writes each cell as a function of one time step and lets autograd
record every operation of every step; that is the reference. Here the same
equations run over all T steps of one layer with

- the input projection W_ih x<t> + b of all T steps as one matrix product,
  written into the gate buffer, to which each step adds W_hh a<t-1> in place
  (one product per step for all gates; two for the classic GRU, whose
  candidate needs the reset state first);
- time-major buffers (T, B, ...) allocated once, each step writing into its
  slice (no torch.stack, few temporaries), the per-step views made by one
  `unbind` before the loop;
- a hand-written backward pass through time that carries only da (and dc),
  with the weight gradients of all steps as one matrix product after the loop;
- the element-wise work between two products (activations, new cell and
  state, gate derivatives) in one or two C loops a step (LSTM, classic GRU)
  where `native.py` could build `native.c` (float32 on a CPU), else as the
  PyTorch operations written out below; for the classic GRU and the plain
  RNN from 8 steps up, where a packed product is at hand (`native.loops()`:
  MKL's, or native.c's own on AMD processors with AVX-512), the whole time
  loop, products included, in one C call forward and one backward; the
  LSTM's too, but only with native.c's own product (with MKL's it did not
  pay);
- the matrix products through `products.py`: oneDNN's on a CPU that has it,
  where the product is large enough to pay (about twice MKL's speed on some
  processors), with W_hh laid out once per window for the per-step products
  from batch 4 and 16 steps up; otherwise torch's, with a row-major copy of
  W_hh^T from 8 steps up.

Shapes: T time, B batch, E input, H hidden, G = (number of gates) * H. Every
Function takes the layer input x (T, B, E) time-major, the weights in torch's
layout, and the initial state. The recurrent bias b_hh is added to b_ih by the
caller wherever it only adds (RNN, LSTM, classic GRU): `bias` = b_ih + b_hh;
torch's GRU form multiplies W_hn h + b_hn by r, so there b_hh comes in apart.

Notation as in cells.py: a<t> hidden state, c<t> memory cell, Γ gates, c~ the
candidate; "da" is the gradient of the loss with respect to a<t>.
`tests/test_cells_fast.py` checks every Function against the step functions of
cells.py and against torch.nn, in float32 with the C loops and without, and
with torch.autograd.gradcheck in float64 (the PyTorch form: the loops are
float32 only); `tests/test_native.py` checks the loops themselves.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import native
from .products import Repeated, linear, mm, torch_products, weight_grad

_aten = torch.ops.aten


def _dsigmoid(grad: Tensor, y: Tensor, out: Tensor | None = None) -> Tensor:
    """grad * y * (1 - y): the chain rule through y = σ(x), in one kernel."""
    if out is None:
        return _aten.sigmoid_backward(grad, y)
    return _aten.sigmoid_backward.grad_input(grad, y, grad_input=out)


def _dtanh(grad: Tensor, y: Tensor, out: Tensor | None = None) -> Tensor:
    """grad * (1 - y²): the chain rule through y = tanh(x), in one kernel."""
    if out is None:
        return _aten.tanh_backward(grad, y)
    return _aten.tanh_backward.grad_input(grad, y, grad_input=out)


def _looked_up(x: Tensor) -> bool:
    """The first layer's input given as token ids (T, B), its projection looked up (see _project)."""
    return not x.is_floating_point()


def _project(x: Tensor, w_ih: Tensor, bias: Tensor | None) -> Tensor:
    """W_ih x<t> + b for every step: (T, B, E) -> (T, B, G), one matrix product.

    Or, for the first layer of a model with a small vocabulary (model.RNNLM), x holds the token ids
    (T, B) and w_ih the table (V, G) of W_ih e + b for every token's embedding e, bias None: each step's
    projection is then a row of the table, read rather than computed.
    """
    if _looked_up(x):
        return w_ih.index_select(0, x.reshape(-1)).view(*x.shape, -1)
    T, B, _ = x.shape
    return linear(x.reshape(T * B, -1), w_ih, bias).view(T, B, -1)


def _input_grads(ctx, d_proj: Tensor | tuple, x: Tensor, w_ih: Tensor) -> tuple:
    """dx, dW_ih, db from the gradient of the projection, for the Function inputs 0, 1, 2 (x, w_ih, b).

    `d_proj` (T, B, G), or a tuple of its consecutive blocks of gates kept in separate buffers (the
    classic GRU's), which are used as they are rather than joined into one copy first.
    """
    parts = d_proj if isinstance(d_proj, tuple) else (d_proj,)
    need = ctx.needs_input_grad
    d_x = d_w = d_b = None
    if _looked_up(x):  # the table's gradient: each step's rows added into the rows of its tokens
        if need[1]:
            # each block into a table of its own, joined after: index_add_ into a column slice of one
            # table took 2.7 ms against 0.35 ms (1,024 rows of 512 and 256 values into 65)
            blocks = [d.new_zeros(w_ih.shape[0], d.shape[2]).index_add_(0, x.reshape(-1), d.flatten(0, 1))
                      for d in parts]
            d_w = torch.cat(blocks, 1) if len(blocks) > 1 else blocks[0]
        return None, d_w, None
    if need[0]:
        start = 0
        for d in parts:  # dx = sum over the blocks of d_block W_ih[block]
            part = mm(d.flatten(0, 1), w_ih[start: start + d.shape[2]])
            d_x = part if d_x is None else d_x.add_(part)
            start += d.shape[2]
        d_x = d_x.view(x.shape)
    if need[1]:
        d_w = torch.cat([_weight_grad(d, x) for d in parts]) if len(parts) > 1 else _weight_grad(parts[0], x)
    if need[2]:
        d_b = torch.cat([d.sum((0, 1)) for d in parts])
    return d_x, d_w, d_b


def _native_fits(gates: Tensor, B: int, H: int, *states: Tensor) -> bool:
    """native.c's loops take these buffers: float32 on the CPU, and every state (B, H). A state of another
    batch size goes to the PyTorch form, which broadcasts it or refuses it; the C loops would read and
    write past its rows. `gates` may be W_ih (or the looked-up table) instead, before the gates exist: they
    take its dtype and device."""
    return all(s.shape == (B, H) for s in states) and native.usable(gates, *states)


def _whole_loop(T: int, fits: bool, lstm: tuple[int, int] | None = None) -> bool:
    """The whole time loop goes to native.c (its products through `native.gemm()`): the kernels take
    the buffers (`fits`, from _native_fits), a packed product is there (for an LSTM of `lstm` = (B, H),
    native.c's own, or MKL's in a loop split by rows: native.lstm_loops), and the window is long enough to
    repay laying W_hh out."""
    return fits and T >= native.LOOP_MIN_STEPS and (native.lstm_loops(*lstm) if lstm else native.loops())


def _loop_products(loop: bool):
    """A layer whose time loop runs in native.c, its recurrent products through MKL, takes torch's (MKL's)
    products for the rest of its work too (products.torch_products; measured in docs/benchmarks.md).
    With native.c's own product (where MKL is slow) the rest stays with oneDNN."""
    return torch_products() if loop and native.gemm_is_mkl() else nullcontext()


def _previous(first: Tensor, steps: Tensor) -> Tensor:
    """(B, H) and (T, B, H) -> the values at t-1 for every t: [first, steps[0], ..., steps[T-2]]."""
    return torch.cat([first.unsqueeze(0), steps[:-1]])


def _weight_grad(d_pre: Tensor, inputs: Tensor) -> Tensor:
    """dW = sum over t of d_pre<t>^T inputs<t>: one (G, T*B) x (T*B, H) product for all steps."""
    return weight_grad(d_pre.flatten(0, 1), inputs.flatten(0, 1))


def _recurrent_weight_grad(d_pre: Tensor, h0: Tensor, hs: Tensor) -> Tensor:
    """dW_hh = sum over t of d_pre<t>^T a<t-1>, with a<0> = h0: two products, no copy of hs."""
    return weight_grad(d_pre[1:].flatten(0, 1), hs[:-1].flatten(0, 1)).addmm_(d_pre[0].t(), h0)


# ---------------------------------------------------------------- plain RNN
def rnn_layer_forward(x: Tensor, w_ih: Tensor, bias: Tensor, h0: Tensor, w_hh: Tensor,
                      relu: bool = False) -> Tensor:
    """a<t> = tanh(W_ax x<t> + W_aa a<t-1> + b) for t = 1..T; returns all a<t>, (T, B, H)."""
    T, B, H = x.shape[0], x.shape[1], h0.shape[1]
    loop = _whole_loop(T, _native_fits(w_ih, B, H, h0))
    with _loop_products(loop):
        hs = _project(x, w_ih, bias)  # W_ax x<t> + b; each step adds W_aa a<t-1> and applies tanh in place
    if loop:
        native.rnn_forward_loop(native.Packed(w_hh.t(), B), hs, h0.contiguous(), relu, native.loop_parts(B))
        return hs
    w = Repeated(w_hh, h0.shape[0], x.shape[0])  # a<t-1> -> W_aa a<t-1>
    h = h0
    for a in hs.unbind(0):
        h = w.add_to(a, h)
        h.relu_() if relu else h.tanh_()
    return hs


class RNNLayer(torch.autograd.Function):
    """(x (T, B, E), w_ih (H, E), bias (H), h0 (B, H), w_hh (H, H), relu) -> hs (T, B, H)."""

    @staticmethod
    def forward(ctx, x, w_ih, bias, h0, w_hh, relu):
        hs = rnn_layer_forward(x, w_ih, bias, h0, w_hh, relu)
        ctx.relu = relu
        ctx.save_for_backward(x, w_ih, hs, h0, w_hh)
        return hs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_hs):
        x, w_ih, hs, h0, w_hh = ctx.saved_tensors
        T, B, H = hs.shape
        d_pre = torch.empty_like(hs)  # dL/d(pre-activation) of every step, (T, B, H)
        if _whole_loop(T, _native_fits(hs, B, H, h0)):
            if grad_hs.stride(2) != 1:  # the C loop takes each step's rows apart, but each row contiguous
                grad_hs = grad_hs.contiguous()
            native.rnn_backward_loop(native.Packed(w_hh, B), grad_hs, hs, d_pre, ctx.relu, native.loop_parts(B))
            with _loop_products(True):
                d_h0 = mm(d_pre[0], w_hh) if ctx.needs_input_grad[3] else None   # W_aa^T d_pre<1>
                d_w = _recurrent_weight_grad(d_pre, h0, hs) if ctx.needs_input_grad[4] else None
                return (*_input_grads(ctx, d_pre, x, w_ih), d_h0, d_w, None)
        D_PRE, HS, GRAD_HS = d_pre.unbind(0), hs.unbind(0), grad_hs.unbind(0)
        w_back = Repeated(w_hh.t(), hs.shape[1], T)  # d_pre -> W_aa^T d_pre
        for t in range(T - 1, -1, -1):
            # da<t> = (from the output) + (from step t+1: W_aa^T d_pre<t+1>)
            da = GRAD_HS[t] if t == T - 1 else w_back.plus(GRAD_HS[t], D_PRE[t + 1])
            if ctx.relu:
                _aten.threshold_backward.grad_input(da, HS[t], 0, grad_input=D_PRE[t])
            else:
                _dtanh(da, HS[t], out=D_PRE[t])
        d_h0 = w_back(d_pre[0]) if ctx.needs_input_grad[3] else None
        d_w = _recurrent_weight_grad(d_pre, h0, hs) if ctx.needs_input_grad[4] else None
        return (*_input_grads(ctx, d_pre, x, w_ih), d_h0, d_w, None)


# ---------------------------------------------------------------- LSTM
def lstm_layer_forward(x: Tensor, w_ih: Tensor, bias: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, save: bool):
    """The LSTM over T steps; gates in torch's order i, f, g, o.

    Returns hs (T, B, H), c<T> and the activated gates (T, B, 4H); with `save`
    also the cells c<0..T> (T+1, B, H) and tanh(c<t>) (T, B, H) that backward
    needs (without it, for inference and sampling, those buffers are a step or
    two long).
    """
    T, B = x.shape[:2]
    H = h0.shape[1]
    gates = _project(x, w_ih, bias)  # (T, B, 4H); each step adds W_hh a<t-1> and activates in place
    hs = gates.new_empty(T, B, H)
    cs = gates.new_empty(T + 1 if save else 2, B, H)  # with save, cs[t] = c<t>, cs[0] = c<0>
    if save:
        cs[0] = c0
    tanh_cs = gates.new_empty(T if save else 1, B, H)
    fits = _native_fits(gates, B, H, h0, c0)
    if _whole_loop(T, fits, lstm=(B, H)):
        native.lstm_forward_loop(native.Packed(w_hh.t(), B), gates, h0.contiguous(), c0.contiguous(), hs, cs,
                                 tanh_cs, save, native.loop_parts(B))
        return hs, cs[T if save else (T - 1) % 2], (gates, cs, tanh_cs)
    w = Repeated(w_hh, B, T)  # a<t-1> -> W_hh a<t-1>
    # Per-step views made once by unbind: indexing and slicing in the loop cost more than the math.
    Z, HS, CS, TANH_CS = gates.unbind(0), hs.unbind(0), cs.unbind(0), tanh_cs.unbind(0)
    h, c = h0, c0
    if fits:  # the same equations, each step's element-wise part in one C loop
        c = CS[0] if save else c0.contiguous()
        for t in range(T):
            c_new = CS[t + 1 if save else t % 2]
            native.lstm_forward(Z[t], w(h), c, c_new, TANH_CS[t if save else 0], HS[t])
            h, c = HS[t], c_new
        return hs, c, (gates, cs, tanh_cs)
    gate = gates.unflatten(2, (4, H))
    UF, U, F, C_TILDE, O = gates[..., : 2 * H].unbind(0), *(gate[:, :, k].unbind(0) for k in range(4))
    for t in range(T):
        w.add_to(Z[t], h)                              # W [a<t-1>, x<t>] + b for all gates, (B, 4H)
        UF[t].sigmoid_()                               # Γu, Γf
        C_TILDE[t].tanh_()                             # c~<t>
        O[t].sigmoid_()                                # Γo
        c_new = CS[t + 1 if save else t % 2]
        c = torch.mul(U[t], C_TILDE[t], out=c_new).addcmul_(F[t], c)  # c<t> = Γu * c~<t> + Γf * c<t-1>
        h = torch.mul(O[t], torch.tanh(c, out=TANH_CS[t if save else 0]), out=HS[t])       # a<t> = Γo * tanh(c<t>)
    return hs, c, (gates, cs, tanh_cs)


class LSTMLayer(torch.autograd.Function):
    """(x (T, B, E), w_ih (4H, E), bias (4H), h0 (B, H), c0 (B, H), w_hh (4H, H)) -> (hs (T, B, H), c<T>)."""

    @staticmethod
    def forward(ctx, x, w_ih, bias, h0, c0, w_hh):
        hs, c_last, (gates, cs, tanh_cs) = lstm_layer_forward(x, w_ih, bias, h0, c0, w_hh, save=True)
        ctx.save_for_backward(x, w_ih, gates, cs, tanh_cs, hs, h0, w_hh)
        return hs, c_last.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_hs, grad_c_last):
        x, w_ih, gates, cs, tanh_cs, hs, h0, w_hh = ctx.saved_tensors
        T, B, G = gates.shape
        H = G // 4
        d_pre = torch.empty_like(gates)               # dL/d(gate pre-activations), (T, B, 4H)
        fits = _native_fits(gates, B, H, h0)
        if fits and grad_hs.stride(2) != 1:  # the C kernels take each step's rows apart, but each row contiguous
            grad_hs = grad_hs.contiguous()
        if _whole_loop(T, fits, lstm=(B, H)):
            dc = grad_c_last.clone(memory_format=torch.contiguous_format)
            native.lstm_backward_loop(native.Packed(w_hh, B), grad_hs, dc, gates, cs, tanh_cs, d_pre,
                                      native.loop_parts(B))
            return LSTMLayer._finish(ctx, d_pre, dc, lambda d: mm(d, w_hh), x, w_ih, h0, hs)
        C_PREV, TANH_CS = cs.unbind(0), tanh_cs.unbind(0)  # C_PREV[t] = c<t-1> for the step t (from 0)
        D_PRE = d_pre.unbind(0)
        w_back = Repeated(w_hh.t(), B, T)  # d_pre -> W_hh^T d_pre
        if fits:  # the loop below, each step's element-wise part in one C loop
            dc = grad_c_last.clone(memory_format=torch.contiguous_format)
            GRAD_HS, Z = grad_hs.unbind(0), gates.unbind(0)
            for t in range(T - 1, -1, -1):
                rec = w_back(D_PRE[t + 1]) if t < T - 1 else torch.zeros_like(dc)   # W_hh^T d_pre<t+1>
                native.lstm_backward(GRAD_HS[t], rec, dc, Z[t], C_PREV[t], TANH_CS[t], D_PRE[t])
            return LSTMLayer._finish(ctx, d_pre, dc, w_back, x, w_ih, h0, hs)
        gate, d_gate = gates.unflatten(2, (4, H)), d_pre.unflatten(2, (4, H))
        U, F, C_TILDE, O = (gate[:, :, k].unbind(0) for k in range(4))  # Γu, Γf, c~, Γo at each step
        D_U, D_F, D_C, D_O = (d_gate[:, :, k].unbind(0) for k in range(4))
        GRAD_HS = grad_hs.unbind(0)
        # The factors are computed step by step rather than for all steps before the loop: each
        # step's values are then read once while in cache, which measured faster on a CPU.
        dc = grad_c_last
        for t in range(T - 1, -1, -1):
            # da<t> = (from the output) + (from step t+1: W_hh^T d_pre<t+1>)
            da = GRAD_HS[t] if t == T - 1 else w_back.plus(GRAD_HS[t], D_PRE[t + 1])
            _dsigmoid(da * TANH_CS[t], O[t], out=D_O[t])      # dΓo-pre = da * tanh(c<t>) * Γo (1 - Γo)
            dc = dc + _dtanh(da * O[t], TANH_CS[t])           # dc<t> = dc from t+1 + da * Γo * (1 - tanh²(c<t>))
            _dsigmoid(dc * C_TILDE[t], U[t], out=D_U[t])      # dΓu-pre = dc * c~<t> * Γu (1 - Γu)
            _dsigmoid(dc * C_PREV[t], F[t], out=D_F[t])       # dΓf-pre = dc * c<t-1> * Γf (1 - Γf)
            _dtanh(dc * U[t], C_TILDE[t], out=D_C[t])         # dc~-pre = dc * Γu * (1 - c~²)
            dc = dc * F[t]                                    # what c<t-1> receives: dc<t> * Γf
        return LSTMLayer._finish(ctx, d_pre, dc, w_back, x, w_ih, h0, hs)

    @staticmethod
    def _finish(ctx, d_pre, dc, w_back, x, w_ih, h0, hs):
        """The gradients of the Function's inputs from d_pre (T, B, 4H) and dL/dc<0>."""
        need = ctx.needs_input_grad
        d_h0 = w_back(d_pre[0]) if need[3] else None
        d_w = _recurrent_weight_grad(d_pre, h0, hs) if need[5] else None
        return (*_input_grads(ctx, d_pre, x, w_ih), d_h0, dc if need[4] else None, d_w)


# ---------------------------------------------------------------- GRU, classic form
def gru_layer_forward(x: Tensor, w_ih: Tensor, bias: Tensor, h0: Tensor, w_hh: Tensor, save: bool):
    """The classic GRU over T steps (gates r, u, c~ in torch's slots r, z, n).

    Returns hs (T, B, H), the activated gates Γr, Γu, c~ (T, B, 3H) and, with
    `save`, Γr * h<t-1> (T, B, H) for dW_c.
    """
    T, B = x.shape[:2]
    H = h0.shape[1]
    fits = _native_fits(w_ih, B, H, h0)
    loop = _whole_loop(T, fits)
    with _loop_products(loop):
        gates = _project(x, w_ih, bias)  # (T, B, 3H); each step adds its recurrent terms in place
    hs = gates.new_empty(T, B, H)
    rh = gates.new_empty(T if save else 1, B, H)
    if loop:
        native.gru_forward_loop(native.Packed(w_hh[: 2 * H].t(), B), native.Packed(w_hh[2 * H:].t(), B), gates,
                                h0.contiguous(), hs, rh, save, native.loop_parts(B))
        return hs, (gates, rh)
    w_ru, w_c = Repeated(w_hh[: 2 * H], B, T), Repeated(w_hh[2 * H:], B, T)
    RU, R, U, C_TILDE = (gates[..., : 2 * H].unbind(0), gates[..., :H].unbind(0),
                         gates[..., H: 2 * H].unbind(0), gates[..., 2 * H:].unbind(0))
    HS, RH = hs.unbind(0), rh.unbind(0)
    h = h0
    if fits:  # the same equations, the element-wise work between products in C
        h, Z = h0.contiguous(), gates.unbind(0)
        for t in range(T):
            r_h = RH[t if save else 0]
            native.gru_gates(RU[t], w_ru(h), h, r_h)
            native.gru_state(Z[t], w_c(r_h), h, HS[t])
            h = HS[t]
        return hs, (gates, rh)
    for t in range(T):
        w_ru.add_to(RU[t], h).sigmoid_()                               # Γr, Γu = σ(W [h<t-1>, x<t>] + b)
        r_h = torch.mul(R[t], h, out=RH[t if save else 0])            # Γr * h<t-1>
        w_c.add_to(C_TILDE[t], r_h).tanh_()                           # c~<t> = tanh(W_c [Γr * h<t-1>, x<t>] + b_c)
        h = torch.lerp(h, C_TILDE[t], U[t], out=HS[t])              # h<t> = h<t-1> + Γu (c~<t> - h<t-1>)
    return hs, (gates, rh)


class GRULayer(torch.autograd.Function):
    """Classic GRU: (x (T, B, E), w_ih (3H, E), bias (3H), h0 (B, H), w_hh (3H, H)) -> hs (T, B, H)."""

    @staticmethod
    def forward(ctx, x, w_ih, bias, h0, w_hh):
        hs, (gates, rh) = gru_layer_forward(x, w_ih, bias, h0, w_hh, save=True)
        ctx.save_for_backward(x, w_ih, gates, rh, hs, h0, w_hh)
        return hs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_hs):
        x, w_ih, gates, rh, hs, h0, w_hh = ctx.saved_tensors
        T, B, H = hs.shape
        h_prev = _previous(h0, hs)
        # dL/d(pre-activations) of r, u and of c~ in two buffers, so that each step's rows that go into
        # a matrix product are contiguous (oneDNN would copy a strided operand first)
        d_ru, d_c = hs.new_empty(T, B, 2 * H), hs.new_empty(T, B, H)
        fits = _native_fits(gates, B, H, h0)
        if fits and grad_hs.stride(2) != 1:  # the C loops take each step's rows apart, but each row contiguous
            grad_hs = grad_hs.contiguous()
        if _whole_loop(T, fits):
            carry, rec = hs.new_zeros(B, H), hs.new_zeros(B, H)
            native.gru_backward_loop(native.Packed(w_hh[: 2 * H], B), native.Packed(w_hh[2 * H:], B), grad_hs,
                                     gates, h_prev, d_ru, d_c, carry, rec, ctx.needs_input_grad[3],
                                     native.loop_parts(B))
            d_h0 = carry + rec if ctx.needs_input_grad[3] else None
            with _loop_products(True):
                return GRULayer._finish(ctx, d_h0, d_ru, d_c, h_prev, rh, x, w_ih)
        w_ru, w_c = Repeated(w_hh[: 2 * H].t(), B, T), Repeated(w_hh[2 * H:].t(), B, T)  # their transposes' products
        if fits:  # the loop below, its element-wise work in two C loops a step
            GRAD_HS, Z, H_PREV = grad_hs.unbind(0), gates.unbind(0), h_prev.unbind(0)
            D_RU, D_C = d_ru.unbind(0), d_c.unbind(0)
            dh, carry, rec = hs.new_empty(B, H), hs.new_zeros(B, H), hs.new_zeros(B, H)  # nothing from step T
            for t in range(T - 1, -1, -1):
                native.gru_backward_state(GRAD_HS[t], carry, rec, Z[t], H_PREV[t], dh, D_RU[t], D_C[t])
                native.gru_backward_reset(w_c(D_C[t]), dh, Z[t], H_PREV[t], D_RU[t], carry)
                if t > 0 or ctx.needs_input_grad[3]:
                    rec = w_ru(D_RU[t])              # W_ru^T [dΓr-pre, dΓu-pre], for dh<t-1>
            d_h0 = carry + rec if ctx.needs_input_grad[3] else None
            return GRULayer._finish(ctx, d_h0, d_ru, d_c, h_prev, rh, x, w_ih)
        r, u, cand = gates[..., :H], gates[..., H: 2 * H], gates[..., 2 * H:]
        # Factors that do not depend on the recurrence, for all steps at once:
        #   dc~-pre = dh * Γu (1 - c~²)              = dh * a_c
        #   dΓu-pre = dh * (c~ - h<t-1>) Γu (1 - Γu)  = dh * a_u
        #   dΓr-pre = d(Γr h) * h<t-1> Γr (1 - Γr)    = d(Γr h) * a_r
        A_C, A_U, A_R = _dtanh(u, cand).unbind(0), _dsigmoid(cand - h_prev, u).unbind(0), \
            _dsigmoid(h_prev, r).unbind(0)
        KEEP, R = (1 - u).unbind(0), r.unbind(0)      # h<t-1> passes (1 - Γu) of dh straight through
        D_RU, D_R, D_U, D_C = (d_ru.unbind(0), d_ru[..., :H].unbind(0), d_ru[..., H:].unbind(0), d_c.unbind(0))
        GRAD_HS = grad_hs.unbind(0)
        dh = GRAD_HS[T - 1]
        for t in range(T - 1, -1, -1):
            torch.mul(dh, A_C[t], out=D_C[t])
            torch.mul(dh, A_U[t], out=D_U[t])
            d_rh = w_c(D_C[t])                       # d(Γr * h<t-1>) = W_c^T dc~-pre
            torch.mul(d_rh, A_R[t], out=D_R[t])
            if t == 0 and not ctx.needs_input_grad[3]:
                break
            # dh<t-1> = (1 - Γu) dh + Γr d(Γr h) + W_ru^T [dΓr-pre, dΓu-pre] (+ from the output at t-1)
            carry = torch.mul(dh, KEEP[t]) if t == 0 else torch.addcmul(GRAD_HS[t - 1], dh, KEEP[t])
            dh = w_ru.plus(carry.addcmul_(d_rh, R[t]), D_RU[t])
        return GRULayer._finish(ctx, dh if ctx.needs_input_grad[3] else None, d_ru, d_c, h_prev, rh, x, w_ih)

    @staticmethod
    def _finish(ctx, d_h0, d_ru, d_c, h_prev, rh, x, w_ih):
        """The gradients of the Function's inputs from d_ru (T, B, 2H), d_c (T, B, H) and dL/dh<0>."""
        d_w = None
        if ctx.needs_input_grad[4]:
            d_w = torch.cat([_weight_grad(d_ru, h_prev), _weight_grad(d_c, rh)])
        return (*_input_grads(ctx, (d_ru, d_c), x, w_ih), d_h0, d_w)


# ---------------------------------------------------------------- GRU, torch's form
def gru_torch_layer_forward(x: Tensor, w_ih: Tensor, b_ih: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor,
                            save: bool):
    """nn.GRU's equations over T steps.

    Returns hs (T, B, H), the gates r, z, n (T, B, 3H) and, with `save`,
    W_h h<t-1> + b_h (T, B, 3H).
    """
    T, B = x.shape[:2]
    H = h0.shape[1]
    gates = _project(x, w_ih, b_ih)  # W_i x<t> + b_i, (T, B, 3H); each step completes it in place
    hs = gates.new_empty(T, B, H)
    gh = gates.new_empty(T if save else 1, B, 3 * H)
    w = Repeated(w_hh, B, T)  # h<t-1> -> W_h h<t-1>
    RZ, R, Z, N = (gates[..., : 2 * H].unbind(0), gates[..., :H].unbind(0), gates[..., H: 2 * H].unbind(0),
                   gates[..., 2 * H:].unbind(0))
    GH, GH_RZ, GH_N = gh.unbind(0), gh[..., : 2 * H].unbind(0), gh[..., 2 * H:].unbind(0)
    HS = hs.unbind(0)
    h = h0
    for t in range(T):
        k = t if save else 0
        w.into(GH[k], h, b_hh)                                 # W_h h<t-1> + b_h, (B, 3H)
        RZ[t].add_(GH_RZ[k]).sigmoid_()                        # r<t>, z<t> = σ(W_i x + b_i + W_h h + b_h)
        n = N[t].addcmul_(R[t], GH_N[k]).tanh_()               # n<t> = tanh(W_in x + b_in + r (W_hn h + b_hn))
        h = torch.lerp(n, h, Z[t], out=HS[t])                  # h<t> = n + z (h<t-1> - n) = (1 - z) n + z h<t-1>
    return hs, (gates, gh)


class GRUTorchLayer(torch.autograd.Function):
    """nn.GRU's form: (x (T, B, E), w_ih (3H, E), b_ih (3H), h0 (B, H), w_hh (3H, H), b_hh (3H)) -> hs."""

    @staticmethod
    def forward(ctx, x, w_ih, b_ih, h0, w_hh, b_hh):
        hs, (gates, gh) = gru_torch_layer_forward(x, w_ih, b_ih, h0, w_hh, b_hh, save=True)
        ctx.save_for_backward(x, w_ih, gates, gh, hs, h0, w_hh)
        return hs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_hs):
        x, w_ih, gates, gh, hs, h0, w_hh = ctx.saved_tensors
        T, B, H = hs.shape
        r, z, ns = gates[..., :H], gates[..., H: 2 * H], gates[..., 2 * H:]
        h_prev = _previous(h0, hs)
        # Factors that do not depend on the recurrence, for all steps at once:
        #   dn-pre  = dh * (1 - z) (1 - n²)                         = dh * a_n
        #   dz-pre  = dh * (h<t-1> - n) z (1 - z)                   = dh * a_z
        #   dr-pre  = dn-pre * (W_hn h + b_hn) r (1 - r)  and  d(W_hn h + b_hn) = dn-pre * r,  = dn-pre * f_rn
        A_N, A_Z = _dtanh(1 - z, ns).unbind(0), _dsigmoid(h_prev - ns, z).unbind(0)
        f_rn = hs.new_empty(T, B, 2, H)
        _dsigmoid(gh[..., 2 * H:], r, out=f_rn[:, :, 0])
        f_rn[:, :, 1].copy_(r)
        F_RN, Z = f_rn.unbind(0), z.unbind(0)
        d_gh = hs.new_empty(T, B, 3 * H)             # dL/d(W_h h<t-1> + b_h), slots r, z, n
        d_proj = hs.new_empty(T, B, 3 * H)           # dL/d(W_i x<t> + b_i): r and z as above, n = dn-pre
        D_GH, D_GH_Z = d_gh.unbind(0), d_gh[..., H: 2 * H].unbind(0)
        D_GH_RN = d_gh.unflatten(2, (3, H))[:, :, ::2].unbind(0)  # the r and n slots, (B, 2, H) per step
        D_N = d_proj[..., 2 * H:].unbind(0)
        GRAD_HS = grad_hs.unbind(0)
        w_back = Repeated(w_hh.t(), B, T)  # d_gh -> W_h^T d_gh
        dh = GRAD_HS[T - 1]
        for t in range(T - 1, -1, -1):
            if t < T - 1:
                # dh<t> = (from the output) + z<t+1> dh<t+1> + W_h^T d_gh<t+1>
                dh = w_back.plus(torch.addcmul(GRAD_HS[t], dh, Z[t + 1]), D_GH[t + 1])
            torch.mul(dh, A_Z[t], out=D_GH_Z[t])
            dn = torch.mul(dh, A_N[t], out=D_N[t])
            torch.mul(F_RN[t], dn.unsqueeze(1), out=D_GH_RN[t])
        d_proj[..., : 2 * H] = d_gh[..., : 2 * H]   # r and z pre-activations take x and h alike
        d_h0 = w_back.plus(dh * z[0], d_gh[0]) if ctx.needs_input_grad[3] else None
        d_w = _weight_grad(d_gh, h_prev) if ctx.needs_input_grad[4] else None
        d_b_hh = d_gh.sum((0, 1)) if ctx.needs_input_grad[5] else None
        return (*_input_grads(ctx, d_proj, x, w_ih), d_h0, d_w, d_b_hh)


def _needs_graph(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def rnn_layer(x: Tensor, w_ih: Tensor, bias: Tensor, h0: Tensor, w_hh: Tensor, relu: bool = False) -> Tensor:
    if _needs_graph(x, w_ih, bias, h0, w_hh):
        return RNNLayer.apply(x, w_ih, bias, h0, w_hh, relu)
    return rnn_layer_forward(x, w_ih, bias, h0, w_hh, relu)


def lstm_layer(x: Tensor, w_ih: Tensor, bias: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor) -> tuple[Tensor, Tensor]:
    if _needs_graph(x, w_ih, bias, h0, c0, w_hh):
        return LSTMLayer.apply(x, w_ih, bias, h0, c0, w_hh)
    hs, c, _ = lstm_layer_forward(x, w_ih, bias, h0, c0, w_hh, save=False)
    return hs, c


def gru_layer(x: Tensor, w_ih: Tensor, bias: Tensor, h0: Tensor, w_hh: Tensor) -> Tensor:
    if _needs_graph(x, w_ih, bias, h0, w_hh):
        return GRULayer.apply(x, w_ih, bias, h0, w_hh)
    return gru_layer_forward(x, w_ih, bias, h0, w_hh, save=False)[0]


def gru_torch_layer(x: Tensor, w_ih: Tensor, b_ih: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
    if _needs_graph(x, w_ih, b_ih, h0, w_hh, b_hh):
        return GRUTorchLayer.apply(x, w_ih, b_ih, h0, w_hh, b_hh)
    return gru_torch_layer_forward(x, w_ih, b_ih, h0, w_hh, b_hh, save=False)[0]
