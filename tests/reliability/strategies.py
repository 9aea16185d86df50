"""Hypothesis strategies that build a valid call of ANY registered variant.

A call starts from one of the record's ``sample_inputs`` (so every keyword argument, parameter
and piece of state is one the variant accepts) and redraws its first array:

* **shape**: every axis that :func:`reliability.calls.free_axes` finds resizable (the batch axis,
  spatial axes, ...) gets a size in 1..5; the record's own samples supply the
  size-1 normalized axes (``(5,1)-one-element-rows``, ``(3,4,1)-one-element-groups``, ...);
  one call in ten has a size-0 axis, in any position (:func:`emptied` resizes the parameters
  that follow a normalized or channel axis);
* **dtype**: float64, float32 or float16 (every floating array of the call is cast);
* **values**: a regime (below) times a scale :math:`10^k`, :math:`k` over the whole range of the
  dtype, subnormals included (float64 :math:`[-323, 307]`, float32 :math:`[-45, 38]`, float16
  :math:`[-7, 4]`);
* ``eps``: now and then 0 where the call has a float ``eps``.

The regimes: ``normal`` (standard normal), ``offset`` (mean :math:`10^j` times the spread,
:math:`j \\in [1, 8]`: cancellation), ``constant-groups`` (constant over the variant's
statistics axes, or over all axes but the first), ``constant-all``, ``zeros``, ``mixed``
(magnitudes spread over up to 12 decades within one group), ``integers`` (small integers times
a power of two: ties and exact arithmetic), ``one-hot`` (one non-zero per row).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from reliability.calls import (free_axes, get_slot, group_axes, make_upstream, replace_slots,
                               with_x,
                               float_slots)

SEED = 1234
DTYPES = (np.float64, np.float32, np.float16)
# The whole range of each dtype: from its smallest subnormal (float64 4.9e-324, float32 1.4e-45,
# float16 6.0e-8) to near its largest finite value (``values`` clips to max/64).
SCALE_EXPONENTS = {np.float64: (-323, 307), np.float32: (-45, 38), np.float16: (-7, 4)}
REGIMES = ("normal", "offset", "constant-groups", "constant-all", "zeros", "mixed", "integers",
           "one-hot")
MAX_ELEMENTS = 240

_SAMPLES: dict = {}


def samples_of(spec):
    """The record's sample inputs (cached; the same seed as the generic tests)."""
    if spec.name not in _SAMPLES:
        _SAMPLES[spec.name] = list(spec.sample_inputs(np.random.default_rng(SEED)))
    return _SAMPLES[spec.name]


@dataclass(repr=False)
class Call:
    spec: object
    sample: object
    dy: np.ndarray
    dtype: type
    regime: str
    scale_exp: int
    base: str                    # the sample it was built from

    def __repr__(self):  # what hypothesis prints for a falsifying example
        x = self.sample.arrays[0]
        kw = {k: (f"<{v.dtype}{v.shape}>" if isinstance(v, np.ndarray) else v)
              for k, v in self.sample.kwargs.items()}
        return (f"Call({self.spec.name}, from {self.base!r}, {np.dtype(self.dtype).name}, "
                f"x{x.shape}, regime={self.regime}, scale=1e{self.scale_exp}, kwargs={kw}, "
                f"x.ravel()[:8]={x.ravel()[:8].tolist()})")

    def _repr_pretty_(self, printer, cycle):  # hypothesis' pretty printer
        printer.text(repr(self))


def _cast(spec, sample, dtype):
    return replace_slots(sample, {s: get_slot(sample, s).astype(dtype)
                                  for s in float_slots(spec, sample)})


def values(regime, shape, k, dtype, rng, const_axes):
    """float64 values of ``regime`` at scale 1e``k``, all finite once cast to ``dtype``."""
    s = 10.0 ** k
    top = float(np.finfo(dtype).max) / 64          # room for a few standard deviations
    room = int(np.floor(np.log10(top) - np.log10(8.0) - k))   # decades above the scale
    z = rng.standard_normal(shape)
    if regime == "normal":
        x = s * z
    elif regime == "offset":
        j = int(rng.integers(1, max(1, min(8, room)) + 1)) if room >= 1 else 0
        x = s * (10.0 ** j + z) if j else s * z
    elif regime in ("constant-groups", "constant-all"):
        axes = tuple(range(len(shape))) if regime == "constant-all" else const_axes
        keep = tuple(1 if a in axes else n for a, n in enumerate(shape))
        x = np.broadcast_to(s * rng.standard_normal(keep) + s * rng.integers(0, 2) * 10.0,
                            shape).copy()
    elif regime == "zeros":
        x = np.zeros(shape)
    elif regime == "mixed":
        spread = max(0, min(6, room))
        x = s * z * 10.0 ** rng.uniform(-spread, spread, shape)
    elif regime == "integers":
        x = 2.0 ** np.round(np.log2(s)) * rng.integers(-3, 4, shape)
    elif regime == "one-hot":
        x = np.zeros(shape)
        if x.size:
            rows = x.reshape(-1, shape[-1]) if shape[-1] else x.reshape(0, 0)
            if rows.size:
                cols = rng.integers(0, shape[-1], rows.shape[0])
                rows[np.arange(rows.shape[0]), cols] = s * (1 + np.abs(rng.standard_normal(
                    rows.shape[0])))
                x = rows.reshape(shape)
    else:  # pragma: no cover
        raise ValueError(regime)
    x = np.clip(x, -top, top).astype(dtype)
    assert np.isfinite(x).all()
    return x


def emptied(spec, sample, axis):
    """The sample with the parameters that follow ``x``'s (non-free) ``axis`` made size 0 as
    well, where the record says how they follow it (``param_layout``): "channel" (axis 1: every
    other array of shape (C,)) or "trailing" (an axis of ``normalized_shape``: the parameters of
    that shape, and ``normalized_shape`` itself). Otherwise the other arrays are left as they
    are, and the call must raise the documented error (or accept the shape)."""
    x = sample.arrays[0]
    size = x.shape[axis]
    updates, kwargs = {}, dict(sample.kwargs)
    slots = [s for s in float_slots(spec, sample) if s != ("arg", 0)]
    if spec.param_layout == "channel" and axis == 1:
        updates = {s: np.zeros((0,), get_slot(sample, s).dtype) for s in slots
                   if get_slot(sample, s).shape == (size,)}
    elif spec.param_layout == "trailing" and "normalized_shape" in kwargs:
        old = kwargs["normalized_shape"]
        old = (old,) if isinstance(old, int) else tuple(old)
        first = x.ndim - len(old)
        if axis >= first:
            new = tuple(0 if i == axis - first else n for i, n in enumerate(old))
            kwargs["normalized_shape"] = new
            updates = {s: np.zeros(new, get_slot(sample, s).dtype) for s in slots
                       if get_slot(sample, s).shape == old}
    return replace_slots(sample, updates)._replace(kwargs=kwargs)


@st.composite
def calls(draw, spec, dtype, regimes=REGIMES):
    """One valid call of ``spec`` at ``dtype`` (see the module docstring)."""
    sample = draw(st.sampled_from(samples_of(spec)), label="sample")
    free = free_axes(spec, sample)
    base = sample.name
    shape = list(sample.arrays[0].shape)
    for axis in free:
        shape[axis] = draw(st.integers(1, 5), label=f"size of axis {axis}")
    empty = None
    if shape and draw(st.integers(0, 9), label="empty") == 0:  # a size-0 axis, anywhere
        empty = draw(st.integers(0, len(shape) - 1), label="empty axis")
        shape[empty] = 0
    while np.prod(shape) > MAX_ELEMENTS:
        axis = max(free, key=lambda a: shape[a])
        shape[axis] -= 1
    shape = tuple(shape)
    if empty is not None and empty not in free:
        sample = emptied(spec, sample, empty)
    regime = draw(st.sampled_from(regimes), label="regime")
    lo, hi = SCALE_EXPONENTS[dtype]
    k = draw(st.integers(lo, hi), label="scale exponent")
    seed = draw(st.integers(0, 2 ** 32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    sample = _cast(spec, sample, dtype)
    probe = sample._replace(arrays=(np.zeros(shape, dtype),) + tuple(sample.arrays[1:]))
    axes = group_axes(spec, probe)
    const_axes = tuple(axes) if axes else tuple(range(1, len(shape)))
    x = values(regime, shape, k, dtype, rng, const_axes)
    # the inputs that have x's shape (a residual) get their values from the same regime
    sample = with_x(spec, sample, x, always=True,
                    fill=lambda shp, dt: values(regime, shp, k, dtype, rng, const_axes))
    eps = sample.kwargs.get("eps")
    if isinstance(eps, float) and eps > 0 and draw(st.integers(0, 7), label="eps=0") == 0:
        sample = sample._replace(kwargs={**sample.kwargs, "eps": 0.0})
    dy = make_upstream(spec, spec.output_shapes(sample), dtype, seed + 1)
    return Call(spec, sample, dy, dtype, regime, k, base)


NONFINITE = (np.nan, np.inf, -np.inf)


@st.composite
def injections(draw, spec, sample, max_count=2):
    """``[(slot, index, value)]``: 1..``max_count`` non-finite values put into the call's
    floating-point arrays (x, parameters, running statistics, power-iteration vectors)."""
    slots = [s for s in float_slots(spec, sample) if get_slot(sample, s).size]
    out = []
    for _ in range(draw(st.integers(1, max_count), label="injections")):
        slot = draw(st.sampled_from(slots), label="slot")
        a = get_slot(sample, slot)
        flat = draw(st.integers(0, a.size - 1), label="index")
        index = np.unravel_index(flat, a.shape)
        value = draw(st.sampled_from(NONFINITE), label="value")
        index = tuple(int(i) for i in index)
        out = [o for o in out if o[:2] != (slot, index)] + [(slot, index, value)]
    return out
