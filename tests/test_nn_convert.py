"""Pre-LN -> Pre-RMSNorm -> Pre-CRMSNorm (Jiang et al. 2023): the same outputs, and the same
gradient with respect to the Pre-LN model's parameters, to 1e-12 relative."""
import numpy as np
import pytest

import refnorm.nn as nn
from refnorm.autograd import gradients
from refnorm.nn import convert
from refnorm.norms import BY_NAME
from refnorm.verify import normwise

CONVERSIONS = [("rms", convert.to_pre_rmsnorm, convert.pre_rmsnorm_parameters),
               ("crms", convert.to_pre_crmsnorm, convert.pre_crmsnorm_parameters)]


def _pre_ln(depth_scaling=False, seed=0):
    rng = np.random.default_rng(seed)
    model = nn.Transformer(11, 12, 3, 2, 6, d_ff=20, placement="pre", depth_scaling=depth_scaling,
                           rng=rng)
    for name, p in model.named_parameters():  # the norms' affine away from (1, 0)
        if "norm" in name:
            p.data = p.data + 0.5 * rng.standard_normal(p.shape)
    return model


@pytest.mark.parametrize("depth_scaling", [False, True], ids=["plain", "depth-scaled"])
@pytest.mark.parametrize("form,to_form,mapping", CONVERSIONS, ids=[c[0] for c in CONVERSIONS])
def test_converted_model_has_same_outputs_and_gradients(form, to_form, mapping, depth_scaling):
    model = _pre_ln(depth_scaling)
    rng = np.random.default_rng(1)
    tokens, targets = rng.integers(0, 11, (3, 6)), rng.integers(0, 11, (3, 6))
    names, params = zip(*model.named_parameters())

    logits = model(tokens)
    loss = nn.cross_entropy(logits, targets)
    grads = gradients(loss, params)

    converted = to_form(model)
    # the converted model, with its own (converted) parameters: same logits
    assert normwise(converted(tokens).data, logits.data) <= 1e-12
    # called with the mapped parameters as functions of the Pre-LN ones: same gradient
    mapped = mapping(model)
    logits2 = nn.functional_call(converted, mapped, tokens)
    grads2 = gradients(nn.cross_entropy(logits2, targets), params)
    assert normwise(logits2.data, logits.data) <= 1e-12
    for name, g, g2 in zip(names, grads, grads2):
        assert np.abs(g).max() > 0, name
        assert normwise(g2, g) <= 1e-12, name

    norms = [m for m in converted.modules() if isinstance(m, (nn.Norm, convert.CRMSNormFromRMS))]
    assert len(norms) == 5 and not any(m.parameters() for m in norms)
    if form == "crms":
        assert converted.config["width"] == 11
        assert converted.tok.weight.shape == (11, 11)
        expected = nn.Norm if "crms_norm" in BY_NAME else convert.CRMSNormFromRMS
        assert all(isinstance(m, expected) for m in norms)
    else:
        assert all(m.spec.name == "rms_norm" for m in norms)
        # the residual stream of the Pre-RMSNorm form is zero-mean
        x = converted.tok(tokens) + converted.pos[:6]
        assert np.abs(x.data.mean(axis=-1)).max() <= 1e-15 * np.abs(x.data).max()


def test_crms_fallback_is_crmsnorm_math():
    """The adapter's CRMSNorm against its definition, written directly:
    z / sqrt((||z||^2 + (sum z)^2) / d + eps)."""
    z = np.random.default_rng(2).standard_normal((4, 7))
    eps = 1e-5
    expected = z / np.sqrt(((z * z).sum(-1, keepdims=True) + z.sum(-1, keepdims=True) ** 2) / 8
                           + eps)
    y = convert.CRMSNormFromRMS(7, eps)(z).data
    assert normwise(y, expected) <= 1e-14
    y2 = convert.crms_layer(7, eps)(z).data
    assert normwise(y2, expected) <= 1e-14


def test_conversion_refuses_other_models():
    with pytest.raises(ValueError, match="must be Pre-LN"):
        convert.to_pre_rmsnorm(nn.Transformer(5, 8, 2, 1, 4, placement="post"))
    with pytest.raises(ValueError, match="must be Pre-LN"):
        convert.to_pre_rmsnorm(nn.Transformer(5, 8, 2, 1, 4, norm="rms_norm"))
    with pytest.raises(TypeError, match="refnorm.nn.Transformer"):
        convert.to_pre_crmsnorm(nn.Linear(2, 2))
