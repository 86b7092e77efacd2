"""Matrix products for the custom cells and the output layer, through oneDNN on the CPU.

PyTorch sends a float32 matrix product on the CPU to MKL. On some CPUs MKL
does not use the fastest instructions: on an AMD EPYC (Zen 5, AVX-512) its
products ran at about half the speed of oneDNN's, the library behind
nn.LSTM's fused CPU kernel, for every shape the models use (per-step
products of batch x hidden, the projections of whole windows, the weight
gradients). PyTorch ships oneDNN's product as the operator
`mkldnn::_linear_pointwise` (x W^T + b), and `mkldnn::_reorder_linear_weight`
lays W out once in oneDNN's blocked format, which halves the cost of the
many small products of a time loop again.

Those two operators are internal to PyTorch, so they are used only after a
small self-test at import, only for float32 CPU inputs and weights, only for
products large enough to repay oneDNN's fixed cost per call, only on x86-64
unless `CHARLM_ONEDNN=1`, and not at all when `CHARLM_ONEDNN=0` is set or
torch.backends.mkldnn.enabled is False (RNNLM.step turns it off for its one
token). Otherwise every function here is the plain torch product; the two
agree up to float32 rounding. docs/benchmarks.md has the measurements.
"""

from __future__ import annotations

import os
import platform
import threading
from contextlib import contextmanager
from functools import cache

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .runtime import amd_avx512, cpu_family

_NONE: list = []

# Where oneDNN pays (AMD EPYC Zen 5, two threads; docs/benchmarks.md): a call costs ~15 us of fixed
# overhead, so a plain product goes to oneDNN from 4M multiply-adds up (32 x 256 by 256 x 512: 74 us
# against MKL's 93; 32 x 256 by 256 x 256: 53 against 47). Laying W out once costs 100-170 us and
# then saves 30-60 % of each product from batch 4 and 0.5M multiply-adds up (4 x 256 by 256 x 512:
# 20 us against 34; batch 1: 17 against 7), which 16 steps repay.
_MIN_WORK = 1 << 22
_PACK_MIN_WORK, _PACK_MIN_BATCH, _PACK_MIN_STEPS = 1 << 19, 4, 16


def _probe() -> bool:
    """Whether to use oneDNN's product operators: wanted here, present, and in agreement with torch's.

    CHARLM_ONEDNN=0 turns them off, =1 on; unset, they are used on x86-64, where they were measured.
    Elsewhere (an ARM Mac's torch, say, whose own products go to other libraries) nobody measured them.
    """
    wanted = os.environ.get("CHARLM_ONEDNN", "").strip().lower()
    if wanted in ("0", "false", "no", "off"):
        return False
    if wanted not in ("1", "true", "yes", "on") and platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        linear = torch.ops.mkldnn._linear_pointwise
        # Fixed values: the probe must not draw from the random generator that seeds training.
        x = torch.linspace(-1.0, 1.0, 3 * 5).view(3, 5)
        w = torch.linspace(-0.5, 0.7, 4 * 5).view(4, 5)
        b = torch.linspace(0.1, 0.4, 4)
        expected = torch.addmm(b, x, w.t())
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 3)
        return (torch.allclose(linear(x, w, b, "none", _NONE, ""), expected, atol=1e-5)
                and torch.allclose(linear(x, packed, b, "none", _NONE, ""), expected, atol=1e-5)
                and torch.allclose(linear(x.t(), x.t(), None, "none", _NONE, ""), x.t() @ x, atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


ONEDNN = _probe()
_held = threading.local()  # .depth: torch_products() blocks open in this thread


@contextmanager
def torch_products():
    """Inside, every product of this module is torch's own, whatever ONEDNN says. The GRU and RNN layers
    whose time loop runs in native.c through MKL use it for their other products: on an AVX2 host (AMD
    Zen 3) oneDNN ran those layers' weight gradients at 0.54-0.74x MKL's speed, and their whole training
    step 1.14-1.26x faster with MKL only (docs/benchmarks.md)."""
    _held.depth = getattr(_held, "depth", 0) + 1
    try:
        yield
    finally:
        _held.depth -= 1


def backend() -> str:
    """The library that runs the float32 CPU products here: "onednn" or "default" (torch's, MKL in most builds)."""
    return "onednn" if ONEDNN else "default"


def _worth_it(rows: int, out_features: int, in_features: int, least: int) -> bool:
    """A product of this size repays oneDNN's fixed cost (and is not empty, which oneDNN refuses)."""
    return rows > 0 and out_features > 0 and in_features > 0 and rows * out_features * in_features >= least


def _onednn(*tensors: Tensor) -> bool:
    """oneDNN for these tensors: float32 on the CPU, and not turned off by torch.backends.mkldnn.enabled or by
    torch_products()."""
    return (ONEDNN and not getattr(_held, "depth", 0) and torch.backends.mkldnn.enabled
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors))


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """x W^T + b for a 2-D x (N, K) and W (M, K): F.linear, through oneDNN where it runs and pays."""
    if _worth_it(x.shape[0], w.shape[0], w.shape[1], _MIN_WORK) and _onednn(x, w):
        if not (w.is_contiguous() or w.t().is_contiguous()):
            w = w.contiguous()  # other strides (a column slice) send oneDNN to a reference loop 100x slower
        if b is not None and not b.is_contiguous():
            b = b.contiguous()  # oneDNN reads the bias as packed, whatever its strides
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", _NONE, "")
    return torch.nn.functional.linear(x, w, b)


def mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for 2-D a (N, K) and b (K, M). oneDNN's product takes b.t() as its weight (M, K), row- or
    column-major, and copies a non-contiguous a first, so a should be row-major."""
    return linear(a, b.t())


def weight_grad(d: Tensor, x: Tensor) -> Tensor:
    """d^T x, the gradient of W in y = x W^T given d = dL/dy: d (N, M), x (N, K) -> (M, K), contiguous.

    oneDNN copies its first operand into row-major order, and x^T d comes out
    transposed, to be copied again; so the order that copies fewer values goes:
    d^T first copies M x N values, x^T first K x N and then K x M. Copying d^T
    measured up to 1.7x slower for the gates' (M = 3H or 4H) gradients, copying
    x^T slower for a character model's output layer (M = 65) and for a tail
    cluster of the adaptive softmax (N = 114, M = 8,000, K = 256: 4.9 ms against
    3.8 ms on the Zen 4 host of 2026-12-06). On a Zen 4 processor MKL's product, which reads d^T as a
    view, beats both orders (_weight_grads_in_mkl).
    """
    if not _worth_it(d.shape[0], d.shape[1], x.shape[1], _MIN_WORK) or not _onednn(d, x) or _weight_grads_in_mkl():
        return d.t() @ x
    (N, M), K = d.shape, x.shape[1]
    if M * N <= K * (N + M):
        return linear(d.t(), x.t())
    return linear(x.t(), d.t()).t().contiguous()


@cache
def _weight_grads_in_mkl() -> bool:
    """An AMD processor of family 25 with AVX-512 (Zen 4), whose 512-bit units run at half width, so MKL's
    AVX2 kernels lose nothing: there torch's d.t() @ x (MKL, reading the transposed view without a copy)
    computed the models' weight gradients 1.1-2.0x faster than oneDNN with its copies, and training steps
    at hidden 256 ran 1.03-1.10x faster (docs/benchmarks.md, 2026-12-06). On the Zen 5 host (family 26)
    oneDNN's were the faster ones (3.6 against 6.2 ms for an LSTM window's dW_hh); Linux only."""
    return amd_avx512() and cpu_family() == 25


class Repeated:
    """x -> x W^T for the many x (B, K) of a time loop, with W (M, K) laid out once.

    oneDNN's blocked copy of W where it pays (see _PACK_MIN_WORK), else from
    8 steps up a row-major copy of W^T (15-25 % faster than the transposed
    view); for fewer, as in sampling's single step, W is used as it is. So it
    is for fewer than 4 rows, where the view is about as fast and the copy,
    strided, costs a dozen steps (1.1 ms for an LSTM 512's 4 MiB W_hh, whose
    product of one row is 88 us with the view, 94 with the copy, on the
    model-167 host of 2026-12-08), unless W holds 1 MiB or less and the
    window has 128 steps or more (an LSTM 256: 244 us to copy, 2.2 us a step
    saved).
    """

    __slots__ = ("packed", "w_t")

    def __init__(self, w: Tensor, batch: int, steps: int):
        self.packed = None
        self.w_t = w.t()
        M, K = w.shape
        if steps >= _PACK_MIN_STEPS and batch >= _PACK_MIN_BATCH and _worth_it(batch, M, K, _PACK_MIN_WORK) \
                and _onednn(w):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), batch)
        elif steps >= 8 and (batch >= 4 or (steps >= 128 and M * K <= 1 << 18)):
            self.w_t = self.w_t.contiguous()

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", _NONE, "")
        return x @ self.w_t

    def add_to(self, out: Tensor, x: Tensor) -> Tensor:
        """out += x W^T, in place; returns out."""
        if self.packed is not None:
            return out.add_(self(x))
        return out.addmm_(x, self.w_t)

    def into(self, out: Tensor, x: Tensor, bias: Tensor) -> Tensor:
        """out = x W^T + bias; returns out."""
        if self.packed is not None:
            return torch.add(self(x), bias, out=out)
        return torch.addmm(bias, x, self.w_t, out=out)

    def plus(self, c: Tensor, x: Tensor) -> Tensor:
        """c + x W^T as a new tensor."""
        if self.packed is not None:
            return self(x).add_(c)
        return torch.addmm(c, x, self.w_t)


class _Linear(torch.autograd.Function):
    """y = x W^T + b with oneDNN's products forward and backward (2-D x)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return linear(x, w, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        d_x = mm(grad, w) if need[0] else None      # (N, M) x (M, K)
        d_w = weight_grad(grad, x) if need[1] else None
        d_b = grad.sum(0) if ctx.has_bias and need[2] else None
        return d_x, d_w, d_b


def output_linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """F.linear for any leading shape of x (..., K), through oneDNN forward and backward where it runs.

    Used for the models' output layers, the largest products of a word model.
    """
    rows = x.numel() // max(x.shape[-1], 1)
    if (not _worth_it(rows, w.shape[0], w.shape[1], _MIN_WORK) or not _onednn(x, w)
            or (b is not None and not _onednn(b)) or torch.is_autocast_enabled(x.device.type)):
        return torch.nn.functional.linear(x, w, b)
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        y = _Linear.apply(flat, w, b)
    else:
        y = linear(flat, w, b)
    return y.view(*lead, w.shape[0])
