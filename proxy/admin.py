"""The admin API (aiohttp, on --admin): health, metrics, policy reload and, for auditors, records.

Public: /healthz, /readyz, /openapi.json, and /metrics unless the policy has a token of role
`metrics` (then it takes that, an auditor's or an admin's). Everything under /v1 needs a bearer
token whose role (from the policy's admin_tokens) the endpoint admits, or, where a team may read
(its own usage, the sites' budgets), the team's proxy credentials. An auditor can read, never
change.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client import generate_latest

from proxy.auth_throttle import AuthThrottle
from proxy.runtime import Runtime

type Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

RUNTIME = web.AppKey("runtime", Runtime)
# A scraper team's role: what it may read of its own (GET /v1/usage) and the sites' budgets.
TEAM = "team"
# Who may read /metrics when the policy closes it (a token of role `metrics` in admin_tokens):
# its series have every team's requests per site, which a team does not see of another's.
METRICS_READERS = ("metrics", "auditor", "admin")
# Wrong bearer tokens are answered later the more an address has sent (the proxy port's rule:
# proxy/auth_throttle.py), so guessing one is not cheap either.
TOKEN_GUESSES = web.AppKey("token_guesses", AuthThrottle)


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    roles: tuple[str, ...]  # empty: public
    summary: str
    responses: dict[str, str]
    parameters: tuple[dict[str, Any], ...] = ()
    request_body: dict[str, Any] | None = None


def query_param(
    name: str, description: str, *, required: bool = False, **schema: Any
) -> dict[str, Any]:
    """An OpenAPI query parameter (strings unless `schema` says otherwise)."""
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": {"type": "string", **schema},
    }


def problem(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


# The team a request's proxy credentials named (role TEAM), for the endpoints a team may read.
CALLER_TEAM = web.RequestKey("caller_team", str)


def authorize(request: web.Request, roles: tuple[str, ...]) -> web.Response | None:
    """None when the caller may proceed, else the 401/403 answer.

    Admins and auditors send a bearer token of the policy's admin_tokens; a team sends its
    proxy credentials (`Basic team:token`, what `curl -u` sends), role TEAM.
    """
    if not roles:
        return None
    rt = request.app[RUNTIME]
    authorization = request.headers.get("Authorization")
    role = rt.compiled.admins.role_of(authorization)
    if role is None and (caller := rt.compiled.teams.authenticate(authorization)) is not None:
        role = TEAM
        request[CALLER_TEAM] = caller.identity.team
    if role is None:
        ways = []
        if bearers := ", ".join(r for r in roles if r != TEAM):
            ways.append(f"Bearer <token> of the policy's admin_tokens (role {bearers})")
        if TEAM in roles:
            ways.append("a team's proxy credentials as Basic <team>:<token> (curl -u)")
        resp = problem(401, f"send Authorization: {', or '.join(ways)}")
        resp.headers["WWW-Authenticate"] = 'Bearer realm="crawlwarden-admin"'
        resp.headers.add("WWW-Authenticate", 'Basic realm="crawlwarden-admin"')
        return resp
    if role not in roles:
        return problem(403, f"the {role} role may not do this; it needs: {', '.join(roles)}")
    return None


def query_names(route: Route) -> tuple[str, ...]:
    """The query parameters a route declares (its OpenAPI parameters `in: query`)."""
    return tuple(p["name"] for p in route.parameters if p.get("in") == "query")


def _names(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names)


def check_query(request: web.Request, accepted: tuple[str, ...]) -> web.Response | None:
    """None when every query parameter is one the endpoint takes, given once and not empty;
    else the 400.

    A misspelt filter (`?tema=b` for `?team=b`) would otherwise be ignored and the answer be
    everything, unfiltered: an auditor would draw conclusions from the wrong data.
    """
    query = request.query
    unknown = list(dict.fromkeys(k for k in query if k not in accepted))
    if unknown:
        takes = ", ".join(accepted) if accepted else "no query parameters"
        plural = "s" if len(unknown) > 1 else ""
        return problem(
            400,
            f"unknown query parameter{plural} {_names(unknown)}: this endpoint takes {takes}",
            unknown_parameters=unknown,
            accepted_parameters=list(accepted),
        )
    empty = [k for k in dict.fromkeys(query) if not query[k].strip()]
    if empty:
        # `?team=$TEAM` with TEAM unset would be no filter at all: every team's records.
        return problem(
            400,
            f"query parameter given empty: {_names(empty)}; give a value or leave it out",
            empty_parameters=empty,
            accepted_parameters=list(accepted),
        )
    repeated = [k for k in dict.fromkeys(query) if len(query.getall(k)) > 1]
    if repeated:
        return problem(
            400,
            f"query parameter given more than once: {_names(repeated)}; give each once",
            repeated_parameters=repeated,
            accepted_parameters=list(accepted),
        )
    return None


class BadBody(ValueError):
    """A request body that is no JSON object of text: answered 400 with the message."""


_BODY = web.RequestKey("json_body", dict[str, Any])


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's body as a JSON object (read once: later calls return the same dict)."""
    if _BODY in request:
        return request[_BODY]
    try:
        parsed = await request.json(loads=_loads)
        unicode = _is_unicode(parsed)
    except _Repeated as e:
        raise BadBody(f"field given more than once: {e.args[0]!r}; give each once") from e
    except ValueError as e:
        raise BadBody("the body must be a JSON object") from e
    except RecursionError as e:  # (arrays nested tens of thousands deep)
        raise BadBody("the body is nested too deeply") from e
    if not isinstance(parsed, dict):
        raise BadBody("the body must be a JSON object")
    if not unicode:
        # JSON may escape a lone surrogate ("\udcff"): no text, and nothing a file, Redis or
        # the fetch log can store (it failed with a 500 after the change had begun).
        raise BadBody("the body has a string that is not valid Unicode")
    request[_BODY] = parsed
    return parsed


class _Repeated(Exception):
    """A JSON object with a key twice: parsers differ on which one counts."""


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Repeated(key)
        out[key] = value
    return out


def _loads(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_unique)


def _is_unicode(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_is_unicode(k) and _is_unicode(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_unicode(v) for v in value)
    return True


_LISTED = 20  # names of unknown fields an answer lists at most


async def check_body(request: web.Request, route: Route) -> web.Response | None:
    """None when the body has every field the route requires and no other; else the 400,
    naming every missing field and every unknown one at once. A route that takes no body
    refuses one (an empty body or `{}` is no body): `{"dry_run": true}` to the policy reload
    would reload for real."""
    schema = route.request_body
    if schema is None:
        raw = await request.read()
        if not raw.strip():
            return None
        try:
            sent: Any = json.loads(raw)
        except (ValueError, RecursionError):
            sent = None
        if sent == {}:
            return None
        fields = [str(k) for k in sent][:_LISTED] if isinstance(sent, dict) else []
        got = f"; it was sent {_names(fields)}" if fields else ""
        return problem(
            400,
            f"{route.method} {route.path} takes no body{got}",
            unknown_fields=fields,
            accepted_fields=[],
        )
    try:
        body = await json_body(request)
    except BadBody as e:
        return problem(400, str(e))
    accepted = list(schema.get("properties", {}))
    unknown = [k for k in body if k not in accepted][:_LISTED]
    missing = [k for k in schema.get("required", ()) if k not in body]
    if not unknown and not missing:
        return None
    said = []
    if missing:
        said.append(f"missing field{'s' if len(missing) > 1 else ''} {_names(missing)}")
    if unknown:
        said.append(f"unknown field{'s' if len(unknown) > 1 else ''} {_names(unknown)}")
    return problem(
        400,
        f"{'; '.join(said)}: this endpoint takes {', '.join(accepted)}",
        missing_fields=missing,
        unknown_fields=unknown,
        accepted_fields=accepted,
    )


def takes_only_its_query(route: Route) -> bool:
    """Whether the route refuses a query parameter it does not take (check_query). A public
    endpoint that takes no parameter answers the same whatever the query: probes and scrapers
    of /healthz, /readyz and /metrics may add one (a cache-buster, Prometheus's `params:`), and
    a 400 there would read as the gateway down."""
    return bool(route.roles or query_names(route))


def guarded(route: Route) -> Handler:
    accepted = query_names(route)
    strict = takes_only_its_query(route)

    async def handler(request: web.Request) -> web.StreamResponse:
        denied = authorize(request, route.roles)
        if denied is not None:
            return await refusal(request, denied)
        if strict and (refused := check_query(request, accepted)) is not None:
            return refused
        if route.method != "GET" and (refused := await check_body(request, route)) is not None:
            return refused
        try:
            return await route.handler(request)
        except ClientGone:
            # (an answer no one reads: 499 as nginx logs it, for the access log and tests)
            return web.Response(status=499, reason="Client Closed Request")

    return handler


async def refusal(request: web.Request, denied: web.Response) -> web.Response:
    """`authorize`'s refusal as sent: a wrong token's throttled (`_wrong_token`)."""
    if denied.status == 401 and request.headers.get("Authorization"):
        return await _wrong_token(request, denied)
    return denied


async def _wrong_token(request: web.Request, denied: web.Response) -> web.Response:
    """A wrong token's 401, later the more its address has sent; past the bound of answers
    held for it, a 429 at once."""
    guesses = request.app[TOKEN_GUESSES]
    penalty = guesses.failed(request.remote)
    if penalty.drop:
        resp = problem(429, "too many wrong tokens from this address; wait a minute")
        resp.headers["Retry-After"] = "60"
        return resp
    try:
        if penalty.delay > 0:
            await asyncio.sleep(penalty.delay)
    finally:
        guesses.answered(request.remote)
    return denied


class ClientGone(Exception):
    """The caller closed its connection before the answer was ready."""


async def while_connected[T](request: web.Request, work: Awaitable[T]) -> T:
    """`work`'s result; cancelled (its PostgreSQL query with it) once the caller has gone:
    aiohttp lets a handler run on after its client closed, and a poll that gave up (curl
    --max-time) left its query running to the end, each keeping a database backend busy."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=CLIENT_CHECK_SECONDS)
        if done:
            return task.result()
        transport = request.transport
        if transport is None or transport.is_closing():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ClientGone


# How often a long answer's work checks that its caller is still there.
CLIENT_CHECK_SECONDS = 0.25


# -- handlers ------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    body = {
        "ready": rt.ready,
        "draining": rt.draining,
        "fetch_log_available": rt.fetch_log.available,
        "fetch_log_store_ok": rt.fetch_log.store_ok,
        "fetch_log_set_aside": rt.fetch_log.set_aside,
        "policy_version": rt.policy_version,
        "replica": rt.replica,
    }
    return web.json_response(body, status=200 if rt.ready else 503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    if request.app[RUNTIME].compiled.admins.metrics_need_a_token:
        denied = authorize(request, METRICS_READERS)
        if denied is not None:
            return await refusal(request, denied)
    resp = web.Response(body=generate_latest())
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    resp.charset = "utf-8"
    return resp


async def policy_reload(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    version, errors = await rt.reload_in_thread()
    if version is None:
        return web.json_response(
            {
                "error": "the new policy is not applied (invalid, or a change only a restart "
                "applies: see errors); the old policy stays in force",
                "policy_version": rt.policy_version,
                "errors": [{"path": e.path, "message": e.message, "line": e.line} for e in errors],
            },
            status=400,
        )
    return web.json_response({"policy_version": version})


async def budgets(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    key = request.query.get("site", "").strip()  # a rule id as written (ids may have capitals)
    if not key:
        return problem(400, "name a site: /v1/budgets?site=<policy site id or domain>")
    return web.json_response(await rt.budgets.usage(rt.compiled.sites.by_key(key)))


ROUTES: list[Route] = [
    Route("GET", "/healthz", healthz, (), "Liveness", {"200": "alive"}),
    Route(
        "GET",
        "/readyz",
        readyz,
        (),
        "Readiness: not draining, fetch log accepting records",
        {"200": "ready", "503": "not ready"},
    ),
    Route(
        "GET",
        "/metrics",
        metrics_endpoint,
        (),
        "Prometheus metrics; public unless the policy has a token of role metrics (then: "
        "metrics, auditor or admin)",
        {"200": "metrics", "401": "no token (only where one is needed)", "403": "role not allowed"},
    ),
    Route(
        "POST",
        "/v1/policy/reload",
        policy_reload,
        ("admin",),
        "Reload the policy file; an invalid one leaves the old policy in force",
        {"200": "reloaded", "400": "invalid policy, errors listed", "401": "no token"},
    ),
    Route(
        "GET",
        "/v1/budgets",
        budgets,
        ("auditor", "admin", TEAM),
        "A site's budgets: limit, used and remaining for each",
        {"200": "usage per budget", "400": "no site named"},
        parameters=(
            query_param("site", "a policy site id or a registrable domain", required=True),
        ),
    ),
]


def openapi(routes: list[Route]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        op: dict[str, Any] = {
            "summary": r.summary,
            "responses": {code: {"description": text} for code, text in r.responses.items()},
        }
        if r.roles:
            schemes = ["bearer"] if any(role != TEAM for role in r.roles) else []
            if TEAM in r.roles:
                schemes.append("basic")
            op["security"] = [{scheme: []} for scheme in schemes]
            op["description"] = "Roles: " + ", ".join(r.roles)
            op["responses"].setdefault("401", {"description": "missing or unknown token"})
            op["responses"].setdefault("403", {"description": "role not allowed"})
            op["responses"].setdefault(
                "429", {"description": "too many wrong tokens from this address (Retry-After)"}
            )
        if r.parameters:
            op["parameters"] = list(r.parameters)
        strict = []
        if takes_only_its_query(r):
            strict.append("an unknown query parameter, or one given empty or twice")
        if r.method != "GET":
            strict.append(
                "a body field missing or unknown (all named), or a body where none is taken"
            )
        said = r.responses.get("400")
        if strict:
            refused = "; ".join(strict)
            op["responses"]["400"] = {"description": f"{said}; or {refused}" if said else refused}
        if r.request_body is not None:
            # Closed: a field it does not list is refused (check_body).
            schema = {**r.request_body, "additionalProperties": False}
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schema}},
            }
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "crawlwarden admin API", "version": "1"},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                # a team's proxy credentials (team:token), where the role team may read
                "basic": {"type": "http", "scheme": "basic"},
            }
        },
        "paths": paths,
    }


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (no such path, a method the path does not take, a body too
    large) as the API's JSON problem bodies, not `404: Not Found` in plain text."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as e:
        allowed = sorted(e.allowed_methods)
        resp = problem(
            405,
            f"{e.method} is not allowed on {request.path}; it takes {', '.join(allowed)}",
            allowed_methods=allowed,
        )
        resp.headers["Allow"] = ",".join(allowed)
        return resp
    except web.HTTPNotFound:
        return problem(404, f"no endpoint {request.path}; /openapi.json lists them")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        text = e.text or e.reason
        resp = problem(e.status, text.removeprefix(f"{e.status}: ") if text else e.reason)
        for name, value in e.headers.items():
            if name.lower() not in ("content-type", "content-length"):
                resp.headers[name] = value
        return resp


def make_app(runtime: Runtime, extra_routes: list[Route] | None = None) -> web.Application:
    app = web.Application(client_max_size=1 << 20, middlewares=[json_errors])
    app[RUNTIME] = runtime
    app[TOKEN_GUESSES] = AuthThrottle()
    routes = [*ROUTES, *(extra_routes or [])]
    for r in routes:
        if r.method == "GET":
            # GET answers HEAD too (RFC 9110 9.1: uptime checkers and load balancers probe
            # /healthz, /readyz and /metrics with it); aiohttp sends the headers without a body.
            app.router.add_get(r.path, guarded(r), allow_head=True)
        else:
            app.router.add_route(r.method, r.path, guarded(r))
    document = openapi(routes)

    async def openapi_json(request: web.Request) -> web.Response:
        return web.json_response(document)  # (public, no parameter: any query, as /healthz)

    app.router.add_get("/openapi.json", openapi_json)
    return app
