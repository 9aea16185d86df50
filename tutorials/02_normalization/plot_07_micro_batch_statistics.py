r"""
Batch statistics at micro-batch sizes, and calibrating them at test time
========================================================================

BatchNorm normalizes each channel with the mean and variance of the **current batch**. With
large batches those are good estimates of the population's; with micro-batches of 1-4 images
(detection, segmentation, large models on one device) they are noisy, every sample's output
depends on which other samples share its batch, and training (batch statistics) and evaluation
(running statistics) see different functions. And at test time, when the data shifts, the
running statistics themselves are wrong. This tutorial

1. writes BatchNorm, GroupNorm, Batch-Channel Normalization (BCN) and Weight Standardization
   (WS) in plain NumPy and checks them against refnorm's
   :func:`~refnorm.norms.batch_norm.batch_norm_forward`,
   :func:`~refnorm.norms.group_norm.group_norm_forward`,
   :func:`~refnorm.norms.batch_channel_norm.batch_channel_norm_forward` and
   :func:`~refnorm.norms.weight_standardization.weight_standardization_forward`;
2. measures how much one sample's output depends on its batch, against the batch size, for BN,
   GN and BCN, and what WS does to the gradient of a weight;
3. shifts the test data and measures the accuracy of a model with BatchNorm when the test
   statistics are mixed into the source ones (:math:`\alpha`-BN,
   :func:`~refnorm.norms.alpha_bn.alpha_bn_forward`), against the mixing weight and the test
   batch size.

The derivations are :doc:`/derivations/batch_norm`, :doc:`/derivations/group_norm`,
:doc:`/derivations/batch_channel_norm`, :doc:`/derivations/weight_standardization` and
:doc:`/derivations/alpha_bn`.
"""
import matplotlib.pyplot as plt
import numpy as np

from refnorm.norms.alpha_bn import alpha_bn_forward
from refnorm.norms.batch_channel_norm import batch_channel_norm_forward
from refnorm.norms.batch_norm import batch_norm_forward
from refnorm.norms.group_norm import group_norm_forward
from refnorm.norms.weight_standardization import (weight_standardization_backward,
                                                  weight_standardization_forward)

# %%
# Four normalizations in plain NumPy
# ----------------------------------
#
# On :math:`x` of shape :math:`(N, C, H, W)`: **BatchNorm** standardizes each channel over
# :math:`(N, H, W)`; **GroupNorm** standardizes each sample's group of :math:`C/G` channels over
# (channels of the group, :math:`H, W`): no batch axis, so no batch dependence, but one mean
# and one variance for several channels. **BCN** (Qiao et al. 2019, arXiv:1903.10520) does both
# in turn: BatchNorm (with its affine), then GroupNorm without affine, then one scale and
# shift per group. **WS** (same paper) standardizes each output slice of a convolution's
# **weight** (over its fan-in; refnorm's default is the authors' PyTorch layer: unbiased
# standard deviation, :math:`\epsilon` added outside the square root).

EPS = 1e-5


def bn_train(x, gamma=1.0, beta=0.0):
    mu = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    return gamma * (x - mu) / np.sqrt(var + EPS) + beta


def bn_eval(x, mean, var):
    return (x - mean.reshape(1, -1, 1, 1)) / np.sqrt(var.reshape(1, -1, 1, 1) + EPS)


def gn(x, groups):
    n, c, h, w = x.shape
    xg = x.reshape(n, groups, -1)
    xg = (xg - xg.mean(axis=2, keepdims=True)) / np.sqrt(xg.var(axis=2, keepdims=True) + EPS)
    return xg.reshape(x.shape)


def bcn(x, groups, u=None):
    """BN (batch statistics, or ``u`` already normalized), then GN, affine 1 and 0."""
    return gn(bn_train(x) if u is None else u, groups)


def ws(weight):
    rows = weight.reshape(weight.shape[0], -1)
    d = rows - rows.mean(axis=1, keepdims=True)
    return (d / (d.std(axis=1, ddof=1, keepdims=True) + EPS)).reshape(weight.shape)


def rel(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


rng = np.random.default_rng(0)
N, C, H, W, G = 8, 16, 4, 4, 4
x = rng.normal(2.0, 1.5, (1, C, 1, 1)) + rng.lognormal(0, 0.5, (1, C, 1, 1)) * \
    rng.standard_normal((N, C, H, W))
conv_w = rng.standard_normal((8, C, 3, 3)) * 0.2 + 0.05
none = (None, None)
print(f"BatchNorm  {rel(batch_norm_forward(x, *none, training=True)[0], bn_train(x)):.1e}")
print(f"GroupNorm  {rel(group_norm_forward(x, G)[0], gn(x, G)):.1e}")
y_bcn = batch_channel_norm_forward(x, *none, training=True, num_groups=G)[0]
print(f"BCN        {rel(y_bcn, bcn(x, G)):.1e}")
print(f"WS         {rel(weight_standardization_forward(conv_w)[0], ws(conv_w)):.1e}")

# %%
# How much does a sample's output depend on its batch?
# ----------------------------------------------------
#
# Features with the statistics of a conv layer's output (each channel its own mean and scale),
# and one sample :math:`x_0` that we follow. In training mode, put :math:`x_0` in a batch of
# :math:`N` with :math:`N-1` random companions, and compare its output with the output of the
# same layer in evaluation mode with the **population** statistics (what the running averages
# estimate at best): the relative distance is the noise that the batch adds to :math:`x_0`'s
# features, and also the train/test mismatch. GroupNorm has none, by construction. Averaged
# over 30 draws of companions:

mean_c = rng.normal(2.0, 1.5, C)
scale_c = rng.lognormal(0, 0.5, C)


def features(n):
    return mean_c.reshape(1, -1, 1, 1) + scale_c.reshape(1, -1, 1, 1) * \
        rng.standard_normal((n, C, H, W))


pop_mean, pop_var = mean_c, scale_c ** 2
x0 = features(1)
ref = {"BN": bn_eval(x0, pop_mean, pop_var), "GN": gn(x0, G),
       "BCN": bcn(x0, G, u=bn_eval(x0, pop_mean, pop_var))}
sizes = [2, 4, 8, 16, 32, 64, 128]
noise = {k: [] for k in ref}
for n in sizes:
    draws = {k: [] for k in ref}
    for _ in range(30):
        batch = np.concatenate([x0, features(n - 1)])
        outs = {"BN": batch_norm_forward(batch, *none, training=True)[0],
                "GN": group_norm_forward(batch, G)[0],
                "BCN": batch_channel_norm_forward(batch, *none, training=True, num_groups=G)[0]}
        for k, y in outs.items():
            draws[k].append(np.linalg.norm(y[:1] - ref[k]) / np.linalg.norm(ref[k]))
    for k in ref:
        noise[k].append(np.mean(draws[k]))
for n, b, c_ in zip(sizes, noise["BN"], noise["BCN"]):
    print(f"batch {n:3d}: BN {b:.3f}   BCN {c_:.3f}   GN {noise['GN'][sizes.index(n)]:.0e}")

# %%
# BatchNorm's noise falls like :math:`1/\sqrt{N}` (the standard error of a mean over
# :math:`N\cdot H\cdot W` values): at a batch of 2 it is tens of percent of the feature. BCN's
# GroupNorm stage removes the part of the batch noise that is common to the channels of a group
# (a shift or a scale of the whole group) and keeps the rest, so it is only slightly less noisy
# than BN (10-15% here) and still batch-dependent: in the paper, BCN reaches micro-batches by
# normalizing its BN stage with **estimated** statistics (the micro-batch ``EstBN`` of the
# authors' code, which refnorm does not implement: its schedule is not given in the sources).
#
# Weight Standardization has no batch axis at all; what it changes is the weight's gradient.
# :math:`\hat W_o` is invariant to :math:`W_o\to aW_o + b\mathbf 1` (:math:`a > 0`, up to
# :math:`\epsilon`), so its gradient has no component along those two directions: each output
# slice of :math:`\bar W` sums to zero and is orthogonal to :math:`W_o - \mu_o` (like the
# gradient of a scale-invariant weight, tutorial 6). Measured on refnorm's
# :func:`~refnorm.norms.weight_standardization.weight_standardization_backward` with a random
# upstream gradient, with :math:`\epsilon = 0` (with :math:`\epsilon > 0` the scale invariance,
# and so the orthogonality, hold only up to about :math:`\epsilon/\sigma_o^2`):

w_hat, cache = weight_standardization_forward(conv_w, eps=0.0)
dw = weight_standardization_backward(rng.standard_normal(conv_w.shape), cache)[0]
rows, drows = conv_w.reshape(8, -1), dw.reshape(8, -1)
centred = rows - rows.mean(axis=1, keepdims=True)
norms = np.linalg.norm(drows, axis=1)
print(f"max |sum_j dW_oj| / |dW_o|:                   "
      f"{np.max(np.abs(drows.sum(1)) / norms):.1e}")
print(f"max cos(dW_o, W_o - mu_o):                    "
      f"{np.max(np.abs((drows * centred).sum(1)) / norms / np.linalg.norm(centred, axis=1)):.1e}")

# %%
# Test-time calibration under covariate shift
# -------------------------------------------
#
# A classifier trained on a **source** distribution: 16 features, two classes, a BatchNorm
# layer whose running statistics are the source's, then a linear read-out (the Bayes rule of
# the source, written down rather than trained). At test time the features are shifted, channel
# by channel: :math:`x \to a\odot x + b` (a sensor's gain and offset, the brightness of images:
# a covariate shift, the classes unchanged). With the source statistics (BN in evaluation) the
# shifted features are mis-normalized and the accuracy drops; with the test batch's statistics
# they are normalized again, but a small test batch gives noisy statistics.
# :math:`\alpha`-BN (You, Li & Zhao 2021, arXiv:2110.04065) mixes the two:
#
# .. math::
#    \tilde\mu = (1-w)\,\bar\mu + w\,\mu_t,\qquad \tilde\sigma^2 = (1-w)\,\bar\sigma^2 +
#    w\,\sigma^2_t ,
#
# with :math:`w` the weight of the test batch (refnorm names it ``test_weight``, and claims no
# default: the sources disagree on which side the paper's :math:`\alpha` weights; the
# third-party reference uses :math:`w = 0.1` and the unbiased test variance). In NumPy:


def alpha_bn(x, mean, var, w):
    mu_t, var_t = x.mean(axis=0), x.var(axis=0, ddof=1)
    return (x - ((1 - w) * mean + w * mu_t)) / np.sqrt((1 - w) * var + w * var_t + EPS)


F = 16
class_mean = rng.standard_normal(F) * 0.6
gain, offset = rng.lognormal(0, 0.4, F), rng.normal(0, 3.0, F)


def sample(n, shifted, rng):
    labels = rng.integers(0, 2, n)
    x = np.where(labels[:, None] == 1, class_mean, -class_mean) + rng.standard_normal((n, F))
    return (gain * x + offset if shifted else x), labels


src, _ = sample(100_000, False, rng)
run_mean, run_var = src.mean(axis=0), src.var(axis=0, ddof=1)
readout = class_mean / np.sqrt(run_var + EPS)  # the source's Bayes rule on normalized features


def accuracy(normalized, labels):
    return np.mean((normalized @ readout > 0) == (labels == 1))


xt, yt = sample(32, True, rng)
y_ref = alpha_bn_forward(xt, run_mean, run_var, test_weight=0.3)[0]
y_plain = alpha_bn(xt, run_mean, run_var, 0.3)
print(f"alpha-BN, w = 0.3: refnorm vs NumPy {rel(y_ref, y_plain):.1e}")

weights = np.linspace(0, 1, 11)
batch_sizes = [2, 4, 16, 128]
acc = {}
for n in batch_sizes:
    r = np.random.default_rng(n)
    batches = [sample(n, True, r) for _ in range(4096 // n)]
    acc[n] = [np.mean([accuracy(alpha_bn_forward(xb, run_mean, run_var, test_weight=w)[0], yb)
                       for xb, yb in batches]) for w in weights]
xs, ys = sample(20_000, False, rng)
acc_source = accuracy(bn_eval(xs[:, :, None, None], run_mean, run_var)[:, :, 0, 0], ys)
print(f"source data, source statistics: accuracy {acc_source:.3f}")
for n in batch_sizes:
    best = int(np.argmax(acc[n]))
    print(f"shifted, batch {n:3d}: w=0 {acc[n][0]:.3f}, w=1 {acc[n][-1]:.3f}, "
          f"best w={weights[best]:.1f}: {acc[n][best]:.3f}")

fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.8))
for k, marker in [("BN", "o-"), ("BCN", "s-")]:
    axes[0].loglog(sizes, noise[k], marker, label=k)
axes[0].loglog(sizes, noise["BN"][0] * np.sqrt(sizes[0] / np.array(sizes)), "k:", lw=1,
               label=r"$\propto 1/\sqrt{N}$")
axes[0].set_xlabel("batch size $N$")
axes[0].set_ylabel(r"$\|y_0 - y_0^{\rm population}\| / \|y_0^{\rm population}\|$")
axes[0].set_title("Batch noise in one sample's output (GN: 0)")
axes[0].legend(fontsize=8)
for n in batch_sizes:
    axes[1].plot(weights, acc[n], "o-", ms=3, label=f"test batch {n}")
axes[1].axhline(acc_source, color="k", ls=":", lw=1)
axes[1].text(0.02, acc_source - 0.015, "accuracy on source data", fontsize=8)
axes[1].set_xlabel(r"weight of the test-batch statistics $w$ ($\alpha$-BN)")
axes[1].set_ylabel("accuracy on shifted data")
axes[1].set_title("Calibrating BatchNorm under a covariate shift")
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %%
# With the source statistics (:math:`w = 0`) the shifted data is badly normalized (0.75
# accuracy instead of 0.99); with the test batch's alone (:math:`w = 1`) the accuracy is back
# near the source's for large batches, but small batches pay the estimation noise of the first
# part of this tutorial (and a batch of 2 whose samples share a class has its class signal
# subtracted as if it were the shift). The best mixture moves toward the test statistics as the
# batch grows: :math:`w \approx 0.7` at a batch of 2, 1 at a batch of 128. How strong the shift
# is decides where the optimum lies: with half this offset (not shown) it is
# :math:`w \approx 0.3` at a batch of 2; the reference code's :math:`w = 0.1` is at the
# cautious end. :math:`\alpha`-BN's backward holds the mixed statistics constant (the
# reference code normalizes with
# ``F.batch_norm(..., training=False)``): see :doc:`/derivations/alpha_bn` for what that
# surrogate leaves out, and :class:`refnorm.nn.Tent` for adapting the affine parameters at
# test time as well.
