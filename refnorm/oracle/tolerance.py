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

**Kernel conventions.** A case of ``rms_norm`` or ``layer_norm`` may carry a weight offset
(``offset``: the model's :math:`\gamma` is then :math:`o + \gamma`) and a claimed casting
mode (``casting_mode``, Liger-Kernel's ``"llama"``, ``"gemma"``, ``"none"``). A claimed mode
replaces the :math:`u_I` terms of ``y``, ``dx``, ``dweight`` and ``dbias`` by the roundings
that mode makes in the candidate dtype, counted at :math:`u_D` whatever ``strict`` says, and
no others: ``_Standardization.mode_terms`` derives them, and
``docs/howto/rms_norm_kernel.rst`` ("The tolerance of a casting mode") states them.

Variants that standardize (their forward saves ``rstd``, and their groups are known, see
:mod:`refnorm.oracle.structure`) get the itemized model. Others get the **normwise** form
:math:`u_D|y_i| + F\,g(N)\,(u_A + u_I)\max_j|y_j|`, with :math:`N` the reduction length.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from refnorm.oracle.formats import FORMATS, get_format, round_to
from refnorm.oracle.reference import FUSED_ADD, output_format, residual_format  # noqa: F401
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


def _offset(case):
    """The weight offset ``o`` a case's kwargs give (0.0 when none)."""
    o = case.kwargs.get("offset", 0.0)
    return float(o) if isinstance(o, (int, float, np.floating)) and not isinstance(o, bool) \
        else 0.0


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
        # kernel conventions (rms_norm, layer_norm): the weight offset, y = xhat (o + gamma)
        # (+ beta; exact in float64 for inputs of the candidate dtype), and the casting mode
        self.offset = _offset(case) if self.weight is not None else 0.0
        if self.offset:
            self.gamma = self.gamma + self.offset
        self.casting_mode = case.kwargs.get("casting_mode")
        self.centred = spec.name != "rms_norm"
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
        # a constant factor on the whole output, y = s (gamma xhat + beta) (LayerNorm Scaling:
        # s = 1/sqrt(depth)): gamma and beta are s gamma and s beta for y and dx, and the
        # parameter gradients are s times those of the plain norm
        self.scale = float(getattr(cache, "output_scale", 1.0))
        self.gamma, self.beta = self.gamma * self.scale, self.beta * self.scale
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
        alpha = arr.get("alpha")
        if alpha is not None and np.size(alpha) != 1:
            return False
        # a cache that describes its own affine part (``oracle_affine``: RN-B, RN-L, SPADE)
        if hasattr(cache, "oracle_affine"):
            return True
        # Switchable Norm's mixing logits (its cache says how: ``mixture()``)
        extra = {"mean_weight", "var_weight"} if hasattr(cache, "mixture") else set()
        return set(arr) <= {"x", "weight", "bias", "alpha"} | extra

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
            if self.maps is not None:  # dx is linear in G: its error relative to |G|
                mg, _, g_maps = self.maps
                a = a + g_maps * uA * np.abs(dx) * mg / np.maximum(gam, np.finfo(float).tiny)
            out["dx"] = (a + extra * uA * np.abs(dx), i)
        if self.alpha and "dalpha" in self.outputs:   # sum over every element of dy x
            total = float(np.sum(np.abs(self.dy * self.x)))
            g_all = float(growth(self.x.size))
            shape = self.outputs["dalpha"].shape
            out["dalpha"] = (np.full(shape, uA * total), np.full(shape, (g_all + 1) * total))
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

            s = self.scale
            if name == "weight" and self.renorm is not None:
                # sum dy (r xhat + d): r times the plain terms, plus |d| times those of dbias
                ar, ad = (np.abs(v) for v in self.renorm)
                out[key] = (s * (psum(ar * ady * dxh) + uA * psum(ar * adyx + ad * ady)),
                            s * ((gM + 1) * psum(ar * adyx + ad * ady) + psum(ar * ady * mid)))
            elif name == "weight":
                out[key] = (s * (psum(ady * dxh) + uA * psum(adyx)), s * ((gM + 1) * psum(adyx)
                            + psum(ady * mid)))
            else:
                out[key] = (s * uA * psum(ady), s * (gM + 1) * psum(ady))
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
        self._parts = dict(ax=ax, gam=gam, R=R, shift=shift, ag=ag, adyx=adyx, ady=ady,
                           hbar=hbar, mgx=G.spread(mgx))
        return out

    def mode_terms(self, mode, u_acc, base, u_dtype):
        r"""The terms of ``y``, ``dx``, ``dweight`` and ``dbias`` (and, in mode ``"none"``,
        ``rstd``) under a claimed casting mode
        (Liger-Kernel's, :data:`refnorm.norms._stats.CASTING_MODES`): ``{output: (A, J)}``,
        ``A`` the accumulation error at ``u_acc`` and ``J`` the magnitude of the roundings the
        mode makes **in the candidate dtype**, to be multiplied by :math:`u_D` (whatever
        ``strict`` says: the mode names them). ``base`` is :meth:`terms`' result at ``u_acc``.

        With :math:`\hat x` the normalized input, :math:`\gamma' = o + \gamma`,
        :math:`g = \gamma'\,\mathrm{d}y`, :math:`[o]`, :math:`[\beta]` 1 when there is an
        offset, a bias (0 otherwise), and :math:`r` the row's rstd:

        * ``"gemma"`` (all float32, one final rounding): :math:`J = 0` for every output; the
          float32 roundings (:math:`o + \gamma` among them: :math:`u_A|\gamma'\hat x|`) and
          the float32 batch sums of ``dweight``/``dbias`` (:math:`g(M)\,u_A`) are in ``A``.
        * ``"llama"``: :math:`\hat x` rounded to the dtype (:math:`|\gamma'\hat x|`), then
          :math:`o + \gamma` rounded ([o]) and the product rounded before a bias is added
          ([β]): :math:`J_y = |\gamma'\hat x|\,(1 + [o] + [\beta])`. Backward (Liger's
          llama backward, and autograd of the llama forward): :math:`g` rounded to the dtype,
          :math:`J_{dx} = r\,(|g| + \langle|g|\rangle + |\hat x|\langle|g\hat x|\rangle)`
          (no :math:`\langle|g|\rangle` for RMSNorm); each term of ``dweight`` from the
          rounded :math:`\hat x`, the product rounded: :math:`J = 2\sum|\mathrm{d}y\,
          \hat x|`, the sums in float32.
        * ``"none"`` (everything in the dtype, the sums accumulated in float32): beyond the
          :math:`u_I` terms of :meth:`terms` (the statistics held in the dtype: ``shift``,
          the squares), rstd carries :math:`2.5\,u_D` (the mean of the squares, the
          ``+ eps`` and the reciprocal square root each rounded, halved by the square root,
          plus its own rounding): :math:`J_y = |\gamma'|\,(3.5|\hat x| + s) + |\gamma'
          \hat x|([o] + [\beta])`, :math:`s = (|x| + |\mu|)\,r`; ``dx`` and the parameter
          gradients get their :meth:`terms` intermediates plus :math:`2.5` times their own
          magnitude and the rounding of :math:`g`; ``dx`` also the gradient through rstd held
          in the dtype, :math:`6.5\,r|\hat x|(|\langle g\hat x\rangle| +
          \langle|g\hat x|\rangle)` (:math:`r^3`, the row sum and two products rounded).
          LayerNorm in this mode also holds the mean in the dtype: its rounding
          :math:`\delta \le u_D|\mu|` shifts every deviation, and the variance of the shifted
          deviations is :math:`\sigma^2 + \delta^2`, so rstd errs relatively by
          :math:`q = \tfrac12 (u_D\kappa)^2` with :math:`\kappa = \langle|x|\rangle r`, the
          conditioning of the mean (second order in :math:`u_D`, but :math:`\kappa` reaches
          :math:`1/u_D` on a float16 row of mean :math:`10^3` and spread 1: there this mode
          cannot resolve the row, and the bound says so by reaching the output's scale).
          ``rstd`` itself: :math:`J = (2.5 + q/u_D)\,r`; :math:`y`, ``dx`` and ``dweight``
          carry :math:`q` relative to their terms in :math:`r`.
        """
        p = self._parts
        ax, gam, R, ag = p["ax"], p["gam"], p["R"], p["ag"]
        G, uA = self.g, u_acc
        k_off = 1.0 if self.offset else 0.0
        k_b = 1.0 if self.bias is not None else 0.0
        gx = gam * ax
        zero = np.zeros_like(gx)
        out = {}
        # none: the mean held in the dtype, rstd's relative error q (in units of u_D)
        q = 0.5 * u_dtype * self.kappa ** 2 if mode == "none" and self.centred \
            else np.zeros_like(self.kappa)
        Q = G.spread(q)
        a_y, i_y = base["y"]
        if mode == "gemma":
            out["y"] = (a_y + uA * k_off * gx, zero)
        elif mode == "llama":
            out["y"] = (a_y, gx * (1 + k_off + k_b))
        else:
            out["y"] = (a_y, gam * ((3.5 + Q) * ax + p["shift"]) + gx * (k_off + k_b))
        if "dx" in base:
            a_d, i_d = base["dx"]
            mean_g = G.spread(G.mean(ag)) if self.centred else 0.0
            dg = R * (ag + mean_g + ax * G.spread(G.mean(ag * ax)))   # g rounded
            dx = np.abs(_finite(self.outputs["dx"]))
            # none: the gradient through rstd in the dtype, xhat <g xhat> r: r^3 (3.5), the
            # row sum and two products rounded (3): 6.5 roundings of that term
            through_r = 6.5 * R * ax * (p["hbar"] + p["mgx"])
            out["dx"] = (a_d, np.zeros_like(dx)) if mode == "gemma" else \
                (a_d, dg) if mode == "llama" else \
                (a_d, i_d + dg + (2.5 + Q) * dx + (1 + Q) * through_r)
        for name, prm in (("weight", self.weight), ("bias", self.bias)):
            key = "d" + name
            if prm is None or key not in base:
                continue
            view = param_view(prm, self.x.shape, self.variant).shape
            gM = growth(max(1, self.x.size // max(prm.size, 1)))
            terms = p["adyx"] if name == "weight" else p["ady"]
            total = self.scale * unbroadcast_sum(terms, view, prm.shape)
            a_p, i_p = base[key]
            if mode == "none":
                through_q = self.scale * unbroadcast_sum(terms * Q, view, prm.shape) \
                    if name == "weight" else 0.0
                out[key] = (a_p, i_p + 2.5 * total + through_q)
            else:   # the sums over the batch in float32
                out[key] = (a_p + gM * uA * total,
                            2 * total if mode == "llama" and name == "weight"
                            else np.zeros_like(total))
        if mode == "none" and "rstd" in base:
            a_r, _ = base["rstd"]
            out["rstd"] = (a_r, np.reshape((2.5 + q) * self.r, np.shape(a_r)))
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


def _subnormal_centring(model, eta, tiny):
    r"""Standardizing variants: the absolute error of a centred value :math:`x - \mu` held in
    the candidate dtype where it is subnormal there (``eta``: half its smallest subnormal
    spacing, per element; 0 elsewhere), carried to every output by :math:`r`. Relative terms
    (``u_I``) cannot express it: below the normal range the rounding is absolute. It matters only
    where :math:`|x-\mu|` is below the dtype's smallest normal number and r is large (a
    subnormal input with ``eps`` 1e-5: bfloat16's 9e-41 spacing times r = 316)."""
    G = model.g
    R = G.spread(model.r)
    d = np.abs(model.x - G.spread(model.mu))
    e = np.where(d < tiny, eta, 0.0) * R                   # error of xhat, absolute
    gam = np.abs(model.gamma)
    out = {"y": gam * e}
    ag = np.abs(model.gamma * model.dy)
    hbar = G.spread(np.abs(G.mean(model.gamma * model.dy * model.xhat)))
    ax = np.abs(model.xhat)
    out["dx"] = R * (ax * G.spread(G.mean(ag * e)) + e * hbar)
    if model.weight is not None:
        view = param_view(model.weight, model.x.shape, model.variant).shape
        out["dweight"] = model.scale * unbroadcast_sum(np.abs(model.dy) * e, view,
                                                       model.weight.shape)
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
        if "dg" not in self.outputs:   # _L2Norm: g = 1 is no input
            return out
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


class _L2Norm(_WeightNorm):
    r"""The weight-norm model with :math:`g = 1`, for ``y = x / max(||x||, eps)`` per vector
    (``l2_norm``, and the L2 form of ``qk_norm``): the same two reductions (the norm, and
    :math:`\langle y, \mathrm{d}y\rangle`), the same terms. With Matryoshka truncation the
    model covers the first ``m`` coordinates; ``dx`` is exactly 0 beyond them."""

    def __init__(self, spec, case, ref):
        cache = ref.cache
        y = np.asarray(cache.y, np.float64)
        self.rho = np.broadcast_to(np.asarray(cache.norm, np.float64), y.shape)
        self.v = y * self.rho
        self.g = np.ones_like(y)
        labels, count = labels_from_axes(y.shape, tuple(cache.axes))
        self.G = Groups(labels, count, np.bincount(labels.ravel(), minlength=count))
        self.dw = np.asarray(case.dy, np.float64)
        self.index = tuple(slice(0, n) for n in y.shape)
        self.outputs = {"y": ref.outputs["y"], "dv": ref.outputs["dx"][self.index]}
        self.dx_shape = ref.outputs["dx"].shape

    @staticmethod
    def applies(spec, case, ref):
        cache = ref.cache
        return all(hasattr(cache, k) for k in ("y", "norm", "clamped", "axes", "x_shape")) \
            and set(ref.outputs) == {"y", "dx"}

    def terms(self, uA):
        t = super().terms(uA)
        out = {"y": t["y"]}
        pair = []
        for part in t["dv"]:
            full = np.zeros(self.dx_shape)
            full[self.index] = part
            pair.append(full)
        out["dx"] = tuple(pair)
        return out


class _SigmaReparam:
    r"""The itemized bound of :math:`\mathrm{d}\gamma = \langle G, W\rangle/\sigma` of
    σReparam (:math:`\hat W = \gamma W/\sigma`, :math:`\sigma = u^\top W v`); its other
    outputs keep the normwise form. The normwise form scales by :math:`|\mathrm{d}\gamma|`
    with :math:`N` the row length of the matrix view, but :math:`\mathrm{d}\gamma` is one sum
    over **all** :math:`n = hw` elements, which cancels (random :math:`G`): its rounding errors
    are relative to :math:`S = \sum_{ij}|G_{ij}W_{ij}|/|\sigma|`, not to the result.

    A kernel forms :math:`\mathrm{d}\gamma = \sum_{ij} G_{ij}\,\mathrm{fl}(W_{ij}/\tilde
    \sigma)` (autograd of ``(W / sigma) * gamma``) or :math:`\langle G, W\rangle/\tilde\sigma`:

    * the sum of :math:`n` terms, accumulated with :math:`u_A`: :math:`g(n)\,u_A\,S`;
    * the terms held in the candidate dtype (:math:`W/\sigma` rounded, then the product):
      :math:`2u_I\,S`;
    * the relative error :math:`e_\sigma` of :math:`\tilde\sigma`, which scales every term:
      :math:`e_\sigma|\mathrm{d}\gamma|`. With the unit vectors :math:`\hat u,\hat v` and
      :math:`\hat\sigma = \hat u^\top W\hat v`, the bilinear form's conditioning is
      :math:`K = |\hat u|^\top|W||\hat v|/|\hat\sigma| \ge 1`; the matrix-vector product and
      the dot product (lengths :math:`w`, :math:`h`) and the norms of the power iteration
      give :math:`(g(w) + g(h) + 2)\,u_A K`, and the roundings of :math:`Wv`, :math:`u`,
      :math:`v` and :math:`\sigma` in the candidate dtype :math:`4u_I K`. With
      ``n_power_iterations`` :math:`\ge 1` the direction of :math:`u = \mathrm{normalize}(W
      v')` (:math:`v'` the previous right vector: the given one for one step, else
      :math:`\hat v`) errs componentwise by :math:`g(w)u_A(|W||v'|)_i/\lVert Wv'\rVert`,
      which moves :math:`\sigma = \lVert W^\top u\rVert` by up to :math:`g(w)u_A\,
      |W\hat v|^\top|W||v'|/(\lVert Wv'\rVert|\hat\sigma|)` relative (0 to first order at
      a converged state, where :math:`W\hat v \parallel u`, but the bound does not assume
      convergence).
    """

    def __init__(self, spec, case, ref):
        cache = ref.cache
        weight = np.asarray(case.arrays[0], np.float64)
        dim = int(cache.dim)
        h = weight.shape[dim]
        self.w = np.moveaxis(weight, dim, 0).reshape(h, -1)
        self.g = np.moveaxis(np.asarray(case.dy, np.float64), dim, 0).reshape(h, -1)
        self.u = np.asarray(cache.u_hat, np.float64)
        self.v = np.asarray(cache.v_hat, np.float64)
        self.sigma_hat = float(cache.sigma_hat)
        self.sigma = float(cache.sigma)
        n_iter = int(case.kwargs.get("n_power_iterations", 1))
        if n_iter == 0:
            self.v_prev = None
        else:
            v0 = np.asarray(case.kwargs["v"], np.float64) if n_iter == 1 else self.v
            self.v_prev = v0 if np.any(v0) else self.v
        self.dgamma = np.asarray(ref.outputs["dgamma"], np.float64)

    @staticmethod
    def applies(spec, case, ref):
        cache = ref.cache
        return spec.name == "sigma_reparam" and "dgamma" in ref.outputs and all(
            hasattr(cache, k) for k in ("u_hat", "v_hat", "sigma_hat", "sigma", "dim"))

    def terms(self, uA):
        h, w = self.w.shape
        aw = np.abs(self.w)
        S = float(np.sum(np.abs(self.g) * aw)) / abs(self.sigma)
        K = float(np.abs(self.u) @ aw @ np.abs(self.v)) / abs(self.sigma_hat)
        e_a = (float(growth(w)) + float(growth(h)) + 2) * K
        if self.v_prev is not None:
            wv = self.w @ self.v_prev
            e_a += float(growth(w)) * float(np.abs(self.w @ self.v) @ aw @ np.abs(self.v_prev)) \
                / (float(np.sqrt(wv @ wv)) * abs(self.sigma_hat))
        dg = np.abs(_finite(self.dgamma))
        a = float(growth(h * w)) * uA * S + e_a * uA * dg
        i = 2 * S + 4 * K * dg
        return {"dgamma": (np.reshape(a, self.dgamma.shape), np.reshape(i, self.dgamma.shape))}


class _DyT:
    r"""The itemized model of Dynamic Tanh, :math:`y = \gamma\tanh(\alpha x) + \beta`
    (``docs/notes/tolerances.rst``): elementwise but for the sums of the parameter gradients.

    With :math:`z = \alpha x`, :math:`t = \tanh z`, :math:`s = 1 - t^2`, the computed
    :math:`t` errs by :math:`u\,\tau`, :math:`\tau = |t| + s|z|` (the rounding of :math:`z`,
    amplified by tanh's derivative, and tanh's own); :math:`s` formed from it by
    :math:`u\,\sigma`, :math:`\sigma = 2|t|\tau + t^2 + 4s`."""

    def __init__(self, spec, case, ref):
        cache = ref.cache
        arr = dict(zip(spec.diff_argnames, case.arrays))
        x = np.asarray(arr["x"], np.float64)
        self.axis = int(cache.channel_axis)
        shape = [1] * x.ndim
        shape[self.axis] = -1

        def per_channel(p, default):
            return np.broadcast_to(default if p is None else
                                   np.asarray(p, np.float64).reshape(shape), x.shape)

        alpha = float(np.asarray(arr["alpha"], np.float64).ravel()[0])
        self.gamma = np.abs(per_channel(arr.get("weight"), 1.0))
        self.beta = np.abs(per_channel(arr.get("bias"), 0.0))
        z = alpha * x
        t = np.tanh(z)
        s = (1 - t) * (1 + t)
        self.at, self.s = np.abs(t), s
        self.tau = self.at + s * np.abs(z)
        self.sig = 2 * self.at * self.tau + t * t + 4 * s
        self.x, self.alpha = np.abs(x), abs(alpha)
        self.dy = np.abs(np.asarray(case.dy, np.float64))
        self.batch = tuple(a for a in range(x.ndim) if a != self.axis)
        self.outputs = ref.outputs

    @staticmethod
    def applies(spec, case, ref):
        return spec.name == "dyt" and hasattr(ref.cache, "channel_axis")

    def terms(self, uA):
        gam, dy = self.gamma, self.dy
        out = {}
        ty = gam * self.tau + gam * self.at + self.beta
        out["y"] = (uA * ty, ty)
        gdy = gam * dy
        tdx = self.alpha * gdy * self.sig
        out["dx"] = (uA * tdx, tdx)
        n = self.x.size
        elem = np.sum(gdy * self.x * self.sig)             # the terms' own errors
        total = np.sum(gdy * self.x * self.s)              # sum |terms|: the sum's error
        out["dalpha"] = tuple(np.reshape(v, self.outputs["dalpha"].shape) for v in
                              (uA * (elem + total), elem + (growth(n) + 1) * total))
        m = max(1, n // max(1, self.x.shape[self.axis]) if self.x.ndim else 1)
        gM = float(growth(m))
        if "dweight" in self.outputs:
            own, terms = (np.sum(a, axis=self.batch) for a in (dy * self.tau, dy * self.at))
            out["dweight"] = (uA * (own + terms), own + (gM + 1) * terms)
        if "dbias" in self.outputs:
            sdy = np.sum(dy, axis=self.batch)
            out["dbias"] = (uA * sdy, (gM + 1) * sdy)
        return out


class _PowerSoftmax:
    r"""The itemized model of Power-Softmax, :math:`y_i = s_i^p / Z`, :math:`Z = \epsilon_L +
    \sum_j s_j^p`, per row of :math:`n` scores (``docs/notes/tolerances.rst``).

    A kernel forms :math:`s/c` (one rounding), its :math:`p`-th power (the rounding of
    :math:`s/c` amplified :math:`p` times, plus up to :math:`p` roundings of the product),
    the row sum (:math:`g(n)` roundings, in the accumulator) and one quotient: the relative
    error of :math:`y_i` is at most :math:`(2p + 4)\,u + g(n)\,u_A`. The backward
    :math:`\mathrm{d}x_i = K_i(\mathrm{d}y_i - D)`, :math:`K_i = p s_i^{p-1}/Z`, :math:`D =
    \sum_j \mathrm{d}y_j y_j`, has the terms :math:`T_i = K_i(|\mathrm{d}y_i| + P)`,
    :math:`P = \sum_j |\mathrm{d}y_j y_j|`: :math:`K_i` errs as :math:`y_i` does, :math:`D` by
    :math:`g(n)u_A P` plus :math:`y`'s error times :math:`P`, and the difference by :math:`2u
    T_i`; :math:`T_i` keeps the bound absolute where :math:`\mathrm{d}y_i - D` cancels."""

    def __init__(self, spec, case, ref):
        cache = ref.cache
        axes = tuple(cache.axes)
        self.y = np.abs(np.asarray(ref.outputs["y"], np.float64))
        ratio = np.asarray(cache.ratio, np.float64)
        denom = np.asarray(cache.denom, np.float64)
        p = int(cache.p)
        with np.errstate(all="ignore"):   # K = p r^{p-1} / (c Z~), c = 2^e applied exactly
            self.k = np.abs(np.ldexp(p * ratio ** (p - 1) / denom, -np.asarray(cache.e)))
        self.p = p
        n = ratio.shape[axes[0]] if ratio.ndim else 1
        self.gn = float(growth(n))
        dy = np.asarray(case.dy, np.float64)
        self.ady = np.abs(dy)
        self.P = np.sum(np.abs(dy) * self.y, axis=axes, keepdims=True)
        self.dx = np.abs(_finite(ref.outputs["dx"]))

    @staticmethod
    def applies(spec, case, ref):
        cache = ref.cache
        return all(hasattr(cache, k) for k in ("ratio", "denom", "e", "p", "axes")) \
            and set(ref.outputs) == {"y", "dx"}

    def terms(self, uA):
        e_i = 2 * self.p + 4                         # relative error of y in units of u (u_I)
        e_a = e_i + self.gn                          # ... and of u_A (the row sum)
        out = {"y": (uA * e_a * self.y, e_i * self.y)}
        T = self.k * (self.ady + self.P)
        a = uA * (e_a * self.dx + self.k * (self.gn + e_a) * self.P + 2 * T)
        i = e_i * self.dx + self.k * e_i * self.P + 2 * T
        out["dx"] = (a, i)
        return out


class _WeightStandardization:
    r"""The itemized model of weight standardization, plain and scaled (NF-Net, FedWon):
    :math:`\hat W = c\,d/D` per output channel, :math:`d = W - \mu`, and its backward
    :math:`\mathrm{d}W = (c/D)(G - \langle G\rangle - t\,\hat w P)`,
    :math:`\hat w = d/D`, :math:`P = \sum G\hat w` (``docs/notes/tolerances.rst``).

    Its first-order term is the conditioning of the mean, as in :class:`_Standardization`: the
    mean is off by :math:`e_\mu = g(N)\,u_A\,\langle|W|\rangle`, which shifts every
    :math:`d` by as much, so :math:`\hat w` by :math:`e_\mu/D`; a slice whose mean is large
    against its spread (:math:`\langle|W|\rangle/D \gg 1`) is ill-conditioned for any
    kernel that computes :math:`W - \mu` in the accumulation format."""

    NAMES = ("weight_standardization", "scaled_weight_standardization")

    def __init__(self, spec, case, ref):
        cache = ref.cache
        w = np.asarray(case.arrays[0], np.float64)
        self.shape = w.shape
        self.x = w.reshape(w.shape[0], -1)
        self.d = np.asarray(cache.d, np.float64)
        self.n = self.d.shape[1]
        if spec.name == "weight_standardization":
            self.D = np.asarray(cache.s, np.float64)
            rho = np.asarray(cache.rho, np.float64)
            with np.errstate(all="ignore"):
                self.t = np.where(rho == 0, 0.0, self.D / (cache.k * rho))
            self.c = np.ones_like(self.D)
            self.gamma = 1.0
        else:
            self.D, self.c, self.t = (np.asarray(a, np.float64) for a in (cache.D, cache.c,
                                                                            cache.t))
            self.gamma = float(cache.gamma)
        self.G = np.asarray(case.dy, np.float64).reshape(self.d.shape)
        self.outputs = ref.outputs
        # d = W - mu of subnormal weights carries an absolute rounding error of half a
        # subnormal spacing, in the candidate's dtype and in its accumulator, which 1/D
        # amplifies (D may be eps-sized while W is subnormal)
        fmt = get_format(case.dtype)
        self.sub = float(fmt.smallest_subnormal) + float(fmt.accumulator.smallest_subnormal)

    @classmethod
    def applies(cls, spec, case, ref):
        return spec.name in cls.NAMES and hasattr(ref.cache, "d") \
            and np.size(ref.cache.d) == np.size(case.arrays[0])

    def terms(self, uA):
        n, D, c, t, G = self.n, self.D, np.abs(self.c), self.t, self.G
        gN = float(growth(n))
        mean_abs = np.mean(np.abs(self.x), axis=1, keepdims=True)
        mu = np.abs(np.mean(self.x, axis=1, keepdims=True))
        e_mu = gN * uA * mean_abs                            # absolute error of the mean
        q = np.sum(self.d ** 2, axis=1, keepdims=True)
        e_D = 0.5 * (gN * uA + n * e_mu ** 2 / np.maximum(q, np.finfo(float).tiny)) + 2 * uA
        what = np.abs(self.d / D)
        shift = (np.abs(self.x) + mu) / D                    # the terms of d / D
        dwh = e_mu / D + what * e_D + uA * (what + shift) + 2 * self.sub / D  # error of d / D
        mid = what + shift                                   # d / D from a mean held in u_I
        out = {"y": (c * dwh + uA * c * what, c * mid)}
        aG = np.abs(G)
        mG = np.mean(aG, axis=1, keepdims=True)
        sGw = np.sum(aG * what, axis=1, keepdims=True)
        P = np.abs(np.sum(G * self.d / D, axis=1, keepdims=True))
        eP = gN * uA * sGw + np.sum(aG * dwh, axis=1, keepdims=True)
        if "dweight" in self.outputs:
            dw = np.abs(_finite(self.outputs["dweight"])).reshape(self.d.shape)
            a = dw * e_D + (c / D) * (gN * uA * mG + t * (what * eP + dwh * P)
                                      + 2 * uA * (aG + mG + t * what * P))
            i = (c / D) * (aG + mG + t * (what * np.sum(aG * mid, axis=1, keepdims=True)
                                          + mid * P))
            out["dweight"] = (a.reshape(self.shape), i.reshape(self.shape))
        if "dgain" in self.outputs:
            shape = self.outputs["dgain"].shape
            g = abs(self.gamma)
            out["dgain"] = (np.reshape(g * (eP + uA * sGw), shape),
                            np.reshape(g * ((gN + 1) * sGw + np.sum(aG * mid, axis=1,
                                                                   keepdims=True)), shape))
        out["y"] = tuple(a.reshape(self.shape) for a in out["y"])
        return out


class _FilterResponse:
    r"""The itemized model of FRN + TLU: :math:`\hat x = x\,r`, :math:`r = (\langle
    x^2\rangle_S + \epsilon)^{-1/2}` per (sample, channel), :math:`z = \gamma\hat x + \beta`,
    :math:`y = \max(z, \tau)`; backward :math:`\mathrm{d}x = r(h - \hat x\,m)`,
    :math:`h = \gamma\,s\,\mathrm{d}y`, :math:`m = \langle h\hat x\rangle_S`, :math:`s`
    the TLU's share (``docs/notes/tolerances.rst``).

    Beyond the terms of :class:`_Standardization` (without a mean: no conditioning term) it has
    one of zeroth order: **the kink**. Where :math:`|z - \tau|` is within the error bound of
    :math:`z`, a correct kernel may land on either side, and that element's whole share of
    :math:`\mathrm{d}y` may go to :math:`\tau` instead of to :math:`z`; its effect on every
    gradient is added to their bounds (and nowhere else)."""

    def __init__(self, spec, case, ref):
        arr = dict(zip(spec.diff_argnames, case.arrays))
        cache = ref.cache
        self.x = np.asarray(case.arrays[0], np.float64)
        self.r = np.asarray(cache.r, np.float64)
        self.xhat = self.x * self.r
        self.share = None if cache.share is None else np.asarray(cache.share, np.float64)
        nd = self.x.ndim
        view = (1, -1) + (1,) * (nd - 2)

        def param(name, default):
            p = arr.get(name)
            return np.full((1,) * nd, default) if p is None else \
                np.asarray(p, np.float64).reshape(view)

        self.gamma, self.beta = param("weight", 1.0), param("bias", 0.0)
        self.tau = None if arr.get("tau") is None else param("tau", 0.0)
        self.dy = np.asarray(case.dy, np.float64)
        self.axes = tuple(range(2, nd))
        self.count = max(1, int(np.prod(self.x.shape[2:], dtype=np.int64)))
        self.outputs = ref.outputs
        fmt = get_format(case.dtype)
        self.u_mid = max(fmt.u, fmt.accumulator.u)

    @staticmethod
    def applies(spec, case, ref):
        return spec.name == "frn" and hasattr(ref.cache, "share") \
            and np.shape(ref.cache.xhat) == np.shape(case.arrays[0])

    #: the roundings of xhat a kernel may make in its own dtype (x^2, their mean, r, x r):
    #: xhat is off by up to MID u_I |xhat| from them
    MID = 4.0

    def _ambiguous(self, uA, dxh):
        """Where a kernel may land on the other side of the kink (z within its error of tau)."""
        if self.tau is None:
            return np.zeros(self.x.shape)
        z = self.gamma * self.xhat + self.beta
        ag_, ab = np.abs(self.gamma), np.abs(self.beta)
        axh = np.abs(self.xhat)
        band = SAFETY * (ag_ * dxh + uA * (ag_ * axh + ab)
                         + self.u_mid * (ag_ * (self.MID + 1) * axh + ab + np.abs(self.tau)))
        with np.errstate(invalid="ignore"):
            return (np.abs(z - self.tau) <= band).astype(np.float64)

    def terms(self, uA):
        axes, r, xh = self.axes, self.r, self.xhat
        gS = float(growth(self.count))
        axh = np.abs(xh)
        e_r = 0.5 * gS * uA + 2 * uA                          # relative error of r
        dxh = axh * (e_r + uA)                                # error of xhat
        ag_ = np.abs(self.gamma)
        xmid = self.MID * axh                                 # xhat's roundings in u_I
        out = {"y": (ag_ * dxh + uA * (ag_ * axh + np.abs(self.beta)),
                     ag_ * (xmid + axh) + np.abs(self.beta))}
        share = np.ones_like(xh) if self.share is None else self.share
        amb = self._ambiguous(uA, dxh)
        dy = self.dy
        gz = share * dy
        h = self.gamma * gz
        ah = np.abs(h)
        dh = ag_ * np.abs(dy) * amb                          # a share that may flip
        cnt = self.count

        def mean(a):
            return np.sum(a, axis=axes, keepdims=True) / cnt if axes else a

        m = np.abs(mean(h * xh))
        if "dx" in self.outputs:
            dx = np.abs(_finite(self.outputs["dx"]))
            dm = gS * uA * mean(ah * axh) + mean(ah * dxh)
            a = dx * e_r + r * (dxh * m + axh * dm + 2 * uA * (ah + axh * m)) \
                + r * (dh + axh * mean(dh * axh))
            i = r * (ah + axh * mean(ah * axh) + (xmid + axh) * m + axh * mean(ah * xmid)) \
                + 3 * dx                                      # r rounded in u_I
            out["dx"] = (a, i)
        chan = (0,) + axes
        gM = float(growth(max(1, self.x.size // max(self.x.shape[1], 1))))

        def csum(a):
            return np.sum(a, axis=chan)

        agz, ady = np.abs(gz), np.abs(dy)
        if "dweight" in self.outputs:
            out["dweight"] = (csum(agz * dxh) + uA * csum(agz * axh) + csum(ady * amb * axh),
                              (gM + 1) * csum(agz * axh) + csum(agz * xmid))
        if "dbias" in self.outputs:
            out["dbias"] = (uA * csum(agz) + csum(ady * amb), (gM + 1) * csum(agz))
        if "dtau" in self.outputs:
            rest = np.abs((1 - share) * dy)
            out["dtau"] = (uA * csum(rest) + csum(ady * amb), (gM + 1) * csum(rest))
        if "deps_l" in self.outputs:
            t = np.abs(h * self.x) * r ** 3
            a = 0.5 * (np.sum(t) * (3 * e_r + float(growth(self.x.size)) * uA)
                       + np.sum(dh * np.abs(self.x) * r ** 3))
            n = float(growth(self.x.size))
            out["deps_l"] = (np.reshape(a, (1,)), np.reshape(0.5 * (n + 1) * np.sum(t), (1,)))
        return out


class _WeightCompander:
    r"""The itemized model of the weight compander, :math:`w = a\arctan(v/b)` elementwise, and
    its sums :math:`\mathrm{d}a`, :math:`\mathrm{d}b` over every weight (which cancel: their
    bound is relative to the sums of magnitudes, not to the result)."""

    def __init__(self, spec, case, ref):
        self.v = np.asarray(case.arrays[0], np.float64)
        self.a = float(np.asarray(case.arrays[1], np.float64))
        self.b = float(np.asarray(case.arrays[2], np.float64))
        self.G = np.asarray(case.dy, np.float64)
        self.outputs = ref.outputs

    @staticmethod
    def applies(spec, case, ref):
        return spec.name == "weight_compander"

    def terms(self, uA):
        t = self.v / self.b
        at = np.abs(np.arctan(t))
        slope = 1.0 / (1.0 + t * t)
        k = abs(self.a / self.b)
        aG = np.abs(self.G)
        out = {}
        # each value is a few roundings from its inputs: v / b, arctan (whose condition
        # |t| / ((1 + t^2) arctan t) is at most 1), the products; as many in u_I
        y, dv = np.abs(self.a) * at, k * aG * slope
        out["y"] = (4 * uA * y, 3 * y)
        out["dv"] = (5 * uA * dv, 4 * dv)
        gM = float(growth(max(1, self.v.size)))
        for key, terms in (("da", aG * at), ("db", k * aG * np.abs(t) * slope)):
            if key in self.outputs:
                total = float(np.sum(terms))
                out[key] = (np.reshape((gM + 4) * uA * total, self.outputs[key].shape),
                            np.reshape((gM + 3) * total, self.outputs[key].shape))
        return out


#: Variants without an itemized model whose normwise bound also gets the numerical
#: conditioning term of :func:`_conditioning` (variants that centre their input, whose
#: outputs the normwise form would bound without the conditioning of the mean).
CONDITIONED = ("evo_norm_b0", "evo_norm_s0", "batch_channel_norm")


def _conditioning(spec, case, ref, u_acc, trials=4, seed=0):
    r"""How far the float64 reference moves when every floating input of the case (and
    ``dy``) is perturbed by a relative :math:`u_A\xi`, :math:`\xi` uniform in [-1, 1]:
    :math:`c_k = \max_t |f_k(a(1 + u_A\xi_t)) - f_k(a)|`, per element of each output.

    A backward-stable kernel in the accumulation format returns the exact result for inputs
    perturbed by :math:`O(g(N)\,u_A)` relative, so its error is bounded to first order by
    :math:`g(N)` times this (the error of the statistics, amplified by the conditioning of the
    problem: :math:`\langle|x|\rangle/\sigma` for a group with a large mean, which the normwise
    form does not know). ``u_acc`` is the unit of the intermediates (the candidate dtype's
    where it is coarser than the accumulator). Near a non-differentiable point a perturbation
    that crosses it counts the whole jump, as a kernel may cross it too; for EvoNorm-B0's
    :math:`\max(L, R)` the elements within rounding distance of the tie are also taken to the
    other side explicitly. Deterministic (``seed``)."""
    from refnorm.oracle.reference import compute

    rng = np.random.default_rng(seed)
    out = {k: np.zeros(np.shape(v)) for k, v in ref.outputs.items()}

    def jitter(a):
        if isinstance(a, np.ndarray) and a.dtype.kind == "f":
            return a * (1 + u_acc * rng.uniform(-1, 1, a.shape))
        return a

    cache = ref.cache
    if spec.name == "evo_norm_b0" and getattr(cache, "share", None) is not None:
        # B0's max(L, R): where R - L is within a few roundings of R's terms, a kernel may
        # take the other side; the gradients of that choice count whole (y is continuous)
        x = np.asarray(cache.x, np.float64)
        vx, S, L = cache.v * x, np.asarray(cache.S, np.float64), np.asarray(cache.L, np.float64)
        near = np.abs(vx + (S - L)) <= 8 * u_acc * (np.abs(vx) + S + L)
        if near.any():
            flipped = cache._replace(share=np.where(near, 1.0 - cache.share, cache.share))
            try:
                with np.errstate(all="ignore"):
                    other = spec.backward(case.dy, flipped)
            except Exception:  # noqa: BLE001
                other = ()
            for name, g in zip(spec.diff_argnames, other):
                k = "d" + name
                if g is not None and k in out and np.shape(g) == out[k].shape:
                    out[k] = np.maximum(out[k], np.abs(_finite(g) - _finite(ref.outputs[k])))
    def jitter_cache(c):
        if not hasattr(c, "_replace"):
            return c
        fields = {}
        for name, value in c._asdict().items():
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                fields[name] = jitter(value)
            elif hasattr(value, "_replace"):  # a stage's cache (BCN: BN's and GN's)
                fields[name] = jitter_cache(value)
        return c._replace(**fields)

    for _ in range(trials):
        # the backward of a forward that is right to one rounding of each intermediate (what a
        # kernel that keeps its forward's results can reach: BCN's GN stage sees BN's output
        # rounded, with its offset, as any kernel does)
        if cache is not None and hasattr(cache, "_replace"):
            try:
                with np.errstate(all="ignore"):
                    grads = spec.backward(jitter(np.asarray(case.dy, np.float64)),
                                          jitter_cache(cache))
            except Exception:  # noqa: BLE001 - a cache the backward cannot take adds nothing
                grads = ()
            for name, g in zip(spec.diff_argnames, grads):
                k = "d" + name
                if g is not None and k in out and np.shape(g) == out[k].shape:
                    out[k] = np.maximum(out[k], np.abs(_finite(g) - _finite(ref.outputs[k])))
        moved = replace(case, arrays=tuple(None if a is None else jitter(a) for a in case.arrays),
                        kwargs={k: jitter(v) for k, v in case.kwargs.items()},
                        dy=jitter(case.dy))
        try:
            res = compute(spec, moved)
        except Exception:  # noqa: BLE001 - a perturbed case the variant rejects adds nothing
            continue
        for k, v in res.outputs.items():
            if k in out and np.shape(v) == out[k].shape:
                d = np.abs(_finite(v) - _finite(ref.outputs[k]))
                out[k] = np.maximum(out[k], d)
    return out


def _normwise(ref, n, u: Units, F):
    scale = np.max(np.abs(_finite(ref))) if ref.size else 0.0
    return np.full(ref.shape, F * float(growth(n)) * (u.u_acc + u.u_mid) * scale)


def bounds(spec, case, ref, strict=False, *, ftz=False, safety=SAFETY, explain=False,
           memory_efficient=False):
    r"""The per-element absolute error bound of every reference output of ``case``.

    Returns ``{name: array}`` (the shape of each output), and with ``explain=True`` also a
    dict saying which form of the model each output got. ``ftz=True`` admits a candidate that
    flushes subnormal numbers of its accumulator to zero: every operation may then lose up to
    the accumulator's smallest normal number instead of half its smallest subnormal.
    ``memory_efficient=True`` admits a memory-saving backward, one that recomputes
    :math:`\hat x` from the saved output (:func:`_recomputation_terms`; the variants of
    :data:`MEMORY_EFFICIENT`).
    """
    with np.errstate(all="ignore"):   # non-finite cases are expected to make NaN here
        return _bounds(spec, case, ref, strict, ftz, safety, explain, memory_efficient)


#: The variants whose kernels may save y instead of x and recompute xhat = (y - beta) / gamma
#: in the backward (Apex's ``FusedLayerNorm``/``FusedRMSNorm(memory_efficient=True)``)
MEMORY_EFFICIENT = ("layer_norm", "rms_norm", "add_rms_norm", "add_layer_norm")

#: A column whose recomputed xhat may err by this much (xhat's scale is 1) or more, or whose
#: weight is 0, makes the recomputation ill-conditioned: beyond first order, not judged
ILL_CONDITIONED = 0.125


def _trailing_rows(case, ref):
    """``(xhat, r, gamma, beta, y, dy)`` of a norm over the trailing ``normalized_shape`` axes
    (layer_norm, rms_norm), each as (rows, N) float64 arrays (``r`` a column)."""
    arr = dict(zip(case.argnames, case.arrays))
    x = np.asarray(arr["x"], np.float64)
    nd = len(np.atleast_1d(case.kwargs["normalized_shape"]))
    n = max(1, int(np.prod(x.shape[x.ndim - nd:], dtype=np.int64)))
    rows = x.reshape(-1, n)
    r = np.asarray(ref.cache.rstd, np.float64).reshape(-1, 1)
    mu = rows.mean(axis=1, keepdims=True) if case.variant == "layer_norm" and rows.size \
        else 0.0
    with np.errstate(all="ignore"):  # non-finite cases
        xhat = (rows - mu) * r
    w, b = arr.get("weight"), arr.get("bias")
    gamma = np.ones((1, n)) if w is None else np.asarray(w, np.float64).reshape(1, n)
    beta = np.zeros((1, n)) if b is None else np.asarray(b, np.float64).reshape(1, n)
    y = np.asarray(ref.outputs["y"], np.float64).reshape(rows.shape)
    dy = np.asarray(case.dy, np.float64).reshape(rows.shape)
    return xhat, r, gamma, beta, y, dy


def recomputation_conditioning(spec, case, ref):
    r"""Why recomputing xhat from y is ill-conditioned on ``case`` (a weight of 0, or one so
    small against :math:`|y-\beta|` that one rounding of y moves xhat by
    :data:`ILL_CONDITIONED` or more), or None. For a fused residual-add norm, that of its norm
    at s."""
    if spec.name in FUSED_ADD:
        inner, sub, sub_ref = _inner_case(spec, case)
        return recomputation_conditioning(inner, sub, sub_ref)
    if spec.name not in MEMORY_EFFICIENT or "weight" not in case.inputs:
        return None
    xhat, r, gamma, beta, y, dy = _trailing_rows(case, ref)
    u_d = get_format(case.dtype).u
    with np.errstate(all="ignore"):
        shift = np.max(np.abs(_finite(y)) + np.abs(beta), axis=0) if y.size else \
            np.zeros(gamma.shape[1])
        err = u_d * shift / np.abs(gamma[0])
    bad = np.flatnonzero((gamma[0] == 0) | (err >= ILL_CONDITIONED))
    if not bad.size:
        return None
    j = int(bad[np.argmax(np.where(gamma[0, bad] == 0, np.inf, err[bad]))])
    return (f"ill-conditioned for a memory-saving backward: weight[{j}] = {gamma[0, j]:.3g} "
            f"against |y - bias| up to {shift[j]:.3g}, so xhat = (y - bias) / weight "
            f"recomputed from y rounded to {get_format(case.dtype).name} may be off by "
            f"{err[j]:.3g} (xhat is of order 1); {bad.size} such column(s)")


def _recomputation_terms(case, ref, bound_y, u: Units):
    r"""The extra error of a backward that recomputes :math:`\hat x = (y - \beta)/\gamma`
    from the saved output (Apex's ``memory_efficient=True``) instead of from x and the saved
    statistics, to first order (derivation: ``docs/howto/oracle.rst``).

    The saved y errs by its own bound :math:`B_y` (its computation and its rounding to the
    candidate dtype); the subtraction and the division round once each in the accumulator. So
    the recomputed :math:`\hat x` errs by
    :math:`e = (B_y + u_A(|y| + |\beta|))/|\gamma| + u_A|\hat x|`, and through the
    backward (:math:`g = \gamma\,\mathrm{d}y`, per row with :math:`r`):
    :math:`|\delta\,\mathrm{d}x| \le r\,(e\,|\langle g\hat x\rangle| + |\hat x|
    \langle |g|\,e\rangle)` and :math:`|\delta\,\mathrm{d}\gamma| \le
    \sum_{\rm rows}|\mathrm{d}y|\,e`. ``dbias`` and the statistics do not use
    :math:`\hat x`. A weight of 0 makes it unbounded: :func:`recomputation_conditioning`."""
    xhat, r, gamma, beta, y, dy = _trailing_rows(case, ref)
    ag = np.maximum(np.abs(gamma), np.finfo(np.float64).tiny)
    e = (np.asarray(bound_y, np.float64).reshape(y.shape)
         + u.u_acc * (np.abs(_finite(y)) + np.abs(beta))) / ag + u.u_acc * np.abs(xhat)
    g = gamma * dy
    n = xhat.shape[1]
    m_gx = np.abs(np.mean(g * xhat, axis=1, keepdims=True)) if n else np.zeros_like(r)
    m_ge = np.mean(np.abs(g) * e, axis=1, keepdims=True) if n else np.zeros_like(r)
    out = {"dx": r * (e * m_gx + np.abs(xhat) * m_ge)}
    if "weight" in case.inputs:
        out["dweight"] = np.sum(np.abs(dy) * e, axis=0)
    return out


def _inner_case(spec, case):
    """``(inner, sub, sub_ref)`` of a fused residual-add record: the norm's record, its case at
    s = x + residual (computed in float64) with the same upstream ``dy``, and its reference."""
    from refnorm.norms import BY_NAME
    from refnorm.oracle.cases import Case
    from refnorm.oracle.reference import compute

    inner = BY_NAME[FUSED_ADD[spec.name]]
    arr = dict(zip(spec.diff_argnames, case.arrays))
    s = np.asarray(arr["x"], np.float64) + np.asarray(arr["residual"], np.float64)
    arrays = (s,) + tuple(arr.get(n) for n in inner.diff_argnames[1:])
    kwargs = {k: v for k, v in case.kwargs.items() if k != "residual_in_fp32"}
    sub = Case(inner.name, case.name, case.dtype, arrays, kwargs, case.dy, case.seed, case.tags,
               tuple(inner.diff_argnames))
    return inner, sub, compute(inner, sub)


def _fused_add_bounds(spec, case, ref, strict, ftz, safety, explain, memory_efficient):
    r"""The bounds of a fused residual add and norm (``add_rms_norm``, ``add_layer_norm``):
    ``(y, s)`` with ``s = x + residual`` and ``y = norm(s)``.

    * ``s`` is one addition, rounded once to its storage format (unit :math:`u_s`: float32's
      with ``residual_in_fp32``, else the candidate dtype's) after at most one rounding in the
      accumulator: :math:`(u_s + u_A)\,|s|`. Rounding ``s`` to bfloat16 where float32 is due
      errs by up to :math:`2^{-9}|s|`, 16384 times the float32 bound.
    * ``y``, ``dweight``, ``dbias``, ``rstd``: the norm's own bounds at the input :math:`s`
      (the record's model, as for ``rms_norm``/``layer_norm`` on that input), plus the first-
      order effect of normalizing :math:`s` rounded to :math:`u_s` (vLLM's kernel reads the
      stored ``s`` back): with :math:`|\delta s_i|\le u_s|s_i|`, per row,
      :math:`|\delta\hat x_i| \le e_i = u_s r(|s_i| + \langle|s|\rangle + |\hat x_i|
      \langle|\hat x||s|\rangle)` and :math:`|\delta r|/r \le \rho = u_s r\langle|\hat x||s|
      \rangle`, so :math:`|\delta y_i| \le |\gamma_i| e_i`, :math:`|\delta\,\mathrm{d}x_i|
      \le \rho|\mathrm{d}x_i| + r(e_i|\langle g\hat x\rangle| + |\hat x_i|\langle|g|e\rangle)`
      and :math:`|\delta\,\mathrm{d}\gamma| \le \sum_{\rm rows}|\mathrm{d}y|\,e`, each times
      the safety factor (derivation: ``docs/derivations/fused_add_norm.rst``).
    * ``dx`` and ``dresidual`` (equal): the norm's ``dx`` bound, the term above, and the add of
      ``ds`` in the accumulator and its rounding to the dtype: :math:`(u_D + u_A)(|\mathrm{d}s|
      + |\mathrm{d}x_{\rm norm}|)`.
    * Both conventions of the libraries are admitted: normalizing the exact sum (FlashAttention's
      Triton kernel keeps it in float32 registers) and normalizing ``s`` as stored (its
      ``layer_norm_ref``: ``(x + residual).to(x.dtype)``). Where rounding ``s`` moves a row's
      statistics by more than first order (a row of mean 1e3 and standard deviation 1 in
      bfloat16, whose spacing there is 4), the two differ at O(1); the bound of every output
      but ``s`` then also holds the distance between the float64 references at the exact and
      at the stored ``s``.
    """
    from refnorm.oracle.reference import compute

    inner, sub, sub_ref = _inner_case(spec, case)
    fmt = get_format(case.dtype)
    u = units(case.dtype, strict)
    arr = dict(zip(spec.diff_argnames, case.arrays))
    s, arrays = sub.arrays[0], sub.arrays
    out, how = _bounds(inner, sub, sub_ref, strict, ftz, safety, True, memory_efficient)
    s_fmt = residual_format(case)
    u_s = s_fmt.u
    if s_fmt.name != "float64":  # the other convention: the norm of s as stored
        stored = compute(inner, replace(sub, arrays=(round_to(s, s_fmt),) + arrays[1:]))
        for key, v in stored.outputs.items():
            if key in out and np.shape(v) == out[key].shape:
                out[key] = out[key] + np.abs(_finite(v) - _finite(sub_ref.outputs[key]))
    # the first-order effect of normalizing s rounded to u_s, per row of N elements
    nd = len(np.atleast_1d(case.kwargs["normalized_shape"]))
    n = int(np.prod(s.shape[s.ndim - nd:], dtype=np.int64)) if s.size else 0
    rows = s.reshape(-1, max(n, 1))
    r = np.asarray(sub_ref.cache.rstd, np.float64).reshape(-1, 1)
    centred = inner.name == "layer_norm"
    mu = rows.mean(axis=1, keepdims=True) if centred and n else 0.0
    xhat = (rows - mu) * r
    a_s = np.abs(rows)
    m_xs = np.mean(np.abs(xhat) * a_s, axis=1, keepdims=True) if n else np.zeros_like(r)
    e = u_s * r * (a_s + (np.mean(a_s, axis=1, keepdims=True) if centred and n else 0.0)
                   + np.abs(xhat) * m_xs)
    rho = u_s * r * m_xs
    w = arr.get("weight")
    gamma = np.ones((1, max(n, 1))) if w is None else np.abs(np.asarray(w, np.float64)) \
        .reshape(1, -1)
    dy = np.asarray(case.dy, np.float64).reshape(rows.shape)
    g = gamma * dy
    shape = s.shape
    extra = {"y": gamma * e}
    if "dx" in ref.outputs:
        dxn = _finite(sub_ref.outputs["dx"]).reshape(rows.shape)
        m_gx = np.abs(np.mean(g * xhat, axis=1, keepdims=True)) if n else np.zeros_like(r)
        m_ge = np.mean(np.abs(g) * e, axis=1, keepdims=True) if n else np.zeros_like(r)
        ds = np.abs(np.asarray(case.douts["s"], np.float64)).reshape(rows.shape)
        cond = rho * np.abs(dxn) + r * (e * m_gx + np.abs(xhat) * m_ge)
        dx_b = out["dx"].reshape(rows.shape) + safety * cond \
            + (u.u_out + u.u_acc) * (ds + np.abs(dxn))
        for key in ("dx", "dresidual"):
            if key in ref.outputs:
                out[key] = dx_b.reshape(shape)
                how[key] = how["dx"] + " + residual add"
    if "dweight" in out:
        out["dweight"] = out["dweight"] + safety * np.sum(np.abs(dy) * e, axis=0).reshape(
            out["dweight"].shape)
    if "rstd" in out:
        out["rstd"] = out["rstd"] + safety * (r * rho).reshape(out["rstd"].shape)
    out["y"] = out["y"] + safety * extra["y"].reshape(shape)
    how["y"] += f" + s rounded to u_s={u_s:.3g}"
    abs_s = np.abs(_finite(ref.outputs["s"]))
    out["s"] = (u_s + u.u_acc + 2 * _U64) * abs_s + fmt.smallest_subnormal \
        + (fmt.accumulator.tiny if ftz else fmt.accumulator.smallest_subnormal)
    how["s"] = f"one addition, rounded to u_s={u_s:.3g}"
    out = {k: np.asarray(v, np.float64) for k, v in out.items() if k in ref.outputs}
    return (out, how) if explain else out


def _bounds(spec, case, ref, strict, ftz, safety, explain, memory_efficient=False):
    if spec.name in FUSED_ADD:
        return _fused_add_bounds(spec, case, ref, strict, ftz, safety, explain,
                                 memory_efficient)
    u = units(case.dtype, strict)
    fmt = get_format(case.dtype)
    groups = groups_of(spec, case.sample, ref.cache)
    if _Standardization.applies(spec, case, ref, groups):
        model = _Standardization(spec, case, ref, groups)
    elif _WeightNorm.applies(spec, case, ref):
        model = _WeightNorm(spec, case, ref)
    elif _WeightStandardization.applies(spec, case, ref):
        model = _WeightStandardization(spec, case, ref)
    elif _FilterResponse.applies(spec, case, ref):
        model = _FilterResponse(spec, case, ref)
    elif _WeightCompander.applies(spec, case, ref):
        model = _WeightCompander(spec, case, ref)
    elif case.variant in COMPOSED:
        model = _Composed.build(spec, case, ref)
    elif _L2Norm.applies(spec, case, ref):
        model = _L2Norm(spec, case, ref)
    elif _DyT.applies(spec, case, ref):
        model = _DyT(spec, case, ref)
    elif _PowerSoftmax.applies(spec, case, ref):
        model = _PowerSoftmax(spec, case, ref)
    elif _SigmaReparam.applies(spec, case, ref):
        model = _SigmaReparam(spec, case, ref)
    else:
        model = None
    n = reduction_length(spec, case, groups)
    # below the normal range rounding errors are absolute: half a subnormal spacing per
    # operation, in the output format and in the accumulator
    acc = fmt.accumulator
    floor = (acc.tiny if ftz else fmt.smallest_subnormal) + safety * float(growth(n)) * (
        acc.tiny if ftz else acc.smallest_subnormal)
    t = model.terms(u.u_acc) if model else {}
    # a claimed casting mode: its own roundings in the candidate dtype (units of u_D), see
    # _Standardization.mode_terms; float64 candidates have no other dtype to round to
    mode_keys = ()
    if isinstance(model, _Standardization) and model.casting_mode is not None \
            and fmt.name != "float64":
        moded = model.mode_terms(model.casting_mode, u.u_acc, t, u.u_out)
        t = {**t, **moded}
        mode_keys = tuple(moded)
    if isinstance(model, _Standardization) and fmt.name != "float64":
        # subnormal centred values held in the candidate dtype (absolute rounding)
        sub = _subnormal_centring(model, 0.5 * fmt.smallest_subnormal, fmt.tiny)
        t = {k: (a + sub[k], i) if k in sub and np.shape(sub[k]) == np.shape(a)
             else (a, i) for k, (a, i) in t.items()}
    # the reference's own error: the same model at u = 2^-53 (linear in u but for e_mu^2,
    # negligible below float64; so computed again only for float64 candidates)
    t64 = (model.terms(_U64) if u.u_acc == _U64 else
           {k: (a * (_U64 / u.u_acc), i) for k, (a, i) in t.items()}) if model else {}
    cond = _conditioning(spec, case, ref, u.u_mid) if model is None \
        and spec.name in CONDITIONED else {}
    out, how = {}, {}
    for key, r in ref.outputs.items():
        ar = np.abs(_finite(r))
        if key in t and np.shape(t[key][0]) == r.shape:
            a, i = t[key]
            a64, _ = t64[key]
            u_i = u.u_out if key in mode_keys else u.u_mid
            b = u.u_out * ar + safety * (a + u_i * i) \
                + _U64 * ar + safety * (a64 + _U64 * i)          # + the reference's own error
            how[key] = "itemized"
        else:
            b = u.u_out * ar + _normwise(r, n, u, safety) \
                + _U64 * ar + _normwise(r, n, Units(_U64, _U64, _U64), safety)
            how[key] = f"normwise (N={n})"
            if key in cond:
                b = b + safety * float(growth(n)) * cond[key]
                how[key] += " + conditioning"
        out[key] = np.asarray(b + floor, np.float64)
    if memory_efficient and spec.name in MEMORY_EFFICIENT and "y" in out:
        for key, extra in _recomputation_terms(case, ref, out["y"], u).items():
            if key in out:
                out[key] = out[key] + safety * extra.reshape(out[key].shape)
                how[key] += " + xhat recomputed from y"
    return (out, how) if explain else out
