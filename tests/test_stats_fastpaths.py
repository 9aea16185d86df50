"""The small-input fast paths of ``refnorm.norms._stats`` answer exactly as the general code.

The rare-regime tests (``needs_rescaling``, ``extreme_groups``, ``inexact_products``) first ask
whether nothing can be flagged, with a minimum and a maximum (``variance_span`` derives those of
``rstd`` from those of the variances); these tests compare every answer
with the elementwise definition, on arrays that mix ordinary, tiny, huge, zero, inf and NaN
values, so that a fast path that missed a flag would fail. The validation fast paths are
compared with the general checks on the values they accept, and must leave every error
message to the general code.
"""
import numpy as np
import pytest

from refnorm.norms import _stats as S

SPECIALS = (0.0, 1e-320, 1e-300, 1e-160, 1e-20, 1.0, 1e20, 1e160, 1e300, np.inf, np.nan)


def _arrays(rng, dtype, count=200):
    """Small arrays of ordinary values with, in most, a few special values put in."""
    for i in range(count):
        a = np.abs(rng.standard_normal(rng.integers(1, 9))) + 0.5
        for _ in range(i % 3):
            a[rng.integers(a.size)] = rng.choice(SPECIALS)
        with np.errstate(over="ignore", under="ignore"):
            yield a.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("eps", [0.0, 1e-5, 1e-310])
def test_needs_rescaling_flags_as_its_definition(dtype, eps):
    rng = np.random.default_rng(0)
    limit = float(np.finfo(dtype).smallest_normal) * 2.0 ** (np.finfo(dtype).nmant + 2)
    for var in _arrays(rng, dtype):
        var = var[:, None]
        with np.errstate(invalid="ignore", over="ignore"):
            expected = ~((var + eps >= limit) & (var < np.inf)).ravel()
            got = S.needs_rescaling(var, eps)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("x_dtype", [None, np.float16])
def test_extreme_groups_flags_as_its_definition(dtype, x_dtype):
    rng = np.random.default_rng(1)
    info = np.finfo(dtype)
    hi = float(info.max) * 2.0 ** -(info.nmant + 2)
    low = float(info.smallest_normal)
    if x_dtype is not None:
        low = max(low, (8.0 * float(np.finfo(x_dtype).smallest_normal)) ** 2)
    for var in _arrays(rng, dtype):
        rstd = np.array(rng.permutation(var))
        rstd[rng.integers(rstd.size)] = rng.choice(SPECIALS)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            expected = np.flatnonzero((var < low) | (rstd > hi) | (rstd < 1.0 / hi))
        np.testing.assert_array_equal(S.extreme_groups(var, rstd, x_dtype), expected)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.longdouble])
@pytest.mark.parametrize("eps", [0.0, 1e-5, 3.0, 1e-40, 1e-310])
def test_variance_span_is_the_extremes_where_nothing_needs_rescaling(dtype, eps):
    """The span is exactly (min var, min rstd, max rstd) of rstd computed elementwise, and it is
    given exactly where needs_rescaling flags no group."""
    rng = np.random.default_rng(4)
    for var in _arrays(rng, dtype):
        var = var[:, None]
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            rstd = 1.0 / np.sqrt(var + eps)
            span = S.variance_span(var, eps)
            flagged = S.needs_rescaling(var, eps).any()
        assert (span is None) == flagged, (var.ravel(), eps)
        if span is not None:
            for got, want in zip(span, (var.min(), rstd.min(), rstd.max())):
                # equal and of the same sign (tobytes would compare longdouble's padding)
                assert got.dtype == want.dtype and got == want \
                    and np.signbit(got) == np.signbit(want), (got, want)
            np.testing.assert_array_equal(S.extreme_groups(var, rstd, None, span),
                                          S.extreme_groups(var, rstd))
    assert S.variance_span(np.ones((2, 1)), np.float64(1e-5)) is None  # not a float: unknown
    assert S.variance_span(np.ones((0, 1)), 1e-5) is None


def test_joined_spans_is_the_span_of_the_union():
    var = np.array([[3.0], [0.5], [2.0], [7.0]])
    whole = S.variance_span(var, 1e-5)
    parts = [S.variance_span(var[:2], 1e-5), S.variance_span(var[2:], 1e-5)]
    assert S.joined_spans(parts) == whole
    assert S.joined_spans(parts + [None]) is None
    stats = [(var[:2], parts[0]), (var[2:], parts[1])]  # as by_row_blocks returns them
    joined_var, joined_span = S.joined(stats)
    np.testing.assert_array_equal(joined_var, var)
    assert joined_span == whole


def test_inexact_products_flags_as_its_definition():
    rng = np.random.default_rng(2)
    tiny = np.finfo(np.float64).smallest_normal
    for a in _arrays(rng, np.float64):
        with np.errstate(all="ignore"):
            b = rng.permutation(a) * rng.choice([1.0, 1e-200, 1e200, 0.0])
            ab = a * b
            m = np.abs(ab)
            expected = ~((m >= tiny) & (m < np.inf) | (ab == 0) & ((a == 0) | (b == 0))) \
                & np.isfinite(a) & np.isfinite(b)
            got = S.inexact_products(a, b, ab)
        if got is None:  # none flagged, decided without the elementwise test
            got = np.zeros(ab.shape, bool)
        np.testing.assert_array_equal(got, expected)


def test_out_of_range_decides_by_the_largest_finite_magnitude():
    x = np.ones(5)
    assert not S.out_of_range(x)
    for big in (1e80, -1e80):
        x[2] = big
        assert S.out_of_range(x)
    x[2] = np.nan  # the finite ones decide
    assert not S.out_of_range(x)
    x[3] = np.inf
    assert not S.out_of_range(x)
    assert S.out_of_range(np.array([1e-80, np.nan, -1e-81, np.inf]))  # the largest is tiny
    assert not S.out_of_range(np.array([np.nan, np.inf]))  # no finite one: not out of range
    assert S.out_of_range(np.ones(3, np.float16))
    rng = np.random.default_rng(3)
    for a in _arrays(rng, np.float64):  # as the definition: max over the finite magnitudes
        a = a * rng.choice([-1.0, 1.0], a.size)
        finite = np.abs(a[np.isfinite(a)])
        m = finite.max() if finite.size else 0.0
        info = np.finfo(np.float64)
        expected = bool(m > 0 and not 2.0 ** (info.minexp / 4) <= m <= 2.0 ** (info.maxexp / 4))
        assert S.out_of_range(a) == expected, a


def test_row_broadcasting_changes_the_buffer_only_above_small_size():
    old = np.getbufsize()
    with S.row_broadcasting(64, S.SMALL_SIZE):
        assert np.getbufsize() == old
    with S.row_broadcasting(64, S.SMALL_SIZE + 1):
        assert np.getbufsize() == 64
    with S.row_broadcasting(64):
        assert np.getbufsize() == 64
    assert np.getbufsize() == old


def test_cached_arrays_are_read_only():
    """The shared ones and flags cannot be changed by a caller by mistake."""
    ones = S._ones(64, np.dtype(np.float64))
    with pytest.raises(ValueError):
        ones[0] = 2.0
    flags = S.needs_rescaling(np.ones((4, 1)), 1e-5)
    assert not flags.any()
    with pytest.raises(ValueError):
        flags[0] = True


@pytest.mark.parametrize("value", [1e-5, 0.0, 3.0])
def test_check_eps_fast_path_as_general(value):
    assert S.check_eps(value, "op") == value
    assert S.check_eps(np.float64(value), "op") == value


@pytest.mark.parametrize("value", [-1e-5, float("nan"), float("inf"), -0.5, True, "1"])
def test_check_eps_errors_unchanged(value):
    with pytest.raises(ValueError, match=r"op: `eps` must be a finite number >= 0"):
        S.check_eps(value, "op")


def test_check_normalized_shape_fast_path_as_general():
    x = np.zeros((2, 3, 4))
    assert S.check_normalized_shape(4, x, "op") == (4,)
    assert S.check_normalized_shape((3, 4), x, "op") == (3, 4)
    assert S.check_normalized_shape([3, 4], x, "op") == (3, 4)
    assert S.check_normalized_shape(np.int64(4), x, "op") == (4,)
    for bad in (3, (2, 3), (2, 3, 4, 5), -4, (-4,)):
        with pytest.raises(ValueError, match=r"must equal the trailing dimensions"):
            S.check_normalized_shape(bad, x, "op")
    for bad in (True, (), (4.0,), "4"):
        with pytest.raises(ValueError, match=r"must be an int or a non-empty tuple"):
            S.check_normalized_shape(bad, x, "op")


def test_check_array_fast_path_as_general():
    x = np.zeros((2, 3))
    assert S.check_array(x, "x", "op") is x
    with pytest.raises(ValueError, match=r"at least 3 dimensions"):
        S.check_array(x, "x", "op", ndim_min=3)
    with pytest.raises(TypeError, match=r"floating dtype"):
        S.check_array(np.zeros(3, int), "x", "op")
    with pytest.raises(TypeError, match=r"plain numpy.ndarray"):
        S.check_array(np.ma.masked_array(x), "x", "op")
