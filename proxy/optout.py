"""Opt-out signals: what a site or a response says, and whether the site's terms make it bind us.

A signal is a value (`OptOutSignal`): its kind (named like the policy's `respect` flags), a
bounded name for fetch records and metrics (e.g. "x-robots-tag:noai"), and whether it opts out
of AI training. `decide()` turns the signals of one request into a refusal, per the site's legal
basis and respect flags (`Site.terms_on(day)`); every signal is reported either way, so a fetch
record of a licensed site still lists the noai it was sent.

Response-side signals read here, from headers and a bounded head of an HTML document:

- `X-Robots-Tag` (any number of field lines, comma lists, an optional `name:` prefix that scopes
  the directives after it to one crawler, matched against our product tokens) and
  `<meta name="robots">` or `<meta name="<our token>">`: `noai` opts out for any content,
  `noimageai` for images (the de-facto directives of DeviantArt, Spawning and others);
- `Content-Usage` (draft-ietf-aipref-attach-05 section 2, vocabulary in `proxy.aipref`);
- `tdm-reservation` / `tdm-policy` header fields and meta tags (TDMRep, `proxy.tdmrep`).
"""

from __future__ import annotations

import codecs
import enum
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from html.parser import HTMLParser

from proxy import aipref
from proxy import tdmrep
from proxy.decision import Decision
from proxy.decision import Reason
from proxy.decision import refuse
from proxy.policy import LegalBasis
from proxy.policy import Respect

HTML_SCAN_LIMIT = 128 * 1024


class Kind(enum.StrEnum):
    """The kind of a signal; the values are the names of the policy's `respect` flags."""

    ROBOTS = "robots"
    TDMREP = "tdmrep"
    NOAI = "noai"
    CONTENT_USAGE = "content_usage"
    IMAGE_METADATA = "image_metadata"


REASONS: dict[Kind, Reason] = {
    Kind.ROBOTS: Reason.ROBOTS_DISALLOWED,
    Kind.TDMREP: Reason.TDM_RESERVED,
    Kind.NOAI: Reason.NOAI_DIRECTIVE,
    Kind.CONTENT_USAGE: Reason.CONTENT_USAGE,
    Kind.IMAGE_METADATA: Reason.IMAGE_OPTOUT,
}

# A rights holder's licence or consent is the answer a TDM reservation asks for (TDMRep: the
# tdm-policy says how to acquire one), so a reservation does not refuse on those bases.
_PERMISSION_BASES = frozenset({"licence", "consent"})


@dataclass(frozen=True, slots=True)
class OptOutSignal:
    kind: Kind
    name: str  # bounded vocabulary: used as a metrics label and in fetch records
    opts_out: bool
    detail: str = ""


# Seen, never binding: the page's head went on past HTML_SCAN_LIMIT (inline scripts and styles),
# and a <meta> after that point (robots, noai, tdm-reservation) was not read. The record says so.
HEAD_CUT_SHORT = OptOutSignal(
    Kind.NOAI,
    "html-head:incomplete",
    False,
    f"the page's head did not end within its first {HTML_SCAN_LIMIT} bytes; "
    "meta tags after those were not read",
)


def applies(kind: Kind, basis: LegalBasis, respect: Respect) -> bool:
    """Whether a signal of this kind binds a fetch made on this basis with these flags."""
    if not getattr(respect, kind.value):
        return False
    return not (kind is Kind.TDMREP and basis.kind in _PERMISSION_BASES)


def body_signals_bind(basis: LegalBasis, respect: Respect) -> bool:
    """Whether an opt-out carried in a response body (a page's <meta>s, an image's metadata)
    would bind this fetch. Then only the whole body will do: a range past its first bytes
    carries none of those signals (`Range` is dropped)."""
    return (
        applies(Kind.NOAI, basis, respect)
        or applies(Kind.IMAGE_METADATA, basis, respect)
        or applies(Kind.TDMREP, basis, respect)
    )


def decide(
    signals: Iterable[OptOutSignal],
    basis: LegalBasis,
    respect: Respect,
    *,
    site: str | None = None,
) -> Decision | None:
    """The refusal for the first binding opt-out among `signals`, or None.

    The refusal carries every signal's name, binding or not.
    """
    signals = list(signals)
    names = tuple(dict.fromkeys(s.name for s in signals))
    for signal in signals:
        if signal.opts_out and applies(signal.kind, basis, respect):
            return refuse(
                REASONS[signal.kind],
                signal.detail or f"the site opted out of AI training ({signal.name})",
                rule=f"respect.{signal.kind.value}",
                site=site,
                signals=names,
            )
    return None


# -- X-Robots-Tag and robots meta ----------------------------------------------------------

_AI_DIRECTIVES = ("noai", "noimageai")
# Directives that carry a value after a colon; their name is not a crawler scope.
_VALUED_DIRECTIVES = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
)


def robots_directives(values: Iterable[str], tokens: Iterable[str]) -> set[str]:
    """The directives (lower-case) of X-Robots-Tag field values that apply to our crawler.

    `X-Robots-Tag: otherbot: noai, noimageai` scopes both directives to otherbot, until another
    `name:` starts a new scope; directives with no scope apply to every crawler.
    """
    ours = {t.lower() for t in tokens}
    found: set[str] = set()
    for value in values:
        scope: str | None = None
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            name, colon, rest = part.partition(":")
            name = name.strip().lower()
            if colon and name not in _VALUED_DIRECTIVES and " " not in name:
                scope = name
                part = rest.strip()
                if not part:
                    continue
            if scope is None or scope in ours:
                found.add(part.lower().split(":", 1)[0].strip())
    return found


def _meta_directives(content: str) -> set[str]:
    return {p.strip().lower() for p in content.split(",") if p.strip()}


# -- HTML head -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HtmlHead:
    robots: frozenset[str]  # directives from <meta name="robots"> or <meta name="<our token>">
    tdm: tdmrep.TdmDeclaration
    # False: the head did not end within the scan limit, so a <meta> after it was not read.
    complete: bool = True


class HtmlHeadScanner:
    """An incremental, bounded read of an HTML document's head.

    Feed decoded body bytes (Content-Encoding removed) as they arrive; `feed()` returns True
    once the answer is known: the head ended (`</head>` or `<body>`) or `limit` bytes were read.
    """

    def __init__(
        self, tokens: Iterable[str], limit: int = HTML_SCAN_LIMIT, content_type: str | None = None
    ):
        self._parser = _HeadParser({t.lower() for t in tokens})
        self._decoder: codecs.IncrementalDecoder | None = None  # chosen by the first bytes
        self._declared = _utf16_declared(content_type)
        self._first = b""
        self._limit = limit
        self.seen = 0

    @property
    def done(self) -> bool:
        return self._parser.finished or self.seen >= self._limit

    def feed(self, chunk: bytes) -> bool:
        if self.done:
            return True
        if self.seen + len(chunk) > self._limit:
            chunk = chunk[: self._limit - self.seen]  # (a slice copies: only when needed)
        self.seen += len(chunk)
        if self._decoder is None:
            if self._first or len(chunk) < 3:
                chunk = self._first = self._first + chunk
                if len(chunk) < 3 and self.seen < self._limit:
                    return False  # too little to see a byte order mark (or any head) in
                self._first = b""
            self._decoder = _head_decoder(chunk, self._declared)
        try:
            self._parser.feed(self._decoder.decode(chunk))
        except _HeadEnded:
            pass  # the rest of the chunk is the body: not parsed (pages are mostly body)
        return self.done

    @property
    def cut_short(self) -> bool:
        """Whether the scan stopped at its limit inside the head (a body that ended before the
        limit was read whole, head or no head)."""
        return not self._parser.finished and self.seen >= self._limit

    def result(self) -> HtmlHead:
        p = self._parser
        reservation = max(p.reservations) if p.reservations else None
        declaration = tdmrep.TdmDeclaration(reservation, p.policy)
        return HtmlHead(frozenset(p.robots), declaration, complete=not self.cut_short)


def _utf16_declared(content_type: str | None) -> str | None:
    """The Content-Type's charset if it is a UTF-16 one: the only charsets on the web whose
    markup is not ASCII bytes (the others read as UTF-8 here, tags and attributes intact)."""
    for param in (content_type or "").split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip("\"'").lower()
            if charset in ("utf-16", "utf-16le", "utf-16be"):
                return charset
    return None


def _head_decoder(first: bytes, declared: str | None) -> codecs.IncrementalDecoder:
    """By the byte order mark if there is one (it wins over the Content-Type, as WHATWG's
    encoding sniffing says), else by a declared UTF-16 charset, else UTF-8."""
    if first.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding = "utf-16"  # reads the mark and drops it
    elif first.startswith(b"\xef\xbb\xbf"):
        encoding = "utf-8-sig"
    else:
        encoding = declared or "utf-8"
    return codecs.getincrementaldecoder(encoding)(errors="replace")


def scan_html_head(body_prefix: bytes, tokens: Iterable[str]) -> HtmlHead:
    scanner = HtmlHeadScanner(tokens)
    scanner.feed(body_prefix)
    return scanner.result()


class _HeadEnded(Exception):
    """Raised out of the parser where the head ends: HTMLParser parses all it is fed, and the
    markup after the head (most of a page, all of it to the scan limit) would cost ~0.5 ms per
    KiB on the event loop for nothing."""


# Start tags that say nothing to the scan and hold no special content (unlike script, style,
# title, textarea, svg...): stepped over without reading their attributes.
_STEPPED_OVER = frozenset(
    "link base a abbr b br button div em footer form h1 h2 h3 h4 h5 h6 header hr i img input "
    "label li main nav ol option p picture section small source span strong table tbody td th "
    "thead tr ul".split()
)
_TAG_NAME = re.compile(r"[a-zA-Z][^\t\n\r\f />\x00]*")  # as HTMLParser reads a tag's name


# <title> and <textarea> hold text only (RCDATA, HTML 13.2.6.4.4): `<title>Using the <body>
# element</title>` names no body. Python 3.12's parser reads only script and style so.
_RCDATA = frozenset({"title", "textarea"})
# What the "after head" insertion mode still puts in the head (HTML 13.2.6.4.6): a <meta> between
# </head> and <body> (templates and plugins write them there) is a meta tag of the head.
_AFTER_HEAD_KEPT = frozenset(
    "base basefont bgsound link meta noframes script style template title".split()
)


# Where a comment ends (HTML 13.2.5.45-50): `-->`, or `--!>`; not `-- >`, which Python's parser
# took for an end.
_COMMENT_END = re.compile(r"--!?>")


@functools.lru_cache(maxsize=8)
def _end_tag_of(element: str) -> re.Pattern[str]:
    """The end tag of a script, style, title or textarea as HTML 13.2.5 reads it: its name, then
    white space, "/" or ">", then anything up to ">" (`</script/>`, `</script foo>`)."""
    return re.compile(rf"</{re.escape(element)}(?:[\t\n\r\f /][^>]*)?>", re.IGNORECASE)


class _HeadParser(HTMLParser):
    """Python's HTMLParser, with comments and the end of a script (or style, title, textarea)
    read as the HTML standard reads them, as browsers do: Python 3.12.1's parser ran a comment
    opened by `<!-->` or `<!--->`, or closed by `--!>`, on to a later `-->`, and a script closed
    by `</script/>` on to the end, so a robots meta a browser reads after one went unread."""

    def __init__(self, tokens: set[str]):
        super().__init__(convert_charrefs=True)
        self.tokens = tokens
        self._read_names = ("robots", "tdm-", *tokens)
        self.finished = False
        self._after_head = False  # </head> was seen: the head ends at the next body content
        self.robots: set[str] = set()
        self.reservations: list[int] = []
        self.policy: str | None = None

    def parse_starttag(self, i: int) -> int:
        # HTMLParser reads every attribute of every tag in Python (~13 us a tag), and a head is
        # mostly <link>s and <meta>s for others (og:, twitter:, viewport...), and a page without
        # </head> has its body's tags: those are only stepped over.
        name = _TAG_NAME.match(self.rawdata, i + 1)
        tag = name.group().lower() if name is not None else ""
        if self._after_head and tag not in _AFTER_HEAD_KEPT:
            self._end()
        if tag in _STEPPED_OVER:
            return self.check_for_whole_start_tag(i)  # where the tag ends; -1: not all here yet
        if tag == "meta":
            end = self.check_for_whole_start_tag(i)
            if end < 0 or not self._may_be_read(self.rawdata[i:end]):
                return end
        return super().parse_starttag(i)

    def parse_comment(self, i: int, report: bool = True) -> int:
        rawdata = self.rawdata
        if rawdata.startswith(">", i + 4):  # `<!-->`: a whole, empty comment
            return i + 5
        if rawdata.startswith("->", i + 4):  # `<!--->` likewise
            return i + 6
        match = _COMMENT_END.search(rawdata, i + 4)
        return -1 if match is None else match.end()

    def set_cdata_mode(self, elem: str, *, escapable: bool = False) -> None:
        # (`escapable`: Pythons that have the standard's reading already pass it for title and
        # textarea; 3.12.1's method has no such argument.)
        if escapable:
            super().set_cdata_mode(elem, escapable=True)
        else:
            super().set_cdata_mode(elem)
        # Where the element may end: `</script` before white space, "/" or ">".
        self.interesting = re.compile(rf"</{re.escape(elem)}(?=[\t\n\r\f />])", re.I)

    def parse_endtag(self, i: int) -> int:
        if self.cdata_elem is not None:
            match = _end_tag_of(self.cdata_elem).match(self.rawdata, i)
            if match is not None:
                self.handle_endtag(self.cdata_elem)
                self.clear_cdata_mode()
                return match.end()
        return super().parse_endtag(i)

    def _may_be_read(self, tag_text: str) -> bool:
        """Whether a <meta> could be one `handle_starttag` reads: its text names robots, TDMRep
        or one of our tokens, or holds a character reference (which the full parse resolves)."""
        text = tag_text.lower()
        return "&" in text or any(name in text for name in self._read_names)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body":
            self._end()
        if tag in _RCDATA:
            self.set_cdata_mode(tag)  # (`<title/>` too: the flag means nothing on a title)
        if tag != "meta":
            return
        values = {k.lower(): (v or "") for k, v in attrs}
        name = values.get("name", "").strip().lower()
        content = values.get("content", "")
        if name == "robots" or name in self.tokens:
            self.robots |= _meta_directives(content)
        elif name == "tdm-reservation":
            reservation = tdmrep.parse_reservation(content)
            if reservation is not None:
                self.reservations.append(reservation)
        elif name == "tdm-policy" and self.policy is None:
            self.policy = tdmrep.parse_policy(content)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag == "head":
            self._after_head = True

    def handle_data(self, data: str) -> None:
        # Text after </head> (not a script's or style's) is the body's.
        if self._after_head and self.cdata_elem is None and not data.isspace():
            self._end()

    def _end(self) -> None:
        self.finished = True
        raise _HeadEnded


# -- one response ----------------------------------------------------------------------------


# A MIME type's essence (RFC 9110 8.3.1: type "/" subtype, each a token).
_ESSENCE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+/[!#$%&'*+.^_`|~0-9a-z-]+")
# Types that say nothing of the content: a browser sniffs the body as for none (WHATWG MIME
# Sniffing 7: "unknown/unknown", "application/unknown"). "*/*" in a list is skipped (Fetch).
_UNKNOWN_TYPES = frozenset({"unknown/unknown", "application/unknown"})


def mime_type(content_type: str | None) -> str:
    """`text/html` of `Text/HTML; charset=utf-8`; "" for none, and for a value that is no MIME
    type (`html`) or says nothing (`unknown/unknown`). Of a list (a Content-Type sent twice,
    its values joined), the last valid one other than `*/*`, as WHATWG Fetch's "extract a MIME
    type" and so browsers read it: `text/plain, text/html` and `text/html, */*` are pages."""
    if not content_type:
        return ""
    for value in reversed(content_type.split(",")):
        essence = value.split(";", 1)[0].strip().lower()
        if essence != "*/*" and _ESSENCE.fullmatch(essence):
            return "" if essence in _UNKNOWN_TYPES else essence
    return ""


def is_html(content_type: str | None) -> bool:
    mime = mime_type(content_type)
    return mime in ("text/html", "application/xhtml+xml")


# WHATWG MIME Sniffing 7.1 ("identify an unknown MIME type"): a body served without a
# Content-Type that begins so, after white space, is HTML to a browser.
_HTML_SNIFFED = tuple(
    p.encode()
    for p in (
        "<!doctype html", "<html", "<head", "<script", "<iframe", "<h1", "<div", "<font",
        "<table", "<a", "<style", "<title", "<b", "<body", "<br", "<p", "<!--",
    )
)  # fmt: skip
_SNIFF_WHITESPACE = b"\t\n\x0c\r "


def sniffs_as_html(prefix: bytes) -> bool | None:
    """Whether a body without a Content-Type begins as HTML does (WHATWG MIME Sniffing 7.1);
    None: too few bytes yet to tell."""
    text = prefix.removeprefix(b"\xef\xbb\xbf").lstrip(_SNIFF_WHITESPACE)[:16].lower()
    for pattern in _HTML_SNIFFED:
        if len(text) <= len(pattern):
            if pattern.startswith(text) and len(prefix) < 512:
                return None  # it may still be this one
            continue
        if text.startswith(pattern) and text[len(pattern)] in b" >":
            return True
    return False


def is_image(content_type: str | None) -> bool:
    return mime_type(content_type).startswith("image/")


def is_svg(content_type: str | None) -> bool:
    return mime_type(content_type) == "image/svg+xml"


def header_values(headers: Iterable[tuple[str, str]], name: str) -> list[str]:
    name = name.lower()
    return [v for k, v in headers if k.lower() == name]


def tdm_signals(declaration: tdmrep.TdmDeclaration, source: str) -> list[OptOutSignal]:
    """Signals of one TDMRep declaration; `source` is "tdmrep" (the file), "tdm-header" or
    "tdm-meta"."""
    signals: list[OptOutSignal] = []
    if declaration.reservation == 1:
        policy = f"; a licence may be offered at {declaration.policy}" if declaration.policy else ""
        signals.append(
            OptOutSignal(
                Kind.TDMREP,
                f"{source}:reserved",
                True,
                f"TDM rights are reserved (TDMRep {source}){policy}",
            )
        )
    elif declaration.reservation == 0:
        signals.append(OptOutSignal(Kind.TDMREP, f"{source}:not-reserved", False))
    if declaration.policy and declaration.reservation == 1:
        signals.append(OptOutSignal(Kind.TDMREP, f"{source}:policy", False))
    return signals


def usage_signals(prefs: aipref.UsagePreferences, source: str) -> list[OptOutSignal]:
    """Signals of one Content-Usage statement, one per explicit preference; `source` is
    "content-usage" (the header) or "robots:content-usage" (a robots.txt rule). A "n" for a
    category that covers AI training opts out."""
    signals = []
    for label, allowed in prefs.explicit.items():
        value = "y" if allowed else "n"
        opts_out = not allowed and aipref.CATEGORIES[label].covers_training
        detail = f"the site's usage preference forbids AI training ({source} {label}={value})"
        signals.append(
            OptOutSignal(Kind.CONTENT_USAGE, f"{source}:{label}={value}", opts_out, detail)
        )
    return signals


def noai_signals(directives: set[str], source: str, image: bool) -> list[OptOutSignal]:
    signals = []
    for directive in _AI_DIRECTIVES:
        if directive in directives:
            binding = directive == "noai" or image
            signals.append(
                OptOutSignal(
                    Kind.NOAI,
                    f"{source}:{directive}",
                    binding,
                    f"the site opted out of AI use ({source}: {directive})",
                )
            )
    return signals


def response_signals(
    headers: list[tuple[str, str]],
    content_type: str | None,
    tokens: Iterable[str],
    html_head: HtmlHead | None = None,
    *,
    image: bool | None = None,
) -> list[OptOutSignal]:
    """Signals in one response's header fields, and in its HTML head if one was scanned.

    `image` says whether the body is an image (for noimageai); by default the Content-Type says.
    """
    tokens = list(tokens)
    if image is None:
        image = is_image(content_type)
    signals: list[OptOutSignal] = []
    signals += tdm_signals(tdmrep.from_headers(headers), "tdm-header")
    if html_head is not None:
        signals += tdm_signals(html_head.tdm, "tdm-meta")
    directives = robots_directives(header_values(headers, "x-robots-tag"), tokens)
    signals += noai_signals(directives, "x-robots-tag", image)
    if html_head is not None:
        signals += noai_signals(set(html_head.robots), "meta-robots", image)
        if not html_head.complete:
            signals.append(HEAD_CUT_SHORT)
    usage = aipref.parse_header(header_values(headers, "content-usage"))
    signals += usage_signals(usage, "content-usage")
    return signals
