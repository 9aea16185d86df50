"""Shared fixtures: a seeded rng, the optional backends, and the REFNORM_REQUIRE_OPTIONAL rule.

Tests that need PyTorch, JAX or Triton take the ``torch``, ``jax`` or ``triton`` fixture (or
carry the marker of the same name). Where the package is missing they skip, unless
``REFNORM_REQUIRE_OPTIONAL=1`` is set (as in CI), in which case the skip becomes a failure.
"""
from __future__ import annotations

import importlib
import os

# One thread per process for BLAS and OpenMP (NumPy's OpenBLAS, PyTorch's intra-op pool): the
# suite runs one pytest-xdist worker per core, and workers whose libraries each start a thread
# per core oversubscribe the machine (idle OpenBLAS threads spin). Measured on 2 cores, the
# oracle and conventions tests took 127 s with the defaults and 95 s with one thread each.
# Set before NumPy is imported (the libraries read them once); workers and the subprocesses
# of the tests inherit them; an explicit setting wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402  (after the thread settings)
import pytest  # noqa: E402

try:  # a fixed, derandomised profile for CI; a longer one for local runs
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ci", max_examples=60, deadline=None, derandomize=True, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile(
        "long", max_examples=2000, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.load_profile(os.environ.get("REFNORM_HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover - hypothesis is in the test extras
    pass

OPTIONAL_MARKERS = ("torch", "jax", "triton")

# Triton reads TRITON_INTERPRET once, when it is first imported, and other libraries (PyTorch's
# compiler stack, JAX) may import it before test_triton.py runs. The suite checks Triton kernels
# on the CPU, in the interpreter; export TRITON_INTERPRET=0 to run them compiled on a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")


def require_optional() -> bool:
    return os.environ.get("REFNORM_REQUIRE_OPTIONAL", "") not in ("", "0")


def verify_rows(stdout: str, kinds) -> dict:
    """``{name: row}`` of the table that ``refnorm verify`` prints: the lines between its header
    and its footer whose first word is one of ``kinds`` (norm, optimizer, primitive)."""
    return {line.split()[1]: line for line in stdout.strip().splitlines()[1:-1]
            if line.split() and line.split()[0] in kinds}


def optional_import(name: str):
    """Import an optional package, or skip (fail under REFNORM_REQUIRE_OPTIONAL=1)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        msg = f"optional dependency {name!r} is not installed ({exc})"
        if require_optional():
            pytest.fail(msg + " but REFNORM_REQUIRE_OPTIONAL=1", pytrace=False)
        pytest.skip(msg)


@pytest.fixture
def rng():
    """A fresh generator with a fixed seed, so each test is reproducible on its own."""
    return np.random.default_rng(20261126)


@pytest.fixture
def torch():
    torch = optional_import("torch")
    torch.set_default_dtype(torch.float64)
    return torch


@pytest.fixture
def jax():
    jax = optional_import("jax")
    jax.config.update("jax_enable_x64", True)
    return jax


@pytest.fixture
def triton():
    return optional_import("triton")


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture in OPTIONAL_MARKERS:
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(getattr(pytest.mark, fixture))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under REFNORM_REQUIRE_OPTIONAL=1 a skipped torch/jax/triton test is a failure."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and require_optional():
        if any(item.get_closest_marker(m) for m in OPTIONAL_MARKERS):
            report.outcome = "failed"
            report.longrepr = f"skipped under REFNORM_REQUIRE_OPTIONAL=1: {report.longrepr}"
