"""`crawlwarden` processes forked from one that has already imported the gateway (tests only).

A third of the suite's CPU went to starting gateways (~320 starts), and most of each start's
CPU is importing (1.5 s of ~2.2 s on one host, ~3 s on another): mitmproxy, aiohttp, pydantic,
redis, the gateway's own modules; the suite's ~130 other commands (`audit export`, `policy
check`, `report`, ...) paid the same. Each test worker keeps up to two processes (the
"forkers") that have imported all of that: one under `python -O`, as `crawlwarden run` runs, for
gateways, and one as the tests' interpreter runs, for the other commands, which users run
without -O. A forker forks for each command a test starts. The child is then the command as a
user runs it from there on: `proxy.cli.main` with the same arguments, environment, working
directory, umask and output files, under the same interpreter flags. What it skips is only the
interpreter's start and the imports, whose code is the same. (/proc/PID/cmdline and
/proc/PID/environ show the forker's: the child sets its own as it starts.)

tests/support.py's Gateway starts through a forker, and `run_command` runs a command through
one, when the command is `crawlwarden` itself (not a shell that sets something up and execs it)
and its environment asks nothing of the interpreter that a forker's does not (a PYTHON*
variable of its own: the tests of the restart under -O, of what is imported); they exec it
otherwise. CRAWLWARDEN_TEST_EXEC=1 makes every start an exec (to rule the forkers out of a
failure).

A forker is its children's parent: it reaps them and writes each exit status to a file that
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
            try:
                with open(path + ".tmp", "w") as f:
                    f.write(str(os.waitstatus_to_exitcode(status)))
                os.replace(path + ".tmp", path)
            except OSError as e:  # its directory gone with its test: no one waits for it
                print(f"forker: exit of {pid} not written: {e}", file=sys.stderr, flush=True)


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
os.dup2(null, 0)
os.close(null)
for fd, path in ((1, ask["stdout"]), (2, ask["stderr"])):
    out = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(out, fd)
    os.close(out)
os.chdir(ask["cwd"])
os.umask(ask["umask"])
os.environ.clear()
os.environ.update(ask["env"])
sys.argv = ask["argv"]
del ask, child, reap, exit_files, fd, path, out
# As the console script calls it: main() reads sys.argv and, for `run`, does what only the
# command itself does (the -O check, the SIGTERM handler while it starts)
sys.exit(proxy.cli.main())
"""

_LOCK = threading.Lock()
# Two forkers per worker: under -O for `crawlwarden run` (it restarts itself under -O), and as
# the tests' own interpreter for the other commands (`audit export`, `policy check`, ...), which
# users run without it.
_FORKER_ENVS = {
    "optimized": {**os.environ, "PYTHONOPTIMIZE": "1"},
    "plain": {k: v for k, v in os.environ.items() if k != "PYTHONOPTIMIZE"},
}
_FORKERS: dict[str, subprocess.Popen[str]] = {}
# The forkers' stderr: one file per test worker, outside any test's directory (pytest prunes
# those), kept after the run if a forker failed.
FORKER_LOG = Path(tempfile.gettempdir()) / f"crawlwarden-test-forker-{os.getpid()}.log"


def _flavour(args: list[str], env: dict[str, str]) -> str | None:
    """The forker this command starts from, or None for an exec: `crawlwarden` itself (not a
    shell that sets something up and execs it), asking nothing of the interpreter that the
    forker's does not have. `run` without -O restarts itself under -O: an exec either way."""
    if os.environ.get("CRAWLWARDEN_TEST_EXEC", "") not in ("", "0"):
        return None
    if Path(args[0]).name != "crawlwarden":
        return None
    for flavour, forker_env in _FORKER_ENVS.items():
        names = {n for n in (*env, *forker_env) if n.startswith("PYTHON")}
        if all(env.get(n) == forker_env.get(n) for n in names):
            if flavour == "plain" and args[1:2] == ["run"]:
                return None
            return flavour
    return None


def forks(args: list[str], env: dict[str, str]) -> bool:
    """Whether this command, with this environment, starts through a forker."""
    return _flavour(args, env) is not None


def _forker(flavour: str) -> subprocess.Popen[str]:
    forker = _FORKERS.get(flavour)
    if forker is None or forker.poll() is not None:
        flags = ["-O"] if flavour == "optimized" else []
        with FORKER_LOG.open("ab") as log:
            forker = _FORKERS[flavour] = subprocess.Popen(
                [sys.executable, *flags, "-c", _PROGRAM],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=_FORKER_ENVS[flavour],
                text=True,
            )
    return forker


@atexit.register
def _stop_forkers() -> None:
    for forker in _FORKERS.values():
        if forker.poll() is None:
            assert forker.stdin is not None
            forker.stdin.close()
            try:
                forker.wait(10)
            except subprocess.TimeoutExpired:
                forker.kill()
                forker.wait(10)
    if _FORKERS and all(f.returncode == 0 for f in _FORKERS.values()):
        # (kept when the last forker of a kind failed; an earlier one's end was in its error)
        FORKER_LOG.unlink(missing_ok=True)


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
    """Start `args` (`crawlwarden run ...`) as a child of a forker, its output to `log_file`."""
    flavour = _flavour(args, env)
    if flavour is None:
        raise ValueError(f"{args[:2]} with this environment is not forked (forks())")
    return _fork(flavour, args, env, log_file, log_file, log_file.parent)


def _fork(
    flavour: str,
    args: list[str],
    env: dict[str, str],
    stdout: Path,
    stderr: Path,
    exits: Path,
    cwd: Path | None = None,
) -> ForkedProcess:
    exit_file = exits / f"{stdout.name}.exit-{time.monotonic_ns()}"
    ask = {
        "argv": args,
        "env": env,
        "stdout": str(stdout),
        "stderr": str(stderr),
        "cwd": str(cwd or os.getcwd()),
        "umask": current_umask(),
        "exit_file": str(exit_file),
    }
    return ForkedProcess(args, ask_forker(ask, flavour), exit_file)


def run_command(
    args: Sequence[str | os.PathLike[str]],
    *,
    text: bool = False,
    check: bool = False,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    cwd: Path | str | None = None,
) -> subprocess.CompletedProcess[Any]:
    """`subprocess.run(args, capture_output=True, ...)` for a `crawlwarden` command, forked where
    forks() says it can be (stdin /dev/null, as pytest gives an exec'd one), exec'd otherwise."""
    environ = dict(os.environ) if env is None else env
    argv = [os.fspath(a) for a in args]
    flavour = _flavour(argv, environ)
    if flavour is None:
        return subprocess.run(
            args,
            capture_output=True,
            text=text,
            check=check,
            env=env,
            timeout=timeout,
            cwd=cwd,
        )
    with tempfile.TemporaryDirectory(prefix="crawlwarden-command-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = _fork(flavour, argv, environ, out, err, Path(tmp), Path(cwd) if cwd else None)
        try:
            code: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            code = None

        def said(path: Path) -> Any:
            data = path.read_bytes() if path.exists() else b""
            return data.decode() if text else data

        stdout, stderr = said(out), said(err)
    if code is None:
        raise subprocess.TimeoutExpired(args, timeout or 0, stdout, stderr)
    if check and code:
        raise subprocess.CalledProcessError(code, args, stdout, stderr)
    return subprocess.CompletedProcess(args, code, stdout, stderr)


def ask_forker(ask: dict[str, object], flavour: str = "optimized") -> int:
    """Hand a forker one start; the child's pid. A forker that dies on the way is an error that
    shows the end of its log (a new one is started for the next start)."""
    with _LOCK:
        forker = _forker(flavour)
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
