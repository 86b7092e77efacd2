"""The fast form of the custom cells: one layer's whole time loop as a torch.autograd.Function.

`cells.py` writes each cell as a function of one time step and lets autograd
record every operation of every step; that is the reference. Here the same
equations run over all T steps of one layer with

- time-major buffers (T, B, ...) allocated once, each step writing into its
  slice with `out=` (no torch.stack, few temporaries);
- one matrix product per step for all gates (two for the classic GRU, whose
  candidate needs the reset state first);
- a hand-written backward pass through time: the factors of the chain rule
  that do not depend on the recurrence (Γ (1 - Γ), 1 - tanh²(c), ...) are
  computed for all steps at once before the backward loop, the loop carries
  only da and dc, and the weight gradient of all steps is one matrix product
  after it.

Shapes: T time, B batch, H hidden, G the number of gates. `x_proj` (T, B, G*H)
is the input projection W_ih x<t> + b, computed for every step by the caller
(`cells.CustomRNN`), so its gradient, `d_x_proj`, is what the Function returns
and autograd turns it into dW_ih, db and dx with matrix products. The
recurrent biases b_hh are folded into `x_proj` wherever they only add (RNN,
LSTM, classic GRU); torch's GRU form multiplies W_hn h + b_hn by r, so there
b_hh comes in separately.

Notation as in cells.py: a<t> hidden state, c<t> memory cell, Γ gates, c~ the
candidate; "da" is the gradient of the loss with respect to a<t>.
`tests/test_cells_fast.py` checks every Function against the step functions of
cells.py, against torch.nn, and with torch.autograd.gradcheck.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.amp import custom_bwd, custom_fwd
from torch.autograd.function import once_differentiable

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


def _transposed(w: Tensor, steps: int) -> Tensor:
    """W^T for the per-step products a<t-1> W^T: a row-major copy runs them faster (by 15-25% on a
    CPU), which pays for the copy over a window but not for the one step of sampling."""
    return w.t().contiguous() if steps >= 8 else w.t()


def _previous(first: Tensor, steps: Tensor) -> Tensor:
    """(B, H) and (T, B, H) -> the values at t-1 for every t: [first, steps[0], ..., steps[T-2]]."""
    return torch.cat([first.unsqueeze(0), steps[:-1]])


def _weight_grad(d_pre: Tensor, inputs: Tensor) -> Tensor:
    """dW = sum over t of d_pre<t>^T inputs<t>: one (G, T*B) x (T*B, H) product for all steps."""
    return d_pre.flatten(0, 1).t() @ inputs.flatten(0, 1)


# ---------------------------------------------------------------- plain RNN
def rnn_layer_forward(x_proj: Tensor, h0: Tensor, w_hh: Tensor, relu: bool = False) -> Tensor:
    """a<t> = tanh(W_ax x<t> + b + W_aa a<t-1>) for t = 1..T; returns all a<t>, (T, B, H)."""
    hs = x_proj.new_empty(x_proj.shape[0], *h0.shape)
    w_t = _transposed(w_hh, x_proj.shape[0])
    h = h0
    for t in range(x_proj.shape[0]):
        h = torch.addmm(x_proj[t], h, w_t, out=hs[t])
        h.relu_() if relu else h.tanh_()
    return hs


class RNNLayer(torch.autograd.Function):
    """(x_proj (T, B, H), h0 (B, H), w_hh (H, H), relu) -> hs (T, B, H)."""

    @staticmethod
    @custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, x_proj, h0, w_hh, relu):
        hs = rnn_layer_forward(x_proj, h0, w_hh, relu)
        ctx.relu = relu
        ctx.save_for_backward(hs, h0, w_hh)
        return hs

    @staticmethod
    @once_differentiable
    @custom_bwd(device_type="cuda")
    def backward(ctx, grad_hs):
        hs, h0, w_hh = ctx.saved_tensors
        grad_hs = grad_hs.contiguous()
        d_pre = torch.empty_like(hs)  # dL/d(pre-activation) of every step, (T, B, H)
        for t in reversed(range(hs.shape[0])):
            # da<t> = (from the output) + (from step t+1: W_aa^T d_pre<t+1>)
            da = grad_hs[t] if t == hs.shape[0] - 1 else torch.addmm(grad_hs[t], d_pre[t + 1], w_hh)
            if ctx.relu:
                _aten.threshold_backward.grad_input(da, hs[t], 0, grad_input=d_pre[t])
            else:
                _dtanh(da, hs[t], out=d_pre[t])
        d_h0 = d_pre[0] @ w_hh if ctx.needs_input_grad[1] else None
        d_w = _weight_grad(d_pre, _previous(h0, hs)) if ctx.needs_input_grad[2] else None
        return d_pre, d_h0, d_w, None


# ---------------------------------------------------------------- LSTM
def lstm_layer_forward(x_proj: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, save: bool):
    """The LSTM over T steps; gates in torch's order i, f, g, o.

    Returns hs (T, B, H), c<T> and, with `save`, the activated gates (T, B, 4H)
    and the cells c<t> (T, B, H) and tanh(c<t>) (T, B, H) that backward needs.
    Without `save` (inference, sampling) the buffers are one step long.
    """
    T, B, G = x_proj.shape
    H = G // 4
    n = T if save else 1
    hs = x_proj.new_empty(T, B, H)
    gates = x_proj.new_empty(n, B, G)
    cs = x_proj.new_empty(T if save else 2, B, H)
    tanh_cs = x_proj.new_empty(n, B, H)
    w_t = _transposed(w_hh, x_proj.shape[0])
    h, c = h0, c0
    for t in range(T):
        k = t if save else 0
        z = torch.addmm(x_proj[t], h, w_t, out=gates[k])  # W [a<t-1>, x<t>] + b for all gates, (B, 4H)
        z[:, : 2 * H].sigmoid_()                          # Γu, Γf
        z[:, 2 * H: 3 * H].tanh_()                        # c~<t>
        z[:, 3 * H:].sigmoid_()                           # Γo
        c_new = torch.mul(z[:, :H], z[:, 2 * H: 3 * H], out=cs[t if save else t % 2])  # Γu * c~<t>
        c = c_new.addcmul_(z[:, H: 2 * H], c)             # c<t> = Γu * c~<t> + Γf * c<t-1>
        h = torch.mul(z[:, 3 * H:], torch.tanh(c, out=tanh_cs[k]), out=hs[t])  # a<t> = Γo * tanh(c<t>)
    return hs, c, (gates, cs, tanh_cs)


class LSTMLayer(torch.autograd.Function):
    """(x_proj (T, B, 4H), h0 (B, H), c0 (B, H), w_hh (4H, H)) -> (hs (T, B, H), c<T> (B, H))."""

    @staticmethod
    @custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, x_proj, h0, c0, w_hh):
        hs, c_last, (gates, cs, tanh_cs) = lstm_layer_forward(x_proj, h0, c0, w_hh, save=True)
        ctx.save_for_backward(gates, cs, tanh_cs, hs, h0, c0, w_hh)
        return hs, c_last.clone()

    @staticmethod
    @once_differentiable
    @custom_bwd(device_type="cuda")
    def backward(ctx, grad_hs, grad_c_last):
        gates, cs, tanh_cs, hs, h0, c0, w_hh = ctx.saved_tensors
        T, B, G = gates.shape
        H = G // 4
        grad_hs = grad_hs.contiguous()
        i, f, g, o = gates.unflatten(2, (4, H)).unbind(2)  # Γu, Γf, c~, Γo, each (T, B, H)
        # Factors of the chain rule that do not depend on the recurrence, for all steps at once:
        #   dΓo-pre = da * tanh(c<t>) * Γo (1 - Γo)                  = da * a_o
        #   dc     += da * Γo * (1 - tanh²(c<t>))                     = da * a_c
        #   dΓu-pre = dc * c~<t> * Γu (1 - Γu)                         = dc * b[:, :, 0]
        #   dΓf-pre = dc * c<t-1> * Γf (1 - Γf)                        = dc * b[:, :, 1]
        #   dc~-pre = dc * Γu * (1 - c~²)                              = dc * b[:, :, 2]
        a_o = _dsigmoid(tanh_cs, o)
        a_c = _dtanh(o, tanh_cs)
        b = gates.new_empty(T, B, 3, H)
        _dsigmoid(g, i, out=b[:, :, 0])
        _dsigmoid(_previous(c0, cs), f, out=b[:, :, 1])
        _dtanh(i, g, out=b[:, :, 2])
        d_pre = torch.empty_like(gates)             # dL/d(gate pre-activations), (T, B, 4H)
        d_ufg = d_pre[..., : 3 * H].unflatten(2, (3, H))  # the Γu, Γf, c~ parts, (T, B, 3, H)
        d_o = d_pre[..., 3 * H:]
        dc = grad_c_last
        for t in reversed(range(T)):
            # da<t> = (from the output) + (from step t+1: W_hh^T d_pre<t+1>)
            da = grad_hs[t] if t == T - 1 else torch.addmm(grad_hs[t], d_pre[t + 1], w_hh)
            torch.mul(da, a_o[t], out=d_o[t])
            dc = torch.addcmul(dc, da, a_c[t])      # dc<t> = dc from step t+1 + da * Γo (1 - tanh²(c<t>))
            torch.mul(b[t], dc.unsqueeze(1), out=d_ufg[t])
            dc = dc * f[t]                          # what c<t-1> receives: dc<t> * Γf
        d_h0 = d_pre[0] @ w_hh if ctx.needs_input_grad[1] else None
        d_w = _weight_grad(d_pre, _previous(h0, hs)) if ctx.needs_input_grad[3] else None
        return d_pre, d_h0, dc, d_w


# ---------------------------------------------------------------- GRU, classic form
def gru_layer_forward(x_proj: Tensor, h0: Tensor, w_hh: Tensor, save: bool):
    """The classic GRU over T steps (gates r, u, c~ in torch's slots r, z, n); biases are in x_proj.

    Returns hs (T, B, H) and, with `save`, Γr and Γu (T, B, 2H), Γr * h<t-1>
    (T, B, H) and c~<t> (T, B, H).
    """
    T, B, G = x_proj.shape
    H = G // 3
    n = T if save else 1
    hs = x_proj.new_empty(T, B, H)
    ru = x_proj.new_empty(n, B, 2 * H)
    rh = x_proj.new_empty(n, B, H)
    cand = x_proj.new_empty(n, B, H)
    w_ru_t, w_c_t = _transposed(w_hh[: 2 * H], T), _transposed(w_hh[2 * H:], T)
    h = h0
    for t in range(T):
        k = t if save else 0
        gamma = torch.addmm(x_proj[t, :, : 2 * H], h, w_ru_t, out=ru[k]).sigmoid_()  # Γr, Γu = σ(W [h<t-1>, x<t>] + b)
        r_h = torch.mul(gamma[:, :H], h, out=rh[k])                                # Γr * h<t-1>
        c = torch.addmm(x_proj[t, :, 2 * H:], r_h, w_c_t, out=cand[k]).tanh_()   # c~ = tanh(W_c [Γr * h, x] + b_c)
        h = torch.sub(c, h, out=hs[t]).mul_(gamma[:, H:]).add_(h)  # h<t> = h<t-1> + Γu (c~ - h<t-1>)
    return hs, (ru, rh, cand)


class GRULayer(torch.autograd.Function):
    """Classic GRU: (x_proj (T, B, 3H), h0 (B, H), w_hh (3H, H)) -> hs (T, B, H)."""

    @staticmethod
    @custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, x_proj, h0, w_hh):
        hs, (ru, rh, cand) = gru_layer_forward(x_proj, h0, w_hh, save=True)
        ctx.save_for_backward(ru, rh, cand, hs, h0, w_hh)
        return hs

    @staticmethod
    @once_differentiable
    @custom_bwd(device_type="cuda")
    def backward(ctx, grad_hs):
        ru, rh, cand, hs, h0, w_hh = ctx.saved_tensors
        T, B, H = hs.shape
        grad_hs = grad_hs.contiguous()
        w_ru, w_c = w_hh[: 2 * H], w_hh[2 * H:]
        r, u = ru[..., :H], ru[..., H:]
        h_prev = _previous(h0, hs)
        # Factors that do not depend on the recurrence, for all steps at once:
        #   dc~-pre = dh * Γu (1 - c~²)              = dh * a_c
        #   dΓu-pre = dh * (c~ - h<t-1>) Γu (1 - Γu)  = dh * a_u
        #   dΓr-pre = d(Γr h) * h<t-1> Γr (1 - Γr)    = d(Γr h) * a_r
        a_c = _dtanh(u, cand)
        a_u = _dsigmoid(cand - h_prev, u)
        a_r = _dsigmoid(h_prev, r)
        keep = 1 - u                                 # h<t-1> passes (1 - Γu) of dh straight through
        d_pre = hs.new_empty(T, B, 3 * H)            # dL/d(pre-activations of r, u, c~), (T, B, 3H)
        d_r, d_u, d_c = d_pre[..., :H], d_pre[..., H: 2 * H], d_pre[..., 2 * H:]
        dh = grad_hs[T - 1]
        for t in reversed(range(T)):
            torch.mul(dh, a_c[t], out=d_c[t])
            torch.mul(dh, a_u[t], out=d_u[t])
            d_rh = d_c[t] @ w_c                      # d(Γr * h<t-1>) = W_c^T dc~-pre
            torch.mul(d_rh, a_r[t], out=d_r[t])
            if t == 0 and not ctx.needs_input_grad[1]:
                break
            # dh<t-1> = (1 - Γu) dh + Γr d(Γr h) + W_ru^T [dΓr-pre, dΓu-pre] (+ from the output at t-1)
            carry = torch.mul(dh, keep[t]) if t == 0 else torch.addcmul(grad_hs[t - 1], dh, keep[t])
            dh = torch.addmm(carry.addcmul_(d_rh, r[t]), d_pre[t, :, : 2 * H], w_ru)
        d_h0 = dh if ctx.needs_input_grad[1] else None
        d_w = None
        if ctx.needs_input_grad[2]:
            d_w = torch.cat([_weight_grad(d_pre[..., : 2 * H], h_prev), _weight_grad(d_c, rh)])
        return d_pre, d_h0, d_w


# ---------------------------------------------------------------- GRU, torch's form
def gru_torch_layer_forward(x_proj: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor, save: bool):
    """nn.GRU's equations over T steps; x_proj holds W_i x<t> + b_i only.

    Returns hs (T, B, H) and, with `save`, r and z (T, B, 2H), n (T, B, H) and
    W_h h<t-1> + b_h (T, B, 3H).
    """
    T, B, G = x_proj.shape
    H = G // 3
    k_len = T if save else 1
    hs = x_proj.new_empty(T, B, H)
    rz = x_proj.new_empty(k_len, B, 2 * H)
    ns = x_proj.new_empty(k_len, B, H)
    gh = x_proj.new_empty(k_len, B, G)
    w_t = _transposed(w_hh, x_proj.shape[0])
    h = h0
    for t in range(T):
        k = t if save else 0
        hh = torch.addmm(b_hh, h, w_t, out=gh[k])                                  # W_h h<t-1> + b_h, (B, 3H)
        g = torch.add(x_proj[t, :, : 2 * H], hh[:, : 2 * H], out=rz[k]).sigmoid_()  # r<t>, z<t>
        n = torch.addcmul(x_proj[t, :, 2 * H:], g[:, :H], hh[:, 2 * H:], out=ns[k]).tanh_()  # n = tanh(.. + r (W_hn h + b_hn))
        h = torch.sub(h, n, out=hs[t]).mul_(g[:, H:]).add_(n)                     # h<t> = n + z (h<t-1> - n)
    return hs, (rz, ns, gh)


class GRUTorchLayer(torch.autograd.Function):
    """nn.GRU's form: (x_proj (T, B, 3H), h0 (B, H), w_hh (3H, H), b_hh (3H)) -> hs (T, B, H)."""

    @staticmethod
    @custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, x_proj, h0, w_hh, b_hh):
        hs, (rz, ns, gh) = gru_torch_layer_forward(x_proj, h0, w_hh, b_hh, save=True)
        ctx.save_for_backward(rz, ns, gh, hs, h0, w_hh)
        return hs

    @staticmethod
    @once_differentiable
    @custom_bwd(device_type="cuda")
    def backward(ctx, grad_hs):
        rz, ns, gh, hs, h0, w_hh = ctx.saved_tensors
        T, B, H = hs.shape
        grad_hs = grad_hs.contiguous()
        r, z = rz[..., :H], rz[..., H:]
        h_prev = _previous(h0, hs)
        # Factors that do not depend on the recurrence, for all steps at once:
        #   dn-pre  = dh * (1 - z) (1 - n²)                         = dh * a_n
        #   dz-pre  = dh * (h<t-1> - n) z (1 - z)                   = dh * a_z
        #   dr-pre  = dn-pre * (W_hn h + b_hn) r (1 - r)  and  d(W_hn h + b_hn) = dn-pre * r,  = dn-pre * f_rn
        a_n = _dtanh(1 - z, ns)
        a_z = _dsigmoid(h_prev - ns, z)
        f_rn = hs.new_empty(T, B, 2, H)
        _dsigmoid(gh[..., 2 * H:], r, out=f_rn[:, :, 0])
        f_rn[:, :, 1].copy_(r)
        d_gh = hs.new_empty(T, B, 3 * H)             # dL/d(W_h h<t-1> + b_h), slots r, z, n
        d_gh_z = d_gh[..., H: 2 * H]
        d_gh_rn = d_gh.unflatten(2, (3, H))[:, :, ::2]  # the r and n slots, (T, B, 2, H)
        d_xn = hs.new_empty(T, B, H)                 # dL/d(W_in x + b_in) = dn-pre
        dh = grad_hs[T - 1]
        for t in reversed(range(T)):
            if t < T - 1:
                # dh<t> = (from the output) + z<t+1> dh<t+1> + W_h^T d_gh<t+1>
                dh = torch.addmm(torch.addcmul(grad_hs[t], dh, z[t + 1]), d_gh[t + 1], w_hh)
            torch.mul(dh, a_z[t], out=d_gh_z[t])
            dn = torch.mul(dh, a_n[t], out=d_xn[t])
            torch.mul(f_rn[t], dn.unsqueeze(1), out=d_gh_rn[t])
        d_h0 = torch.addmm(dh * z[0], d_gh[0], w_hh) if ctx.needs_input_grad[1] else None
        d_x = torch.cat([d_gh[..., : 2 * H], d_xn], dim=2)  # r and z pre-activations take x and h alike
        d_w = _weight_grad(d_gh, h_prev) if ctx.needs_input_grad[2] else None
        d_b = d_gh.sum((0, 1)) if ctx.needs_input_grad[3] else None
        return d_x, d_h0, d_w, d_b


def _needs_graph(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rnn_layer(x_proj: Tensor, h0: Tensor, w_hh: Tensor, relu: bool = False) -> Tensor:
    if _needs_graph(x_proj, h0, w_hh):
        return RNNLayer.apply(x_proj, h0, w_hh, relu)
    return rnn_layer_forward(x_proj, h0, w_hh, relu)


def lstm_layer(x_proj: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor) -> tuple[Tensor, Tensor]:
    if _needs_graph(x_proj, h0, c0, w_hh):
        return LSTMLayer.apply(x_proj, h0, c0, w_hh)
    hs, c, _ = lstm_layer_forward(x_proj, h0, c0, w_hh, save=False)
    return hs, c


def gru_layer(x_proj: Tensor, h0: Tensor, w_hh: Tensor) -> Tensor:
    if _needs_graph(x_proj, h0, w_hh):
        return GRULayer.apply(x_proj, h0, w_hh)
    return gru_layer_forward(x_proj, h0, w_hh, save=False)[0]


def gru_torch_layer(x_proj: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
    if _needs_graph(x_proj, h0, w_hh, b_hh):
        return GRUTorchLayer.apply(x_proj, h0, w_hh, b_hh)
    return gru_torch_layer_forward(x_proj, h0, w_hh, b_hh, save=False)[0]
