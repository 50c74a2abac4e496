"""The `crawlwarden` command line (DESIGN.md, "CLI").

Every flag of `run` also reads from CRAWLWARDEN_<FLAG> (e.g. CRAWLWARDEN_REDIS_URL), so the Helm
chart can configure a replica through its environment; `audit export` and `report` read the
fetch log that environment names (CRAWLWARDEN_AUDIT_DSN, CRAWLWARDEN_DATA_DIR) unless told.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from proxy.audit.query import DECISIONS

if TYPE_CHECKING:
    from proxy.runtime import Settings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _env(flag: str, default: str | None = None) -> str | None:
    return os.environ.get("CRAWLWARDEN_" + flag.upper().replace("-", "_"), default)


def _env_flag(flag: str) -> bool:
    value = (_env(flag, "") or "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    name = "CRAWLWARDEN_" + flag.upper().replace("-", "_")
    print(f"crawlwarden: {name}={value!r} is not a yes/no value; use 1 or 0", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


# `run` restarts itself under `python -O`: mitmproxy type-checks every field of every HTTP message
# and every event its layers receive inside `if __debug__:` blocks, debug aids that validate
# nothing a client or site sends, and -O compiles them (and every `assert`) out. Measured in
# bench/README.md: 11-13 % less CPU per request. `--debug-checks` keeps them, e.g. to chase a
# mitmproxy bug.
def run_optimized(debug_checks: bool) -> None:
    """Replace this process with the same command under `python -O`, unless it already runs so
    or `--debug-checks` asks to keep Python's debug checks. Returns only if it did not."""
    if debug_checks:
        if sys.flags.optimize:
            print(
                "crawlwarden: --debug-checks: this Python runs with -O (is PYTHONOPTIMIZE set?), "
                "which has removed the checks; unset it",
                file=sys.stderr,
            )
            raise SystemExit(EXIT_USAGE)
        return
    if sys.flags.optimize or not sys.executable:
        return
    argv = [sys.executable, "-O", *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, argv)  # noqa: S606 - this same command, no shell
    except OSError as e:
        raise SystemExit(
            f"crawlwarden: cannot restart under python -O: {e}; "
            "run with --debug-checks to start without it"
        ) from e


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - an explicit ":PORT"


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _log_level(text: str) -> str:
    if text.strip().upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return text.strip().upper()


# The typed flags of `run` whose value may come from the environment: read once `run` is the
# command (a bad value there must not break `policy check` or `--help`), checked as the flag is.
_RUN_FROM_ENV: dict[str, tuple[Callable[[str], Any], Any]] = {
    "listen": (_hostport, _hostport("127.0.0.1:8080")),
    "admin": (_hostport, _hostport("127.0.0.1:9090")),
    "drain_seconds": (_seconds, 30.0),
    "fleet_size": (_positive_int, 1),
    "log_level": (_log_level, "INFO"),
}


def _run_flags_from_env(args: argparse.Namespace) -> None:
    for flag, (parse, default) in _RUN_FROM_ENV.items():
        if getattr(args, flag) is not None:
            continue
        name = "CRAWLWARDEN_" + flag.upper()
        raw = os.environ.get(name)
        try:
            setattr(args, flag, default if raw is None else parse(raw))
        except argparse.ArgumentTypeError as e:
            print(f"crawlwarden: {name}: {e}", file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crawlwarden",
        description="An egress gateway that makes web collection lawful, polite and provable.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="start the gateway")
    run.add_argument(
        "--policy",
        type=Path,
        default=_env("policy"),
        required=_env("policy") is None,
        help="policy file (YAML) [CRAWLWARDEN_POLICY]",
    )
    run.add_argument(
        "--listen",
        type=_hostport,
        default=None,  # then CRAWLWARDEN_LISTEN (_run_flags_from_env)
        help="proxy address [127.0.0.1:8080, CRAWLWARDEN_LISTEN]",
    )
    run.add_argument(
        "--admin",
        type=_hostport,
        default=None,  # then CRAWLWARDEN_ADMIN
        help="admin API address [127.0.0.1:9090, CRAWLWARDEN_ADMIN]",
    )
    run.add_argument(
        "--redis-url",
        default=_env("redis_url"),
        help="share budgets, pauses, blocklist and caches through Redis [CRAWLWARDEN_REDIS_URL]",
    )
    run.add_argument(
        "--audit-dsn",
        default=_env("audit_dsn"),
        help="postgresql://... for the fetch log (default: SQLite in the data dir) "
        "[CRAWLWARDEN_AUDIT_DSN]",
    )
    run.add_argument(
        "--data-dir",
        type=Path,
        default=Path(_env("data_dir", ".crawlwarden") or ".crawlwarden"),
        help="CA, spool, embedded fetch log [./.crawlwarden, CRAWLWARDEN_DATA_DIR]",
    )
    run.add_argument(
        "--replica-id",
        default=_env("replica_id", ""),
        help="this replica's name in fetch records [hostname, CRAWLWARDEN_REPLICA_ID]",
    )
    run.add_argument(
        "--upstream-trusted-ca",
        type=Path,
        default=_env("upstream_trusted_ca"),
        help="PEM file of CAs trusted for sites' certificates, instead of the system store "
        "[CRAWLWARDEN_UPSTREAM_TRUSTED_CA]",
    )
    run.add_argument(
        "--drain-seconds",
        type=_seconds,
        help="on SIGTERM, how long requests in flight may take to finish "
        "[30, CRAWLWARDEN_DRAIN_SECONDS]",
    )
    run.add_argument(
        "--fleet-size",
        type=_positive_int,
        help="the fewest replicas the fleet is taken to have while Redis is down, for "
        "`fail_mode: local` shares (a replica that starts without Redis has seen none) "
        "[1, CRAWLWARDEN_FLEET_SIZE]",
    )
    run.add_argument(
        "--log-level",
        type=_log_level,
        metavar="{" + ",".join(LOG_LEVELS) + "}",
        help="[INFO, CRAWLWARDEN_LOG_LEVEL]",
    )
    run.add_argument(
        "--debug-checks",
        action="store_true",
        default=None,  # then CRAWLWARDEN_DEBUG_CHECKS, read by `run` only (main)
        help="keep Python's assert statements and mitmproxy's debug-only checks (the gateway "
        "otherwise restarts itself under python -O; ~13%% more CPU per request) "
        "[CRAWLWARDEN_DEBUG_CHECKS=1]",
    )

    policy = sub.add_parser("policy", help="work with policy files")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")
    check = policy_sub.add_parser("check", help="validate a policy file")
    check.add_argument("file", type=Path)
    check.add_argument(
        "--no-file-checks",
        action="store_true",
        help="do not read the files the policy names (the signing key) nor the environment "
        "variables its token_env entries name (unset or equal, they are no error): for a "
        "policy checked away from where the gateway runs, such as in its repository's CI",
    )

    audit = sub.add_parser("audit", help="fetch log export and verification")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    export = audit_sub.add_parser("export", help="write fetch records as JSONL or CSV")
    _add_source_args(export)
    export.add_argument("--since", help="from this time on (ISO 8601, UTC if no zone)")
    export.add_argument("--until", help="before this time (ISO 8601)")
    export.add_argument("--site", help="only this site key")
    export.add_argument("--team", help="only this team")
    export.add_argument("--project", help="only this project")
    export.add_argument(
        "--decision", choices=DECISIONS, help="only this decision (others redacted)"
    )
    export.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    export.add_argument("--output", type=Path, help="write here instead of stdout")
    verify = audit_sub.add_parser("verify", help="check an export's chains and signatures")
    verify.add_argument("file", type=Path, help="a JSONL export")
    verify.add_argument(
        "--public-key",
        type=Path,
        required=True,
        action="append",
        help="the Ed25519 public key; give it again for each key the log was signed with "
        "(a key changed: the gateway records a signing_key event)",
    )
    verify.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="accept records no checkpoint covers (warned about, not proven); without it "
        "they fail the check",
    )
    verify.add_argument(
        "--rotation-grace",
        type=float,
        metavar="SECONDS",
        help="with several --public-key: how long an earlier key may still sign after a later "
        "one first did (a fleet's rolling restart onto the new key; default 3600)",
    )

    report = sub.add_parser("report", help="the insubstantiality report, per site and period")
    _add_source_args(report)
    report.add_argument("--since", help="from this time on (ISO 8601, UTC if no zone)")
    report.add_argument("--until", help="before this time (ISO 8601)")
    report.add_argument("--format", choices=["html", "csv", "json"], default="html")
    report.add_argument(
        "--policy",
        type=Path,
        default=_env("policy"),
        help="the policy whose budgets the figures are set against [CRAWLWARDEN_POLICY]",
    )
    report.add_argument("--output", type=Path, help="write here instead of stdout")

    from proxy.takedowns_cli import add_parser as add_takedown_parser

    add_takedown_parser(sub)

    keys = sub.add_parser("keys", help="audit signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    generate = keys_sub.add_parser("generate", help="write a new Ed25519 key pair (PEM)")
    generate.add_argument("--private", type=Path, required=True, help="private key (mode 0600)")
    generate.add_argument("--public", type=Path, required=True, help="public key")
    return parser


def _add_source_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="embedded fetch log in this data dir [./.crawlwarden, CRAWLWARDEN_DATA_DIR]",
    )
    group.add_argument(
        "--audit-dsn", default=None, help="postgresql://... fetch log [CRAWLWARDEN_AUDIT_DSN]"
    )


def _source_from_env(args: argparse.Namespace) -> None:
    """The fetch log a command reads, as `run` would find it: a flag given wins; else
    CRAWLWARDEN_AUDIT_DSN (PostgreSQL), else CRAWLWARDEN_DATA_DIR (what a replica's pod has
    in its environment, so `kubectl exec ... crawlwarden report` reads the replica's log)."""
    if args.audit_dsn is None and args.data_dir is None:
        args.audit_dsn = _env("audit_dsn") or None
        if args.audit_dsn is None and _env("data_dir"):
            args.data_dir = Path(_env("data_dir") or "")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        _run_flags_from_env(args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _dispatch(args, argv)
    except BrokenPipeError:
        # The reader went away (`crawlwarden audit verify ... | head`): what it did not read
        # is not wanted. Point stdout at /dev/null, so that flushing it at exit fails no more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED


class StartReloads:
    """SIGHUPs that come while `run` starts, before the gateway's own handler takes over
    (proxy/app.py serve, once the fetch log is open and the admin API listens: 2-3 s in).

    SIGHUP ends a process by default, and a reload signal may come at any time (a config
    reloader, an operator's `kill -HUP`): from here on it never does. What comes is counted,
    and the gateway reloads once for them as soon as it has started, so a policy file changed
    after start-up read it still takes effect. Across the exec into `python -O` the signal is
    ignored (a handler does not survive exec, SIG_IGN does): that is before the policy is read.
    """

    def __init__(self) -> None:
        self.count = 0

    def ignore_across_exec(self) -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def install(self) -> None:
        signal.signal(signal.SIGHUP, self._received)

    def _received(self, signum: int, frame: object) -> None:
        self.count += 1

    def pending(self) -> int:
        return self.count


EXIT_TERMINATED = 128 + signal.SIGTERM


def stop_while_starting(signum: int, frame: object) -> None:
    """SIGTERM while `run` starts, before the gateway's drain handler takes over (proxy/app.py
    serve). In a pod the gateway is PID 1 (the image's ENTRYPOINT, the chart's command), and
    the kernel gives PID 1 no default action for a signal it has no handler for: the SIGTERM of
    a pod deleted while it starts (waiting up to a minute for PostgreSQL, say) was dropped, and
    the pod went only at the kubelet's SIGKILL, a grace period later. Nothing has been forwarded
    yet: the process ends now, as a process that is not PID 1 would."""
    # os.write, not print: a handler that interrupts a write to stderr may not write to it
    # through the same buffer ("reentrant call").
    os.write(2, b"crawlwarden: stopped by SIGTERM while starting\n")
    os._exit(EXIT_TERMINATED)


def _dispatch(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    if args.command == "run":
        reloads = StartReloads()
        reloads.ignore_across_exec()
        args.debug_checks = args.debug_checks or _env_flag("debug_checks")
        if argv is None:  # the command itself, not a call from Python (tests)
            run_optimized(args.debug_checks)
            signal.signal(signal.SIGTERM, stop_while_starting)
        reloads.install()
        return cmd_run(args, reloads)
    if args.command == "policy":
        return cmd_policy_check(args.file, check_files=not args.no_file_checks)
    if args.command == "audit" and args.audit_command == "export":
        from proxy.audit.export import cmd_export

        _source_from_env(args)
        return cmd_export(args)
    if args.command == "audit" and args.audit_command == "verify":
        from proxy.audit.verify import cmd_verify

        return cmd_verify(args)
    if args.command == "report":
        from proxy.report import cmd_report

        _source_from_env(args)
        return cmd_report(args)
    if args.command == "takedown":
        from proxy.takedowns_cli import cmd_takedown

        return cmd_takedown(args)
    if args.command == "keys":
        from proxy.audit.keys import cmd_generate

        return cmd_generate(args)
    return EXIT_USAGE  # pragma: no cover - argparse rejects anything else


def cmd_policy_check(path: Path, *, check_files: bool = True) -> int:
    from proxy.policy import InvalidPolicy
    from proxy.policy import load_policy

    try:
        # The files it names too (the signing key): a start with a key it cannot read exits 2.
        # Without them (--no-file-checks), the token environment variables are not read either.
        loaded = load_policy(path, check_files=check_files, read_env=check_files)
    except InvalidPolicy as e:
        for error in e.errors:
            print(f"{error}", file=sys.stderr)
        print(
            f"{path}: {len(e.errors)} error(s); fix them and run the check again", file=sys.stderr
        )
        return EXIT_USAGE
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path}: valid, policy_version {loaded.version}")
    return EXIT_OK


def address_problem(settings: Settings) -> str | None:
    """What is wrong with the addresses `run` was given, as one line naming the flag (never the
    URL itself: it may hold a password); None if nothing is. Checked before anything starts, so
    a typo is a usage error, not a traceback or mitmproxy's own advice."""
    from urllib.parse import urlsplit

    from redis.connection import parse_url

    if settings.listen_port == settings.admin_port and _binds_overlap(
        settings.listen_host, settings.admin_host
    ):
        return (
            f"--listen and --admin are both on port {settings.listen_port}: the proxy and the "
            "admin API need an address each"
        )
    if settings.redis_url:
        try:
            parse_url(settings.redis_url)
        except ValueError as e:
            return f"--redis-url (CRAWLWARDEN_REDIS_URL): {e} (e.g. redis://redis:6379/0)"
    if settings.audit_dsn:
        try:
            netloc = urlsplit(settings.audit_dsn).netloc.rpartition("@")[2]
            # Several hosts (`h1:5432,h2:5433`: failover, as asyncpg and libpq take them).
            for host in netloc.split(","):
                _ = urlsplit(f"//{host}").port  # raises for a port that is not a number
        except ValueError as e:
            example = "postgresql://user@db:5432/name"
            return f"--audit-dsn (CRAWLWARDEN_AUDIT_DSN): {e} (e.g. {example})"
    return None


def _binds_overlap(a: str, b: str) -> bool:
    """Whether listening on `a` and on `b` with one port collides: an address in common, the IPv6
    wildcard (dual-stack: IPv4 too), or the IPv4 wildcard beside another IPv4 address. A name
    (`localhost`) stands for every address it resolves to, as both servers bind them all."""
    return any(_addresses_overlap(x, y) for x in _bound_addresses(a) for y in _bound_addresses(b))


def _bound_addresses(host: str) -> set[str]:
    """The addresses a server asked to listen on `host` binds: an address as given, a name as
    it resolves (the system's resolver, as the bind itself does), an empty host every one."""
    import ipaddress
    import socket

    host = host.strip("[]")
    if not host:
        return {"0.0.0.0", "::"}  # noqa: S104 - compared, not bound
    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return {host}  # the bind will fail and say why
    return {str(info[4][0]).partition("%")[0] for info in found}


def _addresses_overlap(a: str, b: str) -> bool:
    if a == b or "::" in (a, b):
        return True
    if "0.0.0.0" in (a, b):  # noqa: S104 - compared, not bound
        other = b if a == "0.0.0.0" else a  # noqa: S104
        return ":" not in other
    return False


def data_dir_problem(settings: Settings) -> str | None:
    """Why the gateway could not write its data dir (the CA, the signing key it makes, the
    fetch-log spool, the SQLite fetch log), as one line saying what to do; None if it can.

    Checked by writing, not by mode bits: root ignores those, while a read-only mount or an
    immutable directory stops root too. A PersistentVolume whose ownership fsGroup did not
    change is the usual case.
    """
    import tempfile

    who = f"the user the gateway runs as (uid {os.geteuid()})"
    fix = (
        f"give {who} write access (in Kubernetes: podSecurityContext.fsGroup, or an init "
        "container that chowns the volume) or choose another --data-dir"
    )
    directories = [settings.data_dir, settings.data_dir / "spool", settings.spool_dir]
    for directory in directories:
        if directory != settings.data_dir and not directory.is_dir():
            continue  # made by the gateway, in a directory checked above
        if directory.exists() and not directory.is_dir():
            return f"the data dir {directory} is not a directory: choose another --data-dir"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".crawlwarden-write-check-", dir=directory)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            what = "the data dir" if directory == settings.data_dir else "the spool directory"
            return f"cannot write to {what} {directory} ({e.strerror}): {fix}"
    if not settings.audit_dsn:  # the embedded fetch log: SQLite opens these read-write
        for name in ("", "-wal", "-shm"):
            path = settings.sqlite_path.with_name(settings.sqlite_path.name + name)
            if not path.exists():
                continue
            try:
                os.close(os.open(path, os.O_RDWR))
            except OSError as e:
                return (
                    f"cannot open the SQLite fetch log file {path} to write ({e.strerror}): {fix}"
                )
    return None


def cmd_run(args: argparse.Namespace, reloads: StartReloads | None = None) -> int:
    import asyncio

    from proxy import logs
    from proxy.audit.keys import SigningKeyError
    from proxy.policy import InvalidPolicy
    from proxy.runtime import Settings

    logs.configure(args.log_level)
    settings = Settings(
        policy_file=args.policy,
        listen_host=args.listen[0],
        listen_port=args.listen[1],
        admin_host=args.admin[0],
        admin_port=args.admin[1],
        redis_url=args.redis_url,
        audit_dsn=args.audit_dsn,
        data_dir=args.data_dir,
        replica_id=args.replica_id,
        upstream_trusted_ca=args.upstream_trusted_ca,
        drain_seconds=args.drain_seconds,
        fleet_size=args.fleet_size,
    )
    if (problem := address_problem(settings)) is not None:
        print(f"crawlwarden: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if (problem := data_dir_problem(settings)) is not None:
        print(f"crawlwarden: {problem}", file=sys.stderr)
        return EXIT_FAILED  # as the other things a start cannot do without (store, ports)
    try:
        # mitmproxy is imported here only: `policy check` and `audit` stay light.
        from addons import mitmproxy_package

        mitmproxy_package.without_default_addons()
        from proxy.app import serve

        return asyncio.run(serve(settings, reloads.pending if reloads else None))
    except InvalidPolicy as e:
        print(f"crawlwarden: the policy {e.source} is invalid:", file=sys.stderr)
        for error in e.errors:
            print(f"  {error}", file=sys.stderr)
        print("nothing started; fix the policy (crawlwarden policy check FILE)", file=sys.stderr)
        return EXIT_USAGE
    except SigningKeyError as e:
        print(f"crawlwarden: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
