r"""Convolutional layers: ``Conv2d``, max and average pooling, a ResNet basic block, a small net.

Everything is NCHW, as ``torch.nn``. The pooling functions are built from engine primitives
(strided slices of the input, one per kernel tap, stacked and reduced with ``max`` or summed), so
their gradient is the engine's with no rule of their own; a non-overlapping window
(``stride == kernel_size``, no padding, sizes divisible) takes a reshape instead of the slices.
Where a max-pooling window holds several equal maxima, the gradient is shared equally between
them (the engine's ``max`` rule); PyTorch gives it all to one of them. Both are valid
subgradients; on data without ties the two agree.

The basic block is He et al.'s (*Deep Residual Learning for Image Recognition*, CVPR 2016,
arXiv:1512.03385): two 3x3 convolutions, each followed by a norm, ReLU after the first and after
the residual sum, and a 1x1 convolution with a norm on the shortcut when the shape changes. Its
``norm`` is any registered name: ``BasicBlock(16, 32, 2, norm="group_norm",
norm_kwargs=dict(num_groups=4))``.
"""
from __future__ import annotations

import math
import numbers

from refnorm import autograd as ag
from refnorm.nn.layers import Linear, Norm, as_rng, check_positive_int, relu
from refnorm.nn.module import Module, Parameter, Sequential


def _pair(value, name, where):
    pair = (value, value) if isinstance(value, numbers.Integral) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                 for v in pair):
        raise ValueError(f"{where}: `{name}` must be an int or a pair of ints, got {value!r}")
    return tuple(int(v) for v in pair)


class Conv2d(Module):
    r"""2-D convolution (cross-correlation), as ``torch.nn.Conv2d``; runs on the engine's
    ``conv2d``.

    Initialization (PyTorch's): weight and bias :math:`\sim U(-k, k)`,
    :math:`k = 1/\sqrt{C_{in}/\text{groups} \cdot k_h k_w}`.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, *, rng=None):
        super().__init__()
        check_positive_int(in_channels, "in_channels", "Conv2d")
        check_positive_int(out_channels, "out_channels", "Conv2d")
        groups = check_positive_int(groups, "groups", "Conv2d")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv2d: `groups` {groups} must divide in_channels {in_channels} "
                             f"and out_channels {out_channels}")
        kh, kw = _pair(kernel_size, "kernel_size", "Conv2d")
        self.stride, self.padding = _pair(stride, "stride", "Conv2d"), _pair(padding, "padding",
                                                                             "Conv2d")
        self.dilation, self.groups = _pair(dilation, "dilation", "Conv2d"), groups
        rng = as_rng(rng)
        k = 1.0 / math.sqrt(in_channels // groups * kh * kw)
        self.weight = Parameter(rng.uniform(-k, k, (out_channels, in_channels // groups, kh, kw)))
        self.bias = Parameter(rng.uniform(-k, k, out_channels)) if bias else None

    def forward(self, x):
        return ag.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                         self.groups)

    def extra_repr(self):
        o, c, kh, kw = self.weight.shape
        return (f"{c * self.groups}, {o}, kernel_size=({kh}, {kw}), stride={self.stride}, "
                f"padding={self.padding}, bias={self.bias is not None}")


def _pool(x, kernel_size, stride, padding, fill, where):
    """The kernel taps of a pooling window: a list of (N, C, OH, OW) strided slices, or the
    reshaped (N, C, OH, KH, OW, KW) array when the windows tile the input."""
    x = ag.as_tensor(x)
    if x.ndim != 4:
        raise ValueError(f"{where}: `x` must be 4-D (N, C, H, W), got shape {x.shape}")
    kh, kw = _pair(kernel_size, "kernel_size", where)
    sh, sw = (kh, kw) if stride is None else _pair(stride, "stride", where)
    ph, pw = _pair(padding, "padding", where)
    if min(kh, kw, sh, sw) < 1 or min(ph, pw) < 0 or ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"{where}: need kernel_size, stride >= 1 and 0 <= padding <= "
                         f"kernel_size / 2; got kernel_size={kernel_size!r}, stride={stride!r}, "
                         f"padding={padding!r}")
    n, c, h, w = x.shape
    if (sh, sw) == (kh, kw) and not (ph or pw) and h % kh == 0 and w % kw == 0:
        return ag.reshape(x, (n, c, h // kh, kh, w // kw, kw)), (3, 5)
    if ph or pw:
        x = ag.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), value=fill)
    h, w = x.shape[2:]
    if h < kh or w < kw:
        raise ValueError(f"{where}: the kernel ({kh}, {kw}) is larger than the padded input "
                         f"({h}, {w})")
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    taps = [x[:, :, p:p + sh * (oh - 1) + 1:sh, q:q + sw * (ow - 1) + 1:sw]
            for p in range(kh) for q in range(kw)]
    return ag.stack(taps, axis=-1), (4,)


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """Max pooling, as ``torch.nn.functional.max_pool2d`` (``stride`` defaults to
    ``kernel_size``; padding counts as -inf). Ties share the gradient equally."""
    windows, axes = _pool(x, kernel_size, stride, padding, -float("inf"), "max_pool2d")
    return ag.max(windows, axis=axes)


def avg_pool2d(x, kernel_size, stride=None, padding=0):
    """Average pooling, as ``torch.nn.functional.avg_pool2d`` with its defaults
    (``count_include_pad=True``: padded zeros count in the average)."""
    windows, axes = _pool(x, kernel_size, stride, padding, 0.0, "avg_pool2d")
    return ag.mean(windows, axis=axes)


def global_avg_pool2d(x):
    """The mean over H and W: (N, C, H, W) -> (N, C)."""
    return ag.mean(x, axis=(2, 3))


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x):
        return max_pool2d(x, self.kernel_size, self.stride, self.padding)


class AvgPool2d(MaxPool2d):
    def forward(self, x):
        return avg_pool2d(x, self.kernel_size, self.stride, self.padding)


class GlobalAvgPool2d(Module):
    def forward(self, x):
        return global_avg_pool2d(x)


def conv_norm(norm, channels, norm_kwargs):
    """A :class:`Norm` on the channel axis 1 of NCHW."""
    return Norm(norm, channels, feature_axis=1, **(norm_kwargs or {}))


class BasicBlock(Module):
    """ResNet's basic block with any registered ``norm`` (see the module docstring)."""

    def __init__(self, in_channels, out_channels, stride=1, *, norm="batch_norm",
                 norm_kwargs=None, rng=None):
        super().__init__()
        rng = as_rng(rng)
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride, 1, bias=False, rng=rng)
        self.norm1 = conv_norm(norm, out_channels, norm_kwargs)
        self.conv2 = Conv2d(out_channels, out_channels, 3, 1, 1, bias=False, rng=rng)
        self.norm2 = conv_norm(norm, out_channels, norm_kwargs)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = Sequential([
                Conv2d(in_channels, out_channels, 1, stride, bias=False, rng=rng),
                conv_norm(norm, out_channels, norm_kwargs)])
        else:
            self.shortcut = None

    def forward(self, x):
        y = relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return relu(y + (x if self.shortcut is None else self.shortcut(x)))


class SmallConvNet(Module):
    """A small ResNet-style classifier: a 3x3 stem (conv, norm, ReLU), one basic block per entry
    of ``widths`` (stride 2 from the second on), global average pooling, a linear head."""

    def __init__(self, in_channels=3, num_classes=10, widths=(8, 16), *, norm="batch_norm",
                 norm_kwargs=None, rng=None):
        super().__init__()
        rng = as_rng(rng)
        widths = tuple(check_positive_int(w, "widths", "SmallConvNet") for w in widths)
        if not widths:
            raise ValueError("SmallConvNet: `widths` must hold at least one width")
        self.stem = Conv2d(in_channels, widths[0], 3, 1, 1, bias=False, rng=rng)
        self.stem_norm = conv_norm(norm, widths[0], norm_kwargs)
        blocks, previous = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(previous, width, 1 if i == 0 else 2, norm=norm,
                                     norm_kwargs=norm_kwargs, rng=rng))
            previous = width
        self.blocks = Sequential(blocks)
        self.head = Linear(previous, num_classes, rng=rng)

    def forward(self, x):
        x = relu(self.stem_norm(self.stem(x)))
        return self.head(global_avg_pool2d(self.blocks(x)))
