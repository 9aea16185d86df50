r"""Assignment 2: BatchNorm, forward and backward, in training and in evaluation.

REFERENCE SOLUTION (for staff)

Fill in the two functions below with NumPy (no loops over elements needed). Then run
``python batch_norm.py`` for a quick self-check, and ``refnorm grade batch_norm batch_norm.py``
for the full grade.

Conventions (those of ``torch.nn.functional.batch_norm``)
----------------------------------------------------------
``x`` has shape ``(N, C)`` or ``(N, C, *spatial)``; the statistics of channel ``c`` are taken
over every axis but the channel axis 1, that is over the ``m = N * prod(spatial)`` values of
the channel.

Training (``training=True``, or no running statistics), with the **biased** variance:

.. math::

    \mu_c = \frac1m \sum x, \qquad \sigma^2_c = \frac1m \sum (x-\mu_c)^2, \qquad
    \hat x = \frac{x-\mu_c}{\sqrt{\sigma^2_c + \epsilon}}, \qquad
    y = \gamma_c \hat x + \beta_c

Evaluation (``training=False`` with running statistics) uses ``running_mean`` and
``running_var`` in place of :math:`\mu_c` and :math:`\sigma^2_c`: ``y`` is then an affine
function of ``x``.

Running statistics (training only, when ``running_mean`` is given). With ``t =
num_batches_tracked + 1`` and ``f = momentum`` (or ``f = 1/t`` when ``momentum is None``, a
cumulative average):

.. math::

    \text{new mean} = (1-f)\,\text{running\_mean} + f\,\mu_c, \qquad
    \text{new var} = (1-f)\,\text{running\_var} + f\,\frac{m}{m-1}\sigma^2_c

Note the two conventions: PyTorch's momentum weighs the *new* batch (TensorFlow's weighs the
old running value), and the running variance stores the **unbiased** batch variance while
the normalization uses the biased one. Return new arrays: never modify the inputs in place.

Backward, with :math:`g = \gamma \, dy`, in training:

.. math::

    dx = \frac{1}{\sqrt{\sigma^2+\epsilon}} \Bigl(g - \overline{g} - \hat x \,
    \overline{g \hat x}\Bigr), \qquad d\gamma = \sum dy \, \hat x, \qquad
    d\beta = \sum dy

(the bars are means over the channel's ``m`` values, the sums are over the same axes); in
evaluation :math:`dx = g / \sqrt{\text{running\_var} + \epsilon}`.
"""
import numpy as np


def batch_norm_forward(x, running_mean, running_var, weight=None, bias=None, training=False,
                       momentum=0.1, eps=1e-5, num_batches_tracked=0):
    """BatchNorm forward.

    Parameters
    ----------
    x : ndarray, shape (N, C) or (N, C, *spatial)
    running_mean, running_var : ndarray of shape (C,), or None (no running statistics)
    weight, bias : ndarray of shape (C,), or None (1 and 0)
    training : bool
    momentum : float or None
    eps : float
    num_batches_tracked : int

    Returns
    -------
    y : ndarray, the shape of x
    new_state : tuple (new_running_mean, new_running_var, new_num_batches_tracked)
        The updated running statistics in training; the given ones, unchanged, in evaluation
        (``None``, ``None`` and the count when there are no running statistics).
    cache : anything your backward needs
    """
    # BEGIN SOLUTION
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    use_batch = training or running_mean is None
    if use_batch:
        mu = x.mean(axis=axes)
        var = ((x - mu.reshape(shape)) ** 2).mean(axis=axes)
    else:
        mu, var = running_mean, running_var
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mu.reshape(shape)) * rstd.reshape(shape)
    y = xhat * weight.reshape(shape) if weight is not None else xhat
    if bias is not None:
        y = y + bias.reshape(shape)
    new_mean, new_var, t = running_mean, running_var, num_batches_tracked
    if training and running_mean is not None:
        t = num_batches_tracked + 1
        f = 1.0 / t if momentum is None else momentum
        m = x.size // x.shape[1]
        new_mean = (1 - f) * running_mean + f * mu
        new_var = (1 - f) * running_var + f * var * m / (m - 1)
    cache = (xhat, rstd, weight, bias is not None, use_batch, axes, shape)
    return y, (new_mean, new_var, t), cache
    # END SOLUTION


def batch_norm_backward(dy, cache):
    """BatchNorm backward: returns ``(dx, dweight, dbias)`` (``None`` for an absent weight or
    bias)."""
    # BEGIN SOLUTION
    xhat, rstd, weight, has_bias, use_batch, axes, shape = cache
    g = dy * weight.reshape(shape) if weight is not None else dy
    r = rstd.reshape(shape)
    if use_batch:
        dx = r * (g - g.mean(axis=axes, keepdims=True)
                  - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    else:
        dx = g * r
    dweight = (dy * xhat).sum(axis=axes) if weight is not None else None
    dbias = dy.sum(axis=axes) if has_bias else None
    return dx, dweight, dbias
    # END SOLUTION


def _self_check(seed=0):
    """Your backward against finite differences of your forward, and two properties."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 3, 5))
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    rm, rv = np.zeros(3), np.ones(3)
    for training in (True, False):
        def f(x_, w_, b_):
            return batch_norm_forward(x_, rm, rv, w_, b_, training=training)[0]
        y, state, cache = batch_norm_forward(x, rm, rv, w, b, training=training)
        dy = rng.standard_normal(y.shape)
        grads = batch_norm_backward(dy, cache)
        for name, arg, grad in zip(("x", "weight", "bias"), range(3), grads):
            args = [x, w, b]
            num = np.zeros_like(args[arg])
            for i in range(num.size):
                for sign in (1, -1):
                    a = [v.copy() for v in args]
                    a[arg].flat[i] += sign * 1e-6
                    num.flat[i] += sign * np.sum(f(*a) * dy) / 2e-6
            err = np.max(np.abs(num - grad))
            print(f"training={training!s:5} d{name}: max |analytic - numerical| = {err:.1e}",
                  "ok" if err < 1e-6 else "WRONG")
    y = batch_norm_forward(x, rm, rv, training=True)[0]
    print("training output: channel means ~0:", np.allclose(y.mean(axis=(0, 2)), 0),
          " variances ~1:", np.allclose(y.var(axis=(0, 2)), 1, atol=1e-3))
    new_mean = batch_norm_forward(x, rm, rv, training=True, momentum=0.1)[1][0]
    print("running_mean after one step = 0.1 * batch mean:",
          np.allclose(new_mean, 0.1 * x.mean(axis=(0, 2))))


if __name__ == "__main__":
    _self_check()
