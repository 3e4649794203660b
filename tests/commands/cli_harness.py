"""Run the real `ctxtune` CLI in real processes, fast (used by conftest.py's `cli_process` fixture).

`cli_process` is a small fork server: one Python process imports `ctxtune.cli` (torch included) once,
then forks a child per request that sets argv, cwd, environment and stdout/stderr files and calls
`ctxtune.cli.main()`, the console entry point, exactly as `ctxtune ARGS` does, then exits with its
code. A start-up costs milliseconds instead of seconds, so a table of many hostile inputs stays fast.
The server installs a tripwire: if anything calls `torch.load`, `pickle.load` or `pickle.loads`, the
child exits at once with code 97 (nothing is ever unpickled).

A request may carry a `prelude`: Python code run in the child before `main()` (fault injection).
`spawn_cli` runs the same request through a fresh `python -m ctxtune.cli` instead.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
UNPICKLED = 97  # exit code of a child that tried to unpickle

SERVER = r"""
import json, os, pickle, sys, traceback
os.environ["OMP_NUM_THREADS"] = "1"
import torch
torch.set_num_threads(1)
import ctxtune.cli
import ctxtune.train.run, rich.console, rich.progress  # warm up what every child would import
torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # its first use imports torch._dynamo (seconds)

def tripwire(*args, **kwargs):
    os.write(2, b"TRIPWIRE: something tried to unpickle\n")
    os._exit(97)

torch.load = pickle.load = pickle.loads = tripwire
reply = os.fdopen(int(sys.argv[1]), "w", buffering=1)
for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.chdir(req["cwd"])
            os.environ.update(req["env"])
            os.dup2(os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
            os.dup2(os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            exec(req["prelude"], {"__name__": "prelude"})
            sys.argv = ["ctxtune", *req["argv"]]
            code = 0
            try:
                ctxtune.cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    reply.write(json.dumps({"pid": pid}) + "\n")
    _, status = os.waitpid(pid, 0)
    reply.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
"""


@dataclass
class CliRun:
    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stderr.splitlines()


class CliProcess:
    """The fork server (see the module docstring); `run` is safe to call many times."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        read_fd, write_fd = os.pipe()
        env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(write_fd)],
            stdin=subprocess.PIPE, text=True, env=env, pass_fds=(write_fd,),
        )  # fmt: skip
        os.close(write_fd)
        self.replies, self.buffer = read_fd, b""
        self.count = 0

    def run(
        self, argv: list[str], cwd: Path, env: dict[str, str] | None = None, prelude: str = "", timeout: float = 120
    ) -> CliRun:
        """`ctxtune ARGV` in `cwd`; a child still running after `timeout` seconds is killed (code -9)."""
        self.count += 1
        out, err = self.workdir / f"{self.count}.out", self.workdir / f"{self.count}.err"
        request = {"argv": argv, "cwd": str(cwd), "env": env or {}, "prelude": prelude,
                   "stdout": str(out), "stderr": str(err)}  # fmt: skip
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.reply(timeout=60))["pid"]
        line = self.reply(timeout)
        if line is None:  # still running: kill the child (not yet reaped, so the pid is still its own)
            os.kill(pid, signal.SIGKILL)
            line = self.reply(timeout=60)
        code = json.loads(line)["code"]
        return CliRun(code, out.read_text(), err.read_text())

    def reply(self, timeout: float) -> str | None:
        """The server's next reply line, or None after `timeout` seconds without one."""
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.replies], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self.replies, 4096)
            if not chunk:
                raise RuntimeError("the ctxtune fork server exited")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        os.close(self.replies)


def spawn_cli(argv: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> CliRun:
    """`python -m ctxtune.cli ARGV` in a fresh process (no tripwire)."""
    full_env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "ctxtune.cli", *argv], cwd=cwd, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    return CliRun(proc.returncode, proc.stdout, proc.stderr)
