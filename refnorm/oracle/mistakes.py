"""A catalogue of deliberately wrong implementations, and the diagnosis that uses it.

Each :class:`Mistake` is a candidate (it follows the protocol of
:mod:`refnorm.oracle.adapters`) that makes one classic error: the ones students make when they
derive a backward by hand and the ones kernels ship with, for batch, layer, RMS, group and
instance norm (and two of LRN). Each has a ``kind`` (a key of :data:`KINDS`, the same for the
same error in every variant: ``"unbiased-variance"``, ``"eps-outside-sqrt"``,
``"missing-mean-term"``, ``"wrong-axis"``, ``"dweight-not-summed"``,
``"running-momentum-convention"``...), so that a grader can map a wrong output to a named
mistake (``Report.matched`` gives the ids). The tests require the oracle to fail every one of
them, in float32 and in bfloat16, and to name it.

They are all one small NumPy implementation, :func:`student`, written the way a kernel is:
statistics accumulated in float32 (float64 for float64 candidates), elementwise work in the
same format, every output rounded once to the candidate dtype. With no flag set it is a
*correct* low-precision implementation (the tests check that it passes); each mistake sets one
flag.

**Diagnosis.** When a candidate fails, :func:`diagnose` runs every mistake of the variant on
the failing cases and compares the candidate's outputs with the mistake's, under the same
per-element bounds (doubled: both carry their own rounding). A mistake *matches* when it
reproduces every failing output of every failing case and agrees with the candidate on the
outputs that passed; it *resembles* the candidate when it explains most of them. A mistake
with a ``pattern`` is named from the shape of the failures instead: the cross-row reduction
fault (``y`` and ``dx`` right on every case, only ``dweight``/``dbias`` wrong), which covers
partial-sum buffers that are uninitialized, racing, or dependent on the block count, bugs that
no deterministic candidate reproduces.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refnorm.oracle.formats import get_format, round_to
from refnorm.oracle.structure import labels_from_axes, param_view

__all__ = ["Mistake", "MISTAKES", "KINDS", "for_variant", "student", "diagnose",
           "STUDENT_VARIANTS", "REDUCTION_BLOCK"]

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


#: rows per block of the simulated two-stage reduction (``partial_sums="drop_tail"``)
REDUCTION_BLOCK = 4


def _param_sum(a, p, x_shape, variant, how="sum"):
    """``a`` (the shape of x) reduced to the parameter ``p``'s shape, over every row.

    ``how``: ``"sum"`` (correct); ``"none"``: not reduced at all (the product, shaped like
    ``x``, is returned as it is); ``"first_sample"``: one sample's rows only; ``"mean"``:
    divided by the number of rows; ``"drop_tail"``: a two-stage reduction over blocks of
    :data:`REDUCTION_BLOCK` rows whose second stage reads ``rows // block`` partial sums
    (floor where a ceiling was needed), so the last, partial block is lost unless the row count
    is a multiple of the block size.
    """
    if how == "none":
        return a
    view = param_view(p, x_shape, variant).shape
    if how == "first_sample":
        a = a[:1]
    lead = a.ndim - len(view)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(view)
                                      if n == 1 and a.shape[lead + i] != 1)
    if not axes:
        return a.reshape(p.shape)
    rows = int(np.prod([a.shape[i] for i in axes]))
    if how == "drop_tail":
        kept = [i for i in range(a.ndim) if i not in axes]
        r = a.transpose(kept + list(axes)).reshape(-1, rows)
        full = (rows // REDUCTION_BLOCK) * REDUCTION_BLOCK
        return np.ascontiguousarray(r[:, :full]).sum(axis=1).reshape(p.shape)
    out = a.sum(axis=axes).reshape(p.shape)
    return out / out.dtype.type(rows) if how == "mean" else out


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
        if flags.get("group_shift"):
            grp = np.minimum((idx[1] + 1) // cpg, g - 1)
        elif flags.get("axis") == "interleaved":   # (N, C/G, G) where (N, G, C/G) was meant
            grp = idx[1] % g
        else:
            grp = idx[1] // cpg
        return (idx[0] * g + grp).astype(np.int64), n * g, True
    if variant == "batch_norm":
        stats = kwargs.get("training", False) or kwargs.get("running_mean") is None
        axes = (0,) if flags.get("axis") == "first" and stats else \
            (0,) + tuple(range(2, x.ndim))
        labels, count = labels_from_axes(x.shape, axes)
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


def _cast16(a, T):
    """A float16 round trip: what a kernel that loads its inputs as float16 computes on."""
    if a is None:
        return None
    with np.errstate(over="ignore"):
        return np.asarray(a).astype(np.float16).astype(T)


def _conventions(variant, kwargs, flags, fmt, T):
    """``(mode, offsets, R)``: the casting mode the kernel follows (the claimed
    ``kwargs["casting_mode"]`` unless a mistake's ``casting`` flag overrides it), the weight
    offsets it adds one after the other (``offset`` flag: ``"twice"``, ``"missing"``), and
    ``R``, the rounding to the candidate dtype at the mode's rounding points (None for gemma,
    None and wide dtypes)."""
    if variant not in ("rms_norm", "layer_norm"):
        return None, (), None
    mode = flags.get("casting", kwargs.get("casting_mode"))
    offset = float(kwargs.get("offset", 0.0) or 0.0)
    offset = () if not offset else {"twice": (offset, offset), "missing": ()}.get(
        flags.get("offset"), (offset,))
    if mode in ("llama", "none") and fmt is not None and fmt.name not in ("float32", "float64"):
        def R(a):
            with np.errstate(over="ignore", invalid="ignore"):
                return round_to(np.asarray(a, np.float64), fmt).astype(T)
        return mode, offset, R
    return mode, offset, None


def _standardize(variant, inputs, dy, kwargs, T, flags, fmt=None):
    x = inputs["x"].astype(T)
    w, b = inputs.get("weight"), inputs.get("bias")
    if flags.get("cast16"):
        x, w, b, dy = _cast16(x, T), _cast16(w, T), _cast16(b, T), _cast16(dy, T)
    labels, count, stats = _layout(variant, x, kwargs, flags)
    G = _Groups(labels, count)
    half = flags.get("half", False)
    center = variant != "rms_norm" or flags.get("center", False)
    eps = kwargs.get("eps", 1e-5)
    if eps is None:
        eps = float(np.finfo(T).eps)
    eps = T(eps)
    mode, offsets, R = _conventions(variant, kwargs, flags, fmt, T)
    # casting mode "none": the statistics too are held in the candidate dtype (each square,
    # the mean, the mean plus eps, rstd), the sums accumulated in float32
    Rn = R if mode == "none" and R is not None else (lambda a: a)
    out = {}
    with np.errstate(all="ignore"):
        if stats:
            if center:
                mu = Rn(G.mean(x, half))
                if flags.get("var") == "onepass":
                    var = G.mean(x * x, half) - mu * mu
                    xc = x - G.spread(mu)
                else:
                    xc = Rn(x - G.spread(mu))
                    var = Rn(G.mean(Rn(xc * xc), half, correction=1 if flags.get("var") ==
                                    "unbiased" else 0))
            else:
                mu, xc = np.zeros(count, T), x
                var = Rn(G.mean(Rn(x * x), half))
            outside = flags.get("eps_outside") or kwargs.get("eps_placement") == "outside"
            r = T(1) / (np.sqrt(var) + eps) if outside else T(1) / np.sqrt(Rn(var + eps))
            r = Rn(r)
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
        # the weight offset: o + gamma, formed first (in the dtype for llama and none)
        for offset in offsets if wv is not None else ():
            wv = T(offset) + wv if R is None else R(T(offset) + wv)
        # llama and none: xhat rounded to the dtype before the weight multiply, the product
        # rounded (the forward's xhat, and the backward's for dweight; dx's stays float32 in
        # llama, as in Liger-Kernel's backward)
        xq = xhat if R is None else R(xhat)
        y = xq * wv if wv is not None else xq
        if R is not None and bv is not None:
            y = R(y)
        y = y + bv if bv is not None else y
        out["y"] = y
        g = dy.astype(T) * wv if wv is not None else dy.astype(T)
        if R is not None:
            g = R(g)           # dy (o + gamma) in the dtype
            if mode == "none":
                xhat = xq
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
        out["dx"] = -dx if flags.get("dx_sign") else dx
        dyt = dy.astype(T)
        reduce_w = {"first_sample": "first_sample", "mean": "mean",
                    "unreduced": "none"}.get(flags.get("dweight"), "sum")
        reduce_b = "sum"
        if flags.get("partial_sums") == "drop_tail":
            reduce_w = reduce_b = "drop_tail"
        prod_w = dyt * (x if flags.get("dweight") == "x" else xq)
        if R is not None:
            prod_w = R(prod_w)
        if flags.get("swap_params"):   # each gradient gets the other's formula
            if w is not None:
                out["dweight"] = _param_sum(dyt, w, x.shape, variant)
            if b is not None:
                out["dbias"] = _param_sum(prod_w, b, x.shape, variant)
        else:
            if w is not None:
                out["dweight"] = _param_sum(prod_w, w, x.shape, variant, reduce_w)
            if b is not None:
                out["dbias"] = _param_sum(dyt, b, x.shape, variant, reduce_b)
        if stats and variant in ("layer_norm", "group_norm", "batch_norm", "instance_norm"):
            out["mean"], out["rstd"] = mu, r
        if stats and variant == "rms_norm":
            out["rstd"] = r
        out.update(_running(variant, kwargs, x, mu, var, G, stats, T, flags))
    return out


def _var_is_final(flags):
    """Whether the running variance takes the batch variance as it is: biased on purpose (the
    mistake), or already unbiased (a forward that used 1/(m-1) stores what it computed)."""
    return flags.get("running_var") == "biased" or flags.get("var") == "unbiased"


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
        unbiased = var if _var_is_final(flags) else var * n / (n - 1)
        new_mu, new_var = mu, unbiased
        if mu.shape != rm.shape:   # per-position statistics (wrong axis): averaged per channel
            new_mu = mu.reshape(rm.shape[0], -1).mean(1)
            new_var = unbiased.reshape(rm.shape[0], -1).mean(1)
        state = {"num_batches_tracked": np.asarray(t, dtype=np.int64)}
    else:
        if not kwargs.get("use_input_stats", True):
            return {"running_mean": rm, "running_var": rv}
        f = T(kwargs.get("momentum", 0.1))
        n_, c = x.shape[0], x.shape[1]
        m = G.sizes.astype(T)
        unbiased = var if _var_is_final(flags) else var * m / (m - 1)
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
        out = _standardize(variant, inputs, dy, kwargs, T, flags, fmt)
    else:
        raise NotImplementedError(f"the student implementation has no {variant!r}")
    return {k: (round_to(np.asarray(v, np.float64), fmt) if np.asarray(v).dtype.kind == "f"
                else v) for k, v in out.items()}


student.variants = STUDENT_VARIANTS
student.accepts_conventions = True   # follows each case's offset and casting_mode


# ----------------------------------------------------------------------------------------------
# The catalogue
# ----------------------------------------------------------------------------------------------
#: The kinds of mistake, shared by every variant: a stable key (for a grader that maps a wrong
#: output to a named mistake) and what it means in general. Each entry of :data:`MISTAKES` has
#: one kind; ``Mistake.name`` says it for that variant.
KINDS = {
    "unbiased-variance": "the variance divided by N-1 instead of N",
    "eps-outside-sqrt": "1/(sqrt(var)+eps) instead of 1/sqrt(var+eps)",
    "missing-mean-term": "dx forgets the gradient through the mean",
    "missing-xhat-term": "dx forgets the gradient through the variance (or mean square)",
    "wrong-axis": "statistics over the wrong axes (or the wrong grouping of channels)",
    "dweight-not-summed": "dweight holds one sample's contribution, not the batch sum",
    "dweight-averaged": "dweight divided by the number of rows it sums",
    "dweight-not-reduced": "dweight left unreduced, shaped like x: dy * xhat with no sum",
    "dweight-uses-x": "dweight sums dy * x instead of dy * xhat",
    "params-swapped": "dweight and dbias swapped",
    "dx-sign": "dx with the wrong sign",
    "float16-inputs": "inputs rounded to float16 before a float32 computation",
    "float16-accumulation": "statistics accumulated in a float16 register",
    "one-pass-variance": "variance as E[x^2] - E[x]^2: catastrophic cancellation",
    "running-variance-biased": "running variance updated with the biased batch variance",
    "running-momentum-convention": "running = momentum*running + (1-momentum)*batch "
                                   "(TensorFlow's convention with PyTorch's momentum)",
    "reduction-fault": "the cross-row reduction of dweight/dbias is wrong on some cases only: "
                       "partial sums uninitialized, racing, or dependent on the block count",
    "rms-centred": "RMSNorm that subtracts the mean",
    "group-split": "channels assigned to the wrong group",
    "lrn-alpha": "LRN alpha not divided by the window size",
    "lrn-window": "LRN backward window not mirrored",
    "casting-llama": "llama casting (xhat rounded to the input dtype before the weight "
                     "multiply) where the claimed casting mode is gemma (float32 throughout)",
    "casting-none": "casting mode none (the statistics held in the input dtype) where the "
                    "claimed mode keeps them in float32 (llama, gemma)",
    "offset-twice": "the weight offset applied twice: y = xhat (2 offset + weight)",
    "offset-missing": "the weight offset not applied: y = xhat weight",
}


@dataclass(frozen=True)
class Mistake:
    """One classic error, as a candidate for ``variant``.

    ``kind`` is a key of :data:`KINDS`, the same for the same error in every variant. A mistake
    with a ``pattern`` (``"reduction"``) stands for a class of bugs that need not be
    reproducible (a race): the diagnosis names it from the pattern of the failures, not by
    reproducing its outputs.
    """

    name: str
    variant: str
    description: str
    flags: dict = field(default_factory=dict)
    #: dtypes whose default (lenient) tolerance cannot see this mistake; ``strict=True`` does
    strict_only: tuple = ()
    #: other flag sets that make the same mistake (a forward bug whose backward is derived
    #: consistently, as autograd does, rather than left textbook): the diagnosis tries them all
    alternatives: tuple = ()
    kind: str = ""
    pattern: str | None = None
    #: candidate dtypes in which the mistake changes nothing on the oracle's cases (a float16
    #: round trip of float16 inputs is exact); the tests leave those out, each with its reason
    invisible_in: tuple = ()

    @property
    def id(self) -> str:
        return f"{self.variant}:{self.name}"

    #: the catalogue's kernels follow each case's conventions (but for their own mistake)
    accepts_conventions = True

    def __call__(self, variant, inputs, dy, kwargs, *, dtype, alternative=None):
        if variant != self.variant:
            raise NotImplementedError(f"{self.id} is a {self.variant} candidate")
        extra = {} if alternative is None else self.alternatives[alternative]
        return student(variant, inputs, dy, kwargs, dtype=dtype, **{**self.flags, **extra})

    @property
    def variants(self):
        return (self.variant,)


def _m(variant, kind, name, description, strict_only=(), alternatives=(), pattern=None,
       invisible_in=(), **flags):
    assert kind in KINDS, kind
    return Mistake(name, variant, description, flags, strict_only, alternatives, kind, pattern,
                   invisible_in)


_CONSISTENT = ({"consistent": True},)
_STANDARDIZING = ("layer_norm", "batch_norm", "group_norm", "instance_norm")
_AFFINE = ("layer_norm", "rms_norm", "batch_norm", "group_norm", "instance_norm")
_ROWS = {"layer_norm": "the rows", "rms_norm": "the rows", "batch_norm": "(N, H, W)",
         "group_norm": "(N, H, W)", "instance_norm": "(N, H, W)"}


def _conventions_mistakes():
    """The kernel-convention mistakes of RMSNorm and LayerNorm (Liger-Kernel's casting modes, the
    weight offset). A casting mistake is invisible in float32 and float64: every mode computes
    in the input dtype there (its roundings are the accumulator's)."""
    out = []
    for v in ("rms_norm", "layer_norm"):
        out += [
            _m(v, "casting-llama", "llama casting where gemma is claimed",
               "rounds xhat to the input dtype (bfloat16, float16) before the weight multiply: "
               "llama casting, not the claimed gemma (float32 throughout, rounded once at "
               "the end)", casting="llama", invisible_in=("float32", "float64")),
            _m(v, "casting-none", "statistics in the input dtype where float32 is claimed",
               "holds the mean square, rstd and xhat in the input dtype: casting mode none, "
               "not the claimed llama or gemma (statistics in float32)", casting="none",
               invisible_in=("float32", "float64")),
            _m(v, "offset-twice", "weight offset applied twice",
               "y = xhat (2 offset + weight): the offset added to a weight that already holds "
               "it (a checkpoint's 1 + w), or added twice in the kernel", offset="twice"),
            _m(v, "offset-missing", "weight offset not applied",
               "y = xhat weight: the claimed offset (Gemma's 1 + w, Transformer Engine's "
               "zero-centred gamma) is not added", offset="missing"),
        ]
    return out


def _common():
    """The mistakes every one of the five standardizing variants can make."""
    out = []
    for v in _STANDARDIZING:
        what = "the batch variance in the training forward" if v == "batch_norm" else \
            "the variance"
        out += [
            _m(v, "unbiased-variance", "unbiased variance",
               f"{what} divides the sum of squares by N-1 instead of N", var="unbiased",
               alternatives=_CONSISTENT),
            _m(v, "missing-mean-term", "missing mean term in dx",
               "dx = r (g - xhat mean(g xhat)): forgets the gradient through the mean",
               drop_mean_term=True),
        ]
    for v in _AFFINE:
        rows = _ROWS[v]
        out += [
            _m(v, "eps-outside-sqrt", "eps outside the sqrt",
               "1/(sqrt(var)+eps) instead of 1/sqrt(var+eps)" if v != "rms_norm" else
               "1/(rms+eps) instead of 1/sqrt(ms+eps)", eps_outside=True,
               alternatives=_CONSISTENT),
            _m(v, "missing-xhat-term", "missing xhat term in dx",
               "dx = r (g - mean(g)): forgets the gradient through the variance"
               if v != "rms_norm" else "dx = r g: forgets the gradient through the mean square",
               drop_xhat_term=True),
            _m(v, "dweight-not-summed", "dweight not summed over the batch",
               "dweight holds one sample's dy*xhat (one block's partial sum), not the batch sum",
               dweight="first_sample"),
            _m(v, "dweight-averaged", "dweight averaged instead of summed",
               f"dweight = mean of dy*xhat over {rows} instead of the sum", dweight="mean"),
            _m(v, "dweight-uses-x", "dweight uses x instead of xhat",
               "dweight = sum dy * x, the un-normalized input", dweight="x"),
            _m(v, "dx-sign", "sign error in dx", "dx has the opposite sign", dx_sign=True),
            _m(v, "float16-inputs", "inputs cast to float16",
               "x, weight, bias and dy rounded to float16 before a float32 computation",
               cast16=True, invisible_in=("float16", "float64")),
            _m(v, "reduction-fault", "dweight/dbias cross-row reduction fault",
               f"y and dx are right but dweight/dbias, reduced across {rows}, are wrong on some "
               f"cases only: partial-sum buffers uninitialized, racing between blocks, or "
               f"dependent on the block count (simulated: a two-stage sum whose second stage "
               f"drops the last partial block)", pattern="reduction", partial_sums="drop_tail"),
        ]
        if v != "batch_norm":  # (batch_norm: not yet told apart from the reduction fault)
            out.append(_m(v, "dweight-not-reduced", "dweight not reduced",
                          "dweight = dy*xhat, shaped like x: the sum over the batch (and the "
                          "other axes the weight is broadcast along) is missing",
                          dweight="unreduced"))
        if v != "rms_norm":
            out.append(_m(v, "params-swapped", "dweight and dbias swapped",
                          "dweight = sum dy, dbias = sum dy*xhat", swap_params=True))
    return out


_ORDER = ("layer_norm", "batch_norm", "group_norm", "rms_norm", "instance_norm",
          "local_response_norm")

MISTAKES = (
    *_common(),
    *_conventions_mistakes(),
    _m("layer_norm", "wrong-axis", "wrong reduction axis",
       "normalizes over the batch axis 0 instead of the trailing axes", axis="first"),
    _m("layer_norm", "float16-accumulation", "float16 accumulation of a long row",
       "sums the row's statistics in a float16 register", half=True),
    _m("layer_norm", "one-pass-variance", "one-pass variance E[x^2] - E[x]^2",
       "variance as mean(x^2) - mean(x)^2 in float32: catastrophic cancellation", var="onepass",
       # in float32 its error (u32 * kappa^2) hides under half-precision rounding until
       # kappa ~ 250, and beyond that under the allowance for statistics held in the dtype
       strict_only=("bfloat16", "float16")),
    _m("batch_norm", "wrong-axis", "wrong reduction axis",
       "training statistics over the batch axis only, per (channel, position), instead of "
       "over (N, H, W) per channel", axis="first"),
    _m("batch_norm", "running-variance-biased", "biased running variance",
       "updates running_var with the biased batch variance (1/m, not 1/(m-1))",
       running_var="biased"),
    _m("batch_norm", "running-momentum-convention", "momentum reversed",
       "running = momentum*running + (1-momentum)*batch (the TensorFlow convention with "
       "PyTorch's momentum)", momentum="reversed"),
    _m("batch_norm", "one-pass-variance", "one-pass variance E[x^2] - E[x]^2",
       "variance as mean(x^2) - mean(x)^2 in float32: catastrophic cancellation",
       var="onepass",
       # the cancelling case (mean 1e4, std 1e-3) rounds to a constant in bfloat16 and float16,
       # whose squares float32 sums exactly: the variance comes out 0, as it should
       invisible_in=("bfloat16", "float16")),
    _m("group_norm", "group-split", "off-by-one group split",
       "channel c goes to group (c+1)//(C/G) (clipped) instead of c//(C/G)", group_shift=True),
    _m("group_norm", "wrong-axis", "channels interleaved into groups",
       "channel c goes to group c % G, a reshape to (N, C/G, G) where (N, G, C/G) was meant",
       axis="interleaved"),
    _m("group_norm", "float16-accumulation", "float16 accumulation of a long group",
       "sums the group's statistics in a float16 register", half=True),
    _m("rms_norm", "rms-centred", "RMSNorm subtracts the mean",
       "centres the row first: LayerNorm without bias instead of RMSNorm", center=True),
    _m("rms_norm", "wrong-axis", "wrong reduction axis",
       "normalizes over the batch axis 0 instead of the trailing axes", axis="first"),
    _m("rms_norm", "float16-accumulation", "float16 accumulation of a long row",
       "sums the row's mean square in a float16 register", half=True),
    _m("instance_norm", "wrong-axis", "wrong reduction axis",
       "statistics over (C, H, W) per sample instead of (H, W) per channel", axis="first"),
    _m("instance_norm", "running-variance-biased", "biased running variance",
       "updates running_var with the biased variance (1/m, not 1/(m-1))",
       running_var="biased"),
    _m("instance_norm", "running-momentum-convention", "momentum reversed",
       "running = momentum*running + (1-momentum)*batch (the TensorFlow convention with "
       "PyTorch's momentum)", momentum="reversed"),
    _m("local_response_norm", "lrn-alpha", "alpha not divided by size",
       "k + alpha * sum(x^2) (TensorFlow/AlexNet) instead of PyTorch's k + alpha/n * sum",
       alpha_not_divided=True),
    _m("local_response_norm", "lrn-window", "backward window not mirrored",
       "the backward sums over the forward's window, not its transpose (wrong for even sizes)",
       unmirrored=True),
)
MISTAKES = tuple(sorted(MISTAKES, key=lambda m: _ORDER.index(m.variant)))  # (stable)


def for_variant(name):
    return [m for m in MISTAKES if m.variant == name]


# ----------------------------------------------------------------------------------------------
# Diagnosis
# ----------------------------------------------------------------------------------------------
def _agree(cand, mine, bound, ref, rel=0.0, limit=None):
    """Whether ``cand`` is within twice the bound of ``mine`` (NaN/inf patterns equal), plus
    ``rel`` times ``|mine|``: where the reference is near 0 (its bound tiny) and the mistake's
    output is not, two kernels that make the same mistake still differ by its roundings.
    ``limit``, if given, is :func:`_limit` of ``bound``, computed once per case."""
    if cand is None or mine is None:
        return False
    cand, mine = np.asarray(cand, np.float64), np.asarray(mine, np.float64)
    if cand.shape != ref.shape or mine.shape != ref.shape:
        if cand.size == ref.size and mine.size == ref.size:
            cand, mine = cand.reshape(ref.shape), mine.reshape(ref.shape)
        else:
            return cand.shape == mine.shape and bool(np.allclose(cand, mine, rtol=1e-2,
                                                                 atol=1e-6, equal_nan=True))
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(cand - mine)
        # both finite everywhere (the common case: a NaN maximum compares False): no pattern
        if err.size and err.max() < np.inf:
            limit = _limit(bound) if limit is None else limit
            if rel:
                limit = limit + rel * np.abs(mine)
            return bool((err <= limit).all())
    fc, fm = np.isfinite(cand), np.isfinite(mine)
    if np.any(fc != fm) or np.any(np.isnan(cand) != np.isnan(mine)) or \
            np.any(~fc & (cand != mine) & ~np.isnan(cand)):
        return False
    both = fc & fm
    with np.errstate(invalid="ignore"):
        err = np.abs(cand[both] - mine[both])
        slack = rel * np.abs(mine[both])
    return bool(np.all(err <= (_limit(bound) if limit is None else limit)[both] + slack))


def _limit(bound):
    """Twice the bound, infinite where the bound is not finite: :func:`_agree`'s allowance."""
    b = np.asarray(bound, np.float64)
    return 2 * np.where(np.isfinite(b), b, np.inf)


def _case_limits(prep, key):
    """``(limit, half)``: :func:`_limit` of the case's bound for ``key`` and of half of it,
    kept on ``prep`` (``Prepared.agree_limits``) for every mistake and candidate scored there."""
    store = getattr(prep, "agree_limits", None)
    if store is not None and key in store:
        return store[key]
    bound = prep.bounds[key]
    value = (_limit(bound), _limit(0.5 * bound))
    if store is not None:
        store[key] = value
    return value


#: the largest case (elements of its input) whose mistake outputs a prepared case keeps
_KEEP_OUTPUTS_UP_TO = 1 << 16


def _mistake_outputs(m, alt, prep):
    """The outputs of mistake ``m`` (form ``alt``) on a prepared case, or None where it cannot
    run; kept on ``prep`` (``Prepared.mistake_outputs``, for cases up to
    :data:`_KEEP_OUTPUTS_UP_TO` elements) for the next failing candidate of the same cases."""
    store = getattr(prep, "mistake_outputs", None)
    key = (m.id, alt)
    if store is not None and key in store:
        return store[key]
    case = prep.case
    try:
        mine = m(case.variant, {n: a.copy() for n, a in case.inputs.items()},
                 case.dy.copy(), dict(case.kwargs), dtype=case.dtype, alternative=alt)
    except Exception:  # noqa: BLE001 - a mistake that cannot run here explains nothing
        mine = None
    if isinstance(mine, dict):  # float outputs in float64 once, as _agree compares them
        mine = {k: v.astype(np.float64, copy=False)
                if isinstance(v, np.ndarray) and v.dtype.kind == "f"
                else v for k, v in mine.items()}
    if store is not None and np.size(case.arrays[0]) <= _KEEP_OUTPUTS_UP_TO:
        store[key] = mine
    return mine


def _score(m, alt, failing, per_case_best):
    """``(score, explained, contradicted, mistake, cases)`` of one form of a mistake."""
    explained, contradicted, cases_ok = 0, 0, []
    for prep, res, got in failing:
        case = prep.case
        mine = _mistake_outputs(m, alt, prep)
        if mine is None:  # a mistake that cannot run here explains nothing
            continue
        bad = {o.name for o in res.failing()}
        ok_here = True
        for key, o in res.outputs.items():
            if key not in mine or key not in got:
                if key in bad:
                    ok_here = False
                continue
            if key in prep.bounds:
                limit, half = _case_limits(prep, key)
                agree = _agree(got[key], mine[key], prep.bounds[key], prep.ref.outputs[key],
                               rel=4 * get_format(case.dtype).u, limit=limit)
                # a mistake explains a failure only where it is itself wrong
                if key in bad and agree:
                    agree = not _agree(mine[key], prep.ref.outputs[key],
                                       0.5 * prep.bounds[key], prep.ref.outputs[key],
                                       limit=half)
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


def _param_grads(spec):
    """The output names of the parameter gradients (``dweight``, ``dbias``)."""
    return {"d" + n for n in getattr(spec, "diff_argnames", ()) if n != "x"}


def _pattern_diagnosis(spec, mistakes, failing, n_cases, per_case):
    """The reduction-fault class, from its pattern: every failing output of every failing case
    is a parameter gradient (``y``, ``dx``, the saved and running statistics all pass), so the
    per-row work is right and the reduction across rows is not. ``n_cases`` (all the cases
    checked, when known) says on how many cases it went wrong."""
    grads = _param_grads(spec)
    bad = [{o.name for o in res.failing()} for _, res, _ in failing]
    if not grads or not all(b and b <= grads for b in bad):
        return "", per_case, []
    m = next((m for m in mistakes if m.pattern == "reduction"), None)
    name = m.name if m is not None else "dweight/dbias cross-row reduction fault"
    which = ", ".join(sorted(set().union(*bad)))
    some = (f"{len(failing)} of {n_cases} cases" if n_cases else f"{len(failing)} case(s)")
    text = (f"matches: {name} -- y and dx are right on every case; only {which} (reduced "
            f"across rows) fail, on {some}: look for partial-sum buffers across rows that are "
            f"uninitialized, racing between blocks, or dependent on the block count")
    return (text, {res.case: f"matches: {name}" for _, res, _ in failing},
            [m.id] if m is not None else [])


def diagnose(spec, failing, dtype, n_cases=None, *, detail=False):
    """Which known mistake the failures look like.

    ``failing`` is a list of ``(prepared, case_result, outputs)`` for the failing cases of one
    variant (``prepared`` has ``case``, ``ref``, ``bounds``); ``n_cases``, optional, the number
    of cases checked. Returns ``(summary, per_case)``: a sentence for the variant and a dict
    case name -> sentence; with ``detail``, also the ids (``Mistake.id``) of the mistakes that
    match (several when they tie), for a grader to map a wrong output to a named mistake.

    A mistake *matches* when it reproduces every failing output and contradicts none. When none
    does and every failure is a parameter gradient (``y`` and ``dx`` right everywhere), the
    reduction-fault class is named from that pattern; otherwise the closest mistake is said to
    *resemble* the candidate, or none is named.
    """
    summary, per_case, matched = _diagnose(spec, failing, n_cases)
    return (summary, per_case, matched) if detail else (summary, per_case)


def _residual_sum_diagnosis(spec, failing):
    """A fused residual-add norm whose residual sum ``s`` is rounded to the candidate dtype
    although ``residual_in_fp32`` keeps it in float32: named when ``s`` fails on every failing
    case, every one of them sets ``residual_in_fp32``, and the candidate's ``s`` is the exact
    sum rounded to the candidate dtype (within one more rounding in the accumulator)."""
    if "s" not in getattr(spec, "outputs", ()) or not failing:
        return None
    for prep, res, got in failing:
        o = res.outputs.get("s")
        case = prep.case
        fmt = get_format(case.dtype)
        if o is None or o.passed or not case.kwargs.get("residual_in_fp32") \
                or fmt.u <= 2.0 ** -24 or got.get("s") is None:
            return None
        ref = np.asarray(prep.ref.outputs["s"], np.float64)
        mine = np.asarray(got["s"], np.float64)
        if mine.shape != ref.shape:
            return None
        with np.errstate(all="ignore"):
            near = np.abs(mine - round_to(ref, fmt)) <= 2.0 ** -24 * np.abs(ref) * 2 \
                + fmt.smallest_subnormal
        if not np.all(near | ~np.isfinite(ref)):
            return None
    fmt = get_format(failing[0][0].case.dtype)
    others = sorted({o.name for _, res, _ in failing for o in res.failing()} - {"s"})
    then = f"; {', '.join(others)} fail with it" if others else ""
    text = (f"matches: the residual sum s rounded to the input dtype -- with "
            f"residual_in_fp32=True s must be kept in float32 (FlashAttention's "
            f"residual_in_fp32), but the candidate returns x + residual rounded to {fmt.name}: "
            f"the residual stream keeps {fmt.p} significant bits instead of 24{then}")
    return text, {res.case: "matches: s rounded to the input dtype although residual_in_fp32"
                  for _, res, _ in failing}, []


def _recomputed_gradients(spec, case):
    r"""``{output: array}``: the gradients of a backward that recomputes
    :math:`\hat x = (\tilde y - \beta)/\gamma` from the output ``y`` rounded to the case's
    dtype (a memory-saving backward), in float64; None where that does not apply."""
    from refnorm.oracle import tolerance as T
    from refnorm.oracle.reference import compute

    if spec.name not in T.MEMORY_EFFICIENT or "weight" not in case.inputs:
        return None
    inner, sub, ref = (spec, case, compute(spec, case)) if spec.name not in T.FUSED_ADD \
        else T._inner_case(spec, case)
    xhat, r, gamma, beta, y, dy = T._trailing_rows(sub, ref)
    with np.errstate(all="ignore"):
        xr = (round_to(y, get_format(case.dtype)) - beta) / gamma
        g = gamma * dy
        dx = r * (g - xr * np.mean(g * xr, axis=1, keepdims=True)
                  - (np.mean(g, axis=1, keepdims=True) if inner.name == "layer_norm" else 0))
        out = {"dweight": np.sum(dy * xr, axis=0).reshape(case.inputs["weight"].shape)}
        if spec.name in T.FUSED_ADD:
            dx = dx + np.asarray(case.douts["s"], np.float64).reshape(dx.shape)
            out["dresidual"] = dx.reshape(case.inputs["x"].shape)
    out["dx"] = dx.reshape(case.inputs["x"].shape)
    return out


def _recompute_diagnosis(spec, failing):
    """A backward that recomputes xhat from y (a memory-saving backward) without declaring it.
    Named when every failing output of every failing case is a gradient that uses xhat (dx,
    dresidual, dweight), it is within the bound that declaring it gives (or the case is
    ill-conditioned for the recomputation), and most of its out-of-bound elements are closer to
    the gradient of that recomputation than to the reference (cases with subnormal inputs,
    where flushing to zero explains as much, are no evidence; some other case must be)."""
    from refnorm.oracle import tolerance as T
    from refnorm.oracle.reference import compute

    closer = total = 0
    for prep, res, got in failing:
        bad = {o.name for o in res.failing()}
        if not bad or not bad <= {"dx", "dresidual", "dweight"}:
            return None
        tiny = get_format(prep.case.dtype).accumulator.tiny
        if "subnormal" in prep.case.tags or any(
                np.any((a != 0) & (np.abs(a) < tiny)) for a in prep.case.arrays
                if a is not None):
            continue  # subnormal inputs: no evidence either way (flushing is as likely)
        mine = _recomputed_gradients(spec, prep.case)
        if mine is None:
            return None
        ref = compute(spec, prep.case)
        ill = T.recomputation_conditioning(spec, prep.case, ref)
        declared = None if ill else T.bounds(spec, prep.case, ref, memory_efficient=True)
        for key in bad:
            cand = got.get(key)
            if cand is None or np.shape(cand) != mine[key].shape:
                return None
            cand = np.asarray(cand, np.float64)
            r = np.asarray(prep.ref.outputs[key], np.float64)
            with np.errstate(all="ignore"):
                off = np.abs(cand - r) > prep.bounds[key]
                if declared is not None and np.any(np.abs(cand - r) > declared[key]):
                    return None
                closer += int(np.sum(np.abs(cand - mine[key])[off] < np.abs(cand - r)[off]))
            total += int(np.sum(off))
    if not total or closer < total / 2:
        return None
    text = ("matches: xhat recomputed from y in the backward without declaring it -- a "
            "memory-saving backward (Apex's memory_efficient=True) saves y and recomputes "
            "xhat = (y - bias) / weight, which errs where a weight is small against |y - bias|; "
            "declare it and the tolerance admits that error: candidate.memory_efficient = True, "
            "check(..., memory_efficient=True), torch_function(fn, memory_efficient=True) or "
            "--memory-efficient")
    return text, {res.case: "matches: xhat recomputed from y (memory-saving backward), "
                            "not declared" for _, res, _ in failing}, []


def _diagnose(spec, failing, n_cases):
    named = _residual_sum_diagnosis(spec, failing) or _recompute_diagnosis(spec, failing)
    if named is not None:
        return named
    mistakes = for_variant(spec.name)
    if not mistakes or not failing:
        return "", {}, []
    total = sum(len(res.failing()) for _, res, _ in failing)
    scored = []
    per_case_best = {}
    for m in mistakes:
        if m.pattern is not None:
            continue
        for alt in [None] + list(range(len(m.alternatives))):
            scored.append(_score(m, alt, failing, per_case_best))
    if not scored:
        return _pattern_diagnosis(spec, mistakes, failing, n_cases, per_case_best)
    scored.sort(key=lambda s: (-s[0], MISTAKES.index(s[3])))
    best = scored[0]
    score, explained, contradicted, m, _ = best
    ties, tie_ids = [], []
    for s in scored[1:]:
        if s[0] == score and s[1] == explained and score > 0 and s[3].name != m.name \
                and s[3].name not in ties:
            ties.append(s[3].name)
            tie_ids.append(s[3].id)
    per_case = {c: "matches: " + " or ".join(names) for c, names in per_case_best.items()}
    if explained == total and contradicted == 0:
        alt = f" (or: {', '.join(ties)})" if ties else ""
        return f"matches: {m.name}{alt} -- {m.description}", per_case, [m.id] + tie_ids
    pattern = _pattern_diagnosis(spec, mistakes, failing, n_cases, {})
    if pattern[0]:
        return pattern
    if score > 0 and explained >= total / 2:
        return (f"resembles: {m.name} (reproduces {explained} of {total} failing outputs) -- "
                f"{m.description}"), per_case, []
    return "no known mistake matches", per_case, []
