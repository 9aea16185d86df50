"""Assertions for test suites that check an implementation against refnorm.

::

    from refnorm.testing import assert_matches_reference

    def test_my_layer_norm_bf16():
        assert_matches_reference(my_candidate, "layer_norm", dtype="bfloat16")

The candidate follows the protocol of :mod:`refnorm.oracle.adapters` (or is ``"torch"``,
``"jax"``, ``"module:function"``); everything :func:`refnorm.oracle.check` takes is accepted,
``frozen=("weight",)`` among it for a kernel that computes no weight gradient. A candidate that
writes into its inputs or into ``dy`` fails, with that diagnosis.
On failure the ``AssertionError`` carries the oracle's report: the failing cases and outputs,
the worst element, the error in ULPs against the tolerance, and the known mistake it matches.
"""
from __future__ import annotations

__all__ = ["assert_matches_reference"]


def assert_matches_reference(candidate, variant=None, dtype="float32", **kwargs):
    """Raise ``AssertionError`` (with the report) unless ``candidate`` passes the oracle.

    Returns the :class:`refnorm.oracle.Report` when it passes. ``size`` defaults to ``"ci"``
    here (the long rows stay in; the largest inputs go); pass ``size="full"`` for all of them.
    """
    from refnorm.oracle import check

    kwargs.setdefault("size", "ci")
    report = check(candidate, variant, dtype=dtype, **kwargs)
    if not report.passed:
        if not report.results:
            raise AssertionError(f"the oracle ran no case (variant={variant!r}, dtype={dtype!r}):"
                                 f" the candidate implements none of the selected variants\n"
                                 f"{report.format()}")
        raise AssertionError("the candidate does not match the refnorm reference\n"
                             + report.format(max_failures=8))
    return report
