"""Forward+backward of the normalization layers: refnorm (NumPy) against PyTorch CPU, float64.

For each case, one forward and one backward with a given ``dy`` (gradients for ``x``, ``weight``
and ``bias``) are timed for refnorm and for PyTorch, **interleaved repeat by repeat in one
process** (the order alternates between repeats), so that the noise of a shared machine hits both
alike. PyTorch runs single-threaded (``torch.set_num_threads(1)``); OpenBLAS is pinned to one
thread too (NumPy's elementwise loops and reductions are single-threaded anyway). The backward is
fed ``dy`` directly: no ``sum(y * dy)`` loss is timed.

Reported per case, for each implementation (times in ms, "ratio" is refnorm / torch):

* ``wall med``/``wall min``: median and minimum over the repeats of the wall time;
* ``cpu med``/``cpu min``: the same for the process CPU time (``time.process_time``: user +
  system, exact). On a shared machine the wall time of a run includes time spent waiting for
  a core; the CPU time does not;
* ``user avg``/``sys avg``: the user and system parts, from ``getrusage``, averaged over the
  repeats. This kernel splits CPU time into user and system by sampling at the timer tick
  (4 ms), so single-run values are meaningless (0 or 4 ms) but their mean is not. The system
  part is mostly page faults: when glibc has returned a large freed block to the OS, the next
  array of that size is faulted in again page by page, which can double a run;
* ``faults``: minor page faults of one run (median);
* ``peak mem/x``: refnorm's peak extra memory over forward+backward (``tracemalloc``, which sees
  NumPy's buffers) divided by ``x.nbytes``, from just before the forward, with ``x``, ``dy``
  and the parameters allocated and ``y`` kept alive through the backward (as a caller holding
  the output would): ``y``, the cache, ``dx`` and every temporary count.

    python benchmarks/bench_norms.py [--repeats 30] [--cases LN,BN] [--out table.md|table.json]
    python benchmarks/bench_norms.py --small [--repeats 15] [--inner 50] [--clock cpu|wall]

``--small`` times the core norms on small inputs, (16, 64) and (4, 8, 32), where a call costs
microseconds and its Python overhead (validation, dispatch, temporaries) is most of it: per
call, forward alone and forward plus backward, for the record's ``forward``/``backward``, for
the record's ``op`` through ``refnorm.autograd`` (the "engine" columns), and for PyTorch (one
thread), interleaved; each figure is the median over the repeats of a run of ``--inner`` calls.
Run it from the repository root with ``PYTHONPATH=.`` to time the working tree's refnorm.

Both implementations share one glibc heap, so how often either pays for page faults depends
on the other's allocations too. To see the cost without them, run the same command with
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296`` (glibc keeps freed
memory instead of returning it); the library itself sets nothing.
"""
from __future__ import annotations

import os

# Before NumPy is imported: one BLAS thread, for a fair comparison with single-threaded torch.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402

from refnorm.norms import BY_NAME  # noqa: E402


@dataclass
class Case:
    label: str          # short name for the table and --cases
    name: str           # the registry name
    shape: tuple
    arrays: Callable    # rng, shape -> (x, weight, bias-or-absent) in diff_argnames order
    kwargs: dict
    torch_fn: Callable  # (F, x, *params) -> y, with the torch tensors


def _affine(rng, shape, n_param, with_bias=True):
    x = rng.standard_normal(shape)
    w = rng.standard_normal(n_param) + 1.0
    return (x, w, rng.standard_normal(n_param)) if with_bias else (x, w)


CASES = [
    Case("LN (512,4096)", "layer_norm", (512, 4096),
         lambda rng, s: _affine(rng, s, s[-1]), dict(normalized_shape=(4096,)),
         lambda F, x, w, b: F.layer_norm(x, (4096,), w, b, 1e-5)),
    Case("LN (8,128,768)", "layer_norm", (8, 128, 768),
         lambda rng, s: _affine(rng, s, s[-1]), dict(normalized_shape=(768,)),
         lambda F, x, w, b: F.layer_norm(x, (768,), w, b, 1e-5)),
    Case("LN (1024,768)", "layer_norm", (1024, 768),
         lambda rng, s: _affine(rng, s, s[-1]), dict(normalized_shape=(768,)),
         lambda F, x, w, b: F.layer_norm(x, (768,), w, b, 1e-5)),
    Case("BN (16,64,28,28) train", "batch_norm", (16, 64, 28, 28),
         lambda rng, s: _affine(rng, s, s[1]),
         dict(running_mean=np.zeros(64), running_var=np.ones(64), training=True),
         # fresh running statistics each call: F.batch_norm updates them in place
         lambda F, x, w, b: F.batch_norm(x, x.new_zeros(64), x.new_ones(64), w, b,
                                         training=True, momentum=0.1, eps=1e-5)),
    Case("GN32 (16,64,28,28)", "group_norm", (16, 64, 28, 28),
         lambda rng, s: _affine(rng, s, s[1]), dict(num_groups=32),
         lambda F, x, w, b: F.group_norm(x, 32, w, b, 1e-5)),
    Case("IN2d (16,64,28,28)", "instance_norm", (16, 64, 28, 28),
         lambda rng, s: _affine(rng, s, s[1]), dict(),
         lambda F, x, w, b: F.instance_norm(x, weight=w, bias=b, eps=1e-5)),
    Case("RMS (512,4096)", "rms_norm", (512, 4096),
         lambda rng, s: _affine(rng, s, s[-1], with_bias=False), dict(normalized_shape=(4096,)),
         lambda F, x, w: F.rms_norm(x, (4096,), w, None)),
]


def _registry_case(label, name):
    """A case from the record's first oracle input whose differentiable inputs are all given,
    timed against the record's ``torch_call`` (the variants torch has no op for)."""
    spec = BY_NAME[name]
    sample = next(s for s in spec.oracle_inputs(np.random.default_rng(0))
                  if all(a is not None for a in s.arrays))

    def torch_fn(F, *leaves):
        import torch
        out = spec.torch_call(torch, *leaves, **sample.kwargs)
        return out[0] if spec.stateful else out

    return Case(f"{label} {tuple(sample.arrays[0].shape)}".replace(" ", ""), name,
                sample.arrays[0].shape, lambda rng, shape: sample.arrays, dict(sample.kwargs),
                torch_fn)


# the vision variants without a PyTorch op, against their torch_call written from torch ops
CASES += [_registry_case(label, name) for label, name in (
    ("IBN-a", "ibn_a"), ("IBN-b", "ibn_b"), ("BRN", "batch_renorm"), ("aBN", "alpha_bn"),
    ("SN", "switchable_norm"), ("RN-B", "region_norm_b"), ("RN-L", "region_norm_l"),
    ("SPADE", "spade"))]



def _record(label, name, shape, arrays, kwargs, extra=()):
    """A case timed against the record's ``torch_call`` (variants that torch has no op for:
    the torch side is the record's implementation from torch ops). ``extra``: trailing
    positional inputs that are absent (None) in this case."""
    def torch_fn(F, *leaves):
        import torch
        out = BY_NAME[name].torch_call(torch, *leaves, *extra, **kwargs)
        return out[0] if BY_NAME[name].stateful else out
    return Case(label, name, shape, arrays, kwargs, torch_fn)


def _channel_params(rng, shape, count, n):
    return (rng.standard_normal(shape),) + tuple(1.0 + 0.3 * rng.standard_normal(n)
                                                 for _ in range(count))


_ACT = (16, 64, 28, 28)
_CONV = (256, 128, 3, 3)
CASES += [
    _record("EvoB0 tr (16,64,28,28)", "evo_norm_b0", _ACT,
            lambda rng, s: _channel_params(rng, s, 3, s[1]),
            dict(running_var=np.ones(64), training=True)),
    _record("EvoS0 G32 (16,64,28,28)", "evo_norm_s0", _ACT,
            lambda rng, s: _channel_params(rng, s, 3, s[1]), dict(groups=32)),
    _record("FRN+TLU (16,64,28,28)", "frn", _ACT,
            lambda rng, s: _channel_params(rng, s, 3, s[1]), dict(eps=1e-6), extra=(None,)),
    _record("BCN G32 (16,64,28,28)", "batch_channel_norm", _ACT,
            lambda rng, s: _channel_params(rng, s, 2, s[1]) + tuple(
                1.0 + 0.3 * rng.standard_normal(32) for _ in range(2)),
            dict(running_mean=np.zeros(64), running_var=np.ones(64), training=True,
                 num_groups=32)),
    _record("WS (256,128,3,3)", "weight_standardization", _CONV,
            lambda rng, s: (rng.standard_normal(s),), {}),
    _record("SWS (256,128,3,3)", "scaled_weight_standardization", _CONV,
            lambda rng, s: (rng.standard_normal(s), 1.0 + 0.3 * rng.standard_normal(
                (s[0], 1, 1, 1))), dict(gamma=1.7139588594436646)),
    _record("WC (256,128,3,3)", "weight_compander", _CONV,
            lambda rng, s: (rng.standard_normal(s), np.asarray(0.7), np.asarray(0.8)), {}),
]


def refnorm_runner(case, arrays, dy):
    spec = BY_NAME[case.name]
    forward, backward = spec.forward, spec.backward
    kwargs = {**dict(zip(spec.diff_argnames, arrays)), **case.kwargs}

    def run():
        out = forward(**kwargs)  # (y, cache) or, stateful, (y, state, cache)
        return out[0], backward(dy, out[-1])
    return run


def torch_runner(case, arrays, dy):
    import torch
    import torch.nn.functional as F
    leaves = [torch.from_numpy(a).requires_grad_(True) for a in arrays]
    dy_t = torch.from_numpy(dy)

    def run():
        y = case.torch_fn(F, *leaves)
        return y, torch.autograd.grad(y, leaves, dy_t)
    return run


def _rusage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def time_one(run):
    """(wall s, CPU s, user s, sys s, minor page faults) of one call; the result is dropped
    untimed. CPU is ``time.process_time`` (user + sys, exact); the user/sys split comes from
    ``getrusage``, which this kernel apportions by sampling at the timer tick, so it is
    meaningful only summed over many repeats."""
    u0, s0, f0 = _rusage()
    w0, c0 = time.perf_counter(), time.process_time()
    result = run()
    w1, c1 = time.perf_counter(), time.process_time()
    u1, s1, f1 = _rusage()
    del result
    return w1 - w0, c1 - c0, u1 - u0, s1 - s0, f1 - f0


def peak_memory(run, nbytes):
    """Peak traced memory of one call, above what was traced before it, in units of ``nbytes``."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = run()
        peak = tracemalloc.get_traced_memory()[1]
        del result
    finally:
        tracemalloc.stop()
    return (peak - before) / nbytes


def check_agreement(r_out, t_out):
    """Both implementations compute the same y and gradients (a guard against timing a bug)."""
    (y, grads), (ty, tgrads) = r_out, t_out
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-9, atol=1e-9)
    for g, tg in zip(grads, tgrads):
        np.testing.assert_allclose(g, tg.numpy(), rtol=1e-8, atol=1e-8)


def bench_case(case, repeats, warmup=2):
    rng = np.random.default_rng(0)
    arrays = case.arrays(rng, case.shape)
    dy = rng.standard_normal(case.shape)
    runners = {"refnorm": refnorm_runner(case, arrays, dy),
               "torch": torch_runner(case, arrays, dy)}
    check_agreement(runners["refnorm"](), runners["torch"]())
    samples = {name: [] for name in runners}
    order = list(runners)
    for i in range(warmup + repeats):
        gc.collect()
        for name in order:
            sample = time_one(runners[name])
            if i >= warmup:
                samples[name].append(sample)
        order.reverse()  # alternate which one runs first
    mem = peak_memory(runners["refnorm"], arrays[0].nbytes)
    row = {"case": case.label}
    for name, s in samples.items():
        wall, cpu, user, sys_, faults = (list(col) for col in zip(*s))
        row[name] = dict(wall_median=statistics.median(wall), wall_min=min(wall),
                         cpu_median=statistics.median(cpu), cpu_min=min(cpu),
                         user_mean=statistics.fmean(user), sys_mean=statistics.fmean(sys_),
                         faults_median=statistics.median(faults))
    r, t = row["refnorm"], row["torch"]
    row["ratio"] = {k: r[k] / t[k] if t[k] > 0 else float("nan")
                    for k in ("wall_median", "wall_min", "cpu_median", "cpu_min", "user_mean")}
    row["peak_memory_x_input"] = mem
    return row


# (column title, key in the per-implementation dict, width); times in ms
COLUMNS = (("wall med", "wall_median", 9), ("wall min", "wall_min", 9),
           ("cpu med", "cpu_median", 8), ("cpu min", "cpu_min", 8),
           ("user avg", "user_mean", 9), ("sys avg", "sys_mean", 8))


def table_lines(rows, markdown=False, header=True):
    """The table: per case, a refnorm line, a torch line and their ratio (refnorm / torch)."""
    titles = ["case", "impl"] + [t for t, _, _ in COLUMNS] + ["faults", "peak mem/x"]
    widths = [24, 8] + [w for _, _, w in COLUMNS] + [7, 11]
    lines = []
    if header and markdown:
        lines += ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    elif header:
        lines.append("".join(f"{t:<{w}}" if i < 2 else f"{t:>{w}}"
                             for i, (t, w) in enumerate(zip(titles, widths))))
    for row in rows:
        for name in ("refnorm", "torch", "ratio"):
            d = row[name]
            if name == "ratio":
                cells = [f"{d[k]:.2f}x" if k in d else "" for _, k, _ in COLUMNS] + ["", ""]
            else:
                cells = [f"{d[k] * 1e3:.2f}" for _, k, _ in COLUMNS]
                cells += [f"{d['faults_median']:.0f}",
                          f"{row['peak_memory_x_input']:.2f}x" if name == "refnorm" else ""]
            cells = [row["case"] if name == "refnorm" else "", name] + cells
            if markdown:
                lines.append("| " + " | ".join(cells) + " |")
            else:
                lines.append("".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}"
                                     for i, (c, w) in enumerate(zip(cells, widths))))
    return lines


# ------------------------------------------------------------------------------------------
# --small: the cost of a call on small inputs, where Python overhead dominates
# ------------------------------------------------------------------------------------------
@dataclass
class SmallCase:
    label: str
    name: str           # the registry name
    arrays: Callable    # rng -> the differentiable inputs, in diff_argnames order
    kwargs: Callable    # rng -> the other keyword arguments (fresh state each case)
    torch_fn: Callable  # torch, F -> (leaves -> y): built once, like a module


def _small_cases():
    """The core norms at (16, 64) and (4, 8, 32), or the natural equivalent for the norms whose
    input must be (N, C, *) with a spatial extent (InstanceNorm: (1, 16, 64) for (16, 64)), and
    for the weight reparametrizations the weight of that shape (``dim=0``)."""
    def affine(shape, n, bias=True):
        def make(rng):
            x = rng.standard_normal(shape)
            w = 1.0 + 0.3 * rng.standard_normal(n)
            return (x, w, rng.standard_normal(n)) if bias else (x, w)
        return make

    def const(**kw):
        return lambda rng: dict(kw)

    cases = []
    for shape in ((16, 64), (4, 8, 32)):
        tag = "(" + ",".join(map(str, shape)) + ")"
        n = shape[-1]
        cases.append(SmallCase(f"LN {tag}", "layer_norm", affine(shape, n),
                               const(normalized_shape=(n,)),
                               lambda torch, F, kw, n=n: lambda x, w, b: F.layer_norm(
                                   x, (n,), w, b, 1e-5)))
        cases.append(SmallCase(f"RMS {tag}", "rms_norm", affine(shape, n, bias=False),
                               const(normalized_shape=(n,)),
                               lambda torch, F, kw, n=n: lambda x, w: F.rms_norm(
                                   x, (n,), w, None)))
        c = shape[1]
        for training in (True, False):
            def bn_state(rng, c=c):
                return dict(running_mean=0.1 * rng.standard_normal(c),
                            running_var=1.0 + 0.1 * rng.random(c))

            def bn_kwargs(rng, training=training, bn_state=bn_state):
                return dict(bn_state(rng), training=training)

            def bn_torch(torch, F, kw, training=training):
                # copies: in training F.batch_norm updates them in place
                rm, rv = (torch.tensor(kw[k]) for k in ("running_mean", "running_var"))
                return lambda x, w, b: F.batch_norm(x, rm, rv, w, b, training=training,
                                                    momentum=0.1, eps=1e-5)
            cases.append(SmallCase(f"BN {'train' if training else 'eval'} {tag}", "batch_norm",
                                   affine(shape, c), bn_kwargs, bn_torch))
        groups = 8 if len(shape) == 2 else 4
        cases.append(SmallCase(f"GN{groups} {tag}", "group_norm", affine(shape, c),
                               const(num_groups=groups),
                               lambda torch, F, kw, g=groups: lambda x, w, b: F.group_norm(
                                   x, g, w, b, 1e-5)))
        ishape = (1,) + shape if len(shape) == 2 else shape
        itag = "(" + ",".join(map(str, ishape)) + ")"
        cases.append(SmallCase(f"IN {itag}", "instance_norm", affine(ishape, ishape[1]),
                               const(), lambda torch, F, kw: lambda x, w, b: F.instance_norm(
                                   x, None, None, w, b, use_input_stats=True, eps=1e-5)))
        cases.append(SmallCase(f"LRN5 {tag}", "local_response_norm",
                               lambda rng, s=shape: (rng.standard_normal(s),), const(size=5),
                               lambda torch, F, kw: lambda x: F.local_response_norm(
                                   x if x.ndim > 2 else x[..., None], 5)
                               .reshape(x.shape)))
        gshape = (shape[0],) + (1,) * (len(shape) - 1)
        cases.append(SmallCase(f"WN {tag}", "weight_norm",
                               lambda rng, s=shape, g=gshape: (rng.standard_normal(s),
                                                               1.0 + rng.random(g)),
                               const(dim=0),
                               lambda torch, F, kw: lambda v, g: torch._weight_norm(v, g, 0)))

        def sn_kwargs(rng, shape=shape):
            h = shape[0]
            w = int(np.prod(shape[1:]))
            u, v = rng.standard_normal(h), rng.standard_normal(w)
            return dict(u=u / np.linalg.norm(u), v=v / np.linalg.norm(v),
                        n_power_iterations=1, eps=1e-12, dim=0, training=True)

        def sn_torch(torch, F, kw, shape=shape):
            # the parametrization module of torch.nn.utils.parametrizations.spectral_norm,
            # built once (as a layer holds it) and called on the weight, in training mode
            holder = torch.nn.Module()
            holder.weight = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
            with torch.random.fork_rng(devices=[]):
                torch.nn.utils.parametrizations.spectral_norm(holder, n_power_iterations=1,
                                                              eps=1e-12, dim=0)
            sn = holder.parametrizations.weight[0]
            sn.train(True)
            with torch.no_grad():  # the vectors are the module's state
                sn._u.copy_(torch.from_numpy(kw["u"]))
                sn._v.copy_(torch.from_numpy(kw["v"]))
            return sn
        cases.append(SmallCase(f"SN {tag}", "spectral_norm",
                               lambda rng, s=shape: (rng.standard_normal(s),), sn_kwargs,
                               sn_torch))
    return cases


def _small_runners(case, rng):
    """``{name: (forward, forward_backward)}`` for refnorm's record (forward, backward), the
    engine op, and torch; each callable runs one call on the same inputs."""
    import torch
    import torch.nn.functional as F
    from refnorm import autograd as ag
    spec = BY_NAME[case.name]
    arrays = case.arrays(rng)
    kwargs = case.kwargs(rng)
    dy = rng.standard_normal(arrays[0].shape)
    inputs = {**dict(zip(spec.diff_argnames, arrays)), **kwargs}
    forward, backward, op = spec.forward, spec.backward, spec.op

    def r_fwd():
        return forward(**inputs)

    def r_fb():
        out = forward(**inputs)
        return out[0], backward(dy, out[-1])

    def e_fwd():
        leaves = {k: ag.Tensor(a, requires_grad=True)
                  for k, a in zip(spec.diff_argnames, arrays)}
        out = op(**{**inputs, **leaves})
        return out[0] if spec.stateful else out

    def e_fb():
        leaves = {k: ag.Tensor(a, requires_grad=True)
                  for k, a in zip(spec.diff_argnames, arrays)}
        out = op(**{**inputs, **leaves})
        (out[0] if spec.stateful else out).backward(dy)
        return [t.grad for t in leaves.values()]

    fn = case.torch_fn(torch, F, kwargs)
    t_leaves = [torch.from_numpy(a).requires_grad_(True) for a in arrays]
    t_dy = torch.from_numpy(dy)

    def t_fwd():
        return fn(*t_leaves)

    def t_fb():
        y = fn(*t_leaves)
        return y, torch.autograd.grad(y, t_leaves, t_dy)

    # a guard against timing a bug: the same y and gradients
    (y, grads), (ty, tgrads) = r_fb(), t_fb()
    if True:
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-9, atol=1e-9)
        for g, tg in zip(grads, tgrads):
            np.testing.assert_allclose(g, tg.numpy(), rtol=1e-8, atol=1e-8)
    return {"refnorm": (r_fwd, r_fb), "engine": (e_fwd, e_fb), "torch": (t_fwd, t_fb)}


def _per_call(run, inner, clock):
    t0 = clock()
    for _ in range(inner):
        run()
    return (clock() - t0) / inner


def bench_small(case, repeats, inner, clock):
    """Median over ``repeats`` of the time per call (each repeat: ``inner`` calls in a row), the
    implementations interleaved repeat by repeat, the order alternating."""
    runners = _small_runners(case, np.random.default_rng(0))
    samples = {(name, mode): [] for name in runners for mode in ("fwd", "fb")}
    order = list(runners)
    for i in range(repeats + 1):  # the first round warms up
        for name in order:
            for mode, run in zip(("fwd", "fb"), runners[name]):
                t = _per_call(run, inner, clock)
                if i:
                    samples[name, mode].append(t)
        order.reverse()
    med = {key: statistics.median(v) for key, v in samples.items()}
    return dict(case=case.label, **{f"{n}_{m}": t for (n, m), t in med.items()})


def small_lines(rows, markdown=False):
    cols = [("case", 18)]
    for mode, title in (("fwd", "forward"), ("fb", "fwd+bwd")):
        cols += [(f"{title} refnorm", 16), ("torch", 8), ("ratio", 7), ("engine", 8),
                 ("ratio", 7)]
    lines = []
    if markdown:
        lines += ["| " + " | ".join(t for t, _ in cols) + " |", "|" + "---|" * len(cols)]
    else:
        lines.append("".join(f"{t:<{w}}" if i == 0 else f"{t:>{w}}"
                             for i, (t, w) in enumerate(cols)))
    for row in rows:
        cells = [row["case"]]
        for mode in ("fwd", "fb"):
            r, t, e = (row[f"{n}_{mode}"] for n in ("refnorm", "torch", "engine"))
            cells += [f"{r * 1e6:.1f}", f"{t * 1e6:.1f}", f"{r / t:.2f}x", f"{e * 1e6:.1f}",
                      f"{e / t:.2f}x"]
        if markdown:
            lines.append("| " + " | ".join(cells) + " |")
        else:
            lines.append("".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                                 for i, (c, (_, w)) in enumerate(zip(cells, cols))))
    return lines


def main_small(args):
    import torch
    torch.set_num_threads(1)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    wanted = [p.strip() for p in args.cases.split(",") if p.strip()]
    cases = [c for c in _small_cases() if not wanted or any(c.label.startswith(p)
                                                              for p in wanted)]
    print(f"small inputs, float64: time per call in microseconds ({args.clock} time), median "
          f"of {args.repeats} repeats of {args.inner} calls, interleaved; 'ratio' is refnorm / "
          f"torch (1 thread); 'engine' is the record's op through refnorm.autograd; numpy "
          f"{np.__version__}, torch {torch.__version__}")
    rows = []
    for case in cases:
        rows.append(bench_small(case, args.repeats, args.inner, clock))
        print("\n".join(small_lines(rows[-1:])[0 if len(rows) == 1 else 1:]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            if args.out.endswith(".json"):
                json.dump(dict(numpy=np.__version__, torch=torch.__version__, clock=args.clock,
                               repeats=args.repeats, inner=args.inner, rows=rows), f, indent=2)
            else:
                f.write("\n".join(small_lines(rows, markdown=True)) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None,
                        help="repeats per case (default 30; --small: 15)")
    parser.add_argument("--small", action="store_true",
                        help="the core norms on small inputs ((16, 64), (4, 8, 32)): forward "
                             "and forward+backward per call, refnorm, its engine op, torch")
    parser.add_argument("--inner", type=int, default=50,
                        help="--small: calls per repeat (default 50)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="--small: process CPU time (default) or wall time")
    parser.add_argument("--cases", default="",
                        help="comma-separated prefixes of the case labels (e.g. 'LN,GN'); "
                             "all cases if empty")
    parser.add_argument("--out", default=None,
                        help="also write the results to this path: JSON if it ends in .json, "
                             "else a markdown table")
    args = parser.parse_args(argv)
    if args.small:
        args.repeats = args.repeats or 15
        return main_small(args)
    args.repeats = args.repeats or 30

    import torch
    torch.set_num_threads(1)
    wanted = [p.strip() for p in args.cases.split(",") if p.strip()]
    cases = [c for c in CASES if not wanted or any(c.label.startswith(p) for p in wanted)]
    malloc = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))
    print(f"forward+backward, float64, {args.repeats} repeats interleaved; numpy "
          f"{np.__version__}, torch {torch.__version__} ({torch.get_num_threads()} thread); "
          f"glibc malloc: {malloc or 'defaults'}")
    rows = []
    for case in cases:
        rows.append(bench_case(case, args.repeats))
        print("\n".join(table_lines(rows[-1:], header=len(rows) == 1)), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            if args.out.endswith(".json"):
                json.dump(dict(numpy=np.__version__, torch=torch.__version__,
                               repeats=args.repeats, malloc=malloc, rows=rows), f, indent=2)
            else:
                f.write("\n".join(table_lines(rows, markdown=True)) + "\n")


if __name__ == "__main__":
    main()
