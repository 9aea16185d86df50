"""The oracle's tolerance still catches a wrong candidate of each transformer-family variant.

For dyt, l2_norm, qk_norm, layer_norm_scaling, power_softmax and sigma_reparam: a correct
candidate (the record's own torch_call, through the torch adapter) passes, and candidates that
make one classic mistake each (eps added instead of clamped, a missing term, a missing factor)
fail, in float32 and bfloat16 (``size="ci"``). The mistakes are the refnorm forward/backward with
one term changed, so that the only difference from a correct candidate is the mistake.
"""
from __future__ import annotations

import numpy as np
import pytest

from refnorm.norms import BY_NAME
from refnorm.oracle import check
from refnorm.oracle.formats import get_format, round_to
from refnorm.registry import SampleInput


def _candidate(variant, change):
    """A protocol candidate: refnorm's own float64 forward and backward on the case, with
    ``change(outputs, inputs, dy, kwargs)`` applied, rounded to the candidate dtype."""
    spec = BY_NAME[variant]

    def run(name, inputs, dy, kwargs, *, dtype):
        arrays = tuple(inputs.get(n) for n in spec.diff_argnames)
        y, state, cache = spec.run(SampleInput("candidate", arrays, kwargs))
        grads = spec.backward(dy, cache)
        out = {"y": y}
        out.update({"d" + n: g for n, g in zip(spec.diff_argnames, grads) if g is not None})
        if state is not None:
            out.update(state._asdict())
        out = change(out, inputs, dy, kwargs) or out
        fmt = get_format(dtype)
        return {k: round_to(np.asarray(v, np.float64), fmt) for k, v in out.items()}

    run.variants = (variant,)
    return run


def _scale(key, factor):
    def change(out, inputs, dy, kwargs):
        out[key] = out[key] * factor
    return change


def _l2_eps_added(out, inputs, dy, kwargs):
    """x / (||x|| + eps) instead of x / max(||x||, eps) (forward only)."""
    x = inputs["x"]
    dim = kwargs.get("dim", 1)
    m = kwargs.get("truncate_dim")
    if m is not None:
        x = np.take(x, np.arange(m), axis=dim)
    norm = np.sqrt(np.sum(x * x, axis=dim, keepdims=True))
    out["y"] = x / (norm + kwargs.get("eps", 1e-12) * 1e6)


def _l2_missing_radial_term(out, inputs, dy, kwargs):
    """dx = dy / ||x|| (the projection off y forgotten)."""
    x = inputs["x"]
    dim = kwargs.get("dim", 1)
    m = kwargs.get("truncate_dim")
    xt = np.take(x, np.arange(m), axis=dim) if m is not None else x
    rho = np.maximum(np.sqrt(np.sum(xt * xt, axis=dim, keepdims=True)), kwargs.get("eps", 1e-12))
    dx = np.zeros_like(x)
    index = [slice(None)] * x.ndim
    index[dim] = slice(0, xt.shape[dim])
    dx[tuple(index)] = dy / rho
    out["dx"] = dx


def _dyt_tanh_derivative_missing(out, inputs, dy, kwargs):
    """dx = alpha gamma dy (tanh's derivative 1 - t^2 forgotten)."""
    x, a, w = inputs["x"], inputs["alpha"], inputs.get("weight")
    shape = [1] * x.ndim
    shape[-1 if kwargs.get("channels_last", True) else 1] = -1
    g = dy * (w.reshape(shape) if w is not None else 1.0)
    out["dx"] = g * a[0]


def _dyt_dalpha_without_x(out, inputs, dy, kwargs):
    """dalpha = sum(g (1 - t^2)) (the factor x forgotten)."""
    x, a, w = inputs["x"], inputs["alpha"], inputs.get("weight")
    shape = [1] * x.ndim
    shape[-1 if kwargs.get("channels_last", True) else 1] = -1
    g = dy * (w.reshape(shape) if w is not None else 1.0)
    t = np.tanh(a[0] * x)
    out["dalpha"] = np.array([np.sum(g * (1 - t * t))])


def _power_softmax_missing_mean_term(out, inputs, dy, kwargs):
    """dx = p s^{p-1} / Z dy (the - <dy, y> term forgotten)."""
    spec = BY_NAME["power_softmax"]
    _, cache = spec.forward(inputs["x"], **kwargs)
    k = np.ldexp(cache.p * cache.ratio ** (cache.p - 1) / cache.denom, -cache.e)
    dx = k * dy
    out["dx"] = dx if cache.mask is None else np.where(cache.mask, dx, 0)


def _power_softmax_eps_ignored(out, inputs, dy, kwargs):
    """The forward without the eps of the denominator (only cases with eps > 0 differ)."""
    spec = BY_NAME["power_softmax"]
    y, _ = spec.forward(inputs["x"], **{**kwargs, "eps": 0.0})
    if kwargs.get("eps", 0.0) > 0:
        out["y"] = y


def _sigma_reparam_dgamma_times_gamma(out, inputs, dy, kwargs):
    """dgamma = <G, W_hat> (the gradient of W_hat, not of W / sigma)."""
    out["dgamma"] = np.array([np.vdot(dy, out["y"])])


def _sigma_reparam_projection_missing(out, inputs, dy, kwargs):
    """dW = gamma / sigma G (the - <G, W>/sigma u v^T term forgotten)."""
    w, g = inputs["weight"], inputs["gamma"]
    out["dweight"] = dy * (out["y"].ravel()[0] / w.ravel()[0]) if w.ravel()[0] else out["dweight"]


def _qk_missing_xhat_term(out, inputs, dy, kwargs):
    """LayerNorm form: dx = r (g - <g>) (the xhat <g xhat> term forgotten)."""
    if kwargs.get("norm", "layer") != "layer":
        return
    x, w = inputs["x"], inputs.get("weight")
    eps = kwargs.get("eps") or 1e-5
    xc = x - x.mean(-1, keepdims=True)
    r = 1 / np.sqrt((xc * xc).mean(-1, keepdims=True) + eps)
    g = dy * (w if w is not None else 1.0)
    out["dx"] = r * (g - g.mean(-1, keepdims=True))


def _lns_unscaled_backward(out, inputs, dy, kwargs):
    """The gradients of the plain norm (the 1/sqrt(depth) left out of the backward)."""
    root = np.sqrt(kwargs.get("layer_index", 1))
    for k in ("dx", "dweight", "dbias"):
        if k in out:
            out[k] = out[k] * root


MISTAKES = [
    ("dyt", "tanh derivative missing in dx", _dyt_tanh_derivative_missing),
    ("dyt", "x missing in dalpha", _dyt_dalpha_without_x),
    ("dyt", "dweight 1% off", _scale("dweight", 1.01)),
    ("l2_norm", "eps added (and large) instead of clamped", _l2_eps_added),
    ("l2_norm", "radial term missing in dx", _l2_missing_radial_term),
    ("qk_norm", "xhat term missing in dx", _qk_missing_xhat_term),
    ("layer_norm_scaling", "depth factor missing in the backward", _lns_unscaled_backward),
    ("layer_norm_scaling", "y 1% off", _scale("y", 1.01)),
    ("power_softmax", "mean term missing in dx", _power_softmax_missing_mean_term),
    ("power_softmax", "eps ignored", _power_softmax_eps_ignored),
    ("sigma_reparam", "dgamma times gamma", _sigma_reparam_dgamma_times_gamma),
    ("sigma_reparam", "projection term missing in dweight", _sigma_reparam_projection_missing),
    ("sigma_reparam", "dweight 1% off", _scale("dweight", 1.01)),
    # dgamma has its own itemized bound (one sum over the whole weight, relative to
    # sum|G W| / sigma): a sign error, 20% and, in float32, 0.1% are still caught
    ("sigma_reparam", "dgamma sign flipped", _scale("dgamma", -1.0)),
    ("sigma_reparam", "dgamma 20% off", _scale("dgamma", 1.2)),
    ("sigma_reparam", "dgamma 0.1% off", _scale("dgamma", 1.001)),
]
#: (variant, mistake) pairs below the bfloat16 resolution of their variant's model, checked in
#: float32 only: sigma_reparam's dweight has the normwise tolerance (as spectral_norm), 2 g(N)
#: (u_A + u_I) max|y| with N the elements of a row of the matrix view, about 10% in bfloat16;
#: its dgamma bound is about 4 u_I sum|G W| / sigma in bfloat16, 5-15% of |dgamma| on the ci
#: cases (PyTorch's own bfloat16 dgamma is 7% off on one of them: the terms are rounded to
#: bfloat16 before a sum that cancels)
FLOAT32_ONLY = {("sigma_reparam", "dweight 1% off"), ("sigma_reparam", "dgamma 0.1% off")}


WRONG = [pytest.param(v, n, c, d, id=f"{v}:{n}-{d}") for v, n, c in MISTAKES
         for d in ("float32", "bfloat16") if d == "float32" or (v, n) not in FLOAT32_ONLY]


@pytest.mark.parametrize("variant,name,change,dtype", WRONG)
def test_a_wrong_candidate_fails(variant, name, change, dtype):
    report = check(_candidate(variant, change), variant, dtype=dtype, size="ci",
                   diagnose=False)
    assert report.results and not report.passed, f"{variant}: '{name}' passed in {dtype}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", sorted({v for v, _, _ in MISTAKES}))
def test_the_unchanged_candidate_passes(variant, dtype):
    """The control: the same candidate without a mistake passes (so a failure above is the
    mistake's, not the harness's)."""
    report = check(_candidate(variant, lambda *a: None), variant, dtype=dtype, size="ci",
                   diagnose=False)
    assert report.passed, report.format()
