"""refnorm.nn's convolutional layers: pooling against PyTorch, the basic block with any norm,
training only the norms' affine parameters, and TENT under a covariate shift."""
import numpy as np
import pytest

import refnorm.nn as nn
from refnorm.autograd import Tensor, no_grad
from refnorm.gradcheck import check_vjp
from refnorm.verify import normwise


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("kernel,stride,padding", [(2, None, 0), (3, 2, 1), ((3, 2), (1, 2), 0),
                                                   (2, 1, 1)])
def test_pooling_matches_torch(torch, kind, kernel, stride, padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6))  # Gaussian: no ties in a window
    ours = nn.max_pool2d if kind == "max" else nn.avg_pool2d
    theirs = getattr(torch.nn.functional, f"{kind}_pool2d")
    xt = Tensor(x, requires_grad=True)
    y = ours(xt, kernel, stride, padding)
    tx = torch.tensor(x, requires_grad=True)
    ty = theirs(tx, kernel, stride, padding)
    assert y.shape == tuple(ty.shape)
    dy = rng.standard_normal(y.shape)
    y.backward(dy)
    ty.backward(torch.from_numpy(dy))
    assert normwise(y.data, ty.detach().numpy()) <= 1e-15
    assert normwise(xt.grad, tx.grad.numpy()) <= 1e-15


def test_pooling_rejects_bad_arguments():
    x = np.zeros((1, 1, 4, 4))
    with pytest.raises(ValueError, match="padding <= kernel_size / 2"):
        nn.max_pool2d(x, 2, padding=2)
    with pytest.raises(ValueError, match="4-D"):
        nn.avg_pool2d(np.zeros((4, 4)), 2)
    with pytest.raises(ValueError, match="larger than the padded input"):
        nn.max_pool2d(np.zeros((1, 1, 2, 2)), 3)


def test_conv2d_layer_matches_torch(torch):
    rng = np.random.default_rng(1)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, rng=rng)
    tconv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).double()
    with torch.no_grad():
        tconv.weight.copy_(torch.from_numpy(conv.weight.data))
        tconv.bias.copy_(torch.from_numpy(conv.bias.data))
    x = rng.standard_normal((2, 4, 7, 7))
    y = conv(x)
    dy = rng.standard_normal(y.shape)
    y.backward(dy)
    ty = tconv(torch.from_numpy(x))
    ty.backward(torch.from_numpy(dy))
    assert normwise(y.data, ty.detach().numpy()) <= 1e-14
    assert normwise(conv.weight.grad, tconv.weight.grad.numpy()) <= 1e-14
    assert normwise(conv.bias.grad, tconv.bias.grad.numpy()) <= 1e-14
    # PyTorch's init bound 1/sqrt(fan_in), fan_in = (4/2)*3*3
    assert np.abs(conv.weight.data).max() <= 1 / np.sqrt(18)


@pytest.mark.parametrize("norm,options", [
    ("batch_norm", {}), ("group_norm", dict(num_groups=2)), ("instance_norm", dict(affine=True)),
    ("layer_norm", {}), ("rms_norm", dict(eps=1e-5)), ("local_response_norm", dict(size=3))])
def test_basic_block_takes_any_registered_norm(norm, options):
    """Forward in both modes, and the gradient of every parameter against finite differences
    (random upstream gradient); trailing-layout norms act on the channel axis."""
    block = nn.BasicBlock(4, 6, 2, norm=norm, norm_kwargs=options, rng=0)
    x = np.random.default_rng(2).standard_normal((3, 4, 6, 6))
    assert block(x).shape == (3, 6, 3, 3)
    names = [n for n, _ in block.named_parameters()]

    def f(*arrays):
        with no_grad():
            return nn.functional_call(block, dict(zip(names, arrays)), x).data

    def vjp(cotangents, *arrays):
        leaves = [Tensor(a, requires_grad=True) for a in arrays]
        nn.functional_call(block, dict(zip(names, leaves)), x).backward(cotangents[0])
        return [t.grad for t in leaves]

    for m in block.modules():  # batch statistics, running statistics left alone
        if isinstance(m, nn.Norm):
            m.freeze_state = True
    report = check_vjp(f, vjp, [p.data for p in block.parameters()], mode="fast",
                       rng=np.random.default_rng(3), rtol=1e-7)
    assert report, str(report)
    block.eval()
    assert block(x).shape == (3, 6, 3, 3)


def _images(rng, n, gains=(1.0, 1.0, 1.0)):
    """A seeded synthetic 2-class task on 3x8x8 images: a stripe pattern (random orientation and
    phase) in channel 0 (class 0) or channel 1 (class 1), Gaussian noise everywhere; ``gains``
    scale the channels (the covariate shift)."""
    y = rng.integers(0, 2, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    s = np.sin(np.arange(8)[None, :, None] * 1.5 + phase[:, None, None]) * np.ones((1, 1, 8))
    s = np.where(rng.integers(0, 2, n)[:, None, None] == 0, s, np.transpose(s, (0, 2, 1)))
    x = 0.7 * rng.standard_normal((n, 3, 8, 8))
    x[np.arange(n), y] += s
    return x * np.asarray(gains)[None, :, None, None], y


def test_training_only_the_norm_affine_parameters_lowers_the_loss():
    model = nn.SmallConvNet(3, 2, (16,), rng=1)
    affine = [p for m in model.modules() if isinstance(m, nn.Norm) for p in m.parameters()]
    frozen = {name: p.data.copy() for name, p in model.named_parameters()
              if all(p is not q for q in affine)}
    opt = nn.Optimizer(affine, "adam", lr=0.1)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(50):
        x, y = _images(rng, 32)
        model.zero_grad()
        loss = nn.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    print(f"norm-affine-only training: loss {first:.3f} -> {last:.3f}")
    assert last <= 0.85 * first
    for name, p in model.named_parameters():  # nothing else moved
        if name in frozen:
            np.testing.assert_array_equal(p.data, frozen[name])


def test_tent_adapts_under_covariate_shift():
    model = nn.SmallConvNet(3, 2, (4, 8), rng=1)
    opt = nn.Optimizer(model.parameters(), "adam", lr=1e-2)
    rng = np.random.default_rng(0)
    for _ in range(60):  # the source model
        x, y = _images(rng, 32)
        model.zero_grad()
        nn.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    clean_x, clean_y = _images(np.random.default_rng(5), 64)
    shifted_x, shifted_y = _images(np.random.default_rng(6), 64, gains=(0.4, 2.5, 1.0))

    def figures(logits, y):
        return nn.entropy(logits).item(), float(np.mean(logits.data.argmax(-1) != y))

    with no_grad():
        clean = figures(model(clean_x), clean_y)
        source = figures(model(shifted_x), shifted_y)
    running_mean = model.stem_norm.running_mean
    tent = nn.Tent(model, optimizer="adam", lr=1e-2)
    steps = [figures(tent(shifted_x), shifted_y) for _ in range(10)]
    with no_grad():
        adapted = figures(model(shifted_x), shifted_y)
    print(f"\nsource model, clean data:   entropy {clean[0]:.4f}, error {clean[1]:.3f}"
          f"\nsource model, shifted data: entropy {source[0]:.4f}, error {source[1]:.3f}"
          f"\nTENT first forward (batch statistics, no update yet): entropy {steps[0][0]:.4f}, "
          f"error {steps[0][1]:.3f}"
          f"\nTENT after 10 steps:        entropy {adapted[0]:.4f}, error {adapted[1]:.3f}")
    assert source[1] >= 0.25 > clean[1]  # the shift hurts the source model
    assert adapted[1] < source[1]         # TENT lowers the error
    assert adapted[0] < 0.75 * steps[0][0]  # and its updates lower the entropy
    assert model.stem_norm.running_mean is running_mean  # source statistics kept
    tent.reset()
    with no_grad():
        assert figures(model.eval()(shifted_x), shifted_y) == source
