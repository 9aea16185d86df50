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
        for ours, theirs in (("attn.qkv", "self_attn.in_proj_"),
                             ("attn.out", "self_attn.out_proj."),
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


def _previous_token_batch(rng, vocab, length, batch):
    """A seeded synthetic task: predict the previous token (the first position: itself)."""
    tokens = rng.integers(0, vocab, (batch, length))
    return tokens, np.concatenate([tokens[:, :1], tokens[:, :-1]], axis=1)


@pytest.mark.parametrize("placement,options", [
    ("post", {}), ("pre", {}), ("peri", {}), ("mix", dict(mix_ratio=0.5)),
    ("pre", dict(depth_scaling=True))], ids=["post", "pre", "peri", "mix", "pre-depth-scaled"])
def test_training_with_adamw_halves_the_loss(placement, options):
    vocab, length = 8, 8
    rng = np.random.default_rng(0)
    model = nn.Transformer(vocab, 16, 2, 2, length, d_ff=32, placement=placement, rng=1,
                           **options)
    opt = nn.Optimizer(model.parameters(), "adamw", lr=1e-2)
    losses = []
    for step in range(200):
        tokens, targets = _previous_token_batch(rng, vocab, length, 16)
        model.zero_grad()
        loss = nn.cross_entropy(model(tokens), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if len(losses) >= 15 and np.mean(losses[-10:]) <= 0.5 * np.mean(losses[:5]):
            break
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    print(f"{placement} {options}: loss {first:.3f} -> {last:.3f} in {len(losses)} steps")
    assert last <= 0.5 * first


def test_mix_ln_puts_post_ln_in_the_first_floor_ratio_layers():
    model = nn.Transformer(5, 8, 2, 4, 4, placement="mix", mix_ratio=0.5)
    assert model.placements == ["post", "post", "pre", "pre"]
    assert nn.Transformer(5, 8, 2, 4, 4, placement="mix").placements == ["post"] + ["pre"] * 3
    assert nn.Transformer(5, 8, 2, 3, 4, placement="mix", mix_ratio=0.5).placements == \
        ["post", "pre", "pre"]
    assert "final_norm" in model._modules
    assert "final_norm" not in nn.Transformer(5, 8, 2, 2, 4, placement="post")._modules


def test_peri_ln_has_four_norms_per_block_and_optional_embedding_norm():
    model = nn.Transformer(5, 8, 2, 2, 4, placement="peri", embedding_norm=True)
    for block in model.blocks:
        norms = [n for n, m in block._modules.items() if isinstance(m, nn.Norm)]
        assert norms == ["norm1", "norm2", "norm1_out", "norm2_out"]
    assert "emb_norm" in model._modules


@pytest.mark.parametrize("placement", ["pre", "peri", "mix"])
def test_depth_scaling_equals_scaling_the_input_norms_affine(placement):
    """LayerNorm Scaling multiplies the output of block l's input norms by 1/sqrt(l) (1-based):
    as a function, the same as their weight and bias divided by sqrt(l)."""
    kw = dict(placement=placement, mix_ratio=0.5, rng=3)
    scaled = nn.Transformer(7, 8, 2, 3, 5, depth_scaling=True, **kw)
    plain = nn.Transformer(7, 8, 2, 3, 5, **kw)
    plain.load_state_dict(scaled.state_dict())
    for i, block in enumerate(plain.blocks):
        if block.placement == "post":
            assert scaled.blocks[i].scale == 1.0
            continue
        assert scaled.blocks[i].scale == 1.0 / math.sqrt(i + 1)
        for norm in (block.norm1, block.norm2):
            norm.weight.data = norm.weight.data / math.sqrt(i + 1)
            norm.bias.data = norm.bias.data / math.sqrt(i + 1)
    tokens = np.random.default_rng(0).integers(0, 7, (2, 5))
    assert normwise(scaled(tokens).data, plain(tokens).data) <= 1e-14
    with pytest.raises(ValueError, match="Post-LN has none"):
        nn.Transformer(7, 8, 2, 3, 5, placement="post", depth_scaling=True)


@pytest.mark.parametrize("placement", ["post", "peri"])
def test_gradcheck_of_a_small_model_with_random_upstream_gradient(placement):
    """Every parameter's gradient (engine + the norms' hand-derived backwards) against finite
    differences of the model's forward, projected on a random upstream gradient."""
    model = nn.Transformer(5, 8, 2, 2, 4, d_ff=8, placement=placement, norm="rms_norm",
                           norm_kwargs=dict(eps=1e-5), activation="gelu_tanh", rng=2)
    tokens = np.random.default_rng(1).integers(0, 5, (2, 4))
    names = [n for n, _ in model.named_parameters()]

    def f(*arrays):
        with no_grad():
            return nn.functional_call(model, dict(zip(names, arrays)), tokens).data

    def vjp(cotangents, *arrays):
        leaves = [Tensor(a, requires_grad=True) for a in arrays]
        out = nn.functional_call(model, dict(zip(names, leaves)), tokens)
        out.backward(cotangents[0])
        return [np.zeros_like(a) if t.grad is None else t.grad for a, t in zip(arrays, leaves)]

    arrays = [p.data for p in model.parameters()]
    report = check_vjp(f, vjp, arrays, mode="fast", rng=np.random.default_rng(3), rtol=1e-7,
                       n_projections=4)
    assert report, str(report)


def test_transformer_rejects_bad_configuration():
    with pytest.raises(ValueError, match="placement"):
        nn.Transformer(5, 8, 2, 2, 4, placement="sandwich")
    with pytest.raises(ValueError, match="n_heads"):
        nn.Transformer(5, 8, 3, 2, 4)
    with pytest.raises(ValueError, match="max_len"):
        nn.Transformer(5, 8, 2, 2, 4)(np.zeros((1, 6), dtype=int))
    with pytest.raises(ValueError, match="unknown variant"):
        nn.Transformer(5, 8, 2, 2, 4, norm="no_such_norm")
