r"""
LayerNorm, RMSNorm and CRMSNorm: three norms, one Pre-LN Transformer
====================================================================

RMSNorm (Zhang & Sennrich, 2019) is LayerNorm without the centring: it divides by the root mean
square and subtracts nothing. It is cheaper, and most recent language models use it. Jiang et al.
(NeurIPS 2023, arXiv:2305.14858) showed that for a **Pre-LN** Transformer the choice does not
matter: every Pre-LN model *is* a Pre-RMSNorm model, and a Pre-CRMSNorm model (a compressed
RMSNorm on a residual stream one coordinate narrower), with other weights. This tutorial

1. writes the three norms in plain NumPy and compares them with refnorm's
   :func:`~refnorm.norms.layer_norm.layer_norm_forward`,
   :func:`~refnorm.norms.rms_norm.rms_norm_forward` and
   :func:`~refnorm.norms.crms_norm.crms_norm_forward` (and their hand-derived backwards);
2. measures the two identities behind the equivalence: on a zero-mean vector LayerNorm *is*
   RMSNorm, and CRMSNorm is RMSNorm on the vector stored without its last coordinate;
3. converts a randomly initialized Pre-LN Transformer with :func:`refnorm.nn.to_pre_rmsnorm` and
   :func:`refnorm.nn.to_pre_crmsnorm`, and measures the outputs and the gradients of the three
   models.

The derivations are :doc:`/derivations/layer_norm`, :doc:`/derivations/rms_norm` and
:doc:`/derivations/crms_norm`; the models are described in :doc:`/howto/nn`.
"""
import time

import matplotlib.pyplot as plt
import numpy as np

import refnorm.nn as nn
from refnorm.autograd import gradients
from refnorm.nn import convert
from refnorm.norms import crms_norm as crms
from refnorm.norms.crms_norm import crms_norm_backward, crms_norm_forward
from refnorm.norms.layer_norm import layer_norm_forward
from refnorm.norms.rms_norm import rms_norm_backward, rms_norm_forward

# %%
# Three norms in plain NumPy
# --------------------------
#
# Over the last axis of :math:`x\in\mathbb R^d`, with :math:`\epsilon` inside the square root
# in all three (the convention of PyTorch and of the official code):
#
# .. math::
#    \mathrm{LN}(x) = \frac{x-\mu}{\sqrt{\sigma^2+\epsilon}},\qquad
#    \mathrm{RMS}(x) = \frac{x}{\sqrt{\langle x^2\rangle+\epsilon}},\qquad
#    \mathrm{CRMS}(z) = \frac{z}{\sqrt{\bigl(\sum_i z_i^2 + (\sum_i z_i)^2\bigr)/d+\epsilon}},
#
# with :math:`\mu`, :math:`\sigma^2` (biased, :math:`1/d`) and :math:`\langle x^2\rangle` the
# means over the :math:`d` coordinates, and :math:`z\in\mathbb R^{d-1}` for CRMSNorm. The
# affine :math:`\gamma\odot\cdot+\beta` is left out here: the conversion folds it into the next
# linear layer.

EPS = 1e-5


def ln(x, eps=EPS):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps)


def rms(x, eps=EPS):
    return x / np.sqrt((x ** 2).mean(axis=-1, keepdims=True) + eps)


def crms_plain(z, eps=EPS):
    d = z.shape[-1] + 1
    q = ((z ** 2).sum(axis=-1, keepdims=True) + z.sum(axis=-1, keepdims=True) ** 2) / d
    return z / np.sqrt(q + eps)


# %%
# RMSNorm's backward is LayerNorm's without the mean term: with :math:`r =
# (\langle x^2\rangle+\epsilon)^{-1/2}` and :math:`\hat x = r x`,
# :math:`\bar x = r\,(\bar y - \hat x\,\langle\bar y\,\hat x\rangle)`.
# CRMSNorm is :math:`C\circ\mathrm{RMS}\circ D`, with :math:`D(z) = (z, -\sum_i z_i)`
# ("decompress": the zero-mean vector whose first :math:`d-1` coordinates are :math:`z`) and
# :math:`C` dropping the last coordinate, so its backward is the chain rule through those two
# linear maps: :math:`C^T\bar y = (\bar y, 0)` and :math:`D^T v = v_{1:d-1} - v_d`.


def rms_backward(dy, x, eps=EPS):
    r = 1 / np.sqrt((x ** 2).mean(axis=-1, keepdims=True) + eps)
    xhat = x * r
    return r * (dy - xhat * (dy * xhat).mean(axis=-1, keepdims=True))


def crms_backward_plain(dy, z, eps=EPS):
    x = np.concatenate([z, -z.sum(axis=-1, keepdims=True)], axis=-1)        # D z
    v = rms_backward(np.concatenate([dy, np.zeros_like(dy[..., :1])], axis=-1), x, eps)
    return v[..., :-1] - v[..., -1:]                                        # D^T v


def rel(a, b):
    """Max relative difference: the largest elementwise difference over the largest |b|."""
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


# %%
# refnorm's versions agree with these to rounding, forward and backward (refnorm computes its
# statistics from power-of-two-scaled values so that tiny and huge rows neither underflow nor
# overflow, :doc:`/notes/conventions`; with ordinary values that changes nothing visible):

rng = np.random.default_rng(0)
d = 16
x = rng.standard_normal((64, d)) * 3 + 1
z = rng.standard_normal((64, d - 1))
dy, dyz = rng.standard_normal(x.shape), rng.standard_normal(z.shape)
checks = {
    "LayerNorm y": rel(layer_norm_forward(x, d, eps=EPS)[0], ln(x)),
    "RMSNorm y": rel(rms_norm_forward(x, d, eps=EPS)[0], rms(x)),
    "RMSNorm dx": rel(rms_norm_backward(dy, rms_norm_forward(x, d, eps=EPS)[1]).dx,
                      rms_backward(dy, x)),
    "CRMSNorm y": rel(crms_norm_forward(z, eps=EPS)[0], crms_plain(z)),
    "CRMSNorm dz": rel(crms_norm_backward(dyz, crms_norm_forward(z, eps=EPS)[1]).dx,
                       crms_backward_plain(dyz, z)),
}
for name, err in checks.items():
    print(f"{name:12s} refnorm vs plain NumPy: {err:.1e}")

# %%
# The two identities
# ------------------
#
# **On a zero-mean vector, LayerNorm is RMSNorm**: :math:`\mu = 0` and :math:`\sigma^2 =
# \langle x^2\rangle`, with the same :math:`\epsilon` in the same place. The re-centring
# :math:`Px = x - \mu\mathbf 1` (:func:`refnorm.norms.crms_norm.recenter`) changes nothing for
# LayerNorm, :math:`\mathrm{LN}(Px) = \mathrm{LN}(x)`. **On a zero-mean vector the last
# coordinate is redundant**: :func:`~refnorm.norms.crms_norm.compress` drops it,
# :func:`~refnorm.norms.crms_norm.decompress` restores it, and
# :math:`\lVert x\rVert^2 = \sum_i z_i^2 + (\sum_i z_i)^2`, which is why CRMSNorm has that odd
# second term: :math:`\mathrm{CRMS}(C x) = C\,\mathrm{RMS}(x)`.

xc = crms.recenter(x)
zc = crms.compress(xc)
print(f"LN(x) vs LN(Px):            {rel(ln(xc), ln(x)):.1e}")
print(f"LN(Px) vs RMS(Px):          {rel(rms(xc), ln(xc)):.1e}")
print(f"D(C(Px)) vs Px:             {rel(crms.decompress(zc), xc):.1e}")
print(f"CRMS(C Px) vs C RMS(Px):    {rel(crms_norm_forward(zc, eps=EPS)[0], rms(xc)[:, :-1]):.1e}")

# %%
# Without the re-centring RMSNorm is a different function. How different grows with the mean
# of the row next to its spread (one row of standard deviation 1, mean :math:`m`): the figure at
# the end plots it.

means = np.logspace(-3, 2, 21)
row = rng.standard_normal((1, d))
row = (row - row.mean()) / row.std()
ln_vs_rms = [rel(rms(row + m), ln(row + m)) for m in means]
print(f"mean 0.01: LN vs RMS differ by {rel(rms(row + 0.01), ln(row + 0.01)):.1e}; "
      f"mean 1: {rel(rms(row + 1), ln(row + 1)):.1e}")

# %%
# A Pre-LN Transformer, converted
# -------------------------------
#
# A Pre-LN model reads its residual stream **only through LayerNorms** (and the final norm
# before the head), so the stream may be shifted by any multiple of :math:`\mathbf 1` without
# changing the output. The conversion (:mod:`refnorm.nn.convert`) uses that freedom:
#
# 1. fold each LayerNorm's :math:`\gamma,\beta` into the linear layer that reads it,
#    :math:`W\leftarrow W\,\mathrm{diag}\,\gamma`, :math:`b\leftarrow b + W\beta`;
# 2. re-centre everything that **writes** into the stream (the embeddings, the attention output
#    projection, the second MLP layer): :math:`W\leftarrow PW`, :math:`b\leftarrow Pb`. The
#    stream is then zero-mean, and each LayerNorm can be an RMSNorm without affine:
#    **Pre-RMSNorm**;
# 3. store the stream without its last coordinate: writers keep :math:`d-1` output rows,
#    readers use :math:`W' = W_{:,1:d-1} - W_{:,d}`, the norms become CRMSNorm:
#    **Pre-CRMSNorm**.
#
# A Pre-LN model with random weights, its LayerNorms' affine moved away from :math:`(1, 0)` so
# that the folding is exercised:


def pre_ln_model(n_layers, seed=0):
    rng = np.random.default_rng(seed)
    model = nn.Transformer(50, 32, 4, n_layers, 16, placement="pre", rng=rng)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = p.data + 0.5 * rng.standard_normal(p.shape)
    return model


model = pre_ln_model(4)
model_rms = nn.to_pre_rmsnorm(model)
model_crms = nn.to_pre_crmsnorm(model)
tokens = rng.integers(0, 50, (4, 16))
targets = rng.integers(0, 50, (4, 16))
logits = model(tokens).data
print(model_crms.blocks[0].norm1, "| stream width", model_crms.config["width"])
for label, m in [("Pre-RMSNorm", model_rms), ("Pre-CRMSNorm", model_crms)]:
    n_params = sum(p.data.size for p in m.parameters())
    print(f"{label:13s} logits vs Pre-LN: {rel(m(tokens).data, logits):.1e}   "
          f"({n_params} parameters; Pre-LN {sum(p.data.size for p in model.parameters())})")

# %%
# The gradients
# -------------
#
# The converted models compute the same function of the tokens; are their gradients the same?
# Not parameter by parameter: the parameters are different. What is the same is the gradient
# with respect to the **Pre-LN** parameters when the converted model's parameters are computed
# from them. :func:`~refnorm.nn.convert.pre_rmsnorm_parameters` and
# :func:`~refnorm.nn.convert.pre_crmsnorm_parameters` write the maps of steps 1-3 with engine
# operations, so the engine differentiates through them (this is how the official code trains:
# the re-centring is applied on the fly, and the optimizer sees the Pre-LN parameters).
# :func:`refnorm.nn.functional_call` runs the converted model with those mapped parameters.

names, params = zip(*model.named_parameters())
grads = gradients(nn.cross_entropy(model(tokens), targets), params)
grad_rel = {}
for label, m, mapping in [("Pre-RMSNorm", model_rms, convert.pre_rmsnorm_parameters),
                          ("Pre-CRMSNorm", model_crms, convert.pre_crmsnorm_parameters)]:
    logits_m = nn.functional_call(m, mapping(model), tokens)
    grads_m = gradients(nn.cross_entropy(logits_m, targets), params)
    grad_rel[label] = {n: rel(g2, g) for n, g, g2 in zip(names, grads, grads_m)}
    worst = max(grad_rel[label], key=grad_rel[label].get)
    print(f"{label:13s} gradient w.r.t. the Pre-LN parameters: max relative difference "
          f"{grad_rel[label][worst]:.1e} ({worst}), over {len(names)} tensors")

# %%
# The equivalence is exact in real arithmetic, so the differences are rounding only; they do
# not grow with depth (float64, one model per depth):

depths = [1, 2, 4, 8, 12]
depth_rel = {"Pre-RMSNorm": [], "Pre-CRMSNorm": []}
for n_layers in depths:
    m = pre_ln_model(n_layers, seed=n_layers)
    ref = m(tokens).data
    depth_rel["Pre-RMSNorm"].append(rel(nn.to_pre_rmsnorm(m)(tokens).data, ref))
    depth_rel["Pre-CRMSNorm"].append(rel(nn.to_pre_crmsnorm(m)(tokens).data, ref))
for k, n_layers in enumerate(depths):
    print(f"{n_layers:2d} layers: RMS {depth_rel['Pre-RMSNorm'][k]:.1e}, "
          f"CRMS {depth_rel['Pre-CRMSNorm'][k]:.1e}")

# %%
# What the conversion buys: each norm is cheaper (no mean; no affine), and Pre-CRMSNorm's
# matrices are a row or a column smaller. In NumPy on one core the norm is a small part of a
# layer's time; the best of 20 forwards of the 4-layer model (the timing is noisy on a shared
# machine; Jiang et al. report 1-10% on GPUs):


def best_time(fn, repeat=20):
    best = np.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


for label, m in [("Pre-LN", model), ("Pre-RMSNorm", model_rms), ("Pre-CRMSNorm", model_crms)]:
    print(f"{label:13s} forward {best_time(lambda: m(tokens)) * 1e3:.2f} ms")

fig, axes = plt.subplots(1, 3, figsize=(11.0, 3.6))
axes[0].loglog(means, ln_vs_rms, "o-", color="tab:red")
axes[0].set_xlabel("row mean (standard deviation 1)")
axes[0].set_ylabel("max |RMS(x) - LN(x)| / max |LN(x)|")
axes[0].set_title("Without re-centring: different")
groups = ["tok", "pos", "norm", "attn.qkv", "attn.out", "mlp.fc1", "mlp.fc2", "head"]
pos = np.arange(len(groups))
for k, (label, color) in enumerate([("Pre-RMSNorm", "tab:blue"), ("Pre-CRMSNorm", "tab:green")]):
    worst = [max(v for n, v in grad_rel[label].items()
                 if (n.startswith(g) or f".{g}" in n)) for g in groups]
    axes[1].bar(pos + (k - 0.5) * 0.4, worst, 0.4, label=label, color=color)
axes[1].axhline(2.0**-52, color="k", ls=":", lw=1)
axes[1].text(len(groups) - 0.5, 2.0**-52 * 1.5, "float64 eps", ha="right", fontsize=8)
axes[1].set_yscale("log")
axes[1].set_ylim(1e-17, 1e-13)
axes[1].set_xticks(pos, groups, rotation=45, fontsize=8)
axes[1].set_ylabel("max relative difference of the gradient")
axes[1].set_title("Gradients w.r.t. Pre-LN parameters")
axes[1].legend(fontsize=8)
for label, marker in [("Pre-RMSNorm", "o-"), ("Pre-CRMSNorm", "s--")]:
    axes[2].semilogy(depths, depth_rel[label], marker, label=label)
axes[2].axhline(2.0**-52, color="k", ls=":", lw=1)
axes[2].set_ylim(1e-17, 1e-12)
axes[2].set_xlabel("layers")
axes[2].set_ylabel("max relative difference of the logits")
axes[2].set_title("Outputs vs Pre-LN, by depth")
axes[2].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %%
# What breaks the equivalence: anything that writes into the stream without being re-centred
# (an extra bias, an adapter), a norm that reads the stream with a different :math:`\epsilon`
# or with :math:`\epsilon` outside the square root, and Post-LN, where the stream itself is
# normalized (:func:`~refnorm.nn.to_pre_rmsnorm` refuses any model but Pre-LN). The next
# question, where to put the norms in the first place, is :ref:`tutorial 5
# <sphx_glr_auto_tutorials_05_models_plot_05_norm_placement.py>`.
