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


KNOWN_BUGS: tuple = ()


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
