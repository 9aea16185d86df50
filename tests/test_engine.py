"""The engine on its own: accumulation, deep graphs, higher order, bad input, and parity with
PyTorch float64 on three composites (an MLP with softmax cross-entropy, a strided padded conv
layer, and a causal attention head)."""
import numpy as np
import pytest

from refnorm import autograd as ag
from refnorm.autograd import Tensor, gradients, no_grad
from refnorm.verify import normwise


rel_err = normwise  # max|a - b| / max|b|


# ---------------------------------------------------------------------------------------------
# graph mechanics
# ---------------------------------------------------------------------------------------------
def test_node_used_twice_accumulates():
    x = Tensor(3.0, requires_grad=True)
    y = x * x + x  # x feeds three edges
    y.backward()
    assert x.grad == 7.0


def test_diamond_graph_counts_each_path_once():
    x = Tensor(2.0, requires_grad=True)
    a = ag.exp(x)
    b = a * a  # both edges of b come from a
    (b + a).backward()
    assert np.isclose(x.grad, 2 * np.exp(4.0) + np.exp(2.0), rtol=1e-15)


def test_chain_of_100000_nodes_does_not_recurse():
    x = Tensor(np.ones(2), requires_grad=True)
    z = x
    for _ in range(100_000):
        z = z * 1.00001
    z.sum().backward()
    np.testing.assert_allclose(x.grad, 1.00001 ** 100_000, rtol=1e-9)


def test_gradients_add_up_across_backward_calls():
    x = Tensor([1.0, 2.0], requires_grad=True)
    (x * x).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad, 2 * x.data + 3.0)


def test_disconnected_input_gets_zeros_from_gradients():
    x, y = Tensor([1.0], requires_grad=True), Tensor([2.0], requires_grad=True)
    gx, gy = gradients((x * 2.0).sum(), [x, y])
    assert gx.tolist() == [2.0] and gy.tolist() == [0.0]


def test_no_grad_records_nothing():
    x = Tensor([1.0], requires_grad=True)
    with no_grad():
        y = x * 2.0
    assert not y.requires_grad and y.is_leaf


def test_constants_keep_the_tensor_dtype():
    x = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    y = (x * 2.0 + 1) / 3.0
    assert y.dtype == np.float32
    y.backward(np.ones(3, dtype=np.float32))
    assert x.grad.dtype == np.float32


def test_numpy_array_on_the_left_dispatches_to_tensor():
    x = Tensor([1.0, 2.0], requires_grad=True)
    y = np.array([3.0, 4.0]) * x
    assert isinstance(y, Tensor)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0, 4.0])


def test_custom_vjp_wires_a_hand_backward():
    def fwd(x, w, *, scale=1.0):
        return scale * x * w, (x, w, scale)

    def bwd(dy, cache):
        x, w, scale = cache
        return scale * dy * w, (scale * dy * x).sum(0)

    op = ag.custom_vjp(fwd, bwd, ("x", "w"))
    rng = np.random.default_rng(0)
    x, w = Tensor(rng.standard_normal((3, 2)), requires_grad=True), Tensor(rng.standard_normal(2))
    w.requires_grad = True
    (ag.tanh(op(x, w, scale=2.0)) * 1.5).sum().backward()
    t = np.tanh(2.0 * x.data * w.data)
    np.testing.assert_allclose(x.grad, 1.5 * (1 - t * t) * 2.0 * w.data, rtol=1e-14)
    np.testing.assert_allclose(w.grad, (1.5 * (1 - t * t) * 2.0 * x.data).sum(0), rtol=1e-14)


# ---------------------------------------------------------------------------------------------
# higher order: Hessian-vector products against finite differences of the gradient
# ---------------------------------------------------------------------------------------------
def _hvp(fun, x, v):
    xt = Tensor(x, requires_grad=True)
    (g,) = gradients(fun(xt), [xt], create_graph=True)
    (h,) = gradients((g * v).sum(), [xt])
    return h


def _fd_hvp(fun, x, v, h=1e-5):
    def grad_at(z):
        zt = Tensor(z, requires_grad=True)
        return gradients(fun(zt), [zt])[0]
    return (grad_at(x + h * v) - grad_at(x - h * v)) / (2 * h)


HVP_FUNCTIONS = {
    "elementwise": lambda x: (ag.tanh(x) * ag.exp(x * 0.3) + ag.sigmoid(x) / (1 + x * x)).sum(),
    "power-log-sqrt": lambda x: (ag.log(x * x + 1) * ag.sqrt(x * x + 2) + (x * x + 1) ** 1.5).sum(),
    "reductions": lambda x: (ag.softmax(x, axis=1) * ag.log_softmax(x * 2, axis=0)).sum()
    + ag.max(x * x, axis=1).sum() + ag.var(x, axis=0).sum(),
    "matmul": lambda x: ag.tanh(x @ x.T @ x).sum() + (ag.mean(x, axis=1, keepdims=True) * x).sum(),
    "shapes": lambda x: (ag.reshape(x, (-1,)) ** 3).sum() + (ag.transpose(x) @ x).sum()
    + ag.concatenate([x, x * x], axis=0).sum() ** 2,
}


@pytest.mark.parametrize("name", sorted(HVP_FUNCTIONS))
def test_hessian_vector_product_matches_finite_differences(name, rng):
    fun = HVP_FUNCTIONS[name]
    x, v = rng.standard_normal((3, 3)), rng.standard_normal((3, 3))
    assert rel_err(_hvp(fun, x, v), _fd_hvp(fun, x, v)) < 1e-7


def test_second_derivative_of_an_array_only_rule_raises_clearly():
    x = Tensor(np.ones((2, 2)), requires_grad=True)
    with pytest.raises(NotImplementedError, match="getitem"):
        gradients((x[0] * x[0]).sum(), [x], create_graph=True)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_tensor_from_non_numeric_data_raises():
    with pytest.raises(TypeError, match="data must be a numeric"):
        Tensor(np.array(["a", "b"]))
    with pytest.raises(TypeError, match="data must be a numeric"):
        Tensor([1.0, "x"])
    with pytest.raises(TypeError, match="data must be a numeric"):
        Tensor([[1.0, 2.0], [3.0]])
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        Tensor([1, 2], dtype=np.int32)


def test_matmul_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"matmul: shapes \(3, 4\) and \(5, 2\) are not aligned"):
        ag.matmul(Tensor(np.ones((3, 4))), Tensor(np.ones((5, 2))))


def test_conv2d_channel_mismatch_names_weight():
    with pytest.raises(ValueError, match=r"`weight` expects 2 input channels"):
        ag.conv2d(Tensor(np.ones((1, 3, 5, 5))), Tensor(np.ones((4, 2, 3, 3))))
    with pytest.raises(ValueError, match=r"`x` must be 4-D"):
        ag.conv2d(Tensor(np.ones((3, 5, 5))), Tensor(np.ones((4, 3, 3, 3))))


def test_backward_on_non_scalar_needs_a_gradient():
    x = Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(ValueError, match="`gradient` is required for a non-scalar output"):
        (x * 2.0).backward()
    with pytest.raises(ValueError, match="`gradient` must have the output's shape"):
        (x * 2.0).backward(np.ones(4))


def test_inputs_are_not_mutated_by_backward(rng):
    a = rng.standard_normal((3, 4))
    copy = a.copy()
    x = Tensor(a, requires_grad=True)
    (ag.softmax(x, axis=1) * x).sum().backward()
    np.testing.assert_array_equal(a, copy)


# ---------------------------------------------------------------------------------------------
# composites: PyTorch float64 parity (1e-12 relative) and refnorm.gradcheck
# ---------------------------------------------------------------------------------------------
def mlp_loss(lib, x, w1, b1, w2, b2, labels):
    """Two-layer MLP with softmax cross-entropy; ``lib`` supplies tanh and log_softmax."""
    h = lib.tanh(x @ w1 + b1)
    logp = lib.log_softmax(h @ w2 + b2, axis=1)
    return -(logp * labels).sum() / x.shape[0]


def conv_loss(lib, x, w, b):
    y = lib.conv2d(x, w, b, stride=2, padding=1)
    return (lib.tanh(y) * y).sum()


def attention(lib, x, wq, wk, wv):
    q, k, v = x @ wq, x @ wk, x @ wv
    t = x.shape[0]
    scores = q @ k.T / np.sqrt(q.shape[1])
    causal = np.tril(np.ones((t, t), dtype=bool))
    scores = lib.where(causal, scores, -1e9)
    return (lib.softmax(scores, axis=1) @ v)


class _RefLib:
    tanh, log_softmax, softmax, where, conv2d = (ag.tanh, ag.log_softmax, ag.softmax, ag.where,
                                                 ag.conv2d)


def _torch_lib(torch):
    F = torch.nn.functional

    class TorchLib:
        tanh = staticmethod(torch.tanh)
        log_softmax = staticmethod(lambda a, axis: torch.log_softmax(a, dim=axis))
        softmax = staticmethod(lambda a, axis: torch.softmax(a, dim=axis))
        where = staticmethod(lambda c, a, b: torch.where(torch.as_tensor(c), a,
                                                         torch.as_tensor(b, dtype=a.dtype)))
        conv2d = staticmethod(lambda x, w, b, stride, padding: F.conv2d(x, w, b, stride=stride,
                                                                        padding=padding))
    return TorchLib


def _composite_cases(rng):
    labels = np.eye(4)[rng.integers(0, 4, size=6)]
    yield "mlp", mlp_loss, [rng.standard_normal(s) for s in ((6, 5), (5, 7), (7,), (7, 4), (4,))], \
        dict(labels=labels), None
    yield "conv", conv_loss, [rng.standard_normal(s) for s in ((2, 3, 7, 6), (4, 3, 3, 3), (4,))], \
        {}, None
    x = rng.standard_normal((5, 8))
    yield "attention", attention, [x] + [rng.standard_normal((8, 4)) for _ in range(3)], {}, \
        rng.standard_normal((5, 4))


def _ref_value_and_grads(fun, arrays, kwargs, dy):
    ts = [Tensor(a, requires_grad=True) for a in arrays]
    out = fun(_RefLib, *ts, **kwargs)
    out.backward(dy)
    return out.data, [t.grad for t in ts]


@pytest.mark.parametrize("case", ["mlp", "conv", "attention"])
def test_composite_matches_torch_float64(case, rng, torch):
    name, fun, arrays, kwargs, dy = next(c for c in _composite_cases(rng) if c[0] == case)
    value, grads = _ref_value_and_grads(fun, arrays, kwargs, dy)
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    tkw = {k: torch.tensor(v) for k, v in kwargs.items()}
    out = fun(_torch_lib(torch), *ts, **tkw)
    out.backward(None if dy is None else torch.tensor(dy))
    assert rel_err(value, out.detach().numpy()) < 1e-12
    for g, t in zip(grads, ts):
        assert rel_err(g, t.grad.numpy()) < 1e-12


@pytest.mark.parametrize("case", ["mlp", "conv", "attention"])
def test_composite_matches_gradcheck(case, rng):
    from refnorm.gradcheck import check_vjp

    name, fun, arrays, kwargs, dy = next(c for c in _composite_cases(rng) if c[0] == case)

    def f(*arrays):
        with no_grad():
            return fun(_RefLib, *[Tensor(a) for a in arrays], **kwargs).data

    def vjp(cotangents, *arrays):
        ts = [Tensor(a, requires_grad=True) for a in arrays]
        return gradients(fun(_RefLib, *ts, **kwargs), ts, cotangents[0])

    report = check_vjp(f, vjp, arrays, mode="slow")
    assert report, str(report)
    assert check_vjp(f, vjp, arrays, mode="fast"), "fast mode"
