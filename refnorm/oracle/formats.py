r"""The floating-point formats a candidate may compute in, and exact rounding to them in NumPy.

A :class:`Format` knows its precision ``p`` (significand bits, the implicit one included), its
exponent range and its unit roundoff :math:`u = 2^{-p}`:

=========  ==  =====  =====  ===============
name        p   emin   emax   u
=========  ==  =====  =====  ===============
float64    53  -1022   1023   2^-53 ≈ 1.1e-16
float32    24   -126    127   2^-24 ≈ 6.0e-8
float16    11    -14     15   2^-11 ≈ 4.9e-4
bfloat16    8   -126    127   2^-8  ≈ 3.9e-3
=========  ==  =====  =====  ===============

NumPy has no bfloat16, so :func:`round_to` rounds a float64 array to any of the four formats
with NumPy alone (round to nearest, ties to even, gradual underflow, overflow to infinity):
the value is split into a power of two and a significand with :func:`numpy.frexp`, the
significand is rounded to ``p`` bits with :func:`numpy.rint` (which rounds ties to even), and
the exponent is clamped at ``emin`` so that subnormals keep fewer bits, as IEEE 754 says.
Rounding straight from float64 avoids the double rounding of ``float64 -> float32 -> bfloat16``.
The result stays a float64 array whose values are exactly representable in the format:
that is how the oracle hands bit-identical inputs to the reference and to the candidate.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Format", "FORMATS", "get_format", "round_to", "ulp", "representable"]


@dataclass(frozen=True)
class Format:
    """An IEEE-754-style binary format: ``p`` significand bits, exponents ``emin..emax``."""

    name: str
    p: int
    emin: int
    emax: int
    accumulate: str  # the format a correct kernel accumulates its reductions in

    @property
    def u(self) -> float:
        """Unit roundoff: half the distance from 1 to the next number, ``2**-p``."""
        return 2.0 ** -self.p

    @property
    def eps(self) -> float:
        """Machine epsilon, the distance from 1 to the next number: ``2**(1-p)``."""
        return 2.0 ** (1 - self.p)

    @property
    def max(self) -> float:
        """The largest finite number."""
        return float((2.0 - 2.0 ** (1 - self.p)) * 2.0 ** self.emax)

    @property
    def tiny(self) -> float:
        """The smallest positive normal number."""
        return 2.0 ** self.emin

    @property
    def smallest_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.p + 1)

    @property
    def accumulator(self) -> "Format":
        return FORMATS[self.accumulate]

    @property
    def storage(self):
        """The NumPy dtype that holds the format's values exactly (float32 below float64)."""
        return np.float64 if self.name == "float64" else np.float32

    def __str__(self) -> str:
        return self.name


FORMATS = {
    "float64": Format("float64", 53, -1022, 1023, "float64"),
    "float32": Format("float32", 24, -126, 127, "float32"),
    "float16": Format("float16", 11, -14, 15, "float32"),
    "bfloat16": Format("bfloat16", 8, -126, 127, "float32"),
}
_ALIASES = {"f64": "float64", "double": "float64", "fp64": "float64",
            "f32": "float32", "float": "float32", "fp32": "float32",
            "f16": "float16", "half": "float16", "fp16": "float16",
            "bf16": "bfloat16"}


def get_format(dtype) -> Format:
    """The :class:`Format` named by ``dtype``: a Format, a name (``"bf16"`` too), a dtype."""
    if isinstance(dtype, Format):
        return dtype
    name = getattr(dtype, "name", None) if not isinstance(dtype, str) else dtype
    if name is None:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    name = str(name).replace("torch.", "")
    name = _ALIASES.get(name, name)
    if name not in FORMATS:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {', '.join(FORMATS)}")
    return FORMATS[name]


def round_to(x, dtype) -> np.ndarray:
    """Round ``x`` to ``dtype`` (nearest, ties to even); float64 holding the rounded values."""
    fmt = get_format(dtype)
    x = np.asarray(x, dtype=np.float64)
    if fmt.name == "float64":
        return x.copy()
    if fmt.name in ("float32", "float16"):  # NumPy's casts round correctly from float64
        with np.errstate(over="ignore"):
            return x.astype(fmt.name).astype(np.float64)
    out = x.copy()
    finite = np.isfinite(x) & (x != 0)
    v = x[finite]
    _, e = np.frexp(v)                         # v = m * 2**e, 0.5 <= |m| < 1
    lead = np.maximum(e - 1, fmt.emin)         # exponent of the leading bit (>= emin: subnormals)
    quantum = np.ldexp(1.0, lead - (fmt.p - 1))
    r = np.rint(v / quantum) * quantum         # exact scaling by powers of two; rint ties to even
    r[np.abs(r) > fmt.max] = np.inf * np.sign(r[np.abs(r) > fmt.max])
    out[finite] = r
    return out


def ulp(magnitude, dtype) -> np.ndarray:
    """The spacing of ``dtype``'s numbers at ``|magnitude|``: ``2**(floor(log2|m|) - p + 1)``.

    Below the smallest normal number it is the subnormal spacing; at zero, too.
    """
    fmt = get_format(dtype)
    m = np.abs(np.asarray(magnitude, dtype=np.float64))
    m = np.where(m < np.inf, m, fmt.max)  # NaN and infinities: the largest number's spacing
    m = np.maximum(m, fmt.tiny)  # below the smallest normal number (and at 0): its spacing
    _, e = np.frexp(m)                                  # m = f 2**e, 1/2 <= f < 1
    return np.ldexp(1.0, e - fmt.p)                     # 2**(e - 1 - (p - 1))


def representable(x, dtype) -> bool:
    """Whether every value of ``x`` is exactly a ``dtype`` number (NaN and infinities count)."""
    x = np.asarray(x, dtype=np.float64)
    r = round_to(x, dtype)
    return bool(np.all((r == x) | (np.isnan(r) & np.isnan(x))))
