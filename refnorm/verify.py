"""Three-way gradient checks of every registered item: what ``refnorm verify`` runs.

For a normalization variant and each of its sample inputs, with a random upstream gradient
(for every output, where the record has several):

* **hand**: the hand-derived ``backward``;
* **engine**: the engine's gradient of the variant's ``composite`` (the same math written with
  primitives, differentiated mechanically);
* **FD**: central finite differences of ``forward`` (:func:`refnorm.gradcheck.check_vjp`,
  slow mode: every element, Richardson-extrapolated).

A variant with ``gradient="surrogate"`` (PowerNorm, Unified Normalization: their official
backward is an approximation) is checked differently: its hand ``backward`` against the
record's ``surrogate`` (the same approximate backward written a second, independent way); the
engine gradient of its ``composite``, the **exact** gradient of the forward, against FD; and
the normwise distance between the surrogate and the exact gradient is reported per sample,
labelled "surrogate vs true gradient" (not a failure: it is what the approximation costs).

For a primitive, "hand" is its VJP rule applied to arrays, "engine" the same rule recorded on
Tensors (the path that gives gradients of gradients), and FD checks the rule. For an optimizer,
the step is checked against the optimizer's equations written out independently.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from refnorm.autograd import Tensor, gradients
from refnorm.gradcheck import GradcheckReport, check_vjp

HAND_ENGINE_RTOL = 1e-10
FD_RTOL = 1e-9
EQUATIONS_RTOL = 1e-12


@dataclass
class Result:
    kind: str                 # "primitive", "norm" or "optimizer"
    name: str
    cases: int
    hand_engine: float        # max normwise relative error, NaN where not applicable
    hand_fd: float            # max normwise error of the hand gradient against FD
    passed: bool
    note: str = ""
    details: list = field(default_factory=list)   # one line per sample, printed under the row
    inconclusive: bool = False  # a finite-difference check could not decide (never a pass)

    @property
    def status(self) -> str:
        """``"pass"``, ``"FAIL"`` or ``"INCONCLUSIVE"`` (not passed, but nothing found wrong)."""
        return "pass" if self.passed else "INCONCLUSIVE" if self.inconclusive else "FAIL"


def normwise(a, b, dtype=np.float64):
    """max|a - b| / max|b|, computed in ``dtype``: the relative error of ``a`` at the scale of
    ``b`` (0 for empty arrays; the absolute error where ``b`` is all zero)."""
    a, b = np.asarray(a, dtype=dtype), np.asarray(b, dtype=dtype)
    if b.size == 0:
        return 0.0
    scale = np.max(np.abs(b))
    err = np.max(np.abs(a - b))
    return float(err / scale) if scale > 0 else float(err)


def _rng_for(name):
    return np.random.default_rng(zlib.crc32(name.encode()))


def _max(values):
    values = [v for v in values if not math.isnan(v)]
    return max(values) if values else float("nan")


# ----------------------------------------------------------------------------------------------
# primitives
# ----------------------------------------------------------------------------------------------
def primitive_functions(spec, sample):
    """``(f, vjp, arrays)`` of a primitive at ``sample`` in refnorm.gradcheck's protocol: ``f``
    runs the op on arrays, ``vjp`` its engine gradient (``create_graph=True``: the rule recorded
    on Tensors, the path of gradients of gradients)."""
    n = len(sample.arrays)
    present = [i for i in range(n) if sample.arrays[i] is not None]

    def call(arrays, requires_grad=False):
        full = list(sample.arrays)
        tensors = []
        for i, a in zip(present, arrays):
            full[i] = Tensor(a, requires_grad=requires_grad)
            tensors.append(full[i])
        return spec.op(*full, **sample.kwargs), tensors

    def f(*arrays):
        return call(arrays)[0].data

    def vjp(cotangents, *arrays, create_graph=False):
        out, tensors = call(arrays, requires_grad=True)
        g = cotangents[0]
        grads = gradients(out, tensors, Tensor(g) if create_graph else g,
                          create_graph=create_graph)
        return tuple(gr.data if isinstance(gr, Tensor) else gr for gr in grads)

    return f, vjp, [sample.arrays[i] for i in present]


def verify_primitive(spec) -> Result:
    rng = _rng_for(spec.name)
    hand_engine, hand_fd, passed, cases, inconclusive, failed = [], [], True, 0, False, False
    for sample in spec.sample_inputs(rng):
        cases += 1
        f, vjp, arrays = primitive_functions(spec, sample)
        report = check_vjp(f, vjp, arrays, mode="slow", rng=rng, rtol=FD_RTOL, atol=1e-12)
        passed &= bool(report)
        inconclusive |= report.inconclusive
        failed |= not report and not report.inconclusive
        hand_fd.append(report.normwise_error)
        if spec.twice and sample.arrays and sample.arrays[0].size:
            u = rng.standard_normal(np.shape(f(*arrays)))
            plain = vjp((u,), *arrays)
            recorded = vjp((u,), *arrays, create_graph=True)
            errs = [normwise(a, b) for a, b in zip(recorded, plain)]
            hand_engine.append(_max(errs))
            agree = _max(errs) <= HAND_ENGINE_RTOL or math.isnan(_max(errs))
            passed, failed = passed and agree, failed or not agree
    return Result("primitive", spec.name, cases, _max(hand_engine), _max(hand_fd), passed,
                  inconclusive=inconclusive and not failed)


# ----------------------------------------------------------------------------------------------
# normalization variants
# ----------------------------------------------------------------------------------------------
def norm_gradients(spec, sample, dy, cache=None):
    """The hand-derived and the engine gradients of ``spec`` at ``sample`` for upstream ``dy``
    (``cache``: the forward's, if it has been run already). For a surrogate variant the engine
    gradient is the **exact** gradient of the forward, which the hand backward approximates."""
    hand = spec.backward(dy, spec.run(sample)[2] if cache is None else cache)
    engine = None
    if spec.composite is not None:
        tensors = [None if a is None else Tensor(a, requires_grad=True) for a in sample.arrays]
        out = spec.composite(**spec.arguments(sample, tensors))
        backward_outputs(spec, out[0] if spec.stateful else out, dy)
        engine = [None if t is None else t.grad for t in tensors]
    return hand, engine


def backward_outputs(spec, out, dy):
    """Backpropagate from ``out``, the op's or the composite's result (a tuple of Tensors for a
    record with several outputs), the upstream gradients ``dy`` (what ``spec.backward``
    takes): one output's ``backward(dy)``, or the gradient of ``sum_k <dy_k, out_k>``."""
    outs, douts = spec.output_values(out), spec.output_values(dy)
    if len(outs) == 1:
        outs[0].backward(douts[0])
        return
    loss = None
    for o, d in zip(outs, douts):
        term = (o * d).sum()
        loss = term if loss is None else loss + term
    loss.backward()


def _distance(first, second, n):
    """The largest normwise error over the first ``n`` gradients present in ``first``."""
    return _max([normwise(a, b) for a, b in zip(list(first)[:n], list(second)[:n])
                 if a is not None])


class SampleCheck(NamedTuple):
    """The checks of one sample (see :func:`check_norm_sample`)."""

    hand_second: float         # hand backward vs its second formulation
    report: GradcheckReport    # finite differences of the exact gradient
    surrogate_distance: float  # surrogate vs exact gradient; NaN for exact variants

    @property
    def hand_engine(self):     # the name of the first entry for exact variants
        return self.hand_second


def check_norm_sample(spec, sample, rng, *, rtol=FD_RTOL, dy=None,
                      unfrozen=False) -> SampleCheck:
    """The three-way check of one sample, with ``dy`` (default: random from ``rng``).

    * ``gradient="exact"``: ``hand_second`` is the normwise error between the hand-derived
      and the engine gradients (NaN without a composite), and ``report`` the finite-difference
      check of the hand-derived backward.
    * ``gradient="surrogate"``: ``hand_second`` compares the hand backward with the record's
      ``surrogate`` (the same approximate backward, written independently); ``report`` checks
      the engine gradient of ``composite`` (the exact gradient) against finite differences; and
      ``surrogate_distance`` is the normwise distance between the surrogate and that exact
      gradient: what the approximation costs on this sample.
    * a stop-gradient surrogate (a record with ``freeze``: quantities such as Batch Renorm's r
      and d held constant): ``hand_second`` and ``report`` as for an exact gradient, with the
      finite differences taken of the call with those quantities fixed (``freeze``), unless
      ``unfrozen`` (the report then measures the distance to the plain forward's derivative).
    """
    y, _, cache = spec.run(sample)
    if dy is None:  # random, for every output
        dy = spec.upstream(rng.standard_normal(np.shape(v)) for v in spec.output_values(y))
    hand, engine = norm_gradients(spec, sample, dy, cache)
    n = len(spec.diff_argnames)
    surrogate = spec.gradient == "surrogate" and spec.freeze is None
    present = [i for i, a in enumerate(sample.arrays) if a is not None]

    def full(arrays):
        out = list(sample.arrays)
        for i, a in zip(present, arrays):
            out[i] = a
        return out

    # a stop-gradient surrogate: finite differences of the call with those quantities fixed
    fd_sample = sample if spec.freeze is None or unfrozen else spec.freeze(sample, cache)

    def f(*arrays):
        return spec.output(fd_sample, full(arrays))

    def vjp_hand(cotangents, *arrays):
        grads = spec.backward(spec.upstream(cotangents), spec.run(sample, full(arrays))[2])
        return tuple(grads[i] for i in present)

    def vjp_engine(cotangents, *arrays):
        _, grads = norm_gradients(spec, sample._replace(arrays=tuple(full(arrays))),
                                  spec.upstream(cotangents), cache)
        return tuple(grads[i] for i in present)

    if surrogate:
        if spec.surrogate is None or engine is None:
            raise ValueError(f"{spec.name}: a surrogate gradient needs `surrogate` and "
                             f"`composite` in its record")
        second = spec.surrogate(dy, **spec.arguments(sample))
        hand_second = _distance(hand, second, n)
        distance = _distance(hand, engine, n)
        vjp = vjp_engine
    else:
        hand_second = float("nan") if engine is None else _distance(hand, engine, n)
        distance = float("nan")
        vjp = vjp_hand
    report = check_vjp(f, vjp, [sample.arrays[i] for i in present], mode="slow", rng=rng,
                       rtol=rtol, atol=1e-12)
    return SampleCheck(hand_second, report, distance)


def verify_norm(spec) -> Result:
    rng = _rng_for(spec.name)
    hand_engine, hand_fd, passed, cases, note = [], [], True, 0, ""
    true_gap = []
    details = []
    failed = inconclusive = False  # a FAIL anywhere outranks an INCONCLUSIVE elsewhere
    for sample in spec.sample_inputs(rng):
        cases += 1
        he, report, distance = check_norm_sample(spec, sample, rng)
        if spec.freeze is not None:  # how far the surrogate is from the true derivative
            distance = check_norm_sample(spec, sample, rng, unfrozen=True)[1].normwise_error
            true_gap.append(distance)
        hand_engine.append(he)
        hand_fd.append(report.normwise_error)
        if report.inconclusive:
            passed, inconclusive = False, True
            note = note or f"{sample.name}: finite differences could not resolve the tolerance"
        elif not report:
            passed, failed = False, True
            note = f"{sample.name}: {report.pattern or 'FD mismatch'}"
        if not math.isnan(he) and he > HAND_ENGINE_RTOL:
            what = "surrogate" if spec.surrogate is not None else "engine"
            passed, failed = False, True
            note = f"{sample.name}: hand and {what} differ by {he:.2e}"
        if spec.gradient == "surrogate":
            details.append(f"{sample.name}: surrogate vs true gradient {distance:.2e}")
    if spec.gradient != "exact":
        note = note or f"{spec.gradient} gradient: {spec.gradient_note}"
        if spec.freeze is not None:
            note += f"; max distance to the plain forward's derivative: {_max(true_gap):.2g}"
    return Result("norm", spec.name, cases, _max(hand_engine), _max(hand_fd), passed, note,
                  details, inconclusive=inconclusive and not failed)


# ----------------------------------------------------------------------------------------------
# optimizers
# ----------------------------------------------------------------------------------------------
def verify_optimizer(spec) -> Result:
    if spec.check is None:
        return Result("optimizer", spec.name, 0, float("nan"), float("nan"), False,
                      "no check registered")
    err = float(spec.check(_rng_for(spec.name)))
    return Result("optimizer", spec.name, 1, float("nan"), float("nan"),
                  err <= EQUATIONS_RTOL, f"vs equations: {err:.2e}")


# ----------------------------------------------------------------------------------------------
# the registry, in one list
# ----------------------------------------------------------------------------------------------
def registered():
    """``[(kind, name, spec, verifier)]`` for everything registered."""
    from refnorm.norms import ALL_SPECS
    from refnorm.optim import ALL_OPTIMIZERS
    from refnorm.primitive_specs import PRIMITIVES

    return ([("primitive", s.name, s, verify_primitive) for s in PRIMITIVES]
            + [("norm", s.name, s, verify_norm) for s in ALL_SPECS]
            + [("optimizer", s.name, s, verify_optimizer) for s in ALL_OPTIMIZERS])
