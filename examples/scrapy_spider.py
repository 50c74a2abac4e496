"""A Scrapy spider that crawls through crawlwarden.

    .venv/bin/scrapy runspider examples/scrapy_spider.py -a url=http://demo.test:8000/ -o -:jsonl
        [-a "url=URL URL..."] [-a proxy=http://TEAM:TOKEN@HOST:PORT] [-a project=PROJECT]

`-o -:jsonl` prints each item (URL, status, the gateway's reason if it answered itself, size) on
stdout as a JSON line; Scrapy's log goes to stderr.

Scrapy's HttpProxyMiddleware turns the credentials of the `proxy` meta key into a
Proxy-Authorization header (also on CONNECT for https:// URLs). Scrapy does not verify TLS
certificates by default, so the gateway's CA needs no setup here; refusals arrive as normal
responses with the X-Crawlwarden-Reason header, so let them through to the callback. (Over
https, only wrong credentials are refused at CONNECT, which Scrapy raises as a TunnelError; a
host the policy refuses gets its tunnel, and each request in it the refusal.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from collections.abc import Iterator
from typing import Any

import scrapy

PROXY = "http://vision-data:demo-token@127.0.0.1:8080"


class GatewaySpider(scrapy.Spider):
    name = "through-crawlwarden"
    custom_settings = {
        # Every status the gateway answers itself (README, "What a scraper sees when the gateway
        # refuses"), so that the callback sees its X-Crawlwarden-Reason: Scrapy drops other
        # non-2xx answers as "Ignoring response". 429 and 503 also say when to slow down.
        "HTTPERROR_ALLOWED_CODES": [400, 403, 407, 411, 413, 421, 429, 431, 451, 502, 503, 504],
        "RETRY_ENABLED": False,
        "ROBOTSTXT_OBEY": False,  # the gateway reads robots.txt for the whole fleet
        "LOG_LEVEL": "INFO",
    }

    def __init__(
        self,
        url: str = "http://demo.test:8000/",
        proxy: str = PROXY,
        project: str = "faces-v2",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.url = url
        self.proxy = proxy
        self.project = project

    async def start(self) -> AsyncIterator[scrapy.Request]:
        for url in self.url.split():  # (a URL may hold a comma, never white space)
            yield scrapy.Request(
                url, meta={"proxy": self.proxy}, headers={"X-Crawl-Project": self.project}
            )

    def parse(self, response: scrapy.http.Response) -> Iterator[dict[str, Any]]:
        yield {
            "url": response.url,
            "status": response.status,
            "refused": response.headers.get("X-Crawlwarden-Reason", b"").decode() or None,
            "bytes": len(response.body),
        }
