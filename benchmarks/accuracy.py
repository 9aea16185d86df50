"""Accuracy of refnorm (and of PyTorch float64) against exact arithmetic: the ULP table.

For LayerNorm, RMSNorm, BatchNorm (training), GroupNorm and InstanceNorm, on cancellation-prone
inputs (4 groups of 64 values with mean 1e4, 1e6 or 1e8 and standard deviation 1e-3, 0.1 or 1),
the forward ``y`` and the gradients (``dx``, ``dweight``, ``dbias``, with a random upstream
gradient) are compared with a 50-digit mpmath reference written from the math
(``tests/reliability/exact.py``). The error is in ULPs of float64 at the output's magnitude:
``max|got - exact| / (2**-52 * max|exact|)``; "bwd" is the worst of the gradients. The goal is
4 ULP. Where PyTorch is installed, its float64 CPU kernels are measured on the same inputs.

    python benchmarks/accuracy.py                 # every variant, with PyTorch if installed
    python benchmarks/accuracy.py --no-torch      # refnorm only
    python benchmarks/accuracy.py --variants layer_norm,batch_norm --detail
    python benchmarks/accuracy.py --no-affine     # without weight and bias

The output is deterministic: the same inputs (fixed seeds) give the same bytes on every run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))   # the references live with the tests
sys.path.insert(0, str(ROOT))

from reliability import exact  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(exact.VARIANTS))
    parser.add_argument("--no-torch", action="store_true", help="do not measure PyTorch")
    parser.add_argument("--no-affine", action="store_true",
                        help="without weight and bias (the variants' other branch)")
    parser.add_argument("--detail", action="store_true",
                        help="also print every output (y, dx, dweight, dbias) separately")
    args = parser.parse_args(argv)
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("(PyTorch is not installed: refnorm only)")
    rows = exact.table([v for v in args.variants.split(",") if v], torch=torch,
                       affine=not args.no_affine)
    print(__doc__.split("\n")[0])
    print(f"reference: mpmath, {exact.MP_DPS} digits; eps = {exact.EPS}; "
          f"goal {exact.TARGET_ULP:g} ULP")
    print()
    print(exact.format_table(rows))
    if args.detail:
        print()
        print("per output (refnorm | torch):")
        for r in rows:
            parts = [f"{k} {v:.2f}"
                     + (f" | {r.torch_errors[k]:.3g}" if k in r.torch_errors else "")
                     for k, v in r.errors.items()]
            print(f"  {r.variant:<14} {r.mean:.0e} {r.std:.0e}  " + ", ".join(parts))
    worst = max((max(r.forward, r.backward) for r in rows), default=0.0)
    return 0 if worst <= exact.TARGET_ULP else 1


if __name__ == "__main__":
    sys.exit(main())
