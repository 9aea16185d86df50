"""The ``refnorm`` command.

``refnorm list`` shows everything registered; ``refnorm verify [NAME ...]`` runs the three-way
gradient checks and exits 1 on any failure. For a variant with a surrogate gradient, the
``hand-engine`` column compares the hand backward with the surrogate's second formulation, the
``hand-FD`` column the exact (engine) gradient with finite differences, and one line per sample
gives the distance between the surrogate and the true gradient. The golden-file and comparison
commands of the oracle are added by :mod:`refnorm.oracle`; ``refnorm assignment`` and
``refnorm grade`` (course assignments and their autograder) by :mod:`refnorm.assignments`.
"""
from __future__ import annotations

import argparse
import math
import sys

import refnorm
from refnorm.verify import FD_RTOL, HAND_ENGINE_RTOL
from refnorm._progress import Progress

__all__ = ["main", "build_parser", "cmd_list", "cmd_verify", "Progress"]


#: What ``refnorm verify``'s columns mean: printed under its table and in ``refnorm verify -h``.
VERIFY_COLUMNS = f"""\
columns: cases = sample inputs checked, each with a random upstream gradient;
  hand-engine = largest normwise relative error max|a-b|/max|b| between the hand-derived
    backward and the engine's gradient of the same math written with primitives (for a
    primitive: its VJP rule on arrays vs recorded on Tensors; for a surrogate gradient: the
    hand backward vs the surrogate's second formulation); must be <= {HAND_ENGINE_RTOL:.0e};
  hand-FD = the same error of the hand gradient against central finite differences (for a
    surrogate gradient: the exact engine gradient); must be <= {FD_RTOL:.0e};
  '-' = no such comparison: no composite, a primitive whose rule is not recorded on Tensors,
    or an optimizer (checked against its equations, see the note)."""

#: The footer under ``refnorm verify``'s table (the long form is :data:`VERIFY_COLUMNS`).
VERIFY_FOOTER = (f"hand-engine: max|hand - engine| / max|engine| "
                 f"(must be <= {HAND_ENGINE_RTOL:.0e}); hand-FD: the same against finite\n"
                 f"differences (<= {FD_RTOL:.0e}); "
                 f"-: no such check here; `refnorm verify -h` explains the columns")


def _fmt(x):
    return "-" if isinstance(x, float) and math.isnan(x) else f"{x:.1e}"


def cmd_list(args):
    from refnorm.verify import registered

    rows = registered()
    width = max(len(name) for _, name, _, _ in rows)
    for kind, name, spec, _ in rows:
        title = getattr(spec, "title", "") or getattr(spec, "doc", "")
        print(f"{kind:<10} {name:<{width}}  {title}")
    print(f"{len(rows)} registered: " + ", ".join(
        f"{sum(1 for r in rows if r[0] == k)} {k}s" for k in ("primitive", "norm", "optimizer")))
    return 0


def cmd_verify(args):
    from refnorm.verify import registered

    rows = registered()
    if args.names:
        known = {name for _, name, _, _ in rows}
        unknown = [n for n in args.names if n not in known]
        if unknown:
            print(f"refnorm verify: unknown name(s) {', '.join(unknown)}; see `refnorm list`",
                  file=sys.stderr)
            return 2
        rows = [r for r in rows if r[1] in args.names]
    progress = Progress(len(rows), "verify", enabled=args.progress)
    results = []
    for kind, name, spec, verifier in rows:
        results.append(verifier(spec))
        progress.step(name)
    progress.close()
    width = max([len(r.name) for r in results] + [4])
    print(f"{'kind':<10} {'name':<{width}} {'cases':>5}  {'hand-engine':>11}  {'hand-FD':>8}  "
          f"result")
    for r in results:
        status = r.status
        note = f"  {r.note}" if r.note else ""
        print(f"{r.kind:<10} {r.name:<{width}} {r.cases:>5}  {_fmt(r.hand_engine):>11}  "
              f"{_fmt(r.hand_fd):>8}  {status}{note}")
        for line in getattr(r, "details", ()):
            print(f"{'':<10}   {line}")
    failed = [r.name for r in results if not r.passed]
    print(VERIFY_FOOTER)
    undecided = sum(r.status == "INCONCLUSIVE" for r in results)
    print(f"{len(results) - len(failed)} passed, {len(failed) - undecided} failed"
          + (f", {undecided} inconclusive" if undecided else ""))
    return 1 if failed else 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="refnorm", description="refnorm: a NumPy reference for normalization layers, "
        "with hand-derived gradients checked three ways and a golden oracle.")
    parser.add_argument("--version", action="version", version=f"refnorm {refnorm.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("list", help="list every registered primitive, variant and optimizer")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("verify", help="three-way gradient checks (hand, engine, finite "
                       "differences) of registered items; exits 1 on failure",
                       epilog=VERIFY_COLUMNS,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME", help="items to check (default: all)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: when stderr is a terminal)")
    p.set_defaults(func=cmd_verify)
    try:
        from refnorm.oracle import cli as oracle_cli
    except ImportError:
        oracle_cli = None
    if oracle_cli is not None:
        oracle_cli.add_commands(sub)
    from refnorm.assignments import cli as assignments_cli

    assignments_cli.add_commands(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
