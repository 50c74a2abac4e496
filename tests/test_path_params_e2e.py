"""A `;` path parameter on an empty segment (`/;/private/a`): a servlet container (Tomcat) drops
the parameter and merges the `//` that leaves, and serves `/private/a`. The gateway reads `;`
paths as such a server does (README: `/private;x/a`, `/x/..;/private/a` are refused), but reads
this one as `//private/a`, which neither robots.txt's `Disallow: /private` nor a blocklist prefix
`/secret/` matches: forwarded."""

from __future__ import annotations

from pathlib import Path

from tests.support import PROJECT
from tests.support import TEAM
from tests.support import TEAM_TOKEN
from tests.support import Gateway
from tests.support import Reply
from tests.support import Site
from tests.support import curl
from tests.support import policy_with


def test_a_parameter_on_an_empty_segment_is_read_as_a_servlet_container_reads_it(
    workdir: Path, site: Site
) -> None:
    site.routes["/robots.txt"] = Reply(body=b"User-agent: *\nDisallow: /private\n")
    policy = policy_with(
        defaults={
            "respect": {
                "robots": True,
                "tdmrep": False,
                "noai": False,
                "content_usage": False,
                "image_metadata": False,
            }
        },
        blocklist=[
            {
                "id": "secret-prefix",
                "match": [f"http://site-a.test:{site.port}/secret/"],
                "reason": "ToS",
                "source": "test",
            }
        ],
    )
    with Gateway(workdir, policy) as gw:
        proxy = gw.proxy_url(TEAM, TEAM_TOKEN)
        answers = {
            path: curl(
                site.url("site-a.test", path),
                proxy=proxy,
                headers={"X-Crawl-Project": PROJECT},
                extra=["--path-as-is"],
            )
            for path in ("/;/private/a.jpg", "/;x/private/a.jpg", "/;/secret/a.jpg")
        }
        got = {p: (a.status, a.headers.get("x-crawlwarden-reason")) for p, a in answers.items()}
        assert got == {
            "/;/private/a.jpg": (451, "robots_disallowed"),
            "/;x/private/a.jpg": (451, "robots_disallowed"),
            "/;/secret/a.jpg": (451, "tos_blocklist"),
        }, got
        assert [s.path for s in site.seen if s.path != "/robots.txt"] == []
