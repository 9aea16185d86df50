"""The golden oracle (refnorm.oracle): its teeth.

* No false alarms: PyTorch CPU's float32 and bfloat16 BatchNorm, LayerNorm, GroupNorm,
  InstanceNorm, RMSNorm and LocalResponseNorm pass, forward and backward, on every case; so do
  refnorm's own NumPy low-precision implementation and the JAX adapter.
* Every mistake caught: each entry of the catalogue fails, in float32 and bfloat16, and the
  report names it.
* Same seed, same files: golden export and reports are bit-identical across runs.
* Safe golden files: tampering, pickles, paths outside the directory and a wrong schema
  version are rejected with a clear error, and nothing is executed.
"""
from __future__ import annotations

import json
import os
import shutil
import zipfile

import numpy as np
import pytest

from refnorm.cli import main
from refnorm.norms import ALL_SPECS, BY_NAME
from refnorm.oracle import (MISTAKES, Report, check, generate, get_format, goldens, round_to,
                            student, ulp)
from refnorm.oracle.core import _prepared_cases
from refnorm.oracle.formats import FORMATS, representable
from refnorm.oracle.mistakes import KINDS
from refnorm.oracle.tolerance import bounds, growth
from refnorm.testing import assert_matches_reference

# no floating-point warning may escape the oracle, whatever a candidate returns
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

#: the variants the issue requires PyTorch to pass on (float32 and bfloat16, every case)
REQUIRED_TORCH = ("batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm",
                  "local_response_norm")
#: cases where PyTorch's own result is wrong and the oracle rightly says so: weight_norm of a
#: 1e-20 weight gives an infinite dv in float32 arithmetic (||v||^3 underflows), where the
#: exact answer (-4.4e19) is representable and refnorm's scaled norm computes it in float32
# Real PyTorch CPU findings, not false alarms (docs/notes/tolerances.rst): on tiny and subnormal
# weights its weight and spectral norms square or divide in the candidate dtype and return
# inf/NaN where the exact result is finite (or, for spectral norm's dweight of 2.8e39 in float32,
# +inf rather than NaN).
KNOWN_TORCH_FINDINGS = {
    "weight_norm": {"oracle:(6,33)-tiny-scale", "regime:subnormal (5,4)-linear"},
    "spectral_norm": {"regime:subnormal (5,4)-linear"},
    # sigma_reparam's official code normalizes with F.normalize in the candidate dtype: the same
    # underflow makes sigma 0 (inf/NaN where the exact result overflows or is 0 at bfloat16)
    "sigma_reparam": {"regime:subnormal (5,4)-linear-svd"},
}
TORCH_VARIANTS = [s.name for s in ALL_SPECS if s.torch_call is not None]


# ----------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------
def test_round_to_bfloat16_exact_ties_subnormals_overflow():
    x = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -30, -0.0, np.inf, -np.inf,
                  3.3895313892515355e38, 3.4e38, 2.0 ** -133, 2.0 ** -134, 1e-45])
    r = round_to(x, "bfloat16")
    assert r[0] == 1.0 and r[1] == 1 + 4 * 2 ** -8       # ties to even
    assert r[2] == 1 + 2 ** -7                           # no double rounding through float32
    assert np.signbit(r[3]) and r[4] == np.inf and r[5] == -np.inf
    assert r[6] == 3.3895313892515355e38 and r[7] == np.inf
    assert r[8] == 2.0 ** -133 and r[9] == 0.0 and r[10] == 0.0  # subnormal spacing 2^-133
    assert np.isnan(round_to(np.array([np.nan]), "bf16"))[0]
    rng = np.random.default_rng(0)
    y = rng.standard_normal(10000) * 10.0 ** rng.integers(-40, 38, 10000)
    for name in FORMATS:
        once = round_to(y, name)
        assert representable(once, name) and np.array_equal(round_to(once, name), once)
        fmt = get_format(name)
        finite = np.isfinite(once) & (np.abs(y) >= fmt.tiny)
        assert np.all(np.abs(once - y)[finite] <= fmt.u * np.abs(y)[finite])


def test_round_to_bfloat16_matches_ml_dtypes(jax):
    import ml_dtypes  # installed with jax

    rng = np.random.default_rng(1)
    x = (rng.standard_normal(100000) * 10.0 ** rng.integers(-45, 38, 100000)).astype(np.float32)
    ref = x.astype(ml_dtypes.bfloat16).astype(np.float64)   # exact from float32 values
    assert np.array_equal(round_to(x.astype(np.float64), "bfloat16"), ref, equal_nan=True)


def test_ulp():
    assert ulp(1.0, "bfloat16") == 2.0 ** -7 and ulp(1.0, "float32") == 2.0 ** -23
    assert ulp(1.5, "float16") == 2.0 ** -10 and ulp(0.0, "float32") == 2.0 ** -149
    assert ulp(1e-40, "float32") == 2.0 ** -149 and ulp(3.0, "float64") == 2.0 ** -51
    assert growth(1) == 1 and growth(64) == 64 and growth(65536) == 8 * 256


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name)
def test_cases_are_deterministic_representable_and_cover_the_regimes(spec):
    cases, skipped = generate(spec, "bfloat16", seed=3, size="ci")
    again, _ = generate(spec, "bfloat16", seed=3, size="ci")
    assert [c.name for c in cases] == [c.name for c in again]
    for a, b in zip(cases, again):
        assert all(np.array_equal(x, y, equal_nan=True)
                   for x, y in zip(a.inputs.values(), b.inputs.values()))
        assert np.array_equal(a.dy, b.dy)
        for arr in list(a.inputs.values()) + [a.dy]:
            assert arr.dtype == np.float64 and representable(arr, "bfloat16")
    names = {c.name for c in cases} | {s.name for s in skipped}
    assert any(n.startswith("regime:mean1e4-std1e-3") for n in names)
    assert any(n.startswith("regime:subnormal") for n in names)
    assert any(n.startswith("regime:nan") for n in names)
    for s in skipped:
        assert s.reason


def test_layer_norm_cases_have_the_shapes_kernels_get_wrong():
    cases, _ = generate(BY_NAME["layer_norm"], "float32", size="full")
    widths = {c.inputs["x"].shape[-1] for c in cases}
    assert 65536 in widths and 1 in widths                  # long rows, one-element rows
    assert any(w % 2 and w % 8 for w in widths if w > 1)    # odd, not a multiple of 8
    assert {"regime:constant-groups", "regime:tiny-scale", "regime:huge-scale"} <= \
        {c.name.split(" ")[0] for c in cases}


def test_candidate_sees_bit_identical_inputs():
    seen = []

    def candidate(variant, inputs, dy, kwargs, *, dtype):
        for a in list(inputs.values()) + [dy]:
            seen.append(representable(a, dtype))
        return student(variant, inputs, dy, kwargs, dtype=dtype)

    assert check(candidate, "layer_norm", dtype="bfloat16", size="ci")
    assert seen and all(seen)


# ----------------------------------------------------------------------------------------------
# No false alarms
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torch_threads():
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)  # one per xdist worker, a worker per core (conftest.py)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", TORCH_VARIANTS)
def test_no_false_alarms_torch_cpu(variant, dtype, torch, torch_threads):
    report = check("torch", variant, dtype=dtype, size="full")
    assert report.results, report.format()
    failing = {r.case for r in report.failures()}
    allowed = KNOWN_TORCH_FINDINGS.get(variant, set()) if variant not in REQUIRED_TORCH else set()
    assert failing <= allowed, report.format()
    # every output and gradient was compared on every case that ran; PyTorch declines some
    # (CPU LRN of 4-D bfloat16 input: "avg_pool3d not implemented"): skipped, with the reason
    ran = [r for r in report.results if r.status != "skipped"]
    assert len(ran) >= len(report.results) / 2
    for r in ran:
        assert "y" in r.outputs and any(k.startswith("d") for k in r.outputs), r
    for r in report.results:
        if r.status == "skipped":
            assert "not implemented" in r.message


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
def test_no_false_alarms_numpy_student(dtype):
    report = check(student, dtype=dtype, size="ci")
    assert report.passed, report.format()
    assert set(report.variants) == set(student.variants) & set(BY_NAME)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_emulated_correct_kernel_is_within_the_model(dtype):
    """Self-consistency: refnorm's algorithm in float32, rounded to the dtype, passes."""
    for spec in ALL_SPECS:
        preps, _ = _prepared_cases(spec, dtype, 0, "ci", False)
        for p in preps:
            if p.emulated is None:
                continue
            for key, emu in p.emulated.items():
                from refnorm.oracle.report import compare_outputs
                o = compare_outputs(key, p.ref.outputs[key], emu, p.bounds[key], dtype, p.groups)
                assert o.passed, f"{spec.name} {p.case.name}: {o.describe()}"


# ----------------------------------------------------------------------------------------------
# Every mistake caught, and named
# ----------------------------------------------------------------------------------------------
#: per variant, the classic mistakes (kinds of refnorm.oracle.mistakes.KINDS) the catalogue
#: must hold: the assignments grader maps a wrong student output to one of these by name
REQUIRED_KINDS = {
    "layer_norm": {"unbiased-variance", "eps-outside-sqrt", "missing-mean-term",
                   "missing-xhat-term", "wrong-axis", "dweight-not-summed", "dweight-averaged",
                   "dweight-uses-x", "params-swapped", "dx-sign", "float16-inputs",
                   "float16-accumulation", "one-pass-variance", "reduction-fault"},
    "batch_norm": {"unbiased-variance", "eps-outside-sqrt", "missing-mean-term",
                   "missing-xhat-term", "wrong-axis", "dweight-not-summed", "dweight-averaged",
                   "dweight-uses-x", "params-swapped", "dx-sign", "float16-inputs",
                   "running-variance-biased", "running-momentum-convention", "reduction-fault"},
    "group_norm": {"unbiased-variance", "eps-outside-sqrt", "missing-mean-term",
                   "missing-xhat-term", "wrong-axis", "group-split", "dweight-not-summed",
                   "dweight-averaged", "params-swapped", "dx-sign", "float16-inputs",
                   "reduction-fault"},
    "rms_norm": {"rms-centred", "eps-outside-sqrt", "missing-xhat-term", "wrong-axis",
                 "dweight-not-summed", "dweight-averaged", "dx-sign", "float16-inputs",
                 "float16-accumulation", "reduction-fault"},
    "instance_norm": {"unbiased-variance", "eps-outside-sqrt", "missing-mean-term",
                      "missing-xhat-term", "wrong-axis", "dweight-not-summed",
                      "dweight-averaged", "params-swapped", "dx-sign", "float16-inputs",
                      "running-variance-biased", "running-momentum-convention",
                      "reduction-fault"},
}
VISIBLE = [(m, d) for m in MISTAKES for d in ("float32", "bfloat16") if d not in m.invisible_in]


def test_the_catalogue_has_the_required_mistakes():
    names = {m.name for m in MISTAKES}
    assert {"unbiased variance", "eps outside the sqrt", "missing mean term in dx",
            "missing xhat term in dx", "wrong reduction axis",
            "dweight not summed over the batch", "biased running variance",
            "float16 accumulation of a long row", "off-by-one group split"} <= names
    for variant, kinds in REQUIRED_KINDS.items():
        have = {m.kind for m in MISTAKES if m.variant == variant}
        assert kinds <= have, (variant, kinds - have)
    assert len({m.id for m in MISTAKES}) == len(MISTAKES)          # ids are unique
    assert {m.kind for m in MISTAKES} <= set(KINDS)
    # one name per kind, whatever the variant (the grader's vocabulary), but for wrong-axis
    # (group_norm's wrong axis is the channel-to-group interleaving) and float16 accumulation
    for kind in KINDS:
        named = {m.name for m in MISTAKES if m.kind == kind}
        assert len(named) <= 1 or kind in ("wrong-axis", "float16-accumulation"), named
    # every mistake is seen in float32; only the documented ones are not in bfloat16; but for
    # the casting-mode mistakes: every casting mode computes in float32 for float32 input
    assert all("float32" not in m.invisible_in or m.kind.startswith("casting-")
               for m in MISTAKES)


@pytest.mark.parametrize("mistake, dtype", VISIBLE,
                         ids=[f"{m.variant}:{m.name}-{d}" for m, d in VISIBLE])
def test_every_mistake_is_caught_and_named(mistake, dtype):
    """The whole catalogue, diagnosed by name: each wrong candidate fails and the report names
    its own mistake first (and ``report.matched`` gives its id, for a grader)."""
    assert mistake.variant in BY_NAME, f"{mistake.id}: {mistake.variant} is not registered"
    strict = dtype in mistake.strict_only
    report = check(mistake, mistake.variant, dtype=dtype, size="ci", strict=strict)
    assert not report.passed, f"{mistake.id} passed in {dtype}"
    diagnosis = report.diagnoses.get(mistake.variant, "")
    assert diagnosis.startswith("matches: " + mistake.name), (diagnosis, report.format())
    assert report.matched[mistake.variant][0] == mistake.id
    assert mistake.name in report.format()


@pytest.mark.parametrize("mistake, dtype", [(m, d) for m in MISTAKES for d in m.invisible_in
                                            if d in ("float32", "bfloat16")])
def test_an_invisible_mistake_really_changes_nothing(mistake, dtype):
    """A mistake left out of a dtype above is left out because it is right there (strict)."""
    assert check(mistake, mistake.variant, dtype=dtype, size="ci", strict=True)


def _racing(variant):
    """A kernel whose y and dx are right and whose dweight/dbias pick up a stale partial sum
    (garbage left in an uninitialized buffer) when there are more than 4 rows to reduce:
    nondeterministic, so no catalogue entry can reproduce it."""
    noise = np.random.default_rng()

    def candidate(v, inputs, dy, kwargs, *, dtype):
        out = student(v, inputs, dy, kwargs, dtype=dtype)
        rows = inputs["x"].size // max(inputs["weight"].size, 1) \
            if inputs.get("weight") is not None else 0
        if rows > 4:
            for k in ("dweight", "dbias"):
                if k in out:
                    stale = noise.standard_normal(out[k].shape)
                    out[k] = out[k] + stale * (1 + np.abs(out[k]))
        return out

    candidate.variants = (variant,)
    return candidate


@pytest.mark.parametrize("variant", ["layer_norm", "batch_norm", "group_norm"])
def test_a_reduction_fault_is_named_from_its_pattern(variant):
    """y and dx right, dweight/dbias wrong on some cases only: named as the reduction-fault
    class although nothing reproduces its (random) numbers."""
    report = check(_racing(variant), variant, dtype="float32", size="ci")
    failing = report.failures()
    assert failing and len(failing) < len(report.results)            # some cases only
    assert all({o.name for o in r.failing()} <= {"dweight", "dbias"} for r in failing)
    diagnosis = report.diagnoses[variant]
    assert diagnosis.startswith("matches: dweight/dbias cross-row reduction fault"), diagnosis
    assert "uninitialized, racing" in diagnosis and f"of {len(report.results)} cases" in diagnosis
    assert report.matched[variant] == [f"{variant}:dweight/dbias cross-row reduction fault"]


def test_a_wrong_dx_is_not_called_a_reduction_fault():
    """The pattern needs y and dx right: a candidate whose dx is also off is not named so."""
    base = _racing("layer_norm")

    def candidate(v, inputs, dy, kwargs, *, dtype):
        out = base(v, inputs, dy, kwargs, dtype=dtype)
        out["dx"] = out["dx"] * 1.01
        return out

    candidate.variants = ("layer_norm",)
    report = check(candidate, "layer_norm", dtype="float32", size="ci")
    assert not report.passed
    assert "reduction fault" not in report.diagnoses["layer_norm"]


# ----------------------------------------------------------------------------------------------
# check(), the Report, refnorm.testing
# ----------------------------------------------------------------------------------------------
def test_report_is_bool_like_printable_and_detailed():
    good = check(student, "layer_norm", dtype="bfloat16", size="ci")
    assert isinstance(good, Report) and bool(good) and good.passed
    text = str(good)
    assert "layer_norm" in text and "ULP" in text and "tol ULP" in text and "PASS" in text
    r = good.results[0]
    assert r.case and r.dtype == "bfloat16"
    y = r.outputs["y"]
    assert y.passed and y.index is not None and y.max_abs >= 0 and y.tol_ulp > 0
    bad = check(MISTAKES[0], "layer_norm", dtype="bfloat16", size="ci")
    assert not bad and bad.failures()
    o = bad.failures()[0].failing()[0]
    assert o.worst_ulp > o.tol_ulp or o.budget > 1
    assert "out of tolerance" in bad.format() and "matches: unbiased variance" in bad.format()
    data = json.loads(bad.to_json())
    assert data["passed"] is False and data["results"][0]["outputs"]["y"]["index"] is not None


def test_reports_are_deterministic():
    a = check(MISTAKES[2], "layer_norm", dtype="bfloat16", size="ci", seed=5)
    b = check(MISTAKES[2], "layer_norm", dtype="bfloat16", size="ci", seed=5)
    assert a.to_json() == b.to_json() and a.format() == b.format()
    c = check(MISTAKES[2], "layer_norm", dtype="bfloat16", size="ci", seed=6)
    assert c.to_json() != a.to_json()


def test_candidate_errors_shapes_and_unsupported_cases():
    def raises(variant, inputs, dy, kwargs, *, dtype):
        raise RuntimeError("kernel launch failed")

    def skips(variant, inputs, dy, kwargs, *, dtype):
        raise NotImplementedError("only 2-D")

    def wrong_shape(variant, inputs, dy, kwargs, *, dtype):
        out = student(variant, inputs, dy, kwargs, dtype=dtype)
        out["dweight"] = np.zeros(3)
        return out

    r = check(raises, "layer_norm", size="ci")
    assert not r and r.results[0].status == "error" and "kernel launch failed" in r.format()
    r = check(skips, "layer_norm", size="ci")
    assert all(x.status == "skipped" for x in r.results) and "only 2-D" in r.results[0].message
    r = check(wrong_shape, "layer_norm", size="ci")
    assert not r and r.failures()[0].outputs["dweight"].status == "shape"
    with pytest.raises(ValueError, match="unknown variant"):
        check(student, "no_such_norm")


def test_assert_matches_reference():
    rep = assert_matches_reference(student, "group_norm", dtype="bfloat16")
    assert rep.passed
    mistake = next(m for m in MISTAKES if m.name == "off-by-one group split")
    with pytest.raises(AssertionError, match="matches: off-by-one group split"):
        assert_matches_reference(mistake, "group_norm", dtype="float32")


def test_torch_function_adapter_checks_a_kernel(torch):
    """The path of an engineer with a kernel: a PyTorch function with refnorm's signature."""
    from refnorm.oracle import torch_function

    def good_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        dims = tuple(range(-len(normalized_shape), 0))
        xf = x.float()
        mu = xf.mean(dims, keepdim=True)
        var = ((xf - mu) ** 2).mean(dims, keepdim=True)
        y = (xf - mu) * torch.rsqrt(var + eps)
        y = y * weight.float() if weight is not None else y
        y = y + bias.float() if bias is not None else y
        return y.to(x.dtype)

    def unbiased_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        dims = tuple(range(-len(normalized_shape), 0))
        xf = x.float()
        xc = xf - xf.mean(dims, keepdim=True)
        n = xc[..., :].numel() // max(xc.sum(dims).numel(), 1)
        y = xc * torch.rsqrt((xc * xc).sum(dims, keepdim=True) / (n - 1) + eps)   # N-1: wrong
        y = y * weight.float() if weight is not None else y
        y = y + bias.float() if bias is not None else y
        return y.to(x.dtype)

    assert check(torch_function(good_layer_norm), "layer_norm", dtype="bfloat16", size="ci")
    bad = check(torch_function(unbiased_layer_norm), "layer_norm", dtype="bfloat16", size="ci")
    assert not bad and bad.diagnoses["layer_norm"].startswith("matches: unbiased variance")


def test_strict_mode_is_stricter(torch, torch_threads):
    """PyTorch CPU holds bfloat16 parameter-gradient partial sums in bfloat16: fine by
    default, a failure under strict=True (float32 accumulation everywhere)."""
    lenient = check("torch", "layer_norm", dtype="bfloat16", size="ci")
    strict = check("torch", "layer_norm", dtype="bfloat16", size="ci", strict=True)
    assert lenient.passed and not strict.passed


# ----------------------------------------------------------------------------------------------
# Golden files
# ----------------------------------------------------------------------------------------------
def _export(path, seed=0, variants=("layer_norm", "batch_norm"), dtypes=("bfloat16", "float32")):
    return goldens.export(path, list(variants), dtypes, seed=seed, size="ci")


def _tree(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_goldens_same_seed_same_files(tmp_path):
    _export(tmp_path / "a")
    _export(tmp_path / "b")
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 10 and a == b
    _export(tmp_path / "c", seed=1)
    assert _tree(tmp_path / "c")["manifest.json"] != a["manifest.json"]


@pytest.fixture(scope="module")
def golden_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("goldens") / "g"
    _export(path, variants=("layer_norm", "batch_norm"), dtypes=("bfloat16",))
    return path


def test_goldens_roundtrip(golden_dir):
    manifest = json.loads((golden_dir / "manifest.json").read_text())
    assert manifest["schema_version"] == goldens.SCHEMA_VERSION and manifest["seed"] == 0
    assert manifest["refnorm_version"] and manifest["cases"]
    entry = manifest["cases"][0]
    assert {"file", "sha256", "variant", "dtype", "case", "hyperparameters",
            "arrays"} <= set(entry)
    with np.load(golden_dir / entry["file"], allow_pickle=False) as z:
        keys = set(z.files)
    assert {"input__x", "dy", "ref__y", "ref__dx", "ref__mean", "ref__rstd", "tol__y"} <= keys
    assert goldens.verify(golden_dir).ok
    loaded = goldens.load(golden_dir)
    assert len(loaded) == len(manifest["cases"])
    report = check(student, cases=loaded)
    assert report.passed and len(report.results) == len(loaded)
    bad = check(next(m for m in MISTAKES if m.name == "biased running variance"), cases=loaded)
    assert not bad.passed


def _copy(golden_dir, tmp_path):
    dst = tmp_path / "g"
    shutil.copytree(golden_dir, dst)
    return dst


def _rewrite_manifest(path, edit, rehash=True):
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    if rehash:
        body = {k: v for k, v in m.items() if k != "manifest_sha256"}
        m["manifest_sha256"] = goldens._sha256(goldens._canonical(body))
    (path / "manifest.json").write_text(json.dumps(m))
    return m


def test_goldens_reject_a_tampered_array(golden_dir, tmp_path):
    g = _copy(golden_dir, tmp_path)
    f = g / json.loads((g / "manifest.json").read_text())["cases"][0]["file"]
    data = bytearray(f.read_bytes())
    data[-200] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(goldens.GoldenError, match="SHA-256 mismatch"):
        goldens.load(g)
    assert main(["goldens", "verify", str(g)]) == 2


def test_goldens_reject_a_tampered_manifest(golden_dir, tmp_path):
    g = _copy(golden_dir, tmp_path)

    def edit(m):
        m["cases"][0]["hyperparameters"]["eps"] = 0.5
    _rewrite_manifest(g, edit, rehash=False)
    with pytest.raises(goldens.GoldenError, match="manifest was modified"):
        goldens.load(g)
    g2 = _copy(golden_dir, tmp_path / "2")
    _rewrite_manifest(g2, edit, rehash=True)   # a consistent forgery still disagrees with the file
    with pytest.raises(goldens.GoldenError, match="embedded metadata disagrees"):
        goldens.load(g2)


def test_goldens_reject_a_tampered_hash(golden_dir, tmp_path):
    g = _copy(golden_dir, tmp_path)

    def edit(m):
        m["cases"][1]["sha256"] = "0" * 64
    _rewrite_manifest(g, edit)
    with pytest.raises(goldens.GoldenError, match="SHA-256 mismatch"):
        goldens.load(g)


class _Evil:
    path = None

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_goldens_reject_a_pickle_and_execute_nothing(golden_dir, tmp_path):
    g = _copy(golden_dir, tmp_path)
    m = json.loads((g / "manifest.json").read_text())
    f = g / m["cases"][0]["file"]
    marker = tmp_path / "pwned"
    _Evil.path = str(marker)
    evil = np.empty(1, dtype=object)
    evil[0] = _Evil()
    import io
    buf = io.BytesIO()
    np.lib.format.write_array(buf, evil, allow_pickle=True)
    with zipfile.ZipFile(f, "a") as zf:
        zf.writestr("evil.npy", buf.getvalue())

    def edit(m):
        m["cases"][0]["sha256"] = goldens._sha256(f.read_bytes())   # a consistent forgery
    _rewrite_manifest(g, edit)
    with pytest.raises(goldens.GoldenError, match="pickled object"):
        goldens.load(g)
    assert main(["goldens", "verify", str(g)]) == 2
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../x.npz", "/etc/passwd", "sub/../../x.npz", "a/b.npz",
                                  "..\\x.npz", "manifest.json"])
def test_goldens_reject_paths_outside_the_directory(golden_dir, tmp_path, name):
    g = _copy(golden_dir, tmp_path)
    (tmp_path / "x.npz").write_bytes((g / json.loads((g / "manifest.json").read_text())
                                      ["cases"][0]["file"]).read_bytes())

    def edit(m):
        m["cases"][0]["file"] = name
    _rewrite_manifest(g, edit)
    with pytest.raises(goldens.GoldenError, match="outside the golden directory|absolute path"):
        goldens.load(g)


def test_goldens_reject_a_symlink_out(golden_dir, tmp_path):
    g = _copy(golden_dir, tmp_path)
    m = json.loads((g / "manifest.json").read_text())
    f = g / m["cases"][0]["file"]
    outside = tmp_path / "outside.npz"
    outside.write_bytes(f.read_bytes())
    f.unlink()
    f.symlink_to(outside)
    with pytest.raises(goldens.GoldenError, match="outside the golden directory"):
        goldens.load(g)


def test_goldens_reject_a_wrong_schema_version(golden_dir, tmp_path):
    g = _copy(golden_dir, tmp_path)

    def edit(m):
        m["schema_version"] = goldens.SCHEMA_VERSION + 1
    _rewrite_manifest(g, edit)
    with pytest.raises(goldens.GoldenError, match="schema version 2; this refnorm reads "
                                                  "version 1"):
        goldens.load(g)


def test_goldens_export_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(goldens.GoldenError, match="not empty"):
        _export(tmp_path, variants=("layer_norm",), dtypes=("float32",))


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------
def test_cli_compare_torch(tmp_path, capsys, torch, torch_threads):
    out_json, out_txt = tmp_path / "r.json", tmp_path / "r.txt"
    rc = main(["compare", "--impl", "torch", "--variant", "layer_norm", "rms_norm",
               "--dtype", "bfloat16", "--size", "ci", "--progress", "--json", str(out_json),
               "--report", str(out_txt)])
    captured = capsys.readouterr()
    assert rc == 0, captured.out
    assert "layer_norm:" in captured.out and "rms_norm:" in captured.out
    assert "worst case" in captured.out and "ALL PASSED" in captured.out
    assert "compare bfloat16 [" in captured.err                       # the progress bar
    data = json.loads(out_json.read_text())
    assert data[0]["passed"] and data[0]["dtype"] == "bfloat16"
    assert "layer_norm" in out_txt.read_text()


def test_cli_compare_module_function_fails_and_names_the_mistake(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_kernels.py").write_text(
        "from refnorm.oracle.mistakes import student\n"
        "def layer_norm(variant, inputs, dy, kwargs, *, dtype):\n"
        "    return student(variant, inputs, dy, kwargs, dtype=dtype, drop_mean_term=True)\n"
        "layer_norm.variants = ('layer_norm',)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rc = main(["compare", "--impl", "my_kernels:layer_norm", "--dtype", "float32", "bfloat16",
               "--size", "ci", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "matches: missing mean term in dx" in out and "FAIL" in out
    assert "no equivalent in the candidate" in out                    # the other variants


def test_cli_errors_exit_2(capsys, torch):
    assert main(["compare", "--impl", "torch", "--variant", "no_such_norm"]) == 2
    assert main(["compare", "--impl", "no_such_module_xyz:f"]) == 2
    assert main(["compare", "--impl", "notamodulefunction"]) == 2
    if not torch.cuda.is_available():
        assert main(["compare", "--impl", "torch", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_cli_goldens_export_verify_and_compare(tmp_path, capsys):
    d = tmp_path / "g"
    assert main(["goldens", "export", str(d), "--variant", "group_norm", "--dtype", "float32",
                 "--size", "ci", "--no-progress"]) == 0
    assert main(["goldens", "verify", str(d), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "hashes and schema verified" in out and "OK" in out
    assert main(["goldens", "export", str(d), "--variant", "group_norm"]) == 2   # not empty
    assert main(["compare", "--impl", "refnorm.oracle.mistakes:student", "--goldens", str(d),
                 "--no-progress"]) == 0


def test_gpu_script_is_ready():
    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "gpu_oracle.sh")
    text = open(path).read()
    assert "--impl torch --device" in text and "DEVICE:-cuda" in text
    assert "--dtype float32 float16 bfloat16" in text and "--report" in text
    if shutil.which("bash"):
        import subprocess
        assert subprocess.run(["bash", "-n", path]).returncode == 0


# ----------------------------------------------------------------------------------------------
# JAX
# ----------------------------------------------------------------------------------------------
def test_jax_adapter(jax):
    """A few cases per variant (JAX compiles every shape once: the full set takes minutes)."""
    from refnorm.oracle.adapters import JaxAdapter

    adapter = JaxAdapter()
    picked = []
    for name in ("layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm"):
        cases, _ = generate(BY_NAME[name], "bfloat16", size="ci")
        picked += [c for c in cases if c.name.startswith(("sample:", "regime:subnormal",
                                                          "regime:mean1e3"))][:3]
    report = check(adapter, cases=picked)
    assert report.passed, report.format()
    assert set(report.variants) == {"layer_norm", "rms_norm", "group_norm", "batch_norm",
                                    "instance_norm"}
    # XLA flushes subnormals: without ftz the oracle says so
    sub = [c for c in generate(BY_NAME["layer_norm"], "float32", size="ci")[0]
           if c.name.startswith("regime:subnormal")]
    strict_ieee = check(adapter, cases=sub, ftz=False)
    assert not strict_ieee.passed
    assert "flushes subnormal numbers to zero" in strict_ieee.diagnoses["layer_norm"]


def test_bounds_explain_which_model():
    spec = BY_NAME["layer_norm"]
    case = generate(spec, "bfloat16", size="ci")[0][0]
    from refnorm.oracle.reference import compute
    b, how = bounds(spec, case, compute(spec, case), explain=True)
    assert how["y"] == "itemized" and b["y"].shape == case.inputs["x"].shape
    assert np.all(b["y"] > 0)


def test_a_candidate_that_declines_every_case_does_not_pass():
    def declines(variant, inputs, dy, kwargs, *, dtype):
        raise NotImplementedError("this kernel has no float32 path")

    report = check(declines, "layer_norm", dtype="float32", size="ci")
    assert not report
    text = str(report)
    assert "nothing was compared" in text and "this kernel has no float32 path" in text



def test_the_known_torch_findings_are_the_adapters_labels():
    from refnorm.oracle.adapters import KNOWN_TORCH_BEHAVIOUR

    assert {(v, c) for v, cs in KNOWN_TORCH_FINDINGS.items() for c in cs} == \
        set(KNOWN_TORCH_BEHAVIOUR)


# ----------------------------------------------------------------------------------------------
# Kernels as they are in the wild (issue 18): frozen weights, backwards that write into their
# inputs, hostile outputs
# ----------------------------------------------------------------------------------------------
def _torch_rms_kernel(torch, *, write_dy):
    """A frozen-weight RMSNorm as fine-tuning libraries write it: its backward returns None for
    the weight and, with ``write_dy``, writes dx into the buffer of dy to save memory."""

    class RMSNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps):
            xf = x.float()
            rstd = torch.rsqrt((xf * xf).mean(-1, keepdim=True) + eps)
            ctx.save_for_backward(x, weight, rstd)
            return (xf * rstd * weight.float()).to(x.dtype)

        @staticmethod
        def backward(ctx, dy):
            x, weight, rstd = ctx.saved_tensors
            g = dy.float() * weight.float()
            xhat = x.float() * rstd
            dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
            if write_dy:
                dy.copy_(dx.to(dy.dtype))
                return dy, None, None
            return dx.to(x.dtype), None, None

    def rms_norm(x, normalized_shape, weight=None, eps=None, eps_placement="inside"):
        if weight is None or eps_placement != "inside" or isinstance(normalized_shape, int) \
                or len(normalized_shape) != 1:
            raise NotImplementedError("last axis, with a weight, eps inside the root")
        return RMSNorm.apply(x, weight, torch.finfo(x.dtype).eps if eps is None else eps)

    return rms_norm


def _numpy_frozen_rms(variant, inputs, dy, kwargs, *, dtype):
    """refnorm's NumPy student without the weight gradient (a frozen weight)."""
    out = student(variant, inputs, dy, kwargs, dtype=dtype)
    out.pop("dweight", None)
    return out


_numpy_frozen_rms.variants = ("rms_norm",)


def test_a_frozen_weight_kernel_passes_when_declared(torch, torch_threads):
    from refnorm.oracle import torch_function

    kernel = _torch_rms_kernel(torch, write_dy=False)
    undeclared = check(torch_function(kernel), "rms_norm", dtype="bfloat16", size="ci")
    assert not undeclared
    text = undeclared.format()
    assert "dweight: missing from the candidate's outputs" in text
    assert "--frozen weight" in text and "frozen=('weight',)" in text
    assert "reduction fault" not in text            # not a mistake of the catalogue
    declared = check(torch_function(kernel, frozen=("weight",)), "rms_norm", dtype="bfloat16",
                     size="ci")
    assert declared, declared.format()
    assert "dweight: not computed (frozen)" in declared.format()
    assert all(r.outputs["dweight"].status == "frozen" for r in declared.results
               if r.status == "pass")
    assert declared.residual["rms_norm"][1].passed      # a correct kernel in x + f(x)
    # y and dx are still judged: a wrong dx fails though the weight is frozen
    wrong = check(lambda *a, **k: {**_numpy_frozen_rms(*a, **k), "dx": 0 * a[1]["x"]},
                  "rms_norm", size="ci", frozen="weight")
    assert not wrong and any(r.outputs["dx"].status == "FAIL" for r in wrong.failures())


def test_a_frozen_numpy_candidate_declares_it_by_attribute_or_option(tmp_path, monkeypatch,
                                                                      capsys):
    assert not check(_numpy_frozen_rms, "rms_norm", size="ci")
    assert check(_numpy_frozen_rms, "rms_norm", size="ci", frozen=("weight",))

    def declared(*a, **k):
        return _numpy_frozen_rms(*a, **k)

    declared.frozen, declared.variants = ("weight",), ("rms_norm",)
    assert check(declared, "rms_norm", size="ci")
    with pytest.raises(ValueError, match="frozen: 'wieght' is not a differentiable input"):
        check(_numpy_frozen_rms, "rms_norm", size="ci", frozen=("wieght",))
    (tmp_path / "lora_kernels.py").write_text(
        "from refnorm.oracle.mistakes import student\n"
        "def rms(variant, inputs, dy, kwargs, *, dtype):\n"
        "    out = student(variant, inputs, dy, kwargs, dtype=dtype)\n"
        "    out.pop('dweight', None)\n"
        "    return out\n"
        "rms.variants = ('rms_norm',)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["compare", "--impl", "lora_kernels:rms", "--size", "ci", "--no-progress"]
    assert main(args) == 1
    assert "--frozen weight" in capsys.readouterr().out
    assert main(args + ["--frozen", "weight"]) == 0
    assert "not computed (frozen)" in capsys.readouterr().out


def test_a_backward_that_writes_into_dy_fails_and_shows_the_residual_error(torch, torch_threads):
    from refnorm.oracle import torch_function

    kernel = _torch_rms_kernel(torch, write_dy=True)
    report = check(torch_function(kernel, frozen="weight"), "rms_norm", dtype="float32",
                   size="ci")
    assert not report
    text = report.format()
    assert report.diagnoses["rms_norm"].startswith(
        "backward wrote into dy in place; where dy is shared (a residual add passes the same "
        "gradient to both branches), this corrupts the other branch's gradient")
    assert all("dy" in r.writes for r in report.results if r.status != "skipped")
    assert "wrote into dy in place" in text
    # its outputs are right: only the write fails it...
    assert all(o.passed for r in report.results for o in r.outputs.values())
    # ...and inside x + f(x) the consequence shows: dx is far off
    case, res = report.residual["rms_norm"]
    assert not res.passed and res.max_abs > 0.1 and res.budget > 100
    assert f"residual block x + f(x), {case}: dx" in text and "[FAIL]" in text
    # the same kernel without the write passes in the residual block (the check has teeth)
    good = check(torch_function(_torch_rms_kernel(torch, write_dy=False), frozen="weight"),
                 "rms_norm", dtype="float32", size="ci")
    assert good and good.residual["rms_norm"][1].max_abs < 1e-3 * res.max_abs


def _writer(target):
    def candidate(variant, inputs, dy, kwargs, *, dtype):
        out = student(variant, inputs, dy, kwargs, dtype=dtype)       # right outputs...
        a = dy if target == "dy" else kwargs.get(target, inputs.get(target))
        a *= 2.0                                                       # ...and a write
        return out

    candidate.variants = ("layer_norm", "batch_norm")
    return candidate


@pytest.mark.parametrize("variant, target", [("layer_norm", "x"), ("layer_norm", "weight"),
                                             ("layer_norm", "dy"), ("batch_norm", "bias"),
                                             ("batch_norm", "running_mean")])
def test_a_candidate_that_writes_into_its_inputs_fails_and_is_named(variant, target):
    spec = BY_NAME[variant]
    preps, _ = _prepared_cases(spec, "float32", 0, "ci", False)
    before = [({k: a.copy() for k, a in p.case.inputs.items()}, p.case.dy.copy(),
               {k: v.copy() for k, v in p.case.kwargs.items() if isinstance(v, np.ndarray)},
               {k: v.copy() for k, v in p.ref.outputs.items()}) for p in preps]
    report = check(_writer(target), variant, dtype="float32", size="ci")
    assert not report
    written = [r for r in report.results if target in r.writes]
    assert written and all(r.status == "FAIL" for r in written)
    assert f"wrote into {target} in place" in report.format()
    assert target in report.diagnoses[variant]
    # the reference's own inputs, and its answers, are untouched
    again, _ = _prepared_cases(spec, "float32", 0, "ci", False)
    assert again is preps
    for p, (inputs, dy, kwargs, outputs) in zip(preps, before):
        for k, a in inputs.items():
            assert np.array_equal(p.case.inputs[k], a, equal_nan=True)
        assert np.array_equal(p.case.dy, dy, equal_nan=True)
        for k, a in kwargs.items():
            assert np.array_equal(p.case.kwargs[k], a, equal_nan=True)
        for k, a in outputs.items():
            assert np.array_equal(p.ref.outputs[k], a, equal_nan=True)


_HOSTILE = {
    "inf": lambda a: np.full_like(a, np.inf),
    "nan": lambda a: np.full_like(a, np.nan),
    "1e300": lambda a: np.full_like(a, 1e300),
    "-1e300": lambda a: np.full_like(a, -1e300),
    "wrong shape": lambda a: np.zeros(a.shape + (2,)),
    "scalar": lambda a: 1e300,
    "empty": lambda a: np.array([]),
    "int64": lambda a: (a * 1e6).astype(np.int64),
    "bool": lambda a: a > 0,
    "float16 overflow": lambda a: (a * 1e30).astype(np.float16),
    "complex": lambda a: a.astype(np.complex128),
    "strings": lambda a: np.full(a.shape, "x"),
    "objects": lambda a: np.array([object()] * a.size, dtype=object),
    "None": lambda a: None,
    "ragged list": lambda a: [[1.0], [1.0, 2.0]],
    "Python list": lambda a: a.tolist(),          # a valid way to return the right values
}
@pytest.mark.parametrize("kind", list(_HOSTILE))
def test_hostile_candidates_get_a_well_formed_report(kind, recwarn):
    def hostile(variant, inputs, dy, kwargs, *, dtype):
        out = student(variant, inputs, dy, kwargs, dtype=dtype)
        return {k: _HOSTILE[kind](np.asarray(v, dtype=np.float64)) for k, v in out.items()}

    hostile.variants = ("layer_norm", "batch_norm")
    for dtype in ("bfloat16", "float32"):
        report = check(hostile, dtype=dtype, size="ci")
        text = report.format()
        json.loads(report.to_json())
        assert bool(report) == (kind == "Python list"), text
        rows, start = 0, None
        for line in text.splitlines():
            if line.startswith("  output "):          # the columns start where ULP's 9 do
                start = line.index(" ULP ") + 4 - 9
                continue
            if start is None or not line.startswith("  ") or line.startswith("   ") or \
                    "not computed (frozen)" in line or line[2:].split()[0] in (
                        "residual", "diagnosis:", "failures:", "skipped:", "note:", "bound"):
                start = None if not line.startswith("  ") else start
                continue
            rest = line[start:]
            cols = [rest[0:9], rest[9:18], rest[18:26], rest[26:35], rest[35:45], rest[45:55]]
            assert line[2:start].strip() and line[start - 1] == " ", line
            assert all(c[0] == " " and c.strip() and " " not in c.strip() for c in cols), line
            assert rest[55:57] == "  " and rest[57] != " ", line
            rows += 1
        assert rows, text
    assert not [w for w in recwarn.list], [str(w.message) for w in recwarn.list]


def test_huge_ratios_print_compactly():
    from refnorm.oracle.report import OutputResult, _budget, _num

    assert _budget(OutputResult("y", "FAIL", budget=1.481005056956499e71)) == ">1e6x"
    assert _budget(OutputResult("y", "FAIL", budget=float("inf"))) == ">1e6x"
    assert _budget(OutputResult("y", "FAIL", budget=3.5)) == "350%"
    assert _budget(OutputResult("y", "FAIL", budget=12345.0)) == "12345x"
    for v in (1.48e71, 1e300, 1.7976931348623157e308, 12345.678, 0.000123):
        assert len(_num(v)) <= 8, _num(v)


def test_counts_add_up():
    def declines_long_rows(variant, inputs, dy, kwargs, *, dtype):
        if inputs["x"].size > 10000:
            raise NotImplementedError("rows longer than 10000")
        return student(variant, inputs, dy, kwargs, dtype=dtype)

    declines_long_rows.variants = ("local_response_norm", "layer_norm")
    report = check(declines_long_rows, size="ci")
    for v in report.variants:
        s = report.summary(v)
        assert s["cases"] == s["pass"] + s["fail"] + s["skipped"], s
        assert any(r.status == "skipped" for r in report.results if r.variant == v)
        line = next(x for x in report.format().splitlines() if x.startswith(f"{v}:"))
        assert line.startswith(f"{v}: {s['cases']} cases, {s['pass']} pass, 0 fail, "
                               f"{s['skipped']} skipped")


def test_the_wider_type_note_is_said_once_per_variant():
    def float64_kernel(variant, inputs, dy, kwargs, *, dtype):        # ignores the dtype
        return student(variant, inputs, dy, kwargs, dtype="float64", drop_mean_term=True)

    float64_kernel.variants = ("layer_norm",)
    text = check(float64_kernel, "layer_norm", dtype="float32", size="ci").format()
    assert "not all representable" in text
    failure_lines = [x for x in text.splitlines() if x.startswith("    ")]
    assert failure_lines and not any("representable" in x for x in failure_lines)
    assert text.count("not all representable in float32") == 1
    assert "representable" not in check(student, "layer_norm", size="ci").format()


def test_a_crashing_candidate_gets_one_traceback_and_a_signature_hint():
    def crashes(variant, inputs, dy, kwargs, *, dtype):
        raise RuntimeError("kernel launch failed")

    text = check(crashes, "layer_norm", size="ci").format(max_failures=100)
    assert text.count("RuntimeError: kernel launch failed") == 1
    assert 'File "' in text and "in crashes" in text and "raise RuntimeError" in text
    assert "the same as oracle:(37,1000)" in text and "hint:" not in text

    def old_protocol(variant, inputs, dy, kwargs):                      # no dtype keyword
        return {}

    text = check(old_protocol, "layer_norm", size="ci").format()
    assert "unexpected keyword argument 'dtype'" in text
    assert "hint: the oracle calls a candidate as candidate(variant, inputs, dy, kwargs, *, " \
        "dtype)" in text


def test_torch_function_of_a_functional_shows_the_fix(torch, torch_threads):
    from refnorm.oracle import torch_function

    report = check(torch_function(torch.nn.functional.layer_norm), "layer_norm", size="ci")
    text = report.format()
    assert not report and "unexpected keyword argument 'x'" in text
    assert "torch_function(lambda x, normalized_shape, weight=None, bias=None, eps=1e-5: " \
        "F.layer_norm(x, normalized_shape, weight, bias, eps))" in text
    fixed = torch_function(lambda x, normalized_shape, weight=None, bias=None, eps=1e-5:
                           torch.nn.functional.layer_norm(x, normalized_shape, weight, bias,
                                                          eps))
    assert check(fixed, "layer_norm", dtype="bfloat16", size="ci")


def test_known_pytorch_behaviour_is_labelled_and_still_fails(torch, torch_threads):
    report = check("torch", ["weight_norm", "spectral_norm"], dtype="float32", size="ci")
    assert not report
    text = report.format()
    failing = {(r.variant, r.case) for r in report.failures()}
    assert failing and all(r.known for r in report.failures())
    assert text.count("-> known PyTorch behaviour: ") == len(failing)
    assert "docs/notes/tolerances.rst#torch-findings" in text
    assert "(1 known PyTorch behaviour)" in text or "known PyTorch behaviour)" in text
    # a torch *function* is someone's kernel: PyTorch's known findings are not its excuse
    from refnorm.oracle import torch_function

    assert torch_function(lambda x: x).known == {}


def test_missing_torch_names_the_pinned_install(monkeypatch):
    import builtins

    from refnorm.oracle import adapters

    real = builtins.__import__

    def no_torch(name, *a, **k):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(adapters.AdapterError, match=r"pip install torch==2\.13\.0"):
        adapters.TorchAdapter()


# ----------------------------------------------------------------------------------------------
# Golden files: hand edits that used to pass, and the messages
# ----------------------------------------------------------------------------------------------
def test_goldens_report_an_orphan_file(golden_dir, tmp_path):
    d = _copy(golden_dir, tmp_path)
    removed = {}

    def drop(m):
        removed.update(m["cases"].pop(0))

    _rewrite_manifest(d, drop)
    result = goldens.verify(d, recompute=False)
    assert not result.ok
    assert any(p.startswith(f"{removed['file']}: orphan file") for p in result.problems)


def test_goldens_check_the_tolerance_safety_against_the_stored_tolerances(golden_dir, tmp_path):
    d = _copy(golden_dir, tmp_path)
    assert goldens.verify(d).ok
    _rewrite_manifest(d, lambda m: m["tolerance"].__setitem__("safety", 3.0))
    result = goldens.verify(d)
    assert not result.ok
    assert any("tolerance.safety=3.0" in p for p in result.problems), result.problems


def test_goldens_name_the_field_the_metadata_disagrees_on(golden_dir, tmp_path):
    d = _copy(golden_dir, tmp_path)
    _rewrite_manifest(d, lambda m: m["cases"][0].__setitem__("seed", 12345))
    with pytest.raises(goldens.GoldenError, match="disagrees with the manifest entry in "
                       "field\\(s\\) 'seed'"):
        goldens.verify(d, recompute=False)


def test_golden_messages_fit_their_interface(tmp_path, capsys):
    d = tmp_path / "g"
    goldens.export(d, ["layer_norm"], ["float32"], size="ci")
    with pytest.raises(goldens.GoldenError, match="pass overwrite=True to replace") as e:
        goldens.export(d, ["layer_norm"], ["float32"], size="ci")
    assert "--force" not in str(e.value)
    assert main(["goldens", "export", str(d), "--variant", "layer_norm", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pass --force" in err and "overwrite=True" not in err
    with pytest.raises(goldens.GoldenError, match="no such directory"):
        goldens.verify(tmp_path / "absent")
    (tmp_path / "file").write_text("")
    with pytest.raises(goldens.GoldenError, match="not a directory"):
        goldens.verify(tmp_path / "file")


def test_every_option_has_help_text():
    import argparse

    from refnorm.cli import build_parser

    def walk(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from walk(sub)
            elif action.option_strings and not isinstance(action, argparse._HelpAction):
                yield parser.prog, action

    missing = [f"{prog} {a.option_strings[0]}" for prog, a in walk(build_parser())
               if not a.help and "compare" in prog or (not a.help and "goldens" in prog)]
    assert not missing, missing
