"""Bugs found by the reliability tests, reported to the variants' authors and not fixed yet.

Each entry says which calls it explains (``applies(call)``), which failure kinds it explains,
and gives one concrete, deterministic call that shows it (``example()``). The tests use the
table twice:

* ``tests/test_reliability.py::test_known_bug`` runs each ``example`` under
  ``pytest.mark.xfail(strict=True)``: it fails today, and turns into an XPASS, which fails the
  suite, once the bug is fixed;
* the property tests accept a failure on a generated call only when an entry ``applies`` to that
  call and explains every failure kind it shows.

**After fixing a bug, delete its entry**: the strict xfail goes away and the property tests
check the regime again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from refnorm.norms import BY_NAME
from refnorm.registry import SampleInput

from reliability.strategies import Call


@dataclass(frozen=True)
class KnownBug:
    id: str
    variants: tuple[str, ...]
    kinds: tuple[str, ...]          # the Failure kinds it explains
    applies: Callable               # (call) -> bool
    example: Callable               # (variant) -> Call
    reason: str
    outputs: tuple[str, ...] = ()   # when given, it explains failures of these outputs only


def _sum_of_squares_overflows(call):
    """The exact sum of squares of ``x`` exceeds a quarter of the dtype's largest number."""
    x = call.sample.arrays[0]
    if x.size == 0 or call.dtype == np.float64:
        return False
    return float(np.sum(np.square(x.astype(np.float64)))) > float(np.finfo(call.dtype).max) / 4


def _overflow_example(variant):
    """A float32 call of ``variant`` with standard deviation 1e20 (squares 1e40 > 3.4e38)."""
    spec = BY_NAME[variant]
    rng = np.random.default_rng(0)
    template = {
        "layer_norm": lambda x: ((x, np.ones(8, np.float32), np.zeros(8, np.float32)),
                                 dict(normalized_shape=8, eps=1e-5)),
        "rms_norm": lambda x: ((x, np.ones(8, np.float32)), dict(normalized_shape=8, eps=1e-5)),
        "group_norm": lambda x: ((x, None, None), dict(num_groups=2, eps=1e-5)),
        "batch_norm": lambda x: ((x, None, None),
                                 dict(running_mean=None, running_var=None, training=True,
                                      eps=1e-5)),
        "instance_norm": lambda x: ((x.reshape(4, 2, 4), None, None),
                                    dict(use_input_stats=True, eps=1e-5)),
        "local_response_norm": lambda x: ((x[:, :, None],),
                                          dict(size=3, alpha=1e-4, beta=0.75, k=1.0)),
    }[variant]
    x = (1e20 * rng.standard_normal((4, 8))).astype(np.float32)
    arrays, kwargs = template(x)
    sample = SampleInput("std-1e20-float32", arrays, kwargs)
    dy = rng.standard_normal(arrays[0].shape).astype(np.float32)
    return Call(spec, sample, dy, np.float32, "normal", 20, "known-bug example")


SQUARES = KnownBug(
    id="squares-overflow",
    variants=("layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm",
              "local_response_norm"),
    kinds=("inaccurate", "scale", "constant", "statistics"),
    applies=_sum_of_squares_overflows,
    example=_overflow_example,
    reason="the variance (RMSNorm: the mean square; LRN: the window sum of squares) is held in "
           "the input dtype (float16 sums are accumulated in float32 since b394398, but the "
           "result is cast back): once it exceeds the dtype's range, float32 for |x - mean| above "
           "~1.8e19 and float16 above ~256, it is inf, rstd = 0, and y is silently 0 (the bias) "
           "with gradients 0, although the exact result is finite and of order 1. float64 has "
           "the same at |x| ~ 1e154. Fix: hold var/rstd in float64 (float32 input) or float32 "
           "(float16 input), or compute them from d / max|d| and rescale")


def _weight_norm_tiny_norm(call):
    """float16 ``weight_norm`` where ``g / ||v||`` exceeds the largest float16."""
    if call.spec.name != "weight_norm":
        return False
    from refnorm.norms.weight_norm import _reduced_axes

    v, g = (a.astype(np.float64) for a in call.sample.arrays)
    axes = _reduced_axes(call.sample.kwargs.get("dim", 0), v.ndim)
    norm = np.sqrt(np.sum(v * v, axis=axes, keepdims=len(axes) < v.ndim))
    with np.errstate(all="ignore"):
        return bool(np.any(np.abs(g) / norm > float(np.finfo(call.dtype).max) / 2))


def _weight_norm_tiny_example(variant):
    spec = BY_NAME[variant]
    v = np.array([[1e-5, -2e-5, 1e-5], [1.0, 2.0, 3.0]], np.float16)
    g = np.array([[2.0], [1.0]], np.float16)
    dy = np.ones((2, 3), np.float16)
    return Call(spec, SampleInput("float16-norm-1e-5", (v, g), dict(dim=0)), dy, np.float16,
                "mixed", -5, "known-bug example")


WEIGHT_NORM_QUOTIENT = KnownBug(
    id="weight-norm-g-over-norm-overflows",
    variants=("weight_norm",),
    kinds=("inaccurate",),
    applies=_weight_norm_tiny_norm,
    example=_weight_norm_tiny_example,
    reason="weight_norm_forward computes w = v * (g / norm): g / norm overflows where a slice's "
           "norm is below |g| / max (float16: |v| ~ 1e-5 with g ~ 1), giving w = +-inf (and dv "
           "NaN) although |w| <= |g|. Fix: w = (v / norm) * g (|v / norm| <= 1); likewise "
           "dv *= g / norm in the backward -> (dv / norm) * g",
)


def _empty_slices(call):
    if call.spec.name != "weight_norm":
        return False
    return call.sample.arrays[0].size == 0


def _empty_slices_example(variant):
    spec = BY_NAME[variant]
    v = np.zeros((3, 0))
    g = np.ones((3, 1))
    return Call(spec, SampleInput("(3,0)-empty-slices", (v, g), dict(dim=0)), np.zeros((3, 0)),
                np.float64, "normal", 0, "known-bug example")


WEIGHT_NORM_EMPTY = KnownBug(
    id="weight-norm-empty-slices",
    variants=("weight_norm",),
    kinds=("undocumented-error",),
    applies=_empty_slices,
    example=_empty_slices_example,
    reason="weight_norm_forward on v with a zero-size axis (e.g. shape (3, 0), dim=0): the norm "
           "of each (empty) slice is 0, _slice_norm then calls np.max over the empty slice and "
           "NumPy raises 'zero-size array to reduction operation maximum which has no identity' "
           "(not refnorm's message). Expected: the documented ValueError ('`v` has a slice with "
           "zero norm'), or an empty w where v is empty. Fix: check for empty slices before "
           "_slice_norm",
)


def _reference_cache(call):
    from reliability.calls import reference

    ref = reference(call.spec, call.sample, call.dy, call.dtype)
    return ref.cache if ref.ok else None


def _variance_underflows(call):
    """eps = 0 and the exact variance (RMSNorm: mean square) of some group is below the
    smallest normal number of the dtype (times 2^8), so the squares underflow."""
    if call.sample.kwargs.get("eps") != 0:
        return False
    cache = _reference_cache(call)
    rstd = getattr(cache, "rstd", None)
    if rstd is None or rstd.size == 0:
        return False
    with np.errstate(all="ignore"):
        var = 1 / np.square(rstd.astype(np.longdouble))
    tiny = float(np.finfo(call.dtype).smallest_normal) * 2 ** 8
    return bool(np.any(var < tiny))


def _underflow_example(variant):
    """A float32 call with standard deviation 1e-25 and eps = 0 (squares 1e-50 < 1.2e-38)."""
    spec = BY_NAME[variant]
    rng = np.random.default_rng(0)
    x = (1e-25 * rng.standard_normal((4, 8))).astype(np.float32)
    kwargs = {"layer_norm": dict(normalized_shape=8, eps=0.0),
              "rms_norm": dict(normalized_shape=8, eps=0.0),
              "group_norm": dict(num_groups=2, eps=0.0)}[variant]
    arrays = (x,) + (None,) * (len(spec.diff_argnames) - 1)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    return Call(spec, SampleInput("std-1e-25-eps0-float32", arrays, kwargs), dy, np.float32,
                "normal", -25, "known-bug example")


VARIANCE_UNDERFLOW = KnownBug(
    id="variance-underflow-eps0",
    variants=("layer_norm", "rms_norm", "group_norm"),
    kinds=("inaccurate",),
    applies=_variance_underflows,
    example=_underflow_example,
    reason="with eps = 0 (accepted: 'a finite number >= 0'), a group whose standard deviation "
           "is below sqrt(smallest normal) of the dtype (float32: ~1e-19) has its squares "
           "underflow to 0: var = 0, rstd = inf, and y = +-inf or NaN (dx NaN), although the "
           "exact result is finite and of order 1 (the input is not constant). Same root cause "
           "and fix "
           "as squares-overflow: scale by max|x - mean| before squaring, or accumulate in a wider "
           "dtype; alternatively document eps = 0 as unsupported below that scale",
)


def _lrn_intermediate_underflows(call):
    """LRN where D^-beta (forward) or t = x D^(-beta-1) (backward) of some element is below the
    dtype's normal range (times 2^10), while y and dx are normal numbers."""
    if call.spec.name != "local_response_norm" or call.dtype == np.float64:
        return False
    cache = _reference_cache(call)
    if cache is None or cache.x.size == 0:
        return False
    tiny = float(np.finfo(call.dtype).smallest_normal) * 2 ** 10
    with np.errstate(all="ignore"):
        t = np.abs(cache.x) * cache.scale / cache.denom
    nonzero = cache.x != 0
    return bool(np.any(cache.scale[nonzero] < tiny) or np.any(t[nonzero] < tiny))


def _lrn_example(variant):
    spec = BY_NAME[variant]
    rng = np.random.default_rng(0)
    x = (1e17 * (1 + 0.1 * rng.standard_normal((2, 5, 3)))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    return Call(spec, SampleInput("float32-1e17", (x,), dict(size=3, alpha=1.0, beta=0.75, k=1.0)),
                dy, np.float32, "offset", 17, "known-bug example")


LRN_UNDERFLOW = KnownBug(
    id="lrn-intermediate-underflow",
    variants=("local_response_norm",),
    kinds=("inaccurate",),
    applies=_lrn_intermediate_underflows,
    example=_lrn_example,
    reason="local_response_norm computes y = x * D^-beta and, in the backward, "
           "t = dy * x * D^-beta / D before multiplying by x again. With large activations these "
           "intermediates leave the normal range while y and dx do not: float32, alpha = 1, "
           "|x| ~ 1e17: t ~ 1e-44 is subnormal and dx is off by ~8% (100% where dx is small); "
           "beta = 1.5, |x| ~ 1e16: D^-beta ~ 1e-47 underflows to 0 and y is 0 instead of ~5e-32. "
           "Fix: keep the factors in range (y = x * exp(-beta log D), s = x * window_sum(dy * y "
           "/ D) with y/D formed as (x / D) * D^-beta), or compute in float64 for float32/float16",
)


def _spectral_backward_overflows(call):
    """float16 spectral_norm where c / sigma = <dy, W> / sigma^2 exceeds the float16 range."""
    if call.spec.name != "spectral_norm" or call.dtype != np.float16:
        return False
    cache = _reference_cache(call)
    if cache is None:
        return False
    c = np.vdot(call.dy.astype(np.longdouble), cache.weight) / cache.sigma
    return bool(abs(c / cache.sigma) > float(np.finfo(call.dtype).max))


def _spectral_example(variant):
    """Eval mode, u and v nearly orthogonal to W's top pair: sigma ~ 1e-3 (found by search)."""
    spec = BY_NAME[variant]
    rng = np.random.default_rng(173)
    w = (0.1 * rng.standard_normal((4, 5))).astype(np.float16)
    dy = rng.standard_normal((4, 5)).astype(np.float16)
    u = np.array([-0.502, -0.5005, -0.499, -0.4985], np.float16)
    v = np.array([-0.4446, -0.4475, -0.45, -0.4478, -0.4463], np.float16)
    return Call(spec, SampleInput("float16-small-sigma", (w,), dict(u=u, v=v, training=False)),
                dy, np.float16, "normal", -1, "known-bug example")


SPECTRAL_OVERFLOW = KnownBug(
    id="spectral-norm-backward-float16-overflow",
    variants=("spectral_norm",),
    kinds=("inaccurate",),
    applies=_spectral_backward_overflows,
    example=_spectral_example,
    reason="spectral_norm_backward forms u * (c / sigma) with c = <dy, W> / sigma, i.e. "
           "<dy, W> / sigma^2: in float16 with a small sigma (eval mode, u nearly orthogonal to "
           "W v) it overflows to inf and dweight is +-inf although the exact dweight is "
           "representable (e.g. -4.2e4). Fix: scale before dividing twice, e.g. "
           "k = c / sigma computed as (<dy, W> / sigma) / sigma in float32, or "
           "dweight = (dy - np.multiply.outer(u * c, v)) / sigma",
    outputs=("dweight",),
)


def _r_squared_overflows(call):
    """layer_norm where rstd^2 exceeds the dtype's range (float16: rstd > 256, i.e.
    var + eps < 1.5e-5: constant or zero rows at the default eps, or std below ~4e-3)."""
    if call.spec.name != "layer_norm":
        return False
    rstd = getattr(_reference_cache(call), "rstd", None)
    if rstd is None or rstd.size == 0:
        return False
    return bool(np.any(np.square(rstd.astype(np.longdouble))
                       > float(np.finfo(call.dtype).max) / 4))


def _r_squared_example(variant):
    spec = BY_NAME[variant]
    rng = np.random.default_rng(0)
    x = np.zeros((2, 6), np.float16)                  # exact: y = bias, dx = r (g - <g>)
    weight = (1 + rng.standard_normal(6)).astype(np.float16)
    bias = rng.standard_normal(6).astype(np.float16)
    dy = rng.standard_normal((2, 6)).astype(np.float16)
    return Call(spec, SampleInput("float16-zero-rows", (x, weight, bias),
                                  dict(normalized_shape=(6,), eps=1e-5)),
                dy, np.float16, "zeros", 0, "known-bug example")


LN_R_SQUARED = KnownBug(
    id="layer-norm-backward-r-squared-overflow",
    variants=("layer_norm",),
    kinds=("inaccurate",),
    applies=_r_squared_overflows,
    example=_r_squared_example,
    reason="the rewritten layer_norm_backward computes k = r * r * (sum_gd - c * sum_g) / n: "
           "r * r overflows when r > sqrt(max) (float16: r > 256, i.e. var + eps < 1.5e-5, which "
           "includes every constant or zero row at the default eps = 1e-5), then inf * 0 = NaN "
           "and dx is NaN for the whole row, although the exact dx = r (g - <g>) is ~300. Fix: "
           "k = r * ((sum_gd - c * sum_g) * r / n) (the bracket is O(r^-1 |g|) so the product "
           "stays in range), or compute the per-row scalars in float32/float64",
    outputs=("dx",),
)


def _constant_groups_with_bias(call):
    return call.spec.name in ("batch_norm", "group_norm") \
        and call.regime in ("constant-all", "constant-groups", "zeros")


def _folded_example(variant):
    spec = BY_NAME[variant]
    rng = np.random.default_rng(0)
    if variant == "group_norm":   # (2, 4, 3), G = 2: each (sample, group) constant
        levels = (1e11 * rng.standard_normal((2, 2, 1))).astype(np.float32)
        x = np.broadcast_to(levels[:, :, None, :], (2, 2, 2, 3)).reshape(2, 4, 3).copy()
    else:                         # (3, 4, 5): each channel constant
        levels = (1e11 * rng.standard_normal((1, 4, 1))).astype(np.float32)
        x = np.broadcast_to(levels, (3, 4, 5)).copy()
    weight = (1 + rng.standard_normal(4)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    kwargs = dict(num_groups=2, eps=1e-5) if variant == "group_norm" else \
        dict(running_mean=None, running_var=None, training=True, eps=1e-5)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    return Call(spec, SampleInput("float32-constant-1e11", (x, weight, bias), kwargs), dy,
                np.float32, "constant-all", 11, "known-bug example")


FOLDED_CORRECTION = KnownBug(
    id="bn-gn-folded-mean-correction",
    variants=("batch_norm", "group_norm"),
    kinds=("constant",),
    applies=_constant_groups_with_bias,
    example=_folded_example,
    reason="the rewritten batch_norm_forward / group_norm_forward compute y = d a + (beta - c a) "
           "with d = x - m0, a = r gamma and c = <d> (the rounding error of the mean m0), instead "
           "of y = (d - c) a + beta. On a constant channel/group d == c, so the exact y is beta, "
           "but beta - c a is rounded: the error is ~u |c| r |gamma| with |c| up to half an ULP "
           "of the mean, amplified by r = 1/sqrt(eps) = 316: float32 constant 1e11 -> y off by "
           "~1.6 (expected exactly beta), float64 constant 1e21 -> 1e-8, 1e30 -> 2.9. (The old "
           "code, and layer_norm's new one, subtract c first and give beta exactly; BN's own "
           "docstring says refnorm computes (x - mu) r gamma + beta to avoid this cancellation.) "
           "Fix: y -= c; y *= a; y += beta (as layer_norm_forward does)",
)


def _rstd_overflows(call):
    """rms_norm where the exact rstd (1 / (rms + eps), or 1/sqrt(ms + eps)) exceeds the dtype's
    range although y = x rstd does not (rows of zeros, eps < 1/max)."""
    if call.spec.name != "rms_norm":
        return False
    rstd = getattr(_reference_cache(call), "rstd", None)
    return rstd is not None and bool(np.any(rstd > float(np.finfo(call.dtype).max)))


def _rstd_example(variant):
    spec = BY_NAME[variant]
    x = np.zeros((2, 5), np.float16)
    x[1] = np.array([1.0, -2.0, 0.5, 3.0, -1.0], np.float16)
    weight = np.ones(5, np.float16)
    dy = np.ones((2, 5), np.float16)
    return Call(spec, SampleInput("float16-zero-row-outside", (x, weight),
                                  dict(normalized_shape=5, eps=1e-5, eps_placement="outside")),
                dy, np.float16, "zeros", 0, "known-bug example")


RMS_RSTD_OVERFLOW = KnownBug(
    id="rms-norm-rstd-overflow-zero-rows",
    variants=("rms_norm",),
    kinds=("inaccurate",),
    applies=_rstd_overflows,
    example=_rstd_example,
    reason="rms_norm with eps_placement='outside' (and 'inside' with eps < 1/max^2) on a row of "
           "zeros in float16: rstd = 1 / (0 + eps) = 1e5 overflows float16 (max 65504) to inf, "
           "and y = x * rstd = 0 * inf = NaN (dweight NaN), although the exact y is 0 (a zero row "
           "is documented: dx = g / eps there). Fix: divide, y = x / (rms + eps), or compute "
           "rstd in float32",
)


KNOWN_BUGS = (SQUARES, VARIANCE_UNDERFLOW, LRN_UNDERFLOW, SPECTRAL_OVERFLOW, LN_R_SQUARED,
              FOLDED_CORRECTION, RMS_RSTD_OVERFLOW, WEIGHT_NORM_QUOTIENT, WEIGHT_NORM_EMPTY)


def explaining(call, failures):
    """The known bug(s) that together explain every failure of ``call`` (the first one is
    returned), or None when some failure is not explained."""
    if not failures:
        return None
    candidates = [b for b in KNOWN_BUGS if call.spec.name in b.variants
                  and any(_matches(b, f) for f in failures)]
    applicable = [b for b in candidates if b.applies(call)]
    if applicable and all(any(_matches(b, f) for b in applicable) for f in failures):
        return applicable[0]
    return None


def _matches(bug, failure):
    return failure.kind in bug.kinds and (not bug.outputs
                                          or failure.detail.split(":")[0] in bug.outputs)


def xfail_params():
    """``(bug, variant)`` pairs for the registered variants, for the strict-xfail test."""
    return [(bug, v) for bug in KNOWN_BUGS for v in bug.variants if v in BY_NAME]


# Keyword arguments and arrays: key -> (id, reason); each is a strict xfail whose marker says
# the id (the reason is here). Keys: (variant, argument, label of the value in
# tests/test_reliability.py::BAD_VALUES) for keyword arguments; (variant, argument, kind) for
# ndarray subclasses ("matrix", "masked"); (variant, "mixed", dtype of x) for mixed dtypes.
_LN_SHAPE = (
    "layer-norm-normalized-shape-validation",
    "layer_norm's own _normalized_shape (not _stats.check_normalized_shape, which rms_norm "
    "uses) calls tuple(normalized_shape) on anything that is not an int: None, a float, a NumPy "
    "float, a 0-d array or an arbitrary object give Python's TypeError ('float' object is not "
    "iterable / iteration over a 0-d array) instead of refnorm's 'layer_norm: "
    "`normalized_shape` must be an int or a non-empty tuple of ints'. Fix: use "
    "_stats.check_normalized_shape(normalized_shape, x, 'layer_norm')")
_HUGE_INT = (
    "scalar-validators-huge-int",
    "the scalar validators (_stats.check_eps, _stats.check_momentum, "
    "local_response_norm._check_number) call np.isfinite on a Python int beyond the int64 "
    "range (2**70), which NumPy cannot convert: TypeError \"ufunc 'isfinite' not supported for "
    "the input types\" instead of refnorm's message. Fix: convert with float(value) first "
    "(OverflowError -> the documented ValueError), then check math.isfinite")
_NBT = (
    "batch-norm-num-batches-tracked-overflow",
    "batch_norm: num_batches_tracked = 2**70 passes _check_num_batches_tracked (an int >= 0) and "
    "then np.asarray(t, dtype=np.int64) raises OverflowError ('Python int too large to convert "
    "to C long'). Fix: also require value < np.iinfo(np.int64).max in "
    "_check_num_batches_tracked")
_PLACEMENT = (
    "rms-norm-eps-placement-array",
    "rms_norm: eps_placement = np.array([1.0, 2.0]) makes `eps_placement not in "
    "EPS_PLACEMENTS` compare an array with strings: NumPy's 'The truth value of an array with "
    "more than one element is ambiguous' ValueError instead of refnorm's message. Fix: check "
    "isinstance(eps_placement, str) first in _check_placement")
API_BUGS: dict = {
    **{("layer_norm", "normalized_shape", label): _LN_SHAPE
       for label in ("None", "2.5", "nan", "inf", "-0.0", "1e308", "np.float32", "0-d array",
                     "object")},
    **{(variant, key, "2**70"): _HUGE_INT
       for variant, key in (("layer_norm", "eps"), ("rms_norm", "eps"), ("group_norm", "eps"),
                            ("batch_norm", "eps"), ("batch_norm", "momentum"),
                            ("instance_norm", "eps"), ("instance_norm", "momentum"),
                            ("local_response_norm", "alpha"), ("local_response_norm", "beta"),
                            ("local_response_norm", "k"))},
    ("batch_norm", "num_batches_tracked", "2**70"): _NBT,
    ("rms_norm", "eps_placement", "array"): _PLACEMENT,
}

_SUBCLASS = (
    "ndarray-subclasses-accepted",
    "_stats.check_array accepts any ndarray subclass. np.matrix: reductions keep two dimensions "
    "and `*` is a matrix product, so the variant crashes inside NumPy (TypeError: "
    "matrix.mean() got an unexpected keyword argument 'keepdims'; weight_norm and "
    "spectral_norm: 'shapes not aligned'); a masked array: x.mean() skips the masked elements, "
    "so the statistics and y silently differ from the plain array's (and a MaskedArray comes "
    "back). Fix: in check_array, `if type(value) is not np.ndarray: raise TypeError(f\"{op}: "
    "`{name}` must be a plain numpy.ndarray, got {type(value).__name__}\")` (or convert with "
    "np.asarray and document it)")
_MIXED = (
    "mixed-dtypes-gradient-dtype",
    "mixed dtypes (x float32 with float64 weight/bias/g, or the reverse) are neither rejected "
    "nor handled consistently: y takes the promoted dtype and some gradients come back in the "
    "promoted dtype instead of their input's (layer_norm: x float32, weight float64 -> dx "
    "float64; x float64, weight float32 -> dweight float64). PyTorch raises. Fix: in "
    "check_param (and weight_norm's g check) require the dtype of x: TypeError \"`weight` must "
    "have the dtype of `x` (float32), got float64\"; or cast every gradient to its input's dtype")
ARRAY_BUGS: dict = {
    **{(variant, arg, kind): _SUBCLASS for variant, arg, kind in (
        ("layer_norm", "x", "masked"), ("layer_norm", "x", "matrix"),
        ("layer_norm", "weight", "masked"),
        ("rms_norm", "x", "masked"), ("rms_norm", "x", "matrix"), ("rms_norm", "weight", "masked"),
        ("group_norm", "x", "masked"), ("group_norm", "weight", "masked"),
        ("batch_norm", "x", "masked"), ("batch_norm", "x", "matrix"),
        ("batch_norm", "weight", "masked"),
        ("instance_norm", "x", "masked"), ("instance_norm", "weight", "masked"),
        ("local_response_norm", "x", "masked"),
        ("weight_norm", "v", "masked"), ("weight_norm", "v", "matrix"),
        ("weight_norm", "g", "masked"), ("weight_norm", "g", "matrix"),
        ("spectral_norm", "weight", "masked"), ("spectral_norm", "weight", "matrix"))},
    **{(variant, "mixed", first): _MIXED for variant, first in (
        ("layer_norm", "float32"), ("layer_norm", "float64"),
        ("group_norm", "float32"), ("group_norm", "float64"),
        ("batch_norm", "float32"), ("batch_norm", "float64"),
        ("instance_norm", "float32"), ("instance_norm", "float64"),
        ("weight_norm", "float64"))},
}


def marker_reason(note) -> str:
    """The short xfail reason: the bug's id and where its description is."""
    return f"known bug {note[0]} (see tests/reliability/known_bugs.py)"
