"""Row-block sizes and memory passes of the blocked norms (LN, BN, GN, IN), float64.

Two measurements for ``docs/notes/performance.rst``:

* **The block sweep.** The blocked forwards and backwards size their blocks from the L2 cache
  (``refnorm.norms._stats.l2_cache_bytes``: ``live`` arrays of a block fill it). This script
  runs forward+backward with the cache size set to fractions and multiples of the measured one
  (``1/8`` to ``4x``, and "none": one block for the whole array), **round-robin** (one run of
  each setting in turn, repeated), so that the noise of a shared machine hits every setting
  alike, and prints the CPU time (``time.process_time``) min and median per setting, relative
  to the measured size's. These settings ignore the least block size
  (``_stats.MIN_BLOCK_BYTES``); "default" is the library's own sizing, with it. The chosen
  size should be near the best.
* **Passes and bandwidth.** Per case, the time of ``np.copyto`` of an ``x``-sized array (one
  read and one write: 2 array transfers) gives the copy bandwidth; refnorm's and PyTorch's
  (one thread) forward+backward are expressed as "copy-equivalents" (their time over the time
  of one array transfer at copy speed) and as the bandwidth they reach on refnorm's counted
  transfers (``PASSES``: reads plus writes of ``x``-sized arrays, counted from the code) and
  on the compulsory 5 transfers (read ``x``, write ``y``; read ``x`` and ``dy``, write
  ``dx``) that any implementation makes.

    python benchmarks/sweep_blocks.py [--repeats 7] [--cases LN,GN] [--no-sweep]
"""
from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from refnorm.norms import _stats  # noqa: E402
from refnorm.norms.batch_norm import batch_norm_backward, batch_norm_forward  # noqa: E402
from refnorm.norms.group_norm import group_norm_backward, group_norm_forward  # noqa: E402
from refnorm.norms.instance_norm import (instance_norm_backward,  # noqa: E402
                                         instance_norm_forward)
from refnorm.norms.layer_norm import layer_norm_backward, layer_norm_forward  # noqa: E402

# Reads + writes of x-sized arrays, counted from the code (forward, backward), float64 with
# weight and bias. A BLAS sum reads its array once (row_dots(d, d) included); an in-place
# ufunc such as ``y *= r`` reads and writes y; ``dx = dy * d`` reads two and writes one.
PASSES = {
    "LN": (13, 21),   # fwd: 4 sums/differences + 4 affine passes; bwd: 12 operations
    "BN": (13, 14),   # fwd: 2 reads of the range check (_stats.out_of_range) + 11
    "GN": (11, 14),
    "IN": (13, 14),   # the range check + GroupNorm's code with one group per channel
}


def _ln(shape):
    def run(x, w, b, dy):
        y, cache = layer_norm_forward(x, shape[-1], w, b)
        return y, layer_norm_backward(dy, cache)

    def torch_run(F, x, w, b):
        return F.layer_norm(x, (shape[-1],), w, b, 1e-5)
    return run, torch_run, shape[-1]


def _bn(shape):
    c = shape[1]

    def run(x, w, b, dy):
        y, _, cache = batch_norm_forward(x, np.zeros(c), np.ones(c), w, b, training=True)
        return y, batch_norm_backward(dy, cache)

    def torch_run(F, x, w, b):
        return F.batch_norm(x, x.new_zeros(c), x.new_ones(c), w, b, training=True)
    return run, torch_run, c


def _gn(shape):
    def run(x, w, b, dy):
        y, cache = group_norm_forward(x, 32, w, b)
        return y, group_norm_backward(dy, cache)

    def torch_run(F, x, w, b):
        return F.group_norm(x, 32, w, b, 1e-5)
    return run, torch_run, shape[1]


def _in(shape):
    def run(x, w, b, dy):
        y, _, cache = instance_norm_forward(x, None, None, w, b)
        return y, instance_norm_backward(dy, cache)

    def torch_run(F, x, w, b):
        return F.instance_norm(x, weight=w, bias=b, eps=1e-5)
    return run, torch_run, shape[1]


_ACT = (16, 64, 28, 28)
CASES = [("LN (512,4096)", "LN", _ln, (512, 4096)), ("LN (8,128,768)", "LN", _ln, (8, 128, 768)),
         ("LN (1024,768)", "LN", _ln, (1024, 768)), ("BN (16,64,28,28)", "BN", _bn, _ACT),
         ("GN32 (16,64,28,28)", "GN", _gn, _ACT), ("IN2d (16,64,28,28)", "IN", _in, _ACT)]


def cpu_time(fn):
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def sweep(label, run, args, repeats):
    measured = _stats._read_l2_bytes()
    least = _stats.MIN_BLOCK_BYTES
    # the settings without the least block size, and "default": the library's own sizing
    # (the measured size, with blocks of at least MIN_BLOCK_BYTES)
    settings = [("1/8", measured // 8, 0), ("1/4", measured // 4, 0),
                ("1/2", measured // 2, 0), ("measured", measured, 0), ("2x", 2 * measured, 0),
                ("4x", 4 * measured, 0), ("none", 1 << 50, 0), ("default", measured, least)]
    times = {name: [] for name, _, _ in settings}
    try:
        for _ in range(repeats + 1):
            for name, size, floor in settings:
                _stats._cache_size, _stats.MIN_BLOCK_BYTES = size, floor
                t = cpu_time(lambda: run(*args))
                times[name].append(t)
    finally:
        _stats._cache_size, _stats.MIN_BLOCK_BYTES = None, least
    ref = min(times["measured"][1:])
    cells = []
    for name, _, _ in settings:
        t = times[name][1:]  # the first round warms up
        cells.append(f"{name} {min(t) * 1e3:.2f}/{statistics.median(t) * 1e3:.2f} "
                     f"({min(t) / ref:.2f})")
    print(f"{label:20s} cache setting: min/median ms (min relative to measured)\n    "
          + "\n    ".join(cells))


def passes(label, kind, run, torch_run, args, repeats):
    import torch
    import torch.nn.functional as F
    x, w, b, dy = args
    leaves = [torch.from_numpy(a).requires_grad_(True) for a in (x, w, b)]
    dy_t = torch.from_numpy(dy)
    out = np.empty_like(x)

    def torch_fb():
        y = torch_run(F, *leaves)
        return torch.autograd.grad(y, leaves, dy_t)
    t_copy, t_ref, t_torch = [], [], []
    for _ in range(repeats + 1):
        t_copy.append(cpu_time(lambda: np.copyto(out, x)))
        t_ref.append(cpu_time(lambda: run(*args)))
        t_torch.append(cpu_time(torch_fb))
    copy, ref, tor = (min(t[1:]) for t in (t_copy, t_ref, t_torch))
    transfer = copy / 2  # one read or one write of an x-sized array at copy speed
    gb = x.nbytes / 1e9
    fwd, bwd = PASSES[kind]
    print(f"{label:20s} copy {copy * 1e3:.3f} ms ({2 * gb / copy:.1f} GB/s); refnorm "
          f"{ref * 1e3:.2f} ms = {ref / transfer:.1f} transfers at copy speed, counted "
          f"{fwd}+{bwd} = {fwd + bwd} ({(fwd + bwd) * gb / ref:.1f} GB/s; compulsory 5: "
          f"{100 * 5 * gb / ref / (2 * gb / copy):.0f}% of copy); torch {tor * 1e3:.2f} ms = "
          f"{tor / transfer:.1f} transfers (compulsory 5: "
          f"{100 * 5 * gb / tor / (2 * gb / copy):.0f}% of copy); ratio {ref / tor:.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cases", default="")
    parser.add_argument("--no-sweep", action="store_true")
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    wanted = [p.strip() for p in args.cases.split(",") if p.strip()]
    print(f"L2 cache read: {_stats._read_l2_bytes() / 2**20:.2f} MiB; numpy {np.__version__}, "
          f"torch {torch.__version__} (1 thread)")
    rng = np.random.default_rng(0)
    for label, kind, make, shape in CASES:
        if wanted and not any(label.startswith(p) for p in wanted):
            continue
        run, torch_run, p = make(shape)
        arrays = (rng.standard_normal(shape), rng.uniform(0.5, 1.5, p), rng.standard_normal(p),
                  rng.standard_normal(shape))
        if not args.no_sweep:
            sweep(label, run, arrays, args.repeats)
        passes(label, kind, run, torch_run, arrays, args.repeats)


if __name__ == "__main__":
    main()
