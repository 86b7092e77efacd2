"""The fused step kernels of native.c: built with the system's C compiler on first use, loaded with ctypes.

Between two matrix products, a step of the custom LSTM is seven small tensor
operations forward and thirteen backward, each with its own dispatch and its
own pass over memory; at batch 32 and hidden 256 they took as long as the
product itself. native.c does each group in one loop. It is plain C99 with no
headers from torch or Python, so it compiles in well under a second, and it is
optional: without a C compiler (or with `CHARLM_NATIVE=0`), or if the built
library fails a small self-test against PyTorch, `kernels()` returns None and
cells_fast.py runs the same equations as PyTorch operations.

Where PyTorch runs on an OpenMP runtime (GNU OpenMP in its Linux wheels), the
library is also built with -fopenmp and kept only if loading it brings no
runtime of its own: then it shares PyTorch's threads and thread count, and
the rows of a batch are split among them. It is built with -march=native for
the processor at hand and kept in the cache folder ($CHARLM_CACHE_DIR, else
$XDG_CACHE_HOME/charlm, else ~/.cache/charlm) under a name derived from the
source, the compiler, its flags and the processor, so that a changed file,
compiler or machine gets its own build. It is written under a temporary name
and renamed, so that two processes building at once (the ranks of
`torchrun`) never load a half-written file, and loaded only from a folder
that no other user can write; a cache folder that is not so, or cannot be
written, gives way to a temporary one.

Callers pass float32 CPU tensors of the documented shapes, each row
contiguous; the wrappers take B and H from the buffers the kernel writes and
check nothing else, since they run once per time step.

The time loops (`gru_forward_loop`, `rnn_forward_loop` and their backward
passes) run a classic GRU or plain RNN layer's whole window in C. Their
recurrent products go to a packed product (`gemm()`): W_hh is laid out once
per window (`Packed`), and each step's product is then one C call with no
dispatch. It is MKL's, which PyTorch's x86 builds carry and export
(`cblas_sgemm_pack`, `cblas_sgemm_compute`), except on an AMD processor with
AVX-512, where MKL, which picks its kernels by the vendor, keeps to AVX2 and
multiplied at half oneDNN's speed: there native.c's own product, which has
MKL's interface, takes its place (a third of MKL's time at the char
config's shapes). `loops()` says whether the loops run here: not where the
product disagrees with torch's in a self-test, not where this torch has no
MKL unless CHARLM_NATIVE=loops (the own product is unmeasured there), and
not with CHARLM_NATIVE=steps. The LSTM's loop (`lstm_forward_loop`,
`lstm_backward_loop`) runs with the own product, and with MKL's only where
the loop is split by batch rows among the threads and W_hh is small
(`lstm_loops(B, H)`): unsplit, its one product a step was no faster than
oneDNN's and on two threads the loop measured slower (docs/benchmarks.md).
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from .runtime import amd_avx512, cpuinfo

SOURCE = Path(__file__).with_name("native.c")
# From this many steps a layer's whole time loop runs in native.c (cells_fast._whole_loop): laying W_hh out for
# MKL costs about one step's product, and each step then saves torch's dispatch and Python's loop
# (docs/benchmarks.md).
LOOP_MIN_STEPS = 8
# -fno-trapping-math lets GCC turn the clamps of native.c's exponential into vector blends on every
# target (the floating-point exception flags, which it would otherwise preserve, are never read)
_BASE_FLAGS = ["-O3", "-std=c99", "-fno-trapping-math", "-fPIC", "-shared"]
_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "charlm_lstm_forward": [_P, _P, _P, _P, _P, _P, _I, _I],
    "charlm_lstm_backward": [_P, _I, _P, _P, _P, _P, _P, _P, _I, _I],
    "charlm_gru_gates": [_P, _I, _P, _P, _P, _I, _I],
    "charlm_gru_state": [_P, _I, _P, _P, _P, _I, _I],
    "charlm_gru_backward_state": [_P, _I, _P, _P, _P, _P, _P, _P, _P, _I, _I],
    "charlm_gru_backward_reset": [_P, _P, _P, _P, _P, _P, _I, _I],
    "charlm_lstm_forward_loop": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, ctypes.c_int, ctypes.c_int],
    "charlm_lstm_backward_loop": [_P, _P, _P, _I, _I, _P, _P, _P, _P, _P, _P, _I, _I, _I, ctypes.c_int],
    "charlm_rnn_forward_loop": [_P, _P, _P, _P, _I, _I, _I, ctypes.c_int, ctypes.c_int],
    "charlm_rnn_backward_loop": [_P, _P, _P, _I, _I, _P, _P, _P, _I, _I, _I, ctypes.c_int, ctypes.c_int],
    "charlm_gru_forward_loop": [_P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, ctypes.c_int, ctypes.c_int],
    "charlm_gru_backward_loop": [_P, _P, _P, _P, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I,
                                 ctypes.c_int, ctypes.c_int],
}
_why_not = ""
_lib: ctypes.CDLL | None = None  # set by kernels(); the wrappers below are called only after usable()


def _compiler() -> list[str] | None:
    """The C compiler: $CC if set (it may carry flags), else the first of cc, gcc, clang on the PATH."""
    if os.environ.get("CC", "").strip():
        command = shlex.split(os.environ["CC"])
        return command if shutil.which(command[0]) else None
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def _processor() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else platform's words."""
    lines = cpuinfo().splitlines()
    wanted = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    if wanted:
        return "\n".join(dict.fromkeys(wanted))
    return f"{platform.machine()} {platform.processor()}"


def cache_dir() -> Path | None:
    """Where built libraries are kept: $CHARLM_CACHE_DIR, else the user's cache folder (None: no home)."""
    if os.environ.get("CHARLM_CACHE_DIR"):
        return Path(os.environ["CHARLM_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "charlm"
    try:
        return Path.home() / ".cache" / "charlm"
    except RuntimeError:  # no $HOME and no passwd entry (a container run under an arbitrary uid)
        return None


def _temporary_folder() -> Path:
    folder = tempfile.mkdtemp(prefix="charlm-native-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return Path(folder)


def _own_folder(folder: Path | None) -> Path:
    """`folder`, created if need be, if only this user can write to it; else a new temporary folder.
    A library is code: one that another user could have put there must not be loaded."""
    try:
        if folder is None:
            raise FileNotFoundError
        folder.mkdir(parents=True, exist_ok=True)
        info = folder.stat()
        if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
            raise PermissionError
        return folder
    except OSError:
        return _temporary_folder()


def _version(compiler: list[str]) -> str:
    try:
        done = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30)
        return done.stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _openmp_runtimes() -> set[str]:
    """The files of OpenMP runtimes mapped into this process (read on Linux; empty elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    names = ("libgomp", "libomp", "libiomp")
    return {line.split()[-1] for line in lines if any(n in line.rsplit("/", 1)[-1] for n in names)}


def _flag_sets() -> list[list[str]]:
    """The compiler flags to try in turn: -fopenmp first where PyTorch runs on an OpenMP runtime (the
    build is kept only if it shares that runtime), -march=native where the compiler takes it."""
    sets = [[*_BASE_FLAGS, "-march=native"], _BASE_FLAGS]
    if _openmp_runtimes():
        sets = [[*flags, "-fopenmp"] for flags in sets] + sets
    return sets


def _compile(compiler: list[str], flags: list[str], target: Path) -> None:
    """Compile native.c into `target`, under a temporary name renamed when done; RuntimeError if it fails."""
    handle, partial = tempfile.mkstemp(prefix=target.stem + "-", suffix=".partial", dir=target.parent)
    os.close(handle)
    try:
        done = subprocess.run([*compiler, *flags, "-o", partial, str(SOURCE)],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            last = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
            raise RuntimeError(f"{compiler[0]} failed: {last[0]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    lib.charlm_openmp_threads.argtypes, lib.charlm_openmp_threads.restype = [], ctypes.c_int
    return lib


def _checked(path: Path, openmp: bool) -> ctypes.CDLL | None:
    """The library at `path` if it passes the self-test and, built with OpenMP, brought no runtime of its own."""
    if hasattr(os, "getuid") and path.stat().st_uid != os.getuid():
        return None
    before = _openmp_runtimes()
    lib = _load(path)
    if openmp and _openmp_runtimes() - before:  # a second runtime: its threads would compete with PyTorch's
        return None
    return lib if _self_test(lib) else None


def _find_or_build(compiler: list[str]) -> ctypes.CDLL | None:
    """A checked library from the cache, else the first flag set that compiles and passes; None if every
    build failed its checks; RuntimeError if nothing compiled."""
    folder = _own_folder(cache_dir())
    source, version, processor = SOURCE.read_bytes(), _version(compiler), _processor()
    builds = []
    for flags in _flag_sets():
        key = hashlib.sha256(b"\0".join(x if isinstance(x, bytes) else x.encode() for x in
                                        (source, " ".join(compiler), version, " ".join(flags), processor)))
        builds.append((flags, folder / f"native-{key.hexdigest()[:20]}.so"))
    errors = []
    for flags, target in sorted(builds, key=lambda b: not b[1].exists()):  # built ones first, in order
        if not target.exists():
            try:
                try:
                    _compile(compiler, flags, target)
                except OSError:  # the folder cannot be written after all
                    target = _temporary_folder() / target.name
                    _compile(compiler, flags, target)
            except RuntimeError as exc:
                errors.append(str(exc))
                continue
        lib = _checked(target, "-fopenmp" in flags)
        if lib is not None:
            return lib
    if len(errors) == len(builds):
        raise RuntimeError(errors[-1])
    return None


@cache
def kernels() -> ctypes.CDLL | None:
    """The loaded library, or None (then `why_not()` says why) where it is turned off or cannot be had."""
    global _why_not, _lib
    if _mode() == "0":
        _why_not = "off (CHARLM_NATIVE=0)"
        return None
    compiler = _compiler()
    if compiler is None:
        _why_not = "off (no C compiler found; set CC)"
        return None
    try:
        lib = _find_or_build(compiler)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _why_not = f"off ({str(exc).strip() or type(exc).__name__})"
        return None
    if lib is None:
        _why_not = "off (the built library disagreed with PyTorch in its self-test)"
        return None
    _lib = lib
    return lib


def openmp_threads() -> int:
    """Threads a kernel's rows would be split among now (0: the library was built without OpenMP)."""
    return _lib.charlm_openmp_threads()


def why_not() -> str:
    """Why `kernels()` is None ("" while it is not)."""
    kernels()
    return _why_not


def status(window: int | None = None, lstm: tuple[int, int] | None = None) -> str:
    """'on (time loops, MKL's product)', 'on (time loops, charlm's product)', 'on (per step: reason)' or
    'off (reason)', for the benchmark: for a window of `window` steps, and for an LSTM layer of
    `lstm` = (B, H), whose loop has conditions of its own (lstm_loops)."""
    if kernels() is None:
        return why_not()
    if not loops():
        return f"on (per step: {_loops_off()})"
    if window is not None and window < LOOP_MIN_STEPS:
        return f"on (per step: a window of fewer than {LOOP_MIN_STEPS} steps)"
    if lstm is not None and not lstm_loops(*lstm):
        return "on (per step: an LSTM loops beside MKL's product only split by rows, with W_hh of 1 MiB or less)"
    return f"on (time loops, {'MKL' if gemm_is_mkl() else 'charlm'}'s product)"


def usable(*tensors: Tensor) -> bool:
    """The kernels are loaded and take these tensors: float32, on the CPU (contiguity is the caller's part)."""
    return (all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and kernels() is not None)


# ---------------------------------------------------------------- the kernels (see native.c)
def lstm_forward(z: Tensor, rec: Tensor, c_prev: Tensor, c: Tensor, tanh_c: Tensor, h: Tensor) -> None:
    """z (B, 4H) += rec, activated in place; c<t>, tanh(c<t>), a<t> into c, tanh_c, h (B, H)."""
    B, H = h.shape
    _lib.charlm_lstm_forward(z.data_ptr(), rec.data_ptr(), c_prev.data_ptr(), c.data_ptr(),
                             tanh_c.data_ptr(), h.data_ptr(), B, H)


def lstm_backward(grad_h: Tensor, rec: Tensor, dc: Tensor, gates: Tensor, c_prev: Tensor,
                  tanh_c: Tensor, d_pre: Tensor) -> None:
    """dL/d(gate pre-activations) of one step into d_pre (B, 4H), with dL/da<t> = grad_h + rec;
    dc (B, H) goes from dL/dc<t> to dL/dc<t-1>. grad_h's rows may lie apart, each row contiguous."""
    B, H = dc.shape
    _lib.charlm_lstm_backward(grad_h.data_ptr(), grad_h.stride(0), rec.data_ptr(), dc.data_ptr(),
                              gates.data_ptr(), c_prev.data_ptr(), tanh_c.data_ptr(), d_pre.data_ptr(), B, H)


def gru_gates(ru: Tensor, rec: Tensor, h_prev: Tensor, rh: Tensor) -> None:
    """ru: the first 2H columns of a step's (B, 3H) rows; += rec (B, 2H) -> Γr, Γu in place;
    Γr * h<t-1> into rh."""
    B, H = rh.shape
    _lib.charlm_gru_gates(ru.data_ptr(), ru.stride(0), rec.data_ptr(), h_prev.data_ptr(), rh.data_ptr(), B, H)


def gru_state(gates: Tensor, rec: Tensor, h_prev: Tensor, h: Tensor) -> None:
    """gates: a step's (B, 3H) rows; the candidate's columns += rec (B, H) -> c~<t> in place; h<t> into h."""
    B, H = h.shape
    _lib.charlm_gru_state(gates.data_ptr(), gates.stride(0), rec.data_ptr(), h_prev.data_ptr(),
                          h.data_ptr(), B, H)


def gru_backward_state(grad_h: Tensor, carry: Tensor, rec: Tensor, gates: Tensor, h_prev: Tensor,
                       dh: Tensor, d_ru: Tensor, d_c: Tensor) -> None:
    """dL/dh<t> = grad_h + carry + rec into dh; dc~-pre into d_c and dΓu-pre into the second half of
    d_ru (B, 2H). gates: the step's (B, 3H) activations. grad_h's rows may lie apart."""
    B, H = dh.shape
    _lib.charlm_gru_backward_state(grad_h.data_ptr(), grad_h.stride(0), carry.data_ptr(), rec.data_ptr(),
                                   gates.data_ptr(), h_prev.data_ptr(), dh.data_ptr(), d_ru.data_ptr(),
                                   d_c.data_ptr(), B, H)


def gru_backward_reset(d_rh: Tensor, dh: Tensor, gates: Tensor, h_prev: Tensor, d_ru: Tensor, carry: Tensor) -> None:
    """dΓr-pre from d(Γr h) = d_rh into the first half of d_ru; (1 - Γu) dh + Γr d_rh into carry."""
    B, H = carry.shape
    _lib.charlm_gru_backward_reset(d_rh.data_ptr(), dh.data_ptr(), gates.data_ptr(), h_prev.data_ptr(),
                                   d_ru.data_ptr(), carry.data_ptr(), B, H)


def _self_test(lib: ctypes.CDLL) -> bool:
    """Run every kernel on fixed values and compare it with PyTorch's operations: on a few rows of 67
    values (whole vectors and a remainder, whatever the vector width) and on 64 such rows (enough to be
    split among threads)."""
    global _lib
    before, _lib = _lib, lib
    try:
        return _agrees(3, 67) and _agrees(64, 67)
    finally:
        _lib = before


def _agrees(B: int, H: int) -> bool:
    close = torch.allclose
    z = torch.linspace(-6.0, 6.0, B * 4 * H).view(B, 4 * H)
    rec = torch.linspace(1.0, -2.0, B * 4 * H).view(B, 4 * H)
    c_prev = torch.linspace(-2.0, 2.0, B * H).view(B, H)
    c, tanh_c, h = torch.empty(B, H), torch.empty(B, H), torch.empty(B, H)
    gates = z.clone()
    lstm_forward(gates, rec, c_prev, c, tanh_c, h)
    u, f, ct, o = (z + rec).view(B, 4, H).unbind(1)
    u, f, ct, o = u.sigmoid(), f.sigmoid(), ct.tanh(), o.sigmoid()
    want_c = u * ct + f * c_prev
    if not all(close(a, b, atol=1e-6) for a, b in ((gates, torch.cat([u, f, ct, o], 1)), (c, want_c),
                                                    (tanh_c, want_c.tanh()), (h, o * want_c.tanh()))):
        return False
    grad_h = torch.linspace(-1.0, 1.0, 2 * B * H).view(B, 2 * H)[:, :H]  # rows apart, as a time-major grad's
    back, dc = torch.linspace(0.3, -0.2, B * H).view(B, H), torch.linspace(0.5, -0.5, B * H).view(B, H)
    for rec_h in (back, torch.zeros(B, H)):
        d_pre, dc_out = torch.empty(B, 4 * H), dc.clone()
        lstm_backward(grad_h, rec_h, dc_out, gates, c_prev, tanh_c, d_pre)
        da = grad_h + rec_h
        t = tanh_c
        d = dc + da * o * (1 - t * t)
        want = torch.cat([d * ct * u * (1 - u), d * c_prev * f * (1 - f), d * u * (1 - ct * ct),
                          da * t * o * (1 - o)], 1)
        if not (close(d_pre, want, atol=1e-6) and close(dc_out, d * f, atol=1e-6)):
            return False
    g = torch.linspace(-5.0, 5.0, B * 3 * H).view(B, 3 * H)
    rec_g = torch.linspace(0.5, -1.5, B * 3 * H).view(B, 3 * H)
    rows, rh, h_new = g.clone(), torch.empty(B, H), torch.empty(B, H)
    gru_gates(rows[:, : 2 * H], rec_g[:, : 2 * H].contiguous(), c_prev, rh)
    gru_state(rows, rec_g[:, 2 * H:].contiguous(), c_prev, h_new)
    pre = g + rec_g
    r, u, cand = pre[:, :H].sigmoid(), pre[:, H: 2 * H].sigmoid(), pre[:, 2 * H:].tanh()
    if not all(close(a, b, atol=1e-6) for a, b in (
            (rows, torch.cat([r, u, cand], 1)), (rh, r * c_prev), (h_new, torch.lerp(c_prev, cand, u)))):
        return False
    carry, d_rh = torch.linspace(-0.4, 0.6, B * H).view(B, H), torch.linspace(0.7, -0.3, B * H).view(B, H)
    for extra in ((carry, back), (torch.zeros(B, H), torch.zeros(B, H))):
        dh, d_ru, d_c, carry_out = torch.empty(B, H), torch.empty(B, 2 * H), torch.empty(B, H), torch.empty(B, H)
        gru_backward_state(grad_h, *extra, rows, c_prev, dh, d_ru, d_c)
        gru_backward_reset(d_rh, dh, rows, c_prev, d_ru, carry_out)
        want_dh = grad_h + extra[0] + extra[1]
        if not all(close(a, b, atol=1e-6) for a, b in (
                (dh, want_dh), (d_c, want_dh * u * (1 - cand * cand)),
                (d_ru, torch.cat([d_rh * c_prev * r * (1 - r), want_dh * (cand - c_prev) * u * (1 - u)], 1)),
                (carry_out, (1 - u) * want_dh + r * d_rh))):
            return False
    return True


# ---------------------------------------------------------------- whole time loops (see native.c)
_ROW_MAJOR, _NO_TRANS, _TRANS, _PACKED, _B_MATRIX = 101, 111, 112, 151, 162


def _torch_library() -> ctypes.CDLL | None:
    """PyTorch's CPU library, already loaded by `import torch` (a second handle to it, not a second copy)."""
    folder = Path(torch.__file__).with_name("lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        if (folder / name).exists():
            try:
                return ctypes.CDLL(str(folder / name))
            except OSError:
                return None
    return None


def _packed_product(size, pack, compute) -> tuple | None:
    """(size, pack, compute) with MKL's packed-product signatures, or None if a product through them
    disagrees with torch's (W given as it is and transposed, a block of rows shorter than a tile)."""
    ci = ctypes.c_int  # MKL's LP64 interface, PyTorch's
    size.argtypes, size.restype = [ci, ci, ci, ci], ctypes.c_size_t  # (which matrix, m, n, k)
    pack.argtypes, pack.restype = [ci, ci, ci, ci, ci, ci, ctypes.c_float, _P, ci, _P], None
    compute.argtypes, compute.restype = [ci, ci, ci, ci, ci, ci, _P, ci, _P, ci, ctypes.c_float, _P, ci], None
    found = (size, pack, compute)
    a = torch.linspace(-1.0, 1.0, 3 * 5).view(3, 5)
    w = torch.linspace(-0.5, 0.7, 4 * 5).view(4, 5)
    good = all(torch.allclose(product(a, Packed(b, 3, found), found), a @ b, atol=1e-6)
               for b in (w.t(), w.t().contiguous()))
    return found if good else None


@cache
def mkl_gemm() -> tuple | None:
    """MKL's packed product as PyTorch's x86 builds carry it: (pack_get_size, pack, compute), or None
    where PyTorch has no MKL, or where a product through it disagrees with torch's."""
    lib = _torch_library()
    try:
        functions = [getattr(lib, name) for name in
                     ("cblas_sgemm_pack_get_size", "cblas_sgemm_pack", "cblas_sgemm_compute")]
    except (AttributeError, TypeError):  # TypeError: no library at all
        return None
    return _packed_product(*functions)


@cache
def own_gemm() -> tuple | None:
    """native.c's own packed product (charlm_sgemm_*, with MKL's signatures), or None where the kernels
    are not loaded or it disagrees with torch's."""
    if kernels() is None:
        return None
    return _packed_product(_lib.charlm_sgemm_pack_get_size, _lib.charlm_sgemm_pack, _lib.charlm_sgemm_compute)


def gemm() -> tuple | None:
    """The packed product the loops use: MKL's, except on an AMD processor with AVX-512, where MKL keeps
    to its AVX2 kernels and native.c's own product multiplied a step's (16 x 256) by (256 x 512) in about
    a third of its time (docs/benchmarks.md), and where this torch has no MKL; None where neither is
    there and agrees with torch's."""
    return own_gemm() if _mkl_at_half_width() or mkl_gemm() is None else mkl_gemm()


def gemm_is_mkl() -> bool:
    """The loops' products go to MKL (then the layer's other products go there too: cells_fast.py)."""
    found = gemm()
    return found is not None and found is mkl_gemm()


def product(a: Tensor, w: "Packed", found: tuple | None = None) -> Tensor:
    """a (m, K) w (K, N) through a packed product (`found`, else `gemm()`), w packed for m rows by the same
    product (for the self-test and the tests)."""
    a = a.contiguous()
    out = a.new_empty(a.shape[0], w.shape[1])
    (found or gemm())[2](_ROW_MAJOR, _NO_TRANS, _PACKED, a.shape[0], w.shape[1], a.shape[1], a.data_ptr(),
                         a.shape[1], w.address, w.shape[1], 0.0, out.data_ptr(), w.shape[1])
    return out


class Packed:
    """A matrix w (K, N), a weight or its transpose, laid out for the products a (m, K) w of a loop, with
    the address of the compute function that reads that layout (MKL's or charlm's own)."""

    __slots__ = ("buffer", "address", "shape", "compute")

    def __init__(self, w: Tensor, m: int, found: tuple | None = None):
        size, pack, compute = found or gemm()
        K, N = self.shape = w.shape
        if w.stride(1) == 1 and w.stride(0) >= N:
            trans, src, ld = _NO_TRANS, w, w.stride(0)
        elif w.stride(0) == 1 and w.stride(1) >= K:
            trans, src, ld = _TRANS, w, w.stride(1)
        else:
            trans, src, ld = _NO_TRANS, w.contiguous(), N
        self.buffer = torch.empty(-(-size(_B_MATRIX, m, N, K) // 4), dtype=torch.float32)
        pack(_ROW_MAJOR, _B_MATRIX, trans, m, N, K, 1.0, src.data_ptr(), ld, self.buffer.data_ptr())
        self.address = self.buffer.data_ptr()
        self.compute = ctypes.cast(compute, _P).value


def _mode() -> str:
    """CHARLM_NATIVE: "0" (or false, no, off), "steps", "loops", or "" (unset: choose)."""
    mode = os.environ.get("CHARLM_NATIVE", "").strip().lower()
    return "0" if mode in ("0", "false", "no", "off") else mode


@cache
def _mkl_at_half_width() -> bool:
    """An AMD processor with AVX-512 (Zen 4 and 5), where MKL, which picks its kernels by the vendor,
    multiplied at about half oneDNN's speed (products.py); Linux only, False where it cannot tell."""
    return amd_avx512()


@cache
def loops() -> bool:
    """Whether a GRU or RNN layer's whole time loop may run here (cells_fast.py also asks for a long window):
    the kernels are loaded and the packed product of `gemm()` is there and agrees with torch's. Where
    this torch has no MKL, native.c's own product has not been measured against the per-step form, so
    the loops wait for CHARLM_NATIVE=loops; CHARLM_NATIVE=steps keeps the per-step kernels only."""
    mode = _mode()
    if mode == "steps" or kernels() is None or gemm() is None:
        return False
    return mode == "loops" or gemm_is_mkl() or _mkl_at_half_width()


def loop_parts(B: int) -> int:
    """Blocks of batch rows for a time loop (GRU, plain RNN, LSTM), each run through the whole window by a
    thread of its own with one-thread products: one block per OpenMP thread where each holds 8 rows or more and
    the product is MKL's, else 1 (every product and kernel split among the threads at each step instead).
    On the Intel host of 2026-12-03 the GRU's forward loop ran 1.05-1.4x faster so (docs/benchmarks.md);
    with charlm's own product, whose panels are split among the threads, it was not measured."""
    threads = openmp_threads()
    return threads if threads > 1 and B >= 8 * threads and gemm_is_mkl() and _fewer_rows_agree() else 1


@cache
def _fewer_rows_agree() -> bool:
    """Whether the packed product gives a block of rows what it gives them in the whole product, with W
    packed for all the rows: each thread of a split loop multiplies its block so. MKL's documentation
    neither promises nor forbids it (PyTorch's own packed MKL linear repacks for another row count)."""
    found = gemm()
    a = torch.linspace(-1.0, 1.0, 32 * 24).view(32, 24)
    w = torch.linspace(-0.5, 0.7, 24 * 40).view(24, 40)
    packed, want = Packed(w, 32, found), a @ w
    return all(torch.allclose(product(a[lo:hi], packed, found), want[lo:hi], atol=1e-5)
               for lo, hi in ((0, 16), (16, 32), (0, 9), (9, 32), (5, 6)))


def lstm_loops(B: int, H: int) -> bool:
    """Whether an LSTM layer's whole time loop may run here too, for B batch rows of H hidden units: with
    charlm's own product; with MKL's only where the loop is split by rows (loop_parts) and W_hh holds 1 MiB
    or less. On the Zen 3 host of 2026-12-03, against the per-step form, the split loop trained 1.15-1.18x
    faster at hidden 256 (inference 1.02x), but at hidden 512, where each thread reads the whole 4 MiB of
    W_hh at every step instead of half of it, inference ran 0.89-0.95x as fast and training 0.94-1.13x.
    Unsplit, with MKL's, on the Zen 3 host, the loop was 0.85-0.98x as fast as the per-step form on two
    threads, each step's product split between them; and beside MKL's on an Intel host with AVX-512, the
    loop through the own product measured 1.26x once, then 0.95-1.09x in five runs (docs/benchmarks.md,
    "On an Intel host with AMX"), so there an unsplit LSTM steps."""
    if not loops():
        return False
    return not gemm_is_mkl() or (4 * H * H * 4 <= 1 << 20 and loop_parts(B) > 1)


def _loops_off() -> str:
    if _mode() == "steps":
        return "CHARLM_NATIVE=steps"
    if gemm() is None:
        return "no packed product agreed with torch's"
    return "no MKL packed product in this torch; CHARLM_NATIVE=loops takes charlm's own"


def lstm_forward_loop(w: Packed, gates: Tensor, h0: Tensor, c0: Tensor, hs: Tensor, cs: Tensor, tanh_cs: Tensor,
                      save: bool, parts: int = 1) -> None:
    """The LSTM over the window: gates (T, B, 4H) from W_ih x<t> + b to the activated gates, a<t> into
    hs (T, B, H), c<t> into cs and tanh c<t> into tanh_cs (T + 1 and T steps with `save`, c0 already in
    cs[0]; 2 and 1 without). w: W_hh^T packed. h0, c0: (B, H), contiguous; parts: blocks of rows
    (loop_parts)."""
    T, B, H = hs.shape
    rec = gates.new_empty(B, 4 * H)
    _lib.charlm_lstm_forward_loop(w.compute, w.address, gates.data_ptr(), h0.data_ptr(), c0.data_ptr(),
                                  hs.data_ptr(), cs.data_ptr(), tanh_cs.data_ptr(), rec.data_ptr(), T, B, H,
                                  int(save), parts)


def lstm_backward_loop(w: Packed, grad_hs: Tensor, dc: Tensor, gates: Tensor, cs: Tensor, tanh_cs: Tensor,
                       d_pre: Tensor, parts: int = 1) -> None:
    """dL/d(gate pre-activations) of every step into d_pre (T, B, 4H); dc (B, H), contiguous, goes from
    dL/dc<T> to dL/dc<0>. w: W_hh packed; grad_hs (T, B, H) with each row contiguous; the rest as the
    forward saved; parts: as for the forward."""
    T, B, G = gates.shape
    H = G // 4
    rec = gates.new_empty(B, H)
    _lib.charlm_lstm_backward_loop(w.compute, w.address, grad_hs.data_ptr(), grad_hs.stride(0),
                                   grad_hs.stride(1), dc.data_ptr(), gates.data_ptr(), cs.data_ptr(),
                                   tanh_cs.data_ptr(), d_pre.data_ptr(), rec.data_ptr(), T, B, H, parts)


def rnn_forward_loop(w: Packed, hs: Tensor, h0: Tensor, relu: bool, parts: int = 1) -> None:
    """The plain RNN over the window: hs (T, B, H) from W_ax x<t> + b to a<t>. w: W_aa^T packed; h0 (B, H),
    contiguous; parts: blocks of rows (loop_parts)."""
    T, B, H = hs.shape
    _lib.charlm_rnn_forward_loop(w.compute, w.address, hs.data_ptr(), h0.data_ptr(), T, B, H, int(relu), parts)


def rnn_backward_loop(w: Packed, grad_hs: Tensor, hs: Tensor, d_pre: Tensor, relu: bool, parts: int = 1) -> None:
    """dL/d(pre-activation) of every step into d_pre (T, B, H). w: W_aa packed; grad_hs (T, B, H) with each
    row contiguous; hs: the forward's a<t>; parts: as for the forward."""
    T, B, H = hs.shape
    rec = hs.new_empty(B, H)
    _lib.charlm_rnn_backward_loop(w.compute, w.address, grad_hs.data_ptr(), grad_hs.stride(0),
                                  grad_hs.stride(1), hs.data_ptr(), d_pre.data_ptr(), rec.data_ptr(), T, B, H,
                                  int(relu), parts)


def gru_forward_loop(w_ru: Packed, w_c: Packed, gates: Tensor, h0: Tensor, hs: Tensor, rh: Tensor,
                     save: bool, parts: int = 1) -> None:
    """The classic GRU over the window: gates (T, B, 3H) from W_ih x<t> + b to Γr, Γu, c~, h<t> into hs
    (T, B, H), Γr * h<t-1> into rh (T steps with `save`, else 1). w_ru, w_c: the two blocks of W_hh,
    transposed and packed. h0: (B, H), contiguous."""
    T, B, H = hs.shape
    rec = gates.new_empty(B, 2 * H)
    _lib.charlm_gru_forward_loop(w_ru.compute, w_ru.address, w_c.address, gates.data_ptr(),
                                 h0.data_ptr(), hs.data_ptr(), rh.data_ptr(), rec.data_ptr(), T, B, H, int(save),
                                 parts)


def gru_backward_loop(w_ru: Packed, w_c: Packed, grad_hs: Tensor, gates: Tensor, h_prev: Tensor, d_ru: Tensor,
                      d_c: Tensor, carry: Tensor, rec: Tensor, need_h0: bool, parts: int = 1) -> None:
    """dL/d(pre-activations) of r, u into d_ru (T, B, 2H) and of c~ into d_c (T, B, H). w_ru, w_c: the
    blocks of W_hh packed; h_prev (T, B, H): h<t-1>; carry, rec (B, H): zeros, on return the two parts
    of dL/dh<0> (rec only with `need_h0`)."""
    T, B, H = d_c.shape
    dh, d_rh = d_c.new_empty(B, H), d_c.new_empty(B, H)
    _lib.charlm_gru_backward_loop(w_ru.compute, w_ru.address, w_c.address, grad_hs.data_ptr(),
                                  grad_hs.stride(0), grad_hs.stride(1), gates.data_ptr(), h_prev.data_ptr(),
                                  d_ru.data_ptr(), d_c.data_ptr(), carry.data_ptr(), rec.data_ptr(),
                                  dh.data_ptr(), d_rh.data_ptr(), T, B, H, int(need_h0), parts)
