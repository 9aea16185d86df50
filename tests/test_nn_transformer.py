"""refnorm.nn's Transformer: PyTorch parity (Post-LN and Pre-LN), training with every placement,
Mix-LN and LayerNorm Scaling wiring, and a gradient check of a whole model."""
import math

import numpy as np
import pytest

import refnorm.nn as nn
from refnorm.autograd import Tensor, no_grad
from refnorm.gradcheck import check_vjp
from refnorm.verify import normwise

VOCAB, D, HEADS, FF, T, B = 13, 16, 4, 24, 7, 3


def _torch_model(torch, model, norm_first):
    """The same model from torch.nn, with refnorm's weights copied in: embeddings, two
    ``TransformerEncoderLayer`` (dropout 0, causal mask), final LayerNorm (Pre-LN), head."""
    tnn = torch.nn

    class TorchModel(tnn.Module):
        def __init__(self):
            super().__init__()
            self.tok = tnn.Embedding(VOCAB, D)
            self.pos = tnn.Parameter(torch.zeros(T, D))
            self.layers = tnn.ModuleList([
                tnn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True,
                                            norm_first=norm_first) for _ in range(2)])
            self.final_norm = tnn.LayerNorm(D) if norm_first else None
            self.head = tnn.Linear(D, VOCAB)

        def forward(self, tokens):
            t = tokens.shape[1]
            x = self.tok(tokens) + self.pos[:t]
            mask = tnn.Transformer.generate_square_subsequent_mask(t, dtype=x.dtype)
            for layer in self.layers:
                x = layer(x, src_mask=mask, is_causal=True)
            if self.final_norm is not None:
                x = self.final_norm(x)
            return self.head(x)

    tm = TorchModel().double()
    names = {"tok.weight": "tok.weight", "pos": "pos", "head.weight": "head.weight",
             "head.bias": "head.bias"}
    if norm_first:
        names.update({"final_norm.weight": "final_norm.weight",
                      "final_norm.bias": "final_norm.bias"})
    for i in range(2):
        for ours, theirs in (("attn.qkv", "self_attn.in_proj_"), ("attn.out", "self_attn.out_proj."),
                             ("mlp.fc1", "linear1."), ("mlp.fc2", "linear2."),
                             ("norm1", "norm1."), ("norm2", "norm2.")):
            for p in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{p}"] = f"layers.{i}.{theirs}{p}"
    ours = dict(model.named_parameters())
    assert set(names) == set(ours), set(names) ^ set(ours)
    theirs = dict(tm.named_parameters())
    assert set(names.values()) == set(theirs)
    with torch.no_grad():
        for a, b in names.items():
            theirs[b].copy_(torch.from_numpy(ours[a].data))
    return tm, names


@pytest.mark.parametrize("placement", ["post", "pre"])
def test_matches_torch_transformer_encoder_layer(torch, placement):
    rng = np.random.default_rng(5)
    model = nn.Transformer(VOCAB, D, HEADS, 2, T, d_ff=FF, placement=placement, rng=rng)
    for p in model.parameters():  # move the norms' affine away from (1, 0)
        if p.ndim == 1:
            p.data = p.data + 0.3 * rng.standard_normal(p.shape)
    tm, names = _torch_model(torch, model, norm_first=placement == "pre")
    tokens = rng.integers(0, VOCAB, (B, T))
    targets = rng.integers(0, VOCAB, (B, T))

    logits = model(tokens)
    loss = nn.cross_entropy(logits, targets)
    loss.backward()
    t_logits = tm(torch.from_numpy(tokens))
    t_loss = torch.nn.functional.cross_entropy(t_logits.reshape(-1, VOCAB),
                                               torch.from_numpy(targets).reshape(-1))
    t_loss.backward()

    assert normwise(logits.data, t_logits.detach().numpy()) <= 1e-10
    assert abs(loss.item() - t_loss.item()) <= 1e-10 * abs(t_loss.item())
    t_params = dict(tm.named_parameters())
    for name, p in model.named_parameters():
        t_grad = t_params[names[name]].grad.numpy()
        assert np.abs(t_grad).max() > 0, name
        assert normwise(p.grad, t_grad) <= 1e-10, name
