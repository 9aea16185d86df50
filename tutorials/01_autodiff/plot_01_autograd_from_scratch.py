r"""
Autograd from scratch
=====================

Reverse-mode automatic differentiation is the chain rule, applied backwards through a record of
the computation. This tutorial builds an engine in three steps:

1. a **scalar** engine, each number a node that remembers how it was made;
2. an **array** engine, where broadcasting makes one new rule necessary (unbroadcasting);
3. the **walk**: why the order of the backward pass is a topological sort, and why refnorm
   writes that sort without recursion;

and ends at :mod:`refnorm.autograd`, which is the same design with a derivative table. Every
gradient below is checked against finite differences or a closed form.
"""
import time

import matplotlib.pyplot as plt
import numpy as np

# %%
# A scalar engine
# ---------------
#
# A ``Scalar`` holds its value, the gradient accumulated so far, the nodes it was computed from,
# and the *local derivatives* :math:`\partial\,\text{self}/\partial\,\text{parent}`. For
# :math:`z = x y` they are :math:`y` and :math:`x`; for :math:`z = \tanh x` it is
# :math:`1 - z^2`. The backward pass visits every node after all the nodes that use it, and
# hands each parent its share, :math:`\bar{p} \mathrel{+}= \bar{z}\,\partial z/\partial p`
# (:math:`\bar{v}` is :math:`\partial L/\partial v`, the *adjoint* of :math:`v`).


class Scalar:
    def __init__(self, value, parents=(), local_grads=()):
        self.value, self.grad = float(value), 0.0
        self.parents, self.local_grads = parents, local_grads

    def __add__(self, other):
        other = other if isinstance(other, Scalar) else Scalar(other)
        return Scalar(self.value + other.value, (self, other), (1.0, 1.0))

    def __mul__(self, other):
        other = other if isinstance(other, Scalar) else Scalar(other)
        return Scalar(self.value * other.value, (self, other), (other.value, self.value))

    __radd__, __rmul__ = __add__, __mul__

    def tanh(self):
        t = np.tanh(self.value)
        return Scalar(t, (self,), (1.0 - t * t,))

    def backward(self):
        order, seen = [], set()

        def visit(node):  # depth first: a node is appended after all its parents
            if id(node) not in seen:
                seen.add(id(node))
                for p in node.parents:
                    visit(p)
                order.append(node)

        visit(self)
        self.grad = 1.0
        for node in reversed(order):  # every user of a node comes before it
            for p, local in zip(node.parents, node.local_grads):
                p.grad += node.grad * local


# %%
# Take :math:`f(x, y) = \tanh(xy + x)\cdot x`. By hand,
# :math:`\partial f/\partial x = (1-t^2)(y+1)\,x + t` and
# :math:`\partial f/\partial y = (1-t^2)\,x^2` with :math:`t = \tanh(xy + x)`. The variable
# :math:`x` is used three times: its gradient is the **sum** of the three contributions, which
# is why the engine adds (``+=``) rather than assigns.

x, y = Scalar(0.7), Scalar(-1.3)
f = (x * y + x).tanh() * x
f.backward()
t = np.tanh(0.7 * -1.3 + 0.7)
print(f"engine : df/dx = {x.grad:.15f}, df/dy = {y.grad:.15f}")
print(f"by hand: df/dx = {(1 - t * t) * (-1.3 + 1) * 0.7 + t:.15f}, "
      f"df/dy = {(1 - t * t) * 0.7 ** 2:.15f}")

# %%
# The same engine, swept over :math:`x`, against a central difference
# :math:`(f(x+h) - f(x-h))/2h`:


def f_of(xv, yv=-1.3):
    xs, ys = Scalar(xv), Scalar(yv)
    out = (xs * ys + xs).tanh() * xs
    out.backward()
    return out.value, xs.grad


grid = np.linspace(-3, 3, 121)
values, grads = np.array([f_of(v) for v in grid]).T
h = 1e-5
central = np.array([(f_of(v + h)[0] - f_of(v - h)[0]) / (2 * h) for v in grid])
print(f"largest |engine - central difference| over the sweep: "
      f"{np.max(np.abs(grads - central)):.1e}")

fig, ax = plt.subplots(figsize=(6.4, 3.6))
ax.plot(grid, values, label=r"$f(x) = \tanh(xy + x)\,x$, $y=-1.3$")
ax.plot(grid, grads, label=r"$\partial f/\partial x$, scalar engine")
ax.plot(grid[::6], central[::6], "o", mfc="none", label="central difference")
ax.set_xlabel("x")
ax.legend()
ax.set_title("The scalar engine's gradient agrees with finite differences")
fig.tight_layout()

# %%
# Arrays, and the one rule broadcasting adds
# ------------------------------------------
#
# One node per number is slow (every multiplication is a Python object). An array engine keeps
# the same design with arrays as values: the local derivative becomes a **vector-Jacobian
# product** (VJP), a function from the output's adjoint to each input's, e.g.
# :math:`\bar a = \bar z\, b^T` and :math:`\bar b = a^T \bar z` for :math:`z = a b`.
#
# Broadcasting adds one rule. If ``b`` of shape ``(4,)`` is added to ``a`` of shape ``(3, 4)``,
# each element of ``b`` is used three times, so its adjoint is the sum of the three:
# :math:`\bar b_j = \sum_i \bar z_{ij}`. The adjoint of broadcasting is summation over the
# broadcast axes. Write it once (``unbroadcast``), apply it on every edge, and no VJP has to
# think about shapes.


def unbroadcast(g, shape):
    """Sum g down to shape: the adjoint of broadcasting an array of `shape` to g.shape."""
    while g.ndim > len(shape):          # leading axes that broadcasting added
        g = g.sum(axis=0)
    for axis, n in enumerate(shape):    # axes of length 1 that were stretched
        if n == 1 and g.shape[axis] != 1:
            g = g.sum(axis=axis, keepdims=True)
    return g


class Array:
    def __init__(self, value, parents=(), vjps=()):
        self.value = np.asarray(value, dtype=np.float64)
        self.grad, self.parents, self.vjps = None, parents, vjps

    def __add__(self, other):
        return Array(self.value + other.value, (self, other), (lambda g: g, lambda g: g))

    def __mul__(self, other):
        a, b = self.value, other.value
        return Array(a * b, (self, other), (lambda g: g * b, lambda g: g * a))

    def __matmul__(self, other):
        a, b = self.value, other.value
        return Array(a @ b, (self, other), (lambda g: g @ b.T, lambda g: a.T @ g))

    def tanh(self):
        t = np.tanh(self.value)
        return Array(t, (self,), (lambda g: g * (1 - t * t),))

    def sum(self):
        shape = self.value.shape
        return Array(self.value.sum(), (self,), (lambda g: np.broadcast_to(g, shape),))

    def backward(self, order_fn):
        self.grad = np.ones_like(self.value)
        for node in reversed(order_fn(self)):
            for p, vjp in zip(node.parents, node.vjps):
                g = unbroadcast(vjp(node.grad), p.value.shape)
                p.grad = g if p.grad is None else p.grad + g


def toposort_recursive(root):
    order, seen = [], set()

    def visit(node):
        if id(node) not in seen:
            seen.add(id(node))
            for p in node.parents:
                visit(p)
            order.append(node)

    visit(root)
    return order


# %%
# A two-layer expression with a broadcast bias, :math:`L = \sum \tanh(XW + b)\odot V`, checked
# against its closed form :math:`\bar W = X^T\bigl((1-T^2)\odot V\bigr)`,
# :math:`\bar b = \sum_i \bigl((1-T^2)\odot V\bigr)_{i\cdot}`:

rng = np.random.default_rng(0)
X, W, b, V = (Array(rng.standard_normal(s)) for s in [(5, 3), (3, 4), (4,), (5, 4)])
L = ((X @ W + b).tanh() * V).sum()
L.backward(toposort_recursive)
T = np.tanh(X.value @ W.value + b.value)
G = (1 - T ** 2) * V.value
print("dW matches the closed form:", np.allclose(W.grad, X.value.T @ G, rtol=1e-14, atol=0))
print("db matches the closed form:", np.allclose(b.grad, G.sum(axis=0), rtol=1e-14, atol=0),
      "| shape", b.grad.shape)

# %%
# Without ``unbroadcast`` the adjoint of ``b`` would have shape ``(5, 4)``: the wrong shape, and
# for a ``(1, 4)`` bias an adjoint that silently broadcasts in later arithmetic. refnorm keeps
# this rule in one place, :func:`refnorm.autograd.broadcasting.unbroadcast` (a single ``sum``
# with ``keepdims``), called by the graph walk on every edge. Both agree (to rounding: they add
# the same numbers in a different order):

from refnorm.autograd.broadcasting import unbroadcast as refnorm_unbroadcast  # noqa: E402

g = rng.standard_normal((2, 5, 3, 4))
for shape in [(4,), (3, 1), (1, 3, 4), (5, 1, 1)]:
    assert np.allclose(unbroadcast(g, shape), refnorm_unbroadcast(g, shape), rtol=1e-14, atol=0)
print("unbroadcast agrees with refnorm's on 4 shapes")

# %%
# The walk: a topological sort, without recursion
# ------------------------------------------------
#
# The backward pass must visit a node only once its adjoint is complete, i.e. after every node
# that uses it: a reverse **topological order**. The depth-first sort above is the textbook one
# (micrograd writes it so). It recurses once per node on a path, and Python's recursion limit
# (about 1000 frames) is reached by any deep graph: a recurrent network unrolled over a long
# sequence, or simply a long chain. A measurement:


def chain(n, order_fn):
    a = Array(0.5)
    z = a
    for _ in range(n):
        z = z * Array(0.999999) + Array(1e-6)
    try:
        z.sum().backward(order_fn)
        return "ok"
    except RecursionError:
        return "RecursionError"


print("recursive sort, chain of 20,000 ops:", chain(20_000, toposort_recursive))

# %%
# The same sort with an explicit stack never recurses. Each node is pushed twice: once to
# expand its parents, once (flagged) to be emitted after them. This is the loop of
# :func:`refnorm.autograd.graph.toposort`:


def toposort_iterative(root):
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
        elif id(node) not in seen:
            seen.add(id(node))
            stack.append((node, True))
            stack.extend((p, False) for p in node.parents if id(p) not in seen)
    return order


print("iterative sort, chain of 20,000 ops:", chain(20_000, toposort_iterative))

# %%
# Ending at ``refnorm.autograd``
# ------------------------------
#
# :mod:`refnorm.autograd` is this design with three changes a reader can check in its source:
#
# * the VJPs are not closures stored on each node, but **one derivative table**,
#   :data:`refnorm.autograd.VJP_RULES`, one named rule per primitive: a node stores only the name
#   of its op and its inputs, and the rules can be read (and tested) in one file;
# * the walk (:func:`refnorm.autograd.graph.backprop`) is the iterative sort above, applies
#   ``unbroadcast`` on every edge, and drops each adjoint once it is passed on;
# * with ``create_graph=True`` the rules run on Tensors, so a gradient can be differentiated
#   again.
#
# The expression above, in refnorm, gives the same gradients as our 60-line engine:

from refnorm.autograd import Tensor, VJP_RULES, tanh  # noqa: E402

Xt, Wt, bt, Vt = (Tensor(a.value, requires_grad=True) for a in (X, W, b, V))
(tanh(Xt @ Wt + bt) * Vt).sum().backward()
for name, ours, theirs in [("W", W, Wt), ("b", b, bt), ("X", X, Xt), ("V", V, Vt)]:
    print(f"d{name}: max |ours - refnorm| = {np.max(np.abs(ours.grad - theirs.grad)):.1e}")
print(f"the derivative table has {len(VJP_RULES)} rules, e.g. {', '.join(list(VJP_RULES)[:8])}")

# %%
# Why an array engine at all: time one backward pass of :math:`\sum \tanh(XW)` with
# :math:`X` of shape :math:`(n, n)`, in the scalar engine (a node per multiply-add) and in
# refnorm's array engine.


def scalar_backward_time(n, repeat=3):
    best = np.inf
    for _ in range(repeat):
        Xs = [[Scalar(v) for v in row] for row in rng.standard_normal((n, n))]
        Ws = [[Scalar(v) for v in row] for row in rng.standard_normal((n, n))]
        start = time.perf_counter()
        total = Scalar(0.0)
        for i in range(n):
            for j in range(n):
                acc = Scalar(0.0)
                for k in range(n):
                    acc = acc + Xs[i][k] * Ws[k][j]
                total = total + acc.tanh()
        total.backward()
        best = min(best, time.perf_counter() - start)
    return best


def array_backward_time(n, repeat=5):
    Xa = Tensor(rng.standard_normal((n, n)), requires_grad=True)
    Wa = Tensor(rng.standard_normal((n, n)), requires_grad=True)
    best = np.inf
    for _ in range(repeat):
        start = time.perf_counter()
        tanh(Xa @ Wa).sum().backward()
        best = min(best, time.perf_counter() - start)
    return best


sizes = [2, 4, 8, 12, 16]
t_scalar = [scalar_backward_time(n) for n in sizes]
t_array = [array_backward_time(n) for n in sizes]
for n, ts, ta in zip(sizes, t_scalar, t_array):
    print(f"n = {n:2d}: scalar engine {ts * 1e3:8.2f} ms, refnorm.autograd {ta * 1e3:6.3f} ms")

fig, ax = plt.subplots(figsize=(6.4, 3.6))
ax.loglog(sizes, t_scalar, "o-", label="scalar engine (one node per number)")
ax.loglog(sizes, t_array, "s-", label="refnorm.autograd (one node per array op)")
ax.set_xlabel("n (X and W are n x n)")
ax.set_ylabel("forward + backward time [s]")
ax.legend()
ax.set_title(r"$\sum\tanh(XW)$: the scalar engine grows like $n^3$ Python objects")
fig.tight_layout()
plt.show()

# %%
# Where next: the backward of a whole normalization layer is one node of this graph
# (:func:`refnorm.autograd.custom_vjp`), with a hand-derived VJP. The next tutorial shows how
# to tell whether such a VJP is right.
