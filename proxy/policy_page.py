"""The public policy page, `GET /policy`: who the crawler is and how a site owner controls it.

Guideline "Transparency" (the crawler is identifiable, its e-mail monitored) and "Security"
(a publicly available compliance policy). Built from the policy in force on every request, so a
reload shows at once. HTML for people, JSON (`Accept: application/json` or `?format=json`) for
programs. Public: no token, and nothing secret on it (no token hashes, no team names).
"""

from __future__ import annotations

import datetime as dt
import html
import json
from typing import Any

from aiohttp import web

from proxy import optout
from proxy import units
from proxy.admin import RUNTIME
from proxy.admin import Route
from proxy.admin import problem
from proxy.admin import query_param
from proxy.optout import Kind
from proxy.policy import LegalBasis
from proxy.policy import Policy
from proxy.policy import Respect
from proxy.runtime import Runtime
from proxy.sites import Site

FORMAT = "crawlwarden-policy/1"
# The HTML needs no script and may run none: readable as it is, and nothing to inject into.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _basis(b: LegalBasis) -> dict[str, Any]:
    return {
        "kind": b.kind,
        "ref": b.ref,
        "expires": None if b.expires is None else b.expires.isoformat(),
    }


def opt_outs(tokens: list[str], respect: Respect) -> list[dict[str, Any]]:
    """Each machine-readable opt-out we read, whether `respect` has it honoured, and how to send
    it. (`policy_document` says whether it binds under the default basis in force.)"""
    token = tokens[0]
    return [
        {
            "signal": "robots.txt",
            "respect_flag": "robots",
            "honoured_by_default": respect.robots,
            "reason_code": "robots_disallowed",
            "how": f"A group for one of our product tokens ({', '.join(tokens)}), e.g. "
            f"'User-agent: {token}' then 'Disallow: /'; without such a group, the * group "
            "applies (RFC 9309). Crawl-delay is honoured. A robots.txt "
            "that answers 429 or 5xx or cannot be reached disallows everything (RFC 9309).",
            "example": f"User-agent: {token}\nDisallow: /",
        },
        {
            "signal": "TDMRep",
            "respect_flag": "tdmrep",
            "honoured_by_default": respect.tdmrep,
            "reason_code": "tdm_reserved",
            "how": "A TDM reservation (W3C TDMRep): the file /.well-known/tdmrep.json, the "
            "response header 'tdm-reservation: 1' (with 'tdm-policy' for a licence offer), or "
            '<meta name="tdm-reservation" content="1"> in HTML, tdm:reservation in the XMP of a '
            "PDF or an image (namespace http://www.w3.org/ns/tdmrep/), or "
            '<meta property="tdm:reservation">1</meta> in an EPUB\'s package document. A '
            "licence or consent for the site is the answer a reservation asks for.",
            "example": "tdm-reservation: 1\ntdm-policy: https://example.com/tdm-licence.json",
        },
        {
            "signal": "noai / noimageai",
            "respect_flag": "noai",
            "honoured_by_default": respect.noai,
            "reason_code": "noai_directive",
            "how": "'X-Robots-Tag: noai' (any content) or 'noimageai' (images), also scoped to "
            f"our token ('X-Robots-Tag: {token}: noai'), or "
            '<meta name="robots" content="noai, noimageai"> in HTML.',
            "example": "X-Robots-Tag: noai, noimageai",
        },
        {
            "signal": "Content-Usage (IETF AI preferences)",
            "respect_flag": "content_usage",
            "honoured_by_default": respect.content_usage,
            "reason_code": "content_usage",
            "how": "The response header 'Content-Usage: train-ai=n', or a 'Content-Usage: "
            "<path> train-ai=n' rule in a robots.txt group for our tokens.",
            "example": "Content-Usage: train-ai=n",
        },
        {
            "signal": "IPTC PLUS DataMining",
            "respect_flag": "image_metadata",
            "honoured_by_default": respect.image_metadata,
            "reason_code": "image_optout",
            "how": "XMP property plus:DataMining (namespace http://ns.useplus.org/ldf/xmp/1.0/) "
            "with any DMI-PROHIBITED value, e.g. "
            "http://ns.useplus.org/ldf/vocab/DMI-PROHIBITED-AIMLTRAINING, in JPEG, PNG, WebP, "
            "AVIF/HEIF, TIFF, GIF, JPEG XL or SVG.",
            "example": "plus:DataMining=http://ns.useplus.org/ldf/vocab/DMI-PROHIBITED-AIMLTRAINING",
        },
        {
            "signal": "C2PA / CAWG training-mining",
            "respect_flag": "image_metadata",
            "honoured_by_default": respect.image_metadata,
            "reason_code": "image_optout",
            "how": "A c2pa.training-mining or cawg.training-mining assertion in the image's C2PA "
            "manifest whose ai_training, ai_generative_training or data_mining entry is "
            "notAllowed or constrained.",
            "example": '{"label": "cawg.training-mining", "data": {"entries": '
            '{"cawg.ai_generative_training": {"use": "notAllowed"}}}}',
        },
    ]


def _budgets(settings: Any) -> dict[str, Any]:
    return {
        "rate": settings.rate,
        "requests_per_second": round(units.parse_rate(settings.rate).per_second, 6),
        "burst": settings.burst,
        "max_concurrency": settings.max_concurrency,
        "requests_per_day": settings.requests_per_day,
        "requests_per_month": settings.requests_per_month,
        "bytes_per_day": settings.bytes_per_day,
        "on_exceed": settings.on_exceed,
    }


def _terms(site: Site, today: dt.date) -> dict[str, Any]:
    """The terms in force today, as the gateway applies them: an expired licence's fallback,
    and the opt-outs that bind under that basis (a TDM reservation never binds a licence)."""
    basis, respect = site.terms_on(today)
    terms: dict[str, Any] = {
        "legal_basis": _basis(basis),
        "opt_outs_honoured": {kind.value: optout.applies(kind, basis, respect) for kind in Kind},
    }
    if basis != site.settings.legal_basis:
        terms["expired_legal_basis"] = _basis(site.settings.legal_basis)
    return terms


def policy_document(rt: Runtime) -> dict[str, Any]:
    policy: Policy = rt.compiled.loaded.policy
    crawler, defaults = policy.crawler, policy.defaults
    today = dt.datetime.now(dt.UTC).date()
    sites = []
    for rule in policy.sites:
        site = rt.compiled.sites.by_key(rule.id)
        sites.append(
            {
                "site": rule.id,
                "match": list(rule.match),
                **_terms(site, today),
                "budgets": _budgets(site.settings),
            }
        )
    default_terms = _terms(Site("", None, defaults, defaults), today)
    signer = rt.fetch_log.signer
    return {
        "format": FORMAT,
        "policy_version": rt.policy_version,
        "crawler": {
            "user_agent": crawler.user_agent,
            "robots_tokens": list(crawler.robots_tokens),
            "contact": crawler.contact,
            "sent_headers": {"User-Agent": crawler.user_agent, "From": crawler.contact},
        },
        "egress": {
            "provider": policy.egress.provider,
            "public_ips": [str(ip) for ip in policy.egress.public_ips],
        },
        "opt_outs": [
            # Whether it binds under the default basis in force (a licence: no reservation).
            {**o, "honoured_by_default": default_terms["opt_outs_honoured"][o["respect_flag"]]}
            for o in opt_outs(list(crawler.robots_tokens), defaults.respect)
        ],
        "legal_bases": {"default": default_terms["legal_basis"], "sites": sites},
        "budgets": {
            "defaults": _budgets(defaults),
            "pause": "a site that answers 429 or 503 is paused for every replica, for its "
            "Retry-After when it sends one",
            "site_key": "the registrable domain (eTLD+1) of the host, unless a site rule "
            "matches it (the rule whose pattern matches most closely)",
        },
        "blocklist": [
            {"id": b.id, "match": list(b.match), "reason": b.reason, "source": b.source}
            for b in policy.blocklist
        ],
        "takedowns": {
            "contact": crawler.contact,
            "how": "Write to the contact address with: who you are (the rights holder) and how "
            "to reach you; the scope (one URL, with any query if it has none; a URL prefix; "
            "or a whole domain) and the "
            "targets; and the reason. Once filed, the gateway refuses the targets on every "
            "replica within a second (HTTP 451, reason takedown), lists every fetch of them "
            "that reached the site (before the filing, or while it was reaching every "
            "replica) for the teams that made it, and records each team's deletion.",
            "in_force": len(rt.takedowns.state.takedowns),
        },
        "retention": {"fetch_records_days": policy.retention.fetch_records_days},
        "audit": {
            "public_key_pem": None if signer is None else signer.public_pem().decode(),
            "key_id": None if signer is None else signer.verifier.key_id.hex(),
            "public_key_url": "/v1/audit/public-key",
            "what": "every request is a fetch record in a hash chain per replica; signed "
            "checkpoints let anyone holding this key verify an export offline",
        },
    }


# -- HTML ----------------------------------------------------------------------------------

_CSS = """
body{font-family:"DejaVu Sans",Arial,sans-serif;margin:2em;color:#1f2328;max-width:60em;
line-height:1.45}h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;
border-bottom:1px solid #d0d7de}table{border-collapse:collapse}td,th{border:1px solid #d0d7de;
padding:.25em .5em;text-align:left;vertical-align:top}th{background:#f6f8fa}
pre,code{background:#f6f8fa;font-size:.9em}pre{padding:.5em;overflow-x:auto}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _basis_text(b: dict[str, Any]) -> str:
    text = f"{_e(b['kind'])} ({_e(b['ref'])})"
    return text + (f", until {_e(b['expires'])}" if b["expires"] else "")


def _budget_rows(b: dict[str, Any]) -> str:
    quota = "no limit"
    return "".join(
        f"<tr><th>{_e(k)}</th><td>{_e(quota if v is None else v)}</td></tr>"
        for k, v in (
            ("rate", b["rate"]),
            ("burst", b["burst"]),
            ("concurrent requests", b["max_concurrency"]),
            ("requests per day (UTC)", b["requests_per_day"]),
            ("requests per month", b["requests_per_month"]),
            ("bytes per day", b["bytes_per_day"]),
        )
    )


def policy_html(doc: dict[str, Any]) -> str:
    c = doc["crawler"]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        f"<title>{_e(c['robots_tokens'][0])} crawler policy</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>The {_e(c['robots_tokens'][0])} crawler and its compliance policy</h1>",
        "<p>This crawler collects web content for AI training through the crawlwarden gateway, "
        "which enforces the policy below on every request and records each one in a signed "
        f"log. Policy version <code>{_e(doc['policy_version'])}</code>. "
        'The same page as JSON: <a href="?format=json">?format=json</a>.</p>',
        "<h2>Who we are</h2><table>",
        f"<tr><th>User-Agent</th><td><code>{_e(c['user_agent'])}</code></td></tr>",
        "<tr><th>robots.txt product tokens</th><td>"
        + ", ".join(f"<code>{_e(t)}</code>" for t in c["robots_tokens"])
        + "</td></tr>",
        f'<tr><th>Contact (sent as From)</th><td><a href="mailto:{_e(c["contact"])}">'
        f"{_e(c['contact'])}</a>, a monitored mailbox</td></tr>",
        f"<tr><th>Network provider</th><td>{_e(doc['egress']['provider'])}</td></tr>",
        "<tr><th>Public IP addresses</th><td>"
        + (", ".join(f"<code>{_e(ip)}</code>" for ip in doc["egress"]["public_ips"]) or "-")
        + "</td></tr></table>",
        "<h2>Opt-outs we honour, and how to use them</h2>",
        "<p>A request that an opt-out forbids is refused before it reaches your site (or, for "
        "signals in a response, the content is discarded and only its hash is kept as "
        "proof of deletion).</p>",
        "<table><thead><tr><th>signal</th><th>honoured by default</th><th>how to opt out</th>"
        "</tr></thead><tbody>",
    ]
    for o in doc["opt_outs"]:
        out.append(
            f"<tr><td>{_e(o['signal'])}</td><td>{'yes' if o['honoured_by_default'] else 'no'}"
            f"</td><td>{_e(o['how'])}<pre>{_e(o['example'])}</pre></td></tr>"
        )
    out.append("</tbody></table>")
    bases = doc["legal_bases"]
    out += [
        "<h2>Legal bases</h2>",
        f"<p>By default: {_basis_text(bases['default'])}. Every fetch records the basis it "
        "was made on.</p>",
    ]
    if bases["sites"]:
        out.append(
            "<table><thead><tr><th>site</th><th>hosts</th><th>legal basis</th>"
            "<th>opt-outs honoured</th></tr></thead><tbody>"
        )
        for s in bases["sites"]:
            honoured = ", ".join(k for k, v in s["opt_outs_honoured"].items() if v) or "none"
            basis = _basis_text(s["legal_basis"])
            if "expired_legal_basis" in s:
                basis += f" ({_basis_text(s['expired_legal_basis'])}: expired)"
            out.append(
                f"<tr><td>{_e(s['site'])}</td><td>{_e(', '.join(s['match']))}</td>"
                f"<td>{basis}</td><td>{_e(honoured)}</td></tr>"
            )
        out.append("</tbody></table>")
    budgets = doc["budgets"]
    out += [
        "<h2>How much we fetch</h2>",
        "<p>Budgets per site, shared by every gateway replica; the site is "
        f"{_e(budgets['site_key'])}. "
        f"{_e(_sentence(budgets['pause']))}.</p>",
        f"<table>{_budget_rows(budgets['defaults'])}</table>",
    ]
    if doc["blocklist"]:
        out.append(
            "<h2>Sites whose terms forbid collection</h2><table><thead><tr><th>hosts or "
            "URL prefixes</th><th>reason</th><th>source</th></tr></thead><tbody>"
        )
        for b in doc["blocklist"]:
            out.append(
                f"<tr><td>{_e(', '.join(b['match']))}</td><td>{_e(b['reason'])}</td>"
                f"<td>{_e(b['source'])}</td></tr>"
            )
        out.append("</tbody></table>")
    td = doc["takedowns"]
    out += [
        "<h2>Takedown requests</h2>",
        f'<p>Contact: <a href="mailto:{_e(td["contact"])}">{_e(td["contact"])}</a>. '
        f"{_e(td['how'])} Takedowns in force: {td['in_force']}.</p>",
        "<h2>Records and audit</h2>",
        f"<p>Fetch records are kept {doc['retention']['fetch_records_days']} days. "
        f"{_e(_sentence(doc['audit']['what']))}.</p>",
    ]
    audit = doc["audit"]
    if audit["public_key_pem"]:
        out.append(
            f"<p>Audit public key (Ed25519, key ID <code>{_e(audit['key_id'])}</code>; also at "
            f"<code>{_e(audit['public_key_url'])}</code>):</p><pre>{_e(audit['public_key_pem'])}</pre>"
        )
    else:
        out.append("<p>This gateway has no audit signing key configured.</p>")
    out.append("</body></html>\n")
    return "\n".join(out)


def wants_json(request: web.Request) -> bool:
    """?format=json|html decides; else the Accept header's preference between the two."""
    fmt = request.query.get("format")
    if fmt is not None:
        return fmt == "json"
    best: dict[str, float] = {"json": -1.0, "html": -1.0}
    for part in request.headers.get("Accept", "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        media = media.lower()
        if media in ("application/json", "application/*"):
            best["json"] = max(best["json"], q)
        if media in ("text/html", "text/*", "application/xhtml+xml"):
            best["html"] = max(best["html"], q)
    return best["json"] > 0 and best["json"] > best["html"]


# The page as last built, by what it is built from: it is public, and a policy of 2 000 site
# rules took 30-160 ms to build for each request, on the event loop (a broad-crawl probe).
_built: dict[tuple[Any, ...], tuple[str, str]] = {}


def _page(rt: Runtime, as_json: bool) -> tuple[str, str]:
    """(media type, body) of the policy page as it is now."""
    signer = rt.fetch_log.signer
    key = (
        id(rt),
        rt.policy_version,
        dt.datetime.now(dt.UTC).date(),  # a site's terms may change with the date
        len(rt.takedowns.state.takedowns),
        None if signer is None else signer.verifier.key_id,
        as_json,
    )
    page = _built.get(key)
    if page is None:
        doc = policy_document(rt)
        page = ("application/json", json.dumps(doc)) if as_json else ("text/html", policy_html(doc))
        if len(_built) >= 8:
            _built.clear()
        _built[key] = page
    return page


async def policy_page(request: web.Request) -> web.Response:
    fmt = request.query.get("format")
    if fmt not in (None, "json", "html"):
        return problem(400, "format must be html or json")
    headers = {
        "Vary": "Accept",
        "Cache-Control": "public, max-age=60",
        "Content-Security-Policy": CSP,
    }
    media, body = _page(request.app[RUNTIME], wants_json(request))
    return web.Response(text=body, content_type=media, charset="utf-8", headers=headers)


ROUTES: list[Route] = [
    Route(
        "GET",
        "/policy",
        policy_page,
        (),
        "The crawler and its compliance policy: identity, opt-outs honoured, legal bases, "
        "budgets, takedowns, audit key (HTML, or JSON by Accept or ?format=json)",
        {"200": "the policy page", "400": "an unknown format or query parameter"},
        parameters=(
            query_param(
                "format",
                "json or html (default: by the Accept header, else html)",
                enum=["json", "html"],
            ),
        ),
    ),
]
