"""Which elements share a statistic, and how a per-feature parameter lines up with ``x``.

The tolerance model and the catalogue of mistakes need two facts about a variant that the
registry records only indirectly:

* the **groups**: the sets of elements of ``x`` that share one mean and one ``rstd`` (a row for
  LayerNorm, a channel for BatchNorm, a (sample, group) pair for GroupNorm). They come from the
  record (``NormSpec.standardized_groups``: ``stats_groups`` or ``stats_axes``) and are checked
  against the size of the ``rstd`` the forward saves; RMSNorm, which does not standardize but
  keeps one ``rstd`` per row, has an entry in :data:`GROUPS`.
* the **broadcast** of a parameter such as ``weight`` against ``x``: PyTorch's conventions are
  either the trailing axes (LayerNorm, RMSNorm) or the channel axis 1 (BatchNorm, GroupNorm,
  InstanceNorm).

A variant for which neither is known still works: the tolerance model then falls back to its
normwise form (see ``docs/notes/tolerances.rst``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refnorm.registry import labels_from_axes

__all__ = ["Groups", "groups_of", "labels_from_axes", "param_view", "unbroadcast_sum", "GROUPS"]


@dataclass(frozen=True)
class Groups:
    """Group ids of the elements of an array of ``shape``: ``labels[i]`` in ``range(count)``."""

    labels: np.ndarray          # int64, the shape of x
    count: int                  # number of groups G
    sizes: np.ndarray           # (G,) elements per group

    @property
    def size(self) -> int:
        """The largest group size N (the reduction length of the statistics)."""
        return int(self.sizes.max()) if self.sizes.size else 0

    def sum(self, a) -> np.ndarray:
        """``(G,)`` sums of ``a`` (the shape of x) over each group, in float64."""
        return np.bincount(self.labels.ravel(), weights=np.asarray(a, np.float64).ravel(),
                           minlength=self.count)

    def mean(self, a) -> np.ndarray:
        return self.sum(a) / np.maximum(self.sizes, 1)

    def max(self, a) -> np.ndarray:
        out = np.full(self.count, -np.inf)
        np.maximum.at(out, self.labels.ravel(), np.asarray(a, np.float64).ravel())
        return out

    def spread(self, g) -> np.ndarray:
        """A per-group ``(G,)`` array spread back to the shape of x."""
        return np.asarray(g).ravel()[self.labels]


def _trailing_groups(sample):
    x = sample.arrays[0]
    ns = sample.kwargs.get("normalized_shape")
    if ns is None:
        return None
    nd = 1 if isinstance(ns, (int, np.integer)) else len(ns)
    return labels_from_axes(x.shape, tuple(range(x.ndim - nd, x.ndim)))


def _last_axis_groups(sample):
    """qk_norm: one rstd per head-dimension vector (the last axis), in its LayerNorm and RMS
    forms; None for the L2 form (which has a model of its own)."""
    if sample.kwargs.get("norm", "layer") not in ("layer", "rms"):
        return None
    x = sample.arrays[0]
    return labels_from_axes(x.shape, (x.ndim - 1,))


def _channel_groups_in_training(sample):
    """Per channel (every axis but 1) where batch statistics are used, else None."""
    if not sample.kwargs.get("training", False):
        return None
    x = sample.arrays[0]
    return labels_from_axes(x.shape, (0,) + tuple(range(2, x.ndim)))


def _instance_groups(sample):
    x = sample.arrays[0]
    return labels_from_axes(x.shape, tuple(range(2, x.ndim)))


def _channel_groups(sample):
    x = sample.arrays[0]
    return labels_from_axes(x.shape, (0,) + tuple(range(2, x.ndim)))


def _module_groups(module, name):
    """The groups a variant's own module computes (its ``oracle_groups_<name>``), imported on
    use: RN-B's and RN-L's (region, channel) groups need its mask."""
    def groups(sample):
        import importlib
        return getattr(importlib.import_module(module), name)(sample)
    return groups


#: Variants that do not standardize (so their record has no standardized groups) but share one
#: rstd per group, which the tolerance model needs: RMSNorm, one per row; qk_norm's RMS form,
#: one per head vector; LayerNorm Scaling (its output's variance is divided by the depth); Batch
#: Renormalization (its un-affine output r xhat + d is not standardized), one per channel in
#: training; alpha-BN (its mixed statistics do not standardize the batch), one per channel;
#: Switchable Norm, one per instance (its mixed statistics); RN-B and RN-L per (region,
#: channel), with the effective epsilon. ``name -> (sample -> (labels, G))``.
GROUPS = {"rms_norm": _trailing_groups, "qk_norm": _last_axis_groups,
          "layer_norm_scaling": _trailing_groups,
          "batch_renorm": _channel_groups_in_training,
          "alpha_bn": _channel_groups, "switchable_norm": _instance_groups,
          "region_norm_b": _module_groups("refnorm.norms.region_norm", "oracle_groups_b"),
          "region_norm_l": _module_groups("refnorm.norms.region_norm", "oracle_groups_l")}


def groups_of(spec, sample, cache=None) -> Groups | None:
    """The groups of ``spec`` on ``sample``, or None when they are unknown.

    When the forward's ``cache`` holds an ``rstd``, its size must equal the number of groups:
    a disagreement means the guess is wrong, and None is returned.
    """
    x = sample.arrays[0] if sample.arrays else None
    if not isinstance(x, np.ndarray):
        return None
    found = None
    if spec.name in GROUPS:
        found = GROUPS[spec.name](sample)
    else:
        try:
            found = spec.standardized_groups(sample)
        except Exception:  # noqa: BLE001 - a record's helper that cannot say means "unknown"
            found = None
    if found is None:
        return None
    labels, count = found
    rstd = getattr(cache, "rstd", None) if cache is not None else None
    if isinstance(rstd, np.ndarray) and rstd.size != count:
        return None
    sizes = np.bincount(labels.ravel(), minlength=count)
    return Groups(labels, count, sizes)


def param_view(p, x_shape, variant=None):
    """``p`` reshaped to broadcast against ``x_shape`` the PyTorch way, or None.

    The trailing axes (``weight`` of shape ``normalized_shape``), or the channel axis 1 (a
    ``(C,)`` parameter of BatchNorm, GroupNorm, InstanceNorm), as the record of ``variant``
    says (``NormSpec.param_layout``); without one, trailing is tried first, then channel.
    """
    if p is None:
        return None
    from refnorm.norms import BY_NAME

    p = np.asarray(p)
    spec = BY_NAME.get(variant)
    layout = spec.param_layout if spec is not None else None
    trailing = p.ndim <= len(x_shape) and tuple(x_shape[len(x_shape) - p.ndim:]) == p.shape
    channel = p.ndim == 1 and len(x_shape) >= 2 and x_shape[1] == p.shape[0]
    if trailing and layout != "channel":
        return p
    if channel and layout != "trailing":
        return p.reshape((1, p.shape[0]) + (1,) * (len(x_shape) - 2))
    return None


def unbroadcast_sum(a, view_shape, out_shape):
    """Sum ``a`` (shaped like x) over the axes along which a ``view_shape`` parameter spreads."""
    a = np.asarray(a, np.float64)
    lead = a.ndim - len(view_shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(view_shape)
                                      if n == 1 and a.shape[lead + i] != 1)
    return a.sum(axis=axes, keepdims=False).reshape(out_shape) if axes \
        else a.reshape(out_shape)
