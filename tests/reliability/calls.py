"""Calling any registered variant generically, and the pieces of the reliability contract.

A *call* is a :class:`refnorm.registry.SampleInput` plus an upstream gradient ``dy`` (a tuple
of them, one per output, for a record with several: :func:`map_dy`). Its *outcome* is either an
exception or the outputs: ``y`` (and every other output by its name), the new state's arrays
(``state.<field>``) and every gradient (``d<name>``), each a NumPy array. Everything here works
from the record (``NormSpec``) alone, so a new variant is covered without edits.
"""
from __future__ import annotations

import inspect
import re
import sys
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np

from refnorm.registry import SampleInput

# The exceptions a variant may raise for *values* (not shapes or arguments): the message must
# match. Anything else that depends on the values of a finite input is a bug. The key is the
# record's name.
VALUE_ERRORS = {
    # a zero (or non-finite) slice of v has no direction: documented in weight_norm's docstring
    "weight_norm": r"`v` has a slice with zero norm \(or NaN\)",
    # sigma = u^T W v = 0: documented in spectral_norm's docstring
    "spectral_norm": r"sigma = u\^T W v is",
    # a non-finite segmentation map or modulation-network parameter: documented in spade's
    "spade": r"`(segmap|shared_weight|shared_bias|gamma_weight|gamma_bias|beta_weight|"
             r"beta_bias)` must be finite",
    # sigma = u^T W v = 0 (or NaN): documented in sigma_reparam's docstring
    "sigma_reparam": r"sigma = u\^T W v is",
}

LONGDOUBLE_IS_WIDER = np.finfo(np.longdouble).eps < np.finfo(np.float64).eps


# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------
def float_slots(spec, sample):
    """Where the floating-point arrays of a call are: ``("arg", i)`` for the i-th differentiable
    array, ``("kw", name)`` for a keyword argument (running statistics, power-iteration state)."""
    slots = [("arg", i) for i, a in enumerate(sample.arrays)
             if isinstance(a, np.ndarray) and a.dtype.kind == "f"]
    slots += [("kw", k) for k, v in sample.kwargs.items()
              if isinstance(v, np.ndarray) and v.dtype.kind == "f"]
    return slots


def get_slot(sample, slot):
    kind, key = slot
    return sample.arrays[key] if kind == "arg" else sample.kwargs[key]


def slot_name(spec, slot):
    kind, key = slot
    return spec.diff_argnames[key] if kind == "arg" else key


def replace_slots(sample, values: dict):
    """A new sample with ``{slot: array}`` replaced."""
    arrays = list(sample.arrays)
    kwargs = dict(sample.kwargs)
    for (kind, key), v in values.items():
        if kind == "arg":
            arrays[key] = v
        else:
            kwargs[key] = v
    return sample._replace(arrays=tuple(arrays), kwargs=kwargs)


_FOLLOWERS = {}


def followers(spec) -> tuple:
    """The positions of the differentiable inputs besides ``x`` that have ``x``'s shape in every
    sample of the record where they are given (the ``residual`` of the fused residual-add
    norms): a call that changes ``x``'s shape changes theirs (:func:`with_x`)."""
    if spec.name not in _FOLLOWERS:
        follow = None
        for s in spec.sample_inputs(np.random.default_rng(0)):
            x = s.arrays[0]
            same = {i for i, a in enumerate(s.arrays) if i and isinstance(a, np.ndarray)
                    and isinstance(x, np.ndarray) and a.shape == x.shape}
            other = {i for i, a in enumerate(s.arrays) if i and a is not None} - same
            follow = same if follow is None else follow | same
            follow -= other
        _FOLLOWERS[spec.name] = tuple(sorted(follow or ()))
        for s in spec.sample_inputs(np.random.default_rng(0)):  # and never elsewhere
            for i in tuple(_FOLLOWERS[spec.name]):
                a = s.arrays[i]
                if a is not None and a.shape != s.arrays[0].shape:
                    _FOLLOWERS[spec.name] = tuple(j for j in _FOLLOWERS[spec.name] if j != i)
    return _FOLLOWERS[spec.name]


def with_x(spec, sample, x, fill=None, always=False):
    """The sample with ``x`` replaced, and its :func:`followers` given ``x``'s shape:
    ``fill(shape, dtype)`` (default: standard normal values) where their shape differs from
    ``x``'s, or everywhere with ``always``."""
    updates = {("arg", 0): x}
    for i in followers(spec):
        a = sample.arrays[i]
        if a is not None and (always or a.shape != x.shape):
            updates[("arg", i)] = fill(x.shape, a.dtype) if fill is not None else \
                np.random.default_rng(i).standard_normal(x.shape).astype(a.dtype)
    return replace_slots(sample, updates)


def map_floats(spec, sample, fn):
    """Apply ``fn`` to every floating-point array of the call."""
    return replace_slots(sample, {s: fn(get_slot(sample, s)) for s in float_slots(spec, sample)})


def cast(spec, sample, dtype):
    return map_floats(spec, sample, lambda a: a.astype(dtype))


def copy_inputs(sample):
    """A deep copy of every array of the call (what the outcome is compared against)."""
    def cp(v):
        return v.copy() if isinstance(v, np.ndarray) else v
    return sample._replace(arrays=tuple(cp(a) for a in sample.arrays),
                           kwargs={k: cp(v) for k, v in sample.kwargs.items()})


def assert_unchanged(sample, snapshot, dy=None, dy_snapshot=None):
    """Every array of the call (and ``dy``) still holds its bytes, dtype and shape."""
    pairs = list(zip(sample.arrays, snapshot.arrays))
    pairs += [(v, snapshot.kwargs[k]) for k, v in sample.kwargs.items()]
    pairs += list(zip(dy_arrays(dy), dy_arrays(dy_snapshot)))
    for now, before in pairs:
        if isinstance(now, np.ndarray):
            assert now.dtype == before.dtype and now.shape == before.shape
            assert now.tobytes() == before.tobytes(), "an input was mutated"


def default_eps_for(spec, dtype):
    """The ``eps`` a variant uses for ``eps=None`` at ``dtype``, when its module defines
    ``default_eps`` (RMSNorm: the machine epsilon of the dtype promoted to float32)."""
    module = sys.modules.get(spec.forward.__module__)
    fn = getattr(module, "default_eps", None)
    return None if fn is None else float(fn(dtype))


def resolve_dtype_defaults(spec, sample, dtype):
    """``eps=None`` made explicit for ``dtype``, so a reference computed at another precision
    uses the same eps as the call at ``dtype`` (the variant's default depends on the dtype)."""
    if "eps" in sample.kwargs and sample.kwargs["eps"] is None:
        eps = default_eps_for(spec, dtype)
        if eps is not None:
            return sample._replace(kwargs={**sample.kwargs, "eps": eps})
    return sample


# ------------------------------------------------------------------------------------------
# Outcomes
# ------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    error: BaseException | None = None
    outputs: dict = field(default_factory=dict)     # name -> ndarray
    y: np.ndarray | None = None
    grads: tuple | None = None
    cache: object = None
    warnings: tuple = ()

    @property
    def ok(self):
        return self.error is None


def state_arrays(state) -> dict:
    """The new state as ``{"state.<field>": ndarray}`` (None fields dropped)."""
    if state is None:
        return {}
    items = state._asdict().items() if hasattr(state, "_asdict") else \
        state.items() if isinstance(state, dict) else [("value", state)]
    return {f"state.{k}": np.asarray(v) for k, v in items if v is not None}


def make_dy(shape, dtype, seed):
    """A random upstream gradient (never all ones: that makes BatchNorm's dx vanish)."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def make_upstream(spec, shapes, dtype, seed):
    """Random upstream gradients of every output (``shapes``, in ``spec.outputs`` order), as
    ``spec.backward`` takes them (the first is :func:`make_dy` of ``seed``)."""
    return spec.upstream(make_dy(shape, dtype, seed + k) for k, shape in enumerate(shapes))


def map_dy(dy, fn):
    """``fn`` applied to every array of an upstream gradient (a tuple of them for a record
    with several outputs); None stays None."""
    if dy is None:
        return None
    return tuple(fn(d) for d in dy) if isinstance(dy, tuple) else fn(dy)


def dy_arrays(dy) -> list:
    """The arrays of an upstream gradient, as a list."""
    return [] if dy is None else list(dy) if isinstance(dy, tuple) else [dy]


def execute(spec, sample, dy=None, *, dy_seed=0, backward=True) -> Outcome:
    """Forward (and backward with ``dy``, or a random ``dy`` of ``y``'s shape and dtype).

    Floating-point warnings are silenced and recorded; an exception is returned, not raised.
    """
    with warnings.catch_warnings(record=True) as caught, np.errstate(all="ignore"):
        warnings.simplefilter("always")
        try:
            y, state, cache = spec.run(sample)
            ys = spec.output_values(y)
            out = Outcome(y=ys[0], cache=cache)
            out.outputs.update(zip(spec.outputs, ys))
            out.outputs.update(state_arrays(state))
            if backward:
                if dy is None:
                    dy = make_upstream(spec, [v.shape for v in ys], ys[0].dtype, dy_seed)
                grads = spec.backward(dy, cache)
                out.grads = tuple(grads)
                for name, g in zip(spec.diff_argnames, grads):
                    if g is not None:
                        out.outputs["d" + name] = g
        except Exception as exc:  # noqa: BLE001 - the outcome is judged by the caller
            out = Outcome(error=exc)
    out.warnings = tuple(sorted({str(w.message) for w in caught}))
    return out


def is_documented_error(spec, exc) -> bool:
    """refnorm's convention: a ValueError/TypeError whose message starts with the op's name
    and names the offending argument in backticks (or states the rule, as PyTorch's
    "Expected more than 1 value per channel")."""
    if not isinstance(exc, (ValueError, TypeError)):
        return False
    msg = str(exc)
    return msg.startswith(f"{spec.name}: ") and ("`" in msg or "Expected" in msg)


def describe(exc) -> str:
    return f"{type(exc).__name__}: {exc}"


def is_value_error(spec, exc) -> bool:
    """An allowed value-dependent exception (:data:`VALUE_ERRORS`)."""
    pattern = VALUE_ERRORS.get(spec.name)
    return bool(pattern and is_documented_error(spec, exc) and re.search(pattern, str(exc)))


# ------------------------------------------------------------------------------------------
# The extended-precision reference and the tolerance model
# ------------------------------------------------------------------------------------------
def reference(spec, sample, dy, dtype) -> Outcome:
    """refnorm's own algorithm in ``np.longdouble`` (80-bit on x86: 11 more bits, and an
    exponent range that no 1e30 squared reaches) on the bit-identical inputs."""
    ld = cast(spec, resolve_dtype_defaults(spec, sample, dtype), np.longdouble)
    return execute(spec, ld, map_dy(dy, lambda d: d.astype(np.longdouble)))


def _jitter_cache(cache, jitter):
    """The cache with every floating-point array field jittered (other fields kept)."""
    if not hasattr(cache, "_replace"):
        return None
    fields = {}
    for name, value in cache._asdict().items():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            fields[name] = jitter(value)
        elif hasattr(value, "_replace"):  # a variant built on others keeps their caches
            fields[name] = _jitter_cache(value, jitter)
        elif hasattr(value, "_replace"):  # the cache of a stage (BCN holds BN's and GN's)
            inner = _jitter_cache(value, jitter)
            if inner is not None:
                fields[name] = inner
    return cache._replace(**fields)


def sensitivity(spec, sample, dy, dtype, ref: Outcome, trials=2, seed=0) -> dict:
    r"""How much the reference moves when its inputs are perturbed by about one rounding of
    ``dtype``: :math:`\max_k |f(a(1+u\xi_k)) - f(a)|` per output, with :math:`\xi` uniform in
    [-1, 1]. For the forward, the perturbed inputs are those of the call (the condition of the
    problem times the unit roundoff: what a backward-stable computation at ``dtype`` may be
    off by). For the gradients, additionally the *cache* of the reference forward (xhat, rstd,
    ...) and ``dy`` are perturbed: a backward is judged against the exact backward of a forward
    that is right to one rounding, which is what any implementation that keeps its forward's
    intermediate results can achieve (on a group of two elements, for example, dx is a
    difference of terms of size r|dy| whose exact value is eps/var times smaller)."""
    u = float(np.finfo(dtype).eps)
    rng = np.random.default_rng(seed)
    out = {k: 0.0 for k in ref.outputs}

    def jitter(a):
        return a * (1 + u * rng.uniform(-1, 1, np.shape(a)).astype(np.longdouble))

    def absorb(outputs, keys=None):
        for k, v in outputs.items():
            if k in out and (keys is None or k in keys) and v.dtype.kind == "f" \
                    and v.shape == ref.outputs[k].shape:
                with np.errstate(all="ignore"):
                    diff = np.abs(v - ref.outputs[k])
                finite = np.isfinite(diff)
                out[k] = max(out[k], float(np.max(diff[finite])) if finite.any() else 0.0)
                if not finite.all():
                    out[k] = np.inf

    base = cast(spec, resolve_dtype_defaults(spec, sample, dtype), np.longdouble)
    grads = [k for k in ref.outputs if k.startswith("d")]
    for _ in range(trials):
        pert = map_floats(spec, base, jitter)
        dyp = map_dy(dy, lambda d: jitter(d.astype(np.longdouble)))
        res = execute(spec, pert, dyp)
        if not res.ok:
            return {k: np.inf for k in out}
        absorb(res.outputs)
        if dy is not None and ref.cache is not None and grads:
            cache = _jitter_cache(ref.cache, jitter)
            if cache is not None:
                with warnings.catch_warnings(), np.errstate(all="ignore"):
                    warnings.simplefilter("ignore")
                    try:
                        g = spec.backward(dyp, cache)
                    except Exception:  # noqa: BLE001 - a cache the backward cannot take
                        continue
                absorb({"d" + n: a for n, a in zip(spec.diff_argnames, g) if a is not None},
                       grads)
    return out


def representable(ref: Outcome, dtype, key=None) -> bool:
    """Whether the reference output ``key`` (default: every output) is finite and within the
    range of ``dtype``."""
    big = float(np.finfo(dtype).max)
    for k, v in ref.outputs.items():
        if key is not None and k != key:
            continue
        if v.dtype.kind == "f" and not (np.isfinite(v).all() and np.all(np.abs(v) <= big)):
            return False
    return True


@dataclass
class Mismatch:
    output: str
    error: float
    tolerance: float
    detail: str

    def __str__(self):
        return f"{self.output}: error {self.error:.3g} > tolerance {self.tolerance:.3g} " \
               f"({self.detail})"


# C in  error <= C (sensitivity + u max|ref|), C = TOLERANCE_FACTOR * (1 + log2(elements)):
# calibrated on 36,000 generated calls (1,500 per variant and dtype, see
# docs/notes/reliability.rst): outside the regimes of the known bugs the largest ratio
# error / ((sensitivity + u max|ref|) (1 + log2 elements)) was 2.7, so 16 leaves a margin of 6,
# while a wrong result (0 for 1, NaN, a lost term) is off by orders of magnitude.
TOLERANCE_FACTOR = 16


def compare(out: Outcome, ref: Outcome, sens: dict, dtype, size=1) -> list[Mismatch]:
    """The outputs of a call at ``dtype`` against the reference; [] when all agree.

    Where the reference is not finite (0/0 at eps = 0 on a constant group) the call must give
    a non-finite value at the same place. Elsewhere
    ``|out - ref| <= C (sensitivity + u max|ref|)``, normwise per output, with
    ``C = TOLERANCE_FACTOR * (1 + log2 n)`` and ``n`` the larger of ``size`` (the number of
    elements of the call's input, a bound on every reduction length) and the output's size.
    """
    u = float(np.finfo(dtype).eps)
    big = float(np.finfo(dtype).max)
    bad = []
    for k, r in ref.outputs.items():
        got = out.outputs.get(k)
        if r.dtype.kind == "f" and np.any(np.abs(np.where(np.isfinite(r), r, 0)) > big):
            continue  # the exact output overflows the dtype (NaN elsewhere or not): anything
            #           is right there
        if got is None or r.dtype.kind != "f":
            if got is not None and not np.array_equal(got, r):
                bad.append(Mismatch(k, np.inf, 0, "integer state differs"))
            continue
        if got.shape != r.shape:
            bad.append(Mismatch(k, np.inf, 0, f"shape {got.shape} != {r.shape}"))
            continue
        rf = np.isfinite(r)
        gf = np.isfinite(got)
        if (rf & ~gf).any():
            i = np.argwhere(rf & ~gf)[0]
            bad.append(Mismatch(k, np.inf, 0, f"non-finite {got[tuple(i)]} at {tuple(i)} where "
                                              f"the reference is {float(r[tuple(i)]):.6g}"))
            continue
        if (~rf & gf).any():
            i = np.argwhere(~rf & gf)[0]
            bad.append(Mismatch(k, np.inf, 0, f"finite {got[tuple(i)]} at {tuple(i)} where the "
                                              f"reference is {r[tuple(i)]}"))
            continue
        if not rf.any():
            continue
        rv = r[rf]
        gv = got[rf].astype(np.longdouble)
        scale = float(np.max(np.abs(rv)))
        err = float(np.max(np.abs(gv - rv)))
        factor = TOLERANCE_FACTOR * (1 + np.log2(max(r.size, size, 1)))
        # a result in the subnormal range carries an absolute rounding error of up to half the
        # smallest subnormal, whatever its relative size: no implementation does better
        tiny = float(np.finfo(got.dtype).smallest_subnormal) if got.dtype.kind == "f" else 0.0
        with np.errstate(over="ignore"):  # an infinite sensitivity: anything goes
            tol = factor * (sens.get(k, 0.0) + u * scale + tiny)
        if not err <= tol:
            i = np.unravel_index(np.argmax(np.where(rf, np.abs(got.astype(np.longdouble) - r), 0)),
                                 r.shape)
            bad.append(Mismatch(k, err, tol, f"worst at {tuple(int(j) for j in i)}: got "
                                             f"{got[i]!r}, reference {float(r[i]):.8g}; "
                                             f"max|ref| {scale:.3g}"))
    return bad


# ------------------------------------------------------------------------------------------
# Shapes: which axes of the first array a call lets us resize
# ------------------------------------------------------------------------------------------
_FREE_AXES: dict = {}


def free_axes(spec, sample) -> tuple[int, ...]:
    """Axes of ``sample.arrays[0]`` that can be resized without touching anything else of the
    call (the batch axis, spatial axes, LRN's channel axis...): both one and two more elements
    are accepted on a standard-normal input. Probed once per sample and cached."""
    key = (spec.name, sample.name)
    if key not in _FREE_AXES:
        x = sample.arrays[0]
        free = []
        for axis in range(x.ndim):
            ok = True
            for extra in (1, 2):
                shape = list(x.shape)
                shape[axis] += extra
                probe = np.random.default_rng(0).standard_normal(shape).astype(x.dtype)
                res = execute(spec, with_x(spec, sample, probe), backward=False)
                ok = ok and res.ok
            if ok:
                free.append(axis)
        _FREE_AXES[key] = tuple(free)
    return _FREE_AXES[key]


def group_axes(spec, sample):
    """Axes over which the variant's statistics run for this call (``stats_axes``), or None."""
    if spec.stats_axes is None:
        return None
    try:
        return spec.stats_axes(sample)
    except Exception:  # noqa: BLE001 - a record whose stats_axes does not apply to this call
        return None


def declares(spec, sample, invariance) -> bool:
    """Whether this call has the declared ``invariance`` ("shift": adding one constant to all of
    ``x``; "scale": multiplying ``x`` by a > 0 and ``eps`` by a^2): the variant declares it, and
    (where it has ``stats_axes``) this call standardizes with its own statistics (not BatchNorm
    in eval mode, whose running statistics are constants)."""
    if invariance not in spec.invariances:
        return False
    return spec.stats_axes is None or group_axes(spec, sample) is not None


def shift_invariant(spec, sample) -> bool:
    return declares(spec, sample, "shift")


def accepts(fn, name) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


# ------------------------------------------------------------------------------------------
# Non-finite inputs: which outputs depend on which input element
# ------------------------------------------------------------------------------------------
def dependency_cone(spec, sample, dy, slot, index, *, to_the_limit=False) -> dict:
    """``{output: bool mask}`` of the output elements that change when the input element
    ``index`` of ``slot`` changes (finite perturbations: an increase and a halving, and two
    extreme moves; a move the variant rejects, e.g. a negative running variance, is skipped).
    Computed in extended precision, so that a dependency is not lost to the rounding of a
    low-precision dtype. ``to_the_limit`` adds moves to the largest finite values of the
    element's dtype: an injected inf is the limit beyond them, and a selection can switch only
    there (FRN's TLU when a learned eps of 1e300 drives every normalized value to 0)."""
    limit = float(np.finfo(get_slot(sample, slot).dtype).max)
    sample = cast(spec, resolve_dtype_defaults(spec, sample, sample.arrays[0].dtype),
                  np.longdouble)
    dy = map_dy(dy, lambda d: d.astype(np.longdouble))
    base = execute(spec, sample, dy)
    a = get_slot(sample, slot)
    scale = float(np.max(np.abs(a))) + 1.0
    masks = {k: np.zeros(v.shape, bool) for k, v in base.outputs.items()}
    # two moderate moves, and two extreme ones in either direction: an injected NaN or inf
    # stands for a value beyond any finite one, and a selection (FRN's TLU, EvoNorm-B0's max)
    # switches sides only for values far enough out
    big = 1e6 * (abs(a[index]) + scale)
    moves = [a[index] + 0.5 * (abs(a[index]) + scale), a[index] * 0.5 - 0.25 * scale,
             a[index] + big, a[index] - big]
    for new in moves + ([limit, -limit] if to_the_limit else []):
        b = a.copy()
        b[index] = new
        res = execute(spec, replace_slots(sample, {slot: b}), dy)
        if not res.ok:
            continue
        for k, v in res.outputs.items():
            if k in masks and v.shape == masks[k].shape:
                with np.errstate(invalid="ignore"):
                    old = base.outputs[k]
                    masks[k] |= ~((v == old) | (np.isnan(v) & np.isnan(old)))
    return masks


def composite_outcome(spec, sample, dy) -> Outcome:
    """The same call through the variant's ``composite`` (the formula written with engine
    primitives, differentiated by the engine): an independent implementation, whose NaN
    pattern is what the textbook formula gives."""
    from refnorm.autograd import Tensor
    from refnorm.verify import backward_outputs

    if spec.composite is None:
        return Outcome(error=NotImplementedError("no composite"))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            tensors = [None if a is None else Tensor(a, requires_grad=True)
                       for a in sample.arrays]
            result = spec.composite(**spec.arguments(sample, tensors))
            y_t, state = (result[0], result[1]) if spec.stateful else (result, None)
            ys = spec.output_values(y_t)
            backward_outputs(spec, y_t, dy)
            out = Outcome(y=np.asarray(ys[0].data))
            out.outputs.update((n, np.asarray(t.data)) for n, t in zip(spec.outputs, ys))
            out.outputs.update(state_arrays(state))
            for name, t in zip(spec.diff_argnames, tensors):
                if t is not None and t.grad is not None:
                    out.outputs["d" + name] = np.asarray(t.grad)
        except Exception as exc:  # noqa: BLE001
            return Outcome(error=exc)
    return out


def seed_of(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def as_sample(name, arrays, kwargs) -> SampleInput:
    return SampleInput(name, tuple(arrays), dict(kwargs))
