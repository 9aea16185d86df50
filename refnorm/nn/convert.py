r"""A Pre-LN Transformer into its Pre-RMSNorm and Pre-CRMSNorm forms (lossless).

Jiang, Gu, Zhu, Pan, *Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent and Efficient Pre-LN
Transformers*, NeurIPS 2023, arXiv:2305.14858; the construction of the official code
(ZixuanJiang/pre-rmsnorm-transformer).

**Pre-LN -> Pre-RMSNorm.** (1) Fold each LayerNorm's affine into the linear layer that reads it,
:math:`W(\gamma\odot\hat x + \beta) + b = (W\,\mathrm{diag}\,\gamma)\hat x + (W\beta + b)`: the
pre-attention norm into the QKV projection, the pre-MLP norm into the first MLP layer, the final
norm into the head (with LayerNorm Scaling's factor :math:`s`, the bias gets :math:`sW\beta`).
(2) Re-centre everything that writes into the residual stream with :math:`P = I - \tfrac1d
\mathbf 1\mathbf 1^T`: each token and position embedding minus its mean, the attention output
projection and the second MLP layer :math:`W \leftarrow PW`, :math:`b \leftarrow Pb`. The stream
is then zero-mean, where :math:`\mathrm{LN}(x) = \mathrm{RMS}(x)` exactly (same :math:`\epsilon`,
inside the square root), so (3) every LayerNorm becomes an RMSNorm without affine.

**Pre-RMSNorm -> Pre-CRMSNorm.** A zero-mean :math:`x \in \mathbb R^d` is stored without its
last coordinate, :math:`z = (x_1,\dots,x_{d-1})`: writers keep their first :math:`d-1` output
rows; readers :math:`W' = W_{:, :d-1} - W_{:, d-1}` (since :math:`x_d = -\sum_i z_i`); the norm
becomes CRMSNorm,

.. math:: \mathrm{CRMS}(z) = z \Big/ \sqrt{\bigl(\lVert z\rVert^2 + (\textstyle\sum_i z_i)^2
          \bigr)/d + \epsilon} .

The parameter maps are written with engine ops (:func:`pre_rmsnorm_parameters`,
:func:`pre_crmsnorm_parameters`), so they can be differentiated: the converted model, called with
the mapped parameters (:func:`refnorm.nn.functional_call`), is the same function of the original
parameters, with the same gradient (the training-time form of the official code, where the
re-centring is applied on the fly).
"""
from __future__ import annotations

from refnorm import autograd as ag
from refnorm.autograd import no_grad
from refnorm.nn.layers import Norm
from refnorm.nn.module import Module
from refnorm.nn.transformer import Transformer


def _check_pre_ln(model):
    if not isinstance(model, Transformer):
        raise TypeError(f"convert: `model` must be a refnorm.nn.Transformer, got "
                        f"{type(model).__name__}")
    cfg = model.config
    if cfg["placement"] != "pre" or cfg["norm"] != "layer_norm" or cfg["embedding_norm"]:
        raise ValueError(f"convert: `model` must be Pre-LN (placement 'pre', norm 'layer_norm', "
                         f"no embedding norm); got placement {cfg['placement']!r}, norm "
                         f"{cfg['norm']!r}, embedding_norm={cfg['embedding_norm']}")
    if cfg["width"] != cfg["d_model"]:
        raise ValueError("convert: `model` is already narrowed (width != d_model)")


def _eps(model):
    return model.config["norm_kwargs"].get("eps", 1e-5)


def _centre_rows(w):
    """Each row minus its mean (embedding tables: each vector re-centred)."""
    return w - ag.mean(w, axis=-1, keepdims=True)


def _centre_outputs(w):
    """:math:`P W` for a weight of shape (out, in), or :math:`P b` for a bias (out,)."""
    return w - ag.mean(w, axis=0, keepdims=True)


def _fold(linear_w, linear_b, gamma, beta, scale):
    r""":math:`W\,\mathrm{diag}\,\gamma` and :math:`b + sW\beta` (``gamma``/``beta`` None: 1/0)."""
    w = linear_w if gamma is None else linear_w * gamma
    b = linear_b if beta is None else linear_b + scale * ag.matmul(linear_w, beta)
    return w, b


def pre_rmsnorm_parameters(model, params=None):
    """The Pre-RMSNorm model's parameters, from a Pre-LN ``model``'s.

    ``params``: ``{name: Tensor or array}`` to use instead of the model's own (default: its
    Parameters). Returns ``{name: Tensor}`` for :func:`to_pre_rmsnorm`'s model, computed with
    engine ops (differentiable with respect to ``params``).
    """
    _check_pre_ln(model)
    p = {k: ag.as_tensor(v) for k, v in (params or dict(model.named_parameters())).items()}
    out = {"tok.weight": _centre_rows(p["tok.weight"]), "pos": _centre_rows(p["pos"])}
    for i, block in enumerate(model.blocks):
        pre = f"blocks.{i}."
        for norm, reader in (("norm1", "attn.qkv"), ("norm2", "mlp.fc1")):
            out[pre + reader + ".weight"], out[pre + reader + ".bias"] = _fold(
                p[pre + reader + ".weight"], p[pre + reader + ".bias"],
                p.get(pre + norm + ".weight"), p.get(pre + norm + ".bias"), block.scale)
        for writer in ("attn.out", "mlp.fc2"):
            for kind in ("weight", "bias"):
                out[pre + writer + "." + kind] = _centre_outputs(p[pre + writer + "." + kind])
    out["head.weight"], out["head.bias"] = _fold(p["head.weight"], p["head.bias"],
                                                 p.get("final_norm.weight"),
                                                 p.get("final_norm.bias"), 1.0)
    return out


def pre_crmsnorm_parameters(model, params=None):
    """The Pre-CRMSNorm model's parameters, from a Pre-LN ``model``'s (through the Pre-RMSNorm
    form): writers keep their first d-1 output rows, readers subtract their last input column.
    Engine ops, as :func:`pre_rmsnorm_parameters`."""
    rms = pre_rmsnorm_parameters(model, params)
    d = model.config["d_model"]
    keep = slice(0, d - 1)

    def reader(w):  # W[:, :d-1] - W[:, d-1:d]
        return w[:, keep] - w[:, d - 1:d]

    out = {"tok.weight": rms["tok.weight"][:, keep], "pos": rms["pos"][:, keep],
           "head.weight": reader(rms["head.weight"]), "head.bias": rms["head.bias"]}
    for i in range(len(model.blocks)):
        pre = f"blocks.{i}."
        for name in ("attn.qkv", "mlp.fc1"):
            out[pre + name + ".weight"] = reader(rms[pre + name + ".weight"])
            out[pre + name + ".bias"] = rms[pre + name + ".bias"]
        for name in ("attn.out", "mlp.fc2"):
            out[pre + name + ".weight"] = rms[pre + name + ".weight"][keep]
            out[pre + name + ".bias"] = rms[pre + name + ".bias"][keep]
    return out


def _converted(model, width, make_norm):
    cfg = dict(model.config)
    eps = _eps(model)
    cfg.update(norm="rms_norm", norm_kwargs=dict(eps=eps, elementwise_affine=False),
               width=width)
    new = Transformer(cfg.pop("vocab_size"), cfg.pop("d_model"), cfg.pop("n_heads"),
                      cfg.pop("n_layers"), cfg.pop("max_len"), **cfg)
    if make_norm is not None:
        for block in new.blocks:
            block.norm1, block.norm2 = make_norm(width, eps), make_norm(width, eps)
        new.final_norm = make_norm(width, eps)
    new.train(model.training)
    return new


def _load(new, tensors):
    new.load_state_dict({k: v.data for k, v in tensors.items()})
    return new


def to_pre_rmsnorm(model):
    """A new Transformer, the Pre-RMSNorm form of the Pre-LN ``model`` (RMSNorm without affine,
    the LayerNorms' eps inside the square root): the same function of the tokens."""
    _check_pre_ln(model)
    with no_grad():
        return _load(_converted(model, model.config["d_model"], None),
                     pre_rmsnorm_parameters(model))


def to_pre_crmsnorm(model):
    """A new Transformer, the Pre-CRMSNorm form of the Pre-LN ``model``: residual stream of width
    ``d_model - 1``, CRMSNorm layers (:func:`crms_layer`)."""
    _check_pre_ln(model)
    with no_grad():
        return _load(_converted(model, model.config["d_model"] - 1, crms_layer),
                     pre_crmsnorm_parameters(model))


# ----------------------------------------------------------------------------------------------
# ADAPTER POINT (CRMSNorm). The crms_norm record is written in another branch. When it is
# registered, the converted model uses it through the generic Norm layer; until then, the same
# math from the rms_norm record: CRMS(z) = C(RMS(D(z))), D appending -sum(z), C dropping the
# last coordinate. The options passed to Norm("crms_norm", ...) follow that record's
# layer_init(features, *, eps) as written on branch tvar1 (no parameters, no param_layout: the
# layer applies it to the last axis as given).
# ----------------------------------------------------------------------------------------------
def crms_layer(features, eps):
    """A CRMSNorm layer without affine on the last axis, of width ``features`` (= d - 1)."""
    from refnorm.norms import BY_NAME
    spec = BY_NAME.get("crms_norm")
    if spec is not None and spec.layer_init is not None:
        return Norm("crms_norm", features, feature_axis=-1, eps=eps)
    return CRMSNormFromRMS(features, eps)


class CRMSNormFromRMS(Module):
    r"""CRMSNorm (no affine) from the ``rms_norm`` record:
    :math:`\mathrm{CRMS}(z) = C(\mathrm{RMS}(D(z)))`, :math:`D(z) = (z, -\sum_i z_i)`,
    :math:`C` dropping the last coordinate; the gradient is rms_norm's hand-derived backward
    composed with the engine's for :math:`C` and :math:`D`."""

    def __init__(self, features, eps):
        super().__init__()
        self.features, self.eps = int(features), eps

    def forward(self, z):
        from refnorm.norms import BY_NAME
        x = ag.concatenate([z, -ag.sum(z, axis=-1, keepdims=True)], axis=-1)
        y = BY_NAME["rms_norm"].op(x, normalized_shape=(self.features + 1,), eps=self.eps)
        return y[..., :self.features]

    def extra_repr(self):
        return f"{self.features}, eps={self.eps}"


__all__ = ["pre_rmsnorm_parameters", "pre_crmsnorm_parameters", "to_pre_rmsnorm",
           "to_pre_crmsnorm", "crms_layer", "CRMSNormFromRMS"]
