"""refnorm.nn's Module machinery and the generic Norm layer: every record with a layer_init
(later variants are covered with no new test code), PyTorch's modules for the core norms,
state_dict round trips, train/eval, explicit state."""
import inspect

import numpy as np
import pytest

import refnorm.nn as nn
from refnorm.autograd import Tensor
from refnorm.norms import ALL_SPECS, BY_NAME
from refnorm.registry import TRAINING
from refnorm.verify import normwise

LAYER_SPECS = [s for s in ALL_SPECS if s.layer_init is not None]


def _layer_case(spec):
    """A Norm layer of ``spec`` and an input for it, from the record's first usable sample:
    the sample's hyper-parameters that are options of layer_init are passed to it."""
    for sample in spec.sample_inputs(np.random.default_rng(0)):
        x = sample.arrays[0]
        if x.dtype == np.float64 and x.ndim >= 2 and x.shape[0] >= 2 and x.size:
            break
    else:
        pytest.fail(f"{spec.name}: no float64 sample with a batch of at least 2")
    options = list(inspect.signature(spec.layer_init).parameters.values())[1:]  # not features
    named = [p.name for p in options if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    chosen = {k: v for k, v in sample.kwargs.items() if k in named}
    # options layer_init needs that the sample only implies (SPADE's label channels)
    if "label_nc" in named and "label_nc" not in chosen:
        chosen["label_nc"] = sample.kwargs["segmap"].shape[1]
    axis = -1 if spec.param_layout == "trailing" else 1
    return nn.Norm(spec.name, x.shape[axis], **chosen), x, _inputs(spec, sample)


def _inputs(spec, sample):
    """The sample's per-call non-differentiable arrays (masks, segmentation maps)."""
    return {k: sample.kwargs[k] for k in spec.nondiff_args if k in sample.kwargs}


def _expected_kwargs(layer, training):
    spec = layer.spec
    kwargs = {k: (training if v is TRAINING else v) for k, v in layer.kwargs.items()}
    if "training" in inspect.signature(spec.forward).parameters and "training" not in kwargs:
        kwargs["training"] = training
    kwargs.update({k: getattr(layer, k).data for k in layer.param_names})
    kwargs.update({k: layer._state[k] for k in layer.state_names})
    return kwargs


def test_the_core_norms_are_layers():
    names = {s.name for s in LAYER_SPECS}
    assert {"layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm",
            "local_response_norm"} <= names
    assert set(nn.layers_with_init()) == names


@pytest.mark.parametrize("spec", LAYER_SPECS, ids=lambda s: s.name)
def test_norm_layer_is_its_records_forward_and_backward(spec):
    """For every record with a layer_init: the parameters are differentiable arguments, the
    layer's output and every gradient are the record's forward and hand-derived backward, in
    both modes; a training forward replaces the state with the record's new state, never
    writing into the old arrays; evaluation leaves the state alone."""
    layer, x, inputs = _layer_case(spec)
    assert set(layer.param_names) <= set(spec.diff_argnames[1:])
    assert all(p.data.dtype.kind == "f" for p in layer.parameters())
    rng = np.random.default_rng(1)
    for p in layer.parameters():  # away from the (1, 0) init, so a swapped pair shows
        p.data = p.data + 0.3 * rng.standard_normal(p.shape)
    for training in (True, False):
        layer.train(training)
        old_state = {k: (None if v is None else v.copy()) for k, v in layer._state.items()}
        old_arrays = dict(layer._state)
        kwargs = _expected_kwargs(layer, training)
        result = spec.forward(x, **kwargs, **inputs)
        y_ref, cache = result[0], result[-1]
        xt = Tensor(x, requires_grad=True)
        layer.zero_grad()
        y = layer(xt, **inputs)
        np.testing.assert_array_equal(y.data, y_ref)
        dy = rng.standard_normal(y.shape)
        y.backward(dy)
        grads = spec.backward(dy, cache)
        np.testing.assert_array_equal(xt.grad, grads[0])
        for name in layer.param_names:
            index = spec.diff_argnames.index(name)
            np.testing.assert_array_equal(getattr(layer, name).grad, grads[index])
        for key, array in old_arrays.items():  # never written in place
            if array is not None:
                np.testing.assert_array_equal(array, old_state[key])
        if spec.stateful and training:
            n = len(spec.diff_argnames)   # state the backward computes (PowerNorm's ema_gz)
            from_backward = dict(zip(grads._fields[n:], grads[n:]))
            assert set(from_backward) <= set(layer.state_names)
            for key in layer.state_names:
                expected = from_backward.get(key, getattr(result[1], key))
                np.testing.assert_array_equal(layer._state[key], expected)
        else:
            for key in layer.state_names:
                assert layer._state[key] is old_arrays[key]


@pytest.mark.parametrize("spec", LAYER_SPECS, ids=lambda s: s.name)
def test_norm_layer_moves_the_feature_axis(spec):
    """The same layer on an input whose features sit on another axis: the output moves too
    (a record without a param_layout is applied to the input as given)."""
    layer, x, inputs = _layer_case(spec)
    layer.eval()
    own = -1 if spec.param_layout == "trailing" else 1
    if spec.param_layout is None:
        twin = nn.Norm(spec.name, layer.features, feature_axis=-1, **layer.options)
        twin.load_state_dict(layer.state_dict())   # the same layer (its init may be random)
        twin.eval()
        np.testing.assert_array_equal(twin(x, **inputs).data, layer(x, **inputs).data)
        return
    other = 1 if own == -1 else -1
    if x.ndim < 3:  # 2-D: one more axis, away from the features, to move them to
        x = np.stack([x, 1.0 - 0.5 * x], axis=1 if own == -1 else -1)
    moved = np.moveaxis(x, own, other)
    twin = nn.Norm(spec.name, layer.features, feature_axis=other, **layer.options)
    twin.load_state_dict(layer.state_dict())
    twin.eval()
    # per-call inputs (masks, maps) stay in the record's own layout
    np.testing.assert_allclose(twin(moved, **inputs).data,
                               np.moveaxis(layer(x, **inputs).data, own, other),
                               rtol=1e-13, atol=1e-15)


def _torch_pair(torch, name):
    tnn = torch.nn
    return {
        "layer_norm": (tnn.LayerNorm(6), nn.Norm("layer_norm", 6), (4, 5, 6)),
        "rms_norm": (tnn.RMSNorm(6), nn.Norm("rms_norm", 6), (4, 5, 6)),
        "group_norm": (tnn.GroupNorm(2, 6), nn.Norm("group_norm", 6, num_groups=2), (3, 6, 4, 4)),
        "batch_norm": (tnn.BatchNorm2d(6), nn.Norm("batch_norm", 6), (3, 6, 4, 4)),
        "batch_norm-no-stats": (tnn.BatchNorm2d(6, track_running_stats=False),
                                nn.Norm("batch_norm", 6, track_running_stats=False),
                                (3, 6, 4, 4)),
        "batch_norm-momentum-None": (tnn.BatchNorm1d(6, momentum=None),
                                     nn.Norm("batch_norm", 6, momentum=None), (5, 6)),
        "instance_norm": (tnn.InstanceNorm2d(6), nn.Norm("instance_norm", 6), (3, 6, 4, 4)),
        "instance_norm-affine-stats": (
            tnn.InstanceNorm2d(6, affine=True, track_running_stats=True),
            nn.Norm("instance_norm", 6, affine=True, track_running_stats=True), (3, 6, 4, 4)),
        "local_response_norm": (tnn.LocalResponseNorm(3),
                                nn.Norm("local_response_norm", 6, size=3), (3, 6, 4, 4)),
    }[name]


@pytest.mark.parametrize("name", [
    "layer_norm", "rms_norm", "group_norm", "batch_norm", "batch_norm-no-stats",
    "batch_norm-momentum-None", "instance_norm", "instance_norm-affine-stats",
    "local_response_norm"])
def test_layer_matches_torch_module_with_default_init(torch, name):
    """Initialized as torch.nn's module: same parameters, same state, and the same outputs,
    parameter gradients and running statistics over three training steps and in evaluation."""
    tmod, layer, shape = _torch_pair(torch, name)
    tmod = tmod.double()
    # torch's InstanceNorm registers a num_batches_tracked it never updates: not state here
    theirs = {k: v.detach().numpy() for k, v in tmod.state_dict().items()
              if not (name.startswith("instance") and k == "num_batches_tracked")}
    ours = layer.state_dict()
    assert set(ours) == set(theirs), (set(ours), set(theirs))
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key])
    rng = np.random.default_rng(2)
    for step in range(4):
        training = step < 3
        layer.train(training)
        tmod.train(training)
        x = 2.0 + 3.0 * rng.standard_normal(shape)
        layer.zero_grad()
        tmod.zero_grad()
        y = layer(x)
        ty = tmod(torch.from_numpy(x))
        assert normwise(y.data, ty.detach().numpy()) <= 1e-13
        dy = rng.standard_normal(shape)
        if layer.parameters():
            y.backward(dy)
            ty.backward(torch.from_numpy(dy))
            for pname, p in layer.named_parameters():
                assert normwise(p.grad, getattr(tmod, pname).grad.numpy()) <= 1e-13
        for key, value in tmod.state_dict().items():
            if key in theirs and key not in dict(layer.named_parameters()):
                assert normwise(layer.state_dict()[key], value.numpy()) <= 1e-14, key


def _small_model():
    return nn.Transformer(7, 8, 2, 2, 5, placement="mix", mix_ratio=0.5, norm="batch_norm", rng=4)


def test_state_dict_round_trip_parameters_and_state():
    model = _small_model()
    tokens = np.random.default_rng(0).integers(0, 7, (3, 5))
    model(tokens)  # a training forward: running statistics move
    saved = model.state_dict()
    assert "blocks.0.norm1.running_mean" in saved and "blocks.1.norm2.num_batches_tracked" in saved
    assert saved["blocks.0.norm1.num_batches_tracked"] == 1
    other = nn.Transformer(7, 8, 2, 2, 5, placement="mix", mix_ratio=0.5, norm="batch_norm",
                           rng=99)
    other.load_state_dict(saved)
    model.eval()
    other.eval()
    np.testing.assert_array_equal(other(tokens).data, model(tokens).data)
    for key, value in other.state_dict().items():
        np.testing.assert_array_equal(value, saved[key])
    saved["head.bias"][:] = 123.0  # copies: the model does not see it
    assert not np.any(model.head.bias.data == 123.0)


def test_load_state_dict_errors_name_the_keys_and_change_nothing():
    model = _small_model()
    before = model.state_dict()
    bad = dict(before)
    del bad["blocks.0.norm1.running_var"]
    bad["blocks.0.norm1.nonsense"] = np.zeros(3)
    bad["head.weight"] = np.zeros((2, 2))
    bad["tok.weight"] = before["tok.weight"] + 1.0
    with pytest.raises(ValueError) as info:
        model.load_state_dict(bad)
    message = str(info.value)
    assert "missing keys ['blocks.0.norm1.running_var']" in message
    assert "unexpected keys ['blocks.0.norm1.nonsense']" in message
    assert "'head.weight': expected shape (7, 8), got (2, 2)" in message
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[key])
    with pytest.raises(TypeError, match="mapping"):
        model.load_state_dict([1, 2])
    partial = {"tok.weight": before["tok.weight"] + 1.0}
    model.load_state_dict(partial, strict=False)
    np.testing.assert_array_equal(model.tok.weight.data, partial["tok.weight"])


def test_batch_norm_layer_train_and_eval_differ():
    layer = nn.Norm("batch_norm", 3)
    x = 5.0 + 2.0 * np.random.default_rng(3).standard_normal((16, 3, 4))
    y_train = layer(x).data
    # batch statistics: every channel standardized
    np.testing.assert_allclose(y_train.mean(axis=(0, 2)), 0.0, atol=1e-12)
    mean, var = x.mean(axis=(0, 2)), x.var(axis=(0, 2), ddof=1)
    np.testing.assert_allclose(layer.running_mean, 0.1 * mean, rtol=1e-13)
    np.testing.assert_allclose(layer.running_var, 0.9 + 0.1 * var, rtol=1e-13)
    state = layer.state_dict()
    layer.eval()
    y_eval = layer(x).data
    expected = (x - layer.running_mean[:, None]) / np.sqrt(layer.running_var[:, None] + 1e-5)
    np.testing.assert_allclose(y_eval, expected, rtol=1e-13)
    assert np.abs(y_eval - y_train).max() > 1.0
    for key, value in layer.state_dict().items():  # evaluation does not move the state
        np.testing.assert_array_equal(value, state[key])
    layer.train()
    layer.freeze_state = True
    layer(x)
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, state[key])


def test_module_basics():
    model = _small_model()
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names)) == len(model.parameters())
    assert isinstance(np.asarray(model.head.weight), np.ndarray)
    assert np.asarray(model.head.weight) is model.head.weight.data
    assert all(m.training for m in model.modules())
    assert not any(m.training for m in model.eval().modules())
    model.astype(np.float32)
    assert {p.dtype for p in model.parameters()} == {np.dtype(np.float32)}
    assert model.blocks[0].norm1.running_mean.dtype == np.float32
    assert model.blocks[0].norm1.num_batches_tracked.dtype == np.int64
    assert model(np.zeros((1, 5), dtype=int)).dtype == np.float32
    with pytest.raises(TypeError, match="bool"):
        model.train(1)
    layer = nn.Linear(2, 3, bias=False)
    assert layer.bias is None and len(layer.parameters()) == 1
    layer.bias = nn.Parameter(np.ones(3))   # a parameter replaces the plain attribute
    assert isinstance(layer.bias, nn.Parameter) and len(layer.parameters()) == 2
    layer.bias = None                       # and back
    assert layer.bias is None and len(layer.parameters()) == 1
    with pytest.raises(ValueError, match="no parameters named"):
        nn.functional_call(model, {"nope": np.zeros(1)}, np.zeros((1, 5), dtype=int))


def test_norm_layer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        nn.Norm("nope", 4)
    with pytest.raises(ValueError, match="not a layer on activations"):
        nn.Norm("weight_norm", 4)
    with pytest.raises(ValueError, match="`features` must be a positive int"):
        nn.Norm("layer_norm", 0)
    with pytest.raises(ValueError, match="num_groups"):
        nn.Norm("group_norm", 6, num_groups=4)
    with pytest.raises(TypeError, match="num_groups"):
        nn.Norm("group_norm", 6)


def test_optimizer_replaces_parameter_arrays():
    layer = nn.Linear(3, 2)
    old = layer.weight.data
    copy = old.copy()
    opt = nn.Optimizer(layer.parameters(), "sgd", lr=0.1)
    layer(np.ones((1, 3))).sum().backward()
    opt.step()
    np.testing.assert_array_equal(old, copy)
    np.testing.assert_allclose(layer.weight.data, copy - 0.1 * np.ones((2, 3)))
    with pytest.raises(ValueError, match="unknown optimizer"):
        nn.Optimizer(layer.parameters(), "lbfgs")


def test_relu_node_against_finite_differences_and_at_the_kink():
    from refnorm.gradcheck import check_vjp
    x = np.random.default_rng(4).standard_normal((3, 5))
    x = np.where(np.abs(x) < 0.1, 0.5, x)  # away from the kink

    def vjp(cotangents, a):
        t = Tensor(a, requires_grad=True)
        nn.relu(t).backward(cotangents[0])
        return (t.grad,)

    report = check_vjp(lambda a: nn.relu(a).data, vjp, [x], mode="slow",
                       rng=np.random.default_rng(5), rtol=1e-9, atol=1e-12)
    assert report, str(report)
    t = Tensor(np.array([-1.0, 0.0, 2.0]), requires_grad=True)
    nn.relu(t).backward(np.array([3.0, 5.0, 7.0]))
    np.testing.assert_array_equal(t.grad, [0.0, 0.0, 7.0])  # 0 at the kink, as PyTorch


@pytest.mark.parametrize("name", ["power_norm", "unified_norm"])
def test_layer_carries_the_state_its_backward_computes(torch, name):
    """PowerNorm and Unified Normalization update a moving average of gradient statistics in
    the backward (the official modules write it during the backward pass). Over five training
    steps the layer's outputs, gradients and that state follow the record's torch_call (torch
    ops, state carried by hand), to 1e-12; a layer that dropped the backward's state would
    differ from step 2 on."""
    spec = BY_NAME[name]
    c, rng = 6, np.random.default_rng(5)
    layer = nn.Norm(name, c, warmup_iters=2)
    for p in layer.parameters():
        p.data = p.data + 0.3 * rng.standard_normal(p.shape)
    state = {k: np.array(v) for k, v in layer._state.items()}
    kwargs = {k: v for k, v in layer.kwargs.items() if k != "training"}
    moved = 0.0
    for step in range(5):
        x = rng.standard_normal((4, 3, c)) + 0.5
        dy = rng.standard_normal(x.shape)
        xt = Tensor(x, requires_grad=True)
        layer.zero_grad()
        y = layer(xt)
        y.backward(dy)
        xr = torch.tensor(x, requires_grad=True)
        params = {p: torch.tensor(getattr(layer, p).data, requires_grad=True)
                  for p in layer.param_names}
        out = {}
        yr, new_state = spec.torch_call(torch, xr, params.get("weight"), params.get("bias"),
                                        **state, **kwargs, training=True, backward_state=out)
        yr.backward(torch.tensor(dy))
        np.testing.assert_allclose(y.data, yr.detach().numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(xt.grad, xr.grad.numpy(), rtol=1e-12, atol=1e-12)
        for p in layer.param_names:
            np.testing.assert_allclose(getattr(layer, p).grad, params[p].grad.numpy(),
                                       rtol=1e-12, atol=1e-12)
        state = {k: np.asarray(v.detach().numpy() if torch.is_tensor(v) else v)
                 for k, v in new_state.items()}
        state.update({k: np.asarray(v.detach().numpy() if torch.is_tensor(v) else v)
                      for k, v in out.items()})
        for key in layer.state_names:
            np.testing.assert_allclose(layer._state[key], state[key], rtol=1e-12, atol=1e-14)
        moved = max(moved, float(np.max(np.abs(layer._state["ema_gz"]))))
    assert moved > 1e-3    # the backward's state did change
