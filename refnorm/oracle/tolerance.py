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
        self.variant = spec.name
        self.gamma = np.ones_like(self.x) if self.weight is None else \
            np.broadcast_to(param_view(self.weight, self.x.shape, spec.name), self.x.shape)
        self.beta = np.zeros_like(self.x) if self.bias is None else \
            np.broadcast_to(param_view(self.bias, self.x.shape, spec.name), self.x.shape)
        # Variants whose output is y = G xhat + B with per-element G, B that are not a weight and
        # a bias of the PyTorch layout (RN-B's per-region scale, SPADE's and RN-L's maps) say so
        # through their cache: ``oracle_affine() -> (G, B)``, and ``oracle_param_terms`` gives
        # the terms of their parameters' gradients from those of xhat (see terms())
        # When G and B are themselves computed (SPADE's and RN-L's convolutions), the hook also
        # returns (MG, MB, n): the magnitudes of the sums of n terms behind them, whose rounding
        # g(n) u_A (|xhat| MG + MB) adds to y (and g(n) u_A MG to the relative error of dx)
        self.maps = None
        affine = getattr(cache, "oracle_affine", None)
        if affine is not None:
            g_elem, b_elem, *maps = affine()
            self.gamma = np.broadcast_to(np.asarray(g_elem, np.float64), self.x.shape)
            self.beta = np.broadcast_to(np.abs(np.asarray(b_elem, np.float64)), self.x.shape)
            if maps:
                mg, mb, n_terms = maps
                self.maps = (np.broadcast_to(np.asarray(mg, np.float64), self.x.shape),
                             np.broadcast_to(np.asarray(mb, np.float64), self.x.shape),
                             float(growth(n_terms)))
        # Batch Renormalization, y = gamma (r xhat + d) + beta with r, d per-channel constants
        # of the gradient (``cache.renorm``): BatchNorm with the weight gamma r and the bias
        # beta + gamma d, except for dweight = sum dy (r xhat + d), itemized in terms()
        self.renorm = None
        renorm = getattr(cache, "renorm", None)
        if renorm is not None:
            r_c, d_c = (np.broadcast_to(param_view(np.asarray(v, np.float64), self.x.shape,
                                                   spec.name), self.x.shape) for v in renorm)
            self.renorm = (r_c, d_c)
            self.beta = np.abs(self.beta) + np.abs(self.gamma * d_c)
            self.gamma = self.gamma * r_c
        self.dy = np.asarray(case.dy, np.float64)
        self.cache = cache
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
        # a cache that describes its own affine part (``oracle_affine``: RN-B, RN-L, SPADE)
        if hasattr(cache, "oracle_affine"):
            return True
        # Switchable Norm's mixing logits (its cache says how: ``mixture()``)
        extra = {"mean_weight", "var_weight"} if hasattr(cache, "mixture") else set()
        return set(arr) <= {"x", "weight", "bias"} | extra

    def terms(self, u_acc):
        """``{output: (A, I)}``: the accumulation error (absolute, at ``u_acc``) and the
        magnitude of the intermediates a kernel may hold in the candidate dtype (to be
        multiplied by u_I), both the shape of the output. See docs/notes/tolerances.rst."""
        G, uA = self.g, u_acc
        gN = growth(G.sizes)
        kappa = self.kappa
        # an official algorithm that computes its statistics twice (RN's region mean, then
        # BatchNorm's mean and variance of the filled input) errs twice as much
        passes = float(getattr(self.cache, "oracle_statistics_passes", 1))
        e_mu = passes * gN * uA * kappa                      # error of mu, in units of 1/r
        e_r = 0.5 * (passes * gN * uA * (1 + kappa) + e_mu ** 2) + 2 * uA   # of rstd
        E_mu, E_r, R = G.spread(e_mu), G.spread(e_r), G.spread(self.r)
        ax = np.abs(self.xhat)
        # the terms of xhat = (x - mu) r, relative to its scale: |x| r + |mu| r
        shift = (np.abs(self.x) + np.abs(G.spread(self.mu))) * R
        dxh = E_mu + ax * E_r + uA * (ax + shift)            # accumulation error of xhat
        mid = ax + shift                                     # xhat from mu, rstd held in D
        gam, bet = np.abs(self.gamma), np.abs(self.beta)
        out = {}
        # roundings of an official algorithm beyond the textbook one, per element of y and dx
        # (RN's fill-and-BatchNorm: the rescale by a rounded sqrt(S/N) and its product)
        extra = float(getattr(self.cache, "oracle_extra_roundings", 0))
        out["y"] = (gam * dxh + uA * ((1 + extra) * gam * ax + bet), gam * mid + bet)
        if self.maps is not None:
            mg, mb, g_maps = self.maps
            out["y"] = (out["y"][0] + g_maps * uA * (ax * mg + mb), out["y"][1])
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
            if self.maps is not None:  # dx is linear in G: its error relative to |G|
                mg, _, g_maps = self.maps
                a = a + g_maps * uA * np.abs(dx) * mg / np.maximum(gam, np.finfo(float).tiny)
            out["dx"] = (a + extra * uA * np.abs(dx), i)
        ady, adyx = np.abs(self.dy), np.abs(self.dy * self.xhat)
        param_terms = getattr(self.cache, "oracle_param_terms", None)
        if param_terms is not None:
            # the gradients of the parameters behind G and B, first order in the error dxh of
            # xhat (absolute, per element) with mid the magnitude of its intermediates
            for key, pair in param_terms(ady, dxh, mid, uA, growth).items():
                if key in self.outputs:
                    out[key] = tuple(np.reshape(t, self.outputs[key].shape) for t in pair)
        for name, p in (("weight", self.weight), ("bias", self.bias)):
            key = "d" + name
            if p is None or key not in self.outputs:
                continue
            view = param_view(p, self.x.shape, self.variant).shape
            gM = growth(max(1, self.x.size // max(p.size, 1)))

            def psum(a):
                return unbroadcast_sum(a, view, p.shape)

            if name == "weight" and self.renorm is not None:
                # sum dy (r xhat + d): r times the plain terms, plus |d| times those of dbias
                ar, ad = (np.abs(v) for v in self.renorm)
                out[key] = (psum(ar * ady * dxh) + uA * psum(ar * adyx + ad * ady),
                            (gM + 1) * psum(ar * adyx + ad * ady) + psum(ar * ady * mid))
            elif name == "weight":
                out[key] = (psum(ady * dxh) + uA * psum(adyx), (gM + 1) * psum(adyx)
                            + psum(ady * mid))
            else:
                out[key] = (uA * psum(ady), (gM + 1) * psum(ady))
        mixture = getattr(self.cache, "mixture", None)
        if mixture is not None:
            out.update(self._mixture_terms(mixture(), e_r, uA))
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


    def _mixture_terms(self, mixture, e_r, uA):
        r"""Terms of the gradients of mixing logits (Switchable Norm): with :math:`\bar\mu =
        -r\sum h` and :math:`\bar v = -\frac12 r^2\sum h\hat x` per group,
        :math:`\mathrm{d}\lambda_j = w_j\sum_{\rm groups}\bar s\,(s_j - s)` for the means
        :math:`s = \mu` and the variances :math:`s = v`. First order: each statistic
        :math:`s_j` and the mixture :math:`s` err by :math:`e_s` (a mean by
        :math:`g(N)\,u_A\langle|x|\rangle`, a variance by
        :math:`2\sigma e_\mu + g(N)u_A\sigma^2`), the adjoint :math:`\bar s` relatively by
        :math:`2e_r + g(N)u_A`, and the sum over groups by :math:`g(G)u_A`."""
        G = self.g
        gN, gG = growth(G.sizes), float(growth(G.count))
        h = self.gamma * self.dy
        e_mu = gN * uA * self.mean_abs_x                     # absolute error of a mean
        sigma = 1.0 / self.r                                 # ~ sqrt(v + eps)
        e_v = 2 * sigma * e_mu + gN * uA * sigma ** 2        # absolute error of a variance
        adj = {"mean_weight": (self.r * np.abs(G.sum(h)), e_mu, 1.0),
               "var_weight": (0.5 * self.r ** 2 * np.abs(G.sum(h * self.xhat)), e_v, 2.0)}
        out = {}
        for key, (weights, devs) in mixture.items():
            if "d" + key not in self.outputs:
                continue
            g_bar, e_s, k = adj[key]
            a, i = [], []
            for wj, dev in zip(weights, devs):
                dev = np.abs(np.asarray(dev, np.float64)).ravel()   # per group, label order
                a.append(abs(wj) * np.sum(g_bar * 2 * e_s
                                          + g_bar * dev * (k * e_r + gN * uA + gG * uA)))
                i.append(abs(wj) * (gG + 1) * np.sum(g_bar * dev))
            shape = self.outputs["d" + key].shape
            out["d" + key] = (np.reshape(a, shape), np.reshape(i, shape))
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
