"""Golden optimizer trajectories: export, verification, tampering, and step-by-step checks of
other optimizers (torch.optim, deliberately wrong AdamPs) with refnorm.oracle.trajectories."""
from __future__ import annotations

import functools
import json
import math
import shutil

import numpy as np
import pytest

from refnorm import optim
from refnorm.cli import main
from refnorm.oracle import goldens
from refnorm.oracle.trajectories import (PARAM_NAMES, SETTINGS, STEPS, GoldenTrajectory,
                                         check_trajectory, load_trajectories, make_problem,
                                         torch_optimizer)


def _export(path, seed=0, optimizers="all", variants=()):
    return goldens.export(path, list(variants), ("float64",), seed=seed, size="ci",
                          optimizers=optimizers)


def _tree(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def gdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("goldens") / "g"
    _export(path)
    return path


@pytest.fixture(scope="module")
def trajs(gdir):
    return {t.id: t for t in load_trajectories(gdir)}


def _copy(gdir, tmp_path):
    dst = tmp_path / "g"
    shutil.copytree(gdir, dst)
    return dst


def _rewrite_manifest(path, edit):
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    body = {k: v for k, v in m.items() if k != "manifest_sha256"}
    m["manifest_sha256"] = goldens._sha256(goldens._canonical(body))
    (path / "manifest.json").write_text(json.dumps(m))


def _forge(path, tid, edit_arrays):
    """Rewrite trajectory ``tid`` consistently (arrays, embedded metadata, manifest hashes): only
    re-running the optimizer can tell."""
    m = json.loads((path / "manifest.json").read_text())
    k, entry = next((k, e) for k, e in enumerate(m["trajectories"]) if e["id"] == tid)
    f = path / entry["file"]
    with np.load(f, allow_pickle=False) as z:
        arrays = {n: z[n] for n in z.files if n != "meta"}
    edit_arrays(arrays)
    entry = {k2: v for k2, v in entry.items() if k2 != "sha256"}
    entry["arrays"] = {n: {"shape": list(a.shape), "dtype": a.dtype.name}
                       for n, a in sorted(arrays.items())}
    arrays["meta"] = np.frombuffer(goldens._canonical(entry), dtype=np.uint8)
    data = goldens._npz_bytes(arrays)
    f.write_bytes(data)

    def edit(man):
        man["trajectories"][k] = {**entry, "sha256": goldens._sha256(data)}
    _rewrite_manifest(path, edit)


# ----------------------------------------------------------------------------------------------
# Export and verify
# ----------------------------------------------------------------------------------------------
def test_export_writes_every_optimizer_and_verify_reproduces_it(gdir, trajs):
    manifest = json.loads((gdir / "manifest.json").read_text())
    entries = manifest["trajectories"]
    assert manifest["cases"] == [] and manifest["schema_version"] == goldens.SCHEMA_VERSION
    assert [e["name"] for e in entries] == [s.name for s in optim.ALL_OPTIMIZERS
                                            for _ in SETTINGS[s.name]]
    for e in entries:
        assert e["kind"] == "optimizer" and e["steps"] == STEPS and e["dtype"] == "float64"
        assert {"file", "sha256", "id", "hyperparameters", "seed", "params", "arrays",
                "state_fields", "decision_fields"} <= set(e)
        assert [p["name"] for p in e["params"]] == list(PARAM_NAMES)
        with np.load(gdir / e["file"], allow_pickle=False) as z:   # plain NumPy, no pickles
            assert z["grads__0"].shape == (STEPS, 4, 3, 2, 2) and z["lr"].shape == (STEPS,)
            assert {f"state__{f}__0" for f in e["state_fields"]} <= set(z.files)
    # every hyper-parameter is recorded, defaults included
    assert trajs["adamw-000"].hyper == {**optim.BY_NAME["adamw"].defaults, "lr": 0.01}
    assert trajs["sgd-002"].hyper["nesterov"] is True
    assert trajs["adam-001"].hyper["betas"] == (0.8, 0.99)
    assert set(trajs["adam-001"].state) == {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert trajs["sgd-000"].state == {} and set(trajs["sgd-001"].state) == {"momentum_buffer"}

    result = goldens.verify(gdir)
    assert result.ok and result.trajectories == len(entries) == result.trajectories_identical
    assert "reproduced by refnorm's optimizers bit for bit" in str(result)
    assert main(["goldens", "verify", str(gdir)]) == 0


def test_recorded_gradients_are_the_problems(trajs):
    """The grads fed at step 1 are the loss's gradient at the initial parameters (central
    differences), and every optimizer starts from the same problem."""
    params, _, loss_fn = make_problem(0)
    t = trajs["adamp-000"]
    for i, p in enumerate(params):
        assert np.array_equal(p, t.initial_params[i])
        assert np.array_equal(p, trajs["sgd-000"].initial_params[i])
        d = np.random.default_rng(i).standard_normal(p.shape)
        h = 1e-6
        up = [q + (h * d if j == i else 0) for j, q in enumerate(params)]
        down = [q - (h * d if j == i else 0) for j, q in enumerate(params)]
        fd = (loss_fn(up, 0) - loss_fn(down, 0)) / (2 * h)
        assert fd == pytest.approx(np.sum(t.grads[i][0] * d), rel=1e-6, abs=1e-10)


def test_same_seed_same_files(tmp_path):
    _export(tmp_path / "a", optimizers=["adamp", "sgd"])
    _export(tmp_path / "b", optimizers=["adamp", "sgd"])
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert len(a) == 1 + len(SETTINGS["adamp"]) + len(SETTINGS["sgd"]) and a == b
    _export(tmp_path / "c", seed=1, optimizers=["adamp", "sgd"])
    c = _tree(tmp_path / "c")
    assert c.keys() == a.keys() and all(c[k] != a[k] for k in a)


def test_cli_optimizer_selection(tmp_path):
    # --variant alone writes no trajectory: they are written only when asked for
    assert main(["goldens", "export", str(tmp_path / "a"), "--variant", "weight_norm",
                 "--dtype", "float64"]) == 0
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["cases"] and m["trajectories"] == []
    assert not list((tmp_path / "a").glob("optim-*"))
    assert goldens.export(tmp_path / "lib", ["weight_norm"], ("float64",))["trajectories"] == []
    # --optimizer all: every registered optimizer
    assert main(["goldens", "export", str(tmp_path / "e"), "--variant", "none",
                 "--optimizer", "all"]) == 0
    m = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert {e["name"] for e in m["trajectories"]} == set(optim.BY_NAME)
    # --optimizer none: no trajectories; --variant none: no norm case
    assert main(["goldens", "export", str(tmp_path / "b"), "--variant", "weight_norm",
                 "--dtype", "float64", "--optimizer", "none"]) == 0
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["cases"] and m["trajectories"] == []
    assert main(["goldens", "export", str(tmp_path / "c"), "--variant", "none",
                 "--optimizer", "sgdp", "adam"]) == 0
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["cases"] == [] and {e["name"] for e in m["trajectories"]} == {"sgdp", "adam"}
    assert main(["goldens", "verify", str(tmp_path / "c")]) == 0
    assert main(["goldens", "export", str(tmp_path / "d"), "--optimizer", "adamq"]) == 2


# ----------------------------------------------------------------------------------------------
# Tampering
# ----------------------------------------------------------------------------------------------
def test_tampered_trajectory_file_is_rejected(gdir, tmp_path):
    g = _copy(gdir, tmp_path)
    f = g / "optim-adamp-000.npz"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(goldens.GoldenError, match="optim-adamp-000.npz: SHA-256 mismatch"):
        load_trajectories(g)
    with pytest.raises(goldens.GoldenError, match="SHA-256 mismatch"):
        goldens.verify(g)
    with pytest.raises(goldens.GoldenError, match="SHA-256 mismatch"):
        check_trajectory(optim.BY_NAME["adamp"], f)
    assert main(["goldens", "verify", str(g)]) == 2


def test_forged_trajectory_is_caught_by_rerunning_the_optimizer(gdir, tmp_path, capsys):
    g = _copy(gdir, tmp_path)

    def edit(arrays):
        arrays["params__1"][6, 2, 3] += 1e-12      # step 7, ln.weight[2, 3]
    _forge(g, "adamw-001", edit)
    result = goldens.verify(g)                      # hashes consistent: only re-running tells
    assert not result.ok and len(result.problems) == 1
    msg = result.problems[0]
    assert "optim-adamw-001.npz" in msg and "step 7/20, parameter 1 'ln.weight'" in msg
    assert "params differ" in msg and "at [2, 3]" in msg
    assert main(["goldens", "verify", str(g)]) == 1
    assert "FAILED: 1 problem(s)" in capsys.readouterr().out


def test_forged_string_array_and_paths_out_are_rejected(gdir, tmp_path):
    g = _copy(gdir, tmp_path)

    def edit(arrays):
        arrays["lr"] = np.array(["0.01"] * STEPS)
    _forge(g, "adam-000", edit)
    with pytest.raises(goldens.GoldenError, match="'lr' holds strings"):
        load_trajectories(g)

    for name in ("../x.npz", "/etc/passwd", "a/b.npz", "manifest.json"):
        g2 = _copy(gdir, tmp_path / name.replace("/", "_"))

        def edit_manifest(m, name=name):
            m["trajectories"][0]["file"] = name
        _rewrite_manifest(g2, edit_manifest)
        with pytest.raises(goldens.GoldenError, match="outside the golden directory|absolute"):
            goldens.verify(g2)


# ----------------------------------------------------------------------------------------------
# Projection decisions
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sgdp", "adamp"])
def test_projection_decisions_are_recorded_and_vary(trajs, name):
    for k in range(len(SETTINGS[name])):
        t = trajs[f"{name}-{k:03d}"]
        views = [a.tolist() for a in t.decisions["projection"]]
        ratio = t.decisions["wd_ratio_applied"]
        # the weight-standardized weight (with its L2 term) is projected on some steps, in
        # either view, and not on others
        assert {"channel", "layer", "none"} <= set(views[0])
        assert set(views[1]) == {"layer"}            # LayerNorm: invariant as a whole only
        assert set(views[3]) == {"none"}             # 1-D: never
        for i in range(4):
            fired = np.array(views[i]) != "none"
            assert np.all(ratio[i][fired] == t.hyper["wd_ratio"]) and np.all(ratio[i][~fired] == 1)
    for plain in ("sgd-001", "adam-000", "adamw-000"):
        assert trajs[plain].decisions == {}


# ----------------------------------------------------------------------------------------------
# Checking other optimizers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, name", [("SGD", "sgd"), ("Adam", "adam"), ("AdamW", "adamw")])
def test_torch_optimizers_match_the_golden_trajectories(torch, gdir, cls, name):
    report = check_trajectory(torch_optimizer(getattr(torch.optim, cls)), gdir, name)
    assert report, str(report)
    assert len(report.results) == len(SETTINGS[name])
    for r in report.results:
        assert r.steps_matched == STEPS and r.not_compared == []
        assert set(r.compared) == {"params"} | {f"state.{f}" for f in r.trajectory.state}
    # float64 torch is close to, not identical with, refnorm (lerp, addcdiv): 0 ULP fails
    exact = check_trajectory(torch_optimizer(getattr(torch.optim, cls)), gdir, name, ulps=0)
    assert not exact and "step 1/20" in str(exact)
    # a float32 run passes a relative tolerance
    f32 = torch_optimizer(getattr(torch.optim, cls), dtype=torch.float32)
    assert check_trajectory(f32, gdir, name, rtol=1e-5)


@pytest.mark.parametrize("cls, name", [("SGDP", "sgdp"), ("AdamP", "adamp")])
def test_the_official_adamp_package_matches_the_golden_trajectories(torch, gdir, cls, name):
    """The official code (clovaai/AdamP, ``adamp`` on PyPI, a test dependency) follows the
    goldens to the default 16 ULP, buffers included; the paper's unprojected SGDP buffer does
    not (it diverges at the first step whose projection fires, step 1 here)."""
    import adamp

    rename = {"momentum": "momentum_buffer"}
    report = check_trajectory(torch_optimizer(getattr(adamp, cls), rename=rename), gdir, name)
    assert report, str(report)
    assert len(report.results) == len(SETTINGS[name])
    for r in report.results:   # torch.optim has no projection decisions to report
        assert r.steps_matched == STEPS and r.not_compared == ["projection", "wd_ratio_applied"]
        assert set(r.compared) == {"params"} | {f"state.{f}" for f in r.trajectory.state}
    if name == "sgdp":
        paper = functools.partial(optim.sgdp_step, project_buffer=False)
        wrong = check_trajectory((optim.sgdp_init, paper), gdir, "sgdp-000")
        assert not wrong and wrong.results[0].step == 1, str(wrong)
        assert wrong.results[0].quantity == "state.momentum_buffer", str(wrong)


def test_refnorm_protocol_and_single_file(gdir):
    assert check_trajectory(optim.BY_NAME["sgdp"], gdir, ulps=0)     # the spec names itself
    pair = (optim.adamp_init, optim.adamp_step)
    report = check_trajectory(pair, gdir / "optim-adamp-001.npz", ulps=0)
    assert report and [r.trajectory.id for r in report.results] == ["adamp-001"]
    assert report.results[0].compared == ["params", "state.exp_avg", "state.exp_avg_sq",
                                          "projection", "wd_ratio_applied"]
    with pytest.raises(ValueError, match="pass name="):
        check_trajectory(pair, gdir)
    # the wrong optimizer for the golden: caught at step 1
    wrong = check_trajectory(optim.BY_NAME["adam"], gdir, "adamw")
    assert not wrong and all(r.step == 1 for r in wrong.results)


def _rows(x, view):
    return x.reshape(x.shape[0], -1) if view == "channel" else x.reshape(1, -1)


def _decide(w, g, views, delta, eps):
    """SGDP/AdamP's cosine test, written out: the first view that passes, or None."""
    if w.ndim <= 1:
        return None
    for view in views:
        wr, gr = _rows(w, view), _rows(g, view)
        norms = (np.maximum(np.linalg.norm(gr, axis=1), eps)
                 * np.maximum(np.linalg.norm(wr, axis=1), eps))
        cos = np.abs(np.sum(wr * gr, 1)) / norms
        if cos.max() < delta / math.sqrt(wr.shape[1]):
            return view
    return None


def numpy_adamp(views=("channel", "layer"), project=True, test_with="grad", report=True):
    """A from-scratch AdamP following the simple protocol; the options make it wrong."""

    def make(params, hyper):
        b1, b2 = hyper["betas"]
        lr, eps, wd, delta = hyper["lr"], hyper["eps"], hyper["weight_decay"], hyper["delta"]
        m = [np.zeros_like(p) for p in params]
        v = [np.zeros_like(p) for p in params]
        t = [0]

        def step(params, grads):
            t[0] += 1
            out, taken, ratios = [], [], []
            for i, (w, g) in enumerate(zip(params, grads)):
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                denom = np.sqrt(v[i]) / math.sqrt(1 - b2 ** t[0]) + eps
                u = ((b1 * m[i] + (1 - b1) * g) if hyper["nesterov"] else m[i]) / denom
                view = (_decide(w, g if test_with == "grad" else m[i], views, delta, eps)
                        if project else None)
                if view is not None:
                    wr, ur = _rows(w, view), _rows(u, view)
                    wh = wr / (np.linalg.norm(wr, axis=1, keepdims=True) + eps)
                    u = (ur - np.sum(wh * ur, axis=1, keepdims=True) * wh).reshape(w.shape)
                ratio = hyper["wd_ratio"] if view is not None else 1.0
                if wd > 0:
                    w = w * (1 - lr * wd * ratio)
                out.append(w - lr / (1 - b1 ** t[0]) * u)
                taken.append(view)
                ratios.append(ratio)
            if not report:
                return out
            return out, {"projection": taken, "wd_ratio_applied": ratios,
                         "state": {"exp_avg": list(m), "exp_avg_sq": list(v)}}

        return step

    return make


def _first_wrong_decision(t: GoldenTrajectory, views=("channel", "layer"), project=True,
                          test_with="grad"):
    """(step, param) where a wrong AdamP first decides differently from the golden, computed
    from the golden's own parameters and gradients."""
    b1 = t.hyper["betas"][0]
    m = [np.zeros_like(p) for p in t.initial_params]
    for step in range(1, t.steps + 1):
        for i in range(len(m)):
            w = t.initial_params[i] if step == 1 else t.params[i][step - 2]
            g = t.grads[i][step - 1]
            m[i] = b1 * m[i] + (1 - b1) * g
            wrong = (_decide(w, g if test_with == "grad" else m[i], views, t.hyper["delta"],
                             t.hyper["eps"]) if project else None)
            if (wrong or "none") != t.decisions["projection"][i][step - 1]:
                return step, i
    return None


def test_a_correct_numpy_adamp_passes(gdir):
    report = check_trajectory(numpy_adamp(), gdir, "adamp", require_state=True)
    assert report, str(report)


@pytest.mark.parametrize("mistake, options, expect", [
    ("projection skipped", dict(project=False), "did not project where the golden did"),
    ("layer view tested first", dict(views=("layer", "channel")), "tries the channel view"),
    ("cosine test on the momentum", dict(test_with="momentum"), "check the cosine test"),
])
def test_a_wrong_adamp_is_caught_at_the_right_step(trajs, mistake, options, expect):
    for k in range(len(SETTINGS["adamp"])):
        t = trajs[f"adamp-{k:03d}"]
        step, param = _first_wrong_decision(t, **options)
        report = check_trajectory(numpy_adamp(**options), t)
        assert not report
        r = report.results[0]
        assert (r.step, r.param, r.quantity) == (step, param, "projection"), (mistake, str(r))
        assert r.steps_matched == step - 1
        assert f"first divergence at step {step}/20, parameter {param} " \
               f"{PARAM_NAMES[param]!r}" in r.message
        assert "projection decision differs" in r.message and expect in r.message
        assert "golden projection decisions at step" in r.message
        # a candidate that does not report its decisions is caught at the same step, by its
        # parameters, and told what the golden decided there
        quiet = check_trajectory(numpy_adamp(report=False, **options), t).results[0]
        assert (quiet.step, quiet.param, quiet.quantity) == (step, param, "params"), str(quiet)
        assert "params differ" in quiet.message and "the golden " in quiet.message
    if mistake == "cosine test on the momentum":   # not caught by step 1: a subtler mistake
        assert step > 1
