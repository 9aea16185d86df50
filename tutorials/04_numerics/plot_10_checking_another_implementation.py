r"""
Checking another implementation
===============================

You have a LayerNorm kernel, in bfloat16, and want to know whether its forward **and** backward
are right: on which inputs it is wrong, and by how much. "``allclose`` failed" is no answer,
and a fixed ``atol``/``rtol`` is either too loose to catch a bug or too tight for bfloat16. The
oracle (:mod:`refnorm.oracle`) answers in **ULPs of the kernel's dtype**, under a bound derived
from that dtype and the reduction length. This tutorial

1. writes a candidate kernel in plain NumPy that behaves like a bfloat16 kernel, and checks it;
2. plants a classic bug in it, and reads the report: where, how much, and which mistake;
3. checks PyTorch's own LayerNorm in bfloat16 (when PyTorch is installed);
4. checks a LayerNorm written in Triton, run on the CPU by Triton's interpreter (when Triton
   is installed).

The guide is :doc:`/howto/oracle`; the tolerance model is derived in :doc:`/notes/tolerances`.
"""
import os

# Triton, when installed, runs this page's kernels in its CPU interpreter. The variable is read
# when triton is first imported (PyTorch may import it), so it is set before anything else;
# export TRITON_INTERPRET=0 beforehand to run them compiled on a GPU instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from refnorm.norms import BY_NAME  # noqa: E402
from refnorm.oracle import check, generate, round_to  # noqa: E402

# %%
# A candidate, in the oracle's protocol
# -------------------------------------
#
# A candidate is any callable ``candidate(variant, inputs, dy, kwargs, *, dtype)`` that returns
# the output and the gradients by name. The oracle hands it float64 arrays whose values are
# exactly representable in ``dtype``, so both sides see bit-identical inputs. Ours does what a
# good bfloat16 kernel does: compute in float32 (two-pass statistics) and round each result
# once to bfloat16 (:func:`refnorm.oracle.round_to`). The ``bug`` argument plants a mistake.


def make_candidate(bug=None):
    def candidate(variant, inputs, dy, kwargs, *, dtype):
        n = int(np.prod(kwargs["normalized_shape"]))
        shape = inputs["x"].shape
        x = inputs["x"].astype(np.float32).reshape(-1, n)
        g = dy.astype(np.float32).reshape(-1, n)
        w = inputs["weight"].astype(np.float32).ravel() if "weight" in inputs else None
        eps = np.float32(kwargs["eps"])
        mu = x.mean(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):  # N - 1 = 0 on one-element rows
            var = ((x - mu) ** 2).sum(axis=1, keepdims=True) / (n - 1 if bug == "unbiased" else n)
            rstd = 1 / np.sqrt(var + eps)
        xhat = (x - mu) * rstd
        y = xhat * w if w is not None else xhat
        if "bias" in inputs:
            y = y + inputs["bias"].astype(np.float32).ravel()
        gw = g * w if w is not None else g
        dx = rstd * (gw - gw.mean(axis=1, keepdims=True)
                     - xhat * (gw * xhat).mean(axis=1, keepdims=True))
        out = {"y": y.reshape(shape), "dx": dx.reshape(shape)}
        if w is not None:
            out["dweight"] = (g * xhat).sum(axis=0).reshape(inputs["weight"].shape)
        if "bias" in inputs:
            out["dbias"] = g.sum(axis=0).reshape(inputs["bias"].shape)
        return {k: round_to(v, dtype) for k, v in out.items()}

    candidate.variants = ("layer_norm",)
    return candidate


# %%
# The cases come from the variant's record, deterministically from a seed: realistic shapes
# (odd sizes, one-element rows, a row of 65536), small edge cases, and value regimes (a large
# mean with a tiny spread, constant rows, tiny and huge scales, subnormals, NaN and inf).
# ``size="ci"`` leaves out the largest inputs.

cases, skipped = generate(BY_NAME["layer_norm"], "bfloat16", size="ci")
print(f"{len(cases)} cases, e.g. {', '.join(c.name for c in cases[:5])}, ...")

good = check(make_candidate(), "layer_norm", dtype="bfloat16", size="ci")
print(good)

# %%
# Reading the report: one row per output and gradient, for its **worst case**, the case and
# element where the error uses the largest fraction of its bound (``budget``; above 100%
# fails). ``ULP`` is the error there in ULPs of bfloat16, ``tol ULP`` the bound there, and
# ``emul ULP`` what a correct kernel (float32 accumulation, one rounding) makes on that case. A
# correct bfloat16 kernel sits at about half an ULP: rounding once to 8 significant bits.
#
# A deliberate bug
# ----------------
#
# The classic one: the **unbiased** variance, :math:`\frac1{N-1}\sum (x-\mu)^2`, which is what
# ``torch.var`` and ``np.var(ddof=1)`` compute by default, where every normalization layer
# uses the biased :math:`\frac1N`. On a row of 1000 it changes :math:`r` by 0.05%, a tenth of
# a bfloat16 ULP, and no row-sized test would notice; on a row of 6 it is 9%.

bad = check(make_candidate("unbiased"), "layer_norm", dtype="bfloat16", size="ci")
print(bad.format(max_failures=2))

# %%
# The report names the failing cases (two are shown here: ``print(bad)`` lists them all), the
# worst element with its expected and computed values, how many elements are out of tolerance,
# and the known mistake the failures match. Every case is in ``report.results``; the figure
# draws, for each case, how much of its bound the worst element of ``y`` and of ``dx`` uses,
# for the correct and the wrong candidate (a NaN where a number was due is drawn at the top).
# The bug shows on short rows and not on long ones, which is why the oracle's cases include
# both.


def budgets(report, output):
    names, used = [], []
    for result in report.results:
        if output in result.outputs:
            names.append(result.case)
            used.append(result.outputs[output].budget)
    return names, np.minimum(np.nan_to_num(np.array(used), nan=np.inf), 100.0)


fig, axes = plt.subplots(2, 1, figsize=(8.0, 6.0), sharex=True)
for ax, output in zip(axes, ("y", "dx")):
    names, used_good = budgets(good, output)
    _, used_bad = budgets(bad, output)
    pos = np.arange(len(names))
    ax.semilogy(pos, np.maximum(used_good, 1e-3), "o", label="correct candidate")
    ax.semilogy(pos, np.maximum(used_bad, 1e-3), "x", ms=8, label="unbiased variance")
    ax.axhline(1.0, color="r", lw=1, ls="--")
    ax.set_ylabel(f"{output}: error / bound")
    ax.legend(fontsize=8, loc="upper left")
axes[1].set_xticks(pos, names, rotation=80, fontsize=6)
axes[0].set_title("Each oracle case: the worst element's share of its tolerance (>1 fails)")
fig.tight_layout()

# %%
# PyTorch in bfloat16
# -------------------
#
# ``check("torch", ...)`` runs every case through ``torch.nn.functional.layer_norm`` on
# bfloat16 tensors (the record's ``torch_call``) and its autograd backward. On a GPU,
# ``device="cuda"`` checks the CUDA kernels the same way; the command line does the same:
# ``refnorm compare --impl torch --dtype bfloat16 --variant layer_norm``.

try:
    import torch  # noqa: F401
except ImportError as exc:
    print(f"skipped PyTorch: it is not installed ({exc})")
else:
    print(check("torch", "layer_norm", dtype="bfloat16", size="ci"))

# %%
# A Triton kernel, on the CPU
# ---------------------------
#
# ``refnorm.oracle.examples.triton_layer_norm`` is a LayerNorm written in Triton (a forward, a
# ``dx`` kernel and a ``dweight``/``dbias`` kernel), with a wrong twin that puts
# :math:`\epsilon` outside the square root. With ``TRITON_INTERPRET=1``, set before Triton is
# first imported (the example module sets it itself when no GPU is present), Triton runs every
# program of the grid on the CPU with the kernel's own masks and dtypes, so CI can check a GPU
# kernel without a GPU (:doc:`/howto/triton`). To keep this page fast, only the small cases
# run here.

try:
    import triton  # noqa: F401

    from refnorm.oracle.examples import triton_layer_norm
except ImportError as exc:
    print(f"skipped Triton: {exc}")
else:
    small = [c for c in generate(BY_NAME["layer_norm"], "float16", size="ci")[0]
             if c.inputs["x"].size <= 5000]
    for label, kernel in [("Triton kernel", triton_layer_norm.candidate),
                          ("its wrong twin", triton_layer_norm.candidate_eps_outside)]:
        report = check(kernel, "layer_norm", dtype="float16", cases=small)
        failed = [r.case for r in report.results if r.status == "FAIL"]
        print(f"{label}: {len(report.results)} cases, {len(failed)} failed"
              + (f"; diagnosis: {report.diagnoses.get('layer_norm', '-')}" if failed else ""))

plt.show()

# %%
# To use the oracle in your own test suite, one assertion does it:
# ``refnorm.testing.assert_matches_reference(candidate, "layer_norm", dtype="bfloat16")``
# raises with this report when anything fails. Golden files (``refnorm goldens export``) carry
# the same cases and references to a machine where refnorm is not installed.
