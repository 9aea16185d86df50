r"""Power-Softmax: attention weights from even powers of the scores instead of exponentials.

Zimerman, Baruch, Drucker, Ezov, Soceanu & Wolf, *Power-Softmax: Towards Secure LLM Inference
over Encrypted Data*, arXiv:2410.09457 (2024; AISTATS 2026). A polynomial replacement of the
softmax, for inference under homomorphic encryption.

Along axis ``dim`` (the keys), with :math:`p` a positive **even** integer and the mask
:math:`M \in \{0, 1\}` (``mask``, multiplicative: a masked score is 0 and contributes
:math:`0^p = 0`):

.. math::

   s = x \odot M,\qquad
   y_i = \frac{s_i^p}{\epsilon_L + \sum_j s_j^p},\qquad \epsilon_L = \epsilon
   \ \ (\epsilon\,L \text{ with } \texttt{length\_agnostic}).

Positivity comes from :math:`p` being even. The scores :math:`x` are the caller's (e.g.
:math:`q\cdot k/\sqrt{d_k}`).

Backward (derivation: ``docs/derivations/power_softmax.rst``). With :math:`Z = \epsilon_L +
\sum_j s_j^p` and :math:`D = \sum_j \mathrm{d}y_j\, y_j`:

.. math::

   \mathrm{d}x_i = M_i\,\frac{p\, s_i^{p-1}}{Z}\,\bigl(\mathrm{d}y_i - D\bigr),

finite at :math:`s_i = 0` (never written as :math:`p\,y_i/s_i`, which divides by zero).

**What is established, and what is not.** Only the core formula (:math:`s^p/\sum s^p`,
:math:`p` even, masked positions excluded) is confirmed, and through secondary sources: the
method section and the authors' code (a paper supplement) could not be read
(``formulas_transformer.md`` section 9, ``addendum_unverified_items.md`` section 2). So:

* ``p`` has **no default**: the values reported second-hand are 4 (Pythia-1.4B) and, by one
  self-contradicting source, 6 for RoBERTa-base; "4 <= p <= 8 works".
* ``eps = 0`` (the core formula) is the default. ``eps > 0`` is the "Lipschitz division"
  variant, :math:`s^p/(\epsilon + \sum s^p)`; its value in the paper is unverified (one source:
  "e.g. 1e-3"; a third-party CrypTen port: 1e-2).
* ``length_agnostic=True`` multiplies :math:`\epsilon` by the row length :math:`L`
  (``x.shape[dim]``), the "length-agnostic" mean form :math:`\frac1L s^p/(\epsilon + \frac1L\sum
  s^p)`; only the CrypTen port places :math:`\epsilon` so: weak evidence.
* Not implemented: the paper's "stable" training variant with :math:`c_i = \max_j|s_{ij}| +
  \delta` (:math:`\delta` unverified), which for :math:`\epsilon > 0` equals
  :math:`s^p/(\epsilon c^p + \sum s^p)`, a different function; the :math:`\ell_\infty`
  regularizer.

Numerics: computed as :math:`(s/c)^p / (\epsilon_L c^{-p} + \sum (s/c)^p)` with :math:`c =
2^e` the power of two at or just above :math:`\max_j |s_j|`, an exact identity (for any
:math:`c > 0`) whose powers cannot overflow; :math:`s/c` and every product by :math:`c^{\pm 1}`
only move exponents (``np.ldexp``), so nothing
overflows or underflows that the result does not, subnormal scores included (where
:math:`1/\max|s|` itself exceeds float64). A row that is all zero (or all masked) with
:math:`\epsilon = 0` is :math:`0/0`: NaN (undefined). float16 is computed in float32 and
rounded once.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import accumulation_dtype, check_array, check_eps, check_flag
from refnorm.norms.l2_norm import check_dim
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_OP = "power_softmax"


class PowerSoftmaxCache(NamedTuple):
    ratio: np.ndarray               # s / c, in [-1, 1], accumulation dtype (0 where masked)
    y: np.ndarray                   # the output, accumulation dtype
    e: np.ndarray                   # c = 2**e >= max |s| per row (e = 0: all-zero row), keepdims
    denom: np.ndarray               # eps_L c^-p + sum (s/c)^p, keepdims, float64
    mask: np.ndarray | None
    p: int
    axes: tuple[int, ...]
    x_dtype: np.dtype

    @property
    def c(self):
        """The row scale :math:`c = 2^e` as float64 (``inf`` where :math:`2^e` exceeds it)."""
        with np.errstate(over="ignore"):
            return np.ldexp(1.0, self.e)


class PowerSoftmaxGrads(NamedTuple):
    dx: np.ndarray


def _check_p(p):
    if not isinstance(p, numbers.Integral) or isinstance(p, (bool, np.bool_)):
        raise TypeError(f"{_OP}: `p` must be an int (a positive even power), got "
                        f"{type(p).__name__}")
    if p < 2 or p % 2:
        raise ValueError(f"{_OP}: `p` must be a positive even integer, got {p}")
    return int(p)


def _check_mask(mask, shape):
    if mask is None:
        return None
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
        raise TypeError(f"{_OP}: `mask` must be a boolean numpy.ndarray (True: kept), got "
                        f"{type(mask).__name__ if not isinstance(mask, np.ndarray) else mask.dtype}")
    try:
        np.broadcast_shapes(mask.shape, shape)
        if np.broadcast_shapes(mask.shape, shape) != tuple(shape):
            raise ValueError
    except ValueError:
        raise ValueError(f"{_OP}: `mask` of shape {mask.shape} must broadcast to `x`'s shape "
                         f"{tuple(shape)}") from None
    return mask


def power_softmax_forward(x, p, dim=-1, eps=0.0, mask=None, length_agnostic=False):
    r"""Power-Softmax of the scores ``x`` along ``dim``; returns ``(y, cache)``.

    Parameters
    ----------
    x : ndarray, at least 1 dimension
        The attention scores.
    p : int
        The power, a positive even integer (no default: the paper's value is not verified).
    dim : int, default -1
        The axis that is normalized (the keys).
    eps : float, default 0.0
        Added to the denominator (the "Lipschitz division" variant; unverified value).
    mask : boolean ndarray broadcastable to ``x``, optional
        False: the score is excluded (set to 0). ``None``: nothing is masked.
    length_agnostic : bool, default False
        Use :math:`\epsilon L` (``L = x.shape[dim]``) instead of :math:`\epsilon`.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    cache : PowerSoftmaxCache
    """
    x = check_array(x, "x", _OP, ndim_min=1)
    p = _check_p(p)
    axis = check_dim(dim, x.ndim, _OP)
    eps = check_eps(eps, _OP)
    mask = _check_mask(mask, x.shape)
    length_agnostic = check_flag(length_agnostic, "length_agnostic", _OP)
    eps_l = eps * x.shape[axis] if length_agnostic else eps
    acc = accumulation_dtype(x.dtype)
    s = x.astype(acc, copy=False)
    if mask is not None:
        s = np.where(mask, s, 0).astype(acc, copy=False)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore", under="ignore"):
        # c = 2^e > max |s| (e = 0 for an all-zero row): s / c = ldexp(s, -e), exact; a row
        # with an inf or NaN keeps s / max|s| (NaN, as the formula gives)
        c = np.max(np.abs(s), axis=axis, keepdims=True, initial=0)
        finite = np.isfinite(c)
        e = np.frexp(np.where(finite, c, 1))[1]
        ratio = np.where(finite, np.ldexp(s, -e), s / c).astype(acc, copy=False)
        z = ratio ** p
        # the denominator eps_L c^-p + sum (s/c)^p in float64, one number per row: eps_L c^-p
        # may exceed the accumulation format (a row of tiny scores with eps > 0), where y,
        # about s^p / eps, is still representable
        extra = np.ldexp(eps_l, -p * e.astype(np.int64)) if eps_l > 0 else 0.0
        denom = np.sum(z, axis=axis, keepdims=True, dtype=np.float64) + extra
        y = (z / denom).astype(acc, copy=False)
    cache = PowerSoftmaxCache(ratio, y, e, denom, mask, p, (axis,), x.dtype)
    return y.astype(x.dtype, copy=False), cache


def power_softmax_backward(dy, cache):
    r"""Hand-derived VJP of :func:`power_softmax_forward`: ``(dy, cache) -> Grads``."""
    ratio, y, e, denom, mask, p, axes, x_dtype = cache
    g = dy.astype(y.dtype, copy=False)
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        d = np.sum(g * y, axis=axes, keepdims=True)          # D = <dy, y> per row
        # p s^{p-1} / Z = p (s/c)^{p-1} / (c (Z / c^p)): no power of s itself, and 1/c = 2^-e
        # applied last, exactly, to the product (1/c alone may exceed the dtype)
        k = (p * ratio ** (p - 1)) / denom                     # float64: denom's range
        dx = np.ldexp(k * (g - d), -e).astype(y.dtype)
    if mask is not None:
        dx = np.where(mask, dx, 0)
    return PowerSoftmaxGrads(dx.astype(x_dtype, copy=False))


power_softmax = custom_vjp(power_softmax_forward, power_softmax_backward, ("x",))
power_softmax.__doc__ = "Differentiable Power-Softmax (engine op); see power_softmax_forward."


def power_softmax_composite(x, p, dim=-1, eps=0.0, mask=None, length_agnostic=False):
    """The same math with engine primitives only: the engine derives its own gradient. The
    scale ``c`` is a constant of the graph (the identity holds for any ``c``)."""
    axis = dim % x.ndim
    s = x * mask.astype(np.float64) if mask is not None else x
    eps_l = eps * x.shape[axis] if length_agnostic else eps
    c = np.max(np.abs(s.data), axis=axis, keepdims=True)
    c = np.where(c == 0, 1.0, c)
    z = ag.power(s / c, p)
    return z / (ag.sum(z, axis, keepdims=True) + eps_l * c ** -p)


def _layer_init(features, p, dim=-1, eps=0.0, length_agnostic=False):
    """No parameters: ``({}, {}, kwargs)``; ``p`` must be given (there is no verified
    default)."""
    return {}, {}, {"p": _check_p(p), "dim": dim, "eps": eps, "length_agnostic": length_agnostic}


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, p=4, x=None, **kwargs):
    x = rng.standard_normal(shape) if x is None else x
    return SampleInput(name, (x,), dict(p=p, **kwargs))


def _causal(t):
    return np.tril(np.ones((t, t), bool))


def sample_inputs(rng):
    yield _case(rng, "(2,3,4,5)-p4", (2, 3, 4, 5), x=0.3 + rng.standard_normal((2, 3, 4, 5)))
    yield _case(rng, "(3,6)-p2", (3, 6), p=2)
    yield _case(rng, "(3,6)-p6-eps1e-2", (3, 6), p=6, eps=1e-2)
    yield _case(rng, "(2,5,3)-dim1-p4", (2, 5, 3), dim=1)
    yield _case(rng, "(2,4,4)-causal-mask-p4", (2, 4, 4), mask=_causal(4))
    yield _case(rng, "(2,5)-length-agnostic-eps1e-1", (2, 5), eps=0.1, length_agnostic=True)
    yield _case(rng, "(4,1)-one-key-p4", (4, 1))
    yield _case(rng, "(3,5)-zeros-in-rows-p4", (3, 5),
                x=np.where(rng.random((3, 5)) < 0.3, 0.0, rng.standard_normal((3, 5))))
    yield _case(rng, "(2,4)-zero-row-eps1e-3", (2, 4), eps=1e-3,
                x=np.vstack([np.zeros(4), rng.standard_normal(4)]))


def oracle_inputs(rng):
    t = 37
    yield _case(rng, "(2,4,37,37)-p4", (2, 4, t, t), x=rng.standard_normal((2, 4, t, t)) / 2)
    yield _case(rng, "(2,4,37,37)-causal-p4", (2, 4, t, t), mask=_causal(t))
    yield _case(rng, "(8,129)-p6", (8, 129), p=6)
    yield _case(rng, "(8,129)-p8-eps1e-3", (8, 129), p=8, eps=1e-3)
    yield _case(rng, "(2,65536)-long-rows-p4", (2, 65536))
    yield _case(rng, "(5,1)-one-key-p4", (5, 1))
    yield _case(rng, "(8,100)-constant-rows-p4", (8, 100),
                x=np.repeat(rng.standard_normal((8, 1)), 100, axis=1))
    yield _case(rng, "(6,33)-tiny-scale-p4-eps1e-3", (6, 33), eps=1e-3,
                x=1e-2 * rng.standard_normal((6, 33)))
    yield _case(rng, "(6,33)-huge-scale-p4", (6, 33), x=1e20 * rng.standard_normal((6, 33)))


def error_inputs():
    x = np.ones((2, 3))
    yield ErrorInput(SampleInput("list x", ([[1.0, 2.0]],), dict(p=4)),
                     TypeError, r"power_softmax: `x` must be a numpy.ndarray")
    yield ErrorInput(SampleInput("int x", (np.ones((2, 3), dtype=int),), dict(p=4)),
                     TypeError, r"`x` must have a floating dtype")
    yield ErrorInput(SampleInput("p odd", (x,), dict(p=3)),
                     ValueError, r"`p` must be a positive even integer, got 3")
    yield ErrorInput(SampleInput("p 0", (x,), dict(p=0)),
                     ValueError, r"`p` must be a positive even integer, got 0")
    yield ErrorInput(SampleInput("p float", (x,), dict(p=4.0)),
                     TypeError, r"`p` must be an int")
    yield ErrorInput(SampleInput("dim", (x,), dict(p=4, dim=2)),
                     ValueError, r"`dim` must be in \[-2, 1\]")
    yield ErrorInput(SampleInput("eps", (x,), dict(p=4, eps=-1.0)),
                     ValueError, r"`eps` must be a finite number >= 0")
    yield ErrorInput(SampleInput("mask float", (x,), dict(p=4, mask=np.ones((2, 3)))),
                     TypeError, r"`mask` must be a boolean numpy.ndarray")
    yield ErrorInput(SampleInput("mask shape", (x,), dict(p=4, mask=np.ones((3, 3), bool))),
                     ValueError, r"`mask` of shape \(3, 3\) must broadcast to `x`'s shape")
    yield ErrorInput(SampleInput("length_agnostic", (x,), dict(p=4, length_agnostic=1)),
                     TypeError, r"`length_agnostic` must be a bool")


def _torch_call(torch, x, *, p, dim=-1, eps=0.0, mask=None, length_agnostic=False):
    """The formula with torch ops, scaled by the row's largest magnitude (a constant of the
    graph: the identity holds for any scale)."""
    s = x if mask is None else x * torch.as_tensor(mask, device=x.device).to(x.dtype)
    eps_l = eps * x.shape[dim] if length_agnostic else eps
    c = s.detach().abs().amax(dim=dim, keepdim=True)
    c = torch.where(c == 0, torch.ones_like(c), c)
    z = (s / c) ** p
    denom = z.sum(dim=dim, keepdim=True)
    if eps_l > 0:
        denom = denom + eps_l * c.double().pow(-p).to(x.dtype)
    return z / denom


SPEC = NormSpec(
    name="power_softmax",
    title="Power-Softmax (even powers instead of exponentials)",
    paper=Paper("Power-Softmax: Towards Secure LLM Inference over Encrypted Data",
                "Zimerman, Baruch, Drucker, Ezov, Soceanu, Wolf", 2024, "arXiv:2410.09457"),
    forward=power_softmax_forward,
    backward=power_softmax_backward,
    op=power_softmax,
    composite=power_softmax_composite,
    diff_argnames=("x",),
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    nondiff_args=("mask",),
    torch_equivalent=None,
    torch_call=_torch_call,
    layer_init=_layer_init,
)
