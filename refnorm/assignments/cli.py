"""``refnorm assignment list|new|solution`` and ``refnorm grade``: the course's command line."""
from __future__ import annotations

import json
import sys

__all__ = ["add_commands", "cmd_assignment", "cmd_grade"]


def cmd_assignment(args):
    from refnorm import assignments as A

    if args.action == "list":
        for a in A.ASSIGNMENTS:
            print(f"{a.number}  {a.name:<20} {a.summary}")
        return 0
    if not args.name or not args.dir:
        print(f"refnorm assignment {args.action}: give NAME and DIR", file=sys.stderr)
        return 2
    try:
        write = A.write_starter if args.action == "new" else A.write_solution
        path = write(args.name, args.dir, force=args.force)
    except (ValueError, FileExistsError) as exc:
        print(f"refnorm assignment {args.action}: {exc}", file=sys.stderr)
        return 2
    what = "starter" if args.action == "new" else "reference solution (for staff)"
    print(f"wrote the {what} of {A.get(args.name).title}: {path}")
    return 0


def cmd_grade(args):
    from refnorm.assignments.grader import grade

    try:
        g = grade(args.name, args.file, seed=args.seed, time_limit=args.time_limit)
    except (ValueError, FileNotFoundError) as exc:
        print(f"refnorm grade: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        text = g.to_json()
    elif args.format == "gradescope":
        text = json.dumps(g.gradescope(), indent=2)
    else:
        text = g.text()
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


def add_commands(sub):
    from refnorm.assignments.sandbox import DEFAULT_TIME_LIMIT

    p = sub.add_parser("assignment", help="course assignments: list them, write a starter "
                       "(new) or the reference solution (solution, for staff)")
    p.add_argument("action", choices=("list", "new", "solution"))
    p.add_argument("name", nargs="?", metavar="NAME", help="the assignment (name or number)")
    p.add_argument("dir", nargs="?", metavar="DIR", help="the folder to write the file into")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_assignment)
    p = sub.add_parser("grade", help="grade a student's file for an assignment (its code runs "
                       "in a separate process, with a time limit per call)")
    p.add_argument("name", metavar="NAME", help="the assignment (name or number)")
    p.add_argument("file", metavar="FILE", help="the student's file")
    p.add_argument("--format", choices=("text", "json", "gradescope"), default="text",
                   help="text report, plain JSON, or Gradescope's results.json")
    p.add_argument("--output", "-o", metavar="PATH", help="write the report there")
    p.add_argument("--seed", type=int, default=0, help="picks the cases (default 0)")
    p.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT, metavar="SECONDS",
                   help=f"seconds per call of the student's code (default {DEFAULT_TIME_LIMIT:g})")
    p.set_defaults(func=cmd_grade)
