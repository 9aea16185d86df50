"""Course assignments, with starter files, reference solutions and an autograder.

Six assignments, each a single Python file a student fills in (NumPy only):

=======================  ===================================================================
``autograd_primitives``  1. the backward of mul, matmul and sum, with broadcasting (unbroadcast)
``batch_norm``           2. BatchNorm forward and backward, training and evaluation, running
                         statistics
``layer_group_norm``     3. LayerNorm and GroupNorm, forward and backward
``rms_norm``             4. RMSNorm backward, with the eps placement as a parameter
``ws_adamp``             5. Weight Standardization (forward, backward) and one AdamP step
``gradient_checker``     6. a gradient checker: central differences with a chosen step
=======================  ===================================================================

The starter of each (``starters/NAME.py``, package data) has the signatures, docstrings with
the math and the conventions, ``raise NotImplementedError`` bodies, and a local self-check
(``python NAME.py``). The reference solution (``solutions/NAME.py``, for staff) is the same file
with the bodies written: the starter is derived from it (:func:`starter_text`), the code between
``# BEGIN SOLUTION`` and ``# END SOLUTION`` replaced by ``raise NotImplementedError``, so the two
cannot drift apart (a test checks the shipped starter against the derivation).

``refnorm assignment list | new NAME DIR | solution NAME DIR`` and ``refnorm grade NAME FILE``
are the command line; :func:`refnorm.assignments.grader.grade` is the grader, and
``docs/howto/teaching.rst`` the guide for a course's staff.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources

__all__ = ["Assignment", "ASSIGNMENTS", "get", "starter_text", "solution_text", "write_starter",
           "write_solution", "derive_starter"]


@dataclass(frozen=True)
class Assignment:
    number: int
    name: str
    title: str
    summary: str

    @property
    def filename(self):
        return f"{self.name}.py"


ASSIGNMENTS = (
    Assignment(1, "autograd_primitives", "Assignment 1: autograd primitives",
               "the backward of mul, matmul and sum with broadcasting, and unbroadcast"),
    Assignment(2, "batch_norm", "Assignment 2: BatchNorm",
               "forward and backward, in training and in evaluation, with running statistics"),
    Assignment(3, "layer_group_norm", "Assignment 3: LayerNorm and GroupNorm",
               "forward and backward of LayerNorm and GroupNorm"),
    Assignment(4, "rms_norm", "Assignment 4: RMSNorm",
               "forward and backward, with the eps placement (inside or outside the sqrt)"),
    Assignment(5, "ws_adamp", "Assignment 5: Weight Standardization and AdamP",
               "Weight Standardization forward and backward, and one AdamP step"),
    Assignment(6, "gradient_checker", "Assignment 6: a gradient checker",
               "numerical Jacobians by central differences with a chosen step, and gradcheck"),
)
_BY_NAME = {a.name: a for a in ASSIGNMENTS}


def get(name) -> Assignment:
    """The assignment by name (or number, as a string or int)."""
    if str(name).isdigit() and 1 <= int(name) <= len(ASSIGNMENTS):
        return ASSIGNMENTS[int(name) - 1]
    if name not in _BY_NAME:
        raise ValueError(f"unknown assignment {name!r}; known: {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def _read(folder, name):
    return resources.files("refnorm.assignments").joinpath(folder, get(name).filename) \
        .read_text(encoding="utf-8")


def solution_text(name) -> str:
    """The reference solution's source (for staff)."""
    return _read("solutions", name)


def starter_text(name) -> str:
    """The starter file's source, as shipped."""
    return _read("starters", name)


_BLOCK = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION\n.*?^[ \t]*# END SOLUTION\n",
                    re.S | re.M)


def derive_starter(solution: str) -> str:
    """The starter from a solution: each marked block becomes ``raise NotImplementedError``,
    and lines tagged ``# SOLUTION ONLY`` go."""
    text = _BLOCK.sub(lambda m: f"{m.group('indent')}raise NotImplementedError(\"your code "
                      f"here\")\n", solution)
    text = "\n".join(line for line in text.split("\n") if "# SOLUTION ONLY" not in line)
    return text.replace("REFERENCE SOLUTION (for staff)", "STARTER")


def _write(text, name, directory, force):
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, get(name).filename)
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{path} exists (pass force=True / --force to overwrite)")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def write_starter(name, directory, force=False) -> str:
    """Write the starter file into ``directory``; returns its path."""
    return _write(starter_text(name), name, directory, force)


def write_solution(name, directory, force=False) -> str:
    """Write the reference solution into ``directory``; returns its path."""
    return _write(solution_text(name), name, directory, force)
