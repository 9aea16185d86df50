r"""
AdamP and SGDP: optimizers for scale-invariant weights
======================================================

A weight followed by a normalization layer is **scale-invariant**: multiplying it by
:math:`c > 0` changes nothing downstream. Gradient descent then behaves in a way that surprises
at first: the weight's norm can only grow, and the step it takes *on the sphere* shrinks with
it. Momentum makes the growth much faster. SGDP and AdamP (Heo et al., ICLR 2021,
arXiv:2006.08217) remove the radial part of each update. This tutorial

1. measures scale invariance and its two consequences on a small network built with
   :mod:`refnorm.autograd`;
2. writes the projection in three lines of NumPy and compares it with
   :func:`refnorm.optim.project_update`;
3. trains with SGD vs SGDP and Adam vs AdamP through :mod:`refnorm.optim`, and plots the weight
   norm and the effective step size :math:`\eta/\lVert w\rVert^2`;
4. compares refnorm's SGDP and AdamP with the official ``adamp`` package when it is installed.

The derivation is :doc:`/derivations/adamp`.
"""
import matplotlib.pyplot as plt
import numpy as np

from refnorm.autograd import Tensor, gradients, relu
from refnorm.functional import batch_norm
from refnorm.optim import (BY_NAME, effective_step_size, pairs_from_records, project_update,
                           run_trajectory, weight_norms)

# %%
# A scale-invariant weight
# ------------------------
#
# A two-layer regression network: :math:`h = X W_1^T`, BatchNorm over the batch (no affine),
# a ReLU, a linear read-out :math:`W_2`, and the mean squared error. Each row of :math:`W_1`
# (one output channel) feeds one BatchNorm channel, so :math:`L(c\,W_1) = L(W_1)`, row by row
# (up to BatchNorm's :math:`\epsilon`, which breaks the invariance slightly: it is taken tiny
# here, :math:`10^{-10}`, next to the variance of :math:`h`).

rng = np.random.default_rng(0)
X = rng.standard_normal((128, 8))
target = np.sin(X @ rng.standard_normal(8))[:, None]


def loss_and_grads(params):
    W1, W2 = (Tensor(p, requires_grad=True) for p in params)
    h, _ = batch_norm(Tensor(X) @ W1.transpose(), None, None, training=True, eps=1e-10)
    err = relu(h) @ W2.transpose() - Tensor(target)
    loss = (err * err).mean()
    return float(loss.data), list(gradients(loss, [W1, W2]))


W1 = rng.standard_normal((16, 8)) * 0.1
W2 = rng.standard_normal((1, 16)) * 0.3
loss, (g1, g2) = loss_and_grads([W1, W2])
loss3, (g1_3, _) = loss_and_grads([3 * W1, W2])
print(f"L(W1) = {loss:.10f}, L(3 W1) - L(W1) = {loss3 - loss:.1e}")

# %%
# Two consequences, both measured. Differentiating :math:`L(cw) = L(w)` in :math:`c` gives
# :math:`\langle w, \nabla L(w)\rangle = 0`: the gradient is **orthogonal** to the weight (row
# by row here). Differentiating in :math:`w` gives :math:`\nabla L(cw) = \nabla L(w)/c`: a
# larger weight gets a **smaller** gradient.

cosines = np.abs(np.sum(g1 * W1, axis=1)) / (np.linalg.norm(g1, axis=1)
                                             * np.linalg.norm(W1, axis=1))
print(f"largest |cos(w_r, g_r)| over the 16 rows: {cosines.max():.1e}")
print(f"|grad L(3 W1)| / |grad L(W1)| = {np.linalg.norm(g1_3) / np.linalg.norm(g1):.6f} "
      f"(1/3 = {1 / 3:.6f})")

# %%
# So a plain gradient step :math:`w - \eta g` with :math:`g \perp w` can only lengthen
# :math:`w`, by Pythagoras: :math:`\lVert w - \eta g\rVert^2 = \lVert w\rVert^2 +
# \eta^2\lVert g\rVert^2`. On the sphere the step is
# :math:`\eta\lVert g\rVert/\lVert w\rVert \propto \eta/\lVert w\rVert^2`: the longer the
# weight, the slower it turns. With momentum, the buffer keeps old gradients, which are not
# orthogonal to the *current* weight, and the update gains a radial, outward component.
#
# The projection, in plain NumPy
# ------------------------------
#
# SGDP and AdamP detect a scale-invariant weight by its gradient being nearly orthogonal to
# it (:math:`|\cos| < \delta/\sqrt{D}`, :math:`\delta = 0.1`, :math:`D` the row length; a random
# vector has :math:`|\cos| \approx 1/\sqrt D`), and then remove the update's radial component,
# row by row: :math:`u_r \leftarrow u_r - \langle \hat w_r, u_r\rangle\,\hat w_r`.


def project_plain(w, g, u, delta=0.1, eps=1e-8):
    cos = np.abs(np.sum(g * w, 1)) / (np.linalg.norm(g, axis=1) * np.linalg.norm(w, axis=1))
    if cos.max() >= delta / np.sqrt(w.shape[1]):
        return u  # not scale-invariant (the official code then tries the whole layer as one row)
    w_hat = w / (np.linalg.norm(w, axis=1, keepdims=True) + eps)
    return u - np.sum(w_hat * u, axis=1, keepdims=True) * w_hat


u = g1 + 0.3 * W1  # an update with a radial part, as a momentum buffer has
ours = project_plain(W1, g1, u)
theirs, view, ratio = project_update(W1, g1, u, delta=0.1, wd_ratio=0.1, eps=1e-8)
radial_before = np.max(np.abs(np.sum(u * W1, 1)))
radial_after = np.max(np.abs(np.sum(theirs * W1, 1)))
print(f"projected in the {view!r} view; max |plain - refnorm| = "
      f"{np.max(np.abs(ours - theirs)):.1e}; radial part <w_r, u_r>: {radial_before:.1e} "
      f"before, {radial_after:.1e} after")

# %%
# refnorm's :func:`~refnorm.optim.project_update` differs from the three lines only where the
# official code does: it clamps the norms at :math:`\epsilon` inside the cosine, and when the
# per-channel test fails it tests the whole layer as one row before giving up (see the notes
# in :mod:`refnorm.optim.adamp`).
#
# Training: SGD vs SGDP, Adam vs AdamP
# ------------------------------------
#
# :func:`refnorm.optim.run_trajectory` runs any optimizer record from the same start with the
# same gradient function and records the weights after every step; the hyper-parameters are the
# usual ones (momentum 0.9, Adam's defaults) with no weight decay, so that only the projection
# differs within each pair.

steps = 300
runs = {
    "SGD": ("sgd", dict(lr=0.1, momentum=0.9)),
    "SGDP": ("sgdp", dict(lr=0.1, momentum=0.9)),
    "Adam": ("adam", dict(lr=0.01)),
    "AdamP": ("adamp", dict(lr=0.01)),
}
start = [W1, W2]
records, losses = {}, {}
for label, (name, hyper) in runs.items():
    trace = []

    def grad_fn(params, trace=trace):
        loss, grads = loss_and_grads(params)
        trace.append(loss)
        return grads

    records[label] = run_trajectory(BY_NAME[name], start, grad_fn, steps, **hyper)
    losses[label] = np.array(trace)
    norm = weight_norms([r["params"] for r in records[label]])[-1, 0]
    print(f"{label:5s}: loss {trace[0]:.4f} -> {trace[-1]:.4f}, |W1| {np.linalg.norm(W1):.3f} "
          f"-> {norm:.3f}")

# %%
# The figure: the norm of :math:`W_1` (left), the effective step size
# (:func:`refnorm.optim.effective_step_size`: :math:`\eta/\lVert w\rVert^2` for SGD-type
# updates, :math:`\eta/\lVert w\rVert` for Adam-type ones, whose step does not shrink with the
# gradient), and the loss. With momentum, SGD's weight norm grows fast and its effective step
# size collapses within a few dozen steps; with the projection the norm grows far less, and the
# effective step stays much nearer the one the learning rate asked for.

fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.4))
styles = {"SGD": ("tab:red", "-"), "SGDP": ("tab:red", "--"),
          "Adam": ("tab:blue", "-"), "AdamP": ("tab:blue", "--")}
for label, recs in records.items():
    color, ls = styles[label]
    norms = weight_norms([start] + [r["params"] for r in recs])[:, 0]
    power = 2 if label.startswith("SGD") else 1
    eff = effective_step_size(pairs_from_records(start, recs), power=power)[:, 0]
    axes[0].plot(norms, color=color, ls=ls, label=label)
    axes[1].semilogy(eff / eff[0], color=color, ls=ls, label=label)
    axes[2].semilogy(losses[label], color=color, ls=ls, label=label)
axes[0].set_title(r"$\|W_1\|$")
axes[1].set_title("effective step size / its start")
axes[2].set_title("training loss")
for ax in axes:
    ax.set_xlabel("step")
axes[0].legend(fontsize=8)
fig.tight_layout()

# %%
# Against the official implementation
# -----------------------------------
#
# The official SGDP and AdamP are the ``adamp`` package (clovaai/AdamP, on PyTorch). When both
# are installed, run them on the same problem, feeding them refnorm's gradients at their own
# weights, and compare the weights after every step with refnorm's trajectories.

try:
    import adamp
    import torch
except ImportError as exc:
    adamp = None
    print(f"skipped the comparison with the official package: {exc}")

if adamp is not None:
    for label, cls in [("SGDP", adamp.SGDP), ("AdamP", adamp.AdamP)]:
        name, hyper = runs[label]
        tensors = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in start]
        opt = cls(tensors, **hyper)
        worst = 0.0
        for record in records[label]:
            _, grads = loss_and_grads([t.detach().numpy() for t in tensors])
            for t, g in zip(tensors, grads):
                t.grad = torch.tensor(g)
            opt.step()
            for t, p in zip(tensors, record["params"]):
                diff = np.max(np.abs(t.detach().numpy() - p)) / np.max(np.abs(p))
                worst = max(worst, diff)
        print(f"{label}: largest relative difference from the official adamp.{cls.__name__} "
              f"over {steps} steps: {worst:.1e}")

plt.show()

# %%
# What to take away: on a scale-invariant weight, plain momentum methods spend their steps
# inflating the norm, which silently decays the learning rate; removing the radial component
# keeps the effective step size where the schedule put it. Weight decay, which shrinks the norm,
# is the other classical counterweight; SGDP and AdamP scale it by ``wd_ratio`` when they
# project.
