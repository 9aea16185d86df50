"""Helpers of the reliability and accuracy tests (``tests/test_reliability.py``,
``tests/test_accuracy.py``) and of ``benchmarks/accuracy.py``.

* :mod:`reliability.exact`: mpmath (50 digits) references of LayerNorm, RMSNorm, BatchNorm,
  GroupNorm and InstanceNorm, forward and backward, written from the math, and the ULP table.
* :mod:`reliability.calls`: calling any registered variant generically: snapshots of the
  inputs, the extended-precision reference, the exception contract, the dependency cone.
* :mod:`reliability.strategies`: the hypothesis strategies over every registered variant.
* :mod:`reliability.known_bugs`: the reported, not yet fixed bugs: each is a strict xfail.

Nothing here is collected by pytest (no ``test_`` prefix); the directory is importable because
pytest puts ``tests/`` on ``sys.path`` (rootdir-relative test modules without ``__init__``).
"""
