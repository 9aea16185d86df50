"""The row blocks of the fast paths (``_stats.by_row_blocks``): the cache size they are sized
from, and results that do not depend on the block size.

LayerNorm, GroupNorm, BatchNorm and InstanceNorm do their passes a block of rows (samples) at a
time, sized from the measured L2 cache. Here the same calls run with blocks of one row (a tiny
"cache") and with one block for everything (a huge one), on inputs with several rows of
different scales, a constant row and, for LayerNorm and GroupNorm, a row of subnormals (done in
a wider dtype): a block that is skipped, overlapped, summed twice or given another block's
statistics shows as a difference far beyond rounding. The outputs of a row do not depend on
the others, so ``y`` and ``dx`` must agree to rounding; the parameter gradients are sums over
the blocks, added in another order, so they agree to a few ULP of their magnitude.
"""
import numpy as np
import pytest

from refnorm.norms import _stats
from refnorm.norms.batch_norm import batch_norm_backward, batch_norm_forward
from refnorm.norms.group_norm import group_norm_backward, group_norm_forward
from refnorm.norms.instance_norm import instance_norm_backward, instance_norm_forward
from refnorm.norms.layer_norm import layer_norm_backward, layer_norm_forward


@pytest.fixture
def cache_size(monkeypatch):
    """Set the cache size that the row blocks are sized from, for this test only, without the
    least block size (``MIN_BLOCK_BYTES``), so that a tiny cache gives blocks of one row."""
    def set_size(nbytes):
        monkeypatch.setattr(_stats, "_cache_size", nbytes)
        monkeypatch.setattr(_stats, "MIN_BLOCK_BYTES", 0)
    return set_size


def _rows_of_scales(rng, shape):
    """Standard normals whose rows (along axis 0) have different means and scales; one of them
    constant."""
    x = rng.standard_normal(shape)
    scale = 10.0 ** rng.uniform(-3, 3, shape[0])
    mean = 10.0 ** rng.uniform(-2, 4, shape[0])
    x = x * scale.reshape((-1,) + (1,) * (len(shape) - 1)) \
        + mean.reshape((-1,) + (1,) * (len(shape) - 1))
    x[1] = 3.25
    return x


def _ln(x, w, b, dy):
    y, cache = layer_norm_forward(x, x.shape[-1], w, b)
    return (y,) + tuple(layer_norm_backward(dy, cache))


def _gn(x, w, b, dy):
    y, cache = group_norm_forward(x, 4, w, b)
    return (y,) + tuple(group_norm_backward(dy, cache))


def _bn(x, w, b, dy):
    y, state, cache = batch_norm_forward(x, np.zeros(x.shape[1]), np.ones(x.shape[1]), w, b,
                                         training=True)
    return (y, state.running_mean, state.running_var) + tuple(batch_norm_backward(dy, cache))


def _in(x, w, b, dy):
    y, state, cache = instance_norm_forward(x, np.zeros(x.shape[1]), np.ones(x.shape[1]), w, b)
    return (y, state.running_mean, state.running_var) + tuple(instance_norm_backward(dy, cache))


CASES = {  # name: (call, shape, number of parameters, subnormal row)
    "layer_norm": (_ln, (37, 96), 96, True),
    "group_norm": (_gn, (11, 8, 5, 3), 8, True),
    "batch_norm": (_bn, (13, 6, 7, 5), 6, False),
    "instance_norm": (_in, (9, 6, 4, 5), 6, False),
}


def test_the_cache_size_is_measured():
    """Read from /sys where Linux has it (else the documented 1 MiB), positive, and the blocks
    sized from it: ``live`` arrays of a block fill the cache, unless that makes a block
    smaller than ``MIN_BLOCK_BYTES``."""
    size = _stats._read_l2_bytes()
    assert isinstance(size, int) and size > 0
    for live in (1, 2, 4, 64):
        blocks = _stats.row_blocks(5000, 1024, block_bytes=None, live=live)
        step = blocks[0].stop - blocks[0].start
        assert step == max(_stats.l2_cache_bytes() // live, _stats.MIN_BLOCK_BYTES) // 1024
        assert blocks[-1].stop >= 5000
        assert all(b.start == a.stop for a, b in zip(blocks, blocks[1:]))


def test_blocks_have_a_least_size(monkeypatch):
    """A small cache does not make blocks smaller than ``MIN_BLOCK_BYTES`` (their Python would
    cost more than the cache saves); a large one makes them larger."""
    monkeypatch.setattr(_stats, "_cache_size", 64 << 10)
    least = _stats.MIN_BLOCK_BYTES
    assert least >= 64 << 10
    assert len(_stats.row_blocks(5000, 1024, live=4)) == -(-5000 // (least // 1024))
    monkeypatch.setattr(_stats, "_cache_size", 64 * least)
    assert len(_stats.row_blocks(5000, 1024, live=4)) == -(-5000 // (16 * least // 1024))


def test_the_cache_size_can_be_overridden(monkeypatch):
    monkeypatch.setenv("REFNORM_L2_BYTES", "12345")
    assert _stats._read_l2_bytes() == 12345
    monkeypatch.setenv("REFNORM_L2_BYTES", "nonsense")
    assert _stats._read_l2_bytes() > 0


@pytest.mark.parametrize("name", list(CASES))
def test_results_do_not_depend_on_the_block_size(name, cache_size):
    call, shape, p, subnormal = CASES[name]
    rng = np.random.default_rng(7)
    x = _rows_of_scales(rng, shape)
    if subnormal:
        x[2] = 1e-310 * rng.standard_normal(shape[1:])  # done in a wider dtype
    w, b = rng.uniform(0.5, 1.5, p), rng.standard_normal(p)
    dy = rng.standard_normal(shape)
    cache_size(1)  # blocks of one row (sample)
    small = call(x, w, b, dy)
    cache_size(1 << 40)  # one block
    whole = call(x, w, b, dy)
    assert len(small) == len(whole)
    for i, (s, a) in enumerate(zip(small, whole)):
        assert s.shape == a.shape and s.dtype == a.dtype, (name, i)
        assert np.all(np.isfinite(a)), (name, i)
        scale = np.max(np.abs(a)) if a.ndim == 1 else np.max(np.abs(a), axis=tuple(
            range(1, a.ndim)), keepdims=True)  # per row, where the rows are independent
        bound = 8 * np.finfo(a.dtype).eps * scale + np.finfo(a.dtype).tiny
        worst = np.max(np.abs(s - a) / bound)
        assert worst <= 1, f"{name}, output {i}: {worst:.3g} times the bound"


def test_one_row_blocks_are_many(cache_size):
    """The tiny cache above really cuts the inputs into one-row blocks."""
    cache_size(1)
    assert len(_stats.row_blocks(37, 96 * 8, live=4)) == 37
