"""tests/forked_gateways.py: gateways forked from a process that has imported the gateway are the
gateway as `crawlwarden run` starts it, seen from outside (exit codes, signals, environment,
working directory, output), and a start the forker cannot stand for is an exec."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import forked_gateways
from tests.forked_gateways import FORKER_LOG
from tests.forked_gateways import ForkedProcess
from tests.forked_gateways import ask_forker
from tests.forked_gateways import current_umask
from tests.forked_gateways import fork_gateway
from tests.forked_gateways import forks
from tests.forked_gateways import run_command
from tests.support import CRAWLWARDEN
from tests.support import Gateway
from tests.support import base_policy
from tests.support import free_port


def _exec(args: list[str], log: Path, env: dict[str, str]) -> int:
    with log.open("ab") as out:
        return subprocess.run(args, stdout=out, stderr=out, env=env, timeout=60).returncode


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--no-such-flag"],  # argparse: 2
        ["run", "--policy", "/nonexistent/policy.yaml"],  # the gateway's own refusal
    ],
)
def test_a_start_that_fails_exits_and_says_as_the_command_does(tmp_path: Path, args: list[str]):
    env = {**os.environ, "PYTHONOPTIMIZE": "1"}
    forked = fork_gateway([CRAWLWARDEN, *args], env, tmp_path / "forked.log")
    code = forked.wait(60)
    assert code == _exec([CRAWLWARDEN, *args], tmp_path / "exec.log", env) != 0
    said = (tmp_path / "forked.log").read_text()
    assert said and said == (tmp_path / "exec.log").read_text()


def test_a_child_that_exits_at_once_is_not_lost(tmp_path: Path):
    # Many in a row, each reaped and its exit status written for its own handle. (The forker
    # holds SIGCHLD from each fork until it has noted the child's exit file; a child exits far
    # too late for this test to catch that window open.)
    env = {**os.environ, "PYTHONOPTIMIZE": "1"}
    started = [
        fork_gateway([CRAWLWARDEN, "--help"], env, tmp_path / f"v{i}.log") for i in range(20)
    ]
    assert [p.wait(60) for p in started] == [0] * 20
    assert (tmp_path / "v0.log").read_text().strip()


def test_a_forked_gateway_runs_with_the_tests_environment_and_directory(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(workdir)
    # (/proc/PID/environ shows the forker's: the child sets its environment as it starts)
    loud = Gateway(workdir, base_policy(), name="loud", env={"CRAWLWARDEN_LOG_LEVEL": "loud"})
    assert isinstance(loud.launch().proc, ForkedProcess)
    assert loud.proc.wait(60) == 2
    assert "crawlwarden: CRAWLWARDEN_LOG_LEVEL: 'loud' is not one of" in loud.logs()
    with Gateway(workdir, base_policy(), env={"CRAWLWARDEN_LOG_LEVEL": "WARNING"}) as gw:
        assert isinstance(gw.proc, ForkedProcess)
        assert Path(f"/proc/{gw.proc.pid}/cwd").resolve() == workdir.resolve()
        assert os.readlink(f"/proc/{gw.proc.pid}/fd/0") == os.devnull
        assert Path(os.readlink(f"/proc/{gw.proc.pid}/fd/2")) == gw.log_file
    assert gw.proc.returncode == 0
    assert gw.logs() and '"level": "info"' not in gw.logs()


def test_a_killed_gateway_reports_the_signal_as_popen_does(workdir: Path):
    gw = Gateway(workdir, base_policy()).start()
    assert isinstance(gw.proc, ForkedProcess)
    gw.kill()
    assert gw.proc.returncode == -signal.SIGKILL


def test_what_asks_something_of_the_interpreter_is_executed():
    run = [CRAWLWARDEN, "run"]
    base = {**os.environ, "PYTHONOPTIMIZE": "1"}
    assert forks(run, base)
    assert not forks(run, {**base, "PYTHONOPTIMIZE": ""})  # the restart under -O, as users start it
    assert not forks(run, {**base, "PYTHONVERBOSE": "1"})  # what a start imports
    assert not forks(run, {k: v for k, v in base.items() if k != "PYTHONOPTIMIZE"})
    assert not forks(["sh", "-c", 'umask 000; exec "$0" "$@"', *run], base)


def test_a_forked_gateway_has_the_tests_umask(workdir: Path):
    # (the forker started first, under another umask)
    env = {**os.environ, "PYTHONOPTIMIZE": "1"}
    assert fork_gateway([CRAWLWARDEN, "--help"], env, workdir / "help.log").wait(60) == 0
    before = current_umask()
    wanted = 0o027 if before != 0o027 else 0o077
    os.umask(wanted)
    try:
        gw = Gateway(workdir, base_policy()).launch()
    finally:
        os.umask(before)
    try:
        assert isinstance(gw.proc, ForkedProcess)
        gw.wait_ready()  # (the child sets its umask as it starts)
        status = Path(f"/proc/{gw.proc.pid}/status").read_text()
        assert f"Umask:\t{wanted:04o}" in status
    finally:
        gw.wait_ready()
        gw.stop()


def test_crawlwarden_test_exec_makes_every_start_an_exec(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("CRAWLWARDEN_TEST_EXEC", "1")
    with Gateway(workdir, base_policy()) as gw:
        assert isinstance(gw.proc, subprocess.Popen)


def test_a_forker_that_dies_says_why_and_the_next_start_has_a_new_one(tmp_path: Path):
    env = {**os.environ, "PYTHONOPTIMIZE": "1"}
    # An ask the forker cannot read (no exit file) ends it with a traceback, which the error
    # shows, with where the whole log is (outside any test's directory).
    with pytest.raises(RuntimeError) as failed:
        ask_forker({"argv": [CRAWLWARDEN, "--help"], "env": env})
    said = str(failed.value)
    assert "the gateway forker exited 1" in said
    assert "KeyError: 'exit_file'" in said
    assert str(FORKER_LOG) in said and FORKER_LOG.parent != tmp_path.parent
    assert fork_gateway([CRAWLWARDEN, "--help"], env, tmp_path / "after.log").wait(60) == 0


@pytest.mark.parametrize(
    "args",
    [
        ["policy", "check", "examples/policy.yaml"],  # stdout, 0
        ["policy", "check", "/nonexistent/policy.yaml"],  # stderr, the gateway's refusal
        ["audit", "verify"],  # argparse: 2
    ],
)
def test_a_command_run_forked_says_and_exits_as_the_executed_one(args: list[str]):
    forked = run_command([CRAWLWARDEN, *args], text=True)
    executed = subprocess.run([CRAWLWARDEN, *args], capture_output=True, text=True)
    assert forks([CRAWLWARDEN, *args], dict(os.environ))
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        executed.returncode,
        executed.stdout,
        executed.stderr,
    )
    assert forked.stdout or forked.stderr
    if forked.returncode:
        with pytest.raises(subprocess.CalledProcessError) as failed:
            run_command([CRAWLWARDEN, *args], check=True)
        assert failed.value.returncode == executed.returncode
        assert failed.value.stderr == executed.stderr.encode()


def test_commands_other_than_run_are_forked_without_o_as_users_run_them():
    # (`run` restarts itself under -O; `policy check`, `audit ...` run as the interpreter is)
    env = dict(os.environ)
    env.pop("PYTHONOPTIMIZE", None)
    assert forks([CRAWLWARDEN, "audit", "export"], env)
    assert not forks([CRAWLWARDEN, "run"], env)  # it would exec itself under -O
    assert forks([CRAWLWARDEN, "run"], {**env, "PYTHONOPTIMIZE": "1"})
    checked = run_command([CRAWLWARDEN, "policy", "check", "examples/policy.yaml"], env=env)
    assert checked.returncode == 0
    plain = forked_gateways._FORKERS["plain"]  # (the process that forked it)
    assert plain.poll() is None and plain.args[:2] == [sys.executable, "-c"]
    listen = ["--listen", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{free_port()}"]
    flags = run_command(
        [CRAWLWARDEN, "run", "--debug-checks", "--policy", "examples/policy.yaml", *listen],
        env={**env, "PYTHONOPTIMIZE": "1"},
        text=True,
        timeout=60,
    )
    assert "this Python runs with -O" in flags.stderr  # the -O forker's child: -O


def test_a_forked_command_past_its_timeout_is_killed(tmp_path: Path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(Path("examples/policy.yaml").read_text())
    args = [CRAWLWARDEN, "run", "--policy", str(policy), "--data-dir", str(tmp_path / "d")]
    args += ["--listen", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{free_port()}"]
    env = {**os.environ, "PYTHONOPTIMIZE": "1"}
    assert forks(args, env)
    with pytest.raises(subprocess.TimeoutExpired):
        run_command(args, env=env, timeout=3)


def test_a_child_whose_directory_is_gone_does_not_take_its_forker_with_it(tmp_path: Path):
    # (a test's tmp dir, with the exit file's place, removed while its gateway still ran)
    env = {**os.environ, "PYTHONOPTIMIZE": "1"}
    gone = tmp_path / "gone"
    gone.mkdir()
    listen = ["--listen", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{free_port()}"]
    run = [CRAWLWARDEN, "run", "--policy", "examples/policy.yaml", *listen]
    lost = fork_gateway([*run, "--data-dir", str(tmp_path / "data")], env, gone / "gw.log")
    shutil.rmtree(gone)
    lost.kill()
    time.sleep(1)  # (reaped meanwhile, its exit file unwritable)
    assert lost.poll() is None
    assert fork_gateway([CRAWLWARDEN, "--help"], env, tmp_path / "next.log").wait(60) == 0
    assert f"exit of {lost.pid} not written" in FORKER_LOG.read_text()
