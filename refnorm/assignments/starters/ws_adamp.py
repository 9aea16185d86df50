r"""Assignment 5: Weight Standardization and one AdamP step.

STARTER

Fill in the three functions below with NumPy. Then run ``python ws_adamp.py`` for a quick
self-check, and ``refnorm grade ws_adamp ws_adamp.py`` for the grade.

Weight Standardization
----------------------
Weight Standardization (Qiao et al., 2019, "Micro-Batch Training with Batch-Channel
Normalization and Weight Standardization") standardizes each output channel's filter of a
convolution (or each row of a linear weight) over its fan-in: for output channel :math:`o`
with the :math:`N = C_{in} k_h k_w` weights :math:`W_o`,

.. math::

    \mu = \frac1N \sum W_o, \qquad d = W_o - \mu, \qquad
    \sigma = \sqrt{\tfrac1N \textstyle\sum d^2} \ \text{(biased)}, \qquad
    s = \sigma + \epsilon, \qquad \hat W_o = d / s

with ``eps`` **outside** the square root, as in the official code's TensorFlow snippet
(``(w - mean) / (std + eps)``, ``eps=1e-5``). The backward, with :math:`G = \partial L /
\partial \hat W_o` and bars for means over the filter:

.. math::

    \frac{\partial L}{\partial W_o} = \frac{G - \overline{G}}{s}
        - \frac{d}{N \sigma s^2} \sum G \odot d

where the second term is 0 for a constant filter (:math:`\sigma = 0`, :math:`d = 0`).

AdamP
-----
AdamP (Heo et al., 2021, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
Scale-invariant Weights"; the official ``adamp`` package) is Adam with a projection. One step
``t`` (1 for the first) on a parameter ``p`` with gradient ``g``:

.. math::

    m = \beta_1 m + (1-\beta_1) g, \qquad v = \beta_2 v + (1-\beta_2) g^2, \qquad
    u = \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

(Nesterov: :math:`u = (\beta_1 m + (1-\beta_1) g) / (\ldots)` with the same denominator).
Projection, for ``p`` with 2 or more axes: in the *channel view* (one row per output channel,
``p.reshape(p.shape[0], -1)``) and then, if that fails, the *layer view* (one row,
``p.reshape(1, -1)``), compute per row the cosine
:math:`|\langle g_r, p_r\rangle| / (\max(\lVert g_r\rVert, \epsilon)
\max(\lVert p_r\rVert, \epsilon))`. In the first view where **every** row's cosine is below
:math:`\delta / \sqrt{D}` (:math:`D` the row length), the weight is taken to be
scale-invariant: each row of ``u`` loses its component along :math:`\hat p_r = p_r /
(\lVert p_r\rVert + \epsilon)` (:math:`u_r \leftarrow u_r - \langle \hat p_r, u_r\rangle
\hat p_r`), and the weight decay is multiplied by ``wd_ratio``. Parameters with 0 or 1 axis
are never projected. Then

.. math::

    p \leftarrow p\,(1 - \eta \lambda r_{wd}) - \frac{\eta}{1-\beta_1^t}\, u

with :math:`r_{wd}` = ``wd_ratio`` if projected, else 1 (decoupled decay as AdamW, applied
only when ``weight_decay > 0``). Return new arrays; never modify the inputs in place.
"""
import numpy as np


def weight_standardization_forward(weight, eps=1e-5):
    """Standardize each output channel's filter: returns ``(w_hat, cache)``."""
    raise NotImplementedError("your code here")


def weight_standardization_backward(dw_hat, cache):
    """The gradient with respect to the raw weight, from the gradient of ``w_hat``."""
    raise NotImplementedError("your code here")


def adamp_step(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
               weight_decay=0.0, delta=0.1, wd_ratio=0.1, nesterov=False):
    """One AdamP step number ``step`` (1 for the first); returns ``(new_param, new_exp_avg,
    new_exp_avg_sq)``."""
    raise NotImplementedError("your code here")


def _self_check(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 3, 3, 3))
    w_hat, cache = weight_standardization_forward(w)
    rows = w_hat.reshape(4, -1)
    print("w_hat per filter: means ~0:", np.allclose(rows.mean(axis=1), 0),
          " std ~1:", np.allclose(rows.std(axis=1), 1, atol=1e-4))
    dy = rng.standard_normal(w.shape)
    dw = weight_standardization_backward(dy, cache)
    num = np.zeros_like(w)
    for i in range(w.size):
        for sign in (1, -1):
            wp = w.copy()
            wp.flat[i] += sign * 1e-6
            num.flat[i] += sign * np.sum(weight_standardization_forward(wp)[0] * dy) / 2e-6
    print("WS backward: max |analytic - numerical| =", f"{np.abs(num - dw).max():.1e}")
    # a gradient orthogonal to every filter: AdamP removes the radial part of the update
    g = rng.standard_normal(w.shape).reshape(4, -1)
    wr = w.reshape(4, -1)
    g = (g - (g * wr).sum(1, keepdims=True) / (wr * wr).sum(1, keepdims=True) * wr)
    new, m, v = adamp_step(w, g.reshape(w.shape), np.zeros_like(w), np.zeros_like(w), 1)
    radial = ((new - w).reshape(4, -1) * wr).sum(axis=1)
    print("AdamP step on a scale-invariant weight is tangential:", np.allclose(radial, 0))


if __name__ == "__main__":
    _self_check()
