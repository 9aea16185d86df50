r"""Golden optimizer trajectories: check another optimizer step by step against refnorm's.

``refnorm goldens export --optimizer NAME ...`` (``all``: every registered optimizer,
:data:`refnorm.optim.ALL_OPTIMIZERS`) writes, next to the normalization cases, one trajectory
per optimizer and hyper-parameter setting (:data:`SETTINGS`):
the initial parameters, and after each of ``steps`` steps the gradients that were fed, the
parameters, the optimizer state and, for SGDP and AdamP, the projection decisions. A checker never
recomputes a loss: it feeds the recorded gradients to its own optimizer and compares what comes
out (:func:`check_trajectory`).

**The problem** (:func:`make_problem`, identical for every optimizer of one seed) is a small
regression network trained on a fresh mini-batch of 8 examples per step, float64 throughout,
with four parameters chosen to exercise every branch of SGDP/AdamP's projection:

=================  ==============  =============================================================
``ws.weight``      (4, 3, 2, 2)    a conv-like weight used through *weight standardization* (per
                                   output channel), so scale-invariant per channel; the loss also
                                   holds an L2 term :math:`\tfrac{\lambda}{2}\lVert w\rVert^2`
                                   (:math:`\lambda` = :data:`L2`) which breaks the invariance by a
                                   varying amount: the projection fires in the channel view on
                                   some steps, in the layer view on others, and not at all on
                                   others
``ln.weight``      (5, 4)          a weight followed by a LayerNorm without affine: invariant as
                                   a whole (the layer view fires), not per row
``fc.weight``      (3, 5)          an ordinary 2-D weight (rarely projected)
``fc.bias``        (3,)            a 1-D bias (never projected)
=================  ==============  =============================================================

Loss: :math:`\tfrac{1}{2B}\lVert \tanh(\mathrm{LN}(\tanh(x\,\mathrm{WS}(W_0)^\top)W_1^\top))
W_2^\top + b - y\rVert^2 + \tfrac{\lambda}{2}\lVert W_0\rVert^2`, with targets from a fixed random
teacher plus noise.

**A trajectory file** (``optim-<name>-<k>.npz``, plain ``.npy`` members, ``<i>`` the parameter
index) holds ``initial_params__<i>``; stacked over the steps (first axis = step ``t = 1..steps``):
``grads__<i>`` (the gradient fed at step ``t``, taken at the parameters before it),
``params__<i>`` (after step ``t``), ``state__<field>__<i>`` (the optimizer's buffers after step
``t``: ``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), and for SGDP/AdamP
``projection__<i>`` (strings ``"channel"``, ``"layer"``, ``"none"``) and ``wd_ratio_applied__<i>``;
plus ``step``, ``lr`` and ``meta`` (the manifest entry as UTF-8 JSON). Its manifest entry (in the
manifest's ``"trajectories"`` list) has ``kind: "optimizer"``, the optimizer ``name``, the
trajectory ``id``, the full ``hyperparameters`` (defaults included), the parameter names and
shapes, the state and decision fields, ``steps``, ``seed``, ``dtype`` (float64), the shape and
dtype of every array and the file's SHA-256. Loading applies the checks of the norm cases
(schema, hashes, no pickles, no path out of the directory, embedded metadata).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from refnorm.oracle import _goldfiles as _g

__all__ = ["check_trajectory", "load_trajectories", "torch_optimizer", "make_problem",
           "select_optimizers", "GoldenTrajectory", "TrajectoryResult", "TrajectoryReport",
           "SETTINGS", "STEPS", "L2", "PARAM_NAMES", "DEFAULT_ULPS", "KIND"]

#: The manifest ``kind`` of a trajectory entry.
KIND = "optimizer"
#: Steps per trajectory.
STEPS = 20
#: The L2 coefficient of ``ws.weight`` in the loss (tuned so that its projection decision varies).
L2 = 3e-4
#: Parameter names, in order.
PARAM_NAMES = ("ws.weight", "ln.weight", "fc.weight", "fc.bias")
PARAM_SHAPES = ((4, 3, 2, 2), (5, 4), (3, 5), (3,))
#: Which parameters the problem makes scale-invariant, and how.
PARAM_NOTES = ("per output channel (weight standardization) up to the L2 term",
               "as a whole (LayerNorm without affine)", "no", "no (1-D: never projected)")
BATCH = 8
PROBLEM = "refnorm.oracle.trajectories: ws-ln-mlp v1"
#: Default tolerance of :func:`check_trajectory`, in float64 ULPs (``2**-52``) of the largest
#: magnitude each compared array has had in the golden trajectory so far.
DEFAULT_ULPS = 16.0
_EPS64 = 2.0 ** -52
_DECISIONS = ("projection", "wd_ratio_applied")

#: The hyper-parameter settings per optimizer (on top of the optimizer's defaults); an optimizer
#: registered without an entry here gets ``({"lr": 0.01},)``.
SETTINGS: dict[str, tuple[dict, ...]] = {
    "sgd": (dict(lr=0.1),
            dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2),
            dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "adam": (dict(lr=0.01),
             dict(lr=0.01, betas=(0.8, 0.99), weight_decay=1e-2, amsgrad=True)),
    "adamw": (dict(lr=0.01),
              dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    "sgdp": (dict(lr=0.1, momentum=0.9),
             dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "adamp": (dict(lr=0.01),
              dict(lr=0.01, weight_decay=1e-2, nesterov=True)),
}


# ----------------------------------------------------------------------------------------------
# The problem
# ----------------------------------------------------------------------------------------------
def _standardize_rows(z):
    zc = z - z.mean(axis=1, keepdims=True)
    sigma = np.sqrt((zc * zc).mean(axis=1, keepdims=True))
    return zc / sigma, sigma


def _standardize_rows_vjp(dzh, zh, sigma):
    return (dzh - dzh.mean(axis=1, keepdims=True)
            - zh * (dzh * zh).mean(axis=1, keepdims=True)) / sigma


def _loss_and_grads(params, x, y):
    w0, w1, w2, b = params
    w0h, s0 = _standardize_rows(w0.reshape(w0.shape[0], -1))   # weight standardization
    a1 = np.tanh(x @ w0h.T)
    zh, sz = _standardize_rows(a1 @ w1.T)                       # LayerNorm, no affine, no eps
    a2 = np.tanh(zh)
    r = a2 @ w2.T + b - y
    n = x.shape[0]
    loss = 0.5 * np.sum(r * r) / n + 0.5 * L2 * np.sum(w0 * w0)
    dout = r / n
    dz = _standardize_rows_vjp((dout @ w2) * (1 - a2 * a2), zh, sz)
    dh1 = (dz @ w1) * (1 - a1 * a1)
    dw0 = _standardize_rows_vjp(dh1.T @ x, w0h, s0).reshape(w0.shape) + L2 * w0
    return float(loss), [dw0, dz.T @ a1, dout.T @ a2, dout.sum(axis=0)]


def make_problem(seed: int, steps: int = STEPS):
    """``(initial_params, grad_fn, loss_fn)`` of the trajectory problem for ``seed``.

    ``grad_fn(params)`` returns the gradients on the next mini-batch (it is stateful: the
    ``k``-th call uses batch ``k``); ``loss_fn(params, t)`` is the loss on batch ``t`` (0-based).
    Everything is float64 and a deterministic function of ``seed``.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x7472616A]))
    params = [rng.standard_normal(PARAM_SHAPES[0]),
              rng.standard_normal(PARAM_SHAPES[1]) / 2,
              rng.standard_normal(PARAM_SHAPES[2]) / math.sqrt(5),
              0.1 * rng.standard_normal(PARAM_SHAPES[3])]
    teacher = rng.standard_normal((12, 3)) / math.sqrt(12)
    xs = rng.standard_normal((steps, BATCH, 12))
    ys = np.tanh(xs @ teacher) + 0.1 * rng.standard_normal((steps, BATCH, 3))
    calls = [0]

    def grad_fn(p):
        t = calls[0]
        calls[0] += 1
        return _loss_and_grads(p, xs[t], ys[t])[1]

    def loss_fn(p, t):
        return _loss_and_grads(p, xs[t], ys[t])[0]

    return params, grad_fn, loss_fn


def select_optimizers(names=None) -> list:
    """The optimizer records for ``names``: None or ``"all"`` gives every registered one,
    ``()`` or ``"none"`` none; unknown names raise ValueError."""
    from refnorm.optim import ALL_OPTIMIZERS, BY_NAME

    if names is None:
        return list(ALL_OPTIMIZERS)
    names = [names] if isinstance(names, str) else list(names)
    if "all" in names:
        return list(ALL_OPTIMIZERS)
    names = [n for n in names if n != "none"]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown optimizer(s) {', '.join(unknown)}; registered: "
                         f"{', '.join(BY_NAME)} (or 'all', 'none')")
    return [BY_NAME[n] for n in dict.fromkeys(names)]


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------
def _trajectory_arrays(spec, hyper, seed, steps):
    from refnorm.optim import run_trajectory

    params, grad_fn, _ = make_problem(seed, steps)
    records = run_trajectory(spec, params, grad_fn, steps, **hyper)
    arrays = {"step": np.arange(1, steps + 1, dtype=np.int64),
              "lr": np.array([r["lr"] for r in records], dtype=np.float64).reshape(steps)}
    state_fields = list(records[0]["state"]) if records else []
    state_fields = [f for f in state_fields if f != "step"]
    for i, p in enumerate(params):
        arrays[f"initial_params__{i}"] = np.array(p, dtype=np.float64)
        for key in ("grads", "params"):
            arrays[f"{key}__{i}"] = np.stack([r[key][i] for r in records]).astype(np.float64)
        for f in state_fields:
            if records[0]["state"][f][i] is not None:
                arrays[f"state__{f}__{i}"] = np.stack([r["state"][f][i] for r in records])
        if records and "projection" in records[0]:
            arrays[f"projection__{i}"] = np.array([r["projection"][i] for r in records],
                                                  dtype="<U7")
            arrays[f"wd_ratio_applied__{i}"] = np.array(
                [r["wd_ratio_applied"][i] for r in records], dtype=np.float64)
    decisions = [f for f in _DECISIONS if records and f in records[0]]
    return arrays, state_fields, decisions


def export_trajectories(directory: Path, optimizers=None, *, seed=0, steps=STEPS,
                        progress=None) -> list:
    """Write the trajectory files of ``optimizers`` into ``directory``; returns their manifest
    entries (called by :func:`refnorm.oracle.goldens.export`)."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    entries = []
    for spec in select_optimizers(optimizers):
        for k, setting in enumerate(SETTINGS.get(spec.name, (dict(lr=0.01),))):
            hyper = {**spec.defaults, **setting}
            arrays, state_fields, decisions = _trajectory_arrays(spec, hyper, seed, int(steps))
            tid = f"{spec.name}-{k:03d}"
            filename = f"optim-{tid}.npz"
            entry = {
                "kind": KIND, "file": filename, "id": tid, "name": spec.name,
                "title": spec.title, "torch_equivalent": spec.torch_equivalent,
                "hyperparameters": {h: _g._encode(v) for h, v in sorted(hyper.items())},
                "seed": int(seed), "steps": int(steps), "dtype": "float64",
                "problem": PROBLEM,
                "params": [{"name": n, "shape": list(s), "scale_invariant": note}
                           for n, s, note in zip(PARAM_NAMES, PARAM_SHAPES, PARAM_NOTES)],
                "state_fields": state_fields, "decision_fields": decisions,
                "arrays": {key: {"shape": list(a.shape), "dtype": a.dtype.name}
                           for key, a in sorted(arrays.items())},
            }
            arrays["meta"] = np.frombuffer(_g._canonical(entry), dtype=np.uint8)
            data = _g._npz_bytes(arrays)
            (directory / filename).write_bytes(data)
            entries.append({**entry, "sha256": _g._sha256(data)})
        if progress is not None:
            progress(spec.name)
    return entries


# ----------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------
@dataclass
class GoldenTrajectory:
    """One verified golden trajectory.

    ``initial_params``: list of arrays; ``grads``, ``params``: per parameter, an array stacked
    over the steps (``grads[i][t-1]`` is fed at step ``t``, ``params[i][t-1]`` comes out of it);
    ``state``: ``{field: [stacked array or None per parameter]}``; ``decisions``:
    ``{"projection": [str array per parameter], "wd_ratio_applied": [...]}`` (SGDP/AdamP only);
    ``hyper``: every hyper-parameter (defaults included); ``entry``: the manifest entry.
    """

    id: str
    name: str
    hyper: dict
    steps: int
    initial_params: list
    grads: list
    params: list
    state: dict
    decisions: dict
    lr: np.ndarray
    param_names: tuple
    entry: dict = field(default_factory=dict)

    @property
    def file(self) -> str:
        return self.entry.get("file", self.id)

    def describe(self) -> str:
        hyper = ", ".join(f"{k}={v!r}" for k, v in self.hyper.items())
        return f"{self.id} ({self.name}: {hyper})"


def _load_entry(directory: Path, entry, index) -> GoldenTrajectory:
    from refnorm.optim import BY_NAME

    if not isinstance(entry, dict) or entry.get("kind") != KIND:
        raise _g.GoldenError(f"manifest trajectory {index} is not an object of kind {KIND!r}")
    path = _g._safe_path(directory, entry.get("file"))
    data = path.read_bytes()
    digest = _g._sha256(data)
    if digest != entry.get("sha256"):
        raise _g.GoldenError(f"{path.name}: SHA-256 mismatch (file {digest}, manifest "
                             f"{entry.get('sha256')!r}): the file or the manifest was modified")
    arrays = _g._read_npz(data, path.name, kinds="fiubU")
    meta = arrays.pop("meta", None)
    if meta is None or meta.dtype != np.uint8 or meta.ndim != 1:
        raise _g.GoldenError(f"{path.name}: no embedded metadata")
    try:
        embedded = json.loads(meta.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _g.GoldenError(f"{path.name}: embedded metadata is not JSON") from exc
    expected = {k: v for k, v in entry.items() if k != "sha256"}
    if embedded != expected:
        raise _g._metadata_mismatch(path.name, embedded, expected)
    name = entry.get("name")
    if name not in BY_NAME:
        raise _g.GoldenError(f"{path.name}: unknown optimizer {name!r} (this refnorm has "
                             f"{', '.join(BY_NAME)})")
    declared = entry.get("arrays")
    if not isinstance(declared, dict) or set(declared) != set(arrays):
        raise _g.GoldenError(f"{path.name}: its arrays are not those the manifest lists")
    for key, info in declared.items():
        a = arrays[key]
        if (not isinstance(info, dict) or list(a.shape) != info.get("shape")
                or a.dtype.name != info.get("dtype")):
            raise _g.GoldenError(f"{path.name}: array {key!r} is not as the manifest says")
        if a.dtype.kind == "U" and not key.startswith("projection__"):
            raise _g.GoldenError(f"{path.name}: array {key!r} holds strings; only the "
                                 f"projection decisions may")
    steps = entry.get("steps")
    pinfo = entry.get("params")
    if not isinstance(steps, int) or steps < 1 or not isinstance(pinfo, list) or not pinfo:
        raise _g.GoldenError(f"{path.name}: 'steps' and 'params' are missing or invalid")
    n = len(pinfo)

    def need(key, shape, kind="f"):
        a = arrays.get(key)
        if a is None or a.shape != tuple(shape) or a.dtype.kind != kind:
            raise _g.GoldenError(f"{path.name}: array {key!r} missing or of the wrong shape "
                                 f"(expected {tuple(shape)})")
        return a

    need("step", (steps,), "i")
    if not np.array_equal(arrays["step"], np.arange(1, steps + 1)):
        raise _g.GoldenError(f"{path.name}: 'step' is not 1..{steps}")
    lr = need("lr", (steps,))
    shapes = [tuple(p.get("shape", ())) if isinstance(p, dict) else None for p in pinfo]
    if None in shapes:
        raise _g.GoldenError(f"{path.name}: invalid 'params' entry")
    init = [need(f"initial_params__{i}", s) for i, s in enumerate(shapes)]
    grads = [need(f"grads__{i}", (steps, *s)) for i, s in enumerate(shapes)]
    params = [need(f"params__{i}", (steps, *s)) for i, s in enumerate(shapes)]
    state = {}
    for f in entry.get("state_fields", []):
        got = [arrays.get(f"state__{f}__{i}") for i in range(n)]
        for i, a in enumerate(got):
            if a is not None:
                need(f"state__{f}__{i}", (steps, *shapes[i]))
        state[f] = got
    decisions = {}
    for f in entry.get("decision_fields", []):
        if f not in _DECISIONS:
            raise _g.GoldenError(f"{path.name}: unknown decision field {f!r}")
        decisions[f] = [need(f"{f}__{i}", (steps,), "U" if f == "projection" else "f")
                        for i in range(n)]
        if f == "projection":
            for a in decisions[f]:
                if not set(a.tolist()) <= {"channel", "layer", "none"}:
                    raise _g.GoldenError(f"{path.name}: unknown projection decision in "
                                         f"{sorted(set(a.tolist()))}")
    hyper = {k: _g._decode(v) for k, v in entry.get("hyperparameters", {}).items()}
    if "lr" not in hyper or not np.all(lr == hyper["lr"]):
        raise _g.GoldenError(f"{path.name}: the per-step 'lr' disagrees with the "
                             f"hyper-parameters")
    names = tuple(p.get("name", f"param{i}") for i, p in enumerate(pinfo))
    return GoldenTrajectory(entry.get("id", path.stem), name, hyper, steps, init, grads, params,
                            state, decisions, lr, names, entry)


def _matches(entry, names) -> bool:
    if names is None:
        return True
    if not isinstance(entry, dict):
        return True   # let the loader reject it
    return bool({entry.get("name"), entry.get("id"), entry.get("file")} & set(names))


def load_trajectories(directory, names=None) -> list:
    """The verified golden trajectories of ``directory`` (a list of :class:`GoldenTrajectory`),
    optionally only those whose optimizer name, id (``"adamp-001"``) or file name is in
    ``names``. Raises :class:`~refnorm.oracle.goldens.GoldenError` on any doubt."""
    directory = Path(directory)
    manifest = _g._read_manifest(directory)
    entries = manifest.get("trajectories", [])
    if not isinstance(entries, list):
        raise _g.GoldenError(f"{directory / _g.MANIFEST}: 'trajectories' must be a list")
    if isinstance(names, str):
        names = [names]
    return [_load_entry(directory, e, i) for i, e in enumerate(entries) if _matches(e, names)]


# ----------------------------------------------------------------------------------------------
# Checking a candidate
# ----------------------------------------------------------------------------------------------
@dataclass
class TrajectoryResult:
    """The check of one trajectory: ``passed``, the number of steps that matched, the worst error
    per quantity (in ULPs, as the tolerance counts them), and for a failure the first ``step``
    (1-based), ``param`` (index), ``quantity`` (``"params"``, ``"state.<field>"``,
    ``"projection"``, ``"wd_ratio_applied"``, ``"output"``) and a ``message``."""

    trajectory: GoldenTrajectory
    passed: bool = True
    steps_matched: int = 0
    worst: dict = field(default_factory=dict)
    compared: list = field(default_factory=list)
    not_compared: list = field(default_factory=list)
    step: int | None = None
    param: int | None = None
    quantity: str | None = None
    message: str = ""

    def __bool__(self):
        return self.passed

    def format(self) -> str:
        t = self.trajectory
        head = f"{t.describe()}: "
        if self.passed:
            worst = ", ".join(f"{k} {v:.3g}" for k, v in self.worst.items())
            text = (f"{head}PASS, {self.steps_matched}/{t.steps} steps; worst error in ULPs: "
                    f"{worst or '-'}")
        else:
            text = f"{head}FAIL\n    {self.message}"
        if self.not_compared:
            text += ("\n    not compared (the candidate did not report them): "
                     + ", ".join(self.not_compared))
        return text


@dataclass
class TrajectoryReport:
    """The results of :func:`check_trajectory`: true when every trajectory passed; printable."""

    results: list
    tolerance: str

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def __bool__(self):
        return self.passed

    @property
    def failures(self) -> list:
        return [r for r in self.results if not r.passed]

    def format(self) -> str:
        n, bad = len(self.results), len(self.failures)
        lines = [f"optimizer trajectories: {n} checked, {n - bad} pass, {bad} fail "
                 f"(tolerance: {self.tolerance})  [{'PASS' if not bad else 'FAIL'}]"]
        lines += ["  " + r.format() for r in self.results]
        return "\n".join(lines)

    __str__ = format


class _Divergence(Exception):
    def __init__(self, quantity, param, message):
        super().__init__(message)
        self.quantity, self.param, self.message = quantity, param, message


def _to_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):          # torch
        a = a.detach()
        if hasattr(a, "cpu"):
            a = a.cpu()
        if hasattr(a, "double") and getattr(a, "is_floating_point", lambda: False)():
            a = a.double()
        a = a.numpy()
    return np.asarray(a)


def _field(state, name):
    if state is None:
        return None
    if isinstance(state, Mapping):
        return state.get(name)
    return getattr(state, name, None)


class _Stepper:
    """Adapts a candidate to ``step(params, grads, lr) -> (params, state, decisions)``."""

    def __init__(self, optimizer, traj: GoldenTrajectory):
        self.traj = traj
        init, step = None, None
        if all(hasattr(optimizer, a) for a in ("init", "step", "defaults")):
            init, step = optimizer.init, optimizer.step          # an OptimizerSpec
        elif (isinstance(optimizer, tuple) and len(optimizer) == 2
              and all(callable(f) for f in optimizer)):
            init, step = optimizer
        elif not callable(optimizer):
            raise TypeError("optimizer must be an OptimizerSpec, an (init, step) pair or a "
                            "factory make(params, hyper) -> step(params, grads)")
        params = [np.array(p, copy=True) for p in traj.initial_params]
        if init is not None:
            self.protocol = "refnorm"
            self._step = step
            self._state = init(params, **traj.hyper)
        else:
            self.protocol = "factory"
            self._step = optimizer(params, dict(traj.hyper))
            if not callable(self._step):
                raise TypeError("the factory must return a callable step(params, grads)")

    def __call__(self, params, grads, lr):
        if self.protocol == "refnorm":
            hyper = {**self.traj.hyper, "lr": lr}
            out, self._state = self._step(params, grads, self._state, **hyper)
            state = self._state
            return out, state, state
        out = self._step(params, grads)
        info = {}
        if isinstance(out, tuple) and len(out) == 2 and (out[1] is None
                                                         or isinstance(out[1], Mapping)):
            out, info = out[0], out[1] or {}
        return out, info.get("state"), info


def _max_abs(a) -> float:
    a = np.abs(np.asarray(a, dtype=np.float64))
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else 0.0


def _compare(actual, expected, limit_ulps, rtol, scale=None):
    """``(ok, err_ulps, rel, index)``: the largest difference in ULPs of ``scale`` (default
    ``max|expected|``) and relative to it; exact comparison when the limit is 0."""
    if np.array_equal(actual, expected, equal_nan=True):
        return True, 0.0, 0.0, None
    fin = np.isfinite(expected)
    if not np.array_equal(fin, np.isfinite(actual)) or not np.array_equal(
            np.isnan(actual), np.isnan(expected)):
        idx = np.unravel_index(int(np.argmax(np.isfinite(actual) != fin)), expected.shape)
        return False, math.inf, math.inf, idx
    diff = np.where(fin, np.abs(actual - expected), 0.0)
    idx = np.unravel_index(int(np.argmax(diff)), expected.shape)
    scale = max(_max_abs(expected) if scale is None else scale, np.finfo(np.float64).tiny)
    worst = float(diff[idx])
    err_ulps = worst / (scale * _EPS64)
    rel = worst / scale
    ok = rel <= rtol if rtol is not None else err_ulps <= limit_ulps
    return ok, err_ulps, rel, idx


def _fmt_index(idx):
    return "[" + ", ".join(str(int(i)) for i in idx) + "]" if idx is not None else ""


def _run(optimizer, traj: GoldenTrajectory, ulps, rtol, require_state) -> TrajectoryResult:
    result = TrajectoryResult(traj)
    names = traj.param_names
    n = len(traj.initial_params)
    proj = traj.decisions.get("projection")

    def golden_views(t):
        if proj is None:
            return ""
        views = ", ".join(f"{names[i]} {proj[i][t - 1]}" for i in range(n))
        return f"; golden projection decisions at step {t}: {views}"

    def hint(t, i):
        if proj is None:
            return ""
        v = proj[i][t - 1]
        if v == "none":
            return f" (the golden did not project {names[i]} at this step)"
        return (f" (the golden projected {names[i]} in the {v} view at this step, wd_ratio "
                f"{traj.decisions['wd_ratio_applied'][i][t - 1]:g}: a wrong projection "
                f"decision, e.g. a skipped projection, another order of the views or another "
                f"cosine test, diverges here)")

    def fail(t, exc: _Divergence):
        result.passed = False
        result.step, result.param, result.quantity = t, exc.param, exc.quantity
        if t == 0:
            result.message = exc.message
            return result
        where = f"step {t}/{traj.steps}"
        if exc.param is not None:
            shape = tuple(traj.initial_params[exc.param].shape)
            where += f", parameter {exc.param} {names[exc.param]!r} {shape}"
        result.message = f"first divergence at {where}: {exc.message}{golden_views(t)}"
        return result

    # the tolerance's scale: the largest magnitude the array has had so far (rounding errors
    # made while it was larger stay in it)
    scales = {("params", i): _max_abs(p) for i, p in enumerate(traj.initial_params)}

    def check_array(t, i, quantity, got, want):
        got = _to_numpy(got)
        if got.shape != want.shape:
            raise _Divergence(quantity, i, f"{quantity} has shape {got.shape}, expected "
                              f"{want.shape}")
        got = got.astype(np.float64)
        scale = scales[quantity, i] = max(scales.get((quantity, i), 0.0), _max_abs(want))
        ok, err, rel, idx = _compare(got, want, ulps, rtol, scale)
        result.worst[quantity] = max(result.worst.get(quantity, 0.0), err)
        if not ok:
            raise _Divergence(quantity, i, (
                f"{quantity} differ by {err:.3g} ULP (relative {rel:.3g}; tolerance "
                f"{_tolerance_text(ulps, rtol)}) at {_fmt_index(idx)}: candidate "
                f"{float(got[idx])!r}, golden {float(want[idx])!r}"
                + (hint(t, i) if quantity == "params" else "")))

    try:
        stepper = _Stepper(optimizer, traj)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return fail(0, _Divergence("output", None, f"could not start the candidate: "
                                   f"{type(exc).__name__}: {exc}"))
    params = [np.array(p, copy=True) for p in traj.initial_params]
    reported_state, reported_decisions = set(), set()
    for t in range(1, traj.steps + 1):
        grads = [np.array(g[t - 1], copy=True) for g in traj.grads]
        try:
            try:
                out, state, info = stepper(params, grads, float(traj.lr[t - 1]))
            except Exception as exc:  # noqa: BLE001
                raise _Divergence("output", None, f"the candidate raised "
                                  f"{type(exc).__name__}: {exc}") from exc
            if not isinstance(out, (list, tuple)) or len(out) != n:
                raise _Divergence("output", None, f"the candidate returned "
                                  f"{type(out).__name__} (length "
                                  f"{len(out) if hasattr(out, '__len__') else '?'}); expected "
                                  f"a list of {n} parameter arrays")
            # decisions first: a wrong decision explains the numbers that follow from it
            for f in _DECISIONS:
                want = traj.decisions.get(f)
                got = _field(info, f)
                if want is None or got is None:
                    continue
                _check_length(f, got, n)
                reported_decisions.add(f)
                for i in range(n):
                    g, w = got[i], want[i][t - 1]
                    if f == "projection":
                        w = str(w)
                        g = "none" if g is None else str(g)
                        if g != w:
                            raise _Divergence(f, i, f"projection decision differs: candidate "
                                              f"{g!r}, golden {w!r}" + _view_hint(g, w))
                    elif not _compare(np.float64(g), np.float64(w), ulps, rtol)[0]:
                        raise _Divergence(f, i, f"wd_ratio_applied differs: candidate "
                                          f"{float(g)!r}, golden {float(w)!r}")
            for i in range(n):
                check_array(t, i, "params", out[i], traj.params[i][t - 1])
            for f, per_param in traj.state.items():
                got = _field(state, f)
                if got is None:
                    continue
                _check_length(f"state.{f}", got, n)
                reported_state.add(f)
                for i, want in enumerate(per_param):
                    if want is None:
                        continue
                    if got[i] is None:
                        raise _Divergence(f"state.{f}", i, f"state.{f} is None, the golden "
                                          f"has a buffer")
                    check_array(t, i, f"state.{f}", got[i], want[t - 1])
        except _Divergence as exc:
            return fail(t, exc)
        result.steps_matched = t
        params = [_to_numpy(p).astype(np.float64) for p in out]
    result.compared = (["params"] + [f"state.{f}" for f in traj.state if f in reported_state]
                       + [f for f in traj.decisions if f in reported_decisions])
    result.not_compared = ([f"state.{f}" for f in traj.state if f not in reported_state]
                           + [f for f in traj.decisions if f not in reported_decisions])
    if require_state and result.not_compared:
        result.passed = False
        result.message = f"the candidate did not report {', '.join(result.not_compared)}"
    return result


def _check_length(what, got, n):
    if not hasattr(got, "__len__") or len(got) != n:
        raise _Divergence("output", None, f"the candidate reported {what} as "
                          f"{type(got).__name__}; expected one entry per parameter ({n})")


def _view_hint(got, want):
    if want != "none" and got == "none":
        return " (the candidate did not project where the golden did)"
    if want == "none":
        return " (the candidate projected where the golden did not)"
    if want == "channel":
        return (" (both projected, in different views: the golden tries the channel view first "
                "and uses the first view that passes)")
    return (" (both projected, in different views: the golden's channel-view test failed at "
            "this step and its layer-view test passed; check the cosine test: the raw gradient "
            "and the weight before decay, |cos| < delta/sqrt(row length) for every row)")


def _tolerance_text(ulps, rtol):
    if rtol is not None:
        return f"rtol {rtol:g} of the largest golden magnitude so far"
    return "exact" if ulps == 0 else f"{ulps:g} ULP of the largest golden magnitude so far"


def check_trajectory(optimizer, golden, name=None, *, ulps: float = DEFAULT_ULPS,
                     rtol: float | None = None, require_state: bool = False) -> TrajectoryReport:
    r"""Check an optimizer step by step against golden trajectories.

    The candidate starts from the recorded initial parameters and, at every step, receives its
    own current parameters and the recorded gradients; after each step its parameters (and the
    state and projection decisions it reports) are compared with the golden ones. The first
    divergence of each trajectory is reported: the step, the parameter, what differs, by how
    much, where, and the golden projection decisions of that step.

    Parameters
    ----------
    optimizer
        One of

        * refnorm's protocol: an :class:`~refnorm.registry.OptimizerSpec` or a pair
          ``(init, step)`` with ``init(params, **hyper) -> state`` and
          ``step(params, grads, state, **hyper) -> (new_params, new_state)``; the state's fields
          (attributes, or keys of a dict) named like the golden's (``exp_avg``...) and
          ``projection`` are compared;
        * a factory ``make(initial_params, hyper) -> step``, called once per trajectory with a
          copy of the initial parameters (list of float64 arrays) and every hyper-parameter
          (a dict: ``lr``, ``betas``, ``weight_decay``..., the names of ``torch.optim`` and of
          the official AdamP). ``step(params, grads)`` returns the new parameters (a list of
          arrays or tensors), or ``(new_params, info)`` with ``info`` a dict that may hold
          ``"state"`` (``{field: [array per parameter]}``), ``"projection"`` (per parameter
          ``"channel"``, ``"layer"``, ``"none"`` or None) and ``"wd_ratio_applied"``. A closure
          that keeps its own state (and ignores ``params``) is fine; :func:`torch_optimizer`
          makes one from a ``torch.optim`` class.
    golden
        A golden directory, a trajectory file in one (``DIR/optim-adamp-000.npz``; checked
        against ``DIR/manifest.json``), or loaded :class:`GoldenTrajectory` objects.
    name
        The optimizer (``"adamp"``: every setting of it) or one trajectory (``"adamp-001"``);
        default: the spec's name, or the only optimizer in ``golden``.
    ulps
        The tolerance: an array (the parameter, or one state buffer, of one parameter tensor
        after one step) passes when ``max|candidate - golden| <= ulps * 2**-52 * scale``, with
        ``scale`` the largest magnitude of that golden array up to this step (initial
        parameters included): float64 ULPs of its largest entry so far, since rounding errors
        made while the array was larger stay in it. ``0`` demands bit-identical results. The
        default, 16, accepts a different but correct order of float64 operations
        (``torch.optim``, plain, foreach or fused, stays within 4: it uses ``lerp``,
        ``addcdiv``, FMAs).
    rtol
        Instead of ``ulps``: pass when ``max|candidate - golden| <= rtol * scale`` (for a
        float32 kernel against the float64 goldens, ``1e-5``: float32 ``torch.optim`` stays
        within ``6e-7``).
    require_state
        Fail when the candidate does not report every golden state field and decision.

    Returns
    -------
    TrajectoryReport
        True when every selected trajectory passed; ``str(report)`` says where each failed.
    """
    if name is None and hasattr(optimizer, "defaults"):   # an OptimizerSpec names itself
        name = getattr(optimizer, "name", None)
    trajectories = _resolve(golden, name)
    results = [_run(optimizer, t, ulps, rtol, require_state) for t in trajectories]
    return TrajectoryReport(results, _tolerance_text(ulps, rtol))


def _resolve(golden, name) -> list:
    if isinstance(golden, GoldenTrajectory):
        trajectories = [golden]
    elif isinstance(golden, (list, tuple)) and all(isinstance(g, GoldenTrajectory)
                                                   for g in golden):
        trajectories = list(golden)
    else:
        path = Path(golden)
        if path.is_dir():
            trajectories = load_trajectories(path)
        elif path.suffix == ".npz":
            trajectories = load_trajectories(path.parent, [path.name])
            if not trajectories:
                raise _g.GoldenError(f"{path}: not a trajectory listed in "
                                     f"{path.parent / _g.MANIFEST}")
        else:
            raise _g.GoldenError(f"{path}: neither a golden directory nor a trajectory file")
    if name is not None:
        trajectories = [t for t in trajectories if name in (t.name, t.id, t.file)]
        if not trajectories:
            raise _g.GoldenError(f"{golden}: no golden trajectory named {name!r}")
    else:
        optimizers = sorted({t.name for t in trajectories})
        if len(optimizers) > 1:
            raise ValueError(f"{golden} holds trajectories of {', '.join(optimizers)}: pass "
                             f"name= to say which optimizer the candidate is")
    if not trajectories:
        raise _g.GoldenError(f"{golden}: no golden trajectory")
    return trajectories


def torch_optimizer(cls, *, device="cpu", dtype=None, rename=None, **kwargs):
    """A :func:`check_trajectory` factory that runs the ``torch.optim`` class ``cls``.

    The golden hyper-parameters are passed by name (``cls(params, **hyper, **kwargs)``), so any
    optimizer with the names of ``torch.optim`` (or of the official AdamP/SGDP) fits; ``kwargs``
    adds constructor options (``fused=True``, ``foreach=False``...). ``dtype`` (default
    ``torch.float64``) and ``device`` place the parameters. The tensors of ``optimizer.state``
    (but ``step``) are reported as the state, renamed by ``rename`` (e.g.
    ``{"momentum": "momentum_buffer"}``).
    """
    rename = dict(rename or {})

    def make(params, hyper):
        import torch

        dt = dtype if dtype is not None else torch.float64
        tensors = [torch.tensor(np.asarray(p), dtype=dt, device=device) for p in params]
        opt = cls(tensors, **{**hyper, **kwargs})

        def step(params, grads):
            for t, g in zip(tensors, grads):
                t.grad = torch.tensor(np.asarray(g), dtype=dt, device=device)
            opt.step()
            state: dict[str, list] = {}
            for i, t in enumerate(tensors):
                for k, v in opt.state.get(t, {}).items():
                    if k == "step" or not torch.is_tensor(v):
                        continue
                    state.setdefault(rename.get(k, k), [None] * len(tensors))[i] = v
            return [t.detach() for t in tensors], {"state": state}

        return step

    return make


# ----------------------------------------------------------------------------------------------
# Verification (refnorm goldens verify)
# ----------------------------------------------------------------------------------------------
def verify_trajectories(directory, result, *, recompute=True, progress=None,
                        trajectories=None):
    """Load (and so verify) every trajectory of ``directory`` (unless already loaded:
    ``trajectories``); with ``recompute``, re-run refnorm's optimizer from the recorded initial
    parameters and gradients and require every step's parameters, state and decisions to be
    bit-identical. Updates and returns ``result``
    (:class:`~refnorm.oracle.goldens.VerifyResult`)."""
    from refnorm.optim import BY_NAME

    if trajectories is None:
        trajectories = load_trajectories(directory)
    for traj in trajectories:
        result.trajectories += 1
        if recompute:
            r = _run(BY_NAME[traj.name], traj, 0.0, None, True)
            if r.passed:
                result.trajectories_identical += 1
            else:
                result.problems.append(f"{traj.file} ({traj.describe()}): refnorm's "
                                       f"{traj.name} does not reproduce it: {r.message}")
        if progress is not None:
            progress(traj.file)
    return result
