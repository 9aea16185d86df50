"""NumPy kernels of LayerNorm, RMSNorm and the fused residual-add norms, as oracle candidates.

Written here from the formulas (not from refnorm's code), the way a GPU kernel computes:
float32 arithmetic (float64 for float64 candidates); for the fused norms, s = x + residual
rounded once to its storage format (float32 with ``residual_in_fp32``, else the candidate
dtype) and the norm of the stored s (FlashAttention's ``layer_norm_ref``); every output rounded
once to its format. Flags make one deliberate convention change each:

* ``return_s=False``: the prenorm output s is not returned;
* ``round_s=True``: s is stored in the input dtype even under ``residual_in_fp32``;
* ``recompute=True``: a memory-saving backward (Apex's ``memory_efficient=True``): xhat is
  recomputed from the output y, rounded to the candidate dtype, as (y - bias) / weight.
"""
from __future__ import annotations

import numpy as np

from refnorm.oracle.formats import FORMATS, get_format, round_to

VARIANTS = ("layer_norm", "rms_norm", "add_rms_norm", "add_layer_norm")


def kernel(variant, inputs, dy, kwargs, *, dtype, return_s=True, round_s=False,
           recompute=False):
    if kwargs.get("eps_placement", "inside") != "inside":
        raise NotImplementedError("eps outside the square root")
    fused = variant.startswith("add_")
    fmt = get_format(dtype)
    T = np.float64 if fmt.name == "float64" else np.float32
    if fused:
        s_fmt = FORMATS["float32"] if kwargs.get("residual_in_fp32") and fmt.p < 24 \
            and not round_s else fmt
        s = round_to(inputs["x"].astype(T) + inputs["residual"].astype(T), s_fmt).astype(T)
        dys = dy
    else:
        s, dys = inputs["x"].astype(T), {"y": dy}
    nd = len(np.atleast_1d(kwargs["normalized_shape"]))
    n = int(np.prod(s.shape[s.ndim - nd:]))
    rows = s.reshape(-1, n)
    eps = T(kwargs["eps"])
    w = inputs.get("weight")
    w = np.ones(n, T) if w is None else w.astype(T).reshape(-1)
    b = inputs.get("bias")
    b = np.zeros(n, T) if b is None else b.astype(T).reshape(-1)
    centred = variant in ("layer_norm", "add_layer_norm")
    if centred:
        d = rows - rows.mean(axis=1, keepdims=True, dtype=T)
        r = 1 / np.sqrt(np.mean(d * d, axis=1, keepdims=True, dtype=T) + eps)
        xhat = d * r
    else:
        r = 1 / np.sqrt(np.mean(rows * rows, axis=1, keepdims=True, dtype=T) + eps)
        xhat = rows * r
    y = round_to((xhat * w + b).astype(np.float64), fmt)
    if recompute:  # the backward sees only the saved y (in the dtype), the weight and the bias
        with np.errstate(all="ignore"):
            xhat = (y.astype(T) - b) / w
    dyr = dys["y"].astype(T).reshape(rows.shape)
    g = dyr * w
    k = np.mean(g * xhat, axis=1, keepdims=True, dtype=T)
    dx = r * (g - xhat * k - (np.mean(g, axis=1, keepdims=True, dtype=T) if centred else 0))
    if fused:
        dx = dx + dys["s"].astype(T).reshape(rows.shape)
    out = {"dx": dx.reshape(s.shape)}
    if fused:
        out["dresidual"] = out["dx"]
    if "weight" in inputs:
        out["dweight"] = np.sum(dyr * xhat, axis=0, dtype=T).reshape(inputs["weight"].shape)
    if "bias" in inputs:
        out["dbias"] = np.sum(dyr, axis=0, dtype=T).reshape(inputs["bias"].shape)
    out = {k: round_to(v.astype(np.float64), fmt) for k, v in out.items()}
    out["y"] = y.reshape(s.shape)
    if fused and return_s:
        out["s"] = round_to(s.astype(np.float64), s_fmt)
    return out


kernel.variants = VARIANTS


def flagged(**flags):
    """The kernel with ``flags`` set, as a candidate."""
    def candidate(variant, inputs, dy, kwargs, *, dtype):
        return kernel(variant, inputs, dy, kwargs, dtype=dtype, **flags)

    candidate.variants = VARIANTS
    candidate.__qualname__ = "kernel(" + ", ".join(f"{k}={v}" for k, v in flags.items()) + ")"
    return candidate
