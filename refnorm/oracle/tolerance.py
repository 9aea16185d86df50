r"""The tolerance model: a per-element error bound derived from the dtype and the reduction length.

No atol/rtol table. For every element :math:`i` of every output the bound is

.. math::

   |\tilde y_i - y_i| \;\le\; u_D\,|y_i|
      \;+\; F\,\bigl(A_i(u_A) + u_I\, I_i\bigr)
      \;+\; \bigl[u_{64}\,|y_i| + F\,(A_i(u_{64}) + u_{64} I_i)\bigr]

* :math:`u_D` is the unit roundoff of the candidate dtype: the output is rounded once to it.
* :math:`A_i(u_A)` is the first-order error of the computation carried out with unit roundoff
  :math:`u_A` of the **accumulation** format (float32 for float32, float16 and bfloat16
  candidates; float64 for float64), from a rounding-error analysis of the textbook algorithm
  (two-pass statistics). Reductions of length :math:`n` contribute the probabilistic growth
  factor :math:`g(n) = \min(n, \lambda\sqrt n)` (Higham & Mary, 2019) with :math:`\lambda = 8`.
  It includes the **conditioning** of the statistics: a row whose mean is large against its
  standard deviation amplifies the rounding of the mean by :math:`\kappa = \langle|x|\rangle/
  \sqrt{\sigma^2+\epsilon}`.
* :math:`I_i` is the magnitude of the intermediates a kernel may hold in the candidate dtype
  (the normalized :math:`\hat x`, :math:`\gamma\,\mathrm{d}y`, partial sums of the parameter
  gradients over the batch). :math:`u_I = u_D` by default, since PyTorch's own CPU kernels
  accumulate ``dweight``/``dbias`` of bfloat16 inputs in bfloat16; with ``strict=True``,
  :math:`u_I = u_A` and every reduction must accumulate in float32.
* :math:`F = 2` is a safety factor for the operations the analysis does not itemize.
* The bracket is the reference's own float64 error, by the same model with :math:`u=2^{-53}`
  (it matters only for float64 candidates, for which it doubles the bound).

The full derivation, the terms of every output and the measured margins are in
``docs/notes/tolerances.rst``.

Variants that standardize (their forward saves ``rstd``, and their groups are known, see
:mod:`refnorm.oracle.structure`) get the itemized model. Others get the **normwise** form
:math:`u_D|y_i| + F\,g(N)\,(u_A + u_I)\max_j|y_j|`, with :math:`N` the reduction length.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refnorm.oracle.formats import FORMATS, get_format
from refnorm.oracle.structure import (Groups, groups_of, labels_from_axes, param_view,
                                      unbroadcast_sum)

__all__ = ["LAMBDA", "SAFETY", "growth", "Units", "units", "bounds", "reduction_length"]

#: Higham-Mary probabilistic factor: a sum of n terms errs by more than lambda*sqrt(n)*u*sum|x|
#: with probability at most about 2n*exp(-lambda^2/2) (~1e-14 for n = 1, ~1e-9 for n = 65536).
LAMBDA = 8.0
#: Slack for the O(u) operations the analysis does not itemize (casts, a reciprocal, an FMA).
SAFETY = 2.0
_U64 = FORMATS["float64"].u

#: Reduction length of variants that have no groups: ``name -> (case -> N)``.
REDUCTION_LENGTH = {
    "local_response_norm": lambda case: int(case.kwargs.get("size", 1)),
}


def growth(n):
    r"""The error growth of a sum of ``n`` terms in units of u: :math:`\min(n, \lambda\sqrt n)`."""
    n = np.maximum(np.asarray(n, dtype=np.float64), 1.0)
    return np.minimum(n, LAMBDA * np.sqrt(n))


@dataclass(frozen=True)
class Units:
    """The three unit roundoffs of the model (see the module docstring)."""

    u_out: float     # u_D: the candidate dtype
    u_acc: float     # u_A: its accumulator
    u_mid: float     # u_I: intermediates and parameter-gradient batch sums

    def __str__(self):
        return f"u_D={self.u_out:.3g}, u_A={self.u_acc:.3g}, u_I={self.u_mid:.3g}"


def units(dtype, strict=False) -> Units:
    fmt = get_format(dtype)
    acc = fmt.accumulator
    return Units(fmt.u, acc.u, acc.u if strict else max(fmt.u, acc.u))


def reduction_length(spec, case, groups: Groups | None) -> int:
    """N: the length of the reductions behind one output element."""
    if groups is not None:
        return groups.size
    if case.variant in REDUCTION_LENGTH:
        return max(1, REDUCTION_LENGTH[case.variant](case))
    x = case.arrays[0]
    return max(1, x.size // x.shape[0]) if x.ndim >= 1 and x.shape[0] else max(1, x.size)


def _finite(a):
    a = np.asarray(a, np.float64)
    return np.where(np.isfinite(a), a, 0.0)


class _Standardization:
    """The itemized model for variants whose forward saves ``rstd`` (and maybe ``mean``)."""

    def __init__(self, spec, case, ref, groups):
        names = list(spec.diff_argnames)
        arr = dict(zip(names, case.arrays))
        self.x = np.asarray(case.arrays[0], np.float64)
        self.g = groups
        cache = ref.cache
        self.r = np.asarray(cache.rstd, np.float64).ravel()
        mean = getattr(cache, "mean", None)
        self.mu = np.asarray(mean, np.float64).ravel() if isinstance(mean, np.ndarray) \
            and mean.size == groups.count else np.zeros(groups.count)
        xhat = getattr(cache, "xhat", None)
        if isinstance(xhat, np.ndarray) and xhat.shape == self.x.shape:
            self.xhat = np.asarray(xhat, np.float64)
        else:
            self.xhat = (self.x - groups.spread(self.mu)) * groups.spread(self.r)
        self.weight, self.bias = arr.get("weight"), arr.get("bias")
        # a scalar shortcut y = standardization + alpha x (RepBN), or none
        alpha = arr.get("alpha")
        self.alpha = 0.0 if alpha is None else float(np.abs(np.asarray(alpha, np.float64)).max())
        self.variant = spec.name
        self.gamma = np.ones_like(self.x) if self.weight is None else \
            np.broadcast_to(param_view(self.weight, self.x.shape, spec.name), self.x.shape)
        self.beta = np.zeros_like(self.x) if self.bias is None else \
            np.broadcast_to(param_view(self.bias, self.x.shape, spec.name), self.x.shape)
        self.dy = np.asarray(case.dy, np.float64)
        self.kwargs = case.kwargs
        self.outputs = ref.outputs
        # group magnitudes, independent of u
        ax = np.abs(self.x)
        self.mean_abs_x = groups.mean(np.where(np.isnan(ax), np.nan, ax))
        self.kappa = self.mean_abs_x * self.r

    @staticmethod
    def applies(spec, case, ref, groups):
        cache = ref.cache
        rstd = getattr(cache, "rstd", None)
        if groups is None or not isinstance(rstd, np.ndarray) or rstd.size != groups.count:
            return False
        x = case.arrays[0]
        if ref.outputs["y"].shape != x.shape:
            return False
        arr = dict(zip(spec.diff_argnames, case.arrays))
        for name in ("weight", "bias"):
            if arr.get(name) is not None and param_view(arr[name], x.shape, spec.name) is None:
                return False
        alpha = arr.get("alpha")
        if alpha is not None and np.size(alpha) != 1:
            return False
        return set(arr) <= {"x", "weight", "bias", "alpha"}

    def terms(self, u_acc):
        """``{output: (A, I)}``: the accumulation error (absolute, at ``u_acc``) and the
        magnitude of the intermediates a kernel may hold in the candidate dtype (to be
        multiplied by u_I), both the shape of the output. See docs/notes/tolerances.rst."""
        G, uA = self.g, u_acc
        gN = growth(G.sizes)
        kappa = self.kappa
        e_mu = gN * uA * kappa                               # error of mu, in units of 1/r
        e_r = 0.5 * (gN * uA * (1 + kappa) + e_mu ** 2) + 2 * uA   # relative error of rstd
        E_mu, E_r, R = G.spread(e_mu), G.spread(e_r), G.spread(self.r)
        ax = np.abs(self.xhat)
        # the terms of xhat = (x - mu) r, relative to its scale: |x| r + |mu| r
        shift = (np.abs(self.x) + np.abs(G.spread(self.mu))) * R
        dxh = E_mu + ax * E_r + uA * (ax + shift)            # accumulation error of xhat
        mid = ax + shift                                     # xhat from mu, rstd held in D
        gam, bet = np.abs(self.gamma), np.abs(self.beta)
        out = {}
        out["y"] = (gam * dxh + uA * (gam * ax + bet), gam * mid + bet)
        if self.alpha:   # + alpha x: a product and a sum, each rounded once
            ax_s = self.alpha * np.abs(self.x)
            out["y"] = (out["y"][0] + 2 * uA * ax_s, out["y"][1] + ax_s)
        g = self.gamma * self.dy
        ag = np.abs(g)
        mg, mgx = G.mean(ag), G.mean(np.abs(g * self.xhat))
        hbar = G.spread(np.abs(G.mean(g * self.xhat)))
        mag = ag + G.spread(mg) + ax * G.spread(mgx)
        if "dx" in self.outputs:
            dx = _finite(self.outputs["dx"])
            a = E_r * np.abs(dx) + R * (G.spread(gN * uA * mg) + ax * G.spread(gN * uA * mgx)
                                        + ax * G.spread(G.mean(ag * dxh)) + dxh * hbar
                                        + 2 * uA * mag)
            i = R * (mag + ax * G.spread(G.mean(ag * mid)) + mid * hbar)
            if self.alpha:   # + alpha dy
                ady_s = self.alpha * np.abs(self.dy)
                a, i = a + 2 * uA * ady_s, i + ady_s
            out["dx"] = (a, i)
        if self.alpha and "dalpha" in self.outputs:   # sum over every element of dy x
            total = float(np.sum(np.abs(self.dy * self.x)))
            g_all = float(growth(self.x.size))
            shape = self.outputs["dalpha"].shape
            out["dalpha"] = (np.full(shape, uA * total), np.full(shape, (g_all + 1) * total))
        ady, adyx = np.abs(self.dy), np.abs(self.dy * self.xhat)
        for name, p in (("weight", self.weight), ("bias", self.bias)):
            key = "d" + name
            if p is None or key not in self.outputs:
                continue
            view = param_view(p, self.x.shape, self.variant).shape
            gM = growth(max(1, self.x.size // max(p.size, 1)))

            def psum(a):
                return unbroadcast_sum(a, view, p.shape)

            if name == "weight":
                out[key] = (psum(ady * dxh) + uA * psum(adyx), (gM + 1) * psum(adyx)
                            + psum(ady * mid))
            else:
                out[key] = (uA * psum(ady), (gM + 1) * psum(ady))
        shape_g = (G.count,)
        if "mean" in self.outputs:
            out["mean"] = (gN * uA * self.mean_abs_x, np.abs(self.mu))
        if "rstd" in self.outputs:
            out["rstd"] = (self.r * e_r, self.r)
        # running statistics of stateful variants: (1 - m) * old + m * statistic
        m = self.kwargs.get("momentum", 0.1)
        m = 1.0 if m is None else float(m)
        for key, ref in self.outputs.items():
            if key in out or key.startswith("d") or ref.size != G.count:
                continue
            old = self.kwargs.get(key)
            old = np.abs(np.asarray(old, np.float64)).ravel() if isinstance(old, np.ndarray) \
                and old.size == G.count else np.zeros(G.count)
            new = np.abs(_finite(ref)).ravel()
            fresh = np.abs(new - (1 - m) * old)              # |m * statistic|
            if "var" in key:
                n = np.maximum(G.sizes, 2)
                stat_err = m * 2 * e_r / self.r ** 2 * n / (n - 1)   # 2 e_r (var + eps)
            else:
                stat_err = m * gN * uA * self.mean_abs_x
            terms = (1 - m) * old + fresh
            pair = (stat_err + 2 * uA * terms, 2 * terms)
            out[key] = tuple(np.reshape(t, ref.shape) for t in pair)
        for key in ("mean", "rstd"):
            if key in out:
                out[key] = tuple(np.reshape(np.broadcast_to(t, shape_g),
                                            self.outputs[key].shape) for t in out[key])
        return out


class _WeightNorm:
    """The itemized model of weight normalization, w = g v / ||v|| per slice."""

    def __init__(self, spec, case, ref):
        cache = ref.cache
        self.v = np.asarray(case.arrays[0], np.float64)
        self.rho = np.broadcast_to(np.asarray(cache.norm, np.float64), self.v.shape)
        self.g = np.broadcast_to(np.asarray(cache.g, np.float64), self.v.shape)
        labels, count = labels_from_axes(self.v.shape, tuple(cache.axes))
        self.G = Groups(labels, count, np.bincount(labels.ravel(), minlength=count))
        self.dw = np.asarray(case.dy, np.float64)
        self.outputs = ref.outputs

    @staticmethod
    def applies(spec, case, ref):
        cache = ref.cache
        return spec.name == "weight_norm" and all(hasattr(cache, k) for k in
                                                  ("norm", "g", "axes")) \
            and set(ref.outputs) >= {"y", "dv", "dg"}

    def terms(self, uA):
        G = self.G
        gN = G.spread(growth(G.sizes))
        e_rho = 0.5 * gN * uA + 2 * uA                      # relative error of ||v||
        vhat = self.v / self.rho
        avh = np.abs(vhat)
        s = np.abs(self.g) / self.rho
        P = G.spread(G.sum(np.abs(vhat * self.dw)))         # sum |vhat dw| over the slice
        T = s * (np.abs(self.dw) + avh * P)
        y, dv = np.abs(_finite(self.outputs["y"])), np.abs(_finite(self.outputs["dv"]))
        out = {"y": (y * (e_rho + 2 * uA), 2 * y)}
        out["dv"] = (s * avh * (gN * uA + e_rho) * P + dv * (e_rho + uA) + 2 * uA * T, 2 * T)
        first = np.zeros(G.count, dtype=np.int64)
        first[G.labels.ravel()[::-1]] = np.arange(G.labels.size)[::-1]
        pg, gNg = P.ravel()[first], gN.ravel()[first]
        shape = self.outputs["dg"].shape
        out["dg"] = (np.reshape((gNg * uA + e_rho.ravel()[first]) * pg, shape),
                     np.reshape(2 * pg, shape))
        return out


def _prep_bn_parts(case):
    r"""PRepBN's training output, :math:`\lambda\,\mathrm{LN} + (1-\lambda)\,
    \mathrm{RepBN}`, as its two branches: ``[(coef, variant, arrays, kwargs, renames)]``."""
    kw = case.kwargs
    x, weight, bias, alpha, ln_weight, ln_bias = case.arrays
    lam = kw.get("lam", 0.0)
    c = x.shape[-1]
    ln = (1.0 if lam is None else lam, "layer_norm", (x, ln_weight, ln_bias),
          dict(normalized_shape=(c,), eps=kw.get("ln_eps", 1e-5)),
          {"dweight": "dln_weight", "dbias": "dln_bias"})
    rep_kw = {k: v for k, v in kw.items() if k not in ("lam", "ln_eps")}
    rep = (1.0 - (1.0 if lam is None else lam), "rep_bn", (x, weight, bias, alpha), rep_kw, {})
    if not kw.get("training", False):
        return [(1.0, *rep[1:])]
    return [ln] if lam is None else [ln, rep]


#: Variants whose output is a weighted sum of registered variants, each with an itemized model:
#: ``name -> (case -> [(coef, variant, arrays, kwargs, {output: renamed output})])``.
COMPOSED = {"prep_bn": _prep_bn_parts}


class _Composed:
    r"""The itemized models of the branches of a weighted sum :math:`y = \sum_k c_k f_k(x)`.

    Branch :math:`k` is run by the oracle's own reference on its inputs with the upstream
    gradient :math:`c_k\,\mathrm{d}y` (its gradients are then already weighted), and its
    terms are those of its own model; ``y``'s terms are scaled by :math:`|c_k|`. The sum adds one
    rounding per branch: :math:`u_A\sum_k |c_k f_k|` to the accumulation error and
    :math:`\sum_k |c_k f_k|` to the intermediates (a candidate may hold each branch in its
    dtype). The same for ``dx``. Parameters of a branch get that branch's terms."""

    def __init__(self, parts):
        self.parts = parts      # [(coef, model, sub_ref, renames)]

    @staticmethod
    def build(spec, case, ref):
        from refnorm.norms import BY_NAME
        from refnorm.oracle.cases import Case
        from refnorm.oracle.reference import compute

        parts = []
        for coef, name, arrays, kwargs, renames in COMPOSED[case.variant](case):
            sub_spec = BY_NAME[name]
            sub = Case(name, case.name, case.dtype, tuple(arrays), kwargs,
                       np.asarray(case.dy, np.float64) * coef, case.seed, case.tags,
                       tuple(sub_spec.diff_argnames))
            sub_ref = compute(sub_spec, sub)
            groups = groups_of(sub_spec, sub.sample, sub_ref.cache)
            if not _Standardization.applies(sub_spec, sub, sub_ref, groups):
                return None
            parts.append((coef, _Standardization(sub_spec, sub, sub_ref, groups), sub_ref,
                          renames))
        return _Composed(parts)

    def terms(self, u_acc):
        out = {}
        for coef, model, sub_ref, renames in self.parts:
            for key, (a, i) in model.terms(u_acc).items():
                name = renames.get(key, key)
                if key in ("y", "dx"):
                    value = np.abs(_finite(sub_ref.outputs[key]))
                    value = value * abs(coef) if key == "y" else value
                    scale = abs(coef) if key == "y" else 1.0
                    a, i = a * scale + u_acc * value, i * scale + value
                if name in out:
                    out[name] = (out[name][0] + a, out[name][1] + i)
                else:
                    out[name] = (a, i)
        return out


def _normwise(ref, n, u: Units, F):
    scale = np.max(np.abs(_finite(ref))) if ref.size else 0.0
    return np.full(ref.shape, F * float(growth(n)) * (u.u_acc + u.u_mid) * scale)


def bounds(spec, case, ref, strict=False, *, ftz=False, safety=SAFETY, explain=False):
    """The per-element absolute error bound of every reference output of ``case``.

    Returns ``{name: array}`` (the shape of each output), and with ``explain=True`` also a
    dict saying which form of the model each output got. ``ftz=True`` admits a candidate that
    flushes subnormal numbers of its accumulator to zero: every operation may then lose up to
    the accumulator's smallest normal number instead of half its smallest subnormal.
    """
    with np.errstate(all="ignore"):   # non-finite cases are expected to make NaN here
        return _bounds(spec, case, ref, strict, ftz, safety, explain)


def _bounds(spec, case, ref, strict, ftz, safety, explain):
    u = units(case.dtype, strict)
    fmt = get_format(case.dtype)
    groups = groups_of(spec, case.sample, ref.cache)
    if _Standardization.applies(spec, case, ref, groups):
        model = _Standardization(spec, case, ref, groups)
    elif _WeightNorm.applies(spec, case, ref):
        model = _WeightNorm(spec, case, ref)
    elif case.variant in COMPOSED:
        model = _Composed.build(spec, case, ref)
    else:
        model = None
    n = reduction_length(spec, case, groups)
    # below the normal range rounding errors are absolute: half a subnormal spacing per
    # operation, in the output format and in the accumulator
    acc = fmt.accumulator
    floor = (acc.tiny if ftz else fmt.smallest_subnormal) + safety * float(growth(n)) * (
        acc.tiny if ftz else acc.smallest_subnormal)
    t = model.terms(u.u_acc) if model else {}
    # the reference's own error: the same model at u = 2^-53 (linear in u but for e_mu^2,
    # negligible below float64; so computed again only for float64 candidates)
    t64 = (model.terms(_U64) if u.u_acc == _U64 else
           {k: (a * (_U64 / u.u_acc), i) for k, (a, i) in t.items()}) if model else {}
    out, how = {}, {}
    for key, r in ref.outputs.items():
        ar = np.abs(_finite(r))
        if key in t and np.shape(t[key][0]) == r.shape:
            a, i = t[key]
            a64, _ = t64[key]
            b = u.u_out * ar + safety * (a + u.u_mid * i) \
                + _U64 * ar + safety * (a64 + _U64 * i)          # + the reference's own error
            how[key] = "itemized"
        else:
            b = u.u_out * ar + _normwise(r, n, u, safety) \
                + _U64 * ar + _normwise(r, n, Units(_U64, _U64, _U64), safety)
            how[key] = f"normwise (N={n})"
        out[key] = np.asarray(b + floor, np.float64)
    return (out, how) if explain else out
