r"""
The BatchNorm backward by hand
==============================

BatchNorm (Ioffe & Szegedy, 2015) normalizes each channel over the batch. Its backward is the
classic exercise: the mean and the variance depend on every input, so every :math:`x_i`
reaches every :math:`y_j`. This tutorial

1. derives the backward and writes it as a student would, in plain NumPy;
2. checks it by finite differences, and shows why an **all-ones** upstream gradient hides a
   wrong backward;
3. compares it with refnorm's :func:`~refnorm.norms.batch_norm.batch_norm_backward`, and
   measures why refnorm's differs: a mean-correction term for accuracy, BLAS sums for speed.

The full derivation, step by step, is :doc:`/derivations/batch_norm`.
"""
import time

import matplotlib.pyplot as plt
import numpy as np

from refnorm.gradcheck import check_vjp
from refnorm.norms.batch_norm import batch_norm_backward, batch_norm_forward

# %%
# The forward
# -----------
#
# For an input of shape :math:`(N, C)` (or :math:`(N, C, H, W)`: every axis but the channel
# axis 1 is reduced), with :math:`m` values per channel,
#
# .. math::
#    \mu = \frac1m\sum_i x_i,\quad \sigma^2 = \frac1m\sum_i (x_i-\mu)^2,\quad
#    r = (\sigma^2+\epsilon)^{-1/2},
#
#    \hat x_i = (x_i-\mu)\,r,\quad y_i = \gamma\hat x_i + \beta .


def bn_forward(x, gamma, beta, eps=1e-5):
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    r = 1 / np.sqrt(var + eps)
    xhat = (x - mu) * r
    return gamma.reshape(shape) * xhat + beta.reshape(shape), (xhat, r, gamma, axes, shape)


# %%
# The backward, as a student writes it
# ------------------------------------
#
# Walk the forward backwards, one intermediate at a time. With :math:`\bar v` the gradient of
# the loss with respect to :math:`v`:
#
# .. math::
#    \bar{\hat x}_i = \gamma\,\bar y_i,\qquad
#    \bar r = \sum_i \bar{\hat x}_i (x_i-\mu),\qquad
#    \bar{\sigma^2} = -\tfrac12 r^3\,\bar r,
#
#    \bar\mu = -r\sum_i \bar{\hat x}_i - \bar{\sigma^2}\,\tfrac2m\sum_i (x_i-\mu)
#    \quad (\text{the last sum is } 0),
#
# .. math::
#    \bar x_i = r\,\bar{\hat x}_i + \bar{\sigma^2}\,\tfrac2m (x_i-\mu) + \tfrac1m\bar\mu ,
#
# which simplifies to one line,
#
# .. math::
#    \bar x_i = \gamma\,r\,\Bigl(\bar y_i - \langle\bar y\rangle - \hat x_i\,
#    \langle\bar y\,\hat x\rangle\Bigr), \qquad
#    \bar\gamma = \sum_i \bar y_i\hat x_i,\qquad \bar\beta = \sum_i \bar y_i ,
#
# with :math:`\langle\cdot\rangle` the mean over the channel's :math:`m` values. In NumPy:


def bn_backward(dy, cache):
    xhat, r, gamma, axes, shape = cache
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    m = dy.size // dy.shape[1]
    dx = gamma.reshape(shape) * r * (dy - dbeta.reshape(shape) / m
                                     - xhat * dgamma.reshape(shape) / m)
    return dx, dgamma, dbeta


# %%
# Check it by finite differences with a **random** upstream gradient
# (:func:`refnorm.gradcheck.check_vjp`, slow mode: every element of every input):

rng = np.random.default_rng(3)
x = rng.standard_normal((6, 3)) * 2 + 1
gamma, beta = rng.standard_normal(3), rng.standard_normal(3)


def f(x, gamma, beta):
    return bn_forward(x, gamma, beta)[0]


def vjp(cts, x, gamma, beta):
    return bn_backward(cts[0], bn_forward(x, gamma, beta)[1])


print(check_vjp(f, vjp, [x, gamma, beta], mode="slow"))

# %%
# Why an all-ones upstream gradient hides a wrong backward
# --------------------------------------------------------
#
# A common shortcut is to check ``(f(x + h) - f(x - h)).sum() / 2h`` against
# ``backward(np.ones_like(y))``: the loss is then :math:`L = \sum_i y_i`. But for BatchNorm
# :math:`\sum_i y_i = m\beta + \gamma\sum_i\hat x_i = m\beta`, because :math:`\hat x` has zero
# mean over the channel. The loss does not depend on :math:`x` at all, so the true
# :math:`\bar x` is **exactly zero**, and any backward that also returns zero on an all-ones
# :math:`\bar y` passes. More generally, :math:`J^T` maps every :math:`\bar y` of the form
# :math:`a + b\,\hat x` (per channel) to zero: a check sees only the part of :math:`\bar y`
# orthogonal to those two directions, and an all-ones :math:`\bar y` has none.
#
# Three classic mistakes:


def forgot_variance_path(dy, cache):  # treats sigma as a constant
    xhat, r, gamma, axes, shape = cache
    dx = gamma.reshape(shape) * r * (dy - dy.mean(axis=axes, keepdims=True))
    return dx, (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


def forgot_mean_and_variance(dy, cache):  # treats mu and sigma as constants
    xhat, r, gamma, axes, shape = cache
    return gamma.reshape(shape) * r * dy, (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


def unbiased_variance_term(dy, cache):  # a 1/(m-1) where the forward has 1/m
    xhat, r, gamma, axes, shape = cache
    m = dy.size // dy.shape[1]
    dx = gamma.reshape(shape) * r * (dy - dy.mean(axis=axes, keepdims=True)
                                     - xhat * (dy * xhat).sum(axis=axes, keepdims=True) / (m - 1))
    return dx, (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


backwards = {"correct": bn_backward, "forgot the\nvariance path": forgot_variance_path,
             "forgot mean\nand variance": forgot_mean_and_variance,
             "1/(m-1) in\none term": unbiased_variance_term}

# %%
# Each backward against central differences of :math:`L = \sum_i \bar y_i\,y_i`, once with
# :math:`\bar y` all ones and once random. The error is the largest
# :math:`|\bar x_{\text{backward}} - \bar x_{\text{numerical}}|`, relative to
# :math:`\max|\gamma\,r\,\bar y|`, the size :math:`\bar x` would have without the
# cancellations (a relative error is meaningless when the true gradient is zero).

h = 1e-6
_, cache = bn_forward(x, gamma, beta)
results = {}
for label, dy in [("all ones", np.ones_like(x)), ("random", rng.standard_normal(x.shape))]:
    numerical = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        numerical[idx] = np.sum(dy * (f(x + e, gamma, beta) - f(x - e, gamma, beta))) / (2 * h)
    for name, backward in backwards.items():
        dx = backward(dy, cache)[0]
        scale = np.max(np.abs(gamma * cache[1] * dy))
        results[name, label] = np.max(np.abs(dx - numerical)) / scale
    print(f"dy {label}: max |numerical dx| = {np.max(np.abs(numerical)):.1e}")

for name in backwards:
    ones, rand = results[name, "all ones"], results[name, "random"]
    verdict = lambda e: "pass" if e < 1e-6 else "FAIL"  # noqa: E731
    print(f"{name.replace(chr(10), ' '):26s} all ones: {ones:8.1e} {verdict(ones)}   "
          f"random: {rand:8.1e} "
          f"{verdict(rand)}")

fig, ax = plt.subplots(figsize=(7.0, 3.6))
names = list(backwards)
pos = np.arange(len(names))
floor = 1e-13  # an error below it is drawn at the floor of the axis
for k, (label, color) in enumerate([("all ones", "tab:gray"), ("random", "tab:blue")]):
    ax.bar(pos + (k - 0.5) * 0.38, [max(results[n, label], floor) for n in names], 0.38,
           label=f"upstream gradient: {label}", color=color)
ax.axhline(1e-6, color="k", ls=":", lw=1)
ax.text(len(names) - 0.5, 2e-6, "pass below", ha="right", fontsize=8)
ax.set_yscale("log")
ax.set_ylim(floor / 2, 10)
ax.set_xticks(pos, names, fontsize=8)
ax.set_ylabel("relative error of dx")
ax.legend(fontsize=8, loc="upper left")
ax.set_title("An all-ones upstream gradient passes two wrong backwards")
fig.tight_layout()

# %%
# Refnorm's backward: the same numbers
# ------------------------------------
#
# refnorm's :func:`~refnorm.norms.batch_norm.batch_norm_forward` and
# :func:`~refnorm.norms.batch_norm.batch_norm_backward` follow ``torch.nn.functional.batch_norm``
# (running statistics are explicit arguments and results; see the API). On a 4-D input in
# float64 they agree with the ten-line version to rounding:

x4 = rng.standard_normal((8, 4, 5, 5)) * 3 + 2
g4, b4 = rng.standard_normal(4), rng.standard_normal(4)
dy4 = rng.standard_normal(x4.shape)
y_plain, cache_plain = bn_forward(x4, g4, b4)
grads_plain = bn_backward(dy4, cache_plain)
y_ref, _, cache_ref = batch_norm_forward(x4, None, None, g4, b4, training=True)
grads_ref = batch_norm_backward(dy4, cache_ref)
print(f"y: max difference {np.max(np.abs(y_plain - y_ref)):.1e}")
for name, a, b in zip(["dx", "dweight", "dbias"], grads_plain, grads_ref):
    print(f"{name}: max difference {np.max(np.abs(a - b)):.1e}")

# %%
# Why refnorm's code differs: accuracy
# ------------------------------------
#
# The ten-line version computes :math:`x - \mu` with :math:`\mu` **rounded** to the dtype. On a
# channel whose mean is large next to its spread (activations after a ReLU, a bias that drifted)
# that rounding is inherited by every :math:`\hat x_i`: in float32 a mean of :math:`10^4` is
# rounded by up to :math:`5\cdot 10^{-4}`, which is :math:`5\cdot 10^{-4}` of a unit standard
# deviation, thousands of float32 ULPs. refnorm computes :math:`d = x - m_0` (exact for
# :math:`x` near :math:`m_0`), then the correction :math:`c = \langle d\rangle`, and uses
# :math:`\hat x = (d - c)\,r` (:mod:`refnorm.norms._stats`). Measured in float32 against a
# float64 computation on the same float32 inputs, in units of float32's machine epsilon
# relative to the largest value:


def err_eps32(a, ref):
    return np.max(np.abs(a.astype(np.float64) - ref)) / np.max(np.abs(ref)) / 2.0**-23


offsets = 10.0 ** np.arange(0, 6.5, 0.5)
errors = {("plain", "y"): [], ("plain", "dx"): [], ("refnorm", "y"): [], ("refnorm", "dx"): []}
g32, b32 = g4.astype(np.float32), b4.astype(np.float32)
dy32 = dy4.astype(np.float32)
for offset in offsets:
    x32 = (rng.standard_normal(x4.shape) + offset).astype(np.float32)
    y64, c64 = bn_forward(x32.astype(np.float64), g4.astype(np.float32).astype(np.float64),
                          b32.astype(np.float64))
    dx64 = bn_backward(dy32.astype(np.float64), c64)[0]
    y, c = bn_forward(x32, g32, b32)
    errors["plain", "y"].append(err_eps32(y, y64))
    errors["plain", "dx"].append(err_eps32(bn_backward(dy32, c)[0], dx64))
    y, _, c = batch_norm_forward(x32, None, None, g32, b32, training=True)
    errors["refnorm", "y"].append(err_eps32(y, y64))
    errors["refnorm", "dx"].append(err_eps32(batch_norm_backward(dy32, c).dx, dx64))
for offset, ep, er in zip(offsets[::4], errors["plain", "dx"][::4], errors["refnorm", "dx"][::4]):
    print(f"mean {offset:8.0e}: dx error, plain {ep:9.1f} eps, refnorm {er:5.2f} eps")

# %%
# Why refnorm's code differs: speed
# ---------------------------------
#
# The ten-line backward makes about ten passes over arrays of the size of :math:`x` and
# allocates several temporaries (``dy * xhat``, the products with ``gamma * r``). refnorm
# does not store :math:`\hat x` at all; it forms the per-channel sums as BLAS dot products
# (no temporary), folds :math:`\gamma`, :math:`r` and the means into per-channel coefficients,
# and writes :math:`\bar x` in one buffer. Best of five runs each, on a float32 batch of
# 32 x 64 x 16 x 16 (see also :doc:`/notes/performance`):


def best_time(fn, repeat=5):
    best = np.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


xs = rng.standard_normal((32, 64, 16, 16)).astype(np.float32)
dys = rng.standard_normal(xs.shape).astype(np.float32)
gs, bs = np.ones(64, np.float32), np.zeros(64, np.float32)
cache_plain = bn_forward(xs, gs, bs)[1]
cache_ref = batch_norm_forward(xs, None, None, gs, bs, training=True)[2]
t_plain = best_time(lambda: bn_backward(dys, cache_plain))
t_ref = best_time(lambda: batch_norm_backward(dys, cache_ref))
dx_plain, dx_ref = bn_backward(dys, cache_plain)[0], batch_norm_backward(dys, cache_ref).dx
print(f"backward: plain {t_plain * 1e3:.1f} ms, refnorm {t_ref * 1e3:.1f} ms "
      f"({t_plain / t_ref:.1f}x); they agree to {err_eps32(dx_plain, dx_ref):.1f} float32 eps")

fig, axes = plt.subplots(1, 2, figsize=(8.6, 3.6), gridspec_kw={"width_ratios": [2, 1]})
for (impl, out), errs in errors.items():
    axes[0].loglog(offsets, np.maximum(errs, 1e-2), "o-" if impl == "plain" else "s--",
                   label=f"{impl}: {out}")
axes[0].set_xlabel("channel mean (standard deviation 1)")
axes[0].set_ylabel("error / float32 eps")
axes[0].legend(fontsize=8)
axes[0].set_title("float32 accuracy")
axes[1].bar(["plain", "refnorm"], [t_plain * 1e3, t_ref * 1e3], color=["tab:gray", "tab:blue"])
axes[1].set_ylabel("backward time [ms]")
axes[1].set_title("32x64x16x16, float32")
fig.tight_layout()
plt.show()

# %%
# The mean correction costs one more pass in the forward and keeps every output within a few
# ULPs whatever the mean; the ten-line version loses about one digit per decade of
# mean-to-spread ratio. The same correction, and the rule for when it must be subtracted first,
# serve LayerNorm and GroupNorm (:func:`refnorm.norms._stats.correction_first`).
