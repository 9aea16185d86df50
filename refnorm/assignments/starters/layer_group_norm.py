r"""Assignment 3: LayerNorm and GroupNorm, forward and backward.

STARTER

Fill in the four functions below with NumPy. Then run ``python layer_group_norm.py`` for a
quick self-check, and ``refnorm grade layer_group_norm layer_group_norm.py`` for the grade.

Both layers standardize groups of values and then apply a per-element (LayerNorm) or
per-channel (GroupNorm) affine map. For one group of :math:`N` values, with the **biased**
variance and eps **inside** the square root (PyTorch's convention):

.. math::

    \mu = \frac1N \sum x, \qquad \sigma^2 = \frac1N \sum (x - \mu)^2, \qquad
    r = \frac{1}{\sqrt{\sigma^2 + \epsilon}}, \qquad \hat x = (x - \mu)\, r, \qquad
    y = \gamma \hat x + \beta

Backward, with :math:`g = \gamma\, dy` and bars for means over the group:

.. math::

    dx = r \bigl(g - \overline{g} - \hat x\, \overline{g \hat x}\bigr), \qquad
    d\gamma = \sum_{\text{batch}} dy\, \hat x, \qquad d\beta = \sum_{\text{batch}} dy

The three terms of ``dx`` are the direct path, the path through the mean and the path
through the variance; ``dweight`` and ``dbias`` sum over every axis that the parameter is
broadcast along.

LayerNorm (``torch.nn.functional.layer_norm``): the groups are the trailing
``normalized_shape`` axes of ``x`` (an int means one axis); ``weight`` and ``bias`` have shape
``normalized_shape``.

GroupNorm (``torch.nn.functional.group_norm``): ``x`` has shape ``(N, C, *spatial)``; the
``C`` channels are split into ``num_groups`` contiguous groups of ``C // num_groups`` channels
(channels ``0 .. C/G - 1`` form group 0), and each (sample, group) is one group of values;
``weight`` and ``bias`` have shape ``(C,)``, one value per channel.

Absent ``weight``/``bias`` (``None``) mean 1 and 0; return ``None`` for their gradients. Never
modify the inputs in place.
"""
import numpy as np


def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """LayerNorm forward: returns ``(y, cache)``."""
    raise NotImplementedError("your code here")


def layer_norm_backward(dy, cache):
    """LayerNorm backward: returns ``(dx, dweight, dbias)``."""
    raise NotImplementedError("your code here")


def group_norm_forward(x, num_groups, weight=None, bias=None, eps=1e-5):
    """GroupNorm forward: returns ``(y, cache)``."""
    raise NotImplementedError("your code here")


def group_norm_backward(dy, cache):
    """GroupNorm backward: returns ``(dx, dweight, dbias)``."""
    raise NotImplementedError("your code here")


def _check_grads(name, forward, backward, args, seed):
    """The backward against central differences of the forward, with a random dy."""
    rng = np.random.default_rng(seed)
    y, cache = forward(*args)
    dy = rng.standard_normal(y.shape)
    grads = backward(dy, cache)
    for k, (what, j) in enumerate((("x", 0), ("weight", 2), ("bias", 3))):
        num = np.zeros_like(args[j])
        for i in range(num.size):
            for sign in (1, -1):
                a = [v.copy() if isinstance(v, np.ndarray) else v for v in args]
                a[j].flat[i] += sign * 1e-6
                num.flat[i] += sign * np.sum(forward(*a)[0] * dy) / 2e-6
        err = np.max(np.abs(num - grads[k]))
        print(f"{name} d{what}: max |analytic - numerical| = {err:.1e}",
              "ok" if err < 1e-6 else "WRONG")


def _self_check(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 4, 5))
    w, b = rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    _check_grads("layer_norm", lambda x_, s, w_, b_: layer_norm_forward(x_, s, w_, b_),
                 layer_norm_backward, [x, (4, 5), w, b], seed)
    x = rng.standard_normal((2, 6, 3))
    w, b = rng.standard_normal(6), rng.standard_normal(6)
    _check_grads("group_norm", lambda x_, g, w_, b_: group_norm_forward(x_, g, w_, b_),
                 group_norm_backward, [x, 3, w, b], seed)


if __name__ == "__main__":
    _self_check()
