r"""A LayerNorm written in Triton, forward and backward, checked by the oracle without a GPU.

``candidate`` follows the oracle's protocol (:mod:`refnorm.oracle.adapters`), so either of ::

    refnorm compare --impl refnorm.oracle.examples.triton_layer_norm:candidate \
        --variant layer_norm --dtype float32 float16 --size ci

    from refnorm.oracle import check
    print(check("refnorm.oracle.examples.triton_layer_norm:candidate", "layer_norm",
                dtype="float16", size="ci"))

runs the kernels below on every oracle case and compares ``y``, ``dx``, ``dweight``,
``dbias`` and the saved ``mean`` and ``rstd`` with refnorm's float64 reference.
``candidate_eps_outside`` is its **wrong twin**: the same kernels with
:math:`1/(\sqrt{\sigma^2}+\epsilon)` instead of :math:`1/\sqrt{\sigma^2+\epsilon}`, a bug
the oracle catches and names. ``docs/howto/triton.rst`` is the guide.

Where it runs
-------------
Triton compiles for a GPU; with ``TRITON_INTERPRET=1`` it instead runs every program of the
grid on the CPU, in NumPy, with the kernel's own dtypes and masks. The variable is read when
``@triton.jit`` decorates a function, Triton's own (``tl.sum``...) included, so it has to be set
before ``triton`` is first imported in the process. This module sets it **itself** when it is
unset and PyTorch sees no CUDA device (``os.environ["TRITON_INTERPRET"] = "1"``, left set for
the rest of the process: only Triton reads it); if ``triton`` was imported before that, the
import of this module fails with that explanation. ``TRITON_INTERPRET`` set by you always
wins: ``0`` on a machine with a GPU runs the compiled kernels on ``cuda``, ``1`` interprets
them on the CPU. :data:`INTERPRET` and :data:`DEVICE` say what was chosen.

The kernels
-----------
Rows are the leading axes of ``x``, the normalized axes are flattened into one of length
:math:`N`; all arithmetic is in float32 whatever the storage dtype (float32, float16 or
bfloat16), and each output is rounded once to it.

* ``_ln_forward``: one program per row, looping over the row in blocks of ``BLOCK`` elements.
  Pass 1 sums the row for a first mean :math:`m_0`; pass 2 sums :math:`d = x - m_0` and
  :math:`d^2`, whose mean :math:`c = \langle d\rangle` corrects the first (so a row of mean
  1e4 and standard deviation 1e-3 keeps its accuracy: a one-pass
  :math:`\langle x^2\rangle - \langle x\rangle^2` would not) and
  :math:`\sigma^2 = \langle d^2\rangle - c^2` (biased, as in PyTorch); pass 3 writes
  :math:`y = \gamma\,(x - m_0 - c)\,r + \beta` with :math:`r = 1/\sqrt{\sigma^2+\epsilon}`.
  It saves :math:`m_0 + c` and :math:`r` in float32, one per row.
* ``_ln_backward_dx``: one program per row. With :math:`g = \gamma\,\mathrm{d}y` and
  :math:`\hat x = (x-\mu)\,r` recomputed from the saved statistics, pass 1 sums :math:`g` and
  :math:`g\hat x`; pass 2 writes
  :math:`\mathrm{d}x = r\,(g - \langle g\rangle - \hat x\,\langle g\hat x\rangle)`.
* ``_ln_backward_dparams``: one program per block of ``BLOCK_N`` columns, looping over the
  rows ``BLOCK_M`` at a time, sums :math:`\mathrm{d}y\,\hat x` (``dweight``) and
  :math:`\mathrm{d}y` (``dbias``) in a float32 tile, reduces it over the rows at the end and
  rounds once. Each column is owned by one program: no atomics, no partial buffer, and the
  result does not depend on scheduling.
"""
from __future__ import annotations

import math
import numbers
import os

if "TRITON_INTERPRET" not in os.environ:  # before triton.jit: see "Where it runs" above
    try:
        import torch as _torch
        _has_cuda = _torch.cuda.is_available()
    except ImportError:  # pragma: no cover - the import of torch below reports it
        _has_cuda = False
    if not _has_cuda:
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

__all__ = ["candidate", "candidate_eps_outside", "forward", "backward", "layer_norm",
           "TritonLayerNorm", "INTERPRET", "DEVICE", "DTYPES"]

#: whether the kernels run in Triton's interpreter (on the CPU) rather than compiled
INTERPRET = bool(triton.knobs.runtime.interpret)  # what triton.jit sees just below
if INTERPRET and type(tl.sum).__name__ != "InterpretedFunction":
    # triton.language's own jitted helpers (tl.sum, ...) were defined without the interpreter:
    # every launch would fail with "Cannot call @triton.jit'd outside of the scope of a kernel"
    raise ImportError("TRITON_INTERPRET=1 was set after `triton` had been imported in this "
                      "process; set it before the first `import triton` (in the environment, "
                      "or with os.environ before any import of triton)")
#: where :func:`candidate` puts its tensors
DEVICE = "cpu" if INTERPRET else "cuda"
#: the storage dtypes the kernels take (they accumulate in float32)
DTYPES = ("float32", "float16", "bfloat16")

#: why :func:`candidate` declines bfloat16 in the interpreter (measured with triton 3.9.0)
_BF16_INTERPRETED = (
    "Triton's interpreter does not compute in bfloat16 like a GPU: it stores bfloat16 as "
    "uint16 and converts by bit manipulation, which truncates float32 -> bfloat16 instead of "
    "rounding to nearest and misreads subnormal bfloat16 values (1.0e-39 loads as 4.4e-39); "
    "check bfloat16 on a GPU (TRITON_INTERPRET=0)")

_MAX_BLOCK = 4096      # elements of a row one program holds at a time
_DPARAM_BLOCK_N = 128  # columns per program of the parameter-gradient kernel
_DPARAM_BLOCK_M = 16   # rows per step of that kernel


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _ln_forward(X, W, B, Y, MEAN, RSTD, N, eps,
                HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, EPS_OUTSIDE: tl.constexpr,
                BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    X += row * N
    Y += row * N
    # pass 1: a first estimate of the mean, m0
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        total += tl.load(X + cols, mask=cols < N, other=0.0).to(tl.float32)
    m0 = tl.sum(total, axis=0) / N
    # pass 2: the first two moments of d = x - m0 (exact where x is close to m0)
    s1 = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - m0, 0.0)
        s1 += d
        s2 += d * d
    c = tl.sum(s1, axis=0) / N                                 # the mean is m0 + c
    var = tl.sum(s2, axis=0) / N - c * c                       # biased: 1/N
    var = tl.where(var < 0.0, 0.0, var)  # not tl.maximum: it would turn a NaN row's NaN into 0
    if EPS_OUTSIDE:
        rstd = 1.0 / (tl.sqrt_rn(var) + eps)                   # the wrong twin's bug
    else:
        rstd = 1.0 / tl.sqrt_rn(var + eps)
    tl.store(MEAN + row, m0 + c)
    tl.store(RSTD + row, rstd)
    # pass 3: y = (x - m0 - c) r gamma + beta, rounded once to y's dtype
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        y = (x - m0 - c) * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _ln_backward_dx(X, W, DY, DX, MEAN, RSTD, N,
                    HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    X += row * N
    DY += row * N
    DX += row * N
    mean = tl.load(MEAN + row)
    rstd = tl.load(RSTD + row)
    # pass 1: the row sums of g = gamma dy and of g xhat
    sg = tl.zeros([BLOCK], dtype=tl.float32)
    sgx = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            g = g * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        sg += g
        sgx += g * xhat
    mean_g = tl.sum(sg, axis=0) / N
    mean_gx = tl.sum(sgx, axis=0) / N
    # pass 2: dx = r (g - <g> - xhat <g xhat>)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            g = g * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        dx = (g - mean_g - xhat * mean_gx) * rstd
        tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _ln_backward_dparams(X, DY, MEAN, RSTD, DW, DB, M, N,
                         HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    sw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    sb = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, M, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            xhat = (x - mean[:, None]) * rstd[:, None]
            sw += tl.where(mask, dy * xhat, 0.0)
        if HAS_BIAS:
            sb += dy
    if HAS_WEIGHT:
        tl.store(DW + cols, tl.sum(sw, axis=0).to(DW.dtype.element_ty), mask=col_mask)
    if HAS_BIAS:
        tl.store(DB + cols, tl.sum(sb, axis=0).to(DB.dtype.element_ty), mask=col_mask)


# ----------------------------------------------------------------------------------------------
# Launchers (PyTorch tensors in, PyTorch tensors out, on the tensors' device)
# ----------------------------------------------------------------------------------------------
def _as_tuple(normalized_shape):
    return (int(normalized_shape),) if isinstance(normalized_shape, numbers.Integral) \
        else tuple(normalized_shape)


def _row_length(normalized_shape):
    return int(math.prod(_as_tuple(normalized_shape)))


def _block(n):
    return min(_MAX_BLOCK, triton.next_power_of_2(n))


def _warps(block):
    return min(max(block // 256, 1), 8)


def forward(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, eps_outside=False):
    """``(y, mean, rstd)``: LayerNorm of ``x`` over its trailing ``normalized_shape`` axes.

    ``mean`` and ``rstd`` are float32, one per row. ``eps_outside=True`` is the wrong twin.
    """
    n = _row_length(normalized_shape)
    x2 = x.contiguous().view(-1, n)
    m = x2.shape[0]
    y = torch.empty_like(x2)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    w = weight.contiguous().view(-1) if weight is not None else x2  # a dummy when absent
    b = bias.contiguous().view(-1) if bias is not None else x2
    if m:
        block = _block(n)
        _ln_forward[(m,)](x2, w, b, y, mean, rstd, n, float(eps),
                          HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                          EPS_OUTSIDE=bool(eps_outside), BLOCK=block, num_warps=_warps(block))
    return y.view(x.shape), mean, rstd


def backward(dy, x, normalized_shape, weight, mean, rstd, *, has_bias=True):
    """``(dx, dweight, dbias)`` from the saved ``mean`` and ``rstd`` (``None`` where the
    forward had no ``weight`` / ``bias``)."""
    n = _row_length(normalized_shape)
    x2 = x.contiguous().view(-1, n)
    dy2 = dy.contiguous().view(-1, n).to(x.dtype)
    m = x2.shape[0]
    dx = torch.empty_like(x2)
    w = weight.contiguous().view(-1) if weight is not None else x2
    dw = torch.zeros(n, dtype=weight.dtype, device=x.device) if weight is not None else None
    db = torch.zeros(n, dtype=x.dtype, device=x.device) if has_bias else None
    if m:
        block = _block(n)
        _ln_backward_dx[(m,)](x2, w, dy2, dx, mean, rstd, n, HAS_WEIGHT=weight is not None,
                              BLOCK=block, num_warps=_warps(block))
        if dw is not None or db is not None:
            block_n = min(_DPARAM_BLOCK_N, triton.next_power_of_2(n))
            _ln_backward_dparams[(triton.cdiv(n, block_n),)](
                x2, dy2, mean, rstd, dw if dw is not None else dx, db if db is not None else dx,
                m, n, HAS_WEIGHT=dw is not None, HAS_BIAS=db is not None,
                BLOCK_M=_DPARAM_BLOCK_M, BLOCK_N=block_n, num_warps=4)
    shape = tuple(x.shape[x.dim() - len(_as_tuple(normalized_shape)):])
    return (dx.view(x.shape), None if dw is None else dw.view(shape),
            None if db is None else db.view(shape))


class TritonLayerNorm(torch.autograd.Function):
    """The kernels as an ``autograd.Function`` (how a model would use them)."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps, eps_outside=False):
        y, mean, rstd = forward(x, normalized_shape, weight, bias, eps, eps_outside=eps_outside)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.normalized_shape, ctx.has_bias = normalized_shape, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = backward(dy, x, ctx.normalized_shape, weight, mean, rstd,
                              has_bias=ctx.has_bias)
        return dx, None, dw, db, None, None


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.layer_norm``'s signature, by the Triton kernels (differentiable):
    ``check(torch_function(layer_norm), "layer_norm")`` checks it too."""
    return TritonLayerNorm.apply(x, normalized_shape, weight, bias, eps, False)


# ----------------------------------------------------------------------------------------------
# The oracle's protocol
# ----------------------------------------------------------------------------------------------
def _run(variant, inputs, dy, kwargs, dtype, eps_outside):
    if variant != "layer_norm":
        raise NotImplementedError(f"a LayerNorm kernel, not {variant}")
    if dtype not in DTYPES:
        raise NotImplementedError(f"the kernels accumulate in float32: {dtype} storage is not "
                                  f"supported ({', '.join(DTYPES)} are)")
    if INTERPRET and dtype == "bfloat16":
        raise NotImplementedError(_BF16_INTERPRETED)
    tdt = getattr(torch, dtype)

    def tensor(a):  # exact: the oracle's float64 arrays are representable in dtype
        return None if a is None else torch.tensor(a, dtype=tdt, device=DEVICE)

    x, w, b = tensor(inputs["x"]), tensor(inputs.get("weight")), tensor(inputs.get("bias"))
    shape, eps = kwargs["normalized_shape"], kwargs.get("eps", 1e-5)
    y, mean, rstd = forward(x, shape, w, b, eps, eps_outside=eps_outside)
    dx, dw, db = backward(tensor(dy), x, shape, w, mean, rstd, has_bias=b is not None)
    out = {"y": y, "dx": dx, "mean": mean, "rstd": rstd}
    if w is not None:
        out["dweight"] = dw
    if b is not None:
        out["dbias"] = db
    # float32 holds float16 and bfloat16 values exactly (NumPy has no bfloat16)
    return {k: v.detach().to(torch.float32).cpu().numpy() for k, v in out.items()}


def candidate(variant, inputs, dy, kwargs, *, dtype):
    """The Triton LayerNorm as an oracle candidate (protocol: :mod:`refnorm.oracle.adapters`)."""
    return _run(variant, inputs, dy, kwargs, dtype, eps_outside=False)


def candidate_eps_outside(variant, inputs, dy, kwargs, *, dtype):
    """The wrong twin: ``1/(sqrt(var) + eps)``, with the same backward. The oracle fails it."""
    return _run(variant, inputs, dy, kwargs, dtype, eps_outside=True)


candidate.variants = candidate_eps_outside.variants = ("layer_norm",)
