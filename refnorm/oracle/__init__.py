"""The golden oracle: is another implementation of a normalization layer right, where, and by
how much?

Two lines::

    from refnorm.oracle import check
    print(check("torch", "layer_norm", dtype="bfloat16"))        # or your own candidate

:func:`check` generates the cases of each variant from a seed (:mod:`~refnorm.oracle.cases`),
computes the float64 reference (:mod:`~refnorm.oracle.reference`), runs the candidate through
an adapter (:mod:`~refnorm.oracle.adapters`: PyTorch, JAX, or any callable following the
documented protocol), and compares every output and gradient under a per-element bound derived
from the candidate's dtype and the reduction length (:mod:`~refnorm.oracle.tolerance`). The
:class:`Report` counts errors in ULPs of the candidate dtype, gives the max abs and rel error
and the worst index, and for a failure names the classic mistake it matches
(:mod:`~refnorm.oracle.mistakes`). :mod:`~refnorm.oracle.goldens` writes and verifies golden
files; ``refnorm compare`` and ``refnorm goldens`` are the command line
(:mod:`~refnorm.oracle.cli`). ``docs/howto/oracle.rst`` is the guide.
"""
from refnorm.oracle.adapters import (AdapterError, DeviceUnavailable, JaxAdapter, TorchAdapter,
                                     torch_function)
from refnorm.oracle.cases import Case, generate
from refnorm.oracle.core import check
from refnorm.oracle.formats import FORMATS, get_format, round_to, ulp
from refnorm.oracle.mistakes import MISTAKES, Mistake, student
from refnorm.oracle.reference import emulate
from refnorm.oracle.report import CaseResult, OutputResult, Report
from refnorm.oracle.tolerance import bounds
from refnorm.oracle.trajectories import TrajectoryReport, check_trajectory, torch_optimizer

__all__ = ["check", "Report", "CaseResult", "OutputResult", "Case", "generate", "bounds",
           "round_to", "ulp", "get_format", "FORMATS", "MISTAKES", "Mistake", "student", "emulate",
           "TorchAdapter", "JaxAdapter", "torch_function", "AdapterError", "DeviceUnavailable",
           "check_trajectory", "TrajectoryReport", "torch_optimizer"]
