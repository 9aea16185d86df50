r"""An RMSNorm written in Triton in the ``llama`` casting mode, checked by the oracle without a
GPU.

The kernels round where Liger-Kernel's ``casting_mode="llama"`` (and Hugging Face's
``LlamaRMSNorm``) rounds: the mean square and rstd in float32, :math:`\hat x = x\,r` rounded
to the storage dtype **before** the weight multiply, :math:`o + \gamma` (the weight offset,
Gemma's 1) formed in the storage dtype, the product rounded; the backward forms
:math:`g = \mathrm{d}y\,(o + \gamma)` in the storage dtype and the rest in float32. A kernel
says so by claiming it::

    candidate.conventions = {"casting_mode": "llama"}

and the oracle then admits those roundings and no more (:mod:`refnorm.oracle.tolerance`).
``candidate`` follows the oracle's protocol (:mod:`refnorm.oracle.adapters`)::

    refnorm compare --impl refnorm.oracle.examples.triton_rms_norm:candidate \
        --variant rms_norm --dtype float32 float16 --size ci

``candidate_claims_gemma`` is its **wrong twin**: the same kernels claiming ``"gemma"``
(everything in float32, one rounding at the end). Its extra rounding of :math:`\hat x` is
beyond gemma's bound in float16 and bfloat16, and the oracle names it ("llama casting where
gemma is claimed"). In float32 every mode is the same computation and the twin passes.
``docs/howto/rms_norm_kernel.rst`` walks through both.

Where it runs: as :mod:`refnorm.oracle.examples.triton_layer_norm` (its "Where it runs" says
how ``TRITON_INTERPRET`` is chosen): interpreted on the CPU when PyTorch sees no CUDA device,
compiled on ``cuda`` otherwise. bfloat16 is declined in the interpreter, for the reason that
module gives.

The kernels
-----------
Rows are the leading axes of ``x``, the normalized axes flattened into one of length :math:`N`.

* ``_rms_forward``: one program per row, looping over it in blocks of ``BLOCK``. Pass 1 sums
  :math:`x^2` in float32 (no cancellation: every term is positive);
  :math:`r = 1/\sqrt{\langle x^2\rangle + \epsilon}` (saved, float32). Pass 2 writes
  :math:`y = \mathrm{rnd}(\mathrm{rnd}(x r)\cdot\mathrm{rnd}(o + \gamma))`, rnd the rounding
  to the storage dtype.
* ``_rms_backward_dx``: one program per row. With :math:`g = \mathrm{rnd}(\mathrm{d}y\,
  \mathrm{rnd}(o+\gamma))` and :math:`\hat x = x r` in float32, pass 1 sums :math:`g\hat x`;
  pass 2 writes :math:`\mathrm{d}x = r\,(g - \hat x\,\langle g\hat x\rangle)`.
* ``_rms_backward_dweight``: one program per block of columns, looping over the rows, sums
  :math:`\mathrm{rnd}(\mathrm{d}y\,\mathrm{rnd}(\hat x))` in a float32 tile (each column owned
  by one program: no atomics) and rounds once.
"""
from __future__ import annotations

import math
import numbers

# the same choice of interpreter or GPU as the LayerNorm example, made at its import
from refnorm.oracle.examples.triton_layer_norm import (_BF16_INTERPRETED, DEVICE, DTYPES,  # noqa
                                                       INTERPRET)

import torch
import triton
import triton.language as tl

__all__ = ["candidate", "candidate_claims_gemma", "forward", "backward", "INTERPRET", "DEVICE",
           "DTYPES"]

_MAX_BLOCK = 4096      # elements of a row one program holds at a time
_DW_BLOCK_N = 128      # columns per program of the dweight kernel
_DW_BLOCK_M = 16       # rows per step of that kernel


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _rms_forward(X, W, Y, RSTD, N, eps, offset, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    X += row * N
    Y += row * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(X + cols, mask=cols < N, other=0.0).to(tl.float32)
        acc += x * x
    rstd = 1.0 / tl.sqrt_rn(tl.sum(acc, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        # llama: xhat rounded to the storage dtype before the weight multiply
        y = (x * rstd).to(Y.dtype.element_ty).to(tl.float32)
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            w = (w + offset).to(Y.dtype.element_ty).to(tl.float32)   # o + gamma, rounded
            y = y * w       # exact in float32 (two storage-dtype significands), rounded below
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_backward_dx(X, W, DY, DX, RSTD, N, offset, HAS_WEIGHT: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    X += row * N
    DY += row * N
    DX += row * N
    rstd = tl.load(RSTD + row)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            w = (w + offset).to(DX.dtype.element_ty).to(tl.float32)
            g = (g * w).to(DX.dtype.element_ty).to(tl.float32)   # llama: g in the dtype
        acc += g * (x * rstd)
    k = tl.sum(acc, axis=0) / N                                   # <g xhat>
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            w = (w + offset).to(DX.dtype.element_ty).to(tl.float32)
            g = (g * w).to(DX.dtype.element_ty).to(tl.float32)
        dx = rstd * (g - (x * rstd) * k)
        tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _rms_backward_dweight(X, DY, RSTD, DW, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, M, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        xq = (x * r[:, None]).to(DW.dtype.element_ty).to(tl.float32)   # llama: xhat rounded
        acc += (dy * xq).to(DW.dtype.element_ty).to(tl.float32)      # the product rounded
    tl.store(DW + cols, tl.sum(acc, axis=0).to(DW.dtype.element_ty), mask=col_mask)


# ----------------------------------------------------------------------------------------------
# Launchers (PyTorch tensors in, PyTorch tensors out)
# ----------------------------------------------------------------------------------------------
def _row_length(normalized_shape):
    shape = (int(normalized_shape),) if isinstance(normalized_shape, numbers.Integral) \
        else tuple(normalized_shape)
    return int(math.prod(shape)), shape


def _block(n):
    return min(_MAX_BLOCK, triton.next_power_of_2(n))


def forward(x, normalized_shape, weight=None, eps=1e-6, offset=0.0):
    """``(y, rstd)``: RMSNorm of ``x`` in the llama casting mode; ``rstd`` float32 per row."""
    n, _ = _row_length(normalized_shape)
    x2 = x.contiguous().view(-1, n)
    m = x2.shape[0]
    y = torch.empty_like(x2)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    w = weight.contiguous().view(-1) if weight is not None else x2   # a dummy when absent
    if m:
        block = _block(n)
        _rms_forward[(m,)](x2, w, y, rstd, n, float(eps), float(offset),
                           HAS_WEIGHT=weight is not None, BLOCK=block)
    return y.view(x.shape), rstd


def backward(dy, x, normalized_shape, weight, rstd, offset=0.0):
    """``(dx, dweight)`` from the saved ``rstd`` (``dweight`` None without a weight)."""
    n, shape = _row_length(normalized_shape)
    x2 = x.contiguous().view(-1, n)
    dy2 = dy.contiguous().view(-1, n).to(x.dtype)
    m = x2.shape[0]
    dx = torch.empty_like(x2)
    w = weight.contiguous().view(-1) if weight is not None else x2
    dw = torch.zeros(n, dtype=x.dtype, device=x.device) if weight is not None else None
    if m:
        block = _block(n)
        _rms_backward_dx[(m,)](x2, w, dy2, dx, rstd, n, float(offset),
                               HAS_WEIGHT=weight is not None, BLOCK=block)
        if dw is not None:
            block_n = min(_DW_BLOCK_N, triton.next_power_of_2(n))
            _rms_backward_dweight[(triton.cdiv(n, block_n),)](
                x2, dy2, rstd, dw, m, n, BLOCK_M=_DW_BLOCK_M, BLOCK_N=block_n)
    return dx.view(x.shape), None if dw is None else dw.view(shape)


# ----------------------------------------------------------------------------------------------
# The oracle's protocol
# ----------------------------------------------------------------------------------------------
def _run(variant, inputs, dy, kwargs, dtype):
    if variant != "rms_norm":
        raise NotImplementedError(f"an RMSNorm kernel, not {variant}")
    if dtype not in DTYPES:
        raise NotImplementedError(f"the kernels accumulate in float32: {dtype} storage is not "
                                  f"supported ({', '.join(DTYPES)} are)")
    if INTERPRET and dtype == "bfloat16":
        raise NotImplementedError(_BF16_INTERPRETED)
    if kwargs.get("eps_placement", "inside") != "inside":
        raise NotImplementedError("eps outside the square root (the RMSNorm authors' PyTorch "
                                  "code): a Llama kernel adds it inside")
    tdt = getattr(torch, dtype)

    def tensor(a):  # exact: the oracle's float64 arrays are representable in dtype
        return None if a is None else torch.tensor(a, dtype=tdt, device=DEVICE)

    x, w = tensor(inputs["x"]), tensor(inputs.get("weight"))
    shape, offset = kwargs["normalized_shape"], kwargs.get("offset", 0.0)
    eps = kwargs.get("eps")
    eps = torch.finfo(torch.float32).eps if eps is None else eps   # F.rms_norm's default
    y, rstd = forward(x, shape, w, eps, offset)
    dx, dw = backward(tensor(dy), x, shape, w, rstd, offset)
    out = {"y": y, "dx": dx, "rstd": rstd}
    if w is not None:
        out["dweight"] = dw
    # float32 holds float16 and bfloat16 values exactly (NumPy has no bfloat16)
    return {k: v.detach().to(torch.float32).cpu().numpy() for k, v in out.items()}


def candidate(variant, inputs, dy, kwargs, *, dtype):
    """The Triton RMSNorm, llama casting, as an oracle candidate."""
    return _run(variant, inputs, dy, kwargs, dtype)


def candidate_claims_gemma(variant, inputs, dy, kwargs, *, dtype):
    """The wrong twin: the same kernels, claiming the gemma casting mode. The oracle fails it
    in float16 and bfloat16 and names the llama rounding."""
    return _run(variant, inputs, dy, kwargs, dtype)


candidate.variants = candidate_claims_gemma.variants = ("rms_norm",)
candidate.conventions = {"casting_mode": "llama"}
candidate_claims_gemma.conventions = {"casting_mode": "gemma"}
# the kernels take the weight offset of each case (``kwargs["offset"]``), as Liger-Kernel's
candidate.accepts_conventions = candidate_claims_gemma.accepts_conventions = True
