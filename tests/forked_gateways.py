"""Gateway processes forked from one that has already imported the gateway (tests only).

A third of the suite's CPU went to starting gateways (~320 starts), and ~1.5 s of each start's
~2.2 s of CPU is importing: mitmproxy, aiohttp, pydantic, redis, the gateway's own modules. Each
test worker keeps one process (the "forker") that has imported all of that under `python -O`,
as `crawlwarden run` does, and forks it for each gateway a test starts. The child is then the
gateway as a user runs it from there on: `proxy.cli.main` with the same arguments, environment,
working directory, umask and stdout/stderr file, under the same interpreter flags. What it skips
is only the interpreter's start and the imports, whose code is the same. (/proc/PID/cmdline and
/proc/PID/environ show the forker's: the child sets its own as it starts.)

tests/support.py's Gateway starts through the forker when the command is `crawlwarden` itself
(not a shell that sets something up and execs it) and its environment asks nothing of the
interpreter that the forker's does not (a PYTHON* variable of its own: the tests of the restart
under -O, of what is imported), and execs it otherwise.
CRAWLWARDEN_TEST_EXEC=1 makes every start an exec (to rule the forker out of a failure).

The forker is the children's parent: it reaps them and writes each exit status to a file that
ForkedProcess, the Popen-like handle the tests use, reads.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# The forker's program. Its loop runs in the forker; `child` returns in each forked child only,
# which then runs the gateway's command-line entry point at the top level, so that its exit
# (sys.exit, an uncaught exception, a signal) is the interpreter's own as in `crawlwarden run`.
_PROGRAM = r"""
import json, os, signal, sys

from addons import mitmproxy_package

mitmproxy_package.without_default_addons()
# What `crawlwarden run` imports before it serves (proxy/cli.py cmd_run).
import proxy.app, proxy.audit.keys, proxy.cli, proxy.logs, proxy.policy, proxy.runtime

exit_files = {}


def reap(signum, frame):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        path = exit_files.pop(pid, None)
        if path is not None:
            with open(path + ".tmp", "w") as f:
                f.write(str(os.waitstatus_to_exitcode(status)))
            os.replace(path + ".tmp", path)


def child():
    signal.signal(signal.SIGCHLD, reap)
    out = sys.stdout
    for line in sys.stdin:
        ask = json.loads(line)
        # (SIGCHLD held until the child's exit file is known: one that exits at once is reaped
        # with its file named)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            return ask
        exit_files[pid] = ask["exit_file"]
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
    os._exit(0)  # the tests' process is gone


ask = child()
null = os.open(os.devnull, os.O_RDONLY)
log = os.open(ask["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.dup2(null, 0)
os.dup2(log, 1)
os.dup2(log, 2)
os.close(null)
os.close(log)
os.chdir(ask["cwd"])
os.umask(ask["umask"])
os.environ.clear()
os.environ.update(ask["env"])
sys.argv = ask["argv"]
del ask, child, reap, exit_files
sys.exit(proxy.cli.main(sys.argv[1:]))
"""

_LOCK = threading.Lock()
_FORKER: subprocess.Popen[str] | None = None
_FORKER_ENV = {**os.environ, "PYTHONOPTIMIZE": "1"}
# The forker's stderr: one file per test worker, outside any test's directory (pytest prunes
# those), kept after the run if the last forker failed.
FORKER_LOG = Path(tempfile.gettempdir()) / f"crawlwarden-test-forker-{os.getpid()}.log"


def forks(args: list[str], env: dict[str, str]) -> bool:
    """Whether this command, with this environment, starts through the forker: `crawlwarden`
    itself (not a shell that sets something up and execs it), asking nothing of the interpreter
    that the forker's does not have."""
    if os.environ.get("CRAWLWARDEN_TEST_EXEC", "") not in ("", "0"):
        return False
    if Path(args[0]).name != "crawlwarden":
        return False
    names = {n for n in (*env, *_FORKER_ENV) if n.startswith("PYTHON")}
    return all(env.get(n) == _FORKER_ENV.get(n) for n in names)


def _forker() -> subprocess.Popen[str]:
    global _FORKER
    if _FORKER is None or _FORKER.poll() is not None:
        with FORKER_LOG.open("ab") as log:
            _FORKER = subprocess.Popen(
                [sys.executable, "-O", "-c", _PROGRAM],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=_FORKER_ENV,
                text=True,
            )
    return _FORKER


@atexit.register
def _stop_forker() -> None:
    if _FORKER is None:
        return
    if _FORKER.poll() is None:
        assert _FORKER.stdin is not None
        _FORKER.stdin.close()
        try:
            _FORKER.wait(10)
        except subprocess.TimeoutExpired:
            _FORKER.kill()
    if _FORKER.returncode == 0:
        # (kept when the last forker failed; an earlier one's end was in the error it gave)
        FORKER_LOG.unlink()


class ForkedProcess:
    """The parts of subprocess.Popen the tests use, for a gateway the forker started."""

    def __init__(self, args: list[str], pid: int, exit_file: Path):
        self.args = args
        self.pid = pid
        self.returncode: int | None = None
        self._exit_file = exit_file

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self.returncode = int(self._exit_file.read_text())
            except FileNotFoundError:
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            time.sleep(0.01)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def current_umask() -> int:
    """This process's umask, which a child it started would have (read, not set and reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise RuntimeError("no Umask in /proc/self/status")


def fork_gateway(args: list[str], env: dict[str, str], log_file: Path) -> ForkedProcess:
    """Start `args` (`crawlwarden run ...`) as a child of the forker, its output to `log_file`."""
    exit_file = log_file.with_name(f"{log_file.name}.exit-{time.monotonic_ns()}")
    ask = {
        "argv": args,
        "env": env,
        "log": str(log_file),
        "cwd": os.getcwd(),
        "umask": current_umask(),
        "exit_file": str(exit_file),
    }
    return ForkedProcess(args, ask_forker(ask), exit_file)


def ask_forker(ask: dict[str, object]) -> int:
    """Hand the forker one start; the child's pid. A forker that dies on the way is an error that
    shows the end of its log (a new one is started for the next start)."""
    with _LOCK:
        forker = _forker()
        assert forker.stdin is not None and forker.stdout is not None
        try:
            forker.stdin.write(json.dumps(ask) + "\n")
            forker.stdin.flush()
            answer = forker.stdout.readline()
        except BrokenPipeError:  # (it had died since it was found alive)
            answer = ""
        if answer:
            return int(json.loads(answer)["pid"])
        try:
            code: int | str = forker.wait(10)
        except subprocess.TimeoutExpired:
            forker.kill()
            code = "nothing (it had stopped answering, and was killed)"
        for pipe in (forker.stdin, forker.stdout):
            try:
                pipe.close()
            except BrokenPipeError:  # (what was left unwritten)
                pass
        said = FORKER_LOG.read_text(errors="replace")[-4000:]
    raise RuntimeError(f"the gateway forker exited {code}; the end of {FORKER_LOG}:\n{said}")
