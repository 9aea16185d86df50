"""Running a student's file in a separate process, task by task, with a time limit per task.

:func:`run_tasks` starts ``python -m refnorm.assignments._child`` on the student's file (the
grader never imports it), hands it the tasks through a JSON file, and reads one result per task
from a dedicated pipe, waiting at most ``time_limit`` seconds for each. What goes wrong costs
only the task it happens in:

* an exception or ``sys.exit`` in the student's code: caught in the child, reported for that
  task (the next task runs in the same process);
* a task that runs past its limit (an infinite loop): the child is killed, the task fails with
  "timed out", and a fresh child runs the remaining tasks; after ``max_timeouts`` timeouts the
  remaining tasks of the batch fail without running, so a file that loops everywhere costs a
  bounded time;
* a crash or ``os._exit`` (the child dies): the task fails with the exit status, a fresh child
  runs the rest;
* printing more than :data:`refnorm.assignments._child.MAX_PRINT` characters in one task: that
  call is stopped and the task fails with a message saying so;
* an error at import: every task fails with it.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from refnorm.assignments._child import decode, encode

__all__ = ["Task", "TaskResult", "run_tasks", "DEFAULT_TIME_LIMIT"]

#: seconds a task may run (the CLI's ``--time-limit``); generous: machines are shared
DEFAULT_TIME_LIMIT = 10.0


@dataclass
class Task:
    id: str
    driver: str
    args: dict


@dataclass
class TaskResult:
    id: str
    outputs: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)    # stage -> message
    mutated: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)      # output -> {"dtype", "shape"}
    printed: int = 0
    fatal: str = ""                               # timed out, crashed, import error, not run

    @property
    def message(self):
        if self.fatal:
            return self.fatal
        return "; ".join(self.errors.values())


def _env():
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = "1"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


class _Child:
    def __init__(self, path, tasks, workdir):
        self.request = os.path.join(workdir, f"request-{time.monotonic_ns()}.json")
        with open(self.request, "w") as f:
            json.dump({"file": path, "tasks": [{"id": t.id, "driver": t.driver,
                                                "args": encode(t.args)} for t in tasks]}, f)
        r, w = os.pipe()
        self.log = open(os.path.join(workdir, "output.log"), "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "refnorm.assignments._child", self.request, str(w)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, pass_fds=(w,),
            cwd=workdir, env=_env(), start_new_session=True)
        os.close(w)
        self.fd = r
        self.buf = b""

    def read(self, timeout):
        """The next JSON message; ``"timeout"`` or ``"eof"``."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                return "timeout"
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                return "eof"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            return "eof"

    def exit_status(self):
        try:
            code = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.wait()
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            return f"the process was killed by signal {name} (a crash)"
        return f"the process exited with status {code} (os._exit or a crash)"

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self):
        self.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process that survives SIGKILL
            pass
        os.close(self.fd)
        self.log.close()
        try:
            os.unlink(self.request)
        except OSError:
            pass


def run_tasks(path, tasks, time_limit=DEFAULT_TIME_LIMIT, max_timeouts=2):
    """Run ``tasks`` on the student's file ``path``; returns ``{task.id: TaskResult}``.

    Each task gets ``time_limit`` seconds (the first also covers importing the file).
    """
    path = os.path.abspath(path)
    results = {}
    pending = list(tasks)
    timeouts = 0
    with tempfile.TemporaryDirectory(prefix="refnorm-grade-") as workdir:
        while pending:
            child = _Child(path, pending, workdir)
            try:
                first = child.read(time_limit + 5.0)   # start-up (numpy) and the import
                if first == "timeout":
                    msg = (f"importing the file did not finish within {time_limit + 5.0:g} s "
                           f"(an infinite loop at module level?)")
                    for t in pending:
                        results[t.id] = TaskResult(t.id, fatal=msg)
                    return results
                if first == "eof" or "import_error" in first:
                    msg = first["import_error"] if isinstance(first, dict) else \
                        "the process died while importing the file: " + child.exit_status()
                    for t in pending:
                        results[t.id] = TaskResult(t.id, fatal=msg)
                    return results
                restart = False
                for i, t in enumerate(pending):
                    msg = child.read(time_limit)
                    if isinstance(msg, dict):
                        results[t.id] = TaskResult(
                            t.id, {k: decode(v) for k, v in msg.get("outputs", {}).items()},
                            dict(msg.get("errors", {})), list(msg.get("mutated", [])),
                            dict(msg.get("meta", {})), int(msg.get("printed", 0)))
                        continue
                    if msg == "timeout":
                        timeouts += 1
                        results[t.id] = TaskResult(t.id, fatal=(
                            f"timed out: no result within the time limit of {time_limit:g} s "
                            f"(an infinite loop, or far too slow)"))
                    else:
                        results[t.id] = TaskResult(t.id, fatal="no result: " +
                                                   child.exit_status())
                    pending = pending[i + 1:]
                    restart = True
                    break
                if not restart:
                    pending = []
                if timeouts >= max_timeouts and pending:
                    for t in pending:
                        results[t.id] = TaskResult(t.id, fatal=(
                            f"not run: {timeouts} earlier calls timed out "
                            f"(limit {time_limit:g} s each)"))
                    pending = []
            finally:
                child.close()
    return results
