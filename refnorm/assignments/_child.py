"""The grader's worker: runs a student's file in its own process (never in the grader's).

Started by :mod:`refnorm.assignments.sandbox` as ``python -m refnorm.assignments._child
REQUEST RESULT_FD``. It imports the student's file by path, then runs the tasks of the request
one after the other and writes one JSON line per task to the file descriptor ``RESULT_FD`` (a
pipe the grader reads; the student's own prints go to a capped buffer and never reach it). The
grader times every task and kills this process when one runs too long; an exception or a
``sys.exit`` in the student's code is caught here and costs that task only.

A task names a *driver* (below): the function that calls the student's functions the way the
assignment documents them, and returns the outputs as arrays. The encoding of arrays is
``np.save`` without pickles (:func:`encode`, :func:`decode`), so the grader never unpickles
anything the student's process wrote. This module imports only NumPy and the standard library.
"""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import sys
import traceback

import numpy as np

#: characters of printed output a task may write before its call is stopped
MAX_PRINT = 20_000


# ----------------------------------------------------------------------------------------------
# Encoding (shared with the grader's process: plain JSON, arrays as np.save bytes, no pickles)
# ----------------------------------------------------------------------------------------------
def encode(value):
    if isinstance(value, np.ndarray) or isinstance(value, np.generic):
        buf = io.BytesIO()
        np.save(buf, np.asarray(value), allow_pickle=False)
        return {"__nd__": base64.b64encode(buf.getvalue()).decode("ascii")}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {"__dict__": [[k, encode(v)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot encode {type(value).__name__}")


def decode(value):
    if isinstance(value, dict):
        if "__nd__" in value:
            return np.load(io.BytesIO(base64.b64decode(value["__nd__"])), allow_pickle=False)
        if "__tuple__" in value:
            return tuple(decode(v) for v in value["__tuple__"])
        if "__dict__" in value:
            return {k: decode(v) for k, v in value["__dict__"]}
        raise ValueError("unknown encoded object")
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# Stopping a task that prints too much
# ----------------------------------------------------------------------------------------------
class PrintLimit(Exception):
    """Raised inside ``print`` once a task has printed more than :data:`MAX_PRINT` characters."""


class _CappedStream(io.TextIOBase):
    def __init__(self):
        self.count = 0
        self.head = []

    def reset(self):
        self.count = 0
        self.head = []

    def writable(self):
        return True

    def write(self, s):
        s = str(s)
        self.count += len(s)
        if sum(len(h) for h in self.head) < 2000:
            self.head.append(s)
        if self.count > MAX_PRINT:
            raise PrintLimit(f"the code printed more than {MAX_PRINT} characters (remove the "
                             f"debugging prints): the call was stopped")
        return len(s)

    def excerpt(self):
        text = "".join(self.head)
        return text[:500]


# ----------------------------------------------------------------------------------------------
# Calling the student
# ----------------------------------------------------------------------------------------------
def _describe(exc):
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r}) (the call was stopped; do not exit in a function)"
    if isinstance(exc, PrintLimit):
        return str(exc)
    tb = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in tb if f.filename == _STUDENT_PATH]
    where = f" (line {mine[-1].lineno}: {mine[-1].line})" if mine else ""
    msg = str(exc)
    if len(msg) > 300:
        msg = msg[:300] + "..."
    return f"{type(exc).__name__}: {msg}{where}"


class _Call:
    """Calls the student's functions; records errors by stage and mutated inputs."""

    def __init__(self, module):
        self.module = module
        self.errors = {}
        self.mutated = []
        self.meta = {}

    def __call__(self, stage, fname, *args, **kwargs):
        fn = getattr(self.module, fname, None)
        if fn is None or not callable(fn):
            self.errors[stage] = f"the file defines no function {fname}()"
            return None
        copies = [(i, a.copy()) for i, a in enumerate(args) if isinstance(a, np.ndarray)]
        kcopies = [(k, v.copy()) for k, v in kwargs.items() if isinstance(v, np.ndarray)]
        try:
            out = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - the student's failure is the result
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.errors[stage] = f"{fname}() raised {_describe(exc)}"
            return None
        finally:
            for i, c in copies:
                if not _same(args[i], c):
                    self.mutated.append(f"{fname}(): positional argument {i}")
            for k, c in kcopies:
                if not _same(kwargs[k], c):
                    self.mutated.append(f"{fname}(): argument {k}")
        return out

    def output(self, outs, name, value):
        """Store a student output (any array-like) as an array, with its dtype and shape."""
        if value is None:
            return
        try:
            a = np.asarray(value)
            if a.dtype == object:
                raise TypeError("not an array of numbers")
        except Exception as exc:  # noqa: BLE001
            self.errors.setdefault(name, f"{name} is not an array ({type(value).__name__}: "
                                   f"{exc})")
            return
        self.meta[name] = {"dtype": str(a.dtype), "shape": list(a.shape)}
        outs[name] = a


def _same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and \
        np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")


def _unpack(value, n, what):
    if not isinstance(value, (tuple, list)) or len(value) != n:
        raise TypeError(f"{what} must return a tuple of {n} values, got "
                        f"{type(value).__name__}" + (f" of length {len(value)}"
                                                     if isinstance(value, (tuple, list)) else ""))
    return value


# ----------------------------------------------------------------------------------------------
# Drivers: one per kind of task
# ----------------------------------------------------------------------------------------------
def _norm(call, outs, args, fwd, bwd, fwd_args, state_names=()):
    inputs, dy = args["inputs"], args["dy"]
    r = call("forward", fwd, *fwd_args[0], **fwd_args[1])
    if "forward" in call.errors:
        return
    try:
        if state_names:
            y, state, cache = _unpack(r, 3, f"{fwd}()")
            state = _unpack(state, len(state_names), f"{fwd}()'s new state")
            for name, v in zip(state_names, state):
                call.output(outs, name, v)
        else:
            y, cache = _unpack(r, 2, f"{fwd}()")
    except TypeError as exc:
        call.errors["forward"] = str(exc)
        return
    call.output(outs, "y", y)
    g = call("backward", bwd, dy, cache)
    if "backward" in call.errors:
        return
    try:
        dx, dweight, dbias = _unpack(g, 3, f"{bwd}()")
    except TypeError as exc:
        call.errors["backward"] = str(exc)
        return
    call.output(outs, "dx", dx)
    if "weight" in inputs:
        call.output(outs, "dweight", dweight)
    if "bias" in inputs:
        call.output(outs, "dbias", dbias)


def drive_batch_norm(call, outs, args):
    i, k = args["inputs"], args["kwargs"]
    fa = ((i["x"], k["running_mean"], k["running_var"], i.get("weight"), i.get("bias")),
          dict(training=k["training"], momentum=k["momentum"], eps=k["eps"],
               num_batches_tracked=k["num_batches_tracked"]))
    _norm(call, outs, args, "batch_norm_forward", "batch_norm_backward", fa,
          ("running_mean", "running_var", "num_batches_tracked"))
    if k["running_mean"] is None:
        for name in ("running_mean", "running_var"):
            if outs.get(name) is not None and outs[name].shape == ():
                outs.pop(name)   # a None state may come back as a 0-d object array
        outs.pop("num_batches_tracked", None)


def drive_layer_norm(call, outs, args):
    i, k = args["inputs"], args["kwargs"]
    fa = ((i["x"], k["normalized_shape"], i.get("weight"), i.get("bias")), dict(eps=k["eps"]))
    _norm(call, outs, args, "layer_norm_forward", "layer_norm_backward", fa)


def drive_group_norm(call, outs, args):
    i, k = args["inputs"], args["kwargs"]
    fa = ((i["x"], k["num_groups"], i.get("weight"), i.get("bias")), dict(eps=k["eps"]))
    _norm(call, outs, args, "group_norm_forward", "group_norm_backward", fa)


def drive_rms_norm(call, outs, args):
    i, k = args["inputs"], args["kwargs"]
    fa = ((i["x"], k["normalized_shape"], i.get("weight")),
          dict(eps=k["eps"], eps_placement=k.get("eps_placement", "inside")))
    r = call("forward", "rms_norm_forward", *fa[0], **fa[1])
    if "forward" in call.errors:
        return
    try:
        y, cache = _unpack(r, 2, "rms_norm_forward()")
    except TypeError as exc:
        call.errors["forward"] = str(exc)
        return
    call.output(outs, "y", y)
    g = call("backward", "rms_norm_backward", args["dy"], cache)
    if "backward" in call.errors:
        return
    try:
        dx, dweight = _unpack(g, 2, "rms_norm_backward()")
    except TypeError as exc:
        call.errors["backward"] = str(exc)
        return
    call.output(outs, "dx", dx)
    if "weight" in i:
        call.output(outs, "dweight", dweight)


def drive_call(call, outs, args):
    """A plain call: ``fname(*args, **kwargs)``; the result (or each element of a returned
    tuple, named by ``names``) is stored."""
    stage = args.get("stage", "call")
    r = call(stage, args["fname"], *args["args"], **args.get("kwargs", {}))
    if stage in call.errors:
        return
    names = args["names"]
    if len(names) == 1:
        call.output(outs, names[0], r)
        return
    try:
        r = _unpack(r, len(names), f"{args['fname']}()")
    except TypeError as exc:
        call.errors[stage] = str(exc)
        return
    for n, v in zip(names, r):
        call.output(outs, n, v)


def drive_jacobian(call, outs, args):
    """The gradient checker: the student's ``numerical_jacobian(f, x, h)`` on a function of
    :data:`refnorm.assignments.functions.FUNCTIONS` (known Jacobians); with ``claimed``, the
    student's ``gradcheck(f, x, jacobian, h)`` verdict on a claimed Jacobian."""
    from refnorm.assignments import functions

    f = functions.FUNCTIONS[args["function"]].f
    x = args["x"]
    if "claimed" in args:
        r = call("gradcheck", "gradcheck", f, x, args["claimed"], h=args["h"])
        if "gradcheck" in call.errors:
            return
        if not isinstance(r, (bool, np.bool_)):
            call.errors["gradcheck"] = (f"gradcheck() must return True or False, got "
                                        f"{type(r).__name__}")
            return
        outs["verdict"] = np.asarray(bool(r))
        call.meta["verdict"] = {"dtype": "bool", "shape": []}
        return
    r = call("jacobian", "numerical_jacobian", f, x, h=args["h"])
    call.output(outs, "jacobian", r)


def drive_ws(call, outs, args):
    """Weight Standardization: forward, then backward with the given upstream gradient."""
    r = call("forward", "weight_standardization_forward", args["weight"], eps=args["eps"])
    if "forward" in call.errors:
        return
    try:
        w_hat, cache = _unpack(r, 2, "weight_standardization_forward()")
    except TypeError as exc:
        call.errors["forward"] = str(exc)
        return
    call.output(outs, "y", w_hat)
    g = call("backward", "weight_standardization_backward", args["dy"], cache)
    if "backward" in call.errors:
        return
    call.output(outs, "dweight", g)


DRIVERS = {"batch_norm": drive_batch_norm, "layer_norm": drive_layer_norm,
           "group_norm": drive_group_norm, "rms_norm": drive_rms_norm, "call": drive_call,
           "jacobian": drive_jacobian, "ws": drive_ws}

_STUDENT_PATH = ""


def _send(fd, obj):
    data = (json.dumps(obj) + "\n").encode()
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def main(argv=None):
    global _STUDENT_PATH
    argv = sys.argv[1:] if argv is None else argv
    request_path, fd = argv[0], int(argv[1])
    with open(request_path) as f:
        request = json.load(f)
    _STUDENT_PATH = os.path.abspath(request["file"])
    capped = _CappedStream()
    sys.stdout = sys.stderr = capped
    sys.stdin = io.StringIO("")
    try:
        spec = importlib.util.spec_from_file_location("student_submission", _STUDENT_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["student_submission"] = module
        spec.loader.exec_module(module)
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, SyntaxError):
            msg = f"SyntaxError: {exc.msg} (line {exc.lineno})"
        else:
            msg = _describe(exc)
        _send(fd, {"import_error": f"importing the file failed: {msg}"})
        os._exit(0)
    _send(fd, {"ready": True})
    for task in request["tasks"]:
        capped.reset()
        call = _Call(module)
        outs = {}
        try:
            DRIVERS[task["driver"]](call, outs, decode(task["args"]))
        except BaseException as exc:  # noqa: BLE001 - a student's object misbehaving in ours
            call.errors.setdefault("driver", _describe(exc))
        result = {"id": task["id"], "errors": call.errors, "mutated": call.mutated,
                  "meta": call.meta, "printed": capped.count, "print_head": capped.excerpt()}
        try:
            result["outputs"] = {k: encode(np.asarray(v)) for k, v in outs.items()
                                 if np.asarray(v).dtype.kind in "biufc"}
        except Exception as exc:  # noqa: BLE001
            result["outputs"] = {}
            result["errors"]["outputs"] = f"the outputs could not be sent back: {exc}"
        _send(fd, result)
    os._exit(0)


if __name__ == "__main__":
    main()
