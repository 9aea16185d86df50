"""Gradient checking: evaluations of f and wall time, refnorm against torch.autograd.gradcheck.

For each workload (float64, a random upstream gradient) three checkers run on the same math,
interleaved repeat by repeat in one process so that machine noise hits them alike:

* ``refnorm``: :func:`refnorm.gradcheck.check_vjp` on refnorm's forward and hand backward;
* ``torch(refnorm f)``: ``torch.autograd.gradcheck`` on the *same* NumPy forward and backward,
  wrapped in a ``torch.autograd.Function`` (one call of f costs the same for both checkers);
* ``torch(native)``: ``torch.autograd.gradcheck`` on PyTorch's own op (1 thread).

Each in fast and slow mode. ``evals`` counts the calls of f (for torch: of the function given
to gradcheck), ``vjps`` the backward calls; times are the median (and minimum) over repeats.
Workloads: LayerNorm (16, 64) with weight and bias (1152 inputs), RMSNorm (16, 64) with weight
(1088), BatchNorm training (4, 8, 5, 5) with weight and bias (816).

    python benchmarks/bench_gradcheck.py [--repeats 3] [--slow-repeats 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's refnorm


class Counted:
    """A callable that counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def workloads(rng):
    """name -> (numpy f, numpy vjp, inputs, torch native function)."""
    import torch
    import torch.nn.functional as F

    from refnorm.norms.batch_norm import batch_norm_backward, batch_norm_forward
    from refnorm.norms.layer_norm import layer_norm_backward, layer_norm_forward
    from refnorm.norms.rms_norm import rms_norm_backward, rms_norm_forward

    def ln_f(x, w, b):
        return layer_norm_forward(x, (64,), w, b)[0]

    def ln_vjp(cts, x, w, b):
        return tuple(layer_norm_backward(cts[0], layer_norm_forward(x, (64,), w, b)[1]))

    def rms_f(x, w):
        return rms_norm_forward(x, (64,), w, eps=1e-6)[0]

    def rms_vjp(cts, x, w):
        return tuple(rms_norm_backward(cts[0], rms_norm_forward(x, (64,), w, eps=1e-6)[1]))

    def bn_f(x, w, b):
        return batch_norm_forward(x, None, None, w, b, training=True)[0]

    def bn_vjp(cts, x, w, b):
        cache = batch_norm_forward(x, None, None, w, b, training=True)[2]
        return tuple(batch_norm_backward(cts[0], cache))

    x = rng.standard_normal((16, 64))
    w, b = 1 + 0.1 * rng.standard_normal(64), 0.1 * rng.standard_normal(64)
    xb = rng.standard_normal((4, 8, 5, 5))
    wb, bb = 1 + 0.1 * rng.standard_normal(8), 0.1 * rng.standard_normal(8)
    return {
        "LayerNorm (16, 64) + w + b": (ln_f, ln_vjp, [x, w, b],
                                       lambda x, w, b: F.layer_norm(x, (64,), w, b)),
        "RMSNorm (16, 64) + w": (rms_f, rms_vjp, [x, w],
                                 lambda x, w: F.rms_norm(x, (64,), w, eps=1e-6)),
        "BatchNorm train (4, 8, 5, 5) + w + b": (
            bn_f, bn_vjp, [xb, wb, bb],
            lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True)),
    }


def torch_wrapper(f, vjp, vjp_counter):
    """A torch.autograd.Function running the NumPy forward and backward (float64)."""
    import torch

    class Wrapped(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *tensors):
            ctx.save_for_backward(*tensors)
            return torch.from_numpy(np.asarray(f(*[t.detach().numpy() for t in tensors])))

        @staticmethod
        def backward(ctx, dy):
            vjp_counter.calls += 1
            arrays = [t.detach().numpy() for t in ctx.saved_tensors]
            grads = vjp((dy.detach().numpy(),), *arrays)
            return tuple(torch.from_numpy(np.ascontiguousarray(g)) for g in grads)

    return Wrapped.apply


def run_refnorm(f, vjp, inputs, mode):
    from refnorm.gradcheck import check_vjp
    report = check_vjp(f, vjp, inputs, mode=mode)
    assert report, str(report)
    return report.n_evals, report.n_vjp_calls


def run_torch(fn, inputs, mode, vjp_counter):
    import torch
    counted = Counted(fn)
    vjp_counter.calls = 0
    tensors = [torch.tensor(a, requires_grad=True) for a in inputs]
    assert torch.autograd.gradcheck(counted, tensors, fast_mode=(mode == "fast"))
    return counted.calls, vjp_counter.calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="repeats in fast mode")
    parser.add_argument("--slow-repeats", type=int, default=1, help="repeats in slow mode")
    args = parser.parse_args(argv)
    import torch

    import refnorm
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    print(f"refnorm from {Path(refnorm.__file__).parent}")
    print(f"torch {torch.__version__} (1 thread), numpy {np.__version__}, float64; "
          "evals: calls of f; vjps: backward calls (torch(native): not counted, '-')")
    header = f"{'workload':50s} {'mode':4s} {'checker':17s} {'evals':>6s} {'vjps':>6s} " \
             f"{'median s':>9s} {'min s':>8s}"
    print(header)
    print("-" * len(header))
    for name, (f, vjp, inputs, native) in workloads(rng).items():
        n = sum(a.size for a in inputs)
        for mode in ("fast", "slow"):
            repeats = args.repeats if mode == "fast" else args.slow_repeats
            native_counter, wrapped_counter = Counted(None), Counted(None)
            wrapped = torch_wrapper(f, vjp, wrapped_counter)
            checkers = {
                "refnorm": lambda: run_refnorm(f, vjp, inputs, mode),
                "torch(refnorm f)": lambda: run_torch(wrapped, inputs, mode, wrapped_counter),
                "torch(native)": lambda: run_torch(native, inputs, mode, native_counter),
            }
            times = {k: [] for k in checkers}
            counts = {}
            for _ in range(repeats):  # interleaved
                for k, run in checkers.items():
                    t0 = time.perf_counter()
                    counts[k] = run()
                    times[k].append(time.perf_counter() - t0)
            for k in checkers:
                evals, vjps = counts[k]
                vjps = "-" if k == "torch(native)" else str(vjps)
                print(f"{name + f' [{n} inputs]':50s} {mode:4s} {k:17s} {evals:6d} {vjps:>6s} "
                      f"{statistics.median(times[k]):9.4f} {min(times[k]):8.4f}")
        print()


if __name__ == "__main__":
    main()
