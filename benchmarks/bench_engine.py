"""Overhead per recorded op of the autograd engine, against PyTorch CPU and HIPS autograd.

A forward+backward pass through a chain of 200 small ops (multiply, add, tanh, subtract, on
4x4 float64 arrays) is timed for the three engines, interleaved repeat by repeat in one process
so that machine noise hits all of them alike. Prints microseconds per op (median and minimum
over repeats) and the ratios to refnorm.

    python benchmarks/bench_engine.py [--repeats 30] [--ops 200]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def chain_refnorm(x0, w0, n_ops):
    from refnorm.autograd import Tensor, tanh

    x, w = Tensor(x0, requires_grad=True), Tensor(w0, requires_grad=True)
    z = x
    for _ in range(n_ops // 4):
        z = tanh(z * w + x) - 0.5
    z.sum().backward()
    return x.grad


def make_torch():
    import torch
    torch.set_num_threads(1)

    def chain_torch(x0, w0, n_ops):
        x = torch.tensor(x0, requires_grad=True)
        w = torch.tensor(w0, requires_grad=True)
        z = x
        for _ in range(n_ops // 4):
            z = torch.tanh(z * w + x) - 0.5
        z.sum().backward()
        return x.grad.numpy()
    return chain_torch


def make_hips():
    import autograd
    import autograd.numpy as anp

    def loss(x, w, n_ops):
        z = x
        for _ in range(n_ops // 4):
            z = anp.tanh(z * w + x) - 0.5
        return anp.sum(z)

    g = autograd.grad(loss)

    def chain_hips(x0, w0, n_ops):
        return g(x0, w0, n_ops)
    return chain_hips


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--ops", type=int, default=200)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x0, w0 = rng.standard_normal((4, 4)), 0.5 * rng.standard_normal((4, 4))

    engines = {"refnorm": chain_refnorm}
    for name, make in (("torch", make_torch), ("hips-autograd", make_hips)):
        try:
            engines[name] = make()
        except ImportError as exc:
            print(f"# {name} not available: {exc}")
    results = {name: fn(x0, w0, args.ops) for name, fn in engines.items()}
    for name, grad in results.items():  # all engines compute the same gradient
        np.testing.assert_allclose(grad, results["refnorm"], rtol=1e-12)

    times = {name: [] for name in engines}
    for _ in range(3):  # warm-up
        for fn in engines.values():
            fn(x0, w0, args.ops)
    for _ in range(args.repeats):
        for name, fn in engines.items():
            start = time.perf_counter()
            fn(x0, w0, args.ops)
            times[name].append((time.perf_counter() - start) / args.ops * 1e6)

    base = statistics.median(times["refnorm"])
    print(f"forward+backward, chain of {args.ops} ops on 4x4 float64, {args.repeats} repeats")
    print(f"{'engine':<14} {'median us/op':>12} {'min us/op':>10} {'vs refnorm':>10}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<14} {med:>12.2f} {min(ts):>10.2f} {med / base:>9.2f}x")


if __name__ == "__main__":
    main()
