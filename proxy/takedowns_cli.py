"""`crawlwarden takedown file|list|show|manifest|confirm`: the takedown flow from a shell.

A thin client of a running gateway's admin API (proxy/takedowns_api.py): `--admin URL` (or
CRAWLWARDEN_ADMIN_URL; default http://127.0.0.1:9090) and a bearer token from `--token` or
CRAWLWARDEN_ADMIN_TOKEN. Exit 0 on success, 1 when the gateway refuses (its message is printed),
2 when it cannot be reached or the command is incomplete.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

DEFAULT_ADMIN = "http://127.0.0.1:9090"


def add_parser(sub: Any) -> None:
    """The `takedown` command and its subcommands, on the CLI's subparsers."""
    takedown = sub.add_parser("takedown", help="file and follow rights holders' takedowns")
    commands = takedown.add_subparsers(dest="takedown_command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--admin",
            default=os.environ.get("CRAWLWARDEN_ADMIN_URL", DEFAULT_ADMIN),
            help=f"the gateway's admin API [{DEFAULT_ADMIN}, CRAWLWARDEN_ADMIN_URL]",
        )
        p.add_argument(
            "--token",
            default=os.environ.get("CRAWLWARDEN_ADMIN_TOKEN"),
            help="an admin (or, to read, auditor) token [CRAWLWARDEN_ADMIN_TOKEN]",
        )
        return p

    file = common(commands.add_parser("file", help="file a takedown; in force at once"))
    file.add_argument("--rights-holder", required=True)
    file.add_argument("--contact", required=True, help="how to reach the rights holder")
    file.add_argument("--scope", required=True, choices=["url", "prefix", "domain"])
    file.add_argument(
        "--target",
        required=True,
        action="append",
        dest="targets",
        help="a URL, URL prefix or domain (repeat for several)",
    )
    file.add_argument("--reason", required=True)
    common(commands.add_parser("list", help="every takedown, with teams still to confirm"))
    show = common(commands.add_parser("show", help="one takedown"))
    show.add_argument("id")
    manifest = common(commands.add_parser("manifest", help="the fetches it covers: what to delete"))
    manifest.add_argument("id")
    manifest.add_argument("--format", choices=["json", "csv"], default="json")
    manifest.add_argument("--output", type=Path, help="write here instead of stdout")
    confirm = common(commands.add_parser("confirm", help="record a team's deletion"))
    confirm.add_argument("id")
    confirm.add_argument("--team", required=True)
    confirm.add_argument("--deleted", required=True, type=int, help="how many items it deleted")


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx is an error: the token goes to the admin API and nowhere else


# No proxy from the environment (a scraper's pod sets http_proxy to the gateway, or to one
# that logs headers) and no redirect: either would hand the admin token to someone else.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)


def call(
    admin: str, token: str, method: str, path: str, body: Any = None
) -> tuple[int, bytes, str]:
    """One admin API request: (status, body, content type); ApiError for 4xx/5xx answers."""
    base = admin if "://" in admin else f"http://{admin}"
    if not base.startswith(("http://", "https://")):
        raise OSError(f"--admin must be an http(s) URL, not {admin!r}")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(  # noqa: S310 - http(s) only, checked above
        base.rstrip("/") + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with _OPENER.open(req, timeout=60) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            message = json.loads(raw).get("error") or raw.decode(errors="replace")
        except (ValueError, AttributeError):
            message = raw.decode(errors="replace")
        raise ApiError(e.code, message) from e


def cmd_takedown(args: argparse.Namespace) -> int:
    if not args.token:
        print(
            "crawlwarden takedown: no token; pass --token or set CRAWLWARDEN_ADMIN_TOKEN",
            file=sys.stderr,
        )
        return 2
    command = args.takedown_command
    try:
        if command == "file":
            body = {
                "rights_holder": args.rights_holder,
                "contact": args.contact,
                "scope": args.scope,
                "targets": args.targets,
                "reason": args.reason,
            }
            _, raw, _ = call(args.admin, args.token, "POST", "/v1/takedowns", body)
            filed = json.loads(raw)
            print(f"filed takedown {filed['id']}; in force on every replica", file=sys.stderr)
            _print_json(filed)
        elif command == "list":
            _print_json(json.loads(call(args.admin, args.token, "GET", "/v1/takedowns")[1]))
        elif command == "show":
            path = f"/v1/takedowns/{quote(args.id, safe='')}"
            _print_json(json.loads(call(args.admin, args.token, "GET", path)[1]))
        elif command == "manifest":
            path = f"/v1/takedowns/{quote(args.id, safe='')}/manifest?format={args.format}"
            raw = call(args.admin, args.token, "GET", path)[1]
            text = (
                raw.decode()
                if args.format == "csv"
                else json.dumps(json.loads(raw), indent=2, ensure_ascii=False) + "\n"
            )
            if args.output:
                args.output.write_text(text, encoding="utf-8")
            else:
                sys.stdout.write(text)
        elif command == "confirm":
            path = f"/v1/takedowns/{quote(args.id, safe='')}/confirmations"
            body = {"team": args.team, "deleted": args.deleted}
            _print_json(json.loads(call(args.admin, args.token, "POST", path, body)[1]))
    except ApiError as e:
        print(
            f"crawlwarden takedown {command}: the gateway answered {e.status}: {e}", file=sys.stderr
        )
        return 1
    except OSError as e:
        reason = getattr(e, "reason", e)
        print(
            f"crawlwarden takedown {command}: cannot reach the admin API at {args.admin} "
            f"({reason}); check --admin",
            file=sys.stderr,
        )
        return 2
    return 0


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
