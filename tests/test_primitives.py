"""Every primitive's VJP rule, on every sample input, against finite differences (refnorm.gradcheck),
and, for rules written on Tensors, the recorded (create_graph) path against the plain one."""
import numpy as np
import pytest

from refnorm import autograd as ag
from refnorm.autograd import Tensor
from refnorm.gradcheck import check_vjp
from refnorm.primitive_specs import PRIMITIVES
from refnorm.verify import primitive_functions, normwise


def _params():
    return [pytest.param(spec, sample, id=f"{spec.name}-{sample.name}")
            for spec in PRIMITIVES for sample in spec.sample_inputs(np.random.default_rng(0))]


@pytest.mark.parametrize("spec,sample", _params())
def test_vjp_rule_matches_finite_differences(spec, sample):
    f, vjp, arrays = primitive_functions(spec, sample)
    report = check_vjp(f, vjp, arrays, mode="slow", rng=np.random.default_rng(1),
                       rtol=1e-9, atol=1e-12)
    assert report, str(report)
    assert not report.kinks, "sample inputs must stay inside the smooth domain"


@pytest.mark.parametrize("spec,sample", [p for p in _params() if p.values[0].twice])
def test_recorded_rule_equals_plain_rule(spec, sample):
    f, vjp, arrays = primitive_functions(spec, sample)
    u = np.random.default_rng(2).standard_normal(np.shape(f(*arrays)))
    for a, b in zip(vjp((u,), *arrays, create_graph=True), vjp((u,), *arrays)):
        assert normwise(a, b) <= 1e-14


def test_every_rule_has_a_record_and_every_record_a_rule():
    names = {spec.name for spec in PRIMITIVES}
    built_from_primitives = {"mean"}  # recorded as sum and divide: no rule of its own
    assert set(ag.VJP_RULES) - {"custom_vjp", "custom_vjp_output"} == names - built_from_primitives


@pytest.mark.parametrize("fn, x", [
    (lambda t: ag.relu(t), np.array([-1.0, 0.0, 2.0])),
    (lambda t: ag.abs(t), np.array([0.0, 1.5])),
    (lambda t: ag.max(t, axis=1), np.array([[1.0, 3.0, 3.0], [0.5, 0.2, 0.1]])),
])
def test_kinks_are_reported_not_failed(fn, x):
    def f(a):
        return fn(Tensor(a)).data

    def vjp(cts, a):
        t = Tensor(a, requires_grad=True)
        fn(t).backward(cts[0])
        return (t.grad,)

    report = check_vjp(f, vjp, [x], mode="slow")
    assert report and report.kinks


def test_max_ties_share_the_gradient_equally():
    x = Tensor([[1.0, 3.0, 3.0]], requires_grad=True)
    ag.max(x, axis=1).sum().backward()
    np.testing.assert_array_equal(x.grad, [[0.0, 0.5, 0.5]])


def test_getitem_with_repeated_index_accumulates():
    x = Tensor(np.arange(4.0), requires_grad=True)
    x[np.array([1, 1, 3])].sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 2.0, 0.0, 1.0])
