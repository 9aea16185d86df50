"""Adapters: how the oracle calls a candidate implementation.

The protocol
============

A candidate is any Python callable with this signature::

    def candidate(variant: str, inputs: dict[str, np.ndarray], dy: np.ndarray,
                  kwargs: dict, *, dtype: str) -> dict[str, array-like]

``variant``
    the record's name (``"layer_norm"``, ``"batch_norm"``, ...; ``refnorm list`` shows them).
``inputs``
    the differentiable inputs by the record's names (``x``, ``weight``, ``bias``; ``v``, ``g``
    for weight norm). Absent optional inputs (no ``bias``) are simply not in the dict.
``dy``
    the upstream gradient of ``y``; for a variant with several outputs (``add_rms_norm`` and
    ``add_layer_norm`` return ``y`` and the residual sum ``s``), a dict of the upstream
    gradient of each output by its name, ``{"y": dy, "s": ds}``.
``kwargs``
    everything else, by the names of the refnorm forward (``normalized_shape``, ``eps``,
    ``num_groups``, ``running_mean``, ``training``, ...). ``refnorm.norms.<variant>`` documents
    each; they follow ``torch.nn.functional``.
``dtype``
    the candidate dtype: ``"float64"``, ``"float32"``, ``"float16"`` or ``"bfloat16"``.

Every float array it receives (inputs, ``dy``, float arrays in ``kwargs``) is a **float64 copy
whose values are exactly representable in dtype**: cast them to your dtype (``torch.tensor(a,
dtype=torch.bfloat16)`` is exact), run your forward and backward, and return a dict with

* ``"y"`` (and every other output of the variant by its name, ``"s"``), and ``"d" + name`` for
  every input received (``"dx"``, ``"dresidual"``, ``"dweight"``, ...): required;
* the new state of a stateful variant, by field name (``"running_mean"``, ``"running_var"``,
  ``"num_batches_tracked"``; ``"u"``, ``"v"`` for spectral norm): compared when present;
* ``"mean"`` and ``"rstd"``, the saved statistics: compared when present (any shape of the
  right size).

Values may be NumPy arrays of any float dtype, PyTorch tensors (any device, any dtype) or JAX
arrays: they are converted to float64. Raise ``NotImplementedError`` for a case you do not
support; it is reported as skipped, not failed. A candidate may carry a ``variants`` attribute
(a collection of names) to say which variants it implements, and a ``frozen`` attribute (input
names, ``("weight",)``) for the inputs whose gradient it does not compute (a frozen parameter,
as in LoRA fine-tuning): their gradient is then reported "not computed (frozen)" and
everything else is judged. A ``memory_efficient = True`` attribute declares a memory-saving
backward (LayerNorm, RMSNorm and the fused residual-add norms): one that saves ``y`` instead of
``x`` and recomputes ``xhat = (y - bias) / weight``, as Apex's
``FusedLayerNorm(memory_efficient=True)`` does; the tolerance then admits the error of that
recomputation (see :func:`refnorm.oracle.check`).

A candidate must not write into what it receives (``x``, the parameters, the state, ``dy``):
the oracle compares every array before and after the call and fails the case that wrote, with
its own diagnosis. (A backward that writes ``dx`` into the buffer of ``dy`` corrupts the other
branch's gradient wherever ``dy`` is shared, as in a residual block ``x + f(x)``.) The arrays it
receives are the oracle's copies: the reference's own inputs stay untouched whatever it does.

Two lines check a LayerNorm kernel written in PyTorch (a Triton kernel wrapped in an
``autograd.Function``, say) whose signature is refnorm's forward's (``x, normalized_shape,
weight, bias, eps``, keywords)::

    from refnorm.oracle import check, torch_function
    print(check(torch_function(my_layer_norm, device="cuda"), "layer_norm", dtype="bfloat16"))

Built in
========

``"torch"``: :class:`TorchAdapter`, every variant whose record has a ``torch_call`` (the
PyTorch equivalent), on ``device="cpu"`` or ``"cuda"``; for LayerNorm, GroupNorm and
BatchNorm in training it also returns PyTorch's saved ``mean`` and ``rstd``.
``"jax"``: :class:`JaxAdapter`, ``jax.numpy`` implementations of layer_norm, rms_norm,
group_norm, batch_norm and instance_norm, differentiated by ``jax.vjp``; float16 and bfloat16
inputs are computed in float32 and the results rounded, as Flax does.
``"module:function"``: any importable callable following the protocol.
"""
from __future__ import annotations

import importlib
import math
from typing import Callable

import numpy as np

from refnorm.oracle.formats import get_format

__all__ = ["Adapter", "TorchAdapter", "JaxAdapter", "CallableAdapter", "torch_function",
           "resolve", "to_numpy", "DeviceUnavailable", "AdapterError", "WRITES", "TORCH_INSTALL",
           "KNOWN_TORCH_BEHAVIOUR", "KNOWN_NOTE", "PROTOCOL_SIGNATURE"]

#: the reserved output key under which an adapter reports the writes it detected into the
#: tensors it made from the protocol's arrays: ``{name: how}`` (``{"dy": "values changed"}``)
WRITES = "__writes__"

#: the pinned install command of the tested PyTorch (named in the missing-torch message)
TORCH_INSTALL = "pip install torch==2.13.0"

#: the protocol's signature, quoted where a candidate's call fails as a signature mismatch
PROTOCOL_SIGNATURE = "candidate(variant, inputs, dy, kwargs, *, dtype) -> dict"

#: where the known behaviours are documented (quoted by the report)
KNOWN_NOTE = "docs/notes/tolerances.rst#torch-findings ('A finding, not a false alarm')"

#: Failures of PyTorch itself, found by the oracle and checked by hand: (variant, case) ->
#: reason. The built-in torch adapter labels them "known PyTorch behaviour"; they still fail.
KNOWN_TORCH_BEHAVIOUR = {
    ("weight_norm", "oracle:(6,33)-tiny-scale"):
        "PyTorch's weight norm cubes ||v|| in the candidate dtype: ||v||^3 underflows for a "
        "1e-20 weight and dv is infinite where the exact answer (-4.4e19) is representable",
    ("weight_norm", "regime:subnormal (5,4)-linear"):
        "PyTorch's weight norm squares subnormal weights in the candidate dtype: the norm "
        "underflows to 0 and it returns -inf where the exact result is of order 1",
    ("spectral_norm", "regime:subnormal (5,4)-linear"):
        "PyTorch's spectral norm of subnormal weights works in the candidate dtype, where sigma "
        "underflows: dweight is NaN where the exact value (2.8e39) rounds to +inf in float32, "
        "and in bfloat16 y is off by up to 15%",
    ("sigma_reparam", "regime:subnormal (5,4)-linear-svd"):
        "The official sigma-reparam code (F.normalize in the candidate dtype) squares subnormal "
        "weights: ||Wv|| underflows to 0, eps clamps it, u = Wv / eps is of order 1e-27 and "
        "W^T u underflows to 0, so sigma = 0 and it returns inf/NaN (dweight, dgamma NaN where "
        "the exact values overflow to inf; in bfloat16 y NaN where the rounded weight is 0)",
}


class AdapterError(RuntimeError):
    """The candidate cannot be set up (package missing, bad ``module:function``)."""


class DeviceUnavailable(AdapterError):
    """The requested device does not exist here (``--device cuda`` without CUDA)."""


def to_numpy(value):
    """A candidate's output as a NumPy array (float64 for floats): tensors, JAX arrays, lists.

    Raises ``TypeError`` (with what was received) for a value that is not real numbers:
    complex, strings, objects, ragged lists."""
    if value is None:
        return None
    if hasattr(value, "detach") and hasattr(value, "cpu"):          # torch.Tensor
        t = value.detach().cpu()
        if t.is_complex():
            raise TypeError(f"a complex tensor ({t.dtype}), expected real numbers")
        if t.is_floating_point():
            import torch

            t = t.to(torch.float64)
        return t.numpy()
    try:
        with np.errstate(all="ignore"):
            a = np.asarray(value)
    except (ValueError, TypeError) as exc:          # ragged lists
        raise TypeError(f"not an array ({type(value).__name__}: {exc})") from exc
    if a.dtype.kind == "c":
        raise TypeError(f"complex values ({a.dtype}), expected real numbers")
    if a.dtype.kind in "OUSM" or (a.dtype.kind == "V" and str(a.dtype) != "bfloat16"):
        raise TypeError(f"{type(value).__name__} of dtype {a.dtype}, expected real numbers")
    if a.dtype.kind == "f" or str(a.dtype) == "bfloat16":
        with np.errstate(all="ignore"):
            return a.astype(np.float64)
    return a


class Adapter:
    """The base of the built-in adapters: a callable following the protocol, with a name.

    ``ftz`` says whether the candidate flushes subnormal numbers to zero (then the oracle
    compares it with the reference of the flushed inputs; see :func:`refnorm.oracle.check`).
    """

    name = "adapter"
    device = "cpu"
    ftz = False
    frozen: tuple = ()      # inputs whose gradient the candidate does not compute
    memory_efficient = False  # its backward recomputes xhat from y (a memory-saving backward)
    known: dict = {}        # (variant, case) -> why a failure there is the library's own
    #: the kernel conventions the candidate claims for every case (``{"casting_mode":
    #: "llama", "offset": 1.0}``; see :func:`refnorm.oracle.check`), from ``fn.conventions``
    conventions: dict = {}
    #: whether the candidate follows the conventions each case's kwargs name (refnorm's own
    #: records, the catalogue's student): then the cases that carry one run without a claim
    accepts_conventions: bool = False

    def supports(self, spec) -> bool:
        return True

    def __call__(self, variant, inputs, dy, kwargs, *, dtype):  # pragma: no cover - abstract
        raise NotImplementedError


class CallableAdapter(Adapter):
    """Wraps a protocol callable; its ``variants`` attribute, if any, limits what it supports."""

    def __init__(self, fn: Callable, name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", None) or getattr(fn, "id", None) \
            or type(fn).__name__
        self.variants = getattr(fn, "variants", None)
        self.ftz = bool(getattr(fn, "ftz", False))
        self.frozen = _names(getattr(fn, "frozen", ()), "frozen")
        self.conventions = dict(getattr(fn, "conventions", None) or {})
        self.accepts_conventions = bool(getattr(fn, "accepts_conventions", False))
        self.memory_efficient = bool(getattr(fn, "memory_efficient", False))

    def supports(self, spec) -> bool:
        return self.variants is None or spec.name in self.variants

    def __call__(self, variant, inputs, dy, kwargs, *, dtype):
        return self.fn(variant, inputs, dy, kwargs, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# PyTorch
# ----------------------------------------------------------------------------------------------
def _import_torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - exercised only without torch
        raise AdapterError(f"the torch adapter needs PyTorch ({exc}); install the tested "
                           f"version: {TORCH_INSTALL}") from exc
    return torch


def _names(value, what):
    """A tuple of input names from a name or a collection of names."""
    if value is None:
        return ()
    names = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"{what} must be an input name or a collection of input names "
                        f"('weight', ('weight', 'bias')), got {value!r}")
    return names


def _torch_writes(torch, before, tensors):
    """Which of ``tensors`` (name -> tensor) were written: ``_version`` or values changed."""
    writes = {}
    for n, t in tensors.items():
        version, values = before[n]
        how = []
        if t._version != version:
            how.append("_version bumped")
        now = t.detach()
        if not torch.equal(torch.isnan(now), torch.isnan(values)) or not torch.equal(
                torch.nan_to_num(now), torch.nan_to_num(values)):
            how.append("values changed")
        if how:
            writes[n] = ", ".join(how)
    return writes


def _check_torch_device(torch, device):
    dev = str(device)
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"--device {dev}: CUDA is not available to PyTorch {torch.__version__} here "
                f"(torch.cuda.is_available() is False; torch.version.cuda is "
                f"{torch.version.cuda}). Run on a machine with an NVIDIA GPU and a CUDA build of "
                f"PyTorch, or use --device cpu.")
    elif dev.startswith("mps"):
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise DeviceUnavailable(f"--device {dev}: MPS is not available to PyTorch here")
    elif dev != "cpu":
        try:
            torch.empty(1, device=dev)
        except Exception as exc:  # noqa: BLE001
            raise DeviceUnavailable(f"--device {dev}: {exc}") from exc
    return torch.device(dev)


def _torch_stats(torch, variant, t, kw):
    """PyTorch's own saved statistics, where an ATen op returns them."""
    x, w, b = t.get("x"), t.get("weight"), t.get("bias")
    with torch.no_grad():
        if variant == "layer_norm":
            ns = kw["normalized_shape"]
            ns = [ns] if isinstance(ns, int) else list(ns)
            _, mean, rstd = torch.native_layer_norm(x, ns, w, b, kw.get("eps", 1e-5))
            return {"mean": mean, "rstd": rstd}
        if variant == "group_norm":
            n, c = x.shape[0], x.shape[1]
            hxw = int(math.prod(x.shape[2:]))
            _, mean, rstd = torch.native_group_norm(x, w, b, n, c, hxw, kw["num_groups"],
                                                    kw.get("eps", 1e-5))
            return {"mean": mean, "rstd": rstd}
        if variant == "batch_norm" and (kw.get("training") or kw.get("running_mean") is None):
            _, mean, invstd = torch.native_batch_norm(x, w, b, None, None, True, 0.0,
                                                      kw.get("eps", 1e-5))
            return {"mean": mean, "rstd": invstd}
    return {}


class TorchAdapter(Adapter):
    """PyTorch: the record's ``torch_call`` (or ``fn``) on ``device``, backward by autograd.

    ``fn``, if given, replaces the PyTorch equivalent: it is called with the inputs as tensors
    and the hyper-parameters, all by the names of refnorm's forward (``fn(x=..., weight=...,
    bias=..., normalized_shape=..., eps=...)``), and returns ``y`` (``(y, new_state)`` for a
    stateful variant). ``stats=False`` skips PyTorch's saved mean and rstd. ``frozen`` names
    the inputs whose gradient ``fn`` does not compute (they are made without
    ``requires_grad``, as a frozen parameter is; default: ``fn.frozen``).

    Every tensor handed to ``fn`` and to its backward (the inputs, the state, ``dy``) is
    checked after the call, by ``_version`` and by value: a write is reported (and fails the
    case). :meth:`residual` runs ``x + fn(x)`` to show what a write into ``dy`` does there.
    """

    def __init__(self, device="cpu", fn=None, *, stats=True, name=None, frozen=None,
                 memory_efficient=None):
        self.torch = _import_torch()
        self.device = str(device)
        self._dev = _check_torch_device(self.torch, device)
        self.fn, self.stats = fn, stats and fn is None
        self.name = name or ("torch" if fn is None else
                             f"torch:{getattr(fn, '__qualname__', repr(fn))}")
        self.variants = getattr(fn, "variants", None) if fn is not None else None
        self.frozen = _names(getattr(fn, "frozen", ()) if frozen is None else frozen, "frozen")
        self.memory_efficient = bool(getattr(fn, "memory_efficient", False)
                                     if memory_efficient is None else memory_efficient)
        self.known = dict(KNOWN_TORCH_BEHAVIOUR) if fn is None else {}
        # the records' torch_call follows every convention of the case's kwargs
        self.conventions = dict(getattr(fn, "conventions", None) or {}) if fn is not None \
            else {}
        self.accepts_conventions = fn is None or bool(getattr(fn, "accepts_conventions",
                                                              False))

    def supports(self, spec) -> bool:
        if self.fn is not None:
            return self.variants is None or spec.name in self.variants
        return spec.torch_call is not None

    def __call__(self, variant, inputs, dy, kwargs, *, dtype):
        from refnorm.norms import BY_NAME

        torch = self.torch
        spec = BY_NAME[variant]
        tdt = getattr(torch, get_format(dtype).name)

        def tensor(a, grad=False):
            return torch.tensor(a, dtype=tdt, device=self._dev, requires_grad=grad)

        leaves = {n: tensor(a, grad=n not in self.frozen) for n, a in inputs.items()}
        kw = {k: tensor(v) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v
              for k, v in kwargs.items()}
        watched = {**leaves, **{k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}}
        before = {n: (t._version, t.detach().clone()) for n, t in watched.items()}
        y, state = self._forward(spec, leaves, kw)
        ys = spec.output_values(y)
        douts = dy if isinstance(dy, dict) else {"y": dy}
        dyts = [torch.tensor(douts[n], dtype=t.dtype, device=t.device)
                for n, t in zip(spec.outputs, ys)]
        for n, dyt in zip(spec.outputs, dyts):
            watched["d" + n] = dyt
            before["d" + n] = (dyt._version, dyt.clone())
        torch.autograd.backward(ys, dyts)
        out = dict(zip(spec.outputs, ys))
        for n, t in leaves.items():
            if t.grad is not None:
                out["d" + n] = t.grad
        from refnorm.oracle.reference import state_dict

        # the new state is compared: a state tensor the candidate returns is not a write
        new_state = state_dict(state)
        out.update(new_state)
        writes = _torch_writes(torch, before, {n: t for n, t in watched.items()
                                               if not any(t is v for v in new_state.values())})
        if self.stats:
            try:
                stats = _torch_stats(torch, variant,
                                     {n: t.detach() for n, t in leaves.items()}, kw)
            except Exception:  # noqa: BLE001 - the statistics are an extra, never a failure
                stats = {}
            out.update(stats)
        result = {k: to_numpy(v) for k, v in out.items()}
        if writes:
            result[WRITES] = writes
        return result

    def _forward(self, spec, leaves, kw):
        torch = self.torch
        if self.fn is not None:
            result = self.fn(**leaves, **kw)
        else:
            args = [leaves.get(n) for n in spec.diff_argnames]
            result = spec.torch_call(torch, *args, **kw)
        y, state = result if spec.stateful else (result, None)
        several = len(spec.outputs) > 1
        if not (isinstance(y, (tuple, list)) and len(y) == len(spec.outputs) and all(
                isinstance(t, torch.Tensor) for t in y) if several
                else isinstance(y, torch.Tensor)):
            what = f"the tuple of output tensors ({', '.join(spec.outputs)})" if several \
                else "the output tensor y"
            raise TypeError(f"the function returned {type(y).__name__}, expected {what}"
                            + (" (and the new state)" if spec.stateful else ""))
        return (tuple(y) if several else y), state

    def residual(self, variant, inputs, dy, kwargs, *, dtype):
        """``dx`` of the residual block ``z = x + f(x)`` under the upstream gradient ``dy``
        (the backward of the add hands the same gradient tensor to both branches), or None
        where ``y`` and ``x`` differ in shape."""
        from refnorm.norms import BY_NAME

        torch = self.torch
        spec = BY_NAME[variant]
        tdt = getattr(torch, get_format(dtype).name)
        leaves = {n: torch.tensor(a, dtype=tdt, device=self._dev,
                                  requires_grad=n not in self.frozen) for n, a in inputs.items()}
        kw = {k: torch.tensor(v, dtype=tdt, device=self._dev)
              if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v
              for k, v in kwargs.items()}
        x = leaves["x"]
        y, _ = self._forward(spec, leaves, kw)
        if len(spec.outputs) > 1 or tuple(y.shape) != tuple(x.shape):
            return None
        z = x + y
        z.backward(torch.tensor(dy, dtype=z.dtype, device=z.device))
        return to_numpy(x.grad)


def torch_function(fn, device="cpu", *, name=None, frozen=None,
                   memory_efficient=None) -> TorchAdapter:
    """A PyTorch function with the signature of refnorm's forward, as a candidate (see
    :class:`TorchAdapter`): ``check(torch_function(my_ln, device="cuda"), "layer_norm")``.

    ``fn`` is called by keyword, with the names of refnorm's forward (``x=...,
    weight=..., normalized_shape=..., eps=...``). ``frozen`` (``("weight",)``) names the
    inputs whose gradient ``fn`` does not compute (a frozen parameter); default
    ``fn.frozen``. ``memory_efficient=True`` (default ``fn.memory_efficient``) declares a
    backward that recomputes xhat from y. ``torch.nn.functional.layer_norm`` names its first
    argument ``input``:
    wrap it, ``torch_function(lambda x, normalized_shape, weight=None, bias=None, eps=1e-5:
    F.layer_norm(x, normalized_shape, weight, bias, eps))``."""
    return TorchAdapter(device, fn, name=name, frozen=frozen, memory_efficient=memory_efficient)


# ----------------------------------------------------------------------------------------------
# JAX
# ----------------------------------------------------------------------------------------------
def _jax_impls(jax, jnp):
    def acc(x):
        return jnp.float64 if x.dtype == jnp.float64 else jnp.float32

    def trailing(x, normalized_shape):
        nd = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
        return tuple(range(x.ndim - nd, x.ndim))

    def standardize(xf, axes, eps):
        mu = jnp.mean(xf, axis=axes, keepdims=True)
        xc = xf - mu
        var = jnp.mean(xc * xc, axis=axes, keepdims=True)
        return xc * jax.lax.rsqrt(var + eps), mu, var

    def channel(p, x):
        return p.reshape((1, -1) + (1,) * (x.ndim - 2))

    def affine(xhat, x, weight, bias, view):
        t = acc(x)
        y = xhat if weight is None else xhat * view(weight.astype(t))
        y = y if bias is None else y + view(bias.astype(t))
        return y.astype(x.dtype)

    def with_running_stats(xf, x, running_mean, running_var, eps):
        mu = channel(running_mean.astype(xf.dtype), x)
        return (xf - mu) * jax.lax.rsqrt(channel(running_var.astype(xf.dtype), x) + eps)

    def layer_norm(x, weight=None, bias=None, *, normalized_shape, eps=1e-5):
        xhat, _, _ = standardize(x.astype(acc(x)), trailing(x, normalized_shape), eps)
        return affine(xhat, x, weight, bias, lambda p: p)

    def rms_norm(x, weight=None, *, normalized_shape, eps=None, eps_placement="inside"):
        xf = x.astype(acc(x))
        if eps is None:
            eps = float(jnp.finfo(acc(x)).eps)
        ms = jnp.mean(xf * xf, axis=trailing(x, normalized_shape), keepdims=True)
        r = jax.lax.rsqrt(ms + eps) if eps_placement == "inside" else 1 / (jnp.sqrt(ms) + eps)
        return affine(xf * r, x, weight, None, lambda p: p)

    def group_norm(x, weight=None, bias=None, *, num_groups, eps=1e-5):
        xf = x.astype(acc(x))
        g = xf.reshape((x.shape[0], num_groups, -1))
        xhat, _, _ = standardize(g, (2,), eps)
        return affine(xhat.reshape(x.shape), x, weight, bias, lambda p: channel(p, x))

    def batch_norm(x, weight=None, bias=None, *, running_mean=None, running_var=None,
                   training=False, momentum=0.1, eps=1e-5, num_batches_tracked=0):
        xf = x.astype(acc(x))
        axes = (0,) + tuple(range(2, x.ndim))
        tracking = running_mean is not None
        state = {}
        if training or not tracking:
            xhat, mu, var = standardize(xf, axes, eps)
            if training and tracking:
                t = int(num_batches_tracked) + 1
                f = 1.0 / t if momentum is None else momentum
                m = x.size // x.shape[1]
                rm = (1 - f) * running_mean.astype(xf.dtype) + f * mu.reshape(-1)
                rv = (1 - f) * running_var.astype(xf.dtype) + f * var.reshape(-1) * m / (m - 1)
                state = {"running_mean": rm.astype(x.dtype), "running_var": rv.astype(x.dtype)}
        else:
            xhat = with_running_stats(xf, x, running_mean, running_var, eps)
        return affine(xhat, x, weight, bias, lambda p: channel(p, x)), state

    def instance_norm(x, weight=None, bias=None, *, running_mean=None, running_var=None,
                      use_input_stats=True, momentum=0.1, eps=1e-5):
        xf = x.astype(acc(x))
        axes = tuple(range(2, x.ndim))
        state = {}
        if use_input_stats:
            xhat, mu, var = standardize(xf, axes, eps)
            if running_mean is not None:
                m = math.prod(x.shape[2:])
                mu_c = mu.reshape(x.shape[:2]).mean(0)
                var_c = (var.reshape(x.shape[:2]) * m / (m - 1)).mean(0)
                rm = (1 - momentum) * running_mean.astype(xf.dtype) + momentum * mu_c
                rv = (1 - momentum) * running_var.astype(xf.dtype) + momentum * var_c
                state = {"running_mean": rm.astype(x.dtype), "running_var": rv.astype(x.dtype)}
        else:
            xhat = with_running_stats(xf, x, running_mean, running_var, eps)
        return affine(xhat, x, weight, bias, lambda p: channel(p, x)), state

    return {"layer_norm": (layer_norm, False), "rms_norm": (rms_norm, False),
            "group_norm": (group_norm, False), "batch_norm": (batch_norm, True),
            "instance_norm": (instance_norm, True)}


class JaxAdapter(Adapter):
    """JAX: ``jax.numpy`` implementations of five variants, differentiated by ``jax.vjp``.

    float64 cases run inside ``jax.enable_x64(True)``; nothing global is changed.
    """

    name = "jax"
    ftz = True  # XLA flushes subnormal float32 numbers to zero (CPU and GPU)

    def __init__(self, device="cpu"):
        try:
            import jax
            import jax.numpy as jnp
        except ImportError as exc:  # pragma: no cover - exercised only without jax
            raise AdapterError(f"the jax adapter needs JAX: {exc}") from exc
        self.jax, self.jnp = jax, jnp
        self.device = str(device)
        platform = "gpu" if self.device.startswith("cuda") else self.device
        try:
            self._dev = jax.devices(platform)[0]
        except Exception as exc:  # noqa: BLE001
            raise DeviceUnavailable(f"--device {self.device}: JAX has no {platform} device "
                                    f"here ({exc})") from exc
        self.impls = _jax_impls(jax, jnp)

    def supports(self, spec) -> bool:
        return spec.name in self.impls

    def __call__(self, variant, inputs, dy, kwargs, *, dtype):
        jax, jnp = self.jax, self.jnp
        fmt = get_format(dtype)
        with jax.enable_x64(fmt.name == "float64"), jax.default_device(self._dev):
            jdt = getattr(jnp, fmt.name)
            names = list(inputs)
            arrays = [jnp.asarray(inputs[n], dtype=jdt) for n in names]
            kw = {k: jnp.asarray(v, dtype=jdt) if isinstance(v, np.ndarray) and v.dtype.kind == "f"
                  else v for k, v in kwargs.items()}
            fn, stateful = self.impls[variant]

            def f(*arrs):
                out = fn(**dict(zip(names, arrs)), **kw)
                return out if stateful else (out, {})

            def run(arrs, cot):
                y, vjp, state = jax.vjp(f, *arrs, has_aux=True)
                return y, vjp(cot.astype(y.dtype)), state

            # one compilation per case: much faster than op-by-op dispatch on the CPU
            y, grads, state = jax.jit(run)(arrays, jnp.asarray(dy, dtype=jdt))
            wide = jnp.float64 if fmt.name == "float64" else jnp.float32
            out = {"y": np.asarray(y.astype(wide))}
            for n, g in zip(names, grads):
                out["d" + n] = np.asarray(g.astype(wide))
            for k, v in state.items():
                out[k] = np.asarray(v.astype(wide))
        return {k: to_numpy(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
def _load_callable(spec: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise AdapterError(f"--impl {spec!r}: expected 'torch', 'jax' or 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AdapterError(f"--impl {spec!r}: cannot import module {module_name!r}: {exc}") \
            from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AdapterError(f"--impl {spec!r}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise AdapterError(f"--impl {spec!r}: {attr!r} is not callable")
    return obj


def resolve(impl, device="cpu") -> Adapter:
    """An :class:`Adapter` for ``impl``: ``"torch"``, ``"jax"``, ``"module:function"``, an
    Adapter, or any callable following the protocol."""
    if isinstance(impl, Adapter):
        return impl
    if isinstance(impl, str):
        if impl == "torch":
            return TorchAdapter(device)
        if impl == "jax":
            return JaxAdapter(device)
        return CallableAdapter(_load_callable(impl), name=impl)
    if callable(impl):
        return CallableAdapter(impl)
    raise TypeError(f"impl must be 'torch', 'jax', 'module:function' or a callable, got "
                    f"{type(impl).__name__}")
