"""The oracle's commands: ``refnorm compare`` and ``refnorm goldens export|verify``.

``refnorm.cli.build_parser`` calls :func:`add_commands`. Exit codes: 0 everything passed, 1 a
candidate failed (or a golden directory did not verify), 2 the command could not run (unknown
variant, missing package, ``--device cuda`` without CUDA, an untrustworthy golden file).

Examples (with their exit status on PyTorch 2.13 CPU)::

    refnorm compare --impl torch --dtype bfloat16                 # every variant PyTorch has
    # -> exit 1: weight_norm and spectral_norm fail on 3 tiny/subnormal cases, each labelled
    #    "known PyTorch behaviour" (docs/notes/tolerances.rst); everything else passes
    refnorm compare --impl torch --variant layer_norm rms_norm --dtype bfloat16   # exit 0
    refnorm compare --impl torch --device cuda --dtype float32 float16 bfloat16 \\
        --report out/report.txt --json out/report.json
    refnorm compare --impl torch --variant layer_norm --dtype bfloat16 --junit out/junit.xml
    refnorm compare --impl mypkg.kernels:candidate --variant layer_norm --dtype bfloat16
    refnorm compare --impl mypkg.kernels:lora_rms --variant rms_norm --frozen weight
    refnorm compare --impl mypkg.kernels:rms --variant rms_norm --dtype bfloat16 \
        --convention casting_mode=llama --convention offset=1     # a Gemma-style kernel
    refnorm goldens export goldens/ --variant layer_norm --dtype bfloat16 float32
    refnorm goldens export traj/ --variant none --optimizer adamp sgdp   # trajectories only
    refnorm goldens export all/ --optimizer all          # every case and every trajectory
    refnorm goldens verify goldens/
    refnorm compare --impl torch --goldens goldens/               # the cases of a golden dir
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_commands", "cmd_compare", "cmd_goldens_export", "cmd_goldens_verify"]


def _conventions(items) -> dict:
    """``--convention KEY=VALUE`` options as a dict (``offset`` a float), checked by
    :func:`refnorm.oracle.core.check_conventions`."""
    from refnorm.oracle.core import check_conventions

    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--convention {item!r}: expected KEY=VALUE, such as "
                             f"casting_mode=llama or offset=1")
        if key == "offset":
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"--convention {item!r}: offset must be a number") from None
        out[key] = value
    return check_conventions(out)

DTYPES = ("float32", "bfloat16", "float16", "float64")


def _err(msg):
    print(f"refnorm: error: {msg}", file=sys.stderr)
    return 2


def _progress(total, label, enabled):
    from refnorm._progress import Progress

    return Progress(total, label, enabled=enabled)


def cmd_compare(args):
    from refnorm.oracle import adapters, core, goldens

    try:
        adapter = adapters.resolve(args.impl, args.device)
        specs = core.select_specs(args.variant)
    except (adapters.AdapterError, ValueError, TypeError) as exc:
        return _err(str(exc))
    variants = [s.name for s in specs] if args.variant else None
    reports = []
    if args.goldens:
        try:
            cases = goldens.load(args.goldens, variants=variants,
                                 dtypes=args.dtype if args.dtype_given else None)
        except goldens.GoldenError as exc:
            return _err(str(exc))
        if not cases:
            return _err(f"{args.goldens}: no golden case matches the selection")
        runs = [(sorted({c.case.dtype for c in cases})[0], cases)]
    else:
        runs = [(d, None) for d in args.dtype]
    try:
        conventions = _conventions(args.convention)
    except ValueError as exc:
        return _err(str(exc))
    claimed = {**(getattr(adapter, "conventions", None) or {}), **conventions}
    for dtype, cases in runs:
        if cases is None:
            try:
                total = core.count_cases(adapter, variants, dtype, args.seed, args.size,
                                         args.strict, bool(args.ftz if args.ftz is not None
                                                           else adapter.ftz), claimed,
                                         bool(args.memory_efficient or adapter.memory_efficient))
            except (ValueError, TypeError) as exc:   # a convention no variant has
                return _err(str(exc))
        else:
            total = len(cases)
        bar = _progress(total, f"compare {dtype}", args.progress)
        try:
            report = core.check(adapter, variants, dtype=dtype, device=args.device,
                                seed=args.seed, size=args.size, strict=args.strict,
                                ftz=args.ftz, cases=cases, progress=bar.step,
                                frozen=args.frozen, conventions=conventions,
                                memory_efficient=args.memory_efficient)
        except (ValueError, TypeError) as exc:       # --frozen naming no input
            return _err(str(exc))
        finally:
            bar.close()
        if not report.results and not report.skipped:
            print(report.format())
            return _err(f"{adapter.name} implements none of the selected variants "
                        f"({', '.join(report.unsupported) or 'none'})")
        reports.append(report)
        print(report.format(details=not args.brief))
        print()
    ok = all(r.passed for r in reports)
    text = "\n\n".join(r.format() for r in reports)
    summary = ("ALL PASSED" if ok else "FAILED") + ": " + ", ".join(
        f"{r.dtype} {'pass' if r.passed else 'FAIL'}" for r in reports)
    print(summary)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(text + "\n\n" + summary + "\n")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([r.to_dict() for r in reports], indent=1,
                                              sort_keys=True) + "\n")
    if args.junit:
        from refnorm.oracle.junit import write_junit

        write_junit(reports, args.junit)
    return 0 if ok else 1


def cmd_goldens_export(args):
    from refnorm.oracle import core, goldens, trajectories

    # --variant narrows the norm cases ("none": no case); trajectories are written only for
    # the optimizers --optimizer names ("all": every one)
    variants = args.variant
    try:
        specs = [] if variants and "none" in variants else core.select_specs(variants)
        optimizers = ([] if args.optimizer is None
                      else trajectories.select_optimizers(args.optimizer))
    except ValueError as exc:
        return _err(str(exc))
    bar = _progress(len(specs) * len(args.dtype) + len(optimizers), "export", args.progress)
    try:
        manifest = goldens.export(args.directory, [s.name for s in specs], args.dtype,
                                  seed=args.seed, size=args.size, emulated=args.emulated,
                                  overwrite=args.force, progress=bar.step,
                                  optimizers=[s.name for s in optimizers])
    except goldens.DirectoryNotEmpty:
        return _err(f"{args.directory} is not empty; pass --force to replace its golden files")
    except goldens.GoldenError as exc:
        return _err(str(exc))
    finally:
        bar.close()
    n = len(manifest["cases"])
    print(f"wrote {n} golden cases ({len(specs)} variant(s) x {len(args.dtype)} dtype(s), seed "
          f"{args.seed}, size {args.size}), {len(manifest['trajectories'])} optimizer "
          f"trajectories ({len(optimizers)} optimizer(s), {trajectories.STEPS} steps each) and "
          f"{goldens.MANIFEST} to {args.directory}; {len(manifest['skipped'])} case(s) skipped "
          f"(reasons in the manifest)")
    return 0


def cmd_goldens_verify(args):
    from refnorm.oracle import goldens

    try:
        manifest = goldens._read_manifest(Path(args.directory))
        traj = manifest.get("trajectories", [])
        total = len(manifest["cases"]) + (len(traj) if isinstance(traj, list) else 0)
    except goldens.GoldenError as exc:
        print(f"refnorm goldens verify: REJECTED: {exc}", file=sys.stderr)
        return 2
    bar = _progress(total, "verify", args.progress)
    try:
        result = goldens.verify(args.directory, recompute=not args.no_recompute,
                                progress=bar.step)
    except goldens.GoldenError as exc:
        bar.close()
        print(f"refnorm goldens verify: REJECTED: {exc}", file=sys.stderr)
        return 2
    bar.close()
    print(result)
    return 0 if result.ok else 1


class _DtypeAction(argparse.Action):
    """``--dtype a b`` or ``--dtype a --dtype b``; replaces the default on first use."""

    def __call__(self, parser, namespace, values, option_string=None):
        if not getattr(namespace, "dtype_given", False):
            namespace.dtype = []
            namespace.dtype_given = True
        for v in values:
            if v not in DTYPES:
                parser.error(f"--dtype: {v!r} is not one of {', '.join(DTYPES)}")
            if v not in namespace.dtype:
                namespace.dtype.append(v)


def _common(p, default_dtypes, default_size="full"):
    p.add_argument("--variant", nargs="+", action="extend", metavar="NAME",
                   help="variants (default: all registered; `refnorm list` shows them)")
    p.add_argument("--dtype", nargs="+", action=_DtypeAction, default=list(default_dtypes),
                   metavar="DTYPE", help=f"candidate dtype(s): {', '.join(DTYPES)} "
                   f"(default: {' '.join(default_dtypes)})")
    p.set_defaults(dtype_given=False)
    p.add_argument("--seed", type=int, default=0, help="case seed (default 0)")
    p.add_argument("--size", choices=("full", "ci"), default=default_size,
                   help=f"'ci' leaves out the inputs above ~135k elements (the 65536-long "
                   f"rows stay); 'full' has them all (default: {default_size})")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")


def add_commands(subparsers):
    """Add ``compare`` and ``goldens`` to the ``refnorm`` command."""
    p = subparsers.add_parser(
        "compare", help="check another implementation (torch, jax, module:function) against "
        "the reference, forward and backward; exits 1 on failure",
        description="Run a candidate's forward and backward on every oracle case of every "
        "variant it implements, compare every output and gradient with the float64 reference "
        "under the dtype-derived tolerance, and print a table per variant (worst ULP error, "
        "tolerance, worst case). Exit 0: all passed; 1: a failure; 2: could not run.")
    p.add_argument("--impl", required=True, metavar="IMPL",
                   help="'torch', 'jax', or 'module:function' (a callable following the "
                   "protocol of refnorm.oracle.adapters)")
    p.add_argument("--device", default="cpu", help="device for torch/jax: cpu (default), cuda")
    _common(p, ("float32",))
    p.add_argument("--strict", action="store_true",
                   help="require float32 accumulation everywhere (parameter gradients and "
                   "intermediates too)")
    p.add_argument("--ftz", action=argparse.BooleanOptionalAction, default=None,
                   help="accept flushing of subnormal numbers to zero (default: the adapter's "
                   "own setting: on for jax, off otherwise)")
    p.add_argument("--frozen", nargs="+", action="extend", metavar="INPUT",
                   help="inputs whose gradient the candidate does not compute (a frozen "
                   "weight, as in LoRA): reported 'not computed (frozen)', the rest is judged")
    p.add_argument("--convention", action="append", default=[], metavar="KEY=VALUE",
                   help="a kernel convention the candidate follows, for every case "
                   "(repeatable): casting_mode=llama|gemma|none, offset=1 (Gemma's 1 + weight); "
                   "the tolerance then admits that mode's roundings and no more")
    p.add_argument("--memory-efficient", action="store_true", default=None,
                   help="the candidate's backward recomputes xhat = (y - bias) / weight from "
                   "the saved output (Apex's memory_efficient=True): the tolerance admits the "
                   "error of that recomputation; ill-conditioned cases (a weight near 0) are "
                   "reported as such, not failed")
    p.add_argument("--goldens", metavar="DIR",
                   help="use the cases of a golden directory instead of generating them")
    p.add_argument("--report", metavar="FILE", help="also write the full text report here")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON here")
    p.add_argument("--junit", metavar="FILE",
                   help="also write JUnit XML here, for CI: one test case per oracle case "
                   "(classname: the variant; name: the id refnorm.testing.cases gives it), "
                   "with the oracle's text of each failure")
    p.add_argument("--brief", action="store_true", help="tables only, no failure details")
    p.set_defaults(func=cmd_compare)

    g = subparsers.add_parser("goldens", help="export or verify golden files",
                              description="Golden files: manifest.json plus one .npz per case.")
    gsub = g.add_subparsers(dest="goldens_command", metavar="ACTION")
    e = gsub.add_parser("export", help="write golden files for the given variants and dtypes")
    e.add_argument("directory", metavar="DIR")
    _common(e, DTYPES, "ci")  # all variants x dtypes: ~180 MB at ci size, ~350 MB at full
    e.add_argument("--optimizer", nargs="+", action="extend", metavar="NAME",
                   help="also write the optimizer trajectories of these optimizers ('all': "
                   "every registered one; default: none). '--variant none' writes no norm "
                   "case")
    e.add_argument("--emulated", action="store_true",
                   help="also store the emulated correct low-precision outputs")
    e.add_argument("--force", action="store_true", help="overwrite the golden files in DIR")
    e.set_defaults(func=cmd_goldens_export)
    v = gsub.add_parser("verify", help="check the schema, every SHA-256 and that this refnorm "
                        "reproduces the stored references and optimizer trajectories; exits 1 "
                        "(mismatch) or 2 (rejected)")
    v.add_argument("directory", metavar="DIR")
    v.add_argument("--no-recompute", action="store_true",
                   help="check hashes and structure only, do not recompute the references "
                   "or re-run the optimizers")
    v.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    v.set_defaults(func=cmd_goldens_verify)
    g.set_defaults(func=lambda args: (g.print_help(), 2)[1])
