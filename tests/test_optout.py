"""Response-side opt-outs (X-Robots-Tag, robots and TDMRep meta, Content-Usage, TDMRep header
fields), how a site's terms decide which bind, and the post-fetch assessment."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import tracemalloc
from collections.abc import Callable
from html.parser import HTMLParser

import pytest

from addons.streaming import ResponseStream
from proxy import imagemeta
from proxy import optout
from proxy import tdmrep
from proxy.decision import Reason
from proxy.optout import Kind
from proxy.optout import OptOutSignal
from proxy.optout_checks import BYTES_PER_RULE
from proxy.optout_checks import BodyScan
from proxy.optout_checks import OriginEntries
from proxy.optout_checks import RobotsEntry
from proxy.originfiles import OriginFile
from proxy.policy import LegalBasis
from proxy.policy import Respect
from proxy.robots import ALLOW_ALL
from proxy.robots import parse_robots
from tests.optout_fixtures import TOKEN
from tests.optout_fixtures import c2pa_sign
from tests.optout_fixtures import jpeg
from tests.optout_fixtures import jpeg_with_xmp
from tests.optout_fixtures import make_checks
from tests.optout_fixtures import make_policy
from tests.optout_fixtures import pdf
from tests.optout_fixtures import png
from tests.optout_fixtures import png_xmp_chunk
from tests.optout_fixtures import request_context
from tests.optout_fixtures import svg
from tests.optout_fixtures import tdm_xmp_packet
from tests.optout_fixtures import training_mining
from tests.optout_fixtures import xmp_packet

# -- X-Robots-Tag ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["noai"], {"noai"}),
        (["noindex, noai, noimageai"], {"noindex", "noai", "noimageai"}),
        (["noindex", "NoImageAI"], {"noindex", "noimageai"}),  # several field lines
        (["examplebot: noai"], {"noai"}),  # scoped to our token
        (["ExampleBot: noimageai, nofollow"], {"noimageai", "nofollow"}),
        (["otherbot: noai"], set()),  # scoped to another crawler
        (["otherbot: noai, noimageai"], set()),  # the scope runs to the next name
        (["otherbot: noai, examplebot: noimageai"], {"noimageai"}),
        (["unavailable_after: 25 Jun 2010 15:00:00 PST, noai"], {"unavailable_after", "noai"}),
        (["max-image-preview: none"], {"max-image-preview"}),
        ([""], set()),
    ],
)
def test_x_robots_tag_directives_for_our_tokens(values: list[str], expected: set[str]) -> None:
    assert optout.robots_directives(values, [TOKEN]) == expected


# -- the HTML head ---------------------------------------------------------------------------

PAGE = b"""<!doctype html><html><head>
<meta charset="utf-8">
<META NAME="Robots" CONTENT="noindex, NoAI">
<meta name="ExampleBot" content="noimageai">
<meta name="otherbot" content="nofollow">
<meta name="tdm-reservation" content="1">
<meta name="tdm-policy" content="https://site.test/tdm-policy.json">
<title>t</title></head>
<body><meta name="robots" content="none"><p>body</p></body></html>"""


def test_html_head_meta_tags() -> None:
    head = optout.scan_html_head(PAGE, [TOKEN])
    assert head.robots == {"noindex", "noai", "noimageai"}  # not "none": that is in the body
    assert head.tdm.reservation == 1
    assert head.tdm.policy == "https://site.test/tdm-policy.json"


def test_html_head_scan_is_incremental_and_stops_at_the_body() -> None:
    scanner = optout.HtmlHeadScanner([TOKEN])
    done_at = None
    for i in range(0, len(PAGE), 7):
        if scanner.feed(PAGE[i : i + 7]):
            done_at = i + 7
            break
    assert done_at is not None and done_at < len(PAGE)
    assert scanner.result().robots == {"noindex", "noai", "noimageai"}


def test_html_head_scan_parses_nothing_after_the_head(monkeypatch: pytest.MonkeyPatch) -> None:
    # A page is mostly body: parsing it to the scan limit cost ~80 ms per page on the event loop.
    tags: list[str] = []
    original = optout._HeadParser.handle_starttag
    monkeypatch.setattr(
        optout._HeadParser,
        "handle_starttag",
        lambda self, tag, attrs: (tags.append(tag), original(self, tag, attrs)),
    )
    for end_of_head in (b"</head>", b"<body>"):
        tags.clear()
        page = b'<html><head><meta name="robots" content="noai">' + end_of_head
        scanner = optout.HtmlHeadScanner([TOKEN])
        assert scanner.feed(page + b"<p>text</p>" * 10_000)
        assert scanner.result().robots == {"noai"}
        assert tags == ["html", "head", "meta"] + (["body"] if end_of_head == b"<body>" else [])
        assert scanner.feed(b"<p>more</p>") and len(tags) <= 4


TRICKY_HEADS = [
    b'<link href="a>b"><meta name="robots" content="noai">',
    b'<link title="x>y<meta name=robots content=noai>">',  # no meta: all one <link>
    b"<link href='x'/><LINK REL=x><meta name=robots content=noimageai>",
    b'<div title=">"><meta name="robots" content="noai"></div>',
    b'<a <meta name="robots" content="noai">',  # a broken tag swallows the next
    b'<!-- <link> --><link rel="x" <!-- --> ><meta name="robots" content="noai">',
    b'<script><meta name="robots" content="noai"></script><link><title><meta name=robots '
    b'content=noai></title><meta name="tdm-reservation" content="1">',
    b'<style><link></style><textarea><meta name="robots" content="noai"></textarea>',
    b'<p><img src="a.jpg" alt="<meta name=robots content=noai>"><meta content="noai" '
    b'name="robots">',
    b'<svg><link/></svg><span></span><meta name="robots" content="noindex">',
    b"<link",  # cut off inside a tag
    b'<meta property="og:title" content="robots"><meta name="twitter:card" content="noai">',
    b'<meta name="&#114;obots" content="noai"><meta name="tdm-policy" content="https://p.test/">',
    b'<META NAME="ExampleBot" CONTENT="noimageai"><meta name=viewport content="a > b">',
    b'<meta name="description" content="x"',  # cut off inside a meta
]


@pytest.mark.parametrize(
    ("page", "robots"),
    [
        # A title's text is text (RCDATA, HTML 13.2.6.4.4), whatever tags it spells.
        (b'<html><head><title>Using <body></title><meta name="robots" content="noai">', {"noai"}),
        (b'<head><title>a</head>b</title><meta name="robots" content="noai"></head>', {"noai"}),
        (b'<head><title/>x<meta name="robots" content="noai"></title><meta name=robots '
         b'content=noimageai>', {"noimageai"}),  # the flag means nothing on a title
        # "after head" (13.2.6.4.6): a meta before the body is the head's.
        (b'<head></head>\n<!-- x --><meta name="robots" content="noai"><body>', {"noai"}),
        (b'<head></head><link rel=x><meta name="robots" content="noai">x', {"noai"}),
        # Body content ends the head: a meta after it is the body's.
        (b'<head></head>text<meta name="robots" content="noai">', set()),
        (b'<head></head><div></div><meta name="robots" content="noai">', set()),
    ],
)  # fmt: skip
def test_the_head_ends_where_a_browser_ends_it(page: bytes, robots: set[str]) -> None:
    assert optout.scan_html_head(page, [TOKEN]).robots == robots


META_NOAI = b'<meta name="robots" content="noai">'


@pytest.mark.parametrize(
    ("head", "robots"),
    [
        # Comments end where HTML 13.2.5 ends them: "<!-->" and "<!--->" are whole, empty
        # comments, and "--!>" closes one; Python 3.12.1's parser ran each on to the next "-->",
        # over the meta, and the page was delivered (probe-optout).
        (b"<!-->" + META_NOAI + b"<!-- x -->", {"noai"}),
        (b"<!--->" + META_NOAI + b"<!-- x -->", {"noai"}),
        (b"<!-- x --!>" + META_NOAI + b"<!-- y -->", {"noai"}),
        (b"<!-- x -- >" + META_NOAI + b"-->", set()),  # "-- >" ends nothing: still a comment
        # A script ends at "</script" before white space, "/" or ">".
        (b"<script>a()</script/>" + META_NOAI, {"noai"}),
        (b"<script>a()</script foo>" + META_NOAI, {"noai"}),
        (b"<script>a('</scripts>')" + META_NOAI + b"</script>", set()),  # not its end tag
        (b"<style>a{}</STYLE >" + META_NOAI, {"noai"}),
    ],
)
def test_comments_and_scripts_end_where_a_browser_ends_them(head: bytes, robots: set[str]) -> None:
    page = b"<html><head>" + head + b"</head><body>text</body></html>"
    assert optout.scan_html_head(page, [TOKEN]).robots == robots
    for size in (1, 3, 7):  # however the body comes in
        scanner = optout.HtmlHeadScanner([TOKEN])
        for at in range(0, len(page), size):
            if scanner.feed(page[at : at + size]):
                break
        assert scanner.result().robots == robots, size


@pytest.mark.parametrize("head", TRICKY_HEADS)
def test_tags_stepped_over_leave_the_answer_as_the_full_parse_gives_it(
    head: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def scan(chunk: int) -> optout.HtmlHead:
        scanner = optout.HtmlHeadScanner([TOKEN])
        page = b"<html><head>" + head + b"</head><body>x</body></html>"
        for i in range(0, len(page), chunk):
            scanner.feed(page[i : i + chunk])
        return scanner.result()

    fast = [scan(n) for n in (1, 5, 4096)]
    # Every tag parsed in full, as HTMLParser does:
    monkeypatch.setattr(optout._HeadParser, "parse_starttag", HTMLParser.parse_starttag)
    assert fast == [scan(n) for n in (1, 5, 4096)]


@pytest.mark.parametrize(
    ("encoding", "content_type"),
    [
        ("utf-16", "text/html"),  # a byte order mark, little-endian here
        ("utf-16-be", "text/html; charset=UTF-16BE"),
        ("utf-16-le", 'text/html;charset="utf-16le"'),
        ("utf-8-sig", "text/html"),
        ("shift_jis", "text/html; charset=Shift_JIS"),  # ASCII-compatible: read as UTF-8
    ],
)
@pytest.mark.parametrize("chunk", [1, 2, 4096])
def test_a_head_in_utf16_is_read(encoding: str, content_type: str, chunk: int) -> None:
    page = '<html><head><title>日本</title><meta name="robots" content="noai"></head><body>x'
    body = page.encode(encoding)
    scanner = optout.HtmlHeadScanner([TOKEN], content_type=content_type)
    for at in range(0, len(body), chunk):
        scanner.feed(body[at : at + chunk])
    assert scanner.result().robots == {"noai"}


def test_html_head_scan_is_bounded() -> None:
    page = b"<html><head>" + b"<!-- padding -->" * 20_000 + b'<meta name="robots" content="noai">'
    scanner = optout.HtmlHeadScanner([TOKEN], limit=64 * 1024)
    assert scanner.feed(page)
    assert scanner.seen == 64 * 1024
    assert scanner.result().robots == set()
    assert not scanner.result().complete


@pytest.mark.parametrize(
    "page",
    [
        b"<html><head><title>t</title></head>" + b"<p>x</p>" * 20_000,  # the head ended
        b"<html><head><title>t</title>" + b"<!-- padding -->" * 100,  # the body ended first
        b"",
    ],
)
def test_a_head_read_to_its_end_or_the_bodys_is_complete(page: bytes) -> None:
    scanner = optout.HtmlHeadScanner([TOKEN], limit=64 * 1024)
    scanner.feed(page)
    assert scanner.result().complete


def test_a_head_cut_short_by_the_scan_limit_is_a_signal_on_the_record() -> None:
    # A meta past the limit is not read: the record must not look as if the page had none.
    script = b"<script>" + b"var x = 1;\n" * 15_000 + b"</script>"  # ~160 KiB of inline script
    page = b"<html><head>" + script + b'<meta name="robots" content="noai"></head><body>x'
    head = optout.scan_html_head(page, [TOKEN])
    assert not head.complete and head.robots == set()
    signals = optout.response_signals([], "text/html", [TOKEN], head)
    assert signals == [optout.HEAD_CUT_SHORT] and not signals[0].opts_out
    assert str(optout.HTML_SCAN_LIMIT) in signals[0].detail
    whole = optout.scan_html_head(b"<html><head></head><body>" + script, [TOKEN])
    assert optout.response_signals([], "text/html", [TOKEN], whole) == []


# -- deciding by the site's terms ------------------------------------------------------------


@pytest.mark.parametrize(
    ("basis", "respect", "binds"),
    [
        ("tdm", {}, True),
        ("tdm", {"noai": False, "image_metadata": False}, True),  # a tdm-reservation meta
        ("tdm", {"noai": False, "image_metadata": False, "tdmrep": False}, False),
        ("licence", {"noai": False, "image_metadata": False}, False),  # TDMRep never binds it
        ("licence", {"noai": False}, True),
        ("tdm", {"noai": False, "tdmrep": False, "robots": True, "content_usage": True}, True),
    ],
)
def test_whether_a_bodys_signals_bind(basis: str, respect: dict[str, bool], binds: bool) -> None:
    # Only signals in the body count: robots.txt and header fields are read whatever the range.
    legal = {"tdm": TDM, "licence": LICENCE}[basis]
    assert optout.body_signals_bind(legal, Respect(**respect)) is binds


TDM = LegalBasis(kind="tdm_exception", ref="DSM Art. 4")
LICENCE = LegalBasis(kind="licence", ref="LIC-1", expires=dt.date(2999, 1, 1))
RESEARCH = LegalBasis(kind="research_exception", ref="DSM Art. 3")
NOAI = OptOutSignal(Kind.NOAI, "x-robots-tag:noai", True)
RESERVED = OptOutSignal(Kind.TDMREP, "tdm-header:reserved", True)
SEEN = OptOutSignal(Kind.CONTENT_USAGE, "content-usage:search=y", False)


@pytest.mark.parametrize(
    ("signals", "basis", "respect", "reason"),
    [
        ([SEEN, NOAI], TDM, Respect(), Reason.NOAI_DIRECTIVE),
        ([SEEN], TDM, Respect(), None),
        ([NOAI], TDM, Respect(noai=False), None),
        ([RESERVED], TDM, Respect(), Reason.TDM_RESERVED),
        ([RESERVED], RESEARCH, Respect(), Reason.TDM_RESERVED),
        ([RESERVED], LICENCE, Respect(), None),  # a licence answers a reservation
        ([RESERVED, NOAI], LICENCE, Respect(), Reason.NOAI_DIRECTIVE),
        ([RESERVED, NOAI], LICENCE, Respect(noai=False), None),
    ],
)
def test_signals_bind_per_basis_and_respect_flags(
    signals: list[OptOutSignal], basis: LegalBasis, respect: Respect, reason: Reason | None
) -> None:
    decision = optout.decide(signals, basis, respect, site="s")
    if reason is None:
        assert decision is None
    else:
        assert decision is not None and decision.reason is reason and decision.status == 451
        assert decision.signals == tuple(s.name for s in signals)
        assert decision.rule in ("respect.noai", "respect.tdmrep")


# -- one response ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "content_type", "names", "binding"),
    [
        ([("X-Robots-Tag", "noai")], "text/html", ["x-robots-tag:noai"], True),
        ([("X-Robots-Tag", "noimageai")], "text/html", ["x-robots-tag:noimageai"], False),
        ([("X-Robots-Tag", "noimageai")], "image/jpeg", ["x-robots-tag:noimageai"], True),
        ([("Content-Usage", "train-ai=n, search=y")], "image/png",
         ["content-usage:train-ai=n", "content-usage:search=y"], True),
        ([("Content-Usage", "train-ai=y")], "image/png", ["content-usage:train-ai=y"], False),
        ([("Content-Usage", "train-ai=N")], "image/png", [], False),
        ([("tdm-reservation", "1"), ("tdm-policy", "https://p.test/x")], "image/png",
         ["tdm-header:reserved", "tdm-header:policy"], True),
        ([("tdm-reservation", "0")], "image/png", ["tdm-header:not-reserved"], False),
        ([("Content-Type", "image/png")], "image/png", [], False),
    ],
)  # fmt: skip
def test_response_header_signals(
    headers: list[tuple[str, str]], content_type: str, names: list[str], binding: bool
) -> None:
    signals = optout.response_signals(headers, content_type, [TOKEN])
    assert [s.name for s in signals] == names
    assert any(s.opts_out for s in signals) is binding


async def assess(headers, body, content_type, policy=None, url="https://site-a.test/a"):  # type: ignore[no-untyped-def]
    policy = policy or make_policy()
    checks = make_checks(policy)
    try:
        return await checks.assess_response(
            request_context(policy, url), 200, headers, body, content_type
        )
    finally:
        await checks.close()


async def test_an_html_page_with_a_tdm_meta_reservation_is_withheld() -> None:
    result = await assess([("Content-Type", "text/html")], PAGE, "text/html; charset=utf-8")
    assert result.decision is not None and result.decision.reason is Reason.TDM_RESERVED
    assert result.signals == (
        "tdm-meta:reserved",
        "tdm-meta:policy",
        "meta-robots:noai",
        "meta-robots:noimageai",
    )


async def test_a_licensed_site_is_collected_and_the_signals_recorded() -> None:
    policy = make_policy(
        sites=[
            {
                "id": "archive",
                "match": ["site-a.test"],
                "legal_basis": {"kind": "licence", "ref": "LIC-9", "expires": "2999-01-01"},
                "respect": {"noai": False, "image_metadata": False},
            }
        ]
    )
    image = jpeg_with_xmp(xmp_packet("DMI-PROHIBITED"))
    headers = [("X-Robots-Tag", "noai"), ("tdm-reservation", "1")]
    result = await assess(headers, image, "image/jpeg", policy)
    assert result.decision is None
    assert result.signals == (
        "tdm-header:reserved",
        "x-robots-tag:noai",
        "iptc-plus:DMI-PROHIBITED",
    )


async def test_an_image_is_recognized_by_its_bytes_not_its_content_type() -> None:
    image = png(before_idat=[png_xmp_chunk(xmp_packet("DMI-PROHIBITED-AIMLTRAINING"))])
    result = await assess([], image, "application/octet-stream")
    assert result.decision is not None and result.decision.reason is Reason.IMAGE_OPTOUT
    assert result.signals == ("iptc-plus:DMI-PROHIBITED-AIMLTRAINING",)


async def test_a_c2pa_training_mining_assertion_withholds() -> None:
    image = c2pa_sign(jpeg(), "image/jpeg", [training_mining("cawg", "constrained")])
    result = await assess([], image, "image/jpeg")
    assert result.decision is not None and result.decision.reason is Reason.IMAGE_OPTOUT
    assert result.signals == ("cawg:training-mining=constrained",)


async def test_body_scan_decides_on_a_bounded_prefix_while_streaming() -> None:
    packet = xmp_packet("DMI-PROHIBITED", form="element")
    image = jpeg_with_xmp(packet) + b"\x00" * 5_000_000  # image data that is never needed
    policy = make_policy()
    checks = make_checks(policy)
    scan = checks.body_scan("image/jpeg")
    fed = 0
    for i in range(0, len(image), 16 * 1024):
        fed += 16 * 1024
        if scan.feed(image[i : i + 16 * 1024]):
            break
    try:
        result = await checks.assess_response(
            request_context(policy, "https://site-a.test/x.jpg"),
            200,
            [],
            b"",
            "image/jpeg",
            scan=scan,
        )
    finally:
        await checks.close()
    assert fed == 16 * 1024
    assert result.decision is not None and result.signals == ("iptc-plus:DMI-PROHIBITED",)


async def test_an_image_sent_as_html_is_read_as_an_image() -> None:
    image = jpeg_with_xmp(xmp_packet("DMI-PROHIBITED"))
    result = await assess([], image, "text/html; charset=utf-8")
    assert result.decision is not None and result.decision.reason is Reason.IMAGE_OPTOUT
    page = await assess([], PAGE, "text/html")
    assert page.decision is not None and page.decision.reason is Reason.TDM_RESERVED


@pytest.mark.parametrize("first", [1, 2, 4, 11])
def test_an_image_sent_as_html_is_known_by_its_signature_however_it_is_split(first: int) -> None:
    # A first write shorter than the signature read the image as HTML (a streamed body's
    # first chunk is what the site's first write held).
    image = png(before_idat=[png_xmp_chunk(xmp_packet("DMI-PROHIBITED"))])
    scan = BodyScan("text/html", [TOKEN])
    assert not scan.feed(image[:first])
    scan.feed(image[first:])
    scan.finish()
    assert scan.html_head is None and scan.image is not None
    assert [imagemeta.data_mining_values(p) for p in scan.image.xmp] == [["DMI-PROHIBITED"]]


def test_a_page_too_short_to_tell_is_still_read_as_html() -> None:
    scan = BodyScan("text/html", [TOKEN])
    assert not scan.feed(b"\x89PN")  # could still be a PNG
    scan.finish()
    assert scan.image is None and scan.html_head is not None


async def test_a_pdfs_tdm_reservation_withholds_it_and_noimageai_does_not() -> None:
    reserved = pdf(tdm_xmp_packet("1"))
    result = await assess([], reserved, "application/pdf")
    assert result.decision is not None and result.decision.reason is Reason.TDM_RESERVED
    plain = await assess([("X-Robots-Tag", "noimageai")], pdf(), "application/octet-stream")
    assert plain.decision is None and plain.signals == ("x-robots-tag:noimageai",)


@pytest.mark.parametrize(
    ("body", "content_type", "reason", "signals"),
    [
        (svg(xmp_packet("DMI-PROHIBITED")), "image/svg+xml", Reason.IMAGE_OPTOUT, None),
        (
            b"\xef\xbb\xbf\n  " + svg(xmp_packet("DMI-PROHIBITED")),
            "image/svg+xml",
            Reason.IMAGE_OPTOUT,
            None,
        ),
        (svg(), "image/svg+xml; charset=utf-8", None, ()),
        # Gzipped with no Content-Encoding (a .svgz as it lies on disk): not read, and said so.
        (
            gzip.compress(svg(xmp_packet("DMI-PROHIBITED"))),
            "image/svg+xml",
            None,
            ("image-metadata:unread",),
        ),
        # Not an SVG by its Content-Type: text is not sniffed.
        (svg(xmp_packet("DMI-PROHIBITED")), "text/plain", None, ()),
    ],
    ids=["svg", "bom-and-space", "plain", "svgz", "text"],
)
async def test_an_svgs_xmp_binds_as_any_images(body, content_type, reason, signals) -> None:  # type: ignore[no-untyped-def]
    result = await assess([], body, content_type)
    if reason is None:
        assert result.decision is None and result.signals == signals
    else:
        assert result.decision is not None and result.decision.reason is reason
        assert result.signals == ("iptc-plus:DMI-PROHIBITED",)


@pytest.mark.parametrize(
    ("prefix", "html"),
    [
        (b"  <!DOCTYPE html><html>", True),
        (b"\xef\xbb\xbf<HTML lang=en>", True),
        (b"<a href=x>", True),
        (b"<!-- a comment -->", True),
        (b"<abbr>", False),  # not one of the patterns: a tag must end where the pattern does
        (b'{"a": 1}', False),
        (b"<ht", None),  # more bytes needed
    ],
)
def test_a_body_without_a_content_type_is_sniffed_as_html_as_browsers_do(
    prefix: bytes, html: bool | None
) -> None:
    assert optout.sniffs_as_html(prefix) is html


async def test_an_untyped_page_is_read_and_a_typed_text_is_not() -> None:
    page = b'\n<html><head><meta name="robots" content="noai"></head><body>x</body></html>'
    untyped = await assess([], page, None)
    assert untyped.decision is not None and untyped.signals == ("meta-robots:noai",)
    assert (await assess([], page, "text/plain")).decision is None  # a declared type stands


def test_body_scan_needs_nothing_for_other_content() -> None:
    scan = BodyScan("application/json", [TOKEN])
    assert scan.feed(b'{"a": 1, "padding": "..........."}')
    assert scan.image is None and scan.html_head is None


@pytest.mark.parametrize(
    ("coding", "chunks"),
    [
        ("compress", [b"\x1f\x9d\x90" + b"\x00" * 100_000, b""]),
        ("gzip", [b"\x1f\x8b\x09", b"\x00" * 100_000, b""]),  # method 9: no such method
    ],
)
def test_a_streamed_body_it_cannot_decode_passes_on_with_its_record_saying_so(
    coding: str, chunks: list[bytes]
) -> None:
    policy = make_policy()
    checks = make_checks(policy)
    ctx = request_context(policy, "https://site-a.test/big.html")
    stream = ResponseStream(
        checks.body_scan("text/html"),
        coding,
        lambda scan: checks.assess_response_sync(ctx, 200, [], b"", "text/html", scan=scan),
    )
    delivered = b"".join(b"".join(stream(chunk)) for chunk in chunks)
    assert delivered == b"".join(chunks) and not stream.withheld
    assert stream.assessment is not None and stream.assessment.signals == ("body:undecodable",)


def test_the_synchronous_assessment_gives_the_same_answer() -> None:
    policy = make_policy()
    checks = make_checks(policy)
    image = c2pa_sign(png(), "image/png", [training_mining("c2pa", "notAllowed")])
    ctx = request_context(policy, "https://site-a.test/a.png")
    result = checks.assess_response_sync(ctx, 200, [("X-Robots-Tag", "noimageai")], image, None)
    assert result.decision is not None and result.decision.reason is Reason.NOAI_DIRECTIVE
    assert result.signals == ("x-robots-tag:noimageai", "c2pa:training-mining=notAllowed")


def test_parsed_origin_files_are_bounded_by_their_bodies_bytes() -> None:
    # 50 000 robots.txt of up to 500 KiB each were kept in memory (25 GB at worst).
    entries = OriginEntries[RobotsEntry](max_entries=50_000, max_bytes=8 * 2**20)
    body = b"# padding\n" * (500 * 1024 // 10)
    for i in range(100):
        file = OriginFile(f"https://o{i}.test:443/robots.txt", "ok", 200, body, 0.0, 1e12)
        entries.put(f"https://o{i}.test:443", RobotsEntry(file, ALLOW_ALL))
    assert entries.bytes <= 8 * 2**20 and len(entries) == 8 * 2**20 // len(body)
    assert entries.get("https://o99.test:443") is not None  # the newest stay
    assert entries.get("https://o0.test:443") is None
    entries.put(
        "https://o99.test:443", RobotsEntry(OriginFile("u", "ok", 200, b"", 0, 1e12), ALLOW_ALL)
    )
    assert entries.bytes == (len(entries) - 1) * len(body)  # a replaced entry's bytes given back


ROBOTS_SHAPES = {
    "prefixes": ("Disallow: /p{}/", 5000),
    "wildcards": ("Disallow: /p{}/x*", 5000),
    "many stars": ("Disallow: /a*b*c*d*e*f{}", 5000),
    "anchored index pages": ("Allow: /p{}/index.html$", 5000),
    "content usage": ("Content-Usage: /p{} train-ai=n", 5000),
    # a line read as four patterns ('$' read twice, an index.html allowing its '/' each time)
    "dollars and index pages": ("Allow:/*{}$*$*/index.html", 5000),
    # each character quoted as three ('€' is %E2%82%AC)
    "quoted": ("Allow: /{}" + "€" * 40 + "*$/index.html", 3000),
    "one long line": ("Allow: /{}" + "<\u2039" * 80_000 + "*$/index.html", 1),
    "long content usage": ("Content-Usage: /{}" + "\u2039" * 80_000 + " train-ai=n", 1),
}


@pytest.mark.parametrize("shape", list(ROBOTS_SHAPES))
def test_a_parsed_robots_txt_takes_no_more_memory_than_the_bound_counts(shape: str) -> None:
    # The parsed files' bound counted their bodies only: a 500 KiB robots.txt of 25 000
    # wildcard rules is 15.6 MiB parsed, and 64 MiB of bodies let in 2 GB (broad-crawl probe).
    # Then 1 KiB a line: a line may be four patterns, each character quoted as three (9 MB
    # held for 4 MB counted; one 500 KiB line was 6.1 MB, counted 0.5: probe-robots).
    line, lines = ROBOTS_SHAPES[shape]
    body = ("User-agent: *\n" + "".join(line.format(i) + "\n" for i in range(lines))).encode()
    taken, rules = _traced(lambda: parse_robots(body, [TOKEN]))
    assert taken <= rules.held_bytes, taken / rules.held_bytes
    assert taken > 50 * lines  # (every line was parsed and held)


def test_a_parsed_tdmrep_rule_takes_no_more_memory_than_the_bound_counts() -> None:
    reserved = [{"location": f"/p{i}/*x*y", "tdm-reservation": 1} for i in range(5000)]
    taken, tdm = _traced(lambda: tdmrep.parse_tdmrep(json.dumps(reserved)))
    assert tdm.size == 5000 and taken <= BYTES_PER_RULE * tdm.size, taken / tdm.size


def _traced[T](make: Callable[[], T]) -> tuple[int, T]:
    """What `make()` returns, and the bytes it holds (tracemalloc)."""
    tracemalloc.start()
    try:
        made = make()
        return tracemalloc.get_traced_memory()[0], made
    finally:
        tracemalloc.stop()


def test_parsed_origin_files_are_bounded_by_their_rules_too() -> None:
    body = ("User-agent: *\n" + "".join(f"Disallow: /p{i}/x*\n" for i in range(2000))).encode()
    file = OriginFile("https://o.test:443/robots.txt", "ok", 200, body, 0.0, 1e12)
    entry = RobotsEntry(file, parse_robots(body, [TOKEN]))
    assert entry.weight == len(body) + entry.rules.held_bytes
    assert entry.rules.held_bytes > 2000 * 300  # (a tuple, strings and slots per rule)
    entries = OriginEntries[RobotsEntry](max_entries=50_000, max_bytes=4 * entry.weight)
    for i in range(10):
        entries.put(f"https://o{i}.test:443", entry)
    assert len(entries) == 4 and entries.bytes == 4 * entry.weight


@pytest.mark.parametrize(
    ("content_type", "mime"),
    [
        ("Text/HTML; charset=utf-8", "text/html"),
        ("text/plain, text/html", "text/html"),  # sent twice: the last one (WHATWG Fetch)
        ('text/html; charset="a,b"', "text/html"),
        ("text/html, nonsense", "text/html"),  # the last *valid* one
        ("unknown/unknown", ""),  # says nothing: sniffed as no type is
        ("application/unknown", ""),
        ("*/*", ""),
        ("text/html, */*", "text/html"),  # */* is skipped, not read as no type (review)
        ("html", ""),  # no MIME type
        ("", ""),
        (None, ""),
    ],
)
def test_a_content_type_is_read_as_browsers_read_it(content_type: str | None, mime: str) -> None:
    assert optout.mime_type(content_type) == mime


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain, text/html", "unknown/unknown", "html", "*/*", "text/html, */*"],
)
async def test_a_page_a_browser_reads_as_html_is_read_as_one(content_type: str | None) -> None:
    # Only a body with no Content-Type at all was sniffed, and only one whose Content-Type was
    # exactly text/html read as a page: a page sent with two Content-Types (text/html last), as
    # unknown/unknown or as "html" was delivered with its robots noai unread (probe-optout).
    page = b'<html><head><meta name="robots" content="noai"></head><body>x</body></html>'
    result = await assess([], page, content_type)
    assert result.decision is not None and result.decision.reason is Reason.NOAI_DIRECTIVE
    assert result.signals == ("meta-robots:noai",)
    text = await assess([], page, "text/html, text/plain")  # the last one: text, not read
    assert text.decision is None
