"""The ``refnorm`` command: --help, --version, list and verify."""
import subprocess
import sys

import pytest

import refnorm
from conftest import verify_rows
from refnorm import cli
from refnorm.verify import registered


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert refnorm.__version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "verify" in capsys.readouterr().out


def test_list_shows_every_registered_item(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for kind, name, _, _ in registered():
        assert name in out


def test_verify_passes_and_lists_the_items_asked_for(capsys):
    # one item of each kind; the full run (every registered item) is the README's main job,
    # checked row by row in tests/test_readme.py, the suite's one run of it
    asked = {kind: name for kind, name, _, _ in reversed(registered())}
    assert cli.main(["verify", "--no-progress", *asked.values()]) == 0
    out = capsys.readouterr().out
    rows = verify_rows(out, asked)
    for kind, name in asked.items():
        assert name in rows and rows[name].split()[0] == kind, name
        assert rows[name].split()[5] == "pass", rows[name]
    assert out.splitlines()[-1] == f"{len(asked)} passed, 0 failed"


def test_verify_explains_its_columns(capsys):
    # the footer under the table names every column and the '-' entries, with the limits
    # actually applied; `verify -h` gives the long form
    from refnorm.verify import FD_RTOL, HAND_ENGINE_RTOL

    assert cli.main(["verify", "--no-progress", "add", "adamp"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "2 passed, 0 failed"
    header, footer = lines[0], " ".join(lines[-3:-1])
    assert header.split()[3:5] == ["hand-engine", "hand-FD"]
    assert lines[2].split()[3:5] == ["-", "-"]          # adamp: an optimizer, no gradients
    for word in ("hand-engine:", "hand-FD:", "-:", "finite", "refnorm verify -h",
                 f"{HAND_ENGINE_RTOL:.0e}", f"{FD_RTOL:.0e}"):
        assert word in footer, (word, footer)
    with pytest.raises(SystemExit) as exc:
        cli.main(["verify", "-h"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ("hand-engine = largest normwise relative error", "hand-FD = the same error",
                  "central finite differences", "'-' = no such comparison", "optimizer",
                  "surrogate", "random upstream gradient"):
        assert words in text, words


def test_verify_exits_1_on_a_failure(monkeypatch, capsys):
    from refnorm import verify
    from refnorm.norms import layer_norm as ln

    def wrong_backward(dy, cache):
        grads = ln.layer_norm_backward(dy, cache)
        return grads._replace(dx=grads.dx * (1 + 1e-4))

    bad = ln.SPEC.__class__(**{**ln.SPEC.__dict__, "backward": wrong_backward})
    monkeypatch.setattr(verify, "registered",
                        lambda: [("norm", "layer_norm", bad, verify.verify_norm)])
    assert cli.main(["verify", "--no-progress"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_unknown_name_is_an_error(capsys):
    assert cli.main(["verify", "no_such_norm"]) == 2


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "refnorm.cli", "list"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "layer_norm" in out.stdout
