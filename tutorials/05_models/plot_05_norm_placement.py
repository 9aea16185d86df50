r"""
Where the norm goes: activations and gradients across depth
===========================================================

A Transformer block adds a sub-layer :math:`F` (attention or MLP) to a residual stream
:math:`x`. Where the normalization sits decides what happens to :math:`x` as the model gets
deeper, already at initialization:

* **Post-LN** (Vaswani et al. 2017): :math:`x \leftarrow \mathrm{LN}(x + F(x))`;
* **Pre-LN** (Xiong et al. 2020): :math:`x \leftarrow x + F(\mathrm{LN}(x))`;
* **Peri-LN** (Kim et al. 2025): :math:`x \leftarrow x + \mathrm{LN}(F(\mathrm{LN}(x)))`;
* **Mix-LN** (Li et al. 2024): Post-LN in the first quarter of the blocks, Pre-LN after;
* **Pre-LN with LayerNorm Scaling** (Sun et al. 2025, "The Curse of Depth"): Pre-LN with the
  output of the norm of block :math:`\ell` multiplied by :math:`1/\sqrt\ell`.

This tutorial

1. writes a block of each kind in plain NumPy and checks it against
   :class:`refnorm.nn.TransformerBlock` with the same weights;
2. runs randomly initialized 24-layer :class:`refnorm.nn.Transformer` models block by block,
   and measures the variance of the residual stream, how much each block changes it, and the
   gradient norms, layer by layer;
3. explains the curves with a two-line recurrence.

The models are described in :doc:`/howto/nn`; the LayerNorm backward that every gradient here
goes through is :doc:`/derivations/layer_norm`.
"""
import matplotlib.pyplot as plt
import numpy as np

import refnorm.nn as nn
from refnorm.autograd import gradients

# %%
# A block in plain NumPy
# ----------------------
#
# The attention is causal multi-head attention with one :math:`(3d, d)` input projection
# (q, k, v in that order, as ``torch.nn.MultiheadAttention``), the MLP is
# :math:`W_2\,\mathrm{ReLU}(W_1 x + b_1) + b_2`. ``p`` maps the names of a block's parameters
# (as :meth:`refnorm.nn.Module.named_parameters` gives them) to arrays.


def layer_norm(x, weight, bias, eps=1e-5):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * weight + bias


def attention(x, p, heads):
    b, t, d = x.shape
    q, k, v = np.split(x @ p["attn.qkv.weight"].T + p["attn.qkv.bias"], 3, axis=-1)
    q, k, v = (a.reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3) for a in (q, k, v))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    a = np.exp(scores - scores.max(axis=-1, keepdims=True))
    a /= a.sum(axis=-1, keepdims=True)
    context = (a @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    return context @ p["attn.out.weight"].T + p["attn.out.bias"]


def mlp(x, p):
    h = np.maximum(x @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"], 0)
    return h @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]


def block(x, p, placement, heads, scale=1.0):
    def norm(name, v):
        return layer_norm(v, p[name + ".weight"], p[name + ".bias"])

    if placement == "post":
        h = norm("norm1", x + attention(x, p, heads))
        return norm("norm2", h + mlp(h, p))
    if placement == "pre":
        h = x + attention(scale * norm("norm1", x), p, heads)
        return h + mlp(scale * norm("norm2", h), p)
    # peri: a norm on the sub-layer's input and on its output
    h = x + norm("norm1_out", attention(scale * norm("norm1", x), p, heads))
    return h + norm("norm2_out", mlp(scale * norm("norm2", h), p))


# %%
# The five models
# ---------------
#
# Depth 24, width 32, 4 heads, sequences of 16 tokens from a vocabulary of 64, PyTorch's
# initializations (:math:`N(0,1)` embeddings, linear layers :math:`U(\pm 1/\sqrt{\text{in}})`,
# LayerNorm :math:`\gamma=1,\beta=0`). Mix-LN's first :math:`\lfloor 0.25 \cdot 24\rfloor = 6`
# blocks are Post-LN.

VOCAB, D, HEADS, DEPTH, T, BATCH = 64, 32, 4, 24, 16, 8
CONFIGS = {"Post-LN": dict(placement="post"), "Pre-LN": dict(placement="pre"),
           "Peri-LN": dict(placement="peri"), "Mix-LN": dict(placement="mix"),
           "Pre-LN + LN Scaling": dict(placement="pre", depth_scaling=True)}


def make(config, seed):
    return nn.Transformer(VOCAB, D, HEADS, DEPTH, T, rng=seed, **CONFIGS[config])


def block_params(model, i):
    prefix = f"blocks.{i}."
    return {n[len(prefix):]: p.data for n, p in model.named_parameters() if n.startswith(prefix)}


# %%
# Every block of every model against the NumPy version, on the model's own residual stream
# (relative to the largest output):

rng = np.random.default_rng(0)
tokens = rng.integers(0, VOCAB, (BATCH, T))
targets = rng.integers(0, VOCAB, (BATCH, T))
for config in CONFIGS:
    model = make(config, seed=1)
    x = model.tok(tokens) + model.pos[:T]
    worst = 0.0
    for i, b in enumerate(model.blocks):
        y = b(x)
        y_plain = block(x.data, block_params(model, i), b.placement, HEADS, b.scale)
        worst = max(worst, np.max(np.abs(y.data - y_plain)) / np.max(np.abs(y_plain)))
        x = y
    print(f"{config:20s} {model.placements[0]}..{model.placements[-1]}, "
          f"scales {model.blocks[0].scale:.3f}..{model.blocks[-1].scale:.3f}: "
          f"refnorm vs NumPy {worst:.1e}")

# %%
# Measuring depth
# ---------------
#
# Run the model block by block (what :meth:`refnorm.nn.Transformer.forward` does), keep each
# block's output :math:`x_\ell`, take the mean cross-entropy against random targets, and ask the
# engine (:func:`refnorm.autograd.gradients`) for the gradient with respect to every
# :math:`x_\ell` and every parameter. Per layer :math:`\ell`:
#
# * the variance of :math:`x_\ell` (over all tokens and coordinates);
# * the relative update :math:`\lVert x_\ell - x_{\ell-1}\rVert / \lVert x_{\ell-1}\rVert`: how
#   far the block moves the stream (near 0, the block is close to the identity);
# * the norm of :math:`\partial L/\partial x_\ell`, and of the gradient of all of block
#   :math:`\ell`'s parameters together.
#
# Averaged over 3 random initializations.


def depth_profile(model):
    x = model.tok(tokens) + model.pos[:T]
    states = [x]
    for b in model.blocks:
        states.append(b(states[-1]))
    out = states[-1]
    if "final_norm" in model._modules:
        out = model.final_norm(out)
    loss = nn.cross_entropy(model.head(out), targets)
    names, params = zip(*model.named_parameters())
    grads = gradients(loss, list(states) + list(params))
    g_states, g_params = grads[:len(states)], dict(zip(names, grads[len(states):]))
    var = [s.data.var() for s in states]
    step = [np.linalg.norm(b.data - a.data) / np.linalg.norm(a.data)
            for a, b in zip(states[:-1], states[1:])]
    g_x = [np.linalg.norm(g) for g in g_states]
    g_w = [np.sqrt(sum(np.sum(g ** 2) for n, g in g_params.items()
                       if n.startswith(f"blocks.{i}."))) for i in range(DEPTH)]
    return np.array(var), np.array(step), np.array(g_x), np.array(g_w)


SEEDS = (1, 2, 3)
profiles = {c: np.mean([np.concatenate(depth_profile(make(c, s))) for s in SEEDS], axis=0)
            for c in CONFIGS}
split = np.cumsum([DEPTH + 1, DEPTH, DEPTH + 1])
results = {c: np.split(v, split) for c, v in profiles.items()}
print(f"{'':20s} {'var x_1':>8s} {'var x_24':>9s} {'update 24':>10s} "
      f"{'|grad W| 1/24':>14s}")
for c, (var, step, g_x, g_w) in results.items():
    print(f"{c:20s} {var[1]:8.2f} {var[-1]:9.2f} {step[-1]:10.3f} {g_w[0] / g_w[-1]:14.2f}")

fig, axes = plt.subplots(1, 3, figsize=(12.0, 3.8))
layers = np.arange(DEPTH + 1)
styles = {"Post-LN": "o-", "Pre-LN": "s-", "Peri-LN": "^-", "Mix-LN": "v-",
          "Pre-LN + LN Scaling": "D--"}
for c, (var, step, g_x, g_w) in results.items():
    kw = dict(ms=3, label=c)
    axes[0].semilogy(layers, var, styles[c], **kw)
    axes[1].semilogy(layers[1:], step, styles[c], **kw)
    axes[2].semilogy(layers[1:], g_w, styles[c], **kw)
axes[0].set_ylabel("variance of the residual stream $x_\\ell$")
axes[1].set_ylabel(r"$\|x_\ell - x_{\ell-1}\| / \|x_{\ell-1}\|$")
axes[2].set_ylabel(r"$\|\partial L / \partial W_\ell\|$ (block $\ell$)")
axes[0].set_title("Activations")
axes[1].set_title("How much each block changes $x$")
axes[2].set_title("Parameter gradients")
for ax in axes:
    ax.set_xlabel("layer $\\ell$")
axes[0].legend(fontsize=7)
fig.tight_layout()
plt.show()

# %%
# Reading the curves
# ------------------
#
# **Post-LN** normalizes the stream itself, so its variance stays at 1 and every block changes
# it by a lot; but the gradient reaching an early block passes through every later norm, and
# the parameter gradients grow toward the output (the last column of the table: the first
# block's gradient is smaller than the last one's). Xiong et al. (2020) show that these large
# gradients near the output are why Post-LN needs a learning-rate warm-up, and that Pre-LN's
# do not grow with depth: here they decrease slowly.
#
# **Pre-LN** never normalizes the stream: each block **adds** a sub-layer output whose size does
# not depend on :math:`x` (its input is normalized). With :math:`c` the variance one block adds,
#
# .. math::
#    \mathrm{Var}(x_\ell) \approx \mathrm{Var}(x_{\ell-1}) + c
#    \quad\Rightarrow\quad \mathrm{Var}(x_\ell) \approx \mathrm{Var}(x_0) + c\,\ell ,
#
# linear growth, and the relative update of block :math:`\ell` is about
# :math:`\sqrt{c/\mathrm{Var}(x_{\ell})}\propto 1/\sqrt\ell`: the deep blocks are close to the
# identity, the **Curse of Depth** (Sun et al. 2025): they contribute little, and pruning them
# costs little.
#
# **LayerNorm Scaling** multiplies the sub-layer input of block :math:`\ell` by
# :math:`1/\sqrt\ell`. The sub-layers are close to linear at this scale, so the variance added
# is about :math:`c/\ell`, and :math:`\mathrm{Var}(x_\ell) \approx \mathrm{Var}(x_0) +
# c\sum_{k\le\ell} 1/k`: logarithmic growth. The recurrence, against the measured Pre-LN
# curves, with :math:`c` fitted on the first block only:

for c, harmonic in [("Pre-LN", False), ("Pre-LN + LN Scaling", True)]:
    var = results[c][0]
    added = var[1] - var[0]
    k = np.arange(1, DEPTH + 1)
    predicted = var[0] + added * np.cumsum(1.0 / k if harmonic else np.ones(DEPTH))
    print(f"{c:20s} layer 24: measured {var[-1]:.2f}, recurrence {predicted[-1]:.2f}")

# %%
# LayerNorm Scaling also makes the deep blocks' increments, and so their updates and their
# parameter gradients, **smaller** at initialization (the dashed curves): what it buys is not a
# larger contribution at step 0 but a variance that cannot grow as fast during training, when
# Pre-LN's increments grow with the weights and its deep blocks drift toward the identity (the
# training-time measurements are the paper's). The fit is rough (attention and the ReLU are not
# linear, and the first block's increment is only an estimate of the average), but the two
# growth laws are there. **Peri-LN** normalizes
# each sub-layer's output before the add: the increment is fixed (its variance is
# :math:`\gamma^2 = 1` per sub-layer), so the stream grows linearly like Pre-LN's, but no
# sub-layer can write a huge value into it. **Mix-LN** keeps Post-LN's large updates in its
# first quarter, and Pre-LN's stable gradients after.
#
# These are properties at initialization; how they play out in training (where the norms'
# :math:`\gamma` and the sub-layers' weights change the increments) is what the papers measure.
# The same models, with RMSNorm instead of LayerNorm, are a one-argument change
# (``norm="rms_norm"``), and for Pre-LN the two are exactly equivalent: :ref:`tutorial 4
# <sphx_glr_auto_tutorials_02_normalization_plot_04_layernorm_rmsnorm_crmsnorm.py>`.
