"""Golden files for people without refnorm: docs/howto/golden_format.rst is enough to read them.

A golden directory is read by a script that imports only ``json``, ``numpy`` and the standard
library, in a separate interpreter, following only the document: it checks the schema, the
hashes and the embedded metadata, decodes the hyper-parameters (``normalized_shape`` tuples,
``momentum`` null, ``betas``), recomputes LayerNorm and BatchNorm outputs and running statistics
in NumPy and applies the documented pass rule, and replays the Adam trajectories. The script
asserts that no refnorm module was imported. Another test keeps the document complete: every key
and member prefix refnorm writes is documented, and the version matches.
"""
from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import pytest

from refnorm.oracle import goldens

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "howto" / "golden_format.rst"

READER = r'''
import hashlib, json, math, pathlib, sys
import numpy as np

d = pathlib.Path(sys.argv[1])


def decode(v):                                   # "Hyper-parameter encoding"
    if isinstance(v, list):
        return [decode(e) for e in v]
    if isinstance(v, dict):
        assert len(v) == 1, v
        (key, val), = v.items()
        if key == "tuple":
            return tuple(decode(e) for e in val)
        if key == "float" and val in ("nan", "inf", "-inf"):
            return float(val)
        if key == "int0d":
            return np.asarray(val, dtype=np.int64)
        raise ValueError(f"unknown encoding {v!r}")
    return v


def canonical(obj):                              # "Canonical JSON"
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def read(entry):
    data = (d / entry["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["file"]
    with np.load(d / entry["file"], allow_pickle=False) as z:
        arrays = {name: z[name] for name in z.files}
    meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
    assert meta == {k: v for k, v in entry.items() if k != "sha256"}
    assert set(arrays) == set(entry["arrays"])
    for name, info in entry["arrays"].items():
        assert list(arrays[name].shape) == info["shape"], name
        assert arrays[name].dtype.name == info["dtype"], name
    return arrays


BF16_MAX = 3.3895313892515355e38
FMAX = {"float32": 3.4028234663852886e38, "bfloat16": BF16_MAX, "float16": 65504.0,
        "float64": sys.float_info.max}


def passes(out, ref, tol, dtype):                # "The pass rule"
    out = np.asarray(out, np.float64)
    if out.shape != ref.shape:
        return False
    fr, fo = np.isfinite(ref), np.isfinite(out)
    both = fr & fo
    ok = np.ones(ref.shape, bool)
    with np.errstate(invalid="ignore"):
        ok[both] = np.abs(out[both] - ref[both]) <= tol[both]
    ok[np.isnan(ref)] = ~fo[np.isnan(ref)]
    inf = np.isinf(ref)
    ok[inf] = out[inf] == ref[inf]
    over = fr & ~fo
    ok[over] = (np.abs(ref[over]) >= FMAX[dtype]) & (out[over] == np.sign(ref[over]) * np.inf)
    return bool(np.all(ok))


manifest = json.loads((d / "manifest.json").read_text("utf-8"))
assert manifest["schema"] == "refnorm-goldens" and manifest["schema_version"] == 1
body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
assert hashlib.sha256(canonical(body)).hexdigest() == manifest["manifest_sha256"]

counts = {"layer_norm": 0, "batch_norm": 0, "running": 0, "tuples": 0, "null_momentum": 0,
          "unbiased_fails": 0, "adam_steps": 0}
for entry in manifest["cases"]:
    arrays = read(entry)
    kw = {k: decode(v) for k, v in entry["hyperparameters"].items()}
    kw.update({k[7:]: a.astype(np.float64) for k, a in arrays.items() if k.startswith("kwarg__")})
    x, w, b = [None if n in entry["absent"] else arrays["input__" + n].astype(np.float64)
               for n in entry["argnames"]]
    dtype = entry["dtype"]
    with np.errstate(all="ignore"):
        if entry["variant"] == "layer_norm":
            ns = kw["normalized_shape"]
            assert isinstance(ns, tuple)
            counts["tuples"] += 1
            axes = tuple(range(x.ndim - len(ns), x.ndim))
            mu = x.mean(axis=axes, keepdims=True)
            var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
            y = (x - mu) / np.sqrt(var + kw["eps"])
            w = w + kw.get("offset", 0.0) if w is not None else None   # kernel convention
            y = y * w if w is not None else y
            y = y + b if b is not None else y
            assert passes(y, arrays["ref__y"], arrays["tol__y"], dtype), entry["case"]
            n = math.prod(x.shape[a] for a in axes)
            if n > 1:   # the rule has teeth: an unbiased variance fails somewhere
                yu = (x - mu) / np.sqrt(var * n / (n - 1) + kw["eps"])
                yu = yu * w if w is not None else yu
                yu = yu + b if b is not None else yu
                counts["unbiased_fails"] += not passes(yu, arrays["ref__y"], arrays["tol__y"],
                                                       dtype)
            counts["layer_norm"] += 1
        elif entry["variant"] == "batch_norm":
            axes = (0,) + tuple(range(2, x.ndim))
            shape = [1, x.shape[1]] + [1] * (x.ndim - 2)
            rm, rv = kw.get("running_mean"), kw.get("running_var")
            if kw["training"] or rm is None:
                mu = x.mean(axis=axes, keepdims=True)
                var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
            else:
                mu, var = rm.reshape(shape), rv.reshape(shape)
            y = (x - mu) / np.sqrt(var + kw["eps"])
            y = y * w.reshape(shape) if w is not None else y
            y = y + b.reshape(shape) if b is not None else y
            assert passes(y, arrays["ref__y"], arrays["tol__y"], dtype), entry["case"]
            if kw["training"] and rm is not None:
                t = int(kw["num_batches_tracked"]) + 1
                assert int(arrays["exact__num_batches_tracked"]) == t
                f = 1.0 / t if kw["momentum"] is None else kw["momentum"]
                counts["null_momentum"] += kw["momentum"] is None
                m = math.prod(x.shape[a] for a in axes)
                new_rm = (1 - f) * rm + f * mu.ravel()
                new_rv = (1 - f) * rv + f * var.ravel() * m / (m - 1)
                assert passes(new_rm, arrays["ref__running_mean"], arrays["tol__running_mean"],
                              dtype), entry["case"]
                assert passes(new_rv, arrays["ref__running_var"], arrays["tol__running_var"],
                              dtype), entry["case"]
                counts["running"] += 1
            counts["batch_norm"] += 1

for entry in manifest["trajectories"]:
    assert entry["kind"] == "optimizer"
    arrays = read(entry)
    if entry["name"] != "adam":
        continue
    h = {k: decode(v) for k, v in entry["hyperparameters"].items()}
    beta1, beta2 = h["betas"]                     # a tuple
    n = len(entry["params"])
    p = [arrays[f"initial_params__{i}"] for i in range(n)]
    m = [np.zeros_like(a) for a in p]
    v = [np.zeros_like(a) for a in p]
    vmax = [np.zeros_like(a) for a in p]
    scale = [np.max(np.abs(a)) for a in p]
    for t in range(1, entry["steps"] + 1):        # torch.optim.Adam, coupled L2
        lr = float(arrays["lr"][t - 1])
        for i in range(n):
            g = arrays[f"grads__{i}"][t - 1] + h["weight_decay"] * p[i]
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            vmax[i] = np.maximum(vmax[i], v[i]) if h["amsgrad"] else v[i]
            denom = np.sqrt(vmax[i]) / math.sqrt(1 - beta2 ** t) + h["eps"]
            p[i] = p[i] - lr / (1 - beta1 ** t) * m[i] / denom
            golden = arrays[f"params__{i}"][t - 1]
            scale[i] = max(scale[i], np.max(np.abs(golden)))
            assert np.max(np.abs(p[i] - golden)) <= 16 * 2.0 ** -52 * scale[i], (entry["id"], t)
            counts["adam_steps"] += 1

assert not [m for m in sys.modules if m == "refnorm" or m.startswith("refnorm.")]
print(json.dumps(counts))
'''


@pytest.fixture(scope="module")
def golden_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("golden_format") / "g"
    goldens.export(path, ["layer_norm", "batch_norm"], ("float32", "bfloat16"), size="ci",
                   optimizers=["adam", "sgdp"])
    return path


def test_a_golden_directory_is_read_with_json_and_numpy_alone(golden_dir, tmp_path):
    script = tmp_path / "reader.py"
    script.write_text(READER)
    # -I: isolated, neither the working directory nor PYTHONPATH on sys.path
    out = subprocess.run([sys.executable, "-I", str(script), str(golden_dir)], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    counts = json.loads(out.stdout)
    manifest = json.loads((golden_dir / "manifest.json").read_text())
    by_variant = {v: sum(c["variant"] == v for c in manifest["cases"])
                  for v in ("layer_norm", "batch_norm")}
    assert counts["layer_norm"] == by_variant["layer_norm"] > 20
    assert counts["batch_norm"] == by_variant["batch_norm"] > 20
    assert counts["tuples"] == counts["layer_norm"]
    assert counts["running"] > 10 and counts["null_momentum"] > 0
    assert counts["unbiased_fails"] > 0
    assert counts["adam_steps"] == 2 * 20 * 4          # two settings, 20 steps, 4 parameters


def _documented():
    text = DOC.read_text()
    return text, set(re.findall(r"``([A-Za-z_0-9]+)(?:__<[a-z]+>)*``", text))


def test_the_document_covers_every_key_and_its_version(golden_dir):
    text, names = _documented()
    match = re.search(r"\*\*Schema version: (\d+)\*\*", text)
    assert match and int(match.group(1)) == goldens.SCHEMA_VERSION
    assert f'``"schema_version": {goldens.SCHEMA_VERSION}``' in text
    manifest = json.loads((golden_dir / "manifest.json").read_text())
    keys = set(manifest)
    for entry in manifest["cases"] + manifest["trajectories"]:
        keys |= set(entry)
        for member in entry["arrays"]:
            prefix = member.split("__")[0]
            keys.add(prefix)
    for s in manifest["skipped"]:
        keys |= set(s)
    keys |= set(manifest["tolerance"])
    missing = sorted(k for k in keys if k not in names)
    assert not missing, f"keys written but not documented in {DOC.name}: {missing}"
    # every encoding the writer can produce is documented
    for encoding in ('"tuple"', '"float": "nan"', '"float": "inf"', '"float": "-inf"',
                     '"int0d"'):
        assert encoding in text, encoding


@pytest.mark.parametrize("value, encoded", [
    ((7, 13), {"tuple": [7, 13]}), (float("nan"), {"float": "nan"}),
    (float("-inf"), {"float": "-inf"}), (None, None), ([1, (2, 3)], [1, {"tuple": [2, 3]}])])
def test_the_encoding_is_the_documented_one(value, encoded):
    from refnorm.oracle._goldfiles import _decode, _encode

    assert _encode(value) == encoded
    back = _decode(encoded)
    assert repr(back) == repr(value)
