r"""
Floating point in normalization
===============================

Every normalization layer computes a mean and a variance, and the textbook formula for the
variance, :math:`E[x^2] - E[x]^2`, is one of the classic traps of floating point. This tutorial
measures, in float32:

1. why :math:`E[x^2]-E[x]^2` fails (it even returns negative variances);
2. the two-pass formula :math:`E[(x-\mu)^2]`, and what is still lost in it;
3. the **corrected** two-pass statistics that refnorm uses;

with every error counted in **ULPs** (units in the last place of float32) against the exact
result, computed in exact rational arithmetic (:mod:`fractions`) and, for the square root, in
high precision with ``mpmath`` when it is installed (else Python's :mod:`decimal`).
"""
import math
from fractions import Fraction

import matplotlib.pyplot as plt
import numpy as np

from refnorm.norms.layer_norm import layer_norm_forward

try:
    import mpmath
except ImportError:  # mpmath is in the test extras; without it, decimal does the same job
    mpmath = None
    print("mpmath is not installed: the exact square roots use the decimal module instead")

# %%
# A row with a large mean
# -----------------------
#
# Eight values around :math:`10^4` with standard deviation about 1, stored in float32. float32
# has 24 significant bits, so near :math:`10^4` its spacing (one ULP) is
# :math:`2^{-10} \approx 0.001`, and near :math:`10^8`, where :math:`x^2` lives, it is 8. The
# variance, about 1, is what is left after subtracting two numbers near :math:`10^8` that are
# each rounded by up to 4:

x = (10_000 + np.random.default_rng(1).standard_normal(8)).astype(np.float32)
mean = x.mean()
one_pass = (x * x).mean() - mean * mean
two_pass = ((x - mean) ** 2).mean()
exact = np.var(x.astype(np.float64))  # float64 is plenty for eight float32 values
print(f"E[x^2] - E[x]^2 = {one_pass: .6f}\nE[(x - mu)^2]   = {two_pass: .6f}\n"
      f"exact           = {exact: .6f}")

# %%
# Exact arithmetic
# ----------------
#
# To count errors honestly the reference must be exact, not merely "more precise". A float32
# is a rational number, so the mean and the variance of a row of them are rationals that
# :class:`fractions.Fraction` computes exactly. :math:`r = (\sigma^2+\epsilon)^{-1/2}` is
# irrational; it is evaluated with 40 significant digits, far below one float32 ULP.

EPS = np.float32(1e-5)  # the float32 value of LayerNorm's default eps


def exact_xhat_and_rstd(row):
    """(xhat, rstd) of a float32 row, computed exactly, then rounded to float64."""
    q = [Fraction(float(v)) for v in row]
    mu = sum(q) / len(q)
    var = sum((v - mu) ** 2 for v in q) / len(q)
    s = var + Fraction(float(EPS))
    if mpmath is not None:
        with mpmath.workdps(40):
            r = 1 / mpmath.sqrt(mpmath.mpf(s.numerator) / s.denominator)
            xhat = [float(mpmath.mpf((v - mu).numerator) / (v - mu).denominator * r) for v in q]
            return np.array(xhat), float(r)
    import decimal
    with decimal.localcontext() as ctx:
        ctx.prec = 40
        r = 1 / (decimal.Decimal(s.numerator) / decimal.Decimal(s.denominator)).sqrt()
        xhat = [float(decimal.Decimal((v - mu).numerator) / (v - mu).denominator * r) for v in q]
        return np.array(xhat), float(r)


def ulps(computed, exact, scale=0.0):
    """|computed - exact| in float32 ULPs at the magnitude max(|exact|, scale)."""
    exact = np.asarray(exact, np.float64)
    magnitude = np.maximum(np.abs(exact), scale).astype(np.float32)
    return np.abs(np.asarray(computed, np.float64) - exact) / np.spacing(magnitude)


# %%
# Three ways to normalize a row, written plainly in float32
# ---------------------------------------------------------
#
# * **one pass**: :math:`\sigma^2 = \langle x^2\rangle - \langle x\rangle^2`;
# * **two pass**: :math:`\mu = \langle x\rangle`, then :math:`\sigma^2 = \langle (x-\mu)^2\rangle`;
# * **corrected two pass**: :math:`m_0 = \langle x\rangle` rounded, :math:`d = x - m_0`,
#   :math:`c = \langle d\rangle`, :math:`\sigma^2 = \langle (d - c)^2\rangle` and
#   :math:`\hat x = (d - c)\,r`.
#
# Why the correction works: :math:`m_0` is off the true mean by its rounding, up to half an ULP
# of the mean (0.0005 at :math:`10^4`), and the two-pass :math:`x - m_0` carries that offset into
# every :math:`\hat x`. But :math:`d = x - m_0` is **exact** when :math:`x` and :math:`m_0` are
# within a factor of two of each other (Sterbenz's lemma), so :math:`\langle d\rangle` measures
# the offset, and subtracting it leaves :math:`x - \mu` right to about an ULP of its own size.


def one_pass(x):
    mu = x.mean()
    var = (x * x).mean() - mu * mu
    with np.errstate(invalid="ignore"):
        rstd = 1 / np.sqrt(var + EPS)  # NaN when var + eps < 0
    return (x - mu) * rstd, rstd


def two_pass(x):
    mu = x.mean()
    rstd = 1 / np.sqrt(((x - mu) ** 2).mean() + EPS)
    return (x - mu) * rstd, rstd


def corrected(x):
    d = x - x.mean()
    c = d.mean()
    rstd = 1 / np.sqrt(((d - c) ** 2).mean() + EPS)
    return (d - c) * rstd, rstd


def refnorm_ln(x):
    y, cache = layer_norm_forward(x[None, :], x.size, eps=float(EPS))
    return y[0], cache.rstd.ravel()[0]


methods = {"one pass": one_pass, "two pass": two_pass, "corrected two pass": corrected,
           "refnorm layer_norm": refnorm_ln}

# %%
# The sweep: rows of 256 standard normals plus a mean from :math:`1` to :math:`10^6`, four rows
# per mean; the worst error over the rows, for :math:`r` and for every :math:`\hat x`. An
# element of :math:`\hat x` near zero comes from :math:`x - \mu`, whose rounding is a fraction
# of an ULP of :math:`x`, not of the small difference: as the oracle does, its error is counted
# in ULPs at the scale of its row, :math:`\max(|\hat x_i|, \text{RMS of the row})`
# (the RMS of :math:`\hat x` is about 1).

rng = np.random.default_rng(0)
means = 10.0 ** np.arange(0, 6.25, 0.5)
worst = {(m, out): [] for m in methods for out in ("rstd", "xhat")}
nan_rows = {m: 0 for m in methods}
for offset in means:
    rows = (rng.standard_normal((4, 256)) + offset).astype(np.float32)
    exact = [exact_xhat_and_rstd(row) for row in rows]
    for name, method in methods.items():
        e_r, e_x = 0.0, 0.0
        for row, (xhat_exact, r_exact) in zip(rows, exact):
            xhat, r = method(row)
            if not np.isfinite(r):
                nan_rows[name] += 1
                e_r = e_x = np.inf
                continue
            e_r = max(e_r, float(ulps(r, r_exact)))
            rms = np.sqrt(np.mean(xhat_exact ** 2))
            e_x = max(e_x, float(np.max(ulps(xhat, xhat_exact, rms))))
        worst[name, "rstd"].append(e_r)
        worst[name, "xhat"].append(e_x)

print("worst error of xhat, in float32 ULPs")
print(f"{'mean':>8s}" + "".join(f"{m:>21s}" for m in methods))
for i, offset in enumerate(means):
    if i % 2 == 0:
        print(f"{offset:8.0e}" + "".join(f"{worst[m, 'xhat'][i]:21.3g}" for m in methods))
print("rows with a NaN (negative variance):", nan_rows)

# %%
# The one-pass formula is off by hundreds of ULPs already at a mean of 10, and returns
# negative variances (NaN) from about :math:`10^4` on. The two-pass formula stays finite but
# loses about one digit per decade of mean-to-spread ratio, because of the rounded mean. The
# corrected two-pass formula, and refnorm's LayerNorm, stay within a few ULPs at every mean
# (half an ULP is the best possible, since the result is rounded once; the rest comes from the
# rounding of the sums and of :math:`r`).

fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8), sharey=True)
markers = {"one pass": "o-", "two pass": "s-", "corrected two pass": "^-",
           "refnorm layer_norm": "x--"}
for ax, out in zip(axes, ("rstd", "xhat")):
    for name in methods:
        vals = np.array(worst[name, out])
        finite = np.isfinite(vals)
        ax.loglog(means[finite], np.maximum(vals[finite], 1e-2), markers[name], label=name)
        if (~finite).any():
            ax.plot(means[~finite], np.full((~finite).sum(), 3e6), "rv", ms=6)
    ax.axhline(1, color="k", lw=0.8, ls=":")
    ax.set_xlabel("row mean (standard deviation 1)")
    ax.set_title(f"worst error of {'r = rstd' if out == 'rstd' else 'xhat'}")
axes[0].set_ylabel("float32 ULPs (exact reference)")
axes[0].text(1.5, 3e6, "red: NaN", color="r", fontsize=8, va="center")
axes[1].legend(fontsize=8)
fig.tight_layout()

# %%
# Where the remaining error comes from
# ------------------------------------
#
# Summation: adding :math:`n` numbers one after the other has an error bound growing like
# :math:`n\,u` (and a typical error like :math:`\sqrt n\,u`); NumPy's pairwise summation like
# :math:`\log_2 n\,u`. The sums of a normalization are over rows of thousands of elements, so
# the order matters. Measured on float32 rows of uniform numbers in :math:`[0, 1)`, against
# :func:`math.fsum` (the sum correctly rounded to float64: exact to about :math:`10^{-16}`);
# ``np.cumsum`` adds one element after the other:

lengths = [2**k for k in range(8, 23, 2)]
sequential, pairwise = [], []
for n in lengths:
    v = rng.random(n).astype(np.float32)
    exact_sum = math.fsum(v.astype(np.float64))
    sequential.append(float(ulps(np.cumsum(v)[-1], exact_sum)))
    pairwise.append(float(ulps(v.sum(), exact_sum)))
for n, s, p in zip(lengths, sequential, pairwise):
    print(f"n = {n:7d}: sequential sum {s:8.1f} ULPs, NumPy's pairwise sum {p:5.2f} ULPs")

# %%
# refnorm computes its sums as BLAS products (faster, not pairwise); its notes measure the
# resulting error of the variance on rows of 4096 at about 1.5 ULP
# (:mod:`refnorm.norms._stats`, :doc:`/notes/performance`). The oracle's tolerance model
# (:doc:`/notes/tolerances`) turns such bounds into the per-element tolerance that the next
# tutorial uses to judge another library's kernel.

fig, ax = plt.subplots(figsize=(5.6, 3.4))
ax.loglog(lengths, sequential, "o-", label="sequential float32 sum")
ax.loglog(lengths, pairwise, "s-", label="NumPy pairwise sum")
ax.set_xlabel("n")
ax.set_ylabel("error, float32 ULPs")
ax.legend(fontsize=8)
ax.set_title("Summation error against the exact sum")
fig.tight_layout()
plt.show()
