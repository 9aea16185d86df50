r"""The optimizers' equations, written a second time, deliberately plainly.

These are the independent formulations that each record's ``check`` compares the vectorised
optimizers against (``refnorm verify`` runs those checks). They are written from the equations, not
from the vectorised code: one Python float at a time, sums as explicit loops, the bias-corrected
moments :math:`\hat m, \hat v` formed as in the papers' algorithm boxes, the projection as the
textbook :math:`\Pi_w(x) = x - (\hat w \cdot x)\,\hat w` row by row. They are slow on purpose and
only ever run on a few small arrays.

Each ``*_reference(params, grads_seq, **hyper)`` runs a whole sequence of steps from the initial
state, with the gradients given, and returns one dict per step: ``"params"``, the state buffers
under the names the vectorised state uses, and for SGDP/AdamP the projection decisions.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["sgd_reference", "adam_reference", "sgdp_reference", "adamp_reference", "project"]


def _flat(a: np.ndarray) -> list[float]:
    return [float(x) for x in np.asarray(a).ravel()]


def _arrays(flats: list[list[float] | None], shapes: Sequence[tuple]):
    return [None if f is None else np.array(f, dtype=np.float64).reshape(s)
            for f, s in zip(flats, shapes)]


def sgd_reference(params, grads_seq, *, lr=1e-3, momentum=0.0, dampening=0.0,
                  weight_decay=0.0, nesterov=False, maximize=False):
    """SGD as the PyTorch docs' pseudo-code writes it, one element at a time."""
    shapes = [p.shape for p in params]
    theta = [_flat(p) for p in params]
    buf: list[list[float] | None] = [None] * len(params)
    out = []
    for grads in grads_seq:
        for i, grad in enumerate(grads):
            g_all = _flat(grad)
            new_buf = []
            for k, g in enumerate(g_all):
                if maximize:
                    g = -g
                g = g + weight_decay * theta[i][k]
                if momentum != 0:
                    b = g if buf[i] is None else momentum * buf[i][k] + (1 - dampening) * g
                    new_buf.append(b)
                    g = g + momentum * b if nesterov else b
                theta[i][k] = theta[i][k] - lr * g
            buf[i] = new_buf if momentum != 0 else None
        out.append({"params": _arrays(theta, shapes),
                    "momentum_buffer": _arrays([None if b is None else list(b) for b in buf],
                                               shapes)})
    return out


def adam_reference(params, grads_seq, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                   weight_decay=0.0, amsgrad=False, maximize=False, decoupled=False):
    r"""Adam (Kingma & Ba, Algorithm 1), optionally AMSGrad and AdamW, elementwise.

    :math:`\hat m = m/(1-\beta_1^t)`, :math:`\hat v = v/(1-\beta_2^t)` (for AMSGrad the running
    maximum of the raw :math:`v`, then bias-corrected), :math:`\theta \leftarrow \theta - \eta
    \hat m/(\sqrt{\hat v} + \epsilon)`. ``decoupled`` gives AdamW's
    :math:`\theta \leftarrow \theta(1 - \eta\lambda)` instead of the L2 term in the gradient.
    """
    beta1, beta2 = betas
    shapes = [p.shape for p in params]
    theta = [_flat(p) for p in params]
    m = [[0.0] * len(t) for t in theta]
    v = [[0.0] * len(t) for t in theta]
    vmax = [[0.0] * len(t) for t in theta]
    out = []
    for t, grads in enumerate(grads_seq, start=1):
        for i, grad in enumerate(grads):
            for k, g in enumerate(_flat(grad)):
                if maximize:
                    g = -g
                if weight_decay != 0:
                    if decoupled:
                        theta[i][k] = theta[i][k] * (1 - lr * weight_decay)
                    else:
                        g = g + weight_decay * theta[i][k]
                m[i][k] = beta1 * m[i][k] + (1 - beta1) * g
                v[i][k] = beta2 * v[i][k] + (1 - beta2) * g * g
                m_hat = m[i][k] / (1 - beta1 ** t)
                if amsgrad:
                    vmax[i][k] = max(vmax[i][k], v[i][k])
                    v_hat = vmax[i][k] / (1 - beta2 ** t)
                else:
                    v_hat = v[i][k] / (1 - beta2 ** t)
                theta[i][k] = theta[i][k] - lr * m_hat / (math.sqrt(v_hat) + eps)
        out.append({
            "params": _arrays(theta, shapes),
            "exp_avg": _arrays(m, shapes),
            "exp_avg_sq": _arrays(v, shapes),
            "max_exp_avg_sq": _arrays(vmax, shapes) if amsgrad else None,
        })
    return out


def project(p: list[float], shape: tuple, grad: list[float], update: list[float],
            *, delta: float, wd_ratio: float, eps: float):
    r"""The SGDP/AdamP projection, written with loops over rows and elements.

    Returns ``(update, view, wd_factor)``. A view splits the flattened weight into rows: one row
    per output channel (``"channel"``), then the whole weight as one row (``"layer"``). The first
    view in which every row passes :math:`|\cos(g_r, w_r)| < \delta/\sqrt{D}` (:math:`D` = row
    length) is used: each row of the update loses its component along
    :math:`\hat w_r = w_r/(\lVert w_r\rVert + \epsilon)`.
    """
    n = len(p)
    if len(shape) <= 1 or n == 0:
        return list(update), None, 1.0
    for view, rows in (("channel", shape[0]), ("layer", 1)):
        length = n // rows
        passes = True
        for r in range(rows):
            w_r = p[r * length:(r + 1) * length]
            g_r = grad[r * length:(r + 1) * length]
            dot = 0.0
            for a, b in zip(g_r, w_r):
                dot += a * b
            norm_g = math.sqrt(sum(a * a for a in g_r))
            norm_w = math.sqrt(sum(b * b for b in w_r))
            cosine = abs(dot) / (max(norm_g, eps) * max(norm_w, eps))
            if not cosine < delta / math.sqrt(length):
                passes = False
        if passes:
            new = list(update)
            for r in range(rows):
                lo = r * length
                w_r = p[lo:lo + length]
                norm_w = math.sqrt(sum(b * b for b in w_r)) + eps
                w_hat = [b / norm_w for b in w_r]
                radial = 0.0
                for k in range(length):
                    radial += w_hat[k] * update[lo + k]
                for k in range(length):
                    new[lo + k] = update[lo + k] - radial * w_hat[k]
            return new, view, wd_ratio
    return list(update), None, 1.0


def sgdp_reference(params, grads_seq, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                   nesterov=False, eps=1e-8, delta=0.1, wd_ratio=0.1, project_buffer=True):
    """SGDP (Heo et al. 2021) with the official code's conventions, elementwise.

    With ``project_buffer`` (the official ``sgdp.py``, where ``d_p`` *is* ``buf`` without
    Nesterov and is projected in place) the buffer becomes the projected update; without it
    (the paper's Algorithm 1) only the update is projected.
    """
    shapes = [p.shape for p in params]
    theta = [_flat(p) for p in params]
    buf = [[0.0] * len(t) for t in theta]  # the official code starts the buffer at zero
    out = []
    for grads in grads_seq:
        views, ratios = [], []
        for i, grad in enumerate(grads):
            g = _flat(grad)
            update = []
            for k in range(len(g)):
                buf[i][k] = momentum * buf[i][k] + (1 - dampening) * g[k]
                update.append(g[k] + momentum * buf[i][k] if nesterov else buf[i][k])
            update, view, ratio = project(theta[i], shapes[i], g, update,
                                          delta=delta, wd_ratio=wd_ratio, eps=eps)
            if project_buffer and not nesterov:
                buf[i] = list(update)
            views.append(view)
            ratios.append(ratio)
            for k in range(len(g)):
                if weight_decay != 0:
                    theta[i][k] = theta[i][k] * (1 - lr * weight_decay * ratio / (1 - momentum))
                theta[i][k] = theta[i][k] - lr * update[k]
        out.append({"params": _arrays(theta, shapes), "momentum_buffer": _arrays(buf, shapes),
                    "projection": tuple(views), "wd_ratio_applied": tuple(ratios)})
    return out


def adamp_reference(params, grads_seq, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                    weight_decay=0.0, delta=0.1, wd_ratio=0.1, nesterov=False):
    r"""AdamP (Heo et al. 2021) with the official code's conventions, elementwise.

    The projected quantity is the whole Adam direction :math:`\hat m/(\sqrt{\hat v}+\epsilon)`
    (times :math:`1-\beta_1^t`, which is a scalar and commutes with the projection).
    """
    beta1, beta2 = betas
    shapes = [p.shape for p in params]
    theta = [_flat(p) for p in params]
    m = [[0.0] * len(t) for t in theta]
    v = [[0.0] * len(t) for t in theta]
    out = []
    for t, grads in enumerate(grads_seq, start=1):
        views, ratios = [], []
        for i, grad in enumerate(grads):
            g = _flat(grad)
            direction = []
            for k in range(len(g)):
                m[i][k] = beta1 * m[i][k] + (1 - beta1) * g[k]
                v[i][k] = beta2 * v[i][k] + (1 - beta2) * g[k] * g[k]
                v_hat = v[i][k] / (1 - beta2 ** t)
                # Nesterov: look one step ahead with the next first moment.
                m_used = beta1 * m[i][k] + (1 - beta1) * g[k] if nesterov else m[i][k]
                direction.append(m_used / (math.sqrt(v_hat) + eps))
            direction, view, ratio = project(theta[i], shapes[i], g, direction,
                                             delta=delta, wd_ratio=wd_ratio, eps=eps)
            views.append(view)
            ratios.append(ratio)
            for k in range(len(g)):
                if weight_decay > 0:
                    theta[i][k] = theta[i][k] * (1 - lr * weight_decay * ratio)
                theta[i][k] = theta[i][k] - lr / (1 - beta1 ** t) * direction[k]
        out.append({"params": _arrays(theta, shapes), "exp_avg": _arrays(m, shapes),
                    "exp_avg_sq": _arrays(v, shapes), "projection": tuple(views),
                    "wd_ratio_applied": tuple(ratios)})
    return out
