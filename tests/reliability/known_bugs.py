"""Bugs found by the reliability tests, reported to the variants' authors and not fixed yet.

Each entry says which calls it explains (``applies(call)``), which failure kinds it explains,
and gives one concrete, deterministic call that shows it (``example()``). The tests use the
table twice:

* ``tests/test_reliability.py::test_known_bug`` runs each ``example`` under
  ``pytest.mark.xfail(strict=True)``: it fails today, and turns into an XPASS, which fails the
  suite, once the bug is fixed;
* the property tests accept a failure on a generated call only when an entry ``applies`` to that
  call and explains every failure kind it shows.

**After fixing a bug, delete its entry**: the strict xfail goes away and the property tests
check the regime again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from refnorm.norms import BY_NAME


@dataclass(frozen=True)
class KnownBug:
    id: str
    variants: tuple[str, ...]
    kinds: tuple[str, ...]          # the Failure kinds it explains
    applies: Callable               # (call) -> bool
    example: Callable               # (variant) -> Call
    reason: str
    outputs: tuple[str, ...] = ()   # when given, it explains failures of these outputs only


def _one_element_rows_float16(call):
    """LayerNorm rows (or qk_norm LayerNorm head vectors) of one element, in float16 (where the
    error is not covered by the sensitivity to x's rounding: all-zero x)."""
    import numpy as np

    kw = call.sample.kwargs
    x = call.sample.arrays[0]
    if call.dtype != np.float16 or x.ndim == 0 or np.any(x):
        return False
    if call.spec.name == "qk_norm":
        return kw.get("norm", "layer") == "layer" and x.shape[-1] == 1
    ns = kw.get("normalized_shape")
    ns = (ns,) if isinstance(ns, int) else tuple(ns or ())
    return bool(ns) and int(np.prod(ns)) == 1


def _one_element_rows_float16_example(variant):
    import numpy as np

    from refnorm.registry import SampleInput
    from reliability.strategies import Call

    x = np.zeros((3, 1), np.float16)   # zeros: no rounding of x can excuse a nonzero dx
    w, b = np.array([1.7], np.float16), np.array([0.3], np.float16)
    kw = dict(norm="layer", eps=1e-5) if variant == "qk_norm" else \
        dict(normalized_shape=(1,), eps=1e-5)
    dy = np.array([[0.9], [0.33], [-0.77]], np.float16)
    return Call(BY_NAME[variant], SampleInput("one-element rows", (x, w, b), kw), dy,
                np.float16, "zeros", 0, "one-element rows")


KNOWN_BUGS: tuple = (
    KnownBug(
        id="layer-norm-float16-one-element-dx",
        variants=("layer_norm", "qk_norm"),
        kinds=("inaccurate",),
        applies=_one_element_rows_float16,
        example=_one_element_rows_float16_example,
        reason=("layer_norm_backward, float16, rows of one element: dx must be exactly 0 "
                "(xhat = 0, g - <g> = 0), but g = gamma dy is rounded to float16 in dx's buffer "
                "before <g>, summed in float32, is subtracted; the residue times r = eps^-1/2 "
                "remains (0.08 for eps = 1e-5). Found through qk_norm, which calls it; core "
                "layer_norm.py is not this branch's to edit: reported to the lead."),
        outputs=("dx",),
    ),
)


def explaining(call, failures):
    """The known bug(s) that together explain every failure of ``call`` (the first one is
    returned), or None when some failure is not explained."""
    if not failures:
        return None
    candidates = [b for b in KNOWN_BUGS if call.spec.name in b.variants
                  and any(_matches(b, f) for f in failures)]
    applicable = [b for b in candidates if b.applies(call)]
    if applicable and all(any(_matches(b, f) for b in applicable) for f in failures):
        return applicable[0]
    return None


def _matches(bug, failure):
    return failure.kind in bug.kinds and (not bug.outputs
                                          or failure.detail.split(":")[0] in bug.outputs)


def xfail_params():
    """``(bug, variant)`` pairs for the registered variants, for the strict-xfail test."""
    return [(bug, v) for bug in KNOWN_BUGS for v in bug.variants if v in BY_NAME]


# Keyword arguments and arrays: key -> (id, reason); each is a strict xfail whose marker says
# the id (the reason is here). Keys: (variant, argument, label of the value in
# tests/test_reliability.py::BAD_VALUES) for keyword arguments; (variant, argument, kind) for
# ndarray subclasses ("matrix", "masked"); (variant, "mixed", dtype of x) for mixed dtypes.
API_BUGS: dict = {}

ARRAY_BUGS: dict = {}


def marker_reason(note) -> str:
    """The short xfail reason: the bug's id and where its description is."""
    return f"known bug {note[0]} (see tests/reliability/known_bugs.py)"
