r"""Exact (mpmath, 50 digits) forward and backward of the standardizing variants, and the ULP
table of refnorm (and of PyTorch float64) against them.

The references are written here from the math, not by calling refnorm. Every variant is one
instance of the same computation: the elements of ``x`` are split into **groups** (LayerNorm
and RMSNorm: a row; BatchNorm: a channel over the batch and the spatial axes; GroupNorm: a
(sample, group of channels) pair; InstanceNorm: a (sample, channel) pair), each group is
standardized, and a per-**parameter** affine follows (LayerNorm and RMSNorm: per feature; the
others: per channel). For a group :math:`S` of :math:`m` elements:

.. math::

   \mu = \frac1m\sum_S x,\quad d = x - \mu\ (\text{RMSNorm: } d = x),\quad
   \sigma^2 = \frac1m\sum_S d^2,\quad r = (\sigma^2+\epsilon)^{-1/2},\quad
   \hat x = d\,r,\quad y = \gamma\hat x + \beta .

The backward is the *staged* chain rule of Ioffe & Szegedy (2015, Section 3), not the compact
closed form the refnorm variants use, so the two are independent derivations:

.. math::

   \partial\hat x = \mathrm{d}y\,\gamma,\quad
   \partial\sigma^2 = -\tfrac12 r^3 \sum_S \partial\hat x\, d,\quad
   \partial\mu = -r\sum_S\partial\hat x + \partial\sigma^2\,\frac{-2}{m}\sum_S d,\quad
   \mathrm{d}x = r\,\partial\hat x + \partial\sigma^2\,\frac{2d}{m} + \frac{\partial\mu}{m},

(RMSNorm: no :math:`\partial\mu` term), :math:`\mathrm{d}\gamma = \sum \mathrm{d}y\,\hat x`,
:math:`\mathrm{d}\beta = \sum\mathrm{d}y` over the elements sharing the parameter. The
references are themselves checked against mpmath's numerical differentiation
(:func:`check_reference_by_mp_diff`).

**The error measure.** For an output array :math:`a` (``y``, ``dx``, ``dweight``, ``dbias``):

.. math::

   \mathrm{ULP}(a) = \frac{\max_i |a_i - a^{\mathrm{e}}_i|}{2^{-52}\,\max_i |a^{\mathrm{e}}_i|}
   \qquad (a^{\mathrm{e}}: \text{the exact value}),

the largest error in units of the float64 spacing at the array's own magnitude: for outputs of
order 1 (``y`` with :math:`\gamma \approx 1`) that is the ULP at magnitude 1 of the issue; for
the gradients (whose magnitude is set by :math:`r` and by the number of summed terms) it is the
same measure after scaling the array to order 1. The difference is taken in mpmath, so the
reference is not rounded before it is compared.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

try:
    import mpmath
    from mpmath import mp
except ImportError:  # pragma: no cover - mpmath is in the test extras
    mpmath = mp = None

MP_DPS = 50
EPS64 = 2.0 ** -52
EPS = 1e-5                      # the variants' eps in the accuracy cases
MEANS = (1e4, 1e6, 1e8)
STDS = (1e-3, 1e-1, 1.0)
REGIMES = tuple((m, s) for m in MEANS for s in STDS)
TARGET_ULP = 4.0                # the goal (float64, relative to magnitude 1)
SEED = 20260101


@dataclass(frozen=True)
class Layout:
    """How one variant groups ``x`` (see the module docstring) and how refnorm is called.

    ``group[i]``/``param[i]`` are the group and the affine parameter of the flat element ``i``;
    ``kwargs`` are refnorm's keyword arguments besides the differentiable arrays (filtered by
    the variant's signature, so an optional one it lacks is dropped).
    """

    variant: str
    shape: tuple
    group: np.ndarray
    param: np.ndarray
    n_params: int
    center: bool = True
    bias: bool = True
    kwargs: dict = field(default_factory=dict)


def _ids(shape, fn):
    idx = np.indices(shape).reshape(len(shape), -1).T
    return np.array([fn(*i) for i in idx], dtype=np.int64)


def layouts() -> dict[str, Layout]:
    """The accuracy cases: 4 groups of 64 elements for every variant (256 elements each)."""
    ln = (4, 64)
    bn = (16, 4, 4)          # (N, C, L): each of the 4 channels holds 16 * 4 = 64 values
    gn = (2, 8, 16)          # (N, C, L), G = 2: each (n, g) group holds 4 * 16 = 64 values
    inn = (2, 2, 64)         # (N, C, L): each of the 4 instances holds 64 values
    return {
        "layer_norm": Layout("layer_norm", ln, _ids(ln, lambda n, j: n), _ids(ln, lambda n, j: j),
                             64, kwargs=dict(normalized_shape=(64,), eps=EPS)),
        "rms_norm": Layout("rms_norm", ln, _ids(ln, lambda n, j: n), _ids(ln, lambda n, j: j), 64,
                           center=False, bias=False, kwargs=dict(normalized_shape=(64,), eps=EPS)),
        "batch_norm": Layout("batch_norm", bn, _ids(bn, lambda n, c, i: c),
                             _ids(bn, lambda n, c, i: c), 4,
                             kwargs=dict(running_mean=None, running_var=None, training=True,
                                         momentum=0.1, eps=EPS)),
        "group_norm": Layout("group_norm", gn, _ids(gn, lambda n, c, i: 2 * n + c // 4),
                             _ids(gn, lambda n, c, i: c), 8, kwargs=dict(num_groups=2, eps=EPS)),
        "instance_norm": Layout("instance_norm", inn, _ids(inn, lambda n, c, i: 2 * n + c),
                                _ids(inn, lambda n, c, i: c), 2,
                                kwargs=dict(running_mean=None, running_var=None,
                                            use_input_stats=True, momentum=0.1, eps=EPS)),
    }


VARIANTS = ("layer_norm", "rms_norm", "batch_norm", "group_norm", "instance_norm")
REQUIRED = ("layer_norm", "rms_norm", "batch_norm", "group_norm")   # the four


def case_inputs(layout: Layout, mean: float, std: float, affine: bool = True):
    """``(x, weight, bias, dy)`` in float64 for one variant and regime, from a fixed seed
    (``weight`` and ``bias`` None when not ``affine``)."""
    key = f"{layout.variant}/{mean!r}/{std!r}/{SEED}".encode()
    rng = np.random.default_rng(zlib.crc32(key))
    x = mean + std * rng.standard_normal(layout.shape)
    weight = rng.uniform(0.5, 1.5, layout.n_params)
    bias = rng.uniform(-0.5, 0.5, layout.n_params) if layout.bias else None
    dy = rng.standard_normal(layout.shape)
    if not affine:
        weight = bias = None
    return x, weight, bias, dy


# ------------------------------------------------------------------------------------------
# The exact references
# ------------------------------------------------------------------------------------------
def exact(layout: Layout, x, weight, bias, dy, eps=EPS):
    """Exact ``{"y", "dx", "dweight", "dbias"}`` (flat lists of mpf; ``dweight``/``dbias``
    absent when ``weight``/``bias`` is None), from the float64 inputs (converted exactly)."""
    with mp.workdps(MP_DPS):
        xs = [mp.mpf(float(v)) for v in np.ravel(x)]
        dys = [mp.mpf(float(v)) for v in np.ravel(dy)]
        ws = [mp.mpf(float(v)) for v in weight] if weight is not None \
            else [mp.mpf(1)] * layout.n_params
        bs = [mp.mpf(float(v)) for v in bias] if bias is not None else None
        e = mp.mpf(eps)
        n = len(xs)
        y, dx = [None] * n, [None] * n
        xhat = [None] * n
        groups: dict[int, list[int]] = {}
        for i, g in enumerate(layout.group):
            groups.setdefault(int(g), []).append(i)
        for members in groups.values():
            m = len(members)
            mu = mp.fsum(xs[i] for i in members) / m if layout.center else mp.mpf(0)
            d = {i: xs[i] - mu for i in members}
            var = mp.fsum(d[i] ** 2 for i in members) / m
            r = 1 / mp.sqrt(var + e)
            for i in members:
                xhat[i] = d[i] * r
                p = int(layout.param[i])
                y[i] = ws[p] * xhat[i] + (bs[p] if bs is not None else 0)
            # the staged chain rule (Ioffe & Szegedy 2015, Section 3)
            dxhat = {i: dys[i] * ws[int(layout.param[i])] for i in members}
            dvar = mp.fsum(dxhat[i] * d[i] for i in members) * (-r ** 3 / 2)
            if layout.center:
                dmu = -r * mp.fsum(dxhat.values()) + dvar * (-2 * mp.fsum(d.values()) / m)
            else:
                dmu = mp.mpf(0)
            for i in members:
                dx[i] = dxhat[i] * r + dvar * 2 * d[i] / m + dmu / m
        dweight = [mp.mpf(0)] * layout.n_params
        dbias = [mp.mpf(0)] * layout.n_params
        for i in range(n):
            p = int(layout.param[i])
            dweight[p] += dys[i] * xhat[i]
            dbias[p] += dys[i]
        out = {"y": y, "dx": dx}
        if weight is not None:
            out["dweight"] = dweight
        if bs is not None:
            out["dbias"] = dbias
        return out


def check_reference_by_mp_diff(layout: Layout, seed=0, size=None):
    """Max relative disagreement between :func:`exact`'s backward and mpmath's numerical
    derivative of :math:`t \\mapsto \\sum \\mathrm{d}y\\cdot y(x + t u, \\gamma + t v,
    \\beta + t w)` at 0, on a small case of this layout (a check of the reference itself)."""
    rng = np.random.default_rng(seed)
    x, weight, bias, dy = case_inputs(layout, 3.0, 0.5)
    u = rng.standard_normal(x.shape)
    v = rng.standard_normal(weight.shape)
    w = rng.standard_normal(weight.shape) if bias is not None else None
    with mp.workdps(MP_DPS):
        ex = exact(layout, x, weight, bias, dy)
        analytic = (mp.fsum(a * b for a, b in zip(ex["dx"], u.ravel()))
                    + mp.fsum(a * b for a, b in zip(ex["dweight"], v)))
        if w is not None:
            analytic += mp.fsum(a * b for a, b in zip(ex["dbias"], w))
        dys = [mp.mpf(float(c)) for c in dy.ravel()]

        def phi(t):
            xs = [mp.mpf(float(a)) + t * float(b) for a, b in zip(x.ravel(), u.ravel())]
            ws = [mp.mpf(float(a)) + t * float(b) for a, b in zip(weight, v)]
            bs = None if w is None else [mp.mpf(float(a)) + t * float(b) for a, b in zip(bias, w)]
            return mp.fsum(a * b for a, b in zip(dys, _forward_mp(layout, xs, ws, bs)))

        numeric = mp.diff(phi, 0)
        return float(abs(numeric - analytic) / abs(analytic))


def _forward_mp(layout, xs, ws, bs, eps=EPS):
    """The forward alone, on mpf lists (for :func:`check_reference_by_mp_diff`)."""
    e = mp.mpf(eps)
    y = [None] * len(xs)
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(layout.group):
        groups.setdefault(int(g), []).append(i)
    for members in groups.values():
        m = len(members)
        mu = mp.fsum(xs[i] for i in members) / m if layout.center else 0
        var = mp.fsum((xs[i] - mu) ** 2 for i in members) / m
        r = 1 / mp.sqrt(var + e)
        for i in members:
            p = int(layout.param[i])
            y[i] = ws[p] * (xs[i] - mu) * r + (bs[p] if bs is not None else 0)
    return y


def ulp_error(got, ex) -> float:
    """:math:`\\max|got - exact| / (2^{-52}\\max|exact|)`, the difference taken in mpmath."""
    got = np.ravel(np.asarray(got, dtype=np.float64))
    with mp.workdps(MP_DPS):
        scale = max(abs(e) for e in ex)
        err = max(abs(mp.mpf(float(g)) - e) for g, e in zip(got, ex))
        if scale == 0:
            return float(err / EPS64)
        return float(err / (scale * EPS64))


# ------------------------------------------------------------------------------------------
# Running refnorm and PyTorch on one case
# ------------------------------------------------------------------------------------------
def _filtered_kwargs(fn: Callable, kwargs: dict) -> dict:
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


def run_refnorm(spec, layout: Layout, x, weight, bias, dy) -> dict:
    """refnorm's ``y`` and gradients, keyed as :func:`exact`'s."""
    from refnorm.registry import SampleInput

    values = {"x": x, "weight": weight, "bias": bias}
    arrays = tuple(values.get(name) for name in spec.diff_argnames)
    sample = SampleInput("accuracy", arrays, _filtered_kwargs(spec.forward, layout.kwargs))
    y, _, cache = spec.run(sample)
    grads = spec.backward(dy, cache)
    out = {"y": y}
    for name, g in zip(spec.diff_argnames, grads):
        if g is not None:
            out["d" + name] = g
    return out


def run_torch(spec, layout: Layout, x, weight, bias, dy, torch) -> dict | None:
    """PyTorch float64 CPU through the variant's ``torch_call`` (None where it has none)."""
    if spec.torch_call is None:
        return None
    values = {"x": x, "weight": weight, "bias": bias}
    tensors = [None if values.get(n) is None
               else torch.tensor(values[n], dtype=torch.float64, requires_grad=True)
               for n in spec.diff_argnames]
    kwargs = _filtered_kwargs(spec.torch_call, layout.kwargs)
    result = spec.torch_call(torch, *tensors, **kwargs)
    y = result[0] if spec.stateful else result
    y.backward(torch.tensor(dy, dtype=torch.float64))
    out = {"y": y.detach().numpy().copy()}
    for name, t in zip(spec.diff_argnames, tensors):
        if t is not None:
            out["d" + name] = t.grad.numpy().copy()
    return out


@dataclass(frozen=True)
class Row:
    variant: str
    mean: float
    std: float
    errors: dict          # output name -> ULP, refnorm
    torch_errors: dict    # output name -> ULP, PyTorch float64 (empty when not measured)

    @property
    def forward(self) -> float:
        return self.errors["y"]

    @property
    def backward(self) -> float:
        return max(v for k, v in self.errors.items() if k != "y")


def measure(variant: str, mean: float, std: float, *, torch=None, affine=True) -> Row:
    """One row of the table: refnorm (and PyTorch, when ``torch`` is given) vs exact; without
    ``weight`` and ``bias`` when not ``affine``."""
    from refnorm.norms import BY_NAME

    spec = BY_NAME[variant]
    layout = layouts()[variant]
    x, weight, bias, dy = case_inputs(layout, mean, std, affine)
    ex = exact(layout, x, weight, bias, dy)
    got = run_refnorm(spec, layout, x, weight, bias, dy)
    errors = {k: ulp_error(got[k], ex[k]) for k in ex if k in got}
    torch_errors = {}
    if torch is not None:
        theirs = run_torch(spec, layout, x, weight, bias, dy, torch)
        if theirs is not None:
            torch_errors = {k: ulp_error(theirs[k], ex[k]) for k in ex if k in theirs}
    return Row(variant, mean, std, errors, torch_errors)


def table(variants=None, *, torch=None, affine=True) -> list[Row]:
    """Every registered variant of ``variants`` (default :data:`VARIANTS`) x every regime."""
    from refnorm.norms import BY_NAME

    names = [v for v in (variants or VARIANTS) if v in BY_NAME]
    return [measure(v, m, s, torch=torch, affine=affine) for v in names for (m, s) in REGIMES]


def format_table(rows: list[Row]) -> str:
    """The per-variant table: max ULP forward / backward per regime, then the worst case."""
    with_torch = any(r.torch_errors for r in rows)
    head = f"{'variant':<14} {'mean':>6} {'std':>6} {'fwd':>7} {'bwd':>7}"
    if with_torch:
        head += f" {'torch fwd':>10} {'torch bwd':>10}"
    lines = [head, "-" * len(head)]

    def fmt(v):
        return f"{v:7.2f}" if v < 1e4 else f"{v:7.1e}"

    for r in rows:
        line = f"{r.variant:<14} {r.mean:>6.0e} {r.std:>6.0e} {fmt(r.forward)} {fmt(r.backward)}"
        if with_torch:
            if r.torch_errors:
                tb = max(v for k, v in r.torch_errors.items() if k != "y")
                line += f" {fmt(r.torch_errors['y']):>10} {fmt(tb):>10}"
            else:
                line += f" {'-':>10} {'-':>10}"
        lines.append(line)
    lines.append("")
    lines.append("worst case per variant (max over the regimes), ULP of float64 at the output's "
                 "magnitude:")
    for v in dict.fromkeys(r.variant for r in rows):
        rs = [r for r in rows if r.variant == v]
        line = (f"  {v:<14} refnorm fwd {fmt(max(r.forward for r in rs))} "
                f"bwd {fmt(max(r.backward for r in rs))}")
        ts = [r for r in rs if r.torch_errors]
        if ts:
            tf = max(r.torch_errors["y"] for r in ts)
            tb = max(max(val for k, val in r.torch_errors.items() if k != "y") for r in ts)
            line += f" | torch float64 fwd {fmt(tf)} bwd {fmt(tb)}"
        lines.append(line)
    return "\n".join(lines)
