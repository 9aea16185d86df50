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

**One test per case.** :func:`cases` gives the oracle's cases as pytest parameters, and
:func:`assert_case` runs one of them, so that a kernel suite's CI lists every case on its own
line (``test_ln[layer_norm-bfloat16-(37,1000)] FAILED``) with the oracle's message for it::

    import pytest
    from refnorm.testing import assert_case, cases

    @pytest.mark.parametrize("case", cases("layer_norm", "bfloat16"))
    def test_my_layer_norm(case):
        assert_case(my_candidate, case)

pytest is imported by :func:`cases` only: refnorm itself does not need it.
"""
from __future__ import annotations

import unittest
from typing import Any, Mapping

__all__ = ["assert_matches_reference", "cases", "assert_case", "OracleCase", "CaseSkipped"]

#: keywords that :func:`cases` fixes for a case, so that :func:`assert_case` cannot change them
_FIXED = ("variant", "dtype", "seed", "size", "only", "cases")


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


class CaseSkipped(unittest.SkipTest):
    """Raised by :func:`assert_case` for a case the oracle does not judge: outside the
    accumulation format's range, one whose inputs overflow the dtype, or one the candidate
    declines (``NotImplementedError``). pytest reports it as skipped, with the oracle's
    reason; so does :mod:`unittest`."""


class OracleCase:
    """One case of the oracle, by name: cheap to build, holding no array.

    :func:`assert_case` generates and prepares it when it runs (through the oracle's cache, so
    the cases of one variant and dtype are prepared once per process). ``id`` is the pytest id
    (``layer_norm-bfloat16-(37,1000)``; :func:`refnorm.oracle.cases.case_ids`), ``name`` the
    oracle's own (``oracle:(37,1000)``), ``shape`` the shape of its first input, and
    ``check_kwargs`` the keywords given to :func:`cases`, passed on to
    :func:`refnorm.oracle.check`.
    """

    __slots__ = ("variant", "dtype", "name", "shape", "id", "seed", "size", "check_kwargs")

    def __init__(self, variant: str, dtype: str, name: str, shape, id: str, seed: int = 0,
                 size: str = "ci", check_kwargs: Mapping[str, Any] | None = None):
        self.variant, self.dtype, self.name, self.shape, self.id = variant, dtype, name, \
            shape, id
        self.seed, self.size = seed, size
        self.check_kwargs = dict(check_kwargs or {})

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.check_kwargs.items())
        return (f"OracleCase({self.id!r}, case={self.name!r}, seed={self.seed}, "
                f"size={self.size!r}{extra})")

    def __str__(self) -> str:
        return self.id


def _null_candidate(variant, inputs, dy, kwargs, *, dtype):
    raise NotImplementedError("listing the cases")


def cases(variant, dtype="float32", size="ci", **check_kwargs) -> list:
    """The oracle's cases of ``variant`` as pytest parameters, one per case.

    Returns a list of ``pytest.param(case, id=case.id)``, where ``case`` is an
    :class:`OracleCase` to pass to :func:`assert_case`, for
    ``@pytest.mark.parametrize("case", cases(...))``. Ids are readable and unique:
    ``layer_norm-bfloat16-(37,1000)``, followed by the case's name where two cases share the
    variant, dtype and shape (``layer_norm-float32-(4,6)-regime:nan``); ``refnorm compare
    --junit`` names its test cases the same way.

    Parameters
    ----------
    variant : str or list of str
        The variant(s) (``refnorm list`` shows them).
    dtype : str or list of str
        The candidate's dtype(s): ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"float64"``.
    size : {"ci", "full"}
        As for :func:`refnorm.oracle.check` (``"ci"``: the largest inputs left out, the long
        rows kept).
    **check_kwargs
        Any other keyword of :func:`refnorm.oracle.check` (``seed``, ``strict``, ``ftz``,
        ``frozen``, ``device``...). The cases are listed by the oracle's own ``check``, run
        with these keywords, and :func:`assert_case` passes them on.

    Every case the oracle generates is listed, also those it will skip (outside the
    accumulation format's range, say): :func:`assert_case` raises :class:`CaseSkipped` for
    them, with the reason. pytest is imported here, and only here.
    """
    import pytest

    from refnorm.oracle import check
    from refnorm.oracle.cases import case_ids
    from refnorm.oracle.formats import get_format

    for k in ("only", "cases", "variant"):
        if k in check_kwargs:
            raise TypeError(f"cases() got the keyword {k!r}, which it sets itself")
    seed = check_kwargs.pop("seed", 0)
    listing = {k: v for k, v in check_kwargs.items() if k not in ("diagnose", "progress")}
    dtypes = [dtype] if isinstance(dtype, str) else list(dtype)
    variants = variant if variant is None or isinstance(variant, str) else list(variant)
    params = []
    for d in dtypes:
        d = get_format(d).name
        # the oracle's own check lists the cases: a candidate that declines every one
        report = check(_null_candidate, variants, dtype=d, seed=seed, size=size,
                       diagnose=False, **listing)
        entries = {}
        for r in report.results:
            entries.setdefault(r.variant, []).append((r.case, r.shape))
        for s in report.skipped:
            entries.setdefault(s.variant, []).append((s.name, s.shape))
        for v, listed in entries.items():
            ids = case_ids(v, d, listed)
            for name, shape in listed:
                case = OracleCase(v, d, name, shape, ids[name], seed, size, check_kwargs)
                params.append(pytest.param(case, id=case.id))
    return params


def assert_case(candidate, case: OracleCase, **check_kwargs):
    """Run one case (from :func:`cases`) and raise ``AssertionError`` with the oracle's message
    for it unless ``candidate`` passes; return the :class:`refnorm.oracle.Report` of the case.

    The judgement is :func:`refnorm.oracle.check`'s own (``check(candidate, variant,
    only=case.name, ...)``): the same preparation, tolerance, FTZ, strict, frozen and device
    handling, the same test of writes into the inputs, and for a
    :func:`~refnorm.oracle.torch_function` the residual block ``x + f(x)`` on the variant's
    first case. The diagnosis is the one the oracle gives for this case: the line under the
    failure (``-> matches: unbiased variance``) is the same as in the full report; the
    variant's summary line is drawn from this case alone.

    ``check_kwargs`` are the keywords of :func:`refnorm.oracle.check` (any of them), over the
    ones given to :func:`cases`; the variant, dtype, seed and size are the case's own. A case
    the oracle does not judge (outside the format's range, declined by the candidate) raises
    :class:`CaseSkipped`, which pytest reports as skipped.
    """
    from refnorm.oracle import check

    if not isinstance(case, OracleCase):
        raise TypeError(f"case must be an OracleCase from refnorm.testing.cases(), got "
                        f"{type(case).__name__}")
    fixed = [k for k in _FIXED if k in check_kwargs]
    if fixed:
        raise TypeError(f"assert_case: {', '.join(fixed)} {'is' if len(fixed) == 1 else 'are'} "
                        f"fixed by the case; pass {'it' if len(fixed) == 1 else 'them'} to "
                        f"cases()")
    kwargs = {**case.check_kwargs, **check_kwargs}
    report = check(candidate, case.variant, dtype=case.dtype, seed=case.seed, size=case.size,
                   only=case.name, **kwargs)
    if report.unsupported:
        raise AssertionError(f"{case.id}: the candidate implements no {case.variant} (its "
                             f"`variants` attribute, or the adapter, leaves it out)")
    if not report.results:
        reason = report.skipped[0].reason if report.skipped else "no such case"
        raise CaseSkipped(f"{case.id}: {reason}")
    result = report.results[0]
    if result.status == "skipped":
        raise CaseSkipped(f"{case.id}: {result.message}")    # "not implemented by the ..."
    if not report.passed:
        raise AssertionError(f"{case.id}: the candidate does not match the refnorm reference\n"
                             + report.format())
    return report
