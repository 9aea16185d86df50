"""JUnit XML from the oracle's reports: ``refnorm compare --junit FILE``.

CI systems (Jenkins, GitLab, GitHub's test reporters, Azure) render JUnit XML natively: each
oracle case becomes one ``<testcase>``, so that a CI run lists which case of which variant
failed, with the oracle's own text for it. The layout is the common one (Ant's, which
Jenkins' ``junit-10.xsd`` describes and pytest's ``--junitxml`` writes)::

    <testsuites name="refnorm compare" tests= failures= errors= skipped= time=>
      <testsuite name="refnorm compare impl=torch dtype=bfloat16" tests= failures= errors=
                 skipped= time= timestamp= hostname=>
        <properties><property name="impl" value="torch"/> ...</properties>
        <testcase classname="layer_norm" name="layer_norm-bfloat16-(37,1000)" time=/>
        <testcase classname="layer_norm" name="layer_norm-bfloat16-(3,1)" time=>
          <failure message="y: 4.2e+03 ULP > tol ...; -> matches: ..." type="FAIL">
            the oracle's report of this case
          </failure>
        </testcase>
        <testcase ...><skipped message="the sum of squares ... overflows ..."/></testcase>
      </testsuite>
    </testsuites>

One ``<testsuite>`` per report (one per dtype of ``refnorm compare``). A ``<testcase>``'s
``classname`` is the variant and its ``name`` the id that :func:`refnorm.testing.cases` gives
the same case (:func:`refnorm.oracle.cases.case_ids`). A case fails (``<failure>``) when the
oracle fails it, with :meth:`Report.only`'s text as the body: its table, its failing outputs,
the diagnosis; the residual block ``x + f(x)`` of a PyTorch function counts for the case it
ran on. A candidate that raised is an ``<error>`` (``type`` is the exception's class). A case
the oracle does not judge (outside the format's range, inputs that overflow the dtype,
declined by the candidate) is ``<skipped>`` with the reason. ``time`` is the seconds the
candidate's call and the comparison took.
"""
from __future__ import annotations

import datetime
import re
import socket
import xml.etree.ElementTree as ET
from pathlib import Path

from refnorm.oracle.cases import case_ids

__all__ = ["junit_tree", "write_junit"]

# characters XML 1.0 cannot hold (a candidate's exception message may contain any)
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_MESSAGE_CHARS = 1000


def _text(s) -> str:
    return _NOT_XML.sub("?", str(s))


def _message(s) -> str:
    s = _text(s).replace("\n", " ")
    return s if len(s) <= _MESSAGE_CHARS else s[:_MESSAGE_CHARS - 3] + "..."


def _failure_message(result, residual):
    """One line: the first failing output (or write) of the case, and its diagnosis."""
    parts = [f"wrote into {n} in place ({how})" for n, how in result.writes.items()]
    parts += [o.describe() for o in result.failing()[:1]]
    if len(result.failing()) > 1:
        parts.append(f"and {len(result.failing()) - 1} more output(s)")
    if residual is not None and not residual.passed:
        parts.append(f"residual block x + f(x): {residual.describe()}")
    text = "; ".join(parts)
    if result.known:
        text += f" -> known behaviour: {result.known}"
    elif result.diagnosis:
        text += f" -> {result.diagnosis}"
    return text


def _suite(report, name):
    suite = ET.Element("testsuite")
    props = ET.SubElement(suite, "properties")
    for key in ("impl", "dtype", "device", "seed", "size", "strict", "ftz"):
        value = getattr(report, key)
        value = str(value).lower() if isinstance(value, bool) else _text(value)
        ET.SubElement(props, "property", name=key, value=value)
    if report.frozen:
        ET.SubElement(props, "property", name="frozen", value=",".join(report.frozen))
    if report.unsupported:
        ET.SubElement(props, "property", name="unsupported",
                      value=",".join(report.unsupported))
    groups = {}       # (variant, dtype) -> [(name, shape, result or Skipped)]
    for r in report.results:
        groups.setdefault((r.variant, r.dtype), []).append((r.case, r.shape, r))
    for s in report.skipped:
        groups.setdefault((s.variant, s.dtype), []).append((s.name, s.shape, s))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    total_time = 0.0
    for (variant, dtype), entries in groups.items():
        ids = case_ids(variant, dtype, [(n, shape) for n, shape, _ in entries])
        res = report.residual.get(variant)
        for case, _, item in entries:
            seconds = float(getattr(item, "seconds", 0.0))
            total_time += seconds
            tc = ET.SubElement(suite, "testcase", classname=variant, name=ids[case],
                               time=f"{seconds:.6f}")
            counts["tests"] += 1
            if not hasattr(item, "status"):                 # a Skipped of the oracle
                ET.SubElement(tc, "skipped", message=_message(item.reason))
                counts["skipped"] += 1
                continue
            residual = res[1] if res is not None and res[0] == case else None
            if item.status == "skipped":
                ET.SubElement(tc, "skipped", message=_message(item.message))
                counts["skipped"] += 1
            elif item.status == "error":
                kind = item.message.split(":", 1)[0] if ":" in item.message else "error"
                el = ET.SubElement(tc, "error", message=_message(item.message), type=kind)
                el.text = _text(report.only(variant, case).format())
                counts["errors"] += 1
            elif item.status != "pass" or (residual is not None and not residual.passed):
                el = ET.SubElement(tc, "failure", message=_message(
                    _failure_message(item, residual)), type="FAIL")
                el.text = _text(report.only(variant, case).format())
                counts["failures"] += 1
    suite.set("name", name)
    for key, n in counts.items():
        suite.set(key, str(n))
    suite.set("time", f"{total_time:.6f}")
    return suite, counts, total_time


def junit_tree(reports, name="refnorm compare") -> ET.ElementTree:
    """The JUnit XML of one or more :class:`~refnorm.oracle.Report`: a ``<testsuites>`` with
    one ``<testsuite>`` per report and one ``<testcase>`` per oracle case."""
    reports = [reports] if not isinstance(reports, (list, tuple)) else list(reports)
    root = ET.Element("testsuites", name=name)
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    total_time = 0.0
    stamp = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    host = socket.gethostname()
    for report in reports:
        suite, counts, seconds = _suite(
            report, f"{name} impl={report.impl} dtype={report.dtype} device={report.device}")
        suite.set("timestamp", stamp)
        suite.set("hostname", _text(host))
        root.append(suite)
        for key, n in counts.items():
            totals[key] += n
        total_time += seconds
    for key, n in totals.items():
        root.set(key, str(n))
    root.set("time", f"{total_time:.6f}")
    tree = ET.ElementTree(root)
    ET.indent(tree)
    return tree


def write_junit(reports, path, name="refnorm compare") -> Path:
    """Write :func:`junit_tree` to ``path`` (UTF-8, with the XML declaration); returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    junit_tree(reports, name).write(path, encoding="utf-8", xml_declaration=True)
    return path
