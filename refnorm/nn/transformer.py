r"""A small decoder-only Transformer whose norm placement is a parameter.

With ``F`` the attention or MLP sub-layer and ``Norm`` any registered variant (``norm=``), a block
with 0-based index :math:`i` (:math:`\ell = i+1`) computes, for ``placement``:

* ``"post"`` (Vaswani et al. 2017): :math:`h = \mathrm{Norm}_1(x + \mathrm{Attn}(x))`,
  :math:`x' = \mathrm{Norm}_2(h + \mathrm{MLP}(h))`; the model has no final norm (fairseq's
  ``normalize_before=False``);
* ``"pre"`` (Xiong et al. 2020): :math:`h = x + \mathrm{Attn}(\mathrm{Norm}_1(x))`,
  :math:`x' = h + \mathrm{MLP}(\mathrm{Norm}_2(h))`, then a final norm before the head;
* ``"peri"`` (Kim et al. 2025, arXiv:2502.02732): :math:`h = x +
  \mathrm{Norm}^{out}_1(\mathrm{Attn}(\mathrm{Norm}_1(x)))`, :math:`x' = h +
  \mathrm{Norm}^{out}_2(\mathrm{MLP}(\mathrm{Norm}_2(h)))`: four norms per block, the output
  norm before the residual add (Gemma-2's layout); final norm; the embedding norm
  :math:`h_0 = \mathrm{Norm}(\mathrm{Embed}(t))` is optional (``embedding_norm``, off by
  default: whether the paper's runs used it is not settled);
* ``"mix"`` (Mix-LN, Li, Yin, Liu 2024, arXiv:2412.13795): Post-LN in the first
  :math:`P = \lfloor \text{mix\_ratio}\cdot L\rfloor` blocks, Pre-LN after (the official code's
  default ratio 0.25), and a final norm.

``depth_scaling=True`` is LayerNorm Scaling (Sun et al. 2025, "The Curse of Depth in LLMs",
arXiv:2502.05795): the output of each norm that feeds a sub-layer (the pre-norms; the input norms
of Peri-LN) is multiplied by :math:`1/\sqrt{\ell}`, :math:`\ell` 1-based, so the first block is
unscaled; the final norm and the embeddings are not scaled. As a function this is
:math:`\gamma \leftarrow \gamma/\sqrt{\ell}`; the optimizer dynamics differ.

The attention is multi-head, causal, with one (3d, d) input projection in the order q, k, v
(``torch.nn.MultiheadAttention``'s ``in_proj_weight``). Positions are a learned table.
"""
from __future__ import annotations

import math

import numpy as np

from refnorm import autograd as ag
from refnorm.nn.layers import (ACTIVATIONS, Embedding, Linear, Norm, as_rng,
                               check_positive_int)
from refnorm.nn.module import Module, ModuleList, Parameter

PLACEMENTS = ("post", "pre", "peri", "mix")


def causal_mask(length):
    """Boolean (length, length): True where query ``i`` may attend to key ``j <= i``."""
    return np.tril(np.ones((length, length), dtype=bool))


def additive_causal_mask(length, dtype=np.float64):
    """(length, length): 0 where query ``i`` may attend to key ``j <= i``, -inf elsewhere."""
    return np.where(causal_mask(length), 0.0, -np.inf).astype(dtype)


class CausalSelfAttention(Module):
    r"""Multi-head causal self-attention.

    .. math::

        [Q, K, V] = x W_{in}^T + b_{in},\quad
        A_h = \mathrm{softmax}\!\Bigl(\frac{Q_h K_h^T}{\sqrt{d_h}} + M\Bigr),\quad
        y = [A_1 V_1, \dots, A_H V_H]\, W_{out}^T + b_{out},

    :math:`M_{ij} = -\infty` for :math:`j > i` (0 elsewhere), added to the scores.
    ``in_features`` (default ``d_model``) is the width of the residual stream it reads and
    writes, which the Pre-CRMSNorm form narrows to ``d_model - 1`` (:mod:`refnorm.nn.convert`).
    """

    def __init__(self, d_model, n_heads, *, in_features=None, rng=None):
        super().__init__()
        rng = as_rng(rng)
        self.d_model = check_positive_int(d_model, "d_model", "CausalSelfAttention")
        self.n_heads = check_positive_int(n_heads, "n_heads", "CausalSelfAttention")
        if d_model % n_heads:
            raise ValueError(f"CausalSelfAttention: `n_heads` {n_heads} must divide `d_model` "
                             f"{d_model}")
        in_features = d_model if in_features is None else in_features
        self.qkv = Linear(in_features, 3 * d_model, rng=rng)
        self.out = Linear(d_model, in_features, rng=rng)

    def forward(self, x):
        b, t, _ = x.shape
        h, dh = self.n_heads, self.d_model // self.n_heads
        qkv = ag.transpose(ag.reshape(self.qkv(x), (b, t, 3, h, dh)), (2, 0, 3, 1, 4))
        q, k, v = qkv[0], qkv[1], qkv[2]                             # (B, H, T, dh) each
        scores = ag.matmul(q * (1.0 / math.sqrt(dh)), k.mT)          # (B, H, T, T)
        scores = scores + additive_causal_mask(t, scores.dtype)      # a constant: no gradient
        context = ag.matmul(ag.softmax(scores, axis=-1), v)          # (B, H, T, dh)
        context = ag.reshape(ag.transpose(context, (0, 2, 1, 3)), (b, t, self.d_model))
        return self.out(context)


class MLP(Module):
    """``fc2(activation(fc1(x)))``, hidden width ``d_ff``."""

    def __init__(self, d_model, d_ff, *, activation="relu", rng=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLP: `activation` must be one of {sorted(ACTIVATIONS)}, got "
                             f"{activation!r}")
        rng = as_rng(rng)
        self.activation = activation
        self.fc1 = Linear(d_model, d_ff, rng=rng)
        self.fc2 = Linear(d_ff, d_model, rng=rng)

    def forward(self, x):
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


def make_norm(norm, features, norm_kwargs):
    """A :class:`Norm` on the last axis of (batch, tokens, features)."""
    return Norm(norm, features, feature_axis=-1, **(norm_kwargs or {}))


class TransformerBlock(Module):
    """One block; ``placement`` in ``("post", "pre", "peri")`` (Mix-LN picks per block).

    ``scale`` multiplies the output of the norms that feed a sub-layer (LayerNorm Scaling).
    Sub-modules: ``norm1`` (attention side), ``attn``, ``norm2`` (MLP side), ``mlp``, and for
    Peri-LN ``norm1_out``, ``norm2_out``.
    """

    def __init__(self, d_model, n_heads, d_ff, *, placement="pre", norm="layer_norm",
                 norm_kwargs=None, activation="relu", scale=1.0, width=None, rng=None):
        super().__init__()
        if placement not in ("post", "pre", "peri"):
            raise ValueError(f"TransformerBlock: `placement` must be 'post', 'pre' or 'peri', "
                             f"got {placement!r}")
        if placement == "post" and scale != 1.0:
            raise ValueError("TransformerBlock: depth scaling multiplies a norm that feeds a "
                             "sub-layer; a Post-LN block has none")
        rng = as_rng(rng)
        width = d_model if width is None else width   # the residual stream's width
        self.placement, self.scale = placement, float(scale)
        self.norm1 = make_norm(norm, width, norm_kwargs)
        self.attn = CausalSelfAttention(d_model, n_heads, in_features=width, rng=rng)
        self.norm2 = make_norm(norm, width, norm_kwargs)
        self.mlp = MLP(width, d_ff, activation=activation, rng=rng)
        if placement == "peri":
            self.norm1_out = make_norm(norm, width, norm_kwargs)
            self.norm2_out = make_norm(norm, width, norm_kwargs)

    def _in(self, norm, x):
        y = norm(x)
        return y if self.scale == 1.0 else y * self.scale

    def forward(self, x):
        if self.placement == "post":
            h = self.norm1(x + self.attn(x))
            return self.norm2(h + self.mlp(h))
        if self.placement == "pre":
            h = x + self.attn(self._in(self.norm1, x))
            return h + self.mlp(self._in(self.norm2, h))
        h = x + self.norm1_out(self.attn(self._in(self.norm1, x)))
        return h + self.norm2_out(self.mlp(self._in(self.norm2, h)))

    def extra_repr(self):
        scale = "" if self.scale == 1.0 else f", scale={self.scale:.6g}"
        return f"placement={self.placement!r}{scale}"


class Transformer(Module):
    """Token and position embeddings, ``n_layers`` blocks, a final norm (all placements but
    ``"post"``), a linear head to ``vocab_size`` logits.

    Parameters
    ----------
    vocab_size, d_model, n_heads, n_layers, max_len : int
    d_ff : int, optional
        The MLP's hidden width (default ``4 * d_model``).
    placement : {"post", "pre", "peri", "mix"}
    norm : str
        Any registered variant with a ``layer_init`` (``"layer_norm"``, ``"rms_norm"``, ...).
    norm_kwargs : dict, optional
        Options of the norm's ``layer_init`` (``eps``, ...), the same for every norm.
    mix_ratio : float
        Mix-LN's fraction of Post-LN blocks: the first ``floor(mix_ratio * n_layers)``.
    depth_scaling : bool
        LayerNorm Scaling: the pre-norms of block :math:`\\ell` (1-based) times
        :math:`1/\\sqrt{\\ell}`.
    embedding_norm : bool
        Peri-LN's optional norm of the embeddings.
    activation : {"relu", "gelu_tanh"}
    width : int, optional
        The residual stream's width when it differs from ``d_model`` (Pre-CRMSNorm's
        ``d_model - 1``; see :mod:`refnorm.nn.convert`).
    emb_std : float
        Standard deviation of the embeddings' init (PyTorch's ``nn.Embedding``: 1).
    rng : Generator or int, optional
    """

    def __init__(self, vocab_size, d_model, n_heads, n_layers, max_len, *, d_ff=None,
                 placement="pre", norm="layer_norm", norm_kwargs=None, mix_ratio=0.25,
                 depth_scaling=False, embedding_norm=False, activation="relu", width=None,
                 emb_std=1.0, rng=None):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"Transformer: `placement` must be one of {PLACEMENTS}, got "
                             f"{placement!r}")
        if not 0.0 <= float(mix_ratio) <= 1.0:
            raise ValueError(f"Transformer: `mix_ratio` must lie in [0, 1], got {mix_ratio!r}")
        if placement == "post" and depth_scaling:
            raise ValueError("Transformer: depth_scaling scales the norms that feed a sub-layer; "
                             "Post-LN has none (use 'pre', 'peri' or 'mix')")
        rng = as_rng(rng)
        n_layers = check_positive_int(n_layers, "n_layers", "Transformer")
        d_ff = 4 * d_model if d_ff is None else d_ff
        width = d_model if width is None else width
        self.config = dict(vocab_size=vocab_size, d_model=d_model, n_heads=n_heads,
                           n_layers=n_layers, max_len=max_len, d_ff=d_ff, placement=placement,
                           norm=norm, norm_kwargs=dict(norm_kwargs or {}), mix_ratio=mix_ratio,
                           depth_scaling=depth_scaling, embedding_norm=embedding_norm,
                           activation=activation, width=width, emb_std=emb_std)
        self.tok = Embedding(vocab_size, width, std=emb_std, rng=rng)
        self.pos = Parameter(emb_std * rng.standard_normal((max_len, width)))
        if embedding_norm:
            self.emb_norm = make_norm(norm, width, norm_kwargs)
        n_post = math.floor(mix_ratio * n_layers) if placement == "mix" else 0
        blocks = []
        for i in range(n_layers):
            kind = placement if placement != "mix" else ("post" if i < n_post else "pre")
            scale = 1.0 / math.sqrt(i + 1) if depth_scaling and kind != "post" else 1.0
            blocks.append(TransformerBlock(d_model, n_heads, d_ff, placement=kind, norm=norm,
                                           norm_kwargs=norm_kwargs, activation=activation,
                                           scale=scale, width=width, rng=rng))
        self.blocks = ModuleList(blocks)
        if placement != "post":
            self.final_norm = make_norm(norm, width, norm_kwargs)
        self.head = Linear(width, vocab_size, rng=rng)

    @property
    def placements(self):
        """The placement of each block (Mix-LN: ``post`` then ``pre``)."""
        return [b.placement for b in self.blocks]

    def forward(self, tokens):
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"Transformer: `tokens` must be 2-D (batch, length), got shape "
                             f"{tokens.shape}")
        if tokens.shape[1] > self.pos.shape[0]:
            raise ValueError(f"Transformer: sequence length {tokens.shape[1]} exceeds max_len "
                             f"{self.pos.shape[0]}")
        x = self.tok(tokens) + self.pos[:tokens.shape[1]]
        if "emb_norm" in self._modules:
            x = self.emb_norm(x)
        for block in self.blocks:
            x = block(x)
        if "final_norm" in self._modules:
            x = self.final_norm(x)
        return self.head(x)
