r"""Assignment 4: RMSNorm, forward and backward, with the eps placement as a parameter.

REFERENCE SOLUTION (for staff)

Fill in the two functions below with NumPy. Then run ``python rms_norm.py`` for a quick
self-check, and ``refnorm grade rms_norm rms_norm.py`` for the grade.

RMSNorm (Zhang & Sennrich, 2019) rescales each row by its root mean square, without
centering it. Over the trailing ``normalized_shape`` axes (:math:`N` values per row):

.. math::

    \nu = \frac1N \sum x^2, \qquad
    r = \begin{cases} 1/\sqrt{\nu + \epsilon} & \texttt{eps\_placement="inside"}
        \text{ (PyTorch, the authors' TF code, LLaMA)} \\
        1/(\sqrt{\nu} + \epsilon) & \texttt{eps\_placement="outside"}
        \text{ (the authors' PyTorch code)} \end{cases}, \qquad
    \hat x = x\, r, \qquad y = \gamma \hat x

``eps=None`` means the machine epsilon of ``x``'s dtype (``np.finfo(x.dtype).eps``), as
``torch.nn.functional.rms_norm``. There is no bias.

Backward, with :math:`g = \gamma\, dy` and bars for row means:

.. math::

    \text{inside:}\quad dx = r\,\bigl(g - \hat x\, \overline{g \hat x}\bigr), \qquad
    \text{outside:}\quad dx = r\, g - \frac{r^2}{\sqrt{\nu}}\, x\, \overline{g x}

(for "outside", the second term is 0 on a row of zeros, where :math:`\sqrt\nu = 0`), and
:math:`d\gamma = \sum_{\text{batch}} dy\, \hat x`. Return ``None`` for ``dweight`` when
``weight`` is ``None``. Never modify the inputs in place.
"""
import numpy as np


def rms_norm_forward(x, normalized_shape, weight=None, eps=None, eps_placement="inside"):
    """RMSNorm forward: returns ``(y, cache)``."""
    # BEGIN SOLUTION
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    if eps is None:
        eps = float(np.finfo(x.dtype).eps)
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    ms = (x * x).mean(axis=axes, keepdims=True)
    if eps_placement == "inside":
        r = 1.0 / np.sqrt(ms + eps)
    elif eps_placement == "outside":
        r = 1.0 / (np.sqrt(ms) + eps)
    else:
        raise ValueError(f"eps_placement must be 'inside' or 'outside', got {eps_placement!r}")
    xhat = x * r
    y = xhat * weight if weight is not None else xhat
    return y, (x, xhat, r, np.sqrt(ms), weight, axes, eps_placement)
    # END SOLUTION


def rms_norm_backward(dy, cache):
    """RMSNorm backward: returns ``(dx, dweight)``."""
    # BEGIN SOLUTION
    x, xhat, r, rms, weight, axes, placement = cache
    g = dy * weight if weight is not None else dy
    if placement == "inside":
        dx = r * (g - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    else:
        safe = np.where(rms > 0, rms, 1.0)
        coef = np.where(rms > 0, r * r / safe, 0.0)
        dx = r * g - coef * x * (g * x).mean(axis=axes, keepdims=True)
    batch = tuple(range(dy.ndim - len(axes)))
    dweight = (dy * xhat).sum(axis=batch) if weight is not None else None
    return dx, dweight
    # END SOLUTION


def _self_check(seed=0):
    """The backward against central differences of the forward, for both placements."""
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((3, 6)), rng.standard_normal(6)
    for placement in ("inside", "outside"):
        def f(x_, w_):
            return rms_norm_forward(x_, 6, w_, 1e-3, eps_placement=placement)[0]
        y, cache = rms_norm_forward(x, 6, w, 1e-3, eps_placement=placement)
        dy = rng.standard_normal(y.shape)
        grads = rms_norm_backward(dy, cache)
        for what, k in (("x", 0), ("weight", 1)):
            args = [x, w]
            num = np.zeros_like(args[k])
            for i in range(num.size):
                for sign in (1, -1):
                    a = [v.copy() for v in args]
                    a[k].flat[i] += sign * 1e-6
                    num.flat[i] += sign * np.sum(f(*a) * dy) / 2e-6
            err = np.max(np.abs(num - grads[k]))
            print(f"eps_placement={placement!r:9} d{what}: max |analytic - numerical| = "
                  f"{err:.1e}", "ok" if err < 1e-6 else "WRONG")


if __name__ == "__main__":
    _self_check()
