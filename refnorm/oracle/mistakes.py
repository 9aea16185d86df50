"""A catalogue of deliberately wrong implementations, and the diagnosis that uses it.

Each :class:`Mistake` is a candidate (it follows the protocol of
:mod:`refnorm.oracle.adapters`) that makes one classic error: the ones students make when they
derive a backward by hand and the ones kernels ship with. The tests require the oracle to fail
every one of them, in float32 and in bfloat16, and to name it.

They are all one small NumPy implementation, :func:`student`, written the way a kernel is:
statistics accumulated in float32 (float64 for float64 candidates), elementwise work in the
same format, every output rounded once to the candidate dtype. With no flag set it is a
*correct* low-precision implementation (the tests check that it passes); each mistake sets one
flag.

**Diagnosis.** When a candidate fails, :func:`diagnose` runs every mistake of the variant on
the failing cases and compares the candidate's outputs with the mistake's, under the same
per-element bounds (doubled: both carry their own rounding). A mistake *matches* when it
reproduces every failing output of every failing case and agrees with the candidate on the
outputs that passed; it *resembles* the candidate when it explains most of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refnorm.oracle.formats import get_format, round_to
from refnorm.oracle.structure import labels_from_axes, param_view

__all__ = ["Mistake", "MISTAKES", "for_variant", "student", "diagnose", "STUDENT_VARIANTS"]

STUDENT_VARIANTS = ("layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm",
                    "local_response_norm")


# ----------------------------------------------------------------------------------------------
# Group reductions in a chosen format
# ----------------------------------------------------------------------------------------------
class _Groups:
    def __init__(self, labels, count):
        flat = labels.ravel()
        self.labels, self.count = labels, count
        self.order = np.argsort(flat, kind="stable")
        self.sizes = np.bincount(flat, minlength=count)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.nonempty = self.sizes > 0

    def sum(self, a, half=False):
        v = np.asarray(a).ravel()[self.order]
        out = np.zeros(self.count, dtype=v.dtype)
        if half:  # a float16 register, one addition at a time
            for g in np.flatnonzero(self.nonempty):
                s, n = self.starts[g], self.sizes[g]
                with np.errstate(over="ignore", invalid="ignore"):
                    out[g] = np.cumsum(v[s:s + n].astype(np.float16))[-1]
            return out
        if v.size:
            out[self.nonempty] = np.add.reduceat(v, self.starts[self.nonempty])
        return out

    def mean(self, a, half=False, correction=0):
        t = np.asarray(a).dtype.type
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.sum(a, half) / t(1) / np.maximum(self.sizes - correction, 0).astype(t)

    def spread(self, g):
        return g[self.labels]


def _param_sum(a, p, x_shape, variant, first_sample=False):
    view = param_view(p, x_shape, variant).shape
    if first_sample:
        a = a[:1]
    lead = a.ndim - len(view)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(view)
                                      if n == 1 and a.shape[lead + i] != 1)
    return (a.sum(axis=axes) if axes else a).reshape(p.shape)


def _layout(variant, x, kwargs, flags):
    """``(labels, count, stats)``: the groups, and whether statistics come from ``x``."""
    if variant in ("layer_norm", "rms_norm"):
        ns = kwargs["normalized_shape"]
        nd = 1 if isinstance(ns, (int, np.integer)) else len(ns)
        axes = tuple(range(x.ndim - nd, x.ndim))
        if flags.get("axis") == "first":
            axes = (0,)
        labels, count = labels_from_axes(x.shape, axes)
        return labels, count, True
    if variant == "group_norm":
        n, c, g = x.shape[0], x.shape[1], kwargs["num_groups"]
        idx = np.indices(x.shape)
        cpg = c // g
        grp = np.minimum((idx[1] + 1) // cpg, g - 1) if flags.get("group_shift") else idx[1] // cpg
        return (idx[0] * g + grp).astype(np.int64), n * g, True
    if variant == "batch_norm":
        stats = kwargs.get("training", False) or kwargs.get("running_mean") is None
        labels, count = labels_from_axes(x.shape, (0,) + tuple(range(2, x.ndim)))
        return labels, count, stats
    if variant == "instance_norm":
        stats = kwargs.get("use_input_stats", True)
        axes = tuple(range(2, x.ndim))
        if flags.get("axis") == "first":
            axes = tuple(range(1, x.ndim))
        labels, count = labels_from_axes(x.shape, axes)
        if not stats:
            labels, count = labels_from_axes(x.shape, (0,) + tuple(range(2, x.ndim)))
        return labels, count, stats
    raise NotImplementedError(f"the student implementation has no {variant!r}")


def _standardize(variant, inputs, dy, kwargs, T, flags):
    x = inputs["x"].astype(T)
    w, b = inputs.get("weight"), inputs.get("bias")
    labels, count, stats = _layout(variant, x, kwargs, flags)
    G = _Groups(labels, count)
    half = flags.get("half", False)
    center = variant != "rms_norm" or flags.get("center", False)
    eps = kwargs.get("eps", 1e-5)
    if eps is None:
        eps = float(np.finfo(T).eps)
    eps = T(eps)
    out = {}
    with np.errstate(all="ignore"):
        if stats:
            if center:
                mu = G.mean(x, half)
                if flags.get("var") == "onepass":
                    var = G.mean(x * x, half) - mu * mu
                    xc = x - G.spread(mu)
                else:
                    xc = x - G.spread(mu)
                    var = G.mean(xc * xc, half, correction=1 if flags.get("var") == "unbiased"
                                 else 0)
            else:
                mu, xc = np.zeros(count, T), x
                var = G.mean(x * x, half)
            outside = flags.get("eps_outside") or kwargs.get("eps_placement") == "outside"
            r = T(1) / (np.sqrt(var) + eps) if outside else T(1) / np.sqrt(var + eps)
            # the backward of the eps-outside form has h / q, q = sqrt(var) r; a mistaken
            # kernel keeps the textbook backward unless it is "consistent" (autograd's)
            q = np.sqrt(var) * r if outside and (not flags.get("eps_outside")
                                                 or flags.get("consistent")) \
                else np.ones_like(r)
            if flags.get("var") == "unbiased" and flags.get("consistent"):
                n = G.sizes.astype(T)
                q = q * (n - 1) / n       # d(unbiased var)/dx carries 1/(N-1): h N/(N-1)
        else:  # running statistics, a fixed affine map
            rm = kwargs["running_mean"].astype(T)
            rv = kwargs["running_var"].astype(T)
            mu, r, q = rm, T(1) / np.sqrt(rv + eps), np.ones(count, T)
            xc, var = x - G.spread(mu), rv
        xhat = xc * G.spread(r)
        wv = None if w is None else param_view(w.astype(T), x.shape, variant)
        bv = None if b is None else param_view(b.astype(T), x.shape, variant)
        y = xhat * wv if wv is not None else xhat
        y = y + bv if bv is not None else y
        out["y"] = y
        g = dy.astype(T) * wv if wv is not None else dy.astype(T)
        if stats:
            dx = g.copy()
            if center and not flags.get("drop_mean_term"):
                dx = dx - G.spread(G.mean(g, half))
            if not flags.get("drop_xhat_term"):
                h = G.mean(g * xhat, half)
                with np.errstate(divide="ignore", invalid="ignore"):
                    h = np.where(q > 0, h / q, 0)
                dx = dx - xhat * G.spread(h.astype(T))
            dx = dx * G.spread(r)
        else:
            dx = g * G.spread(r)
        out["dx"] = dx
        dyt = dy.astype(T)
        first = flags.get("dweight") == "first_sample"
        if w is not None:
            prod = dyt * (x if flags.get("dweight") == "x" else xhat)
            out["dweight"] = _param_sum(prod, w, x.shape, variant, first)
        if b is not None:
            out["dbias"] = _param_sum(dyt, b, x.shape, variant, False)
        if stats and variant in ("layer_norm", "group_norm", "batch_norm", "instance_norm"):
            out["mean"], out["rstd"] = mu, r
        if stats and variant == "rms_norm":
            out["rstd"] = r
        out.update(_running(variant, kwargs, x, mu, var, G, stats, T, flags))
    return out


def _running(variant, kwargs, x, mu, var, G, stats, T, flags):
    if variant not in ("batch_norm", "instance_norm") or kwargs.get("running_mean") is None:
        return {}
    rm, rv = kwargs["running_mean"].astype(T), kwargs["running_var"].astype(T)
    if variant == "batch_norm":
        t = int(kwargs.get("num_batches_tracked", 0))
        if not kwargs.get("training", False):
            return {"running_mean": rm, "running_var": rv, "num_batches_tracked": np.asarray(t)}
        t += 1
        m = kwargs.get("momentum", 0.1)
        f = T(1.0 / t if m is None else m)
        n = G.sizes.astype(T)
        unbiased = var if flags.get("running_var") == "biased" else var * n / (n - 1)
        new_mu, new_var = mu, unbiased
        state = {"num_batches_tracked": np.asarray(t, dtype=np.int64)}
    else:
        if not kwargs.get("use_input_stats", True):
            return {"running_mean": rm, "running_var": rv}
        f = T(kwargs.get("momentum", 0.1))
        n_, c = x.shape[0], x.shape[1]
        m = G.sizes.astype(T)
        unbiased = var if flags.get("running_var") == "biased" else var * m / (m - 1)
        new_mu = mu.reshape(n_, c).mean(0)
        new_var = unbiased.reshape(n_, c).mean(0)
        state = {}
    if flags.get("momentum") == "reversed":
        f = T(1) - f
    state["running_mean"] = (T(1) - f) * rm + f * new_mu
    state["running_var"] = (T(1) - f) * rv + f * new_var
    return state


def _window(z, before, after):
    """``out[:, c] = sum of z[:, c - before : c + after + 1]`` along axis 1 (clipped)."""
    out = np.zeros_like(z)
    c = z.shape[1]
    for o in range(-before, after + 1):
        lo, hi = max(0, -o), min(c, c - o)
        if lo < hi:
            out[:, lo:hi] += z[:, lo + o:hi + o]
    return out


def _lrn(inputs, dy, kwargs, T, flags):
    x = inputs["x"].astype(T)
    n = int(kwargs["size"])
    alpha, beta, k = T(kwargs.get("alpha", 1e-4)), T(kwargs.get("beta", 0.75)), \
        T(kwargs.get("k", 1.0))
    a = alpha if flags.get("alpha_not_divided") else alpha / T(n)
    with np.errstate(all="ignore"):
        d = k + a * _window(x * x, n // 2, (n - 1) // 2)
        s = d ** -beta
        y = x * s
        t = dy.astype(T) * x * s / d
        back = (n // 2, (n - 1) // 2) if flags.get("unmirrored") else ((n - 1) // 2, n // 2)
        dx = dy.astype(T) * s - T(2) * a * beta * x * _window(t, *back)
    return {"y": y, "dx": dx}


def student(variant, inputs, dy, kwargs, *, dtype, **flags):
    """A plain NumPy implementation in ``dtype`` with float32 accumulation; ``flags`` inject
    mistakes (see :data:`MISTAKES`). Without flags it is correct, to the candidate's precision."""
    fmt = get_format(dtype)
    T = np.float64 if fmt.name == "float64" else np.float32
    if variant == "local_response_norm":
        out = _lrn(inputs, dy, kwargs, T, flags)
    elif variant in STUDENT_VARIANTS:
        out = _standardize(variant, inputs, dy, kwargs, T, flags)
    else:
        raise NotImplementedError(f"the student implementation has no {variant!r}")
    return {k: (round_to(np.asarray(v, np.float64), fmt) if np.asarray(v).dtype.kind == "f"
                else v) for k, v in out.items()}


student.variants = STUDENT_VARIANTS


# ----------------------------------------------------------------------------------------------
# The catalogue
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mistake:
    """One classic error, as a candidate for ``variant``."""

    name: str
    variant: str
    description: str
    flags: dict = field(default_factory=dict)
    #: dtypes whose default (lenient) tolerance cannot see this mistake; ``strict=True`` does
    strict_only: tuple = ()
    #: other flag sets that make the same mistake (a forward bug whose backward is derived
    #: consistently, as autograd does, rather than left textbook): the diagnosis tries them all
    alternatives: tuple = ()

    @property
    def id(self) -> str:
        return f"{self.variant}:{self.name}"

    def __call__(self, variant, inputs, dy, kwargs, *, dtype, alternative=None):
        if variant != self.variant:
            raise NotImplementedError(f"{self.id} is a {self.variant} candidate")
        extra = {} if alternative is None else self.alternatives[alternative]
        return student(variant, inputs, dy, kwargs, dtype=dtype, **{**self.flags, **extra})

    @property
    def variants(self):
        return (self.variant,)


def _m(variant, name, description, strict_only=(), alternatives=(), **flags):
    return Mistake(name, variant, description, flags, strict_only, alternatives)


MISTAKES = (
    _m("layer_norm", "unbiased variance",
       "divides the sum of squares by N-1 instead of N", var="unbiased",
       alternatives=({"consistent": True},)),
    _m("layer_norm", "eps outside the sqrt",
       "1/(sqrt(var)+eps) instead of 1/sqrt(var+eps)", eps_outside=True,
       alternatives=({"consistent": True},)),
    _m("layer_norm", "missing mean term in dx",
       "dx = r (g - xhat mean(g xhat)): forgets the gradient through the mean",
       drop_mean_term=True),
    _m("layer_norm", "missing xhat term in dx",
       "dx = r (g - mean(g)): forgets the gradient through the variance", drop_xhat_term=True),
    _m("layer_norm", "wrong reduction axis",
       "normalizes over the batch axis 0 instead of the trailing axes", axis="first"),
    _m("layer_norm", "dweight not summed over the batch",
       "dweight holds one sample's dy*xhat (one block's partial sum), not the batch sum",
       dweight="first_sample"),
    _m("layer_norm", "float16 accumulation of a long row",
       "sums the row's statistics in a float16 register", half=True),
    _m("layer_norm", "one-pass variance E[x^2] - E[x]^2",
       "variance as mean(x^2) - mean(x)^2 in float32: catastrophic cancellation", var="onepass",
       # in float32 its error (u32 * kappa^2) hides under half-precision rounding until
       # kappa ~ 250, and beyond that under the allowance for statistics held in the dtype
       strict_only=("bfloat16", "float16")),
    _m("layer_norm", "dweight uses x instead of xhat",
       "dweight = sum dy * x, the un-normalized input", dweight="x"),
    _m("batch_norm", "biased running variance",
       "updates running_var with the biased batch variance (1/m, not 1/(m-1))",
       running_var="biased"),
    _m("batch_norm", "momentum reversed",
       "running = momentum*running + (1-momentum)*batch (the TensorFlow convention with "
       "PyTorch's momentum)", momentum="reversed"),
    _m("group_norm", "off-by-one group split",
       "channel c goes to group (c+1)//(C/G) (clipped) instead of c//(C/G)", group_shift=True),
    _m("rms_norm", "RMSNorm subtracts the mean",
       "centres the row first: LayerNorm without bias instead of RMSNorm", center=True),
    _m("rms_norm", "eps outside the sqrt",
       "1/(rms+eps) instead of 1/sqrt(ms+eps)", eps_outside=True,
       alternatives=({"consistent": True},)),
    _m("instance_norm", "wrong reduction axis",
       "statistics over (C, H, W) per sample instead of (H, W) per channel", axis="first"),
    _m("local_response_norm", "alpha not divided by size",
       "k + alpha * sum(x^2) (TensorFlow/AlexNet) instead of PyTorch's k + alpha/n * sum",
       alpha_not_divided=True),
    _m("local_response_norm", "backward window not mirrored",
       "the backward sums over the forward's window, not its transpose (wrong for even sizes)",
       unmirrored=True),
)


def for_variant(name):
    return [m for m in MISTAKES if m.variant == name]


# ----------------------------------------------------------------------------------------------
# Diagnosis
# ----------------------------------------------------------------------------------------------
def _agree(cand, mine, bound, ref):
    """Whether ``cand`` is within twice the bound of ``mine`` (NaN/inf patterns equal)."""
    if cand is None or mine is None:
        return False
    cand, mine = np.asarray(cand, np.float64), np.asarray(mine, np.float64)
    if cand.shape != ref.shape or mine.shape != ref.shape:
        if cand.size == ref.size and mine.size == ref.size:
            cand, mine = cand.reshape(ref.shape), mine.reshape(ref.shape)
        else:
            return cand.shape == mine.shape and bool(np.allclose(cand, mine, rtol=1e-2,
                                                                 atol=1e-6, equal_nan=True))
    fc, fm = np.isfinite(cand), np.isfinite(mine)
    if np.any(fc != fm) or np.any(np.isnan(cand) != np.isnan(mine)) or \
            np.any(~fc & (cand != mine) & ~np.isnan(cand)):
        return False
    both = fc & fm
    with np.errstate(invalid="ignore"):
        err = np.abs(cand[both] - mine[both])
        b = np.asarray(bound, np.float64)[both]
    return bool(np.all(err <= 2 * np.where(np.isfinite(b), b, np.inf)))


def _score(m, alt, failing, per_case_best):
    """``(score, explained, contradicted, mistake, cases)`` of one form of a mistake."""
    explained, contradicted, cases_ok = 0, 0, []
    for prep, res, got in failing:
        case = prep.case
        try:
            mine = m(case.variant, {n: a.copy() for n, a in case.inputs.items()},
                     case.dy.copy(), dict(case.kwargs), dtype=case.dtype, alternative=alt)
        except Exception:  # noqa: BLE001 - a mistake that cannot run here explains nothing
            continue
        bad = {o.name for o in res.failing()}
        ok_here = True
        for key, o in res.outputs.items():
            if key not in mine or key not in got:
                if key in bad:
                    ok_here = False
                continue
            if key in prep.bounds:
                agree = _agree(got[key], mine[key], prep.bounds[key], prep.ref.outputs[key])
                # a mistake explains a failure only where it is itself wrong
                if key in bad and agree:
                    agree = not _agree(mine[key], prep.ref.outputs[key],
                                       0.5 * prep.bounds[key], prep.ref.outputs[key])
            else:
                agree = np.array_equal(np.asarray(got[key]), np.asarray(mine[key]))
            if key in bad:
                explained += agree
                ok_here &= agree
            elif not agree:
                contradicted += 1
                ok_here = False
        if ok_here:
            cases_ok.append(res.case)
    for c in cases_ok:
        names = per_case_best.setdefault(c, [])
        if m.name not in names:
            names.append(m.name)
    return (explained - contradicted, explained, contradicted, m, cases_ok)


def diagnose(spec, failing, dtype):
    """Which known mistake the failures look like.

    ``failing`` is a list of ``(prepared, case_result, outputs)`` for the failing cases of one
    variant (``prepared`` has ``case``, ``ref``, ``bounds``). Returns ``(summary, per_case)``:
    a sentence for the variant and a dict case name -> sentence.
    """
    mistakes = for_variant(spec.name)
    if not mistakes or not failing:
        return "", {}
    total = sum(len(res.failing()) for _, res, _ in failing)
    scored = []
    per_case_best = {}
    for m in mistakes:
        for alt in [None] + list(range(len(m.alternatives))):
            scored.append(_score(m, alt, failing, per_case_best))
    scored.sort(key=lambda s: (-s[0], MISTAKES.index(s[3])))
    best = scored[0]
    score, explained, contradicted, m, _ = best
    ties = []
    for s in scored[1:]:
        if s[0] == score and s[1] == explained and score > 0 and s[3].name != m.name \
                and s[3].name not in ties:
            ties.append(s[3].name)
    per_case = {c: "matches: " + " or ".join(names) for c, names in per_case_best.items()}
    if explained == total and contradicted == 0:
        alt = f" (or: {', '.join(ties)})" if ties else ""
        return f"matches: {m.name}{alt} -- {m.description}", per_case
    if score > 0 and explained >= total / 2:
        return (f"resembles: {m.name} (reproduces {explained} of {total} failing outputs) -- "
                f"{m.description}"), per_case
    return "no known mistake matches", per_case
