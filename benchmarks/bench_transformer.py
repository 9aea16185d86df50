"""Forward + backward of a small Transformer: refnorm.nn against the same model in PyTorch CPU.

A Pre-LN model (2 layers, d_model 64, 4 heads, MLP 256, vocabulary 128) on a batch of 8
sequences of 32 tokens, cross-entropy loss, gradients of every parameter. PyTorch runs the same
weights (``torch.nn.TransformerEncoderLayer``, ``norm_first=True``, dropout 0, causal mask) on one
thread, and NumPy's BLAS on one thread too. The two are timed interleaved, repeat by repeat,
in one process, so that machine noise hits both alike; the script first checks that they agree.
Prints milliseconds per step (median and minimum) and the ratio refnorm / PyTorch;
``--profile`` adds cProfile's top entries.

    python benchmarks/bench_transformer.py [--dtype float64] [--repeats 30] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time

# one BLAS thread for NumPy too, as for PyTorch (set before NumPy loads OpenBLAS). On a shared
# machine a multi-threaded OpenBLAS can also be 30x slower on these small products.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

VOCAB, D, HEADS, FF, LAYERS, T, B = 128, 64, 4, 256, 2, 32, 8


def make_models(dtype):
    import torch

    import refnorm.nn as nn

    torch.set_num_threads(1)
    model = nn.Transformer(VOCAB, D, HEADS, LAYERS, T, d_ff=FF, placement="pre", rng=0)
    model.astype(dtype)
    tnn = torch.nn
    tdtype = getattr(torch, np.dtype(dtype).name)

    class TorchModel(tnn.Module):
        def __init__(self):
            super().__init__()
            self.tok = tnn.Embedding(VOCAB, D)
            self.pos = tnn.Parameter(torch.zeros(T, D))
            self.layers = tnn.ModuleList([
                tnn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True,
                                            norm_first=True) for _ in range(LAYERS)])
            self.final_norm = tnn.LayerNorm(D)
            self.head = tnn.Linear(D, VOCAB)
            self.register_buffer("mask", tnn.Transformer.generate_square_subsequent_mask(T))

        def forward(self, tokens):
            x = self.tok(tokens) + self.pos
            mask = self.mask.to(x.dtype)
            for layer in self.layers:
                x = layer(x, src_mask=mask, is_causal=True)
            return self.head(self.final_norm(x))

    tm = TorchModel().to(tdtype)
    names = {"tok.weight": "tok.weight", "pos": "pos", "head.weight": "head.weight",
             "head.bias": "head.bias", "final_norm.weight": "final_norm.weight",
             "final_norm.bias": "final_norm.bias"}
    for i in range(LAYERS):
        for ours, theirs in (("attn.qkv", "self_attn.in_proj_"),
                             ("attn.out", "self_attn.out_proj."),
                             ("mlp.fc1", "linear1."), ("mlp.fc2", "linear2."),
                             ("norm1", "norm1."), ("norm2", "norm2.")):
            for p in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{p}"] = f"layers.{i}.{theirs}{p}"
    theirs = dict(tm.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            theirs[names[name]].copy_(torch.from_numpy(p.data))
    return model, tm, names


def step_refnorm(model, tokens, targets):
    import refnorm.nn as nn
    model.zero_grad()
    loss = nn.cross_entropy(model(tokens), targets)
    loss.backward()
    return loss.item()


def step_torch(tm, tokens, targets):
    import torch
    tm.zero_grad()
    logits = tm(tokens)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
    loss.backward()
    return loss.item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    import torch

    model, tm, names = make_models(args.dtype)
    rng = np.random.default_rng(1)
    tokens, targets = rng.integers(0, VOCAB, (B, T)), rng.integers(0, VOCAB, (B, T))
    t_tokens, t_targets = torch.from_numpy(tokens), torch.from_numpy(targets)

    # the two compute the same thing
    loss, t_loss = step_refnorm(model, tokens, targets), step_torch(tm, t_tokens, t_targets)
    theirs = dict(tm.named_parameters())
    worst = max(np.abs(p.grad - theirs[names[n]].grad.numpy()).max()
                / np.abs(theirs[names[n]].grad.numpy()).max() for n, p in model.named_parameters())
    print(f"{args.dtype}: loss refnorm {loss:.10g}, torch {t_loss:.10g}; worst gradient "
          f"difference (max-abs relative to each gradient's max) {worst:.2e}")

    times = {"refnorm": [], "torch": []}
    for _ in range(3):  # warm-up
        step_refnorm(model, tokens, targets)
        step_torch(tm, t_tokens, t_targets)
    for _ in range(args.repeats):
        for name, fn, a, b in (("refnorm", step_refnorm, model, (tokens, targets)),
                               ("torch", step_torch, tm, (t_tokens, t_targets))):
            start = time.perf_counter()
            fn(a, *b)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    low = {k: min(v) * 1e3 for k, v in times.items()}
    print(f"forward+backward, batch {B} x {T} tokens, d_model {D}, {LAYERS} layers, "
          f"{args.repeats} repeats, torch {torch.__version__} on 1 thread")
    print(f"{'':10s}{'median ms':>12s}{'min ms':>10s}")
    for k in times:
        print(f"{k:10s}{med[k]:12.3f}{low[k]:10.3f}")
    print(f"ratio refnorm / torch: median {med['refnorm'] / med['torch']:.2f}x, "
          f"min {low['refnorm'] / low['torch']:.2f}x")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.repeats):
            step_refnorm(model, tokens, targets)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
