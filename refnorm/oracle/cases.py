"""The oracle's cases: per variant, per candidate dtype, deterministic from a seed.

A :class:`Case` is one call of a variant: its differentiable inputs, its hyper-parameters and
state (``kwargs``), and the upstream gradient ``dy`` (with ``douts``, those of the record's
other outputs, by name: ``{"s": ds}`` for the fused residual-add norms). Every float array of a
case holds values that are **exactly representable in the candidate dtype** (rounded once from
float64 with :func:`refnorm.oracle.formats.round_to`) but is stored as float64: the reference
computes on these very values and the candidate receives them losslessly, so both see
bit-identical inputs.

Where the cases come from, for each registered variant:

``oracle:``
    the record's ``oracle_inputs(rng)``: realistic shapes that kernels get wrong (odd sizes,
    sizes that are not a multiple of 8, one-element rows, rows of 65536).
``sample:``
    the record's ``sample_inputs(rng)``: small cases and edge cases (N=1, constant rows). Small
    reduction lengths are where a wrong variance factor or a wrong epsilon is largest.
``regime:``
    value regimes applied to ``x`` of one small base case of the variant (the first sample
    whose groups all have two elements or more): mean 1e4 with std 1e-3, mean 1e3 with std 1
    (catches ``E[x^2] - E[x]^2``), constant groups, tiny and huge scales, subnormal values, and
    a NaN and an infinity in one element. Scales follow the candidate dtype: "huge" (2^38 for
    float32 accumulation, 1e20 for float64) and "tiny" (2^-38, 1e-20) are as far from 1 as
    they can be while the cubes of the data and of its inverse (``rstd**3`` appears in every
    backward) stay normal in the accumulator; "subnormal" lies below the dtype's smallest
    normal number.

A case is **skipped** for a dtype (and listed with the reason, never silently dropped) when
rounding to the dtype overflows a finite input, when the sum of squares of a group would
overflow the accumulation format (float32 for float32, float16 and bfloat16 candidates), or
(checked by :func:`refnorm.oracle.core.out_of_range`) when refnorm's own algorithm, run in
the accumulation format, misses the float32 bound: an intermediate has then left the format's
range, and no correct kernel in that precision can be held to the bound.

``size="ci"`` keeps the same kinds of cases but leaves out the inputs with more than
:data:`CI_MAX_ELEMENTS` elements; the long-row case (2 x 65536 for LayerNorm) stays.
"""
from __future__ import annotations

import inspect
import re
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np

from refnorm.oracle.formats import get_format, round_to
from refnorm.oracle.structure import groups_of
from refnorm.registry import SampleInput

__all__ = ["Case", "Skipped", "generate", "REGIMES", "CI_MAX_ELEMENTS", "case_rng", "case_shape",
           "case_ids", "format_shape"]

CI_MAX_ELEMENTS = 2 ** 17 + 2 ** 12
REGIMES = ("mean1e4-std1e-3", "mean1e3-std1", "constant-groups", "tiny-scale", "huge-scale",
           "subnormal", "nan", "inf")


@dataclass(frozen=True)
class Case:
    """One call of a variant, with inputs representable in ``dtype`` (stored as float64)."""

    variant: str
    name: str
    dtype: str
    arrays: tuple                       # diff inputs in the record's order; None where absent
    kwargs: Mapping[str, Any]
    dy: np.ndarray
    seed: int = 0
    tags: tuple = ()
    argnames: tuple = ()
    douts: Mapping[str, np.ndarray] = field(default_factory=dict)  # the other outputs' dy

    @property
    def sample(self) -> SampleInput:
        return SampleInput(self.name, self.arrays, self.kwargs)

    @property
    def upstream(self) -> tuple:
        """The upstream gradient of every output, in the record's ``outputs`` order."""
        return (self.dy,) + tuple(self.douts.values())

    def candidate_dy(self):
        """The ``dy`` a candidate receives (copies): the array, or for a record with several
        outputs a dict of their upstream gradients by output name (``{"y": ..., "s": ...}``)."""
        if not self.douts:
            return self.dy.copy()
        return {"y": self.dy.copy(), **{k: v.copy() for k, v in self.douts.items()}}

    @property
    def inputs(self) -> dict:
        """The present differentiable inputs by name."""
        return {n: a for n, a in zip(self.argnames, self.arrays) if a is not None}

    @property
    def nonfinite(self) -> bool:
        return "nonfinite" in self.tags

    def shapes(self) -> dict:
        return {n: list(a.shape) for n, a in self.inputs.items()}


@dataclass(frozen=True)
class Skipped:
    variant: str
    name: str
    dtype: str
    reason: str
    shape: tuple | None = None          # of the case's first input, as :func:`case_shape`


def case_shape(case) -> tuple | None:
    """The shape of the first input present in a case (``x`` for most variants), or None."""
    arrays = case.arrays if isinstance(case, (Case, SampleInput)) else case
    for a in arrays:
        if a is not None:
            return tuple(int(n) for n in np.shape(a))
    return None


def format_shape(shape) -> str:
    """``(37,1000)``, ``(5,)``, ``()``; ``?`` for an unknown shape."""
    if shape is None:
        return "?"
    shape = tuple(shape)
    return "(" + ",".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def case_ids(variant, dtype, entries) -> dict:
    """Readable, unique ids for the cases of one variant and dtype: ``{name: id}``.

    ``entries`` are ``(name, shape)`` pairs, one per case (run or skipped). An id is
    ``variant-dtype-shape``, such as ``layer_norm-bfloat16-(37,1000)``; where several cases
    share that, the case's name follows (without the shape it repeats:
    ``layer_norm-float32-(4,6)-regime:nan``), then ``#k`` if even that repeats. Ids depend on
    the set of names, not on their order: :func:`refnorm.testing.cases` and
    ``refnorm compare --junit`` give a case the same id.
    """
    entries = list(dict(entries).items())
    base = {name: f"{variant}-{dtype}-{format_shape(shape)}" for name, shape in entries}
    counts = {}
    for b in base.values():
        counts[b] = counts.get(b, 0) + 1
    ids = {}
    for name, shape in entries:
        b = base[name]
        if counts[b] > 1:
            b += "-" + (_short_name(name, shape) or name)
        ids[name] = b
    seen = {}
    for name in sorted(ids):
        seen.setdefault(ids[name], []).append(name)
    for i, names in seen.items():
        if len(names) > 1:
            for k, name in enumerate(names, 1):
                ids[name] = f"{i}-#{k}"
    return ids


def _short_name(name, shape):
    """A case's name without the shape it repeats, its spaces turned into dashes."""
    text = name.replace(format_shape(shape), " ") if shape is not None else name
    text = re.sub(r"\s+", "-", text.strip())
    text = re.sub(r":-", ":", re.sub(r"-{2,}", "-", text))
    return text.strip("-:")


def case_rng(seed, *parts) -> np.random.Generator:
    """A generator seeded by ``seed`` and the CRC-32 of ``parts`` (stable across platforms)."""
    words = [int(seed) & 0xFFFFFFFF] + [zlib.crc32(str(p).encode()) for p in parts]
    return np.random.default_rng(words)


def _resolve_eps(spec, kwargs, fmt):
    """``eps=None`` means a dtype-dependent value (RMSNorm: the machine epsilon of the
    computation dtype): resolve it for the candidate's dtype, so that the float64 reference
    and the candidate use the same number. The variant's module says how (``default_eps``)."""
    if "eps" not in kwargs or kwargs["eps"] is not None:
        return kwargs
    module = inspect.getmodule(spec.forward)
    default = getattr(module, "default_eps", None)
    if default is None:
        return kwargs
    return {**kwargs, "eps": float(default(np.dtype(fmt.storage)))}


def _round_kwargs(kwargs, fmt):
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            out[k] = round_to(v, fmt)
        else:
            out[k] = v
    return out


def _x_of(sample):
    return sample.arrays[0] if sample.arrays and isinstance(sample.arrays[0], np.ndarray) else None


def _feasible(spec, sample, rounded, fmt, groups):
    """None if the case can be computed in ``fmt``, else the reason it cannot."""
    for name, a, r in zip(spec.diff_argnames, sample.arrays, rounded.arrays):
        if a is None:
            continue
        if np.any(np.isfinite(a) & ~np.isfinite(r)):
            return f"`{name}` overflows {fmt.name} (max {fmt.max:.3g})"
    x = _x_of(rounded)
    if x is None or fmt.name == "float64":
        return None
    acc = fmt.accumulator
    finite = np.where(np.isfinite(x), np.abs(x), 0.0)
    n = groups.size if groups is not None else x.size
    if finite.size and float(finite.max()) ** 2 * max(n, 1) > acc.max / 16:
        return (f"the sum of squares of a group ({n} elements up to {finite.max():.3g}) overflows "
                f"the {acc.name} accumulator")
    return None


def _regime_x(regime, x, fmt, rng, groups):
    z = rng.standard_normal(x.shape)
    acc = fmt.accumulator
    n = groups.size if groups is not None else x.size
    if regime == "mean1e4-std1e-3":
        return 1e4 + 1e-3 * z
    if regime == "mean1e3-std1":
        return 1e3 + z
    if regime == "constant-groups":
        if groups is None:
            return np.full(x.shape, rng.standard_normal())
        return groups.spread(rng.standard_normal(groups.count))
    if regime == "tiny-scale":  # far below eps, yet cubes (rstd^3 in gradients) stay normal
        return max(1e-20, 2.0 ** (acc.emin // 3 + 4), 64 * fmt.tiny) * z
    if regime == "huge-scale":  # cubes and inverse cubes stay in the accumulator's range
        scale = min(1e20, 2.0 ** (acc.emax // 3 - 4), 2.0 ** -4 * np.sqrt(acc.max / max(n, 1)),
                    fmt.max / 64)
        return scale * z
    if regime == "subnormal":
        return fmt.tiny * 2.0 ** -3 * z
    if regime in ("nan", "inf"):
        out = z.copy()
        out.flat[int(rng.integers(x.size))] = np.nan if regime == "nan" else np.inf
        return out
    raise ValueError(regime)


def _base_sample(spec, samples):
    """The first sample whose every group has >= 2 elements (small enough to be cheap)."""
    best = None
    for s in samples:
        x = _x_of(s)
        if x is None or x.size > 4096 or x.size < 4:
            continue
        try:
            with np.errstate(all="ignore"):
                _, _, cache = spec.run(s)
        except Exception:  # noqa: BLE001 - a sample the forward rejects is no base
            continue
        g = groups_of(spec, s, cache)
        if g is not None and g.sizes.min() < 2:
            continue
        if best is None:
            best = s
        if x.size >= 16:
            return s
    return best


def _make_case(spec, sample, fmt, seed, name, tags):
    rounded = SampleInput(name, tuple(None if a is None else round_to(a, fmt)
                                      for a in sample.arrays),
                          _round_kwargs(_resolve_eps(spec, sample.kwargs, fmt), fmt))
    try:
        with np.errstate(all="ignore"):
            y, _, cache = spec.run(rounded)
    except Exception as exc:  # noqa: BLE001 - reported as a skip with its reason
        return None, f"the reference rejects it: {type(exc).__name__}: {exc}"
    groups = groups_of(spec, rounded, cache)
    reason = _feasible(spec, sample, rounded, fmt, groups)
    if reason:
        return None, reason
    ys = spec.output_values(y)
    dy = round_to(case_rng(seed, spec.name, name, "dy").standard_normal(np.shape(ys[0])), fmt)
    douts = {k: round_to(case_rng(seed, spec.name, name, "d" + k).standard_normal(np.shape(v)),
                         fmt) for k, v in zip(spec.outputs[1:], ys[1:])}
    return Case(spec.name, name, fmt.name, rounded.arrays, rounded.kwargs, dy, seed, tuple(tags),
                tuple(spec.diff_argnames), douts), None


def generate(spec, dtype="float32", seed=0, size="full"):
    """``(cases, skipped)`` for ``spec`` and candidate ``dtype``; deterministic in ``seed``.

    ``size`` is ``"full"`` or ``"ci"`` (no input above :data:`CI_MAX_ELEMENTS` elements).
    """
    if size not in ("full", "ci"):
        raise ValueError(f"size must be 'full' or 'ci', got {size!r}")
    fmt = get_format(dtype)
    cases, skipped, seen = [], [], set()

    def add(sample, name, tags):
        x = _x_of(sample)
        if size == "ci" and x is not None and x.size > CI_MAX_ELEMENTS:
            return
        while name in seen:
            name += "'"
        seen.add(name)
        case, reason = _make_case(spec, sample, fmt, seed, name, tags)
        if case is None:
            skipped.append(Skipped(spec.name, name, fmt.name, reason, case_shape(sample)))
        else:
            cases.append(case)

    oracle = list(spec.oracle_inputs(case_rng(seed, spec.name, "oracle_inputs"))) \
        if spec.oracle_inputs else []
    small = list(spec.sample_inputs(case_rng(seed, spec.name, "sample_inputs")))
    for s in oracle:
        add(s, f"oracle:{s.name}", ("oracle",))
    for s in small:
        add(s, f"sample:{s.name}", ("sample",))
    base = _base_sample(spec, small + oracle)
    if base is not None:
        x = _x_of(base)
        _, _, cache = spec.run(base)
        groups = groups_of(spec, base, cache)
        for regime in REGIMES:
            rng = case_rng(seed, spec.name, "regime", regime)
            xr = _regime_x(regime, x, fmt, rng, groups)
            sample = base._replace(arrays=(xr,) + tuple(base.arrays[1:]))
            tags = ("regime", regime) + (("nonfinite",) if regime in ("nan", "inf") else ())
            add(sample, f"regime:{regime} {base.name}", tags)
    return cases, skipped


def with_dtype(case: Case, dtype) -> Case:
    """The same case for another dtype (inputs rounded again; used by tests)."""
    fmt = get_format(dtype)
    return replace(case, dtype=fmt.name,
                   arrays=tuple(None if a is None else round_to(a, fmt) for a in case.arrays),
                   kwargs=_round_kwargs(case.kwargs, fmt), dy=round_to(case.dy, fmt),
                   douts={k: round_to(v, fmt) for k, v in case.douts.items()})
