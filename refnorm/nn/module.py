"""``Module`` and ``Parameter``: parameters you can read, explicit state, the engine's gradient.

A :class:`Parameter` is a leaf :class:`~refnorm.autograd.Tensor` that requires a gradient; its
``data`` is a plain NumPy array, so ``model.blocks[0].norm1.weight.data`` is just an array. A
:class:`Module` keeps three kinds of attributes, found by ``__setattr__`` as in ``torch.nn``:

* parameters (:class:`Parameter`): learned, returned by :meth:`Module.parameters`;
* state (:meth:`Module.register_state`): arrays a layer carries between calls but does not learn,
  such as BatchNorm's running statistics. State is **replaced**, never written in place: a
  training forward of a stateful norm stores the new arrays its record returns;
* sub-modules.

The forward pass runs on the engine, so ``loss.backward()`` fills every parameter's ``grad``
with the engine's gradient (norm layers go through their variant's hand-derived backward). The
optimizers of :mod:`refnorm.optim` are pure functions on lists of arrays;
:class:`Optimizer` is the thin loop that reads ``p.grad`` and replaces ``p.data``.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict

import numpy as np

from refnorm.autograd import Tensor


class Parameter(Tensor):
    """A learned array: a leaf Tensor with ``requires_grad=True``.

    ``data`` is a NumPy array (a float copy of what was given); ``np.asarray(p)`` returns it.
    """

    def __init__(self, data, dtype=None):
        data = data.data if isinstance(data, Tensor) else data
        super().__init__(np.array(data, dtype=dtype, copy=True)
                         if dtype is not None or not isinstance(data, np.ndarray)
                         or data.dtype.kind != "f" else data.copy(), requires_grad=True)

    def __array__(self, dtype=None, copy=None):
        return self.data if dtype is None else self.data.astype(dtype)

    def __repr__(self):
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


class Module:
    """The base class of every layer: holds parameters, state and sub-modules.

    Subclasses set attributes in ``__init__`` and define ``forward``; calling the module calls
    ``forward``. ``training`` (True after construction) selects the behaviour of layers that
    differ between training and evaluation (:meth:`train`, :meth:`eval`).
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_state", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # ----- attribute registration -----
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}: call Module.__init__() before "
                                 f"assigning attributes (assigning {name!r})")
        for table in (self._parameters, self._state, self._modules):
            table.pop(name, None)
        if isinstance(value, (Parameter, Module)):
            self.__dict__.pop(name, None)  # a plain attribute of that name would shadow it
            (self._parameters if isinstance(value, Parameter) else self._modules)[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):  # only called when normal lookup fails
        for table in ("_parameters", "_state", "_modules"):
            entries = self.__dict__.get(table)
            if entries is not None and name in entries:
                return entries[name]
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    def __delattr__(self, name):
        for table in (self._parameters, self._state, self._modules):
            if name in table:
                del table[name]
                return
        object.__delattr__(self, name)

    def register_state(self, name, value):
        """Declare ``name`` as state: an ndarray (or None) saved by :meth:`state_dict`."""
        if value is not None and not isinstance(value, np.ndarray):
            raise TypeError(f"register_state: `{name}` must be an ndarray or None, got "
                            f"{type(value).__name__}")
        self.__dict__.pop(name, None)
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        self._state[name] = value

    def set_state(self, name, value):
        """Replace the state array ``name`` (the old array is not modified)."""
        if name not in self._state:
            raise KeyError(f"set_state: {type(self).__name__} has no state {name!r}")
        self._state[name] = value

    # ----- calling -----
    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ----- traversal -----
    def named_modules(self, prefix=""):
        """``(name, module)`` for this module and every sub-module, depth first."""
        yield prefix, self
        for name, module in self._modules.items():
            yield from module.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        return (m for _, m in self.named_modules())

    def children(self):
        return iter(self._modules.values())

    def named_parameters(self, prefix=""):
        """``(dotted name, Parameter)`` for every parameter, each once."""
        seen = set()
        for path, module in self.named_modules(prefix):
            for name, p in module._parameters.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{path}.{name}" if path else name), p

    def parameters(self):
        """Every parameter, in a fixed order (the order of :meth:`named_parameters`)."""
        return [p for _, p in self.named_parameters()]

    def named_states(self, prefix=""):
        """``(dotted name, array or None)`` for every state entry."""
        for path, module in self.named_modules(prefix):
            for name, value in module._state.items():
                yield (f"{path}.{name}" if path else name), value

    def zero_grad(self):
        """Forget the accumulated gradients (``p.grad = None``)."""
        for p in self.parameters():
            p.grad = None

    # ----- modes -----
    def train(self, mode=True):
        """Set training mode (``mode=True``) or evaluation mode on this module and below."""
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"train: `mode` must be a bool, got {type(mode).__name__}")
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        """Evaluation mode: stateful norms use their running statistics."""
        return self.train(False)

    def astype(self, dtype):
        """Convert every floating parameter and state array to ``dtype`` (new arrays)."""
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise TypeError(f"astype: `dtype` must be a floating dtype, got {dtype}")
        for m in self.modules():
            for p in m._parameters.values():
                p.data, p.grad = p.data.astype(dtype), None
            for name, value in m._state.items():
                if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                    m._state[name] = value.astype(dtype)
        return self

    # ----- saving and loading -----
    def state_dict(self):
        """``{dotted name: array}``: copies of every parameter and every state array (state
        that is None is left out)."""
        out = OrderedDict((name, p.data.copy()) for name, p in self.named_parameters())
        out.update((name, v.copy()) for name, v in self.named_states() if v is not None)
        return out

    def load_state_dict(self, state_dict, strict=True):
        """Replace parameters and state by the arrays of ``state_dict`` (copied).

        Every key must name a parameter or a state entry, with the same shape; with ``strict``
        every parameter and state entry must be given. Nothing is replaced unless every entry
        passes (a ValueError lists the missing, unexpected and mismatched keys).
        """
        if not hasattr(state_dict, "items"):
            raise TypeError(f"load_state_dict: `state_dict` must be a mapping, got "
                            f"{type(state_dict).__name__}")
        targets = {}
        for path, module in self.named_modules():
            for table in (module._parameters, module._state):
                for name, value in table.items():
                    targets[f"{path}.{name}" if path else name] = (module, table, name, value)
        expected = {k for k, (_, _, _, v) in targets.items() if v is not None}
        unexpected = sorted(set(state_dict) - set(targets))
        missing = sorted(expected - set(state_dict)) if strict else []
        problems = []
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        new = {}
        for key, value in state_dict.items():
            if key not in targets:
                continue
            _, _, _, current = targets[key]
            array = np.asarray(value.data if isinstance(value, Tensor) else value)
            old = current.data if isinstance(current, Parameter) else current
            if old is not None and array.shape != old.shape:
                problems.append(f"{key!r}: expected shape {old.shape}, got {array.shape}")
            elif isinstance(current, Parameter) and array.dtype.kind not in "fiub":
                problems.append(f"{key!r}: expected a numeric array, got dtype {array.dtype}")
            new[key] = array
        if problems:
            raise ValueError(f"load_state_dict ({type(self).__name__}): " + "; ".join(problems))
        for key, array in new.items():
            module, table, name, current = targets[key]
            if isinstance(current, Parameter):
                current.data = array.astype(current.data.dtype, copy=True)
                current.grad = None
            else:
                table[name] = array.astype(current.dtype if current is not None
                                           else array.dtype, copy=True)
        return self

    # ----- printing -----
    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, m in self._modules.items():
            body = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"


class ModuleList(Module):
    """A list of sub-modules, registered under the names ``"0"``, ``"1"``, ..."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module):
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList: expected a Module, got {type(module).__name__}")
        self._modules[str(len(self._modules))] = module
        return self

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __setitem__(self, i, module):
        key = list(self._modules)[i]
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList: expected a Module, got {type(module).__name__}")
        self._modules[key] = module

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


class Sequential(ModuleList):
    """Sub-modules applied one after the other."""

    def forward(self, x):
        for m in self:
            x = m(x)
        return x


@contextlib.contextmanager
def substituted(module, arrays):
    """Run ``module`` with the parameters named in ``arrays`` replaced by other values.

    ``arrays`` maps dotted parameter names (as :meth:`Module.named_parameters`) to Tensors or
    arrays; within the block the module computes with them (a Tensor that depends on other
    Tensors carries the gradient back to those), and the original Parameters come back after.
    This is ``torch.func.functional_call``; :func:`functional_call` is the one-call form.
    """
    owners = {}
    for path, m in module.named_modules():
        for name in m._parameters:
            owners[f"{path}.{name}" if path else name] = (m, name)
    unknown = sorted(set(arrays) - set(owners))
    if unknown:
        raise ValueError(f"functional_call: no parameters named {unknown}")
    saved = {key: owners[key][0]._parameters[owners[key][1]] for key in arrays}
    try:
        for key, value in arrays.items():
            m, name = owners[key]
            m._parameters[name] = value if isinstance(value, Tensor) else Tensor(value)
        yield module
    finally:
        for key, p in saved.items():
            m, name = owners[key]
            m._parameters[name] = p


def functional_call(module, arrays, *args, **kwargs):
    """``module(*args, **kwargs)`` with the parameters in ``arrays`` replaced (see
    :func:`substituted`)."""
    with substituted(module, arrays):
        return module(*args, **kwargs)


class Optimizer:
    """A loop around one of :mod:`refnorm.optim`'s pure functions.

    ``Optimizer(params, "adamw", lr=1e-3)``; :meth:`step` reads each parameter's ``grad`` and
    replaces its ``data`` with the new array the optimizer returns (parameters without a
    gradient are passed a zero gradient). The optimizer state is ``self.state``, a NamedTuple.
    """

    def __init__(self, params, name="adamw", **hyper):
        from refnorm.optim import BY_NAME
        if name not in BY_NAME:
            raise ValueError(f"Optimizer: unknown optimizer {name!r}; known: {sorted(BY_NAME)}")
        self.params = list(params)
        if not self.params:
            raise ValueError("Optimizer: `params` is empty")
        self.spec, self.hyper = BY_NAME[name], dict(hyper)
        self.state = self.spec.init([p.data for p in self.params], **self.hyper)

    def step(self):
        grads = [np.zeros_like(p.data) if p.grad is None else p.grad for p in self.params]
        new, self.state = self.spec.step([p.data for p in self.params], grads, self.state,
                                         **self.hyper)
        for p, value in zip(self.params, new):
            p.data = value

    def zero_grad(self):
        for p in self.params:
            p.grad = None
