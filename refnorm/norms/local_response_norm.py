r"""Local Response Normalization (LRN), in PyTorch's convention.

Krizhevsky, Sutskever & Hinton, *ImageNet Classification with Deep Convolutional Neural
Networks*, NeurIPS 2012 (Section 3.3).

Each activation is divided by a power of the energy of a window of :math:`n` (``size``)
neighbouring channels at the same position. With :math:`x` of shape :math:`(N, C, *)`, the
channel axis 1, :math:`a = \lfloor n/2\rfloor` channels before and :math:`b = \lfloor
(n-1)/2\rfloor` after:

.. math::

   D_c = k + \frac{\alpha}{n}\sum_{c'=c-a}^{c+b} x_{c'}^2 ,\qquad
   y_c = x_c\, D_c^{-\beta} ,

where terms with :math:`c' \notin [0, C)` are zero (the channel axis is zero-padded) and the
divisor is :math:`n` even at the borders, where the window holds fewer channels.

Backward (derivation: ``docs/derivations/local_response_norm.rst``). With :math:`g =
\mathrm{d}y` and :math:`t_c = g_c\, x_c\, D_c^{-\beta-1} = g_c\, y_c / D_c`:

.. math::

   \mathrm{d}x_j = g_j\, D_j^{-\beta}
       - \frac{2\alpha\beta}{n}\, x_j \sum_{c=j-b}^{j+a} t_c ,

a sum over the *transposed* window (:math:`b` before, :math:`a` after: the mirror image of the
forward window, which differs from it for even :math:`n`).

Conventions, as in ``torch.nn.functional.local_response_norm(input, size, alpha=1e-4,
beta=0.75, k=1.0)``:

* :math:`\alpha` is divided by :math:`n` (the window *average*, not its sum), always by
  :math:`n`, also where the window runs past the first or last channel.
* For even :math:`n` the window is asymmetric: :math:`[c - n/2,\ c + n/2 - 1]`. (The PyTorch
  docs' formula :math:`\max(0, c-n/2)\ldots\min(C-1, c+n/2)` is exact only for odd :math:`n`.)
* The paper (and TensorFlow's ``tf.nn.lrn``) sums without dividing :math:`\alpha` by
  :math:`n`; AlexNet's :math:`k=2, n=5, \alpha=10^{-4}, \beta=0.75` is
  ``size=5, alpha=5e-4, beta=0.75, k=2.0`` here.
* PyTorch requires at least 3 dimensions; refnorm also accepts :math:`(N, C)` (the same formula
  with no spatial axes, equal to PyTorch on ``x[..., None]``).
* float16 and float32 inputs are computed in float64 internally (:math:`D`,
  :math:`D^{-\beta}` and the backward's :math:`t`), and ``y`` and ``dx`` rounded once to the
  input dtype: in the input dtype these intermediates leave its range while ``y`` and ``dx``
  do not (float32 :math:`|x| \sim 10^{16}`, :math:`\alpha = 1`: :math:`t` subnormal and
  :math:`D^{-\beta}` 0; :math:`|x| \gtrsim 10^{19}`: :math:`x^2` overflows). The cache holds
  :math:`D` and :math:`D^{-\beta}` in float64 then.
* No parameters, no state, no train/eval difference. Nothing guards :math:`D \le 0` (possible
  only with :math:`k \le 0` or :math:`\alpha < 0`): as in PyTorch it gives inf or NaN.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import WideCache, check_array, narrow, out_of_range, wider_dtype
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_OP = "local_response_norm"


class LocalResponseNormCache(NamedTuple):
    x: np.ndarray                   # the input (not a copy: inputs are never mutated)
    # D and D^{-beta} are float64 for float16/float32 x (computed in float64 internally).
    denom: np.ndarray               # D = k + alpha/n * (window sum of x^2), same shape as x
    scale: np.ndarray               # D^{-beta}, so that y = x * scale
    size: int                       # n
    alpha: float
    beta: float


class LocalResponseNormGrads(NamedTuple):
    dx: np.ndarray


def _check_size(size):
    if not isinstance(size, numbers.Integral) or isinstance(size, bool):
        raise TypeError(f"{_OP}: `size` must be an int, got {type(size).__name__}")
    if size < 1:
        raise ValueError(f"{_OP}: `size` must be a positive int, got {size}")
    return int(size)


def _check_number(value, name):
    # float() first, then math.isfinite: np.isfinite cannot take a Python int beyond int64
    # (2**70), and float() of an int beyond the float range raises OverflowError.
    ok = isinstance(value, (numbers.Real, np.floating)) and not isinstance(value, bool)
    if ok:
        try:
            result = float(value)
        except (OverflowError, TypeError, ValueError):
            ok = False
        else:
            ok = math.isfinite(result)
    if not ok:
        raise ValueError(f"{_OP}: `{name}` must be a finite real number, got {value!r}")
    return result


def _work_dtype(dtype):
    """float64 for float16 and float32 inputs (see the module docstring), else the dtype."""
    return np.dtype(np.float64) if dtype in (np.float16, np.float32) else dtype


def _window_sum(z, before, after):
    r"""``out[:, c] = sum(z[:, c + d] for d in -before..after)`` along the channel axis 1, with
    zeros outside :math:`[0, C)`. One pass per window offset (offsets that fall wholly
    outside the channel axis are skipped), each a vectorised add of two shifted slices."""
    channels = z.shape[1]
    out = z.copy()
    for d in range(1, min(after, channels - 1) + 1):   # channels after c
        out[:, :channels - d] += z[:, d:]
    for d in range(1, min(before, channels - 1) + 1):  # channels before c
        out[:, d:] += z[:, :channels - d]
    return out


def local_response_norm_forward(x, size, alpha=1e-4, beta=0.75, k=1.0):
    r"""Local response normalization across channels (axis 1); returns ``(y, cache)``.

    Parameters
    ----------
    x : ndarray, shape ``(N, C, *)``
        At least 2 dimensions; channels on axis 1.
    size : int
        :math:`n`, the number of channels in the window (:math:`\lfloor n/2\rfloor` before the
        channel, itself, :math:`\lfloor (n-1)/2\rfloor` after).
    alpha : float, default 1e-4
        Multiplies the window *average* of :math:`x^2` (the sum divided by ``size``).
    beta : float, default 0.75
        The exponent.
    k : float, default 1.0
        The additive constant.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x`` (float16/float32: computed in float64)
        :math:`x\,(k + \frac{\alpha}{n}\sum_{\text{window}} x^2)^{-\beta}`.
    cache : LocalResponseNormCache
    """
    check_array(x, "x", _OP, ndim_min=2)
    size = _check_size(size)
    alpha, beta, k = (_check_number(alpha, "alpha"), _check_number(beta, "beta"),
                      _check_number(k, "k"))
    wider = wider_dtype(x.dtype)
    if wider is not None and out_of_range(x):  # tiny or huge: the whole call, wider
        y, cache = local_response_norm_forward(x.astype(wider), size, alpha, beta, k)
        return narrow(y, x.dtype), WideCache(cache, (x.dtype,), wider)
    xw = x.astype(_work_dtype(x.dtype), copy=False)
    denom = _window_sum(np.square(xw), size // 2, (size - 1) // 2)
    denom *= alpha / size
    denom += k
    scale = np.power(denom, -beta)
    y = (xw * scale).astype(x.dtype, copy=False)
    return y, LocalResponseNormCache(x, denom, scale, size, alpha, beta)


def local_response_norm_backward(dy, cache):
    """Hand-derived VJP of :func:`local_response_norm_forward`: ``(dy, cache) -> Grads``."""
    if isinstance(cache, WideCache):
        return cache.narrow(local_response_norm_backward(dy.astype(cache.wide_dtype),
                                                         cache.inner))
    x, denom, scale, size, alpha, beta = cache
    out_dtype = x.dtype
    work = _work_dtype(np.result_type(x, denom, scale))
    x, denom, scale, dy = (a.astype(work, copy=False) for a in (x, denom, scale, dy))
    t = dy * x
    t *= scale
    t /= denom                                                  # t = dy * x * D^{-beta-1}
    s = _window_sum(t, (size - 1) // 2, size // 2)              # the transposed window
    del t
    s *= x
    s *= 2.0 * alpha * beta / size
    dx = dy * scale
    dx -= s
    with np.errstate(over="ignore"):  # a dx beyond the dtype's range is inf, as it must be
        return LocalResponseNormGrads(dx.astype(out_dtype, copy=False))


local_response_norm = custom_vjp(local_response_norm_forward, local_response_norm_backward,
                                 ("x",))
local_response_norm.__doc__ = ("Differentiable local response normalization (engine op); see "
                               ":func:`local_response_norm_forward`.")


def local_response_norm_composite(x, size, alpha=1e-4, beta=0.75, k=1.0):
    """The same math with engine primitives only: zero-pad the channel axis, add the ``size``
    shifted slices, and the engine derives its own gradient."""
    channels = x.shape[1]
    widths = [(0, 0)] * x.ndim
    widths[1] = (size // 2, (size - 1) // 2)
    padded = ag.pad(x * x, widths)
    window = padded[:, 0:channels]
    for d in range(1, size):
        window = window + padded[:, d:d + channels]
    return x * (window * (alpha / size) + k) ** (-beta)


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, size, x=None, dtype=np.float64, **hyper):
    x = rng.standard_normal(shape) if x is None else x
    return SampleInput(name, (x.astype(dtype),), dict(size=size, **hyper))


def sample_inputs(rng):
    # A large alpha makes the window term of the gradient as large as the direct term, so
    # the finite-difference check sees it (with alpha = 1e-4 it is four orders smaller).
    strong = dict(alpha=2.0, beta=0.75, k=1.0)
    yield _case(rng, "(2,5,3)-size3", (2, 5, 3), 3, **strong)
    yield _case(rng, "(2,6,2,2)-size2-even", (2, 6, 2, 2), 2, **strong)
    yield _case(rng, "(1,7,2,3)-size4-even", (1, 7, 2, 3), 4, alpha=1.5, beta=0.5, k=2.0)
    yield _case(rng, "(2,5,2,2,2)-5d-size5", (2, 5, 2, 2, 2), 5, **strong)
    yield _case(rng, "(4,6)-2d-size3", (4, 6), 3, **strong)
    yield _case(rng, "(3,4,2)-size1", (3, 4, 2), 1, **strong)
    yield _case(rng, "(2,3,4)-size7-wider-than-C", (2, 3, 4), 7, **strong)
    yield _case(rng, "(1,1,5)-one-channel", (1, 1, 5), 3, **strong)
    yield _case(rng, "(2,5,3)-defaults", (2, 5, 3), 5)
    yield _case(rng, "(2,5,3)-alexnet", (2, 5, 3), 5, alpha=5e-4, beta=0.75, k=2.0)
    yield _case(rng, "(2,6,3)-beta1.5-k0.5", (2, 6, 3), 3, alpha=3.0, beta=1.5, k=0.5)
    constant = np.broadcast_to(rng.standard_normal((2, 1, 3)), (2, 6, 3)).copy()
    yield _case(rng, "(2,6,3)-constant-over-channels", (2, 6, 3), 3, x=constant, **strong)
    yield _case(rng, "(2,5,3)-mean100", (2, 5, 3), 3, x=100.0 + rng.standard_normal((2, 5, 3)),
                alpha=1e-3, beta=0.75, k=1.0)


def oracle_inputs(rng):
    yield _case(rng, "(4,96,13,13)-alexnet", (4, 96, 13, 13), 5, alpha=5e-4, beta=0.75, k=2.0)
    yield _case(rng, "(3,37,9,7)-size4-even", (3, 37, 9, 7), 4, alpha=1e-2, beta=0.75, k=1.0)
    yield _case(rng, "(2,1000,3)-defaults", (2, 1000, 3), 5)
    yield _case(rng, "(1,7,65536)-long", (1, 7, 65536), 3, alpha=0.5, beta=0.75, k=1.0)
    yield _case(rng, "(5,129)-2d", (5, 129), 11, alpha=1.0, beta=0.5, k=1.0)
    yield _case(rng, "(2,33,5,3,2)-5d", (2, 33, 5, 3, 2), 6, alpha=1e-1, beta=0.75, k=1.0)
    yield _case(rng, "(4,33,17)-mean1e4-std1e-3", (4, 33, 17), 5,
                x=1e4 + 1e-3 * rng.standard_normal((4, 33, 17)), alpha=1e-4, beta=0.75, k=1.0)
    yield _case(rng, "(4,33,17)-constant-over-channels", (4, 33, 17), 5,
                x=np.broadcast_to(rng.standard_normal((4, 1, 17)), (4, 33, 17)).copy(),
                alpha=1.0, beta=0.75, k=1.0)
    yield _case(rng, "(4,33,17)-tiny-scale", (4, 33, 17), 5,
                x=1e-20 * rng.standard_normal((4, 33, 17)))
    yield _case(rng, "(4,33,17)-huge-scale", (4, 33, 17), 5,
                x=1e20 * rng.standard_normal((4, 33, 17)))


def error_inputs():
    x = np.ones((2, 3, 4))
    yield ErrorInput(SampleInput("list x", ([[[1.0, 2.0]]],), dict(size=2)),
                     TypeError, r"local_response_norm: `x` must be a numpy.ndarray")
    yield ErrorInput(SampleInput("int x", (np.ones((2, 3, 4), dtype=int),), dict(size=2)),
                     TypeError, r"`x` must have a floating dtype")
    yield ErrorInput(SampleInput("1-d x", (np.ones(3),), dict(size=2)),
                     ValueError, r"`x` must have at least 2 dimensions, got shape \(3,\)")
    yield ErrorInput(SampleInput("size 0", (x,), dict(size=0)),
                     ValueError, r"`size` must be a positive int, got 0")
    yield ErrorInput(SampleInput("size -3", (x,), dict(size=-3)),
                     ValueError, r"`size` must be a positive int, got -3")
    yield ErrorInput(SampleInput("size float", (x,), dict(size=2.5)),
                     TypeError, r"`size` must be an int, got float")
    yield ErrorInput(SampleInput("size bool", (x,), dict(size=True)),
                     TypeError, r"`size` must be an int, got bool")
    yield ErrorInput(SampleInput("alpha nan", (x,), dict(size=2, alpha=float("nan"))),
                     ValueError, r"`alpha` must be a finite real number, got nan")
    yield ErrorInput(SampleInput("beta str", (x,), dict(size=2, beta="0.75")),
                     ValueError, r"`beta` must be a finite real number, got '0.75'")
    yield ErrorInput(SampleInput("k inf", (x,), dict(size=2, k=float("inf"))),
                     ValueError, r"`k` must be a finite real number, got inf")


def _torch_call(torch, x, *, size, alpha=1e-4, beta=0.75, k=1.0):
    if x.ndim == 2:  # PyTorch wants >= 3 dims; (N, C) is (N, C, 1) without the trailing axis
        return torch.nn.functional.local_response_norm(x[..., None], size, alpha, beta, k)[..., 0]
    return torch.nn.functional.local_response_norm(x, size, alpha, beta, k)


def _layer_init(features, *, size, alpha=1e-4, beta=0.75, k=1.0):
    """``torch.nn.LocalResponseNorm(size, alpha, beta, k)``: no parameters, no state."""
    return {}, {}, dict(size=size, alpha=alpha, beta=beta, k=k)


SPEC = NormSpec(
    name="local_response_norm",
    title="Local Response Normalization",
    paper=Paper("ImageNet Classification with Deep Convolutional Neural Networks",
                "Krizhevsky, Sutskever, Hinton", 2012, "NeurIPS 2012 (Advances in Neural "
                "Information Processing Systems 25), Section 3.3"),
    forward=local_response_norm_forward,
    backward=local_response_norm_backward,
    op=local_response_norm,
    composite=local_response_norm_composite,
    diff_argnames=("x",),
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    torch_equivalent="torch.nn.functional.local_response_norm",
    torch_call=_torch_call,
    layer_init=_layer_init,
)
